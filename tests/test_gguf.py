"""GGUF bases and QLoRA on tied-embedding LLMs: a `.gguf` model.name is converted once into a cached transformers
folder (exact weights, tokenizer with its chat template, atomic), trains, merges and reloads in plain transformers; a
tied LM head stays out of 4-bit/8-bit quantization. The slow test answers a question with the real SmolLM2 GGUF."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from peftlab import build_data, build_model, load_recipe, load_splits, load_trained, merge, run
from peftlab.bases import converted_folder, resolve_model_path
from peftlab.errors import ModelNotFound

from .conftest import shared_or_skip
from .test_summarization import dialogues  # noqa: F401  (the module's fixture: short dialogues and summaries)

gguf = pytest.importorskip("gguf")

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_level_vocab() -> tuple[list[str], list[str]]:
    """A byte-level BPE vocabulary: the special tokens, the 256 byte symbols, and a few merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    merges = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n", "e r"]
    tokens = SPECIALS + list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in merges]
    return tokens, merges


def tiny_llama_model(vocab_size: int, tied: bool = True, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order (convert_hf_to_gguf.py): transformers undoes it when it reads a llama GGUF."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, model, tokens: list[str], merges: list[str]) -> Path:
    """`model` (a LlamaForCausalLM) as an F32 llama GGUF with a byte-level BPE tokenizer and a ChatML template."""
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test-llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])  # 3: control
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(path of a tiny tied-embedding llama GGUF, the transformers model it was written from)."""
    tokens, merges = byte_level_vocab()
    model = tiny_llama_model(len(tokens))
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model, tokens, merges), model


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """Each test converts into its own cache ($PEFTLAB_CACHE), never the user's ~/.cache."""
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "gguf"


def ids() -> torch.Tensor:
    return torch.tensor([list(range(3, 40))])  # any in-vocabulary ids


# ----------------------------------------------------------------------------------------------- conversion, cache

def test_gguf_converts_once_into_an_exact_cached_folder(tiny_gguf, cache, caplog):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, reference = tiny_gguf
    with caplog.at_level(logging.INFO, logger="peftlab.bases"):
        folder = Path(resolve_model_path(str(path)))
    assert folder.parent == cache and len(folder.name) == 16
    log = caplog.text
    assert str(folder) in log and " s to " in log and "converted in" in log  # where the cache is, how long it took
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert (folder / "model.safetensors").is_file() and json.loads((folder / "gguf.json").read_text())["sha256"][:16] == folder.name
    assert not [p for p in cache.iterdir() if p.name.startswith(".staging")]

    model = AutoModelForCausalLM.from_pretrained(folder).eval()  # plain transformers, no gguf involved
    with torch.no_grad():
        diff = (model(ids()).logits - reference(ids()).logits).abs().max().item()
    assert diff < 1e-5, diff  # F32 GGUF: the Q/K permutation undone, the weights exact
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied

    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.eos_token == tok.pad_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(tok("the heat").input_ids) == "the heat"

    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="peftlab.bases"):
        assert resolve_model_path(str(path)) == str(folder)  # the second load reads the cache: no conversion
        assert resolve_model_path(str(path.parent)) == str(folder)  # a folder holding one GGUF is the same base
    assert "converted in" not in caplog.text and (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_killed_conversion_leaves_no_half_cache(tiny_gguf, cache, monkeypatch):
    import peftlab.bases as bases

    path, _ = tiny_gguf
    real = bases._convert

    def dies(source, sidecar, staging):
        (staging / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(bases, "_convert", dies)
    with pytest.raises(KeyboardInterrupt):
        converted_folder(path)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []  # no folder, no staging left
    monkeypatch.setattr(bases, "_convert", real)
    assert (converted_folder(path) / "gguf.json").is_file()


def test_tokenizer_json_beside_the_gguf_is_preferred(tiny_gguf, tmp_path):
    from transformers import AutoTokenizer

    path, _ = tiny_gguf
    d = tmp_path / "base"
    d.mkdir()
    (d / "m.gguf").symlink_to(path)
    folder = converted_folder(d / "m.gguf")
    gguf_tok = AutoTokenizer.from_pretrained(folder)
    side = json.loads((folder / "tokenizer.json").read_text())
    side["normalizer"] = {"type": "Lowercase"}  # stands for the model's own pipeline (SmolLM2's: digit splitting)
    (d / "tokenizer.json").write_text(json.dumps(side))

    folder2 = Path(resolve_model_path(str(d)))
    assert folder2 != folder and folder2.name.startswith(folder.name + "-tok")
    tok = AutoTokenizer.from_pretrained(folder2)
    assert tok.chat_template == CHATML and tok.eos_token == tok.pad_token == "<|im_end|>"  # the GGUF's specials + template
    assert tok("THE heat").input_ids == gguf_tok("the heat").input_ids != gguf_tok("THE heat").input_ids


def test_bad_gguf_names_are_clear(tmp_path, tiny_gguf):
    with pytest.raises(ModelNotFound, match=r"model.name=.*no such GGUF file"):
        resolve_model_path(str(tmp_path / "missing.gguf"))
    d = tmp_path / "two"
    d.mkdir()
    (d / "a.gguf").symlink_to(tiny_gguf[0])
    (d / "b.gguf").symlink_to(tiny_gguf[0])
    with pytest.raises(ModelNotFound, match=r"holds 2 GGUF files \(a.gguf, b.gguf\): name one of them"):
        resolve_model_path(str(d))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(ModelNotFound, match=r"cannot load this GGUF file"):
        resolve_model_path(str(bad))


# -------------------------------------------------------------------------------- QLoRA on a tied LM head, merge

def sum_recipe(tmp_path: Path, dialogues: dict, model: str, overrides: dict | None = None, name: str = "out"):  # noqa: F811
    tree = {
        "name": "g", "output_dir": str(tmp_path / name), "model": {"name": model},
        "adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(dialogues["train"]), "eval": str(dialogues["eval"]), "text_columns": ["dialogue"],
                 "target_column": "summary", "max_length": 48, "max_target_length": 24},
        "task": {"type": "summarization"},
        "train": {"max_steps": 4, "batch_size": 8, "lr": 1e-2, "log_every": 1, "warmup_fraction": 0.0, "precision": "fp32"},
        "eval": {"batch_size": 4, "max_new_tokens": 4},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return load_recipe(path, [f"{k}={v}" for k, v in (overrides or {}).items()])


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory) -> Path:
    """A tiny random Llama whose LM head is tied to its embedding, with MiniLM's tokenizer."""
    from .conftest import minilm_tokenizer

    tok = minilm_tokenizer()
    d = tmp_path_factory.mktemp("tied-llama")
    tiny_llama_model(tok.vocab_size).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_qlora_keeps_a_tied_lm_head_out_of_quantization(mode, tied_llama, dialogues, tmp_path):  # noqa: F811
    bnb = pytest.importorskip("bitsandbytes")
    recipe = sum_recipe(tmp_path, dialogues, str(tied_llama), {"quant.mode": mode})
    splits, names = load_splits(recipe)
    model, tok, _ = build_model(recipe, num_labels=0, label_names=names)
    base = model.get_base_model()
    layer = bnb.nn.Linear4bit if mode == "4bit" else bnb.nn.Linear8bitLt
    assert [m for m in base.modules() if isinstance(m, layer)], "nothing was quantized"
    assert type(base.lm_head) is torch.nn.Linear and base.lm_head.weight.dtype == torch.float32  # the tied head stays float

    data = build_data(recipe, tok, splits=splits, label_names=names)
    batch = data.collate([data.train[i] for i in range(8)])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model.train()(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses

    out = tmp_path / "run"
    recipe = sum_recipe(tmp_path, dialogues, str(tied_llama), {"quant.mode": mode}, name="run")
    run(recipe)
    target = merge(out)
    merged, _, _, _ = load_trained(target)
    assert type(merged.lm_head) is torch.nn.Linear and not any("lora" in n for n, _ in merged.named_parameters())
    adapter, tok2, _, _ = load_trained(out, dequantize=True)
    x = tok2(["Anna: Can you bring the cake today?"], return_tensors="pt")
    with torch.no_grad():
        diff = (adapter(**x).logits - merged(**x).logits).abs().max().item()
    assert diff < 1e-4, diff


def test_gguf_run_merges_to_a_folder_plain_transformers_reloads(tiny_gguf, dialogues, tmp_path):  # noqa: F811
    from transformers import AutoModelForCausalLM

    from peftlab.cli import main

    path, _ = tiny_gguf
    # one token per byte: inputs are long
    recipe = sum_recipe(tmp_path, dialogues, str(path), {"data.max_length": 224, "data.max_target_length": 48})
    summary = run(recipe)
    assert summary["metrics"]["eval"]["loss"] > 0
    assert main(["merge", str(recipe.out)]) in (0, None)  # `peftlab merge`: the base resolves to the cached folder
    target = recipe.out / "merged"
    adapter, tok, _, _ = load_trained(recipe.out)
    plain = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    x = tok(["Tom: Can you bring the map tonight?\nAnna: Sure"], return_tensors="pt")
    with torch.no_grad():
        a, m = adapter(**x).logits, plain(**x).logits
    assert (a - m).abs().max().item() < 1e-4
    assert (a - AutoModelForCausalLM.from_pretrained(resolve_model_path(str(path))).eval()(**x).logits).abs().max() > 1e-3  # it trained


# ----------------------------------------------------------------------------------------------- the real model

@pytest.mark.slow
def test_smollm2_gguf_answers_through_its_chat_template(monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shared_or_skip("models", "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")
    start = time.perf_counter()
    folder = resolve_model_path(str(shared_or_skip("models", "smollm2-135m-instruct")))
    assert "-tok" in Path(folder).name  # its own tokenizer.json was used
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert tok.pad_token == tok.eos_token == "<|im_end|>" and model.config.tie_word_embeddings
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=10, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
    logging.getLogger(__name__).info("SmolLM2 GGUF: converted, loaded and answered in %.1f s", time.perf_counter() - start)
