"""Publishing and reusing adapters: the model card, publish to a local stand-in of the Hub (tests/hub_server.py, the
real huggingface_hub client on 127.0.0.1), to a directory and to a git remote; load back by id; compose adapters."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from peftlab import load_recipe, load_trained
from peftlab.cli import main
from peftlab.compose import compose
from peftlab.errors import ArtifactError, PeftlabError, PublishError
from peftlab.publish import card_text, check_card, load_adapter, publish
from peftlab.rundir import read_run, sha256

from .conftest import logits
from .hub_server import HubStandIn

SECRET = "hf_" + "Sx9" * 11  # a token-shaped secret: it must never show up in output, logs, cards or uploads
PUBLISHED = {"README.md", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
             "recipe.yaml", "run.json", "metrics.json", "eval_report.json"}


def digest(folder: Path) -> dict[str, str]:
    """Every path under `folder` with the sha256 of its content: 'untouched' means this is unchanged."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bert, sentiment_files):
    """Two LoRA runs on the tiny BERT that differ by seed (module-shared: tests copy them before writing into them)."""
    from peftlab import load_recipe, run

    outs = []
    for seed in (42, 7):
        out = tmp_path_factory.mktemp("run") / f"out-{seed}"
        recipe = load_recipe(None, [f"model.name={tiny_bert}", f"data.train.path={sentiment_files['train']}",
                                    f"data.eval.path={sentiment_files['dev']}", "data.label_names=[negative,positive]",
                                    "adapter.r=4", "adapter.dropout=0.0", "train.epochs=2", "train.lr=1e-2", f"train.seed={seed}",
                                    f"output_dir={out}", f"name=seed{seed}"])
        run(recipe)
        outs.append(out)
    return outs


@pytest.fixture
def run_copy(runs, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(runs[0], out)
    return out


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    """The real client, pointed at nothing but 127.0.0.1: a token in HF_TOKEN, no stored login, an empty cache,
    offline mode off for huggingface_hub only, and instant retry back-off (the waits are recorded). Any name
    lookup other than 127.0.0.1/localhost is refused and fails the test."""
    import socket

    import huggingface_hub.utils._detect_agent as agent
    import huggingface_hub.utils._http as hf_http
    from huggingface_hub import constants

    foreign: list[str] = []
    lookup = socket.getaddrinfo

    def local_only(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost"):
            foreign.append(host)
            raise socket.gaierror(socket.EAI_NONAME, f"test: {host} is not 127.0.0.1")
        return lookup(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", local_only)
    # huggingface_hub 2.4 fetches an "agent harnesses" list from huggingface.co (not from --endpoint) for its
    # user-agent header on the first request of a process: give it the empty list it falls back to offline
    monkeypatch.setattr(agent, "_registry", {"standardEnvVars": [], "harnesses": {}})
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored-tokens"))
    sleeps: list[float] = []
    monkeypatch.setattr(hf_http, "time", SimpleNamespace(sleep=sleeps.append))
    yield sleeps
    assert not foreign, f"the test tried to reach {foreign}"


@pytest.fixture
def hub(hub_env):
    with HubStandIn(SECRET, lifetime=120) as server:
        yield server


def cli(capsys, *args) -> tuple[int, str, str]:
    rc = main([*map(str, args)])
    printed = capsys.readouterr()
    return rc, printed.out, printed.err


def assert_no_secret(*texts: str, folder: Path | None = None, stored: dict | None = None) -> None:
    for text in texts:
        assert SECRET not in text
    for p in (folder.rglob("*") if folder else []):
        if p.is_file():
            assert SECRET.encode() not in p.read_bytes(), p
    for name, data in (stored or {}).items():
        assert SECRET.encode() not in data, name


# ---------------------------------------------------------------------------------------------- model card

def test_model_card_fields(run_copy):
    """A run on the packaged MiniLM and SST-2: the card names the public base and dataset and parses as Hub metadata."""
    from huggingface_hub import ModelCard

    recipe = yaml.safe_load((run_copy / "recipe.yaml").read_text())
    recipe["model"]["name"] = "minilm"
    recipe["data"]["train"]["path"], recipe["data"]["eval"]["path"] = "../shared/data/sst2/train.tsv", "../shared/data/sst2/dev.tsv"
    (run_copy / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    run = json.loads((run_copy / "run.json").read_text())
    metrics = json.loads((run_copy / "metrics.json").read_text())["eval"]

    text = card_text(run_copy, "alice/minilm-sst2-lora")
    meta = check_card(text)
    card = ModelCard(text, ignore_metadata_errors=False)
    assert meta == card.data.to_dict()
    assert meta["library_name"] == "peft"
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["datasets"] == ["stanfordnlp/sst2"]
    assert meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "text-classification"
    assert {"peft", "lora", "text-classification", "base_model:adapter:sentence-transformers/all-MiniLM-L6-v2"} <= set(meta["tags"])
    (entry,) = meta["model-index"]
    assert entry["name"] == "minilm-sst2-lora"
    (result,) = entry["results"]
    assert result["task"] == {"type": "text-classification", "name": "Text Classification"}
    assert result["dataset"] == {"name": "SST-2", "type": "stanfordnlp/sst2", "split": "validation"}
    by_type = {m["type"]: m for m in result["metrics"]}
    assert set(by_type) == {"accuracy", "f1"}
    assert by_type["accuracy"]["value"] == pytest.approx(metrics["accuracy"], abs=1e-6)
    assert by_type["f1"]["value"] == pytest.approx(metrics["f1"], abs=1e-6)
    assert by_type["f1"]["args"] == {"average": "macro"}
    assert [(r.metric_type, r.dataset_split) for r in card.data.eval_results] == [("accuracy", "validation"), ("f1", "validation")]

    body = card.text
    for section in ("## Results", "## Training recipe", "## Method and parameters", "## Hardware and wall time", "## How to use",
                    "## Limitations"):
        assert section in body, section
    shown = yaml.safe_load(re.search(r"```yaml\n(.*?)```", body, re.S).group(1))
    assert shown == {**yaml.safe_load((run_copy / "recipe.yaml").read_text()), "output_dir": None}  # the recipe, minus its local output_dir
    assert f"{run['trainable_params']:,} of {run['total_params']:,}" in body
    assert f"trained in {run['train_wall_s']:.1f} s on CPU" in body and f"peft {run['versions']['peft']}" in body
    assert "PeftModel.from_pretrained(base, repo)" in body and "load_adapter('alice/minilm-sst2-lora')" in body
    assert "base_model = 'sentence-transformers/all-MiniLM-L6-v2'" in body


def test_card_of_a_local_base_names_no_fake_hub_id(runs, tmp_path):
    meta = check_card(card_text(runs[0], "alice/tiny"))
    assert "base_model" not in meta and meta["license"] == "unknown" and "datasets" not in meta
    meta = check_card(card_text(runs[0], "alice/tiny", base_model="org/tiny-bert", license="mit"))
    assert meta["base_model"] == "org/tiny-bert" and meta["license"] == "mit" and "base_model:adapter:org/tiny-bert" in meta["tags"]
    publish(runs[0], "alice/tiny", to=tmp_path / "p", base_model="org/tiny-bert")
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tiny-bert"
    # a published folder published again (downloaded, then pushed to another repo): its recipe names the base by its
    # folder name, which is no folder here: that name was linked as the hub id `base_model` and tagged
    publish(runs[0], to=tmp_path / "once")
    meta = check_card(card_text(tmp_path / "once", "bob/tiny"))
    assert "base_model" not in meta and not any(t.startswith("base_model:") for t in meta["tags"])
    assert check_card(card_text(tmp_path / "once", "bob/tiny", base_model="org/tiny-bert"))["base_model"] == "org/tiny-bert"


def test_broken_card_metadata_is_refused():
    with pytest.raises(PublishError, match="not valid Hub metadata"):
        check_card("---\nmodel-index:\n- name: x\n  results:\n  - metrics: [{type: accuracy, value: 1}]\n---\n# x\n")


def test_card_snippet_loads_the_adapter(runs, tmp_path, capsys, tiny_bert):
    """The peft snippet of the card, pointed at the published folder, rebuilds the trained model exactly."""
    folder = tmp_path / "published"
    publish(runs[0], "alice/tiny-lora", to=folder)
    code = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S).group(1)
    assert "repo = 'alice/tiny-lora'" in code
    namespace: dict = {}
    assert f"base_model = {tiny_bert.name!r}" in code and str(tiny_bert) not in code  # a local base: by its folder name only
    code = code.replace(f"base_model = {tiny_bert.name!r}", f"base_model = {str(tiny_bert)!r}")  # the reader's copy of it
    exec(code.replace("repo = 'alice/tiny-lora'", f"repo = {str(folder)!r}"), namespace)
    assert capsys.readouterr().out.strip() in ("negative", "positive")
    torch.testing.assert_close(logits(namespace["model"]), logits(load_trained(runs[0])[0]), atol=1e-6, rtol=0)


def test_a_published_adapter_of_a_local_base_merges_with_model_name_given(runs, tmp_path, capsys, caplog, tiny_bert):
    """A published adapter names a local base by its folder name: `peftlab merge` refused it, saying to set
    model.name=DIR, which merge did not take."""
    folder = tmp_path / "published"
    publish(runs[0], "alice/tiny-lora", to=folder)
    rc, _, err = cli(capsys, "merge", folder)
    assert rc == 2 and "model.name=" in err
    rc, _, err = cli(capsys, "eval", folder)  # it said to `hf download` the folder's name, as if a hub id
    assert rc == 2 and "a published adapter whose base was a local folder" in err and "hf download" not in err, err
    rc, _, err = cli(capsys, "merge", folder, "train.lr=1")
    assert rc == 2 and "merge takes model.name and model.revision only" in err
    rc, out, err = cli(capsys, "merge", folder, f"model.name={tiny_bert}")
    assert rc == 0, err
    torch.testing.assert_close(logits(load_trained(folder / "merged")[0]), logits(load_trained(runs[0])[0]), atol=1e-5, rtol=0)
    # the merged folder names the base it holds (it named the recipe's folder name, a base that is not here)
    recipe, record = read_run(folder / "merged")
    assert recipe.model.name == record.base_model == str(tiny_bert)
    assert json.loads((folder / "merged" / "merge.json").read_text())["base"] == {"name": str(tiny_bert), "revision": None}
    caplog.set_level(logging.INFO, logger="peftlab")
    rc, _, err = cli(capsys, "merge", folder, f"model.name={tiny_bert}")
    assert rc == 0 and "already merged" in caplog.text
    caplog.clear()
    other = shutil.copytree(tiny_bert, tmp_path / "other-copy")  # another base: merged again, not "already merged"
    rc, _, err = cli(capsys, "merge", folder, f"model.name={other}")
    assert rc == 0 and "already merged" not in caplog.text and f"merging onto {other} replaces it" in caplog.text, caplog.text
    assert read_run(folder / "merged")[1].base_model == str(other)


def test_card_snippet_of_a_merged_folder_runs_its_example(runs, tmp_path, capsys):
    """A full model's snippet (a merged folder's too) loads it and runs the task's example, as an adapter's does."""
    from peftlab import merge

    folder = tmp_path / "run"
    shutil.copytree(runs[0], folder)
    merged = merge(folder)
    card = card_text(merged, "alice/tiny-merged")
    assert "A standalone model: a LoRA adapter (r=4, alpha=16) merged into the float32 weights of its base" in card, card
    assert "on the adapter before the merge" in card and "An adapter only works" not in card  # (it described an adapter)
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    namespace: dict = {}
    exec(code.replace("repo = 'alice/tiny-merged'", f"repo = {str(merged)!r}"), namespace)
    assert capsys.readouterr().out.strip() in ("negative", "positive") and "PeftModel" not in code
    torch.testing.assert_close(logits(namespace["model"]), logits(load_trained(runs[0])[0]), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------ folders, dry run, --to

def test_dry_run_writes_exactly_what_is_uploaded(run_copy, hub, capsys):
    for junk in ("checkpoints/step-4/model.safetensors", "merged/model.safetensors", ".staging/x", "notes/secret.env"):
        (run_copy / junk).parent.mkdir(parents=True, exist_ok=True)
        (run_copy / junk).write_text("not for publishing")
    rc, out, err = cli(capsys, "publish", run_copy, "--repo-id", "alice/tiny-lora", "--dry-run", "--endpoint", hub.url)
    assert rc == 0, err
    assert "dry run" in out and "nothing uploaded" in out and not hub.requests
    folder = run_copy / "publish"
    assert {p.name for p in folder.iterdir()} == PUBLISHED
    assert (folder / "adapter_model.safetensors").read_bytes() == (run_copy / "adapter_model.safetensors").read_bytes()
    assert not list(run_copy.glob(".tmp-*"))

    rc, out, err = cli(capsys, "publish", run_copy, "--repo-id", "alice/tiny-lora", "--endpoint", hub.url)
    assert rc == 0, err
    stored = hub.files("alice/tiny-lora")
    assert set(stored) == PUBLISHED | {".gitattributes"}
    assert all(stored[name] == (folder / name).read_bytes() for name in PUBLISHED)  # byte for byte what the dry run showed
    assert not hub.unhandled
    assert_no_secret(out, err, folder=folder, stored=stored)


def test_a_dry_run_into_a_folder_it_cannot_write_says_so(run_copy, monkeypatch, capsys):
    """(a traceback from mkdir: a dry run takes no lock, whose check would have said it)"""
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: Path(p) != run_copy and real(p, mode, **k))
    rc, out, err = cli(capsys, "publish", run_copy, "--repo-id", "alice/tiny-lora", "--dry-run")
    assert rc == 2 and f"cannot write the publish folder to {run_copy / 'publish'}" in err and "--dry-run DIR" in err, err


def test_publish_to_a_directory(runs, tmp_path):
    target = tmp_path / "shelf" / "tiny-lora"
    result = publish(runs[0], to=target)
    assert set(result["files"]) == PUBLISHED and not result["uploaded"]
    assert "PATH/TO/THIS/FOLDER" in (target / "README.md").read_text()  # no repo id: the snippet says where to point
    publish(runs[0], "alice/tiny-lora", to=target)  # a previous publish folder is replaced
    assert "alice/tiny-lora" in (target / "README.md").read_text()
    with pytest.raises(PublishError, match="replace the run itself"):
        publish(runs[0], to=runs[0])
    with pytest.raises(PublishError, match="replace the run itself"):
        publish(runs[0], to=runs[0].parent)
    with pytest.raises(PublishError, match="give one destination"):
        publish(runs[0], to=tmp_path / "a", git_remote=str(tmp_path / "remote.git"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "thesis.tex").write_text("mine")
    with pytest.raises(PeftlabError, match="cannot be created: .*thesis.tex is a file"):
        publish(runs[0], to=tmp_path / "taken" / "thesis.tex" / "pub")
    with pytest.raises(PublishError, match="not a published adapter folder"):
        publish(runs[0], to=tmp_path / "taken")
    assert (tmp_path / "taken" / "thesis.tex").read_text() == "mine"
    (target / "notes.md").write_text("mine")  # a file publishing did not write: never deleted by a republish
    with pytest.raises(PublishError, match=r"files that publishing did not write \(notes.md\)"):
        publish(runs[0], to=target)
    (target / "notes.md").unlink()
    record = json.loads((target / "run.json").read_text())
    (target / "run.json").write_text(json.dumps({**record, "name": "someone-else"}))  # another run's publication
    with pytest.raises(PublishError, match=r"published adapter of another run \(someone-else\)"):
        publish(runs[0], to=target)
    assert json.loads((target / "run.json").read_text())["name"] == "someone-else"


def test_a_run_with_eval_results_publishes_again_into_its_folder(run_copy, tmp_path, capsys):
    """eval-SPLIT.json (what `peftlab eval RUN` wrote) is published, but a second publish into the same folder (--to DIR,
    or a second --dry-run) called it a file publishing did not write, and refused."""
    rc, _, err = cli(capsys, "eval", run_copy)
    assert rc == 0 and (run_copy / "eval-eval.json").is_file(), err
    for target in (tmp_path / "pub", run_copy / "publish"):
        for _ in range(2):
            write = publish(run_copy, to=target) if target.parent == tmp_path else publish(run_copy, dry_run=True)
            assert "eval-eval.json" in write["files"]
        assert (target / "eval-eval.json").read_bytes() == (run_copy / "eval-eval.json").read_bytes()


def test_a_composition_and_its_first_source_do_not_replace_each_others_publication(runs, tmp_path):
    """A composition's run.json is its first source's, name included: publishing it into that source's publish folder
    replaced the source's adapter silently, and a second source's refusal named the first one."""
    composed = tmp_path / "composed"
    compose(runs, [0.5, 0.5], composed)
    publish(runs[0], to=tmp_path / "source")
    with pytest.raises(PublishError, match=r"published adapter of another run \(seed42\)"):
        publish(composed, to=tmp_path / "source")
    assert "composition" not in json.loads((tmp_path / "source" / "run.json").read_text())
    for _ in range(2):  # its own earlier publication is replaced
        publish(composed, to=tmp_path / "composition")
    with pytest.raises(PublishError, match=r"published adapter of another run \(a composition of seed42, seed7\)"):
        publish(runs[0], to=tmp_path / "composition")


@pytest.mark.parametrize("repo_id", ["alice", "alice/", "/etc", "../alice/x", "alice/../x", "alice/x/y", "alice/my repo", "alice/x.git",
                                     "alice/-x", "alice/x--y", "alice/ünï", "alice\\x", "a" * 97 + "/x"])
def test_repo_ids_are_validated_before_anything_happens(runs, hub, capsys, repo_id):
    rc, out, err = cli(capsys, "publish", runs[0], "--repo-id", repo_id, "--endpoint", hub.url)
    assert rc == 2 and "NAMESPACE/NAME" in err and not hub.requests


@pytest.mark.parametrize("base_model", ["/some/local/path", "bert base", "./tiny-bert", "org/", "org/x/y", ""])
def test_a_base_model_that_is_no_hub_id_is_refused_with_its_own_flag(runs, tmp_path, capsys, base_model):
    """--base-model /some/path was refused as "repo id ... Example: --repo-id alice/..." (the --repo-id check, reused),
    and one without '/' ("bert base") went as it was into the card, the tag and adapter_config.json."""
    rc, out, err = cli(capsys, "publish", runs[0], "--repo-id", "alice/x", "--base-model", base_model, "--to", str(tmp_path / "p"))
    assert rc == 2 and f"--base-model {base_model!r} is not a Hub model id" in err and "--repo-id" not in err, err
    assert not (tmp_path / "p").exists()
    for good in ("bert-base-uncased", "org/tiny-bert"):  # a canonical id and an owner's
        publish(runs[0], "alice/x", to=tmp_path / good.replace("/", "_"), base_model=good)
        assert json.loads((tmp_path / good.replace("/", "_") / "adapter_config.json").read_text())["base_model_name_or_path"] == good


def test_hub_publish_needs_a_repo_id(runs, capsys):
    rc, out, err = cli(capsys, "publish", runs[0])
    assert rc == 2 and "--repo-id" in err


def test_a_home_relative_destination_is_expanded_and_an_empty_one_refused(runs, tmp_path, monkeypatch, capsys):
    """`--to "~/shelf"` (quoted, or --to=~/shelf: the shell leaves the ~) published into a folder named '~' in the
    working directory; `--to ""` and `--git-remote ""` were read as not given and asked for the Hub's --repo-id."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    rc, out, err = cli(capsys, "publish", runs[0], "--to=~/shelf/tiny")
    assert rc == 0 and (tmp_path / "home" / "shelf" / "tiny" / "README.md").is_file() and not (tmp_path / "~").exists()
    assert publish(runs[0], dry_run="~/dry")["destination"] == str(tmp_path / "home" / "dry")
    for flag, needs in (("--to", "a directory"), ("--git-remote", "a URL"), ("--dry-run", "a directory")):
        rc, out, err = cli(capsys, "publish", runs[0], flag, "")
        assert rc == 2 and f"{flag} is empty: give {needs}" in err and "--repo-id" not in err


# --------------------------------------------------------------------------------------------------- Hub

@pytest.mark.parametrize("path", ["upload-pipeline", "create-commit+lfs"])
def test_publish_download_load_gives_the_same_logits(runs, hub_env, tmp_path, tiny_bert, monkeypatch, capsys, caplog, path):
    """publish -> download into a fresh dir -> load (peftlab and plain peft) -> the logits of the original run.
    Both upload paths of huggingface_hub: the streamed pipeline (hf_xet installed; every file inline in the commit) and,
    as without hf_xet, create_commit with the weights through the legacy LFS batch protocol."""
    import huggingface_hub._commit_api as commit_api
    import huggingface_hub._upload_pipeline as pipeline
    import huggingface_hub.hf_api as hf_api
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    calls = []
    real = pipeline.pipelined_upload
    monkeypatch.setattr(pipeline, "pipelined_upload", lambda *a, **k: calls.append(1) or real(*a, **k))
    lfs = path != "upload-pipeline"
    if lfs:
        monkeypatch.setattr(hf_api, "is_xet_available", lambda: False)
        monkeypatch.setattr(commit_api, "is_xet_available", lambda: False)
    caplog.set_level(logging.DEBUG)
    out = runs[0]
    before = digest(out)
    weights = (out / "adapter_model.safetensors").read_bytes()

    with HubStandIn(SECRET, lifetime=120, lfs=lfs) as hub:
        rc, printed, err = cli(capsys, "publish", out, "--repo-id", "alice/tiny-lora", "--endpoint", hub.url)
        assert rc == 0, err
        assert f"to {hub.url}/alice/tiny-lora" in printed and "commit" in printed
        assert len(calls) == (not lfs)
        assert list(hub.lfs_store.values()) == ([weights] if lfs else [])
        stored = hub.files("alice/tiny-lora")
        assert set(stored) == PUBLISHED | {".gitattributes"} and stored["adapter_model.safetensors"] == weights
        assert digest(out) == before

        local = load_adapter("alice/tiny-lora", endpoint=hub.url, local_dir=tmp_path / "download")
        assert not hub.unhandled
    assert local == tmp_path / "download" and PUBLISHED <= {p.name for p in local.iterdir()}
    original = logits(load_trained(out)[0])
    published = load_recipe(local / "recipe.yaml", [f"model.name={tiny_bert}"], validate_files=False)  # a local base: name the copy
    torch.testing.assert_close(logits(load_trained(local, recipe=published)[0]), original, atol=0, rtol=0)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(base, str(local))), original, atol=1e-6, rtol=0)
    assert_no_secret(printed, err, caplog.text, folder=local, stored=stored)


def test_private_repo_on_a_branch(runs, hub, monkeypatch, tmp_path, capsys):
    rc, out, err = cli(capsys, "publish", runs[0], "--repo-id", "alice/tiny-lora", "--private", "--revision", "exp/r4",
                       "--endpoint", hub.url)
    assert rc == 0, err
    repo = hub.repos["alice/tiny-lora"]
    assert repo.private and set(hub.files("alice/tiny-lora", "exp/r4")) == PUBLISHED | {".gitattributes"}
    assert set(hub.files("alice/tiny-lora", "main")) == {".gitattributes"}
    local = load_adapter("alice/tiny-lora", endpoint=hub.url, revision="exp/r4", local_dir=tmp_path / "dl")
    assert (local / "adapter_model.safetensors").read_bytes() == (runs[0] / "adapter_model.safetensors").read_bytes()
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(ArtifactError, match="private and you are not logged in"):
        load_adapter("alice/tiny-lora", endpoint=hub.url, revision="exp/r4", local_dir=tmp_path / "anon")


def test_existing_repo_needs_exist_ok(runs, hub, capsys):
    assert cli(capsys, "publish", runs[0], "--repo-id", "alice/tiny-lora", "--endpoint", hub.url)[0] == 0
    commits = len(hub.repos["alice/tiny-lora"].commits)
    rc, out, err = cli(capsys, "publish", runs[0], "--repo-id", "alice/tiny-lora", "--endpoint", hub.url)
    assert rc == 2 and "already exists" in err and "--exist-ok" in err and "published" not in out
    # an earlier upload's files the new run lacks (a full model: config.json + model.safetensors beside the new adapter
    # would load as neither run) go; a file of the user's own stays
    repo = hub.repos["alice/tiny-lora"]
    stale = {"model.safetensors": b"old", "config.json": b"{}", "chat_template.jinja": b"x", "figures/loss.png": b"png",
             "gguf/model-q4.gguf": b"the user's", "onnx/tokenizer.json": b"{}"}  # (files in subfolders are the user's)
    repo.branches["main"] = repo.commit(repo.branches["main"], {**hub.files("alice/tiny-lora"), **stale}, "an earlier upload")
    commits = len(repo.commits)
    rc, out, err = cli(capsys, "publish", runs[1], "--repo-id", "alice/tiny-lora", "--endpoint", hub.url, "--exist-ok")
    assert rc == 0, err
    assert len(hub.repos["alice/tiny-lora"].commits) == commits + 1
    assert set(hub.files("alice/tiny-lora")) == PUBLISHED | {".gitattributes", "figures/loss.png", "gguf/model-q4.gguf", "onnx/tokenizer.json"}
    assert hub.files("alice/tiny-lora")["adapter_model.safetensors"] == (runs[1] / "adapter_model.safetensors").read_bytes()
    assert cli(capsys, "publish", runs[1], "--repo-id", "alice/tiny-lora", "--endpoint", hub.url, "--exist-ok")[0] == 0
    assert len(hub.repos["alice/tiny-lora"].commits) == commits + 1  # unchanged files: no new commit
    # --private on an existing public repo: refused, not published in the open
    rc, out, err = cli(capsys, "publish", runs[0], "--repo-id", "alice/tiny-lora", "--endpoint", hub.url, "--exist-ok", "--private")
    assert rc == 2 and "is public" in err and "Nothing was published" in err
    assert len(hub.repos["alice/tiny-lora"].commits) == commits + 1


def test_refused_token_says_how_to_log_in(runs, hub, monkeypatch, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = "hf_" + "Wr0ng" * 7
    monkeypatch.setenv("HF_TOKEN", wrong)
    rc, out, err = cli(capsys, "publish", runs[0], "--repo-id", "alice/tiny-lora", "--endpoint", hub.url)
    assert rc == 2 and "401" in err and "hf auth login" in err and "HF_TOKEN" in err and "Nothing was published" in err
    assert "published" not in out and not hub.repos
    assert wrong not in out + err + caplog.text

    monkeypatch.delenv("HF_TOKEN")
    hub.requests.clear()
    rc, out, err = cli(capsys, "publish", runs[0], "--repo-id", "alice/tiny-lora", "--endpoint", hub.url)
    assert rc == 2 and "no Hugging Face token" in err and "hf auth login" in err and not hub.requests


def test_connection_dropped_during_the_commit(runs, hub_env, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    out = runs[0]
    before = digest(out)
    with HubStandIn(SECRET, lifetime=120, drop_commit=True) as hub:
        rc, printed, err = cli(capsys, "publish", out, "--repo-id", "alice/tiny-lora", "--endpoint", hub.url)
        assert rc == 2 and "network error" in err and "did not complete" in err and "--exist-ok" in err
        assert "published" not in printed
        assert hub.commit_attempts == 1 + len(hub_env) and hub_env  # the client retried (with back-off), then gave up
        assert set(hub.files("alice/tiny-lora")) == {".gitattributes"}
    assert digest(out) == before  # the run directory is untouched: no publish folder, no staging left behind
    assert_no_secret(printed, err, caplog.text)


def test_card_refused_by_the_hub_uploads_nothing(runs, hub_env, capsys):
    with HubStandIn(SECRET, lifetime=120, reject_card='"base_model" is not a valid model id') as hub:
        rc, out, err = cli(capsys, "publish", runs[0], "--repo-id", "alice/tiny-lora", "--endpoint", hub.url)
        assert rc == 2 and "refused the model card" in err and "base_model" in err and "Nothing was published" in err
        assert set(hub.files("alice/tiny-lora")) == {".gitattributes"} and hub.commit_attempts == 0
        assert not [p for _, p in hub.requests if "preupload" in p]


def test_offline_mode_is_explained(runs, hub_env, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PublishError, match="HF_HUB_OFFLINE=1"):
        publish(runs[0], "alice/tiny-lora", endpoint="http://127.0.0.1:9")


def test_load_adapter_errors(runs, hub, tmp_path, monkeypatch):
    assert load_adapter(runs[0]) == runs[0]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ArtifactError, match=f"there is no folder {tmp_path / 'alice' / 'missing'}, and there is no repo alice/missing on the Hub"):
        load_adapter("alice/missing", endpoint=hub.url, local_dir=tmp_path / "x")
    with pytest.raises(ArtifactError, match=rf"neither a folder \(there is no folder {tmp_path / 'nope' / 'deeper' / 'run'}\) nor a Hub repo id"):
        load_adapter(str(tmp_path / "nope" / "deeper" / "run"))
    # a typo in a relative run folder reads as a Hub id: the error said only that the Hub was unreachable
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ArtifactError, match=f"cannot load runs/loar: there is no folder {tmp_path / 'runs' / 'loar'}, and as a Hub "
                                            r"repo it cannot be downloaded: the Hub is unreachable \(or HF_HUB_OFFLINE=1\)"):
        load_adapter("runs/loar")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "loar").write_text("")
    with pytest.raises(ArtifactError, match=f"{tmp_path / 'runs' / 'loar'} is not a folder, and as a Hub repo"):
        load_adapter("runs/loar")
    (tmp_path / "half").mkdir()
    with pytest.raises(ArtifactError, match="not a finished peftlab run"):
        load_adapter(tmp_path / "half")


# ----------------------------------------------------------------------------------------------- git remote

@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_publish_to_a_git_remote(runs, tmp_path, capsys):
    remote = tmp_path / "remote.git"
    subprocess.run(["git", "init", "--quiet", "--bare", str(remote)], check=True)
    rc, out, err = cli(capsys, "publish", runs[0], "--repo-id", "alice/tiny-lora", "--git-remote", remote)
    assert rc == 0, err
    assert "branch main" in out
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", "--branch", "main", str(remote), str(clone)], check=True)
    assert {p.name for p in clone.iterdir() if p.name != ".git"} == PUBLISHED
    assert (clone / "adapter_model.safetensors").read_bytes() == (runs[0] / "adapter_model.safetensors").read_bytes()
    log = subprocess.run(["git", "log", "--format=%s"], cwd=clone, capture_output=True, text=True, check=True).stdout
    assert log.startswith("peftlab: ")

    again = publish(runs[0], "alice/tiny-lora", git_remote=str(remote))
    assert again["unchanged"]
    # an earlier upload's files the new run lacks go; a file of the user's own stays
    for name, text in {"model.safetensors": "old", "config.json": "{}", "NOTES.md": "mine"}.items():
        (clone / name).write_text(text)
    subprocess.run(["git", "add", "-A"], cwd=clone, check=True)
    subprocess.run(["git", "-c", "user.name=u", "-c", "user.email=u@x", "commit", "-qm", "x"], cwd=clone, check=True)
    subprocess.run(["git", "push", "-q", "origin", "main"], cwd=clone, check=True)
    publish(runs[1], "alice/tiny-lora", git_remote=str(remote))
    subprocess.run(["git", "pull", "-q"], cwd=clone, check=True)
    assert {p.name for p in clone.iterdir() if p.name != ".git"} == PUBLISHED | {"NOTES.md"}
    branch = publish(runs[1], "alice/tiny-lora", git_remote=str(remote), revision="exp")
    assert not branch["unchanged"] and branch["branch"] == "exp"
    heads = subprocess.run(["git", "ls-remote", "--heads", str(remote)], capture_output=True, text=True, check=True).stdout
    assert "refs/heads/main" in heads and "refs/heads/exp" in heads

    with pytest.raises(PublishError, match="git clone failed") as e:
        publish(runs[0], "alice/tiny-lora", git_remote=f"http://alice:{SECRET}@127.0.0.1:9/x.git")
    assert SECRET not in str(e.value)


# --------------------------------------------------------------------------------------------------- compose

def test_compose_linear_1_0_is_the_first_adapter(runs, tmp_path, capsys):
    first, second = (logits(load_trained(o)[0]) for o in runs)
    assert (first - second).abs().max() > 1e-3  # two different adapters
    rc, out, err = cli(capsys, "compose", runs[0], runs[1], "--weights", 1, 0, "--method", "linear", "--out", tmp_path / "c10")
    assert rc == 0, err
    torch.testing.assert_close(logits(load_trained(tmp_path / "c10")[0]), first, atol=1e-6, rtol=0)
    compose(runs, [0, 1], tmp_path / "c01")
    torch.testing.assert_close(logits(load_trained(tmp_path / "c01")[0]), second, atol=1e-6, rtol=0)
    half = logits(load_trained(compose(runs, [0.5, 0.5], tmp_path / "half"))[0])
    assert (half - first).abs().max() > 1e-5 and (half - second).abs().max() > 1e-5

    run = json.loads((tmp_path / "c10" / "run.json").read_text())
    assert run["composition"]["method"] == "linear" and run["composition"]["weights"] == [1.0, 0.0]
    assert [s["path"] for s in run["composition"]["sources"]] == [str(o) for o in runs] and run["metrics"] == {}
    assert [s["name"] for s in run["composition"]["sources"]] == ["seed42", "seed7"]  # each its own (both were the last's)
    assert (tmp_path / "c10" / "recipe.yaml").read_text() == (runs[0] / "recipe.yaml").read_text()
    meta = check_card(card_text(tmp_path / "c10", "alice/composed"))
    assert "model-index" not in meta  # nothing measured yet, nothing claimed
    assert run["selected_on"] is None and run["best_step"] is None  # no evaluation chose a composition's weights
    from peftlab.run import evaluate

    measured = evaluate(tmp_path / "c10")  # `peftlab eval` on it: its card reports what that measured
    card = card_text(tmp_path / "c10", "alice/composed")
    meta = check_card(card)
    assert meta["model-index"][0]["results"] and f"{measured['accuracy']:.4f}" in card and "selection split" not in card
    assert "Measured by `peftlab eval` on the composed adapter" in card and "beside it" not in card
    source = json.loads((runs[0] / "run.json").read_text())
    exported = source["best_step"] if source["selected_on"] else source["steps"]
    assert f"- composed, not trained; the first source: {source['steps']} optimizer steps (exported: step {exported})" in card
    assert "composed by peftlab from adapters trained with it" in card and "rerun it with" not in card
    assert "- the composed adapter: rank 4, lora_alpha 4 (`adapter_config.json`); the lines below" in card
    intro = card.split("\n# ", 1)[1].split("\n\n")[1]  # what it is: the composed adapter's rank, not the first source's r/alpha
    assert intro.startswith("A LoRA adapter (rank 4, lora_alpha 4: the composed one)") and "alpha=" not in intro, intro
    # published, its evaluation goes with it: the card's figures were in no file of the published folder
    publish(tmp_path / "c10", "alice/composed", to=tmp_path / "pub-c10")
    shipped = json.loads((tmp_path / "pub-c10" / "eval-eval.json").read_text())
    assert shipped["metrics"]["accuracy"] == measured["accuracy"] and "run" not in shipped


def test_compose_linear_1_0_gives_back_an_rslora_adapter(runs, tmp_path, tiny_bert, sentiment_files):
    """The composed tensors carry their sources' scaling; the saved config kept use_rslora from the first source, which
    scaled them again by alpha/sqrt(r) (logits off by up to 0.9 on MiniLM)."""
    from peftlab import load_recipe, run

    rs = tmp_path / "rs"
    run(load_recipe(None, [f"model.name={tiny_bert}", f"data.train.path={sentiment_files['train']}", "data.eval=null",
                           "data.label_names=[negative,positive]", "adapter.r=4", "adapter.alpha=32", "adapter.use_rslora=true",
                           "adapter.dropout=0.0", "train.max_steps=3", "train.lr=1e-2", f"output_dir={rs}"]))
    composed = compose([rs, runs[1]], [1, 0], tmp_path / "c")
    torch.testing.assert_close(logits(load_trained(composed)[0]), logits(load_trained(rs)[0]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["ties", "dare_linear"])
def test_compose_other_methods_export_a_loadable_adapter(runs, tmp_path, method):
    target = compose(runs, [0.6, 0.4], tmp_path / method, method=method, density=0.5)
    assert torch.isfinite(logits(load_trained(target)[0])).all()
    assert json.loads((target / "run.json").read_text())["composition"]["density"] == 0.5


def lora_updates(model) -> dict:
    """Each LoRA layer's update dW (scaling included) of a loaded adapter, by module name."""
    from peft.tuners.lora import LoraLayer

    return {name: m.get_delta_weight(m.active_adapters[0]).detach() for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def test_compose_cat_and_svd_are_the_weighted_sum_of_the_updates(runs, tmp_path, capsys):
    """cat stacks the adapters (rank 8 from two of rank 4): its update is w1 dW1 + w2 dW2, a negative weight too. svd
    is that sum cut to rank --rank: exact at the sum of the ranks, the best rank-r approximation below it (default: the
    largest source rank). Both hold the sources' scalings at lora_alpha = r."""
    sources = [lora_updates(load_trained(o)[0]) for o in runs]
    weights = [0.7, -0.4]
    expected = {k: weights[0] * sources[0][k] + weights[1] * sources[1][k] for k in sources[0]}
    assert expected and max(v.abs().max() for v in expected.values()) > 1e-3
    rc, _, err = cli(capsys, "compose", runs[0], runs[1], "--weights", *weights, "--method", "svd", "--rank", 8, "--out", tmp_path / "svd8")
    assert rc == 0, err
    for method, target in (("cat", compose(runs, weights, tmp_path / "cat", method="cat")), ("svd", tmp_path / "svd8")):
        got = lora_updates(load_trained(target)[0])
        for k in expected:
            torch.testing.assert_close(got[k], expected[k], atol=1e-5, rtol=1e-4, msg=f"{method} {k}")
        cfg = json.loads((target / "adapter_config.json").read_text())
        assert cfg["r"] == cfg["lora_alpha"] == 8 and not cfg["use_rslora"]
    assert json.loads((tmp_path / "svd8" / "run.json").read_text())["composition"]["rank"] == 8
    low = lora_updates(load_trained(compose(runs, weights, tmp_path / "svd4", method="svd"))[0])
    assert json.loads((tmp_path / "svd4" / "adapter_config.json").read_text())["r"] == 4
    for k in expected:  # the best rank-4 approximation: its error is the sum's 5th to 8th singular values, no more
        s = torch.linalg.svdvals(expected[k])
        assert torch.linalg.matrix_norm(low[k] - expected[k]) <= s[4:].norm() * (1 + 1e-4) + 1e-6
    with pytest.raises(PeftlabError, match="--rank sets the rank of --method svd's result"):
        compose(runs, weights, tmp_path / "c", method="linear", rank=4)
    with pytest.raises(PeftlabError, match="--rank 0: the composed adapter's rank, at least 1"):
        compose(runs, weights, tmp_path / "c", method="svd", rank=0)
    with pytest.raises(PeftlabError, match=r"--rank 40: above the size of the smallest adapted layer \(.*: 32\).*--rank 32"):
        compose(runs, weights, tmp_path / "c", method="svd", rank=40)  # (it wrote r=40 over 32x32 factors: unloadable)
    assert not (tmp_path / "c").exists()


def test_compose_svd_rank_on_a_4bit_base_is_checked_against_the_layers_sizes(make_recipe, tmp_path):
    """A 4-bit base's weights are packed (shape (n, 1)): --rank was checked against that 1, and every --rank above 1 was
    refused ("above the size of the smallest adapted layer (...: 1)") on a QLoRA adapter."""
    from peftlab import run

    q4 = Path(run(make_recipe({"quant.mode": "4bit", "train.max_steps": 2, "train.lr": 5e-2, "data.eval": None,
                               "output_dir": tmp_path / "q4"}))["output_dir"])
    composed = compose([q4, q4], [1, 0], tmp_path / "svd", method="svd", rank=4)
    assert json.loads((composed / "adapter_config.json").read_text())["r"] == 4
    torch.testing.assert_close(logits(load_trained(composed)[0]), logits(load_trained(q4)[0]), atol=1e-5, rtol=0)
    with pytest.raises(PeftlabError, match=r"--rank 40: above the size of the smallest adapted layer \(.*: 32\)"):
        compose([q4, q4], [1, 0], tmp_path / "c", method="svd", rank=40)


@pytest.mark.parametrize("base", [{"quant.mode": "4bit"}, {"model.dtype": "bfloat16"}])
def test_compose_cat_on_a_half_precision_base_keeps_the_sources_precision(make_recipe, tmp_path, base):
    """peft makes the composed adapter in the base layer's dtype (a 4-bit base's compute dtype, a bf16 base's) and cat
    writes the stacked factors into it in place: they were rounded to bfloat16 and saved so, and weights 1 0 gave the
    first adapter's update 0.4% off."""
    from safetensors.torch import load_file

    from peftlab import run

    first = Path(run(make_recipe({**base, "train.max_steps": 2, "train.lr": 5e-2, "data.eval": None,
                                  "output_dir": tmp_path / "first"}))["output_dir"])
    composed = compose([first, first], [1, 0], tmp_path / "cat", method="cat")
    saved = load_file(str(composed / "adapter_model.safetensors"))
    assert {v.dtype for k, v in saved.items() if "lora_" in k} == {torch.float32}
    want, got = lora_updates(load_trained(first)[0]), lora_updates(load_trained(composed)[0])
    for k in want:
        torch.testing.assert_close(got[k].float(), want[k].float(), atol=1e-6, rtol=1e-5, msg=k)


def with_tensors(src: Path, to: Path, change) -> Path:
    """A copy of run folder `src` whose adapter tensors are `change(name, tensor)`, its record's checksum updated."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, to)
    state = load_file(str(to / "adapter_model.safetensors"))
    save_file({k: change(k, v).contiguous() for k, v in state.items()}, str(to / "adapter_model.safetensors"), metadata={"format": "pt"})
    record = json.loads((to / "run.json").read_text())
    (to / "run.json").write_text(json.dumps({**record, "weights_sha256": sha256(to / "adapter_model.safetensors")}))
    return to


def test_compose_keeps_the_base_embedding_peft_saves_beside_an_adapted_one_once(make_recipe, tmp_path, tiny_llama):
    """peft saves the whole base embedding (embed_tokens.base_layer.weight) in an adapter that adapts it; compose summed it
    with the weights as a task head: weights 1 1 doubled the base's embedding, 1 -1 zeroed it."""
    from safetensors.torch import load_file

    from peftlab import run

    first = Path(run(make_recipe({"adapter.target_modules": "[embed_tokens,q_proj]", "train.max_steps": 3, "train.lr": 5e-2,
                             "output_dir": tmp_path / "emb"}, model=tiny_llama))["output_dir"])
    base = "base_model.model.model.embed_tokens.base_layer.weight"
    zero = with_tensors(first, tmp_path / "zero", lambda k, v: v if k == base or "lora_A" in k or "embedding_A" in k else 0 * v)
    for method, weights in (("cat", [1, 1]), ("svd", [1, 1]), ("linear", [1, 0])):  # the second adds nothing: the first
        composed = compose([first, zero], weights, tmp_path / method, method=method)  # adapter, on the base's embedding
        assert torch.equal(load_file(str(composed / "adapter_model.safetensors"))[base], load_file(str(first / "adapter_model.safetensors"))[base])
        torch.testing.assert_close(logits(load_trained(composed)[0]), logits(load_trained(first)[0]), atol=1e-5, rtol=0, msg=method)
    other = with_tensors(first, tmp_path / "other", lambda k, v: v + 1 if k == base else v)
    with pytest.raises(PeftlabError, match=r"saves other base weights than .*embed_tokens.base_layer.weight.*same base weights"):
        compose([first, other], [1, 1], tmp_path / "c")


def test_compose_of_per_layer_ranks_is_refused_by_the_methods_of_one_rank(runs, make_recipe, tmp_path):
    """linear (ties, dare, magnitude_prune) add factors of one shape: with a rank_pattern they failed with torch's "stack
    expects each tensor to be equal size", or wrote r=4 with no rank_pattern over rank-2 tensors, which did not load.
    cat and svd size each layer: the rank_pattern adapter composes exactly."""
    from peftlab import run

    pattern = Path(run(make_recipe({"adapter.options": "{rank_pattern: {query: 2}}", "train.max_steps": 2, "train.lr": 5e-2,
                                    "output_dir": tmp_path / "rp"}))["output_dir"])
    for method in ("linear", "ties"):
        with pytest.raises(PeftlabError, match=rf"per-layer ranks \(rank_pattern \{{'query': 2\}}, r 4\): --method {method} .*"
                                               "--method cat .* or svd"):
            compose([runs[0], pattern], [0.5, 0.5], tmp_path / "c", method=method)
    assert not (tmp_path / "c").exists()
    composed = compose([pattern, runs[0]], [1, 0], tmp_path / "cat", method="cat")
    torch.testing.assert_close(logits(load_trained(composed)[0]), logits(load_trained(pattern)[0]), atol=1e-6, rtol=0)


def test_compose_keeps_the_trained_lora_biases(runs, make_recipe, tmp_path):
    """peft's add_weighted_adapter leaves lora_B's biases (adapter.options lora_bias) at zero: the composed file said
    lora_bias true over zero biases, and weights 1 0 did not give back the first adapter."""
    from peftlab import run

    biased = Path(run(make_recipe({"adapter.options": "{lora_bias: true}", "train.max_steps": 3, "train.lr": 5e-2,
                                   "output_dir": tmp_path / "lb"}))["output_dir"])
    alone = logits(load_trained(biased)[0])
    for method, sources, weights in (("linear", [biased, runs[0]], [1, 0]), ("cat", [biased, runs[0]], [1, 0]),
                                     ("cat", [runs[0], biased], [0, 1]), ("svd", [runs[0], biased], [0, 1])):
        composed = compose(sources, weights, tmp_path / f"{method}{weights}", method=method)
        assert json.loads((composed / "adapter_config.json").read_text())["lora_bias"] is True
        torch.testing.assert_close(logits(load_trained(composed)[0]), alone, atol=1e-5, rtol=0, msg=f"{method} {weights}")


def test_adapters_that_train_the_base_biases_are_refused_beside_others(runs, tmp_path):
    """bias: lora_only / all trains the base's own biases, which peft holds for one adapter per model: compose and
    load_adapters ended in peft's raw "LoraModel supports only 1 adapter with bias"."""
    from peftlab.adapters import load_adapters

    biased = tmp_path / "bias"
    shutil.copytree(runs[1], biased)
    cfg = json.loads((biased / "adapter_config.json").read_text())
    (biased / "adapter_config.json").write_text(json.dumps({**cfg, "bias": "lora_only"}))
    with pytest.raises(PeftlabError, match=r"bias.* trained the base's own biases too \(bias: lora_only.*Compose adapters that"):
        compose([runs[0], biased], [0.5, 0.5], tmp_path / "c")
    with pytest.raises(ArtifactError, match=r"adapter 'b' .* trained the base's own biases too.*Load it on its own"):
        load_adapters({"a": runs[0], "b": biased})
    assert not (tmp_path / "c").exists()


def test_compose_refuses_mismatched_runs(runs, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(runs[1], other)
    run = json.loads((other / "run.json").read_text())
    run["label_names"] = ["a", "b"]
    (other / "run.json").write_text(json.dumps(run))
    with pytest.raises(PeftlabError, match=r"\(labels: \['a', 'b'\] vs \['negative', 'positive'\]\).*same base model and labels"):
        compose([runs[0], other], [0.5, 0.5], tmp_path / "c")
    with pytest.raises(PeftlabError, match="one weight per run"):
        compose(runs, [1.0], tmp_path / "c")
    with pytest.raises(PeftlabError, match="one of the inputs"):
        compose(runs, [1, 0], runs[1])
    with pytest.raises(PeftlabError, match=r"--density 1.5: .* in \(0, 1\]"):
        compose(runs, [0.5, 0.5], tmp_path / "c", method="ties", density=1.5)
    with pytest.raises(PeftlabError, match="--method linear does not prune"):
        compose(runs, [0.5, 0.5], tmp_path / "c", method="linear", density=0.5)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(PeftlabError, match="must be a finite number"):
            compose(runs, [bad, 0.5], tmp_path / "c")
    ia3 = tmp_path / "ia3"  # another kind of adapter: refused by name before any model is built
    shutil.copytree(runs[1], ia3)
    cfg = json.loads((ia3 / "adapter_config.json").read_text())
    (ia3 / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(PeftlabError, match="not a LoRA adapter: only LoRA adapters"):
        compose([runs[0], ia3], [0.5, 0.5], tmp_path / "c")
    (ia3 / "run.json").write_text(json.dumps({**json.loads((ia3 / "run.json").read_text()), "method": "ia3"}))
    with pytest.raises(PeftlabError, match="holds an ia3 adapter, not a LoRA adapter"):  # (it said "a ia3")
        compose([runs[0], ia3], [0.5, 0.5], tmp_path / "c")
    stacked = tmp_path / "stacked"  # trained on another run's merged weights (model.from_run): another base
    shutil.copytree(runs[1], stacked)
    recipe = yaml.safe_load((stacked / "recipe.yaml").read_text())
    recipe["model"]["from_run"] = str(runs[0])
    (stacked / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(PeftlabError, match="another base.*model.from_run"):
        compose([runs[0], stacked], [0.5, 0.5], tmp_path / "c")
    dora = tmp_path / "dora"  # DoRA's magnitude vectors would be dropped: refused
    shutil.copytree(runs[1], dora)
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(PeftlabError, match="holds a DoRA adapter .*not even with weights 1 0"):
        compose([runs[0], dora], [1, 0], tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_compose_replaces_an_earlier_composition_only_when_asked_and_never_other_files(runs, tmp_path, capsys):
    """An earlier composition in --out was replaced without a word, and with it whatever else the folder held: a published
    card (README.md), the user's notes, `peftlab eval` results. An --out under a file raised a raw FileExistsError, once
    the models were loaded."""
    target = compose(runs, [0.5, 0.5], tmp_path / "c")
    before = digest(target)
    with pytest.raises(ArtifactError, match=r"holds an earlier composition: .*--overwrite \(overwrite=True\)"):
        compose(runs, [0.7, 0.3], target)
    assert digest(target) == before
    rc, _, err = cli(capsys, "compose", runs[0], runs[1], "--weights", 0.7, 0.3, "--out", target)
    assert rc == 2 and "--overwrite" in err and digest(target) == before
    rc, _, err = cli(capsys, "compose", runs[0], runs[1], "--weights", 0.7, 0.3, "--out", target, "--overwrite")
    assert rc == 0, err
    assert json.loads((target / "run.json").read_text())["composition"]["weights"] == [0.7, 0.3]
    for name in ("NOTES.md", "README.md", "eval-eval.json"):
        (target / name).write_text("kept")
    before = digest(target)
    with pytest.raises(ArtifactError, match=r"holds files compose does not write \(NOTES.md, README.md, eval-eval.json\)"):
        compose(runs, [0.5, 0.5], target, overwrite=True)
    assert digest(target) == before
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match=r"--out .*file/c cannot be created: .*file is a file"):
        compose(runs, [0.5, 0.5], tmp_path / "file" / "c")


def test_a_composed_card_without_a_repo_id_is_titled_by_the_composition(runs, tmp_path):
    """Without --repo-id the composed card's title and model_name were the first source's run name ("# seed42")."""
    target = compose(runs, [0.5, 0.5], tmp_path / "a+b")
    card = card_text(target)
    assert "\n# a+b\n" in card and "# seed42" not in card
    from peftlab.publish import card_data

    assert card_data(target).model_name == "a+b"


def test_compose_accepts_two_spellings_of_one_local_base(runs, tmp_path):
    """model.name as `DIR` in one run and `DIR/../NAME` in the other names one base folder: they compose."""
    respelled = tmp_path / "respelled"
    shutil.copytree(runs[1], respelled)
    recipe = yaml.safe_load((respelled / "recipe.yaml").read_text())
    name = Path(recipe["model"]["name"])
    assert name.is_dir()  # the tiny base is a local folder
    recipe["model"]["name"] = str(name / ".." / name.name)
    (respelled / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    target = compose([runs[0], respelled], [1, 0], tmp_path / "c")
    torch.testing.assert_close(logits(load_trained(target)[0]), logits(load_trained(runs[0])[0]), atol=1e-6, rtol=0)


def test_eval_a_published_adapter_by_id(runs, hub, monkeypatch, tmp_path, capsys, tiny_bert, sentiment_files):
    """`peftlab eval --adapter NAMESPACE/NAME`: download, rebuild on the base named by its recipe, same metrics;
    results go to runs/eval/..., never into the download cache. model.name=... overrides the base."""
    rc, _, err = cli(capsys, "publish", runs[0], "--repo-id", "alice/tiny-lora", "--endpoint", hub.url)
    assert rc == 0, err
    monkeypatch.chdir(tmp_path)
    rc, printed, err = cli(capsys, "eval", "--adapter", "alice/tiny-lora", "--endpoint", hub.url, f"model.name={tiny_bert}")
    assert rc == 2 and "data.eval.path: 'dev.tsv' not found" in err  # the published recipe names its data by file name only
    rc, printed, err = cli(capsys, "eval", "--adapter", "alice/tiny-lora", "--endpoint", hub.url, f"model.name={tiny_bert}",
                           f"data.eval.path={sentiment_files['dev']}")
    assert rc == 0, err
    metrics = json.loads(printed)
    expected = json.loads((runs[0] / "metrics.json").read_text())["eval"]
    assert metrics["accuracy"] == pytest.approx(expected["accuracy"]) and metrics["loss"] == pytest.approx(expected["loss"], abs=1e-5)
    (results,) = (tmp_path / "runs" / "eval").glob("alice__tiny-lora-*")  # NAME-TAG: one folder per set of overrides
    assert json.loads((results / "eval-eval.json").read_text())["overrides"][0] == f"model.name={tiny_bert}"
    rc, _, err = cli(capsys, "eval", "--adapter", "alice/missing", "--endpoint", hub.url)
    assert rc == 2 and "no repo alice/missing" in err


def test_a_second_publish_or_compose_into_a_folder_being_written_is_refused(runs, tmp_path):
    """Two `publish --to DIR` at once shared one staging folder: one deleted the other's mid-fill (a traceback); two
    composes into one --out both reported success, the last writer winning."""
    from peftlab.rundir import RunDir

    for target, write in ((tmp_path / "pub", lambda t: publish(runs[0], "alice/x", to=str(t))),
                          (tmp_path / "comp", lambda t: compose(runs, [0.5, 0.5], t))):
        with RunDir(target).lock(), pytest.raises(ArtifactError, match="in use by another peftlab run"):
            write(target)
        assert not target.exists()
        write(target)  # once the other is done
        assert (target / "adapter_model.safetensors").is_file()
