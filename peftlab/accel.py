"""Precision and Accelerate setup: which precision `auto` means here, the Accelerator of a run, sharded weights.

Kept apart from the loop (train.py) and the entrypoint (run.py) because eval, `peftlab env` and CI ask the same
questions without training anything.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

import torch

from .config import Recipe
from .errors import ConfigError

log = logging.getLogger(__name__)

AUTO_PRECISION_ENV = "PEFTLAB_AUTO_PRECISION"


def cpu_native_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (AMX / avx512_bf16, as oneDNN reports it)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str) -> str:
    """auto -> bf16 on GPUs that support it and on CPUs with native bf16 matmuls (AMX/avx512_bf16), else fp32.

    The environment variable PEFTLAB_AUTO_PRECISION=bf16|fp32 makes `auto` resolve to that value on any machine: it
    simulates the other machine kind, so CI on one kind of CPU also runs the precision-sensitive tests the way the other
    kind resolves them. Explicit precisions are not affected."""
    cpu_bf16 = cpu_native_bf16()
    if precision == "auto":
        forced = os.environ.get(AUTO_PRECISION_ENV, "").strip().lower()
        if forced:
            if forced not in ("bf16", "fp32"):
                raise ConfigError([f"{AUTO_PRECISION_ENV}={forced!r}: it makes train.precision=auto resolve to bf16 or fp32; "
                                   f"set it to one of those, or unset it to let the machine decide."], source="the environment", what="setting")
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


def make_accelerator(recipe: Recipe, precision: str, *, unused_parameters: bool = False):
    """The run's Accelerator. `unused_parameters`: a step may leave trainable parameters without a gradient (the task's
    `unused_parameters`), which DDP must be told, or it fails at the next step's reduction."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, DistributedType

    mixed_precision = accelerate_precision(precision)
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
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)] if unused_parameters else None,
    )


def accelerate_precision(precision: str) -> str:
    """An Accelerator's mixed_precision for a resolved train.precision (fp32 -> no)."""
    return {"fp32": "no"}.get(precision, precision)


@contextmanager
def accelerate_state_kept():
    """Around a run or an evaluation (a decorator too): Accelerate keeps one state per process, which make_accelerator
    sets, so an Accelerator the caller builds afterwards (README: `train(recipe, model, data, Accelerator(cpu=True), out)`)
    would silently get the last run's mixed_precision (bf16 for an fp32 recipe) and device, and the caller's own
    Accelerator, built before, would be left with the run's. The state of entry is put back on the way out (none: it is
    forgotten), except a PartialState the run made for a process group (`accelerate launch`), kept as make_accelerator
    keeps it."""
    from accelerate.state import AcceleratorState, PartialState

    entry = {cls: dict(cls._shared_state) for cls in (AcceleratorState, PartialState)}
    try:
        yield
    finally:
        grouped = torch.distributed.is_available() and torch.distributed.is_initialized()
        for cls, state in entry.items():
            if state or cls is AcceleratorState or not grouped:
                cls._shared_state.clear()  # in place: Accelerate's objects share this dict
                cls._shared_state.update(state)


def check_accelerator_precision(recipe: Recipe, accelerator) -> None:
    """`train` with an Accelerator of the building blocks: its mixed_precision must be the recipe's train.precision
    (the precision comes from the recipe, as in `run`); DeepSpeed takes its own from its config."""
    if accelerator.distributed_type.name == "DEEPSPEED":
        return
    precision = recipe.train.precision  # an explicit one as it is: resolve_precision warns about bf16 on a CPU without it, as run did
    expected = accelerate_precision(resolve_precision(precision) if precision == "auto" else precision)
    if accelerator.mixed_precision != expected:
        raise ConfigError([f"the accelerator has mixed_precision={accelerator.mixed_precision!r} but train.precision={precision!r}"
                           f"{' (here ' + expected + ')' if precision == 'auto' else ''} needs mixed_precision={expected!r}: build it with "
                           f"Accelerator(mixed_precision={expected!r}) (peftlab.accel.make_accelerator(recipe, precision) does), "
                           f"or set train.precision to the accelerator's."], what="argument")


def progress_shown(accelerator=None) -> bool:
    """Progress bars and the per-evaluation lines: on the (local) main process, unless the `peftlab` logger is set to
    WARNING or above (`peftlab ... -q`; in Python, logging.getLogger("peftlab").setLevel(logging.WARNING))."""
    main = accelerator is None or accelerator.is_local_main_process
    return main and logging.getLogger("peftlab").level < logging.WARNING


def eval_batches(loader, accelerator):
    """An evaluation's batches with a progress bar where progress_shown (it goes when the evaluation ends): a generation
    pass over an LLM's eval split, in the loop or at the end, ran for minutes without a sign of life."""
    from tqdm.auto import tqdm

    return tqdm(loader, desc="eval", unit="batch", leave=False, dynamic_ncols=True, disable=not progress_shown(accelerator))


def shards_weights(accelerator) -> bool:
    """FSDP and DeepSpeed ZeRO-3 keep only a slice of each weight on every rank."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    return accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3


def precision_dtype(precision: str) -> torch.dtype:
    """The dtype of a resolved train.precision's matmuls (bf16, fp16; fp32 -> float32)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def half_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved train.precision (or an Accelerator's mixed_precision); None: no autocast."""
    dtype = precision_dtype(precision)
    return None if dtype == torch.float32 else dtype


def autocast_dtype(accelerator) -> torch.dtype | None:
    """The dtype the Accelerator's autocast computes matmuls in; None without mixed precision (and under DeepSpeed or
    FSDP, which hold the weights themselves)."""
    if accelerator.distributed_type.name in ("DEEPSPEED", "FSDP", "MEGATRON_LM"):
        return None
    return half_dtype(accelerator.mixed_precision)


def cpu_compute_dtype(default: torch.dtype) -> torch.dtype:
    """The dtype a CPU matmul computes in right now: autocast's while CPU autocast is on, else `default` (the
    operands' own dtype), for code that does its matmuls with autocast off and must match what autocast would do."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else default


# adapters whose forward reads the base weight only through base_layer(x); DoRA and the other LoRA variants read it
# themselves (the weight norm), and a tuner not named here is left alone
BASE_BY_FORWARD = ("lora", "adalora", "ia3", "loha", "lokr", "vera", "oft")


def reads_base_by_forward(layer) -> bool:
    peft_class = next((c for c in type(layer).__mro__ if c.__module__.startswith("peft.")), type(layer))  # the
    package = peft_class.__module__.split(".") + [""]  # peft class it is or extends (FusedLoraLinear: lora's Linear)
    known = package[:2] == ["peft", "tuners"] and package[2] in BASE_BY_FORWARD
    return known and not getattr(layer, "lora_variant", None)


def castable_weights(model) -> list[torch.nn.Parameter]:
    """The fp32 weights and biases of plain nn.Linear layers that nothing trains and nothing reads outside the layer's
    own forward: not a tied embedding (SmolLM2's head), not an adapter's own layers, not the base of a DoRA layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    skip = set()  # an adapter's own layers (peft reads their dtypes), and the bases of adapters that read them themselves
    for m in model.modules():
        if isinstance(m, BaseTunerLayer):
            base = m.get_base_layer()
            skip |= {id(x) for x in m.modules() if x is not base or not reads_base_by_forward(m)}
    shared = {id(p) for m in model.modules() if type(m) is not torch.nn.Linear for p in m.parameters(recurse=False)}
    found = {}
    for m in model.modules():
        if type(m) is torch.nn.Linear and id(m) not in skip:
            for p in (m.weight, m.bias):
                if p is not None and not p.requires_grad and p.dtype == torch.float32 and id(p) not in shared:
                    found[id(p)] = p
    return list(found.values())


class FrozenWeightsCast:
    """train.cast_frozen: under bf16/fp16 autocast, the frozen linear weights are cast once, on entering, and put back
    on leaving. Autocast caches the cast of a weight only while it requires a gradient, so a frozen base is cast anew
    at every forward (for all-MiniLM-L6-v2, 10.8M weights a step: 1.06x a step on an AMX CPU; for an LLM on an fp32
    base, the whole model per generated token: 1.23x in generation). The copies hold the numbers autocast would have
    made, so the results are the same; they sit beside the fp32 weights (+50% of those weights' memory) while inside.
    `suspended()` shows the fp32 weights again (to write a checkpoint)."""

    def __init__(self, model, dtype: torch.dtype | None):
        self.params = castable_weights(model) if dtype is not None else []
        self.dtype, self.full, self.low = dtype, [], []

    def __enter__(self) -> FrozenWeightsCast:
        self.full = [p.data for p in self.params]
        self.low = [w.to(self.dtype) for w in self.full]
        self.show(low=True)
        return self

    def __exit__(self, *exc) -> None:
        self.show(low=False)
        self.full, self.low = [], []

    @contextmanager
    def suspended(self):
        self.show(low=False)
        try:
            yield
        finally:
            self.show(low=True)

    def show(self, *, low: bool) -> None:
        """Point each weight at its cast copy (low) or at its fp32 tensor; between a forward and its backward, never."""
        for p, w in zip(self.params, self.low if low else self.full):
            p.data = w
