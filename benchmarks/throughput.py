"""Throughput: peftlab vs the hand-written `transformers.Trainer` + `peft.get_peft_model` recipe, on the same work.

Same model (packaged MiniLM), same rows (a seeded SST-2 subset, read once by peftlab for both sides), same
hyperparameters (batch 32, AdamW lr 1e-3, 6% warmup then linear decay, weight decay 0.01, LoRA r=8 alpha=16 dropout 0.1
on query/key/value/attention.output.dense), same number of optimizer steps, same evaluation schedule on the SST-2 dev
split. The baseline keeps every Trainer default a user would keep (random sampler, fused AdamW, dynamic padding with
DataCollatorWithPadding, logging every 500 steps). Each run is its own process (so peak RSS is its own); the two sides
alternate (peftlab, Trainer, peftlab, Trainer, ...) so slow phases of a shared machine hit both; with --repeats N,
pair i trains with seed 42 + i on both sides and the accuracy difference is reported paired by seed.

Both sides train in --precision (default: what peftlab's `auto` picks on this machine, bf16 where the CPU has native
bf16 matmuls); the GEMM peak behind MFU is measured in it.

Cases: lora, lora-grouped (the Trainer tuned with train_sampling_strategy="group_by_length"), qlora (NF4 + double
quant; the baseline's prepare_model_for_kbit_training recomputes activations),
qlora-ckpt (both recompute); samsum: the MiniLM BERT2BERT LoRA summarizer (recipes/minilm/samsum-lora.yaml) against
EncoderDecoderModel + get_peft_model + Seq2SeqTrainer, training steps then beam-search generation on test rows;
memory-0.7b: peftlab LoRA vs QLoRA peak RSS on a 0.73B-parameter BERT built from a config, where the weights (2.9 GB
in fp32) and not the Python runtime fill the memory; each with and without activation checkpointing, and QLoRA with
glibc's heap as it is (`train.release_memory=never`), LoRA with QLoRA's allocator setting (`always`).

Also in the same invocation:
- a GEMM micro-benchmark (torch.mm in that precision at the same thread count), at the start and again after every run
  -> the machine's matmul peak (the highest reading: a dip of a shared host would flatter MFU), and from the model's
  shape the training FLOPs per real token -> model-FLOPs utilisation (MFU) of each run;
- ablations: each speed option of peftlab switched off (or on) alone, same steps, once per --repeats seed (or only
  those --ablations names): length-grouped batching, the last layer at every position, torch's dropout masks, a bf16
  frozen base, the frozen weights cast per call, host sync every step, the AdamW kernel, bf16 autocast,
  torch.compile; plus tokenization cold vs cached and the evaluation (sorted by length, batch 128, no grad vs unsorted
  batch 32).

    python benchmarks/throughput.py                    # ~60 min on one core: writes results/throughput.{json,md,png}
    python benchmarks/throughput.py --quick            # a few minutes: checks the pipeline
    OMP_NUM_THREADS=2 python benchmarks/throughput.py  # threads per run (default: OMP_NUM_THREADS, else 1)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmarks.common, and this checkout's peftlab, installed or not
from benchmarks.common import METHODS, RESULTS, check_counts, fill_unset, gemm_peak, provenance, save_figure, write_result  # noqa: E402

RECIPE = REPO / "recipes" / "minilm" / "sst2-lora.yaml"
QLORA = METHODS["qlora"]
CKPT = ["train.gradient_checkpointing=true"]
CASES = {  # case -> (peftlab overrides, Trainer-side flags)
    "lora": ([], []),
    "qlora": (QLORA, ["qlora"]),  # the baseline's prepare_model_for_kbit_training recomputes activations (its default)
    "qlora-ckpt": ([*QLORA, *CKPT], ["qlora"]),  # both recompute: like-for-like memory
    "lora-grouped": ([], ["grouped"]),  # the Trainer tuned: train_sampling_strategy="group_by_length"
}
S2S_CASE = "samsum"  # MiniLM BERT2BERT LoRA on SAMSum: training, then beam-search generation on test rows
MEMORY_CASE = "memory-0.7b"  # peftlab LoRA vs QLoRA on a ~0.73B BERT built from a config: peak RSS when weights dominate
MEMORY_OVERRIDES = ["train.batch_size=16", "data.eval.max_samples=64", "train.eval_every=1000", "train.log_every=1000"]
MEMORY_SIDES = {"lora": [], "qlora": QLORA, "lora-ckpt": CKPT, "qlora-ckpt": [*QLORA, *CKPT],  # with activations kept / recomputed
                "qlora-keep": [*QLORA, "train.release_memory=never"],  # glibc's heap as it is (peftlab before stop 39)
                "lora-release": ["train.release_memory=always"]}  # LoRA with QLoRA's allocator setting
ABLATIONS = {  # name -> (peftlab overrides, what it switches, share of --steps it runs: slow ones run fewer)
    "no length grouping": (["train.group_by_length=false"], "plain shuffled batches (more padding)", 1.0),
    "host sync every step": (["train.log_every=1"], "loss read back to the host each step", 1.0),
    "all positions": (["train.skip_unread=false"], "the last layer computed at every position, not only the one the head reads", 1.0),
    "torch dropout": (["train.dropout_impl=torch"], "nn.Dropout's per-element bernoulli_ masks, sdpa's attention dropout", 1.0),
    "bf16 frozen base": (["model.dtype=auto"], "base weights stored in the training precision, no autocast copies", 1.0),
    "cast per call": (["train.cast_frozen=false"], "autocast casting the frozen fp32 weights at every forward, not once", 1.0),
    "AdamW loop": (["train.optimizer_impl=loop"], "one parameter at a time", 1.0),
    "AdamW foreach": (["train.optimizer_impl=foreach"], "batched tensor ops, not the fused kernel", 1.0),
    "bf16 autocast": (["train.precision=bf16"], "emulated on CPUs without avx512_bf16/AMX", 0.1),
    "torch.compile": (["train.compile=true"], "inductor, dynamic shapes, compile time included", 1.0),
}


# ----------------------------------------------------------------------------------------------- workers (one per process)


def common_overrides(args) -> list[str]:
    """The recipe's rows and hyperparameters, evaluated on SST-2 dev every --eval-every steps for the time-to-target
    column (no selection: keep_best off, and nothing reported as a test score)."""
    return [f"data.train.max_samples={args.rows}", f"data.eval={REPO.parent / 'shared/data/sst2/dev.tsv'}", "data.eval_holdout=0",
            "data.test=null", f"data.eval.max_samples={args.eval_rows or 'null'}", f"train.max_steps={args.steps}",
            f"train.eval_every={args.eval_every}", f"train.log_every={args.eval_every}",
            "train.save_every=null", "train.keep_best=false", "export.merge=false", f"train.seed={args.seed}",
            f"train.precision={args.precision}"]


def count_tokens(model):
    """Real and padded input tokens of the training batches a Trainer feeds `model` (a forward pre-hook on its
    attention mask; the counts stay tensors: no host sync) -> (real, padded), read after training."""
    import torch

    real, padded = torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.long)

    def count(module, _, kw):
        if module.training:
            real.add_(kw["attention_mask"].sum())
            padded.add_(kw["attention_mask"].numel())

    model.register_forward_pre_hook(count, with_kwargs=True)
    return real, padded


def trainer_clock():
    """A Trainer callback timing training up to each evaluation, evaluations excluded (as peftlab's log reports it)."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.evals, self.eval_s, self.t0, self.last = [], 0.0, 0.0, 0.0

        def on_train_begin(self, a, state, control, **kw):
            self.t0 = self.last = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            self.last = time.perf_counter()

        def on_evaluate(self, a, state, control, metrics=None, **kw):
            now = time.perf_counter()
            self.evals.append({"step": state.global_step, "accuracy": metrics["eval_accuracy"], "train_s": self.last - self.t0 - self.eval_s})
            self.eval_s += now - self.last
            self.last = now

    return Clock()


def worker_peftlab(args, extra: list[str]) -> dict:
    from peftlab import load_recipe, run

    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(RECIPE, [*common_overrides(args), *extra, f"output_dir={tmp}/out"])
        summary = run(recipe, overwrite=True)
        log = [json.loads(line) for line in (Path(tmp) / "out" / "log.jsonl").read_text().splitlines()]
    evals = [{"step": r["step"], "accuracy": r["accuracy"], "train_s": r["train_s"]} for r in log if r["kind"] == "eval"]
    return {"examples": summary["train_examples"], "train_s": summary["train_seconds"], "tokens": summary["train_tokens"],
            "evals": evals, "accuracy": summary["metrics"]["eval"]["accuracy"], "padded_tokens": summary["train_padded_tokens"]}


def worker_trainer(args, extra: list[str]) -> dict:
    """The recipe users write by hand: Trainer + get_peft_model, defaults kept where a user would keep them."""
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from peftlab import load_recipe, load_splits
    from peftlab.bases import resolve_model_path

    recipe = load_recipe(RECIPE, common_overrides(args))
    splits, _ = load_splits(recipe)  # the very rows peftlab trains on
    path = resolve_model_path("minilm")
    tok = AutoTokenizer.from_pretrained(path)
    quant = {}
    if "qlora" in extra:
        quant["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                                          bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["classifier"])
    torch.manual_seed(recipe.train.seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, **quant)
    if quant:
        model = prepare_model_for_kbit_training(model)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1,
                                             target_modules=["query", "key", "value", "attention.output.dense"]))

    def encode(batch):
        return tok(batch["text"], truncation=True, max_length=recipe.data.max_length)

    train_ds = splits["train"].map(encode, batched=True, remove_columns=["text"])
    eval_ds = splits["eval"].map(encode, batched=True, remove_columns=["text"])

    real_tokens, padded_tokens = count_tokens(model)

    def accuracy(pred):
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

    t = recipe.train
    targs = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=recipe.eval.batch_size,
                              learning_rate=t.lr, weight_decay=t.weight_decay, warmup_steps=int(t.warmup_fraction * t.max_steps),
                              lr_scheduler_type="linear", max_steps=t.max_steps, eval_strategy="steps", eval_steps=t.eval_every,
                              save_strategy="no", report_to="none", seed=t.seed, use_cpu=True, disable_tqdm=True,
                              bf16=args.precision == "bf16",
                              train_sampling_strategy="group_by_length" if "grouped" in extra else "random")
    clock = trainer_clock()
    trainer = Trainer(model=model, args=targs, train_dataset=train_ds, eval_dataset=eval_ds, data_collator=DataCollatorWithPadding(tok),
                      compute_metrics=accuracy, callbacks=[clock])
    trainer.train()
    train_s = clock.last - clock.t0 - clock.eval_s
    return {"examples": t.max_steps * t.batch_size, "train_s": train_s, "tokens": int(real_tokens), "padded_tokens": int(padded_tokens),
            "evals": clock.evals, "accuracy": clock.evals[-1]["accuracy"]}


S2S_RECIPE = REPO / "recipes" / "minilm" / "samsum-lora.yaml"


def s2s_overrides(args) -> list[str]:
    return [f"data.train.max_samples={args.s2s_rows}", "data.eval=null", f"data.test.max_samples={args.s2s_test}",
            f"train.max_steps={args.s2s_steps}", "train.eval_every=null", "train.log_every=10", "train.save_every=null",
            "train.keep_best=false", "export.merge=false", f"train.seed={args.seed}", f"train.precision={args.precision}"]


def worker_peftlab_s2s(args) -> dict:
    """BERT2BERT LoRA on SAMSum through `peftlab.run`; generation speed from its timed test evaluation."""
    from peftlab import load_recipe, run

    with tempfile.TemporaryDirectory() as tmp:
        summary = run(load_recipe(S2S_RECIPE, [*s2s_overrides(args), f"output_dir={tmp}/out"]), overwrite=True)
        generated = len((Path(tmp) / "out" / "predictions-test.jsonl").read_text(encoding="utf-8").splitlines())
    m = summary["metrics"]["test"]
    return {"examples": summary["train_examples"], "train_s": summary["train_seconds"], "tokens": summary["train_tokens"],
            "padded_tokens": summary["train_padded_tokens"], "trainable_params": summary["trainable_params"],
            "generate_s": summary["eval_seconds"]["test"], "generated": generated, "rouge1": m["rouge1"], "rougeL": m["rougeL"],
            "words": m["gen_words"], "evals": []}


def worker_trainer_s2s(args) -> dict:
    """The BERT2BERT recipe of the transformers docs, by hand: EncoderDecoderModel.from_encoder_decoder_pretrained +
    get_peft_model (the same LoRA, the same new modules trained in full) + Seq2SeqTrainer(predict_with_generate)."""
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, EncoderDecoderModel, Seq2SeqTrainer, Seq2SeqTrainingArguments

    from peftlab import load_recipe, load_splits
    from peftlab.bases import resolve_model_path
    from peftlab.metrics import rouge_metrics

    recipe = load_recipe(S2S_RECIPE, s2s_overrides(args))
    splits, _ = load_splits(recipe)  # the very rows peftlab trains and generates on
    path = resolve_model_path("minilm")
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(recipe.train.seed)
    model = EncoderDecoderModel.from_encoder_decoder_pretrained(path, path)
    for cfg in (model.config, model.generation_config):
        cfg.decoder_start_token_id, cfg.bos_token_id = tok.cls_token_id, tok.cls_token_id
        cfg.eos_token_id, cfg.pad_token_id = tok.sep_token_id, tok.pad_token_id
    a = recipe.adapter
    model = get_peft_model(model, LoraConfig(task_type="SEQ_2_SEQ_LM", r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout,
                                             target_modules=a.target_modules, modules_to_save=["crossattention", "predictions.transform"]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def encode(batch):
        x = tok(batch["text"], truncation=True, max_length=recipe.data.max_length)
        x["labels"] = tok(text_target=batch["target"], truncation=True, max_length=recipe.data.max_target_length)["input_ids"]
        return x

    train_ds = splits["train"].map(encode, batched=True, remove_columns=splits["train"].column_names)
    test_ds = splits["test"].map(encode, batched=True, remove_columns=splits["test"].column_names)
    real_tokens, padded_tokens = count_tokens(model)  # of the source (encoder input), as peftlab counts them
    t = recipe.train
    targs = Seq2SeqTrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=t.batch_size,
                                     per_device_eval_batch_size=recipe.eval.batch_size, learning_rate=t.lr, weight_decay=t.weight_decay,
                                     warmup_steps=int(t.warmup_fraction * t.max_steps), lr_scheduler_type="linear", max_steps=t.max_steps,
                                     eval_strategy="no", save_strategy="no", report_to="none", seed=t.seed, use_cpu=True,
                                     disable_tqdm=True, predict_with_generate=True, bf16=args.precision == "bf16")
    clock = trainer_clock()
    trainer = Seq2SeqTrainer(model=model, args=targs, train_dataset=train_ds, data_collator=DataCollatorForSeq2Seq(tok), callbacks=[clock])
    trainer.train()
    train_s = clock.last - clock.t0
    e = recipe.eval
    t0 = time.perf_counter()
    out = trainer.predict(test_ds, max_new_tokens=e.max_new_tokens, num_beams=e.num_beams, length_penalty=e.length_penalty,
                          no_repeat_ngram_size=e.no_repeat_ngram_size, early_stopping=True)
    generate_s = time.perf_counter() - t0
    preds = [x.strip() for x in tok.batch_decode(np.where(out.predictions < 0, tok.pad_token_id, out.predictions), skip_special_tokens=True)]
    m = rouge_metrics(preds, list(splits["test"]["target"]))
    return {"examples": t.max_steps * t.batch_size, "train_s": train_s, "tokens": int(real_tokens), "padded_tokens": int(padded_tokens),
            "trainable_params": trainable, "generate_s": generate_s, "generated": len(preds), "rouge1": m["rouge1"],
            "rougeL": m["rougeL"], "words": sum(len(x.split()) for x in preds) / len(preds), "evals": []}


def worker_tokenize(args) -> dict:
    """Tokenization of the train subset: cold (empty datasets cache) vs a second run (cached on disk)."""
    import datasets

    from peftlab import build_data, load_recipe, load_splits
    from peftlab.bases import load_tokenizer, resolve_model_path

    with tempfile.TemporaryDirectory() as cache:
        datasets.config.HF_DATASETS_CACHE = Path(cache)
        recipe = load_recipe(RECIPE, common_overrides(args))
        out = {}
        for name in ("cold", "cached"):
            splits, labels = load_splits(recipe)
            tok = load_tokenizer(resolve_model_path("minilm"), recipe)
            t0 = time.perf_counter()
            build_data(recipe, tok, splits=splits, label_names=labels)
            out[f"{name}_s"] = time.perf_counter() - t0
    return out


LARGE = dict(hidden_size=1536, num_hidden_layers=24, num_attention_heads=24, intermediate_size=6144)  # ~0.73B parameters


def worker_build_large(args, extra: list[str]) -> dict:
    """A BERT encoder of LARGE's shape (random init, seeded) with MiniLM's vocabulary, saved to extra[0] as safetensors."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from peftlab.bases import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tok.vocab_size, **LARGE))
    model.save_pretrained(extra[0])
    tok.save_pretrained(extra[0])
    return {"params": sum(p.numel() for p in model.parameters())}


def worker_eval(args) -> dict:
    """One model, the dev split, evaluated two ways: peftlab's (sorted by length, batch 128) and a plain loader (batch 32)."""
    from torch.utils.data import DataLoader

    from peftlab import build_data, build_model, load_recipe, load_splits
    from peftlab.accel import make_accelerator
    from peftlab.tasks import get_task
    from peftlab.train import eval_loader

    recipe = load_recipe(RECIPE, [o for o in common_overrides(args) if not o.startswith("data.eval.max_samples")])
    splits, labels = load_splits(recipe)
    model, tok, _ = build_model(recipe, num_labels=2, label_names=labels)
    data = build_data(recipe, tok, splits=splits, label_names=labels)
    acc = make_accelerator(recipe, "fp32")
    model = acc.prepare_model(model, evaluation_mode=True)
    task, out = get_task("classification"), {}
    for name, loader in [("sorted_b128", eval_loader(data.eval, 128, data.collate)),
                         ("unsorted_b32", DataLoader(data.eval, batch_size=32, collate_fn=data.collate))]:
        task.evaluate(model, loader, acc, labels)  # warm-up
        t0 = time.perf_counter()
        metrics, _ = task.evaluate(model, loader, acc, labels)
        out[f"{name}_s"], out[f"{name}_accuracy"] = time.perf_counter() - t0, metrics["accuracy"]
    out["rows"] = len(data.eval)
    return out


# ------------------------------------------------------------------------------------------------ measurements in the parent


def flops_per_token(length: float, trainable_base: bool) -> float:
    """Training FLOPs per token of MiniLM-L6-H384 at sequence length `length` (LoRA: no weight gradients for the frozen
    matmuls, so 4x the weight FLOPs instead of 6x; attention scores and mixing: 4*L*d per layer forward, 3x with backward)."""
    from transformers import AutoConfig

    from peftlab.bases import resolve_model_path

    c = AutoConfig.from_pretrained(resolve_model_path("minilm"))
    d, ff, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    weights = layers * (4 * d * d + 2 * d * ff)  # q, k, v, o, and the two FFN matmuls
    return (6 if trainable_base else 4) * weights + 3 * layers * 4 * length * d


def spawn(args, kind: str, extra: list[str]) -> dict:
    """Run one worker in its own process; -> its result plus peak RSS (MiB) and process wall time."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_file = f.name
    cmd = [sys.executable, __file__, "--worker", kind, "--result", result_file, *argv_of(args), "--", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=None if args.verbose else subprocess.DEVNULL,
                          stderr=None if args.verbose else subprocess.PIPE, text=True)
    if proc.returncode:
        raise SystemExit(f"{kind} {extra} failed (exit {proc.returncode}):\n{(proc.stderr or '')[-3000:]}")
    result = json.loads(Path(result_file).read_text())
    os.unlink(result_file)
    return {**result, "process_s": time.perf_counter() - start}


def argv_of(args) -> list[str]:
    return [f"--rows={args.rows}", f"--eval-rows={args.eval_rows or 0}", f"--steps={args.steps}", f"--eval-every={args.eval_every}",
            f"--seed={args.seed}", f"--s2s-rows={args.s2s_rows}", f"--s2s-steps={args.s2s_steps}", f"--s2s-test={args.s2s_test}",
            f"--precision={args.precision}"]


def derive(r: dict, target: float, length_of_tokens: float, trainable_base: bool, peak: float) -> dict:
    """examples/s, real tokens/s, time to the target accuracy, MFU (real tokens) and hardware-FLOPs utilisation (padded)."""
    tokens_per_s = r["tokens"] / r["train_s"]
    reached = next((e for e in r["evals"] if e["accuracy"] >= target), None)
    flops = flops_per_token(length_of_tokens, trainable_base)
    out = {"examples_per_s": r["examples"] / r["train_s"], "tokens_per_s": tokens_per_s,
           "time_to_target_s": reached["train_s"] if reached else None, "mfu": tokens_per_s * flops / (peak * 1e9)}
    if r.get("padded_tokens"):
        out["hfu"] = r["padded_tokens"] / r["train_s"] * flops / (peak * 1e9)
    return out


def against_highest_peak(rows: list[dict], peaks: list[dict]) -> float:
    """Restate the MFU and HFU of `rows` (this invocation's) against the highest of the GEMM peaks measured so far; each
    row keeps the peak it is stated against in `gemm_peak_gflops`. A dip of the shared host while the peak was measured
    would otherwise flatter every MFU measured against it. -> that highest peak."""
    peak = max(g["peak_gflops"] for g in peaks)
    for row in rows:
        scale = row["gemm_peak_gflops"] / peak
        for key in ("mfu", "hfu"):
            if key in row:
                row[key] *= scale
        row["gemm_peak_gflops"] = peak
    return peak


def derive_s2s(r: dict) -> dict:
    """samsum case: training examples/s and source tokens/s, generated summaries/s."""
    return {"examples_per_s": r["examples"] / r["train_s"], "tokens_per_s": r["tokens"] / r["train_s"],
            "generated_per_s": r["generated"] / r["generate_s"]}


SIZES = {"rows": 8000, "eval_rows": 0, "steps": 200, "eval_every": 50, "s2s_rows": 960, "s2s_steps": 60, "s2s_test": 64}
QUICK = {"rows": 640, "eval_rows": 200, "steps": 20, "eval_every": 10, "s2s_rows": 64, "s2s_steps": 4, "s2s_test": 8}  # --quick's


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=None, help="SST-2 train rows (seeded subset; default 8000, --quick 640)")
    p.add_argument("--eval-rows", type=int, default=None, help="dev rows (0 = all 872; default 0, --quick 200)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (batch 32; default 200, --quick 20)")
    p.add_argument("--eval-every", type=int, default=None, help="steps between dev evaluations (default 50, --quick 10)")
    p.add_argument("--target", type=float, default=0.80, help="dev accuracy for the time-to-target column")
    p.add_argument("--repeats", type=int, default=1, help="alternating peftlab/Trainer pairs per case; pair i uses seed --seed + i")
    p.add_argument("--seed", type=int, default=42, help="training seed of the first pair (both sides)")
    p.add_argument("--name", default=None, help="results file stem (default: throughput, or throughput-quick)")
    p.add_argument("--cases", default=f"lora,qlora,qlora-ckpt,{S2S_CASE},{MEMORY_CASE}",
                   help=f"comma list of {', '.join([*CASES, S2S_CASE, MEMORY_CASE])}")
    p.add_argument("--memory-steps", type=int, default=3, help=f"{MEMORY_CASE} case: optimizer steps of each run")
    p.add_argument("--s2s-rows", type=int, default=None, help="samsum case: SAMSum train rows (default 960, --quick 64)")
    p.add_argument("--s2s-steps", type=int, default=None, help="samsum case: optimizer steps (batch 16; default 60, --quick 4)")
    p.add_argument("--s2s-test", type=int, default=None, help="samsum case: test rows summarised (beam search) after training "
                   "(default 64, --quick 8)")
    p.add_argument("--add", action="store_true", help="add to the stored results (same sizes) instead of starting afresh")
    p.add_argument("--report", action="store_true", help="rewrite --name's table (.md) from its stored results (no training)")
    p.add_argument("--no-ablations", action="store_true")
    p.add_argument("--ablations", default=",".join(ABLATIONS), help=f"comma list of {', '.join(ABLATIONS)} (default: all); "
                   "each runs once per --repeats seed, after that seed's cases")
    p.add_argument("--ablation-steps", type=int, default=None, help="steps of each ablation run (default: --steps; bf16 runs 1/10th)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="both sides train in it (auto: peftlab's choice for this machine: bf16 where matmuls are native)")
    p.add_argument("--quick", action="store_true", help="tiny sizes where none is given: checks the pipeline in a few minutes")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("extra", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    # --quick fills only the sizes not given (it replaced --rows/--steps/... given with its own, and recorded those)
    fill_unset(args, QUICK if args.quick else SIZES)
    # checked before any work: --repeats 0 measured nothing and replaced the stored results with an empty table; --steps 0, --threads 0
    # and --eval-every 0 failed with a traceback after (or on) the first GEMM peak / training run
    check_counts(p, (("--rows", args.rows, "at least 1 SST-2 train row"), ("--steps", args.steps, "at least 1 optimizer step"),
                    ("--eval-every", args.eval_every, "at least 1 step between evaluations"),
                    ("--repeats", args.repeats, "at least 1 peftlab/Trainer pair per case"),
                    ("--threads", args.threads, "at least 1 torch thread"),
                    ("--memory-steps", args.memory_steps, "at least 1 optimizer step"),
                    ("--s2s-rows", args.s2s_rows, "at least 1 SAMSum train row"), ("--s2s-steps", args.s2s_steps, "at least 1 step"),
                    ("--s2s-test", args.s2s_test, "at least 1 SAMSum test row")))
    if args.eval_rows < 0:
        p.error(f"--eval-rows {args.eval_rows}: give at least 1 dev row, or 0 for all 872")
    if args.ablation_steps is not None and args.ablation_steps < 1:
        p.error(f"--ablation-steps {args.ablation_steps}: give at least 1 step, or leave it out for --steps (bf16 runs 1/10th)")
    if not 0 < args.target <= 1:
        p.error(f"--target {args.target:g}: give a dev accuracy > 0 and <= 1 (e.g. 0.80)")

    if args.precision == "auto":
        from peftlab.accel import resolve_precision

        args.precision = resolve_precision("auto")
    if args.worker:  # child process
        import resource

        fn = {"peftlab": lambda: worker_peftlab(args, args.extra), "trainer": lambda: worker_trainer(args, args.extra),
              "peftlab-s2s": lambda: worker_peftlab_s2s(args), "trainer-s2s": lambda: worker_trainer_s2s(args),
              "build-large": lambda: worker_build_large(args, args.extra),
              "tokenize": lambda: worker_tokenize(args), "eval": lambda: worker_eval(args)}[args.worker]
        result = fn()
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        Path(args.result).write_text(json.dumps(result))
        return

    name = args.name or ("throughput-quick" if args.quick else "throughput")
    if unknown := [c for c in args.cases.split(",") if c not in (*CASES, S2S_CASE, MEMORY_CASE)]:  # (a typo ran as plain LoRA)
        raise SystemExit(f"unknown case(s) {unknown}: choose from {', '.join([*CASES, S2S_CASE, MEMORY_CASE])}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    store = RESULTS / f"{name}.json"
    if args.report or args.add:
        if not store.is_file():
            raise SystemExit(f"--{'report' if args.report else 'add'}: no stored results {store}.")
        old = json.loads(store.read_text())
        if args.report:  # the stored sizes, not the defaults
            stored_args = argparse.Namespace(**{**vars(args), **old["config"]})
            text = table(stored_args, old["gemm"], old["rows"], {k: old[k] for k in ("tokenize", "eval") if k in old})
            write_result(RESULTS / f"{name}.md", text + "\n")  # the results themselves stay as measured
            print(text)
            return
        if differs := {k: (v, getattr(args, k)) for k, v in old["config"].items() if hasattr(args, k) and getattr(args, k) != v}:
            raise SystemExit(f"--add: {store} was measured with other settings ({', '.join(f'{k}: stored {a!r}, now {b!r}' for k, (a, b) in differs.items())}"
                             "): a table mixing them would compare unlike runs. Give the same settings, or another --name.")
    print(f"GEMM peak at {args.threads} thread(s)...", flush=True)
    peaks = [gemm_peak(args.threads, args.precision)]  # measured again after every run; MFU is against the highest
    print(json.dumps(peaks[0]), flush=True)
    length = mean_length(args)
    rows, mine, extras = [], [], {}
    gemm = dict(peaks[0], peaks_measured=[peaks[0]["peak_gflops"]])
    if args.add and store.is_file():  # each row keeps the MFU computed against its own invocation's GEMM peak
        old = json.loads(store.read_text())
        rows, extras = old["rows"], {k: old[k] for k in ("tokenize", "eval") if k in old}
        gemm = old["gemm"]

    def record(case: str, side: str, extra: list[str], trainable_base: bool = False, steps: int | None = None, seed: int | None = None,
               info: dict | None = None) -> dict:
        run_args = argparse.Namespace(**{**vars(args), "steps": steps or args.steps, "seed": args.seed if seed is None else seed})
        print(f"[{case} / {side}, seed {run_args.seed}] {' '.join(extra)}", flush=True)
        s2s, memory = case == S2S_CASE, case == MEMORY_CASE
        r = spawn(run_args, ("trainer" if side == "Trainer+peft" else "peftlab") + ("-s2s" if s2s else ""), extra)
        peaks.append(gemm_peak(args.threads, args.precision))  # right after the run, so a dip at the start cannot flatter
        peak = against_highest_peak(mine, peaks)
        if not args.add:
            gemm.update(max(peaks, key=lambda g: g["peak_gflops"]), peaks_measured=[g["peak_gflops"] for g in peaks])
        r = {"case": case, "side": side, "overrides": extra, "steps": args.s2s_steps if s2s else run_args.steps, "seed": run_args.seed,
             "gemm_peak_gflops": peak, **(info or {}), **r}
        if memory:  # speed of a random-init model is not the point; its MFU would need its own FLOP count
            print(f"    peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
        elif s2s:
            r.update(derive_s2s(r))
            print(f"    {r['examples_per_s']:.2f} ex/s, {r['tokens_per_s']:.0f} source tok/s, generation {r['generated_per_s']:.2f} rows/s, "
                  f"ROUGE-1 {100 * r['rouge1']:.2f}, RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
        else:
            r.update(derive(r, args.target, length, trainable_base, peak))
            print(f"    {r['examples_per_s']:.1f} ex/s, {r['tokens_per_s']:.0f} real tok/s, acc {r['accuracy']:.4f}, "
                  f"RSS {r['peak_rss_mib']:.0f} MiB, MFU {100 * r['mfu']:.1f}%", flush=True)
        rows.append(r)
        mine.append(r)
        save(name, args, gemm, length, rows, extras, final=False)
        return r

    ablations = [] if args.no_ablations else [a.strip() for a in args.ablations.split(",") if a.strip()]
    unknown = [a for a in ablations if a not in ABLATIONS]
    if unknown:
        raise SystemExit(f"unknown ablation(s) {unknown}: choose from {', '.join(ABLATIONS)}")
    for i in range(args.repeats):  # seed + i: each case's peftlab/Trainer pair, then the ablations, so drift hits all alike
        for case in (c for c in args.cases.split(",") if c != MEMORY_CASE):
            peftlab_side, trainer_side = CASES.get(case, ([], []))  # (the samsum case: its own workers)
            record(case, "peftlab", peftlab_side, seed=args.seed + i)
            record(case, "Trainer+peft", trainer_side, seed=args.seed + i)
        for label in ablations:
            overrides, _, share = ABLATIONS[label]
            steps = args.ablation_steps or (args.steps if share == 1 else max(int(args.steps * share), 5))
            record(f"ablation: {label}", "peftlab", overrides, steps=steps, seed=args.seed + i)
    if MEMORY_CASE in args.cases.split(","):  # LoRA vs QLoRA peak RSS where the weights, not the runtime, fill memory
        with tempfile.TemporaryDirectory() as tmp:
            print(f"[{MEMORY_CASE}] building a {LARGE} BERT from its config...", flush=True)
            params = spawn(args, "build-large", [tmp])["params"]
            for method, overrides in MEMORY_SIDES.items():
                record(MEMORY_CASE, f"peftlab {method}", [*overrides, f"model.name={tmp}", *MEMORY_OVERRIDES], steps=args.memory_steps,
                       info={"params": params})
    if not args.no_ablations:
        print("[tokenization cold vs cached]", flush=True)
        extras["tokenize"] = spawn(args, "tokenize", [])
        print("[evaluation sorted/b128 vs unsorted/b32]", flush=True)
        extras["eval"] = spawn(args, "eval", [])
    save(name, args, gemm, length, rows, extras)
    print((RESULTS / f"{name}.md").read_text())


def mean_length(args) -> float:
    """Mean real tokens per training row of the subset (for the attention term of the FLOP count)."""
    from peftlab import build_data, load_recipe, load_splits
    from peftlab.bases import load_tokenizer, resolve_model_path

    recipe = load_recipe(RECIPE, common_overrides(args))
    splits, labels = load_splits(recipe)
    data = build_data(recipe, load_tokenizer(resolve_model_path("minilm"), recipe), splits=splits, label_names=labels)
    lengths = data.train["length"]
    return sum(lengths) / len(lengths)


def save(name: str, args, gemm: dict, length: float, rows: list[dict], extras: dict, final: bool = True) -> None:
    """The results so far into NAME.partial.json after each run; the stored NAME.json, .md and .png are replaced only
    when the invocation finishes (final): an interrupted or failed one leaves them as they were."""
    config = {k: getattr(args, k) for k in ("rows", "eval_rows", "steps", "eval_every", "target", "threads", "quick", "s2s_rows",
                                            "s2s_steps", "s2s_test", "precision")}
    text = json.dumps({"config": config, "provenance": provenance(), "gemm": gemm, "mean_tokens_per_row": length, "rows": rows,
                       **extras}, indent=2)
    partial = RESULTS / f"{name}.partial.json"
    if not final:
        write_result(partial, text)
        return
    write_result(RESULTS / f"{name}.json", text)
    write_result(RESULTS / f"{name}.md", table(args, gemm, rows, extras) + "\n")
    if rows:
        plot(rows, RESULTS / f"{name}.png", args)
    partial.unlink(missing_ok=True)


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def time_to_target_ratio(rows: list[dict], case: str) -> str:
    """peftlab / Trainer time to the target accuracy over the seeds where both sides reached it (paired: a seed only one
    side reached has no ratio), with how many seeds that is when not all."""
    t = {(r["side"], r.get("seed", 42)): r.get("time_to_target_s") for r in rows if r["case"] == case}
    seeds = sorted({s for _, s in t})
    both = [s for s in seeds if t.get(("peftlab", s)) and t.get(("Trainer+peft", s))]
    if not both:
        return "-"
    ratio = mean([t[("peftlab", s)] for s in both]) / mean([t[("Trainer+peft", s)] for s in both])
    return f"{ratio:.2f}" + (f" ({len(both)} of {len(seeds)} seeds: both reached)" if len(both) < len(seeds) else "")


def accuracy_difference(rows: list[dict], case: str) -> str:
    """peftlab - Trainer final accuracy in points, paired by seed: the mean, and with several seeds its standard error."""
    acc = {(r["side"], r.get("seed", 42)): r["accuracy"] for r in rows if r["case"] == case}
    diffs = [100 * (acc[("peftlab", s)] - acc[("Trainer+peft", s)]) for side, s in acc if side == "peftlab" and ("Trainer+peft", s) in acc]
    if len(diffs) < 2:
        return f"{diffs[0]:+.2f}" if diffs else "-"
    m = sum(diffs) / len(diffs)
    se = (sum((d - m) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs)) ** 0.5
    return f"{m:+.2f} ± {se:.2f} ({len(diffs)} seeds: {', '.join(f'{d:+.2f}' for d in diffs)})"


def ablation_table(rows: list[dict]) -> list[str]:
    """Each ablation against peftlab's defaults (the peftlab side of the lora or lora-grouped case): tokens/s paired by
    seed where the default ran at that seed, else against the defaults' mean."""
    default = [r for r in rows if r["case"] in ("lora", "lora-grouped") and r["side"] == "peftlab"]
    ablations = [r for r in rows if r["case"].startswith("ablation")]
    if not (ablations and default):
        return []
    by_seed = {r.get("seed", 42): r["tokens_per_s"] for r in default}
    fallback = mean(by_seed.values())
    lines = ["", "| ablation (one switch vs the peftlab defaults) | steps | seeds | real tokens/s | vs default | final dev acc |",
             "|---|---|---|---|---|---|"]
    for label in dict.fromkeys(r["case"].removeprefix("ablation: ") for r in ablations):
        rs = [r for r in ablations if r["case"] == f"ablation: {label}"]
        ratio = mean([r["tokens_per_s"] / by_seed.get(r.get("seed", 42), fallback) for r in rs])
        what = ABLATIONS[label][1] if label in ABLATIONS else "no longer run"
        lines.append(f"| {label} ({what}) | {rs[0]['steps']} | {len(rs)} | {mean([r['tokens_per_s'] for r in rs]):.0f} "
                     f"| {ratio:.2f}x | {100 * mean([r['accuracy'] for r in rs]):.2f} |")
    return lines


def s2s_table(args, rows: list[dict]) -> list[str]:
    """The samsum case: training speed, then generation speed and ROUGE of the trained model, per side and as ratios."""
    if not rows:
        return []
    lines = ["", f"SAMSum, MiniLM BERT2BERT + LoRA: {args.s2s_steps} steps x batch 16 from {args.s2s_rows} train rows, then "
                 f"{args.s2s_test} test rows summarised (beam search as in recipes/minilm/samsum-lora.yaml).", "",
             "| side | train examples/s | source tokens/s | padded / real source tokens | summaries/s | words / summary | test ROUGE-1 "
             "| trainable params | peak RSS (MiB) |", "|---|---|---|---|---|---|---|---|---|"]
    sides = {}
    for side in ("peftlab", "Trainer+peft"):
        rs = [r for r in rows if r["side"] == side]
        if rs:
            s = sides[side] = {k: mean([r[k] for r in rs]) for k in ("examples_per_s", "tokens_per_s", "generated_per_s", "rouge1",
                                                                      "peak_rss_mib", "trainable_params", "words")}
            pad = mean([r["padded_tokens"] / r["tokens"] for r in rs])
            lines.append(f"| {side} | {s['examples_per_s']:.2f} | {s['tokens_per_s']:.0f} | {pad:.2f} | {s['generated_per_s']:.2f} "
                         f"| {s['words']:.1f} | {100 * s['rouge1']:.2f} | {s['trainable_params']:,.0f} | {s['peak_rss_mib']:.0f} |")
    if len(sides) == 2:
        a, b = sides["peftlab"], sides["Trainer+peft"]
        lines.append(f"\nsamsum ratios (peftlab / Trainer): training tokens/s {a['tokens_per_s'] / b['tokens_per_s']:.2f}x, generation "
                     f"{a['generated_per_s'] / b['generated_per_s']:.2f}x, peak RSS {a['peak_rss_mib'] / b['peak_rss_mib']:.2f}; "
                     f"ROUGE-1 difference {100 * (a['rouge1'] - b['rouge1']):+.2f} points.")
    return lines


def table(args, gemm: dict, rows: list[dict], extras: dict) -> str:
    cases = [c for c in dict.fromkeys(r["case"] for r in rows) if not c.startswith("ablation") and c not in (S2S_CASE, MEMORY_CASE)]
    lines = [f"Machine: {gemm.get('precision', 'fp32')} GEMM peak {gemm['peak_gflops']:.1f} GFLOP/s at {args.threads} thread(s) "
             f"(MiniLM FFN shape: {gemm['ffn_512x384x1536']:.1f}). {args.steps} steps x batch 32, "
             f"{args.rows} SST-2 train rows, dev accuracy target {args.target:.2f}."]
    if cases:  # (a run of the memory case alone has none)
        lines += ["", "| case | side | examples/s | real tokens/s | time to target (s) | final dev acc | peak RSS (MiB) | MFU | HFU (padded) |",
                  "|---|---|---|---|---|---|---|---|---|"]

    def fmt(v, f):
        return "-" if v is None else format(v, f)

    summary = {}
    for case in cases:
        for side in ("peftlab", "Trainer+peft"):
            rs = [r for r in rows if r["case"] == case and r["side"] == side]
            if not rs:
                continue
            s = {k: mean([r.get(k) for r in rs]) for k in ("examples_per_s", "tokens_per_s", "time_to_target_s", "accuracy",
                                                             "peak_rss_mib", "mfu", "hfu")}
            summary[(case, side)] = s
            reached = sum(r.get("time_to_target_s") is not None for r in rs)  # a seed that never reached it is no time
            ttt = fmt(s["time_to_target_s"], ".0f") + (f" ({reached} of {len(rs)} seeds reached)" if reached < len(rs) else "")
            lines.append(f"| {case} | {side} | {s['examples_per_s']:.1f} | {s['tokens_per_s']:.0f} | {ttt} "
                         f"| {100 * s['accuracy']:.2f} | {s['peak_rss_mib']:.0f} | {fmt(100 * s['mfu'], '.1f')}% "
                         f"| {fmt(s['hfu'] and 100 * s['hfu'], '.1f')}% |")
    if cases:
        lines += ["", "| case | tokens/s ratio (peftlab / Trainer) | time-to-target ratio | accuracy difference (points, paired by seed) "
                  "| RSS ratio |", "|---|---|---|---|---|"]
    for case in cases:
        a, b = summary.get((case, "peftlab")), summary.get((case, "Trainer+peft"))
        if a and b:
            lines.append(f"| {case} | {a['tokens_per_s'] / b['tokens_per_s']:.2f}x | {time_to_target_ratio(rows, case)} "
                         f"| {accuracy_difference(rows, case)} | {a['peak_rss_mib'] / b['peak_rss_mib']:.2f} |")
    for q in ("qlora", "qlora-ckpt"):
        if (q, "peftlab") in summary and ("lora", "peftlab") in summary:
            lines.append(f"\n{q} / lora peak RSS (peftlab): {summary[(q, 'peftlab')]['peak_rss_mib'] / summary[('lora', 'peftlab')]['peak_rss_mib']:.2f}")
    lines += ablation_table(rows)
    lines += s2s_table(args, [r for r in rows if r["case"] == S2S_CASE])
    memory = {r["side"].removeprefix("peftlab "): r for r in rows if r["case"] == MEMORY_CASE}
    if "lora" in memory:
        lines.append(f"\n{MEMORY_CASE}: a {memory['lora']['params'] / 1e9:.2f}B-parameter BERT built from a config ({LARGE}), "
                     f"{memory['lora']['steps']} steps x batch 16 each (QLoRA: NF4, double quant; -ckpt: activation checkpointing):")
        for lora, qlora in (("lora", "qlora"), ("lora-ckpt", "qlora-ckpt"), ("lora", "qlora-keep"), ("lora-release", "qlora")):
            if {lora, qlora} <= set(memory):
                a, b = memory[lora]["peak_rss_mib"], memory[qlora]["peak_rss_mib"]
                lines.append(f"- peak RSS {lora} {a:.0f} MiB, {qlora} {b:.0f} MiB: QLoRA / LoRA {b / a:.2f}")
        lines.append("- training seconds per step (the first, cold step included): "
                     + ", ".join(f"{k} {r['train_s'] / r['steps']:.2f}" for k, r in memory.items()))
    if "tokenize" in extras:
        t = extras["tokenize"]
        lines.append(f"\nTokenization of {args.rows} rows: cold {t['cold_s']:.2f} s, cached {t['cached_s']:.2f} s ({t['cold_s'] / t['cached_s']:.1f}x).")
    if "eval" in extras:
        e = extras["eval"]
        lines.append(f"Evaluation of {e['rows']} dev rows: sorted by length, batch 128: {e['sorted_b128_s']:.2f} s; unsorted, batch 32: "
                     f"{e['unsorted_b32_s']:.2f} s ({e['unsorted_b32_s'] / e['sorted_b128_s']:.1f}x); accuracies {e['sorted_b128_accuracy']:.4f} "
                     f"/ {e['unsorted_b32_accuracy']:.4f}.")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, args) -> None:
    """One panel per kind of result present: training tokens/s (classification cases and ablations), SAMSum speed
    relative to the Trainer, and the memory case's peak RSS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[float]] = {}
    for r in rows:
        if r["case"] not in (S2S_CASE, MEMORY_CASE):
            label = r["case"].removeprefix("ablation: ") if r["case"].startswith("ablation") else f"{r['case']}\n{r['side']}"
            groups.setdefault(label, []).append(r["tokens_per_s"])
    s2s = [r for r in rows if r["case"] == S2S_CASE]
    memory = {r["side"].removeprefix("peftlab "): r["peak_rss_mib"] for r in rows if r["case"] == MEMORY_CASE}
    widths = [w for w, present in ((max(len(groups), 1), groups), (3, s2s), (3, memory)) if present] or [1]
    fig, axes = plt.subplots(1, len(widths), figsize=(max(8, 1.1 * len(groups)) + 5 * (len(widths) - 1), 4.5), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    panels = iter(axes[0])
    if groups:
        ax, labels = next(panels), list(groups)
        colors = ["tab:blue" if "peftlab" in k else "tab:gray" if "Trainer" in k else "tab:orange" for k in labels]
        bars = ax.bar(range(len(labels)), [mean(v) for v in groups.values()], color=colors)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=30, ha="right")
        ax.set_ylabel("training: real (non-pad) tokens/s")
        ax.set_title(f"MiniLM on SST-2, {args.steps} steps x 32, {args.threads} CPU thread(s): peftlab (blue) vs Trainer+peft "
                     "(gray), ablations (orange)", fontsize=9)
    if s2s:  # SAMSum: training and generation speed of each side, relative to the Trainer's
        ax = next(panels)
        sides = [side for side in ("peftlab", "Trainer+peft") if any(r["side"] == side for r in s2s)]
        for i, side in enumerate(sides):
            vals = [mean([r[k] for r in s2s if r["side"] == side]) / mean([r[k] for r in s2s if r["side"] == sides[-1]])
                    for k in ("tokens_per_s", "generated_per_s")]
            bars = ax.bar([j + 0.4 * i for j in range(2)], vals, 0.4, label=side, color="tab:blue" if side == "peftlab" else "tab:gray")
            ax.bar_label(bars, fmt="%.2fx", fontsize=8)
        ax.set_xticks([0.2, 1.2], ["training\n(source tokens/s)", "generation\n(summaries/s)"], fontsize=8)
        ax.set_ylabel("speed relative to Trainer+peft")
        ax.set_title("SAMSum, BERT2BERT + LoRA", fontsize=9)
        ax.legend(fontsize=8)
    if memory:  # the 0.73B base: LoRA vs QLoRA, with and without activation checkpointing
        ax = next(panels)
        bars = ax.bar(range(len(memory)), list(memory.values()), color=["tab:red" if "qlora" in k else "tab:blue" for k in memory])
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_xticks(range(len(memory)), list(memory), fontsize=8)
        ax.set_ylabel("peak RSS (MiB)")
        ax.set_title(f"{MEMORY_CASE}: a 0.73B BERT, LoRA vs QLoRA", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
