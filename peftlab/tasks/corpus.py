"""What the continued-pretraining tasks (mlm, clm) share: unlabelled text -> token blocks of data.max_length.

Documents are tokenized, joined into one stream and cut into blocks of data.max_length tokens, so no token is padding
and none is thrown away (only the last block of a split is short). A causal LM's block keeps the position ids of its
documents (restarting at 0 where one starts, so attention stays within a document: block-diagonal); a masked LM's
block is [CLS] + tokens + [SEP] with the documents separated by [SEP], as BERT/RoBERTa pretraining packs them.
"""

from __future__ import annotations

import logging
import math

import torch

from ..errors import DataError

log = logging.getLogger(__name__)

MAX_LOG_PERPLEXITY = 700.0  # exp(700) ~ 1e304: the largest a float64 (and a JSON number) holds comfortably


def perplexity(loss: float) -> float:
    """exp(loss), as the README defines it, in float64 (an fp32 exp overflows to inf at a loss of 89, and inf is no JSON
    number); beyond a loss of 700 it is exp(700), a figure that already says the model predicts nothing."""
    return math.exp(min(float(loss), MAX_LOG_PERPLEXITY))


@torch.no_grad()
def evaluate_tokens(model, loader, accelerator, inputs, *, shift: bool) -> tuple[dict, int]:
    """The evaluation mlm and clm share -> ({loss, perplexity}, tokens scored): the mean token loss over the split,
    `inputs(batch)` giving each batch's model inputs and labels, `shift` whether a label scores the next position."""
    from .generative import row_losses

    model.eval()
    nll, tokens = 0.0, 0
    for batch in loader:
        sums, counts = accelerator.gather_for_metrics(row_losses(model, inputs(batch), accelerator, shift=shift))
        nll += sums.sum().item()
        tokens += int(counts.sum().item())
    model.train()
    loss = nll / max(tokens, 1)
    return {"loss": loss, "perplexity": perplexity(loss)}, tokens


def summary_line(split: str, m: dict) -> str:
    extra = f"   masked-token accuracy {m['accuracy']:.4f}" if "accuracy" in m else ""
    return f"   {split:<5} loss {m['loss']:.4f}   perplexity {m['perplexity']:.2f}{extra}"


def check(recipe) -> list[str]:
    d = recipe.data
    if d.label_names or d.label_words or d.target_column:
        used = [f for f in ("label_names", "label_words", "target_column") if getattr(d, f)]
        return [f"task.type={recipe.task.type} learns from unlabelled text (data.text_columns only), but the recipe sets "
                f"data.{', data.'.join(used)}. Remove them, or use task.type=classification / summarization / sft."]
    return []


def check_tokenizer(tokenizer, recipe, *, causal: bool) -> None:
    """The special tokens a block needs (`peftlab validate` asks it too, before any model is loaded): a causal LM's
    end-of-sequence between documents; a masked LM's [CLS], [SEP] and [MASK]. Each names the other task for the base."""
    if causal and tokenizer.eos_token_id is None:
        raise DataError(f"task.type=clm: the tokenizer of {recipe.model.name} has no end-of-sequence token, which separates "
                        "the documents of a causal-LM block. For an encoder (BERT-style) use task.type=mlm; else a base whose "
                        "tokenizer defines eos_token.")
    if not causal and None in (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id):
        raise DataError(f"task.type=mlm needs a tokenizer with [CLS], [SEP] and [MASK] tokens (BERT/RoBERTa style); "
                        f"{recipe.model.name}'s has not. For a decoder LLM use task.type=clm.")


def blocks(ds, tokenizer, recipe, *, causal: bool):
    """{text} rows -> blocks of at most data.max_length tokens: input_ids, length, truncated; causal blocks also
    labels (-100 where a document starts, so no token is predicted across a document boundary) and position_ids (a
    masked LM's labels are drawn by its collator)."""
    n, texts = recipe.data.max_length, [t for t in ds["text"] if t.strip()]
    if not texts:
        raise DataError("no text to learn from: every row of the split is empty. Check data.text_columns.")
    check_tokenizer(tokenizer, recipe, causal=causal)
    if causal:
        eos = tokenizer.eos_token_id
        docs = [ids if ids[-1:] == [eos] else ids + [eos] for ids in tokenizer(texts)["input_ids"]]
        room = n
    else:
        docs = [ids + [tokenizer.sep_token_id] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        room = n - 2  # [CLS] ... [SEP]
    rows: dict[str, list] = {"input_ids": [], "length": [], "truncated": []}
    if causal:
        rows.update(labels=[], position_ids=[])
    ids, pos, starts = [], [], []
    for doc in docs:
        while doc:  # a document longer than the room left continues in the next block
            take, doc = doc[:room - len(ids)], doc[room - len(ids):]
            starts.append(len(ids))
            ids += take
            pos += range(len(take))
            if len(ids) == room:
                _emit(rows, ids, pos, starts, tokenizer, causal)
                ids, pos, starts = [], [], []
    if ids:
        _emit(rows, ids, pos, starts, tokenizer, causal)
    import datasets

    out = datasets.Dataset.from_dict(rows)
    log.info("%s documents -> %s blocks of <= %d tokens (%s tokens)", f"{len(docs):,}", f"{len(out):,}", n, f"{sum(rows['length']):,}")
    return out


def _emit(rows, ids, pos, starts, tokenizer, causal: bool) -> None:
    if causal:
        labels = list(ids)
        for s in starts[1:]:
            labels[s] = -100  # the first token of a document is not predicted from the one before it
        rows["labels"].append(labels)
        rows["position_ids"].append(list(pos))
    else:  # [CLS] + tokens + [SEP]; a block that ends on a document's [SEP] does not get a second one
        ids = [tokenizer.cls_token_id, *(ids[:-1] if ids[-1] == tokenizer.sep_token_id else ids), tokenizer.sep_token_id]
    rows["input_ids"].append(list(ids))
    rows["length"].append(len(ids))
    rows["truncated"].append(False)
