"""Knowledge distillation (train.distill) and smaller students (model.num_layers), on tiny models: the loss is the
formula, alpha=1 is exactly label-only training, the cached soft targets are the teacher's own logits, a distilled
student ends closer to its teacher, unlabelled rows count, N layers survive a reload and a merge, bad input fails
before anything is written, and run.json and the card name the teacher."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from peftlab import distill, load_recipe, run
from peftlab.distill import cached_teacher_logits, soft_target_file, soft_target_loss, teacher_logits
from peftlab.errors import ConfigError
from peftlab.export import load_trained, merge
from peftlab.model import keep_layers, kept_layer_indices

from .conftest import load_benchmark, logits, minilm_tokenizer, synthetic_rows
from .test_train import losses

DEV_TEXTS = [t for t, _ in synthetic_rows(48, 7)]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test keeps soft targets in its own cache ($PEFTLAB_CACHE), never the user's ~/.cache."""
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))


def recipe_for(tmp: Path, model: Path, files: dict, name: str, overrides: dict | None = None):
    tree = {
        "name": name, "output_dir": str(tmp / name), "model": {"name": str(model)},
        "adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(files["train"]), "eval": str(files["dev"]), "label_names": ["negative", "positive"], "max_length": 32},
        "train": {"epochs": 2, "batch_size": 16, "lr": 5e-3, "log_every": 2, "warmup_fraction": 0.0, "precision": "fp32",
                  "report_to": "none"},
        "eval": {"batch_size": 32},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return load_recipe(path, [f"{k}={'null' if v is None else v}" for k, v in (overrides or {}).items()])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tiny_bert, sentiment_files) -> Path:
    """A well-trained teacher: the tiny BERT fully fine-tuned (every weight) for a few epochs."""
    tmp = tmp_path_factory.mktemp("teacher")
    run(recipe_for(tmp, tiny_bert, sentiment_files, "teacher", {"adapter.method": "full", "train.epochs": 6, "train.lr": 3e-3}))
    return tmp / "teacher"


def student(tmp_path, tiny_bert, sentiment_files, name, overrides=None):
    return recipe_for(tmp_path, tiny_bert, sentiment_files, name, {"train.epochs": 1, **(overrides or {})})


def distilled(teacher: Path, alpha=0.2, temperature=2.0, **more) -> dict:
    return {"train.distill.teacher": str(teacher), "train.distill.alpha": alpha, "train.distill.temperature": temperature, **more}


def kl_to_teacher(teacher: Path, out: Path, texts=DEV_TEXTS) -> float:
    t = logits(load_trained(teacher)[0], texts)
    s = logits(load_trained(out)[0], texts)
    return F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="batchmean").item()


# ------------------------------------------------------------------------------------------------- the loss

def test_the_loss_is_the_formula():
    torch.manual_seed(0)
    student_logits, teacher_l = torch.randn(6, 3, requires_grad=True), torch.randn(6, 3)
    labels = torch.tensor([0, 2, -100, 1, -100, 0])
    T, a = 3.0, 0.3
    ce = F.cross_entropy(student_logits[labels != -100], labels[labels != -100])
    p_t = (teacher_l / T).softmax(-1)
    kl = (p_t * (p_t.log() - (student_logits / T).log_softmax(-1))).sum(-1).mean()  # mean over all rows
    assert soft_target_loss(student_logits, labels, teacher_l, T, a).item() == pytest.approx((a * ce + (1 - a) * T * T * kl).item(), rel=1e-6)
    # alpha=1: exactly the classifier's own cross-entropy; alpha=0: the soft targets alone
    labelled = torch.tensor([0, 2, 1, 1, 0, 0])
    assert torch.equal(soft_target_loss(student_logits, labelled, teacher_l, T, 1.0), F.cross_entropy(student_logits, labelled))
    assert soft_target_loss(student_logits, labels, teacher_l, T, 0.0).item() == pytest.approx((T * T * kl).item(), rel=1e-6)


def test_unlabelled_rows_get_the_soft_target_term_only():
    torch.manual_seed(1)
    x, teacher_l = torch.randn(4, 2, requires_grad=True), torch.randn(4, 2)
    loss = soft_target_loss(x, torch.full((4,), -100), teacher_l, 2.0, 0.5)  # a batch of unlabelled rows only: finite
    loss.backward()
    assert torch.isfinite(loss) and x.grad.abs().sum() > 0
    x.grad = None
    soft_target_loss(x, torch.tensor([1, -100, 0, -100]), teacher_l, 2.0, 1.0).backward()  # alpha=1: they are ignored
    assert x.grad[1].abs().sum() == 0 and x.grad[3].abs().sum() == 0 and x.grad[0].abs().sum() > 0


# ------------------------------------------------------------------------------------------- the soft targets

def test_cached_soft_targets_are_the_teachers_own_logits(teacher):
    cached = teacher_logits(teacher, DEV_TEXTS, batch_size=5)  # batches of mixed lengths, longest first, then put back in order
    own = logits(load_trained(teacher)[0], DEV_TEXTS)
    assert cached.shape == (len(DEV_TEXTS), 2)
    assert torch.allclose(cached, own, atol=1e-5)


def test_a_bf16_teachers_weights_are_cast_once_and_give_the_same_soft_targets(tmp_path, tiny_bert, sentiment_files, monkeypatch):
    """train.cast_frozen in the teacher's pass: its frozen weights cast to bf16 once, not at every batch, and the same
    logits bit for bit."""
    from contextlib import nullcontext

    run(recipe_for(tmp_path, tiny_bert, sentiment_files, "bf16", {"adapter.method": "full", "train.max_steps": 3,
                                                                   "train.precision": "bf16"}))
    real, cast = distill.FrozenWeightsCast, []
    monkeypatch.setattr(distill, "FrozenWeightsCast", lambda model, dtype: cast.append(real(model, dtype)) or cast[-1])
    once = teacher_logits(tmp_path / "bf16", DEV_TEXTS, batch_size=5)
    assert cast[0].dtype == torch.bfloat16 and len(cast[0].params) >= 24  # 2 layers x 6 linears x (weight, bias)
    monkeypatch.setattr(distill, "FrozenWeightsCast", lambda model, dtype: nullcontext())
    assert torch.equal(once, teacher_logits(tmp_path / "bf16", DEV_TEXTS, batch_size=5))


def test_the_soft_target_cache_serves_any_rows_by_text_and_runs_the_teacher_only_on_new_ones(teacher, monkeypatch, caplog):
    calls = []
    real = distill.teacher_logits
    monkeypatch.setattr(distill, "teacher_logits", lambda t, texts, **kw: calls.append(list(texts)) or real(t, texts, **kw))
    own = logits(load_trained(teacher)[0], DEV_TEXTS)
    first, hits = cached_teacher_logits(teacher, DEV_TEXTS[:30], batch_size=5)
    assert hits == 0 and calls == [DEV_TEXTS[:30]] and torch.allclose(first, own[:30], atol=1e-5)
    # another order, a subset of the cached rows and new ones: only the new rows go through the teacher
    texts = DEV_TEXTS[40:] + DEV_TEXTS[:30][::-1]
    again, hits = cached_teacher_logits(teacher, texts, batch_size=5)
    assert hits == 30 and calls[1] == DEV_TEXTS[40:]
    assert torch.allclose(again, torch.cat([own[40:], own[:30].flip(0)]), atol=1e-5)
    calls.clear()
    third, hits = cached_teacher_logits(teacher, texts, batch_size=5)  # every row known: the teacher is not even loaded
    assert hits == len(texts) and calls == [] and torch.equal(third, again)
    _, hits = cached_teacher_logits(teacher, texts, cache=False)  # cache off: every row through the teacher
    assert hits == 0 and calls == [texts]
    # a damaged file is made again, with a warning
    path = soft_target_file(teacher, None)
    path.write_bytes(b"not a safetensors file")
    calls.clear()
    fresh, hits = cached_teacher_logits(teacher, DEV_TEXTS[:4])
    assert hits == 0 and calls == [DEV_TEXTS[:4]] and "does not read" in caplog.text
    assert cached_teacher_logits(teacher, DEV_TEXTS[:4])[1] == 4 and torch.allclose(fresh, own[:4], atol=1e-5)


def test_an_unwritable_cache_warns_and_distils_all_the_same(teacher, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("PEFTLAB_CACHE", str(blocker))  # the cache folder cannot be made under a file
    out, hits = cached_teacher_logits(teacher, DEV_TEXTS[:6])
    assert hits == 0 and out.shape == (6, 2) and "soft-target cache not written" in caplog.text


def test_a_retrained_teacher_is_another_cache_file(teacher, tmp_path):
    import shutil

    copy = tmp_path / "teacher-copy"
    shutil.copytree(teacher, copy)
    assert soft_target_file(copy, None) == soft_target_file(teacher, None)  # the same run.json: the same weights
    record = json.loads((copy / "run.json").read_text())
    record["train_wall_s"] = record.get("train_wall_s", 0) + 1  # any change to the record (a new run writes a new one)
    (copy / "run.json").write_text(json.dumps(record))
    assert soft_target_file(copy, None) != soft_target_file(teacher, None)


def test_a_verbalizer_teacher_teaches_through_its_label_words(tmp_path, tiny_llama, tiny_bert, sentiment_files):
    """An LLM that classifies by writing the label word: each class's word log-likelihood is its class logit."""
    from peftlab.tasks.verbalizer import label_token_ids, prompt_ids, score_words

    run(recipe_for(tmp_path, tiny_llama, sentiment_files, "verb", {"task.type": "verbalizer", "train.max_steps": 4,
                                                                    "train.lr": 1e-2}))
    texts = DEV_TEXTS[:12]
    batched = teacher_logits(tmp_path / "verb", texts, batch_size=5)  # left-padded batches, longest first, put back in order
    model, tok, recipe, record = load_trained(tmp_path / "verb")
    words = label_token_ids(tok, recipe, record.label_names)
    alone = torch.cat([score_words(model, prompt_ids(tok, recipe, [t])[0], words, tok.pad_token_id) for t in texts])
    assert torch.allclose(batched, alone, atol=1e-4)
    student_run = run(student(tmp_path, tiny_bert, sentiment_files, "from-verb", {**distilled(tmp_path / "verb"), "train.max_steps": 2}))
    assert student_run["distillation"]["task"] == "verbalizer" and student_run["distillation"]["soft_target_rows"] == 256


def test_alpha_one_is_exactly_label_only_training(tmp_path, tiny_bert, sentiment_files, teacher, caplog):
    plain = run(student(tmp_path, tiny_bert, sentiment_files, "plain"))
    with caplog.at_level("WARNING", logger="peftlab"):
        same = run(student(tmp_path, tiny_bert, sentiment_files, "alpha1", distilled(teacher, alpha=1.0)))
    assert "train.distill.alpha=1 weighs the teacher's soft targets 0" in caplog.text  # (the teacher's pass is wasted)
    assert losses(tmp_path / "alpha1") == losses(tmp_path / "plain")  # the same numbers, bit for bit
    assert same["metrics"]["eval"] == plain["metrics"]["eval"]
    assert torch.equal(logits(load_trained(tmp_path / "alpha1")[0]), logits(load_trained(tmp_path / "plain")[0]))


def test_a_distilled_student_ends_closer_to_its_teacher(tmp_path, tiny_bert, sentiment_files, teacher):
    # trained until both converge (the random tiny BERT sits on a plateau for ~60 steps): the same student, same seed
    converge = {"adapter.method": "full", "train.epochs": 6, "train.lr": 3e-3, "train.scheduler": "constant"}
    run(student(tmp_path, tiny_bert, sentiment_files, "labels-only", converge))
    record = run(student(tmp_path, tiny_bert, sentiment_files, "distilled", {**converge, **distilled(teacher, alpha=0.2)}))
    before, after = kl_to_teacher(teacher, tmp_path / "labels-only"), kl_to_teacher(teacher, tmp_path / "distilled")
    assert after < 0.1 * before, (before, after)  # held-out rows: the student's distribution is the teacher's (measured 0.028 -> 6e-5)
    assert record["metrics"]["eval"]["accuracy"] >= 0.95


def test_unlabelled_rows_are_distilled_too(tmp_path, tiny_bert, sentiment_files, teacher):
    extra = tmp_path / "unlabelled.jsonl"  # another format than train (json strings vs csv large_string): cast to one
    extra.write_text("".join(json.dumps({"sentence": t}) + "\n" for t, _ in synthetic_rows(96, 11)))
    over = distilled(teacher, alpha=0.5, **{"train.distill.unlabelled": str(extra)})
    with_extra = run(student(tmp_path, tiny_bert, sentiment_files, "with-unlabelled", over))
    without = run(student(tmp_path, tiny_bert, sentiment_files, "labelled-only", distilled(teacher, alpha=0.5)))
    d = with_extra["distillation"]
    assert (d["labelled_rows"], d["unlabelled_rows"], d["soft_target_rows"]) == (256, 96, 352)
    assert with_extra["train_examples"] == 352 and without["train_examples"] == 256  # one epoch: every row trained on
    assert (d["soft_targets_from_cache"], without["distillation"]["soft_targets_from_cache"]) == (0, 256)  # the second: no teacher pass
    assert not torch.equal(logits(load_trained(tmp_path / "with-unlabelled")[0]), logits(load_trained(tmp_path / "labelled-only")[0]))


# ------------------------------------------------------------------------------------------- smaller students

@pytest.fixture(scope="module")
def bert4(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("bert4")
    tok = minilm_tokenizer()
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_kept_layers_are_evenly_spaced_first_and_last():
    assert kept_layer_indices(12, 6) == [0, 2, 4, 7, 9, 11]  # DistilBERT's choice
    assert kept_layer_indices(6, 3) == [0, 3, 5]
    assert kept_layer_indices(4, 1) == [0] and kept_layer_indices(4, 4) == [0, 1, 2, 3]


def test_num_layers_keeps_those_layers_of_the_base(bert4):
    from transformers import AutoModelForSequenceClassification

    full = AutoModelForSequenceClassification.from_pretrained(bert4, num_labels=2)
    small = AutoModelForSequenceClassification.from_pretrained(bert4, num_labels=2)
    assert keep_layers(small, 2) == [0, 3]
    assert len(small.bert.encoder.layer) == 2 and small.config.num_hidden_layers == 2
    for new, old in enumerate([0, 3]):
        assert torch.equal(small.bert.encoder.layer[new].output.dense.weight, full.bert.encoder.layer[old].output.dense.weight)


def test_num_layers_on_a_decoder_renumbers_its_cache(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    keep_layers(model, 1)
    assert len(model.model.layers) == 1 and model.model.layers[0].self_attn.layer_idx == 0
    out = model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True)
    assert out.logits.shape[:2] == (1, 3)


def test_a_smaller_student_reloads_and_merges_with_its_layers(tmp_path, bert4, sentiment_files, teacher):
    from transformers import AutoModelForSequenceClassification

    from peftlab import evaluate

    record = run(recipe_for(tmp_path, bert4, sentiment_files, "small", {"model.num_layers": 2, **distilled(teacher)}))
    model, _, recipe, _ = load_trained(tmp_path / "small")
    assert recipe.model.num_layers == 2 and len(model.base_model.model.bert.encoder.layer) == 2
    assert evaluate(tmp_path / "small") == pytest.approx(record["metrics"]["eval"], abs=1e-6)  # the reloaded run scores the same
    merged = AutoModelForSequenceClassification.from_pretrained(merge(tmp_path / "small"))
    assert merged.config.num_hidden_layers == 2
    assert torch.allclose(logits(merged), logits(model), atol=1e-5)
    from peftlab.publish.card import card_text  # the card's snippet keeps the same layers of the base (it loaded all 4)

    card = card_text(tmp_path / "small")
    summary = next(x for x in card.splitlines() if " on top of " in x)  # (it said on top of the whole base)
    assert "(keeping 2 of its transformer layers, evenly spaced" in summary
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    snippet = re.sub(r"repo = .*", f"repo = {str(tmp_path / 'small')!r}", snippet)
    namespace = {}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(re.sub(r"base_model = .*", f"base_model = {str(bert4)!r}", snippet), namespace)
    assert "keep_layers(base, 2)" in snippet
    torch.testing.assert_close(logits(namespace["model"]), logits(model), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------- bad input, records

def test_bad_input_fails_before_anything_is_written(tmp_path, tiny_bert, sentiment_files, teacher):
    with pytest.raises(ConfigError) as e:  # recipe-level rules: all of them at once
        student(tmp_path, tiny_bert, sentiment_files, "bad", {"train.distill.alpha": 1.5, "task.type": "summarization",
                                                               "data.target_column": "label"})
    text = str(e.value)
    assert "train.distill.alpha=1.5" in text and "train.distill.teacher is not set" in text and "classification" in text

    cases = {
        "no-teacher": ({**distilled(tmp_path / "nowhere")}, "no finished run there"),
        "labels": ({**distilled(teacher), "data.label_names": "[pos, neg]"}, "['negative', 'positive']"),
        "layers": ({**distilled(teacher), "model.num_layers": 3}, "has 2 layers"),
    }
    pairs, multi = tmp_path / "pairs-teacher", tmp_path / "mt-teacher"  # copies of the teacher, described otherwise
    shutil.copytree(teacher, pairs)
    tree = yaml.safe_load((pairs / "recipe.yaml").read_text())
    tree["data"].update(text_pair=True, text_columns=["sentence", "sentence"])
    (pairs / "recipe.yaml").write_text(yaml.safe_dump(tree))
    shutil.copytree(teacher, multi)
    record = json.loads((multi / "run.json").read_text())
    (multi / "run.json").write_text(json.dumps({**record, "task": "multitask", "multitask": {"tasks": ["senti", "topic"]},
                                                "label_names": {"senti": record["label_names"], "topic": ["a", "b", "c"]}}))
    clm = tmp_path / "clm-teacher"  # a language model: no classes (its empty label names were compared, "Set data.label_names=[]")
    shutil.copytree(teacher, clm)
    (clm / "run.json").write_text(json.dumps({**record, "task": "clm", "label_names": []}))
    cases["pairs"] = ({**distilled(pairs)}, "trained on sentence pairs (data.text_pair=true)")
    cases["clm"] = ({**distilled(clm)}, "is a task.type clm run: a teacher must be one of classification, verbalizer")
    cases["multitask"] = ({**distilled(multi)}, f"is a multi-task run: its models are per task. Distill from one of them, "
                                                f"e.g. train.distill.teacher={multi / 'tasks' / 'senti'}")
    cases["temperature"] = ({**distilled(teacher), "train.distill.temperature": 1e5}, "train.distill.temperature")
    for name, (over, expected) in cases.items():
        recipe = student(tmp_path, tiny_bert, sentiment_files, name, over) if name != "temperature" else None
        if recipe is None:  # a recipe-level rule: refused as the recipe loads
            with pytest.raises(ConfigError, match=expected):
                student(tmp_path, tiny_bert, sentiment_files, name, over)
            continue
        with pytest.raises(ConfigError) as e:
            run(recipe)
        assert expected in str(e.value), str(e.value)
        # a multi-task or clm teacher is that one problem (their label names were also offered as data.label_names)
        assert name not in ("multitask", "clm") or len(e.value.problems) == 1, str(e.value)
        assert not recipe.out.exists() and not list(tmp_path.glob(f".{name}*"))  # no folder, no lock, no staging


def test_label_names_mismatch_names_both_lists(tmp_path, tiny_bert, sentiment_files, teacher):
    recipe = student(tmp_path, tiny_bert, sentiment_files, "mismatch", {**distilled(teacher), "data.label_names": "[pos, neg]"})
    with pytest.raises(ConfigError) as e:
        run(recipe)
    assert "['negative', 'positive']" in str(e.value) and "['pos', 'neg']" in str(e.value)


def test_run_json_and_card_name_the_teacher(tmp_path, tiny_bert, sentiment_files, teacher):
    from peftlab.publish.card import card_text

    recipe = student(tmp_path, tiny_bert, sentiment_files, "named", {**distilled(teacher, alpha=0.3), "data.label_names": None})
    run(recipe)
    saved = json.loads((recipe.out / "run.json").read_text())
    d = saved["distillation"]
    teacher_run = json.loads((teacher / "run.json").read_text())
    assert d["teacher"] == str(teacher.resolve()) and d["name"] == "teacher" and d["method"] == "full"
    assert d["weights_sha256"] == teacher_run["weights_sha256"]  # which teacher, even if it is trained again later
    assert d["metrics"] == teacher_run["metrics"] and d["selected_on"] == teacher_run["selected_on"] and (d["temperature"], d["alpha"]) == (2.0, 0.3)
    assert yaml.safe_load((recipe.out / "recipe.yaml").read_text())["data"]["label_names"] == ["negative", "positive"]  # the teacher's
    card = card_text(recipe.out)
    assert "## Distillation" in card and "Distilled from the peftlab run `teacher`" in card and "T = 2.0" in card
    assert d["teacher_agreement"] >= 0.95 and f"agreed with the labels of {d['teacher_agreement']:.1%} of the labelled" in card
    assert str(teacher.resolve()) not in card
    plain = json.loads((teacher / "run.json").read_text())
    assert "distillation" not in plain  # a run without a teacher keeps its run.json as it was


@pytest.mark.parametrize("task", ["sst2", "emotion"])
def test_distillation_benchmark_splits_every_row_once(tmp_path, monkeypatch, task):
    """benchmarks/distillation.py: the labelled share and the unlabelled rest of a .tsv (header kept on both) or .jsonl
    train file hold every row exactly once, unchanged, in files of the train file's format."""
    import dataclasses

    bench = load_benchmark("distillation")
    rows = [{"sentence" if task == "sst2" else "text": f"row {i}", "label": i % 2} for i in range(100)]
    if task == "sst2":
        train = tmp_path / "train.tsv"
        header, body = ["label\tsentence"], [f"{r['label']}\t{r['sentence']}" for r in rows]
    else:
        train = tmp_path / "train.jsonl"
        header, body = [], [json.dumps(r) for r in rows]
    train.write_text("".join(line + "\n" for line in header + body))
    monkeypatch.setattr(bench, "TASK", dataclasses.replace(bench.TASKS[task], train=train))
    monkeypatch.setattr(bench, "RUNS", tmp_path / "runs")
    labelled, unlabelled = bench.split_train(0.2, None)
    assert labelled.suffix == unlabelled.suffix == train.suffix
    (head_l, body_l), (head_u, body_u) = bench.read_lines(labelled), bench.read_lines(unlabelled)
    assert head_l == head_u == header
    assert (len(body_l), len(body_u)) == (20, 80)
    assert sorted(body_l + body_u) == sorted(body)


def test_distillation_benchmark_reuses_only_label_only_runs_that_are_stored(tmp_path, monkeypatch):
    """--reuse-label-only (another teacher under a --tag): a label-only run stored by the untagged benchmark is read from
    there, never trained again; distilled runs and label-only runs it has not stored are the tag's own."""
    bench = load_benchmark("distillation")
    base, own = tmp_path / "distillation", tmp_path / "distillation-smollm2"
    base.mkdir()
    (base / "labels-100.json").write_text(json.dumps({"name": "labels-100", "run": {"metrics": {"test": {"accuracy": 0.87}}}}))
    (base / "distill-100.json").write_text("{}")
    monkeypatch.setattr(bench, "BASE_OUT", base)
    monkeypatch.setattr(bench, "OUT", own)
    monkeypatch.setattr(bench, "stored_case", lambda name, *a, **k: {"trained": name})
    monkeypatch.setattr(bench, "REUSE_LABEL_ONLY", True)
    assert [bench.store(n) for n in ("labels-100", "lora-labels-100", "distill-100")] == [base, own, own]
    args = type("Args", (), {"fresh": False, "verbose": False})()
    assert bench.case("labels-100", "r.yaml", [], args)["name"] == "labels-100"  # read, not trained
    assert bench.case("distill-100", "r.yaml", [], args) == {"trained": "distill-100"}  # the teacher's run: never reused
    assert bench.case("labels-10-steps", "r.yaml", [], args) == {"trained": "labels-10-steps"}  # not stored there: trained
    monkeypatch.setattr(bench, "REUSE_LABEL_ONLY", False)
    assert bench.store("labels-100") == own


def test_resume_refuses_a_teacher_trained_again_since_the_run_started(tmp_path, tiny_bert, sentiment_files):
    """The recipe names the same teacher folder, so --resume went on with the new teacher's soft targets: steps on one
    teacher, then on another, reported as one run. checkpoints/inputs.json holds the teacher's weights sha256."""
    from peftlab.errors import ArtifactError

    def teach(seed):
        return run(recipe_for(tmp_path, tiny_bert, sentiment_files, "t2", {"adapter.method": "full", "train.max_steps": 2,
                                                                           "train.seed": seed}), overwrite=True)

    teach(1)
    over = {**distilled(tmp_path / "t2"), "train.max_steps": 4, "train.save_every": 2}
    whole = student(tmp_path, tiny_bert, sentiment_files, "whole", over)
    run(whole)
    inputs = json.loads((whole.out / "checkpoints" / "inputs.json").read_text())
    assert inputs["train.distill.teacher"] == json.loads((tmp_path / "t2" / "run.json").read_text())["weights_sha256"]
    for name in ("same", "retrained"):
        part = student(tmp_path, tiny_bert, sentiment_files, name, over)
        shutil.copytree(whole.out / "checkpoints", part.out / "checkpoints", ignore=shutil.ignore_patterns("step-4"))
    assert run(student(tmp_path, tiny_bert, sentiment_files, "same", over), resume=True).steps == 4  # the same teacher: goes on
    teach(2)
    with pytest.raises(ArtifactError, match=r"train.distill.teacher: changed since the run started \(weights trained again"):
        run(student(tmp_path, tiny_bert, sentiment_files, "retrained", over), resume=True)
    assert (tmp_path / "retrained" / "checkpoints" / "step-2").is_dir()  # its checkpoint is kept


def test_a_run_that_fails_before_training_leaves_no_inputs_record(tmp_path, tiny_bert, sentiment_files, teacher, monkeypatch):
    """checkpoints/inputs.json is written before the model loads; a failure there must not leave a folder that then
    reads as a started run (an existing empty folder is not removed, so its contents must go)."""
    import sys

    from peftlab.errors import ModelError

    recipe = student(tmp_path, tiny_bert, sentiment_files, "empty", {**distilled(teacher), "train.max_steps": 1})
    recipe.out.mkdir()

    def broken(*a, **k):
        raise ModelError("no model today")

    with monkeypatch.context() as m:
        m.setattr(sys.modules["peftlab.run"], "build_model", broken)
        with pytest.raises(ModelError):
            run(recipe)
    assert list(recipe.out.iterdir()) == []
    assert run(recipe).steps == 1  # and the next run is a fresh one


def test_a_student_whose_labels_the_teacher_does_not_know_is_told_where_its_label_set_came_from(tmp_path, tiny_bert, teacher):
    """The student set no data.label_names: it took the teacher's, and 'Fix data.label_names' pointed at a field it never set."""
    from peftlab.errors import DataError

    from .conftest import synthetic_rows, write_tsv

    three = write_tsv(tmp_path / "three.tsv", [(t, i % 3) for i, (t, _) in enumerate(synthetic_rows(48, 5))])
    recipe = student(tmp_path, tiny_bert, {"train": three, "dev": three}, "three", {**distilled(teacher), "data.label_names": None})
    with pytest.raises(DataError, match=r"outside the label set \['negative', 'positive'\].*These label names are the teacher's "
                                        r"\(train.distill.teacher=.*teacher\)"):
        run(recipe)
    assert not recipe.out.exists()


def test_unlabelled_rows_without_the_text_column_name_their_own_key(tmp_path, tiny_bert, sentiment_files, teacher):
    """train.distill.unlabelled of one column `review`: the message blamed the delimiter and named data.label_column /
    data.target_column, none of which it reads; its own key, train.distill.unlabelled.text_columns, is the fix."""
    from peftlab.data import column_problems
    from peftlab.errors import DataError

    extra = tmp_path / "reviews.csv"
    extra.write_text("review\ngreat film\ndull film\n")
    recipe = student(tmp_path, tiny_bert, sentiment_files, "reviews", {**distilled(teacher), "train.distill.unlabelled.path": str(extra)})
    fix = "Set train.distill.unlabelled.text_columns=[review]: the column(s) holding the text."
    with pytest.raises(DataError) as e:
        run(recipe)
    for text in (str(e.value), *column_problems(recipe)):  # train and `peftlab validate` alike
        assert text.startswith("train.distill.unlabelled: text column(s) ['sentence'] not found; the data has ['review'].") and fix in text
        assert "delimiter" not in text and "label_column" not in text and "data.text_columns" not in text
    recipe = student(tmp_path, tiny_bert, sentiment_files, "reviews", {**distilled(teacher), "train.distill.unlabelled.path": str(extra),
                                                                        "train.distill.unlabelled.text_columns": "[review]"})
    assert run(recipe)["distillation"]["unlabelled_rows"] == 2


def test_unlabelled_rows_without_text_are_not_said_to_be_skipped(tmp_path, tiny_bert, sentiment_files, teacher, caplog):
    """The corpus warning of mlm/clm ('have no text ...: they are skipped (an empty document adds no tokens)') was also
    given for train.distill.unlabelled, whose empty rows are distilled as they are, never skipped."""
    import logging

    extra = tmp_path / "unlabelled.jsonl"
    extra.write_text("".join(json.dumps({"sentence": t}) + "\n" for t in ("great film", "", "dull film")))
    recipe = student(tmp_path, tiny_bert, sentiment_files, "blank", {**distilled(teacher), "train.distill.unlabelled.path": str(extra)})
    with caplog.at_level(logging.WARNING, logger="peftlab"):
        assert run(recipe)["distillation"]["unlabelled_rows"] == 3
    assert "skipped" not in caplog.text


def test_a_teacher_whose_base_is_gone_is_refused_before_the_run_in_the_teachers_terms(tmp_path, tiny_bert, sentiment_files):
    """An adapter teacher whose base folder was removed: the teacher's pass failed after the run lock with the loader's
    'model.name=...: Fix the path', the student's own key. Now the check names the teacher, its base and its ways out."""
    from peftlab.run import check_data_and_base

    base = tmp_path / "base-copy"
    shutil.copytree(tiny_bert, base)
    run(recipe_for(tmp_path, base, sentiment_files, "lora-teacher", {"train.max_steps": 2}))
    shutil.rmtree(base)
    recipe = student(tmp_path, tiny_bert, sentiment_files, "orphan", {**distilled(tmp_path / "lora-teacher"), "train.max_steps": 1})
    teacher_dir = tmp_path / "lora-teacher"
    for check in (run, check_data_and_base):  # train, and `peftlab validate`
        with pytest.raises(ConfigError) as e:
            check(recipe)
        text = "\n".join(e.value.problems)
        assert text.startswith(f"train.distill.teacher={str(teacher_dir)!r}: this teacher is an adapter whose base cannot be "
                               f"loaded here: the teacher's model.name={str(base)!r}: no such model directory."), text
        assert f"`peftlab merge {teacher_dir} model.name=FOLDER`" in text and f"train.distill.teacher={teacher_dir / 'merged'}" in text
        assert not recipe.out.exists() and not list(tmp_path.glob(".orphan*"))  # no folder, no lock
    merge(teacher_dir, overrides=f"model.name={tiny_bert}")  # merged onto a copy of its base: the message says to use it
    with pytest.raises(ConfigError, match=f"distill from its merged model: train.distill.teacher={re.escape(str(teacher_dir / 'merged'))}"):
        run(recipe)
    merged = student(tmp_path, tiny_bert, sentiment_files, "from-merged", {**distilled(teacher_dir / "merged"), "train.max_steps": 1})
    assert run(merged)["distillation"]["name"] == "lora-teacher"


def test_integer_labels_in_another_order_than_the_teachers_are_warned_about(tmp_path, tiny_bert, sentiment_files, teacher, caplog):
    """A student of 0/1 codes with data.label_names null reads them as positions in the teacher's names: codes in
    another order (here 0 = positive) made every label contradict its soft target, silently (accuracy 0.45). The
    borrowed order is warned about, and the teacher's agreement with the labels is measured, recorded and warned about."""
    from .conftest import synthetic_rows, write_tsv

    flipped = {name: write_tsv(tmp_path / f"{name}.tsv", [(t, 1 - y) for t, y in synthetic_rows(n, seed)])
               for name, n, seed in (("train", 256, 1), ("dev", 64, 2))}
    over = {**distilled(teacher), "data.label_names": None, "train.max_steps": 2}
    with caplog.at_level("WARNING", logger="peftlab"):
        record = run(student(tmp_path, tiny_bert, flipped, "flipped", over))
    d = record["distillation"]
    assert d["teacher_agreement"] < 0.1  # (the same texts: the teacher is right on the rows, the codes are not its order)
    assert ("data.label_names is null, so this student takes its teacher's (train.distill.teacher=" in caplog.text
            and "read as positions in that list: 0 -> 'negative', 1 -> 'positive'" in caplog.text)
    assert (f"its argmax agrees with the labels of only {100 * d['teacher_agreement']:.1f}% of the 256 labelled training rows "
            "(chance: 50.0%): rows labelled 'negative' are mostly its 'positive'" in caplog.text)
    assert "data.train.label_map={0: positive, 1: negative} (the same on data.eval/data.test)" in caplog.text
    caplog.clear()
    mapped = {**over, "data.train.label_map": "{0: positive, 1: negative}", "data.eval.label_map": "{0: positive, 1: negative}"}
    with caplog.at_level("WARNING", logger="peftlab"):  # the fix it names: the codes named, nothing to warn about
        record = run(student(tmp_path, tiny_bert, flipped, "mapped", mapped))
    assert record["distillation"]["teacher_agreement"] > 0.9 and record["distillation"]["soft_targets_from_cache"] == 256
    assert "agrees with the labels of only" not in caplog.text and "integer codes" not in caplog.text
