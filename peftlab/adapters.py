"""Several adapters on one base: load them side by side, switch between them, or give each row of a batch its own.

    from peftlab.adapters import load_adapters
    model, tokenizer = load_adapters({"movies": "runs/sst2-lora", "products": "alice/reviews-lora"})
    model.set_adapter("products")                                  # switch
    model(**batch, adapter_names=["movies", "products", ...])      # one adapter per row (peft's mixed-batch inference)

Every adapter must have been trained on the same base model, with one peft method. Classification adapters may have
different numbers of labels (each keeps its own head, sized to its labels: the tasks of a multi-task run, OUT/tasks/NAME,
load side by side) and set_adapter switches between them; only a batch with one adapter per row needs the heads of its
rows' adapters to be of one size, and LoRA adapters (not DoRA ones): peft mixes no other type per row (LoHa, LoKr and IA3
ignored adapter_names). Each call's adapter_names (forward and generate) is checked before peft runs. Sources are run
folders or Hub ids (see `publish.load_adapter`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path

from .errors import ArtifactError, ConfigError, ModelError
from .export import load_trained
from .publish import load_adapter
from .rundir import BASE_KEYS, adapter_config, base_as_loaded, differences, read_run
from .tasks import get_task

BASE_ROWS = "__base__"  # peft's name, in a mixed batch's adapter_names, for rows that skip every adapter
MIXED_BATCH_TYPES = ("LORA",)  # the peft types whose layers run adapter_names (peft 0.21: LoRA's, not DoRA)


def load_adapters(sources: dict[str, str | Path], *, endpoint: str | None = None):
    """-> (PeftModel in eval mode holding every adapter under its name, tokenizer); the first one is active."""
    if not isinstance(sources, Mapping):  # (a list of folders: an AttributeError on .items; the names are peft's adapter names)
        raise ConfigError([f"load_adapters(sources={type(sources).__name__} {sources!r:.80}): give a mapping of adapter name to "
                           "run folder or hub id, e.g. {'sst2': 'runs/sst2', 'mrpc': 'runs/mrpc'}: each adapter is loaded "
                           "under its name."], what="argument")
    if not sources:
        raise ArtifactError("load_adapters needs at least one {name: run folder or hub id}.")
    for name in sources:
        check_name(name)
    folders = {name: load_adapter(src, endpoint=endpoint) for name, src in sources.items()}
    configs = {}  # each adapter's adapter_config.json
    for name, folder in folders.items():
        if error := not_an_adapter(Path(folder), f"adapter {name!r} ({folder})", "load it on its own (load_trained)"):
            raise error
        configs[name] = adapter_config(folder)
        check_adalora_name(name, configs[name])
        if len(folders) > 1:
            refuse_trained_biases(configs[name], f"adapter {name!r} ({folder})", "Load it on its own (load_trained)")
    first, *rest = folders.items()
    model, tokenizer, recipe, run = load_trained(first[1], adapter_name=first[0])  # (an adapter: not_an_adapter said so)
    kind = configs[first[0]].get("peft_type")
    heads = {first[0]: len(run.label_names or ())}  # each adapter's number of labels, for mixed_batch_check
    for name, folder in rest:
        other_recipe, other_run = read_run(folder)
        heads[name] = len(other_run.label_names or ())
        mine, theirs = base_as_loaded(recipe, run), base_as_loaded(other_recipe, other_run)
        if mine != theirs:
            raise ArtifactError(f"adapter {name!r} ({folder}) was trained on another base than {first[0]!r} "
                                f"({differences(BASE_KEYS, mine, theirs)}): adapters loaded side by side must share their "
                                "base as loaded. Load them one by one (load_trained).")
        mine_cls, theirs_cls = (get_task(r.task.type).auto_model_class for r in (recipe, other_recipe))
        if theirs_cls is not mine_cls:  # (peft loaded the LoRA matrices into the other model and dropped, or failed on, its head)
            raise ArtifactError(f"adapter {name!r} ({folder}) is a task.type {other_recipe.task.type} adapter ({theirs_cls.__name__}) "
                                f"and {first[0]!r} a task.type {recipe.task.type} one ({mine_cls.__name__}): adapters loaded side "
                                "by side share one model, its head included, so they must be of tasks that build the same "
                                "model. Load them one by one (load_trained).")
        if (other := configs[name].get("peft_type")) != kind:  # (peft refused it with its own ValueError)
            raise ArtifactError(f"adapter {name!r} is of peft type {other} and {first[0]!r} of {kind}: peft "
                                "serves adapters side by side only of one type. Load them one by one (load_trained).")
        if len(other_run.label_names) == len(run.label_names):
            model.load_adapter(str(folder), adapter_name=name)
        else:
            load_with_own_head(model, Path(folder), name, len(run.label_names), len(other_run.label_names))
    model.set_adapter(first[0])
    check = mixed_batch_check(model, {BASE_ROWS: heads[first[0]], **heads}, kind)
    model.register_forward_pre_hook(check, with_kwargs=True)
    generate = model.generate  # peft's generate runs the base model's forward, not the PeftModel's: check there too

    @functools.wraps(generate)
    def checked_generate(*args, **kwargs):
        check(model, args, kwargs)
        return generate(*args, **kwargs)

    model.generate = checked_generate
    return model.eval(), tokenizer


def mixed_batch_check(model, heads: dict[str, int], kind: str):
    """A forward pre-hook that checks a call's adapter_names (one adapter per row) before peft does: peft raised its own
    ValueErrors, and torch's "stack expects each tensor to be equal size" for heads of different sizes; for other types
    than LoRA it ignored the names (every row got the active adapter) or failed inside its layers. `heads`: each
    adapter's number of labels (the base's head: the first adapter's); `kind`: their peft type."""

    def check(module, args, kwargs):
        names = kwargs.get("adapter_names")
        if names is None:
            return None
        loaded = ", ".join(map(repr, model.peft_config))
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise ModelError(f"adapter_names={names!r}: give a list with one adapter name per row, e.g. "
                             f"adapter_names=[{', '.join(map(repr, list(model.peft_config)[:2]))}] (loaded: {loaded}).")
        if unknown := sorted(set(names) - set(heads)):
            raise ModelError(f"adapter_names names {', '.join(map(repr, unknown))}, which is not loaded: the adapters are "
                             f"{loaded} ({BASE_ROWS!r}: the base without any).")
        rows = next((x for x in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args) if hasattr(x, "shape")), None)
        if rows is not None and len(names) != rows.shape[0]:
            raise ModelError(f"adapter_names has {len(names)} name(s) for a batch of {rows.shape[0]} row(s): give one "
                             "adapter name per row.")
        if kind not in MIXED_BATCH_TYPES:
            raise ModelError(f"adapter_names: these are {kind} adapters, and peft mixes adapters per row only for LoRA ones "
                             "(the others ignore adapter_names and run every row through the active adapter, or fail inside "
                             "their layers). Switch between them instead: model.set_adapter(NAME), then a batch per adapter.")
        if dora := [n for n in dict.fromkeys(names) if getattr(model.peft_config.get(n), "use_dora", False)]:
            raise ModelError(f"adapter(s) {', '.join(map(repr, dora))} are DoRA adapters (use_dora): peft does not mix them "
                             "per row. Run their rows as a batch of their own after model.set_adapter(NAME).")
        if len(set((sizes := {n: heads[n] for n in dict.fromkeys(names)}).values())) > 1:
            raise ModelError(f"a mixed batch needs the heads of its rows' adapters to be of one size, and these differ ("
                             f"{', '.join(f'{n!r}: {k} labels' for n, k in sizes.items())}): peft stacks the rows' outputs. "
                             "Switch between them instead: model.set_adapter(NAME), then a batch per adapter.")
        return None

    return check


def not_an_adapter(folder: Path, what: str, instead: str) -> ArtifactError | None:
    """The error for a folder that holds no adapter, else None: a multi-task run (its adapters are its tasks' runs), or a
    standalone model (a merged one, OUT/merged, or a fully trained one). `instead`: what to do with a standalone one."""
    recipe, run = read_run(folder)
    task = get_task(recipe.task.type)
    if hasattr(task, "refuse_loading"):
        return task.refuse_loading(folder, run)
    if (folder / "adapter_config.json").is_file():
        return None
    merged = (folder / "merge.json").is_file()  # (a published merged model has one too, with no run folder above it)
    run_folder = merged and (folder.parent / "adapter_config.json").is_file()
    return ArtifactError(f"{what} holds a standalone model ({'merged from a ' if merged else 'method '}{run.method}"
                         f"{' adapter' if merged else ''}), not an adapter: {instead}"
                         + (f", or give the run folder that holds its adapter ({folder.parent})." if run_folder else "."))


def refuse_trained_biases(config: dict, what: str, instead: str) -> None:
    """Refuse an adapter (its adapter_config.json: `config`) that trained the base's own biases (peft's bias: lora_only
    or all) where it must sit beside others: the biases are the base's, one set per model, and peft raised "supports
    only 1 adapter with bias"."""
    if (bias := config.get("bias") or "none") != "none":
        raise ArtifactError(f"{what} trained the base's own biases too (bias: {bias}, from adapter.options): they are the "
                            f"base's, one set per model, which peft does not share between adapters. {instead}, or train it "
                            "again without adapter.options bias (adapter.options={lora_bias: true} trains a bias of the "
                            "adapter's own).")


def check_adalora_name(name: str, config: dict) -> None:
    """peft finds an AdaLoRA adapter's pruned layers by `name in path` over its rank_pattern's module paths: a name that
    is part of one ('y' of 'query') cut the path wrong, and loading failed with an AttributeError inside peft."""
    if config.get("peft_type") == "ADALORA" and (path := next((k for k in config.get("rank_pattern") or {} if name in k), None)):
        raise ArtifactError(f"adapter name {name!r}: peft finds an AdaLoRA adapter's layers by looking for its name in their "
                            f"module paths, and {name!r} is part of one ({path}), which it would misread. Name it a word that "
                            f"is no part of the model's module paths, e.g. {{{'adapter_' + name!r}: ...}}.")


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
