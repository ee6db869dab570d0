"""Rotary position embedding with the model's own cos/sin table, and exact angles past it.

A stream runs far past the model's trained context, so positions outside the table (and the
negative rotations attention applies to meet the sinks, see ``sink_attention.py``) are
computed in float64 and reduced mod 2*pi, so a position of a million keeps full precision.
Positions inside the table use the table, bit for bit what the model's rotary op uses.

Scaled RoPE (``linear``, ``dynamic``, ``llama3``, ``yarn``, ``deepseek_yarn``, ...) is still a
fixed rotation: position ``p`` turns channel pair ``i`` by ``p * theta_i`` with the variant's own
(scaled) frequencies, and YaRN-style variants multiply cos and sin by a constant ``mscale``.
:meth:`Rope.from_table` reads both off the table the model's rotary op built, so every variant
that is a fixed rotation is served by the same code, and one that is not (frequencies switched
by length, several tables concatenated, 3-D positions) is refused.

Every rotation the plugin applies is a *pure* rotation by a distance: moving an already rotated
query or key by ``d`` (StreamingLLM's cache-relative positions), undoing the model's rotation
(keys stored before RoPE) or redoing it at a cache position. Rotations preserve length, so the
model's ``mscale`` -- applied once to ``q`` and ``k`` by the model's own op at their absolute
positions -- survives every later rotation unchanged: the score keeps exactly the model's
``mscale**2`` factor. Applying the table as it is (magnitude included) for such a move would
apply ``mscale`` twice. So :attr:`Rope.cos_sin_cache` is the *unit* table (the model's divided by
``mscale``) and :attr:`Rope.mscale` is kept apart, used only where the plugin stands in for the
model's op itself (positions past its table, ``adapter/rope.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class Rope:
    """RoPE parameters of one model: the same table and style the model's rotary op uses."""

    rotary_dim: int
    is_neox_style: bool
    cos_sin_cache: torch.Tensor  # [max_positions, rotary_dim]: cos | sin of unit length
    inv_freq: torch.Tensor  # [rotary_dim // 2], float64
    #: The model's magnitude factor on cos and sin (YaRN's attention scaling); 1 for plain RoPE.
    mscale: float = 1.0

    @classmethod
    def from_base(cls, rotary_dim: int, base: float, max_positions: int, is_neox_style: bool = True) -> Rope:
        """Plain RoPE (theta = ``base``), built the way vLLM and transformers build it."""
        inv_freq32 = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float), inv_freq32)
        cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
        return cls(rotary_dim, is_neox_style, cache, inv_freq32.double())

    @classmethod
    def from_table(cls, table: torch.Tensor, rotary_dim: int, is_neox_style: bool) -> Rope:
        """The fixed rotation a rotary op's float32 ``cos | sin`` table holds: per channel pair
        the frequency (least squares over the unwrapped angles of its rows, then snapped to the
        float32 value the op computed it as) and the common magnitude ``mscale``. Raises
        ``ValueError`` naming the row and channel where the table is not ``mscale * (cos, sin)(p *
        theta)``: such an op is not a fixed rotation and cache-relative positions cannot serve it."""
        if table.dim() != 2 or table.shape[1] != rotary_dim or rotary_dim % 2 or table.shape[0] < 2:
            raise ValueError(f"a RoPE table of shape [positions >= 2, {rotary_dim}] is needed, got {list(table.shape)}")
        # Long tables (Llama-3.1: 131072 rows) are read at every row up to 4096 and at 61440
        # rows spread over the rest: the same fit and check for a fraction of the memory.
        n = table.shape[0]
        rows = torch.arange(n)
        if n > 65536:
            rows = torch.cat((rows[:4096], torch.linspace(4096, n - 1, 61440).round().long())).unique()
        t = table.index_select(0, rows).double()
        half = rotary_dim // 2
        c, s = t[:, :half], t[:, half:]
        mag = torch.hypot(c, s)
        mscale = float(mag.mean())
        if abs(mscale - 1.0) < 1e-6:
            mscale = 1.0
        bad = (mag - mscale).abs() > 1e-4 * max(mscale, 1e-12)
        if bool(bad.any()):
            i, ch = (int(x) for x in torch.nonzero(bad)[0])
            raise ValueError(
                f"the table's magnitude varies with position (row {int(rows[i])}, channel {ch}: "
                f"{float(mag[i, ch]):.6g} vs {mscale:.6g}): not a fixed rotation"
            )
        angle = torch.atan2(s, c)
        pos = rows.to(torch.float64)[:, None]
        theta = angle[1].clone()
        for upto in (min(64, t.shape[0]), min(4096, t.shape[0]), t.shape[0]):
            p = pos[:upto]
            turns = torch.round((p * theta - angle[:upto]) / (2 * math.pi))
            unwrapped = angle[:upto] + 2 * math.pi * turns
            theta = (p * unwrapped).sum(0) / (p * p).sum()
        for candidate in (theta.float().double(), theta):  # the float32 value the op used, if it fits
            # A float32 table is exact to rounding of its float32 angles: a few ulps of p * theta.
            residual = (unwrapped - pos * candidate).abs()
            off = residual > 1e-4 + 1e-6 * (pos * candidate).abs()
            if not bool(off.any()):
                break
        else:
            i, ch = (int(x) for x in torch.nonzero(off)[0])
            raise ValueError(
                f"the table's angle at row {int(rows[i])}, channel {ch} is off the best fixed frequency "
                f"{float(theta[ch]):.9g} by {float(residual[i, ch]):.3g} rad: not a fixed rotation"
            )
        unit = (table.float() / mscale) if mscale != 1.0 else table.float()
        return cls(rotary_dim, is_neox_style, unit.contiguous(), candidate, mscale)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 ``cos, sin`` of shape ``[N, rotary_dim // 2]`` for integer ``positions``: a pure
        rotation (unit length; see the module docstring for ``mscale``)."""
        positions = positions.reshape(-1)
        rows = self.cos_sin_cache.shape[0]
        if positions.numel() == 0 or (int(positions.min()) >= 0 and int(positions.max()) < rows):
            cs = self.cos_sin_cache.index_select(0, positions.to(torch.long)).float()
            cos, sin = cs.chunk(2, dim=-1)
            return cos, sin
        angles = positions.to(torch.float64)[:, None] * self.inv_freq.to(positions.device)[None, :]
        angles = torch.remainder(angles, 2 * math.pi)
        return angles.cos().float(), angles.sin().float()

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` of shape ``[N, heads, head_size]`` (float32) at ``positions`` ``[N]``."""
        cos, sin = self.cos_sin(positions)
        return self.apply(x, cos, sin)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` ``[N, heads, head_size]`` by angles given as ``cos, sin`` ``[N, rotary_dim // 2]``
        (from :meth:`cos_sin`, computed once where several calls share them)."""
        cos = cos.unsqueeze(-2)
        sin = sin.unsqueeze(-2)
        rd = self.rotary_dim
        x_rot, x_pass = x[..., :rd], x[..., rd:]
        if self.is_neox_style:
            x1, x2 = torch.chunk(x_rot, 2, dim=-1)
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            x1, x2 = x_rot[..., ::2], x_rot[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        if x_pass.shape[-1] == 0:
            return out
        return torch.cat((out, x_pass), dim=-1)
