"""Domain shift on Amazon reviews (Blitzer et al. 2007; ../shared/data/amazon_mdsd): does continued pretraining on
unlabelled text of the target domain help a classifier trained on another domain's labels?

For every source -> target pair of books, dvd, electronics, kitchen (12), MiniLM + LoRA (recipes/minilm/
amazon-sentiment-lora.yaml) is trained on the source's 2,000 labelled reviews (selection on 10% of them) and tested on
the target's 2,000 labelled reviews:
  (a) source only       the packaged MiniLM
  (b) DAPT              from a masked-LM run on the target's unlabelled reviews (recipes/minilm/amazon-dapt-mlm.yaml),
                        one per target, shared by its three sources
  (c) TAPT-style        from a masked-LM run on the source's + the target's unlabelled reviews (one per domain pair,
                        serving both directions), with the same number of steps as (b)
  (d) in-domain         trained on the target's own labels, K-fold cross-validated (every target row scored by the fold
                        that did not train on it): the reference that (b) and (c) try to approach
Every run is one `peftlab train` process (benchmarks/common.py), kept under runs/da/ and its result under
benchmarks/results/domain_adaptation/; rerunning skips what is finished (--fresh to redo). The labels of the
unlabelled pool are never read.

  python benchmarks/domain_adaptation.py --pairs books:kitchen,kitchen:books --seeds 0   # a subset
  python benchmarks/domain_adaptation.py --seeds 0,1,2                                     # everything (hours on 2 cores)
  python benchmarks/domain_adaptation.py --report                                          # the tables, from what is done
Results: benchmarks/results/domain_adaptation.md (+ one JSON per run in benchmarks/results/domain_adaptation/).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import REPO, RESULTS, stored_case  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "amazon_mdsd"
DOMAINS = ("books", "dvd", "electronics", "kitchen")
PRETRAIN, FINETUNE = "recipes/minilm/amazon-dapt-mlm.yaml", "recipes/minilm/amazon-sentiment-lora.yaml"
RUNS, OUT = REPO / "runs" / "da", RESULTS / "domain_adaptation"
CONDITIONS = ("source", "dapt", "tapt", "indomain")


def labelled(domain: str) -> str:
    return str(DATA / "labelled" / f"{domain}.jsonl")


def unlabelled(domain: str) -> str:
    return str(DATA / "unlabelled" / f"{domain}.jsonl")


def derived(name: str, rows: list[str]) -> str:
    """A data file made from the shared ones (a union or a fold), under runs/da/data; written once."""
    path = RUNS / "data" / f"{name}.jsonl"
    if not path.exists():
        from peftlab.export import atomic_write_text

        atomic_write_text(path, "".join(rows))
    return str(path)


def lines(path: str) -> list[str]:
    return Path(path).read_text().splitlines(keepends=True)


def folds(domain: str, k: int, fold: int) -> tuple[str, str]:
    """(train file, test file) of fold `fold` of k: a seeded shuffle of the domain's labelled rows cut in k parts."""
    rows = lines(labelled(domain))
    random.Random(13).shuffle(rows)
    test = rows[fold::k]
    train = [r for i, r in enumerate(rows) if i % k != fold]
    return derived(f"{domain}-fold{fold}of{k}-train", train), derived(f"{domain}-fold{fold}of{k}-test", test)


def case(name: str, recipe: str, overrides: list[str], fresh: bool, verbose: bool) -> dict:
    """One training process, or its stored result."""
    return stored_case(name, recipe, overrides, runs=RUNS, results=OUT, prefix="da", fresh=fresh, verbose=verbose)


def pretrain(kind: str, source: str, target: str, seed: int, args) -> Path:
    if kind == "dapt":
        name, train = f"mlm-{target}-s{seed}", unlabelled(target)
    else:  # the union is the same both ways: one run serves source -> target and target -> source
        a, b = sorted((source, target))
        name = f"mlm-{a}+{b}-s{seed}"
        train = derived(f"unlabelled-{a}+{b}", lines(unlabelled(a)) + lines(unlabelled(b)))
    case(name, PRETRAIN, [f"data.train.path={train}", f"train.seed={seed}", *args.pretrain], args.fresh, args.verbose)
    return RUNS / name


def finetune(name: str, train: str, test: str, seed: int, args, start: Path | None = None) -> dict:
    extra = [f"model.from_run={start}"] if start else []
    return case(name, FINETUNE, [f"data.train.path={train}", f"data.test.path={test}", f"train.seed={seed}", *extra,
                                 *args.finetune], args.fresh, args.verbose)


def measure(pairs: list[tuple[str, str]], seeds: list[int], conditions: list[str], args) -> None:
    for seed in seeds:
        for target in sorted({t for _, t in pairs}):
            if "indomain" in conditions:
                for fold in range(args.folds):
                    train, test = folds(target, args.folds, fold)
                    finetune(f"indomain-{target}-fold{fold}of{args.folds}-s{seed}", train, test, seed, args)
        for source, target in pairs:
            if "source" in conditions:
                finetune(f"source-{source}-{target}-s{seed}", labelled(source), labelled(target), seed, args)
            for kind in ("dapt", "tapt"):
                if kind in conditions:
                    start = pretrain(kind, source, target, seed, args)
                    finetune(f"{kind}-{source}-{target}-s{seed}", labelled(source), labelled(target), seed, args, start)


# ------------------------------------------------------------------------------------------------ report

def stored(name: str) -> dict | None:
    f = OUT / f"{name}.json"
    return json.loads(f.read_text()) if f.exists() else None


def accuracy(source: str, target: str, condition: str, seed: int, k: int) -> float | None:
    if condition == "indomain":  # the folds' test rows together are every target row once
        parts = [stored(f"indomain-{target}-fold{f}of{k}-s{seed}") for f in range(k)]
        if any(p is None for p in parts):
            return None
        n = [p["run"]["metrics"]["test"] for p in parts]
        sizes = [len(lines(folds(target, k, f)[1])) for f in range(k)]
        return sum(m["accuracy"] * s for m, s in zip(n, sizes)) / sum(sizes)
    r = stored(f"{condition}-{source}-{target}-s{seed}")
    return r["run"]["metrics"]["test"]["accuracy"] if r else None


def cost(name: str) -> str:
    r = stored(name)
    return f"{r['run']['steps']} steps, {r['run']['train_wall_s'] / 60:.1f} min" if r else "-"


def report(seeds: list[int], k: int) -> str:
    pairs = [(s, t) for s in DOMAINS for t in DOMAINS if s != t]
    rows = ["| source -> target | (a) source only | (b) DAPT | (c) TAPT-style | (d) in-domain (CV) | (b)-(a) | (c)-(a) | gap closed by (b) | seeds |",
            "|---|---|---|---|---|---|---|---|---|"]
    gains = {"dapt": [], "tapt": []}
    closed = []
    for s, t in pairs:
        acc = {c: [a for seed in seeds if (a := accuracy(s, t, c, seed, k)) is not None] for c in CONDITIONS}
        if not acc["source"]:
            continue
        mean = {c: statistics.mean(v) if v else None for c, v in acc.items()}
        sd = {c: (f" ± {100 * statistics.stdev(v):.1f}" if len(v) > 1 else "") for c, v in acc.items()}
        cell = {c: f"{100 * mean[c]:.2f}{sd[c]}" if mean[c] is not None else "-" for c in CONDITIONS}
        diff = {c: (mean[c] - mean["source"]) if mean[c] is not None else None for c in ("dapt", "tapt")}
        for c in gains:
            if diff[c] is not None:
                gains[c].append(diff[c])
        gap = None
        if diff["dapt"] is not None and mean["indomain"] is not None and mean["indomain"] > mean["source"]:
            gap = diff["dapt"] / (mean["indomain"] - mean["source"])
            closed.append(gap)
        rows.append(f"| {s} -> {t} | {cell['source']} | {cell['dapt']} | {cell['tapt']} | {cell['indomain']} | "
                    + " | ".join(f"{100 * diff[c]:+.2f}" if diff[c] is not None else "-" for c in ("dapt", "tapt"))
                    + f" | {'-' if gap is None else f'{100 * gap:.0f}%'} | {len(acc['source'])} |")
    summary = [f"- mean gain over (a), {len(v)} pair(s): {c.upper()} {100 * statistics.mean(v):+.2f} points"
               for c, v in gains.items() if v]
    if closed:
        summary.append(f"- share of the in-domain gap closed by DAPT: median {100 * statistics.median(closed):.0f}% over "
                       f"{len(closed)} pair(s)")
    costs = ["| stage | example | cost |", "|---|---|---|"]
    s0 = seeds[0]
    for label, name in (("DAPT (MLM, target unlabelled)", f"mlm-kitchen-s{s0}"), ("TAPT-style (source + target unlabelled)",
                        f"mlm-books+kitchen-s{s0}"), ("fine-tuning (a)", f"source-books-kitchen-s{s0}"),
                        ("fine-tuning (b)", f"dapt-books-kitchen-s{s0}"), ("in-domain, one fold", f"indomain-kitchen-fold0of{k}-s{s0}")):
        costs.append(f"| {label} | {name} | {cost(name)} |")
    return "\n".join(rows + [""] + summary + ["", "Cost of each stage (wall time on this machine, shared CPU):", ""] + costs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", default="all", help="source:target,... (default: all 12)")
    p.add_argument("--conditions", default=",".join(CONDITIONS), help=f"a subset of {','.join(CONDITIONS)}")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds")
    p.add_argument("--folds", type=int, default=5, help="K of the in-domain cross-validation")
    p.add_argument("--pretrain", nargs="*", default=[], help="extra overrides of every pretraining run (e.g. train.max_steps=50)")
    p.add_argument("--finetune", nargs="*", default=[], help="extra overrides of every fine-tuning run")
    p.add_argument("--report", action="store_true", help="write benchmarks/results/domain_adaptation.md")
    p.add_argument("--tag", default="", help="keep these runs and results apart (e.g. a smoke run with fewer steps)")
    p.add_argument("--fresh", action="store_true")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args()
    global RUNS, OUT
    if args.tag:
        RUNS, OUT = RUNS.with_name(f"da-{args.tag}"), OUT.with_name(f"domain_adaptation-{args.tag}")
    seeds = [int(s) for s in args.seeds.split(",")]
    pairs = [(s, t) for s in DOMAINS for t in DOMAINS if s != t] if args.pairs == "all" else \
        [tuple(x.split(":")) for x in args.pairs.split(",")]
    bad = [x for pair in pairs for x in pair if x not in DOMAINS] + [c for c in args.conditions.split(",") if c not in CONDITIONS]
    if bad:
        p.error(f"unknown domain(s)/condition(s) {bad}: domains {DOMAINS}, conditions {CONDITIONS}")
    if not args.report:
        measure(pairs, seeds, args.conditions.split(","), args)
    text = report(seeds, args.folds)
    OUT.with_suffix(".md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
