"""Several adapters on one base: load them side by side, switch between them, or give each row of a batch its own.

    from peftlab.adapters import load_adapters
    model, tokenizer = load_adapters({"movies": "runs/sst2-lora", "products": "alice/reviews-lora"})
    model.set_adapter("products")                                  # switch
    model(**batch, adapter_names=["movies", "products", ...])      # one adapter per row (peft's mixed-batch inference)

Every adapter must have been trained on the same base model. Classification adapters may have different numbers of labels
(each keeps its own head, sized to its labels: the tasks of a multi-task run, OUT/tasks/NAME, load side by side), but
one batch with one adapter per row needs heads of one size. Sources are run folders or Hub ids (see `publish.load_adapter`).
"""

from __future__ import annotations

from pathlib import Path

from .errors import ArtifactError
from .export import load_trained
from .publish import load_adapter
from .rundir import BASE_KEYS, adapter_config, base_as_loaded, differences, read_run

BASE_ROWS = "__base__"  # peft's name, in a mixed batch's adapter_names, for rows that skip every adapter


def load_adapters(sources: dict[str, str | Path], *, endpoint: str | None = None):
    """-> (PeftModel in eval mode holding every adapter under its name, tokenizer); the first one is active."""
    if not sources:
        raise ArtifactError("load_adapters needs at least one {name: run folder or hub id}.")
    for name in sources:
        check_name(name)
    folders = {name: load_adapter(src, endpoint=endpoint) for name, src in sources.items()}
    first, *rest = folders.items()
    model, tokenizer, recipe, run = load_trained(first[1], adapter_name=first[0])
    if not hasattr(model, "load_adapter"):
        raise ArtifactError(f"{first[1]} holds a standalone model (method {run.method}), not an adapter.")
    kind = adapter_config(first[1]).get("peft_type")
    for name, folder in rest:
        other_recipe, other_run = read_run(folder)
        mine, theirs = base_as_loaded(recipe, run), base_as_loaded(other_recipe, other_run)
        if mine != theirs:
            raise ArtifactError(f"adapter {name!r} ({folder}) was trained on another base than {first[0]!r} "
                                f"({differences(BASE_KEYS, mine, theirs)}): adapters loaded side by side must share their "
                                "base as loaded. Load them one by one (load_trained).")
        if (other := adapter_config(folder).get("peft_type")) != kind:  # (peft refused it with its own ValueError)
            raise ArtifactError(f"adapter {name!r} is of peft type {other} and {first[0]!r} of {kind}: peft "
                                "serves adapters side by side only of one type. Load them one by one (load_trained).")
        if len(other_run.label_names) == len(run.label_names):
            model.load_adapter(str(folder), adapter_name=name)
        else:
            load_with_own_head(model, Path(folder), name, len(run.label_names), len(other_run.label_names))
    model.set_adapter(first[0])
    return model.eval(), tokenizer


def check_name(name) -> None:
    """An adapter's name is a key of peft's per-layer module dicts and of adapter_names: refuse the ones peft misreads."""
    if not isinstance(name, str) or not name.strip():
        why = "an adapter needs a non-empty name"
    elif "." in name:
        why = "peft names an adapter's layers by it, and a dot splits a module's path"
    elif name == BASE_ROWS:
        why = "peft reads it, in a mixed batch's adapter_names, as no adapter at all: its rows would get the plain base"
    else:
        return
    raise ArtifactError(f"adapter name {name!r}: {why}. Name each adapter with a word without dots, e.g. "
                        f"{{{(str(name).replace('.', '_').strip('_ ') or 'movies')!r}: ...}}.")


def load_with_own_head(model, folder: Path, name: str, old: int, new: int) -> None:
    """Add adapter `name` whose classification head has `new` outputs where the model's has `old`: peft copies the
    model's head for a new adapter, so that copy is resized before the adapter's weights are loaded into it."""
    from peft import PeftConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    from .model import head_wrapper, resized_head

    config = PeftConfig.from_pretrained(str(folder))
    config.inference_mode = True
    model.add_adapter(name, config)
    wrapper = head_wrapper(model)
    wrapper.modules_to_save[name] = resized_head(wrapper.modules_to_save[name], old, new, init=lambda module: None)
    result = set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")), adapter_name=name)
    if result.unexpected_keys:
        raise ArtifactError(f"adapter {name!r} ({folder}) does not fit {type(model.get_base_model()).__name__}: unexpected "
                            f"weights {result.unexpected_keys[:3]}.")
