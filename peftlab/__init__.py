"""peftlab: parameter-efficient fine-tuning from one recipe.

    from peftlab import load_recipe, run, evaluate, merge
    recipe = load_recipe("recipes/minilm/sst2-lora.yaml", ["train.epochs=1"])
    summary = run(recipe)              # train -> evaluate -> export to recipe.out
    evaluate(recipe.out, split="eval")
    merge(recipe.out)                  # -> recipe.out / "merged", a standalone transformers model

The building blocks are public too: build_model, build_data, train, export. The module map: ARCHITECTURE.md.
"""

from .adapters import load_adapters
from .compose import compose
from .config import Recipe, load_recipe, validate
from .data import build_data, load_splits
from .errors import ArtifactError, ConfigError, DataError, ModelError, PeftlabError
from .export import export, load_trained, merge
from .model import build_model
from .publish import load_adapter, publish
from .run import evaluate, run
from .rundir import RunRecord, read_run
from .train import train

__version__ = "0.1.0"
__all__ = ["Recipe", "load_recipe", "validate", "build_model", "build_data", "load_splits", "train", "run", "evaluate",
           "export", "merge", "load_trained", "read_run", "RunRecord", "publish", "load_adapter", "load_adapters", "compose",
           "PeftlabError", "ConfigError", "DataError", "ModelError", "ArtifactError"]
