"""Model selection (issue 19): does `peftlab select` predict which base and method fine-tune best, and at what cost?

    python benchmarks/model_selection.py --list                                  # the settings and the candidates
    python benchmarks/model_selection.py --cases sst2,mrpc --stage truth         # real fine-tuning runs (ground truth)
    python benchmarks/model_selection.py --cases sst2,mrpc --stage select        # `peftlab select` on the same recipes
    python benchmarks/model_selection.py --report                                # Kendall tau-b, top-1, regret, cost
    python benchmarks/model_selection.py --quick --cases sst2                    # minutes: the pipeline end to end

Per setting (a task or an Amazon domain from ../shared/data), one recipe (written to RESULTS/<setting>/recipe.yaml):
the MiniLM LoRA recipe of recipes/minilm/ on that data. The items ranked are every candidate base x method (packaged
MiniLM and SmolLM2-135M-Instruct x frozen / LoRA / full fine-tuning), each made by the overrides
`peftlab.select.candidate_overrides` builds from BASE_SETS and METHOD_SETS, the same for the truth and the proxies.

- Truth: each item is one short real fine-tuning run (`peftlab train` in its own process: TRAIN_ROWS seeded training
  rows, TRUTH_STEPS optimizer steps of 16 rows, no selection), scored on the setting's validation split (AG News: a
  seeded subset of its test split; Amazon: a seeded quarter of the domain's labelled rows, held out of training).
  `--seeds 42,1` repeats each run with other training seeds over the same rows (`data.seed` stays 42): the truth is
  then the mean over seeds, and the seeds' agreement with each other is the ceiling a proxy's agreement is read against.
- Proxies: one `peftlab select` process (probe, LogME, a few training steps) on the same recipe. It reads the training
  rows only; the validation split that scores the truth is never read by it.

The report compares each proxy's ranking of the items with the truth's (Kendall tau-b; top-1: the truth's best item
is the proxy's first, ties in the proxy counted as a random pick among them; regret: accuracy points lost by taking the
proxy's pick), also at the level of bases (a base's truth is its best method), and states each proxy's cost as a
fraction of the truth runs it would replace. Every finished run is written at once; a rerun skips it (--fresh redoes),
and stops before any work if one was made with other candidates, --set items or budget than it asks for.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmarks.common, and this checkout's peftlab
from benchmarks.common import METHODS, RESULTS, RunFailed, ints_arg, train_process, write_result  # noqa: E402

D = "../shared/data"
SMOLLM2 = "../shared/models/smollm2-135m-instruct"
BASES = {"minilm": "minilm", "smollm2": SMOLLM2}
RANKED_METHODS = ("frozen", "lora", "full")
SEED = 42  # the recipes' train.seed and data.seed: the rows of every run and of the proxies
BASE_SETS = {SMOLLM2: ["adapter.target_modules=all-linear", "adapter.r=16", "adapter.alpha=32", "train.lr=3e-4"]}  # its recipes'
METHOD_SETS = {m: METHODS[m] for m in ("frozen", "full")}  # usual learning rates (benchmarks/common.py); lora: the recipe's
SENTIMENT = ["negative", "positive"]
SETTINGS: dict[str, dict] = {  # the data section of each setting's recipe
    "sst2": {"train": f"{D}/sst2/train.tsv", "eval": f"{D}/sst2/dev.tsv", "text_columns": ["sentence"], "label_names": SENTIMENT},
    "agnews": {"train": {"path": f"{D}/ag_news/train.csv", "column_names": ["text", "label"]},
               "eval": {"path": f"{D}/ag_news/test.csv", "column_names": ["class", "title", "description"],
                        "text_columns": ["title", "description"], "label_column": "class",
                        "label_map": {1: "World", 2: "Sports", 3: "Business", 4: "Sci/Tech"}},
               "text_columns": ["text"], "label_names": ["World", "Sports", "Business", "Sci/Tech"]},
    "emotion": {"train": f"{D}/emotion/train.jsonl", "eval": f"{D}/emotion/val.jsonl", "text_columns": ["text"],
                "label_names": ["sadness", "joy", "love", "anger", "fear", "surprise"]},
    "mrpc": {"train": f"{D}/mrpc/train.jsonl", "eval": f"{D}/mrpc/validation.jsonl", "text_columns": ["sentence1", "sentence2"],
             "label_names": ["not_equivalent", "equivalent"]},
    **{f"amazon-{d}": {"train": f"{D}/amazon_mdsd/labelled/{d}.jsonl", "eval": None, "eval_holdout": 0.25,
                       "text_columns": ["title", "text"], "label_names": SENTIMENT}
       for d in ("books", "dvd", "electronics", "kitchen")},
}
FULL = {"train_rows": 2000, "eval_rows": 500, "truth_steps": 125, "select_rows": 1000, "folds": 5, "select_steps": 20, "max_length": 128}
QUICK = {"train_rows": 64, "eval_rows": 32, "truth_steps": 2, "select_rows": 48, "folds": 3, "select_steps": 2, "max_length": 64}


def recipe_tree(setting: str, b: dict) -> dict:
    data = json.loads(json.dumps(SETTINGS[setting]))  # a copy
    for split, rows in (("train", b["train_rows"]), ("eval", b["eval_rows"])):
        spec = data.get(split)
        if spec is not None:
            data[split] = {**({"path": spec} if isinstance(spec, str) else spec), "max_samples": rows}
    if data.get("eval") is None:  # Amazon: the held-out quarter of the labelled rows scores the truth
        data["train"]["max_samples"] = round(b["eval_rows"] / data["eval_holdout"])
    data.update(test=None, max_length=b["max_length"], seed=SEED)
    return {
        "name": f"select-{setting}", "model": {"name": "minilm"},
        "adapter": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.1, "target_modules": ["query", "key", "value", "attention.output.dense"]},
        "data": data,
        "train": {"seed": SEED, "max_steps": b["truth_steps"], "batch_size": 16, "lr": 1.0e-3, "warmup_fraction": 0.06, "eval_every": None,
                  "save_every": None, "keep_best": False, "log_every": 25},
        "eval": {"batch_size": 64}, "export": {"merge": False},
    }


def items(bases: list[str]) -> list[tuple[str, str]]:
    return [(BASES[b], m) for b in bases for m in RANKED_METHODS]


def item_name(base: str, method: str) -> str:
    return f"{next(k for k, v in BASES.items() if v == base)}-{method}"


def write_recipe(folder: Path, setting: str, b: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(f"# written by benchmarks/model_selection.py: setting {setting}\n" + yaml.safe_dump(recipe_tree(setting, b), sort_keys=False))
    return path


def save(path: Path, data: dict) -> None:
    from peftlab.rundir import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2))  # a crash never leaves half a file


def truth(setting: str, folder: Path, recipe_path: Path, bases: list[str], args) -> None:
    from peftlab import load_recipe
    from peftlab.select import candidate_overrides

    recipe = load_recipe(recipe_path)
    for seed in args.seeds:  # seed by seed: a partial run still has whole rankings
        for base, method in items(bases):
            name = item_name(base, method)
            tag = "" if seed == SEED else f"-seed{seed}"
            dest = folder / f"truth-{name}{tag}.json"
            if dest.exists() and not args.fresh:
                continue
            overrides = [*candidate_overrides(recipe, base, method, {**BASE_SETS, **METHOD_SETS}), f"name=select-{setting}-{name}{tag}",
                         f"train.seed={seed}"]
            out = REPO / "runs" / "model-selection" / f"{setting}-{name}{tag}"
            print(f"[{setting}/{name}{tag}] truth: peftlab train {recipe_path.relative_to(REPO)} {' '.join(overrides)}", flush=True)
            run, rss, wall = train_process(f"{setting}/{name}{tag}", str(recipe_path), overrides, out, verbose=args.verbose)
            shutil.rmtree(out, ignore_errors=True)  # full fine-tunes are 87-540 MiB: the row keeps what was measured
            m = run["metrics"]["eval"]
            save(dest, {"setting": setting, "base": base, "method": method, "seed": seed, "accuracy": m["accuracy"], "f1": m["f1"],
                        "steps": run["steps"], "train_examples": run["train_examples"],
                        "train_wall_s": run["train_wall_s"], "process_wall_s": wall, "peak_rss_mib": rss,
                        "precision": run["precision"], "overrides": overrides})
            print(f"[{setting}/{name}{tag}] eval accuracy {100 * m['accuracy']:.2f}, {wall:.0f} s", flush=True)


def select_sets(bases: list[str]) -> list[str]:
    """The `peftlab select --set NAME:KEY=VALUE` items of these bases and RANKED_METHODS."""
    return [f"{k}:{o}" for k, v in {**BASE_SETS, **METHOD_SETS}.items() if k in [BASES[x] for x in bases] or k in RANKED_METHODS
            for o in v]


def stale(folder: Path, recipe_path: Path, bases: list[str], b: dict, args) -> list[str]:
    """The stored runs of a setting that this command would keep, each with what it was made with that this command does
    not ask for (candidates, methods, --set, budget of select.json; overrides and steps of a truth run)."""
    if args.fresh:
        return []
    out = []

    def compare(dest: Path, held: dict, asked: dict) -> None:
        if differs := [k for k in asked if held.get(k) is not None and held[k] != asked[k]]:
            out.append(f"{dest}: " + "; ".join(f"{k} stored {held[k]}, asked {asked[k]}" for k in differs))

    dest = folder / "select.json"
    if args.stage != "truth" and dest.exists():
        sel = json.loads(dest.read_text())
        settings = sel.get("settings") or {}  # (a select.json of an older peftlab has none: its rows say the candidates)
        compare(dest, {"candidates": sorted(settings.get("candidates") or {r["base"] for r in sel["rows"]}),
                       "methods": sorted(settings.get("methods") or {r["method"] for r in sel["rows"]}),
                       "set": sorted(settings["set"]) if "set" in settings else None, "budget": sel.get("budget")},
                {"candidates": sorted(BASES[x] for x in bases), "methods": sorted(RANKED_METHODS), "set": sorted(select_sets(bases)),
                 "budget": b})
    if args.stage != "select":
        recipe = None
        for seed in args.seeds:
            for base, method in items(bases):
                dest = folder / f"truth-{item_name(base, method)}{'' if seed == SEED else f'-seed{seed}'}.json"
                if dest.exists():
                    if recipe is None:
                        from peftlab import load_recipe
                        from peftlab.select import candidate_overrides

                        recipe = load_recipe(recipe_path)
                    t = json.loads(dest.read_text())
                    compare(dest, {"overrides": [o for o in t["overrides"] if not o.startswith(("name=", "train.seed="))], "steps": t["steps"]},
                            {"overrides": candidate_overrides(recipe, base, method, {**BASE_SETS, **METHOD_SETS}), "steps": b["truth_steps"]})
    return out


def proxies(setting: str, folder: Path, recipe_path: Path, bases: list[str], b: dict, args) -> None:
    dest = folder / "select.json"
    if dest.exists() and not args.fresh:  # made with these settings (stale() checked it)
        return
    cmd = [sys.executable, "-m", "peftlab.cli", *([] if args.verbose else ["-q"]), "select", str(recipe_path),
           "--candidates", *(BASES[x] for x in bases), "--methods", *RANKED_METHODS, "--proxies", "probe", "logme", "steps",
           "--max-rows", str(b["select_rows"]), "--folds", str(b["folds"]), "--steps", str(b["select_steps"]),
           *(f"--set={s}" for s in select_sets(bases)),
           "--json", str(folder / "select.raw.json"), "--overwrite"]  # (its own scratch file, removed below)
    print(f"[{setting}] select: {' '.join(cmd[2:])}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=None if args.verbose else subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"[{setting}] select failed (exit {proc.returncode}): {(proc.stderr or '')[-2000:]}")
    print(proc.stdout, flush=True)
    report = json.loads((folder / "select.raw.json").read_text())
    save(dest, {**report, "process_wall_s": wall, "budget": b})
    (folder / "select.raw.json").unlink()


# ----------------------------------------------------------------------------------------------- the report

def kendall_tau_b(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b: (concordant - discordant pairs) / sqrt(pairs untied in x * pairs untied in y); nan when either is constant."""
    conc = disc = only_x = only_y = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = (x[i] > x[j]) - (x[i] < x[j]), (y[i] > y[j]) - (y[i] < y[j])
            if dx and dy:
                conc, disc = conc + (dx == dy), disc + (dx != dy)
            elif dx:
                only_x += 1  # tied in y only
            elif dy:
                only_y += 1
    denom = math.sqrt((conc + disc + only_x) * (conc + disc + only_y))
    return (conc - disc) / denom if denom else float("nan")


def pick(scores: dict, truth: dict) -> tuple[float, float]:
    """(expected top-1 hit, expected regret in accuracy points) when the proxy picks at random among its tied best."""
    top = max(scores.values())
    chosen = [k for k, v in scores.items() if v == top]
    best = max(truth.values())
    return (statistics.fmean(truth[k] == best for k in chosen), statistics.fmean(100 * (best - truth[k]) for k in chosen))


def evaluate_setting(sel: dict, truths: dict[tuple, dict]) -> dict:
    """Per proxy: item-level tau-b, top-1, regret; base-level top-1 and regret; costs in seconds. An item whose figure
    failed in `peftlab select` (null: its base did not load) is left out of that proxy's figures (`failed`: how many);
    a proxy with no figure at all is None."""
    rows = {(r["base"], r["method"]): r for r in sel["rows"]}
    keys = [k for k in rows if k in truths]
    acc = {k: truths[k]["accuracy"] for k in keys}
    base_truth = {b: max(acc[k] for k in keys if k[0] == b) for b in {k[0] for k in keys}}
    out = {"items": len(keys), "truth_s": sum(truths[k]["process_wall_s"] for k in keys), "select_s": sel["process_wall_s"]}
    features = {r["features_group"]: r["features_seconds"] for r in sel["rows"]}
    for p in ("probe", "logme", "steps"):
        score = {k: v for k in keys if (v := rows[k]["estimates"][p]["value"]) is not None}
        if not score:
            out[p] = None
            continue
        bases = sorted({k[0] for k in score})
        base_score = {b: max(score[k] for k in score if k[0] == b) for b in bases}
        hit, regret = pick(score, {k: acc[k] for k in score})
        base_hit, base_regret = pick(base_score, {b: base_truth[b] for b in bases})
        if p == "steps":
            cost = sum(rows[k]["estimates"][p]["seconds"] or 0 for k in keys)
        else:  # the features and the fit once per base
            cost = sum(features.values()) + sum({r["features_group"]: r["estimates"][p]["seconds"] or 0 for r in sel["rows"]}.values())
        out[p] = {"tau": kendall_tau_b(list(score.values()), [acc[k] for k in score]), "top1": hit, "regret": regret,
                  "base_top1": base_hit, "base_regret": base_regret, "seconds": cost, "failed": len(keys) - len(score)}
    return out


def load_setting(folder: Path) -> tuple[dict | None, dict]:
    """-> (the select report or None, {(base, method): truth}), a truth averaged over the seeds every item ran with
    (a seed that only some items have, from an unfinished run, is left out so that no item's truth has more seeds than
    another's): `accuracy` that mean, `seeds` {seed: accuracy} of those seeds, `process_wall_s` the wall time of its run
    at SEED, timed in the same pass as the select run (the cost a proxy replaces is one run per item)."""
    sel = json.loads((folder / "select.json").read_text()) if (folder / "select.json").exists() else None
    runs: dict[tuple, dict[int, dict]] = {}
    for f in sorted(folder.glob("truth-*.json")):
        t = json.loads(f.read_text())
        runs.setdefault((t["base"], t["method"]), {})[t.get("seed", SEED)] = t
    common = set.intersection(*(set(v) for v in runs.values())) if runs else set()
    if runs and not common:
        print(f"{folder.name}: no training seed that every truth item ran with; left out (rerun with --seeds {SEED})")
        return sel, {}
    truths = {}
    for k, v in runs.items():
        seeds = {s: v[s]["accuracy"] for s in sorted(common)}
        timed = v.get(SEED, v[min(common)])
        truths[k] = {**timed, "accuracy": statistics.fmean(seeds.values()), "seeds": seeds}
    return sel, truths


def seed_agreement(truths: dict) -> tuple[float, float] | None:
    """How well the truth predicts itself: over every pair of seeds that all items ran with, the mean Kendall tau-b of
    the two seeds' rankings and the rate at which both seeds' best items are the same. None with fewer than 2 seeds."""
    common = sorted(next(iter(truths.values()))["seeds"]) if truths else []  # the same seeds for every item (load_setting)
    pairs = [(a, b) for i, a in enumerate(common) for b in common[i + 1:]]
    if not pairs:
        return None
    keys = list(truths)
    taus, tops = [], []
    for a, b in pairs:
        x, y = [truths[k]["seeds"][a] for k in keys], [truths[k]["seeds"][b] for k in keys]
        taus.append(kendall_tau_b(x, y))
        tops.append(pick(dict(zip(keys, x)), dict(zip(keys, y)))[0])
    return statistics.fmean(taus), statistics.fmean(tops)


def fmt(x: float, digits: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def estimate(e: dict, scale: float = 100, digits: int = 2, spread: bool = True) -> str:
    """A proxy's figure (± its uncertainty), or "failed" where `peftlab select` stored none."""
    if e["value"] is None:
        return "failed"
    return fmt(scale * e["value"], digits) + (f" ± {fmt(None if e['std'] is None else scale * e['std'], digits)}" if spread else "")


def verdict(p: str, v: dict, chance: float, base_chance: float) -> str:
    """The rule stated in the report: a proxy predicts the ranking when its mean tau-b over the settings is above 0 by
    more than twice its standard error and its top-1 rate beats a random pick; for bases, its rate of naming the base
    whose best method wins is set against a random pick among the bases."""
    taus = [t for t in v["tau"] if not math.isnan(t)]
    base = f"names the best base in {statistics.fmean(v['base_top1']):.0%} of settings (a random pick: {base_chance:.0%})"
    if len(taus) < 2:
        return f"{p}: too few settings with a defined tau-b to judge the ranking; it {base}"
    mean, se, rate = statistics.fmean(taus), statistics.stdev(taus) / math.sqrt(len(taus)), statistics.fmean(v["top1"])
    ok = mean > 2 * se and rate > chance
    return (f"{p}: mean tau-b {mean:+.2f} (s.e. {se:.2f}) over {len(taus)} settings, top-1 {rate:.0%} (a random pick: {chance:.0%}): "
            + ("it predicts the ranking of base x method" if ok else "it does NOT predict the ranking of base x method (by this rule)")
            + f"; it {base}")


def report(root: Path, name: str) -> str:
    lines = ["| setting | item | truth acc | probe | LogME | steps acc | truth run s |", "|---|---|---|---|---|---|---|"]
    summary = ["| setting | items | proxy | Kendall tau-b | top-1 | regret (pts) | base top-1 | base regret (pts) | proxy s | truth s | cost |",
               "|---|---|---|---|---|---|---|---|---|---|---|"]
    per_proxy: dict[str, dict[str, list]] = {p: {"tau": [], "top1": [], "base_top1": [], "regret": [], "cost": []}
                                             for p in ("probe", "logme", "steps")}
    frozen_pairs, chances, done, walls, itself, failed = [], [], [], [], [], 0
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        sel, truths = load_setting(folder)
        if sel is None or not truths:
            continue
        setting = folder.name
        for r in sel["rows"]:
            t = truths.get((r["base"], r["method"]))
            e = r["estimates"]
            each = f" ({' / '.join(fmt(100 * a) for _, a in sorted(t['seeds'].items()))})" if t and len(t["seeds"]) > 1 else ""
            lines.append(f"| {setting} | {r['label']} {r['method']} | {fmt(100 * t['accuracy']) + each if t else '-'} | "
                         f"{estimate(e['probe'])} | {estimate(e['logme'], 1, 3, False)} | "
                         f"{estimate(e['steps'])} | {fmt(t['process_wall_s'], 0) if t else '-'} |")
            if t and r["method"] == "frozen" and e["probe"]["value"] is not None:
                frozen_pairs.append((e["probe"]["value"], t["accuracy"]))
        ev = evaluate_setting(sel, truths)
        agree = seed_agreement(truths)
        if agree:
            seeds = sorted(next(iter(truths.values()))["seeds"])
            itself.append((f"| {setting} | {', '.join(map(str, seeds))} | {fmt(agree[0])} | {fmt(agree[1])} |", agree[0]))
        chances.append((1 / ev["items"], 1 / len({k[0] for k in truths})))
        done.append(setting)
        walls.append((ev["select_s"], ev["truth_s"]))
        for p in ("probe", "logme", "steps"):
            x = ev[p]
            if x is None:
                summary.append(f"| {setting} | {ev['items']} | {p} | every figure failed in `peftlab select` |" + " |" * 7)
                failed += ev["items"]
                continue
            items_cell = f"{ev['items'] - x['failed']} of {ev['items']} ({x['failed']} failed, left out)" if x["failed"] else ev["items"]
            failed += x["failed"]
            summary.append(f"| {setting} | {items_cell} | {p} | {fmt(x['tau'])} | {fmt(x['top1'])} | {fmt(x['regret'], 1)} | "
                           f"{fmt(x['base_top1'])} | {fmt(x['base_regret'], 1)} | {x['seconds']:.0f} | {ev['truth_s']:.0f} | "
                           f"{100 * x['seconds'] / ev['truth_s']:.1f}% |")
            for key in ("tau", "top1", "base_top1", "regret"):
                per_proxy[p][key].append(x[key])
            per_proxy[p]["cost"].append(x["seconds"] / ev["truth_s"])
    if not done:
        return "no setting has both its truth runs and its select run yet"
    overall = ["| proxy | settings | mean tau-b | top-1 rate | base top-1 rate | mean regret (pts) | cost / truth runs |",
               "|---|---|---|---|---|---|---|"]
    for p, v in list(per_proxy.items()):
        if not v["top1"]:
            overall.append(f"| {p} | 0 | every figure failed in `peftlab select` |" + " |" * 4)
            del per_proxy[p]
            continue
        taus = [t for t in v["tau"] if not math.isnan(t)]
        overall.append(f"| {p} | {len(v['tau'])} | {fmt(statistics.fmean(taus)) if taus else 'n/a'} | {statistics.fmean(v['top1']):.0%} | "
                       f"{statistics.fmean(v['base_top1']):.0%} | {statistics.fmean(v['regret']):.1f} | {100 * statistics.fmean(v['cost']):.1f}% |")
    chance, base_chance = (statistics.fmean(c) for c in zip(*chances))
    notes = [verdict(p, v, chance, base_chance) for p, v in per_proxy.items()]
    if failed:
        notes.append(f"{failed} proxy figure(s) failed in `peftlab select` (a candidate that did not load or train): 'failed' in the table of "
                     "every item, and left out of that proxy's tau-b, top-1 and regret in its setting ('items' counts those kept).")
    if itself:
        taus = [tau for _, tau in itself if not math.isnan(tau)]
        notes.append(f"the truth against itself (its training seeds, same rows): mean tau-b {fmt(statistics.fmean(taus)) if taus else 'n/a'} "
                     f"over {len(itself)} settings; a proxy cannot be expected to agree with the truth better than that. The truth "
                     "the proxies are scored against is the mean over the seeds.")
    else:
        notes.append("the truth ran with one training seed: how far it agrees with itself is not measured (--seeds 42,1 does it).")
    sel_s, truth_s = (sum(w) for w in zip(*walls))
    notes.append(f"the whole `peftlab select` process (all three proxies, model loads included) took {sel_s:.0f} s against "
                 f"{truth_s:.0f} s for the truth runs it replaces ({100 * sel_s / truth_s:.1f}%); probe and LogME alone: the 'cost' column.")
    notes.append("probe and LogME give every method of one base the same figure (they read the frozen base), so at the item "
                 "level they can at best order bases; 'base' columns judge them where they apply.")
    if len(frozen_pairs) >= 3:
        xs, ys = zip(*frozen_pairs)
        r = statistics.correlation(xs, ys) if len(set(xs)) > 1 and len(set(ys)) > 1 else float("nan")
        notes.append(f"probe vs the frozen-backbone truth run (the same model, trained by SGD): Pearson r {fmt(r)} over "
                     f"{len(frozen_pairs)} setting x base pairs.")
    text = "\n".join([f"## {name}: {len(done)} settings ({', '.join(done)})", "", "### Per proxy, over the settings", "", *overall, "",
                      *(f"- {n}" for n in notes), "", "### Per setting", "", *summary, "",
                      *(["### The truth against itself: two training seeds' rankings", "",
                         "| setting | seeds | Kendall tau-b | top-1 agree |", "|---|---|---|---|", *(row for row, _ in itself), ""] if itself else []),
                      "### Every item", "", *lines]) + "\n"
    return text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="", help=f"comma-separated settings (default: none; all: {','.join(SETTINGS)})")
    p.add_argument("--bases", default=",".join(BASES), help="candidate bases (default: minilm,smollm2)")
    p.add_argument("--stage", default="all", choices=("truth", "select", "all"))
    p.add_argument("--seeds", default=str(SEED), help=f"training seeds of the truth runs, over the same rows (default {SEED}; "
                   f"e.g. {SEED},1: the truth is the mean, and the seeds' agreement is reported)")
    p.add_argument("--list", action="store_true")
    p.add_argument("--report", action="store_true", help="write RESULTS/model_selection.md from the finished settings")
    p.add_argument("--quick", action="store_true", help=f"tiny budgets ({QUICK}): checks the pipeline in minutes")
    p.add_argument("--fresh", action="store_true", help="measure finished runs again")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args()
    args.seeds = ints_arg(p, "--seeds", args.seeds, f"{SEED},1")
    b, name = (QUICK, "model_selection-quick") if args.quick else (FULL, "model_selection")
    root = RESULTS / name
    bases = [x for x in args.bases.split(",") if x]
    cases = list(SETTINGS) if args.cases == "all" else [c for c in args.cases.split(",") if c]
    if args.list:
        for s, data in SETTINGS.items():
            print(f"{s:<18} {json.dumps(data)}")
        print(f"items: {[item_name(*i) for i in items(list(BASES))]}; budget: {b}")
        return 0
    bad = [c for c in cases if c not in SETTINGS] + [x for x in bases if x not in BASES]
    if bad:
        p.error(f"unknown setting(s) or base(s) {bad}; --list shows them")
    if not bases:
        p.error(f"--bases {args.bases!r}: give at least one of {', '.join(BASES)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    recipes = {setting: write_recipe(root / setting, setting, b) for setting in cases}
    if odd := [x for setting in cases for x in stale(root / setting, recipes[setting], bases, b, args)]:
        raise SystemExit("stored with other settings than this command asks for (a rerun keeps a stored run as it is):\n  "
                         + "\n  ".join(odd) + "\nMeasure them again with --fresh (it replaces the stored ones; with --stage select "
                         "only select.json), or rerun with the settings they were made with.")
    failed = []
    for setting in cases:
        folder, recipe_path = root / setting, recipes[setting]
        try:
            if args.stage in ("truth", "all"):
                truth(setting, folder, recipe_path, bases, args)
            if args.stage in ("select", "all"):
                proxies(setting, folder, recipe_path, bases, b, args)
        except (RuntimeError, RunFailed) as e:  # a failed truth run or select: the other settings still run
            print(e, flush=True)
            failed.append(setting)
    if args.report or cases:
        root.mkdir(parents=True, exist_ok=True)
        text = report(root, name)
        write_result(RESULTS / f"{name}.md", text)
        print(text)
    if failed:
        print(f"failed: {failed}; rerun the same command to retry them (finished runs are kept)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
