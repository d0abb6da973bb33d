"""`peftlab` command line: train | eval | merge | publish | compose | select | validate | env.

The one way in: the `peftlab` console script, `python -m peftlab` (peftlab/__main__.py) and the ranks that
`accelerate launch -m peftlab train ...` starts all enter `main` here, which calls down into run/export/publish.
User mistakes (PeftlabError) print one clear message and exit 2; `--debug` shows the traceback too.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import signal
import sys
import threading
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import PeftlabError, TrainingInterrupted

if TYPE_CHECKING:
    from .rundir import RunRecord

log = logging.getLogger("peftlab")
QUICKSTART = files("peftlab") / "recipes" / "quickstart.yaml"
FULL_SIZE = "recipes/minilm/sst2-lora.yaml"


def _names_a_recipe(item: str) -> bool:
    """A recipe file's path, not a KEY=VALUE override: no '=', a file, or a .yaml/.yml path whose part before the '='
    holds a '/' (no key does: runs/lr=1e-3/recipe.yaml mistyped is a missing recipe, not the key 'runs/lr')."""
    key = item.partition("=")[0]
    return "=" not in item or Path(item).is_file() or (item.endswith((".yaml", ".yml")) and ("/" in key or os.sep in key))


def _split_recipe_args(items: list[str]) -> tuple[str | None, list[str]]:
    """`RECIPE.yaml key=value ...` -> (recipe or None, overrides). A first item that is a file is the recipe even when
    its path holds '=' (runs/lr=1e-3/recipe.yaml), as `validate` reads it. A recipe after the first item is refused (it
    ran the quickstart, or the first recipe, and called the file a malformed override)."""
    recipe, overrides = (items[0], items[1:]) if items and _names_a_recipe(items[0]) else (None, items)
    if late := [o for o in overrides if "=" not in o and o.endswith((".yaml", ".yml"))]:
        rest = " ".join(o for o in overrides if o != late[0])
        raise PeftlabError(f"'{late[0]}' comes after {recipe!r}: give one recipe, first, then the KEY=VALUE overrides: "
                           f"{recipe} {rest}" if recipe else f"'{late[0]}' comes after the override(s): give the recipe first, "
                           f"then the KEY=VALUE overrides: {late[0]} {rest}")
    return recipe, overrides


def _keys_epilog() -> str:
    from .config import describe_fields

    rows = [f"  {k:<30} {h} (default {d})" for k, d, h in describe_fields()]
    return "recipe keys (YAML sections, or KEY=VALUE overrides):\n" + "\n".join(rows)


def cmd_train(args) -> int:
    from .config import load_recipe
    from .run import run

    recipe_path, overrides = _split_recipe_args(args.items)
    if recipe_path is None:
        log.info("no recipe given: running the built-in quickstart (%s). Full-size recipe: %s", QUICKSTART, FULL_SIZE)
        recipe_path = str(QUICKSTART)
    recipe = load_recipe(recipe_path, overrides)
    if args.launch or args.num_processes is not None:  # validated once here; now the same run on N processes (peftlab/launch.py)
        from .launch import launch
        from .run import check_data_and_base
        from .rundir import choose_flag

        check_data_and_base(recipe, recipe_path)  # a data or base mistake: one message here, not one per rank and a traceback

        return launch(args.launch, recipe_path, overrides, num_processes=args.num_processes, resume=args.resume,
                      overwrite=args.overwrite, out=recipe.out, flags=global_flags(args), choose=choose_flag(recipe))
    summary = run(recipe, resume=args.resume, overwrite=args.overwrite)
    from accelerate import PartialState

    if PartialState().is_main_process:  # under `accelerate launch` every rank gets here
        print_summary(summary)
    return 0


def cmd_eval(args) -> int:
    from .publish import load_adapter
    from .run import EVAL_DIR, check_evaluation, evaluate, overrides_tag

    # `eval --adapter ID KEY=VALUE`: the first override lands in `out` (a folder whose path holds '=' stays the run)
    if args.out and "=" in args.out and not Path(args.out).expanduser().is_dir():
        args.overrides, args.out = [args.out, *args.overrides], None
    if args.adapter and args.out:  # (it evaluated --adapter and dropped the folder given, silently)
        raise PeftlabError(f"eval: give a run folder ({args.out}) or --adapter ({args.adapter}), not both.")
    target = args.adapter or args.out
    if not target:
        raise PeftlabError("eval needs a run folder (peftlab eval runs/NAME) or an adapter (--adapter NAMESPACE/NAME or a folder).")
    check_local_target(target)
    folder = load_adapter(target, endpoint=args.endpoint, revision=args.revision)  # (under --launch: downloaded once, here)
    # a local folder: evaluate decides (a run's own eval-SPLIT.json; with overrides, or for a published folder,
    # runs/eval/NAME-TAG/); a hub adapter's go to runs/eval/ under its id, never into the download cache
    results = None
    if not Path(target).expanduser().is_dir():
        name = target.replace("/", "__") + (f"@{args.revision}" if args.revision else "")
        results = EVAL_DIR / (f"{name}-{overrides_tag(args.overrides)}" if args.overrides else name)
    if args.launch or args.num_processes is not None:  # the same evaluation on N processes (peftlab/launch.py)
        from .launch import launch_eval

        check_evaluation(folder, args.split, args.overrides, results)  # a mistake: one message here, not one per rank
        given = [args.out] if args.out else ["--adapter", args.adapter]
        given += [*(o for k in ("endpoint", "revision") if getattr(args, k) for o in (f"--{k}", getattr(args, k))), "--split", args.split]
        return launch_eval(args.launch, [*given, *args.overrides], num_processes=args.num_processes, flags=global_flags(args))
    metrics = evaluate(folder, split=args.split, overrides=args.overrides, results_dir=results)
    from accelerate import PartialState

    if PartialState().is_main_process:  # under `accelerate launch` every rank gets here
        from .rundir import json_text

        print(json_text({"split": args.split, **metrics}, indent=2))
    return 0


def global_flags(args) -> list[str]:
    """The command's -q / --debug, for the processes a --launch starts."""
    return [flag for flag, on in (("-q", args.quiet), ("--debug", args.debug)) if on]


def check_local_target(target: str) -> None:
    """A target that reads as a path (runs/typo, ./x, a name without NAMESPACE/) and does not exist is a missing folder,
    not a Hub id to download: say so, with the folders beside it."""
    from .errors import ArtifactError

    path = Path(target).expanduser()
    first = target.split("/")[0]
    looks_local = target.startswith((".", "/", "~")) or target.count("/") != 1 or Path(first).is_dir() or first == "runs"
    if path.exists() or not looks_local:
        return
    parent = path.parent if path.parent.is_dir() and path.parent != Path(".") else None
    siblings = sorted(p.name for p in parent.iterdir() if p.is_dir()) if parent else []
    close = difflib.get_close_matches(path.name, siblings, n=1)
    hint = f" Did you mean {parent / close[0]}?" if close else f" {parent}/ holds: {', '.join(siblings[:10])}." if siblings else ""
    raise ArtifactError(f"run folder '{target}' does not exist.{hint} Pass the output directory of a training run "
                        "(peftlab eval runs/NAME), or a Hub adapter as NAMESPACE/NAME.")


def cmd_merge(args) -> int:
    from .export import merge

    if args.gguf:
        from .to_gguf import check_run

        check_run(Path(args.out), args.overrides)  # before the merge writes: a model GGUF export would then refuse
    target = merge(Path(args.out), force=args.force, overrides=args.overrides)
    print(f"merged model: {target}")
    if args.gguf:
        from .to_gguf import write_gguf

        # beside the merged safetensors; a run holding a full model (nothing to merge) gets it in RUN/ itself. A merge
        # that rewrites RUN/merged (new adapter, --force) swaps the whole folder: no GGUF of older weights survives it.
        dest = target / f"model-{args.gguf}.gguf"
        if dest.exists() and not args.force:
            log.info("%s exists: left as it is (--force writes it again)", dest)
        else:
            write_gguf(target, dest, args.gguf, overwrite=True)
        print(f"GGUF: {dest}")
    return 0


def cmd_validate(args) -> int:
    from .config import load_recipe
    from .rundir import check_no_foreign_files, check_writable, choose_flag

    # KEY=VALUE overrides may come positionally, as with `train` (a file whose name holds '=' stays a recipe)
    overrides = [a for a in args.recipes if not _names_a_recipe(a)] + args.overrides
    recipes = [a for a in args.recipes if a not in overrides] or [str(QUICKSTART)]
    failed = 0
    for path in recipes:
        stage = "recipe"
        try:
            recipe = load_recipe(path, overrides, validate_files=not args.no_files)
            stage = "data"
            if not args.no_files:  # what training checks before any work: columns, the base, trackers, the teacher
                from .run import check_data_and_base

                check_data_and_base(recipe, path)
            flag = choose_flag(recipe)  # what `train` refuses of its output folder before any work, also without --no-files
            check_writable(recipe.out, flag=flag)
            check_no_foreign_files(recipe.out, flag)
            print(f"ok      {path}")
        except PeftlabError as e:  # (a ConfigError lists every problem; another project error is one)
            failed += 1
            print(f"INVALID {path}: {e}")
            if stage == "recipe" and not args.no_files:  # the checks against the data and the base need a valid recipe
                print("        (its data columns, base model and tokenizer are checked once these are fixed)")
    return 2 if failed else 0


def cmd_env(args) -> int:
    import torch

    from .accel import resolve_precision
    from .bases import resolve_model_path
    from .export import hardware, versions
    from .packaged import PACKAGED_MODELS

    env = {"versions": versions(), "hardware": hardware(), "cuda": torch.cuda.is_available(),
           "precision_auto": resolve_precision("auto"), "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE", "0"),
           "packaged_models": {}, "shared_data": str(Path("../shared/data").resolve()) if Path("../shared/data").is_dir() else None}
    for name in PACKAGED_MODELS:
        try:
            env["packaged_models"][name] = resolve_model_path(name)
        except PeftlabError as e:
            env["packaged_models"][name] = f"missing: {e}"
    print(json.dumps(env, indent=2))
    return 0


def cmd_publish(args) -> int:
    from .publish import publish

    result = publish(args.out, args.repo_id, private=args.private, revision=args.revision, endpoint=args.endpoint,
                     exist_ok=args.exist_ok, dry_run=False if args.dry_run is None else args.dry_run, to=args.to, git_remote=args.git_remote,
                     base_model=args.base_model, license=args.license)
    if not result["uploaded"]:
        print(f"{'dry run: ' if args.dry_run else ''}wrote {len(result['files'])} files to {result['destination']}"
              + (" (nothing uploaded)" if args.dry_run else ""))
    else:
        print(f"published {args.out} ({len(result['files'])} files) to {result['destination']}"
              + (f" branch {result['branch']}" if result.get("branch") else f" ({args.revision})" if args.revision else "")
              + (f", commit {result['commit'][:12]}" if result.get("commit") else "")
              + (" (already up to date)" if result.get("unchanged") else ""))
    return 0


def cmd_compose(args) -> int:
    from .compose import compose

    target = compose(args.runs, args.weights, args.out, method=args.method, density=args.density, seed=args.seed, rank=args.rank,
                     overwrite=args.overwrite)
    print(f"composed adapter: {target}  (evaluate it: peftlab eval {target})")
    return 0


def cmd_select(args) -> int:
    from .rundir import atomic_write_text
    from .select import format_table, load_selection_recipe, ranked_by, select, to_json, unranked

    candidates, late = _list_and_overrides(args.candidates)
    methods, late_m = _list_and_overrides(args.methods)
    proxies, late_p = _list_and_overrides(args.proxies)
    proxies = list(dict.fromkeys(proxies))  # (as select runs them: --json recorded [probe, probe] as typed)
    recipe_path, overrides = _split_recipe_args([*args.items, *late, *late_m, *late_p])
    if recipe_path is None:
        raise PeftlabError("select needs a classification recipe: peftlab select RECIPE.yaml --candidates BASE [BASE ...]")
    extra: dict[str, list[str]] = {}
    for item in args.set:
        head, sep, value = item.partition("=")
        name, colon, key = head.rpartition(":")
        if not sep or not colon or not name or not key:
            raise PeftlabError(f"--set {item!r}: expected NAME:KEY=VALUE, NAME a candidate or a method, e.g. --set full:train.lr=5e-5")
        extra.setdefault(name, []).append(f"{key}={value}")
    methods = methods or None
    recipe = load_selection_recipe(recipe_path, overrides)
    if args.json:  # before the work, not after it
        d = recipe.data
        check_json_target(Path(args.json), [recipe_path, *(s.path for s in (d.train, d.eval, d.test) if s and s.path)], args.overwrite)
    try:
        rows = select(recipe, candidates, methods, proxies=proxies, rank_by=args.rank_by, max_rows=args.max_rows,
                      folds=args.folds, steps=args.steps, overrides=extra)
    except TrainingInterrupted as e:  # a Ctrl-C or SIGTERM in the steps proxy: exit 130 / 143 (main), nothing written
        if args.json:
            kept = " (the existing file is as it was)" if Path(args.json).exists() else ""
            raise TrainingInterrupted(f"{e} --json {args.json} was not written{kept}.", code=e.code) from None
        raise
    rank_by = ranked_by(proxies, args.rank_by)
    print(format_table(rows, rank_by, recipe_path))
    if nothing := unranked(rows, rank_by):  # no ranking, which the command is for: exit 2, as where every candidate failed
        raise PeftlabError(f"peftlab select: {nothing}" + (f" --json {args.json} was not written." if args.json else ""))
    if args.json:
        settings = {"overrides": overrides, "set": args.set, "candidates": candidates, "methods": methods, "proxies": proxies,
                    "max_rows": args.max_rows, "folds": args.folds, "steps": args.steps, "seed": recipe.train.seed,
                    "data_seed": recipe.data_seed}
        atomic_write_text(Path(args.json), json.dumps(to_json(rows, rank_by, recipe_path, settings), indent=2))
        print(f"written: {args.json}")
    return 0


def _list_and_overrides(values: list[str] | None) -> tuple[list[str] | None, list[str]]:
    """A list option's values less the KEY=VALUE overrides that followed them (`--proxies probe data.max_length=24`:
    nargs="+" takes them too) -> (values, overrides). A file whose name holds '=' stays a value (a base's folder)."""
    late = [v for v in values or [] if "=" in v and not Path(v).exists()]
    return (None if values is None else [v for v in values if v not in late]), late


def check_json_target(path: Path, inputs: list[str], overwrite: bool) -> None:
    """select's --json: a file that can be made; an existing one replaced only with --overwrite, and never a file the
    selection reads (the recipe, its data): `--json recipe.yaml` destroyed the recipe it ranked."""
    from .errors import ArtifactError
    from .export import check_destination

    check_destination(path, "--json", folder=False)
    if not path.exists():
        return
    for given in inputs:
        try:
            same = os.path.samefile(path, given)
        except OSError:  # (an input not there: a hub split, a missing eval file)
            same = False
        if same:
            raise ArtifactError(f"--json {path} is {given}, which this selection reads: writing the table there would destroy "
                                "it. Choose another file: --json FILE, e.g. --json runs/select.json.")
    if not overwrite:
        raise ArtifactError(f"--json {path} exists: select would replace it. Pass --overwrite to replace it, or choose a new "
                            "file: --json FILE.")


def rate(x: float) -> str:
    """A per-second figure to one decimal, or two significant digits below 1 (an LLM on CPU: 0.036, not 0.0)."""
    return f"{x:.1f}" if x >= 1 or x == 0 else f"{x:.2g}"


def print_summary(s: RunRecord) -> None:
    """The run's closing lines: what was learned, at what cost, and where the artifacts are."""
    from .tasks import get_task

    lines = [f"\n== {s.name}: {s.method} on {s.base_model}"
             + (f" (base {s.quantization})" if s.quantization != "none" else "")]
    for split, m in s.metrics.items():
        line = get_task(s.task).summary_line(split, m)
        label = s.split_label(split)  # keep_best chose the weights on one split: its figure is not a held-out one
        lines.append(line + (f"   <- {label[len(split) + 2:-1]}" if label != split else ""))
    if s.selected_on in s.metrics and len(s.metrics) == 1:
        lines.append(f"   ({s.selected_on} chose the exported step, so its figure is optimistic: add data.test for a held-out one)")
    lines.append(f"   trainable params {s.trainable_params:,} of {s.total_params:,} ({s.trainable_percent:.3f}%)")
    lines.append(f"   train wall time {s.train_wall_s:.1f}s, {s.steps} steps, {rate(s.examples_per_s)} examples/s, "
                 f"precision {s.precision}, {s.processes} process(es)")
    lines.append(f"   artifacts: {s.output_dir}" + (f"   merged: {s.merged_dir}" if s.merged_dir else ""))
    print("\n".join(lines))


class Parser(argparse.ArgumentParser):
    """argparse reads a command's positionals in one run, so `train R --overwrite train.lr=1e-3` leaves the override
    unrecognised: KEY=VALUE arguments left over after the flags join the command's list named by `late_overrides`."""

    def parse_args(self, args=None, namespace=None):
        ns, extra = self.parse_known_args(args, namespace)
        late = [a for a in extra if "=" in a and not a.startswith("-")]
        rest = [a for a in extra if a not in late]
        dest = getattr(ns, "late_overrides", None)
        if late and dest:
            setattr(ns, dest, [*(getattr(ns, dest) or []), *late])
        elif late:
            rest = extra
        if rest:
            self.error(f"unrecognized arguments: {' '.join(rest)}")
        return ns


def add_launch_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--launch", metavar="PRESET", help=f"{what} on several processes through Accelerate's launcher: "
                        "multi_gpu, fsdp, deepspeed-zero2, deepspeed-zero3 or cpu-ddp (presets in peftlab/launch_presets/)")
    parser.add_argument("--num-processes", type=int, metavar="N", help="processes for --launch (default: every GPU; cpu-ddp: 2)")


def build_parser() -> argparse.ArgumentParser:
    from .config import EVAL_SPLITS

    p = Parser(prog="peftlab", description="Parameter-efficient fine-tuning from YAML recipes.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings, errors and the results: no progress bars or log")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a recipe, evaluate, export (and merge)", epilog=_keys_epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("items", nargs="*", default=[], metavar="RECIPE.yaml [KEY=VALUE ...]",
                   help="recipe file (omit for the built-in quickstart) and dotted overrides, e.g. train.lr=1e-4")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output directory")
    t.add_argument("--overwrite", action="store_true", help="replace a previous run in the output directory")
    add_launch_arguments(t, "run")
    t.set_defaults(fn=cmd_train, late_overrides="items")

    e = sub.add_parser("eval", help="evaluate a finished run (adapter, full model or merged folder) or a published adapter")
    e.add_argument("out", nargs="?", help="output directory of a run (runs/sst2-lora, runs/sst2-lora/merged) or a hub id")
    e.add_argument("--adapter", help="a published adapter: hub id NAMESPACE/NAME (downloaded) or a folder; the base model comes "
                   "from its recipe unless you override model.name=...")
    e.add_argument("--endpoint", help="hub endpoint (default: huggingface.co or HF_ENDPOINT)")
    e.add_argument("--revision", help="hub revision of --adapter")
    e.add_argument("--split", default="eval", choices=EVAL_SPLITS,
                   help="eval: the split the run selected on (data.eval, or the seeded data.eval_holdout part of train, "
                        "rebuilt from the train file); test: data.test (default: eval)")
    e.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE", help="e.g. data.eval.path=other.tsv; results then go to "
                   "runs/eval/NAME-TAG/, never over the run's own eval-SPLIT.json")
    add_launch_arguments(e, "evaluate (each process scores a share of the rows)")
    e.set_defaults(fn=cmd_eval, late_overrides="overrides")

    m = sub.add_parser("merge", help="fold the adapter (LoRA, DoRA, IA3, LoHa, ...: any but the prompt methods) into its base -> "
                                     "OUT/merged (standalone transformers model)")
    m.add_argument("out", help="output directory of a finished run (its adapter is merged into OUT/merged)")
    m.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE", help="model.name=FOLDER: the base, where the recipe's is "
                                                                   "not here (a published adapter of a local base)")
    m.add_argument("--force", action="store_true", help="merge again even if OUT/merged matches the adapter")
    m.add_argument("--gguf", nargs="?", const="f16", choices=("f16", "f32"), metavar="{f16,f32}",
                   help="also write OUT/merged/model-DTYPE.gguf for llama.cpp (Llama-architecture LLMs with a byte-level "
                        "BPE tokenizer; default f16; kept if it exists, unless --force)")
    m.set_defaults(fn=cmd_merge, late_overrides="overrides")

    v = sub.add_parser("validate", help="check recipes without training: every problem of the recipe, then (once it has none) its data and base")
    v.add_argument("recipes", nargs="*", default=[], metavar="RECIPE.yaml [KEY=VALUE ...]",
                   help="recipe files (none: the built-in quickstart) and dotted overrides applied to each")
    v.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="an override applied to every recipe given (repeatable; a positional KEY=VALUE does the same)")
    v.add_argument("--no-files", action="store_true", help="check the recipe alone: not the data (data.train given, files present, their "
                   "columns), the base (found, its layers, target_modules), the trackers or the teacher run")
    v.set_defaults(fn=cmd_validate, late_overrides="recipes")

    env = sub.add_parser("env", help="versions, hardware and what peftlab can reach here")
    env.set_defaults(fn=cmd_env)

    pub = sub.add_parser("publish", help="publish a finished run: Hub repo (model card included), a directory or a git remote")
    pub.add_argument("out", help="output directory of a run, e.g. runs/sst2-quickstart")
    pub.add_argument("--repo-id", metavar="NAMESPACE/NAME", help="Hub repo to create/update, e.g. alice/minilm-sst2-lora")
    pub.add_argument("--private", action="store_true", help="create the Hub repo private")
    pub.add_argument("--revision", metavar="BRANCH", help="branch to commit to (created if missing; default main)")
    pub.add_argument("--exist-ok", action="store_true", help="add a commit to a repo that already exists")
    pub.add_argument("--endpoint", metavar="URL", help="Hub endpoint (default: HF_ENDPOINT or https://huggingface.co)")
    pub.add_argument("--dry-run", nargs="?", const=True, metavar="DIR",
                     help="only write the folder that would be uploaded, to OUT/publish (or DIR)")
    pub.add_argument("--to", metavar="DIR", help="publish to a local directory instead of the Hub")
    pub.add_argument("--git-remote", metavar="URL", help="commit the folder to this git remote (branch --revision) and push")
    pub.add_argument("--base-model", metavar="HUB_ID", help="hub id of the base (OWNER/NAME or a canonical id like bert-base-uncased) for the card when "
                     "model.name is a local folder")
    pub.add_argument("--license", help="licence id for the card (default: the base's when known, else 'unknown')")
    pub.set_defaults(fn=cmd_publish)

    comp = sub.add_parser("compose", help="combine LoRA adapters of one base (peft add_weighted_adapter) into a new adapter")
    comp.add_argument("runs", nargs="+", metavar="OUT", help="output directories of two or more LoRA runs on the same base")
    comp.add_argument("--weights", nargs="+", type=float, required=True, help="one weight per run, e.g. --weights 0.7 0.3")
    comp.add_argument("--method", default="linear", choices=("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "cat", "svd"),
                      help="peft's combination; cat is the exact weighted sum of the adapters' updates (linear mixes A and B "
                           "apart, with cross terms); svd is that sum cut to its best approximation of rank --rank")
    comp.add_argument("--rank", type=int, help="--method svd: the composed adapter's rank (default: the largest of the "
                                               "adapters'; their sum keeps the weighted sum exact)")
    comp.add_argument("--density", type=float, help="fraction of weights kept by ties/dare/magnitude_prune (default 0.5)")
    comp.add_argument("--seed", type=int, default=0, help="seed of dare's random pruning")
    comp.add_argument("--out", required=True, metavar="DIR", help="where the composed adapter is written")
    comp.add_argument("--overwrite", action="store_true", help="replace an earlier composition in --out (refused when it holds "
                                                                "files compose does not write: eval results, a card, notes)")
    comp.set_defaults(fn=cmd_compose)

    sel = sub.add_parser("select", help="rank candidate bases (and methods) for a classification recipe from its train split, "
                         "before fine-tuning: linear probe, LogME, a few training steps")
    sel.add_argument("items", nargs="*", default=[], metavar="RECIPE.yaml [KEY=VALUE ...]", help="a classification recipe and dotted overrides")
    sel.add_argument("--candidates", nargs="+", required=True, metavar="BASE",
                     help="bases to rank: anything model.name accepts (minilm, a folder, a GGUF folder, a hub id)")
    sel.add_argument("--methods", nargs="+", metavar="METHOD", help="also rank these adapter methods on each base "
                     "(default: the recipe's); only the steps proxy tells methods apart")
    sel.add_argument("--proxies", nargs="+", default=["probe", "logme"], metavar="PROXY",
                     help="probe (k-fold linear probe on frozen features), logme (LogME evidence), steps (a short real run "
                          "of the candidate's recipe scored on a held-out fold of train); default: probe logme")
    sel.add_argument("--rank-by", metavar="PROXY", help="the proxy that orders the table (default: probe, else the first)")
    sel.add_argument("--max-rows", type=int, default=1000, metavar="N", help="training rows sampled (seeded) for the estimates (default %(default)s)")
    sel.add_argument("--folds", type=int, default=5, metavar="K", help="cross-validation folds; the steps proxy holds out one (default %(default)s)")
    sel.add_argument("--steps", type=int, default=30, metavar="N", help="optimizer steps of the steps proxy's run (default %(default)s)")
    sel.add_argument("--set", action="append", default=[], metavar="NAME:KEY=VALUE",
                     help="an override for one candidate or method, e.g. --set full:train.lr=5e-5 (repeatable)")
    sel.add_argument("--json", metavar="OUT", help="also write the rows as JSON")
    sel.add_argument("--overwrite", action="store_true", help="replace an existing --json file (never the recipe or a data "
                                                              "file the selection reads)")
    sel.set_defaults(fn=cmd_select, late_overrides="items")
    return p


def _quiet_libraries() -> None:
    """Library chatter (per-split progress bars, the 'classifier newly initialised' load report) hides our own
    log; peftlab reports what matters itself (the new head is logged with the parameter counts)."""
    import warnings

    import datasets
    import transformers

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated")  # raised inside peft
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")  # every 8-bit forward (older bitsandbytes: a warning)
    # peft's generic pattern check on loading an AdaLoRA adapter: its rank_pattern keys name the lora_E vectors, which
    # AdaLoRA itself resizes by (the reloaded and merged model equal the trained one); it read as if the ranks were dropped
    warnings.filterwarnings("ignore", message=r"The following rank_pattern keys did not match any targeted module.*lora_E")
    # (bitsandbytes' probe for an optional CPU kernel: quieted on importing peftlab, peftlab/__init__.py)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # under `accelerate launch` every rank runs this: rank 0 logs (one copy of the progress log and its warnings), the
    # others only their errors
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.ERROR if rank else logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    for noisy in ("httpx", "urllib3", "datasets", "filelock", "accelerate"):  # accelerate: a line per checkpoint file
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _quiet_libraries()
    if (world := int(os.environ.get("WORLD_SIZE", "1"))) > 1 and args.fn not in (cmd_train, cmd_eval):
        if not rank:  # each rank would do the whole work and write the same files (select's steps proxy: a DDP run)
            print(f"error: `peftlab {args.command}` runs in one process, and `accelerate launch` started {world}. Run it "
                  "without accelerate launch: only train and eval use several processes.", file=sys.stderr)
        return 2
    if "WORLD_SIZE" not in os.environ and "ACCELERATE_DYNAMO_BACKEND" in os.environ and "MASTER_ADDR" in os.environ:
        # accelerate's one-process launcher sets MASTER_ADDR only where it was given --num_processes > 1
        log.warning("`accelerate launch` was given several processes but started one (without --multi_gpu, or a config "
                    "saying so, it runs one). On CPU: ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N "
                    "..., or `peftlab train RECIPE --launch cpu-ddp --num-processes N`.")
    try:
        with sigterm_unwinds(), quieted(args.quiet and not rank):  # (the other ranks of a launch say only their errors)
            return args.fn(args)
    except TrainingInterrupted as e:
        if not rank:  # (every rank stopped with the same checkpoint; one says so)
            print(f"stopped: {e}", file=sys.stderr)
        return e.code
    except PeftlabError as e:
        if args.debug:  # the traceback too; the status stays what scripts test for
            import traceback

            traceback.print_exc()
        if not handed_to_launcher(f"error: {e}", 2):  # (under --launch it prints the first rank's, once, last)
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug or not lost_peer(e):
            raise
        # another rank failed (its error is printed once) and this one's collective broke: one line, not a traceback
        print(f"rank {rank} stopped: its connection to the run's other processes broke ({type(e).__name__}: "
              f"{str(e).strip().splitlines()[0][:200]}), most likely because another process failed: see that error.",
              file=sys.stderr)
        return 1


@contextmanager
def quieted(quiet: bool):
    """-q: the peftlab logger at WARNING while the command runs, which hides its progress bars and evaluation lines too
    (accel.progress_shown); its level is put back afterwards (main runs in-process in tests and notebooks)."""
    logger = logging.getLogger("peftlab")
    before = logger.level
    if quiet:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(before)


@contextmanager
def sigterm_unwinds():
    """A SIGTERM (a `kill`, a scheduler's notice) outside training ends the command as Ctrl-C does, by an exception:
    every write in progress removes its temporary file (killed at once, a predictions file's or a cache's stayed), and
    the exit status is 143. Training has its own handler inside (it saves a checkpoint first)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        print("terminated (SIGTERM)", file=sys.stderr)
        raise SystemExit(128 + signum)

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def lost_peer(error: Exception) -> bool:
    """A process of a multi-process run whose collective failed because a peer went away (gloo: 'Connection closed by
    peer'; torch's DistError family)."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False
    import torch.distributed

    text = str(error)
    return isinstance(error, getattr(torch.distributed, "DistError", ())) or (
        isinstance(error, RuntimeError) and any(s in text for s in ("closed by peer", "reset by peer", "Broken pipe", "gloo")))


def handed_to_launcher(message: str, code: int) -> bool:
    """Under `--launch`: the first rank to fail leaves its message and status for the launcher, which prints it
    once after the ranks ended and exits with that status (peftlab/launch.py); the others' are dropped. False elsewhere."""
    from .launch import ERROR_FILE_ENV

    if not (path := os.environ.get(ERROR_FILE_ENV)):
        return False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return True  # another rank's came first
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"message": message, "code": code}, f)
    return True


if __name__ == "__main__":
    sys.exit(main())
