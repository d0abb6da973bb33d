"""Real data and a real pretrained model: a LoRA adapter on MiniLM learns SST-2 from a small slice.
Skips when ../shared is absent."""

from __future__ import annotations

import pytest

from peftlab import load_recipe, run

from .conftest import REPO, shared_or_skip


@pytest.mark.slow
def test_minilm_lora_learns_sst2_from_a_slice(tmp_path, monkeypatch):
    shared_or_skip("data", "sst2", "train.tsv")
    monkeypatch.chdir(REPO)
    recipe = load_recipe(REPO / "recipes" / "minilm" / "sst2-lora.yaml", [
        "data.train.max_samples=800", "data.test.max_samples=200", "train.epochs=1", "train.batch_size=16", "train.lr=3e-3", "train.eval_every=null",
        "train.save_every=null", "export.merge=false", "train.log_every=5", f"output_dir={tmp_path / 'out'}"])
    summary = run(recipe)
    acc = summary["metrics"]["test"]["accuracy"]  # SST-2 dev: the held-out split of the recipe
    assert acc >= 0.65, f"SST-2 dev accuracy {acc:.3f} after 800 examples: LoRA on MiniLM should be well above chance"
    assert summary["trainable_percent"] < 1.0
