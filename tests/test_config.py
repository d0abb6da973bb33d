"""Recipes: YAML + overrides -> typed config; every problem reported at once, with field, value and fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftlab.config import Recipe, describe_fields, load_recipe
from peftlab.errors import ConfigError

from .conftest import REPO, SHARED


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_defaults_are_a_minilm_lora_recipe_without_data():
    r = load_recipe(None, validate_files=False)
    assert isinstance(r, Recipe)
    assert (r.model.name, r.adapter.method, r.task.type) == ("minilm", "lora", "classification")
    assert (r.data.train, r.data.eval, r.data.test) == (None, None, None)  # no data path comes from a default (issue 16)
    assert r.out == Path("runs/run")


def test_dotted_overrides_are_typed(tmp_path):
    r = load_recipe(None, ["train.lr=1e-4", "adapter.r=16", "adapter.target_modules=[query,key]",
                           "data.train=x.tsv", "name=abc"], validate_files=False)
    assert r.train.lr == 1e-4 and isinstance(r.train.lr, float)
    assert r.adapter.r == 16
    assert r.adapter.target_modules == ["query", "key"]
    assert r.data.train.path == "x.tsv"  # a string is shorthand for {path: ...}
    assert r.out == Path("runs/abc")


def test_unknown_keys_get_did_you_mean(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_recipe(write(tmp_path, "adaptor: {r: 4}\ntrain: {lr: 1e-4, epoch: 2}\n"), validate_files=False)
    msg = str(e.value)
    assert "adaptor: unknown key. Did you mean 'adapter'?" in msg
    assert "train.epoch: unknown key. Did you mean 'epochs'?" in msg
    assert len(e.value.problems) == 2  # the valid keys beside them are fine


def test_every_problem_is_reported_at_once(tmp_path):
    text = "adapter: {r: 0, dropout: 1.5, method: lorra}\ntrain: {lr: -1, batch_size: two}\nquant: {mode: 4bit}\n"
    with pytest.raises(ConfigError) as e:
        load_recipe(write(tmp_path, text), validate_files=False)
    msg = str(e.value)
    for needle in ("train.batch_size: expected int, got str 'two'", "adapter.r=0", "adapter.dropout=1.5",
                   "adapter.method='lorra'", "Did you mean 'lora'?", "train.lr=-1"):
        assert needle in msg, msg
    assert len(e.value.problems) == 5


def test_quantized_full_finetuning_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="quantized weights cannot be trained"):
        load_recipe(None, ["quant.mode=4bit", "adapter.method=full"], validate_files=False)


def test_malformed_yaml_names_the_line(tmp_path):
    with pytest.raises(ConfigError, match=r"malformed YAML at line 3, column 1"):
        load_recipe(write(tmp_path, "train:\n  lr: [1e-4\n"))


def test_missing_recipe_and_bad_override():
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe("nope.yaml")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_recipe(None, ["train.lr"], validate_files=False)


def test_missing_data_file_is_a_validation_problem(tmp_path):
    with pytest.raises(ConfigError, match=r"data.train.path='missing.tsv': file not found"):
        load_recipe(None, ["data.train=missing.tsv"])


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        load_recipe(None, ["adapter.r=-3"], validate_files=False)


def test_describe_fields_documents_every_key():
    rows = describe_fields()
    keys = {k for k, _, _ in rows}
    assert {"adapter.r", "train.lr", "data.train.path", "quant.mode", "export.merge"} <= keys
    assert all(h for _, _, h in rows), [k for k, _, h in rows if not h]
    helps = {k: h for k, _, h in rows}  # a field's allowed values are in its help (`peftlab train --help`)
    assert "One of: linear, cosine" in helps["train.scheduler"] and "nf4, fp4" in helps["quant.quant_type"], helps["train.scheduler"]
    defaults = {k: d for k, d, _ in rows}  # as a recipe or an override writes them (train.max_steps=None was refused)
    assert (defaults["train.max_steps"], defaults["quant.double_quant"], defaults["model.trust_remote_code"]) == ("null", "true", "false")
    assert (defaults["adapter.r"], defaults["model.name"]) == ("8", "'minilm'")
    from peftlab.tasks import lower_is_better  # the direction the help gives is the one keep-best takes

    assert "ending in 'loss' or 'perplexity'" in helps["train.best_metric"] and lower_is_better("perplexity")


RECIPES = sorted((REPO / "recipes").glob("*/*.yaml")) + [REPO / "peftlab/recipes/quickstart.yaml"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_recipe_validates(path, monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name data relative to the repository root
    load_recipe(path, validate_files=SHARED.is_dir())
    header = path.read_text().splitlines()[:3]
    assert any("peftlab train" in line for line in header), f"{path}: the header comment must give the command"


def test_recipes_exist_for_the_issue():
    # relative to the repository root: the checkout's own folder name (often `peftlab`) must not matter
    names = {p.relative_to(REPO / "recipes").as_posix() for p in RECIPES if p.relative_to(REPO).parts[0] == "recipes"}
    assert {"minilm/sst2-lora.yaml", "minilm/sst2-qlora.yaml", "minilm/agnews-lora.yaml", "roberta-base/sst2-lora.yaml"} <= names


def test_an_unknown_quant_mode_is_one_problem_not_two(tmp_path):
    """quant.mode=3bit: the field check names it; the method's quantization support does not add a false second one."""
    from peftlab import load_recipe
    from peftlab.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        load_recipe(None, ["quant.mode=3bit", "data.train.path=x.tsv"], validate_files=False)
    assert "quant.mode" in str(e.value) and "does not support it" not in str(e.value), str(e.value)


@pytest.mark.parametrize("mode, option, value", [("8bit", "quant_type", "fp4"), ("8bit", "compute_dtype", "bfloat16"),
                                                 ("8bit", "double_quant", "false"), ("none", "compute_dtype", "bfloat16"),
                                                 ("none", "quant_type", "fp4")])
def test_a_quant_option_the_mode_does_not_read_is_warned_about(mode, option, value, caplog):
    """Only 4-bit quantization reads quant_type, double_quant and compute_dtype: set otherwise they were accepted and
    changed nothing, silently. validate and train warn (a saved run's recipe.yaml with one still opens); defaults pass."""
    from peftlab.run import preflight

    recipe = load_recipe(None, [f"quant.mode={mode}", f"quant.{option}={value}", "data.train.path=x.tsv"], validate_files=False)
    with caplog.at_level("WARNING", logger="peftlab"):
        preflight(recipe)
    assert f"quant.{option}={value}: only 4-bit quantization reads them (quant.mode={mode}), so ignored" in caplog.text
    caplog.clear()
    for overrides in (["quant.mode=4bit", f"quant.{option}={value}"],
                      [f"quant.mode={mode}", "quant.quant_type=nf4", "quant.double_quant=true", "quant.compute_dtype=auto"]):
        with caplog.at_level("WARNING", logger="peftlab"):
            preflight(load_recipe(None, [*overrides, "data.train.path=x.tsv"], validate_files=False))
        assert "only 4-bit" not in caplog.text


def test_label_options_on_a_task_that_learns_no_labels_are_warned_about(caplog):
    """data.label_names and a split's label_map on sft (or summarization; a label_map on clm, mlm) were accepted and changed nothing,
    silently: validate said ok. validate and train warn; a classification recipe's are read, so no warning."""
    from peftlab.run import preflight

    for task, warned in (("sft", True), ("classification", False)):
        caplog.clear()
        recipe = load_recipe(None, [f"task.type={task}", "data.train.path=x.tsv", "data.label_names=[a, b]", "data.train.label_map={x: a}"],
                             validate_files=False)
        with caplog.at_level("WARNING", logger="peftlab"):
            preflight(recipe)
        said = f"data.label_names=['a', 'b'], data.train.label_map={{'x': 'a'}}: task.type={task} learns no labels, so ignored"
        assert (said in caplog.text) == warned, caplog.text


def test_a_metric_fn_on_a_task_that_does_not_read_it_is_warned_about(caplog):
    """eval.metric_fn on classification or summarization computed nothing, silently (a module that does not exist too)."""
    from peftlab.run import preflight

    recipe = load_recipe(None, ["data.train.path=x.tsv", "eval.metric_fn=no_such_module:score"], validate_files=False)
    with caplog.at_level("WARNING", logger="peftlab"):
        preflight(recipe)
    assert "eval.metric_fn=no_such_module:score: task.type=classification does not read it" in caplog.text


def test_a_malformed_list_override_is_refused_not_taken_as_a_string():
    from peftlab import load_recipe
    from peftlab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"override 'adapter.target_modules=\[query,': .* not a valid YAML list"):
        load_recipe(None, ["adapter.target_modules=[query,", "data.train.path=x.tsv"], validate_files=False)
    assert load_recipe(None, ["adapter.target_modules=[query, value]", "data.train.path=x.tsv"],
                       validate_files=False).adapter.target_modules == ["query", "value"]


@pytest.mark.parametrize("raw, value", [("Summary: {source}", "Summary: {source}"), ("{text} ->", "{text} ->"),
                                        ("'Q: {text}'", "Q: {text}"), ("' negative'", " negative"), ("2024", "2024")])
def test_a_text_field_takes_its_override_as_text(raw, value):
    """A prompt template is no YAML mapping and a year is no int when the field is a string: the text as written
    (YAML quotes still work, e.g. to keep a leading space)."""
    from peftlab import load_recipe

    recipe = load_recipe(None, [f"task.prompt={raw}", f"name={raw}", "data.train.path=x.tsv"], validate_files=False)
    assert recipe.task.prompt == value and recipe.name == value


def test_a_section_given_as_one_value_says_how_to_write_it(tmp_path):
    from peftlab import load_recipe
    from peftlab.errors import ConfigError

    path = tmp_path / "r.yaml"
    path.write_text("model: minilm\ndata:\n  train: x.tsv\n")  # (a split's path shorthand stays allowed)
    with pytest.raises(ConfigError) as e:
        load_recipe(path, validate_files=False)
    assert "model: expected a section (a mapping of its keys), got 'minilm'. Write it as a section: `model: {name: minilm}`" \
        in str(e.value) and "unknown key" not in str(e.value)


def test_a_null_section_and_a_key_under_a_plain_value_are_named_as_sections(tmp_path):
    """`train=null` said "give a TrainConfig" (a class name); model.name.x=1 turned model.name into {path: ..., x: 1}
    (the split's path shorthand) and said "expected str, got dict"."""
    from peftlab import load_recipe
    from peftlab.errors import ConfigError

    path = tmp_path / "r.yaml"
    path.write_text("model: {name: minilm}\ndata: null\n")
    with pytest.raises(ConfigError) as e:
        load_recipe(path, ["train=null", "model.name.x=1"], validate_files=False)
    for needle in ("data: null is not allowed; give it as a section (a mapping of its keys)",
                   "train: null is not allowed; give it as a section", "override model.name.x: model.name is not a section."):
        assert needle in str(e.value)
    assert "Config" not in str(e.value) and "expected str" not in str(e.value)
    path.write_text("model: {name: minilm}\ndata: {train: x.tsv}\n")  # a split's path shorthand still takes its keys
    assert load_recipe(path, ["data.train.max_samples=4"], validate_files=False).data.train.max_samples == 4


def test_a_key_given_twice_and_yaml_booleans_in_place_of_words_are_explained(tmp_path):
    from peftlab import load_recipe
    from peftlab.errors import ConfigError

    path = tmp_path / "r.yaml"
    path.write_text("name: a\ntrain:\n  lr: 1e-4\n  lr: 1e-3\n")
    with pytest.raises(ConfigError, match=r"line 4.*the key 'lr' is given twice \(lines 3 and 4\)") as e:
        load_recipe(path, validate_files=False)
    assert str(e.value).endswith("only the last would count. Keep one.")  # (not a syntax error's 'Check indentation and quoting.')
    path.write_text("data:\n  train: x.tsv\n  label_names: [no, yes]\n")
    with pytest.raises(ConfigError, match=r"got \[False, True\]. YAML reads yes/no/on/off/true/false as booleans: quote"):
        load_recipe(path, validate_files=False)


def test_yaml_merge_keys_work_and_a_key_given_twice_is_still_refused(tmp_path):
    """`<<: *anchor` was reported as malformed YAML (each key was built before YAML merged them); a key the merge
    brings in may be set again beside it, and a key given twice in the mapping itself is still refused."""
    path = write(tmp_path, "data:\n  train: &split\n    path: t.csv\n    column_names: [sentence, label]\n"
                           "  eval:\n    <<: *split\n    path: e.csv\n")
    r = load_recipe(path, validate_files=False)
    assert (r.data.eval.path, r.data.eval.column_names, r.data.train.path) == ("e.csv", ["sentence", "label"], "t.csv")
    path.write_text("data:\n  train: &split {path: t.csv}\n  eval:\n    <<: *split\n    path: e.csv\n    path: f.csv\n")
    with pytest.raises(ConfigError, match=r"the key 'path' is given twice \(lines 5 and 6\)"):
        load_recipe(path, validate_files=False)


def test_an_attribute_set_from_python_that_names_no_field_is_refused():
    """`recipe.train.lrr = 1e-5` passed `checked` (and `run`) silently: the recipe was rebuilt from its fields only."""
    from peftlab.config import checked

    r = load_recipe(None, ["data.train.path=x.tsv"], validate_files=False)
    r.train.lrr = 1e-5
    r.data.train.colum_names = ["a", "b"]
    with pytest.raises(ConfigError) as e:
        checked(r, validate_files=False)
    assert len(e.value.problems) == 2, e.value.problems
    assert "train.lrr: unknown key" in str(e.value) and "Did you mean 'lr'?" in str(e.value)
    assert "data.train.colum_names: unknown key" in str(e.value) and "Did you mean 'column_names'?" in str(e.value)


@pytest.mark.parametrize("overrides, needle", [
    (["data.text_columns=[sentence,label]"], "data.label_column='label' is also one of data.text_columns=['sentence', 'label']"),
    (["data.eval.path=e.tsv", "data.eval.text_columns=[y]", "data.eval.label_column=y"],
     "data.eval.label_column='y' is also one of data.eval.text_columns=['y']")])
def test_a_label_column_that_is_also_a_text_column_is_refused(overrides, needle):
    """The label column among the text columns (the answer in the input) trained a model to copy it, silently."""
    with pytest.raises(ConfigError) as e:
        load_recipe(None, ["data.train.path=x.tsv", *overrides], validate_files=False)
    assert needle in str(e.value) and len(e.value.problems) == 1
    load_recipe(None, ["data.train.path=x.tsv", "task.type=summarization", "data.target_column=summary",  # no label read
                       "data.text_columns=[label]"], validate_files=False)


@pytest.mark.parametrize("overrides, needle", [([1], "override 1: expected a KEY=VALUE string"),
                                               (["train.lr=1e-4", None], "override None: expected a KEY=VALUE string"),
                                               ({"train.lr=1e-4"}, "expected a list of KEY=VALUE strings.*or a mapping")])
def test_overrides_that_are_not_strings_are_refused(overrides, needle):
    """An override that was no string (from Python) was an AttributeError ('int' object has no attribute 'partition')."""
    with pytest.raises(ConfigError, match=needle):
        load_recipe(None, overrides, validate_files=False)
    assert load_recipe(None, None, validate_files=False).train.lr == 5e-4  # None: no overrides
    assert load_recipe(None, {"train.lr": 1e-4}, validate_files=False).train.lr == 1e-4  # a mapping: each key to its value


def test_a_default_best_metric_follows_a_task_type_changed_from_python():
    """`r.task.type = "mlm"` on a recipe that never set train.best_metric: validate said accuracy is not an mlm metric
    (the classification default Recipe had written in, carried over as if chosen). A metric set is still checked."""
    from peftlab.config import checked, validate

    r = load_recipe(None, ["data.train.path=x.tsv"], validate_files=False)
    r.task.type = "mlm"
    validate(r, check_files=False)
    assert checked(r, validate_files=False).train.best_metric == "loss"
    r = load_recipe(None, ["data.train.path=x.tsv"], validate_files=False)
    r.task.type, r.train.best_metric = "mlm", "accuracy"
    with pytest.raises(ConfigError, match="train.best_metric='accuracy': mlm keeps the best of"):
        validate(r, check_files=False)
    r = load_recipe(None, ["data.train.path=x.tsv", "train.best_metric=accuracy"], validate_files=False)
    r.task.type = "mlm"  # chosen in the file: the user's, checked
    with pytest.raises(ConfigError, match="train.best_metric='accuracy'"):
        validate(r, check_files=False)


def test_the_building_blocks_name_a_recipe_path_given_for_a_recipe(tmp_path):
    """build_model, load_splits, build_data, train and export given a recipe file's path (run() takes one) were raw
    AttributeErrors ('str' object has no attribute 'task'): one ConfigError that says to read it with load_recipe."""
    from peftlab import build_data, build_model, export, load_splits, train

    for call, where in ((lambda: build_model("r.yaml", num_labels=2, label_names=["a", "b"]), "build_model"),
                        (lambda: load_splits("r.yaml"), "load_splits"), (lambda: build_data("r.yaml", None), "build_data"),
                        (lambda: train("r.yaml", None, None, None, tmp_path), "train"),
                        (lambda: export(tmp_path / "o", None, None, "r.yaml", {}, {}), "export")):
        with pytest.raises(ConfigError, match=rf"^invalid argument:\n  - {where}\(recipe=str 'r.yaml'\): give a Recipe "
                                              r"\(load_recipe's\). Read it first: recipe = load_recipe\('r.yaml'\)."):
            call()
    with pytest.raises(ConfigError, match=r"load_splits\(recipe=dict \{\}\): give a Recipe .* load_recipe\(tree\)"):
        load_splits({})


@pytest.mark.parametrize("text, line", [("model:\n  ? [a]\n  : 1\n", 2), ("{a: 1}: 2\n", 1)])
def test_a_list_or_mapping_as_a_key_is_one_error_not_a_traceback(tmp_path, text, line):
    """A complex YAML key (`? [a]`, `{a: 1}: 2`) raised TypeError (unhashable) from the duplicate-key check."""
    with pytest.raises(ConfigError, match=rf"malformed YAML at line {line}, column \d+: a key is a (list|dict), not a name"):
        load_recipe(write(tmp_path, text), validate_files=False)


def test_a_yaml_tag_whose_value_it_cannot_read_is_one_error_not_a_traceback(tmp_path):
    """`lr: !!float x` (and `!!int`, `!!timestamp`) raised PyYAML's ValueError, which is no YAMLError: a traceback, from
    a file and from an override alike."""
    with pytest.raises(ConfigError, match=r"malformed YAML at line 2, column 7: 'x' is not a valid !!float"):
        load_recipe(write(tmp_path, "train:\n  lr: !!float x\n"), validate_files=False)
    with pytest.raises(ConfigError, match=r"'2020-13-45' is not a valid !!timestamp"):
        load_recipe(write(tmp_path, "name: !!timestamp 2020-13-45\n"), validate_files=False)
    with pytest.raises(ConfigError, match=r"train.epochs: expected float, got str '!!int x'"):
        load_recipe(None, ["train.epochs=!!int x", "data.train.path=x.tsv"], validate_files=False)
    r = load_recipe(None, ["name=!!timestamp 2020-13-45", "data.train.path=x.tsv", "train.lr=!!float 1e-4"], validate_files=False)
    assert (r.name, r.train.lr) == ("!!timestamp 2020-13-45", 1e-4)  # (a text field takes what YAML cannot read as written)


def test_a_number_or_date_in_a_text_field_of_a_file_says_to_quote_it(tmp_path):
    """`name: 2024-05-01` said "expected str, got date datetime.date(2024, 5, 1)." (no fix; the override name=2024-05-01
    is taken as text): the value as written, and the quoting that makes it text."""
    with pytest.raises(ConfigError) as e:
        load_recipe(write(tmp_path, "name: 2024-05-01\ntask: {prompt: 12}\ndata: {train: x.tsv}\n"), validate_files=False)
    assert "name: expected str, got date 2024-05-01. Quote it to make it text: name: '2024-05-01'." in str(e.value)
    assert "task.prompt: expected str, got int 12. Quote it to make it text: prompt: '12'." in str(e.value)
    assert "datetime" not in str(e.value)
