"""Multi-task classification (task.type: multitask): the recipe, the task sampler, sentence pairs, and a run whose per-task
exports reload (load_trained, peftlab eval, load_adapters) to the model that was trained."""

from __future__ import annotations

import json
import logging
import random
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from peftlab import load_recipe, load_trained, run
from peftlab.adapters import load_adapters
from peftlab.compose import compose
from peftlab.errors import ArtifactError, ConfigError
from peftlab.export import merge
from peftlab.publish.card import card_text
from peftlab.rundir import read_run
from peftlab.tasks.multitask import TaskBlockSampler, block_counts, task_probabilities

from .conftest import logits, minilm_tokenizer, synthetic_rows, write_tsv

TOPICS = ["sport", "money", "war"]


@pytest.fixture(scope="module")
def task_files(tmp_path_factory) -> dict[str, Path]:
    """Three learnable tasks: sentiment (2 labels), topic (3 labels, named), a sentence pair (same animal or not)."""
    d = tmp_path_factory.mktemp("multitask")
    rng = random.Random(3)
    topic = [(f"{rng.choice(['the', 'a', 'news'])} {t} {rng.choice(['today', 'now', 'again'])}", t)
             for _ in range(40) for t in TOPICS]
    rng.shuffle(topic)
    pairs = [(f"the {a}\tthe {a if y else 'other'}", y) for a in ("cat", "dog", "bird") for _ in range(20) for y in (0, 1)]
    rng.shuffle(pairs)
    pair_file = lambda rows, name: (d / name).write_text(  # noqa: E731
        "s1\ts2\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows), encoding="utf-8") and d / name
    return {"senti_train": write_tsv(d / "senti_train.tsv", synthetic_rows(160, 1)),
            "senti_dev": write_tsv(d / "senti_dev.tsv", synthetic_rows(40, 2)),
            "topic_train": write_tsv(d / "topic_train.tsv", topic[:90]), "topic_dev": write_tsv(d / "topic_dev.tsv", topic[90:]),
            "pair_train": pair_file(pairs[:90], "pair_train.tsv"), "pair_dev": pair_file(pairs[90:], "pair_dev.tsv")}


def tree(files, out: Path, model: Path, **multitask) -> dict:
    return {
        "name": "mt", "output_dir": str(out), "model": {"name": str(model)},
        "adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
        "task": {"type": "multitask"}, "data": {"max_length": 32},
        "multitask": {"sampling": "uniform", **multitask, "tasks": {
            "senti": {"data": {"train": str(files["senti_train"]), "eval": str(files["senti_dev"]),
                               "label_names": ["negative", "positive"]}},
            "topic": {"data": {"train": str(files["topic_train"]), "eval": str(files["topic_dev"]), "test": str(files["topic_dev"]),
                               "label_names": TOPICS}},
            "pair": {"data": {"train": str(files["pair_train"]), "eval": str(files["pair_dev"]), "text_columns": ["s1", "s2"],
                              "text_pair": True, "label_names": ["different", "same"]}, "metric": "f1"}}},
        "train": {"max_steps": 120, "batch_size": 8, "lr": 1e-2, "log_every": 10, "warmup_fraction": 0.0, "precision": "fp32",
                  "report_to": "none"},
        "eval": {"batch_size": 16},
    }


def recipe_of(tmp_path, t: dict, overrides=()):
    path = tmp_path / f"recipe-{len(list(tmp_path.glob('recipe-*')))}.yaml"
    path.write_text(yaml.safe_dump(t))
    return load_recipe(path, list(overrides))


# ------------------------------------------------------------------------------------------------- the recipe

def test_tasks_inherit_the_shared_data_keys_and_take_dotted_overrides(task_files, tmp_path, tiny_bert):
    r = recipe_of(tmp_path, tree(task_files, tmp_path / "o", tiny_bert), ["multitask.tasks.topic.data.max_length=16",
                                                                          "multitask.tasks.senti.data.train.max_samples=50",
                                                                          "data.seed=7", "multitask.tasks.pair.data.seed=8"])
    tasks = r.multitask.tasks
    assert set(tasks) == {"senti", "topic", "pair"}
    assert tasks["senti"].data.max_length == 32 and tasks["topic"].data.max_length == 16  # inherited / its own
    assert tasks["senti"].data.train.max_samples == 50 and tasks["pair"].metric == "f1"
    assert (tasks["senti"].data.seed, tasks["pair"].data.seed) == (7, 8)  # the rows' seed too
    assert r.train.best_metric == "mean"
    dropped = recipe_of(tmp_path, tree(task_files, tmp_path / "o", tiny_bert), ["multitask.tasks.pair=null"])
    assert set(dropped.multitask.tasks) == {"senti", "topic"}  # null leaves a task out
    # a misspelled task to drop was ignored: the run trained it (the no-emotion transfer source would hold emotion)
    with pytest.raises(ConfigError, match="multitask.tasks.pairr=null: there is no 'pairr' in multitask.tasks to drop; it has pair, senti, topic"):
        recipe_of(tmp_path, tree(task_files, tmp_path / "o", tiny_bert), ["multitask.tasks.pairr=null"])
    (tmp_path / "resolved.yaml").write_text(r.to_yaml())  # the resolved recipe a run writes reads back the same
    assert load_recipe(tmp_path / "resolved.yaml").multitask == r.multitask


def test_a_python_edit_of_the_shared_data_reaches_the_tasks_as_an_override_does(task_files, tmp_path, tiny_bert):
    """`r.data.max_length = 12` on a loaded multi-task recipe, then run(r): the check run makes (config.checked) did not
    inherit the tasks' data again, so every task kept 32 while the run's recipe.yaml said 12. The same steps as a file
    now: a task's own key (set in the file, or changed on the task in Python) stays its own."""
    from dataclasses import asdict

    from peftlab.config import DataConfig, MultiTaskConfig, Recipe, SubTaskConfig, TaskConfig, checked

    r = recipe_of(tmp_path, tree(task_files, tmp_path / "o", tiny_bert), ["multitask.tasks.topic.data.max_length=16"])
    r.data.max_length, r.data.seed = 12, 5
    r.multitask.tasks["pair"].data.seed = 9  # changed on the task itself: its own
    c = checked(r)
    assert c.to_dict() == recipe_of(tmp_path, tree(task_files, tmp_path / "o", tiny_bert), [
        "multitask.tasks.topic.data.max_length=16", "data.max_length=12", "data.seed=5",
        "multitask.tasks.pair.data.seed=9"]).to_dict()
    assert [c.multitask.tasks[n].data.max_length for n in ("senti", "topic", "pair")] == [12, 16, 12]
    c.data.max_length = 20  # the checked copy inherits the same way again
    assert checked(c).multitask.tasks["senti"].data.max_length == 20 and checked(c).multitask.tasks["topic"].data.max_length == 16
    # built in Python: a task's keys left at their defaults are inherited, as left out of a file
    files = {n: {k: str(task_files[f"{n}_{k}"]) for k in ("train", "dev")} for n in ("senti", "topic")}
    built = Recipe(model=replace(Recipe().model, name=str(tiny_bert)), task=TaskConfig(type="multitask"),
                   data=DataConfig(max_length=24),
                   multitask=MultiTaskConfig(tasks={n: SubTaskConfig(data=DataConfig(**{"train": f["train"], "eval": f["dev"]},
                                                                                     max_length=8 if n == "topic" else 128))
                                                    for n, f in files.items()}))
    built.multitask.tasks["topic"].data.label_names = TOPICS
    built.multitask.tasks["senti"].data.label_names = ["negative", "positive"]
    got = checked(built).multitask.tasks
    assert (got["senti"].data.max_length, got["topic"].data.max_length) == (24, 8)
    assert asdict(got["senti"].data)["train"]["path"] == files["senti"]["train"]


@pytest.mark.parametrize("change, message", [
    (lambda t: t["multitask"]["tasks"].pop("topic") and t["multitask"]["tasks"].pop("pair"), "needs >= 2"),
    (lambda t: t["multitask"]["tasks"].update({"a b": t["multitask"]["tasks"]["senti"]}), "a task name is letters"),
    # (YAML's `1:` is a number: it passed, then validate and train crashed with a TypeError joining it to a path)
    (lambda t: t["multitask"]["tasks"].update({1: t["multitask"]["tasks"]["senti"]}), r"multitask.tasks.1: a task name is text, "
                                                                                        r"but YAML reads 1 as a number: quote it \('1':"),
    (lambda t: t["adapter"].update(method="full"), "not supported. Use adapter.method=lora"),
    (lambda t: t["data"].update(train="x.tsv"), "are not read by a multi-task recipe"),
    (lambda t: t["task"].update(type="classification"), "set task.type=multitask"),
    (lambda t: t["train"].update(best_metric="senti/acc"), "NAME/accuracy"),
    (lambda t: t["multitask"]["tasks"]["topic"]["data"].pop("eval"), "evaluate during training but topic"),
    (lambda t: t["multitask"]["tasks"]["pair"]["data"].update(text_columns=["s1"]), "a pair is two columns"),
    (lambda t: t["multitask"]["tasks"]["senti"]["data"].update(train="missing.tsv"), "multitask.tasks.senti.data.train.path"),
    (lambda t: t["multitask"].update(temperature=0.5), "multitask.temperature=0.5"),
    # a task's label names were not checked: validate passed them, train refused them late naming data.label_names
    (lambda t: t["multitask"]["tasks"]["senti"]["data"].update(label_names=["a", "a"]),
     r"multitask.tasks.senti.data.label_names=\['a', 'a'\]: names must be distinct"),
    (lambda t: t["multitask"]["tasks"]["senti"]["data"].update(label_names=["a"]),
     r"multitask.tasks.senti.data.label_names=\['a'\]: a classifier needs >= 2 labels"),
])
def test_a_bad_multitask_recipe_names_the_problem(task_files, tmp_path, tiny_bert, change, message):
    t = tree(task_files, tmp_path / "o", tiny_bert)
    change(t)
    with pytest.raises(ConfigError, match=message):
        recipe_of(tmp_path, t)


def test_validate_of_a_bad_key_in_one_task_says_only_that(task_files, tmp_path, tiny_bert):
    """One task's misspelt key dropped every task (multitask.tasks was kept only without a problem), and a false
    'multitask.tasks names 0 task(s)' followed the real problem."""
    with pytest.raises(ConfigError) as e:
        recipe_of(tmp_path, tree(task_files, tmp_path / "o", tiny_bert), ["multitask.tasks.senti.data.max_lenght=64"])
    assert e.value.problems == ["multitask.tasks.senti.data.max_lenght: unknown key. Did you mean 'max_length'?"]
    # a misspelt key of the top-level data section was said once for it and once more for every task inheriting it
    with pytest.raises(ConfigError) as e:
        recipe_of(tmp_path, tree(task_files, tmp_path / "o", tiny_bert), ["data.max_lenght=64"])
    assert e.value.problems == ["data.max_lenght: unknown key. Did you mean 'max_length'?"]


def test_eval_every_without_any_tasks_evaluation_split_is_warned_about(task_files, tmp_path, tiny_bert, caplog):
    """Single-task recipes warn that train.eval_every evaluates nothing without an evaluation split; a multi-task one
    whose tasks had none took it silently."""
    from peftlab.run import preflight

    t = tree(task_files, tmp_path / "o", tiny_bert)
    for task in t["multitask"]["tasks"].values():
        task["data"].pop("eval")
    with caplog.at_level(logging.WARNING):
        preflight(recipe_of(tmp_path, t, ["train.eval_every=3"]))
    assert ("train.eval_every=3 but there is no evaluation split: nothing is evaluated during training (nor kept by "
            "train.keep_best). Give one (multitask.tasks.NAME.data.eval.path=FILE, or multitask.tasks.NAME.data.eval_holdout=0.1") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        preflight(recipe_of(tmp_path, tree(task_files, tmp_path / "o", tiny_bert), ["train.eval_every=3"]))
    assert "no evaluation split" not in caplog.text


def test_validate_reads_each_tasks_columns_and_names_the_task(task_files, tmp_path, tiny_bert):
    from peftlab.data import column_problems

    r = recipe_of(tmp_path, tree(task_files, tmp_path / "o", tiny_bert), ["multitask.tasks.pair.data.text_columns=[s1,s3]"])
    assert column_problems(r) == [f"multitask.tasks.pair.data.{split}: column(s) ['s3'] not found; the data has ['s1', 's2', "
                                  "'label']. If the file has no header row, name its columns with column_names: [...]. Set "
                                  "multitask.tasks.pair.data.text_columns / multitask.tasks.pair.data.label_column / "
                                  "multitask.tasks.pair.data.target_column (or per split) to the right names." for split in ("train", "eval")]
    assert column_problems(recipe_of(tmp_path, tree(task_files, tmp_path / "o", tiny_bert))) == []


def test_a_tasks_input_length_is_checked_by_validate_and_named_by_the_tasks_keys(task_files, tmp_path, tiny_bert):
    """validate skipped the position-table check of a multi-task recipe (and said ok); train's error named data.max_length,
    which the recipe had at 32, not the task's own key."""
    from peftlab.errors import ModelError
    from peftlab.model import model_problems
    from peftlab.tasks.multitask import build_model

    r = recipe_of(tmp_path, tree(task_files, tmp_path / "o", tiny_bert), ["multitask.tasks.topic.data.max_length=512"])
    message = r"multitask.tasks.topic.data.max_length=512 exceeds the 128 positions .* Set multitask.tasks.topic.data.max_length so"
    assert len(problems := model_problems(r)) == 1 and re.search(message, problems[0]), problems
    with pytest.raises(ModelError, match=message):
        build_model(r, label_names={"senti": ["negative", "positive"], "topic": TOPICS, "pair": ["different", "same"]},
                    precision="fp32")
    assert model_problems(recipe_of(tmp_path, tree(task_files, tmp_path / "o", tiny_bert))) == []
    # the first task's too (its model is built first: the error named data.max_length, a key the recipe had at 32)
    r = recipe_of(tmp_path, tree(task_files, tmp_path / "o", tiny_bert), ["multitask.tasks.senti.data.max_length=512"])
    with pytest.raises(ModelError, match=r"multitask.tasks.senti.data.max_length=512 exceeds"):
        build_model(r, label_names={"senti": ["negative", "positive"], "topic": TOPICS, "pair": ["different", "same"]},
                    precision="fp32")


def test_early_stopping_needs_the_tasks_evaluation_splits(task_files, tmp_path, tiny_bert):
    """No task with an evaluation split: validate said ok to train.early_stopping, and the run trained every step with
    nothing watched."""
    from peftlab.errors import ConfigError

    t = tree(task_files, tmp_path / "o", tiny_bert)
    t["train"].update(eval_every=10, early_stopping=2)
    recipe_of(tmp_path, t)  # (every task evaluated)
    for task in t["multitask"]["tasks"].values():
        task["data"].pop("eval")
    with pytest.raises(ConfigError, match=r"train.early_stopping=2 needs an evaluation split to watch.*multitask.tasks.NAME.data.eval.path"):
        recipe_of(tmp_path, t)


def test_validate_checks_the_shared_adapter_on_the_base(task_files, tmp_path, tiny_bert):
    """validate said ok to a multi-task recipe whose adapter.target_modules matched no layer, or whose adapter.r was above
    any layer's rank: `train` refused it after reading every task's data. Its model is checked as the first task's."""
    from peftlab.model import model_problems

    r = recipe_of(tmp_path, tree(task_files, tmp_path / "o", tiny_bert), ["adapter.target_modules=[nope]"])
    assert [p for p in model_problems(r) if re.search(r"adapter.target_modules: 'nope' matches no module of BertForSequence", p)], model_problems(r)
    r = recipe_of(tmp_path, tree(task_files, tmp_path / "o", tiny_bert), ["adapter.r=5000"])
    assert [p for p in model_problems(r) if re.search(r"adapter.r=5000: above the largest rank .* Set adapter.r <= \d+", p)], model_problems(r)


def test_a_tasks_data_error_names_the_tasks_keys(task_files, tmp_path, tiny_bert, caplog):
    """'Fix data.label_names' pointed at a key a multi-task recipe does not read for its tasks."""
    from peftlab import load_splits
    from peftlab.errors import DataError

    r = recipe_of(tmp_path, tree(task_files, tmp_path / "o", tiny_bert), ["multitask.tasks.topic.data.label_names=[a,b]"])
    with pytest.raises(DataError) as e:
        load_splits(r)
    assert "multitask.tasks.topic.data.train:" in str(e.value) and "multitask.tasks.topic.data.label_names" in str(e.value)
    assert " data.label_names" not in str(e.value)
    # the warnings too: a class no training row of the task has
    r = recipe_of(tmp_path, tree(task_files, tmp_path / "o", tiny_bert), [f"multitask.tasks.topic.data.label_names=[{','.join(TOPICS)},extra]"])
    with caplog.at_level("WARNING", logger="peftlab"):
        load_splits(r)
    assert "multitask.tasks.topic.data.train has no row of class(es) ['extra']" in caplog.text


# ---------------------------------------------------------------------------------------------------- sampling

def test_task_probabilities():
    assert task_probabilities([100, 300], "proportional", 2.0) == pytest.approx([0.25, 0.75])
    assert task_probabilities([100, 300], "uniform", 2.0) == pytest.approx([0.5, 0.5])
    assert task_probabilities([100, 400], "temperature", 2.0) == pytest.approx([10 / 30, 20 / 30])  # sqrt: 10 : 20
    assert sum(block_counts([0.2, 0.3, 0.5], 7)) == 7 and block_counts([0.5, 0.5], 10) == [5, 5]
    # a task whose share rounds to no block still gets one (5 rows beside 1,030 at block 16: it was never trained)
    assert block_counts(task_probabilities([1000, 30, 5], "proportional", 1.0), 66) == [63, 2, 1]


@pytest.mark.parametrize("sampling", ["proportional", "uniform", "temperature"])
def test_every_block_is_one_task_and_the_shares_hold(sampling):
    sizes, block = [40, 200, 7], 8
    tasks = [k for k, n in enumerate(sizes) for _ in range(n)]
    random.Random(0).shuffle(tasks)
    lengths = [random.Random(i).randint(3, 30) for i in range(len(tasks))]
    probs = task_probabilities(sizes, sampling, 3.0)
    sampler = TaskBlockSampler(tasks, lengths, probs, block, seed=5)
    order = list(sampler)
    assert len(order) == len(sampler) == sampler.blocks * block and sampler.blocks == 5 + 25 + 1
    blocks = [order[i:i + block] for i in range(0, len(order), block)]
    assert all(len({tasks[i] for i in b}) == 1 for b in blocks)  # one task per batch
    per_task = Counter(tasks[b[0]] for b in blocks)
    assert [per_task[k] for k in range(3)] == block_counts(probs, sampler.blocks)  # the shares, exactly
    for k, n in enumerate(sizes):  # a task with at least one pass's blocks sees all its rows
        seen = {i for b in blocks if tasks[b[0]] == k for i in b}
        if per_task[k] * block >= n:
            assert seen == {i for i, t in enumerate(tasks) if t == k}
    assert list(TaskBlockSampler(tasks, lengths, probs, block, seed=5)) == order  # seeded
    sampler.set_epoch(1)
    assert list(sampler) != order


def test_group_by_length_false_shuffles_each_tasks_rows_without_grouping(task_files, tmp_path, tiny_bert):
    """train.group_by_length=false (plain shuffling) was ignored by the multi-task sampler: the order was length-grouped."""
    from peftlab.tasks import multitask

    recipe = recipe_of(tmp_path, tree(task_files, tmp_path / "o", tiny_bert), ["train.group_by_length=false"])
    splits, labels = multitask.load_splits(recipe)
    data = multitask.build_data(recipe, minilm_tokenizer(), splits, labels)
    plain = list(data.train_sampler(recipe.train, 1))
    grouped = list(data.train_sampler(replace(recipe.train, group_by_length=True), 1))
    tasks, lengths = data.train["task"], data.train["length"]
    assert plain != grouped and Counter(tasks[i] for i in plain) == Counter(tasks[i] for i in grouped)  # the same shares
    blocks = lambda order: [order[i:i + 8] for i in range(0, len(order), 8)]  # noqa: E731
    assert all(len({tasks[i] for i in b}) == 1 for b in blocks(plain))  # still one task per batch
    spread = lambda order: sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in blocks(order))  # noqa: E731
    assert 3 * spread(grouped) < spread(plain)  # grouped: each batch of near-equal lengths


# -------------------------------------------------------------------------------------------- sentence pairs

def test_a_sentence_pair_is_encoded_as_a_pair_not_joined(task_files, tmp_path, tiny_bert):
    from peftlab.data import build_data

    r = recipe_of(tmp_path, tree(task_files, tmp_path / "o", tiny_bert))
    from peftlab.tasks.multitask import subrecipe

    sub = subrecipe(r, "pair")
    data = build_data(sub, minilm_tokenizer())
    row = data.train[0]
    tok = minilm_tokenizer()
    sep = tok.sep_token_id
    assert row["input_ids"].count(sep) == 2 and row["input_ids"][0] == tok.cls_token_id
    second = row["input_ids"].index(sep) + 1
    assert set(row["token_type_ids"][:second]) == {0} and set(row["token_type_ids"][second:]) == {1}
    joined = tok("the cat the cat")["input_ids"]
    assert row["input_ids"] != joined


# ------------------------------------------------------------------------------------------------ a whole run

@pytest.fixture(scope="module")
def trained(task_files, tmp_path_factory, tiny_bert):
    """One run per adapter layout: shared and per_task."""
    out = {}
    for mode in ("shared", "per_task"):
        d = tmp_path_factory.mktemp(f"mt-{mode}")
        out[mode] = run(recipe_of(d, tree(task_files, d / "run", tiny_bert, adapters=mode)))
    return out


@pytest.mark.parametrize("mode", ["shared", "per_task"])
def test_a_multitask_run_learns_and_exports_a_run_per_task(trained, mode):
    record = trained[mode]
    out = Path(record.output_dir)
    m = record.metrics["eval"]
    assert record.task == "multitask" and set(record.multitask["tasks"]) == {"senti", "topic", "pair"}
    # the record returned is the one written (run.json had no versions or hardware, and run() returned neither)
    assert record.versions["torch"] and record.hardware and json.loads((out / "run.json").read_text())["versions"] == record.versions
    # untrained: losses ln 2, ln 3, ln 2 (mean 0.83); each task's head learned from its own rows
    assert m["loss"] < 0.6 and m["topic/accuracy"] > 0.45 and m["pair/accuracy"] > 0.9, m
    assert m["mean"] == pytest.approx((m["senti/accuracy"] + m["topic/accuracy"] + m["pair/f1"]) / 3)
    for name, labels in (("senti", ["negative", "positive"]), ("topic", TOPICS), ("pair", ["different", "same"])):
        folder = out / "tasks" / name
        saved = json.loads((folder / "run.json").read_text())
        assert saved["task"] == "classification" and saved["label_names"] == labels
        assert saved["multitask"]["task"] == name and saved["metrics"]["eval"]["accuracy"] == m[f"{name}/accuracy"]
        from safetensors.torch import load_file

        exported = load_file(str(folder / "adapter_model.safetensors"))  # the task's adapter and head, nothing else
        assert saved["trainable_params"] == sum(v.numel() for v in exported.values()) < record.trainable_params
    root = json.loads((out / "eval_report.json").read_text())  # every split's report, per task as for a single-task run
    topic = json.loads((out / "tasks" / "topic" / "eval_report.json").read_text())
    assert topic["split"] == "eval" and topic["splits"] == {s: root["splits"][s]["topic"] for s in ("eval", "test")}
    assert topic["splits"]["test"]["confusion"] and topic["confusion"] == root["topic"]["confusion"]
    card = card_text(out / "tasks" / "topic")
    assert "## Multi-task training" in card and "Task `topic` of the multi-task peftlab run `mt`" in card
    assert "below are the whole multi-task run's, shared by its tasks" in card
    assert ("one LoRA adapter shared by every task" in card) == (mode == "shared")
    assert "would train it alone, not with the other tasks as here" in card and "rerun it with" not in card  # (it said rerun)


def test_a_task_without_a_test_split_has_no_test_figures(trained):
    """Only topic has data.test: the other tasks' metrics.json held "test": {}, and their cards a row "| test (held out) |
    test (None) | - | - | - |" and "The held-out figure is test" for a split never scored."""
    out = Path(trained["shared"].output_dir)
    assert set(json.loads((out / "metrics.json").read_text())) == {"eval", "test"}
    for name, splits in (("senti", {"eval"}), ("pair", {"eval"}), ("topic", {"eval", "test"})):
        assert set(json.loads((out / "tasks" / name / "metrics.json").read_text())) == splits, name
        assert set(read_run(out / "tasks" / name)[1].metrics) == splits, name
        card = card_text(out / "tasks" / name)
        assert ("| test" in card) == (name == "topic") and "test (None)" not in card and "figure is test" not in card, card


def test_a_tasks_test_split_on_its_own_train_file_is_said_not_held_out(task_files, tmp_path, tiny_bert, caplog):
    """Only the top-level data section was looked at: a task whose data.test is its data.train file was "test (held out)"
    on its card, with no warning, where a single-task recipe warns and says "not held out: the file of data.train"."""
    t = tree(task_files, tmp_path / "run", tiny_bert)
    t["multitask"]["tasks"]["senti"]["data"]["test"] = str(task_files["senti_train"])
    with caplog.at_level(logging.WARNING):
        record = run(recipe_of(tmp_path, t, ["train.max_steps=2", "train.eval_every=1", "export.merge=false"]))
    assert (f"multitask.tasks.senti.data.test is the file of multitask.tasks.senti.data.train ({task_files['senti_train']}): "
            "its figure is not held out") in caplog.text
    out = Path(record.output_dir)
    assert [read_run(out / "tasks" / n)[1].test_shares for n in ("senti", "topic")] == ["train", "eval"]  # (topic: its eval file)
    card = card_text(out / "tasks" / "senti")
    assert "| test (not held out: the file of data.train) |" in card and "figure is test" not in card, card


def test_the_summary_says_which_tasks_a_test_mean_is_of(trained, capsys):
    """Only topic has data.test: the closing summary's "test mean" was topic's alone and did not say so."""
    from peftlab.cli import print_summary

    record = trained["shared"]
    assert read_run(record.output_dir)[1].split_label("test") == record.split_label("test")
    assert record.split_label("test").endswith("mean of topic only: pair, senti have no test split)"), record.split_label("test")
    assert "mean of" not in record.split_label("eval")  # (every task has an eval split)
    print_summary(record)
    out = capsys.readouterr().out
    test = out[out.index("   test "):].split("\n   eval")[0]  # (a multi-task split's summary is two lines)
    assert "<- not held out: the file of data.eval; mean of topic only: pair, senti have no test split" in test, out


def test_the_runs_own_test_label_says_a_tasks_test_split_on_its_eval_file_is_not_held_out(trained):
    """topic's data.test is its data.eval file: the warning said the summary says so, but the multi-task run's own record
    (its summary, run.json) read only the top-level data section, which has no splits, and called the figure held out."""
    record = trained["shared"]
    assert record.test_shares == "eval" and read_run(record.output_dir)[1].test_shares == "eval"
    assert record.split_label("test").startswith("test (not held out: the file of data.eval; mean of topic only"), record.split_label("test")


def test_a_pair_tasks_card_shows_a_pair_in_its_usage_example(trained, tiny_bert, capsys):
    """The card's example fed a sentence-pair model one sentence (single-text usage): a user following it got
    predictions of nothing the model was trained on."""
    folder = Path(trained["shared"].output_dir) / "tasks" / "pair"
    code = re.search(r"```python\n(.*?)```", card_text(folder, "alice/pair"), re.S).group(1)
    assert "tokenizer([\"The firm reported a loss.\"], [\"The company lost money.\"]" in code, code
    code = re.sub(r"^repo = .*$", f"repo = {str(folder)!r}", code, flags=re.M)
    exec(re.sub(r"^base_model = .*$", f"base_model = {str(tiny_bert)!r}", code, flags=re.M), {})
    assert capsys.readouterr().out.strip() in ("different", "same")
    single = re.search(r"```python\n(.*?)```", card_text(folder.parent / "senti", "alice/senti"), re.S).group(1)
    assert "tokenizer([\"a gripping, beautifully shot film\"], return_tensors" in single


def test_a_tasks_card_says_its_step_was_chosen_on_the_multitask_runs_metric(trained, tmp_path):
    """With several evaluations, keep_best chose the step on the run's mean; a task's recipe.yaml names its own metric."""
    import shutil

    folder = tmp_path / "topic"
    shutil.copytree(Path(trained["shared"].output_dir) / "tasks" / "topic", folder)
    record = json.loads((folder / "run.json").read_text())
    record.update(selected_on="eval", best_step=2, history=[{"step": 2}, {"step": 4}])
    (folder / "run.json").write_text(json.dumps(record))
    card = card_text(folder)
    assert "`train.best_metric: mean` of the multi-task run `mt`" in card and "best_metric: accuracy`" not in card, card


@pytest.mark.parametrize("mode", ["shared", "per_task"])
def test_each_task_reloads_to_the_model_that_was_trained(trained, mode):
    """peftlab eval on OUT/tasks/NAME (the export rebuilt from its files) gives the figures the multi-task model measured."""
    from peftlab.run import evaluate

    out = Path(trained[mode].output_dir)
    for name in ("senti", "topic", "pair"):
        again = evaluate(out / "tasks" / name, "eval")
        m = trained[mode].metrics["eval"]
        assert again["accuracy"] == m[f"{name}/accuracy"]
        assert again["loss"] == pytest.approx(m[f"{name}/loss"], abs=1e-5)
    with pytest.raises(ArtifactError, match=r"is a multi-task run \(.*\): its models are per task. Load one of them"):
        evaluate(out, "eval")  # the folder itself: it said "the run's recipe has no data.eval split", a fix that cannot work


def test_shared_tasks_share_one_adapter_and_per_task_ones_do_not(trained):
    from safetensors.torch import load_file

    def lora(mode, name):
        state = load_file(str(Path(trained[mode].output_dir) / "tasks" / name / "adapter_model.safetensors"))
        return {k: v for k, v in state.items() if "lora_" in k}

    a, b = lora("shared", "senti"), lora("shared", "topic")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = lora("per_task", "senti"), lora("per_task", "topic")
    assert a.keys() == b.keys() and not all(torch.equal(a[k], b[k]) for k in a)


def test_a_task_named_like_a_module_of_the_base_loses_no_weights_on_export(task_files, tmp_path, tiny_bert):
    """Each per_task adapter was named by its task, and peft drops every state-dict key holding `.{other adapter}.` from
    an adapter's export: with a task named `query`, sst2's export had no attention.self.query LoRA (reloaded lora_B = 0,
    peft only warned), its trainable_params over-counted, and a task named `classifier` crashed in peft."""
    from safetensors.torch import load_file

    from peftlab.run import evaluate

    t = tree(task_files, tmp_path / "run", tiny_bert, adapters="per_task")
    tasks = t["multitask"]["tasks"]
    t["multitask"]["tasks"] = {"sst2": tasks["senti"], "query": tasks["topic"], "classifier": tasks["pair"]}
    record = run(recipe_of(tmp_path, t, ["train.max_steps=30", "export.merge=false"]))
    out = Path(record.output_dir)
    exported = {n: load_file(str(out / "tasks" / n / "adapter_model.safetensors")) for n in ("sst2", "query", "classifier")}
    lora = {n: {k for k in state if "lora_" in k} for n, state in exported.items()}
    assert lora["sst2"] == lora["query"] == lora["classifier"]
    assert {k for k in lora["sst2"] if ".attention.self.query." in k} and {k for k in lora["sst2"] if ".output.dense." in k}
    for name, state in exported.items():
        saved = json.loads((out / "tasks" / name / "run.json").read_text())
        assert saved["trainable_params"] == sum(v.numel() for v in state.values())
        again = evaluate(out / "tasks" / name, "eval")  # the export rebuilt from its files scores as the trained model did
        assert again["loss"] == pytest.approx(record.metrics["eval"][f"{name}/loss"], abs=1e-5), name
    from peftlab.errors import ModelError
    from peftlab.tasks.multitask import check_adapter_names

    base = torch.nn.ModuleDict({"task_query": torch.nn.Linear(2, 2)})  # a base with a module named as the adapter would be
    with pytest.raises(ModelError, match=r"multitask.tasks.query: its adapter, 'task_query', is named like a module of the base "
                                         r"\(task_query.weight\).* Rename the task"):
        check_adapter_names(base, {"sst2": "default", "query": "task_query"})


def test_the_tasks_load_side_by_side_and_the_run_folder_says_where_they_are(trained):
    out = Path(trained["per_task"].output_dir)
    texts = ("the cat", "news war today", "a good movie")
    alone = {name: logits(load_trained(out / "tasks" / name)[0], texts) for name in ("senti", "topic")}
    model, _ = load_adapters({name: out / "tasks" / name for name in ("senti", "topic")})
    for name, expected in alone.items():
        model.set_adapter(name)
        torch.testing.assert_close(logits(model, texts), expected, atol=1e-5, rtol=0)
    with pytest.raises(ArtifactError, match="multi-task run .* Load one of them"):
        load_trained(out)
    with pytest.raises(ArtifactError, match="multi-task run"):
        merge(out)
    with pytest.raises(ArtifactError, match="multi-task run .* Load one of them"):  # (was: "holds a lora model, not a LoRA adapter")
        compose([out / "tasks" / "senti", out], [0.5, 0.5], out.parent / "composed")
    with pytest.raises(ArtifactError, match="multi-task run .* Load one of them"):
        load_adapters({"senti": out / "tasks" / "senti", "all": out})
    from peftlab.publish import publish

    with pytest.raises(ArtifactError, match="multi-task run .* Load one of them"):  # (was: "Is this a peftlab output directory?")
        publish(out, to=out.parent / "published")
    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(merge(out / "tasks" / "topic"))  # a task merges on its own
    torch.testing.assert_close(logits(merged, texts), alone["topic"], atol=1e-5, rtol=0)


def test_resume_continues_a_multitask_run_to_the_same_result(task_files, tmp_path, tiny_bert):
    t = tree(task_files, tmp_path / "whole", tiny_bert)
    t["train"].update(max_steps=20, save_every=10, keep_best=False, scheduler="constant")  # steps 1-10 alike in both
    whole = run(recipe_of(tmp_path, t))
    t["output_dir"] = str(tmp_path / "parts")
    run(recipe_of(tmp_path, t, ["train.max_steps=10"]))
    import shutil

    (tmp_path / "parts" / "run.json").unlink()  # as if the run had stopped after its step-10 checkpoint, in its export:
    first, *others = sorted((tmp_path / "parts" / "tasks").iterdir())  # one task's run written, the others not yet
    for other in others:
        shutil.rmtree(other)
    resumed = run(recipe_of(tmp_path, t), resume=True)  # (the first task's folder, a run of its own, is exported again)
    assert resumed.steps == 20 and read_run(first)[1].steps == 20
    for key, value in whole.metrics["eval"].items():
        assert resumed.metrics["eval"][key] == pytest.approx(value, abs=1e-5), key


def test_a_new_task_starts_from_a_multitask_run(trained, make_recipe, tmp_path, task_files, caplog):
    """Intermediate-task transfer: model.from_run on one task of a multi-task run gives a new task (other labels) the
    shared adapter merged into the base, and a fresh head of its own size. The lineage and the card said only that task's
    data, though the shared adapter was trained on every task's: they name them all, and a split this run scores that
    one of them trained on is said not to be held out."""
    start = Path(trained["shared"].output_dir) / "tasks" / "topic"  # 3 labels; the new task has 2
    with caplog.at_level(logging.WARNING):
        record = run(make_recipe({"model.from_run": start, "train.max_steps": 2, "output_dir": tmp_path / "next",
                                  "data.eval.path": task_files["senti_train"]}))
    assert record.lineage[0]["name"] == "mt-topic" and record.label_names == ["negative", "positive"]
    assert record.lineage[0]["multitask"]["data"] == {n: str(task_files[f"{n}_train"]) for n in ("senti", "topic", "pair")}
    assert f"data.eval ({task_files['senti_train']}) is data that the run this one starts from was trained on (mt-senti" in caplog.text
    card = card_text(tmp_path / "next")
    line = next(x for x in card.splitlines() if x.startswith("1. `mt-topic`"))  # (a card names local files by their name)
    assert line.endswith("task `topic` of the multi-task run `mt`, whose shared adapter was also trained on `pair` "
                          "(pair_train.tsv), `senti` (senti_train.tsv)"), line
    model = load_trained(tmp_path / "next")[0]
    assert logits(model).shape[-1] == 2
    with pytest.raises(ConfigError, match="is a multi-task run: its models are per task.*model.from_run=.*tasks"):
        make_recipe({"model.from_run": start.parent.parent, "output_dir": tmp_path / "from-parent"})  # validate says it


def test_a_student_of_a_multitask_task_says_what_its_teacher_was_trained_on(trained, make_recipe, tmp_path):
    """A teacher that is one task of a multi-task run: the distillation record and card named only that task's run."""
    teacher = Path(trained["shared"].output_dir) / "tasks" / "senti"
    record = run(make_recipe({"train.distill.teacher": teacher, "train.max_steps": 2, "output_dir": tmp_path / "student"}))
    assert record.distillation["multitask"]["task"] == "senti" and set(record.distillation["multitask"]["data"]) == {"senti", "topic", "pair"}
    card = card_text(tmp_path / "student")
    assert "task `senti` of the multi-task run `mt`, whose shared adapter was also trained on" in card


def test_the_benchmark_derives_each_single_task_recipe_from_the_multitask_one(tmp_path, monkeypatch):
    from .conftest import REPO, load_benchmark

    bench = load_benchmark("multitask")
    monkeypatch.setattr(bench, "RUNS", tmp_path)
    monkeypatch.chdir(REPO)
    multi = load_recipe(REPO / bench.RECIPE, validate_files=False)
    for task in bench.TASKS:
        single = load_recipe(bench.single_recipe(task), validate_files=False)
        assert single.task.type == "classification" and single.multitask is None
        assert single.data == multi.multitask.tasks[task].data and single.adapter == multi.adapter and single.train.lr == multi.train.lr
    assert load_recipe(bench.single_recipe("mrpc"), validate_files=False).data.text_pair


def test_routing_by_task_reads_nothing_back_from_the_device(task_files, tmp_path, tiny_bert, monkeypatch):
    """The collator hands the tasks present in a batch over as host ints, so neither training nor evaluation asks the
    device which tasks a batch holds (on a GPU that read is a sync every step)."""
    def device_read(*args, **kwargs):
        raise AssertionError("the task ids were read back from the device")

    monkeypatch.setattr(torch.Tensor, "unique", device_read)
    record = run(recipe_of(tmp_path, tree(task_files, tmp_path / "run", tiny_bert, adapters="per_task"), ["train.max_steps=6"]))
    assert record.steps == 6 and set(record.metrics["eval"]) >= {"senti/accuracy", "topic/accuracy", "pair/f1"}


def test_the_transfer_report_pairs_the_gain_by_seed(tmp_path, monkeypatch):
    """multitask.py --report: each fraction's row compares the same seeds from the base and from the multi-task run; a
    seed that ran on one side only is left out of both."""
    import json

    from .conftest import load_benchmark

    bench = load_benchmark("multitask")
    monkeypatch.setattr(bench, "OUT", tmp_path)
    scores = {("base", "0"): (0.50, 0.30), ("multi", "0"): (0.60, 0.35), ("base", "1"): (0.70, 0.50),
              ("multi", "1"): (0.72, 0.40), ("base", "2"): (0.10, 0.10)}  # seed 2: no multi-task side
    for (origin, seed), (acc, f1) in scores.items():
        run = {"task": "classification", "steps": 150, "train_wall_s": 60.0, "metrics": {"test": {"accuracy": acc, "f1": f1}}}
        (tmp_path / f"transfer-emotion-1pct-{origin}-s{seed}.json").write_text(
            json.dumps({"run": run, "overrides": ["data.train.max_samples=160", f"train.seed={seed}"]}))
    header, _, row = bench.transfer_rows("emotion")  # every stored seed
    cells = row.split(" | ")
    assert cells[0] == "| 1% (160 rows, 150 steps)" and cells[1] == "60.00 ± 14.14" and cells[2] == "66.00 ± 8.49"
    assert cells[3] == "**+6.00** ± 4.00 (+10.00, +2.00)" and cells[6] == "**-2.50** ± 7.50 (+5.00, -10.00)"
    assert cells[7] == "2" and "accuracy from the base" in header
    assert bench.transfer_rows("sst2") == []


def test_the_multitask_report_averages_seeds_and_pairs_shared_against_single(tmp_path, monkeypatch):
    import argparse
    import json

    from .conftest import load_benchmark

    bench = load_benchmark("multitask")
    monkeypatch.setattr(bench, "OUT", tmp_path)
    for seed, (multi, single) in enumerate(((0.80, 0.83), (0.84, 0.83))):
        for name, task, score in ((f"multi-shared-600-s{seed}", "multitask", {"sst2/accuracy": multi}),
                                  (f"single-sst2-share600-s{seed}", "classification", {"accuracy": single})):
            run = {"task": task, "steps": 300, "trainable_params": 5, "train_wall_s": 60.0, "metrics": {"test": score}}
            (tmp_path / f"{name}.json").write_text(json.dumps({"run": run}))
    text = bench.report(argparse.Namespace(target="emotion", seeds="0"))
    assert "seeds 0, 1" in text.splitlines()[0]
    row = next(line for line in text.splitlines() if line.startswith("| sst2"))
    assert row.split(" | ")[1:] == ["83.00 (83.00, 83.00) [300 steps]", "-", "82.00 (80.00, 84.00)", "-", "-1.00 (-3.00, +1.00) |"]


def test_a_multitask_run_on_two_processes_trains_as_one_with_twice_the_batch(task_files, tmp_path, tiny_bert):
    """A step is one task's rows, so the other tasks' heads (and per-task adapters) get no gradient that step: DDP failed
    at the second step ("parameters that were not used in producing loss") until told to look for them. 2 ranks x 4
    train as 1 x 8 (and as 1 x 4 x 2 accumulated): the blocks of one task were one rank's batch, so a step of 2 ranks
    mixed two tasks' rows where 1 x 8 took 8 rows of one (tokens 661 vs 550, adapters 3.5e-3 apart)."""
    from safetensors.torch import load_file

    from .test_distributed import LAUNCH_2_CPU, sh

    t = tree(task_files, tmp_path / "two", tiny_bert, adapters="per_task")
    t["train"].update(max_steps=4, batch_size=4)
    (tmp_path / "mt.yaml").write_text(yaml.safe_dump(t))
    sh([*LAUNCH_2_CPU, "-m", "peftlab", "train", str(tmp_path / "mt.yaml")], cwd=tmp_path)
    record = json.loads((tmp_path / "two" / "run.json").read_text())
    assert record["processes"] == 2 and record["steps"] == 4
    for name, n in (("senti", 40), ("topic", 30), ("pair", 30)):
        assert (tmp_path / "two" / "tasks" / name / "adapter_model.safetensors").is_file()
        assert json.loads((tmp_path / "two" / "tasks" / name / "eval_report.json").read_text())["n"] == n  # each row once
    for folder, overrides in (("one", ["train.batch_size=8"]), ("accumulated", ["train.grad_accum=2"])):
        run(recipe_of(tmp_path, {**t, "output_dir": str(tmp_path / folder)}, overrides))
        other = json.loads((tmp_path / folder / "run.json").read_text())
        assert (other["train_examples"], other["train_tokens"]) == (record["train_examples"], record["train_tokens"])
        for name in ("senti", "topic", "pair"):
            w1, w2 = (load_file(tmp_path / f / "tasks" / name / "adapter_model.safetensors") for f in (folder, "two"))
            for k in w1:
                torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=1e-4)


def test_a_multitask_runs_own_run_json_is_written_last_and_whole(task_files, tmp_path, tiny_bert, monkeypatch):
    """OUT/run.json (what makes OUT a finished run) was written before metrics.json, in place: a run killed between
    them was 'a finished run' without its metrics, which neither --resume nor a plain train would take up."""
    import peftlab.rundir as rundir

    written, write = [], rundir.atomic_write_text

    def recording(path, text):
        written.append(Path(path).name)
        write(path, text)

    monkeypatch.setattr(rundir, "atomic_write_text", recording)
    out = tmp_path / "run"
    run(recipe_of(tmp_path, tree(task_files, out, tiny_bert), ["train.max_steps=2", "train.eval_every=null", "export.merge=false"]))
    own = [n for n in written if n in ("metrics.json", "eval_report.json", "recipe.yaml", "run.json")]
    assert own[-1] == "run.json" and "metrics.json" in own[:-1], written
    assert json.loads((out / "run.json").read_text())["task"] == "multitask" and (out / "metrics.json").is_file()
