"""Masked-LM continued pretraining (task.type: mlm): an encoder (the packaged MiniLM, BERT, RoBERTa) keeps learning to
fill in masked tokens on unlabelled text of the target domain (DAPT) or task (TAPT), before it is fine-tuned on labels.

Rows are the joined data.text_columns, packed into blocks of data.max_length tokens (tasks/corpus.py). Masking is
BERT's: 15% of the non-special tokens are predicted, of which 80% are replaced by [MASK], 10% by a random token and 10%
kept. Training draws new masks every time a block is seen (dynamic masking: each epoch's seeded by train.seed, the
epoch and the block, so a resumed run masks as the run never stopped would); evaluation uses one
fixed mask per block (drawn from its tokens), so every evaluation scores the same positions and keep-best compares like
with like. The MLM head is initialised when the checkpoint has none (sentence-embedding checkpoints such as MiniLM
drop it) and trained with the adapter; the log names it. Evaluation reports the masked-token loss and its perplexity.
"""

from __future__ import annotations

import zlib
from functools import partial

import torch
from transformers import AutoModelForMaskedLM

from . import corpus
from .generative import labelled_token_losses
from .sft import _pad

auto_model_class = AutoModelForMaskedLM
peft_task_type = "FEATURE_EXTRACTION"  # peft has no masked-LM task type; this keeps the model's own forward
target_kind = "none"  # unlabelled text: data.text_columns only
best_metric = "loss"
metrics = ("loss", "perplexity")
pipeline_tag = "fill-mask"
task_name = "Fill-Mask"
usage_class = "AutoModelForMaskedLM"
card_metrics = {"perplexity": "Perplexity (masked tokens)"}
check = corpus.check
check_tokenizer = partial(corpus.check_tokenizer, causal=False)
summary_line = corpus.summary_line

MASK_SHARE, AS_MASK, AS_RANDOM = 0.15, 0.8, 0.1
FIXED = ("eval_input_ids", "eval_labels")  # the evaluation's masks, made beside the training ones


def tokenize(ds, tokenizer, recipe):
    return corpus.blocks(ds, tokenizer, recipe, causal=False)


def mask(ids: torch.Tensor, special: torch.Tensor, tokenizer, generator: torch.Generator | None = None):
    """BERT masking of one row -> (input ids, labels: the original token where one is predicted, else -100)."""
    u = torch.rand(ids.shape, generator=generator)
    picked = (u < MASK_SHARE) & ~special
    if not picked.any():  # a short row still predicts one token
        candidates = (~special).nonzero()[:, 0]
        if len(candidates):
            picked[candidates[torch.randint(len(candidates), (1,), generator=generator)]] = True
    how = torch.rand(ids.shape, generator=generator)
    out = ids.clone()
    out[picked & (how < AS_MASK)] = tokenizer.mask_token_id
    swap = picked & (how >= AS_MASK) & (how < AS_MASK + AS_RANDOM)
    out[swap] = torch.randint(len(tokenizer), ids.shape, generator=generator)[swap]
    return out, torch.where(picked, ids, -100)


def collator(tokenizer):
    """Right-padded blocks with two sets of masks: the training ones, new each epoch, seeded by (train.seed, the epoch,
    the block's tokens) through `collate.set_epoch(seed, epoch)`, and fixed ones seeded by the block's tokens alone
    (evaluation). Not from the global generator: the loader collates a batch ahead of the step, so a checkpoint's
    random state was already past the next batch's masks, and a resumed run drew others (and shifted every later draw)."""
    special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    epoch = {"seed": zlib.crc32(b"0:0")}

    def collate(rows):
        train, fixed = [], []
        for r in rows:
            ids = torch.tensor(r["input_ids"])
            special = torch.isin(ids, special_ids)
            block = ids.numpy().astype("int64").tobytes()
            train.append(mask(ids, special, tokenizer, torch.Generator().manual_seed(zlib.crc32(block, epoch["seed"]))))
            fixed.append(mask(ids, special, tokenizer, torch.Generator().manual_seed(zlib.crc32(block))))
        pad = tokenizer.pad_token_id
        return {"input_ids": _pad([x.tolist() for x, _ in train], pad), "labels": _pad([y.tolist() for _, y in train], -100),
                "attention_mask": _pad([[1] * len(r["input_ids"]) for r in rows], 0),
                "eval_input_ids": _pad([x.tolist() for x, _ in fixed], pad), "eval_labels": _pad([y.tolist() for _, y in fixed], -100)}

    def set_epoch(seed: int, number: int) -> None:
        epoch["seed"] = zlib.crc32(f"{seed}:{number}".encode())

    collate.set_epoch = set_epoch
    return collate


def loss(model, batch: dict, accelerator) -> torch.Tensor:
    """Mean cross-entropy over the masked tokens; the MLM head's vocabulary projection runs on those positions only."""
    inputs = {k: v for k, v in batch.items() if k not in FIXED}
    losses, _ = labelled_token_losses(model, inputs, accelerator, shift=False)
    return losses.sum() / max(len(losses), 1)


def evaluate(model, loader, accelerator, label_names, **context):
    """-> ({loss, perplexity}, {masked_tokens}) over the fixed masks of the split."""
    def fixed(batch):
        return {"input_ids": batch["eval_input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["eval_labels"]}

    metrics, tokens = corpus.evaluate_tokens(model, loader, accelerator, fixed, shift=False)
    return metrics, {"masked_tokens": tokens}
