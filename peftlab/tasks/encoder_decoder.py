"""The BERT2BERT-style warm start (Rothe et al. 2020): an encoder-decoder built from two pretrained checkpoints,
`model.name` as the encoder and `model.decoder` as the decoder, for the tasks that declare `warm_start` (summarization).
Its recipe rules live here too, beside the code they protect."""

from __future__ import annotations

import inspect
import logging
from typing import TYPE_CHECKING

from ..bases import load_tokenizer, resolve_model_path
from ..errors import ModelError
from ..methods import get_method, method_names

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)


def check(recipe, offered: bool, offering: list[str]) -> list[str]:
    """The warm start's recipe rules. `offered`: the recipe's task accepts model.decoder; `offering`: the tasks that do."""
    m, q, a = recipe.model, recipe.quant, recipe.adapter
    p = []
    if m.decoder is not None and not offered:
        p.append(f"model.decoder={m.decoder!r}: an encoder-decoder warm start is for {' or '.join(offering) or 'no registered task'}. "
                 f"Set task.type={offering[0] if offering else '...'} or model.decoder=null.")
    if m.decoder is None and m.cross_attention_init != "random":
        p.append(f"model.cross_attention_init={m.cross_attention_init!r} applies to an encoder-decoder warm start only. "
                 "Set model.decoder (e.g. minilm) or leave model.cross_attention_init=random.")
    if m.decoder is not None and q.mode != "none":
        p.append(f"model.decoder with quant.mode={q.mode}: quantizing a warm-started encoder-decoder is not supported. Use quant.mode=none.")
    if m.decoder is not None and a.method in method_names() and not get_method(a.method).pretrained:
        p.append(f"model.decoder with adapter.method={a.method}: the warm start reads pretrained weights, {a.method} reads none. "
                 f"Set model.decoder=null ({a.method} builds model.name's architecture at random) or use another method.")
    return p


def warm_start_problems(encoder, decoder, recipe) -> list[str]:
    """The two checkpoints' configs (no weights read): model.name an encoder (an encoder-decoder's AutoModel wants
    decoder inputs: 'You must specify exactly one of input_ids or inputs_embeds' at the first step), model.decoder a
    causal LM whose layers take cross-attention (a Llama's do not: EncoderDecoderModel refused it with a ValueError)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    m = recipe.model
    fix = ("model.name must be an encoder-only model and model.decoder an encoder-style checkpoint that can take "
           "cross-attention (BERT, RoBERTa, ELECTRA, ...; e.g. model.decoder=minilm). An encoder-decoder or a decoder-only "
           "base summarizes on its own: remove model.decoder.")
    p = []
    if getattr(encoder, "is_encoder_decoder", False):
        p.append(f"model.name={m.name!r} is an encoder-decoder ({encoder.model_type}), not an encoder for a warm start: {fix}")
    causal = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(decoder), None)
    if causal is None or "encoder_hidden_states" not in inspect.signature(causal.forward).parameters:
        p.append(f"model.decoder={m.decoder!r} ({decoder.model_type}) cannot attend to an encoder (its causal LM takes no cross-attention): {fix}")
    return p


def new_modules(model: nn.Module, missing: set[str]) -> list[str]:
    """The largest modules all of whose parameters are newly initialised (`missing` from the checkpoint)."""
    found = []

    def visit(prefix: str, module: nn.Module) -> None:
        names = [prefix + n for n, _ in module.named_parameters()]
        if names and all(n in missing for n in names):
            found.append(prefix.rstrip("."))
            return
        for child, sub in module.named_children():
            visit(f"{prefix}{child}.", sub)

    visit("", model)
    return found


def copy_self_attention(decoder: nn.Module) -> int:
    """Start each decoder layer's cross-attention as a copy of its pretrained self-attention (same structure: query, key,
    value, output projection and norm), so that it attends by the pretrained similarity from the first step. -> layers."""
    from torch import nn

    n = 0
    for layer in decoder.modules():
        cross, self_attn = getattr(layer, "crossattention", None), getattr(layer, "attention", None)
        if isinstance(cross, nn.Module) and isinstance(self_attn, nn.Module):
            cross.load_state_dict(self_attn.state_dict())
            n += 1
    return n


def load_encoder_decoder(recipe, path: str, dtype: torch.dtype):
    """model.name as the encoder, model.decoder as a decoder with new cross-attention (and, from an encoder-only
    checkpoint, a new LM-head transform; the output layer is tied to the decoder's word embeddings).
    -> (EncoderDecoderModel, full names of the new modules: peft trains them in full)."""
    # here, not at the top: every recipe check reads this module, and transformers' model classes take seconds to import
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, EncoderDecoderModel

    m = recipe.model
    dec_path = resolve_model_path(m.decoder)
    common = dict(trust_remote_code=m.trust_remote_code, use_safetensors=None if m.allow_pickle else True, dtype=dtype)
    try:
        config = AutoConfig.from_pretrained(dec_path, trust_remote_code=m.trust_remote_code)
        if problems := warm_start_problems(AutoConfig.from_pretrained(path, revision=m.revision, trust_remote_code=m.trust_remote_code),
                                           config, recipe):
            raise ModelError("\n".join(problems))
        encoder = AutoModel.from_pretrained(path, revision=m.revision, **common)
        config.is_decoder, config.add_cross_attention = True, True
        decoder, info = AutoModelForCausalLM.from_pretrained(dec_path, config=config, output_loading_info=True, **common)
        model = EncoderDecoderModel.from_encoder_decoder_pretrained(encoder_model=encoder, decoder_model=decoder)
    except ModelError:
        raise
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot build an encoder-decoder from {path} (encoder) and {dec_path} (model.decoder): "
                         f"{str(e).splitlines()[0]}") from None
    tok = load_tokenizer(path, recipe)  # the run's tokenizer: it writes the targets, so the decoder must share its vocabulary
    if decoder.config.vocab_size < len(tok):
        raise ModelError(f"model.decoder={m.decoder!r} has {decoder.config.vocab_size} tokens but the tokenizer of model.name="
                         f"{m.name!r} has {len(tok)}: encoder and decoder must share a vocabulary.")
    start = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
    eos = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
    for cfg in (model.config, model.generation_config):
        cfg.decoder_start_token_id, cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = start, start, eos, tok.pad_token_id
    model.config.vocab_size = decoder.config.vocab_size
    new = new_modules(model, {f"decoder.{k}" for k in info["missing_keys"]})
    if m.cross_attention_init == "self":
        if not (n := copy_self_attention(decoder)):
            raise ModelError(f"model.cross_attention_init=self: the layers of {type(decoder).__name__} have no `attention` and "
                             "`crossattention` of the same structure to copy (BERT-like decoders do). Use model.cross_attention_init=random.")
        log.info("cross-attention initialised from self-attention in %d decoder layers", n)
    if hasattr(model, "enc_to_dec_proj"):  # encoder and decoder widths differ: a new projection between them
        new.append("enc_to_dec_proj")
    log.info("encoder-decoder warm start: encoder %s, decoder %s; new modules trained in full: %d (%s ...)", path, dec_path,
             len(new), new[0] if new else "none")
    return model, new
