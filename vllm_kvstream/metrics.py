"""The plugin's own metrics, shared across vLLM's processes (no vLLM import).

What the policies do happens in the engine core (the scheduler frees blocks) and in the
workers (quantized writes); ``/metrics`` is served by the API server. vLLM's own metrics
cross that gap inside ``SchedulerStats``, which has no field for a plugin. So each process
keeps its figures in a small memory-mapped file of float64 slots, ``DIR/<pid>.slots``, and
the API server sums the files when Prometheus scrapes (the scheme of prometheus_client's
multiprocess mode, without its requirement that the variable be set before import):

    engine core ─┐  inc/observe: a store into its own mmap (no syscall, no lock)
    worker(s)  ──┼─> DIR/<pid>.slots ──> API server: read + sum on scrape ──> /metrics
    (frontend) ──┘   DIR/engine.json: labels and the model's trained context

``DIR`` comes from the environment variable :data:`METRICS_DIR_ENV`, which the process that
builds the engine config sets (fresh per engine) before vLLM spawns the others. Without it
recording is a no-op.
"""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METRICS_DIR_ENV = "VLLM_KVSTREAM_METRICS_DIR"
ENGINE_FILE = "engine.json"
_SUFFIX = ".slots"

_BLOCK_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)
_TOKEN_BUCKETS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288, 1048576, 4194304)


@dataclass(frozen=True)
class MetricDef:
    name: str
    kind: str  # "counter" | "gauge" | "mean" (averaged over the processes that set it) | "histogram"
    help: str
    buckets: tuple[float, ...] = ()

    @property
    def width(self) -> int:
        """float64 slots: counter/gauge 1, mean 2 (sum, n), histogram buckets + overflow + sum."""
        return {"counter": 1, "gauge": 1, "mean": 2}.get(self.kind, len(self.buckets) + 2)


SCHEMA: tuple[MetricDef, ...] = (
    MetricDef("kvstream_blocks_evicted", "counter", "KV blocks the policy freed back to vLLM's pool while their stream ran."),
    MetricDef("kvstream_blocks_held", "gauge", "KV blocks held now by the requests the scheduler tracks."),
    MetricDef("kvstream_requests_tracked", "gauge",
              "Requests the plugin keeps scheduler-side state for (back to 0 when the server is idle)."),
    MetricDef("kvstream_request_policies", "counter",
              "Requests that asked for a policy of their own (kv_policy / kv_policy_config in vllm_xargs)."),
    MetricDef(
        "kvstream_request_blocks_kept", "histogram",
        "Most KV blocks one request held at once (observed when the request's blocks are freed).", _BLOCK_BUCKETS,
    ),
    MetricDef(
        "kvstream_stream_tokens", "histogram",
        "Tokens in a request's KV stream, prompt and output (observed when its blocks are freed).", _TOKEN_BUCKETS,
    ),
    MetricDef(
        "kvstream_streams_beyond_trained_context", "counter",
        "Requests whose stream ran past the model's trained context (max_position_embeddings).",
    ),
    MetricDef(
        "kvstream_tokens_beyond_trained_context", "counter",
        "Tokens streamed past the model's trained context, summed over requests.",
    ),
    MetricDef(
        "kvstream_kv_quant_outlier_channel_ratio", "mean",
        "Quantized KV: fraction of (layer, kv head, channel) key channels whose running absmax "
        "exceeds 6x their head's median (the outlier channels KVQuant keeps at higher precision).",
    ),
    MetricDef("kvstream_kv_quant_tokens_written", "counter", "Quantized KV: tokens quantized and stored, summed over layers."),
)
_BY_NAME = {d.name: d for d in SCHEMA}


def _offsets() -> dict[str, int]:
    out, at = {}, 0
    for d in SCHEMA:
        out[d.name] = at
        at += d.width
    return out


_OFFSETS = _offsets()
_SLOTS = sum(d.width for d in SCHEMA)
_BYTES = 8 * _SLOTS


class ProcessMetrics:
    """This process's slots (``DIR/<pid>.slots``). Single writer; writes are aligned 8-byte
    stores, which a concurrent reader sees whole."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        path = self.directory / f"{os.getpid()}{_SUFFIX}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size != _BYTES:
                os.ftruncate(fd, _BYTES)
            self._map = mmap.mmap(fd, _BYTES)
        finally:
            os.close(fd)
        self._view = memoryview(self._map).cast("d")

    def _at(self, name: str, kind: str) -> int:
        d = _BY_NAME.get(name)
        if d is None or d.kind != kind:
            raise KeyError(f"no {kind} metric {name!r}; defined: {', '.join(sorted(_BY_NAME))}")
        return _OFFSETS[name]

    def inc(self, name: str, amount: float = 1.0) -> None:
        i = self._at(name, "counter")
        self._view[i] += amount

    def set(self, name: str, value: float) -> None:
        self._view[self._at(name, "gauge")] = value

    def set_mean(self, name: str, total: float, n: float) -> None:
        i = self._at(name, "mean")
        self._view[i], self._view[i + 1] = total, n

    def observe(self, name: str, value: float) -> None:
        i = self._at(name, "histogram")
        buckets = _BY_NAME[name].buckets
        k = next((j for j, le in enumerate(buckets) if value <= le), len(buckets))
        self._view[i + k] += 1
        self._view[i + len(buckets) + 1] += value


_process: dict[str, Any] = {"dir": None, "metrics": None}


def process_metrics() -> ProcessMetrics | None:
    """This process's metrics for the engine it serves, or ``None`` (recording off: the
    variable is unset or its directory is gone)."""
    directory = os.environ.get(METRICS_DIR_ENV)
    if not directory:
        return None
    if _process["dir"] != directory:
        try:
            _process["metrics"] = ProcessMetrics(Path(directory))
        except OSError:
            _process["metrics"] = None
        _process["dir"] = directory
    return _process["metrics"]


def engine_info() -> dict[str, Any]:
    """What the engine-config process wrote about the engine (``{}`` when unknown)."""
    directory = os.environ.get(METRICS_DIR_ENV)
    if not directory:
        return {}
    try:
        return json.loads((Path(directory) / ENGINE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def write_engine_info(directory: Path, info: dict[str, Any]) -> None:
    tmp = Path(directory) / (ENGINE_FILE + ".tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(Path(directory) / ENGINE_FILE)


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[float]  # per bucket, then the overflow (> last bound)
    sum: float = 0.0

    @property
    def count(self) -> float:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, float]]:
        """``(upper bound, cumulative count)`` pairs, ending with ``(inf, count)``."""
        out, acc = [], 0.0
        for le, c in zip((*self.buckets, float("inf")), self.counts):
            acc += c
            out.append((le, acc))
        return out


@dataclass
class Snapshot:
    values: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, Histogram] = field(default_factory=dict)


def read_metrics(directory: Path) -> Snapshot:
    """The sum over every process's slots in ``directory`` (means: averaged over the
    processes that set them)."""
    totals = [0.0] * _SLOTS
    for path in Path(directory).glob(f"*{_SUFFIX}"):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if len(data) != _BYTES:
            continue
        for i, v in enumerate(memoryview(data).cast("d")):
            totals[i] += v
    snap = Snapshot()
    for d in SCHEMA:
        i = _OFFSETS[d.name]
        if d.kind == "histogram":
            n = len(d.buckets)
            snap.histograms[d.name] = Histogram(d.buckets, totals[i : i + n + 1], totals[i + n + 1])
        elif d.kind == "mean":
            snap.values[d.name] = totals[i] / totals[i + 1] if totals[i + 1] else 0.0
        else:
            snap.values[d.name] = totals[i]
    return snap
