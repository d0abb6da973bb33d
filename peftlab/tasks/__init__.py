"""Tasks: one module per task family behind one `Task` interface, chosen by `task.type` through a registry.

A task owns every decision that depends on "which task": the model head (auto_model_class, peft_task_type), what rows
are learned against, tokenize/collate/evaluate, its default `train.best_metric` and the metrics it reports, its own
recipe checks, how the model card and the closing summary present it, and (optionally) how its base is built.
Adding a task = one module satisfying `Task` + one `register_task(name, module)`; nothing else changes.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from contextlib import contextmanager
from types import ModuleType
from typing import Any, Protocol

from ..errors import ConfigError
from . import encoder_decoder


class Task(Protocol):
    auto_model_class: Any  # transformers Auto* class that adds the task head (or one that picks it from the base's config)
    peft_task_type: str | Callable  # peft TaskType name, or a function of the loaded base model that returns it
    target_kind: str  # what rows are learned against: "label" (a class, data.label_column) or "text" (data.target_column)
    best_metric: str  # the default train.best_metric
    metrics: tuple[str, ...]  # what its evaluation reports: the allowed train.best_metric (lower is better for "*loss")
    pipeline_tag: str | Callable  # the Hub's pipeline tag, or a function of the adapter's peft task type (None: a full model)
    task_name: str | Callable  # the card's pretty task name, the same way
    usage_class: str | Callable  # the transformers Auto class the card's usage snippet loads, the same way
    card_metrics: dict[str, str]  # metric key -> the card's pretty name, for the metrics worth a card line

    def check(self, recipe) -> list[str]: ...  # its own recipe rules, each naming the field, the value and the fix
    def summary_line(self, split: str, metrics: dict) -> str: ...  # the closing summary's line for one split
    def tokenize(self, ds, tokenizer, recipe) -> Any: ...
    def collator(self, tokenizer) -> Callable: ...
    def evaluate(self, model, loader, accelerator, label_names: list[str], **context) -> tuple[dict, dict]: ...
    # Optional:
    # - eval_collator(tokenizer) -> Callable, the collator of the final evaluation's loaders (run.py passes context
    #   tokenizer= and recipe= to evaluate there), for tasks that need more than the model inputs, e.g. to generate.
    # - loss(model, batch, accelerator) -> the training loss (default: model(**batch).loss), e.g. a decoder LM's loss
    #   on its labelled positions only (tasks/generative.causal_lm_loss).
    # - loss_items(batch) -> how many terms that mean averages (default: the rows, or the labelled tokens of token
    #   labels; next-token losses: generative.next_token_items). A step of several micro-batches weighs each by it.
    # - GENERATED_METRICS: the metrics that need generation (a train.best_metric among them makes evaluations generate).
    # - best_metric_note: said after the metrics when train.best_metric is not one of them.
    # - packs = True: the task reads data.packing (other tasks refuse it rather than ignore it).
    # - architecture_problem(recipe, config) -> str | None: what the recipe cannot do with a base of this architecture,
    #   from its config (`validate` and `train`); loaded_model_problem(model, recipe) -> str | None: the same found on the
    #   base just loaded, before its adapter (sft: data.packing on a base whose mask lets packed examples attend across).
    # - warm_start = True: the task accepts model.decoder (an encoder-decoder warm-started from two checkpoints).
    # - base_lm_head = True: its head is the base's own LM head (adapter.method=frozen would train nothing).
    # - load_model(recipe, path, dtype) -> (model, new module names) or None: a task-specific base (None: the usual load).
    # - trim(model) -> the modules changed: skip work whose result the head never reads (train.skip_unread; e.g. the
    #   last layer of a BERT-family classifier at every position but 0), same results; `del module.forward` undoes one.
    # - input_lengths(config, recipe) -> [(config, tokens, what)]: the lengths the position tables must hold
    #   (default: data.max_length against the model's table).
    # - normalize_split(ds, spec, recipe, where) -> its rows, read from the raw columns by the task itself (sft:
    #   conversations), with check_columns(columns, recipe, where), which refuses a header it cannot read (`validate`),
    #   and optionally check_rows(rows, columns, recipe, where): a JSON file's first records ((row, record) pairs) as
    #   normalize_split would read them (`validate`).
    # - collator(tokenizer).set_epoch(seed, epoch): a collator that draws at random (mlm's masks) draws from (seed, the
    #   epoch, the row), which the loop sets each epoch: the loader collates ahead of the step, so draws from the global
    #   generator are not where a checkpoint's random state says, and a resumed run would draw others.
    # - unused_parameters = True: a step may leave some trainable parameters without a gradient (multitask: the heads
    #   and adapters of the tasks not in the batch); DDP is then told to look for them (find_unused_parameters).
    # - check_tokenizer(tokenizer, recipe): raises the error tokenizing would (e.g. no chat template), so `validate` says it.
    # - options = ("prompt", ...): the task.* keys it reads besides task.type; one of the others set is warned about (config.unread_task_options).
    # - generates = True: its evaluation generates text (sft, summarization): a method that cannot generate faithfully
    #   (prefix tuning with this transformers/peft, on a decoder or an encoder-decoder) is refused (methods/prompt.py).
    # A task made of several tasks (multitask) also replaces the steps that assume one: load_splits(recipe, need_train),
    # column_problems(recipe), build_data(recipe, tokenizer, splits, label_names), build_model(recipe, label_names=, precision=),
    # export(out, model, tokenizer, recipe, record, metrics, report) -> the record written, refuse_loading(out, run) -> the error
    # a load of OUT raises.


_REGISTRY: dict[str, Task | str] = {}


def register_task(name: str, task: Task | ModuleType | str) -> Task | ModuleType | str:
    """Make `task` available as `task.type: name`. `task` is a module or object with the `Task` attributes, or a module's
    dotted name, imported on first use (so reading a recipe does not import every task's dependencies)."""
    _REGISTRY[name] = task
    return task


def task_names() -> tuple[str, ...]:
    """The registered task names: the choices of `task.type`."""
    return tuple(_REGISTRY)


@contextmanager
def unread_skipped(model, recipe):
    """train.skip_unread: the task's `trim` (if it has one) on `model`, in place, for the span of a with-block -> the
    layers it changed. They get their own forward back afterwards, so the model `train` hands back reads as loaded (a
    trimmed layer's hidden states hold position 0 only). A layer trimmed already (an evaluation inside training) is the
    outer block's to give back."""
    trim = getattr(get_task(recipe.task.type), "trim", None)
    layers = trim(model) if recipe.train.skip_unread and trim is not None else []
    try:
        yield layers
    finally:
        for layer in layers:
            del layer.forward


def get_task(name: str) -> Task:
    try:
        task = _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError([f"task.type={name!r}: no such task; registered: {', '.join(_REGISTRY)}.{hint} A new task is "
                           "registered with peftlab.tasks.register_task(name, module)."]) from None
    if isinstance(task, str):
        task = _REGISTRY[name] = importlib.import_module(task)  # a module satisfies the protocol
    return task


def _value(attr, *args):
    return attr(*args) if callable(attr) else attr


def peft_task_type(task: Task, model) -> str:
    return _value(task.peft_task_type, model)


def pipeline_tag(task: Task, peft_type: str | None = None) -> str:
    """The Hub pipeline tag of a run of `task` whose adapter has peft task type `peft_type` (None: a full model)."""
    return _value(task.pipeline_tag, peft_type)


def task_name(task: Task, peft_type: str | None = None) -> str:
    return _value(task.task_name, peft_type)


def usage_class(task: Task, peft_type: str | None = None) -> str:
    return _value(task.usage_class, peft_type)


def lower_is_better(metric: str) -> bool:
    """The direction of every task's metrics: losses and perplexities fall, the rest (accuracy, F1, ROUGE, ...) rise."""
    return metric.endswith("loss") or metric.endswith("perplexity")


def default_best_metric(name: str) -> str | None:
    """The task's default train.best_metric; None for an unknown task (validation reports task.type)."""
    return get_task(name).best_metric if name in _REGISTRY else None


def best_metric_problems(name: str, task: Task, metric: str | None) -> list[str]:
    """train.best_metric must be a metric the task's evaluation reports, or keep-best fails after the first evaluation."""
    kept = tuple(task.metrics)
    if not kept or metric in kept:
        return []
    close = difflib.get_close_matches(str(metric), kept, n=1, cutoff=0.3)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return [f"train.best_metric={metric!r}: {name} keeps the best of {', '.join(kept)}{getattr(task, 'best_metric_note', '')}.{hint}"]


def check_recipe(recipe) -> list[str]:
    """Every rule that depends on the task: its best metric, the task's own checks, the encoder-decoder warm start."""
    name = recipe.task.type
    if name not in _REGISTRY:
        return []  # the choices check of task.type already names it
    task = get_task(name)
    warm = getattr(task, "warm_start", False)
    offering = [] if warm or recipe.model.decoder is None else [n for n in task_names() if getattr(get_task(n), "warm_start", False)]
    packing = [] if not recipe.data.packing or getattr(task, "packs", False) else [
        f"data.packing=true with task.type={name}: only {', '.join(n for n in task_names() if getattr(get_task(n), 'packs', False))} "
        "packs its rows; this task would ignore it. Set data.packing=false."]
    frozen_base_head = getattr(task, "base_lm_head", False) and recipe.model.decoder is None  # (a warm start adds layers)
    headless = [] if recipe.adapter.method != "frozen" or not frozen_base_head else [
        f"adapter.method=frozen trains only a new task head, and task.type={name} adds none (it reads the base's own LM "
        "head): nothing would train. Use adapter.method=lora, or train.max_steps=0 to score the base as it is."]
    return [*best_metric_problems(name, task, recipe.train.best_metric), *task.check(recipe),
            *encoder_decoder.check(recipe, warm, offering), *packing, *headless]


def input_lengths(task: Task, config, recipe) -> list[tuple[Any, int, str]]:
    """(config, tokens, what) pairs: the lengths a model's position tables must hold for this task's inputs."""
    if hasattr(task, "input_lengths"):
        return task.input_lengths(config, recipe)
    d = recipe.data
    return [(config, d.max_length, f"data.max_length={d.max_length}")]


register_task("classification", "peftlab.tasks.classification")
register_task("summarization", "peftlab.tasks.summarization")
register_task("verbalizer", "peftlab.tasks.verbalizer")
register_task("sft", "peftlab.tasks.sft")
register_task("mlm", "peftlab.tasks.mlm")
register_task("clm", "peftlab.tasks.clm")
register_task("multitask", "peftlab.tasks.multitask")
