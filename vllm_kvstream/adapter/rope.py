"""RoPE under a policy: every fixed-rotation variant vLLM builds, exact past the model's table.

Why: a stream runs far past the trained context, and vLLM's rotary ops index the model's
cos/sin table (``max_position_embeddings`` rows, times the scaling factor for some variants;
vLLM does not grow it) with the position: IndexError natively, garbage in the CPU C++ op.
StreamingLLM counts positions inside the cache, which only ever needs *distances*: a window
key keeps its true distance ``p - j`` to the query, and the attention backend rotates the
query back by the number of evicted tokens to meet the sinks (``kernels/sink_attention.py``).
So keys are cached rotated at their absolute positions, exactly like stock vLLM, and never
re-rotated. Positions in the table use the stock op unchanged; only positions past it are
computed here, in float64 reduced mod 2*pi, so a position of 10^6 keeps full precision.

Which RoPE: "rotate by a distance d" holds for every variant that is a fixed rotation --
``default``, ``linear``, ``dynamic`` (NTK as vLLM builds it: one fixed table), ``ntk``,
``llama3``, ``yarn``, ``deepseek_yarn`` -- with the variant's own (scaled) frequencies and, for
the YaRN family, a constant magnitude ``mscale`` on cos and sin. The frequencies and
``mscale`` are read off the table the op itself computed (``kernels.Rope.from_table``), not
re-derived per variant, so a variant vLLM adds later works if it is a fixed rotation, and one
that is not is refused when the model is built (before any weight loads). ``mscale`` is applied
once, by the model's op (or :meth:`_kvstream_far` standing in for it past the table); every
rotation the plugin applies afterwards is a pure rotation, which keeps it (argued in
``kernels/rope.py``). Variants known not to be fixed rotations (``longrope``/``su`` switch
factors by length, M-RoPE's 3-D sections, dual-chunk attention, ...) are refused earlier, from
the model's config, by :func:`check_rope_config` (called while the engine config is built).

Per layer: a model may build several rotary ops (Gemma-3: theta 1e6 for global layers, 1e4 for
sliding ones). Each attention implementation takes the op of its own layer:
:func:`rope_of_building_layer` finds, while vLLM builds the ``Attention`` layer, the rotary op
its parent module built just before (every vLLM model builds ``rotary_emb`` before ``attn``).

How (monkeypatch, written down): ``CustomOp.register_oot`` replaces, by class name, vLLM's
``RotaryEmbedding`` and each of its fixed-rotation relatives (``Llama3RotaryEmbedding``,
``YaRNScalingRotaryEmbedding``, ``DeepseekScalingRotaryEmbedding``, ... and any subclass vLLM
adds later, found at registration) by a subclass of the same class that adds the policy
behaviour. An instance built while no policy is configured is
the stock op in every respect (same methods, same dispatch). An instance built under a policy
keeps the stock dispatch for positions in the table and takes over past it.

Upstream change that would remove it: rotary ops that compute positions past their table (or
grow it), and an attention-backend hook to rotate the query per key range.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
from typing import Any

import torch

from vllm_kvstream.adapter.compat import probe
from vllm_kvstream.errors import KVStreamConfigError
from vllm_kvstream.kernels import Rope

_lock = threading.Lock()
_recorded_ropes: list[Rope] = []

#: rope types (``rope_parameters["rope_type"]``) whose rotation is fixed per position; tested.
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "ntk", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling")
#: rope types that are not one fixed rotation per position, and why.
UNSUPPORTED_ROPE_TYPES = {
    "longrope": "switches between short and long factors by sequence length",
    "su": "switches between short and long factors by sequence length (longrope's old name)",
    "mrope": "rotates by 3-D (time, height, width) positions",
    "bailing_mrope": "rotates by 3-D positions",
    "openpangu": "rotates by 3-D positions",
    "mllama4": "is a vision RoPE over 2-D patch positions",
    "proportional": "mixes the two halves of each head (Gemma-4 global layers)",
}
#: vLLM rotary classes that are not a fixed rotation (refused if built under a policy).
_UNFIXED_CLASSES = {
    "MRotaryEmbedding": "mrope", "MRotaryEmbeddingInterleaved": "mrope", "BailingMRotaryEmbedding": "bailing_mrope",
    "Ernie4_5_VLRotaryEmbedding": "mrope", "Llama4VisionRotaryEmbedding": "mllama4",
    "Gemma4RotaryEmbedding": "proportional", "FourierRotaryEmbedding": "fope",
    "DeepseekV4ScalingRotaryEmbedding": "deepseek_yarn (DeepSeek-V4)",
}


def _rope_parameter_sets(hf_config: Any) -> list[dict]:
    """The rope parameter dicts of a (text) config: one, or one per layer type (Gemma-3)."""
    params = getattr(hf_config, "rope_parameters", None)
    if params is None:
        params = getattr(hf_config, "rope_scaling", None)
    if not isinstance(params, dict):
        return []
    if all(isinstance(v, dict) for v in params.values()) and params:
        return list(params.values())
    return [params]


def check_rope_config(hf_config: Any) -> None:
    """Refuse, from the model's config (before it is built), a RoPE a policy cannot serve."""
    if getattr(hf_config, "dual_chunk_attention_config", None) is not None:
        raise KVStreamConfigError(
            "--kv-policy does not support dual-chunk attention (dual_chunk_attention_config): its RoPE "
            f"is not one fixed rotation per position; supported rope types: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    for params in _rope_parameter_sets(hf_config):
        rope_type = params.get("rope_type", params.get("type", "default"))
        why = UNSUPPORTED_ROPE_TYPES.get(rope_type)
        if why is None and "mrope_section" in params:
            rope_type, why = f"{rope_type} with mrope_section", UNSUPPORTED_ROPE_TYPES["mrope"]
        if why is None and params.get("use_fope"):
            rope_type, why = "default with use_fope", "learns Fourier position features, not a fixed rotation"
        if why is not None:
            raise KVStreamConfigError(
                f"--kv-policy does not support rope_type {rope_type!r}: it {why}, so cache-relative positions "
                f"cannot serve it; supported rope types: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )


def rope_from_op(op: Any) -> Rope:
    """The fixed rotation a vLLM rotary op applies (frequencies and mscale from its own table).
    Raises :class:`KVStreamConfigError` for an op that is not one."""
    name = next(c.__name__ for c in type(op).__mro__ if not issubclass(_KVStreamRotary, c) and not issubclass(c, _KVStreamRotary))
    supported = ", ".join(SUPPORTED_ROPE_TYPES)
    if name in _UNFIXED_CLASSES:
        raise KVStreamConfigError(
            f"--kv-policy does not support vLLM's {name} (rope_type {_UNFIXED_CLASSES[name]!r}): not one fixed "
            f"rotation per position; supported rope types: {supported}"
        )
    with torch.device("cpu"):
        table = op._compute_cos_sin_cache().float()  # float32, as the op computed it
    try:
        rope = Rope.from_table(table, op.rotary_dim, op.is_neox_style)
    except ValueError as exc:
        raise KVStreamConfigError(
            f"--kv-policy does not support vLLM's {name}: {exc}; supported rope types: {supported}"
        ) from None
    device = getattr(op, "cos_sin_cache", table).device  # where the model's own table lives
    return dataclasses.replace(rope, cos_sin_cache=rope.cos_sin_cache.to(device))


def recorded_rope() -> Rope:
    """The one RoPE of the model being served (for code that has no layer at hand)."""
    with _lock:
        distinct = {(r.rotary_dim, r.is_neox_style, r.cos_sin_cache.shape, r.mscale, tuple(r.inv_freq.tolist())) for r in _recorded_ropes}
        if not _recorded_ropes:
            raise RuntimeError(
                "vllm-kvstream: the model built no rotary embedding under the policy, so it cannot apply "
                "RoPE with cache-relative positions. Supported: decoder models with RoPE of rope type "
                f"{', '.join(SUPPORTED_ROPE_TYPES)}."
            )
        if len(distinct) > 1:
            raise RuntimeError(
                "vllm-kvstream: the model uses several different rotary embeddings and this caller has no "
                "layer to tell them apart"
            )
        return _recorded_ropes[-1]


def rope_of_building_layer(max_depth: int = 24) -> Rope:
    """The rotary op of the attention layer vLLM is building now: the caller runs inside
    ``Attention.__init__``, whose parent module (``LlamaAttention``, ``Gemma3Attention``, ...)
    assigned its ``rotary_emb`` just before. Found by walking the constructing frames up to the
    first module with a rotary child built under the policy; with none found (a model that
    builds ``attn`` first), the model's one recorded RoPE."""
    frame = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            break
        owner = frame.f_locals.get("self")
        if isinstance(owner, torch.nn.Module):
            for child in owner._modules.values():
                rope = getattr(child, "kvstream_rope", None)
                if isinstance(rope, Rope):
                    return rope
        frame = frame.f_back
    return recorded_rope()


def forget_recorded_ropes() -> None:
    """Called before an engine is configured so a second engine in one process starts clean."""
    with _lock:
        _recorded_ropes.clear()


def _forward_context():
    """vLLM's per-forward-pass context object (a new one every step), or None outside one."""
    fc = probe("vllm.forward_context")
    return fc.get_forward_context() if fc.is_forward_context_available() else None


class _KVStreamRotary:
    """What the plugin adds to a vLLM rotary class (mixed in before it by :func:`_overriding`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kvstream_rope: Rope | None = None
        from vllm_kvstream.adapter.state import active_policy

        if active_policy() is not None:
            self.kvstream_rope = rope_from_op(self)
            self._kvstream_stock_forward = self._forward_method
            self._forward_method = self._kvstream_forward
            self._kvstream_step: tuple | None = None
            self._kvstream_check: tuple | None = None
            with _lock:
                _recorded_ropes.append(self.kvstream_rope)

    def forward_native(self, positions, query, key=None, *args, **kwargs):
        if self.kvstream_rope is not None and self._kvstream_past_table(positions):
            return self._kvstream_far(positions, query, key)
        return super().forward_native(positions, query, key, *args, **kwargs)

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
        angles, times the op's ``mscale``: this stands in for the op), shared by every layer of
        the step, through the stock torch op."""
        pos = positions.flatten()
        ctx = _forward_context()
        cached = self._kvstream_step
        if ctx is not None and cached is not None and cached[0] is ctx and cached[1] == (pos.numel(), query.dtype):
            local, table = cached[2], cached[3]
        else:
            rope = self.kvstream_rope
            cos, sin = rope.cos_sin(pos)
            table = torch.cat((cos, sin), dim=-1)
            if rope.mscale != 1.0:
                table = table * rope.mscale
            table = table.to(device=query.device, dtype=query.dtype)
            local = torch.arange(pos.numel(), device=pos.device)
            self._kvstream_step = (ctx, (pos.numel(), query.dtype), local, table)
        return self.forward_static(local, query, key, self.head_size, self.rotary_dim, table, self.is_neox_style)


def _rotary_classes() -> list[type]:
    """vLLM's rotary op classes the plugin overrides: every subclass of ``RotaryEmbeddingBase``
    except those known not to be fixed rotations (M-RoPE, vision RoPE, ...: their config is
    refused under a policy, and without one they must stay exactly vLLM's classes, whose
    ``forward_native`` signatures differ)."""
    probe("vllm.model_executor.layers.rotary_embedding")  # imports every variant's module
    base = probe("vllm.model_executor.layers.rotary_embedding.base:RotaryEmbeddingBase")
    found, todo = [], [base]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            if sub not in found and not issubclass(sub, _KVStreamRotary):
                found.append(sub)
                todo.append(sub)
    return [cls for cls in found if cls.__name__ not in _UNFIXED_CLASSES]


def register_rope_override() -> None:
    """Register the override for every rotary class once per process (vLLM asserts on
    duplicate OOT names)."""
    custom_op = probe("vllm.model_executor.custom_op")
    for cls in _rotary_classes():
        name = cls.__name__
        if custom_op.op_registry_oot.get(name) is not None:
            continue
        override = type(f"KVStream{name}", (_KVStreamRotary, cls), {"__module__": __name__})
        custom_op.CustomOp.register_oot(override, name=name)


__all__ = [
    "SUPPORTED_ROPE_TYPES",
    "UNSUPPORTED_ROPE_TYPES",
    "check_rope_config",
    "forget_recorded_ropes",
    "recorded_rope",
    "register_rope_override",
    "rope_from_op",
    "rope_of_building_layer",
]
