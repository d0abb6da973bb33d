"""The run folder never loses or mixes a run: staged --overwrite, one writer at a time (a lock that kill -9 frees),
checksummed weights and checkpoints, recipe-checked --resume, diverged runs export nothing, clear output_dir errors,
usual file permissions. Data-loss and concurrency cases run real `peftlab train` processes."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from peftlab import run
from peftlab.errors import ArtifactError, ConfigError, PeftlabError
from peftlab.rundir import RunDir, read_run

from .conftest import REPO, wait_for

SLOW = {"train.epochs": 40, "train.save_every": 4, "train.log_every": 4, "train.keep_checkpoints": 2}


def tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` with the sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def peftlab(*args, wait: bool = True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "peftlab.cli", "-q", *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def overrides(d: dict) -> list[str]:
    return [f"{k}={'null' if v is None else v}" for k, v in d.items()]


@pytest.fixture
def old_run(make_recipe):
    """A finished LoRA run with checkpoints, merged/ and a log: what an --overwrite must not damage."""
    recipe = make_recipe({"train.max_steps": 8, "train.save_every": 4, "export.merge": True})
    run(recipe)
    return recipe.out, tree(recipe.out)


def siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.") and not p.name.endswith(".lock"))


# ------------------------------------------------------------------------------------------- staged --overwrite

def test_failed_overwrite_leaves_the_old_run_byte_identical(old_run, tmp_path):
    out, before = old_run
    rc, _, err = peftlab("train", tmp_path / "recipe.yaml", "data.text_columns=[sentense]", "--overwrite")
    assert rc == 2 and "sentense" in err and "Traceback" not in err
    assert tree(out) == before and siblings(out) == []


def test_overwrite_killed_mid_training_keeps_the_old_run_and_resume_finishes_it(old_run, tmp_path):
    """kill -9 of an --overwrite: the old run is untouched; its staging folder keeps the new run's checkpoints, which
    --resume continues and swaps in at the end; a later --overwrite would start it over."""
    out, before = old_run
    staging = RunDir(out).staging
    ov = {**SLOW, "train.epochs": 3, "train.max_steps": None}
    proc = peftlab("train", tmp_path / "recipe.yaml", *overrides(ov), "--overwrite", wait=False)
    wait_for(lambda: len(list((staging / "checkpoints").glob("step-*"))) >= 1, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert tree(out) == before
    rc, _, err = peftlab("train", tmp_path / "recipe.yaml", *overrides(ov))
    assert rc == 2 and "--resume continues it" in err  # a plain rerun says what happened
    rc, _, err = peftlab("train", tmp_path / "recipe.yaml", *overrides(ov), "--resume")
    assert rc == 0, err
    assert not staging.exists() and json.loads((out / "run.json").read_text())["steps"] == 48  # 3 epochs of 16 steps
    assert not (out / "merged").exists()  # the new run's recipe does not merge: nothing of the old run is left


def test_overwrite_with_another_method_leaves_exactly_the_new_runs_files(old_run, make_recipe, tmp_path):
    out, _ = old_run
    fresh = make_recipe({"train.max_steps": 4, "adapter.method": "full", "output_dir": tmp_path / "fresh"})
    run(fresh)
    rc, _, err = peftlab("train", tmp_path / "recipe.yaml", "train.max_steps=4", "adapter.method=full", "--overwrite")
    assert rc == 0, err
    # the same files, TensorBoard's aside (train.report_to: auto): its event files are named by their time and process
    assert {f for f in tree(out) if not f.startswith("tb/")} == {f for f in tree(fresh.out) if not f.startswith("tb/")}
    assert not (out / "adapter_model.safetensors").exists() and (out / "model.safetensors").is_file()
    rc, printed, err = peftlab("eval", out)
    assert rc == 0, err
    assert json.loads(printed)["accuracy"] == pytest.approx(json.loads((out / "metrics.json").read_text())["eval"]["accuracy"])


def test_publish_to_and_compose_out_refuse_to_replace_a_run(make_recipe, tmp_path):
    from peftlab.compose import compose
    from peftlab.publish import publish

    a = make_recipe({"train.max_steps": 2, "output_dir": tmp_path / "a"})
    b = make_recipe({"train.max_steps": 2, "output_dir": tmp_path / "b", "train.seed": 7})
    run(a)
    run(b)
    before = tree(b.out)
    with pytest.raises(PeftlabError, match="holds a peftlab run.*new or empty directory"):
        publish(a.out, to=b.out)
    other_run = tmp_path / "c"
    shutil.copytree(b.out, other_run)
    with pytest.raises(PeftlabError, match="holds a peftlab run.*new directory"):
        compose([a.out, b.out], [0.5, 0.5], other_run)
    assert tree(b.out) == before and tree(other_run) == before
    composed = compose([a.out, b.out], [0.5, 0.5], tmp_path / "composed")
    compose([a.out, b.out], [0.7, 0.3], composed, overwrite=True)  # an earlier composition may be replaced, when asked
    rc, _, err = peftlab("publish", a.out, "--to", b.out)
    assert rc == 2 and "holds a peftlab run" in err and tree(b.out) == before


# ---------------------------------------------------------------------------------------------------- the lock

def test_a_second_writer_is_refused_and_kill_9_frees_the_folder(make_recipe, tmp_path):
    recipe = make_recipe()
    # long enough that the two refused writers below start (a few seconds each) while it still holds the folder: it is killed
    first = peftlab("train", tmp_path / "recipe.yaml", *overrides({**SLOW, "train.epochs": 2000}), wait=False)
    wait_for(lambda: (recipe.out / "log.jsonl").is_file(), first)
    for flags in ((), ("--overwrite",)):
        rc, _, err = peftlab("train", tmp_path / "recipe.yaml", "train.max_steps=2", *flags)
        assert rc == 2 and "in use by another peftlab run" in err and f"process {first.pid}" in err, err
    with pytest.raises(ArtifactError, match=f"is not finished: a peftlab process \\(process {first.pid}\\) is writing it now"):
        read_run(recipe.out)  # eval, merge, publish of a run still training (it said "interrupted? --resume")
    first.send_signal(signal.SIGKILL)
    first.wait()
    with pytest.raises(ArtifactError, match="If training was interrupted, continue it with"):  # the lock went with it
        read_run(recipe.out)
    rc, _, err = peftlab("train", tmp_path / "recipe.yaml", "train.max_steps=2", "--overwrite")
    assert rc == 0, err
    assert {json.loads(line)["step"] for line in (recipe.out / "log.jsonl").read_text().splitlines()} == {2}  # one run's log


# --------------------------------------------------------------------------------------------------- checksums

def test_truncated_weights_are_named_on_load(make_recipe, tmp_path):
    recipe = make_recipe({"train.max_steps": 2})
    run(recipe)
    weights = recipe.out / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    from peftlab import load_trained, merge
    from peftlab.publish import publish

    for load in (lambda: load_trained(recipe.out), lambda: merge(recipe.out), lambda: publish(recipe.out, to=tmp_path / "p")):
        with pytest.raises(ArtifactError, match="adapter_model.safetensors is damaged"):
            load()
    rc, _, err = peftlab("eval", recipe.out)
    assert rc == 2 and "adapter_model.safetensors is damaged" in err and "Traceback" not in err


def test_resume_falls_back_from_a_damaged_checkpoint(make_recipe, tmp_path, caplog):
    ov = {"train.epochs": 2, "train.save_every": 8, "train.keep_checkpoints": 4, "train.precision": "fp32"}
    full = run(make_recipe({**ov, "output_dir": tmp_path / "full"}))
    part = tmp_path / "part"
    for step in (8, 16):
        shutil.copytree(tmp_path / "full" / "checkpoints" / f"step-{step}", part / "checkpoints" / f"step-{step}")
    damaged = part / "checkpoints" / "step-16" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:50])
    with caplog.at_level(logging.WARNING, logger="peftlab"):
        resumed = run(make_recipe({**ov, "output_dir": part}), resume=True)
    assert "step-16/model.safetensors is damaged" in caplog.text and "previous good checkpoint step-8" in caplog.text
    assert resumed["metrics"]["eval"] == pytest.approx(full["metrics"]["eval"], abs=1e-6)
    shutil.rmtree(part)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-16", part / "checkpoints" / "step-16")
    (part / "checkpoints" / "step-16" / "optimizer.bin").write_bytes(b"")
    with pytest.raises(ArtifactError, match="no intact checkpoint.*optimizer.bin is damaged"):
        run(make_recipe({**ov, "output_dir": part}), resume=True)


# ------------------------------------------------------------------------------------------------------ resume

def test_resume_refuses_another_recipe_a_finished_run_and_overwrite(make_recipe, tmp_path):
    ov = {"train.max_steps": 8, "train.save_every": 4}
    recipe = make_recipe({**ov, "output_dir": tmp_path / "full"})
    run(recipe)
    part = tmp_path / "part"
    shutil.copytree(recipe.out / "checkpoints" / "step-4", part / "checkpoints" / "step-4")
    with pytest.raises(ArtifactError, match=r"recipe differs(.|\n)*adapter\.r: 4 -> 8(.|\n)*train\.lr") as e:
        run(make_recipe({**ov, "adapter.r": 8, "train.lr": 1e-3, "output_dir": part}), resume=True)
    listed = [line for line in str(e.value).splitlines() if line.startswith("  - ")]
    assert len(listed) == 2  # adapter.r and train.lr; output_dir differs too, but a resume may change it
    with pytest.raises(ArtifactError, match="finished run; there is nothing to resume") as e:
        run(recipe, resume=True)
    assert "merged model is missing" not in str(e.value)
    merged = make_recipe({**ov, "export.merge": True, "output_dir": tmp_path / "merged"})
    run(merged)
    shutil.rmtree(merged.out / "merged")  # a kill -9 while merging: the run is finished, its merged model is not there
    with pytest.raises(ArtifactError, match=r"nothing to resume. Its merged model is missing .*`peftlab merge .*` writes it"):
        run(merged, resume=True)
    with pytest.raises(ArtifactError, match="--resume and --overwrite together"):
        run(recipe, resume=True, overwrite=True)
    # a resume may lengthen the run: train.max_steps is a training-only key
    with pytest.raises(ConfigError, match="checkpoint .*step-4 is at step 4, past the 2 steps this recipe trains"):
        run(make_recipe({**ov, "train.max_steps": 2, "output_dir": part}), resume=True)  # it exported 4 steps, silently
    assert run(make_recipe({**ov, "train.max_steps": 12, "output_dir": part}), resume=True)["steps"] == 12


def test_the_refusals_offer_resume_only_where_there_is_a_run_to_resume(tmp_path):
    """A folder holding a finished run was told "Continue it with --resume", which then said there was nothing to resume;
    a --resume into a folder that never held a run was told to start again with --overwrite, where a plain run does."""
    out = tmp_path / "out"
    with pytest.raises(ArtifactError, match=r"no run in .*out to continue: start it without --resume\.$"):
        RunDir(out).plan(resume=True, overwrite=False)
    (out / "checkpoints" / "step-4").mkdir(parents=True)  # a run stopped with a checkpoint: --resume continues it
    with pytest.raises(ArtifactError, match="already holds a run. Continue it with --resume, replace it with --overwrite"):
        RunDir(out).plan(resume=False, overwrite=False)
    (out / "run.json").write_text("{}")  # finished
    with pytest.raises(ArtifactError, match="already holds a finished run: replace it with --overwrite") as e:
        RunDir(out).plan(resume=False, overwrite=False)
    assert "--resume" not in str(e.value)


def test_resume_refuses_another_number_of_processes(make_recipe, tmp_path, monkeypatch):
    """The checkpoint records its processes; another count (the global batch and the data position would differ) is
    refused by the run and, before launching anything, by `--launch`. An older checkpoint without the count resumes."""
    from peftlab import launch
    from peftlab.rundir import seal_checkpoint

    recipe = make_recipe({"train.max_steps": 8, "train.save_every": 4})
    run(recipe)
    ckpt = tmp_path / "part" / "checkpoints" / "step-4"
    shutil.copytree(recipe.out / "checkpoints" / "step-4", ckpt)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["num_processes"] == 1

    def written_by(n):  # None: no count at all
        older = {k: v for k, v in state.items() if k != "num_processes"}
        (ckpt / "trainer_state.json").write_text(json.dumps(older if n is None else {**older, "num_processes": n}))
        seal_checkpoint(ckpt, None)

    written_by(2)
    part = make_recipe({"train.max_steps": 8, "train.save_every": 4, "output_dir": ckpt.parents[1]})
    with pytest.raises(ArtifactError, match=r"written by 2 process\(es\), this run has 1(.|\n)*--num-processes 2(.|\n)*--overwrite"):
        run(part, resume=True)
    monkeypatch.setattr(launch, "run_forwarding_signals", lambda *a: pytest.fail("launched"))
    with pytest.raises(ArtifactError, match=r"written by 2 process\(es\), this run has 3"):
        launch.launch("cpu-ddp", "recipe.yaml", num_processes=3, resume=True, out=part.out)
    written_by(None)  # an older checkpoint: no count, trusted as before
    assert run(part, resume=True)["steps"] == 8


# ------------------------------------------------------------------------------------------------- divergence

def test_a_diverged_run_stops_and_exports_nothing(old_run, tmp_path):
    out, before = old_run
    rc, _, err = peftlab("train", tmp_path / "recipe.yaml", "train.lr=1e30", "train.max_steps=8", "train.max_grad_norm=null",
                         "output_dir=" + str(tmp_path / "nan"))
    assert rc == 2 and "training diverged" in err and "train.lr=1e+29" in err and "Traceback" not in err, err
    assert (tmp_path / "nan" / "log.jsonl").is_file()
    assert not {"run.json", "adapter_model.safetensors", "metrics.json"} & {p.name for p in (tmp_path / "nan").iterdir()}
    rc, _, err = peftlab("train", tmp_path / "recipe.yaml", "train.lr=1e30", "train.max_steps=8", "train.max_grad_norm=null",
                         "--overwrite")
    assert rc == 2 and "training diverged" in err
    assert tree(out) == before and siblings(out) == []


def test_a_diverged_run_suggests_only_what_would_change(make_recipe):
    """A run already clipped at train.max_grad_norm=1.0 and in fp32 was told to try 'gradient clipping
    (train.max_grad_norm=1.0; now 1.0) or train.precision=fp32': both what it already had."""
    from peftlab.errors import TrainingDiverged

    with pytest.raises(TrainingDiverged) as e:
        run(make_recipe({"train.lr": 1e30, "train.max_steps": 4, "train.log_every": 1, "train.precision": "fp32"}))
    message = str(e.value)
    assert "train.lr=1e+29" in message and "max_grad_norm" not in message and "precision" not in message, message
    with pytest.raises(TrainingDiverged, match=r"gradient clipping \(train.max_grad_norm=1.0; now 5.0\)"):
        run(make_recipe({"train.lr": 1e30, "train.max_steps": 4, "train.log_every": 1, "train.precision": "fp32",
                         "train.max_grad_norm": 5.0}), overwrite=True)


# ------------------------------------------------------------------------------------------------- output_dir

def test_output_dir_a_file_or_unwritable_is_one_clear_error(make_recipe, tmp_path):
    make_recipe()
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    for target, message in ((a_file, "is a file, not a folder"), (a_file / "run", "notes.txt is a file")):
        rc, _, err = peftlab("train", tmp_path / "recipe.yaml", f"output_dir={target}")
        assert rc == 2 and message in err and "Traceback" not in err, err
    assert a_file.read_text() == "mine"


def test_output_dir_holding_other_files_is_refused_even_with_overwrite(make_recipe, tmp_path):
    """A folder of the user's own files is not a run: neither a run nor an --overwrite may write into it."""
    make_recipe({"train.max_steps": 2})
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for flag in ((), ("--overwrite",)):
        rc, _, err = peftlab("train", tmp_path / "recipe.yaml", f"output_dir={mine}", *flag)
        assert rc == 2 and "not a peftlab run (notes.txt)" in err and "Traceback" not in err, err
    assert tree(mine) == {"notes.txt": hashlib.sha256(b"keep me").hexdigest()} and siblings(mine) == []
    RunDir(tmp_path / "empty").plan(resume=False, overwrite=False)  # an empty folder is fine (nothing made yet)
    (tmp_path / "empty").mkdir()
    assert RunDir(tmp_path / "empty").plan(resume=False, overwrite=False).work == tmp_path / "empty"


def test_a_failed_swap_keeps_the_old_run_and_says_where_the_new_one_is(old_run, caplog, monkeypatch):
    out, before = old_run
    folder = RunDir(out)
    job = folder.plan(resume=False, overwrite=True)
    job.prepare()
    (job.work / "run.json").write_text("{}")  # a finished new run

    def full_disk(*a):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError), caplog.at_level(logging.WARNING):
        try:
            job.commit()
        except OSError:
            job.abandon()
            raise
    monkeypatch.undo()
    assert not job.committed and tree(out) == before
    assert "finished but could not replace it" in caplog.text and (folder.staging / "run.json").is_file()


def test_unwritable_output_dir_is_one_clear_error(make_recipe, tmp_path):
    make_recipe()
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: a mode-500 folder is writable anyway")
        rc, _, err = peftlab("train", tmp_path / "recipe.yaml", f"output_dir={locked / 'run'}")
        assert rc == 2 and "not writable" in err and "Traceback" not in err, err
    finally:
        locked.chmod(0o700)


def test_exported_files_respect_the_umask(make_recipe):
    from peftlab.run import evaluate

    previous = os.umask(0o002)
    try:
        recipe = make_recipe({"train.max_steps": 2, "export.merge": True})
        run(recipe)
        evaluate(recipe.out)  # eval-eval.json: written through atomic_write_text (mkstemp)
    finally:
        os.umask(previous)
    modes = {str(p.relative_to(recipe.out)): oct(p.stat().st_mode & 0o777) for p in recipe.out.rglob("*") if p.is_file()}
    assert "eval-eval.json" in modes and "merged/model.safetensors" in modes
    assert set(modes.values()) == {"0o664"}, modes


# ------------------------------------------------------------------------------------------------- failed fresh runs, damaged records

def test_a_fresh_run_that_fails_before_training_leaves_no_folder(make_recipe, tmp_path):
    """A missing column (found once the run folder is locked) leaves nothing that would make the fixed recipe need
    --overwrite; a user's own folder that was there keeps its files."""
    recipe = make_recipe()
    rc, _, err = peftlab("train", tmp_path / "recipe.yaml", "data.text_columns=[sentense]", "name=bad")
    assert rc == 2 and "sentense" in err and "Traceback" not in err, err
    assert not (recipe.out.parent / "bad").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    rc, _, err = peftlab("train", tmp_path / "recipe.yaml", "data.text_columns=[sentense]", f"output_dir={mine}")
    assert rc == 2 and [p.name for p in mine.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("content", ['{"name": "x", ', "[]", "{}"])
def test_a_damaged_run_record_is_one_clear_error(make_recipe, tmp_path, content):
    from peftlab.run import evaluate

    recipe = make_recipe({"train.max_steps": 1})
    run(recipe)
    (recipe.out / "run.json").write_text(content)
    with pytest.raises(ArtifactError, match="run.json is damaged"):
        evaluate(recipe.out)
    rc, _, err = peftlab("merge", recipe.out)
    assert rc == 2 and "run.json is damaged" in err and "Traceback" not in err, err
    rc, _, err = peftlab("merge", tmp_path / "recipe.yaml")
    assert rc == 2 and "is a file, not a folder" in err, err


@pytest.mark.parametrize("content", [None, '{"peft_type": "LORA", ', ""])
def test_a_missing_or_damaged_adapter_config_is_one_clear_error(make_recipe, tmp_path, content):
    """An adapter without its config is not "a standalone model, nothing to merge", nor a traceback: merge, eval and
    publish name the file."""
    recipe = make_recipe({"train.max_steps": 1})
    run(recipe)
    config = recipe.out / "adapter_config.json"
    config.unlink() if content is None else config.write_text(content)
    message = "adapter_config.json is missing" if content is None else "adapter_config.json is damaged"
    for command in (("merge", recipe.out), ("eval", recipe.out), ("publish", recipe.out, "--to", tmp_path / "pub")):
        rc, _, err = peftlab(*command)
        assert rc == 2 and message in err and "Traceback" not in err, (command, err)
    assert not (tmp_path / "pub").exists() and not (recipe.out / "merged").exists()


@pytest.mark.parametrize("content", ['{"model.safetensors": ', "[1, 2]", "\xff"])
def test_damaged_checksums_make_a_checkpoint_unusable_not_a_traceback(tmp_path, content):
    from peftlab.rundir import checkpoint_problem, seal_checkpoint

    ckpt = tmp_path / "step-4"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"weights")
    (ckpt / "trainer_state.json").write_text("{}")
    seal_checkpoint(ckpt, None)
    assert checkpoint_problem(ckpt) is None
    (ckpt / "checksums.json").write_text(content)
    assert checkpoint_problem(ckpt) == f"{ckpt / 'checksums.json'} is damaged"  # so --resume falls back to an older one


@pytest.mark.parametrize("files", [(), ("model.safetensors",)])
def test_resume_skips_a_newer_checkpoint_folder_copied_in_part(make_recipe, tmp_path, files):
    """A checkpoint folder without checksums (an older peftlab's) was trusted whole: an empty step-9 (a copy cut short)
    was chosen by --resume, which failed with a FileNotFoundError traceback for its trainer_state.json."""
    recipe = make_recipe({"train.epochs": 1, "train.max_steps": 6, "train.save_every": 2, "train.keep_checkpoints": 3})
    run(recipe)
    (recipe.out / "run.json").unlink()  # as if stopped after its last checkpoint
    (recipe.out / "recipe.yaml").unlink()
    cut = recipe.out / "checkpoints" / "step-9"
    cut.mkdir()
    for name in files:
        (cut / name).write_bytes(b"part of it")
    resumed = run(recipe, resume=True)
    assert resumed.steps == 6 and (recipe.out / "run.json").is_file()


@pytest.mark.parametrize("name", ["optimizer.bin", "custom_checkpoint_0.pkl", "random_states_0.pkl"])
def test_resume_falls_back_from_a_checkpoint_without_checksums_that_lacks_a_file(make_recipe, caplog, name):
    """A checkpoint without checksums (an older peftlab's) was trusted once it held its trainer_state.json: one that
    lacked its optimizer.bin failed --resume with a FileNotFoundError traceback (its scheduler's state: a RuntimeError;
    its random states: resumed silently on other draws), not the fall-back to the checkpoint before it."""
    recipe = make_recipe({"train.max_steps": 6, "train.save_every": 2, "train.keep_checkpoints": 3})
    run(recipe)
    (recipe.out / "run.json").unlink()  # as if stopped after its last checkpoint
    (recipe.out / "recipe.yaml").unlink()
    last = recipe.out / "checkpoints" / "step-6"
    (last / "checksums.json").unlink()  # a copy cut short: trainer_state.json came over, the file and the sums did not
    (last / name).unlink()
    with caplog.at_level(logging.WARNING, logger="peftlab"):
        assert run(recipe, resume=True).steps == 6
    assert f"step-6/{name} is missing" in caplog.text and "previous good checkpoint step-4" in caplog.text


def test_a_file_missing_when_a_checkpoint_loads_is_one_clear_error(make_recipe, monkeypatch):
    """What checkpoint_problem does not check (another layout's files) and accelerator.load_state needs is named."""
    recipe = make_recipe({"train.max_steps": 2, "train.save_every": 2})
    run(recipe)
    (recipe.out / "run.json").unlink()
    (recipe.out / "checkpoints" / "step-2" / "optimizer.bin").unlink()
    monkeypatch.setattr(sys.modules["peftlab.rundir"], "checkpoint_problem", lambda ckpt: None)
    with pytest.raises(ArtifactError, match=r"checkpoint .*step-2 lacks .*optimizer\.bin .*--overwrite"):
        run(recipe, resume=True)


def test_eval_on_a_base_the_adapter_does_not_fit_is_one_clear_error(make_recipe):
    recipe = make_recipe({"train.max_steps": 1})
    run(recipe)
    rc, _, err = peftlab("eval", recipe.out, "model.name=minilm")  # another hidden size: LoRA's matrices do not fit
    assert rc == 2 and "does not load onto minilm" in err and "drop the override" in err, err
    assert "Traceback" not in err


def test_a_symlinked_run_folder_is_its_target(make_recipe, tmp_path):
    """Two names for one folder took two locks (two trainings wrote one folder together), and --overwrite through the
    link replaced the link by a new folder beside it, leaving a dangling .NAME.old."""
    real, link = tmp_path / "real", tmp_path / "link"
    run(make_recipe({"train.max_steps": 2, "output_dir": real}))
    link.symlink_to(real)
    assert RunDir(link).lock_file == RunDir(real).lock_file
    with RunDir(real).lock(), pytest.raises(ArtifactError, match="in use by another peftlab run"):
        with RunDir(link).lock():
            pass
    run(make_recipe({"train.max_steps": 3, "output_dir": link}), overwrite=True)
    assert link.is_symlink() and json.loads((real / "run.json").read_text())["steps"] == 3
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".real.lock"]


def test_eval_and_merge_of_a_run_replaced_meanwhile_write_nothing(make_recipe, tmp_path, monkeypatch):
    """An --overwrite that swapped in while `peftlab eval` or `merge` ran left figures (or a merged/) of neither run:
    the old recipe with the new weights, written into the new run."""
    from peftlab.export import merge
    from peftlab.run import evaluate

    recipe = make_recipe({"train.max_steps": 2})
    run(recipe)
    other = tmp_path / "other"
    run(make_recipe({"train.max_steps": 3, "output_dir": other}))

    def swap_during(real):
        def rebuild(out, *a, **k):
            os.replace(recipe.out, tmp_path / "retired")  # as RunDir.swap does, mid-command
            os.replace(other, recipe.out)
            return real(out, *a, **k)
        return rebuild

    for module, call, doing in ((sys.modules["peftlab.run"], lambda: evaluate(recipe.out), "evaluating it"),
                                (sys.modules["peftlab.export"], lambda: merge(recipe.out), "merging it")):
        monkeypatch.setattr(module, "rebuild", swap_during(module.rebuild))
        with pytest.raises(ArtifactError, match=f"was replaced while {doing} .*nothing was written"):
            call()
        monkeypatch.undo()
        assert not list(recipe.out.glob("eval-*.json")) and not (recipe.out / "merged").exists()
        os.replace(recipe.out, other)  # put both back
        os.replace(tmp_path / "retired", recipe.out)


def test_evaluating_a_run_folder_that_cannot_be_written_is_refused_before_the_model_loads(make_recipe, monkeypatch):
    """`peftlab eval` of a read-only run folder evaluated it all, then failed with a PermissionError traceback."""
    import sys

    from peftlab import run
    from peftlab.run import evaluate

    recipe = make_recipe({"train.max_steps": 1})
    run(recipe)
    run_module = sys.modules["peftlab.run"]
    out = recipe.out.resolve()
    monkeypatch.setattr(run_module.os, "access", lambda p, mode: Path(p).resolve() != out)  # (root writes a mode-500 folder)
    monkeypatch.setattr(run_module, "rebuild", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ArtifactError, match=r"cannot write the evaluation \(eval-eval.json\) to .* not writable. Copy the run folder"):
        evaluate(recipe.out)


def test_a_resume_that_changes_the_run_length_steps_at_the_new_schedules_rate(make_recipe, tmp_path):
    """train.max_steps may change on --resume, and the schedule is rebuilt for the new length; but the optimizer's lr,
    restored from the checkpoint, was the old schedule's, and the first resumed step ran at it (400 steps resumed as
    130: 3.4x the new rate). Every resumed step runs at the new linear schedule's rate; an unchanged one is unchanged."""
    ov = {"train.max_steps": 8, "train.save_every": 4, "train.log_every": 1, "train.eval_every": None, "train.scheduler": "linear",
          "train.warmup_fraction": 0.0, "train.lr": 5e-3}
    full = tmp_path / "full"
    run(make_recipe({**ov, "output_dir": full}))
    for steps in (6, 8):
        part = tmp_path / f"part{steps}"
        shutil.copytree(full / "checkpoints" / "step-4", part / "checkpoints" / "step-4")
        run(make_recipe({**ov, "train.max_steps": steps, "output_dir": part}), resume=True)
        logged = {r["step"]: r["lr"] for r in map(json.loads, (part / "log.jsonl").read_text().splitlines())
                  if r.get("kind") == "train"}
        assert logged == pytest.approx({s: 5e-3 * (steps - s + 1) / steps for s in range(5, steps + 1)}, rel=1e-6), logged


def test_resume_of_an_overwrite_that_finished_but_was_not_swapped_in_is_refused_before_training(tmp_path):
    """An --overwrite whose run finished in its staging folder but could not replace the old run (a full disk) kept its
    checkpoints there: --resume trained again, then exported into the staging folder, which holds a run (export refuses
    it). Said before any work, with what to do."""
    out = tmp_path / "out"
    (out / "checkpoints" / "step-4").mkdir(parents=True)
    (out / "run.json").write_text("{}")
    folder = RunDir(out)
    (folder.staging / "checkpoints" / "step-4").mkdir(parents=True)
    (folder.staging / "run.json").write_text("{}")
    with pytest.raises(ArtifactError, match=r"--overwrite of .*out finished, in .*staging, but could not replace it.*Move"):
        folder.plan(resume=True, overwrite=False)


def test_a_file_rewritten_at_its_size_with_its_mtime_put_back_gets_its_new_sum(tmp_path):
    """`cp -p` or `rsync -a` over a data file (a relabelling that flips 0 and 1: the same size) puts its mtime back: the
    sum memoised in this process was the old one, so a notebook's resume=True trained on the changed data that a fresh
    process refuses (same_inputs)."""
    from peftlab.rundir import sha256

    f = tmp_path / "train.tsv"
    f.write_text("sentence\tlabel\ngood\t1\n")
    assert sha256(f) == hashlib.sha256(f.read_bytes()).hexdigest()
    st = os.stat(f)
    f.write_text("sentence\tlabel\ngood\t0\n")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (os.stat(f).st_ino, os.stat(f).st_size, os.stat(f).st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)
    assert sha256(f) == hashlib.sha256(f.read_bytes()).hexdigest()
