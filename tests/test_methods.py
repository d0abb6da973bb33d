"""Every peft method as a recipe option, on the tiny BERT: trains (adapter changes, base frozen), saves and reloads
to the same logits, and merges to the same logits where the method is mergeable (prompt methods say why not)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from peftlab import evaluate, load_recipe, load_trained, merge, run
from peftlab.errors import ArtifactError, ModelError
from peftlab.methods import get_method, method_names

from .conftest import logits

PEFT_METHODS = [m for m in method_names() if get_method(m).is_adapter]  # the registered peft methods (no baselines)
PROMPT_METHODS = [m for m in PEFT_METHODS if not get_method(m).mergeable]  # virtual tokens: nothing to merge


def trained_logits(monkeypatch) -> dict:
    """Spy on the run's export: the logits of the trained model exactly as it is handed over to be written."""
    import importlib

    module = importlib.import_module("peftlab.run")  # the module: `peftlab.run` is also the name of the function
    seen, real = {}, module.export

    def spy(out, model, *args, **kwargs):
        seen["logits"] = logits(model)
        return real(out, model, *args, **kwargs)

    monkeypatch.setattr(module, "export", spy)
    return seen


@pytest.mark.parametrize("method", [m for m in PEFT_METHODS if m not in ("prefix_tuning",)])  # prefix: see below
def test_method_trains_saves_reloads_and_merges(make_recipe, method, monkeypatch):
    """The reloaded adapter gives the trained model's logits, for every method (lora included)."""
    # fp32: under bf16 the trained model computes in autocast (Accelerate wraps its forward), the reloaded one does not
    recipe = make_recipe({"adapter.method": method, "train.max_steps": 6, "adapter.num_virtual_tokens": 4, "train.precision": "fp32"})
    trained = trained_logits(monkeypatch)
    summary = run(recipe)
    assert 0 < summary["trainable_percent"] < 100
    config = json.loads((recipe.out / "adapter_config.json").read_text())
    assert config["peft_type"].lower().replace("_", "") == {"p_tuning": "ptuning"}.get(method, method.replace("_", ""))
    model, *_ = load_trained(recipe.out)
    torch.testing.assert_close(logits(model), trained["logits"], atol=1e-6, rtol=0)  # trained = reloaded
    again, *_ = load_trained(recipe.out)
    torch.testing.assert_close(logits(model), logits(again), atol=0, rtol=0)
    assert summary["metrics"]["eval"]["loss"] == pytest.approx(
        json.loads((recipe.out / "metrics.json").read_text())["eval"]["loss"])
    # the run's final evaluation folded a mergeable adapter into the base (eval.merge_adapter): the same score unfolded
    unfolded = evaluate(recipe.out, "eval", ["eval.merge_adapter=false"], results_dir=recipe.out.parent / "unfolded")
    assert unfolded["loss"] == pytest.approx(summary["metrics"]["eval"]["loss"], rel=1e-5)
    if method in PROMPT_METHODS:
        with pytest.raises(ArtifactError, match="nothing to fold into the weights"):
            merge(recipe.out)
        return
    merged, *_ = load_trained(merge(recipe.out))
    diff = (logits(model) - logits(merged)).abs().max().item()
    assert diff <= 1e-4, diff


def test_p_tuning_saves_its_prompt_encoder_as_evaluated_not_a_dropout_sample(make_recipe, monkeypatch):
    """p_tuning saves its prompt encoder's output; exported in train mode (a generative task's evaluation ends with
    model.train()), an encoder with dropout saved one random sample of it, and the reload differed from the trained model."""
    import importlib

    module = importlib.import_module("peftlab.run")
    seen, real = {}, module.export

    def in_train_mode(out, model, *args, **kwargs):
        model.train()  # as the generative tasks hand it over
        record = real(out, model, *args, **kwargs)
        seen["logits"] = logits(model)  # the trained model, evaluated
        return record

    monkeypatch.setattr(module, "export", in_train_mode)
    recipe = make_recipe({"adapter.method": "p_tuning", "train.max_steps": 3, "adapter.num_virtual_tokens": 4,
                          "train.precision": "fp32",
                          "adapter.options": "{encoder_reparameterization_type: LSTM, encoder_dropout: 0.5}"})
    run(recipe)
    torch.testing.assert_close(logits(load_trained(recipe.out)[0]), seen["logits"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("method, field", [("lora", "r"), ("loha", "r"), ("lokr", "r"), ("vera", "r"), ("adalora", "adalora_init_r")])
def test_a_rank_above_the_adapted_layers_is_refused_before_peft_allocates_it(make_recipe, method, field):
    """adapter.r=10^13 passed validate, then train failed inside peft (cannot allocate memory). The tiny BERT's widest
    adapted layer is 32 x 32: a rank above 32 adds nothing."""
    from peftlab import build_model
    from peftlab.model import model_problems

    others = {"adapter.r": 8} if field != "r" else {}
    recipe = make_recipe({"adapter.method": method, f"adapter.{field}": 10**13, **others})
    with pytest.raises(ModelError, match=rf"adapter.{field}=10000000000000: above the largest rank .* 32 \(.*query, Linear\).* <= 32") as e:
        build_model(recipe, num_labels=2, label_names=["negative", "positive"])
    assert model_problems(recipe) == [str(e.value)]  # `validate` says it, in the same words
    assert model_problems(make_recipe({"adapter.method": method, f"adapter.{field}": 32, **{k: 32 for k in others}})) == []
    assert model_problems(make_recipe({"adapter.method": "oft", "adapter.r": 4})) == []  # (OFT's r: blocks, not a rank)


@pytest.mark.parametrize("options", [{"adapter.r": 5}, {"adapter.options": "{oft_block_size: 5}"}])
def test_oft_blocks_that_do_not_divide_a_layer_are_refused_not_changed(make_recipe, options):
    """OFT's r=5 on 32-wide layers: peft trained r=4 with a UserWarning while adapter_config.json and the card said 5.
    validate said ok to it (train refused it once the weights were loaded): it applies OFT to the base built on meta."""
    from peftlab import build_model
    from peftlab.model import model_problems

    with pytest.raises(ModelError, match=r"Invalid `(r|oft_block_size)` \(5\)! Adjusted .* must divide the input width") as e:
        build_model(make_recipe({"adapter.method": "oft", **options}), num_labels=2, label_names=["negative", "positive"])
    for targets in ({}, {"adapter.target_modules": None}, {"adapter.target_modules": "all-linear"}):
        assert model_problems(make_recipe({"adapter.method": "oft", **options, **targets})) == [str(e.value)]
    build_model(make_recipe({"adapter.method": "oft", "adapter.r": 4}), num_labels=2, label_names=["negative", "positive"])


@pytest.mark.parametrize("model", ["tiny_bert", "tiny_llama"])
def test_prefix_tuning_for_classification_says_what_to_use(make_recipe, request, model):
    from peftlab import build_model
    from peftlab.errors import ConfigError, ModelError
    from peftlab.methods.prompt import apply_prefix

    with pytest.raises(ConfigError, match="prefix_tuning does not work for classification.*prompt_tuning or p_tuning"):
        make_recipe({"adapter.method": "prefix_tuning"}, model=request.getfixturevalue(model))  # `peftlab validate` says it
    recipe = make_recipe({}, model=request.getfixturevalue(model))
    recipe.adapter.method = "prefix_tuning"  # changed in Python: the building blocks check it again
    with pytest.raises(ConfigError, match="prefix_tuning does not work for classification.*prompt_tuning or p_tuning"):
        build_model(recipe, num_labels=2, label_names=["negative", "positive"])
    with pytest.raises(ModelError, match="prefix_tuning does not work for classification.*prompt_tuning or p_tuning"):
        apply_prefix(None, recipe, [], "SEQ_CLS")  # the model build, past the checks, refuses it too


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_prompt_methods_on_a_decoder_classifier_are_refused_and_why(make_recipe, tiny_llama, method):
    """peft gives a prompt method's classifier embeddings only, and a decoder-only classifier then pools the batch's
    last position (padding for the shorter rows): a row's prediction depended on its batch (the run's batched eval
    0.625, at eval.batch_size=1 0.656). Refused by `validate` and at build; an encoder (position 0) is not affected."""
    import re

    from peftlab import build_model
    from peftlab.errors import ModelError
    from peftlab.run import preflight

    refusal = rf"adapter.method={method} on a decoder-only classifier \(llama\).*pools the batch's last position.*task.type=verbalizer"
    recipe = make_recipe({"adapter.method": method, "adapter.target_modules": None}, model=tiny_llama)
    assert any(re.search(refusal, p) for p in preflight(recipe, training=False))  # `peftlab validate`
    with pytest.raises(ModelError, match=refusal):  # the build (the Python API, past validation)
        build_model(recipe, num_labels=2, label_names=["negative", "positive"])
    encoder = make_recipe({"adapter.method": method, "adapter.target_modules": None})  # the tiny BERT reads position 0
    assert not any("decoder-only" in p for p in preflight(encoder, training=False))


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_prompt_methods_on_an_encoder_decoder_classifier_are_refused(make_recipe, tmp_path, method):
    """BART/T5 classifiers find the end-of-sequence token they pool from the token ids: with the embeddings peft gives
    them, training stopped at the first batch on transformers' NotImplementedError traceback."""
    from transformers import BartConfig, BartForConditionalGeneration

    from peftlab import build_model
    from peftlab.errors import ModelError
    from peftlab.run import preflight

    from .conftest import minilm_tokenizer

    tok, bart = minilm_tokenizer(), tmp_path / "tiny-bart"
    BartForConditionalGeneration(BartConfig(vocab_size=tok.vocab_size, d_model=16, encoder_layers=1, decoder_layers=1,
                                            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                            decoder_ffn_dim=32, max_position_embeddings=64, pad_token_id=tok.pad_token_id)).save_pretrained(bart)
    tok.save_pretrained(bart)
    refusal = rf"adapter.method={method} on an encoder-decoder classifier \(bart\).*token ids.*Use adapter.method=lora"
    recipe = make_recipe({"adapter.method": method, "adapter.target_modules": None, "export.merge": False}, model=bart)
    assert any(re.search(refusal, p) for p in preflight(recipe, training=False))  # `peftlab validate`
    with pytest.raises(ModelError, match=refusal):
        build_model(recipe, num_labels=2, label_names=["negative", "positive"])
    lora = make_recipe({"adapter.target_modules": "all-linear"}, model=bart)
    assert not any("encoder-decoder classifier" in p for p in preflight(lora, training=False))


def test_prompt_methods_for_clm_are_refused(tmp_path, chat_llama):
    """clm keeps a block's documents apart by their position ids, which peft drops for prompt and P-tuning (a prefix
    comes as a cache, with which transformers builds no packed mask): the second document's logits moved by ~7 when
    the first changed. Refused; lora is fine."""
    from peftlab import load_recipe
    from peftlab.errors import ConfigError

    train = tmp_path / "t.jsonl"
    train.write_text('{"text": "a b c"}\n')
    base = [f"data.train.path={train}", "data.eval=null", "task.type=clm", "data.text_columns=[text]", f"model.name={chat_llama}"]
    for method in ("prompt_tuning", "p_tuning", "prefix_tuning"):
        with pytest.raises(ConfigError, match=f"task.type=clm with adapter.method={method}: .*position ids.*Use lora"):
            load_recipe(None, [*base, f"adapter.method={method}", "adapter.target_modules=null"])
    load_recipe(None, base)


@pytest.mark.precision
def test_adalora_rank_budget_is_driven_by_the_loop(make_recipe):
    """AdaLoRA starts at adalora_init_r everywhere; the loop's update_and_allocate calls shrink the budget to an
    average of adapter.r, and the saved adapter holds only the kept ranks (it reloads to the same logits)."""
    from safetensors.torch import load_file

    from peftlab import evaluate

    recipe = make_recipe({"adapter.method": "adalora", "adapter.r": 2, "adapter.adalora_init_r": 6, "train.max_steps": 8})
    summary = run(recipe)
    config = json.loads((recipe.out / "adapter_config.json").read_text())
    assert (config["total_step"], config["tinit"], config["tfinal"]) == (8, 0, 1)  # from the loop's total steps and the fractions
    pattern = config["rank_pattern"]
    assert pattern, "no rank pattern: update_and_allocate never ran"
    kept = [sum(mask) for mask in pattern.values()]
    assert all(len(mask) == 6 for mask in pattern.values())
    assert sum(kept) == 2 * len(pattern) < 6 * len(pattern)  # the final budget: an average of r=2 of the initial 6
    assert len(set(kept)) > 1 or min(kept) < 6  # ranks were pruned (unevenly where importance differs)
    weights = load_file(str(recipe.out / "adapter_model.safetensors"))
    saved = sorted(v.shape[0] for k, v in weights.items() if "lora_E" in k)
    assert saved == sorted(kept)  # only the kept ranks are written
    ranks = json.loads((recipe.out / "run.json").read_text())["adapter_ranks"]
    assert ranks == {"average": 2.0, "min": min(kept), "max": max(kept)}
    from peftlab.publish.card import card_text

    held = sum(v.numel() for v in weights.values())  # the card counts what is published, not AdaLoRA's initial ranks
    assert held < summary["trainable_params"] and f"- parameters in the exported adapter (`adapter_model.safetensors`): {held:,}" \
        in card_text(recipe.out)
    assert evaluate(recipe.out)["loss"] == pytest.approx(summary["metrics"]["eval"]["loss"], abs=1e-5)  # reload = trained


def test_adalora_keep_best_exports_the_ranks_of_the_kept_step(make_recipe):
    """keep_best restores an earlier step's weights, and with them that step's rank pattern: the exported model is the
    one scored then (the final pattern re-applied to them made another model, with other figures)."""
    from peftlab import evaluate

    recipe = make_recipe({"adapter.method": "adalora", "adapter.r": 2, "adapter.adalora_init_r": 6, "train.max_steps": 8,
                          "train.eval_every": 1, "train.lr": 5e-2, "train.best_metric": "loss",
                          "train.precision": "bf16"})
    summary = run(recipe)
    evals = {r["step"]: r for r in map(json.loads, (recipe.out / "log.jsonl").read_text().splitlines()) if r["kind"] == "eval"}
    assert summary.best_step < summary.steps, "the test needs an earlier step kept"
    kept = evals[summary.best_step]
    assert summary["metrics"]["eval"]["loss"] == kept["loss"]  # the same model, evaluated the same way: the same figure
    assert evaluate(recipe.out)["loss"] == pytest.approx(kept["loss"], rel=1e-6)  # reloaded from the exported files too


def test_adalora_schedule_survives_resume(make_recipe, tmp_path):
    """The rank allocator's state travels with the checkpoints: resumed mid-budget, a run ends with the same ranks."""
    import shutil

    base = {"adapter.method": "adalora", "adapter.r": 2, "adapter.adalora_init_r": 6, "train.max_steps": 8, "train.save_every": 4}
    whole = make_recipe({**base, "output_dir": str(tmp_path / "whole")})
    run(whole)
    assert (whole.out / "checkpoints" / "step-4" / "custom_checkpoint_1.pkl").is_file()  # [scheduler, rank budget]
    part = make_recipe({**base, "output_dir": str(tmp_path / "part")})
    shutil.copytree(whole.out / "checkpoints" / "step-4", part.out / "checkpoints" / "step-4")
    run(part, resume=True)
    pattern = [json.loads((r.out / "adapter_config.json").read_text())["rank_pattern"] for r in (whole, part)]
    assert pattern[0] == pattern[1]


@pytest.mark.parametrize("init", ["gaussian", "pissa", "olora"])
def test_lora_initialisations_train_save_reload_and_merge(make_recipe, init, monkeypatch):
    """pissa/olora change the base weights they train on; the export converts the adapter to plain LoRA (rank 2r) on
    the original base, so reloading and merging reproduce the trained model."""
    from peftlab import evaluate

    recipe = make_recipe({"adapter.init": init, "train.max_steps": 6, "train.precision": "fp32"})  # fp32: see above
    trained = trained_logits(monkeypatch)
    summary = run(recipe)
    config = json.loads((recipe.out / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == (init if init == "gaussian" else True)
    assert config["r"] == (4 if init == "gaussian" else 8)
    from peftlab.publish.card import card_text

    card = card_text(recipe.out)  # the card describes the adapter it ships: the converted rank 2r, beside the trained r
    assert ("- exported as rank 8, lora_alpha 16 (`adapter_config.json`): PiSSA/OLoRA" in card) == (init != "gaussian")
    reloaded = evaluate(recipe.out)
    assert reloaded["loss"] == pytest.approx(summary["metrics"]["eval"]["loss"], abs=1e-5)
    model, *_ = load_trained(recipe.out)
    assert (logits(model) - trained["logits"]).abs().max().item() <= 1e-4  # the converted adapter = the trained model
    merged, *_ = load_trained(merge(recipe.out))
    assert (logits(model) - logits(merged)).abs().max().item() <= 1e-4


def test_pissa_starts_from_the_principal_components(make_recipe):
    from peftlab import build_model, load_splits

    recipe = make_recipe({"adapter.init": "pissa"})
    _, names = load_splits(recipe)
    plain, *_ = build_model(make_recipe(), num_labels=2, label_names=names)
    pissa, *_ = build_model(recipe, num_labels=2, label_names=names)
    layer = pissa.base_model.model.bert.encoder.layer[0].attention.self.query
    original = plain.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer.weight
    delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(layer.base_layer.weight + delta, original, atol=1e-5, rtol=0)  # W = W_res + B0 A0
    top = torch.linalg.svdvals(original)[:4]
    torch.testing.assert_close(torch.linalg.svdvals(delta)[:4], top, atol=1e-4, rtol=1e-4)  # B0 A0: the top-4 components
    assert hasattr(pissa, "peftlab_initial_adapter")


def test_loraplus_gives_lora_b_its_own_learning_rate(make_recipe):
    from peftlab import build_model, load_splits
    from peftlab.train import optimizer_for

    recipe = make_recipe({"adapter.loraplus_lr_ratio": 16, "train.lr": 1e-3})
    _, names = load_splits(recipe)
    model, *_ = build_model(recipe, num_labels=2, label_names=names)
    opt = optimizer_for(model, recipe)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        want_lr = 16e-3 if ".lora_B." in name else 1e-3
        want_wd = recipe.train.weight_decay if p.ndim >= 2 else 0.0
        assert lr_of[id(p)] == pytest.approx((want_lr, want_wd)), name
    assert sum(".lora_B." in n for n, p in model.named_parameters() if p.requires_grad) == 4
    plain = make_recipe()
    assert {g["lr"] for g in optimizer_for(model, plain).param_groups} == {plain.train.lr}  # off: one learning rate


def test_loraplus_and_inits_are_refused_where_they_cannot_work(make_recipe):
    from peftlab.errors import ConfigError

    with pytest.raises(ConfigError, match="loraplus_lr_ratio=16.0 with adapter.method=ia3"):
        make_recipe({"adapter.method": "ia3", "adapter.loraplus_lr_ratio": 16})
    with pytest.raises(ConfigError, match="adapter.init=pissa with quant.mode=4bit") as e:
        make_recipe({"adapter.init": "pissa", "quant.mode": "4bit", "adapter.loraplus_lr_ratio": 0.5})
    assert "must be >= 1" in str(e.value)  # every problem at once
    with pytest.raises(ConfigError, match="adapter.init=loftq with quant.mode=none"):
        make_recipe({"adapter.init": "loftq"})
    with pytest.raises(ConfigError, match="adapter.init=olora with adapter.method=loha"):
        make_recipe({"adapter.init": "olora", "adapter.method": "loha"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_loftq_without_a_gpu_says_why(make_recipe):
    from peftlab import build_model
    from peftlab.errors import ModelError

    pytest.importorskip("bitsandbytes")
    recipe = make_recipe({"adapter.init": "loftq", "quant.mode": "4bit"})
    with pytest.raises(ModelError, match="loftq needs a CUDA GPU"):
        build_model(recipe, num_labels=2, label_names=["negative", "positive"])


def test_loftq_without_a_gpu_is_refused_by_validate_and_train_before_any_work(make_recipe, tmp_path, capsys, monkeypatch):
    from peftlab.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    make_recipe()
    recipe, override = str(tmp_path / "recipe.yaml"), ["adapter.init=loftq", "quant.mode=4bit"]
    assert main(["validate", recipe, *override]) == 2
    assert "adapter.init=loftq needs a CUDA GPU" in capsys.readouterr().out
    assert main(["train", recipe, *override]) == 2
    assert "adapter.init=loftq needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_scratch_is_the_same_architecture_randomly_initialised(make_recipe, tiny_bert):
    from transformers import AutoModelForSequenceClassification

    from peftlab import build_model, load_splits

    recipe = make_recipe({"adapter.method": "scratch", "train.max_steps": 4})
    _, names = load_splits(recipe)
    model, _, info = build_model(recipe, num_labels=2, label_names=names)
    pretrained = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    ours, theirs = dict(model.named_parameters()), dict(pretrained.named_parameters())
    assert ours.keys() == theirs.keys() and all(ours[k].shape == theirs[k].shape for k in ours)  # same architecture
    body = [k for k in ours if not k.startswith("classifier")]
    matrices = [k for k in body if ours[k].ndim == 2]  # (biases and norms start at 0 and 1 either way)
    assert matrices and all(not torch.equal(ours[k], theirs[k]) for k in matrices)  # none of the pretrained weights
    assert all(p.requires_grad for p in ours.values()) and info.trainable_percent == pytest.approx(100.0)
    summary = run(recipe)
    assert (recipe.out / "model.safetensors").is_file() and not (recipe.out / "adapter_config.json").exists()
    reloaded, *_ = load_trained(recipe.out)
    from peftlab import evaluate

    assert evaluate(recipe.out)["loss"] == pytest.approx(summary["metrics"]["eval"]["loss"], abs=1e-6)
    assert not torch.equal(dict(reloaded.named_parameters())["bert.encoder.layer.0.attention.self.query.weight"],
                           ours["bert.encoder.layer.0.attention.self.query.weight"])  # it trained


@pytest.mark.parametrize("targets", [["query", "value"], ["query", "value", "output.dense"], ["dense"], "all-linear"])
def test_ia3_with_target_modules_saves_an_adapter_that_loads_again(make_recipe, tiny_bert, targets):
    """peft recorded its own feed-forward layers (BERT: output.dense) beside targets that did not hold them, or named
    them in full (all-linear): the adapter trained and exported, then never loaded again, in peftlab or plain peft."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    recipe = make_recipe({"adapter.method": "ia3", "adapter.target_modules": targets, "train.max_steps": 3, "train.lr": 5e-2,
                          "train.precision": "fp32"})
    record = run(recipe)
    model, *_ = load_trained(recipe.out)
    assert evaluate(recipe.out, results_dir=recipe.out.parent / "again")["loss"] == pytest.approx(record.metrics["eval"]["loss"], abs=1e-6)
    plain = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2), recipe.out)
    assert torch.equal(logits(plain.eval()), logits(model))


@pytest.mark.parametrize("tied", [True, False])
def test_an_adapter_on_an_embedding_tied_to_the_lm_head_is_refused(tmp_path, tied):
    """LoRA on a tied embed_tokens trained a model whose LM head stayed as it was, but folding the update in (the final
    evaluation's eval.merge_adapter, peftlab merge, --gguf) changed the head too: the run's figures (eval loss 14.2 for
    a trained 5.5) and its merged model were another model's. validate and train refuse it; untied, it is kept."""
    from transformers import AutoModelForCausalLM

    from peftlab.errors import ModelError
    from peftlab.methods.peft_adapter import check_target_modules
    from peftlab.model import model_problems

    from .test_gguf import tiny_llama_folder

    tiny_llama_folder(tmp_path / "base", tied=tied)
    recipe = load_recipe(None, [f"model.name={tmp_path / 'base'}", "task.type=clm", f"data.train.path={tmp_path / 'x.jsonl'}",
                                "data.text_columns=[text]", "adapter.target_modules=[q_proj, embed_tokens]"], validate_files=False)
    said = [p for p in model_problems(recipe) if "ties to its LM head" in p]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    if not tied:
        assert not said
        check_target_modules(model, ["q_proj", "embed_tokens"])
        return
    assert said == ["adapter.target_modules: 'embed_tokens' is the input embedding LlamaForCausalLM ties to its LM head "
                    "(tie_word_embeddings): folded in (eval.merge_adapter, peftlab merge, --gguf), its update changes the LM "
                    "head too, a model other than the one trained, whose figures and merged weights would be wrong. Leave it "
                    "out of adapter.target_modules."]
    with pytest.raises(ModelError, match="ties to its LM head"):
        check_target_modules(model, ["q_proj", "embed_tokens"])


def test_adalora_exported_before_its_budget_pruned_says_its_real_ranks(make_recipe, caplog):
    """keep_best kept a step at or before tinit: the adapter was exported unpruned (adalora_init_r everywhere) while the
    card said "average rank 2" (the target) and nothing warned; the card's trainable parameters are the initial ranks'."""
    from peftlab.publish.card import card_text

    recipe = make_recipe({"adapter.method": "adalora", "adapter.r": 2, "adapter.adalora_init_r": 6, "train.max_steps": 8,
                          "adapter.adalora_warmup_fraction": 0.5, "train.eval_every": 4, "train.best_metric": "accuracy",
                          "train.lr": 1e-12})  # (no step changes the accuracy: the first evaluation, at step 4 = tinit, is kept)
    with caplog.at_level("WARNING", logger="peftlab"):
        summary = run(recipe)
    assert summary.best_step == 4
    assert json.loads((recipe.out / "run.json").read_text())["adapter_ranks"] == {"average": 6.0, "min": 6, "max": 6}
    assert "average rank of 6.0, not adapter.r=2 (not pruned at all)" in caplog.text and "train.keep_best=false" in caplog.text
    card = card_text(recipe.out)
    assert "An AdaLoRA adapter (rank 6 in every layer; not pruned to its budget of 2: the exported step came before it)" in card
    assert f"- trainable parameters: {summary['trainable_params']:,} of" in card and "AdaLoRA's initial allocation, rank 6" in card


def test_prompt_tuning_text_init_reads_the_base_tokenizer(make_recipe, tiny_bert):
    """peft's TEXT init needs tokenizer_name_or_path: validate passed a recipe without it, and train failed with peft's
    message. The base's own tokenizer is filled in: the virtual tokens start as the text's token embeddings."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    text = "classify the sentiment"
    recipe = make_recipe({"adapter.method": "prompt_tuning", "adapter.num_virtual_tokens": 3, "train.max_steps": 1,
                          "train.lr": 1e-12, "adapter.options": f"{{prompt_tuning_init: TEXT, prompt_tuning_init_text: '{text}'}}"})
    run(recipe)
    assert json.loads((recipe.out / "adapter_config.json").read_text())["tokenizer_name_or_path"] == str(tiny_bert)
    ids = AutoTokenizer.from_pretrained(tiny_bert)(text)["input_ids"][:3]  # (peft: with the special tokens, cut to 3)
    words = AutoModel.from_pretrained(tiny_bert).get_input_embeddings().weight[ids].detach()
    torch.testing.assert_close(load_file(str(recipe.out / "adapter_model.safetensors"))["prompt_embeddings"], words, atol=1e-6, rtol=0)
