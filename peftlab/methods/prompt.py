"""Prompt methods: virtual tokens before the input (prompt_tuning, p_tuning) or in every layer's keys and values
(prefix_tuning). No layer is adapted, so there is nothing to merge into the weights."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from ..errors import ModelError
from .base import Method, no_problems, register
from .peft_adapter import apply_peft

if TYPE_CHECKING:
    from torch import nn

    from ..config import Recipe

NOT_MERGEABLE = "it adds virtual tokens to the input, so there is nothing to fold into the weights."
PREFIX_NOT_MERGEABLE = "it adds trained keys and values to every layer's attention, so there is nothing to fold into the weights."


def virtual_tokens(a) -> dict:
    return dict(num_virtual_tokens=a.num_virtual_tokens)


def tokens_hint(recipe: Recipe) -> str:
    return f"Use fewer adapter.num_virtual_tokens (now {recipe.adapter.num_virtual_tokens})"


def prompt_method(name: str, config_class: str, apply=None, rules=no_problems, merge_refusal: str = NOT_MERGEABLE) -> Method:
    return Method(name, apply or partial(apply_peft, config_class, virtual_tokens, layers=False), config_class=config_class,
                  recipe_fields=virtual_tokens, rules=rules,
                  mergeable=False, merge_refusal=merge_refusal, size_hint=tokens_hint, layers=False,
                  extra_positions=lambda a: a.num_virtual_tokens,
                  describe=lambda r: f"A {name.replace('_', '-')} adapter ({r.adapter.num_virtual_tokens} virtual tokens)")


# peft's sequence-classification wrapper passes past_key_values to the backbone, whose forward (transformers 5) no
# longer names it: the first training step would fail with "Model does not support past key values". The
# classification task refuses the recipe (tasks/classification.py: check); this is for a model built past validation.
PREFIX_ON_CLASSIFICATION = ("adapter.method=prefix_tuning does not work for classification with this transformers/peft "
                            "(the backbone's forward no longer takes past_key_values). Use prompt_tuning or p_tuning (on an encoder; on a "
                            "decoder LLM, task.type=verbalizer), or lora.")


# peft's sequence-classification wrapper gives a prompt method's backbone inputs_embeds only (the virtual tokens in
# front), and a decoder-only classifier (transformers' GenericForSequenceClassification) then cannot find each row's last
# token that is not padding: it pools the last position, padding in a right-padded batch, so a row's prediction
# depended on the batch it was in (16 of 64 rows changed at eval.batch_size=1, P-tuning 42). Refused for those bases.
PROMPT_ON_DECODER_CLASSIFIER = ("adapter.method={method} on a decoder-only classifier ({kind}): peft feeds its classifier "
                                "embeddings only, so it pools the batch's last position (padding for shorter rows), not each row's "
                                "last token, and a prediction depends on the batch. Use task.type=verbalizer (the LM scores a label "
                                "word; {method} works there), or adapter.method=lora.")
# An encoder-decoder classifier (BART, T5) finds the end-of-sequence token it pools from the token ids, so transformers
# refuses the embeddings peft gives it (NotImplementedError on the first batch).
PROMPT_ON_SEQ2SEQ_CLASSIFIER = ("adapter.method={method} on an encoder-decoder classifier ({kind}): peft feeds its classifier "
                                "embeddings only, and it finds the end-of-sequence token it pools from the token ids, so "
                                "transformers refuses the input. Use adapter.method=lora (or another method that adapts weights).")


# Prefix tuning where the evaluation generates. Before peft 0.22 the text was not the trained model's: on a decoder,
# peft's generate with a prefix wrote other tokens than greedy decoding of the model as trained computes (peft 0.21, a
# 2-layer Llama: from the third new token on); on an encoder-decoder (T5, BART) generate dropped the prefix ("Both
# past_key_values and cache are set ... Using cache") and wrote the untrained base's text, token for token, while the
# loss was the adapter's. peft 0.22 generates with it: greedy decoding of the trained model, token for token, on T5,
# BART, Llama and GPT-2 (left-padded prompts included; tests/test_summarization.py, tests/test_sft.py), so the evaluation
# calls peft's generate for a prefix (tasks/generative.generation_inputs). BERT2BERT's model.decoder was not measured.
PREFIX_GENERATING = ("adapter.method=prefix_tuning cannot generate faithfully here: {why}, so the scores would be of another "
                     "model. Use prompt_tuning or p_tuning (or lora){fix}.")
OLD_PEFT = ("with peft < 0.22, generation drops the prefix of an encoder-decoder (T5, BART: the base model's text) and writes "
            "other tokens than a decoder's model computes")
WARM_START = "generation with model.decoder's warm start (BERT2BERT) was not measured to keep the prefix"


def peft_generates_prefix() -> bool:
    """Whether the installed peft generates with a prefix (0.22 and later; see PREFIX_GENERATING)."""
    from importlib.metadata import version

    from packaging.version import Version

    return Version(version("peft")) >= Version("0.22")


def prefix_generating_problem(recipe: Recipe) -> str | None:
    """Prefix tuning for a task that generates, where the text would not be the trained model's (PREFIX_GENERATING):
    with a peft before 0.22, or on model.decoder's warm start. -> the problem, or None."""
    from ..tasks import get_task

    if recipe.adapter.method != "prefix_tuning" or not getattr(get_task(recipe.task.type), "generates", False):
        return None
    if recipe.model.decoder:
        return PREFIX_GENERATING.format(why=WARM_START, fix=", or a decoder-only or T5/BART base without model.decoder")
    if not peft_generates_prefix():
        return PREFIX_GENERATING.format(why=OLD_PEFT, fix=", or upgrade peft to 0.22 or later")
    return None


# A prefix is keys and values in every layer's cache, which a checkpointed layer drops (transformers sets cache=None
# there): peft refuses the model ("PREFIX_TUNING does not work with gradient checkpointing"), which `validate` passed
# and training met as a bare ValueError.
PREFIX_CHECKPOINTING = ("adapter.method=prefix_tuning with train.gradient_checkpointing=true: a prefix is the keys and values "
                        "in every layer's cache, which a checkpointed layer drops (peft refuses it). Set "
                        "train.gradient_checkpointing=false, or use prompt_tuning or p_tuning (or lora).")


def prefix_rules(recipe: Recipe) -> list[str]:
    return [PREFIX_CHECKPOINTING] if recipe.train.gradient_checkpointing else []


def apply_prefix(model: nn.Module, recipe: Recipe, head_modules: list[str], task_type: str) -> nn.Module:
    if task_type == "SEQ_CLS":
        raise ModelError(PREFIX_ON_CLASSIFICATION)
    if problem := prefix_generating_problem(recipe):  # past validation (the Python API)
        raise ModelError(problem)
    if problems := prefix_rules(recipe):
        raise ModelError(problems[0])
    return apply_peft("PrefixTuningConfig", virtual_tokens, model, recipe, head_modules, task_type, layers=False)


def apply_prompt_tuning(model: nn.Module, recipe: Recipe, head_modules: list[str], task_type: str) -> nn.Module:
    """peft's TEXT init (adapter.options prompt_tuning_init: TEXT) tokenizes prompt_tuning_init_text with the tokenizer
    it names in tokenizer_name_or_path, which it requires (validate passed, train failed with peft's message): the
    base's own, unless the options name another."""
    fields, options = virtual_tokens, recipe.adapter.options
    if str(options.get("prompt_tuning_init", "")).upper() == "TEXT" and not options.get("tokenizer_name_or_path"):
        base = getattr(model, "name_or_path", None) or recipe.model.name
        fields = partial(with_tokenizer, tokenizer=base)
    return apply_peft("PromptTuningConfig", fields, model, recipe, head_modules, task_type, layers=False)


def with_tokenizer(a, tokenizer: str) -> dict:
    return {**virtual_tokens(a), "tokenizer_name_or_path": tokenizer}


PROMPT_TUNING = register(prompt_method("prompt_tuning", "PromptTuningConfig", apply_prompt_tuning))
PREFIX_TUNING = register(prompt_method("prefix_tuning", "PrefixTuningConfig", apply_prefix, prefix_rules, PREFIX_NOT_MERGEABLE))
P_TUNING = register(prompt_method("p_tuning", "PromptEncoderConfig"))
