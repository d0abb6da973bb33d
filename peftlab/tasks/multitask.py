"""Multi-task classification (`task.type: multitask`): several tasks in one model, each with its own data, labels and head.

The recipe's `multitask.tasks` names them; each task is read, tokenized and later exported through a single-task recipe of
its own (`subrecipe`: task.type classification, that task's data), so everything a classification run does (columns,
labels, sentence pairs, truncation reports) holds per task. Here:
- the model (`MultiTaskModel`): the base with one peft adapter (multitask.adapters: shared) or one per task (per_task), and a
  head per task, sized to its labels (a copy of the base's head). peft's head wrapper (modules_to_save) holds a switch
  that forwards to the active task's head, so the heads stay outside peft's state dict while training;
- the order of training rows (`TaskBlockSampler`): blocks of train.batch_size rows of one task, the tasks drawn in the
  proportions of multitask.sampling, so every batch (and, with several processes, every process's batch) is one task's;
- evaluation: each task's accuracy, macro-F1 and loss, and `mean` (of each task's multitask.tasks.NAME.metric), which
  keep-best selects on by default;
- export: OUT/tasks/NAME is a complete single-task run per task (its adapter, its head, run.json, recipe.yaml), which
  `load_trained`, `load_adapters`, `peftlab eval` and `peftlab publish` take as they take any run. OUT holds the
  multi-task record (run.json, metrics.json), no weights of its own.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification
from transformers.utils import ModelOutput

from ..errors import ArtifactError, ModelError
from ..metrics import classification_metrics

log = logging.getLogger(__name__)

auto_model_class = AutoModelForSequenceClassification
peft_task_type = "SEQ_CLS"
target_kind = "label"
unused_parameters = True  # a batch is one task's: the other heads (and per-task adapters) get no gradient that step
best_metric = "mean"
metrics = ()  # per-task names (sst2/accuracy, ...): check() validates train.best_metric against the recipe's tasks
pipeline_tag = "text-classification"
task_name = "Multi-task Text Classification"
usage_class = "AutoModelForSequenceClassification"
card_metrics = {"mean": "Mean"}
TASK_METRICS = ("accuracy", "f1", "loss")
NAME = re.compile(r"^[A-Za-z0-9_-]+$")
PROMPT_METHODS = ("prompt_tuning", "prefix_tuning", "p_tuning")


# ------------------------------------------------------------------------------------------------ the recipe

def subrecipe(recipe, name: str):
    """Task `name` of a multitask recipe as a single-task classification recipe: its data, its metric, its output folder
    (OUT/tasks/NAME). Reading its data and writing its export go through it."""
    spec = recipe.multitask.tasks[name]
    sub = copy.deepcopy(recipe)
    sub.multitask, sub.task.type, sub.data = None, "classification", copy.deepcopy(spec.data)
    sub.name, sub.output_dir = f"{recipe.name}-{name}", str(recipe.out / "tasks" / name)
    sub.train.best_metric = spec.metric
    return sub


def check(recipe) -> list[str]:
    from ..methods import get_method, method_names

    m = recipe.multitask
    if m is None:
        return ["task.type=multitask needs a multitask section naming the tasks: multitask: {tasks: {sst2: {data: {train: ...}}, "
                "agnews: {...}}} (see the README's multi-task section)."]
    tasks, p = m.tasks, []
    if len(tasks) < 2:
        p.append(f"multitask.tasks names {len(tasks)} task(s): a multi-task run needs >= 2. For one task, use task.type=classification "
                 "with that task's data section.")
    for name in tasks:
        if not isinstance(name, str):  # (YAML's `1:`: a path joined to it was a TypeError in validate and train)
            kind = "boolean" if isinstance(name, bool) else "number" if isinstance(name, (int, float)) else type(name).__name__
            p.append(f"multitask.tasks.{name}: a task name is text, but YAML reads {name} as a {kind}: quote it ('{name}': ...).")
        elif not NAME.match(name) or name == "default":
            p.append(f"multitask.tasks.{name}: a task name is letters, digits, - and _ (it names OUT/tasks/NAME and an adapter), "
                     "and not 'default' (peft's own adapter name).")
    with_eval = [n for n, t in tasks.items() if t.data.eval is not None or t.data.eval_holdout > 0]
    if with_eval and len(with_eval) < len(tasks):
        p.append(f"multitask: {', '.join(with_eval)} evaluate during training but {', '.join(n for n in tasks if n not in with_eval)} "
                 "do(es) not, so the mean keep-best selects on would leave tasks out. Give every task data.eval (or "
                 "data.eval_holdout), or none.")
    kept = ("mean", "loss", *(f"{n}/{k}" for n in tasks for k in TASK_METRICS))
    if recipe.train.best_metric not in kept:
        p.append(f"train.best_metric={recipe.train.best_metric!r}: a multi-task run keeps the best of mean (each task's "
                 f"multitask.tasks.NAME.metric, averaged), loss, or one task's NAME/accuracy, NAME/f1, NAME/loss.")
    a = recipe.adapter
    if a.method in method_names():
        method = get_method(a.method)
        if not method.is_adapter or a.method in PROMPT_METHODS or a.method == "adalora":
            p.append(f"adapter.method={a.method} with task.type=multitask: tasks share the base through peft layer adapters "
                     "(lora, loha, lokr, ia3, vera, oft, ...); full, frozen, scratch, adalora and the prompt methods are not "
                     "supported. Use adapter.method=lora.")
    if a.init != "default":
        p.append(f"adapter.init={a.init} with task.type=multitask: the per-task exports are saved as trained; use adapter.init=default.")
    if recipe.data.train is not None or recipe.data.eval is not None or recipe.data.test is not None:
        p.append("data.train/eval/test are not read by a multi-task recipe: each task names its own splits "
                 "(multitask.tasks.NAME.data.train, ...). Move them there; the top-level data section holds what every task "
                 "shares (max_length, text_columns, ...).")
    if recipe.train.distill is not None or recipe.model.decoder is not None:
        p.append("task.type=multitask with train.distill or model.decoder: not supported. Remove them.")
    return p


def summary_line(split: str, m: dict) -> str:
    tasks = sorted({k.split("/")[0] for k in m if "/" in k})
    parts = "   ".join(f"{t} acc {m[f'{t}/accuracy']:.4f} F1 {m[f'{t}/f1']:.4f}" for t in tasks)
    return f"   {split:<5} mean {m['mean']:.4f}   loss {m['loss']:.4f}\n         {parts}"


# ----------------------------------------------------------------------------------------------------- data

def load_splits(recipe, *, need_train: bool = True):
    """-> ({split: {task: Dataset} or None}, {task: label names}): each task read through its own recipe."""
    from ..data import load_splits as load_one

    splits: dict[str, dict] = {"train": {}, "eval": {}, "test": {}}
    labels = {}
    for name in recipe.multitask.tasks:
        own, labels[name] = load_one(subrecipe(recipe, name), need_train=need_train, prefix=task_keys(name))
        for split, ds in own.items():
            if ds is not None:
                splits[split][name] = ds
    return {split: parts or None for split, parts in splits.items()}, labels


def model_recipe(recipe):
    """The recipe the shared model is built by (as `build_model` builds it: the first task's), for `validate`'s checks
    of the adapter on the base (target_modules, rank limits)."""
    return subrecipe(recipe, next(iter(recipe.multitask.tasks)))


def task_keys(name: str) -> str:
    """The recipe section of task `name`'s data, which its data messages name (`multitask.tasks.NAME.data.label_names`,
    not the top-level `data.label_names` a multi-task recipe does not read for it)."""
    return f"multitask.tasks.{name}.data"


def input_length_problems(recipe, config) -> list[str]:
    """Each task's input lengths against the base's position table, named by its own keys (validate, build_model)."""
    from ..model import check_input_lengths

    problems = []
    for name in recipe.multitask.tasks:
        try:
            check_input_lengths(config, subrecipe(recipe, name), task_keys(name))
        except ModelError as e:
            problems.append(str(e))
    return problems


def column_problems(recipe) -> list[str]:
    """`peftlab validate`: each task's columns, read through its own recipe (data.column_problems)."""
    from ..data import column_problems as one

    return [p for name in recipe.multitask.tasks for p in one(subrecipe(recipe, name), task_keys(name))]


def build_data(recipe, tokenizer, splits, label_names):
    """Each task tokenized as its classification recipe says, then one dataset per split with a `task` column (the task's
    index in multitask.tasks), and the sampler that draws one task per batch."""
    from datasets import concatenate_datasets

    from ..data import TaskData
    from ..data import build_data as build_one
    from . import classification

    names = list(recipe.multitask.tasks)
    per_task = {n: build_one(subrecipe(recipe, n), tokenizer, label_names=label_names[n], prefix=task_keys(n),
                             splits={s: (splits[s] or {}).get(n) for s in ("train", "eval", "test")}) for n in names}
    joined = {}
    for split in ("train", "eval", "test"):
        parts = [getattr(per_task[n], split) for n in names]
        parts = [ds.remove_columns([c for c in classification.EXTRAS if c in ds.column_names]).add_column("task", [i] * len(ds))
                 for i, ds in enumerate(parts) if ds is not None]  # (a pair task's text_pair would not concatenate)
        joined[split] = concatenate_datasets([ds.cast(parts[0].features) for ds in parts]) if parts else None
    m = recipe.multitask
    sizes = [len(per_task[n].train) for n in names] if joined["train"] is not None else [0] * len(names)
    probs = task_probabilities(sizes, m.sampling, m.temperature)
    if joined["train"] is not None:
        log.info("multitask: %s", ", ".join(f"{n} {s:,} rows, p={p:.3f}" for n, s, p in zip(names, sizes, probs)))

    def sampler(t, processes: int):  # a block: one optimizer step's rows (N ranks x batch x accumulation), of one task
        block = t.batch_size * processes * t.grad_accum
        return TaskBlockSampler(joined["train"]["task"], joined["train"]["length"], probs, block, t.seed, group=t.group_by_length)

    pad = classification.collator(tokenizer)

    def collate(rows):  # + the tasks present, as host ints: the model routes by them without reading the device back
        return {**pad(rows), "present": sorted({r["task"] for r in rows})}

    return TaskData(train=joined["train"], eval=joined["eval"], test=joined["test"], label_names=label_names,
                    collate=collate, train_sampler=sampler)


def task_probabilities(sizes: list[int], sampling: str, temperature: float) -> list[float]:
    """The share of batches each task gets: proportional to its rows, uniform, or rows^(1/T) (temperature)."""
    power = {"proportional": 1.0, "uniform": 0.0}.get(sampling, 1.0 / temperature)
    weights = [s ** power if s else 0.0 for s in sizes]
    total = sum(weights) or 1.0
    return [w / total for w in weights]


def block_counts(probs: list[float], blocks: int) -> list[int]:
    """`blocks` split by `probs`, rounded so the counts add up (largest remainder): the exact shares of one epoch. A task
    with rows gets at least one block (taken from the largest share): rounded to 0, it was never trained, every epoch."""
    raw = [p * blocks for p in probs]
    counts = [math.floor(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: counts[i] - raw[i])[: blocks - sum(counts)]:
        counts[i] += 1
    for i, p in enumerate(probs):
        if p > 0 and counts[i] == 0 and max(counts) > 1:
            counts[i], counts[counts.index(max(counts))] = 1, max(counts) - 1
    return counts


class TaskBlockSampler:
    """Row order for multi-task training: blocks of `block` rows of one task, the rows of one optimizer step (batch x
    processes x accumulation), so the DataLoader's batches (cut from it in consecutive slices, which Accelerate deals to
    the processes in turn) each hold one task's rows, and a step of N ranks x batch B x accumulation A sees the rows
    1 rank x batch N*B*A sees.

    An epoch has as many blocks as the tasks' rows fill (sum of ceil(rows / block)); each task gets its share of them
    (`block_counts` of the sampling probabilities), in a seeded random order. Within a task the rows are length-grouped
    and shuffled (data.LengthGroupedSampler) and cycle when its share is more than one pass (small tasks under uniform
    sampling); a block is topped up from the task's next pass, never from another task. `group=False`
    (train.group_by_length=false): plain shuffling within a task, as a single-task run shuffles (it was length-grouped
    whatever the recipe said)."""

    def __init__(self, tasks: list[int], lengths: list[int], probs: list[float], block: int, seed: int, group: bool = True):
        self.rows = [[i for i, t in enumerate(tasks) if t == k] for k in range(len(probs))]
        self.lengths, self.probs, self.block, self.seed, self.epoch, self.group = lengths, probs, block, seed, 0, group
        self.blocks = sum(math.ceil(len(r) / block) for r in self.rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.blocks * self.block

    def counts(self) -> list[int]:
        return block_counts(self.probs, self.blocks)

    def _stream(self, k: int):
        """Task k's rows, length-grouped (or shuffled: group=False), pass after pass (each pass its own seed)."""
        from ..data import LengthGroupedSampler

        rows, n = self.rows[k], 0
        while rows:
            seed = self.seed + 1000 * self.epoch + 97 * k + n
            order = LengthGroupedSampler([self.lengths[i] for i in rows], self.block, seed) if self.group else \
                torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
            yield from (rows[i] for i in order)
            n += 1

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        sequence = [k for k, c in enumerate(self.counts()) for _ in range(c)]
        streams = [self._stream(k) for k in range(len(self.rows))]
        for i in torch.randperm(len(sequence), generator=g).tolist():
            stream = streams[sequence[i]]
            yield from (next(stream) for _ in range(self.block))


# ---------------------------------------------------------------------------------------------------- model

def build_model(recipe, *, label_names: dict[str, list[str]], precision: str):
    """The first task's model as a classification recipe builds it (base, peft adapter, head), then a head per task (and an
    adapter per task with multitask.adapters: per_task) -> (MultiTaskModel, tokenizer, ModelInfo)."""
    from transformers import AutoConfig

    from ..bases import base_path
    from ..model import build_model as build_one
    from ..model import count_params

    names = list(label_names)
    first = subrecipe(recipe, names[0])
    # each task's data.max_length, named by its own key, before the weights load (build_one would name the first one's
    # data.max_length, a key the recipe may not have set)
    try:
        config = AutoConfig.from_pretrained(base_path(first), revision=first.model.revision,
                                            trust_remote_code=first.model.trust_remote_code)
    except Exception:  # a base that cannot be read: build_one says why, in its own words
        config = None
    if config is not None and (problems := input_length_problems(recipe, config)):
        raise ModelError(problems[0])
    model, tokenizer, info = build_one(first, num_labels=len(label_names[names[0]]), label_names=label_names[names[0]],
                                       precision=precision)
    metric_of = {n: t.metric for n, t in recipe.multitask.tasks.items()}
    wrapped = MultiTaskModel(model, label_names, metric_of, recipe.multitask.adapters)
    trainable, total = count_params(wrapped)
    info = replace(info, trainable_params=trainable, total_params=total)
    log.info("multitask: %d tasks, %s adapter(s), heads %s: %s trainable of %s params (%.3f%%)", len(names),
             recipe.multitask.adapters, ", ".join(f"{n} {len(v)}" for n, v in label_names.items()), f"{trainable:,}",
             f"{total:,}", info.trainable_percent)
    return wrapped, tokenizer, info


def adapter_name(task: str) -> str:
    """The peft adapter of task `task` (per_task, the first task's aside: peft's 'default'). Not the task's name itself:
    peft's export of one adapter drops every state-dict key holding `.{another adapter's name}.`, so a task named like a
    module of the base (query, output, classifier) cost the other tasks' exports those weights."""
    return f"task_{task}"


def check_adapter_names(model, adapter_of: dict[str, str]) -> None:
    """Refuse an adapter name that is also a part of a key of the model's state dict (a module or weight of the base):
    peft's export of the other adapters would drop the weights under it."""
    keys = list(model.state_dict())
    for task, adapter in adapter_of.items():
        if adapter != "default" and (key := next((k for k in keys if adapter in k.split(".")), None)):
            raise ModelError(f"multitask.tasks.{task}: its adapter, {adapter!r}, is named like a module of the base "
                             f"({key}), so peft would drop those weights from the other tasks' exports. Rename the task.")


class HeadSwitch(nn.Module):
    """Stands in peft's head wrapper for every adapter: forwards to the active task's head. It holds the heads without
    registering them (they are MultiTaskModel.heads), so the wrapper's state dict never changes with the task."""

    def __init__(self, heads: nn.ModuleDict):
        super().__init__()
        object.__setattr__(self, "_heads", heads)
        self.current = next(iter(heads))

    def forward(self, *args, **kwargs):
        return self._heads[self.current](*args, **kwargs)


@dataclass
class MultiTaskOutput(ModelOutput):
    loss: torch.Tensor | None = None  # mean cross-entropy of the batch's rows (when labels are given)
    losses: torch.Tensor | None = None  # per row
    predictions: torch.Tensor | None = None  # per row: the argmax of its own task's head


class MultiTaskModel(nn.Module):
    """A peft classification model shared by several tasks: `forward(task=..., labels=..., **inputs)` runs each row
    through its task's adapter and head (a batch of several tasks is split by task)."""

    def __init__(self, model, labels: dict[str, list[str]], metric_of: dict[str, str], adapters: str):
        super().__init__()
        self.model, self.tasks, self.labels, self.metric_of = model, list(labels), labels, metric_of
        self.adapter_of = {t: "default" if i == 0 or adapters == "shared" else adapter_name(t) for i, t in enumerate(self.tasks)}
        check_adapter_names(model, self.adapter_of)
        for adapter in dict.fromkeys(self.adapter_of.values()):
            if adapter not in model.peft_config:
                model.add_adapter(adapter, copy.deepcopy(model.peft_config["default"]))
        from ..model import head_init, head_wrapper, resized_head

        wrapper = head_wrapper(model)
        first = wrapper.modules_to_save["default"]
        n0, init = len(labels[self.tasks[0]]), head_init(model)
        self.heads = nn.ModuleDict({t: first if i == 0 else resized_head(first, n0, len(labels[t]), init)
                                    for i, t in enumerate(self.tasks)})
        self.switch = HeadSwitch(self.heads)
        for adapter in set(self.adapter_of.values()):
            wrapper.modules_to_save[adapter] = self.switch
        self.wrapper = [wrapper]  # (a list: not registered twice)
        self.trainable = []  # every task's adapter and head: peft's set_adapter freezes the inactive ones, use() undoes it
        for adapter in dict.fromkeys(self.adapter_of.values()):
            model.set_adapter(adapter)
            self.trainable += [p for p in model.parameters() if p.requires_grad]
        self.trainable = list({id(p): p for p in [*self.trainable, *self.heads.parameters()]}.values())
        self.active = None
        self.use(self.tasks[0])

    def use(self, task: str) -> None:
        """Route what follows through `task`'s adapter and head."""
        if task == self.active:
            return
        adapter = self.adapter_of[task]
        if adapter != self.model.active_adapter:  # (per_task only: a shared adapter never changes)
            self.model.set_adapter(adapter)
            for p in self.trainable:  # set_adapter froze the other tasks' parts: the optimizer holds them, they stay
                p.requires_grad_(True)  # trainable and just get no gradient while inactive
        self.switch.current, self.active = task, task

    def forward(self, task: torch.Tensor, labels: torch.Tensor | None = None, present: list[int] | None = None,
                **inputs) -> MultiTaskOutput:
        present = task.unique().tolist() if present is None else present  # (the collator's: no device sync)
        n = len(task)
        losses = torch.zeros(n, device=task.device)
        predictions = torch.zeros(n, dtype=torch.long, device=task.device)
        for k in present:
            rows = None if len(present) == 1 else task == k
            self.use(self.tasks[k])
            logits = self.model(**(inputs if rows is None else {key: v[rows] for key, v in inputs.items()})).logits.float()
            index = slice(None) if rows is None else rows
            predictions[index] = logits.argmax(-1)
            if labels is not None:
                part = nn.functional.cross_entropy(logits, labels[index], reduction="none")
                losses = part if rows is None else losses.index_put((rows.nonzero(as_tuple=True)[0],), part)
        return MultiTaskOutput(loss=losses.mean() if labels is not None else None, losses=losses, predictions=predictions)

    def task_adapter(self, task: str) -> TaskAdapter:
        return TaskAdapter(self, task)


class TaskAdapter:
    """One task of a MultiTaskModel as a plain peft classification adapter, for export: `save_pretrained` writes that task's
    adapter (shared or its own) with its head in the wrapper's place, as a single-task run saves it (adapter name
    'default'), so the folder loads with PeftModel.from_pretrained on a base with that task's number of labels."""

    def __init__(self, multi: MultiTaskModel, task: str):
        self.multi, self.task = multi, task

    def save_pretrained(self, folder: str, **kwargs) -> None:
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        m, adapter = self.multi, self.multi.adapter_of[self.task]
        wrapper = m.wrapper[0]
        wrapper.modules_to_save[adapter] = m.heads[self.task]
        try:
            state = get_peft_model_state_dict(m.model, adapter_name=adapter)
        finally:
            wrapper.modules_to_save[adapter] = m.switch
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(Path(folder) / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        config = copy.deepcopy(m.model.peft_config[adapter])
        config.inference_mode = True
        config.save_pretrained(folder)

    def eval(self) -> TaskAdapter:  # export saves a model in eval mode
        self.multi.eval()
        return self

    def trainable_params(self) -> int:
        m, adapter = self.multi, self.multi.adapter_of[self.task]
        own = sum(p.numel() for n, p in m.model.named_parameters() if f".{adapter}." in n and "modules_to_save" not in n)
        return own + sum(p.numel() for p in m.heads[self.task].parameters())


# ------------------------------------------------------------------------------------------------ evaluation

@torch.no_grad()
def evaluate(model, loader, accelerator, label_names, **context):
    """-> ({mean, loss, TASK/accuracy, TASK/f1, TASK/loss ...}, {task: per-class report}). `mean` averages each task's
    multitask.tasks.NAME.metric, `loss` the tasks' losses (each task counts once, whatever its size)."""
    multi = accelerator.unwrap_model(model)
    model.eval()
    parts = []
    for batch in loader:
        out = model(**batch)
        parts.append([t.cpu() for t in accelerator.gather_for_metrics((out.predictions, batch["labels"], out.losses, batch["task"]))])
    model.train()
    preds, refs, losses, tasks = (torch.cat([p[i] for p in parts]) for i in range(4))
    metrics, report = {}, {}
    for k, name in enumerate(multi.tasks):
        rows = tasks == k
        if not rows.any():
            continue
        m, report[name] = classification_metrics(preds[rows].tolist(), refs[rows].tolist(), multi.labels[name])
        m["loss"] = losses[rows].mean().item()
        metrics.update({f"{name}/{key}": m[key] for key in TASK_METRICS})
    scored = [n for n in multi.tasks if f"{n}/loss" in metrics]
    head = {"mean": sum(metrics[f"{n}/{multi.metric_of[n]}"] for n in scored) / len(scored),
            "loss": sum(metrics[f"{n}/loss"] for n in scored) / len(scored)}
    return {**head, **metrics}, report


def task_metrics(metrics: dict, task: str) -> dict:
    """One task's figures out of the multi-task metrics, under their single-task names (accuracy, f1, loss)."""
    return {key.split("/", 1)[1]: v for key, v in metrics.items() if key.startswith(f"{task}/")}


# ---------------------------------------------------------------------------------------------------- export

def export(out: Path, model, tokenizer, recipe, record, metrics: dict, report: dict | None = None, **_):
    """OUT/tasks/NAME: each task as a complete single-task run (export.export), merged too with export.merge; then OUT's
    own metrics.json and run.json (run.json last: it makes OUT a finished run) -> OUT's record, as written."""

    from ..data import shared_test_file
    from ..export import export as export_one
    from ..export import hardware, merge, versions
    from ..rundir import atomic_write_text, json_text, write_record

    multi = model
    info = {"run": record.name, "tasks": multi.tasks, "adapters": recipe.multitask.adapters,
            "sampling": recipe.multitask.sampling, "temperature": recipe.multitask.temperature,
            "best_metric": recipe.train.best_metric,  # what chose the kept step for every task (a task's recipe names its own)
            "data": {n: subrecipe(recipe, n).train_rows() for n in multi.tasks}}  # each task's training rows (cards, lineage)
    frozen = record.total_params - sum(p.numel() for p in multi.trainable)  # the base (and peft's copy of the first head)
    for name in multi.tasks:
        sub = subrecipe(recipe, name)
        view = multi.task_adapter(name)
        trainable = view.trainable_params()
        total = frozen + trainable  # what this task's model holds: the base, its adapter, its head
        # (a split this task lacks, e.g. another task's data.test, is none of its own: not "test": {} and a card row of it)
        own = {split: figures for split, m in metrics.items() if (figures := task_metrics(m, name))}
        rec = replace(record, name=sub.name, output_dir=sub.output_dir, task="classification", label_names=multi.labels[name],
                      metrics=own, history=[{"step": h["step"], **task_metrics(h, name)} for h in record.history],
                      trainable_params=trainable, total_params=total, trainable_percent=100 * trainable / max(total, 1),
                      test_shares=shared_test_file(sub.data),  # (the run's is None: its own data section has no splits)
                      multitask={**info, "task": name})
        folder = out / "tasks" / name
        # a --resume of a run stopped after exporting some tasks: their folders are this unfinished run's, exported again
        # (export refuses a folder holding a run)
        shutil.rmtree(folder, ignore_errors=True)
        export_one(folder, view, tokenizer, sub, rec, own, task_report(report, name))
        if recipe.export.merge:
            merge(folder)
    record = replace(record, multitask=info, versions=versions(), hardware=hardware())
    # the record last, each file whole: a run killed here was taken for a finished one without its metrics.json
    atomic_write_text(out / "metrics.json", json_text(metrics, indent=2))
    if report is not None:
        atomic_write_text(out / "eval_report.json", json_text(report, indent=2))
    write_record(out, recipe.to_yaml(), record)
    return record


def task_report(report: dict | None, name: str) -> dict | None:
    """One task's eval_report.json, shaped as a single-task run's: the first split's per-class report, and every split's
    under `splits` (the held-out test's too; only the first was kept)."""
    if not report or name not in report:
        return None
    splits = {split: r[name] for split, r in report.get("splits", {}).items() if name in r}
    return {"split": report.get("split"), **report[name], "splits": splits}


def refuse_loading(out: Path, run) -> ArtifactError:
    """A multi-task run's folder holds no model: name the per-task runs to load instead."""
    tasks = (run.multitask or {}).get("tasks") or [p.name for p in sorted((Path(out) / "tasks").glob("*"))]
    return ArtifactError(f"{out} is a multi-task run ({', '.join(tasks)}): its models are per task. Load one of them, e.g. "
                         f"{Path(out) / 'tasks' / (tasks[0] if tasks else 'NAME')} (load_trained, peftlab eval, merge, publish), "
                         "or several side by side with peftlab.adapters.load_adapters.")
