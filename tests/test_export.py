"""Artifacts: self-describing output dirs, save -> reload equality, merge equality, idempotent merge, CLI eval."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace

import pytest
import torch

from peftlab import load_trained, merge, run
from peftlab.run import evaluate
from peftlab.rundir import read_run

from .conftest import REPO, logits


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert, sentiment_files):
    """One LoRA run shared by the tests of this module (they only read it, or copy it)."""
    from peftlab import load_recipe

    out = tmp_path_factory.mktemp("run") / "out"
    recipe = load_recipe(None, [f"model.name={tiny_bert}", f"data.train.path={sentiment_files['train']}",
                                f"data.eval.path={sentiment_files['dev']}", "data.label_names=[negative,positive]",
                                "adapter.r=4", "train.epochs=1", "train.lr=1e-2", f"output_dir={out}"])
    return recipe, run(recipe), out


def test_output_dir_describes_itself(trained):
    recipe, summary, out = trained
    for f in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "recipe.yaml", "run.json",
              "metrics.json", "eval_report.json", "log.jsonl"):
        assert (out / f).is_file(), f
    assert not list(out.glob(".staging*")) and not list(out.glob(".tmp-*"))
    r, run_json = read_run(out)
    assert r.to_dict() == recipe.to_dict()
    assert run_json["versions"]["peft"] and run_json["versions"]["torch"] and run_json["label_names"] == ["negative", "positive"]
    assert run_json["trainable_params"] == summary["trainable_params"]
    assert json.loads((out / "metrics.json").read_text()) == summary["metrics"]
    report = json.loads((out / "eval_report.json").read_text())
    assert set(report["per_class"]) == {"negative", "positive"} and report["n"] == 64
    # every split's report, the held-out test split's too (only the first split's was kept)
    assert report["splits"]["eval"] == {k: v for k, v in report.items() if k not in ("split", "splits")}
    assert set(report["splits"]) == set(summary["metrics"]) and all(r["confusion"] for r in report["splits"].values())


def test_loading_a_trained_classifier_says_nothing_of_a_new_head_and_peftlab_no_bitsandbytes_probe(trained, caplog):
    """The Python API printed what the CLI hides: transformers' load report 'classifier.weight | MISSING ... newly
    initialized ... Consider training' on load_trained/evaluate of a trained classifier (false: the adapter brings the
    head at once), and bitsandbytes' 'Failed to load CPU gemm_4bit_forward ... pip install kernels' when peft imports
    it (on CPUs with avx512_bf16). Quieted there only: transformers' verbosity is the caller's again afterwards."""
    import subprocess
    import sys

    import transformers

    _, summary, out = trained
    said: list[logging.LogRecord] = []
    listener = logging.Handler()
    listener.emit = said.append  # transformers' own logger does not propagate to caplog's
    before = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()  # what a Python caller has (a CLI test in this process sets error)
    logging.getLogger("transformers").addHandler(listener)
    try:
        with caplog.at_level("WARNING"):
            load_trained(out)
            assert evaluate(out)["accuracy"] == pytest.approx(summary["metrics"]["eval"]["accuracy"])
        reports = [r.getMessage() for r in said if "MISSING" in r.getMessage() or "newly initialized" in r.getMessage()]
        assert not reports, reports
        assert "not in the base nor in the adapter" not in caplog.text
        assert transformers.logging.get_verbosity() == transformers.logging.WARNING  # put back
    finally:
        logging.getLogger("transformers").removeHandler(listener)
        transformers.logging.set_verbosity(before)
    probe = subprocess.run([sys.executable, "-c", "import logging, peftlab, peft; "
                            "assert logging.getLogger('bitsandbytes.backends.cpu.ops').getEffectiveLevel() == logging.ERROR"],
                           capture_output=True, text=True, cwd=REPO, timeout=300)
    assert probe.returncode == 0 and "gemm_4bit_forward" not in probe.stderr and "pip install kernels" not in probe.stderr, probe.stderr


@pytest.mark.precision
def test_reload_gives_the_same_logits_and_metrics(trained):
    recipe, summary, out = trained
    model, *_ = load_trained(out)
    assert evaluate(out)["accuracy"] == pytest.approx(summary["metrics"]["eval"]["accuracy"])
    again, *_ = load_trained(out)
    torch.testing.assert_close(logits(model), logits(again), atol=0, rtol=0)


@pytest.mark.precision
def test_merge_equals_adapter_and_is_idempotent(trained):
    recipe, summary, out = trained
    adapter_model, *_ = load_trained(out)
    target = merge(out)
    assert target == out / "merged"
    merged_model, *_ = load_trained(target)
    assert not any("lora" in k for k, _ in merged_model.named_parameters())
    diff = (logits(adapter_model) - logits(merged_model)).abs().max().item()
    assert diff <= 1e-4, diff
    stamp = (target / "model.safetensors").stat().st_mtime_ns
    assert merge(out) == target  # idempotent: the same adapter is not merged twice
    assert (target / "model.safetensors").stat().st_mtime_ns == stamp
    assert evaluate(target)["accuracy"] == pytest.approx(summary["metrics"]["eval"]["accuracy"])


@pytest.mark.parametrize("method", ["lora", "ia3", "loha", "lokr", "vera", "oft"])
def test_an_mlm_run_with_any_layer_method_merges_its_trained_head(make_recipe, method):
    """The MLM head an mlm task trains whole (modules_to_save: cls.predictions.transform, dense + LayerNorm, not one
    Linear): peft's generic unload (every method but LoRA) gave it the wrapper's .weight, and the merge of a DAPT run
    with IA3, LoHa... failed with an AttributeError after training (export.merge=true, `peftlab merge`, model.from_run).
    The trained head is put in place first: the merged model holds it and computes the adapter model's logits."""
    recipe = make_recipe({"adapter.method": method, "task.type": "mlm", "data.label_names": None, "data.text_columns": "[sentence]",
                          "train.max_steps": 3, "train.lr": 2e-2, "train.precision": "fp32"})
    run(recipe)
    adapter_model, *_ = load_trained(recipe.out)
    trained = adapter_model.base_model.model.cls.predictions.transform.modules_to_save["default"].dense.weight.detach().clone()
    merged, *_ = load_trained(merge(recipe.out))
    assert not any("modules_to_save" in k or "base_layer" in k for k, _ in merged.named_parameters())
    torch.testing.assert_close(merged.cls.predictions.transform.dense.weight, trained, rtol=0, atol=0)
    diff = (logits(adapter_model) - logits(merged)).abs().max().item()
    assert diff <= 1e-5, diff


def test_a_bf16_run_merges_into_float32_weights(make_recipe):
    """model.dtype auto keeps a bf16 run's frozen base in bf16; the merge folds the adapter into float32 weights, where the
    update is not rounded away: the merged model computes what the adapter model computes in float32."""
    from safetensors import safe_open

    recipe = make_recipe({"train.precision": "bf16", "model.dtype": "auto", "train.max_steps": 8})
    run(recipe)
    target = merge(recipe.out)
    with safe_open(str(target / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    saved, record = read_run(recipe.out)
    from peftlab.export import rebuild

    adapter_fp32, _ = rebuild(recipe.out, saved, record, precision="fp32")
    merged, *_ = load_trained(target)
    assert (logits(adapter_fp32) - logits(merged)).abs().max().item() <= 1e-5


def test_full_finetuning_exports_a_standalone_model(make_recipe):
    recipe = make_recipe({"adapter.method": "full", "train.max_steps": 3, "export.merge": True})
    record = run(recipe)
    assert record.merged_dir is None and not (recipe.out / "merged").exists()  # the summary names no merged folder
    assert (recipe.out / "model.safetensors").is_file() and not (recipe.out / "adapter_config.json").exists()
    assert merge(recipe.out) == recipe.out  # nothing to merge
    from peftlab.publish.card import card_text

    card = card_text(recipe.out)
    assert "With transformers:" in card and "peft" not in card.split("## How to use")[1].split("With peftlab")[0]


def test_eval_on_a_run_that_is_not_there(tmp_path):
    from peftlab.errors import ArtifactError

    with pytest.raises(ArtifactError, match="does not exist"):
        evaluate(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    with pytest.raises(ArtifactError, match="not a finished peftlab run"):
        merge(tmp_path / "half")


@pytest.mark.precision
def test_eval_of_a_run_that_selected_on_a_holdout_of_train(make_recipe, sentiment_files, tmp_path):
    """`data.eval: null` + `data.eval_holdout`: `peftlab eval RUN` scores the same seeded part of train the run selected on."""
    from peftlab.errors import DataError

    train = tmp_path / "train.tsv"
    train.write_bytes(sentiment_files["train"].read_bytes())
    recipe = make_recipe({"data.train": str(train), "data.eval": None, "data.eval_holdout": 0.25, "train.max_steps": 4})
    summary = run(recipe)
    # the record returned is run.json's (it lacked the versions, hardware and weights checksum the file has)
    assert summary.weights_sha256 and summary == replace(read_run(recipe.out)[1], merged_dir=summary.merged_dir)
    assert evaluate(recipe.out)["accuracy"] == pytest.approx(summary["metrics"]["eval"]["accuracy"])
    assert json.loads((recipe.out / "eval-eval.json").read_text())["report"]["n"] == 64  # a quarter of the 256 train rows
    from peftlab.publish.card import card_text

    card = card_text(recipe.out)  # the hold-out is named as what it is, and the report says which split it covers
    assert "| eval | local file train.tsv (25% held out of train) |" in card and "(None)" not in card, card
    assert "on the 64 rows of the eval split are in `eval_report.json`" in card
    train.unlink()  # the hold-out cannot be rebuilt: the error names the file
    with pytest.raises(DataError, match="data.train"):
        evaluate(recipe.out)


def test_the_card_names_a_sampled_split_as_a_sample():
    """data.SPLIT.max_samples: the card's split says it is a seeded sample of N rows, not the whole split."""
    from peftlab import load_recipe
    from peftlab.publish.card import dataset_of

    recipe = load_recipe(REPO / "recipes" / "minilm" / "sst2-lora.yaml", ["data.test.max_samples=200"], validate_files=False)
    assert dataset_of(recipe, "test")[2] == "validation (a seeded sample of 200 rows)"
    assert dataset_of(recipe, "train")[2] == "train"


@pytest.mark.parametrize("recipe, split, expected", [
    ("minilm/amazon-sentiment-lora.yaml", "train", (None, "Amazon multi-domain sentiment (Blitzer et al. 2007)")),
    ("minilm/emotion-lora.yaml", "test", ("dair-ai/emotion", "emotion")),
    ("smollm2-135m/gsm8k-sft-lora.yaml", "test", ("openai/gsm8k", "GSM8K"))])
def test_the_card_names_every_shipped_dataset_published_or_not(recipe, split, expected):
    """Amazon reviews (amazon_mdsd/labelled/books.jsonl) were the dataset 'labelled'; emotion, GSM8K, DialogSum and MRPC
    had no Hub id. The published recipe keeps the path from the dataset's folder on, so its card says the same."""
    from peftlab import load_recipe
    from peftlab.publish.card import dataset_of, public_path

    r = load_recipe(REPO / "recipes" / recipe, validate_files=False)
    assert dataset_of(r, split)[:2] == expected
    getattr(r.data, split).path = public_path(getattr(r.data, split).path)
    assert dataset_of(r, split)[:2] == expected
    assert public_path("/home/me/data/amazon_mdsd/labelled/books.jsonl") == "amazon_mdsd/labelled/books.jsonl"
    assert public_path("/home/me/mine/dev.tsv") == "dev.tsv"


def test_the_card_names_other_local_data_by_its_file_name(make_recipe):
    """Data outside a known dataset was named by its file's stem, as if a dataset of that name: `dev (validation)`."""
    from peftlab.publish.card import dataset_of, public_path

    recipe = make_recipe()
    assert dataset_of(recipe, "eval")[:2] == (None, "local file dev.tsv")
    recipe.data.eval.path = public_path(recipe.data.eval.path)
    assert dataset_of(recipe, "eval") == (None, "local file dev.tsv", "validation")


def test_an_earlier_runs_figures_say_which_split_chose_its_weights():
    """Lineage steps and distillation teachers quote every split of the earlier run, each said for what it is."""
    from peftlab.publish.card import source_scores

    entry = {"metrics": {"eval": {"accuracy": 0.53125}, "test": {"accuracy": 0.4375}}, "selected_on": "eval"}
    assert source_scores(entry) == "eval (selection split) accuracy 0.5312; test (held out) accuracy 0.4375"
    assert source_scores({"metrics": {"eval": {"accuracy": 0.5}}, "selected_on": None}) == "eval accuracy 0.5000"
    assert source_scores({"metrics": {"accuracy": 0.5}}) == "eval accuracy 0.5000"  # a record written before stop 56
    assert source_scores({}) == ""


def test_two_merges_of_one_run_at_once_take_turns(trained, tmp_path, monkeypatch):
    """Two `peftlab merge --force` of one run (or trainings from one model.from_run) at once: each removed the other's
    staging folder and both crashed. They take turns now; the second, without --force, finds the run merged."""
    import sys
    import threading

    export_module = sys.modules["peftlab.export"]
    _, _, source = trained
    out = tmp_path / "run"
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("merged"))
    inside, fill = [], export_module.write_atomic_dir

    def slow(final, fn, **kw):  # two merges inside at once would both be in here before either leaves
        inside.append(1)
        threading.Event().wait(0.5)
        assert len(inside) == 1, "two merges wrote at once"
        try:
            return fill(final, fn, **kw)
        finally:
            inside.pop()

    monkeypatch.setattr(export_module, "write_atomic_dir", slow)
    results, errors = [], []

    def one(force):
        try:
            results.append(merge(out, force=force))
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=one, args=(f,)) for f in (True, True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [out / "merged"] * 2, errors
    assert load_trained(out / "merged")[0] is not None and not list(out.glob(".tmp-*"))


def test_a_swap_killed_midway_is_recovered_by_the_next_write(tmp_path):
    """A kill after `final -> .old-NAME` left that folder, and every later replace of the target failed on it ('Directory
    not empty'); a kill between the two renames hid the previous result in it. The next write recovers both."""
    from peftlab.export import write_atomic_dir

    final, old = tmp_path / "merged", tmp_path / ".old-merged"

    def fill(text):
        return lambda d: (d / "w.txt").write_text(text)

    write_atomic_dir(final, fill("one"))
    old.mkdir()
    (old / "w.txt").write_text("stale")  # killed after the swap, before the clean-up
    write_atomic_dir(final, fill("two"))
    assert (final / "w.txt").read_text() == "two" and not old.exists()
    final.rename(old)  # killed between the renames: the previous result only in .old-merged
    with pytest.raises(RuntimeError):
        write_atomic_dir(final, lambda d: (_ for _ in ()).throw(RuntimeError("fill failed")))
    assert (final / "w.txt").read_text() == "two" and not old.exists()  # put back before the (failed) write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_merging_again_refuses_to_delete_files_a_merge_does_not_write(make_recipe, tmp_path):
    """merge --force replaced OUT/merged whole: what `peftlab eval OUT/merged` had written there (eval-test.json, its
    predictions) and a user's notes were deleted, silently. Refused before any work now; the merge's own files go."""
    from peftlab.errors import ArtifactError

    recipe = make_recipe({"train.max_steps": 2, "train.precision": "fp32", "output_dir": tmp_path / "o"})
    run(recipe)
    merged = merge(recipe.out)
    before = {p.name: p.read_bytes() for p in merged.iterdir()}
    (merged / "eval-test.json").write_text("{}")
    (merged / "NOTES.md").write_text("mine")
    with pytest.raises(ArtifactError, match=r"holds files a merge does not write \(NOTES.md, eval-test.json: .*Move them out"):
        merge(recipe.out, force=True)
    assert (merged / "NOTES.md").read_text() == "mine" and (merged / "eval-test.json").is_file()
    (merged / "NOTES.md").unlink()
    (merged / "eval-test.json").unlink()
    assert merge(recipe.out, force=True) == merged and sorted(p.name for p in merged.iterdir()) == sorted(before)


def test_merging_again_refuses_to_delete_folders_a_merge_does_not_write(make_recipe, tmp_path):
    """Only stray files were refused: a folder in OUT/merged (merged/notes/todo.txt) went with the old merge, silently.
    A merge writes no folder: any is refused; a GGUF copy (merge --gguf) and a killed export's temporary file are its own."""
    from peftlab.errors import ArtifactError

    recipe = make_recipe({"train.max_steps": 2, "train.precision": "fp32", "output_dir": tmp_path / "o"})
    run(recipe)
    merged = merge(recipe.out)
    (merged / "notes").mkdir()
    (merged / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(ArtifactError, match=r"holds files a merge does not write \(notes/: .*Move them out"):
        merge(recipe.out, force=True)
    assert (merged / "notes" / "todo.txt").read_text() == "mine"
    shutil.rmtree(merged / "notes")
    (merged / "model-f16.gguf").write_bytes(b"GGUF")
    (merged / ".model-f16.gguf.999999.tmp").write_bytes(b"GGUF")
    assert merge(recipe.out, force=True) == merged and not list(merged.glob("*gguf*"))


def test_a_file_named_merged_is_refused_before_any_work(make_recipe, tmp_path, monkeypatch):
    """OUT/merged a file: the first merge moved it to the hidden OUT/.old-merged (silently), and every later write of
    merged/ crashed there ('Not a directory' in rmtree). Both refused before the work, with what to do."""
    import sys

    from peftlab.errors import ArtifactError
    from peftlab.export import write_atomic_dir

    recipe = make_recipe({"train.max_steps": 1, "train.precision": "fp32", "output_dir": tmp_path / "o"})
    run(recipe)
    target, old = recipe.out / "merged", recipe.out / ".old-merged"
    target.write_text("mine")
    monkeypatch.setattr(sys.modules["peftlab.export"], "rebuild", lambda *a, **k: pytest.fail("merged before the check"))
    with pytest.raises(ArtifactError, match=r"merged is a file: the merged model goes into a folder of that name\. Move it out"):
        merge(recipe.out)
    assert target.read_text() == "mine" and not old.exists()
    target.rename(old)  # what the first merge of an earlier version left: the file hidden, a merged/ folder beside it
    target.mkdir()
    with pytest.raises(ArtifactError, match=r"\.old-merged is a file, not what an interrupted write .* mv "):
        merge(recipe.out, force=True)
    with pytest.raises(ArtifactError, match=r"\.old-merged is a file"):
        write_atomic_dir(target, lambda d: None)
    assert old.read_text() == "mine"
    monkeypatch.undo()
    old.rename(recipe.out / "mine.txt")  # as the message says
    assert merge(recipe.out, force=True) == target and (target / "merge.json").is_file() and not old.exists()


def test_a_merged_folder_whose_weights_are_gone_or_damaged_is_merged_again(make_recipe, tmp_path, caplog):
    """merge said 'already merged from this adapter; nothing to do' from merge.json alone: merged/model.safetensors
    deleted or truncated stayed so. The weights are checked against merged/run.json's sha256, and merged again."""
    import logging

    recipe = make_recipe({"train.max_steps": 2, "train.precision": "fp32", "output_dir": tmp_path / "o"})
    run(recipe)
    target = merge(recipe.out)
    weights = target / "model.safetensors"
    whole = weights.read_bytes()
    expected = logits(load_trained(target)[0])
    caplog.set_level(logging.INFO, logger="peftlab.export")
    stale = recipe.out / ".tmp-merged"  # a merge killed mid-write (kill -9) left it: removed, though nothing is merged
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    assert merge(recipe.out) == target and "nothing to do" in caplog.text  # intact: left as it is
    assert not stale.exists()
    for damage, said in [(lambda: weights.unlink(), "its model.safetensors is missing"),
                         (lambda: weights.write_bytes(whole[:len(whole) // 2]), "differs from the sha256"),
                         (lambda: (target / "merge.json").write_text("{"), "")]:
        damage()
        caplog.clear()
        assert merge(recipe.out) == target and said in caplog.text and "nothing to do" not in caplog.text, caplog.text
        assert weights.read_bytes() == whole
        torch.testing.assert_close(logits(load_trained(target)[0]), expected, rtol=0, atol=0)


def test_a_run_whose_base_is_a_relative_path_says_so_when_read_from_elsewhere(make_recipe, tiny_bert, tmp_path, monkeypatch, capsys):
    """A recipe naming its base by a relative path (../shared/models/...) trains from its folder; `eval`/`merge` from
    another one said only 'no such model directory'."""
    from peftlab.cli import main

    monkeypatch.chdir(tiny_bert.parent)
    recipe = make_recipe({"train.max_steps": 1}, model=f"../{tiny_bert.parent.name}/{tiny_bert.name}")  # as ../shared/models/X
    run(recipe)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["eval", str(recipe.out)]) == 2
    err = capsys.readouterr().err
    assert "relative to the folder it was trained from" in err and str(elsewhere) in err, err


def test_export_of_a_record_with_only_a_name_writes_a_run_eval_reads(make_recipe, tmp_path):
    """The building blocks' export(...) with a minimal record (README) wrote label_names [], method and task null:
    `peftlab eval` of the folder then failed with an IndexError."""
    from peftlab import build_data, build_model, export, load_splits
    from peftlab.accel import make_accelerator
    from peftlab.train import train

    recipe = make_recipe({"train.max_steps": 1, "train.precision": "fp32"})
    splits, names = load_splits(recipe)
    model, tok, _ = build_model(recipe, num_labels=len(names), label_names=names)
    data = build_data(recipe, tok, splits=splits, label_names=names)
    model, state = train(recipe, model, data, make_accelerator(recipe, "fp32"), recipe.out)
    export(recipe.out, model, tok, recipe, {"name": recipe.name, "steps": state.step}, {"eval": {}})
    written = read_run(recipe.out)[1]
    assert (written.method, written.task, written.label_names) == ("lora", "classification", ["negative", "positive"])
    assert 0 <= evaluate(recipe.out)["accuracy"] <= 1


def test_export_refuses_a_folder_that_holds_a_run(trained, tmp_path):
    """export(...) into a finished run's folder wrote a full model beside the old adapter_config.json, among the old
    run's predictions and log: load_trained then loaded the old adapter, silently. Refused, nothing written."""
    from peftlab import build_model
    from peftlab.errors import ArtifactError
    from peftlab.export import export

    recipe, summary, out = trained
    before = sorted(p.name for p in out.iterdir())
    full = replace(recipe, adapter=replace(recipe.adapter, method="full", target_modules=None))
    model, tok, _ = build_model(full, num_labels=2, label_names=["negative", "positive"])
    with pytest.raises(ArtifactError, match=r"already holds a run \(its run.json\).*Export into a new folder.*--overwrite"):
        export(out, model, tok, full, {"name": "full"}, {"eval": {}})
    assert sorted(p.name for p in out.iterdir()) == before and not (out / "model.safetensors").exists()
    export(tmp_path / "new", model, tok, full, {"name": "full"}, {"eval": {}})  # a new folder: written
    assert type(load_trained(tmp_path / "new")[0]).__name__ == type(model).__name__
