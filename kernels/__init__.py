"""Attention ops for vllm-kvstream (installed as ``vllm_kvstream.kernels``).

Each op has a naive float32 torch reference (importable; the oracle for tests and the path
the plugin runs on CPU) and a dispatcher. Triton kernels join the references here and the
dispatcher picks them on CUDA; nothing in this package imports vLLM, and Triton is imported
only when a Triton kernel first runs. On CPU three hot ops also have a C form (``csrc/``,
built on first use by ``cpu_ext``, torch where no compiler is found): the in-place decode's
sink staging, and the quantized decode read and store; each is tested against its torch form.
"""

from vllm_kvstream.kernels.kv_quant import (
    QuantLayout,
    QuantStats,
    quant_decode_attention_ref,
    quant_read_cpu,
    quant_read_ref,
    quant_sink_window_decode_cpu,
    quant_write_ref,
)
from vllm_kvstream.kernels.kv_quant_triton import (
    quant_decode_attention,
    quant_prefill_attention,
    quant_sink_window_attention,
    quant_store,
    quant_write,
)
from vllm_kvstream.kernels.rope import Rope
from vllm_kvstream.kernels.sink_decode import DecodePlan, plan_decode, sink_window_decode, split_cpu_kv_cache
from vllm_kvstream.kernels.sink_attention import RequestSlice, sink_window_attention_ref, write_kv_ref
from vllm_kvstream.kernels.topk_attention import (
    block_key_norms,
    selected_attention,
    selected_attention_cpu,
    selected_attention_ref,
    selected_decode_cpu,
    plan_selected_decode,
    SelectedDecodePlan,
)
from vllm_kvstream.kernels.sink_prefill import sink_window_attention, sink_window_attention_tiled

__all__ = [
    "QuantLayout",
    "QuantStats",
    "quant_decode_attention",
    "quant_decode_attention_ref",
    "quant_prefill_attention",
    "quant_sink_window_attention",
    "quant_read_cpu",
    "quant_read_ref",
    "quant_sink_window_decode_cpu",
    "quant_store",
    "quant_write",
    "quant_write_ref",
    "block_key_norms",
    "selected_attention",
    "selected_attention_cpu",
    "selected_attention_ref",
    "selected_decode_cpu",
    "plan_selected_decode",
    "SelectedDecodePlan",
    "DecodePlan",
    "plan_decode",
    "sink_window_decode",
    "split_cpu_kv_cache",
    "RequestSlice",
    "Rope",
    "sink_window_attention",
    "sink_window_attention_ref",
    "sink_window_attention_tiled",
    "write_kv_ref",
]
