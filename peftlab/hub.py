"""Publishing and reusing adapters: model card, publish (Hub, a directory, a git remote), load back by id, compose.

`publish(OUT, repo_id)` turns a finished run into the folder a user downloads -- the adapter (or standalone model),
tokenizer, recipe.yaml, run.json, metrics.json, eval_report.json and a README.md model card generated from them --
and uploads it with huggingface_hub (create_repo + upload_folder). Checkpoints, logs and merged/ stay home. The token
comes from huggingface_hub's usual places (HF_TOKEN, `hf auth login`); peftlab never reads, prints or stores it.
The folder is built in a temporary directory, so a failed upload leaves OUT as it was.

`load_adapter(id_or_path)` gives back a local folder that `export.load_trained` loads; `compose(...)` combines
LoRA adapters of one base with peft's `add_weighted_adapter` and exports the result like any other run.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from fnmatch import fnmatch
from pathlib import Path

import yaml

from .errors import ArtifactError, PeftlabError, PublishError
from .export import read_run, sha256, weights_file, write_atomic_dir

log = logging.getLogger(__name__)

# packaged model -> (hub id, licence): the card names what a reader can download, not a site-packages path
KNOWN_BASES = {"minilm": ("sentence-transformers/all-MiniLM-L6-v2", "apache-2.0")}
# folder of a local data file (../shared/data/<name>/...) -> (hub dataset id, pretty name)
KNOWN_DATASETS = {"sst2": ("stanfordnlp/sst2", "SST-2"), "ag_news": ("fancyzhx/ag_news", "AG News"),
                  "samsum": ("Samsung/samsum", "SAMSum")}
SPLIT_NAMES = {"dev": "validation", "validation": "validation", "valid": "validation", "test": "test", "train": "train"}
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_config.json", "model.safetensors", "config.json", "generation_config.json")
RECORD_FILES = ("recipe.yaml", "run.json", "metrics.json", "eval_report.json")
CONFIG_FILES = ("adapter_config.json", "config.json", "generation_config.json")  # rewritten without local paths
TOKENIZER_GLOBS = ("tokenizer*.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json",
                   "merges.txt", "spiece.model", "sentencepiece.bpe.model", "chat_template.j*")
CARD_METRICS = {"accuracy": "Accuracy", "f1": "Macro F1", "rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L",
                "rougeLsum": "ROUGE-Lsum"}
PEFT_TASKS = {"SEQ_CLS": ("text-classification", "AutoModelForSequenceClassification"),
              "SEQ_2_SEQ_LM": ("summarization", "AutoModelForSeq2SeqLM"), "CAUSAL_LM": ("text-generation", "AutoModelForCausalLM")}
TASK_NAMES = {"text-classification": "Text Classification", "summarization": "Summarization", "text-generation": "Text Generation"}
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
BRANCH = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,99}")
LOGIN_HINT = "Log in with `hf auth login` (a token with write access, https://huggingface.co/settings/tokens) or set HF_TOKEN."


# ----------------------------------------------------------------------------------------------- checks

def check_repo_id(repo_id: str) -> str:
    """`namespace/name` with the Hub's characters, no path tricks; clear error otherwise."""
    ok = isinstance(repo_id, str) and REPO_ID.fullmatch(repo_id) and ".." not in repo_id and "--" not in repo_id \
        and not repo_id.endswith((".", "-", ".git"))
    if not ok:
        raise PublishError(f"repo id {repo_id!r} is not a valid Hub repo id. Use NAMESPACE/NAME (your user or organisation, "
                           "then the repo name): letters, digits, '-', '_', '.', at most 96 characters each, no '..' or '--', "
                           "not ending in '.', '-' or '.git'. Example: --repo-id alice/minilm-sst2-lora")
    return repo_id


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


# ------------------------------------------------------------------------------------------- model card

def base_model_id(recipe, override: str | None = None) -> str | None:
    """The hub id of the base: --base-model, a packaged model's public id, or model.name when it is a hub id."""
    if override:
        return check_repo_id(override) if "/" in override else override
    name = recipe.model.name
    if name in KNOWN_BASES:
        return KNOWN_BASES[name][0]
    if is_local_model(name):
        return None  # a folder on the publisher's machine: no public id to link
    return name


# ------------------------------------------------------------------------------- nothing local goes out

def is_local_path(value) -> bool:
    """An absolute or home-relative path: it means nothing on another machine and names the publisher's folders."""
    return isinstance(value, str) and (value.startswith(("/", "~")) or re.match(r"[A-Za-z]:[\\/]", value) is not None)


def is_local_model(name: str | None) -> bool:
    return bool(name) and name not in KNOWN_BASES and (Path(name).expanduser().exists() or name.startswith((".", "/", "~")))


def public_path(value: str) -> str:
    """A local file's published name: the file name, under its folder when that is a known dataset (sst2/dev.tsv)."""
    p = Path(value.rstrip("/\\"))
    return f"{p.parent.name}/{p.name}" if p.parent.name in KNOWN_DATASETS else p.name


def _scrub(value, where: str, changed: list[str]):
    """`value` with every absolute path string (at any depth) replaced by its public name; `where` of each goes to `changed`."""
    if isinstance(value, dict):
        return {k: _scrub(v, f"{where}.{k}" if where else str(k), changed) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, f"{where}[{i}]", changed) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            setattr(value, f.name, _scrub(getattr(value, f.name), f"{where}.{f.name}" if where else f.name, changed))
        return value
    if is_local_path(value):
        changed.append(where)
        return public_path(value)
    return value


def public_record(out: Path, base_model: str | None = None):
    """(recipe, run.json) of run OUT as they are published: no path of the training machine. A local base folder is
    named by --base-model or its folder name, data files by their file names, output_dir is dropped. The run folder
    itself is not changed; run.json's `published` entry lists what was rewritten."""
    saved, run = read_run(out)
    recipe, run, rewritten = copy.deepcopy(saved), copy.deepcopy(run), {"recipe.yaml": [], "run.json": []}
    for key, override in (("name", base_model), ("decoder", None)):
        if is_local_model(getattr(saved.model, key)):
            setattr(recipe.model, key, override or public_path(getattr(saved.model, key)))
            rewritten["recipe.yaml"].append(f"model.{key}")
    if is_local_path(recipe.output_dir):
        recipe.output_dir = None  # null = runs/<name> wherever the recipe is run again
        rewritten["recipe.yaml"].append("output_dir")
    _scrub(recipe, "", rewritten["recipe.yaml"])
    public_base = base_model_id(saved, base_model) or recipe.model.name
    for key, value in (("output_dir", None), ("base_model", recipe.model.name), ("base_path", public_base)):
        if key in run and run[key] != value:
            run[key] = value
            rewritten["run.json"].append(key)
    run = _scrub(run, "", rewritten["run.json"])
    run.setdefault("selected_on", selection_split(saved, run))
    if any(rewritten.values()):
        run["published"] = {"rewritten": {k: sorted(set(v)) for k, v in rewritten.items() if v},
                            "note": "paths of the training machine were replaced by public names (hub ids, folder or file "
                                    "names) in this published copy"}
    return recipe, run


def local_roots(out: Path) -> list[str]:
    """Folders of the training machine that must not appear in a published file: the run's, the base's, the data's."""
    recipe, _ = read_run(out)
    paths = [Path(out), *(Path(p) for p in (recipe.model.name, recipe.model.decoder) if is_local_model(p))]
    paths += [Path(s.path).parent for s in (recipe.data.train, recipe.data.eval, recipe.data.test) if s is not None and s.path]
    roots = {str(p.expanduser().resolve()) for p in paths} | {str(p.expanduser().absolute()) for p in paths}
    return sorted(r for r in roots if len(Path(r).parts) > 2)  # '/' or '/tmp' alone would match anything


def check_nothing_local(folder: Path, roots: list[str]) -> None:
    """The guard after the rewrites: a publish folder that still names a local folder is refused, not sent."""
    for f in sorted(f for f in folder.iterdir() if f.suffix != ".safetensors"):  # weights: tensors and {"format": "pt"}
        data = f.read_bytes()
        found = [r for r in roots if r.encode() in data]
        if found:
            raise PublishError(f"the published {f.name} would contain the local path {found[0]}. Nothing was published. "
                               "Pass --base-model HUB_ID for a local base, and report this as a peftlab bug if it persists.")


# ------------------------------------------------------------------------------ which split chose the weights

def selection_split(recipe, run: dict) -> str | None:
    """The split the exported weights were chosen on: keep_best over more than one evaluation picks the step by its
    score there, so that split's figure is optimistic. None when the last (or only) evaluated step was exported."""
    if "selected_on" in run:
        return run["selected_on"]
    return "eval" if recipe.train.keep_best and len(run.get("history") or []) > 1 else None


def split_label(split: str, run: dict) -> str:
    """How a split's figure is labelled in the summary and the card: the selection split says so, the others are held out."""
    selected = run.get("selected_on")
    if not selected:
        return split
    if split == selected:
        return f"{split} (selection split: step {run.get('best_step')} of {run.get('steps')} chosen on it)"
    return f"{split} (held out)"


def dataset_of(recipe, split: str) -> tuple[str | None, str, str | None]:
    """(hub dataset id or None, pretty name, split name) of a data split of the recipe."""
    d = recipe.data
    spec = getattr(d, split)
    if spec is None:
        return None, split, None
    if spec.split is not None and d.dataset:
        pretty = d.dataset + (f" ({d.subset})" if d.subset else "")
        return d.dataset, pretty, spec.split
    path = Path(spec.path or "")
    folder = path.parent.name
    hub_id, pretty = KNOWN_DATASETS.get(folder, (None, folder or path.stem))
    return hub_id, pretty, SPLIT_NAMES.get(path.stem, path.stem)


def _task_of(out: Path, recipe) -> tuple[str, str]:
    """(pipeline tag, transformers Auto class) from the adapter's peft task type (the recipe for full models)."""
    cfg = out / "adapter_config.json"
    if cfg.is_file():
        task_type = json.loads(cfg.read_text()).get("task_type")
        if task_type in PEFT_TASKS:
            return PEFT_TASKS[task_type]
    if recipe.task.type == "summarization":
        return PEFT_TASKS["SEQ_2_SEQ_LM"]
    return PEFT_TASKS["SEQ_CLS"]


def card_data(out: Path, repo_id: str | None = None, base_model: str | None = None, license: str | None = None):
    """The card's YAML metadata as huggingface_hub's ModelCardData (its model-index built by huggingface_hub)."""
    from huggingface_hub import EvalResult, ModelCardData

    recipe, run = public_record(out, base_model)
    metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else run.get("metrics", {})
    base = base_model_id(read_run(out)[0], base_model)
    evaluations = len(run.get("history") or [])
    pipeline_tag, _ = _task_of(out, recipe)
    is_adapter = (out / "adapter_config.json").is_file()
    name = repo_id.split("/")[-1] if repo_id else recipe.name
    results = []
    for split, values in metrics.items():
        ds_id, ds_name, ds_split = dataset_of(recipe, split)
        for key, value in values.items():
            if key in CARD_METRICS and isinstance(value, (int, float)):
                results.append(EvalResult(
                    task_type=pipeline_tag, task_name=TASK_NAMES[pipeline_tag], dataset_type=ds_id or ds_name, dataset_name=ds_name,
                    dataset_config=recipe.data.subset if ds_id == recipe.data.dataset else None, dataset_split=ds_split,
                    metric_type=key, metric_value=round(float(value), 6),
                    metric_name=CARD_METRICS[key] + (f" (selection split: best of {evaluations} evaluations)"
                                                     if split == run.get("selected_on") else ""),
                    metric_args={"average": "macro"} if key == "f1" else None))
    train_ds = dataset_of(recipe, "train")[0]
    method = run.get("method", recipe.adapter.method)
    tags = ["peft", method] if is_adapter else [method]
    if is_adapter and recipe.adapter.use_dora:
        tags.append("dora")
    if recipe.quant.mode != "none":
        tags += ["qlora" if recipe.quant.mode == "4bit" else "8-bit", "bitsandbytes"]
    tags += [pipeline_tag, recipe.task.type, "peftlab"]
    if base and is_adapter:
        tags.append(f"base_model:adapter:{base}")  # how the Hub links an adapter to its base
    licence = license or KNOWN_BASES.get(recipe.model.name, (None, None))[1] or "unknown"
    return ModelCardData(library_name="peft" if is_adapter else "transformers", base_model=base,
                         datasets=[train_ds] if train_ds else None, tags=tags, pipeline_tag=pipeline_tag, license=licence,
                         metrics=sorted({r.metric_type for r in results}) or None, model_name=name, eval_results=results or None)


def _usage(out: Path, recipe, run: dict, repo: str, base: str, local_base: bool = False) -> str:
    _, auto_cls = _task_of(out, recipe)
    labels = run.get("label_names") or []
    if not (out / "adapter_config.json").is_file():
        return (f"```python\nfrom transformers import {auto_cls}, AutoTokenizer\n\nrepo = {repo!r}\n"
                f"model = {auto_cls}.from_pretrained(repo).eval()\ntokenizer = AutoTokenizer.from_pretrained(repo)\n```")
    head = ""
    if auto_cls == "AutoModelForSequenceClassification":
        head = f"labels = {labels!r}\n"
        args = ", num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)}"
    else:
        args = ""
    quant = ""
    if recipe.quant.mode != "none":
        quant = f"  # trained on a {recipe.quant.mode} base: add quantization_config=BitsAndBytesConfig(...) to match it exactly"
    where = "  # a local folder when it was trained: point this at your copy of it" if local_base else ""
    example = ""
    if auto_cls == "AutoModelForSequenceClassification":
        example = ("with torch.no_grad():\n    logits = model(**tokenizer([\"a gripping, beautifully shot film\"], return_tensors=\"pt\")).logits\n"
                   "print(labels[logits.argmax(-1).item()])\n")
    return ("```python\nimport torch\nfrom peft import PeftModel\n"
            f"from transformers import {auto_cls}, AutoTokenizer\n\n"
            f"repo = {repo!r}\nbase_model = {base!r}{where}\n{head}"
            f"base = {auto_cls}.from_pretrained(base_model{args}){quant}\n"
            "tokenizer = AutoTokenizer.from_pretrained(repo)\n"
            "base.config.pad_token_id = tokenizer.pad_token_id\n"
            "model = PeftModel.from_pretrained(base, repo).eval()\n"
            f"{example}```")


def _selection_note(run: dict, metrics: dict, best_metric: str) -> list[str]:
    """Say which figure chose the exported weights (keep_best), so it is not read as a held-out result."""
    selected = run.get("selected_on")
    if not selected or selected not in metrics:
        return []
    held_out = [s for s in metrics if s != selected]
    n = len(run.get("history") or [])
    note = (f"The exported weights are those of the best of {n} evaluations on the {selected} split (`train.keep_best`, "
            f"`train.best_metric: {best_metric}`), so its figure was used for selection and is optimistic. ")
    note += (f"The held-out figure is {', '.join(held_out)}: it played no part in choosing the weights." if held_out else
             "No held-out split was scored: add `data.test` (or select on `data.eval_holdout` of train) for an unbiased figure.")
    return ["", note]


def card_text(out: Path, repo_id: str | None = None, base_model: str | None = None, license: str | None = None) -> str:
    """README.md of the published folder: metadata + recipe, method, costs, how to load it, limitations."""
    out = Path(out)
    recipe, run = public_record(out, base_model)
    data = card_data(out, repo_id, base_model, license)
    base = data.base_model or recipe.model.name
    local_base = "model.name" in (run.get("published") or {}).get("rewritten", {}).get("recipe.yaml", [])
    repo = repo_id or "PATH/TO/THIS/FOLDER"
    metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else {}
    report = json.loads((out / "eval_report.json").read_text()) if (out / "eval_report.json").is_file() else {}
    a, t = recipe.adapter, recipe.train
    base_link = f"[{base}](https://huggingface.co/{base})" if data.base_model else f"`{base}`" + (
        " (a local model folder on the training machine, named here by its folder name: give your copy of it with "
        "`model.name=FOLDER`, or publish with `--base-model HUB_ID`)" if local_base else "")
    what = {"lora": f"A LoRA adapter (r={a.r}, alpha={a.alpha:g})", "full": "A fully fine-tuned model",
            "frozen": "A classifier head trained on a frozen backbone", "adalora": f"An AdaLoRA adapter (average rank {a.r})",
            "scratch": "A model trained from scratch (random init: only the architecture comes from the base)"}.get(
                run.get("method", a.method), "A model")
    lines = [f"# {data.model_name}", "",
             f"{what} for **{data.pipeline_tag}** on top of {base_link}, trained with "
             "peftlab from the recipe below."
             + (f" Labels: {', '.join(run['label_names'])}." if run.get("label_names") else ""), ""]
    if run.get("composition"):
        c = run["composition"]
        lines += [f"Composed with peft's `add_weighted_adapter` ({c['method']}, weights {c['weights']}) from "
                  f"{', '.join(s['name'] for s in c['sources'])}; the recipe and record below are those of the first.", ""]
    lines += ["## Results", ""]
    if metrics:
        keys = [k for k in CARD_METRICS if any(k in m for m in metrics.values())] + ["loss"]
        lines += ["| split | dataset | " + " | ".join(CARD_METRICS.get(k, k) for k in keys) + " |",
                  "| --- | --- |" + " --- |" * len(keys)]
        for split, m in metrics.items():
            _, ds_name, ds_split = dataset_of(recipe, split)
            cells = [f"{m[k]:.4f}" if isinstance(m.get(k), (int, float)) else "-" for k in keys]
            lines.append(f"| {split_label(split, run)} | {ds_name} ({ds_split}) | " + " | ".join(cells) + " |")
        lines += _selection_note(run, metrics, recipe.train.best_metric)
        if report.get("n"):
            lines += ["", f"Measured by peftlab at the end of training on {report['n']:,} rows (per-class scores and the confusion "
                          "matrix are in `eval_report.json`)."]
    else:
        lines.append("Not evaluated yet: run `peftlab eval` on this folder.")
    targets = ", ".join(a.target_modules) if isinstance(a.target_modules, list) else a.target_modules or "the architecture's default modules"
    lines += ["", "## Training recipe", "", "The resolved recipe (`recipe.yaml`); rerun it with `peftlab train recipe.yaml`.", "",
              "```yaml", recipe.to_yaml().rstrip(), "```", "", "## Method and parameters", ""]
    if run.get("method", a.method) == "lora":
        lines.append(f"- LoRA r={a.r}, alpha={a.alpha:g}, dropout={a.dropout:g}, rsLoRA {'on' if a.use_rslora else 'off'}, "
                     f"DoRA {'on' if a.use_dora else 'off'}, on {targets}")
    if recipe.quant.mode != "none":
        lines.append(f"- base quantized with bitsandbytes: {recipe.quant.mode} ({recipe.quant.quant_type}, double quant "
                     f"{recipe.quant.double_quant})")
    if run.get("trainable_params"):
        lines.append(f"- trainable parameters: {run['trainable_params']:,} of {run['total_params']:,} "
                     f"({run.get('trainable_percent', 0):.3f}%)")
    exported = run.get("best_step") if run.get("selected_on") else run.get("steps", "?")  # keep_best off: the last step
    lines += [f"- {run.get('steps', '?')} optimizer steps (exported: step {exported}), "
              f"batch {t.batch_size} x accumulation {t.grad_accum} x {run.get('processes', 1)} process(es), lr {t.lr:g}, "
              f"{t.scheduler} schedule, seed {t.seed}", "", "## Hardware and wall time", ""]
    hw = run.get("hardware", {})
    device = hw.get("gpu") or f"CPU ({hw.get('cpu_count', '?')} cores, {hw.get('torch_threads', '?')} torch threads)"
    if run.get("train_wall_s") is not None:
        lines.append(f"- trained in {run['train_wall_s']:.1f} s on {device}, {run.get('examples_per_s', 0):.1f} examples/s, "
                     f"precision {run.get('precision', '?')}")
    lines.append(f"- Python {hw.get('python', '?')}, " + ", ".join(f"{k} {v}" for k, v in (run.get("versions") or {}).items() if v))
    lines += ["", "## How to use", "", "With peft and transformers:", "", _usage(out, recipe, run, repo, base, local_base), "",
              "With peftlab (downloads the folder, rebuilds the base from `recipe.yaml`):", "", "```python",
              "from peftlab import load_trained\nfrom peftlab.hub import load_adapter\n",
              f"model, tokenizer, recipe, run = load_trained(load_adapter({repo!r}))", "```", ""]
    if local_base:
        lines += [f"`recipe.yaml` names the base by its folder name (`{recipe.model.name}`): point peftlab at your copy with "
                  f"`peftlab eval --adapter {repo} model.name=FOLDER` (in Python: `load_trained(folder, recipe=load_recipe("
                  "folder / 'recipe.yaml', ['model.name=FOLDER']))`).", ""]
    lines += ["## Limitations", "",
              "- Evaluated only on the split(s) listed above; quality on other data, domains or languages is unknown.",
              f"- Inherits the limitations and biases of the base model ({base}) and of the training data "
              f"({dataset_of(recipe, 'train')[1]}); it was not audited for fairness or harmful outputs.",
              "- An adapter only works on the exact base it was trained on (same weights and tokenizer)."]
    if recipe.quant.mode != "none":
        lines.append("- Trained on a quantized base: outputs on a float base differ slightly; `peftlab merge` merges into a "
                     "dequantized copy.")
    lines.append("- Not for high-stakes decisions without an evaluation on your own data.")
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"


def check_card(text: str) -> dict:
    """Parse the card the way the Hub client does and round-trip its metadata; -> the metadata dict.

    huggingface_hub's ModelCard.validate asks the Hub's /api/validate-yaml (network); offline we check what
    huggingface_hub itself can: the YAML block parses, ModelCardData accepts it without ignoring errors, and the
    model-index survives model_index_to_eval_results -> eval_results_to_model_index unchanged."""
    from huggingface_hub import ModelCard, ModelCardData
    from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results

    try:
        card = ModelCard(text, ignore_metadata_errors=False)
        meta = card.data.to_dict()
        if ModelCardData(**meta).to_dict() != meta:
            raise ValueError("metadata does not round-trip through ModelCardData")
        if "model-index" in meta:
            name, results = model_index_to_eval_results(meta["model-index"])
            if eval_results_to_model_index(name, results) != meta["model-index"]:
                raise ValueError("model-index does not round-trip")
    except (ValueError, KeyError, TypeError, yaml.YAMLError) as e:
        raise PublishError(f"the generated model card is not valid Hub metadata: {e}") from None
    return meta


# ------------------------------------------------------------------------------------------ the folder

def publish_files(out: Path) -> list[Path]:
    """The files of OUT that are published: weights, tokenizer, records. Never checkpoints, logs, merged/ or dot-files."""
    weights_file(out)  # a clear error when OUT holds no weights
    names = [n for n in (*WEIGHT_FILES, *RECORD_FILES) if (out / n).is_file()]
    names += sorted(p.name for p in out.iterdir() if p.is_file() and any(fnmatch(p.name, g) for g in TOKENIZER_GLOBS))
    return [out / n for n in dict.fromkeys(names)]


def fill_folder(out: Path, dest: Path, repo_id: str | None = None, base_model: str | None = None, license: str | None = None) -> list[str]:
    """Write the publish folder of run OUT into the existing empty directory `dest`; -> its file names. recipe.yaml,
    run.json and the configs are the public copies (`public_record`): no path of the training machine goes out."""
    out = Path(out)
    text = card_text(out, repo_id, base_model, license)
    check_card(text)
    recipe, run = public_record(out, base_model)
    base = base_model_id(read_run(out)[0], base_model) or recipe.model.name
    for src in publish_files(out):
        if src.name == "recipe.yaml":
            (dest / src.name).write_text(recipe.to_yaml(), encoding="utf-8")
        elif src.name == "run.json":
            (dest / src.name).write_text(json.dumps(run, indent=2, default=str), encoding="utf-8")
        elif src.name in CONFIG_FILES:
            cfg, changed = json.loads(src.read_text()), []
            cfg = _scrub(cfg, "", changed)
            if src.name == "adapter_config.json":  # the public id, so AutoPeftModel.from_pretrained(repo) finds the base
                changed.append(cfg.get("base_model_name_or_path"))
                cfg["base_model_name_or_path"] = base
            if changed:
                (dest / src.name).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            else:
                shutil.copy2(src, dest / src.name)
        else:
            shutil.copy2(src, dest / src.name)
    (dest / "README.md").write_text(text, encoding="utf-8")
    check_nothing_local(dest, local_roots(out))
    return sorted(p.name for p in dest.iterdir())


def write_folder(out: Path, target: Path, **card_kw) -> list[str]:
    """Write the publish folder to `target` atomically (a previous publish folder there is replaced)."""
    out, target = Path(out), Path(target)
    o, t = out.resolve(), target.resolve()
    if t == o or t in o.parents:
        raise PublishError(f"{target} would replace the run itself ({out}). Choose a separate directory.")
    from .rundir import holds_run

    if holds_run(target):
        raise PublishError(f"{target} holds a peftlab run: publishing there would replace it. Choose a new or empty directory "
                           "(--to DIR), or delete that run first if you mean to replace it.")
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / "run.json").is_file())):
        raise PublishError(f"{target} exists and is not a published adapter folder. Choose a new or empty directory.")
    names: list[str] = []
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic_dir(target, lambda tmp: names.extend(fill_folder(out, tmp, **card_kw)))
    return names


# --------------------------------------------------------------------------------------------- publish

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
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision, commit_message=message)
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
    """Commit the folder into a clone of `remote` (files of the branch not in the folder are kept) and push it."""
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


def publish(out: str | Path, repo_id: str | None = None, *, private: bool = False, revision: str | None = None,
            endpoint: str | None = None, exist_ok: bool = False, dry_run: bool | str | Path = False, to: str | Path | None = None,
            git_remote: str | None = None, base_model: str | None = None, license: str | None = None) -> dict:
    """Publish a finished run: to the Hub (default), to a directory (`to`), to a git remote, or only write the folder
    that would be uploaded (`dry_run`: True = OUT/publish, or a directory). -> where it went and what it holds."""
    out = Path(out)
    recipe, run = read_run(out)
    if to and git_remote:
        raise PublishError("give one destination: --to DIR or --git-remote URL (or neither, for the Hub).")
    if repo_id is not None:
        check_repo_id(repo_id)
    elif not (dry_run or to or git_remote):
        raise PublishError("publishing to the Hub needs --repo-id NAMESPACE/NAME (e.g. alice/minilm-sst2-lora); "
                           "or write the folder with --dry-run, --to DIR or --git-remote URL.")
    check_branch(revision)
    card_kw = {"repo_id": repo_id, "base_model": base_model, "license": license}
    scored = run.get("metrics") or {}
    split = "test" if "accuracy" in scored.get("test", {}) else "eval"  # the held-out figure when there is one
    acc = scored.get(split, {}).get("accuracy")
    label = split_label(split, {**run, "selected_on": selection_split(recipe, run)})
    message = f"peftlab: {recipe.name} ({run.get('method', recipe.adapter.method)}" + (f", {label} accuracy {acc:.4f})" if acc is not None else ")")
    if dry_run or to:
        target = (out / "publish" if dry_run is True else Path(dry_run)) if dry_run else Path(to)
        files = write_folder(out, target, **card_kw)
        log.debug("publish folder written to %s (%d files)%s", target, len(files), ": nothing uploaded (dry run)" if dry_run else "")
        return {"destination": str(target), "files": files, "uploaded": False}
    with tempfile.TemporaryDirectory(prefix="peftlab-publish-") as tmp:
        folder = Path(tmp) / "folder"
        folder.mkdir()
        files = fill_folder(out, folder, **card_kw)
        if git_remote:
            result = push_to_git(folder, git_remote, branch=revision, message=message)
        else:
            result = push_to_hub(folder, repo_id, private=private, revision=revision, endpoint=endpoint, exist_ok=exist_ok,
                                 message=message)
    log.debug("published %s (%d files) to %s", out, len(files), result["url"])
    return {"destination": result["url"], "files": files, "uploaded": True, **result}


# ------------------------------------------------------------------------------------------- load back

def load_adapter(id_or_path: str | Path, endpoint: str | None = None, revision: str | None = None,
                 local_dir: str | Path | None = None) -> Path:
    """A local folder for `export.load_trained`: an existing run/publish folder as it is, or a Hub repo downloaded
    with snapshot_download (into the Hugging Face cache, or `local_dir`; cached copies are used offline)."""
    path = Path(id_or_path).expanduser()
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


# --------------------------------------------------------------------------------------------- compose

COMBINATIONS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "cat")


def compose(outs: list[str | Path], weights: list[float], out: str | Path, *, method: str = "linear", density: float | None = None,
            seed: int = 0) -> Path:
    """Combine LoRA adapters trained on one base into one adapter (peft's add_weighted_adapter), exported like a run.

    peft combines the LoRA matrices but refuses adapters that each save a task head (modules_to_save), so the
    adapters are loaded without their heads and the heads are summed with the same weights: for weights (1, 0, ...)
    and method linear the result is the first adapter exactly."""
    import torch
    from peft import PeftConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    from .export import load_trained

    outs, out = [Path(o) for o in outs], Path(out)
    if len(outs) < 2 or len(weights) != len(outs):
        raise PeftlabError(f"compose needs two or more runs and one weight per run (got {len(outs)} run(s), {len(weights)} weight(s)).")
    if method not in COMBINATIONS:
        raise PeftlabError(f"--method {method!r}: use one of {', '.join(COMBINATIONS)}.")
    if method not in ("linear", "cat") and density is None:
        density = 0.5
    if out.resolve() in [o.resolve() for o in outs]:
        raise PeftlabError(f"--out {out} is one of the inputs; choose a new directory.")
    check_compose_target(out)
    runs = [read_run(o) for o in outs]
    first_recipe, first_run = runs[0]
    for o, (r, info) in zip(outs, runs):
        if not (o / "adapter_config.json").is_file():
            raise PeftlabError(f"{o} holds a {info.get('method')} model, not a LoRA adapter: only adapters compose.")
        if (r.model.name, r.task.type, info.get("label_names")) != (first_recipe.model.name, first_recipe.task.type, first_run.get("label_names")):
            raise PeftlabError(f"{o} was trained on another base, task or label set than {outs[0]}: adapters compose only "
                               "on the same base model and labels.")
    trained, tokenizer, _, _ = load_trained(outs[0])
    base = trained.unload()  # the plain base (its head is replaced below)
    states = [load_file(str(o / "adapter_model.safetensors")) for o in outs]
    heads = [_head_state(sd) for sd in states]
    if any(h.keys() != heads[0].keys() or any(h[k].shape != heads[0][k].shape for k in h) for h in heads):
        raise PeftlabError("the adapters' task heads differ in shape or names: they cannot be combined.")
    model, names = None, [f"a{i}" for i in range(len(outs))]
    for name, o, sd, head in zip(names, outs, states, heads):
        cfg = PeftConfig.from_pretrained(str(o))
        cfg.modules_to_save, cfg.task_type = None, None  # LoRA matrices only: heads are combined below
        if model is None:
            model = get_peft_model(base, cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
        set_peft_model_state_dict(model, {k: v for k, v in sd.items() if k not in head}, adapter_name=name)
    torch.manual_seed(seed)  # dare_* prune at random
    try:
        model.add_weighted_adapter(names, [float(w) for w in weights], "composed", combination_type=method, density=density)
    except ValueError as e:
        raise PeftlabError(f"peft cannot combine these adapters with {method}: {e}") from None
    lora = get_peft_model_state_dict(model, adapter_name="composed")
    head = {k: sum(float(w) * h[k].float() for w, h in zip(weights, heads)).to(heads[0][k].dtype).contiguous() for k in heads[0]}
    composed_cfg = model.peft_config["composed"]
    config = PeftConfig.from_pretrained(str(outs[0]))  # task type and saved head of the originals
    config.r, config.lora_alpha, config.target_modules = composed_cfg.r, composed_cfg.lora_alpha, composed_cfg.target_modules
    config.rank_pattern, config.alpha_pattern = {}, {}
    sources = [{"name": r.name, "path": str(o), "weights_sha256": sha256(o / "adapter_model.safetensors")} for o, (r, _) in zip(outs, runs)]

    def fill(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in {**lora, **head}.items()}, str(tmp / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        shutil.copy2(outs[0] / "recipe.yaml", tmp / "recipe.yaml")
        info = {**first_run, "metrics": {}, "history": [], "weights_sha256": sha256(tmp / "adapter_model.safetensors"),
                "composition": {"method": method, "weights": [float(w) for w in weights], "density": density, "seed": seed,
                                "sources": sources, "note": "recipe.yaml and the training record are the first source's; task "
                                "heads summed with the same weights; not evaluated yet: run `peftlab eval` on this folder"}}
        (tmp / "run.json").write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")

    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic_dir(out, fill)
    log.info("composed %s (%s, weights %s) -> %s", ", ".join(map(str, outs)), method, weights, out)
    return out


def check_compose_target(out: Path) -> None:
    """--out may be new, empty, or an earlier composition (replaced); never a trained run or someone's folder."""
    from .rundir import holds_run

    if out.exists() and not out.is_dir():
        raise PeftlabError(f"--out {out} is a file. Choose a new directory: --out DIR.")
    if not out.is_dir() or not any(out.iterdir()):
        return
    try:
        earlier = "composition" in json.loads((out / "run.json").read_text()) and not (out / "log.jsonl").exists()
    except (OSError, ValueError):
        earlier = False
    if not earlier:
        what = "a peftlab run" if holds_run(out) else "files that are not a composed adapter"
        raise PeftlabError(f"--out {out} holds {what}: compose would replace it. Choose a new directory (--out DIR), or "
                           "delete it first if you mean to replace it.")


def _head_state(state: dict) -> dict:
    """The saved tensors of the fully trained task head (peft's modules_to_save): every tensor that is not LoRA's."""
    lora = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\b")
    return {k: v for k, v in state.items() if not lora.search(k)}
