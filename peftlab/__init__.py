"""peftlab: parameter-efficient fine-tuning from one recipe.

    from peftlab import load_recipe, run, evaluate, merge
    recipe = load_recipe("recipes/minilm/sst2-lora.yaml", ["train.epochs=1"])
    summary = run(recipe)              # train -> evaluate -> export to recipe.out (run("x.yaml") loads it first)
    evaluate(recipe.out, split="eval")
    merge(recipe.out)                  # -> recipe.out / "merged", a standalone transformers model

The building blocks are public too: build_model, build_data, train, export. The module map: ARCHITECTURE.md.
"""

import logging
import sys
import types
from importlib import import_module
from typing import TYPE_CHECKING

from .errors import ArtifactError, ConfigError, DataError, ModelError, PeftlabError

# peft imports bitsandbytes whenever it is imported (quantized or not), and on a CPU with avx512_bf16 bitsandbytes then
# looks for an optional 4-bit kernel on the Hub ('Failed to load CPU gemm_4bit_forward ... pip install kernels',
# 'Skipping publisher trust check'): a plain LoRA build_model began with alarming lines, though bitsandbytes falls back
# to its own kernel. Also its 'MatMul8bitLt: inputs will be cast from torch.float32 to float16' on every forward of an
# 8-bit layer (thousands of lines in an 8-bit run; that module logs nothing else). Set before anything of peftlab
# imports peft, for Python callers and the CLI alike; errors still show.
for _chatty in ("bitsandbytes.backends.cpu.ops", "kernels", "bitsandbytes.autograd._functions"):
    logging.getLogger(_chatty).setLevel(logging.ERROR)

# name -> its module; imported on first use (PEP 562), so `peftlab --help` and `peftlab validate` do not pay for torch
_API = {"load_adapters": "adapters", "compose": "compose", "Recipe": "config", "load_recipe": "config", "validate": "config",
        "build_data": "data", "load_splits": "data", "export": "export", "load_trained": "export", "merge": "export",
        "build_model": "model", "load_adapter": "publish", "publish": "publish", "evaluate": "run", "run": "run",
        "RunRecord": "rundir", "read_run": "rundir", "train": "train"}

if TYPE_CHECKING:
    from .adapters import load_adapters
    from .compose import compose
    from .config import Recipe, load_recipe, validate
    from .data import build_data, load_splits
    from .export import export, load_trained, merge
    from .model import build_model
    from .publish import load_adapter, publish
    from .run import evaluate, run
    from .rundir import RunRecord, read_run
    from .train import train


def __getattr__(name: str):
    if name in _API:
        value = getattr(import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value  # once
        return value
    raise AttributeError(f"module 'peftlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        if name in _API and isinstance(value, types.ModuleType):
            return  # importing peftlab.run (or .train, .export, ...) leaves peftlab.run the function, as it was when eager
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__version__ = "0.1.0"
__all__ = ["Recipe", "load_recipe", "validate", "build_model", "build_data", "load_splits", "train", "run", "evaluate",
           "export", "merge", "load_trained", "read_run", "RunRecord", "publish", "load_adapter", "load_adapters", "compose",
           "PeftlabError", "ConfigError", "DataError", "ModelError", "ArtifactError"]
