"""Dropout with cheap random masks on CPU (`train.dropout_impl: fast`).

torch's CPU dropout draws its mask with `bernoulli_`, one generator call per element: ~770 us for a 416 x 384
activation at one thread, 55x the cost of multiplying it by the mask, and ~25% of a MiniLM LoRA training step
(benchmarks/throughput.py, ablation "torch dropout"). `FastDropout` draws 64 random bits per 4 elements from the same
seeded generator and keeps an element when its 16 bits clear a threshold: the keep probability is 1 - p to within
1/65536, the surviving elements are scaled by 1 / (1 - p) as in `nn.Dropout`, and the backward pass multiplies by
the same mask, kept as 1 byte per element (torch's CPU dropout keeps its mask as a float tensor of the input's dtype:
4x the memory in fp32, 1.8 GB of a SmolLM2 LoRA SFT run's peak). For p < SPARSE_BELOW (LoRA's usual 0.05-0.1, BERT's
0.1) it draws only the positions of the dropped elements instead (`dropped_positions`: ~p * n random floats, not 16
bits per element), zeroes them after scaling, and keeps just those positions for the backward pass (4p bytes per
element): at p = 0.05, forward and backward, 2-3x cheaper on SmolLM2's activations (1.4-1.7x on MiniLM's smaller
ones), which is ~10% of a SmolLM2 LoRA SFT step (210 adapter dropouts a micro-batch). On other devices it is
`nn.Dropout` (fused kernels there).

The same masks serve the dropout on attention probabilities: transformers' `sdpa` attention hands it to
`scaled_dot_product_attention(dropout_p=p)`, which on CPU has no fused kernel with dropout and falls back to its
math path with a `bernoulli_` mask (1.7 ms a layer for a 32 x 13-token batch of MiniLM, 13 ms at 50 tokens).
`use_fast_dropout` switches models on `sdpa` to `cpu_training_attention`, which in training on CPU:
- with `train.packed_attention: per_example` (the default), on packed rows (an SFT row holding several examples,
  position ids restarting at each: masking_utils then gives `sdpa` a block-diagonal causal mask over the whole row)
  and no attention dropout, attends within each example, causal, and never computes the row's cross-example blocks
  (`_ExampleAttention`): 1.20x a SmolLM2 SFT step (4 x 504 tokens; `sdpa`'s CPU kernel walks the whole masked square);
- with attention dropout, computes softmax(q k^T * scale + mask) with a `FastDropout` mask, then @ v (forward and
  backward 1.3x-2.2x faster at 13-128 tokens);
and in every other case (evaluation, GPUs, no dropout on unpacked rows, causal attention without a mask, grouped KV
heads with dropout) is transformers' `sdpa` function itself, so evaluation and export are unchanged. Both paths
compute the scores in the autocast dtype and the softmax in fp32, as transformers' eager attention does.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from .accel import cpu_compute_dtype

_LEVELS = 1 << 16  # 16 random bits per element


class _MaskedScale(torch.autograd.Function):
    """x * scale * keep, saving the 0/1 uint8 mask (1 byte per element, as torch's native dropout does).

    Scaled first, by the Python float: torch multiplies a bf16/fp16 tensor by a scalar in fp32 and rounds once, so
    a bf16 x gives exactly its fp32 copy's result rounded to bf16 (scaling the mask in bf16 first would round 1 / (1 - p)
    itself: 1/0.95 becomes 1.0547). The mask's 0/1 then multiplies exactly."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(scale).mul_(keep)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return grad.mul(ctx.scale).mul_(keep), None, None


def keep_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """A 0/1 uint8 mask of `shape`, each element 1 with probability 1 - p (to within 1/65536).

    uint8, not bool, and no comparison: on CPU, ops that make or read bool tensors are not vectorized (a compare ~80
    us, a bool -> float cast ~85 us for a 245,760-element activation, against ~15 us for the same work on uint8), so
    the mask is `clamp(bits - threshold + 1, 0, 1)` in int32 (bits >= threshold, exactly), and using it costs one
    uint8 -> float cast, as cheap as a multiply."""
    n = shape.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(1 << 63), (1 << 63) - 1)  # the default generator
    bits = words.view(torch.int16)[:n].view(shape)  # uniform over [-32768, 32767]
    threshold = round(p * _LEVELS) - _LEVELS // 2  # kept: bits >= threshold
    return bits.to(torch.int32).sub_(threshold - 1).clamp_(0, 1).to(torch.uint8)


class FastDropout(nn.Dropout):
    """`nn.Dropout` whose CPU mask costs ~3x less to draw (module docstring). Same `p`, `inplace` is ignored."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or not x.is_floating_point():
            return super().forward(x)
        if self.p == 1:
            return x * 0
        return masked_dropout(x, self.p)


class _DropPositions(torch.autograd.Function):
    """x * scale with the elements at `positions` (flat, row-major) zeroed; saves only the positions (int32 when they
    fit: 4p bytes per element, 0.2 at p = 0.05, against the uint8 mask's 1). x scaled first, as in _MaskedScale."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(compact(positions, x.numel()))
        ctx.scale = scale
        return _zero_at(x.mul(scale), positions)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (positions,) = ctx.saved_tensors
        return _zero_at(grad.mul(ctx.scale), positions.long()), None, None


def _zero_at(y: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    y = y.contiguous()  # a new tensor already; positions count in row-major order
    y.view(-1).index_fill_(0, positions, 0)
    return y


def compact(drop: torch.Tensor, n: int) -> torch.Tensor:
    """`draw_drop`'s record as kept for a backward pass: positions as int32 when they fit (4p bytes an element)."""
    return drop.to(torch.int32) if drop.dtype == torch.int64 and n < 1 << 31 else drop


def draw_drop(shape: torch.Size, p: float) -> torch.Tensor:
    """What `masked_dropout` drops from a tensor of `shape`, drawn as it draws it: below SPARSE_BELOW the flat positions
    of the dropped elements (`dropped_positions`, int64), otherwise the uint8 `keep_mask`. Read at call time, so
    benchmarks/step_levers.py's levers reach every user (FastDropout, attention dropout, fused LoRA layers)."""
    return dropped_positions(shape.numel(), p) if p < SPARSE_BELOW else keep_mask(shape, p)


def zero_dropped(t: torch.Tensor, drop: torch.Tensor) -> None:
    """Zero, in place, the elements of the contiguous `t` that `drop` (`draw_drop`'s record, or its `compact` form) drops."""
    if drop.dtype == torch.uint8:
        t.mul_(drop)
    else:
        _zero_at(t, drop.long())


def dropped_positions(n: int, p: float, draw: int | None = None) -> torch.Tensor:
    """The sorted flat positions of the elements dropped from n, each independently with probability p: a Bernoulli(p)
    sequence drawn as its gaps, which are i.i.d. geometric (gap = floor(log(1 - U) / log(1 - p)), U uniform on
    torch.rand's 2^-24 grid, so each gap's probabilities are exact to within 2^-24). For small p this draws ~p * n
    random floats instead of 16 bits for every element: 0.05 * n 32-bit draws at p = 0.05, where `keep_mask` takes
    0.5 * n. Gaps are drawn `draw` at a time (default: enough to pass n with probability ~1 - 1e-9) until they pass n;
    the generator's stream is read in order, so `draw` does not change the positions."""
    per_gap = 1.0 / math.log1p(-p)
    draw = draw or int(n * p + 6 * (n * p * (1 - p)) ** 0.5) + 16
    parts, last = [], -1  # the last position drawn so far
    while last < n - 1:
        steps = torch.rand(draw).neg_().log1p_().mul_(per_gap).add_(1).to(torch.int64)  # gap + 1: to the next drop
        parts.append(steps.cumsum_(0).add_(last))
        last = int(parts[-1][-1])
    if not parts:  # n == 0
        return torch.empty(0, dtype=torch.int64)
    positions = parts[0] if len(parts) == 1 else torch.cat(parts)
    return positions[: int(torch.searchsorted(positions, n))]


SPARSE_BELOW = 0.15  # masked_dropout draws the dropped positions below this p, a keep mask from it on (the crossover
# of the two, forward and backward, on 2 cores of an AVX-512 EPYC: 1.2-3x at p = 0.05, 0.9-1.75x at 0.15, 0.7-1.1x at 0.3)


def masked_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """x with a random p of its elements zeroed and the survivors scaled by 1 / (1 - p), for 0 < p < 1: below
    SPARSE_BELOW from `dropped_positions` (1.4-3x cheaper at p = 0.05, forward and backward), otherwise a `keep_mask`."""
    drop = draw_drop(x.shape, p)
    return (_MaskedScale if drop.dtype == torch.uint8 else _DropPositions).apply(x, drop, 1.0 / (1.0 - p))


ATTENTION = "peftlab_cpu_training"  # the names registered with transformers' attention and mask interfaces
ATTENTION_PER_EXAMPLE = "peftlab_cpu_training_per_example"  # the same, packed rows attended per example


def cpu_training_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           is_causal: bool | None = None, per_example: bool = False, **kwargs):
    """transformers' attention-function signature (AttentionInterface); module docstring. Same result as `sdpa` (in
    expectation, with dropout), with attention-probability masks from `keep_mask`, and packed rows attended per
    example when `per_example` (registered as ATTENTION_PER_EXAMPLE)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    scale = query.size(-1) ** -0.5 if scaling is None else scaling
    cpu_training = (module.training and query.device.type == "cpu"
                    and all(kwargs.get(k) is None for k in ("position_bias", "softcap")))
    if (per_example and cpu_training and dropout == 0
            and (examples := packed_examples(kwargs.get("position_ids"), attention_mask)) is not None):
        return _ExampleAttention.apply(query, key, value, examples, scale), None
    causal_unmasked = attention_mask is None and (is_causal if is_causal is not None else getattr(module, "is_causal", False))
    if not cpu_training or dropout == 0 or causal_unmasked or getattr(module, "num_key_value_groups", 1) > 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:  # sdpa's mask: True = attend
            attention_mask = torch.zeros(attention_mask.shape, dtype=scores.dtype).masked_fill_(
                ~attention_mask, torch.finfo(scores.dtype).min)
        scores = scores + attention_mask
    probs = masked_dropout(torch.softmax(scores, dim=-1), dropout)
    return torch.matmul(probs.to(value.dtype), value).transpose(1, 2).contiguous(), None


_last_packed: list = [None, None, None]  # (position_ids, mask, examples): every layer of a forward gets the same two


def packed_examples(position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> list[list[tuple[int, int]]] | None:
    """Per row, the [start, end) of each example, when `attention_mask` is exactly the block-diagonal causal mask that
    packed rows' `position_ids` give (an example starts where its position is 0; a row's padding is an example of its
    own); else None (padded rows, a cache, any other mask). Checked once per forward (the layers share both tensors)."""
    if _last_packed[0] is position_ids and _last_packed[1] is attention_mask:
        return _last_packed[2]
    examples = None
    if (position_ids is not None and position_ids.dim() == 2 and attention_mask is not None
            and attention_mask.dtype == torch.bool and attention_mask.dim() == 4
            and attention_mask.shape[:2] == (position_ids.shape[0], 1) and attention_mask.shape[-2:] == (position_ids.shape[1],) * 2):
        starts = position_ids == 0
        starts[:, 0] = True
        example = starts.cumsum(1)
        causal = torch.ones(attention_mask.shape[-2:], dtype=torch.bool, device=example.device).tril()
        if torch.equal(attention_mask[:, 0], (example[:, :, None] == example[:, None, :]) & causal):
            n = position_ids.shape[1]
            examples = [list(zip(s, [*s[1:], n])) for s in (row.nonzero().flatten().tolist() for row in starts)]
    _last_packed[:] = [position_ids, attention_mask, examples]
    return examples


class _ExampleAttention(torch.autograd.Function):
    """Causal attention within each packed example. Saves each example's probabilities once, in the compute dtype (bf16
    in CPU training: 2 bytes a score, where autograd through softmax and matmul would keep the fp32 probabilities and
    their bf16 copy), and computes the backward pass from them with torch's fused softmax backward. A grouped KV
    head's query heads are stacked into one matrix (kv heads, heads per kv head x n, dim), so each product is one
    batched GEMM over the KV heads: the GEMM sums the group's key and value gradients, nothing is broadcast, and only
    q is copied (stacked). The scale and the causal mask enter the scores' GEMM (`baddbmm` with an additive -inf bias, alpha = the
    scale; summed in fp32, rounded once), the softmax reads and writes the compute dtype (torch computes it in fp32: the same
    bits as an fp32 softmax rounded), and the backward scales the (n x dim) gradients, not the (n x n) scores. One
    SmolLM2 layer (4 packed rows x 504 tokens, 9 heads, 3 KV heads, bf16, 2 threads), forward and backward: 1.2-1.3x
    the stop-49 formulation, 3.5-3.8x `sdpa`'s over the row's block-diagonal mask. Matmuls in sdpa's dtype: autocast's,
    else v's (under autocast q and k can arrive in fp32, rotated by fp32 positions, and v too from a layer that
    returns its input's dtype, as bitsandbytes' 4-bit layers do); gradients go back in each input's dtype.
    (batch, heads, tokens, dim) inputs -> (batch, tokens, heads, dim)."""

    @staticmethod
    def forward(ctx, query, key, value, examples, scale):
        ctx.dtypes = query.dtype, key.dtype, value.dtype
        dtype = cpu_compute_dtype(value.dtype)  # as sdpa's
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
        out = value.new_empty(query.shape[0], query.shape[2], query.shape[1], query.shape[3])
        groups, longest = query.shape[1] // key.shape[1], max(end - start for row in examples for start, end in row)
        later = torch.ones(longest, longest, dtype=torch.bool).triu_(1)  # True = a later key, masked
        causal = torch.zeros(longest, longest, dtype=dtype).masked_fill_(later, float("-inf"))
        probs = []
        with torch.autocast("cpu", enabled=False):  # everything in `dtype`, also what the backward pass reads
            for i, start, end, q, k, v in _blocks(query, key, value, examples):
                n = end - start
                scores = torch.baddbmm(causal[:n, :n].repeat(groups, 1), q, k.transpose(1, 2), alpha=scale)
                probs.append(torch.softmax(scores, dim=-1))
                out[i, start:end] = torch.bmm(probs[-1], v).view(query.shape[1], n, -1).transpose(0, 1)
        ctx.save_for_backward(query, key, value, *probs)
        ctx.examples, ctx.scale = examples, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, *probs = ctx.saved_tensors
        grad_out = grad_out.to(value.dtype)
        grads = [torch.empty_like(t) for t in (query, key, value)]
        for (i, start, end, q, k, v), p in zip(_blocks(query, key, value, ctx.examples), probs):
            rows = slice(start, end)
            d_out = grad_out[i, rows].transpose(0, 1).reshape(q.shape)
            grads[2][i, :, rows] = torch.bmm(p.transpose(1, 2), d_out)
            d_scores = torch._softmax_backward_data(torch.bmm(d_out, v.transpose(1, 2)), p, -1, p.dtype)
            grads[0][i, :, rows] = torch.bmm(d_scores, k).mul_(ctx.scale).view(query.shape[1], end - start, -1)
            grads[1][i, :, rows] = torch.bmm(d_scores.transpose(1, 2), q).mul_(ctx.scale)
        return (*(g.to(d) for g, d in zip(grads, ctx.dtypes)), None, None)


def _blocks(query, key, value, examples):
    """(row, start, end, q, k, v) per packed example: q as (kv heads, heads per kv head x n, dim) (a copy: the group's
    query heads stacked), k and v as (kv heads, n, dim) views."""
    kv_heads, groups = key.shape[1], query.shape[1] // key.shape[1]
    for i, row in enumerate(examples):
        for start, end in row:
            yield (i, start, end, query[i, :, start:end].reshape(kv_heads, groups * (end - start), -1),
                   key[i, :, start:end], value[i, :, start:end])


def use_fast_dropout(model: nn.Module, per_example: bool = False) -> int:
    """Replace every `nn.Dropout` module of `model` (the base's and peft's `lora_dropout`) by a `FastDropout` with the
    same p, in place -> how many were replaced; and switch every transformers config of the model on `sdpa` attention
    to `cpu_training_attention` (module docstring; not saved with the config: transformers does not serialise it),
    attending packed rows per example if `per_example` (`train.packed_attention: per_example`)."""
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.Dropout]
    for parent, name, child in swaps:
        setattr(parent, name, FastDropout(child.p))
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None
               and getattr(c, "_attn_implementation", None) == "sdpa"}
    if configs:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

        AttentionInterface.register(ATTENTION, cpu_training_attention)
        AttentionInterface.register(ATTENTION_PER_EXAMPLE, functools.partial(cpu_training_attention, per_example=True))
        for name in (ATTENTION, ATTENTION_PER_EXAMPLE):  # the masks `sdpa` gets: boolean, or None when none is needed
            ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
        for config in configs.values():
            config._attn_implementation = ATTENTION_PER_EXAMPLE if per_example else ATTENTION
    return len(swaps)
