"""Loading a published adapter back: a run or publish folder as it is, or a Hub repo downloaded by id."""

from __future__ import annotations

from pathlib import Path

from ..errors import ArtifactError, path_argument
from ..rundir import read_run
from .card import check_repo_id
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
    if path.suffix in (".yaml", ".json") or repo_id.startswith((".", "/", "~")) or repo_id.count("/") != 1:
        raise ArtifactError(f"{repo_id!r} is neither a folder nor a Hub repo id (NAMESPACE/NAME).")
    check_repo_id(repo_id)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        local = Path(snapshot_download(repo_id, revision=revision, endpoint=endpoint, local_dir=local_dir))
    except RevisionNotFoundError:
        raise ArtifactError(f"{repo_id} has no revision {revision!r}.") from None
    except RepositoryNotFoundError:
        raise ArtifactError(f"{repo_id} is not a local folder, and there is no repo {repo_id} on the Hub, or it is private and "
                            f"you are not logged in. {LOGIN_HINT}") from None
    except LocalEntryNotFoundError:
        raise ArtifactError(f"cannot download {repo_id}: the Hub is unreachable (or HF_HUB_OFFLINE=1) and no copy is cached. "
                            "Connect, or download it elsewhere (`hf download REPO --local-dir DIR`) and pass DIR.") from None
    except HfHubHTTPError as e:
        raise ArtifactError(f"cannot download {repo_id}: {redact(str(e).splitlines()[0])}") from None
    read_run(local)
    return local
