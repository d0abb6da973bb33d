"""The training entrypoint, top to bottom: recipe -> model -> data -> loop -> eval -> export -> merge.

Commands enter through peftlab/cli.py (`peftlab train`, and `accelerate launch -m peftlab train ...`), which calls down
into `run`; nothing here calls back up. `python -m peftlab.run RECIPE ...` is kept as an alias of
`python -m peftlab train RECIPE ...` for launch commands written before (the block at the end of this file).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import NamedTuple

import yaml
from accelerate.utils import set_seed

from . import distill
from .accel import FrozenWeightsCast, accelerate_state_kept, autocast_dtype, eval_batches, make_accelerator, resolve_precision, shards_weights
from .bases import gguf_key, resolve_model_path
from .config import (
    EVAL_SPLITS,
    Recipe,
    checked,
    from_run_problems,
    load_recipe,
    override_list,
    unread_label_options,
    unread_quant_options,
    unread_task_options,
)
from .data import build_data, column_problems, load_splits, same_file, shared_test_file
from .errors import ArtifactError, ConfigError, path_argument
from .export import check_destination, export, merge, predictions_jsonl, rebuild
from .methods import get_method
from .model import build_model, check_run_input_lengths, model_problems, num_layers_problems, task_model_problems
from .rundir import (
    RECIPE_FILE,
    RECORD_FILE,
    RunDir,
    RunRecord,
    atomic_write_text,
    check_same_folder,
    choose_flag,
    folder_identity,
    from_run_lineage,
    holds_run,
    json_text,
    read_run,
    same_inputs,
    sha256,
)
from .tasks import get_task, unread_skipped
from .trackers import resolve_trackers
from .train import RunLog, adapter_folded, eval_loader, stop_at_once_on_signal, train

log = logging.getLogger(__name__)


@accelerate_state_kept()  # a later Accelerator of the caller's gets its own precision, not this evaluation's
def evaluate(out: str | Path, split: str = "eval", overrides: list[str] | tuple = (), results_dir: str | Path | None = None) -> dict:
    """Evaluate a finished run (adapter, full model or merged folder) on a split of its recipe's data -> metrics.

    `overrides` change the run's recipe (other data, another base via model.name; one KEY=VALUE string, a list, or a
    mapping {KEY: value}, as load_recipe takes them);
    eval-SPLIT.json (and predictions) are written to `results_dir`, by default the run folder itself, or, with overrides
    or for a folder that is no training run (a published folder, a hub download: a later publish there would refuse the
    extra files), `runs/eval/NAME-TAG/` (from the working directory; `overrides_tag`): an evaluation of a changed recipe
    never replaces the figures the run was trained and reported with, nor adds files to its folder. `split`: eval (the
    split the run selected on: data.eval, or the seeded data.eval_holdout part of train) or test (data.test)."""
    plan = evaluation_plan(out, split, overrides, results_dir)
    out, recipe, run, results = plan.out, plan.recipe, plan.run, plan.results
    if run.selected_on == split and rows_of(recipe, split) == rows_of(plan.trained, split):
        log.warning("%s is the split this run chose its weights on (train.keep_best or early stopping, step %s of %s): its figure is optimistic. "
                    "%s", split, run.best_step, run.steps, "`--split test` scores the held-out split." if "test" in (run.metrics or {}) and not run.test_shares
                    else "For a held-out figure: --split test data.test.path=FILE (rows no selection saw).")
    model, tokenizer = rebuild(out, recipe, run, precision=plan.precision)
    model.requires_grad_(False)  # only scored: a full fine-tune's weights are frozen too (train.cast_frozen casts them once)
    splits, _ = load_splits_for(recipe, split, run.label_names)
    data = build_data(recipe, tokenizer, splits=splits, label_names=run.label_names)
    accelerator = make_accelerator(recipe, plan.precision)
    ds = getattr(data, split)
    model = accelerator.prepare_model(model, evaluation_mode=True)  # no DDP wrapper: it refuses a model with nothing to train
    metrics, report, rows = evaluate_split(model, ds, data, accelerator, recipe, tokenizer)
    if accelerator.is_main_process:
        check_same_folder(out, plan.identity, "evaluating it")
        if rows is not None:
            atomic_write_text(results / f"predictions-{split}.jsonl", predictions_jsonl(rows))
        record = {"metrics": metrics, "report": report, **({"run": str(out), "overrides": list(plan.overrides)} if results != out else {})}
        atomic_write_text(results / f"eval-{split}.json", json_text(record, indent=2))
        log.info("evaluation of %s on %s written to %s", out, split, results / f"eval-{split}.json")
    return metrics


class EvaluationPlan(NamedTuple):
    out: Path
    overrides: list[str]
    trained: Recipe  # the run's recipe
    recipe: Recipe  # with the overrides
    run: RunRecord
    precision: str
    results: Path  # where eval-SPLIT.json goes
    identity: tuple  # the run folder's (check_same_folder)


def evaluation_plan(out, split: str, overrides=(), results_dir=None) -> EvaluationPlan:
    """What an evaluation of run `out` scores with and writes where, every argument and folder checked before the model
    loads (`evaluate`; `peftlab eval --launch` before it starts any process)."""
    if split not in EVAL_SPLITS:
        raise ConfigError([f"split={split!r}: an evaluation scores one of {', '.join(EVAL_SPLITS)} (eval: the split the run "
                           "selected on; test: data.test). For other rows, give them as the test split: "
                           "split='test', overrides=['data.test.path=FILE']."], what="argument")
    out, overrides = path_argument(out, "evaluate(out)"), override_list(overrides)
    if results_dir is not None:
        results_dir = path_argument(results_dir, "evaluate(results_dir)")
    identity = folder_identity(out)
    trained, run = read_run(out)
    if hasattr(task := get_task(trained.task.type), "refuse_loading"):  # a multi-task run: evaluate its tasks' runs
        raise task.refuse_loading(out, run)
    recipe, precision = trained, run.precision  # the run's own, unless an override names another
    if overrides:
        # only the evaluated split's file must exist (load_splits checks it): a published recipe names the others by file name
        recipe = load_recipe(out / RECIPE_FILE, list(overrides), validate_files=False)
        check_eval_overrides(trained, recipe)
        if recipe.train.precision != trained.train.precision:
            precision = resolve_precision(recipe.train.precision)
    check_split_given(recipe, split)  # before the model is loaded
    check_run_input_lengths(recipe, out)  # eval.max_new_tokens, data.max_length against the position tables, as validate
    if results_dir is None:
        results_dir = EVAL_DIR / f"{out.resolve().name}-{overrides_tag(overrides, out.resolve())}" if overrides or not holds_run(out) else out
    results = Path(results_dir)
    if results.exists() and not results.is_dir():  # before the model loads: was a FileExistsError after the whole evaluation
        raise ArtifactError(f"results_dir {results} is a file: the evaluation writes eval-{split}.json into a folder. Give a "
                            "folder (a new one is made), or leave results_dir out.")
    check_destination(results, "results_dir", folder=True)  # (one that lies under a file)
    writable = results if results.is_dir() else next(p for p in results.absolute().parents if p.exists())
    if not os.access(writable, os.W_OK | os.X_OK):  # before the model loads: not after the whole evaluation
        raise ArtifactError(f"cannot write the evaluation (eval-{split}.json) to {results}: {writable} is not writable. "
                            + ("Copy the run folder to a writable place and evaluate the copy." if results == out else
                               "Run it from a writable working directory (its results go to runs/eval/)."))
    return EvaluationPlan(out, list(overrides), trained, recipe, run, precision, results, identity)


def check_evaluation(out, split: str, overrides=(), results_dir=None) -> None:
    """What `evaluate` refuses, found without the model or the rows: the plan's checks, then the scored split's file
    (and train's, for a held-out part of it) and its columns. `peftlab eval --launch` asks it before it starts any
    process (each would refuse it, under the launcher's traceback)."""
    recipe = copy.deepcopy(evaluation_plan(out, split, overrides, results_dir).recipe)
    only_split(recipe.data, split)
    given = [(name, spec) for name in ("train", "eval", "test") if (spec := getattr(recipe.data, name)) is not None]
    problems = [f"data.{name}.path={spec.path!r}: file not found. Fix the path or override it: data.{name}.path=FILE."
                for name, spec in given if spec.path is not None and not Path(spec.path).is_file()]
    if problems := problems or column_problems(recipe):
        raise ConfigError(problems)


def rows_of(recipe, split: str) -> tuple:
    """Where a split's rows come from (a sample of them, data.SPLIT.max_samples, is the same rows): the held-out part
    of train for an eval split left out, else its file or hub split."""
    d, spec = recipe.data, getattr(recipe.data, split)

    def source(s):
        return s and (s.path and str(Path(s.path).resolve()), s.split)

    if spec is None and split == "eval":  # which rows are held out depends on the train rows read too
        return "held out", source(d.train), d.train and d.train.max_samples, d.dataset, d.subset, d.eval_holdout, recipe.data_seed
    return source(spec), d.dataset, d.subset


# what an evaluation of a finished run reads from its recipe besides data, eval, task and the base: of train, the
# precision it scores in, its speed switches and the seed of a held-out split; adapter, the rest of train and export
# shaped what is loaded
EVAL_READS = ("train.precision", "train.cast_frozen", "train.skip_unread", "train.seed")
EVAL_IGNORES = ("adapter.", "train.", "export.", "data.label_names")  # (the label names: the run's head's, as trained)


def check_eval_overrides(trained: Recipe, recipe: Recipe) -> None:
    """Refuse overrides an evaluation cannot apply (the adapter is loaded from its files as trained): a user who asked
    for adapter.r=4 must not read the run's own figures as those of another adapter."""
    from .rundir import _flat

    old, new = (_flat(yaml.safe_load(r.to_yaml()) or {}) for r in (trained, recipe))
    ignored = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k.startswith(EVAL_IGNORES)
                     and k not in EVAL_READS)
    if ignored:
        raise ConfigError([f"{k}={new.get(k)!r}: an evaluation loads the run's weights as trained, so this changes nothing. "
                           f"Evaluation reads data.* (but the label names, the run's), eval.*, task.*, model.* and "
                           f"{', '.join(EVAL_READS)}; to try "
                           f"{k}, train a run with it." for k in ignored])


EVAL_DIR = Path("runs") / "eval"  # evaluations that are not a run's own: of changed recipes, of published adapters


def overrides_tag(overrides: list[str] | tuple, *also) -> str:
    """A short name for a set of recipe overrides (and what else tells the evaluations apart: the run's folder), the
    first 8 hex digits of their SHA-1, so different evaluations go to different folders."""
    return hashlib.sha1("\n".join(map(str, (*also, *overrides))).encode()).hexdigest()[:8]


def evaluate_split(model, ds, data, accelerator, recipe: Recipe, tokenizer):
    """One split through the task's evaluation -> (metrics, report, prediction rows or None), the adapter folded into
    the base while it runs (`adapter_folded`). Generative tasks return one row per example; they are written as JSONL
    beside the report, not inside it. (Evaluations during training call the task directly, unfolded.)"""
    loader = eval_batches(accelerator.prepare(eval_loader(ds, recipe.eval.batch_size, data.eval_collate or data.collate)), accelerator)
    inner = accelerator.unwrap_model(model)
    cast = FrozenWeightsCast(inner, autocast_dtype(accelerator) if recipe.train.cast_frozen else None)
    with unread_skipped(inner, recipe), adapter_folded(inner, recipe, accelerator), cast:  # folded first: the cast copies hold the folded weights
        metrics, report = get_task(recipe.task.type).evaluate(model, loader, accelerator, data.label_names, tokenizer=tokenizer,
                                                              recipe=recipe)
    return metrics, report, report.pop("predictions", None)


def held_out(recipe: Recipe, split: str) -> bool:
    """The eval split is the seeded data.eval_holdout part of train (no data.eval)."""
    return held_out_data(recipe.data, split)


def held_out_data(d, split: str) -> bool:
    return split == "eval" and d.eval is None and d.eval_holdout > 0 and d.train is not None


def check_split_given(recipe: Recipe, split: str) -> None:
    if getattr(recipe.data, split) is None and not held_out(recipe, split):
        raise ArtifactError(f"the run's recipe has no data.{split} split. Give one: data.{split}.path=FILE.")


def only_split(d, split: str) -> None:
    """Data section `d` with the splits an evaluation of `split` does not read set to None (train stays for a held-out part)."""
    holdout = held_out_data(d, split)
    for other in ("train", "eval", "test"):
        if other != split and not (holdout and other == "train"):
            setattr(d, other, None)


def load_splits_for(recipe: Recipe, split: str, label_names: list[str]):
    """The one split an evaluation scores. A run that selected on a seeded part of train (`data.eval: null`,
    `data.eval_holdout`) gets that part again for `eval`: train is read and split as training did, then dropped."""
    d = recipe.data
    check_split_given(recipe, split)  # (evaluate asks it before loading the model; benchmarks/generation.py calls this directly)
    only_split(d, split)
    d.label_names = label_names or None  # (a task without labels recorded [])
    recipe.train.early_stopping = None  # (nothing trains here: its rule wants the eval split only_split may drop)
    splits, names = load_splits(recipe, need_train=False, run_labels=True)
    return {**splits, "train": None}, names


@accelerate_state_kept()  # a later Accelerator of the caller's gets its own precision, not this run's
def run(recipe: Recipe | str | Path, *, resume: bool = False, overwrite: bool = False) -> RunRecord:
    """Train, evaluate and export one recipe; return its record (also in OUT/run.json, metrics in OUT/metrics.json).

    `recipe`: a Recipe (from `load_recipe`, maybe changed since: it is checked again as `load_recipe` checks a file, so a
    bad value is a ConfigError before any work; the run uses that checked copy), the path of a YAML recipe, or the
    recipe's tree as a mapping (what a YAML file holds), read by `load_recipe`.
    The output folder is locked while the run writes it; an --overwrite is built beside it and replaces the old run
    only once it finished (peftlab/rundir.py), so a failed run never costs the previous one."""
    if isinstance(recipe, (str, PurePath, Mapping)):
        recipe = load_recipe(recipe)
    elif isinstance(recipe, Recipe):
        recipe = checked(recipe)
    else:  # (None, a number: an AttributeError on to_dict)
        raise ConfigError([f"run(recipe={type(recipe).__name__} {recipe!r:.80}): give a Recipe (load_recipe's), the path of a "
                           "YAML recipe, or the recipe's tree as a mapping."], what="argument")
    folder = RunDir(recipe.out, choose_flag(recipe))
    precision = resolve_precision(recipe.train.precision)
    accelerator = make_accelerator(recipe, precision, unused_parameters=getattr(get_task(recipe.task.type), "unused_parameters", False))
    if shards_weights(accelerator) and recipe.train.keep_best and recipe.train.eval_every:
        raise ConfigError([f"train.keep_best=true with train.eval_every={recipe.train.eval_every}: keeping the best evaluation's "
                           "weights is not supported yet when FSDP or ZeRO-3 shard the weights. Set train.keep_best=false (the "
                           "last step is exported), or use --launch multi_gpu / deepspeed-zero2."])
    problems = preflight(recipe)  # every problem beyond the recipe's own, before any work and before the run folder is touched
    if problems:
        raise ConfigError(problems)
    lineage = start_from_run(recipe, accelerator) if recipe.model.from_run else []
    if lineage and (problems := num_layers_problems(recipe)):  # that run's model, merged if it was not yet
        raise ConfigError(problems)
    out = recipe.out
    with folder.writing(resume=resume, overwrite=overwrite, recipe_yaml=recipe.to_yaml(), main=accelerator.is_main_process,
                        processes=accelerator.num_processes) as job:  # locked; job.work: the run folder or an --overwrite's staging
        accelerator.wait_for_everyone()  # every rank has read the folder (plan) before rank 0 writes in it
        with RunLog(job.work, accelerator.is_main_process, recipe) as runlog:
            if job.checkpoint is None:  # a fresh run's trackers first: one that cannot start (wandb without a login) stops
                runlog.open()           # it before any work (a resumed run's, once its checkpoint was checked)
            set_seed(recipe.train.seed)  # before the model: LoRA and head initialisation are seeded too
            with accelerator.main_process_first():  # rank 0 fills the datasets cache, the other ranks then read it
                splits, label_names = load_splits(recipe)
            distillation = None
            if recipe.train.distill:  # the teacher's logits on every training row, once; the teacher is freed before the student loads
                splits, distillation = distill.add_soft_targets(recipe, splits, accelerator.device)
            same_inputs(job.work, job.checkpoint is not None, {"train.distill.teacher": (distillation or {}).get("weights_sha256"),
                                                                "model.from_run": lineage[0]["weights_sha256"] if lineage else None,
                                                                "model.name": gguf_key(recipe),  # a GGUF base's file
                                                                **data_files(recipe)}, accelerator.is_main_process)
            model, tokenizer, info = build_model(recipe, num_labels=len(label_names), label_names=label_names, precision=precision)
            with accelerator.main_process_first():
                data = build_data(recipe, tokenizer, splits=splits, label_names=label_names)

            scored = {}

            def last_evaluation(model) -> dict:  # the loop's at the last step: the final evaluation's pass over data.eval
                t0 = time.perf_counter()
                scored["eval"] = (*evaluate_split(model, data.eval, data, accelerator, recipe, tokenizer), time.perf_counter() - t0)
                return scored["eval"][0]

            model, state = train(recipe, model, data, accelerator, job.work, resume_from=job.checkpoint, tokenizer=tokenizer,
                                 runlog=runlog, last_evaluation=last_evaluation)
            if recipe.train.keep_best and state.best_step != state.step:  # an earlier step's weights are exported
                scored.clear()

            with stop_at_once_on_signal(job.work, state.step):  # a stop from here on: say whether --resume can go on
                metrics, report, predictions, eval_seconds = final_evaluation(model, data, accelerator, recipe, tokenizer, scored)
                for split, values in metrics.items():  # the exported weights' scores, to the trackers too
                    runlog.write(state.step, f"final_{split}", values)
                record = RunRecord(
                    name=recipe.name, output_dir=str(out), method=info.method, task=recipe.task.type, base_model=recipe.model.name,
                    base_path=info.path, quantization=info.quantized, precision=precision, label_names=label_names,
                    trainable_params=info.trainable_params, total_params=info.total_params,
                    trainable_percent=info.trainable_percent, base_weights_mib=info.base_weights_mib, steps=state.step,
                    # the exported step: the best evaluation's (keep_best), else the last (early stopping may have chosen it)
                    best_step=state.best_step if recipe.train.keep_best else state.step, stopped_early=state.stopped_early or None,
                    # keep_best over several evaluations, or early stopping, chose the exported step on data.eval: reports must
                    # not call it held out
                    selected_on="eval" if (recipe.train.keep_best and len(state.history) > 1) or state.stopped_early else None,
                    # (a multi-task run's splits are its tasks': the first task whose data.test is its eval or train file)
                    test_shares=next(filter(None, map(shared_test_file, [t.data for t in recipe.multitask.tasks.values()] if recipe.multitask
                                                      else [recipe.data])), None),
                    train_wall_s=state.wall_seconds, train_seconds=state.train_seconds, train_examples=state.examples, train_tokens=state.tokens,
                    train_padded_tokens=state.padded_tokens, eval_seconds=eval_seconds,
                    examples_per_s=state.examples / max(state.train_seconds, 1e-9),
                    tokens_per_s=state.tokens / max(state.train_seconds, 1e-9),
                    processes=accelerator.num_processes, history=state.history, metrics=metrics, lineage=lineage,
                    distillation=distillation,
                )
                # gather the full weights of a sharded model to save them (a collective: every rank takes part)
                state_dict = accelerator.get_state_dict(model) if shards_weights(accelerator) else None
                if accelerator.is_main_process:
                    own_export = getattr(get_task(recipe.task.type), "export", None)  # multitask: a complete run per task, OUT/tasks/NAME
                    if own_export is not None:  # (the record as written: run.json's versions, hardware, weights checksum)
                        record = own_export(job.work, accelerator.unwrap_model(model), tokenizer, recipe, record, metrics, report)
                    else:
                        record = export(job.work, accelerator.unwrap_model(model), tokenizer, recipe, record, metrics, report,
                                        state_dict=state_dict, predictions=predictions)
        accelerator.wait_for_everyone()  # the main process exported: only then may the new run replace an --overwrite's old one
        if accelerator.is_main_process:  # (a rank with nothing to export swapped the staging folder in while the main one
            job.commit()                 # still wrote into it: the old run and the new one were both lost)
            if recipe.export.merge and not hasattr(get_task(recipe.task.type), "export"):  # (multitask: merged per task)
                record.merged_dir = merge_committed(out, state.step)
        accelerator.wait_for_everyone()
    return record


def merge_committed(out: Path, step: int) -> str | None:
    """export.merge, once the run is in its folder (an --overwrite's swapped in, the old run gone): a stop or a failure
    here costs merged/ only, which `peftlab merge OUT` writes (atomic, like the run's own swap) -> merged/, or None for a
    full model (nothing to merge). Merged before the swap, a Ctrl-C left the finished run in the staging folder."""
    with stop_at_once_on_signal(out, step, merging=True):
        try:
            merged = merge(out)
        except Exception:
            log.warning("%s is trained and exported, but its merge failed (below): `peftlab merge %s` writes merged/ once "
                        "the cause is fixed.", out, out)
            raise
    return None if merged == out else str(merged)


def final_evaluation(model, data, accelerator, recipe: Recipe, tokenizer, scored: dict | None = None) -> tuple[dict, dict | None, dict, dict]:
    """The trained model on every evaluation split -> (metrics, report, predictions, seconds), each by split; the report
    is the first split's (eval: the one data.eval names) and holds every split's under `splits`. `scored`: splits
    already scored with these weights (split -> (metrics, report, rows, seconds): the last step's evaluation)."""
    metrics, report, predictions, seconds = {}, None, {}, {}
    for split in ("eval", "test"):
        ds = getattr(data, split)
        if ds is not None:
            if split in (scored or {}):
                metrics[split], split_report, rows, seconds[split] = scored[split]
            else:
                t0 = time.perf_counter()
                metrics[split], split_report, rows = evaluate_split(model, ds, data, accelerator, recipe, tokenizer)
                seconds[split] = time.perf_counter() - t0
            if rows is not None:
                predictions[split] = rows
            report = report or {"split": split, **split_report}
            report.setdefault("splits", {})[split] = split_report  # the held-out test's too
    return metrics, report, predictions, seconds


def preflight(recipe: Recipe, *, training: bool = True) -> list[str]:
    """The checks that read more than the recipe: the trackers of train.report_to installed (else their pip command),
    model.num_layers against the base's config, the teacher of train.distill against the student, what the adapter
    method cannot run on this machine (adapter.init=loftq without CUDA; validate: train.precision too). `run` makes them
    before any work (the layers of a model.from_run once it has merged that run). `peftlab validate` makes them without
    any work (`training=False`), and also what `train` finds when it reads the data and loads the model: the columns
    (data.column_problems), the base and its target modules (model.model_problems). A teacher not trained yet and a
    model.from_run not merged yet are no problem there."""
    problems = []
    try:
        resolve_trackers(recipe.train.report_to)
    except ConfigError as e:
        problems += e.problems
    if training and recipe.model.from_run is None:  # (training from a run: `run` checks once it has merged that run)
        problems += num_layers_problems(recipe)
    problems += get_method(recipe.adapter.method).machine_rules(recipe)  # (adapter.init=loftq without CUDA)
    teacher = recipe.train.distill and (training or (Path(recipe.train.distill.teacher) / "run.json").is_file())
    problems += distill.check(recipe) if teacher else []
    if recipe.eval.metric_fn and hasattr(task := get_task(recipe.task.type), "load_metric_fn"):  # (`validate` imported none of it)
        try:
            task.load_metric_fn(recipe.eval.metric_fn)
        except ConfigError as e:
            problems += e.problems
    elif recipe.eval.metric_fn:
        log.warning("eval.metric_fn=%s: task.type=%s does not read it (only sft scores its generations with it), so ignored: "
                    "no metric of it is computed. Remove it, or use task.type=sft.", recipe.eval.metric_fn, recipe.task.type)
    d = recipe.data
    # a multi-task recipe's splits are its tasks' (its run per task, OUT/tasks/NAME, and that run's card say it)
    sections = [(f"multitask.tasks.{n}.data", t.data) for n, t in recipe.multitask.tasks.items()] if recipe.multitask else [("data", d)]
    # (train.max_steps=0, zero-shot: no training to evaluate during)
    if recipe.train.eval_every and recipe.train.max_steps != 0 and all(s.eval is None and not s.eval_holdout for _, s in sections):
        key = "multitask.tasks.NAME.data" if recipe.multitask else "data"
        log.warning("train.eval_every=%s but there is no evaluation split: nothing is evaluated during training (nor kept by "
                    "train.keep_best). Give one (%s.eval.path=FILE, or %s.eval_holdout=0.1 of train), or drop "
                    "train.eval_every.", recipe.train.eval_every, key, key)
    for key, section in sections:
        if same_file(section.eval, section.train):  # (data.test on it is said below, and in the summary)
            log.warning("%s.eval is the file of %s.train (%s): its figures, and what train.keep_best or early stopping choose "
                        "by them, score rows the model trains on. Give %s.eval a file training never reads, or hold rows out "
                        "of train: %s.eval=null %s.eval_holdout=0.1.", key, key, section.eval.path, key, key, key)
        if shared := shared_test_file(section):
            log.warning("%s.test is the file of %s.%s (%s): its figure is not held out (the summary and the card say so). "
                        "Give %s.test a file of rows that %s never reads.", key, key, shared, section.test.path, key,
                        "selection" if shared == "eval" else "training")
    if unread := get_method(recipe.adapter.method).unread_options(recipe.adapter):
        log.warning("%s: not read by adapter.method=%s, so ignored (the recipe and the card still show them). Remove them, "
                    "or choose a method that reads them.", ", ".join(unread), recipe.adapter.method)
    if unread := unread_task_options(recipe.task):
        log.warning("%s: not read by task.type=%s, so ignored (the recipe and the card still show them). Remove them, or "
                    "choose the task that reads them.", ", ".join(unread), recipe.task.type)
    if unread := unread_label_options(recipe):
        log.warning("%s: task.type=%s learns no labels, so ignored (the recipe and the card still show them). Remove them, or "
                    "choose a task that learns labels (classification, verbalizer).", ", ".join(unread), recipe.task.type)
    if unread := unread_quant_options(recipe.quant):
        log.warning("%s: only 4-bit quantization reads them (quant.mode=%s), so ignored. Remove them, or use quant.mode=4bit.",
                    ", ".join(unread), recipe.quant.mode)
    if recipe.train.distill and recipe.train.distill.alpha == 1:
        log.warning("train.distill.alpha=1 weighs the teacher's soft targets 0: this trains on the labels alone, as without "
                    "train.distill, and the teacher's pass over every training row is wasted. Lower it to distil (e.g. "
                    "train.distill.alpha=0.5), or drop train.distill.")
    if recipe.train.distill and not teacher:
        log.warning("train.distill.teacher=%s: no finished run there yet, so the teacher is not checked; train it before "
                    "this recipe (its task and labels are checked then).", recipe.train.distill.teacher)
    if not training:  # what `train` finds once it reads the data and loads the model, here from headers and configs; and
        try:  # the precision this machine cannot train in (fp16 without CUDA), which `run` resolves before it calls this
            resolve_precision(recipe.train.precision)
        except ConfigError as e:
            problems += e.problems
        problems += column_problems(recipe) + model_problems(recipe)
    return problems


def check_data_and_base(recipe: Recipe, source: str | None = None) -> None:
    """Raise ConfigError with every problem `preflight(training=False)` finds (data columns, the base, trackers, the
    teacher): what `peftlab validate` checks, and `train --launch` before it starts any process."""
    if problems := preflight(recipe, training=False):
        raise ConfigError(problems, source)


def data_files(recipe: Recipe) -> dict[str, str]:
    """The local files training reads (each train and eval split, a multi-task run's per task, distillation's
    unlabelled rows) -> {their recipe key: sha256}, for --resume to refuse one rewritten since (same_inputs)."""
    tasks = recipe.multitask.tasks.items() if recipe.multitask else ()
    sections = {"data": recipe.data, **{f"multitask.tasks.{n}.data": t.data for n, t in tasks}}
    specs = {f"{key}.{split}": getattr(d, split) for key, d in sections.items() for split in ("train", "eval")}
    if recipe.train.distill:
        specs["train.distill.unlabelled"] = recipe.train.distill.unlabelled
    return {k: sha256(Path(spec.path)) for k, spec in specs.items() if spec is not None and spec.path and Path(spec.path).is_file()}


def start_from_run(recipe: Recipe, accelerator) -> list[dict]:
    """model.from_run: the earlier run's adapter merged into its base (RUN/merged, made once; bases.base_path loads it),
    model.name set to that run's base -> the lineage: that run, then the runs it started from."""
    source = Path(recipe.model.from_run)
    earlier, record = read_run(source)
    if problems := from_run_problems(recipe):  # validate's own check (another base, a multi-task run itself), once more here
        raise ConfigError(problems)             # for a recipe built without its file checks
    recipe.model.name = record.base_model or earlier.model.name  # an older run.json may lack base_model
    if problems := task_model_problems(recipe, resolve_model_path(recipe.model.name, recipe.model.revision)):
        raise ConfigError(problems)  # before the merge (a big base's): its architecture is the original base's
    with accelerator.main_process_first():
        if accelerator.is_main_process:
            merge(source)  # idempotent: an existing merge of the same adapter is kept
    log.info("starting from run %s (%s, %s on %s, %s steps)", source, record.task, record.method, recipe.model.name, record.steps)
    warn_if_trained_on(recipe, source, earlier, record)
    return from_run_lineage(source, earlier, record)


def warn_if_trained_on(recipe: Recipe, source: Path, earlier: Recipe, record: RunRecord) -> None:
    """A split this run scores that the run it starts from trained on (the same file; a multi-task run's task trained
    the shared adapter on every task's data, in the task folders beside it): its figures would not be held out. Said,
    not refused: a user may mean it."""
    recipes = [earlier]
    if record.multitask and record.multitask.get("adapters") == "shared":
        recipes += [read_run(source.parent / t)[0] for t in record.multitask.get("tasks", [])
                    if (source.parent / t) != source and (source.parent / t / RECORD_FILE).is_file()]
    trained = {str(Path(r.data.train.path).resolve()): r.name for r in recipes if r.data.train is not None and r.data.train.path}
    for split in ("eval", "test"):
        spec = getattr(recipe.data, split)
        if spec is not None and spec.path and (run := trained.get(str(Path(spec.path).resolve()))):
            log.warning("data.%s (%s) is data that the run this one starts from was trained on (%s, model.from_run): its "
                        "figures are not held out. Score on a file it did not train on.", split, spec.path, run)


if __name__ == "__main__":  # `python -m peftlab.run RECIPE ...`: an alias of `python -m peftlab train RECIPE ...`
    from .cli import main

    args = sys.argv[1:]
    front = [a for a in args if a in ("--debug", "-q", "--quiet")]  # `peftlab` options go before the subcommand
    sys.exit(main([*front, "train", *(a for a in args if a not in front)]))
