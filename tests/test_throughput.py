"""benchmarks/throughput.py's accounting (the runs themselves are the benchmark): FLOPs per token from the model's
shape, time to target, MFU, and the ratio table."""

from __future__ import annotations

import argparse

import pytest

from .conftest import load_benchmark


@pytest.fixture(scope="module")
def tp():
    return load_benchmark("throughput")


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


def test_accuracy_difference_is_paired_by_seed(tp):
    def run(side, seed, acc):
        return {"case": "lora", "side": side, "seed": seed, "accuracy": acc}

    rows = [run("peftlab", 1, 0.80), run("Trainer+peft", 1, 0.81), run("peftlab", 2, 0.83), run("Trainer+peft", 2, 0.82),
            run("peftlab", 3, 0.815)]  # seed 3 has no Trainer run: left out
    assert tp.accuracy_difference(rows, "lora").startswith("+0.00 ± 1.00 (2 seeds: -1.00, +1.00)")
    assert tp.accuracy_difference(rows[:2], "lora") == "-1.00"


def test_samsum_case_has_its_own_table(tp):
    args = argparse.Namespace(threads=1, steps=20, rows=640, target=0.8, s2s_steps=4, s2s_rows=64, s2s_test=8)
    gemm = {"peak_gflops": 50.0, "ffn_512x384x1536": 40.0}
    s2s = dict(case="samsum", examples=64, tokens=1000, padded_tokens=1200, rouge1=0.2, peak_rss_mib=2000.0, trainable_params=10, words=12.0)
    rows = [{**s2s, "side": "peftlab", "examples_per_s": 2.0, "tokens_per_s": 300.0, "generated_per_s": 3.0},
            {**s2s, "side": "Trainer+peft", "examples_per_s": 1.0, "tokens_per_s": 150.0, "generated_per_s": 2.0, "rouge1": 0.25}]
    md = tp.table(args, gemm, rows, {})
    assert "| samsum |" not in md  # not in the classification tables
    assert "| peftlab | 2.00 | 300 | 1.20 | 3.00 | 12.0 | 20.00 | 10 | 2000 |" in md, md
    assert "training tokens/s 2.00x, generation 1.50x, peak RSS 1.00; ROUGE-1 difference -5.00 points" in md, md
    assert tp.derive_s2s({"examples": 64, "train_s": 32.0, "tokens": 640, "generated": 8, "generate_s": 4.0}) == {
        "examples_per_s": 2.0, "tokens_per_s": 20.0, "generated_per_s": 2.0}


def test_ablations_are_paired_with_the_default_run_of_their_seed(tp):
    def row(case, seed, tps):
        return {"case": case, "side": "peftlab", "seed": seed, "tokens_per_s": tps, "accuracy": 0.8, "steps": 200}

    rows = [row("lora-grouped", 1, 1000.0), {**row("lora-grouped", 1, 800.0), "side": "Trainer+peft"}, row("lora-grouped", 2, 2000.0),
            row("ablation: torch dropout", 1, 900.0), row("ablation: torch dropout", 2, 1600.0),
            row("ablation: AdamW loop", 3, 1500.0)]  # seed 3 has no default run: against the defaults' mean (1500)
    md = "\n".join(tp.ablation_table(rows))
    assert "| torch dropout (" in md and "| 200 | 2 | 1250 | 0.85x | 80.00 |" in md, md  # mean of 0.90x and 0.80x, not 1250/1500
    assert "| AdamW loop (" in md and "| 200 | 1 | 1500 | 1.00x |" in md, md
    assert tp.ablation_table(rows[3:]) == []  # no default run: no table


def test_memory_case_compares_qlora_with_lora_with_and_without_checkpointing(tp):
    args = argparse.Namespace(threads=1, steps=20, rows=640, target=0.8)
    gemm = {"peak_gflops": 50.0, "ffn_512x384x1536": 40.0}
    sides = (("lora", 8000.0), ("qlora", 6000.0), ("lora-ckpt", 4000.0), ("qlora-ckpt", 2000.0), ("qlora-keep", 7000.0),
             ("lora-release", 7500.0))
    rows = [{"case": tp.MEMORY_CASE, "side": f"peftlab {side}", "steps": 3, "params": 730_000_000, "peak_rss_mib": rss,
             "train_s": 3 * i + 3.0} for i, (side, rss) in enumerate(sides)]
    md = tp.table(args, gemm, rows, {})
    assert set(tp.MEMORY_SIDES) == {side for side, _ in sides}
    assert "train.release_memory=never" in tp.MEMORY_SIDES["qlora-keep"] and "train.release_memory=always" in tp.MEMORY_SIDES["lora-release"]
    assert "- peak RSS lora 8000 MiB, qlora 6000 MiB: QLoRA / LoRA 0.75" in md, md
    assert "- peak RSS lora-ckpt 4000 MiB, qlora-ckpt 2000 MiB: QLoRA / LoRA 0.50" in md, md
    assert "- peak RSS lora 8000 MiB, qlora-keep 7000 MiB: QLoRA / LoRA 0.88" in md, md  # glibc's heap as it was
    assert "- peak RSS lora-release 7500 MiB, qlora 6000 MiB: QLoRA / LoRA 0.80" in md, md  # the same allocator setting
    assert "lora 1.00, qlora 2.00, lora-ckpt 3.00, qlora-ckpt 4.00, qlora-keep 5.00, lora-release 6.00" in md, md
    assert "| memory-0.7b |" not in md  # not in the classification tables


def test_step_levers_alternatives_are_the_same_decisions_and_switch_back(tiny_bert):
    """benchmarks/step_levers.py times each lever against its alternative on the same batches: the bool masks must be
    the same keep decisions as the uint8 ones (only their representation is timed), and every switch must undo itself."""
    import torch
    from transformers import AutoModelForSequenceClassification

    import peftlab.dropout as D

    sl = load_benchmark("step_levers")
    torch.manual_seed(5)
    fast = D.keep_mask(torch.Size([33, 7]), 0.2)
    torch.manual_seed(5)
    assert torch.equal(sl.bool_keep_mask(torch.Size([33, 7]), 0.2), fast.bool())
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2, attn_implementation="sdpa")
    D.use_fast_dropout(model)
    levers = sl.levers(model)
    assert set(levers) == {"uint8 masks", "sparse dropout", "peftlab attention"}
    before = (D.keep_mask, D.SPARSE_BELOW, model.config._attn_implementation)
    for alternative, default in levers.values():
        alternative()
        assert (D.keep_mask, D.SPARSE_BELOW, model.config._attn_implementation) != before
        default()
        assert (D.keep_mask, D.SPARSE_BELOW, model.config._attn_implementation) == before

    params = [p for p in model.parameters() if p.requires_grad]
    fused, foreach = torch.optim.AdamW(params, fused=True), torch.optim.AdamW(params, foreach=True)
    optimizers = {"in use": fused, "foreach": foreach}
    alternative, default = sl.levers(model, optimizers)["fused AdamW"]
    alternative()
    assert optimizers["in use"] is foreach
    default()
    assert optimizers["in use"] is fused
    assert "fused AdamW" not in sl.levers(model, {"in use": foreach, "foreach": foreach})  # nothing to compare with
    assert "fused LoRA" not in sl.levers(model)  # no LoRA layers: nothing to compare with
    import peftlab.tasks.generative as G

    assert "head cross-entropy" not in sl.levers(model)  # no LM-head loss
    alternative, default = sl.levers(model, head_loss=True)["head cross-entropy"]
    before = (G._frozen_linear_head, G.CHUNK)
    for _ in range(2):
        alternative()
        assert G.CHUNK == 1024 and not G._frozen_linear_head(torch.nn.Linear(2, 2).requires_grad_(False), torch.zeros(1))
        default()
        assert (G._frozen_linear_head, G.CHUNK) == before
    import peft

    from peftlab.fused_lora import FusedLoraLinear, use_fused_lora

    lora = peft.get_peft_model(AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2),
                               peft.LoraConfig(r=2, target_modules=["query", "value"]))
    fused = use_fused_lora(lora)
    alternative, default = sl.levers(lora)["fused LoRA"]
    alternative()
    assert fused > 0 and not any(isinstance(m, FusedLoraLinear) for m in lora.modules())
    default()
    assert sum(isinstance(m, FusedLoraLinear) for m in lora.modules()) == fused
    eager = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2, attn_implementation="eager")
    D.use_fast_dropout(eager)
    assert set(sl.levers(eager)) == {"uint8 masks", "sparse dropout"}  # no sdpa fallback to time against

    from peftlab.tasks.classification import trim

    (layer,) = trim(model)
    trimmed = vars(layer)["forward"]
    assert "skip unread positions" not in sl.levers(model)  # no trimmed layers named: nothing to compare with
    alternative, default = sl.levers(model, trimmed=[layer])["skip unread positions"]
    for _ in range(2):  # each switch may be thrown twice in a row (the sides alternate their order batch by batch)
        alternative()
        alternative()
        assert "forward" not in vars(layer)  # the full layer
        default()
        default()
        assert vars(layer)["forward"] is trimmed


def test_mfu_is_restated_against_the_highest_peak_measured(tp):
    rows = [{"mfu": 0.5, "hfu": 0.6, "gemm_peak_gflops": 400.0}, {"gemm_peak_gflops": 400.0}]  # the second: no MFU (memory case)
    assert tp.against_highest_peak(rows, [{"peak_gflops": 400.0}, {"peak_gflops": 500.0}]) == 500.0
    assert rows[0] == {"mfu": pytest.approx(0.4), "hfu": pytest.approx(0.48), "gemm_peak_gflops": 500.0}
    assert rows[1] == {"gemm_peak_gflops": 500.0}
    assert tp.against_highest_peak(rows, [{"peak_gflops": 450.0}, {"peak_gflops": 500.0}]) == 500.0  # a lower reading changes nothing
    assert rows[0]["mfu"] == pytest.approx(0.4)


def test_an_unknown_case_is_refused_and_a_stopped_run_leaves_the_stored_results(tp, tmp_path, monkeypatch):
    """A typo (--cases lorra) ran and was reported as plain LoRA; a run stopped half-way replaced the stored results
    with the rows it had finished."""
    import json
    import sys

    monkeypatch.setattr(sys, "argv", ["throughput.py", "--cases", "lora,lorra", "--name", "x"])
    with pytest.raises(SystemExit, match=r"unknown case\(s\) \['lorra'\]"):
        tp.main()
    monkeypatch.setattr(tp, "RESULTS", tmp_path)
    (tmp_path / "t.json").write_text('{"rows": "as measured before"}')
    args = argparse.Namespace(rows=8, eval_rows=0, steps=2, eval_every=1, target=0.8, threads=1, quick=True, s2s_rows=1,
                              s2s_steps=1, s2s_test=1, precision="fp32")
    tp.save("t", args, {}, 10.0, [], {}, final=False)
    assert json.loads((tmp_path / "t.json").read_text()) == {"rows": "as measured before"}
    assert json.loads((tmp_path / "t.partial.json").read_text())["rows"] == []
    monkeypatch.setattr(tp, "table", lambda *a: "table")
    tp.save("t", args, {}, 10.0, [], {})
    stored = json.loads((tmp_path / "t.json").read_text())
    assert stored["rows"] == [] and not (tmp_path / "t.partial.json").exists()
    assert {"date", "argv", "commit", "versions", "hardware"} <= set(stored["provenance"])  # the results describe themselves
    assert {"cpu", "cpu_native_bf16", "torch_threads"} <= set(stored["provenance"]["hardware"])


def test_the_distillation_report_says_slower_when_the_student_is():
    from .conftest import load_benchmark

    distillation = load_benchmark("distillation")
    assert distillation.latency_ratio(142.0, 71.0) == "2.00x faster"
    assert distillation.latency_ratio(142.0, 1040.0) == "7.32x slower"  # it read "0.14x faster"
