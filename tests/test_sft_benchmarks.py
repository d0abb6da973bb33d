"""benchmarks/sft_throughput.py and generation.py: what makes their comparisons fair (the runs are the benchmark)."""

from __future__ import annotations

import json

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
    assert bench.real_tokens([conv], tok) == len(full)


def test_sft_throughput_report_pairs_each_side_with_peftlab_by_rows_and_seed(tmp_path, monkeypatch):
    bench = load_benchmark("sft_throughput")
    monkeypatch.setattr(bench, "OUT", tmp_path / "runs")
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    bench.OUT.mkdir()
    for side, seed, tps in (("peftlab", 0, 300.0), ("trl", 0, 100.0), ("trl-packed", 0, 250.0), ("peftlab", 1, 200.0),
                            ("trl", 1, 200.0), ("peftlab-torch-dropout", 1, 160.0)):
        (bench.OUT / f"{side}-{seed}.json").write_text(json.dumps(
            {"side": side, "seed": seed, "rows": 8, "steps": 2, "tokens_per_s": tps, "answer_loss": 2.0, "peak_rss_mib": 1.0}))
    text = bench.report()
    ratios = {(line.split(" | ")[0][2:], line.split(" | ")[2]): line.split(" | ")[5] for line in text.splitlines()[2:]}
    assert ratios == {("peftlab", "0"): "1.00x", ("trl", "0"): "3.00x", ("trl-packed", "0"): "1.20x", ("peftlab", "1"): "1.00x",
                      ("trl", "1"): "1.00x", ("peftlab-torch-dropout", "1"): "1.25x"}
    assert [line.split(" | ")[0][2:] for line in text.splitlines()[5:]] == ["peftlab", "peftlab-torch-dropout", "trl"]  # ablation beside peftlab
    assert (tmp_path / "sft_throughput.md").read_text().strip() == text


def test_a_stored_benchmark_case_is_reused_and_a_failed_rerun_keeps_it(tmp_path, monkeypatch):
    """benchmarks.common.stored_case (llm.py, multitask.py, domain_adaptation.py): a finished case is read back without
    a process; `fresh` measures it again, and a rerun that fails leaves the stored result as it was."""
    common = load_benchmark("common")
    calls = []

    def process(name, recipe, overrides, out, *, verbose=False):
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
    """generation.py on a tiny finished SFT run: four sides on the same test rows; in fp32 the folded adapter
    (`peftlab eval`'s default) writes exactly the answers of the unfolded one, and left padding those of peftlab."""
    from peftlab import run

    bench = load_benchmark("generation")
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "results")
    path = write_jsonl(tmp_path / "m.jsonl", messages_rows())
    recipe = recipe_for(tmp_path, chat_llama, path, ["train.max_steps=20", f"data.test={path}"])
    run(recipe)
    monkeypatch.setattr("sys.argv", ["generation.py", "--run", str(recipe.out), "--rows", "6", "--batch", "4", "--name", "g"])
    bench.main()
    results = {r["side"]: r for r in json.loads((tmp_path / "results" / "g.json").read_text())["results"]}
    assert list(results) == ["peftlab", "peftlab, adapter unfolded", "plain-left", "plain"]
    assert all(r["rows"] == 6 and r["seconds"] > 0 for r in results.values())
    folded, unfolded, left = results["peftlab"], results["peftlab, adapter unfolded"], results["plain-left"]
    assert folded["new_tokens"] == unfolded["new_tokens"] == left["new_tokens"] and folded["rougeL"] == unfolded["rougeL"]
