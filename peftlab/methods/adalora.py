"""AdaLoRA: LoRA whose rank budget shrinks during training, driven by the loop (`RankBudget`, its schedule hook)."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ModelError
from .base import register
from .peft_adapter import peft_method

if TYPE_CHECKING:
    from ..config import AdapterConfig, Recipe

log = logging.getLogger(__name__)


def adalora_fields(a: AdapterConfig) -> dict:
    # total_step/tinit/tfinal depend on the run's length: `RankBudget` sets them from the loop's total steps
    return dict(target_r=a.r, init_r=a.adalora_init_r, lora_alpha=a.alpha, lora_dropout=a.dropout, deltaT=a.adalora_interval,
                total_step=1, tinit=0, tfinal=0)


def rules(recipe: Recipe) -> list[str]:
    a = recipe.adapter
    p = []
    if a.adalora_init_r < a.r:
        p.append(f"adapter.adalora_init_r={a.adalora_init_r} with adapter.r={a.r}: AdaLoRA starts at adalora_init_r and prunes "
                 "down to an average of r, so adalora_init_r must be >= r (typical: 1.5 x r).")
    if not (0 <= a.adalora_warmup_fraction and 0 <= a.adalora_final_fraction and a.adalora_warmup_fraction + a.adalora_final_fraction < 1):
        p.append(f"adapter.adalora_warmup_fraction={a.adalora_warmup_fraction}, adapter.adalora_final_fraction={a.adalora_final_fraction}: "
                 "both must be >= 0 and sum to < 1, or no steps are left for the budget to shrink (typical: 0.1 and 0.2).")
    elif steps := recipe.train.max_steps:  # the run's length is known from the recipe: said before any work (else by the loop)
        p += [problem for problem in [rank_schedule_problem(recipe, steps)] if problem]
    return p


def rank_schedule_fits(recipe: Recipe, total: int) -> bool:
    """peft's AdaLoRA needs a step that scores importance before the budget is fixed at step total - tfinal (else a
    KeyError inside peft), and tinit below that step (a budget phase at all)."""
    a = recipe.adapter
    tinit, tfinal = int(a.adalora_warmup_fraction * total), int(a.adalora_final_fraction * total)
    return total - tfinal > max(tinit, 1)


def rank_schedule_problem(recipe: Recipe, total: int) -> str | None:
    a = recipe.adapter
    if rank_schedule_fits(recipe, total):
        return None
    needed = next((n for n in range(total + 1, total + 10**6) if rank_schedule_fits(recipe, n)), None)  # the fractions sum to < 1
    return (f"adapter.method=adalora: this run has {total} optimizer step(s), but AdaLoRA's rank schedule needs at least "
            f"{needed} (adapter.adalora_warmup_fraction={a.adalora_warmup_fraction} of them at the initial rank, "
            f"adapter.adalora_final_fraction={a.adalora_final_fraction} at the final budget, and steps between to "
            "shrink it). Train longer (train.max_steps or train.epochs, or more data), or lower the two fractions.")


class RankBudget:
    """AdaLoRA's rank-budget schedule, driven by the loop: the total steps (and tinit/tfinal, from the recipe's fractions)
    are set to this run's; `step(n)` runs peft's update_and_allocate after backward and before zero_grad of optimizer
    step n (1-based: the last step, with tfinal=0, fixes the final ranks); `finish()` re-applies the final rank mask
    (after `keep_best` restored earlier weights), so the model evaluated is the one saved (peft saves only kept ranks).
    `model` is unwrapped from DDP/compile wrappers; `register` is the accelerator's register_for_checkpointing."""

    def __init__(self, model, recipe: Recipe, total: int, register):
        a = recipe.adapter
        self.tuner = model.base_model
        self.config = model.peft_config[self.tuner.trainable_adapter_name]
        self.config.total_step = total
        self.config.tinit = int(a.adalora_warmup_fraction * total)
        self.config.tfinal = int(a.adalora_final_fraction * total)
        if problem := rank_schedule_problem(recipe, total):
            raise ModelError(problem)
        log.info("AdaLoRA: rank %d -> average %d over %d steps (%d at the initial rank, %d at the final budget, reallocating "
                 "every %d)", a.adalora_init_r, a.r, total, self.config.tinit, self.config.tfinal, a.adalora_interval)
        register(self)  # checkpoints carry the importance estimates and the rank pattern, so --resume continues the schedule

    def state_dict(self) -> dict:
        alloc = self.tuner.rankallocator
        return {"rank_pattern": self.config.rank_pattern, "ipt": alloc.ipt, "exp_avg_ipt": alloc.exp_avg_ipt,
                "exp_avg_unc": alloc.exp_avg_unc}

    def load_state_dict(self, state: dict) -> None:
        alloc = self.tuner.rankallocator
        self.config.rank_pattern = state["rank_pattern"]
        alloc.ipt, alloc.exp_avg_ipt, alloc.exp_avg_unc = state["ipt"], state["exp_avg_ipt"], state["exp_avg_unc"]

    def step(self, step: int) -> None:
        self.tuner.update_and_allocate(step)

    def snapshot(self):  # the ranks kept at this step: the model keep_best scored, if it keeps this step's weights
        return copy.deepcopy(self.config.rank_pattern)

    def restore(self, snapshot) -> None:
        self.config.rank_pattern = copy.deepcopy(snapshot)

    def finish(self) -> None:
        if self.config.rank_pattern:
            self.tuner.rankallocator.mask_using_rank_pattern(self.tuner.model, self.config.rank_pattern)
        kept = ([sum(map(bool, mask)) for mask in self.config.rank_pattern.values()] if self.config.rank_pattern
                else [self.config.init_r])  # (no pattern yet: nothing pruned, every layer at init_r)
        if (average := sum(kept) / len(kept)) > self.config.target_r:
            log.warning("AdaLoRA: the exported weights are from a step before the rank budget reached its target (step %d): "
                        "their layers keep an average rank of %.1f, not adapter.r=%d (%s), and the adapter is that much "
                        "larger (run.json's adapter_ranks). train.keep_best or train.early_stopping chose an early step: "
                        "export the last one (train.keep_best=false, no early stopping), or shorten the schedule "
                        "(adapter.adalora_warmup_fraction, adapter.adalora_final_fraction).", self.config.total_step -
                        self.config.tfinal, average, self.config.target_r,
                        "not pruned at all" if not self.config.rank_pattern else "partly pruned")


def exported_ranks(folder: Path) -> dict | None:
    """The ranks the exported adapter holds, from its tensors (peft saves only the kept ones: lora_E is rank x 1): the
    budget's result, or adalora_init_r everywhere when the exported step came before it pruned."""
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        ranks = [f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith(".lora_E")]
    return {"average": round(sum(ranks) / len(ranks), 2), "min": min(ranks), "max": max(ranks)} if ranks else None


def describe_exported(recipe: Recipe, ranks: dict) -> str:
    """The card's "what": the ranks exported (its recipe's adapter.r is the budget's target, which an early step misses)."""
    spread = (f"rank {ranks['min']} in every layer" if ranks["min"] == ranks["max"] else
              f"average rank {ranks['average']:g}, {ranks['min']} to {ranks['max']} per layer")
    return (f"An AdaLoRA adapter ({spread}" + ("" if ranks["average"] <= recipe.adapter.r else
                                              f"; not pruned to its budget of {recipe.adapter.r}: the exported step came before it") + ")")


def loaded(model, adapter_name: str) -> None:
    """Its forward adds the orthogonality penalty to any loss and reads this attribute, which peft sets only for
    trainable adapters (AttributeError in eval)."""
    model.base_model.trainable_adapter_name = adapter_name


ADALORA = register(peft_method("adalora", "AdaLoraConfig", adalora_fields, rules=rules, schedule=RankBudget, loaded=loaded, rank_fields=("r", "adalora_init_r"),
                               describe=lambda r: f"An AdaLoRA adapter (average rank {r.adapter.r})", exported_ranks=exported_ranks,
                               describe_exported=describe_exported))
