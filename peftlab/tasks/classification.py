"""Sequence classification (sentiment, topic): a linear head on the encoder/decoder, cross-entropy, accuracy + macro-F1."""

from __future__ import annotations

from typing import NamedTuple

import torch
from transformers import AutoModelForSequenceClassification

from ..methods.prompt import PREFIX_ON_CLASSIFICATION
from ..metrics import CLASSIFICATION_KEYS, classification_metrics

auto_model_class = AutoModelForSequenceClassification
peft_task_type = "SEQ_CLS"
target_kind = "label"
best_metric = "accuracy"
metrics = (*CLASSIFICATION_KEYS, "loss")
pipeline_tag = "text-classification"
task_name = "Text Classification"
usage_class = "AutoModelForSequenceClassification"
card_metrics = {"accuracy": "Accuracy", "f1": "Macro F1"}


def check(recipe) -> list[str]:
    """The label rules (data.label_names) are checked with the data section: any task may name labels."""
    return [PREFIX_ON_CLASSIFICATION] if recipe.adapter.method == "prefix_tuning" else []


def summary_line(split: str, m: dict) -> str:
    return f"   {split:<5} accuracy {m['accuracy']:.4f}   macro-F1 {m['f1']:.4f}   loss {m['loss']:.4f}"


def tokenize(ds, tokenizer, recipe):
    """Tokenize without padding (the collator pads each batch to its longest row); keep `length` and `truncated`, and
    the text(s) and `row` for the predictions file. Sentence pairs (a `text_pair` column: data.text_pair) are encoded as
    pairs, the longer text cut first (encode_pairs: with a separator where the tokenizer's template puts none)."""
    max_length = recipe.data.max_length
    special = set(tokenizer.all_special_ids)
    if "text_pair" in ds.column_names:
        layout = pair_layout(tokenizer)  # (once, not per batch)
        return ds.map(lambda b: encode_pairs(b, tokenizer, max_length, layout), batched=True,
                      desc="tokenize pairs").rename_column("label", "labels")

    def enc(batch):
        # one token more than allowed tells which rows were cut, without tokenizing twice
        out = tokenizer(batch["text"], truncation=True, max_length=max_length + 1)
        cut = [len(ids) > max_length for ids in out["input_ids"]]
        keep_last = [ids[-1] in special for ids in out["input_ids"]]  # a closing [SEP] / </s> stays in place
        for key in list(out.keys()):
            out[key] = [(v[: max_length - 1] + v[-1:] if k else v[:max_length]) if c else v
                        for v, c, k in zip(out[key], cut, keep_last)]
        out["length"] = [len(ids) for ids in out["input_ids"]]
        out["truncated"] = cut
        return out

    return ds.map(enc, batched=True, desc="tokenize").rename_column("label", "labels")


def encode_pairs(batch, tokenizer, max_length: int, layout="detect") -> dict:
    """[CLS] a [SEP] b [SEP] with segment ids (the tokenizer's own pair template), or where the tokenizer puts nothing
    between the texts (`pair_layout`), a + separator + b; cut to max_length, the longer text first (longest_first) and
    never the separator, `truncated` said so. `layout`: pair_layout(tokenizer), found here when not given."""
    layout = pair_layout(tokenizer) if layout == "detect" else layout
    if layout is None:
        full = tokenizer(batch["text"], batch["text_pair"])["input_ids"]
        out = tokenizer(batch["text"], batch["text_pair"], truncation="longest_first", max_length=max_length)
        out["length"] = [len(ids) for ids in out["input_ids"]]
        out["truncated"] = [len(ids) > max_length for ids in full]
        return out
    firsts = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
    seconds = tokenizer(batch["text_pair"], add_special_tokens=False)["input_ids"]
    fixed = len(layout.before) + len(layout.separator) + len(layout.after)
    room, left = max(max_length - fixed, 0), tokenizer.truncation_side == "left"
    out = {"input_ids": [], "token_type_ids": [], "truncated": []}
    for a, b in zip(firsts, seconds):
        out["truncated"].append(fixed + len(a) + len(b) > max_length)
        keep_a = min(len(a), max(room - len(b), (room + 1) // 2))  # longest_first: the longer text is cut first, down
        keep_b = min(len(b), room - keep_a)                        # to an even split (the first text keeps an odd token)
        a, b = (a[len(a) - keep_a:], b[len(b) - keep_b:]) if left else (a[:keep_a], b[:keep_b])
        out["input_ids"].append([*layout.before, *a, *layout.separator, *b, *layout.after])
        out["token_type_ids"].append(layout.types(len(a), len(b)))
    if layout.segments is None:  # (a tokenizer that returns no token_type_ids)
        del out["token_type_ids"]
    if "attention_mask" in tokenizer.model_input_names:
        out["attention_mask"] = [[1] * len(ids) for ids in out["input_ids"]]
    out["length"] = [len(ids) for ids in out["input_ids"]]
    return out


class PairLayout(NamedTuple):
    """How a pair is encoded where the tokenizer's pair template puts nothing between the texts: the template's tokens
    before and after them, the separator peftlab puts between, and the template's segment ids (before, first text,
    second text, after), None where the tokenizer returns none."""
    before: list[int]
    separator: list[int]
    after: list[int]
    segments: tuple[list[int], int, int, list[int]] | None

    def types(self, first: int, second: int) -> list[int] | None:
        """The segment ids of a pair of these lengths (the separator: the first text's)."""
        if self.segments is None:
            return None
        before, a, b, after = self.segments
        return [*before, *[a] * (first + len(self.separator)), *[b] * second, *after]


def pair_layout(tokenizer) -> PairLayout | None:
    """None where the tokenizer's pair template separates the texts ([CLS] a [SEP] b [SEP], <s> a </s></s> b </s>, a BOS
    between): peftlab encodes pairs as the tokenizer does. Else (byte-level BPE decoders: GPT-2, SmolLM2, Qwen, whose
    `tokenizer(a, b)` is a's tokens then b's, 'The cat sat.A cat was sitting.') how peftlab encodes them: a newline
    between the texts, or the EOS token where the tokenizer has no newline. A newline, not EOS: an LM read the text after
    an EOS as a new, unrelated document in pretraining, and two related sentences a line apart as ordinary text; and the
    pad token is often EOS (SmolLM2's; peftlab pads with EOS where a tokenizer has no pad token), so an EOS inside a row
    would read as padding to whatever finds a row's last token by the pad id (older transformers' classification heads
    took the token before the first pad: the end of the first text). Found from a probe pair, once per call."""
    first, second = "Is it here?", "It is there."
    a = tokenizer(first, add_special_tokens=False)["input_ids"]
    b = tokenizer(second, add_special_tokens=False)["input_ids"]
    pair = tokenizer(first, second)
    ids, n = pair["input_ids"], len(a) + len(b)
    at = next((i for i in range(len(ids) - n + 1) if ids[i:i + n] == a + b), None)
    if at is None:  # something between the texts (or a template peftlab cannot read): the tokenizer's own encoding
        return None
    word = tokenizer("x", add_special_tokens=False)["input_ids"]
    line = tokenizer("x\n", add_special_tokens=False)["input_ids"]  # (after a word: no SentencePiece '▁' before the newline)
    separator = line[len(word):] if line[:len(word)] == word and len(line) > len(word) else []
    if not separator and tokenizer.eos_token_id is not None:
        separator = [tokenizer.eos_token_id]
    types = pair.get("token_type_ids")
    segments = None if types is None else (types[:at], types[at], types[at + len(a)], types[at + n:])
    return PairLayout(ids[:at], separator, ids[at + n:], segments)


def collator(tokenizer):
    """Pads each batch to its longest row, no further: length-grouped batches then carry 1.05x the real tokens on
    SST-2, and 47% of them none at all, so attention runs without a mask (SDPA's fast path). Padding to a multiple
    of 8 made that 1.30x and 5% (benchmarks/README.md, Throughput). On the right, whatever the tokenizer's padding_side:
    a left-padding tokenizer (GPT-2-like bases, padded left for generation) shifted every row's tokens by its batch's
    padding, and with absolute position embeddings a row's prediction depended on its batch (eval.batch_size). The
    tokenizer itself is left as it is (the generation tasks pad left on purpose)."""

    def collate(rows):
        return tokenizer.pad([{k: v for k, v in r.items() if k not in NOT_INPUTS} for r in rows], padding=True,
                             padding_side="right", return_tensors="pt")

    return collate


NOT_INPUTS = ("length", "truncated", "row", "text", "text_pair")  # what a tokenized row keeps beside the model's inputs
EXTRAS = ("row", "text", "text_pair")  # what eval_collator adds to a batch: the predictions file's


def eval_collator(tokenizer):
    """The model inputs + each row's number in its file and its text(s): the final evaluation's predictions file."""
    base = collator(tokenizer)

    def collate(rows):
        return {**base(rows), **{k: [r[k] for r in rows] for k in EXTRAS if k in rows[0]}}

    return collate


@torch.no_grad()
def evaluate(model, loader, accelerator, label_names, **context):
    """-> (headline metrics, detailed report). Gathers across processes without duplicating the padded tail. On a loader
    from eval_collator (the final evaluation) the report also holds every row's prediction, in data order: its row in
    the file, text, label, predicted label and that label's probability. `context` (tokenizer, recipe) is for tasks that
    generate; a classifier needs none."""
    model.eval()
    preds, refs, loss_sum, n, written = [], [], 0.0, 0, []
    for batch in loader:
        found = {k: batch.pop(k) for k in EXTRAS if k in batch}
        out = model(**batch)
        # per-row losses: a rank's last batch may be topped up with repeated rows, which its batch mean would count
        rows = torch.nn.functional.cross_entropy(out.logits.float(), batch["labels"], reduction="none")
        p, r, loss = accelerator.gather_for_metrics((out.logits.argmax(-1), batch["labels"], rows))
        preds.append(p.cpu())
        refs.append(r.cpu())
        loss_sum += loss.float().sum().item()
        n += len(loss)
        if "row" in found:
            written += accelerator.gather_for_metrics(prediction_rows(out.logits, batch["labels"], found, label_names),
                                                      use_gather_object=True)
    model.train()
    preds, refs = torch.cat(preds).tolist(), torch.cat(refs).tolist()
    metrics, report = classification_metrics(preds, refs, label_names)
    metrics["loss"] = loss_sum / max(n, 1)
    if written:
        report["predictions"] = sorted(written, key=lambda w: w["row"])
    return metrics, report


def prediction_rows(logits: torch.Tensor, labels: torch.Tensor, found: dict, label_names: list[str]) -> list[dict]:
    """One batch's lines of predictions-SPLIT.jsonl: {row, text(, text_pair), label, prediction, probability}."""
    probability, predicted = logits.float().softmax(-1).max(-1)
    texts = {k: found[k] for k in ("text", "text_pair") if k in found}
    return [{"row": row, **{k: v[i] for k, v in texts.items()}, "label": label_names[y], "prediction": label_names[p],
             "probability": round(q, 6)}
            for i, (row, y, p, q) in enumerate(zip(found["row"], labels.tolist(), predicted.tolist(), probability.tolist()))]


# ------------------------------------------------- the last layer at the one position the head reads (train.skip_unread)

FIRST_POSITION_HEADS = {  # model_type -> its sequence-classification class, whose head reads position 0 and nothing else
    "bert": "BertForSequenceClassification",  # BertPooler: hidden_states[:, 0]
    "roberta": "RobertaForSequenceClassification",  # RobertaClassificationHead: features[:, 0, :]
    "xlm-roberta": "XLMRobertaForSequenceClassification",
    "electra": "ElectraForSequenceClassification",  # ElectraClassificationHead: features[:, 0, :]
}


def trim(model) -> list:
    """Make the last encoder layer of a BERT-family classifier compute only position 0, the one its head reads: the
    keys and values still come from every position, the query, attention output, feed-forward block, LayerNorms and
    dropouts from position 0 alone. The logits and gradients are those of the full layer (to float rounding); the
    work skipped is 10/12 of the last layer's matmuls at every other position (all-MiniLM-L6-v2: 1/8 of a step's).
    -> the layers changed (`del layer.forward` undoes one: tasks.unread_skipped); [] for other models, which are left as
    they are, and for a layer trimmed already."""
    layers = []
    for m in model.modules():
        config = getattr(m, "config", None)
        if type(m).__name__ != FIRST_POSITION_HEADS.get(getattr(config, "model_type", None)) or config.is_decoder:
            continue
        layer = m.base_model.encoder.layer[-1]
        if "forward" not in vars(layer) and _first_position_forward(layer):  # (not one trimmed already)
            layers.append(layer)
    return layers


def _first_position_forward(layer) -> bool:
    """Give `layer` (a BERT-style layer: attention.self.{query,key,value}, attention.output, feed_forward_chunk) a
    forward that computes position 0 only (`trim`); False, unchanged, where it is not shaped so."""
    import sys

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    attention = getattr(layer, "attention", None)
    sa, so = getattr(attention, "self", None), getattr(attention, "output", None)
    eager = getattr(sys.modules[type(sa).__module__], "eager_attention_forward", None)
    if not (all(hasattr(sa, a) for a in ("query", "key", "value", "attention_head_size", "scaling", "dropout", "config"))
            and so is not None and hasattr(layer, "feed_forward_chunk") and eager is not None):
        return False
    full = type(layer).forward.__get__(layer)

    def forward(hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None, cache=None,
                **kwargs):
        if cache is not None or encoder_hidden_states is not None:  # prefix tuning's keys and values, cross-attention
            return full(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
                        cache=cache, **kwargs)
        (b, t), size = hidden_states.shape[:2], sa.attention_head_size
        first = hidden_states[:, :1]
        query = sa.query(first).view(b, 1, -1, size).transpose(1, 2)
        key = sa.key(hidden_states).view(b, t, -1, size).transpose(1, 2)
        value = sa.value(hidden_states).view(b, t, -1, size).transpose(1, 2)
        if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[-2] > 1:
            attention_mask = attention_mask[:, :, :1]  # the query row of position 0
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(sa.config._attn_implementation, eager)
        context, _ = attend(sa, query, key, value, attention_mask, dropout=sa.dropout.p if sa.training else 0.0,
                            scaling=sa.scaling, **kwargs)
        return layer.feed_forward_chunk(so(context.reshape(b, 1, -1).contiguous(), first))  # [b, 1, hidden]

    layer.forward = forward
    return True
