"""Adapter methods and baselines, one record each (see `base.Method`), registered once by their family's module:
lora (DoRA, rsLoRA, inits, LoRA+, PiSSA/OLoRA export), adalora (rank budget), peft_simple (ia3, loha, lokr, vera, oft),
prompt (prompt_tuning, prefix_tuning, p_tuning), baselines (full, frozen, scratch).

    from peftlab.methods import Method, register
    register(Method("my_method", apply=my_apply, ...))   # adapter.method=my_method now validates, trains and exports
"""

from __future__ import annotations

from .base import Method, NoSchedule, adamw_groups, get_method, method_names, register, save_pretrained

# imported in this order, they register in the order users read adapter.method's choices
# isort: off
from . import lora, adalora, peft_simple, prompt, baselines  # noqa: F401
# isort: on

__all__ = ["Method", "NoSchedule", "adamw_groups", "get_method", "method_names", "register", "save_pretrained"]
