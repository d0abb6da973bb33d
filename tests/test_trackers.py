"""train.report_to: experiment trackers (Accelerate's) get the recipe and log.jsonl's scalars, at the same steps, and are
closed however the loop ends. Offline: TensorBoard event files, wandb in offline mode, a recording stand-in tracker."""

from __future__ import annotations

import importlib
import json
import struct
from pathlib import Path

import pytest

from peftlab import trackers
from peftlab.errors import ConfigError, PeftlabError
from peftlab.run import run

SHORT = {"train.max_steps": 6, "train.log_every": 2, "train.precision": "fp32"}


def records(out: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def scalars(record: dict) -> dict:
    """A log.jsonl record as the trackers get it: its numbers, named KIND/KEY."""
    return {f"{record['kind']}/{k}": v for k, v in record.items()
            if k not in ("step", "kind", "time") and isinstance(v, (int, float))}


class Spy:
    """Records what the loop does with a tracker (Accelerate's GeneralTracker interface)."""

    name = "spy"

    def __init__(self, fail_start: bool = False):
        self.calls: list = []
        self.fail_start = fail_start

    def start(self):
        if self.fail_start:
            raise RuntimeError("no server")
        self.calls.append("start")

    def store_init_configuration(self, values):
        self.calls.append(("config", values))

    def log(self, values, step=None):
        self.calls.append(("log", step, values))

    def finish(self):
        self.calls.append("finish")


# ------------------------------------------------------------------------------------------------- TensorBoard

def test_auto_writes_tensorboard_with_the_same_scalars_as_log_jsonl(make_recipe):
    """The default (auto) keeps what peftlab always did: TensorBoard under OUT/tb when installed, beside log.jsonl."""
    pytest.importorskip("tensorboard", reason="tensorboard is in the dev extra: pip install -e '.[dev]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = make_recipe(SHORT)
    assert recipe.train.report_to == ["auto"]
    run(recipe)
    out = recipe.out
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    train = records(out, "train")
    assert [r["step"] for r in train] == [2, 4, 6]
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [2, 4, 6]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in train], rel=1e-6)  # float32 in the event file
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([r["lr"] for r in train], rel=1e-6, abs=1e-12)
    (final,) = records(out, "eval")
    assert [(e.step, e.value) for e in events.Scalars("eval/accuracy")] == [(6, pytest.approx(final["accuracy"]))]
    # the final evaluation (the exported weights, each split's; metrics.json's numbers) goes to the trackers too
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["eval"]
    for split in metrics:
        (line,) = records(out, f"final_{split}")
        assert {k: line[k] for k in metrics[split]} == metrics[split]
        assert [(e.step, e.value) for e in events.Scalars(f"final_{split}/f1")] == [(6, pytest.approx(metrics[split]["f1"]))]
    hparams = [p for p in (out / "tb").rglob("hparams.yml")]  # the resolved recipe, as Accelerate stores it
    assert len(hparams) == 1 and "train.lr: 0.005" in hparams[0].read_text()


def test_none_writes_log_jsonl_and_no_tracker_files(make_recipe):
    recipe = make_recipe({**SHORT, "train.report_to": "none"})
    run(recipe)
    assert len(records(recipe.out, "train")) == 3
    assert sorted(p.name for p in recipe.out.iterdir() if p.is_dir()) == []  # no tb/, wandb/, mlruns/, ...


def test_auto_is_nothing_when_tensorboard_is_not_installed(monkeypatch):
    monkeypatch.setattr(trackers, "tracker_installed", lambda name: False)
    assert trackers.resolve_trackers(["auto"]) == [] and trackers.resolve_trackers("none") == [] and trackers.resolve_trackers([]) == []
    monkeypatch.setattr(trackers, "tracker_installed", lambda name: name in ("tensorboard", "wandb"))
    assert trackers.resolve_trackers(["auto"]) == ["tensorboard"]
    assert trackers.resolve_trackers(["all"]) == ["tensorboard", "wandb"]
    assert trackers.resolve_trackers(["wandb", "tensorboard", "wandb"]) == ["wandb", "tensorboard"]


# ---------------------------------------------------------------------------------------------------- wandb

def wandb_records(run_file: Path):
    """The protobuf records of an offline wandb run (run-ID.wandb: a LevelDB-style log of 32 KiB blocks after a 7-byte
    file header; each fragment has a 7-byte header: crc, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2

    raw, off, buf = run_file.read_bytes(), 7, b""
    while off + 7 <= len(raw):
        if 32768 - off % 32768 < 7:  # a block's tail too short for a header is padding
            off += 32768 - off % 32768
            continue
        _, n, kind = struct.unpack("<IHB", raw[off:off + 7])
        buf, off = buf + raw[off + 7:off + 7 + n], off + 7 + n
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


def key(item) -> str:
    return item.key or "/".join(item.nested_key)  # wandb-core may file a key either way


def test_wandb_offline_run_in_the_run_folder_survives_an_overwrite(make_recipe, monkeypatch, tmp_path):
    """An --overwrite trains in a staging folder that replaces the run at the end: the wandb run inside it must be
    complete (finished) before that swap, and land in OUT/wandb with the recipe and log.jsonl's scalars."""
    pytest.importorskip("wandb", reason="pip install wandb (or pip install -e '.[dev]')")
    for var in ("WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / sub))  # nothing written under ~
    run(make_recipe({**SHORT, "train.report_to": "none", "train.max_steps": 2}))
    recipe = make_recipe({**SHORT, "train.report_to": "wandb"})
    run(recipe, overwrite=True)

    out = recipe.out
    assert not Path(f"{out.parent}/.{out.name}.staging").exists()
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    assert (out / "wandb" / "latest-run").resolve() == run_file.parent.resolve()  # its relative links moved with it
    config, history, kinds = {}, {}, set()
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        kinds.add(kind)
        if kind == "config":
            config.update({key(item): json.loads(item.value_json) for item in record.config.update})
        if kind == "run":
            assert (record.run.project, record.run.display_name) == ("peftlab", "t")
        if kind == "history":
            row = {key(item): json.loads(item.value_json) for item in record.history.item}
            history[row["_step"]] = {k: v for k, v in row.items() if not k.startswith("_")}
    assert "exit" in kinds  # finished, not left running
    assert config["train.lr"] == 5e-3 and config["name"] == "t" and config["train.report_to"] == '["wandb"]'
    assert config["model.name"] == recipe.model.name and config["train.best_metric"] == "accuracy"  # the resolved recipe
    expected = {}
    for r in records(out, "train") + records(out, "eval") + records(out, "final_eval"):
        expected.setdefault(r["step"], {}).update(scalars(r))
    assert history == expected and "final_eval/accuracy" in history[6]  # JSON keeps a float exactly


def test_a_resumed_run_goes_on_in_the_stopped_runs_wandb_run(make_recipe, monkeypatch, tmp_path):
    """Each session of a run stopped and resumed was a wandb run of its own (two runs of one name, the history split)."""
    pytest.importorskip("wandb", reason="pip install wandb (or pip install -e '.[dev]')")
    import sys

    from peftlab.errors import TrainingInterrupted

    for var in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / sub))
    ov = {**SHORT, "train.report_to": "wandb", "train.max_steps": 4}
    with monkeypatch.context() as m:
        m.setattr(sys.modules["peftlab.train"], "stop_requested", lambda flag, accelerator: True)  # Ctrl-C at step 1
        with pytest.raises(TrainingInterrupted):
            run(make_recipe(ov))
    recipe = make_recipe(ov)
    run(recipe, resume=True)
    runs, kept = list((recipe.out / "wandb").glob("offline-run-*")), (recipe.out / ".wandb-run-id").read_text()
    assert len(runs) == 2 and all(f"-{kept}" in p.name for p in runs), runs  # offline-run-DATE-ID (-1 if in the same second)


def test_trackers_write_in_the_run_folder_unless_their_env_says_where(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    first = trackers._tracker("wandb", tmp_path, "t").init_kwargs
    assert first == {"dir": str(tmp_path), "name": "t", "id": first["id"], "resume": "allow"} and len(first["id"]) == 12
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    wandb = trackers._tracker("wandb", tmp_path, "t", resumed_at=4)  # a --resume: the stopped run's wandb run
    assert wandb.init_kwargs == {"name": "t", "id": first["id"], "resume": "allow"} and wandb.run_name == "mine"  # (WANDB_DIR: wandb's)
    assert trackers._tracker("wandb", tmp_path, "t").init_kwargs["id"] != first["id"]  # a fresh run: a new one
    monkeypatch.setenv("WANDB_RUN_ID", "theirs")  # the user's own id wins
    assert "id" not in trackers._tracker("wandb", tmp_path, "t", resumed_at=4).init_kwargs
    tensorboard = trackers._tracker("tensorboard", tmp_path, "t")
    assert Path(tensorboard.logging_dir_param, tensorboard.run_name) == tmp_path / "tb"


# ------------------------------------------------------------------------------------- errors and failures

def test_a_tracker_that_is_not_installed_is_one_clear_error_before_any_work(make_recipe, monkeypatch):
    monkeypatch.setattr(trackers, "tracker_installed", lambda name: name == "tensorboard")
    recipe = make_recipe({**SHORT, "train.report_to": "[tensorboard, wandb]"})
    with pytest.raises(ConfigError) as e:
        run(recipe)
    (problem,) = e.value.problems
    assert "wandb" in problem and "pip install wandb" in problem and "peftlab[wandb]" in problem
    assert not recipe.out.exists()  # refused before the run folder, the model or the data


def test_report_to_is_checked_with_the_recipe(make_recipe):
    assert make_recipe({"train.report_to": "wandb"}).train.report_to == ["wandb"]  # one name: a one-element list
    with pytest.raises(ConfigError, match="Did you mean 'wandb'"):
        make_recipe({"train.report_to": "[tensorboard, wandbb]"})
    with pytest.raises(ConfigError, match="stand alone"):
        make_recipe({"train.report_to": "[none, wandb]"})


def test_a_failure_mid_training_still_closes_the_trackers(make_recipe, monkeypatch):
    """The trackers get the recipe, then exactly log.jsonl's records at their steps, and are finished after a crash."""
    train_module = importlib.import_module("peftlab.train")  # (peftlab.train is also the name of the function)

    spy = Spy()
    monkeypatch.setattr(trackers, "tracker_installed", lambda name: True)
    monkeypatch.setattr(trackers, "_tracker", lambda name, out, run_name, resumed_at=None: spy)
    steps = iter(range(100))

    def crash_at_step_3(flag, accelerator):
        if next(steps) == 2:
            raise RuntimeError("boom")
        return False

    monkeypatch.setattr(train_module, "stop_requested", crash_at_step_3)
    recipe = make_recipe({**SHORT, "train.report_to": "wandb"})
    with pytest.raises(RuntimeError, match="boom"):
        run(recipe)
    assert spy.calls[0] == "start" and spy.calls[-1] == "finish"
    assert spy.calls[1] == ("config", trackers.tracker_config(recipe))
    logged = [c for c in spy.calls if c[0] == "log"]
    assert logged == [("log", r["step"], scalars(r)) for r in records(recipe.out, "train")] and len(logged) == 1


def test_a_tracker_that_cannot_start_names_itself_and_closes_the_others(make_recipe, monkeypatch, tmp_path):
    ok, broken = Spy(), Spy(fail_start=True)
    monkeypatch.setattr(trackers, "tracker_installed", lambda name: True)
    monkeypatch.setattr(trackers, "_tracker", lambda name, out, run_name, resumed_at=None: ok if name == "tensorboard" else broken)
    recipe = make_recipe({"train.report_to": "[tensorboard, wandb]"})
    with pytest.raises(PeftlabError, match=r"wandb could not start \(RuntimeError: no server\).*report_to"):
        trackers.open_trackers(recipe, tmp_path)
    assert ok.calls[0] == "start" and ok.calls[-1] == "finish"
    # through `train`: before the data and the model load (it was found after them, minutes in on an LLM), and a fresh
    # run leaves no folder (one with an empty log.jsonl was kept, and the next try was refused as an existing run)
    run_module = importlib.import_module("peftlab.run")
    monkeypatch.setattr(run_module, "load_splits", lambda *a, **k: pytest.fail("the data loaded before the trackers started"))
    with pytest.raises(PeftlabError, match="wandb could not start"):
        run(recipe)
    assert not recipe.out.exists()


def test_a_resume_refused_by_a_tracker_leaves_the_log_and_the_tensorboard_events_as_they_were(make_recipe, monkeypatch, tmp_path):
    """A --resume refused because a tracker cannot start (wandb without a login) had first cut the stopped run's
    log.jsonl to its checkpoint's step, and opened TensorBoard with purge_step (hiding its events after that step): the
    lines and events of the steps after the checkpoint were lost. The trackers start first (TensorBoard last), then the
    log is trimmed."""
    pytest.importorskip("tensorboard", reason="tensorboard is in the dev extra: pip install -e '.[dev]'")
    ov, part = stopped_tensorboard_run(make_recipe, tmp_path)
    before = {p.relative_to(part): p.read_bytes() for p in part.rglob("*") if p.is_file()}
    real = trackers._tracker
    monkeypatch.setattr(trackers, "tracker_installed", lambda name: True)
    monkeypatch.setattr(trackers, "_tracker", lambda name, out, run_name, resumed_at=None:
                        Spy(fail_start=True) if name == "wandb" else real(name, out, run_name, resumed_at))
    with pytest.raises(PeftlabError, match="wandb could not start"):
        run(make_recipe({**ov, "output_dir": part, "train.report_to": "[tensorboard, wandb]"}), resume=True)
    assert {p.relative_to(part): p.read_bytes() for p in part.rglob("*") if p.is_file()} == before


def stopped_tensorboard_run(make_recipe, tmp_path):
    """-> (overrides, folder) of what a kill after step 4 of a TensorBoard run left: its log, its events, the step-2
    checkpoint (copied from a finished run)."""
    import shutil

    ov = {**SHORT, "train.save_every": 2, "train.keep_checkpoints": 3, "train.report_to": "[tensorboard]"}
    full = make_recipe({**ov, "output_dir": tmp_path / "full"})
    run(full)
    part = tmp_path / "part"
    shutil.copytree(full.out / "tb", part / "tb")
    shutil.copy(full.out / "log.jsonl", part / "log.jsonl")
    shutil.copytree(full.out / "checkpoints" / "step-2", part / "checkpoints" / "step-2")
    return ov, part


def test_a_tracker_that_cannot_start_under_all_says_to_list_the_trackers_wanted(make_recipe, monkeypatch, tmp_path):
    """train.report_to=all opened wandb (installed, not logged in) and said "drop it from train.report_to", which never
    named it."""
    ok, broken = Spy(), Spy(fail_start=True)
    monkeypatch.setattr(trackers, "tracker_installed", lambda name: name in ("tensorboard", "wandb"))
    monkeypatch.setattr(trackers, "_tracker", lambda name, out, run_name, resumed_at=None: ok if name == "tensorboard" else broken)
    with pytest.raises(PeftlabError, match=r"wandb could not start \(RuntimeError: no server\)\. train.report_to=all opens it "
                       r"because it is installed: list the trackers wanted instead \(train.report_to=\[tensorboard\]\)") as e:
        trackers.open_trackers(make_recipe({"train.report_to": "all"}), tmp_path)
    assert "drop it" not in str(e.value)


def test_the_tracker_names_are_accelerates():
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    from peftlab.config import TRACKERS

    assert set(TRACKERS) <= set(LOGGER_TYPE_TO_CLASS)
    assert all(callable(getattr(__import__("accelerate.utils").utils, f"is_{n}_available")) for n in TRACKERS)


def test_a_resumed_run_shows_each_step_once_in_tensorboard(make_recipe, tmp_path):
    """A run killed after logging step 4, resumed from its step-2 checkpoint, logged steps 3-4 again: TensorBoard held
    them twice (log.jsonl drops the stopped run's lines after the checkpoint)."""
    pytest.importorskip("tensorboard", reason="tensorboard is in the dev extra: pip install -e '.[dev]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ov, part = stopped_tensorboard_run(make_recipe, tmp_path)
    run(make_recipe({**ov, "output_dir": part}), resume=True)
    events = EventAccumulator(str(part / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6]
    # a run stopped in its export resumes at its last step and evaluates again: its final scores are logged once
    assert [r["step"] for r in records(part, "final_eval")] == [6]
    (part / "run.json").unlink()  # (the last step was checkpointed: train.save_every saves it too)
    run(make_recipe({**ov, "output_dir": part}), resume=True)
    assert [r["step"] for r in records(part, "final_eval")] == [6] and len(records(part, "train")) == 3
    # ... and in TensorBoard: it kept the stopped session's final scores at the checkpoint's step (purged after it only)
    events = EventAccumulator(str(part / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("final_eval/accuracy")] == [6]
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6] and [e.step for e in events.Scalars("eval/accuracy")] == [6]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["loss"] for r in records(part, "train")])
