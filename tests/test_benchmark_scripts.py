"""The benchmark scripts' argument checks, stores and child processes: bad arguments fail at once with exit status 2 and
a message that says what to give; a failed run is one message, not a traceback; nothing here trains."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import REPO, load_benchmark, shared_or_skip

RESULTS = REPO / "benchmarks" / "results"


def script(name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """benchmarks/NAME.py ARGS in its own process, from the repository root."""
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{name}.py"), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)})


def refused(name: str, *args: str, says: str) -> None:
    """The script stops before any work: argparse's exit status 2, a message naming the problem, no traceback."""
    proc = script(name, *args)
    assert proc.returncode == 2, proc.stderr
    assert says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def transfer_row(task: str, method: str, fraction: float, seed: int, accuracy: float) -> dict:
    return {"task": task, "method": method, "fraction": fraction, "seed": seed, "train_rows": 10, "steps": 5, "split": "eval",
            "accuracy": accuracy, "macro_f1": accuracy, "trainable_params": 10, "total_params": 100, "weights_mib": 1.0,
            "train_wall_s": 1.0, "process_wall_s": 2.0, "peak_rss_mib": 100.0, "precision": "fp32", "torch_threads": 1}


# ------------------------------------------------------------------------------------------------ transfer_study.py

def test_transfer_study_fresh_replaces_only_the_runs_it_measures(tmp_path, monkeypatch):
    study = load_benchmark("transfer_study")
    accuracy = {"value": 0.5}
    monkeypatch.setattr(study, "run_one", lambda task, method, fraction, seed, args: transfer_row(task, method, fraction, seed,
                                                                                                  accuracy["value"]))
    monkeypatch.setattr(study, "plot", lambda summary, stem: [])
    argv = ["--tasks", "sst2", "--methods", "lora", "--fractions", "0.01", "--seeds", "1", "--results", str(tmp_path), "--name", "t"]
    assert study.main(argv) == 0
    store = tmp_path / "t.json"
    (key,) = {r["config"] for r in json.loads(store.read_text())["rows"]}
    others = [{**transfer_row("agnews", "full", 0.1, 0, 0.8), "config": key},  # another slice of the same study
              {**transfer_row("sst2", "lora", 0.01, 0, 0.7), "config": "another-budget"}]
    store.write_text(json.dumps({"rows": [*others, *json.loads(store.read_text())["rows"]]}))
    accuracy["value"] = 0.9
    assert study.main([*argv, "--fresh"]) == 0
    rows = json.loads(store.read_text())["rows"]
    assert rows[:2] == others  # kept
    assert [(r["task"], r["accuracy"]) for r in rows[2:]] == [("sst2", 0.9)]  # measured again, the old row replaced


@pytest.mark.parametrize(("args", "says"), [
    (["--tasks", "imdb"], "--tasks: unknown imdb; choose from sst2, agnews"),
    (["--methods", "lora,foo"], "--methods: unknown foo; choose from scratch, frozen, lora"),
    (["--fractions", "-0.5"], "--fractions: -0.5 out of range"),
    (["--fractions", "0.1,0"], "--fractions: 0 out of range"),
    (["--fractions", "1.5"], "> 0 and <= 1"),
    (["--fractions", "ten"], "expected comma-separated numbers"),
    (["--batch-size", "0"], "--batch-size 0: give at least 1 row per batch"),
    (["--seeds", "0"], "--seeds 0: give at least 1 seed"),
    (["--seeds-large", "-1"], "--seeds-large -1: give at least 1 seed"),
    (["--epochs", "0", "--min-steps", "0"], "--min-steps 0: give at least 1 optimizer step"),
    (["--epochs", "0"], "--epochs 0: give a positive number of passes"),
    (["--epochs", "inf"], "--epochs inf: give a positive number of passes"),  # (an OverflowError in steps_for)
    (["--max-steps", "0"], "--max-steps 0: give at least 1 optimizer step"),
    (["--min-steps", "50", "--max-steps", "10"], "--min-steps 50 --max-steps 10: the step floor is above the cap"),
    (["--eval-rows", "0"], "--eval-rows 0: give at least 1 row"),
])
def test_transfer_study_refuses_unknown_tasks_methods_and_fractions_out_of_range(tmp_path, monkeypatch, capsys, args, says):
    study = load_benchmark("transfer_study")
    monkeypatch.setattr(study, "run_one", lambda *a: pytest.fail("a run started"))
    with pytest.raises(SystemExit) as stop:
        study.main([*args, "--results", str(tmp_path)])
    assert stop.value.code == 2 and says in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("args", "floor", "cap"), [(["--max-steps", "50"], 50, 50), (["--min-steps", "2000"], 2000, 2000),
                                                    (["--quick", "--max-steps", "10"], 10, 10), ([], 100, 1000)])
def test_transfer_study_one_step_bound_given_moves_the_default_other(tmp_path, monkeypatch, args, floor, cap):
    study = load_benchmark("transfer_study")
    seen = []
    monkeypatch.setattr(study, "run_one", lambda task, method, fraction, seed, a: seen.append((a.min_steps, a.max_steps))
                        or transfer_row(task, method, fraction, seed, 0.5))
    monkeypatch.setattr(study, "plot", lambda summary, stem: [])
    assert study.main([*args, "--tasks", "sst2", "--methods", "lora", "--fractions", "0.01", "--seeds", "1",
                       "--results", str(tmp_path), "--name", "t"]) == 0
    assert seen == [(floor, cap)]


@pytest.mark.parametrize(("sets", "expected"), [([], ["data.max_length=64"]),
                                                (["train.lr=1e-4"], ["data.max_length=64", "train.lr=1e-4"]),
                                                (["data.max_length=32"], ["data.max_length=32"])])
def test_transfer_study_quick_keeps_its_max_length_next_to_the_users_set(tmp_path, monkeypatch, sets, expected):
    """--quick --set KEY=VALUE dropped the data.max_length=64 --quick promises."""
    study = load_benchmark("transfer_study")
    seen = []
    monkeypatch.setattr(study, "run_one", lambda task, method, fraction, seed, a: seen.append(list(a.set))
                        or transfer_row(task, method, fraction, seed, 0.5))
    monkeypatch.setattr(study, "plot", lambda summary, stem: [])
    assert study.main(["--quick", *(f"--set={item}" for item in sets), "--tasks", "sst2", "--methods", "lora", "--fractions", "0.01",
                       "--seeds", "1", "--results", str(tmp_path), "--name", "t"]) == 0
    assert seen == [expected]


def test_transfer_study_writes_its_tables_and_figures_atomically(tmp_path, monkeypatch):
    """The .csv was opened with "w" (emptied before its rows were written), the -params.png saved in place: a failure
    while writing them lost the previous results."""
    import csv

    import matplotlib.figure

    study = load_benchmark("transfer_study")
    monkeypatch.setattr(study, "run_one", lambda task, method, fraction, seed, a: transfer_row(task, method, fraction, seed, 0.5))
    targets, savefig = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, path, **kw: targets.append(os.fspath(path)) or savefig(fig, path, **kw))
    argv = ["--tasks", "sst2", "--methods", "lora", "--fractions", "0.01", "--seeds", "1", "--results", str(tmp_path), "--name", "t"]
    assert study.main(argv) == 0
    assert {os.path.basename(t) for t in targets} == {".t-curves.tmp.png", ".t-params.tmp.png"}  # then renamed into place
    assert (tmp_path / "t-curves.png").is_file() and (tmp_path / "t-params.png").is_file()
    before = (tmp_path / "t.csv").read_text()

    def broken(self, rows):
        raise OSError("disk full")

    monkeypatch.setattr(csv.DictWriter, "writerows", broken)
    with pytest.raises(OSError, match="disk full"):
        study.main([*argv, "--fresh"])
    assert (tmp_path / "t.csv").read_text() == before


def test_transfer_study_goes_on_past_a_failed_run(tmp_path, monkeypatch, capsys):
    common, study = load_benchmark("common"), load_benchmark("transfer_study")

    def run_one(task, method, fraction, seed, args):
        if method == "frozen":
            raise common.RunFailed(f"[{method}] failed (exit 2): error: boom")
        return transfer_row(task, method, fraction, seed, 0.5)

    monkeypatch.setattr(study, "run_one", run_one)
    monkeypatch.setattr(study, "plot", lambda summary, stem: [])
    assert study.main(["--tasks", "sst2", "--methods", "frozen,lora", "--fractions", "0.01", "--seeds", "1",
                       "--results", str(tmp_path), "--name", "t"]) == 1
    assert [r["method"] for r in json.loads((tmp_path / "t.json").read_text())["rows"]] == ["lora"]
    assert "1 run(s) failed" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ classification.py

@pytest.mark.parametrize(("args", "says"), [
    (["--tasks", "imdb"], "--tasks: unknown imdb; choose from sst2, agnews"),
    (["--methods", "dora"], "--methods: unknown dora; choose from lora, qlora, full, frozen"),
    (["--quick", "--sst2-train", "-5"], "--sst2-train -5: give at least 1 row"),
    (["--quick", "--epochs", "-1"], "--epochs -1: give a positive number"),
    (["--quick", "--epochs", "inf"], "--epochs inf: give a positive number"),
])
def test_classification_refuses_bad_arguments_before_any_run(args, says):
    # (lora:bogus.key: were the check missing, the child would fail at once, not train)
    refused("classification", "--tasks", "sst2", "--methods", "lora", *args, "--set", "lora:bogus.key=1", "--name", "never-written",
            says=says)
    assert not (RESULTS / "never-written.json").exists()


def test_classification_quick_records_the_rows_and_epochs_it_trains(tmp_path, monkeypatch):
    bench = load_benchmark("classification")
    seen = []

    def train_process(name, recipe, overrides, out, *, verbose=False):
        seen.append(overrides)
        run = {"metrics": {"eval": {"accuracy": 0.5, "f1": 0.5}}, "trainable_params": 1, "total_params": 2, "trainable_percent": 50.0,
               "train_examples": 300, "train_wall_s": 10.0, "examples_per_s": 30.0, "tokens_per_s": 300.0, "precision": "fp32",
               "hardware": {}, "versions": {"torch": "x", "transformers": "x", "peft": "x"}}
        return run, 100.0, 12.0

    monkeypatch.setattr(bench, "train_process", train_process)
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    monkeypatch.setattr(bench, "plot", lambda rows, path: None)
    monkeypatch.setattr(sys, "argv", ["classification.py", "--quick", "--tasks", "sst2", "--methods", "lora", "--sst2-train", "5000",
                                      "--epochs", "3"])
    bench.main()
    (row,) = json.loads((tmp_path / "classification-quick.json").read_text())["rows"]
    assert (row["config"]["sst2_train"], row["config"]["epochs"]) == (300, 1.0) and row["wall_per_epoch_s"] == 10.0
    assert "data.train.max_samples=300" in seen[0] and "train.epochs=1.0" in seen[0]
    assert not any(o in seen[0] for o in ("data.train.max_samples=5000", "train.epochs=3.0"))
    md = (tmp_path / "classification-quick.md").read_text()  # the .md says it too (it read as the full benchmark's table)
    assert md.startswith("SST-2: 300 seeded train rows") and "--quick: 300 train rows and 200 rows of the split scored" in md
    assert "Report written " in md and "torch x, transformers x, peft x." in md


def test_classification_report_marks_rows_of_other_settings_and_draws_no_bar_for_a_missing_case(tmp_path, monkeypatch):
    """A rerun of one case kept the other stored rows, measured with other settings, in the same table and plot with
    nothing to tell them apart; a case never measured (AG News QLoRA) was drawn as a bar labelled 0."""
    bench = load_benchmark("classification")
    run = {"metrics": {"eval": {"accuracy": 0.5, "f1": 0.5}}, "trainable_params": 1, "total_params": 2,
           "trainable_percent": 50.0, "train_examples": 300, "train_wall_s": 10.0, "examples_per_s": 30.0, "tokens_per_s": 300.0,
           "precision": "fp32", "hardware": {}, "versions": {"torch": "x", "transformers": "x", "peft": "x"}}
    monkeypatch.setattr(bench, "train_process", lambda *a, **k: (run, 100.0, 12.0))
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    drawn, plot = {}, bench.plot
    monkeypatch.setattr(bench, "plot", lambda rows, path: drawn.update(rows=rows))
    for args in (["--methods", "lora,full"], ["--methods", "lora", "--agnews-max-length", "32"]):
        monkeypatch.setattr(sys, "argv", ["classification.py", "--quick", "--tasks", "sst2", *args])
        bench.main()
    md = (tmp_path / "classification-quick.md").read_text()
    assert "sst2/full: measured with other settings (agnews_max_length 64 instead of agnews_max_length 32" in md
    assert "sst2/lora: measured" not in md
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    labels = []
    monkeypatch.setattr(Axes, "bar_label", lambda self, bars, **kw: labels.append(kw.get("labels")))
    plot(drawn["rows"], tmp_path / "p.png")
    accuracy = labels[0]  # the first panel, its one task: a label for lora and full, none for the methods not measured
    assert len(accuracy) == len(bench.METHODS) and sorted(accuracy) == [""] * (len(bench.METHODS) - 2) + ["50.0", "50.0"]


# ------------------------------------------------------------------------------------------------ reports over every seed

@pytest.mark.parametrize(("args", "says"), [
    (["--seeds", "a,b", "--transfer"], "--seeds 'a,b': expected comma-separated integers"),
    (["--steps", "0"], "--steps 0: give at least 1 optimizer step"),
    (["--conditions", "multi-shared,singel"], "--conditions: unknown ['singel']"),
])
def test_multitask_refuses_bad_arguments_before_any_work(args, says):
    """--seeds a,b was a traceback; --steps 0 trained a run of no step (and stored it: the report grew a '0 optimizer
    steps' table); a misspelled condition measured nothing and rewrote multitask.md."""
    refused("multitask", *args, says=says)


def test_multitask_report_covers_every_stored_seed(monkeypatch):
    """`multitask.py --report` (its --seeds left at 0) writes the committed multitask.md again, 5-seed table included."""
    bench = load_benchmark("multitask")
    written = {}
    monkeypatch.setattr(bench, "write_result", lambda path, text: written.update({path: text}))
    monkeypatch.setattr(sys, "argv", ["multitask.py", "--report"])
    bench.main()
    assert written == {RESULTS / "multitask.md": (RESULTS / "multitask.md").read_text()}
    assert "| 5 |" in written[RESULTS / "multitask.md"]


def test_domain_adaptation_report_covers_every_stored_seed(monkeypatch):
    """`domain_adaptation.py --report` (or a slice measured with --seeds 1) writes the committed 3-seed report again."""
    shared_or_skip("data", "amazon_mdsd", "unlabelled")
    bench = load_benchmark("domain_adaptation")
    written, plotted = {}, []
    monkeypatch.setattr(bench, "write_result", lambda path, text: written.update({path: text}))
    monkeypatch.setattr(bench, "plot", lambda results, seeds, path: plotted.append(seeds))
    monkeypatch.setattr(sys, "argv", ["domain_adaptation.py", "--report", "--seeds", "1"])
    bench.main()
    assert written == {RESULTS / "domain_adaptation.md": (RESULTS / "domain_adaptation.md").read_text()}
    assert plotted == [[0, 1, 2]]


def test_the_stored_seeds_of_a_domain_adaptation_store(tmp_path, monkeypatch):
    bench = load_benchmark("domain_adaptation")
    for name in ("source-books-dvd-s0", "source-books-dvd-s2", "mlm-books+dvd-s10", "indomain-dvd-fold0of5-s1", "notes"):
        (tmp_path / f"{name}.json").write_text("{}")
    monkeypatch.setattr(bench, "OUT", tmp_path)
    assert bench.stored_seeds() == [0, 1, 2, 10]


@pytest.mark.parametrize(("pairs", "says"), [
    ("books", "--pairs books: each pair is SOURCE:TARGET, two different domains"),
    ("books:dvd,books:dvd:kitchen", "--pairs books:dvd:kitchen: each pair is SOURCE:TARGET"),
    ("books:books", "--pairs books:books: each pair is SOURCE:TARGET, two different domains"),
])
def test_domain_adaptation_refuses_pairs_that_are_not_two_different_domains(pairs, says):
    # (bogus.key: were the check missing, the child would fail at once, not train)
    refused("domain_adaptation", "--pairs", pairs, "--conditions", "source", "--finetune", "bogus.key=1", "--tag", "never-written",
            says=says)
    assert not (RESULTS / "domain_adaptation-never-written.md").exists()


# ------------------------------------------------------------------------------------------------ distillation.py

def distillation(tmp_path, monkeypatch):
    """benchmarks/distillation.py with its runs and results under tmp_path, and nothing that trains or times."""
    bench = load_benchmark("distillation")
    monkeypatch.setattr(bench, "RUNS", tmp_path / "runs" / "distill-bench")
    monkeypatch.setattr(bench, "OUT", tmp_path / "results" / "distillation")
    monkeypatch.setattr(bench, "stored_case", lambda *a, **k: pytest.fail("trained"))
    monkeypatch.setattr(bench, "speed", lambda *a, **k: pytest.fail("timed"))
    return bench


def distill_result(accuracy: float, **more) -> dict:
    return {"metrics": {"test": {"accuracy": accuracy}}, "trainable_params": 1e6, "total_params": 2e6, "trainable_percent": 50.0,
            "steps": 10, **more}


@pytest.mark.parametrize(("args", "says"), [
    (["--fractions", "0"], "--fractions: 0 out of range; a percent of the train rows is > 0 and <= 100"),
    (["--fractions", "100,150"], "--fractions: 150 out of range"),
    (["--fractions", "ten"], "--fractions ten: expected comma-separated percents"),
    (["--fractions="], "--fractions : expected comma-separated percents"),  # (it meant the default, and trained)
    (["--smoke", "--fractions="], "--fractions : expected comma-separated percents"),
    (["--train-rows", "-5"], "--train-rows -5: give at least 1 row, or 0"),
    (["--requests", "0"], "--requests 0: give at least 1 single request"),
    (["--smoke", "--requests", "-1"], "--requests -1: give at least 1"),
    (["--speed-rows", "-2"], "--speed-rows -2: give at least 1 test row"),
    (["--extra-layers", "two"], "--extra-layers two: expected comma-separated layer counts"),
])
def test_distillation_refuses_bad_arguments_before_any_run(tmp_path, monkeypatch, capsys, args, says):
    bench = distillation(tmp_path, monkeypatch)
    monkeypatch.setattr(bench, "report", lambda *a: pytest.fail("reported"))
    monkeypatch.setattr(sys, "argv", ["distillation.py", *args, "--stages", "report", "--tag", "never-written"])
    with pytest.raises(SystemExit) as stop:
        bench.main()
    assert stop.value.code == 2 and says in capsys.readouterr().err
    assert not tmp_path.joinpath("results").exists()


@pytest.mark.parametrize(("args", "fractions", "rows"), [(["--smoke"], [10.0, 100.0], 400),
                                                         (["--smoke", "--fractions", "50"], [50.0], 400),
                                                         (["--fractions", "20,5", "--train-rows", "0"], [20.0, 5.0], 0)])
def test_distillation_smoke_keeps_the_fractions_given(tmp_path, monkeypatch, args, fractions, rows):
    """--smoke overwrote --fractions with 10,100 (its other sizes already kept what was given)."""
    bench = distillation(tmp_path, monkeypatch)
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "run.json").write_text(json.dumps(distill_result(0.9)))
    seen = []
    monkeypatch.setattr(bench, "students", lambda t, a: seen.append((a.fractions, a.train_rows)))
    monkeypatch.setattr(sys, "argv", ["distillation.py", *args, "--teacher", str(teacher), "--stages", "students"])
    bench.main()
    assert seen == [(fractions, rows)]


def test_distillation_report_reads_the_teacher_given_with_teacher(tmp_path, monkeypatch):
    """With --teacher RUN and a new --tag the report read only the stored teacher stage (there is none): every "kept
    (best)" cell was nan%."""
    bench = distillation(tmp_path, monkeypatch)
    teacher = tmp_path / "my-teacher"
    teacher.mkdir()
    (teacher / "run.json").write_text(json.dumps(distill_result(0.8, train_wall_s=120.0)))
    out = tmp_path / "results" / "distillation-new"
    out.mkdir(parents=True)
    monkeypatch.setattr(bench, "OUT", out)
    monkeypatch.setattr(bench, "BASE_OUT", out)
    for name, acc in (("labels-100", 0.6), ("distill-100", 0.7)):
        (out / f"{name}.json").write_text(json.dumps({"name": name, "run": distill_result(acc), "process_wall_s": 60.0}))
    (out / "teacher.json").write_text(json.dumps({"name": "teacher", "run": distill_result(0.5), "process_wall_s": 60.0}))  # not it
    text = bench.report(argparse.Namespace(teacher=str(teacher), teacher_name=str(teacher), teacher_overrides=[], fractions=[100.0],
                                           extra_layers=[], smoke=False, student=[], train_rows=None))
    assert "| 60.00 | 70.00 | - | 87.5% |" in text and "nan" not in text
    assert "Teacher: 80.00 accuracy" in text and "2.0 min (training, the run given with --teacher)" in text


def test_distillation_report_says_what_its_runs_were_measured_with(tmp_path, monkeypatch):
    """A --smoke (or --train-rows) report read as the full benchmark: its teacher line lacked the overrides the teacher
    was trained with (the row subset, 4 steps), "SST-2 dev" was 32 rows, "100%" was of a 400-row subset, no host or date."""
    bench = distillation(tmp_path, monkeypatch)
    out = tmp_path / "results" / "distillation-smoke"
    out.mkdir(parents=True)
    monkeypatch.setattr(bench, "OUT", out)
    monkeypatch.setattr(bench, "BASE_OUT", out)
    trained = ["data.train.path=rows-400.tsv", *bench.SMOKE, "adapter.r=16"]
    host = {"cpu": "Test CPU 9000", "cpu_native_bf16": True, "torch_threads": 3}
    (out / "teacher.json").write_text(json.dumps({"name": "teacher", "overrides": trained, "process_wall_s": 60.0,
                                                  "run": distill_result(0.8, hardware=host, versions={"torch": "9.9"})}))
    text = bench.report(argparse.Namespace(teacher=None, teacher_name="recipes/t.yaml", teacher_overrides=["adapter.r=16"],
                                           fractions=[100.0], extra_layers=[], smoke=True, student=["train.lr=1e-3"], train_rows=400))
    assert f"Teacher: `recipes/t.yaml` {' '.join(trained)}." in text
    assert "train.max_steps=4" in text.split("Students:")[1].splitlines()[0] and "train.lr=1e-3" in text
    assert "the first 400 train rows (--train-rows): the percents below are of those" in text
    assert f"on {bench.SMOKE_TEST_ROWS} rows of {bench.TASK.test_name} (--smoke: a check that it runs, not a measurement)" in text
    assert "measured on Test CPU 9000 (native bf16), 3 torch threads, torch 9.9." in text


@pytest.mark.parametrize("timed", [["teacher", "student", "student-l2"], ["teacher", "student", "student-lora"]])
def test_distillation_speed_note_names_only_the_rows_timed(tmp_path, monkeypatch, timed):
    """The note on student-lora was written under every speed table, also those without its row (SST-2, emotion)."""
    bench = distillation(tmp_path, monkeypatch)
    out = tmp_path / "results" / "distillation"
    out.mkdir(parents=True)
    monkeypatch.setattr(bench, "BASE_OUT", out)
    for name in timed:
        (out / f"speed-{name}.json").write_text(json.dumps({"name": name, "examples_per_s": 100.0, "p50_ms": 10.0, "params": 1e6,
                                                            "layers": 3, "threads": 2, "rows": 872}))
    text = bench.report(argparse.Namespace(teacher=None, teacher_name="t", teacher_overrides=[], fractions=[100.0],
                                           extra_layers=[2], smoke=False, student=[], train_rows=None))
    assert ("student-lora, the 6-layer LoRA student" in text) == ("student-lora" in timed)
    assert "each model merged into a plain transformers model" in text


# ------------------------------------------------------------------------------------------------ the other scripts

@pytest.mark.parametrize(("args", "says"), [
    (["--repeats", "0"], "--repeats 0: give at least 1 peftlab/Trainer pair per case"),
    (["--steps", "0"], "--steps 0: give at least 1 optimizer step"),
    (["--threads", "0"], "--threads 0: give at least 1 torch thread"),
    (["--eval-every", "0"], "--eval-every 0: give at least 1 step between evaluations"),
    (["--rows", "-1"], "--rows -1: give at least 1 SST-2 train row"),
    (["--eval-rows", "-5"], "--eval-rows -5: give at least 1 dev row, or 0 for all 872"),
    (["--memory-steps", "0"], "--memory-steps 0: give at least 1"),
    (["--s2s-rows", "0"], "--s2s-rows 0: give at least 1"),
    (["--s2s-steps", "-2"], "--s2s-steps -2: give at least 1"),
    (["--s2s-test", "0"], "--s2s-test 0: give at least 1"),
    (["--ablation-steps", "0"], "--ablation-steps 0: give at least 1 step"),
    (["--target", "1.5"], "--target 1.5: give a dev accuracy > 0 and <= 1"),
    (["--quick", "--steps", "0"], "--steps 0: give at least 1 optimizer step"),  # --quick replaced the sizes given with its own
    (["--quick", "--s2s-test", "0"], "--s2s-test 0: give at least 1"),
])
def test_throughput_refuses_bad_sizes_before_any_work(tmp_path, monkeypatch, capsys, args, says):
    """--repeats 0 measured nothing and replaced the stored results with an empty table; --steps 0 (a division by zero
    after training), --threads 0 and --eval-every 0 were tracebacks. --quick keeps the sizes given (it replaced them)."""
    bench = load_benchmark("throughput")
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    monkeypatch.setattr(bench, "gemm_peak", lambda *a: pytest.fail("measured"))
    monkeypatch.setattr(sys, "argv", ["throughput.py", *args, "--precision", "fp32", "--name", "never-written"])
    with pytest.raises(SystemExit) as stop:
        bench.main()
    assert stop.value.code == 2 and says in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("epochs", ["inf", "nan", "0"])
def test_summarization_refuses_epochs_that_are_not_a_finite_positive_number(monkeypatch, capsys, epochs):
    bench = load_benchmark("summarization")
    monkeypatch.setattr(bench, "train_model", lambda *a: pytest.fail("trained"))
    monkeypatch.setattr(sys, "argv", ["summarization.py", "--epochs", epochs, "--name", "never-written"])
    with pytest.raises(SystemExit) as stop:
        bench.main()
    assert stop.value.code == 2 and f"--epochs {epochs}: give a positive number of passes" in capsys.readouterr().err


def test_sft_throughput_refuses_no_rows_before_measuring():
    refused("sft_throughput", "--rows", "-3", says="--rows -3 --eval-rows 64: each needs at least 1 dialogue")


def test_sft_throughput_without_trl_stops_before_any_work_when_a_side_needs_it(tmp_path, monkeypatch, capsys):
    """With trl among the sides (the default) and TRL not installed, the missing module surfaced after peftlab's whole run."""
    import importlib.util

    bench = load_benchmark("sft_throughput")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else find_spec(name, *a))
    monkeypatch.setattr(bench, "gemm_peak", lambda *a: pytest.fail("measured"))
    monkeypatch.setattr(bench, "run_pair", lambda *a: pytest.fail("trained"))
    monkeypatch.setattr(sys, "argv", ["sft_throughput.py", "--seeds", "0"])
    with pytest.raises(SystemExit) as stop:
        bench.main()
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "trl, trl-packed need(s) TRL, which is not installed" in err and "pip install -e .[bench]" in err
    monkeypatch.setattr(bench, "report", lambda: "table")  # peftlab alone does not need it
    monkeypatch.setattr(bench, "gemm_peak", lambda *a: {"peak_gflops": 1.0, "precision": "fp32"})
    monkeypatch.setattr(bench, "run_pair", lambda *a: None)
    monkeypatch.setattr(sys, "argv", ["sft_throughput.py", "--sides", "peftlab"])
    bench.main()


def test_sft_answer_loss_scores_the_answer_and_its_end_of_turn_token_only(tmp_path, monkeypatch, chat_llama):
    """The labels ran to the end of the rendered conversation: SmolLM2's newline after <|im_end|> (which peftlab never
    trains) was scored too. Here a template writes '|' after each turn's end (the WordPiece tokenizer has no newline):
    the loss is over exactly the tokens peftlab labels."""
    import shutil

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import peftlab.accel
    from peftlab.tasks import sft

    model_dir = shutil.copytree(chat_llama, tmp_path / "model")
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = sft.NAMED_TEMPLATES["chatml"].replace("<|im_end|>\n", "<|im_end|>|\n")
    tok.save_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")
    bench = load_benchmark("sft_throughput")
    monkeypatch.setattr(bench, "recipe_parts", lambda: (None, model_dir))
    monkeypatch.setattr(peftlab.accel, "resolve_precision", lambda *a: "fp32")
    rows = [bench.chat({"dialogue": d, "summary": s}, "Summarize: {source}") for d, s in [("hi there", "a greeting"), ("bye now", "leaving")]]
    total, count = 0.0, 0
    for r in rows:  # peftlab's labels: the answer and <|im_end|>, not the '|' after it
        row = sft.encode(tok, r["prompt"] + r["completion"], 512)
        labels = torch.tensor(row["labels"][1:])
        assert tok.convert_ids_to_tokens(row["input_ids"][-1]) == "|" and labels[-1] == -100
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1]
        total += torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
        count += int((labels != -100).sum())
    assert bench.answer_loss(tmp_path / "adapter", rows) == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize(("args", "says"), [(["--batches", "6", "--warmup", "6"], "give --batches greater than --warmup"),
                                            (["--batches", "4", "--warmup", "-1"], "--warmup >= 0")])
def test_step_levers_refuses_no_timed_batches_up_front(args, says):
    refused("step_levers", *args, "--recipe", "missing.yaml", "--name", "never-written", says=says)  # checked before the recipe


@pytest.mark.parametrize(("args", "says"), [
    (["--recipe", "missing.yaml"], "--recipe missing.yaml --overrides data.train.max_samples=6000: invalid recipe"),
    (["--overrides", "data.train.max_samples=0"], "data.train.max_samples=0: must be >= 1"),
])
def test_step_levers_refuses_a_bad_recipe_in_one_message(monkeypatch, capsys, args, says):
    """A missing recipe or a bad override was a ConfigError traceback."""
    bench = load_benchmark("step_levers")
    monkeypatch.setattr(sys, "argv", ["step_levers.py", *args, "--name", "never-written"])
    with pytest.raises(SystemExit) as stop:
        bench.main()
    assert stop.value.code == 2 and says in capsys.readouterr().err


def test_step_levers_says_how_many_batches_the_data_gave(tmp_path, monkeypatch, capsys, tiny_bert, sentiment_files):
    """Data with fewer batches than the warm-up: an error before any step, not a division by zero after them all."""
    bench = load_benchmark("step_levers")
    monkeypatch.setattr(bench, "levers", lambda *a, **k: pytest.fail("stepped"))
    monkeypatch.setattr(sys, "argv", ["step_levers.py", "--batches", "20", "--warmup", "6", "--name", "never-written", "--overrides",
                                      f"model.name={tiny_bert}", f"data.train.path={sentiment_files['train']}",
                                      "data.train.max_samples=64", "data.max_length=32"])
    with pytest.raises(SystemExit) as stop:
        bench.main()
    assert stop.value.code == 2 and "the data gave 2 training batch(es), none left to time after --warmup 6" in capsys.readouterr().err


def test_step_levers_times_the_trimmed_layer_against_the_full_one(tmp_path, monkeypatch, tiny_bert, sentiment_files):
    """The skip-unread lever needs the layers trimmed as train() trims them (setup no longer does): the lever is there,
    and it switches the trimmed forward off and on again."""
    bench = load_benchmark("step_levers")
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    monkeypatch.setattr(sys, "argv", ["step_levers.py", "--batches", "3", "--warmup", "1", "--name", "t", "--levers",
                                      "skip unread positions", "--overrides", f"model.name={tiny_bert}",
                                      f"data.train.path={sentiment_files['train']}", "data.train.max_samples=48", "data.max_length=32"])
    bench.main()
    rows = json.loads((tmp_path / "step_levers-t.json").read_text())["rows"]
    assert [r["lever"] for r in rows] == ["skip unread positions"] and all(r["speedup"] > 0 for r in rows)


@pytest.mark.parametrize(("name", "argv", "stem"), [("step_levers", ["--levers", "uint8 masks", "--batches", "4", "--warmup", "1"], "step_levers-sst2"),
                                                   ("generation", [], "generation"),
                                                   ("summarization", ["--train", "100", "--name", "summarization-full"], "summarization-full")])
def test_a_benchmark_never_silently_replaces_stored_results(tmp_path, monkeypatch, capsys, name, argv, stem):
    """A partial step_levers run under the default --name replaced the committed step_levers-sst2.{json,md}; the
    refusal comes before any work, names --name and --overwrite, and leaves the files as they were."""
    bench = load_benchmark(name)
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    (tmp_path / f"{stem}.md").write_text("committed\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    (run / "recipe.yaml").write_text((REPO / "recipes" / "smollm2-135m" / "samsum-sft-lora.yaml").read_text())
    import peftlab

    monkeypatch.setattr(peftlab, "evaluate", lambda *a, **k: pytest.fail("evaluated"))
    argv = [*argv, "--run", str(run)] if name == "generation" else argv
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv])
    with pytest.raises(SystemExit) as stop:
        bench.main()
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"{stem}.md exists already" in err and "--name NEW" in err and "--overwrite" in err, err
    assert (tmp_path / f"{stem}.md").read_text() == "committed\n" and not (tmp_path / f"{stem}.json").exists()
    bench.refuse_replacing(None, [tmp_path / f"{stem}.md"], overwrite=True)  # --overwrite: let through (p unused)


def test_heap_probe_writes_out_only_for_a_run_that_succeeded(tmp_path, capsys):
    probe = load_benchmark("heap_probe")
    out = tmp_path / "probe.json"
    out.write_text("a good measurement\n")
    for args in (["--out", str(out)], [f"--out={out}"]):  # (--out=FILE went to `peftlab train`)
        result = probe.main([*args, str(tmp_path / "missing.yaml")])
        assert result["exit"] != 0 and result["args"] == [str(tmp_path / "missing.yaml")] and out.read_text() == "a good measurement\n"
        assert f"{out} not written: the run failed" in capsys.readouterr().err


def test_heap_probe_arguments():
    refused("heap_probe", "missing.yaml", "--out", says="--out: expected a FILE after it")
    refused("heap_probe", "missing.yaml", "--out=", says="--out: expected a FILE after it")
    refused("heap_probe", says="RECIPE: give the recipe to probe")  # (it trained the 250-step quickstart into runs/)
    refused("heap_probe", "train.max_steps=3", "--overwrite", says="RECIPE: give the recipe to probe")
    usage = script("heap_probe", "-h")
    assert usage.returncode == 0 and "usage: heap_probe.py [--out FILE] RECIPE" in usage.stdout and "--out FILE" in usage.stdout


def test_generation_without_its_run_says_how_to_make_it(tmp_path):
    refused("generation", "--run", str(tmp_path / "samsum-lora"), says="python benchmarks/llm.py --cases samsum-lora` first, or pass --run")


@pytest.mark.parametrize(("recipe", "args", "says"), [
    ("smollm2-135m/samsum-sft-lora.yaml", ["--rows", "0"], "--rows 0: give at least 1 test row"),
    ("smollm2-135m/samsum-sft-lora.yaml", ["--batch", "-2"], "--batch -2: give at least 1 row per batch"),
    ("smollm2-135m/samsum-sft-lora.yaml", ["--overrides", "nope.key=1"], "--overrides nope.key=1: invalid recipe"),
    ("minilm/sst2-lora.yaml", [], "a classification run; generation is timed on a generating run: give a finished SFT run"),
])
def test_generation_refuses_bad_arguments_and_runs_that_do_not_generate(tmp_path, monkeypatch, capsys, recipe, args, says):
    """Each was a traceback naming recipe keys; a classification run failed with KeyError 'generation' after a whole
    evaluation."""
    import peftlab

    bench = load_benchmark("generation")
    monkeypatch.setattr(peftlab, "evaluate", lambda *a, **k: pytest.fail("evaluated"))
    (tmp_path / "run.json").write_text("{}")
    (tmp_path / "recipe.yaml").write_text((REPO / "recipes" / recipe).read_text())
    monkeypatch.setattr(sys, "argv", ["generation.py", "--run", str(tmp_path), *args, "--name", "never-written"])
    with pytest.raises(SystemExit) as stop:
        bench.main()
    assert stop.value.code == 2 and says in capsys.readouterr().err


def test_model_selection_goes_on_past_a_failed_run(monkeypatch, tmp_path, capsys):
    common, bench = load_benchmark("common"), load_benchmark("model_selection")
    ran = []

    def truth(setting, *a):
        ran.append(setting)
        raise common.RunFailed(f"[{setting}/x] failed (exit 2): error: boom")

    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    monkeypatch.setattr(bench, "write_recipe", lambda folder, setting, b: folder / "recipe.yaml")
    monkeypatch.setattr(bench, "truth", truth)
    monkeypatch.setattr(bench, "report", lambda root, name: "report")
    monkeypatch.setattr(sys, "argv", ["model_selection.py", "--cases", "sst2,agnews", "--stage", "truth"])
    assert bench.main() == 1 and ran == ["sst2", "agnews"]
    assert "failed: ['sst2', 'agnews']" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ common.measured_process

def test_a_failed_child_is_one_message_and_exit_status_1():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from benchmarks.common import measured_process; "
            "measured_process('case', [sys.executable, '-c', 'import sys; sys.exit(\"error: boom\")'])")
    proc = subprocess.run([sys.executable, "-c", code, str(REPO)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr == "[case] failed (exit 1): error: boom\n"


def child_script(tmp_path, ignore_term: bool = False) -> tuple[list[str], object]:
    """A child that writes its pid, then sleeps for a minute (ignoring SIGTERM if asked)."""
    pid_file = tmp_path / "child.pid"
    code = ("import os, signal, sys, time\n" + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if ignore_term else "")
            + f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)\n")
    return [sys.executable, "-c", code], pid_file


def wait_for_pid(pid_file) -> int:
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text()):
        assert time.monotonic() < deadline, "the child never started"
        time.sleep(0.05)
    return int(pid_file.read_text())


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    os.kill(pid, signal.SIGKILL)  # (the test fails; the child does not outlive it)
    return False


@pytest.mark.parametrize("ignore_term", [False, True])
def test_a_benchmark_that_raises_ends_its_child(tmp_path, monkeypatch, ignore_term):
    """An exception while the child runs (here Ctrl-C) terminates it; one that ignores SIGTERM is killed after the grace."""
    common = load_benchmark("common")
    cmd, pid_file = child_script(tmp_path, ignore_term)

    def interrupted(pid, options):
        wait_for_pid(pid_file)
        raise KeyboardInterrupt

    monkeypatch.setattr(common.os, "wait4", interrupted)
    handler = signal.getsignal(signal.SIGTERM)
    start = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            common.measured_process("case", cmd, grace_s=0.5)
    finally:
        ended = gone(int(pid_file.read_text()))
    assert ended and time.monotonic() - start < 30
    assert signal.getsignal(signal.SIGTERM) == handler  # put back


def test_a_benchmark_stopped_by_sigterm_ends_its_child(tmp_path):
    cmd, pid_file = child_script(tmp_path)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from benchmarks.common import measured_process; "
            f"measured_process('case', {cmd!r})")
    bench = subprocess.Popen([sys.executable, "-c", code, str(REPO)], stderr=subprocess.PIPE, text=True)
    try:
        wait_for_pid(pid_file)
        bench.send_signal(signal.SIGTERM)
        status, err = bench.wait(30), bench.stderr.read()
    finally:
        bench.kill()
        bench.wait()
        ended = not pid_file.exists() or gone(int(pid_file.read_text()))
    assert status == 1 and "stopped by signal 15" in err and ended


def test_a_second_sigterm_does_not_abandon_the_child(tmp_path):
    """`timeout` signals the benchmark and its whole group: a second SIGTERM during the grace wait ended the benchmark
    there, before its SIGKILL, and a child that ignores SIGTERM outlived it."""
    pid_file, termed = tmp_path / "child.pid", tmp_path / "termed"
    child = ("import os, signal, time\n"
             f"signal.signal(signal.SIGTERM, lambda *a: open({str(termed)!r}, 'w').close())\n"  # noted, and ignored
             f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)\n")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from benchmarks.common import measured_process; "
            f"measured_process('case', {[sys.executable, '-c', child]!r}, grace_s=1)")
    bench = subprocess.Popen([sys.executable, "-c", code, str(REPO)], stderr=subprocess.PIPE, text=True)
    try:
        pid = wait_for_pid(pid_file)
        bench.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while not termed.exists():  # the benchmark is in its grace wait
            assert time.monotonic() < deadline, "the child was never terminated"
            time.sleep(0.05)
        bench.send_signal(signal.SIGTERM)
        status, err = bench.wait(30), bench.stderr.read()
    finally:
        bench.kill()
        bench.wait()
    assert gone(pid) and status == 1 and "stopped by signal 15" in err


def test_multitask_transfer_rows_read_every_stored_seed(monkeypatch, tmp_path):
    """transfer_rows reads the seeds from the store: seeds 0-2 stored, a report asked with --seeds 0 shows all three."""
    bench = load_benchmark("multitask")
    monkeypatch.setattr(bench, "OUT", tmp_path)
    for origin, acc in (("base", 0.5), ("multi", 0.6)):
        for seed in range(3):
            run = {"task": "classification", "steps": 150, "train_wall_s": 60.0,
                   "metrics": {"test": {"accuracy": acc + seed / 100, "f1": acc}}}
            (tmp_path / f"transfer-emotion-1pct-{origin}-s{seed}.json").write_text(
                json.dumps({"name": "x", "overrides": ["data.train.max_samples=160"], "run": run}))
    text = bench.report(argparse.Namespace(target="emotion", seeds="0"))
    assert "| 1% (160 rows, 150 steps) |" in text and "| 3 | 1.0 min |" in text


def test_model_selection_refuses_a_stored_run_of_other_settings(monkeypatch, tmp_path):
    """A select.json of minilm alone was kept for `--bases minilm,smollm2` (its tau-b and top-1 then covered a subset), as
    was a truth run of another budget."""
    bench = load_benchmark("model_selection")
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    monkeypatch.setattr(bench, "truth", lambda *a: pytest.fail("trained"))
    ran = []
    monkeypatch.setattr(bench, "proxies", lambda setting, *a: ran.append(setting))
    monkeypatch.setattr(bench, "report", lambda root, name: "report")
    folder = tmp_path / "model_selection-quick" / "sst2"
    folder.mkdir(parents=True)
    row = {"base": "minilm", "method": "lora", "estimates": {}}
    (folder / "select.json").write_text(json.dumps({"rows": [row], "budget": bench.QUICK, "settings": {
        "candidates": ["minilm"], "methods": list(bench.RANKED_METHODS), "set": [f"{m}:{o}" for m, v in bench.METHOD_SETS.items() for o in v]}}))
    (folder / "truth-minilm-lora.json").write_text(json.dumps({"base": "minilm", "method": "lora", "steps": 125,
                                                               "overrides": ["model.name=minilm", "adapter.method=lora"]}))

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["model_selection.py", "--quick", "--cases", "sst2", *args])
        return bench.main()

    for args, says in ((["--stage", "select"], "select.json: candidates stored ['minilm'], asked ['../shared/models/smollm2-135m-instruct', 'minilm']"),
                       (["--stage", "truth", "--bases", "minilm"], "truth-minilm-lora.json: steps stored 125, asked 2")):
        with pytest.raises(SystemExit) as stop:
            run(*args)
        assert says in str(stop.value.code) and "--fresh" in str(stop.value.code)
    assert ran == []
    assert run("--stage", "select", "--bases", "minilm") == 0 and ran == ["sst2"]  # the settings it was made with
    assert run("--stage", "select", "--fresh") == 0 and ran == ["sst2", "sst2"]


def test_model_selection_report_leaves_out_the_figures_select_could_not_measure(tmp_path):
    """A base that failed to load in `peftlab select` (its figures null) made the report a TypeError on None."""
    bench = load_benchmark("model_selection")
    folder = tmp_path / "sst2"
    folder.mkdir()
    smollm2, rows = bench.BASES["smollm2"], []
    for i, (base, method) in enumerate(bench.items(["minilm", "smollm2"])):
        failed = base == smollm2
        rows.append({"base": base, "method": method, "label": "smollm2" if failed else "minilm", "features_group": 0 if failed else 1,
                     "features_seconds": 0.0 if failed else 2.0,
                     "estimates": {p: {"value": None if failed else 0.5 + i / 10, "std": None if failed else 0.01, "seconds": 0.0 if failed else 1.0}
                                   for p in ("probe", "logme", "steps")}})
        (folder / f"truth-{bench.item_name(base, method)}.json").write_text(json.dumps(
            {"base": base, "method": method, "seed": 42, "accuracy": 1.25 - i / 10 if failed else 0.6 + i / 10, "process_wall_s": 10.0}))
    (folder / "select.json").write_text(json.dumps({"rows": rows, "process_wall_s": 5.0}))
    text = bench.report(tmp_path, "t")
    assert "| sst2 | smollm2 frozen | 95.00 | failed | failed | failed | 10 |" in text
    assert "| sst2 | 3 of 6 (3 failed, left out) | steps | 1.00 | 1.00 | 0.0 |" in text  # top-1: the best of those measured
    assert "3 proxy figure(s) failed" not in text and "9 proxy figure(s) failed in `peftlab select`" in text


def da_store(out, runs: dict[str, tuple[float, list[str]]]) -> None:
    """Stored domain_adaptation.py results under `out`: name -> (test accuracy, overrides)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, (acc, overrides) in runs.items():
        run = {"metrics": {"test": {"accuracy": acc}}, "train_wall_s": 60.0, "steps": 3}
        (out / f"{name}.json").write_text(json.dumps({"name": name, "recipe": "r.yaml", "overrides": overrides, "run": run,
                                                      "process_wall_s": 90.0}))


def test_domain_adaptation_report_leaves_out_seeds_of_other_settings(tmp_path, monkeypatch):
    """Seed 0 fine-tuned with 3 steps and seed 1 with 8 steps at another learning rate were averaged as two seeds of one
    setting; so were DAPT runs started from masked-LM runs of other lengths."""
    bench = load_benchmark("domain_adaptation")
    out = tmp_path / "domain_adaptation"
    monkeypatch.setattr(bench, "OUT", out)
    monkeypatch.setattr(bench, "vocabulary_overlap", lambda a, b: 0.5)
    monkeypatch.setattr(bench, "plot", lambda results, seeds, path: None)

    def tune(seed, *extra, start=None):
        return ["data.train.path=b.jsonl", "data.test.path=k.jsonl", f"train.seed={seed}",
                *([f"model.from_run=runs/da/{start}"] if start else []), *extra]

    da_store(out, {"source-books-kitchen-s0": (0.80, tune(0, "train.max_steps=3")),
                   "source-books-kitchen-s1": (0.60, tune(1, "train.max_steps=8", "train.lr=5e-3")),
                   "mlm-kitchen-s0": (0.0, ["data.train.path=u.jsonl", "train.seed=0", "train.max_steps=2"]),
                   "mlm-kitchen-s1": (0.0, ["data.train.path=u.jsonl", "train.seed=1", "train.max_steps=5"]),
                   "dapt-books-kitchen-s0": (0.82, tune(0, "train.max_steps=3", start="mlm-kitchen-s0")),
                   "dapt-books-kitchen-s1": (0.70, tune(1, "train.max_steps=3", start="mlm-kitchen-s1"))})
    monkeypatch.setattr(sys, "argv", ["domain_adaptation.py", "--report"])
    bench.main()
    md = (tmp_path / "domain_adaptation.md").read_text()
    assert "| books -> kitchen | 80.00 | 82.00 | - | - | +2.00 |" in md and "| 1 / 1 / 0 |" in md  # seed 0 alone
    assert "source-books-kitchen-s1: --finetune train.max_steps=8 train.lr=5e-3 (the others: train.max_steps=3)" in md
    assert "dapt-books-kitchen-s1: --pretrain train.max_steps=5 (the others: train.max_steps=2)" in md


@pytest.mark.parametrize("folds", ["0", "1"])
def test_domain_adaptation_refuses_fewer_than_two_folds(folds):
    """--report --folds 0 was a ZeroDivisionError; --folds 1 trained on an empty file."""
    refused("domain_adaptation", "--report", "--folds", folds, "--tag", "never-written",
            says=f"--folds {folds}: give at least 2 (each fold is scored by a model trained on the others)")
    assert not (RESULTS / "domain_adaptation-never-written.md").exists()


def test_domain_adaptation_report_names_the_folds_stored(tmp_path, monkeypatch):
    """In-domain runs stored with --folds 2 and a report with the default 5: a bare '-' with nothing to say why."""
    bench = load_benchmark("domain_adaptation")
    out = tmp_path / "domain_adaptation"
    monkeypatch.setattr(bench, "OUT", out)
    monkeypatch.setattr(bench, "vocabulary_overlap", lambda a, b: 0.5)
    monkeypatch.setattr(bench, "plot", lambda results, seeds, path: None)
    da_store(out, {"source-books-kitchen-s0": (0.8, ["train.seed=0"]),
                   **{f"indomain-kitchen-fold{f}of2-s0": (0.9, ["train.seed=0"]) for f in range(2)}})
    monkeypatch.setattr(sys, "argv", ["domain_adaptation.py", "--report"])
    bench.main()
    assert "- (d) in-domain: none stored with --folds 5 for kitchen (stored: --folds 2)" in (tmp_path / "domain_adaptation.md").read_text()


def test_domain_adaptation_plot_fits_its_axis_to_the_accuracies_and_draws_no_bar_for_a_missing_condition(tmp_path, monkeypatch):
    """The axis was fixed at 70-96 (accuracies below 70 were hidden) and a condition not measured was a bar of 0."""
    bench = load_benchmark("domain_adaptation")
    figures = []
    monkeypatch.setattr(bench, "save_figure", lambda fig, path, **kw: figures.append(fig))
    results = [{"source": "books", "target": t, "mean": {"source": 0.55, "dapt": 0.6, "tapt": None, "indomain": 0.65},
                "gain": {"dapt": 0.05, "tapt": None}, "overlap": 0.5} for t in ("dvd", "kitchen")]
    bench.plot(results, [0], tmp_path / "p.png")
    left = figures[0].axes[0]
    heights = sorted(round(bar.get_height(), 6) for bar in left.patches)
    assert heights == [55.0, 55.0, 60.0, 60.0, 65.0, 65.0]  # no bar for (c)
    bottom, top = left.get_ylim()
    assert bottom <= 55 and top >= 65 and top <= 100



@pytest.mark.parametrize(("seeds", "says"), [("x", "--seeds 'x': expected comma-separated integers, e.g. 0,1,2"),
                                             (",", "--seeds ',': expected comma-separated integers")])
def test_domain_adaptation_refuses_seeds_that_are_not_integers(seeds, says):
    """--seeds x was a ValueError traceback."""
    refused("domain_adaptation", "--report", "--seeds", seeds, "--tag", "never-written", says=says)
    assert not (RESULTS / "domain_adaptation-never-written.md").exists()


@pytest.mark.parametrize(("args", "says"), [(["--seeds", "x"], "--seeds 'x': expected comma-separated integers, e.g. 42,1"),
                                            (["--seeds", ","], "--seeds ',': expected comma-separated integers"),
                                            (["--bases", ""], "--bases '': give at least one of minilm, smollm2")])
def test_model_selection_refuses_seeds_and_bases_that_name_nothing(monkeypatch, tmp_path, capsys, args, says):
    """--seeds x was a ValueError traceback; --seeds , or --bases '' measured nothing and exited 0."""
    bench = load_benchmark("model_selection")
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    for name in ("truth", "proxies", "report"):
        monkeypatch.setattr(bench, name, lambda *a: pytest.fail("ran"))
    monkeypatch.setattr(sys, "argv", ["model_selection.py", "--cases", "sst2", *args])
    with pytest.raises(SystemExit) as stop:
        bench.main()
    assert stop.value.code == 2 and says in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ README vs stored results

def test_readme_multitask_paired_gains_are_the_stored_runs():
    """The README's 600-step multi-task table (shared - single, paired by seed, ± its standard error) is computed from
    results/multitask/*.json: each figure from the stored scores, not from the two-decimal values shown (SST-2's s.e. read
    0.75, the rounded gains', where the runs give 0.74)."""
    import statistics

    readme = (REPO / "benchmarks" / "README.md").read_text()
    test = lambda name: json.loads((RESULTS / "multitask" / f"{name}.json").read_text())["run"]["metrics"]["test"]  # noqa: E731
    for task, key, row in (("sst2", "accuracy", "| SST-2 (dev, 872 rows; accuracy) |"), ("agnews", "accuracy", "| AG News (test, 7,600 rows; accuracy) |"),
                           ("emotion", "accuracy", "| emotion (test, 2,000 rows; accuracy) |"), ("emotion", "f1", "| emotion (macro-F1) |"),
                           ("mrpc", "f1", "| MRPC (test, 1,725 rows; macro-F1) |")):
        gains = [100 * (test(f"multi-shared-600-s{s}")[f"{task}/{key}"] - test(f"single-{task}-share600-s{s}")[key]) for s in range(3)]
        line = next(line for line in readme.splitlines() if line.startswith(row))
        shown = f"{statistics.mean(gains):+.2f}** ± {statistics.stdev(gains) / 3 ** 0.5:.2f}" if "**" in line.split("|")[4] else \
            f"{statistics.mean(gains):+.2f} ± {statistics.stdev(gains) / 3 ** 0.5:.2f}"
        assert shown in line, (row, shown, line)


def test_readme_throughput_seed_tables_are_the_stored_runs():
    """Each per-seed table after a stored throughput run's name in the README (seed | peftlab real tokens/s | Trainer |
    ratio | ...) gives that run's tokens/s and their ratio, and its mean row the means and their ratio: stop 40's seed
    44 read 0.97x where 562.4 / 576.5 is 0.98x, and stop 32's Trainer mean 3368 where its three runs average 3368.6."""
    import statistics

    lines = (REPO / "benchmarks" / "README.md").read_text().splitlines()
    for name in ("throughput-grouped", "throughput-dropout", "throughput-attention", "throughput-fp32", "throughput-skip", "throughput-skip-bf16",
                 "throughput-cast-bf16", "throughput-epyc-bf16", "throughput-epyc-bf16-stop50", "throughput-epyc-bf16-stop51",
                 "throughput-epyc-bf16-stop52"):
        tokens = {(r["side"], r["seed"]): r["tokens_per_s"] for r in json.loads((RESULTS / f"{name}.json").read_text())["rows"] if r["case"] == "lora-grouped"}
        named = next(i for i, line in enumerate(lines) if f"results/{name}." in line)
        header = next(i for i in range(named, len(lines)) if lines[i].startswith("| seed"))
        rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[header + 2:header + 12]]
        rows = rows[:next((i for i, r in enumerate(rows) if r[0].startswith("mean")), len(rows)) + 1]
        assert rows[-1][0].startswith("mean"), name
        for cells in rows:
            if cells[0].startswith("mean"):
                ours, theirs = (statistics.mean(v for (side, _), v in tokens.items() if side == s) for s in ("peftlab", "Trainer+peft"))
                shown = [f"{ours:.0f}", f"{theirs:.0f}", f"**{ours / theirs:.2f}x**"]
            else:
                seed = int(cells[0].split()[0])
                ours, theirs = tokens[("peftlab", seed)], tokens[("Trainer+peft", seed)]
                shown = [f"{ours:.0f}", f"{theirs:.0f}", f"{ours / theirs:.2f}x"]
            assert cells[1:4] == shown, (name, cells, shown)


def test_readme_sft_speed_ups_over_trl_are_the_stored_pairs():
    """The README's SFT tables quote peftlab's speed-up over each TRL side as sft_throughput.py stores it: the two
    runs' real tokens/s, from one invocation. Seed 8's read 6.05x and 4.43x where its runs give 5.99x and 4.41x."""
    readme = (REPO / "benchmarks" / "README.md").read_text()
    run = lambda side, rows, seed: json.loads((RESULTS / "sft_throughput" / f"{side}-{rows}-seed{seed}.json").read_text())  # noqa: E731
    for rows, seed, sides in ((256, 0, ("trl", "trl-packed")), (256, 1, ("trl", "trl-packed")), (128, 3, ("trl-packed",)),
                              (128, 4, ("trl", "trl-packed")), (128, 7, ("trl", "trl-packed")), (128, 8, ("trl", "trl-packed"))):
        ours = run("peftlab", rows, seed)
        for side in sides:
            theirs = run(side, rows, seed)
            assert ours["session"] == theirs["session"]
            shown = f"| {theirs['tokens_per_s']:.0f} | **{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x** |"
            assert shown in readme, (rows, seed, side, shown)


def test_readme_gpu_check_figures_are_the_stored_calls():
    """The H200 section's GEMM peaks and device-busy shares are those gpu_check.py stored (results/gpu_check/*.json):
    the README had 697-727 TFLOP/s at 4096^3 where the three calls measured 687-727, and the busy shares of the profile
    table's self-CUDA totals (~7% and ~21%) where the script's own measure, which its table prints, is 8% and 23%."""
    readme = " ".join((REPO / "benchmarks" / "README.md").read_text().split())
    calls = [json.loads((RESULTS / "gpu_check" / f"{name}.json").read_text()) for name in ("full", "bare-profile", "dtype-auto")]
    at = lambda n: [call["gemm"]["sizes"][n]["tflops"] for call in calls]  # noqa: E731
    assert (f"{calls[0]['gemm']['peak_tflops']:.0f} TFLOP/s in the first call (8192^3; {min(at('8192')):.0f}-{max(at('8192')):.0f} over the three "
            f"calls, {min(at('4096')):.0f}-{max(at('4096')):.0f} at 4096^3)") in readme
    for model, phase in (("MiniLM", "cls_bare"), ("SmolLM2", "sft_bare")):
        prof = calls[1][phase]["profile"]
        assert (f"~{prof['device_busy_share']:.0%} of the {model} step** ({prof['device_busy_ms_per_step']:.{1 if model == 'MiniLM' else 0}f} of "
                f"{prof['wall_ms_per_step']:.0f} ms, {prof['kernel_launches_per_step']:,.0f} device ops per step") in readme, model
    shares = sorted(round(100 * calls[1][phase]["profile"]["device_busy_share"]) for phase in ("cls_bare", "sft_bare"))
    assert f"busy only {shares[0]}-{shares[1]}% of a training step" in " ".join((REPO / "README.md").read_text().split())


def test_readme_sst2_distillation_table_is_the_stored_runs():
    """The SST-2 distillation table (label-only | distilled | + unlabelled | wall minutes) is results/distillation/*.json:
    dev accuracies and whole-process minutes (the 1% + unlabelled run's 12.75 min read 12.8). The runs that stop before
    their first evaluation keep their last step, which the text says (it said every run kept its best on the hold-out)."""
    readme = " ".join((REPO / "benchmarks" / "README.md").read_text().split())
    run = lambda name: json.loads((RESULTS / "distillation" / f"{name}.json").read_text()) if name else None  # noqa: E731
    acc = lambda r: f"{100 * r['run']['metrics']['test']['accuracy']:.2f}" if r else "-"  # noqa: E731
    last = set()  # the steps of runs that kept their last step (no evaluation before it)
    for student, labels, names in (("MiniLM 3 layers, full (17.4M)", "100% (66,002 rows)", ("labels-100", "distill-100", None)),
                                   ("MiniLM 3 layers, full", "10% (6,600)", ("labels-10", "distill-10", "distill-10+unl")),
                                   ("MiniLM 3 layers, full", "1% (659)", ("labels-1", "distill-1", "distill-1+unl")),
                                   ("MiniLM 2 layers, full (15.6M)", "100%", (None, "distill-100-l2", None)),
                                   ("MiniLM 6 layers, LoRA r8 (0.15M of 22.9M, 0.65%)", "100%", ("lora-labels-100", "lora-distill-100", None))):
        runs = [run(name) for name in names]
        best = max(range(3), key=lambda i: runs[i]["run"]["metrics"]["test"]["accuracy"] if runs[i] else -1)
        cells = [f"**{acc(r)}**" if i == best and sum(map(bool, runs)) > 1 else acc(r) for i, r in enumerate(runs)]
        minutes = " / ".join(f"{r['process_wall_s'] / 60:.1f}" if r else "-" for r in runs[:2] + runs[2:] * bool(runs[2]))
        row = f"| {student} | {labels} | {' | '.join(cells)} | {minutes} min |"
        assert row in readme, row
        last.update(r["run"]["steps"] for r in runs if r and r["run"]["selected_on"] is None and r["run"]["best_step"] == r["run"]["steps"])
    assert "those at 1% and 10% of the labels without unlabelled rows, {} and {} steps, end before their first evaluation".format(*sorted(last)) in readme


def test_distillation_reports_say_which_runs_kept_their_last_step():
    """distillation.py wrote 'every run keeps its best step on the hold-out' into every report, also for the runs that end
    before their first evaluation (SST-2 at 1% and 10%: 42 and 414 steps), which select nothing and keep their last step.
    The sentence now comes from the runs (run.json's selected_on), and the stored reports were rewritten by the script."""
    distillation = load_benchmark("distillation")
    runs = [json.loads(f.read_text()) for f in sorted((RESULTS / "distillation").glob("*.json"))]
    runs = [r for r in runs if "run" in r]
    said = distillation.selection_sentence(runs)
    unselected = sorted(r["name"] for r in runs if r["run"]["selected_on"] is None)
    assert unselected == ["distill-1", "distill-10", "labels-1", "labels-10"]
    for name in unselected:
        assert f"{name} ({next(r for r in runs if r['name'] == name)['run']['steps']} steps)" in said
    assert "distill-100 " not in said and distillation.selection_sentence([r for r in runs if r["name"] not in unselected]).endswith(
        "keeps its best step on a seeded 2% of its train rows")
    for report in ("distillation.md", "distillation-emotion.md", "distillation-smollm2.md"):
        text = (RESULTS / report).read_text()
        assert "every run keeps its best step" not in text and "end before their first evaluation and keep their last step" in text, report


def test_readme_times_to_target_are_the_stored_paired_ratios():
    """Every time-to-80%-dev ratio the README quotes for a stored throughput run is the one throughput.py stores: peftlab /
    Trainer over the seeds where both sides reached the target. Fourteen figures divided peftlab's mean over all seeds by
    the Trainer's over the seeds it reached (0.72x where the paired runs give 0.60x, 0.78 where they give 0.83)."""
    ratio = load_benchmark("throughput").time_to_target_ratio
    readme = " ".join((REPO / "benchmarks" / "README.md").read_text().split())
    for name, quoted in (("throughput-dropout", "(1.06x-1.14x per seed), time to 80% dev {}x"),
                         ("throughput-attention", "| 0.84x (2738, i.e. the Trainer's 2733) | {} "),
                         ("throughput-attention", "(1.15x-1.30x per seed; was 1.10x at stop 32), time to 80% dev {}x"),
                         ("throughput-fused", "mean 1.24x**, time to 80% dev {}x"),
                         ("throughput-fp32", "| 580 | 574 | **1.01x** | **63.7%** / 63.1% | {} "),
                         ("throughput-skip", "Real tokens/s. Time to 80% dev {}x"),
                         ("throughput-skip-bf16", "| 2472 (0.92x) | {} "),
                         ("throughput-skip-bf16", "(1.14x-1.23x per seed), time to 80% dev {}x"),
                         ("throughput-cast-bf16", "(1.24x-1.29x per seed), time to 80% dev {}x"),
                         ("throughput-epyc-bf16", "| **49.2%** / 38.2% | {} "),
                         ("throughput-epyc-bf16", "whether the first three held. Time to 80% dev {}x"),
                         ("throughput-epyc-bf16-stop50", "Time to 80% dev: 18 s vs 35 s, **{}x**"),
                         ("throughput-epyc-bf16-stop51", "(1.28-1.37x per seed), time to 80% dev {}x"),
                         ("throughput-epyc-bf16-stop52", "(stop 51: 1.34x), time to 80% dev {}x")):
        rows = json.loads((RESULTS / f"{name}.json").read_text())["rows"]
        shown = quoted.format(ratio(rows, "lora-grouped").split()[0])
        assert shown in readme, (name, shown)


def test_summarization_figures_of_the_self_init_setting_say_it_was_chosen_on_their_test_rows():
    """`model.cross_attention_init: self` was chosen by the 2,000-row probe on 100 seeded SAMSum test rows, which are the
    first 100 of the 200 the full-split run reports (the same seed shuffles the same way whatever max_samples takes):
    every place quoting that run's figure says so (the rule: a split that served for selection is named next to it)."""
    from datasets import Dataset

    from peftlab.config import SplitConfig
    from peftlab.data import sampled

    probe, full = (json.loads((RESULTS / f"{n}.json").read_text())["meta"] for n in ("summarization-2k-lora-selfinit", "summarization-full-selfinit"))
    assert probe["recipe"] == full["recipe"] and "model.cross_attention_init=self" in probe["overrides"]
    rows = Dataset.from_dict({"i": list(range(819))})  # SAMSum test's size
    first, more = (sampled(rows, SplitConfig(path="x", max_samples=n), 42)["i"] for n in (100, 200))
    assert set(first) <= set(more)
    bench = (REPO / "benchmarks" / "README.md").read_text()
    table = bench.index("| BERT2BERT + LoRA, `cross_attention_init=self` (the shipped recipe) | **38.02**")
    assert "was chosen on test rows" in bench[table - 600:table]
    readme = " ".join((REPO / "README.md").read_text().split())
    assert "30.0/8.0/23.4 for Lead-3 (200 test rows, the first 100 of which chose `self`" in readme
    recipe = " ".join(line.lstrip("# ") for line in (REPO / "recipes" / "minilm" / "samsum-lora.yaml").read_text().splitlines())
    assert "100 of those test rows chose cross_attention_init: self" in recipe
