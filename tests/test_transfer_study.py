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
