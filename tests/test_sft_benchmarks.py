"""benchmarks/sft_throughput.py and generation.py: what makes their comparisons fair (the runs are the benchmark)."""

from __future__ import annotations

import importlib
import json
import sys

import pytest

from peftlab.tasks import sft

from .conftest import load_benchmark, shared_or_skip
from .test_sft import messages_rows, recipe_for, write_jsonl


@pytest.mark.slow
def test_trl_sees_the_conversation_peftlab_trains_on():
    """TRL's side gets each row as conversational prompt/completion: rendered by the same chat template, it is the token
    sequence peftlab's recipe trains on, and the answer tokens peftlab labels are TRL's completion."""
    d = shared_or_skip("models", "smollm2-135m-instruct")
    from transformers import AutoTokenizer

    from peftlab.bases import resolve_model_path

    bench = load_benchmark("sft_throughput")
    recipe, path = bench.recipe_parts()
    assert path == resolve_model_path(str(d))
    tok = AutoTokenizer.from_pretrained(path)
    row = {"dialogue": "Amy: hi\nBob: lunch at 1?\nAmy: sure", "summary": "Amy and Bob will have lunch at 1."}
    conv = bench.chat(row, recipe.task.prompt)
    mine = sft.encode(tok, conv["prompt"] + conv["completion"], bench.MAX_LENGTH)
    full = tok.apply_chat_template(conv["prompt"] + conv["completion"], tokenize=True, return_dict=False)
    prompt = tok.apply_chat_template(conv["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert full[:len(mine["input_ids"])] == mine["input_ids"] and len(full) - len(mine["input_ids"]) <= 1  # (a final newline)
    assert mine["gen_ids"] == prompt
    assert tok.decode([t for t, y in zip(mine["input_ids"], mine["labels"]) if y != -100]) == row["summary"] + "<|im_end|>"
    counts = bench.token_counts([conv], tok)
    assert counts["real"] == len(full) and counts["context"] == len(full) * (len(full) + 1) // 2
    assert counts["answer"] == sum(y != -100 for y in mine["labels"])  # the labelled tokens (it counted the newline after them too)


def test_sft_training_flops_count_each_matmul_once_per_token_and_the_lm_head_only_on_answers():
    """A 2-layer, 2-head model with one key/value head (grouped-query), hidden 4, MLP 8, vocabulary 10, LoRA r 1, worked by
    hand: per layer 144 matmul weights (q 16, k 8, v 8, o 16, gate 32, up 32, down 32) and 64 LoRA weights."""
    from types import SimpleNamespace

    bench = load_benchmark("sft_throughput")
    config = SimpleNamespace(hidden_size=4, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=1, vocab_size=10)
    counts = {"real": 10, "answer": 3, "context": 20}
    assert bench.training_flops(config, counts, r=1) == (4 * 288 + 6 * 128) * 10 + 4 * 4 * 10 * 3 + 3 * 4 * 4 * 2 * 20
    assert bench.training_flops(config, {**counts, "answer": 0}, r=1) == (4 * 288 + 6 * 128) * 10 + 3 * 4 * 4 * 2 * 20


def test_sft_throughput_report_pairs_each_side_with_peftlab_by_rows_and_seed(tmp_path, monkeypatch):
    bench = load_benchmark("sft_throughput")
    monkeypatch.setattr(bench, "OUT", tmp_path / "runs")
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    bench.OUT.mkdir()
    for side, seed, tps in (("peftlab", 0, 300.0), ("trl", 0, 100.0), ("trl-packed", 0, 250.0), ("peftlab", 1, 200.0),
                            ("trl", 1, 200.0), ("peftlab-torch-dropout", 1, 160.0)):
        mfu = {"mfu": tps / 1000, "gemm_peak": {"peak_gflops": 100.0, "precision": "fp32"}} if seed else {}  # seed 0: older runs, no MFU
        if side == "peftlab" and seed:
            mfu["after_first_step"] = {"token_share": 0.9, "seconds": 1.0, "mfu": 0.25}
        (bench.OUT / f"{side}-{seed}.json").write_text(json.dumps(
            {"side": side, "seed": seed, "rows": 8, "steps": 2, "tokens_per_s": tps, "answer_loss": 2.0, "peak_rss_mib": 1.0, **mfu}))
    text = bench.report()
    ratios = {(line.split(" | ")[0][2:], line.split(" | ")[2]): line.split(" | ")[5] for line in text.splitlines()[2:]}
    mfus = {(line.split(" | ")[0][2:], line.split(" | ")[2]): line.split(" | ")[6] for line in text.splitlines()[2:]}
    assert mfus[("peftlab", "0")] == "-" and mfus[("peftlab", "1")] == "20.0% (100 fp32)" and mfus[("trl", "1")] == "20.0% (100 fp32)"
    steady = {(line.split(" | ")[0][2:], line.split(" | ")[2]): line.split(" | ")[7] for line in text.splitlines()[2:]}
    assert steady[("peftlab", "1")] == "25.0%" and steady[("peftlab", "0")] == steady[("trl", "1")] == "-"
    assert ratios == {("peftlab", "0"): "1.00x", ("trl", "0"): "3.00x", ("trl-packed", "0"): "1.20x", ("peftlab", "1"): "1.00x",
                      ("trl", "1"): "1.00x", ("peftlab-torch-dropout", "1"): "1.25x"}
    assert [line.split(" | ")[0][2:] for line in text.splitlines()[5:]] == ["peftlab", "peftlab-torch-dropout", "trl"]  # ablation beside peftlab
    assert (tmp_path / "sft_throughput.md").read_text().strip() == text


def test_sft_throughput_counts_the_steps_after_the_first_from_the_run_log(tmp_path):
    bench = load_benchmark("sft_throughput")
    log = tmp_path / "log.jsonl"
    steps = [{"step": 1, "train_s": 20.0, "tokens_per_s": 200.0}, {"step": 2, "train_s": 30.0, "tokens_per_s": 300.0},
             {"step": 3, "train_s": 40.0, "tokens_per_s": 100.0}]  # 4000, 3000 and 1000 tokens
    log.write_text("\n".join(json.dumps({"kind": "train", **r}) for r in [*steps[:2], {"step": 2, "kind": "eval"}, steps[2]]))
    assert bench.after_first_step(log) == {"token_share": pytest.approx(0.5), "seconds": 20.0}
    log.write_text("\n".join(json.dumps({"kind": "train", **r}) for r in steps[1:]))  # logged every other step: not per step
    assert bench.after_first_step(log) is None


def test_a_stored_benchmark_case_is_reused_and_a_failed_rerun_keeps_it(tmp_path, monkeypatch):
    """benchmarks.common.stored_case (llm.py, multitask.py, domain_adaptation.py): a finished case is read back without
    a process; `fresh` measures it again, and a rerun that fails leaves the stored result as it was."""
    common = load_benchmark("common")
    calls = []

    def process(name, recipe, overrides, out, *, verbose=False, env=None):
        calls.append((name, overrides, out))
        if len(calls) == 3:
            raise RuntimeError("the run failed")
        return {"metrics": {"test": {"accuracy": 0.5 + len(calls) / 10}}}, 100.0, 2.0

    monkeypatch.setattr(common, "train_process", process)
    runs, results = tmp_path / "runs", tmp_path / "results"
    case = lambda fresh: common.stored_case("a", "r.yaml", ["x=1"], runs=runs, results=results, prefix="llm", fresh=fresh)  # noqa: E731
    first = case(False)
    assert calls == [("a", ["x=1", "name=llm-a"], runs / "a")] and first["name"] == "a"
    assert case(False) == first and len(calls) == 1  # stored: no second process
    assert case(True)["run"]["metrics"]["test"]["accuracy"] == 0.7 and len(calls) == 2
    stored = (results / "a.json").read_text()
    with pytest.raises(RuntimeError, match="failed"):
        case(True)
    assert (results / "a.json").read_text() == stored and not list(results.glob("*.tmp"))


def test_generation_benchmark_compares_the_same_rows_folded_unfolded_and_plain(tmp_path, monkeypatch, chat_llama):
    """generation.py on a tiny finished SFT run: five sides on the same test rows; in fp32 the folded adapter
    (`peftlab eval`'s default) writes exactly the answers of the unfolded one, and left padding those of peftlab; the
    weights cast per call (train.cast_frozen=false) write peftlab's answers in any precision."""
    from peftlab import run

    bench = load_benchmark("generation")
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "results")
    path = write_jsonl(tmp_path / "m.jsonl", messages_rows())
    recipe = recipe_for(tmp_path, chat_llama, path, ["train.max_steps=20", f"data.test={path}"])
    run(recipe)
    monkeypatch.setattr("sys.argv", ["generation.py", "--run", str(recipe.out), "--rows", "6", "--batch", "4", "--name", "g"])
    bench.main()
    results = {r["side"]: r for r in json.loads((tmp_path / "results" / "g.json").read_text())["results"]}
    assert list(results) == ["peftlab", "peftlab, adapter unfolded", "peftlab, weights cast per call", "plain-left", "plain"]
    assert all(r["rows"] == 6 and r["seconds"] > 0 for r in results.values())
    folded, unfolded, left = results["peftlab"], results["peftlab, adapter unfolded"], results["plain-left"]
    assert folded["new_tokens"] == unfolded["new_tokens"] == left["new_tokens"] and folded["rougeL"] == unfolded["rougeL"]
    per_call = results["peftlab, weights cast per call"]
    assert (per_call["new_tokens"], per_call["rougeL"]) == (folded["new_tokens"], folded["rougeL"])


def test_a_memory_case_runs_under_jemalloc_as_its_own_case_with_the_library_preloaded(tmp_path, monkeypatch):
    """llm.py --allocator jemalloc: the case's process gets LD_PRELOAD + MALLOC_CONF, its result a name of its own (the
    glibc one stays) that records them, and the memory table says which allocator ran; a missing library is one error
    that says how to install it or where to point."""
    common, llm = load_benchmark("common"), load_benchmark("llm")
    with pytest.raises(SystemExit, match="apt install libjemalloc2.*--jemalloc"):
        llm.jemalloc_env(str(tmp_path / "missing.so"))
    lib = tmp_path / "libjemalloc.so.2"
    lib.write_bytes(b"")  # never loaded: stored_case is replaced below
    seen = []
    monkeypatch.setattr(llm, "stored_case", lambda name, recipe, overrides, **kw: seen.append((name, kw["env"])))
    monkeypatch.setattr(llm, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(llm, "OUT", tmp_path)
    monkeypatch.setattr(sys, "argv", ["llm.py", "--cases", "memory-lora-lean-eval8", "--allocator", "jemalloc", "--jemalloc", str(lib)])
    llm.main()
    assert seen == [("memory-lora-lean-eval8-jemalloc", {"LD_PRELOAD": str(lib.resolve()), "MALLOC_CONF": llm.JEMALLOC_CONF})]
    # the variables reach the measured process, on top of this one's environment
    check = "import os, sys; sys.exit(0 if os.environ.get('MALLOC_CONF') == 'x' and 'PATH' in os.environ else 3)"
    common.measured_process("env", [sys.executable, "-c", check], env={"MALLOC_CONF": "x"})
    with pytest.raises(common.RunFailed, match="exit 3"):  # (a SystemExit: uncaught, the message alone, exit status 1)
        common.measured_process("env", [sys.executable, "-c", check])
    run = {"quantization": "none", "train_seconds": 20.0, "steps": 10, "tokens_per_s": 300.0, "metrics": {"eval": {"loss": 2.0}}}
    over = ["model.dtype=auto", "train.gradient_checkpointing=true", "eval.batch_size=8"]
    for name, rss, env in (("memory-lora-lean-eval8", 3000.0, None), ("memory-lora-lean-eval8-jemalloc", 2000.0, seen[0][1])):
        (tmp_path / f"{name}.json").write_text(json.dumps({"run": run, "overrides": over, "peak_rss_mib": rss,
                                                           **({"env": env} if env else {})}))
    rows = [r.split(" | ") for r in llm.memory_rows()[2:]]
    assert [(r[0][2:], r[4], r[8]) for r in rows] == [("lora-lean-eval8", "glibc", "3000"), ("lora-lean-eval8-jemalloc", "jemalloc", "2000")]


def test_a_tagged_case_is_stored_beside_the_untagged_one_with_the_extra_overrides(tmp_path, monkeypatch):
    """llm.py --tag T --set K=V: the case runs with its own overrides plus K=V, stored as CASE-T (after -jemalloc), so
    a run on another host or with another setting never replaces the stored case."""
    llm = load_benchmark("llm")
    seen = []
    monkeypatch.setattr(llm, "stored_case", lambda name, recipe, overrides, **kw: seen.append((name, recipe, overrides)))
    monkeypatch.setattr(llm, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(llm, "OUT", tmp_path)
    monkeypatch.setattr(sys, "argv", ["llm.py", "--cases", "memory-lora-lean-eval8", "--tag", "fp32-host-always",
                                      "--set", "train.release_memory=always"])
    llm.main()
    recipe, overrides = llm.CASES["memory-lora-lean-eval8"]
    assert seen == [("memory-lora-lean-eval8-fp32-host-always", recipe, [*overrides, "train.release_memory=always"])]
    lib = tmp_path / "libjemalloc.so.2"
    lib.write_bytes(b"")
    monkeypatch.setattr(sys, "argv", ["llm.py", "--cases", "memory-qlora-lean-eval8", "--tag", "h", "--allocator", "jemalloc",
                                      "--jemalloc", str(lib)])
    llm.main()
    assert seen[1][0] == "memory-qlora-lean-eval8-jemalloc-h" and seen[1][2] == llm.CASES["memory-qlora-lean-eval8"][1]


def test_heap_probe_separates_what_a_run_uses_from_what_its_allocator_holds(tmp_path, chat_llama):
    """benchmarks/heap_probe.py on a tiny SFT run: peaks per phase (load, the training loop, after it), RSS and in-use
    memory at the end of every optimizer step, and under glibc what the allocator holds, which contains what is in use."""
    probe = load_benchmark("heap_probe")
    path = write_jsonl(tmp_path / "m.jsonl", messages_rows())
    recipe_for(tmp_path, chat_llama, path)  # writes tmp_path/recipe.yaml
    result = probe.main([str(tmp_path / "recipe.yaml"), "train.max_steps=3", "--out", str(tmp_path / "probe.json")])
    assert result["exit"] == 0 and json.loads((tmp_path / "probe.json").read_text()) == result
    assert set(result["peaks"]) == {"load", "train", "after"} and len(result["step_ends"]) == 3
    assert result["hwm"] > 0 and all(p["rss"] > 0 for p in result["peaks"].values())
    if probe.glibc_heap() is not None:
        assert all(0 < p["in_use"] <= p["held"] for p in result["peaks"].values())
        assert all(s["in_use"] > 0 for s in result["step_ends"])
    assert importlib.import_module("peftlab.train").loop.__name__ == "loop"  # the probe's wrapper is gone


def test_llm_report_keeps_generated_rows_with_the_result_and_never_drops_a_section_it_cannot_recompute(tmp_path, monkeypatch):
    """llm.py: a finished case's predictions-test.jsonl is copied next to its result (run folders are not kept), and the
    report reads that copy; a section whose per-row predictions exist nowhere is carried over from the previous report,
    marked once, instead of crashing or vanishing."""
    llm = load_benchmark("llm")
    monkeypatch.setattr(llm, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(llm, "OUT", tmp_path / "llm")
    monkeypatch.setattr(llm, "RESULTS", tmp_path)
    monkeypatch.setattr(llm, "samsum_rows", lambda: [])  # (needs the shared SAMSum test file; covered by the GSM8K rows)
    llm.OUT.mkdir()
    run = {"steps": 0, "train_examples": 0, "train_wall_s": 0.0, "metrics": {"test": {"answer_accuracy": 0.25, "answer_format": 0.5}}}
    (llm.OUT / "gsm8k-zero-shot.json").write_text(json.dumps({"run": run, "peak_rss_mib": 100.0}))
    (tmp_path / "llm.md").write_text("### GSM8K\n\n| setting | test rows |\n|---|---|\n| zero-shot | 250 |\n")
    llm.report()
    text = (tmp_path / "llm.md").read_text()
    assert "| zero-shot | 250 |" in text and text.count("Carried over") == 1 and "--cases gsm8k-zero-shot --fresh" in text
    llm.report()
    assert (tmp_path / "llm.md").read_text() == text  # marked once, not again on every report
    folder = llm.RUNS / "gsm8k-zero-shot"
    folder.mkdir(parents=True)
    (folder / "predictions-test.jsonl").write_text("".join(json.dumps({"row": i, "prediction": "4", "reference": "4"}) + "\n"
                                                           for i in range(3)))
    llm.keep_predictions("gsm8k-zero-shot")
    (folder / "predictions-test.jsonl").unlink()  # the run folder goes; the copy with the result stays
    assert len(llm.predictions("gsm8k-zero-shot")) == 3
    llm.report()
    text = (tmp_path / "llm.md").read_text()
    assert "Carried over" not in text and "| zero-shot | 3 | 25.00 | 50.00 | none | 100 |" in text


def test_gemm_peak_is_the_best_window_not_a_dip(monkeypatch):
    """The MFU denominator must not drop with a passing dip of a shared host: with the clock running 10x slower per
    matmul in the first windows than in the last ones, the peak is the rate of a fast window."""
    import torch

    common = load_benchmark("common")
    calls = {"n": 0, "t": 0.0}

    def clock():  # each call advances the clock: 0.1 s per call for the first 10 calls (a dip), then 0.01 s
        calls["n"] += 1
        calls["t"] += 0.1 if calls["n"] <= 10 else 0.01
        return calls["t"]

    monkeypatch.setattr(common.time, "perf_counter", clock)
    monkeypatch.setattr(torch, "randn", lambda *shape, dtype=None: torch.zeros(2, 2, dtype=dtype))  # no real GEMMs
    peak = common.gemm_peak(1, "fp32")
    flops = {"square_2048": 2 * 2048**3, "ffn_512x384x1536": 2 * 512 * 384 * 1536}
    for name, f in flops.items():  # 49 matmuls in each fast window of 0.51 s
        assert peak[name] == pytest.approx(f * 49 / 0.51 / 1e9, rel=0.01)
    assert peak["peak_gflops"] == max(peak["square_2048"], peak["ffn_512x384x1536"])


def test_a_stored_result_is_reused_only_for_the_settings_it_was_measured_with(tmp_path, capsys):
    """stored_case returned a stored result by its name alone: a case asked with other overrides (another lr, student,
    --set without --tag) silently reported the old numbers."""
    common = load_benchmark("common")
    stored = {"name": "c", "recipe": "/elsewhere/runs/mt/r.yaml", "overrides": ["train.lr=1e-4", "data.train.path=/elsewhere/runs/x/train.tsv"],
              "run": {"metrics": {}}, "process_wall_s": 1.0, "peak_rss_mib": 1.0}
    (tmp_path / "c.json").write_text(json.dumps(stored))
    kw = dict(runs=tmp_path / "runs", results=tmp_path, prefix="t")
    again = common.stored_case("c", f"{tmp_path}/runs/mt/r.yaml", ["train.lr=1e-4", f"data.train.path={tmp_path}/runs/x/train.tsv"], **kw)
    assert again == stored  # the same settings, from another checkout
    for recipe, overrides in (("other.yaml", stored["overrides"]), ("runs/mt/r.yaml", ["train.lr=5e-5", stored["overrides"][1]])):
        with pytest.raises(SystemExit, match=r"\[c\] the stored result .* was measured with other settings .*--fresh"):
            common.stored_case("c", recipe, overrides, **kw)
    with pytest.raises(SystemExit, match="env: stored {}"):
        common.stored_case("c", "runs/mt/r.yaml", stored["overrides"], env={"LD_PRELOAD": "x"}, **kw)
