"""Precision and Accelerate setup: which precision `auto` means here, the Accelerator of a run, sharded weights.

Kept apart from the loop (train.py) and the entrypoint (run.py) because eval, `peftlab env` and CI ask the same
questions without training anything.
"""

from __future__ import annotations

import logging
import os

import torch

from .config import Recipe
from .errors import ConfigError

log = logging.getLogger(__name__)

AUTO_PRECISION_ENV = "PEFTLAB_AUTO_PRECISION"


def resolve_precision(precision: str) -> str:
    """auto -> bf16 on GPUs that support it and on CPUs with native bf16 matmuls (AMX/avx512_bf16), else fp32.

    The environment variable PEFTLAB_AUTO_PRECISION=bf16|fp32 makes `auto` resolve to that value on any machine: it
    simulates the other machine kind, so CI on one kind of CPU also runs the precision-sensitive tests the way the other
    kind resolves them. Explicit precisions are not affected."""
    cpu_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if precision == "auto":
        forced = os.environ.get(AUTO_PRECISION_ENV, "").strip().lower()
        if forced:
            if forced not in ("bf16", "fp32"):
                raise ConfigError([f"{AUTO_PRECISION_ENV}={forced!r}: it makes train.precision=auto resolve to bf16 or fp32; "
                                   f"set it to one of those, or unset it to let the machine decide."])
            return forced
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if cpu_bf16 else "fp32"
    if precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError(["train.precision=fp16 needs a CUDA GPU; on CPU use fp32 (or auto)."])
    if precision == "bf16" and not torch.cuda.is_available() and not cpu_bf16:
        log.warning("train.precision=bf16 on a CPU without native bf16 (no AMX/avx512_bf16): matmuls are emulated and "
                    "~20-50x slower than fp32 here. Use train.precision=auto.")
    return precision


def make_accelerator(recipe: Recipe, precision: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DataLoaderConfiguration, DistributedType

    mixed_precision = {"fp32": "no"}.get(precision, precision)
    # Accelerate keeps one AcceleratorState per process and refuses a second Accelerator with another mixed_precision,
    # but a notebook (or a test session) runs several recipes in one process. Forget the previous run's state; keep the
    # PartialState: under `accelerate launch` it holds the process group, which must outlive the runs. Every rank runs
    # the same recipes, so every rank resets alike. DeepSpeed takes its precision from its own config (never refused).
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != mixed_precision and state.get("distributed_type") != DistributedType.DEEPSPEED:
        log.debug("Accelerate state had mixed_precision=%s; resetting it for %s", state.get("_mixed_precision"), mixed_precision)
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(
        gradient_accumulation_steps=recipe.train.grad_accum,
        mixed_precision=mixed_precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),  # same order per (seed, epoch) on every rank
        cpu=not torch.cuda.is_available(),
    )


def shards_weights(accelerator) -> bool:
    """FSDP and DeepSpeed ZeRO-3 keep only a slice of each weight on every rank."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    return accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3

