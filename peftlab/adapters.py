"""Several adapters on one base: load them side by side, switch between them, or give each row of a batch its own.

    from peftlab.adapters import load_adapters
    model, tokenizer = load_adapters({"movies": "runs/sst2-lora", "products": "alice/reviews-lora"})
    model.set_adapter("products")                                  # switch
    model(**batch, adapter_names=["movies", "products", ...])      # one adapter per row (peft's mixed-batch inference)

Every adapter must have been trained on the same base model and, for classification, with the same number of labels
(each adapter keeps its own copy of the head, but the copies share one shape). Sources are run folders or Hub ids (see `publish.load_adapter`).
"""

from __future__ import annotations

from pathlib import Path

from .errors import ArtifactError
from .export import load_trained
from .publish import load_adapter
from .rundir import read_run


def load_adapters(sources: dict[str, str | Path], *, endpoint: str | None = None):
    """-> (PeftModel in eval mode holding every adapter under its name, tokenizer); the first one is active."""
    if not sources:
        raise ArtifactError("load_adapters needs at least one {name: run folder or hub id}.")
    folders = {name: load_adapter(src, endpoint=endpoint) for name, src in sources.items()}
    first, *rest = folders.items()
    model, tokenizer, recipe, run = load_trained(first[1], adapter_name=first[0])
    if not hasattr(model, "load_adapter"):
        raise ArtifactError(f"{first[1]} holds a standalone model (method {run.method}), not an adapter.")
    for name, folder in rest:
        other_recipe, other_run = read_run(folder)
        if other_recipe.model.name != recipe.model.name or len(other_run.label_names) != len(run.label_names):
            raise ArtifactError(f"adapter {name!r} ({folder}) was trained on {other_recipe.model.name} with "
                                f"{len(other_run.label_names)} labels, but {first[0]!r} on {recipe.model.name} with "
                                f"{len(run.label_names)}: adapters on one base must share the base and the number of labels.")
        model.load_adapter(str(folder), adapter_name=name)
    model.set_adapter(first[0])
    return model.eval(), tokenizer
