"""Sequence classification (sentiment, topic): a linear head on the encoder/decoder, cross-entropy, accuracy + macro-F1."""

from __future__ import annotations

import torch
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

from ..metrics import CLASSIFICATION_KEYS, classification_metrics

auto_model_class = AutoModelForSequenceClassification
peft_task_type = "SEQ_CLS"
target_kind = "label"
best_metric = "accuracy"
metrics = (*CLASSIFICATION_KEYS, "loss")
pipeline_tag = "text-classification"
task_name = "Text Classification"
usage_class = "AutoModelForSequenceClassification"
card_metrics = {"accuracy": "Accuracy", "f1": "Macro F1"}


def check(recipe) -> list[str]:
    return []  # the label rules (data.label_names) are checked with the data section: any task may name labels


def summary_line(split: str, m: dict) -> str:
    return f"   {split:<5} accuracy {m['accuracy']:.4f}   macro-F1 {m['f1']:.4f}   loss {m['loss']:.4f}"


def tokenize(ds, tokenizer, recipe):
    """Tokenize without padding (the collator pads each batch to its longest row); keep `length` and `truncated`.
    Sentence pairs (a `text_pair` column: data.text_pair) are encoded as pairs, the longer text cut first."""
    max_length = recipe.data.max_length
    special = set(tokenizer.all_special_ids)
    if "text_pair" in ds.column_names:
        return ds.map(lambda b: encode_pairs(b, tokenizer, max_length), batched=True, remove_columns=["text", "text_pair"],
                      desc="tokenize pairs").rename_column("label", "labels")

    def enc(batch):
        # one token more than allowed tells which rows were cut, without tokenizing twice
        out = tokenizer(batch["text"], truncation=True, max_length=max_length + 1)
        cut = [len(ids) > max_length for ids in out["input_ids"]]
        keep_last = [ids[-1] in special for ids in out["input_ids"]]  # a closing [SEP] / </s> stays in place
        for key in list(out.keys()):
            out[key] = [(v[: max_length - 1] + v[-1:] if k else v[:max_length]) if c else v
                        for v, c, k in zip(out[key], cut, keep_last)]
        out["length"] = [len(ids) for ids in out["input_ids"]]
        out["truncated"] = cut
        return out

    return ds.map(enc, batched=True, remove_columns=["text"], desc="tokenize").rename_column("label", "labels")


def encode_pairs(batch, tokenizer, max_length: int) -> dict:
    """[CLS] a [SEP] b [SEP] with segment ids; cut to max_length by the tokenizer (longest_first), `truncated` said so."""
    full = tokenizer(batch["text"], batch["text_pair"])["input_ids"]
    out = tokenizer(batch["text"], batch["text_pair"], truncation="longest_first", max_length=max_length)
    out["length"] = [len(ids) for ids in out["input_ids"]]
    out["truncated"] = [len(ids) > max_length for ids in full]
    return out


def collator(tokenizer):
    """Pads each batch to its longest row, no further: length-grouped batches then carry 1.05x the real tokens on
    SST-2, and 47% of them none at all, so attention runs without a mask (SDPA's fast path). Padding to a multiple
    of 8 made that 1.30x and 5% (benchmarks/README.md, Throughput)."""
    pad = DataCollatorWithPadding(tokenizer)

    def collate(rows):
        return pad([{k: v for k, v in r.items() if k not in ("length", "truncated")} for r in rows])

    return collate


@torch.no_grad()
def evaluate(model, loader, accelerator, label_names, **context):
    """-> (headline metrics, detailed report). Gathers across processes without duplicating the padded tail.
    `context` (tokenizer, recipe) is for tasks that generate; a classifier needs none."""
    model.eval()
    preds, refs, loss_sum, n = [], [], 0.0, 0
    for batch in loader:
        out = model(**batch)
        # per-row losses: a rank's last batch may be topped up with repeated rows, which its batch mean would count
        rows = torch.nn.functional.cross_entropy(out.logits.float(), batch["labels"], reduction="none")
        p, r, loss = accelerator.gather_for_metrics((out.logits.argmax(-1), batch["labels"], rows))
        preds.append(p.cpu())
        refs.append(r.cpu())
        loss_sum += loss.float().sum().item()
        n += len(loss)
    model.train()
    preds, refs = torch.cat(preds).tolist(), torch.cat(refs).tolist()
    metrics, report = classification_metrics(preds, refs, label_names)
    metrics["loss"] = loss_sum / max(n, 1)
    return metrics, report
