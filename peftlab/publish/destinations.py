"""Where a publish folder goes: the folder itself (what is published, written atomically), the Hub, a git remote.

The token comes from huggingface_hub's usual places (HF_TOKEN, `hf auth login`); peftlab never reads, prints or
stores it, and every error passes through `redact` before it is shown.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from contextlib import nullcontext
from fnmatch import fnmatch
from pathlib import Path

from ..errors import PublishError
from ..export import check_destination, weights_file, write_atomic_dir
from ..rundir import RECIPE_FILE, RECORD_FILE, RunDir, check_writable, holds_run
from .card import KNOWN_BASES, PublicRun, card_text, check_card, check_nothing_local, is_local_model, local_roots, scrub

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_config.json", "model.safetensors", "config.json", "generation_config.json")
MERGE_FILE = "merge.json"  # a `peftlab merge` folder's: the adapter and base it was merged from (the card cites it)
RECORD_FILES = (RECIPE_FILE, RECORD_FILE, "metrics.json", "eval_report.json", MERGE_FILE)
EVALUATIONS = "eval-*.json"  # what `peftlab eval OUT` wrote into OUT (metrics and report, no path): the card reports them
CONFIG_FILES = ("adapter_config.json", "config.json", "generation_config.json")  # rewritten without local paths
TOKENIZER_GLOBS = ("tokenizer*.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json",
                   "merges.txt", "spiece.model", "sentencepiece.bpe.model", "chat_template.j*")
# What a published run is made of: on re-publishing, these files of the repo (branch) go and the new run's come, so no
# weight, config or tokenizer file of an earlier upload is left to be loaded with the new one (a full model's
# config.json + model.safetensors beside a new adapter loads as neither run). Other files (images, notes) stay.
RUN_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.index.json", *CONFIG_FILES, *RECORD_FILES, EVALUATIONS,
             *TOKENIZER_GLOBS, "README.md")


def is_run_file(name: str) -> bool:
    """A top-level file a published run is made of (RUN_GLOBS)."""
    return any(fnmatch(name, g) for g in RUN_GLOBS)


BRANCH = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,99}")
LOGIN_HINT = "Log in with `hf auth login` (a token with write access, https://huggingface.co/settings/tokens) or set HF_TOKEN."


def check_branch(branch: str | None) -> str | None:
    if branch is not None and (not BRANCH.fullmatch(branch) or ".." in branch or branch.endswith((".lock", "/", "."))
                               or "//" in branch):
        raise PublishError(f"--revision {branch!r} is not a usable branch name. Use letters, digits, '-', '_', '.', '/', "
                           "e.g. --revision v2 or --revision experiments/r16.")
    return branch


def redact(text: str) -> str:
    """Drop credentials from URLs (https://user:token@host) and anything shaped like a Hub token."""
    text = re.sub(r"(://)[^/@\s]+@", r"\1***@", text)
    return re.sub(r"hf_[A-Za-z0-9]{8,}", "hf_***", text)


# ------------------------------------------------------------------------------------------ the folder

def publish_files(out: Path) -> list[Path]:
    """The files of OUT that are published: weights, tokenizer, records. Never checkpoints, logs, merged/ or dot-files."""
    weights_file(out)  # a clear error when OUT holds no weights
    names = [n for n in (*WEIGHT_FILES, *RECORD_FILES) if (out / n).is_file()]
    names += sorted(p.name for p in out.iterdir() if p.is_file() and any(fnmatch(p.name, g) for g in TOKENIZER_GLOBS))
    names += sorted(p.name for p in out.glob(EVALUATIONS))  # `peftlab eval`'s own figures (a composition's only ones)
    return [out / n for n in dict.fromkeys(names)]


def fill_folder(pub: PublicRun, dest: Path, repo_id: str | None = None, license: str | None = None) -> list[str]:
    """Write the publish folder of a run (read once: `card.read_public`) into the existing empty directory `dest`;
    -> its file names. recipe.yaml, run.json and the configs are the public copies: no path of the training machine
    goes out."""
    text = card_text(pub, repo_id, license=license)
    check_card(text)
    recipe, run = pub.public_recipe, pub.public_run
    base = pub.base_id or recipe.model.name
    for src in publish_files(pub.out):
        if src.name == RECIPE_FILE:
            (dest / src.name).write_text(recipe.to_yaml(), encoding="utf-8")
        elif src.name == RECORD_FILE:
            (dest / src.name).write_text(run.to_json(), encoding="utf-8")
        elif src.name in CONFIG_FILES:
            cfg, changed = json.loads(src.read_text()), []
            cfg = scrub(cfg, "", changed)
            if src.name == "adapter_config.json":  # the public id, so AutoPeftModel.from_pretrained(repo) finds the base
                changed.append(cfg.get("base_model_name_or_path"))
                cfg["base_model_name_or_path"] = base
            if changed:
                (dest / src.name).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            else:
                shutil.copy2(src, dest / src.name)
        elif src.name == MERGE_FILE:  # the base merged onto by its public name, as in adapter_config.json (a local folder's,
            stamp = json.loads(src.read_text())  # a packaged model's hub id)
            if is_local_model(merged_onto := (stamp.get("base") or {}).get("name")) or merged_onto in KNOWN_BASES:
                stamp["base"]["name"] = base
            (dest / src.name).write_text(json.dumps(scrub(stamp, "", []), indent=2) + "\n", encoding="utf-8")
        else:
            shutil.copy2(src, dest / src.name)
    (dest / "README.md").write_text(text, encoding="utf-8")
    check_nothing_local(dest, local_roots(pub))
    return sorted(p.name for p in dest.iterdir())


def write_folder(pub: PublicRun, target: Path, flag: str = "--to DIR", **card_kw) -> list[str]:
    """Write the publish folder to `target` atomically (a previous publish folder there is replaced)."""
    out, target = pub.out, Path(target)
    o, t = out.resolve(), target.resolve()
    if t == o or t in o.parents:
        raise PublishError(f"{target} would replace the run itself ({out}). Choose a separate directory.")
    check_destination(target, "--to", folder=True)
    if holds_run(target):
        raise PublishError(f"{target} holds a peftlab run: publishing there would replace it. Choose a new or empty directory "
                           "(--to DIR), or delete that run first if you mean to replace it.")
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / RECORD_FILE).is_file())):
        raise PublishError(f"{target} exists and is not a published adapter folder. Choose a new or empty directory.")
    if problem := _not_replaceable(target, published_as(pub.public_run.to_dict())):
        raise PublishError(f"{target} {problem}: publishing there would delete it. Choose a new or empty directory (--to DIR), "
                           "or move those files away first if you mean to replace them.")
    check_writable(target, "the publish folder", flag)  # (a dry run's OUT/publish too, which takes no lock)
    names: list[str] = []
    target.parent.mkdir(parents=True, exist_ok=True)
    # a second publish into the same folder is refused, not interleaved (a dry run's OUT/publish: no lock file in the run)
    with RunDir(target).lock() if t.parent != o else nullcontext():
        write_atomic_dir(target, lambda tmp: names.extend(fill_folder(pub, tmp, **card_kw)))
    return names


def published_as(record: dict) -> str | None:
    """What a publication is of: its run's name, or a composition's sources (its record, and name, are its first source's)."""
    if composition := record.get("composition"):
        return "a composition of " + ", ".join(str(s.get("name")) for s in composition.get("sources", []))
    return record.get("name")


def _not_replaceable(target: Path, name: str | None) -> str | None:
    """Why an earlier publish folder at `target` may not be replaced: it publishes another run (`published_as`), or holds
    files that publishing did not write (the user's own). None when it is this run's earlier publication, or no folder."""
    if not (target / RECORD_FILE).is_file():
        return None
    try:
        earlier = published_as(json.loads((target / RECORD_FILE).read_text()))
    except (OSError, ValueError, AttributeError):
        earlier = None
    if earlier != name:
        return f"holds the published adapter of another run ({earlier or 'unnamed'})"
    ours = {*WEIGHT_FILES, *RECORD_FILES, "README.md"}
    extra = sorted(p.name for p in target.iterdir()  # (eval-SPLIT.json: `peftlab eval`'s figures, published beside the run's)
                   if p.name not in ours and not any(fnmatch(p.name, g) for g in (*TOKENIZER_GLOBS, EVALUATIONS)))
    return f"holds files that publishing did not write ({', '.join(extra[:3])})" if extra else None


# ------------------------------------------------------------------------------------------ Hub and git

def _hub_error(e: Exception, repo_id: str, endpoint: str, created: bool) -> PublishError:
    from huggingface_hub.errors import HfHubHTTPError

    after = (f" The repo {repo_id} was created by this command but may not hold this run's files: run the same command "
             "again with --exist-ok." if created else "")
    if isinstance(e, HfHubHTTPError) and e.response is not None:
        code = e.response.status_code
        server = redact(str(e.server_message or "").strip())
        if code == 401:
            return PublishError(f"the Hub at {endpoint} refused the token (401 Unauthorized). {LOGIN_HINT} Nothing was published.")
        if code == 403:
            return PublishError(f"the token may not write to {repo_id} (403 Forbidden: {server}). Use a token with write access "
                                f"to the namespace '{repo_id.split('/')[0]}'. {LOGIN_HINT}{after}")
        if code == 409:
            return PublishError(f"the repo {repo_id} already exists. Pass --exist-ok to add a commit to it, or choose another "
                                "--repo-id. Nothing was published.")
        if code == 404:
            return PublishError(f"{repo_id} (or the branch) was not found at {endpoint}, or the token cannot see it (404). "
                                f"Check --repo-id and --revision.{after}")
        return PublishError(f"the Hub at {endpoint} answered {code}: {server or 'no message'}. Nothing was published.{after}")
    return PublishError(f"network error while publishing to {endpoint} ({type(e).__name__}: {redact(str(e))[:200]}). The upload "
                        f"did not complete; the run directory was not changed.{after}")


def _transport_errors() -> tuple[type[Exception], ...]:
    """Connection-level errors of the HTTP client huggingface_hub uses (httpx2 in 2.x, httpx in 1.x)."""
    import importlib

    found: list[type[Exception]] = [ConnectionError, TimeoutError]
    for name in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def push_to_hub(folder: Path, repo_id: str, *, private: bool = False, revision: str | None = None, endpoint: str | None = None,
                exist_ok: bool = False, message: str = "Upload adapter with peftlab") -> dict:
    """create_repo + (create_branch) + upload_folder, with errors that say what to do next."""
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError

    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    if constants.is_offline_mode():
        raise PublishError("HF_HUB_OFFLINE=1 is set, so huggingface_hub makes no network call. Publishing needs the Hub: "
                           "run with HF_HUB_OFFLINE=0, or write the folder with --dry-run / --to DIR / --git-remote URL.")
    if get_token() is None:
        raise PublishError(f"no Hugging Face token found. {LOGIN_HINT} Nothing was published.")
    api = HfApi(endpoint=endpoint)
    created = False
    try:
        api.create_repo(repo_id, private=private, exist_ok=exist_ok)
        created = not exist_ok
        if private and not api.repo_info(repo_id).private:  # create_repo(exist_ok) leaves an existing repo as it is
            raise PublishError(f"--private: the existing repo {repo_id} is public, and publishing to it would make this run "
                               f"public. Make it private first (its settings on {endpoint}/{repo_id}, or HfApi()"
                               ".update_repo_settings(repo_id, private=True)), or publish to a new repo. Nothing was published.")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        # an earlier run's files go (the uploaded ones stay): exact top-level names, as a pattern would also match in
        # subfolders (a user's gguf/model.gguf)
        stale = [f for f in api.list_repo_files(repo_id, revision=revision) if "/" not in f and is_run_file(f)]
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision, commit_message=message,
                                 delete_patterns=stale or None)
    except (HfHubHTTPError, *_transport_errors()) as e:
        raise _hub_error(e, repo_id, endpoint, created) from None
    except RuntimeError as e:  # an LFS transfer failed: huggingface_hub wraps the HTTP or network error
        if isinstance(e.__cause__, (HfHubHTTPError, *_transport_errors())):
            raise _hub_error(e.__cause__, repo_id, endpoint, created) from None
        raise
    except ValueError as e:  # the Hub's /api/validate-yaml refused the card's metadata
        raise PublishError(f"the Hub refused the model card: {redact(str(e))}. Nothing was published.") from None
    return {"url": f"{endpoint}/{repo_id}", "commit": info.oid, "commit_url": info.commit_url}


def _git(*args: str, cwd: Path | None = None) -> str:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
    r = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise PublishError(f"git {args[0]} failed: {redact(r.stderr.strip() or r.stdout.strip())}")
    return r.stdout.strip()


def push_to_git(folder: Path, remote: str, *, branch: str | None = None, message: str = "Upload adapter with peftlab") -> dict:
    """Commit the folder into a clone of `remote` and push it: an earlier run's files (RUN_GLOBS) go, other files of
    the branch stay."""
    if shutil.which("git") is None:
        raise PublishError("--git-remote needs git, which is not installed. Install git or use --to DIR.")
    branch = branch or "main"
    with tempfile.TemporaryDirectory(prefix="peftlab-git-") as tmp:
        clone = Path(tmp) / "repo"
        _git("clone", "--quiet", remote, str(clone))
        if _git("ls-remote", "--heads", "origin", f"refs/heads/{branch}", cwd=clone):
            _git("checkout", "--quiet", "-B", branch, f"origin/{branch}", cwd=clone)
        elif _git("branch", "-r", cwd=clone):
            _git("checkout", "--quiet", "-b", branch, cwd=clone)  # a new branch forks from the remote's default
        else:
            _git("symbolic-ref", "HEAD", f"refs/heads/{branch}", cwd=clone)  # empty remote
        for old in clone.iterdir():
            if old.is_file() and is_run_file(old.name):
                old.unlink()
        for src in folder.iterdir():
            shutil.copy2(src, clone / src.name)
        _git("add", "-A", cwd=clone)
        if not _git("status", "--porcelain", cwd=clone):
            return {"url": redact(remote), "branch": branch, "commit": _git("rev-parse", "HEAD", cwd=clone), "unchanged": True}
        who = [] if _git_config(clone, "user.email") else ["-c", "user.name=peftlab", "-c", "user.email=peftlab@localhost"]
        _git(*who, "commit", "--quiet", "-m", message, cwd=clone)
        _git("push", "--quiet", "origin", f"HEAD:refs/heads/{branch}", cwd=clone)
        return {"url": redact(remote), "branch": branch, "commit": _git("rev-parse", "HEAD", cwd=clone), "unchanged": False}


def _git_config(repo: Path, key: str) -> str:
    r = subprocess.run(["git", "config", key], cwd=repo, capture_output=True, text=True)
    return r.stdout.strip()


