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
The report (also written after measuring) is built from every stored seed, whatever --seeds says; a run made with
other --finetune/--pretrain overrides than most stored ones is named under the table and left out of it.
Results: benchmarks/results/domain_adaptation.md (+ one JSON per run in benchmarks/results/domain_adaptation/).
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import math
import random
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import REPO, RESULTS, check_counts, ints_arg, save_figure, stored_case, write_result  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "amazon_mdsd"
DOMAINS = ("books", "dvd", "electronics", "kitchen")
PRETRAIN, FINETUNE = "recipes/minilm/amazon-dapt-mlm.yaml", "recipes/minilm/amazon-sentiment-lora.yaml"
RUNS, OUT = REPO / "runs" / "da", RESULTS / "domain_adaptation"
CONDITIONS = ("source", "dapt", "tapt", "indomain")
LABELS = {"source": "(a) source only", "dapt": "(b) DAPT", "tapt": "(c) TAPT-style", "indomain": "(d) in-domain (CV)"}


def labelled(domain: str) -> str:
    return str(DATA / "labelled" / f"{domain}.jsonl")


def unlabelled(domain: str) -> str:
    return str(DATA / "unlabelled" / f"{domain}.jsonl")


def derived(name: str, rows: list[str]) -> str:
    """A data file made from the shared ones (a union or a fold), under runs/da/data; written once."""
    path = RUNS / "data" / f"{name}.jsonl"
    if not path.exists():
        from peftlab.rundir import atomic_write_text

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


def accuracy(source: str, target: str, condition: str, seed: int, k: int, skip=frozenset()) -> float | None:
    """A stored test accuracy, or None: not measured, or a run in `skip` (made with other settings)."""
    if condition == "indomain":  # the folds' test rows together are every target row once
        names = [f"indomain-{target}-fold{f}of{k}-s{seed}" for f in range(k)]
        parts = [None if n in skip else stored(n) for n in names]
        if any(p is None for p in parts):
            return None
        n = [p["run"]["metrics"]["test"] for p in parts]
        sizes = [len(lines(folds(target, k, f)[1])) for f in range(k)]
        return sum(m["accuracy"] * s for m, s in zip(n, sizes)) / sum(sizes)
    name = f"{condition}-{source}-{target}-s{seed}"
    r = None if name in skip else stored(name)
    return r["run"]["metrics"]["test"]["accuracy"] if r else None


def other_folds(target: str, k: int) -> list[int]:
    """The K other than `k` of the stored in-domain runs of `target`."""
    return sorted({int(m[1]) for f in OUT.glob(f"indomain-{target}-fold*of*-s*.json") if (m := re.search(r"of(\d+)-s\d+$", f.stem))} - {k})


OWN = ("data.train.path=", "data.test.path=", "train.seed=", "model.from_run=")  # the overrides measure() sets per run


def extra_overrides(r: dict) -> str:
    """The --pretrain or --finetune overrides a stored run was made with: all but those measure() sets per run."""
    return " ".join(o for o in r["overrides"] if not o.startswith(OWN)) or "none"


def other_settings() -> dict[str, str]:
    """Stored fine-tuning runs made with other --finetune overrides than most stored ones (a tie: the lowest seed's), or
    started from a masked-LM run made with other --pretrain overrides than most: name -> what differs. The report
    leaves them out, so that a mean over seeds is the mean of one setting's runs."""
    runs = {f.stem: json.loads(f.read_text()) for f in sorted(OUT.glob("*-s*.json"), key=lambda f: (seed_of(f.stem), f.stem))
            if seed_of(f.stem) is not None}
    extra = {n: extra_overrides(r) for n, r in runs.items()}
    pre = [n for n in runs if n.startswith("mlm-")]
    ref = {kind: collections.Counter(extra[n] for n in names).most_common(1)[0][0]
           for kind, names in (("--pretrain", pre), ("--finetune", [n for n in runs if n not in pre])) if names}
    out = {}
    for n, r in runs.items():
        if n in pre:
            continue
        start = next((Path(o.partition("=")[2]).name for o in r["overrides"] if o.startswith("model.from_run=")), None)
        why = [f"--finetune {extra[n]} (the others: {ref['--finetune']})"] if extra[n] != ref["--finetune"] else []
        if start in runs and extra[start] != ref["--pretrain"]:
            why.append(f"--pretrain {extra[start]} (the others: {ref['--pretrain']})")
        if why:
            out[n] = "; ".join(why)
    return out


STAGES = {  # stage -> which stored runs are its runs (by name), for the cost table
    "DAPT: MLM on the target's unlabelled reviews": lambda n: n.startswith("mlm-") and "+" not in n,
    "TAPT-style: MLM on source + target unlabelled": lambda n: n.startswith("mlm-") and "+" in n,
    "fine-tuning (a), (b) or (c)": lambda n: n.split("-")[0] in ("source", "dapt", "tapt"),
    "in-domain, one fold": lambda n: n.startswith("indomain-"),
}


def stage_costs() -> list[str]:
    """Median train and process wall time of every stored run of a stage: medians, because some runs shared the cores."""
    stored_runs = [json.loads(f.read_text()) for f in sorted(OUT.glob("*.json"))]
    rows = ["| stage | runs | steps | train wall, median (range) | process wall, median |", "|---|---|---|---|---|"]
    for label, belongs in STAGES.items():
        found = [r for r in stored_runs if belongs(r["name"])]
        if found:
            train = [r["run"]["train_wall_s"] / 60 for r in found]
            steps = sorted({r["run"]["steps"] for r in found})
            rows.append(f"| {label} | {len(found)} | {steps[0]}{f'-{steps[-1]}' if len(steps) > 1 else ''} | "
                        f"{statistics.median(train):.1f} min ({min(train):.1f}-{max(train):.1f}) | "
                        f"{statistics.median(r['process_wall_s'] for r in found) / 60:.1f} min |")
    return rows


@functools.cache
def top_words(domain: str, n: int = 10_000) -> frozenset[str]:
    """The n most frequent word types (lowercased, stopwords kept) of a domain's unlabelled reviews."""
    counts = collections.Counter()
    for line in lines(unlabelled(domain)):
        counts.update(re.findall(r"[a-z']+", json.loads(line)["text"].lower()))
    return frozenset(w for w, _ in counts.most_common(n))


def vocabulary_overlap(a: str, b: str) -> float:
    """How close two domains are without any model: the share of their top-10k word types they have in common
    (Gururangan et al. 2020, Fig. 2). A measure of the shift that no accuracy, hence no (a) run's noise, enters."""
    x, y = top_words(a), top_words(b)
    return len(x & y) / max(len(x), len(y))


def seed_of(name: str) -> int | None:
    """The seed of a stored run NAME-sSEED, or None."""
    tail = name.rsplit("-s", 1)[-1]
    return int(tail) if "-s" in name and tail.isdigit() else None


def stored_seeds() -> list[int]:
    """Every seed with a stored run (NAME-sSEED.json): the report covers them all, not only the --seeds just measured."""
    return sorted({seed for f in OUT.glob("*-s*.json") if (seed := seed_of(f.stem)) is not None})


def pair_results(seeds: list[int], k: int, skip=frozenset()) -> list[dict]:
    """One dict per pair with a source-only result: accuracies by condition and seed, and the paired gains of (b), (c);
    the runs in `skip` left out."""
    out = []
    for s, t in [(s, t) for s in DOMAINS for t in DOMAINS if s != t]:
        acc = {c: {seed: a for seed in seeds if (a := accuracy(s, t, c, seed, k, skip)) is not None} for c in CONDITIONS}
        if not acc["source"]:
            continue
        # a gain compares the same seeds: (b) seed 1 against (a) seed 1
        paired = {c: [acc[c][x] - acc["source"][x] for x in acc[c] if x in acc["source"]] for c in ("dapt", "tapt")}
        mean = {c: statistics.mean(v.values()) if v else None for c, v in acc.items()}
        gap = mean["indomain"] - mean["source"] if mean["indomain"] is not None else None
        gain = {c: statistics.mean(v) if v else None for c, v in paired.items()}
        # the share of the in-domain gap a gain closes; none for a gap under a point (noise over noise)
        closed = {c: g / gap if g is not None and gap is not None and gap >= 0.01 else None for c, g in gain.items()}
        out.append({"source": s, "target": t, "acc": acc, "mean": mean, "paired": paired, "gap": gap, "gain": gain,
                    "closed": closed, "overlap": vocabulary_overlap(s, t)})
    return out


def mean_se(values: list[float]) -> str:
    m = 100 * statistics.mean(values)
    return f"{m:+.2f}" + (f" (s.e. {100 * statistics.stdev(values) / len(values) ** 0.5:.2f})" if len(values) > 1 else "")


def report(results: list[dict], notes: list[str] = ()) -> str:
    """The tables and summary of results/domain_adaptation.md, from pair_results; `notes` under the table."""
    rows = ["| source -> target | " + " | ".join(LABELS[c] for c in CONDITIONS) + " | (b)-(a) | (c)-(a) | gap (d)-(a) | "
            "closed by (b) | closed by (c) | vocabulary overlap | seeds (a) / (b) / (c) |", "|---" * 12 + "|"]

    def cell(r, c):
        v = list(r["acc"][c].values())
        sd = f" ± {100 * statistics.stdev(v):.1f}" if len(v) > 1 else ""
        return f"{100 * r['mean'][c]:.2f}{sd}" if v else "-"

    def closed(r, c):
        return "-" if r["closed"][c] is None else f"{100 * r['closed'][c]:.0f}%"

    for r in results:
        gap = "-" if r["gap"] is None else f"{100 * r['gap']:.2f}"
        rows.append(f"| {r['source']} -> {r['target']} | " + " | ".join(cell(r, c) for c in CONDITIONS) + " | "
                    + " | ".join(f"{100 * g:+.2f}" if (g := r["gain"][c]) is not None else "-" for c in ("dapt", "tapt"))
                    + f" | {gap} | {closed(r, 'dapt')} | {closed(r, 'tapt')} | {100 * r['overlap']:.0f}% | "
                    + " / ".join(str(len(r["acc"][c])) for c in ("source", "dapt", "tapt")) + " |")
    summary = []
    for c in ("dapt", "tapt"):
        label = LABELS[c]
        gains = [r["gain"][c] for r in results if r["gain"][c] is not None]
        if not gains:
            continue
        each = [g for r in results for g in r["paired"][c]]
        summary.append(f"- {label} - (a): mean {mean_se(gains)} points over {len(gains)} pair(s) (s.e. over pairs); "
                       f"{sum(g > 0 for g in gains)} of {len(gains)} pair means and {sum(g > 0 for g in each)} of "
                       f"{len(each)} paired seeds positive")
        by_target = {t: [r["gain"][c] for r in results if r["target"] == t and r["gain"][c] is not None] for t in DOMAINS}
        summary.append("  - by target: " + ", ".join(f"into {t} {100 * statistics.mean(v):+.2f} ({len(v)})"
                                                     for t, v in by_target.items() if v))
        shares = [r["closed"][c] for r in results if r["closed"][c] is not None]
        if shares:
            summary.append(f"  - median share of the in-domain gap closed: {100 * statistics.median(shares):.0f}% over the "
                           f"{len(shares)} pairs with a gap of a point or more")
        near = [(r["overlap"], r["gain"][c]) for r in results if r["gain"][c] is not None]
        if len(near) >= 3 and len({o for o, _ in near}) > 1 and len({g for _, g in near}) > 1:
            summary.append(f"  - against the distance between the domains: Pearson r {statistics.correlation(*zip(*near)):+.2f} "
                           f"between the gain and the vocabulary overlap over {len(near)} pairs (negative: larger gains "
                           "for more distant domains)")
    rows += [""] + [f"- {n}" for n in notes] if notes else []
    return "\n".join(rows + [""] + summary + ["", "Cost of each stage (medians over the stored runs; some shared the cores):", ""]
                     + stage_costs())


def plot(results: list[dict], seeds: list[int], path: Path) -> None:
    """Left: accuracy of (a)-(d) per pair. Right: each pair's gain from (b) and (c) against the domains' vocabulary
    overlap (left on the axis = more distant)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    width, drawn = 0.2, []
    for i, c in enumerate(CONDITIONS):
        bars = [(j + i * width, 100 * r["mean"][c]) for j, r in enumerate(results) if r["mean"][c] is not None]  # none: no bar
        left.bar([x for x, _ in bars], [v for _, v in bars], width, label=LABELS[c])
        drawn += [v for _, v in bars]
    left.set_xticks([j + 1.5 * width for j in range(len(results))], [f"{r['source'][:4]}>{r['target'][:4]}" for r in results],
                    fontsize=8)
    if drawn:  # the bars' range and a margin, in steps of 5 points
        left.set_ylim(max(0, 5 * math.floor(min(drawn) / 5 - 0.5)), min(100, 5 * math.ceil(max(drawn) / 5 + 0.5)))
    left.set_ylabel("target test accuracy (%)")
    left.legend(fontsize=8, ncol=4)
    for c, marker in (("dapt", "o"), ("tapt", "x")):
        pts = [(100 * r["overlap"], 100 * r["gain"][c]) for r in results if r["gain"][c] is not None]
        if pts:
            right.scatter(*zip(*pts), marker=marker, label=f"{LABELS[c]} - (a)")
    right.axhline(0, color="grey", lw=0.8)
    right.set_xlabel("vocabulary overlap of source and target (top-10k words, %)")
    right.set_ylabel("gain over (a), points")
    right.legend(fontsize=8)
    fig.suptitle(f"Amazon domain shift, MiniLM + LoRA: seeds {','.join(map(str, seeds))} (means)")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", default="all", help="source:target,... (default: all 12)")
    p.add_argument("--conditions", default=",".join(CONDITIONS), help=f"a subset of {','.join(CONDITIONS)}")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds to measure (the report: every stored seed)")
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
    seeds = ints_arg(p, "--seeds", args.seeds, "0,1,2")
    pairs = [(s, t) for s in DOMAINS for t in DOMAINS if s != t] if args.pairs == "all" else \
        [tuple(x.split(":")) for x in args.pairs.split(",")]
    if odd := [":".join(pair) for pair in pairs if len(pair) != 2 or pair[0] == pair[1]]:
        p.error(f"--pairs {','.join(odd)}: each pair is SOURCE:TARGET, two different domains of {', '.join(DOMAINS)}")
    bad = [x for pair in pairs for x in pair if x not in DOMAINS] + [c for c in args.conditions.split(",") if c not in CONDITIONS]
    if bad:
        p.error(f"unknown domain(s)/condition(s) {bad}: domains {DOMAINS}, conditions {CONDITIONS}")
    check_counts(p, [("--folds", args.folds, "at least 2 (each fold is scored by a model trained on the others)")], least=2)
    if not args.report:
        measure(pairs, seeds, args.conditions.split(","), args)
    seeds = stored_seeds()  # the report: every stored seed (a slice measured with --seeds 1 does not drop seeds 0 and 2)
    odd = other_settings()
    results = pair_results(seeds, args.folds, set(odd))  # every stored run read once, for the tables and the plot
    by_reason = collections.defaultdict(list)
    for name, why in odd.items():
        by_reason[why].append(name)
    missing = sorted({r["target"] for r in results if not r["acc"]["indomain"]})  # (d) of another K only: said, not a bare '-'
    notes = [f"(d) in-domain: none stored with --folds {args.folds} for {t} (stored: --folds {', '.join(map(str, ks))})"
             for t in missing if (ks := other_folds(t, args.folds))]
    notes += [f"left out (made with other settings than the other stored runs; measure them again with these, or keep them apart "
              f"with --tag): {', '.join(names)}: {why}" for why, names in by_reason.items()]
    text = report(results, notes)
    write_result(OUT.with_suffix(".md"), text + "\n")
    plot(results, seeds, OUT.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
