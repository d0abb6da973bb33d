"""LoRA and its options: DoRA, rsLoRA, initialisations (gaussian, PiSSA, OLoRA, LoftQ), LoRA+ learning rates, and the
export of PiSSA/OLoRA adapters as plain LoRA on the original base."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ModelError
from .base import Method, adamw_groups, register, save_pretrained
from .peft_adapter import apply_peft

if TYPE_CHECKING:
    from torch import nn

    from ..config import AdapterConfig, Recipe

LORA_INITS = ("default", "gaussian", "pissa", "olora", "loftq")
MUTATING_INITS = ("pissa", "olora")  # they move the top of the base weights into the adapter (the base is changed)
# adapter.init -> peft's init_lora_weights (loftq: default init here, then fitted to the quantized base, see `apply`)
INIT_LORA_WEIGHTS = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora", "loftq": True}


def lora_fields(a: AdapterConfig) -> dict:
    return dict(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, use_rslora=a.use_rslora, use_dora=a.use_dora,
                init_lora_weights=INIT_LORA_WEIGHTS[a.init])


def rules(recipe: Recipe) -> list[str]:
    a, q = recipe.adapter, recipe.quant
    p = []
    if a.init in MUTATING_INITS and q.mode != "none":
        p.append(f"adapter.init={a.init} with quant.mode={q.mode}: {a.init} moves the top of each weight into the adapter and "
                 "keeps the residual in the base; a quantized base would be re-quantized (peft refuses for pissa; for olora the "
                 "rounding makes the exported adapter miss the trained model). Use quant.mode=none, or adapter.init=loftq "
                 "for a 4-bit base.")
    if a.init in MUTATING_INITS and a.use_dora:
        p.append(f"adapter.init={a.init} with adapter.use_dora: the {a.init} adapter is exported as plain LoRA on the original "
                 "base, which DoRA's magnitude vector does not survive. Use one or the other.")
    if a.init == "loftq" and (q.mode != "4bit" or q.quant_type != "nf4"):
        p.append(f"adapter.init=loftq with quant.mode={q.mode}, quant.quant_type={q.quant_type}: LoftQ fits LoRA to the error of "
                 "4-bit NF4 quantization. Set quant.mode=4bit quant.quant_type=nf4, or use another adapter.init.")
    given = a.options.get("init_lora_weights")
    if given is not None and not (a.init == "pissa" and str(given).startswith("pissa_niter_")):
        p.append(f"adapter.options.init_lora_weights={given!r}: the initialisation is adapter.init ({', '.join(LORA_INITS)}); "
                 "options may only refine pissa's speed (adapter.init=pissa with options {init_lora_weights: pissa_niter_4}).")
    if a.use_dora and q.mode == "8bit":
        p.append("adapter.use_dora with quant.mode=8bit: peft's DoRA does not support 8-bit bases. Use quant.mode=4bit or none.")
    return p


def machine_rules(recipe: Recipe) -> list[str]:
    import torch

    if recipe.adapter.init == "loftq" and not torch.cuda.is_available():
        return ["adapter.init=loftq needs a CUDA GPU: peft computes LoftQ's quantization on 'cuda' (or 'xpu') only "
                "(peft/utils/loftq_utils.py). On this machine use adapter.init=default, or pissa/olora on an unquantized base."]
    return []


def apply(model: nn.Module, recipe: Recipe, head_modules: list[str], task_type: str) -> nn.Module:
    a = recipe.adapter
    if recipe.train.gradient_checkpointing:  # frozen embeddings: without it no gradient reaches the checkpointed layers
        model.enable_input_require_grads()
    if problems := machine_rules(recipe):  # (`run` and `validate` said it before any work: run.preflight)
        raise ModelError(problems[0])
    model = apply_peft("LoraConfig", lora_fields, model, recipe, head_modules, task_type, lora_targets=True)
    if a.init == "loftq":  # A, B fitted to W - NF4(W) of every adapted 4-bit layer (the base stays as loaded)
        import peft

        peft.replace_lora_weights_loftq(model)
    if str(getattr(model.peft_config["default"], "init_lora_weights", "")).startswith(MUTATING_INITS):  # adapter.options too
        keep_initial_adapter(model)
    return model


def keep_initial_adapter(model) -> None:
    """PiSSA/OLoRA subtract their initial B0 A0 from the base weights. Keep B0, A0 (and the config, marked as a plain
    LoRA init) so that export can write the trained adapter as B A - B0 A0 on the *original* base (peft's
    path_initial_model_for_weight_conversion): the exported adapter then loads and merges like any LoRA."""
    from peft import get_peft_model_state_dict

    config = copy.deepcopy(model.peft_config["default"])
    config.init_lora_weights = True
    weights = {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}
    model.peftlab_initial_adapter = (config, weights)


def save(model, folder: Path, state_dict: dict | None = None) -> None:
    """model.save_pretrained; a PiSSA/OLoRA adapter (trained on a base whose weights it changed) is converted on the way
    to plain LoRA on the original base: B A - B0 A0 as rank 2r (peft's path_initial_model_for_weight_conversion), so it
    reloads, merges and publishes like any LoRA adapter."""
    initial = getattr(model, "peftlab_initial_adapter", None)
    if initial is None:
        save_pretrained(model, folder, state_dict)
        return
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    config, weights = initial
    with tempfile.TemporaryDirectory() as tmp:
        init_dir = Path(tmp) / "initial"
        config.save_pretrained(str(init_dir))
        save_file(weights, str(init_dir / "adapter_model.safetensors"))
        model.save_pretrained(str(folder), safe_serialization=True, state_dict=state_dict,
                              path_initial_model_for_weight_conversion=str(init_dir))
    # peft's conversion writes the lora_A/lora_B tensors only: add back the rest (the trained head, modules_to_save)
    path = folder / "adapter_model.safetensors"
    converted = load_file(str(path))
    rest = {k: v for k, v in get_peft_model_state_dict(model, state_dict=state_dict).items() if "lora_" not in k and k not in converted}
    save_file({**converted, **{k: v.contiguous() for k, v in rest.items()}}, str(path), metadata={"format": "pt"})


def is_lora_b(name: str) -> bool:
    return not {"lora_B", "lora_embedding_B"}.isdisjoint(name.split("."))


def param_groups(model: nn.Module, recipe: Recipe) -> list[dict]:
    """LoRA+ (adapter.loraplus_lr_ratio): LoRA's B matrices get groups of their own at lr x ratio (peft's
    create_loraplus_optimizer would also speed up every 1-D tensor)."""
    ratio = recipe.adapter.loraplus_lr_ratio
    return adamw_groups(model, recipe, is_lora_b, ratio) if ratio is not None else adamw_groups(model, recipe)


def card_lines(recipe: Recipe) -> list[str]:
    a = recipe.adapter
    targets = ", ".join(a.target_modules) if isinstance(a.target_modules, list) else a.target_modules or "the architecture's default modules"
    return [f"- LoRA r={a.r}, alpha={a.alpha:g}, dropout={a.dropout:g}, rsLoRA {'on' if a.use_rslora else 'off'}, "
            f"DoRA {'on' if a.use_dora else 'off'}, on {targets}"]


def tags(recipe: Recipe) -> list[str]:
    return ["peft", recipe.adapter.method] + (["dora"] if recipe.adapter.use_dora else [])


LORA = register(Method(
    "lora", apply, config_class="LoraConfig", options=("loraplus_lr_ratio", "init", "use_dora", "use_rslora"), rules=rules,
    machine_rules=machine_rules, rank_fields=("r",),
    recipe_fields=lora_fields, open_options=("init_lora_weights",),
    param_groups=param_groups, save=save, describe=lambda r: f"A LoRA adapter (r={r.adapter.r}, alpha={r.adapter.alpha:g})", card_lines=card_lines, tags=tags))
