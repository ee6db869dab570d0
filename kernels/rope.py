"""Rotary position embedding with the model's own cos/sin table, and exact angles past it.

A stream runs far past the model's trained context, so positions outside the table (and the
negative rotations attention applies to meet the sinks, see ``sink_attention.py``) are
computed in float64 and reduced mod 2*pi, so a position of a million keeps full precision.
Positions inside the table use the table, bit for bit what the model's rotary op uses.
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
    cos_sin_cache: torch.Tensor  # [max_positions, rotary_dim]: cos | sin
    inv_freq: torch.Tensor  # [rotary_dim // 2], float64

    @classmethod
    def from_base(cls, rotary_dim: int, base: float, max_positions: int, is_neox_style: bool = True) -> Rope:
        """Plain RoPE (theta = ``base``), built the way vLLM and transformers build it."""
        inv_freq32 = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float), inv_freq32)
        cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
        return cls(rotary_dim, is_neox_style, cache, inv_freq32.double())

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 ``cos, sin`` of shape ``[N, rotary_dim // 2]`` for integer ``positions``."""
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
