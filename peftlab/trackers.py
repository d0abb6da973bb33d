"""The experiment trackers of `train.report_to` (TensorBoard, Weights & Biases, MLflow, ...): Accelerate's own tracker
classes, opened in the run folder by the training loop's log (train.RunLog) and closed however the loop ends."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .config import TRACKERS, Recipe
from .errors import ConfigError, PeftlabError

log = logging.getLogger(__name__)


PROJECT = "peftlab"  # the wandb project / MLflow experiment / ... a run is filed under (each tracker's env may override)
PIP = {"comet_ml": "comet-ml"}  # pip names that differ from the tracker's; the others install as `pip install NAME`
EXTRAS = ("tensorboard", "wandb", "mlflow")  # peftlab's own extras: pip install 'peftlab[NAME]'


def tracker_installed(name: str) -> bool:
    """Accelerate's own check (accelerate.utils.is_NAME_available), so peftlab and Accelerate agree on what is there."""
    import accelerate.utils

    return getattr(accelerate.utils, f"is_{name}_available")()


def resolve_trackers(report_to: list[str] | str) -> list[str]:
    """train.report_to -> the trackers a run opens: auto = tensorboard when installed (else none), all = every installed
    one, none (or []) = none, names = those names. A named tracker that is not installed, or that the installed
    Accelerate does not drive, is a ConfigError with the command that fixes it (run() asks before any work)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    names = [report_to] if isinstance(report_to, str) else list(dict.fromkeys(report_to))
    if names in ([], ["none"]):
        return []
    if names == ["auto"]:
        return ["tensorboard"] if tracker_installed("tensorboard") else []
    if names == ["all"]:
        return [n for n in TRACKERS if n in LOGGER_TYPE_TO_CLASS and tracker_installed(n)]
    problems = []
    for n in names:
        if n not in LOGGER_TYPE_TO_CLASS:
            import accelerate

            problems.append(f"train.report_to names {n}, which accelerate {accelerate.__version__} does not drive; a newer "
                            f"accelerate does, or drop it from train.report_to (this one drives: {', '.join(LOGGER_TYPE_TO_CLASS)}).")
        elif not tracker_installed(n):
            extra = f" (or pip install 'peftlab[{n}]')" if n in EXTRAS else ""
            problems.append(f"train.report_to names {n}, which is not installed here: pip install {PIP.get(n, n)}{extra}, or "
                            f"drop it from train.report_to (train.report_to=none: log.jsonl only).")
    if problems:
        raise ConfigError(problems)
    return names


def _tracker(name: str, out: Path, run: str, resumed_at: int | None = None):
    """Accelerate's tracker `name`, writing inside the run folder `out` unless the tracker's own environment says where."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    cls, env = LOGGER_TYPE_TO_CLASS[name], os.environ

    def unless(var: str, **where) -> dict:
        return {} if env.get(var) else where

    if name == "tensorboard":
        # (SummaryWriter hides the events from purge_step on: the checkpoint's step too, whose lines RunLog.open logs again)
        purge = {} if resumed_at is None else {"purge_step": resumed_at}
        return cls("tb", str(out), **purge)  # its logging_dir/run_name: OUT/tb
    if name == "wandb":  # OUT/wandb/(offline-)run-*; a resumed run goes on in the stopped one's wandb run (its id)
        return cls(env.get("WANDB_PROJECT") or PROJECT, name=run, **unless("WANDB_DIR", dir=str(out)),
                   **({} if env.get("WANDB_RUN_ID") else {"id": wandb_run_id(out, resumed_at is not None), "resume": "allow"}))
    if name == "mlflow":  # OUT/mlruns (a file store); MLFLOW_EXPERIMENT_NAME (read by Accelerate) renames the experiment
        if not env.get("MLFLOW_TRACKING_URI"):  # mlflow's URI is process-wide: each run points it at its own folder
            import mlflow

            mlflow.set_tracking_uri((out / "mlruns").absolute().as_uri())
        return cls(PROJECT, run_name=run)
    if name == "aim":
        return cls(run, str(out))  # the Aim repository: OUT/.aim
    if name == "dvclive":
        return cls(dir=str(out / "dvclive"))
    if name == "swanlab":
        return cls(PROJECT, experiment_name=run, **unless("SWANLAB_LOG_DIR", logdir=str(out / "swanlog")))
    return cls(PROJECT)  # comet_ml, clearml, trackio: their own configuration says where a run goes


WANDB_ID_FILE = ".wandb-run-id"  # in the run folder: the wandb run a --resume goes on in


def wandb_run_id(out: Path, resumed: bool) -> str:
    """A fresh run's new wandb run id, kept in the run folder; a resumed run's: the one kept (its history goes on in the
    same wandb run, as TensorBoard's does; offline, `wandb sync` files both sessions under it)."""
    import uuid

    path = out / WANDB_ID_FILE
    if resumed and path.is_file() and (kept := path.read_text(encoding="utf-8").strip()):
        return kept
    new = uuid.uuid4().hex[:12]
    path.write_text(new, encoding="utf-8")
    return new


def tracker_config(recipe: Recipe) -> dict:
    """The resolved recipe as flat `section.key` hyperparameters (lists and mappings as JSON text): every tracker takes
    scalars, and TensorBoard's hparams nothing else."""
    flat = {}

    def walk(tree: dict, prefix: str) -> None:
        for k, v in tree.items():
            if isinstance(v, dict) and v:
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, dict)) else v

    walk(recipe.to_dict(), "")
    return flat


def open_trackers(recipe: Recipe, out: Path, resumed_at: int | None = None) -> list:
    """Start the trackers of train.report_to in the run folder `out` and give them the recipe (main process only).

    The loop owns them, not the Accelerator (`Accelerator(log_with=...)`): the Accelerator is built before the run
    folder is chosen (an --overwrite writes a staging folder), and `end_training()` also destroys the process group
    that evaluation and export still need after the loop. Their start/log/finish are Accelerate's all the same.
    `resumed_at`: the checkpoint's step a resumed run goes on from (TensorBoard hides what the stopped run logged from
    it on, as log.jsonl drops the lines after it; RunLog.open logs that step's kept lines again: each step shows once)."""
    report_to = recipe.train.report_to  # (a list; set from Python, maybe one name)
    started, names, given = [], resolve_trackers(report_to), report_to if isinstance(report_to, str) else ",".join(report_to)
    # a resume starts TensorBoard last: its writer, opened with purge_step, hides the stopped run's events from that step
    # on, and another tracker that cannot start (a refused --resume) must not have cost them
    order = names if resumed_at is None else sorted(names, key=lambda n: n == "tensorboard")
    try:
        for name in order:
            tracker = _tracker(name, out, recipe.name, resumed_at)
            try:
                tracker.start()
            except Exception as e:  # not logged in, no server, ...: say which tracker, and how to go on without it
                why = f"train.report_to: {name} could not start ({type(e).__name__}: {e}). "
                if given in ("all", "auto"):  # (not named by the user: `all` opens every installed tracker)
                    others = ", ".join(n for n in names if n != name)
                    raise PeftlabError(why + f"train.report_to={given} opens it because it is installed: list the trackers "
                                       f"wanted instead (train.report_to={f'[{others}]' if others else 'none'}), or fix its "
                                       "setup.") from e
                raise PeftlabError(why + "Fix its setup, or drop it from train.report_to (train.report_to=none: log.jsonl "
                                   "only).") from e
            started.append(tracker)
            tracker.store_init_configuration(tracker_config(recipe))
    except BaseException:
        close_trackers(started)
        raise
    return started


def close_trackers(trackers: list) -> None:
    """Finish every tracker, also after a failure: one that cannot close is logged, never hides the run's own error."""
    for tracker in trackers:
        try:
            tracker.finish()
        except Exception as e:
            log.warning("could not close the %s tracker: %s", tracker.name, e)
    trackers.clear()
