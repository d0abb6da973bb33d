"""The model card and the public copy of a run's record: what a published folder says, with no local path in it.

`read_public(OUT)` reads a finished run once (rundir.read_run) and makes its public copies: the recipe and run.json
as published (a local base folder named by --base-model or its folder name, data files by their file names,
output_dir dropped). `card_text` writes the README.md model card from them; `check_card` parses it the way the Hub
client does.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import Recipe
from ..errors import PublishError
from ..methods import get_method
from ..rundir import RECIPE_FILE, RECORD_FILE, RunRecord, read_run
from ..tasks import Task, get_task, pipeline_tag, task_name, usage_class

log = logging.getLogger(__name__)

# packaged model -> (hub id, licence): the card names what a reader can download, not a site-packages path
KNOWN_BASES = {"minilm": ("sentence-transformers/all-MiniLM-L6-v2", "apache-2.0")}
# folder of a local data file (../shared/data/<name>/...) -> (hub dataset id, pretty name)
KNOWN_DATASETS = {"sst2": ("stanfordnlp/sst2", "SST-2"), "ag_news": ("fancyzhx/ag_news", "AG News"),
                  "samsum": ("Samsung/samsum", "SAMSum"), "emotion": ("dair-ai/emotion", "emotion"),
                  "dialogsum": ("knkarthick/dialogsum", "DialogSum"), "gsm8k": ("openai/gsm8k", "GSM8K"),
                  "mrpc": ("nyu-mll/glue", "GLUE MRPC"),
                  "amazon_mdsd": (None, "Amazon multi-domain sentiment (Blitzer et al. 2007)")}  # (on no Hub)
SPLIT_NAMES = {"dev": "validation", "validation": "validation", "valid": "validation", "test": "test", "train": "train"}
REPO_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")  # one part of a Hub id
REPO_ID = re.compile(rf"{REPO_NAME.pattern}/{REPO_NAME.pattern}")
ID_RULES = "letters, digits, '-', '_', '.', at most 96 characters each part, no '..' or '--', not ending in '.', '-' or '.git'"


def is_hub_id(value, pattern: re.Pattern = REPO_ID) -> bool:
    """`value` is a Hub id of the shape `pattern` (NAMESPACE/NAME, or REPO_NAME alone) with the Hub's characters, no path tricks."""
    return isinstance(value, str) and pattern.fullmatch(value) is not None and ".." not in value and "--" not in value \
        and not value.endswith((".", "-", ".git"))


def check_repo_id(repo_id: str) -> str:
    """`namespace/name` with the Hub's characters, no path tricks; clear error otherwise."""
    if not is_hub_id(repo_id):
        raise PublishError(f"repo id {repo_id!r} is not a valid Hub repo id. Use NAMESPACE/NAME (your user or organisation, "
                           f"then the repo name): {ID_RULES}. Example: --repo-id alice/minilm-sst2-lora")
    return repo_id


def check_base_model(base_model: str) -> str:
    """--base-model goes as it is into the card's base_model and tag, recipe.yaml and adapter_config.json, where a
    reader's peft downloads it: it must be a Hub model id (a path or a name with spaces names nothing there)."""
    if not (is_hub_id(base_model) or is_hub_id(base_model, REPO_NAME)):
        raise PublishError(f"--base-model {base_model!r} is not a Hub model id: it names the base in the card and in "
                           "adapter_config.json, where it is downloaded from the Hub. Give OWNER/NAME (e.g. --base-model "
                           "HuggingFaceTB/SmolLM2-135M) or a canonical id without an owner (e.g. --base-model bert-base-uncased): "
                           f"{ID_RULES}. A local base with no Hub id: leave --base-model out (the card names it by its folder name).")
    return base_model


# ------------------------------------------------------------------------------------------- model card

def base_model_id(recipe, override: str | None = None) -> str | None:
    """The hub id of the base: --base-model, a packaged model's public id, or model.name when it is a hub id."""
    if override is not None:
        return check_base_model(override)
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


def known_dataset(p: Path) -> int:
    """How many folders up a file's known dataset folder is: 1 for its own (sst2/dev.tsv), 2 for the one above
    (amazon_mdsd/labelled/books.jsonl); 0 for none."""
    return next((up for up in (1, 2) if len(p.parts) > up and p.parts[-1 - up] in KNOWN_DATASETS), 0)


def public_path(value: str) -> str:
    """A local file's published name: the file name, under its folders from a known dataset's on (sst2/dev.tsv)."""
    p = Path(value.rstrip("/\\"))
    return "/".join(p.parts[-1 - known_dataset(p):])


def scrub(value, where: str, changed: list[str]):
    """`value` with every absolute path string (at any depth) replaced by its public name; `where` of each goes to `changed`."""
    if isinstance(value, dict):
        return {k: scrub(v, f"{where}.{k}" if where else str(k), changed) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v, f"{where}[{i}]", changed) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            setattr(value, f.name, scrub(getattr(value, f.name), f"{where}.{f.name}" if where else f.name, changed))
        return value
    if is_local_path(value):
        changed.append(where)
        return public_path(value)
    return value


@dataclass(frozen=True)
class PublicRun:
    """A finished run read once for publishing: its own recipe and record, and their public copies (`public_record`)."""

    out: Path
    recipe: Recipe  # as trained: local paths included
    run: RunRecord
    public_recipe: Recipe  # as published
    public_run: RunRecord
    base_model: str | None = None  # --base-model: the hub id of a local base

    @property
    def base_id(self) -> str | None:
        if self.base_model is None and local_base_named(self.run):  # a published folder published again: no hub id either
            return None
        return base_model_id(self.recipe, self.base_model)


def local_base_named(run: RunRecord) -> bool:
    """The published copy names a local base folder by its folder name (run.json's `published` entry), not a hub id."""
    return "model.name" in (run.published or {}).get("rewritten", {}).get(RECIPE_FILE, [])


def read_public(out: str | Path, base_model: str | None = None) -> PublicRun:
    """Read run OUT (once) and make its public copies."""
    out = Path(out)
    recipe, run = read_run(out)
    task = get_task(recipe.task.type)
    if hasattr(task, "refuse_loading"):  # a multi-task run: its models, published one by one, are its tasks' runs
        raise task.refuse_loading(out, run)
    return PublicRun(out, recipe, run, *public_record(recipe, run, base_model), base_model=base_model)


def public_record(saved: Recipe, saved_run: RunRecord, base_model: str | None = None) -> tuple[Recipe, RunRecord]:
    """(recipe, run record) of a run as they are published: no path of the training machine. A local base folder is
    named by --base-model or its folder name, data files by their file names, output_dir is dropped. The run folder
    itself is not changed; run.json's `published` entry lists what was rewritten."""
    recipe, rewritten = copy.deepcopy(saved), {RECIPE_FILE: [], RECORD_FILE: []}
    run = copy.deepcopy(saved_run.to_dict())
    for key, override in (("name", base_model), ("decoder", None)):
        if is_local_model(getattr(saved.model, key)):
            setattr(recipe.model, key, override or public_path(getattr(saved.model, key)))
            rewritten[RECIPE_FILE].append(f"model.{key}")
    if is_local_path(recipe.output_dir):
        recipe.output_dir = None  # null = runs/<name> wherever the recipe is run again
        rewritten[RECIPE_FILE].append("output_dir")
    scrub(recipe, "", rewritten[RECIPE_FILE])
    public_base = base_model_id(saved, base_model) or recipe.model.name
    for key, value in (("output_dir", None), ("base_model", recipe.model.name), ("base_path", public_base)):
        if run.get(key) is not None and run[key] != value:  # an older run.json without the entry: nothing to rewrite
            run[key] = value
            rewritten[RECORD_FILE].append(key)
    run = scrub(run, "", rewritten[RECORD_FILE])
    if any(rewritten.values()):
        run["published"] = {"rewritten": {k: sorted(set(v)) for k, v in rewritten.items() if v},
                            "note": "paths of the training machine were replaced by public names (hub ids, folder or file "
                                    "names) in this published copy"}
    return recipe, RunRecord.from_dict(run)


def local_roots(pub: PublicRun) -> list[str]:
    """Folders of the training machine that must not appear in a published file: the run's, the base's, the data's."""
    recipe = pub.recipe
    paths = [Path(pub.out), *(Path(p) for p in (recipe.model.name, recipe.model.decoder) if is_local_model(p))]
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


def dataset_of(recipe, split: str) -> tuple[str | None, str, str | None]:
    """(hub dataset id or None, pretty name, split name) of a data split of the recipe."""
    d = recipe.data
    spec = getattr(d, split)
    if spec is None and split == "eval" and d.eval_holdout > 0 and d.train is not None:  # a seeded part of train
        hub_id, pretty, train_split = dataset_of(recipe, "train")
        return hub_id, pretty, f"{d.eval_holdout:.0%} held out of {train_split}"
    if spec is None:
        return None, split, None
    sample = f" (a seeded sample of {spec.max_samples} rows)" if spec.max_samples else ""  # data.SPLIT.max_samples
    if spec.references_column:  # ROUGE is each row's best over them: higher than against one reference
        sample += f" (scored against several references a row: {spec.references_column}, the best of them)"
    if spec.split is not None and d.dataset:
        pretty = d.dataset + (f" ({d.subset})" if d.subset else "")
        return d.dataset, pretty, spec.split + sample
    path = Path(spec.path or "")
    folder = path.parts[-1 - known_dataset(path)] if known_dataset(path) else None
    # other data by its file name (the published recipe keeps no folder of it; its stem read as a dataset named `dev`)
    hub_id, pretty = KNOWN_DATASETS.get(folder, (None, f"local file {path.name}"))
    return hub_id, pretty, SPLIT_NAMES.get(path.stem, path.stem) + sample


def multitask_clause(m: dict | None) -> str:
    """A source run that is one task of a multi-task run (model.from_run, a distillation teacher): the data its adapter
    saw besides its own task's."""
    if not m:
        return ""
    others = [f"`{t}` ({(m.get('data') or {}).get(t) or 'data not recorded'})" for t in m.get("tasks", []) if t != m.get("task")]
    if m.get("adapters") != "shared":
        return f"; task `{m.get('task')}` of the multi-task run `{m.get('run')}` (its own adapter and head)"
    return (f"; task `{m.get('task')}` of the multi-task run `{m.get('run')}`, whose shared adapter was also trained on "
            + ", ".join(others))


def source_scores(entry: dict) -> str:
    """An earlier run's figures (a lineage step, a distillation teacher) with each split said for what it is: the one
    its keep_best chose on, or held out. Records written before stop 56 hold the eval split's figures only."""
    metrics, chosen = entry.get("metrics") or {}, entry.get("selected_on")
    if metrics and not any(isinstance(v, dict) for v in metrics.values()):
        metrics = {"eval": metrics}
    parts = []
    for split, values in metrics.items():
        scores = ", ".join(f"{m} {v:.4f}" for m, v in values.items() if isinstance(v, (int, float)))
        label = " (selection split)" if split == chosen else " (held out)" if chosen else ""
        parts.append(f"{split}{label} {scores}")
    return "; ".join(p for p in parts if p.strip())


def measured_metrics(out: Path, run: RunRecord) -> dict:
    """{split: metrics} the card reports: metrics.json, the run's final evaluations; for a composition, which no run
    evaluated, what `peftlab eval` wrote beside it (eval-SPLIT.json)."""
    if (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text())
    if run.composition:
        return {p.stem.removeprefix("eval-"): json.loads(p.read_text())["metrics"] for p in sorted(out.glob("eval-*.json"))}
    return run.metrics or {}


def user_metrics(recipe, task: Task, values: dict) -> dict[str, str]:
    """The metrics of the recipe's eval.metric_fn (e.g. GSM8K's answer_accuracy): whatever the task does not compute
    itself (its BUILTIN_METRICS) -> their names as they are."""
    if not getattr(recipe.eval, "metric_fn", None):
        return {}
    skip = (*getattr(task, "BUILTIN_METRICS", ("loss",)), *getattr(task, "DESCRIPTIVE", ()))
    return {k: k for k in values if k not in skip}


def _task_of(out: Path, recipe) -> tuple[Task, str | None]:
    """(the run's task, its model's peft task type): the adapter's, or for a full model (a merged one too) what its
    config.json says it is, an encoder-decoder (SEQ_2_SEQ_LM) or not (CAUSAL_LM). The task presents itself on the card
    with it (a summarizer: a seq2seq or a causal LM snippet)."""
    cfg = out / "adapter_config.json"
    if cfg.is_file():
        return get_task(recipe.task.type), json.loads(cfg.read_text()).get("task_type")
    try:
        encoder_decoder = json.loads((out / "config.json").read_text()).get("is_encoder_decoder", False)
    except (OSError, ValueError):
        return get_task(recipe.task.type), None
    return get_task(recipe.task.type), "SEQ_2_SEQ_LM" if encoder_decoder else "CAUSAL_LM"


def _public(source: str | Path | PublicRun, base_model: str | None) -> PublicRun:
    return source if isinstance(source, PublicRun) else read_public(source, base_model)


def card_data(source: str | Path | PublicRun, repo_id: str | None = None, base_model: str | None = None,
              license: str | None = None):
    """The card's YAML metadata as huggingface_hub's ModelCardData (its model-index built by huggingface_hub).
    `source`: a run folder, or the run already read (`read_public`)."""
    from huggingface_hub import EvalResult, ModelCardData

    pub = _public(source, base_model)
    out, recipe, run = pub.out, pub.public_recipe, pub.public_run
    metrics = measured_metrics(out, run)
    base = pub.base_id
    chosen = "early stopping on it" if run.stopped_at_last else f"best of {len(run.history or [])} evaluations"
    task, peft_type = _task_of(out, recipe)
    tag = pipeline_tag(task, peft_type)
    is_adapter = (out / "adapter_config.json").is_file()
    # a composition's recipe is its first source's: its own name is its folder's
    name = repo_id.split("/")[-1] if repo_id else Path(out).name if getattr(run, "composition", None) else recipe.name
    results = []
    for split, values in metrics.items():
        ds_id, ds_name, ds_split = dataset_of(recipe, split)
        names = {**task.card_metrics, **user_metrics(recipe, task, values)}
        for key, value in values.items():
            if key in names and isinstance(value, (int, float)) and math.isfinite(value):  # (the Hub refuses a NaN)
                results.append(EvalResult(
                    task_type=tag, task_name=task_name(task, peft_type), dataset_type=ds_id or ds_name, dataset_name=ds_name,
                    dataset_config=recipe.data.subset if ds_id == recipe.data.dataset else None, dataset_split=ds_split,
                    metric_type=key, metric_value=round(float(value), 6),
                    metric_name=names[key] + (f" (selection split: {chosen})" if split == run.selected_on else ""),
                    metric_args={"average": "macro"} if key == "f1" else None))
    train_ds = dataset_of(recipe, "train")[0]
    method = get_method(run.method or recipe.adapter.method)
    tags = method.tags(recipe) if is_adapter else [method.name]  # a merged folder holds a plain transformers model
    if recipe.quant.mode != "none" and is_adapter:  # (merged: a float32 model)
        tags += ["qlora" if recipe.quant.mode == "4bit" else "8-bit", "bitsandbytes"]
    tags += [tag, recipe.task.type, "peftlab"]
    if base and is_adapter:
        tags.append(f"base_model:adapter:{base}")  # how the Hub links an adapter to its base
    licence = license or KNOWN_BASES.get(recipe.model.name, (None, None))[1] or "unknown"
    return ModelCardData(library_name="peft" if is_adapter else "transformers", base_model=base,
                         datasets=[train_ds] if train_ds else None, tags=tags, pipeline_tag=tag, license=licence,
                         metrics=sorted({r.metric_type for r in results}) or None, model_name=name, eval_results=results or None)


def gguf_file_of(recipe) -> str | None:
    """The GGUF file name of a base given as a GGUF (model.name a .gguf file or a folder holding one), else None."""
    from ..bases import gguf_source
    from ..errors import ModelNotFound

    try:
        source = gguf_source(recipe.model.name)
    except ModelNotFound:
        return None
    return source.name if source is not None else None


def _usage(out: Path, recipe, run: RunRecord, repo: str, base: str, local_base: bool = False, gguf: str | None = None) -> str:
    auto_cls = usage_class(*_task_of(out, recipe))
    labels = run.label_names or []
    adapter = (out / "adapter_config.json").is_file()  # (a full model, a merged one too, has none)
    head = ""
    if auto_cls == "AutoModelForSequenceClassification":
        head = f"labels = {labels!r}\n"
        args = ", num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)}"
    else:
        args = ""
    if gguf and local_base:  # transformers reads the GGUF and dequantizes it to float32, as peftlab's conversion did
        args += f", gguf_file={gguf!r}, dtype=torch.float32"
    quant = ""
    if gguf and not local_base:
        quant = f"  # trained on the dequantized weights of the GGUF file {gguf}: this model's own weights differ a little"
    setup = ""
    if recipe.quant.mode != "none":  # the base as the run loaded it: its bitsandbytes settings, written out
        setup, quant = _quantization(recipe, run, auto_cls, len(labels)), ""
        args += ", quantization_config=quantization"
    where = "  # a local folder when it was trained: point this at your copy of it" if local_base else ""
    if gguf and local_base:
        where = f"  # a local folder holding {gguf} when it was trained: point this at your copy of it"
    example = ""
    if auto_cls == "AutoModelForSequenceClassification" and recipe.data.text_pair:  # trained on pairs: given as a pair
        example = _pair_example(out)
    elif auto_cls == "AutoModelForSequenceClassification":
        example = ("with torch.no_grad():\n    logits = model(**tokenizer([\"a gripping, beautifully shot film\"], return_tensors=\"pt\")).logits\n"
                   "print(labels[logits.argmax(-1).item()])\n")
    elif recipe.task.type == "sft":  # the run's tokenizer carries the chat template it was trained with (task.chat_format)
        system = (f"{{\"role\": \"system\", \"content\": {recipe.task.system_prompt!r}}}, "
                  if recipe.task.system_prompt else "")
        from transformers import AutoTokenizer

        from ..tasks.sft import stop_ids, text_stops

        # an end-of-turn marker that is no token (chatml on a base without it): written as text, generation stops there
        run_tokenizer = AutoTokenizer.from_pretrained(str(out))
        stops = text_stops(run_tokenizer)
        by_text = f", stop_strings={stops!r}, tokenizer=tokenizer" if stops else ""
        cut = "".join(f".split({m!r})[0]" for m in stops)
        why, no_cache = _no_cache(out, causal=True)
        example = (f"messages = [{system}{{\"role\": \"user\", \"content\": \"What is the capital of France?\"}}]\n"
                   "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", return_dict=True)\n"
                   f"eos = {stop_ids(run_tokenizer)!r}  # EOS and the chat template's end-of-turn tokens\n{BASE_ENDS}"
                   f"{why}with torch.no_grad():  # greedy, as peftlab's evaluation generates\n"
                   f"    out = model.generate(input_ids=inputs[\"input_ids\"], attention_mask=inputs[\"attention_mask\"], "
                   f"max_new_tokens={recipe.eval.max_new_tokens}, do_sample=False, eos_token_id=eos{by_text}{no_cache})\n"
                   f"print(tokenizer.decode(out[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True){cut}.strip())\n")
    elif recipe.task.type == "summarization" and not recipe.model.decoder:
        example = _summarization_example(out, recipe, causal=auto_cls == "AutoModelForCausalLM")
    elif recipe.task.type == "verbalizer":
        example = _verbalizer_example(out, recipe, labels)
    if "model.generate(" in example:  # decoded as the evaluation did: not with the base's own settings on top
        example = _plain_generation("base" if adapter else "model") + example
    if not adapter:  # a full model (a merged one too): its own folder, the same example
        quantized = "quantization_config" in json.loads((out / "config.json").read_text(encoding="utf-8"))  # (frozen on 4-bit)
        return (f"```python\nimport torch\nfrom transformers import {auto_cls}, AutoTokenizer\n\nrepo = {repo!r}\n{head}"
                f"model = {auto_cls}.from_pretrained(repo).eval()\n{_no_cpu_repack(recipe, 'model') if quantized else ''}"
                f"tokenizer = AutoTokenizer.from_pretrained(repo)\n{example}```")
    layers, keep = "", ""
    if recipe.model.num_layers:  # the adapter's layers are these of the base, renumbered: the rest are left out first
        keep = "from peftlab.model import keep_layers\n"
        layers = (f"keep_layers(base, {recipe.model.num_layers})  # model.num_layers={recipe.model.num_layers}: the base's "
                  "layers this adapter was trained on (evenly spaced, first and last kept)\n")
    return ("```python\nimport torch\nfrom peft import PeftModel\n"
            f"from transformers import {auto_cls}, AutoTokenizer{', BitsAndBytesConfig' if setup else ''}\n{keep}\n"
            f"repo = {repo!r}\nbase_model = {base!r}{where}\n{head}{setup}"
            f"base = {auto_cls}.from_pretrained(base_model{args}){quant}\n{_no_cpu_repack(recipe)}{layers}"
            "tokenizer = AutoTokenizer.from_pretrained(repo)\n"
            "base.config.pad_token_id = tokenizer.pad_token_id\n"
            "model = PeftModel.from_pretrained(base, repo).eval()\n"
            f"{example}```")


# snippet line after `eos = [...]` (the task's stop tokens) and _plain_generation's `own`: the base's own end tokens added,
# as the evaluation stops at both (tasks/generative.end_tokens)
BASE_ENDS = ("eos += [i for i in (own.eos_token_id if isinstance(own.eos_token_id, list) else [own.eos_token_id]) "
             "if i is not None and i not in eos]  # and the base's own end tokens, as peftlab's evaluation stops\n")


def _pair_example(out: Path) -> str:
    """A pair of texts encoded as the run encoded its pairs (tasks/classification.encode_pairs): by the tokenizer's pair
    template, or where that puts nothing between the texts, with the separator the run put there, written out."""
    from transformers import AutoTokenizer

    from ..tasks.classification import pair_layout

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    layout = pair_layout(tokenizer)
    if layout is None:
        return ("with torch.no_grad():  # a pair of texts, as trained (data.text_pair)\n"
                "    logits = model(**tokenizer([\"The firm reported a loss.\"], [\"The company lost money.\"], "
                "return_tensors=\"pt\")).logits\n"
                "print(labels[logits.argmax(-1).item()])\n")
    what = "its EOS token" if layout.separator == [tokenizer.eos_token_id] else "a newline"
    ids = " + ".join([*([repr(layout.before)] if layout.before else []), "a", repr(layout.separator), "b",
                      *([repr(layout.after)] if layout.after else [])])
    types, inputs = "", "input_ids=torch.tensor([ids])"
    if layout.segments is not None:
        before, ta, tb, after = layout.segments
        types = f"    types = {before!r} + [{ta}] * (len(a) + {len(layout.separator)}) + [{tb}] * len(b) + {after!r}\n"
        inputs += ", token_type_ids=torch.tensor([types])"
    return ("with torch.no_grad():  # a pair of texts, as trained (data.text_pair)\n"
            "    a = tokenizer(\"The firm reported a loss.\", add_special_tokens=False)[\"input_ids\"]\n"
            "    b = tokenizer(\"The company lost money.\", add_special_tokens=False)[\"input_ids\"]\n"
            f"    ids = {ids}  # this tokenizer puts nothing between a pair's texts: peftlab put {what} there\n"
            f"{types}    logits = model({inputs}).logits\n"
            "print(labels[logits.argmax(-1).item()])\n")


def _plain_generation(owner: str) -> str:
    """Snippet lines that reduce `owner`'s generation_config to the architecture's tokens, as peftlab's evaluation does
    (tasks/generative.evaluation_generation): transformers fills every setting generate() is not given from it, so a
    base's repetition_penalty or sampling (Qwen2.5-Instruct ships both) would change the output."""
    from ..tasks.generative import ARCHITECTURE_GENERATION

    return ("from transformers import GenerationConfig\n"
            f"own = {owner}.generation_config  # its tokens only: not the base's own decoding settings (a repetition_penalty, "
            "sampling), as peftlab's evaluation generates\n"
            f"{owner}.generation_config = GenerationConfig(**{{k: getattr(own, k) for k in {ARCHITECTURE_GENERATION!r} "
            "if getattr(own, k, None) is not None})\n")


def _quantization(recipe, run: RunRecord, auto_cls: str, num_labels: int) -> str:
    """`quantization = BitsAndBytesConfig(...)`: the run's quant.* with its resolved compute dtype and the modules kept in
    full precision (the new head: BitsAndBytesConfig(load_in_4bit=True) alone is fp4, and quantizes the head, which
    then fails in peft's forward)."""
    from ..model import HEAD_GUESS, base_path, compute_dtype, skip_modules

    q = recipe.quant
    try:
        skip = skip_modules(recipe, base_path(recipe), get_task(recipe.task.type).auto_model_class, num_labels)
    except Exception as e:  # the base is not here (published from another machine): the heads and an LM's output layer
        log.debug("the card's skip list without the base (%s)", e)
        skip = HEAD_GUESS + (["lm_head"] if auto_cls == "AutoModelForCausalLM" else [])
    if q.mode == "8bit":
        config = f"BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules={skip!r})"
    else:
        config = (f"BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type={q.quant_type!r}, bnb_4bit_use_double_quant="
                  f"{q.double_quant}, bnb_4bit_compute_dtype={compute_dtype(recipe, run.precision or 'fp32')}, "
                  f"llm_int8_skip_modules={skip!r})")
    return f"quantization = {config}  # the {q.mode} base it was trained on\n"


def _no_cpu_repack(recipe, model: str = "base") -> str:
    if recipe.quant.mode != "4bit":
        return ""
    return (f"for m in {model}.modules():  # on a CPU with avx512_bf16, as peftlab ran it: no repacked bf16 path (other numerics)\n"
            "    if hasattr(m, \"support_avx512bf16_for_cpu\"):\n        m.support_avx512bf16_for_cpu = False\n")


def _summarization_example(out: Path, recipe, causal: bool) -> str:
    """Generate a summary as peftlab's evaluation does (tasks/summarization.py): the source cut to data.max_length
    tokens, put into the prompt (in the chat template: task.chat_template and a tokenizer that has one), decoded with
    the recipe's eval settings; a decoder's continuation only."""
    from transformers import AutoTokenizer

    from ..tasks.summarization import DEFAULT_PROMPT, _adds_bos

    e, n = recipe.eval, recipe.data.max_length
    template = recipe.task.prompt or DEFAULT_PROMPT["causal" if causal else "seq2seq"]
    tokenizer = AutoTokenizer.from_pretrained(str(out)) if causal else None  # the run's own, as summarization.tokenize read it
    if causal and recipe.task.chat_template and getattr(tokenizer, "chat_template", None):
        encode = ("text = tokenizer.apply_chat_template([{\"role\": \"user\", \"content\": prompt}], tokenize=False, "
                  "add_generation_prompt=True)\ninputs = tokenizer(text, add_special_tokens=False, return_tensors=\"pt\")\n")
    elif causal:  # the prompt's own tokens, after BOS where the tokenizer puts one (never a BERT-style [CLS] ... [SEP])
        bos = "[tokenizer.bos_token_id] + " if _adds_bos(tokenizer) else ""
        encode = (f"ids = torch.tensor([{bos}tokenizer(prompt.rstrip(\" \"), add_special_tokens=False)[\"input_ids\"]])  "
                  "# (a trailing space goes with the summary: ' Jane' is one token)\n"
                  "inputs = {\"input_ids\": ids, \"attention_mask\": torch.ones_like(ids)}\n")
    else:
        encode = "inputs = tokenizer(prompt, return_tensors=\"pt\")\n"
    settings = f"max_new_tokens={e.max_new_tokens}, num_beams={e.num_beams}, do_sample=False"
    if e.num_beams > 1:
        settings += f", length_penalty={e.length_penalty}, early_stopping=True"
    blocker = ""
    if e.no_repeat_ngram_size and causal:  # the summary's own n-grams: the prompt's may be copied (SummaryNoRepeatNGram)
        blocker = (f"blocker = NoRepeatNGramLogitsProcessor({e.no_repeat_ngram_size})  # eval.no_repeat_ngram_size, on the "
                   "summary's tokens only (the dialogue's may be copied)\n"
                   "n = inputs[\"input_ids\"].shape[1]\n")
        settings += ", logits_processor=LogitsProcessorList([lambda ids, scores: blocker(ids[:, n:], scores)])"
    elif e.no_repeat_ngram_size:
        settings += f", no_repeat_ngram_size={e.no_repeat_ngram_size}"
    why, no_cache = _no_cache(out, causal)
    settings += no_cache
    imports = "from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor\n" if blocker else ""
    return (imports + "source = \"Amanda: I baked cookies. Do you want some?\\nJerry: Sure!\\nAmanda: I'll bring you some tomorrow :-)\"\n"
            "ids = tokenizer(source, add_special_tokens=False)[\"input_ids\"]\n"
            f"if len(ids) > {n}:  # data.max_length: the source is cut as it was in training\n"
            f"    source = tokenizer.decode(ids[:{n}])\n"
            f"prompt = {template!r}.replace(\"{{source}}\", source)  # task.prompt\n{encode}"
            f"{blocker}eos = [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id]\n{BASE_ENDS}"
            f"{why}with torch.no_grad():  # the recipe's eval settings\n"
            "    out = model.generate(input_ids=inputs[\"input_ids\"], attention_mask=inputs[\"attention_mask\"], "
            f"{settings}, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)\n"
            + ("print(tokenizer.decode(out[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True).strip())\n" if causal else
               "print(tokenizer.decode(out[0], skip_special_tokens=True).strip())\n"))


def _verbalizer_example(out: Path, recipe, labels: list[str]) -> str:
    """Classify as peftlab's evaluation does (tasks/verbalizer.py): the text cut to data.max_length tokens where the
    first token left out starts, put into task.prompt (rendered through the chat template with task.chat_template, else
    after the BOS where the tokenizer puts one), each label word scored by its log-likelihood summed over the tokens the
    tokenizer writes for it after the prompt (+ EOS with task.label_eos), the likeliest class printed."""
    from transformers import AutoTokenizer

    from ..tasks.verbalizer import DEFAULT_PROMPT, _bos, label_words, uses_chat

    tokenizer = AutoTokenizer.from_pretrained(str(out))  # the run's own, as tokenize read it
    n, chat = recipe.data.max_length, uses_chat(tokenizer, recipe)
    render = ("prompt = tokenizer.apply_chat_template([{\"role\": \"user\", \"content\": prompt}], tokenize=False, "
              "add_generation_prompt=True)  # task.chat_template\n") if chat else ""
    bos = "[tokenizer.bos_token_id] + " if _bos(tokenizer, recipe) else ""
    eos = (" + [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id]  # task.label_eos"
           if recipe.task.label_eos else "")
    return (f"labels = {labels!r}\nwords = {label_words(recipe, labels, chat)!r}  # each class's label word, as written after the prompt\n"
            "text = \"a gripping, beautifully shot film\"\n"
            "offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)[\"offset_mapping\"]\n"
            f"if len(offsets) > {n}:  # data.max_length: the text is cut as it was in training\n"
            f"    text = text[:offsets[{n}][0]].rstrip()\n"
            f"prompt = {(recipe.task.prompt or DEFAULT_PROMPT)!r}.replace(\"{{text}}\", text)  # task.prompt\n{render}"
            "start = tokenizer(prompt, add_special_tokens=False)[\"input_ids\"]\n"
            "scores = []\n"
            "for word in words:  # its tokens as the tokenizer writes them after the prompt; their log-likelihoods summed\n"
            f"    target = tokenizer(prompt + word, add_special_tokens=False)[\"input_ids\"][len(start):]{eos}\n"
            "    with torch.no_grad():\n"
            f"        logits = model(input_ids=torch.tensor([{bos}start + target])).logits[0, -len(target) - 1:-1]\n"
            "    scores.append(logits.float().log_softmax(-1)[torch.arange(len(target)), target].sum().item())\n"
            "print(labels[scores.index(max(scores))])\n")


def _no_cache(out: Path, causal: bool) -> tuple[str, str]:
    """(a comment line, a generate() argument) that turn the KV cache off for a prompt or p-tuning adapter on a decoder:
    with this transformers, peft's generate writes other tokens than the model computes from the third new one on (see
    tasks/generative.generation_inputs, which the evaluation uses instead); use_cache=False writes the evaluation's text.
    ("", "") otherwise: an encoder-decoder's virtual tokens are the encoder's, which the decoder's cache leaves alone,
    and a prefix (its keys and values) is what the evaluation's own peft generate carried."""
    if not causal or not (out / "adapter_config.json").is_file():
        return "", ""
    from peft import PeftConfig

    from ..tasks.generative import virtual_token_embeddings

    if not virtual_token_embeddings(PeftConfig.from_pretrained(str(out))):
        return "", ""
    return ("# use_cache=False: with its KV cache, peft's generate under virtual tokens writes other tokens than the model "
            "computes (from the third new one on, with this transformers); without it, the text peftlab's evaluation wrote\n",
            ", use_cache=False")


def exported_params(out: Path) -> int | None:
    """The number of values in OUT/adapter_model.safetensors (read from its header); None without one."""
    path = out / "adapter_model.safetensors"
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def _selection_note(run: RunRecord, metrics: dict, best_metric: str) -> list[str]:
    """Say which figure chose the exported weights (keep_best), so it is not read as a held-out result."""
    selected = run.selected_on
    if not selected or selected not in metrics:
        return []
    held_out = [s for s in metrics if s != selected and not (s == "test" and run.test_shares)]
    n = len(run.history or [])
    if run.stopped_at_last:  # early stopping, keep_best off: the last step's weights
        note = (f"Training stopped early at step {run.steps}, when `train.best_metric: {best_metric}` had not improved on the "
                f"{selected} split for `train.early_stopping` evaluations; the exported weights are that last step's, whose "
                "stopping point this split chose, so its figure is not held out. ")
    else:
        note = (f"The exported weights are those of the best of {n} evaluations on the {selected} split (`train.keep_best`, "
                f"`train.best_metric: {best_metric}`), so its figure was used for selection and is optimistic. ")
    note += (f"The held-out figure is {', '.join(held_out)}: it played no part in choosing the weights." if held_out else
             "No held-out split was scored: add `data.test` (or select on `data.eval_holdout` of train) for an unbiased figure.")
    return ["", note]


def card_text(source: str | Path | PublicRun, repo_id: str | None = None, base_model: str | None = None,
              license: str | None = None) -> str:
    """README.md of the published folder: metadata + recipe, method, costs, how to load it, limitations.
    `source`: a run folder, or the run already read (`read_public`)."""
    pub = _public(source, base_model)
    out, recipe, run = pub.out, pub.public_recipe, pub.public_run
    data = card_data(pub, repo_id, license=license)
    base = data.base_model or recipe.model.name
    local_base = local_base_named(run)
    repo = repo_id or "PATH/TO/THIS/FOLDER"
    metrics = measured_metrics(out, run)
    report = json.loads((out / "eval_report.json").read_text()) if (out / "eval_report.json").is_file() else {}
    a, t = recipe.adapter, recipe.train
    adapter = (out / "adapter_config.json").is_file()  # (a full model has none: it loads without its base)
    base_link = f"[{base}](https://huggingface.co/{base})" if data.base_model else f"`{base}`" + (
        " (a local model folder on the training machine, named here by its folder name: "
        + ("give your copy of it with `model.name=FOLDER`, or publish with `--base-model HUB_ID`)" if adapter else
           "this model loads without it; publish with `--base-model HUB_ID` to link it)") if local_base else "")
    method = get_method(run.method or a.method)
    cfg = json.loads((out / "adapter_config.json").read_text()) if adapter else {}
    merged = json.loads((out / "merge.json").read_text()) if (out / "merge.json").is_file() else None  # a `peftlab merge` folder
    what = (f"A LoRA adapter (rank {cfg.get('r', '?')}, lora_alpha {cfg.get('lora_alpha', '?')}: the composed one)" if run.composition
            else method.describe_exported(recipe, run.adapter_ranks) if run.adapter_ranks and method.describe_exported
            else method.describe(recipe))  # a composition's own rank, not its first source's; AdaLoRA's as exported
    if merged:
        what = (f"A standalone model: {what[0].lower()}{what[1:]} merged into the "
                + ("dequantized float32 copy of its quantized base," if recipe.quant.mode != "none" else "float32 weights of its base,"))
    if recipe.model.num_layers:  # a student cut from its base: not the whole of it
        base_link += (f" (keeping {recipe.model.num_layers} of its transformer layers, evenly spaced, the first and last "
                      "kept: `model.num_layers`)")
    lines = [f"# {data.model_name}", "",
             f"{what} for **{data.pipeline_tag}** on top of {base_link}, "
             + ("composed by peftlab from adapters trained with it (the recipe below is the first one's)." if run.composition
                else "trained with peftlab from the recipe below.")
             + (f" Labels: {', '.join(run.label_names)}." if run.label_names else ""), ""]
    if run.composition:
        c = run.composition
        lines += [f"Composed with peft's `add_weighted_adapter` ({c['method']}, weights {c['weights']}) from "
                  f"{', '.join(s['name'] for s in c['sources'])}; the recipe and record below are those of the first.", ""]
    if run.lineage:
        lines += ["## Lineage", "", "Trained on the weights of earlier peftlab runs (`model.from_run`), nearest first, not on the "
                  "bare base: load this adapter on the first run's merged model (`peftlab merge` writes it), or merge this run "
                  "(`peftlab merge`) for a standalone model.", ""]
        for k, step in enumerate(run.lineage, 1):
            scores = source_scores(step)
            lines.append(f"{k}. `{step.get('name')}`: task {step.get('task')}, {step.get('method')} on `{step.get('base_model')}`, "
                         f"data `{step.get('data')}`, {step.get('steps')} steps" + (f"; {scores}" if scores else "")
                         + multitask_clause(step.get("multitask")))
        lines.append("")
    if run.distillation:
        k = run.distillation
        scores = source_scores(k)
        unlabelled = f" ({k['unlabelled_rows']:,} of them unlabelled, from `{k['unlabelled']}`)" if k.get("unlabelled_rows") else ""
        lines += ["## Distillation", "", f"Distilled from the peftlab run `{k.get('name')}` (task {k.get('task')}, {k.get('method')} on "
                  f"`{k.get('base_model')}`" + (f"; its {scores}" if scores else "") + multitask_clause(k.get("multitask"))
                  + f"): loss = {k.get('alpha')} x "
                  f"cross-entropy on the labels + {1 - k.get('alpha', 0):g} x T^2 x KL(teacher || student) at temperature "
                  f"T = {k.get('temperature')}, the teacher's soft targets on {k.get('soft_target_rows', 0):,} training rows"
                  f"{unlabelled}." + (f" The teacher's argmax agreed with the labels of {k['teacher_agreement']:.1%} of the "
                                      "labelled training rows." if k.get("teacher_agreement") is not None else ""), ""]
    if run.multitask:
        k = run.multitask
        others = [t for t in k.get("tasks", []) if t != k.get("task")]
        lines += ["## Multi-task training", "", f"Task `{k.get('task')}` of the multi-task peftlab run `{k.get('run')}`, trained "
                  f"together with {', '.join(f'`{t}`' for t in others)}: one base, "
                  + ("one LoRA adapter shared by every task" if k.get("adapters") == "shared" else "an adapter per task")
                  + f", a head per task; batches drawn by task ({k.get('sampling')}"
                  + (f", T = {k.get('temperature')}" if k.get("sampling") == "temperature" else "") + "). This adapter holds "
                  "this task's head" + (" and the shared adapter." if k.get("adapters") == "shared" else " and its own adapter.")
                  + " The optimizer steps, examples and wall time below are the whole multi-task run's, shared by its tasks.", ""]
    lines += ["## Results", ""]
    if metrics:
        task = get_task(recipe.task.type)
        names = {**task.card_metrics, **{k: v for m in metrics.values() for k, v in user_metrics(recipe, task, m).items()}}
        keys = [k for k in names if any(k in m for m in metrics.values())] + ["loss"]
        lines += ["| split | dataset | " + " | ".join(names.get(k, k) for k in keys) + " |",
                  "| --- | --- |" + " --- |" * len(keys)]
        for split, m in metrics.items():
            _, ds_name, ds_split = dataset_of(recipe, split)
            cells = [f"{m[k]:.4f}" if isinstance(m.get(k), (int, float)) else "-" for k in keys]
            lines.append(f"| {run.split_label(split)} | {ds_name} ({ds_split}) | " + " | ".join(cells) + " |")
        chosen_by = (run.multitask or {}).get("best_metric")  # a task of a multi-task run: chosen on the run's metric
        lines += _selection_note(run, metrics, f"{chosen_by}` of the multi-task run `{run.multitask.get('run')}" if chosen_by
                                 else recipe.train.best_metric)
        if run.composition:
            lines += ["", "Measured by `peftlab eval` on the composed adapter; no split chose its weights by any evaluation "
                          "of peftlab's (the composition weights were given)."]
        elif merged:
            lines += ["", "Measured by peftlab at the end of training, on the adapter before the merge (`peftlab eval` on this "
                          "folder measures the merged model itself" + ("; on a quantized base the two differ slightly)."
                                                                       if recipe.quant.mode != "none" else ").")]
        elif report.get("n"):
            of = f" of the {report['split']} split" if report.get("split") in metrics else ""
            what = ("per-class scores and the confusion matrix" if "confusion" in report else
                    "generation speed" if "generation" in report else "the evaluation's details")
            others = [s for s in report.get("splits", {}) if s != report.get("split")]
            lines += ["", f"Measured by peftlab at the end of training; {what} on the {report['n']:,} rows{of} are in "
                          "`eval_report.json`" + (f" (each split's under `splits`: {', '.join(others)} too)." if others else ".")]
    else:
        lines.append("Not evaluated yet: run `peftlab eval` on this folder.")
    rerun = ("The first source's resolved recipe (`recipe.yaml`): `peftlab train recipe.yaml` retrains that source; `peftlab "
             "compose` of the sources with the weights above rebuilds this adapter." if run.composition else
             f"This task's recipe as the multi-task run `{run.multitask.get('run')}` derived it (`recipe.yaml`): it describes "
             "the task; `peftlab train recipe.yaml` would train it alone, not with the other tasks as here. The multi-task "
             "run's own `recipe.yaml` retrains this adapter." if run.multitask else
             "The resolved recipe (`recipe.yaml`); rerun it with `peftlab train recipe.yaml`.")
    lines += ["", "## Training recipe", "", rerun, "",
              "```yaml", recipe.to_yaml().rstrip(), "```", "", "## Method and parameters", ""]
    if run.composition:  # its own adapter_config.json: the combined rank, alpha = r (scale 1), no rsLoRA
        lines.append(f"- the composed adapter: rank {cfg.get('r', '?')}, lora_alpha {cfg.get('lora_alpha', '?')} "
                     "(`adapter_config.json`); the lines below, and the training time, are the first source's")
    lines += method.card_lines(recipe)
    if not run.composition and cfg.get("peft_type") == "LORA" and (cfg.get("r"), cfg.get("lora_alpha")) != (recipe.adapter.r, recipe.adapter.alpha):
        alpha = cfg.get("lora_alpha")
        lines.append(f"- exported as rank {cfg.get('r')}, lora_alpha {f'{alpha:g}' if isinstance(alpha, (int, float)) else alpha} "
                     "(`adapter_config.json`): "
                     + ("PiSSA/OLoRA's trained adapter, converted to plain LoRA of rank 2r on the original base"
                        if recipe.adapter.init in ("pissa", "olora") else "as peft saved it"))
    if recipe.quant.mode != "none":
        q = recipe.quant
        lines.append(f"- base quantized with bitsandbytes: {q.mode}" + (f" ({q.quant_type}, double quant {q.double_quant})"
                                                                       if q.mode == "4bit" else " (LLM.int8)")
                     + (" while training; merged into its dequantized float32 copy (`merge.json`)" if merged else ""))
    elif merged:
        lines.append("- merged into the base's float32 weights (`peftlab merge`, `merge.json`): no adapter to load")
    if run.trainable_params:
        lines.append(f"- trainable parameters: {run.trainable_params:,} of {run.total_params:,} "
                     f"({run.trainable_percent or 0:.3f}%)" + (f": AdaLoRA's initial allocation, rank {recipe.adapter.adalora_init_r} "
                                                               "in every layer" if recipe.adapter.method == "adalora" else ""))
        held = exported_params(out)
        if held is not None and held != run.trainable_params and not run.composition:
            lines.append(f"- parameters in the exported adapter (`adapter_model.safetensors`): {held:,}"
                         + (" (AdaLoRA pruned the ranks to its budget)" if recipe.adapter.method == "adalora" else ""))
    steps = "?" if run.steps is None else run.steps  # an older run.json may lack it
    exported = run.best_step if run.selected_on else steps  # keep_best off: the last step
    if run.composition:  # no training of its own: the first source's
        first = run.composition["sources"][0]
        steps, exported = first.get("steps", "?"), first.get("exported_step", "?")
    lines += [("- composed, not trained; the first source: " if run.composition else "- ") + f"{steps} optimizer steps (exported: step {exported}), "
              f"batch {t.batch_size} x accumulation {t.grad_accum} x {run.processes} process(es), lr {t.lr:g}, "
              f"{t.scheduler} schedule, seed {t.seed}", "", "## Hardware and wall time", ""]
    hw = run.hardware or {}
    device = hw.get("gpu") or f"CPU ({hw.get('cpu_count', '?')} cores, {hw.get('torch_threads', '?')} torch threads)"
    if run.train_wall_s is not None:
        lines.append(f"- trained in {run.train_wall_s:.1f} s on {device}, {run.examples_per_s or 0:.1f} examples/s, "
                     f"precision {run.precision or '?'}")
    lines.append(f"- Python {hw.get('python', '?')}, " + ", ".join(f"{k} {v}" for k, v in (run.versions or {}).items() if v))
    libraries = "transformers"
    if adapter:
        libraries = "peft and transformers" + (" (and peftlab, for the base's layers it keeps)" if recipe.model.num_layers else "")
    lines += ["", "## How to use", "", f"With {libraries}:", "", _usage(out, recipe, run, repo, base, local_base, gguf_file_of(pub.recipe)), ""]
    if local_base and adapter:  # the recipe's data files stayed on the training machine: load_recipe checks them unless told not to
        lines += [f"With peftlab (downloads the folder; `recipe.yaml` names the base by its folder name, `{recipe.model.name}`: "
                  f"point it at your copy, from the command line with `peftlab eval --adapter {repo} model.name=FOLDER`):", "",
                  "```python", "from peftlab import load_recipe, load_trained\nfrom peftlab.publish import load_adapter\n",
                  f"folder = load_adapter({repo!r})\nbase_model = {recipe.model.name!r}  # a local folder when it was trained: "
                  "point this at your copy of it\n# the recipe's data files are not in this folder: validate_files=False skips checking them\n"
                  "recipe = load_recipe(folder / 'recipe.yaml', {'model.name': base_model}, validate_files=False)\n"
                  "model, tokenizer, recipe, run = load_trained(folder, recipe=recipe)", "```", ""]
    else:
        lines += ["With peftlab (downloads the folder, " + ("rebuilds the base from `recipe.yaml`):" if adapter else
                                                          "a standalone model: its own weights, no base to rebuild):"), "", "```python",
                  "from peftlab import load_trained\nfrom peftlab.publish import load_adapter\n",
                  f"model, tokenizer, recipe, run = load_trained(load_adapter({repo!r}))", "```", ""]
    lines += ["## Limitations", "",
              "- Evaluated only on the split(s) listed above; quality on other data, domains or languages is unknown.",
              f"- Inherits the limitations and biases of the base model ({base}) and of the training data "
              f"({dataset_of(recipe, 'train')[1]}); it was not audited for fairness or harmful outputs.",
              "- An adapter only works on the exact base it was trained on (same weights and tokenizer)." if adapter else
              "- A full model: fine-tuning it further needs the memory of all its weights, not an adapter's."]
    if recipe.quant.mode != "none" and merged:
        lines.append("- Trained as an adapter on a quantized base and merged into a float32 copy of it: outputs differ slightly "
                     "from the adapter's on the quantized base.")
    elif recipe.quant.mode != "none" and adapter:
        lines.append("- Trained on a quantized base: outputs on a float base differ slightly; `peftlab merge` merges into a "
                     "dequantized copy.")
    elif recipe.quant.mode != "none":
        lines.append(f"- Saved {recipe.quant.mode} quantized, as it was trained (method {recipe.adapter.method}: the base's "
                     "weights stayed quantized); loading it needs bitsandbytes, and `peftlab merge` has nothing to merge.")
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


