"""Loading a published adapter back: a run or publish folder as it is, or a Hub repo downloaded by id."""

from __future__ import annotations

from pathlib import Path

from ..errors import ArtifactError, path_argument
from ..rundir import read_run
from .card import is_hub_id
from .destinations import LOGIN_HINT, redact


def load_adapter(id_or_path: str | Path, endpoint: str | None = None, revision: str | None = None,
                 local_dir: str | Path | None = None) -> Path:
    """A local folder for `export.load_trained`: an existing run/publish folder as it is, or a Hub repo downloaded
    with snapshot_download (into the Hugging Face cache, or `local_dir`; cached copies are used offline)."""
    path = path_argument(id_or_path, "load_adapter(id_or_path)").expanduser()
    if path.is_dir():
        read_run(path)
        return path
    repo_id = str(id_or_path)
    # (a typo in a run folder's path reads as a Hub id too: every answer says that no folder is there)
    no_folder = f"{path.resolve()} is not a folder" if path.exists() else f"there is no folder {path.resolve()}"
    if path.suffix in (".yaml", ".json") or repo_id.startswith((".", "/", "~")) or not is_hub_id(repo_id):
        raise ArtifactError(f"{repo_id!r} is neither a folder ({no_folder}) nor a Hub repo id (NAMESPACE/NAME).")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        local = Path(snapshot_download(repo_id, revision=revision, endpoint=endpoint, local_dir=local_dir))
    except RevisionNotFoundError:
        raise ArtifactError(f"{repo_id} has no revision {revision!r}.") from None
    except RepositoryNotFoundError:
        raise ArtifactError(f"cannot load {repo_id}: {no_folder}, and there is no repo {repo_id} on the Hub, or it is private and "
                            f"you are not logged in. Check the folder's path or the repo id. {LOGIN_HINT}") from None
    except LocalEntryNotFoundError:
        raise ArtifactError(f"cannot load {repo_id}: {no_folder}, and as a Hub repo it cannot be downloaded: the Hub is unreachable "
                            "(or HF_HUB_OFFLINE=1) and no copy is cached. Check the folder's path; for a Hub repo, connect, or "
                            "download it elsewhere (`hf download REPO --local-dir DIR`) and pass DIR.") from None
    except HfHubHTTPError as e:
        raise ArtifactError(f"cannot load {repo_id}: {no_folder}, and downloading it from the Hub failed: "
                            f"{redact(str(e).splitlines()[0])}") from None
    read_run(local)
    return local
