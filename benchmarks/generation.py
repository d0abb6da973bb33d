"""Generation speed: peftlab's evaluation vs `model.generate` called the plain way, on the same rows (issue 21, item 5).

A finished SFT run (default: the SmolLM2 SAMSum LoRA run of `llm.py`, runs/llm/samsum-lora) generates greedy answers
to the same N test rows, with the same model, batch size, max_new_tokens, stop tokens and precision, five ways:

- `peftlab`: `peftlab.evaluate(run, "test")`: rows sorted by length, prompts left-padded, KV cache; its report gives
  the seconds spent in generate and the tokens written (eval_report's `generation`);
- `peftlab, adapter unfolded`: the same with `eval.merge_adapter=false` (the adapter's own pass in every layer, as
  during training), which isolates what folding the adapter into the base gives;
- `peftlab, weights cast per call`: the same with `train.cast_frozen=false`: under bf16 autocast, an fp32 base's
  weights are cast to bf16 at every forward, so once per generated token, instead of once for the evaluation;
- `plain-left`: the rows in data order (the batch as given), left-padded, KV cache;
- `plain`: the rows in data order, padded on the tokenizer's own side (right for SmolLM2), as a first try would do it:
  transformers warns that right padding is wrong for a decoder, and the padded rows' answers show it.

Written tokens are counted up to each row's first stop token (`sft.new_token_counts`); rows/s is the user's view
(time to score the split); ROUGE-L shows what the padding side costs in quality.

    python benchmarks/generation.py --run runs/llm/samsum-lora --rows 128 --overwrite     # ~12 min on 2 CPU cores
    python benchmarks/generation.py --run runs/llm/memory-lora-lean --overrides model.dtype=float32 --name generation-fp32-base

Results go to results/NAME.{json,md} (default: generation); an existing one is replaced only with --overwrite.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import RESULTS, check_counts, provenance, refuse_replacing, write_result  # noqa: E402


def prepare(run: Path, overrides: list[str]) -> dict:
    """The run's model, tokenizer and test rows as `peftlab.evaluate(run, "test", overrides)` reads them, loaded once
    for both plain sides."""
    from peftlab import build_data, load_trained
    from peftlab.accel import make_accelerator
    from peftlab.config import load_recipe
    from peftlab.run import load_splits_for
    from peftlab.rundir import RECIPE_FILE

    recipe = load_recipe(run / RECIPE_FILE, overrides, validate_files=False)
    model, tokenizer, _, record = load_trained(run, recipe=recipe)
    splits, _ = load_splits_for(recipe, "test", record.label_names)
    ds = build_data(recipe, tokenizer, splits=splits, label_names=record.label_names).test
    return {"model": model, "tokenizer": tokenizer, "recipe": recipe, "ds": ds,
            "accelerator": make_accelerator(recipe, record.precision)}


def plain(parts: dict, side: str) -> dict:
    """The test rows through model.generate in data order, batch as given; padding on the left (plain-left) or on the
    tokenizer's side (plain) -> seconds, tokens written, predictions by row."""
    import torch

    from peftlab.tasks import sft
    from peftlab.tasks.generative import end_tokens

    model, tokenizer, recipe, ds = parts["model"], parts["tokenizer"], parts["recipe"], parts["ds"]
    stops, b = end_tokens(model, sft.stop_ids(tokenizer)), recipe.eval.batch_size  # the evaluation's stop set
    left = side == "plain-left" or tokenizer.padding_side == "left"
    seconds, written, preds = 0.0, 0, {}
    for i in range(0, len(ds), b):
        chunk = ds.select(range(i, min(i + b, len(ds))))
        ids = sft._pad(chunk["gen_ids"], tokenizer.pad_token_id, left=left, multiple=1)
        mask = sft._pad([[1] * len(g) for g in chunk["gen_ids"]], 0, left=left, multiple=1)
        start = time.perf_counter()
        with torch.no_grad(), parts["accelerator"].autocast():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=recipe.eval.max_new_tokens, do_sample=False,
                                 num_beams=1, pad_token_id=tokenizer.pad_token_id, eos_token_id=stops)
        seconds += time.perf_counter() - start
        new = gen[:, ids.shape[1]:]
        written += int(sft.new_token_counts(new, stops).sum())
        for row, text in zip(chunk["row"], tokenizer.batch_decode(new, skip_special_tokens=True)):
            preds[row] = text.strip()
    return {"seconds": seconds, "new_tokens": written, "predictions": preds,
            "references": dict(zip(ds["row"], ds["reference"]))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=REPO / "runs" / "llm" / "samsum-lora")
    p.add_argument("--rows", type=int, default=128, help="seeded test rows")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--overrides", nargs="*", default=[], help="recipe overrides for every side (e.g. model.dtype=float32)")
    p.add_argument("--name", default="generation", help="results/NAME.{json,md}")
    p.add_argument("--overwrite", action="store_true", help="replace results/NAME.* if they exist (else refused)")
    args = p.parse_args()
    check_counts(p, (("--rows", args.rows, "at least 1 test row"), ("--batch", args.batch, "at least 1 row per batch")))
    if not (args.run / "run.json").is_file():
        p.error(f"--run {args.run}: not a finished peftlab run (no run.json). Train the default one with "
                "`python benchmarks/llm.py --cases samsum-lora` first, or pass --run RUN_FOLDER")
    from peftlab import evaluate
    from peftlab.config import load_recipe
    from peftlab.errors import ConfigError
    from peftlab.rundir import RECIPE_FILE
    from peftlab.tasks.sft import score

    overrides = [f"data.test.max_samples={args.rows}", f"eval.batch_size={args.batch}", *args.overrides]
    # checked before any work: a bad override was a traceback naming recipe keys, a run that does not generate
    # (classification) failed after a whole evaluation
    try:
        task = load_recipe(args.run / RECIPE_FILE, overrides, validate_files=False).task.type
    except ConfigError as e:
        p.error(f"{'--overrides ' + ' '.join(args.overrides) if args.overrides else f'--run {args.run}'}: {e}")
    if task != "sft":
        p.error(f"--run {args.run}: a {task} run; generation is timed on a generating run: give a finished SFT run "
                "(task.type sft), e.g. runs/llm/samsum-lora")
    refuse_replacing(p, [RESULTS / f"{args.name}.{ext}" for ext in ("json", "md")], args.overwrite)
    results = []
    for side, extra in (("peftlab", []), ("peftlab, adapter unfolded", ["eval.merge_adapter=false"]),
                        ("peftlab, weights cast per call", ["train.cast_frozen=false"])):
        with tempfile.TemporaryDirectory() as tmp:
            evaluate(args.run, "test", [*overrides, *extra], results_dir=tmp)
            gen = json.loads((Path(tmp) / "eval-test.json").read_text())["report"]["generation"]
            rows = [json.loads(x) for x in (Path(tmp) / "predictions-test.jsonl").read_text().splitlines()]
        refs = {r["row"]: r["reference"] for r in rows}
        results.append({"side": side, "seconds": gen["seconds"], "new_tokens": gen["new_tokens"],
                        "rougeL": score([r["prediction"] for r in rows], [r["reference"] for r in rows], None)["rougeL"]})
    parts = prepare(args.run, overrides)
    for side in ("plain-left", "plain"):
        out = plain(parts, side)
        assert out["references"] == refs, "the plain side scored other rows than peftlab"
        order = sorted(refs)
        results.append({"side": side, "seconds": out["seconds"], "new_tokens": out["new_tokens"],
                        "rougeL": score([out["predictions"][r] for r in order], [refs[r] for r in order], None)["rougeL"]})
    for r in results:
        r.update(rows=len(refs), batch=args.batch, tokens_per_s=r["new_tokens"] / r["seconds"], rows_per_s=len(refs) / r["seconds"])
    mine = results[0]
    lines = ["| side | rows | batch | generate s | tokens written | tokens/s | rows/s | peftlab's speed-up (rows/s) | ROUGE-L |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['side']} | {r['rows']} | {r['batch']} | {r['seconds']:.1f} | {r['new_tokens']:,} | {r['tokens_per_s']:.1f} | "
              f"{r['rows_per_s']:.2f} | {mine['rows_per_s'] / r['rows_per_s']:.2f}x | {100 * r['rougeL']:.2f} |" for r in results]
    text = "\n".join(lines)
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_result(RESULTS / f"{args.name}.json", json.dumps({"run": str(args.run), "overrides": overrides, "provenance": provenance(),
                                                          "results": results}, indent=2))
    write_result(RESULTS / f"{args.name}.md", text + "\n")
    print(text)


if __name__ == "__main__":
    main()
