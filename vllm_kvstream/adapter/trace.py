"""Opt-in trace of the worker's per-step KV decisions, one JSON line per step and process.

Set ``VLLM_KVSTREAM_TRACE_DIR=/some/dir`` in the environment of the engine (the worker
processes inherit it) and every worker process appends to ``<dir>/rank<R>.jsonl``, ``R`` its
rank in vLLM's world group (``torch.distributed``; 0 in an engine without one). It exists
to check that every tensor-parallel rank takes the same decisions (``tests/e2e/
test_tensor_parallel.py``), and to debug a policy on a live engine. Unset, nothing is
opened or written, and each call site costs one attribute test (:data:`ENABLED`, read once
at import).

Lines, in the order a process builds its steps (so rank files compare line by line):

* ``{"kind": "selection", "step": i, "policy": ..., "requests": [...]}`` — block-selecting
  policies (``topk-importance``), written by ``SelectionStore.begin_step``: per request of the
  step its first physical block (the store's key), ``seq_len``, query count ``q``, and per
  layer the logical blocks whose content the selection keeps *at the start of the step*
  (so the decisions every earlier step made).
* ``{"kind": "position", "step": i, "policy": "S+W", "requests": [...]}`` — position policies
  (``full``, ``sliding-window``, ``streaming-sink``; ``S+W`` their sink and window tokens,
  ``None`` for every token; the server's), written by the metadata builders: per request
  ``seq_len``, ``q``, its ``pattern`` (the server's, or the request's own: ``adapter/
  request_policy.py``), and the logical blocks its queries read (sink blocks, then the
  blocks from the first query's window on). It is derived from the same inputs the builder
  plans from (sequence lengths and the pattern), which is the point: those inputs, and so
  the plan, must agree on every rank.

* ``{"kind": "decode", "step": i, "policy": "S+W", "requests": [...]}`` — position policies,
  steps with a request past eviction: per one-token request its ``seq_len`` and ``path``,
  ``"in_place"`` (the stock kernel reading the window where it lies, ``kernels/
  sink_in_place.py``) or ``"gathered"`` (``kernels/sink_decode.py``).

Physical block ids come from the single scheduler, so they agree between ranks too.
"""

from __future__ import annotations

import json
import os
from typing import TextIO

TRACE_ENV = "VLLM_KVSTREAM_TRACE_DIR"
#: Whether tracing is on in this process (the environment at import).
ENABLED: bool = bool(os.environ.get(TRACE_ENV))

_file: TextIO | None = None
_steps: dict[str, int] = {}


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _write(kind: str, policy: str, requests: list[dict]) -> None:
    global _file
    if _file is None:
        directory = os.environ[TRACE_ENV]
        os.makedirs(directory, exist_ok=True)
        _file = open(os.path.join(directory, f"rank{_rank()}.jsonl"), "a", encoding="utf-8")  # noqa: SIM115
    step = _steps.get(kind, 0)
    _steps[kind] = step + 1
    _file.write(json.dumps({"kind": kind, "step": step, "policy": policy, "requests": requests}) + "\n")
    _file.flush()


def selection_step(policy_name: str, bound) -> None:
    """A block-selecting policy's step: ``bound`` is ``SelectionStore.begin_step``'s answer,
    ``[(SelectRequest, RequestSelection), ...]``."""
    _write("selection", policy_name, [
        {
            "first_block": req.row[0],
            "seq_len": req.seq_len,
            "q": req.q_end - req.q_start,
            "kept": {name: list(layer.selection.kept) for name, layer in state.layers.items()},
        }
        for req, state in bound
    ])


def position_step(pattern, block_size: int, query_start_loc, seq_lens) -> None:
    """A position policy's step: ``pattern`` its ``AttentionPattern`` (``window_tokens`` None:
    every token), ``query_start_loc`` ``[R + 1]`` and ``seq_lens`` ``[R]`` (CPU tensors)."""
    from vllm_kvstream.adapter.request_policy import row_patterns

    qsl, lens = query_start_loc.tolist(), seq_lens.tolist()
    own = row_patterns() or []  # the step's rows that asked for a policy of their own
    requests = []
    for i, L in enumerate(lens):
        pat = (own[i] if i < len(own) else None) or pattern
        S, W = pat.sink_tokens, pat.window_tokens
        q = qsl[i + 1] - qsl[i]
        first = L - q
        n_sink = min(S, L)
        lo = 0 if W is None else max(n_sink, first - W + 1, 0)
        blocks = sorted({*range(-(-n_sink // block_size)), *range(lo // block_size, -(-L // block_size))})
        requests.append({"seq_len": L, "q": q, "pattern": f"{S}+{W}", "blocks": blocks})
    _write("position", f"{pattern.sink_tokens}+{pattern.window_tokens}", requests)


def decode_step(pattern, in_place_lens: list[int], gathered_lens: list[int], direct_lens: list[int] = ()) -> None:
    """Which decode path each one-token request of an evicting step took (by ``seq_len``):
    ``direct`` (the compiled read, ``kernels/sink_direct.py``), ``in_place`` (the stock kernel
    over staged sinks) or ``gathered``."""
    _write("decode", f"{pattern.sink_tokens}+{pattern.window_tokens}",
           [{"seq_len": n, "path": "direct"} for n in direct_lens]
           + [{"seq_len": n, "path": "in_place"} for n in in_place_lens]
           + [{"seq_len": n, "path": "gathered"} for n in gathered_lens])
