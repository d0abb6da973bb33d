"""Sequence classification (sentiment, topic): a linear head on the encoder/decoder, cross-entropy, accuracy + macro-F1."""

from __future__ import annotations

import torch
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

from ..metrics import classification_metrics

auto_model_class = AutoModelForSequenceClassification
peft_task_type = "SEQ_CLS"


def tokenize(ds, tokenizer, recipe):
    """Tokenize without padding (the collator pads each batch to its longest row) and keep a length column."""
    max_length = recipe.data.max_length

    def enc(batch):
        out = tokenizer(batch["text"], truncation=True, max_length=max_length)
        out["length"] = [len(ids) for ids in out["input_ids"]]
        return out

    return ds.map(enc, batched=True, remove_columns=["text"], desc="tokenize").rename_column("label", "labels")


def collator(tokenizer):
    pad = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)

    def collate(rows):
        return pad([{k: v for k, v in r.items() if k != "length"} for r in rows])

    return collate


@torch.no_grad()
def evaluate(model, loader, accelerator, label_names):
    """-> (headline metrics, detailed report). Gathers across processes without duplicating the padded tail."""
    model.eval()
    preds, refs, loss_sum, n = [], [], 0.0, 0
    for batch in loader:
        out = model(**batch)
        p, r = accelerator.gather_for_metrics((out.logits.argmax(-1), batch["labels"]))
        loss = accelerator.gather_for_metrics(out.loss.detach().repeat(len(batch["labels"])))
        preds.append(p.cpu())
        refs.append(r.cpu())
        loss_sum += loss.float().sum().item()
        n += len(loss)
    model.train()
    preds, refs = torch.cat(preds).tolist(), torch.cat(refs).tolist()
    metrics, report = classification_metrics(preds, refs, label_names)
    metrics["loss"] = loss_sum / max(n, 1)
    return metrics, report
