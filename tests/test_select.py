"""`peftlab select`: the proxies on constructed cases (LogME against its closed form, the probe), a ranking of tiny
candidates end to end, the CLI's table and JSON, and clear errors; the recipe's eval and test splits are never read."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from peftlab.cli import main
from peftlab.errors import ConfigError, ModelNotFound
from peftlab.select import PROXIES, SelectError, check_classes, jackknifed, logme, logme_evidence, probe, select, stratified_folds, to_json, train_sample


def direct_evidence(f: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """log N(y; 0, I/beta + F F^T/alpha) / n, written out: the marginal likelihood LogME maximises."""
    n = len(y)
    cov = np.eye(n) / beta + f @ f.T / alpha
    _, logdet = np.linalg.slogdet(cov)
    return -0.5 * (y @ np.linalg.solve(cov, y) + logdet + n * math.log(2 * math.pi)) / n


@pytest.mark.parametrize("n, d", [(4, 1), (6, 3), (3, 5)])  # more rows than dims, and fewer (a thin SVD of rank n)
def test_logme_is_the_maximised_marginal_likelihood(n, d):
    """With n <= d the features fit any target exactly: the evidence rises towards a finite limit as the noise
    precision beta grows, so the iteration stops at a large beta (the identity still holds; the maximum is at infinity)."""
    rng = np.random.default_rng(n * 10 + d)
    f = rng.normal(size=(n, d))
    y = (rng.random(n) < 0.5).astype(float)
    y[0], y[1] = 1.0, 0.0
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    evidence, alpha, beta = logme_evidence(s, u.T @ y, float(y @ y), n, d)
    assert evidence == pytest.approx(direct_evidence(f, y, alpha, beta), rel=1e-7)  # n < d: beta is large, fewer digits agree
    assert math.isfinite(evidence)
    if n <= d:
        assert beta > 1e6
        return
    for a, b in [(alpha * 1.2, beta), (alpha / 1.2, beta), (alpha, beta * 1.2), (alpha, beta / 1.2)]:
        assert direct_evidence(f, y, a, b) < evidence + 1e-9  # the fixed point is a maximum of the evidence


def test_logme_on_no_more_rows_than_dimensions_is_always_one_clear_error():
    """2-8 rows of 384-d features (a tiny --max-rows with folds): the fixed point runs off to beta -> infinity, which
    overflowed (or divided by zero) with a traceback, or stopped at a degenerate beta (1e7..1e16) and was ranked, as the
    noise fell; the error advised 'fewer folds' (fewer rows per jackknife part). n <= d is always an error, said before
    the iteration runs, with the rows (or folds) that would do."""
    from peftlab.select import logme_rows_problem

    for n, d in ((2, 384), (3, 384), (8, 384), (32, 32)):
        for seed in range(5):
            rng = np.random.default_rng(seed)
            labels = np.arange(n) % 2
            with pytest.raises(SelectError) as e:
                logme(rng.normal(size=(n, d)), labels, 2)
            assert str(e.value).count("peftlab select:") == 1 and "fewer folds" not in str(e.value)
            assert "needs more rows than feature dimensions" in str(e.value) and f"at least {d + 1} rows" in str(e.value)
    assert logme_rows_problem(60, 32, 3) is None  # every jackknife part: 40 rows
    problem = logme_rows_problem(48, 32, 3)  # the parts hold 48 - 16 = 32 rows: no more than 32 dimensions
    assert "LogME on 48 rows (its jackknife parts, each without one of the 3 folds, 32) of 32-dimensional" in problem
    assert "at least 50 rows (--max-rows" in problem and "or use --folds 4, or rank with --proxies probe." in problem
    assert "--folds" not in logme_rows_problem(30, 32, 3)  # more folds cannot help where the sample itself is too small


def test_logme_on_too_few_rows_is_a_failed_cell_with_one_prefix(make_recipe, tiny_bert):
    """48 rows, 3 folds, 32 dimensions: each jackknife part held 32 rows, and LogME ranked a degenerate figure. It is a
    failed cell, the probe's figure kept, and its line under the table says 'peftlab select:' once (it said it twice)."""
    from peftlab.select import format_table

    (row,) = select(make_recipe(), [str(tiny_bert)], proxies=["probe", "logme"], max_rows=48, folds=3)
    assert row.rank == 1 and math.isfinite(row.estimates["probe"].value) and math.isnan(row.estimates["logme"].value)
    assert row.failures["logme"].startswith("LogME on 48 rows (its jackknife parts") and "at least 50 rows" in row.failures["logme"]
    table = format_table([row], "probe")
    assert f"failed: {tiny_bert.name} lora LogME: LogME on 48 rows" in table and "peftlab select:" not in table


def test_logme_by_hand_one_feature():
    # F = [1, 1, 0]^T, y = [1, 0, 0]: F^T F = sigma = 2, F^T y = 1, z^2 = 1/2, and |y|^2 - z^2 = 1/2 lies outside F's span.
    # For one feature the fixed point alpha = gamma / m^2, beta = (n - gamma) / |Fm - y|^2 reduces to a quadratic in
    # lambda = alpha / beta: (n - 1 - q) lambda^2 + (n - 1 - 2q) sigma lambda - q sigma^2 = 0, q = (|y|^2 - z^2) / z^2 = 1,
    # so lambda = sigma = 2, alpha = (lambda + sigma) / z^2 = 8, beta = 4, m = beta F^T y / (alpha + beta sigma) = 1/4,
    # |Fm - y|^2 = 5/8, and the evidence 3/2 ln 4 + 1/2 ln 8 - 3/2 ln 2pi - 4 * 5/16 - 8/32 - 1/2 ln 16, over n = 3 rows.
    f, y = np.array([[1.0], [1.0], [0.0]]), np.array([1.0, 0.0, 0.0])
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    evidence, alpha, beta = logme_evidence(s, u.T @ y, float(y @ y), 3, 1)
    assert alpha == pytest.approx(8.0, rel=1e-5) and beta == pytest.approx(4.0, rel=1e-5)
    assert evidence == pytest.approx((2.5 * math.log(2) - 1.5 * math.log(2 * math.pi) - 1.5) / 3, rel=1e-6)
    assert evidence == pytest.approx(direct_evidence(f, y, alpha, beta), rel=1e-9)
    # logme averages the classes' evidences: class 1 is the target y, class 0 its complement [0, 1, 1]
    labels = np.array([1, 0, 0])
    assert logme(f, labels, 2) == pytest.approx((evidence + logme_evidence(s, u.T @ (1 - y), 2.0, 3, 1)[0]) / 2)


def test_logme_leaves_out_a_class_with_no_row():
    """A class of data.label_names absent from the sample (or from a jackknife part): its all-zero target drove alpha
    to 0 and select blamed 'too few rows' on 600 rows of 384 dimensions. It has nothing to explain and is left out."""
    rng = np.random.default_rng(0)
    f, labels = rng.normal(size=(60, 8)), np.arange(60) % 2
    assert logme(f, labels, 3) == pytest.approx(logme(f, labels, 2))
    folds = stratified_folds(np.where(np.arange(60) < 3, 2, labels), 3, 0)  # class 2: three rows, one per fold
    value, std = jackknifed(lambda x, y: logme(x, y, 3), f, np.where(np.arange(60) < 3, 2, labels), folds)
    assert math.isfinite(value) and math.isfinite(std)


def test_logme_and_probe_prefer_features_that_separate_the_classes():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 60)
    noise = rng.normal(size=(180, 16))
    signal = noise.copy()
    signal[:, :3] += 3.0 * np.eye(3)[labels]  # three dimensions carry the class
    folds = stratified_folds(labels, 5, seed=0)
    assert logme(signal, labels, 3) > logme(noise, labels, 3) + 0.1
    good, good_std = probe(signal, labels, folds, 3)
    chance, _ = probe(noise, labels, folds, 3)
    assert good > 0.9 and good_std < 0.1
    assert chance < 0.55  # a third is chance; noise features give no more than noise


def test_stratified_folds_spread_every_class():
    labels = np.array([0] * 10 + [1] * 20)
    folds = stratified_folds(labels, 5, seed=1)
    for f in range(5):
        assert (labels[folds == f] == 0).sum() == 2 and (labels[folds == f] == 1).sum() == 4


@pytest.fixture
def untouched_splits(make_recipe, tmp_path):
    """A recipe whose eval and test files are gone after loading: selection must not need them."""
    recipe = make_recipe({"data.test": str(tmp_path / "recipe.yaml")})  # any existing file, to load
    recipe.data.eval.path = str(tmp_path / "missing-eval.tsv")
    recipe.data.test.path = str(tmp_path / "missing-test.tsv")
    return recipe


def test_select_ranks_tiny_candidates_from_train_only(untouched_splits, tiny_bert, tiny_llama):
    rows = select(untouched_splits, [str(tiny_bert), str(tiny_llama)], ["lora", "frozen"], proxies=PROXIES, max_rows=96,
                  folds=3, steps=2)
    assert len(rows) == 4 and [r.rank for r in rows] == [1, 1, 3, 3]  # the probe reads the base: its two methods tie
    values = [r.estimates["probe"].value for r in rows]
    assert values == sorted(values, reverse=True)
    by = {(r.label, r.method): r for r in rows}
    assert by[(tiny_bert.name, "lora")].pooling == "mean" and by[(tiny_llama.name, "lora")].pooling == "last-token"
    for r in rows:
        assert r.rows == 96 and r.feature_dim == 32 and r.features_seconds > 0
        for p in PROXIES:
            e = r.estimates[p]
            assert math.isfinite(e.value) and e.std >= 0 and e.seconds > 0
        assert 0 <= r.estimates["probe"].value <= 1 and 0 <= r.estimates["steps"].value <= 1
    # probe and LogME read the base: its methods share them; the steps proxy trains each method
    for base in (tiny_bert.name, tiny_llama.name):
        assert by[(base, "lora")].estimates["logme"] == by[(base, "frozen")].estimates["logme"]


def test_cli_prints_the_table_and_writes_json(make_recipe, tmp_path, capsys, tiny_bert):
    make_recipe()
    out = tmp_path / "select.json"
    assert main(["select", str(tmp_path / "recipe.yaml"), "--candidates", str(tiny_bert), "minilm", "--max-rows", "60",
                 "--folds", "3", "--json", str(out), "data.max_length=24"]) == 0
    text = capsys.readouterr().out
    assert "probe acc" in text and "LogME" in text and "minilm" in text and tiny_bert.name in text
    assert "data.eval and data.test were not read" in text
    report = json.loads(out.read_text())
    assert report["ranked_by"] == "probe" and [r["rank"] for r in report["rows"]] == [1, 2]
    assert report["settings"]["overrides"] == ["data.max_length=24"] and report["settings"]["max_rows"] == 60  # rerunnable
    assert report["settings"]["folds"] == 3 and report["settings"]["candidates"] == [str(tiny_bert), "minilm"]
    minilm, tiny = sorted(report["rows"], key=lambda r: r["base"] != "minilm")
    assert minilm["feature_dim"] == 384 and tiny["feature_dim"] == 32 and set(minilm["estimates"]) == {"probe", "logme"}
    for bad, message in ((tmp_path, "is a folder: give a file name"), (out / "x.json", "select.json is a file")):
        assert main(["select", str(tmp_path / "recipe.yaml"), "--candidates", str(tiny_bert), "--json", str(bad)]) == 2
        assert message in capsys.readouterr().err  # refused before the work, not after it
    # 40 rows without a fold against MiniLM's 384 dimensions (the tiny BERT has 32): LogME has no figure there, and says
    # why; the tiny BERT's is measured
    assert minilm["estimates"]["logme"]["value"] is None and math.isfinite(tiny["estimates"]["logme"]["value"])
    assert "at least 578 rows" in minilm["failures"]["logme"]  # 578 - 193 = 385 rows without the largest of 3 folds
    assert "failed: minilm lora LogME: LogME on 60 rows" in text and "at least 578 rows" in text


def test_bad_input_is_a_clear_error(make_recipe, tmp_path, capsys, tiny_bert):
    recipe = make_recipe()
    with pytest.raises(ModelNotFound, match="candidate './no/such/base'.*no such model directory"):
        select(recipe, [str(tiny_bert), "./no/such/base"])
    with pytest.raises(SelectError, match="proxy 'lgome': no such proxy"):
        select(recipe, [str(tiny_bert)], proxies=["lgome"])
    with pytest.raises(SelectError, match="'lroa' is neither a candidate"):
        select(recipe, [str(tiny_bert)], overrides={"lroa": ["train.lr=1e-3"]})
    with pytest.raises(ConfigError, match="adapter.method='nope'"):
        select(recipe, [str(tiny_bert)], ["nope"])
    recipe.task.type = "summarization"
    with pytest.raises(ConfigError, match="classification recipes.*task.type=summarization"):
        select(recipe, [str(tiny_bert)])
    recipe.task.type = "multitask"  # labels per task: no one set to probe (was a KeyError deep inside)
    with pytest.raises(ConfigError, match="single-task classification recipes.*task.type=multitask"):
        select(recipe, [str(tiny_bert)])
    recipe.task.type, recipe.model.from_run = "classification", str(tmp_path / "some-run")
    with pytest.raises(ConfigError, match="model.from_run=.*would probe the bare base"):
        select(recipe, [str(tiny_bert)])
    recipe.model.from_run = None
    assert main(["select", str(tmp_path / "recipe.yaml"), "--candidates", "./no/such/base"]) == 2
    assert "candidate './no/such/base'" in capsys.readouterr().err
    assert main(["select", str(tmp_path / "recipe.yaml"), "--candidates", str(tiny_bert), "--set", "train.lr=1"]) == 2
    assert "expected NAME:KEY=VALUE" in capsys.readouterr().err


def test_a_sample_of_one_class_is_refused_and_rare_classes_are_warned_about(make_recipe, tmp_path, caplog, tiny_bert):
    """60 rows of one class: every base scored a perfect probe (1.000, LogME 2.07) and select said nothing; a class the
    seeded sample missed, or one with fewer rows than folds, went unmentioned."""
    from .conftest import synthetic_rows, write_tsv

    rows = synthetic_rows(200, 3)
    one = write_tsv(tmp_path / "one.tsv", [(t, 0) for t, _ in rows[:60]])
    with pytest.raises(SelectError, match=r"hold one class only \(negative\): every base would score perfectly"):
        select(make_recipe({"data.train": str(one)}), [str(tiny_bert)], max_rows=60, folds=3)
    negatives = [(t, y) for t, y in rows if y == 0]
    rare = write_tsv(tmp_path / "rare.tsv", negatives[:40] + [(t, y) for t, y in rows if y == 1][:2])
    select(make_recipe({"data.train": str(rare)}), [str(tiny_bert)], max_rows=60, folds=3)
    assert "class(es) positive (2) have fewer rows than the 3 folds" in caplog.text
    caplog.clear()
    positives = [(t, y) for t, y in rows if y == 1]
    three = write_tsv(tmp_path / "three.tsv", negatives[:45] + positives[:45] + [(positives[50][0], 2)])
    mostly = make_recipe({"data.train": str(three), "data.eval": None, "data.label_names": "[negative,positive,neutral]"})
    drawn = train_sample(mostly, 30)[0]["label"].count(2)  # (this seed's sample: the one neutral row, or not)
    select(mostly, [str(tiny_bert)], proxies=["probe"], max_rows=30, folds=3)
    assert ("neutral (1) have fewer rows" if drawn else "no row of class(es) ['neutral'] among the 30 rows sampled") in caplog.text
    check_classes(np.array([0, 1] * 5), ["negative", "positive", "neutral"], 3, 10)
    assert "no row of class(es) ['neutral'] among the 10 rows sampled" in caplog.text


def test_benchmark_scores_rankings_with_ties(tmp_path):
    from peftlab import load_recipe

    from .conftest import load_benchmark

    bench = load_benchmark("model_selection")
    assert bench.kendall_tau_b([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert bench.kendall_tau_b([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert bench.kendall_tau_b([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / math.sqrt(6))  # tau-b, as scipy.stats.kendalltau
    assert math.isnan(bench.kendall_tau_b([1, 1, 1], [1, 2, 3]))  # a proxy that ties everything orders nothing
    # a proxy tied between a and b picks either: half a hit, and half the 10 points lost by taking b
    assert bench.pick({"a": 1, "b": 1, "c": 0}, {"a": 0.9, "b": 0.8, "c": 0.7}) == pytest.approx((0.5, 5.0))
    for setting in bench.SETTINGS:  # every setting's recipe is valid, and its truth is scored on rows the proxies never read
        recipe = load_recipe(bench.write_recipe(tmp_path / setting, setting, bench.FULL), validate_files=False)
        assert recipe.data.test is None and (recipe.data.eval is not None or recipe.data.eval_holdout > 0)


def test_benchmark_averages_truth_seeds_and_reports_their_agreement(tmp_path):
    """Truth runs of several training seeds: the truth is their mean, and the seeds' own agreement is the ceiling."""
    from .conftest import load_benchmark

    bench = load_benchmark("model_selection")
    items = [("minilm", "frozen"), ("minilm", "lora"), ("big", "lora")]
    truth = {"agree": {42: [0.6, 0.7, 0.9], 1: [0.62, 0.72, 0.88]},  # the same order under both seeds
             "flip": {42: [0.6, 0.7, 0.8], 1: [0.8, 0.7, 0.6]}}     # the seeds order the items oppositely
    for setting, seeds in truth.items():
        folder = tmp_path / setting
        folder.mkdir()
        for seed, accs in seeds.items():
            for (base, method), acc in zip(items, accs):
                tag = "" if seed == bench.SEED else f"-seed{seed}"
                (folder / f"truth-{base}-{method}{tag}.json").write_text(json.dumps(
                    {"base": base, "method": method, "seed": seed, "accuracy": acc, "process_wall_s": 10.0 * seed}))
        est = {p: {"value": v, "std": 0.0, "seconds": 1.0} for p, v in (("probe", 0.5), ("logme", -0.5), ("steps", 0.5))}
        (folder / "select.json").write_text(json.dumps({"process_wall_s": 30.0, "rows": [
            {"base": b, "method": m, "label": b, "features_group": b, "features_seconds": 1.0,
             "estimates": {**est, "steps": {**est["steps"], "value": v}}} for (b, m), v in zip(items, (0.1, 0.2, 0.3))]}))
    _, truths = bench.load_setting(tmp_path / "agree")
    assert truths[("big", "lora")]["accuracy"] == pytest.approx(0.89) and truths[("big", "lora")]["seeds"] == {1: 0.88, 42: 0.9}
    assert truths[("big", "lora")]["process_wall_s"] == pytest.approx(420.0)  # the cost: its run at seed 42
    assert bench.seed_agreement(truths) == pytest.approx((1.0, 1.0))
    assert bench.seed_agreement(bench.load_setting(tmp_path / "flip")[1]) == pytest.approx((-1.0, 0.0))
    text = bench.report(tmp_path, "ms")
    assert "| agree | 1, 42 | 1.00 | 1.00 |" in text and "| flip | 1, 42 | -1.00 | 0.00 |" in text
    assert "the truth against itself (its training seeds, same rows): mean tau-b 0.00 over 2 settings" in text
    assert "| agree | minilm lora | 71.00 (72.00 / 70.00) |" in text  # the mean, then each seed's accuracy in seed order
    one = tmp_path / "one"
    one.mkdir()
    for f in (tmp_path / "agree").glob("*"):
        if "seed1" not in f.name:
            (one / f.name).write_text(f.read_text())
    assert bench.seed_agreement(bench.load_setting(one)[1]) is None
    (one / "truth-big-lora-seed1.json").write_text((tmp_path / "agree" / "truth-big-lora-seed1.json").read_text())
    _, partial = bench.load_setting(one)  # a seed only one item has (an unfinished run) does not enter the mean
    assert partial[("big", "lora")]["accuracy"] == pytest.approx(0.9) and partial[("big", "lora")]["seeds"] == {42: 0.9}


def test_encoding_casts_the_frozen_base_once_with_the_same_features(make_recipe, monkeypatch):
    """The base's features under bf16 autocast: its linear weights cast once for all batches (train.cast_frozen), the
    same numbers as autocast casting them at every batch."""
    from peftlab import load_splits
    from peftlab import select as sel

    recipe = make_recipe({"train.precision": "bf16", "eval.batch_size": 16})
    splits, names = load_splits(recipe)
    real, made = sel.FrozenWeightsCast, []
    monkeypatch.setattr(sel, "FrozenWeightsCast", lambda model, dtype: made.append(real(model, dtype)) or made[-1])
    once, _ = sel.encode(recipe, splits["train"], names)
    per_call, _ = sel.encode(make_recipe({"train.precision": "bf16", "eval.batch_size": 16, "train.cast_frozen": False}),
                             splits["train"], names)
    assert made[0].dtype == torch.bfloat16 and len(made[0].params) >= 24 and made[1].params == []
    assert np.array_equal(once, per_call)


def test_the_steps_proxy_keeps_integer_label_names_and_sentence_pairs(make_recipe, tmp_path, tiny_bert):
    """Labels named '1'..'3' (star ratings) were written to the steps proxy's files as class indices 0..2, read back as
    names (0 refused, 1 -> '1': shifted); a text_pair recipe lost its second text. Both run, as a training would."""
    from peftlab.select import build_candidates, few_steps, train_sample

    words = ["good", "fine", "bad"]
    lines = ["s1,s2,stars"] + [f"the first {words[i % 3]} text {i},and a second one {i},{3 - i % 3}" for i in range(36)]
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    recipe = make_recipe({"data.train": str(tmp_path / "pairs.csv"), "data.eval": None, "data.text_columns": "[s1,s2]",
                          "data.text_pair": "true", "data.label_column": "stars", "data.label_names": "['1','2','3']"})
    ds, names = train_sample(recipe, 36)
    assert names == ["1", "2", "3"] and "text_pair" in ds.column_names
    holdout = np.arange(36) % 4 == 0
    (c,) = build_candidates(recipe, [str(tiny_bert)], None, {})
    estimate = few_steps(c, ds, names, holdout, 1, tmp_path / "w")
    assert 0 <= estimate.value <= 1
    written = [json.loads(line) for line in (tmp_path / "w" / "train.jsonl").read_text().splitlines()]
    assert [r["label"] for r in written] == [names[i] for i, h in zip(ds["label"], holdout) if not h]
    assert written[0]["text_pair"].startswith("and a second one")
    run = json.loads((tmp_path / "w" / "run" / "run.json").read_text())
    assert run["label_names"] == names
    with open(tmp_path / "w" / "run" / "recipe.yaml") as f:
        assert "text_pair: true" in f.read()


def test_a_methods_own_overrides_leave_the_bases_features_alone(make_recipe, tiny_bert):
    """--set frozen:train.precision=fp32 is for frozen's training (the steps proxy): the probe and LogME read the base,
    and every method of it shares one encoding and one figure, as the README says (it was encoded twice, and differed)."""
    recipe = make_recipe({"train.precision": "bf16"})
    rows = select(recipe, [str(tiny_bert)], ["lora", "frozen"], proxies=["probe"], max_rows=48, folds=3,
                  overrides={"frozen": ["train.precision=fp32"]})
    lora, frozen = sorted(rows, key=lambda r: r.method != "lora")
    assert lora.features_group == frozen.features_group == 1 and lora.estimates["probe"] == frozen.estimates["probe"]


def test_equal_figures_share_a_rank(make_recipe, tiny_bert, tmp_path):
    """One base in two folders (a copy): the same figures, one rank, not 1 and 2."""
    import shutil

    copy = shutil.copytree(tiny_bert, tmp_path / "copy")
    rows = select(make_recipe(), [str(tiny_bert), str(copy)], proxies=["probe"], max_rows=48, folds=3)
    assert rows[0].estimates["probe"].value == rows[1].estimates["probe"].value and [r.rank for r in rows] == [1, 1]


def test_one_base_by_several_spellings_is_one_candidate_and_labels_tell_bases_apart(make_recipe, tiny_bert, tmp_path, caplog,
                                                                                     capsys, monkeypatch):
    """`--candidates $S/tiny-bert $S/tiny-bert/ ../scratch/tiny-bert` gave three tied rows, each loaded and encoded again;
    two bases $S/a/model and $S/b/model both showed as `model` in the table. A repeat is dropped (the first spelling kept,
    its --set too, and said); a label shared by bases gets their parent folders until they differ; the JSON keeps the base."""
    import logging
    import os
    import shutil

    from peftlab import select as sel

    encode, encoded = sel.encode, []
    monkeypatch.setattr(sel, "encode", lambda recipe, *a: encoded.append((recipe.model.name, recipe.data.max_length)) or encode(recipe, *a))
    link = tmp_path / "link"
    link.symlink_to(tiny_bert)
    spellings = [str(tiny_bert), str(tiny_bert) + "/", os.path.relpath(tiny_bert), str(link)]
    with caplog.at_level(logging.WARNING, logger="peftlab.select"):
        (row,) = select(make_recipe(), spellings, proxies=["probe"], max_rows=48, folds=3,
                        overrides={spellings[1]: ["data.max_length=24"]})
    assert row.base == str(tiny_bert) and row.label == tiny_bert.name and row.rank == 1 and encoded == [(str(tiny_bert), 24)]  # once; a repeat's --set kept
    assert f"candidate {spellings[2]} is {tiny_bert} again (the same model): dropped" in caplog.text
    from peftlab.select import base_labels

    a, b = (shutil.copytree(tiny_bert, tmp_path / x / "deep" / "model") for x in ("a", "b"))
    assert base_labels([str(a), str(b), "minilm", str(tiny_bert)]) == {
        str(a): "a/deep/model", str(b): "b/deep/model", "minilm": "minilm", str(tiny_bert): tiny_bert.name}
    make_recipe()
    out = tmp_path / "select.json"
    assert main(["select", str(tmp_path / "recipe.yaml"), "--candidates", str(a), str(b), "--proxies", "probe",
                 "--max-rows", "30", "--folds", "3", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert " a/deep/model " in text and " b/deep/model " in text
    rows = json.loads(out.read_text())["rows"]
    assert sorted((r["base"], r["label"]) for r in rows) == [(str(a), "a/deep/model"), (str(b), "b/deep/model")]


def test_a_candidate_that_fails_is_a_row_and_the_others_figures_are_kept(make_recipe, tiny_bert, tmp_path):
    """A base with no weights stopped select after the first candidate's work, with no table and no JSON."""
    import shutil

    from peftlab.select import format_table

    empty = tmp_path / "no-weights"
    shutil.copytree(tiny_bert, empty, ignore=shutil.ignore_patterns("*.safetensors"))
    rows = select(make_recipe(), [str(tiny_bert), str(empty)], proxies=["probe"], max_rows=48, folds=3)
    good, bad = rows
    assert good.rank == 1 and math.isfinite(good.estimates["probe"].value)
    assert bad.rank == 0 and "holds no model weights" in bad.error and math.isnan(bad.estimates["probe"].value)
    table = format_table(rows, "probe")
    assert "failed (below)" in table and f"failed: {bad.label} lora: " in table
    assert json.loads(json.dumps(to_json(rows, "probe")), parse_constant=lambda c: 1 / 0)["rows"][1]["estimates"]["probe"]["value"] is None
    with pytest.raises(SelectError, match="no-weights.*holds no model weights"):
        select(make_recipe(), [str(empty)], proxies=["probe"], max_rows=48, folds=3)


def test_a_candidate_failing_with_any_error_is_a_row(make_recipe, tiny_bert, tmp_path, monkeypatch):
    """A candidate whose load raised an error not peftlab's own (safetensors' SafetensorError for a model.safetensors
    cut short) stopped select with a traceback: no table, no JSON, the later candidates never tried."""
    import shutil

    from peftlab import select as sel

    broken = tmp_path / "broken"
    shutil.copytree(tiny_bert, broken)
    encode = sel.encode

    def failing(recipe, ds, names):  # (load_base says a damaged file in its own words; any library's error is a row too)
        if recipe.model.name == str(broken):
            raise RuntimeError("something the library raised")
        return encode(recipe, ds, names)

    monkeypatch.setattr(sel, "encode", failing)
    bad, good = select(make_recipe(), [str(broken), str(tiny_bert)], proxies=["probe"], max_rows=48, folds=3)[::-1]
    assert good.rank == 1 and math.isfinite(good.estimates["probe"].value)
    assert bad.rank == 0 and bad.error == "RuntimeError: something the library raised"
    monkeypatch.undo()
    (broken / "model.safetensors").write_bytes((tiny_bert / "model.safetensors").read_bytes()[:5000])
    rows = select(make_recipe(), [str(broken), str(tiny_bert)], proxies=["probe"], max_rows=48, folds=3)
    assert rows[0].rank == 1 and "damaged or truncated" in rows[1].error


def test_a_proxy_that_fails_leaves_the_others_figures(make_recipe, tiny_bert, tiny_llama, tmp_path, monkeypatch):
    """--proxies probe logme steps where the steps proxy failed for one candidate: its whole row became `failed`, its
    probe and LogME figures (computed) were dropped, and it fell out of a ranking by the probe."""
    from peftlab import select as sel
    from peftlab.errors import DataError
    from peftlab.select import format_table

    few_steps = sel.few_steps

    def failing(c, *args):
        if c.base == str(tiny_llama):
            raise DataError("this candidate cannot train")
        return few_steps(c, *args)

    monkeypatch.setattr(sel, "few_steps", failing)
    rows = select(make_recipe(), [str(tiny_llama), str(tiny_bert)], proxies=PROXIES, max_rows=60, folds=3, steps=1)
    llama = next(r for r in rows if r.base == str(tiny_llama))
    assert not llama.error and llama.failures == {"steps": "this candidate cannot train"} and llama.rank in (1, 2)
    assert math.isfinite(llama.estimates["probe"].value) and math.isfinite(llama.estimates["logme"].value)
    assert math.isnan(llama.estimates["steps"].value) and sorted(r.rank for r in rows) == [1, 2]
    table = format_table(rows, "probe")
    assert f"failed: {tiny_llama.name} lora steps acc: this candidate cannot train" in table and "failed (below)" in table
    by_steps = select(make_recipe(), [str(tiny_llama), str(tiny_bert)], proxies=["probe", "steps"], rank_by="steps",
                      max_rows=48, folds=3, steps=1)
    assert [(r.base, r.rank) for r in by_steps] == [(str(tiny_bert), 1), (str(tiny_llama), 0)]  # no steps figure: no rank


def test_a_candidate_the_recipe_cannot_train_is_refused_before_any_compute(make_recipe, tiny_llama, tmp_path, monkeypatch):
    """A chat verbalizer recipe and a base whose tokenizer has no chat template: select encoded it and ranked its probe
    figure (a base the recipe cannot train), or failed after its features in the steps proxy. `peftlab validate`'s
    check of the base refuses that candidate before any encoding; the others go on."""
    import shutil

    from transformers import AutoTokenizer

    from peftlab import select as sel

    chat = tmp_path / "chat-llama"
    shutil.copytree(tiny_llama, chat)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tok.save_pretrained(chat)
    encoded, encode = [], sel.encode
    monkeypatch.setattr(sel, "encode", lambda recipe, *a: encoded.append(recipe.model.name) or encode(recipe, *a))
    recipe = make_recipe({"task.type": "verbalizer", "task.chat_template": True}, model=chat)
    rows = select(recipe, [str(tiny_llama), str(chat)], proxies=["probe"], max_rows=48, folds=3)
    good, bad = rows
    assert good.base == str(chat) and good.rank == 1 and encoded == [str(chat)]
    assert bad.rank == 0 and "has no chat template" in bad.error
    with pytest.raises(SelectError, match="tiny-llama.*has no chat template"):
        select(recipe, [str(tiny_llama)], proxies=["probe"], max_rows=48, folds=3)
    assert encoded == [str(chat)]


def test_a_method_valid_only_with_its_own_overrides_still_gets_the_bases_features(make_recipe, tiny_bert):
    """--set full:quant.mode=none on a 4-bit recipe: full is valid only with it, and the features recipe (without the
    method's overrides) refused the whole command. The base's features then come from the candidate's recipe."""
    rows = select(make_recipe({"quant.mode": "4bit"}), [str(tiny_bert)], ["full"], proxies=["probe"], max_rows=48, folds=3,
                  overrides={"full": ["quant.mode=none"]})
    assert rows[0].rank == 1 and math.isfinite(rows[0].estimates["probe"].value)


def test_the_steps_proxy_runs_a_recipe_that_stops_early(make_recipe, tiny_bert):
    """The proxy's few steps evaluate nothing, so train.early_stopping (which needs eval_every) made its recipe invalid:
    the candidate failed with 'invalid recipe:' and nothing after it."""
    rows = select(make_recipe({"train.eval_every": 4, "train.early_stopping": 2}), [str(tiny_bert)], proxies=["steps"],
                  steps=1, max_rows=48, folds=3)
    assert not rows[0].error and 0 <= rows[0].estimates["steps"].value <= 1


def test_a_single_candidate_or_proxy_string_is_one_item(make_recipe, tiny_bert):
    """select(recipe, "/path/to/model", proxies="probe") iterated each string: a candidate per character of the path
    (each 'not found'), a proxy per letter ('p', 'r', ...: no such proxy). One string is one item, as one override is."""
    (row,) = select(make_recipe(), str(tiny_bert), proxies="probe", max_rows=48, folds=3)
    assert row.base == str(tiny_bert) and set(row.estimates) == {"probe"} and row.rank == 1
    assert [r.base for r in select(make_recipe(), tiny_bert, proxies="probe", max_rows=48, folds=3)] == [str(tiny_bert)]  # a Path


def test_a_combination_the_recipe_refuses_is_a_failed_row_and_every_bad_name_is_said(make_recipe, tiny_bert, tmp_path, monkeypatch):
    """A 4-bit recipe with --methods lora full: full's ConfigError (quantized weights cannot train) stopped the whole
    command before any compute, so the valid lora candidate was never ranked; a 4-bit --set on one of two bases did the
    same. Such a candidate is now a failed row, as `peftlab validate`'s other refusals are. And `--candidates` with two
    names that resolve to nothing named the first only: a rerun then found the second."""
    from peftlab import select as sel

    encoded, encode = [], sel.encode
    monkeypatch.setattr(sel, "encode", lambda recipe, *a: encoded.append(recipe.adapter.method) or encode(recipe, *a))
    recipe = make_recipe()
    rows = select(recipe, [str(tiny_bert)], ["lora", "full"], proxies=["probe"], max_rows=48, folds=3,
                  overrides={"full": ["quant.mode=4bit"]})
    good, bad = rows
    assert good.method == "lora" and good.rank == 1 and math.isfinite(good.estimates["probe"].value)
    assert bad.method == "full" and bad.rank == 0 and "quant.mode=4bit with adapter.method=full" in bad.error
    assert encoded == ["lora"]  # the refused candidate was never loaded
    assert main(["select", str(tmp_path / "recipe.yaml"), "--candidates", str(tiny_bert), "--methods", "lora", "full",
                 "--set", "full:quant.mode=4bit", "--proxies", "probe", "--max-rows", "48", "--folds", "3"]) == 0
    with pytest.raises(SelectError, match="candidate tiny-bert\\d* \\(full\\): quant.mode=4bit with adapter.method=full"):
        select(recipe, [str(tiny_bert)], ["full"], overrides={"full": ["quant.mode=4bit"]})  # every candidate refused: one error
    with pytest.raises(ModelNotFound) as e:
        select(recipe, [str(tiny_bert), "./no/such/base", "./nor/this"])
    assert "2 candidates resolve to no model" in str(e.value) and "'./no/such/base'" in str(e.value) and "'./nor/this'" in str(e.value)
    with pytest.raises(ConfigError, match="--methods 'lroa': no such method"):
        select(recipe, [str(tiny_bert)], ["lora", "lroa"])


def test_json_never_replaces_a_file_unasked_nor_the_recipe_it_ranks(make_recipe, tmp_path, capsys, monkeypatch, tiny_bert):
    """`--json recipe.yaml` replaced the recipe being ranked with the table, and any existing file was replaced without a
    word. An existing --json file is refused before any work unless --overwrite; the recipe and its data files always."""
    from peftlab import select as sel

    recipe = make_recipe()
    path = tmp_path / "recipe.yaml"
    before, ran = path.read_text(), []
    real = sel.select
    monkeypatch.setattr(sel, "select", lambda *a, **k: ran.append(1) or real(*a, **k))
    args = ["select", str(path), "--candidates", str(tiny_bert), "--proxies", "probe", "--max-rows", "30", "--folds", "3"]
    for target in (path, recipe.data.train.path, recipe.data.eval.path):
        assert main([*args, "--json", str(target), "--overwrite"]) == 2
        assert "which this selection reads: writing the table there would destroy it" in capsys.readouterr().err
    assert path.read_text() == before and not ran
    out = tmp_path / "select.json"
    out.write_text("earlier results")
    assert main([*args, "--json", str(out)]) == 2
    assert f"--json {out} exists: select would replace it. Pass --overwrite" in capsys.readouterr().err
    assert out.read_text() == "earlier results" and not ran  # refused before any compute
    assert main([*args, "--json", str(out), "--overwrite"]) == 0
    assert json.loads(out.read_text())["ranked_by"] == "probe" and ran


def test_the_cli_needs_no_eval_or_test_file(make_recipe, tmp_path, capsys, tiny_bert):
    """The README says select never reads data.eval or data.test, but the command checked their files: a recipe whose
    test file was not written yet was refused ('data.test.path=...: file not found'). data.train's is still checked."""
    make_recipe()
    args = ["select", str(tmp_path / "recipe.yaml"), "--candidates", str(tiny_bert), "--proxies", "probe", "--max-rows", "30",
            "--folds", "3", f"data.eval.path={tmp_path / 'missing-eval.tsv'}", f"data.test.path={tmp_path / 'missing-test.tsv'}"]
    assert main(args) == 0
    assert "data.eval and data.test were not read" in capsys.readouterr().out
    assert main([*args, f"data.train.path={tmp_path / 'missing-train.tsv'}"]) == 2
    err = capsys.readouterr().err
    assert "data.train.path=" in err and "file not found" in err and "missing-eval" not in err
    assert main([*args, "data.max_length=0"]) == 2  # the other rules still hold
    assert "data.max_length" in capsys.readouterr().err


@pytest.mark.parametrize("last", ["--candidates", "--methods", "--proxies"])
def test_an_override_after_any_list_option_is_an_override(make_recipe, tmp_path, last, tiny_bert):
    """`--proxies probe data.max_length=24` took the override as a proxy ('no such proxy'), where after --candidates or
    --methods it was recovered: after every list option of select it is an override."""
    make_recipe()
    options = {"--candidates": [str(tiny_bert)], "--methods": ["lora"], "--proxies": ["probe"]}
    args = [a for option, values in options.items() if option != last for a in (option, *values)]
    out = tmp_path / "select.json"
    assert main(["select", str(tmp_path / "recipe.yaml"), "--max-rows", "30", "--folds", "3", "--json", str(out), *args,
                 last, *options[last], "data.max_length=24"]) == 0
    settings = json.loads(out.read_text())["settings"]
    assert settings["overrides"] == ["data.max_length=24"]
    assert (settings["candidates"], settings["methods"], settings["proxies"]) == ([str(tiny_bert)], ["lora"], ["probe"])


def test_steps_is_checked_only_when_the_steps_proxy_runs(make_recipe, tiny_bert):
    """--steps 0 refused a selection by the probe alone, which takes no step."""
    (row,) = select(make_recipe(), [str(tiny_bert)], proxies=["probe"], steps=0, max_rows=30, folds=3)
    assert row.rank == 1
    with pytest.raises(SelectError, match="steps=0: the steps proxy needs at least 1 optimizer step"):
        select(make_recipe(), [str(tiny_bert)], proxies=["probe", "steps"], steps=0)


def test_json_records_each_proxy_once(make_recipe, tmp_path, tiny_bert):
    """--proxies probe probe ran the probe once and recorded [probe, probe] in --json's settings."""
    make_recipe()
    out = tmp_path / "select.json"
    assert main(["select", str(tmp_path / "recipe.yaml"), "--candidates", str(tiny_bert), "--proxies", "probe", "probe",
                 "--max-rows", "30", "--folds", "3", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["proxies"] == ["probe"] and list(report["rows"][0]["estimates"]) == ["probe"]


def test_the_sample_is_not_warned_about_as_an_evaluation_split_repeating_training_rows(make_recipe, tmp_path, caplog):
    """select warned that data.eval (the eval_holdout part of train) repeated training inputs, above a table saying
    data.eval was not read: the held-out part is no split select scores."""
    from peftlab import load_splits

    lines = ["sentence,label"] + [f"row {i % 20},{'ab'[i % 2]}" for i in range(40)]  # each input twice
    (tmp_path / "dup.csv").write_text("\n".join(lines) + "\n")
    recipe = make_recipe({"data.train": str(tmp_path / "dup.csv"), "data.eval": None, "data.eval_holdout": 0.25,
                          "data.label_names": "[a,b]"})
    with caplog.at_level("WARNING", logger="peftlab.data"):
        load_splits(recipe)
    assert "a training row's input" in caplog.text  # a training run is warned
    caplog.clear()
    with caplog.at_level("WARNING", logger="peftlab.data"):
        ds, _ = train_sample(recipe, 40)
    assert len(ds) == 30 and "a training row's input" not in caplog.text


@pytest.mark.parametrize("signum", [2, 15])  # SIGINT (Ctrl-C), SIGTERM
def test_a_signal_in_the_steps_proxy_stops_select_and_writes_nothing(make_recipe, tmp_path, capsys, monkeypatch, tiny_bert, signum):
    """A Ctrl-C or SIGTERM while the steps proxy trained became a failed cell (training raises TrainingInterrupted, an
    Exception): select went on to the next candidate, exited 0, replaced --json with a partial ranking, and told the user
    to --resume a temporary folder already deleted. It stops select: exit 130 / 143, --json as it was, no temporary folder."""
    import importlib
    import os
    import shutil
    import tempfile

    train_module = importlib.import_module("peftlab.train")
    make_recipe()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    out = tmp_path / "select.json"
    out.write_text("earlier results")
    stop_requested, sent = train_module.stop_requested, []

    def signalled(flag, accelerator):  # a real signal, during the first candidate's first optimizer step
        if not sent:
            sent.append(os.kill(os.getpid(), signum))
        return stop_requested(flag, accelerator)

    monkeypatch.setattr(train_module, "stop_requested", signalled)
    second = shutil.copytree(tiny_bert, tmp_path / "second")
    code = main(["select", str(tmp_path / "recipe.yaml"), "--candidates", str(tiny_bert), str(second), "--proxies", "probe",
                 "steps", "--steps", "3", "--max-rows", "30", "--folds", "3", "--json", str(out), "--overwrite"])
    captured = capsys.readouterr()
    assert code == 128 + signum and sent, captured.err
    assert out.read_text() == "earlier results" and not list(tmp.iterdir())  # the temporary folder (checkpoint and all) removed
    assert f"peftlab select was stopped ({'SIGINT' if signum == 2 else 'SIGTERM'}) while the steps proxy trained" in captured.err
    assert f"--json {out} was not written (the existing file is as it was)" in captured.err and "--resume" not in captured.err
    assert "failed" not in captured.err and "ranked by" not in captured.out  # no failed cell, no table


def test_an_interrupted_steps_proxy_is_not_a_failed_cell(make_recipe, monkeypatch, tiny_bert):
    """select() itself: the steps proxy's TrainingInterrupted propagates (with select's own message), not a failed row."""
    import importlib

    from peftlab.errors import TrainingInterrupted

    run_module = importlib.import_module("peftlab.run")

    def interrupted(recipe, **kwargs):
        raise TrainingInterrupted("interrupted at step 1 of 2: checkpoint saved to X. Continue with ... --resume", code=130)

    monkeypatch.setattr(run_module, "run", interrupted)
    with pytest.raises(TrainingInterrupted, match=r"stopped \(SIGINT\) while the steps proxy trained .* no ranking was made") as e:
        select(make_recipe(), [str(tiny_bert)], proxies=["probe", "steps"], steps=2, max_rows=30, folds=3)
    assert e.value.code == 130 and "--resume" not in str(e.value)


def test_the_steps_proxy_opens_no_tracker(make_recipe, tiny_bert, monkeypatch):
    """The steps proxy's runs opened the recipe's train.report_to: with wandb, throwaway runs named 'select' in the user's
    WANDB_DIR (online: uploaded), every steps cell failed without a wandb login; with auto, TensorBoard for each run."""
    import importlib

    run_module, trackers = importlib.import_module("peftlab.run"), importlib.import_module("peftlab.trackers")
    run, opened, ran = run_module.run, [], []
    monkeypatch.setattr(run_module, "run", lambda recipe, **k: ran.append(list(recipe.train.report_to)) or run(recipe, **k))
    resolve = trackers.resolve_trackers
    monkeypatch.setattr(trackers, "resolve_trackers", lambda report_to: opened.extend(resolve(report_to)) or resolve(report_to))
    for report_to in ("auto", "all", "tensorboard"):
        (row,) = select(make_recipe({"train.report_to": report_to}), [str(tiny_bert)], proxies=["steps"], steps=1, max_rows=30, folds=3)
        assert row.rank == 1 and not row.failures and not row.error
    assert ran == [["none"]] * 3 and opened == []


def test_nothing_ranked_is_said_and_each_proxys_note_only_where_it_ran(make_recipe, tmp_path, capsys, tiny_bert):
    """--rank-by logme where LogME failed for every row printed 'ranked by logme', every rank '-', exit 0 and wrote --json;
    'LogME: log evidence per row' was printed under a table without LogME (--proxies probe steps)."""
    from peftlab.select import format_table

    make_recipe()
    out = tmp_path / "select.json"
    args = ["select", str(tmp_path / "recipe.yaml"), "--candidates", str(tiny_bert), "minilm", "--max-rows", "48", "--folds", "3"]
    assert main([*args, "--proxies", "probe", "logme", "--rank-by", "logme", "--json", str(out)]) == 2  # 32, 384 dims: no LogME
    captured = capsys.readouterr()
    assert "nothing could be ranked: LogME failed for every candidate (why: above). --rank-by probe ranks by the probe acc" in captured.out
    assert "not ranked by logme" in captured.out and "nothing could be ranked" in captured.err and not out.exists()
    assert f"--json {out} was not written" in captured.err
    rows = select(make_recipe(), [str(tiny_bert)], proxies=["probe", "steps"], steps=1, max_rows=30, folds=3)
    table = format_table(rows, "probe")
    assert "LogME" not in table and "probe reads the frozen base" in table and "nothing could be ranked" not in table
    rows = select(make_recipe(), [str(tiny_bert)], proxies=["steps"], steps=1, max_rows=30, folds=3)
    assert "frozen base" not in format_table(rows, "steps") and "LogME" not in format_table(rows, "steps")


def test_a_candidate_that_is_a_finished_run_names_the_merged_folder(make_recipe, tmp_path):
    """A run folder (an adapter, no base) as a candidate said only "not a transformers model folder"."""
    run_dir = tmp_path / "a-run"
    run_dir.mkdir()
    for name in ("run.json", "adapter_config.json"):
        (run_dir / name).write_text("{}")
    with pytest.raises(ModelNotFound, match=f"It is a peftlab run's adapter: merge it \\(peftlab merge {run_dir}\\) and name {run_dir}/merged"):
        select(make_recipe(), [str(run_dir)])
