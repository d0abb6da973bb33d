"""Baselines without an adapter: full fine-tuning, a frozen backbone (head only), and the same architecture from scratch.
They export a standalone model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Method, plain_tags, register

if TYPE_CHECKING:
    from torch import nn

    from ..config import Recipe

TRAINS_EVERY_WEIGHT = ("it trains every weight, and quantized weights cannot be trained (they are integers). Use "
                       "adapter.method=lora (QLoRA) or quant.mode=none.")


def train_everything(model: nn.Module, recipe: Recipe, head_modules: list[str], task_type: str) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def train_head(model: nn.Module, recipe: Recipe, head_modules: list[str], task_type: str) -> nn.Module:
    for name, p in model.named_parameters():
        p.requires_grad_(any(name.startswith(h + ".") for h in head_modules))
    return model


def baseline(name: str, apply, what: str, **kw) -> Method:
    return Method(name, apply, is_adapter=False, mergeable=False, layers=False, size_hint=None, tags=plain_tags, describe=lambda r: what,
                  **kw)


FULL = register(baseline("full", train_everything, "A fully fine-tuned model", quant_modes=("none",), quant_refusal=TRAINS_EVERY_WEIGHT,
                        trains_base=True))
FROZEN = register(baseline("frozen", train_head, "A classifier head trained on a frozen backbone"))
SCRATCH = register(baseline("scratch", train_everything, "A model trained from scratch (random init: only the architecture comes "
                            "from the base)", pretrained=False, quant_modes=("none",), quant_refusal=TRAINS_EVERY_WEIGHT,
                            trains_base=True))
