"""task.type=sft: conversations from three row formats, assistant-only labels (EOS trained where pad == eos), the
no-trainable-token refusal, packing without cross-example attention (per-example losses equal to unpacked rows),
generation metrics (exact match, ROUGE, a user function), an end-to-end run that learns, exports and reloads."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from peftlab import build_data, load_recipe, load_splits, load_trained, run
from peftlab.errors import ConfigError, DataError
from peftlab.tasks import packing as packing_checks
from peftlab.tasks import sft

from .conftest import IM_END, IM_START, REPO, chat_tokenizer, shared_or_skip, with_generation_config

QA = [("what is the capital of france", "paris"), ("what color is the sky", "blue"), ("how many legs has a cat", "four"),
      ("what do bees make", "honey"), ("what is frozen water", "ice"), ("which animal barks", "a dog")]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def messages_rows(n: int = len(QA)) -> list[dict]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA[:n]]


def recipe_for(tmp_path, model, train, overrides=(), eval_path=None):
    tree = {"name": "sft", "output_dir": str(tmp_path / "out"), "model": {"name": str(model)}, "task": {"type": "sft"},
            "adapter": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
            "data": {"train": str(train), "eval": str(eval_path or train), "max_length": 64},
            "train": {"max_steps": 40, "batch_size": 6, "lr": 1e-2, "warmup_fraction": 0.0, "log_every": 10, "precision": "fp32"},
            "eval": {"batch_size": 8, "max_new_tokens": 8}}
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(tree))
    return load_recipe(p, list(overrides))


# ------------------------------------------------------------------------------------------------ labels


def test_two_turn_mask_is_exactly_the_assistant_turns_with_their_end_token():
    tok = chat_tokenizer()
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye now"},
            {"role": "assistant", "content": "good bye"}]
    row = sft.encode(tok, msgs, 256)
    trained = [t for t, y in zip(row["input_ids"], row["labels"]) if y != -100]
    assert all(y in (-100, t) for t, y in zip(row["input_ids"], row["labels"]))
    end = tok.convert_tokens_to_ids(IM_END)
    expected = tok("hello", add_special_tokens=False)["input_ids"] + [end] + tok("good bye", add_special_tokens=False)["input_ids"] + [end]
    assert trained == expected  # both answers and the end-of-turn token of each, although pad == eos == <|im_end|>
    assert tok.pad_token_id == end
    # nothing of the system/user turns or the template (<|im_start|>assistant) is trained
    masked = [t for t, y in zip(row["input_ids"], row["labels"]) if y == -100]
    assert tok.convert_tokens_to_ids(IM_START) in masked and masked.count(end) == 3  # system, user, user turn ends
    assert row["reference"] == "good bye" and row["source"] == "bye now"
    assert tok.decode(row["gen_ids"]).replace(" ", "").endswith("<|im_start|>assistant")


def byte_level_chat_tokenizer():
    """A byte-level BPE as SmolLM2's and GPT-2's, trained here on ChatML text: the template's newline and an answer's
    leading newline merge into one token 'ĊĊ' across the answer's start."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(["<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n\n\nSure, here it is\n"] * 50,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=[IM_START, IM_END],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=IM_END, pad_token=IM_END)
    tok.chat_template = sft.NAMED_TEMPLATES["chatml"]
    return tok


@pytest.mark.parametrize("answer", ["\n\nSure, here it is", " here it is", "Sure"])
def test_an_answer_starting_with_whitespace_is_trained_whole_after_the_prompt_generation_sees(answer):
    tok = byte_level_chat_tokenizer()
    msgs = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": answer},
            {"role": "user", "content": "hi there"}, {"role": "assistant", "content": answer}]
    if answer.startswith("\n"):  # the case: one token across the edge when the text is tokenized as one
        assert "ĊĊ" in tok.convert_ids_to_tokens(tok(sft.render(tok, msgs), add_special_tokens=False)["input_ids"])
    row = sft.encode(tok, msgs, 256)
    ids, labels = row["input_ids"], row["labels"]
    trained = [t for t, y in zip(ids, labels) if y != -100]
    assert tok.decode(trained) == (answer + IM_END) * 2  # every character of both answers, and their end tokens
    assert tok.decode(ids) == sft.render(tok, msgs)
    k = len(row["gen_ids"])  # the last answer starts right after the prompt generation gets
    assert ids[:k] == row["gen_ids"] and labels[k - 1] == -100 and labels[k] != -100
    one = sft.encode(tok, msgs[:2], 256)  # and that prompt is the one apply_chat_template gives
    assert one["gen_ids"] == tok(sft.render(tok, msgs[:1], True), add_special_tokens=False)["input_ids"]
    assert tok.decode([t for t in one["labels"] if t != -100]) == answer + IM_END


def test_sentencepiece_gets_no_spurious_prefix_where_a_token_crosses_the_answers_start():
    """stories260k (SentencePiece, legacy) under a template whose generation prompt ends in 'Bot: ': '▁He' crosses the
    answer's start. Its answer side tokenized alone got SentencePiece's own '▁' in front (a doubled space)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shared_or_skip("models", "stories260k"))
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\\n' }}{% else %}"
                         "{{ 'Bot: ' + m['content'] + '<|im_end|>' + '\\n' }}{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'Bot: ' }}{% endif %}")
    msgs = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hello world."}]
    row = sft.encode(tok, msgs, 256)
    assert tok.decode(row["input_ids"]) == sft.render(tok, msgs)  # no character added
    assert tok.decode([t for t, y in zip(row["input_ids"], row["labels"]) if y != -100]) == "Hello world.<|im_end|>"
    assert row["gen_ids"] == tok(sft.render(tok, msgs[:1], True), add_special_tokens=False)["input_ids"]


def test_rows_in_three_formats_become_the_same_conversation(tmp_path, chat_llama):
    files = {"messages": write_jsonl(tmp_path / "m.jsonl", messages_rows(2)),
             "instruction": write_jsonl(tmp_path / "i.jsonl", [{"instruction": q, "input": "", "output": a} for q, a in QA[:2]]),
             "prompt": write_jsonl(tmp_path / "p.jsonl", [{"prompt": q, "completion": a} for q, a in QA[:2]])}
    convs = {}
    for fmt, path in files.items():
        splits, names = load_splits(recipe_for(tmp_path, chat_llama, path))
        assert names == []
        convs[fmt] = [json.loads(c) for c in splits["train"]["conversation"]]
    assert convs["messages"] == convs["instruction"] == convs["prompt"] == [r["messages"] for r in messages_rows(2)]
    # columns named by the recipe, through task.prompt, with a system prompt
    other = write_jsonl(tmp_path / "d.jsonl", [{"dialogue": q, "summary": a} for q, a in QA[:2]])
    r = recipe_for(tmp_path, chat_llama, other, ["data.text_columns=[dialogue]", "data.target_column=summary",
                                                 "task.prompt='Q: {source}'", "task.system_prompt=be brief"])
    conv = json.loads(load_splits(r)[0]["train"]["conversation"][0])
    assert conv == [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"Q: {QA[0][0]}"},
                    {"role": "assistant", "content": QA[0][1]}]


def test_trl_conversational_prompt_completion_rows_are_their_messages(tmp_path, chat_llama):
    """TRL's conversational prompt/completion rows (what benchmarks/sft_throughput.py builds for TRL): each list was
    trained as its Python repr ("[{'role': 'user', ...}]"), silently."""
    rows = [{"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]} for q, a in QA[:2]]
    r = recipe_for(tmp_path, chat_llama, write_jsonl(tmp_path / "c.jsonl", rows), ["task.system_prompt=be brief"])
    convs = [json.loads(c) for c in load_splits(r)[0]["train"]["conversation"]]
    assert convs == [[{"role": "system", "content": "be brief"}, *m["messages"]] for m in messages_rows(2)]
    mixed = rows[:1] + [{"prompt": [{"role": "user", "content": "hi"}], "completion": "hello"}]
    with pytest.raises(DataError, match=r"data row 1 \(0-based.*\): 'prompt' holds a list of messages but 'completion' does not "
                                        r"\(got 'hello'\)"):
        load_splits(recipe_for(tmp_path, chat_llama, write_jsonl(tmp_path / "x.jsonl", mixed)))
    bad = rows[:1] + [{"prompt": ["hi"], "completion": [{"role": "assistant", "content": "hello"}]}]  # a list, not messages
    with pytest.raises(DataError, match=r"data row 1 \(0-based.*\): 'prompt' must be a list of \{role, content\}.*got \['hi'\]"):
        load_splits(recipe_for(tmp_path, chat_llama, write_jsonl(tmp_path / "y.jsonl", bad)))


def test_task_prompt_set_for_rows_that_do_not_read_it_is_warned_about_at_validate_and_train(tmp_path, chat_llama, caplog):
    """GSM8K-like instruction/output rows with task.prompt='Solve this: {source}' trained on the bare question, silently."""
    from peftlab.data import column_problems

    said = "data.train: task.prompt is not applied to {}: only text prompt/completion columns go through its {{source}}"
    files = {"the instruction format's rows": [{"instruction": q, "input": "", "output": a} for q, a in QA[:2]],
             "the messages format's rows": messages_rows(2),
             "2 conversational prompt/completion row(s) (lists of messages)": [
                 {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]} for q, a in QA[:2]],
             None: [{"prompt": q, "completion": a} for q, a in QA[:2]]}  # text prompts: read through task.prompt, no warning
    for k, (rows, data) in enumerate(files.items()):
        r = recipe_for(tmp_path, chat_llama, write_jsonl(tmp_path / f"{k}.jsonl", data), ["task.prompt='Solve this: {source}'"])
        caplog.clear()
        with caplog.at_level("WARNING", logger="peftlab"):
            assert column_problems(r) == []
        validate = caplog.text
        caplog.clear()
        with caplog.at_level("WARNING", logger="peftlab"):
            user = json.loads(load_splits(r)[0]["train"]["conversation"][0])[0]["content"]
        if rows is None:
            assert "task.prompt" not in validate + caplog.text and user == f"Solve this: {QA[0][0]}"
        else:
            assert said.format(rows) in caplog.text and user == QA[0][0]
            assert rows.startswith("2 ") or said.format(rows) in validate  # (a header cannot show lists of messages)


def test_columns_the_recipe_names_win_over_guessed_instruction_columns(tmp_path, chat_llama):
    """GSM8K-like rows with instruction/output and a final_answer column: data.target_column=final_answer was ignored
    for the guessed instruction format, silently (the references were the worked solutions)."""
    path = write_jsonl(tmp_path / "g.jsonl", [{"instruction": q, "output": f"work... #### {a}", "final": a} for q, a in QA[:2]])
    r = recipe_for(tmp_path, chat_llama, path, ["data.text_columns=[instruction]", "data.target_column=final"])
    conv = json.loads(load_splits(r)[0]["train"]["conversation"][0])
    assert conv == [{"role": "user", "content": QA[0][0]}, {"role": "assistant", "content": QA[0][1]}]
    conv = json.loads(load_splits(recipe_for(tmp_path, chat_llama, path))[0]["train"]["conversation"][0])
    assert conv[-1]["content"] == f"work... #### {QA[0][1]}"  # none named: the instruction format, as before


def test_validate_refuses_the_bad_messages_train_refuses(tmp_path, chat_llama):
    """`validate` read the header (the keys) of a messages file alone and said ok; `train` refused its row 3 (an unknown
    role, a message without content, no list)."""
    from peftlab.data import column_problems

    good = messages_rows()[:3]
    for bad in ([{"role": "human", "content": "x"}, {"role": "assistant", "content": "y"}],
                [{"role": "user", "content": "x"}, {"role": "assistant"}], None, "hello there"):
        path = write_jsonl(tmp_path / "m.jsonl", [*good, {"messages": bad}])
        with pytest.raises(DataError) as trained:
            load_splits(recipe_for(tmp_path, chat_llama, path))
        assert "data row 3 (0-based" in str(trained.value)
        msg = str(trained.value)  # train's words, for data.train and data.eval (the same file)
        assert column_problems(recipe_for(tmp_path, chat_llama, path)) == [msg, msg.replace("data.train", "data.eval", 1)]
    chat = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "hi", "completion": "hello"},
                                              {"prompt": [{"role": "user", "content": "a"}], "completion": "b"}])
    problems = column_problems(recipe_for(tmp_path, chat_llama, chat))
    assert len(problems) == 2 and "data row 1 (0-based" in problems[0] and "holds a list of messages but 'completion' does not" in problems[0]
    assert column_problems(recipe_for(tmp_path, chat_llama, write_jsonl(tmp_path / "ok.jsonl", good))) == []


def test_validate_reads_the_rows_with_the_columns_of_the_whole_file(tmp_path, chat_llama):
    """A JSON file whose first records lack a prompt column (a writer leaving out empty keys) passed `validate`'s column
    check on the whole file's columns; its rows were then checked against the first records' keys alone and refused
    ('cannot tell how the rows hold conversations'), a file `train` reads."""
    from peftlab.data import column_problems

    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(120)] + [{"question": "q", "context": "c", "answer": "a"}]
    recipe = recipe_for(tmp_path, chat_llama, write_jsonl(tmp_path / "pc.jsonl", rows),
                        ["data.text_columns=[question,context]", "data.target_column=answer"])
    assert len(load_splits(recipe)[0]["train"]) == 121
    assert column_problems(recipe) == []


def test_unknown_columns_and_bad_messages_are_refused_clearly(tmp_path, chat_llama):
    bad = write_jsonl(tmp_path / "x.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(DataError, match=r"cannot tell how the rows hold conversations; the data has columns \['question', 'answer'\]"):
        load_splits(recipe_for(tmp_path, chat_llama, bad))
    from peftlab.data import column_problems  # `validate` finds it from the header, in the same words

    problems = column_problems(recipe_for(tmp_path, chat_llama, bad))
    assert len(problems) == 2 and all("the data has columns ['question', 'answer']" in p for p in problems)  # train, eval
    assert column_problems(recipe_for(tmp_path, chat_llama, bad, ["data.sft_format=prompt_completion", "data.text_columns=[question]",
                                                                  "data.target_column=answer"])) == []
    broken = write_jsonl(tmp_path / "y.jsonl", [{"messages": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(DataError, match=r"data row 0 \(0-based, as predictions files count\): 'messages' must be a list of"):
        load_splits(recipe_for(tmp_path, chat_llama, broken))
    plain = write_jsonl(tmp_path / "s.jsonl", [{"messages": "hello there"}])  # a plain string: the message said `got None`
    with pytest.raises(DataError, match=r"data row 0 \(0-based.*\): 'messages' must be a list of .* got 'hello there' \(text, not JSON\)\."):
        load_splits(recipe_for(tmp_path, chat_llama, plain))
    rows = messages_rows() * 2
    rows[9] = {"messages": [{"role": "robot", "content": "x"}]}
    sampled = write_jsonl(tmp_path / "z.jsonl", rows)  # in a seeded sample, the row is still named by its line in the file
    with pytest.raises(DataError, match=r"data row 9 \(0-based.*\): 'messages' must be a list of"):
        load_splits(recipe_for(tmp_path, chat_llama, sampled, [f"data.train.max_samples={len(rows) - 1}",
                                                                        f"data.eval.max_samples={len(rows) - 1}"]))
    # OpenAI-style parts in row 2 made `datasets` read the column as JSON, and row 1's "4" as the number 4: the error
    # blamed row 1 with a value the file does not hold
    parts = rows[:1] + [{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                                      {"role": "assistant", "content": "4"}]}] + rows[1:4]
    parts[0] = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    mixed = write_jsonl(tmp_path / "p.jsonl", parts)
    with pytest.raises(DataError, match=r"data row 1 \(0-based.*\): 'messages' holds a message whose content is a list of parts"):
        load_splits(recipe_for(tmp_path, chat_llama, mixed))


def test_a_chat_format_that_does_not_compile_or_a_descriptive_best_metric_is_refused_at_validation(tmp_path, chat_llama):
    """A broken Jinja task.chat_format passed validate and failed in tokenization, after the model loaded, with a bare
    TemplateSyntaxError; gen_words (words generated) could be kept as the best metric, higher counting as better."""
    path = write_jsonl(tmp_path / "m.jsonl", messages_rows(2))
    with pytest.raises(ConfigError, match=r"task.chat_format: the Jinja template does not compile \(unexpected '}', line 1\)"):
        recipe_for(tmp_path, chat_llama, path, ["task.chat_format={% for m in messages %}{{ m.content }"])
    with pytest.raises(ConfigError, match="eval.num_beams=4: sft generates greedily"):
        recipe_for(tmp_path, chat_llama, path, ["eval.num_beams=4"])
    with pytest.raises(ConfigError, match="train.best_metric='gen_words' counts the words generated"):
        recipe_for(tmp_path, chat_llama, path, ["train.best_metric=gen_words", "eval.metric_fn=peftlab.metrics:answer_accuracy"])


def test_validate_renders_the_chat_template_as_training_will(tmp_path, chat_llama):
    """A template that compiles but does not render conversations prefix by prefix (the last message only) passed
    `validate`, then failed at the first tokenized row."""
    from peftlab.run import preflight

    path = write_jsonl(tmp_path / "m.jsonl", messages_rows(2))
    last_only = recipe_for(tmp_path, chat_llama, path, ["task.chat_format={{ messages[-1].content }}"])
    assert any("does not render conversations prefix by prefix" in p for p in preflight(last_only, training=False))
    raising = recipe_for(tmp_path, chat_llama, path, ["task.chat_format={{ raise_exception('no system role') }}"])
    assert any("the chat template cannot render a conversation" in p and "no system role" in p
               for p in preflight(raising, training=False))
    assert not preflight(recipe_for(tmp_path, chat_llama, path, ["task.system_prompt=be brief"]), training=False)


def test_an_eval_split_whose_answers_all_start_past_max_length_is_generated_not_refused(tmp_path, chat_llama, caplog):
    """Such a split stopped the run with "training would learn nothing": it is generated from its fitted prompts and
    reports no loss (it counted no token: it said 0.0); only a training split with no answer is refused, and an eval
    split of this kind where training would choose by its loss."""
    long = [{"messages": [{"role": "user", "content": q + " please" * 90}, {"role": "assistant", "content": a}]} for q, a in QA]
    train, evals = write_jsonl(tmp_path / "m.jsonl", messages_rows()), write_jsonl(tmp_path / "e.jsonl", long)
    by_loss = recipe_for(tmp_path, chat_llama, train, [], evals)
    with pytest.raises(DataError, match=r"data.eval: no row has an assistant token within data.max_length=64.*no loss to "
                                        r"compare \(train.best_metric=loss\).*train.best_metric=exact_match"):
        build_data(by_loss, chat_tokenizer(), splits=load_splits(by_loss)[0], label_names=[])
    r = recipe_for(tmp_path, chat_llama, train, ["train.best_metric=exact_match", "train.max_steps=2"], evals)
    splits, _ = load_splits(r)
    with caplog.at_level(logging.WARNING):
        data = build_data(r, chat_tokenizer(), splits=splits, label_names=[])
    assert sum(data.eval["n_labels"]) == 0 and all(len(g) <= 64 for g in data.eval["gen_ids"])
    assert f"data.eval: {len(QA)} generation prompt(s) longer than data.max_length=64" in caplog.text and "data.train: " not in caplog.text
    result = run(r)  # trained, chosen by exact match; the final evaluation generates from every row, with no loss
    assert result.metrics["eval"]["exact_match"] >= 0 and "loss" not in result.metrics["eval"]
    assert "loss" not in json.loads((Path(r.output_dir) / "metrics.json").read_text())["eval"]
    swapped = recipe_for(tmp_path, chat_llama, write_jsonl(tmp_path / "e.jsonl", long), [], tmp_path / "m.jsonl")
    with pytest.raises(DataError, match="data.train: all 6 rows are longer than data.max_length=64"):  # a training split: refused
        build_data(swapped, chat_tokenizer(), splits=load_splits(swapped)[0], label_names=[])


def test_a_template_that_trains_nothing_is_refused_and_a_missing_template_names_the_fix(tmp_path, chat_llama, tiny_llama):
    path = write_jsonl(tmp_path / "m.jsonl", messages_rows(3))
    no_answers = ("{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}\n{% endif %}{% endfor %}"
                  )  # renders prefix by prefix, but no assistant content
    r = recipe_for(tmp_path, chat_llama, path, [f"task.chat_format={json.dumps(no_answers)}"])
    splits, _ = load_splits(r)
    with pytest.raises(DataError, match="no assistant token is trainable"):
        build_data(r, chat_tokenizer(), splits=splits, label_names=[])
    tok = chat_tokenizer()
    tok.chat_template = None
    r = recipe_for(tmp_path, chat_llama, path)
    with pytest.raises(ConfigError, match="has no chat template.*task.chat_format=chatml"):
        build_data(r, tok, splits=splits, label_names=[])
    from peftlab.model import model_problems  # `validate` says it too, from the base's tokenizer

    assert not any("chat template" in p for p in model_problems(r))
    r.model.name = str(tiny_llama)  # its tokenizer has no template
    assert any("has no chat template" in p and "task.chat_format=chatml" in p for p in model_problems(r))
    r.task.chat_format = "chatml"
    assert not any("chat template" in p for p in model_problems(r))
    with pytest.raises(ConfigError, match="task.chat_format='mistral': neither a named template"):
        recipe_for(tmp_path, chat_llama, path, ["task.chat_format=mistral"])
    with pytest.raises(ConfigError, match="train.best_metric='accuracy': sft keeps the best of loss, exact_match"):
        recipe_for(tmp_path, chat_llama, path, ["train.best_metric=accuracy"])


# ------------------------------------------------------------------------------------------------ packing


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_packed_batch_gives_each_example_the_loss_of_its_unpacked_row(tmp_path, chat_llama, attn):
    from transformers import AutoModelForCausalLM

    path = write_jsonl(tmp_path / "m.jsonl", messages_rows())
    tok = chat_tokenizer()
    plain = recipe_for(tmp_path, chat_llama, path, ["data.max_length=128"])
    packed = recipe_for(tmp_path, chat_llama, path, ["data.max_length=128", "data.packing=true"])
    splits, _ = load_splits(plain)
    rows = build_data(plain, tok, splits=splits, label_names=[]).train
    data = build_data(packed, tok, splits=splits, label_names=[])
    assert len(data.train) < len(rows) and sum(data.train["n_examples"]) == len(rows)
    assert max(data.train["length"]) <= 128
    model = AutoModelForCausalLM.from_pretrained(chat_llama, attn_implementation=attn, dtype=torch.float32).eval()

    def token_losses(batch):
        with torch.no_grad():
            logits = model(**batch).logits
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none",
                                               ignore_index=-100)
        return ce

    unpacked = {}
    for r in rows:  # one row at a time, no padding
        b = data.collate([r])
        ce = token_losses(b)[0]
        unpacked[tuple(r["input_ids"])] = ce[: len(r["input_ids"]) - 1].sum().item()
    batch = data.collate(list(data.train))
    assert "attention_mask" not in batch and batch["use_cache"] is False
    ce = token_losses(batch)
    found = 0
    for i, r in enumerate(data.train):
        starts = [j for j, p in enumerate(r["position_ids"]) if p == 0] + [len(r["position_ids"])]
        for s, e in zip(starts, starts[1:]):
            key = tuple(r["input_ids"][s:e])
            assert ce[i, s:e - 1].sum().item() == pytest.approx(unpacked[key], abs=1e-5)  # (e-1: the next example's first token)
            found += 1
    assert found == len(rows)


def test_packing_is_refused_where_the_model_lets_packed_examples_attend_to_each_other(tmp_path, chat_llama, monkeypatch):
    """OPT builds its mask without the position ids, Bloom and MPT take none: packed examples attended to the ones before
    them, silently (a packed example's loss moved by 2e-2 on a tiny OPT). `validate` says it from the config, `train`
    probes the loaded base (one tiny packed forward) and refuses; Llama-family bases pack as before."""
    from transformers import AutoConfig, AutoModelForCausalLM, OPTConfig, OPTForCausalLM

    from peftlab.errors import ModelError
    from peftlab.model import architecture_problems, model_problems

    tok = chat_tokenizer()
    torch.manual_seed(0)
    opt = tmp_path / "tiny-opt"
    OPTForCausalLM(OPTConfig(vocab_size=len(tok), hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=256, word_embed_proj_dim=32, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, bos_token_id=None)).save_pretrained(opt)
    tok.save_pretrained(opt)
    path = write_jsonl(tmp_path / "m.jsonl", messages_rows())
    packed = recipe_for(tmp_path, opt, path, ["data.packing=true", "train.max_steps=1"])
    fix = r"data.packing=true with a opt base .*attend to the ones packed before it.*Set data.packing=false"
    assert any(re.search(fix, p) for p in model_problems(packed)), model_problems(packed)  # validate
    assert not architecture_problems(recipe_for(tmp_path, opt, path), AutoConfig.from_pretrained(opt))  # unpacked: fine
    with pytest.raises(ModelError, match=fix):
        run(packed)
    monkeypatch.setattr(packing_checks, "UNPACKED_MASK", ())  # an architecture the list does not name: the probe at load finds it
    with pytest.raises(ModelError, match=fix.replace("Set", r"measured at load: .*Set")):
        run(packed)
    llama = AutoModelForCausalLM.from_pretrained(chat_llama)
    assert packing_checks.packing_leak(llama) == 0.0 and packing_checks.packing_leak(AutoModelForCausalLM.from_pretrained(opt)) > 1e-2
    assert packing_checks.loaded_model_problem(llama, recipe_for(tmp_path, chat_llama, path, ["data.packing=true"])) is None


@pytest.mark.parametrize("packing", [False, True])
def test_real_tokens_per_second_count_no_padding_of_packed_or_padded_rows(tmp_path, chat_llama, packing):
    path = write_jsonl(tmp_path / "m.jsonl", messages_rows())
    r = recipe_for(tmp_path, chat_llama, path, ["data.max_length=48", f"data.packing={str(packing).lower()}",
                                                "train.max_steps=null", "train.epochs=1", "train.batch_size=2",
                                                "train.log_every=1", "data.eval=null"])
    splits, _ = load_splits(r)
    rows = build_data(r, chat_tokenizer(), splits=splits, label_names=[]).train
    record = run(r)
    real = sum(rows["length"])  # one epoch: every (packed) row once
    assert record.train_tokens == real, (record.train_tokens, real)
    assert record.train_examples == len(splits["train"])  # examples, not packed rows (it recorded the rows)
    assert len(rows) < len(splits["train"]) if packing else len(rows) == len(splits["train"])
    assert record.train_padded_tokens > real  # the rows were padded (to the longest in the batch, a multiple of 8)
    logged = [json.loads(line) for line in (r.out / "log.jsonl").read_text().splitlines() if '"train"' in line]
    assert sum(x["tokens_per_s"] * (x["train_s"] - y) for x, y in zip(logged, [0] + [x["train_s"] for x in logged])) \
        == pytest.approx(real, rel=1e-6)


def four_rows(tmp_path, model, overrides=()) -> tuple[dict, object]:
    """A collated batch of 4 training rows of the QA conversations (max_length 128) and an fp32 Accelerator."""
    from peftlab.accel import make_accelerator

    recipe = recipe_for(tmp_path, model, write_jsonl(tmp_path / "m.jsonl", messages_rows()), ["data.max_length=128", *overrides])
    splits, _ = load_splits(recipe)
    data = build_data(recipe, chat_tokenizer(), splits=splits, label_names=[])
    return data.collate(list(data.train)[:4]), make_accelerator(recipe, "fp32")


@pytest.mark.parametrize("method", ["lora", "prompt_tuning"])
@pytest.mark.parametrize("packing", [False, True])
def test_the_loss_on_labelled_positions_only_equals_the_models_own_loss_and_gradients(tmp_path, chat_llama, monkeypatch,
                                                                                    method, packing):
    """generative.causal_lm_loss runs the LM head on the labelled tokens only (in checkpointed chunks): the same loss
    and the same gradients as model(**batch).loss, for injected adapters and for prompt tuning's virtual tokens."""
    from peft import LoraConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from peftlab.tasks import generative

    monkeypatch.setattr(generative, "CHUNK", 7)  # several chunks, the last one partial
    batch, accelerator = four_rows(tmp_path, chat_llama, [f"data.packing={str(packing).lower()}"])
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(chat_llama, dtype=torch.float32)
    config = (LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM", init_lora_weights=False)
              if method == "lora" else PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    model = get_peft_model(base, config)

    def loss_and_grads(fn):
        model.zero_grad()
        loss = fn()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    if method == "prompt_tuning" and packing:  # peft prepends the virtual tokens' positions itself: not with position ids
        batch.pop("position_ids")
        batch.pop("use_cache")
    want, want_grads = loss_and_grads(lambda: model(**batch).loss)
    got, got_grads = loss_and_grads(lambda: generative.causal_lm_loss(model, batch, accelerator))
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert want_grads.keys() == got_grads.keys() and want_grads
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # per-row sums for evaluation: the same tokens, row by row
        sums, counts = generative.row_losses(model, batch, accelerator)
    assert int(counts.sum()) == int((batch["labels"][:, 1:] != -100).sum())
    assert (sums.sum() / counts.sum()).item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_head_cross_entropy_is_the_cross_entropy_of_the_heads_logits(bias):
    """generative._HeadCrossEntropy keeps only the log-sum-exp and recomputes the logits in the backward pass: the same
    per-token losses and hidden-state gradients as cross_entropy over head(hidden) (fp32), and in bf16 as close to fp32
    as autocast's path (checkpointed `_token_ce`) is."""
    from peftlab.tasks import generative

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias).requires_grad_(False)
    hidden, labels, weights = torch.randn(9, 16, dtype=torch.float64), torch.randint(0, 50, (9,)), torch.rand(9)

    def run(fn, h):
        h = h.detach().clone().requires_grad_()
        losses = fn(h)
        (losses * weights.to(losses.dtype)).sum().backward()
        return losses.detach().double(), h.grad.double()

    def fused(h, dtype):
        return generative._HeadCrossEntropy.apply(h, head.weight.to(dtype), None if head.bias is None else head.bias.to(dtype), labels)

    exact = run(lambda h: torch.nn.functional.cross_entropy(head.double()(h), labels, reduction="none"), hidden)
    head.float()
    got = run(lambda h: fused(h, torch.float32), hidden.float())
    for a, b in zip(got, exact):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = run(lambda h: fused(h, torch.bfloat16), hidden.float())
        autocast = run(lambda h: generative._token_ce(head, h, labels), hidden.float())
    for a, b, want in zip(half, autocast, exact):
        assert (a - want).norm() <= 1.5 * (b - want).norm() + 1e-6


def test_a_trainable_head_keeps_the_checkpointed_loss_and_gets_its_gradient(tmp_path, chat_llama, monkeypatch):
    """Only a frozen nn.Linear head on CPU takes _HeadCrossEntropy (which computes no weight gradient); a head that
    trains goes through autocast's checkpointed path and gets its gradient."""
    from transformers import AutoModelForCausalLM

    from peftlab.tasks import generative

    batch, accelerator = four_rows(tmp_path, chat_llama)
    model = AutoModelForCausalLM.from_pretrained(chat_llama, dtype=torch.float32)
    calls = []
    original = generative._HeadCrossEntropy.apply
    monkeypatch.setattr(generative._HeadCrossEntropy, "apply", lambda *a: calls.append(1) or original(*a))
    model.requires_grad_(False)
    generative.causal_lm_loss(model, batch, accelerator)
    assert calls  # the frozen head: fused
    calls.clear()
    head = model.get_output_embeddings()
    head.weight.requires_grad_(True)
    loss = generative.causal_lm_loss(model, batch, accelerator)
    loss.backward()
    assert not calls and head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    torch.testing.assert_close(loss, model(**batch).loss, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ evaluation, end to end


def test_generation_metrics_and_a_user_metric_function(tmp_path, monkeypatch):
    (tmp_path / "my_metrics.py").write_text("def score(preds, refs):\n    return {'chars': sum(map(len, preds)) / len(preds)}\n")
    monkeypatch.chdir(tmp_path)
    m = sft.score(["paris", "a  dog", "blue sky"], ["paris", "a dog", "blue"], "my_metrics:score")
    assert m["exact_match"] == pytest.approx(2 / 3) and m["chars"] == pytest.approx(19 / 3) and 0 < m["rouge1"] < 1
    with pytest.raises(ConfigError, match="eval.metric_fn='my_metrics:nope': cannot load it"):
        sft.load_metric_fn("my_metrics:nope")
    assert "anything" in sft.GENERATED_METRICS and "loss" not in sft.GENERATED_METRICS


def test_chatml_on_a_tokenizer_without_its_tokens_stops_at_the_text_marker(tmp_path, tiny_llama):
    """task.chat_format=chatml on a base whose vocabulary lacks <|im_end|> (stories260k): the model learned to write
    the marker as text, but generation stopped on token ids only: 'a cat<|im_end|>>|im_end|>|im_' scored exact_match 0."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.chat_template = sft.NAMED_TEMPLATES["chatml"]
    assert sft.text_stops(tok) == ["<|im_end|>"] and sft.text_stops(chat_tokenizer()) == []  # (a token there: stops by id)
    assert sft.cut_at("a cat<|im_end|>>|im_end|>|im_", ["<|im_end|>"]) == "a cat" and sft.cut_at("a cat", ["<|im_end|>"]) == "a cat"
    seen = {}
    from transformers import GenerationMixin

    real = GenerationMixin.generate

    def spy(self, *a, **k):
        seen.update(k)
        return real(self, *a, **k)

    path = write_jsonl(tmp_path / "m.jsonl", messages_rows())
    r = recipe_for(tmp_path, tiny_llama, path, ["task.chat_format=chatml", "train.max_steps=1"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(GenerationMixin, "generate", spy)
        run(r)
    assert seen["generation_config"].stop_strings == ["<|im_end|>"] and seen["tokenizer"] is not None
    preds = [json.loads(line)["prediction"] for line in (r.out / "predictions-eval.jsonl").read_text().splitlines()]
    assert preds and not any("<|im_end|>" in p for p in preds)
    from peftlab.publish.card import card_text  # the card's snippet stops there too, and answers as the evaluation did

    snippet = re.search(r"```python\n(.*?)```", card_text(r.out), re.S).group(1)
    assert "stop_strings=['<|im_end|>'], tokenizer=tokenizer" in snippet
    snippet = re.sub(r"repo = .*", f"repo = {str(r.out)!r}", snippet).replace("What is the capital of France?", QA[0][0])
    snippet = re.sub(r"base_model = .*", f"base_model = {str(tiny_llama)!r}", snippet)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(snippet, {})
    assert printed.getvalue().strip() == preds[0], (printed.getvalue(), snippet)


@pytest.mark.parametrize("packing", [False, True])
def test_sft_end_to_end_learns_exports_and_reloads(tmp_path, chat_llama, packing):
    path = write_jsonl(tmp_path / "m.jsonl", messages_rows())
    r = recipe_for(tmp_path, chat_llama, path, [f"data.packing={str(packing).lower()}", "train.max_steps=60",
                                                "train.eval_every=30", "train.best_metric=exact_match",
                                                "eval.metric_fn=peftlab.metrics:answer_accuracy"])
    record = run(r)
    from peftlab.publish.card import card_data

    claimed = {(e.metric_type, e.dataset_split) for e in card_data(r.out).eval_results}
    assert {("exact_match", "m"), ("answer_accuracy", "m")} <= claimed, claimed  # eval.metric_fn's metrics are on the card
    assert not {t for t, _ in claimed} & set(sft.DESCRIPTIVE)  # words generated: measured, but no quality result
    from peftlab.publish.card import card_text

    card = card_text(r.out)  # what eval_report.json holds for a generation task, not a classifier's confusion matrix
    assert "generation speed on the" in card and "confusion" not in card
    first = [json.loads(line) for line in (r.out / "log.jsonl").read_text().splitlines() if '"train"' in line]
    m = record.metrics["eval"]
    # a hidden size of 32 spreads probability over MiniLM's 30k-token vocabulary, so the loss falls slowly in nats, but the
    # answers' argmax is learnt: most come back verbatim
    assert first[-1]["loss"] < first[0]["loss"] - 0.2 and m["loss"] < record.history[0]["loss"], (first, record.history)
    assert m["exact_match"] >= 0.5, m
    preds = [json.loads(line) for line in (r.out / "predictions-eval.jsonl").read_text().splitlines()]
    assert len(preds) == len(QA) and {"prediction", "reference", "source"} <= set(preds[0])
    gen = json.loads((r.out / "eval_report.json").read_text())["generation"]  # the final evaluation's generation speed
    assert len(QA) <= gen["new_tokens"] <= len(QA) * r.eval.max_new_tokens and gen["seconds"] > 0
    assert gen["tokens_per_s"] == pytest.approx(gen["new_tokens"] / gen["seconds"])
    model, tok, _, _ = load_trained(r.out)
    assert tok.chat_template and tok.pad_token == IM_END
    row = sft.encode(tok, messages_rows(1)[0]["messages"], 64)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([row["gen_ids"]]), max_new_tokens=8, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=sft.stop_ids(tok))
    assert tok.decode(out[0, len(row["gen_ids"]):], skip_special_tokens=True).strip() == preds[0]["prediction"]
    assert record.task == "sft"
    if not packing:  # the card's snippet, run as written on this folder, answers as peftlab's evaluation did
        snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
        snippet = re.sub(r"repo = .*", f"repo = {str(r.out)!r}", snippet).replace("What is the capital of France?", QA[0][0])
        snippet = re.sub(r"base_model = .*", f"base_model = {str(chat_llama)!r}", snippet)  # a local base, named by folder
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(snippet, {})
        assert printed.getvalue().strip() == preds[0]["prediction"], (printed.getvalue(), snippet)


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "prefix_tuning", "lora"])
def test_each_generated_answer_is_greedy_decoding_of_the_model_as_trained(tmp_path, chat_llama, method):
    """Each answer is what greedy decoding of the trained model's own forward (no cache, one prompt alone) writes. Under
    prompt learning it was not: peft drops position_ids, so left padding shifted a row's positions by its batch's
    longest prompt, and peft's cached generate writes other tokens from the third one on (with this transformers).
    Prefix tuning generates through peft's own generate, which carries the prefix in the cache (peft >= 0.22)."""
    from peftlab.methods.prompt import peft_generates_prefix

    rows = [{"messages": [{"role": "user", "content": q + " please" * k}, {"role": "assistant", "content": a}]}
            for k, (q, a) in enumerate(QA)]  # prompts of six lengths in one evaluation batch
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    adapter = [] if method == "lora" else [f"adapter.method={method}", "adapter.target_modules=null", "adapter.num_virtual_tokens=4"]
    settings = [*adapter, "train.max_steps=6", "train.lr=0.1", "eval.max_new_tokens=8", "export.merge=false"]
    if method == "prefix_tuning" and not peft_generates_prefix():
        with pytest.raises(ConfigError, match="prefix_tuning cannot generate faithfully.*upgrade peft to 0.22"):
            recipe_for(tmp_path, chat_llama, path, settings)
        return
    r = recipe_for(tmp_path, chat_llama, path, settings)
    run(r)
    preds = [json.loads(line) for line in (r.out / "predictions-eval.jsonl").read_text().splitlines()]
    model, tok, _, _ = load_trained(r.out)
    stops, greedy = sft.stop_ids(tok), []
    for row in rows:
        ids = torch.tensor([sft.encode(tok, row["messages"], 64)["gen_ids"]])
        start = ids.shape[1]
        with torch.no_grad():
            for _ in range(8):
                nxt = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax().item()
                ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
                if nxt in stops:
                    break
        greedy.append(tok.decode(ids[0, start:], skip_special_tokens=True).strip())
    assert [p["prediction"] for p in preds] == greedy
    assert len(set(greedy)) > 1  # (not one text for every row: the prompts matter)
    # the card's snippet, run as written on each prompt, answers as the evaluation did (under prompt learning it called
    # peft's cached generate, whose text differed from the third token on)
    from peftlab.publish.card import card_text

    snippet = re.search(r"```python\n(.*?)```", card_text(r.out), re.S).group(1)
    snippet = re.sub(r"base_model = .*", lambda _: f"base_model = {str(chat_llama)!r}", re.sub(r"repo = .*", lambda _: f"repo = {str(r.out)!r}", snippet))
    for row, want in zip(rows, greedy):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(snippet.replace('"What is the capital of France?"', repr(row["messages"][0]["content"])), {})
        assert printed.getvalue().strip() == want, (printed.getvalue(), row, snippet)


@pytest.mark.parametrize("method", ["lora", "prompt_tuning"])
def test_a_bases_generation_config_does_not_change_the_generated_answers(tmp_path, chat_llama, method):
    """Generation passed do_sample=False and num_beams=1 only, so a base's generation_config.json (Qwen2.5-Instruct ships
    repetition_penalty=1.05) changed every answer scored. Zero-shot, a copy of the base that sets repetition_penalty,
    n-gram blocking and a sequence_bias must answer as the base does."""
    odd = with_generation_config(chat_llama, tmp_path / "odd-base", repetition_penalty=5.0, no_repeat_ngram_size=2,
                                 sequence_bias={(chat_tokenizer().convert_tokens_to_ids("paris"),): 20.0})
    path = write_jsonl(tmp_path / "m.jsonl", messages_rows())
    adapter = [] if method == "lora" else [f"adapter.method={method}", "adapter.target_modules=null", "adapter.num_virtual_tokens=4"]
    answers = []
    for name, model in (("plain", chat_llama), ("odd", odd)):
        r = recipe_for(tmp_path, model, path, [*adapter, "train.max_steps=0", "export.merge=false", f"output_dir={tmp_path / name}"])
        run(r)
        answers.append([json.loads(line)["prediction"] for line in (r.out / "predictions-eval.jsonl").read_text().splitlines()])
    assert answers[0] == answers[1]
    if method == "lora":  # the card's snippet, run as written on the odd base, answers as the evaluation did
        from peftlab.publish.card import card_text

        snippet = re.search(r"```python\n(.*?)```", card_text(r.out), re.S).group(1)
        snippet = re.sub(r"repo = .*", f"repo = {str(r.out)!r}", snippet).replace("What is the capital of France?", QA[0][0])
        snippet = re.sub(r"base_model = .*", f"base_model = {str(odd)!r}", snippet)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(snippet, {})
        assert printed.getvalue().strip() == answers[1][0], (printed.getvalue(), snippet)


def test_generation_stops_at_the_bases_own_end_tokens_too_in_evaluation_and_the_card(tmp_path, chat_llama):
    """A base whose generation_config lists end tokens beyond the tokenizer's (Qwen2.5-Instruct [<|im_end|>,
    <|endoftext|>], Llama-3.1 [eot, end_of_text, eom]): eos_token_id=stop_ids(tokenizer) replaced that list, so a model
    writing one of the others generated on to max_new_tokens and the text after it was scored. Evaluation and the
    card's snippet stop at both."""
    from transformers import AutoModelForCausalLM

    from peftlab.publish.card import card_text
    from peftlab.tasks.generative import end_tokens, evaluation_generation

    tok = chat_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(chat_llama).eval()
    ids = torch.tensor([sft.encode(tok, messages_rows(1)[0]["messages"], 64)["gen_ids"]])
    with evaluation_generation(model, max_new_tokens=8, do_sample=False, num_beams=1, pad_token_id=tok.pad_token_id,
                               eos_token_id=sft.stop_ids(tok)) as config:
        plain = model.generate(ids, generation_config=config)[0, ids.shape[1]:].tolist()
    end = plain[1]  # the base's own second end token: written second
    assert len(plain) == 8 and tok.eos_token_id not in plain[:2]
    odd = with_generation_config(chat_llama, tmp_path / "two-ends", eos_token_id=[tok.eos_token_id, end])
    model = AutoModelForCausalLM.from_pretrained(odd).eval()
    assert end_tokens(model, sft.stop_ids(tok)) == [*sft.stop_ids(tok), end] and end_tokens(model, 7)[0] == 7
    want = tok.decode(plain[: plain.index(end) + 1], skip_special_tokens=True).strip()
    path = write_jsonl(tmp_path / "m.jsonl", messages_rows(2))
    r = recipe_for(tmp_path, odd, path, ["train.max_steps=0", "export.merge=false"])
    run(r)
    preds = [json.loads(line)["prediction"] for line in (r.out / "predictions-eval.jsonl").read_text().splitlines()]
    assert preds[0] == want, (preds, plain, want)
    snippet = re.search(r"```python\n(.*?)```", card_text(r.out), re.S).group(1)
    # (a base whose generation_config lacks the template's end-of-turn token stopped at its own list only)
    assert f"eos = {sft.stop_ids(tok)!r}" in snippet and "eos_token_id=eos" in snippet, snippet
    snippet = re.sub(r"repo = .*", f"repo = {str(r.out)!r}", snippet).replace("What is the capital of France?", QA[0][0])
    snippet = re.sub(r"base_model = .*", f"base_model = {str(odd)!r}", snippet)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(snippet, {})
    assert printed.getvalue().strip() == want, (printed.getvalue(), snippet)


def test_prefix_tuning_with_gradient_checkpointing_is_refused_before_training(tmp_path, chat_llama):
    """A checkpointed layer drops the cache a prefix's keys and values are in, and peft refuses the model: `validate`
    said ok, and training failed at the model build with peft's bare 'PREFIX_TUNING does not work with gradient
    checkpointing' (ValueError)."""
    from peftlab import build_model
    from peftlab.errors import PeftlabError
    from peftlab.methods.prompt import peft_generates_prefix

    path = write_jsonl(tmp_path / "m.jsonl", messages_rows())
    prefix = ["adapter.method=prefix_tuning", "adapter.target_modules=null", "export.merge=false"]
    refusal = "prefix_tuning with train.gradient_checkpointing=true: .*Set train.gradient_checkpointing=false"
    with pytest.raises(ConfigError, match=refusal):
        recipe_for(tmp_path, chat_llama, path, [*prefix, "train.gradient_checkpointing=true"])
    recipe_for(tmp_path, chat_llama, path, ["adapter.method=p_tuning", "adapter.target_modules=null", "train.gradient_checkpointing=true"])
    if peft_generates_prefix():
        recipe = recipe_for(tmp_path, chat_llama, path, prefix)
        recipe.train.gradient_checkpointing = True  # past validation (the Python API): the model build refuses it too
        with pytest.raises(PeftlabError, match=refusal):
            build_model(recipe, num_labels=0, label_names=[])


def test_prefix_tuning_before_peft_022_and_packed_prompt_methods_are_refused_at_validation(tmp_path, chat_llama, monkeypatch):
    """prefix tuning generated another model's text before peft 0.22 (its generate, from the third new token on); a
    packed row under a prompt method lets each example attend to the ones before it (peft drops the position ids that
    keep them apart)."""
    from peftlab.methods import prompt

    path = write_jsonl(tmp_path / "m.jsonl", messages_rows())
    prefix = ["adapter.method=prefix_tuning", "adapter.target_modules=null"]
    with pytest.raises(ConfigError, match="data.packing=true with adapter.method=prefix_tuning: .*Set data.packing=false"):
        recipe_for(tmp_path, chat_llama, path, [*prefix, "data.packing=true"])
    monkeypatch.setattr(prompt, "peft_generates_prefix", lambda: False)  # as on a peft before 0.22
    with pytest.raises(ConfigError, match="prefix_tuning cannot generate faithfully.*Use prompt_tuning or p_tuning.*upgrade peft"):
        recipe_for(tmp_path, chat_llama, path, prefix)
    monkeypatch.undo()
    if prompt.peft_generates_prefix():
        recipe_for(tmp_path, chat_llama, path, prefix)  # unpacked: fine
    with pytest.raises(ConfigError, match="data.packing=true with adapter.method=p_tuning: .*Set data.packing=false"):
        recipe_for(tmp_path, chat_llama, path, ["adapter.method=p_tuning", "adapter.target_modules=null", "data.packing=true"])
    recipe_for(tmp_path, chat_llama, path, ["adapter.method=p_tuning", "adapter.target_modules=null"])  # unpacked: fine


def test_an_over_long_prompt_keeps_its_system_turn_instruction_and_generation_prompt(caplog):
    """A prompt longer than data.max_length was cut to its last tokens: the system turn, the instruction and the user
    header went, and the model went on with the dialogue. Its last user turn's text is cut at the end now."""
    tok = chat_tokenizer()
    messages = [{"role": "system", "content": "you are terse"},
                {"role": "user", "content": "Summarize this dialogue. " + " ".join(f"anna: word{i} and more" for i in range(60))},
                {"role": "assistant", "content": "anna talks"}]
    whole = sft.encode(tok, messages, 1024)
    row = sft.encode(tok, messages, 64)
    assert len(whole["gen_ids"]) > 64 and not whole["prompt_cut"] and row["prompt_cut"]
    assert 56 <= len(row["gen_ids"]) <= 64
    text = tok.decode(row["gen_ids"])
    assert text.startswith(tok.decode(whole["gen_ids"][:12])) and "you are terse" in text and "summarize this dialogue" in text
    tail = tok.decode(whole["gen_ids"][-3:])  # the generation prompt: the user turn's end, then the assistant header
    assert text.endswith(tail) and tail.startswith(IM_END) and tail.strip().endswith("assistant"), (text, tail)
    assert row["source"] == messages[1]["content"]  # the predictions file names the row's own text
    short = [{"role": "user", "content": "hi " * 300}, {"role": "assistant", "content": "ok"}]  # no system turn: cut the same way
    assert len(sft.encode(tok, short, 32)["gen_ids"]) <= 32


def test_an_over_long_history_drops_its_oldest_whole_turns_and_keeps_the_system_turn(tmp_path, chat_llama, caplog):
    """Where the long part was the earlier history and the last user turn short, the prompt fell back to its last
    max_length tokens: the system turn dropped, the prompt starting mid-turn. The oldest whole turns go now (as few as
    fit), the system turn and the template's structure stay, and the warning says turns were dropped, not text cut."""
    tok = chat_tokenizer()
    history = []
    for i in range(6):
        history += [{"role": "user", "content": f"tell me fact {i} about rome please"},
                    {"role": "assistant", "content": "rome had many emperors and provinces " * 2}]
    messages = [{"role": "system", "content": "you are a historian"}, *history, {"role": "user", "content": "thanks"},
                {"role": "assistant", "content": "welcome"}]
    whole, row = sft.encode(tok, messages, 1024), sft.encode(tok, messages, 64)
    assert row["prompt_cut"] and row["prompt_fit"] == "" and 0 < row["turns_dropped"] < 6 and len(row["gen_ids"]) <= 64
    kept = [messages[0], *history[2 * row["turns_dropped"]:], messages[-2], messages[-1]]  # exactly the oldest turns gone
    assert row["gen_ids"] == sft.encode(tok, kept, 1024)["gen_ids"]
    assert len(sft.encode(tok, [messages[0], *history[2 * row["turns_dropped"] - 2:], *messages[-2:]], 1024)["gen_ids"]) > 64
    text = tok.decode(row["gen_ids"])
    assert text.startswith(tok.decode(whole["gen_ids"][:8])) and "you are a historian" in text and text.endswith(
        tok.decode(whole["gen_ids"][-8:]))
    long_last = [*messages[:-2], {"role": "user", "content": "word " * 100}, messages[-1]]  # then the last turn's text
    row = sft.encode(tok, long_last, 64)
    assert row["turns_dropped"] == 6 and row["prompt_fit"] == "text" and "you are a historian" in tok.decode(row["gen_ids"])
    path = write_jsonl(tmp_path / "long.jsonl", [{"messages": messages[1:]}])
    r = recipe_for(tmp_path, chat_llama, write_jsonl(tmp_path / "m.jsonl", messages_rows()),
                   ["task.system_prompt=you are a historian"], eval_path=path)
    with caplog.at_level(logging.WARNING):
        data = build_data(r, tok, splits=load_splits(r)[0], label_names=[])
    assert data.eval[0]["gen_ids"] == sft.encode(tok, messages, 64)["gen_ids"]
    assert re.search(r"data.eval: 1 generation prompt\(s\) longer than data.max_length=64, rendered again to fit: 1 lost "
                     r"their oldest turns \(\d user turns with their replies in all\); the system turn", caplog.text), caplog.text


@pytest.mark.parametrize("method,folds", [("lora", True), ("ia3", True), ("prompt_tuning", False)])
def test_the_final_evaluation_folds_a_mergeable_adapter_and_scores_the_same(tmp_path, chat_llama, monkeypatch, method, folds):
    """eval.merge_adapter (default): the final evaluations run with the adapter merged into an fp32 base, then unmerged;
    the loss and every generated answer are those of the unfolded adapter. Prompt tuning has nothing to fold."""
    from peft.tuners.tuners_utils import BaseTuner

    calls = []
    for name in ("merge_adapter", "unmerge_adapter"):
        original = getattr(BaseTuner, name)
        monkeypatch.setattr(BaseTuner, name, lambda self, *a, _f=original, _n=name, **k: (calls.append(_n), _f(self, *a, **k))[1])
    path = write_jsonl(tmp_path / "m.jsonl", messages_rows())
    adapter = {"lora": [], "ia3": ["adapter.method=ia3", "adapter.target_modules=null"],
               "prompt_tuning": ["adapter.method=prompt_tuning", "adapter.target_modules=null"]}[method]
    results = {}
    for fold in (True, False):
        calls.clear()
        (tmp_path / str(fold)).mkdir()
        r = recipe_for(tmp_path / str(fold), chat_llama, path, [*adapter, "train.max_steps=20", f"eval.merge_adapter={str(fold).lower()}"])
        record = run(r)
        # folded for the evaluation at the last step and for the final one (one split: data.eval)
        assert calls == (["merge_adapter", "unmerge_adapter"] * 2 if fold and folds else []), calls
        results[fold] = (record.metrics["eval"], (r.out / "predictions-eval.jsonl").read_text())
    (folded, folded_preds), (plain, plain_preds) = results[True], results[False]
    assert folded["loss"] == pytest.approx(plain["loss"], rel=1e-5) and folded_preds == plain_preds


def test_only_adapters_over_fp32_base_weights_are_folded(chat_llama):
    """A bf16 (or 4/8-bit) base weight would round a folded update away: such bases are scored unfolded."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from peftlab.train import adapted_weights_fp32

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(chat_llama), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert adapted_weights_fp32(model)
    model.base_model.model.model.layers[1].self_attn.v_proj.base_layer.to(torch.bfloat16)
    assert not adapted_weights_fp32(model)
    assert not adapted_weights_fp32(AutoModelForCausalLM.from_pretrained(chat_llama))  # no adapter: nothing to fold


def test_generation_hands_the_lm_head_a_contiguous_input_and_the_same_tokens(chat_llama):
    """In generate's first step transformers gives the head `hidden[:, -1:, :]`, a strided view that torch's CPU bf16
    matmul serves with a bmm copying the head's weight per row (generative.contiguous_head_input). Inside
    `contiguous_head_input` the head sees contiguous inputs and greedy generation gives the same tokens; without it
    the first step's input is the strided view (so the check can fail); afterwards no hook is left. A model wrapped
    for several processes (.module) gets the hook on its inner head."""
    from transformers import AutoModelForCausalLM

    from peftlab.tasks.generative import contiguous_head_input

    model = AutoModelForCausalLM.from_pretrained(chat_llama).eval()
    head = model.get_output_embeddings()
    tok = chat_tokenizer()
    tok.padding_side = "left"
    ids = tok(["what is the capital of france", "which animal barks"], return_tensors="pt", padding=True,
              return_token_type_ids=False)

    def generate_seeing(inputs: list) -> torch.Tensor:
        hook = head.register_forward_pre_hook(lambda m, args: inputs.append(args[0].is_contiguous()))
        try:
            return model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        finally:
            hook.remove()

    fixed, plain = [], []
    with contiguous_head_input(model):
        tokens = generate_seeing(fixed)
    assert fixed and all(fixed)
    assert torch.equal(tokens, generate_seeing(plain))
    assert plain[0] is False
    assert not head._forward_pre_hooks

    class Wrapped(torch.nn.Module):  # a model prepared for several processes (DDP) holds it as .module
        def __init__(self):
            super().__init__()
            self.module = model

    with contiguous_head_input(Wrapped()):
        assert len(head._forward_pre_hooks) == 1
    assert not head._forward_pre_hooks


def test_an_eval_split_with_several_answers_scores_exact_match_and_rouge_against_each(tmp_path, chat_llama):
    """data.eval.references_column: a prediction counts as exact when it equals any of the row's answers, ROUGE takes
    the best; `validate` names a missing column; the loss and the predictions' `reference` stay the target column."""
    from peftlab.data import column_problems
    from peftlab.metrics import rouge_metrics

    rows = [{"question": q, "answer": a, "answers": [a, f"it is {a}"]} for q, a in QA]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    cols = ["data.text_columns=[question]", "data.target_column=answer", "train.max_steps=2"]
    recipe = recipe_for(tmp_path, chat_llama, path, [*cols, "data.eval.references_column=answers"])
    m = run(recipe)["metrics"]["eval"]
    got = [json.loads(line) for line in (recipe.out / "predictions-eval.jsonl").read_text().splitlines()]
    assert [(g["reference"], g["references"]) for g in got] == [(r["answer"], r["answers"]) for r in rows]
    preds = [g["prediction"] for g in got]
    assert m["rougeL"] == pytest.approx(rouge_metrics(preds, [g["references"] for g in got])["rougeL"])
    assert sft.score(["it is paris", "blue"], ["paris", "red"], None, [["paris", "it is  paris"], ["red"]])["exact_match"] == 0.5
    assert sft.score(["it is paris"], ["paris"], None)["exact_match"] == 0.0
    bad = recipe_for(tmp_path, chat_llama, path, [*cols, "data.eval.references_column=choices"])
    assert any("data.eval: column(s) ['choices'] not found" in p for p in column_problems(bad))
    with pytest.raises(DataError, match=r"data.eval.references_column='choices': no such column"):
        load_splits(bad)


def test_a_references_cell_that_is_no_list_names_its_0_based_data_row(tmp_path, chat_llama):
    """It said 'row 3' for data row 2 (1-based), where every other SFT data error and the predictions count from 0."""
    rows = [{"question": q, "answer": a, "answers": [a]} for q, a in QA[:4]]
    rows[2]["answers"] = "oops"
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    r = recipe_for(tmp_path, chat_llama, path, ["data.text_columns=[question]", "data.target_column=answer",
                                                "data.eval.references_column=answers"])
    with pytest.raises(DataError, match=r"data.eval.references_column='answers': data row 2 \(0-based, as predictions files "
                                        r"count\) holds oops, not a list of texts"):
        load_splits(r)


def test_generated_tokens_are_counted_up_to_the_first_stop_token():
    new = torch.tensor([[5, 6, 2, 2], [5, 6, 7, 8], [2, 2, 2, 2], [5, 3, 9, 2]])  # stop ids 2 and 3; 2 also pads
    assert sft.new_token_counts(new, [2, 3]).tolist() == [3, 4, 1, 2]


SMOLLM2_RECIPES = sorted((REPO / "recipes" / "smollm2-135m").glob("*.yaml"))


@pytest.mark.parametrize("path", SMOLLM2_RECIPES, ids=lambda p: p.stem)
def test_the_shipped_smollm2_recipes_validate_and_each_qlora_differs_from_its_lora_only_in_quantization(path):
    text = path.read_text()
    assert text.startswith("#") and f"peftlab train recipes/smollm2-135m/{path.name}" in text  # says how to run it
    r = load_recipe(path, validate_files=False)
    assert r.model.name == "../shared/models/smollm2-135m-instruct" and r.name == f"smollm2-135m-{path.stem}"
    if "qlora" in path.stem:
        lora = yaml.safe_load(path.with_name(path.name.replace("qlora", "lora")).read_text())
        mine = yaml.safe_load(text)
        assert mine.pop("quant") == {"mode": "4bit", "quant_type": "nf4", "double_quant": True}
        assert {**mine, "name": lora["name"]} == lora
    if r.task.type == "sft":
        assert r.data.packing and r.train.best_metric == "loss"  # selection needs no generation


@pytest.mark.parametrize("path", SMOLLM2_RECIPES, ids=lambda p: p.stem)
def test_every_shipped_smollm2_recipe_trains_two_steps_on_a_tiny_llama_under_bf16_autocast(path, chat_llama, tmp_path,
                                                                                           monkeypatch):
    """Each shipped SmolLM2 recipe, as it is (its task, quantization, packing, adapter, dtypes and speed options) but
    on the tiny chat Llama and a few rows of its real data, trains two steps under bf16 autocast, the precision `auto`
    picks on CPUs with native bf16 (forced here, so every host runs the autocast paths). Stop 52 broke the shipped
    QLoRA recipes there (mixed dtypes in the per-example attention's backward pass) and nothing short of training
    one caught it."""
    shared_or_skip("data")
    if "qlora" in path.stem:
        pytest.importorskip("bitsandbytes")
    monkeypatch.chdir(REPO)  # the recipes name ../shared/data from the repository root
    # (data.max_length 200: with any recipe's prompt and label words, within the tiny Llama's 256 positions)
    recipe = load_recipe(path, [f"model.name={chat_llama}", "data.train.max_samples=24", "data.eval=null",
                                "data.test=null", "data.max_length=200", "eval.max_new_tokens=16", "train.max_steps=2", "train.batch_size=4",
                                "train.grad_accum=1", "train.log_every=1", "train.precision=bf16",
                                f"output_dir={tmp_path / 'out'}"])
    record = run(recipe)
    from .conftest import losses

    assert record.steps == 2 and len(losses(recipe.out)) == 2
    assert all(math.isfinite(x) for x in losses(recipe.out))
    assert (recipe.out / "adapter_model.safetensors").is_file() or (recipe.out / "model.safetensors").is_file()


def test_sft_recipes_cover_the_issue():
    names = {p.stem for p in SMOLLM2_RECIPES}
    assert {"samsum-sft-lora", "samsum-sft-qlora", "gsm8k-sft-lora", "gsm8k-sft-qlora", "dialogsum-sft-lora",
            "dialogsum-sft-qlora", "sst2-head-lora", "sst2-verbalizer-lora", "emotion-head-lora",
            "emotion-verbalizer-lora"} <= names


def test_gsm8k_answers_are_read_after_the_marker_or_else_from_the_last_number():
    from peftlab.metrics import answer_accuracy, final_answer

    assert final_answer("9 * 2 = $18 a day.\n#### 18") == "18"
    assert final_answer("#### $1,000.0") == "1000" and final_answer("So she pays 3, then 1,234.") == "1234"
    assert final_answer("no number here") is None and final_answer("#### eighteen") is None
    # one value, however written: these compared as strings ('5.00' != '5'), and '.5' read as 5, '3/4' as 3
    assert [final_answer(f"#### {n}") for n in ("5.00", "0.50", ".5", "3/4", "$1,000.00", "-2")] == ["5", "0.5", "0.5", "0.75", "1000", "-2"]
    assert answer_accuracy(["#### 5.00", "#### .5"], ["#### 5", "#### 0.5"])["answer_accuracy"] == 1.0
    # a range or hyphen is no minus sign; 29 digits stay 29 digits; a model writing on past its answer is read at it
    assert final_answer("It takes 20-25 minutes") == "25" and final_answer("x-3") == "3" and final_answer("(-3)") == "-3"
    assert final_answer("#### 0." + "9" * 29) == "0." + "9" * 29 and final_answer("#### 1" + "0" * 28) != final_answer("#### 1" + "0" * 27 + "1")
    assert final_answer("#### 5\n\nQuestion: how many more?\n#### 7") == "5"
    # a fraction with no finite decimal in lowest terms (it printed 200 digits), a Unicode minus is a sign (it was dropped)
    assert [final_answer(f"#### {n}") for n in ("1/3", "2/6", "-2/3", "5/0", "\u22125")] == ["1/3", "1/3", "-2/3", "5/0", "-5"]
    assert final_answer("It was \u22123.5 degrees") == "-3.5" and answer_accuracy(["#### 2/6"], ["#### 1/3"])["answer_accuracy"] == 1.0
    assert final_answer("#### Step 1: 16 eggs, 3 eaten.\n#### Step 2: 16 - 3 = 13\n#### 26") == "26"  # headings are no answer
    # a space after the sign is still a sign (it read '#### - 5' as 5); commas group thousands only ('1,2,3' read as 123)
    assert final_answer("#### - 5") == "-5" and final_answer("#### \u2212 2.5") == "-2.5" and final_answer("He has 1,2,3 apples") == "3"
    assert final_answer("It cost $12,345,678.50 in all") == "12345678.5" and final_answer("#### 1,000,000") == "1000000"
    refs = ["Janet sells 9 eggs.\n#### 18"] * 4
    m = answer_accuracy(["#### 18", "She makes 18 dollars.", "#### 17", "I do not know"], refs)
    assert m == {"answer_accuracy": 0.5, "answer_format": 0.5}
    # a '#### Step 1' heading is no '####' answer for answer_format either (it counted any '####')
    assert answer_accuracy(["#### Step 1 then 18", "#### 18"], refs[:2]) == {"answer_accuracy": 1.0, "answer_format": 0.5}
    fn = sft.load_metric_fn("peftlab.metrics:answer_accuracy")  # what the GSM8K recipes name in eval.metric_fn
    assert sft.score(["#### 18"], refs[:1], "peftlab.metrics:answer_accuracy")["answer_accuracy"] == 1.0 and fn is answer_accuracy


def test_a_metric_fn_value_that_is_no_number_is_left_out_with_a_warning(monkeypatch, caplog):
    """It raised TypeError in float() after training, and the trained run was lost."""
    monkeypatch.setattr(sft, "load_metric_fn", lambda name: lambda p, r: {"ok": 0.5, "per_row": [1, 0], "flag": True})
    with caplog.at_level("WARNING", logger="peftlab"):
        m = sft.score(["a"], ["a"], "mine:score")
    assert m["ok"] == 0.5 and "per_row" not in m and "flag" not in m and "'per_row', 'flag' that are not numbers" in caplog.text
    # a metric_fn returning one number, not a dict: an error after training lost the trained run; warned now
    monkeypatch.setattr(sft, "load_metric_fn", lambda name: lambda p, r: 0.5)
    with caplog.at_level("WARNING", logger="peftlab"):
        m = sft.score(["a"], ["a"], "mine:score")
    assert m["exact_match"] == 1.0 and set(m) == {"exact_match", "rouge1", "rouge2", "rougeL", "rougeLsum"}
    assert "eval.metric_fn=mine:score returned float, not {metric: number}" in caplog.text


def test_a_metric_fn_module_that_fails_on_import_is_one_config_error(tmp_path, monkeypatch):
    """Its module's own error (a SyntaxError, a line failing at import) came out as a raw traceback from tokenize."""
    (tmp_path / "typo_metrics.py").write_text("def score(preds, refs:\n    return {}\n")
    (tmp_path / "failing_metrics.py").write_text("TABLE = 1 / 0\ndef score(preds, refs):\n    return {}\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"eval.metric_fn='typo_metrics:score': cannot load it \(SyntaxError"):
        sft.load_metric_fn("typo_metrics:score")
    with pytest.raises(ConfigError, match=r"eval.metric_fn='failing_metrics:score': cannot load it \(ZeroDivisionError"):
        sft.load_metric_fn("failing_metrics:score")


def test_a_metric_fn_that_cannot_take_predictions_and_references_is_refused_before_training(tmp_path, monkeypatch):
    """A name that is no function, or one of the wrong arity, loaded fine and raised TypeError when first called: after
    training, where the trained run was lost (nothing exported)."""
    (tmp_path / "odd_metrics.py").write_text("THRESHOLD = 3\ndef one(preds):\n    return {}\ndef ok(preds, refs, *, k=1):\n    return {}\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"eval.metric_fn='odd_metrics:THRESHOLD': not a function"):
        sft.load_metric_fn("odd_metrics:THRESHOLD")
    with pytest.raises(ConfigError, match=r"eval.metric_fn='odd_metrics:one': cannot take \(predictions, references\)"):
        sft.load_metric_fn("odd_metrics:one")
    assert sft.load_metric_fn("odd_metrics:ok").__name__ == "ok"


def test_validate_loads_the_metric_fn(tmp_path, chat_llama, monkeypatch):
    """`peftlab validate` said ok to an eval.metric_fn whose module does not exist: only `train` loaded it."""
    from peftlab.run import preflight

    monkeypatch.chdir(tmp_path)
    path = write_jsonl(tmp_path / "qa.jsonl", messages_rows())
    problems = preflight(recipe_for(tmp_path, chat_llama, path, ["eval.metric_fn=no_such_metrics:score"]), training=False)
    assert any(p.startswith("eval.metric_fn='no_such_metrics:score': cannot load it (ModuleNotFoundError") for p in problems), problems
    assert not preflight(recipe_for(tmp_path, chat_llama, path, ["eval.metric_fn=peftlab.metrics:answer_accuracy"]), training=False)


def test_a_metric_fn_that_raises_is_left_out_with_a_warning_and_the_run_is_exported(tmp_path, chat_llama, monkeypatch, caplog):
    """Its error at the final evaluation propagated: the trained run was never exported (lost after hours of training)."""
    (tmp_path / "raising_metrics.py").write_text("def score(preds, refs):\n    raise KeyError('label')\n")
    monkeypatch.chdir(tmp_path)
    path = write_jsonl(tmp_path / "qa.jsonl", messages_rows())
    with caplog.at_level("WARNING", logger="peftlab"):
        record = run(recipe_for(tmp_path, chat_llama, path, ["eval.metric_fn=raising_metrics:score", "train.max_steps=2"]))
    assert (Path(record.output_dir) / "adapter_model.safetensors").is_file()
    assert "exact_match" in record.metrics["eval"] and "eval.metric_fn=raising_metrics:score raised (below)" in caplog.text
    assert "KeyError: 'label'" in caplog.text


def test_a_nan_metric_is_written_as_null_and_left_out_of_the_card(tmp_path, chat_llama, monkeypatch):
    """A user's metric that came out NaN (a mean over no rows) was written as the bare token NaN into metrics.json,
    run.json, metrics.jsonl and eval-*.json: not JSON (JavaScript, jq and the Hub refuse it); and the card's model-index
    carried value nan. Now null in every file, and left out of the card's results."""
    from peftlab.publish.card import card_data

    (tmp_path / "nan_metrics.py").write_text("def score(preds, refs):\n    return {'mine': float('nan'), 'fine': 0.25}\n")
    monkeypatch.chdir(tmp_path)
    path = write_jsonl(tmp_path / "qa.jsonl", messages_rows())
    record = run(recipe_for(tmp_path, chat_llama, path, ["eval.metric_fn=nan_metrics:score", "train.max_steps=2", "train.eval_every=1"]))
    out = Path(record.output_dir)

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))

    assert strict((out / "metrics.json").read_text())["eval"]["mine"] is None
    assert strict((out / "run.json").read_text())["metrics"]["eval"]["fine"] == 0.25
    from peftlab.rundir import log_path

    assert [strict(line) for line in log_path(out).read_text().splitlines()]
    sys_cli = __import__("peftlab.cli", fromlist=["main"])
    assert sys_cli.main(["eval", str(out), "--split", "eval"]) == 0
    assert strict((out / "eval-eval.json").read_text())["metrics"]["mine"] is None
    from peftlab.export import predictions_jsonl

    assert strict(predictions_jsonl([{"row": 0, "score": float("nan")}])) == {"row": 0, "score": None}
    scored = {r.metric_type for r in card_data(out).eval_results}
    assert "fine" in scored and "mine" not in scored


def test_a_tokenizer_with_tokens_past_the_embedding_is_refused_when_the_model_loads(tmp_path):
    """ChatML tokens added to the tokenizer, the base's embedding not resized: training failed in the first forward with
    'IndexError: index out of range in self' (a device-side assert on a GPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftlab import build_model
    from peftlab.errors import ModelError

    tok = chat_tokenizer()
    base = tmp_path / "short-vocab"
    LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)).save_pretrained(base)
    tok.save_pretrained(base)
    recipe = recipe_for(tmp_path, base, write_jsonl(tmp_path / "qa.jsonl", messages_rows()))
    with pytest.raises(ModelError, match=r"has 2 token\(s\) past the base's 30,522 embedding rows \('<\|im_start\|>', '<\|im_end\|>'"):
        build_model(recipe, num_labels=0, label_names=[])


def test_a_metric_fn_cannot_replace_the_tasks_own_metrics(monkeypatch, caplog):
    """A user metric named exact_match or loss replaced the task's figure in metrics.json (and the loss keep_best and the
    card read), silently."""
    monkeypatch.setattr(sft, "load_metric_fn", lambda name: lambda p, r: {"exact_match": 0.99, "loss": 0.0, "mine": 0.5})
    with caplog.at_level("WARNING", logger="peftlab"):
        m = sft.score(["a"], ["b"], "mine:score")
    assert m["exact_match"] == 0.0 and "loss" not in m and m["mine"] == 0.5
    assert "eval.metric_fn=mine:score returned 'exact_match', 'loss', which the task computes itself: left out" in caplog.text


def test_rows_whose_answer_is_cut_are_dropped_from_training_but_kept_for_evaluation(tmp_path, chat_llama, caplog):
    rows = messages_rows() + [{"messages": [{"role": "user", "content": "tell me more " * 40}, {"role": "assistant", "content": "no"}]}]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    for packing in ("false", "true"):
        recipe = recipe_for(tmp_path, chat_llama, path, ["data.max_length=48", f"data.packing={packing}"])
        splits, _ = load_splits(recipe)
        data = build_data(recipe, chat_tokenizer(), splits=splits, label_names=[])
        trained = sum(data.train["n_examples"]) if packing == "true" else len(data.train)
        assert trained == len(QA) and len(data.eval) == len(QA) + 1  # every eval row is scored
        cut = [r for r in data.eval if sum(y != -100 for y in r["labels"]) == 0]
        assert len(cut) == 1 and len(cut[0]["gen_ids"]) == 48 and cut[0]["reference"] == "no"
    assert "training drops them; evaluation keeps them" in caplog.text


def test_rows_with_an_empty_prompt_are_counted_in_a_warning(tmp_path, chat_llama, caplog):
    """A prompt/completion (or instruction) row with an empty prompt was trained as the answer to an empty user turn
    without a word, where an empty completion is dropped and counted."""
    rows = [{"prompt": "q", "completion": "a"}, {"prompt": None, "completion": "b"}, {"prompt": "  ", "completion": "c"},
            {"prompt": "", "completion": ""}]  # (the last: no answer, dropped and counted as such)
    recipe = recipe_for(tmp_path, chat_llama, write_jsonl(tmp_path / "pc.jsonl", rows))
    with caplog.at_level("WARNING", logger="peftlab"):
        load_splits(recipe)
    assert "data.train: 2 row(s) have an empty prompt (prompt): each is trained as the answer to an empty user turn" in caplog.text
    assert "data.eval: 2 row(s) have an empty prompt (prompt): each is scored as the answer to an empty user turn" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="peftlab"):  # a template frames the prompt: its words are the user turn
        load_splits(recipe_for(tmp_path, chat_llama, tmp_path / "pc.jsonl", ["task.prompt='Summarize: {source}'"]))
    assert "data.train: 2 row(s) have an empty prompt (prompt): each is trained as the answer to task.prompt's text alone" in caplog.text
    assert "data.train: dropped 1 row(s) without an answer" in caplog.text
    caplog.clear()
    rows = [{"instruction": "do", "input": "", "output": "x"}, {"instruction": "", "input": "", "output": "y"},
            {"instruction": "", "input": "ctx", "output": "z"}]
    with caplog.at_level("WARNING", logger="peftlab"):
        load_splits(recipe_for(tmp_path, chat_llama, write_jsonl(tmp_path / "ins.jsonl", rows)))
    assert "data.train: 1 row(s) have an empty prompt (instruction, input)" in caplog.text


def test_a_conversation_ends_at_its_last_answer_and_rows_keep_their_file_numbers(tmp_path, chat_llama, caplog):
    """An opening assistant turn (it crashed the chat template: "empty conversation") is context, not trained; a blank
    last answer and an unanswered user turn are cut (a blank reference was scored, and its end token trained); rows
    without an answer are dropped, and `row` stays the row's number in the file (it counted the rows left)."""
    u, a = ({"role": "user", "content": "q"}, {"role": "assistant", "content": "greetings"})
    rows = [{"messages": [a, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},  # 0: opens
            {"messages": [a, u]},  # 1: no answer (an opening turn is none): dropped
            {"messages": [u, {"role": "assistant", "content": "one"}, u, {"role": "assistant", "content": "  "}]},  # 2: cut
            {"messages": [u, {"role": "assistant", "content": "two"}, {"role": "user", "content": "and?"}]},  # 3: cut
            {"messages": [u, {"role": "assistant", "content": ""}, u, {"role": "assistant", "content": "three"}]}]  # 4
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    recipe = recipe_for(tmp_path, chat_llama, path)
    with caplog.at_level("WARNING", logger="peftlab"):
        splits, _ = load_splits(recipe)
    assert "data.train: 2 row(s) end with turns after their last answer" in caplog.text
    assert "data.train: dropped 1 row(s) without an answer" in caplog.text
    data = build_data(recipe, chat_tokenizer(), splits=splits, label_names=[])
    tok = chat_tokenizer()
    assert [r["row"] for r in data.eval] == [0, 2, 3, 4]
    assert [r["reference"] for r in data.eval] == ["hello", "one", "two", "three"]
    end = tok.convert_tokens_to_ids(IM_END)
    trained = [[t for t, y in zip(r["input_ids"], r["labels"]) if y != -100] for r in data.eval]
    assert trained[0] == tok("hello", add_special_tokens=False)["input_ids"] + [end]  # not the opening "greetings"
    assert trained[3] == tok("three", add_special_tokens=False)["input_ids"] + [end]  # not the blank answer's end token
    assert tok.decode(data.eval[2]["input_ids"]).count("and?") == 0
    # a system prompt first changes nothing: the opening assistant turn still answers no user turn
    recipe = recipe_for(tmp_path, chat_llama, path, ["task.system_prompt=be brief"])
    data = build_data(recipe, tok, splits=load_splits(recipe)[0], label_names=[])
    assert [r["row"] for r in data.eval] == [0, 2, 3, 4]
    assert [t for t, y in zip(data.eval[0]["input_ids"], data.eval[0]["labels"]) if y != -100] == trained[0]


def test_summarization_predictions_name_the_rows_of_the_file(tmp_path):
    from peftlab.config import DataConfig, SplitConfig
    from peftlab.data import normalize_split, read_split

    (tmp_path / "s.csv").write_text("dialogue,summary\na,x\nb,\nc,z\n")
    spec = SplitConfig(path=str(tmp_path / "s.csv"))
    ds = normalize_split(read_split(spec, DataConfig(), "data.train"), spec,
                         DataConfig(text_columns=["dialogue"]), "data.train", 0, target_column="summary")
    assert ds["row"] == [0, 2] and ds["target"] == ["x", "z"]


@pytest.mark.slow
def test_smollm2_chat_template_masks_exactly_the_answer():
    """The real SmolLM2 tokenizer (its own ChatML template, default system prompt): the labels are the answer + <|im_end|>."""
    d = shared_or_skip("models", "smollm2-135m-instruct")
    from transformers import AutoTokenizer

    from peftlab.bases import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path(str(d)))  # the GGUF folder, converted once (with its template)
    msgs = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "2+2 = 4."}]
    row = sft.encode(tok, msgs, 512)
    trained = [t for t, y in zip(row["input_ids"], row["labels"]) if y != -100]
    assert tok.decode(trained) == "2+2 = 4.<|im_end|>"
    msgs[1]["content"] = " 4 apples"  # '\n' + ' ' were one token 'ĊĠ' across the answer's start: the space was not trained
    row = sft.encode(tok, msgs, 512)
    assert tok.decode([t for t, y in zip(row["input_ids"], row["labels"]) if y != -100]) == " 4 apples<|im_end|>"
    assert row["gen_ids"] == tok(sft.render(tok, msgs[:1], True), add_special_tokens=False)["input_ids"]
    assert tok.pad_token is None or tok.pad_token == tok.eos_token


def test_generation_timing_counts_every_process():
    """Under 2 processes the report's new_tokens and tokens/s were the main process's share (11 of a 1-process run's 20)."""
    from types import SimpleNamespace

    ranks = [{"new_tokens": 11, "seconds": 0.5}, {"new_tokens": 12, "seconds": 0.75}]
    two = SimpleNamespace(num_processes=2, device="cpu",
                          gather=lambda t: torch.tensor([[r["new_tokens"], r["seconds"]] for r in ranks], dtype=torch.float64))
    assert sft.every_process(ranks[0], two) == {"new_tokens": 23, "seconds": 0.75}
    assert sft.every_process(ranks[0], SimpleNamespace(num_processes=1)) == ranks[0]
