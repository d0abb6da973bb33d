"""Causal-LM continued pretraining (task.type: clm): a decoder (SmolLM2, Llama, Qwen) keeps learning to predict the
next token on unlabelled text of the target domain (DAPT) or task (TAPT), before it is fine-tuned on labels.

Rows are the joined data.text_columns; they are packed into blocks of data.max_length tokens (tasks/corpus.py) with
attention kept within each document. The loss covers every token (the LM head runs on the labelled positions only,
tasks/generative.py); evaluation reports the mean token loss and the perplexity exp(loss) of a held-out split
(data.eval, or data.eval_holdout of train). Start a task recipe from the finished run with model.from_run.
"""

from __future__ import annotations

from functools import partial

from transformers import AutoModelForCausalLM

from . import corpus
from .generative import causal_lm_loss, next_token_items
from .sft import collator  # right-padded rows; packed rows keep their position ids (block-diagonal attention)

auto_model_class = AutoModelForCausalLM
peft_task_type = "CAUSAL_LM"
base_lm_head = True  # the base's own LM head scores and generates: a frozen base has nothing to train
loss = causal_lm_loss
loss_items = next_token_items  # what it averages over (a step of several micro-batches pools them: train.py)
target_kind = "none"  # unlabelled text: data.text_columns only
best_metric = "loss"
metrics = ("loss", "perplexity")
pipeline_tag = "text-generation"
task_name = "Text Generation"
usage_class = "AutoModelForCausalLM"
card_metrics = {"perplexity": "Perplexity"}
check_tokenizer = partial(corpus.check_tokenizer, causal=True)
summary_line = corpus.summary_line

__all__ = ["collator"]


def check(recipe) -> list[str]:
    """corpus.check, and no prompt method: peft drops the position ids that keep a block's documents apart (prompt and
    P-tuning), and a prefix arrives as a cache, with which transformers builds no packed-sequence mask, so each document
    attended to the ones before it in its block (training and the reported perplexity alike)."""
    from ..methods import get_method

    p = corpus.check(recipe)
    if get_method(recipe.adapter.method).extra_positions(recipe.adapter):  # virtual tokens: a prompt method
        p.append(f"task.type=clm with adapter.method={recipe.adapter.method}: clm packs documents into blocks kept apart by "
                 "their position ids, which peft drops for prompt methods (each document would attend to the ones before it "
                 "in its block). Use lora (or another layer method) for continued pretraining.")
    return p


def tokenize(ds, tokenizer, recipe):
    return corpus.blocks(ds, tokenizer, recipe, causal=True)


def evaluate(model, loader, accelerator, label_names, **context):
    """-> ({loss, perplexity}, {tokens}): the mean next-token loss over every predicted token of the split."""
    metrics, tokens = corpus.evaluate_tokens(model, loader, accelerator, lambda batch: batch, shift=True)
    return metrics, {"tokens": tokens}
