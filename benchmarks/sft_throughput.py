"""LLM SFT throughput: peftlab vs TRL's SFTTrainer, on the same dialogues, model, adapter and schedule (issue 21, item 2).

SmolLM2-135M-Instruct (the GGUF in ../shared, converted by peftlab once; every side loads that same folder in fp32 and
trains under bf16 autocast where the CPU has it), chat SFT on SAMSum as `recipes/smollm2-135m/samsum-sft-lora.yaml`
ships it: the user turn "Summarize this dialogue in one or two sentences.\\n\\n{dialogue}", the summary the answer, the
loss on the answer only, LoRA r16 alpha 32 dropout 0.05 on every linear layer, AdamW lr 5e-4, 5% warmup then linear
decay, <= 512 tokens, one epoch over the same N seeded training dialogues. Sides:

- `peftlab`: `peftlab train` on that recipe (packing as shipped: 4 rows of <= 512 tokens x grad_accum 2 per step);
- `trl`: SFTTrainer with its defaults (8 examples per batch, padded to the longest, no packing, and activation
  checkpointing, which TRL turns on by default) x grad_accum 2;
- `peftlab-torch-dropout` (only when `--sides` names it): peftlab with torch's own dropout masks
  (`train.dropout_impl=torch`), what the default fast masks save;
- `peftlab-masked` (only when `--sides` names it): peftlab with `sdpa` over each packed row's block-diagonal mask
  (`train.packed_attention=masked`), what attending each example alone saves;
- `peftlab-bf16-base` (only when `--sides` names it): peftlab with the frozen base stored in bf16 (`model.dtype=auto`):
  the residual stream, norms' outputs and activations in bf16, nothing cast per step; other numerics than the recipe's;
- `trl-packed`: SFTTrainer with `packing=True` (best-fit decreasing, padding-free: position ids restart per example)
  and activation checkpointing off, 4 packed rows of 512 x grad_accum 2: the settings of the peftlab recipe.

TRL is given the same work (model, rows, LoRA, lr, schedule, max_length 512, bf16, seed) and otherwise its defaults.
Each side is its own process (its own peak RSS) and the sides alternate per seed. Real tokens/s = the tokens of the N
conversations (prompt + answer, no padding; the same count for every side) / training seconds (no evaluation inside).
MFU = the model FLOPs of that training (`training_flops`: what LoRA training of these rows needs, the same for every
side) / training seconds / the matmul peak measured in the same invocation (the higher of its start and right after the
side trained), in the sides' precision and thread count (`common.gemm_peak`: bf16 on CPUs with native bf16, fp32 on the others).
After training, every side's adapter is scored by the same function on the same validation rows: the mean token loss
of the answers (batch 1, so no padding enters), which is the "equal loss after equal tokens" check.
"peftlab's speed-up" pairs a side only with the peftlab run of the same invocation (`session`), never with one measured
another time (a seed's peftlab run measured again later is not compared with that seed's older TRL runs). Results
stored before sessions were recorded carry the commit that stored them (`commit HASH`): files stored by one commit came
from one invocation.

    pip install -e .[bench]                                  # TRL lives in the bench extra
    python benchmarks/sft_throughput.py --rows 256 --seeds 0   # ~25 min on 2 CPU cores
    python benchmarks/sft_throughput.py --report               # results/sft_throughput.md from the stored runs
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import RESULTS, gemm_peak, measured_process, train_process, write_result  # noqa: E402

RECIPE = REPO / "recipes/smollm2-135m/samsum-sft-lora.yaml"
OUT = RESULTS / "sft_throughput"
SESSION = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f" pid {os.getpid()}"  # this invocation: its sides are paired
SIDES = ("peftlab", "trl", "trl-packed")
EXTRA_SIDES = {"peftlab-torch-dropout": ["train.dropout_impl=torch"],  # peftlab ablations, run when --sides names them
               "peftlab-masked": ["train.packed_attention=masked"],
               "peftlab-bf16-base": ["model.dtype=auto"]}
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
MAX_LENGTH, LR, WARMUP, ACCUM = 512, 5e-4, 0.05, 2


def recipe_parts():
    from peftlab import load_recipe
    from peftlab.bases import resolve_model_path

    recipe = load_recipe(RECIPE, [], validate_files=False)
    return recipe, resolve_model_path(recipe.model.name)


def dialogues(split: str, n: int, seed: int) -> list[dict]:
    """n seeded rows of SAMSum `split`: {dialogue, summary}."""
    import datasets

    ds = datasets.load_dataset("csv", data_files=str(REPO.parent / f"shared/data/samsum/{split}.csv"))["train"]
    ds = ds.filter(lambda r: bool(r["dialogue"]) and bool(r["summary"])).shuffle(seed=seed).select(range(n))
    return [{"dialogue": d, "summary": s} for d, s in zip(ds["dialogue"], ds["summary"])]


def chat(row: dict, prompt: str) -> dict:
    """A row as TRL's conversational prompt/completion: the recipe's user turn, the summary as the assistant's."""
    return {"prompt": [{"role": "user", "content": prompt.format(source=row["dialogue"])}],
            "completion": [{"role": "assistant", "content": row["summary"]}]}


def answer_span(tokenizer, row: dict, stops: set[int]) -> tuple[list[int], int, int]:
    """A chat prompt/completion row -> (its tokens cut at MAX_LENGTH, where the answer starts, where it ends): the answer
    runs to its end-of-turn token (EOS / <|im_end|>) inclusive, as peftlab's labels do; the newline SmolLM2's template
    writes after it is no answer token."""
    full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True, return_dict=False)[:MAX_LENGTH]
    start = len(tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False))
    return full, start, next((k + 1 for k in range(start, len(full)) if full[k] in stops), len(full))


def token_counts(rows: list[dict], tokenizer) -> dict:
    """Of `rows` (chat prompt/completion, cut at MAX_LENGTH): real tokens, answer tokens (the labelled ones, whose
    logits the loss needs: answer_span) and the sum over tokens of their causal attention context (n(n+1)/2 for a row
    of n: each example attends to itself only, in peftlab's packed rows as in TRL's padding-free ones)."""
    from peftlab.tasks.sft import stop_ids

    stops, real, answer, context = set(stop_ids(tokenizer)), 0, 0, 0
    for r in rows:
        full, start, end = answer_span(tokenizer, r, stops)
        n = len(full)
        real, answer, context = real + n, answer + max(end - start, 0), context + n * (n + 1) // 2
    return {"real": real, "answer": answer, "context": context}


def training_flops(config, counts: dict, r: int = LORA["r"]) -> float:
    """Model FLOPs of one pass of LoRA training over rows with `counts` (token_counts): the decoder's matmul weights
    4x per token (forward and input gradient; frozen, so no weight gradient), the LoRA matrices on every linear layer
    6x, the LM head (tied, frozen) 4x per answer token only (no other logits are needed), and attention scores and
    mixing (2 x 2 x context x query width per token and layer forward, 3x with backward). This is the work the training
    needs, the same for every side; MFU = FLOPs / seconds / the GEMM peak."""
    d, ff, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q, kv = config.num_attention_heads * head, config.num_key_value_heads * head
    shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, ff), (d, ff), (ff, d)]  # q, k, v, o, gate, up, down: (in, out)
    weights = layers * sum(i * o for i, o in shapes)
    lora = layers * sum(r * (i + o) for i, o in shapes)
    return ((4 * weights + 6 * lora) * counts["real"] + 4 * d * config.vocab_size * counts["answer"]
            + 3 * 4 * q * layers * counts["context"])


def after_first_step(log: Path) -> dict | None:
    """From a peftlab run's log.jsonl written at every step: the real tokens and training seconds of the steps after
    the first (which also pays for first touches of memory: ~3.5 GB of page faults at SmolLM2's 4 x 512 tokens, ~10 s
    of kernel time in this VM) -> their share of the run's tokens and their seconds; None with fewer than 2 steps."""
    steps = [r for r in map(json.loads, log.read_text().splitlines()) if r.get("kind") == "train"]
    if len(steps) < 2 or [r["step"] for r in steps] != list(range(1, len(steps) + 1)):
        return None
    tokens = [r["tokens_per_s"] * (r["train_s"] - (prev["train_s"] if prev else 0.0)) for prev, r in zip([None, *steps], steps)]
    return {"token_share": sum(tokens[1:]) / sum(tokens), "seconds": steps[-1]["train_s"] - steps[0]["train_s"]}


def write_csv(rows: list[dict], path: Path) -> None:
    import csv

    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["dialogue", "summary"])
        w.writeheader()
        w.writerows(rows)


def worker_trl(args, rows_file: Path, out: Path, packed: bool, seed: int) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from peftlab.accel import resolve_precision

    recipe, path = recipe_parts()
    rows = [chat(r, recipe.task.prompt) for r in json.loads(rows_file.read_text())]
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    bf16 = resolve_precision("auto") == "bf16"
    batch = 4 if packed else 8  # TRL's default is 8 examples per device; packed: 4 rows of 512, as the peftlab recipe
    config = SFTConfig(output_dir=str(out), per_device_train_batch_size=batch, gradient_accumulation_steps=ACCUM,
                       learning_rate=LR, warmup_steps=WARMUP, lr_scheduler_type="linear", weight_decay=0.01, num_train_epochs=1,
                       max_length=MAX_LENGTH, packing=packed, gradient_checkpointing=not packed, bf16=bf16, use_cpu=not torch.cuda.is_available(), seed=seed,
                       logging_steps=5, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=not args.verbose)
    trainer = SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA))
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    trainer.model.save_pretrained(str(out / "adapter"))
    return {"train_seconds": seconds, "steps": result.global_step, "train_loss": result.training_loss}


def answer_loss(adapter: Path, rows: list[dict]) -> float:
    """Mean cross-entropy of the answer tokens (and the end-of-turn token after them) of `rows`, one row at a time under
    the precision every side trained in: one function for every side's adapter. Each row ends at its end-of-turn token
    (EOS / <|im_end|>, as peftlab's labels do): the newline SmolLM2's template writes after it is no answer token."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftlab.accel import resolve_precision
    from peftlab.tasks.sft import stop_ids

    _, path = recipe_parts()
    tokenizer = AutoTokenizer.from_pretrained(path)
    stops = set(stop_ids(tokenizer))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), str(adapter)).eval()
    total, count = 0.0, 0
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=resolve_precision("auto") == "bf16")
    with torch.no_grad(), autocast:
        for r in rows:
            full, start, end = answer_span(tokenizer, r, stops)
            ids = torch.tensor([full[:end]])
            labels = ids.clone()
            labels[0, :start] = -100
            logits = model(input_ids=ids).logits[0, :-1].float()
            losses = torch.nn.functional.cross_entropy(logits, labels[0, 1:], reduction="none", ignore_index=-100)
            total, count = total + losses.sum().item(), count + int((labels[0, 1:] != -100).sum())
    return total / max(count, 1)


def spawn(args, side: str, seed: int, rows_file: Path, out: Path) -> tuple[dict, float]:
    """A TRL side in its own process -> (its result, its peak RSS in MiB)."""
    cmd = [sys.executable, __file__, "--worker", side, "--seed-of-run", str(seed), "--rows-file", str(rows_file), "--out", str(out)]
    rss, _ = measured_process(side, cmd + (["--verbose"] if args.verbose else []), verbose=args.verbose)
    return json.loads((out / "result.json").read_text()), rss


def run_pair(args, seed: int, peak: dict) -> None:
    """Every side of `args.sides` on the rows of `seed`; `peak`: gemm_peak at the start of this invocation. Each side's
    MFU is against the higher of that and a gemm_peak measured right after the side trained."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from peftlab.rundir import atomic_write_text

    recipe, path = recipe_parts()
    tokenizer = AutoTokenizer.from_pretrained(path)
    train = dialogues("train", args.rows, seed)
    valid = [chat(r, recipe.task.prompt) for r in dialogues("validation", args.eval_rows, 0)]
    counts = token_counts([chat(r, recipe.task.prompt) for r in train], tokenizer)
    tokens, flops = counts["real"], training_flops(AutoConfig.from_pretrained(path), counts)
    runs = REPO / "runs" / "sft_throughput"
    runs.mkdir(parents=True, exist_ok=True)
    rows_file = runs / f"rows-{args.rows}-{seed}.json"
    rows_file.write_text(json.dumps(train))
    csv_file = runs / f"rows-{args.rows}-{seed}.csv"
    write_csv(train, csv_file)
    OUT.mkdir(parents=True, exist_ok=True)
    for side in args.sides.split(","):
        dest = OUT / f"{side}-{args.rows}-seed{seed}.json"
        if dest.exists() and not args.fresh:
            print(f"[{side} seed {seed}] stored: {dest}", flush=True)
            continue
        out = runs / f"{side}-{args.rows}-{seed}"
        print(f"[{side} seed {seed}] training on {args.rows} dialogues ({tokens:,} real tokens)", flush=True)
        if side == "peftlab" or side in EXTRA_SIDES:
            run, rss, _ = train_process(side, str(RECIPE), [
                f"data.train={csv_file}", "data.eval=null", "data.test=null", "train.max_steps=null", "train.epochs=1",
                "train.eval_every=null", "train.save_every=null", "train.log_every=1", f"train.seed={seed}",
                "train.report_to=[none]", "name=sft-throughput", *EXTRA_SIDES.get(side, [])], out, verbose=args.verbose)
            result = {"train_seconds": run["train_seconds"], "steps": run["steps"], "adapter": str(out)}
            result["after_first_step"] = after_first_step(out / "log.jsonl")
        else:
            result, rss = spawn(args, side, seed, rows_file, out)
            result["adapter"] = str(out / "adapter")
        after = gemm_peak(torch.get_num_threads(), peak["precision"])  # again right after: a dip at the start would flatter
        best = max(peak, after, key=lambda g: g["peak_gflops"])
        result.update(side=side, seed=seed, rows=args.rows, real_tokens=tokens, peak_rss_mib=rss, session=SESSION,
                      tokens_per_s=tokens / result["train_seconds"], answer_tokens=counts["answer"], training_flops=flops,
                      mfu=flops / result["train_seconds"] / (best["peak_gflops"] * 1e9), gemm_peak=best,
                      gemm_peaks_measured=[peak["peak_gflops"], after["peak_gflops"]],
                      eval_rows=len(valid), answer_loss=answer_loss(Path(result["adapter"]), valid))
        if steady := result.get("after_first_step"):  # the same FLOPs per token assumed for every step
            steady["mfu"] = flops * steady["token_share"] / steady["seconds"] / (best["peak_gflops"] * 1e9)
        atomic_write_text(dest, json.dumps(result, indent=2))
        after = f", {steady['mfu']:.1%} after step 1" if steady else ""
        print(f"[{side} seed {seed}] {result['tokens_per_s']:.0f} real tokens/s (MFU {result['mfu']:.1%}{after}), {result['steps']} steps, "
              f"answer loss {result['answer_loss']:.4f}, peak RSS {rss:.0f} MiB", flush=True)


def report() -> str:
    rows = [json.loads(f.read_text()) for f in sorted(OUT.glob("*.json"))]
    lines = ["| side | dialogues | seed | optimizer steps | real tokens/s | peftlab's speed-up | MFU (GEMM peak) | "
             "MFU after step 1 | answer loss after (validation) | peak RSS (MiB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    by = {(r["side"], r["rows"], r["seed"]): r for r in rows}
    order = [*SIDES[:1], *EXTRA_SIDES, *SIDES[1:]]
    for r in sorted(rows, key=lambda r: (r["rows"], r["seed"], order.index(r["side"]))):
        mine = by.get(("peftlab", r["rows"], r["seed"]))
        ratio = f"{mine['tokens_per_s'] / r['tokens_per_s']:.2f}x" if mine and mine.get("session") == r.get("session") else \
            "not paired" if mine else ""  # measured in another invocation: no ratio
        mfu = f"{r['mfu']:.1%} ({r['gemm_peak']['peak_gflops']:.0f} {r['gemm_peak']['precision']})" if "mfu" in r else "-"
        steady = f"{r['after_first_step']['mfu']:.1%}" if (r.get("after_first_step") or {}).get("mfu") else "-"
        lines.append(f"| {r['side']} | {r['rows']} | {r['seed']} | {r['steps']} | {r['tokens_per_s']:.0f} | {ratio} | {mfu} | "
                     f"{steady} | {r['answer_loss']:.4f} | {r['peak_rss_mib']:.0f} |")
    text = "\n".join(lines)
    write_result(RESULTS / "sft_throughput.md", text + "\n")
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=256, help="SAMSum training dialogues (seeded)")
    p.add_argument("--eval-rows", type=int, default=64, help="validation dialogues whose answer loss is compared")
    p.add_argument("--seeds", default="0", help="comma-separated; seed i picks the rows and seeds every side")
    p.add_argument("--sides", default=",".join(SIDES), help=f"comma list of {', '.join([*SIDES, *EXTRA_SIDES])}")
    p.add_argument("--fresh", action="store_true", help="measure stored sides again")
    p.add_argument("--report", action="store_true")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--worker", choices=("trl", "trl-packed"), help=argparse.SUPPRESS)
    p.add_argument("--seed-of-run", type=int, help=argparse.SUPPRESS)
    p.add_argument("--rows-file", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rows < 1 or args.eval_rows < 1:
        p.error(f"--rows {args.rows} --eval-rows {args.eval_rows}: each needs at least 1 dialogue (default 256 and 64)")
    if args.worker:
        args.out.mkdir(parents=True, exist_ok=True)
        result = worker_trl(args, args.rows_file, args.out, args.worker == "trl-packed", args.seed_of_run)
        (args.out / "result.json").write_text(json.dumps(result))
        return
    unknown = set(args.sides.split(",")) - {*SIDES, *EXTRA_SIDES}
    if unknown:
        p.error(f"--sides: unknown {sorted(unknown)}; choose from {', '.join([*SIDES, *EXTRA_SIDES])}")
    trl = [s for s in args.sides.split(",") if s.startswith("trl")]
    if trl and not args.report and importlib.util.find_spec("trl") is None:  # (it failed after peftlab's whole run)
        p.error(f"--sides {args.sides}: {', '.join(trl)} need(s) TRL, which is not installed. Install the bench extra "
                "(pip install -e .[bench]), or leave trl out of --sides (e.g. --sides peftlab).")
    if not args.report:
        import torch

        from peftlab.accel import resolve_precision

        peak = gemm_peak(torch.get_num_threads(), resolve_precision("auto"))  # the threads and precision the sides train with
        print(f"GEMM peak: {peak['peak_gflops']:.0f} GFLOP/s ({peak['precision']}, {torch.get_num_threads()} threads)", flush=True)
        for seed in map(int, args.seeds.split(",")):
            run_pair(args, seed, peak)
    print(report())


if __name__ == "__main__":
    main()
