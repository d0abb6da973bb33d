"""Training across processes through Accelerate: real 2-rank runs on CPU (gloo), the `--launch` CLI, the presets.

Invariant: 2 processes x batch B = 1 process x batch 2B. Accelerate's seedable sampler draws the same permutation on
every rank (seed = train.seed + epoch) and deals batch i to rank i % 2, so one optimizer step of 2 ranks sees exactly
the 2B rows of the one-process step; DDP averages the two gradients into the gradient of the 2B mean. It holds with
no dropout (the tiny models have none) and train rows divisible by 2B (README Journey 2 says why).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from peftlab import run
from peftlab.cli import main
from peftlab.launch import LaunchError, launch_command, preset_path, presets

from .conftest import REPO, synthetic_rows, write_tsv

PRESETS = ["cpu-ddp", "deepspeed-zero2", "deepspeed-zero3", "fsdp", "multi_gpu"]
LAUNCH_2_CPU = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]


def env() -> dict[str, str]:
    """What the launched ranks need: one thread each (2 cores), offline, gloo on CPU, this checkout importable."""
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    e.update(OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
             TOKENIZERS_PARALLELISM="false", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return e


def sh(cmd: list[str], cwd) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def train_log(out) -> list[dict]:
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]


@pytest.fixture
def odd_eval(make_recipe, tmp_path):
    """The tiny-BERT recipe with a 63-row eval split: in batches of 8 on 2 ranks, rank 1's last batch is topped up."""
    dev = write_tsv(tmp_path / "dev63.tsv", synthetic_rows(63, 2))
    ov = {"data.eval.path": dev, "eval.batch_size": 8, "train.precision": "fp32", "train.seed": 3, "train.epochs": 2}
    return tmp_path / "recipe.yaml", ov, lambda **more: make_recipe({**ov, **more})


def test_two_processes_match_one_process_with_twice_the_batch(odd_eval, tmp_path):
    """(a) a real 2-rank run, (b) its loss curve and adapter equal the 1-rank run's, checkpoints hold both ranks' state,
    and its evaluation counts each of the 63 rows once."""
    recipe_file, ov, make = odd_eval
    one = run(make(**{"train.batch_size": 32, "output_dir": tmp_path / "one"}))
    args = [f"{k}={v}" for k, v in {**ov, "train.batch_size": 16, "output_dir": tmp_path / "two", "train.save_every": 8}.items()]
    proc = sh([*LAUNCH_2_CPU, "-m", "peftlab", "train", str(recipe_file), *args], cwd=tmp_path)

    two = json.loads((tmp_path / "two" / "run.json").read_text())
    assert two["processes"] == 2 and two["steps"] == one["steps"] == 16
    assert proc.stdout.count("== t: lora") == 1, "the summary is printed by the main process only"
    l1, l2 = train_log(tmp_path / "one"), train_log(tmp_path / "two")
    assert [r["step"] for r in l2] == [r["step"] for r in l1]
    assert [r["loss"] for r in l2] == pytest.approx([r["loss"] for r in l1], abs=1e-6)
    w1, w2 = load_file(tmp_path / "one" / "adapter_model.safetensors"), load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert w1.keys() == w2.keys() and any("lora_B" in k for k in w1)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-6, rtol=1e-5)

    assert json.loads((tmp_path / "two" / "eval_report.json").read_text())["n"] == 63
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["eval"] == pytest.approx(one["metrics"]["eval"], abs=1e-5)
    ckpt = tmp_path / "two" / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["inputs.json", "step-16", "step-8"], "no staging folder left behind"
    assert {"random_states_0.pkl", "random_states_1.pkl", "trainer_state.json"} <= {p.name for p in (ckpt / "step-8").iterdir()}


def test_two_process_eval_equals_one_process_eval(odd_eval, tmp_path):
    """(c) `peftlab eval` of one finished run on 2 ranks = on 1 rank, on 63 rows (rank 1's padded tail dropped)."""
    _, _, make = odd_eval
    out = tmp_path / "one"
    one = run(make(**{"train.max_steps": 4, "output_dir": out}))
    proc = sh([*LAUNCH_2_CPU, "-m", "peftlab.cli", "eval", str(out)], cwd=tmp_path)
    assert proc.stdout.count('"split": "eval"') == 1, "the metrics are printed by the main process only"
    two = json.loads((out / "eval-eval.json").read_text())
    assert two["report"]["n"] == 63 == json.loads((out / "eval_report.json").read_text())["n"]
    assert two["report"]["confusion"] == json.loads((out / "eval_report.json").read_text())["confusion"]
    assert two["metrics"]["accuracy"] == one["metrics"]["eval"]["accuracy"]
    assert two["metrics"]["loss"] == pytest.approx(one["metrics"]["eval"]["loss"], abs=1e-6)


def test_cli_launch_cpu_ddp_runs_two_ranks(make_recipe, tmp_path, monkeypatch, capsys):
    """(d) `peftlab train RECIPE --launch cpu-ddp --num-processes 2` relaunches the run on 2 gloo ranks. 40 rows in
    batches of 16 on 2 ranks: Accelerate tops the last round up with 24 rows from the epoch's start (even_batches), which
    train_examples does not count."""
    make_recipe()
    out = tmp_path / "launched"
    train = write_tsv(tmp_path / "train40.tsv", synthetic_rows(40, 1))
    proc = sh([sys.executable, "-m", "peftlab.cli", "train", str(tmp_path / "recipe.yaml"), f"output_dir={out}", "train.epochs=1",
               f"data.train.path={train}", "--launch", "cpu-ddp", "--num-processes", "2"], cwd=tmp_path)
    record = json.loads((out / "run.json").read_text())
    assert record["processes"] == 2 and record["steps"] == 2 and record["train_examples"] == 40
    assert (out / "adapter_model.safetensors").is_file()
    assert "launching: ACCELERATE_USE_CPU=1" in proc.stderr and "cpu-ddp.yaml --num_processes 2 -m peftlab train" in proc.stderr
    # an --overwrite on 2 ranks: rank 1, with nothing to export, swapped the staging folder in while rank 0 still wrote
    # into it, and the old run and the new one were both lost ("unchanged", said the error)
    sh([sys.executable, "-m", "peftlab.cli", "train", str(tmp_path / "recipe.yaml"), f"output_dir={out}", "train.epochs=2",
        f"data.train.path={train}", "--launch", "cpu-ddp", "--num-processes", "2", "--overwrite"], cwd=tmp_path)
    assert json.loads((out / "run.json").read_text())["steps"] == 4 and (out / "adapter_model.safetensors").is_file()
    assert not (tmp_path / ".launched.staging").exists()
    # `peftlab -q eval OUT --launch cpu-ddp`: each rank scores a share of the rows, one eval-eval.json with the figures of one
    # process (`eval` had no --launch); -q reaches the ranks (the launched command had no -q: the ranks logged as usual)
    proc = sh([sys.executable, "-m", "peftlab.cli", "-q", "eval", str(out), "--launch", "cpu-ddp"], cwd=tmp_path)
    assert "data.eval:" not in proc.stderr and "launching:" not in proc.stderr, proc.stderr
    launched = json.loads((out / "eval-eval.json").read_text())
    predictions = [(r["row"], r["prediction"]) for r in map(json.loads, (out / "predictions-eval.jsonl").read_text().splitlines())]
    assert main(["eval", str(out)]) == 0
    alone = json.loads((out / "eval-eval.json").read_text())
    # a mistake is said once before any process starts (each rank said it under the launcher's 40-line traceback)
    import peftlab.launch

    monkeypatch.setattr(peftlab.launch, "launch_eval", lambda *a, **k: pytest.fail("launched"))
    for bad, says in ((["data.eval.path=/nope"], "data.eval.path='/nope': file not found"), (["--split", "test", "data.test=null"],
                      "no data.test split"), (["adapter.r=3"], "adapter.r=3: an evaluation loads the run's weights as trained"),
                      (["data.eval.text_columns=[nope]"], "data.eval: column(s) ['nope'] not found")):
        assert main(["eval", str(out), *bad, "--launch", "cpu-ddp"]) == 2 and says in capsys.readouterr().err
    assert launched["report"] == alone["report"] and launched["metrics"] == pytest.approx(alone["metrics"], abs=1e-5)
    assert predictions == [(r["row"], r["prediction"]) for r in map(json.loads, (out / "predictions-eval.jsonl").read_text().splitlines())]


def test_a_rank_that_fails_is_one_clear_error_with_its_status(make_recipe, tmp_path):
    """A data mistake that rank 0 finds under --launch: rank 1's broken collective was a 30-line gloo traceback, the
    status was the launcher's 1, and rank 1 could refuse the folder rank 0 had begun to write. Now rank 1 says one line at most,
    the command ends with rank 0's message and status 2 (the launcher's own report above it), and no folder is left."""
    make_recipe()
    out = tmp_path / "launched"
    rows = synthetic_rows(16, 1)
    bad = write_tsv(tmp_path / "bad.tsv", rows)
    bad.write_text(bad.read_text() + "an unknown label\t7\n")
    proc = subprocess.run([sys.executable, "-m", "peftlab.cli", "train", str(tmp_path / "recipe.yaml"), f"output_dir={out}",
                           f"data.train.path={bad}", "--launch", "cpu-ddp", "--num-processes", "2"], cwd=tmp_path, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: data.train: 1 row(s) have labels outside the label set")
    assert proc.stderr.count("labels outside the label set") == 1 and "[rank1]: Traceback" not in proc.stderr
    # rank 1 says one line when its collective breaks; on a loaded machine the launcher may stop it before it notices
    # (then it says nothing): never more than that line
    said = [line for line in proc.stderr.splitlines() if "rank 1" in line or "[rank1]" in line]
    assert all(line.startswith("rank 1 stopped: its connection to the run's other processes broke") for line in said), said
    assert not out.exists()


def test_the_launcher_says_the_first_ranks_error_or_the_checkpoint_to_resume(tmp_path, capsys, monkeypatch):
    from peftlab.cli import handed_to_launcher, lost_peer
    from peftlab.launch import ERROR_FILE_ENV, outcome
    from peftlab.rundir import RunDir

    folder, error = RunDir(tmp_path / "run"), tmp_path / "error.json"
    assert outcome(1, error, folder) == 1 and capsys.readouterr().err == ""  # nothing kept: the launcher's report says it
    (tmp_path / "run" / "checkpoints" / "step-4").mkdir(parents=True)
    assert outcome(1, error, folder) == 1
    assert "latest" in (err := capsys.readouterr().err) and "step-4" in err and "--resume continues it" in err
    assert outcome(143, error, folder) == 143 and capsys.readouterr().err == ""  # a stop: the ranks said it
    monkeypatch.setenv(ERROR_FILE_ENV, str(error))
    assert handed_to_launcher("error: first", 2) and handed_to_launcher("error: second", 2)  # the first rank's is kept
    assert outcome(1, error, folder) == 2 and capsys.readouterr().err == "error: first\n"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert lost_peer(RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:6548"))
    assert not lost_peer(RuntimeError("shape mismatch")) and not lost_peer(ValueError("closed by peer"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not lost_peer(RuntimeError("Connection closed by peer"))


def test_one_process_commands_under_accelerate_launch_are_refused_once(tmp_path, capsys, monkeypatch):
    """`accelerate launch -m peftlab select|merge|...` ran the whole command on every rank: the table printed twice, both
    wrote the same --json file and merged folder, select's steps proxy trained as a DDP run. Refused, by rank 0 alone."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, said in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        for argv in (["merge", str(tmp_path)], ["select", str(tmp_path / "r.yaml"), "--candidates", "x"], ["validate", "r.yaml"]):
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert (f"`peftlab {argv[0]}` runs in one process, and `accelerate launch` started 2. Run it without accelerate "
                    "launch" in err) == said, (rank, argv, err)
    assert not any(tmp_path.iterdir())


def test_accelerates_one_process_launcher_given_several_is_warned_about(tmp_path, capsys, caplog, monkeypatch):
    """`accelerate launch --num_processes 2` on CPU without --multi_gpu runs one process, and the run said so only as
    "1 process(es)" in its summary. Its launcher sets MASTER_ADDR there (and only there) without WORLD_SIZE."""
    for k in ("WORLD_SIZE", "RANK", "MASTER_ADDR"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    for env, said in (({}, False), ({"MASTER_ADDR": "127.0.0.1"}, True), ({"MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": "1"}, False)):
        caplog.clear()
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            with caplog.at_level("WARNING", logger="peftlab"):
                main(["validate", str(tmp_path / "none.yaml")])
        assert ("given several processes but started one" in caplog.text) == said, (env, caplog.text)
    capsys.readouterr()


def test_sigterm_to_the_launching_process_stops_the_ranks_with_a_checkpoint(make_recipe, tmp_path):
    """A scheduler's SIGTERM to `peftlab train --launch` alone (not its process group) reaches the ranks: they save a
    checkpoint and stop, and the command returns only once they have ended (its lock held while they write)."""
    import signal
    import time

    make_recipe()
    out = tmp_path / "launched"
    proc = subprocess.Popen([sys.executable, "-m", "peftlab.cli", "train", str(tmp_path / "recipe.yaml"), f"output_dir={out}",
                             "train.max_steps=400", "train.log_every=1", "train.save_every=null", "--launch", "cpu-ddp",
                             "--num-processes", "2"], cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 240
    while not ((out / "log.jsonl").is_file() and (out / "log.jsonl").stat().st_size > 0):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode != 0 and "SIGTERM: saving a checkpoint" in err, err[-3000:]
    assert err.count("SIGTERM: saving a checkpoint") == err.count("stopped: ") == 1, err[-3000:]  # rank 0 says it, once
    assert list((out / "checkpoints").glob("step-*")) and not (out / "run.json").exists()  # stopped, with a checkpoint


@pytest.mark.parametrize("name", PRESETS)
def test_presets_pass_accelerates_own_config_loader(name):
    """(e) each preset goes through accelerate's loader and launch-argument checks (as `accelerate launch` would read
    it), every key is one accelerate knows, and the plugin built from the resulting environment is what we meant."""
    from unittest import mock

    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    path = str(preset_path(name))
    cfg = load_config_from_file(path)
    assert isinstance(cfg, ClusterConfig)
    parser = launch_command_parser()
    known = {a.dest for a in parser._actions}
    for key in [*cfg.fsdp_config, *cfg.deepspeed_config]:  # accelerate copies unknown keys silently: catch typos here
        assert key in known, f"{name}: {key} is not an accelerate launch option"
    args, defaults, _ = _validate_launch_command(parser.parse_args(["--config_file", path, "--num_processes", "2", "-m", "peftlab", "train", "r.yaml"]))
    assert args.num_processes == 2 and args.mixed_precision == "no"

    if name in ("cpu-ddp", "multi_gpu"):
        assert cfg.distributed_type == DistributedType.MULTI_GPU and args.multi_gpu  # torchrun starts N ranks
        assert cfg.use_cpu == (name == "cpu-ddp")
    elif name == "fsdp":
        assert args.use_fsdp
        fsdp_env = {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith(("FSDP_", "ACCELERATE_USE_FSDP"))}
        with mock.patch.dict(os.environ, fsdp_env):
            plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and plugin.state_dict_type.name == "FULL_STATE_DICT" and plugin.auto_wrap_policy is not None
    else:
        assert args.use_deepspeed
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, ds_env = prepare_deepspeed_cmd_env(args)
        with mock.patch.dict(os.environ, {k: v for k, v in ds_env.items() if k.startswith("ACCELERATE_")}):
            plugin = DeepSpeedPlugin()
        stage = 3 if name.endswith("zero3") else 2
        zero = plugin.deepspeed_config["zero_optimization"]
        assert plugin.zero_stage == zero["stage"] == stage
        assert zero["stage3_gather_16bit_weights_on_model_save"] == (stage == 3)  # what get_state_dict needs to export
        assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"  # filled from train.grad_accum
        del plugin


def test_launch_errors_are_clear(make_recipe, tmp_path, capsys, monkeypatch):
    assert presets() == PRESETS
    with pytest.raises(LaunchError, match="Valid presets: cpu-ddp, deepspeed-zero2.*Did you mean 'fsdp'"):
        preset_path("fsdb")
    if not torch.cuda.is_available():  # without GPUs that is said first, for DeepSpeed too (its way out, fsdp, needs them)
        for name in ("multi_gpu", "deepspeed-zero3"):
            with pytest.raises(LaunchError, match="needs CUDA GPUs.*--launch cpu-ddp"):
                launch_command(name, "r.yaml")
    if importlib.util.find_spec("deepspeed") is None:
        with monkeypatch.context() as m:
            m.setattr(torch.cuda, "is_available", lambda: True)
            m.setattr(torch.cuda, "device_count", lambda: 2)
            with pytest.raises(LaunchError, match="pip install deepspeed"):
                launch_command("deepspeed-zero3", "r.yaml")
    cmd, launch_env = launch_command("cpu-ddp", "r.yaml", ["train.lr=1e-3"], resume=True, flags=["-q"])
    assert cmd[1:] == ["-m", "accelerate.commands.launch", "--config_file", str(preset_path("cpu-ddp")), "--num_processes", "2",
                       "-m", "peftlab", "-q", "train", "r.yaml", "train.lr=1e-3", "--resume"]
    assert launch_env["ACCELERATE_USE_CPU"] == "1"

    make_recipe()
    recipe = str(tmp_path / "recipe.yaml")
    assert main(["train", recipe, "--launch", "nope"]) == 2
    assert "unknown launch preset 'nope'" in capsys.readouterr().err
    assert main(["train", recipe, "--num-processes", "2"]) == 2
    assert "--num-processes needs --launch" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--num-processes", "2"]) == 2  # (a folder that is no run: said before launching)
    assert "is not a finished peftlab run" in capsys.readouterr().err


def test_launch_checks_data_and_base_before_launching(make_recipe, tmp_path, capsys, monkeypatch):
    """`train --launch` makes validate's checks first: a wrong column is one message and exit 2, nothing launched."""
    from peftlab import launch

    make_recipe()
    monkeypatch.setattr(launch, "run_forwarding_signals", lambda *a: pytest.fail("launched"))
    assert main(["train", str(tmp_path / "recipe.yaml"), "data.label_column=nope", "--launch", "cpu-ddp"]) == 2
    err = capsys.readouterr().err
    assert "label_column" in err and "'nope'" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_sharded_runs_export_the_gathered_state_dict(make_recipe, tmp_path):
    """Under FSDP / ZeRO-3 the export writes the state dict gathered by accelerator.get_state_dict (FSDP and DeepSpeed
    need GPUs, so this checks the seam on CPU: the given full state dict is what lands in the adapter file)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from peftlab import build_model
    from peftlab.accel import shards_weights
    from peftlab.export import export

    assert shards_weights(SimpleNamespace(distributed_type=DistributedType.FSDP))
    assert not shards_weights(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU))
    zero = lambda stage: SimpleNamespace(distributed_type=DistributedType.DEEPSPEED,  # noqa: E731
                                         state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage)))
    assert shards_weights(zero(3)) and not shards_weights(zero(2))

    recipe = make_recipe()
    model, tok, _ = build_model(recipe, num_labels=2, label_names=["negative", "positive"])
    gathered = {k: torch.full_like(v, 0.5) if "lora_B" in k else v for k, v in model.state_dict().items()}
    export(tmp_path / "x", model, tok, recipe, {"label_names": ["negative", "positive"]}, {}, state_dict=gathered)
    saved = load_file(tmp_path / "x" / "adapter_model.safetensors")
    lora_b = [k for k in saved if "lora_B" in k]
    assert lora_b and all(torch.all(saved[k] == 0.5) for k in lora_b)
    assert all(torch.all(p == 0) for k, p in model.named_parameters() if "lora_B" in k)  # the model itself was not used


def test_packed_rows_count_each_example_and_token_once_on_two_ranks(tmp_path, chat_llama):
    """Packed SFT rows (several examples each) on 2 ranks: train_examples was this rank's examples per packed row scaled
    to all ranks (40 for 64 examples), and the tokens counted the rows Accelerate repeats to top the epoch's last round
    up. Each rank now counts its own rows' examples and tokens, the repeated ones left out: the totals of one process."""
    from peftlab import build_data, load_splits

    from .conftest import chat_tokenizer
    from .test_sft import QA, recipe_for, write_jsonl

    rows = [{"messages": [{"role": "user", "content": q + " please" * (i % 5)}, {"role": "assistant", "content": a}]}
            for i, (q, a) in enumerate((QA * 4)[:20])]
    overrides = ["data.max_length=48", "data.packing=true", "train.max_steps=null", "train.epochs=1", "train.log_every=1", "data.eval=null"]
    r = recipe_for(tmp_path, chat_llama, write_jsonl(tmp_path / "m.jsonl", rows), overrides)
    splits, _ = load_splits(r)
    packed = build_data(r, chat_tokenizer(), splits=splits, label_names=[]).train
    assert len(packed) % 2 and max(packed["n_examples"]) > 1  # an uneven last round of 2 ranks x 1, several examples a row
    sh([sys.executable, "-m", "peftlab.cli", "train", str(tmp_path / "recipe.yaml"), f"output_dir={tmp_path / 'two'}",
        *overrides, "train.batch_size=1", "--launch", "cpu-ddp", "--num-processes", "2"], cwd=tmp_path)
    two = json.loads((tmp_path / "two" / "run.json").read_text())
    assert two["processes"] == 2
    assert (two["train_examples"], two["train_tokens"]) == (len(rows), sum(packed["length"]))
