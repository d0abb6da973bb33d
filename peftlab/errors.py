"""Errors a user can act on. Each subclasses the built-in it refines, so callers may catch either."""

from __future__ import annotations

import os
from pathlib import Path


class PeftlabError(Exception):
    """Base class: a user-facing problem with a message that says what to do next."""


class ConfigError(PeftlabError, ValueError):
    """The recipe is malformed or has invalid values. `problems` lists every one found."""

    def __init__(self, problems: list[str], source: str | None = None, what: str = "recipe"):
        self.problems = list(problems)
        where = f" in {source}" if source else ""
        head = f"{len(self.problems)} problem(s){where}:" if len(self.problems) > 1 else f"invalid {what}{where}:"
        super().__init__(head + "".join(f"\n  - {p}" for p in self.problems))


def a_or_an(word: str) -> str:
    """`word` with its indefinite article, for messages that name a method: "an adalora adapter", "a lora adapter"."""
    return f"{'an' if str(word)[:1].lower() in 'aeiou' else 'a'} {word}"


def path_argument(value, where: str) -> Path:
    """A folder or file path given to a Python API function (a str or an os.PathLike) -> Path; anything else (a number,
    None, an empty string: the working directory) is a ConfigError naming the argument, not a TypeError from pathlib."""
    if isinstance(value, (str, os.PathLike)) and str(value).strip():
        return Path(value)
    raise ConfigError([f"{where}={type(value).__name__} {value!r:.80}: give a path (a non-empty str or a pathlib.Path), e.g. 'runs/sst2-lora'."],
                      what="argument")


class DataError(PeftlabError, ValueError):
    """A dataset is missing, empty, or does not have the columns/labels the recipe names."""


class DataFileNotFound(DataError, FileNotFoundError):
    """A data file named by the recipe does not exist."""


class ModelError(PeftlabError, ValueError):
    """The base model cannot be resolved or the adapter cannot be applied to it."""


class ModelNotFound(ModelError, FileNotFoundError):
    """The base model is neither a local directory, a packaged model, nor reachable on the hub."""


class HubModelUnreachable(ModelNotFound):
    """The base model is a hub id that could not be fetched (offline, unknown, gated) and is not in the local cache."""


class ArtifactError(PeftlabError, FileNotFoundError):
    """An output directory is missing, incomplete, or belongs to another run."""


class TrainingInterrupted(PeftlabError):
    """Training was stopped (Ctrl-C / SIGINT, or SIGTERM from a scheduler) after saving a checkpoint. `code`: the exit
    status a process ends with on that signal (128 + its number)."""

    def __init__(self, message: str, code: int = 130):
        super().__init__(message)
        self.code = code


class TrainingDiverged(PeftlabError, ArithmeticError):
    """The loss (or a trained weight) became inf or nan: the run stopped and exported nothing."""


class PublishError(PeftlabError, RuntimeError):
    """Publishing a run (Hub, directory, git remote) failed; the message says what was and was not done."""
