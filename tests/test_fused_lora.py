"""peftlab.fused_lora: a LoRA layer computed in one autograd function in CPU training gives peft's output and
gradients (the same dropout draws), and every case it does not cover goes to peft's own forward."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

from peftlab.dropout import FastDropout, use_fast_dropout
from peftlab.fused_lora import FusedLoraLinear, _LoraLinear, use_fused_lora


def lora_model(dropout: float = 0.05, bias: bool = True, **config) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(24, 40, bias=bias), nn.Linear(40, 8, bias=bias))
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["0", "1"],
                                                      **config))
    use_fast_dropout(model)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; a non-zero B makes every gradient path count
            nn.init.normal_(p, std=0.5)
    return model


def run(model, x, seed: int = 3, autocast: bool = False):
    """Output, input gradient and the LoRA weights' gradients of a forward and backward (dropout drawn from `seed`)."""
    x = x.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = model(x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return y.detach().float(), x.grad.clone(), grads


@pytest.mark.parametrize("dropout", [0.0, 0.05, 0.3])  # none, the dropped positions (p < 0.15), the uint8 keep mask
def test_fused_layers_give_peft_outputs_and_gradients_in_fp32(dropout):
    x = torch.randn(2, 7, 24)
    reference = lora_model(dropout)
    fused = copy.deepcopy(reference)
    assert use_fused_lora(fused) == 2
    assert all(type(m) is FusedLoraLinear for m in fused.modules() if isinstance(m, peft.tuners.lora.layer.Linear))
    calls = []
    original = _LoraLinear.apply
    _LoraLinear.apply = lambda *a: calls.append(1) or original(*a)
    try:
        y0, gx0, g0 = run(reference, x)
        y1, gx1, g1 = run(fused, x)
    finally:
        _LoraLinear.apply = original
    assert len(calls) == 2  # both layers took the fused path
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-5)
    assert set(g1) == set(g0) and len(g0) == 4  # lora_A and lora_B of both layers, nothing else
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-5)
    if dropout:  # the dropout was drawn: another seed changes the result
        assert not torch.allclose(run(fused, x, seed=4)[0], y1)


def test_fused_layers_under_bf16_autocast_are_as_close_to_fp32_as_peft():
    x = torch.randn(4, 9, 24)
    reference = lora_model(0.05)
    fused = copy.deepcopy(reference)
    use_fused_lora(fused)
    exact = run(reference, x)  # fp32, the same dropout draws
    peft_bf16, fused_bf16 = run(reference, x, autocast=True), run(fused, x, autocast=True)

    def error(result):
        return max(((a - b).norm() / b.norm()).item() for a, b in [(result[0], exact[0]), (result[1], exact[1]),
                                                                     *((result[2][n], exact[2][n]) for n in exact[2])])

    assert error(fused_bf16) < 1.5 * error(peft_bf16) + 1e-3, (error(fused_bf16), error(peft_bf16))
    assert fused_bf16[0].dtype == torch.float32 and error(fused_bf16) < 0.02
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused(x).dtype == torch.bfloat16  # as peft's layer returns under autocast


def test_saved_for_backward_is_what_autocast_keeps_plus_the_dropped_positions():
    layer = lora_model(0.05).base_model.model[0]
    x = torch.randn(64, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(0)
        y = _LoraLinear.apply(x, layer.base_layer.weight, layer.base_layer.bias, layer.lora_A["default"].weight,
                              layer.lora_B["default"].weight, 2.0, 0.05, torch.bfloat16)
    w, dropped, h, a, b, drop = y.grad_fn.saved_tensors
    assert w.dtype == dropped.dtype == h.dtype == a.dtype == b.dtype == torch.bfloat16
    assert dropped.shape == (64, 24) and h.shape == (64, 4)
    assert drop.dtype == torch.int32 and 0 < drop.numel() < 64 * 24 * 0.15  # positions, not a mask per element
    assert torch.all(dropped.view(-1)[drop.long()] == 0)



def test_the_fused_path_draws_through_the_dropout_module_s_switches(monkeypatch):
    """peftlab.dropout's settings are read at call time (benchmarks/step_levers.py's levers switch them): with
    SPARSE_BELOW at 0 the fused layer keeps a uint8 keep mask, as FastDropout does."""
    import peftlab.dropout as D

    layer = lora_model(0.05).base_model.model[0]
    monkeypatch.setattr(D, "SPARSE_BELOW", 0.0)
    x = torch.randn(64, 24, requires_grad=True)
    y = _LoraLinear.apply(x, layer.base_layer.weight, layer.base_layer.bias, layer.lora_A["default"].weight,
                          layer.lora_B["default"].weight, 2.0, 0.05, torch.float32)
    *_, dropped, _, _, _, drop = y.grad_fn.saved_tensors
    assert drop.dtype == torch.uint8 and drop.shape == (64, 24)
    assert torch.all(dropped[drop == 0] == 0)


def test_fused_layers_bases_are_cast_once_as_peft_layers_bases_are():
    from peftlab.accel import castable_weights

    model = lora_model(0.1)
    before = {id(p) for p in castable_weights(model)}
    use_fused_lora(model)
    assert len(before) == 4 and {id(p) for p in castable_weights(model)} == before  # both bases' weight and bias
    dora = lora_model(0.1, use_dora=True)
    use_fused_lora(dora)
    assert castable_weights(dora) == []  # DoRA reads its base weights itself


def test_cases_the_fused_path_does_not_cover_use_peft_forward(monkeypatch):
    x = torch.randn(3, 24)
    calls = []
    original = _LoraLinear.apply
    monkeypatch.setattr(_LoraLinear, "apply", lambda *a: calls.append(1) or original(*a))

    def fused_calls(model, fn=lambda m: m(x)) -> int:
        calls.clear()
        fn(model)
        return len(calls)

    model = lora_model(0.1)
    use_fused_lora(model)
    assert fused_calls(model) == 2
    model.eval()
    assert fused_calls(model) == 0  # evaluation
    model.train()
    with torch.no_grad():
        assert fused_calls(model) == 0  # no gradients
    with model.disable_adapter():
        assert fused_calls(model) == 0
    bf16_base = lora_model(0.1)  # a bf16 base with fp32 adapters and no autocast: peft casts x to the adapter's dtype
    for layer in bf16_base.base_model.model:
        layer.base_layer.to(torch.bfloat16)
    use_fused_lora(bf16_base)
    assert fused_calls(bf16_base, lambda m: m(x.bfloat16())) == 0
    torch_dropout = lora_model(0.1)
    for m in torch_dropout.modules():  # train.dropout_impl: torch keeps nn.Dropout, which the fused path does not draw
        for name, child in m.named_children():
            if isinstance(child, FastDropout):
                setattr(m, name, nn.Dropout(child.p))
    use_fused_lora(torch_dropout)
    assert fused_calls(torch_dropout) == 0
    no_dropout = lora_model(0.0)
    use_fused_lora(no_dropout)
    assert fused_calls(no_dropout) == 2  # peft's nn.Identity
    dora = lora_model(0.1, use_dora=True)
    assert use_fused_lora(dora) == 2
    assert fused_calls(dora) == 0
    two = lora_model(0.1)
    two.add_adapter("second", peft.LoraConfig(r=2, target_modules=["0", "1"]))
    two.base_model.set_adapter(["default", "second"])
    use_fused_lora(two)
    assert fused_calls(two) == 0  # two active adapters
    merged = lora_model(0.1)
    use_fused_lora(merged)
    merged.base_model.model[0].merge()
    assert fused_calls(merged) == 1  # the merged layer is peft's; the other is still fused


def set_up(make_recipe, overrides: dict):
    """`train.setup` on the tiny BERT classifier (fp32, adapter dropout 0.1, `overrides`) -> (its parts, the data)."""
    from peftlab.accel import make_accelerator
    from peftlab.data import build_data, load_splits
    from peftlab.model import build_model
    from peftlab.train import setup

    recipe = make_recipe({"train.precision": "fp32", "adapter.dropout": 0.1, **overrides})
    splits, names = load_splits(recipe)
    model, tok, _ = build_model(recipe, num_labels=len(names), label_names=names, precision="fp32")
    data = build_data(recipe, tok, splits=splits, label_names=names)
    return setup(recipe, model, data, make_accelerator(recipe, "fp32"), tok), data


def test_train_setup_fuses_lora_by_default_and_not_with_lora_impl_peft(make_recipe):
    def fused_layers(**overrides) -> int:
        parts, _ = set_up(make_recipe, overrides)
        return sum(type(m) is FusedLoraLinear for m in parts.model.modules())

    assert fused_layers() > 0
    assert fused_layers(**{"train.lora_impl": "peft"}) == 0


@pytest.mark.parametrize("options", [{"train.lora_impl": "peft"}, {"train.gradient_checkpointing": True}],
                         ids=["peft-forward", "activation-checkpointing"])
def test_fused_training_gives_peft_losses_and_recomputes_the_same_dropout(make_recipe, tmp_path, options):
    """A whole run with adapter dropout: peft's forward, or the fused one recomputed under activation checkpointing
    (which must draw the same dropped positions again), gives the fused run's losses and adapter (fp32: exactly
    the same draws, only the summation order differs)."""
    from safetensors.torch import load_file

    from peftlab import run as run_recipe

    from .conftest import losses

    common = {"train.max_steps": 6, "train.precision": "fp32", "adapter.dropout": 0.1}
    run_recipe(make_recipe({**common, "output_dir": tmp_path / "fused"}))
    run_recipe(make_recipe({**common, **options, "output_dir": tmp_path / "other"}))
    assert losses(tmp_path / "other") == pytest.approx(losses(tmp_path / "fused"), abs=1e-5)
    a, b = (load_file(tmp_path / side / "adapter_model.safetensors") for side in ("fused", "other"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ 4-bit bases (QLoRA)


def qlora_classifier(make_recipe, compute_dtype: str = "float32"):
    """The tiny BERT classifier with LoRA (dropout 0.1) on 4-bit NF4 layers, after `train.setup` (which fuses them)."""
    pytest.importorskip("bitsandbytes")
    parts, data = set_up(make_recipe, {"quant.mode": "4bit", "quant.compute_dtype": compute_dtype})
    for name, p in parts.model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; a non-zero B makes every gradient path count
            nn.init.normal_(p, std=0.5)
    batch = data.collate([data.train[i] for i in range(8)])
    return parts.model.train(), batch


def loss_and_lora_grads(model, batch, autocast: bool = False, seed: int = 3):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and "lora_" in n}


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_fused_4bit_layers_give_peft_loss_and_gradients(make_recipe, monkeypatch, compute_dtype):
    """QLoRA's LoRA layers take the fused path too (the packed weight dequantized as bitsandbytes does): in fp32 the
    loss and every LoRA gradient are peft's (the same dropout draws); with bf16 compute under bf16 autocast they are
    within bf16 rounding of peft's."""
    from peftlab.fused_lora import _fused_4bit_class

    model, batch = qlora_classifier(make_recipe, compute_dtype)
    peft_class, fused_class = _fused_4bit_class()
    layers = [m for m in model.modules() if isinstance(m, peft_class)]
    assert layers and all(type(m) is fused_class for m in layers)  # train.setup fused them
    calls = []
    original = _LoraLinear.apply
    monkeypatch.setattr(_LoraLinear, "apply", lambda *a: calls.append(1) or original(*a))
    bf16 = compute_dtype == "bfloat16"
    fused = loss_and_lora_grads(model, batch, autocast=bf16)
    assert len(calls) == len(layers)
    for m in layers:
        m.__class__ = peft_class
    reference = loss_and_lora_grads(model, batch, autocast=bf16)
    assert len(calls) == len(layers)  # peft's forward did not call it
    tolerance = dict(rtol=3e-2, atol=3e-3) if bf16 else dict(rtol=1e-4, atol=1e-6)
    assert fused[0] == pytest.approx(reference[0], rel=tolerance["rtol"])
    assert fused[1].keys() == reference[1].keys() and len(fused[1]) == 2 * len(layers)
    for name in reference[1]:
        torch.testing.assert_close(fused[1][name], reference[1][name], **tolerance)
    assert loss_and_lora_grads(model, batch, autocast=bf16, seed=4)[0] != pytest.approx(reference[0], rel=1e-6)  # drawn


def test_a_fused_4bit_layer_keeps_its_packed_weight_not_a_dequantized_copy(make_recipe):
    model, batch = qlora_classifier(make_recipe)
    from peftlab.fused_lora import _fused_4bit_class

    layer = next(m for m in model.modules() if type(m) is _fused_4bit_class()[1])
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    y = layer(x)
    saved = y.grad_fn.saved_tensors
    assert saved[0] is layer.base_layer.weight and not saved[0].is_floating_point()  # the 4-bit weight itself
    assert all(t.numel() < layer.in_features * layer.out_features for t in saved[1:])
    assert y.dtype == x.dtype  # as bitsandbytes' Linear4bit returns


def test_a_4bit_base_computing_in_another_dtype_than_autocast_uses_peft_forward(make_recipe, monkeypatch):
    """bitsandbytes computes in its compute dtype whatever autocast says: fp32 compute under bf16 autocast is peft's
    (a bf16 adapter over an fp32 base product), which one dtype cannot reproduce."""
    model, batch = qlora_classifier(make_recipe, "float32")
    calls = []
    original = _LoraLinear.apply
    monkeypatch.setattr(_LoraLinear, "apply", lambda *a: calls.append(1) or original(*a))
    loss_and_lora_grads(model, batch, autocast=True)
    assert not calls
