"""The locust load test and the plugin's /metrics against a real ``vllm serve`` (tiny model,
streaming-sink with INT8 KV blocks, on 127.0.0.1)."""

import csv
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from vllm_kvstream.compare import free_port, parse_metrics, wait_healthy
from vllm_kvstream.loadgen import read_records

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    env["HF_HUB_OFFLINE"] = "1"
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [str(Path(sys.executable).with_name("vllm")), "serve", tiny_model, "--served-model-name", "tiny",
           "--host", "127.0.0.1", "--port", str(port), "--enforce-eager", "--dtype", "float32", "--block-size", "16",
           "--max-num-batched-tokens", "64", "--kv-cache-memory-bytes", str(64 << 20),
           "--kv-policy", "streaming-sink", "--kv-policy-config", '{"sink_tokens": 4, "window_tokens": 60}',
           "--kv-quant", "int8"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_healthy(proc, url, 300)
        except RuntimeError as exc:
            raise AssertionError(f"{exc}\n{log.read_text()[-5000:]}") from None
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()


def _metrics(url):
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        return parse_metrics(r.read().decode())


def _locust(url, tmp_path, *extra, timeout=240):
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", url,
           "--csv", str(tmp_path / "run"), "--records", str(tmp_path / "run.jsonl"), "--only-summary", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _csv_count(tmp_path, kind: str) -> int:
    """Requests of one entry type in locust's CSV (``--csv``)."""
    rows = csv.DictReader(open(tmp_path / "run_stats.csv"))
    return sum(int(r["Request Count"]) for r in rows if r["Type"] == kind)


def test_locust_headless_records_streaming_latencies(server, tmp_path):
    proc = _locust(server, tmp_path, "-u", "2", "-r", "2", "--scenario", "mixed", "--long-prompt-tokens", "200",
                   "--long-output-tokens", "24", "--chat-turn-tokens", "32", "--chat-output-tokens", "12",
                   "--short-output-tokens", "16", "--max-requests", "10", "--max-seconds", "8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "run_stats.csv")))
    by_type = {}
    for row in rows:
        by_type.setdefault(row["Type"], []).append(row)
    for kind in ("TTFT", "ITL", "TPOT", "E2E"):
        assert kind in by_type, f"no {kind} entries in {sorted(by_type)}; locust said:\n{proc.stderr[-4000:]}"
        for row in by_type[kind]:
            assert int(row["Failure Count"]) == 0
            assert 0 < float(row["Median Response Time"]) < 60_000, row
    # A stream's gaps: many ITL entries, each below the request's whole latency.
    itl = sum(int(r["Request Count"]) for r in by_type["ITL"])
    e2e = sum(int(r["Request Count"]) for r in by_type["E2E"])
    assert itl > e2e
    assert all(int(r["Failure Count"]) == 0 for r in rows)
    records = read_records(tmp_path / "run.jsonl")
    assert records and all(r.ok for r in records)
    assert _csv_count(tmp_path, "E2E") == len(records)
    for r in records:
        assert r.output_tokens == {"short": 16, "long-stream": 24, "chat": 12}[r.kind]  # pinned by ignore_eos/min_tokens
        assert 0 < r.ttft <= r.e2e and len(r.itl) == r.output_chunks - 1
    assert len(records) <= 10


def test_max_seconds_stops_sending_and_drains_the_requests_in_flight(server, tmp_path):
    # Both users send at once; the clock runs out while their streams are in flight: no new
    # request is sent, and the two in flight end and are measured instead of being cut off.
    proc = _locust(server, tmp_path, "-u", "2", "-r", "100", "--scenario", "long-stream", "--long-prompt-tokens", "200",
                   "--long-output-tokens", "48", "--max-requests", "50", "--max-seconds", "0.3", "--drain-seconds", "120")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_records(tmp_path / "run.jsonl")
    assert 1 <= len(records) <= 2, records
    assert all(r.ok and r.output_tokens == 48 for r in records)
    assert "requests in flight" in proc.stderr
    # Locust rewrites its CSV once a second and not at quit: the run waits for a last snapshot,
    # so the streams that ended during the drain are in the CSV too.
    assert _csv_count(tmp_path, "E2E") == len(records), proc.stderr[-3000:]


def test_a_negative_drain_is_refused_naming_the_value(server, tmp_path):
    proc = _locust(server, tmp_path, "-u", "1", "-r", "1", "--max-requests", "1", "--drain-seconds", "-1")
    assert proc.returncode == 2
    assert "--drain-seconds=-1.0" in proc.stderr


def test_fixed_arrival_rate_sends_the_bounded_number_open_loop(server, tmp_path):
    proc = _locust(server, tmp_path, "-u", "1", "-r", "1", "--scenario", "short", "--short-output-tokens", "8",
                   "--arrival-rate", "4", "--max-requests", "6", "--max-seconds", "60")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_records(tmp_path / "run.jsonl")
    assert len(records) == 6 and all(r.ok and r.output_tokens == 8 for r in records)
    starts = sorted(r.start for r in records)
    assert starts[-1] - starts[0] > 0.2  # Poisson arrivals (mean gap 0.25 s), not a burst


def test_plugin_metrics_move_when_a_request_evicts_blocks(server, tmp_path):
    before = _metrics(server)
    for name in ("kvstream_blocks_evicted_total", "kvstream_request_blocks_kept_count", "kvstream_stream_tokens_sum",
                 "kvstream_streams_beyond_trained_context_total", "kvstream_kv_quant_outlier_channel_ratio",
                 "kvstream_kv_quant_tokens_written_total", "kvstream_trained_context_tokens"):
        assert name in before, name
    assert before["kvstream_trained_context_tokens"] == 2048
    # One stream past the window (and past the tiny model's trained 2048 tokens).
    body = json.dumps({"model": "tiny", "prompt": [5 + i % 200 for i in range(2100)], "max_tokens": 20,
                       "min_tokens": 20, "ignore_eos": True, "temperature": 0}).encode()
    req = urllib.request.Request(f"{server}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        assert json.loads(r.read())["usage"]["completion_tokens"] == 20
    after = _metrics(server)
    evicted = after["kvstream_blocks_evicted_total"] - before["kvstream_blocks_evicted_total"]
    # 2120 tokens in blocks of 16, the policy keeps 4 + 60 tokens (+ a prefill chunk): ~130 freed.
    assert 100 <= evicted <= 2120 // 16
    assert after["kvstream_request_blocks_kept_count"] - before["kvstream_request_blocks_kept_count"] == 1
    kept = after["kvstream_request_blocks_kept_sum"] - before["kvstream_request_blocks_kept_sum"]
    assert 1 <= kept <= 12  # bounded by the policy, not by the 133 blocks of the stream
    assert after["kvstream_stream_tokens_sum"] - before["kvstream_stream_tokens_sum"] >= 2100
    assert after["kvstream_streams_beyond_trained_context_total"] - before["kvstream_streams_beyond_trained_context_total"] == 1
    assert after["kvstream_tokens_beyond_trained_context_total"] - before["kvstream_tokens_beyond_trained_context_total"] >= 52
    assert after["kvstream_kv_quant_tokens_written_total"] - before["kvstream_kv_quant_tokens_written_total"] >= 2100
    assert after["kvstream_blocks_held"] == 0  # nothing running: every block back in the pool
    assert 0.0 <= after["kvstream_kv_quant_outlier_channel_ratio"] <= 1.0


def test_locust_refuses_a_non_loopback_host(tmp_path):
    proc = _locust("http://10.1.2.3:8000", tmp_path, "-u", "1", "-r", "1", "--max-requests", "1", timeout=120)
    assert proc.returncode == 2
    assert "'http://10.1.2.3:8000' is not a loopback address; allowed hosts: 127.0.0.1, localhost, ::1" in proc.stderr
