"""Compiled CPU helpers, built on first use with the system C compiler and called through
ctypes (no torch headers, so a build takes about a second).

Four ops live here, each beside the torch path that stays its reference and fallback:

* ``csrc/stage_sinks.c``: the in-place decode's sink staging (``sink_in_place.py``): a
  handful of torch ops per layer and step (gather, rotate, transpose, vLLM's cache writer)
  become one pass over the sinks.
* ``csrc/quant_decode.c``: one query per request over quantized pages (``kv_quant.py``,
  ``quant_sink_window_decode_cpu``), dequantize, rotate, score and accumulate fused, instead
  of dequantizing whole pages into float tensors first.
* ``csrc/selected_decode.c``: ``topk-importance``'s steady decode (``topk_attention.py``,
  ``selected_decode_cpu``): each request's kept blocks read in place, the query rotated back
  per block, scores, one softmax, values and the mass per block, instead of a gather of the
  kept blocks and batched matmuls over the copy.
* ``csrc/quant_store.c``: the quantized store's decode case (``kv_quant.py``, ``_write_alone``:
  one token per block, ranges grown and earlier tokens re-encoded), the same bytes as torch.

:func:`library` returns ``None`` where there is no compiler, the build fails, or
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
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_SOURCES = [Path(__file__).with_name("csrc") / name
            for name in ("stage_sinks.c", "quant_decode.c", "quant_store.c", "selected_decode.c")]
# -march=native: built on the machine that runs it (the name below hashes the CPU's model and
# flags too, so a cache directory shared by other CPUs builds its own). -ffp-contract=off: no
# fused multiply-adds, so the staging writes what torch's separate ops write, bit for bit.
_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-ffp-contract=off", "-std=c11"]
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_QUANT_ARGS = [_PTR, _I64, _I64, _PTR, _PTR, _I64, _I64, _I64, _PTR, _I64, _PTR, _PTR, _PTR, _I64, ctypes.c_float, _PTR]
_STORE_ARGS = [_PTR, _I64, _I64, _PTR, _I64, _I64, _PTR, _PTR, _PTR, _PTR]
_SELECTED_ARGS = [_PTR, _I64, _I64, _I64, _I64, _I64, _PTR, _I64, _PTR, _I64, _I64, _PTR, _I64, _PTR, _PTR, _PTR, _PTR,
                  _PTR, _PTR, _I64, _I64, ctypes.c_float, _PTR, _I64, _PTR, _PTR]
_STAGE_ARGS = [_PTR, _I64, _I64, _I64, _I64, _I64, _PTR, _I64, _PTR, _I64, _I64, _PTR, _PTR, _I64, _I64, _PTR]


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_identity() -> str:
    """The CPU's model name and feature flags (what ``-march=native`` compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features", "CPU part"))]
    return platform.machine() + "\n".join(sorted(set(keep)))


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled helpers, built once per source version; ``None`` where unavailable."""
    if os.environ.get("VLLM_KVSTREAM_CPU_EXT", "1") == "0":
        return None
    cc = _compiler()
    if cc is None:
        logger.warning("vllm-kvstream: no C compiler found (tried $CC, cc, gcc, clang); "
                       "torch serves the CPU helpers' ops")
        return None
    src = b"".join(path.read_bytes() for path in (*_SOURCES, _SOURCES[0].with_name("kvstream_cpu.h")))
    tag = hashlib.sha256(src + " ".join([cc, *_FLAGS, "-fopenmp?", _cpu_identity()]).encode()).hexdigest()[:16]
    out_dir = Path(os.environ.get("VLLM_KVSTREAM_CACHE_DIR", Path.home() / ".cache" / "vllm-kvstream"))
    so = out_dir / f"kvstream_cpu_{tag}.so"
    if not so.exists():
        tmp = None
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
            os.close(fd)
            cmd = [cc, *_FLAGS, *map(str, _SOURCES), "-o", tmp, "-lm"]
            try:  # with OpenMP (the libgomp torch loads serves it), else single-threaded
                subprocess.run([*cmd, "-fopenmp"], check=True, capture_output=True, text=True, timeout=120)
            except subprocess.CalledProcessError:
                subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)
            os.replace(tmp, so)
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", "") or exc
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
            logger.warning("vllm-kvstream: building the CPU helpers (kernels/csrc) with %s failed (%s); torch serves",
                           cc, detail)
            return None
    lib = ctypes.CDLL(str(so))
    for name in ("kvs_stage_sinks_f32", "kvs_stage_sinks_bf16"):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = _STAGE_ARGS, ctypes.c_int
    for name in ("kvs_selected_decode_f32", "kvs_selected_decode_bf16"):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = _SELECTED_ARGS, ctypes.c_int
    lib.kvs_quant_decode.argtypes, lib.kvs_quant_decode.restype = _QUANT_ARGS, ctypes.c_int
    lib.kvs_quant_store_alone.argtypes, lib.kvs_quant_store_alone.restype = _STORE_ARGS, ctypes.c_int
    return lib


_STAGE_FN = {torch.float32: "kvs_stage_sinks_f32", torch.bfloat16: "kvs_stage_sinks_bf16"}
_SELECTED_FN = {torch.float32: "kvs_selected_decode_f32", torch.bfloat16: "kvs_selected_decode_bf16"}


def _check(name: str, status: int) -> None:
    """The helpers return 0, or 1 where their scratch could not be allocated (nothing written)."""
    if status != 0:
        raise MemoryError(f"vllm-kvstream: {name} could not allocate its scratch (status {status})")


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
                sin: torch.Tensor | None, *, rotary_dim: int, neox: bool,
                value_mask: torch.Tensor | None = None) -> None:
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
    _check(fn.__name__, fn(kv_cache.data_ptr(), kv_cache.stride(0), kv_cache.stride(1), H, B, two_d // 2,
       sink_blocks.data_ptr(), sb, dst.data_ptr(), E, S,
       cos.data_ptr() if cos is not None else None, sin.data_ptr() if sin is not None else None,
       rotary_dim if cos is not None else 0, int(neox), value_mask.data_ptr() if value_mask is not None else None))


def can_quant_decode(cache: torch.Tensor, layout) -> bool:
    """Whether :func:`quant_decode` serves these pages: CPU uint8 ``[blocks, heads, head_bytes]``
    with unit stride in bytes, 8- or 4-bit codes with per-channel key scales, and the library."""
    return (
        cache.device.type == "cpu"
        and cache.dtype == torch.uint8
        and cache.dim() == 3
        and cache.stride(2) == 1
        and layout.bits in (4, 8)
        and layout.key_scale == "channel"
        and library() is not None
    )


@lru_cache(maxsize=64)  # per layout (a frozen dataclass) and pairing: not rebuilt every layer and step
def _layout_words(layout, neox: bool) -> torch.Tensor:
    L = layout
    return torch.tensor([
        L.bits, L.head_size, L.block_size, L.sink_tokens, L.n_out, int(L.key_zero_point),
        int(L.value_levels == "nf4"), int(neox), L.code_bytes, L.k_scale_off, L.k_zero_off, L.v_scale_off,
        L.sink_scale_off, L.k_codes_off, L.v_codes_off, L.sink_k_off, L.out_idx_off, L.out_k_off,
    ], dtype=torch.int64)


def quant_decode(query: torch.Tensor, cache: torch.Tensor, blocks: torch.Tensor, attended: torch.Tensor,
                 cos: torch.Tensor | None, sin: torch.Tensor | None, layout, *, scale: float, neox: bool,
                 rotary_dim: int) -> torch.Tensor:
    """``query`` [R, heads, D] float32 (one row per request); ``blocks`` [R, nb] pages to read,
    ``attended`` [R, nb, bs] the slots attended; ``cos``/``sin`` [R, nb, rotary_dim // 2, bs]
    the rotation of each slot's key, slots last (``None``: none). Returns [R, heads, D]
    float32. Call only where :func:`can_quant_decode`."""
    R, Hq, D = query.shape
    Hkv = cache.shape[1]
    nb = blocks.shape[1]
    query = query.to(torch.float32).contiguous()
    blocks = blocks.to(torch.int64).contiguous()
    if attended.dtype != torch.uint8 or not attended.is_contiguous():
        attended = attended.to(torch.uint8).contiguous()
    words = _layout_words(layout, neox)
    if cos is not None:
        cos = cos.to(torch.float32).contiguous()
        sin = sin.to(torch.float32).contiguous()
    out = torch.empty(R, Hq, D, dtype=torch.float32)
    _check("kvs_quant_decode", library().kvs_quant_decode(
        cache.data_ptr(), cache.stride(0), cache.stride(1), words.data_ptr(), query.data_ptr(), R, Hq, Hkv,
        blocks.data_ptr(), nb, attended.data_ptr(), cos.data_ptr() if cos is not None else None,
        sin.data_ptr() if sin is not None else None, rotary_dim if cos is not None else 0, float(scale),
        out.data_ptr()))
    return out


def quant_store_alone(cache: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor, layout, *, neox: bool) -> None:
    """One token per block (``k``, ``v`` [m, heads, D] float32, keys before RoPE) into slot
    ``offsets`` of ``blocks`` [m] (see ``csrc/quant_store.c``); only where :func:`can_quant_decode`."""
    m, H, _ = k.shape
    blocks = blocks.to(torch.int64).contiguous()
    offsets = offsets.to(torch.int64).contiguous()
    k = k.to(torch.float32).contiguous()
    v = v.to(torch.float32).contiguous()
    words = _layout_words(layout, neox)
    _check("kvs_quant_store_alone", library().kvs_quant_store_alone(
        cache.data_ptr(), cache.stride(0), cache.stride(1), words.data_ptr(), m, H, blocks.data_ptr(),
        offsets.data_ptr(), k.data_ptr(), v.data_ptr()))


def _rows_f32(x: torch.Tensor) -> bool:
    """``x`` [T, heads, D] float32 on CPU with each token's heads dense (the C pass indexes rows)."""
    return x.dtype == torch.float32 and x.device.type == "cpu" and x.stride(2) == 1 and x.stride(1) == x.shape[2]


def _i64(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.int64 and x.is_contiguous() else x.to(torch.int64).contiguous()


def selected_decode(query: torch.Tensor, kv_cache: torch.Tensor, rows: torch.Tensor, blocks: torch.Tensor,
                    counts: torch.Tensor, tails: torch.Tensor | None, cos: torch.Tensor | None, sin: torch.Tensor | None,
                    out: torch.Tensor, *, rotary_dim: int, neox: bool, scale: float,
                    los: torch.Tensor | None = None, his: torch.Tensor | None = None) -> torch.Tensor:
    """One query per request over its kept blocks (see ``csrc/selected_decode.c``); call only
    where :func:`can_stage` (the same cache layouts). ``query`` [T, heads, D], ``rows`` [B]
    its rows, written into the same rows of ``out`` (``query``'s shape); ``blocks`` [B, M]
    (read up to ``counts`` [B]; ``tails`` [B]: cached slots of the last); ``cos``/``sin``
    [B, M, rotary_dim // 2] of each block's ``-shift`` (``None``: no rotation). ``los``/``his``
    [B, M]: entry ``j`` reads slots ``[los, his)`` of its block instead (``tails`` unused).
    Returns the mass [B, M] float32."""
    return SelectedCall(kv_cache, rows, blocks, counts, tails, cos, sin, rotary_dim=rotary_dim, neox=neox,
                        scale=scale, los=los, his=his)(query, kv_cache, out)


class SelectedCall:
    """:func:`selected_decode` with everything but the query, the cache and the output bound
    once (a decode step calls it in every layer with the same plan): per call, one ctypes call
    and the pointers of those three. ``kv_cache``: any layer's cache of the step (shape and
    dtype; every layer's cache has the same). A call returns the mass in a buffer of its own
    that the next call overwrites."""

    def __init__(self, kv_cache: torch.Tensor, rows: torch.Tensor, blocks: torch.Tensor, counts: torch.Tensor,
                 tails: torch.Tensor | None, cos: torch.Tensor | None, sin: torch.Tensor | None, *, rotary_dim: int,
                 neox: bool, scale: float, los: torch.Tensor | None = None, his: torch.Tensor | None = None) -> None:
        if tails is None and his is None:
            raise ValueError("vllm-kvstream: selected_decode needs tails or his (the slots each entry reads)")
        _, Hkv, bs, two_d = kv_cache.shape
        B, M = blocks.shape
        self.dtype, self.shape = kv_cache.dtype, tuple(kv_cache.shape[1:])
        self.rows = _i64(rows)
        keep = [self.rows, _i64(blocks), _i64(counts)]
        keep += [_i64(x) if x is not None else None for x in (tails, los, his)]
        if cos is not None:
            cos = cos.to(torch.float32).contiguous()
            sin = sin.to(torch.float32).contiguous()
        keep += [cos, sin]
        self.mass = torch.empty(B, M, dtype=torch.float32)
        heads_mass = torch.empty(B, Hkv, M, dtype=torch.float32)
        self._keep = (*keep, heads_mass)  # the buffers the pointers below point into

        def ptr(x):
            return x.data_ptr() if x is not None else None

        rows_, blocks_, counts_, tails_, los_, his_, cos_, sin_ = map(ptr, keep)
        self.fn = getattr(library(), _SELECTED_FN[kv_cache.dtype])
        self._head = (Hkv, bs, two_d // 2)
        self._mid = (rows_, B)
        self._tail = (blocks_, M, counts_, tails_, los_, his_, cos_, sin_, rotary_dim if cos is not None else 0,
                      int(neox), float(scale))
        self._mass = (heads_mass.data_ptr(), self.mass.data_ptr())

    def __call__(self, query: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if kv_cache.dtype != self.dtype or tuple(kv_cache.shape[1:]) != self.shape:
            raise ValueError(f"vllm-kvstream: selected_decode bound to a {self.dtype} cache of blocks {self.shape}, "
                             f"called with {kv_cache.dtype} {tuple(kv_cache.shape[1:])}")
        q = query if _rows_f32(query) else query.to(torch.float32).contiguous()
        direct = _rows_f32(out)
        o = out if direct else torch.empty(out.shape, dtype=torch.float32)
        _check(self.fn.__name__, self.fn(kv_cache.data_ptr(), kv_cache.stride(0), kv_cache.stride(1), *self._head,
                                         q.data_ptr(), q.stride(0), *self._mid, q.shape[1], *self._tail, o.data_ptr(),
                                         o.stride(0), *self._mass))
        if not direct:
            out.index_copy_(0, self.rows, o.index_select(0, self.rows).to(out.dtype))
        return self.mass
