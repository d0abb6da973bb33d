"""The recipe: one typed source of truth.

Nested dataclasses mirror the YAML layout one to one; every field carries its help text (the CLI's
`peftlab train --help` is derived from it). `load_recipe` reads YAML plus
dotted overrides (`train.lr=1e-4`), rejects unknown keys with a did-you-mean, checks types, and
`validate` reports every remaining problem at once, each naming the field, the value and the fix.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import difflib
import functools
import json
import math
import re
import sys
import types
import typing
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Union

import yaml

from .errors import ConfigError, a_or_an
from .methods import get_method, method_names
from .methods.lora import LORA_INITS
from .packaged import PACKAGED_MODELS, packaged_folder
from .tasks import check_recipe as task_problems
from .tasks import default_best_metric, get_task, task_names


def opt(default: Any, help: str, choices: tuple | None = None, *, ge: float | None = None, gt: float | None = None,
        lt: float | None = None, hint: str | None = None) -> Any:
    """A dataclass field with help text, allowed values (`choices`) or a range (ge: >=, gt: >, lt: <; `hint` is added to
    the message), read by the loader, the validator (generically: `check_field`) and the CLI."""
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "lt": lt, "hint": hint}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    if dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name: str = opt("minilm", "Base model: a local directory, a .gguf file (or a folder holding one: converted once into a cached "
                    "transformers folder), a hub id (e.g. roberta-base), or a packaged name ('minilm').")
    revision: str | None = opt(None, "Hub revision (branch, tag or commit) of the base model.")
    from_run: str | None = opt(None, "Start from a finished run's weights (e.g. runs/dapt-kitchen, a task.type mlm/clm continued "
                               "pretraining): its adapter merged into its base (RUN/merged, made when missing) is this recipe's "
                               "base; model.name must be that run's base (or left out: then it is taken from the run). A task "
                               "head of that run for other labels (one task of a multi-task run) is replaced by a fresh "
                               "one. The run.json and model card record the chain (lineage).")
    trust_remote_code: bool = opt(False, "Run model code shipped with a hub repo. Off by default: only enable for repos you trust.")
    allow_pickle: bool = opt(False, "Also load pickle weights (.bin/.pt), which can run arbitrary code. Off: safetensors only.")
    dtype: str = opt("float32", "Dtype the (non-quantized) base weights are loaded in. auto: the training precision's (bf16, fp16) "
                     "where the base stays frozen (adapters, frozen), its trained weights (adapter, head) in float32; float32 "
                     "where every weight trains (full, scratch) or the precision is fp32. Halves the frozen base's memory and "
                     "that of its activations. With quant.mode set, the weights left unquantized (embeddings, norms) stay in "
                     "it too (peft's k-bit preparation would make them float32, and the activations with them).",
                     ("float32", "bfloat16", "float16", "auto"))
    decoder: str | None = opt(None, "Summarization: warm-start an encoder-decoder (BERT2BERT) with model.name as the encoder and this "
                              "model (packaged name, directory or hub id, same vocabulary) as the decoder; its new cross-attention "
                              "is trained in full, LoRA adapts the pretrained parts. null = model.name alone.")
    num_layers: int | None = opt(None, "Keep this many of the base's transformer layers (null = all): evenly spaced, the first and "
                                 "the last kept (DistilBERT's choice: 6 of 12 keeps 0, 2, 4, 7, 9, 11), applied right after "
                                 "loading, so a reloaded or merged run has the same N layers. A smaller student for train.distill.",
                                 ge=1, hint="layers kept; at most the base's number of layers")
    cross_attention_init: str = opt("random", "Encoder-decoder warm start: the decoder's new cross-attention starts random, or as a "
                                    "copy of the same layer's pretrained self-attention (self).", ("random", "self"))


@dataclass
class QuantConfig:
    mode: str = opt("none", "bitsandbytes quantization of the base: none, 4bit (QLoRA) or 8bit.", ("none", "4bit", "8bit"))
    quant_type: str = opt("nf4", "4-bit data type.", ("nf4", "fp4"))
    double_quant: bool = opt(True, "Quantize the 4-bit quantization constants too (saves ~0.4 bit/param).")
    compute_dtype: str = opt("auto", "Dtype of 4-bit matmuls; auto follows train.precision.", ("auto", "float32", "bfloat16", "float16"))


@dataclass
class AdapterConfig:
    method: str = opt("lora", "A peft method (lora, adalora, ia3, loha, lokr, vera, oft, prompt_tuning, prefix_tuning, p_tuning) or a "
                      "baseline: full (every weight trained), frozen (backbone frozen, head trained), scratch (same architecture, "
                      "random init, every weight trained).", method_names)  # the registry, read when validating
    r: int = opt(8, "LoRA rank (adalora: the average rank the budget ends at, its target_r; oft: blocks per layer, a divisor of "
                 "each adapted layer's input width). At most the largest min(in, out) of the adapted layers.", ge=1,
                 hint="the LoRA rank; typical: 4-64")
    alpha: float = opt(16, "LoRA scaling numerator (scale = alpha/r, or alpha/sqrt(r) with use_rslora).", gt=0, hint="typical: 2 x r")
    dropout: float = opt(0.1, "Dropout on the LoRA input, in [0, 1).", ge=0, lt=1)
    target_modules: list[str] | None = opt(None, "Module names to adapt; null = the architecture's default (peft's table), 'all-linear' = every linear layer.")
    use_rslora: bool = opt(False, "Rank-stabilised LoRA scaling alpha/sqrt(r).")
    use_dora: bool = opt(False, "DoRA: weight-decomposed LoRA (magnitude + direction).")
    init: str = opt("default", "LoRA initialisation (peft's init_lora_weights): default (A random, B zero), gaussian, pissa (A, B "
                    "from the top singular vectors of W, which keeps the residual; exported converted to plain LoRA on the "
                    "original base), olora (QR of W, same export), loftq (4-bit NF4 base: A, B fitted to the quantization error; "
                    "needs a CUDA GPU).", LORA_INITS)
    loraplus_lr_ratio: float | None = opt(None, "LoRA+: lora_B learns this many times faster than lora_A (train.lr), e.g. 16; "
                                          "null = off. LoRA only.", ge=1, hint="lr(B)/lr(A); typical: 4-16")
    adalora_init_r: int = opt(12, "AdaLoRA: rank every layer starts with; the budget then shrinks to an average of adapter.r.", ge=1)
    adalora_warmup_fraction: float = opt(0.1, "AdaLoRA: fraction of the optimizer steps trained at adalora_init_r before pruning (tinit).", ge=0, lt=1)
    adalora_final_fraction: float = opt(0.2, "AdaLoRA: fraction of the optimizer steps trained at the final budget, ranks fixed (tfinal).", ge=0, lt=1)
    adalora_interval: int = opt(1, "AdaLoRA: reallocate ranks every N optimizer steps while the budget shrinks (deltaT).", ge=1,
                               hint="optimizer steps between reallocations")
    num_virtual_tokens: int = opt(20, "Virtual tokens of prompt_tuning, prefix_tuning and p_tuning.", ge=1, hint="typical: 10-50")
    options: dict = opt({}, "Extra keyword arguments passed straight to the method's peft config, e.g. {init_lora_weights: pissa_niter_4} with init: pissa.")


FORMATS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}  # extension -> format (auto)


@dataclass
class SplitConfig:
    path: str | None = opt(None, "Local data file (.csv, .tsv, .jsonl/.json, .parquet), relative to the working directory.")
    split: str | None = opt(None, "Hub split name (with data.dataset), e.g. validation.")
    format: str = opt("auto", "File format; auto = from the extension.", ("auto", "csv", "tsv", "json", "parquet"))
    column_names: list[str] | None = opt(None, "Names for every column of a headerless csv/tsv file, in order (a file whose first line is a "
                                            "header anyway is refused).")
    text_columns: list[str] | None = opt(None, "Override data.text_columns for this split.")
    label_column: str | None = opt(None, "Override data.label_column for this split.")
    label_map: dict | None = opt(None, "Map raw label values to label names or indices, e.g. {1: World, 2: Sports}.")
    max_samples: int | None = opt(None, "Use a seeded random subset of this many rows.", ge=1)
    references_column: str | None = opt(None, "Summarization and SFT, an eval or test split: a column holding several reference "
                                        "texts per row, a list (DialogSum's test: summaries). The generated text is scored "
                                        "against all of them: each row's best ROUGE over its references (as rouge_score's "
                                        "score_multi and `evaluate`'s rouge), exact match with any; the loss and "
                                        "eval.metric_fn stay on the one target (data.target_column).")


EVAL_SPLITS = ("eval", "test")  # what an evaluation of a finished run scores (`peftlab eval --split`, run.evaluate)


@dataclass
class DataConfig:
    dataset: str | None = opt(None, "Hub dataset id (e.g. glue) for splits that name `split:` instead of `path:`.")
    subset: str | None = opt(None, "Hub dataset configuration (e.g. sst2).")
    # No split has a default path: a default would silently train or evaluate on data the recipe never named
    train: SplitConfig | None = opt(None, "Training split, required (a path string is shorthand for {path: ...}).")
    eval: SplitConfig | None = opt(None, "Evaluation split used during training and by `peftlab eval`; null = data.eval_holdout of "
                                   "train, or none.")
    test: SplitConfig | None = opt(None, "Optional held-out test split, evaluated once at the end.")
    eval_holdout: float = opt(0.0, "With no eval split: hold out this fraction of train (seeded) for evaluation.", ge=0, lt=1)
    seed: int | None = opt(None, "Seed of the data.*.max_samples subsets and the eval_holdout split; null = train.seed. Fix it to "
                           "vary train.seed over the same rows (a seed study, or truth runs scored on one held-out split).",
                           ge=0, lt=2**32, hint="the range numpy's and torch's seeds take")
    text_columns: list[str] = opt(["sentence"], "Column(s) holding the input text; several are joined with a space.")
    text_pair: bool = opt(False, "Classification: the two data.text_columns are a sentence pair (MRPC: [sentence1, sentence2]), "
                          "encoded as one by the tokenizer's pair template ([CLS] a [SEP] b [SEP], with segment ids), not "
                          "joined into one string; where the template puts nothing between the texts (byte-level BPE "
                          "decoders: GPT-2, SmolLM2), with a newline token between them (EOS where there is none).")
    label_column: str = opt("label", "Column holding the label (an index or a name).")
    label_names: list[str] | None = opt(None, "Ordered label names (integers are their text: [1, 2, 3, 4, 5]); null = the sorted "
                                       "distinct labels of the train split (the whole file, before any eval_holdout).")
    label_words: list[str] | None = opt(None, "Verbalizer: the word the model writes for each class, in data.label_names order, "
                                        "verbatim (mind the leading space after a plain prompt); null = derived from "
                                        "data.label_names: ' negative' after a plain prompt, 'negative' after a chat template.")
    target_column: str | None = opt(None, "Summarization: column holding the target text (e.g. summary); the source is data.text_columns.")
    max_length: int = opt(128, "Truncate inputs to this many tokens (batches are padded dynamically to their longest row).", ge=8,
                          hint="tokens; at most the base model's position limit")
    max_target_length: int = opt(128, "Summarization: truncate target texts to this many tokens (end-of-sequence included).", ge=2,
                                 hint="tokens")
    sft_format: str = opt("auto", "SFT: how rows hold a conversation: messages (data.messages_column, a list of {role, content}), "
                          "instruction (instruction/input/output columns), prompt_completion (data.text_columns -> "
                          "data.target_column when target_column is set, else prompt/completion columns); auto = from the "
                          "columns found, in that order.", ("auto", "messages", "instruction", "prompt_completion"))
    messages_column: str = opt("messages", "SFT: column holding the conversation, a list of {role, content} (roles system, user, assistant).")
    packing: bool = opt(False, "SFT: pack short training examples into rows of up to data.max_length tokens (position ids restart "
                        "per example and attention stays within it), so little compute goes to padding.")


@dataclass
class TaskConfig:
    type: str = opt("classification", "Task family (sentiment is a classification).", task_names)  # the registered tasks
    prompt: str | None = opt(None, "Summarization: model input with {source} where the text goes; null = '{source}' for encoder-decoder "
                             "models, 'Summarize this dialogue:\\n{source}\\nSummary: ' for decoder-only ones. Verbalizer: the "
                             "prompt with {text} where the input goes, the label word follows it; null = 'Text: {text}\\nLabel:'. SFT: the user turn "
                             "of text prompt/completion rows, {source} where the prompt's text goes; null = the text alone (the "
                             "messages and instruction formats do not read it).")
    chat_template: bool = opt(False, "Summarization, decoder-only: wrap the prompt in the tokenizer's chat template (when it has one). "
                              "Verbalizer: the prompt is the user turn and the label word the assistant's answer (a tokenizer "
                              "without a chat template is an error).")
    chat_format: str | None = opt(None, "SFT: chat template to use instead of the tokenizer's own (needed when it has none): a named "
                                  "one (chatml) or a Jinja string.")
    system_prompt: str | None = opt(None, "SFT: system message put in front of conversations that have none; null = none.")
    label_eos: bool = opt(False, "Verbalizer: each label word is followed by EOS, trained and scored (needed when one word's "
                          "tokens begin another's).")


@dataclass
class DistillConfig:
    teacher: str | None = opt(None, "The teacher: a finished run folder (runs/NAME) of task.type classification or verbalizer, with the "
                              "student's label names; any base and tokenizer (its logits come from the raw text of each row).")
    temperature: float = opt(2.0, "Softmax temperature T of the soft targets (teacher and student logits divided by T; the KL term "
                             "is scaled by T^2). Below 100: beyond it float32 rounding, times T^2, swamps the term.", gt=0, lt=100,
                             hint="typical: 1-4")
    alpha: float = opt(0.5, "Weight of the label loss: loss = alpha * CE(labels) + (1 - alpha) * T^2 * KL(teacher || student); "
                       "1 = labels only, 0 = soft targets only. In [0, 1].", ge=0, hint="in [0, 1]")
    unlabelled: SplitConfig | None = opt(None, "Optional extra rows without labels (a file, read as data.train is: "
                                         "data.text_columns or unlabelled.text_columns): they get the soft-target term only.")
    batch_size: int = opt(64, "Rows per batch of the teacher's pass (once, before training).", ge=1)
    cache: bool = opt(True, "Keep the teacher's logits by text in $PEFTLAB_CACHE/soft-targets (default ~/.cache/peftlab), one "
                      "file per teacher run and device: a later student of the same teacher runs it only on rows it has "
                      "not scored yet. false: always run it on every row.")


@dataclass
class SubTaskConfig:
    data: DataConfig = opt(DataConfig(), "This task's data: splits, columns and labels, as the top-level data section (which "
                           "gives the defaults: a key set there and not here is inherited, e.g. max_length).")
    metric: str = opt("accuracy", "The metric of this task that enters the mean that keep-best selects on.", ("accuracy", "f1"))


@dataclass
class MultiTaskConfig:
    tasks: dict[str, SubTaskConfig] = opt({}, "The tasks, by name (letters, digits, - _): each a classification with its own data, "
                                          "labels and head, e.g. {sst2: {data: {train: ..., eval: ...}}, mrpc: {...}}. Each exports "
                                          "to OUT/tasks/NAME, a run of its own (load_trained, load_adapters, peftlab eval). "
                                          "multitask.tasks.NAME=null leaves a task out.")
    adapters: str = opt("shared", "One adapter shared by every task (shared), or one per task (per_task); heads are always "
                        "per task.", ("shared", "per_task"))
    sampling: str = opt("temperature", "How each batch's task is drawn: proportional to the tasks' training rows, uniform, or "
                        "temperature (rows^(1/T): between the two; T5 and mT5's choice). Every batch holds one task's rows.",
                        ("proportional", "uniform", "temperature"))
    temperature: float = opt(2.0, "Sampling temperature T (sampling: temperature): 1 = proportional, larger = closer to uniform.",
                             ge=1, hint="typical: 2-5")


# Experiment trackers Accelerate drives (accelerate.tracking); accel.py says how each is installed and where it writes
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")
REPORT_TO = ("auto", "all", "none", *TRACKERS)


@dataclass
class TrainConfig:
    epochs: float = opt(1.0, "Passes over the train split (fractions allowed); ignored when max_steps is set.", gt=0)
    max_steps: int | None = opt(None, "Stop after this many optimizer steps; 0 = train nothing: the base is evaluated (zero-shot) "
                                "and exported as it is.", ge=0)
    batch_size: int = opt(32, "Examples per device per micro-batch.", ge=1)
    group_by_length: bool = opt(True, "Batch rows of similar length together (shuffled megabatches), so dynamic padding "
                                "wastes little: on SST-2 at batch 32, padded tokens 1.05x the real ones instead of 3.3x. false = plain shuffling.")
    grad_accum: int = opt(1, "Micro-batches per optimizer step (effective batch = batch_size x grad_accum x processes).", ge=1)
    lr: float = opt(5e-4, "Peak learning rate of AdamW.", gt=0, hint="LoRA: ~1e-4 to 1e-3; full fine-tuning: ~2e-5")
    weight_decay: float = opt(0.01, "AdamW weight decay (not applied to biases and norms).", ge=0)
    scheduler: str = opt("linear", "Learning-rate schedule after warmup.", ("linear", "cosine", "constant"))
    warmup_fraction: float = opt(0.06, "Fraction of the optimizer steps spent warming up linearly, in [0, 1).", ge=0, lt=1)
    max_grad_norm: float | None = opt(1.0, "Clip the gradient norm to this value; null = no clipping.", gt=0)
    precision: str = opt("auto", "Matmul precision: auto = bf16 where the hardware runs it fast, else fp32.", ("auto", "fp32", "bf16", "fp16"))
    optimizer_impl: str = opt("auto", "AdamW kernel: auto = fused where torch has a fused AdamW for the parameters' device "
                              "(CPU, CUDA, ...; on CPU 3-6x faster than foreach: 13 vs 72 ms a step for MiniLM's 22.7M "
                              "weights), else foreach; foreach (batched tensor ops), fused (one kernel per step) or loop (one "
                              "parameter at a time, the slowest).", ("auto", "foreach", "fused", "loop"))
    dropout_impl: str = opt("fast", "Dropout on CPU: fast = masks from 16 random bits per element, drawn 64 at a time from the "
                            "seeded generator (~3x cheaper than torch's per-element bernoulli_; keep probability exact to "
                            "1/65536), kept for the backward pass as 1 byte per element where torch's CPU dropout keeps a "
                            "float32 copy; for p < 0.15 only the dropped positions are drawn (geometric gaps: 1.4-3x cheaper "
                            "again at p = 0.05, 4p bytes per element kept); also for attention probabilities (sdpa "
                            "attention has no fused CPU kernel with dropout); torch = nn.Dropout and sdpa as they are. GPUs "
                            "use torch's kernels.",
                            ("fast", "torch"))
    packed_attention: str = opt("per_example", "Attention over packed SFT rows in CPU training (with dropout_impl: fast; "
                                "attention dropout 0): per_example = each example attended alone, the cross-example "
                                "blocks never computed, its probabilities kept (in the compute dtype) for the backward pass: 1.20x a "
                                "SmolLM2 SFT step; masked = sdpa over each row's block-diagonal mask (benchmarks/README.md, "
                                "stop 49).",
                                ("masked", "per_example"))
    lora_impl: str = opt("fused", "LoRA linear layers in CPU training: fused = base, dropout and adapter in one autograd "
                         "function (the adapter added inside the base's GEMM, its scaling and dropout folded into passes "
                         "the layer makes anyway: 1.17x a SmolLM2 SFT step, benchmarks/README.md stop 52); peft = peft's "
                         "forward as it is. Only plain LoRA with one active adapter on a frozen nn.Linear or bitsandbytes 4-bit "
                         "base (QLoRA: the packed weight dequantized for each product, as bitsandbytes does; 1.10x its "
                         "forward and backward passes) is fused; evaluation, generation, GPUs, DoRA and 8-bit bases always use peft's.",
                         ("fused", "peft"))
    skip_unread: bool = opt(True, "Skip work whose result the task's head never reads: a BERT-family classifier's last layer "
                            "computes the query, attention output and feed-forward block at position 0 only (its head "
                            "reads nothing else; keys and values still come from every position). The same logits and "
                            "gradients (in training: without dropout; with it, the masks drawn differ), 1/8 less matmul work a "
                            "step for all-MiniLM-L6-v2 (1.13x); other models are left as they are.")
    cast_frozen: bool = opt(True, "Under bf16/fp16 autocast, cast the frozen base's linear weights to that dtype once when "
                            "training starts (and back when it ends), not at every forward: autocast re-casts a weight that "
                            "needs no gradient at each call. Also in evaluations, `peftlab select`'s features and a "
                            "distillation teacher's pass. The same numbers; the cast copies are held beside the fp32 "
                            "weights meanwhile (+50% of those weights' memory). On an AMX CPU: 1.06x a MiniLM LoRA step, "
                            "1.23x SmolLM2's generation on an fp32 base. Left alone: DoRA's bases (DoRA reads them "
                            "itself), tied heads, FSDP and DeepSpeed.")
    compile: bool = opt(False, "torch.compile the model (dynamic shapes). Pays on long runs with a GPU or a C++ compiler; "
                        "the first steps are slow while it compiles.")
    gradient_checkpointing: bool = opt(False, "Recompute activations in the backward pass (less memory, ~30% slower).")
    release_memory: str = opt("auto", "CPU with glibc: allocations of 4 MiB and more get memory maps of their own, given back to "
                              "the system when freed, instead of heap blocks glibc keeps (where a quantized base's per-matmul "
                              "weight copies fragment the heap: 0.73B QLoRA peak RSS 0.75x; each new block is faulted in, so "
                              "steps take ~1.13x as long with bf16 dequantization, ~1.6x with quant.compute_dtype=float32). "
                              "For the rest of the process. auto = when a quantized layer's weight copy is 4 MiB or more (at "
                              "SmolLM2-135M's size it is not: there it would map only activations, 0.83x the peak at 1.76x the "
                              "step time); always; never.", ("auto", "always", "never"))
    eval_every: int | None = opt(None, "Evaluate every N optimizer steps (and at the end); null = only at the end.", ge=1)
    keep_best: bool = opt(True, "Export the weights of the best evaluation, not the last step.")
    early_stopping: int | None = opt(None, "Stop training once train.best_metric has not improved for this many evaluations in a "
                                     "row (train.eval_every); with keep_best the best evaluation's weights are exported. null = "
                                     "train every step.", ge=1)
    best_metric: str | None = opt(None, "Metric that decides `keep_best` (higher is better, except names ending in 'loss' or "
                                  "'perplexity'); null = "
                                  "the task's default (classification: accuracy, summarization: loss).")
    log_every: int = opt(20, "Log loss, learning rate and throughput every N optimizer steps.", ge=1)
    report_to: list[str] = opt(["auto"], "Experiment trackers that also get the resolved recipe and the metrics of OUT/log.jsonl "
                               "(always written), at the same steps: auto = tensorboard when installed, none, all = every "
                               "installed one, or names: " + ", ".join(TRACKERS) + ". They write inside the run folder "
                               "(OUT/tb, OUT/wandb, OUT/mlruns, ...) unless their own environment says where (WANDB_DIR, "
                               "MLFLOW_TRACKING_URI, ...).", REPORT_TO)
    save_every: int | None = opt(None, "Write a resumable checkpoint every N optimizer steps; null = none.", ge=1)
    keep_checkpoints: int = opt(2, "How many checkpoints to keep (oldest are deleted).", ge=1)
    seed: int = opt(42, "Seed for initialisation, shuffling and dropout.", ge=0, lt=2**32, hint="the range numpy's and torch's seeds take")
    distill: DistillConfig | None = opt(None, "Knowledge distillation from a finished run (the teacher): {teacher: runs/X, "
                                        "temperature: T, alpha: a}. Its logits are computed once before training and cached "
                                        "with the rows; null = labels only.")

    def __setattr__(self, name: str, value) -> None:
        if name == "best_metric":  # set (from Python too): a choice, no longer the default Recipe resolved for its task
            self.__dict__.pop("_default_for", None)
        super().__setattr__(name, value)


@dataclass
class EvalConfig:
    batch_size: int = opt(128, "Examples per evaluation batch (no gradients, so larger than training).", ge=1)
    num_beams: int = opt(1, "Summarization: beams of the beam search that generates (1 = greedy).", ge=1, hint="1 = greedy decoding")
    max_new_tokens: int = opt(64, "Summarization and SFT: most tokens generated per summary or answer.", ge=1)
    length_penalty: float = opt(1.0, "Summarization, beam search: exponent on the length a beam's score is divided by (>1 favours longer).")
    no_repeat_ngram_size: int = opt(0, "Summarization: never generate an n-gram of this size twice within a summary (0 = off; a decoder's prompt "
                                   "does not count: the summary may copy the dialogue's phrases).", ge=0, hint="0 = off")
    log_examples: int = opt(3, "Summarization and SFT: log this many (source or prompt, prediction, reference) examples after "
                            "generating.", ge=0)
    metric_fn: str | None = opt(None, "SFT: a function 'module:function' taking (predictions, references) -> {metric: value}, "
                                "scored on the generated answers besides exact_match and ROUGE (its metrics may be train.best_metric).")
    merge_adapter: bool = opt(True, "Every evaluation (during training, after it, `peftlab eval`): fold a mergeable adapter (LoRA, "
                              "DoRA, IA3, ...) into copies of its fp32 base weights while scoring, then put the originals back: "
                              "the same model, faster (no separate adapter pass per layer), and under bf16 autocast faithful "
                              "(unfolded, bf16 rounds much of a young adapter's output away: SmolLM2 after one step, loss 1.64 "
                              "unfolded, 1.18 folded, 1.14 fp32). bf16 or quantized bases (they would round the update away) "
                              "and sharded models are scored unfolded. false: score the adapter unfolded.")


@dataclass
class ExportConfig:
    merge: bool = opt(False, "After training, also write OUT/merged: a standalone model with the adapter folded in.")


@dataclass
class Recipe:
    name: str = opt("run", "Run name, used in the default output directory and the model card.")
    output_dir: str | None = opt(None, "Where artifacts go; null = runs/<name>.")
    model: ModelConfig = opt(ModelConfig(), "Base model.")
    quant: QuantConfig = opt(QuantConfig(), "Quantization of the base.")
    adapter: AdapterConfig = opt(AdapterConfig(), "Adaptation method.")
    data: DataConfig = opt(DataConfig(), "Dataset, columns and splits.")
    task: TaskConfig = opt(TaskConfig(), "Task family.")
    train: TrainConfig = opt(TrainConfig(), "Optimisation.")
    eval: EvalConfig = opt(EvalConfig(), "Evaluation.")
    export: ExportConfig = opt(ExportConfig(), "Export and merge.")
    multitask: MultiTaskConfig | None = opt(None, "Several classification tasks in one model (task.type: multitask): one base, "
                                            "a head per task, shared or per-task adapters; null = one task.")

    def __post_init__(self):
        if given := [f.name for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), Mapping)]:
            # Recipe(**yaml.safe_load(f)): the sections are plain mappings (an AttributeError on train.best_metric below)
            raise ConfigError([f"Recipe({', '.join(f'{g}={{...}}' for g in given)}): a section given as a mapping. Recipe(...) takes "
                               "the sections as their dataclasses (TrainConfig(...), DataConfig(...)); for the tree of plain values "
                               "a YAML file gives, use load_recipe(tree), which also checks it."], what="argument")
        if self.train.best_metric is None:  # resolved here, so the written recipe.yaml names the metric used
            self.train.best_metric = default_best_metric(self.task.type)
            self.train._default_for = self.task.type  # (checked: a task.type changed since gets its own default)

    @property
    def out(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")

    @property
    def data_seed(self) -> int:
        """The seed that picks the rows (subsets, held-out splits): data.seed, else train.seed."""
        return self.train.seed if self.data.seed is None else self.data.seed

    def train_rows(self) -> str | None:
        """What the run trained on, in words: the train split's file (or hub split), its sample, its held-out part."""
        d, spec = self.data, self.data.train
        if spec is None:
            return None
        rows = spec.path or f"{d.dataset}:{spec.split}"
        if spec.max_samples:
            rows += f" (at most {spec.max_samples} rows, a seeded sample: seed {self.data_seed})"
        if d.eval is None and d.eval_holdout > 0:
            rows += f", less {d.eval_holdout:.0%} held out for evaluation"
        return rows

    def to_dict(self) -> dict:
        """Plain values, as YAML holds them: a path set from Python (`recipe.output_dir = Path(...)`) is its text."""
        return dataclasses.asdict(self, dict_factory=lambda items: {k: str(v) if isinstance(v, PurePath) else v for k, v in items})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------------------------- loading

@functools.cache  # (read only) resolving a dataclass's string annotations was half of each check of a recipe
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp, where: str, problems: list[str]) -> Any:
    """Check `value` against annotation `tp`; return the converted value (or the raw one after noting a problem)."""
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if not optional:
            give = "it as a section (a mapping of its keys), or leave it out for its defaults" if dataclasses.is_dataclass(inner) \
                else f"a {_type_name(inner)}"
            problems.append(f"{where}: null is not allowed; give {give}.")
        return value
    if dataclasses.is_dataclass(inner):
        first = dataclasses.fields(inner)[0].name
        if isinstance(value, str) and first == "path":  # shorthand: `train: data.tsv` means {path: data.tsv}
            value = {"path": value}
        if not isinstance(value, dict):
            example = f" Write it as a section: `{where}: {{{first}: {value}}}` ({where}.{first}={value} on the command line)." \
                if isinstance(value, (str, int, float)) and not isinstance(value, bool) else ""
            problems.append(f"{where}: expected a section (a mapping of its keys), got {value!r}.{example}")
            return value
        return _build(inner, value, where, problems)
    origin = typing.get_origin(inner)
    if origin is list:
        if isinstance(value, str):
            value = [value]  # one name is shorthand for a one-element list
        if isinstance(value, tuple):  # (set from Python)
            value = list(value)
        if isinstance(value, list):  # an integer is its text: label_names [1, 2, 3, 4, 5] (star ratings) are "1" ... "5"
            value = [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            quote = " Quote the values meant as text, e.g. ['0.5', '1.0']." if isinstance(value, list) and any(
                isinstance(v, float) for v in value) else ""
            problems.append(f"{where}: expected a list of strings, got {value!r}.{_bool_hint(value)}{quote}")
        return value
    if inner is dict or origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {value!r}.")
            return value
        item = typing.get_args(inner)[1] if origin is dict else None
        if item is not None and dataclasses.is_dataclass(item):  # a mapping of sections (multitask.tasks)
            # a section set to null is left out (multitask.tasks.NAME=null drops a task of a shipped recipe)
            return {k: _coerce(v, item, f"{where}.{k}", problems) for k, v in value.items() if v is not None}
        return value
    if inner is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if inner is float and isinstance(value, str):  # YAML reads 1e-4 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if inner in (int, float, bool, str) and not (isinstance(value, inner) and not (inner is int and isinstance(value, bool))):
        # a text field given a number or a date (`name: 2024-05-01`, YAML's date): as written, and quoted, it is text
        quote = f" Quote it to make it text: {where.rpartition('.')[2]}: '{value}'." if inner is str and isinstance(
            value, (int, float, datetime.date)) and not isinstance(value, bool) else ""
        problems.append(f"{where}: expected {_type_name(inner)}, got {type(value).__name__} "
                        f"{value if isinstance(value, datetime.date) else repr(value)}.{_bool_hint(value) if inner is not bool else ''}{quote}")
    return value


def _bool_hint(value) -> str:
    """YAML 1.1 reads yes/no/on/off (any case) as booleans: say so where a bool came in place of text."""
    values = value if isinstance(value, list) else [value]
    if not any(isinstance(v, bool) for v in values):
        return ""
    return " YAML reads yes/no/on/off/true/false as booleans: quote the words you mean as text, e.g. [\"no\", \"yes\"]."


class _KeyGivenTwice(yaml.constructor.ConstructorError):
    """A mapping names a key twice (its fix is to keep one, not the indentation and quoting advice of a syntax error)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, refusing a key given twice in one mapping (YAML would keep the last one silently)."""

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError) as e:  # a tag's own constructor (`!!float x`, `!!timestamp 2020-13-45`): a traceback
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            raise yaml.constructor.ConstructorError(None, None, f"{node.value!r} is not a valid {tag} ({e}). Fix the value, or "
                                                    f"drop the {tag} tag", node.start_mark) from None

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: its keys may be set again here (that is its
                continue  # point); flatten_mapping (in SafeConstructor's construct_mapping) merges them
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):  # (`? [a]` or `{a: 1}: 2`: `key in seen` was a TypeError and a traceback)
                raise yaml.constructor.ConstructorError(None, None, f"a key is a {type(key).__name__}, not a name. Write "
                                                        "each key as a plain name, e.g. `lr: 1e-4`", key_node.start_mark)
            if key in seen:
                raise _KeyGivenTwice(None, None, f"the key '{key}' is given twice (lines {seen[key] + 1} and "
                                                 f"{key_node.start_mark.line + 1}); only the last would count. Keep one",
                                     key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def key_hint(key, names: list[str]) -> str:
    """An unknown key's did-you-mean (a file's, an override's, an attribute set from Python), else the valid keys."""
    close = difflib.get_close_matches(str(key), names, n=1)
    return f" Did you mean '{close[0]}'?" if close else f" Valid keys: {', '.join(names)}."


def _build(cls, data: dict, prefix: str, problems: list[str]):
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            problems.append(f"{where}: unknown key.{key_hint(key, names)}")
            continue
        before = len(problems)
        coerced = _coerce(value, hints[key], where, problems)
        sections = isinstance(coerced, dict) and {k: v for k, v in coerced.items() if dataclasses.is_dataclass(v)}  # multitask.tasks
        if len(problems) == before or dataclasses.is_dataclass(coerced):  # a rejected leaf keeps its default, so
            # check_rules() can still check the rest (a section is kept: its own bad leaves were already dropped)
            kwargs[key] = coerced
        elif sections:  # (one task's bad leaf dropped them all: a false 'names 0 task(s)' followed)
            kwargs[key] = sections
    try:
        return cls(**kwargs)
    except TypeError as e:  # only reachable with wrong shapes already reported above
        problems.append(f"{prefix or 'recipe'}: {e}")
        return cls()


def _set_dotted(tree: dict, dotted: str, value: Any, problems: list[str]) -> None:
    keys = dotted.split(".")
    node = tree
    for i, k in enumerate(keys[:-1]):
        nxt, where = node.get(k), ".".join(keys[: i + 1])
        tp = field_type(where)  # (None: no field; its unknown key is said once the tree is read)
        section = tp is None or dataclasses.is_dataclass(tp) or tp is dict or typing.get_origin(tp) is dict
        if isinstance(nxt, str) and dataclasses.is_dataclass(tp) and dataclasses.fields(tp)[0].name == "path":
            nxt = node[k] = {"path": nxt}  # a split given as a path shorthand
        elif nxt is None and section:  # an absent section
            nxt = node[k] = {}
        if not section or not isinstance(nxt, dict):
            problems.append(f"override {dotted}: {where} is not a section.")
            return
        node = nxt
    parent = field_type(".".join(keys[:-1])) if len(keys) > 1 else None
    if value is None and keys[-1] not in node and typing.get_origin(parent) is dict:  # multitask.tasks.NAME=null drops NAME
        problems.append(f"override {dotted}=null: there is no {keys[-1]!r} in {'.'.join(keys[:-1])} to drop; it has "
                        f"{', '.join(map(str, node)) or 'none'}. Check the spelling.")
        return
    node[keys[-1]] = value


def field_type(dotted: str):
    """The annotation (Optional unwrapped) of a dotted recipe key, or None where it names no field."""
    tp: Any = Recipe
    for key in dotted.split("."):
        if dataclasses.is_dataclass(tp):
            tp = _hints(tp).get(key)
        elif typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
            tp = typing.get_args(tp)[1]  # multitask.tasks.NAME
        else:
            return None
        tp = _unwrap_optional(tp)[0] if tp is not None else None
    return tp


def _yaml_str(raw: str) -> str:
    try:
        value = yaml.load(raw, Loader=_UniqueKeyLoader)
    except yaml.YAMLError:
        return raw
    return value if isinstance(value, str) else raw


def parse_overrides(overrides: list[str], problems: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        if not isinstance(item, str):  # (from Python: an int or None had no .partition)
            problems.append(f"override {item!r}: expected a KEY=VALUE string, e.g. train.lr=1e-4.")
            continue
        key, sep, raw = item.partition("=")
        if not sep or not key:
            problems.append(f"override '{item}': expected KEY=VALUE, e.g. train.lr=1e-4.")
            continue
        if field_type(key.strip()) is str and raw.strip() not in ("", "null", "~"):  # a text field: YAML's reading if
            out.append((key.strip(), _yaml_str(raw)))  # it is a string, else the text as written ('Summary: {source}', 123)
            continue
        try:
            value = yaml.load(raw, Loader=_UniqueKeyLoader) if raw != "" else None  # (as a file's values are read)
        except yaml.YAMLError:
            if raw.lstrip().startswith(("[", "{")):  # meant as a list or mapping: taken as a string it fails much later
                problems.append(f"override '{item}': {raw!r} is not a valid YAML list or mapping. Write it whole, e.g. "
                                f"{key.strip()}=[a,b] (quote it for the shell: '{key.strip()}=[a, b]').")
                continue
            value = raw
        out.append((key.strip(), value))
    return out


def override_list(overrides, source: str | None = None) -> list[str]:
    """Recipe overrides as every reader takes them (load_recipe, evaluate, merge) -> a list of KEY=VALUE strings: a list
    (or tuple) of them; one string, one override (list("train.epochs=1") would be 14 one-character ones); None, none; a
    mapping {KEY: value}, each value as the Python value it is (written as JSON, which YAML reads back: 1e-4, [a, b],
    None as null). Anything else is one ConfigError saying what is taken."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        return [overrides]
    if isinstance(overrides, Mapping):
        return [f"{k}={json.dumps(v, default=str)}" for k, v in overrides.items()]
    if not isinstance(overrides, (list, tuple)):  # (an int, a set) was a TypeError from deep inside
        raise ConfigError([f"overrides={overrides!r}: expected a list of KEY=VALUE strings, e.g. ['train.lr=1e-4', 'train.epochs=1'], "
                           "or a mapping, e.g. {'train.lr': 1e-4}."], source)
    return list(overrides)


def load_recipe(path: str | Path | Mapping | None = None, overrides: list[str] | tuple | str | Mapping = (), *,
                validate_files: bool = True) -> Recipe:
    """Read a YAML recipe (None = the defaults of every field, which name no data: give data.train among the overrides;
    `peftlab train` without a recipe reads peftlab/recipes/quickstart.yaml), apply dotted overrides, type-check and validate.

    `path` may also be the recipe's tree itself, a mapping of sections as a YAML file gives it ({"model": {"name":
    ...}, "data": {...}}): read the same way (a copy; the overrides applied to it). `overrides`: a list of KEY=VALUE
    strings; a single string is one override (as `text_columns: sentence` is a one-item list), None none; a mapping
    {KEY: value} sets each KEY to its Python value. Raises ConfigError listing every problem found.
    """
    problems: list[str] = []
    if path is not None and not isinstance(path, (str, PurePath, Mapping)):  # (a bytes path, an int, a Recipe)
        what = " (a Recipe is already loaded: give it to run(), or change it and run() checks it)" if isinstance(path, Recipe) else ""
        raise ConfigError([f"load_recipe({type(path).__name__} {path!r:.80}): give the path of a YAML recipe (str or Path), the "
                           f"recipe's tree as a mapping, or None for the defaults{what}."], what="argument")
    source = None if isinstance(path, Mapping) else str(path) if path else "the default recipe"
    overrides = override_list(overrides, source)
    tree: dict = {}
    if isinstance(path, Mapping):
        tree = copy.deepcopy(dict(path))  # (the caller's mapping stays as it was: overrides and inheritance write the tree)
    elif path is not None:
        p = Path(path)
        if p.is_dir():
            inside = sorted(str(f) for f in p.glob("*.y*ml"))
            example = f" (it holds {len(inside)}: {', '.join(inside[:3])}{' ...' if len(inside) > 3 else ''})" if inside else ""
            raise ConfigError([f"recipe path '{path}' is a directory, not a recipe file. Pass a YAML file{example}."])
        if not p.is_file():
            raise ConfigError([f"recipe file '{path}' does not exist. List the shipped ones with `ls recipes/*/`."])
        try:
            tree = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            loc = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            advice = "" if isinstance(e, _KeyGivenTwice) else " Check indentation and quoting."
            raise ConfigError([f"malformed YAML{loc}: {getattr(e, 'problem', e)}.{advice}"], source) from None
        except UnicodeDecodeError:
            raise ConfigError([f"'{path}' is not UTF-8 text. Save the recipe as UTF-8."], source) from None
        if not isinstance(tree, dict):
            raise ConfigError([f"the top level must be a mapping of sections (model:, data:, ...), got {type(tree).__name__}."], source)
    for key, value in parse_overrides(list(overrides), problems):
        _set_dotted(tree, key, value, problems)
    return _from_tree(tree, problems, source, validate_files)


def _from_tree(tree: dict, problems: list[str], source: str | None, validate_files: bool) -> Recipe:
    """What follows the tree of plain values, for a file (`load_recipe`) and a Recipe changed in Python (`checked`)
    alike: the tasks' data inherited from the top-level section, the base of model.from_run, the build and its checks;
    which of a task's data keys were inherited is remembered, so a Python edit of the shared key reaches the task."""
    own = {name: set(task["data"]) if isinstance(task.get("data"), dict) else None for name, task in task_trees(tree).items()}
    inherit_task_data(tree)
    base_from_run(tree)
    recipe = _checked_build(tree, problems, source, validate_files)
    if recipe.multitask is not None and own:
        written = recipe.to_dict()["multitask"]["tasks"]
        for name, task in recipe.multitask.tasks.items():
            if own.get(name) is not None and name in written:
                task._inherited_data = {k: v for k, v in written[name]["data"].items() if k not in own[name]}
    return recipe


def task_trees(tree: dict) -> dict:
    """multitask.tasks of a tree of plain values ({} where there is none, or it is no mapping)."""
    multi = tree.get("multitask")
    tasks = multi.get("tasks") if isinstance(multi, dict) else None
    return {k: v for k, v in tasks.items() if isinstance(v, dict)} if isinstance(tasks, dict) else {}


def _checked_build(tree: dict, problems: list[str], source: str | None, validate_files: bool) -> Recipe:
    """The Recipe of a tree of plain values, its types checked (`_build`) and every rule (`validate`); raises
    ConfigError with these problems and those found before (`problems`)."""
    recipe = _build(Recipe, tree, "", problems)
    try:
        check_rules(recipe, check_files=validate_files, source=source)
    except ConfigError as e:
        problems.extend(e.problems)
    if problems:
        raise ConfigError(problems, source)
    return recipe


def checked(recipe: Recipe, *, validate_files: bool = True, source: str | None = None) -> Recipe:
    """A Recipe built or changed in Python, checked as `load_recipe` checks a file: read back from its plain values
    (`to_dict`: types checked, 1 -> 1.0 for a float, a Path -> its text), then every rule -> that new Recipe. `run`
    calls it, so `recipe.train.lr = -1; run(recipe)` is one ConfigError rather than a traceback mid-training. An
    attribute no field declares (`recipe.train.lrr = 1e-5`: to_dict leaves it out, so it was dropped silently) is an
    unknown key, as in a file. A multi-task recipe's tasks inherit the top-level data keys again (`r.data.max_length =
    12` reaches every task that did not set its own, as in a file), the keys a task set itself or that were changed
    on the task since are its own; a task built in Python owns the keys it sets to other values than the defaults. A
    train.best_metric never set, the default of the task the recipe was read with, follows a task.type changed since."""
    tree = recipe.to_dict()
    drop_inherited(recipe, tree)
    default_for = getattr(recipe.train, "_default_for", None)
    if default_for is not None and default_for != getattr(recipe.task, "type", default_for):  # `r.task.type = "mlm"`, no metric chosen
        tree["train"]["best_metric"] = None
    return _from_tree(tree, unknown_attributes(recipe), source, validate_files)  # (no source: "invalid recipe:", not "... in the recipe:")


def drop_inherited(recipe: Recipe, tree: dict) -> None:
    """From `tree` (the plain values of `recipe`), each task's data keys that hold what they inherited when the recipe
    was read (a task built in Python: a DataConfig default), so `inherit_task_data` sets them from the top level again."""
    tasks = recipe.multitask.tasks if isinstance(recipe.multitask, MultiTaskConfig) and isinstance(recipe.multitask.tasks, dict) else {}
    defaults = dataclasses.asdict(DataConfig())
    for name, task in task_trees(tree).items():
        data = task.get("data")
        if not isinstance(data, dict):
            continue
        inherited = getattr(tasks.get(name), "_inherited_data", defaults)
        for key in [k for k in data if k not in ("train", "eval", "test")]:
            if key in inherited and data[key] == inherited[key]:
                del data[key]


def unknown_attributes(obj, prefix: str = "") -> list[str]:
    """The attributes set on a recipe's sections (from Python) that name no field, each with a did-you-mean."""
    names = [f.name for f in dataclasses.fields(obj)]
    problems = []
    for key, value in vars(obj).items():
        where = f"{prefix}{key}"
        if key.startswith("_"):  # peftlab's own bookkeeping (a task's _inherited_data), no recipe key
            continue
        if key not in names:
            problems.append(f"{where}: unknown key (an attribute set from Python; the recipe has no such field, so it would "
                            f"change nothing).{key_hint(key, names)}")
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            problems.extend(unknown_attributes(value, where + "."))
        elif isinstance(value, dict):  # multitask.tasks: a section per task
            problems.extend(p for k, v in value.items() if dataclasses.is_dataclass(v) for p in unknown_attributes(v, f"{where}.{k}."))
    return problems


def base_from_run(tree: dict) -> None:
    """model.from_run without model.name: the name is that run's base (so an explicit model.name, even the default's
    `minilm`, is compared with it, and the run's recipe.yaml names the base it holds)."""
    model = tree.get("model")
    if not isinstance(model, dict) or not model.get("from_run") or "name" in model:
        return
    try:
        record = json.loads((Path(str(model["from_run"])) / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # from_run_problems names it
    base = run_base(Path(str(model["from_run"])), record)
    if base:
        model["name"] = base


def run_base(run: Path, record) -> str | None:
    """The base a finished run was trained on: run.json's base_model, else (an older record) its recipe.yaml's model.name."""
    base = record.get("base_model") if isinstance(record, dict) else None
    if isinstance(base, str) and base:
        return base
    try:
        name = (yaml.safe_load((run / "recipe.yaml").read_text(encoding="utf-8")) or {}).get("model", {}).get("name")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return name if isinstance(name, str) and name else None


def base_key(name: str) -> str:
    """A model.name as compared: a local path by the folder it resolves to (two spellings of one folder agree, and a
    packaged name agrees with its installed folder), else as given."""
    if name in PACKAGED_MODELS:
        name = packaged_folder(name) or name  # (not installed: compared by its name)
    return str(Path(name).resolve()) if Path(name).exists() else name


def same_base(a: str, b: str) -> bool:
    """Two model.name values name one base: equal, or local paths to one folder."""
    return base_key(a) == base_key(b)


def inherit_task_data(tree: dict) -> None:
    """multitask.tasks.NAME.data starts from the top-level data section (its splits aside): max_length, text_columns, ...
    set once for every task, each task overriding what it sets itself."""
    tasks = (tree.get("multitask") or {}).get("tasks") if isinstance(tree.get("multitask"), dict) else None
    top = tree.get("data")
    if not isinstance(tasks, dict) or not isinstance(top, dict):
        return
    # (a key no data section has is not passed on: it is said once, as the top-level section's)
    known = {f.name for f in dataclasses.fields(DataConfig)}
    shared = {k: v for k, v in top.items() if k not in ("train", "eval", "test") and k in known}
    for task in tasks.values():
        if isinstance(task, dict) and isinstance(task.get("data", {}), dict):
            task["data"] = {**copy.deepcopy(shared), **task.get("data", {})}


# ---------------------------------------------------------------------------------------------- validation

def _walk(obj, prefix=""):
    """Yield (dotted_name, value, field, optional) for every leaf field."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _walk(value, name + ".")
        elif isinstance(value, dict) and value and all(dataclasses.is_dataclass(v) for v in value.values()):
            for key, section in value.items():  # multitask.tasks: each task's fields are checked like the top level's
                yield from _walk(section, f"{name}.{key}.")
        else:
            yield name, value, f, _unwrap_optional(hints[f.name])[1]


def _range_text(meta: dict) -> str | None:
    ge, gt, lt = meta.get("ge"), meta.get("gt"), meta.get("lt")
    low = f"[{ge}" if ge is not None else f"({gt}" if gt is not None else None
    if low and lt is not None:
        return f"in {low}, {lt})"
    if low:
        return f"{'>=' if ge is not None else '>'} {low[1:]}"
    return f"< {lt}" if lt is not None else None


def check_field(name: str, value: Any, f: dataclasses.Field, optional: bool) -> str | None:
    """The problem with one leaf value by its field metadata (choices, finiteness, range), or None."""
    meta = f.metadata
    choices = meta.get("choices")
    if callable(choices):  # a registry's names (task.type, adapter.method), read when checked: one registered later is allowed
        choices = choices()
    if choices and isinstance(value, list):  # a list field with choices (train.report_to): each item is one of them
        bad = next((v for v in value if v not in choices), None)
        return None if bad is None else check_field(name, bad, f, optional)
    if choices and value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return f"{name}={value!r}: must be one of {', '.join(map(str, choices))}.{hint}"
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None  # null, or a wrong type already reported by the loader
    if isinstance(value, float) and not math.isfinite(value):  # inf passes `> 0` and nan fails every test: name it
        example = f", e.g. {f.default}" if isinstance(f.default, (int, float)) else f" ({_range_text(meta)})" if _range_text(meta) else ""
        return f"{name}={value}: must be a finite number (inf and nan are refused); give a number{example}."
    if isinstance(value, int) and abs(value) > sys.maxsize:  # passed every range, then crashed in the loaders (islice)
        return f"{name}={value}: beyond a 64-bit integer ({sys.maxsize}); give a smaller number."
    ge, gt, lt = meta.get("ge"), meta.get("gt"), meta.get("lt")
    if (ge is not None and value < ge) or (gt is not None and value <= gt) or (lt is not None and value >= lt):
        extra = f" ({meta['hint']})" if meta.get("hint") else ""
        return f"{name}={value}: must be {_range_text(meta)}{' or null' if optional else ''}{extra}."
    return None


def unread_quant_options(q: QuantConfig) -> list[str]:
    """quant.quant_type, double_quant and compute_dtype set to other than their defaults where quant.mode does not read
    them (only 4-bit does): they changed nothing, silently. `validate` and `train` warn (a refusal would also lock out
    the runs whose saved recipe.yaml holds one: sst2-qlora.yaml with quant.mode=8bit keeps its compute_dtype)."""
    if q.mode not in ("none", "8bit"):  # (4bit reads them all; an unknown mode is its field's problem)
        return []
    default = QuantConfig()
    return [f"quant.{k}={_as_written(getattr(q, k))}" for k in ("quant_type", "double_quant", "compute_dtype") if getattr(q, k) != getattr(default, k)]


def unread_task_options(t: TaskConfig) -> list[str]:
    """task.* keys set to other than their defaults that the task does not read (its `options`: task.prompt on a
    classification head, task.label_eos on sft): they changed nothing, silently. `validate` and `train` warn."""
    reads, default = getattr(get_task(t.type), "options", ()), TaskConfig()
    return [f"task.{f.name}={_as_written(getattr(t, f.name), quote=True)}" for f in dataclasses.fields(t)
            if f.name != "type" and f.name not in reads and getattr(t, f.name) != getattr(default, f.name)]


def unread_label_options(recipe: Recipe) -> list[str]:
    """data.label_names and each split's label_map on a task that learns no labels (sft, summarization, clm, mlm): they
    changed nothing, silently (validate said ok). `validate` and `train` warn."""
    if recipe.multitask or recipe.task.type not in task_names() or get_task(recipe.task.type).target_kind == "label":
        return []
    d = recipe.data
    return ([f"data.label_names={d.label_names}"] if d.label_names else []) + [
        f"data.{n}.label_map={s.label_map}" for n in ("train", "eval", "test") if (s := getattr(d, n)) is not None and s.label_map]


def _as_written(value, quote: bool = False) -> str:
    """A value as YAML and overrides write it (true, not True); text quoted when `quote`."""
    return str(value).lower() if isinstance(value, bool) else repr(value) if quote else str(value)


def validate(recipe: Recipe | str | Path | Mapping, *, check_files: bool = True, source: str | None = None) -> None:
    """Raise ConfigError listing every problem in `recipe` (field, value, fix); return None if it is sound.

    `recipe`: a Recipe, checked as `run` checks it (`checked`: its values' types, attributes no field declares, a
    section given as a path, the tasks' inherited data), or a recipe file's path (or its tree, a mapping), read as
    `load_recipe` reads it: what
    validate passes, run accepts, and the other way round. `check_files=False` checks the recipe alone: the data it
    names (files, and that data.train is given) is not checked. (`peftlab validate` also reads the data's columns and
    the base: `run.check_data_and_base`.)"""
    if isinstance(recipe, Recipe):
        checked(recipe, validate_files=check_files, source=source)
    elif isinstance(recipe, (str, PurePath, Mapping)):
        load_recipe(recipe, validate_files=check_files)
    else:
        raise ConfigError([f"validate(recipe={type(recipe).__name__} {recipe!r:.80}): give a Recipe (load_recipe's), the "
                           "path of a YAML recipe or its tree as a mapping."], source, what="argument")


def recipe_argument(recipe, where: str) -> Recipe:
    """The Recipe a building block (build_model, load_splits, build_data, train, export) was given, checked again as
    `run` checks one (`checked`, its files left to the block that reads them: a bad value changed in Python, r.adapter.r
    = 0, is a ConfigError before any work, not a traceback deep in peft); the caller's own object is returned, so its
    in-place changes still apply. Anything else (a recipe file's path, which run() reads and these do not) is a
    ConfigError naming the argument and what it takes."""
    if isinstance(recipe, Recipe):
        checked(recipe, validate_files=False)  # (a few ms)
        return recipe
    first = f" Read it first: recipe = load_recipe({str(recipe)!r})." if isinstance(recipe, (str, PurePath)) else \
        " Read it first: recipe = load_recipe(tree)." if isinstance(recipe, Mapping) else ""
    raise ConfigError([f"{where}(recipe={type(recipe).__name__} {recipe!r:.80}): give a Recipe (load_recipe's).{first}"],
                      what="argument")


def check_rules(recipe: Recipe, *, check_files: bool = True, source: str | None = None) -> None:
    """Raise ConfigError listing every problem of a Recipe already built from checked values (`_checked_build`): each
    field's range and choices, and the rules between fields. `check_files=False`: the data it names is not checked."""
    p: list[str] = [msg for name, value, f, optional in _walk(recipe) if (msg := check_field(name, value, f, optional))]

    def need(cond: bool, msg: str) -> None:
        if not cond:
            p.append(msg)

    a, d = recipe.adapter, recipe.data
    need(bool(d.text_columns), "data.text_columns is empty: name the column(s) holding the text, e.g. [sentence].")
    report_to = recipe.train.report_to
    need(not isinstance(report_to, list) or len(report_to) <= 1 or not set(report_to) & {"auto", "all", "none"},
         f"train.report_to={report_to}: auto, all and none stand alone; give one of them, or a list of tracker names.")
    p.extend(label_name_problems(d, "data"))
    p.extend(task_problems(recipe))  # best metric, the task's own rules, the encoder-decoder warm start (tasks/)
    if a.method in method_names():  # (an unknown one is reported by its field's choices)
        p.extend(get_method(a.method).check(recipe))  # quantization support, options it does not read, its own rules (methods/)
    if isinstance(a.target_modules, list) and not a.target_modules:
        p.append("adapter.target_modules is an empty list: use null for the architecture's defaults.")
    name = recipe.name
    need(bool(name) and "/" not in name and "\\" not in name and name not in (".", ".."),
         f"name={name!r}: use a plain name (letters, digits, - _ .), it becomes a directory.")

    if check_files and recipe.model.from_run is not None:
        p.extend(from_run_problems(recipe))
    p.extend(inputs_in_output(recipe))
    if recipe.train.distill is not None:
        p.extend(distill_problems(recipe, check_files))
    multitask = recipe.multitask is not None
    need(not multitask or recipe.task.type == "multitask",
         f"multitask is set but task.type={recipe.task.type}: set task.type=multitask to train its tasks, or remove multitask.")
    need(not d.text_pair or recipe.task.type == "classification",
         f"data.text_pair=true with task.type={recipe.task.type}: sentence pairs are encoded for classification only. Join "
         "the columns instead (data.text_pair=false) or set task.type=classification.")
    need(not recipe.train.early_stopping or bool(recipe.train.eval_every),
         f"train.early_stopping={recipe.train.early_stopping} needs evaluations during training: set train.eval_every (e.g. "
         "train.eval_every=100), or train.early_stopping=null.")
    tasks = recipe.multitask.tasks if multitask and isinstance(recipe.multitask.tasks, dict) else {}
    key = "multitask.tasks.NAME.data" if tasks else "data"  # (a multi-task recipe's tasks are evaluated all or none)
    need(not recipe.train.early_stopping or any(x.eval is not None or bool(x.eval_holdout) for x in [t.data for t in tasks.values()] or [d]),
         f"train.early_stopping={recipe.train.early_stopping} needs an evaluation split to watch, and there is none: give one "
         f"({key}.eval.path=FILE, or {key}.eval_holdout=0.1 of train), or train.early_stopping=null.")  # (it never stopped)
    sections = [("data", d), *((f"multitask.tasks.{k}.data", t.data) for k, t in (recipe.multitask.tasks.items() if multitask else ()))]
    for where, spec in ((f"{sec}.{name}", getattr(sd, name)) for sec, sd in sections for name in ("train", "eval", "test")):
        if spec is None or spec.references_column is None:
            continue
        if recipe.task.type not in ("summarization", "sft"):
            p.append(f"{where}.references_column is set with task.type={recipe.task.type}: several references score "
                     "generated text (task.type=summarization or sft). Remove it.")
        elif where.endswith(".train"):
            p.append(f"{where}.references_column={spec.references_column!r}: several references score generated text on an "
                     "eval or test split; training learns one target (data.target_column). Move it to data.eval or data.test.")
    need(not d.text_pair or recipe.train.distill is None,
         "data.text_pair=true with train.distill: the teacher scores one text per row. Distil a single-text task, or drop "
         "train.distill.")
    labelled = recipe.task.type in task_names() and get_task(recipe.task.type).target_kind == "label"
    if not multitask:
        p.extend(data_problems(d, "data", check_files, labelled))
    for key, sub in (recipe.multitask.tasks.items() if multitask else ()):
        if sub.data.label_names != d.label_names:  # (inherited ones are the top-level data's problem, said once above)
            p.extend(label_name_problems(sub.data, f"multitask.tasks.{key}.data"))
        p.extend(data_problems(sub.data, f"multitask.tasks.{key}.data", check_files, labelled))
    if p:
        raise ConfigError(p, source)


def label_name_problems(d: DataConfig, prefix: str) -> list[str]:
    """A section's label_names: >= 2, distinct. A multitask task's were not checked: `validate` passed them, and `train`
    refused them late, naming data.label_names, a key the recipe did not set."""
    names = d.label_names
    if names is None:
        return []
    return ([f"{prefix}.label_names={names}: a classifier needs >= 2 labels."] if len(names) < 2 else []) + \
        ([f"{prefix}.label_names={names}: names must be distinct."] if len(set(names)) != len(names) else [])


def data_problems(d: DataConfig, prefix: str, check_files: bool, labelled: bool = False) -> list[str]:
    """The rules of one data section (the recipe's, or one multitask task's): each split a file or a hub split, files
    present; a sentence pair names two columns; a task that learns labels (`labelled`) does not read its label as text."""
    p = [*label_in_text(d, prefix), *label_map_targets(d, prefix)] if labelled else []
    # the section's columns, and each split's own (which replace them: 3 columns were paired wrongly, 1 a pyarrow traceback)
    for key, columns in [(prefix, d.text_columns), *((f"{prefix}.{n}", s.text_columns) for n in ("train", "eval", "test")
                                                      if (s := getattr(d, n)) is not None and s.text_columns)]:
        if d.text_pair and len(columns) != 2:
            p.append(f"{prefix}.text_pair=true with {key}.text_columns={columns}: a pair is two columns, e.g. "
                     f"{key}.text_columns=[sentence1, sentence2].")
    if check_files and d.train is None:
        p.append(f"{prefix}.train is not set: name the training file, e.g. {prefix}.train.path=train.csv (or "
                 f"{prefix}.train.split=train with data.dataset). No split has a default.")
    for split_name in ("train", "eval", "test"):
        s = getattr(d, split_name)
        where = f"{prefix}.{split_name}"
        if s is None:
            continue
        if (s.path is None) == (s.split is None):
            p.append(f"{where}: give exactly one of `path:` (a local file) or `split:` (a hub split with data.dataset).")
        if s.split is not None and d.dataset is None:
            p.append(f"{where}.split={s.split!r} needs data.dataset (a hub dataset id), or use `path:` for a local file.")
        fmt = s.format if s.format != "auto" else FORMATS.get(Path(s.path or "").suffix.lower())
        if s.column_names and fmt not in ("csv", "tsv"):  # (it was ignored without a word)
            p.append(f"{where}.column_names names the columns of a header-less csv/tsv file; {s.path or s.split!r} names its own "
                     f"(JSON keys, parquet or hub columns). Remove it; to read other names, set {where}.text_columns / label_column.")
        if check_files and s.path is not None and Path(s.path).is_dir():
            p.append(f"{where}.path={s.path!r} is a folder; a split is one data file (.csv, .tsv, .json, .jsonl, .parquet). "
                     f"Point it at the file: {where}.path=FOLDER/FILE.")
        elif check_files and s.path is not None and not Path(s.path).is_file():
            hint = " (the shared data lives in ../shared/data; run from the repository root)" if "shared" in s.path else ""
            p.append(f"{where}.path={s.path!r}: file not found{hint}. Fix the path or override it: {where}.path=FILE.")
    return p


def class_index(v) -> int | None:
    """1, 1.0, "1", " 1.0 " -> 1; anything else -> None: names, 1.5, booleans, and codes with a leading zero ("01": a
    name, not the number 1)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return int(v) if v.is_integer() else None
    m = re.fullmatch(r"\s*(-?(?:0|[1-9]\d*))(?:\.0+)?\s*", str(v))
    return int(m.group(1)) if m else None


def spelled(v) -> str:
    """A label value as its class is spelled: 1, 1.0 and "1.0" are "1"; any other value as it is written, but for the
    spaces around it (" neg" is "neg": it went past label_map, and became a class of its own)."""
    i = class_index(v)
    return str(i) if i is not None else str(v).strip()


def label_indexer(label_names: list[str]) -> Callable[[Any], int | None]:
    """-> value -> its class index among `label_names`, or None: looked up as a name first (as written, then as its class
    is spelled: 1, 1.0 and "1" all spell the name "1"), else read as a class index, but only where no name is spelled
    as an integer (data.encode_labels; validate's label_map check reads values the same way)."""
    index = {**{spelled(name): i for i, name in enumerate(label_names)}, **{name: i for i, name in enumerate(label_names)}}
    numeric_names = [n for n in label_names if class_index(n) is not None]

    def to_index(v) -> int | None:
        for key in (str(v).strip(), spelled(v)):
            if key in index:
                return index[key]
        i = class_index(v)
        return i if i is not None and not numeric_names and 0 <= i < len(label_names) else None

    return to_index


def label_map_targets(d: DataConfig, prefix: str) -> list[str]:
    """With data.label_names, each split's label_map values are among them: a name, or a class index (where no name is
    spelled as an integer), as data.encode_labels reads them (`label_indexer`). Training refused any other only after
    reading the files."""
    if not d.label_names:
        return []
    to_index, indices = label_indexer(list(d.label_names)), not any(class_index(n) is not None for n in d.label_names)
    p = []
    for name in ("train", "eval", "test"):
        spec = getattr(d, name)
        if spec is None or not isinstance(spec.label_map, dict):
            continue
        if bad := [v for v in spec.label_map.values() if to_index(v) is None]:
            index = f" or a class index 0..{len(d.label_names) - 1}" if indices else ""
            p.append(f"{prefix}.{name}.label_map maps to {sorted(set(map(str, bad)))[:10]}, which {prefix}.label_names="
                     f"{list(d.label_names)} does not name: each value must be one of those names{index}. Fix the map's values, "
                     f"or add the classes to {prefix}.label_names.")
    return p


def label_in_text(d: DataConfig, prefix: str) -> list[str]:
    """The label column among the text columns, for the section's columns and for each split that names its own."""
    p = []
    for name in ("", "train", "eval", "test"):
        spec = getattr(d, name) if name else None
        if name and (spec is None or not (spec.text_columns or spec.label_column)):
            continue  # (a split that sets neither reads the section's columns: checked once)
        own = f"{prefix}.{name}" if name else prefix
        text_key, text = (own, spec.text_columns) if spec and spec.text_columns else (prefix, d.text_columns)
        label_key, label = (own, spec.label_column) if spec and spec.label_column else (prefix, d.label_column)
        if isinstance(text, list) and label in text:
            p.append(f"{label_key}.label_column={label!r} is also one of {text_key}.text_columns={text}: the label would be part "
                     "of the input text, and the model would learn to copy it (near-perfect scores that mean nothing). Take it "
                     f"out of {text_key}.text_columns, or point {label_key}.label_column at the column that holds the label.")
    return p


def inputs_in_output(recipe: Recipe) -> list[str]:
    """A run this recipe reads (model.from_run, train.distill.teacher) must not be its own output directory or inside
    it: an --overwrite would replace what it starts from (and what other runs were trained on)."""
    p = []
    for key, value in (("model.from_run", recipe.model.from_run), ("train.distill.teacher", recipe.train.distill and recipe.train.distill.teacher)):
        try:
            inside = bool(value) and (recipe.out.resolve() == Path(value).resolve() or recipe.out.resolve() in Path(value).resolve().parents)
        except (OSError, ValueError):  # a path the OS cannot hold (a NUL byte): the name and path checks say so
            continue
        if inside:
            p.append(f"{key}={value!r} is inside this run's output directory {recipe.out}: the run would replace what it reads. "
                     "Give this run another name= or output_dir=.")
    return p


def from_run_problems(recipe: Recipe) -> list[str]:
    """model.from_run names a finished single-model run on the recipe's base (what `run` would refuse after loading)."""
    source = Path(recipe.model.from_run)
    try:
        record = json.loads((source / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return [f"model.from_run={recipe.model.from_run!r}: no finished run there (no readable run.json). Train it first "
                "(peftlab train RECIPE with output_dir there), or fix the path."]
    if not isinstance(record, dict):
        return [f"model.from_run={recipe.model.from_run!r}: its run.json is not a run record. Point it at a finished run."]
    multitask = record.get("multitask") or {}
    if multitask and not multitask.get("task"):  # the run itself, not one of its tasks (OUT/tasks/NAME)
        tasks = multitask.get("tasks") or ["NAME"]
        return [f"model.from_run={recipe.model.from_run!r} is a multi-task run: its models are per task. Start from one of "
                f"them, e.g. model.from_run={source / 'tasks' / tasks[0]}."]
    method = record.get("method")
    if method in method_names() and get_method(method).is_adapter and not get_method(method).mergeable:
        return [f"model.from_run={recipe.model.from_run!r} holds {a_or_an(method)} adapter: a run starts from the weights of its "
                f"source with the adapter merged into them, and {get_method(method).merge_refusal} Start from a run of a "
                "mergeable method (lora, ia3, ...), or from its base: model.from_run=null."]
    base = run_base(source, record)
    if base and not same_base(recipe.model.name, base):
        return [f"model.from_run={recipe.model.from_run!r} was trained on {base!r}, but model.name={recipe.model.name!r}. Set "
                f"model.name={base} (or leave it out: it is taken from the run)."]
    return []


def distill_problems(recipe: Recipe, check_files: bool) -> list[str]:
    """train.distill's own rules. The teacher itself (a finished run, its task and labels) is checked when training starts,
    before the run folder is touched (distill.check): a shipped recipe names a teacher that is trained first."""
    k, p = recipe.train.distill, []
    if k.teacher is None:
        p.append("train.distill.teacher is not set: name the teacher's finished run folder, e.g. train.distill.teacher=runs/sst2-teacher.")
    if isinstance(k.alpha, (int, float)) and k.alpha > 1:
        p.append(f"train.distill.alpha={k.alpha}: must be in [0, 1] (1 = labels only, 0 = the teacher's soft targets only).")
    if recipe.task.type != "classification":
        p.append(f"train.distill with task.type={recipe.task.type!r}: the student must be a classification (its logits are "
                 "matched to the teacher's classes). Set task.type=classification, or remove train.distill.")
    u = k.unlabelled
    if u is not None:
        if (u.path is None) == (u.split is None):
            p.append("train.distill.unlabelled: give exactly one of `path:` (a local file) or `split:` (a hub split with data.dataset).")
        if u.split is not None and recipe.data.dataset is None:
            p.append(f"train.distill.unlabelled.split={u.split!r} needs data.dataset (a hub dataset id), or use `path:`.")
        if check_files and u.path is not None and not Path(u.path).is_file():
            p.append(f"train.distill.unlabelled.path={u.path!r}: file not found. Fix the path or override it: "
                     "train.distill.unlabelled.path=FILE.")
        if k.alpha == 1:
            p.append("train.distill.unlabelled with train.distill.alpha=1: unlabelled rows get only the soft-target term, "
                     "weighted 1 - alpha = 0, so they would change nothing. Lower alpha (e.g. 0.5) or drop unlabelled.")
    return p


def describe_fields(cls=Recipe, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default as YAML writes it, help) for every leaf field: the CLI help and README reference come from this."""
    rows = []
    for f in dataclasses.fields(cls):
        hint = _unwrap_optional(_hints(cls)[f.name])[0]
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hint):
            rows.extend(describe_fields(hint, name + "."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            text, choices = f.metadata.get("help", ""), f.metadata.get("choices")
            if choices:  # the allowed values (a registry's: its names now)
                text += f" One of: {', '.join(map(str, choices() if callable(choices) else choices))}."
            # as a recipe and an override spell it: null, true (train.max_steps=None is the text 'None', refused)
            rows.append((name, "null" if default is None else _as_written(default) if isinstance(default, bool) else repr(default), text))
    return rows
