"""Knowledge distillation (`train.distill`): a student learns from a finished run's soft targets.

    loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

CE is the mean over the labelled rows of a batch, KL the mean over all of its rows; rows of `train.distill.unlabelled`
carry the label -100, so they add to the KL term only. The teacher is any finished run of task.type classification
(a head) or verbalizer (an LLM scoring each class's label word: those log-likelihoods are its class logits), on any
base and tokenizer: its logits come from each row's raw text through its own tokenizer and task, computed once before
training (`add_soft_targets`; kept by text in $PEFTLAB_CACHE/soft-targets, so the next student of the same teacher
skips the rows already scored: train.distill.cache), kept with the rows as a `teacher_logits` column (rows x classes
floats: 0.5 MB for all of SST-2, so they always fit and no on-the-fly path is needed), and the teacher is freed before
the student is built.
The student is a classification (any base and method; a smaller one with model.num_layers). run.json's `distillation`
and the model card name the teacher, and how often its argmax agrees with the labels (warned about where they contradict
each other: integer labels in another order than the teacher's classes).
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .accel import FrozenWeightsCast, half_dtype, progress_shown
from .config import DistillConfig, Recipe
from .errors import PeftlabError
from .rundir import read_run

log = logging.getLogger(__name__)

TEACHER_TASKS = ("classification", "verbalizer")
NOT_MODEL_INPUTS = ("labels", "teacher_logits")


# ------------------------------------------------------------------------------------------- before any work

def check(recipe: Recipe) -> list[str]:
    """The teacher against the student, before the run folder is touched -> every problem found. A student whose
    data.label_names is null takes the teacher's (its soft targets are in the teacher's class order; recipe.yaml
    records them)."""
    k = recipe.train.distill
    where = f"train.distill.teacher={k.teacher!r}"
    if not (Path(k.teacher) / "run.json").is_file():
        return [f"{where}: no finished run there (no run.json). Train the teacher first (peftlab train TEACHER_RECIPE, its "
                "output_dir there), or fix the path."]
    try:
        teacher_recipe, teacher = read_run(k.teacher)
    except PeftlabError as e:
        return [f"{where}: {e}"]
    if teacher.task == "multitask":  # (its labels and data are per task: nothing else to compare)
        tasks = (teacher.multitask or {}).get("tasks") or ["NAME"]
        return [f"{where} is a multi-task run: its models are per task. Distill from one of them, e.g. "
                f"train.distill.teacher={Path(k.teacher) / 'tasks' / tasks[0]}."]
    problems = []
    if teacher.task not in TEACHER_TASKS:  # (its label names, if any, are no classes to compare: a clm run has none)
        return [f"{where} is a task.type {teacher.task} run: a teacher must be one of {', '.join(TEACHER_TASKS)} (its class "
                "logits are the soft targets). Distill from a classifier of the same classes."]
    if teacher_recipe.data.text_pair:
        problems.append(f"{where} was trained on sentence pairs (data.text_pair=true): it would score each row's columns "
                        "joined into one text, which is not what it learnt. Distill from a teacher trained on single texts.")
    names = recipe.data.label_names
    if names is not None and list(names) != list(teacher.label_names):
        problems.append(f"{where} has the label names {teacher.label_names}, the student data.label_names={list(names)}: the "
                        f"soft targets are the teacher's classes in its order. Set data.label_names={teacher.label_names} "
                        "(map raw values with data.train.label_map), or distill from a teacher of these classes.")
    if names is None and not problems:
        recipe.data.label_names = list(teacher.label_names)
        recipe.data._label_names_from = k.teacher  # (data.load_splits: integer codes are read in the teacher's order)
    if missing_base := teacher_base_problem(Path(k.teacher), teacher_recipe, teacher):
        problems.append(f"{where}: {missing_base}")
    return problems


def teacher_base_problem(teacher: Path, teacher_recipe: Recipe, record) -> str | None:
    """Why an adapter teacher's base cannot be loaded here (its run's model.name folder removed, a published adapter
    naming a local base by its folder name), in the teacher's terms and with its ways out; None for a standalone
    teacher (fully trained, or merged), which holds all its weights. Checked with the teacher, before the run folder is
    touched: the teacher's pass met it only after the run lock, and the loader's message named model.name, the
    student's own key. A GGUF base is found, not converted."""
    from .bases import base_path, gguf_source, relative_path
    from .errors import ModelNotFound
    from .rundir import RECIPE_FILE

    if not (teacher / "adapter_config.json").is_file():
        return None
    m = teacher_recipe.model
    try:
        if m.from_run is not None or gguf_source(m.name) is None:
            base_path(teacher_recipe)
        return None
    except ModelNotFound as e:  # (a hub id out of reach too)
        cause = str(e).split(". ")[0].rstrip(".")
    if "model.name" in (record.published or {}).get("rewritten", {}).get(RECIPE_FILE, []):
        cause += " (a published adapter: its recipe.yaml names the local folder of its base by the folder's name)"
    elif m.from_run is None and relative_path(m.name):
        cause += f" (a path relative to the folder the teacher was trained from, read from here: {Path.cwd()})"
    merged = teacher / "merged"
    standalone = (f"distill from its merged model: train.distill.teacher={merged}" if (merged / "run.json").is_file() else
                  f"make it standalone, `peftlab merge {teacher} model.name=FOLDER` (FOLDER: a copy of its base), and distill "
                  f"from that: train.distill.teacher={merged}")
    return (f"this teacher is an adapter whose base cannot be loaded here: the teacher's {cause}. Put that base back where "
            f"the teacher's recipe.yaml names it, or {standalone}.")


# ------------------------------------------------------------------------------------------- the teacher pass

def add_soft_targets(recipe: Recipe, splits: dict, device) -> tuple[dict, dict]:
    """The train split + train.distill.unlabelled rows (label -100), each with the teacher's logits as a `teacher_logits`
    column -> (splits, run.json's `distillation` entry). The teacher is loaded (only for rows the soft-target cache
    does not hold), run once and freed; the seed is set again after it, so the student starts as it would without a
    teacher."""
    from accelerate.utils import set_seed

    k = recipe.train.distill
    train = splits["train"]
    labelled, labels = len(train), torch.tensor(train["label"], dtype=torch.long)
    if k.unlabelled is not None:
        train = with_unlabelled(train, recipe)
    start = time.perf_counter()
    logits, from_cache = cached_teacher_logits(Path(k.teacher), train["text"], device=device,
                                               batch_size=k.batch_size, cache=k.cache)
    seconds = time.perf_counter() - start
    set_seed(recipe.train.seed)
    splits = {**splits, "train": train.add_column("teacher_logits", logits.tolist())}
    _, teacher = read_run(k.teacher)
    agreement = teacher_agreement(logits[:labelled], labels, list(teacher.label_names), k.teacher)
    u = k.unlabelled
    entry = {"teacher": str(Path(k.teacher).resolve()), "name": teacher.name, "task": teacher.task, "method": teacher.method,
             "base_model": teacher.base_model, "weights_sha256": teacher.weights_sha256, "metrics": teacher.metrics,
             "selected_on": teacher.selected_on, **({"multitask": teacher.multitask} if teacher.multitask else {}),
             "temperature": k.temperature,
             "alpha": k.alpha, "soft_target_rows": len(train), "labelled_rows": labelled, "unlabelled_rows": len(train) - labelled,
             "unlabelled": u and (u.path or f"{recipe.data.dataset}:{u.split}"), "teacher_seconds": round(seconds, 2),
             "soft_targets_from_cache": from_cache, "teacher_agreement": agreement}
    log.info("teacher %s: soft targets for %s rows (%s unlabelled; %s from the cache) in %.1fs; its argmax agrees with the "
             "labels of %s of the labelled rows", teacher.name, f"{len(train):,}", f"{len(train) - labelled:,}",
             f"{from_cache:,}", seconds, "none" if agreement is None else f"{agreement:.1%}")
    return splits, entry


def teacher_agreement(logits: torch.Tensor, labels: torch.Tensor, names: list[str], teacher: str) -> float | None:
    """The share of labelled rows whose label is the teacher's argmax (None without labelled rows), warned about where
    the two contradict each other: at or below chance (1 / classes), or each class's rows mostly another single class
    of the teacher's (a swapped label order). Nothing else catches that: integer labels are read as positions in the
    teacher's label names, so data whose codes are in another order trains against its own soft targets, silently."""
    if not len(labels):
        return None
    predicted = logits.argmax(-1)
    agreement = (predicted == labels).float().mean().item()
    classes = logits.shape[1]
    counts = torch.zeros(classes, classes, dtype=torch.long).index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
    present = [i for i in range(classes) if counts[i].sum() > 0]
    mostly = {i: int(counts[i].argmax()) for i in present}
    relabelled = len(present) > 1 and len(set(mostly.values())) == len(present) and any(i != j for i, j in mostly.items())
    if agreement > 1 / classes and not relabelled:
        return round(agreement, 4)
    from .data import yaml_scalar

    order = (f" Integer labels are read as positions in data.label_names (when it is null, the teacher's: {names}), so "
             "codes in another order than the teacher's contradict its soft targets on every row.")
    if relabelled:
        moved = "; ".join(f"rows labelled {names[i]!r} are mostly its {names[j]!r} ({counts[i, j] / counts[i].sum():.0%})"
                          for i, j in mostly.items() if i != j)
        codes = "{" + ", ".join(f"{i}: {yaml_scalar(names[j])}" for i, j in mostly.items()) + "}"
        why = (f": {moved}, a label order that is not the teacher's.{order} If the values are such codes, map them onto "
               f"the teacher's classes: data.train.label_map={codes} (the same on data.eval/data.test).")
    else:
        why = (f": the labels and the soft targets contradict each other. The likely cause is a label order that is not "
               f"the teacher's.{order} Map this data's values onto the teacher's classes with data.train.label_map (the "
               "same on data.eval/data.test). Else the teacher learnt little (its metrics are in its run.json) or other "
               "classes than these: distill from a better one.")
    log.warning("train.distill.teacher=%s: its argmax agrees with the labels of only %.1f%% of the %s labelled training "
                "rows (chance: %.1f%%)%s", teacher, 100 * agreement, f"{len(labels):,}", 100 / classes, why)
    return round(agreement, 4)


def soft_target_file(teacher: Path, device) -> Path:
    """The cache file of `teacher`'s logits: keyed by its run.json (which records its weights' checksum, so a teacher
    trained again is another file) and the device type."""
    import hashlib

    from .bases import cache_root

    h = hashlib.sha256((Path(teacher) / "run.json").read_bytes())
    h.update(torch.device(device or "cpu").type.encode())
    return cache_root("soft-targets") / f"{h.hexdigest()[:32]}.safetensors"


def cached_teacher_logits(teacher: Path, texts: list[str], *, device=None, batch_size: int = 64,
                          cache: bool = True) -> tuple[torch.Tensor, int]:
    """teacher_logits, by text through the soft-target cache (train.distill.cache): rows whose text the cache holds
    for this teacher are read, only the others go through the teacher (not loaded at all when none is missing), and
    are added -> (logits in the order of `texts`, how many rows came from the cache). Any subset or order of rows
    reuses it (another hold-out split, 10% of the rows, unlabelled rows added). A low-precision teacher's logits may
    differ in the last bits from a fresh pass (other batch neighbours, other padding). The cache is a speed-up only: a
    file that does not read is replaced, one that cannot be written is warned about."""
    import hashlib

    from safetensors.torch import load_file, save_file

    keys = [hashlib.blake2b(t.encode("utf-8"), digest_size=16).digest() for t in texts]
    path = soft_target_file(teacher, device) if cache else None
    known_keys, known = torch.empty(0, 16, dtype=torch.uint8), None
    if path is not None and path.is_file():
        try:
            stored = load_file(path)
            known_keys, known = stored["texts"], stored["logits"]
        except Exception as e:
            log.warning("soft-target cache %s does not read (%s): it is made again", path, e)
    where = {bytes(k): i for i, k in enumerate(known_keys.numpy())}
    hit = [where.get(k) for k in keys]
    missing = [i for i, j in enumerate(hit) if j is None]
    run_teacher = missing or known is None  # (no rows and nothing cached: the teacher says how many classes)
    new = teacher_logits(teacher, [texts[i] for i in missing], device=device, batch_size=batch_size) if run_teacher else None
    classes = (new if new is not None else known).shape[1]
    out = torch.empty(len(texts), classes)
    rows = [i for i, j in enumerate(hit) if j is not None]
    if rows:
        out[rows] = known[[hit[i] for i in rows]]
    if missing:
        out[missing] = new
    if path is not None and missing:
        first = {keys[i]: i for i in missing}  # a text twice in the rows: kept once
        add_keys = torch.frombuffer(bytearray(b"".join(first)), dtype=torch.uint8).view(-1, 16)
        add = out[list(first.values())]
        staged = path.with_name(f".{path.name}.{os.getpid()}.partial")  # two students at once: the last one's file
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"texts": torch.cat([known_keys, add_keys]),
                       "logits": add if known is None else torch.cat([known, add])},
                      staged, metadata={"teacher": str(Path(teacher).resolve())})
            staged.replace(path)
        except BaseException as e:  # (a Ctrl-C or SIGTERM while it was written, too)
            if staged.is_file():
                staged.unlink()
            if not isinstance(e, OSError):
                raise
            log.warning("soft-target cache not written (%s): set PEFTLAB_CACHE to a writable folder, or "
                        "train.distill.cache=false", e)
    return out, len(rows)


def with_unlabelled(train, recipe: Recipe):
    """train + the rows of train.distill.unlabelled (read as data.train is: columns, max_samples), labelled -100."""
    from datasets import concatenate_datasets

    from .data import normalize_split, read_split

    spec, where = recipe.train.distill.unlabelled, "train.distill.unlabelled"
    extra = normalize_split(read_split(spec, recipe.data, where), spec, recipe.data, where, recipe.data_seed, unlabelled=True)
    extra = extra.add_column("label", [-100] * len(extra)).add_column("row", [-1] * len(extra))  # (no predictions: never evaluated)
    return concatenate_datasets([train, extra.cast(train.features)])  # csv reads large_string, json string: one type


@torch.no_grad()
def teacher_logits(teacher: Path, texts: list[str], *, device=None, batch_size: int = 64) -> torch.Tensor:
    """(rows, classes) float32 logits of the finished run `teacher` on `texts`, in their order: each text through the
    teacher's own tokenizer and task (a verbalizer's label-word log-likelihoods), at its own max_length and precision.
    Rows run longest first (little padding); the teacher is freed afterwards."""
    from .export import load_trained
    from .tasks import get_task

    model, tokenizer, recipe, run = load_trained(teacher)
    model.requires_grad_(False)  # scored, never trained: a fully fine-tuned teacher's weights are frozen too (cast below)
    device = torch.device(device or "cpu")
    if device.type != "cpu" and run.quantization == "none":
        model.to(device)
    dtype = half_dtype(run.precision or "")
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    cast = FrozenWeightsCast(model, dtype if recipe.train.cast_frozen else None)  # its weights cast once, not per batch
    out = torch.empty(len(texts), len(run.label_names))
    bar = tqdm(total=len(texts), desc="teacher", unit="row", dynamic_ncols=True, disable=not progress_shown())
    with autocast, cast:
        if run.task == "verbalizer":
            from .tasks.verbalizer import label_token_ids, prompt_ids, score_words

            words = label_token_ids(tokenizer, recipe, run.label_names)
            prompts, _ = prompt_ids(tokenizer, recipe, list(texts))
            order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
            for s in range(0, len(order), batch_size):
                rows = order[s:s + batch_size]
                out[rows] = score_words(model, [prompts[i] for i in rows], words, tokenizer.pad_token_id).float().cpu()
                bar.update(len(rows))
        else:
            from datasets import Dataset
            from torch.utils.data import DataLoader

            from .data import longest_first

            task = get_task(run.task)
            ds = Dataset.from_dict({"text": list(texts), "label": [0] * len(texts), "row": list(range(len(texts)))})
            ds = longest_first(task.tokenize(ds, tokenizer, recipe))
            order = ds["row"]
            for start, batch in zip(range(0, len(ds), batch_size), DataLoader(ds, batch_size=batch_size, collate_fn=task.collator(tokenizer))):
                rows = order[start:start + batch_size]
                inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
                out[rows] = model(**inputs).logits.float().cpu()
                bar.update(len(rows))
    bar.close()
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------------- the loss

def soft_target_loss(logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor, temperature: float,
                     alpha: float) -> torch.Tensor:
    """alpha * CE over the labelled rows (label != -100) + (1 - alpha) * T^2 * KL(teacher_T || student_T) over all
    rows, both means over rows. No host sync: a batch without labelled rows has CE 0. alpha=1 is exactly the
    cross-entropy a classifier computes itself."""
    logits, loss = logits.float(), logits.new_zeros((), dtype=torch.float32)
    if alpha > 0:
        n = (labels != -100).sum().clamp(min=1)
        loss = alpha * F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), reduction="sum") / n
    if alpha < 1:
        t = temperature
        kl = F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(teacher.float() / t, -1), log_target=True,
                      reduction="batchmean")
        loss = loss + (1 - alpha) * t * t * kl
    return loss


def distillation_loss(model, batch: dict, accelerator=None, *, temperature: float, alpha: float) -> torch.Tensor:
    """The training loss of a distilled student: the model runs on its inputs only (no label: no loss of its own)."""
    logits = model(**{k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}).logits
    return soft_target_loss(logits, batch["labels"], batch["teacher_logits"], temperature, alpha)


def loss_for(k: DistillConfig):
    """train.distill -> the loop's loss function (model, batch, accelerator) -> loss."""
    return functools.partial(distillation_loss, temperature=k.temperature, alpha=k.alpha)
