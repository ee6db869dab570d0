"""The KV manager's block accounting across the vLLM versions it supports."""

from types import SimpleNamespace

import pytest

from vllm_kvstream.adapter import kv_manager


class _Tracker:
    on = True

    def __init__(self):
        self.calls = []

    def freed(self, request_id, row_len):
        self.calls.append((request_id, row_len))


@pytest.mark.parametrize("trims_leading_nulls", [False, True])  # vLLM 0.32 returns the row, 0.33 trims it
def test_freed_request_counts_its_whole_row_whatever_vllm_returns(monkeypatch, trims_leading_nulls):
    null, live = SimpleNamespace(is_null=True), SimpleNamespace(is_null=False)
    row = [null, null, null, live, live]  # a sliding window's evicted prefix, then its window

    def pop(self, request_id):
        blocks = self.req_to_blocks.pop(request_id, [])
        while trims_leading_nulls and blocks and blocks[0].is_null:
            blocks = blocks[1:]
        return blocks

    monkeypatch.setattr(kv_manager.FullAttentionManager, "pop_blocks_for_free", pop)
    manager = object.__new__(kv_manager.KVStreamManager)
    manager.req_to_blocks = {"r": list(row)}
    manager.tracker = _Tracker()
    manager.request_policies = {"r": object()}  # a policy of its own: dropped with the blocks
    returned = manager.pop_blocks_for_free("r")
    assert len(returned) == (2 if trims_leading_nulls else 5)
    # The tracker subtracts the 3 evicted blocks it counted from the row: 2 held, either way.
    assert manager.tracker.calls == [("r", 5)] and manager.request_policies == {}
    assert manager.pop_blocks_for_free("unknown") == [] and manager.tracker.calls[-1] == ("unknown", 0)
