"""Summarization benchmark: the MiniLM BERT2BERT LoRA summarizer vs a Lead-3 baseline on the same SAMSum test rows.

    python benchmarks/summarization.py                        # recipes/minilm/samsum-lora.yaml as shipped (CPU-sized subset)
    python benchmarks/summarization.py --train 14731 --epochs 3 --test 819   # the full train and test splits (GPU advised)
    python benchmarks/summarization.py --quick                # minutes: checks the pipeline (the scores mean nothing)

--quick trains 32 rows for 1 epoch and summarises 16 test rows, unless --train, --epochs or --test say otherwise; the
sizes that ran are recorded in the results' meta.

The model is trained by its own `peftlab train` process from the shipped recipe plus overrides. Lead-3 is the first three
turns of each dialogue, scored by the same ROUGE module (peftlab/metric_modules/rouge.py: rouge_score, Porter stemming,
Lsum over one sentence per line) on exactly the rows the model summarised, read back from the run's
predictions-test.jsonl. Writes benchmarks/results/summarization.json and .md (--quick: summarization-quick.*); an
existing NAME.* is replaced only with --overwrite (--quick's own, always).
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
from benchmarks.common import RESULTS, fill_unset, refuse_replacing, train_process, write_result  # noqa: E402
from peftlab.metrics import ROUGE_KEYS  # noqa: E402

RECIPE = "recipes/minilm/samsum-lora.yaml"
QUICK = {"train": 32, "test": 16, "epochs": 1.0}  # --quick's sizes, where the user gives none
PUBLISHED = "SAMSum paper (Gliwa et al. 2019), full test split: Lead-3 31.4 / 10.0 / 29.9 (ROUGE-1/2/L)"


def train_model(args, out: Path) -> dict:
    overrides = ["name=samsum-b2b-lora", "export.merge=false", "train.save_every=null", "train.eval_every=null"]
    if args.quick:  # (the sizes: main, only where none was given)
        overrides += ["data.eval.max_samples=8", "train.log_every=1", "eval.max_new_tokens=24"]
    overrides.append(f"data.test.max_samples={args.test}")
    if args.train is not None:
        overrides.append(f"data.train.max_samples={args.train}")
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    overrides += args.set
    print(" ".join(overrides), flush=True)
    run, peak_rss, wall = train_process("samsum", RECIPE, overrides, out, verbose=args.verbose)
    return {**run, "process_wall_s": wall, "peak_rss_mib": peak_rss}


def lead3(dialogue: str) -> str:
    """The first three turns of the dialogue (SAMSum's Lead-3 baseline), one per line."""
    return "\n".join([t.strip() for t in dialogue.splitlines() if t.strip()][:3])


def score(name: str, preds: list[str], refs: list[str]) -> tuple[dict, dict]:
    """-> (the system's row: mean ROUGE F-measures, words per summary, share of distinct summaries; per-row scores)."""
    from peftlab.metrics import rouge_metrics

    per_row = rouge_metrics(preds, refs, per_row=True)
    return ({"system": name, "rows": len(refs), **{k: sum(per_row[k]) / len(refs) for k in ROUGE_KEYS},
             "words": sum(len(p.split()) for p in preds) / max(len(preds), 1),
             "distinct": len(set(preds)) / max(len(preds), 1)},  # a model that ignores its input writes one summary for all
            per_row)


def paired_difference(a: list[float], b: list[float], resamples: int = 2000, seed: int = 0) -> dict:
    """Mean of a - b over the same rows, with a 95% paired-bootstrap interval (rows resampled with replacement)."""
    import numpy as np

    d = np.asarray(a) - np.asarray(b)
    means = d[np.random.default_rng(seed).integers(0, len(d), (resamples, len(d)))].mean(axis=1)
    return {"mean": float(d.mean()), "ci95": [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]}


def compare(rows: list[dict], label: str) -> tuple[list[dict], dict]:
    """predictions-test.jsonl rows -> ([model row, Lead-3 row], model - Lead-3 per ROUGE key with its 95% interval)."""
    refs = [r["reference"] for r in rows]
    model, model_rows = score(label, [r["prediction"] for r in rows], refs)
    lead, lead_rows = score("Lead-3 (first 3 turns)", [lead3(r["source"]) for r in rows], refs)
    return [model, lead], {k: paired_difference(model_rows[k], lead_rows[k]) for k in ROUGE_KEYS}


def difference_line(diff: dict) -> str:
    return "Model - Lead-3 on the same rows (paired bootstrap, 95% interval): " + ", ".join(
        f"{k} {100 * d['mean']:+.2f} [{100 * d['ci95'][0]:+.2f}, {100 * d['ci95'][1]:+.2f}]" for k, d in diff.items()) + "."


def table(rows: list[dict]) -> str:
    lines = ["| system | test rows | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-Lsum | words / summary | distinct summaries |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['system']} | {r['rows']} | " + " | ".join(f"{100 * r[k]:.2f}" for k in ROUGE_KEYS)
                     + f" | {r['words']:.1f} | {100 * r['distinct']:.0f}% |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=None, help="train rows (seeded subset); default: the recipe's")
    p.add_argument("--epochs", type=float, default=None, help="default: the recipe's")
    p.add_argument("--test", type=int, default=None, help="SAMSum test rows (seeded subset; 819 = all; default 200, --quick 16)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra recipe override (repeatable)")
    p.add_argument("--name", default=None, help="results file stem (default: summarization, or summarization-quick)")
    p.add_argument("--quick", action="store_true", help="tiny subsets (32 train rows, 1 epoch, 16 test rows, unless given): "
                   "checks the pipeline in minutes")
    p.add_argument("--overwrite", action="store_true", help="replace results/NAME.* if they exist (else refused; --quick's "
                   "own summarization-quick.* are replaced without it)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args()
    # --quick fills only the sizes not given (it overwrote --train/--test/--epochs given with 32/16/1, and recorded neither)
    fill_unset(args, QUICK if args.quick else {"test": 200})
    if args.train is not None and args.train < 1:
        p.error(f"--train {args.train}: give at least 1 row (14731 = all of SAMSum train), or leave it out for the recipe's")
    if args.test < 1:
        p.error(f"--test {args.test}: give at least 1 row (819 = all of SAMSum test)")
    if args.epochs is not None and not 0 < args.epochs < math.inf:
        p.error(f"--epochs {args.epochs:g}: give a positive number of passes (e.g. 1 or 0.5), or leave it out for the recipe's")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    name = args.name or ("summarization-quick" if args.quick else "summarization")
    refuse_replacing(p, [RESULTS / f"{name}.{ext}" for ext in ("json", "md")], args.overwrite or name == "summarization-quick")
    out = RESULTS / "runs" / name
    run = train_model(args, out)
    rows = [json.loads(line) for line in (out / "predictions-test.jsonl").read_text(encoding="utf-8").splitlines()]
    method = {"lora": "LoRA", "full": "full fine-tuning"}.get(run["method"], run["method"])
    results, diff = compare(rows, f"MiniLM BERT2BERT + {method} (peftlab)")
    assert abs(results[0]["rougeL"] - run["metrics"]["test"]["rougeL"]) < 1e-9, "rescored predictions differ from the run's metrics"
    meta = {"recipe": RECIPE, "quick": args.quick, "train_rows": args.train, "test_rows": args.test, "epochs": args.epochs,
            "train_examples": run["train_examples"], "steps": run["steps"],
            "train_wall_s": run["train_wall_s"], "process_wall_s": run["process_wall_s"], "peak_rss_mib": run["peak_rss_mib"],
            "examples_per_s": run["examples_per_s"], "overrides": args.set, "precision": run["precision"],
            "trainable_params": run["trainable_params"], "trainable_percent": run["trainable_percent"],
            "eval_loss": run["metrics"]["test"]["loss"], "hardware": run["hardware"],
            "versions": {k: run["versions"][k] for k in ("torch", "transformers", "peft")}, "published_reference": PUBLISHED}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_result(RESULTS / f"{name}.json", json.dumps({"rows": results, "model_minus_lead3": diff, "meta": meta}, indent=2))
    md = (table(results) + f"\n\n{difference_line(diff)}\n\nModel: {RECIPE}, {meta['train_examples']:,} train examples ({meta['steps']} steps, "
          f"{meta['train_wall_s']:.0f} s, {meta['examples_per_s']:.2f} examples/s, {meta['precision']}), "
          f"{meta['trainable_percent']:.2f}% trainable{' (' + ' '.join(args.set) + ')' if args.set else ''}. "
          f"Same rows, same scorer for both systems. For orientation: {PUBLISHED}.")
    write_result(RESULTS / f"{name}.md", md + "\n")
    print(md)


if __name__ == "__main__":
    main()
