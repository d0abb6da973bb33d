"""What the tasks with a text target share (summarization, sft): per-row token losses, and the evaluation pass that
averages them and, at the final evaluation, generates one answer per row and gathers what it wrote."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)


def row_losses(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sums of token cross-entropy and counts of scored tokens (one row at a time: a float copy of a whole
    batch of logits over a 150k vocabulary would not fit)."""
    if shift:  # decoder-only: position t predicts token t+1
        logits, labels = logits[:, :-1], labels[:, 1:]
    sums = torch.stack([torch.nn.functional.cross_entropy(lg.float(), y, ignore_index=-100, reduction="sum")
                        for lg, y in zip(logits, labels)])
    return sums, (labels != -100).sum(1)


@torch.no_grad()
def loss_and_predictions(model, loader, accelerator, *, shift: bool, extras: tuple[str, ...], source: str, reference: str,
                         generate: Callable | None = None, task: str = "this task") -> tuple[float, int, list[dict] | None]:
    """-> (mean token loss, scored tokens, rows). `extras`: the collator's keys that are not model inputs. With
    `generate(unwrapped_model, batch, extras) -> [text]` (the final evaluation) every row's (row, source, prediction,
    reference) is gathered across processes, in data order; without it `rows` is None."""
    unwrapped = accelerator.unwrap_model(model)
    model.eval()
    loss_sum, n_tokens, rows = 0.0, 0, []
    for batch in loader:
        found = {k: batch.pop(k) for k in extras if k in batch}
        if generate is not None and reference not in found:
            raise ValueError(f"{task}: generating needs the loader built with the task's eval_collator (reference texts)")
        out = model(**batch)
        sums, counts = accelerator.gather_for_metrics(row_losses(out.logits, batch["labels"], shift))
        loss_sum += sums.sum().item()
        n_tokens += int(counts.sum().item())
        if generate is not None:
            preds = generate(unwrapped, batch, found)
            mine = [{"row": r, "source": s, "prediction": p, "reference": t}
                    for r, s, p, t in zip(found["row"], found[source], preds, found[reference])]
            rows += accelerator.gather_for_metrics(mine, use_gather_object=True)
    model.train()
    if generate is None:
        return loss_sum / max(n_tokens, 1), n_tokens, None
    return loss_sum / max(n_tokens, 1), n_tokens, sorted(rows, key=lambda r: r["row"])


def log_examples(rows: list[dict], n: int, source_label: str = "source") -> None:
    """Log the first `n` (source, prediction, reference) triples: a glance at what the model writes."""
    for r in rows[:n]:
        log.info("example row %d\n  %-11s %s\n  prediction: %s\n  reference:  %s", r["row"], f"{source_label}:",
                 " | ".join(r["source"][:300].splitlines()), r["prediction"], r["reference"])
