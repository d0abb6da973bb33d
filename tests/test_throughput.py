"""benchmarks/throughput.py's accounting (the runs themselves are the benchmark): FLOPs per token from the model's
shape, time to target, MFU, and the ratio table."""

from __future__ import annotations

import argparse
import importlib.util

import pytest

from .conftest import REPO


@pytest.fixture(scope="module")
def tp():
    spec = importlib.util.spec_from_file_location("throughput", REPO / "benchmarks" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flops_per_token_follow_minilm_shape(tp):
    weights = 6 * (4 * 384 * 384 + 2 * 384 * 1536)  # MiniLM-L6-H384: q, k, v, o and the FFN of 6 layers
    assert tp.flops_per_token(0, trainable_base=False) == 4 * weights  # frozen matmuls: forward + input gradient
    assert tp.flops_per_token(0, trainable_base=True) == 6 * weights
    assert tp.flops_per_token(10, trainable_base=False) - tp.flops_per_token(0, trainable_base=False) == 3 * 6 * 4 * 10 * 384


def test_derive_time_to_target_and_utilisation(tp):
    run = {"examples": 640, "train_s": 10.0, "tokens": 8000, "padded_tokens": 16000,
           "evals": [{"step": 10, "accuracy": 0.7, "train_s": 4.0}, {"step": 20, "accuracy": 0.82, "train_s": 8.0},
                     {"step": 30, "accuracy": 0.85, "train_s": 10.0}]}
    d = tp.derive(run, target=0.8, length_of_tokens=12.5, trainable_base=False, peak=100.0)
    assert d["examples_per_s"] == 64 and d["tokens_per_s"] == 800 and d["time_to_target_s"] == 8.0
    assert d["mfu"] == pytest.approx(800 * tp.flops_per_token(12.5, False) / 100e9)
    assert d["hfu"] == pytest.approx(2 * d["mfu"])
    assert tp.derive(run, target=0.9, length_of_tokens=12.5, trainable_base=False, peak=100.0)["time_to_target_s"] is None


def test_table_reports_ratios_per_case(tp):
    args = argparse.Namespace(threads=1, steps=20, rows=640, target=0.8)
    gemm = {"peak_gflops": 50.0, "ffn_512x384x1536": 40.0}
    row = dict(accuracy=0.8, peak_rss_mib=1000.0, mfu=0.4, hfu=0.5, time_to_target_s=10.0)
    rows = [{"case": "lora", "side": "peftlab", "examples_per_s": 40.0, "tokens_per_s": 600.0, **row},
            {"case": "lora", "side": "Trainer+peft", "examples_per_s": 20.0, "tokens_per_s": 300.0, **row, "time_to_target_s": 25.0}]
    md = tp.table(args, gemm, rows, {})
    assert "| lora | 2.00x | 0.40 | +0.00 | 1.00 |" in md, md
