"""GGUF bases and QLoRA on tied-embedding LLMs: a `.gguf` model.name is converted once into a cached transformers
folder (exact weights, tokenizer with its chat template, atomic), trains, merges and reloads in plain transformers; a
tied LM head stays out of 4-bit/8-bit quantization. The slow test answers a question with the real SmolLM2 GGUF."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from peftlab import build_data, build_model, load_recipe, load_splits, load_trained, merge, run
from peftlab.bases import converted_folder, resolve_model_path
from peftlab.errors import ArtifactError, ModelNotFound
from peftlab.to_gguf import write_gguf

from .conftest import REPO, shared_or_skip
from .test_summarization import dialogues  # noqa: F401  (the module's fixture: short dialogues and summaries)

gguf = pytest.importorskip("gguf")

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_level_vocab() -> tuple[list[str], list[str]]:
    """A byte-level BPE vocabulary: the special tokens, the 256 byte symbols, and a few merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    merges = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n", "e r"]
    tokens = SPECIALS + list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in merges]
    return tokens, merges


def tiny_llama_model(vocab_size: int, tied: bool = True, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def byte_level_tokenizer():
    """A fast byte-level BPE tokenizer over `byte_level_vocab()`, with SmolLM2's special tokens and a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens, merges = byte_level_vocab()
    bpe = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ")) for m in merges]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens(SPECIALS + ["<tool_call>"])  # the first three are in the vocabulary (ids 0-2): marked special
    bpe.add_tokens(["<think>"])  # an added token that is not special: matched whole all the same
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tok.chat_template = CHATML
    return tok


def tiny_llama_folder(d: Path, tied: bool = True, kind: str = "llama", merges_as_strings: bool = False):
    """Save a tiny model and the byte-level tokenizer into `d` (a merged folder's layout) -> the model. tokenizer.json
    stores merges as [a, b] pairs; `merges_as_strings` rewrites them the older way, as "a b"."""
    tok = byte_level_tokenizer()
    if kind == "llama":
        model = tiny_llama_model(len(tok), tied=tied)
    else:
        from transformers import MistralConfig, MistralForCausalLM

        torch.manual_seed(1)
        model = MistralForCausalLM(MistralConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, sliding_window=None, tie_word_embeddings=tied,
            bos_token_id=1, eos_token_id=2, pad_token_id=2)).eval()
    model.save_pretrained(d)
    tok.save_pretrained(d)
    if merges_as_strings:
        spec = json.loads((d / "tokenizer.json").read_text())
        assert isinstance(spec["model"]["merges"][0], list)  # else this case tests nothing new
        spec["model"]["merges"] = [" ".join(m) for m in spec["model"]["merges"]]
        (d / "tokenizer.json").write_text(json.dumps(spec))
    return model


def load_gguf(path: Path, tmp_path: Path):
    """(model, tokenizer) that transformers builds from the GGUF alone: read from a folder holding only a link to it
    (beside a config.json or tokenizer.json, transformers would read those instead of the GGUF's metadata)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tmp_path / f"gguf-only-{path.stem}"
    d.mkdir()
    (d / path.name).symlink_to(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=path.name)
    return AutoModelForCausalLM.from_pretrained(d, gguf_file=path.name, dtype=torch.float32).eval(), tok


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(path of a tiny tied-embedding llama GGUF, the transformers model it was written from) by peftlab's writer."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_llama_folder(folder)
    return write_gguf(folder, tmp_path_factory.mktemp("gguf") / "tiny.gguf", "f32"), model


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """Each test converts into its own cache ($PEFTLAB_CACHE), never the user's ~/.cache."""
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "gguf"


def ids() -> torch.Tensor:
    return torch.tensor([list(range(3, 40))])  # any in-vocabulary ids


# ----------------------------------------------------------------------------------------------- conversion, cache

def test_gguf_converts_once_into_an_exact_cached_folder(tiny_gguf, cache, caplog):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, reference = tiny_gguf
    with caplog.at_level(logging.INFO, logger="peftlab.bases"):
        folder = Path(resolve_model_path(str(path)))
    assert folder.parent == cache and len(folder.name) == 16
    log = caplog.text
    assert str(folder) in log and " s to " in log and "converted in" in log  # where the cache is, how long it took
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert (folder / "model.safetensors").is_file() and json.loads((folder / "gguf.json").read_text())["sha256"][:16] == folder.name
    assert not [p for p in cache.iterdir() if p.name.startswith(".staging")]

    model = AutoModelForCausalLM.from_pretrained(folder).eval()  # plain transformers, no gguf involved
    with torch.no_grad():
        diff = (model(ids()).logits - reference(ids()).logits).abs().max().item()
    assert diff < 1e-5, diff  # F32 GGUF: the Q/K permutation undone, the weights exact
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied

    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.eos_token == tok.pad_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(tok("the heat").input_ids) == "the heat"

    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="peftlab.bases"):
        assert resolve_model_path(str(path)) == str(folder)  # the second load reads the cache: no conversion
        assert resolve_model_path(str(path.parent)) == str(folder)  # a folder holding one GGUF is the same base
    assert "converted in" not in caplog.text and (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_damaged_conversion_is_converted_again(tiny_gguf, cache, caplog):
    """A truncated model.safetensors in the cache was loaded (validate: ok; train: SafetensorError, a traceback)."""
    path, reference = tiny_gguf
    folder = Path(resolve_model_path(str(path)))
    weights = folder / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])
    with caplog.at_level(logging.INFO, logger="peftlab.bases"):
        assert resolve_model_path(str(path)) == str(folder)
    assert "is damaged (model.safetensors not as written): converting it again" in caplog.text and "converted in" in caplog.text
    assert weights.read_bytes() == whole


def test_killed_conversion_leaves_no_half_cache(tiny_gguf, cache, monkeypatch):
    import peftlab.bases as bases

    path, _ = tiny_gguf
    real = bases._convert

    def dies(source, sidecar, staging):
        (staging / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(bases, "_convert", dies)
    with pytest.raises(KeyboardInterrupt):
        converted_folder(path)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []  # no folder, no staging left
    monkeypatch.setattr(bases, "_convert", real)
    assert (converted_folder(path) / "gguf.json").is_file()


def test_tokenizer_json_beside_the_gguf_is_preferred(tiny_gguf, tmp_path):
    from transformers import AutoTokenizer

    path, _ = tiny_gguf
    d = tmp_path / "base"
    d.mkdir()
    (d / "m.gguf").symlink_to(path)
    folder = converted_folder(d / "m.gguf")
    gguf_tok = AutoTokenizer.from_pretrained(folder)
    side = json.loads((folder / "tokenizer.json").read_text())
    side["normalizer"] = {"type": "Lowercase"}  # stands for the model's own pipeline (SmolLM2's: digit splitting)
    (d / "tokenizer.json").write_text(json.dumps(side))

    folder2 = Path(resolve_model_path(str(d)))
    assert folder2 != folder and folder2.name.startswith(folder.name + "-tok")
    tok = AutoTokenizer.from_pretrained(folder2)
    assert tok.chat_template == CHATML and tok.eos_token == tok.pad_token == "<|im_end|>"  # the GGUF's specials + template
    assert tok("THE heat").input_ids == gguf_tok("the heat").input_ids != gguf_tok("THE heat").input_ids


def test_bad_gguf_names_are_clear(tmp_path, tiny_gguf):
    with pytest.raises(ModelNotFound, match=r"model.name=.*no such GGUF file"):
        resolve_model_path(str(tmp_path / "missing.gguf"))
    d = tmp_path / "two"
    d.mkdir()
    (d / "a.gguf").symlink_to(tiny_gguf[0])
    (d / "b.gguf").symlink_to(tiny_gguf[0])
    with pytest.raises(ModelNotFound, match=r"holds 2 GGUF files \(a.gguf, b.gguf\): name one of them"):
        resolve_model_path(str(d))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(ModelNotFound, match=r"cannot load this GGUF file: it is damaged"):
        resolve_model_path(str(bad))


def gguf_cut_at(source: Path, size: int, target: Path) -> Path:
    with open(source, "rb") as f:
        target.write_bytes(f.read(size))
    return target


def test_a_gguf_cut_short_is_named_as_such(tmp_path, tiny_gguf):
    """A GGUF cut inside its header raised transformers' struct.error, one cut in its tensors 'cannot reshape array ...
    use a GGUF of an architecture transformers supports'. Both say the file is damaged or cut short, and to fetch it
    again; so does a file that is no GGUF at all. A whole file is not refused (the other tests convert it)."""
    from peftlab.bases import gguf_damage

    whole = tiny_gguf[0]
    assert gguf_damage(whole) is None
    size = whole.stat().st_size
    for cut in (3, 100, 2000, size // 2, size - 1):
        with pytest.raises(ModelNotFound, match=r"cannot load this GGUF file: it is damaged or cut short \((it ends inside "
                                                 r"its header, at byte [\d,]+|it is [\d,]+ bytes, and the \d+ tensors its header describes "
                                                 r"need [\d,]+)\).*Download or copy it again"):
            resolve_model_path(str(gguf_cut_at(whole, cut, tmp_path / f"cut-{cut}.gguf")))
    (tmp_path / "html.gguf").write_text("<html>404 Not Found</html>")
    with pytest.raises(ModelNotFound, match=r"damaged or cut short \(it does not begin with the GGUF signature"):
        resolve_model_path(str(tmp_path / "html.gguf"))


@pytest.mark.parametrize("cut", [100, 3_000_000, 40_000_000])
def test_the_smollm2_gguf_cut_short_is_named_as_such_by_train_and_validate(tmp_path, cut):
    source = next(shared_or_skip("models", "smollm2-135m-instruct").glob("*.gguf"))
    cut_file = gguf_cut_at(source, cut, tmp_path / "t.gguf")
    with pytest.raises(ModelNotFound, match=r"damaged or cut short.*Download or copy it again"):
        resolve_model_path(str(cut_file))
    from peftlab.model import model_problems

    recipe = load_recipe(REPO / "recipes" / "minilm" / "sst2-lora.yaml", [f"model.name={cut_file}"], validate_files=False)
    assert any("damaged or cut short" in p for p in model_problems(recipe))


def test_validate_converts_no_gguf_and_checks_target_modules_once_converted(tiny_gguf, cache, tmp_path, caplog):
    """`validate` does not convert a GGUF base (the first `train` does, once); after that it checks its modules."""
    from peftlab.model import model_problems

    path, _ = tiny_gguf
    recipe = load_recipe(None, [f"model.name={path}", "task.type=clm", "adapter.target_modules=[q_proj,nope]"],
                         validate_files=False)
    with caplog.at_level(logging.INFO, logger="peftlab.model"):
        assert model_problems(recipe) == []
    assert "no converted folder found" in caplog.text and not cache.exists()
    converted_folder(path)
    assert model_problems(recipe) == ["adapter.target_modules: 'nope' matches no module of LlamaForCausalLM. Linear layers "
                                      "it has: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj. Set "
                                      "adapter.target_modules to some of these, or 'all-linear'."]
    recipe.adapter.target_modules = ["q_proj", "v_proj"]
    assert model_problems(recipe) == []
    # found by the file's identity, not by hashing it: a touched GGUF is found again once `train` has hashed it
    import os

    from peftlab.bases import converted_if_ready

    folder = converted_if_ready(path)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert converted_if_ready(path) is None
    assert converted_folder(path) == folder and converted_if_ready(path) == folder
    copy = tmp_path / "copy" / "tiny.gguf"  # another copy of the same file: the same folder, both found
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    assert converted_folder(copy) == folder and converted_if_ready(copy) == folder == converted_if_ready(path)
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    recipe.model.num_layers = 1  # model.num_layers is read from the folder found: nothing hashed
    import peftlab.bases as bases

    bases._sha256_of.cache_clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bases, "file_sha256", lambda p: pytest.fail(f"validate hashed {p}"))
        assert model_problems(recipe) == []
    staging = folder.rename(cache / ".staging-x")  # a conversion killed before its rename is not a converted folder
    assert converted_if_ready(path) is None and (staging / "gguf.json").is_file()


# ------------------------------------------------------------------------------------- writing a GGUF (to_gguf)

@pytest.mark.parametrize("kind,tied,dtype", [("llama", True, "f32"), ("llama", False, "f32"), ("llama", False, "f16"),
                                             ("mistral", False, "f32")])
def test_write_gguf_round_trips_through_transformers(kind, tied, dtype, tmp_path):
    from transformers import AutoTokenizer

    folder = tmp_path / "merged"
    folder.mkdir()
    original = tiny_llama_folder(folder, tied=tied, kind=kind, merges_as_strings=not tied)
    path = write_gguf(folder, tmp_path / "out" / f"model-{dtype}.gguf", dtype)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left

    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert ("output.weight" in types) is not tied  # a tied head is the embedding: llama.cpp reads it from token_embd
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"  # norms stay f32
    assert types["blk.1.ffn_down.weight"] == types["token_embd.weight"] == dtype.upper()
    assert reader.fields["general.file_type"].contents() == (1 if dtype == "f16" else 0)
    assert reader.fields["llama.rope.freq_base"].contents() == 10000.0 and reader.fields["llama.rope.dimension_count"].contents() == 8
    assert reader.fields["general.name"].contents() == tmp_path.name  # RUN/merged is named after RUN

    model, tok = load_gguf(path, tmp_path)
    assert model.config.tie_word_embeddings is tied
    with torch.no_grad():
        diff = (model(ids()).logits - original(ids()).logits).abs().max().item()
    # f32: exact. f16: 1.7e-4 here (logits up to 0.45); a K rows left unpermuted would be 1.9e-3
    assert diff < (1e-5 if dtype == "f32" else 1e-3), diff

    reference = AutoTokenizer.from_pretrained(folder)
    text = "the heat is in the winter tent, <think><tool_call> and then<|im_end|>"
    assert tok(text).input_ids == reference(text).input_ids  # merges read back ("a b" strings or [a, b] pairs)
    kept = tok.decode(tok(text).input_ids, skip_special_tokens=True)
    assert kept == reference.decode(reference(text).input_ids, skip_special_tokens=True) == text.replace("<tool_call>", "").replace("<|im_end|>", "")
    assert len(reference(text).input_ids) < len(text.encode()) - 30  # the merges and added tokens were used
    assert tok.chat_template == CHATML and (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    chat = [{"role": "user", "content": "hi there"}]
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        reference.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def test_a_gguf_written_from_a_relative_merged_folder_is_named_after_its_run(tmp_path, monkeypatch):
    """`peftlab merge . --gguf` in the run folder writes from Path("merged"), whose parent's name is "": the GGUF had
    no general.name."""
    folder = tmp_path / "my-run" / "merged"
    folder.mkdir(parents=True)
    tiny_llama_folder(folder)
    monkeypatch.chdir(folder.parent)
    path = write_gguf(Path(".") / "merged", Path("merged") / "model-f32.gguf", "f32")
    assert gguf.GGUFReader(path).fields["general.name"].contents() == "my-run"


def test_write_gguf_refuses_what_it_cannot_write(tiny_bert, tied_llama, tmp_path):
    dest = tmp_path / "model.gguf"
    with pytest.raises(ArtifactError, match=r"model_type 'bert' cannot be written as GGUF.*llama.*convert_hf_to_gguf.py"):
        write_gguf(tiny_bert, dest)
    with pytest.raises(ArtifactError, match=r"GGUF dtype 'q4_0': write_gguf writes f16 or f32.*llama-quantize"):
        write_gguf(tied_llama, dest, "q4_0")
    with pytest.raises(ArtifactError, match=r"tokenizer is WordPiece.*byte-level BPE.*convert_hf_to_gguf.py"):
        write_gguf(tied_llama, dest)  # a llama with MiniLM's WordPiece tokenizer
    window = tmp_path / "windowed"
    window.mkdir()
    tiny_llama_folder(window, kind="mistral")
    config = json.loads((window / "config.json").read_text())
    (window / "config.json").write_text(json.dumps({**config, "sliding_window": 16}))
    with pytest.raises(ArtifactError, match=r"sliding_window 16 < context length 512"):
        write_gguf(window, dest)
    assert not dest.exists() and list(tmp_path.glob(".*")) == []

    dest.write_bytes(b"someone's file")
    with pytest.raises(ArtifactError, match=r"model.gguf exists: left as it is"):
        write_gguf(window, dest)
    assert dest.read_bytes() == b"someone's file"

    from peftlab.cli import build_parser

    assert build_parser().parse_args(["merge", "runs/x", "--gguf"]).gguf == "f16"  # the default dtype
    assert build_parser().parse_args(["merge", "runs/x"]).gguf is None


def test_a_failed_gguf_write_leaves_the_old_file_and_no_partial_one(tmp_path, monkeypatch):
    folder = tmp_path / "merged"
    folder.mkdir()
    tiny_llama_folder(folder)
    dest = tmp_path / "out" / "model-f16.gguf"
    dest.parent.mkdir()
    dest.write_bytes(b"the previous export")
    real, calls = gguf.GGUFWriter.write_tensor_data, []

    def dies(self, tensor, *a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # killed half way through the tensors
        return real(self, tensor, *a, **k)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", dies)
    with pytest.raises(KeyboardInterrupt):
        write_gguf(folder, dest, overwrite=True)
    assert dest.read_bytes() == b"the previous export" and [p.name for p in dest.parent.iterdir()] == [dest.name]
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", real)
    # a SIGTERM or kill -9 leaves its temporary file (hundreds of MB, named by its pid): the next export removes it, and
    # keeps one a live process is writing
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (dest.parent / f".{dest.name}.{dead}.tmp").write_bytes(b"killed half way")
    (dest.parent / f".{dest.name}.1.tmp").write_bytes(b"pid 1 is alive")
    write_gguf(folder, dest, overwrite=True)
    assert gguf.GGUFReader(dest).fields["general.architecture"].contents() == "llama"
    assert sorted(p.name for p in dest.parent.iterdir()) == sorted([dest.name, f".{dest.name}.1.tmp"])


def test_merge_gguf_of_a_full_model_run_lands_in_the_run_folder(tiny_bert, tmp_path, monkeypatch, capsys):
    import sys

    from peftlab.cli import main

    run_dir = tmp_path / "full-run"  # a run that trained the whole model: `merge` has nothing to fold and returns RUN
    run_dir.mkdir()
    tiny_llama_folder(run_dir)
    monkeypatch.setattr(sys.modules["peftlab.export"], "merge", lambda out, force=False, overrides=(): Path(out))  # (peftlab.export: the function)
    assert main(["merge", str(run_dir), "--gguf"]) == 0
    assert gguf.GGUFReader(run_dir / "model-f16.gguf").fields["general.file_type"].contents() == 1  # f16 by default
    assert f"GGUF: {run_dir / 'model-f16.gguf'}" in capsys.readouterr().out
    assert main(["merge", str(tiny_bert), "--gguf"]) == 2  # a model it cannot write: one clear error, no traceback
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "model_type 'bert'" in err and "Traceback" not in err
    assert not list(Path(tiny_bert).glob("*.gguf")) and not list(Path(tiny_bert).glob(".*"))


@pytest.mark.parametrize("base", ["tiny_bert", "tiny_llama"])
def test_merge_gguf_refuses_a_model_it_cannot_write_before_merging(make_recipe, base, request, capsys):
    """A run whose merged model GGUF export refuses (a BERT; a Llama classifier) was merged first, then refused: a
    correct but unwanted merged folder, gigabytes for a real model, written by a failed command."""
    from peftlab.cli import main

    recipe = make_recipe({"train.max_steps": 1}, model=request.getfixturevalue(base))
    run(recipe)
    capsys.readouterr()
    assert main(["merge", str(recipe.out), "--gguf"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert ("model_type 'bert'" if base == "tiny_bert" else "LlamaForSequenceClassification, not a causal LM") in err, err
    assert not (recipe.out / "merged").exists()


def test_merge_gguf_refuses_a_classifier_on_a_gguf_base_whose_conversion_is_gone_before_merging(make_recipe, tiny_gguf, cache, capsys):
    """The check found the base's config only in a conversion found by the GGUF file's path, size and time: after a
    touch, a copy or a cleared cache it checked nothing, and the classifier was converted and merged, then refused. It
    now reads the GGUF header's config."""
    import shutil

    from peftlab.cli import main

    recipe = make_recipe({"train.max_steps": 1}, model=tiny_gguf[0])
    run(recipe)
    shutil.rmtree(cache)
    capsys.readouterr()
    assert main(["merge", str(recipe.out), "--gguf"]) == 2
    err = capsys.readouterr().err
    assert "LlamaForSequenceClassification, not a causal LM" in err and "Traceback" not in err, err
    assert not (recipe.out / "merged").exists() and not cache.exists()


def test_merge_gguf_refuses_attention_or_mlp_biases(tmp_path):
    """llama.cpp's llama has no biases: a Llama with attention_bias was merged, then refused by the tensor plan."""
    from transformers import LlamaConfig

    from peftlab.errors import ArtifactError
    from peftlab.to_gguf import _check_config

    config = LlamaConfig(attention_bias=True, architectures=["LlamaForCausalLM"])
    with pytest.raises(ArtifactError, match="attention_bias .llama.cpp's llama has no biases there"):
        _check_config(config, tmp_path)


# -------------------------------------------------------------------------------- QLoRA on a tied LM head, merge

def sum_recipe(tmp_path: Path, dialogues: dict, model: str, overrides: dict | None = None, name: str = "out"):  # noqa: F811
    tree = {
        "name": "g", "output_dir": str(tmp_path / name), "model": {"name": model},
        "adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(dialogues["train"]), "eval": str(dialogues["eval"]), "text_columns": ["dialogue"],
                 "target_column": "summary", "max_length": 48, "max_target_length": 24},
        "task": {"type": "summarization"},
        "train": {"max_steps": 4, "batch_size": 8, "lr": 1e-2, "log_every": 1, "warmup_fraction": 0.0, "precision": "fp32"},
        "eval": {"batch_size": 4, "max_new_tokens": 4},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return load_recipe(path, [f"{k}={v}" for k, v in (overrides or {}).items()])


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory) -> Path:
    """A tiny random Llama whose LM head is tied to its embedding, with MiniLM's tokenizer."""
    from .conftest import minilm_tokenizer

    tok = minilm_tokenizer()
    d = tmp_path_factory.mktemp("tied-llama")
    tiny_llama_model(tok.vocab_size).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_qlora_keeps_a_tied_lm_head_out_of_quantization(mode, tied_llama, dialogues, tmp_path):  # noqa: F811
    bnb = pytest.importorskip("bitsandbytes")
    recipe = sum_recipe(tmp_path, dialogues, str(tied_llama), {"quant.mode": mode})
    splits, names = load_splits(recipe)
    model, tok, _ = build_model(recipe, num_labels=0, label_names=names)
    base = model.get_base_model()
    layer = bnb.nn.Linear4bit if mode == "4bit" else bnb.nn.Linear8bitLt
    assert [m for m in base.modules() if isinstance(m, layer)], "nothing was quantized"
    assert type(base.lm_head) is torch.nn.Linear and base.lm_head.weight.dtype == torch.float32  # the tied head stays float

    data = build_data(recipe, tok, splits=splits, label_names=names)
    batch = data.collate([data.train[i] for i in range(8)])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model.train()(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses

    out = tmp_path / "run"
    recipe = sum_recipe(tmp_path, dialogues, str(tied_llama), {"quant.mode": mode}, name="run")
    run(recipe)
    target = merge(out)
    merged, _, _, _ = load_trained(target)
    assert type(merged.lm_head) is torch.nn.Linear and not any("lora" in n for n, _ in merged.named_parameters())
    adapter, tok2, _, _ = load_trained(out, dequantize=True)
    x = tok2(["Anna: Can you bring the cake today?"], return_tensors="pt")
    with torch.no_grad():
        diff = (adapter(**x).logits - merged(**x).logits).abs().max().item()
    assert diff < 1e-4, diff


def test_gguf_run_merges_to_a_folder_plain_transformers_reloads(tiny_gguf, dialogues, tmp_path, capsys, caplog):  # noqa: F811
    from transformers import AutoModelForCausalLM

    from peftlab.cli import main

    path, _ = tiny_gguf
    # one token per byte: inputs are long
    recipe = sum_recipe(tmp_path, dialogues, str(path), {"data.max_length": 224, "data.max_target_length": 48})
    summary = run(recipe)
    assert summary["metrics"]["eval"]["loss"] > 0
    assert main(["merge", str(recipe.out)]) in (0, None)  # `peftlab merge`: the base resolves to the cached folder
    target = recipe.out / "merged"
    adapter, tok, _, _ = load_trained(recipe.out)
    plain = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    x = tok(["Tom: Can you bring the map tonight?\nAnna: Sure"], return_tensors="pt")
    with torch.no_grad():
        a, m = adapter(**x).logits, plain(**x).logits
    assert (a - m).abs().max().item() < 1e-4
    assert (a - AutoModelForCausalLM.from_pretrained(resolve_model_path(str(path))).eval()(**x).logits).abs().max() > 1e-3  # it trained

    # the published card's peft + transformers snippet, pointed at a copy of the GGUF's folder, gives the same model
    import re

    from peftlab.publish import publish

    published = tmp_path / "published"
    publish(recipe.out, to=published)
    snippet = (published / "README.md").read_text().split("With peft and transformers:")[1].split("```python")[1].split("```")[0]
    assert "gguf_file='tiny.gguf'" in snippet
    snippet = re.sub(r"^repo = .*$", f"repo = {str(published)!r}", snippet, flags=re.M)
    snippet = re.sub(r"^base_model = .*$", f"base_model = {str(path.parent)!r}", snippet, flags=re.M)
    scope = {}
    exec(snippet, scope)
    with torch.no_grad():
        assert (scope["model"](**x).logits - a).abs().max().item() < 1e-4

    # `peftlab merge RUN --gguf f32`: the merged model as one GGUF, beside the merged safetensors
    capsys.readouterr()
    assert main(["merge", str(recipe.out), "--gguf", "f32"]) == 0
    gguf_path = target / "model-f32.gguf"
    assert f"GGUF: {gguf_path}" in capsys.readouterr().out
    from_gguf, _ = load_gguf(gguf_path, tmp_path)
    with torch.no_grad():
        diff = (from_gguf(**x).logits - m).abs().max().item()
    assert diff < 1e-5, diff
    assert gguf.GGUFReader(gguf_path).fields["general.name"].contents() == recipe.out.name  # the run's name, not "merged"

    before = gguf_path.stat()
    with caplog.at_level(logging.INFO, logger="peftlab"):
        assert main(["merge", str(recipe.out), "--gguf", "f32"]) == 0  # exists: left as it is
    assert f"{gguf_path} exists" in caplog.text and gguf_path.stat().st_mtime_ns == before.st_mtime_ns
    assert main(["merge", str(recipe.out), "--gguf", "f32", "--force"]) == 0  # --force: merged and written again
    after = gguf_path.stat()
    assert (after.st_ino, after.st_mtime_ns) != (before.st_ino, before.st_mtime_ns) and after.st_size == before.st_size
    assert not [p.name for p in target.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_a_run_refuses_its_gguf_replaced_by_another_file(tiny_gguf, dialogues, tmp_path, cache):  # noqa: F811
    """The same model.name, another file: the adapter was scored and merged on the new base, with exit 0."""
    import shutil

    path, _ = tiny_gguf
    base = tmp_path / "base"
    base.mkdir()
    shutil.copy(path, base / "model.gguf")
    recipe = sum_recipe(tmp_path, dialogues, str(base), {"train.max_steps": 1, "data.max_length": 224, "data.max_target_length": 48})
    run(recipe)
    trained_on = converted_folder(base / "model.gguf")
    data = bytearray((base / "model.gguf").read_bytes())
    data[-2] ^= 1  # a weight of the last tensor: another file, as a re-download of another version would be
    (base / "model.gguf").write_bytes(bytes(data))
    for action in (lambda: load_trained(recipe.out), lambda: merge(recipe.out)):
        with pytest.raises(ArtifactError, match=rf"another GGUF file.*Its conversion is still at {trained_on}"):
            action()
    assert not (recipe.out / "merged").exists() and [p for p in cache.iterdir() if p.is_dir()] == [trained_on]  # nothing converted, merged
    load_trained(recipe.out, recipe=load_recipe(recipe.out / "recipe.yaml", [f"model.name={trained_on}"]))  # the fix it names


# ----------------------------------------------------------------------------------------------- the real model

@pytest.mark.slow
def test_smollm2_gguf_answers_through_its_chat_template(monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shared_or_skip("models", "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")
    start = time.perf_counter()
    folder = resolve_model_path(str(shared_or_skip("models", "smollm2-135m-instruct")))
    assert "-tok" in Path(folder).name  # its own tokenizer.json was used
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert tok.pad_token == tok.eos_token == "<|im_end|>" and model.config.tie_word_embeddings
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=10, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
    logging.getLogger(__name__).info("SmolLM2 GGUF: converted, loaded and answered in %.1f s", time.perf_counter() - start)

    # and back: the folder written as GGUF carries the tokenizer llama.cpp's own converter wrote, and still answers
    source = shared_or_skip("models", "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")
    ours, theirs = gguf.GGUFReader(write_gguf(Path(folder), tmp_path / "out" / "smollm2-f16.gguf")), gguf.GGUFReader(source)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.pre",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id",
                "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template",
                "llama.rope.freq_base", "llama.attention.head_count_kv", "llama.context_length"):
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key
    assert {t.name: list(t.shape) for t in ours.tensors} == {t.name: list(t.shape) for t in theirs.tensors}
    model, tok = load_gguf(tmp_path / "out" / "smollm2-f16.gguf", tmp_path)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=10, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
