"""train.skip_unread: a BERT-family classifier's last layer computes only position 0, the one its head reads, and
gives the logits and gradients of the full layer; other models and paths (prefix tuning's keys) are left as they are."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PromptTuningConfig, get_peft_model
from transformers import AutoConfig, AutoModelForSequenceClassification

from peftlab import run
from peftlab.dropout import use_fast_dropout
from peftlab.tasks.classification import FIRST_POSITION_HEADS, trim

from .conftest import losses

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, num_labels=3)


def tiny_classifier(model_type: str, attention: str = "sdpa", **extra):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **TINY, **extra)
    return AutoModelForSequenceClassification.from_config(config, attn_implementation=attention)


def batch():
    ids = torch.randint(5, 99, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0  # padded rows: the mask's query row of position 0 is what the trimmed layer keeps
    mask[2, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 2, 1])}


def logits_and_grads(model, inputs):
    model.zero_grad()
    out = model(**inputs)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_type", sorted(FIRST_POSITION_HEADS))
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_trimmed_last_layer_gives_the_full_layers_logits_and_gradients(model_type, attention):
    model = get_peft_model(tiny_classifier(model_type, attention), LoraConfig(r=4, target_modules=["query", "value"],
                                                                               task_type="SEQ_CLS"))
    model.eval()  # dropout off: the two forwards must agree exactly, up to float rounding
    inputs = batch()
    full, full_grads = logits_and_grads(model, inputs)
    layers = trim(model)
    assert len(layers) == 1 and "forward" in vars(layers[0])  # the last layer, changed on the instance
    assert layers[0] is model.base_model.model.base_model.encoder.layer[-1]
    got, grads = logits_and_grads(model, inputs)
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-6)
    assert grads.keys() == full_grads.keys() and any("lora_A" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], full_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert model.base_model.model.base_model(**{k: v for k, v in inputs.items() if k != "labels"}).last_hidden_state.shape[1] == 1
    del layers[0].forward  # undone: the full layer again
    torch.testing.assert_close(logits_and_grads(model, inputs)[0], full)


def test_in_training_the_trimmed_layer_runs_with_peftlab_dropout():
    """With peftlab's fast dropout (masks for attention probabilities too) in train mode the trimmed layer runs, gives
    one row per example to the head, and its dropout takes effect (two draws differ)."""
    model = tiny_classifier("bert", hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    use_fast_dropout(model)
    trim(model)
    model.train()
    inputs = batch()
    a, b = model(**inputs).logits, model(**inputs).logits
    assert a.shape == (3, 3) and not torch.equal(a, b)
    a.sum().backward()


def test_prompt_tuning_reads_position_0_of_its_virtual_tokens_the_same_way():
    """Prompt tuning puts its virtual tokens first: position 0 is still what the head reads, trimmed or not."""
    model = get_peft_model(tiny_classifier("bert"), PromptTuningConfig(num_virtual_tokens=4, task_type="SEQ_CLS"))
    model.eval()
    inputs = batch()
    with torch.no_grad():
        full = model(**inputs).logits
        assert trim(model)
        torch.testing.assert_close(model(**inputs).logits, full, rtol=1e-5, atol=1e-6)


def test_a_layer_given_a_cache_runs_in_full():
    """Keys and values handed in through a cache (prefix tuning, were peft to pass it) go to the full layer."""
    from transformers import DynamicCache

    model = tiny_classifier("bert").eval()
    layer = trim(model)[0]
    hidden = torch.randn(2, 5, 32)
    with torch.no_grad():
        assert layer(hidden).shape == (2, 1, 32)
        assert layer(hidden, cache=DynamicCache()).shape == (2, 5, 32)


@pytest.mark.parametrize("model_type", ["distilbert", "llama"])
def test_other_classifiers_are_left_as_they_are(model_type):
    extra = {"dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 64} if model_type == "distilbert" else {"pad_token_id": 0}
    model = tiny_classifier(model_type, **extra)
    assert trim(model) == []
    assert not any("forward" in vars(m) for m in model.modules())


@pytest.mark.precision  # CI runs it again as a machine whose auto picks the other precision: it must agree there too
def test_runs_with_and_without_skip_unread_train_to_the_same_losses(make_recipe, tmp_path, monkeypatch):
    """The tiny BERT has no dropout, so the option changes nothing but the work: the same losses step by step and the
    same evaluation; `peftlab evaluate` of the run gives its evaluation loss with the option on and off."""
    import peftlab.tasks.classification as classification
    from peftlab.run import evaluate

    trimmed_layers = []
    monkeypatch.setattr(classification, "trim", lambda model: trimmed_layers.append(trim(model)) or trimmed_layers[-1])
    ov = {"train.epochs": 1, "train.log_every": 1}
    on = run(make_recipe({**ov, "output_dir": tmp_path / "on"}))
    off = run(make_recipe({**ov, "train.skip_unread": False, "output_dir": tmp_path / "off"}))
    trimmed_layers[:] = [t for t in trimmed_layers if t]  # (an evaluation inside training finds the layer trimmed already)
    assert len(trimmed_layers) == 1 and len(trimmed_layers[0]) == 1  # the run with the option on, not the one with it off
    assert len(losses(tmp_path / "on")) > 4
    assert losses(tmp_path / "on") == pytest.approx(losses(tmp_path / "off"), rel=1e-4, abs=1e-6)
    assert on["metrics"]["eval"]["loss"] == pytest.approx(off["metrics"]["eval"]["loss"], rel=1e-4)
    trimmed = evaluate(tmp_path / "on", results_dir=tmp_path / "eval-on")
    full = evaluate(tmp_path / "on", overrides=["train.skip_unread=false"], results_dir=tmp_path / "eval-off")
    assert len([t for t in trimmed_layers if t]) == 2  # `peftlab evaluate` trims too, unless told not to
    assert trimmed["loss"] == pytest.approx(full["loss"], rel=1e-4) and trimmed["accuracy"] == full["accuracy"]
    assert trimmed["loss"] == pytest.approx(on["metrics"]["eval"]["loss"], rel=1e-4)


def test_the_trimmed_layer_under_activation_checkpointing_gives_the_same_gradients():
    from peftlab.model import enable_activation_checkpointing

    model = tiny_classifier("bert")
    enable_activation_checkpointing(model)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    model.train()  # checkpointing only recomputes in training; the tiny config's dropout is 0.1, so switch it off
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    inputs = batch()
    full, full_grads = logits_and_grads(model, inputs)
    assert trim(model)
    got, grads = logits_and_grads(model, inputs)
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-6)
    for name in full_grads:
        torch.testing.assert_close(grads[name], full_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_model_train_hands_back_has_its_full_last_layer(make_recipe, tmp_path):
    """`train` (a building block) handed back the model with its last layer still trimmed: hidden_states[-1] held
    position 0 only ([1, 1, H] for a row of 8 tokens). Trimmed for the training only, it reads as loaded afterwards."""
    from accelerate import Accelerator

    from peftlab import build_data, build_model, load_splits, train

    recipe = make_recipe({"train.max_steps": 2, "train.eval_every": None, "train.precision": "fp32"})
    splits, names = load_splits(recipe)
    model, tokenizer, _ = build_model(recipe, num_labels=2, label_names=names)
    data = build_data(recipe, tokenizer, splits=splits, label_names=names)
    batch = tokenizer(["a gripping and lovely film"], return_tensors="pt")
    width = batch["input_ids"].shape[1]
    trained, _ = train(recipe, model, data, Accelerator(cpu=True), tmp_path / "blocks")
    with torch.no_grad():
        assert trained.eval()(**batch, output_hidden_states=True).hidden_states[-1].shape[1] == width > 1
    assert not any("forward" in vars(m) for m in trained.modules() if type(m).__name__ == "BertLayer")
