"""Summarization: loss masking on the token level, seq2seq (T5, BART, BERT2BERT) and causal (Llama) LoRA, generation
-> ROUGE -> predictions JSONL, the ROUGE module against rouge_score, save/reload and merge equality, a real-model smoke."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import random
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from peftlab import build_data, build_model, export, load_recipe, load_splits, load_trained, merge, run
from peftlab.errors import ConfigError, DataError, ModelError
from peftlab.publish.card import card_text

from .conftest import REPO, bytelevel_tokenizer, losses, minilm_tokenizer, shared_or_skip, with_generation_config

NAMES = ["Anna", "Tom", "Mia", "Leo", "Eva", "Sam", "Ben", "Zoe"]
ITEMS = ["cake", "keys", "book", "car", "tickets", "laptop", "guitar", "map"]
DAYS = ["today", "tomorrow", "on Monday", "at noon", "tonight"]


def dialogue_rows(n: int, seed: int) -> list[dict]:
    """Short dialogues whose summary copies a name, an object and a time from them: learnable from few examples."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.sample(NAMES, 2)
        item, day = rng.choice(ITEMS), rng.choice(DAYS)
        rows.append({"id": i, "dialogue": f"{a}: Can you bring the {item} {day}?\n{b}: Sure, I will bring the {item}.\n{a}: Thanks!",
                     "summary": f"{b} will bring the {item} {day} for {a}."})
    return rows


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["id", "dialogue", "summary"])
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def dialogues(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("samsum-like")
    long_row = {"id": 999, "dialogue": "Anna: " + " ".join(["blah"] * 200), "summary": "Anna talks a lot."}
    return {"train": write_csv(d / "train.csv", dialogue_rows(48, 1)), "eval": write_csv(d / "eval.csv", dialogue_rows(6, 2) + [long_row])}


def _save(model, tok, d: Path) -> Path:
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory) -> Path:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    tok = minilm_tokenizer()
    cfg = T5Config(vocab_size=tok.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
                   pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id, decoder_start_token_id=tok.pad_token_id)
    return _save(T5ForConditionalGeneration(cfg), tok, tmp_path_factory.mktemp("tiny-t5"))


@pytest.fixture(scope="module")
def tiny_bart(tmp_path_factory) -> Path:
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    tok = minilm_tokenizer()
    cfg = BartConfig(vocab_size=tok.vocab_size, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256, dropout=0.0,
                     attention_dropout=0.0, activation_dropout=0.0, pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
                     eos_token_id=tok.sep_token_id, decoder_start_token_id=tok.sep_token_id, forced_eos_token_id=None)
    return _save(BartForConditionalGeneration(cfg), tok, tmp_path_factory.mktemp("tiny-bart"))


@pytest.fixture
def make_sum_recipe(tmp_path, dialogues):
    def make(model: Path, overrides: dict | None = None, name: str = "out"):
        tree = {
            "name": "s", "output_dir": str(tmp_path / name), "model": {"name": str(model)},
            "adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "data": {"train": str(dialogues["train"]), "eval": str(dialogues["eval"]), "text_columns": ["dialogue"],
                     "target_column": "summary", "max_length": 48, "max_target_length": 24},
            "task": {"type": "summarization"},
            "train": {"max_steps": 3, "batch_size": 8, "lr": 1e-2, "log_every": 1, "warmup_fraction": 0.0},
            "eval": {"batch_size": 4, "max_new_tokens": 8},
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(tree))
        return load_recipe(path, [f"{k}={'null' if v is None else v}" for k, v in (overrides or {}).items()])

    return make


def built(recipe):
    splits, names = load_splits(recipe)
    model, tok, info = build_model(recipe, num_labels=len(names), label_names=names)
    return model, tok, info, build_data(recipe, tok, splits=splits, label_names=names)


def logits(model, data, n: int = 4) -> torch.Tensor:
    batch = data.collate([data.eval[i] for i in range(n)])
    with torch.no_grad():
        return model.eval()(**batch).logits.float()


# ------------------------------------------------------------------------------------------------ config, data

def test_recipe_defaults_and_validation(make_sum_recipe, tiny_llama):
    r = make_sum_recipe(tiny_llama)
    assert r.train.best_metric == "loss"  # the task's default, resolved into the written recipe
    with pytest.raises(ConfigError) as e:
        make_sum_recipe(tiny_llama, {"data.target_column": None, "task.prompt": "no slot", "train.best_metric": "bleu",
                                     "eval.num_beams": 0})
    msg = str(e.value)
    for needle in ("data.target_column is not set", "must contain {source}", "train.best_metric='bleu'", "eval.num_beams=0"):
        assert needle in msg, msg
    with pytest.raises(ConfigError, match="encoder-decoder warm start is for summarization"):
        load_recipe(None, ["model.decoder=minilm"], validate_files=False)
    with pytest.raises(ConfigError, match="cross_attention_init='self' applies to an encoder-decoder warm start only"):
        load_recipe(None, ["model.cross_attention_init=self"], validate_files=False)


def test_causal_loss_is_masked_to_the_summary_tokens(make_sum_recipe, tiny_llama):
    recipe = make_sum_recipe(tiny_llama)
    splits, _ = load_splits(recipe)
    assert set(splits["train"].column_names) == {"text", "target", "row"}  # no label encoding for a text target
    tok = minilm_tokenizer()
    data = build_data(recipe, tok, splits=splits, label_names=[])
    row = data.train[0]
    prompt = tok("Summarize this dialogue:\n" + row["text"] + "\nSummary: ", add_special_tokens=False)["input_ids"]
    summary = tok(row["target"], add_special_tokens=False)["input_ids"]
    eos = tok.sep_token_id  # MiniLM's tokenizer has no EOS: [SEP] ends the summary
    assert row["prompt_length"] == len(prompt)
    assert row["input_ids"] == prompt + summary + [eos]
    assert row["labels"] == [-100] * len(prompt) + summary + [eos]  # prompt masked; summary and EOS scored

    batch = data.collate([data.train[i] for i in range(4)])
    pad = batch["attention_mask"] == 0
    assert pad.any() and (batch["labels"][pad] == -100).all() and (batch["input_ids"][pad] == tok.pad_token_id).all()
    scored = (batch["labels"] != -100).sum(1).tolist()
    assert scored == [len(data.train[i]["labels"]) - data.train[i]["prompt_length"] for i in range(4)]

    gen = data.eval_collate([data.eval[i] for i in range(3)])  # prompts alone, left-padded, for generation
    for i in range(3):
        n = data.eval[i]["prompt_length"]
        assert gen["gen_input_ids"][i, -n:].tolist() == data.eval[i]["input_ids"][:n]
        assert gen["gen_attention_mask"][i].tolist() == [0] * (gen["gen_input_ids"].shape[1] - n) + [1] * n
    assert gen["target"][0] == data.eval[0]["target"] and "text" in gen and "row" in gen

    # with task.chat_template the prompt is the tokenizer's chat rendering of the user turn (and still masked)
    tok.chat_template = ("{% for m in messages %}<|user|> {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|> {% endif %}")
    chat = build_data(make_sum_recipe(tiny_llama, {"task.chat_template": True}, name="chat"), tok).train[0]
    rendered = tok.apply_chat_template([{"role": "user", "content": "Summarize this dialogue:\n" + row["text"] + "\nSummary: "}],
                                       tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|user|>") and chat["prompt_length"] == len(tok(rendered, add_special_tokens=False)["input_ids"])
    assert chat["labels"] == [-100] * chat["prompt_length"] + summary + [eos]

    # the model's loss covers exactly the scored tokens
    model, *_ = build_model(recipe, num_labels=0, label_names=[])
    from peftlab.accel import make_accelerator
    from peftlab.tasks.generative import row_losses

    with torch.no_grad():
        out = model(**batch)
        sums, counts = row_losses(model, batch, make_accelerator(recipe, "fp32"))
    torch.testing.assert_close(out.loss, sums.sum() / counts.sum(), rtol=1e-5, atol=1e-6)
    assert counts.tolist() == scored


def test_seq2seq_labels_and_truncation(make_sum_recipe, tiny_t5, tiny_bert):
    tok = minilm_tokenizer()
    recipe = make_sum_recipe(tiny_t5, {"task.prompt": "'summarize: {source}'"})
    data = build_data(recipe, tok)
    row = data.train[0]
    assert row["input_ids"] == tok("summarize: " + row["text"])["input_ids"]
    assert row["labels"] == tok(row["target"])["input_ids"] and row["labels"][-1] == tok.sep_token_id
    long = [r for r in data.eval if r["row"] == 6][0]  # the 200-word dialogue
    assert long["truncated"] and sum(data.eval["truncated"]) == 1
    template = len(tok("summarize:", add_special_tokens=False)["input_ids"]) + 2  # + [CLS] and [SEP]
    assert len(tok(long["text"], add_special_tokens=False)["input_ids"]) > 48 and len(long["input_ids"]) == 48 + template
    # BERT2BERT: [CLS] is the decoder start token, so the labels begin with the first summary token
    b2b = build_data(make_sum_recipe(tiny_bert, {"model.decoder": str(tiny_bert)}, name="b2b"), tok)
    assert b2b.train[0]["labels"] == tok(b2b.train[0]["target"])["input_ids"][1:]


def test_max_new_tokens_beyond_the_decoders_positions_is_refused_before_training(make_sum_recipe, tiny_bert, tiny_llama):
    """eval.max_new_tokens was checked against nothing: a BERT2BERT with eval.max_new_tokens=600 on 512 positions trained,
    then its final generation failed with a raw RuntimeError at decoder position 512, and the trained weights were lost.
    Its decoder must hold the start token + max_new_tokens; a decoder-only model the prompt + max_new_tokens."""
    from peftlab.run import preflight

    b2b = make_sum_recipe(tiny_bert, {"model.decoder": str(tiny_bert), "eval.max_new_tokens": 200}, name="b2b")  # 128 positions
    problems = preflight(b2b, training=False)  # `validate`
    assert any("eval.max_new_tokens + 1 (the decoder start token) = 200 + 1 exceeds the 128 positions" in p
               and "Set eval.max_new_tokens so that it is <= 127" in p for p in problems), problems
    with pytest.raises(ModelError, match=r"eval.max_new_tokens \+ 1 .* exceeds the 128 positions"):
        build_model(b2b, num_labels=0, label_names=[])
    b2b.eval.max_new_tokens = 127
    assert not any("positions" in p for p in preflight(b2b, training=False))
    causal = make_sum_recipe(tiny_llama, {"eval.max_new_tokens": 100}, name="causal")  # 48 + 100 > 128
    assert any("data.max_length" in p and "eval.max_new_tokens" in p and "exceeds the 128 positions" in p
               for p in preflight(causal, training=False))


def test_an_evaluation_whose_overrides_exceed_the_positions_is_refused_before_the_model_loads(make_sum_recipe, tiny_bert, tmp_path):
    """`peftlab eval RUN eval.max_new_tokens=200` (or data.max_length=200) on a BERT2BERT run of 128 positions failed
    deep in generation (RuntimeError: expanded size ... from modeling_bert): the evaluation's checks never compared the
    overridden lengths with the position tables, as validate does. Refused, for the run's adapter and its merged model,
    by evaluate and by the checks `eval --launch` makes before it starts any process."""
    from peftlab.run import check_evaluation, evaluate

    recipe = make_sum_recipe(tiny_bert, {"model.decoder": str(tiny_bert), "train.max_steps": 1}, name="b2b")
    run(recipe)
    for folder in (recipe.out, merge(recipe.out)):
        for override, message in (("eval.max_new_tokens=200", r"eval.max_new_tokens \+ 1 \(the decoder start token\) = 200 \+ 1 exceeds the 128"),
                                  ("data.max_length=200", r"data.max_length \+ the prompt template and special tokens = 200 \+ 2 exceeds the 128")):
            for check in (evaluate, check_evaluation):
                with pytest.raises(ModelError, match=message):
                    check(folder, "eval", [override])
    assert "rougeL" in evaluate(recipe.out, "eval", ["eval.max_new_tokens=20"], results_dir=tmp_path / "results")


def test_the_prompts_template_and_special_tokens_count_against_the_positions(make_sum_recipe, tiny_bert, tiny_llama):
    """The length check counted data.max_length alone for the encoder (and max_length + max_target_length for a decoder),
    but the prompt holds [CLS]/[SEP], BOS and the template's text on top, and batches were padded up to a multiple of 8:
    the minilm recipe with data.max_length=511 said ok, then failed in its first step ('expanded size of the tensor (520)
    must match (512)')."""
    from peftlab.run import preflight
    from peftlab.tasks.summarization import _pad

    b2b = make_sum_recipe(tiny_bert, {"model.decoder": str(tiny_bert), "data.max_length": 127}, name="b2b")  # 128 positions
    assert any("data.max_length + the prompt template and special tokens = 127 + 2 exceeds the 128 positions" in p
               and "Set data.max_length so that it is <= 126" in p for p in preflight(b2b, training=False))
    b2b.data.max_length = 126
    assert not any("positions" in p for p in preflight(b2b, training=False))
    causal = make_sum_recipe(tiny_llama, {"data.max_length": 100}, name="causal")  # 100 + 24 fit, not with the default template
    assert any("data.max_length + the prompt template and special tokens + data.max_target_length = 100 + " in p
               and "exceeds the 128 positions" in p for p in preflight(causal, training=False))
    assert _pad([[1] * 513], 0, limit=514).shape[1] == 514 and _pad([[1] * 9], 0, limit=514).shape[1] == 16  # never past the table


def test_each_length_problem_names_the_bound_of_its_own_key_and_all_are_said_at_once(make_sum_recipe, tiny_bert, tiny_llama):
    """'data.max_length + the prompt template and special tokens = 256 + 2 exceeds the 256 positions ... Set
    data.max_length so that it is <= 256' gave the bound of the sum, not of the key (254; eval.max_new_tokens + 1: 255),
    and the first problem found hid the others until it was fixed."""
    from peftlab.run import preflight

    b2b = make_sum_recipe(tiny_bert, {"model.decoder": str(tiny_bert), "data.max_length": 200, "eval.max_new_tokens": 200}, name="b2b")
    fixes = ["Set data.max_length so that it is <= 126.", "Set eval.max_new_tokens so that it is <= 127."]  # 128 positions
    problems = preflight(b2b, training=False)
    assert all(any(fix in p for p in problems) for fix in fixes), problems
    with pytest.raises(ModelError) as refused:
        build_model(b2b, num_labels=0, label_names=[])
    assert all(fix in str(refused.value) for fix in fixes), refused.value
    causal = make_sum_recipe(tiny_llama, {"data.max_length": 100, "data.max_target_length": 24}, name="causal")
    problem = next(p for p in preflight(causal, training=False) if "positions" in p)
    extra = int(re.search(r"= 100 \+ (\d+) \+ 24 exceeds the 128", problem).group(1))  # the template's tokens
    assert f"Set data.max_length so that it is <= {128 - extra - 24} (or lower data.max_target_length)." in problem, problem
    causal.data.max_length = 128 - extra - 24
    assert not any("positions" in p for p in preflight(causal, training=False))


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_a_decoders_virtual_tokens_count_against_the_positions_of_the_generated_sequence_too(make_sum_recipe, tiny_llama, method):
    """A decoder's virtual tokens (prompt tuning's embeddings, a prefix's keys and values) take positions before the
    prompt in generation as in training, but were counted in the training sequence only: a GPT-2 summarizer whose
    prompt + eval.max_new_tokens filled its 128 positions passed `validate`, trained, then its final generation failed
    in the position table's lookup (IndexError: index out of range in self)."""
    from peftlab.run import preflight

    causal = make_sum_recipe(tiny_llama, {"eval.max_new_tokens": 200}, name="causal")  # 48 + the template's + 200 > 128
    problem = next(p for p in preflight(causal, training=False) if "eval.max_new_tokens" in p)
    fits = 128 - int(re.search(r"= 48 \+ (\d+) \+ 200 exceeds the 128", problem).group(1)) - 48  # without virtual tokens
    settings = {"adapter.method": method, "adapter.target_modules": None, "adapter.num_virtual_tokens": 4, "eval.max_new_tokens": fits}
    assert not any("positions" in p for p in preflight(make_sum_recipe(tiny_llama, {"eval.max_new_tokens": fits}, name="lora"), training=False))
    problems = [p for p in preflight(make_sum_recipe(tiny_llama, settings, name="pt"), training=False) if "positions" in p]
    assert any(f"+ eval.max_new_tokens = 48 + {128 - 48 - fits} + {fits}, + adapter.num_virtual_tokens=4, exceeds the 128 positions" in p
               and "Set data.max_length so that it is <= 44 (or lower eval.max_new_tokens, adapter.num_virtual_tokens)." in p
               for p in problems), problems
    settings["eval.max_new_tokens"] = fits - 4
    assert not any("positions" in p for p in preflight(make_sum_recipe(tiny_llama, settings, name="pt4"), training=False))


def test_an_encoder_only_base_without_a_decoder_is_refused(make_sum_recipe, tiny_bert, tiny_llama):
    """A BERT without model.decoder loaded as AutoModelForCausalLM: BertLMHeadModel with is_decoder=False, whose
    attention goes both ways, trained and scored as a 'causal' summarizer that sees the summary it predicts."""
    from transformers import BartConfig, BertConfig, ElectraConfig, GPT2Config, LlamaConfig, RobertaConfig

    from peftlab.run import preflight

    recipe = make_sum_recipe(tiny_bert, name="bert")
    problems = preflight(recipe, training=False)  # `validate`
    assert any("is an encoder-only model (bert)" in p and "set model.decoder" in p for p in problems), problems
    with pytest.raises(ModelError, match="is an encoder-only model"):
        build_model(recipe, num_labels=0, label_names=[])
    assert not any("encoder-only" in p for p in preflight(make_sum_recipe(tiny_llama, name="llama"), training=False))
    assert not any("encoder-only" in p for p in preflight(make_sum_recipe(tiny_bert, {"model.decoder": str(tiny_bert)}, name="b2b"),
                                                          training=False))
    from peftlab.model import encoder_only  # BERT-family causal LMs need is_decoder=True; decoders and BART do not

    assert [encoder_only(c) for c in (BertConfig(), RobertaConfig(), ElectraConfig())] == [True] * 3
    assert [encoder_only(c) for c in (BertConfig(is_decoder=True), LlamaConfig(), GPT2Config(), BartConfig())] == [False] * 4


def test_a_base_folder_rewritten_in_one_process_is_read_again(make_sum_recipe, tiny_bart, tiny_gpt2_left, tmp_path):
    """A notebook that retrains the run a model.from_run starts from (RUN/merged rewritten with another base), or
    rewrites a base folder, then runs again: the family and the tokenizer counted are the folder's new model's. Cached
    by path, the BART read first was still served for the decoder after it: its summaries were generated as a seq2seq
    model's (they echoed the prompt: ROUGE 0.47 where a fresh process scored 0)."""
    import shutil

    from peftlab.tasks.summarization import base_tokens, family

    base = shutil.copytree(tiny_bart, tmp_path / "base")
    recipe = make_sum_recipe(base)
    assert family(recipe, None) == "seq2seq" and base_tokens(recipe, len, "vocabulary") == len(minilm_tokenizer())
    shutil.rmtree(base)
    shutil.copytree(tiny_gpt2_left, base)
    assert family(recipe, None) == "causal"
    assert base_tokens(recipe, len, "vocabulary") == len(bytelevel_tokenizer()) < len(minilm_tokenizer())


@pytest.mark.parametrize("family,max_target", [("t5", 11), ("llama", 10)])  # (T5 with a BERT tokenizer: [CLS] and [SEP] in its labels)
def test_summaries_cut_to_max_target_length_are_reported_and_all_cut_is_refused(family, max_target, make_sum_recipe, request, caplog):
    """Summaries cut to data.max_target_length were neither counted nor reported (sources are), and a training split
    whose every summary was cut trained a model that never learns to end one, silently."""
    model = request.getfixturevalue(f"tiny_{family}")
    with caplog.at_level("WARNING"):
        data = build_data(make_sum_recipe(model, {"data.max_target_length": max_target}, name="some"), minilm_tokenizer())
    cut = sum(len(minilm_tokenizer()(r["target"], add_special_tokens=False)["input_ids"]) > 9 for r in data.train)  # 20 of 48
    assert 0 < cut < len(data.train) and sum(data.train["target_truncated"]) == cut
    assert f"data.train: {cut} of 48 summaries" in caplog.text and "Raise data.max_target_length" in caplog.text, caplog.text
    with pytest.raises(DataError, match=r"data.train: all 48 summaries are longer than data.max_target_length=3 tokens"):
        build_data(make_sum_recipe(model, {"data.max_target_length": 3}, name="all"), minilm_tokenizer())


# ------------------------------------------------------------------------------------------------------- ROUGE

def test_rouge_module_matches_rouge_score():
    from rouge_score import rouge_scorer

    from peftlab.metrics import rouge_metrics

    preds = ["Anna will bring the cake tomorrow. Tom is happy!", "the keys are lost", "", "Running dogs ran home."]
    refs = ["Tom will bring the cake tomorrow for Anna.", "Leo lost his keys. He is sad.", "Mia is late.", "The dog runs home."]
    got = rouge_metrics(preds, refs)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    lines = lambda t: "\n".join(s for s in re.split(r"(?<=[.!?])\s+", t) if s)  # one sentence per line, for Lsum
    want = [scorer.score(lines(r), lines(p)) for p, r in zip(preds, refs)]
    for k in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert got[k] == pytest.approx(sum(w[k].fmeasure for w in want) / len(want), abs=1e-12), k
    assert got["rougeLsum"] != got["rougeL"]  # sentences matter for Lsum
    assert rouge_metrics(["same words here"], ["same words here"])["rouge2"] == pytest.approx(1.0)
    assert rouge_metrics(["running"], ["runs"])["rouge1"] == pytest.approx(1.0)  # Porter stemming


# ----------------------------------------------------------------------------------------- train -> generate -> ROUGE

@pytest.mark.parametrize("family", ["t5", "bart", "llama"])
def test_generate_rouge_predictions_and_merge(family, make_sum_recipe, request):
    from peftlab.metrics import rouge_metrics
    from peftlab.run import evaluate

    base = request.getfixturevalue({"t5": "tiny_t5", "bart": "tiny_bart", "llama": "tiny_llama"}[family])
    recipe = make_sum_recipe(base, {"eval.num_beams": 2, "eval.no_repeat_ngram_size": 2, "train.precision": "fp32"}, name=family)
    summary = run(recipe)
    m = summary["metrics"]["eval"]
    assert {"loss", "rouge1", "rouge2", "rougeL", "rougeLsum", "gen_words"} <= set(m)
    out = recipe.out
    rows = [json.loads(line) for line in (out / "predictions-eval.jsonl").read_text().splitlines()]
    with open(recipe.data.eval.path, encoding="utf-8") as f:
        expected = [r["summary"] for r in csv.DictReader(f)]
    assert [r["row"] for r in rows] == list(range(7)) and [r["reference"] for r in rows] == expected  # data order
    assert all(isinstance(r["prediction"], str) and r["source"] for r in rows)
    assert rouge_metrics([r["prediction"] for r in rows], expected)["rougeL"] == pytest.approx(m["rougeL"])
    # the card's snippet, run as written on this folder and a longer source than data.max_length, summarizes as
    # peftlab's evaluation did (it had no generate example)
    from transformers import AutoTokenizer

    with open(recipe.data.eval.path, encoding="utf-8") as f:
        sources = [r["dialogue"] for r in csv.DictReader(f)]
    sizes = [len(ids) for ids in AutoTokenizer.from_pretrained(out)(sources, add_special_tokens=False)["input_ids"]]
    i = sizes.index(max(sizes))
    source = sources[i]
    assert sizes[i] > recipe.data.max_length
    snippet = re.search(r"```python\n(.*?)```", card_text(out), re.S).group(1)
    snippet = re.sub(r"repo = .*", f"repo = {str(out)!r}", snippet)
    snippet = re.sub(r"base_model = .*", f"base_model = {str(base)!r}", snippet)
    snippet = re.sub(r"source = .*", f"source = {source!r}", snippet, count=1)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(snippet, {})
    assert printed.getvalue().strip() == rows[i]["prediction"], (printed.getvalue(), rows[i], snippet)
    history = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evals = [h for h in history if h["kind"] == "eval"]
    assert evals and not any("rougeL" in h for h in evals)  # training evals: loss only
    assert [h["kind"] for h in history if "rougeL" in h] == ["final_eval"]  # the final one scores the generations

    adapter_model, tok, *_ = load_trained(out)
    data = build_data(load_recipe(out / "recipe.yaml", validate_files=False), tok)
    target = merge(out)
    merged_model, *_ = load_trained(target)
    assert not any("lora" in k for k, _ in merged_model.named_parameters())
    diff = (logits(adapter_model, data) - logits(merged_model, data)).abs().max().item()
    assert diff <= 1e-4, diff
    assert evaluate(target)["loss"] == pytest.approx(m["loss"], rel=1e-4)  # `peftlab eval` on the merged folder
    assert (target / "predictions-eval.jsonl").is_file()
    # the merged folder's card snippet too (a full model: its class from config.json; a decoder's was AutoModelForSeq2SeqLM)
    snippet = re.search(r"```python\n(.*?)```", card_text(target), re.S).group(1)
    snippet = re.sub(r"source = .*", f"source = {source!r}", re.sub(r"repo = .*", f"repo = {str(target)!r}", snippet), count=1)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(snippet, {})
    assert printed.getvalue().strip() == rows[i]["prediction"], (printed.getvalue(), rows[i], snippet)


def test_accumulation_weighs_micro_batches_by_their_summary_tokens(make_sum_recipe, tiny_llama):
    """4 x 2 accumulated = a batch of 8: the step is one mean over all its summary tokens. Each micro-batch's own mean
    (a short summary's tokens weighing more) trained another model (2.5e-3 off on the adapter after 2 steps)."""
    ov = {"train.precision": "fp32", "train.max_steps": 2, "train.lr": 3e-2, "train.group_by_length": False,
          "data.max_target_length": 64}
    run(make_sum_recipe(tiny_llama, {**ov, "train.batch_size": 8}, name="big"))
    run(make_sum_recipe(tiny_llama, {**ov, "train.batch_size": 4, "train.grad_accum": 2}, name="acc"))
    out = make_sum_recipe(tiny_llama, name="big").out.parent
    big, acc = (load_file(out / name / "adapter_model.safetensors") for name in ("big", "acc"))
    diff = max((big[k] - acc[k]).abs().max().item() for k in big)
    assert diff < 1e-5, diff
    assert losses(out / "acc") == pytest.approx(losses(out / "big"), abs=1e-5)


def test_rouge_keep_best_generates_at_each_evaluation_and_keeps_the_best(make_sum_recipe, tiny_t5):
    # the evaluations during training fold the adapter as the final one does: the exact loss tells the kept step's
    # weights from the last step's
    recipe = make_sum_recipe(tiny_t5, {"train.best_metric": "rougeL", "train.eval_every": 1, "train.max_steps": 4}, name="rouge-best")
    summary = run(recipe)
    evals = [json.loads(line) for line in (recipe.out / "log.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["kind"] == "eval"]
    assert [e["step"] for e in evals] == [1, 2, 3, 4] and all("rougeL" in e and "loss" in e for e in evals)
    best = max(evals, key=lambda e: e["rougeL"])  # first of the ties, as the loop keeps on strict improvement only
    assert summary["best_step"] == best["step"] < evals[-1]["step"], "the kept weights must come from an earlier evaluation"
    assert summary["metrics"]["eval"]["rougeL"] == pytest.approx(best["rougeL"]), "the exported weights are the kept step's"
    assert summary["metrics"]["eval"]["loss"] == pytest.approx(best["loss"], rel=1e-4)  # the loss still falls after it:
    assert summary["metrics"]["eval"]["loss"] != pytest.approx(evals[-1]["loss"], rel=1e-3)  # not the last step's weights


def test_bert2bert_trains_new_cross_attention_and_reloads_exactly(make_sum_recipe, tiny_bert):
    from peftlab.accel import make_accelerator
    from peftlab.train import train

    # fp32 (the recipe and the accelerator): "exactly" holds when the trained and the reloaded model compute alike
    recipe = make_sum_recipe(tiny_bert, {"model.decoder": str(tiny_bert), "adapter.target_modules": "[query,value]",
                                         "train.precision": "fp32"}, name="b2b")
    model, tok, info, data = built(recipe)
    from transformers import EncoderDecoderModel

    base = model.get_base_model()
    assert isinstance(base, EncoderDecoderModel) and model.peft_config["default"].task_type == "SEQ_2_SEQ_LM"
    assert base.config.decoder_start_token_id == tok.cls_token_id and base.generation_config.eos_token_id == tok.sep_token_id
    assert len([h for h in info.head_modules if h.endswith("crossattention")]) == 2  # one per decoder layer
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainable = {k for k, v in model.named_parameters() if v.requires_grad}
    assert all("lora_" in k or ("modules_to_save" in k and ("crossattention" in k or "transform" in k)) for k in trainable), trainable
    assert not any("crossattention" in k and "lora_" in k for k in trainable)  # new layers are trained in full, not adapted

    accelerator = make_accelerator(recipe, "fp32")
    model, _ = train(recipe, model, data, accelerator, recipe.out)
    after = dict(model.named_parameters())
    changed = {k for k in before if not torch.equal(before[k], after[k].detach())}
    assert changed <= trainable and any("crossattention" in k for k in changed) and any("lora_B" in k for k in changed)
    want = logits(model, data)
    export(recipe.out, model, tok, recipe, {"label_names": [], "precision": "fp32"}, {})
    again, *_ = load_trained(recipe.out)
    torch.testing.assert_close(logits(again, data), want, atol=1e-5, rtol=0)
    merged, *_ = load_trained(merge(recipe.out))
    assert type(merged).__name__ == "EncoderDecoderModel"
    assert (logits(merged, data) - want).abs().max().item() <= 1e-4

    from peftlab.tasks.summarization import generate

    batch = data.eval_collate([data.eval[i] for i in range(2)])
    extras = {k: batch.pop(k) for k in ("text", "target", "row")}
    texts = generate(merged, tok, batch, extras, recipe.eval, accelerator)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


@pytest.mark.parametrize("method", ["loha", "vera"])
def test_bert2bert_with_a_method_other_than_lora_merges_its_trained_cross_attention(make_sum_recipe, tiny_bert, method):
    """The new cross-attention layers are trained whole (modules_to_save), and are no single Linear: peft's generic unload
    (LoHa, VeRA...: all but LoRA's) failed on them as on an MLM head. The merge puts them in place first (export.merge_and_unload):
    the merged EncoderDecoderModel computes the adapter model's logits."""
    recipe = make_sum_recipe(tiny_bert, {"model.decoder": str(tiny_bert), "adapter.method": method, "adapter.target_modules": "[query,value]",
                                         "train.precision": "fp32"},
                             name=f"b2b-{method}")
    run(recipe)
    adapter_model, tok, *_ = load_trained(recipe.out)
    data = build_data(recipe, tok, splits=load_splits(recipe)[0], label_names=[])
    merged, *_ = load_trained(merge(recipe.out))
    assert type(merged).__name__ == "EncoderDecoderModel"
    assert not any("modules_to_save" in k for k, _ in merged.named_parameters())
    assert (logits(merged, data) - logits(adapter_model, data)).abs().max().item() <= 1e-5


def test_validate_checks_the_adapter_on_a_bert2bert_warm_start(make_sum_recipe, tiny_bert):
    """A warm start (model.decoder) was not built on the meta device: validate said ok to target_modules that match
    nothing, a rank above any layer's and an OFT r that divides no width, which train refused. The same messages now."""
    from peftlab.errors import ModelError
    from peftlab.model import model_problems

    warm = {"model.decoder": str(tiny_bert), "train.precision": "fp32"}
    for extra, says in (({"adapter.target_modules": "[nope]"}, r"'nope' matches no module of EncoderDecoderModel"),
                        ({"adapter.r": 100000}, r"adapter.r=100000: above the largest rank .* Set adapter.r <= 32"),
                        ({"adapter.method": "oft", "adapter.r": 5}, r"Invalid `r` \(5\)! Adjusted .* must divide the input width")):
        recipe = make_sum_recipe(tiny_bert, {**warm, **extra}, name="b2b-check")
        assert [p for p in model_problems(recipe) if re.search(says, p)], model_problems(recipe)
        with pytest.raises(ModelError, match=says):
            built(recipe)
    assert model_problems(make_sum_recipe(tiny_bert, {**warm, "adapter.method": "oft", "adapter.r": 4}, name="b2b-ok")) == []


@pytest.mark.parametrize("init", ["random", "self"])
def test_bert2bert_cross_attention_init(make_sum_recipe, tiny_bert, init):
    recipe = make_sum_recipe(tiny_bert, {"model.decoder": str(tiny_bert), "model.cross_attention_init": init}, name=f"b2b-{init}")
    model, *_ = built(recipe)
    layers = model.get_base_model().decoder.bert.encoder.layer

    def weights(module):  # the pretrained weights under any LoRA wrapper, and the trained copy of a module peft saves in full
        return {k.replace("base_layer.", "").replace("modules_to_save.default.", ""): v for k, v in module.state_dict().items()
                if "lora_" not in k and "original_module" not in k}

    for layer in layers:
        own, cross = weights(layer.attention), weights(layer.crossattention)
        assert own.keys() == cross.keys() and own
        same = all(torch.equal(own[k], cross[k]) for k in own)
        assert same == (init == "self"), (init, [k for k in own if not torch.equal(own[k], cross[k])])


@pytest.mark.parametrize("method", ["ia3", "loha", "lokr", "vera", "oft", "adalora"])
def test_bert2bert_with_each_layer_method_adapts_peft_default_layers_and_reloads_exactly(make_sum_recipe, tiny_bert, method):
    """A BERT2BERT warm start (model_type 'encoder-decoder', in no peft table) with any layer method but LoRA and no
    adapter.target_modules stopped in peft.get_peft_model with a bare "Please specify `target_modules`" traceback, while
    `validate` said ok. Each method now adapts peft's defaults for the encoder's architecture (BERT: IA3's key, value and
    output.dense, the others' query and value), in both halves, trains, and reloads with the same logits."""
    from peftlab.accel import make_accelerator
    from peftlab.train import train

    recipe = make_sum_recipe(tiny_bert, {"model.decoder": str(tiny_bert), "adapter.method": method, "adapter.target_modules": None,
                                         "adapter.r": 2, "adapter.alpha": 4, "train.precision": "fp32"}, name=f"b2b-{method}")
    model, tok, info, data = built(recipe)
    adapted = [n for n, m in model.named_modules() if type(m).__module__.startswith("peft.tuners.") and hasattr(m, "base_layer")]
    assert {n.split(".")[2] for n in adapted} == {"encoder", "decoder"}, adapted  # base_model.model.{encoder,decoder}...
    assert {n.rsplit(".", 1)[-1] for n in adapted} >= {"value"}
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    model, _ = train(recipe, model, data, make_accelerator(recipe, "fp32"), recipe.out)
    changed = {k for k, v in model.named_parameters() if not torch.equal(before[k], v.detach())}
    assert any("modules_to_save" not in k for k in changed), changed  # the adapter's own weights trained, not only cross-attention
    want = logits(model, data)
    export(recipe.out, model, tok, recipe, {"label_names": [], "precision": "fp32"}, {})
    again, *_ = load_trained(recipe.out)
    torch.testing.assert_close(logits(again, data), want, atol=1e-5, rtol=0)


def test_a_method_with_no_default_layers_for_the_architecture_is_a_clear_error(make_sum_recipe, tiny_bert, monkeypatch, tmp_path, capsys):
    """An architecture in no peft table of the method (here: BERT taken out of IA3's), without adapter.target_modules:
    `validate` says it from the encoder's config, and the build a ModelError naming the linear layers and the setting,
    not peft's bare ValueError."""
    from peft.utils import constants

    from peftlab.cli import main

    monkeypatch.delitem(constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING, "bert")
    recipe = make_sum_recipe(tiny_bert, {"model.decoder": str(tiny_bert), "adapter.method": "ia3", "adapter.target_modules": None},
                             name="b2b-none")
    with pytest.raises(ModelError, match="adapter.method=ia3 on a bert base: peft has no default layers.*query.*adapter.target_modules="):
        built(recipe)
    assert main(["validate", str(tmp_path / "b2b-none.yaml"), f"model.decoder={tiny_bert}", "adapter.method=ia3",
                 "adapter.target_modules=null"]) == 2
    assert "adapter.method=ia3 on a bert base: peft has no default layers" in capsys.readouterr().out
    assert main(["validate", str(tmp_path / "b2b-none.yaml"), f"model.decoder={tiny_bert}", "adapter.method=loha",
                 "adapter.target_modules=null"]) == 0  # LoHa's table still has BERT


@pytest.mark.parametrize("encoder,decoder,named", [("tiny_bert", "tiny_llama", "model.decoder="), ("tiny_t5", "tiny_bert", "model.name=")])
def test_a_warm_start_from_checkpoints_it_cannot_pair_is_refused_by_validate_and_train(make_sum_recipe, request, encoder, decoder, named):
    """model.decoder a Llama (no cross-attention) passed validate with a note, then train raised EncoderDecoderModel's raw
    ValueError; model.name a T5 (an encoder-decoder) passed validate and train failed at its first step ('You must
    specify exactly one of input_ids or inputs_embeds'). Both refused from their configs, with what to use instead."""
    from peftlab.run import preflight

    recipe = make_sum_recipe(request.getfixturevalue(encoder), {"model.decoder": str(request.getfixturevalue(decoder))}, name="warm")
    fix = "model.name must be an encoder-only model and model.decoder an encoder-style checkpoint that can take cross-attention"
    problems = preflight(recipe, training=False)  # `validate`
    assert any(p.startswith(named) and fix in p for p in problems), problems
    with pytest.raises(ModelError, match=f"{named}.*{fix}"):
        build_model(recipe, num_labels=0, label_names=[])


def test_cross_attention_init_self_refuses_a_decoder_it_cannot_copy(make_sum_recipe, tiny_bert, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from peftlab.errors import ModelError

    gpt2 = tmp_path / "tiny-gpt2"  # GPT-2 blocks call their self-attention `attn`: nothing of the same name to copy
    GPT2LMHeadModel(GPT2Config(vocab_size=len(minilm_tokenizer()), n_embd=32, n_layer=1, n_head=4, n_positions=128)).save_pretrained(gpt2)
    recipe = make_sum_recipe(tiny_bert, {"model.decoder": str(gpt2), "model.cross_attention_init": "self"}, name="b2gpt2")
    with pytest.raises(ModelError, match="cross_attention_init=self: the layers of GPT2LMHeadModel have no"):
        built(recipe)


# ---------------------------------------------------------------------------------------------- real model, real data

def test_stories260k_samsum_end_to_end(tmp_path, monkeypatch):
    shared_or_skip("models", "stories260k", "config.json")
    shared_or_skip("data", "samsum", "train.csv")
    monkeypatch.chdir(REPO)
    recipe = load_recipe(REPO / "recipes" / "stories260k" / "samsum-lora.yaml", [
        "data.train.max_samples=32", "data.eval.max_samples=4", "data.max_length=96", "train.max_steps=3", "train.batch_size=8",
        "train.log_every=1", "eval.max_new_tokens=8", "export.merge=false", f"output_dir={tmp_path / 'out'}"])
    summary = run(recipe)
    m = summary["metrics"]["eval"]
    assert 0 < m["loss"] < 10
    train = losses(recipe.out)
    assert len(train) == 3 and all(0 < x < 10 for x in train)
    rows = [json.loads(r) for r in (recipe.out / "predictions-eval.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["reference"] for r in rows)
    from peftlab.metrics import rouge_metrics

    assert m["rougeL"] == pytest.approx(rouge_metrics([r["prediction"] for r in rows], [r["reference"] for r in rows])["rougeL"])


def test_two_process_generation_equals_one_process(make_sum_recipe, tiny_t5):
    """`peftlab eval` on 2 ranks: each rank generates for its share of the 7 rows (rank 1's padded tail is dropped) and
    the gathered predictions, in data order, equal the 1-process final evaluation's."""
    from .test_distributed import LAUNCH_2_CPU, sh

    recipe = make_sum_recipe(tiny_t5, {"eval.batch_size": 2}, name="gen2")
    one = run(recipe)["metrics"]["eval"]
    first = (recipe.out / "predictions-eval.jsonl").read_text()
    sh([*LAUNCH_2_CPU, "-m", "peftlab.cli", "eval", str(recipe.out)], cwd=recipe.out.parent)
    two = json.loads((recipe.out / "eval-eval.json").read_text())
    assert two["report"]["n"] == 7
    assert (recipe.out / "predictions-eval.jsonl").read_text() == first
    assert {k: two["metrics"][k] for k in ("rouge1", "rougeL")} == {k: one[k] for k in ("rouge1", "rougeL")}
    assert two["metrics"]["loss"] == pytest.approx(one["loss"], rel=1e-5)


def test_a_summarizer_trained_from_scratch_builds_its_decoder_from_the_config(tiny_llama):
    """adapter.method=scratch asks the task's model class for `from_config` (it had only `from_pretrained`)."""
    recipe = load_recipe(None, [f"model.name={tiny_llama}", "task.type=summarization", "data.target_column=summary",
                                "adapter.method=scratch", "data.max_length=64", "data.max_target_length=32", "eval.max_new_tokens=32"],
                         validate_files=False)
    model, _, info = build_model(recipe, num_labels=0, label_names=[])
    assert type(model).__name__ == "LlamaForCausalLM" and info.trainable_params == info.total_params


def test_no_repeat_ngram_leaves_a_decoders_prompt_free_to_copy():
    """eval.no_repeat_ngram_size on a decoder-only model: transformers' blocker counted the prompt's n-grams too, so the
    summary could copy no name or phrase of the dialogue (SmolLM2: 0 trigrams shared with it, 53 without the setting)."""
    from types import SimpleNamespace

    from transformers import NoRepeatNGramLogitsProcessor

    from peftlab.tasks.summarization import SummaryNoRepeatNGram, generate

    prompt = [5, 6, 7]
    scores = torch.zeros(1, 10)
    assert NoRepeatNGramLogitsProcessor(2)(torch.tensor([prompt + [5]]), scores.clone())[0, 6] == -float("inf")
    assert SummaryNoRepeatNGram(2, len(prompt))(torch.tensor([prompt + [5]]), scores.clone())[0, 6] == 0  # may copy "5 6"
    assert SummaryNoRepeatNGram(2, len(prompt))(torch.tensor([prompt + [5, 6, 5]]), scores.clone())[0, 6] == -float("inf")

    seen = {}

    class Model(torch.nn.Module):
        def generate(self, input_ids, attention_mask, generation_config, **kwargs):
            seen.update(kwargs, no_repeat_ngram_size=generation_config.no_repeat_ngram_size)
            return input_ids

    tok = SimpleNamespace(pad_token_id=0, eos_token_id=1, batch_decode=lambda ids, **k: [""] * len(ids))
    cfg = SimpleNamespace(max_new_tokens=4, num_beams=1, no_repeat_ngram_size=3)
    acc = SimpleNamespace(autocast=contextlib.nullcontext)
    ids = torch.tensor([prompt])
    generate(Model(), tok, {}, {"gen_input_ids": ids, "gen_attention_mask": torch.ones_like(ids)}, cfg, acc)  # decoder-only
    assert not seen["no_repeat_ngram_size"] and seen["logits_processor"][0].prompt_length == 3
    seen.clear()
    generate(Model(), tok, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, {}, cfg, acc)  # encoder-decoder
    assert seen["no_repeat_ngram_size"] == 3 and "logits_processor" not in seen


@pytest.mark.parametrize("family,method", [("t5", "lora"), ("llama", "lora"), ("llama", "prompt_tuning")])
def test_a_bases_generation_config_does_not_change_what_evaluation_generates(family, method, make_sum_recipe, request, tmp_path):
    """A base whose generation_config.json sets repetition_penalty=5 and no_repeat_ngram_size=2 changed every summary
    (generate merges its kwargs over the model's generation_config), though eval.no_repeat_ngram_size=0 is off and the
    report names the recipe's settings only. Zero-shot, both bases must write the same summaries (a sequence_bias too:
    a setting a passed generation_config cannot unset, transformers fills it from the model's)."""
    base = request.getfixturevalue({"t5": "tiny_t5", "llama": "tiny_llama"}[family])
    odd = with_generation_config(base, tmp_path / "odd-base", repetition_penalty=5.0, no_repeat_ngram_size=2, min_new_tokens=6,
                                 sequence_bias={(minilm_tokenizer().convert_tokens_to_ids("the"),): 20.0})
    settings = {"train.max_steps": 0, "eval.num_beams": 2 if family == "t5" else 1, "export.merge": False}
    if method != "lora":
        settings.update({"adapter.method": method, "adapter.target_modules": None, "adapter.num_virtual_tokens": 4})
    predictions = []
    for name, model in (("plain", base), ("odd", odd)):
        recipe = make_sum_recipe(model, settings, name=name)
        run(recipe)
        predictions.append([json.loads(line)["prediction"] for line in (recipe.out / "predictions-eval.jsonl").read_text().splitlines()])
    assert predictions[0] == predictions[1]
    if method == "lora":  # the card's snippet, run as written on the odd base, summarizes as the evaluation did
        with open(recipe.data.eval.path, encoding="utf-8") as f:
            source = next(csv.DictReader(f))["dialogue"]
        snippet = re.search(r"```python\n(.*?)```", card_text(recipe.out), re.S).group(1)
        snippet = re.sub(r"repo = .*", f"repo = {str(recipe.out)!r}", snippet)
        snippet = re.sub(r"source = .*", lambda _: f"source = {source!r}", re.sub(r"base_model = .*", f"base_model = {str(odd)!r}", snippet), count=1)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(snippet, {})
        assert printed.getvalue().strip() == predictions[1][0], (printed.getvalue(), snippet)


def test_a_target_column_of_lists_is_refused_not_scored_as_its_repr(make_sum_recipe, tiny_t5, tmp_path):
    """DialogSum's `summaries` (3 references a row) became "['...', '...']", and ROUGE was scored against that."""
    from peftlab.errors import DataError

    rows = [{"dialogue": f"A: hi {i}\nB: hello", "summaries": ["A greets B.", "B is greeted."]} for i in range(4)]
    path = tmp_path / "multi.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = make_sum_recipe(tiny_t5, {"data.train.path": path, "data.eval.path": path, "data.target_column": "summaries"})
    with pytest.raises(DataError, match=r"data.train: the target column 'summaries' holds List.*data.target_column.*references_column"):
        load_splits(recipe)


def test_rouge_against_several_references_takes_each_rows_best():
    from rouge_score import rouge_scorer

    from peftlab.metrics import rouge_metrics

    preds = ["Anna will bring the cake tomorrow.", "the keys are lost", "Running dogs ran home."]
    several = [["Tom will bring the cake.", "Anna brings a cake tomorrow."], ["Leo lost his keys."], ["A cat sleeps.", "The dog runs home."]]
    got = rouge_metrics(preds, several)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for k in ("rouge1", "rouge2", "rougeL"):
        best = [max(scorer.score(r, p)[k].fmeasure for r in refs) for p, refs in zip(preds, several)]  # per key, per row
        assert got[k] == pytest.approx(sum(best) / len(best), abs=1e-12), k
        assert got[k] >= rouge_metrics(preds, [refs[0] for refs in several])[k]
    assert got["rouge1"] > rouge_metrics(preds, [refs[0] for refs in several])["rouge1"]  # more than against the first alone
    assert rouge_metrics(preds, [[p] for p in preds]) == rouge_metrics(preds, preds)


def test_validate_refuses_a_references_column_of_plain_text(make_sum_recipe, tiny_t5, tmp_path):
    """validate said ok for references_column=summary (one text a row) or any csv column; train refused it only then."""
    from peftlab.data import column_problems

    rows = dialogue_rows(3, 2)
    multi = tmp_path / "multi.jsonl"
    multi.write_text("".join(json.dumps({**r, "summaries": [r["summary"]]}) + "\n" for r in rows))
    assert column_problems(make_sum_recipe(tiny_t5, {"data.eval.path": multi, "data.eval.references_column": "summaries"})) == []
    text = column_problems(make_sum_recipe(tiny_t5, {"data.eval.path": multi, "data.eval.references_column": "summary"}, name="t"))
    assert len(text) == 1 and "references_column='summary': data row 0 (0-based" in text[0] and "not a list of texts" in text[0]
    csv = column_problems(make_sum_recipe(tiny_t5, {"data.eval.references_column": "summary"}, name="c"))
    assert len(csv) == 1 and "a csv file holds one text per cell, not a list of texts" in csv[0]


def test_an_eval_split_with_several_references_is_scored_against_each(make_sum_recipe, tiny_t5, tmp_path, caplog):
    """DialogSum's test split has 3 summaries a row: ROUGE is each prediction's best match over them, the loss stays on
    data.target_column, the predictions file and the report say so; train refuses the field, and a bad column is named."""
    from peftlab.errors import ConfigError, DataError
    from peftlab.run import evaluate

    rows = dialogue_rows(6, 2)
    multi = tmp_path / "multi.jsonl"
    multi.write_text("".join(json.dumps({**r, "summaries": [r["summary"], "Nobody says anything."]}) + "\n" for r in rows))
    recipe = make_sum_recipe(tiny_t5, {"data.eval.path": multi, "data.eval.references_column": "summaries", "train.precision": "fp32"})
    m = run(recipe)["metrics"]["eval"]
    out = recipe.out
    got = [json.loads(line) for line in (out / "predictions-eval.jsonl").read_text().splitlines()]
    assert [g["references"] for g in got] == [[r["summary"], "Nobody says anything."] for r in rows]
    from peftlab.metrics import rouge_metrics

    assert m["rouge1"] == pytest.approx(rouge_metrics([g["prediction"] for g in got], [g["references"] for g in got])["rouge1"])
    assert json.loads((out / "eval_report.json").read_text())["references_per_row"] == 2
    # a prediction among its references scores 1: rows scored against the file's list, not data.target_column alone
    exact = tmp_path / "exact.jsonl"
    exact.write_text("".join(json.dumps({**r, "summaries": [r["summary"], g["prediction"]]}) + "\n" for r, g in zip(rows, got)))
    test = evaluate(out, "test", [f"data.test.path={exact}", "data.test.references_column=summaries"], results_dir=tmp_path / "e")
    preds = [g["prediction"] for g in got]
    assert test["rouge1"] == pytest.approx(rouge_metrics(preds, preds)["rouge1"])  # (a prediction of no ASCII word scores 0)
    assert test["rouge1"] > rouge_metrics(preds, [r["summary"] for r in rows])["rouge1"]
    assert test["loss"] == pytest.approx(m["loss"], rel=1e-4)  # (the same rows and targets)

    with pytest.raises(ConfigError, match=r"data.train.references_column='summaries'.*Move it to data.eval or data.test"):
        make_sum_recipe(tiny_t5, {"data.train.path": multi, "data.train.references_column": "summaries"}, name="t")
    with pytest.raises(ConfigError, match=r"data.eval.references_column is set with task.type=classification"):
        make_sum_recipe(tiny_t5, {"data.eval.references_column": "summaries", "task.type": "classification"}, name="c")
    with pytest.raises(DataError, match=r"column\(s\) \['summary_list'\] not found.*Set data.eval.references_column to"):
        load_splits(make_sum_recipe(tiny_t5, {"data.eval.path": multi, "data.eval.references_column": "summary_list"}, name="m"))
    with pytest.raises(DataError, match=r"data.eval.references_column='summary': data row 0 \(0-based, as predictions files count\) "
                                        r"holds .*, not a list of texts"):
        load_splits(make_sum_recipe(tiny_t5, {"data.eval.path": multi, "data.eval.references_column": "summary"}, name="s"))
    # rows whose list is empty (or blank) are scored against their target, said; a column of no reference is refused
    for name, lists in (("some", [[], ["  "], ["A summary."]]), ("none", [[], [" "], []])):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({**r, "summaries": refs}) + "\n" for r, refs in zip(rows, lists)))
        recipe = make_sum_recipe(tiny_t5, {"data.eval.path": path, "data.eval.references_column": "summaries"}, name=name)
        if name == "none":
            with pytest.raises(DataError, match=r"data.eval.references_column: no row has a reference"):
                load_splits(recipe)
            continue
        with caplog.at_level("WARNING"):
            ev = load_splits(recipe)[0]["eval"]
        assert "2 of 3 row(s) have no reference in their list" in caplog.text and ev["references"] == [[], [], ["A summary."]]
    from peftlab.tasks.generative import several_references

    assert several_references([{"reference": "a", "references": ["a"]}, {"reference": "b", "references": ["b", "c", "d"]}]) == \
        {"references_per_row": 2}


@pytest.mark.parametrize("model", ["smollm2-135m-instruct", "stories260k"])
def test_a_plain_prompt_and_its_summary_are_tokenized_as_the_text_the_model_reads(model):
    """'Summary: ' and 'Jane ...' tokenized apart gave SmolLM2 ':', ' ', 'Jane' (the natural ':', ' Jane'; zero-shot NLL
    2.86 against 2.65 nats a token) and stories260k a doubled '▁'. Cut where the prompt's text ends instead."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from peftlab.tasks.summarization import prompt_and_summary

    folder = shared_or_skip("models", model)
    tok = (PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json")) if model.startswith("smollm2")
           else AutoTokenizer.from_pretrained(folder))
    prompt, summary = "Summarize this dialogue:\nJane: hi\nSummary: ", "Jane greets."
    heads, tails = prompt_and_summary(tok, [prompt], [summary], 64)
    assert heads[0] + tails[0] == tok(prompt + summary, add_special_tokens=False)["input_ids"]  # the natural tokens
    assert heads[0] == tok(prompt.rstrip(" "), add_special_tokens=False)["input_ids"]  # the prompt, its space to the summary
    assert tok.decode(tails[0]).strip() == summary
    assert prompt_and_summary(tok, [prompt], [summary], 2)[1][0] == tails[0][:2]  # data.max_target_length cuts the summary


def test_a_long_source_is_cut_as_written_within_max_length_on_a_byte_fallback_tokenizer():
    """stories260k spells an emoji as byte tokens: decoding a cut inside one turned the whole run of emoji into '\ufffd'
    characters, each three tokens again (SAMSum train row 663 cut at 64 tokens read back as 110). The text is cut where
    the first token left out starts."""
    from transformers import AutoTokenizer

    from peftlab.tasks.summarization import truncate_sources

    tok = AutoTokenizer.from_pretrained(shared_or_skip("models", "stories260k"))
    text = "Emma: What a day. I found today (~_~)\nEmma: So sad " + "\U0001f62d" * 6 + "\nTaylor: oh no, what happened?"
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    for limit in range(n - 30, n):  # every cut through the emoji and after them
        (cut,), (was_cut,) = truncate_sources(tok, [text], limit)
        assert was_cut and "\ufffd" not in cut and text.startswith(cut)
        assert len(tok(cut, add_special_tokens=False)["input_ids"]) <= limit
    assert truncate_sources(tok, [text], n) == ([text], [False])  # a source that fits is left as it is


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_a_prompt_or_prefix_tuned_decoder_summarizes_as_greedy_decoding_of_its_model(make_sum_recipe, tiny_llama, capsys,
                                                                                       monkeypatch, method):
    """Prompt tuning on a decoder: each summary is greedy decoding of the trained model's own forward (peft's cached
    generate wrote other tokens, and left padding shifted positions). Prefix tuning: the same through peft's own generate
    (peft >= 0.22); with an older peft, whose generation differs from its model, it is refused before training."""
    from peftlab.cli import main
    from peftlab.errors import ModelError
    from peftlab.methods import prompt

    settings = {"adapter.method": method, "adapter.target_modules": None, "adapter.num_virtual_tokens": 4, "train.lr": 0.1,
                "export.merge": False, "train.precision": "fp32"}
    if prompt.peft_generates_prefix() or method == "prompt_tuning":
        recipe = make_sum_recipe(tiny_llama, settings, name="pt")
        run(recipe)
        rows = [json.loads(line) for line in (recipe.out / "predictions-eval.jsonl").read_text().splitlines()]
        model, tok, *_ = load_trained(recipe.out)
        data = build_data(load_recipe(recipe.out / "recipe.yaml", validate_files=False), tok)
        moved = 0
        for k, example in enumerate(data.eval):
            ids = torch.tensor([example["input_ids"][: example["prompt_length"]]])
            start = ids.shape[1]
            with torch.no_grad():
                for _ in range(recipe.eval.max_new_tokens):
                    nxt = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax().item()
                    ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
                    if nxt == tok.eos_token_id:
                        break
            assert tok.decode(ids[0, start:], skip_special_tokens=True).strip() == rows[k]["prediction"], k
            with torch.no_grad(), model.disable_adapter():
                base = model.generate(input_ids=ids[:, :start], max_new_tokens=recipe.eval.max_new_tokens, do_sample=False,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            moved += tok.decode(base[0, start:], skip_special_tokens=True).strip() != rows[k]["prediction"]
        assert moved  # the adapter is in the summaries: not the base's text
        # the card's snippet, run as written on each source, summarizes as the evaluation did (it called peft's cached generate)
        snippet = re.search(r"```python\n(.*?)```", card_text(recipe.out), re.S).group(1)
        snippet = re.sub(r"base_model = .*", lambda _: f"base_model = {str(tiny_llama)!r}",
                         re.sub(r"repo = .*", lambda _: f"repo = {str(recipe.out)!r}", snippet))
        for row in rows:
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                exec(re.sub(r"source = .*", lambda _, row=row: f"source = {row['source']!r}", snippet, count=1), {})
            assert printed.getvalue().strip() == row["prediction"], (printed.getvalue(), row, snippet)
    if method == "prompt_tuning":
        return
    with pytest.raises(ConfigError, match="prefix_tuning cannot generate faithfully here: generation with model.decoder's warm start"):
        make_sum_recipe(tiny_llama, {**settings, "model.decoder": str(tiny_llama)}, name="b2b")  # (not measured)
    monkeypatch.setattr(prompt, "peft_generates_prefix", lambda: False)  # as on a peft before 0.22: refused
    prefix = make_sum_recipe(tiny_llama, {"adapter.target_modules": None}, name="px")
    assert main(["validate", str(prefix.out.parent / "px.yaml"), "adapter.method=prefix_tuning", "adapter.target_modules=null"]) == 2
    assert "prefix_tuning cannot generate faithfully" in capsys.readouterr().out
    prefix.adapter.method = "prefix_tuning"  # past validation (the Python API): the building blocks check it again
    with pytest.raises(ConfigError, match="prefix_tuning cannot generate faithfully"):
        build_model(prefix, num_labels=0, label_names=[])
    with pytest.raises(ModelError, match="prefix_tuning cannot generate faithfully"):  # and the method itself
        prompt.apply_prefix(None, prefix, [], "CAUSAL_LM")
    assert not prefix.out.exists()


@pytest.mark.parametrize("base", ["tiny_t5", "tiny_bart"])
def test_prefix_tuning_on_an_encoder_decoder_summarizer_generates_with_its_prefix_where_peft_does(make_sum_recipe, request, tmp_path,
                                                                                                   capsys, monkeypatch, base):
    """A prefix-tuned T5 or BART trained with the prefix (the loss was right), but before peft 0.22 transformers'
    generate dropped it ("Both past_key_values and cache are set ... Using cache"): predictions-eval.jsonl and ROUGE were
    the untrained base's (generate with the adapter = generate with it disabled, while greedy decoding of the model's own
    forward differs). peft 0.22 generates with it: a run's predictions are greedy decoding of the trained model, token
    for token, so it trains there; with an older peft it is refused by `validate` and, past validation, by the model build."""
    import warnings

    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForSeq2SeqLM

    from peftlab.cli import main
    from peftlab.methods import prompt

    path = request.getfixturevalue(base)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForSeq2SeqLM.from_pretrained(path), PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4)).eval()
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.mul_(50)  # a prefix that moves the logits, as a trained one does
    tok = minilm_tokenizer()
    start = model.base_model.config.decoder_start_token_id

    def greedy_of(m, enc: dict, steps: int, end: int | None = None) -> torch.Tensor:
        out = torch.tensor([[start]])
        for _ in range(steps):
            out = torch.cat([out, m(**enc, decoder_input_ids=out).logits[:, -1].argmax(-1, keepdim=True)], 1)
            if out[0, -1].item() == end:
                break
        return out

    batch = dict(tok(["Anna: Can you bring the cake today?"], return_tensors="pt", return_token_type_ids=False))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        greedy = greedy_of(model, batch, 6)
        kw = dict(max_new_tokens=6, num_beams=1, do_sample=False, min_new_tokens=6)
        generated = model.generate(**batch, **kw)
        with model.disable_adapter():
            plain = model.generate(**batch, **kw)
            base_greedy = greedy_of(model, batch, 6)
    assert not torch.equal(greedy, base_greedy)  # the prefix changes the model's own greedy text ...
    n = greedy.shape[1]
    if not prompt.peft_generates_prefix():
        assert torch.equal(generated[0, :n], plain[0, :n])  # ... and this peft's generate ignores it: refused below
    else:
        assert torch.equal(generated[0, :n], greedy[0]) and not torch.equal(generated[0, :n], plain[0, :n])  # ... and generate keeps it
        recipe = make_sum_recipe(path, {"adapter.method": "prefix_tuning", "adapter.target_modules": None, "adapter.num_virtual_tokens": 4,
                                        "train.lr": 0.1, "train.max_steps": 6, "export.merge": False, "train.precision": "fp32"}, name="pxt")
        run(recipe)
        rows = [json.loads(line) for line in (recipe.out / "predictions-eval.jsonl").read_text().splitlines()]
        trained, tok2, *_ = load_trained(recipe.out)
        data = build_data(load_recipe(recipe.out / "recipe.yaml", validate_files=False), tok2)
        moved = 0
        with torch.no_grad():
            for k, example in enumerate(data.eval):
                enc = {"input_ids": torch.tensor([example["input_ids"]]), "attention_mask": torch.tensor([example["attention_mask"]])}
                out = greedy_of(trained, enc, recipe.eval.max_new_tokens, end=tok2.sep_token_id)
                assert tok2.decode(out[0], skip_special_tokens=True).strip() == rows[k]["prediction"], k
                with trained.disable_adapter():
                    base_out = greedy_of(trained, enc, recipe.eval.max_new_tokens, end=tok2.sep_token_id)
                moved += tok2.decode(base_out[0], skip_special_tokens=True).strip() != rows[k]["prediction"]
        assert moved  # the prefix is in the predictions: not the base's text
        monkeypatch.setattr(prompt, "peft_generates_prefix", lambda: False)  # as on a peft before 0.22: the refusals
    with pytest.raises(ConfigError, match="prefix_tuning cannot generate faithfully.*encoder-decoder"):
        make_sum_recipe(path, {"adapter.method": "prefix_tuning", "adapter.target_modules": None}, name="px")
    recipe = make_sum_recipe(path, {"adapter.target_modules": None}, name="px")
    assert main(["validate", str(tmp_path / "px.yaml"), "adapter.method=prefix_tuning", "adapter.target_modules=null"]) == 2
    assert "prefix_tuning cannot generate faithfully" in capsys.readouterr().out
    recipe.adapter.method = "prefix_tuning"  # changed in Python: the building blocks check it again
    with pytest.raises(ConfigError, match="prefix_tuning cannot generate faithfully"):
        build_model(recipe, num_labels=0, label_names=[])
    with pytest.raises(ModelError, match="prefix_tuning cannot generate faithfully"):  # the model build, past the checks, too
        prompt.apply_prefix(AutoModelForSeq2SeqLM.from_pretrained(path), recipe, [], "SEQ_2_SEQ_LM")
