"""Base model -> tokenizer, quantization (bitsandbytes), adapter (peft).

Where the base comes from (`model.name` -> path, tokenizer) is bases.py; a task may build its own base (the
summarization task's encoder-decoder warm start: its `load_model`). Weights load from safetensors only.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import inspect
import logging
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from .accel import precision_dtype
from .bases import base_path, damaged_folder, damaged_json, load_tokenizer, resolve_model_path, verify_from_run_weights
from .config import Recipe, recipe_argument
from .errors import ConfigError, ModelError, PeftlabError
from .methods import get_method
from .methods.peft_adapter import rank_problem
from .methods.prompt import PROMPT_ON_DECODER_CLASSIFIER, PROMPT_ON_SEQ2SEQ_CLASSIFIER
from .tasks import get_task, input_lengths, peft_task_type
from .tasks.encoder_decoder import warm_start_problems

log = logging.getLogger(__name__)


@dataclass
class ModelInfo:
    """What was built, for logs, summaries and the exported run.json."""

    path: str
    method: str
    trainable_params: int
    total_params: int
    head_modules: list[str]
    quantized: str
    base_weights_mib: float  # memory of the base model's weights as loaded (4-bit/8-bit when quantized)

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(self.total_params, 1)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # model.dtype, quant.compute_dtype


def compute_dtype(recipe: Recipe, precision: str) -> torch.dtype:
    if recipe.quant.compute_dtype != "auto":
        return DTYPES[recipe.quant.compute_dtype]
    return precision_dtype(precision)


def base_dtype(recipe: Recipe, precision: str) -> torch.dtype:
    """model.dtype; auto: the training precision's dtype where the base stays frozen, else float32 (model.dtype's help)."""
    if recipe.model.dtype != "auto":
        return DTYPES[recipe.model.dtype]
    return torch.float32 if get_method(recipe.adapter.method).trains_base else precision_dtype(precision)


def keep_trained_weights_fp32(model: nn.Module) -> None:
    """Trainable parameters of a base loaded in 16 bits (a head copied by peft's modules_to_save) -> float32, so the
    optimizer updates full-precision weights (peft keeps its adapter weights in float32 itself)."""
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()


def keep_dtypes(model: nn.Module, loaded: dict[str, torch.dtype]) -> None:
    """Put each parameter back in the dtype it was loaded in (`loaded`: name -> dtype).

    peft's `prepare_model_for_kbit_training` casts every 16-bit weight it finds outside the quantized layers (the
    embeddings, a tied LM head, the norms) to float32. A base loaded in bf16 (`model.dtype: auto` under bf16) then runs
    its whole residual stream in float32: twice the activation memory of the same LoRA run, element-wise work at
    float32 width, and a cast to bf16 before every matmul (SmolLM2-135M QLoRA SFT, 8 x 384 tokens: benchmarks/README.md).
    model.dtype is what those weights are loaded in, so they stay in it, as in an unquantized run; a float32 load
    (the default) is unchanged. What trains is made float32 later (`keep_trained_weights_fp32`)."""
    for name, p in model.named_parameters():
        if name in loaded and p.dtype != loaded[name]:
            p.data = p.data.to(loaded[name])


def quantization_config(recipe: Recipe, precision: str, skip_modules: list[str]):
    from transformers import BitsAndBytesConfig

    q = recipe.quant
    if q.mode == "none":
        return None
    if q.mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(recipe, precision),
        llm_int8_skip_modules=skip_modules,  # new heads are not in the checkpoint: keep them full precision
        # FSDP flattens only float tensors of one dtype: under it, pack the 4-bit weights in the other weights' dtype
        bnb_4bit_quant_storage=base_dtype(recipe, precision) if under_fsdp() else torch.uint8,
    )


# Names of heads transformers creates for sequence classification across architectures; kept out of quantization.
HEAD_GUESS = ["classifier", "score", "qa_outputs", "pre_classifier"]  # (DistilBERT's head is pre_classifier + classifier)


def skip_modules(recipe: Recipe, path: str, auto_cls, num_labels: int) -> list[str]:
    """The modules a quantized base keeps in full precision: new heads, and transformers' own (a skip list REPLACES
    its default, the tied/output embeddings: both are named)."""
    return HEAD_GUESS + default_skip_modules(recipe, path, auto_cls, num_labels)


def default_skip_modules(recipe: Recipe, path: str, auto_cls, num_labels: int) -> list[str]:
    """The modules transformers keeps out of quantization by default (the LM head and the embeddings tied to it, the
    last module), asked of the model class itself, built on the meta device (no weights read, no memory)."""
    from transformers import AutoConfig

    try:
        from transformers.quantizers.base import get_keys_to_not_convert
    except ImportError:  # an older transformers: its list, as it documented it
        get_keys_to_not_convert = None
    config = AutoConfig.from_pretrained(path, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code,
                                        **({"num_labels": num_labels} if num_labels else {}))
    if get_keys_to_not_convert is not None:
        try:
            with torch.device("meta"):
                skeleton = auto_cls.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
            # the layers the checkpoint lacks are new: a task's head (an MLM head a sentence-embedding checkpoint dropped),
            # or, with model.from_run, weights its merged checkpoint lacks (an MLM run's pooler, filled from the original
            # base by fill_from_original_base). Quantized, they would be random weights bitsandbytes cannot train or load
            absent = modules_absent_from(skeleton, path, recipe.model.revision)
            return sorted(set(get_keys_to_not_convert(skeleton)) | set(absent))
        except Exception as e:  # an architecture that cannot be built on meta: fall back on the config
            log.debug("default skip modules from the meta model failed (%s); using the config", e)
    tied = getattr(config, "tie_word_embeddings", False) or getattr(config.get_text_config(), "tie_word_embeddings", False)
    return ["lm_head"] + (["model.embed_tokens"] if tied else [])


def modules_absent_from(skeleton: nn.Module, path: str, revision: str | None = None) -> list[str]:
    """The layers quantization would convert (Linear, Conv1D) whose weight the base's safetensors checkpoint (the local
    folder `path`, or a hub id's files) does not hold: new layers a task adds. Names are matched as transformers
    loads them, with or without the base model's prefix (a BertModel checkpoint read as BertForMaskedLM). Where most of
    the model's layers look absent, its names do not compare (transformers renames them on load): none is kept out."""
    held = {k.removesuffix(".weight") for k in checkpoint_keys(path, revision) if k.endswith(".weight")}
    prefix = getattr(skeleton, "base_model_prefix", "") or ""
    if prefix:
        held |= {f"{prefix}.{k}" for k in held} | {k[len(prefix) + 1:] for k in held if k.startswith(prefix + ".")}
    layers = [name for name, m in skeleton.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    absent = [name for name in layers if name not in held]
    if not held or len(absent) > 0.5 * len(layers):
        return []
    return sorted(absent)


def checkpoint_keys(path: str, revision: str | None) -> set[str]:
    """The weight names of the base's safetensors checkpoint: a local folder's files, or a hub id's (its index, else its
    one model.safetensors: the files from_pretrained reads next, into the same cache) -> an empty set when they cannot be
    had (offline and not cached, a pickle-only repository)."""
    import json

    from safetensors import safe_open

    def keys(file) -> set[str]:
        with safe_open(str(file), "pt") as st:
            return set(st.keys())

    if Path(path).is_dir():
        return set().union(*(keys(f) for f in Path(path).glob("*.safetensors")))
    from huggingface_hub import hf_hub_download

    try:
        try:
            return set(json.loads(Path(hf_hub_download(path, "model.safetensors.index.json", revision=revision)).read_text())["weight_map"])
        except Exception:
            return keys(hf_hub_download(path, "model.safetensors", revision=revision))
    except Exception as e:  # (then nothing is kept out beyond transformers' own list)
        log.debug("the checkpoint of %s cannot be listed (%s)", path, e)
        return set()


def under_fsdp() -> bool:
    """Set by `accelerate launch` with an FSDP config (the model is built before the Accelerator wraps it)."""
    import os

    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


def disable_cpu_bf16_repack(model: nn.Module) -> int:
    """bitsandbytes repacks a Linear4bit weight on its first no-grad CPU forward on avx512_bf16 CPUs, after which
    training silently stops and merges are garbage (GUIDE.md). Turn that path off on every 4-bit layer."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


class _BiasAsLoaded:
    """Forward hooks of one quantized layer: its bias as it was before the call is put back after it."""

    def __init__(self):
        self.data = None

    def before(self, module, args) -> None:
        self.data = module.bias.data

    def after(self, module, args, output) -> None:
        if self.data is not None:
            module.bias.data, self.data = self.data, None


def keep_quantized_biases(model: nn.Module) -> int:
    """bitsandbytes' 4-bit and 8-bit forward casts the layer's frozen bias to the input's dtype in place (8-bit under
    bf16: every bias bfloat16 after the first step). That rounded the frozen base for the rest of the run, unlike the
    base built again by --resume, eval or merge, and --resume's check of the frozen base refused every bf16 8-bit run.
    Each call's cast is undone after it: the product is bitsandbytes' own, the bias stays as loaded."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    n = 0
    for m in model.modules():
        if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) and m.bias is not None:
            keep = _BiasAsLoaded()
            m.register_forward_pre_hook(keep.before)
            m.register_forward_hook(keep.after, always_call=True)
            n += 1
    return n


POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
# models whose learned position table starts after the padding index (RoBERTa family): pad_token_id + 1 rows unusable
OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text", "roberta-prelayernorm", "xmod")


def position_limit(config) -> int | None:
    """The longest input the model's position embeddings allow, from its config; None when it has no fixed limit."""
    limit = next((getattr(config, k) for k in POSITION_KEYS if isinstance(getattr(config, k, None), int)), None)
    if limit is not None and getattr(config, "model_type", None) in OFFSET_POSITIONS:
        limit -= (getattr(config, "pad_token_id", None) or 0) + 1
    return limit


def length_problems(config, recipe: Recipe, section: str = "data") -> list[str]:
    """The lengths the task's inputs take (data.max_length; for summarization also the summary's, see its
    input_lengths) that do not fit the position tables, each with the bound its first key must keep (the rest of the
    sum subtracted), all at once. `section`: where the recipe keeps the data keys named (a task of a multi-task recipe:
    multitask.tasks.NAME.data)."""
    virtual = get_method(recipe.adapter.method).extra_positions(recipe.adapter)
    seq2seq = getattr(config, "is_encoder_decoder", False) or getattr(config, "decoder", None) is not None
    problems = []
    for i, (cfg, length, what) in enumerate(input_lengths(get_task(recipe.task.type), config, recipe)):
        # the virtual tokens go before the input: the encoder's for an encoder-decoder; a decoder-only model's every
        # sequence, the one generated too (a decoder's summarization: the prompt + eval.max_new_tokens failed in the
        # position table's lookup after training, where the prompt + the summary were checked with them)
        if virtual and (i == 0 or not seq2seq):
            length, what = length + virtual, f"{what}, + adapter.num_virtual_tokens={virtual},"
        limit = position_limit(cfg)
        if limit is None or length <= limit:
            continue
        keys = list(dict.fromkeys(re.findall(r"\b(?:data|eval|adapter)\.\w+", what))) or ["data.max_length"]
        bound = functools.reduce(getattr, keys[0].split("."), recipe) - (length - limit)  # the key's, the rest as they are
        first, *others = [re.sub(r"^data\.", f"{section}.", k) for k in keys]
        if bound >= 1:
            fix = f"Set {first} so that it is <= {bound}" + (f" (or lower {', '.join(others)})" if others else "")
        else:
            fix = f"Even {first}=1 does not fit: lower {', '.join(others) or 'the prompt template (task.prompt)'}"
        what = re.sub(r"\bdata\.", f"{section}.", what)
        problems.append(f"{what} exceeds the {limit} positions of {recipe.model.name} "
                        f"({type(cfg).__name__}): longer inputs cannot be encoded. {fix}.")
    return problems


def check_input_lengths(config, recipe: Recipe, section: str = "data") -> None:
    """length_problems, refused together (or the first long batch fails deep in the forward pass)."""
    if problems := length_problems(config, recipe, section):
        raise ModelError("\n".join(problems))


def check_run_input_lengths(recipe: Recipe, out: Path) -> None:
    """check_input_lengths for an evaluation of run folder `out` with its recipe as overridden (eval.max_new_tokens,
    data.max_length), from configs alone: the folder's own config.json (a full or merged model), else its base's (a
    warm start's two halves). Without it a BERT2BERT's eval.max_new_tokens=200 failed deep in generation. A base not
    readable here is not checked (loading it says why)."""
    from transformers import AutoConfig, EncoderDecoderConfig

    m = recipe.model
    try:
        if (out / "config.json").is_file() and not (out / "adapter_config.json").is_file():
            config = AutoConfig.from_pretrained(str(out), trust_remote_code=m.trust_remote_code)
        elif m.decoder is not None:
            config = EncoderDecoderConfig.from_encoder_decoder_configs(
                AutoConfig.from_pretrained(base_path(recipe), revision=m.revision, trust_remote_code=m.trust_remote_code),
                AutoConfig.from_pretrained(resolve_model_path(m.decoder), trust_remote_code=m.trust_remote_code))
        else:
            config = AutoConfig.from_pretrained(base_path(recipe), revision=m.revision, trust_remote_code=m.trust_remote_code)
    except Exception as e:  # (the base not here: rebuilding the model says so)
        log.info("input lengths of the evaluation not checked before loading (%s: %s)", type(e).__name__, e)
        return
    check_input_lengths(config, recipe)


def encoder_only(config) -> bool:
    """An encoder whose causal-LM class is its masked-LM model's layers with `is_decoder` switched on (BERT, RoBERTa,
    ELECTRA, ...: their masked-LM and causal-LM classes differ): built from a config with is_decoder=False, that
    "causal" LM attends both ways, so each position sees the tokens it is trained to predict."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    kind = getattr(config, "model_type", None)
    causal, masked = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(kind), MODEL_FOR_MASKED_LM_MAPPING_NAMES.get(kind)
    return (causal is not None and masked is not None and causal != masked and not getattr(config, "is_encoder_decoder", False)
            and not getattr(config, "is_decoder", False))


def causal_lm_problem(recipe: Recipe, config) -> str | None:
    """A task that builds a causal LM (sft, clm, the verbalizer, a decoder-only summarizer) from an encoder-only base:
    it would train and score a model that sees its targets. -> the problem, or None."""
    from transformers import AutoModelForCausalLM

    auto = get_task(recipe.task.type).auto_model_class
    if getattr(auto, "auto_for", lambda c: auto)(config) is not AutoModelForCausalLM or not encoder_only(config):
        return None
    fix = ("set model.decoder (a BERT2BERT warm start, e.g. model.decoder=minilm) or use a decoder-only/seq2seq base"
           if getattr(get_task(recipe.task.type), "warm_start", False) else "use a decoder-only base (or task.type=mlm to pretrain an encoder)")
    return (f"model.name={recipe.model.name!r} is an encoder-only model ({config.model_type}): task.type={recipe.task.type} needs a "
            f"causal LM, and its {config.model_type} causal-LM head attends both ways, so it would see the tokens it predicts. "
            f"For {recipe.task.type}, {fix}.")


def decoder_only(config) -> bool:
    """A decoder-only LM (Llama, GPT-2, ...): its sequence classifier pools the last token that is not padding."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return (getattr(config, "model_type", None) in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not encoder_only(config)
            and not getattr(config, "is_encoder_decoder", False))


def architecture_problems(recipe: Recipe, config) -> list[str]:
    """What the recipe cannot do with a base of this architecture (`validate` from its config, `train` at build)."""
    problems = [p for p in [causal_lm_problem(recipe, config)] if p]
    if (task_problem := getattr(get_task(recipe.task.type), "architecture_problem", None)) and (p := task_problem(recipe, config)):
        problems.append(p)  # (sft: data.packing on a base whose mask ignores the position ids)
    if recipe.task.type == "classification" and recipe.adapter.method in ("prompt_tuning", "p_tuning"):
        if decoder_only(config):
            problems.append(PROMPT_ON_DECODER_CLASSIFIER.format(method=recipe.adapter.method, kind=config.model_type))
        elif getattr(config, "is_encoder_decoder", False):
            problems.append(PROMPT_ON_SEQ2SEQ_CLASSIFIER.format(method=recipe.adapter.method, kind=config.model_type))
    return problems


EFFICIENT_SHARE = 0.5  # above this share of trainable parameters a peft method has lost its point


def warn_if_not_efficient(recipe: Recipe, trainable: int, total: int) -> None:
    """A peft adapter that trains most of the model costs more than full fine-tuning (optimizer state included)."""
    a, hint = recipe.adapter, get_method(recipe.adapter.method).size_hint
    share = trainable / max(total, 1)
    if hint is not None and share > EFFICIENT_SHARE:
        log.warning("adapter.method=%s trains %.1f%% of the parameters (%s of %s): it is no longer parameter-efficient and "
                    "needs more memory than full fine-tuning. %s, or adapter.method=full if training every weight is the intent.",
                    a.method, 100 * share, f"{trainable:,}", f"{total:,}", hint(recipe))


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), counting 4-bit packed weights at their logical size."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 if type(p).__name__ == "Params4bit" else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def load_scratch(recipe: Recipe, path: str, auto_cls, kwargs: dict):
    """The `scratch` baseline: the base's architecture (its config), randomly initialised (seeded); no pretrained weight
    is read. -> (model, every top-level module: all of them are new)."""
    from transformers import AutoConfig

    config_keys = ("num_labels", "id2label", "label2id")
    config = AutoConfig.from_pretrained(path, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code,
                                        **{k: kwargs[k] for k in config_keys if k in kwargs})
    model = auto_cls.from_config(config, dtype=kwargs["dtype"], trust_remote_code=recipe.model.trust_remote_code)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = getattr(model.config, "eos_token_id", None) or 0
    return model, [name for name, _ in model.named_children()]


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth")  # weight files torch.load reads (model.allow_pickle)


def holds(folder: Path, globs) -> bool:
    """`folder` has a file matching one of `globs`."""
    return any(next(folder.glob(g), None) for g in globs)


def pickle_only(path) -> str:
    return (f"{path}: no safetensors weights, only pickle files (.bin/.pt), which can run arbitrary code when loaded. "
            "Convert the checkpoint to safetensors (save_pretrained(dir) in a trusted environment), or, if you trust its "
            "source, set model.allow_pickle=true.")


# what reading a weight file that is cut short or garbled raises (besides OSError): safetensors' header check, pickle's
DAMAGED_WEIGHTS = (SafetensorError, pickle.UnpicklingError, EOFError)


@contextlib.contextmanager
def head_from_adapter():
    """Around loading a base whose new task head the caller replaces at once with the adapter's trained one
    (export.rebuild): transformers' load report ('classifier.weight | MISSING ... newly initialized ... You should
    probably TRAIN this model') said the opposite of what happens. Its verbosity is error for that load only, then as
    it was; a head the adapter does not bring is said by rebuild itself."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def load_base(recipe: Recipe, path: str, *, num_labels: int, label_names: list[str], precision: str, auto_cls):
    """Load the pretrained base with a fresh task head; return (model, names of the newly initialised head modules)."""
    if recipe.model.from_run:
        verify_from_run_weights(recipe, path)
    task_load = getattr(get_task(recipe.task.type), "load_model", None)  # a task's own base (summarization: BERT2BERT)
    dtype = base_dtype(recipe, precision)
    if task_load is not None and (loaded := task_load(recipe, path, dtype)) is not None:
        return loaded
    quant = None
    if recipe.quant.mode != "none":
        quant = quantization_config(recipe, precision, skip_modules(recipe, path, auto_cls, num_labels))
    kwargs = dict(revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code,
                  use_safetensors=None if recipe.model.allow_pickle else True, dtype=dtype,
                  quantization_config=quant)
    if num_labels:
        kwargs.update(num_labels=num_labels, id2label=dict(enumerate(label_names)),
                      label2id={n: i for i, n in enumerate(label_names)})
    if not get_method(recipe.adapter.method).pretrained:  # scratch: the architecture only
        model, head = load_scratch(recipe, path, auto_cls, kwargs)
        keep_layers(model, recipe.model.num_layers)
        return model, head
    if recipe.model.from_run:  # an earlier run's head for other labels (a task of a multi-task run): a fresh one replaces it
        kwargs["ignore_mismatched_sizes"] = True
    try:
        with checkpoint_read_by_pread(quant is not None):
            model, info = auto_cls.from_pretrained(path, output_loading_info=True, **kwargs)
    except (OSError, ValueError, *DAMAGED_WEIGHTS) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        folder = Path(path)
        if folder.is_dir() and not holds(folder, ("*.safetensors", *PICKLE_WEIGHTS, "*.gguf")):
            raise ModelError(f"{path}: the folder holds no model weights (no *.safetensors or *.bin file), only "
                             f"{', '.join(sorted(p.name for p in folder.iterdir())[:6]) or 'nothing'}. Point model.name at a "
                             "folder saved with save_pretrained, or at a Hub model id.") from None
        # a file cut short or overwritten: safetensors' header check, or torch.load's read of a .bin failing with an errno
        # (transformers' own OSErrors, a file it cannot find, carry none)
        if isinstance(e, DAMAGED_WEIGHTS) or (isinstance(e, OSError) and e.errno is not None and folder.is_dir()):
            raise ModelError(f"{path}: its weights cannot be read ({type(e).__name__}: {msg}): a weight file looks damaged or "
                             "truncated (an interrupted download or copy). Copy or download the model again, or save it anew "
                             "with save_pretrained.") from None
        if "safetensors" in msg.lower() and not recipe.model.allow_pickle:
            raise ModelError(pickle_only(path)) from None
        raise ModelError(f"cannot load {path} as {auto_cls.__name__}: {msg}") from None
    except RuntimeError as e:
        if "ignore_mismatched_sizes" not in str(e):
            raise
        shown = "; ".join(mismatched_weights(path, auto_cls)[:3])
        raise ModelError(f"{path}: its config.json and its weights disagree (weights of other shapes than the config "
                         f"describes{': ' + shown if shown else ''}): a folder mixed from two models, or copied halfway. Copy "
                         "or download the whole model again.") from None
    missing = set(info.get("missing_keys", [])) | {m[0] if isinstance(m, (tuple, list)) else m for m in info.get("mismatched_keys", [])}
    # (only weights beyond a new task head: the original base would lack the head too, and loading it costs a second base)
    if recipe.model.from_run and any(k.split(".")[0] not in HEAD_GUESS for k in missing):
        missing = fill_from_original_base(model, recipe, missing, auto_cls, kwargs)
    if recipe.model.from_run and num_labels:  # the earlier run's own classifier, same size: a fresh head all the same
        missing |= fresh_head(model, HEAD_GUESS, missing)
    head = new_modules(model, missing)
    keep_layers(model, recipe.model.num_layers)  # here, so a run reloaded (export.rebuild) or merged has the same layers
    if quant is not None:
        from peft import prepare_model_for_kbit_training

        disable_cpu_bf16_repack(model)
        keep_quantized_biases(model)
        release_checkpoint_mapping(model)
        loaded = {name: p.dtype for name, p in model.named_parameters()}
        new_name = "activation_checkpointing_kwargs" in inspect.signature(prepare_model_for_kbit_training).parameters
        checkpointing = {"activation_checkpointing_kwargs" if new_name else "gradient_checkpointing_kwargs": {"use_reentrant": False}}
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.train.gradient_checkpointing,
                                                **checkpointing)  # as without quant (peft 0.22 renamed the keyword)
        keep_dtypes(model, loaded)  # peft upcast every 16-bit weight it did not quantize to float32
        return_freed_memory()  # the buffer each weight was read into, quantized and freed; the upcast copies
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = getattr(model.config, "eos_token_id", None) or 0
    return model, head


def mismatched_weights(path: str, auto_cls) -> list[str]:
    """The weights of a local safetensors folder whose shapes are not those its config gives: 'name: file SHAPE, config
    SHAPE' (the model built on the meta device; names as saved, with or without the base model's prefix)."""
    from safetensors import safe_open
    from transformers import AutoConfig

    try:
        with torch.device("meta"):
            skeleton = auto_cls.from_config(AutoConfig.from_pretrained(path))
    except Exception:  # (only to name them: the error is said without)
        return []
    shapes, prefix, found = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}, skeleton.base_model_prefix, []
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                want = shapes.get(k, shapes.get(f"{prefix}.{k}"))
                if want is not None and tuple(have := st.get_slice(k).get_shape()) != want:
                    found.append(f"{k}: file {list(have)}, config {list(want)}")
    return found


def kept_layer_indices(total: int, n: int) -> list[int]:
    """model.num_layers: which n of `total` layers stay: evenly spaced, the first and the last kept (rounded half up;
    6 of 12 -> 0, 2, 4, 7, 9, 11, DistilBERT's choice; 1 -> the first)."""
    if n >= total:
        return list(range(total))
    if n == 1:
        return [0]
    return [int(i * (total - 1) / (n - 1) + 0.5) for i in range(n)]


def layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """(dotted name, list) of the model's transformer layers: the outermost ModuleList as long as its config's
    num_hidden_layers (BERT's encoder.layer, Llama's model.layers, GPT-2's transformer.h); None when there is none."""
    total = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    return next(((name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == total), None)


def keep_layers(model: nn.Module, n: int | None) -> list[int]:
    """Keep `n` of the base's transformer layers (kept_layer_indices), renumbered 0..n-1 (layer_idx too: a decoder's
    KV cache is indexed by it), the config updated (num_hidden_layers, and a per-layer layer_types list) -> the indices
    kept, in the original numbering. n None: all layers, nothing changes."""
    if n is None:
        return []
    found = layer_stack(model)
    if found is None or getattr(model.config, "is_encoder_decoder", False):
        raise ModelError(f"model.num_layers={n}: cannot find the transformer layers of {type(model).__name__} (an "
                         "encoder-decoder, or layers not in one list). Set model.num_layers=null.")
    name, layers = found
    if n > len(layers):
        raise ModelError(f"model.num_layers={n}: the base has only {len(layers)} layers. Give at most {len(layers)} (or null = all).")
    keep = kept_layer_indices(len(layers), n)
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, nn.ModuleList([layers[i] for i in keep]))
    for new, old in enumerate(keep):
        for module in layers[old].modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    config = model.config.get_text_config()
    if isinstance(getattr(config, "layer_types", None), list) and len(config.layer_types) == len(layers):
        config.layer_types = [config.layer_types[i] for i in keep]
    config.num_hidden_layers = n
    if len(keep) < len(layers):
        log.info("model.num_layers=%d: kept layers %s of %d", n, keep, len(layers))
    return keep


def num_layers_problems(recipe: Recipe, path: str | None = None) -> list[str]:
    """model.num_layers against the config of the base (at `path` when it is known; the weights are not loaded)."""
    n = recipe.model.num_layers
    if n is None:
        return []
    from transformers import AutoConfig

    path = path or base_path(recipe)
    try:
        config = AutoConfig.from_pretrained(path, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code)
    except Exception as e:  # an unknown model_type (a newer transformers wrote it), a broken config.json, its code failing
        return [unreadable_config(recipe, path, e)]
    total = getattr(config.get_text_config(), "num_hidden_layers", None)
    if getattr(config, "is_encoder_decoder", False) or recipe.model.decoder is not None or total is None:
        return [f"model.num_layers={n}: not supported for {recipe.model.name} ({type(config).__name__}: an encoder-decoder, or "
                "no num_hidden_layers in its config). Set model.num_layers=null."]
    if n > total:
        return [f"model.num_layers={n}: {recipe.model.name} has {total} layers. Give at most {total} (or null = all of them)."]
    return []


def unreadable_config(recipe: Recipe, path, e: Exception) -> str:
    """What to say of a base whose config transformers cannot read (`e`): a damaged config.json, or its words."""
    if Path(path).is_dir() and (bad := damaged_json(Path(path))) == "config.json":
        return str(damaged_folder(Path(path), bad))
    return (f"model.name={recipe.model.name!r}: cannot read its config ({path}): {type(e).__name__}: "
            f"{str(e).splitlines()[0].rstrip('.') if str(e) else ''}. Fix the folder, or upgrade transformers if the model is newer.")


def model_problems(recipe: Recipe) -> list[str]:
    """`peftlab validate`, without reading weights: the base can be found (a packaged name installed, a model folder, a
    GGUF file, a hub id reachable), model.num_layers fits it, and each name of an adapter.target_modules list matches a
    module of the task's model, built from the base's config on the meta device. Not checked (said in the log): a hub
    id while the hub is offline and the id is not in its cache, a GGUF base not converted yet (the first `train`
    converts it). Not built on meta: a model.from_run not merged yet (`train` merges it), a base that needs its own
    code (model.trust_remote_code), a two-checkpoint warm start, a model of several parts (multitask)."""
    import os

    from huggingface_hub import constants

    from .bases import check_gguf_whole, converted_if_ready, gguf_source, packaged_near
    from .errors import HubModelUnreachable, ModelNotFound

    m, task = recipe.model, get_task(recipe.task.type)
    try:
        source = gguf_source(m.name) if m.from_run is None else None
        path = converted_if_ready(source) if source else base_path(recipe)  # (None: a GGUF not converted yet)
    except HubModelUnreachable as e:
        offline = constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
        if offline and not packaged_near(m.name):  # (a typo of a packaged name is a problem offline too)
            log.warning("model.name=%r: not checked: the hub is offline (HF_HUB_OFFLINE) and this id is not in its cache. "
                        "`train` will need it there.", m.name)
            return []
        return [str(e)]
    except ModelNotFound as e:
        if m.from_run is None:
            return [str(e)]
        if not (Path(m.from_run) / "run.json").is_file():  # (config.from_run_problems says it)
            return []
        try:  # not merged yet (`train` merges it first): the task against its original base, whose architecture it keeps
            return task_model_problems(recipe, resolve_model_path(m.name, m.revision))
        except PeftlabError:
            return []
    if path is None:
        try:
            check_gguf_whole(source)  # (cheap: its header is read, no tensor)
        except ModelNotFound as e:
            return [str(e)]
        log.info("model.name=%r: a GGUF base with no converted folder found; model.num_layers and adapter.target_modules "
                 "are checked when `train` converts it (or finds its conversion)", m.name)
        return []
    problems = num_layers_problems(recipe, str(path))
    folder = Path(path)
    if (not m.allow_pickle and get_method(recipe.adapter.method).pretrained and folder.is_dir()
            and not holds(folder, ("*.safetensors",)) and holds(folder, PICKLE_WEIGHTS)):
        problems.append(pickle_only(path))  # (what loading it says)
    if (hasattr(task, "check_tokenizer") or folder.is_dir()) and not m.trust_remote_code:
        try:
            tokenizer = load_tokenizer(str(path), recipe)  # a local folder's: its files there and readable
            if hasattr(task, "check_tokenizer"):
                task.check_tokenizer(tokenizer, recipe)  # e.g. no chat template for sft
        except ConfigError as e:
            problems.extend(e.problems)
        except PeftlabError as e:
            problems.append(str(e))
    from transformers import AutoConfig

    if m.decoder is not None and not m.trust_remote_code:  # a warm start: each half's table, from the two configs
        from transformers import EncoderDecoderConfig

        try:
            encoder = AutoConfig.from_pretrained(path, revision=m.revision)
            decoder = AutoConfig.from_pretrained(resolve_model_path(m.decoder))
            if warm_problems := warm_start_problems(encoder, decoder, recipe):  # (nothing else to check on such a pair)
                return problems + warm_problems
            problems += default_layers_problems(recipe, encoder.model_type)  # the warm start takes the encoder's defaults
            warm = EncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
            problems += length_problems(warm, recipe)
        except ModelError as e:
            problems.append(str(e))
        except Exception as e:  # (a decoder not found: `train` says it when it builds the model)
            log.info("model.decoder=%r: input lengths not checked (%s: %s)", m.decoder, type(e).__name__, e)
        else:
            if not problems:  # the adapter on both halves, as for one checkpoint (below)
                from transformers import EncoderDecoderModel

                problems += adapter_problems(lambda: EncoderDecoderModel(config=warm), recipe, task)
    own_model = hasattr(task, "build_model")  # (multitask: each task's lengths by its own keys, its model as its first task's)
    if m.trust_remote_code or m.decoder is not None or (own_model and not hasattr(task, "model_recipe")):
        return problems

    try:
        config = AutoConfig.from_pretrained(path, revision=m.revision)
        if own_model:
            problems += task.input_length_problems(recipe, config)
            recipe = task.model_recipe(recipe)  # the single-model recipe its model is built by: the adapter's checks below
            task = get_task(recipe.task.type)
        else:
            problems += length_problems(config, recipe)  # data.max_length against the position table
    except ModelError as e:
        problems.append(str(e))
    except Exception as e:  # a config transformers cannot read here: a local folder's is refused as `train` refuses it
        if (folder / "config.json").is_file():
            return problems + [p for p in [unreadable_config(recipe, path, e)] if p not in problems]
        log.info("model.name=%r: input lengths and target_modules not checked (%s: %s)", m.name, type(e).__name__, e)
        return problems
    problems += architecture_problems(recipe, config) + default_layers_problems(recipe, config.model_type)
    if problem := no_task_model(recipe, config):
        return problems + [problem]
    return problems + adapter_problems(lambda: task.auto_model_class.from_config(config), recipe, task)


def no_task_model(recipe: Recipe, config) -> str | None:
    """transformers' Auto class of the task has no model for this architecture (task.type=mlm on a decoder) -> the
    problem, or None."""
    auto = get_task(recipe.task.type).auto_model_class
    mapping = getattr(auto, "_model_mapping", None)  # transformers' Auto class: the architectures it has
    if mapping is None or type(config) in mapping:
        return None
    other = {"mlm": " For a decoder LLM use task.type=clm.", "clm": " For an encoder use task.type=mlm."}.get(recipe.task.type, "")
    return (f"model.name={recipe.model.name!r}: transformers has no {auto.__name__} for a {config.model_type} model, which "
            f"task.type={recipe.task.type} needs.{other}")


def task_model_problems(recipe: Recipe, path: str) -> list[str]:
    """The task's model against the architecture of the base config at `path`, before any weight is read (train, and
    for a model.from_run not merged yet its original base, whose architecture the merge keeps): transformers has no
    such model (mlm on a decoder), or a causal-LM task on an encoder. A config not read here: none (loading says it)."""
    from transformers import AutoConfig

    m, task = recipe.model, get_task(recipe.task.type)
    if m.trust_remote_code or m.decoder is not None or hasattr(task, "build_model"):  # (their own model classes)
        return []
    try:
        config = AutoConfig.from_pretrained(path, revision=m.revision)
    except Exception:
        return []
    return [p for p in (causal_lm_problem(recipe, config), no_task_model(recipe, config)) if p]


def adapter_problems(build: Callable[[], nn.Module], recipe: Recipe, task) -> list[str]:
    """The adapter on the task's model built on the meta device by `build` (no weight read): each adapter.target_modules
    name matches a module, a rank field fits the layers, and what applying the method would refuse (OFT: a block that
    divides no width; layers_to_transform that keeps no adapted layer). Not checked where the method adapts no layer,
    or the model cannot be built that way."""
    from .methods.peft_adapter import LAYER_OPTIONS, check_target_modules

    targets, method = recipe.adapter.target_modules, get_method(recipe.adapter.method)
    listed = isinstance(targets, list) and targets != ["all-linear"]
    # options that keep some layers only (layers_to_transform: [5] of 2 layers kept none): applied to see what remains
    apply = method.check_on_meta or any(recipe.adapter.options.get(k) is not None for k in LAYER_OPTIONS)
    if not method.layers or not (listed or method.rank_fields or apply):
        return []
    try:
        with torch.device("meta"):
            skeleton = build()
    except Exception as e:  # an architecture that cannot be built this way: `train` checks on the loaded model
        log.info("model.name=%r: target_modules not checked (%s: %s)", recipe.model.name, type(e).__name__, e)
        return []
    try:
        check_target_modules(skeleton, targets if listed else None)
    except ModelError as e:
        return [str(e)]
    if problem := rank_problem(skeleton, method, recipe.adapter):
        return [problem]
    if apply:  # what `train` would refuse when it applies the method
        try:
            method.apply(skeleton, recipe, [], peft_task_type(task, skeleton))
        except ModelError as e:
            return [str(e)]
        except Exception as e:  # (peft cannot build it on meta: `train` applies it to the loaded model)
            log.info("adapter.method=%s: not applied on the meta device (%s: %s)", method.name, type(e).__name__, e)
    return []


def default_layers_problems(recipe: Recipe, model_type: str | None) -> list[str]:
    """No adapter.target_modules, and peft has no default layers of this method for the architecture: `train` refuses
    it when it applies the adapter (methods/peft_adapter.py), `validate` says it from the config."""
    from .methods.peft_adapter import has_default_layers, no_default_targets

    a, method = recipe.adapter, get_method(recipe.adapter.method)
    if not method.layers or method.config_class is None or a.target_modules is not None or has_default_layers(method.config_class, model_type):
        return []
    return [no_default_targets(a.method, model_type)]


def fill_from_original_base(model: nn.Module, recipe: Recipe, missing: set[str], auto_cls, kwargs: dict) -> set[str]:
    """model.from_run: weights the earlier run's model class did not keep (a masked-LM model has no pooler) are taken from
    the original base, so they start as they would without from_run; what the original lacks too (the new task head)
    stays new. -> the keys still missing."""
    original, info = auto_cls.from_pretrained(resolve_model_path(recipe.model.name, recipe.model.revision),
                                              output_loading_info=True, **kwargs)
    still = set(info.get("missing_keys", []))
    state = original.state_dict()
    filled = sorted(k for k in missing - still if k in state)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k in filled:
            (params[k] if k in params else model.get_buffer(k)).copy_(state[k])
    if filled:
        log.info("model.from_run: %s taken from the original base %s (the earlier run's model did not have them)",
                 ", ".join(sorted({k.rsplit(".", 1)[0] for k in filled})), recipe.model.name)
    return missing - set(filled)


def keep_original_modules(model: nn.Module, recipe: Recipe) -> list[str]:
    """A merged model whose class drops modules of its base model (a masked-LM BERT has no pooler): those modules put
    back from the original base, so its merged folder holds them (its own class reports them unused on load). A model
    built on that folder without model.from_run (model.name=RUN/merged, the card's transformers + peft route) then gets
    the original's pooler, as fill_from_original_base gives it, not a random one. -> the names of the modules put back."""
    from transformers import AutoModel

    inner = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(inner, nn.Module) or inner is model or recipe.model.trust_remote_code:
        return []
    try:
        with torch.device("meta"):
            whole = AutoModel.from_config(copy.deepcopy(model.config))
    except Exception:  # (no base model class for it: nothing to compare)
        return []
    dropped = [n for n, m in whole.named_children() if getattr(inner, n, None) is None and next(m.parameters(), None) is not None]
    if not dropped:
        return []
    original, info = AutoModel.from_pretrained(resolve_model_path(recipe.model.name, recipe.model.revision), revision=recipe.model.revision,
                                               dtype=torch.float32, output_loading_info=True,
                                               use_safetensors=None if recipe.model.allow_pickle else True)
    missing = {k.split(".")[0] for k in info.get("missing_keys", [])}  # (not in the original either: left out, as it was)
    kept = [n for n in dropped if n not in missing]
    for name in kept:
        setattr(inner, name, getattr(original, name).to(next(inner.parameters()).dtype))
    if kept:
        log.info("merged model: %s of the original base %s kept (%s drops them)", ", ".join(kept), recipe.model.name,
                 type(model).__name__)
    return kept


def fresh_head(model: nn.Module, names: list[str], missing: set[str]) -> set[str]:
    """model.from_run on a classifier run with as many labels: its head loaded with the merged weights, trained for that
    run's classes. Re-initialise it as transformers would a new head (head_init), so the new task starts from no class
    meanings -> the keys of the re-initialised head."""
    init, fresh = head_init(model), set()
    for name, module in model.named_children():
        keys = {f"{name}.{k}" for k, _ in module.named_parameters()}
        if name in names and keys - missing:
            for layer in module.modules():
                if isinstance(layer, nn.Linear):
                    init(layer)
            fresh |= keys
            log.info("model.from_run: the earlier run's task head (%s) is replaced by a fresh one", name)
    return fresh


def new_modules(model: nn.Module, missing_keys) -> list[str]:
    """The modules the checkpoint did not have (a new task head), to be trained with the adapter: the top-level module
    of each missing weight, except that a module holding the input embeddings (an MLM head whose vocabulary projection
    is tied to them) is split into its children that miss weights, so the embedding matrix is not trained in full."""
    missing = list(missing_keys)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = {id(p) for p in embeddings.parameters()} if embeddings is not None else set()
    found: list[str] = []

    def visit(name: str, module: nn.Module) -> None:
        if not any(k.startswith(name + ".") for k in missing):
            return
        if not any(id(p) in tied for p in module.parameters()):
            found.append(name)
            return
        for child, sub in module.named_children():
            visit(f"{name}.{child}", sub)

    for name, module in model.named_children():
        visit(name, module)
    return sorted(found)


@contextlib.contextmanager
def checkpoint_read_by_pread(active: bool):
    """While a base is quantized on load, transformers reads its safetensors files with pread instead of mmap.

    Through mmap every page quantization reads stays in the process's memory until loading ends, so the whole file
    (2.9 GB for a 0.73B fp32 base) is resident next to its 4-bit copy at the load's peak. With pread each tensor is a
    buffer of its own, freed once quantized. (safetensors' pread backend is what transformers uses on Windows.)"""
    import transformers.modeling_utils as loading

    original = getattr(loading, "safe_open", None)
    if not active or original is None:  # a transformers that opens files elsewhere: release_checkpoint_mapping still helps
        yield
        return

    def open_by_pread(filename, framework, device="cpu", backend=None):
        return original(filename, framework=framework, device=device, backend="pread")

    loading.safe_open = open_by_pread
    try:
        yield
    finally:
        loading.safe_open = original


def release_checkpoint_mapping(model: nn.Module) -> None:
    """Copy the weights left unquantized (embeddings, norms, biases, the pooler) out of the checkpoint's memory map.

    When transformers reads safetensors through mmap (checkpoint_read_by_pread could not apply), those weights stay
    views of the file. Quantizing read every page of it, so while one view lives the whole file (2.7 GB for a 0.7B fp32
    base) counts in the process's memory: a quantized model then used more RAM than the unquantized one. The copies
    are small; the map is then closed."""
    for module in model.modules():
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if not type(t).__module__.startswith("bitsandbytes"):
                t.data = t.data.clone()


def glibc_function(name: str):
    """glibc's allocator function `name` (malloc_trim, mallopt), or None where the C library is another (macOS, musl)."""
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> bool:
    """Give the heap memory glibc keeps after frees back to the system (malloc_trim); False where there is no glibc.

    Quantizing on load reads one full-precision buffer per weight and frees it; glibc keeps most of that for reuse,
    0.6 GB on a 0.73B base, which then counts in the process's memory for the whole run."""
    trim = glibc_function("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True


MMAP_THRESHOLD = 4 << 20  # train.release_memory: glibc serves blocks of 4 MiB and more with maps of their own


def map_large_allocations(threshold: int = MMAP_THRESHOLD) -> bool:
    """From now on, for the whole process, glibc serves allocations of `threshold` bytes and more with a memory map
    of their own, unmapped when freed (mallopt M_MMAP_THRESHOLD, which also stops glibc raising that threshold as large
    blocks are freed) -> False where there is no glibc.

    A quantized base on CPU dequantizes each weight for every matmul, forward and backward (bitsandbytes), and frees
    the copy; glibc keeps such blocks in its heap, where the activations allocated between them pin the holes, so the
    heap grows by about one full-precision copy of the weights (0.73B base: peak RSS 4.3 GB, 1.75 GB of it live
    tensors). Mapped blocks go back at once (3.3 GB) at the cost of page faults on each new one (1.13x a step there
    with bf16 dequantization, 1.6x with float32: benchmarks/README.md)."""
    mallopt = glibc_function("mallopt")
    return mallopt is not None and mallopt(-3, threshold) == 1  # -3: M_MMAP_THRESHOLD; glibc returns 1 on success


def largest_weight_copy(model: nn.Module) -> int:
    """Bytes of the largest full-precision copy a quantized layer of `model` makes of its weight for a matmul
    (bitsandbytes dequantizes to the layer's compute dtype on CPU, fp32 where it has none); 0: nothing quantized."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    return max((m.in_features * m.out_features * (getattr(m, "compute_dtype", None) or torch.float32).itemsize
                for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))), default=0)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """transformers 5 renamed gradient checkpointing to activation checkpointing; use whichever this version has."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def build_model(recipe: Recipe, *, num_labels: int, label_names: list[str], precision: str = "fp32"):
    """Recipe -> (model ready to train, tokenizer, ModelInfo)."""
    recipe = recipe_argument(recipe, "build_model")
    task = get_task(recipe.task.type)
    if hasattr(task, "build_model"):  # a model of several parts (tasks/multitask.py: a head per task)
        return task.build_model(recipe, label_names=label_names, precision=precision)
    path = base_path(recipe)
    if problems := task_model_problems(recipe, path):  # (transformers' own words were "Unrecognized configuration class")
        raise ModelError(problems[0])
    tokenizer = load_tokenizer(path, recipe)
    model, head = load_base(recipe, path, num_labels=num_labels, label_names=label_names, precision=precision,
                            auto_cls=task.auto_model_class)
    if problems := architecture_problems(recipe, model.config):
        raise ModelError(problems[0])
    if (probe := getattr(task, "loaded_model_problem", None)) and (problem := probe(model, recipe)):  # (sft: packing)
        raise ModelError(problem)
    check_input_lengths(model.config, recipe)
    if problem := vocabulary_problem(tokenizer, model, path):
        raise ModelError(problem)
    base_weights_mib = model.get_memory_footprint() / 2**20
    if recipe.train.gradient_checkpointing and recipe.quant.mode == "none":  # (kbit prep already enabled it)
        enable_activation_checkpointing(model)
    model.config.pad_token_id = tokenizer.pad_token_id
    method = get_method(recipe.adapter.method)
    if problem := rank_problem(model, method, recipe.adapter):  # (before peft allocates it)
        raise ModelError(problem)
    model = method.apply(model, recipe, head, peft_task_type(task, model))  # peft adapter or grads set
    if recipe.model.dtype == "auto":
        keep_trained_weights_fp32(model)
    trainable, total = count_params(model)
    if trainable == 0 and recipe.train.max_steps != 0:  # (frozen on a base whose MLM head came with it: no new head)
        raise ModelError(f"adapter.method={recipe.adapter.method} leaves no weight of {path} to train (no new task head was "
                         "added): nothing would train. Use adapter.method=lora, or train.max_steps=0 to score the base as it is.")
    warn_if_not_efficient(recipe, trainable, total)
    info = ModelInfo(path=path, method=recipe.adapter.method, trainable_params=trainable, total_params=total,
                     head_modules=head, quantized=recipe.quant.mode, base_weights_mib=base_weights_mib)
    log.info("model %s: %s, %s trainable of %s params (%.3f%%), %s%s", path, info.method, f"{trainable:,}",
             f"{total:,}", info.trainable_percent, f"new head {'+'.join(head)}" if head else "the base's own head",
             f", base quantized {info.quantized}" if info.quantized != "none" else "")
    return model, tokenizer, info


def vocabulary_problem(tokenizer, model: nn.Module, path: str) -> str | None:
    """A tokenizer whose ids reach past the base's embedding rows (tokens added to it, the embedding not resized): the
    first batch holding one failed deep in the forward (IndexError; on a GPU a device-side assert)."""
    try:
        rows = model.get_input_embeddings().num_embeddings
    except (AttributeError, NotImplementedError):
        return None
    past = sorted((i, t) for t, i in tokenizer.get_vocab().items() if i >= rows)
    if not past:
        return None
    shown = ", ".join(repr(t) for _, t in past[:5]) + (f" and {len(past) - 5} more" if len(past) > 5 else "")
    return (f"the tokenizer of {path} has {len(past)} token(s) past the base's {rows:,} embedding rows ({shown}, ids up to "
            f"{past[-1][0]:,}): an input holding one cannot be embedded. Resize the base's embedding to the tokenizer and "
            "save it (model.resize_token_embeddings(len(tokenizer)); model.save_pretrained(DIR); tokenizer.save_pretrained(DIR)), "
            "then train on DIR; or use the tokenizer the base was trained with.")


# ------------------------------------------------------------ classification heads of several sizes (multitask, load_adapters)

def head_wrapper(model):
    """peft's wrapper of the classification head (modules_to_save: classifier or score) of a SEQ_CLS peft model."""
    from peft.utils.other import ModulesToSaveWrapper

    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and name.rsplit(".", 1)[-1] in ("classifier", "score"):
            return module
    raise ModelError(f"{type(model).__name__} has no classification head wrapped by peft (classifier or score).")


def resized_head(head: nn.Module, old: int, new: int, init) -> nn.Module:
    """A fresh head like `head` for `new` classes: a copy whose output layer(s) (Linear with `old` outputs) have `new`
    outputs, every Linear in it re-initialised by `init` (head_init; a no-op when weights are loaded into it next)."""
    out = copy.deepcopy(head)
    for name, module in list(out.named_modules()):
        if isinstance(module, nn.Linear) and module.out_features == old and name:
            layer = nn.Linear(module.in_features, new, bias=module.bias is not None, dtype=module.weight.dtype,
                              device=module.weight.device)
            out.set_submodule(name, layer)
    if isinstance(out, nn.Linear) and out.out_features == old:
        out = nn.Linear(out.in_features, new, bias=out.bias is not None, dtype=out.weight.dtype, device=out.weight.device)
    for module in out.modules():
        if isinstance(module, nn.Linear):
            init(module)
    return out


def head_init(model):
    """How transformers initialises a new head's Linear: weights N(0, the base's initializer_range), biases zero."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    std = getattr(base.config, "initializer_range", 0.02)

    def init(module: nn.Linear) -> None:
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)

    return init
