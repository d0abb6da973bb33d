"""One module per task family. Each exposes the same small surface (see `Task`)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol


class Task(Protocol):
    auto_model_class: Any  # transformers Auto* class that adds the task head
    peft_task_type: str  # peft TaskType name

    def tokenize(self, ds, tokenizer, recipe) -> Any: ...
    def collator(self, tokenizer) -> Callable: ...
    def evaluate(self, model, loader, accelerator, label_names: list[str]) -> tuple[dict, dict]: ...


TASKS = {"classification": "peftlab.tasks.classification"}


def get_task(name: str) -> Task:
    return importlib.import_module(TASKS[name])  # the module itself satisfies the protocol
