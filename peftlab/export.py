"""Self-describing artifacts: adapter (safetensors) + tokenizer + resolved recipe + versions + metrics; merge.

Layout of an output directory OUT:
    adapter_config.json, adapter_model.safetensors   (lora)   | config.json, model.safetensors (full, frozen)
    tokenizer files, recipe.yaml (resolved), run.json (versions, hardware, params, timings), metrics.json,
    eval_report.json (per-class), predictions-SPLIT.jsonl (every row scored), log.jsonl, checkpoints/step-N/, merged/
Every file is written to a staging folder and moved into place with os.replace, so a crash never leaves a
half-written artifact where a complete one is expected. The folder itself (lock, --overwrite staging, checkpoints,
checksums) belongs to peftlab/rundir.py.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import logging
import os
import platform
import re
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from .accel import cpu_native_bf16
from .bases import base_path, file_lock, gguf_key, load_tokenizer, relative_path
from .config import Recipe, load_recipe, override_list, recipe_argument
from .errors import ArtifactError, ConfigError, ModelNotFound, a_or_an, path_argument
from .methods import get_method
from .model import disable_cpu_bf16_repack, head_from_adapter, keep_original_modules, load_base
from .rundir import (
    RECIPE_FILE,
    RECORD_FILE,
    RUN_FILES,
    RunRecord,
    check_same_folder,
    folder_identity,
    from_run_lineage,
    fsync_dir,
    json_text,
    read_run,
    record_weights,
    sha256,
    umask,
    write_record,
)
from .tasks import get_task

log = logging.getLogger(__name__)

LIBRARIES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "evaluate", "safetensors", "peftlab")


# ------------------------------------------------------------------------------------------- atomic writing

def _fsync_tree(path: Path) -> None:
    """fsync every file, and give it the usual permissions: safetensors (0.8) and mkstemp create files 0600."""
    mode = 0o666 & ~umask()
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if p.is_file() and not p.is_symlink():
            with open(p, "rb") as f:
                os.fchmod(f.fileno(), mode)
                os.fsync(f.fileno())


@contextmanager
def disk_errors(what: str, target: Path, again: str | Callable[[], str] = "run the command again"):
    """Turn 'disk full' / 'permission denied' while writing into an error that says nothing was replaced; `again`: what
    to do once there is space (a callable: worked out only when the disk is full)."""
    try:
        yield
    except Exception as e:  # (tokenizers and safetensors raise their own types: "... (os error 28)")
        code = e.errno if isinstance(e, OSError) else int(m[1]) if (m := re.search(r"\(os error (\d+)\)", str(e))) else None
        if code in (errno.ENOSPC, errno.EDQUOT):
            raise ArtifactError(f"disk full while writing the {what} to {target}. Nothing was replaced: what was there "
                                f"before is intact. Free space (`df -h {target.parent}`) and {again() if callable(again) else again}.") from None
        if code in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise ArtifactError(f"cannot write the {what} to {target}: {os.strerror(code)}. Choose a writable output_dir.") from None
        raise


def check_destination(path: Path, what: str, *, folder: bool) -> None:
    """One clear error before any work when `path` (a file or a `folder` to write) cannot be made: it lies under a file,
    or is a folder where a file goes. `what` names the flag, e.g. '--json'."""
    path = Path(path)
    if not folder and path.is_dir():
        raise ArtifactError(f"{what} {path} is a folder: give a file name, e.g. {what} {path / 'result.json'}.")
    probe = path.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ArtifactError(f"{what} {path} cannot be created: {probe} is a file. Choose another path.")


def check_swappable(final: Path, what: str) -> None:
    """One clear error, before any work, where write_atomic_dir cannot replace folder `final`: a file of its name was
    moved aside to the hidden .old-NAME (silently), where it made every later write crash ('Not a directory')."""
    old = final.parent / f".old-{final.name}"
    for path in (final, old):
        if path.is_file() or path.is_symlink():
            kind = "a link" if path.is_symlink() else "a file"
            if path == final:
                raise ArtifactError(f"{final} is {kind}: the {what} goes into a folder of that name. Move it out of "
                                    f"{final.parent} (or rename it), then run again.")
            raise ArtifactError(f"{old} is {kind}, not what an interrupted write of {final} leaves: most likely yours, once at "
                                f"{final} and moved aside by an earlier write of the {what}. Move it out of {final.parent} "
                                f"(e.g. mv {old} {final.parent / (final.name + '.file')}), then run again.")


def write_atomic_dir(final: Path, fill: Callable[[Path], None], *, main: bool = True, again: str | Callable[[], str] = "run the command again") -> None:
    """Fill a staging directory beside `final`, fsync it, then swap it in (final -> .old-NAME, staging -> final, the old
    one removed; what a process killed mid-swap left is recovered first). Non-main ranks only take part in `fill`
    (collective saves need every rank). `again`: what a disk-full error says to do once there is space."""
    tmp, old = final.parent / f".tmp-{final.name}", final.parent / f".old-{final.name}"
    if main:
        check_swappable(final, final.name)  # (the callers check it before their work: a file there is not replaced)
    if main and old.exists():  # a process killed during an earlier swap (every later one failed on it: 'Directory not empty')
        if final.exists():  # killed after the swap, before the clean-up
            shutil.rmtree(old)
        else:  # killed between the two renames: the previous result back in place first
            os.replace(old, final)
    try:
        with disk_errors(final.name, final, again):
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            fill(tmp)
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not main:
        return
    _fsync_tree(tmp)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def move_into(staging: Path, out: Path) -> None:
    """Move every file of `staging` into `out`, one atomic rename each; recipe.yaml and run.json, which make the folder
    a finished run, last, once the others are there for good: a run stopped between two renames is not taken for a
    finished one that lacks its tokenizer."""
    _fsync_tree(staging)
    files = sorted(staging.iterdir(), key=lambda p: (p.name in RUN_FILES, p.name == RECORD_FILE, p.name))
    synced = False
    for p in files:
        if p.name in RUN_FILES and not synced:  # the others' renames on disk first
            fsync_dir(out)
            synced = True
        os.replace(p, out / p.name)


# --------------------------------------------------------------------------------------------------- export

def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def cpu_model() -> str | None:
    """The CPU's model name (Linux /proc/cpuinfo; platform.processor() elsewhere), or None."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def hardware() -> dict:
    """The machine a figure was measured on: CPU model and whether its matmuls run bf16 natively (4-20x apart between
    hosts, README), cores, threads, the GPU."""
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu_model(),
            "cpu_native_bf16": cpu_native_bf16(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def weights_file(out: Path) -> Path:
    for name in ("adapter_model.safetensors", "model.safetensors"):
        if (out / name).is_file():
            return out / name
    raise ArtifactError(f"{out}: no adapter_model.safetensors or model.safetensors. Is this a peftlab output directory? "
                        f"Train one with `peftlab train RECIPE`.")


def predictions_jsonl(rows: list[dict]) -> str:
    return "".join(json_text(r, ensure_ascii=False) + "\n" for r in rows)


def export(out: str | Path, model, tokenizer, recipe: Recipe, record: RunRecord | dict, metrics: dict, report: dict | None = None,
           state_dict: dict | None = None, predictions: dict[str, list[dict]] | None = None) -> RunRecord:
    """Write the trained weights and their description into `out` (main process only); run.json is `record` plus the
    library versions, the hardware and the weights' checksum (a dict of run.json entries is read as a RunRecord, for
    callers of the building blocks) -> that record, as written. `state_dict`: the full
    weights gathered from a sharded (FSDP / ZeRO-3) model; None = the model's own. `predictions`: {split: rows}, every
    scored row of the split, written as predictions-SPLIT.jsonl (prediction next to reference).

    A folder that already holds a run (its run.json) is refused: the new files would lie among the old run's (another
    method's weights beside its adapter_config.json, its predictions, log and merged/), and `load_trained` would load
    the old adapter. `run` exports into a new folder, or an --overwrite's empty staging one."""
    out, recipe = path_argument(out, "export(out)"), recipe_argument(recipe, "export")
    if (out / RECORD_FILE).is_file():
        raise ArtifactError(f"{out} already holds a run (its {RECORD_FILE}): exporting into it would mix the two runs' files, "
                            "and load_trained would load the old one's weights. Export into a new folder; to replace a "
                            "trained run, train it again with `peftlab train --overwrite` (run(..., overwrite=True)).")
    out.mkdir(parents=True, exist_ok=True)
    staging = out / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        with disk_errors("trained weights", out):
            model.eval()  # saved as evaluated: p_tuning saves its prompt encoder's output, which dropout samples in train mode
            method = get_method(recipe.adapter.method)
            if not method.is_adapter and method.pretrained and state_dict is None and recipe.quant.mode == "none":
                keep_original_modules(model, recipe)  # a full masked-LM run's pooler, as a merged run's (scratch: no pretrained weight)
            method.save(model, staging, state_dict)  # (PiSSA/OLoRA: converted to plain LoRA)
            (staging / "README.md").unlink(missing_ok=True)  # peft's placeholder card; `peftlab publish` writes the real one
            tokenizer.save_pretrained(str(staging))
            record = described(record if isinstance(record, RunRecord) else RunRecord.from_dict(record), recipe, model)
            record = replace(record, adapter_ranks=method.exported_ranks(staging))
            run = replace(record, versions=versions(), hardware=hardware(), **record_weights(staging, weights_file(staging).name))
            write_record(staging, recipe.to_yaml(), run)
            (staging / "metrics.json").write_text(json_text(metrics, indent=2), encoding="utf-8")
            if report is not None:
                (staging / "eval_report.json").write_text(json_text(report, indent=2), encoding="utf-8")
            for split, rows in (predictions or {}).items():
                (staging / f"predictions-{split}.jsonl").write_text(predictions_jsonl(rows), encoding="utf-8")
            move_into(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return run


def described(record: RunRecord, recipe: Recipe, model) -> RunRecord:
    """What a record from a caller of the building blocks may leave out and every reader needs (the method, the task,
    the base, a classifier's label names: without them its evaluation failed; a model.from_run's lineage: without it the
    card had no Lineage section and an evaluation did not notice that run trained again), from the recipe and the model."""
    labels, lineage = record.label_names, record.lineage
    if not lineage and recipe.model.from_run:
        lineage = from_run_lineage(recipe.model.from_run, *read_run(recipe.model.from_run))
    if not labels and get_task(recipe.task.type).target_kind == "label":
        config = getattr(model, "config", None)
        labels = list(recipe.data.label_names or (getattr(config, "id2label", None) or {}).values())
    return replace(record, method=record.method or recipe.adapter.method, task=record.task or recipe.task.type,
                   base_model=record.base_model or recipe.model.name, label_names=labels, lineage=lineage)


def load_trained(out: str | Path, *, dequantize: bool = False, recipe: Recipe | None = None, adapter_name: str = "default"):
    """Rebuild the trained model from an output directory -> (model in eval mode, tokenizer, recipe, RunRecord).

    `recipe` overrides the run's own (e.g. another model.name for the base); `dequantize=True` swaps a quantized base's
    layers for float copies of their dequantized weights before the
    adapter is attached (what merge needs: peft then builds plain LoRA layers that merge exactly)."""
    if recipe is not None and not isinstance(recipe, Recipe):  # (a path or a name: an AttributeError deep in rebuild)
        raise ConfigError([f"load_trained(recipe={type(recipe).__name__} {recipe!r:.80}): give a Recipe (load_recipe(...), e.g. the "
                           "run's own from read_run(out) with model.name changed), or None for the run's own."], what="argument")
    saved, run = read_run(path_argument(out, "load_trained(out)"))
    recipe = recipe or saved
    model, tokenizer = rebuild(out, recipe, run, dequantize=dequantize, adapter_name=adapter_name)
    return model, tokenizer, recipe, run


def rebuild(out: str | Path, recipe: Recipe, run: RunRecord, *, dequantize: bool = False, adapter_name: str = "default",
            precision: str | None = None):
    """The model (eval mode) and tokenizer of run `out`, whose record `read_run` already gave -> (model, tokenizer).
    `precision`: the base's (its dtype, a quantized base's compute dtype); None = the run's own."""
    from peft import PeftModel

    out = Path(out)
    task = get_task(recipe.task.type)
    if hasattr(task, "refuse_loading"):  # a multi-task run: its models are its tasks' runs (OUT/tasks/NAME)
        raise task.refuse_loading(out, run)
    tokenizer = load_tokenizer(str(out), recipe)
    labels = run.label_names
    if (out / "adapter_config.json").is_file():
        check_source_unchanged(out, recipe, run)
        try:
            with head_from_adapter():  # the new head's load report: the adapter brings the trained one
                base, head = load_base(recipe, base_path(recipe), num_labels=len(labels), label_names=labels,
                                       precision=precision or run.precision, auto_cls=task.auto_model_class)
        except ModelNotFound as e:
            raise base_not_here(e, out, recipe, run) from None
        if dequantize and recipe.quant.mode != "none":
            # Merging LoRA into 4-bit weights re-quantizes the sum and rounds the update away (max logit error 0.17 on
            # MiniLM); merged into the dequantized weights it reproduces the adapter model's logits (1e-7).
            base = base.dequantize()
            base.is_loaded_in_4bit = base.is_loaded_in_8bit = False  # left set by transformers: peft's IA3 refused to merge
            log.info("base was quantized (%s): merging into a dequantized copy of it", recipe.quant.mode)
        base.config.pad_token_id = tokenizer.pad_token_id
        try:
            model = PeftModel.from_pretrained(base, str(out), adapter_name=adapter_name)
        except (ValueError, RuntimeError, KeyError) as e:  # another base (model.name=...): no such layers, other shapes
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            import peft

            raise ArtifactError(f"the adapter in {out} does not load onto {recipe.model.name} ({first}). It was trained on "
                                f"{run.base_model or 'another base'}: with another model.name, load it on that base (drop the "
                                "override, or point model.name at a copy of it); on that base, its adapter_config.json does "
                                f"not load with this peft ({peft.__version__}; run.json names the versions that wrote it).") from None
        get_method(run.method or recipe.adapter.method).loaded(model, adapter_name)  # e.g. AdaLoRA's eval-time attribute
        if unrestored := [h for h in head if not restored(model, h)]:  # (the load report quieted above would have said it)
            log.warning("%s: %s not in the base nor in the adapter: newly initialised (random), so the model does not predict "
                        "as trained. Train the run again with this peft.", out, ", ".join(unrestored))
    else:
        model = task.auto_model_class.from_pretrained(str(out), use_safetensors=True)
        disable_cpu_bf16_repack(model)  # a frozen run on a 4-bit base is saved 4-bit: its first no-grad forward would repack
    return model.eval(), tokenizer


def restored(model, head: str) -> bool:
    """Whether the adapter loaded into `model` brings head module `head` (peft's copy of it, or of a module holding it)."""
    from peft.utils import ModulesToSaveWrapper

    parts = head.split(".")
    held = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}  # the module and those holding it
    return any(isinstance(m, ModulesToSaveWrapper) and any(n == h or n.endswith("." + h) for h in held) for n, m in model.named_modules())


def base_not_here(e: ModelNotFound, out: Path, recipe: Recipe, run: RunRecord) -> ModelNotFound:
    """The base of run `out` not found: said for what it is where the run's record shows it (the hub advice of
    resolve_model_path was wrong for these)."""
    name = recipe.model.name
    if name == run.base_model and "model.name" in (run.published or {}).get("rewritten", {}).get(RECIPE_FILE, []):
        return ModelNotFound(f"{out} is a published adapter whose base was a local folder, named here by its folder name "
                             f"{name!r}: give your copy of that base with model.name=FOLDER (e.g. `peftlab eval {out} "
                             "model.name=FOLDER`).")
    if recipe.model.from_run is None and relative_path(name):
        return ModelNotFound(f"{e} The run's recipe names its base by a path relative to the folder it was trained from, "
                             f"and it is read from here ({Path.cwd()}): run this from that folder, or give model.name=PATH "
                             "to the base from here.")
    return e


def check_source_unchanged(out: Path, recipe: Recipe, run: RunRecord) -> None:
    """An adapter trained from model.from_run sits on that run's weights as they were: a source retrained since (same
    folder, other weights) would carry it silently to other results; so does a GGUF base replaced by another file of
    the same name. Refused, with the fix."""
    converted = Path(run.base_path or "")  # a GGUF base: the folder it was converted to, named by the file's sha256
    if converted.parent.name == "gguf" and (now := gguf_key(recipe)) is not None and now != converted.name:
        kept = (f" Its conversion is still at {converted}: model.name={converted} loads that base." if converted.is_dir()
                else "")
        raise ArtifactError(f"model.name={recipe.model.name!r} is another GGUF file (or tokenizer.json beside it) than the one "
                            f"{out} was trained on (sha256 "
                            f"{now[:12]}..., then {converted.name[:12]}...): the adapter would be scored or merged on another "
                            f"base. Put the earlier file back, or point model.name at a copy of it.{kept}")
    step = run.lineage[0] if run.lineage else {}
    recorded, source = step.get("weights_sha256"), recipe.model.from_run
    if not recorded or not source or not Path(source).is_dir() or Path(source).resolve() != Path(step.get("run", "")).resolve():
        return
    now = read_run(source)[1].weights_sha256
    if now != recorded:
        raise ArtifactError(f"model.from_run={source!r} holds other weights than the ones {out} was trained on (weights "
                            f"sha256 {str(now)[:12]}..., then {recorded[:12]}...): it was trained again since. This adapter "
                            "only fits the earlier weights: train this run again from the new ones, or point model.from_run "
                            "at a copy of the earlier run.")


MERGE_OVERRIDES = ("model.name", "model.revision")  # where the base is found: a published adapter of a local base


def merge(out: str | Path, *, force: bool = False, overrides: list[str] | tuple | str | dict = ()) -> Path:
    """Fold the adapter (any method but the prompt ones) into its base and write a standalone model to OUT/merged.
    Idempotent: a merged folder made from the same adapter weights is left as it is. `overrides`: model.name=FOLDER
    (and model.revision), where the recipe's base is not here (a published adapter names a local base by its folder
    name); one KEY=VALUE string, a list, or a mapping {KEY: value}, as load_recipe takes them."""
    out = path_argument(out, "merge(out)")
    identity = folder_identity(out)
    recipe, run, recipe_text = merge_source(out, overrides)
    metrics = (out / "metrics.json").read_bytes() if (out / "metrics.json").is_file() else None
    task = get_task(recipe.task.type)
    if hasattr(task, "refuse_loading"):  # a multi-task run: merge its tasks' runs (OUT/tasks/NAME)
        raise task.refuse_loading(out, run)
    if not (out / "adapter_config.json").is_file():
        log.info("%s holds a standalone model (method %s): nothing to merge, load it directly.", out, run.method)
        return out
    method = get_method(recipe.adapter.method)
    if not method.mergeable:
        raise ArtifactError(f"{out} holds {a_or_an(method.name)} adapter: {method.merge_refusal} Load it as it is: "
                            "PeftModel.from_pretrained(base, OUT), or `peftlab eval OUT`.")
    with merging(out):
        return _merge(out, recipe, run, recipe_text, metrics, identity, force)


def merge_source(out: Path, overrides: list[str] | tuple | str | dict = ()) -> tuple[Recipe, RunRecord, str]:
    """-> (recipe, run record, recipe text) a merge of run `out` uses: its own, with model.name/model.revision
    overrides (where its base is); the text names the base merged into."""
    recipe, run = read_run(out)
    overrides = override_list(overrides)  # one KEY=VALUE string, a list, or a mapping {KEY: value}
    if other := [o for o in overrides if o.split("=", 1)[0].strip() not in MERGE_OVERRIDES]:
        raise ArtifactError(f"merge takes {' and '.join(MERGE_OVERRIDES)} only (where its base is), not {', '.join(other)}: "
                            "the adapter is merged as it was trained.")
    recipe_text = (out / RECIPE_FILE).read_text(encoding="utf-8")
    if overrides:
        saved = recipe
        recipe = load_recipe(out / RECIPE_FILE, list(overrides), validate_files=False)
        if (recipe.model.name, recipe.model.revision) != (saved.model.name, saved.model.revision):
            recipe_text = recipe.to_yaml()  # the merged folder names the base it holds, not the recipe's
    return recipe, run, recipe_text


@contextmanager
def merging(out: Path):
    """One merge of a run at a time (two `peftlab merge`, or trainings starting from one model.from_run, crashed on each
    other's staging folder): the next waits, then finds the run merged."""
    lock = file_lock(out / ".merged.lock")
    try:
        lock.__enter__()
    except OSError as e:
        raise ArtifactError(f"cannot write the merged model into {out}: {e.strerror or e}. Copy the run folder somewhere "
                            "writable and merge the copy.") from None
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def _merge(out: Path, recipe, run, recipe_text: str, metrics: bytes | None, identity, force: bool) -> Path:
    target = out / "merged"
    check_swappable(target, "merged model")  # (a file OUT/merged was hidden in OUT/.old-merged, then every merge crashed)
    # a merge killed mid-write (kill -9) left its staging folder, gigabytes for an LLM; under the merge lock no other
    # merge is filling it, and a run merged already returned below before any merge removed it
    shutil.rmtree(out / f".tmp-{target.name}", ignore_errors=True)
    adapter_sha = sha256(out / "adapter_model.safetensors")
    base = {"name": recipe.model.name, "revision": recipe.model.revision}
    stamp = target / "merge.json"
    try:
        before = json.loads(stamp.read_text()) if stamp.is_file() else {}
    except ValueError:  # damaged: merged again
        before = {}
    if not force and before.get("adapter_sha256") == adapter_sha and before.get("base", base) == base:
        if not (damage := merge_damage(target)):  # (merged/model.safetensors deleted or damaged: it said 'nothing to do')
            log.info("%s is already merged from this adapter; nothing to do.", target)
            return target
        log.info("%s is merged from this adapter, but %s: merging again.", target, damage)
    if before.get("base", base) != base:
        log.info("%s holds a merge onto %s: merging onto %s replaces it.", target, before["base"]["name"], base["name"])
    check_merged_holds_only_merges(target)  # before the work: --force replaces the folder whole
    # in float32 (model.dtype auto: a bf16 run's base would be bf16, and rounding it would lose much of the update)
    model, tokenizer = rebuild(out, recipe, run, dequantize=True, precision="fp32")
    merged = merge_and_unload(model)
    merged.config.quantization_config = None
    if hasattr(merged, "hf_quantizer"):
        merged.hf_quantizer = None
    merged.is_quantized = False
    if recipe.quant.mode != "none":
        conv1d_layout(merged)
    keep_original_modules(merged, recipe)  # a masked-LM model's pooler: a classifier on this folder gets the original's

    def fill(tmp: Path) -> None:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        if metrics is not None:
            (tmp / "metrics.json").write_bytes(metrics)
        merged_run = replace(run, **record_weights(tmp, weights_file(tmp).name))  # the merged folder checks its own weights
        if base["name"] != run.base_model:  # model.name=FOLDER: the base this merge holds
            merged_run = replace(merged_run, base_model=base["name"], base_path=base_path(recipe))
        write_record(tmp, recipe_text, merged_run)
        (tmp / "merge.json").write_text(json.dumps({"adapter_sha256": adapter_sha, "base": base,
                                                    "base_quantization": recipe.quant.mode,
                                                    "merged_into": "dequantized float32 copy" if recipe.quant.mode != "none"
                                                    else "float32 base weights"}, indent=2))

    check_same_folder(out, identity, "merging it")
    write_atomic_dir(target, fill)
    log.debug("merged model written to %s", target)  # the callers say where (cli, the run summary)
    return target


def merge_damage(target: Path) -> str | None:
    """-> what is missing or damaged in a merged folder (its description, config, weights), else None. The weights are
    hashed against its run.json's record: a merged LLM is GBs in float32, read once per merge (about 1 s a GB)."""
    if missing := [f for f in (*RUN_FILES, "config.json") if not (target / f).is_file()]:
        return f"its {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing"
    try:
        record = json.loads((target / RECORD_FILE).read_text())
        name, recorded = record.get("weights_file") or "model.safetensors", record.get("weights_sha256")
    except (OSError, ValueError, AttributeError) as e:
        return f"its {RECORD_FILE} is damaged ({e})"
    weights = target / name
    if not weights.is_file():
        return f"its {name} is missing"
    if recorded and sha256(weights) != recorded:
        return f"its {name} differs from the sha256 its {RECORD_FILE} records (truncated or modified)"
    return None


def merge_and_unload(model):
    """peft's merge_and_unload, with each trained whole module (modules_to_save: a task head) put in place first.

    peft's generic unload (IA3, LoHa, LoKr, VeRA, OFT...; only LoRA has its own) gives the unwrapped head the wrapper's
    .weight, which a head that is not one Linear lacks (the MLM head's cls.predictions.transform: dense + LayerNorm):
    every such merge failed with an AttributeError after training. Put in place as peft's LoRA unload puts it, the
    trained copy (or the original module, where no adapter of the wrapper is active) is what the merged model holds; a
    copy that holds adapter layers itself is merged with the rest."""
    from peft.utils.other import ModulesToSaveWrapper

    wrappers = [(name, m) for name, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    for name, wrapper in wrappers:
        module = wrapper.modules_to_save[wrapper.active_adapter] if wrapper.active_adapters else wrapper.original_module
        model.set_submodule(name, module)
    return model.merge_and_unload()


# what a merge writes into OUT/merged, files only (the model, its tokenizer, its description; a GGUF copy with --gguf,
# and what a GGUF export killed mid-write left: .model-f16.gguf.PID.tmp)
MERGE_WRITES = ("config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json", "tokenizer*",
                "special_tokens_map.json", "vocab*", "merges.txt", "chat_template*", "added_tokens.json", "*.model",
                "metrics.json", "run.json", "recipe.yaml", "merge.json", "model-*.gguf", ".model-*.gguf.*.tmp")


def check_merged_holds_only_merges(target: Path) -> None:
    """A merge again (--force) replaces OUT/merged whole: refuse where it holds what a merge does not write, what
    `peftlab eval OUT/merged` wrote there or the user's, files or folders (a merge writes no folder: merged/notes/ was
    deleted silently); a GGUF copy is said to go."""
    if not target.is_dir():
        return
    entries = list(target.iterdir())
    files = [p for p in entries if p.is_file() and not p.is_symlink()]
    foreign = sorted([p.name for p in files if not any(fnmatch.fnmatch(p.name, g) for g in MERGE_WRITES)]
                     + [p.name + ("/" if p.is_dir() and not p.is_symlink() else "") for p in entries if p not in files])
    if foreign:
        raise ArtifactError(f"{target} holds files a merge does not write ({', '.join(foreign[:5])}"
                            f"{', ...' if len(foreign) > 5 else ''}: an evaluation's results, or yours), and merging again "
                            "replaces the folder whole. Move them out of it, then merge again.")
    for gguf in (p for p in files if fnmatch.fnmatch(p.name, "model-*.gguf")):
        log.info("%s is merged again: its %s goes with the old merge (merge --gguf writes one from the new).", target, gguf.name)


def conv1d_layout(model) -> None:
    """Dequantizing a bnb base makes every quantized layer an nn.Linear, (out, in), also where the architecture has
    transformers' Conv1D, (in, out) (GPT-2's c_attn, c_fc, c_proj): saved so, the merged folder did not load, and a
    square c_proj loaded transposed. Those layers are put back as Conv1D, their weight transposed."""
    import copy

    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):  # the architecture's own layers, without weights
        arch = type(model)._from_config(copy.deepcopy(model.config))
    for name, layer in arch.named_modules():
        linear = model.get_submodule(name) if isinstance(layer, Conv1D) else None
        if type(linear) is torch.nn.Linear:
            conv = Conv1D(linear.out_features, linear.in_features).to(linear.weight.device, linear.weight.dtype)
            conv.weight = torch.nn.Parameter(linear.weight.detach().T.contiguous(), requires_grad=False)
            conv.bias = torch.nn.Parameter(linear.bias.detach() if linear.bias is not None else torch.zeros_like(conv.bias),
                                           requires_grad=False)
            model.set_submodule(name, conv)
