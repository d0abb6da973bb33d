"""What each CPU speed lever of peftlab's training step gives, measured in one process on the same batches.

A lever's effect of a few percent is below the spread between two training processes on a shared machine (the
ablations of throughput.py vary by ~5% per seed). Here one model is built from a recipe as `peftlab train` builds it
(`peftlab.train.setup`: fast dropout, accelerate, bf16 autocast where the CPU has it), then every batch is stepped
twice, once with the lever's alternative switched in and once with peftlab's default, in alternating order, so drift
of the host hits both alike. The ratio is the default's speed over the alternative's, timed over the same batches
(forward with the task's own loss, backward, gradient clipping and the AdamW step, as `peftlab.train.loop` runs
them; the first batches are warm-up).

Levers (the alternative each is timed against):
- `uint8 masks`: dropout masks built as bool tensors with a comparison (the stop-32 `keep_mask`); on CPU, ops that
  make or read bool tensors are not vectorized;
- `sparse dropout`: every dropout mask drawn as a `keep_mask` (16 random bits per element; peftlab before stop 51)
  instead of only the dropped positions below p = 0.15 (`peftlab.dropout.dropped_positions`);
- `peftlab attention` (called `fast attention dropout` before stop 48): transformers' `sdpa` attention instead of
  `peftlab.dropout.cpu_training_attention`, which draws attention-dropout masks with `keep_mask` (`sdpa`'s CPU math
  fallback draws `bernoulli_` masks) and attends packed SFT rows per example (`sdpa` walks each row's whole
  block-diagonal mask);
- `fused AdamW`: torch's foreach AdamW (peftlab's default before stop 38) instead of the fused kernel
  (`train.optimizer_impl: auto`);
- `skip unread positions`: the classifier's last layer computed at every position (`train.skip_unread: false`)
  instead of at position 0 only, the one its head reads;
- `cast frozen once`: autocast casting the frozen fp32 weights at every forward (`train.cast_frozen: false`) instead
  of their bf16 copies made once (only under bf16 autocast).
- `fused LoRA`: peft's LoRA forward (`train.lora_impl: peft`) instead of `peftlab.fused_lora.FusedLoraLinear`
  (base, dropout and adapter in one autograd function).
- `head cross-entropy` (tasks whose loss is `causal_lm_loss`: sft, clm, verbalizer): the LM head's loss as before
  stop 52 (autocast's checkpointed cross-entropy in chunks of 1024 labelled tokens) instead of
  `generative._HeadCrossEntropy` in chunks of 128.

    OMP_NUM_THREADS=1 python benchmarks/step_levers.py --overwrite                       # SST-2 LoRA, ~4 min
    OMP_NUM_THREADS=1 python benchmarks/step_levers.py --recipe recipes/minilm/sst2-full.yaml --levers "fused AdamW" \
        --batches 40 --name sst2-full --overwrite                                        # full fine-tuning, ~3 min
    OMP_NUM_THREADS=1 python benchmarks/step_levers.py --recipe recipes/minilm/samsum-lora.yaml --batches 30 \\
        --overrides data.train.max_samples=600 --name samsum --overwrite                 # BERT2BERT, ~8 min

Results go to results/step_levers-NAME.{json,md}; an existing one is replaced only with --overwrite (a partial run,
`--levers X --batches 4`, wants a --name of its own).
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
from benchmarks.common import RESULTS, provenance, refuse_replacing, write_result  # noqa: E402


def bool_keep_mask(shape, p):
    """The stop-32 mask: the same bits and keep decisions as `keep_mask`, as a bool tensor from a comparison."""
    import torch

    n = shape.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(1 << 63), (1 << 63) - 1)
    return words.view(torch.int16)[:n].view(shape) >= round(p * 65536) - 32768


def levers(model, optimizers: dict | None = None, trimmed: list = (), cast=None, head_loss: bool = False) -> dict:
    """name -> (switch the alternative in, switch peftlab's default back). `optimizers`: {"in use": the run's
    optimizer, "foreach": the same AdamW with the foreach kernel}; the AdamW lever swaps "in use". `trimmed`: the
    layers `peftlab.tasks.unread_skipped` changed; their lever runs them in full. `cast`: the run's FrozenWeightsCast,
    entered; its lever shows autocast the fp32 weights again. `head_loss`: the task's loss is `causal_lm_loss`."""
    import peftlab.dropout as D
    from peftlab.fused_lora import FusedLoraLinear, LoraLinear

    switched = {id(m.config): m.config for m in model.modules()  # the configs use_fast_dropout moved off sdpa
                if getattr(getattr(m, "config", None), "_attn_implementation", None) in (D.ATTENTION, D.ATTENTION_PER_EXAMPLE)}
    fast_masks = D.keep_mask

    def attention(name):
        return lambda: [setattr(c, "_attn_implementation", name) for c in switched.values()]

    sparse_below = D.SPARSE_BELOW
    chosen = {"uint8 masks": (lambda: setattr(D, "keep_mask", bool_keep_mask), lambda: setattr(D, "keep_mask", fast_masks)),
              "sparse dropout": (lambda: setattr(D, "SPARSE_BELOW", 0.0), lambda: setattr(D, "SPARSE_BELOW", sparse_below))}
    if switched:  # a base on eager (or another) attention has no sdpa to compare with
        chosen["peftlab attention"] = (attention("sdpa"), attention(next(iter(switched.values()))._attn_implementation))
    if optimizers is not None and optimizers["in use"].defaults.get("fused"):  # the recipe's AdamW is the fused one
        fused = optimizers["in use"]
        chosen["fused AdamW"] = (lambda: optimizers.update({"in use": optimizers["foreach"]}),
                                 lambda: optimizers.update({"in use": fused}))
    if trimmed:  # the layers train.skip_unread changed (peftlab.tasks.unread_skipped), with their trimmed forwards
        forwards = [(m, vars(m)["forward"]) for m in trimmed]
        chosen["skip unread positions"] = (lambda: [vars(m).pop("forward", None) for m, _ in forwards],
                                           lambda: [setattr(m, "forward", f) for m, f in forwards])
    lora_layers = [m for m in model.modules() if isinstance(m, FusedLoraLinear)]
    if lora_layers:  # train.lora_impl: fused
        chosen["fused LoRA"] = (lambda: [setattr(m, "__class__", LoraLinear) for m in lora_layers],
                                lambda: [setattr(m, "__class__", FusedLoraLinear) for m in lora_layers])
    if head_loss:
        import peftlab.tasks.generative as G

        fused_head, chunk = G._frozen_linear_head, G.CHUNK
        chosen["head cross-entropy"] = (lambda: (setattr(G, "_frozen_linear_head", lambda *a: False), setattr(G, "CHUNK", 1024)),
                                        lambda: (setattr(G, "_frozen_linear_head", fused_head), setattr(G, "CHUNK", chunk)))
    if cast is not None and cast.params:  # train.cast_frozen under autocast: the frozen weights cast once
        chosen["cast frozen once"] = (lambda: cast.show(low=False), lambda: cast.show(low=True))
    return chosen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="recipes/minilm/sst2-lora.yaml")
    ap.add_argument("--overrides", nargs="*", default=["data.train.max_samples=6000"])
    ap.add_argument("--batches", type=int, default=120, help="training batches, each stepped once per side of every lever")
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--levers", default=None, help="comma list (default: all)")
    ap.add_argument("--name", default="sst2", help="results/step_levers-NAME.{json,md}")
    ap.add_argument("--overwrite", action="store_true", help="replace results/step_levers-NAME.* if they exist (else refused)")
    a = ap.parse_args()
    if a.warmup < 0 or a.batches <= a.warmup:
        ap.error(f"--batches {a.batches} --warmup {a.warmup}: the batches after the warm-up are the ones timed; "
                 "give --batches greater than --warmup (and --warmup >= 0)")
    refuse_replacing(ap, [RESULTS / f"step_levers-{a.name}.{ext}" for ext in ("json", "md")], a.overwrite)

    import torch

    from peftlab.accel import make_accelerator, resolve_precision
    from peftlab.config import load_recipe
    from peftlab.data import build_data, load_splits
    from peftlab.errors import ConfigError
    from peftlab.model import build_model
    from peftlab.tasks import get_task, unread_skipped
    from peftlab.train import setup

    with tempfile.TemporaryDirectory() as tmp:
        try:  # a missing recipe or a bad override: one message, not a traceback
            recipe = load_recipe(REPO / a.recipe, [*a.overrides, "data.eval=null", "data.eval_holdout=0", "data.test=null",
                                                   f"output_dir={tmp}/out"])
        except ConfigError as e:
            ap.error(f"--recipe {a.recipe} --overrides {' '.join(a.overrides)}: {e}")
    precision = resolve_precision(recipe.train.precision)
    accelerator = make_accelerator(recipe, precision)
    splits, names = load_splits(recipe)
    model, tokenizer, _ = build_model(recipe, num_labels=len(names), label_names=names, precision=precision)
    data = build_data(recipe, tokenizer, splits=splits, label_names=names)
    trimming = unread_skipped(model, recipe)  # as train() trims it, before setup (held, and left so: the process ends;
    trimmed = trimming.__enter__()            # a context manager no name holds would give the layers back when collected)
    parts = setup(recipe, model, data, accelerator, tokenizer)
    model = parts.model
    foreach = torch.optim.AdamW([{k: v for k, v in g.items() if k not in ("fused", "foreach")} for g in parts.optimizer.param_groups],
                                foreach=True)
    optimizers = {"in use": parts.optimizer, "foreach": accelerator.prepare(foreach)}
    batches = [b for _, b in zip(range(a.batches), parts.train_dl)]
    if len(batches) <= a.warmup:
        ap.error(f"the data gave {len(batches)} training batch(es), none left to time after --warmup {a.warmup}: "
                 "give more training rows (--overrides data.train.max_samples=...) or a smaller --warmup")
    model.train()
    task_loss = getattr(get_task(recipe.task.type), "loss", None)  # as the training loop computes it (e.g. LM losses on labelled tokens)

    def step(batch) -> float:
        batch = {k: v for k, v in batch.items() if k not in ("real_tokens", "real_examples")}
        start = time.perf_counter()
        with accelerator.accumulate(model):
            accelerator.backward(task_loss(model, batch, accelerator) if task_loss else model(**batch).loss)
            if recipe.train.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), recipe.train.max_grad_norm)
            optimizers["in use"].step()
            optimizers["in use"].zero_grad(set_to_none=True)
        return time.perf_counter() - start

    from peftlab.tasks.generative import causal_lm_loss

    chosen = levers(model, optimizers, trimmed, parts.cast.__enter__(), head_loss=task_loss is causal_lm_loss)
    if a.levers:
        if unknown := set(a.levers.split(",")) - set(chosen):
            ap.error(f"--levers: unknown {sorted(unknown)}; choose from {sorted(chosen)}")
        chosen = {k: chosen[k] for k in a.levers.split(",")}
    rows = []
    for name, (alternative, default) in chosen.items():
        seconds = {"alternative": 0.0, "default": 0.0}
        for i, batch in enumerate(batches):
            order = [("alternative", alternative), ("default", default)][:: 1 if i % 2 else -1]
            for side, switch in order:
                switch()
                took = step(batch)
                if i >= a.warmup:
                    seconds[side] += took
        default()
        n = len(batches) - a.warmup
        rows.append({"lever": name, "alternative_ms": 1000 * seconds["alternative"] / n, "default_ms": 1000 * seconds["default"] / n,
                     "speedup": seconds["alternative"] / seconds["default"]})
        print(f"{name}: {rows[-1]['alternative_ms']:.1f} -> {rows[-1]['default_ms']:.1f} ms a step ({rows[-1]['speedup']:.3f}x)", flush=True)

    tokens = [sum(b["real_tokens"]) for b in batches[a.warmup:]]  # non-pad tokens, counted by the training loader (per row)
    out = {"recipe": a.recipe, "overrides": a.overrides, "precision": precision, "threads": torch.get_num_threads(),
           "batches": len(tokens), "mean_real_tokens_per_batch": sum(tokens) / len(tokens),
           "max_length_per_batch": max(b["input_ids"].shape[1] for b in batches), "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_result(RESULTS / f"step_levers-{a.name}.json", json.dumps({**out, "provenance": provenance()}, indent=1) + "\n")
    lines = [f"`{a.recipe}` {' '.join(a.overrides)}: {len(tokens)} batches (after {a.warmup} warm-up), "
             f"{out['mean_real_tokens_per_batch']:.0f} real tokens a batch on average, {precision}, {out['threads']} thread(s).",
             "", "| lever (vs the alternative) | alternative ms/step | peftlab ms/step | speed-up |", "|---|---|---|---|"]
    lines += [f"| {r['lever']} | {r['alternative_ms']:.1f} | {r['default_ms']:.1f} | {r['speedup']:.3f}x |" for r in rows]
    write_result(RESULTS / f"step_levers-{a.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
