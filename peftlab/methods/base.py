"""The Method record and the registry: what `adapter.method` means, decided in one place.

A method is a frozen record of plain fields and functions. The rest of peftlab asks it, and never tests a method's
name: config (its checks, its quantization support), model (`apply`), train (`param_groups`, `schedule`), export
(`save`, `mergeable`), the model card (`describe`, `card_lines`, `tags`). Adding a method = one record, registered once.

This module sits below config and model (it imports neither at run time), so both may import it.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from ..config import AdapterConfig, Recipe

QUANT_MODES = ("none", "4bit", "8bit")


# ------------------------------------------------------------------------------------------ default hooks

def no_problems(recipe: Recipe) -> list[str]:
    return []


class NoSchedule:
    """A method with nothing to do per optimizer step. `snapshot()` / `restore(s)`: what of the schedule shapes the
    model (AdaLoRA's rank pattern), kept with train.keep_best's weights (JSON) and put back with them."""

    def step(self, step: int) -> None: ...
    def finish(self) -> None: ...
    def snapshot(self) -> Any: ...
    def restore(self, snapshot: Any) -> None: ...


def no_schedule(model, recipe: Recipe, total: int, register) -> NoSchedule:
    return NoSchedule()


def adamw_groups(model: nn.Module, recipe: Recipe, fast: Callable[[str], bool] | None = None, ratio: float = 1.0) -> list[dict]:
    """AdamW groups: no weight decay on biases and norm weights (1-D tensors); parameters named `fast` get lr x ratio."""
    lr, wd = recipe.train.lr, recipe.train.weight_decay
    groups = {(decay, quick): {"params": [], "weight_decay": wd if decay else 0.0, "lr": lr * ratio if quick else lr}
              for quick in (False, True) for decay in (True, False)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[p.ndim >= 2, fast is not None and fast(name)]["params"].append(p)
    return [g for g in groups.values() if g["params"]]


def save_pretrained(model, folder: Path, state_dict: dict | None = None) -> None:
    model.save_pretrained(str(folder), safe_serialization=True, state_dict=state_dict)


def plain_tags(recipe: Recipe) -> list[str]:
    return [recipe.adapter.method]


def peft_tags(recipe: Recipe) -> list[str]:
    return ["peft", recipe.adapter.method]


def rank_hint(recipe: Recipe) -> str:
    return f"Use a smaller adapter.r (now {recipe.adapter.r}; typical: 4-64)"


# ------------------------------------------------------------------------------------------------- record

# Adapter options that only the methods declaring them (Method.options) read: (fields, is it set?, the problem when a
# method that ignores them is chosen). One rule each, for every method, registered later ones included.
SPECIFIC_OPTIONS: tuple[tuple[tuple[str, ...], Callable[[AdapterConfig], bool], str], ...] = (
    (("loraplus_lr_ratio",), lambda a: a.loraplus_lr_ratio is not None,
     "adapter.loraplus_lr_ratio={a.loraplus_lr_ratio} with adapter.method={a.method}: LoRA+ sets the learning rate of LoRA's B "
     "matrices; use adapter.method=lora or adapter.loraplus_lr_ratio=null."),
    (("init",), lambda a: a.init != "default",
     "adapter.init={a.init} with adapter.method={a.method}: initialisations are for LoRA. Use adapter.method=lora or adapter.init=default."),
    (("use_dora", "use_rslora"), lambda a: a.use_dora or a.use_rslora,
     "adapter.use_dora/use_rslora apply to LoRA only, but adapter.method={a.method}. Remove them or use method=lora."),
)


@dataclass(frozen=True)
class Method:
    """One value of `adapter.method`: a peft adapter or a baseline."""

    name: str
    apply: Callable[..., Any]  # (model, recipe, head_modules, peft task type) -> the model to train (peft-wrapped, or grads set)
    is_adapter: bool = True  # exports an adapter on the base (adapter_config.json), not a standalone model
    config_class: str | None = None  # peft's config class (LoraConfig, ...): adapter.options are its arguments
    mergeable: bool = True  # the adapter folds into the base weights (`peftlab merge`)
    merge_refusal: str = ""  # why not, when not mergeable
    pretrained: bool = True  # starts from the base's pretrained weights (scratch: from its config only)
    trains_base: bool = False  # every weight of the base trains (full, scratch): kept in float32 by model.dtype=auto
    quant_modes: tuple[str, ...] = QUANT_MODES  # quant.mode values it trains on
    quant_refusal: str = "this method does not support it."  # why not, for the other modes ({name} = the method)
    options: tuple[str, ...] = ()  # method-specific adapter options it reads (of SPECIFIC_OPTIONS)
    recipe_fields: Callable[[AdapterConfig], dict] | None = None  # the peft config arguments it sets from the recipe
    open_options: tuple[str, ...] = ()  # of those, the ones adapter.options may still set (OFT's oft_block_size)
    layers: bool = True  # adapts layers named by adapter.target_modules (prompt methods and the baselines do not)
    rank_fields: tuple[str, ...] = ()  # adapter fields that are the rank of each adapted layer's update (r; AdaLoRA's init_r)
    check_on_meta: bool = False  # `validate` applies it to the base built on the meta device: its refusals before weights load
    extra_positions: Callable[[AdapterConfig], int] = lambda a: 0  # positions it adds before the input (virtual tokens)
    rules: Callable[[Recipe], list[str]] = no_problems  # its own cross-field checks
    machine_rules: Callable[[Recipe], list[str]] = no_problems  # what this machine cannot run (run.preflight: validate, train)
    schedule: Callable[..., Any] = no_schedule  # (model, recipe, total steps, register) -> object with step(n) / finish()
    param_groups: Callable[..., list[dict]] = adamw_groups  # (model, recipe) -> AdamW parameter groups
    save: Callable[..., None] = save_pretrained  # (model, folder, state_dict) export hook
    loaded: Callable[[Any, str], None] = lambda model, adapter_name: None  # after PeftModel.from_pretrained (reload, merge)
    size_hint: Callable[[Recipe], str] | None = rank_hint  # how to shrink an adapter that trains most weights; None: no warning
    describe: Callable[[Recipe], str] = lambda recipe: "A model"  # the card's "what"
    card_lines: Callable[[Recipe], list[str]] = lambda recipe: []  # the card's "Method and parameters" bullets
    # the ranks its exported adapter holds, read from the export folder, where training decides them (AdaLoRA's budget):
    # run.json's adapter_ranks, and the card's "what" (describe_exported) says them rather than the recipe's target
    exported_ranks: Callable[[Path], dict | None] = lambda folder: None
    describe_exported: Callable[[Recipe, dict], str] | None = None  # (recipe, adapter_ranks) -> the card's "what"
    tags: Callable[[Recipe], list[str]] = peft_tags  # the card's method tags

    def check(self, recipe: Recipe) -> list[str]:
        """Every problem of `recipe` that concerns this method: quantization support, options it does not read, its rules."""
        a, mode = recipe.adapter, recipe.quant.mode
        problems = []
        if mode in QUANT_MODES and mode not in self.quant_modes:  # (an unknown mode is the field check's problem)
            problems.append(f"quant.mode={mode} with adapter.method={self.name}: {self.quant_refusal.format(name=self.name)}")
        problems += self.option_problems(a.options) + self.shadowed_options(a)
        if recipe.export.merge and self.is_adapter and not self.mergeable:
            problems.append(f"export.merge=true with adapter.method={self.name}: {self.merge_refusal} Set export.merge=false "
                            "(the adapter is exported as it is), or use a mergeable method such as lora.")
        for fields, is_set, message in SPECIFIC_OPTIONS:
            if is_set(a) and not set(fields) <= set(self.options):
                problems.append(message.format(a=a))
        return problems + self.rules(recipe)

    def unread_options(self, a: AdapterConfig) -> list[str]:
        """The general adapter keys set to other values than their defaults that this method does not read (ia3 with
        adapter.r=64 trained as r=8 would, and the recipe and card still said 64): `validate` and `train` warn."""
        fields = self.recipe_fields(a) if self.recipe_fields is not None else {}
        read = {RECIPE_KEYS[k] for k in fields if k in RECIPE_KEYS} | ({"adapter.target_modules"} if self.layers else set())
        default = type(a)()  # (AdapterConfig's defaults)
        return [f"adapter.{k}={getattr(a, k)!r}" for k in GENERAL_KEYS
                if getattr(a, k) != getattr(default, k) and f"adapter.{k}" not in read]

    def option_problems(self, options: dict) -> list[str]:
        """adapter.options names that peft's config class of this method does not take (found at validate, not train)."""
        if not options:
            return []
        if self.config_class is None:
            return [f"adapter.options with adapter.method={self.name}: it builds no peft config, so nothing reads them. "
                    "Remove adapter.options."]
        import peft

        known = {f.name for f in dataclasses.fields(getattr(peft, self.config_class))}
        problems = []
        for k in (k for k in options if k not in known):
            key, colon, value = str(k).partition(":")
            if colon and options[k] is None:  # {oft_block_size:8}: YAML's flow mapping needs a space after the colon
                problems.append(f"adapter.options.{k}: YAML read `{k}` as one key with no value: write `{key}: {value}`, with a "
                                "space after the colon.")
            else:
                problems.append(f"adapter.options.{k}: not an argument of peft's {self.config_class}.{hint(k, known)} "
                                "adapter.options are passed straight to it (see peft's docs).")
        return problems

    def shadowed_options(self, a: AdapterConfig) -> list[str]:
        """adapter.options that would replace what the recipe sets (r, alpha, dropout, target_modules, ...): they skipped
        its checks, the card described the recipe's values, and target_modules was silently dropped."""
        if self.recipe_fields is None or not a.options:
            return []
        by_recipe = set(self.recipe_fields(a)) | {"target_modules", "task_type", "modules_to_save"}
        return [f"adapter.options.{k}: peftlab sets {self.config_class}'s {k} from {RECIPE_KEYS.get(k, 'the recipe')}, where it is "
                "checked and described on the card. Set it there, and remove it from adapter.options."
                for k in sorted(set(a.options) & by_recipe - set(self.open_options))]


GENERAL_KEYS = ("r", "alpha", "dropout", "target_modules", "num_virtual_tokens", "adalora_init_r", "adalora_interval")

# peft config arguments -> the recipe key that sets them
RECIPE_KEYS = {"r": "adapter.r", "target_r": "adapter.r", "init_r": "adapter.adalora_init_r", "deltaT": "adapter.adalora_interval",
               "lora_alpha": "adapter.alpha", "alpha": "adapter.alpha", "lora_dropout": "adapter.dropout",
               "rank_dropout": "adapter.dropout", "vera_dropout": "adapter.dropout", "module_dropout": "adapter.dropout",
               "use_dora": "adapter.use_dora", "use_rslora": "adapter.use_rslora", "init_lora_weights": "adapter.init",
               "target_modules": "adapter.target_modules", "task_type": "task.type", "modules_to_save": "the task (its head)",
               "num_virtual_tokens": "adapter.num_virtual_tokens", "total_step": "the run's length (train.max_steps, train.epochs)",
               "tinit": "the run's length", "tfinal": "the run's length"}


def hint(name: str, known) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


# ----------------------------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Make `method` a value of adapter.method (recipes naming it validate, train, export and reload)."""
    if method.name in _REGISTRY and _REGISTRY[method.name] is not method:
        raise ValueError(f"adapter method {method.name!r} is already registered; give the new one another name.")
    _REGISTRY[method.name] = method
    return method


def method_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_method(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError([f"adapter.method={name!r}: must be one of {', '.join(_REGISTRY)}.{hint}"]) from None
