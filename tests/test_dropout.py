"""train.dropout_impl: fast: the cheap CPU dropout masks keep nn.Dropout's semantics and replace every dropout module;
runs with dropout are reproducible, resume to the same masks, and evaluating more often does not change them."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from peftlab import build_model, run
from peftlab.dropout import ATTENTION, SPARSE_BELOW, FastDropout, cpu_training_attention, dropped_positions, keep_mask, masked_dropout, use_fast_dropout

from .conftest import logits, losses


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_keep_mask_keeps_one_minus_p(p):
    torch.manual_seed(0)
    mask = keep_mask(torch.Size([1000, 1000]), p)
    assert mask.dtype == torch.uint8 and mask.shape == (1000, 1000)
    assert mask.float().mean().item() == pytest.approx(1 - p, abs=0.003)  # 6 standard errors at most
    assert mask[:, :500].float().mean().item() == pytest.approx(mask[:, 500:].float().mean().item(), abs=0.006)  # no position bias
    assert keep_mask(torch.Size([7, 3]), 0.0).all()  # odd sizes: the 64-bit draw is cut to the element count


@pytest.mark.parametrize("p", [0.001, 0.1, 0.999])
def test_keep_mask_is_exactly_the_16_bit_comparison(p):
    """The uint8 mask is computed without a compare (bool ops are slow on CPU): it must still be exactly `bits >=
    threshold` over the whole int16 range, with no wrap-around at either end."""
    torch.manual_seed(3)
    mask = keep_mask(torch.Size([4001]), p)
    torch.manual_seed(3)
    bits = torch.empty(1001, dtype=torch.int64).random_(-(1 << 63), (1 << 63) - 1).view(torch.int16)[:4001]
    assert set(mask.unique().tolist()) <= {0, 1}
    assert torch.equal(mask.bool(), bits >= round(p * 65536) - 32768)


@pytest.mark.parametrize("p", [0.001, 0.05, 0.14])
def test_dropped_positions_are_a_bernoulli_sequence(p):
    """Each element dropped independently with probability p: the rate, no position bias (none at the end, where the
    gaps are cut), and independence of neighbours (a drop is followed by a drop with probability p, by a gap of
    exactly k with probability p (1 - p)^k)."""
    n = 2_000_000
    torch.manual_seed(0)
    pos = dropped_positions(n, p)
    assert pos.dtype == torch.int64 and pos.ndim == 1
    assert pos[0] >= 0 and pos[-1] < n and bool((pos[1:] > pos[:-1]).all())  # sorted, distinct, in range
    sd = (p * (1 - p) / n) ** 0.5
    assert len(pos) / n == pytest.approx(p, abs=6 * sd)
    for quarter in range(4):  # the same rate in every quarter, the last included
        in_quarter = ((pos >= quarter * n // 4) & (pos < (quarter + 1) * n // 4)).sum().item()
        assert in_quarter / (n // 4) == pytest.approx(p, abs=12 * sd)
    gaps = pos[1:] - pos[:-1] - 1
    for k in range(3):
        want = p * (1 - p) ** k
        assert (gaps == k).float().mean().item() == pytest.approx(want, abs=6 * (want / len(gaps)) ** 0.5 + 1e-9)


def test_dropped_positions_do_not_depend_on_how_many_gaps_are_drawn_at_once():
    """The gaps are drawn in chunks until they pass n: chunks of 3 (hundreds of rounds) read the generator's stream
    in the same order as one large draw, so they give exactly the same positions; tiny inputs work too."""
    torch.manual_seed(2)
    once = dropped_positions(20_000, 0.05)
    torch.manual_seed(2)
    assert torch.equal(dropped_positions(20_000, 0.05, draw=3), once)
    assert dropped_positions(0, 0.1).numel() == 0
    assert masked_dropout(torch.randn(0, 5), 0.1).shape == (0, 5)  # an empty input
    torch.manual_seed(2)
    tiny = [dropped_positions(1, 0.1) for _ in range(2000)]
    assert all(t.numel() in (0, 1) and (t.numel() == 0 or t.item() == 0) for t in tiny)
    assert sum(t.numel() for t in tiny) / 2000 == pytest.approx(0.1, abs=0.04)


@pytest.mark.parametrize("p", [0.05, 0.25])  # below SPARSE_BELOW the dropped positions are drawn, from it a keep mask
def test_fast_dropout_behaves_like_nn_dropout(p):
    assert (p < SPARSE_BELOW) == (p == 0.05)
    x = torch.randn(64, 48, requires_grad=True)
    drop = FastDropout(p)
    torch.manual_seed(1)
    y = drop(x)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))  # survivors scaled by 1 / (1 - p), the rest zero
    assert kept.float().mean().item() == pytest.approx(1 - p, abs=0.05)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / (1 - p))  # the same mask and scale in the backward pass
    torch.manual_seed(1)
    torch.testing.assert_close(drop(x), y)  # seeded like torch's dropout
    assert not torch.equal(drop(x), y)  # and a new mask each call
    ones = torch.ones(1000, 1000)
    assert drop(ones).mean().item() == pytest.approx(1.0, abs=0.01)  # the expectation is kept
    assert drop(ones.bfloat16()).dtype == torch.bfloat16
    assert torch.equal(drop.eval()(x), x)  # evaluation: the identity


@pytest.mark.parametrize("p", [0.05, 0.3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_dropout_in_half_precision_is_its_fp32_result_rounded(dtype, p):
    """A bf16/fp16 input (and its gradient) gives exactly what its fp32 copy gives, rounded once: the scale 1 / (1 - p)
    is not itself rounded to the half dtype. Under bf16 autocast a base's dropouts get bf16 activations (MiniLM's after
    each dense layer); before stop 50 their survivors were scaled by 1/0.9 rounded to bf16 (1.109, -0.16%)."""
    drop = FastDropout(p)
    x = torch.randn(8, 512).to(dtype)
    grad = torch.randn(8, 512).to(dtype)
    out, grads = {}, {}
    for side in (dtype, torch.float32):
        source = x.to(side, copy=True).requires_grad_(True)
        torch.manual_seed(4)
        out[side] = drop(source)
        out[side].backward(grad.to(side))
        grads[side] = source.grad
    assert out[dtype].dtype == dtype and grads[dtype].dtype == dtype
    assert torch.equal(out[dtype], out[torch.float32].to(dtype))
    assert torch.equal(grads[dtype], grads[torch.float32].to(dtype))
    assert (out[dtype] != 0).float().mean().item() == pytest.approx(1 - p, abs=0.03)


def test_fast_dropout_keeps_at_most_a_byte_an_element_for_the_backward_pass():
    """torch's CPU dropout saves a float mask of the input's dtype (4 bytes an element in fp32); FastDropout a uint8 0/1
    mask, or below SPARSE_BELOW the int32 positions of the dropped elements (4p bytes an element)."""
    x = torch.randn(100, 10, requires_grad=True)
    def saved(drop) -> list[torch.Tensor]:
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            drop(x * 1.0)
        return kept

    assert [t.dtype for t in saved(nn.Dropout(0.1))] == [torch.float32]
    assert [(t.dtype, t.shape) for t in saved(FastDropout(0.3))] == [(torch.uint8, x.shape)]
    torch.manual_seed(0)
    (positions,) = saved(FastDropout(0.1))
    assert positions.dtype == torch.int32 and 50 < positions.numel() < 150  # ~100 of the 1000 elements


def test_dropout_from_positions_handles_non_contiguous_inputs_and_gradients():
    """The positions count in row-major order: a transposed input and a transposed gradient must be dropped at the
    same logical elements as their contiguous copies."""
    x = torch.randn(40, 30)
    grad = torch.randn(30, 40).t()  # non-contiguous, shape (40, 30)
    results = []
    for source in (x.t().contiguous().t(), x.clone()):  # a transposed view, then the contiguous tensor
        source.requires_grad_(True)
        torch.manual_seed(7)
        out = masked_dropout(source, 0.1)
        out.backward(grad)
        results.append((out, source.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    dropped = results[1][0] == 0
    assert torch.equal(results[1][1] == 0, dropped) and dropped.any()
    torch.testing.assert_close(results[1][1][~dropped], grad[~dropped] / 0.9)


def test_use_fast_dropout_replaces_the_base_and_adapter_dropouts(make_recipe):
    model, _, _ = build_model(make_recipe({"adapter.dropout": 0.1}), num_labels=2, label_names=["negative", "positive"])
    before = {name: m.p for name, m in model.named_modules() if type(m) is nn.Dropout}
    assert any("lora_dropout" in name for name in before)
    assert use_fast_dropout(model) == len(before)
    after = {name: m.p for name, m in model.named_modules() if isinstance(m, nn.Dropout)}
    assert after == before  # same places, same p
    assert all(type(m) is FastDropout for name, m in model.named_modules() if name in after)


def test_fast_dropout_runs_are_reproducible_and_not_torchs_masks(make_recipe, tmp_path):
    ov = {"adapter.dropout": 0.3, "train.epochs": 1, "train.log_every": 1}
    run(make_recipe({**ov, "output_dir": tmp_path / "fast"}))
    run(make_recipe({**ov, "output_dir": tmp_path / "again"}))
    run(make_recipe({**ov, "train.dropout_impl": "torch", "output_dir": tmp_path / "torch"}))
    assert losses(tmp_path / "again") == losses(tmp_path / "fast")
    assert losses(tmp_path / "torch") != losses(tmp_path / "fast")  # the option took effect


@pytest.mark.parametrize("impl, p", [("fast", 0.3), ("fast", 0.1), ("torch", 0.3)])  # fast at 0.1: dropped positions
def test_resume_draws_the_same_dropout_masks(make_recipe, tmp_path, impl, p):
    """The loaders draw from their own generators: a resumed run's fresh loader iterator used to take a seed from the
    global RNG and shift every later dropout mask (losses off by ~3e-5 after the resume)."""
    ov = {"adapter.dropout": p, "train.dropout_impl": impl, "train.epochs": 1, "train.log_every": 1, "train.save_every": 4,
          "train.keep_checkpoints": 4}
    full = run(make_recipe({**ov, "output_dir": tmp_path / "full"}))
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-4", part / "checkpoints" / "step-4")
    resumed = run(make_recipe({**ov, "output_dir": part}), resume=True)
    assert resumed["steps"] == full["steps"] > 4
    assert losses(part) == pytest.approx(losses(tmp_path / "full")[4:], abs=1e-6)


def test_evaluations_do_not_change_the_training_masks(make_recipe, tmp_path):
    ov = {"adapter.dropout": 0.3, "train.epochs": 1, "train.log_every": 1}
    run(make_recipe({**ov, "output_dir": tmp_path / "end"}))
    run(make_recipe({**ov, "train.eval_every": 2, "output_dir": tmp_path / "often"}))
    assert losses(tmp_path / "often") == losses(tmp_path / "end")


@pytest.mark.parametrize("keys", [5, 24])
def test_cpu_training_attention_is_attention_with_a_keep_mask(keys):
    """In training it is softmax(q k^T * scale + mask) * keep / (1 - p) @ v with keep_mask's mask, values and
    gradients; in evaluation (and without dropout) it is transformers' sdpa function exactly."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    module = nn.Module()
    q, k, v = (torch.randn(2, 3, keys, 8, requires_grad=True) for _ in range(3))
    attend = torch.ones(2, 1, keys, keys, dtype=torch.bool)
    attend[1, :, :, -2:] = False  # the second row's last two keys are padding
    torch.manual_seed(1)
    out, _ = cpu_training_attention(module, q, k, v, attend, dropout=0.25, scaling=0.3)
    torch.manual_seed(1)
    keep = keep_mask(torch.Size([2, 3, keys, keys]), 0.25)
    scores = (q @ k.transpose(2, 3)) * 0.3 + torch.zeros(attend.shape).masked_fill(~attend, torch.finfo(torch.float32).min)
    want = (torch.softmax(scores, -1) * keep / 0.75 @ v).transpose(1, 2)
    torch.testing.assert_close(out, want)
    assert (keep == 0).any() and out.shape == (2, keys, 3, 8)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g))

    for mode, p in (("eval", 0.25), ("train", 0.0)):  # sdpa's own dropout (if any): the same seed, the same draws
        getattr(module, mode)()
        torch.manual_seed(2)
        got, _ = cpu_training_attention(module, q, k, v, attend, dropout=p, scaling=0.3)
        torch.manual_seed(2)
        ref, _ = sdpa_attention_forward(module, q, k, v, attend, dropout=p, scaling=0.3)
        assert torch.equal(got, ref)


def test_use_fast_dropout_switches_sdpa_attention_and_leaves_no_trace(tmp_path, tiny_bert):
    """A base with attention dropout trains through cpu_training_attention; in evaluation it gives sdpa's logits, and
    neither the saved config nor a reloaded model names the peftlab function."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2, attention_probs_dropout_prob=0.3,
                                                               attn_implementation="sdpa")
    before = logits(model)
    use_fast_dropout(model)
    assert model.config._attn_implementation == ATTENTION
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)
    model.train()
    batch = {"input_ids": torch.tensor([[101, 2204, 3185, 102, 0], [101, 2919, 102, 0, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]), "labels": torch.tensor([1, 0])}
    torch.manual_seed(0)
    first = model(**batch).loss
    first.backward()
    torch.manual_seed(0)
    assert model(**batch).loss.item() == first.item()  # seeded like every other dropout
    assert model(**batch).loss.item() != first.item()  # and a new attention mask each step
    model.save_pretrained(tmp_path / "saved")
    assert ATTENTION not in (tmp_path / "saved" / "config.json").read_text()
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved")
    assert reloaded.config._attn_implementation == "sdpa"


def packed_rows(lengths_per_row: list[list[int]]):
    """Position ids of packed rows (restarting at each example) and the block-diagonal causal mask masking_utils
    gives sdpa for them."""
    position_ids = torch.tensor([[p for n in row for p in range(n)] for row in lengths_per_row])
    example = torch.tensor([[i for i, n in enumerate(row) for _ in range(n)] for row in lengths_per_row])
    n = position_ids.shape[1]
    mask = (example[:, :, None] == example[:, None, :]) & torch.ones(n, n, dtype=torch.bool).tril()
    return position_ids, mask[:, None]


def packed_attention_inputs(lengths_per_row: list[list[int]], kv_heads: int, dim: int, seed: int):
    """An attention module with 4 query heads over `kv_heads` KV heads, packed rows' position ids and mask, and fp32
    q, k, v (batch, heads, tokens, dim) that require gradients, drawn from `seed`."""
    torch.manual_seed(seed)
    module = nn.Module()
    module.num_key_value_groups = 4 // kv_heads
    position_ids, mask = packed_rows(lengths_per_row)
    shape = (len(lengths_per_row), 4, position_ids.shape[1], dim)
    q = torch.randn(*shape, requires_grad=True)
    k, v = (torch.randn(shape[0], kv_heads, *shape[2:], requires_grad=True) for _ in range(2))
    return module, position_ids, mask, q, k, v


def test_packed_examples_are_found_only_where_the_mask_is_exactly_per_example():
    from peftlab.dropout import packed_examples

    position_ids, mask = packed_rows([[3, 2, 4], [6, 3]])
    assert packed_examples(position_ids, mask) == [[(0, 3), (3, 5), (5, 9)], [(0, 6), (6, 9)]]
    assert packed_examples(position_ids, mask.clone()) == [[(0, 3), (3, 5), (5, 9)], [(0, 6), (6, 9)]]  # not cached by value
    other = mask.clone()
    other[1, 0, 7, 2] = True  # one key of another example visible: not packed attention
    assert packed_examples(position_ids, other) is None
    padded = torch.ones(2, 1, 9, 9, dtype=torch.bool).tril()
    padded[1, :, :, -2:] = False  # a padded row's mask (no position restarts) is left to sdpa
    assert packed_examples(torch.arange(9).expand(2, 9), padded) is None
    assert packed_examples(position_ids, None) is None and packed_examples(None, mask) is None


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_packed_rows_are_attended_per_example_as_sdpa_attends_the_masked_row(kv_heads, monkeypatch):
    """In training on CPU with per_example, packed rows take the per-example path (without it, sdpa itself): the same
    output and gradients as sdpa over the block-diagonal mask (fp32, grouped KV heads too); in evaluation it is sdpa
    itself."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module, position_ids, mask, q, k, v = packed_attention_inputs([[5, 1, 6], [8, 4]], kv_heads, dim=8, seed=0)
    calls = count_per_example_calls(monkeypatch)
    assert torch.equal(cpu_training_attention(module, q, k, v, mask, scaling=0.3, position_ids=position_ids)[0],
                       sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)[0]) and not calls  # masked: sdpa
    out, _ = cpu_training_attention(module, q, k, v, mask, scaling=0.3, position_ids=position_ids, per_example=True)
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    assert calls and out.shape == want.shape == (2, 12, 4, 8)
    torch.testing.assert_close(out, want)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g))
    module.eval()
    assert torch.equal(cpu_training_attention(module, q, k, v, mask, scaling=0.3, position_ids=position_ids,
                                              per_example=True)[0], want)


def count_per_example_calls(monkeypatch) -> list:
    """A list that gets an item each time the per-example attention function is applied."""
    import peftlab.dropout as D

    calls, apply = [], D._ExampleAttention.apply
    monkeypatch.setattr(D._ExampleAttention, "apply", staticmethod(lambda *a: calls.append(1) or apply(*a)))
    return calls


@pytest.mark.parametrize("kv_heads,autocast", [(4, False), (2, False), (2, True), (2, "fp32 v")])
def test_per_example_attention_in_bf16_is_as_close_to_fp32_as_sdpa_is(kv_heads, autocast):
    """In bf16 (the CPU training dtype) the per-example output and gradients are within bf16 rounding of the fp32
    result, as sdpa's own bf16 result is: at most twice sdpa's error (the probabilities are rounded to bf16 before
    they multiply v, as in transformers' eager attention; 1.0-1.6x sdpa's error here). Also under bf16 autocast with
    q and k in fp32 and v in bf16 (a Llama on an fp32 base: its rotary positions are fp32), and with v in fp32 too
    (QLoRA on an fp32 base: bitsandbytes' 4-bit layers return their input's dtype), with sdpa's dtypes."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module, position_ids, mask, q32, k32, v32 = packed_attention_inputs([[20, 9, 35], [40, 24]], kv_heads, dim=16, seed=1)
    g = torch.randn(2, 64, 4, 16)
    want, _ = sdpa_attention_forward(module, q32, k32, v32, mask, scaling=0.25)
    want = [want, *torch.autograd.grad(want, (q32, k32, v32), g)]

    def run(per_example):
        q, k, v = (t.detach().to(torch.float32 if autocast and (t is not v32 or autocast == "fp32 v")
                                 else torch.bfloat16).requires_grad_() for t in (q32, k32, v32))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(autocast)):
            out, _ = cpu_training_attention(module, q, k, v, mask, scaling=0.25, position_ids=position_ids,
                                            per_example=per_example)
        return [out, *torch.autograd.grad(out, (q, k, v), g.to(out.dtype))]

    ours, sdpa = run(True), run(False)
    assert [t.dtype for t in ours] == [t.dtype for t in sdpa]
    for a, b, w in zip(ours, sdpa, want):
        assert (a.float() - w).abs().max() <= 2 * (b.float() - w).abs().max()


def test_per_example_attention_keeps_each_example_s_probabilities_once_in_bf16():
    """For the backward pass the per-example path keeps q, k, v and each example's probabilities once, in v's dtype
    (bf16 here; autograd through softmax and matmul would keep them in fp32 and in bf16), and nothing of the blocks
    across examples."""
    import peftlab.dropout as D

    module = nn.Module()
    position_ids, mask = packed_rows([[100, 60], [160]])
    q, k, v = (torch.randn(2, 4, 160, 8, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out, _ = cpu_training_attention(module, q, k, v, mask, position_ids=position_ids, per_example=True)
    assert out.grad_fn.name() == D._ExampleAttention.__name__ + "Backward"
    assert {t.dtype for t in saved} == {torch.bfloat16}
    assert sum(t.numel() for t in saved) == 3 * q.numel() + 4 * (100**2 + 60**2 + 160**2)


def test_per_example_leaves_attention_with_dropout_to_the_masked_path(monkeypatch):
    """Attention dropout (p > 0) on packed rows goes to the masked path, which draws FastDropout masks."""
    module = nn.Module()
    position_ids, mask = packed_rows([[5, 7]])
    q, k, v = (torch.randn(1, 2, 12, 8) for _ in range(3))
    calls = count_per_example_calls(monkeypatch)
    out, _ = cpu_training_attention(module, q, k, v, mask, dropout=0.1, position_ids=position_ids, per_example=True)
    assert not calls and out.shape == (1, 12, 2, 8)
    cpu_training_attention(module, q, k, v, mask, position_ids=position_ids, per_example=True)
    assert calls


def test_a_packed_llama_trains_per_example_with_sdpa_s_loss_and_gradients(tiny_llama, monkeypatch):
    """End to end: a causal LM on packed rows (position ids restarting, no attention mask, as the SFT collator makes
    them) gets sdpa's loss and gradients through use_fast_dropout's attention with per_example, which takes the
    per-example path in every layer."""
    from transformers import AutoModelForCausalLM

    import peftlab.dropout as D

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa").train()
    position_ids, _ = packed_rows([[7, 5, 4], [9, 7]])
    batch = {"input_ids": torch.randint(5, 100, position_ids.shape), "position_ids": position_ids, "use_cache": False}
    batch["labels"] = batch["input_ids"]

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    want_loss, want_grads = loss_and_grads()
    use_fast_dropout(model, per_example=True)
    assert model.config._attn_implementation == D.ATTENTION_PER_EXAMPLE
    calls = count_per_example_calls(monkeypatch)
    loss, grads = loss_and_grads()
    assert len(calls) == model.config.num_hidden_layers
    assert loss == pytest.approx(want_loss, abs=1e-5)
    torch.testing.assert_close(grads, want_grads, rtol=1e-4, atol=1e-6)
