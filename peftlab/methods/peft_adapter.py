"""Wrapping a model with a peft adapter: the config builder every peft method shares, and its target-module checks."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import ModelError

if TYPE_CHECKING:
    from torch import nn

    from ..config import AdapterConfig, Recipe
    from .base import Method

LAYER_OPTIONS = ("layers_to_transform", "layers_pattern")  # peft options that keep some layers only (adapter.options)


def is_linear(m: nn.Module) -> bool:
    from torch import nn

    return isinstance(m, nn.Linear) or type(m).__name__ in ("Linear4bit", "Linear8bitLt", "Conv1D")


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct leaf names of linear layers: the candidates for `adapter.target_modules`."""
    return sorted({full.rsplit(".", 1)[-1] for full, m in model.named_modules() if is_linear(m)})


def names_target(name: str, target: str) -> bool:
    """Module `name` is the one a target_modules entry names, as peft matches them: the full name, or its dotted suffix."""
    return name == target or name.endswith("." + target)


def check_target_modules(model: nn.Module, targets) -> None:
    """Every name in a target list must match a module, as peft matches them (names_target):
    peft itself only refuses a list none of whose names match, so a typo beside a good name would be dropped silently."""
    if not isinstance(targets, (list, tuple, set)):
        return  # None (peft's default), "all-linear" or a regular expression
    names = [n for n, _ in model.named_modules()]
    unmatched = [t for t in targets if not any(names_target(n, t) for n in names)]
    if unmatched:
        raise ModelError(f"adapter.target_modules: {', '.join(map(repr, unmatched))} match{'es' if len(unmatched) == 1 else ''} "
                         f"no module of {type(model).__name__}. Linear layers it has: {', '.join(linear_module_names(model))}. "
                         "Set adapter.target_modules to some of these, or 'all-linear'.")
    if tied := tied_embedding_targets(model, targets):
        raise ModelError(f"adapter.target_modules: {', '.join(map(repr, tied))} is the input embedding {type(model).__name__} ties "
                         "to its LM head (tie_word_embeddings): folded in (eval.merge_adapter, peftlab merge, --gguf), its update "
                         "changes the LM head too, a model other than the one trained, whose figures and merged weights would "
                         "be wrong. Leave it out of adapter.target_modules.")


def tied_embedding_targets(model: nn.Module, targets) -> list[str]:
    """The names of target list entries that name a model's input embedding or LM head where the two share one weight."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    try:
        inp, out = (get() if get is not None else None for get in (get_in, get_out))
    except NotImplementedError:  # (a model class without one)
        return []
    if inp is None or out is None or getattr(inp, "weight", None) is None or inp.weight is not getattr(out, "weight", None):
        return []
    names = [n for n, m in model.named_modules() if m is inp or m is out]
    return [t for t in targets if any(names_target(n, t) for n in names)]


def layer_rank(module: nn.Module) -> int:
    """The highest rank an update of this layer can have: min(in, out) (a Conv2d's input counted with its kernel)."""
    import math

    if isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None), int):
        return min(module.in_features, module.out_features)  # (a 4-bit layer's weight is packed: not its shape)
    w = getattr(module, "weight", None)
    return min(w.shape[0], math.prod(w.shape[1:])) if getattr(w, "ndim", 0) >= 2 else 0


def rank_problem(model: nn.Module, method: Method, a: AdapterConfig) -> str | None:
    """A rank field of the method (adapter.r) above the largest min(in, out) among the layers adapter.target_modules
    names (every linear layer when it names them by rule: all-linear, a pattern, the default): it adds nothing, and an
    absurd one (r=10^13) was a failed allocation inside peft."""
    targets = a.target_modules
    if isinstance(targets, list) and targets != ["all-linear"]:
        layers = [(n, m) for n, m in model.named_modules() if any(names_target(n, t) for t in targets)]
    else:
        layers = [(n, m) for n, m in model.named_modules() if is_linear(m)]
    name, widest_layer = max(layers, key=lambda layer: layer_rank(layer[1]), default=("", None))
    widest = layer_rank(widest_layer) if widest_layer is not None else 0
    for field in method.rank_fields:
        if widest and getattr(a, field) > widest:
            return (f"adapter.{field}={getattr(a, field)}: above the largest rank an update of the adapted layers can have, "
                    f"{widest} ({name}, {type(widest_layer).__name__}): a higher rank adds nothing. Set adapter.{field} <= "
                    f"{widest}.")
    return None


def default_target_modules(model: nn.Module) -> list[str] | str:
    """peft's per-architecture defaults (e.g. BERT: query, value; Llama: q_proj, v_proj), else every linear layer."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as TABLE

    config = model.config
    config = getattr(config, "encoder", config) if config.model_type not in TABLE else config  # BERT2BERT: the BERT entry
    return TABLE.get(getattr(config, "model_type", None), "all-linear")


def fill_defaults(tuner, cfg, model_type: str | None) -> None:
    """peft's own per-method step that fills a config's default layers (target_modules None) for a model_type (IA3: its
    feed-forward layers too, from its second table); raises peft's ValueError where the method has no defaults for it."""
    import inspect
    from types import SimpleNamespace

    model_config = {"model_type": model_type}
    if isinstance(inspect.getattr_static(tuner, "_prepare_adapter_config"), staticmethod):  # IA3
        tuner._prepare_adapter_config(cfg, model_config)
    else:  # BaseTuner's reads only the tuner's table (a class attribute): no model needs building for it
        tuner._prepare_adapter_config(SimpleNamespace(target_module_mapping=tuner.target_module_mapping), cfg, model_config)


def tuner_of(config_class: str):
    """peft's tuner (model) class for a config class name (IA3Config -> IA3Model), or None."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    kind = next((k for k, c in PEFT_TYPE_TO_CONFIG_MAPPING.items() if c.__name__ == config_class), None)
    return PEFT_TYPE_TO_TUNER_MAPPING.get(kind)


def has_default_layers(config_class: str, model_type: str | None) -> bool:
    """Whether peft knows the method's default layers for this architecture (`validate`, before any weight is read).
    LoRA always has some here: peftlab falls back to every linear layer (default_target_modules)."""
    from types import SimpleNamespace

    tuner = tuner_of(config_class)
    if config_class == "LoraConfig" or tuner is None:
        return True
    try:
        fill_defaults(tuner, SimpleNamespace(target_modules=None, feedforward_modules=None, target_parameters=None), model_type)
    except ValueError:
        return False
    return True


def warm_start_defaults(cfg, model: nn.Module) -> None:
    """Fill a method's default layers (no adapter.target_modules) for a warm-started encoder-decoder (BERT2BERT), as
    peft fills them for the encoder's architecture. Its model_type 'encoder-decoder' is in no peft table, so every method
    but LoRA (which falls back through default_target_modules) stopped in get_peft_model with a bare "Please specify
    `target_modules` in `peft_config`". The encoder's layer names are the decoder's where both halves are one
    architecture (BERT2BERT), so both halves are adapted."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    encoder = getattr(model.config, "encoder", None)
    tuner = PEFT_TYPE_TO_TUNER_MAPPING.get(getattr(cfg, "peft_type", None))
    if encoder is None or tuner is None or getattr(cfg, "target_modules", "") is not None:
        return
    fill_defaults(tuner, cfg, getattr(encoder, "model_type", None))


def no_default_targets(method: str, model_type: str | None, model: nn.Module | None = None) -> str:
    """The error for a base whose architecture peft has no default layers for with this method."""
    layers = f" Linear layers it has: {', '.join(linear_module_names(model))}." if model is not None else ""
    return (f"adapter.method={method} on a {model_type} base: peft has no default layers for this architecture, so "
            f"adapter.target_modules must name them.{layers} Set e.g. adapter.target_modules=[query,value] (its attention "
            "projections' names), or adapter.target_modules=all-linear.")


def apply_peft(config_class: str, fields: Callable[[AdapterConfig], dict], model: nn.Module, recipe: Recipe,
               head_modules: list[str], task_type: str, *, layers: bool = True, lora_targets: bool = False) -> nn.Module:
    """Wrap `model` in peft's `config_class` built from the recipe's `fields` with adapter.options passed straight through
    on top. `layers`: the method adapts layers (target_modules; prompt methods do not); `lora_targets`:
    no target_modules means the architecture's LoRA defaults (peft's table) rather than the method's own default.
    Methods bind the first two arguments (functools.partial) and use it as their `apply`."""
    import peft

    a = recipe.adapter
    kwargs = {**fields(a), **a.options}
    if layers:
        targets = a.target_modules
        if lora_targets and targets is None:
            targets = default_target_modules(model)
        kwargs["target_modules"] = "all-linear" if targets == ["all-linear"] else targets  # None: peft's per-method default
    # the new modules train and are saved with the adapter, for prompt methods too (an MLM head, a warm start's
    # cross-attention: left out, they stayed random, and each reload drew others). peft adds its own task defaults
    # (SEQ_CLS: classifier, score): name only the other new modules
    kwargs.setdefault("modules_to_save", [h for h in head_modules if h not in ("classifier", "score")] or None)
    targets = kwargs.get("target_modules")
    check_target_modules(model, targets)
    try:
        cfg = getattr(peft, config_class)(task_type=task_type, **kwargs)
    except (TypeError, ValueError) as e:
        raise ModelError(f"adapter (method {a.method}): {e}. adapter.options must be {config_class} arguments (see peft's docs).") from None
    encoder = getattr(model.config, "encoder", None)
    try:
        warm_start_defaults(cfg, model)
    except ValueError:  # the encoder's architecture is in no table of this method either
        raise ModelError(no_default_targets(a.method, getattr(encoder, "model_type", None), model)) from None
    try:
        with warnings.catch_warnings():  # OFT's r (or block size) not dividing a layer's width: peft trains another, silently
            warnings.filterwarnings("error", message=r"Invalid `(r|oft_block_size)` \(", category=UserWarning)
            return feedforward_within_targets(peft.get_peft_model(model, cfg))
    except UserWarning as e:
        raise ModelError(f"adapter (method {a.method}): {e} peft would train that instead of what the recipe says. OFT's r (blocks "
                         "per layer) or adapter.options.oft_block_size must divide the input width of every adapted layer: "
                         "give such a value.") from None
    except ValueError as e:
        if "Please specify `target_modules`" in str(e):  # an architecture peft has no defaults for, and none named
            raise ModelError(no_default_targets(a.method, getattr(model.config, "model_type", None), model)) from None
        if (str(e).startswith("No modules were targeted") or "Target modules" in str(e)) and (chosen := {
                k: a.options[k] for k in LAYER_OPTIONS if a.options.get(k) is not None}):
            # target_modules matched (check_target_modules): the layers the options keep hold none of them
            n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
            raise ModelError(f"adapter.options {chosen} keeps no layer that adapter.target_modules={targets!r} matches in "
                             f"{type(model).__name__}" + (f", which has {n} layers (indices 0 to {n - 1})" if n else "")
                             + ": give layers_to_transform indices of its layers, or drop it to adapt every layer.") from None
        if "not found in the base model" in str(e) or "No modules were targeted" in str(e) or "Target modules" in str(e):
            raise ModelError(
                f"adapter.target_modules={targets!r} matches no module of {type(model).__name__}. "
                f"Linear layers it has: {', '.join(linear_module_names(model))}. "
                f"Set adapter.target_modules to some of these, or 'all-linear'.") from None
        raise


def feedforward_within_targets(model):
    """IA3 scales a feed-forward layer's input and any other layer's output. peft takes the feed-forward layers from its
    per-architecture table (BERT: output.dense; Llama: down_proj) whatever the targets, and records them beside
    targets that may not hold them (target_modules=[query, value]), hold them under a shorter name ([dense]) or name
    them in full (all-linear, expanded): the saved adapter then failed to load, in peftlab and in plain peft
    (IA3Config: feedforward_modules must be a subset of target_modules). The record is then made what was trained:
    every adapted layer by its full name, and those that scale their input as the feed-forward ones."""
    for name, c in model.peft_config.items():
        ff, targets = getattr(c, "feedforward_modules", None), getattr(c, "target_modules", None)
        if isinstance(ff, set) and isinstance(targets, set) and not ff <= targets:
            layers = {n: m for n, m in model.base_model.model.named_modules() if hasattr(m, "is_feedforward") and name in
                      getattr(m, "ia3_l", {})}
            c.target_modules = set(layers)
            c.feedforward_modules = {n for n, m in layers.items() if m.is_feedforward}
    return model


def peft_method(name: str, config_class: str, fields: Callable[[AdapterConfig], dict], **kw) -> Method:
    """A method that is peft's `config_class` built from the recipe's `fields` (plus adapter.options)."""
    from functools import partial

    from .base import Method

    shown = {"VeraConfig": "VeRA"}.get(config_class, config_class.removesuffix("Config"))  # IA3, LoHa, LoKr, OFT
    kw.setdefault("describe", lambda r: f"{'An' if shown[0] in 'AEIOU' else 'A'} {shown} adapter")  # the card's "what"
    return Method(name, partial(apply_peft, config_class, fields), config_class=config_class, recipe_fields=fields, **kw)
