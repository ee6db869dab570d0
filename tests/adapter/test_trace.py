"""The opt-in decision trace (``VLLM_KVSTREAM_TRACE_DIR``, ``adapter/trace.py``): off unless
the variable is set; when written, one line per step with the blocks each request reads."""

import json
import os

import torch

from vllm_kvstream.adapter import trace
from vllm_kvstream.adapter.selection import SelectionStore, SelectRequest
from vllm_kvstream.policies import AttentionPattern, build_policy


def test_off_unless_the_variable_is_set():
    assert trace.ENABLED is bool(os.environ.get(trace.TRACE_ENV))  # read once, at import


def test_lines_per_step(tmp_path, monkeypatch):
    monkeypatch.setenv(trace.TRACE_ENV, str(tmp_path))
    monkeypatch.setattr(trace, "_file", None)
    monkeypatch.setattr(trace, "_steps", {})
    try:
        # A 64-token prefill chunk and a decode at position 199 of a 4 + 60 pattern (blocks of 16).
        trace.position_step(AttentionPattern(sink_tokens=4, window_tokens=60), 16,
                            torch.tensor([0, 64, 65]), torch.tensor([64, 200]))
        store = SelectionStore(build_policy("topk-importance", {"budget_tokens": 48, "sink_tokens": 3,
                                                                "recent_tokens": 12}), 8)
        trace.selection_step("topk-importance", store.begin_step([SelectRequest(0, 5, 5, (7,))]))
    finally:
        if trace._file is not None:
            trace._file.close()
    position, selection = (json.loads(line) for line in (tmp_path / "rank0.jsonl").read_text().splitlines())
    assert position == {"kind": "position", "step": 0, "policy": "4+60", "requests": [
        {"seq_len": 64, "q": 64, "pattern": "4+60", "blocks": [0, 1, 2, 3]},
        {"seq_len": 200, "q": 1, "pattern": "4+60", "blocks": [0, 8, 9, 10, 11, 12]},  # sink block, then 140..199
    ]}
    assert selection == {"kind": "selection", "step": 0, "policy": "topk-importance", "requests": [
        {"first_block": 7, "seq_len": 5, "q": 5, "kept": {}},  # no layer has run yet
    ]}
