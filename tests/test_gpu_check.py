"""benchmarks/gpu_check.py's own logic (its numbers come from a GPU machine; see benchmarks/README.md "GPU check")."""

from __future__ import annotations

import sys

import pytest
import torch

from .conftest import load_benchmark


def test_profile_steps_times_the_steps_and_writes_the_top_ops(tmp_path):
    bench = load_benchmark("gpu_check")
    layer, calls = torch.nn.Linear(32, 32), []

    def step():
        calls.append(1)
        layer(torch.randn(8, 32)).sum().backward()

    res = bench.profile_steps(step, "cpu", tmp_path / "profile.txt", steps=3)
    assert len(calls) == 3 and res["wall_ms_per_step"] > 0
    assert res["device_busy_ms_per_step"] == 0 and res["kernel_launches_per_step"] == 0  # no device on the CPU
    assert "aten::" in (tmp_path / "profile.txt").read_text()


def test_the_bare_loop_counts_a_packed_batchs_own_tokens_not_its_padding():
    from transformers import LlamaConfig, LlamaForCausalLM

    bench = load_benchmark("gpu_check")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    ids = torch.randint(0, 64, (2, 16))

    def batches():
        while True:  # 2 rows of 16 positions, 11 + 9 of them real
            yield {"input_ids": ids, "position_ids": torch.arange(16).repeat(2, 1), "labels": ids, "real_tokens": 20}

    res = bench.bare_loop(model, batches(), steps=6, dev="cpu", seconds=600, lr=1e-3)
    assert res["steady_steps"] == 3
    assert res["tokens_per_s"] / res["steps_per_s"] == pytest.approx(20)


def test_report_shows_the_bare_loop_and_the_variant_beside_peftlab():
    bench = load_benchmark("gpu_check")
    prof = {"wall_ms_per_step": 63.0, "device_busy_ms_per_step": 4.9, "device_busy_share": 0.079, "kernel_launches_per_step": 859}
    r = {"mode": "cuda", "env": {"gpu": "H200", "torch": "t", "transformers": "x", "peft": "p", "accelerate": "a"},
         "gemm": {"peak_tflops": 700.0, "sizes": {"4096": {"tflops": 700.0}}}, "wall_s": 10.0, "errors": {},
         "cls": {"ran": "peftlab train", "tokens_per_s": 100.0, "mfu": 0.01, "mfu_lora_aware": 0.005, "note": "n1"},
         "cls_bare": {"ran": "bare transformers + peft loop", "tokens_per_s": 90.0, "mfu": 0.009, "note": "n2", "profile": prof},
         "sft": {"ran": "bare transformers + peft loop", "tokens_per_s": 50.0, "note": "fell back"},
         "sft_bare": {"ran": "bare transformers + peft loop", "tokens_per_s": 50.0, "note": "fell back"},
         "sft_alt": {"ran": "peftlab train + model.dtype=auto", "tokens_per_s": 60.0, "note": "alt"}}
    md = bench.report(r)
    rows = [line for line in md.splitlines() if line.startswith("| ") and "tokens/s" not in line]
    assert [row.split(" | ")[1] for row in rows] == ["peftlab train", "bare transformers + peft loop", "bare transformers + peft loop",
                                                     "peftlab train + model.dtype=auto"]
    assert "device busy 8%, 859 device ops/step" in rows[1]


@pytest.mark.parametrize("budget", ["inf", "nan", "0", "-5"])
def test_gpu_check_refuses_a_budget_that_is_not_a_finite_positive_number(monkeypatch, capsys, budget):
    bench = load_benchmark("gpu_check")
    monkeypatch.setattr(bench, "prepare", lambda: pytest.fail("prepared"))
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--budget", budget, "--prepare"])
    with pytest.raises(SystemExit) as stop:
        bench.main()
    assert stop.value.code == 2 and f"--budget {budget}: give the seconds for everything" in capsys.readouterr().err


def test_a_timed_out_phase_says_so_and_a_failure_shows_its_error_not_a_progress_bar():
    """A cut cls phase was reported as `eval:  50%|...| 2/4`: tqdm's last update, not what happened."""
    bench = load_benchmark("gpu_check")
    bar = "eval:  50%|#####     | 2/4 [00:41<00:41, 20.8s/it]"
    cut = f"loading...\n{bar}\r\ncls: {bench.TIMED_OUT.format(90)}\n"
    failed = f"Traceback (most recent call last):\nValueError: no such column\n{bar}\n"
    md = bench.report({"mode": "cpu tiny", "env": {"torch": "t", "transformers": "x", "peft": "p", "accelerate": "a"},
                       "gemm": {"peak_tflops": 1.0, "sizes": {}}, "wall_s": 1.0,
                       "errors": {"cls (peftlab)": cut, "sft (peftlab)": failed, "merge": ""}})
    assert "**cls (peftlab) failed**: `cls: timed out after 90 s (its phase limit)`" in md
    assert "**sft (peftlab) failed**: `ValueError: no such column`" in md
    assert "20.8s/it" not in md


def test_the_tiny_cpu_run_caps_the_classification_evaluation_and_lifts_the_gpu_time_limits(tmp_path, monkeypatch):
    """--cpu --tiny scored a 320-row hold-out and all 872 dev rows at batch 256, cut at the GPU's 90 s: it timed out on
    2 cores."""
    bench = load_benchmark("gpu_check")
    (tmp_path / "carry" / "whl").mkdir(parents=True)
    monkeypatch.setattr(bench, "CARRY", tmp_path / "carry")
    monkeypatch.setattr(bench, "env_info", lambda dev: {})
    monkeypatch.setattr(bench, "gemm_peak", lambda dev, sizes, reps: {"peak_tflops": 1.0})
    calls = []

    class Stop(Exception):
        pass

    def train(name, recipe, overrides, work, env, timeout):
        calls.append((name, overrides, timeout))
        raise Stop

    monkeypatch.setattr(bench, "peftlab_train", train)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--cpu", "--tiny", "--only", "cls", "--out", str(tmp_path / "out"),
                                      "--work", str(tmp_path / "work")])
    with pytest.raises(Stop):
        bench.main()
    [(name, overrides, timeout)] = calls
    tiny = bench.SIZES["tiny"]
    assert name == "cls" and f"data.test.max_samples={tiny['cls_test']}" in overrides
    assert f"data.train.max_samples={tiny['cls_train']}" in overrides and tiny["cls_train"] * 0.02 <= 64  # the hold-out scored
    assert f"eval.batch_size={tiny['cls_eval_batch']}" in overrides
    assert timeout == bench.PHASE_S["cls"] * bench.CPU_SCALE > bench.PHASE_S["cls"]
