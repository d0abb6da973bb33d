"""Verbalizer classification: a causal LM (Llama, Qwen, SmolLM2) classifies by writing the label word.

Each row becomes one sequence `prompt + label word` (`task.prompt` with {text} where the joined data.text_columns go,
optionally rendered through the tokenizer's chat template: task.chat_template), whose labels are -100 over the prompt,
so the loss covers only the label word's tokens (+ EOS with task.label_eos). Evaluation does not generate freely: it
scores each class's label word by its log-likelihood given the prompt (the sum over its tokens) and predicts the best
one, so every prediction is a class; it reports accuracy, macro-F1, the per-class report and confusion matrix, as
the classification task does, and the loss (mean over the gold label words' tokens, as in training).

The words: data.label_words (in data.label_names order, written verbatim), or derived from data.label_names:
' negative' after a plain prompt (a word follows a space), 'negative' as the assistant's answer of a chat template.
A word's tokens are those the tokenizer gives it written after the prompt (label_token_ids), not alone: a
SentencePiece tokenizer (Llama, Mistral) puts '▁' in front of a text's first word, so 'negative' alone was
'▁negative', after the chat template's closing newline 'negative'.
Zero-shot (the base model, nothing trained): the same recipe with train.max_steps=0 evaluates and exports the
untouched base (a LoRA adapter starts as the identity).
"""

from __future__ import annotations

import copy
import logging
import re
from contextlib import contextmanager

import torch
from transformers import AutoModelForCausalLM

from ..errors import DataError
from ..metrics import CLASSIFICATION_KEYS, classification_metrics
from .classification import prediction_rows
from .generative import causal_lm_loss, contiguous_head_input, next_token_items, row_losses
from .summarization import _adds_bos, _pad, base_tokens, collator, eos_id, prompt_tokens, truncate_sources  # collator: as summarization trains

log = logging.getLogger(__name__)

auto_model_class = AutoModelForCausalLM
peft_task_type = "CAUSAL_LM"
base_lm_head = True  # the base's own LM head scores and generates: a frozen base has nothing to train
loss = causal_lm_loss  # the LM head runs on the label word's tokens only
loss_items = next_token_items  # what it averages over (a step of several micro-batches pools them: train.py)
target_kind = "label"
best_metric = "accuracy"
metrics = (*CLASSIFICATION_KEYS, "loss")
# scoring the label words needs the prompts (the eval collator) and the tokenizer: a kept accuracy makes evaluations score
GENERATED_METRICS = CLASSIFICATION_KEYS
options = ("prompt", "chat_template", "label_eos")  # the task.* keys it reads
pipeline_tag = "text-generation"
task_name = "Text Classification (label word)"
usage_class = "AutoModelForCausalLM"
card_metrics = {"accuracy": "Accuracy", "f1": "Macro F1"}

DEFAULT_PROMPT = "Text: {text}\nLabel:"
PLACEHOLDER = re.compile(r"\{([A-Za-z_]\w*)\}")  # a {name}: braces around anything else (JSON) are text, kept as written
EXTRAS = ("prompt_length", "class_label", "row", "text")  # eval-collator keys that are not model inputs


def check(recipe) -> list[str]:
    d, prompt = recipe.data, recipe.task.prompt
    p = []
    if prompt is not None:
        unknown = sorted({m for m in PLACEHOLDER.findall(prompt) if m != "text"})
        if unknown:
            p.append(f"task.prompt={prompt!r}: unknown placeholder(s) {', '.join('{' + u + '}' for u in unknown)}; the verbalizer "
                     "fills only {text} (the joined data.text_columns). Write the other parts literally.")
        if prompt.count("{text}") != 1:
            p.append(f"task.prompt={prompt!r}: must contain {{text}} exactly once (where the input text goes), e.g. "
                     "'Review: {text}\\nSentiment:'.")
    if not d.label_words and not d.label_names:
        p.append("task.type=verbalizer needs the word written for each class: set data.label_names (the words are derived "
                 "from them, e.g. [negative, positive]), and optionally data.label_words (written verbatim, in their order).")
    if not d.label_words and d.label_names and any(not str(n).strip() for n in d.label_names):  # (' ' after a plain prompt: scored)
        p.append(f"data.label_names={d.label_names}: a blank name gives its class an empty label word, which cannot be scored; "
                 "name every class, or set data.label_words (the words written verbatim, in data.label_names order).")
    if d.label_words:
        dup = sorted({w for w in d.label_words if d.label_words.count(w) > 1})
        if dup:
            p.append(f"data.label_words={d.label_words}: {dup} given more than once; each class needs its own word.")
        if any(not w.strip() for w in d.label_words):
            p.append(f"data.label_words={d.label_words}: an empty word cannot be scored; give every class a word.")
        if not d.label_names:  # classes read from the data come sorted: which word would be whose is not the recipe's
            p.append(f"data.label_words={d.label_words} needs data.label_names: the words go with the classes in order, so name "
                     "the classes in that order (data.label_names=[...], the values of the label column).")
        elif len(d.label_names) != len(d.label_words):
            p.append(f"data.label_words has {len(d.label_words)} words for the {len(d.label_names)} data.label_names "
                     f"{d.label_names}: give one word per class, in the same order.")
    return p


def summary_line(split: str, m: dict) -> str:
    return f"   {split:<5} accuracy {m['accuracy']:.4f}   macro-F1 {m['f1']:.4f}   loss {m['loss']:.4f}"


def input_lengths(config, recipe) -> list[tuple]:
    """(config, tokens, what): one sequence holds the prompt (data.max_length text tokens + the template's, the BOS or
    the rendered chat template, counted as summarization counts its prompt) and the longest label word (+ EOS with
    task.label_eos), in training and scoring alike. data.max_length alone left them out: a model with a learned
    position table passed `validate` and trained, then the final evaluation failed in the embedding lookup."""
    d = recipe.data
    template = recipe.task.prompt or DEFAULT_PROMPT
    extra = base_tokens(recipe, lambda tokenizer: prompt_tokens(tokenizer, recipe, "causal", template, "{text}"),
                        "the prompt template's tokens are")
    word = base_tokens(recipe, lambda tokenizer: max(map(len, label_token_ids(tokenizer, recipe)), default=0),
                       "the label words' tokens are")
    eos = " (+ EOS)" if recipe.task.label_eos else ""
    return [(config, d.max_length + extra + word, f"data.max_length + the prompt template and special tokens + the longest "
             f"label word{eos} = {d.max_length} + {extra} + {word}")]


def uses_chat(tokenizer, recipe) -> bool:
    """task.chat_template=true needs a tokenizer that has one (an error with the fix otherwise, never a silent plain prompt)."""
    if not recipe.task.chat_template:
        return False
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"task.chat_template=true, but the tokenizer of {recipe.model.name} has no chat template. Set "
                        "task.chat_template=false (the plain task.prompt), or use an instruction-tuned model that ships one.")
    return True


def check_tokenizer(tokenizer, recipe) -> None:
    """`validate`: the chat template, and the label words as training tokenizes them (refused there: two alike, a prefix)."""
    uses_chat(tokenizer, recipe)
    if recipe.data.label_names:
        label_token_ids(tokenizer, recipe)


def label_words(recipe, label_names: list[str], chat: bool) -> list[str]:
    words = recipe.data.label_words or [n if chat else " " + n for n in label_names]
    if len(words) != len(label_names):
        raise DataError(f"data.label_words has {len(words)} words for {len(label_names)} classes {label_names}: give one word "
                        "per class, in class order.")
    return list(words)


ANCHOR_TEXT = "text"  # what the prompt the words are tokenized after holds where {text} goes (label_token_ids)


def label_token_ids(tokenizer, recipe, label_names: list[str] | None = None) -> list[list[int]]:
    """Each class's label-word tokens (+ EOS with task.label_eos): those the tokenizer gives the word written after the
    prompt (word_ids_after a prompt rendered as prompt_ids renders it; tokenize checks every row's), which a word
    tokenized alone is not (a SentencePiece tokenizer's '▁' in front). A word that merges with the prompt's last
    token, two words with the same tokens, or one whose tokens begin another's without an EOS after them (the longer
    could then never score higher) are refused."""
    names = list(label_names or recipe.data.label_names or [])
    words = label_words(recipe, names, uses_chat(tokenizer, recipe))
    (anchor,), _ = prompt_texts(tokenizer, recipe, [ANCHOR_TEXT])
    ids = [word_ids_after(tokenizer, anchor, w) for w in words]
    for w, i in zip(words, ids):
        if i is None:
            raise DataError(_merges(tokenizer, anchor, w))
        if not i:
            raise DataError(f"data.label_words: {w!r} tokenizes to nothing; give a word the tokenizer can write.")
    if recipe.task.label_eos:
        ids = [i + [eos_id(tokenizer)] for i in ids]
    for a in range(len(ids)):
        for b in range(len(ids)):
            if a == b:
                continue
            if ids[a] == ids[b]:
                raise DataError(f"label words {words[a]!r} and {words[b]!r} tokenize to the same tokens {ids[a]}, so the model "
                                "cannot tell the classes apart. Set data.label_words to words that tokenize differently.")
            if ids[b][: len(ids[a])] == ids[a]:
                raise DataError(f"label word {words[a]!r} ({ids[a]}) is a prefix of {words[b]!r} ({ids[b]}): scored by "
                                f"likelihood, {words[b]!r} could never win. Set task.label_eos=true (each word is followed by "
                                "EOS, trained and scored), or data.label_words with words that differ in their first token.")
    return ids


def word_ids_after(tokenizer, prompt: str, word: str) -> list[int] | None:
    """The ids of `word` written after the text `prompt`: what follows the prompt's own ids in the tokenization of
    prompt + word. None where that tokenization does not begin with the prompt's ids (the prompt's last token and the
    word's first merge), so the word has no tokens of its own after this prompt."""
    head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    joint = tokenizer(prompt + word, add_special_tokens=False)["input_ids"]
    return joint[len(head):] if joint[: len(head)] == head else None


def _merges(tokenizer, prompt: str, word: str) -> str:
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(prompt + word, add_special_tokens=False)["input_ids"])
    return (f"label word {word!r} does not tokenize apart from the prompt it follows, {prompt[-40:]!r}: together they give "
            f"...{tokens[-6:]}, where the prompt's last token and the word's first merge, so the word has no tokens of its own "
            "to score. End task.prompt with other text (e.g. no trailing space: a word derived from data.label_names after a "
            "plain prompt begins with one), or set data.label_words to words that start a token of their own (e.g. with a "
            "leading space).")


def prompt_texts(tokenizer, recipe, texts: list[str]) -> tuple[list[str], list[bool]]:
    """Each row's prompt as text (its text cut to data.max_length tokens first, put in task.prompt, rendered through
    the chat template with task.chat_template) and which rows were cut."""
    chat = uses_chat(tokenizer, recipe)
    template = recipe.task.prompt or DEFAULT_PROMPT
    texts, cut = truncate_sources(tokenizer, texts, recipe.data.max_length)
    prompts = [template.replace("{text}", t) for t in texts]
    if chat:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                   for p in prompts]
    return prompts, cut


def _bos(tokenizer, recipe) -> list[int]:
    """The BOS in front of a plain prompt where the tokenizer puts one (a chat template writes its own)."""
    return [tokenizer.bos_token_id] if not uses_chat(tokenizer, recipe) and _adds_bos(tokenizer) else []


def prompt_ids(tokenizer, recipe, texts: list[str]) -> tuple[list[list[int]], list[bool]]:
    """The token ids of each row's prompt (prompt_texts, after the BOS) and which rows were cut."""
    prompts, cut = prompt_texts(tokenizer, recipe, texts)
    bos = _bos(tokenizer, recipe)
    return [bos + i for i in tokenizer(prompts, add_special_tokens=False)["input_ids"]], cut


def check_words_follow(tokenizer, prompts: list[str], prompt_ids: list[list[int]], words: list[str], ids: list[list[int]],
                       rows: list | None = None) -> None:
    """Every label word, written after each row's prompt, tokenizes as label_token_ids says (what training and scoring
    put after the prompt's ids): a prompt that ends with its text ('Label: {text}') ends differently in each row, and
    a word could merge with one row's last token. Refused with the first such row."""
    for w, i in zip(words, ids):
        joint = tokenizer([p + w for p in prompts], add_special_tokens=False)["input_ids"]
        for k, (p, j) in enumerate(zip(prompt_ids, joint)):
            if j != p + i:
                where = f"row {rows[k]}" if rows is not None else f"the prompt ending {prompts[k][-40:]!r}"
                raise DataError(f"{where}: the label word {w!r} tokenizes as {tokenizer.convert_ids_to_tokens(j[len(p):])} "
                                f"after this prompt's tokens {tokenizer.convert_ids_to_tokens(p[-3:])} (together: "
                                f"{tokenizer.convert_ids_to_tokens(j[-len(i) - 3:])}), but as {tokenizer.convert_ids_to_tokens(i)} "
                                "after the others, so this row would be trained and scored on tokens the model does not read "
                                "there. End task.prompt with fixed text after {text} (e.g. '{text}\\nLabel:'), or set "
                                "data.label_words to words that start a token of their own.")


def tokenize(ds, tokenizer, recipe):
    """{text, label} rows -> input_ids = prompt + label word, labels = -100 over the prompt then the word's tokens;
    keeps prompt_length, class_label (the class index), length and truncated, and the text and row for predictions.
    Every label word is checked to tokenize after each row's prompt as it is scored (check_words_follow)."""
    words = label_token_ids(tokenizer, recipe)
    written = label_words(recipe, list(recipe.data.label_names or []), uses_chat(tokenizer, recipe))
    bare = [w[:-1] if recipe.task.label_eos else w for w in words]  # (the EOS is no part of the written word)
    bos = _bos(tokenizer, recipe)

    def enc(batch):
        texts, cut = prompt_texts(tokenizer, recipe, batch["text"])
        own = tokenizer(texts, add_special_tokens=False)["input_ids"]
        check_words_follow(tokenizer, texts, own, written, bare, batch.get("row"))
        prompts = [bos + i for i in own]
        targets = [words[y] for y in batch["label"]]
        ids = [p + y for p, y in zip(prompts, targets)]
        return {"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids],
                "labels": [[-100] * len(p) + y for p, y in zip(prompts, targets)],
                "prompt_length": [len(p) for p in prompts], "class_label": batch["label"],
                "length": [len(i) for i in ids], "truncated": cut}

    return ds.map(enc, batched=True, remove_columns=["label"], desc="tokenize")


def eval_collator(tokenizer):
    """The model inputs + each row's prompt length and class index: what scoring the label words needs; and its row in
    the file and text, for the predictions file."""
    base = collator(tokenizer)

    def collate(rows):
        batch = base(rows)
        batch["prompt_length"] = torch.tensor([r["prompt_length"] for r in rows])
        batch["class_label"] = torch.tensor([r["class_label"] for r in rows])
        batch.update({k: [r[k] for r in rows] for k in ("row", "text") if k in rows[0]})
        return batch

    return collate


def score_words(model, prompts: list[list[int]], words: list[list[int]], pad: int) -> torch.Tensor:
    """-> (rows, classes) log-likelihood of each word's tokens after each prompt. The prompts are left-padded (position
    ids follow the padding) and run once, keeping their KV cache and only the last position's logits; each word's
    remaining tokens then run on a copy of that cache, so a batch costs one prompt pass however many classes and
    word tokens there are. Prompt/prefix tuning (whose virtual tokens peft adds on every call) runs each prompt + word
    in full instead. The LM head runs in float32 for these scores (float32_head), under autocast too."""
    with float32_head(model):
        return _score_words(model, prompts, words, pad)


def _score_words(model, prompts: list[list[int]], words: list[list[int]], pad: int) -> torch.Tensor:
    device = next(model.parameters()).device
    if _prompt_learning(model):
        return _score_words_in_full(model, prompts, words, device)
    ids = _pad(prompts, pad, left=True, multiple=1).to(device)
    mask = _pad([[1] * len(s) for s in prompts], 0, left=True, multiple=1).to(device)
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    with contiguous_head_input(model):  # the head gets hidden[:, -1:], a strided view (contiguous_head_input)
        out = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True, logits_to_keep=1)
    first = out.logits[:, -1].float().log_softmax(-1)
    field = "cache" if getattr(out, "cache", None) is not None else "past_key_values"  # transformers 5 renamed it
    cache = getattr(out, field, None)
    if cache is None and any(len(w) > 1 for w in words):
        raise ValueError("score_words: the model returned no KV cache; multi-token label words need one")
    rows, scores = len(prompts), []
    for w in words:
        score = first[:, w[0]]
        if len(w) > 1:
            rest = torch.tensor(w[:-1], device=device).expand(rows, -1)  # position t predicts token t+1
            lp = model(input_ids=rest, attention_mask=torch.cat([mask, mask.new_ones(rows, len(w) - 1)], 1),
                       position_ids=position[:, -1:] + torch.arange(1, len(w), device=device),
                       use_cache=True, **{field: copy.deepcopy(cache)}).logits.float().log_softmax(-1)
            score = score + lp.gather(-1, torch.tensor(w[1:], device=device).expand(rows, -1)[..., None])[..., 0].sum(-1)
        scores.append(score)
    return torch.stack(scores, 1)


@contextmanager
def float32_head(model):
    """While label words are scored: the LM head's logits computed in float32, outside autocast.

    Under bf16 autocast the head's matmul rounds its output to bf16, 8 significant bits: an LLM's logits (|z| ~32-64)
    came in steps of 0.25, and so did every word's log-likelihood after log_softmax; two close classes tied at p = 0.5
    exactly, and argmax gave class 0. The head reads float32 hidden states (the residual stream stays float32 under
    autocast) at the positions scored only (the prompt's last, the word's tokens), so the float32 logits are few. A head
    stored in bf16 (a bf16 base, train.cast_frozen's copy) is upcast for the call: its weights' own rounding stays, the
    output's goes. The layer under an adapter (LoRA on lm_head) runs so, its update added after as before; a head of
    another kind (peft's modules_to_save copy, a quantized one) is left as it is. Training keeps its bf16 head (speed)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    get = getattr(getattr(model, "module", model), "get_output_embeddings", None)  # (DDP: .module)
    head = get() if get is not None else None
    head = head.get_base_layer() if isinstance(head, BaseTunerLayer) else head
    if type(head) is not torch.nn.Linear or hasattr(head, "_hf_hook"):  # (accelerate's hook brings offloaded weights in)
        yield
        return

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            return torch.nn.functional.linear(hidden.float(), head.weight.float(), None if head.bias is None else head.bias.float())

    previous = vars(head).get("forward")  # (one set on the instance by another library: put back after)
    head.forward = forward  # an instance attribute: the module's hooks still run, then this
    try:
        yield
    finally:
        if previous is None:
            del head.forward
        else:
            head.forward = previous


def _prompt_learning(model) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def _score_words_in_full(model, prompts, words, device) -> torch.Tensor:
    """score_words for prompt/prefix tuning: each prompt + word run in full, rows of equal length together and
    unpadded, since peft puts the virtual tokens before any padding and ignores position ids (a left-padded row
    would see its virtual tokens at a distance that depends on the padding)."""
    scores = torch.empty(len(prompts), len(words), device=device)
    for k, w in enumerate(words):
        by_length: dict[int, list[int]] = {}
        for r, p in enumerate(prompts):
            by_length.setdefault(len(p), []).append(r)
        for rows in by_length.values():
            ids = torch.tensor([prompts[r] + w for r in rows], device=device)
            lp = model(input_ids=ids).logits[:, -len(w) - 1:-1].float().log_softmax(-1)
            target = torch.tensor(w, device=device).expand(len(rows), -1)
            scores[rows, k] = lp.gather(-1, target[..., None])[..., 0].sum(-1)
    return scores


@torch.no_grad()
def evaluate(model, loader, accelerator, label_names, *, tokenizer=None, recipe=None):
    """-> (metrics, report). Without tokenizer/recipe (evaluations during training that keep the loss): the loss over
    the label-word tokens only. With them (the final evaluation, or a kept accuracy; loader from eval_collator): each
    class's word scored, the argmax predicted; accuracy, macro-F1, per-class report and confusion matrix, and the loss,
    and every row's prediction (classification.prediction_rows: the probability is over the label words)."""
    scoring = tokenizer is not None and recipe is not None
    words = label_token_ids(tokenizer, recipe, label_names) if scoring else None
    model.eval()
    preds, refs, nll_sum, n_tokens, written = [], [], 0.0, 0, []
    for batch in loader:
        extras = {k: batch.pop(k) for k in EXTRAS if k in batch}
        if not scoring:
            sums, counts = accelerator.gather_for_metrics(row_losses(model, batch, accelerator))
            nll_sum += sums.sum().item()
            n_tokens += int(counts.sum().item())
            continue
        if "class_label" not in extras:
            raise ValueError("verbalizer: scoring needs the loader built with the task's eval_collator (prompt lengths, classes)")
        prompts = [ids[:n].tolist() for ids, n in zip(batch["input_ids"], extras["prompt_length"].tolist())]
        with accelerator.autocast():
            scores = score_words(model, prompts, words, tokenizer.pad_token_id)
        gold = extras["class_label"].to(scores.device)
        nll = -scores.gather(1, gold[:, None])[:, 0]
        count = torch.tensor([len(words[y]) for y in gold.tolist()], device=scores.device)
        if "row" in extras:
            written += accelerator.gather_for_metrics(prediction_rows(scores, gold, extras, label_names), use_gather_object=True)
        p, r, nll, count = accelerator.gather_for_metrics((scores.argmax(-1), gold, nll, count))
        preds.append(p.cpu())
        refs.append(r.cpu())
        nll_sum += nll.sum().item()
        n_tokens += int(count.sum().item())
    model.train()
    loss = nll_sum / max(n_tokens, 1)
    if not scoring:
        return {"loss": loss}, {"n_tokens": n_tokens}
    metrics, report = classification_metrics(torch.cat(preds).tolist(), torch.cat(refs).tolist(), label_names)
    metrics["loss"] = loss
    report["label_words"] = [tokenizer.decode(w) for w in words]
    if written:
        report["predictions"] = sorted(written, key=lambda w: w["row"])
    return metrics, report
