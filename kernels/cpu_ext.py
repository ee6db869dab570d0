"""Compiled CPU helpers, built on first use with the system C compiler and called through
ctypes (no torch headers, so a build takes about a second).

Only the in-place decode's sink staging lives here (``csrc/stage_sinks.c``): a handful of
torch ops per layer and step (gather, rotate, transpose, vLLM's cache writer) become one
pass over the sinks. The torch path in ``sink_in_place.py`` stays the reference and the
fallback: :func:`library` returns ``None`` where there is no compiler, the build fails, or
``VLLM_KVSTREAM_CPU_EXT=0``; callers then use torch.

The shared object goes to ``$VLLM_KVSTREAM_CACHE_DIR`` (default ``~/.cache/vllm-kvstream``)
under a name that hashes the source and the compiler command, written to a temporary name
and renamed, so processes building at once (tensor-parallel workers) do not see a partial file.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("csrc") / "stage_sinks.c"
_FLAGS = ["-O3", "-shared", "-fPIC", "-ffp-contract=off", "-std=c11"]
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_STAGE_ARGS = [_PTR, _I64, _I64, _I64, _I64, _I64, _PTR, _I64, _PTR, _I64, _I64, _PTR, _PTR, _I64, _I64, _PTR]


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled helpers, built once per source version; ``None`` where unavailable."""
    if os.environ.get("VLLM_KVSTREAM_CPU_EXT", "1") == "0":
        return None
    cc = _compiler()
    if cc is None:
        logger.warning("vllm-kvstream: no C compiler found (tried $CC, cc, gcc, clang); the in-place decode stages sinks with torch")
        return None
    src = _SOURCE.read_bytes()
    tag = hashlib.sha256(src + " ".join([cc, *_FLAGS]).encode()).hexdigest()[:16]
    out_dir = Path(os.environ.get("VLLM_KVSTREAM_CACHE_DIR", Path.home() / ".cache" / "vllm-kvstream"))
    so = out_dir / f"kvstream_cpu_{tag}.so"
    if not so.exists():
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
            os.close(fd)
            subprocess.run([cc, *_FLAGS, str(_SOURCE), "-o", tmp], check=True, capture_output=True, text=True, timeout=120)
            os.replace(tmp, so)
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", "") or exc
            logger.warning("vllm-kvstream: building %s with %s failed (%s); the in-place decode stages sinks with torch", _SOURCE.name, cc, detail)
            return None
    lib = ctypes.CDLL(str(so))
    for name in ("kvs_stage_sinks_f32", "kvs_stage_sinks_bf16"):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = _STAGE_ARGS, None
    return lib


_STAGE_FN = {torch.float32: "kvs_stage_sinks_f32", torch.bfloat16: "kvs_stage_sinks_bf16"}


def can_stage(kv_cache: torch.Tensor) -> bool:
    """Whether :func:`stage_sinks` serves this cache: CPU, float32 or bfloat16, each block's
    heads laid out densely (``[B, 2D]`` contiguous per head), and the library built."""
    return (
        kv_cache.device.type == "cpu"
        and kv_cache.dtype in _STAGE_FN
        and kv_cache.dim() == 4
        and kv_cache.stride(3) == 1
        and kv_cache.stride(2) == kv_cache.shape[3]
        and library() is not None
    )


def stage_sinks(kv_cache: torch.Tensor, sink_blocks: torch.Tensor, dst: torch.Tensor, cos: torch.Tensor | None,
                sin: torch.Tensor | None, *, rotary_dim: int, neox: bool, value_mask: torch.Tensor | None = None) -> None:
    """Copy sinks into ``dst`` slots (see ``csrc/stage_sinks.c``); call only where :func:`can_stage`.
    ``sink_blocks`` [E, sb] and ``dst`` [E * S] long; ``cos``/``sin`` [E, rotary_dim // 2] or ``None``;
    ``value_mask`` [E * S] bool: the sinks whose values to write (``None``: all; keys always)."""
    _, H, B, two_d = kv_cache.shape
    E, sb = sink_blocks.shape
    S = dst.numel() // max(E, 1)
    sink_blocks = sink_blocks.to(torch.int64).contiguous()
    dst = dst.to(torch.int64).contiguous()
    if cos is not None:
        cos = cos.to(torch.float32).contiguous()
        sin = sin.to(torch.float32).contiguous()
    if value_mask is not None:
        value_mask = value_mask.to(torch.uint8).contiguous()
    fn = getattr(library(), _STAGE_FN[kv_cache.dtype])
    fn(kv_cache.data_ptr(), kv_cache.stride(0), kv_cache.stride(1), H, B, two_d // 2,
       sink_blocks.data_ptr(), sb, dst.data_ptr(), E, S,
       cos.data_ptr() if cos is not None else None, sin.data_ptr() if sin is not None else None,
       rotary_dim if cos is not None else 0, int(neox), value_mask.data_ptr() if value_mask is not None else None)
