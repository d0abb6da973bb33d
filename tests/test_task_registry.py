"""The task registry: "which task" has one owner (peftlab/tasks). A toy task defined here, registered with one call,
validates, trains, keeps the best on its own metric and exports through the public API; the two shipped tasks
present themselves (summary line, pipeline tag, card metrics) exactly as peftlab always has."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import peftlab.tasks as tasks
from peftlab import evaluate, load_recipe, load_trained, run
from peftlab.errors import ConfigError
from peftlab.tasks import classification, get_task, register_task, sft, summarization, task_names

# ------------------------------------------------------------------------------------------------ a toy task


@torch.no_grad()
def entropy_evaluate(model, loader, accelerator, label_names, **context):
    """Mean predictive entropy (nats) and the loss. Entropy falls as the classifier grows confident, so as a
    higher-is-better metric its best is an early evaluation: keep-best has to go back to it."""
    model.eval()
    ent_sum, loss_sum, n = 0.0, 0.0, 0
    for batch in loader:
        logits = model(**batch).logits.float()
        ent = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
        ent, loss = accelerator.gather_for_metrics((ent, loss))
        ent_sum, loss_sum, n = ent_sum + ent.sum().item(), loss_sum + loss.sum().item(), n + len(loss)
    model.train()
    return {"entropy": ent_sum / n, "loss": loss_sum / n}, {"n": n}


def binary_only(recipe) -> list[str]:
    names = recipe.data.label_names
    return [] if names is None or len(names) == 2 else [f"data.label_names={names}: entropy-sentiment is binary; name 2 labels."]


ENTROPY_TASK = SimpleNamespace(  # classification's model, data and batching; its own metric, rule and presentation
    auto_model_class=classification.auto_model_class, peft_task_type="SEQ_CLS", target_kind="label",
    tokenize=classification.tokenize, collator=classification.collator, evaluate=entropy_evaluate,
    best_metric="entropy", metrics=("entropy", "loss"), check=binary_only,
    pipeline_tag="text-classification", task_name="Text Classification", usage_class="AutoModelForSequenceClassification",
    card_metrics={"entropy": "Predictive entropy"},
    summary_line=lambda split, m: f"   {split:<5} entropy {m['entropy']:.4f}   loss {m['loss']:.4f}",
)


@pytest.fixture
def entropy_task(monkeypatch):
    monkeypatch.setattr(tasks, "_REGISTRY", dict(tasks._REGISTRY))  # the registration ends with the test
    register_task("entropy-sentiment", ENTROPY_TASK)
    return ENTROPY_TASK


def test_an_unregistered_task_is_refused_with_a_suggestion():
    assert "entropy-sentiment" not in task_names()
    with pytest.raises(ConfigError, match=r"task.type='entropy-sentimen': must be one of classification, summarization"):
        load_recipe(None, ["task.type=entropy-sentimen"], validate_files=False)
    with pytest.raises(ConfigError, match="no such task; registered: classification, summarization.* Did you mean 'summarization'"):
        get_task("sumarization")


def test_a_registered_task_brings_its_default_metric_and_its_own_rule(entropy_task):
    recipe = load_recipe(None, ["task.type=entropy-sentiment"], validate_files=False)
    assert recipe.train.best_metric == "entropy"  # the task's default, written into recipe.yaml
    with pytest.raises(ConfigError) as e:
        load_recipe(None, ["task.type=entropy-sentimen", "data.label_names=[a,b,c]", "train.best_metric=accuracy"],
                    validate_files=False)
    assert "Did you mean 'entropy-sentiment'?" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_recipe(None, ["task.type=entropy-sentiment", "data.label_names=[a,b,c]", "train.best_metric=accuracy"],
                    validate_files=False)
    assert e.value.problems == [
        "train.best_metric='accuracy': entropy-sentiment keeps the best of entropy, loss.",
        "data.label_names=['a', 'b', 'c']: entropy-sentiment is binary; name 2 labels."]


def test_a_toy_task_trains_keeps_its_best_and_exports(entropy_task, make_recipe):
    s = run(make_recipe({"task.type": "entropy-sentiment", "train.precision": "fp32", "train.epochs": 4, "train.eval_every": 8}))
    out, history = Path(s["output_dir"]), s["history"]
    assert all(set(h) >= {"entropy", "loss"} for h in history) and len(history) >= 3
    best = max(history, key=lambda h: h["entropy"])  # the first of the ties: the loop keeps strict improvements only
    assert s["best_step"] == best["step"] < s["steps"], history
    assert s["metrics"]["eval"]["entropy"] == pytest.approx(best["entropy"], abs=1e-5)  # the kept weights were exported
    assert (out / "adapter_model.safetensors").is_file() and json.loads((out / "metrics.json").read_text())["eval"]["entropy"] > 0
    model, _, recipe, _ = load_trained(out)
    assert recipe.task.type == "entropy-sentiment" and type(model.get_base_model()).__name__ == "BertForSequenceClassification"
    assert evaluate(out, split="eval", results_dir=out / "again")["entropy"] == pytest.approx(best["entropy"], abs=1e-5)


# ------------------------------------------------------------------------------- the shipped tasks' presentation

CLS = {"accuracy": 0.91234, "f1": 0.9, "loss": 0.25}
SUM = {"loss": 2.34567, "rouge1": 0.41234, "rouge2": 0.18, "rougeL": 0.33333, "rougeLsum": 0.35, "gen_words": 17.5}


def test_summary_lines_are_todays():
    """The closing summary's per-split lines as cli.print_summary has always written them (keep-best marker aside)."""
    assert classification.summary_line("eval", CLS) == "   eval  accuracy 0.9123   macro-F1 0.9000   loss 0.2500"
    assert summarization.summary_line("test", SUM) == "   test  rouge1 41.23%   rouge2 18.00%   rougeL 33.33%   rougeLsum 35.00%   loss 2.3457"
    assert summarization.summary_line("eval", {"loss": 2.5}) == "   eval     loss 2.5000"  # no generation: the loss alone
    assert sft.summary_line("test", {"exact_match": 0.0609, "rouge1": 0.5, "loss": 1.0}) == "   test  exact_match 6.09%   rouge1 50.00%   loss 1.0000"


def test_hub_presentation_is_todays():
    assert tasks.pipeline_tag(classification) == tasks.pipeline_tag(classification, "SEQ_CLS") == "text-classification"
    assert tasks.task_name(classification) == "Text Classification"
    assert tasks.usage_class(classification, "SEQ_CLS") == "AutoModelForSequenceClassification"
    # a summarization adapter's peft task type decides; a full model (no adapter config) is shown as an encoder-decoder
    assert [tasks.pipeline_tag(summarization, t) for t in (None, "SEQ_2_SEQ_LM", "CAUSAL_LM")] == \
        ["summarization", "summarization", "text-generation"]
    assert [tasks.task_name(summarization, t) for t in (None, "CAUSAL_LM")] == ["Summarization", "Text Generation"]
    assert [tasks.usage_class(summarization, t) for t in (None, "CAUSAL_LM")] == ["AutoModelForSeq2SeqLM", "AutoModelForCausalLM"]
    assert {**classification.card_metrics, **summarization.card_metrics} == {
        "accuracy": "Accuracy", "f1": "Macro F1", "rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L",
        "rougeLsum": "ROUGE-Lsum"}


def test_defaults_and_metrics_are_the_tasks():
    assert {"classification", "summarization", "verbalizer"} <= set(task_names())
    assert (get_task("classification").best_metric, get_task("summarization").best_metric) == ("accuracy", "loss")
    assert get_task("classification").metrics == ("accuracy", "f1", "loss")
    assert get_task("summarization").metrics == ("loss", "rouge1", "rouge2", "rougeL", "rougeLsum")
    assert tasks.lower_is_better("loss") and not tasks.lower_is_better("rougeL")


@pytest.mark.parametrize("task, overrides, unread", [
    ("classification", ["task.prompt=Review: {text}", "task.chat_template=true", "task.label_eos=true"],
     "task.prompt='Review: {text}', task.chat_template=true, task.label_eos=true"),
    ("verbalizer", ["task.system_prompt=Be brief."], "task.system_prompt='Be brief.'")])
def test_task_keys_the_task_does_not_read_are_warned_about(make_recipe, caplog, task, overrides, unread):
    """task.prompt on a classification head was accepted silently: the head never saw it, and the recipe and card showed it."""
    from peftlab.run import preflight

    recipe = make_recipe({"task.type": task, **dict(o.split("=", 1) for o in overrides)})
    with caplog.at_level("WARNING", logger="peftlab"):
        preflight(recipe, training=False)
    assert f"{unread}: not read by task.type={task}, so ignored" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="peftlab"):
        preflight(make_recipe({"task.type": "verbalizer", "task.prompt": "Review: {text} Label:", "task.label_eos": True}), training=False)
    assert "not read by task.type" not in caplog.text
