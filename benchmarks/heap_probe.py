"""Where a training process's peak RSS comes from: memory in use vs memory the allocator holds (issue 21, item 3).

    python benchmarks/heap_probe.py recipes/smollm2-135m/samsum-sft-lora.yaml train.max_steps=3 ...   # any `peftlab train` arguments
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1 \\
        python benchmarks/heap_probe.py ...                                                                 # the same under jemalloc

Runs `peftlab train` in this process while a thread samples, every 50 ms, the resident set (VmRSS) and, where glibc
is the allocator, what it holds (mallinfo2: `held`, its heap + its mmapped blocks) and what of that is allocated
(`in_use`: heap blocks in use + mmapped blocks). Peaks are kept per phase: `load` (model, data, until the
training loop starts), `train` (the loop, its evaluations included), `after` (final evaluation, export). At the end of
each optimizer step it also records RSS and in-use memory. One JSON line on stdout (`--out FILE` or `--out=FILE` writes it too, only
for a run that succeeded: a failed one never replaces a measurement).
A peak RSS far above the peak in use is memory the allocator keeps but nothing uses: fragmentation, not activations.
The samples can miss a peak shorter than 50 ms; `hwm` is the kernel's high-water mark (VmHWM) at the end.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import os
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's peftlab


class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                              "uordblks", "fordblks", "keepcost")]


def glibc_heap():
    """-> a function returning (held MiB, in use MiB), or None where glibc's malloc is not the one in use."""
    if os.environ.get("LD_PRELOAD"):  # another allocator preloaded: glibc's own heap would read as empty
        return None
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):  # not glibc, or glibc < 2.33
        return None
    mallinfo2.restype = MallInfo2

    def read() -> tuple[int, int]:
        m = mallinfo2()
        return (m.arena + m.hblkhd) >> 20, (m.uordblks + m.hblkhd) >> 20
    return read


def status_mib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith(key + ":"))


class Probe:
    def __init__(self):
        self.phase, self.peaks, self.steps, self.heap = "load", {}, [], glibc_heap()
        self.done = threading.Event()

    def sample(self) -> None:
        rss = status_mib("VmRSS")
        peak = self.peaks.setdefault(self.phase, {"rss": 0})
        peak["rss"] = max(peak["rss"], rss)
        if self.heap is not None:
            held, in_use = self.heap()
            peak["held"], peak["in_use"] = max(peak.get("held", 0), held), max(peak.get("in_use", 0), in_use)

    def run(self) -> None:
        while not self.done.wait(0.05):
            self.sample()

    def step_end(self, optimizer, args, kwargs) -> None:
        self.steps.append({"rss": status_mib("VmRSS"), **({"in_use": self.heap()[1]} if self.heap else {})})


def parser() -> argparse.ArgumentParser:
    """Only for -h and errors: every argument but --out FILE goes to `peftlab train` as it is."""
    p = argparse.ArgumentParser(prog="heap_probe.py", usage="%(prog)s [--out FILE] RECIPE [KEY=VALUE ...] [peftlab train options]",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="The other arguments are `peftlab train`'s (`peftlab train -h` lists them).")
    p.add_argument("--out", metavar="FILE", help="write the JSON line to FILE too (only when the run succeeds)")
    return p


def main(argv: list[str]) -> dict:
    if "-h" in argv or "--help" in argv:
        parser().print_help()
        raise SystemExit(0)
    out = None
    for i, arg in enumerate(argv):  # --out FILE or --out=FILE (which went to `peftlab train`, an unknown option there)
        if arg == "--out" or arg.startswith("--out="):
            joined = arg.startswith("--out=")
            name = arg[len("--out="):] if joined else (argv[i + 1] if i + 1 < len(argv) else "")
            if not name or name.startswith("-"):
                parser().error("--out: expected a FILE after it (where the JSON line is written)")
            out, argv = Path(name), argv[:i] + argv[i + (1 if joined else 2):]
            break
    if all(arg.startswith("-") or "=" in arg for arg in argv):  # no recipe: `peftlab train` ran its 250-step quickstart
        parser().error("RECIPE: give the recipe to probe, e.g. recipes/smollm2-135m/samsum-sft-lora.yaml train.max_steps=3")

    from torch.optim.optimizer import register_optimizer_step_post_hook

    from peftlab import cli
    from peftlab.rundir import atomic_write_text

    probe = Probe()
    train_module = importlib.import_module("peftlab.train")  # (peftlab.train the attribute is the function)
    loop = train_module.loop

    def probed_loop(*args, **kwargs):
        probe.sample()
        probe.phase = "train"
        try:
            return loop(*args, **kwargs)
        finally:
            probe.sample()
            probe.phase = "after"

    hook = register_optimizer_step_post_hook(probe.step_end)
    train_module.loop = probed_loop
    thread = threading.Thread(target=probe.run, daemon=True)
    start = time.perf_counter()
    thread.start()
    try:
        code = cli.main(["-q", "train", *argv])
    finally:
        probe.done.set()
        thread.join()
        probe.sample()
        train_module.loop = loop
        hook.remove()
    result = {"exit": code, "allocator": os.environ.get("LD_PRELOAD") or "glibc", "malloc_conf": os.environ.get("MALLOC_CONF"),
              "hwm": status_mib("VmHWM"), "peaks": probe.peaks, "step_ends": probe.steps,
              "wall_s": round(time.perf_counter() - start, 1), "args": argv}
    line = json.dumps(result)
    print(line, flush=True)
    if out is not None and code == 0:
        atomic_write_text(out, line + "\n")
    elif out is not None:
        print(f"{out} not written: the run failed (exit {code})", file=sys.stderr)
    return result


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:])["exit"])
