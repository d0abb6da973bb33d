"""Every peft method as a recipe option, on the tiny BERT: trains (adapter changes, base frozen), saves and reloads
to the same logits, and merges to the same logits where the method is mergeable (prompt methods say why not)."""

from __future__ import annotations

import json

import pytest
import torch

from peftlab import load_trained, merge, run
from peftlab.config import PEFT_METHODS, PROMPT_METHODS
from peftlab.errors import ArtifactError

from .conftest import logits


@pytest.mark.parametrize("method", [m for m in PEFT_METHODS if m not in ("lora", "prefix_tuning")])  # prefix: see below
def test_method_trains_saves_reloads_and_merges(make_recipe, method):
    recipe = make_recipe({"adapter.method": method, "train.max_steps": 6, "adapter.num_virtual_tokens": 4})
    summary = run(recipe)
    assert 0 < summary["trainable_percent"] < 100
    config = json.loads((recipe.out / "adapter_config.json").read_text())
    assert config["peft_type"].lower().replace("_", "") == {"p_tuning": "ptuning"}.get(method, method.replace("_", ""))
    model, *_ = load_trained(recipe.out)
    again, *_ = load_trained(recipe.out)
    torch.testing.assert_close(logits(model), logits(again), atol=0, rtol=0)
    assert summary["metrics"]["eval"]["loss"] == pytest.approx(
        json.loads((recipe.out / "metrics.json").read_text())["eval"]["loss"])
    if method in PROMPT_METHODS:
        with pytest.raises(ArtifactError, match="nothing to fold into the weights"):
            merge(recipe.out)
        return
    merged, *_ = load_trained(merge(recipe.out))
    diff = (logits(model) - logits(merged)).abs().max().item()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("model", ["tiny_bert", "tiny_llama"])
def test_prefix_tuning_for_classification_says_what_to_use(make_recipe, request, model):
    from peftlab import build_model
    from peftlab.errors import ModelError

    recipe = make_recipe({"adapter.method": "prefix_tuning"}, model=request.getfixturevalue(model))
    with pytest.raises(ModelError, match="prefix_tuning does not work for classification.*prompt_tuning or p_tuning"):
        build_model(recipe, num_labels=2, label_names=["negative", "positive"])
