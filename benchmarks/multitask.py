"""Multi-task learning (issue 20): one MiniLM for SST-2, AG News (5k), emotion and MRPC vs a model per task, and
intermediate-task transfer to a low-data task.

From recipes/minilm/multitask-lora.yaml (LoRA r16 on every linear layer, batch 32, temperature sampling T=2):
  multi-shared      the four tasks, one shared adapter, a head each, --steps optimizer steps in all
  multi-per_task    the same with an adapter per task (4x the adapter parameters)
  single-TASK       each task alone (that task's data, labels and metric, the same adapter and batch), with the share
                    of the --steps that task gets in the multi-task run (--single share, the default: the four single-task
                    runs together take the same total steps and see the same rows as the one multi-task run), or all of
                    the --steps (--single full: each single-task run costs as much as the whole multi-task run)
Intermediate-task transfer (--transfer): the low-data task (--target, default emotion) with 1% and 10% of its training
rows, from the packaged MiniLM (base) or from a multi-task run of the OTHER three tasks (its shared adapter merged
into MiniLM: model.from_run), seeds --seeds. Selection: each task's validation data (a train hold-out where the data
has none); every test split is scored once at the end.

Every run is one `peftlab train` process (benchmarks/common.py), kept under runs/mt/ and its result under
benchmarks/results/multitask/; rerunning skips what is finished (--fresh to redo).

  python benchmarks/multitask.py --steps 600                        # multi vs single, one seed
  python benchmarks/multitask.py --steps 600 --transfer --seeds 0,1,2
  python benchmarks/multitask.py --report                           # the tables from every stored seed
Results: benchmarks/results/multitask.md (+ one JSON per run in benchmarks/results/multitask/).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import REPO, RESULTS, check_counts, ints_arg, stored_case, write_result  # noqa: E402

RECIPE = "recipes/minilm/multitask-lora.yaml"
TASKS = ("sst2", "agnews", "emotion", "mrpc")
RUNS, OUT = REPO / "runs" / "mt", RESULTS / "multitask"
FRACTIONS = (0.01, 0.10)


def single_recipe(task: str) -> str:
    """Task `task` of the multi-task recipe as a single-task recipe file (the same adapter, batch, lr and schedule)."""
    import yaml

    from peftlab import load_recipe
    from peftlab.tasks.multitask import subrecipe

    sub = subrecipe(load_recipe(REPO / RECIPE, validate_files=False), task)
    sub.output_dir = None
    tree = yaml.safe_load(sub.to_yaml())
    tree.pop("multitask")
    path = RUNS / "recipes" / f"single-{task}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return str(path)


def case(name: str, recipe: str, overrides: list[str], fresh: bool, verbose: bool) -> dict:
    """One training process, or its stored result."""
    return stored_case(name, recipe, overrides, runs=RUNS, results=OUT, prefix="mt", fresh=fresh, verbose=verbose)


CONDITIONS = ("multi-shared", "multi-per_task", "single")  # the main comparison's runs (--conditions)


def steps_overrides(steps: int) -> list[str]:
    every = max(steps // 4, 1)
    return [f"train.max_steps={steps}", f"train.eval_every={every}", f"train.save_every={every}"]


def measure(args) -> None:
    seeds, conditions = args.seeds, args.conditions
    steps = steps_overrides(args.steps)
    for seed in seeds[:1] if not args.all_seeds else seeds:
        if "multi-shared" in conditions:
            case(f"multi-shared-{args.steps}-s{seed}", RECIPE, [*steps, f"train.seed={seed}"], args.fresh, args.verbose)
        if "multi-per_task" in conditions:
            case(f"multi-per_task-{args.steps}-s{seed}", RECIPE, [*steps, "multitask.adapters=per_task", f"train.seed={seed}"],
                 args.fresh, args.verbose)
        if "single" in conditions:
            budget = dict(zip(TASKS, [args.steps] * len(TASKS))) if args.single == "full" else step_shares(args.steps)
            for task in TASKS:
                case(f"single-{task}-{args.single}{args.steps}-s{seed}", single_recipe(task),
                     [*steps_overrides(budget[task]), f"train.seed={seed}"], args.fresh, args.verbose)
    if args.transfer:
        target = args.target
        source = case(f"multi-shared-no-{target}-{args.steps}-s0", RECIPE,
                      [*steps, f"multitask.tasks.{target}=null", "train.seed=0"], args.fresh, args.verbose)
        start = RUNS / source["name"] / "tasks" / next(t for t in TASKS if t != target)
        recipe = single_recipe(target)
        rows = sum(1 for _ in open(REPO / single_train_path(target)))
        for fraction in FRACTIONS:
            n = max(int(rows * fraction), 32)
            for seed in seeds:
                low = [f"data.train.max_samples={n}", "train.max_steps=150", "train.batch_size=16", "train.eval_every=50",
                       "train.save_every=null", "train.warmup_fraction=0.1", f"train.seed={seed}"]
                for origin, extra in (("base", []), ("multi", [f"model.from_run={start}"])):
                    case(f"transfer-{target}-{int(fraction * 100)}pct-{origin}-s{seed}", recipe, [*low, *extra], args.fresh,
                         args.verbose)


def step_shares(steps: int) -> dict[str, int]:
    """The optimizer steps each task gets in a multi-task run of `steps` (its sampling shares of the training rows,
    read and split as the run reads them), rounded to add up to `steps`."""
    from peftlab import load_recipe
    from peftlab.data import load_splits
    from peftlab.tasks.multitask import block_counts, task_probabilities

    recipe = load_recipe(REPO / RECIPE)
    splits, _ = load_splits(recipe)
    sizes = [len(splits["train"][t]) for t in TASKS]
    m = recipe.multitask
    return dict(zip(TASKS, block_counts(task_probabilities(sizes, m.sampling, m.temperature), steps)))


def single_train_path(task: str) -> str:
    from peftlab import load_recipe

    return load_recipe(REPO / RECIPE, validate_files=False).multitask.tasks[task].data.train.path


# ------------------------------------------------------------------------------------------------ report

def task_score(result: dict, task: str, key: str = "accuracy") -> float | None:
    m = result["run"]["metrics"].get("test", {})
    return m.get(f"{task}/{key}", m.get(key) if result["run"]["task"] != "multitask" else None)


def by_seed(prefix: str) -> dict[int, dict]:
    """The stored runs PREFIX-s0, -s1, ... by seed."""
    return {int(f.stem.rsplit("-s", 1)[1]): json.loads(f.read_text()) for f in sorted(OUT.glob(f"{prefix}-s*.json"))
            if f.stem.rsplit("-s", 1)[1].isdigit()}


def over_seeds(values: dict[int, float], sign: str = "") -> str:
    """'mean (each seed's value)' in points, or the one value; sign="+" for differences."""
    if not values:
        return "-"
    shown = [f"{100 * v:{sign}.2f}" for _, v in sorted(values.items())]
    return shown[0] if len(shown) == 1 else f"{100 * statistics.mean(values.values()):{sign}.2f} ({', '.join(shown)})"


def report(args) -> str:
    lines = []
    for steps in sorted({int(f.stem.split("-")[-2]) for f in OUT.glob("multi-shared-*-s*.json") if f.stem.split("-")[-2].isdigit()}):
        multi = {c: by_seed(f"multi-{c}-{steps}") for c in ("shared", "per_task")}
        single = {(t, kind): by_seed(f"single-{t}-{kind}{steps}") for t in TASKS for kind in ("share", "full")}
        seeds = sorted(set(multi["shared"]))
        lines += [f"### {steps} optimizer steps of 32 rows per multi-task run (test splits; seeds {', '.join(map(str, seeds))}: "
                  "the mean, then each seed)", "",
                  "| task (metric) | single-task, its share of the steps | single-task, all the steps | multi-task, shared "
                  "adapter | multi-task, adapter per task | shared - single (its share), paired by seed |", "|---|---|---|---|---|---|"]
        for task in TASKS:
            key = "f1" if task == "mrpc" else "accuracy"
            scores = [{s: v for s, r in runs.items() if (v := task_score(r, task, key)) is not None}
                      for runs in (single[task, "share"], single[task, "full"], multi["shared"], multi["per_task"])]
            shown = [over_seeds(v) for v in scores]
            if single[task, "share"]:
                shown[0] += f" [{next(iter(single[task, 'share'].values()))['run']['steps']} steps]"
            both = sorted(set(scores[0]) & set(scores[2]))
            shown.append(over_seeds({s: scores[2][s] - scores[0][s] for s in both}, "+"))
            lines.append(f"| {task} ({key}) | " + " | ".join(shown) + " |")
        cost = {name: f"{next(iter(r.values()))['run']['trainable_params']:,} trainable, "
                      f"{statistics.median(x['run']['train_wall_s'] for x in r.values()) / 60:.1f} min train"
                for name, r in [*((f"single {t} ({k})", single[t, k]) for t, k in single), *multi.items()] if r}
        lines += ["", "Cost (median train wall time over the seeds; some runs shared the 2 cores): "
                  + "; ".join(f"{k}: {v}" for k, v in cost.items()) + ".", ""]
    transfer = transfer_rows(args.target)
    if transfer:
        lines += [f"### Intermediate-task transfer to {args.target} (test split; mean ± sd over seeds, gains paired by seed)",
                  "", *transfer]
    return "\n".join(lines)


def transfer_rows(target: str) -> list[str]:
    """One row per fraction of the target's labels: accuracy and macro-F1 from the base and from the multi-task run,
    and the gain paired by seed (mean ± its standard error over seeds, each seed's gain), over every stored seed."""
    def mean_sd(v: list[float]) -> str:
        return f"{100 * statistics.mean(v):.2f}" + (f" ± {100 * statistics.stdev(v):.2f}" if len(v) > 1 else "")

    rows = []
    for fraction in FRACTIONS:
        runs = {origin: by_seed(f"transfer-{target}-{int(fraction * 100)}pct-{origin}") for origin in ("base", "multi")}
        paired = sorted(set(runs["base"]) & set(runs["multi"]))
        if not paired:
            continue
        cells = []
        for key in ("accuracy", "f1"):
            base, multi = ([task_score(runs[o][s], target, key) for s in paired] for o in ("base", "multi"))
            gains = [m - b for m, b in zip(multi, base)]
            se = f" ± {100 * statistics.stdev(gains) / len(gains) ** 0.5:.2f}" if len(gains) > 1 else ""
            cells += [mean_sd(base), mean_sd(multi), f"**{100 * statistics.mean(gains):+.2f}**{se} ("
                      + ", ".join(f"{100 * g:+.2f}" for g in gains) + ")"]
        first = runs["base"][paired[0]]
        n = next(o.split("=")[1] for o in first["overrides"] if o.startswith("data.train.max_samples="))
        minutes = statistics.median(r["run"]["train_wall_s"] / 60 for o in runs.values() for r in o.values())
        rows.append(f"| {int(fraction * 100)}% ({n} rows, {first['run']['steps']} steps) | " + " | ".join(cells)
                    + f" | {len(paired)} | {minutes:.1f} min |")
    if not rows:
        return []
    return ["| target's training rows | accuracy from the base | from the multi-task run | gain | macro-F1 from the base | "
            "from the multi-task run | gain | seeds | train time (median) |", "|---|---|---|---|---|---|---|---|---|", *rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps of every multi- and single-task run")
    p.add_argument("--conditions", default="multi-shared,multi-per_task,single",
                   help=f"which of the main comparison's runs: a comma list of {', '.join(CONDITIONS)}, or none (e.g. --transfer only)")
    p.add_argument("--single", default="share", choices=("share", "full"),
                   help="single-task runs: the task's share of --steps (default) or all of them")
    p.add_argument("--transfer", action="store_true", help="also the intermediate-task transfer runs")
    p.add_argument("--target", default="emotion", choices=TASKS, help="the low-data task of the transfer runs")
    p.add_argument("--seeds", default="0", help="seeds of the transfer runs to measure (the main comparison uses the first); the report: every stored seed")
    p.add_argument("--all-seeds", action="store_true", help="run the main comparison with every seed too")
    p.add_argument("--report", action="store_true", help="only write benchmarks/results/multitask.md from what is done")
    p.add_argument("--fresh", action="store_true")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args()
    # checked before any work: --seeds a,b was a traceback; --steps 0 trained (and stored) a run of no step; a misspelled
    # condition measured nothing and rewrote multitask.md
    check_counts(p, [("--steps", args.steps, "at least 1 optimizer step")])
    args.seeds = ints_arg(p, "--seeds", args.seeds, "0,1,2")
    args.conditions = [] if args.conditions == "none" else args.conditions.split(",")
    if unknown := [c for c in args.conditions if c not in CONDITIONS]:
        p.error(f"--conditions: unknown {unknown}; choose from {', '.join(CONDITIONS)}, or none")
    if not args.report:
        measure(args)
    text = report(args)
    write_result(OUT.with_suffix(".md"), text + "\n")
    print(text)


if __name__ == "__main__":
    main()
