"""Metrics through `evaluate`, from modules shipped inside the package: evaluate.load(local file) never needs a network."""

from __future__ import annotations

from functools import cache
from pathlib import Path

MODULES = Path(__file__).parent / "metric_modules"
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")  # what rouge_metrics reports (F-measures)
CLASSIFICATION_KEYS = ("accuracy", "f1")  # what classification_metrics reports (f1: macro)


@cache
def load_metric(name: str):
    import evaluate

    path = MODULES / f"{name}.py"
    if not path.is_file():
        shipped = sorted(p.stem for p in MODULES.glob("*.py"))
        raise ValueError(f"no shipped metric module {name!r}; available: {shipped}")
    return evaluate.load(str(path))


def classification_metrics(preds: list[int], refs: list[int], label_names: list[str]) -> tuple[dict, dict]:
    """-> ({accuracy, f1 (macro)}, per-class report with precision/recall/f1/support and the confusion matrix)."""
    k = len(label_names)
    accuracy = load_metric("accuracy").compute(predictions=preds, references=refs)["accuracy"]
    f1 = load_metric("f1")
    macro = f1.compute(predictions=preds, references=refs, num_classes=k)["f1"]
    detail = f1.compute(predictions=preds, references=refs, num_classes=k, average=None)
    per_class = {name: {m: detail[m][i] for m in ("precision", "recall", "f1", "support")} for i, name in enumerate(label_names)}
    report = {"per_class": per_class, "confusion": detail["confusion"], "labels": label_names, "n": len(refs)}
    return {"accuracy": accuracy, "f1": macro}, report


def rouge_metrics(predictions: list[str], references: list[str], per_row: bool = False) -> dict:
    """-> mean ROUGE-1/2/L/Lsum F-measures (0-1), Porter-stemmed, Lsum over one sentence per line (per_row: a list of
    each row's F-measure per key instead of the mean)."""
    return load_metric("rouge").compute(predictions=predictions, references=references, use_aggregator=not per_row)
