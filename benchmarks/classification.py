"""Classification benchmark: LoRA vs QLoRA vs full fine-tuning vs frozen backbone on SST-2 and AG News (MiniLM).

Each configuration runs as its own `peftlab train` process (so peak RSS is that run's own), one after another,
with the same budget. Results are resumable: finished runs are read back, not repeated.

    python benchmarks/classification.py                       # the table in benchmarks/README.md
    python benchmarks/classification.py --tasks sst2 --sst2-train 67349 --name sst2-full   # the full SST-2 train split
    python benchmarks/classification.py --quick               # a minutes-long smoke of the same pipeline

Writes benchmarks/results/classification.json, classification.md and classification.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmarks.common, and this checkout's peftlab
from benchmarks.common import METHODS as ALL_METHODS  # noqa: E402
from benchmarks.common import RESULTS, measured_line, save_figure, train_process, write_result  # noqa: E402

METHODS = {m: ALL_METHODS[m] for m in ("lora", "qlora", "full", "frozen")}  # same data and budget for each
TASKS = {
    "sst2": ("recipes/minilm/sst2-lora.yaml", "eval"),
    "agnews": ("recipes/minilm/agnews-lora.yaml", "test"),
}


def run_one(task: str, method: str, args) -> dict:
    recipe, split = TASKS[task]
    out = RESULTS / "runs" / (args.name or ("quick" if args.quick else "")) / f"{task}-{method}"  # (--quick: not the full runs)
    overrides = [*METHODS[method], f"name={task}-{method}", f"train.epochs={args.epochs}",
                 "train.save_every=null", "train.eval_every=null", "export.merge=false", "train.log_every=50"]
    if task == "sst2":  # no selection here (eval_every=null): score SST-2 dev once as the eval split, as measured so far
        overrides += [f"data.train.max_samples={args.sst2_train}", "data.eval=../shared/data/sst2/dev.tsv", "data.test=null"]
    if task == "agnews":
        overrides.append(f"data.max_length={args.agnews_max_length}")
    overrides += args.set.get(method, [])
    if args.quick:  # (args.sst2_train and args.epochs are already 300 and 1)
        overrides += ["data.train.max_samples=300", f"data.{split}.max_samples=200"]
    print(f"[{task}/{method}] {' '.join(overrides)}", flush=True)
    run, peak_rss, wall = train_process(f"{task}/{method}", recipe, overrides, out, verbose=args.verbose)
    m = run["metrics"][split]
    return {"task": task, "method": method, "split": split, "accuracy": m["accuracy"], "macro_f1": m["f1"],
            "trainable_params": run["trainable_params"], "total_params": run["total_params"],
            "trainable_percent": run["trainable_percent"], "train_examples": run["train_examples"],
            "train_wall_s": run["train_wall_s"], "wall_per_epoch_s": run["train_wall_s"] / args.epochs,
            "examples_per_s": run["examples_per_s"], "tokens_per_s": run["tokens_per_s"],
            "peak_rss_mib": peak_rss, "base_weights_mib": run.get("base_weights_mib"), "process_wall_s": wall, "precision": run["precision"],
            "hardware": run["hardware"], "versions": {k: run["versions"][k] for k in ("torch", "transformers", "peft")}}


def table(rows: list[dict]) -> str:
    head = ("| task | method | split | accuracy | macro-F1 | trainable params | % | train examples | wall/epoch (s) "
            "| examples/s | peak RSS (MiB) |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['task']} | {r['method']} | {r['split']} | {100 * r['accuracy']:.2f} | {100 * r['macro_f1']:.2f} "
                     f"| {r['trainable_params']:,} | {r['trainable_percent']:.3f} | {r['train_examples']:,} "
                     f"| {r['wall_per_epoch_s']:.0f} | {r['examples_per_s']:.1f} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (key, label) in zip(axes, [("accuracy", "accuracy (%)"), ("examples_per_s", "train examples/s"),
                                       ("peak_rss_mib", "peak RSS (MiB)")]):
        width = 0.8 / max(len(tasks), 1)
        methods = list(METHODS)
        for i, task in enumerate(tasks):
            # a case not measured (no row) gets no bar: it was drawn as a bar labelled 0
            vals = [next((r[key] * (100 if key == "accuracy" else 1) for r in rows if r["task"] == task and r["method"] == m), math.nan)
                    for m in methods]
            bars = ax.bar([j + i * width for j in range(len(methods))], vals, width, label=task)
            fmt = "%.1f" if key == "accuracy" else "%.0f"
            ax.bar_label(bars, labels=["" if math.isnan(v) else fmt % v for v in vals], fontsize=7)
        ax.set_xticks([j + width * (len(tasks) - 1) / 2 for j in range(len(methods))], methods)
        ax.set_title(label)
        if key == "accuracy":
            ax.set_ylim(40, 100)
        ax.legend(fontsize=8)
    fig.suptitle("MiniLM (all-MiniLM-L6-v2): LoRA vs QLoRA vs full fine-tuning vs frozen backbone, same budget")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="sst2,agnews")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--sst2-train", type=int, default=10000, help="SST-2 train rows (seeded subset; 67349 = all; --quick: 300)")
    p.add_argument("--agnews-max-length", type=int, default=64, help="AG News truncation (the recipe uses 128)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the train rows (--quick: 1)")
    p.add_argument("--set", action="append", default=[], metavar="METHOD:KEY=VALUE",
                   help="an extra recipe override for one method, e.g. lora:adapter.r=16 (repeatable)")
    p.add_argument("--quick", action="store_true", help="tiny subsets: checks the pipeline in minutes")
    p.add_argument("--fresh", action="store_true", help="ignore finished runs and measure again")
    p.add_argument("--name", default=None, help="results file stem (default: classification, or classification-quick)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args()
    if unknown := [t for t in args.tasks.split(",") if t not in TASKS]:
        p.error(f"--tasks: unknown {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    if unknown := [m for m in args.methods.split(",") if m not in METHODS]:
        p.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if args.sst2_train < 1:
        p.error(f"--sst2-train {args.sst2_train}: give at least 1 row (67349 = all of SST-2 train)")
    if not 0 < args.epochs < math.inf:
        p.error(f"--epochs {args.epochs:g}: give a positive number of passes (e.g. 1 or 0.5)")
    if args.quick:  # what --quick trains, and what the results record
        args.sst2_train, args.epochs = 300, 1.0
    sets: dict[str, list[str]] = {}
    for item in args.set:
        method, sep, override = item.partition(":")
        if not sep or method not in METHODS or "=" not in override:
            p.error(f"--set {item!r}: expected METHOD:KEY=VALUE with METHOD one of {', '.join(METHODS)}")
        sets.setdefault(method, []).append(override)
    args.set = sets
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    name = args.name or ("classification-quick" if args.quick else "classification")
    RESULTS.mkdir(parents=True, exist_ok=True)
    store = RESULTS / f"{name}.json"
    # --fresh measures every run again, each replacing its stored row when it finishes: an interrupted --fresh keeps the rest
    rows = json.loads(store.read_text())["rows"] if store.is_file() else []
    config = {"sst2_train": args.sst2_train, "agnews_max_length": args.agnews_max_length, "epochs": args.epochs,
              "quick": args.quick}
    for task in args.tasks.split(","):
        for method in args.methods.split(","):
            cfg = {**config, **({"set": args.set[method]} if method in args.set else {})}
            if not args.fresh and any(r["task"] == task and r["method"] == method and r.get("config") == cfg for r in rows):
                continue  # resumable: a finished run is not repeated
            rows = [r for r in rows if not (r["task"] == task and r["method"] == method)]
            rows.append({**run_one(task, method, args), "config": cfg})
            write_result(store, json.dumps({"rows": rows}, indent=2))
    # what the figures were measured with, said in the .md too: the sizes, the split scored (no selection: eval_every=null)
    md = (f"SST-2: {args.sst2_train:,} seeded train rows, dev scored as the `eval` split; AG News: data.max_length="
          f"{args.agnews_max_length}; {args.epochs:g} epoch(s), no evaluation during training, so nothing is selected on the "
          "split reported" + ("; --quick: 300 train rows and 200 rows of the split scored (a check that it runs, not a "
                               "measurement)" if args.quick else "") + ".\n" + measured_line(rows[0] if rows else None) + "\n\n")
    md += table(rows) + "".join(f"\n\n{r['task']}/{r['method']} with {' '.join(r['config']['set'])}"
                               for r in rows if r["config"].get("set"))
    # rows of other tasks/methods kept from an earlier invocation with other settings: said, never passed off as these
    other = [r for r in rows if {k: v for k, v in r.get("config", {}).items() if k != "set"} != config]
    md += "".join(f"\n\n{r['task']}/{r['method']}: measured with other settings ("
                  + ", ".join(f"{k} {r.get('config', {}).get(k, '?')}" for k in config if r.get("config", {}).get(k) != config[k])
                  + f" instead of {', '.join(f'{k} {v}' for k, v in config.items() if r.get('config', {}).get(k) != v)}; "
                  "--fresh measures it again)" for r in other)
    write_result(RESULTS / f"{name}.md", md + "\n")
    plot(rows, RESULTS / f"{name}.png")
    print(md)


if __name__ == "__main__":
    main()
