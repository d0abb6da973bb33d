"""The `peftlab` command line: the journeys of the README, and one clear message (exit 2) for user mistakes."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

import pytest
import yaml

from peftlab.cli import main
from peftlab.errors import PeftlabError

from .conftest import REPO


def test_train_eval_merge_journey(make_recipe, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = make_recipe({"train.epochs": 1})
    path = tmp_path / "recipe.yaml"
    out = tmp_path / "cli-out"
    assert main(["train", str(path), f"output_dir={out}", "export.merge=true"]) == 0
    text = capsys.readouterr().out
    assert "accuracy" in text and "macro-F1" in text and "trainable params" in text and str(out) in text
    assert (out / "merged" / "model.safetensors").is_file()
    assert main(["eval", str(out)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["accuracy"] == pytest.approx(json.loads((out / "metrics.json").read_text())["eval"]["accuracy"])
    assert (out / "eval-eval.json").is_file()
    # an evaluation of a changed recipe lands beside the run, never over the figures it was trained and reported with
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main(["eval", str(out), "eval.batch_size=3", "data.max_length=16"]) == 0
    changed = json.loads(capsys.readouterr().out)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    (elsewhere,) = (tmp_path / "runs" / "eval").iterdir()
    record = json.loads((elsewhere / "eval-eval.json").read_text())
    assert elsewhere.name.startswith("cli-out-") and record["overrides"] == ["eval.batch_size=3", "data.max_length=16"]
    assert record["metrics"]["loss"] == changed["loss"]
    for ignored in ("adapter.r=2", "adapter.method=ia3", "train.lr=7", "data.label_names=[a,b,c]"):  # the weights load as
        assert main(["eval", str(out), ignored]) == 2  # trained: refused, not ignored (the label names: run.label_names)
        assert f"{ignored.split('=')[0]}=" in (err := capsys.readouterr().err) and "changes nothing" in err
    assert main(["eval", str(out), "--adapter", str(out)]) == 2  # it evaluated --adapter and dropped the folder, silently
    assert "give a run folder" in (err := capsys.readouterr().err) and "not both" in err
    assert main(["merge", str(out)]) == 0
    assert "merged model" in capsys.readouterr().out
    assert recipe.out != out  # the override really moved the output


def test_validate_reports_each_recipe(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"adapter": {"r": 0}, "trian": {}}))
    good = REPO / "recipes" / "minilm" / "sst2-lora.yaml"
    assert main(["validate", str(good), "--no-files"]) == 0
    assert main(["validate", str(good), str(bad), "--no-files"]) == 2
    out = capsys.readouterr().out
    assert "ok" in out and "INVALID" in out and "Did you mean 'train'?" in out and "adapter.r=0" in out
    assert "checked once these are fixed" not in out  # --no-files: no such checks to come
    assert main(["validate", str(bad)]) == 2  # the recipe's problems first: it says the data's and the base's come later
    assert "data columns, base model and tokenizer are checked once these are fixed" in capsys.readouterr().out


def test_validate_checks_what_training_would_check_first(make_recipe, capsys, tmp_path, caplog):
    """Beyond the recipe: model.num_layers against the base's config, a tracker that is not installed, a teacher run
    whose labels differ; a teacher not trained yet is no problem yet (a shipped student names one trained first)."""
    make_recipe()
    recipe = str(tmp_path / "recipe.yaml")
    assert main(["validate", recipe, "model.num_layers=9"]) == 2
    assert "model.num_layers=9" in capsys.readouterr().out and main(["validate", recipe, "model.num_layers=9", "--no-files"]) == 0
    capsys.readouterr()
    import importlib.util

    if importlib.util.find_spec("aim") is None:  # a tracker this machine lacks
        assert main(["validate", recipe, "train.report_to=[aim]"]) == 2 and "pip install" in capsys.readouterr().out
    with caplog.at_level(logging.WARNING, logger="peftlab"):
        assert main(["validate", recipe, f"train.distill.teacher={tmp_path / 'not-yet'}"]) == 0
    assert "no finished run there yet, so the teacher is not checked" in caplog.text
    teacher = tmp_path / "teacher"
    assert main(["train", recipe, "train.max_steps=1", "data.label_names=[a,b]", f"output_dir={teacher}"]) == 0
    capsys.readouterr()
    assert main(["validate", recipe, f"train.distill.teacher={teacher}"]) == 2
    assert "has the label names ['a', 'b']" in capsys.readouterr().out


def test_validate_refuses_an_output_folder_train_would_refuse(make_recipe, capsys, tmp_path):
    """A file, or a folder of other files, as output_dir: `train` refuses both before any work; validate said ok."""
    make_recipe()
    recipe = str(tmp_path / "recipe.yaml")
    (tmp_path / "a-file").write_text("")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    for out, message in ((tmp_path / "a-file", "is a file, not a folder"), (tmp_path / "notes", "holds files that are not a peftlab run")):
        assert main(["validate", recipe, f"output_dir={out}"]) == 2
        assert message in capsys.readouterr().out
    assert main(["train", recipe, "train.max_steps=1"]) == 0  # a folder holding a run is fine: --resume or --overwrite
    capsys.readouterr()
    assert main(["validate", recipe]) == 0


def test_validate_finds_what_train_finds_when_it_loads_the_data_and_the_model(make_recipe, capsys, caplog, tmp_path):
    """Columns from the files' headers, the base from its config (no weights read), target_modules against the task's
    model built on the meta device: the problems `train` stops on before its first step, with the same messages."""
    make_recipe()
    recipe = str(tmp_path / "recipe.yaml")
    unlabelled = tmp_path / "extra.jsonl"
    unlabelled.write_text('{"text": "more words"}\n')
    cases = {
        "data.text_columns=[text]": "data.train: column(s) ['text'] not found; the data has ['sentence', 'label']",
        "data.eval.label_column=y": "data.eval: column(s) ['y'] not found",
        "adapter.target_modules=[query,valu]": "'valu' matches no module of BertForSequenceClassification",
        # (it blamed target_modules at train, which matched: the layer index kept none of them)
        "adapter.options={layers_to_transform: [5]}": "adapter.options {'layers_to_transform': [5]} keeps no layer that "
                                                      "adapter.target_modules=['query', 'value'] matches in "
                                                      "BertForSequenceClassification, which has 2 layers (indices 0 to 1)",
        "model.name=./no/such/model": "no such model directory",
    }
    for override, needle in cases.items():
        assert main(["validate", recipe, override]) == 2, override
        assert needle in capsys.readouterr().out, override
        assert main(["validate", recipe, override, "--no-files"]) == 0  # the recipe alone is sound
        capsys.readouterr()
        assert main(["train", recipe, override]) == 2, override  # training finds the same, in the same words
        assert needle in capsys.readouterr().err, override
    assert not (tmp_path / "out").exists()  # (and leaves no run folder)
    distill = [f"train.distill.teacher={tmp_path / 'not-yet'}", f"train.distill.unlabelled.path={unlabelled}"]
    assert main(["validate", recipe, *distill]) == 2
    assert "train.distill.unlabelled: text column(s) ['sentence'] not found" in capsys.readouterr().out
    # a method that adapts no layers does not read target_modules; neither does training
    assert main(["validate", recipe, "adapter.method=prompt_tuning", "adapter.target_modules=[nope]"]) == 0
    # offline, a hub id that is not in the cache cannot be checked: said, not refused; a typo of a packaged name is refused
    with caplog.at_level(logging.WARNING, logger="peftlab.model"):
        assert main(["validate", recipe, "model.name=someone/unknown-model"]) == 0
    assert "model.name='someone/unknown-model': not checked: the hub is offline" in caplog.text
    assert main(["validate", recipe, "model.name=minlm"]) == 2
    assert "Did you mean model.name=minilm?" in capsys.readouterr().out


@pytest.mark.parametrize("task", ["classification", "clm", "summarization"])
def test_validate_checks_target_modules_on_each_tasks_model(task, tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    from peftlab import load_recipe
    from peftlab.model import model_problems

    if task == "clm":  # a causal LM needs an end-of-sequence token between documents (validate checks it too)
        shutil.copytree(tiny_llama, tmp_path / "llama")
        tiny_llama = tmp_path / "llama"
        tok = AutoTokenizer.from_pretrained(tiny_llama)
        tok.eos_token = "[SEP]"
        tok.save_pretrained(tiny_llama)

    # a decoder summarizer reads prompt and summary (or its generation) in one sequence: they must fit the toy's 128 positions
    target = ["data.target_column=summary", "data.max_length=64", "data.max_target_length=32", "eval.max_new_tokens=32"] \
        if task == "summarization" else []
    recipe = load_recipe(None, [f"model.name={tiny_llama}", f"task.type={task}", "adapter.target_modules=[q_proj,bogus]", *target],
                         validate_files=False)
    assert len(problems := model_problems(recipe)) == 1 and "'bogus' matches no module of Llama" in problems[0]
    recipe.adapter.target_modules = ["q_proj", "v_proj"]
    assert model_problems(recipe) == []


def test_validate_reports_a_base_it_cannot_read_and_goes_on_to_the_next_recipe(make_recipe, capsys, tmp_path):
    make_recipe()
    odd = tmp_path / "odd-model"
    odd.mkdir()
    (odd / "config.json").write_text('{"model_type": "no-such-architecture"}')
    recipe = str(tmp_path / "recipe.yaml")
    assert main(["validate", recipe, recipe, f"model.name={odd}", "model.num_layers=1"]) == 2
    out = capsys.readouterr().out
    assert out.count("INVALID") == 2 and "cannot read its config" in out and "Traceback" not in out


def test_user_mistakes_print_one_message_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lr: -1}\n")
    proc = subprocess.run([sys.executable, "-m", "peftlab.cli", "train", str(bad), "data.train.path=nope.tsv"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "train.lr=-1" in proc.stderr and "data.train.path='nope.tsv': file not found" in proc.stderr
    debug = subprocess.run([sys.executable, "-m", "peftlab.cli", "--debug", "train", str(bad), "data.train.path=nope.tsv"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "train.lr=-1" in debug.stderr  # (it exited 1)


def test_unknown_model_is_a_clear_error(make_recipe, capsys, tmp_path, monkeypatch):
    make_recipe()
    assert main(["train", str(tmp_path / "recipe.yaml"), "model.name=./no/such/model"]) == 2
    assert "no such model directory" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "recipe.yaml"), "model.name=someone/unknown-model"]) == 2
    assert "could not be fetched from the hub" in capsys.readouterr().err
    # a hub id whose name holds dots is a hub id, not a file name
    assert main(["train", str(tmp_path / "recipe.yaml"), "model.name=Qwen/Qwen2.5-0.5B-Instruct"]) == 2
    assert "could not be fetched from the hub" in capsys.readouterr().err
    # ... and when the folder it would be in is here, and the hub does not have it, it is a missing folder
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert main(["train", str(tmp_path / "recipe.yaml"), "model.name=models/my-bert.v2"]) == 2
    err = capsys.readouterr().err
    assert "model.name='models/my-bert.v2': no such model directory" in err and "Nor is it a model the hub has" in err
    # a hub id in the local hub cache resolves, even beside a folder named like its owner
    from huggingface_hub import constants

    from peftlab.bases import resolve_model_path

    snapshot = tmp_path / "hub" / "models--Qwen--Qwen2.5-0.5B-Instruct" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "Qwen").mkdir()
    assert resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"


def test_help_and_the_package_import_load_no_torch():
    """`peftlab --help` answers at once: the package's API is imported on first use, and torch with it."""
    code = ("import sys, peftlab, peftlab.config; from peftlab.cli import main\n"
            "try:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "import peftlab.run, peftlab.train  # submodules named like the API's functions do not replace them\n"
            "assert callable(peftlab.run) and callable(peftlab.train) and 'torch' in sys.modules\n"
            "assert 'load_trained' in dir(peftlab) and peftlab.load_trained.__module__ == 'peftlab.export'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "adapter.r" in done.stdout
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        import peftlab

        peftlab.nope  # noqa: B018


def test_env_and_help_list_the_recipe_keys(capsys):
    assert main(["env"]) == 0
    env = json.loads(capsys.readouterr().out)
    assert env["versions"]["peft"] and env["packaged_models"]["minilm"]
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "adapter.r" in capsys.readouterr().out


def test_usage_errors_name_only_the_missing_arguments_and_merge_takes_overrides_after_its_flags(capsys):
    """`peftlab merge` alone said "required: out, KEY=VALUE" (argparse makes a nargs='*' positional without a default
    required); `merge OUT --force model.name=X` refused the override as unrecognized."""
    from peftlab.cli import build_parser

    with pytest.raises(SystemExit):
        main(["merge"])
    assert "the following arguments are required: out\n" in capsys.readouterr().err
    for command in (["merge", "o"], ["train"], ["validate"], ["select", "--candidates", "minilm"], ["eval", "o"]):
        build_parser().parse_args(command)  # no usage error: their KEY=VALUE lists may be empty
    assert build_parser().parse_args(["merge", "o", "--force", "model.name=x"]).overrides == ["model.name=x"]


def test_eval_of_the_selection_split_says_its_figure_is_optimistic(make_recipe, caplog, capsys):
    recipe = make_recipe({"train.max_steps": 4, "train.eval_every": 2, "train.early_stopping": 5})  # (its rule wants an eval
    # split, which an evaluation of test drops: nothing trains there)
    from peftlab import run

    assert run(recipe).selected_on == "eval"
    with caplog.at_level(logging.WARNING, logger="peftlab"):
        assert main(["eval", str(recipe.out)]) == 0
    assert "eval is the split this run chose its weights on" in caplog.text and "--split test data.test.path=FILE" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="peftlab"):
        assert main(["eval", str(recipe.out), "--split", "test", f"data.test.path={recipe.data.eval.path}"]) == 0
        assert main(["eval", str(recipe.out), f"data.eval.path={recipe.data.train.path}"]) == 0  # other rows: not selected on
        assert main(["eval", str(recipe.out), "adapter.r=16"]) == 2  # refused before any note on its figure
    assert "chose its weights on" not in caplog.text and "adapter.r" in caplog.text + capsys.readouterr().err
    with caplog.at_level(logging.WARNING, logger="peftlab"):
        assert main(["eval", str(recipe.out), "data.eval.max_samples=2"]) == 0  # a sample of the selection rows
    assert "eval is the split this run chose its weights on" in caplog.text


def test_eval_of_the_selection_split_does_not_call_a_test_split_on_its_file_held_out(make_recipe, caplog):
    """data.test read from data.eval's file: `peftlab eval` of the selection split said "`--split test` scores the
    held-out split", the same rows."""
    recipe = make_recipe({"train.max_steps": 4, "train.eval_every": 2, "data.test": str(make_recipe().data.eval.path)})
    from peftlab import run

    assert run(recipe).test_shares == "eval"
    with caplog.at_level(logging.WARNING, logger="peftlab"):
        assert main(["eval", str(recipe.out)]) == 0
    assert "chose its weights on" in caplog.text and "scores the held-out split" not in caplog.text, caplog.text
    assert "--split test data.test.path=FILE" in caplog.text


def test_a_recipe_path_holding_an_equals_sign_is_the_recipe(tmp_path, capsys):
    """`peftlab train /dir/lr=1e-3/rec.yaml` took the path for an override and ran the quickstart with it."""
    folder = tmp_path / "lr=1e-3"
    folder.mkdir()
    recipe = folder / "rec.yaml"
    recipe.write_text("train: {lr: -1}\n")
    assert main(["train", str(recipe), "data.train.path=nope.tsv"]) == 2
    err = capsys.readouterr().err
    assert "train.lr=-1" in err and str(recipe) in err and "unknown key" not in err, err


def test_eval_of_a_run_folder_whose_path_holds_an_equals_sign(make_recipe, tmp_path, capsys):
    """`peftlab eval runs/lr=1e-3/out` took the folder for an override and said it needs a run folder."""
    recipe = make_recipe({"train.max_steps": 2, "output_dir": tmp_path / "lr=1e-3" / "out"})
    from peftlab import run

    run(recipe)
    capsys.readouterr()
    assert main(["eval", str(recipe.out), "eval.batch_size=3"]) == 0, capsys.readouterr().err
    assert "accuracy" in json.loads(capsys.readouterr().out)


def test_a_recipe_after_an_override_or_a_missing_one_holding_an_equals_sign_is_named(tmp_path, capsys):
    """`train train.lr=1e-3 r.yaml` ran the quickstart and called r.yaml a malformed override; a mistyped
    runs/lr=1e-3/recipe.yaml was the unknown key 'runs/lr' of the quickstart, not a missing recipe file."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train: {lr: -1}\n")
    assert main(["train", "train.lr=1e-3", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"'{recipe}' comes after the override(s): give the recipe first" in err and "quickstart" not in err, err
    missing = str(tmp_path / "lr=1e-3" / "recipe.yaml")
    for command in ("train", "validate"):
        assert main([command, missing]) == 2
        said = "".join(capsys.readouterr())
        assert f"recipe file '{missing}' does not exist" in said and "unknown key" not in said, said


def test_a_refused_output_folder_suggests_name_only_where_it_names_the_folder(make_recipe, tmp_path, capsys, monkeypatch):
    """'already holds a finished run ... output_dir=DIR (or name=NEW_NAME)' for a recipe that sets output_dir, where
    another name writes to the same folder again."""
    from peftlab import run

    recipe = make_recipe()  # (sets output_dir)
    recipe.out.mkdir(parents=True)
    (recipe.out / "log.jsonl").write_text("")
    (recipe.out / "run.json").write_text("{}")
    with pytest.raises(PeftlabError, match=r"already holds a finished run: .*choose another one: output_dir=DIR\.$"):
        run(recipe)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "x").mkdir(parents=True)
    (tmp_path / "runs" / "x" / "notes.txt").write_text("mine")
    path = tmp_path / "recipe.yaml"  # (make_recipe's file)
    assert main(["validate", "--no-files", str(path), f"output_dir={tmp_path / 'runs' / 'x'}"]) == 2
    assert main(["validate", "--no-files", str(path), "output_dir=null", "name=x"]) == 2
    set_dir, by_name = [line for line in capsys.readouterr().out.splitlines() if "not a peftlab run" in line]
    assert set_dir.endswith("Choose a new or empty folder: output_dir=DIR.") and by_name.endswith("output_dir=DIR (or name=NEW_NAME).")


def test_the_cli_quiets_bitsandbytes_kernel_search_and_adalora_pattern_noise():
    """Every CLI run on an avx512_bf16 CPU began with bitsandbytes' 'Failed to load CPU gemm_4bit_forward ... pip install
    kernels' (and kernels' 'Skipping publisher trust check'), quantized or not; every AdaLoRA eval/merge printed peft's
    'rank_pattern keys did not match' for the lora_E keys AdaLoRA resizes by itself."""
    import logging
    import warnings

    from peftlab import cli

    loggers = [logging.getLogger(n) for n in ("bitsandbytes.backends.cpu.ops", "kernels")]
    levels = [lg.level for lg in loggers]
    try:
        with warnings.catch_warnings(record=True) as seen:
            cli._quiet_libraries()
            warnings.warn("The following rank_pattern keys did not match any targeted module and were ignored: "
                          "['base_model.model.bert.encoder.layer.0.attention.self.query.lora_E'].", RuntimeWarning, stacklevel=1)
            warnings.warn("The following rank_pattern keys did not match any targeted module and were ignored: ['fc9'].",
                          RuntimeWarning, stacklevel=1)  # a LoRA rank_pattern typo still warns
        assert [str(w.message)[-8:] for w in seen] == ["['fc9']."]
        assert not any(lg.isEnabledFor(logging.WARNING) for lg in loggers)
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def test_quiet_leaves_the_other_ranks_of_a_launch_at_errors_only(make_recipe, tmp_path, monkeypatch):
    """-q under --launch set every rank's peftlab logger to WARNING, above the ERROR the ranks but the first log at:
    each warning was printed once per rank, more than without -q."""
    import peftlab.cli as cli

    make_recipe()
    seen, quieted = [], cli.quieted
    monkeypatch.setattr(cli, "quieted", lambda quiet: seen.append(quiet) or quieted(quiet))
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        assert main(["-q", "validate", str(tmp_path / "recipe.yaml")]) == 0
    assert seen == [True, False]


def test_quiet_hides_the_progress_bar_and_evaluation_lines_and_puts_the_log_level_back(make_recipe, tmp_path, capsys):
    """`-q` set the log level only: the training bar and the "step N: accuracy ..." lines still printed. They go now;
    the results (the summary) stay, and the peftlab logger's level is put back after the command."""
    make_recipe()
    path, short = tmp_path / "recipe.yaml", ["train.max_steps=2", "train.eval_every=1", "train.log_every=1"]
    assert main(["train", str(path), *short, f"output_dir={tmp_path / 'loud'}"]) == 0
    loud = capsys.readouterr()
    assert "train:" in loud.err and "step 1: accuracy" in loud.out + loud.err
    assert "\reval: " in loud.err  # the evaluations' bar (there was none: a generation pass was minutes of silence)
    assert main(["eval", str(tmp_path / "loud")]) == 0 and "\reval: " in capsys.readouterr().err
    assert main(["-q", "train", str(path), *short, f"output_dir={tmp_path / 'quiet'}"]) == 0
    quiet = capsys.readouterr()
    assert "train:" not in quiet.err and "step 1:" not in quiet.out + quiet.err and "macro-F1" in quiet.out
    assert "eval:" not in quiet.err
    assert main(["-q", "eval", str(tmp_path / "quiet")]) == 0 and "eval:" not in capsys.readouterr().err
    assert logging.getLogger("peftlab").level == logging.NOTSET
    assert (tmp_path / "quiet" / "log.jsonl").read_text().count('"kind": "eval"') == 2  # the log still holds every line
