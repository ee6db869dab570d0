"""RoPE at absolute positions past the model's table while a policy is on.

Why: a stream runs far past the trained context, and vLLM's rotary op indexes the model's
cos/sin table (``max_position_embeddings`` rows; vLLM does not grow it) with the position:
IndexError natively, garbage in the CPU C++ op. StreamingLLM counts positions inside the
cache, which only ever needs *distances*: a window key keeps its true distance ``p - j`` to
the query, and the attention backend rotates the query back by the number of evicted tokens
to meet the sinks (``kernels/sink_attention.py``). So keys are cached rotated at their
absolute positions, exactly like stock vLLM, and never re-rotated: decode reads the kept keys
once and rotates one query vector, instead of re-rotating the whole window every layer of
every step (which cost ~2x in decode time on CPU in the first version, which cached keys
before RoPE). Positions in the table use the stock op unchanged; only positions past it are
computed here, in float64 reduced mod 2*pi, so a position of 10^6 keeps full precision. The
memory this adds is per step (the positions of one batch), not per stream.

How (monkeypatch, written down): ``CustomOp.register_oot`` replaces vLLM's ``RotaryEmbedding``
class (plain RoPE, what Llama/Qwen/Mistral use) by :class:`KVStreamRotaryEmbedding`. An
instance built while no policy is configured is the stock op in every respect (same methods,
same dispatch). An instance built under a policy keeps the stock dispatch for positions in
the table, takes over past it, and records itself so the attention backend uses the very same
table. Models whose RoPE is another class (Llama-3 scaling, YaRN, M-RoPE, ...) are refused
with a clear error by the backend, which finds no recorded rope.

Upstream change that would remove it: rotary ops that compute positions past their table (or
grow it), and an attention-backend hook to rotate the query per key range.
"""

from __future__ import annotations

import threading

import torch

from vllm_kvstream.kernels import Rope
from vllm_kvstream.adapter.compat import probe

_lock = threading.Lock()
_recorded_ropes: list[Rope] = []


def recorded_rope() -> Rope:
    """The RoPE of the model being served (recorded when its rotary op was built under a policy)."""
    with _lock:
        distinct = {(r.rotary_dim, r.is_neox_style, r.cos_sin_cache.shape, float(r.inv_freq[-1])) for r in _recorded_ropes}
        if not _recorded_ropes:
            raise RuntimeError(
                "vllm-kvstream: the model built no plain RotaryEmbedding, so the KV policy cannot "
                "apply RoPE with cache-relative positions. Supported: models whose rotary embedding "
                "is vLLM's RotaryEmbedding (rope_type 'default'), e.g. Llama, Qwen2, Mistral."
            )
        if len(distinct) > 1:
            raise RuntimeError(
                "vllm-kvstream: the model uses several different rotary embeddings; a KV policy "
                f"supports one. Found: {sorted(distinct)}"
            )
        return _recorded_ropes[-1]


def forget_recorded_ropes() -> None:
    """Called before an engine is configured so a second engine in one process starts clean."""
    with _lock:
        _recorded_ropes.clear()


def _forward_context():
    """vLLM's per-forward-pass context object (a new one every step), or None outside one."""
    fc = probe("vllm.forward_context")
    return fc.get_forward_context() if fc.is_forward_context_available() else None


def register_rope_override() -> None:
    """Register the override once per process (vLLM asserts on duplicate OOT names)."""
    custom_op = probe("vllm.model_executor.custom_op")
    rotary_cls = probe("vllm.model_executor.layers.rotary_embedding.base:RotaryEmbedding")
    if custom_op.op_registry_oot.get("RotaryEmbedding") is not None:
        return

    from vllm_kvstream.adapter.state import active_policy

    class KVStreamRotaryEmbedding(rotary_cls):  # type: ignore[misc, valid-type]
        """vLLM's RotaryEmbedding; exact past its table when built under a KV policy."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.kvstream_rope: Rope | None = None
            if active_policy() is not None:
                self.kvstream_rope = Rope(
                    rotary_dim=self.rotary_dim,
                    is_neox_style=self.is_neox_style,
                    cos_sin_cache=self.cos_sin_cache,
                    inv_freq=self._compute_inv_freq(self.base).double(),
                )
                self._kvstream_stock_forward = self._forward_method
                self._forward_method = self._kvstream_forward
                self._kvstream_step: tuple | None = None
                self._kvstream_check: tuple | None = None
                with _lock:
                    _recorded_ropes.append(self.kvstream_rope)

        def forward_native(self, positions, query, key=None):
            if self.kvstream_rope is not None and self._kvstream_past_table(positions):
                return self._kvstream_far(positions, query, key)
            return super().forward_native(positions, query, key)

        def _kvstream_past_table(self, positions: torch.Tensor) -> bool:
            """Whether a position of the batch is past the table. Looked up once per step: the
            layers of a model share this op, and on a GPU each lookup is a device sync."""
            if positions.numel() == 0:
                return False
            ctx = _forward_context()
            key = (positions.data_ptr(), positions.numel())
            seen = self._kvstream_check
            if ctx is not None and seen is not None and seen[0] is ctx and seen[1] == key:
                return seen[2]
            far = int(positions.max()) >= self.kvstream_rope.cos_sin_cache.shape[0]
            self._kvstream_check = (ctx, key, far) if ctx is not None else None
            return far

        def _kvstream_forward(self, positions: torch.Tensor, query: torch.Tensor, key=None, *args, **kwargs):
            if self._kvstream_past_table(positions):
                return self._kvstream_far(positions, query, key)
            return self._kvstream_stock_forward(positions, query, key, *args, **kwargs)

        def _kvstream_far(self, positions: torch.Tensor, query: torch.Tensor, key):
            """Rotate with a cos/sin table built for exactly this batch's positions (float64
            angles), shared by every layer of the step, through the stock torch op."""
            pos = positions.flatten()
            ctx = _forward_context()
            cached = self._kvstream_step
            if ctx is not None and cached is not None and cached[0] is ctx and cached[1] == (pos.numel(), query.dtype):
                local, table = cached[2], cached[3]
            else:
                cos, sin = self.kvstream_rope.cos_sin(pos)
                table = torch.cat((cos, sin), dim=-1).to(device=query.device, dtype=query.dtype)
                local = torch.arange(pos.numel(), device=pos.device)
                self._kvstream_step = (ctx, (pos.numel(), query.dtype), local, table)
            return self.forward_static(local, query, key, self.head_size, self.rotary_dim, table, self.is_neox_style)

    KVStreamRotaryEmbedding.__qualname__ = "KVStreamRotaryEmbedding"
    custom_op.CustomOp.register_oot(KVStreamRotaryEmbedding, name="RotaryEmbedding")
