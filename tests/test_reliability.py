"""Reliability and security: real kills lose nothing, Ctrl-C saves, a full disk replaces nothing, pickle weights are
refused, and fuzzed recipes / column mappings either load or raise peftlab's own error."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftlab import load_recipe, load_splits, run
from peftlab.errors import ArtifactError, ConfigError, DataError, ModelError, PeftlabError
from peftlab.rundir import RunDir

from .conftest import REPO, wait_for, write_tsv
from .test_train import losses

SLOW_RUN = {"train.epochs": 12, "train.save_every": 4, "train.log_every": 4, "train.keep_checkpoints": 3}


def cli(recipe_path: Path, overrides: dict) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = [f"{k}={'null' if v is None else v}" for k, v in overrides.items()]
    return subprocess.Popen([sys.executable, "-m", "peftlab.cli", "-q", "train", str(recipe_path), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_sigkill_leaves_a_loadable_checkpoint_and_resume_matches(make_recipe, tmp_path):
    """Kill -9 a real training process mid-run; --resume must finish with the same losses as a run never stopped."""
    reference = run(make_recipe({**SLOW_RUN, "output_dir": tmp_path / "ref"}))
    killed_dir = tmp_path / "killed"
    make_recipe()  # writes tmp_path/recipe.yaml
    proc = cli(tmp_path / "recipe.yaml", {**SLOW_RUN, "output_dir": killed_dir})
    wait_for(lambda: len(list((killed_dir / "checkpoints").glob("step-*"))) >= 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed_dir / "run.json").exists()  # it really died before finishing
    resumed = run(make_recipe({**SLOW_RUN, "output_dir": killed_dir}), resume=True)
    assert resumed["steps"] == reference["steps"]
    # the log holds the killed run's lines up to its checkpoint, then the resumed ones: each step once, as if never stopped
    def steps(out):
        return [(r["step"], r["kind"]) for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())]
    assert steps(killed_dir) == steps(tmp_path / "ref")
    assert losses(killed_dir) == pytest.approx(losses(tmp_path / "ref"), abs=1e-6)
    assert resumed["metrics"]["eval"] == pytest.approx(reference["metrics"]["eval"], abs=1e-6)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])  # Ctrl-C; a scheduler's notice before it kills
def test_sigint_or_sigterm_saves_a_checkpoint_and_exits_cleanly(make_recipe, tmp_path, signum):
    out = tmp_path / "int"
    make_recipe()
    proc = cli(tmp_path / "recipe.yaml", {**SLOW_RUN, "train.save_every": None, "output_dir": out})
    wait_for(lambda: (out / "log.jsonl").is_file() and (out / "log.jsonl").stat().st_size > 0, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert "checkpoint saved" in err and "--resume" in err and "Traceback" not in err
    ckpts = list((out / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1
    stopped = json.loads((ckpts[0] / "trainer_state.json").read_text())
    assert stopped["wall_seconds"] >= stopped["train_seconds"] > 0  # the stopped session's time is kept
    resumed = run(make_recipe({**SLOW_RUN, "train.save_every": None, "output_dir": out}), resume=True)
    assert resumed["steps"] == 192
    # the wall time adds up over both sessions (it holds the training time, evaluations and checkpoints besides)
    assert resumed["train_wall_s"] >= resumed["train_seconds"] and resumed["train_wall_s"] > stopped["wall_seconds"]


def test_an_interrupt_before_the_first_log_line_keeps_its_checkpoint(make_recipe, monkeypatch):
    """A new run stopped before its first log.jsonl line (log_every 20 by default: any Ctrl-C in the first 20 steps)
    said "checkpoint saved ... --resume" and then deleted the folder, checkpoint and all."""
    from peftlab.errors import TrainingInterrupted

    recipe = make_recipe({"train.max_steps": 4, "train.log_every": 50})
    monkeypatch.setattr(sys.modules["peftlab.train"], "stop_requested", lambda flag, accelerator: True)  # as if Ctrl-C came during step 1
    with pytest.raises(TrainingInterrupted, match="interrupted at step 1 of 4: checkpoint saved"):
        run(recipe)
    assert sorted(p.name for p in (recipe.out / "checkpoints").iterdir()) == ["inputs.json", "step-1"]  # (its data's sha256)
    monkeypatch.undo()
    assert run(make_recipe({"train.max_steps": 4, "train.log_every": 50}), resume=True)["steps"] == 4


@pytest.mark.parametrize("signum, save_every", [(signal.SIGINT, 3), (signal.SIGTERM, 3), (signal.SIGINT, None)])
def test_a_stop_in_the_final_evaluation_keeps_the_training_for_resume(make_recipe, tmp_path, monkeypatch, signum, save_every):
    """A Ctrl-C or SIGTERM after the last step (the final evaluation, export) lost every trained step with a bare
    "interrupted" (SIGTERM: no message at all). The last step now has a checkpoint (train.save_every), --resume only
    evaluates and exports it, and the result is the uninterrupted run's; without checkpoints the error says so."""
    from safetensors.torch import load_file

    from peftlab.errors import TrainingInterrupted

    run_module = sys.modules["peftlab.run"]
    ov = {"train.max_steps": 4, "train.save_every": save_every}
    full = run(make_recipe({**ov, "output_dir": tmp_path / "full"}))
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").glob("step-*")) == (["step-3", "step-4"] if save_every else [])
    export = run_module.export  # (the last step's evaluation is the final one's pass over data.eval: a stop in it stops
    # the loop, test_a_stop_in_the_last_step_skips_its_evaluation_and_resume_makes_it)

    def stopped(*args, **kwargs):
        os.kill(os.getpid(), signum)
        return export(*args, **kwargs)

    monkeypatch.setattr(run_module, "export", stopped)
    with pytest.raises(TrainingInterrupted, match=r"interrupted after training \(step 4\), in the final evaluation or export: "
                       + ("checkpoint .*step-4 holds the trained model.*--resume" if save_every else "no checkpoint .*--overwrite")) as e:
        run(make_recipe({**ov, "output_dir": tmp_path / "part"}))
    assert e.value.code == 128 + signum
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back
    if not save_every:
        with pytest.raises(ArtifactError, match="stopped before it finished and has no checkpoint.*--overwrite"):
            run(make_recipe({**ov, "output_dir": tmp_path / "part"}))
        with pytest.raises(ArtifactError, match="nothing to continue: start the run again with --overwrite"):
            run(make_recipe({**ov, "output_dir": tmp_path / "part"}), resume=True)
        return
    resumed = run(make_recipe({**ov, "output_dir": tmp_path / "part"}), resume=True)
    assert resumed["steps"] == 4 and resumed["metrics"] == full["metrics"]
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("full", "part"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_a_stop_in_the_last_step_skips_its_evaluation_and_resume_makes_it(make_recipe, tmp_path, monkeypatch):
    """Ctrl-C during the last step ("saving a checkpoint after this step") still ran that step's whole in-loop
    evaluation, then stopped. It now stops at once; --resume makes that evaluation (its history entry, keep_best's
    choice), so the resumed run's history, kept step and metrics are an uninterrupted run's."""
    from peftlab.errors import TrainingInterrupted
    from peftlab.tasks import classification

    train_module = sys.modules["peftlab.train"]
    ov = {"train.max_steps": 4, "train.eval_every": 2, "train.log_every": 1, "train.keep_best": True}
    full = run(make_recipe({**ov, "output_dir": tmp_path / "full"}))
    assert [h["step"] for h in full["history"]] == [2, 4]
    write, evaluate, evaluated = train_module.RunLog.write, classification.evaluate, []

    def stop_in_the_last_step(self, step, kind, record):
        if (step, kind) == (4, "train"):  # the last step's log line: the signal arrives during that step
            os.kill(os.getpid(), signal.SIGINT)
        return write(self, step, kind, record)

    monkeypatch.setattr(train_module.RunLog, "write", stop_in_the_last_step)
    monkeypatch.setattr(classification, "evaluate", lambda *a, **k: evaluated.append(1) or evaluate(*a, **k))
    with pytest.raises(TrainingInterrupted, match="interrupted at step 4 of 4: checkpoint saved"):
        run(make_recipe({**ov, "output_dir": tmp_path / "part"}))
    assert len(evaluated) == 1  # step 2's; not step 4's
    monkeypatch.undo()
    resumed = run(make_recipe({**ov, "output_dir": tmp_path / "part"}), resume=True)
    assert resumed["history"] == full["history"] and resumed["best_step"] == full["best_step"]
    assert resumed["metrics"] == full["metrics"]
    def lines(out):
        return [(r["step"], r["kind"]) for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())]
    assert lines(tmp_path / "part") == lines(tmp_path / "full")


def test_a_stop_while_merging_says_the_run_was_exported_and_how_to_merge(make_recipe, monkeypatch):
    """export.merge runs after the run is exported: a stop there said --resume, which answers "a finished run"."""
    from peftlab.errors import TrainingInterrupted

    run_module = sys.modules["peftlab.run"]
    merge = run_module.merge
    monkeypatch.setattr(run_module, "merge", lambda out: (os.kill(os.getpid(), signal.SIGINT), merge(out))[1])
    recipe = make_recipe({"train.max_steps": 2, "train.save_every": 2, "export.merge": True})
    with pytest.raises(TrainingInterrupted, match=r"the run was exported; its merge was cut short: `peftlab merge .*` writes merged/"):
        run(recipe)
    assert (recipe.out / "run.json").is_file()


def test_a_stop_or_a_failure_while_merging_an_overwrite_leaves_the_new_run_in_place(make_recipe, monkeypatch, caplog):
    """export.merge of an --overwrite ran in the staging folder, before the swap: a Ctrl-C there left the finished run
    in runs/.NAME.staging with two contradicting messages ("move it there yourself"; "`peftlab merge STAGING`", which left
    runs/NAME old), and --resume answered "a finished run". The run is swapped in first, then merged in place."""
    from peftlab import merge
    from peftlab.errors import TrainingInterrupted

    run_module = sys.modules["peftlab.run"]
    recipe = make_recipe({"train.max_steps": 2, "export.merge": True})
    run(recipe)
    old = (recipe.out / "merged" / "model.safetensors").read_bytes()
    recipe = make_recipe({"train.max_steps": 3, "export.merge": True})
    with monkeypatch.context() as m:
        m.setattr(run_module, "merge", lambda out: (os.kill(os.getpid(), signal.SIGINT), merge(out))[1])
        with pytest.raises(TrainingInterrupted, match=rf"in the merge \(export.merge\): the run was exported; its merge was cut "
                           rf"short: `peftlab merge {recipe.out}` writes merged/") as e:
            run(recipe, overwrite=True)
    assert e.value.code == 130 and not RunDir(recipe.out).staging.exists()
    assert json.loads((recipe.out / "run.json").read_text())["steps"] == 3 and not (recipe.out / "merged").exists()
    with pytest.raises(ArtifactError, match=rf"nothing to resume. Its merged model is missing .*`peftlab merge {recipe.out}`"):
        run(recipe, resume=True)
    merged = merge(recipe.out)  # what the message says: the new run's merged/
    assert (merged / "model.safetensors").read_bytes() != old
    # a merge that fails (no signal): the new run is in place as well, and the log says how to merge it
    def broken(out):
        raise ModelError("the base cannot be loaded")

    monkeypatch.setattr(run_module, "merge", broken)
    with caplog.at_level(logging.WARNING, logger="peftlab"), pytest.raises(ModelError, match="cannot be loaded"):
        run(make_recipe({"train.max_steps": 4, "export.merge": True}), overwrite=True)
    assert json.loads((recipe.out / "run.json").read_text())["steps"] == 4 and not RunDir(recipe.out).staging.exists()
    assert f"its merge failed (below): `peftlab merge {recipe.out}` writes merged/" in caplog.text


def test_a_stop_after_an_overwrite_exported_swaps_it_in(make_recipe, monkeypatch, caplog):
    """A Ctrl-C once the --overwrite was exported, before its swap (the trackers closing): the finished run stayed in the
    staging folder ("could not replace it ... move it there yourself"). It is swapped in."""
    train_module = sys.modules["peftlab.train"]
    run(make_recipe({"train.max_steps": 2}))
    close = train_module.RunLog.close

    def interrupted(self):
        close(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module.RunLog, "close", interrupted)
    recipe = make_recipe({"train.max_steps": 3})
    with caplog.at_level(logging.WARNING, logger="peftlab"), pytest.raises(KeyboardInterrupt):
        run(recipe, overwrite=True)
    assert json.loads((recipe.out / "run.json").read_text())["steps"] == 3 and not RunDir(recipe.out).staging.exists()
    assert "holds the new run: it was exported whole before it stopped" in caplog.text and "yourself" not in caplog.text


def test_disk_full_while_saving_replaces_nothing(make_recipe, monkeypatch):
    import peft

    recipe = make_recipe({"train.max_steps": 2})
    run(recipe)
    before = {p.name: p.read_bytes() for p in recipe.out.iterdir() if p.is_file() and p.name != "log.jsonl"}

    def full_disk(self, path, *a, **k):
        Path(path, "adapter_model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(peft.PeftModel, "save_pretrained", full_disk)
    with pytest.raises(ArtifactError, match="disk full while writing the trained weights.*intact"):
        run(make_recipe({"train.max_steps": 3}), overwrite=True)
    after = {p.name: p.read_bytes() for p in recipe.out.iterdir() if p.is_file() and p.name != "log.jsonl"}
    assert after == before
    assert not list(recipe.out.glob(".staging*"))


def test_disk_full_while_saving_a_checkpoint_says_to_resume_from_the_last_one(make_recipe, monkeypatch):
    """A disk full mid-run, at a checkpoint: the error said to run the same command again, which is refused (the folder
    holds a run); it names --resume, which continues from the checkpoint before."""
    import peftlab.rundir as rundir

    train_module = sys.modules["peftlab.train"]
    seal = rundir.seal_checkpoint

    def full_disk(folder, recipe_yaml):
        if folder.name == ".tmp-step-4":
            raise OSError(errno.ENOSPC, "No space left on device")
        seal(folder, recipe_yaml)

    recipe = make_recipe({"train.max_steps": 6, "train.save_every": 2, "train.precision": "fp32"})
    with monkeypatch.context() as m:
        m.setattr(train_module, "seal_checkpoint", full_disk)
        with pytest.raises(ArtifactError, match=r"disk full while writing the step-4.* continue from .*step-2: the same command plus --resume"):
            run(recipe)
    assert [p.name for p in (recipe.out / "checkpoints").glob("step-*")] == ["step-2"]
    assert run(recipe, resume=True)["steps"] == 6


def test_disk_full_while_writing_the_log_says_to_resume_from_the_last_checkpoint(make_recipe, monkeypatch):
    """A disk full while appending a line to the run's log (log.jsonl) ended in a raw OSError traceback."""
    train_module = sys.modules["peftlab.train"]
    line = train_module.json_text

    def full_disk(value, **kwargs):
        if value.get("step") == 5 and value.get("kind") == "train":
            raise OSError(errno.ENOSPC, "No space left on device")
        return line(value, **kwargs)

    recipe = make_recipe({"train.max_steps": 6, "train.save_every": 2, "train.log_every": 1, "train.precision": "fp32"})
    with monkeypatch.context() as m:
        m.setattr(train_module, "json_text", full_disk)
        with pytest.raises(ArtifactError, match=r"disk full while writing the log to .*log.jsonl.* continue from .*step-4: the same command plus --resume"):
            run(recipe)
    assert run(recipe, resume=True)["steps"] == 6


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), Exception("No space left on device (os error 28)")])
def test_disk_full_in_a_rust_library_says_so(make_recipe, monkeypatch, error):
    """tokenizers and safetensors raise their own types, with the OS error in the text: the same message, not a traceback."""
    from transformers import PreTrainedTokenizerBase

    def full_disk(self, *a, **k):
        raise error

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", full_disk)
    with pytest.raises(ArtifactError, match="disk full while writing the trained weights.*intact"):
        run(make_recipe({"train.max_steps": 1}))


def test_a_run_stopped_between_two_renames_is_not_a_finished_one(make_recipe, monkeypatch):
    """run.json and recipe.yaml, which make a folder a finished run, are moved in last: a run killed while its tokenizer
    files were being moved in looked finished, without a tokenizer (publish took it, --resume refused it)."""
    from peftlab.rundir import read_run

    recipe = make_recipe({"train.max_steps": 1})
    real = os.replace

    def killed(src, dst):
        if Path(src).parent.name == ".staging" and Path(src).name.startswith("tokenizer"):
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        run(recipe)
    monkeypatch.undo()
    assert not (recipe.out / "run.json").exists() and not (recipe.out / "recipe.yaml").exists()
    with pytest.raises(ArtifactError):
        read_run(recipe.out)


def test_pickle_weights_are_refused_unless_allowed(make_recipe, tmp_path, tiny_bert):
    import torch
    from transformers import AutoConfig, AutoTokenizer, BertModel

    pickled = tmp_path / "pickled"
    model = BertModel(AutoConfig.from_pretrained(tiny_bert))
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(pickled)
    recipe = make_recipe(model=pickled)
    _, names = load_splits(recipe)
    from peftlab import build_model
    from peftlab.model import model_problems

    with pytest.raises(ModelError, match="pickle files.*model.allow_pickle=true") as e:
        build_model(recipe, num_labels=2, label_names=names)
    assert model_problems(recipe) == [str(e.value)]  # `peftlab validate` says it too, in the same words
    allowed = make_recipe({"model.allow_pickle": True}, model=pickled)
    assert model_problems(allowed) == []
    build_model(allowed, num_labels=2, label_names=names)
    (pickled / "pytorch_model.bin").unlink()  # no weights at all: said so, not "only pickle files"
    with pytest.raises(ModelError, match="holds no model weights.*config.json.*save_pretrained"):
        build_model(make_recipe(model=pickled), num_labels=2, label_names=names)


def test_damaged_weights_are_one_clear_error(make_recipe, tmp_path, tiny_bert, capsys):
    """A model.safetensors cut short (an interrupted copy) or overwritten by garbage: `peftlab train` printed
    safetensors' own SafetensorError traceback ("incomplete metadata, file not fully covered"), exit status 1."""
    import shutil

    from peftlab import build_model
    from peftlab.cli import main

    _, names = load_splits(make_recipe())
    for name, damage in (("cut", lambda b: b[:5000]), ("garbled", lambda b: b"\xff" * 3000)):
        broken = tmp_path / name
        shutil.copytree(tiny_bert, broken)
        (broken / "model.safetensors").write_bytes(damage((tiny_bert / "model.safetensors").read_bytes()))
        with pytest.raises(ModelError, match=f"{name}: its weights cannot be read.*damaged or truncated.*download the model again"):
            build_model(make_recipe(model=broken), num_labels=2, label_names=names)
    assert main(["train", str(tmp_path / "recipe.yaml"), f"model.name={broken}"]) == 2
    err = capsys.readouterr().err
    assert "damaged or truncated" in err and "Traceback" not in err


def test_a_model_folder_without_its_tokenizer_files_is_refused(make_recipe, tmp_path, tiny_bert):
    """config.json + model.safetensors alone: transformers built a 5-token BertTokenizer, every word [UNK]; `validate`
    said ok and `train` trained on nothing."""
    import shutil

    from peftlab import build_model
    from peftlab.model import model_problems

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_bert / name, bare / name)
    recipe = make_recipe(model=bare)
    with pytest.raises(ModelError, match="bare: the folder holds no tokenizer files.*tokenizer.json.*save_pretrained") as e:
        build_model(recipe, num_labels=2, label_names=["negative", "positive"])
    assert model_problems(recipe) == [str(e.value)]
    assert model_problems(make_recipe()) == []  # (the tiny BERT has its tokenizer)


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
def test_a_damaged_config_or_tokenizer_is_one_clear_error(make_recipe, tmp_path, tiny_bert, name):
    """A cut-short config.json or tokenizer.json: an OSError / JSONDecodeError traceback from the tokenizer's load, and
    `validate` said 'not checked', then ok."""
    import shutil

    from peftlab import build_model
    from peftlab.model import model_problems

    broken = tmp_path / "broken"
    shutil.copytree(tiny_bert, broken)
    (broken / name).write_text((tiny_bert / name).read_text()[:40])
    recipe = make_recipe(model=broken)
    with pytest.raises(ModelError, match=f"{name} in {broken} is damaged.*copy or download the model again") as e:
        build_model(recipe, num_labels=2, label_names=["negative", "positive"])
    assert model_problems(recipe) == [str(e.value)]


def test_a_config_validate_cannot_read_is_a_problem(make_recipe, tmp_path, tiny_bert):
    """An unknown model_type, or none: `train` refuses it, `validate` logged 'not checked' and said ok."""
    import shutil

    from peftlab.model import model_problems

    for kind in ("nosucharch", None):
        folder = tmp_path / str(kind)
        shutil.copytree(tiny_bert, folder)
        config = json.loads((folder / "config.json").read_text())
        config.pop("model_type") if kind is None else config.update(model_type=kind)
        (folder / "config.json").write_text(json.dumps(config))
        assert [p for p in model_problems(make_recipe(model=folder)) if "cannot read its config" in p]


def test_a_config_that_does_not_match_the_weights_is_one_clear_error(make_recipe, tmp_path, tiny_bert):
    """hidden_size changed in config.json: transformers' RuntimeError (ignore_mismatched_sizes) was a traceback."""
    import shutil

    from peftlab import build_model

    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_bert, mixed)
    config = json.loads((mixed / "config.json").read_text())
    (mixed / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    with pytest.raises(ModelError, match=r"config.json and its weights disagree.*embeddings.*file \[32\], config \[64\].*mixed from two"):
        build_model(make_recipe(model=mixed), num_labels=2, label_names=["negative", "positive"])


def test_trust_remote_code_warns(make_recipe, caplog):
    from peftlab.bases import load_tokenizer

    recipe = make_recipe({"model.trust_remote_code": True})
    with caplog.at_level(logging.WARNING, logger="peftlab"):
        load_tokenizer(recipe.model.name, recipe)
    assert "trust_remote_code=true" in caplog.text


def test_a_tokenizer_with_nothing_to_pad_with_is_refused_when_it_loads(make_recipe, tmp_path):
    """No pad, eos or unk token: training failed in its first batch with transformers' 'Asking to pad but the tokenizer
    does not have a padding token' traceback, and validate said ok."""
    from peftlab.bases import load_tokenizer

    from .conftest import bytelevel_tokenizer

    tok = bytelevel_tokenizer()
    tok.eos_token = tok.pad_token = None
    tok.save_pretrained(tmp_path / "bare")
    recipe = make_recipe()
    with pytest.raises(ModelError, match=r"the tokenizer of .*bare has no pad token, and no eos or unk token to pad with"):
        load_tokenizer(str(tmp_path / "bare"), recipe)
    assert load_tokenizer(recipe.model.name, recipe).pad_token  # (one with a pad token loads as it did)


def test_every_row_truncated_is_an_error_in_training_and_a_warning_in_evaluation(make_recipe, tmp_path, caplog):
    long = write_tsv(tmp_path / "long.tsv", [("the movie was very good and the plot was fine too", i % 2) for i in range(20)])
    with pytest.raises(DataError, match="all 20 rows are longer than data.max_length=8"):
        run(make_recipe({"data.max_length": 8, "data.train.path": long}))
    # long documents scored on their first tokens (`peftlab eval` on long sources): said, not refused (it had no opt-out)
    from peftlab import build_data, load_splits
    from peftlab.bases import load_tokenizer

    recipe = make_recipe({"data.max_length": 8, "data.train.path": long, "data.eval.path": long})
    splits, names = load_splits(recipe, need_train=False)
    with caplog.at_level(logging.WARNING, logger="peftlab"):
        build_data(recipe, load_tokenizer(recipe.model.name, recipe), splits={**splits, "train": None}, label_names=names)
    assert "data.eval: all 20 rows are longer than data.max_length=8 tokens: each is scored on its first 8 tokens" in caplog.text


def test_fp16_on_cpu_is_refused_by_train_and_validate(make_recipe, tmp_path, capsys, monkeypatch):
    """validate said ok to train.precision=fp16 on CPU (and to a wrong PEFTLAB_AUTO_PRECISION) that train refuses."""
    import torch

    from peftlab.accel import resolve_precision
    from peftlab.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16")
    make_recipe()
    recipe = str(tmp_path / "recipe.yaml")
    assert main(["validate", recipe, "train.precision=fp16"]) == 2
    assert "train.precision=fp16 needs a CUDA GPU" in capsys.readouterr().out
    monkeypatch.setenv("PEFTLAB_AUTO_PRECISION", "fp64")
    assert main(["validate", recipe]) == 2 and "PEFTLAB_AUTO_PRECISION='fp64'" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------------- fuzzing

KEYS = ["name", "model", "name", "r", "lr", "train", "adapter", "data", "quant", "mode", "eval", "text_columns",
        "label_names", "epochs", "batch_size", "dropout", "max_length", "path", "method", "xyz", "options", "split"]
LEAF = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True),
                 st.text(max_size=8), st.lists(st.text(max_size=4), max_size=3))
TREE = st.recursive(LEAF, lambda inner: st.dictionaries(st.sampled_from(KEYS), inner, max_size=4), max_leaves=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=TREE)
def test_fuzzed_recipes_load_or_raise_config_error(tree, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "r.yaml"
    path.write_text(yaml.safe_dump(tree))
    try:
        load_recipe(path, validate_files=False)
    except ConfigError:
        pass


@settings(max_examples=150, deadline=None)
@given(overrides=st.lists(st.tuples(st.sampled_from(["train.lr", "adapter.r", "data.train", "data.text_columns", "quant",
                                                     "adapter.options", "data.label_names", "train.max_steps", "x.y"]),
                                    st.text(max_size=10)), max_size=4))
def test_fuzzed_overrides_load_or_raise_config_error(overrides):
    try:
        load_recipe(None, [f"{k}={v}" for k, v in overrides], validate_files=False)
    except ConfigError:
        pass


CELL = st.one_of(st.integers(-3, 5), st.text(alphabet="ab ,\t\"'x\n", max_size=6))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(CELL, CELL), max_size=5), header=st.sampled_from(["sentence,label", "text,y", ""]),
       text_col=st.sampled_from(["sentence", "text", "missing"]), label_names=st.sampled_from([None, ["neg", "pos"]]))
def test_fuzzed_column_mapping_loads_or_raises_data_error(tmp_path, rows, header, text_col, label_names):
    path = tmp_path / "f.csv"
    body = "".join(f"{json.dumps(str(a))},{json.dumps(str(b)) if isinstance(b, str) else b}\n" for a, b in rows)
    path.write_text((header + "\n" if header else "") + body)
    overrides = [f"data.train.path={path}", "data.eval=null", f"data.text_columns=[{text_col}]", "data.label_column=label"]
    if label_names:
        overrides.append("data.label_names=[neg,pos]")
    try:
        splits, names = load_splits(load_recipe(None, overrides, validate_files=False))
        assert all(0 <= y < len(names) for y in splits["train"]["label"])
    except PeftlabError:
        pass


def test_a_sigterm_outside_training_leaves_no_temporary_file(make_recipe, tmp_path):
    """`peftlab eval` killed by SIGTERM while writing its predictions left `.predictions-dev.jsonl.XXXX` in the run
    folder (the default action kills at once): the SIGTERM ends the command as Ctrl-C does, the write removes its file."""
    recipe = make_recipe({"train.epochs": 1})
    run(recipe)
    before = sorted(p.name for p in recipe.out.iterdir())
    script = ("import os, signal, sys\nreal = os.fsync\n"
              "def fsync(fd):\n    os.kill(os.getpid(), signal.SIGTERM)\n    real(fd)\n"
              "os.fsync = fsync  # a SIGTERM while the first file is being written\n"
              f"from peftlab.cli import main\nsys.exit(main(['eval', {str(recipe.out)!r}]))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 143 and "terminated (SIGTERM)" in proc.stderr, proc.stderr[-2000:]
    assert sorted(p.name for p in recipe.out.iterdir()) == before  # nothing half-written, no hidden file
