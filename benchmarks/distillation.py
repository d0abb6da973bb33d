"""Knowledge distillation on SST-2 or emotion (--task): what does a smaller student keep of its teacher, and what does it
gain in speed?

  teacher            SST-2: recipes/minilm/sst2-lora.yaml with LoRA r16 on every linear layer (--teacher-overrides;
                     6-layer MiniLM, 2.9% trainable); emotion: recipes/minilm/emotion-lora.yaml as shipped (the same
                     adapter); another recipe with --teacher-recipe (e.g. the SmolLM2-135M classifier,
                     recipes/smollm2-135m/sst2-head-lora.yaml, with --tag smollm2); or any finished run given with --teacher
  labels-F           the student of recipes/minilm/{sst2,emotion}-distill.yaml (3 of MiniLM's 6 layers, every weight
                     trained) on a seeded F% of the train rows, labels only (train.distill=null)
  distill-F          the same student and rows, plus the teacher's soft targets (the recipe's T and alpha)
  distill-F+unl      the same, the other (100-F)% of the train rows added as unlabelled text (soft targets only)
  labels-F-steps     labels-F and distill-F with as many optimizer steps as at 100% (more epochs over the F% rows):
  distill-F-steps    the step-matched comparison of label-only and distilled on few labels
  distill-100-lN     a student of N layers (--extra-layers, default 2), distilled on every labelled row; with
  labels-100-lN      --layer-twins also on labels alone (6: the whole MiniLM, every weight trained)
  lora-labels-100    the whole 6-layer MiniLM with a small adapter (LoRA r8 on the attention, 0.65% trainable:
  lora-distill-100   recipes/minilm/sst2-lora.yaml as shipped) on all train rows, labels only / distilled
                     (--no-lora-student skips)
Every run is one `peftlab train` process (benchmarks/common.py) under runs/distill-bench/ (emotion: distill-bench-emotion/),
its result under benchmarks/results/distillation/ (distillation-emotion/); rerunning skips what is finished (--fresh to
redo). Accuracy is on the recipe's test split (SST-2 dev; emotion test), never used for selection: SST-2 runs keep their
best step on a seeded 2% of their train rows, emotion runs on 500 rows of its validation split (a run that ends before its
first evaluation keeps its last step; the report names them). Speed (stage `speed`):
each model merged (a standalone model), on that test split, tokenization included: examples/s in batches of 64, and the
median latency of one request (one text, batch 1).

Stages, one at a time or together (`--stages teacher,students,speed,report`, the default). Times measured on 2 cores
with native bf16 (2026-12-01; expect ~2-3x longer on an AVX2-only CPU, where training runs in fp32):
  python benchmarks/distillation.py --stages teacher        # 2 epochs of SST-2: 18 min
  python benchmarks/distillation.py --stages students      # 15 runs: 10-14 min each at 100%, with unlabelled rows and
                                                           # step-matched, 1.5 min at 10%, 20 s at 1%: ~2 h 15 min
  python benchmarks/distillation.py --stages speed,report  # ~1 min
  python benchmarks/distillation.py --stages precision,report  # the teacher at seed 1 and in fp32 (3 runs, ~55 min)
  python benchmarks/distillation.py --smoke                # tiny end-to-end check: 14 runs, ~10 min on 2 cores
  python benchmarks/distillation.py --task emotion          # the same on emotion (16,000 train rows, 6 classes):
                                                           # 15 runs, ~45 min
  python benchmarks/distillation.py --tag smollm2 --teacher-recipe recipes/smollm2-135m/sst2-head-lora.yaml \
      --teacher-overrides train.max_steps=2000 train.eval_every=500 train.save_every=500 \
      --reuse-label-only --fractions 100,10 --extra-layers 6 --layer-twins
                                                           # what ran at stop 37: a SmolLM2-135M teacher (139M
                                                           # parameters, 2,000 steps: ~32 min) and its students
                                                           # (~2 h; the label-only runs stored untagged are reused)
Results: benchmarks/results/distillation.md (+ one JSON per run in benchmarks/results/distillation/); emotion:
distillation-emotion.md and distillation-emotion/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import REPO, RESULTS, fractions_arg, measured_line, stored_case, write_result  # noqa: E402

DATA = REPO.parent / "shared" / "data"
RUNS, OUT = REPO / "runs" / "distill-bench", RESULTS / "distillation"
STAGES = ("teacher", "students", "speed", "report", "precision")  # the default: all but `precision`
# Stage `precision`: the teacher configuration again, at seed 1 and in fp32 (the default teacher: seed 42, the machine's
# train.precision=auto, bf16 here) -- is a teacher's score the precision's or the seed's?
PRECISION_CHECK = {"teacher-s1": ["train.seed=1"], "teacher-fp32": ["train.precision=fp32"],
                   "teacher-fp32-s1": ["train.precision=fp32", "train.seed=1"]}
# The strongest MiniLM configuration measured on SST-2: 90.48 dev in fp32 without selection (2 epochs, 2.9% trainable);
# with hold-out selection 87.61 (this benchmark's teacher, bf16) to 89.45 over 2 seeds x {bf16, fp32} (stage precision)
STRONG_TEACHER = ["adapter.target_modules=[query,key,value,dense]", "adapter.r=16", "adapter.alpha=32"]
# The small-adapter student: LoRA r8 on the attention projections (sst2-lora.yaml as shipped)
SMALL_LORA = ["adapter.target_modules=[query,key,value,attention.output.dense]", "adapter.r=8", "adapter.alpha=16"]


@dataclass(frozen=True)
class Task:
    title: str
    teacher: str  # recipe of the teacher and of the small-adapter student
    student: str  # recipe of the layer-dropped student
    train: Path
    test_name: str
    selection: str  # what picks each run's best step
    teacher_overrides: tuple[str, ...]
    lora_overrides: tuple[str, ...]  # teacher recipe -> small-adapter student
    f1: bool  # report macro-F1 beside accuracy (imbalanced classes)


TASKS = {
    "sst2": Task("SST-2", teacher="recipes/minilm/sst2-lora.yaml", student="recipes/minilm/sst2-distill.yaml",
                 train=DATA / "sst2" / "train.tsv", test_name="SST-2 dev",
                 selection="a seeded 2% of its train rows", teacher_overrides=tuple(STRONG_TEACHER),
                 lora_overrides=(), f1=False),
    "emotion": Task("emotion (6 classes)", teacher="recipes/minilm/emotion-lora.yaml",
                    student="recipes/minilm/emotion-distill.yaml", train=DATA / "emotion" / "train.jsonl",
                    test_name="emotion test", selection="500 rows of the validation split", teacher_overrides=(),
                    lora_overrides=tuple(SMALL_LORA), f1=True),
}
TASK = TASKS["sst2"]  # main() sets it from --task
BASE_OUT, REUSE_LABEL_ONLY = OUT, False  # main() sets them: the untagged results, --reuse-label-only
SMOKE_TEST_ROWS = 32
SMOKE = ["train.max_steps=4", "train.eval_every=2", f"data.test.max_samples={SMOKE_TEST_ROWS}", "train.batch_size=8"]


def label_only(name: str) -> bool:
    """A run that does not read the teacher (the same whatever teaches)."""
    return name.startswith(("labels-", "lora-labels-"))


def store(name: str) -> Path:
    """Where a run's result is kept: under --reuse-label-only, a label-only run the untagged benchmark has stored is
    read from there; everything else is this benchmark's (tag's) own."""
    reuse = REUSE_LABEL_ONLY and label_only(name) and (BASE_OUT / f"{name}.json").is_file()
    return BASE_OUT if reuse else OUT


def case(name: str, recipe: str, overrides: list[str], args) -> dict:
    """One training process, or its stored result."""
    if store(name) != OUT:
        print(f"[{name}] label-only, reused from {BASE_OUT / name}.json (no teacher changes it)", flush=True)
        return stored(name)
    return stored_case(name, recipe, overrides, runs=RUNS, results=OUT, prefix="distill-bench", fresh=args.fresh,
                       verbose=args.verbose)


def accuracy(result: dict, metric: str = "accuracy") -> float:
    """The run's held-out test figure (the report's tables are test figures: never the eval split a run may select on)."""
    m = result["run"]["metrics"]
    if "test" not in m:
        raise SystemExit(f"[{result['name']}] scored no test split, and the report gives test figures only: give its recipe "
                         "data.test.")
    return m["test"].get(metric, float("nan"))


def read_lines(path: Path) -> tuple[list[str], list[str]]:
    """A .tsv file -> ([its header], rows); a .jsonl file -> ([], rows)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return (lines[:1], lines[1:]) if path.suffix == ".tsv" else ([], [line for line in lines if line.strip()])


def split_train(fraction: float, rows: int | None, seed: int = 0) -> tuple[Path, Path]:
    """A seeded `fraction` of the task's train rows as labelled rows, the rest as an unlabelled file (same columns; its
    labels are never read) -> (labelled, unlabelled)."""
    header, body = read_lines(TASK.train)
    random.Random(seed).shuffle(body)
    body = body[:rows] if rows else body
    k = max(16, round(fraction * len(body)))
    folder = RUNS / "data"
    folder.mkdir(parents=True, exist_ok=True)
    tag, ext = f"{fraction:g}-{len(body)}", TASK.train.suffix
    labelled, unlabelled = folder / f"train-{tag}{ext}", folder / f"unlabelled-{tag}{ext}"
    labelled.write_text("\n".join([*header, *body[:k]]) + "\n", encoding="utf-8")
    unlabelled.write_text("\n".join([*header, *body[k:]]) + "\n", encoding="utf-8")
    return labelled, unlabelled


def students(teacher: Path, args) -> None:
    """The 3-layer students at each label fraction, shallower students distilled on every row (--extra-layers), then the
    6-layer MiniLM with a small LoRA (0.65% trainable) on every row: label-only and distilled."""
    from peftlab import load_recipe

    extra = SMOKE if args.smoke else []
    epochs = load_recipe(REPO / TASK.student, validate_files=False).train.epochs  # the student's, at 100%
    for pct in args.fractions:
        labelled, unlabelled = split_train(pct / 100, args.train_rows)
        base = [f"data.train.path={labelled}", *extra, *args.student]
        case(f"distill-{pct:g}", TASK.student, [*base, f"train.distill.teacher={teacher}"], args)
        case(f"labels-{pct:g}", TASK.student, [*base, "train.distill=null"], args)
        if pct < 100:
            case(f"distill-{pct:g}+unl", TASK.student, [*base, f"train.distill.teacher={teacher}",
                                                  f"train.distill.unlabelled.path={unlabelled}"], args)
            # step-matched: as many optimizer steps as with every label (more epochs over the fewer rows), so that
            # label-only vs distilled at F% is not decided by 2 epochs of a small file being too few steps
            longer = [*base, f"train.epochs={epochs * 100 / pct:g}"]
            case(f"labels-{pct:g}-steps", TASK.student, [*longer, "train.distill=null"], args)
            case(f"distill-{pct:g}-steps", TASK.student, [*longer, f"train.distill.teacher={teacher}"], args)
    every_row = [f"data.train.path={split_train(1.0, args.train_rows)[0]}"] if args.train_rows else []
    base = [*every_row, *extra, *args.student]
    for layers in args.extra_layers:
        case(f"distill-100-l{layers}", TASK.student, [*base, f"model.num_layers={layers}", f"train.distill.teacher={teacher}"], args)
        if args.layer_twins:
            case(f"labels-100-l{layers}", TASK.student, [*base, f"model.num_layers={layers}", "train.distill=null"], args)
    if args.lora_student:
        small = [*TASK.lora_overrides, *base]
        case("lora-distill-100", TASK.teacher, [*small, f"train.distill.teacher={teacher}"], args)
        case("lora-labels-100", TASK.teacher, small, args)


# --------------------------------------------------------------------------------------------------- speed

def speed(name: str, run_dir: Path, args) -> dict:
    """Examples/s (batches of 64) and p50 latency of one request, of the run's merged model on the test split."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from peftlab import load_recipe, merge
    from peftlab.data import joined, read_split
    from peftlab.rundir import atomic_write_text

    folder = merge(run_dir)  # a LoRA run: its merged model; a fully trained one: itself
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    # the run's own test split, text columns and max length, read as training read them (paths relative to the repo)
    recipe = load_recipe(run_dir / "recipe.yaml", validate_files=False)
    spec, max_length = recipe.data.test, recipe.data.max_length
    with contextlib.chdir(REPO):
        texts = joined(read_split(spec, recipe.data, "data.test")[:], spec.text_columns or recipe.data.text_columns)
    texts = texts[: args.speed_rows] if args.speed_rows else texts
    with torch.inference_mode():
        def forward(batch):
            return model(**tok(batch, return_tensors="pt", padding=True, truncation=True, max_length=max_length)).logits

        forward(texts[:64])  # warm-up
        start = time.perf_counter()
        for i in range(0, len(texts), 64):
            forward(texts[i:i + 64])
        throughput = len(texts) / (time.perf_counter() - start)
        times = []
        for text in texts[: args.requests]:
            t0 = time.perf_counter()
            forward([text])
            times.append(time.perf_counter() - t0)
    params = sum(p.numel() for p in model.parameters())
    result = {"name": name, "examples_per_s": throughput, "p50_ms": 1000 * statistics.median(times), "params": params,
              "layers": model.config.num_hidden_layers, "threads": torch.get_num_threads(), "rows": len(texts)}
    atomic_write_text(OUT / f"speed-{name}.json", json.dumps(result, indent=2))
    print(f"[speed {name}] {throughput:.0f} ex/s, p50 {result['p50_ms']:.1f} ms, {params / 1e6:.1f}M params", flush=True)
    return result


# -------------------------------------------------------------------------------------------------- report

def stored(name: str) -> dict | None:
    f = store(name) / f"{name}.json"
    return json.loads(f.read_text()) if f.exists() else None


def selection_sentence(runs: list[dict]) -> str:
    """What picked the exported step of each stored run in the table, from the runs themselves: a run that ends before its
    first evaluation selects nothing (its run.json's selected_on is null) and keeps its last step. (The report said every
    run kept its best step on the hold-out, also of the 1% and 10% SST-2 runs, 42 and 414 steps, which never evaluate
    before their end.)"""
    last = [r for r in runs if r["run"].get("selected_on") is None]
    said = f"each run keeps its best step on {TASK.selection}"
    if not last:
        return said
    return f"{said}, except those that end before their first evaluation and keep their last step: " + ", ".join(
        f"{r['name']} ({r['run']['steps']} steps)" for r in last)


def latency_ratio(teacher_ms: float, student_ms: float) -> str:
    """'2.10x faster', or '3.60x slower' (a ratio below 1 read as 'faster' said the opposite of what was measured)."""
    ratio = teacher_ms / student_ms
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"


def teacher_result(args) -> dict | None:
    """The teacher the students learned from: --teacher RUN's own run.json (a finished run given, trained elsewhere), else
    this benchmark's stored teacher stage. (The report read the stored stage only: with --teacher and a new --tag there is
    none, and every 'kept' share was nan%; without a tag it was some other teacher's accuracy.)"""
    if not args.teacher:
        return stored("teacher")
    run_json = Path(args.teacher) / "run.json"
    if not run_json.is_file():
        return None
    run = json.loads(run_json.read_text())
    return {"name": "teacher", "recipe": str(args.teacher), "overrides": [], "run": run, "process_wall_s": run.get("train_wall_s")}


def report(args) -> str:
    t = teacher_result(args)
    teacher_acc = accuracy(t) if t else float("nan")
    metric = "accuracy / macro-F1" if TASK.f1 else "accuracy"
    # the overrides the teacher was trained with (the train-row subset and --smoke's too), as stored; a --teacher RUN's own
    trained = t["overrides"] if t and not args.teacher else []
    test = f"{SMOKE_TEST_ROWS} rows of {TASK.test_name} (--smoke: a check that it runs, not a measurement)" if args.smoke else TASK.test_name
    groups = [("MiniLM 3 layers, full", f"{pct:g}", f"labels-{pct:g}", f"distill-{pct:g}", f"distill-{pct:g}+unl")
              for pct in args.fractions]
    groups += [("MiniLM 3 layers, full, the steps of 100%", f"{pct:g}", f"labels-{pct:g}-steps", f"distill-{pct:g}-steps", None)
               for pct in args.fractions if pct < 100]
    groups += [(f"MiniLM {k} layers, full", "100", f"labels-100-l{k}", f"distill-100-l{k}", None) for k in args.extra_layers]
    groups.append(("MiniLM 6 layers, LoRA r8 (q,k,v,o)", "100", "lora-labels-100", "lora-distill-100", None))
    shown = [r for _, _, *names in groups for r in (stored(n) for n in names if n) if r]  # the table's runs, as stored
    lines = [f"# Knowledge distillation on {TASK.title}", "",
             f"Teacher: `{args.teacher_name}` {' '.join(trained)}".rstrip() + ".",
             f"Students: `{TASK.student}`" + "".join(f" {o}" for o in [*(SMOKE if args.smoke else []), *args.student]) + "; trained on "
             + (f"the first {args.train_rows} train rows (--train-rows): the percents below are of those" if args.train_rows
                else "the whole train split") + ".",
             measured_line(t["run"] if t else None), "",
             f"{metric[0].upper()}{metric[1:]} on {test} (scored once at the end; {selection_sentence(shown)}). Kept: the student's "
             "share of the teacher's accuracy. Time: the whole training process (the distilled runs include the teacher's pass "
             "over their rows).", "",
             "| student | labels | trains | label-only | distilled | distilled + rest unlabelled | kept (best) | time label-only / distilled |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]

    def cell(r):
        if not r:
            return "-"
        return f"{100 * accuracy(r):.2f}" + (f" / {100 * accuracy(r, 'f1'):.2f}" if TASK.f1 else "")

    wall = lambda r: f"{r['process_wall_s'] / 60:.1f}" if r else "-"  # noqa: E731
    for student, pct, labels, distill, unl in groups:
        runs = [stored(labels) if labels else None, stored(distill), stored(unl) if unl else None]
        if not any(runs):
            continue
        some = next(r for r in runs if r)["run"]
        trains = f"{some['trainable_params'] / 1e6:.2f}M of {some['total_params'] / 1e6:.1f}M ({some['trainable_percent']:.2f}%)"
        best = max((accuracy(r) for r in runs if r), default=float("nan"))
        lines.append(f"| {student} | {pct}% | {trains} | {cell(runs[0])} | {cell(runs[1])} | {cell(runs[2])} | "
                     f"{100 * best / teacher_acc:.1f}% | {wall(runs[0])} / {wall(runs[1])} min |")
    if t:
        r = t["run"]
        took = f"{t['process_wall_s'] / 60:.1f} min" if t["process_wall_s"] is not None else "time not recorded"
        lines += ["", f"Teacher: {cell(t)} {metric} on {TASK.test_name}, {r['trainable_params'] / 1e6:.2f}M of "
                  f"{r['total_params'] / 1e6:.1f}M parameters trained ({r['trainable_percent']:.2f}%), "
                  f"{took}{' (training, the run given with --teacher)' if args.teacher else ''}."]
    repeats = [(n, r) for n, r in (("teacher", t), *((n, stored(n)) for n in PRECISION_CHECK)) if r]
    if len(repeats) > 1:
        from peftlab.config import Recipe

        default_seed = Recipe().train.seed
        lines += ["", "The teacher's configuration repeated (stage `precision`): the same recipe and overrides, another "
                  "seed or precision; each keeps its best step on the hold-out, the test split scored once.", "",
                  "| run | precision | seed | best step | hold-out accuracy | test | train time |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, r in repeats:
            run, seed = r["run"], next((o.split("=")[1] for o in r["overrides"] if o.startswith("train.seed=")), default_seed)
            lines.append(f"| {name} | {run['precision']} | {seed} | {run['best_step']} of {run['steps']} | "
                         f"{100 * run['metrics']['eval']['accuracy']:.2f} | {cell(r)} | {run['train_wall_s'] / 60:.1f} min |")
        by = {}
        for _, r in repeats:
            by.setdefault(r["run"]["precision"], []).append(100 * accuracy(r))
        lines += ["", "Mean test accuracy by precision: " + "; ".join(
            f"{k} {statistics.mean(v):.2f} over {len(v)} seed(s)" + (f" (spread {max(v) - min(v):.2f})" if len(v) > 1 else "")
            for k, v in sorted(by.items())) + "."]
    rows = [s for s in (stored(f"speed-{n}") for n in ("teacher", "student", *(f"student-l{k}" for k in args.extra_layers),
                                                       "student-lora")) if s]
    if rows:
        lines += ["", "| model | layers | params | examples/s (batch 64) | p50 latency, 1 request |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {s['name']} | {s['layers']} | {s['params'] / 1e6:.1f}M | {s['examples_per_s']:.0f} | {s['p50_ms']:.1f} ms |"
                  for s in rows]
        lines += ["", *(f"{s['name']} / teacher: {s['examples_per_s'] / rows[0]['examples_per_s']:.2f}x the examples/s, "
                        f"single requests {latency_ratio(rows[0]['p50_ms'], s['p50_ms'])}." for s in rows[1:])]
        lora = any(s["name"] == "student-lora" for s in rows)  # (a note on it where its row is missing named a row not there)
        lines += ["", f"Speed on {rows[0]['rows']} texts of {TASK.test_name}, {rows[0]['threads']} torch threads, tokenization included; "
                  "each model merged into a plain transformers model" + (" (student-lora, the 6-layer LoRA student, merges into "
                  "a plain 6-layer MiniLM: the MiniLM teacher's speed)." if lora else ".")]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(TASKS), default="sst2", help="SST-2 (default) or emotion")
    p.add_argument("--stages", default=",".join(STAGES[:-1]), help=f"a subset of {','.join(STAGES)}")
    p.add_argument("--teacher", help="a finished teacher run to use instead of training one (e.g. runs/minilm-sst2-lora)")
    p.add_argument("--teacher-recipe", help="the recipe of the teacher stage (default: the task's MiniLM recipe, with "
                   "--teacher-overrides' default); e.g. recipes/smollm2-135m/sst2-head-lora.yaml, best with a --tag")
    p.add_argument("--reuse-label-only", action="store_true",
                   help="with --tag: take the label-only runs (which no teacher changes) from the untagged results "
                        "where they are stored, instead of training them again")
    p.add_argument("--fractions", help="percent of the train rows with labels, comma-separated, each > 0 and <= 100 "
                   "(default 100,10,1; with --smoke 10,100)")
    p.add_argument("--train-rows", type=int, help="use only this many train rows in all (a quick look; 0 = all)")
    p.add_argument("--student", nargs="*", default=[], help="extra overrides of every student run")
    p.add_argument("--teacher-overrides", nargs="*",
                   help="overrides of the teacher run (default: SST-2: LoRA r16 on every linear layer, "
                        f"{' '.join(STRONG_TEACHER)}; emotion: none, its recipe has that adapter)")
    p.add_argument("--extra-layers", default="2", help="also distil students of these depths (all labels; '' for none)")
    p.add_argument("--layer-twins", action="store_true",
                   help="also train each --extra-layers student on labels alone (labels-100-lN), e.g. --extra-layers 6: the "
                        "whole MiniLM, every weight trained, a plain small model")
    p.add_argument("--no-lora-student", dest="lora_student", action="store_false",
                   help="skip the 6-layer MiniLM + LoRA r8 students (label-only and distilled, 100%% of the labels)")
    p.add_argument("--speed-rows", type=int, help="test rows timed (default: all; SST-2 dev has 872, emotion test 2,000)")
    p.add_argument("--requests", type=int, default=100, help="single requests timed for the p50 latency")
    p.add_argument("--smoke", action="store_true", help="tiny: 400 train rows, 4 steps a run, --fractions 10,100, apart (--tag smoke); "
                   "--train-rows, --fractions, --speed-rows and --tag given are kept")
    p.add_argument("--tag", default="", help="keep these runs and results apart")
    p.add_argument("--fresh", action="store_true")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args()
    global RUNS, OUT, TASK, BASE_OUT, REUSE_LABEL_ONLY
    TASK = TASKS[args.task]
    teacher_recipe = args.teacher_recipe or TASK.teacher
    if args.teacher_overrides is None:
        args.teacher_overrides = list(TASK.teacher_overrides) if teacher_recipe == TASK.teacher else []
    if args.task != "sst2":
        RUNS, OUT = RUNS.with_name(f"distill-bench-{args.task}"), OUT.with_name(f"distillation-{args.task}")
    if args.smoke:
        args.tag, args.train_rows = args.tag or "smoke", args.train_rows or 400
        args.speed_rows, args.requests = args.speed_rows or 64, min(args.requests, 10)
    if args.fractions is None:  # only when not given: an empty --fractions= is refused below (it meant the default and trained)
        args.fractions = "10,100" if args.smoke else "100,10,1"
    # checked before any run: --fractions 0 trained three runs, then divided by zero; 150 labelled every row and reported
    # "150%"; a negative --train-rows silently dropped the last rows; --requests 0 failed in the speed stage
    fractions = fractions_arg(p, args.fractions, 100, "percents", "a percent of the train rows", "100,10,1")
    if args.train_rows is not None and args.train_rows < 0:
        p.error(f"--train-rows {args.train_rows}: give at least 1 row, or 0 (or leave it out) for all of them")
    if args.speed_rows is not None and args.speed_rows < 0:
        p.error(f"--speed-rows {args.speed_rows}: give at least 1 test row, or 0 (or leave it out) for all of them")
    if args.requests < 1:
        p.error(f"--requests {args.requests}: give at least 1 single request to time (default 100)")
    try:
        args.extra_layers = [int(n) for n in args.extra_layers.split(",") if n]
    except ValueError:
        p.error(f"--extra-layers {args.extra_layers}: expected comma-separated layer counts, e.g. 2 or 2,6 ('' for none)")
    if bad := [n for n in args.extra_layers if n < 1]:
        p.error(f"--extra-layers: {', '.join(map(str, bad))}: a student has at least 1 layer")
    BASE_OUT, REUSE_LABEL_ONLY = OUT, args.reuse_label_only
    if args.reuse_label_only and not args.tag:
        p.error("--reuse-label-only takes the label-only runs of the untagged benchmark: give this one a --tag")
    if args.tag:
        RUNS, OUT = RUNS.with_name(f"{RUNS.name}-{args.tag}"), OUT.with_name(f"{OUT.name}-{args.tag}")
    args.fractions = fractions
    stages = args.stages.split(",")
    if bad := [s for s in stages if s not in STAGES]:
        p.error(f"unknown stage(s) {bad}: {STAGES}")
    teacher = Path(args.teacher) if args.teacher else RUNS / "teacher"
    args.teacher_name = args.teacher or teacher_recipe
    training_teacher = "precision" in stages or ("teacher" in stages and not args.teacher)
    rows = [f"data.train.path={split_train(1.0, args.train_rows)[0]}"] if args.train_rows and training_teacher else []
    teacher_overrides = [*rows, *(SMOKE if args.smoke else []), *args.teacher_overrides]
    if "teacher" in stages and not args.teacher:
        case("teacher", teacher_recipe, teacher_overrides, args)
    if "precision" in stages:
        for name, extra in PRECISION_CHECK.items():
            case(name, teacher_recipe, [*teacher_overrides, *extra], args)
    if "students" in stages:
        if not (teacher / "run.json").is_file():
            p.error(f"no finished teacher at {teacher}: run --stages teacher first, or give --teacher RUN")
        students(teacher, args)
    if "speed" in stages:
        speed("teacher", teacher, args)
        biggest = max(args.fractions)
        speed("student", RUNS / f"distill-{biggest:g}", args)
        for layers in args.extra_layers:
            speed(f"student-l{layers}", RUNS / f"distill-100-l{layers}", args)
        if (RUNS / "lora-distill-100" / "run.json").is_file():
            speed("student-lora", RUNS / "lora-distill-100", args)  # the whole MiniLM: the teacher's speed if MiniLM teaches
    text = report(args)
    write_result(OUT.with_suffix(".md"), text + "\n")
    print(text)


if __name__ == "__main__":
    main()
