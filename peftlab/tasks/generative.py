"""What the tasks with a text target share (summarization, sft, verbalizer): the token losses of a decoder-only LM
computed on the labelled positions only, and the evaluation pass that averages them and, at the final evaluation,
generates one answer per row and gathers what it wrote."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from ..errors import DataError

log = logging.getLogger(__name__)


SCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "logits_scaling")  # configs whose logits are not head(h)
CHUNK = 128  # labelled tokens whose logits exist at once: 128 x a 49k vocabulary in fp32 is 25 MB, under glibc's largest
# mmap threshold (32 MiB), so each chunk reuses heap memory; 1024 tokens (200 MB) were mapped and faulted in anew each time


def _output_head(model, accelerator):
    """The LM head, when its logits can be computed outside the model's forward; None for FSDP / DeepSpeed (sharded
    parameters), compiled models (a hook added per step would recompile), encoder-decoders and models that scale or
    cap their logits (the model's own forward is used there)."""
    if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        return None
    inner = accelerator.unwrap_model(model)
    if getattr(inner, "_compiled_call_impl", None) is not None:  # train.compile: Module.compile() in place
        return None
    config = getattr(inner, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return None
    if any(getattr(config, k, None) not in (None, 1, 1.0) for k in SCALED_LOGITS):
        return None
    get = getattr(inner, "get_output_embeddings", None)
    return get() if get is not None else None


def _token_ce(head, hidden, labels):
    return torch.nn.functional.cross_entropy(head(hidden).float(), labels, reduction="none")


class _HeadCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of `labels` under the logits of a frozen linear head (`weight`, `bias` already in the
    compute dtype), for one chunk: the logits in that dtype, their log-sum-exp in fp32, and only the log-sum-exp kept;
    the backward pass recomputes the logits and forms softmax - onehot in place. What checkpointing `_token_ce` under
    autocast computes, in fewer passes over the (tokens x vocabulary) logits: no log-softmax tensor, no zero-filled
    one-hot gradient, and the head cast once per call instead of at every chunk and its recomputation. SmolLM2's head
    (the tied embedding) at ~260 answer tokens: ~170-230 ms forward and backward instead of ~240-340 (stop 52)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels):
        logits = _logits(hidden, weight, bias)
        lse = torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        return lse - logits.gather(1, labels[:, None])[:, 0]

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        probs = _logits(hidden, weight, bias).sub_(lse[:, None]).exp_()  # softmax
        probs[torch.arange(len(labels), device=labels.device), labels] -= 1
        probs.mul_(grad[:, None])
        return (probs.to(weight.dtype) @ weight).to(hidden.dtype), None, None, None


def _logits(hidden, weight, bias):
    return torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias).float()


def _frozen_linear_head(head, hidden) -> bool:
    """Whether `_HeadCrossEntropy` computes this head's loss: a plain nn.Linear that nothing trains, on CPU (GPUs keep
    the checkpointed `_token_ce`)."""
    return (type(head) is torch.nn.Linear and hidden.device.type == "cpu"
            and not any(p.requires_grad for p in head.parameters()))


def labelled_token_losses(model, batch: dict, accelerator, *, shift: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (cross-entropy of every labelled next-token prediction, flat fp32; the batch row of each). Only the labelled
    positions go through the LM head: the model runs with its head fed an empty sequence (a pre-hook keeps the hidden
    states it was given), then the head and the loss run on the labelled positions in chunks of CHUNK tokens, each
    recomputed in the backward pass (`_HeadCrossEntropy` for a frozen linear head on CPU, activation checkpointing
    otherwise) so no more than one chunk of fp32 logits exists. The
    result equals the model's own shifted cross-entropy; models where that cannot hold use their forward instead.
    shift=False: a label scores its own position (a masked LM), not the next one."""
    labels = batch["labels"]
    head = _output_head(model, accelerator)
    if head is None:  # the model's own logits over every position
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits, y = (model(**inputs).logits[:, :-1], labels[:, 1:]) if shift else (model(**inputs).logits, labels)
        keep = y != -100
        losses = torch.cat([torch.nn.functional.cross_entropy(lg[k].float(), t[k], reduction="none")
                            for lg, t, k in zip(logits, y, keep)])
        return losses, keep.nonzero()[:, 0]
    seen = {}

    def grab(module, args):
        seen["hidden"] = args[0]
        return (args[0][:, :0], *args[1:])

    hook = head.register_forward_pre_hook(grab)
    try:
        model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        hook.remove()
    hidden = seen["hidden"][:, -labels.shape[1]:]  # prompt tuning prepends virtual tokens
    hidden, y = (hidden[:, :-1], labels[:, 1:]) if shift else (hidden, labels)  # shifted: t predicts t+1
    keep = y != -100
    hidden, y = hidden[keep], y[keep]
    chunks = [(hidden[i:i + CHUNK], y[i:i + CHUNK]) for i in range(0, len(y), CHUNK)]
    with accelerator.autocast():
        if _frozen_linear_head(head, hidden):
            from ..accel import cpu_compute_dtype  # here: accel -> config -> tasks imports this module

            dtype = cpu_compute_dtype(head.weight.dtype)
            weight, bias = head.weight.to(dtype), None if head.bias is None else head.bias.to(dtype)
            parts = [_HeadCrossEntropy.apply(h, weight, bias, t) for h, t in chunks]
        else:
            parts = [checkpoint(_token_ce, head, h, t, use_reentrant=False) if torch.is_grad_enabled() else _token_ce(head, h, t)
                     for h, t in chunks]
    losses = torch.cat(parts) if parts else hidden.float().sum(-1)  # none labelled: empty, still in the graph
    return losses, keep.nonzero()[:, 0]


def causal_lm_loss(model, batch: dict, accelerator) -> torch.Tensor:
    """The training loss of a decoder-only LM: mean cross-entropy over the labelled tokens (as the model's own loss)."""
    losses, _ = labelled_token_losses(model, batch, accelerator)
    return losses.sum() / max(len(losses), 1)


def next_token_items(batch: dict) -> torch.Tensor:
    """The count causal_lm_loss averages over: the labelled tokens after each row's first (train.loss_items)."""
    return (batch["labels"][:, 1:] != -100).sum()


def row_losses(model, batch: dict, accelerator, *, shift: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """-> per-row sums of token cross-entropy, per-row counts of scored tokens."""
    losses, rows = labelled_token_losses(model, batch, accelerator, shift=shift)
    n = batch["labels"].shape[0]
    sums = torch.zeros(n, device=losses.device).index_add_(0, rows, losses.float())
    return sums, torch.bincount(rows, minlength=n)


def seq2seq_row_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sums of token cross-entropy and counts of scored tokens for an encoder-decoder's logits (one row at a
    time: a float copy of a whole batch of logits over a large vocabulary would not fit)."""
    sums = torch.stack([torch.nn.functional.cross_entropy(lg.float(), y, ignore_index=-100, reduction="sum")
                        for lg, y in zip(logits, labels)])
    return sums, (labels != -100).sum(1)


def _contiguous_input(module, args):
    return None if args[0].is_contiguous() else (args[0].contiguous(), *args[1:])


@contextmanager
def contiguous_head_input(model):
    """Around `model.generate` (and a forward with `logits_to_keep=1`): the LM head gets its input contiguous.

    In a decoder's first generation step transformers hands the head `hidden[:, -1:, :]`, a view whose size-1 middle
    dimension keeps the sequence's stride. torch's matmul then does not fold it into one mm (pytorch/pytorch#186148)
    but runs bmm, which on CPU copies a head stored in bf16 (model.dtype=auto) once per row (pytorch/pytorch#151934):
    for SmolLM2 at batch 8, 432 MiB more peak memory and 0.6 s instead of 5 ms, per batch; x beams with beam search.
    The copy made here is one hidden vector per row. `model` may be wrapped for distributed training (DDP: .module)."""
    get = getattr(getattr(model, "module", model), "get_output_embeddings", None)
    head = get() if get is not None else None
    hook = head.register_forward_pre_hook(_contiguous_input) if head is not None else None
    try:
        yield
    finally:
        if hook is not None:
            hook.remove()


@torch.no_grad()
def loss_and_predictions(model, loader, accelerator, *, shift: bool, extras: tuple[str, ...], source: str, reference: str,
                         generate: Callable | None = None, task: str = "this task") -> tuple[float | None, int, list[dict] | None]:
    """-> (mean token loss, None where no token is scored, scored tokens, rows). `extras`: the collator's keys that are not model inputs. With
    `generate(unwrapped_model, batch, extras) -> [text]` (the final evaluation) every row's (row, source, prediction,
    reference) is gathered across processes, in data order; without it `rows` is None."""
    unwrapped = accelerator.unwrap_model(model)
    model.eval()
    loss_sum, n_tokens, rows = 0.0, 0, []
    for batch in loader:
        found = {k: batch.pop(k) for k in extras if k in batch}
        if generate is not None and reference not in found:
            raise ValueError(f"{task}: generating needs the loader built with the task's eval_collator (reference texts)")
        losses = row_losses(model, batch, accelerator) if shift else seq2seq_row_losses(model(**batch).logits, batch["labels"])
        sums, counts = accelerator.gather_for_metrics(losses)
        loss_sum += sums.sum().item()
        n_tokens += int(counts.sum().item())
        if generate is not None:
            preds = generate(unwrapped, batch, found)
            mine = [{"row": r, "source": s, "prediction": p, "reference": t}
                    for r, s, p, t in zip(found["row"], found[source], preds, found[reference])]
            for row, refs in zip(mine, found.get("references", ())):  # (an eval split's references_column)
                row["references"] = refs or [row["reference"]]  # what it is scored against
            rows += accelerator.gather_for_metrics(mine, use_gather_object=True)
    model.train()
    loss = loss_sum / n_tokens if n_tokens else None  # (an sft split whose answers all start past max_length: no loss)
    return loss, n_tokens, sorted(rows, key=lambda r: r["row"]) if generate is not None else None


# what a base's generation_config.json holds that evaluation keeps: the tokens its architecture starts, ends and pads
# with (T5's decoder start is its pad token, BART forces BOS/EOS at the first and last step: without them it decodes
# something else, not worse) and how its KV cache is held (the same tokens come out). Everything else there is
# decoding behaviour (repetition_penalty, no_repeat_ngram_size, min_length, length_penalty, sampling with temperature,
# top_k/top_p, bad_words_ids, suppress_tokens, sequence_bias, ...): left out, so that the recipe's eval.* alone decide
# what is generated and reported (Qwen2.5-Instruct ships repetition_penalty=1.05 and sampling; T5 checkpoints ship
# beam settings).
ARCHITECTURE_GENERATION = ("decoder_start_token_id", "bos_token_id", "eos_token_id", "pad_token_id", "forced_bos_token_id",
                           "forced_eos_token_id", "cache_implementation", "cache_config")


def _owner(model):
    get = getattr(model, "get_base_model", None)
    return get() if get is not None else model


def end_tokens(model, stops) -> list[int]:
    """The tokens generation stops at: `stops` (the task's: EOS, the chat template's end-of-turn tokens), then every
    end token the base's generation_config lists beyond them (Qwen2.5-Instruct [<|im_end|>, <|endoftext|>], Llama-3.1
    [<|end_of_text|>, <|eom_id|>, <|eot_id|>]). Passing `stops` alone replaced that list: a model writing one of the
    others went on to max_new_tokens, and the text after it was scored. Evaluation (evaluation_generation), the card's
    snippets and benchmarks/generation.py all stop at this set."""
    stops = [stops] if isinstance(stops, int) else list(stops)
    own = getattr(getattr(_owner(model), "generation_config", None), "eos_token_id", None)
    own = [own] if isinstance(own, int) else list(own or [])
    return stops + [i for i in own if i not in stops]


@contextmanager
def evaluation_generation(model, **settings):
    """Around `generate` of `model` (a peft model or its base): -> the GenerationConfig to pass as generation_config=,
    the base's own reduced to ARCHITECTURE_GENERATION with `settings` (the recipe's) on top. transformers fills every
    setting a passed config leaves unset from the model's generation_config before its own defaults, so the model's is
    this one until the block ends. A given eos_token_id is extended by the base's end tokens (end_tokens)."""
    from transformers import GenerationConfig

    owner = _owner(model)
    own = getattr(owner, "generation_config", None)
    kept = {k: getattr(own, k) for k in ARCHITECTURE_GENERATION if getattr(own, k, None) is not None}
    if settings.get("eos_token_id") is not None:  # the task's stop tokens extend the base's end tokens, never replace them
        settings = {**settings, "eos_token_id": end_tokens(model, settings["eos_token_id"])}
    config = GenerationConfig(**{**kept, **settings})
    owner.generation_config = config
    try:
        yield config
    finally:
        owner.generation_config = own


def generation_inputs(model, ids: torch.Tensor, mask: torch.Tensor) -> tuple[Any, dict, int]:
    """-> (the model to call generate on, its inputs, the prompt tokens that come back in front of its output), for
    left-padded prompts. Prompt/p-tuning: peft's own generate is wrong with this transformers (its KV cache: from the
    third new token on it writes what the model does not compute; use_cache=False is right but recomputes the whole
    sequence per token), and it drops position_ids, so left padding would shift every position. Here the base generates
    from the virtual tokens' embeddings put in front of the prompt's, with their attention mask: positions from the
    mask, the cache kept, and the text greedy decoding of the model as trained gives (tested). A prefix has no
    embeddings (its keys and values go in the cache): peft's own generate carries it, and from peft 0.22 on writes what
    greedy decoding of the trained model does, left padding included (methods/prompt.PREFIX_GENERATING)."""
    if not virtual_token_embeddings(getattr(model, "active_peft_config", None)):
        return model, {"input_ids": ids, "attention_mask": mask}, ids.shape[1]
    base = model.get_base_model()
    embed = base.get_input_embeddings()
    virtual = model.get_prompt(batch_size=ids.shape[0]).to(embed.weight.dtype)
    return base, {"inputs_embeds": torch.cat([virtual, embed(ids)], 1),
                  "attention_mask": torch.cat([mask.new_ones(ids.shape[0], virtual.shape[1]), mask], 1)}, 0


def virtual_token_embeddings(peft_config) -> bool:
    """Whether a peft adapter's config puts virtual tokens' embeddings in front of the input (prompt tuning, p-tuning;
    not a prefix, whose keys and values go in every layer's cache)."""
    return bool(getattr(peft_config, "is_prompt_learning", False)) and peft_config.peft_type != "PREFIX_TUNING"


def data_row(row: int) -> str:
    """How an error names a row of a data file: 0-based, the number predictions-SPLIT.jsonl gives it."""
    return f"data row {row} (0-based, as predictions files count)"


def reference_lists(values: list, column: str, where: str, rows: list[int]) -> list[list[str]]:
    """An evaluation split's `references_column` cells -> each row's reference texts, blank ones dropped; a cell that is
    no list of texts is refused (`rows`: the rows' numbers in their file, for the message)."""
    out = []
    for value, row in zip(values, rows):
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise DataError(f"{where}.references_column={column!r}: {data_row(row)} holds "
                            f"{str(value)[:120]}, not a list of "
                            f"texts. Point it at a column with a list of reference texts per row (DialogSum's test: "
                            f"summaries), or remove it (one reference: data.target_column).")
        out.append([v.strip() for v in value if v.strip()])
    return out


def check_references(ds, where: str) -> None:
    """A split's rows whose references_column list holds no text are scored against their target alone: say how many;
    refuse a column with no reference at all."""
    if "references" not in ds.column_names:
        return
    empty = sum(not refs for refs in ds["references"])
    if empty == len(ds) and empty:
        raise DataError(f"{where}.references_column: no row has a reference (every list is empty or blank). Point it at the "
                        "column of reference texts, or remove it.")
    if empty:
        log.warning("%s.references_column: %d of %d row(s) have no reference in their list: each is scored against its "
                    "target alone", where, empty, len(ds))


def references(row: dict) -> list[str]:
    """A scored row's references: those of the split's `references_column` (its target when a row's list is empty),
    else its one reference."""
    return row.get("references") or [row["reference"]]


def several_references(rows: list[dict]) -> dict:
    """The report's note that generated text was scored against several references per row (references_column)."""
    counts = [len(r["references"]) for r in rows if "references" in r]
    return {"references_per_row": sum(counts) / len(counts)} if counts else {}


def log_examples(rows: list[dict], n: int, source_label: str = "source") -> None:
    """Log the first `n` (source, prediction, reference) triples: a glance at what the model writes."""
    for r in rows[:n]:
        log.info("example row %d\n  %-11s %s\n  prediction: %s\n  reference:  %s", r["row"], f"{source_label}:",
                 " | ".join(r["source"][:300].splitlines()), r["prediction"], r["reference"])
