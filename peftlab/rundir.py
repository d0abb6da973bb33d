"""The run folder: the one owner of its layout, its lock, its staging and its checksums.

    runs/NAME/                      the run: weights, tokenizer, recipe.yaml, run.json, metrics.json, log.jsonl,
                                    checkpoints/step-N/ (each with recipe.yaml and checksums.json), merged/
    runs/.NAME.lock                 held (fcntl.flock) by the process writing runs/NAME; the OS releases it when that
                                    process ends, even by kill -9, so a crashed run never leaves it stuck
    runs/.NAME.staging/             an --overwrite builds the new run here; it replaces runs/NAME only when it finished
    runs/.NAME.old/                 the replaced run for the instant of the swap

An --overwrite that fails leaves runs/NAME as it was. Its staging folder is deleted, unless it holds checkpoints: then
`--resume` continues it (and still swaps it in only at the end), and a new `--overwrite` starts it over.

What the folder holds is described by run.json, read and written as a `RunRecord` (`read_run`).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import Recipe, base_key, load_recipe
from .errors import ArtifactError, PeftlabError, path_argument

log = logging.getLogger(__name__)

LOCK_ENV = "PEFTLAB_OUTPUT_LOCK"  # set by `peftlab train --launch` for its ranks: the launcher process holds the lock
RECIPE_FILE, RECORD_FILE, LOG_FILE, CHECKPOINTS, CHECKSUMS = "recipe.yaml", "run.json", "log.jsonl", "checkpoints", "checksums.json"
TRAINER_STATE = "trainer_state.json"  # a checkpoint's TrainState (train.py): step, epoch, totals, the processes that wrote it
RUN_FILES = (RECIPE_FILE, RECORD_FILE)  # what makes a folder a finished run (written last: write_record)
STARTED = (RECORD_FILE, CHECKPOINTS, LOG_FILE)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Recipe keys a --resume may change: they steer logging, evaluation, saving and the length of the run, not the shapes or
# the numbers of the steps already taken. Any other difference from the checkpoint's recipe is refused.
RESUME_MAY_CHANGE = ("name", "output_dir", "train.epochs", "train.max_steps", "train.log_every", "train.eval_every",
                     "train.save_every", "train.keep_checkpoints", "train.compile", "train.optimizer_impl", "train.release_memory",
                     "train.report_to", "eval.", "export.")


# ------------------------------------------------------------------------------------------------- checksums

_sha_cache: dict[tuple, str] = {}


def file_version(path: Path) -> tuple:
    """(path, inode, size, mtime, ctime): what tells a file's contents apart within one process, for memoising what is
    read from it. The ctime too: a file rewritten in place at its size with its mtime put back (`cp -p`, `rsync -a`, a
    relabelling that flips 0 and 1) kept its old answers, so a notebook's --resume trained on the changed data that a
    fresh process refuses; no one sets a ctime back."""
    st = os.stat(path)
    return str(Path(path).absolute()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def sha256(path: Path) -> str:
    """Hex sha256 of a file; memoised on its file_version since eval, merge and publish re-read one run."""
    key = file_version(path)
    if key not in _sha_cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _sha_cache[key] = h.hexdigest()
    return _sha_cache[key]


def damaged(path: Path, recorded: str, where: str) -> ArtifactError:
    size = path.stat().st_size if path.is_file() else "missing"
    return ArtifactError(f"{path} is damaged: its sha256 differs from the one recorded in {where} when it was written "
                         f"(size now {size} bytes; a truncated or modified copy?). Copy it again from where it was made, or "
                         "train again with --overwrite.")


def record_weights(folder: Path, name: str) -> dict:
    """-> the run.json fields that let a reader check the exported weights."""
    return {"weights_file": name, "weights_sha256": sha256(folder / name)}


def verify_weights(folder: Path, run: RunRecord) -> None:
    """Check the weights against run.json's record. Runs written before the record named its file are not checked."""
    name, recorded = run.weights_file, run.weights_sha256
    if not name or not recorded:
        return
    path = Path(folder) / name
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: run.json records it as this run's weights. Copy the whole run folder again.")
    if sha256(path) != recorded:
        raise damaged(path, recorded, f"{Path(folder) / 'run.json'}")
    if name == ADAPTER_WEIGHTS:  # the weights are an adapter: without its config they would load as nothing, or a traceback
        config = Path(folder) / "adapter_config.json"
        try:
            json.loads(config.read_text())
        except FileNotFoundError:
            raise ArtifactError(f"{config} is missing: this run's weights are an adapter and need it. Copy the whole run folder "
                                "again.") from None
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{config} is damaged ({e}). Copy the whole run folder again, or train it again with "
                                "--overwrite.") from None


def seal_checkpoint(folder: Path, recipe_yaml: str | None) -> None:
    """Store the resolved recipe and the sha256 of every file of a checkpoint (checked before --resume loads it)."""
    if recipe_yaml is not None:
        (folder / RECIPE_FILE).write_text(recipe_yaml, encoding="utf-8")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    sums = {str(p.relative_to(folder)): sha256(p) for p in files}
    (folder / CHECKSUMS).write_text(json.dumps(sums, indent=1), encoding="utf-8")


INPUTS_FILE = "inputs.json"  # in checkpoints/: the sha256 of what a run reads beside its base (data files, teacher, from_run)


def same_inputs(work: Path, resuming: bool, inputs: dict[str, str | None], main: bool = True) -> None:
    """A fresh run records what it reads beside its base (a distillation teacher's weights, a model.from_run's, its
    data files) in checkpoints/inputs.json; --resume refuses to go on from inputs changed since: steps on one teacher
    (or one labelling of the data), then on another, would be one run (the recipe, naming the same paths, cannot tell)."""
    path = Path(work) / CHECKPOINTS / INPUTS_FILE
    inputs = {k: v for k, v in inputs.items() if v}
    if not resuming:
        if main and inputs:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(inputs, indent=1), encoding="utf-8")
        return
    try:
        before = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # a run started by an older peftlab: nothing recorded to compare
    changed = [k for k in inputs if k in before and before[k] != inputs[k]]
    if changed:
        raise ArtifactError(f"{', '.join(changed)}: changed since the run started (weights trained again, a data file "
                            "rewritten, or another file in their place; sha256 "
                            f"{', '.join(before[k][:12] for k in changed)} then, {', '.join(inputs[k][:12] for k in changed)} "
                            "now): resuming would train on both. Start over (--overwrite), or restore them.")


# What accelerator.save_state always writes into a checkpoint, as name patterns (one of each group): the model's weights
# (one process and DDP: model.safetensors; an older save_state unsafe: pytorch_model.bin; FSDP: pytorch_model_fsdp.bin, _rank{r}.bin or a
# pytorch_model_fsdp_0/ folder; DeepSpeed: a pytorch_model/ folder, which holds the optimizer's state too), the optimizer's
# (FSDP's sharded: optimizer_0/ or optimizer_0_rank{r}.bin), and the LR scheduler's (train.setup registers it:
# custom_checkpoint_0.pkl). Each rank adds its random_states_{r}.pkl.
SAVED_STATE = (("model.safetensors", "pytorch_model.bin", "pytorch_model_fsdp*", "pytorch_model"),
               ("optimizer.bin", "optimizer_0*", "pytorch_model"), ("custom_checkpoint_0.pkl",))


def checkpoint_problem(ckpt: Path) -> str | None:
    """-> why this checkpoint cannot be loaded (a damaged or missing file), or None. Checkpoints without checksums
    (written by an older peftlab) are trusted once they hold their step's state and the files Accelerate always writes
    (a copy cut short may not)."""
    if not (ckpt / TRAINER_STATE).is_file():
        return f"{ckpt} holds no {TRAINER_STATE} (a copy cut short, or not a checkpoint)"
    if not (ckpt / CHECKSUMS).is_file():
        try:
            processes = json.loads((ckpt / TRAINER_STATE).read_text()).get("num_processes") or 1
        except (OSError, ValueError, AttributeError):
            return f"{ckpt / TRAINER_STATE} is damaged"
        needed = [*SAVED_STATE, *((f"random_states_{r}.pkl",) for r in range(processes))]
        for group in needed:
            if not any(any(ckpt.glob(pattern)) for pattern in group):
                return f"{ckpt / group[0]} is missing (a copy cut short? the checkpoint has no {CHECKSUMS} to check it by)"
        return None
    try:
        sums = json.loads((ckpt / CHECKSUMS).read_text())
        assert isinstance(sums, dict)
    except (OSError, ValueError, AssertionError):
        return f"{ckpt / CHECKSUMS} is damaged"
    for name, recorded in sums.items():
        path = ckpt / name
        if not path.is_file():
            return f"{path} is missing"
        if sha256(path) != recorded:
            return f"{path} is damaged (sha256 differs from {CHECKSUMS}; size {path.stat().st_size} bytes)"
    return None


# ------------------------------------------------------------------------------------------- the run record

@dataclass
class RunRecord:
    """run.json: what the run is (method, base, labels, sizes), what it cost and scored, and how to check its weights.

    Fields missing from an older run.json take the defaults below; keys this version does not know are kept in `extra`
    and written back as they were. `record["metrics"]` reads a field too: `run()` returns the record, and
    `summary["metrics"]["eval"]` is how the README reads it."""

    peftlab_run: int = 1
    name: str | None = None
    output_dir: str | None = None
    method: str | None = None
    task: str | None = None  # task.type: how its metrics read (an older run.json: filled in from its recipe)
    base_model: str | None = None
    base_path: str | None = None
    quantization: str = "none"
    precision: str | None = None
    label_names: list[str] = field(default_factory=list)
    trainable_params: int | None = None
    total_params: int | None = None
    trainable_percent: float | None = None
    base_weights_mib: float | None = None
    steps: int | None = None
    stopped_early: bool | None = None  # train.early_stopping ended it before the steps its recipe gives
    best_step: int | None = None  # the exported step: keep_best's best evaluation, else the last
    selected_on: str | None = None  # the split keep_best or early stopping chose the exported step on (its figure is not held out)
    test_shares: str | None = None  # "eval" or "train": data.test is that split's file, so its figure is not held out either
    train_wall_s: float | None = None
    train_seconds: float | None = None
    train_examples: int | None = None
    train_tokens: int | None = None
    train_padded_tokens: int | None = None
    eval_seconds: dict = field(default_factory=dict)
    examples_per_s: float | None = None
    tokens_per_s: float | None = None
    processes: int = 1
    history: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    merged_dir: str | None = None  # set on the summary of a run whose recipe merged it (not stored in run.json)
    versions: dict = field(default_factory=dict)
    hardware: dict = field(default_factory=dict)
    weights_file: str | None = None
    weights_sha256: str | None = None
    composition: dict | None = None  # a composed adapter: how, from which runs
    adapter_ranks: dict | None = None  # the exported adapter's ranks where training chose them (AdaLoRA): average, min, max
    lineage: list = field(default_factory=list)  # model.from_run: the runs whose weights this one started from, nearest first
    distillation: dict | None = None  # train.distill: the teacher (run, name, base, method, eval metrics), T, alpha, rows
    multitask: dict | None = None  # a multi-task run (or one task of it): the run, its tasks, adapters, sampling
    published: dict | None = None  # a published copy: which entries were rewritten to hide local paths
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict) -> RunRecord:
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in data.items() if k in known}, extra={k: v for k, v in data.items() if k not in known})

    def to_dict(self) -> dict:
        """run.json's content, in its usual order; absent optional entries stay absent."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out = {k: v for k, v in out.items() if v is not None or k not in _OMITTED_WHEN_NONE}
        return {**out, **self.extra}

    def to_json(self) -> str:
        return json_text(self.to_dict(), indent=2, default=str)

    def __getitem__(self, key: str) -> Any:
        if key in self.extra:
            return self.extra[key]
        if key == "extra" or key not in _FIELD_NAMES:
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: str) -> bool:
        return key in self.to_dict()

    @property
    def stopped_at_last(self) -> bool:
        """Early stopping ended the run and its last step was exported (keep_best off): the selection split chose where
        training stopped, not the best of its evaluations."""
        return bool(self.stopped_early) and self.best_step == self.steps

    def split_label(self, split: str) -> str:
        """How a split's figure is labelled in the summary and the card: the selection split says so, the others are
        held out; a multi-task run's split that some of its tasks lack says which tasks its mean is of."""
        label = self._split_label(split)
        if not (partial := self.tasks_scored(split)):
            return label
        note = f"mean of {', '.join(partial[0])} only: {', '.join(partial[1])} {'has' if len(partial[1]) == 1 else 'have'} no {split} split"
        return f"{split} ({note})" if label == split else f"{label[:-1]}; {note})"

    def tasks_scored(self, split: str) -> tuple[list[str], list[str]] | None:
        """A multi-task run's split that not every task has (data.test of some tasks) -> (its tasks, the others)."""
        tasks = (self.multitask or {}).get("tasks") if not (self.multitask or {}).get("task") else None
        scored = [t for t in tasks or () if f"{t}/loss" in ((self.metrics or {}).get(split) or {})]
        return (scored, [t for t in tasks if t not in scored]) if scored and len(scored) < len(tasks) else None

    def _split_label(self, split: str) -> str:
        if split == "test" and self.test_shares:
            return f"test (not held out: the file of data.{self.test_shares})"
        if not self.selected_on:
            return split
        if split == self.selected_on and self.stopped_at_last:
            return f"{split} (selection split: early stopping on it ended training at step {self.steps})"
        if split == self.selected_on:
            return f"{split} (selection split: step {self.best_step} of {self.steps} chosen on it)"
        return f"{split} (held out)"


_OMITTED_WHEN_NONE = ("merged_dir", "composition", "adapter_ranks", "published", "distillation", "multitask", "test_shares")
_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(RunRecord))


def selection_split(recipe: Recipe, data: dict) -> str | None:
    """The split the exported weights were chosen on: keep_best over more than one evaluation picks the step by its
    score there, so that split's figure is optimistic. None when the last (or only) evaluated step was exported.
    Runs written before run.json said so are judged from their recipe and history."""
    if "selected_on" in data:
        return data["selected_on"]
    return "eval" if recipe.train.keep_best and len(data.get("history") or []) > 1 else None


LOCKED = (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)  # flock's "held by another"


def holder(fd: int) -> str:
    """'process PID' of the process holding a run's lock (it writes its pid into the lock file)."""
    return f"process {os.pread(fd, 64, 0).decode(errors='replace').strip() or '?'}"


def folder_identity(out: str | Path) -> tuple[int, int] | None:
    """(device, inode) of a run folder (None: none there): an --overwrite swaps another folder in under the same name."""
    try:
        st = os.stat(out)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_same_folder(out: str | Path, identity: tuple[int, int] | None, doing: str) -> None:
    """Refuse to write what was computed from a run that an --overwrite replaced meanwhile (its recipe and weights
    would be of two runs); nothing is written."""
    if folder_identity(out) != identity:
        raise ArtifactError(f"{out} was replaced while {doing} (an --overwrite finished meanwhile): what was computed mixes "
                            "the two runs, so nothing was written. Run the command again.")


def read_run(out: str | Path) -> tuple[Recipe, RunRecord]:
    """-> (recipe, run record) of a finished run, its weights checked against the record; clear error if `out` is not one."""
    out = path_argument(out, "read_run(out)")
    if not out.is_dir():
        what = "is a file, not a folder" if out.exists() else "does not exist"
        raise ArtifactError(f"'{out}' {what}. Pass the output directory of a training run (runs/NAME).")
    missing = [f for f in RUN_FILES if not (out / f).is_file()]
    if missing:
        if (writer := RunDir(out).writer()) is not None:
            raise ArtifactError(f"'{out}' is not finished: a peftlab process ({writer}) is writing it now. Wait for it to "
                                "finish, then run this again.")
        again = ("continue it with `peftlab train RECIPE --resume`" if checkpoints(out) else
                 "it has no checkpoint to continue from: train it again with `peftlab train RECIPE --overwrite`")
        raise ArtifactError(f"'{out}' is not a finished peftlab run (missing {', '.join(missing)}). If training was "
                            f"interrupted, {again}.")
    recipe = load_recipe(out / RECIPE_FILE, validate_files=False)
    try:
        data = json.loads((out / RECORD_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        data = e
    if not isinstance(data, dict) or "method" not in data:
        why = f"not JSON: {data}" if isinstance(data, Exception) else "not a run record"
        raise ArtifactError(f"{out / RECORD_FILE} is damaged ({why}). Copy the whole run folder again, or train it again "
                            "with --overwrite.")
    run = RunRecord.from_dict({**data, "task": data.get("task") or recipe.task.type, "selected_on": selection_split(recipe, data)})
    verify_weights(out, run)  # a truncated or altered weights file: say which, rather than a SafetensorError
    return recipe, run


def from_run_lineage(source: str | Path, earlier: Recipe, record: RunRecord) -> list[dict]:
    """model.from_run's lineage -> that run (`source`, whose recipe and record read_run gave), then the runs it started
    from: what run.json records, the card's Lineage section shows and an evaluation checks (a source retrained since)."""
    step = {"run": str(Path(source).resolve()), "name": record.name, "task": record.task, "method": record.method,
            "base_model": record.base_model or earlier.model.name, "data": earlier.train_rows(),  # an older run.json may lack base_model
            "steps": record.steps, "metrics": record.metrics, "selected_on": record.selected_on,
            "weights_sha256": record.weights_sha256,
            **({"multitask": record.multitask} if record.multitask else {})}  # one task of a multi-task run: all its tasks' data
    return [step, *record.lineage]


# ----------------------------------------------------------------------------------------------- checkpoints

def umask() -> int:
    """The process umask (read without changing it where Linux allows: os.umask can only set it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def finite(value):
    """`value` with every NaN or infinity (a user's metric, a loss that overflowed in evaluation) as None: JSON has no
    NaN, and json.dumps wrote the bare token NaN, which strict readers (JavaScript, jq, the Hub) refuse."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def json_text(value, **kwargs) -> str:
    """JSON of `value` as every peftlab file writes it: a NaN or infinity as null (`finite`)."""
    return json.dumps(finite(value), allow_nan=False, **kwargs)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes 0600 files; an output file gets the usual permissions
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_record(folder: Path, recipe_yaml: str, record: RunRecord) -> None:
    """The resolved recipe and run.json: what makes `folder` a finished run (export, merge and compose write them last,
    inside a staging folder that is then swapped in; a multi-task run's own, in place), each file whole, run.json last."""
    atomic_write_text(folder / RECIPE_FILE, recipe_yaml)
    atomic_write_text(folder / RECORD_FILE, record.to_json())


def log_path(folder: Path) -> Path:
    return Path(folder) / LOG_FILE


def checkpoint_path(folder: Path, step: int) -> Path:
    return Path(folder) / CHECKPOINTS / f"step-{step}"


def _size(path: Path) -> int:
    """A file's size; 0 where there is none."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def checkpoints(folder: Path) -> list[Path]:
    """folder/checkpoints/step-N, oldest first."""
    found = [p for p in (Path(folder) / CHECKPOINTS).glob("step-*") if p.name.split("-")[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def good_checkpoint(folder: Path) -> Path:
    """The newest checkpoint whose files match their checksums; a damaged newer one is skipped with a warning."""
    problems = []
    for ckpt in reversed(checkpoints(folder)):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            if problems:
                log.warning("--resume: %s; resuming from the previous good checkpoint %s instead", "; ".join(problems), ckpt.name)
            return ckpt
        problems.append(problem)
    raise ArtifactError(f"--resume: no intact checkpoint in {folder}/checkpoints: {'; '.join(problems)}. Start the run again "
                        "with --overwrite.")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def adapter_config(run: Path) -> dict:
    """A run folder's adapter_config.json (peft_type LORA, IA3, PROMPT_TUNING, ...); {} for a full model or an unreadable
    config."""
    try:
        cfg = json.loads((Path(run) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


BASE_KEYS = ("model.name", "model.num_layers", "quant.mode", "model.from_run", "model.from_run's weights")  # base_as_loaded's


def differences(keys: tuple, mine: tuple, theirs: tuple) -> str:
    """'key: theirs vs mine' for each key whose values differ (a refusal that says what to align)."""
    return "; ".join(f"{k}: {b!r} vs {a!r}" for k, a, b in zip(keys, mine, theirs) if a != b)


def base_as_loaded(recipe, run) -> tuple:
    """What a run's adapter sits on: the base (a local folder by its resolved path), the layers kept, quantization, and
    a model.from_run's merged weights (the run and its weights' sha256 as recorded). Adapters fit one another only on
    equal ones (load_adapters, compose)."""
    m, source = recipe.model, (run.lineage or [{}])[0]
    return (base_key(m.name), m.num_layers, recipe.quant.mode, m.from_run and str(Path(m.from_run).resolve()), source.get("weights_sha256"))


def recipe_changes(ckpt: Path, recipe_yaml: str) -> list[str]:
    """-> 'key: old -> new' for every key that differs from the checkpoint's recipe and that a resume may not change."""
    if not (ckpt / RECIPE_FILE).is_file():
        return []
    old, new = (_flat(yaml.safe_load(t) or {}) for t in ((ckpt / RECIPE_FILE).read_text(), recipe_yaml))
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys
            if not any(k == m or (m.endswith(".") and k.startswith(m)) for m in RESUME_MAY_CHANGE)]


def processes_change(ckpt: Path, processes: int | None) -> str | None:
    """-> why `processes` cannot resume this checkpoint (written by another number of processes), or None. The global
    batch is train.batch_size x train.grad_accum x processes and the data position is counted in those batches, so
    another count would continue a different run, silently. A checkpoint without the count (an older peftlab) is trusted."""
    try:
        before = json.loads((ckpt / TRAINER_STATE).read_text()).get("num_processes")
    except (OSError, ValueError, AttributeError):
        return None  # (a damaged state is load_checkpoint's to report)
    if processes is None or before is None or before == processes:
        return None
    return (f"--resume: checkpoint {ckpt} was written by {before} process(es), this run has {processes}: the global batch "
            f"(train.batch_size x train.grad_accum x processes) and the position in the data would differ from the run it "
            f"continues. Resume with {before} process(es), as the run was started (e.g. `peftlab train RECIPE --resume "
            f"--launch PRESET --num-processes {before}`, or `accelerate launch --num_processes {before} -m peftlab train "
            "RECIPE --resume`), or start again with --overwrite.")


# --------------------------------------------------------------------------------------------- the folder

def is_started(folder: Path) -> bool:
    return Path(folder).is_dir() and any((Path(folder) / f).exists() for f in STARTED)


def holds_run(folder: Path) -> bool:
    """A training run (finished or started) or a composed adapter: what publish --to and compose --out must never
    replace. A publish folder (README.md beside run.json, no log) is not one."""
    folder = Path(folder)
    if any((folder / f).exists() for f in (LOG_FILE, CHECKPOINTS)):
        return True
    return (folder / RECORD_FILE).is_file() and not (folder / "README.md").is_file()


CHOOSE = "output_dir=DIR (or name=NEW_NAME)"  # how to name another run folder where the recipe's is runs/<name>


def choose_flag(recipe: Recipe) -> str:
    """How this recipe names another run folder: output_dir=DIR, and name=NEW_NAME only where the folder is runs/<name>
    (a recipe that sets output_dir keeps it whatever its name)."""
    return "output_dir=DIR" if recipe.output_dir else CHOOSE


def unwritable(out: Path, e: OSError, flag: str = CHOOSE) -> ArtifactError:
    return ArtifactError(f"cannot write the run to {out}: {e.strerror or e}. Choose a writable folder: {flag}.")


def check_writable(out: Path, what: str = "the run", flag: str = CHOOSE) -> None:
    """One clear error when output_dir (a folder `what` is written to, chosen by `flag`) is a file, lies under a file,
    or cannot be written (before any work)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"{out} is a file, not a folder. Choose a folder for {what}: {flag}.")
    probe = out.absolute().parent  # the lock and the staging folder live beside the run
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ArtifactError(f"{out} cannot be created: {probe} is a file. Choose a folder for {what}: {flag}.")
    for p in (probe, out) if out.is_dir() else (probe,):
        if not os.access(p, os.W_OK | os.X_OK):
            raise ArtifactError(f"cannot write {what} to {out}: {p} is not writable (permission denied). Choose a writable "
                                f"folder: {flag}.")


def check_no_foreign_files(out: Path, flag: str = CHOOSE) -> None:
    """A folder that holds files but no run is refused as output_dir: the run's files would mix with them, and a
    later --overwrite would delete them."""
    if out.is_dir() and not is_started(out) and any(out.iterdir()):
        found = sorted(p.name for p in out.iterdir())
        listed = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise ArtifactError(f"output directory {out} holds files that are not a peftlab run ({listed}): a run there would "
                            f"mix its files with them. Choose a new or empty folder: {flag}.")


@dataclass
class Job:
    """One training process's use of a run folder: where it writes (`work`) and the checkpoint it resumes from."""

    folder: RunDir
    work: Path
    checkpoint: Path | None = None
    committed: bool = False
    swapping: bool = False  # commit() began the swap
    created: bool = False  # prepare() made `work` (a fresh run into a folder that was not there)

    @property
    def staged(self) -> bool:
        return self.work == self.folder.staging

    def prepare(self) -> None:
        """(main process) An --overwrite starts from an empty staging folder; a fresh run drops an orphaned one."""
        f = self.folder
        try:
            if self.staged and self.checkpoint is None:
                shutil.rmtree(f.staging, ignore_errors=True)
            elif not self.staged and f.staging.exists():
                log.warning("removing %s, the staging folder of an --overwrite of %s that never finished", f.staging, f.out)
                shutil.rmtree(f.staging, ignore_errors=True)
            self.created = not self.work.exists()
            self.work.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise unwritable(f.out, e, f.flag) from None

    def commit(self) -> None:
        """(main process) The run finished: an --overwrite's staging folder replaces the old run."""
        self.drop_inputs_without_checkpoints()
        if self.staged:
            self.swapping = True
            self.folder.swap()
        self.committed = True

    def drop_inputs_without_checkpoints(self) -> None:
        """No checkpoint to resume: the inputs recorded for --resume (same_inputs) go, and the empty folder."""
        if not checkpoints(self.work):
            (self.work / CHECKPOINTS / INPUTS_FILE).unlink(missing_ok=True)
            with suppress(OSError):
                (self.work / CHECKPOINTS).rmdir()

    def abandon(self, error: BaseException | None = None) -> None:
        """(main process) The run failed (`error`): the old run stays; staging is kept only if --resume can continue it.
        An --overwrite stopped once exported whole (a Ctrl-C as its trackers closed) is committed instead. A fresh run that
        failed before it logged a step (a tracker, the data, the model) leaves no folder behind; one that logged keeps its
        log and its checkpoints (a crash, not a refusal of ours, says that --resume continues them)."""
        if self.committed:
            return
        if self.staged and (self.work / RECORD_FILE).is_file() and not self.swapping:  # (left in staging, it was a finished
            try:                                                                           # run that --resume refused)
                self.commit()
                log.warning("%s holds the new run: it was exported whole before it stopped.", self.folder.out)
                return
            except OSError:  # (said below)
                pass
        self.drop_inputs_without_checkpoints()
        if not self.staged:
            if not checkpoints(self.work) and not _size(self.work / LOG_FILE):  # nothing logged: what it holds is this start's
                if self.created:
                    shutil.rmtree(self.work, ignore_errors=True)
                else:  # a folder that was there, empty (plan refuses one holding anything): emptied again
                    for child in self.work.iterdir():
                        if child.is_dir():
                            shutil.rmtree(child, ignore_errors=True)
                        else:
                            child.unlink(missing_ok=True)
            elif not checkpoints(self.work) and (self.work / LOG_FILE).exists():
                log.warning("the failed run's log is kept in %s; train again with --overwrite.", self.work / LOG_FILE)
            elif checkpoints(self.work) and not isinstance(error, PeftlabError):  # (ours say what to do themselves)
                log.warning("the run stopped; its checkpoints are kept (latest %s): once the cause is fixed, the same "
                            "command with --resume continues it.", checkpoints(self.work)[-1])
            return
        if (self.work / RECORD_FILE).is_file():  # it finished, but the swap failed (a full disk, permissions)
            log.warning("%s is unchanged: the new run finished but could not replace it. It is in %s: move it there yourself "
                        "once the cause is fixed, or train again with --overwrite.", self.folder.out, self.work)
        elif checkpoints(self.work):
            log.warning("%s is unchanged. The new run's checkpoints are kept in %s: --resume continues it, --overwrite "
                        "starts it again.", self.folder.out, self.work)
        else:
            shutil.rmtree(self.work, ignore_errors=True)
            log.warning("%s is unchanged: the new run stopped before it finished.", self.folder.out)


class RunDir:
    """The folder of one run (`recipe.out`), and the siblings that keep it whole: lock, staging, retired copy."""

    def __init__(self, out: str | Path, flag: str = CHOOSE):
        self.flag = flag  # how the recipe names another folder (choose_flag), in the messages that refuse this one
        # a symlinked run folder is its target: one lock whichever name is used, and --overwrite replaces the run
        # where it lives (not the link, by a folder beside it)
        self.out = Path(out).resolve() if Path(out).is_symlink() else Path(out)
        full = self.out.absolute()
        self.lock_file = full.parent / f".{full.name}.lock"
        self.staging = full.parent / f".{full.name}.staging"
        self.retired = full.parent / f".{full.name}.old"

    @property
    def finished(self) -> bool:
        return (self.out / RECORD_FILE).is_file()

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder against other writers. flock is released by the OS when the process dies: never stuck."""
        if os.environ.get(LOCK_ENV) == str(self.out.absolute()):
            yield  # `peftlab train --launch` holds it for the ranks it started
            return
        check_writable(self.out, flag=self.flag)
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks here
            yield
            return
        try:
            self.lock_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise unwritable(self.out, e, self.flag) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in LOCKED:
                    raise
                raise ArtifactError(f"output directory {self.out} is in use by another peftlab run ({holder(fd)}). Wait "
                                    f"for it to finish, or choose another folder: {self.flag}.") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the lock

    def writer(self) -> str | None:
        """'process PID' of the peftlab process holding the lock (writing the folder now), else None."""
        try:
            import fcntl

            fd = os.open(self.lock_file, os.O_RDONLY)
        except (ImportError, OSError):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None  # free: nobody writes it
        except OSError as e:  # held, or no locks here (ENOLCK on some network file systems): then nobody is known
            return holder(fd) if e.errno in LOCKED else None
        finally:
            os.close(fd)

    def recover(self) -> None:
        """(under the lock) Finish or undo a swap that a crash cut between its two renames."""
        if not self.retired.exists():
            return
        if not self.out.exists():
            source = self.staging if (self.staging / RECORD_FILE).is_file() else self.retired
            os.replace(source, self.out)
            log.warning("completed an interrupted replacement of %s (from %s)", self.out, source.name)
        shutil.rmtree(self.retired, ignore_errors=True)

    def swap(self) -> None:
        """Replace the run by the staging folder: two renames (the old run is moved aside first), then delete the old."""
        shutil.rmtree(self.retired, ignore_errors=True)
        if self.out.exists():
            os.replace(self.out, self.retired)
        os.replace(self.staging, self.out)
        fsync_dir(self.out.absolute().parent)
        shutil.rmtree(self.retired, ignore_errors=True)

    def plan(self, *, resume: bool, overwrite: bool, recipe_yaml: str | None = None, announce: bool = True,
             processes: int | None = None) -> Job:
        """Decide where this run writes, or refuse with the fix; reads only (every process runs it). `announce`: say
        where a --resume continues (off for the launcher's check: its rank 0 says it). `processes`: the run's number of
        processes, which a --resume must share with its checkpoint (None: not checked)."""
        check_writable(self.out, flag=self.flag)
        if resume and overwrite:
            raise ArtifactError("--resume and --overwrite together: --resume continues the run in the output directory, "
                                "--overwrite starts it again. Give one of them.")
        if resume:
            return self._resume_plan(recipe_yaml, announce, processes)
        if is_started(self.out):
            if overwrite:
                return Job(self, self.staging)
            if not checkpoints(self.staging) and not checkpoints(self.out) and not self.finished:
                raise ArtifactError(f"output directory {self.out} holds a run that stopped before it finished and has no "
                                    "checkpoint to continue from (its log.jsonl says how far it got): start it again with "
                                    f"--overwrite, or choose another folder: {self.flag}.")
            hint = (f" An --overwrite of it did not finish (stopped or failed; its checkpoints are in {self.staging}): "
                    "--resume continues it with the same recipe." if checkpoints(self.staging) else "")
            held = "a finished run:" if self.finished else "a run. Continue it with --resume,"  # (a finished one: nothing to resume)
            raise ArtifactError(f"output directory {self.out} already holds {held} replace it with --overwrite, or choose another "
                                f"one: {self.flag}.{hint}")
        check_no_foreign_files(self.out, self.flag)
        return Job(self, self.out)

    def _resume_plan(self, recipe_yaml: str | None, announce: bool = True, processes: int | None = None) -> Job:
        work = self.staging if checkpoints(self.staging) else self.out
        if work == self.out and self.finished:
            merge = ((yaml.safe_load(recipe_yaml or "") or {}).get("export") or {}).get("merge")
            unmerged = merge and (self.out / "adapter_config.json").is_file() and not (self.out / "merged" / "merge.json").is_file()
            raise ArtifactError(f"--resume: {self.out} holds a finished run; there is nothing to resume. "
                                + (f"Its merged model is missing (stopped while merging?): `peftlab merge {self.out}` writes it. "
                                   if unmerged else "")
                                + f"Evaluate it (peftlab eval {self.out}), or train it again with --overwrite.")
        if work == self.staging and (self.staging / RECORD_FILE).is_file():  # (export refuses a folder holding a run)
            raise ArtifactError(f"--resume: the --overwrite of {self.out} finished, in {self.staging}, but could not replace it: "
                                f"there is nothing to resume. Move {self.staging} to {self.out} yourself, or train it again "
                                "with --overwrite.")
        if work == self.out and not is_started(self.out):
            raise ArtifactError(f"--resume: there is no run in {self.out} to continue: start it without --resume.")
        if not checkpoints(work):
            raise ArtifactError(f"--resume: no checkpoint in {self.out}/checkpoints, so there is nothing to continue: start the "
                                "run again with --overwrite (in place of --resume). Set train.save_every=N to write checkpoints.")
        ckpt = good_checkpoint(work)
        changes = recipe_changes(ckpt, recipe_yaml) if recipe_yaml is not None else []
        if changes:
            raise ArtifactError(f"--resume: the recipe differs from the one checkpoint {ckpt} was written with:\n  - "
                                + "\n  - ".join(changes) + "\nResume with the checkpoint's recipe (" + str(ckpt / RECIPE_FILE)
                                + "), or start again with --overwrite. A resume may change only: " + ", ".join(RESUME_MAY_CHANGE))
        if problem := processes_change(ckpt, processes):
            raise ArtifactError(problem)
        if work == self.staging and announce:
            log.info("--resume: continuing the interrupted --overwrite in %s; %s stays as it is until it finishes",
                     self.staging, self.out)
        return Job(self, work, ckpt)

    @contextmanager
    def writing(self, *, resume: bool, overwrite: bool, recipe_yaml: str | None, main: bool,
                processes: int | None = None) -> Iterator[Job]:
        """Lock (main process), plan, prepare; on failure the old run stays as it was. Call job.commit() when done."""
        with self.lock() if main else nullcontext():
            if main:
                self.recover()
            job = self.plan(resume=resume, overwrite=overwrite, recipe_yaml=recipe_yaml, processes=processes)
            if main:
                job.prepare()
            try:
                yield job
            except BaseException as e:
                if main:
                    job.abandon(e)
                raise


def fsync_dir(path: Path) -> None:
    """Make the renames into folder `path` durable (best effort: a file system that cannot fsync a folder is left be)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
