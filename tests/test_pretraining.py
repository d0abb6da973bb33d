"""Continued pretraining on unlabelled text (task.type mlm / clm) and starting a recipe from a finished run
(model.from_run): packing, masking, the losses, a two-stage run that reloads and continues, its lineage."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from peftlab import load_recipe, merge, run
from peftlab.errors import ConfigError
from peftlab.tasks import corpus, get_task, lower_is_better, mlm

from .conftest import minilm_tokenizer

SENTENCES = ["the cat sat on the mat and looked at the door", "a kettle boils water for the morning tea",
             "this blender crushes ice in seconds", "the knife stayed sharp after a year of daily use"]


@pytest.fixture(scope="module")
def eos_llama(tmp_path_factory) -> Path:
    """A 2-layer random Llama with MiniLM's tokenizer, [SEP] as its end-of-sequence token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = minilm_tokenizer()
    tok.eos_token = "[SEP]"
    d = tmp_path_factory.mktemp("eos-llama")
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("unlabelled")
    rows = [{"text": SENTENCES[i % len(SENTENCES)], "id": i} for i in range(96)]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "eval.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES))
    return {"train": d / "train.jsonl", "eval": d / "eval.jsonl"}


def recipe_for(tmp_path, model, texts, task: str, overrides=(), name: str = "pre"):
    tree = {"name": name, "output_dir": str(tmp_path / name), "model": {"name": str(model)}, "task": {"type": task},
            "adapter": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
            "data": {"train": str(texts["train"]), "eval": str(texts["eval"]), "text_columns": ["text"], "max_length": 32},
            "train": {"max_steps": 30, "batch_size": 8, "lr": 3e-3, "log_every": 10, "warmup_fraction": 0.0, "precision": "fp32"},
            "eval": {"batch_size": 16}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return load_recipe(path, list(overrides))


# ------------------------------------------------------------------------------------------------ packing

@pytest.mark.parametrize("causal", [True, False], ids=["clm", "mlm"])
def test_blocks_hold_every_token_once_in_order_and_never_exceed_max_length(tmp_path, eos_llama, texts, causal):
    from datasets import Dataset

    tok = minilm_tokenizer()
    tok.eos_token = "[SEP]"
    recipe = recipe_for(tmp_path, eos_llama, texts, "clm" if causal else "mlm", ["data.max_length=24"])
    docs = [SENTENCES[i % 4] + " " + "word " * (i % 7) for i in range(20)] + ["a much longer document " * 6]
    out = corpus.blocks(Dataset.from_dict({"text": docs}), tok, recipe, causal=causal)
    assert max(out["length"]) <= 24 and all(n == 24 for n in out["length"][:-1])  # only the last block is short
    stream = [t for ids in out["input_ids"] for t in (ids if causal else ids[1:-1] + [tok.sep_token_id])]
    own = [tok(d)["input_ids"] for d in docs]  # causal: the tokenizer's own specials (BOS where it adds one), EOS after each
    expected = [t for ids in own for t in (ids if ids[-1] == tok.eos_token_id else ids + [tok.eos_token_id])] if causal else \
        [t for d in docs for t in tok(d, add_special_tokens=False)["input_ids"] + [tok.sep_token_id]]
    if causal:
        assert stream == expected
        for ids, labels, pos in zip(out["input_ids"], out["labels"], out["position_ids"]):
            starts = [i for i, p in enumerate(pos) if p == 0]
            assert starts[0] == 0 and all(ids[s - 1] == tok.eos_token_id for s in starts[1:])  # a document starts after EOS
            assert all(labels[i] == -100 for i in starts[1:]) and all(labels[i] == ids[i] for i in range(len(ids)) if i not in starts)
    else:  # [CLS] + stream + [SEP], documents separated by [SEP]; the closing [SEP] is a separator when one ends there
        assert all(ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id for ids in out["input_ids"])
        assert [t for t in stream if t != tok.sep_token_id] == [t for t in expected if t != tok.sep_token_id]


def test_unlabelled_tasks_refuse_label_settings_and_an_mlm_needs_a_mask_token(tmp_path, eos_llama, texts):
    from types import SimpleNamespace

    from datasets import Dataset

    from peftlab.errors import DataError

    with pytest.raises(ConfigError, match="learns from unlabelled text.*data.label_names"):
        recipe_for(tmp_path, eos_llama, texts, "clm", ["data.label_names=[a,b]"])
    recipe = recipe_for(tmp_path, eos_llama, texts, "mlm")
    no_mask = SimpleNamespace(cls_token_id=None, sep_token_id=None, mask_token_id=None, eos_token_id=None)
    with pytest.raises(DataError, match="task.type=mlm needs a tokenizer with .*MASK.*task.type=clm"):
        corpus.blocks(Dataset.from_dict({"text": ["a b c"]}), no_mask, recipe, causal=False)
    with pytest.raises(DataError, match="no end-of-sequence token"):
        corpus.blocks(Dataset.from_dict({"text": ["a b c"]}), no_mask, recipe, causal=True)
    with pytest.raises(DataError, match="every row of the split is empty"):
        corpus.blocks(Dataset.from_dict({"text": ["  ", ""]}), no_mask, recipe, causal=True)
    assert lower_is_better("perplexity") and lower_is_better("loss") and not lower_is_better("accuracy")


# ------------------------------------------------------------------------------------------------ masking and losses

def test_mlm_masks_bert_style_fixed_for_evaluation_fresh_for_training():
    tok = minilm_tokenizer()
    collate = mlm.collator(tok)
    ids = [tok.cls_token_id, *tok(" ".join(SENTENCES * 6), add_special_tokens=False)["input_ids"][:200], tok.sep_token_id]
    rows = [{"input_ids": ids}, {"input_ids": ids[:50] + [tok.sep_token_id]}]
    a, b = collate(rows), collate(rows[::-1])
    assert torch.equal(a["eval_labels"][0], b["eval_labels"][1][:a["eval_labels"].shape[1]])  # the same row, the same mask
    assert torch.equal(a["eval_input_ids"][0], b["eval_input_ids"][1][:a["eval_input_ids"].shape[1]])
    n = a["labels"].shape[1]
    assert torch.equal(a["labels"][0], b["labels"][1][:n])  # in an epoch, a block's training mask is its own, wherever it sits
    assert not torch.equal(a["labels"][0], a["eval_labels"][0])  # not evaluation's
    collate.set_epoch(0, 1)
    assert not torch.equal(collate(rows)["labels"][0], a["labels"][0])  # each epoch draws new ones
    picked = a["eval_labels"][0][:len(ids)] != -100
    assert 0.08 < picked.float().mean() < 0.25  # ~15% of the tokens predicted
    assert not picked[0] and not picked[len(ids) - 1]  # never [CLS] / [SEP]
    assert torch.equal(a["eval_labels"][0][:len(ids)][picked], torch.tensor(ids)[picked])  # labels: the original tokens
    replaced = a["eval_input_ids"][0][:len(ids)][picked]
    assert (replaced == tok.mask_token_id).float().mean() > 0.6  # mostly [MASK]


def test_mlm_loss_on_masked_positions_only_equals_the_models_own(tmp_path, tiny_bert, texts):
    from peftlab.accel import make_accelerator
    from peftlab.data import build_data
    from peftlab.model import build_model

    recipe = recipe_for(tmp_path, tiny_bert, texts, "mlm")
    model, tok, info = build_model(recipe, num_labels=0, label_names=[])
    assert info.head_modules == ["cls.predictions.transform"]  # the new head, not the tied embedding matrix
    data = build_data(recipe, tok)
    batch = data.collate([data.train[i] for i in range(4)])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    ours = mlm.loss(model, batch, make_accelerator(recipe, "fp32"))  # (a fresh state: fp32, whatever ran before)
    torch.testing.assert_close(ours, model(**inputs).loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("task", ["clm", "mlm"])
def test_continued_pretraining_lowers_the_held_out_loss_on_repeated_text(tmp_path, tiny_bert, eos_llama, texts, task):
    """The eval split is the same sentences as train: a model that learns its text must lower its loss on it. Full
    training on the tiny random models, whose frozen LM head / tied decoder caps what LoRA can do (see test_verbalizer);
    LoRA on the real MiniLM below."""
    model = eos_llama if task == "clm" else tiny_bert
    before = run(recipe_for(tmp_path, model, texts, task, ["train.max_steps=0"], name=f"{task}0"))
    after = run(recipe_for(tmp_path, model, texts, task, ["adapter.method=full", "train.lr=1e-2", "train.max_steps=20"],
                           name=f"{task}1"))
    b, a = before.metrics["eval"], after.metrics["eval"]
    assert a["loss"] < 0.7 * b["loss"] and a["perplexity"] < b["perplexity"]
    assert a["perplexity"] == pytest.approx(math.exp(a["loss"]), rel=1e-6)
    assert corpus.perplexity(18.19) == pytest.approx(7.9e7, rel=0.01)  # not capped at 1e6, as it was
    assert corpus.perplexity(1e4) == math.exp(700) and math.isfinite(corpus.perplexity(float("inf")))
    assert get_task(task).summary_line("eval", a).strip().startswith("eval  loss")


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "prefix_tuning"])
def test_a_prompt_method_on_mlm_trains_and_saves_the_new_head(tmp_path, tiny_bert, texts, method):
    """The new MLM head was neither trained nor saved under a prompt method (modules_to_save was set for layer methods
    only): each reload drew another random head (eval loss 10.36, then 10.30, against the run's 10.33)."""
    from peftlab import evaluate

    summary = run(recipe_for(tmp_path, tiny_bert, texts, "mlm", [f"adapter.method={method}", "adapter.num_virtual_tokens=4",
                                                                  "train.max_steps=3"]))
    saved = load_file(str(Path(summary.output_dir) / "adapter_model.safetensors"))
    assert any("cls.predictions.transform" in k for k in saved), sorted(saved)
    for _ in range(2):  # the same score each time, the run's own
        again = evaluate(summary.output_dir, "eval", results_dir=tmp_path / f"again-{_}")
        assert again["loss"] == pytest.approx(summary.metrics["eval"]["loss"], rel=1e-5)


def test_lora_mlm_on_minilm_learns_its_new_head_and_lowers_the_loss(tmp_path, texts):
    """The packaged MiniLM has no MLM head: it is made (and named), trained with the LoRA adapter, and the loss falls."""
    zero = run(recipe_for(tmp_path, "minilm", texts, "mlm", ["train.max_steps=0"], name="m0"))
    trained = run(recipe_for(tmp_path, "minilm", texts, "mlm", ["train.max_steps=20", "train.lr=5e-3"], name="m1"))
    assert trained.metrics["eval"]["loss"] < 0.7 * zero.metrics["eval"]["loss"]
    saved = load_file(str(Path(trained.output_dir) / "adapter_model.safetensors"))
    assert any("cls.predictions.transform" in k for k in saved) and not any("word_embeddings" in k for k in saved)


# ------------------------------------------------------------------------------------------------ model.from_run

def test_a_task_recipe_starts_from_a_pretraining_run_reloads_and_records_its_lineage(tmp_path, eos_llama, texts, sentiment_files,
                                                                                     caplog):
    """Stage 1: clm LoRA on the unlabelled text. Stage 2: a classifier with model.from_run. Stage 2's base is stage 1's
    merged model (its weights, not the bare base's); run.json and the card name stage 1; eval and merge reload it."""
    from peftlab import evaluate, load_trained
    from peftlab.publish.card import card_text

    first = run(recipe_for(tmp_path, eos_llama, texts, "clm", ["train.max_steps=10", "adapter.target_modules=all-linear",
                                                               "data.train.max_samples=90"], name="dapt"))
    stage1 = Path(first.output_dir)
    tree = {"name": "task", "output_dir": str(tmp_path / "task"), "model": {"from_run": str(stage1)},
            "adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "data": {"train": str(sentiment_files["train"]), "eval": str(sentiment_files["dev"]),
                     "label_names": ["negative", "positive"], "max_length": 32},
            "train": {"max_steps": 4, "batch_size": 16, "lr": 5e-3, "precision": "fp32"}}
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(tree))
    second = run(load_recipe(path))
    out = Path(second.output_dir)

    merged = load_file(str(stage1 / "merged" / "model.safetensors"))
    assert second.base_path == str(stage1 / "merged") and second.base_model == str(eos_llama)  # model.name from the run
    bare = load_file(str(eos_llama / "model.safetensors"))
    key = next(k for k in merged if "q_proj.weight" in k)
    assert not torch.equal(merged[key], bare[key])  # stage 1 changed the weights stage 2 starts from
    model, *_ = load_trained(out)
    inner = dict(model.named_parameters())
    loaded = next(v for k, v in inner.items() if k.replace(".base_layer", "").endswith(key.split("model.", 1)[1]))
    torch.testing.assert_close(loaded.detach(), merged[key])  # reloaded on stage 1's weights

    record = json.loads((out / "run.json").read_text())
    assert [s["name"] for s in record["lineage"]] == ["dapt"] and record["lineage"][0]["task"] == "clm"
    assert record["lineage"][0]["data"] == f"{texts['train']} (at most 90 rows, a seeded sample: seed 42)"  # what it read
    assert record["lineage"][0]["steps"] == 10
    assert "## Lineage" in card_text(out) and "`dapt`: task clm" in card_text(out)
    assert evaluate(out)["accuracy"] == pytest.approx(second.metrics["eval"]["accuracy"])
    assert (merge(out) / "model.safetensors").is_file()
    from peftlab.publish import publish

    with caplog.at_level("WARNING", logger="peftlab.publish"):
        publish(out, to=tmp_path / "pub")  # its adapter needs stage 1's merged model: said at publish time
    assert "trained on the merged model of dapt (model.from_run), not on the bare base" in caplog.text

    # a third stage chains the lineage, nearest first
    tree.update(name="third", output_dir=str(tmp_path / "third"), model={"from_run": str(out)})
    path.write_text(yaml.safe_dump(tree))
    third = run(load_recipe(path))
    assert [s["name"] for s in third.lineage] == ["task", "dapt"]

    # stage 1's merged weights altered: refused on the model.from_run path too, with the fix
    weights = stage1 / "merged" / "model.safetensors"
    good = weights.read_bytes()
    altered = load_file(str(weights))
    altered[key] = altered[key] * 1.5
    save_file(altered, str(weights), metadata={"format": "pt"})
    from peftlab.errors import ArtifactError

    with pytest.raises(ArtifactError, match=r"model.from_run=.*is damaged.*peftlab merge .* --force"):
        evaluate(out)
    weights.write_bytes(good)

    # stage 1 trained again: stage 2's adapter no longer fits the weights there, and says so rather than scoring on them
    run(recipe_for(tmp_path, eos_llama, texts, "clm", ["train.max_steps=3", "adapter.target_modules=all-linear"], name="dapt"),
        overwrite=True)
    with pytest.raises(ArtifactError, match="holds other weights than the ones .* trained on.*trained again since"):
        evaluate(out)


def test_from_run_refuses_a_missing_run_and_a_different_base(tmp_path, eos_llama, tiny_bert, texts):
    with pytest.raises(ConfigError, match="model.from_run=.*no finished run there.*Train it first"):
        recipe_for(tmp_path, eos_llama, texts, "clm", [f"model.from_run={tmp_path / 'nothing'}"])
    first = run(recipe_for(tmp_path, eos_llama, texts, "clm", ["train.max_steps=1"], name="one"))
    with pytest.raises(ConfigError, match="was trained on .* but model.name=.*Set model.name="):  # validate says it too
        recipe_for(tmp_path, tiny_bert, texts, "mlm", [f"model.from_run={first.output_dir}"], name="two")
    other = recipe_for(tmp_path, tiny_bert, texts, "mlm", name="two")
    other.model.from_run = first.output_dir  # past the recipe's checks: training refuses it before writing anything
    with pytest.raises(ConfigError, match="was trained on .* but model.name=.*Set model.name="):
        run(other)
    assert not Path(tmp_path / "two").exists()  # refused before anything was written
    # model.name given as the default's own `minilm` is a choice too (it was taken for "left out", and swapped silently)
    with pytest.raises(ConfigError, match="was trained on .* but model.name='minilm'"):
        recipe_for(tmp_path, "minilm", texts, "clm", [f"model.from_run={first.output_dir}"], name="three")
    path = tmp_path / "three.yaml"  # left out: the run's base, in the recipe as loaded (and so in the new run's recipe.yaml)
    tree = yaml.safe_load(path.read_text())
    del tree["model"]
    path.write_text(yaml.safe_dump(tree))
    assert load_recipe(path, [f"model.from_run={first.output_dir}"]).model.name == str(eos_llama)
    record_path = Path(first.output_dir) / "run.json"  # an older run.json without base_model: its recipe.yaml names the base
    record = json.loads(record_path.read_text())
    del record["base_model"]
    record_path.write_text(json.dumps(record))
    assert load_recipe(path, [f"model.from_run={first.output_dir}"]).model.name == str(eos_llama)
    with pytest.raises(ConfigError, match="was trained on .* but model.name='minilm'"):
        recipe_for(tmp_path, "minilm", texts, "clm", [f"model.from_run={first.output_dir}"], name="three")
    # a prompt method's run has nothing to merge into its base: validate said ok, train failed with merge's own message
    record["method"] = "p_tuning"
    record_path.write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=r"model.from_run=.* holds a p_tuning adapter: a run starts from .*merged into them, "
                                          r"and it adds virtual tokens"):
        load_recipe(path, [f"model.from_run={first.output_dir}"])


def test_from_run_checks_come_first_and_the_layers_of_its_merged_model_before_training(tmp_path, eos_llama, texts):
    """A tracker that is not installed is refused before the earlier run is merged (minutes on a real LLM); too many
    model.num_layers for that run's model, once it is merged; neither writes the new run's folder."""
    first = run(recipe_for(tmp_path, eos_llama, texts, "clm", ["train.max_steps=1"], name="one"))
    start = Path(first.output_dir)
    with pytest.raises(ConfigError, match="report_to"):
        run(recipe_for(tmp_path, eos_llama, texts, "clm", [f"model.from_run={start}", "train.report_to=[comet_ml]"], name="two"))
    assert not (start / "merged").exists() and not (tmp_path / "two").exists()
    with pytest.raises(ConfigError, match="model.num_layers=9: .* has 2 layers"):
        run(recipe_for(tmp_path, eos_llama, texts, "clm", [f"model.from_run={start}", "model.num_layers=9"], name="two"))
    assert (start / "merged").is_dir() and not (tmp_path / "two").exists()


def test_a_classifier_from_an_mlm_run_keeps_the_original_pooler_and_trains_only_its_new_head(tmp_path, tiny_bert, texts,
                                                                                            sentiment_files):
    """A masked-LM model has no pooler, so the merged MLM run lacks one: the classifier built on it takes the original
    base's pooler (as a classifier on the bare base would), and only the classifier is new."""
    from transformers import AutoModelForSequenceClassification

    from peftlab.accel import make_accelerator
    from peftlab.model import build_model
    from peftlab.run import start_from_run

    first = run(recipe_for(tmp_path, tiny_bert, texts, "mlm", ["train.max_steps=3"], name="mlm-stage"))
    tree = {"name": "cls", "output_dir": str(tmp_path / "cls"), "model": {"from_run": first.output_dir},
            "data": {"train": str(sentiment_files["train"]), "label_names": ["negative", "positive"], "max_length": 32},
            "train": {"max_steps": 2, "precision": "fp32"}}
    path = tmp_path / "cls.yaml"
    path.write_text(yaml.safe_dump(tree))
    recipe = load_recipe(path)
    start_from_run(recipe, make_accelerator(recipe, "fp32"))
    model, _, info = build_model(recipe, num_labels=2, label_names=["negative", "positive"])
    assert info.head_modules == ["classifier"]
    original = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2)
    ours = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in model.named_parameters()}
    torch.testing.assert_close(ours["bert.pooler.dense.weight"], original.bert.pooler.dense.weight)


def test_an_mlm_runs_merged_model_keeps_the_pooler_so_its_classifier_reloads_without_from_run(tmp_path, tiny_bert, texts,
                                                                                              sentiment_files):
    """The merged MLM model had no pooler: a classifier trained from it (model.from_run, which fills the pooler from the
    original base) reloaded on that merged folder with model.from_run=null, as the moved-run message says, or with
    transformers + peft as the card says, got a random pooler (other logits on each load). The merged folder keeps the
    original base's pooler now: both routes give load_trained's logits."""
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification

    from peftlab.export import load_trained
    from peftlab.rundir import read_run

    first = run(recipe_for(tmp_path, tiny_bert, texts, "mlm", ["train.max_steps=3"], name="mlm-stage"))
    merged = merge(first.output_dir)
    with safe_open(str(merged / "model.safetensors"), "pt") as f:
        original = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2)
        torch.testing.assert_close(f.get_tensor("bert.pooler.dense.weight"), original.bert.pooler.dense.weight)
    out, batch = classifier_trained_from(tmp_path, first.output_dir, sentiment_files)
    with torch.no_grad():
        want = load_trained(out)[0](**batch).logits
        saved, _ = read_run(out)
        moved = load_recipe(Path(out) / "recipe.yaml", ["model.from_run=null", f"model.name={merged}"], validate_files=False)
        for _ in range(2):  # (a random pooler differed from load to load)
            torch.testing.assert_close(load_trained(out, recipe=moved)[0](**batch).logits, want)
        base = AutoModelForSequenceClassification.from_pretrained(str(merged), num_labels=2)
        torch.testing.assert_close(PeftModel.from_pretrained(base, out).eval()(**batch).logits, want)


def classifier_trained_from(tmp_path, run_dir, sentiment_files):
    """(output folder, a tokenized batch) of a 2-step fp32 classifier trained with model.from_run=run_dir."""
    tree = {"name": "cls", "output_dir": str(tmp_path / "cls"), "model": {"from_run": str(run_dir)},
            "data": {"train": str(sentiment_files["train"]), "label_names": ["negative", "positive"], "max_length": 32},
            "train": {"max_steps": 2, "precision": "fp32"}}
    (tmp_path / "cls.yaml").write_text(yaml.safe_dump(tree))
    out = run(load_recipe(tmp_path / "cls.yaml")).output_dir
    return out, minilm_tokenizer()(["a kettle boils water", "this blender crushes ice"], return_tensors="pt", padding=True)


@pytest.mark.parametrize("method", ["full", "frozen"])
def test_a_full_mlm_run_keeps_the_pooler_so_its_classifier_reloads_on_it_with_plain_peft(tmp_path, tiny_bert, texts,
                                                                                       sentiment_files, method):
    """A full (or frozen) MLM run exports a standalone masked-LM model, which has no pooler: a classifier trained from it
    (model.from_run, which fills the pooler from the original base) loaded on that folder with transformers + peft, as
    the card's Lineage section says, got a random pooler (other logits on each load). The folder keeps the original
    base's pooler, as a merged one does: both give load_trained's logits."""
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification

    from peftlab.export import load_trained

    first = run(recipe_for(tmp_path, tiny_bert, texts, "mlm", ["train.max_steps=2", f"adapter.method={method}"], name="mlm-full"))
    original = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2)
    with safe_open(str(Path(first.output_dir) / "model.safetensors"), "pt") as f:
        torch.testing.assert_close(f.get_tensor("bert.pooler.dense.weight"), original.bert.pooler.dense.weight)
    out, batch = classifier_trained_from(tmp_path, first.output_dir, sentiment_files)
    with torch.no_grad():
        want = load_trained(out)[0](**batch).logits
        base = AutoModelForSequenceClassification.from_pretrained(first.output_dir, num_labels=2)
        torch.testing.assert_close(PeftModel.from_pretrained(base, out).eval()(**batch).logits, want)


def classifier_from(tmp_path, run_dir, sentiment_files, overrides=(), labels=("negative", "positive")):
    """(model, info, recipe) of a classifier built on model.from_run=run_dir, as training builds it."""
    from peftlab.accel import make_accelerator
    from peftlab.model import build_model
    from peftlab.run import start_from_run

    tree = {"name": "cls2", "output_dir": str(tmp_path / "cls2"), "model": {"from_run": str(run_dir)},
            "data": {"train": str(sentiment_files["train"]), "label_names": list(labels), "max_length": 32},
            "train": {"max_steps": 2, "precision": "fp32"}}
    path = tmp_path / "cls2.yaml"
    path.write_text(yaml.safe_dump(tree))
    recipe = load_recipe(path, list(overrides))
    start_from_run(recipe, make_accelerator(recipe, "fp32"))
    model, _, info = build_model(recipe, num_labels=len(labels), label_names=list(labels))
    return model, info, recipe


def test_a_classifier_from_a_classifier_run_starts_with_a_fresh_head(tmp_path, tiny_bert, sentiment_files):
    """Same number of labels (here in the other order): the earlier run's trained head used to be kept, its class
    meanings with it. As the README says, only the new task head starts fresh: re-initialised, and trained."""
    first = run(load_recipe(None, [f"model.name={tiny_bert}", f"data.train.path={sentiment_files['train']}", "data.eval=null",
                                   "data.label_names=[negative,positive]", "train.max_steps=3", "train.lr=5e-2",
                                   "train.precision=fp32", f"output_dir={tmp_path / 'cls'}"]))
    from safetensors.torch import load_file

    merge(first.output_dir)
    earlier = load_file(str(Path(first.output_dir) / "merged" / "model.safetensors"))["classifier.weight"]
    model, info, _ = classifier_from(tmp_path, first.output_dir, sentiment_files, labels=("positive", "negative"))
    head = dict(model.named_parameters())
    fresh = next(v for k, v in head.items() if k.endswith("classifier.modules_to_save.default.weight"))
    assert info.head_modules == ["classifier"] and fresh.requires_grad
    assert (fresh - earlier).abs().max() > 1e-3  # not the earlier run's head
    assert 0.005 < fresh.std().item() < 0.05  # drawn as transformers draws a new head: N(0, initializer_range=0.02)


def test_the_building_blocks_export_of_a_from_run_recipe_records_its_lineage(tmp_path, tiny_bert, sentiment_files):
    """export(...) of a model.from_run recipe trained through the building blocks recorded no lineage (run() does): the
    card had no Lineage section, and an evaluation scored the adapter on a source run trained again since."""
    from peftlab import build_data, build_model, evaluate, export, load_splits, train
    from peftlab.accel import make_accelerator
    from peftlab.errors import ArtifactError
    from peftlab.publish.card import card_text
    from peftlab.run import start_from_run

    first = [f"model.name={tiny_bert}", f"data.train.path={sentiment_files['train']}", "data.eval=null", "train.max_steps=2",
             "data.label_names=[negative,positive]", "train.precision=fp32", f"output_dir={tmp_path / 'cls'}"]
    source = run(load_recipe(None, first)).output_dir
    merge(source)
    _, _, recipe = classifier_from(tmp_path, source, sentiment_files, [f"data.eval.path={sentiment_files['dev']}"])
    want = start_from_run(recipe, make_accelerator(recipe, "fp32"))  # the lineage run() records
    splits, names = load_splits(recipe)
    model, tok, _ = build_model(recipe, num_labels=len(names), label_names=names)
    model, state = train(recipe, model, build_data(recipe, tok, splits=splits, label_names=names), make_accelerator(recipe, "fp32"),
                         tmp_path / "work")
    record = export(tmp_path / "blocks", model, tok, recipe, {"steps": state.step}, {})
    assert record.lineage == want and len(want) == 1 and want[0]["run"] == str(Path(source).resolve()) and want[0]["weights_sha256"]
    assert json.loads((tmp_path / "blocks" / "run.json").read_text())["lineage"] == want
    assert "## Lineage" in card_text(tmp_path / "blocks")
    evaluate(tmp_path / "blocks")
    run(load_recipe(None, [*first, "train.lr=1e-2"]), overwrite=True)  # the source trained again
    with pytest.raises(ArtifactError, match="holds other weights than the ones .* trained on.*trained again since"):
        evaluate(tmp_path / "blocks")


def test_distilberts_pre_classifier_is_part_of_the_fresh_head(tmp_path, sentiment_files):
    """DistilBERT's head is pre_classifier + classifier: from a classifier run, both start fresh and both train (the
    pre_classifier was the earlier run's, frozen)."""
    from safetensors.torch import load_file
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    tok = minilm_tokenizer()
    base = tmp_path / "tiny-distilbert"
    DistilBertForSequenceClassification(DistilBertConfig(vocab_size=tok.vocab_size, dim=32, hidden_dim=64, n_layers=2, n_heads=2,
                                                         max_position_embeddings=512)).save_pretrained(base)
    tok.save_pretrained(base)
    first = run(load_recipe(None, [f"model.name={base}", f"data.train.path={sentiment_files['train']}", "data.eval=null",
                                   "data.label_names=[negative,positive]", "train.max_steps=3", "train.lr=5e-2",
                                   "train.precision=fp32", f"output_dir={tmp_path / 'cls'}", "adapter.target_modules=[q_lin,v_lin]"]))
    merge(first.output_dir)
    earlier = load_file(str(Path(first.output_dir) / "merged" / "model.safetensors"))["pre_classifier.weight"]
    model, info, _ = classifier_from(tmp_path, first.output_dir, sentiment_files, ["adapter.target_modules=[q_lin,v_lin]"])
    assert info.head_modules == ["classifier", "pre_classifier"]
    fresh = next(v for k, v in model.named_parameters() if k.endswith("pre_classifier.modules_to_save.default.weight"))
    assert fresh.requires_grad and (fresh - earlier).abs().max() > 1e-3


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_qlora_classifier_from_an_mlm_run_takes_the_pooler_from_the_original_base_unquantized(tmp_path, tiny_bert, texts,
                                                                                               sentiment_files):
    """Under a 4-bit base the pooler an MLM run lacks was left random, quantized, and trained as a head: bitsandbytes
    failed on the first forward. It is the original base's (an MLM run's merged model keeps it; a merge that lacks it:
    kept out of quantization and filled from the original base), as without quant."""
    import bitsandbytes as bnb
    from transformers import AutoModelForSequenceClassification

    first = run(recipe_for(tmp_path, tiny_bert, texts, "mlm", ["train.max_steps=2"], name="mlm-stage"))
    original = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2).bert.pooler.dense.weight
    merged = merge(first.output_dir)
    for held in (True, False):
        if not held:  # a merge written without the pooler
            weights = {k: v for k, v in load_file(merged / "model.safetensors").items() if ".pooler." not in k}
            save_file(weights, merged / "model.safetensors", metadata={"format": "pt"})
            (merged / "run.json").write_text(json.dumps({**json.loads((merged / "run.json").read_text()), "weights_sha256": None}))
        model, info, _ = classifier_from(tmp_path, first.output_dir, sentiment_files, ["quant.mode=4bit"])
        assert info.head_modules == ["classifier"]
        pooler = model.get_base_model().bert.pooler.dense.weight
        if held:  # quantized, as on the bare base
            pooler = bnb.functional.dequantize_4bit(pooler.data, pooler.quant_state)
            assert torch.corrcoef(torch.stack([pooler.flatten().float(), original.flatten()]))[0, 1] > 0.95  # (random: ~0)
        else:
            torch.testing.assert_close(pooler, original)
    batch = {"input_ids": torch.tensor([[101, 2023, 102]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    assert torch.isfinite(model(**batch).logits).all()


def test_domain_adaptation_report_pairs_seeds_and_measures_the_shift_without_accuracies(tmp_path, monkeypatch):
    """benchmarks/domain_adaptation.py --report on stored results: a gain pairs (b) with (a) of the same seed, a share
    of the in-domain gap is given only for gaps of a point or more, the shift is the domains' vocabulary overlap, and
    the cost table takes medians over the stored runs."""
    from .conftest import load_benchmark

    da = load_benchmark("domain_adaptation")
    data, out = tmp_path / "amazon", tmp_path / "results" / "domain_adaptation"
    words = {"books": "novel author chapter plot", "dvd": "novel plot actor scene", "electronics": "battery cable screen",
             "kitchen": "blender knife pan"}
    for domain, text in words.items():
        for part, n in (("unlabelled", 3), ("labelled", 10)):
            (data / part).mkdir(parents=True, exist_ok=True)
            (data / part / f"{domain}.jsonl").write_text("".join(json.dumps({"text": text, "label": i % 2}) + "\n" for i in range(n)))
    out.mkdir(parents=True)
    monkeypatch.setattr(da, "DATA", data)
    monkeypatch.setattr(da, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(da, "OUT", out)
    da.top_words.cache_clear()

    def result(name, accuracy, wall=60.0):
        run = {"metrics": {"test": {"accuracy": accuracy}}, "steps": 10, "train_wall_s": wall}
        (out / f"{name}.json").write_text(json.dumps({"name": name, "run": run, "process_wall_s": wall + 6}))

    # books -> dvd: (a) at seeds 0, 1; (b) at seeds 0, 1, 2 (seed 2 has no (a) to pair with); (c) at seed 0
    for seed, (a, b) in enumerate([(0.80, 0.82), (0.84, 0.85), (None, 0.99)]):
        if a is not None:
            result(f"source-books-dvd-s{seed}", a)
        result(f"dapt-books-dvd-s{seed}", b)
    result("tapt-books-dvd-s0", 0.79)
    for fold, acc in enumerate([0.9, 0.86]):  # in-domain: 2 folds of 5 rows each -> 0.88
        result(f"indomain-dvd-fold{fold}of2-s0", acc)
    # kitchen -> electronics: a gap under a point gets no share
    result("source-kitchen-electronics-s0", 0.900)
    result("dapt-kitchen-electronics-s0", 0.895)
    for fold in range(2):
        result(f"indomain-electronics-fold{fold}of2-s0", 0.905)
    result("source-dvd-books-s0", 0.85)  # no in-domain books: no gap
    result("dapt-dvd-books-s0", 0.86)
    result("electronics-kitchen-s0", 0.5)  # not a condition's run: left out of every row
    result("mlm-dvd-s0", 0.0, wall=240.0)
    result("mlm-books+dvd-s0", 0.0, wall=300.0)

    results = da.pair_results([0, 1, 2], 2)
    text = da.report(results)
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in text.splitlines()[2:] if " -> " in line}
    assert set(rows) == {"books -> dvd", "dvd -> books", "kitchen -> electronics"}
    bd = rows["books -> dvd"]
    assert bd[1] == "82.00 ± 2.8" and bd[2].startswith("88.67")  # (b)'s mean counts its unpaired seed ...
    assert bd[5:8] == ["+1.50", "-1.00", "6.00"]  # ... but its gain pairs seeds 0 and 1 only; gap 88 - 82
    assert bd[8:10] == ["25%", "-17%"] and bd[10] == "50%" and bd[11].strip(" |") == "2 / 3 / 1"  # 2 of 4 words shared
    ke = rows["kitchen -> electronics"]
    assert ke[5] == "-0.50" and ke[7] == "0.50" and ke[8] == "-" and ke[10] == "0%"
    assert rows["dvd -> books"][7:9] == ["-", "-"]
    assert "mean +0.67 (s.e. 0.60) points over 3 pair(s)" in text and "2 of 3 pair means and 3 of 4 paired seeds" in text
    assert "median share of the in-domain gap closed: 25% over the 1 pairs" in text
    assert "Pearson r +0.97 between the gain and the vocabulary overlap over 3 pairs" in text  # 50%, 50%, 0% shared
    assert text.count("Pearson") == 1  # (c) ran on one pair: no correlation
    costs = {line.split(" | ")[0][2:]: line.split(" | ") for line in text.splitlines()[-4:]}
    assert costs["DAPT: MLM on the target's unlabelled reviews"][1:4] == ["1", "10", "4.0 min (4.0-4.0)"]
    assert costs["fine-tuning (a), (b) or (c)"][1] == "10" and costs["in-domain, one fold"][1] == "4"
    da.plot(results, [0, 1, 2], tmp_path / "da.png")
    assert (tmp_path / "da.png").stat().st_size > 0


def test_a_from_run_folder_missing_here_says_what_to_give(tmp_path):
    """A published adapter's recipe names its first stage's run folder, which stays on the training machine."""
    from peftlab.bases import base_path
    from peftlab.errors import ModelNotFound

    recipe = load_recipe(None, ["data.train.path=x.tsv"], validate_files=False)
    recipe.model.from_run = str(tmp_path / "runs" / "dapt")
    with pytest.raises(ModelNotFound, match="no such folder here.*model.name=DIR model.from_run=null"):
        base_path(recipe)


def test_validate_refuses_mlm_on_a_decoder_and_clm_on_an_encoder_before_loading(tmp_path, tiny_llama, tiny_bert, texts):
    """Both validated, then failed after loading the model: with a transformers message (no masked-LM Llama) or a
    missing end-of-sequence token, neither naming the other task. `validate` now says it, with the fix."""
    from peftlab.model import model_problems

    mlm_on_llama = model_problems(recipe_for(tmp_path, tiny_llama, texts, "mlm", name="a"))
    assert any("no AutoModelForMaskedLM for a llama model" in p and "use task.type=clm" in p for p in mlm_on_llama), mlm_on_llama
    clm_on_bert = model_problems(recipe_for(tmp_path, tiny_bert, texts, "clm", name="b"))
    assert any("task.type=clm: the tokenizer" in p and "use task.type=mlm" in p for p in clm_on_bert), clm_on_bert
    assert model_problems(recipe_for(tmp_path, tiny_bert, texts, "mlm", name="c")) == []


def test_a_from_run_of_another_architecture_is_refused_before_its_merge(tmp_path, eos_llama, tiny_bert, texts):
    """An mlm recipe from a clm run on a Llama (and a clm recipe from an mlm run on a BERT) not merged yet: validate said
    nothing, and train merged the source run (a big base's merge) before it failed to load RUN/merged with the task's
    class. Both are refused from the source run's original base now, by validate and by train before any merge."""
    from peftlab.model import model_problems

    for base, task, other, said in ((eos_llama, "clm", "mlm", "no AutoModelForMaskedLM for a llama model"),
                                    (tiny_bert, "mlm", "clm", "is an encoder-only model (bert): task.type=clm needs a causal LM")):
        start = Path(run(recipe_for(tmp_path, base, texts, task, ["train.max_steps=1"], name=f"{task}-stage")).output_dir)
        assert not (start / "merged").exists()
        recipe = recipe_for(tmp_path, base, texts, other, [f"model.from_run={start}"], name=f"{other}-two")
        assert any(said in p for p in model_problems(recipe)), model_problems(recipe)
        with pytest.raises(ConfigError, match=re.escape(said)):
            run(recipe)
        assert not (start / "merged").exists() and not (tmp_path / f"{other}-two").exists()


def test_train_says_mlm_on_a_decoder_in_validates_words(tmp_path, eos_llama, texts):
    """transformers' own error was all `train` said ("Unrecognized configuration class ... for AutoModelForMaskedLM")."""
    from peftlab.errors import ModelError

    with pytest.raises(ModelError, match="transformers has no AutoModelForMaskedLM for a llama model.*use task.type=clm"):
        run(recipe_for(tmp_path, eos_llama, texts, "mlm", ["train.max_steps=1"]))


def test_how_often_a_run_evaluates_does_not_change_what_it_trains(tmp_path, tiny_bert, texts):
    """Each evaluation drew from the global generator (its loader's seed, the MLM collator's training masks for eval
    batches), so the next steps' masks and dropout differed: eval_every=1 and 4 logged other losses from step 2 on."""
    losses = {}
    for every in (1, 4):
        run(recipe_for(tmp_path, tiny_bert, texts, "mlm", ["train.max_steps=4", f"train.eval_every={every}", "train.log_every=1"],
                       name=f"every{every}"))
        lines = [json.loads(line) for line in (tmp_path / f"every{every}" / "log.jsonl").read_text().splitlines()]
        losses[every] = [r["loss"] for r in lines if r["kind"] == "train"]
    assert len(losses[1]) == 4 and losses[1] == losses[4], losses


def test_a_resumed_mlm_run_masks_as_the_run_never_stopped(tmp_path, tiny_bert, texts):
    """The loader collates a batch ahead of the step: masks drawn from the global generator were past the checkpoint's
    random state, so a resumed run masked its next batch (and every later draw) otherwise: adapters 6e-4 apart."""
    ov = ["train.max_steps=8", "train.save_every=4", "train.log_every=1", "train.eval_every=null"]
    full = run(recipe_for(tmp_path, tiny_bert, texts, "mlm", ov, name="full"))
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-4", tmp_path / "part" / "checkpoints" / "step-4")
    part = run(recipe_for(tmp_path, tiny_bert, texts, "mlm", ov, name="part"), resume=True)

    def logged(name):
        return [r["loss"] for r in map(json.loads, (tmp_path / name / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]

    assert logged("part") == pytest.approx(logged("full")[4:], abs=1e-6)
    assert part.metrics["eval"]["loss"] == pytest.approx(full.metrics["eval"]["loss"], abs=1e-6)


def test_frozen_without_a_new_head_is_refused_before_training(tmp_path, tiny_bert, eos_llama, texts):
    """adapter.method=frozen trains a new task head only: on an LM task (none) validation refuses it; on an MLM base that
    brings its own head, the model build does (it failed inside the optimizer: 'empty parameter list')."""
    from transformers import BertForMaskedLM

    from peftlab import build_model
    from peftlab.errors import ModelError

    with pytest.raises(ConfigError, match=r"adapter.method=frozen trains only a new task head, and task.type=clm adds none"):
        recipe_for(tmp_path, eos_llama, texts, "clm", ["adapter.method=frozen"])
    from .conftest import REPO  # a BERT2BERT warm start adds its cross-attention, which frozen trains: not refused

    assert load_recipe(REPO / "recipes" / "minilm" / "samsum-lora.yaml", ["adapter.method=frozen"], validate_files=False)
    # summarization on one checkpoint (a decoder, T5/BART) reads the base's LM head: nothing to train (validate said ok)
    with pytest.raises(ConfigError, match=r"adapter.method=frozen trains only a new task head, and task.type=summarization adds none"):
        load_recipe(REPO / "recipes" / "minilm" / "samsum-lora.yaml", ["adapter.method=frozen", "model.decoder=null"],
                    validate_files=False)
    with_head = tmp_path / "bert-mlm"
    BertForMaskedLM.from_pretrained(tiny_bert).save_pretrained(with_head)
    shutil.copy(tiny_bert / "tokenizer.json", with_head)
    shutil.copy(tiny_bert / "tokenizer_config.json", with_head)
    recipe = recipe_for(tmp_path, with_head, texts, "mlm", ["adapter.method=frozen"], name="fz")
    with pytest.raises(ModelError, match="leaves no weight of .* to train"):
        build_model(recipe, num_labels=0, label_names=[])
    fresh = recipe_for(tmp_path, tiny_bert, texts, "mlm", ["adapter.method=frozen"], name="ok")  # MiniLM-like: a new MLM head
    assert build_model(fresh, num_labels=0, label_names=[])[2].trainable_params > 0


def test_a_held_out_part_with_no_text_is_named_before_the_model_loads(tmp_path, tiny_bert):
    """100 rows, 5 with text: the held-out 10% had none, and the error came after the model loaded, naming no split and
    pointing at data.text_columns, which was right."""
    from peftlab import load_splits
    from peftlab.errors import DataError

    rows = [{"text": SENTENCES[0] if i == 0 else ""} for i in range(100)]  # one row with text: one side has none
    (tmp_path / "sparse.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = recipe_for(tmp_path, tiny_bert, {"train": tmp_path / "sparse.jsonl", "eval": tmp_path / "sparse.jsonl"}, "mlm",
                        ["data.eval=null", "data.eval_holdout=0.5"])
    with pytest.raises(DataError, match=r"data.eval_holdout=0.5: the 50 (held-out|kept) rows of data.train have no text"):
        load_splits(recipe)


def test_from_run_on_the_packaged_minilm_accepts_its_folder_path(tmp_path, texts):
    """A run trained on `minilm` continues with model.name given as the packaged model's folder (one base, two spellings)."""
    from peftlab.bases import resolve_model_path

    folder = resolve_model_path("minilm")
    first = tmp_path / "dapt"
    first.mkdir()
    (first / "run.json").write_text(json.dumps({"base_model": "minilm"}))
    recipe = recipe_for(tmp_path, folder, texts, "mlm", [f"model.from_run={first}"], name="two")
    assert recipe.model.name == folder


def test_rows_without_text_in_a_corpus_are_counted_in_a_warning(tmp_path, tiny_bert, caplog):
    """Empty documents (an empty or null text, spaces) were skipped by packing without a word."""
    import logging

    from peftlab import load_splits

    rows = [{"text": SENTENCES[0]}, {"text": ""}, {"text": None}, {"text": "   "}, {"text": SENTENCES[1]}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = recipe_for(tmp_path, tiny_bert, {"train": tmp_path / "c.jsonl", "eval": tmp_path / "c.jsonl"}, "mlm", ["data.eval=null"])
    with caplog.at_level(logging.WARNING, logger="peftlab"):
        out, _ = load_splits(recipe)
    assert len(out["train"]) == 5
    assert "data.train: 3 of its 5 row(s) have no text in text: they are skipped" in caplog.text


def test_a_scratch_mlm_run_exports_without_the_original_bases_weights(tmp_path, tiny_bert, texts):
    """The scratch baseline reads no pretrained weight: its export took the original base's pooler into its
    model.safetensors, and on a base folder holding only a config it failed after training (no model.safetensors)."""
    import shutil

    from safetensors import safe_open

    config_only = tmp_path / "config-only"
    config_only.mkdir()
    for f in tiny_bert.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, config_only / f.name)
    for base, name in ((config_only, "cfg"), (tiny_bert, "weights")):
        out = run(recipe_for(tmp_path, base, texts, "mlm", ["train.max_steps=2", "adapter.method=scratch"], name=name)).output_dir
        with safe_open(str(Path(out) / "model.safetensors"), "pt") as f:
            assert not [k for k in f.keys() if "pooler" in k]
