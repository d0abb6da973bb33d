"""Transfer-learning study: accuracy vs amount of labelled data, per method, on SST-2 and AG News (packaged MiniLM).

For each task x method x fraction of the train split x seed, one `peftlab train` process (peak RSS from wait4 is
that run's own) built from the shipped recipe with overrides only. Every finished run is appended to the JSON store
at once, and a rerun skips the runs already there: a crashed or interrupted study picks up where it stopped.

    python benchmarks/transfer_study.py                          # the full study (hours: see benchmarks/README.md)
    python benchmarks/transfer_study.py --tasks sst2 --methods lora,full --fractions 0.01,0.1
    python benchmarks/transfer_study.py --quick                  # minutes: the same pipeline on tiny budgets

Step budget: a run of n training rows takes min(cap, max(floor, ceil(epochs x n / batch))) optimizer steps
(defaults: 2 epochs, at least 100 steps, at most 1000): small fractions get several passes, large ones a fixed budget.
Given --max-steps alone below the default floor, the floor is lowered to it (and --min-steps alone above the default cap
raises the cap); both given, --min-steps must not exceed --max-steps.
Writes benchmarks/results/transfer_study.{json,csv,md} and transfer_study-curves.png, transfer_study-params.png
(with --quick: transfer_study-quick.*).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import os
import shutil
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmarks.common, and this checkout's peftlab
from benchmarks.common import METHODS, RESULTS, RunFailed, check_counts, fill_unset, fractions_arg, save_figure, train_process, write_result  # noqa: E402

DEFAULT_METHODS = "scratch,frozen,lora,qlora,dora,ia3,full"
TASKS = {  # recipe, split scored, train rows, overrides (AG News: no held-out eval, the test split scores each run)
    "sst2": ("recipes/minilm/sst2-lora.yaml", "eval", 67349, ["data.eval=../shared/data/sst2/dev.tsv", "data.test=null"]),
    "agnews": ("recipes/minilm/agnews-lora.yaml", "test", 5000, ["data.eval_holdout=0", "data.max_length=64"]),
}
MAJORITY = {"sst2": 50.9, "agnews": 25.0}  # accuracy (%) of always answering the most frequent class of the scored split
QUICK = {"methods": "lora,frozen", "fractions": "0.01,0.3", "seeds": 2, "seeds_large": 1, "min_steps": 24, "max_steps": 24,
         "batch_size": 16, "eval_rows": 200}


def steps_for(rows: int, args) -> int:
    return min(args.max_steps, max(args.min_steps, math.ceil(args.epochs * rows / args.batch_size)))


def weights_mib(out: Path) -> float:
    """What a user keeps and ships: the adapter (with the new head), or the whole model for full/scratch/frozen."""
    return sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20


def run_one(task: str, method: str, fraction: float, seed: int, args) -> dict:
    recipe, split, total_rows, task_overrides = TASKS[task]
    rows = max(1, round(fraction * total_rows))
    steps = steps_for(rows, args)
    name = f"{task}-{method}-f{fraction:g}-s{seed}"
    out = args.results / "runs" / args.name / name
    overrides = [*task_overrides, *METHODS[method], f"name={name}", f"train.seed={seed}",
                 f"data.train.max_samples={rows}", f"train.max_steps={steps}", f"train.batch_size={args.batch_size}",
                 "train.eval_every=null", "train.save_every=null", "train.keep_best=false", "export.merge=false",
                 "train.log_every=50", *args.set]
    if args.eval_rows:
        overrides.append(f"data.{split}.max_samples={args.eval_rows}")
    print(f"[{name}] {rows} rows, {steps} steps", flush=True)
    run, peak_rss, wall = train_process(name, recipe, overrides, out, verbose=args.verbose)
    m = run["metrics"][split]
    row = {"task": task, "method": method, "fraction": fraction, "seed": seed, "train_rows": rows, "steps": run["steps"],
           "split": split, "accuracy": m["accuracy"], "macro_f1": m["f1"], "trainable_params": run["trainable_params"],
           "total_params": run["total_params"], "weights_mib": weights_mib(out), "train_wall_s": run["train_wall_s"],
           "process_wall_s": wall, "peak_rss_mib": peak_rss, "precision": run["precision"],
           "torch_threads": run["hardware"]["torch_threads"]}
    if not args.keep_runs:
        shutil.rmtree(out, ignore_errors=True)  # full/scratch weights are 87 MiB a run: the row keeps what was measured
    return row


def config_key(args) -> str:
    """Runs are comparable (and skipped on rerun) only under the same budget and overrides."""
    cfg = {"epochs": args.epochs, "min_steps": args.min_steps, "max_steps": args.max_steps, "batch_size": args.batch_size,
           "eval_rows": args.eval_rows, "set": args.set}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]


def save_rows(store: Path, rows: list[dict]) -> None:
    tmp = store.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"rows": rows}, indent=1))
    os.replace(tmp, store)  # atomic: a crash never leaves a half-written store


def mean_std(rs: list[dict], key: str, scale: float = 1.0) -> tuple[float, float]:
    """(mean, standard deviation over seeds); one seed has no spread to show: nan (no "± 0.00", no zero error bar)."""
    vals = [scale * r[key] for r in rs]
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else float("nan")


def pm(v: tuple[float, float]) -> str:
    return f"{v[0]:.2f} ± {v[1]:.2f}" if v[1] == v[1] else f"{v[0]:.2f} (one seed)"


def summarize(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["method"], r["fraction"]), []).append(r)
    out = []
    for (task, method, fraction), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], list(METHODS).index(kv[0][1]), kv[0][2])):
        out.append({"task": task, "method": method, "fraction": fraction, "runs": len(rs), "train_rows": rs[0]["train_rows"],
                    "steps": rs[0]["steps"], "accuracy": mean_std(rs, "accuracy", 100), "macro_f1": mean_std(rs, "macro_f1", 100),
                    "trainable_params": rs[0]["trainable_params"], "weights_mib": rs[0]["weights_mib"],
                    "train_wall_s": statistics.fmean(r["train_wall_s"] for r in rs),
                    "peak_rss_mib": statistics.fmean(r["peak_rss_mib"] for r in rs)})
    return out


def table(summary: list[dict]) -> str:
    lines = ["| task | method | % train | rows | steps | runs | accuracy (%) | macro-F1 (%) | trainable params | weights on disk (MiB) "
             "| train wall (s) | peak RSS (MiB) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['task']} | {s['method']} | {100 * s['fraction']:g} | {s['train_rows']:,} | {s['steps']} | {s['runs']} "
                     f"| {pm(s['accuracy'])} | {pm(s['macro_f1'])} "
                     f"| {s['trainable_params']:,} | {s['weights_mib']:.2f} | {s['train_wall_s']:.0f} | {s['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def headlines(summary: list[dict]) -> list[str]:
    """The study's three questions, answered from the table (means over seeds), one bullet each per task."""
    lines = []
    for task in sorted({s["task"] for s in summary}):
        rows = [s for s in summary if s["task"] == task]
        acc = {(s["method"], s["fraction"]): s["accuracy"][0] for s in rows}
        params = {s["method"]: s["trainable_params"] for s in rows}
        fractions = sorted({s["fraction"] for s in rows})
        top = fractions[-1]
        if ("scratch", top) in acc and "lora" in params:
            target = acc["scratch", top]
            reach = [f for f in fractions if acc.get(("lora", f), -1.0) >= target]
            if not reach:
                lines.append(f"{task}: LoRA stays below scratch on {100 * top:g}% of the data ({target:.1f}) at every "
                             "fraction measured")
            else:
                least = " (the smallest fraction measured: an upper bound)" if reach[0] == fractions[0] else ""
                lines.append(f"{task}: LoRA reaches what scratch gets from {100 * top:g}% of the data ({target:.1f}) with "
                             f"{100 * reach[0]:g}% of it ({acc['lora', reach[0]]:.1f}){least}")
        for method in ("lora", "qlora", "dora"):
            gaps = [f"{acc[method, f] - acc['full', f]:+.1f} at {100 * f:g}%" for f in fractions
                    if (method, f) in acc and ("full", f) in acc]
            if gaps:
                lines.append(f"{task}: {method} minus full fine-tuning, accuracy points: {', '.join(gaps)}")
        for method in ("ia3", "vera"):
            if all((m, top) in acc for m in (method, "lora", "full")):
                lines.append(f"{task}: {method} trains {params[method]:,} parameters ({params['full'] / params[method]:,.0f}x "
                             f"fewer than full, {params['lora'] / params[method]:.0f}x fewer than LoRA): {acc[method, top]:.1f} "
                             f"at {100 * top:g}% vs LoRA {acc['lora', top]:.1f} and full {acc['full', top]:.1f}")
    return lines


def plot(summary: list[dict], stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({s["task"] for s in summary})
    methods = [m for m in METHODS if any(s["method"] == m for s in summary)]
    colors = {m: plt.cm.tab10(i) for i, m in enumerate(METHODS)}
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for i, m in enumerate(methods):
            pts = sorted((s["fraction"], *s["accuracy"]) for s in summary if s["task"] == task and s["method"] == m)
            if pts:
                x, y, e = zip(*pts)
                dodge = 1.04 ** (i - (len(methods) - 1) / 2)  # side by side around each fraction, so error bars do not overlap
                ax.errorbar([100 * v * dodge for v in x], y, yerr=e, marker="o", capsize=3, label=m, color=colors[m])
        ax.axhline(MAJORITY[task], color="black", linestyle=":", linewidth=1, label="majority class")
        ax.set_xscale("log")
        ticks = sorted({100 * s["fraction"] for s in summary if s["task"] == task})
        ax.set_xticks(ticks, [f"{t:g}%" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("labelled train data (% of the split, log scale)")
        ax.set_ylabel("accuracy (%), mean ± std over seeds")
        ax.set_title(f"{task}: learning curves")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle("MiniLM transfer study: accuracy vs amount of labelled data")
    fig.tight_layout()
    curves = stem.with_name(stem.name + "-curves.png")
    save_figure(fig, curves, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        done = [s for s in summary if s["task"] == task]
        top = max(s["fraction"] for s in done)
        for s in sorted((s for s in done if s["fraction"] == top), key=lambda s: s["trainable_params"]):
            ax.errorbar(s["trainable_params"], s["accuracy"][0], yerr=s["accuracy"][1], marker="o", capsize=3,
                        color=colors[s["method"]], label=s["method"])
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log scale)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{task}: accuracy vs trainable params at {100 * top:g}% of the train data")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # colours as in the learning curves
    fig.tight_layout()
    params = stem.with_name(stem.name + "-params.png")
    save_figure(fig, params, dpi=110)
    plt.close(fig)
    return [curves, params]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="sst2,agnews")
    p.add_argument("--methods", default=None, help=f"comma list of {', '.join(METHODS)} (default {DEFAULT_METHODS})")
    p.add_argument("--fractions", default=None, help="fractions of the train split (default 0.01,0.03,0.1,0.3,1)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per fraction <= 10%% (default 3)")
    p.add_argument("--seeds-large", type=int, default=None, help="seeds per fraction > 10%% (default 1)")
    p.add_argument("--epochs", type=float, default=2.0, help="passes over the subset, within the step floor and cap")
    p.add_argument("--min-steps", type=int, default=None, help="step floor per run (default 100)")
    p.add_argument("--max-steps", type=int, default=None, help="step cap per run (default 1000)")
    p.add_argument("--batch-size", type=int, default=None, help="default 32 (the recipes')")
    p.add_argument("--eval-rows", type=int, default=None, help="score on a seeded subset of the scored split (default: all of it)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra recipe override for every run")
    p.add_argument("--quick", action="store_true", help="CI-sized: lora+frozen, 1%% (2 seeds) and 30%%, 24 steps, 200 eval rows")
    p.add_argument("--name", default=None, help="results file stem (default transfer_study, or transfer_study-quick)")
    p.add_argument("--results", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    p.add_argument("--keep-runs", action="store_true", help="keep each run's output folder (weights) under RESULTS/runs/NAME")
    p.add_argument("--fresh", action="store_true",
                   help="measure this call's runs again (each replaces its stored row; the store's other rows are kept)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    given = {k for k in ("min_steps", "max_steps") if getattr(args, k) is not None}
    defaults = {"methods": DEFAULT_METHODS, "fractions": "0.01,0.03,0.1,0.3,1", "seeds": 3, "seeds_large": 1, "min_steps": 100,
                "max_steps": 1000, "batch_size": 32, "eval_rows": None}
    fill_unset(args, QUICK if args.quick else {}, defaults)  # --quick with some knobs given: the rest from the full defaults
    if given == {"max_steps"}:  # a cap below the default floor: the floor follows it
        args.min_steps = min(args.min_steps, args.max_steps)
    elif given == {"min_steps"}:  # a floor above the default cap: the cap follows it
        args.max_steps = max(args.min_steps, args.max_steps)
    if unknown := [t for t in args.tasks.split(",") if t not in TASKS]:
        p.error(f"--tasks: unknown {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    if unknown := [m for m in args.methods.split(",") if m not in METHODS]:
        p.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    fractions = fractions_arg(p, args.fractions, 1, "numbers", "a fraction of the train split", "0.01,0.1,1")
    # checked before any run: --batch-size 0 divided by zero, --seeds 0 ran nothing ("no finished runs"), --epochs 0 --min-steps 0
    # trained 0 steps and stored the untrained model as a result, --min-steps above --max-steps silently trained --max-steps
    check_counts(p, (("--seeds", args.seeds, "at least 1 seed per fraction <= 10%"),
                    ("--seeds-large", args.seeds_large, "at least 1 seed per fraction > 10%"),
                    ("--batch-size", args.batch_size, "at least 1 row per batch"),
                    ("--max-steps", args.max_steps, "at least 1 optimizer step per run"),
                    ("--min-steps", args.min_steps, "at least 1 optimizer step per run")))
    if not 0 < args.epochs < math.inf:  # (inf overflowed in steps_for)
        p.error(f"--epochs {args.epochs:g}: give a positive number of passes over the subset (e.g. 2 or 0.5)")
    if args.min_steps > args.max_steps:
        p.error(f"--min-steps {args.min_steps} --max-steps {args.max_steps}: the step floor is above the cap; give --min-steps <= --max-steps")
    if args.eval_rows is not None and args.eval_rows < 1:
        p.error(f"--eval-rows {args.eval_rows}: give at least 1 row, or leave it out to score all of the scored split")
    if args.quick and not any(item.split("=", 1)[0].strip() == "data.max_length" for item in args.set):
        args.set = ["data.max_length=64", *args.set]  # what --quick promises, unless the user's --set gives its own
    args.name = args.name or ("transfer_study-quick" if args.quick else "transfer_study")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.results.mkdir(parents=True, exist_ok=True)
    store = args.results / f"{args.name}.json"
    # the store holds every slice measured so far: --fresh replaces only the rows of the runs this call measures again
    rows = json.loads(store.read_text())["rows"] if store.is_file() else []
    key = config_key(args)
    failed = []
    for task in args.tasks.split(","):
        for method in args.methods.split(","):
            for fraction in fractions:
                for seed in range(args.seeds if fraction <= 0.1 else args.seeds_large):
                    this = (task, method, fraction, seed, key)
                    if not args.fresh and this in {(r["task"], r["method"], r["fraction"], r["seed"], r["config"]) for r in rows}:
                        continue  # resumable: finished runs are not repeated
                    try:
                        row = run_one(task, method, fraction, seed, args)
                    except RunFailed as e:  # the others still run; the summary lists it
                        print(e, flush=True)
                        failed.append(str(e))
                        continue
                    rows = [r for r in rows if (r["task"], r["method"], r["fraction"], r["seed"], r["config"]) != this]
                    rows.append({**row, "config": key})
                    save_rows(store, rows)  # at once: a crash loses at most the run in progress
    current = [r for r in rows if r["config"] == key]
    if not current:
        print("no finished runs")
        return 1
    summary = summarize(current)
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(current[0]))
    writer.writeheader()
    writer.writerows(current)
    write_result(args.results / f"{args.name}.csv", buffer.getvalue())  # each results file whole or not at all
    md = "\n".join([table(summary), "", *(f"- {line}" for line in headlines(summary))]).rstrip()
    write_result(args.results / f"{args.name}.md", md + "\n")
    plot(summary, args.results / args.name)
    print(md)
    if failed:
        print(f"{len(failed)} run(s) failed; rerun the same command to retry them:\n" + "\n".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
