"""Quantized KV blocks, KVQuant-style: the page layout, online statistics, and the naive
float32 torch reference of writing and reading them (the oracle of the Triton kernels in
``kv_quant_triton.py``).

One page holds one layer's ``block_size`` tokens of every KV head, as vLLM's pages do, and
everything needed to read them back: codes, scales, the outlier channels and the sink keys.
Freeing the block frees all of it. Per (block, KV head), in bytes::

    k_scale   [D]        fp16  per-channel absmax of the pre-RoPE keys (the channel's max with a zero point)
    k_zero    [D]        fp16  per-channel min of the pre-RoPE keys (only with ``key_zero_point``)
    v_scale   [bs]       fp16  per-token absmax of the values
    sink_scale[S]        fp16  per-token absmax of the sink keys
    k_codes   [bs, D*b/8]      keys, per channel: code * k_scale[c] / qmax
    v_codes   [bs, D*b/8]      values, per token: code * v_scale[t] / qmax
    sink_k    [S, D]     8 bit keys of tokens at positions < S (sink tokens), per token
    out_idx   [n_out]    u8    this block's outlier channels (INT4 only)
    out_k     [bs, n_out] 8 bit those channels' keys at 8 bits: code * k_scale[c] / 127
    (padding to 16 bytes)

Codes are unsigned with an offset (``code + 2**(b-1)``), symmetric (``-qmax..qmax``,
``qmax = 2**(b-1) - 1``); with ``key_zero_point`` a key channel uses all ``2**b`` codes
between its min and max (``lo + code * (hi - lo) / (2**b - 1)``); with ``value_levels="nf4"``
a value code indexes :data:`NF4` (levels at the quantiles of a normal distribution, scaled
by the token's absmax) instead of uniform steps. INT4 packs the two channels RoPE rotates together into one byte
(low nibble: channel ``i``, high nibble: its partner ``i + D/2`` for NeoX-style RoPE, ``2i+1``
for GPT-J style, see :func:`pair_order`), so a kernel unpacks a byte into the two halves it
rotates. The main codes of sink slots and outlier channels are the zero code: a reader adds
the three parts (main + outlier + sink) without branching.

Why this method (after KVQuant, Hooper et al. 2024, and seed 001):

* **Keys per channel, before RoPE.** Key outliers sit in fixed channels; per-channel scales
  absorb them. RoPE mixes channel pairs by position and smears those channels, so keys are
  quantized before it: the writer rotates the model's (post-RoPE) keys back, readers rotate
  the dequantized keys at their cache-relative positions, which streaming needs anyway.
* **Values per token**: values have no channel structure; each token gets its own scale.
* **INT4 spends its 16 codes where the data is** (free in bytes but the zero points): a
  pre-RoPE key channel is offset as well as wide (a per-channel zero point: its min and max,
  not ``+-absmax``), and a token's values are bell-shaped (NF4 levels, QLoRA's, instead of
  uniform ones). On SmolLM2's keys and values (30 layers, 2,048 Austen tokens, attention
  output against float) the relative error of INT4 attention fell from 0.155 to 0.120 with
  the zero point and to 0.096 with both. INT8 keeps symmetric uniform codes: its error is
  already negligible, and the zero points would cost the bytes of its 1.9x capacity target.
* **Online statistics, no calibration**: each layer keeps an EMA of the per-channel key
  absmax over non-sink tokens, updated with every write (prefill chunk or decode token). A
  block's channel scales start, with its first token, at the EMA (already holding that
  write) or the write's own absmax for the block, whichever is larger; a block written whole
  in one write (prefill) takes its own absmax. A later token that
  outgrows a channel's scale grows it, and the block's earlier tokens are re-encoded (one
  extra rounding, rare once the EMA has settled): nothing is clipped.
* **Outliers**: the ``n_out`` channels with the largest scale of the block keep 8-bit codes
  (INT4 only; at INT8 every channel is 8-bit already).
* **Sinks**: tokens at positions ``< S`` (attention sinks) keep their keys at 8 bits with a
  per-token scale; their outsized keys would otherwise set the channel scales.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from vllm_kvstream.kernels import cpu_ext
from vllm_kvstream.kernels.rope import Rope
from vllm_kvstream.kernels.sink_decode import DecodePlan, _rotate_keys_

QUANT_BITS = (8, 4)
#: Page bit widths: the quantized ones, and 16 (unquantized float16/bfloat16 pages, keys before
#: RoPE, in the same byte layout, so one attention kernel serves every page).
PAGE_BITS = (16, *QUANT_BITS)
FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
KEY_SCALES = ("channel", "token")
VALUE_LEVELS = ("uniform", "nf4")
#: The 16 NF4 levels (QLoRA, Dettmers et al. 2023): normal quantiles scaled to [-1, 1], exact zero.
NF4 = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])
#: Decision thresholds between consecutive NF4 levels (a code is how many a value exceeds).
NF4_EDGES = (NF4[1:] + NF4[:-1]) / 2


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@dataclass(frozen=True)
class QuantLayout:
    """Byte layout of one quantized page (see the module docstring)."""

    bits: int
    head_size: int
    block_size: int
    sink_tokens: int = 4
    outlier_channels: int = 2
    #: ``head_bytes`` is a multiple of 16 and of this (vLLM views a page as ``[heads,
    #: block_size, head_bytes / block_size]``, so the plugin passes ``block_size``).
    align: int = 16
    #: ``"channel"`` (the method) or ``"token"``: keys scaled per token like values, the naive
    #: foil of the ablation (reference path only; no outlier channels then).
    key_scale: str = "channel"
    #: Per-channel min and max for keys (asymmetric codes) instead of ``+-absmax``.
    key_zero_point: bool = False
    #: ``"uniform"`` steps or ``"nf4"`` levels for values (INT4 only).
    value_levels: str = "uniform"
    #: 16-bit pages: the float type keys and values are stored in.
    float_dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.key_scale not in KEY_SCALES:
            raise ValueError(f"key_scale={self.key_scale!r}; allowed: {', '.join(KEY_SCALES)}")
        if self.value_levels not in VALUE_LEVELS:
            raise ValueError(f"value_levels={self.value_levels!r}; allowed: {', '.join(VALUE_LEVELS)}")
        if self.value_levels == "nf4" and self.bits != 4:
            raise ValueError(f"value_levels='nf4' needs bits=4, got bits={self.bits}; allowed at 8 bits: 'uniform'")
        if self.key_zero_point and self.key_scale != "channel":
            raise ValueError(f"key_zero_point needs key_scale='channel', got {self.key_scale!r}")
        if self.align < 1:
            raise ValueError(f"align={self.align} must be >= 1")
        if self.bits not in PAGE_BITS:
            raise ValueError(f"kv-quant bits={self.bits}; allowed: {PAGE_BITS}")
        if self.float_dtype not in FLOAT_DTYPES:
            raise ValueError(f"float_dtype={self.float_dtype!r}; allowed: {', '.join(FLOAT_DTYPES)}")
        if self.bits == 16 and (self.sink_tokens or self.key_zero_point or self.key_scale != "channel"):
            raise ValueError(
                f"16-bit pages hold plain floats: sink_tokens={self.sink_tokens}, key_zero_point="
                f"{self.key_zero_point}, key_scale={self.key_scale!r}; allowed: 0, False, 'channel'"
            )
        if self.head_size % 2:
            raise ValueError(f"head_size={self.head_size} must be even for quantized KV")
        if not 0 <= self.sink_tokens <= self.block_size:
            raise ValueError(f"sink_tokens={self.sink_tokens}; allowed: 0..block_size ({self.block_size})")
        if not 0 <= self.outlier_channels <= min(self.head_size, 255):
            raise ValueError(f"outlier_channels={self.outlier_channels}; allowed: 0..{min(self.head_size, 255)}")

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def n_out(self) -> int:
        """Outlier channels per block and head (INT8 keeps none: every channel has 8 bits;
        per-token key scales have no channel to single out)."""
        return self.outlier_channels if self.bits == 4 and self.key_scale == "channel" else 0

    @property
    def scaled(self) -> bool:
        """Codes with scales (8 and 4 bits); 16-bit pages hold the floats themselves."""
        return self.bits != 16

    @property
    def k_scale_len(self) -> int:
        """Entries of ``k_scale``: one per channel, or one per token (``key_scale="token"``)."""
        if not self.scaled:
            return 0
        return self.head_size if self.key_scale == "channel" else self.block_size

    @property
    def v_scale_len(self) -> int:
        return self.block_size if self.scaled else 0

    @property
    def code_bytes(self) -> int:
        """Bytes of one token's codes (keys or values) for one head."""
        return self.head_size * self.bits // 8

    # Offsets, per (block, head), in bytes; fp16 sections first so they stay 2-aligned.
    @property
    def k_scale_off(self) -> int:
        return 0

    @property
    def k_zero_off(self) -> int:
        return 2 * self.k_scale_len

    @property
    def k_zero_len(self) -> int:
        return self.head_size if self.key_zero_point else 0

    @property
    def v_scale_off(self) -> int:
        return self.k_zero_off + 2 * self.k_zero_len

    @property
    def sink_scale_off(self) -> int:
        return self.v_scale_off + 2 * self.v_scale_len

    @property
    def k_codes_off(self) -> int:
        return self.sink_scale_off + 2 * self.sink_tokens

    @property
    def v_codes_off(self) -> int:
        return self.k_codes_off + self.block_size * self.code_bytes

    @property
    def sink_k_off(self) -> int:
        return self.v_codes_off + self.block_size * self.code_bytes

    @property
    def out_idx_off(self) -> int:
        return self.sink_k_off + self.sink_tokens * self.head_size

    @property
    def out_k_off(self) -> int:
        return self.out_idx_off + self.n_out

    @property
    def head_bytes(self) -> int:
        """Bytes per (block, head), padded to a multiple of 16 and of ``align``."""
        return _round_up(self.out_k_off + self.block_size * self.n_out, math.lcm(16, self.align))

    def page_bytes(self, num_kv_heads: int) -> int:
        return self.head_bytes * num_kv_heads

    def ratio_to(self, dtype_bytes: int) -> float:
        """How many more tokens fit than in an unquantized page of ``dtype_bytes`` per element."""
        return 2 * self.block_size * self.head_size * dtype_bytes / self.head_bytes

    def cache_shape(self, num_blocks: int, num_kv_heads: int) -> tuple[int, int, int]:
        return (num_blocks, num_kv_heads, self.head_bytes)


def pair_order(head_size: int, is_neox_style: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The two channel sets RoPE rotates together: ``(first, second)`` of ``head_size // 2``
    each. INT4 packs ``first[i]`` into the low nibble of byte ``i`` and ``second[i]`` into its
    high nibble; INT8 stores ``first`` then ``second`` (the bytes a kernel loads as halves)."""
    half = head_size // 2
    if is_neox_style:
        return torch.arange(half), torch.arange(half, head_size)
    return torch.arange(0, head_size, 2), torch.arange(1, head_size, 2)


@dataclass
class QuantStats:
    """One layer's online key statistics: EMA of the per-channel absmax, ``[kv_heads, D]``
    float32 (zero until the first write). Shared by every request the worker serves: channel
    magnitudes are a property of the layer (KVQuant calibrates them per layer offline); each
    block stores the scale it used, so reads never depend on it."""

    ema_absmax: torch.Tensor
    #: EMAs of the per-channel min and max (what a block with a zero point starts from).
    ema_min: torch.Tensor
    ema_max: torch.Tensor
    decay: float = 0.99
    #: Fraction of (head, channel) pairs whose EMA exceeds ``outlier_ratio`` x the head's median.
    outlier_ratio: float = 6.0
    #: Whether a write has set the EMAs (then :meth:`update` need not look at them).
    seeded: bool = field(default=False, init=False, repr=False, compare=False)

    @classmethod
    def empty(cls, num_kv_heads: int, head_size: int, decay: float = 0.99, device=None) -> QuantStats:
        def zeros():
            return torch.zeros(num_kv_heads, head_size, dtype=torch.float32, device=device)

        return cls(zeros(), zeros(), zeros(), decay)

    def update(self, keys: torch.Tensor) -> None:
        """Fold one write's (non-sink, pre-RoPE) keys ``[n, kv_heads, D]`` into the EMAs."""
        # Seeded stays true once the EMAs hold a value (they never return to all zero but by
        # underflow): a decode step then skips the check's sync, in every layer.
        first = not (self.seeded or bool(self.ema_absmax.any()))
        self.seeded = True
        lo, hi = torch.aminmax(keys, dim=0)
        for ema, x in ((self.ema_absmax, torch.maximum(hi, -lo)), (self.ema_min, lo), (self.ema_max, hi)):
            if first:
                ema.copy_(x)
            else:
                ema.mul_(self.decay).add_(x, alpha=1.0 - self.decay)

    def outlier_rate(self) -> float:
        med = self.ema_absmax.median(dim=-1, keepdim=True).values
        return float((self.ema_absmax > self.outlier_ratio * med).float().mean())


# --- page views (torch) --------------------------------------------------------------------


class PageView:
    """Typed views of one layer's quantized cache ``[num_blocks, kv_heads, head_bytes]`` uint8."""

    def __init__(self, cache: torch.Tensor, layout: QuantLayout) -> None:
        if cache.dtype != torch.uint8 or cache.shape[-1] != layout.head_bytes:
            raise ValueError(
                f"quantized cache must be uint8 [..., {layout.head_bytes}], got {cache.dtype} {tuple(cache.shape)}"
            )
        L, D, bs, S = layout, layout.head_size, layout.block_size, layout.sink_tokens
        nb, h = cache.shape[0], cache.shape[1]
        self.layout = layout

        def u8(off: int, *shape: int) -> torch.Tensor:
            n = math.prod(shape)
            return cache[:, :, off : off + n].view(nb, h, *shape)

        def f16(off: int, n: int) -> torch.Tensor:
            return cache[:, :, off : off + 2 * n].view(torch.float16)

        self.k_scale = f16(L.k_scale_off, L.k_scale_len)
        self.k_zero = f16(L.k_zero_off, L.k_zero_len)
        self.v_scale = f16(L.v_scale_off, L.v_scale_len)
        self.sink_scale = f16(L.sink_scale_off, S)
        self.k_codes = u8(L.k_codes_off, bs, L.code_bytes)
        self.v_codes = u8(L.v_codes_off, bs, L.code_bytes)
        self.sink_k = u8(L.sink_k_off, S, D)
        self.out_idx = u8(L.out_idx_off, L.n_out)
        self.out_k = u8(L.out_k_off, bs, L.n_out)


def _encode(x: torch.Tensor, absmax: torch.Tensor, qmax: int) -> torch.Tensor:
    """Signed symmetric codes with offset ``qmax + 1``, as uint8 (one code per byte)."""
    scale = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
    q = torch.clamp(torch.floor(x / scale + 0.5), -qmax, qmax)  # round half up, as the kernels do
    return (q + qmax + 1).to(torch.uint8)


def _decode(codes: torch.Tensor, absmax: torch.Tensor, qmax: int) -> torch.Tensor:
    return (codes.float() - (qmax + 1)) * (absmax.float() / qmax)


def _encode_range(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric codes ``0 .. 2**bits - 1`` spanning ``[lo, hi]``, as uint8."""
    top = 2**bits - 1
    step = torch.where(hi > lo, (hi - lo) / top, torch.ones_like(hi))
    return torch.clamp(torch.floor((x - lo) / step + 0.5), 0, top).to(torch.uint8)


def _decode_range(codes: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    return lo.float() + codes.float() * ((hi.float() - lo.float()) / (2**bits - 1))


def _encode_nf4(x: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Nearest NF4 level of ``x / absmax`` (ties to the upper level), as uint8 codes 0..15."""
    y = x / torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    # The number of edges at or below y, counted edge by edge into uint8 (a [..., 15]
    # comparison tensor summed was the prefill store's largest cost; bucketize's binary
    # search is slower still on CPU). NaN is at or above no edge: code 0, as the C and Triton
    # stores count it.
    codes = torch.zeros(y.shape, dtype=torch.uint8, device=y.device)
    for edge in NF4_EDGES.tolist():
        codes.add_(y >= edge)
    return codes


def _decode_nf4(codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    return NF4.to(codes.device)[codes.long()] * absmax.float()


def _encode_values(v: torch.Tensor, absmax: torch.Tensor, L: QuantLayout) -> torch.Tensor:
    return _encode_nf4(v, absmax) if L.value_levels == "nf4" else _encode(v, absmax, L.qmax)


def _decode_values(codes: torch.Tensor, absmax: torch.Tensor, L: QuantLayout) -> torch.Tensor:
    return _decode_nf4(codes, absmax) if L.value_levels == "nf4" else _decode(codes, absmax, L.qmax)


def _channel_range(view, blocks, L: QuantLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)`` per channel of ``blocks`` (``[..., H, D]``): ``(-absmax, absmax)`` unless
    the layout keeps a zero point."""
    hi = view.k_scale[blocks].float()
    lo = view.k_zero[blocks].float() if L.key_zero_point else -hi
    return lo, hi


def _encode_keys(x, lo, hi, L: QuantLayout) -> torch.Tensor:
    return _encode_range(x, lo, hi, L.bits) if L.key_zero_point else _encode(x, hi, L.qmax)


def _decode_keys(codes, lo, hi, L: QuantLayout) -> torch.Tensor:
    return _decode_range(codes, lo, hi, L.bits) if L.key_zero_point else _decode(codes, hi, L.qmax)


def pack_codes(codes: torch.Tensor, layout: QuantLayout, is_neox_style: bool) -> torch.Tensor:
    """``[..., D]`` one code per byte -> the stored ``[..., code_bytes]``."""
    first, second = pair_order(layout.head_size, is_neox_style)
    lo, hi = codes[..., first], codes[..., second]
    if layout.bits == 8:
        return torch.cat((lo, hi), dim=-1)
    return lo | (hi << 4)


def unpack_codes(stored: torch.Tensor, layout: QuantLayout, is_neox_style: bool) -> torch.Tensor:
    """The stored ``[..., code_bytes]`` -> ``[..., D]`` one code per byte, in channel order."""
    first, second = pair_order(layout.head_size, is_neox_style)
    if layout.bits == 8:
        half = layout.head_size // 2
        lo, hi = stored[..., :half], stored[..., half:]
    else:
        lo, hi = stored & 0xF, stored >> 4
    out = torch.empty(*stored.shape[:-1], layout.head_size, dtype=torch.uint8, device=stored.device)
    out[..., first] = lo
    out[..., second] = hi
    return out


#: A sink slot's scale is never 0 (a zero key gets the smallest fp16): readers tell sink
#: slots by a positive scale, as a block's start clears the section to 0.
SINK_SCALE_MIN = 2.0**-24


def _store_keys(view, b, off, kb, sink_b, lo, hi, L: QuantLayout, neox: bool) -> None:
    """Encode keys ``kb`` ``[n, H, D]`` (pre-RoPE) into slots ``off`` of block ``b`` with the
    channel range ``lo``, ``hi`` ``[H, D]``. Sink slots and outlier channels get a fixed main
    code: readers take those from their own sections."""
    fill = 0 if L.key_zero_point else L.qmax + 1
    codes = _encode_keys(kb, lo[None], hi[None], L)  # [n, H, D]
    codes[sink_b] = fill
    if L.n_out:
        idx = view.out_idx[b].long()  # [H, n_out]
        gidx = idx[None].expand(len(off), -1, -1)
        codes.scatter_(2, gidx, fill)
        out_abs = torch.gather(torch.maximum(hi, -lo), 1, idx)
        out_codes = _encode(torch.gather(kb, 2, gidx), out_abs[None], 127)
        out_codes[sink_b] = 128
        view.out_k[b, :, off] = out_codes.permute(1, 0, 2)
    view.k_codes[b, :, off] = pack_codes(codes, L, neox).permute(1, 0, 2)


def _read_main_keys(view, b, L: QuantLayout, neox: bool) -> torch.Tensor:
    """Block ``b``'s keys from its main and outlier codes (no sinks): ``[H, bs, D]``."""
    lo, hi = _channel_range(view, b, L)  # [H, D]
    k = _decode_keys(unpack_codes(view.k_codes[b], L, neox), lo[:, None, :], hi[:, None, :], L)
    if L.n_out:
        idx = view.out_idx[b].long()
        vals = _decode(view.out_k[b], torch.gather(torch.maximum(hi, -lo), 1, idx)[:, None, :], 127)  # [H, bs, n_out]
        k.scatter_(2, idx[:, None, :].expand(-1, L.block_size, -1), vals)
    return k


def quant_write_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    cache: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    stats: QuantStats,
    layout: QuantLayout,
    *,
    rope: Rope | None,
    is_neox_style: bool | None = None,
) -> None:
    """Quantize and store ``N`` tokens (naive float32 reference).

    ``key`` ``[N, kv_heads, D]`` as the model hands it to attention (after RoPE at
    ``positions``, when ``rope`` is given: it is rotated back first); ``value`` likewise;
    ``slots`` ``[N]`` ``block * block_size + offset``; ``positions`` ``[N]`` absolute token
    positions (``< sink_tokens``: a sink). Within one call the tokens of one block are
    contiguous and in order, as vLLM's slot mappings are. ``is_neox_style`` (default: the
    rope's, NeoX without one) picks the INT4 channel pairing (:func:`pair_order`).
    """
    L = layout
    bs = L.block_size
    view = PageView(cache, L)
    slots = slots.to(torch.long)
    positions = positions.to(torch.long)
    k, v = _pre_rope(key, value, positions, rope)
    blocks, offsets = slots // bs, slots % bs
    if not L.scaled:  # 16-bit pages: the floats themselves, channels in order
        dt = FLOAT_DTYPES[L.float_dtype]
        view.k_codes[blocks, :, offsets] = k.to(dt).view(torch.uint8)
        view.v_codes[blocks, :, offsets] = v.to(dt).view(torch.uint8)
        return
    is_sink = _sinks_and_stats(k, positions, stats, L)
    _write_blocks(view, blocks, offsets, k, v, is_sink, stats, L, _pairing(is_neox_style, rope))


def _pre_rope(key, value, positions, rope: Rope | None) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 keys rotated back to pre-RoPE (when ``rope`` is given) and values."""
    k = key.float()
    if rope is not None:
        k = rope.rotate(k, -positions)
    return k, value.float()


def _sinks_and_stats(k, positions, stats: QuantStats, L: QuantLayout) -> torch.Tensor:
    """Which tokens are sinks; the EMAs take every other key of the write."""
    is_sink = positions < L.sink_tokens
    if bool((~is_sink).any()):
        stats.update(k[~is_sink])
    return is_sink


def _pairing(is_neox_style: bool | None, rope: Rope | None) -> bool:
    """The INT4 channel pairing: as given, else the rope's, NeoX without one."""
    if is_neox_style is not None:
        return is_neox_style
    return rope.is_neox_style if rope is not None else True


def _write_blocks(view, blocks, offsets, k, v, is_sink, stats, L: QuantLayout, neox: bool) -> None:
    """:func:`quant_write_ref`'s store, one block at a time (``k`` pre-RoPE, the EMAs updated)."""
    bs, qmax = L.block_size, L.qmax
    for b in torch.unique(blocks).tolist():
        sel = blocks == b
        off = offsets[sel]
        kb, vb, sink_b = k[sel], v[sel], is_sink[sel]
        first = int(off.min())
        if first == 0:  # the block starts here: its sink section cleared (the zero code at 8 bits)
            view.sink_k[b] = 128
            view.sink_scale[b] = 0.0
        if L.key_scale == "token":
            k_abs = kb.abs().amax(dim=-1)  # [n, H]
            view.k_scale[b, :, off] = k_abs.half().t()
            codes = _encode(kb, k_abs.half().float()[..., None], qmax)
            codes[sink_b] = qmax + 1
            view.k_codes[b, :, off] = pack_codes(codes, L, neox).permute(1, 0, 2)
        else:
            _write_channel_keys(view, b, off, first, kb, sink_b, stats, L, neox)
        # Values: per token.
        v_abs = vb.abs().amax(dim=-1)  # [n, H]
        view.v_scale[b, :, off] = v_abs.half().t()
        view.v_codes[b, :, off] = pack_codes(_encode_values(vb, v_abs.half().float()[..., None], L), L, neox).permute(1, 0, 2)
        # Sinks: 8 bits per token.
        if bool(sink_b.any()):
            s_off = off[sink_b]
            s_abs = kb[sink_b].abs().amax(dim=-1).clamp_min(SINK_SCALE_MIN)  # [s, H]
            view.sink_scale[b, :, s_off] = s_abs.half().t()
            view.sink_k[b, :, s_off] = _encode(kb[sink_b], s_abs.half().float()[..., None], 127).permute(1, 0, 2)


def quant_write_cpu(
    key: torch.Tensor,
    value: torch.Tensor,
    cache: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    stats: QuantStats,
    layout: QuantLayout,
    *,
    rope: Rope | None,
    is_neox_style: bool | None = None,
    compiled: bool = True,
) -> None:
    """:func:`quant_write_ref` with its decode case batched: the blocks that take one token,
    not their first and not a sink, in one set of torch ops for all of them (a step's decode
    tokens, one per request), re-encoding in the same ops the earlier tokens of those whose
    channel range grew; with ``compiled`` and the C helper built, in one C pass
    (``csrc/quant_store.c``). The blocks a write fills whole with no sink among their tokens
    (a prefill chunk's inner blocks) are encoded together too (:func:`_write_whole`). Every
    other block (a block's start or end inside a chunk, sinks, per-token key scales) takes the
    reference's loop. The same bytes as the reference (tested)."""
    L = layout
    n = slots.numel()
    # The torch ops pay off from two tokens on; the C pass from one (a single stream's decode).
    use_c = compiled and cpu_ext.can_quant_decode(cache, L)
    least = 1 if use_c else 2
    if not L.scaled or L.key_scale != "channel" or n < least:
        quant_write_ref(key, value, cache, slots, positions, stats, L, rope=rope, is_neox_style=is_neox_style)
        return
    bs = L.block_size
    slots = slots.to(torch.long)
    positions = positions.to(torch.long)
    blocks, offsets = slots // bs, slots % bs
    # One token of its block in this write (vLLM's slot mappings keep a block's tokens together).
    alone = torch.ones(n, dtype=torch.bool)
    same = blocks[1:] == blocks[:-1]
    alone[1:] &= ~same
    alone[:-1] &= ~same
    batched = alone & (offsets > 0) & (positions >= L.sink_tokens)
    # Blocks this write fills whole (a prefill chunk's inner blocks; slots are distinct, so
    # block_size tokens of one block are its every slot), none of their tokens a sink: their
    # own channel ranges, encoded together (_write_whole).
    # Fewer tokens than a block (every decode step) fill none: the decode path pays nothing.
    any_whole = False
    if n >= bs:
        ub, inv, cnt = torch.unique(blocks, return_inverse=True, return_counts=True)
        sinks_in = torch.zeros(len(ub), dtype=torch.long).index_add_(0, inv, (positions < L.sink_tokens).long())
        whole_blk = (cnt == bs) & (sinks_in == 0)
        any_whole = bool(whole_blk.any())
    whole = whole_blk[inv] if any_whole else torch.zeros(n, dtype=torch.bool)
    if int(batched.sum()) < least and not any_whole:
        quant_write_ref(key, value, cache, slots, positions, stats, L, rope=rope, is_neox_style=is_neox_style)
        return
    neox = _pairing(is_neox_style, rope)
    k, v = _pre_rope(key, value, positions, rope)
    if use_c and not any_whole and bool(batched.all()):  # every decode step: one C pass, no views
        stats.update(k)  # batched tokens are no sinks
        cpu_ext.quant_store_alone(cache, blocks, offsets, k, v, L, neox=neox)
        return
    is_sink = _sinks_and_stats(k, positions, stats, L)
    view = PageView(cache, L)
    if any_whole:
        rank = torch.cumsum(whole_blk.long(), 0) - 1  # whole block -> its row
        w = torch.nonzero(whole).flatten()
        order = torch.empty(int(whole_blk.sum()), bs, dtype=torch.long)
        order[rank[inv[w]], offsets[w]] = w
        _write_whole(view, ub[whole_blk], k[order], v[order], L, neox)
    if int(batched.sum()) < least:  # a lone decode token among them: the reference's loop
        batched = torch.zeros_like(batched)
    rest = torch.nonzero(~batched & ~whole).flatten()
    if len(rest):
        _write_blocks(view, blocks[rest], offsets[rest], k[rest], v[rest], is_sink[rest], stats, L, neox)
    idx = torch.nonzero(batched).flatten()
    if not len(idx):
        return
    if use_c:  # csrc/quant_store.c: the same bytes as _write_alone
        cpu_ext.quant_store_alone(cache, blocks[idx], offsets[idx], k[idx], v[idx], L, neox=neox)
    else:
        _write_alone(view, blocks[idx], offsets[idx], k[idx], v[idx], L, neox)


def _write_whole(view, b, kb, vb, L: QuantLayout, neox: bool) -> None:
    """Blocks ``b`` ``[m]`` written whole, no sinks among their tokens: ``kb``, ``vb``
    ``[m, bs, H, D]`` (keys pre-RoPE) in slot order. :func:`_write_blocks`'s store for a block
    started and filled by one write (its own channel range, outlier channels chosen from it,
    the sink section cleared), for all of them in one set of ops: the same bytes."""
    view.sink_k[b] = 128
    view.sink_scale[b] = 0.0
    if L.key_zero_point:
        lo, hi = kb.amin(dim=1), kb.amax(dim=1)  # [m, H, D]
    else:
        hi = kb.abs().amax(dim=1)
        lo = -hi
    lo, hi = lo.half().float(), hi.half().float()
    fill = 0 if L.key_zero_point else L.qmax + 1
    codes = _encode_keys(kb, lo[:, None], hi[:, None], L)  # [m, bs, H, D]
    if L.n_out:
        idx = torch.topk(hi - lo, L.n_out, dim=-1).indices  # [m, H, n_out]
        view.out_idx[b] = idx.to(torch.uint8)
        gidx = idx[:, None].expand(-1, L.block_size, -1, -1)
        codes.scatter_(3, gidx, fill)
        out_abs = torch.gather(torch.maximum(hi, -lo), 2, idx)
        view.out_k[b] = _encode(torch.gather(kb, 3, gidx), out_abs[:, None], 127).permute(0, 2, 1, 3)
    view.k_scale[b] = hi.half()
    if L.key_zero_point:
        view.k_zero[b] = lo.half()
    view.k_codes[b] = pack_codes(codes, L, neox).permute(0, 2, 1, 3)
    v_abs = vb.abs().amax(dim=-1)  # [m, bs, H]
    view.v_scale[b] = v_abs.half().permute(0, 2, 1)
    view.v_codes[b] = pack_codes(_encode_values(vb, v_abs.half().float()[..., None], L), L, neox).permute(0, 2, 1, 3)


def _write_alone(view, b, off, kb, vb, L: QuantLayout, neox: bool) -> None:
    """One token ``kb``, ``vb`` ``[m, H, D]`` into slot ``off`` of each block ``b`` ``[m]`` (not its
    first slot, not a sink): :func:`_write_channel_keys` and the value store for all at once."""
    m, H, D = kb.shape
    old_lo, old_hi = _channel_range(view, b, L)  # [m, H, D]
    if L.key_zero_point:
        new_lo, new_hi = kb, kb
    else:
        new_hi = kb.abs()
        new_lo = -new_hi
    lo = torch.minimum(old_lo, new_lo).half().float()
    hi = torch.maximum(old_hi, new_hi).half().float()
    grew = ((hi > old_hi) | (lo < old_lo)).flatten(1).any(dim=1)
    g = torch.nonzero(grew).flatten()
    if len(g):  # re-encode the earlier tokens of the blocks that outgrew their range
        bg = b[g]
        view_lo, view_hi = old_lo[g][:, :, None, :], old_hi[g][:, :, None, :]
        prev = _decode_keys(unpack_codes(view.k_codes[bg], L, neox), view_lo, view_hi, L)  # [g, H, bs, D]
        if L.n_out:
            oi = view.out_idx[bg].long()  # [g, H, n_out]
            oabs = torch.gather(torch.maximum(old_hi[g], -old_lo[g]), 2, oi)
            vals = _decode(view.out_k[bg], oabs[:, :, None, :], 127)
            prev.scatter_(3, oi[:, :, None, :].expand(-1, -1, L.block_size, -1), vals)
        codes, out_codes = _key_codes(view, bg, prev, lo[g][:, :, None, :], hi[g][:, :, None, :], L)
        earlier = (torch.arange(L.block_size)[None, :] < off[g, None])[:, None, :, None]  # [g, 1, bs, 1]
        view.k_codes[bg] = torch.where(earlier, pack_codes(codes, L, neox), view.k_codes[bg])
        if L.n_out:
            view.out_k[bg] = torch.where(earlier, out_codes, view.out_k[bg])
    view.k_scale[b] = hi.half()
    if L.key_zero_point:
        view.k_zero[b] = lo.half()
    codes, out_codes = _key_codes(view, b, kb, lo, hi, L)
    if L.n_out:
        view.out_k[b, :, off] = out_codes
    view.k_codes[b, :, off] = pack_codes(codes, L, neox)
    v_abs = vb.abs().amax(dim=-1)  # [m, H]
    view.v_scale[b, :, off] = v_abs.half()
    view.v_codes[b, :, off] = pack_codes(_encode_values(vb, v_abs.half().float()[..., None], L), L, neox)


def _key_codes(view, b, x, lo, hi, L: QuantLayout) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Main codes of keys ``x`` ``[m, H, ..., D]`` in blocks ``b`` ``[m]`` with ranges ``lo``,
    ``hi`` (broadcast to ``x``), outlier channels filled, and the outliers' own codes
    ``[m, H, ..., n_out]`` (None without outlier channels): :func:`_store_keys`'s encoding."""
    codes = _encode_keys(x, lo, hi, L)
    if not L.n_out:
        return codes, None
    fill = 0 if L.key_zero_point else L.qmax + 1
    idx = view.out_idx[b].long()  # [m, H, n_out]
    idx = idx.view(*idx.shape[:2], *([1] * (x.dim() - 3)), L.n_out).expand(*x.shape[:-1], L.n_out)
    codes.scatter_(-1, idx, fill)
    out_abs = torch.gather(torch.maximum(hi, -lo).expand(x.shape), -1, idx)
    return codes, _encode(torch.gather(x, -1, idx), out_abs, 127)


def _write_channel_keys(view, b, off, first, kb, sink_b, stats, L: QuantLayout, neox: bool) -> None:
    """Keys of one block's write with per-channel scales (the method, see the module docstring)."""
    body = kb[~sink_b]
    has = bool((~sink_b).any())
    if L.key_zero_point:
        inf = torch.full_like(stats.ema_absmax, math.inf)
        new_lo, new_hi = (body.amin(dim=0), body.amax(dim=0)) if has else (inf, -inf)
    else:
        new_hi = body.abs().amax(dim=0) if has else torch.zeros_like(stats.ema_absmax)
        new_lo = -new_hi
    if first == 0:  # the block starts here: range from the EMA, outlier channels chosen
        # Written whole (a prefill chunk): its own range. Started by a partial write (decode):
        # the EMA predicts what the rest of the block will need.
        if len(off) == L.block_size and has:
            lo, hi = new_lo, new_hi
        elif L.key_zero_point:
            lo, hi = torch.minimum(stats.ema_min, new_lo), torch.maximum(stats.ema_max, new_hi)
        else:
            hi = torch.maximum(stats.ema_absmax, new_hi)
            lo = -hi
        lo, hi = lo.half().float(), hi.half().float()
        if L.n_out:
            view.out_idx[b] = torch.topk(hi - lo, L.n_out, dim=-1).indices.to(torch.uint8)
    else:
        old_lo, old_hi = _channel_range(view, b, L)
        lo = torch.minimum(old_lo, new_lo).half().float()
        hi = torch.maximum(old_hi, new_hi).half().float()
        if bool((hi > old_hi).any() | (lo < old_lo).any()):
            # A channel outgrew its block range: re-encode the block's earlier tokens with
            # the grown range instead of clipping the new one.
            prev = torch.arange(first)
            k_prev = _read_main_keys(view, b, L, neox)[:, :first].transpose(0, 1)  # [first, H, D]
            _store_keys(view, b, prev, k_prev, torch.zeros(first, dtype=torch.bool), lo, hi, L, neox)
    view.k_scale[b] = hi.half()
    if L.key_zero_point:
        view.k_zero[b] = lo.half()
    _store_keys(view, b, off, kb, sink_b, lo, hi, L, neox)


def _overlay_sections(view, blocks, k, lo, hi, L: QuantLayout) -> None:
    """Outlier channels and sink slots of ``blocks`` over their main-code keys ``k``
    ``[m, H, bs, D]`` (in place), each from its own 8-bit section; ``lo``, ``hi`` ``[m, H, D]``
    the channel ranges (the outliers' scale is the channel's absmax)."""
    if L.n_out:
        idx = view.out_idx[blocks].long()  # [m, H, n_out]
        out_abs = torch.gather(torch.maximum(hi, -lo), 2, idx)
        vals = _decode(view.out_k[blocks], out_abs[:, :, None, :], 127)  # [m, H, bs, n_out]
        k.scatter_(3, idx[:, :, None, :].expand(-1, -1, L.block_size, -1), vals)
    if L.sink_tokens:
        s_abs = view.sink_scale[blocks].float()  # [m, H, S]; 0: not a sink slot
        sink = _decode(view.sink_k[blocks], s_abs[..., None], 127)  # [m, H, S, D]
        k[:, :, : L.sink_tokens] = torch.where(s_abs[..., None] > 0, sink, k[:, :, : L.sink_tokens])


def quant_read_ref(
    cache: torch.Tensor, blocks: torch.Tensor, layout: QuantLayout, *, is_neox_style: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantize whole blocks: ``(keys before RoPE, values)``, each ``[m, kv_heads, bs, D]``
    float32 (naive reference: main codes, outlier channels and sink keys each where they
    belong)."""
    L = layout
    view = PageView(cache, L)
    blocks = blocks.to(torch.long)
    if not L.scaled:
        dt = FLOAT_DTYPES[L.float_dtype]
        return view.k_codes[blocks].view(dt).float(), view.v_codes[blocks].view(dt).float()
    codes = unpack_codes(view.k_codes[blocks], L, is_neox_style)
    if L.key_scale == "channel":
        lo, hi = _channel_range(view, blocks, L)  # [m, H, D]
        k = _decode_keys(codes, lo[:, :, None, :], hi[:, :, None, :], L)
    else:
        k = _decode(codes, view.k_scale[blocks].float()[..., None], L.qmax)  # per token
        lo = hi = None  # no outlier channels with per-token scales (QuantLayout.n_out)
    _overlay_sections(view, blocks, k, lo, hi, L)
    v = _decode_values(unpack_codes(view.v_codes[blocks], L, is_neox_style), view.v_scale[blocks].float()[..., None], L)
    return k, v


def _unpack_fast(stored: torch.Tensor, layout: QuantLayout, is_neox_style: bool) -> torch.Tensor:
    """:func:`unpack_codes` without index scatters: NeoX pairs are the two halves in order, GPT-J
    pairs interleave."""
    if layout.bits == 8:
        if is_neox_style:
            return stored
        lo, hi = stored.chunk(2, dim=-1)
    else:
        lo, hi = stored & 0xF, stored >> 4
    return torch.cat((lo, hi), dim=-1) if is_neox_style else torch.stack((lo, hi), dim=-1).flatten(-2)


def quant_read_cpu(
    cache: torch.Tensor, blocks: torch.Tensor, layout: QuantLayout, *, is_neox_style: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quant_read_ref` in fewer, fused torch ops: what the plugin's torch path reads
    pages with (2x the reference's speed at INT4, 4x at INT8 on this CPU; tested equal to it).
    Per-token key scales (the ablation's foil) take the reference."""
    L = layout
    if not L.scaled or L.key_scale != "channel":
        return quant_read_ref(cache, blocks, L, is_neox_style=is_neox_style)
    view = PageView(cache, L)
    blocks = blocks.to(torch.long)
    codes = _unpack_fast(view.k_codes[blocks], L, is_neox_style).float()
    lo, hi = _channel_range(view, blocks, L)  # [m, H, D]
    if L.key_zero_point:
        k = torch.addcmul(lo[:, :, None, :], codes, ((hi - lo) / (2**L.bits - 1))[:, :, None, :])
    else:
        k = codes.sub_(L.qmax + 1).mul_((hi / L.qmax)[:, :, None, :])
    _overlay_sections(view, blocks, k, lo, hi, L)
    v_codes = _unpack_fast(view.v_codes[blocks], L, is_neox_style)
    v_abs = view.v_scale[blocks].float()[..., None]
    if L.value_levels == "nf4":
        # index_select over flat int32 codes: half the time of advanced indexing with int64
        v = NF4.to(v_codes.device).index_select(0, v_codes.reshape(-1).int()).view(v_codes.shape).mul_(v_abs)
    else:
        v = v_codes.float().sub_(L.qmax + 1).mul_(v_abs / L.qmax)
    return k, v


def quant_decode_attention_ref(
    query: torch.Tensor,
    cache: torch.Tensor,
    blocks: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    ranks: torch.Tensor,
    layout: QuantLayout,
    *,
    scale: float,
    rope: Rope | None,
) -> torch.Tensor:
    """One query per request over quantized blocks (naive float32 reference).

    ``query`` ``[B, heads, D]`` rotated at its cache position; ``blocks`` ``[B, M]`` physical
    blocks to read; per (request, block): slots ``[starts, ends)`` are attended (``starts >=
    ends``: skip the block; its id is never dereferenced then), and slot ``starts + i`` sits at
    cache position ``ranks + i``, where its key is rotated. Returns ``[B, heads, D]`` float32.
    """
    B, num_heads, D = query.shape
    out = torch.zeros(B, num_heads, D)
    neox = rope.is_neox_style if rope is not None else True
    for r in range(B):
        ks, vs, pos = [], [], []
        for j in range(blocks.shape[1]):
            a, e = int(starts[r, j]), int(ends[r, j])
            if e <= a:
                continue
            k, v = quant_read_ref(cache, blocks[r, j : j + 1], layout, is_neox_style=neox)
            ks.append(k[0, :, a:e].transpose(0, 1))  # [n, H, D]
            vs.append(v[0, :, a:e].transpose(0, 1))
            pos.append(torch.arange(e - a) + int(ranks[r, j]))
        k, v, pos = torch.cat(ks), torch.cat(vs), torch.cat(pos)
        q = query[r : r + 1].float()
        if rope is not None:
            k = rope.rotate(k, pos)
        kv_heads = k.shape[1]
        group = num_heads // kv_heads
        for h in range(num_heads):
            s = (k[:, h // group] @ q[0, h]) * scale
            out[r, h] = torch.softmax(s, dim=0) @ v[:, h // group]
    return out


def quant_sink_window_decode_cpu(
    query: torch.Tensor,
    cache: torch.Tensor,
    plan: DecodePlan,
    layout: QuantLayout,
    *,
    scale: float,
    rope: Rope | None,
    out: torch.Tensor,
    compiled: bool = True,
) -> torch.Tensor:
    """A step's one-token requests over quantized pages in one batch of torch ops (the CPU
    decode path; with ``compiled`` and the C helper built, ``cpu_ext.quant_decode`` does the
    same per slot, fused, without materializing the pages in float; the oracle is
    :func:`~vllm_kvstream.kernels.sink_attention.sink_window_attention_ref`
    with keys before RoPE, which this meets up to float rounding).

    ``plan``: :func:`~vllm_kvstream.kernels.sink_decode.plan_decode` over the step's physical
    block table, built once per step for every layer: which pages to read (the sink blocks
    and the window's, nothing evicted; padding repeats a block the row reads), the attended slots, and the
    position each key is met at. ``query`` ``[T, heads, D]`` as the model rotated it, at
    absolute positions. Per layer: one gather-and-dequantize of the listed pages
    (:func:`quant_read_cpu`), one rotation of the keys at the plan's positions (absolute for
    the window, shifted forward by the evicted count for the sinks: the same scores as
    cache-relative rotation, ``<R(p-e) q, R(i) k> = <R(p) q, R(i+e) k>``), two matmuls batched
    over (request, block, head) and a softmax across blocks. Slots that are not attended are
    masked by ``masked_fill`` on scores and values, so whatever their bytes decode to (NaN
    included) weighs nothing. Writes rows ``plan.rows`` of ``out``."""
    batch, nb = plan.blocks.shape
    neox = rope.is_neox_style if rope is not None else True
    if compiled and cpu_ext.can_quant_decode(cache, layout):
        cos = sin = None
        if rope is not None:
            cs = plan.workspace.get("key_cos_sin_t")
            if cs is None:  # once per step, shared by every layer: [batch, nb, rd / 2, bs]
                cos, sin = rope.cos_sin(plan.key_positions.reshape(-1))
                shape = (batch, nb, plan.key_positions.shape[-1], rope.rotary_dim // 2)
                cs = tuple(x.view(shape).transpose(-1, -2).contiguous() for x in (cos, sin))
                plan.workspace["key_cos_sin_t"] = cs
            cos, sin = cs
        attended = plan.workspace.get("attended_u8")
        if attended is None:  # once per step
            attended = plan.workspace["attended_u8"] = plan.attended.to(torch.uint8).contiguous()
        q = query.index_select(0, plan.rows)
        o = cpu_ext.quant_decode(q, cache, plan.blocks, attended, cos, sin, layout, scale=scale, neox=neox,
                                 rotary_dim=rope.rotary_dim if rope is not None else 0)
        out.index_copy_(0, plan.rows, o.to(out.dtype))
        return out
    k, v = quant_read_cpu(cache, plan.blocks.reshape(-1), layout, is_neox_style=neox)  # [B*nb, H, bs, D]
    kv_heads, bs, head_size = k.shape[1:]
    k = k.view(batch, nb, kv_heads, bs, head_size)
    v = v.view(batch, nb, kv_heads, bs, head_size)
    if rope is not None:
        cs = plan.workspace.get("key_cos_sin")
        if cs is None:  # once per step: every layer meets its keys at the same positions
            cos, sin = rope.cos_sin(plan.key_positions.reshape(-1))
            shape = (batch, nb, 1, bs, rope.rotary_dim // 2)
            cs = plan.workspace["key_cos_sin"] = (cos.view(shape), sin.view(shape))
        cos, sin = cs  # in place, through the keys' transposed view (the helper's layout)
        _rotate_keys_(k.transpose(-1, -2), cos.transpose(-1, -2), sin.transpose(-1, -2), rope)
    attended = plan.attended
    v.masked_fill_(~attended[:, :, None, :, None], 0.0)
    num_heads = query.shape[1]
    group = num_heads // kv_heads
    q = query.index_select(0, plan.rows).float().view(batch, 1, kv_heads, group, head_size)
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)  # [B, nb, H, group, bs]
    scores.masked_fill_(~attended[:, :, None, None, :], float("-inf"))
    scores = scores.sub_(scores.amax(dim=(1, 4), keepdim=True)).exp_()
    o = torch.matmul(scores, v).sum(dim=1).div_(scores.sum(dim=(1, 4)).unsqueeze(-1))  # [B, H, group, D]
    out.index_copy_(0, plan.rows, o.reshape(batch, num_heads, head_size).to(out.dtype))
    return out
