"""The training loop: learns, trains only what the method says, is reproducible, keeps the best, resumes exactly."""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftlab import build_data, build_model, load_splits, run
from peftlab.errors import ArtifactError, ConfigError, ModelError

from .conftest import assert_resume_is_uninterrupted, losses


def test_lora_trains_adapter_and_head_only_base_frozen(make_recipe):
    recipe = make_recipe({"train.precision": "fp32"})
    splits, names = load_splits(recipe)
    model, tok, info = build_model(recipe, num_labels=2, label_names=names)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainable = {k for k, v in model.named_parameters() if v.requires_grad}
    assert trainable and all("lora_" in k or "classifier" in k for k in trainable), trainable
    assert info.trainable_params == sum(before[k].numel() for k in trainable)
    assert info.trainable_percent < 1.0

    from peftlab.accel import make_accelerator
    from peftlab.train import train

    data = build_data(recipe, tok, splits=splits, label_names=names)
    model, state = train(recipe, model, data, make_accelerator(recipe, "fp32"), recipe.out)
    after = dict(model.named_parameters())
    changed = {k for k in before if not torch.equal(before[k], after[k].detach())}
    assert any("lora_B" in k for k in changed) and any("classifier" in k for k in changed)
    assert changed <= trainable, f"frozen weights changed: {changed - trainable}"


def test_expected_loss_regression(make_recipe):
    """Pinned losses of a seeded tiny run: a change in data order, init, loss or schedule shows up here (fp32: the
    pinned values are fp32's; bf16 rounds differently)."""
    s = run(make_recipe({"train.epochs": 1, "train.log_every": 4, "train.precision": "fp32"}))
    got = losses(Path(s["output_dir"]))
    assert got == pytest.approx(EXPECTED_LOSSES, abs=2e-3), got


EXPECTED_LOSSES = [0.6989374160766602, 0.6934073567390442, 0.6945822238922119, 0.6920960545539856]  # length-grouped batches (the default)


def test_full_finetuning_learns_and_frozen_trains_head_only(make_recipe):
    s = run(make_recipe({"adapter.method": "full", "train.lr": 1e-3, "train.epochs": 10, "train.log_every": 16}))
    assert s["metrics"]["eval"]["accuracy"] >= 0.95, s["metrics"]
    assert s["trainable_percent"] == pytest.approx(100.0)
    recipe = make_recipe({"adapter.method": "frozen", "output_dir": s["output_dir"] + "-frozen"})
    _, names = load_splits(recipe)
    model, _, info = build_model(recipe, num_labels=2, label_names=names)
    assert {k.split(".")[0] for k, p in model.named_parameters() if p.requires_grad} == {"classifier"}
    assert info.trainable_params == 32 * 2 + 2


def test_same_seed_same_run_and_different_seed_differs(make_recipe, tmp_path):
    a = run(make_recipe({"train.epochs": 1, "output_dir": tmp_path / "a"}))
    b = run(make_recipe({"train.epochs": 1, "output_dir": tmp_path / "b"}))
    c = run(make_recipe({"train.epochs": 1, "train.seed": 7, "output_dir": tmp_path / "c"}))
    la, lb, lc = (losses(tmp_path / x) for x in "abc")
    assert la == lb and a["metrics"] == b["metrics"]
    assert la != lc and c["steps"] == a["steps"]


@pytest.mark.precision
def test_keep_best_exports_the_best_evaluation(make_recipe):
    """Accuracy reaches 1.0 at step 64 and ties after it (the loop keeps strict improvements only), while the loss keeps
    falling: the exported weights must be step 64's, not the last step's."""
    s = run(make_recipe({"adapter.method": "full", "train.lr": 1e-3, "train.epochs": 10, "train.eval_every": 16}))
    history = s["history"]
    best = max(history, key=lambda h: h["accuracy"])  # the first of the ties
    last = history[-1]
    assert s["best_step"] == best["step"] < last["step"] == s["steps"], "the kept weights must come from an earlier evaluation"
    assert s["metrics"]["eval"]["accuracy"] == pytest.approx(best["accuracy"])
    assert s["metrics"]["eval"]["loss"] == pytest.approx(best["loss"], abs=1e-5)
    assert abs(s["metrics"]["eval"]["loss"] - last["loss"]) > 0.1, "the last step's weights were exported"


@pytest.mark.parametrize("keep_best", [False, True])
def test_the_last_steps_evaluation_is_the_final_one_and_data_eval_is_scored_once(make_recipe, monkeypatch, keep_best):
    """The loop's evaluation at the last step and the final evaluation scored the same weights on data.eval twice. The
    last step's is now the final one's pass (report, predictions and all), kept where the exported weights are that
    step's; when keep_best exports an earlier step (forced here: step 2's accuracy reads 10), data.eval is scored again
    with those weights."""
    from peftlab.tasks import classification

    evaluate, calls = classification.evaluate, []

    def counted(*args, **kwargs):
        metrics, report = evaluate(*args, **kwargs)
        calls.append(dict(metrics))
        if keep_best and len(calls) == 1:
            metrics["accuracy"] = 10.0
        return metrics, report

    monkeypatch.setattr(classification, "evaluate", counted)
    recipe = make_recipe({"train.max_steps": 4, "train.eval_every": 2, "train.keep_best": keep_best})
    record = run(recipe)
    assert [h["step"] for h in record["history"]] == [2, 4]
    final = record["metrics"]["eval"]
    if keep_best:  # step 2's weights, scored again: the real accuracy, not the 10 that chose them
        assert record["best_step"] == 2 and len(calls) == 3 and final == calls[2] and final["accuracy"] <= 1
    else:
        assert record["best_step"] == 4 and len(calls) == 2 and final == calls[1]
        assert {k: v for k, v in record["history"][-1].items() if k != "step"} == final
    report = json.loads((recipe.out / "eval_report.json").read_text())
    confusion = report["confusion"]
    assert report["split"] == "eval" and sum(confusion[i][i] for i in range(2)) / report["n"] == pytest.approx(final["accuracy"])
    assert len((recipe.out / "predictions-eval.jsonl").read_text().splitlines()) == 64


def test_an_evaluation_that_early_stopping_makes_the_last_is_the_final_one(make_recipe, monkeypatch):
    """Early stopping (keep_best off) ended the run at an evaluation that was the loop's own, and the final evaluation
    scored data.eval again with the same weights (a whole generation pass for SFT). An evaluation after which the run
    stops unless it improves is now the final evaluation's pass; one that then improves is not kept (step 2's here)."""
    from peftlab.tasks import classification

    evaluate, calls = classification.evaluate, []

    def counted(*args, **kwargs):  # accuracies 0.9, 0.95, 0.8, 0.7: best at step 2, no improvement at 3 and 4 -> stop at 4
        metrics, report = evaluate(*args, **kwargs)
        metrics["accuracy"] = (0.9, 0.95, 0.8, 0.7, 0.6)[len(calls)]
        calls.append(dict(metrics))
        return metrics, report

    monkeypatch.setattr(classification, "evaluate", counted)
    recipe = make_recipe({"train.max_steps": 8, "train.eval_every": 1, "train.early_stopping": 2, "train.keep_best": False})
    record = run(recipe)
    assert record["stopped_early"] and record["steps"] == 4 and [h["step"] for h in record["history"]] == [1, 2, 3, 4]
    assert len(calls) == 4 and record["metrics"]["eval"] == calls[3]  # (was 5: step 4 scored twice)
    report = json.loads((recipe.out / "eval_report.json").read_text())
    assert report["n"] == 64 and len((recipe.out / "predictions-eval.jsonl").read_text().splitlines()) == 64


def test_only_a_complete_in_loop_evaluation_stands_for_the_final_one():
    """A loop evaluation without the tokenizer (a generated metric not kept) misses the generated metrics, and AdaLoRA
    masks its ranks after the last step: the final evaluation then scores data.eval itself."""
    from types import SimpleNamespace

    from peftlab.methods import NoSchedule
    from peftlab.train import final_form

    cls, summ = (SimpleNamespace(task=SimpleNamespace(type=t)) for t in ("classification", "summarization"))
    assert final_form(cls, SimpleNamespace(eval_context={}, schedule=NoSchedule()))
    assert not final_form(cls, SimpleNamespace(eval_context={}, schedule=object()))
    assert not final_form(summ, SimpleNamespace(eval_context={}, schedule=NoSchedule()))
    assert final_form(summ, SimpleNamespace(eval_context={"tokenizer": 1}, schedule=NoSchedule()))


@pytest.mark.parametrize("rows", [None, 40])
def test_gradient_accumulation_matches_a_larger_batch(make_recipe, tmp_path, rows):
    """k micro-batches of B with accumulation = one batch of kB (no dropout, same data order). fp32: exact up to the
    summation order; the bf16 version (with bf16's tolerance) is in test_precision.py. 40 rows: the epoch's last step
    is one micro-batch of 8, which weighed as half of a step of 16 (Accelerate's / grad_accum)."""
    from peftlab.export import load_trained

    ov = {"train.epochs": 1, "train.precision": "fp32", "data.train.max_samples": rows}
    big = run(make_recipe({**ov, "train.batch_size": 16, "output_dir": tmp_path / "big"}))
    acc = run(make_recipe({**ov, "train.batch_size": 8, "train.grad_accum": 2, "output_dir": tmp_path / "acc"}))
    assert big["steps"] == acc["steps"]
    assert losses(tmp_path / "acc") == pytest.approx(losses(tmp_path / "big"), abs=1e-5)
    m1 = dict(load_trained(tmp_path / "big")[0].named_parameters())
    m2 = dict(load_trained(tmp_path / "acc")[0].named_parameters())
    for k in m1:
        if "lora_B" in k:
            torch.testing.assert_close(m1[k], m2[k], atol=1e-5, rtol=1e-4)


@pytest.mark.precision
def test_checkpoint_resume_matches_uninterrupted(make_recipe, tmp_path):
    """Resume from the step-8 checkpoint of a run (mid-epoch): the rest of the run is the same as without a stop."""
    ov = {"train.epochs": 2, "train.save_every": 8, "train.keep_checkpoints": 4}
    assert_resume_is_uninterrupted(make_recipe, tmp_path, ov, step=8, steps=32)


@pytest.mark.parametrize("method", ["frozen", "vera", "full"])
def test_checkpoints_leave_out_the_frozen_base_and_resume_exactly(make_recipe, tmp_path, method):
    """A checkpoint holds what training changes (adapter, head; VeRA's own frozen projections too), not the frozen base
    built again on --resume; the resumed run is the uninterrupted one."""
    from safetensors import safe_open

    ov = {"adapter.method": method, "train.max_steps": 8, "train.save_every": 4, "train.lr": 1e-3 if method == "full" else 5e-3}
    assert_resume_is_uninterrupted(make_recipe, tmp_path, ov, step=4, steps=8)
    with safe_open(str(tmp_path / "full" / "checkpoints" / "step-4" / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    state = json.loads((tmp_path / "full" / "checkpoints" / "step-4" / "trainer_state.json").read_text())
    frozen_base = [k for k in saved if "attention.self.query" in k and "lora" not in k and "vera" not in k]
    if method == "full":  # nothing is frozen: all of it is saved
        assert frozen_base and state["frozen_sha256"] is None
    else:
        assert not frozen_base and state["frozen_sha256"] and any("classifier" in k for k in saved)
    if method == "vera":
        assert any("vera_A" in k for k in saved) and any("vera_lambda" in k for k in saved)


def test_resume_refuses_a_base_changed_since_the_checkpoint(make_recipe, tmp_path, tiny_bert):
    """Checkpoints leave the frozen base out: --resume builds it again, so a base folder rewritten since (other weights
    under the same model.name) is refused before training, and the run folder keeps its checkpoint."""
    from safetensors.torch import save_file

    base = tmp_path / "base"
    shutil.copytree(tiny_bert, base)
    recipe = make_recipe({"train.max_steps": 4, "train.save_every": 2}, model=base)
    run(recipe)
    part = tmp_path / "part"
    shutil.copytree(recipe.out / "checkpoints" / "step-2", part / "checkpoints" / "step-2")
    before = sorted(p.relative_to(part) for p in part.rglob("*"))
    resumed = make_recipe({"train.max_steps": 4, "train.save_every": 2, "output_dir": part}, model=base)
    config = json.loads((base / "config.json").read_text())  # its config only (layer_norm_eps: no weight changes)
    (base / "config.json").write_text(json.dumps({**config, "layer_norm_eps": 1e-3}))
    with pytest.raises(ArtifactError, match="frozen base built now differs from the one checkpoint .* model.name changed"):
        run(resumed, resume=True)
    (base / "config.json").write_text(json.dumps(config))
    weights = load_file(str(base / "model.safetensors"))
    key = next(k for k in weights if "attention.self.query.weight" in k)
    weights[key] = weights[key] + 0.01
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ArtifactError, match="frozen base built now differs from the one checkpoint .* model.name changed"):
        run(resumed, resume=True)
    assert sorted(p.relative_to(part) for p in part.rglob("*")) == before


def test_resume_refuses_a_data_file_rewritten_since_the_run_started(make_recipe, tmp_path, sentiment_files):
    """A train file relabelled between a stop and --resume: the resumed run trained its first steps on one labelling and
    the rest on the other, silently (the recipe names the same path). The files' sha256 are in checkpoints/inputs.json."""
    train = tmp_path / "train.tsv"
    shutil.copy(sentiment_files["train"], train)
    recipe = make_recipe({"train.max_steps": 4, "train.save_every": 2, "data.train.path": train})
    run(recipe)
    inputs = json.loads((recipe.out / "checkpoints" / "inputs.json").read_text())
    assert set(inputs) == {"data.train", "data.eval"}
    part = tmp_path / "part"
    shutil.copytree(recipe.out / "checkpoints", part / "checkpoints", ignore=shutil.ignore_patterns("step-4"))
    lines = train.read_text().splitlines(keepends=True)
    train.write_text(lines[0] + "".join(line.replace("\t0", "\t2").replace("\t1", "\t0").replace("\t2", "\t1") for line in lines[1:]))
    before = sorted(p.relative_to(part) for p in part.rglob("*"))
    with pytest.raises(ArtifactError, match=r"data.train: changed since the run started \(.*a data file rewritten"):
        run(make_recipe({"train.max_steps": 4, "train.save_every": 2, "data.train.path": train, "output_dir": part}), resume=True)
    assert sorted(p.relative_to(part) for p in part.rglob("*")) == before  # its checkpoint is kept, nothing written


def test_a_run_stopped_early_resumes_to_its_stop_and_not_beyond(make_recipe, tmp_path):
    """train.early_stopping ended the run at step S and the last checkpoint is S's (a stop before the export): --resume
    trained on to the next stop (steps S+1..), exporting another adapter. It now trains no further."""
    ov = {"train.max_steps": 40, "train.eval_every": 2, "train.early_stopping": 1, "train.save_every": 40, "train.keep_best": False,
          "train.lr": 5e-2}
    full = run(make_recipe({**ov, "output_dir": tmp_path / "full"}))
    stop = full["steps"]
    assert full["stopped_early"] and stop < 40
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full" / "checkpoints" / f"step-{stop}", part / "checkpoints" / f"step-{stop}")  # the stop's own
    resumed = run(make_recipe({**ov, "output_dir": part}), resume=True)
    assert resumed["steps"] == stop and resumed["stopped_early"] and resumed["metrics"] == full["metrics"]
    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (tmp_path / "full", part))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_between_two_log_lines_keeps_the_windows_loss(make_recipe, tmp_path):
    """Checkpoint at step 6, log lines at 4 and 8: the resumed run's step-8 line is the mean loss of steps 5-8 (it was
    steps 7-8 alone), in log.jsonl and so in the trackers."""
    ov = {"train.max_steps": 12, "train.save_every": 6, "train.log_every": 4}
    assert_resume_is_uninterrupted(make_recipe, tmp_path, ov, step=6, steps=12)


@pytest.mark.parametrize("scheduler", ["constant", "linear"])
def test_a_resume_shortened_to_its_checkpoint_logs_that_steps_loss(make_recipe, tmp_path, monkeypatch, scheduler):
    """Stopped during step 5 of 8 (log lines at 2 and 4), resumed with train.max_steps=5: no step was left to run, so the
    step-5 line (the loss of steps 5-5, kept in the checkpoint) was never written. It is, before the resumed evaluation,
    at the rate step 5 ran at (the restored scheduler holds the next step's: 0.0 at the end of a linear decay)."""
    from peftlab.errors import TrainingInterrupted

    ov = {"train.max_steps": 8, "train.log_every": 2, "train.save_every": 3, "train.scheduler": scheduler, "train.precision": "fp32"}
    calls = []
    monkeypatch.setattr(sys.modules["peftlab.train"], "stop_requested", lambda flag, accelerator: calls.append(1) or len(calls) == 5)
    with pytest.raises(TrainingInterrupted, match="interrupted at step 5 of 8"):  # Ctrl-C during step 5: checkpoint step-5
        run(make_recipe({**ov, "output_dir": tmp_path / "part"}))
    monkeypatch.undo()
    run(make_recipe({**ov, "train.max_steps": 5, "output_dir": tmp_path / "part"}), resume=True)

    def lines(out: Path) -> list[tuple]:
        return [(r["step"], r["kind"], r.get("loss"), r.get("lr")) for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())]

    if scheduler == "linear":  # steps 1-5 ran on the 8-step schedule: 5e-3 x (1 - (step - 1) / 8)
        train_lines = [r for r in lines(tmp_path / "part") if r[1] == "train"]
        assert [r[0] for r in train_lines] == [2, 4, 5] and [r[3] for r in train_lines] == pytest.approx([4.375e-3, 3.125e-3, 2.5e-3])
        return
    run(make_recipe({**ov, "train.max_steps": 5, "output_dir": tmp_path / "fresh"}))  # a constant rate: as a fresh 5-step run's
    resumed, fresh = lines(tmp_path / "part"), lines(tmp_path / "fresh")
    assert [r[:2] for r in resumed] == [r[:2] for r in fresh] == [(2, "train"), (4, "train"), (5, "train"), (5, "eval"), (5, "final_eval")]
    assert [v for r in resumed for v in r[2:] if v is not None] == pytest.approx([v for r in fresh for v in r[2:] if v is not None], abs=1e-6)


def test_resumed_totals_count_the_steps_since_the_last_log_line(make_recipe, tmp_path):
    """A checkpoint between two log lines (step 8; logs at 16 and 32) carries the examples and tokens of steps 1-8: a
    resumed run's run.json totals are those of a run never stopped."""
    ov = {"train.epochs": 2, "train.save_every": 8, "train.keep_checkpoints": 4, "train.log_every": 16}
    full = run(make_recipe({**ov, "output_dir": tmp_path / "full"}))
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-8", part / "checkpoints" / "step-8")
    resumed = run(make_recipe({**ov, "output_dir": part}), resume=True)
    for key in ("train_examples", "train_tokens", "train_padded_tokens"):
        assert resumed[key] == full[key] > 0, key
    assert losses(part)[-1] == pytest.approx(losses(tmp_path / "full")[-1], abs=1e-6)  # steps 17-32 in both


def test_a_resumed_run_does_not_count_its_trackers_start_as_training(make_recipe, tmp_path, monkeypatch):
    """A resume starts its trackers inside the loop (wandb: seconds), after the throughput clock started: the first
    resumed log line, run.json's train_seconds and examples/s counted it as training."""
    import importlib

    ov = {"train.max_steps": 4, "train.save_every": 2, "train.log_every": 2}
    run(make_recipe({**ov, "output_dir": tmp_path / "full"}))
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-2", part / "checkpoints" / "step-2")
    module, real = importlib.import_module("peftlab.train"), importlib.import_module("peftlab.train").open_trackers

    def slow(*args, **kwargs):
        import time

        time.sleep(4.0)  # a tracker that takes its time to start
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "open_trackers", slow)
    resumed = run(make_recipe({**ov, "output_dir": part}), resume=True)
    step4 = next(r for r in map(json.loads, (part / "log.jsonl").read_text().splitlines()) if r["step"] == 4 and r["kind"] == "train")
    assert step4["train_s"] < resumed.train_seconds + 1e-6 < 4.0, (step4, resumed.train_seconds)


def test_resume_without_checkpoint_and_reused_output_dir_are_refused(make_recipe):
    recipe = make_recipe({"train.max_steps": 2})
    with pytest.raises(ArtifactError, match="no run in .* to continue: start it without --resume"):
        run(recipe, resume=True)
    run(recipe)
    weights = (recipe.out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(ArtifactError, match="already holds a finished run: replace it with --overwrite"):
        run(recipe)
    assert (recipe.out / "adapter_model.safetensors").read_bytes() == weights  # nothing lost
    run(recipe, overwrite=True)


def test_target_modules_that_match_nothing_list_candidates(make_recipe):
    recipe = make_recipe({"adapter.target_modules": "[q_proj]"})
    _, names = load_splits(recipe)
    with pytest.raises(ModelError) as e:
        build_model(recipe, num_labels=2, label_names=names)
    assert "matches no module" in str(e.value) and "query" in str(e.value) and "value" in str(e.value)


@pytest.mark.parametrize("options", [{"use_rslora": True}, {"use_dora": True}])
def test_rslora_and_dora_train(make_recipe, options, tmp_path):
    ov = {f"adapter.{k}": v for k, v in options.items()}
    s = run(make_recipe({**ov, "train.epochs": 1}))
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    for k, v in options.items():
        assert cfg[k] is v
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert any("lora_B" in k for k in saved)
    assert any("lora_magnitude_vector" in k for k in saved) == bool(options.get("use_dora"))  # DoRA's magnitudes are saved
    assert s["trainable_params"] == sum(v.numel() for v in saved.values())  # (the head is saved too: modules_to_save)


def test_llama_classification_with_default_targets(make_recipe, tiny_llama):
    s = run(make_recipe({"train.epochs": 1}, model=tiny_llama))
    cfg = json.loads((Path(s["output_dir"]) / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == {"q_proj", "v_proj"}
    confusion = json.loads((Path(s["output_dir"]) / "eval_report.json").read_text())["confusion"]
    assert sum(map(sum, confusion)) == 64  # every dev row scored once
    assert s["metrics"]["eval"]["accuracy"] == pytest.approx(sum(confusion[i][i] for i in range(2)) / 64)  # recomputed


@pytest.mark.precision
def test_activation_checkpointing_gives_the_same_losses(make_recipe, tmp_path):
    plain = run(make_recipe({"train.max_steps": 8, "output_dir": tmp_path / "plain"}))
    ckpt = run(make_recipe({"train.max_steps": 8, "train.gradient_checkpointing": True, "output_dir": tmp_path / "ckpt"}))
    assert losses(tmp_path / "ckpt") == pytest.approx(losses(tmp_path / "plain"), abs=1e-5)
    assert ckpt["metrics"]["eval"]["loss"] == pytest.approx(plain["metrics"]["eval"]["loss"], abs=1e-5)
    recipe = make_recipe({"train.gradient_checkpointing": True})
    model, _, _ = build_model(recipe, num_labels=2, label_names=["negative", "positive"])
    assert model.get_base_model().is_activation_checkpointing


@pytest.mark.parametrize("options", [{"train.optimizer_impl": "foreach"}, {"train.optimizer_impl": "loop"}, {"train.compile": True},
                                     {"train.release_memory": "always"}], ids=["foreach", "loop", "compile", "release-memory"])
def test_speed_options_give_the_same_losses(make_recipe, tmp_path, options):  # the default AdamW: fused (auto, on CPU)
    """The throughput switches change how, not what: the same losses and exported weights as the defaults."""
    plain = run(make_recipe({"train.max_steps": 6, "output_dir": tmp_path / "plain"}))
    fast = run(make_recipe({"train.max_steps": 6, **options, "output_dir": tmp_path / "fast"}))
    assert losses(tmp_path / "fast") == pytest.approx(losses(tmp_path / "plain"), abs=1e-4)
    assert fast["metrics"]["eval"]["accuracy"] == plain["metrics"]["eval"]["accuracy"]
    a, b = load_file(tmp_path / "plain" / "adapter_model.safetensors"), load_file(tmp_path / "fast" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-3)


def test_auto_optimizer_is_fused_where_torch_has_the_kernel(make_recipe):
    from peftlab.train import optimizer_for

    recipe = make_recipe({})
    assert recipe.train.optimizer_impl == "auto"
    model, _, _ = build_model(recipe, num_labels=2, label_names=["negative", "positive"])
    assert optimizer_for(model, recipe).defaults["fused"] is True  # CPU has a fused AdamW (torch >= 2.4)
    foreach = optimizer_for(model, make_recipe({"train.optimizer_impl": "foreach"})).defaults
    assert foreach["foreach"] is True and not foreach["fused"]


def test_auto_optimizer_falls_back_to_foreach_where_fused_is_refused(make_recipe, monkeypatch):
    """Where torch refuses fused=True (a device or dtype without the kernel), auto builds a foreach AdamW from clean
    parameter groups (the refused constructor has already filled its groups with fused=True)."""
    from peftlab.train import optimizer_for

    real = torch.optim.AdamW

    def refuse_fused(params, *args, fused=None, **kw):
        opt = real(params, *args, fused=fused, **kw)
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return opt

    monkeypatch.setattr(torch.optim, "AdamW", refuse_fused)
    recipe = make_recipe({})
    model, _, _ = build_model(recipe, num_labels=2, label_names=["negative", "positive"])
    opt = optimizer_for(model, recipe)
    assert all(g["foreach"] is True and not g["fused"] for g in opt.param_groups)
    loss = sum(p.sum() for p in model.parameters() if p.requires_grad)
    loss.backward()
    opt.step()  # a group left with fused=True would take the fused path here


def test_the_tied_weights_note_of_each_checkpoint_is_hidden_and_only_there(caplog):
    """accelerate says at every checkpoint of a tied-weights LLM that it saved one copy of lm_head: hidden while saving."""
    from accelerate import PartialState
    from accelerate.utils.other import clean_state_dict_for_safetensors

    from peftlab.train import tied_weights_note_hidden

    PartialState()
    tied = torch.zeros(2, 2)
    with caplog.at_level(logging.WARNING):
        with tied_weights_note_hidden():
            assert list(clean_state_dict_for_safetensors({"embed": tied, "lm_head": tied})) == ["embed"]
        assert "Removed shared tensor" not in caplog.text
        clean_state_dict_for_safetensors({"embed": tied, "lm_head": tied})
    assert "Removed shared tensor" in caplog.text  # the filter is gone once the checkpoint is saved


def test_the_logged_lr_is_the_steps_own(make_recipe, tmp_path):
    """It was the next step's (read after scheduler.step()): 0.0 at the last step of a linear decay."""
    run(make_recipe({"train.max_steps": 4, "train.log_every": 1, "train.lr": 1e-2, "train.scheduler": "linear",
                     "output_dir": tmp_path / "o"}))
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "o" / "log.jsonl").read_text().splitlines() if '"train"' in line]
    assert lrs == pytest.approx([1e-2, 7.5e-3, 5e-3, 2.5e-3])


def losses_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines() if '"kind": "train"' in line]


def test_early_stopping_stops_once_the_metric_stops_improving_and_exports_the_best(make_recipe, tmp_path):
    """train.early_stopping=N: N evaluations in a row without a better train.best_metric end the run; the best evaluation's
    weights are exported, run.json says so, and a recipe without evaluations during training is refused."""
    from peftlab.errors import ConfigError

    ov = {"train.max_steps": 40, "train.eval_every": 2, "train.lr": 0.5, "train.best_metric": "loss", "train.early_stopping": 2,
          "train.log_every": 5, "output_dir": tmp_path / "o"}  # lr 0.5: the eval loss soon gets worse, and stays so
    record = run(make_recipe(ov))
    history = record.history
    best = min(range(len(history)), key=lambda i: history[i]["loss"])
    assert record.stopped_early and record.steps < 40 and record.steps == history[-1]["step"] and record.steps % 5
    # the steps after the last log line are logged and counted (they were dropped: run.json said fewer examples)
    assert losses_steps(tmp_path / "o")[-1] == record.steps and record.train_examples == record.steps * 16
    assert len(history) - 1 - best == 2  # stopped at the second evaluation in a row without a better loss
    assert record.best_step == history[best]["step"] and record.selected_on == "eval"
    assert all(h["loss"] >= history[best]["loss"] for h in history[best + 1:])
    assert record.metrics["eval"]["loss"] == pytest.approx(history[best]["loss"], rel=1e-5)  # the best step's weights
    with pytest.raises(ConfigError, match="train.early_stopping=2 needs evaluations during training"):
        make_recipe({"train.early_stopping": 2})
    # no evaluation split: validate said ok and the run trained every step, the early stopping watching nothing
    with pytest.raises(ConfigError, match="train.early_stopping=2 needs an evaluation split to watch, and there is none"):
        make_recipe({"train.early_stopping": 2, "train.eval_every": 5, "data.eval": None, "data.eval_holdout": 0.0})


def test_early_stopping_without_keep_best_names_the_last_step_as_exported(make_recipe, tmp_path):
    """keep_best=false exports the last step's weights; run.json, the summary and the card named the best evaluation's
    step as the exported one ("step 2 of 6 chosen on it"). A run that never stopped early chose nothing on eval."""
    from peftlab.publish.card import card_text

    ov = {"train.max_steps": 40, "train.eval_every": 2, "train.lr": 0.5, "train.best_metric": "loss", "train.early_stopping": 2,
          "train.keep_best": False, "train.log_every": 5, "output_dir": tmp_path / "o"}
    record = run(make_recipe(ov))
    assert record.stopped_early and record.steps == record.history[-1]["step"] and record.best_step == record.steps
    assert record.metrics["eval"]["loss"] == pytest.approx(record.history[-1]["loss"], rel=1e-5)  # the last step's weights
    assert record.selected_on == "eval" and record.split_label("eval") == f"eval (selection split: early stopping on it ended training at step {record.steps})"
    card = card_text(tmp_path / "o")
    assert f"(exported: step {record.steps})" in card and f"Training stopped early at step {record.steps}" in card
    assert "best of" not in card
    full = run(make_recipe({**ov, "train.max_steps": 4, "train.lr": 1e-3, "output_dir": tmp_path / "short"}))  # never stopped
    assert not full.stopped_early and full.selected_on is None and full.best_step == 4


def test_a_classifier_writes_every_scored_row_with_its_prediction(make_recipe, sentiment_files):
    """predictions-SPLIT.jsonl for classification: each row of the file (a max_samples subset names its file rows), its
    text and label, the predicted label and its probability; the metrics are those of these lines, and `peftlab eval`
    writes the same."""
    import csv

    from peftlab import evaluate

    recipe = make_recipe({"train.max_steps": 4, "data.test.path": str(sentiment_files["dev"]), "data.test.max_samples": 20})
    record = run(recipe)
    with open(sentiment_files["dev"], encoding="utf-8") as f:
        file_rows = list(csv.DictReader(f, delimiter="\t"))
    for split, n in (("eval", 64), ("test", 20)):
        got = [json.loads(line) for line in (recipe.out / f"predictions-{split}.jsonl").read_text().splitlines()]
        assert len(got) == n and [g["row"] for g in got] == sorted({g["row"] for g in got})  # each once, in file order
        for g in got:
            assert g["text"] == file_rows[g["row"]]["sentence"]
            assert g["label"] == ["negative", "positive"][int(file_rows[g["row"]]["label"])]
            assert g["prediction"] in ("negative", "positive") and 0.5 <= g["probability"] <= 1.0
        accuracy = sum(g["label"] == g["prediction"] for g in got) / n
        assert record.metrics[split]["accuracy"] == pytest.approx(accuracy)
    before = (recipe.out / "predictions-test.jsonl").read_text()
    evaluate(recipe.out, "test", results_dir=recipe.out.parent / "again")
    assert (recipe.out.parent / "again" / "predictions-test.jsonl").read_text() == before


def test_a_test_split_read_from_the_selection_file_is_not_called_held_out(make_recipe, sentiment_files, caplog):
    """data.test naming data.eval's file (or train's) was reported 'test (held out)' beside the selection split, in the
    summary and the card, though selection had seen those rows."""
    from peftlab.publish import card_text

    with caplog.at_level(logging.WARNING, logger="peftlab"):
        record = run(make_recipe({"train.max_steps": 4, "train.eval_every": 2, "data.test.path": str(sentiment_files["dev"])}))
    assert "data.test is the file of data.eval" in caplog.text
    assert record.test_shares == "eval" and record.split_label("test") == "test (not held out: the file of data.eval)"
    card = card_text(record.output_dir, "alice/x")
    assert "test (not held out: the file of data.eval)" in card and "The held-out figure is test" not in card
    other = make_recipe({"train.max_steps": 1, "data.test.path": str(sentiment_files["train"]), "output_dir": Path(record.output_dir).parent / "b"})
    assert run(other).split_label("test") == "test (not held out: the file of data.train)"



def test_an_eval_split_read_from_the_train_file_is_warned_about(make_recipe, sentiment_files, caplog):
    """data.eval naming data.train's file: selection and its figures scored training rows without a word (data.test on
    it was warned about)."""
    from peftlab.run import preflight

    with caplog.at_level(logging.WARNING, logger="peftlab"):
        preflight(make_recipe({"data.eval.path": str(sentiment_files["train"])}))
    assert "data.eval is the file of data.train" in caplog.text and "data.eval_holdout=0.1" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="peftlab"):
        preflight(make_recipe())
    assert "data.eval is the file of data.train" not in caplog.text


def test_a_left_padding_tokenizer_predicts_the_same_at_any_eval_batch_size(make_recipe, tmp_path, tiny_gpt2_left):
    """A tokenizer saved with padding_side=left padded classification batches on the left: with absolute position
    embeddings (GPT-2) each row's positions moved with its batch's padding, and the metrics changed with eval.batch_size.
    Classification pads on the right; the tokenizer the run exports still pads left (generation relies on it)."""
    from transformers import AutoTokenizer

    runs = {bs: run(make_recipe({"eval.batch_size": bs, "output_dir": tmp_path / f"b{bs}", "adapter.method": "full",
                                 "train.max_steps": 4, "train.precision": "fp32"}, model=tiny_gpt2_left))
            for bs in (1, 8)}
    assert runs[1]["metrics"]["eval"] == pytest.approx(runs[8]["metrics"]["eval"], abs=1e-5)
    predicted = [[json.loads(line)["probability"] for line in (tmp_path / f"b{bs}" / "predictions-eval.jsonl").read_text().splitlines()]
                 for bs in (1, 8)]
    assert predicted[0] == pytest.approx(predicted[1], abs=1e-5)
    assert AutoTokenizer.from_pretrained(tmp_path / "b8").padding_side == "left"


def test_keep_best_never_keeps_a_nan_evaluation(caplog):
    """A first evaluation whose best metric is NaN (eval.metric_fn's, or a NaN loss) stayed the best: every later score
    compared False with it, and keep_best exported that step."""
    from types import SimpleNamespace

    from peftlab.train import KeepBest, TrainState

    model = torch.nn.Linear(2, 2)
    for metric, scores, best in (("mine", [math.nan, 2.0, 3.0], (3, 3.0)), ("loss", [math.nan, 2.0, 3.0], (2, 2.0))):
        keep, state = KeepBest(SimpleNamespace(best_metric=metric, keep_best=True)), TrainState()
        for step, score in enumerate(scores, 1):
            state.step = step
            with caplog.at_level("WARNING", logger="peftlab"):
                keep.consider(state, {metric: score}, model)
        assert (state.best_step, state.best_metric) == best
        assert f"step 1: {metric} is NaN" in caplog.text
    # a user's metric missing from a later evaluation (its function raised there: left out with a warning) stopped the
    # run with "not a metric of this task", losing what it had trained; at the first evaluation it is a wrong name
    keep, state = KeepBest(SimpleNamespace(best_metric="mine", keep_best=True)), TrainState()
    with pytest.raises(ConfigError, match="train.best_metric='mine' is not a metric of this task") as wrong:
        keep.consider(state, {"loss": 1.0}, model)
    assert "metric_fn" not in str(wrong.value)
    # with eval.metric_fn set, the error says its function may have failed there (it only said "not a metric")
    with pytest.raises(ConfigError, match=r"If eval.metric_fn=mymetrics:score returns it, that function failed at this first evaluation"):
        KeepBest(SimpleNamespace(best_metric="mine", keep_best=True), metric_fn="mymetrics:score").consider(TrainState(), {"loss": 1.0}, model)
    for step, metrics in enumerate(({"mine": 2.0}, {"loss": 1.0}, {"mine": 1.0}), 1):
        state.step = step
        with caplog.at_level("WARNING", logger="peftlab"):
            keep.consider(state, metrics, model)
    assert (state.best_step, state.best_metric) == (1, 2.0) and "step 2: mine is missing from this evaluation" in caplog.text
