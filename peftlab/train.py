"""The training loop on Accelerate: short and bare. Everything configurable comes from `recipe.train`.

`train` = `setup` (loaders, optimizer, schedules, accelerator.prepare) -> `load_checkpoint` (--resume) -> `loop`, with
`KeepBest` holding the best evaluation's weights. Precision and the Accelerator itself: accel.py.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .accel import FrozenWeightsCast, autocast_dtype, check_accelerator_precision, eval_batches, progress_shown, shards_weights
from .config import Recipe, recipe_argument
from .data import LengthGroupedSampler, TaskData, longest_first
from .distill import loss_for
from .dropout import use_fast_dropout
from .errors import ArtifactError, ConfigError, TrainingDiverged, TrainingInterrupted
from .export import disk_errors, write_atomic_dir
from .methods import NoSchedule, get_method
from .model import MMAP_THRESHOLD, largest_weight_copy, map_large_allocations
from .rundir import RECORD_FILE, TRAINER_STATE, atomic_write_text, checkpoint_path, checkpoints, json_text, log_path, seal_checkpoint
from .tasks import get_task, lower_is_better, unread_skipped
from .trackers import close_trackers, open_trackers

log = logging.getLogger(__name__)


class RunLog:
    """Metrics as JSONL (always) and to the experiment trackers of train.report_to (trackers.open_trackers: the same numeric
    values at the same steps, as `train/loss`, `eval/accuracy`, ..., and `run` adds the final evaluation's as
    `final_eval/...`, `final_test/...`), written by the main process only; the other ranks hold no file and no tracker.
    A context manager: the trackers are closed however the run ends, and before an --overwrite's staging folder is
    swapped in. Nothing is written before `open`: `run` opens a fresh run's at once, so a tracker that cannot start stops
    it before the data and the model load; a resumed run's opens once its checkpoint was checked (the loop), so a
    refused --resume leaves the folder as it was."""

    def __init__(self, out: Path, main: bool, recipe: Recipe):
        self.out, self.main, self.recipe = out, main, recipe
        self.path = log_path(out) if main else None
        self.trackers: list = []
        self.opened = False

    def open(self, resumed_at: int | None = None) -> None:
        """Create the log and start the trackers, once. `resumed_at`: the checkpoint's step a resumed run goes on from
        (the stopped run's lines after it go; TensorBoard hides its events from it on and gets that step's lines again)."""
        if self.opened:
            return
        self.opened = True
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.path.touch()  # first: a folder the trackers wrote into is known as a run's (even after a kill -9 at step 1)
            self.trackers = open_trackers(self.recipe, self.out, resumed_at)  # one that cannot start: a fresh run leaves no
            # folder (Job.abandon: its log is empty), a refused --resume its log whole (trimmed only once they all started)
            kept = self.drop_after(resumed_at) if resumed_at is not None else []
            for record in kept:  # TensorBoard hid the checkpoint's own step (a final evaluation logged there by the stopped
                if record["step"] == resumed_at:  # session goes with it): that step's lines, again
                    for tracker in self.trackers:
                        if tracker.name == "tensorboard":
                            tracker.log(scalars_of(record["kind"], record), step=resumed_at)

    def drop_after(self, step: int) -> list[dict]:
        """A resumed run logs again the steps after its checkpoint and its final evaluation: the stopped run's lines for
        them (and a line a kill cut short) go, so each shows once. -> the records kept."""
        if self.path is None or not self.path.is_file():
            return []
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                if record["step"] <= step and not record["kind"].startswith("final_"):
                    kept.append(record)
            except (ValueError, KeyError, TypeError):
                continue
        atomic_write_text(self.path, "".join(json_text(r) + "\n" for r in kept))
        return kept

    def write(self, step: int, kind: str, values: dict) -> None:
        if self.path is None:
            return
        with disk_errors("log", self.path, lambda: going_on(self.out)), self.path.open("a", encoding="utf-8") as f:  # (a traceback)
            f.write(json_text({"step": step, "kind": kind, **values, "time": time.time()}) + "\n")
        for tracker in self.trackers:
            tracker.log(scalars_of(kind, values), step=step)

    def close(self) -> None:
        close_trackers(self.trackers)

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def going_on(out: Path) -> str:
    """What a disk full in the middle of training says to do once there is space: the same command again is refused (the
    folder holds a run, and an --overwrite again would start over); --resume goes on from the last checkpoint."""
    earlier = checkpoints(out)
    return (f"continue from {earlier[-1]}: the same command plus --resume (in place of --overwrite, if you gave it)" if earlier
            else "train again with --overwrite: no earlier checkpoint holds the steps")


def scalars_of(kind: str, values: dict) -> dict:
    """A log line's numbers as the trackers get them: KIND/KEY (its step, kind and time are not scalars of the run)."""
    return {f"{kind}/{k}": v for k, v in values.items() if k not in ("step", "kind", "time") and isinstance(v, (int, float))}


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    history: list = field(default_factory=list)
    examples: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    train_seconds: float = 0.0
    wall_seconds: float = 0.0  # the loop's wall time (evaluations and checkpoints included) over every session, up to `step`
    best_schedule: Any = None  # the method's schedule at best_step (AdaLoRA's rank pattern): put back with keep_best's weights
    stopped_early: bool = False  # train.early_stopping ended the run before its last step
    num_processes: int | None = None  # the processes that wrote the checkpoint: --resume needs as many (rundir.processes_change)
    window_loss: float = 0.0  # the loss sum and count of the log window a checkpoint fell in (all ranks): a resumed run's
    window_items: float = 0.0  # next log line is the mean over the whole window, as it is without the stop
    frozen_sha256: str | None = None  # the frozen base that checkpoints leave out (checkpoint_keys), as trained on: --resume checks it
    lr: float | None = None  # the learning rate `step` ran at (the restored scheduler holds the next one's): loop's first line


class Window:
    """Loss, tokens and examples since the last log line. The loss stays on the device until `flush`: no host sync per
    step. Real tokens are the rows' own before padding (host ints from the loader: `with_real_tokens`), so the tail
    padding of a packed row, which has no attention mask to tell it apart, is not counted as real.

    Examples and real tokens are counted over all ranks, each row once: on N processes Accelerate tops the epoch's last
    batches up with rows from its start (even_batches: rank r's batch of that round holds the real rows tail - r x
    batch, first, then repeated ones), so of the last round only the real rows count (`tail`: rows per epoch mod batch x
    N; 0 when it divides). Each rank counts its own rows' examples (a packed row holds several) and tokens; settle sums
    them. Padded tokens count what was computed, repeated rows included."""

    def __init__(self, accelerator, tail: int = 0):
        self.acc, self.tail = accelerator, tail
        self.loss = torch.zeros((), device=accelerator.device)
        self.weight = torch.zeros((), device=accelerator.device)
        self.reset()

    def reset(self) -> None:
        self.loss.zero_()
        self.weight.zero_()
        self.examples = self.tokens = self.padded = 0
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, batch: dict, real_tokens: list[int], items: torch.Tensor, real_examples: list[int]) -> None:
        """`items`: the count (rows or labelled tokens) `loss` is the mean over: the logged loss is the mean over all
        of the window's, whatever the batch size, accumulation and processes (as pool_gradients trains a step).
        `real_tokens`, `real_examples`: each row's (with_real_tokens)."""
        self.loss += loss.detach() * items
        self.weight += items
        n = len(real_examples)
        last = self.tail and self.acc.gradient_state.end_of_dataloader  # the epoch's last round of batches
        real = min(max(self.tail - self.acc.process_index * n, 0), n) if last else n  # this rank's rows not repeated
        self.tokens += sum(real_tokens[:real])
        self.examples += sum(real_examples[:real])
        self.padded += batch["input_ids"].numel()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @contextmanager
    def paused(self):
        t0 = time.perf_counter()
        yield
        self.start += time.perf_counter() - t0

    def settle(self, state: TrainState) -> tuple[int, int, float]:
        """Add the examples, tokens and time counted so far to `state` (all ranks; before every checkpoint, so a resumed
        run's totals are whole) and count again from zero; the loss keeps adding up until `flush`.
        -> (examples, real tokens, seconds) added."""
        elapsed = self.elapsed()
        counts = torch.tensor([self.examples, self.tokens, self.padded], dtype=torch.long, device=self.acc.device)
        examples, tokens, padded = self.acc.reduce(counts, "sum").tolist()  # all ranks': one collective
        state.examples += examples
        state.tokens += tokens
        state.padded_tokens += padded
        state.train_seconds += elapsed
        self.examples = self.tokens = self.padded = 0
        self.start = time.perf_counter()
        return examples, tokens, elapsed

    def carry(self, state: TrainState) -> None:
        """Before a checkpoint: the window's loss so far (all ranks) into `state`, for a resumed run's `resume`."""
        state.window_loss, state.window_items = self.acc.reduce(torch.stack([self.loss, self.weight]), "sum").tolist()

    def resume(self, state: TrainState) -> None:
        """A resumed run's window starts with the stopped one's loss so far (on the main process: the sum over ranks)."""
        if self.acc.is_main_process:
            self.loss += state.window_loss
            self.weight += state.window_items

    def flush(self, state: TrainState) -> dict:
        """-> this window's loss and throughput (all ranks); adds its totals to `state` and starts a new window."""
        examples, tokens, elapsed = self.settle(state)
        elapsed = max(elapsed, 1e-9)
        loss, weight = self.acc.reduce(torch.stack([self.loss, self.weight]), "sum").tolist()
        record = {"loss": loss / max(weight, 1e-12), "examples_per_s": examples / elapsed,
                  "tokens_per_s": tokens / elapsed, "epoch": state.epoch, "train_s": state.train_seconds}
        self.reset()
        return record


def loss_items(batch: dict) -> torch.Tensor:
    """How many terms the batch's mean loss averages: its rows (a label per row: classification, distillation), or its
    labelled tokens (token labels; a task whose loss predicts the next token and labels a row's first token says so:
    clm's `loss_items`)."""
    labels = batch["labels"]
    return torch.tensor(labels.shape[0], device=labels.device) if labels.dim() == 1 else (labels != -100).sum()


def engine_owns_gradients(accelerator) -> bool:
    """FSDP and DeepSpeed keep the gradients themselves (sharded, or in the engine): they are not rescaled, so their
    micro-batches stay each its own mean (README, gradient accumulation)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def labelled_per_row(ds, rows: int = 256) -> float:
    """The mean labelled tokens of a training row (of the first `rows`; 1 for a label per row, or labels drawn by the
    collator): with the batch size, the scale pooled micro-batches go backward at, so their sums stay the size of a
    mean (fp16's loss scaler keeps its headroom). The same on every rank; no random draw."""
    if "labels" not in ds.column_names or len(ds) == 0:
        return 1.0
    counts = [sum(y != -100 for y in row) if isinstance(row, list) else 1 for row in ds.select(range(min(rows, len(ds))))["labels"]]
    return max(sum(counts) / len(counts), 1.0)


def pool_gradients(optimizer, items: torch.Tensor, accelerator, scale: float) -> None:
    """Each micro-batch went backward as its mean loss x its count / scale, which DDP averaged over the ranks and
    Accelerate divided by grad_accum: rescaled here to the gradient of one mean over the step's count on every rank
    (transformers' num_items_in_batch). Without it a micro-batch with few labelled tokens (a short answer) or few rows
    (an epoch's last) weighed as much as a full one. No host sync: the factor stays a tensor."""
    total = accelerator.reduce(items.float(), "sum") if accelerator.num_processes > 1 else items.float()
    factor = accelerator.gradient_accumulation_steps * accelerator.num_processes * scale / total.clamp(min=1)
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, factor.to(grads[0].device))


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.named_parameters() if v.requires_grad}


def optimizer_for(model, recipe: Recipe) -> torch.optim.Optimizer:
    """AdamW over the method's parameter groups (default: no weight decay on biases and norm weights; LoRA+: LoRA's B
    matrices at lr x adapter.loraplus_lr_ratio)."""
    impl, groups = recipe.train.optimizer_impl, get_method(recipe.adapter.method).param_groups(model, recipe)
    if impl == "auto":
        try:  # torch checks the parameters' devices and dtypes against its fused kernels (on copies: it fills the groups in)
            return torch.optim.AdamW([dict(g) for g in groups], lr=recipe.train.lr, fused=True)
        except RuntimeError:
            impl = "foreach"
    return torch.optim.AdamW(groups, lr=recipe.train.lr, foreach=impl == "foreach", fused=impl == "fused" or None)


def train_loader(data: TaskData, t, processes: int) -> DataLoader:
    """Shuffled each epoch (seed + epoch, the same on every rank); grouped by length unless train.group_by_length=false.
    Groups are cut at the rows of one optimizer step (Accelerate deals consecutive batches to the ranks), so a step of
    N ranks x batch B x accumulation A sees the same rows as 1 rank x batch N*B*A."""
    collate = with_real_tokens(data.collate)
    # Every loader gets its own generator: without one, each iter() draws a seed from the global RNG, so a resumed run
    # (a fresh iterator mid-epoch) or an extra evaluation would shift every later dropout mask.
    g = torch.Generator().manual_seed(t.seed)
    if data.train_sampler is not None:  # the task's own order (multitask: blocks of one task's rows per step)
        return DataLoader(data.train, batch_size=t.batch_size, sampler=data.train_sampler(t, processes), collate_fn=collate,
                          generator=g)
    if t.group_by_length:
        sampler = LengthGroupedSampler(data.train["length"], t.batch_size * processes * t.grad_accum, t.seed)
        return DataLoader(data.train, batch_size=t.batch_size, sampler=sampler, collate_fn=collate, generator=g)
    return DataLoader(data.train, batch_size=t.batch_size, shuffle=True, collate_fn=collate, generator=g)


def with_real_tokens(collate):
    """The task's collate + `real_tokens`: each row's tokens before padding, and `real_examples`: each row's examples (a
    packed row holds several: sft's n_examples); host ints, popped before the forward (Window.add)."""
    def collate_counted(rows):
        return {**collate(rows), "real_tokens": [len(r["input_ids"]) for r in rows],
                "real_examples": [r.get("n_examples", 1) for r in rows]}

    return collate_counted


def eval_loader(ds, batch_size: int, collate) -> DataLoader:
    """Evaluation sorted by length: batches of similar lengths waste little padding. Metrics do not depend on order."""
    return DataLoader(longest_first(ds), batch_size=batch_size, collate_fn=collate,
                      generator=torch.Generator())  # leaves the global RNG (training's dropout) alone: see train_loader


class _TiedWeightsNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


@contextmanager
def tied_weights_note_hidden():
    """accelerate warns at every checkpoint of a model with tied weights (an LLM's lm_head and embeddings) that it saved
    one copy: expected, and --resume restores them (tested), so the warning is dropped while a checkpoint is saved."""
    note, logger = _TiedWeightsNote(), logging.getLogger("accelerate.utils.other")
    logger.addFilter(note)
    try:
        yield
    finally:
        logger.removeFilter(note)


def save_checkpoint(accelerator, out: Path, state: TrainState, best: dict | None, keep: int, recipe: Recipe | None = None) -> None:
    """Write checkpoints/step-N atomically (staged, then renamed), sealed with its recipe and the sha256 of its files
    (rundir.seal_checkpoint: --resume checks both), then prune old ones."""
    from safetensors.torch import save_file

    final = checkpoint_path(out, state.step)
    root = final.parent

    slimmed = []

    def leave_out_frozen_base(models, weights, output_dir) -> None:  # Accelerate's hook: the weights it is about to write
        for model, weights_of_model in zip(models, weights):  # (none under FSDP and DeepSpeed, which write their own)
            keep, _ = checkpoint_keys(model, accelerator)
            for key in [k for k in weights_of_model if k not in keep]:
                del weights_of_model[key]
            slimmed.append(model)

    def fill(tmp: Path) -> None:
        accelerator.wait_for_everyone()  # the main process made tmp; every rank writes its own RNG state into it
        hook = accelerator.register_save_state_pre_hook(leave_out_frozen_base)
        try:
            with tied_weights_note_hidden():
                accelerator.save_state(str(tmp), safe_serialization=True)
        finally:
            hook.remove()
        if accelerator.is_main_process:
            if slimmed and state.frozen_sha256 is None:  # once a run: the frozen base does not change while training
                state.frozen_sha256 = frozen_sha256(checkpoint_keys(slimmed[0], accelerator)[1], accelerator.unwrap_model(slimmed[0]))
            if best is not None:
                save_file(best, str(tmp / "best_trainable.safetensors"))
            state.num_processes = accelerator.num_processes
            (tmp / TRAINER_STATE).write_text(json.dumps(state.__dict__))
            seal_checkpoint(tmp, recipe.to_yaml() if recipe is not None else None)
        accelerator.wait_for_everyone()  # all ranks' files are in tmp before the main process renames it

    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    write_atomic_dir(final, fill, main=accelerator.is_main_process, again=going_on(out))
    if accelerator.is_main_process:
        for p in checkpoints(out)[:-keep]:
            shutil.rmtree(p, ignore_errors=True)


@contextmanager
def signals_to(handler: Callable[[int], None]):
    """Inside: a SIGINT or SIGTERM calls handler(signum), the handlers from before back at once (so a second signal
    acts as it would have: Ctrl-C at once); restored on leaving. In the main thread only; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def restore():
        for s, before in previous.items():
            signal.signal(s, before)

    def on_signal(signum, frame):
        restore()
        handler(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        restore()


@contextmanager
def stop_on_signal():
    """The first Ctrl-C (SIGINT), or a SIGTERM (a scheduler's notice, a `kill`), asks the loop to stop after the
    current optimizer step (it then saves a checkpoint); a second one acts as it would have (Ctrl-C: at once).
    The flag's `signum` says which came."""
    flag = threading.Event()
    flag.signum = signal.SIGINT

    def ask(signum: int) -> None:
        flag.signum = signum
        flag.set()
        log.warning("%s: saving a checkpoint after this step (a second one aborts without saving)", signal.Signals(signum).name)

    with signals_to(ask):
        yield flag


def stop_at_once_on_signal(out: Path, step: int, merging: bool = False):
    """After the loop (the final evaluations and export): a Ctrl-C or SIGTERM stops at once with TrainingInterrupted,
    saying whether a checkpoint holds the trained steps (train.save_every saves the last one) for --resume to go on.
    `merging`: export.merge of the run in its folder `out` (run.merge_committed)."""

    def stop(signum: int) -> None:
        ckpt = checkpoint_path(out, step)
        if merging:
            what = f"the run was exported; its merge was cut short: `peftlab merge {out}` writes merged/."
        elif (out / RECORD_FILE).is_file():  # exported just before (an --overwrite's replaces the old run: Job.abandon)
            what = "the run was exported whole just before: nothing is lost."
        elif ckpt.is_dir():
            what = (f"checkpoint {ckpt} holds the trained model. Continue with the same command plus --resume (in place of "
                    "--overwrite, if you gave it): it evaluates and exports only.")
        else:
            what = "no checkpoint holds the trained steps (train.save_every is off), so train again with --overwrite."
        where = "the merge (export.merge)" if merging else "the final evaluation or export"
        raise TrainingInterrupted(f"interrupted after training (step {step}), in {where}: {what}", code=128 + signum)

    return signals_to(stop)


def stop_requested(flag: threading.Event, accelerator) -> bool:
    """Did any rank get a Ctrl-C? (All ranks must agree, since saving a checkpoint is collective.)"""
    if accelerator.num_processes == 1:
        return flag.is_set()
    return bool(accelerator.reduce(torch.tensor(float(flag.is_set()), device=accelerator.device), "sum").item())


def checkpoint_keys(model, accelerator) -> tuple[set[str], list]:
    """What a checkpoint holds of `model` (as prepared: a DDP wrapper's keys): what training changes (the trainable
    parameters, the buffers, an adapter's own frozen tensors: VeRA's projections, AdaLoRA's ranks), not the frozen
    base, which --resume builds again as the first session did (a LoRA r16 all-linear checkpoint of SmolLM2-135M: 19 MB of weights, not 532 MB;
    nor a 4-bit base's quantization state, which its load does not take back). -> (kept state-dict keys, the frozen
    base's (name, tensor) pairs left out)."""
    adapters = set(getattr(accelerator.unwrap_model(model), "peft_config", None) or ())
    own = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad or adapters & set(n.split("."))}
    keep = own | {n for n, _ in model.named_buffers(remove_duplicate=False)}
    return keep, [(n, p) for n, p in model.named_parameters() if n not in keep]


def frozen_sha256(named: list, model=None) -> str | None:
    """The sha256 of the frozen base: its tensors (names and bytes), and with `model` what is built again from its
    config alone, unsaved: the config's values and the buffers no state dict holds (a rotary table from rope_theta).
    None when nothing is frozen (a full fine-tune)."""
    import hashlib

    if not named:
        return None
    digest = hashlib.sha256()
    if model is not None:
        config = getattr(model, "config", None)
        if hasattr(config, "to_dict"):  # (not where it is: the folder's name, the library version, a switch of the run's)
            values = {k: v for k, v in config.to_dict().items()  # (problem_type: set by the first forward with labels)
                      if k not in ("_name_or_path", "transformers_version", "use_cache", "problem_type")}
            digest.update(json.dumps(values, sort_keys=True, default=str).encode())
        kept = set(model.state_dict())
        named = [*named, *((n, b) for n, b in model.named_buffers() if n not in kept)]
    for name, tensor in named:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_checkpoint(accelerator, ckpt: Path) -> tuple[TrainState, dict | None]:
    """Restore model, optimizer, schedules and RNGs from a checkpoint (already verified: rundir.good_checkpoint).
    The model's weights are loaded leniently, after checking that the checkpoint holds all it keeps (checkpoint_keys),
    and the frozen base built again is checked against the one the checkpoint was trained on."""
    model = accelerator._models[0] if accelerator._models else None
    weights = ckpt / "model.safetensors"  # (one process's or DDP's; FSDP and DeepSpeed write their own)
    state = TrainState(**json.loads((ckpt / TRAINER_STATE).read_text()))
    if model is None or not weights.is_file():
        load_state(accelerator, ckpt)
    else:
        from accelerate.utils import id_tensor_storage
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as f:
            saved = set(f.keys())
        keep, frozen = checkpoint_keys(model, accelerator)
        names: dict = {}  # tied weights (an LLM's lm_head and embeddings) are saved once, under one of their names
        for name, tensor in model.state_dict().items():
            if name in keep:
                names.setdefault(id_tensor_storage(tensor) if isinstance(tensor, torch.Tensor) else name, []).append(name)
        missing = [group[0] for group in names.values() if not saved & set(group)]
        if missing:
            raise ArtifactError(f"checkpoint {ckpt} lacks {len(missing)} weight(s) of the model (e.g. {sorted(missing)[0]}): "
                                "it was written by another model. Start again without --resume (or with --overwrite).")
        if state.frozen_sha256 is not None and frozen_sha256(frozen, accelerator.unwrap_model(model)) != state.frozen_sha256:
            raise ArtifactError(f"--resume: the frozen base built now differs from the one checkpoint {ckpt} was trained on "
                                "(checkpoints leave it out, to be built again): were the weights or the config under model.name "
                                "changed since? Train again with --overwrite, or put the earlier base back.")
        load_state(accelerator, ckpt, strict=False)
    best = None
    if (ckpt / "best_trainable.safetensors").is_file():
        from safetensors.torch import load_file

        best = load_file(str(ckpt / "best_trainable.safetensors"))
    log.info("resumed from %s (step %d)", ckpt, state.step)
    return state, best


def load_state(accelerator, ckpt: Path, **kwargs) -> None:
    """accelerator.load_state, a file it needs and does not find named (rundir.checkpoint_problem checks for those it
    always writes; a layout it does not know, e.g. fp16's scaler.pt, reaches here)."""
    try:
        accelerator.load_state(str(ckpt), **kwargs)
    except FileNotFoundError as e:
        raise ArtifactError(f"--resume: checkpoint {ckpt} lacks {e.filename or e} (a copy cut short?). Move that checkpoint "
                            "folder away to resume from the one before it, or start again with --overwrite.") from None


def schedule_from_here(scheduler) -> None:
    """After a checkpoint loads: the next step's learning rate from this run's schedule. The optimizer's restored lr was
    the checkpointed run's next one, and a --resume may change the schedule's length (train.max_steps): the first
    resumed step ran at the old schedule's rate (3.4x the new one's, 400 steps resumed as 130). The scheduler's own
    step recomputes it at the restored step (for an unchanged schedule, the same value)."""
    scheduler.last_epoch -= 1
    scheduler.step()


def diverged(step: int, loss: float, t, accelerator) -> TrainingDiverged:
    """The error of a run whose loss or weights turned inf/nan: it suggests only what would change (a run already clipped
    at 1.0 or below, or already in fp32, is not told to set it)."""
    tries = [f"a lower learning rate (train.lr={t.lr:g} now; e.g. train.lr={t.lr / 10:g})"]
    if t.max_grad_norm is None or t.max_grad_norm > 1.0:
        tries.append(f"gradient clipping (train.max_grad_norm=1.0; now {t.max_grad_norm})")
    if accelerator.mixed_precision != "no":
        tries.append(f"train.precision=fp32 (now {accelerator.mixed_precision})")
    what = ", ".join(tries[:-1]) + f" or {tries[-1]}" if len(tries) > 1 else tries[0]
    return TrainingDiverged(f"training diverged: the loss is {loss} at step {step}, so nothing was exported. Try {what}, "
                            "then train again with --overwrite.")


def check_window_finite(window: Window, accelerator, step: int, t) -> None:
    """Before a checkpoint is written: the steps since the last log line (one host sync, at save steps only)."""
    loss = accelerator.reduce(window.loss.detach().clone(), "sum").item()
    if not math.isfinite(loss):
        raise diverged(step, loss, t, accelerator)


def check_weights_finite(model, accelerator, step: int, t) -> None:
    """Before export: every trained weight is finite (a loss can stay finite while a weight overflows)."""
    bad = sum(int(not torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad)
    if accelerator.reduce(torch.tensor(float(bad), device=accelerator.device), "sum").item():
        raise diverged(step, "finite but some trained weights are inf or nan", t, accelerator)


@dataclass
class Parts:
    """What `setup` builds for the loop: the prepared model, optimizer and loaders, the schedules, the run's length."""

    model: Any
    optimizer: torch.optim.Optimizer
    train_dl: Any
    eval_dl: Any  # None: no data.eval, nothing evaluated during training
    scheduler: Any
    schedule: Any  # the method's own (AdaLoRA's rank budget; for the others it does nothing)
    total: int
    steps_per_epoch: int
    epoch_tail: int  # real rows in the epoch's last round of batches (Window): rows per epoch mod batch x processes
    eval_context: dict  # tokenizer and recipe when the kept metric is generated (summarization with rougeL, ...)
    cast: FrozenWeightsCast  # train.cast_frozen: the frozen weights in the autocast dtype while the loop runs


def setup(recipe: Recipe, model, data: TaskData, accelerator, tokenizer=None) -> Parts:
    """Loaders, optimizer, compile, accelerator.prepare, LR schedule and the method's schedule, registered for
    checkpointing (before a checkpoint is loaded into them)."""
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    t, task = recipe.train, get_task(recipe.task.type)
    set_seed(t.seed)
    train_dl = train_loader(data, t, accelerator.num_processes)
    epoch_tail = len(train_dl.sampler) % (t.batch_size * accelerator.num_processes)
    generating = t.best_metric in getattr(task, "GENERATED_METRICS", ()) and tokenizer is not None
    context = {"tokenizer": tokenizer, "recipe": recipe} if generating else {}
    eval_collate = data.eval_collate if generating else data.collate
    eval_dl = eval_loader(data.eval, recipe.eval.batch_size, eval_collate) if data.eval is not None else None
    optimizer = optimizer_for(model, recipe)
    if t.dropout_impl == "fast":
        use_fast_dropout(model, per_example=t.packed_attention == "per_example")  # in place, before compile; CPU only at run time
    if t.lora_impl == "fused":
        from .fused_lora import use_fused_lora  # imports peft

        use_fused_lora(model)  # in place, after use_fast_dropout (it fuses FastDropout only); CPU training only at run time
    release = t.release_memory == "always" or t.release_memory == "auto" and largest_weight_copy(model) >= MMAP_THRESHOLD
    if release and accelerator.device.type == "cpu":
        map_large_allocations()  # the per-matmul weight copies (and large activations) go back, not into a fragmented heap
    if t.compile:
        model.compile(dynamic=True)  # in place: the module, its class and its state-dict keys stay as they are
    model, optimizer, train_dl = accelerator.prepare(model, optimizer, train_dl)
    if eval_dl is not None:
        eval_dl = accelerator.prepare(eval_dl)

    steps_per_epoch = max(1, math.ceil(len(train_dl) / t.grad_accum))
    total = t.max_steps if t.max_steps is not None else max(1, math.ceil(t.epochs * steps_per_epoch))  # 0: evaluate the base as is
    scheduler = get_scheduler(t.scheduler if t.scheduler != "constant" else "constant_with_warmup", optimizer,
                              num_warmup_steps=int(t.warmup_fraction * total), num_training_steps=total)
    accelerator.register_for_checkpointing(scheduler)
    schedule = get_method(recipe.adapter.method).schedule(accelerator.unwrap_model(model), recipe, total,  # AdaLoRA's rank budget
                                                          accelerator.register_for_checkpointing)
    cast = FrozenWeightsCast(model, autocast_dtype(accelerator) if t.cast_frozen else None)
    return Parts(model, optimizer, train_dl, eval_dl, scheduler, schedule, total, steps_per_epoch, epoch_tail, context, cast)


class KeepBest:
    """The best evaluation so far by train.best_metric (lower is better for a loss). Its step and score are kept in
    TrainState, which every checkpoint saves; with train.keep_best its trainable weights are held here (checkpoints save
    them too) and put back at the end when a later step was worse."""

    def __init__(self, t, weights: dict | None = None, schedule=None, metric_fn: str | None = None):
        self.metric, self.keep, self.weights, self.schedule = t.best_metric, t.keep_best, weights, schedule
        self.metric_fn = metric_fn  # eval.metric_fn: named when the metric is missing from the first evaluation

    def consider(self, state: TrainState, metrics: dict, model) -> None:
        if self.metric not in metrics and state.best_metric is not None:  # an earlier evaluation had it: eval.metric_fn
            log.warning("step %d: %s is missing from this evaluation (eval.metric_fn left it out): it cannot be the best "  # failed
                        "one.", state.step, self.metric)  # (raising here lost the run trained so far)
            return
        if self.metric not in metrics:
            raise ConfigError([f"train.best_metric={self.metric!r} is not a metric of this task: {sorted(metrics)}."
                               + (f" If eval.metric_fn={self.metric_fn} returns it, that function failed at this first "
                                  "evaluation (see its warning above): fix it and train again." if self.metric_fn else "")])
        score = metrics[self.metric]
        if math.isnan(score):  # never the best (every comparison with NaN is False: a first NaN stayed the best for good)
            log.warning("step %d: %s is NaN: this evaluation cannot be the best one.", state.step, self.metric)
            return
        if state.best_metric is None or (score < state.best_metric if lower_is_better(self.metric) else score > state.best_metric):
            state.best_metric, state.best_step = score, state.step
            self.weights = trainable_state(model) if self.keep else None
            state.best_schedule = self.schedule.snapshot() if self.keep and hasattr(self.schedule, "snapshot") else None

    @staticmethod
    def stale(state: TrainState) -> int:
        """Evaluations since the best one (train.early_stopping)."""
        return sum(h["step"] > state.best_step for h in state.history) if state.best_step is not None else 0

    def restore(self, model, state: TrainState) -> None:
        if self.weights is not None and state.best_step != state.step:
            log.info("keeping the best evaluation (step %d, %s %.4f), not the last step", state.best_step, self.metric,
                     state.best_metric)
            model.load_state_dict(self.weights, strict=False)
            if hasattr(self.schedule, "restore"):  # the model scored then (AdaLoRA: that step's ranks), not the last step's
                self.schedule.restore(state.best_schedule)


def train(recipe: Recipe, model, data: TaskData, accelerator, out: str | Path, *, resume_from: str | Path | None = None,
          tokenizer=None, runlog: RunLog | None = None, last_evaluation: Callable | None = None):
    """Run the optimisation; return (model with the kept weights loaded, TrainState). `resume_from`: a checkpoint to
    continue. `tokenizer` lets evaluations generate when the kept metric needs it (summarization with rougeL, ...).
    `runlog`: the log and trackers `run` opened (else the loop opens its own in `out`, and closes it).
    `last_evaluation`: model -> metrics, the final evaluation's own pass over data.eval (`run` keeps the last one it made):
    the last step's evaluation (and one that early stopping may make the last) calls it instead of the loop's, where that
    one is as complete (`final_form`), so a run whose exported weights are the last step's does not score data.eval twice.
    A loss that turns inf/nan stops the run (TrainingDiverged): checked at log and save steps, not every step."""
    recipe, out, resume_from = recipe_argument(recipe, "train"), Path(out), resume_from and Path(resume_from)
    check_accelerator_precision(recipe, accelerator)
    with unread_skipped(model, recipe) as trimmed:  # (for the training only: the model handed back reads as loaded)
        if trimmed:
            log.info("train.skip_unread: %d layer(s) compute only the positions the head reads", len(trimmed))
        parts = setup(recipe, model, data, accelerator, tokenizer)
        state, weights = load_checkpoint(accelerator, resume_from) if resume_from is not None else (TrainState(), None)
        if state.step > parts.total:  # it would export a run longer than its recipe says, silently
            raise ConfigError([f"--resume: checkpoint {resume_from} is at step {state.step}, past the {parts.total} steps this "
                               f"recipe trains (train.max_steps / train.epochs). Resume with at least {state.step} steps, e.g. "
                               f"train.max_steps={state.step}."])
        if resume_from is not None:
            schedule_from_here(parts.scheduler)
        best = KeepBest(recipe.train, weights, parts.schedule, recipe.eval.metric_fn)
        loop(recipe, parts, data, accelerator, out, state, best, resumed=resume_from is not None, runlog=runlog,
             last_evaluation=last_evaluation if final_form(recipe, parts) else None)
        best.restore(accelerator.unwrap_model(parts.model), state)
        check_weights_finite(parts.model, accelerator, state.step, recipe.train)
        parts.schedule.finish()
    return parts.model, state


def final_form(recipe: Recipe, parts: Parts) -> bool:
    """The loop's evaluation scores what the final one does (the task's evaluation needs no tokenizer, or the loop
    gives it one: a generated kept metric) and no method schedule changes the weights after the last step (AdaLoRA's
    last masking): its last one can be the final evaluation's pass over data.eval, at no extra cost."""
    task = get_task(recipe.task.type)
    return (bool(parts.eval_context) or not hasattr(task, "GENERATED_METRICS")) and isinstance(parts.schedule, NoSchedule)


def loop(recipe: Recipe, parts: Parts, data: TaskData, accelerator, out: Path, state: TrainState, best: KeepBest, *,
         resumed: bool = False, runlog: RunLog | None = None, last_evaluation: Callable | None = None) -> None:
    """The steps from state.step to the end: forward, backward, clip, step; log, evaluate, checkpoint on schedule."""
    t, task = recipe.train, get_task(recipe.task.type)
    model, optimizer, train_dl, eval_dl, scheduler = parts.model, parts.optimizer, parts.train_dl, parts.eval_dl, parts.scheduler
    total, steps_per_epoch, resume = parts.total, parts.steps_per_epoch, resumed
    if state.stopped_early:  # resumed from the checkpoint where train.early_stopping ended it: no more steps
        total = state.step
    window = Window(accelerator, parts.epoch_tail)
    if resumed:
        window.resume(state)
    # the task's own loss (e.g. LM losses on the labelled positions only: tasks/generative.py), or train.distill's (distill.py)
    task_loss = loss_for(t.distill) if t.distill else getattr(task, "loss", None)
    # a step of several micro-batches (grad_accum, processes) is one mean over all its rows or labelled tokens, as one
    # batch of them all would be: each micro-batch's mean, weighted by its count, over the step's count (pool_gradients)
    pooled = accelerator.gradient_accumulation_steps * accelerator.num_processes > 1 and not engine_owns_gradients(accelerator)
    items_of, step_items = getattr(task, "loss_items", loss_items), 0
    scale = t.batch_size * labelled_per_row(data.train) if pooled else 1.0  # a micro-batch's sum / scale: a mean's size

    def evaluate() -> None:
        train_s = state.train_seconds + window.elapsed()  # training time so far, evaluations excluded
        # folded as the final evaluations are (adapter_folded), into the fp32 weights (not the cast copies): autocast casts them
        # under fork_rng: the evaluation's draws (its loader's seed, a task's own draws) leave the training's random
        # stream as it was, so how often a run evaluates does not change what it trains
        with torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else []), parts.cast.suspended():
            # the last step's evaluation, or one after which train.early_stopping ends the run unless it improves (its weights
            # exported unless keep_best exports an earlier step's): the final evaluation's own pass (folds and casts as below)
            may_end = t.early_stopping and not t.keep_best and best.stale(state) + 1 >= t.early_stopping
            if last_evaluation is not None and (state.step == parts.total or may_end):
                metrics = last_evaluation(model)
            else:
                with adapter_folded(accelerator.unwrap_model(model), recipe, accelerator):
                    metrics, _ = task.evaluate(model, eval_batches(eval_dl, accelerator), accelerator, data.label_names, **parts.eval_context)
        runlog.write(state.step, "eval", {**metrics, "train_s": train_s})
        state.history.append({"step": state.step, **metrics})
        best.consider(state, metrics, accelerator.unwrap_model(model))
        if accelerator.is_main_process and progress_shown():  # tqdm.write prints even where the bar is disabled
            bar.write(f"step {state.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    session, wall_before = time.perf_counter(), state.wall_seconds

    def settle_wall() -> None:  # a resumed run's wall time adds up: the stopped sessions' up to their checkpoint, then this one's
        state.wall_seconds = wall_before + time.perf_counter() - session

    def checkpoint() -> None:
        window.settle(state)  # the steps since the last log line count in the saved totals
        window.carry(state)  # and in the next log line's loss
        settle_wall()
        with parts.cast.suspended():  # the fp32 weights go into the checkpoint, as they were loaded
            save_checkpoint(accelerator, out, state, best.weights, t.keep_checkpoints, recipe)

    def interrupt() -> None:  # a Ctrl-C or SIGTERM: checkpoint this step, then stop
        checkpoint()
        bar.close()
        raise TrainingInterrupted(f"interrupted at step {state.step} of {total}: checkpoint saved to "
                                  f"{checkpoint_path(out, state.step)}. Continue with the same command plus "
                                  "--resume (in place of --overwrite, if you gave it).", code=128 + stop.signum)

    def log_line(lr: float) -> None:
        record = {**window.flush(state), "lr": lr}
        runlog.write(state.step, "train", record)
        if not math.isfinite(record["loss"]):
            raise diverged(state.step, record["loss"], t, accelerator)
        bar.set_postfix(loss=f"{record['loss']:.4f}", ex_s=f"{record['examples_per_s']:.3g}")

    model.train()
    with nullcontext(runlog) if runlog is not None else RunLog(out, accelerator.is_main_process, recipe) as runlog, \
            stop_on_signal() as stop, parts.cast:
        with window.paused():  # a resume starts its trackers here (wandb: seconds): not training time
            runlog.open(state.step if resumed else None)
        # (the bar after the trackers: one that cannot start says so on a line of its own)
        bar = tqdm(total=total, initial=state.step, desc="train", unit="step", disable=not progress_shown(accelerator),
                   dynamic_ncols=True)
        if resumed and 0 < state.step == total:  # resumed at its last step: what the stopped run left to later
            if state.window_items and state.lr is not None:  # (a resume shortened to its checkpoint's step) the step's line
                log_line(state.lr)
            if eval_dl is not None and all(h["step"] != state.step for h in state.history):
                with window.paused():  # the last step's evaluation, which a stop during that step left out (below)
                    evaluate()
        while state.step < total:
            train_dl.set_epoch(state.epoch)
            if hasattr(data.collate, "set_epoch"):  # a collator that draws at random (mlm's masks): this epoch's draws
                data.collate.set_epoch(t.seed, state.epoch)
            batches_done = (state.step - state.epoch * steps_per_epoch) * t.grad_accum if resume else 0
            loader = accelerator.skip_first_batches(train_dl, batches_done) if batches_done else train_dl
            resume = False
            for batch in loader:
                real_tokens, real_examples = batch.pop("real_tokens"), batch.pop("real_examples")
                with accelerator.accumulate(model):
                    loss = task_loss(model, batch, accelerator) if task_loss else model(**batch).loss
                    items = items_of(batch)
                    accelerator.backward(loss * (items / scale) if pooled else loss)
                    if pooled:
                        step_items += items
                        if accelerator.sync_gradients:
                            pool_gradients(optimizer, step_items, accelerator, scale)
                            step_items = 0
                    if accelerator.sync_gradients and t.max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                    optimizer.step()
                    if accelerator.sync_gradients:
                        parts.schedule.step(state.step + 1)  # reads this step's gradients: before zero_grad
                    optimizer.zero_grad(set_to_none=True)
                window.add(loss, batch, real_tokens, items, real_examples)
                if not accelerator.sync_gradients:
                    continue
                lr = state.lr = scheduler.get_last_lr()[0]  # the step's own (after scheduler.step(): the next one's; 0 at the last)
                scheduler.step()
                state.step += 1
                bar.update(1)
                if state.step % t.log_every == 0 or state.step == total:  # the only host sync of the step
                    log_line(lr)
                if state.step == total and stop_requested(stop, accelerator):  # stopped during the last step: at once, not
                    interrupt()  # after a whole evaluation (--resume makes it). Earlier evaluations run: the checkpoint keeps
                    # them for early stopping and keep_best, as a run never stopped has them at that point
                if eval_dl is not None and (state.step == total or (t.eval_every and state.step % t.eval_every == 0)):
                    with window.paused():  # eval time is not training throughput
                        evaluate()
                    if t.early_stopping and best.stale(state) >= t.early_stopping and state.step < total:
                        if accelerator.is_main_process and progress_shown():  # (every rank stops; one says so)
                            bar.write(f"step {state.step}: {t.best_metric} has not improved for {t.early_stopping} evaluations "
                                      f"(best {state.best_metric:.4f} at step {state.best_step}): stopping early "
                                      "(train.early_stopping)")
                        state.stopped_early = True
                        total = state.step
                        if state.step % t.log_every:  # the steps since the last log line: logged and counted, as at the end
                            log_line(lr)
                if t.save_every and (state.step % t.save_every == 0 or state.step >= total):  # the last step's too: a
                    # stop in the final evaluation or export then loses no training (--resume goes on from there)
                    check_window_finite(window, accelerator, state.step, t)  # never checkpoint a diverged run
                    checkpoint()
                if stop_requested(stop, accelerator):
                    interrupt()
                if state.step >= total:
                    break
            else:
                state.epoch += 1
    settle_wall()
    bar.close()


# ---------------------------------------------------------------------------------------------- folded evaluation

@contextmanager
def adapter_folded(model, recipe: Recipe, accelerator):
    """eval.merge_adapter: a mergeable adapter (LoRA, DoRA, IA3, ...) added into its fp32 base's weights for every
    evaluation, during training and after it: the same function, one matmul per layer instead of the base's plus the
    adapter's own pass, so scoring and generation run faster, and under bf16 autocast the only faithful one. Unfolded,
    a young adapter's output (1e-4 of the base's in SmolLM2 after one step) is added to the base's in bf16 and mostly
    rounded away: that step's verbalizer loss read 1.64 unfolded, 1.18 folded, 1.14 in fp32 (either way), so
    train.keep_best chose by rounding. Folded, the update sits in the fp32 weight that autocast casts once per matmul.
    The adapted weights are folded into copies and the originals put back afterwards (bit-exact; one extra copy of those
    weights while it runs). Left unfolded: bases whose adapted weights are not fp32 (4/8-bit or bf16 weights would hold
    the update in their own rounding), sharded weights, a model holding several adapters, methods that do not merge
    (prompt tuning, full, frozen)."""
    fold = (recipe.eval.merge_adapter and not shards_weights(accelerator) and get_method(recipe.adapter.method).mergeable
            and len(getattr(model, "peft_config", {})) == 1 and adapted_weights_fp32(model))
    if not fold:
        yield
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    params = [p for m in model.modules() if isinstance(m, BaseTunerLayer) for p in m.get_base_layer().parameters(recurse=False)]
    originals = [p.data for p in params]
    for p in params:
        p.data = p.data.clone()  # merged in place into the copies
    model.merge_adapter()
    try:
        yield
    finally:
        with warnings.catch_warnings():  # IA3's unmerge divides by its scales, inexactly: the originals come back anyway
            warnings.filterwarnings("ignore", message="Unmerge result can be inaccurate")
            model.unmerge_adapter()  # peft's record of what is merged; the weights themselves are the originals again:
        for p, data in zip(params, originals):
            p.data = data


def adapted_weights_fp32(model) -> bool:
    """Every layer an adapter wraps keeps its base weight in fp32 (not bf16, fp16, or 4/8-bit)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    bases = [m.get_base_layer() for m in model.modules() if isinstance(m, BaseTunerLayer)]
    return bool(bases) and all(getattr(b, "weight", None) is not None and b.weight.dtype == torch.float32 for b in bases)
