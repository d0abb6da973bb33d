"""What the benchmark scripts share: the recipe overrides that make each method, and one `peftlab train` process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
METHODS = {  # recipe overrides that turn a shipped LoRA recipe into each method (learning rates: usual per-method values)
    "scratch": ["adapter.method=scratch", "adapter.target_modules=null", "train.lr=1e-4"],
    "frozen": ["adapter.method=frozen", "adapter.target_modules=null", "train.lr=5e-3"],
    "lora": [],
    "qlora": ["quant.mode=4bit", "quant.quant_type=nf4", "quant.double_quant=true", "quant.compute_dtype=float32"],
    "dora": ["adapter.use_dora=true"],
    "ia3": ["adapter.method=ia3", "adapter.target_modules=null", "train.lr=5e-3"],
    "full": ["adapter.method=full", "adapter.target_modules=null", "train.lr=5e-5"],
    "vera": ["adapter.method=vera", "adapter.target_modules=[query,value]", "adapter.r=256", "train.lr=5e-3"],
}


def provenance() -> dict:
    """What a results file was measured with: when, the command line, the commit, library versions, the host (CPU model,
    native bf16, cores, threads)."""
    from peftlab.export import hardware, versions

    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": sys.argv[1:],
            "commit": git.stdout.strip() if git.returncode == 0 else None, "versions": versions(), "hardware": hardware()}


def measured_line(run: dict | None = None) -> str:
    """One line for a markdown report: when and at which commit it was written, and the host and versions its figures
    were measured with (a stored run.json's, where given: a report rebuilt from stored runs names their machine, not
    this one), so a .md read alone says what its .json does."""
    from peftlab.export import hardware, versions

    hw, v = (run or {}).get("hardware") or hardware(), (run or {}).get("versions") or versions()
    commit = provenance()["commit"]
    return (f"Report written {time.strftime('%Y-%m-%d', time.gmtime())} at commit {(commit or 'unknown')[:10]}; measured on "
            f"{hw.get('cpu') or 'an unnamed CPU'}{' (native bf16)' if hw.get('cpu_native_bf16') else ''}"
            f"{', ' + hw['gpu'] if hw.get('gpu') else ''}, {hw.get('torch_threads')} torch threads, "
            + ", ".join(f"{k} {v[k]}" for k in ("torch", "transformers", "peft") if k in v) + ".")


def write_result(path: Path, text: str) -> None:
    """A results file (json, md) written whole or not at all: a benchmark killed while writing never leaves half of one."""
    from peftlab.rundir import atomic_write_text

    atomic_write_text(Path(path), text)


def refuse_replacing(p, paths: list[Path], overwrite: bool) -> None:
    """A usage error before any work when a results file this invocation writes exists already and --overwrite was not
    given: a partial run (one lever, a few batches) under the default --name silently replaced the committed results."""
    if overwrite or not (held := [Path(f) for f in paths if Path(f).exists()]):
        return
    shown = ", ".join(str(f.relative_to(REPO)) if f.is_relative_to(REPO) else str(f) for f in held)
    p.error(f"{shown} {'exist' if len(held) > 1 else 'exists'} already: give these results a name of their own (--name NEW), or --overwrite to replace them")


def save_figure(fig, path: Path, **kwargs) -> None:
    """fig.savefig, atomically (a temporary file beside `path`, then renamed over it)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        fig.savefig(tmp, **kwargs)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def fill_unset(args, *sizes: dict) -> None:
    """Each size the user did not give (None), from the first of `sizes` that has it: --quick's own, then the full
    defaults. A size given is kept (--quick replaced them with its own, and the results recorded what was not run)."""
    for values in sizes:
        for key, value in values.items():
            if getattr(args, key) is None:
                setattr(args, key, value)


def check_counts(p, checks, least: int = 1) -> None:
    """Each (flag, value, what to give) with a value below `least` is a usage error before any work (a 0 that divides by
    zero after training, or measures nothing and replaces the stored results)."""
    for flag, value, give in checks:
        if value < least:
            p.error(f"{flag} {value}: give {give}")


def fractions_arg(p, text: str, top: float, kinds: str, one: str, example: str) -> list[float]:
    """--fractions as numbers in (0, top], or a usage error naming the bad ones. `kinds`: what the numbers are
    (percents); `one`: what a value is a share of (a percent of the train rows)."""
    try:
        values = [float(f) for f in text.split(",")]
    except ValueError:
        p.error(f"--fractions {text}: expected comma-separated {kinds}, e.g. {example}")
    if bad := [f for f in values if not 0 < f <= top]:
        p.error(f"--fractions: {', '.join(f'{f:g}' for f in bad)} out of range; {one} is > 0 and <= {top:g}")
    return values


def ints_arg(p, flag: str, text: str, example: str) -> list[int]:
    """A comma-separated list of integers (--seeds 0,1,2), or a usage error naming the flag."""
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        p.error(f"{flag} {text!r}: expected comma-separated integers, e.g. {example}")


class RunFailed(SystemExit):
    """A child process that failed. Uncaught, it ends the benchmark with its message and exit status 1, no traceback;
    a script that goes on past a failed run (transfer_study.py, model_selection.py) catches it."""


def _raise_on_sigterm(signum, frame) -> None:
    raise SystemExit(f"stopped by signal {signum}")


def measured_process(name: str, cmd: list[str], *, verbose: bool = False, env: dict | None = None,
                     grace_s: float = 10.0) -> tuple[float, float]:
    """`cmd` in its own process (from the repository root; `env`: variables added to this one's) -> (its peak RSS in
    MiB from wait4, wall seconds). A failure raises RunFailed with the last lines of its stderr. A benchmark that
    raises or is stopped (SIGTERM, Ctrl-C) while the child runs terminates it (SIGTERM, then SIGKILL after `grace_s`)."""
    start = time.perf_counter()
    restore = signal.signal(signal.SIGTERM, _raise_on_sigterm) if threading.current_thread() is threading.main_thread() else None
    try:
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=None if verbose else subprocess.DEVNULL, stderr=None if verbose else err,
                                    env={**os.environ, **env} if env else None)
            try:
                _, status, usage = os.wait4(proc.pid, 0)  # this process's own peak RSS
                proc.returncode = os.waitstatus_to_exitcode(status)  # reaped: Popen must not wait for it again
            finally:
                if proc.returncode is None:  # interrupted before the child ended: it does not outlive the benchmark
                    if restore is not None:  # a second SIGTERM (`timeout` signals the whole group) must not abandon the grace wait
                        signal.signal(signal.SIGTERM, signal.SIG_IGN)
                    proc.terminate()
                    try:
                        proc.wait(grace_s)
                    except subprocess.TimeoutExpired:
                        pass
                    finally:  # after the grace, or when the wait is interrupted (Ctrl-C): killed
                        if proc.poll() is None:
                            proc.kill()
                            proc.wait()
            err.seek(0)
            tail = err.read().decode(errors="replace").strip().splitlines()[-5:]
    finally:
        if restore is not None:
            signal.signal(signal.SIGTERM, restore)
    wall = time.perf_counter() - start
    if status != 0:
        raise RunFailed(f"[{name}] failed (exit {os.waitstatus_to_exitcode(status)}): " + " | ".join(tail))
    return usage.ru_maxrss / 1024, wall


def train_process(name: str, recipe: str, overrides: list[str], out: Path, *, verbose: bool = False,
                  env: dict | None = None) -> tuple[dict, float, float]:
    """`peftlab train RECIPE OVERRIDES --overwrite` in its own process -> (its run.json, its peak RSS in MiB, process
    wall seconds)."""
    cmd = [sys.executable, "-m", "peftlab.cli", "-q", "train", recipe, *overrides, f"output_dir={out}", "--overwrite"]
    rss, wall = measured_process(name, cmd, verbose=verbose, env=env)
    return json.loads((out / "run.json").read_text()), rss, wall


def stored_case(name: str, recipe: str, overrides: list[str], *, runs: Path, results: Path, prefix: str, fresh: bool = False,
                verbose: bool = False, env: dict | None = None) -> dict:
    """One `peftlab train` process kept as results/NAME.json (run.json, process wall time, peak RSS, the environment
    variables `env` it was given), its run folder runs/NAME, the run named PREFIX-NAME; a stored result is returned as
    it is unless `fresh`, and only if it was measured with this recipe, these overrides and this environment (a result
    of other settings under the same name is refused, never reported as this one's)."""
    dest = results / f"{name}.json"
    if dest.exists() and not fresh:
        stored = json.loads(dest.read_text())
        asked = {"recipe": portable_path(recipe), "overrides": portable(overrides), "env": env or {}}
        held = {"recipe": portable_path(str(stored.get("recipe"))), "overrides": portable(stored.get("overrides") or []),
                "env": stored.get("env") or {}}
        if differs := [k for k in asked if held[k] != asked[k]]:
            raise SystemExit(f"[{name}] the stored result {dest} was measured with other settings ("
                             + "; ".join(f"{k}: stored {held[k]!r}, asked {asked[k]!r}" for k in differs)
                             + "). Measure it again with --fresh (it replaces the stored one), or give these settings a name "
                             "of their own (--tag, where the script has one).")
        print(f"[{name}] stored: {dest} (--fresh measures it again)", flush=True)
        return stored
    print(f"[{name}] " + "".join(f"{k}={v} " for k, v in (env or {}).items()) + f"peftlab train {recipe} {' '.join(overrides)}",
          flush=True)
    run, rss, wall = train_process(name, recipe, [*overrides, f"name={prefix}-{name}"], runs / name, verbose=verbose, env=env)
    result = {"name": name, "recipe": recipe, "overrides": overrides, "run": run, "process_wall_s": wall, "peak_rss_mib": rss,
              **({"env": env} if env else {})}
    write_result(dest, json.dumps(result, indent=2))
    split = "test" if "test" in run["metrics"] else "eval"
    scores = run["metrics"].get(split, {})
    print(f"[{name}] {split}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if isinstance(v, float) and "loss" not in k)
          + f"; {wall:.0f} s", flush=True)
    return result


def portable_path(value: str) -> str:
    """A path from `runs/` or `shared/` on: a result stored from another checkout (/work/other/runs/x, /work/shared/data)
    names the same files as this one's (runs/x, ../shared/data); any other value as it is."""
    m = re.search(r"(?:^|/)((?:runs|shared)/.*)$", value)
    return m.group(1) if m else value


def portable(overrides: list[str]) -> list[str]:
    """KEY=VALUE overrides with their paths made portable (portable_path)."""
    out = []
    for o in overrides:
        key, sep, value = o.partition("=")
        out.append(f"{key}={portable_path(value)}" if sep else o)
    return out


def gemm_peak(threads: int, precision: str = "fp32") -> dict:
    """Matmul GFLOP/s in the training precision at this thread count: a large square GEMM (the peak) and MiniLM's FFN
    shape at batch 32 x 16 tokens, each the best of 4 windows of 0.5 s. A shared host dips for seconds at a time (a
    single 2 s window once read 275 GFLOP/s where the same GEMM runs at 413-436, which inflated an MFU 1.5x); the best
    window is what the hardware does, and a low peak would flatter every MFU measured against it."""
    import torch

    torch.set_num_threads(threads)
    dtype, out = torch.bfloat16 if precision == "bf16" else torch.float32, {"precision": precision}
    for name, (m, k, n) in {"square_2048": (2048, 2048, 2048), "ffn_512x384x1536": (512, 384, 1536)}.items():
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        for _ in range(3):
            a @ b
        windows = []
        for _ in range(4):
            reps, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 0.5:
                a @ b
                reps += 1
            windows.append(2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9)
        out[name] = max(windows)
    out["peak_gflops"] = max(out["square_2048"], out["ffn_512x384x1536"])
    return out
