"""`peftlab train RECIPE --launch PRESET` (and `peftlab eval OUT --launch PRESET`): the same run (evaluation) on several
processes, through Accelerate's launcher.

A preset is an Accelerate config file shipped in `peftlab/launch_presets/`. The command built here is the one you
could type yourself (it is logged before it runs):

    python -m accelerate.commands.launch --config_file PRESET.yaml --num_processes N -m peftlab train RECIPE [KEY=VALUE ...]

Inside, every rank runs `python -m peftlab train` (peftlab/__main__.py -> cli.main, the same way in as the `peftlab`
command); only the main one logs and writes artifacts.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from importlib.resources import files
from pathlib import Path

from .errors import PeftlabError
from .rundir import CHOOSE, LOCK_ENV, RunDir, checkpoints

log = logging.getLogger(__name__)
ERROR_FILE_ENV = "PEFTLAB_ERROR_FILE"  # set for the ranks: where the first one to fail leaves its message (cli.main)
PRESETS_DIR = Path(str(files("peftlab") / "launch_presets"))
CPU_PRESET = "cpu-ddp"


class LaunchError(PeftlabError, ValueError):
    """A launch preset cannot run here: unknown name, missing library, not enough devices."""


def presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(name, presets(), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise LaunchError(f"unknown launch preset {name!r}. Valid presets: {', '.join(presets())}.{hint}")
    return path


def resolve_num_processes(name: str, num_processes: int | None) -> int:
    """Check that the preset exists and can run here; return the number of processes (default: 2 on CPU, every GPU else)."""
    preset_path(name)
    if num_processes is not None and num_processes < 1:
        raise LaunchError(f"--num-processes {num_processes}: must be >= 1.")
    if name == CPU_PRESET:
        return num_processes or 2
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0:  # (said before DeepSpeed's absence: its way out, fsdp, needs GPUs too)
        raise LaunchError(f"--launch {name} needs CUDA GPUs and none is visible here. On CPU use "
                          f"--launch {CPU_PRESET} --num-processes N.")
    if name.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        raise LaunchError(f"--launch {name} needs DeepSpeed, which is not installed. Install it with `pip install deepspeed` "
                          "(it builds against your CUDA toolkit), or use --launch fsdp, which needs only PyTorch.")
    if num_processes is not None and num_processes > gpus:
        raise LaunchError(f"--num-processes {num_processes} with --launch {name}: only {gpus} GPU(s) are visible (one "
                          f"process per GPU). For several machines use `accelerate launch` directly (see the README).")
    return num_processes or gpus


def launch_command(name: str, recipe: str, overrides: list[str] | tuple = (), *, num_processes: int | None = None,
                   resume: bool = False, overwrite: bool = False, flags: list[str] | tuple = ()) -> tuple[list[str], dict[str, str]]:
    """-> (argv, environment) that run `peftlab FLAGS train RECIPE OVERRIDES` on the preset's processes (`flags`: the
    command's own -q / --debug, which the ranks follow too)."""
    train = ["train", recipe, *overrides, *(flag for flag, on in (("--resume", resume), ("--overwrite", overwrite)) if on)]
    return peftlab_command(name, [*flags, *train], num_processes)


def peftlab_command(name: str, args: list[str], num_processes: int | None) -> tuple[list[str], dict[str, str]]:
    """-> (argv, environment) that run `peftlab ARGS` on the preset's processes."""
    config = preset_path(name)
    n = resolve_num_processes(name, num_processes)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", str(n),
           "-m", "peftlab", *args]
    env = dict(os.environ)
    if name == CPU_PRESET:
        env["ACCELERATE_USE_CPU"] = "1"  # N gloo ranks on CPU even where GPUs are visible
    return cmd, env


def launch(name: str | None, recipe: str, overrides: list[str] | tuple = (), *, num_processes: int | None = None,
           resume: bool = False, overwrite: bool = False, out: Path | None = None, flags: list[str] | tuple = (),
           choose: str = CHOOSE) -> int:
    """Run the recipe on the preset's processes and wait; return the launcher's exit status. `choose`: how the recipe
    names another output folder (rundir.choose_flag), for the messages that refuse `out`."""
    n = resolve_num_processes(needs_preset(name), num_processes)
    cmd, env = launch_command(name, recipe, overrides, num_processes=n, resume=resume, overwrite=overwrite, flags=flags)
    if out is None:
        return supervised(name, cmd, env)
    folder = RunDir(out, choose)
    with folder.lock():  # held here for the ranks, which skip it (LOCK_ENV): a second writer is refused at once
        folder.recover()
        folder.plan(resume=resume, overwrite=overwrite, announce=False, processes=n)  # one clear error here rather than one per rank
        env[LOCK_ENV] = str(folder.out.absolute())
        return supervised(name, cmd, env, folder)


def launch_eval(name: str | None, args: list[str], *, num_processes: int | None = None, flags: list[str] | tuple = ()) -> int:
    """`peftlab eval ARGS` on the preset's processes: each scores its share of the rows (a generative task's generation
    too), the main one gathers them and writes eval-SPLIT.json; -> the launcher's exit status."""
    cmd, env = peftlab_command(needs_preset(name), [*flags, "eval", *args], num_processes)
    return supervised(name, cmd, env)


def needs_preset(name: str | None) -> str:
    if name is None:
        raise LaunchError(f"--num-processes needs --launch PRESET (one of {', '.join(presets())}).")
    return name


def supervised(name: str, cmd: list[str], env: dict, folder: RunDir | None = None) -> int:
    """Run the launcher and wait -> the exit status; the first failing rank's error is said once, at the end (`outcome`)."""
    with tempfile.TemporaryDirectory(prefix="peftlab-launch-") as tmp:
        env[ERROR_FILE_ENV] = str(Path(tmp) / "error.json")
        log.info("launching: %s%s", "ACCELERATE_USE_CPU=1 " if name == CPU_PRESET else "", shlex.join(cmd))
        return outcome(run_forwarding_signals(cmd, env), Path(env[ERROR_FILE_ENV]), folder)


def outcome(code: int, error_file: Path, folder: RunDir | None = None) -> int:
    """The launched run's exit status, said once after the launcher's own report of a failed rank: the first rank's
    error with its status (2 for a mistake of ours to name; the launcher says 1 for any failure), or, after a crash, the
    checkpoint --resume continues from. A stop by signal (130, 143) was said by the ranks themselves."""
    if error_file.is_file():
        error = json.loads(error_file.read_text(encoding="utf-8"))
        print(error["message"], file=sys.stderr)
        return error["code"]
    if code not in (0, 130, 143) and folder is not None:
        work = folder.staging if folder.staging.is_dir() else folder.out
        if kept := checkpoints(work):
            print(f"error: a process of the run failed (its error is above); the checkpoints are kept (latest {kept[-1]}): "
                  "once the cause is fixed, the same command with --resume continues it.", file=sys.stderr)
    return code


def run_forwarding_signals(cmd: list[str], env: dict) -> int:
    """Run the launcher and wait for it, however this process is told to stop: a SIGTERM sent to it alone (a scheduler,
    `kill PID`) is passed on to the launcher, which passes it to the ranks (they save a checkpoint and exit 143); a
    Ctrl-C reaches the ranks from the terminal itself, so here it only keeps waiting. Returning only once the ranks have
    ended keeps the run folder's lock held while any of them writes."""
    proc = subprocess.Popen(cmd, env=env)

    def forward(signum, frame):
        if signum == signal.SIGTERM:
            proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
