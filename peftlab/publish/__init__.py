"""Publishing a finished run: the model card, the destinations (Hub, a directory, a git remote), loading back.

`publish(OUT, repo_id)` turns a finished run into the folder a user downloads -- the adapter (or standalone model),
tokenizer, recipe.yaml, run.json, metrics.json, eval_report.json and a README.md model card generated from them --
and uploads it with huggingface_hub (create_repo + upload_folder). Checkpoints, logs and merged/ stay home. The folder
is built in a temporary directory, so a failed upload leaves OUT as it was.

    card.py          the model card and the public copy of the record (no local path goes out)
    destinations.py  the publish folder, the Hub, a git remote; their errors (credentials redacted)
    load.py          `load_adapter(id_or_path)`: a local folder that `export.load_trained` loads
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from ..errors import PublishError, path_argument
from .card import card_data, card_text, check_card, check_repo_id, read_public
from .destinations import check_branch, fill_folder, push_to_git, push_to_hub, write_folder
from .load import load_adapter

log = logging.getLogger(__name__)
__all__ = ["publish", "load_adapter", "card_text", "card_data", "check_card", "read_public", "fill_folder", "write_folder",
           "push_to_hub", "push_to_git"]


def publish(out: str | Path, repo_id: str | None = None, *, private: bool = False, revision: str | None = None,
            endpoint: str | None = None, exist_ok: bool = False, dry_run: bool | str | Path = False, to: str | Path | None = None,
            git_remote: str | None = None, base_model: str | None = None, license: str | None = None) -> dict:
    """Publish a finished run: to the Hub (default), to a directory (`to`), to a git remote, or only write the folder
    that would be uploaded (`dry_run`: True = OUT/publish, or a directory). -> where it went and what it holds."""
    for flag, value in (("--to", to), ("--git-remote", git_remote), ("--dry-run", None if isinstance(dry_run, bool) else dry_run)):
        if value is not None and not str(value).strip():  # ('' read as not given: the Hub's --repo-id was asked for)
            raise PublishError(f"{flag} is empty: give {'a URL' if flag == '--git-remote' else 'a directory'}, or leave it out.")
    # ('~/x' quoted, or --to=~/x, reaches here unexpanded: it made a folder named '~' in the working directory)
    if to:
        to = Path(to).expanduser()
    if dry_run and dry_run is not True:
        dry_run = Path(dry_run).expanduser()
    pub = read_public(path_argument(out, "publish(out)").expanduser(), base_model)  # the only read of the run: the card and the folder use these copies
    recipe, run = pub.recipe, pub.run
    if to and git_remote:
        raise PublishError("give one destination: --to DIR or --git-remote URL (or neither, for the Hub).")
    if repo_id is not None:
        check_repo_id(repo_id)
    elif not (dry_run or to or git_remote):
        raise PublishError("publishing to the Hub needs --repo-id NAMESPACE/NAME (e.g. alice/minilm-sst2-lora); "
                           "or write the folder with --dry-run, --to DIR or --git-remote URL.")
    check_branch(revision)
    if run.lineage and base_model is None and (Path(out) / "adapter_config.json").is_file():
        log.warning("%s was trained on the merged model of %s (model.from_run), not on the bare base %s: the published "
                    "adapter_config.json and the card's snippet name the bare base. Publish that merged model too and pass its id "
                    "with --base-model ID, so that loading by id gives the model this adapter was trained on.", out,
                    run.lineage[0].get("name"), recipe.model.name)
    card_kw = {"repo_id": repo_id, "license": license}
    scored = run.metrics or {}
    split = "test" if "accuracy" in scored.get("test", {}) else "eval"  # the held-out figure when there is one
    acc = scored.get(split, {}).get("accuracy")
    label = run.split_label(split)
    message = f"peftlab: {recipe.name} ({run.method or recipe.adapter.method}" + (f", {label} accuracy {acc:.4f})" if acc is not None else ")")
    if dry_run or to:
        target = (pub.out / "publish" if dry_run is True else Path(dry_run)) if dry_run else Path(to)
        files = write_folder(pub, target, "--dry-run DIR" if dry_run else "--to DIR", **card_kw)
        log.debug("publish folder written to %s (%d files)%s", target, len(files), ": nothing uploaded (dry run)" if dry_run else "")
        return {"destination": str(target), "files": files, "uploaded": False}
    with tempfile.TemporaryDirectory(prefix="peftlab-publish-") as tmp:
        folder = Path(tmp) / "folder"
        folder.mkdir()
        files = fill_folder(pub, folder, **card_kw)
        if git_remote:
            result = push_to_git(folder, git_remote, branch=revision, message=message)
        else:
            result = push_to_hub(folder, repo_id, private=private, revision=revision, endpoint=endpoint, exist_ok=exist_ok,
                                 message=message)
    log.debug("published %s (%d files) to %s", out, len(files), result["url"])
    return {"destination": result["url"], "files": files, "uploaded": True, **result}


