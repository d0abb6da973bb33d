"""The run folder: the one owner of its layout, its lock, its staging and its checksums.

    runs/NAME/                      the run: weights, tokenizer, recipe.yaml, run.json, metrics.json, log.jsonl,
                                    checkpoints/step-N/ (each with recipe.yaml and checksums.json), merged/
    runs/.NAME.lock                 held (fcntl.flock) by the process writing runs/NAME; the OS releases it when that
                                    process ends, even by kill -9, so a crashed run never leaves it stuck
    runs/.NAME.staging/             an --overwrite builds the new run here; it replaces runs/NAME only when it finished
    runs/.NAME.old/                 the replaced run for the instant of the swap

An --overwrite that fails leaves runs/NAME as it was. Its staging folder is deleted, unless it holds checkpoints: then
`--resume` continues it (and still swaps it in only at the end), and a new `--overwrite` starts it over.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import ArtifactError

log = logging.getLogger(__name__)

LOCK_ENV = "PEFTLAB_OUTPUT_LOCK"  # set by `peftlab train --launch` for its ranks: the launcher process holds the lock
CHECKSUMS = "checksums.json"
STARTED = ("run.json", "checkpoints", "log.jsonl")
# Recipe keys a --resume may change: they steer logging, evaluation, saving and the length of the run, not the shapes or
# the numbers of the steps already taken. Any other difference from the checkpoint's recipe is refused.
RESUME_MAY_CHANGE = ("name", "output_dir", "train.epochs", "train.max_steps", "train.log_every", "train.eval_every",
                     "train.save_every", "train.keep_checkpoints", "train.compile", "train.optimizer_impl", "eval.", "export.")


# ------------------------------------------------------------------------------------------------- checksums

_sha_cache: dict[tuple, str] = {}


def sha256(path: Path) -> str:
    """Hex sha256 of a file; memoised on (path, inode, size, mtime) since eval, merge and publish re-read one run."""
    st = os.stat(path)
    key = (str(Path(path).absolute()), st.st_ino, st.st_size, st.st_mtime_ns)
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


def verify_weights(folder: Path, run: dict) -> None:
    """Check the weights against run.json's record. Runs written before the record named its file are not checked."""
    name, recorded = run.get("weights_file"), run.get("weights_sha256")
    if not name or not recorded:
        return
    path = Path(folder) / name
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: run.json records it as this run's weights. Copy the whole run folder again.")
    if sha256(path) != recorded:
        raise damaged(path, recorded, f"{Path(folder) / 'run.json'}")


def seal_checkpoint(folder: Path, recipe_yaml: str | None) -> None:
    """Store the resolved recipe and the sha256 of every file of a checkpoint (checked before --resume loads it)."""
    if recipe_yaml is not None:
        (folder / "recipe.yaml").write_text(recipe_yaml, encoding="utf-8")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    sums = {str(p.relative_to(folder)): sha256(p) for p in files}
    (folder / CHECKSUMS).write_text(json.dumps(sums, indent=1), encoding="utf-8")


def checkpoint_problem(ckpt: Path) -> str | None:
    """-> why this checkpoint cannot be loaded (a damaged or missing file), or None. Checkpoints without checksums
    (written by an older peftlab) are trusted."""
    if not (ckpt / CHECKSUMS).is_file():
        return None
    for name, recorded in json.loads((ckpt / CHECKSUMS).read_text()).items():
        path = ckpt / name
        if not path.is_file():
            return f"{path} is missing"
        if sha256(path) != recorded:
            return f"{path} is damaged (sha256 differs from {CHECKSUMS}; size {path.stat().st_size} bytes)"
    return None


# ----------------------------------------------------------------------------------------------- checkpoints

def checkpoints(folder: Path) -> list[Path]:
    """folder/checkpoints/step-N, oldest first."""
    found = [p for p in (Path(folder) / "checkpoints").glob("step-*") if p.name.split("-")[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(folder: Path) -> Path | None:
    ckpts = checkpoints(folder)
    return ckpts[-1] if ckpts else None


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


def recipe_changes(ckpt: Path, recipe_yaml: str) -> list[str]:
    """-> 'key: old -> new' for every key that differs from the checkpoint's recipe and that a resume may not change."""
    if not (ckpt / "recipe.yaml").is_file():
        return []
    old, new = (_flat(yaml.safe_load(t) or {}) for t in ((ckpt / "recipe.yaml").read_text(), recipe_yaml))
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys
            if not any(k == m or (m.endswith(".") and k.startswith(m)) for m in RESUME_MAY_CHANGE)]


# --------------------------------------------------------------------------------------------- the folder

def is_started(folder: Path) -> bool:
    return Path(folder).is_dir() and any((Path(folder) / f).exists() for f in STARTED)


def holds_run(folder: Path) -> bool:
    """A training run (finished or started) or a composed adapter: what publish --to and compose --out must never
    replace. A publish folder (README.md beside run.json, no log) is not one."""
    folder = Path(folder)
    if any((folder / f).exists() for f in ("log.jsonl", "checkpoints")):
        return True
    return (folder / "run.json").is_file() and not (folder / "README.md").is_file()


def unwritable(out: Path, e: OSError) -> ArtifactError:
    return ArtifactError(f"cannot write the run to {out}: {e.strerror or e}. Choose a writable folder: output_dir=DIR "
                         "(or name=NEW_NAME).")


def check_writable(out: Path) -> None:
    """One clear error when output_dir is a file, lies under a file, or cannot be written (before any work)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"output_dir {out} is a file, not a folder. Choose a folder: output_dir=DIR (or name=NEW_NAME).")
    probe = out.absolute().parent  # the lock and the staging folder live beside the run
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ArtifactError(f"output_dir {out} cannot be created: {probe} is a file. Choose a folder: output_dir=DIR.")
    for p in (probe, out) if out.is_dir() else (probe,):
        if not os.access(p, os.W_OK | os.X_OK):
            raise ArtifactError(f"cannot write the run to {out}: {p} is not writable (permission denied). Choose a writable "
                                "folder: output_dir=DIR (or name=NEW_NAME).")


@dataclass
class Job:
    """One training process's use of a run folder: where it writes (`work`) and the checkpoint it resumes from."""

    folder: RunDir
    work: Path
    checkpoint: Path | None = None
    committed: bool = False

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
            self.work.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise unwritable(f.out, e) from None

    def commit(self) -> None:
        """(main process) The run finished: an --overwrite's staging folder replaces the old run."""
        self.committed = True
        if self.staged:
            self.folder.swap()

    def abandon(self) -> None:
        """(main process) The run failed: the old run stays; staging is kept only if --resume can continue it."""
        if self.committed or not self.staged:
            return
        if checkpoints(self.work):
            log.warning("%s is unchanged. The new run's checkpoints are kept in %s: --resume continues it, --overwrite "
                        "starts it again.", self.folder.out, self.work)
        else:
            shutil.rmtree(self.work, ignore_errors=True)
            log.warning("%s is unchanged: the new run stopped before it finished.", self.folder.out)


class RunDir:
    """The folder of one run (`recipe.out`), and the siblings that keep it whole: lock, staging, retired copy."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        full = self.out.absolute()
        self.lock_file = full.parent / f".{full.name}.lock"
        self.staging = full.parent / f".{full.name}.staging"
        self.retired = full.parent / f".{full.name}.old"

    @property
    def finished(self) -> bool:
        return (self.out / "run.json").is_file()

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder against other writers. flock is released by the OS when the process dies: never stuck."""
        if os.environ.get(LOCK_ENV) == str(self.out.absolute()):
            yield  # `peftlab train --launch` holds it for the ranks it started
            return
        check_writable(self.out)
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks here
            yield
            return
        try:
            self.lock_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise unwritable(self.out, e) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                raise ArtifactError(f"output directory {self.out} is in use by another peftlab run (process {holder}). Wait "
                                    "for it to finish, or choose another folder: output_dir=DIR (or name=NEW_NAME).") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield
        finally:
            os.close(fd)  # releases the lock

    def recover(self) -> None:
        """(under the lock) Finish or undo a swap that a crash cut between its two renames."""
        if not self.retired.exists():
            return
        if not self.out.exists():
            source = self.staging if (self.staging / "run.json").is_file() else self.retired
            os.replace(source, self.out)
            log.warning("completed an interrupted replacement of %s (from %s)", self.out, source.name)
        shutil.rmtree(self.retired, ignore_errors=True)

    def swap(self) -> None:
        """Replace the run by the staging folder: two renames (the old run is moved aside first), then delete the old."""
        shutil.rmtree(self.retired, ignore_errors=True)
        if self.out.exists():
            os.replace(self.out, self.retired)
        os.replace(self.staging, self.out)
        _fsync_dir(self.out.absolute().parent)
        shutil.rmtree(self.retired, ignore_errors=True)

    def plan(self, *, resume: bool, overwrite: bool, recipe_yaml: str | None = None) -> Job:
        """Decide where this run writes, or refuse with the fix; reads only (every process runs it)."""
        check_writable(self.out)
        if resume and overwrite:
            raise ArtifactError("--resume and --overwrite together: --resume continues the run in the output directory, "
                                "--overwrite starts it again. Give one of them.")
        if resume:
            return self._resume_plan(recipe_yaml)
        if is_started(self.out):
            if overwrite:
                return Job(self, self.staging)
            hint = (f" An --overwrite of it was interrupted (its checkpoints are in {self.staging}): --resume continues it."
                    if checkpoints(self.staging) else "")
            raise ArtifactError(f"output directory {self.out} already holds a run. Continue it with --resume, replace it with "
                                f"--overwrite, or choose another one: output_dir=DIR (or name=NEW_NAME).{hint}")
        return Job(self, self.out)

    def _resume_plan(self, recipe_yaml: str | None) -> Job:
        work = self.staging if checkpoints(self.staging) else self.out
        if work == self.out and self.finished:
            raise ArtifactError(f"--resume: {self.out} holds a finished run; there is nothing to resume. Evaluate it "
                                f"(peftlab eval {self.out}), or train it again with --overwrite.")
        if not checkpoints(work):
            raise ArtifactError(f"--resume: no checkpoint in {self.out}/checkpoints. Set train.save_every=N to write "
                                "checkpoints, or start a fresh run without --resume.")
        ckpt = good_checkpoint(work)
        changes = recipe_changes(ckpt, recipe_yaml) if recipe_yaml is not None else []
        if changes:
            raise ArtifactError(f"--resume: the recipe differs from the one checkpoint {ckpt} was written with:\n  - "
                                + "\n  - ".join(changes) + "\nResume with the checkpoint's recipe (" + str(ckpt / "recipe.yaml")
                                + "), or start again with --overwrite. A resume may change only: " + ", ".join(RESUME_MAY_CHANGE))
        if work == self.staging:
            log.info("--resume: continuing the interrupted --overwrite in %s; %s stays as it is until it finishes",
                     self.staging, self.out)
        return Job(self, work, ckpt)

    @contextmanager
    def writing(self, *, resume: bool, overwrite: bool, recipe_yaml: str | None, main: bool) -> Iterator[Job]:
        """Lock (main process), plan, prepare; on failure the old run stays as it was. Call job.commit() when done."""
        with self.lock() if main else nullcontext():
            if main:
                self.recover()
            job = self.plan(resume=resume, overwrite=overwrite, recipe_yaml=recipe_yaml)
            if main:
                job.prepare()
            try:
                yield job
            except BaseException:
                if main:
                    job.abandon()
                raise


def _fsync_dir(path: Path) -> None:
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
