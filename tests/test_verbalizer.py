"""LLM classifiers: the verbalizer task (a causal LM writes the label word) and the sequence-classification head on a
decoder LLM. Fast tests use the tiny random Llama with MiniLM's tokenizer; the slow one scores real SmolLM2 zero-shot."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from peftlab import build_model, load_recipe
from peftlab.data import build_data, load_splits
from peftlab.errors import ConfigError, DataError
from peftlab.run import run
from peftlab.tasks import verbalizer
from tests.conftest import minilm_tokenizer, shared_or_skip

CHAT = ("{% for m in messages %}<|user|> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}")


@pytest.fixture
def make_verb(tmp_path, tiny_llama, sentiment_files):
    def make(overrides: dict | None = None, name: str = "verb"):
        tree = {
            "name": name, "output_dir": str(tmp_path / name), "model": {"name": str(tiny_llama)},
            "adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "data": {"train": str(sentiment_files["train"]), "eval": str(sentiment_files["dev"]),
                     "label_names": ["negative", "positive"], "max_length": 32},
            "task": {"type": "verbalizer", "prompt": "Review: {text}\nSentiment:"},
            "train": {"epochs": 2, "batch_size": 16, "lr": 1e-2, "log_every": 8, "warmup_fraction": 0.0, "precision": "fp32",
                      "seed": 0},
            "eval": {"batch_size": 32},
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(tree))
        return load_recipe(path, [f"{k}={'null' if v is None else v}" for k, v in (overrides or {}).items()])

    return make


def test_loss_mask_covers_only_the_label_word_tokens(make_verb):
    recipe = make_verb()
    tok = minilm_tokenizer()
    data = build_data(recipe, tok)
    words = [tok(w, add_special_tokens=False)["input_ids"] for w in (" negative", " positive")]  # derived from label_names
    for i in range(4):
        row, raw = data.train[i], load_splits(recipe)[0]["train"][i]
        prompt = tok("Review: " + raw["text"] + "\nSentiment:", add_special_tokens=False)["input_ids"]
        assert row["input_ids"] == prompt + words[raw["label"]]
        assert row["labels"] == [-100] * len(prompt) + words[raw["label"]]
        assert (row["prompt_length"], row["class_label"]) == (len(prompt), raw["label"])

    # EOS after the word: trained too ([SEP] is MiniLM's end token); a chat template renders the prompt as the user turn
    tok.chat_template = CHAT
    row = build_data(make_verb({"task.label_eos": True, "task.chat_template": True}, "chat"), tok).train[0]
    raw = load_splits(recipe)[0]["train"][0]
    rendered = tok.apply_chat_template([{"role": "user", "content": "Review: " + raw["text"] + "\nSentiment:"}], tokenize=False,
                                       add_generation_prompt=True)
    word = tok("negative" if raw["label"] == 0 else "positive", add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
    assert row["input_ids"] == tok(rendered, add_special_tokens=False)["input_ids"] + word
    assert row["labels"] == [-100] * row["prompt_length"] + word

    # the model's loss is the mean NLL over exactly those tokens
    model, *_ = build_model(recipe, num_labels=2, label_names=["negative", "positive"], precision="fp32")
    batch = data.collate([data.train[i] for i in range(6)])
    with torch.no_grad():
        out = model(**batch)
    lp = out.logits[:, :-1].float().log_softmax(-1)
    labels = batch["labels"][:, 1:]
    scored = labels != -100
    assert scored.sum().item() == sum(len(data.train[i]["labels"]) - data.train[i]["prompt_length"] for i in range(6))
    nll = -lp.gather(-1, labels.clamp(min=0)[..., None])[..., 0][scored].mean()
    torch.testing.assert_close(out.loss, nll, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "plain"])
def test_label_words_are_the_tokens_the_tokenizer_writes_after_the_prompt(make_verb, chat):
    """stories260k (SentencePiece, as Llama-2/Mistral/TinyLlama) puts '▁' in front of a text's first word: the words
    tokenized alone were '▁p', 'o', ... after a chat template's closing newline, where the tokenizer writes 'p', 'o', ...
    (the README promises 'positive' there). Every row is now prompt + word exactly as the tokenizer reads the two
    written together; after a plain prompt the scored word is ' positive', as documented. A word that merges with the
    prompt's end (a trailing space and a verbatim word), or that would with one row's text only, is refused."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shared_or_skip("models", "stories260k"))
    tok.pad_token = tok.eos_token
    tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}]\n{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant]\n{% endif %}")
    recipe = make_verb({"task.chat_template": chat})
    texts = ["a fine film", "dull and far too long"]
    rows = verbalizer.tokenize(Dataset.from_dict({"text": texts, "label": [1, 0], "row": [0, 1]}), tok, recipe)
    for text, row, word in zip(texts, rows, ["positive", "negative"]):
        prompt = "Review: " + text + "\nSentiment:"
        if chat:
            prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        joint = ([] if chat else [tok.bos_token_id]) + tok(prompt + ("" if chat else " ") + word, add_special_tokens=False)["input_ids"]
        assert row["input_ids"] == joint, (tok.convert_ids_to_tokens(row["input_ids"][-8:]), tok.convert_ids_to_tokens(joint[-8:]))
    assert tok.convert_ids_to_tokens(verbalizer.label_token_ids(tok, recipe)[1])[0] == ("p" if chat else "▁p")

    if chat:
        return
    spaced = make_verb({"task.prompt": json.dumps("Review: {text}\nSentiment: "), "data.label_words": "[negative, positive]"})
    with pytest.raises(DataError, match="'negative' does not tokenize apart from the prompt.*no trailing space"):
        verbalizer.label_token_ids(tok, spaced)
    # a prompt that ends with its text: 'd' is a token of its own after the anchor's 'text', but 'fun' + 'd' is 'fund'
    ending = make_verb({"task.prompt": json.dumps("Label: {text}"), "data.label_words": "[d, n]"})
    assert verbalizer.label_token_ids(tok, ending)
    with pytest.raises(DataError, match=r"row 7: the label word 'd' tokenizes as .*End task.prompt with fixed text after \{text\}"):
        verbalizer.tokenize(Dataset.from_dict({"text": ["good", "fun"], "label": [0, 1], "row": [6, 7]}), tok, ending)


@pytest.mark.parametrize("method", ["lora", "prompt_tuning"])
@pytest.mark.parametrize("words", [None, ["very bad", "quite good"]], ids=["one-token", "multi-token"])
def test_scoring_is_each_words_likelihood_and_picks_the_max(make_verb, words, method):
    """score_words (left-padded, position ids from the mask; the prompt run once and each word continued from its KV
    cache, or prompt + word in full for prompt tuning) equals each word's log-likelihood computed row by row without
    padding; the evaluation predicts the argmax."""
    overrides = {"data.label_words": words} if words else {}
    if method == "prompt_tuning":
        overrides |= {"adapter.method": "prompt_tuning", "adapter.num_virtual_tokens": 4}
    recipe = make_verb(overrides)
    tok = minilm_tokenizer()
    model, *_ = build_model(recipe, num_labels=2, label_names=["negative", "positive"], precision="fp32")
    model.eval()
    ids = verbalizer.label_token_ids(tok, recipe, ["negative", "positive"])
    prompts, _ = verbalizer.prompt_ids(tok, recipe, ["the film was good", "a very very long and boring and bad plot really", "sad"])
    with torch.no_grad():
        scores = verbalizer.score_words(model, prompts, ids, tok.pad_token_id)
        for r, p in enumerate(prompts):
            for k, w in enumerate(ids):
                lp = model(input_ids=torch.tensor([p + w])).logits[0, -len(w) - 1:-1].log_softmax(-1)  # (virtual tokens first)
                assert scores[r, k].item() == pytest.approx(lp[torch.arange(len(w)), w].sum().item(), abs=1e-4)

    # a constructed case: a model whose next-token distribution favours one word's tokens predicts that class
    class Fixed(torch.nn.Module):
        def __init__(self, favourite: list[int]):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.zeros(tok.vocab_size))
            self.bias.data[favourite] = 5.0

        def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0, **kw):
            from types import SimpleNamespace

            n = logits_to_keep or input_ids.shape[1]
            return SimpleNamespace(logits=self.bias.expand(input_ids.shape[0], n, -1).clone(), past_key_values=[])

    for k in range(2):
        s = verbalizer.score_words(Fixed(ids[k]), prompts, ids, tok.pad_token_id)
        assert s.argmax(-1).tolist() == [k] * len(prompts)


def test_scoring_hands_the_lm_head_a_contiguous_input(make_verb):
    """The prompt pass keeps the last position's logits only, so the head would get `hidden[:, -1:]`, a strided view
    that torch's CPU matmul serves, for a head stored in bf16, with a copy of the head per row (measured on SmolLM2 at
    batch 32: +1.7 GB, 3.4 s instead of 1.0 s; generative.contiguous_head_input). Every head call sees a contiguous
    input, and no hook is left behind."""
    recipe = make_verb()
    tok = minilm_tokenizer()
    model, *_ = build_model(recipe, num_labels=2, label_names=["negative", "positive"], precision="fp32")
    model.eval()
    head = model.get_output_embeddings()
    seen = []
    hook = head.register_forward_hook(lambda m, args, out: seen.append(args[0].is_contiguous()))  # the args forward got
    prompts, _ = verbalizer.prompt_ids(tok, recipe, ["the film was good", "a very very long and boring and bad plot"])
    with torch.no_grad():
        verbalizer.score_words(model, prompts, verbalizer.label_token_ids(tok, recipe, ["negative", "positive"]), tok.pad_token_id)
    hook.remove()
    assert seen and all(seen), seen
    assert not head._forward_pre_hooks


@pytest.mark.parametrize("words", [None, ["very bad", "quite good"]], ids=["one-token", "multi-token"])
def test_scores_under_bf16_autocast_are_the_float32_scores(make_verb, words):
    """Under bf16 autocast (precision auto on a bf16 CPU) the LM head rounded its logits to bf16: at an LLM's logit
    sizes (here ~45) every word's log-likelihood came in steps of 0.25 or more, and close classes tied at p = 0.5 (argmax:
    class 0). The head now runs in float32 for scoring. The layers here add nothing (o_proj, down_proj zero), so the
    hidden states are the same either way and the scores must agree to float32 rounding; the teacher of train.distill
    scores with the same function."""
    recipe = make_verb({"data.label_words": words} if words else {})
    tok = minilm_tokenizer()
    model, *_ = build_model(recipe, num_labels=2, label_names=["negative", "positive"], precision="fp32")
    model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        model.get_output_embeddings().weight.mul_(400)  # logits ~45, an LLM's size, instead of ~0.1
    ids = verbalizer.label_token_ids(tok, recipe, ["negative", "positive"])
    prompts, _ = verbalizer.prompt_ids(tok, recipe, ["the film was good", "a very long and boring and bad plot", "sad"])
    with torch.no_grad():
        full = verbalizer.score_words(model, prompts, ids, tok.pad_token_id)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = verbalizer.score_words(model, prompts, ids, tok.pad_token_id)
    assert full.abs().max() > 10  # (large enough for bf16's rounding to show)
    assert half.dtype == torch.float32 and (half - full).abs().max().item() < 1e-3, (half - full).abs().max()
    assert "forward" not in vars(model.get_output_embeddings())  # put back


def test_verbalizer_learns_the_synthetic_sentiment_and_zero_shot_is_max_steps_0(make_verb):
    """Zero-shot (train.max_steps=0: the untouched base evaluated and exported) is at chance on the random model;
    trained, the label word is right on the dev rows. Full fine-tuning here: a random 32-wide LM keeps its frozen
    final norm and LM head under LoRA, which caps its logits near +-0.6, so LoRA cannot move its loss (measured:
    flat at ~9.8 over 64 steps); LoRA learns on a real LLM (the slow test, recipes/smollm2-135m/)."""
    zero = run(make_verb({"train.max_steps": 0}, "zero"))
    assert zero.steps == 0 and zero.history == []
    logged = [json.loads(line) for line in (Path(zero.output_dir) / "log.jsonl").read_text().splitlines()]  # always written
    assert [(r["step"], r["kind"]) for r in logged] == [(0, "final_eval")]  # (it was missing): no step, the final evaluation
    saved = load_file(str(Path(zero.output_dir) / "adapter_model.safetensors"))
    assert all(not v.any() for k, v in saved.items() if "lora_B" in k)  # the exported adapter is the identity
    assert zero.metrics["eval"]["accuracy"] < 0.7

    trained = run(make_verb({"adapter.method": "full", "train.epochs": 3, "train.scheduler": "constant"}, "full"))
    m = trained.metrics["eval"]
    assert m["accuracy"] >= 0.9 and m["f1"] >= 0.9, m
    assert m["loss"] < zero.metrics["eval"]["loss"] / 3
    report = json.loads((Path(trained.output_dir) / "eval_report.json").read_text())
    assert sum(map(sum, report["confusion"])) == 64 and report["label_words"] == ["negative", "positive"]
    assert set(report["per_class"]) == {"negative", "positive"}


def test_lora_verbalizer_exports_and_reloads_to_the_same_metrics(make_verb):
    from peftlab import evaluate

    recipe = make_verb({"train.max_steps": 4, "adapter.target_modules": "[q_proj,v_proj,o_proj]"}, "lora")
    record = run(recipe)
    assert json.loads((recipe.out / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    again = evaluate(recipe.out)
    assert again["accuracy"] == record.metrics["eval"]["accuracy"]
    assert again["loss"] == pytest.approx(record.metrics["eval"]["loss"], abs=1e-5)
    # every row's prediction, as a classifier writes them: its row in the file, text, label, predicted word's class
    import csv

    with open(recipe.data.eval.path, encoding="utf-8") as f:
        file_rows = list(csv.DictReader(f, delimiter="\t"))
    got = [json.loads(line) for line in (recipe.out / "predictions-eval.jsonl").read_text().splitlines()]
    assert [g["row"] for g in got] == list(range(64))
    assert all(g["text"] == file_rows[g["row"]]["sentence"] and g["label"] == ["negative", "positive"][int(file_rows[g["row"]]["label"])]
               and 0.5 <= g["probability"] <= 1 for g in got)
    assert sum(g["label"] == g["prediction"] for g in got) / 64 == pytest.approx(record.metrics["eval"]["accuracy"])


def test_the_prompt_template_and_label_word_count_against_the_positions(make_verb, tmp_path):
    """The verbalizer counted data.max_length alone against the position table, not the prompt template's tokens nor
    the label word (+ EOS): a GPT-2 of 40 learned positions with data.max_length=40 passed `validate` and train's check,
    trained, then the final evaluation failed with a bare IndexError in the embedding and no artifacts were written.
    Refused by both, naming the parts and the data.max_length that fits; at that bound the longest rows fill the table
    and the run ends with its artifacts."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from peftlab.errors import ModelError
    from peftlab.run import check_evaluation, preflight

    torch.manual_seed(0)
    tok, gpt2 = minilm_tokenizer(), tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=tok.vocab_size, n_positions=16, n_embd=32, n_layer=2, n_head=4, pad_token_id=0)).save_pretrained(gpt2)
    tok.save_pretrained(gpt2)
    # 'review : sentiment :' is 4 tokens, 'negative' 1, + [SEP] (MiniLM's end token): data.max_length <= 16 - 6 = 10
    settings = {"model.name": gpt2, "adapter.target_modules": "[c_attn]", "task.label_eos": True, "train.max_steps": 1}
    recipe = make_verb({**settings, "data.max_length": 16})
    message = ("data.max_length + the prompt template and special tokens + the longest label word (+ EOS) = 16 + 4 + 2 exceeds the 16 "
               "positions")
    assert any(message in p and "Set data.max_length so that it is <= 10." in p for p in preflight(recipe, training=False))  # validate
    with pytest.raises(ModelError, match=re.escape(message)):
        run(recipe)
    fits = make_verb({**settings, "data.max_length": 10}, "fits")
    assert not any("positions" in p for p in preflight(fits, training=False))
    assert max(map(len, build_data(fits, tok).eval["input_ids"])) == 16  # (the bound is tight)
    record = run(fits)
    assert (fits.out / "predictions-eval.jsonl").is_file() and "accuracy" in record.metrics["eval"]
    with pytest.raises(ModelError, match=re.escape(message)):  # `peftlab eval` with the run's recipe overridden, before loading
        check_evaluation(fits.out, "eval", ["data.max_length=16"])
    tok.model_max_length = 12  # padded to a multiple of 8, but never past the tokenizer's limit (as summarization pads)
    assert verbalizer.collator(tok)([{"input_ids": [1] * 12, "attention_mask": [1] * 12, "labels": [-100] * 12}])["input_ids"].shape[1] == 12


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat-eos"])
def test_the_cards_snippet_classifies_as_the_run_did(make_verb, tiny_llama, tmp_path, chat):
    """A verbalizer run's card showed how to load the model only (the classification, SFT and summarization cards show
    a prediction). Its snippet, run as written on a text longer than data.max_length, prints the class the run
    predicted for that row, with the same probability over the label words (the plain prompt after the BOS; the chat
    template, with EOS after each word)."""
    import contextlib
    import io
    import shutil

    from peftlab.publish.card import card_text

    base, overrides = tiny_llama, {"train.max_steps": 4, "data.max_length": 8, "adapter.target_modules": "[q_proj,v_proj,o_proj]"}
    if chat:
        base = tmp_path / "chat-llama"
        shutil.copytree(tiny_llama, base)
        tok = minilm_tokenizer()
        tok.chat_template = CHAT
        tok.save_pretrained(base)
        overrides |= {"model.name": base, "task.chat_template": True, "task.label_eos": True}
    recipe = make_verb(overrides, "card")
    run(recipe)
    rows = [json.loads(line) for line in (recipe.out / "predictions-eval.jsonl").read_text().splitlines()]
    sizes = [len(minilm_tokenizer()(r["text"], add_special_tokens=False)["input_ids"]) for r in rows]
    row = max((r for r, n in zip(rows, sizes) if n > 8), key=lambda r: r["probability"])  # a cut text, away from a tie
    snippet = re.search(r"## How to use.*?```python\n(.*?)```", card_text(recipe.out), re.S).group(1)
    snippet = re.sub(r"repo = .*", f"repo = {str(recipe.out)!r}", snippet)
    snippet = re.sub(r"base_model = .*", f"base_model = {str(base)!r}", snippet)
    snippet = re.sub(r"text = .*", lambda _: f"text = {row['text']!r}", snippet, count=1)
    printed, scope = io.StringIO(), {}
    with contextlib.redirect_stdout(printed):
        exec(snippet, scope)
    assert printed.getvalue().strip() == row["prediction"], (printed.getvalue(), row, snippet)
    assert torch.tensor(scope["scores"]).softmax(0).max().item() == pytest.approx(row["probability"], abs=1e-4)


def test_invalid_verbalizer_recipes_are_refused_with_the_fix(make_verb):
    with pytest.raises(ConfigError) as e:
        make_verb({"task.prompt": "'Review: {sentence} Sentiment:'", "data.label_words": "[' yes', ' yes']"})
    msg = str(e.value)
    assert "unknown placeholder(s) {sentence}" in msg and "must contain {text} exactly once" in msg
    assert "[' yes'] given more than once" in msg
    json_prompt = 'Reply in JSON like {"label": "positive"}. Text: {text}'  # braces that are no placeholder: text
    assert make_verb({"task.prompt": json.dumps(json_prompt)}).task.prompt == json_prompt
    with pytest.raises(ConfigError, match="3 words for the 2 data.label_names"):
        make_verb({"data.label_words": "[a, b, c]"})
    with pytest.raises(ConfigError, match="set data.label_names .* and optionally data.label_words"):
        make_verb({"data.label_names": None})
    # words without names: validate said ok, train stopped with "2 words for 0 classes []"
    with pytest.raises(ConfigError, match=r"data.label_words=\['good', 'bad'\] needs data.label_names"):
        make_verb({"data.label_names": None, "data.label_words": "[good, bad]"})
    # a blank name derived the word ' ' (one token after a plain prompt), trained and scored; written verbatim it was refused
    with pytest.raises(ConfigError, match=r"data.label_names=\['', 'positive'\]: a blank name gives its class an empty label word"):
        make_verb({"data.label_names": "['', positive]"})

    tok = minilm_tokenizer()
    same = make_verb({"data.label_words": "[' Good', ' good']"})  # MiniLM's tokenizer is uncased
    with pytest.raises(DataError, match="' Good' and ' good' tokenize to the same tokens"):
        verbalizer.label_token_ids(tok, same)
    prefix = make_verb({"data.label_words": "[' very', ' very good']"})
    with pytest.raises(DataError, match="is a prefix of ' very good'.*task.label_eos=true"):
        verbalizer.label_token_ids(tok, prefix)
    eos = make_verb({"data.label_words": "[' very', ' very good']", "task.label_eos": True})
    assert len(verbalizer.label_token_ids(tok, eos)) == 2  # with EOS the shorter word is no longer a prefix
    with pytest.raises(DataError, match="has no chat template. Set task.chat_template=false"):
        verbalizer.label_token_ids(tok, make_verb({"task.chat_template": True}))
    from peftlab.model import model_problems  # `validate` says it too

    assert any("has no chat template. Set task.chat_template=false" in p for p in model_problems(make_verb({"task.chat_template": True})))
    assert any("is a prefix of ' very good'" in p for p in model_problems(prefix))  # (validate said ok; train refused it)


# ------------------------------------------------------------------------------------ the head on a decoder LLM

def test_llama_head_pools_the_last_real_token_whatever_the_padding_side(make_recipe, tiny_llama):
    """LlamaForSequenceClassification pools the last token that is not pad_token_id: right- and left-padded batches
    give each row the logits it has alone; LoRA trains the new `score` head, saved as modules_to_save."""
    recipe = make_recipe({"train.max_steps": 6, "train.precision": "fp32"}, model=tiny_llama)
    model, tok, info = build_model(recipe, num_labels=2, label_names=["negative", "positive"], precision="fp32")
    assert info.head_modules == ["score"] and model.config.pad_token_id == tok.pad_token_id
    model.eval()
    texts = ["good", "a bad and boring plot that goes on and on", "really quite lovely"]
    alone = torch.cat([model(**tok([t], return_tensors="pt")).logits for t in texts])
    for side in ("right", "left"):
        tok.padding_side = side
        batch = tok(texts, return_tensors="pt", padding=True)
        torch.testing.assert_close(model(**batch).logits, alone, rtol=1e-4, atol=1e-5)

    record = run(recipe)
    saved = load_file(str(Path(record.output_dir) / "adapter_model.safetensors"))
    head = {k: v for k, v in saved.items() if ".score." in k}
    assert head and record.trainable_params == sum(v.numel() for v in saved.values())
    initial = model.base_model.model.score.modules_to_save["default"].weight
    assert not torch.equal(next(iter(head.values())), initial.detach())  # the head trained


@pytest.mark.slow
def test_smollm2_zero_shot_sst2_verbalizer(tmp_path):
    """Real SmolLM2-135M-Instruct, no training: 64 SST-2 dev rows scored by ' negative' / ' positive' through the chat
    template, above 60% (chance is ~50%)."""
    model = shared_or_skip("models", "smollm2-135m-instruct")
    dev = shared_or_skip("data", "sst2", "dev.tsv")
    recipe = load_recipe(Path("recipes/smollm2-135m/sst2-verbalizer-lora.yaml"), [
        f"model.name={model}", f"output_dir={tmp_path / 'zero'}", "train.max_steps=0", "train.precision=fp32",
        f"data.train={dev}", "data.train.max_samples=64", "data.eval_holdout=0", f"data.test={dev}", "data.test.max_samples=64"])
    try:
        record = run(recipe)
    except Exception as e:  # the GGUF base loads once bases.py reads .gguf folders (issue 18, item 1)
        if "gguf" in str(e).lower() or "config.json" in str(e):
            pytest.skip(f"the SmolLM2 GGUF folder is not loadable yet: {e}")
        raise
    assert record.metrics["test"]["accuracy"] > 0.6, record.metrics
