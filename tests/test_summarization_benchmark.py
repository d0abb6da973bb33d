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


@pytest.mark.parametrize(("args", "sizes"), [(["--quick"], (32, 16, 1.0)),
                                             (["--quick", "--train", "100", "--test", "50", "--epochs", "2"], (100, 50, 2.0)),
                                             (["--quick", "--test", "8"], (32, 8, 1.0)),
                                             ([], (None, 200, None))])
def test_quick_fills_only_the_sizes_not_given_and_records_what_ran(tmp_path, monkeypatch, args, sizes):
    """--quick overwrote --train/--test/--epochs given with 32/16/1 (in train_model), and the results did not say so."""
    import json
    import sys

    sb = load_benchmark("summarization")
    rows = [{"source": "Ann: I will buy the laptop\nJosh: it is 250\nAnn: ok", "reference": "Ann buys Josh's laptop.",
             "prediction": "ann buys the laptop."}]
    seen = []

    def train_process(name, recipe, overrides, out, *, verbose=False):
        seen.append(overrides)
        out.mkdir(parents=True)
        (out / "predictions-test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        rouge = rouge_metrics([r["prediction"] for r in rows], [r["reference"] for r in rows])
        run = {"method": "lora", "metrics": {"test": {**rouge, "loss": 1.0}}, "train_examples": 32, "steps": 4, "train_wall_s": 1.0,
               "examples_per_s": 32.0, "precision": "fp32", "trainable_params": 1, "trainable_percent": 1.0, "hardware": {},
               "versions": {"torch": "x", "transformers": "x", "peft": "x"}}
        return run, 100.0, 2.0

    monkeypatch.setattr(sb, "train_process", train_process)
    monkeypatch.setattr(sb, "RESULTS", tmp_path)
    monkeypatch.setattr(sys, "argv", ["summarization.py", *args, "--name", "s"])
    sb.main()
    train, test, epochs = sizes
    (overrides,) = seen
    assert f"data.test.max_samples={test}" in overrides
    assert (f"data.train.max_samples={train}" in overrides) == (train is not None)
    assert (f"train.epochs={epochs}" in overrides) == (epochs is not None)
    meta = json.loads((tmp_path / "s.json").read_text())["meta"]
    assert (meta["train_rows"], meta["test_rows"], meta["epochs"]) == sizes


@pytest.mark.parametrize(("args", "says"), [(["--train", "0"], "--train 0: give at least 1 row"),
                                            (["--quick", "--test", "-1"], "--test -1: give at least 1 row"),
                                            (["--epochs", "0"], "--epochs 0: give a positive number of passes")])
def test_bad_sizes_are_refused_before_training(monkeypatch, capsys, args, says):
    import sys

    sb = load_benchmark("summarization")
    monkeypatch.setattr(sb, "train_process", lambda *a, **k: pytest.fail("trained"))
    monkeypatch.setattr(sys, "argv", ["summarization.py", *args, "--name", "never-written"])
    with pytest.raises(SystemExit) as stop:
        sb.main()
    assert stop.value.code == 2 and says in capsys.readouterr().err
