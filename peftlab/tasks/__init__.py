"""One module per task family. Each exposes the same small surface (see `Task`)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol


class Task(Protocol):
    auto_model_class: Any  # transformers Auto* class that adds the task head (or one that picks it from the base's config)
    peft_task_type: str | Callable  # peft TaskType name, or a function of the loaded base model that returns it
    target_kind: str  # what rows are learned against: "label" (a class, data.label_column) or "text" (data.target_column)

    def tokenize(self, ds, tokenizer, recipe) -> Any: ...
    def collator(self, tokenizer) -> Callable: ...
    def evaluate(self, model, loader, accelerator, label_names: list[str], **context) -> tuple[dict, dict]: ...
    # Optional: eval_collator(tokenizer) -> Callable, the collator of the final evaluation's loaders (run.py passes
    # context tokenizer= and recipe= to evaluate there), for tasks that need more than the model inputs, e.g. to generate.


TASKS = {"classification": "peftlab.tasks.classification", "summarization": "peftlab.tasks.summarization"}


def get_task(name: str) -> Task:
    return importlib.import_module(TASKS[name])  # the module itself satisfies the protocol


def peft_task_type(task: Task, model) -> str:
    return task.peft_task_type(model) if callable(task.peft_task_type) else task.peft_task_type
