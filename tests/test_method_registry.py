"""A method is one record, registered once (peftlab/methods): a toy method defined here validates, trains, exports and
reloads through the public entry points with nothing else changed; every registered method's own checks run in validate."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from peftlab import evaluate, load_recipe, load_trained, merge, run
from peftlab.errors import ConfigError
from peftlab.methods import Method, base, get_method, method_names, register


@pytest.fixture
def registry(monkeypatch):
    """What a test registers is forgotten after it (the registry is process-wide)."""
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))


def train_biases(model, recipe, head_modules, task_type):
    """BitFit (Ben Zaken et al. 2021): only the bias terms, and the new task head, are trained."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(".bias") or any(name.startswith(h + ".") for h in head_modules))
    return model


BIAS_ONLY = Method("bias_only", train_biases, is_adapter=False, mergeable=False, quant_modes=("none",),
                   quant_refusal="bias_only saves a standalone float model.", size_hint=None,
                   describe=lambda recipe: "A model whose bias terms and head were trained", tags=lambda recipe: ["bitfit"])


def test_a_toy_method_validates_trains_exports_and_reloads(make_recipe, registry, tiny_bert):
    from transformers import AutoModel

    with pytest.raises(ConfigError, match="adapter.method='bias_only': must be one of lora"):
        make_recipe({"adapter.method": "bias_only"})
    register(BIAS_ONLY)  # the one line that adds a method
    assert method_names()[-1] == "bias_only"
    recipe = make_recipe({"adapter.method": "bias_only", "train.max_steps": 6, "train.lr": 1e-2, "train.precision": "fp32"})
    summary = run(recipe)
    assert 0 < summary["trainable_percent"] < 5  # biases and the head only
    assert (recipe.out / "model.safetensors").is_file() and not (recipe.out / "adapter_config.json").exists()
    assert evaluate(recipe.out)["loss"] == pytest.approx(summary["metrics"]["eval"]["loss"], abs=1e-5)  # reloaded = trained
    model, _, saved, _ = load_trained(recipe.out)
    assert saved.adapter.method == "bias_only"  # its recipe.yaml validates on the way back
    before = AutoModel.from_pretrained(tiny_bert).state_dict()
    after = model.bert.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.endswith(".bias") for k in moved), moved  # the backbone's weights are untouched
    assert merge(recipe.out) == recipe.out  # a standalone model: nothing to merge


def test_a_toy_method_gets_the_generic_checks(make_recipe, registry):
    register(BIAS_ONLY)
    with pytest.raises(ConfigError) as e:
        make_recipe({"adapter.method": "bias_only", "quant.mode": "8bit", "adapter.loraplus_lr_ratio": 4, "adapter.use_dora": True})
    text = str(e.value)
    assert "quant.mode=8bit with adapter.method=bias_only: bias_only saves a standalone float model." in text
    assert "adapter.loraplus_lr_ratio=4.0 with adapter.method=bias_only: LoRA+ sets the learning rate" in text
    assert "adapter.use_dora/use_rslora apply to LoRA only, but adapter.method=bias_only" in text
    with pytest.raises(ValueError, match="already registered"):
        register(dataclasses.replace(BIAS_ONLY))


def test_every_registered_method_is_checked_by_validate(registry):
    seen = []
    for name in method_names():
        base._REGISTRY[name] = dataclasses.replace(get_method(name), rules=lambda recipe: seen.append(recipe.adapter.method) or [])
        try:
            load_recipe(None, [f"adapter.method={name}"], validate_files=False)
        except ConfigError as e:  # the default task (classification) refuses prefix_tuning; the method's rules still ran
            assert name == "prefix_tuning" and "does not work for classification" in str(e), e
    assert seen == list(method_names())


@pytest.mark.parametrize("overrides, message", [
    (["adapter.method=loha", "quant.mode=4bit"], "quant.mode=4bit with adapter.method=loha: peft's loha sizes its update from the "
                                                  "base layer's weight, which in a 4-bit layer is the packed storage"),
    (["adapter.method=lokr", "quant.mode=4bit"], "a method with 4-bit support (lora, adalora, ia3, vera, oft)"),
    (["adapter.method=scratch", "quant.mode=8bit"], "quant.mode=8bit with adapter.method=scratch: it trains every weight, and "
                                                     "quantized weights cannot be trained (they are integers)"),
    (["adapter.use_dora=true", "quant.mode=8bit"], "adapter.use_dora with quant.mode=8bit: peft's DoRA does not support 8-bit bases"),
    (["adapter.method=adalora", "adapter.adalora_init_r=4"], "adapter.adalora_init_r=4 with adapter.r=8: AdaLoRA starts at"),
    (["adapter.init=pissa", "adapter.use_dora=true"], "adapter.init=pissa with adapter.use_dora: the pissa adapter is exported"),
    (["adapter.method=vera", "adapter.init=gaussian"], "adapter.init=gaussian with adapter.method=vera: initialisations are for LoRA"),
    (["adapter.options.lora_dropou=0.1"], "adapter.options.lora_dropou: not an argument of peft's LoraConfig. Did you mean "
                                          "'lora_dropout'?"),
    (["adapter.method=ia3", "adapter.options.bogus=1"], "adapter.options.bogus: not an argument of peft's IA3Config."),
    (["adapter.method=oft", "adapter.options={oft_block_size:8}"], "adapter.options.oft_block_size:8: YAML read `oft_block_size:8` as "
                                                                    "one key with no value: write `oft_block_size: 8`, with a space"),
    (["adapter.method=full", "adapter.options.r=4"], "adapter.options with adapter.method=full: it builds no peft config"),
    # options that would replace what the recipe sets (they skipped its checks; the card showed the recipe's values)
    (["adapter.options.r=64"], "adapter.options.r: peftlab sets LoraConfig's r from adapter.r, where it is checked"),
    (["adapter.options.use_dora=true", "quant.mode=8bit"], "adapter.options.use_dora: peftlab sets LoraConfig's use_dora from "
                                                            "adapter.use_dora"),
    (["adapter.options.target_modules=[key]"], "adapter.options.target_modules: peftlab sets LoraConfig's target_modules from "
                                               "adapter.target_modules"),
    (["adapter.method=adalora", "adapter.options.init_r=2"], "adapter.options.init_r: peftlab sets AdaLoraConfig's init_r from "
                                                             "adapter.adalora_init_r"),
    (["adapter.method=loha", "adapter.options.rank_dropout=5"], "LoHaConfig's rank_dropout from adapter.dropout"),
    (["adapter.method=prompt_tuning", "adapter.options.num_virtual_tokens=3"], "from adapter.num_virtual_tokens"),
    (["adapter.options.init_lora_weights=pissa"], "adapter.options.init_lora_weights='pissa': the initialisation is adapter.init"),
    (["adapter.method=prompt_tuning", "export.merge=true"], "export.merge=true with adapter.method=prompt_tuning: it adds virtual "
                                                             "tokens to the input, so there is nothing to fold into the weights."),
    (["adapter.method=prefix_tuning", "task.type=sft", "export.merge=true"], "export.merge=true with adapter.method=prefix_tuning: it "
                                                                              "adds trained keys and values to every layer's attention"),
])
def test_method_rules_keep_their_messages(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_recipe(None, overrides, validate_files=False)
    assert message in str(e.value)


def test_the_options_the_recipe_does_not_set_still_pass():
    """pissa's speed-up, and OFT sized by its block size (r is then left to it: peft takes one or the other)."""
    assert load_recipe(None, ["adapter.init=pissa", "adapter.options.init_lora_weights=pissa_niter_4"], validate_files=False)
    recipe = load_recipe(None, ["adapter.method=oft", "adapter.options.oft_block_size=32"], validate_files=False)
    method = get_method("oft")
    assert method.recipe_fields(recipe.adapter)["r"] == 0 and not method.check(recipe)


def test_an_unknown_method_names_the_closest():
    with pytest.raises(ConfigError, match="Did you mean 'lora'"):
        get_method("lorra")


def test_every_method_describes_itself_on_the_card(make_recipe):
    """The card's first words name the method (IA3, LoHa, ..., prompt tuning read "A model")."""
    from peftlab.methods import get_method, method_names

    recipe = make_recipe()
    shown = {n: get_method(n).describe(recipe) for n in method_names()}
    assert shown["ia3"] == "An IA3 adapter" and shown["vera"] == "A VeRA adapter" and shown["oft"] == "An OFT adapter"
    assert shown["prompt_tuning"] == f"A prompt-tuning adapter ({recipe.adapter.num_virtual_tokens} virtual tokens)"
    assert not [n for n, what in shown.items() if what == "A model"], shown


@pytest.mark.parametrize("method, overrides, unread", [
    ("ia3", ["adapter.r=64", "adapter.alpha=3", "adapter.dropout=0.5"], "adapter.r=64, adapter.alpha=3.0, adapter.dropout=0.5"),
    ("vera", ["adapter.alpha=3"], "adapter.alpha=3.0"),
    ("prompt_tuning", ["adapter.r=4", "adapter.target_modules=[query]"], "adapter.r=4, adapter.target_modules=['query']"),
    ("full", ["adapter.num_virtual_tokens=5"], "adapter.num_virtual_tokens=5")])
def test_adapter_keys_a_method_does_not_read_are_warned_about(make_recipe, caplog, method, overrides, unread):
    """ia3 with adapter.r=64 trained exactly as with r=4 (IA3 has no rank), silently, and the recipe and card said 64."""
    from peftlab.run import preflight

    defaults = {"adapter.target_modules": None, "adapter.r": 8, "adapter.alpha": 16, "adapter.dropout": 0.1}  # (make_recipe's differ)
    recipe = make_recipe({"adapter.method": method, **defaults, **dict(o.split("=") for o in overrides)})
    with caplog.at_level("WARNING", logger="peftlab"):
        preflight(recipe, training=False)
    assert f"{unread}: not read by adapter.method={method}, so ignored" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="peftlab"):
        preflight(make_recipe({"adapter.method": "lora", "adapter.r": 64, "adapter.alpha": 3}), training=False)
    assert "not read by" not in caplog.text
