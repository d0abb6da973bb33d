"""A merged decoder LLM -> one GGUF file for llama.cpp (and Ollama, LM Studio, transformers' `gguf_file=`).

`write_gguf(MODEL_DIR, DEST)` reads a transformers folder (what `peftlab merge` writes: config.json, safetensors
weights, the tokenizer with its chat template) and writes a llama GGUF the way llama.cpp's convert_hf_to_gguf.py does
for these models: Q/K rows permuted to llama.cpp's rotary layout, 2-D weights in f16 (or f32), norms in f32, no
`output.weight` when the LM head is tied to the embedding. Only what maps one to one is written: Llama-architecture
models with a byte-level BPE tokenizer and no rope scaling (SmolLM/SmolLM2, Llama 3.0; Mistral without a sliding window);
anything else is refused with the command that does handle it. Quantize the result with llama.cpp's llama-quantize.
The file is written beside DEST under a temporary name and renamed at the end: a failure leaves no partial DEST.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from pathlib import Path

import numpy as np

from .errors import ArtifactError
from .export import disk_errors

log = logging.getLogger(__name__)
logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)  # its INFO lines name our temporary file

DTYPES = {"f16": np.float16, "f32": np.float32}
ARCHITECTURES = ("llama", "mistral")  # model_type values written as llama.cpp's `llama` architecture
CONVERT = ("convert the folder with llama.cpp's convert_hf_to_gguf.py instead (git clone https://github.com/ggml-org/llama.cpp; "
           "pip install -r llama.cpp/requirements.txt; python llama.cpp/convert_hf_to_gguf.py FOLDER --outtype f16)")
LAYER_TENSORS = {  # transformers module -> llama.cpp tensor, inside model.layers.N / blk.N
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
CONTROL, NORMAL, USER_DEFINED, UNUSED = 3, 1, 4, 5  # gguf.TokenType


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order (convert_hf_to_gguf.py `LlamaModel.permute`): its rotary embedding pairs neighbouring
    rows where transformers pairs the two halves of each head. transformers undoes it when it reads a llama GGUF."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model_dir: Path, dest: Path, dtype: str = "f16", *, name: str | None = None, overwrite: bool = False) -> Path:
    """Write the transformers model in `model_dir` as a llama GGUF at `dest` -> dest.

    dtype: "f16" (2-D weights as float16, what llama.cpp's tools expect to quantize from) or "f32" (exact). `name`:
    general.name (default: the folder's name, or the run's name for RUN/merged). An existing `dest` is replaced only
    with overwrite=True."""
    import gguf
    import torch
    from safetensors import safe_open

    model_dir, dest = Path(model_dir), Path(dest)
    if dtype not in DTYPES:
        raise ArtifactError(f"GGUF dtype {dtype!r}: write_gguf writes {' or '.join(DTYPES)}. For a quantized file (q8_0, "
                            "q4_k_m ...) write f16 and run llama.cpp's `llama-quantize model-f16.gguf out.gguf Q4_K_M`.")
    if dest.exists() and not overwrite:
        raise ArtifactError(f"{dest} exists: left as it is. Delete it, or pass overwrite=True (`peftlab merge --force`).")
    config = _config(model_dir)
    tok, spec = _tokenizer(model_dir)
    tensors = _tensor_plan(model_dir, config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    folder = model_dir.resolve()  # (`peftlab merge . --gguf` in the run folder: Path("merged").parent.name is "")
    name = name or (folder.parent.name if folder.name == "merged" else folder.name)

    dest.parent.mkdir(parents=True, exist_ok=True)
    for stale in dest.parent.glob(f".{glob.escape(dest.name)}.*.tmp"):  # of an export killed mid-write (kill, SIGTERM)
        try:
            os.kill(int(stale.name[len(dest.name) + 2:-4]), 0)
        except ProcessLookupError:  # its process is gone (else: an export writing now)
            stale.unlink(missing_ok=True)
        except (ValueError, OSError):
            pass
    tmp = dest.parent / f".{dest.name}.{os.getpid()}.tmp"
    w = gguf.GGUFWriter(str(tmp), "llama")
    try:
        with disk_errors("GGUF", dest):  # disk full: a clear message, the old file intact
            w.add_name(name)
            w.add_block_count(config.num_hidden_layers)
            w.add_context_length(config.max_position_embeddings)
            w.add_embedding_length(config.hidden_size)
            w.add_feed_forward_length(config.intermediate_size)
            w.add_head_count(config.num_attention_heads)
            w.add_head_count_kv(config.num_key_value_heads)
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
            w.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
            w.add_layer_norm_rms_eps(config.rms_norm_eps)
            w.add_vocab_size(config.vocab_size)
            w.add_rope_dimension_count(head_dim)
            w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            _add_tokenizer(w, tok, spec, config.vocab_size)
            # the tensor table first, then the data one tensor at a time: memory holds one tensor, not the model
            for gguf_name, (_, _, shape) in tensors.items():
                kind = _stored_as(shape, dtype)
                w.add_tensor_info(gguf_name, shape, kind, int(np.prod(shape)) * kind.itemsize)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            handles = {}
            for gguf_name, (file, key, shape) in tensors.items():
                if file not in handles:
                    handles[file] = safe_open(str(file), framework="pt")
                data = handles[file].get_tensor(key).to(torch.float32).numpy()
                if gguf_name.endswith("attn_q.weight"):
                    data = permute(data, config.num_attention_heads)
                elif gguf_name.endswith("attn_k.weight"):
                    data = permute(data, config.num_key_value_heads)
                data = data.astype(_stored_as(shape, dtype))
                if not np.isfinite(data).all():
                    raise ArtifactError(f"{key} in {file} holds inf/nan as {data.dtype} (values beyond float16's range?): "
                                        "nothing was written. Export with dtype f32 (`--gguf f32`).")
                w.write_tensor_data(data)
            w.close()
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            if dest.exists() and not overwrite:  # appeared while we wrote
                raise ArtifactError(f"{dest} was created while the GGUF was written: left as it is, nothing replaced.")
            os.replace(tmp, dest)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    log.info("GGUF (%s, %d tensors, %.1f MiB) written to %s", dtype, len(tensors), dest.stat().st_size / 2**20, dest)
    return dest


def _stored_as(shape: tuple[int, ...], dtype: str) -> np.dtype:
    """2-D weights in the chosen dtype, 1-D ones (the norms) in f32, as llama.cpp's converter stores them."""
    return np.dtype(DTYPES[dtype] if len(shape) > 1 else np.float32)


def check_run(out: Path, overrides: list[str] | tuple = ()) -> None:
    """`merge --gguf RUN`: what write_gguf refuses of the merged model (its architecture, its tokenizer), refused before
    the merge writes it (gigabytes for a real model), from the base's config as the run's task builds it."""
    from transformers import AutoConfig

    from .bases import base_path, converted_if_ready, gguf_source
    from .export import merge_source
    from .tasks import get_task

    out = Path(out)
    if not (out / "adapter_config.json").is_file():
        return  # a full model: nothing to merge, write_gguf checks it before it writes
    recipe, _, _ = merge_source(out, overrides)
    m = recipe.model
    try:
        source = gguf_source(m.name) if m.from_run is None else None
        ready = converted_if_ready(source) if source else None
        if source and ready is None:  # not converted here (a new cache, a touched or copied file): the GGUF header's config
            config = AutoConfig.from_pretrained(str(source.parent), gguf_file=source.name)
        else:
            config = AutoConfig.from_pretrained(str(ready or base_path(recipe)), revision=m.revision, trust_remote_code=m.trust_remote_code)
    except Exception:  # (a base not found or not converted yet: the merge says so, or converts it)
        return
    mapping = getattr(get_task(recipe.task.type).auto_model_class, "_model_mapping", None)
    if mapping is not None and type(config) in mapping:
        config.architectures = [mapping[type(config)].__name__]  # the merged model's class: a classifier is no causal LM
    _check_config(config, out)
    _tokenizer(out)


def _config(model_dir: Path):
    """The model's config, checked to be one llama.cpp's `llama` architecture reads without extra parameters."""
    from transformers import AutoConfig

    if not (model_dir / "config.json").is_file():
        raise ArtifactError(f"{model_dir} has no config.json: not a transformers model folder. Pass the merged folder "
                            "(`peftlab merge RUN` writes RUN/merged).")
    return _check_config(AutoConfig.from_pretrained(str(model_dir)), model_dir)


def _check_config(config, model_dir: Path):
    kind = config.model_type
    if kind not in ARCHITECTURES:
        raise ArtifactError(f"{model_dir}: model_type {kind!r} cannot be written as GGUF by peftlab, which writes "
                            f"{' and '.join(ARCHITECTURES)} (Llama-architecture) models only. For {kind}, {CONVERT}.")
    problems = []
    arch = (getattr(config, "architectures", None) or ["ForCausalLM"])[0]
    if not arch.endswith("ForCausalLM"):
        problems.append(f"it is a {arch}, not a causal LM (a GGUF holds a text generator; a classifier head has no place in it)")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(f"rope scaling {rope!r} is not written by peftlab")
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config.hidden_act!r} (llama.cpp's llama uses silu)")
    if biased := [k for k in ("attention_bias", "mlp_bias") if getattr(config, k, False)]:
        problems.append(f"{' and '.join(biased)} (llama.cpp's llama has no biases there)")
    window = getattr(config, "sliding_window", None)
    if window and window < config.max_position_embeddings:
        problems.append(f"sliding_window {window} < context length {config.max_position_embeddings} (llama.cpp's llama "
                        "attends to the whole context)")
    if problems:
        raise ArtifactError(f"{model_dir} ({kind}) does not map one to one to a llama GGUF: {'; '.join(problems)}. "
                            f"Nothing was written: {CONVERT}.")
    return config


def _tensor_plan(model_dir: Path, config) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """{llama.cpp tensor name: (safetensors file, transformers key, shape)}, in llama.cpp's order; every weight of the
    folder must have a place, and every tensor llama.cpp needs must be there."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({model_dir / f for f in json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()})
    elif (model_dir / "model.safetensors").is_file():
        files = [model_dir / "model.safetensors"]
    else:
        raise ArtifactError(f"{model_dir} has no model.safetensors (nor an index of shards). Merge the run first: "
                            "`peftlab merge RUN`.")
    plan, unknown = {}, []
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                target = _gguf_name(key, config.tie_word_embeddings)
                if target == "":
                    continue
                if target is None:
                    unknown.append(key)
                else:
                    plan[target] = (file, key, tuple(f.get_slice(key).get_shape()))
    if unknown:
        raise ArtifactError(f"{model_dir}: weights with no place in a llama GGUF: {', '.join(unknown[:5])}"
                            f"{' ...' if len(unknown) > 5 else ''} (biases? extra heads?). Nothing was written: {CONVERT}.")
    layers = [f"blk.{i}.{t}.weight" for i in range(config.num_hidden_layers) for t in LAYER_TENSORS.values()]
    order = ["token_embd.weight", *layers, "output_norm.weight", "output.weight"]
    missing = [n for n in order[:-1] if n not in plan]
    if missing:
        raise ArtifactError(f"{model_dir}: the weights lack {', '.join(missing[:5])}: an incomplete folder? Merge again "
                            "with `peftlab merge RUN --force`.")
    return {n: plan[n] for n in order if n in plan}


def _gguf_name(key: str, tied: bool) -> str | None:
    """llama.cpp's name of the transformers weight `key`; "" for weights not written; None for unknown ones."""
    if key == "model.embed_tokens.weight":
        return "token_embd.weight"
    if key == "model.norm.weight":
        return "output_norm.weight"
    if key == "lm_head.weight":
        return "" if tied else "output.weight"  # tied: llama.cpp reads the embedding as the LM head
    if key.endswith("rotary_emb.inv_freq"):
        return ""  # a buffer older checkpoints saved, recomputed from rope_theta
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", key)
    if m and m.group(2) in LAYER_TENSORS:
        return f"blk.{m.group(1)}.{LAYER_TENSORS[m.group(2)]}.weight"
    return None


def _tokenizer(model_dir: Path) -> tuple:
    """(the folder's tokenizer, its tokenizer.json as a dict), checked to be byte-level BPE (llama.cpp's `gpt2` tokenizer model)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{model_dir}: cannot load its tokenizer ({type(e).__name__}: {e}). A GGUF carries the "
                            "tokenizer: save it into the folder (tokenizer.save_pretrained(FOLDER)).") from None
    spec = json.loads(tok.backend_tokenizer.to_str()) if hasattr(tok, "backend_tokenizer") else {}
    model = (spec.get("model") or {}).get("type")
    pre = json.dumps(spec.get("pre_tokenizer"))
    if model != "BPE" or '"ByteLevel"' not in pre:
        raise ArtifactError(f"{model_dir}: the tokenizer is {model or type(tok).__name__} with pre-tokenizer "
                            f"{(spec.get('pre_tokenizer') or {}).get('type')}; peftlab writes byte-level BPE tokenizers "
                            f"(GPT-2, Llama 3, SmolLM2 style) only. For sentencepiece and other vocabularies, {CONVERT}.")
    return tok, spec


def _pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name of the way text is split into words before BPE (`tokenizer.ggml.pre`)."""
    pre = pre or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # SmolLM / SmolLM2
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        try:  # the splits transformers knows: it reads the same names back
            from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS as splits
        except ImportError:
            splits = {}
        regex = (steps[0].get("pattern") or {}).get("Regex")
        for name, split in splits.items():
            if split == regex:
                return name
    log.warning("pre-tokenizer %s has no llama.cpp name known to peftlab: writing 'default'. llama.cpp may split text "
                "into words differently (it warns: generation quality degraded); if that matters, %s.", kinds, CONVERT)
    return "default"


def _add_tokenizer(w, tok, spec: dict, vocab_size: int) -> None:
    """Tokens in id order (added tokens included, unused rows padded as llama.cpp does), their types, the merges,
    the special token ids, whether a BOS is prepended, and the chat template."""
    vocab = tok.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ArtifactError(f"the tokenizer has ids up to {max(vocab.values())} but the model only {vocab_size} embedding "
                            "rows: resize the embedding (model.resize_token_embeddings(len(tokenizer))) and merge again.")
    by_id = {i: t for t, i in vocab.items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(UNUSED if i not in by_id else (CONTROL if added[i].special else USER_DEFINED) if i in added else NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]  # "a b" or [a, b]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer_name(spec.get("pre_tokenizer")))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for what, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id),
                      ("unk", w.add_unk_token_id)):
        if (i := getattr(tok, f"{what}_token_id", None)) is not None:
            add(i)
    bos = tok.bos_token_id
    w.add_add_bos_token(bos is not None and tok("a")["input_ids"][:1] == [bos])
    template = tok.chat_template
    if isinstance(template, dict):  # named templates: the "default" one, the others under their names
        template = [{"name": k, "template": v} for k, v in template.items()]
    if template:
        w.add_chat_template(template)
    else:
        log.warning("the tokenizer has no chat template: the GGUF has none either (llama.cpp then guesses a format)")
