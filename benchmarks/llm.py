"""SmolLM2-135M-Instruct through peftlab (issue 18): zero-shot vs LoRA vs QLoRA, head vs verbalizer, SFT, packing;
peak memory with activation checkpointing and a bf16 base (issue 21: the memory-* cases).

    python benchmarks/llm.py --cases samsum-zero-shot,samsum-lora      # run some cases (finished ones are skipped)
    python benchmarks/llm.py --list                                     # the cases and their overrides
    python benchmarks/llm.py --report                                   # tables + plot from the finished cases
    python benchmarks/llm.py --cases memory-lora-lean-eval8 --allocator jemalloc   # the same case under jemalloc
    python benchmarks/llm.py --cases memory-lora-lean-eval8 --tag fp32-host-always --set train.release_memory=always

Every case is one `peftlab train` process on a shipped recipe under recipes/smollm2-135m/ plus the overrides listed in
CASES (nothing else differs), its peak RSS read from wait4, its run folder runs/llm/<case>. Each finished case is
written to benchmarks/results/llm/<case>.json (its run.json + RSS + wall time) before the next starts, so an
interrupted invocation loses at most the case that was running; `--fresh` measures a case again (the old file is
replaced only when the new run has finished). Its generated test rows are kept beside it
(<case>.predictions-test.jsonl) for the report's per-row comparisons, since run folders are not kept. The report adds
Lead-3 on the same SAMSum test rows and the stored MiniLM BERT2BERT figures
(benchmarks/results/summarization-full-selfinit.json, 200 test rows) next to SmolLM2 on those same 200 rows.
Selection: every recipe keeps its best step on a validation split or a train holdout, never on the test split.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmarks.common, and this checkout's peftlab
from benchmarks.common import REPO, RESULTS, stored_case  # noqa: E402

RUNS, OUT = REPO / "runs" / "llm", RESULTS / "llm"
R = "recipes/smollm2-135m/"
ZERO = ["train.max_steps=0"]
SHORT = ["train.max_steps=150", "train.eval_every=75", "train.save_every=75"]  # classification: 150 steps x 16 rows
SPEED = ["data.train.max_samples=256", "train.max_steps=null", "train.epochs=1", "data.eval.max_samples=64", "data.test=null",
         "train.eval_every=null", "train.save_every=null", "train.log_every=5"]  # the same 256 SAMSum dialogues, once
# memory: 10 steps of 8 rows x <= 384 tokens (issue 21's shape), then the loss on 64 validation rows and 64 test rows
# generated (batch 32): the whole process, evaluation included; LEAN = the frozen base in bf16 + activation checkpointing
MEMORY = ["data.train.max_samples=200", "train.max_steps=10", "train.batch_size=8", "train.grad_accum=1", "data.max_length=384",
          "data.eval.max_samples=64", "data.test.max_samples=64", "train.eval_every=null", "train.save_every=null", "train.log_every=5"]
LEAN = ["model.dtype=auto", "train.gradient_checkpointing=true"]
CASES: dict[str, tuple[str, list[str]]] = {
    # SAMSum summarization as chat SFT; test = all 819 rows, generated greedily
    "samsum-zero-shot": (R + "samsum-sft-lora.yaml", [*ZERO, "data.eval=null"]),
    "samsum-lora": (R + "samsum-sft-lora.yaml", []),
    "samsum-qlora": (R + "samsum-sft-qlora.yaml", []),
    # the same recipe for 400 steps (~7,400 dialogues, half an epoch; fixed before the run, for time)
    "samsum-lora-400": (R + "samsum-sft-lora.yaml", ["train.max_steps=400", "train.eval_every=100", "train.save_every=100"]),
    # classification: zero-shot verbalizer, LoRA verbalizer, LoRA + sequence-classification head
    "sst2-zero-shot": (R + "sst2-verbalizer-lora.yaml", ZERO),
    "sst2-verbalizer": (R + "sst2-verbalizer-lora.yaml", SHORT),
    "emotion-zero-shot": (R + "emotion-verbalizer-lora.yaml", ZERO),
    "emotion-verbalizer": (R + "emotion-verbalizer-lora.yaml", SHORT),
    "emotion-head": (R + "emotion-head-lora.yaml", SHORT),
    "emotion-verbalizer-epoch": (R + "emotion-verbalizer-lora.yaml", []),  # the recipe as shipped: one epoch, 1,000 steps
    "sst2-head": (R + "sst2-head-lora.yaml", SHORT),
    # GSM8K: answer accuracy after '####' (a seeded 250-row subset of test: generation of 256 tokens is the cost)
    "gsm8k-zero-shot": (R + "gsm8k-sft-lora.yaml", [*ZERO, "data.eval_holdout=0", "data.test.max_samples=250"]),
    "gsm8k-sft": (R + "gsm8k-sft-lora.yaml", ["data.test.max_samples=250"]),
    # speed and memory: the same 256 dialogues (same real tokens) with LoRA and QLoRA packed, and LoRA padded
    "speed-lora-packed": (R + "samsum-sft-lora.yaml", SPEED),
    "speed-qlora-packed": (R + "samsum-sft-qlora.yaml", SPEED),
    "speed-lora-padded": (R + "samsum-sft-lora.yaml", [*SPEED, "data.packing=false", "train.batch_size=8"]),
    # peak RSS: as shipped (fp32 base), + activation checkpointing, + bf16 base (LEAN), and QLoRA the same way
    "memory-lora": (R + "samsum-sft-lora.yaml", MEMORY),
    "memory-lora-ckpt": (R + "samsum-sft-lora.yaml", [*MEMORY, "train.gradient_checkpointing=true"]),
    "memory-lora-lean": (R + "samsum-sft-lora.yaml", [*MEMORY, *LEAN]),
    "memory-qlora-lean": (R + "samsum-sft-qlora.yaml", [*MEMORY, *LEAN]),
    "memory-lora-lean-eval8": (R + "samsum-sft-lora.yaml", [*MEMORY, *LEAN, "eval.batch_size=8"]),  # evaluation at batch 8
    "memory-qlora-lean-eval8": (R + "samsum-sft-qlora.yaml", [*MEMORY, *LEAN, "eval.batch_size=8"]),
}
# --allocator jemalloc: the case's process runs with jemalloc preloaded (stored as CASE-jemalloc). Decay off: freed
# pages stay for reuse, as glibc keeps them, so no page is faulted in twice; what differs is fragmentation.
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def figure(value) -> str:
    """A stored metric to 4 decimals; '-' where it is null (peftlab writes a NaN or infinite metric as null)."""
    return "-" if value is None else f"{value:.4f}"


def jemalloc_env(path: str | None) -> dict[str, str]:
    """The environment that preloads jemalloc: `path`, else the first libjemalloc.so.2 in this Python's prefix (conda,
    venv) or the system's library folders."""
    found = [Path(path)] if path else [Path(d) / "libjemalloc.so.2" for d in (f"{sys.prefix}/lib", *LIB_DIRS)]
    lib = next((f for f in found if f.is_file()), None)
    if lib is None:
        where = path or ", ".join(str(f.parent) for f in found)
        raise SystemExit(f"--allocator jemalloc: no libjemalloc.so.2 at {where}. Install it (Debian/Ubuntu: apt install "
                         "libjemalloc2; conda: conda install -c conda-forge jemalloc) or give its path with --jemalloc.")
    return {"LD_PRELOAD": str(lib.resolve()), "MALLOC_CONF": JEMALLOC_CONF}


def load(name: str) -> dict | None:
    f = OUT / f"{name}.json"
    return json.loads(f.read_text()) if f.exists() else None


def keep_predictions(name: str) -> None:
    """Copy a finished case's generated test rows next to its result (results/llm/NAME.predictions-test.jsonl), so the
    report's per-row comparisons do not depend on the run folder, which is not kept."""
    src, dest = RUNS / name / "predictions-test.jsonl", OUT / f"{name}.predictions-test.jsonl"
    if src.exists() and (not dest.exists() or src.stat().st_mtime > dest.stat().st_mtime):
        from peftlab.rundir import atomic_write_text

        atomic_write_text(dest, src.read_text(encoding="utf-8"))


def predictions(case: str) -> list[dict] | None:
    """A case's generated test rows: the copy kept with its result, else its run folder; None when neither exists."""
    for f in (OUT / f"{case}.predictions-test.jsonl", RUNS / case / "predictions-test.jsonl"):
        if f.exists():
            return [json.loads(x) for x in f.read_text(encoding="utf-8").splitlines()]
    return None


class NotStored(Exception):
    """A report section needs per-row predictions that were kept neither with the result nor in a run folder."""


def pct(x) -> str:
    return "" if x is None else f"{100 * x:.2f}"


SAMSUM_TEST = REPO.parent / "shared/data/samsum/test.csv"
SYSTEMS = (("samsum-zero-shot", "SmolLM2 zero-shot"), ("samsum-lora", "SmolLM2 + LoRA"),
           ("samsum-lora-400", "SmolLM2 + LoRA, 400 steps"), ("samsum-qlora", "SmolLM2 + QLoRA (4-bit NF4)"))
PAIRED = (("samsum-qlora", "samsum-lora"), ("samsum-lora-400", "samsum-lora"))  # QLoRA vs LoRA at 120 steps; 400 vs 120 steps


def samsum_rows() -> list[str]:
    """All test rows: SmolLM2 zero-shot / LoRA / QLoRA and Lead-3; then the 200 rows the stored MiniLM BERT2BERT run
    was scored on (recipes/minilm/samsum-lora.yaml: test max_samples 200, seed 42), every system rescored on them."""
    import datasets

    from benchmarks.summarization import lead3, paired_difference, score

    test = datasets.load_dataset("csv", data_files=str(SAMSUM_TEST))["train"]
    dialogue = {s.strip(): d for d, s in zip(test["dialogue"], test["summary"])}
    b2b_rows = {s.strip() for s in test.shuffle(seed=42).select(range(200))["summary"]}
    head = ["| system | test rows | ROUGE-1 | ROUGE-2 | ROUGE-L | words | train | peak RSS (MiB) |", "|---|---|---|---|---|---|---|---|"]
    full, subset = list(head), list(head)

    def line(label, m, n, words, train="none", rss=""):
        return f"| {label} | {n} | {pct(m['rouge1'])} | {pct(m['rouge2'])} | {pct(m['rougeL'])} | {words:.1f} | {train} | {rss} |"

    refs, per_row = None, {}
    for case, label in SYSTEMS:
        c = load(case)
        if c is None:
            continue
        run, preds = c["run"], predictions(case)
        if preds is None:
            raise NotStored(case)
        refs = [p["reference"] for p in preds]
        train = f"{run['steps']} steps, {run['train_wall_s'] / 60:.0f} min" if run["steps"] else "none"
        m, scores = score(label, [p["prediction"] for p in preds], refs)
        per_row[case] = {p["row"]: r1 for p, r1 in zip(preds, scores["rouge1"])}
        full.append(line(label, m, len(preds), m["words"], train, f"{c['peak_rss_mib']:.0f}"))
        mine = [p for p in preds if p["reference"].strip() in b2b_rows]
        m, _ = score(label, [p["prediction"] for p in mine], [p["reference"] for p in mine])
        subset.append(line(label, m, len(mine), m["words"], train))
    if refs:
        lead, _ = score("Lead-3", [lead3(dialogue[r.strip()]) for r in refs], refs)
        full.append(line("Lead-3 (first three turns)", lead, len(refs), lead["words"]))
        b2b = json.loads((RESULTS / "summarization-full-selfinit.json").read_text())
        for row in b2b["rows"]:
            subset.append(line(f"{row['system']} (stored run)", row, row["rows"], row["words"],
                               f"{b2b['meta']['steps']} steps, {b2b['meta']['train_wall_s'] / 60:.0f} min" if "MiniLM" in row["system"] else "none"))
    pairs = []
    for a, b in PAIRED:  # the same test rows, per-row ROUGE-1 differences with a paired-bootstrap 95% interval
        if a in per_row and b in per_row and per_row[a].keys() == per_row[b].keys():
            ids = sorted(per_row[a])
            d = paired_difference([per_row[a][r] for r in ids], [per_row[b][r] for r in ids])
            pairs.append(f"- ROUGE-1, {a} - {b} on the same {len(ids)} rows: {100 * d['mean']:+.2f} "
                         f"(95% paired bootstrap {100 * d['ci95'][0]:+.2f} to {100 * d['ci95'][1]:+.2f})")
    return (full + [""] + pairs + ["", "The 200 test rows of the stored MiniLM BERT2BERT run "
                                   "(benchmarks/results/summarization-full-selfinit.json):", ""] + subset)


def classification_rows() -> list[str]:
    out = ["| task | setting | test accuracy | macro-F1 | selected on | train | peak RSS (MiB) |", "|---|---|---|---|---|---|---|"]
    for case in ("sst2-zero-shot", "sst2-verbalizer", "sst2-head", "emotion-zero-shot", "emotion-verbalizer", "emotion-head", "emotion-verbalizer-epoch"):
        c = load(case)
        if c is None:
            continue
        run, m = c["run"], c["run"]["metrics"]["test"]
        train = f"{run['steps']} steps x {run['train_examples'] // max(run['steps'], 1)} rows, {run['train_wall_s'] / 60:.0f} min" \
            if run["steps"] else "none"
        out.append(f"| {case.split('-')[0]} | {case.split('-', 1)[1]} | {pct(m['accuracy'])} | {pct(m['f1'])} | "
                   f"{'-' if not run['steps'] else run.get('selected_on') or '-'} (step {run.get('best_step')}) | {train} | "
                   f"{c['peak_rss_mib']:.0f} |")
    return out


def gsm8k_rows() -> list[str]:
    out = ["| setting | test rows | answer accuracy | wrote '####' | train | peak RSS (MiB) |", "|---|---|---|---|---|---|"]
    for case in ("gsm8k-zero-shot", "gsm8k-sft"):
        c = load(case)
        if c is None:
            continue
        run, m = c["run"], c["run"]["metrics"]["test"]
        train = f"{run['steps']} steps, {run['train_examples']:,} ex, {run['train_wall_s'] / 60:.0f} min" if run["steps"] else "none"
        preds = predictions(case)
        if preds is None:
            raise NotStored(case)
        rows = len(preds)
        out.append(f"| {case.split('-', 1)[1]} | {rows} | {pct(m.get('answer_accuracy'))} | "
                   f"{pct(m.get('answer_format'))} | {train} | {c['peak_rss_mib']:.0f} |")
    return out


def speed_rows() -> list[str]:
    out = ["| case | steps | real tokens/s | padded tokens/s | dialogues/s | train s | eval loss after | peak RSS (MiB) | "
           "speed-up (train s of LoRA packed / this) |", "|---|---|---|---|---|---|---|---|---|"]
    base = load("speed-lora-packed")
    for case in ("speed-lora-packed", "speed-qlora-packed", "speed-lora-padded"):
        c = load(case)
        if c is None:
            continue
        run = c["run"]
        padded = run["train_padded_tokens"] / max(run["train_seconds"], 1e-9)
        ratio = base["run"]["train_seconds"] / run["train_seconds"] if base else float("nan")  # same dialogues: same real tokens
        out.append(f"| {case[6:]} | {run['steps']} | {run['tokens_per_s']:.0f} | {padded:.0f} | {256 / run['train_seconds']:.2f} | "
                   f"{run['train_seconds']:.0f} | {figure(run['metrics']['eval']['loss'])} | {c['peak_rss_mib']:.0f} | {ratio:.2f}x |")
    return out


def memory_rows() -> list[str]:
    out = ["| case | base weights | activation checkpointing | eval batch | allocator | s per step | real tokens/s | "
           "loss after 10 steps (validation) | peak RSS (MiB) | peak RSS / as shipped |", "|---|---|---|---|---|---|---|---|---|---|"]
    base = load("memory-lora")
    for case in [f"{c}{a}" for c in ("memory-lora", "memory-lora-ckpt", "memory-lora-lean", "memory-qlora-lean",
                                      "memory-lora-lean-eval8", "memory-qlora-lean-eval8") for a in ("", "-jemalloc")]:
        c = load(case)
        if c is None:
            continue
        run, over = c["run"], c["overrides"]
        weights = "4-bit NF4" if run["quantization"] != "none" else ("bf16" if "model.dtype=auto" in over else "fp32")
        ckpt = "yes" if "train.gradient_checkpointing=true" in over else "no"
        ratio = c["peak_rss_mib"] / base["peak_rss_mib"] if base else float("nan")
        batch = 8 if "eval.batch_size=8" in over else 32
        allocator = "jemalloc" if "LD_PRELOAD" in c.get("env", {}) else "glibc"
        out.append(f"| {case[7:]} | {weights} | {ckpt} | {batch} | {allocator} | {run['train_seconds'] / run['steps']:.1f} | {run['tokens_per_s']:.0f} | "
                   f"{figure(run['metrics']['eval']['loss'])} | {c['peak_rss_mib']:.0f} | {ratio:.2f}x |")
    return out


CARRIED = "(Carried over from the previous report: the per-row predictions of {case} are not stored, so this section " \
          "cannot be recomputed; `python benchmarks/llm.py --cases {case} --fresh` measures it again and keeps them.)"


def report() -> None:
    """benchmarks/results/llm.md from the stored cases. A section whose per-row predictions are gone (run folders from
    before they were kept with the results) is carried over from the previous report, marked, never dropped."""
    previous = (RESULTS / "llm.md").read_text() if (RESULTS / "llm.md").exists() else ""
    old = {part.split("\n", 1)[0]: part.split("\n", 1)[1].strip() for part in previous.split("### ")[1:]}
    sections = []
    for title, rows in (("SAMSum (all test rows, greedy)", samsum_rows), ("Classification", classification_rows),
                        ("GSM8K", gsm8k_rows), ("Speed and memory (the same 256 SAMSum dialogues, one epoch)", speed_rows),
                        ("Peak memory of LoRA SFT at 8 rows x 384 tokens (10 steps, then 64 rows scored and 64 generated)",
                         memory_rows)):
        try:
            lines = rows()
            body = "\n".join(lines) if len(lines) > 2 else None
        except NotStored as missing:
            kept = old.get(title)
            body = kept if kept is None or "Carried over" in kept else kept + "\n\n" + CARRIED.format(case=missing)
            print(f"[report] {title}: {CARRIED.format(case=missing)}", file=sys.stderr)
        if body:
            sections.append(f"### {title}\n\n{body}")
    text = "\n\n".join(sections)
    from peftlab.rundir import atomic_write_text

    atomic_write_text(RESULTS / "llm.md", text + "\n")
    print(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="", help="comma-separated case names (default: none; see --list)")
    p.add_argument("--list", action="store_true")
    p.add_argument("--report", action="store_true", help="write benchmarks/results/llm.md from the finished cases")
    p.add_argument("--fresh", action="store_true", help="measure finished cases again")
    p.add_argument("--allocator", choices=("glibc", "jemalloc"), default="glibc",
                   help="jemalloc: run the cases with it preloaded, stored as CASE-jemalloc (Linux)")
    p.add_argument("--jemalloc", help="path of libjemalloc.so.2 (default: looked for in this Python's prefix and the system)")
    p.add_argument("--tag", help="store the cases as CASE-TAG (after -jemalloc), e.g. the host they ran on, beside the untagged ones")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="recipe overrides added to each case's (name them in --tag)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args()
    if args.list:
        for name, (recipe, overrides) in CASES.items():
            print(f"{name:<22} {recipe} {' '.join(overrides)}")
        return
    names = [c for c in args.cases.split(",") if c]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {unknown}; --list shows them")
    env, suffix = (jemalloc_env(args.jemalloc), "-jemalloc") if args.allocator == "jemalloc" else (None, "")
    suffix += f"-{args.tag}" if args.tag else ""
    for name in names:
        recipe, overrides = CASES[name]
        stored_case(name + suffix, recipe, [*overrides, *args.set], runs=RUNS, results=OUT, prefix="llm", fresh=args.fresh,
                    verbose=args.verbose, env=env)
        keep_predictions(name + suffix)
    if args.report:
        report()


if __name__ == "__main__":
    main()
