"""The plugin's cross-process metric slots (vllm_kvstream/metrics.py)."""

import multiprocessing as mp
import os

import pytest

from vllm_kvstream.metrics import METRICS_DIR_ENV, SCHEMA, ProcessMetrics, process_metrics, read_metrics


def _child(directory: str) -> None:
    m = ProcessMetrics(directory)
    m.inc("kvstream_blocks_evicted", 5)
    m.observe("kvstream_request_blocks_kept", 3)
    m.set_mean("kvstream_kv_quant_outlier_channel_ratio", 0.5, 2)


def test_slots_sum_over_processes(tmp_path):
    m = ProcessMetrics(tmp_path)
    m.inc("kvstream_blocks_evicted", 2)
    m.observe("kvstream_request_blocks_kept", 3)
    m.observe("kvstream_request_blocks_kept", 100)
    m.observe("kvstream_stream_tokens", 10**9)  # past the last bucket
    m.set("kvstream_blocks_held", 7)
    m.set_mean("kvstream_kv_quant_outlier_channel_ratio", 0.1, 2)
    p = mp.get_context("spawn").Process(target=_child, args=(str(tmp_path),))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    snap = read_metrics(tmp_path)
    assert snap.values["kvstream_blocks_evicted"] == 7
    assert snap.values["kvstream_blocks_held"] == 7
    # weighted mean over the processes that set it: (0.1 + 0.5) / (2 + 2)
    assert snap.values["kvstream_kv_quant_outlier_channel_ratio"] == pytest.approx(0.15)
    kept = snap.histograms["kvstream_request_blocks_kept"]
    assert kept.count == 3 and kept.sum == 106
    cum = dict(kept.cumulative())
    assert cum[2] == 0 and cum[4] == 2 and cum[128] == 3 and cum[float("inf")] == 3
    tokens = snap.histograms["kvstream_stream_tokens"]
    assert tokens.counts[-1] == 1 and dict(tokens.cumulative())[float("inf")] == 1


def test_wrong_kind_or_name_is_named(tmp_path):
    m = ProcessMetrics(tmp_path)
    with pytest.raises(KeyError, match="no counter metric 'kvstream_blocks_held'"):
        m.inc("kvstream_blocks_held")
    with pytest.raises(KeyError, match="no histogram metric 'nope'"):
        m.observe("nope", 1)


def test_recording_is_off_without_the_directory(monkeypatch, tmp_path):
    monkeypatch.delenv(METRICS_DIR_ENV, raising=False)
    assert process_metrics() is None
    monkeypatch.setenv(METRICS_DIR_ENV, str(tmp_path))
    m = process_metrics()
    assert m is not None and (tmp_path / f"{os.getpid()}.slots").exists()
    assert process_metrics() is m
    monkeypatch.setenv(METRICS_DIR_ENV, str(tmp_path / "gone"))
    assert process_metrics() is None


def test_files_of_another_size_are_ignored(tmp_path):
    (tmp_path / "1.slots").write_bytes(b"\0" * 8)
    snap = read_metrics(tmp_path)
    assert set(snap.values) | set(snap.histograms) == {d.name for d in SCHEMA}
    assert snap.values["kvstream_blocks_evicted"] == 0
