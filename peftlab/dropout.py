"""Dropout with cheap random masks on CPU (`train.dropout_impl: fast`).

torch's CPU dropout draws its mask with `bernoulli_`, one generator call per element: ~770 us for a 416 x 384
activation at one thread, 55x the cost of multiplying it by the mask, and ~25% of a MiniLM LoRA training step
(benchmarks/throughput.py, ablation "torch dropout"). `FastDropout` draws 64 random bits per 4 elements from the same
seeded generator and keeps an element when its 16 bits clear a threshold: the keep probability is 1 - p to within
1/65536, the surviving elements are scaled by 1 / (1 - p) as in `nn.Dropout`, and the backward pass multiplies by
the same boolean mask (torch's CPU dropout keeps its mask as a float tensor of the input's dtype: 4x the memory in
fp32, 1.8 GB of a SmolLM2 LoRA SFT run's peak). On other devices it is `nn.Dropout` (fused kernels there).
"""

from __future__ import annotations

import torch
from torch import nn

_LEVELS = 1 << 16  # 16 random bits per element


class _MaskedScale(torch.autograd.Function):
    """x * keep * scale, saving the boolean mask (1 byte per element, as torch's native dropout does)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x * keep.to(x.dtype).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return grad * keep.to(grad.dtype).mul_(ctx.scale), None, None


def keep_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """A boolean mask of `shape`, each element True with probability 1 - p (to within 1/65536)."""
    n = shape.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(1 << 63), (1 << 63) - 1)  # the default generator
    bits = words.view(torch.int16)[:n].view(shape)  # uniform over [-32768, 32767]
    return bits >= round(p * _LEVELS) - _LEVELS // 2


class FastDropout(nn.Dropout):
    """`nn.Dropout` whose CPU mask costs ~3x less to draw (module docstring). Same `p`, `inplace` is ignored."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or not x.is_floating_point():
            return super().forward(x)
        if self.p == 1:
            return x * 0
        return _MaskedScale.apply(x, keep_mask(x.shape, self.p), 1.0 / (1.0 - self.p))


def use_fast_dropout(model: nn.Module) -> int:
    """Replace every `nn.Dropout` module of `model` (the base's and peft's `lora_dropout`) by a `FastDropout` with the
    same p, in place -> how many were replaced. Dropout applied inside fused ops (SDPA's `dropout_p`) is untouched."""
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.Dropout]
    for parent, name, child in swaps:
        setattr(parent, name, FastDropout(child.p))
    return len(swaps)
