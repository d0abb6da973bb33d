"""LoRA linear layers as one autograd function in CPU training (`train.lora_impl: fused`).

peft computes a LoRA layer as `base(x) + lora_B(lora_A(dropout(x))) * scaling`: under bf16 autocast on an fp32
residual stream that is, forward, a dropout over the fp32 input, casts of x for the base and for lora_A, a full-size
multiply by `scaling` and a full-size add; backward, the multiply again, a cast of the adapter's input gradient to
fp32, the dropout's backward in fp32, the base's input gradient cast and one more full-size add. Each is a pass over
a (tokens x features) tensor, and a SmolLM2 micro-batch has 210 LoRA layers.

`FusedLoraLinear.forward` computes the same function with fewer passes:
- forward: x cast once; the adapter's input is `x * 1/(1-p)` written straight into the compute dtype (torch does the
  product in fp32 and rounds once, as peft's dropout-then-cast does) with the dropped elements zeroed, drawn exactly
  as `peftlab.dropout.masked_dropout` draws them (`draw_drop`); `h = x_dropped @ A^T`; then `out.addmm_(h, B^T, alpha=scaling)`
  adds the adapter into the base's output inside the GEMM (scaled and summed in fp32, rounded once);
- backward: `dh = g @ B * scaling` ([tokens, r]), the weight gradients from `h` and the dropped input, and the input
  gradient `g @ W` plus the adapter's `dh @ A` with its dropped elements zeroed, added with `alpha = 1/(1-p)` in one
  pass, in x's dtype.
It saves what autocast would (the cast weight, the adapter's dropped input, `h`) plus the dropout's record. On 2 AVX-512
bf16 cores a SmolLM2 SFT step is 1.17x as fast as with peft's forward (benchmarks/README.md, stop 52).

Only the common case takes this path: training on CPU with gradients on, one active adapter, plain LoRA (no DoRA or
other variant, no LoRA bias), unmerged, a frozen `nn.Linear` base or a bitsandbytes `Linear4bit` one (QLoRA: its
packed weight dequantized into the compute dtype for the forward product and again for the backward one, as
bitsandbytes' own matmul does, and never kept; the result in x's dtype, as `Linear4bit` returns it), dropout from
`peftlab.dropout.FastDropout` or none (`train.dropout_impl: torch` keeps peft's path, and its `nn.Dropout`), and either
bf16/fp16 autocast (for a 4-bit base: computing in autocast's dtype) or one dtype for x, the base and the adapter.
Everything else (evaluation, generation, merging, GPUs, 8-bit bases, mixed-adapter batches) is peft's own forward,
unchanged.
"""

from __future__ import annotations

import functools

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from .accel import cpu_compute_dtype
from .dropout import FastDropout, compact, draw_drop, zero_dropped


class _LoraLinear(torch.autograd.Function):
    """base(x) + B @ A @ dropout(x) * scaling in `dtype` (module docstring). Inputs: x, the base's weight and bias
    (frozen), lora_A's and lora_B's weights, scaling, p, dtype, and for a 4-bit base its bitsandbytes quant state (the
    weight is then the packed one, dequantized into `dtype` for each product and never saved, and the result comes
    back in x's dtype, as bitsandbytes' `Linear4bit` returns it)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, p: float, dtype: torch.dtype, quant_state=None):
        rows = x.reshape(-1, x.shape[-1])
        with torch.autocast(x.device.type, enabled=False):
            w, a, b, cast = _base_weight(weight, quant_state, dtype), lora_a.to(dtype), lora_b.to(dtype), rows.to(dtype)
            out = torch.nn.functional.linear(cast, w, None if bias is None else bias.to(dtype))
            dropped, drop = cast, None
            if p > 0:  # x / (1 - p) in fp32, rounded once into dtype, then the dropped elements zeroed
                dropped = torch.mul(rows, 1.0 / (1.0 - p), out=torch.empty(rows.shape, dtype=dtype))
                drop = draw_drop(rows.shape, p)
                zero_dropped(dropped, drop)
            h = dropped @ a.t()
            out.addmm_(h, b.t(), alpha=scaling)
        ctx.save_for_backward(weight if quant_state is not None else w, dropped, h, a, b,
                              None if drop is None else compact(drop, rows.numel()))
        ctx.scaling, ctx.p, ctx.x_dtype, ctx.x_shape, ctx.lora_dtype = scaling, p, x.dtype, x.shape, lora_a.dtype
        ctx.quant_state, ctx.dtype = quant_state, dtype
        out = out.view(*x.shape[:-1], out.shape[-1])
        return out if quant_state is None else out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        w, dropped, h, a, b, drop = ctx.saved_tensors
        w = _base_weight(w, ctx.quant_state, ctx.dtype)
        g = grad.reshape(-1, grad.shape[-1]).to(w.dtype)
        dh = torch.mm(g, b).mul_(ctx.scaling)
        grad_a = torch.mm(dh.t(), dropped).to(ctx.lora_dtype) if ctx.needs_input_grad[3] else None
        grad_b = torch.mm(g.t(), h).to(ctx.lora_dtype).mul_(ctx.scaling) if ctx.needs_input_grad[4] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g, w).to(ctx.x_dtype)
            adapter = torch.mm(dh, a)
            if drop is not None:
                zero_dropped(adapter, drop)
            grad_x = grad_x.add_(adapter, alpha=1.0 / (1.0 - ctx.p)).view(ctx.x_shape)  # alpha 1 when p = 0
        return grad_x, None, None, grad_a, grad_b, None, None, None, None


def _base_weight(weight: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor:
    """The base's weight in `dtype`: a cast, or for a 4-bit base (`quant_state` given) bitsandbytes' dequantization."""
    if quant_state is None:
        return weight.to(dtype)
    import bitsandbytes as bnb

    return bnb.functional.dequantize_4bit(weight, quant_state).to(dtype)


class _FusedForward:
    """The forward of the fused classes: `_LoraLinear` where it computes the call as peft would, else peft's own."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._fusable(x, args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        base, drop = self.base_layer, self.lora_dropout[name]
        dtype = cpu_compute_dtype(x.dtype)
        return _LoraLinear.apply(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                                 self.scaling[name], drop.p if isinstance(drop, FastDropout) else 0.0, dtype,
                                 self._quant_state())

    def _fusable(self, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
        """The active adapter's name when the fused path computes this call as peft would; else None."""
        if (args or kwargs or not self.training or not torch.is_grad_enabled() or x.device.type != "cpu"
                or self.disable_adapters or self.merged or len(self.active_adapters) != 1):
            return None
        name, base = self.active_adapters[0], self.base_layer
        if name not in self.lora_A or name in self.lora_variant or self.lora_B[name].bias is not None:
            return None
        base_dtype = self._base_dtype()
        if base_dtype is None or base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
            return None
        drop = self.lora_dropout[name]
        if not (isinstance(drop, FastDropout) and drop.p < 1 or type(drop) is nn.Identity):
            return None
        if not getattr(self, "cast_input_dtype_enabled", True) or getattr(self, "fan_in_fan_out", False):
            return None
        a = self.lora_A[name].weight
        if torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
            if self._quant_state() is not None and (base_dtype != dtype or x.dtype not in (dtype, torch.float32)):
                return None  # bitsandbytes computes in its compute dtype, whatever autocast says
            return name if dtype in (torch.bfloat16, torch.float16) else None
        return name if x.dtype == base_dtype == a.dtype == self.lora_B[name].weight.dtype else None

    def _base_dtype(self) -> torch.dtype | None:
        """The dtype the base computes in, or None where the fused path does not read this kind of base."""
        return self.base_layer.weight.dtype if type(self.base_layer) is nn.Linear else None

    def _quant_state(self):
        return None


class FusedLoraLinear(_FusedForward, LoraLinear):
    """peft's LoRA `Linear`, computed by `_LoraLinear` where it can be (module docstring), else by peft. `use_fused_lora`
    puts layers in this class; their weights, state-dict keys and saved adapters are peft's."""


@functools.cache
def _fused_4bit_class():
    """(peft's LoRA layer over a bitsandbytes `Linear4bit` (QLoRA), its fused twin), or None when bitsandbytes is not
    installed. The twin reads the packed weight through `_LoraLinear`'s quant state: dequantized for the forward
    product and again for the backward one, as bitsandbytes' own matmul does, and never kept."""
    from peft.import_utils import is_bnb_4bit_available

    if not is_bnb_4bit_available():
        return None
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    class FusedLoraLinear4bit(_FusedForward, LoraLinear4bit):
        def _base_dtype(self) -> torch.dtype | None:
            base = self.base_layer
            return base.compute_dtype if type(base) is bnb.nn.Linear4bit and self._quant_state() is not None else None

        def _quant_state(self):
            state = getattr(self.base_layer.weight, "quant_state", None)  # packed for CPU inference: not this path
            return None if state is None or getattr(state, "packing_format_for_cpu", False) else state

    return LoraLinear4bit, FusedLoraLinear4bit


def use_fused_lora(model: nn.Module) -> int:
    """Put every peft LoRA `Linear` of `model` in `FusedLoraLinear`, and every LoRA layer over a 4-bit base in its
    4-bit twin, in place -> how many. Call after `peftlab.dropout.use_fast_dropout` (the fused path draws its dropout
    only where that made a `FastDropout`)."""
    classes = {LoraLinear: FusedLoraLinear}
    if (fused_4bit := _fused_4bit_class()) is not None:
        classes[fused_4bit[0]] = fused_4bit[1]
    layers = [m for m in model.modules() if type(m) in classes]
    for layer in layers:
        layer.__class__ = classes[type(layer)]
    return len(layers)
