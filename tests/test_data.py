"""Data: local formats, headerless files, column mapping, label names/maps, subsets, and clear errors."""

from __future__ import annotations

import json
import re

import pytest

from peftlab import load_recipe, load_splits
from peftlab.errors import DataError


def splits_of(tmp_path, train, extra=(), **files):
    overrides = [f"data.train.path={train}", "data.eval=null", *extra]
    return load_splits(load_recipe(None, overrides, validate_files=False))


def test_tsv_with_quotes_csv_jsonl_parquet(tmp_path):
    import pandas as pd

    rows = [{"sentence": 'a "quoted" word', "label": 1}, {"sentence": "it's bad", "label": 0}]
    (tmp_path / "d.tsv").write_text("sentence\tlabel\n" + "".join(f"{r['sentence']}\t{r['label']}\n" for r in rows))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    for ext in ("tsv", "csv", "jsonl", "parquet"):
        splits, names = splits_of(tmp_path, tmp_path / f"d.{ext}", ["data.label_names=[neg,pos]"])
        assert splits["train"]["text"] == [r["sentence"] for r in rows], ext
        assert splits["train"]["label"] == [1, 0] and names == ["neg", "pos"]
        assert splits["eval"] is None


def test_header_reads_the_columns_of_every_format_without_its_rows(tmp_path):
    """`validate` reads a split's columns from its header: what `train` would find after reading every row."""
    import pandas as pd

    from peftlab.config import DataConfig, SplitConfig
    from peftlab.data import column_problems, first_json_records, header, read_split

    rows = [{"sentence": "good", "label": 1}, {"sentence": "bad", "label": 0, "note": "only here"}]
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(rows).to_csv(tmp_path / "d.tsv", index=False, sep="\t")
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))  # a key of the second row only
    (tmp_path / "array.json").write_text(json.dumps(rows))  # a JSON array: read whole, as datasets reads it
    (tmp_path / "noheader.csv").write_text("1,good\n0,bad\n")
    data = DataConfig()
    for name in ("d.csv", "d.tsv", "d.parquet", "d.jsonl", "array.json"):
        spec = SplitConfig(path=str(tmp_path / name))
        assert set(header(spec, data, "data.train")[0]) == set(read_split(spec, data, "data.train").column_names), name
        assert set(header(spec, data, "data.train")[0]) == {"sentence", "label", "note"}, name
    spec = SplitConfig(path=str(tmp_path / "noheader.csv"), column_names=["label", "sentence"])
    assert header(spec, data, "data.train") == (["label", "sentence"], True)
    assert first_json_records(str(tmp_path / "array.json"), prefix=40) == rows[:1]  # what a cut prefix holds whole
    # a JSON-lines key that first appears after the rows header() samples: found by reading every row, as training would
    late = tmp_path / "late.jsonl"
    late.write_text("".join(json.dumps({"sentence": "s", "label": i % 2, **({"title": "t"} if i >= 150 else {})}) + "\n"
                            for i in range(200)))
    assert "title" not in header(SplitConfig(path=str(late)), data, "data.train")[0]
    recipe = load_recipe(None, [f"data.train.path={late}", "data.eval=null"], validate_files=False)
    assert column_problems(recipe) == []
    recipe.data.text_columns = ["sentence", "title"]
    assert column_problems(recipe) == []
    recipe.data.text_columns = ["sentence", "subtitle"]
    assert column_problems(recipe) == ["data.train: column(s) ['subtitle'] not found; the data has ['sentence', 'label', "
                                       "'title']. Set data.text_columns / data.label_column / data.target_column (or per "
                                       "split) to the right names."]
    (tmp_path / "bad.jsonl").write_text('{"sentence": "a", "label": 1}\n{"sentence": "b",, "label": 0}\n')
    with pytest.raises(DataError, match="cannot parse .* as JSON: line 2, column 18"):  # a broken record among the first:
        header(SplitConfig(path=str(tmp_path / "bad.jsonl")), data, "data.train")  # read_split's own message, with its line
    # a trailing comma was pyarrow's "JSON parse error: The document is empty.." with no line; an array's error too
    (tmp_path / "comma.jsonl").write_text('{"sentence": "a", "label": 1}\n{"sentence": "b", "label": 0},\n{"sentence": "c", "label": 1}\n')
    (tmp_path / "array.json").write_text('[{"sentence": "a", "label": 1},\n {"sentence": "b" "label": 0}]\n')
    for name, at in (("comma.jsonl", "line 2, column 30: Extra data"), ("array.json", "line 2, column 19: Expecting ',' delimiter")):
        with pytest.raises(DataError, match=f"cannot parse .*{name}' as JSON: {at}. Fix that line"):
            read_split(SplitConfig(path=str(tmp_path / name)), data, "data.train")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="is empty"):  # a broken file: read_split's own message
        header(SplitConfig(path=str(tmp_path / "empty.csv")), data, "data.train")
    with pytest.raises(DataError, match="cannot tell the format"):
        header(SplitConfig(path=str(tmp_path / "d.txt")), data, "data.train")


def test_headerless_csv_with_several_text_columns_and_label_map(tmp_path):
    (tmp_path / "t.csv").write_text('"3","Stocks up","Markets rally"\n"1","Peace talks","Leaders meet"\n')
    splits, names = splits_of(tmp_path, tmp_path / "t.csv", [
        "data.train.column_names=[class,title,description]", "data.text_columns=[title,description]",
        "data.label_column=class", "data.train.label_map={1: World, 3: Business}",
        "data.label_names=[World,Sports,Business]"])
    assert splits["train"]["text"] == ["Stocks up Markets rally", "Peace talks Leaders meet"]
    assert splits["train"]["label"] == [2, 0]


def test_string_labels_are_inferred_sorted(tmp_path):
    (tmp_path / "s.csv").write_text("text,y\nx,pos\ny,neg\nz,pos\n")
    splits, names = splits_of(tmp_path, tmp_path / "s.csv", ["data.text_columns=[text]", "data.label_column=y"])
    assert names == ["neg", "pos"] and splits["train"]["label"] == [1, 0, 1]


@pytest.mark.parametrize("labels, message", [
    (["0", "1", "negative", "positive"], r"mix class indices \['0', '1'\] with names \['negative', 'positive'\]"),
    (["negative", "positive", "Positive "], r"\['Positive', 'positive'\] differ only in case")])
def test_one_class_spelled_two_ways_is_refused_not_a_bigger_head(tmp_path, labels, message):
    (tmp_path / "s.csv").write_text("text,y\n" + "".join(f"row {i},{y}\n" for i, y in enumerate(labels)))
    base = ["data.text_columns=[text]", "data.label_column=y"]
    with pytest.raises(DataError, match=message) as e:
        splits_of(tmp_path, tmp_path / "s.csv", base)
    if "0" in labels:
        _, names = splits_of(tmp_path, tmp_path / "s.csv", [*base, "data.train.label_map={0: negative, 1: positive}"])
        assert names == ["negative", "positive"]
    else:  # the map the message suggests, as written (it suggested {Positive: Positive} for 'Positive ', which changed nothing)
        fix = re.search(r"(data.train.label_map=\{.*?\}) ", str(e.value)).group(1)
        _, names = splits_of(tmp_path, tmp_path / "s.csv", [*base, fix])
        assert names == ["Positive", "negative"]


@pytest.mark.parametrize("labels, names", [([" neg", "pos ", "neg", "pos"], ["neg", "pos"]),
                                           (["True", "true", "False", "Yes", "yes"], ["False", "True", "Yes"])])
def test_spaces_around_a_label_are_no_part_of_it_and_a_case_only_difference_suggests_a_map_that_works(tmp_path, labels, names):
    """' neg' and 'neg' were two classes (a 4-class head for 2), and went past label_map {neg: ..} (encode_labels stripped
    them, label_map did not). A case-only difference suggests a map that, as written, makes the labels one class each:
    quoted where YAML reads the word as something else (true: a boolean)."""
    (tmp_path / "s.csv").write_text("text,y\n" + "".join(f"row {i},{y}\n" for i, y in enumerate(labels)))
    base = ["data.text_columns=[text]", "data.label_column=y"]
    if len(names) == 2:
        assert splits_of(tmp_path, tmp_path / "s.csv", base)[1] == names
        splits, got = splits_of(tmp_path, tmp_path / "s.csv", [*base, "data.train.label_map={neg: 0, pos: 1}", "data.label_names=[n,p]"])
        assert got == ["n", "p"] and splits["train"]["label"] == [0, 1, 0, 1]
        return
    with pytest.raises(DataError, match="differ only in case") as e:
        splits_of(tmp_path, tmp_path / "s.csv", base)
    fix = re.search(r"(data.train.label_map=\{.*?\}) ", str(e.value)).group(1)
    assert splits_of(tmp_path, tmp_path / "s.csv", [*base, fix])[1] == names


@pytest.mark.parametrize("ext, row", [("csv", "{i},{y}\n"), ("jsonl", '{{"text": "{i}", "y": {y}}}\n'),
                                      ("jsonl", '{{"text": "{i}", "y": "{y}"}}\n')])
def test_labels_spelled_as_integers_are_names_when_the_label_names_are_integers(tmp_path, ext, row):
    """Star ratings 1..5 with data.label_names=[1..5]: the value 1 is the class "1", in every file format (it was read
    as the class index 1, the class "2": every class shifted by one, silently); a 0 is refused, not read as an index."""
    path = tmp_path / f"stars.{ext}"
    path.write_text(("text,y\n" if ext == "csv" else "") + "".join(row.format(i=i, y=y) for i, y in enumerate([1, 2, 3, 4, 1])))
    base = ["data.text_columns=[text]", "data.label_column=y", "data.label_names=['1','2','3','4','5']"]
    splits, names = splits_of(tmp_path, path, base)
    assert [names[i] for i in splits["train"]["label"]] == ["1", "2", "3", "4", "1"]
    path.write_text(path.read_text().replace(row.format(i=4, y=1), row.format(i=4, y=0)))
    with pytest.raises(DataError, match=r"labels outside the label set .*\['0'\].*read as names here, not as class indices"):
        splits_of(tmp_path, path, base)
    splits, names = splits_of(tmp_path, path, ["data.text_columns=[text]", "data.label_column=y",  # word names: indices
                                               "data.label_names=[a,b,c,d,e]"])
    assert [names[i] for i in splits["train"]["label"]] == ["b", "c", "d", "e", "a"]


def test_an_unseen_eval_label_names_where_the_labels_come_from(tmp_path):
    """An eval label 7 with the labels inferred from train (0, 1) was explained as 'data.label_names spells [0, 1] as
    integers. Fix data.label_names' (unset); under `peftlab eval` the run's labels are fixed, so that fix was refused."""
    from peftlab.run import load_splits_for

    (tmp_path / "train.tsv").write_text("sentence\tlabel\na\t0\nb\t1\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nc\t1\nd\t7\n")
    recipe = load_recipe(None, [f"data.train.path={tmp_path / 'train.tsv'}", f"data.eval.path={tmp_path / 'dev.tsv'}"],
                         validate_files=False)
    with pytest.raises(DataError, match=r"^data.eval: 1 row\(s\) have labels that data.train does not have: \['7'\] \(its labels: "
                                        r"\['0', '1'\]\). Correct those rows.*data.eval.label_map.*data.label_names") as e:
        load_splits(recipe)
    assert "spells" not in str(e.value)
    with pytest.raises(DataError, match=r"^data.eval: 1 row\(s\) have labels the run was not trained on: \['7'\] \(its labels: "
                                        r"\['0', '1'\]\)\. An evaluation .*correct those rows in the file.*data.eval.label_map\.$") as e:
        load_splits_for(recipe, "eval", ["0", "1"])
    assert "Fix data.label_names" not in str(e.value)


def test_one_and_one_point_zero_are_one_class(tmp_path):
    (tmp_path / "f.jsonl").write_text('{"text": "a", "y": "1"}\n{"text": "b", "y": "1.0"}\n{"text": "c", "y": "0"}\n')
    splits, names = splits_of(tmp_path, tmp_path / "f.jsonl", ["data.text_columns=[text]", "data.label_column=y"])
    assert names == ["0", "1"] and splits["train"]["label"] == [1, 1, 0]


def test_max_samples_is_a_seeded_subset_and_holdout_splits_train(tmp_path):
    (tmp_path / "big.tsv").write_text("sentence\tlabel\n" + "".join(f"s{i}\t{i % 2}\n" for i in range(100)))
    a, _ = splits_of(tmp_path, tmp_path / "big.tsv", ["data.train.max_samples=10"])
    b, _ = splits_of(tmp_path, tmp_path / "big.tsv", ["data.train.max_samples=10"])
    assert len(a["train"]) == 10 and a["train"]["text"] == b["train"]["text"]
    h, _ = splits_of(tmp_path, tmp_path / "big.tsv", ["data.eval_holdout=0.2"])
    assert (len(h["train"]), len(h["eval"])) == (80, 20)
    assert not set(h["train"]["text"]) & set(h["eval"]["text"])


def test_a_holdout_that_leaves_no_training_rows_is_refused_and_a_tiny_one_warned(tmp_path, caplog):
    (tmp_path / "small.tsv").write_text("sentence\tlabel\n" + "".join(f"s{i}\t{i % 2}\n" for i in range(30)))
    with pytest.raises(DataError, match=r"data.eval_holdout=0.99 holds out 30 of the 30 training row\(s\), leaving none"):
        splits_of(tmp_path, tmp_path / "small.tsv", ["data.eval_holdout=0.99"])
    (tmp_path / "one.tsv").write_text("sentence\tlabel\ns0\t0\n")  # no fraction splits it: 0.1 was suggested, and failed
    with pytest.raises(DataError, match=r"data.eval_holdout=0.05: the training split has 1 row\(s\), which no held-out fraction can split"):
        splits_of(tmp_path, tmp_path / "one.tsv", ["data.eval_holdout=0.05", "data.label_names=[a,b]"])
    with caplog.at_level("WARNING", logger="peftlab.data"):
        h, _ = splits_of(tmp_path, tmp_path / "small.tsv", ["data.eval_holdout=0.01"])
    assert len(h["eval"]) == 1 and "holds out only 1 of 30 rows" in caplog.text


def test_data_seed_fixes_the_rows_while_train_seed_varies(tmp_path):
    """data.seed picks the subsets and the held-out split; null follows train.seed (the rows then change with it)."""
    (tmp_path / "big.tsv").write_text("sentence\tlabel\n" + "".join(f"s{i}\t{i % 2}\n" for i in range(100)))

    def rows(*extra):
        s, _ = splits_of(tmp_path, tmp_path / "big.tsv", ["data.train.max_samples=40", "data.eval_holdout=0.25", *extra])
        return s["train"]["text"], s["eval"]["text"]

    assert rows("train.seed=1") != rows("train.seed=2")  # the default: the rows follow the training seed
    assert rows("train.seed=1", "data.seed=7") == rows("train.seed=2", "data.seed=7") == rows("train.seed=7")
    assert rows("data.seed=7") != rows("data.seed=8")


@pytest.mark.parametrize("content, overrides, needle", [
    ("sentence\tlabel\nok\t7\n", ["data.label_names=[neg,pos]"], "labels outside the label set"),
    ("text\tlabel\nok\t1\n", [], "column(s) ['sentence'] not found; the data has ['text', 'label']"),
    ("sentence,label\nok,1\n", [], "Only one column was found: is the delimiter right"),
    ("", [], "is empty"),
    ("sentence\tlabel\n", [], "has no rows"),
])
def test_bad_data_gets_a_clear_error(tmp_path, content, overrides, needle):
    (tmp_path / "bad.tsv").write_text(content)
    with pytest.raises(DataError) as e:
        splits_of(tmp_path, tmp_path / "bad.tsv", overrides)
    assert needle in str(e.value)


def test_a_json_file_with_one_key_is_not_told_about_delimiters(tmp_path):
    (tmp_path / "one.jsonl").write_text('{"text": "ok", "label": 1}\n'.replace(', "label": 1', ""))
    with pytest.raises(DataError) as e:
        splits_of(tmp_path, tmp_path / "one.jsonl")
    assert "column(s) ['sentence', 'label'] not found; the data has ['text']" in str(e.value)
    assert "delimiter" not in str(e.value) and "header row" not in str(e.value)


def test_non_utf8_and_missing_file(tmp_path):
    (tmp_path / "latin.tsv").write_bytes("sentence\tlabel\ncaf\xe9\t1\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8|cannot parse"):
        splits_of(tmp_path, tmp_path / "latin.tsv")
    with pytest.raises(FileNotFoundError, match="not found"):
        splits_of(tmp_path, tmp_path / "missing.tsv")


def test_length_grouped_sampler_is_a_seeded_permutation_with_little_padding():
    import random

    from peftlab.data import LengthGroupedSampler

    rng = random.Random(0)
    lengths = [rng.choice([4, 8, 16, 64]) + rng.randrange(4) for _ in range(1000)]
    s = LengthGroupedSampler(lengths, batch_size=8, seed=1, mega=10)
    first = list(s)
    assert sorted(first) == list(range(1000)), "every row exactly once per epoch"
    assert list(s) == first, "same seed and epoch, same order"
    s.set_epoch(1)
    assert sorted(list(s)) == list(range(1000)) and list(s) != first, "a new order each epoch"
    assert max(lengths[i] for i in first[:8]) == max(lengths[i] for i in first[:80]), "each megabatch opens with its longest batch"

    def padded(order):
        return sum(max(lengths[i] for i in order[k:k + 8]) * len(order[k:k + 8]) for k in range(0, len(order), 8))

    plain = list(range(1000))
    rng.shuffle(plain)
    assert padded(first) < 0.5 * padded(plain), (padded(first), padded(plain), sum(lengths))


def test_classification_batches_pad_to_their_longest_row_only():
    """No padding beyond the longest row (a multiple of 8 made length-grouped SST-2 batches 1.30x their real tokens
    instead of 1.05x), and a batch of equal-length rows carries no padding at all (attention then needs no mask)."""
    from transformers import AutoTokenizer

    from peftlab.bases import resolve_model_path
    from peftlab.tasks.classification import collator

    tok = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    rows = [dict(tok(text), label=0, length=0, truncated=False) for text in ("a fine film", "a dull one", "it is a very long one indeed")]
    collate = collator(tok)
    batch = collate(rows)
    longest = max(len(r["input_ids"]) for r in rows)
    assert batch["input_ids"].shape == (3, longest) and longest % 8 != 0
    assert bool(collate(rows[:2])["attention_mask"].all())


def test_label_map_keys_that_never_occur_and_rows_without_text_are_warned_about(tmp_path, caplog):
    (tmp_path / "t.csv").write_text("text,y\ngood,pos\n,neg\nbad,neg\n")
    with caplog.at_level("WARNING", logger="peftlab.data"):
        splits, names = splits_of(tmp_path, tmp_path / "t.csv", ["data.text_columns=[text]", "data.label_column=y",
                                                                  "data.train.label_map={pos: positive, Neg: negative}"])
    assert "data.train.label_map: key(s) 'Neg' not found in column 'y' (its values: neg, pos)" in caplog.text
    assert "data.train: 1 row(s) have no text in text" in caplog.text and len(splits["train"]) == 3


def test_codes_mapped_on_train_but_read_as_indices_on_test_are_warned_about(tmp_path, caplog):
    """train maps the raw codes 0/1 to pos/neg (swapped against the names' order); test holds the same codes with no map
    and reads them as class indices: every test label inverted, silently, until this warning. Mapped the same on both
    splits, or named on test only (as the AG News recipe does), it says nothing."""
    (tmp_path / "tr.csv").write_text("text,y\n" + "a,0\nb,1\n" * 4)
    (tmp_path / "te.csv").write_text("text,y\nc,0\nd,1\n")
    base = [f"data.train.path={tmp_path / 'tr.csv'}", f"data.test.path={tmp_path / 'te.csv'}", "data.eval=null",
            "data.text_columns=[text]", "data.label_column=y", "data.label_names=[neg, pos]"]
    with caplog.at_level("WARNING", logger="peftlab.data"):
        splits, _ = load_splits(load_recipe(None, [*base, "data.train.label_map={0: pos, 1: neg}"], validate_files=False))
    assert splits["test"]["label"] == [0, 1] and splits["train"]["label"][:2] == [1, 0]
    assert ("data.test has no label_map, and its label values ['0', '1'] are all keys of data.train.label_map, which names "
            "them otherwise: 0 is read as 'neg' here, as 'pos' on train. If they are the same codes, give data.test the same "
            "map: data.test.label_map={0: pos, 1: neg}.") in caplog.text
    for quiet in (["data.train.label_map={0: pos, 1: neg}", "data.test.label_map={0: pos, 1: neg}"],
                  ["data.train.label_map={0: neg, 1: pos}"], ["data.test.label_map={0: pos, 1: neg}"]):
        caplog.clear()
        with caplog.at_level("WARNING", logger="peftlab.data"):
            load_splits(load_recipe(None, [*base, *quiet], validate_files=False))
        assert "has no label_map" not in caplog.text, quiet


def test_packing_outside_sft_is_refused_not_ignored():
    from peftlab.errors import ConfigError

    with pytest.raises(ConfigError, match="data.packing=true with task.type=classification: only sft packs its rows"):
        load_recipe(None, ["data.train.path=x.tsv", "data.packing=true"], validate_files=False)


def test_macro_f1_scores_the_classes_that_occur_as_sklearn_does():
    """An evaluation split without one class is not marked down for it (it was: 8 right answers scored F1 0.5); a class
    that is predicted but absent, or present but never predicted, still counts 0."""
    from peftlab.metrics import classification_metrics

    m, report = classification_metrics([1] * 8, [1] * 8, ["negative", "positive"])
    assert m == {"accuracy": 1.0, "f1": 1.0} and report["per_class"]["negative"]["support"] == 0
    m, _ = classification_metrics([1, 1, 0, 0], [1, 1, 1, 1], ["negative", "positive", "neutral"])  # neutral: absent
    assert m["f1"] == pytest.approx((0 + 2 * 0.5 * 1 / 1.5) / 2)  # sklearn f1_score(average="macro", zero_division=0)


def test_named_classes_without_a_training_row_are_warned_about(tmp_path, caplog):
    (tmp_path / "one.csv").write_text("text,y\na,pos\nb,pos\n")
    with caplog.at_level("WARNING", logger="peftlab"):
        splits_of(tmp_path, tmp_path / "one.csv", ["data.text_columns=[text]", "data.label_column=y", "data.label_names=[neg,pos]"])
    assert "data.train has no row of class(es) ['neg'] (of data.label_names ['neg', 'pos'])" in caplog.text


@pytest.mark.parametrize("labels, extra, expected", [
    (['"1"', '"0"', '"1.0"'], ["data.label_names=[positive,negative]", "data.train.label_map={1: positive, 0: negative}"],
     ["positive", "negative", "positive"]),  # "1.0" went past label_map and was read as the class index 1
    (["1", "2", "2.0"], ["data.label_names=['1.0','2.0']"], ["1.0", "2.0", "2.0"]),  # names spelled as floats
    (['"01"', '"1"', '"01"'], [], ["01", "1", "01"]),  # a leading zero is a code of its own, not the number 1
    (["true", "false", "true"], [], ["True", "False", "True"]),  # JSON booleans: inferred names that encode
])
def test_label_spellings_map_to_one_class_each(tmp_path, labels, extra, expected):
    (tmp_path / "l.jsonl").write_text("".join(f'{{"text": "r{i}", "y": {y}}}\n' for i, y in enumerate(labels)))
    splits, names = splits_of(tmp_path, tmp_path / "l.jsonl", ["data.text_columns=[text]", "data.label_column=y", *extra])
    assert [names[i] for i in splits["train"]["label"]] == expected


def test_two_spellings_of_one_label_are_one_class_and_refused_as_such(tmp_path):
    (tmp_path / "one.jsonl").write_text('{"text": "a", "y": "1"}\n{"text": "b", "y": "1.0"}\n')
    with pytest.raises(DataError, match="every row has the label '1'. A classifier needs >= 2 classes"):
        splits_of(tmp_path, tmp_path / "one.jsonl", ["data.text_columns=[text]", "data.label_column=y"])


def test_a_file_is_read_as_named_and_as_it_is_now(tmp_path):
    """datasets read data_files as a glob: 'reviews[a].csv' read the file 'reviewsa.csv' beside it. And it keyed its
    cache by path, size and mtime: a file rewritten with the same size and mtime (cp -p, a 0/1 flip) was served as it was."""
    import os

    (tmp_path / "reviews[a].csv").write_text("sentence,label\nthe real one,1\nthe real two,0\n")
    (tmp_path / "reviewsa.csv").write_text("sentence,label\nANOTHER FILE,1\n")
    assert splits_of(tmp_path, tmp_path / "reviews[a].csv")[0]["train"]["text"] == ["the real one", "the real two"]
    edited = tmp_path / "edit.csv"
    for rows in ("cccc,1\ndddd,0\n", "eeee,1\nffff,0\n"):
        edited.write_text("sentence,label\n" + rows)
        os.utime(edited, (1577836800, 1577836800))  # the same size and mtime both times
        assert splits_of(tmp_path, edited)[0]["train"]["text"] == [line.split(",")[0] for line in rows.splitlines()]


def test_a_header_row_named_again_by_column_names_and_a_column_named_twice_are_refused(tmp_path):
    """column_names on a file with a header made the header a data row (a class 'label' in a 3-class head); a header
    naming 'sentence' twice was read by its first column without a word. validate and train refuse both alike."""
    from peftlab.data import column_problems

    (tmp_path / "h.csv").write_text("sentence,label\ngood film,pos\nbad film,neg\n")
    (tmp_path / "d.csv").write_text("sentence,label,sentence\ngood film,pos,x\nbad film,neg,y\n")
    for path, extra, message in ((tmp_path / "h.csv", ["data.train.column_names=[sentence,label]"], "first line is a header"),
                                 (tmp_path / "d.csv", [], r"the header names \['sentence'\] more than once")):
        with pytest.raises(DataError, match=message):
            splits_of(tmp_path, path, extra)
        recipe = load_recipe(None, [f"data.train.path={path}", "data.eval=null", *extra], validate_files=False)
        assert any(message.replace("\\", "")[:20] in p for p in column_problems(recipe)), column_problems(recipe)


def test_a_label_value_the_label_map_does_not_name_is_refused(tmp_path):
    """Values missing from the map passed through as they were: names and integers mixed (a pyarrow traceback), or a
    raw 0 read as class index 0 beside a 1 mapped to the same class."""
    (tmp_path / "t.csv").write_text("sentence,label\na,0\nb,1\nc,2\n")
    with pytest.raises(DataError, match=r"label value\(s\) \['0'\] of column 'label' are not keys of data.train.label_map"):
        splits_of(tmp_path, tmp_path / "t.csv", ["data.train.label_map={1: World, 2: Sports}"])


def test_a_label_cell_holding_a_list_or_a_mapping_is_refused_naming_the_column(tmp_path):
    """A label cell that is a JSON list or mapping (or a column-oriented JSON file, read as one row of lists) crashed
    the data load with `TypeError: unhashable type: 'list'` (set() of the labels), while validate said ok."""
    (tmp_path / "l.jsonl").write_text('{"sentence": "good", "label": ["pos"]}\n{"sentence": "bad", "label": ["neg"]}\n')
    (tmp_path / "m.jsonl").write_text('{"sentence": "good", "label": {"name": "pos"}}\n{"sentence": "bad", "label": {"name": "neg"}}\n')
    (tmp_path / "columns.json").write_text('{"sentence": ["good", "bad"], "label": ["pos", "neg"]}')
    for name in ("l.jsonl", "m.jsonl", "columns.json"):
        with pytest.raises(DataError, match=r"data.train: the label column 'label' holds .* values, not one label per row") as e:
            splits_of(tmp_path, tmp_path / name)
        assert ("column-oriented" in str(e.value)) == (name == "columns.json"), str(e.value)


def test_json_labels_mixing_numbers_and_strings_are_read_as_a_csv_column_would_be(tmp_path):
    """One row's label "1" among integers made `datasets` read the column as Json: refused as 'holds Json(decode=True)
    values, not one label per row'. 1 and "1" are one class (as in a csv file); 0 beside "positive" is refused as mixed
    spellings; a list among them is refused naming its row."""
    def write(name, labels):
        (tmp_path / name).write_text("".join(json.dumps({"sentence": f"s{i}", "label": y}) + "\n" for i, y in enumerate(labels)))
        return tmp_path / name

    digits = write("d.jsonl", [0, 1, 0, "1", 1])
    s, names = splits_of(tmp_path, digits)
    assert names == ["0", "1"] and s["train"]["label"] == [0, 1, 0, 1, 1]
    s, names = splits_of(tmp_path, digits, ["data.label_names=[negative,positive]"])
    assert s["train"]["label"] == [0, 1, 0, 1, 1]
    with pytest.raises(DataError, match=r"the labels mix class indices \['0'\] with names \['positive'\]"):
        splits_of(tmp_path, write("w.jsonl", [0, "positive", 0]))
    with pytest.raises(DataError, match=r"label column 'label' holds \['pos'\] in data row 2 \(0-based.*not one label"):
        splits_of(tmp_path, write("l.jsonl", ["neg", "pos", ["pos"]]))


def test_a_text_cell_holding_a_list_or_a_record_is_refused_naming_its_row(tmp_path):
    """A JSON row's "sentence": ["..."] became the text "['...']" (str of the list), silently."""
    for cell in (["a", "list"], {"a": "record"}):
        rows = [{"sentence": "good", "label": 1}, {"sentence": "bad", "label": 0}, {"sentence": cell, "label": 1}]
        (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(DataError, match=r"text column 'sentence' holds .* in data row 2 \(0-based.*not a text"):
            splits_of(tmp_path, tmp_path / "t.jsonl")


def test_holdout_labels_are_named_from_the_whole_train_file_whatever_the_seed(tmp_path):
    """With data.eval_holdout, the labels were inferred from the part of train kept after the split: a rare class held
    out was an error blaming data.eval (a split the recipe never set), and the classes depended on the seed. A label
    outside data.label_names is data.train's, wherever the split puts its row."""
    rows = [f"s{i},{'ab'[i % 2]}\n" for i in range(20)] + ["rare one,c\n"]
    (tmp_path / "t.csv").write_text("sentence,label\n" + "".join(rows))
    held_out = 0
    for seed in range(8):
        s, names = splits_of(tmp_path, tmp_path / "t.csv", ["data.eval_holdout=0.5", f"data.seed={seed}"])
        assert names == ["a", "b", "c"], seed
        held_out += "rare one" in s["eval"]["text"]
        assert sorted([*s["train"]["text"], *s["eval"]["text"]]) == sorted(r.split(",")[0] for r in rows)
    assert 0 < held_out < 8  # (the seeds put the rare row on either side)
    for seed in range(8):
        with pytest.raises(DataError, match=r"^data.train: 1 row\(s\) have labels outside the label set \['a', 'b'\]: \['c'\]"):
            splits_of(tmp_path, tmp_path / "t.csv", ["data.eval_holdout=0.5", f"data.seed={seed}", "data.label_names=[a,b]"])


@pytest.mark.parametrize("first", ["text,label", "Sentence,Label", " sentence , label ", "label,sentence", "review,label", "Text,LABEL"])
def test_a_header_that_differs_from_column_names_is_still_a_header(tmp_path, first):
    """column_names with a header that was not spelled exactly like them (`text,label` read with [sentence, label],
    other case or spaces, another order) read the header as a training row: a class 'label', silently."""
    from peftlab.data import column_problems

    (tmp_path / "h.csv").write_text(f"{first}\ngood film,pos\nbad film,neg\n")
    extra = ["data.train.column_names=[sentence,label]"]
    with pytest.raises(DataError, match="first line is a header"):
        splits_of(tmp_path, tmp_path / "h.csv", extra)
    recipe = load_recipe(None, [f"data.train.path={tmp_path / 'h.csv'}", "data.eval=null", *extra], validate_files=False)
    assert any("first line is a header" in p for p in column_problems(recipe))


@pytest.mark.parametrize("first", ["good film,pos", "label me a classic,neg", "1,0", "sentence-level fun,pos"])
def test_a_headerless_files_first_row_stays_a_row(tmp_path, first):
    """The header check reads a real first row as a row: a cell is a header's only when it is a column's own name."""
    (tmp_path / "n.csv").write_text(f"{first}\nbad film,neg\nok film,pos\n")
    s, _ = splits_of(tmp_path, tmp_path / "n.csv", ["data.train.column_names=[sentence,label]", "data.label_names=['0',neg,pos]"])
    assert s["train"]["text"][0] == first.split(",")[0]


def test_column_names_shorter_than_the_file_says_so_in_validate_and_train(tmp_path):
    """column_names naming fewer columns than the file has: train said the columns were shifted (a phantom pandas
    index) and validate something else or nothing; both now say column_names is too short."""
    from peftlab.data import column_problems

    (tmp_path / "s.csv").write_text("good film,pos,x\nbad film,neg,y\n")
    extra = ["data.train.column_names=[sentence,label]"]
    needle = "data.train.column_names is too short: it names 2 column(s) ['sentence', 'label'], and the file has 3"
    with pytest.raises(DataError) as e:
        splits_of(tmp_path, tmp_path / "s.csv", extra)
    assert needle in str(e.value)
    recipe = load_recipe(None, [f"data.train.path={tmp_path / 's.csv'}", "data.eval=null", *extra], validate_files=False)
    assert [needle in p for p in column_problems(recipe)] == [True]


def test_column_names_longer_than_the_file_says_so_in_validate_and_train(tmp_path):
    """column_names naming more columns than the file has: validate said ok, and train that the text column (one the
    file does not have, read empty) is empty in all rows; both now say column_names is too long."""
    from peftlab.data import column_problems

    (tmp_path / "two.csv").write_text("x,1\ny,0\nz,1\nw,0\n")
    extra = ["data.train.column_names=[label,title,text]", "data.text_columns=[text]"]
    needle = "data.train.column_names is too long: it names 3 column(s) ['label', 'title', 'text'], and the file has 2"
    with pytest.raises(DataError) as e:
        splits_of(tmp_path, tmp_path / "two.csv", extra)
    assert needle in str(e.value) and "empty" not in str(e.value)
    recipe = load_recipe(None, [f"data.train.path={tmp_path / 'two.csv'}", "data.eval=null", *extra], validate_files=False)
    assert [needle in p for p in column_problems(recipe)] == [True]


def test_a_text_or_target_that_is_the_number_0_stays_0(tmp_path):
    """`str(v or "")` made the cell 0 (or 0.0) an empty text: the input of a classification row, and the target of a
    summarization row (dropped as empty)."""
    (tmp_path / "z.csv").write_text("sentence,label\n0,pos\n1,neg\n0,neg\n")
    s, _ = splits_of(tmp_path, tmp_path / "z.csv")
    assert s["train"]["text"] == ["0", "1", "0"]
    (tmp_path / "f.csv").write_text("sentence,label\n0.0,pos\n1.5,neg\n")
    assert splits_of(tmp_path, tmp_path / "f.csv")[0]["train"]["text"] == ["0.0", "1.5"]
    (tmp_path / "sum.jsonl").write_text('{"document": "count the apples", "summary": 0}\n{"document": "two", "summary": 2}\n')
    s, _ = splits_of(tmp_path, tmp_path / "sum.jsonl", ["task.type=summarization", "data.text_columns=[document]",
                                                         "data.target_column=summary"])
    assert s["train"]["target"] == ["0", "2"]


def test_cells_spelled_like_missing_values_are_text(tmp_path):
    """pandas' default missing-value words (NA, N/A, None, null, NaN, nan) made such cells empty: a text 'NA' was no
    text, a class 'None' an empty label. Only an empty cell is missing."""
    (tmp_path / "na.csv").write_text("sentence,label\nNA,None\nnull,pos\nN/A,neg\nnan,None\nNaN,pos\n")
    s, names = splits_of(tmp_path, tmp_path / "na.csv")
    assert s["train"]["text"] == ["NA", "null", "N/A", "nan", "NaN"] and names == ["None", "neg", "pos"]
    (tmp_path / "e.tsv").write_text("sentence\tlabel\nNA\t1\nfine\t\n")
    with pytest.raises(DataError, match=r"1 row\(s\) have an empty 'label' cell: data row 1 \(0-based, as predictions files count; file line 3 of"):
        splits_of(tmp_path, tmp_path / "e.tsv")


def test_integer_label_names_in_a_recipe_are_their_text(tmp_path):
    """data.label_names: [1, 2, 3, 4, 5] (star ratings, as the README shows) was refused: 'expected a list of strings'."""
    (tmp_path / "stars.csv").write_text("sentence,label\n" + "".join(f"r{i},{y}\n" for i, y in enumerate([5, 1, 3, 2, 4, 1])))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data:\n  train: {tmp_path / 'stars.csv'}\n  label_names: [1, 2, 3, 4, 5]\n")
    r = load_recipe(recipe, validate_files=False)
    assert r.data.label_names == ["1", "2", "3", "4", "5"]
    s, names = load_splits(r)
    assert [names[i] for i in s["train"]["label"]] == ["5", "1", "3", "2", "4", "1"]
    from peftlab.config import checked
    from peftlab.errors import ConfigError

    r.data.label_names = ("1", "2", "3", "4", "5")  # a tuple set from Python: a list (it was refused)
    assert checked(r).data.label_names == ["1", "2", "3", "4", "5"]

    with pytest.raises(ConfigError, match=r"label_names: expected a list of strings, got \[0.5, 1.0\]. Quote the values"):
        load_recipe(None, ["data.label_names=[0.5, 1.0]"], validate_files=False)


def test_a_file_that_is_not_utf8_names_its_encoding_once(tmp_path, capfd):
    """A cp1252 CSV or a UTF-16 TSV (Excel) got a generic parse error (datasets wraps the UnicodeDecodeError), and
    datasets' own 'Failed to read file' line beside it."""
    (tmp_path / "win.csv").write_bytes("sentence,label\ncafé,1\nbad,0\n".encode("cp1252"))
    (tmp_path / "excel.tsv").write_bytes("sentence\tlabel\ncafé\t1\nbad\t0\n".encode("utf-16"))
    capfd.readouterr()
    for name, needle in (("win.csv", "is not UTF-8"), ("excel.tsv", "is UTF-16")):
        with pytest.raises(DataError, match=needle) as e:
            splits_of(tmp_path, tmp_path / name)
        assert f"iconv -f {'cp1252' if name == 'win.csv' else 'utf-16'} -t utf-8" in str(e.value)
    assert "Failed to read file" not in capfd.readouterr().err


def test_a_json_lines_file_that_is_not_utf8_is_refused_by_validate_and_train(tmp_path, capsys):
    """pyarrow reads a cp1252 JSON-lines file without a word; the first read of its rows raised a UnicodeDecodeError
    traceback from deep in datasets (exit 1), and `validate` passed it."""
    from peftlab.cli import main

    (tmp_path / "win.jsonl").write_bytes('{"sentence": "café", "label": 1}\n{"sentence": "bad", "label": 0}\n'.encode("cp1252"))
    with pytest.raises(DataError, match=r"data.train.path: '.*win.jsonl' is not UTF-8 .*iconv -f cp1252 -t utf-8"):
        splits_of(tmp_path, tmp_path / "win.jsonl")
    assert main(["validate", "--set", f"data.train.path={tmp_path / 'win.jsonl'}", "data.eval=null"]) == 2
    assert "win.jsonl' is not UTF-8" in capsys.readouterr().out


def test_a_gzipped_json_lines_file_is_read_and_checked_decompressed(tmp_path):
    """data.SPLIT.format=json on x.jsonl.gz (datasets decompresses it) was refused as 'not UTF-8' by the encoding check,
    which read its compressed bytes; a gzipped cp1252 file is still refused."""
    import gzip

    from peftlab.config import DataConfig, SplitConfig
    from peftlab.data import read_split

    good = "".join(json.dumps({"sentence": f"good film {i}", "label": i % 2}) + "\n" for i in range(8))
    (tmp_path / "ok.jsonl.gz").write_bytes(gzip.compress(good.encode()))
    assert len(read_split(SplitConfig(path=str(tmp_path / "ok.jsonl.gz"), format="json"), DataConfig(), "data.train")) == 8
    (tmp_path / "win.jsonl.gz").write_bytes(gzip.compress('{"sentence": "café", "label": 1}\n'.encode("cp1252")))
    with pytest.raises(DataError, match="win.jsonl.gz' is not UTF-8"):
        read_split(SplitConfig(path=str(tmp_path / "win.jsonl.gz"), format="json"), DataConfig(), "data.train")


def test_a_large_json_lines_file_not_utf8_after_its_first_records_is_refused_by_validate(tmp_path, capsys):
    """validate read the keys of a JSON file's first records (its first MiB) and passed a file whose cp1252 bytes came
    later, which train refuses."""
    from peftlab.cli import main

    rows = "".join(json.dumps({"sentence": "word " * 40 + str(i), "label": i % 2}) + "\n" for i in range(6000))
    (tmp_path / "big.jsonl").write_bytes(rows.encode() + '{"sentence": "café", "label": 1}\n'.encode("cp1252"))
    assert main(["validate", "--set", f"data.train.path={tmp_path / 'big.jsonl'}", "data.eval=null"]) == 2
    assert "big.jsonl' is not UTF-8" in capsys.readouterr().out


@pytest.mark.parametrize("text", ["sentence,label\n", "sentence,label\n\n\n"])
def test_a_header_only_csv_is_refused_by_validate_as_by_train(tmp_path, capsys, text):
    """`validate` read the header line alone and passed a file without rows, which `train` refused."""
    from peftlab.cli import main

    (tmp_path / "h.csv").write_text(text)
    with pytest.raises(DataError, match=r"data.train.path: '.*h.csv' has no rows \(a header only\?\)"):
        splits_of(tmp_path, tmp_path / "h.csv")
    assert main(["validate", "--set", f"data.train.path={tmp_path / 'h.csv'}", "data.eval=null"]) == 2
    assert "h.csv' has no rows (a header only?)" in capsys.readouterr().out


def test_a_csv_whose_first_row_holds_a_long_document_passes_validate(tmp_path, capsys):
    """The header-only check read the first row with the csv module, whose cells stop at 128 KiB: a quoted document
    longer than that (which train reads) was a '_csv.Error: field larger than field limit' traceback in validate."""
    from peftlab.cli import main

    (tmp_path / "long.csv").write_text('sentence,label\n"' + "word " * 30000 + '",1\nshort,0\n')
    assert len(splits_of(tmp_path, tmp_path / "long.csv")[0]["train"]) == 2
    assert main(["validate", "--set", f"data.train.path={tmp_path / 'long.csv'}", "data.eval=null"]) == 0


def test_a_headerless_csv_whose_first_row_holds_a_long_document_is_read(tmp_path, capsys):
    """With column_names, the first line is checked not to be a header by the csv module, whose cells stop at 128 KiB:
    a longer document there was a '_csv.Error: field larger than field limit' traceback in train and validate."""
    from peftlab.cli import main

    (tmp_path / "long.csv").write_text('"' + "word " * 30000 + '",1\nshort,0\n')
    names = "data.train.column_names=[sentence,label]"
    assert len(splits_of(tmp_path, tmp_path / "long.csv", [names])[0]["train"]) == 2
    assert main(["validate", "--set", f"data.train.path={tmp_path / 'long.csv'}", names, "data.eval=null"]) == 0


def test_numbers_in_text_columns_are_read_as_written(tmp_path):
    """pandas read a csv text column whose cells are all digits as numbers: '007' became the text '7', '1.50' '1.5'
    (a summary '0042' the target '42'). Every column is text as written; a label column of integers keeps its
    numbers (0 and 0.0 are one class)."""
    (tmp_path / "d.csv").write_text("sentence,label\n007,1\n1.50,0.0\n0012,1\n")
    s, names = splits_of(tmp_path, tmp_path / "d.csv")
    assert s["train"]["text"] == ["007", "1.50", "0012"] and s["train"]["label"] == [1, 0, 1]
    (tmp_path / "h.tsv").write_text("00\t1\n010\t0\n")
    s, _ = splits_of(tmp_path, tmp_path / "h.tsv", ["data.train.column_names=[sentence,label]"])
    assert s["train"]["text"] == ["00", "010"]
    (tmp_path / "sum.csv").write_text("document,summary\nthe total is forty-two,0042\nnine,009\n")
    s, _ = splits_of(tmp_path, tmp_path / "sum.csv", ["task.type=summarization", "data.text_columns=[document]",
                                                      "data.target_column=summary"])
    assert s["train"]["target"] == ["0042", "009"]


@pytest.mark.parametrize("ext", ["csv", "tsv"])
def test_zero_padded_label_codes_in_a_delimited_file_are_classes_as_written(tmp_path, ext):
    """pandas read a csv/tsv label column '01','02' as the integers 1, 2, then taken as class indices: with
    label_names ['01', '02'] a row labelled 01 trained as the class '02' (every class shifted by one, silently); inferred,
    '01','02' were refused as integer labels missing a class 0. A column of integers stays class indices."""
    sep = "," if ext == "csv" else "\t"
    path = tmp_path / f"codes.{ext}"
    path.write_text(f"sentence{sep}label\n" + "".join(f"r{i}{sep}{y}\n" for i, y in enumerate(["01", "02", "01", "00"])))
    splits, names = splits_of(tmp_path, path)
    assert names == ["00", "01", "02"] and [names[i] for i in splits["train"]["label"]] == ["01", "02", "01", "00"]
    splits, names = splits_of(tmp_path, path, ["data.label_names=['00','01','02']"])
    assert [names[i] for i in splits["train"]["label"]] == ["01", "02", "01", "00"]
    path.write_text(f"sentence{sep}label\n" + "".join(f"r{i}{sep}{y}\n" for i, y in enumerate(["1", "0", "1.0", "2"])))
    splits, names = splits_of(tmp_path, path)  # integers (1 and 1.0: one class) are class indices, as before
    assert names == ["0", "1", "2"] and splits["train"]["label"] == [1, 0, 1, 2]
    splits, names = splits_of(tmp_path, path, ["data.label_names=[a,b,c]"])
    assert splits["train"]["label"] == [1, 0, 1, 2]


def test_max_samples_names_the_classes_from_the_whole_train_file(tmp_path, caplog):
    """The label set was inferred from the sample data.train.max_samples drew: the head's size followed the seed, an
    eval label of the train file was refused as absent from it, and integer labels whose sample missed a middle class
    were refused as 'not the class indices'. The README: labels are named from the whole train file."""
    rows = [("common", i % 2 * 2) for i in range(60)] + [("rare", 1)]  # classes 0, 2, and one row of class 1
    (tmp_path / "big.tsv").write_text("sentence\tlabel\n" + "".join(f"{t} {i}\t{y}\n" for i, (t, y) in enumerate(rows)))
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nx\t1\ny\t0\nz\t2\n")
    for seed in range(4):
        with caplog.at_level("WARNING", logger="peftlab.data"):
            s, names = splits_of(tmp_path, tmp_path / "big.tsv", ["data.train.max_samples=5", f"data.seed={seed}",
                                                                  f"data.eval.path={tmp_path / 'dev.tsv'}"])
        assert names == ["0", "1", "2"] and len(s["train"]) == 5 and s["eval"]["label"] == [1, 0, 2]
    assert "has no row of class(es) ['1']" in caplog.text  # the sample misses it: said, the head still has it
    a, _ = splits_of(tmp_path, tmp_path / "big.tsv", ["data.train.max_samples=5", "data.seed=3"])
    b, _ = splits_of(tmp_path, tmp_path / "big.tsv", ["data.train.max_samples=5", "data.seed=3"])
    assert a["train"]["text"] == b["train"]["text"] and a["train"]["row"] == b["train"]["row"]


@pytest.mark.parametrize("ext, cells", [("csv", ["0.5", "1.25", "3.8", "2.0"]), ("csv", ["0.5", "0.0", "1.0", "0.0"]),
                                        ("jsonl", [0.5, 1.25, 3.8, 2])])
def test_real_valued_labels_are_refused_as_a_regression_target(tmp_path, ext, cells):
    """STS-B-like scores 0.5, 1.25, 3.8 trained a classifier with one class per distinct score (sorted as text), or were
    refused as 'mixing class indices with names'. Integer-valued floats (1.0) are classes; a label_map makes classes."""
    path = tmp_path / f"sts.{ext}"
    path.write_text("sentence,label\n" + "".join(f"r{i},{y}\n" for i, y in enumerate(cells)) if ext == "csv" else
                    "".join(json.dumps({"sentence": f"r{i}", "label": y}) + "\n" for i, y in enumerate(cells)))
    with pytest.raises(DataError, match=r"^data.train: the labels .*0.5.* look like a regression target \(real-valued scores\); "
                                        r"a classifier needs classes: map them to classes with data.train.label_map"):
        splits_of(tmp_path, path)
    scores = sorted({str(c) for c in cells})
    mapped = "{" + ", ".join(f"'{c}': {'high' if float(c) >= 1 else 'low'}" for c in scores) + "}"
    _, names = splits_of(tmp_path, path, [f"data.train.label_map={mapped}"])
    assert names == ["high", "low"]
    path.write_text("sentence,label\na,1.0\nb,0.0\nc,1.0\n")
    assert splits_of(tmp_path, path if ext == "csv" else path.rename(tmp_path / "f.csv"))[1] == ["0", "1"]


@pytest.mark.parametrize("columns", ["[sentence1]", "[id, sentence1, sentence2]"])
def test_a_split_own_text_columns_with_text_pair_are_two(tmp_path, columns):
    """data.text_pair's two-column rule was checked on data.text_columns only: a split's own text_columns of one column
    crashed training with a pyarrow ArrowInvalid traceback (validate said ok), three were paired wrongly, silently."""
    from peftlab.errors import ConfigError

    (tmp_path / "p.tsv").write_text("id\tsentence1\tsentence2\tlabel\n0\ta\tb\t0\n1\tc\tc\t1\n")
    base = [f"data.train.path={tmp_path / 'p.tsv'}", "data.eval=null", "data.text_pair=true",
            "data.text_columns=[sentence1,sentence2]"]
    assert load_recipe(None, base).data.text_pair  # (validate's check: the files are there)
    with pytest.raises(ConfigError, match=r"data.text_pair=true with data.train.text_columns=\[.*\]: a pair is two columns, "
                                          r"e.g. data.train.text_columns=\[sentence1, sentence2\]"):
        load_recipe(None, [*base, f"data.train.text_columns={columns}"], validate_files=False)


def test_column_names_on_a_file_that_names_its_own_columns_is_refused(tmp_path):
    """column_names on a JSON file was ignored without a word (its keys were read); it names a header-less csv/tsv's."""
    from peftlab.errors import ConfigError

    (tmp_path / "t.jsonl").write_text('{"sentence": "a", "label": 0}\n{"sentence": "b", "label": 1}\n')
    with pytest.raises(ConfigError, match=r"data.train.column_names names the columns of a header-less csv/tsv file; .*t.jsonl"):
        load_recipe(None, [f"data.train.path={tmp_path / 't.jsonl'}", "data.eval=null", "data.train.column_names=[text,label]"])
    (tmp_path / "t.csv").write_text("a,0\nb,1\n")  # a header-less csv: what it is for, also as data.train.format=csv
    for path in ("t.csv", "t.jsonl"):
        extra = ["data.train.format=csv"] if path.endswith("jsonl") else []
        load_recipe(None, [f"data.train.path={tmp_path / path}", "data.eval=null", "data.train.column_names=[sentence,label]", *extra])


def test_a_label_map_value_outside_the_label_names_is_a_recipe_problem(tmp_path):
    """A label_map value that is neither one of data.label_names nor a class index passed validate; training refused
    it only after reading the files."""
    from peftlab.errors import ConfigError

    (tmp_path / "t.csv").write_text("sentence,label\na,0\nb,1\n")
    base = [f"data.train.path={tmp_path / 't.csv'}", "data.eval=null", "data.label_names=[negative,positive]"]
    with pytest.raises(ConfigError, match=r"data.train.label_map maps to \['neg'\], which data.label_names=\['negative', "
                                          r"'positive'\] does not name: each value must be one of those names or a class "
                                          r"index 0..1"):
        load_recipe(None, [*base, "data.train.label_map={0: neg, 1: positive}"])
    with pytest.raises(ConfigError, match=r"maps to \['2'\]"):
        load_recipe(None, [*base, "data.train.label_map={0: 2, 1: 1}"])
    for ok in ("{0: negative, 1: positive}", "{0: 0, 1: ' positive'}", "{0: 0, 1: 1}"):
        assert load_splits(load_recipe(None, [*base, f"data.train.label_map={ok}"]))[0]["train"]["label"] == [0, 1]


def test_data_messages_count_rows_from_0_say_what_a_folder_or_an_extension_needs_and_suggest_a_column(tmp_path, caplog):
    """An empty label cell was 'data row 2' counting from 1 (other data errors and predictions count from 0); with
    text_pair an empty second text went uncounted; a header 'Sentence' got the 'no header row' hint and no suggestion;
    a folder was 'file not found'; an unknown extension named no field."""
    from peftlab.errors import ConfigError

    (tmp_path / "e.csv").write_text("sentence,label\na,1\nb,\nc,\n")
    with pytest.raises(DataError, match=r"2 row\(s\) have an empty 'label' cell: data row 1, 2 \(0-based, as predictions files "
                                        r"count; file line 3, 4 of '.*e.csv'\)\."):
        splits_of(tmp_path, tmp_path / "e.csv")
    (tmp_path / "p.tsv").write_text("s1\ts2\tlabel\na\t\t0\nb\tc\t1\n\td\t0\n")
    with caplog.at_level("WARNING", logger="peftlab.data"):
        splits_of(tmp_path, tmp_path / "p.tsv", ["data.text_pair=true", "data.text_columns=[s1,s2]"])
    assert "data.train: 2 cell(s) have no text in s1, s2" in caplog.text
    (tmp_path / "cap.csv").write_text("Sentence, label\na,1\nb,0\n")
    with pytest.raises(DataError) as e:
        splits_of(tmp_path, tmp_path / "cap.csv")
    assert "Did you mean 'Sentence' (for 'sentence')? Did you mean ' label' (for 'label')?" in str(e.value)
    assert "no header row" not in str(e.value)
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match=r"data.train.path: '.*folder' is a folder; a split is one data file .*data.train.path=FOLDER/FILE"):
        splits_of(tmp_path, tmp_path / "folder")
    with pytest.raises(ConfigError, match=r"data.train.path='.*folder' is a folder; a split is one data file"):
        load_recipe(None, [f"data.train.path={tmp_path / 'folder'}", "data.eval=null"])
    (tmp_path / "d.txt").write_text("sentence,label\na,1\n")
    with pytest.raises(DataError, match=r"^data.train.path: cannot tell the format of '.*d.txt' from its extension .*Set it: "
                                        r"data.train.format=csv\|tsv\|json\|parquet"):
        splits_of(tmp_path, tmp_path / "d.txt")


def test_evaluation_rows_with_a_training_rows_input_are_warned_about(tmp_path, caplog):
    """An eval or test split holding training inputs (files cut from one set with duplicates) scored partly what the
    model memorised, silently. Said with the count and the first row; a pair counts only where both texts are equal;
    a split read from the training file itself is run.preflight's warning, not this one."""
    (tmp_path / "tr.csv").write_text("a,b,y\n" + "".join(f"text {i},other {i},{i % 2}\n" for i in range(8)))
    (tmp_path / "ev.csv").write_text("a,b,y\nnew one,x,0\ntext 3,other 3,1\nnew two,x,1\ntext 5,other 5,1\n")
    (tmp_path / "te.csv").write_text("a,b,y\ntext 1,different,1\nfresh,x,0\n")
    base = [f"data.train.path={tmp_path / 'tr.csv'}", f"data.eval.path={tmp_path / 'ev.csv'}", f"data.test.path={tmp_path / 'te.csv'}",
            "data.label_column=y", "data.label_names=[neg, pos]"]
    with caplog.at_level("WARNING", logger="peftlab.data"):
        load_splits(load_recipe(None, [*base, "data.text_columns=[a]"], validate_files=False))
    assert ("data.eval: 2 of its 4 rows (50.0%) repeat a training row's input (first: data row 1 (0-based, as predictions "
            "files count)): its figures partly measure memorisation") in caplog.text
    assert "data.test: 1 of its 2 rows (50.0%) repeats a training row's input (first: data row 0 " in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="peftlab.data"):  # as pairs: test's "text 1" has another second text
        load_splits(load_recipe(None, [*base, "data.text_columns=[a, b]", "data.text_pair=true"], validate_files=False))
    assert "data.eval: 2 of its 4 rows" in caplog.text and "data.test:" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="peftlab.data"):  # the training file itself: not this warning
        load_splits(load_recipe(None, [*base, "data.text_columns=[a]", f"data.eval.path={tmp_path / 'tr.csv'}",
                                       f"data.test.path={tmp_path / 'tr.csv'}"], validate_files=False))
    assert "a training row's input" not in caplog.text


def test_validate_refuses_a_json_text_or_label_cell_holding_a_list_naming_its_row(tmp_path):
    """`validate` read a JSON file's keys only and passed; `train` then refused the cell after loading the model. Both
    now say the same, naming the 0-based row."""
    from peftlab.data import column_problems

    for column, cell, said in (("sentence", ["a", "list"], r"text column 'sentence' holds \['a', 'list'\] in data row 1"),
                               ("label", {"a": "record"}, r"the label column 'label' holds \{'a': 'record'\} in data row 1")):
        rows = [{"sentence": "good", "label": "pos"}, {"sentence": "bad", "label": "neg"}]
        rows[1][column] = cell
        (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        problems = column_problems(load_recipe(None, [f"data.train.path={tmp_path / 't.jsonl'}", "data.eval=null"], validate_files=False))
        assert len(problems) == 1 and re.search(said, problems[0]), problems
        with pytest.raises(DataError, match=said):
            splits_of(tmp_path, tmp_path / "t.jsonl")
    rows = [{"sentence": "good", "label": "pos"}, {"sentence": "bad", "label": "neg"}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert column_problems(load_recipe(None, [f"data.train.path={tmp_path / 't.jsonl'}", "data.eval=null"], validate_files=False)) == []


def test_integer_codes_in_an_evaluation_split_beside_names_in_train_are_warned_about(tmp_path, caplog):
    """train labelled with names, eval with SST-2's 1/0: the codes were read as positions in the (sorted, or given)
    label names, silently; with label_names [positive, negative] every 1 became 'negative'."""
    (tmp_path / "tr.tsv").write_text("sentence\tlabel\n" + "".join(f"s{i}\t{['negative', 'positive'][i % 2]}\n" for i in range(8)))
    (tmp_path / "ev.tsv").write_text("sentence\tlabel\ngreat\t1\nawful\t0\n")
    base = [f"data.train.path={tmp_path / 'tr.tsv'}", f"data.eval.path={tmp_path / 'ev.tsv'}"]
    for extra, said in (([], "an order sorted from train's names"), (["data.label_names=[positive, negative]"], "an order you set")):
        caplog.clear()
        with caplog.at_level("WARNING", logger="peftlab.data"):
            s, names = load_splits(load_recipe(None, [*base, *extra], validate_files=False))
        assert "data.eval's labels are integer codes while data.train's are names" in caplog.text and said in caplog.text
        assert f"1 -> {names[1]!r}" in caplog.text and "data.eval.label_map={0: " in caplog.text
        assert s["eval"]["label"] == [1, 0]  # (read as documented: positions)
    caplog.clear()
    with caplog.at_level("WARNING", logger="peftlab.data"):  # the split's own map: said what the codes mean
        s, names = load_splits(load_recipe(None, [*base, "data.eval.label_map={1: positive, 0: negative}"], validate_files=False))
    assert "integer codes" not in caplog.text and [names[i] for i in s["eval"]["label"]] == ["positive", "negative"]


def test_a_pair_is_separated_where_the_tokenizers_template_puts_nothing_between_its_texts():
    """data.text_pair with a byte-level BPE tokenizer (GPT-2's, SmolLM2's: `tokenizer(a, b)` is a's tokens then b's)
    glued the sentences, 'The cat sat.A cat was sitting.', worse than joining them with a space. A newline goes between
    them, longest_first cuts the longer text first and never the separator; a tokenizer with a pair template ([SEP])
    is encoded as it encodes pairs."""
    from peftlab.tasks.classification import encode_pairs, pair_layout

    from .conftest import bytelevel_tokenizer, minilm_tokenizer

    tok = bytelevel_tokenizer()
    [newline] = tok("\n", add_special_tokens=False)["input_ids"]
    assert pair_layout(tok).separator == [newline]
    out = encode_pairs({"text": ["the movie was good", "a bad plot"], "text_pair": ["really quite lovely", "the film"]}, tok, 64)
    assert [tok.decode(ids) for ids in out["input_ids"]] == ["the movie was good\nreally quite lovely", "a bad plot\nthe film"]
    assert out["truncated"] == [False, False] and out["length"] == [len(ids) for ids in out["input_ids"]]
    assert out["attention_mask"] == [[1] * n for n in out["length"]]
    a = "the movie was really quite good and the actor was lovely and the story was fine"
    long, short = tok(a, add_special_tokens=False)["input_ids"], tok("a bad plot", add_special_tokens=False)["input_ids"]
    for first, second in ((a, "a bad plot"), ("a bad plot", a)):
        cut = encode_pairs({"text": [first], "text_pair": [second]}, tok, 12)
        ids = cut["input_ids"][0]
        assert cut["truncated"] == [True] and len(ids) == 12 and ids.count(newline) == 1
        kept = ids[:ids.index(newline)], ids[ids.index(newline) + 1:]
        assert (kept if first == a else kept[::-1]) == (long[:11 - len(short)], short)  # the longer one cut, the short kept

    bert = minilm_tokenizer()
    assert pair_layout(bert) is None
    out = encode_pairs({"text": ["the cat sat."], "text_pair": ["a cat was sitting."]}, bert, 64)
    assert bert.decode(out["input_ids"][0]) == "[CLS] the cat sat. [SEP] a cat was sitting. [SEP]"
    assert out["token_type_ids"][0] == [0] * 6 + [1] * 6


def test_a_decoder_pair_classifiers_card_snippet_gives_the_runs_predictions(make_recipe, tmp_path, tiny_gpt2_left):
    """The card's pair example fed `tokenizer([a], [b])` (the texts glued) to a model trained with a separator between them:
    it encodes the pair as the run did, and gives each row the probability the run's predictions file holds."""
    from peftlab import run
    from peftlab.publish.card import card_text

    from .conftest import synthetic_rows, write_tsv

    rows = [(a, b, "same" if x == y else "different") for (a, x), (b, y) in zip(synthetic_rows(96, 5), synthetic_rows(96, 6))]
    train = write_tsv(tmp_path / "pairs.tsv", [(f"{a}\t{b}", y) for a, b, y in rows[:64]], header=("s1", "s2", "label"))
    dev = write_tsv(tmp_path / "dev.tsv", [(f"{a}\t{b}", y) for a, b, y in rows[64:]], header=("s1", "s2", "label"))
    out = tmp_path / "pair"
    run(make_recipe({"output_dir": out, "data.train": train, "data.eval": dev, "data.text_columns": "[s1, s2]",
                     "data.text_pair": True, "data.label_names": "[different, same]", "train.max_steps": 3,
                     "train.precision": "fp32", "adapter.target_modules": "[c_attn]"}, model=tiny_gpt2_left))
    code = re.search(r"```python\n(.*?)```", card_text(out, "alice/pair"), re.S).group(1)
    code = re.sub(r"^repo = .*$", f"repo = {str(out)!r}", code, flags=re.M)
    code = re.sub(r"^base_model = .*$", f"base_model = {str(tiny_gpt2_left)!r}", code, flags=re.M)
    for line in (out / "predictions-eval.jsonl").read_text().splitlines()[:3]:
        row = json.loads(line)
        scope = {}
        exec(code.replace('"The firm reported a loss."', json.dumps(row["text"])).replace('"The company lost money."',  # noqa: S102
                                                                                            json.dumps(row["text_pair"])), scope)
        assert scope["logits"].softmax(-1).max().item() == pytest.approx(row["probability"], abs=1e-5), code


def test_evaluation_order_sorts_without_pyarrows_future_warning():
    """Python API users saw pyarrow's 'Specifying null_placement ... is deprecated' FutureWarning at every evaluation
    (datasets' sort); the CLI filtered it for the whole process. Quieted where peftlab sorts, and the order is kept."""
    import warnings

    from datasets import Dataset

    from peftlab.data import longest_first

    ds = Dataset.from_dict({"length": [1, 3, 2], "row": [0, 1, 2]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert longest_first(ds)["row"] == [1, 2, 0]
