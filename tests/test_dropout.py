"""train.dropout_impl: fast: the cheap CPU dropout masks keep nn.Dropout's semantics and replace every dropout module;
runs with dropout are reproducible, resume to the same masks, and evaluating more often does not change them."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from peftlab import build_model, run
from peftlab.dropout import FastDropout, keep_mask, use_fast_dropout

from .conftest import losses


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_keep_mask_keeps_one_minus_p(p):
    torch.manual_seed(0)
    mask = keep_mask(torch.Size([1000, 1000]), p)
    assert mask.dtype == torch.bool and mask.shape == (1000, 1000)
    assert mask.float().mean().item() == pytest.approx(1 - p, abs=0.003)  # 6 standard errors at most
    assert mask[:, :500].float().mean().item() == pytest.approx(mask[:, 500:].float().mean().item(), abs=0.006)  # no position bias
    assert keep_mask(torch.Size([7, 3]), 0.0).all()  # odd sizes: the 64-bit draw is cut to the element count


def test_fast_dropout_behaves_like_nn_dropout():
    p, x = 0.25, torch.randn(64, 48, requires_grad=True)
    drop = FastDropout(p)
    torch.manual_seed(1)
    y = drop(x)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))  # survivors scaled by 1 / (1 - p), the rest zero
    assert 0.6 < kept.float().mean().item() < 0.9
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / (1 - p))  # the same mask and scale in the backward pass
    torch.manual_seed(1)
    torch.testing.assert_close(drop(x), y)  # seeded like torch's dropout
    assert not torch.equal(drop(x), y)  # and a new mask each call
    ones = torch.ones(1000, 1000)
    assert drop(ones).mean().item() == pytest.approx(1.0, abs=0.01)  # the expectation is kept
    assert drop(ones.bfloat16()).dtype == torch.bfloat16
    assert torch.equal(drop.eval()(x), x)  # evaluation: the identity


def test_fast_dropout_keeps_a_one_byte_mask_for_the_backward_pass():
    """torch's CPU dropout saves a float mask of the input's dtype (4 bytes an element in fp32); FastDropout a bool."""
    x = torch.randn(100, 10, requires_grad=True)
    def saved_dtypes(drop) -> list[torch.dtype]:
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
            drop(x * 1.0)
        return saved

    assert saved_dtypes(nn.Dropout(0.1)) == [torch.float32]
    assert saved_dtypes(FastDropout(0.1)) == [torch.bool]


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


@pytest.mark.parametrize("impl", ["fast", "torch"])
def test_resume_draws_the_same_dropout_masks(make_recipe, tmp_path, impl):
    """The loaders draw from their own generators: a resumed run's fresh loader iterator used to take a seed from the
    global RNG and shift every later dropout mask (losses off by ~3e-5 after the resume)."""
    ov = {"adapter.dropout": 0.3, "train.dropout_impl": impl, "train.epochs": 1, "train.log_every": 1, "train.save_every": 4,
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
