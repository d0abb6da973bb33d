"""Adapter arithmetic: LoRA adapters of one base combined into one (peft's add_weighted_adapter), exported like a run.

A peer of `export.merge`: both turn finished runs into a new model folder; neither trains.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import replace
from fnmatch import fnmatch
from pathlib import Path

from .adapters import not_an_adapter, refuse_trained_biases
from .errors import ArtifactError, ConfigError, PeftlabError, a_or_an, path_argument
from .export import check_destination, rebuild, write_atomic_dir
from .rundir import (
    BASE_KEYS,
    LOG_FILE,
    RECIPE_FILE,
    RECORD_FILE,
    RunDir,
    adapter_config,
    base_as_loaded,
    differences,
    holds_run,
    read_run,
    sha256,
    write_record,
)

log = logging.getLogger(__name__)

COMBINATIONS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "cat", "svd")
COMPOSED_FILES = ("adapter_config.json", "adapter_model.safetensors", RECIPE_FILE, RECORD_FILE)  # and the tokenizer's files
PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")  # --density: the share of each task vector they keep
EACH_RANK = ("cat", "svd")  # the combinations that size each layer's factors from its sources' (rank_pattern composes)


def compose(outs: list[str | Path], weights: list[float], out: str | Path, *, method: str = "linear", density: float | None = None,
            seed: int = 0, rank: int | None = None, overwrite: bool = False) -> Path:
    """Combine LoRA adapters trained on one base into one adapter (peft's add_weighted_adapter), exported like a run.

    peft combines the LoRA matrices but refuses adapters that each save a task head (modules_to_save), so the
    adapters are loaded without their heads and the heads are summed with the same weights: for weights (1, 0, ...)
    and method linear the result computes the first adapter's function exactly (its tensors are rescaled). `svd`: the
    exact weighted sum of the adapters' updates, cut to its best rank-`rank` approximation (default: the largest source
    rank; the sum of the ranks keeps it exact). `overwrite`: replace an earlier composition in `out` (one that holds
    only what compose writes)."""
    import torch
    from peft import PeftConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    if not isinstance(outs, (list, tuple)) or not isinstance(weights, (list, tuple)):
        # (one folder's name was split into its characters; a number weight had no len)
        raise ConfigError([f"compose(outs={outs!r:.80}, weights={weights!r:.80}): give a list of two or more run folders and a "
                           "list of one weight per run, e.g. compose(['runs/a', 'runs/b'], [0.5, 0.5], 'runs/ab')."], what="argument")
    outs, out = [path_argument(o, f"compose(outs[{i}])") for i, o in enumerate(outs)], path_argument(out, "compose(out)")
    if len(outs) < 2 or len(weights) != len(outs):
        raise PeftlabError(f"compose needs two or more runs and one weight per run (got {len(outs)} run(s), {len(weights)} weight(s)).")
    if not all(math.isfinite(float(w)) for w in weights):
        raise PeftlabError(f"--weights {' '.join(map(str, weights))}: every weight must be a finite number, e.g. --weights 0.5 0.5.")
    if method not in COMBINATIONS:
        raise PeftlabError(f"--method {method!r}: use one of {', '.join(COMBINATIONS)}.")
    prunes = method in PRUNING
    if not prunes and density is not None:
        raise PeftlabError(f"--density prunes the task vectors of ties/dare methods; --method {method} does not prune. "
                           "Drop --density, or use e.g. --method ties.")
    if rank is not None and method != "svd":
        raise PeftlabError(f"--rank sets the rank of --method svd's result; --method {method} sets its own. Drop --rank, or use "
                           "--method svd.")
    if rank is not None and rank < 1:
        raise PeftlabError(f"--rank {rank}: the composed adapter's rank, at least 1 (the sum of the adapters' ranks keeps "
                           "their weighted sum exact).")
    if density is not None and not 0 < density <= 1:
        raise PeftlabError(f"--density {density}: the share of each adapter's values kept, in (0, 1]; e.g. --density 0.5.")
    if prunes and density is None:
        density = 0.5
    if out.resolve() in [o.resolve() for o in outs]:
        raise PeftlabError(f"--out {out} is one of the inputs; choose a new directory.")
    check_compose_target(out, overwrite)
    runs = [read_run(o) for o in outs]
    first_recipe, first_run = runs[0]
    configs = []  # each source's adapter_config.json
    for o, (r, info) in zip(outs, runs):
        if error := not_an_adapter(o, str(o), "only LoRA adapters compose"):
            raise error
        configs.append(cfg := adapter_config(o))
        if cfg.get("peft_type") != "LORA":
            raise PeftlabError(f"{o} holds {a_or_an(info.method)} {'adapter' if cfg else 'model'}, not a LoRA adapter: only "
                               "LoRA adapters (lora, rslora, ...) compose.")
        refuse_trained_biases(cfg, str(o), "Compose adapters that train none")
        if cfg.get("use_dora"):
            raise PeftlabError(f"{o} holds a DoRA adapter (use_dora): peft's add_weighted_adapter combines the LoRA matrices "
                               "but not DoRA's trained magnitude vectors, so the result would not be any of the adapters' "
                               "functions, not even with weights 1 0. Compose plain LoRA adapters (adapter.use_dora=false).")
        if method not in EACH_RANK and (ranks := {k: v for k, v in (cfg.get("rank_pattern") or {}).items() if v != cfg.get("r")}):
            raise PeftlabError(f"{o} holds a LoRA adapter with per-layer ranks (rank_pattern {ranks}, r {cfg.get('r')}): "
                               f"--method {method} adds the adapters' factors of equal shapes, and peft writes one rank for "
                               "all layers (it failed, or wrote an adapter that does not load). Use --method cat (the exact "
                               "weighted sum) or svd, which give every layer the ranks it needs.")
        if (theirs := _base_of(r, info)) != (mine := _base_of(first_recipe, first_run)):
            raise PeftlabError(f"{o} was trained on another base, task or label set than {outs[0]} "
                               f"({differences((*BASE_KEYS, 'task.type', 'labels'), mine, theirs)}): adapters compose only on "
                               "the same base model and labels.")
    trained, tokenizer = rebuild(outs[0], first_recipe, first_run)
    base = trained.unload()  # the plain base (its head is replaced below)
    states = [load_file(str(o / "adapter_model.safetensors")) for o in outs]
    heads = [_head_state(sd, cfg.get("modules_to_save")) for cfg, sd in zip(configs, states)]
    if any(h.keys() != heads[0].keys() or any(h[k].shape != heads[0][k].shape for k in h) for h in heads):
        raise PeftlabError("the adapters' task heads differ in shape or names: they cannot be combined.")
    saved_base = _base_state(outs, states, heads)
    model, names = None, [f"a{i}" for i in range(len(outs))]
    for name, o, sd, head in zip(names, outs, states, heads):
        cfg = PeftConfig.from_pretrained(str(o))
        cfg.modules_to_save, cfg.task_type = None, None  # LoRA matrices only: heads are combined below
        if model is None:
            model = get_peft_model(base, cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
        set_peft_model_state_dict(model, {k: v for k, v in sd.items() if k not in head}, adapter_name=name)
    if rank is not None:  # peft cuts each layer's factors at its own size, but records `rank` for all: unloadable
        from peft.tuners.lora import LoraLayer

        # (the layer's own sizes: a 4-bit base's weight is packed, its shape (n, 1), which refused every --rank above 1)
        sizes = {name: min(m.in_features, m.out_features) for name, m in model.named_modules() if isinstance(m, LoraLayer)}
        if rank > (smallest := min(sizes.values())):
            layer = min(sizes, key=sizes.get)
            raise PeftlabError(f"--rank {rank}: above the size of the smallest adapted layer ({layer}: {smallest}), which no "
                               f"rank can exceed. Use --rank {smallest} or less (that layer's update is exact at its size).")
    torch.manual_seed(seed)  # dare_* prune at random
    try:
        model.add_weighted_adapter(names, [float(w) for w in weights], "composed", combination_type=method, density=density,
                                   svd_rank=rank)
    except ValueError as e:
        raise PeftlabError(f"peft cannot combine these adapters with {method}: {e}") from None
    if method == "cat":
        _stack_in_sources_dtype(model, names, weights, "composed")
    lora = get_peft_model_state_dict(model, adapter_name="composed")  # (with the base embedding again, when adapted)
    lora |= (biases := _lora_biases(model, names, weights))
    head = {k: sum(float(w) * h[k].float() for w, h in zip(weights, heads)).to(heads[0][k].dtype).contiguous() for k in heads[0]}
    composed_cfg = model.peft_config["composed"]
    config = PeftConfig.from_pretrained(str(outs[0]))  # task type and saved head of the originals
    config.r, config.lora_alpha, config.target_modules = composed_cfg.r, composed_cfg.lora_alpha, composed_cfg.target_modules
    config.rank_pattern, config.alpha_pattern = {}, {}
    config.lora_bias = bool(biases)
    config.use_rslora = False  # the combined tensors hold their sources' scalings: alpha = r scales them by 1, as peft
    # meant (rsLoRA would scale them again, by alpha / sqrt(r), and weights 1 0 would no longer give the first adapter)
    sources = [{"name": recipe.name, "path": str(o), "weights_sha256": sha256(o / "adapter_model.safetensors"), "steps": info.steps,
                "exported_step": info.best_step if info.selected_on else info.steps} for o, (recipe, info) in zip(outs, runs)]

    def fill(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in {**lora, **saved_base, **head}.items()}, str(tmp / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        info = replace(first_run, metrics={}, history=[], selected_on=None, best_step=None,
                       weights_sha256=sha256(tmp / "adapter_model.safetensors"),
                       composition={"method": method, "weights": [float(w) for w in weights], "density": density, "seed": seed,
                                    **({"rank": composed_cfg.r} if method == "svd" else {}),
                                    "sources": sources, "note": "recipe.yaml and the training record are the first source's; "
                                    "task heads summed with the same weights; not evaluated yet: run `peftlab eval` on this folder"})
        write_record(tmp, (outs[0] / RECIPE_FILE).read_text(encoding="utf-8"), info)

    out.parent.mkdir(parents=True, exist_ok=True)
    with RunDir(out).lock():  # a second compose (or training) into the same folder is refused, not interleaved
        write_atomic_dir(out, fill)
    log.info("composed %s (%s, weights %s) -> %s", ", ".join(map(str, outs)), method, weights, out)
    return out


def _base_of(recipe, run) -> tuple:
    """What an adapter sits on (rundir.base_as_loaded) and predicts: the task and the labels."""
    return (*base_as_loaded(recipe, run), recipe.task.type, run.label_names)


def check_compose_target(out: Path, overwrite: bool = False) -> None:
    """--out may be new, empty, or (with --overwrite) an earlier composition that holds only what compose writes (it is
    replaced whole); never a trained run or someone's folder. Checked before any model is loaded."""
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"--out {out} is a file. Choose a new directory: --out DIR.")
    check_destination(out, "--out", folder=True)
    if not out.is_dir() or not any(out.iterdir()):
        return
    try:
        earlier = "composition" in json.loads((out / RECORD_FILE).read_text()) and not (out / LOG_FILE).exists()
    except (OSError, ValueError):
        earlier = False
    if not earlier:
        what = "a peftlab run" if holds_run(out) else "files that are not a composed adapter"
        raise PeftlabError(f"--out {out} holds {what}: compose would replace it. Choose a new directory (--out DIR), or "
                           "delete it first if you mean to replace it.")
    if not overwrite:
        raise ArtifactError(f"--out {out} holds an earlier composition: compose would replace it. Pass --overwrite "
                            "(overwrite=True) to replace it, or choose a new directory: --out DIR.")
    if other := sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir() if not _composed_file(p)):
        raise ArtifactError(f"--out {out} holds files compose does not write ({', '.join(other)}): replacing the earlier "
                            "composition would delete them. Move them out of the folder, or choose a new directory: --out DIR.")


def _composed_file(path: Path) -> bool:
    """A file compose writes: the adapter, its record and the tokenizer's files (not an eval's results, a card, notes)."""
    from .publish.destinations import TOKENIZER_GLOBS

    return path.is_file() and (path.name in COMPOSED_FILES or any(fnmatch(path.name, g) for g in TOKENIZER_GLOBS))


LORA_TENSOR = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\b")  # a saved LoRA tensor's name


def _stack_in_sources_dtype(model, names: list[str], weights: list[float], composed: str) -> None:
    """cat's factors stacked again as peft stacks them (A_i scaled by w_i scaling_i, B_i as they are, zeros where a layer
    has fewer), in the sources' dtype: peft writes them in place into the adapter it made in the base layer's dtype (a
    4-bit base's compute dtype, a bf16 base's), so on such a base the exact weighted sum was rounded to bfloat16 (weights
    1 0: the first adapter's update 0.4% off) and saved so."""
    import torch
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for a, b in (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B")):
            factors_a, factors_b = getattr(module, a), getattr(module, b)
            if composed not in factors_a:
                continue
            tensor = (lambda d, n: d[n].weight) if a == "lora_A" else (lambda d, n: d[n])  # noqa: E731  (embeddings: Parameters)
            used = [(n, float(w)) for n, w in zip(names, weights) if n in factors_a]
            stacked_a = torch.cat([tensor(factors_a, n).detach() * w * module.scaling[n] for n, w in used], 0)
            stacked_b = torch.cat([tensor(factors_b, n).detach() for n, _ in used], 1)
            target_a, target_b = tensor(factors_a, composed), tensor(factors_b, composed)
            target_a.data = stacked_a.new_zeros(target_a.shape)
            target_b.data = stacked_b.new_zeros(target_b.shape)
            target_a.data[: stacked_a.shape[0], :] = stacked_a
            target_b.data[:, : stacked_b.shape[1]] = stacked_b


def _lora_biases(model, names: list[str], weights: list[float]) -> dict:
    """The composed adapter's lora_B biases (adapter.options lora_bias), which peft's add_weighted_adapter left at zero: a
    layer adds scaling * (B A x + b), so the weighted sum of the sources' updates carries sum w_i scaling_i b_i, which
    the composed adapter (scaling 1: lora_alpha = r) holds as its bias. Exact for cat (weights 1 0 give back the first
    adapter with any method); {} when no source trained one."""
    from peft.tuners.lora import LoraLayer

    biases = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer):
            terms = [float(w) * module.scaling[n] * module.lora_B[n].bias.detach() for n, w in zip(names, weights)
                     if n in module.lora_B and getattr(module.lora_B[n], "bias", None) is not None]
            if terms:
                biases[f"{path}.lora_B.bias"] = sum(terms)
    return biases


def _head_state(state: dict, modules_to_save: list[str] | None) -> dict:
    """The saved tensors of the fully trained task head: those of peft's modules_to_save (e.g. classifier, score)."""
    heads = [re.compile(rf"(^|\.){re.escape(m)}\.") for m in modules_to_save or ()]
    return {k: v for k, v in state.items() if not LORA_TENSOR.search(k) and any(h.search(k) for h in heads)}


def _base_state(outs: list[Path], states: list[dict], heads: list[dict]) -> dict:
    """The base's own tensors that peft saves beside an adapter (the whole embedding when it adapts one:
    embed_tokens.base_layer.weight), which are neither LoRA's nor a head's: the base W0 of W0 + sum w_i dW_i, kept once,
    never weighted (weights 1 1 doubled the base embedding, 1 -1 zeroed it). Sources that save different ones are refused."""
    import torch

    bases = [{k: v for k, v in sd.items() if not LORA_TENSOR.search(k) and k not in head} for sd, head in zip(states, heads)]
    for o, base in zip(outs[1:], bases[1:]):
        if differ := sorted(set(base) ^ set(bases[0]) | {k for k in base.keys() & bases[0].keys()
                                                          if not torch.equal(base[k], bases[0][k])}):
            raise PeftlabError(f"{o} saves other base weights than {outs[0]} beside its adapter ({', '.join(differ[:3])}; peft "
                               "saves an adapted embedding whole): their adapters sit on different bases (a resized or "
                               "retrained embedding), and compose adds updates to one base. Compose adapters saved over the "
                               "same base weights.")
    return bases[0]
