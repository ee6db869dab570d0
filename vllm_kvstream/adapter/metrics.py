"""The plugin's metrics on vLLM's ``/metrics`` (Prometheus), and the hooks that record them.

Route (no monkeypatch): the engine-config process (the API server under ``vllm serve``)
makes a fresh directory per engine, names it in :data:`~vllm_kvstream.metrics.METRICS_DIR_ENV`
(inherited by the engine core and workers vLLM spawns next) and registers one collector in
prometheus_client's default ``REGISTRY``, the registry vLLM's ``/metrics`` route serves with a
single API server. The scheduler (:class:`~vllm_kvstream.adapter.kv_manager.KVStreamManager`)
and the quantized attention backend record into their process's slots
(``vllm_kvstream/metrics.py``); the collector sums them on each scrape.

Limit: with ``--api-server-count`` > 1 vLLM serves ``/metrics`` from a multiprocess registry
that holds no custom collector, so these series are absent there. Removable when vLLM's
``SchedulerStats`` carries plugin stats to the stat loggers.

Series (labels ``policy``, ``kv_quant``; counters carry the ``_total`` suffix):

=============================================  =========  ==========================================
``kvstream_blocks_evicted_total``              counter    blocks freed back to the pool mid-stream
``kvstream_blocks_held``                       gauge      blocks held now by tracked requests
``kvstream_requests_tracked``                  gauge      requests the scheduler side keeps state for
``kvstream_request_policies_total``            counter    requests that asked for a policy of their own
``kvstream_request_blocks_kept``               histogram  most blocks one request held at once
``kvstream_stream_tokens``                     histogram  tokens per request stream
``kvstream_streams_beyond_trained_context``    counter    streams longer than the trained context
``kvstream_tokens_beyond_trained_context``     counter    tokens past the trained context
``kvstream_trained_context_tokens``            gauge      the model's ``max_position_embeddings``
``kvstream_kv_quant_outlier_channel_ratio``    gauge      quantized KV: outlier key channel share
``kvstream_kv_quant_tokens_written_total``     counter    quantized KV: tokens stored (x layers)
=============================================  =========  ==========================================
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from vllm_kvstream.metrics import (
    METRICS_DIR_ENV,
    SCHEMA,
    engine_info,
    process_metrics,
    read_metrics,
    write_engine_info,
)

logger = logging.getLogger(__name__)
_lock = threading.Lock()
_collector: dict[str, Any] = {"registered": None, "dirs": []}


# --- the engine-config process --------------------------------------------------------------


def start_engine_metrics(vllm_config, policy, quant) -> None:
    """Called where the engine config is built: a fresh directory for this engine's metrics
    (``policy is None``: recording off for the engine about to start), and the collector."""
    if policy is None:
        os.environ.pop(METRICS_DIR_ENV, None)
        return
    directory = tempfile.mkdtemp(prefix="vllm-kvstream-metrics-")
    hf = vllm_config.model_config.hf_text_config
    write_engine_info(Path(directory), {
        "policy": policy.name,
        "kv_quant": quant.method if quant is not None else "none",
        "trained_context": getattr(hf, "max_position_embeddings", None),
        "block_size": vllm_config.cache_config.block_size,
    })
    os.environ[METRICS_DIR_ENV] = directory
    with _lock:
        _collector["dirs"].append(directory)
        if _collector["registered"] is None:
            _collector["registered"] = _register_collector()
            atexit.register(_remove_dirs)


def _remove_dirs() -> None:
    for d in _collector["dirs"]:
        shutil.rmtree(d, ignore_errors=True)


def _register_collector():
    try:
        from prometheus_client import REGISTRY
    except ImportError:  # vLLM depends on it; without it there is no /metrics either
        return False
    collector = KVStreamCollector()
    REGISTRY.register(collector)
    return collector


class KVStreamCollector:
    """prometheus_client collector: this engine's slots, summed over its processes."""

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
        from prometheus_client.utils import floatToGoString

        directory = os.environ.get(METRICS_DIR_ENV)
        if not directory or not Path(directory).is_dir():
            return
        info = engine_info()
        names, values = ["policy", "kv_quant"], [str(info.get("policy", "")), str(info.get("kv_quant", "none"))]
        snap = read_metrics(Path(directory))
        for d in SCHEMA:
            if d.kind == "counter":
                fam = CounterMetricFamily(d.name, d.help, labels=names)
                fam.add_metric(values, snap.values[d.name])
            elif d.kind in ("gauge", "mean"):
                fam = GaugeMetricFamily(d.name, d.help, labels=names)
                fam.add_metric(values, snap.values[d.name])
            else:
                h = snap.histograms[d.name]
                fam = HistogramMetricFamily(d.name, d.help, labels=names)
                fam.add_metric(values, [(floatToGoString(le), c) for le, c in h.cumulative()], h.sum)
            yield fam
        trained = info.get("trained_context")
        if trained:
            fam = GaugeMetricFamily(
                "kvstream_trained_context_tokens", "The model's trained context (max_position_embeddings).", labels=names
            )
            fam.add_metric(values, float(trained))
            yield fam


# --- the scheduler ------------------------------------------------------------------------------


class StreamTracker:
    """Per-request block accounting of one KV manager, recorded into this process's slots.
    ``held`` = blocks in the request's row minus those the policy replaced with the null block."""

    #: Blocks held by every tracker (KV manager) of this process: the gauge is their sum.
    _held_total: int = 0
    #: Requests some tracker of this process keeps state for: the gauge is their count.
    _tracked_total: int = 0

    def __init__(self) -> None:
        self.metrics = process_metrics()
        info = engine_info() if self.metrics is not None else {}
        self.trained = info.get("trained_context") or 0
        self.evicted: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.tokens: dict[str, int] = {}
        self.live: set[str] = set()

    @property
    def on(self) -> bool:
        return self.metrics is not None

    def _track(self, request_id: str) -> None:
        if request_id not in self.live:
            self.live.add(request_id)
            StreamTracker._tracked_total += 1
            self.metrics.set("kvstream_requests_tracked", float(StreamTracker._tracked_total))

    def request_policy(self, request_id: str) -> None:
        """A request asked for a policy of its own (counted once; no per-request label)."""
        self._track(request_id)
        self.metrics.inc("kvstream_request_policies")

    def _set_held(self, delta: int) -> None:
        StreamTracker._held_total += delta
        self.metrics.set("kvstream_blocks_held", float(StreamTracker._held_total))

    def evicted_blocks(self, request_id: str, n: int) -> None:
        if n <= 0:
            return
        self.evicted[request_id] = self.evicted.get(request_id, 0) + n
        self.metrics.inc("kvstream_blocks_evicted", n)
        self._set_held(-n)

    def allocated(self, request_id: str, row_len: int, new_blocks: int, num_tokens: int) -> None:
        self._track(request_id)
        held = row_len - self.evicted.get(request_id, 0)
        if held > self.peak.get(request_id, 0):
            self.peak[request_id] = held
        if num_tokens > self.tokens.get(request_id, 0):
            self.tokens[request_id] = num_tokens
        if new_blocks:
            self._set_held(new_blocks)

    def freed(self, request_id: str, row_len: int) -> None:
        held = row_len - self.evicted.pop(request_id, 0)
        peak = self.peak.pop(request_id, None)
        tokens = self.tokens.pop(request_id, 0)
        if request_id in self.live:
            self.live.discard(request_id)
            StreamTracker._tracked_total -= 1
            self.metrics.set("kvstream_requests_tracked", float(StreamTracker._tracked_total))
        if held:
            self._set_held(-held)
        if peak is None:  # never allocated (aborted before it ran)
            return
        self.metrics.observe("kvstream_request_blocks_kept", peak)
        self.metrics.observe("kvstream_stream_tokens", tokens)
        if self.trained and tokens > self.trained:
            self.metrics.inc("kvstream_streams_beyond_trained_context")
            self.metrics.inc("kvstream_tokens_beyond_trained_context", tokens - self.trained)


# --- the quantized attention backend -----------------------------------------------------------


class QuantWriteMeter:
    """Outlier-channel share of the layers this process stores, refreshed every
    ``every`` writes of a layer (the median over channels is not free)."""

    _rates: dict[str, float] = {}

    def __init__(self, layer_name: str, every: int = 64) -> None:
        self.layer_name = layer_name
        self.every = every
        self.calls = 0

    def record(self, tokens: int, stats) -> None:
        metrics = process_metrics()
        if metrics is None:
            return
        metrics.inc("kvstream_kv_quant_tokens_written", tokens)
        if self.calls % self.every == 0:
            self._rates[self.layer_name] = stats.outlier_rate()
            metrics.set_mean("kvstream_kv_quant_outlier_channel_ratio", sum(self._rates.values()), len(self._rates))
        self.calls += 1
