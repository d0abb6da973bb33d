"""Chat / instruction fine-tuning (SFT) of a decoder-only LLM: the loss covers the assistant's tokens only.

Rows (data.py hands them over raw: `normalize_split` below) become conversations, a list of {role, content}:
- messages: data.messages_column holds the list itself (JSONL files load it as a list of objects);
- instruction: instruction (+ input) is the user turn, output the assistant's;
- prompt_completion: data.text_columns (through task.prompt's {source}) -> data.target_column, or prompt/completion columns;
  cells that are lists of {role, content} (TRL's conversational prompt/completion) are the prompt's messages + the
  completion's, as the messages format reads them.
A conversation ends at its last answer: the last assistant turn with text after a user (or tool) turn. Turns after it
(a blank answer, a user turn left unanswered) are cut, with a count in the log, since nothing would train or score
them; a row with no answer is dropped. Blank answers and an opening assistant turn (before any prompt) stay as context.
The tokenizer's chat template (or task.chat_format) renders each conversation. Which tokens are the assistant's comes
from rendering it prefix by prefix (messages[:i] with the generation prompt, then messages[:i+1]): the characters
added by assistant turn i, up to and including its end-of-turn token (EOS / <|im_end|>), are labelled; every other
token is -100. Labels come from these spans, never from `input_ids != pad`, so the EOS that ends each turn is trained
even where pad == eos. A split whose template leaves no assistant token trainable is refused.
With data.packing the training rows are packed into rows of up to data.max_length tokens: position ids restart at
each example and no attention mask is passed, so transformers' masking_utils (find_packed_sequence_indices) builds a
block-diagonal causal mask: no token attends across examples (the KV cache is off for these batches, as the mask
needs). A base whose mask ignores those position ids (OPT; Bloom and MPT take none) is refused, from its config and
by a probe of the loaded base (tasks/packing.py).
Over data.max_length, a training row keeps its first tokens (the system turn and the earliest turns); the generation
prompt of an evaluation row drops its oldest whole turns instead, then cuts its last user turn's text (fitted_prompt).
Evaluation: the loss during training; at the end (or when train.best_metric needs it) greedy generation of the
last assistant turn from the chat template's generation prompt, scored by exact match, ROUGE and eval.metric_fn.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import logging
import re
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from ..errors import ConfigError, DataError
from ..metrics import ROUGE_KEYS, rouge_metrics
from .generative import (
    causal_lm_loss,
    check_references,
    contiguous_head_input,
    data_row,
    evaluation_generation,
    generation_inputs,
    log_examples,
    loss_and_predictions,
    next_token_items,
    reference_lists,
    references,
    several_references,
)
from .packing import architecture_problem, loaded_model_problem, pack  # noqa: F401 (task hooks)

log = logging.getLogger(__name__)

NAMED_TEMPLATES = {
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
}
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")  # tried after the tokenizer's EOS
ROLES = ("system", "user", "assistant", "tool")
BUILTIN_METRICS = ("loss", "exact_match", *ROUGE_KEYS)
DESCRIPTIVE = ("gen_words",)  # measured with the metrics, but no quality: not a card result, not a best_metric
EXTRAS = ("row", "source", "reference", "references", "gen_input_ids", "gen_attention_mask")
FILE_ROW = "_file_row"  # each row's number in its file (0-based data rows): errors and predictions-*.jsonl name it


class _Generated:
    """Every metric but the loss needs generation (the user's eval.metric_fn ones too)."""

    def __contains__(self, metric) -> bool:
        return metric != "loss"

    def __iter__(self):
        return iter(BUILTIN_METRICS[1:])


auto_model_class = AutoModelForCausalLM
peft_task_type = "CAUSAL_LM"
loss = causal_lm_loss  # the LM head runs on the assistant's tokens only
loss_items = next_token_items  # what it averages over (a step of several micro-batches pools them: train.py)
target_kind = "messages"  # conversations: normalize_split reads the rows itself
packs = True  # data.packing: training rows packed into rows of up to data.max_length tokens
base_lm_head = True  # the base's own LM head scores and generates: a frozen base has nothing to train
options = ("prompt", "chat_format", "system_prompt")  # the task.* keys it reads
best_metric = "loss"
metrics = ()  # the best metric is checked in `check`: eval.metric_fn adds metrics of its own
GENERATED_METRICS = _Generated()
pipeline_tag = "text-generation"
task_name = "Text Generation"
usage_class = "AutoModelForCausalLM"
generates = True  # its evaluation generates text (tasks/__init__.py)
card_metrics = {"exact_match": "Exact match", "rouge1": "ROUGE-1", "rougeL": "ROUGE-L"}


def check(recipe) -> list[str]:
    t, e, p = recipe.task, recipe.eval, []
    metric = recipe.train.best_metric
    if metric in DESCRIPTIVE:
        p.append(f"train.best_metric={metric!r} counts the words generated, not their quality: choose one of "
                 f"{', '.join(BUILTIN_METRICS)}, or a metric eval.metric_fn returns.")
    elif metric not in BUILTIN_METRICS and not e.metric_fn:
        p.append(f"train.best_metric={metric!r}: sft keeps the best of {', '.join(BUILTIN_METRICS)}, or of a metric that "
                 "eval.metric_fn returns (set eval.metric_fn=module:function).")
    if e.metric_fn is not None and not re.fullmatch(r"[\w.]+:\w+", e.metric_fn):
        p.append(f"eval.metric_fn={e.metric_fn!r}: give 'module:function', e.g. mymetrics:score (a function taking "
                 "(predictions, references) and returning {metric: value}).")
    if t.chat_format is not None and t.chat_format not in NAMED_TEMPLATES and "{%" not in t.chat_format and "{{" not in t.chat_format:
        p.append(f"task.chat_format={t.chat_format!r}: neither a named template ({', '.join(NAMED_TEMPLATES)}) nor a Jinja "
                 "string (with {% ... %} / {{ ... }}).")
    elif t.chat_format is not None and t.chat_format not in NAMED_TEMPLATES:  # compiled as transformers will, before any work
        from jinja2 import TemplateSyntaxError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        try:
            ImmutableSandboxedEnvironment().from_string(t.chat_format)
        except TemplateSyntaxError as err:
            p.append(f"task.chat_format: the Jinja template does not compile ({err.message}, line {err.lineno}). Fix it, or "
                     f"use a named template: {', '.join(NAMED_TEMPLATES)}.")
    if t.prompt is not None and t.prompt.count("{source}") != 1:
        p.append(f"task.prompt={t.prompt!r}: must contain {{source}} exactly once (where the prompt column's text goes).")
    if recipe.model.decoder:
        p.append("model.decoder is set: sft fine-tunes a decoder-only LLM. Remove model.decoder.")
    from ..methods import get_method
    from ..methods.prompt import prefix_generating_problem

    if problem := prefix_generating_problem(recipe):
        p.append(problem)
    if recipe.data.packing and get_method(recipe.adapter.method).extra_positions(recipe.adapter):  # virtual tokens
        p.append(f"data.packing=true with adapter.method={recipe.adapter.method}: a packed row keeps its examples apart by "
                 "their position ids, which peft drops for prompt methods (each example would attend to the ones before it, "
                 "and the virtual tokens come before the first only). Set data.packing=false, or use lora.")
    beams = {"num_beams": (e.num_beams, 1), "length_penalty": (e.length_penalty, 1.0), "no_repeat_ngram_size": (e.no_repeat_ngram_size, 0)}
    if changed := [f"eval.{k}={v}" for k, (v, default) in beams.items() if v != default]:  # it was ignored, silently
        p.append(f"{', '.join(changed)}: sft generates greedily (the summarization task's beam search settings do not "
                 "apply). Remove them.")
    return p


def summary_line(split: str, m: dict) -> str:
    shown = [f"exact_match {100 * m['exact_match']:.2f}%"] if "exact_match" in m else []  # (in %: run.json holds fractions)
    shown += [f"{k} {100 * m[k]:.2f}%" for k in ("rouge1", "rougeL") if k in m]
    shown += [f"{k} {v:.4f}" for k, v in m.items() if k not in (*BUILTIN_METRICS, *DESCRIPTIVE) and isinstance(v, (int, float))]
    return f"   {split:<5} " + "   ".join([*shown, *([f"loss {m['loss']:.4f}"] if "loss" in m else [])])


def input_lengths(config, recipe) -> list[tuple]:
    d, e = recipe.data, recipe.eval
    return [(config, d.max_length + e.max_new_tokens, f"data.max_length + eval.max_new_tokens = {d.max_length} + {e.max_new_tokens}")]


# ------------------------------------------------------------------------------------------------ rows -> conversations

def detect_format(columns: list[str], d, where: str) -> tuple[str, list[str], str | None]:
    """-> (format, prompt columns, completion column) from data.sft_format and the columns found."""
    cols, fmt = set(columns), d.sft_format
    pc = (list(d.text_columns), d.target_column) if d.target_column else (["prompt"], "completion")
    if fmt == "auto":
        if d.messages_column in cols:
            fmt = "messages"
        elif d.target_column and set(pc[0]) | {pc[1]} <= cols:  # columns the recipe names win over guessed ones
            fmt = "prompt_completion"
        elif {"instruction", "output"} <= cols:
            fmt = "instruction"
        elif set(pc[0]) | {pc[1]} <= cols:
            fmt = "prompt_completion"
        else:
            raise DataError(f"{where}: cannot tell how the rows hold conversations; the data has columns {columns}. sft reads a "
                            f"'{d.messages_column}' column (a list of {{role, content}}; data.messages_column names another), "
                            "instruction/input/output columns, or a prompt and a completion (data.text_columns and "
                            "data.target_column, or columns named prompt/completion). Set data.sft_format and the columns.")
    needed = {"messages": [d.messages_column], "instruction": ["instruction", "output"], "prompt_completion": [*pc[0], pc[1]]}[fmt]
    missing = [c for c in needed if c not in cols]
    if missing:
        raise DataError(f"{where}: data.sft_format={fmt} needs column(s) {missing}; the data has {columns}. "
                        + ("Set data.messages_column." if fmt == "messages" else "Set data.text_columns / data.target_column."
                           if fmt == "prompt_completion" else "Rename the columns to instruction/input/output."))
    return fmt, pc[0], pc[1]


def check_columns(columns: list[str], recipe, where: str) -> None:
    """`peftlab validate`: a split's columns (its header) hold conversations in data.sft_format."""
    warn_unread_prompt(detect_format(columns, recipe.data, where)[0], recipe, where)


def check_rows(rows: list[tuple[int, dict]] | None, columns: list[str], recipe, where: str) -> None:
    """`peftlab validate`: a JSON file's first records (`rows`: (row, record)) hold conversations as normalize_split reads
    them (a message with an unknown role or no text content was refused by `train` only, after validate said ok)."""
    d = recipe.data
    fmt, prompt_cols, completion_col = detect_format(columns, d, where)
    for i, r in rows or ():
        if fmt == "messages":
            _check_messages(r.get(d.messages_column), i, where, d.messages_column)
        elif fmt == "prompt_completion" and any(isinstance(r.get(c), list) for c in (*prompt_cols, completion_col)):
            _chat_cells([(c, r.get(c)) for c in (*prompt_cols, completion_col)], i, where)


def warn_unread_prompt(fmt: str, recipe, where: str, chat: int = 0) -> None:
    """task.prompt frames the prompt column's text of the prompt_completion format only: say so where it is set for rows
    that do not read it (it was ignored, silently); `chat`: conversational prompt/completion rows (lists of messages)."""
    if recipe.task.prompt is not None and (fmt != "prompt_completion" or chat):
        rows = f"{chat} conversational prompt/completion row(s) (lists of messages)" if chat else f"the {fmt} format's rows"
        log.warning("%s: task.prompt is not applied to %s: only text prompt/completion columns go through its {source}. "
                    "Write the instruction into the data, use task.system_prompt, or remove task.prompt.", where, rows)


def _check_messages(value, row: int, where: str, column: str) -> list[dict]:
    cell = value  # as the file holds it: the message shows it (a string that is not JSON was shown as None)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = None
    if isinstance(value, list) and any(isinstance(m, dict) and isinstance(m.get("content"), list) for m in value):
        raise DataError(f"{where}: {data_row(row)}: {column!r} holds a message whose content is a list of parts (as in "
                        "OpenAI's [{type, text}]); sft reads text content: give each message's text as one string.")
    if isinstance(value, list):  # a number read from a JSON file where other rows made the column mixed: its text
        value = [{**m, "content": str(m["content"])} if isinstance(m, dict) and isinstance(m.get("content"), (int, float))
                 and not isinstance(m.get("content"), bool) else m for m in value]
    ok = isinstance(value, list) and all(isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
                                         for m in value)
    if not ok:
        shown = f"{cell[:200]!r} (text, not JSON)" if isinstance(cell, str) and value is None else str(cell)[:200]
        raise DataError(f"{where}: {data_row(row)}: {column!r} must be a list of {{role, content}} with role one of "
                        f"{', '.join(ROLES)} and text content; got {shown}.")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _chat_cells(cells: list[tuple[str, object]], row: int, where: str) -> list[dict]:
    """A prompt/completion row whose cells are lists of messages (TRL's conversational format) -> prompt + completion
    messages, checked as the messages format's are; a row mixing such a list and text is refused."""
    lists, plain = [c for c, v in cells if isinstance(v, list)], [(c, v) for c, v in cells if not isinstance(v, list)]
    if plain:
        raise DataError(f"{where}: {data_row(row)}: {', '.join(map(repr, lists))} holds a "
                        f"list of messages but {plain[0][0]!r} does not (got {str(plain[0][1])[:200]!r}). In TRL's conversational "
                        "format the prompt and the completion are both lists of {role, content}; or give both as text.")
    return [m for c, v in cells for m in _check_messages(v, row, where, c)]


def normalize_split(ds, spec, recipe, where: str):
    """Raw rows -> {conversation: JSON list of {role, content}}; rows without an assistant answer are dropped."""
    d, t = recipe.data, recipe.task
    fmt, prompt_cols, completion_col = detect_format(ds.column_names, d, where)
    refs = spec.references_column
    if refs and refs not in ds.column_names:
        raise DataError(f"{where}.references_column={refs!r}: no such column; the data has {ds.column_names}.")
    ds = ds.add_column(FILE_ROW, range(len(ds)))  # kept through sampling and dropped rows
    if spec.max_samples is not None and spec.max_samples < len(ds):
        ds = ds.shuffle(seed=recipe.data_seed).select(range(spec.max_samples))

    def text(v) -> str:
        return "" if v is None else str(v).strip()

    def to_rows(batch):
        out, cut, chat, blank = [], [], [], []
        for j, i in enumerate(batch[FILE_ROW]):
            asked = True  # the row's prompt has text (instruction and prompt_completion rows: its cells may be empty)
            conversational = fmt == "prompt_completion" and any(isinstance(batch[c][j], list) for c in (*prompt_cols, completion_col))
            if fmt == "messages":
                msgs = _check_messages(batch[d.messages_column][j], i, where, d.messages_column)
            elif fmt == "instruction":
                user = text(batch["instruction"][j])
                extra = text(batch["input"][j]) if "input" in batch else ""
                asked = bool(user or extra)
                msgs = [{"role": "user", "content": f"{user}\n\n{extra}" if extra else user},
                        {"role": "assistant", "content": text(batch["output"][j])}]
            elif conversational:  # TRL's conversational rows
                msgs = _chat_cells([(c, batch[c][j]) for c in (*prompt_cols, completion_col)], i, where)
            else:
                source = " ".join(text(batch[c][j]) for c in prompt_cols).strip()
                asked = bool(source)
                msgs = [{"role": "user", "content": t.prompt.replace("{source}", source) if t.prompt else source},
                        {"role": "assistant", "content": text(batch[completion_col][j])}]
            if t.system_prompt and (not msgs or msgs[0]["role"] != "system"):
                msgs = [{"role": "system", "content": t.system_prompt}, *msgs]
            answers = [k for k, m in enumerate(msgs) if is_answer(msgs, k)]
            cut.append(bool(answers) and answers[-1] < len(msgs) - 1)
            chat.append(conversational)
            blank.append(bool(answers) and not asked)
            out.append(json.dumps(msgs[:answers[-1] + 1] if answers else [], ensure_ascii=False))
        more = {"references": reference_lists(batch[refs], refs, where, batch[FILE_ROW])} if refs else {}
        return {"conversation": out, "cut": cut, "chat": chat, "blank": blank, FILE_ROW: batch[FILE_ROW], **more}

    ds = ds.map(to_rows, batched=True, remove_columns=ds.column_names, desc=f"{where}: conversations")
    warn_unread_prompt(fmt, recipe, where, sum(ds["chat"]))
    if cut := sum(ds["cut"]):
        log.warning("%s: %d row(s) end with turns after their last answer (a blank assistant turn, or a user turn left "
                    "unanswered): cut there, as nothing would train on them or score them", where, cut)
    if blank := sum(ds["blank"]):  # (trained as an answer to an empty user turn, without a word)
        turn = "task.prompt's text alone" if t.prompt and fmt == "prompt_completion" else "an empty user turn"  # (the template's words)
        log.warning("%s: %d row(s) have an empty prompt (%s): each is %s as the answer to %s. Fill them in or drop those rows.",
                    where, blank, ", ".join(prompt_cols) if fmt == "prompt_completion" else "instruction, input",
                    "trained" if where.endswith(".train") else "scored", turn)
    n = len(ds)
    ds = ds.filter(lambda r: r["conversation"] != "[]", desc=f"{where}: rows with an answer").remove_columns(["cut", "chat", "blank"])
    if len(ds) < n:
        log.warning("%s: dropped %d row(s) without an answer (an assistant turn with text after a user turn)", where, n - len(ds))
    if len(ds) == 0:
        raise DataError(f"{where}: no row has an answer, an assistant turn with text after a user turn (format {fmt}): "
                        "nothing to learn. Check the columns.")
    check_references(ds, where)
    return ds


def is_answer(messages: list[dict], i: int) -> bool:
    """Turn i is trained (and the last one scored): an assistant turn with text that follows a user (or tool) turn.
    An opening assistant turn answers no one, a system prompt before it or not (and a template cannot render the empty
    prefix before it); a blank one would teach the model to answer nothing."""
    return (messages[i]["role"] == "assistant" and bool(messages[i]["content"].strip())
            and any(m["role"] in ("user", "tool") for m in messages[:i]))


# ------------------------------------------------------------------------------------------------ template and labels

PROBE = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and?"},
         {"role": "assistant", "content": "bye"}]  # a two-turn conversation `validate` renders as training will


def check_tokenizer(tokenizer, recipe) -> None:
    """`validate`: the chat template exists and renders a two-turn conversation prefix by prefix (what tokenizing
    needs), with the recipe's system prompt."""
    tokenizer = copy.copy(tokenizer)  # (a copy: task.chat_format is set on the run's tokenizer only)
    ensure_chat_template(tokenizer, recipe)
    system = [{"role": "system", "content": recipe.task.system_prompt}] if recipe.task.system_prompt else []
    try:
        assistant_spans(tokenizer, system + PROBE)
    except DataError as e:
        raise ConfigError([str(e)]) from None
    except Exception as e:  # the template's own error (raise_exception, an unknown variable, ...)
        raise ConfigError([f"the chat template cannot render a conversation ({type(e).__name__}: {e}). Fix "
                           "task.chat_format, or use a named template (task.chat_format=chatml)."]) from None


def ensure_chat_template(tokenizer, recipe) -> None:
    """task.chat_format replaces the tokenizer's template (saved with the run); without either, refuse with the fix."""
    fmt = recipe.task.chat_format
    if fmt is not None:
        tokenizer.chat_template = NAMED_TEMPLATES.get(fmt, fmt)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError([f"task.type=sft: the tokenizer of {recipe.model.name} has no chat template, so conversations cannot "
                           "be rendered. Set task.chat_format=chatml (or a Jinja chat template string), or use an "
                           "instruction-tuned model whose tokenizer has one."])
    for marker in text_stops(tokenizer):  # ChatML through a tokenizer that lacks its tokens
        log.warning("the chat template uses %s, which is not a token of this tokenizer: it is trained as the text it is, and "
                    "generation stops where that text is written (and at EOS, %s)", marker, tokenizer.eos_token)


def render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """-> (the rendered conversation, the character spans of each assistant turn's tokens, end-of-turn included)."""
    full = render(tokenizer, messages)
    markers = [m for m in (tokenizer.eos_token, *END_OF_TURN) if m]
    spans = []
    for i in range(len(messages)):
        if not is_answer(messages, i):
            continue
        before, after = render(tokenizer, messages[:i], True), render(tokenizer, messages[:i + 1])
        if not after.startswith(before) or not full.startswith(after):
            raise DataError("the chat template does not render conversations prefix by prefix (messages[:i] + the generation "
                            "prompt is not the start of messages[:i+1]), so the assistant's tokens cannot be found. Use a "
                            "template that does (task.chat_format=chatml).")
        start, stop = len(before), len(after)
        for marker in markers:  # train up to and including the turn's end token, not the newline the template adds after it
            k = full.rfind(marker, start, stop)
            if k >= 0:
                stop = k + len(marker)
                break
        spans.append((start, stop))
    return full, spans


def text_stops(tokenizer) -> list[str]:
    """The end-of-turn markers the chat template writes that are no token of this tokenizer (task.chat_format=chatml
    on a base without <|im_end|>): generation stops at them as text (stop_strings), and predictions end before them."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return [m for m in END_OF_TURN if m in template and tokenizer.convert_tokens_to_ids(m) in (None, tokenizer.unk_token_id)]


def cut_at(text: str, markers: list[str]) -> str:
    """`text` up to the first of `markers` (all of it without one)."""
    return text[:min((i for m in markers if (i := text.find(m)) >= 0), default=len(text))]


def stop_ids(tokenizer) -> list[int]:
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for marker in END_OF_TURN:
        i = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(i, int) and i != tokenizer.unk_token_id and i not in ids:
            ids.append(i)
    return ids


def edge_tokens(tokenizer, text: str, edges: list[int]) -> list[tuple[int, int, int]]:
    """`text` tokenized as one -> (id, start, end) each, except a token across one of `edges`, which is tokenized as its
    sides. An answer starting with whitespace after the template's newline gave SmolLM2 one token 'ĊĠ' ('\\n' + ' ')
    across the answer's start: the answer lost its first character from the loss, and the model learned to continue a
    prompt that generation never ends with (its prompt ends with 'Ċ'). Tokenizing each turn apart instead would give
    SentencePiece a spurious '▁' in front of every answer: here the sides are taken alone, or else (SentencePiece) a
    side after the first behind a newline (`_side`), whichever decodes to the token; a token neither does stays whole
    (as before: its answer side untrained)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
        cuts = [c for c in edges if a < c < b]
        whole = [(t, a, b)]
        for anchored in (False, True) if cuts else ():
            pieces = [p for k, (x, y) in enumerate(zip([a, *cuts], [*cuts, b]))
                      for p in _side(tokenizer, text, x, y, anchored=anchored and k > 0)]
            if tokenizer.decode([i for i, _, _ in pieces]) == tokenizer.decode([t]):
                whole = pieces
                break
        out += whole
    return out


def _side(tokenizer, text: str, x: int, y: int, anchored: bool) -> list[tuple[int, int, int]]:
    """text[x:y] tokenized alone -> (id, start, end) in `text`; `anchored`: behind a newline whose tokens are dropped,
    so a SentencePiece tokenizer adds no '▁' of its own in front (its dummy prefix goes to the newline)."""
    if not anchored:
        side = tokenizer(text[x:y], add_special_tokens=False, return_offsets_mapping=True)
        return [(i, x + p, x + q) for i, (p, q) in zip(side["input_ids"], side["offset_mapping"])]
    side = tokenizer("\n" + text[x:y], add_special_tokens=False, return_offsets_mapping=True)
    return [(i, x + p - 1, x + q - 1) for i, (p, q) in zip(side["input_ids"], side["offset_mapping"]) if p >= 1]


def rendered(tokenizer, messages: list[dict]) -> tuple[list[tuple[int, int, int]], list[tuple[int, int]], list[int]]:
    """One conversation -> its tokens (id, start, end char), the assistant spans, and the generation prompt of its last
    answer (the tokens before it; normalize_split cut the turns after it)."""
    full, spans = assistant_spans(tokenizer, messages)
    tokens = edge_tokens(tokenizer, full, sorted({b for span in spans for b in span}))
    start = spans[-1][0] if spans else len(full)
    return tokens, spans, [t for t, a, _ in tokens[:next((i for i, (_, a, _) in enumerate(tokens) if a >= start), len(tokens))]]


def fitted_prompt(tokenizer, messages: list[dict], max_length: int, prompt: list[int]) -> tuple[list[int], int, str | None]:
    """The generation prompt of a conversation longer than max_length (`prompt`: as rendered whole), within it, rendered
    again through the template: first the oldest whole turns of its history dropped (each a user turn with the replies
    up to the next one; as few as make it fit), then, only where the last user turn alone is still too long, that
    turn's text cut at its end. The system turn, the template's headers, the instruction before the text (task.prompt)
    and the generation prompt stay (the prompt's last max_length tokens kept none of them, started mid-turn, and the
    model went on with the dialogue). Where even that cannot make room (a system turn longer than max_length): the
    prompt's last max_length tokens. -> (prompt, turns dropped, None | "text" (the last user turn's text cut) | "tail"
    (the last tokens only))."""
    u = next((i for i in range(len(messages) - 2, -1, -1) if messages[i]["role"] == "user"), None)
    if u is None:
        return prompt[-max_length:], 0, "tail"
    start = next((i for i, m in enumerate(messages) if m["role"] != "system"), u)
    turns = [i for i in range(start, u) if i == start or messages[i]["role"] == "user"]  # where each older turn starts

    def without(k: int) -> list[dict]:  # the k oldest turns dropped
        return messages if k == 0 else [*messages[:start], *messages[(turns[k] if k < len(turns) else u):]]

    lo, hi, fits = 1, len(turns), {0: prompt}  # the fewest turns whose dropping fits (binary search: lengths fall with k)
    while lo <= hi:
        k = (lo + hi) // 2
        fits[k] = rendered(tokenizer, without(k))[2]
        lo, hi = (lo, k - 1) if len(fits[k]) <= max_length else (k + 1, hi)
    dropped = min(lo, len(turns))
    if dropped not in fits:
        fits[dropped] = rendered(tokenizer, without(dropped))[2]
    if len(fits[dropped]) <= max_length:
        return fits[dropped], dropped, None
    messages, prompt = without(dropped), fits[dropped]  # every older turn gone: the last user turn's text is cut
    u = next(i for i in range(len(messages) - 2, -1, -1) if messages[i]["role"] == "user")
    content = tokenizer(messages[u]["content"], add_special_tokens=False)["input_ids"]
    for _ in range(4):  # a cut can merge tokens at the edge: a pass or two more
        excess = len(prompt) - max_length
        if excess <= 0:
            return prompt, dropped, "text"
        if excess >= len(content):
            break
        content = content[: len(content) - excess]
        messages = [*messages[:u], {**messages[u], "content": tokenizer.decode(content)}, *messages[u + 1:]]
        prompt = rendered(tokenizer, messages)[2]
    return prompt[-max_length:], dropped, "tail"


def encode(tokenizer, messages: list[dict], max_length: int) -> dict:
    """One conversation -> input_ids and labels (assistant tokens only) of its first max_length tokens, the generation
    prompt of its last answer (an over-long one fitted: fitted_prompt; `prompt_cut` says so, `turns_dropped` how many
    of its oldest turns went, `prompt_fit` how the rest was made to fit: '' (whole turns), 'text' or 'tail')."""
    tokens, spans, prompt = rendered(tokenizer, messages)
    ids = [t for t, _, _ in tokens]
    labels = [t if any(s <= a < e for s, e in spans) and b > a else -100 for t, a, b in tokens]
    last = len(messages) - 1
    user = next((m["content"] for m in reversed(messages[:last]) if m["role"] == "user"), "")
    cut = len(prompt) > max_length
    gen, dropped, how = fitted_prompt(tokenizer, messages, max_length, prompt) if cut else (prompt, 0, None)
    return {"input_ids": ids[:max_length], "labels": labels[:max_length], "truncated": len(ids) > max_length,
            "gen_ids": gen, "prompt_cut": cut, "turns_dropped": dropped, "prompt_fit": how or "",
            "source": user, "reference": messages[last]["content"]}


def tokenize(ds, tokenizer, recipe):
    """{conversation} rows -> input_ids, attention_mask, labels (assistant tokens), length, truncated, row, and the
    generation prompt + reference of the last answer; rows left with no trainable token are dropped, a split with none
    at all is refused."""
    ensure_chat_template(tokenizer, recipe)
    if recipe.eval.metric_fn:
        load_metric_fn(recipe.eval.metric_fn)  # fail before training, not after it
    max_length = recipe.data.max_length

    def enc(batch):
        out = [encode(tokenizer, json.loads(c), max_length) for c in batch["conversation"]]
        cols = {k: [o[k] for o in out] for k in out[0]}
        cols.update(attention_mask=[[1] * len(i) for i in cols["input_ids"]], length=[len(i) for i in cols["input_ids"]],
                    n_labels=[sum(y != -100 for y in o["labels"]) for o in out], row=batch[FILE_ROW])
        return cols

    return ds.map(enc, batched=True, remove_columns=["conversation", FILE_ROW], desc="tokenize")


def report_cuts(ds, where: str, recipe, training: bool = False) -> None:
    """What data.max_length did to a split's conversations, beyond the rows cut (data.report_truncation); an eval split
    with no answer token within it is refused where training would choose by its loss (it has none)."""
    max_length, metric = recipe.data.max_length, recipe.train.best_metric
    unscored = sum(n == 0 for n in ds["n_labels"])
    if training and where.endswith(".eval") and unscored == len(ds) and metric not in GENERATED_METRICS:
        raise DataError(f"{where}: no row has an assistant token within data.max_length={max_length} (every answer starts "
                        f"after the cut), so the evaluations during training have no loss to compare (train.best_metric="
                        f"{metric}). Raise data.max_length, or choose by a generated metric (train.best_metric=exact_match "
                        "or rougeL).")
    if unscored:
        log.warning("%s: %d row(s) have no assistant token within data.max_length=%d (the answer starts after the cut): "
                    "training drops them; evaluation keeps them (generated; no loss where no row has one). Raise data.max_length to keep them "
                    "whole.", where, unscored, max_length)
    if not where.endswith(".train") and (cut := sum(ds["prompt_cut"])):  # (training rows are not generated from)
        fit, dropped = ds["prompt_fit"], ds["turns_dropped"]
        shown = [f"{sum(d > 0 for d in dropped)} lost their oldest turns ({sum(dropped)} user turns with their replies "
                 "in all)" if any(dropped) else "",
                 f"{fit.count('text')} had their last user turn's text cut at the end" if "text" in fit else "",
                 f"{fit.count('tail')} kept only their last {max_length} tokens (a system turn or template too long to "
                 "keep)" if "tail" in fit else ""]
        log.warning("%s: %d generation prompt(s) longer than data.max_length=%d, rendered again to fit: %s; the system "
                    "turn, the template's headers, the instruction and the generation prompt kept. Raise data.max_length "
                    "to generate from them whole.", where, cut, max_length, ", ".join(x for x in shown if x))


# ------------------------------------------------------------------------------------------------ packing and batches

def prepare_train(ds, recipe):
    """The training rows: those with a trainable token; with data.packing, examples (whole, never split) best-fit into
    rows of at most data.max_length tokens, each keeping the position ids of its examples, restarting at 0, which is
    what keeps attention within an example."""
    rows = len(ds)
    ds = ds.filter(lambda r: r["n_labels"] > 0, desc="rows with an answer within max_length")
    if not len(ds):  # (an eval or test split is generated from its prompts: it needs none)
        raise DataError("no assistant token is trainable: the chat template renders no assistant tokens within data.max_length="
                        f"{recipe.data.max_length} in any of {rows:,} training rows, so training would learn nothing. Check that "
                        "rows have assistant turns, that the chat template renders their content (task.chat_format), and "
                        "data.max_length.")
    return pack(ds, recipe.data.max_length) if recipe.data.packing else ds


def _pad(seqs: list[list[int]], value, left: bool = False, multiple: int = 8) -> torch.Tensor:
    n = -(-max(len(s) for s in seqs) // multiple) * multiple
    return torch.tensor([([value] * (n - len(s)) + s) if left else (s + [value] * (n - len(s))) for s in seqs])


def collator(tokenizer):
    """Right-padded rows (labels -100 on padding). Packed rows carry position ids and no attention mask: masking_utils
    then makes attention block-diagonal; their padding is a segment of its own (positions from 0), never a label."""
    pad = tokenizer.pad_token_id

    def collate(rows):
        batch = {"input_ids": _pad([r["input_ids"] for r in rows], pad), "labels": _pad([r["labels"] for r in rows], -100)}
        if "position_ids" in rows[0]:
            n = batch["input_ids"].shape[1]
            batch["position_ids"] = torch.tensor([r["position_ids"] + list(range(n - len(r["position_ids"]))) for r in rows])
            batch["use_cache"] = False  # an (empty) cache turns off the packed-sequence mask in masking_utils
        else:
            batch["attention_mask"] = _pad([r["attention_mask"] for r in rows], 0)
        return batch

    return collate


def eval_collator(tokenizer):
    """Model inputs + the last answer's generation prompt (left-padded), its reference and source, the row index."""
    base, pad = collator(tokenizer), tokenizer.pad_token_id

    def collate(rows):
        batch = base(rows)
        batch.update(row=[r["row"] for r in rows], source=[r["source"] for r in rows], reference=[r["reference"] for r in rows],
                     gen_input_ids=_pad([r["gen_ids"] for r in rows], pad, left=True),
                     gen_attention_mask=_pad([[1] * len(r["gen_ids"]) for r in rows], 0, left=True))
        if "references" in rows[0]:
            batch["references"] = [r["references"] for r in rows]
        return batch

    return collate


# ------------------------------------------------------------------------------------------------ evaluation

def load_metric_fn(spec: str):
    """'module:function' -> the function; the working directory is importable (a metrics.py beside the recipe)."""
    module, _, name = spec.partition(":")
    cwd = str(Path.cwd())
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        fn = getattr(importlib.import_module(module), name)
    except Exception as e:  # its module's own error too (a SyntaxError, a failing import-time line): one clear error, before training
        raise ConfigError([f"eval.metric_fn={spec!r}: cannot load it ({type(e).__name__}: {e}). Give 'module:function' of a "
                           "module importable from the working directory."]) from None
    finally:
        if added:
            sys.path.remove(cwd)
    try:  # called after training with (predictions, references): a name that cannot take them failed only then
        inspect.signature(fn).bind([], [])
    except TypeError as e:
        raise ConfigError([f"eval.metric_fn={spec!r}: {'not a function' if not callable(fn) else f'cannot take (predictions, references) ({e})'}. "
                           "Give a function taking (predictions, references) and returning {metric: value}."]) from None
    except ValueError:  # (a builtin without a signature: it is called as it is)
        pass
    return fn


def _norm(s: str) -> str:
    return " ".join(s.split())


def score(preds: list[str], refs: list[str], metric_fn: str | None, several: list[list[str]] | None = None) -> dict:
    """exact match, ROUGE and eval.metric_fn of `preds` against `refs`; with `several` (each row's references) exact
    match and ROUGE against those instead (any match; the best ROUGE), eval.metric_fn still against `refs`."""
    several = several or [[r] for r in refs]
    out = {"exact_match": sum(any(_norm(p) == _norm(r) for r in rs) for p, rs in zip(preds, several)) / max(len(refs), 1)}
    out.update(rouge_metrics(preds, several))
    if metric_fn:
        try:
            extra = load_metric_fn(metric_fn)(preds, refs)
        except Exception:  # after training too: its error is the user's report, never the lost trained run
            log.warning("eval.metric_fn=%s raised (below): its metrics are left out. Fix it, then score the run again with "
                        "`peftlab eval OUT`.", metric_fn, exc_info=True)
            extra = {}
        if not isinstance(extra, dict):  # after training too: warn, never lose the run over a report (it was an error then)
            log.warning("eval.metric_fn=%s returned %s, not {metric: number}: its metrics are left out. Return a dict, e.g. "
                        "{'my_metric': 0.5}.", metric_fn, type(extra).__name__)
            extra = {}
        numbers = {k: float(v) for k, v in extra.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if dropped := [k for k in extra if k not in numbers]:  # after training: warn, never lose the run over a report
            log.warning("eval.metric_fn=%s returned %s that are not numbers: left out of the metrics (return {metric: "
                        "number} only).", metric_fn, ", ".join(map(repr, dropped)))
        if taken := [k for k in numbers if k in BUILTIN_METRICS or k in DESCRIPTIVE]:  # (they replaced the task's own, silently)
            log.warning("eval.metric_fn=%s returned %s, which the task computes itself: left out (the task's figures kept). "
                        "Name your metrics otherwise, e.g. 'my_%s'.", metric_fn, ", ".join(map(repr, taken)), taken[0])
        out.update({k: v for k, v in numbers.items() if k not in taken})
    return out


def new_token_counts(new: torch.Tensor, stops: list[int]) -> torch.Tensor:
    """Per row of generated ids (prompt removed): the tokens it wrote, its first stop token included, the padding
    after it (generate fills finished rows) not. The report's generation tokens/s counts these, over every process (the
    rows repeated to even out the last batch included)."""
    stopped = torch.isin(new, torch.tensor(stops, device=new.device))
    return torch.where(stopped.any(1), stopped.int().argmax(1) + 1, new.shape[1])


def every_process(timing: dict, accelerator) -> dict:
    """The generation timing of every process: their tokens summed (it reported the main one's share under N processes),
    over the slowest one's seconds."""
    if accelerator.num_processes == 1:
        return timing
    done = accelerator.gather(torch.tensor([[timing["new_tokens"], timing["seconds"]]], dtype=torch.float64, device=accelerator.device))
    return {"seconds": done[:, 1].max().item(), "new_tokens": int(done[:, 0].sum().item())}


def evaluate(model, loader, accelerator, label_names, *, tokenizer=None, recipe=None):
    """-> (metrics, report): the mean loss over assistant tokens; with tokenizer and recipe (a loader from
    eval_collator) also the last answer of every row generated greedily and scored, the report holding the predictions."""
    write, timing = None, {"seconds": 0.0, "new_tokens": 0}
    if tokenizer is not None and recipe is not None:
        stops, texts = stop_ids(tokenizer), text_stops(tokenizer)
        by_text = {"tokenizer": tokenizer} if texts else {}  # (stop_strings need it)

        def write(unwrapped, batch, extras):
            ids = extras["gen_input_ids"].to(batch["input_ids"].device)
            generator, inputs, echoed = generation_inputs(unwrapped, ids, extras["gen_attention_mask"].to(ids.device))
            start = time.perf_counter()
            settings = dict(max_new_tokens=recipe.eval.max_new_tokens, do_sample=False, num_beams=1,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=stops, stop_strings=texts or None)
            # greedy as the recipe says: none of the base's generation_config.json (its repetition_penalty, sampling)
            with accelerator.autocast(), contiguous_head_input(unwrapped), evaluation_generation(generator, **settings) as config:
                gen = generator.generate(**inputs, generation_config=config, **by_text)
            timing["seconds"] += time.perf_counter() - start
            new, ends = gen[:, echoed:], list(config.eos_token_id)  # stops + the base's own end tokens (end_tokens)
            timing["new_tokens"] += int(new_token_counts(new, ends + ([tokenizer.pad_token_id] if texts else [])).sum())  # (a row
            # stopped at a text marker is padded)
            return [cut_at(p, texts).strip() for p in tokenizer.batch_decode(new, skip_special_tokens=True)]
    loss, n_tokens, rows = loss_and_predictions(model, loader, accelerator, shift=True, extras=EXTRAS, source="source",
                                                reference="reference", generate=write, task="sft")
    metrics = {"loss": loss} if loss is not None else {}
    if rows is None:
        return metrics, {"n_tokens": n_tokens}
    timing = every_process(timing, accelerator)
    preds, refs = [r["prediction"] for r in rows], [r["reference"] for r in rows]
    metrics.update(score(preds, refs, recipe.eval.metric_fn, [references(r) for r in rows]))
    metrics["gen_words"] = sum(len(p.split()) for p in preds) / max(len(preds), 1)
    log_examples(rows, recipe.eval.log_examples, "prompt")
    report = {"n": len(rows), "n_tokens": n_tokens, **several_references(rows), "predictions": rows,
              "generation": {"greedy": True, "max_new_tokens": recipe.eval.max_new_tokens, "batch_size": recipe.eval.batch_size,
                             **timing, "tokens_per_s": timing["new_tokens"] / max(timing["seconds"], 1e-9)}}
    return metrics, report
