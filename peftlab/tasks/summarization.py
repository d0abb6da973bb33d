"""Summarization: text -> text, with an encoder-decoder or a decoder-only model; loss while training, ROUGE at the end.

The family comes from the base model's config (`is_encoder_decoder`), or is an encoder-decoder when `model.decoder`
asks for a BERT2BERT warm start (see tasks/encoder_decoder.py, built through `load_model`):
- encoder-decoder (T5, BART, BERT2BERT): the prompt (`task.prompt`, default '{source}') feeds the encoder, the target
  is the labels (the model shifts them right into decoder inputs).
- decoder-only (Llama, Qwen, GPT-2): one sequence prompt + target + EOS, where the prompt's labels are -100 so the loss
  covers only the summary; evaluation generates from the prompt alone, left-padded.
During training the loop evaluates the loss (the default `train.best_metric`, lower is better); the final
evaluation (run.py, with context tokenizer= and recipe=) also generates with `recipe.eval`'s settings and scores
ROUGE-1/2/L/Lsum against the references.
"""

from __future__ import annotations

import logging
import warnings
from functools import cache
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, LogitsProcessorList, NoRepeatNGramLogitsProcessor

from ..bases import base_path
from ..errors import DataError, ModelNotFound
from ..metrics import ROUGE_KEYS, rouge_metrics
from . import encoder_decoder
from .generative import (
    causal_lm_loss,
    contiguous_head_input,
    evaluation_generation,
    generation_inputs,
    log_examples,
    loss_and_predictions,
    references,
    several_references,
)

log = logging.getLogger(__name__)
# EncoderDecoderModel (BERT2BERT) warns on every forward with labels about a loss change made in transformers 4.12
warnings.filterwarnings("ignore", message="Version v4.12.0 introduces a better way", category=FutureWarning)

DEFAULT_PROMPT = {"seq2seq": "{source}", "causal": "Summarize this dialogue:\n{source}\nSummary: "}
EXTRAS = ("text", "target", "references", "row", "gen_input_ids", "gen_attention_mask")  # eval-collator keys that are not model inputs


def is_encoder_decoder(config) -> bool:
    return bool(getattr(config, "is_encoder_decoder", False))


class AutoModelForSummarization:
    """AutoModelForSeq2SeqLM for encoder-decoder bases (T5, BART, a saved BERT2BERT), AutoModelForCausalLM otherwise."""

    @staticmethod
    def auto_for(config):
        """The transformers Auto class this config loads with."""
        return AutoModelForSeq2SeqLM if is_encoder_decoder(config) else AutoModelForCausalLM

    @classmethod
    def from_pretrained(cls, path, *args, **kwargs):
        config = kwargs.get("config") or AutoConfig.from_pretrained(path, revision=kwargs.get("revision"),
                                                                    trust_remote_code=kwargs.get("trust_remote_code", False))
        return cls.auto_for(config).from_pretrained(path, *args, **kwargs)

    @classmethod
    def from_config(cls, config, **kwargs):  # (a scratch model; a skeleton on the meta device for `validate`)
        return cls.auto_for(config).from_config(config, **kwargs)


auto_model_class = AutoModelForSummarization
target_kind = "text"
best_metric = "loss"  # evaluations during training need no generation; the final one reports ROUGE too
metrics = ("loss", *ROUGE_KEYS)
best_metric_note = (" (a ROUGE metric makes every evaluation during training generate summaries: slower, but it "
                    "selects on what is reported)")
generates = True  # its evaluation generates text (tasks/__init__.py)
warm_start = True  # model.decoder builds an encoder-decoder from two checkpoints (load_model)
base_lm_head = True  # the base's own LM head scores and generates: a frozen base has nothing to train
options = ("prompt", "chat_template")  # the task.* keys it reads
card_metrics = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum"}


def loss(model, batch, accelerator):
    """A decoder-only summarizer: the LM head on the summary's tokens only; an encoder-decoder: the model's own loss."""
    if is_encoder_decoder(accelerator.unwrap_model(model).config):
        return model(**batch).loss
    return causal_lm_loss(model, batch, accelerator)


# the model's peft task type (a full model's: from its config.json, card._task_of) -> (pipeline tag, card task name, Auto
# class of the usage snippet); unknown: an encoder-decoder
HUB = {"SEQ_2_SEQ_LM": ("summarization", "Summarization", "AutoModelForSeq2SeqLM"),
       "CAUSAL_LM": ("text-generation", "Text Generation", "AutoModelForCausalLM")}


def pipeline_tag(peft_type: str | None = None) -> str:
    return HUB.get(peft_type, HUB["SEQ_2_SEQ_LM"])[0]


def task_name(peft_type: str | None = None) -> str:
    return HUB.get(peft_type, HUB["SEQ_2_SEQ_LM"])[1]


def usage_class(peft_type: str | None = None) -> str:
    return HUB.get(peft_type, HUB["SEQ_2_SEQ_LM"])[2]


def peft_task_type(model) -> str:
    return "SEQ_2_SEQ_LM" if is_encoder_decoder(model.config) else "CAUSAL_LM"


def check(recipe) -> list[str]:
    d, prompt = recipe.data, recipe.task.prompt
    p = []
    if not d.target_column:
        p.append("data.target_column is not set: summarization needs the column holding the target text, "
                 "e.g. data.target_column=summary.")
    if prompt is not None and prompt.count("{source}") != 1:
        p.append(f"task.prompt={prompt!r}: must contain {{source}} exactly once (where the source text goes).")
    from ..methods.prompt import prefix_generating_problem

    if problem := prefix_generating_problem(recipe):
        p.append(problem)
    return p


def summary_line(split: str, m: dict) -> str:
    """ROUGE F-measures (in %, as papers report them: run.json and the card hold fractions) and the loss."""
    loss = f"   loss {m['loss']:.4f}" if "loss" in m else ""
    return f"   {split:<5} " + "   ".join(f"{k} {100 * m[k]:.2f}%" for k in ROUGE_KEYS if k in m) + loss


def load_model(recipe, path: str, dtype: torch.dtype):
    """A base of the task's own: the encoder-decoder warm start when model.decoder is set; None = the usual load."""
    return encoder_decoder.load_encoder_decoder(recipe, path, dtype) if recipe.model.decoder else None


def prompt_tokens(tokenizer, recipe, fam: str, template: str | None = None, slot: str = "{source}") -> int:
    """The tokens a prompt holds beyond its source (data.max_length counts the source alone): the template's text on
    either side of {source}, the tokenizer's special tokens ([CLS] and [SEP], </s>) or the BOS, or the rendered chat
    template, as tokenize writes them. `template` and `slot`: another task's prompt (the verbalizer's, around {text})."""
    head, tail = (template or recipe.task.prompt or DEFAULT_PROMPT[fam]).split(slot, 1)
    if fam == "seq2seq":  # tokenize's tokenizer(prompts): special tokens included
        return len(tokenizer(head)["input_ids"]) + len(tokenizer(tail, add_special_tokens=False)["input_ids"])
    if recipe.task.chat_template and getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": head + tail}], tokenize=False, add_generation_prompt=True)
        return len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return (_adds_bos(tokenizer) + len(tokenizer(head, add_special_tokens=False)["input_ids"])
            + len(tokenizer(tail, add_special_tokens=False)["input_ids"]))


def _folder_version(path: str) -> tuple:
    """What tells apart the versions of a local model folder (its files' names, inodes, sizes, mtimes and ctimes; () for a hub
    id): part of the caches' keys below, as a folder may be rewritten between two runs of one process (a notebook that
    retrains the run a model.from_run starts from rewrites RUN/merged): read by path alone, a BART's config was still
    served for the decoder that replaced it, whose summaries were then generated as a seq2seq model's."""
    folder = Path(path)
    if not folder.is_dir():
        return ()
    files = [(f.name, f.stat()) for f in folder.iterdir() if f.is_file()]
    return tuple(sorted((name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) for name, st in files))


@cache
def _base_tokenizer(path: str, revision: str | None, trust_remote_code: bool, version: tuple):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)


def base_tokens(recipe, count, what: str) -> int:
    """count(the base's tokenizer): tokens an input length holds beyond the recipe's keys (a prompt template's, a label
    word's); 0 (said in the log: `what`) where the tokenizer cannot be read here or count refuses it (`validate`
    reports that on its own)."""
    m = recipe.model
    try:
        path = base_path(recipe)
        return count(_base_tokenizer(path, m.revision, m.trust_remote_code, _folder_version(path)))
    except Exception as e:  # (e.g. a GGUF base not converted yet: `train` checks on the converted one)
        log.info("%s not counted in the input lengths (%s: %s)", what, type(e).__name__, e)
        return 0


def input_lengths(config, recipe) -> list[tuple]:
    """(config, tokens, what): an encoder-decoder reads the prompt (data.max_length source tokens + the template and
    special tokens) and writes the summary (while training, its labels; at the final evaluation, the start token +
    eval.max_new_tokens generated), a decoder-only model holds the prompt + summary in one sequence (while training) or
    the prompt + eval.max_new_tokens (generating), as sft counts them."""
    d, e = recipe.data, recipe.eval
    new = (e.max_new_tokens + 1, f"eval.max_new_tokens + 1 (the decoder start token) = {e.max_new_tokens} + 1")
    encoder, decoder = getattr(config, "encoder", None), getattr(config, "decoder", None)
    seq2seq = (encoder is not None and decoder is not None) or getattr(config, "is_encoder_decoder", False)
    fam = "seq2seq" if seq2seq else "causal"
    extra = base_tokens(recipe, lambda tokenizer: prompt_tokens(tokenizer, recipe, fam), "the prompt template's tokens are")
    what = "data.max_length + the prompt template and special tokens"
    prompt = (d.max_length + extra, f"{what} = {d.max_length} + {extra}")
    if encoder is not None and decoder is not None:  # a warm-started encoder-decoder: each half has its own table
        return [(encoder, *prompt), (decoder, d.max_target_length, f"data.max_target_length={d.max_target_length}"), (decoder, *new)]
    if seq2seq:
        return [(config, *prompt), (config, d.max_target_length, f"data.max_target_length={d.max_target_length}"), (config, *new)]
    return [(config, prompt[0] + d.max_target_length, f"{what} + data.max_target_length = {d.max_length} + {extra} + {d.max_target_length}"),
            (config, prompt[0] + e.max_new_tokens, f"{what} + eval.max_new_tokens = {d.max_length} + {extra} + {e.max_new_tokens}")]


@cache
def _is_encoder_decoder_dir(path: str, revision: str | None, trust_remote_code: bool, version: tuple) -> bool:
    return is_encoder_decoder(AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code))


def family(recipe, tokenizer) -> str:
    """'seq2seq' or 'causal', from the base model's config; where the base is out of reach, a merged or fully trained
    run's own config.json (saved beside its tokenizer) tells the same."""
    if recipe.model.decoder:
        return "seq2seq"
    try:
        path, revision = base_path(recipe), recipe.model.revision
    except ModelNotFound:
        own = Path(getattr(tokenizer, "name_or_path", "") or "")
        if not (own / "config.json").is_file():
            raise
        path, revision = str(own), None
    return "seq2seq" if _is_encoder_decoder_dir(path, revision, recipe.model.trust_remote_code, _folder_version(path)) else "causal"


def eos_id(tokenizer) -> int:
    """The token that ends a summary: EOS, or [SEP] for BERT-style tokenizers that have no EOS."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos is None:
        raise DataError(f"the tokenizer {type(tokenizer).__name__} has neither an EOS nor a SEP token, so a summary cannot end. "
                        "Use a model whose tokenizer defines eos_token.")
    return eos


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def truncate_sources(tokenizer, texts: list[str], max_length: int) -> tuple[list[str], list[bool]]:
    """Cut each source to `max_length` tokens (the prompt template and special tokens come on top), so a template
    that follows the source is never cut off. Rows that fit are left as they are. The text is cut as written, where
    the first token left out starts (decoding the kept tokens instead turned a byte-fallback tokenizer's emoji cut
    mid-character into a run of '\ufffd', each three tokens again: 64 tokens read back as 110); a tokenizer without
    offsets: decoded."""
    enc = with_offsets(tokenizer, texts, truncation=True, max_length=max_length + 1)
    if enc is None:
        ids = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_length + 1)["input_ids"]
        cut = [len(i) > max_length for i in ids]
        return [tokenizer.decode(i[:max_length]) if c else t for t, i, c in zip(texts, ids, cut)], cut
    cut = [len(i) > max_length for i in enc["input_ids"]]
    return [t[:offsets[max_length][0]].rstrip() if c else t for t, offsets, c in zip(texts, enc["offset_mapping"], cut)], cut


def with_offsets(tokenizer, texts: list[str], **kwargs):
    """`texts` tokenized (no special tokens) with each token's character offsets; None for a tokenizer without them
    (a slow one)."""
    try:
        return tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, **kwargs)
    except (NotImplementedError, TypeError, ValueError):
        return None


def prompt_and_summary(tokenizer, prompts: list[str], targets: list[str], max_target: int) -> tuple[list[list[int]], list[list[int]]]:
    """A plain prompt and its summary tokenized as the one text the model reads, cut where the prompt's text ends (its
    trailing spaces go with the summary): -> (prompt ids, summary ids, at most `max_target`). Tokenized apart, a
    prompt ending in 'Summary: ' gave SmolLM2 ':', ' ', 'Jane' for the natural ':', ' Jane' (zero-shot 2.86 nats a token
    on SAMSum instead of 2.65), and SentencePiece a doubled '▁'. A tokenizer without offsets: tokenized apart."""
    enc = with_offsets(tokenizer, [p + t for p, t in zip(prompts, targets)])
    if enc is None:
        return (tokenizer(prompts, add_special_tokens=False)["input_ids"],
                tokenizer(targets, add_special_tokens=False, truncation=True, max_length=max_target)["input_ids"])
    heads, tails = [], []
    for prompt, ids, offsets in zip(prompts, enc["input_ids"], enc["offset_mapping"]):
        end = len(prompt.rstrip(" "))
        k = next((i for i, (start, _) in enumerate(offsets) if start >= end), len(ids))
        heads.append(ids[:k])
        tails.append(ids[k:][:max_target])
    return heads, tails


def tokenize(ds, tokenizer, recipe):
    """{text, target} rows -> input_ids, attention_mask, labels (+ prompt_length for decoder-only models), keeping
    `length`, `truncated` (source cut to data.max_length), `target_truncated` (summary cut to data.max_target_length),
    `row` (its number in the file) and the texts for the final evaluation."""
    fam = family(recipe, tokenizer)
    template = recipe.task.prompt or DEFAULT_PROMPT[fam]
    max_length, max_target = recipe.data.max_length, recipe.data.max_target_length
    eos = eos_id(tokenizer)
    chat = fam == "causal" and recipe.task.chat_template and bool(getattr(tokenizer, "chat_template", None))
    if recipe.task.chat_template and not chat:
        log.warning("task.chat_template=true, but %s: using the plain prompt", "the model is an encoder-decoder" if fam == "seq2seq"
                    else "the tokenizer has no chat template")
    bos = [tokenizer.bos_token_id] if fam == "causal" and not chat and _adds_bos(tokenizer) else []
    # BERT2BERT: [CLS] is the decoder start token the model puts in front of the labels, so it is not a target itself
    start = tokenizer.cls_token_id if recipe.model.decoder else None

    def enc(batch):
        sources, cut = truncate_sources(tokenizer, batch["text"], max_length)
        prompts = [template.replace("{source}", s) for s in sources]
        out = {"truncated": cut}
        if fam == "seq2seq":
            src = tokenizer(prompts)
            labels = tokenizer(text_target=batch["target"], truncation=True, max_length=max_target + 1 + (start is not None))["input_ids"]
            labels = [y[1:] if start is not None and y[:1] == [start] else y for y in labels]
            fitted = [y if len(y) <= max_target and y[-1:] == [eos] else y[: max_target - 1] + [eos] for y in labels]
            out.update(input_ids=src["input_ids"], attention_mask=src["attention_mask"], labels=fitted,
                       target_truncated=[len(f) - 1 < len(y) - (y[-1:] == [eos]) for y, f in zip(labels, fitted)])
        else:
            if chat:
                prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                           for p in prompts]
                prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
                targets = tokenizer(batch["target"], add_special_tokens=False, truncation=True, max_length=max_target)["input_ids"]
            else:
                prompt_ids, targets = prompt_and_summary(tokenizer, prompts, batch["target"], max_target)
            out["target_truncated"] = [len(y) > max_target - 1 for y in targets]  # (one token more read: the summary was longer)
            targets = [y[: max_target - 1] for y in targets]
            prompt_ids = [bos + p for p in prompt_ids]
            out.update(input_ids=[p + y + [eos] for p, y in zip(prompt_ids, targets)],
                       labels=[[-100] * len(p) + y + [eos] for p, y in zip(prompt_ids, targets)],
                       prompt_length=[len(p) for p in prompt_ids])
            out["attention_mask"] = [[1] * len(i) for i in out["input_ids"]]
        out["length"] = [len(i) for i in out["input_ids"]]
        return out

    return ds.map(enc, batched=True, desc="tokenize")


def report_cuts(ds, where: str, recipe, training: bool = False) -> None:
    """Summaries cut to data.max_target_length, beside the sources data.report_truncation counts: a warning with the
    count; a training split whose every summary was cut is refused (the model would never learn where one ends)."""
    cut, n, m = sum(ds["target_truncated"]), len(ds), recipe.data.max_target_length
    if cut == n and where.endswith(".train"):
        raise DataError(f"{where}: all {n:,} summaries are longer than data.max_target_length={m} tokens (EOS included), so every "
                        f"target was cut and the model would never learn to end one. Raise it (e.g. data.max_target_length={m * 4}) "
                        "or check data.target_column.")
    if cut:
        log.warning("%s: %s of %s summaries (%.1f%%) cut to data.max_target_length=%d tokens (EOS included)%s. Raise "
                    "data.max_target_length to keep them whole.", where, f"{cut:,}", f"{n:,}", 100 * cut / n, m,
                    ": the model learns to end them early" if where.endswith(".train") else ": their loss covers the first tokens only")


GENERATED_METRICS = ROUGE_KEYS  # need generation: train.best_metric one of them -> evals generate


def _pad(seqs: list[list[int]], value: int, left: bool = False, multiple: int = 8, limit: int | None = None) -> torch.Tensor:
    """Padded to a multiple of 8 (tensor cores), but never past `limit` (the tokenizer's model_max_length: the
    position table), which a batch of rows that fit it would not fit once padded (513 -> 520 > 512)."""
    longest = max(len(s) for s in seqs)
    n = -(-longest // multiple) * multiple
    if limit is not None and n > limit:
        n = max(longest, limit)
    return torch.tensor([[value] * (n - len(s)) + s if left else s + [value] * (n - len(s)) for s in seqs])


def _limit(tokenizer) -> int | None:
    n = getattr(tokenizer, "model_max_length", None)
    return n if isinstance(n, int) and n < 10**6 else None  # (transformers' "no limit" is a huge number)


def collator(tokenizer):
    """Model inputs only, right-padded (labels with -100): what the training loop and the loss evaluation feed."""
    pad, limit = tokenizer.pad_token_id, _limit(tokenizer)

    def collate(rows):
        return {"input_ids": _pad([r["input_ids"] for r in rows], pad, limit=limit),
                "attention_mask": _pad([r["attention_mask"] for r in rows], 0, limit=limit),
                "labels": _pad([r["labels"] for r in rows], -100, limit=limit)}

    return collate


def eval_collator(tokenizer):
    """Model inputs + source/reference texts and row indices; for decoder-only models also the prompts alone,
    left-padded, which is what generation continues from."""
    base, pad, limit = collator(tokenizer), tokenizer.pad_token_id, _limit(tokenizer)

    def collate(rows):
        batch = base(rows)
        batch.update(text=[r["text"] for r in rows], target=[r["target"] for r in rows], row=[r["row"] for r in rows])
        if "references" in rows[0]:  # (an eval split's references_column)
            batch["references"] = [r["references"] for r in rows]
        if "prompt_length" in rows[0]:
            prompts = [r["input_ids"][: r["prompt_length"]] for r in rows]
            batch["gen_input_ids"] = _pad(prompts, pad, left=True, limit=limit)
            batch["gen_attention_mask"] = _pad([[1] * len(p) for p in prompts], 0, left=True, limit=limit)
        return batch

    return collate


class SummaryNoRepeatNGram(NoRepeatNGramLogitsProcessor):
    """eval.no_repeat_ngram_size for a decoder-only model: transformers' blocker counts every n-gram of input_ids, which
    holds the prompt too, so no name or phrase of the dialogue could be copied into the summary. This one sees the
    tokens generated after the (left-padded) prompt of `prompt_length` tokens only."""

    def __init__(self, ngram_size: int, prompt_length: int):
        super().__init__(ngram_size)
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return super().__call__(input_ids[:, self.prompt_length:], scores)


def generate(model, tokenizer, batch: dict, extras: dict, cfg, accelerator) -> list[str]:
    """Decode summaries for one batch with the recipe's eval settings (beam search, lengths, n-gram blocking)."""
    causal = "gen_input_ids" in extras
    if causal:  # left-padded prompts; a prompt-learning adapter's virtual tokens in front (generation_inputs)
        generator, inputs, echoed = generation_inputs(model, extras["gen_input_ids"], extras["gen_attention_mask"])
    else:
        generator, inputs, echoed = model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, 0
    settings = dict(max_new_tokens=cfg.max_new_tokens, num_beams=cfg.num_beams, do_sample=False,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_id(tokenizer))
    if cfg.num_beams > 1:
        settings.update(length_penalty=cfg.length_penalty, early_stopping=True)
    processors = {}
    if cfg.no_repeat_ngram_size and causal:  # the summary's own n-grams: not the prompt's, which it must be free to copy
        processors["logits_processor"] = LogitsProcessorList([SummaryNoRepeatNGram(cfg.no_repeat_ngram_size, echoed)])
    elif cfg.no_repeat_ngram_size:  # (an encoder-decoder's decoder holds the summary only)
        settings["no_repeat_ngram_size"] = cfg.no_repeat_ngram_size
    # the recipe's settings alone: none of the base's generation_config.json (its repetition_penalty, n-gram blocking)
    with accelerator.autocast(), contiguous_head_input(model), evaluation_generation(generator, **settings) as config:
        out = generator.generate(**inputs, generation_config=config, **processors)
    out = out[:, echoed:]  # a decoder's prompt comes back in front of the continuation
    return [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]


def evaluate(model, loader, accelerator, label_names, *, tokenizer=None, recipe=None):
    """-> (metrics, report). Always the mean token-level loss (what keep_best compares during training); with
    `tokenizer` and `recipe` (the final evaluation, on a loader from eval_collator) also generated summaries scored
    with ROUGE; the report then holds every (row, source, prediction, reference) in data order."""
    generating = tokenizer is not None and recipe is not None
    shift = not is_encoder_decoder(accelerator.unwrap_model(model).config)
    write = (lambda m, batch, extras: generate(m, tokenizer, batch, extras, recipe.eval, accelerator)) if generating else None
    loss, n_tokens, rows = loss_and_predictions(model, loader, accelerator, shift=shift, extras=EXTRAS, source="text",
                                                reference="target", generate=write, task="summarization")
    metrics = {"loss": loss} if loss is not None else {}
    if rows is None:
        return metrics, {"n_tokens": n_tokens}
    preds = [r["prediction"] for r in rows]
    metrics.update(rouge_metrics(preds, [references(r) for r in rows]))
    metrics["gen_words"] = sum(len(p.split()) for p in preds) / max(len(preds), 1)
    log_examples(rows, recipe.eval.log_examples)
    e = recipe.eval
    report = {"n": len(rows), "n_tokens": n_tokens, "generation": {"num_beams": e.num_beams, "max_new_tokens": e.max_new_tokens,
              "length_penalty": e.length_penalty, "no_repeat_ngram_size": e.no_repeat_ngram_size}, **several_references(rows),
              "predictions": rows}
    return metrics, report
