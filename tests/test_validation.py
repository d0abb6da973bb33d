"""Issue 16, sections 3 and 5: no silent wrong answer from a default, a non-finite number, a target typo, odd labels or
lengths; and one clear message (exit 2, naming the field, the value and the fix) where there was a traceback."""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import subprocess
import sys

import pytest
import yaml

from peftlab import load_recipe, load_splits, run
from peftlab.cli import main
from peftlab.config import Recipe, _walk, validate
from peftlab.errors import ArtifactError, ConfigError, DataError, ModelError

from .conftest import REPO, SHARED, synthetic_rows, write_tsv


def write_recipe(tmp_path, tree: dict, name: str = "r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    return path


def splits(tmp_path, train, *overrides):
    return load_splits(load_recipe(None, [f"data.train.path={train}", *overrides], validate_files=False))


# ----------------------------------------------------------------------------------------- 3. no data path from a default

def test_no_split_has_a_default_path():
    d = Recipe().data
    assert (d.train, d.eval, d.test) == (None, None, None)
    with pytest.raises(ConfigError, match=r"data.train is not set: name the training file, e.g. data.train.path="):
        validate(Recipe())


def test_a_recipe_without_data_train_is_refused_by_validate_and_train(tmp_path, capsys):
    path = write_recipe(tmp_path, {"name": "x", "data": {"eval": str(tmp_path / "dev.tsv")}})
    write_tsv(tmp_path / "dev.tsv", synthetic_rows(8, 0))
    assert main(["validate", str(path)]) == 2
    assert "data.train is not set" in capsys.readouterr().out
    assert main(["train", str(path), f"output_dir={tmp_path / 'out'}"]) == 2
    assert "data.train is not set" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    recipe = load_recipe(path, validate_files=False)  # the Python API, past validation: the loader refuses too
    with pytest.raises(DataError, match="data.train is not set"):
        load_splits(recipe)


def test_own_train_file_with_eval_holdout_evaluates_on_the_holdout(tmp_path):
    train = write_tsv(tmp_path / "mine.tsv", [(f"row {i} good", i % 2) for i in range(40)])
    path = write_recipe(tmp_path, {"data": {"train": str(train), "eval_holdout": 0.25}})
    out, _ = load_splits(load_recipe(path))  # data files checked: only the user's own file is named
    assert (len(out["train"]), len(out["eval"])) == (30, 10)  # not SST-2 dev (872 rows), as the old default gave
    assert set(out["eval"]["text"]) <= {f"row {i} good" for i in range(40)}
    assert not set(out["train"]["text"]) & set(out["eval"]["text"])


def test_eval_holdout_beside_an_eval_split_is_announced(tmp_path, caplog):
    train = write_tsv(tmp_path / "t.tsv", synthetic_rows(20, 0))
    with caplog.at_level(logging.WARNING, logger="peftlab.data"):
        out, _ = splits(tmp_path, train, f"data.eval.path={train}", "data.eval_holdout=0.25")
    assert len(out["eval"]) == 20
    assert "data.eval_holdout=0.25 is ignored: data.eval is set" in caplog.text


def test_eval_every_without_an_evaluation_split_is_said(tmp_path, caplog):
    """A recipe's eval_every with its evaluation split overridden away (e.g. data.eval=null): warned, by train and validate."""
    from peftlab.run import preflight

    train = write_tsv(tmp_path / "t.tsv", synthetic_rows(20, 0))
    path = write_recipe(tmp_path, {"data": {"train": str(train)}, "train": {"eval_every": 2}})
    with caplog.at_level(logging.WARNING, logger="peftlab.run"):
        preflight(load_recipe(path), training=True)
    assert "train.eval_every=2 but there is no evaluation split: nothing is evaluated during training" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="peftlab.run"):
        preflight(load_recipe(path, ["data.eval_holdout=0.25"]), training=True)
    assert "eval_every" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="peftlab.run"):  # zero-shot (gsm8k-sft-lora.yaml's header): nothing trains
        preflight(load_recipe(path, ["train.max_steps=0"]), training=True)
    assert "eval_every" not in caplog.text


@pytest.mark.parametrize("key", ["model.from_run", "train.distill.teacher"])
def test_a_run_that_reads_its_own_output_directory_is_refused(tmp_path, key):
    """--overwrite would replace the run it starts from (or its teacher), and the runs trained on it."""
    train = write_tsv(tmp_path / "t.tsv", synthetic_rows(20, 0))
    path = write_recipe(tmp_path, {"data": {"train": str(train), "eval_holdout": 0.25}, "output_dir": str(tmp_path / "runs" / "a")})
    for inside in (tmp_path / "runs" / "a", tmp_path / "runs" / "a" / "tasks" / "x"):
        with pytest.raises(ConfigError, match=f"{key}=.* is inside this run's output directory .*another name= or output_dir="):
            load_recipe(path, [f"{key}={inside}"], validate_files=False)
    load_recipe(path, [f"{key}={tmp_path / 'runs' / 'b'}"], validate_files=False)  # beside it: fine
    load_recipe(None, ["name=\x00", f"{key}={tmp_path / 'b'}"], validate_files=False)  # a path the OS refuses: no ValueError here


def test_every_shipped_recipe_validates_from_the_cli():
    recipes = sorted(str(p.relative_to(REPO)) for p in (REPO / "recipes").glob("*/*.yaml")) + ["peftlab/recipes/quickstart.yaml"]
    files = [] if SHARED.is_dir() else ["--no-files"]
    proc = subprocess.run([sys.executable, "-m", "peftlab.cli", "validate", *recipes, *files], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok ") == len(recipes)


# --------------------------------------------------------------------------------------------- 3. non-finite numbers

def float_fields() -> list[str]:
    return [name for name, _, f, _ in _walk(Recipe()) if f.type in ("float", "float | None")]


def test_float_fields_are_found():
    assert {"train.lr", "train.epochs", "adapter.alpha", "data.eval_holdout", "eval.length_penalty"} <= set(float_fields())


@pytest.mark.parametrize("value", ["inf", ".inf", "-.inf", "nan", "1e400"])
@pytest.mark.parametrize("field", ["train.lr", "train.epochs", "train.max_grad_norm", "adapter.alpha", "eval.length_penalty",
                                   "adapter.loraplus_lr_ratio"])
def test_non_finite_numbers_are_refused_up_front(field, value):
    with pytest.raises(ConfigError) as e:
        load_recipe(None, [f"{field}={value}"], validate_files=False)
    assert f"{field}=" in str(e.value) and "must be a finite number" in str(e.value)
    assert len(e.value.problems) == 1  # one message per field, not "must be > 0" beside it


def test_every_float_field_refuses_inf():
    for field in float_fields():
        with pytest.raises(ConfigError, match=rf"{field}=inf: must be a finite number"):
            load_recipe(None, [f"{field}=inf"], validate_files=False)


def test_every_int_field_refuses_a_number_beyond_64_bits():
    """eval.batch_size=1e22 (as an int) passed `>= 1`, trained, then crashed in the evaluation loader (islice)."""
    fields = [name for name, _, f, _ in _walk(Recipe()) if f.type in ("int", "int | None")]
    assert {"eval.batch_size", "adapter.r", "train.max_steps", "train.seed"} <= set(fields)
    for field in fields:
        with pytest.raises(ConfigError, match=rf"{field}=10000000000000000000000: beyond a 64-bit integer"):
            load_recipe(None, [f"{field}=10000000000000000000000"], validate_files=False)


def test_non_finite_numbers_from_the_cli(tmp_path, capsys):
    recipe = write_recipe(tmp_path, {"data": {"train": "t.tsv"}})
    assert main(["train", str(recipe), "--overwrite", "train.lr=inf", "train.epochs=.inf"]) == 2  # overrides after a flag
    err = capsys.readouterr().err
    assert "train.lr=inf: must be a finite number" in err and "train.epochs=inf: must be a finite number" in err


def test_ranges_are_field_metadata_checked_generically():
    fields = {f.name: f for f in dataclasses.fields(Recipe().train)}
    assert (fields["lr"].metadata["gt"], fields["warmup_fraction"].metadata["lt"]) == (0, 1)
    with pytest.raises(ConfigError) as e:
        load_recipe(None, ["train.lr=0", "train.warmup_fraction=1", "train.max_steps=-1", "data.max_length=4",
                           "eval.num_beams=0", "adapter.r=0", "train.seed=-1", f"data.seed={2**32}"], validate_files=False)
    msg = str(e.value)
    for needle in ("train.lr=0.0: must be > 0 (LoRA: ~1e-4 to 1e-3; full fine-tuning: ~2e-5).",
                   "train.warmup_fraction=1.0: must be in [0, 1).", "train.max_steps=-1: must be >= 0 or null.",
                   "data.max_length=4: must be >= 8", "eval.num_beams=0: must be >= 1 (1 = greedy decoding).",
                   "adapter.r=0: must be >= 1 (the LoRA rank; typical: 4-64).", "train.seed=-1: must be in [0, 4294967296)",
                   "data.seed=4294967296: must be in [0, 4294967296) or null"):
        assert needle in msg, msg
    assert math.isfinite(Recipe().train.lr)


# --------------------------------------------------------------------------------------------------- 3. target modules

def test_every_target_module_must_match(make_recipe):
    from peftlab.model import build_model

    recipe = make_recipe({"adapter.target_modules": "[query, nonexistent_proj]"})
    with pytest.raises(ModelError) as e:
        build_model(recipe, num_labels=2, label_names=["negative", "positive"])
    msg = str(e.value)
    assert "'nonexistent_proj' matches no module" in msg and "'query'" not in msg.split("matches")[0]
    assert "Linear layers it has: " in msg and "query" in msg.split("Linear layers it has: ")[1]
    good = make_recipe({"adapter.target_modules": "[query, attention.output.dense]"})
    model, _, _ = build_model(good, num_labels=2, label_names=["negative", "positive"])
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert any(n.endswith("attention.output.dense") for n in adapted) and any(n.endswith("query") for n in adapted)


# ------------------------------------------------------------------------------------------------------------ 3. labels

def test_one_distinct_label_is_refused(tmp_path):
    train = write_tsv(tmp_path / "one.tsv", [("a fine film", 1)])
    with pytest.raises(DataError, match=r"data.train: every row has the label 1\. A classifier needs >= 2 classes") as e:
        splits(tmp_path, train)
    assert "data.label_names=[...]" in str(e.value)
    out, names = splits(tmp_path, train, "data.label_names=[neg,pos]")  # named classes: a one-row train is fine
    assert names == ["neg", "pos"] and out["train"]["label"] == [1]


def test_integer_labels_with_gaps_are_refused_with_the_fix(tmp_path):
    train = write_tsv(tmp_path / "gap.tsv", [("bad", 0), ("good", 5), ("ok", 5)])
    with pytest.raises(DataError) as e:
        splits(tmp_path, train)
    msg = str(e.value)
    assert "integer labels [0, 5] are not the class indices 0..1" in msg and "4 of which ([1, 2, 3, 4]) never occur" in msg
    assert "data.train.label_map={0: name0, 5: name1}" in msg and "data.label_names" in msg
    out, names = splits(tmp_path, train, "data.train.label_map={0: neg, 5: pos}", "data.label_names=[neg,pos]")
    assert out["train"]["label"] == [0, 1, 1]


def test_an_all_empty_text_column_is_refused(tmp_path):
    (tmp_path / "e.csv").write_text("sentence,label,review\n,0,bad\n,1,good\n")
    with pytest.raises(DataError, match=r"data.train: text column 'sentence' is empty in all 2 rows") as e:
        splits(tmp_path, tmp_path / "e.csv")
    assert "['sentence', 'label', 'review']" in str(e.value)
    out, _ = splits(tmp_path, tmp_path / "e.csv", "data.text_columns=[review]")
    assert out["train"]["text"] == ["bad", "good"]


@pytest.mark.parametrize("ext, sep", [("csv", ","), ("tsv", "\t")])
def test_an_empty_label_cell_names_the_row(tmp_path, ext, sep):
    path = tmp_path / f"e.{ext}"
    path.write_text(f"sentence{sep}label\nok{sep}1\nfine{sep}\nbad{sep}0\n")
    with pytest.raises(DataError) as e:
        splits(tmp_path, path)
    assert ("data.train: 1 row(s) have an empty 'label' cell: data row 1 (0-based, as predictions files count; file line 3 "
            "of") in str(e.value)  # (it said 'data row 2', counting from 1 where every other data error counts from 0)
    assert "Fill in their labels or delete those rows" in str(e.value)


@pytest.mark.parametrize("name, text, line", [
    ("q.csv", 'sentence,label\n"a review\nover three\nlines",1\nfine,\n', 5),  # a quoted cell spans lines 2-4
    ("b.csv", "sentence,label\nok,1\n\nfine,\n", 4),  # a blank line holds no row
    ("h.csv", "ok,1\n\"two\nlines\",0\nfine,\n", 4),  # no header: column_names
    ("j.jsonl", '{"sentence": "ok", "label": 1}\n\n{"sentence": "fine", "label": null}\n', 3),
    ("t.tsv", 'sentence\tlabel\n"a bare quote\t1\nfine\t\n', 3),  # a tsv's quotes are text (GLUE), as the loader reads it
])
def test_an_empty_label_cell_names_its_file_line(tmp_path, name, text, line):
    """The file line of the row, not data row + 1: a quoted csv cell may span lines, and blank lines hold no row."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError, match=rf"data row \d \(0-based, as predictions files count; file line {line} of"):
        splits(tmp_path, path, *(["data.train.column_names=[sentence,label]"] if name == "h.csv" else []))


def test_float_read_labels_are_class_indices_again(tmp_path):
    (tmp_path / "f.csv").write_text("sentence,label\nok,1.0\nbad,0.0\n")
    out, names = splits(tmp_path, tmp_path / "f.csv")
    assert names == ["0", "1"] and out["train"]["label"] == [1, 0]


# ----------------------------------------------------------------------------------------------------------- 3. lengths

def test_max_length_beyond_the_position_table_is_refused_before_training(make_recipe):
    from peftlab.model import build_model

    recipe = make_recipe({"data.max_length": 256})  # the tiny BERT has 128 positions
    with pytest.raises(ModelError, match=r"data.max_length=256 exceeds the 128 positions of .*Set data.max_length"):
        build_model(recipe, num_labels=2, label_names=["negative", "positive"])
    from peftlab.run import preflight

    assert any("data.max_length=256 exceeds the 128 positions" in p for p in preflight(recipe, training=False))  # validate


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_virtual_tokens_count_against_the_position_table(make_recipe, method):
    from peftlab.run import preflight

    recipe = make_recipe({"data.max_length": 120, "adapter.method": method, "adapter.num_virtual_tokens": 20,
                          "adapter.target_modules": None})
    problems = preflight(recipe, training=False)
    assert any("data.max_length=120, + adapter.num_virtual_tokens=20, exceeds the 128 positions" in p
               and "Set data.max_length so that it is <= 108 (or lower adapter.num_virtual_tokens)." in p for p in problems), problems
    recipe.adapter.num_virtual_tokens = 8
    assert not any("positions" in p for p in preflight(recipe, training=False))


def test_position_limits_from_configs():
    from transformers import BertConfig, GPT2Config, RobertaConfig, T5Config

    from peftlab.model import position_limit

    assert position_limit(BertConfig()) == 512
    assert position_limit(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512  # offset past the padding index
    assert position_limit(GPT2Config()) == 1024
    assert position_limit(T5Config()) is None  # relative positions: no table to run out of


def test_a_decoder_only_summarizer_counts_prompt_and_target():
    from types import SimpleNamespace

    from transformers import LlamaConfig

    from peftlab.model import check_input_lengths

    recipe = SimpleNamespace(data=SimpleNamespace(max_length=100, max_target_length=64), task=SimpleNamespace(type="summarization"),
                             model=SimpleNamespace(name="tiny"), adapter=SimpleNamespace(method="lora"), eval=SimpleNamespace(max_new_tokens=28))
    # (no base to read the template's tokens from here: 0 of them; tests/test_summarization.py counts them on a real one)
    with pytest.raises(ModelError, match=r"data.max_length \+ the prompt template and special tokens \+ data.max_target_length = "
                                         r"100 \+ 0 \+ 64 exceeds the 128 positions"):
        check_input_lengths(LlamaConfig(max_position_embeddings=128), recipe)
    recipe.data.max_target_length = 28
    check_input_lengths(LlamaConfig(max_position_embeddings=128), recipe)


# -------------------------------------------------------------------------------------------------- 3. efficiency

def test_an_adapter_that_trains_most_weights_is_warned_about(make_recipe, caplog):
    from peftlab.model import build_model

    names = ["negative", "positive"]
    with caplog.at_level(logging.WARNING, logger="peftlab.model"):
        build_model(make_recipe(), num_labels=2, label_names=names)
    assert "parameter-efficient" not in caplog.text
    # (a rank above the layers' own is refused now, and the tiny BERT is mostly embeddings: the share is given as built)
    from peftlab.model import warn_if_not_efficient

    with caplog.at_level(logging.WARNING, logger="peftlab.model"):
        warn_if_not_efficient(make_recipe({"adapter.r": 32, "adapter.target_modules": "all-linear"}), 600_000, 1_000_000)
    assert "adapter.method=lora trains 60.0% of the parameters (600,000 of 1,000,000)" in caplog.text
    assert "no longer parameter-efficient" in caplog.text and "Use a smaller adapter.r (now 32" in caplog.text


# ------------------------------------------------------------------------------------------------- 5. clear messages

def test_a_recipe_path_that_is_a_directory(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text("name: a\n")
    assert main(["validate", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    assert f"recipe path '{tmp_path}' is a directory, not a recipe file" in out and "a.yaml" in out
    assert "does not exist" not in out


def test_validate_takes_overrides_positionally_and_with_set(tmp_path, capsys):
    good = str(REPO / "recipes" / "minilm" / "sst2-lora.yaml")
    assert main(["validate", good, "train.lr=-1", "--no-files"]) == 2
    out = capsys.readouterr().out
    assert "train.lr=-1.0: must be > 0" in out and "does not exist" not in out
    assert main(["validate", "--no-files", good, "--set", "adapter.r=0", "train.lr=1e-3"]) == 2
    out = capsys.readouterr().out
    assert "adapter.r=0" in out and "train.lr" not in out
    assert main(["validate", good, "--no-files", "train.lr=1e-3"]) == 0


def test_overrides_after_flags_reach_the_command(tmp_path, capsys):
    recipe = write_recipe(tmp_path, {"data": {"train": "t.tsv"}})
    assert main(["train", str(recipe), "--resume", "train.lr=inf"]) == 2  # was: argparse "unrecognized arguments"
    assert "train.lr=inf" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", str(recipe), "--overwrite", "not-an-override"])
    assert "unrecognized arguments: not-an-override" in capsys.readouterr().err


@pytest.mark.parametrize("target", ["runs/typo", "./nothing/here", "typo"])
def test_eval_of_a_missing_folder_says_so(tmp_path, monkeypatch, capsys, target):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "typ0").mkdir(parents=True)
    assert main(["eval", target]) == 2
    err = capsys.readouterr().err
    assert f"run folder '{target}' does not exist" in err and "Hub" not in err.split("does not exist")[0]
    if target == "runs/typo":
        assert "Did you mean runs/typ0?" in err


def test_best_metric_is_checked_against_the_task(capsys):
    good = str(REPO / "recipes" / "minilm" / "sst2-lora.yaml")
    assert main(["validate", good, "--no-files", "train.best_metric=acc"]) == 2
    out = capsys.readouterr().out
    assert "train.best_metric='acc': classification keeps the best of accuracy, f1, loss. Did you mean 'accuracy'?" in out
    for ok in ("accuracy", "f1", "loss"):
        assert main(["validate", good, "--no-files", f"train.best_metric={ok}"]) == 0
    with pytest.raises(ConfigError, match="summarization keeps the best of loss, rouge1"):
        load_recipe(None, ["task.type=summarization", "data.target_column=summary", "train.best_metric=accuracy"],
                    validate_files=False)


def test_adalora_with_too_few_steps_for_its_schedule(make_recipe):
    """With train.max_steps the recipe says it (validate, before any work: it was said once the model and the data were
    loaded); with epochs, the loop does, once it knows the steps."""
    from peftlab import run
    from peftlab.methods.adalora import rank_schedule_fits

    with pytest.raises(ConfigError) as e:
        make_recipe({"adapter.method": "adalora", "train.max_steps": 1})
    msg = str(e.value)
    assert "this run has 1 optimizer step(s), but AdaLoRA's rank schedule needs at least 2" in msg
    assert "train.max_steps" in msg and "adalora_warmup_fraction" in msg
    recipe = make_recipe({"adapter.method": "adalora", "train.epochs": 0.01})  # 256 rows, batch 16: 1 step
    with pytest.raises(ModelError, match=r"this run has 1 optimizer step\(s\), but AdaLoRA's rank schedule needs at least 2"):
        run(recipe)
    assert rank_schedule_fits(recipe, 2) and not rank_schedule_fits(recipe, 1)


def test_a_tsv_with_quoted_tabs(tmp_path):
    path = tmp_path / "q.tsv"
    path.write_text('sentence\tlabel\n"a\tb"\t1\nok\t0\n')  # the first row: 3 fields, so pandas shifts every column
    with pytest.raises(DataError) as e:
        splits(tmp_path, path)
    msg = str(e.value)
    assert "more TSV fields than its header" in msg and "TSV files are read unquoted" in msg and "data.train.format=csv" in msg
    path.write_text('sentence\tlabel\nok\t0\n"a\tb"\t1\n')  # a later row: pandas' parser error, with the same hint
    with pytest.raises(DataError, match="TSV files are read unquoted"):
        splits(tmp_path, path)


def test_a_csv_read_as_tsv(tmp_path):
    path = tmp_path / "c.tsv"
    path.write_text("sentence,label\nhello\tthere,1\nok,0\n")  # a tab in a text: a phantom __index_level_0__ column
    with pytest.raises(DataError) as e:
        splits(tmp_path, path)
    msg = str(e.value)
    assert "__index_level_0__" in msg and "the file looks comma-separated" in msg and "data.train.format=csv" in msg
    path.write_text("sentence,label\nhello there,1\nok,0\n")  # no tab: one column
    with pytest.raises(DataError, match=r"Only one column was found.*the file looks CSV; set data.train.format=csv"):
        splits(tmp_path, path)


def test_validate_says_hub_splits_are_not_checked(caplog):
    from peftlab.data import column_problems

    recipe = load_recipe(None, ["data.dataset=glue", "data.subset=sst2", "data.train={split: train}", "data.eval=null",
                                "data.test=null"], validate_files=False)
    with caplog.at_level(logging.INFO, logger="peftlab.data"):
        assert column_problems(recipe) == []
    assert "the columns of glue split 'train' are not checked here" in caplog.text


# ------------------------------------------------------------------------------------ the Python API (README Journey 3)

@pytest.mark.parametrize("key, value, said", [("lr", -1, "train.lr=-1"), ("batch_size", 0, "train.batch_size=0"),
                                              ("precision", "fp64", "train.precision='fp64'")])
def test_run_validates_a_recipe_changed_in_python(make_recipe, key, value, said):
    recipe = make_recipe()
    setattr(recipe.train, key, value)
    with pytest.raises(ConfigError, match=re.escape(said)):
        run(recipe)
    assert not recipe.out.exists()  # refused before any work


def test_the_building_blocks_validate_a_recipe_changed_in_python(make_recipe, tmp_path):
    """README Journey 3: a recipe changed in Python is checked again, as load_recipe checks a file, before any work: true
    for run() only; build_model, build_data and train checked only that it was a Recipe (adapter.r=0 was a ValueError
    from peft, train.batch_size=0 one from torch's sampler). The caller's own object goes on: its in-place changes apply.
    build_data(recipe, None) was an AttributeError deep in tokenize."""
    from peftlab import build_data, build_model, load_splits, train
    from peftlab.accel import make_accelerator

    recipe = make_recipe({"train.max_steps": 1, "train.precision": "fp32"})
    recipe.adapter.r = 0
    with pytest.raises(ConfigError, match=r"adapter.r=0"):
        build_model(recipe, num_labels=2, label_names=["negative", "positive"])
    recipe.adapter.r = 2
    model, tok, info = build_model(recipe, num_labels=2, label_names=["negative", "positive"])
    assert model.peft_config["default"].r == 2  # the change made in place applies
    with pytest.raises(ConfigError, match=r"build_data\(tokenizer=NoneType None\): give the base's tokenizer"):
        build_data(recipe, None)
    splits, names = load_splits(recipe)
    data = build_data(recipe, tok, splits=splits, label_names=names)
    recipe.train.batch_size = 0
    with pytest.raises(ConfigError, match=r"train.batch_size=0"):
        train(recipe, model, data, make_accelerator(recipe, "fp32"), tmp_path / "blocks")
    assert not (tmp_path / "blocks").exists()  # refused before any work


def test_validate_checks_a_recipe_as_run_does_and_takes_a_path(make_recipe, tmp_path, sentiment_files, tiny_bert):
    """peftlab.validate(recipe) passed train.lr='abc' and an attribute no field declares (run refused both), crashed with
    an AttributeError on a split given as a path (run accepts it), and validate('recipe.yaml') was a dataclasses
    TypeError: it now checks a Recipe through `checked`, as run does, and reads a path as load_recipe does."""
    from peftlab import validate as public_validate
    from peftlab.config import DataConfig, ModelConfig

    recipe = make_recipe()
    recipe.train.lr, recipe.train.lrr = "abc", 1e-5
    with pytest.raises(ConfigError, match=r"(?s)train.lrr: unknown key.*Did you mean 'lr'.*train.lr: expected float, got str 'abc'"):
        public_validate(recipe)
    shorthand = Recipe(model=ModelConfig(name=str(tiny_bert)), data=DataConfig(train=str(sentiment_files["train"])))
    public_validate(shorthand)  # `train: FILE` is {path: FILE}, as in a file
    path = tmp_path / "r.yaml"
    path.write_text(make_recipe().to_yaml(), encoding="utf-8")
    public_validate(path)
    public_validate(str(path))
    path.write_text(make_recipe({"train.lr": 1e-3}).to_yaml().replace("lr: 0.001", "lr: abc"), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"in .*r.yaml:\n  - train.lr: expected float, got str 'abc'"):
        public_validate(path)
    with pytest.raises(ConfigError, match=r"validate\(recipe=int 3\): give a Recipe \(load_recipe's\), the path of a YAML recipe or its tree"):
        public_validate(3)


def test_the_python_api_takes_a_recipe_mapping_and_dict_overrides_and_names_a_wrong_argument(make_recipe, tmp_path):
    """run(dict) / run(None) / run(123) were AttributeErrors on to_dict, load_recipe(dict) a pathlib TypeError,
    Recipe(**yaml_tree) an AttributeError on best_metric, load_trained(out, recipe='x'), load_adapters([folder]) and
    compose(folder, 1, out) tracebacks from deep inside, a folder argument of another type (evaluate(123)) pathlib's
    TypeError; evaluate's and merge's overrides as a dict were read as 'expected
    KEY=VALUE' about its keys, and evaluate(split='dev') was headed 'invalid recipe'. A recipe's tree (a mapping) is read
    as a file is, a dict of overrides sets each key to its value, every other wrong argument is one ConfigError."""
    from peftlab import compose, evaluate, load_adapters, load_trained, merge

    recipe = make_recipe({"train.max_steps": 1, "train.eval_every": None})
    tree = yaml.safe_load(recipe.to_yaml())
    from_tree = load_recipe(tree, {"train.lr": 1e-3, "data.label_names": ["negative", "positive"], "train.eval_every": None})
    (tmp_path / "tree.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
    assert from_tree.to_dict() == load_recipe(tmp_path / "tree.yaml", ["train.lr=1e-3", "data.label_names=[negative, positive]",
                                                                        "train.eval_every=null"]).to_dict()
    assert tree == yaml.safe_load(recipe.to_yaml())  # the caller's mapping is not changed
    with pytest.raises(ConfigError, match=r"invalid recipe:\n  - train.lr: expected float, got str 'abc'"):
        run({**tree, "train": {**tree["train"], "lr": "abc"}})  # a mapping goes through load_recipe
    for bad in (None, 123):
        with pytest.raises(ConfigError, match=rf"invalid argument:\n  - run\(recipe=\w+ {bad}\): give a Recipe .*mapping"):
            run(bad)
    with pytest.raises(ConfigError, match=r"load_recipe\(bytes b'x.yaml'\): give the path of a YAML recipe"):
        load_recipe(b"x.yaml")
    with pytest.raises(ConfigError, match=r"Recipe\(model=\{...\}.*a section given as a mapping.*load_recipe\(tree\)"):
        Recipe(**tree)
    with pytest.raises(ConfigError, match=r"load_trained\(recipe=str 'x'\): give a Recipe"):
        load_trained(tmp_path, recipe="x")
    with pytest.raises(ConfigError, match=r"load_adapters\(sources=list .*give a mapping of adapter name to run folder"):
        load_adapters([str(tmp_path)])
    with pytest.raises(ConfigError, match=r"compose\(outs='.*', weights=1\): give a list of two or more run folders"):
        compose(str(tmp_path), 1, tmp_path / "c")

    # a folder argument of another type was pathlib's "expected str, bytes or os.PathLike object"; '' read the working directory
    from peftlab import export, load_adapter, publish, read_run
    for call, where in ((lambda: evaluate(123), r"evaluate\(out\)=int 123"), (lambda: merge(None), r"merge\(out\)=NoneType None"),
                        (lambda: evaluate(tmp_path, results_dir=5), r"evaluate\(results_dir\)=int 5"),
                        (lambda: load_trained(""), r"load_trained\(out\)=str ''"), (lambda: read_run(3.5), r"read_run\(out\)=float 3.5"),
                        (lambda: publish(7, to=tmp_path / "p"), r"publish\(out\)=int 7"), (lambda: load_adapter(5), r"load_adapter\(id_or_path\)=int 5"),
                        (lambda: compose([tmp_path, 2], [0.5, 0.5], tmp_path / "c"), r"compose\(outs\[1\]\)=int 2"),
                        (lambda: export(1, None, None, recipe, {}, {}), r"export\(out\)=int 1")):
        with pytest.raises(ConfigError, match=rf"^invalid argument:\n  - {where}: give a path \(a non-empty str or a pathlib.Path\)"):
            call()

    out = run(from_tree) and from_tree.out
    with pytest.raises(ConfigError, match=r"^invalid argument:\n  - split='dev'"):
        evaluate(out, split="dev")
    with pytest.raises(ConfigError, match=r"adapter.r=2: an evaluation loads the run's weights as trained"):
        evaluate(out, overrides={"adapter.r": 2})  # (was: "override 'adapter.r': expected KEY=VALUE")
    with pytest.raises(FileNotFoundError, match=r"merge takes model.name and model.revision only .*not adapter.r=2"):
        merge(out, overrides={"adapter.r": 2})


def test_the_python_api_takes_paths_and_says_what_it_refuses(make_recipe, tmp_path, monkeypatch):
    """run() takes a recipe path; a Path output_dir is written as text; one override string is one override; evaluate()
    refuses a split it does not score before loading the model; the building blocks take str output folders."""
    from peftlab import build_data, build_model, evaluate, export, load_trained, train
    from peftlab.accel import make_accelerator

    recipe = make_recipe({"train.max_steps": 2, "train.precision": "fp32"})
    recipe.output_dir = tmp_path / "api"
    path = tmp_path / "api.yaml"
    path.write_text(recipe.to_yaml(), encoding="utf-8")
    assert load_recipe(path, "train.max_steps=3").train.max_steps == 3
    assert run(str(path)).steps == 2
    assert yaml.safe_load((tmp_path / "api" / "recipe.yaml").read_text())["output_dir"] == str(tmp_path / "api")

    monkeypatch.setattr(sys.modules["peftlab.run"], "rebuild", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ConfigError, match="split='train': an evaluation scores one of eval, test"):
        evaluate(tmp_path / "api", split="train")
    with pytest.raises(FileNotFoundError, match="no data.test split"):
        evaluate(tmp_path / "api", split="test")
    # results_dir an existing file (or under one): was a FileExistsError once the whole evaluation had run
    with pytest.raises(ArtifactError, match=r"results_dir .*api.yaml is a file: the evaluation writes eval-eval.json into a folder"):
        evaluate(tmp_path / "api", results_dir=path)
    with pytest.raises(ArtifactError, match=r"results_dir .*api.yaml/x cannot be created: .*api.yaml is a file"):
        evaluate(tmp_path / "api", results_dir=path / "x")
    monkeypatch.undo()

    splits, names = load_splits(recipe)
    model, tok, _ = build_model(recipe, num_labels=2, label_names=names, precision="fp32")
    model, _ = train(recipe, model, build_data(recipe, tok, splits=splits, label_names=names), make_accelerator(recipe, "fp32"),
                     str(tmp_path / "blocks"))
    export(str(tmp_path / "blocks"), model, tok, recipe, {"label_names": names, "precision": "fp32"}, {})
    assert load_trained(str(tmp_path / "blocks"))[3].label_names == names
