"""Precision: `auto` and its switch, several runs of different precisions in one process, and the bf16 path with
tolerances that fit bf16 (the exactness tests elsewhere pin fp32).

bf16 keeps 8 bits of mantissa: one rounding is a relative error up to 2^-8 = 0.4%, and a 2-layer forward compounds a
few of them, so logits of the same weights computed in fp32 and in bf16 autocast differ by ~1e-2 at these magnitudes.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from peftlab import build_data, build_model, evaluate, load_splits, load_trained, run
from peftlab.accel import AUTO_PRECISION_ENV, make_accelerator, resolve_precision
from peftlab.errors import ConfigError

from .conftest import logits

BF16_ATOL = 5e-2  # logits of order 1; a few bf16 roundings (0.4% each) through 2 layers


def train_losses(out) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_auto_precision_switch_simulates_the_other_machine_kind(monkeypatch, make_recipe):
    for value in ("bf16", "fp32", " BF16 "):
        monkeypatch.setenv(AUTO_PRECISION_ENV, value)
        assert resolve_precision("auto") == value.strip().lower()
        assert resolve_precision("fp32") == "fp32"  # an explicit precision is not switched
    monkeypatch.setenv(AUTO_PRECISION_ENV, "fp16")
    with pytest.raises(ConfigError, match=r"invalid setting in the environment:\n  - PEFTLAB_AUTO_PRECISION=.fp16.*bf16 or fp32"):
        resolve_precision("auto")
    monkeypatch.delenv(AUTO_PRECISION_ENV)
    cpu_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if not torch.cuda.is_available():
        assert resolve_precision("auto") == ("bf16" if cpu_bf16 else "fp32")  # unset: the machine decides
    other = "fp32" if resolve_precision("auto") == "bf16" else "bf16"
    monkeypatch.setenv(AUTO_PRECISION_ENV, other)
    s = run(make_recipe({"train.max_steps": 2}))
    assert s["precision"] == other == json.loads((make_recipe().out / "run.json").read_text())["precision"]


def test_evaluations_during_training_are_folded_like_the_final_one_under_bf16(make_recipe):
    """Unfolded under bf16 autocast, a young adapter's output is added to the base's in bf16 and partly rounded away
    (SmolLM2 after one step: verbalizer loss 1.64 unfolded, 1.18 folded, 1.14 in fp32). Evaluations during training fold
    it as the final one does, so the last step's figure during training is the final figure, and training goes on
    from the base as loaded (the originals are put back, bit for bit)."""
    recipe = make_recipe({"train.max_steps": 3, "train.eval_every": 1, "train.precision": "bf16", "train.keep_best": False,
                          "train.log_every": 1})
    summary = run(recipe)
    evals = [r for r in map(json.loads, (recipe.out / "log.jsonl").read_text().splitlines()) if r["kind"] == "eval"]
    assert [e["step"] for e in evals] == [1, 2, 3]
    assert evals[-1]["loss"] == pytest.approx(summary["metrics"]["eval"]["loss"], rel=1e-6)
    unevaluated = make_recipe({"train.max_steps": 3, "train.precision": "bf16", "train.keep_best": False, "train.log_every": 1,
                               "output_dir": recipe.out.parent / "no-evals"})
    run(unevaluated)
    assert train_losses(unevaluated.out) == train_losses(recipe.out)  # the evaluations left the base as it was


def test_runs_of_different_precisions_share_one_process(make_recipe, tmp_path):
    """A notebook's sequence: fp32 run, bf16 run, evaluate the fp32 run, fp32 run again. Accelerate's state is
    process-global; each run must get its own precision, and the fp32 results must not be touched by the bf16 run. Each
    leaves no state behind (test_a_run_leaves_an_accelerator_built_after_it_its_own_precision)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # a fresh process's (an earlier test may have left one)
    ov = {"train.max_steps": 4, "train.log_every": 1}
    a = run(make_recipe({**ov, "train.precision": "fp32", "output_dir": tmp_path / "a"}))
    assert AcceleratorState._shared_state == {}
    b = run(make_recipe({**ov, "train.precision": "bf16", "output_dir": tmp_path / "b"}))
    assert AcceleratorState._shared_state == {}
    assert (a["precision"], b["precision"]) == ("fp32", "bf16")
    assert evaluate(tmp_path / "a") == a["metrics"]["eval"]  # re-run in fp32 after the bf16 run: bit-identical
    assert AcceleratorState._shared_state == {}
    assert evaluate(tmp_path / "b")["loss"] == pytest.approx(b["metrics"]["eval"]["loss"], abs=1e-3)
    # `peftlab eval RUN train.precision=X` scores in X, not in the run's precision
    a_bf16 = evaluate(tmp_path / "a", overrides=["train.precision=bf16"], results_dir=tmp_path / "a-bf16")
    assert AcceleratorState._shared_state == {}
    assert a_bf16["loss"] != a["metrics"]["eval"]["loss"] and a_bf16["loss"] == pytest.approx(a["metrics"]["eval"]["loss"], abs=1e-2)
    b_fp32 = evaluate(tmp_path / "b", overrides=["train.precision=fp32"], results_dir=tmp_path / "b-fp32")
    assert AcceleratorState._shared_state == {} and b_fp32["loss"] != evaluate(tmp_path / "b")["loss"]
    c = run(make_recipe({**ov, "train.precision": "fp32", "output_dir": tmp_path / "c"}))
    assert AcceleratorState._shared_state == {}
    assert train_losses(tmp_path / "c") == train_losses(tmp_path / "a") and c["metrics"] == a["metrics"]
    assert train_losses(tmp_path / "b") != train_losses(tmp_path / "a")  # the bf16 run really ran in bf16


def test_a_run_leaves_an_accelerator_built_after_it_its_own_precision(make_recipe, tmp_path):
    """The building blocks after a bf16 run in one process (README): Accelerate's process-global state kept the run's
    bf16, so the caller's Accelerator(cpu=True) got mixed_precision=bf16 and an fp32 recipe trained in bf16, silently;
    an Accelerator built before an evaluation was left with the evaluation's precision. `train` refuses an accelerator
    whose precision is not the recipe's."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from peftlab import train

    AcceleratorState._reset_state(reset_partial_state=True)  # a fresh process's (an earlier test may have left one)
    run(make_recipe({"train.max_steps": 1, "train.precision": "bf16", "output_dir": tmp_path / "b"}))
    assert AcceleratorState._shared_state == {} and Accelerator(cpu=True).mixed_precision == "no"
    evaluate(tmp_path / "b")  # a bf16 evaluation, the caller's fp32 Accelerator built before it
    accelerator = Accelerator(cpu=True)
    assert accelerator.mixed_precision == "no" and accelerator.state.mixed_precision == "no"
    recipe = make_recipe({"train.max_steps": 1, "train.precision": "bf16", "output_dir": tmp_path / "blocks"})
    names = ["negative", "positive"]
    splits, _ = load_splits(recipe)
    model, tok, _ = build_model(recipe, num_labels=2, label_names=names)
    data = build_data(recipe, tok, splits=splits, label_names=names)
    with pytest.raises(ConfigError, match=r"mixed_precision='no' but train.precision='bf16' needs mixed_precision='bf16': build it with "
                                          r"Accelerator\(mixed_precision='bf16'\)"):
        train(recipe, model, data, accelerator, recipe.out)
    recipe.train.precision = "fp32"
    train(recipe, model, data, accelerator, recipe.out)  # the recipe's precision: trains


def test_bf16_run_trains_and_reloads_within_bf16_tolerance(make_recipe):
    """In bf16 the loss falls, the exported adapter reloads to the trained model's logits (exactly under the same
    autocast, within bf16 rounding in fp32), and `peftlab eval` reproduces the run's metrics."""
    from accelerate.utils import set_seed

    from peftlab.export import export
    from peftlab.train import train

    # full fine-tuning: on the random tiny BERT it learns the synthetic task within 64 steps (LoRA needs far more)
    recipe = make_recipe({"adapter.method": "full", "train.precision": "bf16", "train.epochs": 4, "train.lr": 2e-3, "train.log_every": 8})
    splits, names = load_splits(recipe)
    set_seed(recipe.train.seed)  # as run() does: the same initialisation as the run that learns
    model, tok, _ = build_model(recipe, num_labels=2, label_names=names, precision="bf16")
    data = build_data(recipe, tok, splits=splits, label_names=names)
    accelerator = make_accelerator(recipe, "bf16")
    model, _ = train(recipe, model, data, accelerator, recipe.out)
    losses = train_losses(recipe.out)
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.05, losses
    with accelerator.autocast():
        want = logits(model)
    assert want.argmax(-1).tolist() == [1, 0, 1], want  # "good", "bad and boring", "lovely": it learned the sentiment words
    export(recipe.out, accelerator.unwrap_model(model), tok, recipe, {"label_names": names, "precision": "bf16"}, {})
    again, *_ = load_trained(recipe.out)
    with accelerator.autocast():
        torch.testing.assert_close(logits(again), want, atol=1e-6, rtol=0)  # the same weights under the same autocast
    fp32 = logits(again)
    torch.testing.assert_close(fp32, want, atol=BF16_ATOL, rtol=0)
    assert not torch.equal(fp32, want), "autocast did not compute in bf16"
    assert (fp32.argmax(-1) == want.argmax(-1)).all()


def test_gradient_accumulation_matches_a_larger_batch_in_bf16(make_recipe, tmp_path):
    """k micro-batches of B with accumulation = one batch of kB, up to bf16 rounding (the fp32 test is exact)."""
    ov = {"train.precision": "bf16", "train.epochs": 1}
    big = run(make_recipe({**ov, "train.batch_size": 16, "output_dir": tmp_path / "big"}))
    acc = run(make_recipe({**ov, "train.batch_size": 8, "train.grad_accum": 2, "output_dir": tmp_path / "acc"}))
    assert big["steps"] == acc["steps"] == 16
    assert train_losses(tmp_path / "acc") == pytest.approx(train_losses(tmp_path / "big"), abs=1e-2)
    m1 = dict(load_trained(tmp_path / "big")[0].named_parameters())
    m2 = dict(load_trained(tmp_path / "acc")[0].named_parameters())
    lora_b = [k for k in m1 if "lora_B" in k]
    assert lora_b
    for k in lora_b:
        assert m1[k].abs().max() > 1e-3  # trained: B starts at zero
        torch.testing.assert_close(m1[k], m2[k], atol=2e-3, rtol=5e-2)


def test_model_dtype_auto_keeps_a_frozen_base_in_the_precision_and_what_trains_in_fp32(make_recipe, tmp_path):
    """model.dtype=auto: under bf16 the frozen base loads in bf16 while the LoRA weights and the new head stay fp32 (the
    optimizer updates full-precision weights); full fine-tuning and an fp32 run keep every weight in fp32. A bf16 run
    of it trains, and its export reloads within bf16 rounding of its metrics."""
    def dtypes(overrides, precision):
        recipe = make_recipe({"model.dtype": "auto", **overrides})
        model, *_ = build_model(recipe, num_labels=2, label_names=["negative", "positive"], precision=precision)
        frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
        trained = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
        return frozen, trained

    frozen, trained = dtypes({}, "bf16")
    assert frozen == {torch.bfloat16}
    assert set(trained.values()) == {torch.float32} and any("lora_" in n for n in trained) and any("classifier" in n for n in trained)
    assert dtypes({}, "fp32")[0] == {torch.float32}
    frozen, trained = dtypes({"adapter.method": "full"}, "bf16")
    assert not frozen and set(trained.values()) == {torch.float32}

    record = run(make_recipe({"model.dtype": "auto", "train.precision": "bf16", "train.max_steps": 6, "train.log_every": 2,
                              "output_dir": tmp_path / "auto"}))
    losses = train_losses(tmp_path / "auto")
    assert len(losses) == 3 and all(map(math.isfinite, losses))
    again = evaluate(tmp_path / "auto")
    assert again["loss"] == pytest.approx(record["metrics"]["eval"]["loss"], abs=1e-3)


def tiny_llama_lora(**lora):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=True)
    return get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj"], **lora))


def test_cast_frozen_takes_the_frozen_linear_weights_only_their_forward_reads():
    """train.cast_frozen: the frozen projections (and LoRA's base layers) are cast; not the LoRA weights, not the head
    tied to the embedding, not DoRA's base (DoRA reads it for the weight norm). Inside, the logits under autocast are
    those of autocast casting at every call; outside, the weights are their fp32 tensors again."""
    from peftlab.accel import FrozenWeightsCast, castable_weights

    model = tiny_llama_lora()
    names = {id(p): n for n, p in model.named_parameters()}
    picked = {names[id(p)] for p in castable_weights(model)}
    projections = {n for n, p in model.named_parameters() if n.endswith(("proj.weight", "q_proj.base_layer.weight"))}
    assert len(projections) == 14 and picked == projections  # 2 layers x 7 projections; no lm_head, no lora_A/B
    dora = tiny_llama_lora(use_dora=True)
    dora_names = {id(p): n for n, p in dora.named_parameters()}
    assert {dora_names[id(p)] for p in castable_weights(dora)} == projections - {n for n in projections if "q_proj" in n}

    ids = torch.randint(0, 64, (2, 7))
    fp32 = {id(p): (p.data_ptr(), p.dtype) for p in model.parameters()}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        each_call = model(input_ids=ids).logits
        with FrozenWeightsCast(model, torch.bfloat16) as cast:
            assert len(cast.params) == 14 and {p.dtype for p in cast.params} == {torch.bfloat16}
            once = model(input_ids=ids).logits
            with cast.suspended():
                assert {p.dtype for p in cast.params} == {torch.float32}
            assert {p.dtype for p in cast.params} == {torch.bfloat16}
    assert torch.equal(once, each_call)
    assert {id(p): (p.data_ptr(), p.dtype) for p in model.parameters()} == fp32  # the same fp32 tensors back
    assert FrozenWeightsCast(model, None).params == []  # no autocast: nothing to cast


def test_cast_frozen_trains_evaluates_and_checkpoints_as_autocast_does(make_recipe, tmp_path, monkeypatch):
    """The frozen base cast to bf16 once gives the losses, metrics and adapter of autocast casting it at every forward,
    bit for bit, and a checkpoint written while training holds the base's fp32 weights."""
    from safetensors.torch import load_file

    from peftlab import accel

    cast_sizes = []
    enter = accel.FrozenWeightsCast.__enter__
    monkeypatch.setattr(accel.FrozenWeightsCast, "__enter__", lambda self: cast_sizes.append(len(self.params)) or enter(self))
    ov = {"train.precision": "bf16", "train.max_steps": 6, "train.log_every": 1, "train.eval_every": 3, "train.save_every": 3}
    once = run(make_recipe({**ov, "output_dir": tmp_path / "once"}))
    # training (its last evaluation inside, the final one's pass over data.eval), then data.eval again if keep_best chose
    # step 3: 2 layers x 6 linears x (weight, bias) each time
    casts = 2 if once["best_step"] == 6 else 3
    assert len(cast_sizes) == casts and min(cast_sizes) >= 24
    each = run(make_recipe({**ov, "train.cast_frozen": False, "output_dir": tmp_path / "each"}))
    assert cast_sizes[casts:] == [0] * casts
    assert train_losses(tmp_path / "once") == train_losses(tmp_path / "each")
    assert once["metrics"] == each["metrics"] and once["history"] == each["history"]
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("once", "each"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    saved, base = (load_file(str(tmp_path / d / "checkpoints" / "step-6" / "model.safetensors")) for d in ("once", "each"))
    assert saved.keys() == base.keys() and all(saved[k].dtype == torch.float32 and torch.equal(saved[k], base[k]) for k in saved)
    assert not [k for k in saved if k.endswith("base_layer.weight") or "intermediate.dense.weight" in k]  # the frozen base is left out
    frozen = [json.loads((tmp_path / d / "checkpoints" / "step-6" / "trainer_state.json").read_text())["frozen_sha256"] for d in ("once", "each")]
    assert frozen[0] and frozen[0] == frozen[1]  # what --resume checks is the fp32 base's, not the cast copies'


def test_evaluating_a_stored_bf16_full_fine_tune_casts_its_weights_once_with_the_same_metrics(make_recipe, tmp_path, monkeypatch):
    """`peftlab eval` of a finished run scores it frozen, so even a full fine-tune's weights are cast once, and the
    metrics are those of autocast casting them at every forward."""
    from peftlab import accel

    run(make_recipe({"adapter.method": "full", "train.precision": "bf16", "train.max_steps": 3, "output_dir": tmp_path / "f"}))
    sizes = []
    enter = accel.FrozenWeightsCast.__enter__
    monkeypatch.setattr(accel.FrozenWeightsCast, "__enter__", lambda self: sizes.append(len(self.params)) or enter(self))
    once = evaluate(tmp_path / "f", "eval", results_dir=tmp_path / "once")
    per_call = evaluate(tmp_path / "f", "eval", ["train.cast_frozen=false"], results_dir=tmp_path / "per-call")
    assert sizes[0] >= 24 and sizes[1] == 0  # 2 layers x 6 linears x (weight, bias); none when switched off
    assert once == per_call


def test_eval_with_another_precision_loads_the_base_in_it(make_recipe, monkeypatch):
    """`peftlab eval RUN train.precision=fp32` of a bf16 run: the base is rebuilt in float32 (model.dtype auto follows the
    precision; a 4-bit base's compute dtype too), not in the run's bf16."""
    import sys

    recipe = make_recipe({"train.precision": "bf16", "model.dtype": "auto", "train.max_steps": 2})
    run(recipe)
    seen = []
    module = sys.modules["peftlab.export"]  # (peftlab.export is also the function of that name)
    load_base = module.load_base

    def spy(*a, **kw):
        model, head = load_base(*a, **kw)
        seen.append((kw["precision"], next(p for n, p in model.named_parameters() if "embeddings" in n).dtype))
        return model, head
    monkeypatch.setattr(module, "load_base", spy)
    evaluate(recipe.out)
    evaluate(recipe.out, overrides=["train.precision=fp32"])
    assert seen == [("bf16", torch.bfloat16), ("fp32", torch.float32)]
