"""Several adapters on one base: switching reproduces each adapter alone; a mixed batch gives each row its adapter."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from peftlab import load_trained
from peftlab.adapters import load_adapters
from peftlab.errors import ArtifactError, ModelError

from .conftest import logits
from .test_hub import runs  # noqa: F401  (two LoRA runs of the tiny BERT that differ by seed)

TEXTS = ("the movie was good", "a bad and boring plot", "really quite lovely")


def test_switch_and_mixed_batch_match_each_adapter_alone(runs):  # noqa: F811
    alone = [logits(load_trained(out)[0], TEXTS) for out in runs]
    assert not torch.allclose(alone[0], alone[1])  # the two adapters really differ
    model, tokenizer = load_adapters({"a": runs[0], "b": runs[1]})
    assert set(model.peft_config) == {"a", "b"} and model.active_adapter == "a"
    torch.testing.assert_close(logits(model, TEXTS), alone[0], atol=1e-6, rtol=0)
    model.set_adapter("b")
    torch.testing.assert_close(logits(model, TEXTS), alone[1], atol=1e-6, rtol=0)
    batch = tokenizer(list(TEXTS), return_tensors="pt", padding=True)
    with torch.no_grad():
        mixed = model(**batch, adapter_names=["a", "b", "a"]).logits
    expected = torch.stack([alone[0][0], alone[1][1], alone[0][2]])
    torch.testing.assert_close(mixed, expected, atol=1e-6, rtol=0)


def test_adapters_of_different_label_counts_load_side_by_side(runs, make_recipe, tmp_path):  # noqa: F811
    """A 4-label adapter beside a 2-label one keeps its own 4-output head: switched to, it gives its logits alone."""
    from peftlab import run

    four = run(make_recipe({"data.label_names": "[a,b,c,d]", "train.max_steps": 2, "output_dir": tmp_path / "four"}))
    alone = logits(load_trained(four["output_dir"])[0], TEXTS)
    model, _ = load_adapters({"two": runs[0], "four": four["output_dir"]})
    assert logits(model, TEXTS).shape[-1] == 2
    model.set_adapter("four")
    torch.testing.assert_close(logits(model, TEXTS), alone, atol=1e-6, rtol=0)


def test_adapters_of_different_bases_are_refused(runs, make_recipe, tmp_path, tiny_llama):  # noqa: F811
    from peftlab import run

    other = run(make_recipe({"train.max_steps": 1, "output_dir": tmp_path / "llama"}, model=tiny_llama))
    with pytest.raises(ArtifactError, match="must share their base"):
        load_adapters({"bert": runs[0], "llama": other["output_dir"]})
    kept = tmp_path / "kept"  # the same base name, 1 of its layers kept (model.num_layers): its LoRA fits other layers
    shutil.copytree(runs[1], kept)
    recipe = yaml.safe_load((kept / "recipe.yaml").read_text())
    recipe["model"]["num_layers"] = 1
    (kept / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(ArtifactError, match=r"\(model.num_layers: 1 vs None\).*load_trained"):
        load_adapters({"full": runs[0], "kept": kept})
    ia3 = tmp_path / "ia3"  # another peft type: peft's own ValueError before
    shutil.copytree(runs[1], ia3)
    cfg = json.loads((ia3 / "adapter_config.json").read_text())
    (ia3 / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(ArtifactError, match=r"adapter 'ia3' is of peft type IA3 and 'full' of LORA.*load_trained"):
        load_adapters({"full": runs[0], "ia3": ia3})


def test_adapters_of_tasks_that_build_another_model_are_refused(make_recipe, tmp_path, tiny_llama):
    """A classification adapter (a sequence classifier with its head) and a verbalizer one (the causal LM) on one base: the
    verbalizer beside the classifier failed with a bare KeyError 'base_model.model.score.weight'; the classifier beside
    the verbalizer loaded, and its rows got the LM's vocabulary logits, its trained head dropped without a word."""
    from peftlab import run

    cls, verb = (run(make_recipe({"task.type": task, "train.max_steps": 1, "data.eval": None, "output_dir": tmp_path / task},
                                 model=tiny_llama))["output_dir"] for task in ("classification", "verbalizer"))
    with pytest.raises(ArtifactError, match=r"adapter 'verb' .* is a task.type verbalizer adapter \(AutoModelForCausalLM\) and "
                                            r"'cls' a task.type classification one .*load_trained"):
        load_adapters({"cls": cls, "verb": verb})
    with pytest.raises(ArtifactError, match=r"adapter 'cls' .* is a task.type classification adapter .* and 'verb' a task.type "
                                            "verbalizer one"):
        load_adapters({"verb": verb, "cls": cls})


def test_reserved_and_invalid_adapter_names_are_refused(runs):  # noqa: F811
    """"__base__" loaded, and mixed batches gave its rows the plain base (peft's name for no adapter); "a.v1" was blamed
    on the base or the peft version, "" raised torch's KeyError."""
    for name, why in (("__base__", "as no adapter at all"), ("a.v1", "a dot splits"), ("", "non-empty name")):
        with pytest.raises(ArtifactError, match=rf"adapter name {name!r}: .*{why}.*Name each adapter"):
            load_adapters({"a": runs[0], name: runs[1]})


def test_mixed_batches_peft_cannot_run_are_refused_before_it_runs(runs, make_recipe, tmp_path):  # noqa: F811
    """A mixed batch of a 2-label and a 6-label adapter failed with torch's "stack expects each tensor to be equal size"
    from inside peft; an unknown name, a wrong number of names and DoRA adapters with peft's own ValueErrors."""
    from peftlab import run

    six = run(make_recipe({"data.label_names": "[a,b,c,d,e,f]", "train.max_steps": 1, "output_dir": tmp_path / "six"}))
    dora = tmp_path / "dora"
    shutil.copytree(runs[1], dora)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    model, tokenizer = load_adapters({"two": runs[0], "six": six["output_dir"], "dora": dora})
    batch = tokenizer(list(TEXTS), return_tensors="pt", padding=True)
    for names, match in ((["two", "six", "two"], r"heads .* differ \('two': 2 labels, 'six': 6 labels\).*model.set_adapter"),
                         (["two", "nope", "two"], r"names 'nope', which is not loaded: the adapters are 'two', 'six', 'dora'"),
                         (["two", "two"], r"2 name\(s\) for a batch of 3 row\(s\)"),
                         (["two", "dora", "two"], r"'dora' are DoRA adapters .*set_adapter")):
        with pytest.raises(ModelError, match=match), torch.no_grad():
            model(**batch, adapter_names=names)
    with torch.no_grad():
        assert model(**batch, adapter_names=["two", "__base__", "two"]).logits.shape == (3, 2)
    model.set_adapter("six")  # switching between heads of different sizes works
    assert logits(model, TEXTS).shape[-1] == 6


def test_a_standalone_model_is_refused_at_any_position(runs, tmp_path):  # noqa: F811
    """A merged folder was meant to be refused as a standalone model, but the check never fired (transformers models have
    load_adapter too): first, it failed later on; second, "peft type None and 'a' of LORA" named them backwards. compose
    called it "a lora model, not a LoRA adapter"."""
    from peftlab import merge
    from peftlab.compose import compose

    copy = tmp_path / "run"
    shutil.copytree(runs[1], copy)
    merged = merge(copy)
    for sources in ({"a": runs[0], "m": merged}, {"m": merged, "a": runs[0]}):
        with pytest.raises(ArtifactError, match=rf"adapter 'm' \({merged}\) holds a standalone model \(merged from a lora adapter\), "
                                                rf"not an adapter: load it on its own \(load_trained\), or give the run folder "
                                                rf"that holds its adapter \({copy}\)"):
            load_adapters(sources)
    with pytest.raises(ArtifactError, match=rf"{merged} holds a standalone model .*only LoRA adapters compose, or give the run folder"):
        compose([runs[0], merged], [0.5, 0.5], tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_mixed_batch_generation_is_checked_and_gives_each_row_its_adapter(make_recipe, tmp_path, chat_llama):
    """model.generate(..., adapter_names=...) went through peft's own path, unchecked: a wrong number of names was
    peft's ValueError (or, for an unknown name, its KeyError). Checked as forward is; rows get their own adapters."""
    from peftlab import run

    outs = [run(make_recipe({"task.type": "clm", "data.eval": None, "data.label_names": None, "train.max_steps": 3,
                             "train.lr": 0.05, "train.seed": seed, "output_dir": tmp_path / f"c{seed}"}, model=chat_llama))
            ["output_dir"] for seed in (1, 2)]
    model, tokenizer = load_adapters({"a": outs[0], "b": outs[1]})
    batch = tokenizer(["the movie was", "a bad and"], return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():  # the two adapters really differ
        assert not torch.allclose(*(model(**batch, adapter_names=[n, n]).logits for n in ("a", "b")))
    for names, match in ((["a"], r"1 name\(s\) for a batch of 2 row\(s\)"), (["a", "zz"], "names 'zz', which is not loaded")):
        with pytest.raises(ModelError, match=match), torch.no_grad():
            model.generate(**batch, adapter_names=names, max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        mixed = model.generate(**batch, adapter_names=["a", "b"], max_new_tokens=4, do_sample=False)
        alone = []
        for name, row in (("a", 0), ("b", 1)):
            model.set_adapter(name)
            alone.append(model.generate(**{k: v[row:row + 1] for k, v in batch.items()}, max_new_tokens=4, do_sample=False)[0])
    assert torch.equal(mixed, torch.stack(alone))


def test_mixed_batches_of_methods_peft_does_not_mix_are_refused(make_recipe, tmp_path):
    """peft runs adapter_names through LoRA's layers only: IA3 (LoHa, LoKr) adapters ignored it and gave every row the
    active adapter, silently; AdaLoRA's failed with a TypeError inside peft. Switching works for all of them."""
    from peftlab import run

    outs = [run(make_recipe({"adapter.method": "ia3", "train.max_steps": 2, "train.lr": 5e-2, "train.seed": seed,
                             "output_dir": tmp_path / f"ia3-{seed}"}))["output_dir"] for seed in (0, 1)]
    alone = [logits(load_trained(out)[0], TEXTS) for out in outs]
    model, tokenizer = load_adapters({"a": outs[0], "b": outs[1]})
    batch = tokenizer(list(TEXTS), return_tensors="pt", padding=True)
    with pytest.raises(ModelError, match=r"these are IA3 adapters, and peft mixes adapters per row only for LoRA.*set_adapter"):
        model(**batch, adapter_names=["a", "b", "a"])
    with pytest.raises(ModelError, match="only for LoRA"):
        model.generate(**batch, adapter_names=["a", "b", "a"], max_new_tokens=1)
    model.set_adapter("b")
    torch.testing.assert_close(logits(model, TEXTS), alone[1], atol=1e-6, rtol=0)


def test_adalora_names_that_are_part_of_a_module_path_are_refused(runs, tmp_path):  # noqa: F811
    """peft resizes an AdaLoRA adapter's layers by `name in path` over its rank_pattern: 'y' (of 'query') cut the paths
    wrong, and load_adapters failed with an AttributeError inside peft."""
    ada = tmp_path / "ada"
    shutil.copytree(runs[1], ada)
    cfg = json.loads((ada / "adapter_config.json").read_text())
    pattern = {"bert.encoder.layer.0.attention.self.query.lora_E": [True, False]}
    (ada / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "ADALORA", "rank_pattern": pattern}))
    with pytest.raises(ArtifactError, match=r"adapter name 'y': .*part of one \(bert.encoder.layer.0.attention.self.query.lora_E\)"
                                            r".*\{'adapter_y': ...\}"):
        load_adapters({"y": ada, "other": ada})
