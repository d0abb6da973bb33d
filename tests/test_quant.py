"""bitsandbytes on CPU: QLoRA really trains (also after an evaluation pass), the head stays full precision,
and merging a quantized run goes through a dequantized copy whose logits equal the adapter model's."""

from __future__ import annotations

import contextlib
import gc
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import peftlab.model
from peftlab import build_data, build_model, load_splits, load_trained, merge, run

from .conftest import REPO, assert_resume_is_uninterrupted, logits

bnb = pytest.importorskip("bitsandbytes")


def lora_grads(model) -> list[float]:
    return [p.grad.abs().sum().item() if p.grad is not None else 0.0 for n, p in model.named_parameters() if "lora_" in n]


def fixed_batch_losses(model, batch: dict, steps: int, bf16: bool = False) -> list[float]:
    """AdamW (lr 1e-2) on the trainable parameters, `steps` steps on one batch (under bf16 autocast with `bf16`) -> the
    loss of each step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_qlora_on_a_llama_classifier_keeps_its_new_score_head_out_of_quantization(make_recipe, tiny_llama, mode):
    """A decoder LLM with a sequence-classification head (issue 18): the base quantized, the new `score` head a plain
    trainable Linear (a quantized random head could not train), and the loss falls."""
    recipe = make_recipe({"quant.mode": mode, "train.lr": 1e-2}, model=tiny_llama)
    splits, names = load_splits(recipe)
    model, tok, info = build_model(recipe, num_labels=2, label_names=names)
    layer = bnb.nn.Linear4bit if mode == "4bit" else bnb.nn.Linear8bitLt
    assert sum(isinstance(m, layer) for m in model.modules()) >= 14  # 2 layers x 7 projections
    head = model.base_model.model.score.modules_to_save["default"]
    assert type(head) is torch.nn.Linear and head.weight.requires_grad and head.weight.dtype == torch.float32
    data = build_data(recipe, tok, splits=splits, label_names=names)
    losses = fixed_batch_losses(model, data.collate([data.train[i] for i in range(32)]), 15)
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_a_quantized_base_keeps_the_weights_it_did_not_quantize_in_model_dtype(make_recipe, tiny_llama, mode):
    """model.dtype=auto under bf16: the weights left unquantized (embeddings, norms) stay bf16, as in an unquantized
    run (peft's k-bit preparation casts them to float32, which doubles the residual stream's activations), what trains
    is float32, and bf16 training lowers the loss. The default float32 load keeps them float32."""
    def frozen_dtypes(recipe):
        model, tok, _ = build_model(recipe, num_labels=2, label_names=["negative", "positive"], precision="bf16")
        plain = {n: p.dtype for n, p in model.named_parameters()
                 if not p.requires_grad and p.is_floating_point() and not isinstance(p, (bnb.nn.Params4bit, bnb.nn.Int8Params))}
        return model, tok, plain

    recipe = make_recipe({"quant.mode": mode, "model.dtype": "auto", "train.precision": "bf16", "train.lr": 1e-2}, model=tiny_llama)
    model, tok, plain = frozen_dtypes(recipe)
    assert any("embed_tokens" in n for n in plain) and any("norm" in n for n in plain)
    assert set(plain.values()) == {torch.bfloat16}, plain
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    splits, names = load_splits(recipe)
    data = build_data(recipe, tok, splits=splits, label_names=names)
    losses = fixed_batch_losses(model, data.collate([data.train[i] for i in range(32)]), 15, bf16=True)
    assert losses[-1] < losses[0] - 0.05, losses

    _, _, plain = frozen_dtypes(make_recipe({"quant.mode": mode}, model=tiny_llama))
    assert set(plain.values()) == {torch.float32}, plain


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_qlora_trains_after_an_eval_pass(make_recipe, mode, caplog):
    recipe = make_recipe({"quant.mode": mode})
    splits, names = load_splits(recipe)
    model, tok, info = build_model(recipe, num_labels=2, label_names=names)
    layer = bnb.nn.Linear4bit if mode == "4bit" else bnb.nn.Linear8bitLt
    quantized = [m for m in model.modules() if isinstance(m, layer)]
    assert quantized, "no quantized layers"
    if mode == "4bit":
        assert all(m.support_avx512bf16_for_cpu is False for m in quantized)  # GUIDE.md trap (b)
    assert not isinstance(model.base_model.model.classifier.modules_to_save["default"], layer)  # trap (a): new head

    data = build_data(recipe, tok, splits=splits, label_names=names)
    batch = data.collate([data.train[i] for i in range(32)])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def steps(k):
        model.train()
        out = []
        for _ in range(k):
            loss = model(**batch).loss
            loss.backward()
            grads = lora_grads(model)
            opt.step()
            opt.zero_grad()
            out.append(loss.item())
        return out, grads

    first, _ = steps(10)
    model.eval()
    with torch.no_grad():  # the pass that, on avx512_bf16 CPUs, used to repack 4-bit weights and stop training
        model(**batch)
    second, grads = steps(10)
    assert all(g > 0 for g in grads), "LoRA grads vanished after the eval pass"
    assert second[-1] < first[0] - 0.01, (first, second)  # the loss keeps moving down on a fixed batch
    assert len(set(round(x, 6) for x in second)) > 5
    assert "MatMul8bitLt" not in caplog.text  # bitsandbytes' line on every 8-bit forward of a float32 input (peftlab/__init__.py)


def checkpoint_ranges(path) -> list[tuple[int, int]]:
    """Address ranges of this process's memory maps of the file `path` (Linux /proc/self/maps)."""
    ranges = []
    for line in open("/proc/self/maps"):
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(path):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads Linux /proc/self/maps")
@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_quantized_base_keeps_no_view_of_the_checkpoint_file(make_recipe, tiny_bert, mode):
    """The weights left unquantized are copied out of the safetensors memory map, so the map (every page of which
    quantization read) is released; a quantized base used to hold the whole fp32 file in the process's memory."""
    recipe = make_recipe({"quant.mode": mode})
    model, _, _ = build_model(recipe, num_labels=2, label_names=["negative", "positive"])
    gc.collect()
    ranges = checkpoint_ranges((tiny_bert / "model.safetensors").resolve())
    inside = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
              if any(lo <= t.untyped_storage().data_ptr() < hi for lo, hi in ranges)]
    assert not inside, f"still views of the checkpoint's memory map: {inside[:5]}"
    unquantized = build_model(make_recipe({}), num_labels=2, label_names=["negative", "positive"])[0]
    ranges = checkpoint_ranges((tiny_bert / "model.safetensors").resolve())  # the check can fail: an fp32 base is a view
    assert any(lo <= p.untyped_storage().data_ptr() < hi for p in unquantized.parameters() for lo, hi in ranges)


@pytest.mark.precision
def test_qlora_run_merges_into_a_dequantized_copy(make_recipe):
    recipe = make_recipe({"quant.mode": "4bit", "train.epochs": 1, "train.lr": 1e-2})
    summary = run(recipe)
    assert summary["quantization"] == "4bit"
    adapter_model, *_ = load_trained(recipe.out)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in adapter_model.modules())
    target = merge(recipe.out)
    merged, *_ = load_trained(target)
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in merged.modules())
    assert merged.config.to_dict().get("quantization_config") is None
    diff = (logits(adapter_model) - logits(merged)).abs().max().item()
    assert diff <= 1e-4, diff


def test_8bit_merge_matches(make_recipe):
    recipe = make_recipe({"quant.mode": "8bit", "train.epochs": 1, "train.lr": 1e-2})
    run(recipe)
    adapter_model, *_ = load_trained(recipe.out)
    merged, *_ = load_trained(merge(recipe.out))
    diff = (logits(adapter_model) - logits(merged)).abs().max().item()
    assert diff <= 1e-3, diff


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_a_quantized_gpt2_style_base_merges_into_a_folder_that_loads(make_recipe, tmp_path, mode):
    """GPT-2's c_attn, c_fc and c_proj are transformers Conv1D layers, (in, out): dequantized they came back as nn.Linear,
    (out, in), and were saved so: the merged folder did not load (c_attn [192, 64] for [64, 192]), and the square
    attn.c_proj would have loaded transposed. They are saved as Conv1D: it loads, with the adapter model's logits."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from .conftest import minilm_tokenizer

    torch.manual_seed(0)
    tok = minilm_tokenizer()
    cfg = GPT2Config(vocab_size=tok.vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=64, pad_token_id=0, bos_token_id=101,
                     eos_token_id=102)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    recipe = make_recipe({"quant.mode": mode, "adapter.target_modules": "[c_attn,c_fc,c_proj]", "train.max_steps": 3,
                          "train.lr": 1e-2, "train.precision": "fp32"}, model=tmp_path / "gpt2")
    run(recipe)
    adapter_model, *_ = load_trained(recipe.out)
    merged, *_ = load_trained(merge(recipe.out))
    assert type(merged.transformer.h[0].attn.c_proj).__name__ == "Conv1D"
    diff = (logits(adapter_model) - logits(merged)).abs().max().item()
    assert diff <= {"4bit": 1e-4, "8bit": 5e-3}[mode], diff  # 8-bit: LLM.int8 also rounds the activations (README: ~2e-3)


def test_ia3_on_a_4bit_base_merges_into_the_dequantized_copy(make_recipe):
    """transformers leaves is_loaded_in_4bit set on the dequantized model, and peft's IA3 refused to merge into it (a
    traceback after training, with export.merge=true). The flags are cleared: it merges, and the logits hold."""
    recipe = make_recipe({"quant.mode": "4bit", "adapter.method": "ia3", "adapter.target_modules": None, "train.max_steps": 3,
                          "train.lr": 5e-2})
    run(recipe)
    adapter_model, *_ = load_trained(recipe.out)
    merged, *_ = load_trained(merge(recipe.out))
    diff = (logits(adapter_model) - logits(merged)).abs().max().item()
    assert diff <= 5e-4, diff  # IA3 scales the input of a 4-bit matmul, merged it scales the dequantized weight: 1.4e-4


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_qlora_mlm_keeps_the_new_mlm_head_out_of_quantization_trains_reloads_and_merges(make_recipe, tmp_path, mode):
    """DAPT on a quantized base: the MLM head the task adds (absent from a BertModel checkpoint, as from MiniLM's) was
    quantized with the base, only a model.from_run base kept its missing layers out, and bitsandbytes failed on the
    first step (4-bit: an assertion on the weight's shape; 8-bit: no attribute CB). Every layer the checkpoint lacks stays
    full precision, as a classifier's head does: it trains, `eval` gives the run's figure, and the merge into the
    dequantized copy gives the adapter model's logits."""
    from peftlab import evaluate

    recipe = make_recipe({"quant.mode": mode, "task.type": "mlm", "data.label_names": None, "data.text_columns": "[sentence]",
                          "train.max_steps": 2, "train.precision": "fp32"})
    model, _, info = build_model(recipe, num_labels=0, label_names=[])
    assert info.head_modules == ["cls.predictions.transform"]
    dense = model.base_model.model.cls.predictions.transform.modules_to_save["default"].dense
    assert type(dense) is torch.nn.Linear and dense.weight.requires_grad
    assert isinstance(model.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer,
                      bnb.nn.Linear4bit if mode == "4bit" else bnb.nn.Linear8bitLt)
    summary = run(recipe)
    again = evaluate(recipe.out, "eval", results_dir=tmp_path / "again")
    assert again["loss"] == pytest.approx(summary.metrics["eval"]["loss"], rel=1e-6)
    adapter_model, *_ = load_trained(recipe.out)
    merged, *_ = load_trained(merge(recipe.out))
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in merged.modules())
    diff = (logits(adapter_model) - logits(merged)).abs().max().item()
    assert diff <= {"4bit": 1e-4, "8bit": 5e-3}[mode], diff


def test_fsdp_packs_4bit_weights_in_the_model_dtype(monkeypatch):
    """FSDP flattens float tensors of one dtype only: under it, 4-bit storage follows model.dtype (uint8 otherwise)."""
    from peftlab import load_recipe
    from peftlab.model import quantization_config

    recipe = load_recipe(None, ["quant.mode=4bit", "model.dtype=bfloat16"], validate_files=False)
    assert quantization_config(recipe, "bf16", ["classifier"]).bnb_4bit_quant_storage == torch.uint8
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert quantization_config(recipe, "bf16", ["classifier"]).bnb_4bit_quant_storage == torch.bfloat16


QUANT = {  # id -> recipe overrides
    "8bit": {"quant.mode": "8bit"},
    "nf4-dq": {"quant.mode": "4bit", "quant.quant_type": "nf4", "quant.double_quant": True},
    "nf4": {"quant.mode": "4bit", "quant.quant_type": "nf4", "quant.double_quant": False},
    "fp4-dq": {"quant.mode": "4bit", "quant.quant_type": "fp4", "quant.double_quant": True},
    "fp4": {"quant.mode": "4bit", "quant.quant_type": "fp4", "quant.double_quant": False},
}
METHODS = {
    "lora": {}, "dora": {"adapter.use_dora": True}, "adalora": {"adapter.method": "adalora"}, "ia3": {"adapter.method": "ia3"},
    "loha": {"adapter.method": "loha"}, "lokr": {"adapter.method": "lokr"}, "vera": {"adapter.method": "vera"},
    "oft": {"adapter.method": "oft"}, "prompt_tuning": {"adapter.method": "prompt_tuning", "adapter.num_virtual_tokens": 4},
    "frozen": {"adapter.method": "frozen"}, "full": {"adapter.method": "full"}, "scratch": {"adapter.method": "scratch"},
}
# what validation refuses up front, and the words of its reason
REFUSED = {
    ("full", "*"): "quantized weights cannot be trained", ("scratch", "*"): "quantized weights cannot be trained",
    ("loha", "4bit"): "packed storage", ("lokr", "4bit"): "packed storage", ("dora", "8bit"): "does not support 8-bit",
}


@pytest.mark.parametrize("quant", list(QUANT))
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_with_every_quantization_trains_or_says_why(make_recipe, method, quant):
    """Each (method, quantization) either trains a few steps on a fixed batch (the loss goes down, every trainable
    tensor moves, the quantized layers stay frozen) or is refused by validation with the reason."""
    from peftlab.errors import ConfigError

    overrides = {**METHODS[method], **QUANT[quant]}
    reason = REFUSED.get((method, "*")) or REFUSED.get((method, overrides["quant.mode"]))
    if reason:
        with pytest.raises(ConfigError, match=reason):
            make_recipe(overrides)
        return
    recipe = make_recipe(overrides)
    splits, names = load_splits(recipe)
    model, tok, info = build_model(recipe, num_labels=2, label_names=names)
    layer = bnb.nn.Linear4bit if quant != "8bit" else bnb.nn.Linear8bitLt
    quantized = [m for m in model.modules() if isinstance(m, layer)]
    assert quantized and all(not p.requires_grad for m in quantized for p in m.parameters(recurse=False))
    if quant != "8bit":
        assert {m.weight.quant_type for m in quantized} == {recipe.quant.quant_type}
        assert all((m.weight.quant_state.nested is True) == recipe.quant.double_quant for m in quantized)
    data = build_data(recipe, tok, splits=splits, label_names=names)
    batch = data.collate([data.train[i] for i in range(16)])
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    losses = fixed_batch_losses(model, batch, 3)
    assert losses[-1] < losses[0], losses
    after = dict(model.named_parameters())
    frozen_in_place = [n for n, before in trainable.items() if torch.equal(before, after[n].detach())]
    assert not frozen_in_place, f"{method}/{quant}: these trainable tensors did not move: {frozen_in_place}"


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads Linux /proc/self/maps")
def test_a_base_quantized_on_load_is_read_without_mapping_its_checkpoint(make_recipe, tiny_bert, monkeypatch, tmp_path):
    """Each weight is quantized from a buffer read for it (pread), with the checkpoint file never memory-mapped: through
    mmap the whole file stays resident until loading ends. An unquantized base is still mapped (the check can fail).
    A copy of the tiny base, so that no other test's model holds a map of the same file."""
    base = shutil.copytree(tiny_bert, tmp_path / "base")
    file = (base / "model.safetensors").resolve()
    mapped_while_quantizing = []
    quantize = bnb.functional.quantize_4bit

    def spy(*args, **kwargs):
        mapped_while_quantizing.append(bool(checkpoint_ranges(file)))
        return quantize(*args, **kwargs)

    monkeypatch.setattr(bnb.functional, "quantize_4bit", spy)
    quantized = build_model(make_recipe({"quant.mode": "4bit"}, model=base), num_labels=2, label_names=["negative", "positive"])[0]
    assert mapped_while_quantizing and not any(mapped_while_quantizing)
    import transformers.modeling_utils

    assert transformers.modeling_utils.safe_open.__name__ == "safe_open"  # restored after loading
    plain = build_model(make_recipe({}, model=base), num_labels=2, label_names=["negative", "positive"])[0]
    assert checkpoint_ranges(file)  # an unquantized base is still read through mmap (its weights are the file's pages)
    del plain
    mapped_while_quantizing.clear()
    monkeypatch.setattr(peftlab.model, "checkpoint_read_by_pread", lambda active: contextlib.nullcontext())
    mapped = build_model(make_recipe({"quant.mode": "4bit"}, model=base), num_labels=2, label_names=["negative", "positive"])[0]
    assert mapped_while_quantizing and all(mapped_while_quantizing)  # through mmap the file is resident while quantizing
    weights = lambda m: {n: t for n, t in m.state_dict().items() if "lora_" not in n and "classifier" not in n}  # noqa: E731
    assert weights(quantized).keys() == weights(mapped).keys()
    for name, t in weights(quantized).items():  # the checkpoint's weights, 4-bit ones and their quantization states alike
        assert torch.equal(t, weights(mapped)[name]), name


HEAP_SCRIPT = """
import ctypes
from peftlab.model import map_large_allocations, return_freed_memory
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype = ctypes.c_void_p
libc.mallopt(-3, 16 << 20)  # M_MMAP_THRESHOLD where glibc's dynamic threshold climbs to: 8 MB blocks from the heap
{setup}
rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096 >> 20
big = []
for _ in range(100):
    big.append(libc.malloc(8 << 20))
    libc.memset(ctypes.c_void_p(big[-1]), 1, 8 << 20)
    libc.malloc(1 << 20)  # kept: no freed block can join the heap's top
before = rss()
for b in big:
    libc.free(ctypes.c_void_p(b))
{after_free}
print(before - rss())
"""


def mib_given_back(setup: str = "", after_free: str = "") -> int:
    """In a process of its own (glibc settings are process-wide): 800 MB of 8 MB blocks, each pinned by a small live
    block after it, freed -> how many MiB of RSS went back to the system once they were freed and `after_free` ran."""
    import subprocess
    import sys

    script = HEAP_SCRIPT.format(setup=setup, after_free=after_free)
    return int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO).stdout)


@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="reads Linux /proc/self/statm")
def test_freed_heap_memory_goes_back_to_the_system():
    """return_freed_memory (called after quantizing on load): the heap glibc keeps after frees is returned."""
    assert mib_given_back(after_free="assert return_freed_memory()") > 600
    assert mib_given_back() < 100  # without it glibc keeps the blocks


@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="reads Linux /proc/self/statm")
def test_large_allocations_go_back_to_the_system_when_freed():
    """map_large_allocations (train.release_memory): 8 MB blocks are mapped and unmapped when freed, even after glibc
    had raised its threshold above them (as it does when large blocks are freed), so no trim is needed."""
    assert mib_given_back(setup="assert map_large_allocations()") > 700
    assert mib_given_back() < 100  # with the threshold left at 16 MB the same frees keep the memory


@pytest.mark.parametrize("mode,release,threshold,mapped", [
    ("4bit", "auto", 1, True),  # weight copies at least as large as the threshold: mapped
    ("4bit", "auto", None, False),  # the tiny model's copies are far below 4 MiB: mapping would catch only activations
    ("none", "auto", 1, False), ("4bit", "never", 1, False), ("none", "always", None, True)])
def test_training_maps_large_allocations_where_quantized_weight_copies_reach_the_threshold(make_recipe, tmp_path, monkeypatch,
                                                                                           mode, release, threshold, mapped):
    """train.release_memory: auto maps large allocations when a quantized layer's per-matmul weight copy reaches the
    mapping threshold (such copies fragment glibc's heap), always / never as they say. The real call is process-wide,
    so it is recorded here."""
    import importlib

    train_module = importlib.import_module("peftlab.train")
    calls = []
    monkeypatch.setattr(train_module, "map_large_allocations", lambda: calls.append(True) or True)
    if threshold is not None:
        monkeypatch.setattr(train_module, "MMAP_THRESHOLD", threshold)
    run(make_recipe({"quant.mode": mode, "train.release_memory": release, "train.max_steps": 1, "output_dir": tmp_path / "run"}))
    assert bool(calls) is mapped


def test_largest_weight_copy_is_that_of_the_biggest_quantized_layer(make_recipe):
    recipe = make_recipe({"quant.mode": "4bit", "quant.compute_dtype": "bfloat16"})
    model, _, _ = build_model(recipe, num_labels=2, label_names=["negative", "positive"])
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert peftlab.model.largest_weight_copy(model) == max(m.in_features * m.out_features for m in layers) * 2  # bf16
    plain, _, _ = build_model(make_recipe({}), num_labels=2, label_names=["negative", "positive"])
    assert peftlab.model.largest_weight_copy(plain) == 0


@pytest.mark.parametrize("lora_impl", ["fused", "peft"])
def test_qlora_sft_on_packed_rows_trains_under_bf16_autocast_on_an_fp32_base(tmp_path, chat_llama, lora_impl):
    """The shipped SmolLM2 QLoRA recipe's shape: an fp32 base quantized to 4 bits, bf16 compute under bf16 autocast,
    packed rows attended per example. bitsandbytes' 4-bit layers return their input's dtype, so v reaches the
    attention in fp32 (stop 52's per-example attention then failed its backward pass on mixed dtypes). Both LoRA
    forwards train, and to the same losses within bf16 rounding."""
    from .conftest import losses
    from .test_sft import messages_rows, recipe_for, write_jsonl

    path = write_jsonl(tmp_path / "m.jsonl", messages_rows())
    runs = {}
    for impl in dict.fromkeys([lora_impl, "peft"]):
        (tmp_path / impl).mkdir()
        recipe = recipe_for(tmp_path / impl, chat_llama, path, [
            "quant.mode=4bit", "train.precision=bf16", "data.packing=true", "data.max_length=128",
            "adapter.dropout=0.05", "train.max_steps=4", "train.log_every=1", "data.eval=null", f"train.lora_impl={impl}"])
        run(recipe)
        runs[impl] = losses(recipe.out)
    assert len(runs[lora_impl]) == 4 and all(math.isfinite(x) for x in runs[lora_impl])
    assert runs[lora_impl] == pytest.approx(runs["peft"], rel=2e-2)


@pytest.mark.parametrize("quant", ["none", "4bit"])
def test_activation_checkpointing_is_non_reentrant_with_or_without_a_quantized_base(make_recipe, tiny_llama, quant):
    """A quantized base gets the same activation checkpointing as a plain one: torch's non-reentrant kind. peft's k-bit
    preparation would otherwise enable the legacy reentrant kind, whose first forward runs without gradients and so
    outside peftlab's fused LoRA path (a SmolLM2 QLoRA micro-batch 1.06x slower, stop 53)."""
    recipe = make_recipe({"quant.mode": quant, "train.gradient_checkpointing": True}, model=tiny_llama)
    splits, names = load_splits(recipe)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        model, tok, _ = build_model(recipe, num_labels=2, label_names=names)
    assert not [str(w.message) for w in said if "checkpointing_kwargs" in str(w.message)]  # (peft 0.22 renamed the keyword)
    data = build_data(recipe, tok, splits=splits, label_names=names)
    model.train()
    loss = model(**data.collate([data.train[i] for i in range(4)])).loss
    seen, nodes, todo = set(), [], [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            nodes.append(type(node).__name__)
            todo.extend(f for f, _ in node.next_functions)
    assert "CheckpointFunctionBackward" not in nodes
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    assert layers  # checkpointing is on
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)


def test_a_qlora_run_resumes_from_its_checkpoint_as_if_never_stopped(make_recipe, tmp_path):
    """A 4-bit layer's checkpointed state holds its quantization state, which strict loading refused: no QLoRA run could
    be resumed. The rest of a resumed run is the run without a stop."""
    ov = {"quant.mode": "4bit", "train.max_steps": 8, "train.save_every": 4, "train.precision": "fp32"}
    assert_resume_is_uninterrupted(make_recipe, tmp_path, ov, step=4, steps=8)


def test_a_qlora_llm_with_tied_embeddings_resumes(tmp_path):
    """An LLM whose lm_head is its embedding matrix (SmolLM2) has it saved once in a checkpoint, under one name: the
    check that every weight is in the checkpoint refused it as 'written by another model'."""
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    from peftlab import load_recipe

    from .conftest import minilm_tokenizer

    torch.manual_seed(0)
    tok = minilm_tokenizer()
    tok.eos_token = "[SEP]"
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": f"the cat sat on mat number {i} and slept"}) + "\n" for i in range(64)))

    def make(overrides):
        tree = {"name": "q", "model": {"name": str(tmp_path / "m")}, "task": {"type": "clm"},
                "adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0}, "quant": {"mode": "4bit"},
                "data": {"train": str(tmp_path / "t.jsonl"), "eval": str(tmp_path / "t.jsonl"), "text_columns": ["text"], "max_length": 32},
                "train": {"batch_size": 4, "precision": "fp32", "log_every": 1}}
        (tmp_path / "r.yaml").write_text(json.dumps(tree))
        return load_recipe(tmp_path / "r.yaml", [f"{k}={v}" for k, v in overrides.items()])

    assert_resume_is_uninterrupted(make, tmp_path, {"train.max_steps": 4, "train.save_every": 2}, step=2, steps=4)


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_the_cards_snippet_loads_the_base_as_it_was_quantized(make_recipe, tiny_bert, tmp_path, capsys, mode):
    """The card said 'add quantization_config=BitsAndBytesConfig(...)': that alone is fp4 without double quant and
    quantizes the new head, whose first forward then fails. It now writes the run's settings out, and the snippet, run
    as written, gives the run's logits."""
    import re

    from peftlab.publish import publish

    recipe = make_recipe({"quant.mode": mode, "train.max_steps": 2, "train.precision": "fp32"})
    run(recipe)
    folder = tmp_path / "published"
    publish(recipe.out, "alice/q", to=folder)
    card = (folder / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32" \
        in code if mode == "4bit" else "BitsAndBytesConfig(load_in_8bit=True" in code and "(LLM.int8)" in card
    assert "'classifier'" in code
    code = code.replace(f"base_model = {tiny_bert.name!r}", f"base_model = {str(tiny_bert)!r}").replace("repo = 'alice/q'", f"repo = {str(folder)!r}")
    namespace: dict = {}
    capsys.readouterr()
    exec(code, namespace)
    assert capsys.readouterr().out.strip() in ("negative", "positive")
    torch.testing.assert_close(logits(namespace["model"]), logits(load_trained(recipe.out)[0]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_a_frozen_run_on_a_quantized_base_reloads_and_its_cards_snippet_runs(make_recipe, tmp_path, capsys, mode):
    """A frozen run on a 4-bit base is saved 4-bit, as a standalone model. Reloaded, its first no-grad forward took
    bitsandbytes' CPU repack path on avx512_bf16 CPUs and crashed ("shape '[32, 0]' is invalid"): `peftlab eval`,
    load_trained and the card's snippet alike. The card also said merge makes a dequantized copy; merge leaves it."""
    import re

    from peftlab import evaluate
    from peftlab.publish import publish

    recipe = make_recipe({"quant.mode": mode, "adapter.method": "frozen", "train.max_steps": 2, "train.precision": "fp32"})
    summary = run(recipe)
    assert evaluate(recipe.out)["accuracy"] == pytest.approx(summary["metrics"]["eval"]["accuracy"])
    folder = tmp_path / "published"
    publish(recipe.out, "alice/q", to=folder)
    card = (folder / "README.md").read_text()
    assert f"Saved {mode} quantized, as it was trained (method frozen" in card and "dequantized copy" not in card
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1).replace("repo = 'alice/q'", f"repo = {str(folder)!r}")
    assert ("support_avx512bf16_for_cpu" in code) == (mode == "4bit")
    namespace: dict = {}
    capsys.readouterr()
    exec(code, namespace)  # noqa: S102 (the card's own text)
    assert capsys.readouterr().out.strip() in ("negative", "positive")
    torch.testing.assert_close(logits(namespace["model"]), logits(load_trained(recipe.out)[0]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("quant", [{"quant.mode": "8bit"}, {"quant.mode": "4bit", "quant.compute_dtype": "bfloat16", "model.dtype": "float32"}])
def test_a_quantized_run_under_bf16_resumes_as_if_never_stopped(make_recipe, tmp_path, quant):
    """bitsandbytes' forward casts a quantized layer's frozen bias to the input's (8-bit) or compute (4-bit) dtype in
    place: after the first bf16 step those biases were bfloat16, the frozen base hashed at the first checkpoint was no
    longer the one built again, and no bf16 8-bit run could resume. The biases keep their dtype and values: it resumes,
    as if never stopped."""
    ov = {**quant, "train.max_steps": 4, "train.save_every": 2, "train.eval_every": 2, "train.precision": "bf16"}
    assert_resume_is_uninterrupted(make_recipe, tmp_path, ov, step=2, steps=4)


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_a_bf16_forward_leaves_the_quantized_layers_biases_as_loaded(make_recipe, mode):
    recipe = make_recipe({"quant.mode": mode, "model.dtype": "float32", **({"quant.compute_dtype": "bfloat16"} if mode == "4bit" else {})})
    splits, names = load_splits(recipe)
    model, tok, _ = build_model(recipe, num_labels=2, label_names=names, precision="bf16")
    layers = [m for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]
    before = [m.bias.detach().clone() for m in layers]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(**tok(["the movie was good", "a bad plot"], return_tensors="pt", padding=True)).logits.sum().backward()
    assert all(m.bias.dtype == torch.float32 and torch.equal(m.bias, b) for m, b in zip(layers, before))
