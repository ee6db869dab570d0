"""Keep keys unrotated in the KV cache: a pass-through rotary embedding while a policy is on.

Why: StreamingLLM counts positions inside the cache. If keys were stored after RoPE at their
true positions, a key's rotation would be frozen at write time, and a stream past the trained
context would need the model's cos/sin table (``max_position_embeddings`` rows; vLLM does not
grow it) at positions it does not have (IndexError natively, garbage in the CPU C++ op). With
keys stored before RoPE, the attention backend rotates the query and the kept keys itself,
with cache-relative positions that never exceed sink + window + one chunk. It also keeps
prefix-cache hits valid whatever positions later steps use, and it is the layout KVQuant-style
per-channel key quantization wants (keys quantized before RoPE). The cost is re-rotating the
kept keys each step: O(kept tokens) per layer, the same order as reading them.

How (monkeypatch, written down): ``CustomOp.register_oot`` replaces vLLM's ``RotaryEmbedding``
class (plain RoPE, what Llama/Qwen/Mistral use) by :class:`KVStreamRotaryEmbedding`. An
instance built while no policy is configured is the stock op in every respect (same methods,
same dispatch). An instance built under a policy dispatches to a pass-through and records
itself so the attention backend can use the very same cos/sin table. Models whose RoPE is
another class (Llama-3 scaling, YaRN, M-RoPE, ...) are refused with a clear error by the
backend, which finds no recorded rope.

Upstream change that would remove it: an attention-backend capability "applies RoPE itself"
(vLLM already fuses RoPE into some backends via ``do_rope_and_kv_cache_update``) that models
honour by handing the backend positions instead of rotating q/k.
"""

from __future__ import annotations

import threading

import torch

from vllm_kvstream.kernels import Rope
from vllm_kvstream.adapter.compat import probe

_lock = threading.Lock()
_passthrough_ropes: list[Rope] = []


def recorded_rope() -> Rope:
    """The RoPE of the model being served (recorded when its pass-through op was built)."""
    with _lock:
        distinct = {(r.rotary_dim, r.is_neox_style, r.cos_sin_cache.shape, float(r.inv_freq[-1])) for r in _passthrough_ropes}
        if not _passthrough_ropes:
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
        return _passthrough_ropes[-1]


def forget_recorded_ropes() -> None:
    """Called before an engine is configured so a second engine in one process starts clean."""
    with _lock:
        _passthrough_ropes.clear()


def register_rope_override() -> None:
    """Register the override once per process (vLLM asserts on duplicate OOT names)."""
    custom_op = probe("vllm.model_executor.custom_op")
    rotary_cls = probe("vllm.model_executor.layers.rotary_embedding.base:RotaryEmbedding")
    if custom_op.op_registry_oot.get("RotaryEmbedding") is not None:
        return

    from vllm_kvstream.adapter.state import active_policy

    class KVStreamRotaryEmbedding(rotary_cls):  # type: ignore[misc, valid-type]
        """vLLM's RotaryEmbedding; a pass-through when built under a KV policy."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.kvstream_passthrough = active_policy() is not None
            if self.kvstream_passthrough:
                self._forward_method = self._kvstream_passthrough
                with _lock:
                    _passthrough_ropes.append(
                        Rope(
                            rotary_dim=self.rotary_dim,
                            is_neox_style=self.is_neox_style,
                            cos_sin_cache=self.cos_sin_cache,
                            inv_freq=self._compute_inv_freq(self.base).double(),
                        )
                    )

        def forward_native(self, positions, query, key=None):
            if self.kvstream_passthrough:
                return query, key
            return super().forward_native(positions, query, key)

        @staticmethod
        def _kvstream_passthrough(positions: torch.Tensor, query: torch.Tensor, key=None, *args, **kwargs):
            return query, key

    KVStreamRotaryEmbedding.__qualname__ = "KVStreamRotaryEmbedding"
    custom_op.CustomOp.register_oot(KVStreamRotaryEmbedding, name="RotaryEmbedding")
