"""benchmarks/summarization.py's scoring (the training run itself is the benchmark): Lead-3, the per-row scores behind
the table, the share of distinct summaries, and the paired bootstrap of model - Lead-3."""

from __future__ import annotations

import pytest

from peftlab.metrics import rouge_metrics

from .conftest import load_benchmark


@pytest.fixture(scope="module")
def sb():
    return load_benchmark("summarization")


def test_lead3_is_the_first_three_turns(sb):
    assert sb.lead3("A: hi\n\nB: hello\nA: bye\nB: see you\n") == "A: hi\nB: hello\nA: bye"


def test_paired_difference_centres_on_the_mean_row_difference(sb):
    shift = sb.paired_difference([0.5, 0.7, 0.9], [0.4, 0.6, 0.8])  # every row +0.1: no spread
    assert shift["mean"] == pytest.approx(0.1) and shift["ci95"] == pytest.approx([0.1, 0.1])
    noisy = sb.paired_difference([0.9, 0.1, 0.8, 0.2] * 10, [0.5] * 40)
    assert noisy["mean"] == pytest.approx(0.0) and noisy["ci95"][0] < -0.05 and noisy["ci95"][1] > 0.05  # spread: a wide interval


def test_compare_scores_the_model_and_lead3_on_the_same_rows(sb):
    rows = [{"source": "Ann: I will buy the laptop\nJosh: it is 250\nAnn: ok\nJosh: deal", "reference": "Ann buys Josh's laptop.",
             "prediction": "ann buys the laptop."},
            {"source": "Kim: fresh fish?\nMargot: try the market", "reference": "Margot tells Kim to try the market.",
             "prediction": "ann buys the laptop."}]
    (model, lead), diff = sb.compare(rows, "model")
    preds, refs = [r["prediction"] for r in rows], [r["reference"] for r in rows]
    for key, value in rouge_metrics(preds, refs).items():  # the per-row means are the scorer's own aggregate
        assert model[key] == pytest.approx(value)
        assert diff[key]["mean"] == pytest.approx(model[key] - lead[key])
    assert model["distinct"] == 0.5 and lead["distinct"] == 1.0 and model["rows"] == lead["rows"] == 2
    assert "rouge1 " in sb.difference_line(diff)
