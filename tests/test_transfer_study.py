"""benchmarks/transfer_study.py on a tiny budget: every output is written, and a rerun resumes instead of repeating."""

from __future__ import annotations

import csv
import json

from .conftest import load_benchmark


def test_transfer_study_writes_every_output_and_resumes(tmp_path, tiny_bert, sentiment_files):
    study = load_benchmark("transfer_study")
    common = ["--tasks", "sst2", "--fractions", "0.003", "--seeds", "1", "--min-steps", "2", "--max-steps", "2",
              "--results", str(tmp_path), "--name", "t", "--set", f"model.name={tiny_bert}",
              "--set", f"data.train.path={sentiment_files['train']}", "--set", f"data.eval.path={sentiment_files['dev']}",
              "--set", "data.max_length=32"]
    assert study.main([*common, "--methods", "lora"]) == 0
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert [(r["method"], r["train_rows"], r["steps"]) for r in rows] == [("lora", 202, 2)]  # 0.3% of SST-2's 67,349
    first = rows[0]
    assert 0 < first["trainable_params"] < first["total_params"] and first["weights_mib"] > 0 and first["peak_rss_mib"] > 50

    assert study.main([*common, "--methods", "lora,frozen"]) == 0  # lora is done: only frozen runs
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["lora", "frozen"] and rows[0] == first
    with (tmp_path / "t.csv").open() as f:
        assert [r["method"] for r in csv.DictReader(f)] == ["lora", "frozen"]
    md = (tmp_path / "t.md").read_text()
    assert "| sst2 | lora | 0.3 | 202 | 2 | 1 |" in md and "| sst2 | frozen |" in md
    assert (tmp_path / "t-curves.png").stat().st_size > 10_000 and (tmp_path / "t-params.png").stat().st_size > 10_000


def test_headlines_answer_the_study_questions_from_the_table():
    study = load_benchmark("transfer_study")

    def row(method, fraction, accuracy, params):
        return {"task": "sst2", "method": method, "fraction": fraction, "accuracy": (accuracy, 1.0), "trainable_params": params}

    summary = [row("scratch", 0.1, 50.0, 1000), row("scratch", 1, 60.0, 1000),
               row("lora", 0.01, 55.0, 100), row("lora", 0.1, 61.0, 100), row("lora", 1, 80.0, 100),
               row("full", 0.01, 57.0, 1000), row("full", 1, 79.5, 1000), row("ia3", 1, 70.0, 10)]
    lines = study.headlines(summary)
    assert lines[0] == "sst2: LoRA reaches what scratch gets from 100% of the data (60.0) with 10% of it (61.0)"
    assert lines[1] == "sst2: lora minus full fine-tuning, accuracy points: -2.0 at 1%, +0.5 at 100%"
    assert lines[2].startswith("sst2: ia3 trains 10 parameters (100x fewer than full, 10x fewer than LoRA): 70.0 at 100%")
    assert len(lines) == 3  # no qlora/dora/vera rows: no line about them

    summary[4] = row("lora", 1, 59.0, 100)
    summary[3] = row("lora", 0.1, 58.0, 100)
    assert study.headlines(summary)[0] == "sst2: LoRA stays below scratch on 100% of the data (60.0) at every fraction measured"
