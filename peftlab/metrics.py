"""Metrics through `evaluate`, from modules shipped inside the package: evaluate.load(local file) never needs a network."""

from __future__ import annotations

import re
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


def rouge_metrics(predictions: list[str], references: list[str] | list[list[str]], per_row: bool = False) -> dict:
    """-> mean ROUGE-1/2/L/Lsum F-measures (0-1), Porter-stemmed, Lsum over one sentence per line (per_row: a list of
    each row's F-measure per key instead of the mean). A list of references for a prediction: its best per key."""
    return load_metric("rouge").compute(predictions=predictions, references=references, use_aggregator=not per_row)


# 1,000  $18  .5  3/4; commas group thousands only ('1,2,3' is three numbers: it read as 123)
NUMBER = r"\$?(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)(?:/\d+(?!\.\d))?"
MARKED_ANSWER = re.compile(rf"####\s*([-\u2212]?)\s*({NUMBER})")  # GSM8K's '#### 72' ('#### - 5': -5, it read 5)


def final_answer(text: str) -> str | None:
    """The final numeric answer of a worked solution: the number right after the first '#### ' that has one (GSM8K's
    convention, lm-eval's strict match: a model writing on past its answer, into another question, is read at its own
    answer; a '#### Step 1' heading is no answer), else the last number in the text (the lenient reading for models
    that answer in prose), as its value is written at its shortest: commas and '$' dropped, '5.00' -> '5', '0.50' ->
    '0.5', '.5' -> '0.5', '3/4' -> '0.75', '2/6' -> '1/3' (a fraction with no finite decimal, in lowest terms); a '-'
    or Unicode minus before it is a sign, but a '-' after a letter or digit is a hyphen or a range ('20-25 minutes' ->
    25). None when the text holds no number."""
    from decimal import Decimal, localcontext
    from fractions import Fraction

    if marked := MARKED_ANSWER.search(text):
        n = marked[1] + marked[2]
    elif numbers := re.findall(rf"(?:(?<![\w.])[-\u2212])?{NUMBER}", text):
        n = numbers[-1]
    else:
        return None
    n = n.replace(",", "").replace("$", "").replace("\u2212", "-")
    top, _, bottom = n.partition("/")
    if bottom and int(bottom) == 0:
        return n
    value = Fraction(top) / Fraction(bottom or 1)
    rest = value.denominator
    for prime in (2, 5):
        while rest % prime == 0:
            rest //= prime
    if rest != 1:  # 1/3: no finite decimal (it printed 200 digits of one)
        return str(value)
    with localcontext() as ctx:
        ctx.prec = 200  # exact: a finite decimal of the digits written (the default 28 digits rounded 0.999...9 of 29 digits to 1)
        text_value = format((Decimal(value.numerator) / Decimal(value.denominator)).normalize(), "f")
    return "0" if text_value in ("-0", "0") else text_value


def answer_accuracy(predictions: list[str], references: list[str]) -> dict:
    """eval.metric_fn for GSM8K-style data (`peftlab.metrics:answer_accuracy`): the share of predictions whose
    final_answer equals the reference's, and the share that wrote a '####' answer at all ('#### 72'; a '#### Step 1'
    heading is no answer, as for final_answer)."""
    hits = [final_answer(p) is not None and final_answer(p) == final_answer(r) for p, r in zip(predictions, references)]
    return {"answer_accuracy": sum(hits) / max(len(hits), 1),
            "answer_format": sum(MARKED_ANSWER.search(p) is not None for p in predictions) / max(len(predictions), 1)}
