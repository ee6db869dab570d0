"""``vllm-kvstream soak``: faults and a long random load against one ``vllm serve`` on 127.0.0.1,
each phase ending in a leak check (no vLLM import: the server runs as a subprocess).

Phases, in order (each optional):

1. **faults**, scripted, ``--fault-repeats`` times each: a client that disconnects during
   chunked prefill (before its first token), one that disconnects mid-decode, a chat stream
   dropped mid-answer, a request asking for more output than ``max_stream_tokens`` and one
   whose prompt is longer (both refused, HTTP 400 naming the limit), one left to run into that
   cap (ends with ``finish_reason=length`` at exactly ``max_stream_tokens`` tokens), and a
   per-request policy the server refuses (HTTP 400 naming it; the server keeps serving).
2. **soak**: ``--requests`` streaming requests, ``--concurrency`` at a time, with random
   prompt and output lengths (up to ``--max-prompt-tokens`` + ``--max-output-tokens``: pick
   them past the cache and past the model's trained context), a share of them
   (``--abort-share``) dropped by the client at a random point (during prefill or decode),
   a share sent through the chat API, and, with ``--request-policies``, each request asking
   for one of the given per-request policies (``vllm_xargs``). Bounded in count and time
   (``--max-seconds``), loopback only; it stops by itself.
3. **stop under load** (``--stop-under-load``): the server is sent SIGINT with streams in
   flight; it must exit 0 within ``--stop-timeout`` seconds, and every process it started
   (engine core, workers) must be gone.

After phases 1 and 2 the server must be idle (nothing running or waiting) and hold exactly
what it held before the phase: vLLM's own count of used KV blocks
(``vllm:kv_cache_usage_perc`` x the pool's blocks) and the plugin's ``kvstream_blocks_held``.
A request that failed without being aborted on purpose is a failure. The RSS of every
process under the server (API server, engine core, workers) is sampled every
``--rss-every`` requests; after warm-up (the first ``--warmup-share`` of the requests) its
growth must stay under ``--rss-tolerance-mib``. The server runs with oneDNN's primitive cache
off (``ONEDNN_PRIMITIVE_CACHE_CAPACITY=0``; ``--keep-onednn-cache`` keeps it): that cache keeps
one compiled GEMM per distinct batch shape, up to 1,024, and a random load of many shapes grows
the worker by some 200 MiB over 1,000 requests before it fills — stock vLLM exactly as much
(measured: 400 requests, +173 MiB stock, +201 MiB with the plugin; with the cache off, +18 and
+30 MiB, from the 50th request to the 400th) — which would hide a real leak.

Outputs (``--out``): ``soak.json`` (everything), ``soak.md`` (the table), ``rss.csv`` (the
series). Exit status 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import csv
import http.client
import json
import logging
import random
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from vllm_kvstream.loadgen import LoadSpecError, check_loopback, sse_payloads
from vllm_kvstream.server import LocalServer

log = logging.getLogger("vllm_kvstream.soak")

#: Words chat prompts are made of (the tokenizer turns each into about one token).
_WORDS = ("the", "sea", "was", "calm", "and", "her", "letter", "came", "at", "last", "from", "town", "with", "news")


class SoakError(LoadSpecError):
    """A soak setting is invalid; the message names the value and what is allowed."""


@dataclass(frozen=True)
class SoakSpec:
    """What the random phase sends (validated)."""

    requests: int = 1000
    concurrency: int = 8
    min_prompt_tokens: int = 1
    max_prompt_tokens: int = 3000
    max_output_tokens: int = 300
    #: Share of requests the client drops on purpose (half during prefill, half mid-decode).
    abort_share: float = 0.2
    #: Share of requests sent through ``/v1/chat/completions`` (text prompts).
    chat_share: float = 0.2
    #: ``vllm_xargs`` objects, one drawn per request (``{}``: the server's policy).
    request_policies: tuple[dict, ...] = ()
    seed: int = 0
    max_seconds: float = 3600.0

    def __post_init__(self) -> None:
        for name in ("requests", "concurrency", "min_prompt_tokens", "max_prompt_tokens", "max_output_tokens"):
            value, least = getattr(self, name), 0 if name == "requests" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise SoakError(f"{name}={value!r} must be an integer >= {least}")
        if self.min_prompt_tokens > self.max_prompt_tokens:
            raise SoakError(
                f"min_prompt_tokens={self.min_prompt_tokens} is larger than max_prompt_tokens={self.max_prompt_tokens}"
            )
        for name in ("abort_share", "chat_share"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise SoakError(f"{name}={value!r} must be a number in [0, 1]")
        if not isinstance(self.max_seconds, (int, float)) or not self.max_seconds > 0:
            raise SoakError(f"max_seconds={self.max_seconds!r} must be a number > 0")
        for p in self.request_policies:
            if not isinstance(p, dict):
                raise SoakError(f"request_policies entry {p!r} must be a JSON object (vllm_xargs)")


@dataclass(frozen=True)
class SoakRequest:
    index: int
    api: str  # "completions" | "chat"
    prompt_tokens: int
    max_tokens: int | None  # None: up to the server's max_model_len
    #: "" (read to the end), "prefill" (drop before the first token), "decode" (after some).
    abort: str = ""
    #: Seconds before the drop (prefill) or chunks received before it (decode).
    abort_at: float = 0.0
    xargs: dict = field(default_factory=dict)
    #: Expected HTTP status other than 200 (a refusal asked for on purpose).
    expect_status: int = 200
    #: Prompt + output tokens the stream must end at (a request run into ``max_model_len``).
    expect_total: int | None = None
    #: Output pinned to ``max_tokens`` (``min_tokens`` too); else the server may end it sooner.
    pinned: bool = True
    #: Text a refusal's message must contain (the bad value it names).
    expect_in_error: str = ""


@dataclass
class Outcome:
    index: int
    kind: str  # "completed" | "aborted" | "refused" | "failed"
    api: str
    prompt_tokens: int
    output_tokens: int = 0
    finish_reason: str | None = None
    status: int = 0
    error: str = ""
    seconds: float = 0.0
    abort: str = ""
    xargs: dict = field(default_factory=dict)


def plan(spec: SoakSpec, vocab_size: int) -> list[SoakRequest]:
    """The random phase's requests (deterministic in ``spec.seed``)."""
    rng = random.Random(spec.seed)
    out = []
    for i in range(spec.requests):
        n = rng.randint(spec.min_prompt_tokens, spec.max_prompt_tokens)
        m = rng.randint(1, spec.max_output_tokens)
        abort, at = "", 0.0
        if rng.random() < spec.abort_share:
            if rng.random() < 0.5:
                abort, at = "prefill", rng.uniform(0.0, 0.5)
            else:
                abort, at = "decode", float(rng.randint(1, max(1, m)))
        api = "chat" if rng.random() < spec.chat_share else "completions"
        xargs = dict(rng.choice(spec.request_policies)) if spec.request_policies else {}
        out.append(SoakRequest(i, api, n, m, abort, at, xargs))
    return out


def _prompt(req: SoakRequest, vocab_size: int):
    rng = random.Random(req.index * 7919 + req.prompt_tokens)
    if req.api == "chat":
        return [{"role": "user", "content": " ".join(rng.choice(_WORDS) for _ in range(req.prompt_tokens))}]
    return [rng.randrange(3, vocab_size) for _ in range(req.prompt_tokens)]


def request_body(model: str, req: SoakRequest, vocab_size: int) -> dict:
    body: dict = {"model": model, "temperature": 0.0, "stream": True, "ignore_eos": True,
                  "stream_options": {"include_usage": True}}
    prompt = _prompt(req, vocab_size)
    body["messages" if req.api == "chat" else "prompt"] = prompt
    if req.max_tokens is not None:
        body["max_tokens"] = req.max_tokens
        if req.pinned:
            body["min_tokens"] = req.max_tokens
    if req.xargs:
        body["vllm_xargs"] = req.xargs
    return body


def send(url: str, model: str, req: SoakRequest, vocab_size: int, timeout: float = 600.0) -> Outcome:
    """One streaming request over a plain HTTP connection; dropped by closing the socket where
    ``req.abort`` says."""
    parts = urlsplit(url)
    path = "/v1/chat/completions" if req.api == "chat" else "/v1/completions"
    out = Outcome(req.index, "failed", req.api, req.prompt_tokens, abort=req.abort, xargs=req.xargs)
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("POST", path, body=json.dumps(request_body(model, req, vocab_size)),
                     headers={"Content-Type": "application/json"})
        if req.abort == "prefill":  # drop if nothing has streamed by then (the headers may come first)
            conn.sock.settimeout(max(req.abort_at - (time.perf_counter() - t0), 0.001))
        chunks = 0
        try:
            resp = conn.getresponse()
            out.status = resp.status
            if resp.status != 200:
                out.error = resp.read().decode(errors="replace")[:500]
                out.kind = "refused" if resp.status == req.expect_status else "failed"
                return out
            for payload in sse_payloads(_lines(resp)):
                if "error" in payload:  # vLLM reports an engine error inside the stream
                    out.error = json.dumps(payload["error"])[:500]
                    return out
                usage = payload.get("usage")
                if usage:
                    out.output_tokens = int(usage.get("completion_tokens") or 0)
                for choice in payload.get("choices") or []:
                    out.finish_reason = choice.get("finish_reason") or out.finish_reason
                    text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                    if text:
                        chunks += 1
                if req.abort == "prefill" and chunks:
                    out.abort = "decode"  # the first token came before the drop: a decode abort
                    out.kind = "aborted"
                    return out
                if req.abort == "decode" and chunks >= req.abort_at:
                    out.kind = "aborted"
                    return out
        except TimeoutError:
            if req.abort == "prefill":
                out.kind = "aborted"
                return out
            raise
        if req.abort:
            out.kind = "aborted"  # asked to drop, but the stream ended first: still a purposeful drop
            out.error = "ended before the drop"
            return out
        expected = req.max_tokens if req.pinned else None
        if out.finish_reason is None:
            out.error = "stream ended without a finish_reason"
        elif expected is not None and out.output_tokens != expected:
            out.error = f"{out.output_tokens} output tokens, {expected} pinned"
        elif req.expect_total is not None and (out.finish_reason, req.prompt_tokens + out.output_tokens) != ("length", req.expect_total):
            out.error = (f"ended with {out.finish_reason!r} at {req.prompt_tokens}+{out.output_tokens} tokens; "
                         f"expected 'length' at {req.expect_total}")
        else:
            out.kind = "completed"
        return out
    except (OSError, http.client.HTTPException, ValueError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"[:500]
        return out
    finally:
        out.seconds = time.perf_counter() - t0
        conn.close()  # on a drop this is the client disconnect the server must notice


def _lines(resp):
    while True:
        line = resp.readline()
        if not line:
            return
        yield line


# --- the server's state --------------------------------------------------------------------


def _families(url: str) -> list:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        return list(text_string_to_metric_families(r.read().decode()))


@dataclass(frozen=True)
class PoolState:
    running: float
    waiting: float
    #: KV blocks in use by vLLM's count (usage x pool blocks, the null block excluded).
    used_blocks: int
    #: The plugin's count of blocks its tracked requests hold (0 when the plugin is inert).
    plugin_blocks: int
    pool_blocks: int
    #: Requests the plugin keeps scheduler-side state for.
    plugin_requests: int = 0


def pool_state(url: str) -> PoolState:
    values: dict[str, float] = {}
    pool = 0
    for fam in _families(url):
        for s in fam.samples:
            values[s.name] = values.get(s.name, 0.0) + float(s.value)
            if s.name == "vllm:cache_config_info" and s.labels.get("num_gpu_blocks") not in (None, "", "None"):
                pool = int(s.labels["num_gpu_blocks"])
    usage = values.get("vllm:kv_cache_usage_perc", 0.0)
    return PoolState(
        running=values.get("vllm:num_requests_running", 0.0),
        waiting=values.get("vllm:num_requests_waiting", 0.0),
        used_blocks=round(usage * max(pool - 1, 0)),
        plugin_blocks=round(values.get("kvstream_blocks_held", 0.0)),
        pool_blocks=pool,
        plugin_requests=round(values.get("kvstream_requests_tracked", 0.0)),
    )


def wait_idle(url: str, timeout: float = 120.0) -> PoolState:
    """The pool once nothing runs or waits (an aborted request is freed a step after the
    disconnect is seen), or the last state read when ``timeout`` passes."""
    deadline = time.time() + timeout
    while True:
        state = pool_state(url)
        idle = state.running == 0 and state.waiting == 0 and state.used_blocks == 0 and state.plugin_requests == 0
        if idle or time.time() > deadline:
            return state
        time.sleep(0.5)


def process_rss(pid: int) -> dict[str, float]:
    """RSS in MiB of ``pid`` and every process under it, keyed ``name[pid]``."""
    import psutil

    out = {}
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return out
    for p in procs:
        try:
            out[f"{p.name()}[{p.pid}]"] = p.memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            continue
    return out


@dataclass
class PhaseResult:
    name: str
    outcomes: list[Outcome]
    before: PoolState
    after: PoolState
    seconds: float
    #: Requests not sent because the phase ran out of time.
    not_sent: int = 0

    def counts(self) -> dict[str, int]:
        c = {"completed": 0, "aborted": 0, "refused": 0, "failed": 0}
        for o in self.outcomes:
            c[o.kind] += 1
        return c

    @property
    def leaked_blocks(self) -> int:
        return self.after.used_blocks - self.before.used_blocks

    @property
    def leaked_plugin_blocks(self) -> int:
        return self.after.plugin_blocks - self.before.plugin_blocks

    @property
    def leaked_plugin_requests(self) -> int:
        return self.after.plugin_requests - self.before.plugin_requests

    @property
    def ok(self) -> bool:
        idle = self.after.running == 0 and self.after.waiting == 0
        leaks = (self.leaked_blocks, self.leaked_plugin_blocks, self.leaked_plugin_requests)
        return idle and leaks == (0, 0, 0) and self.counts()["failed"] == 0


def run_requests(
    url: str, model: str, requests: Sequence[SoakRequest], vocab_size: int, *, concurrency: int,
    max_seconds: float, on_done: Callable[[int], None] | None = None, name: str = "soak",
) -> PhaseResult:
    """Send ``requests``, ``concurrency`` at a time, until all are done or ``max_seconds`` pass
    (requests not yet started are then not sent); then wait for the server to go idle."""
    before = wait_idle(url)
    t0 = time.perf_counter()
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    skipped = [0]

    def one(req: SoakRequest) -> None:
        if time.perf_counter() - t0 > max_seconds:
            with lock:
                skipped[0] += 1
            return
        o = send(url, model, req, vocab_size)
        if o.kind == "failed":
            log.warning("request %d failed: %s", o.index, o.error or o.status)
        with lock:
            outcomes.append(o)
            done = len(outcomes)
        if on_done is not None:
            on_done(done)

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, requests))
    after = wait_idle(url)
    outcomes.sort(key=lambda o: o.index)
    return PhaseResult(name, outcomes, before, after, time.perf_counter() - t0, skipped[0])


def fault_requests(repeats: int, max_model_len: int, prompt_tokens: int, start: int = 0,
                   bad_request_policy: bool = True) -> list[SoakRequest]:
    """The scripted faults (module docstring), ``repeats`` of each: drops during prefill, mid-decode
    and mid-chat; asking for more output than ``max_model_len`` and a prompt longer than it
    (both refused, 400); a request whose output vLLM caps so the stream ends at exactly
    ``max_model_len`` tokens; and (``bad_request_policy``) a per-request policy the server
    refuses (400, naming the value)."""
    reqs: list[SoakRequest] = []
    i = start
    for _ in range(repeats):
        batch = [
            SoakRequest(i, "completions", prompt_tokens, 64, "prefill", 0.05),
            SoakRequest(i + 1, "completions", min(prompt_tokens, 256), 400, "decode", 20),
            SoakRequest(i + 2, "chat", 64, 300, "decode", 10),
            SoakRequest(i + 3, "completions", 16, max_model_len + 1, pinned=False, expect_status=400,
                        expect_in_error=str(max_model_len)),
            SoakRequest(i + 4, "completions", max_model_len + 8, 16, expect_status=400, expect_in_error=str(max_model_len)),
            SoakRequest(i + 5, "completions", max_model_len - 40, 200, pinned=False, expect_total=max_model_len),
        ]
        if bad_request_policy:
            batch.append(SoakRequest(i + 6, "completions", 16, 8, xargs={"kv_policy": "no-such-policy"},
                                     expect_status=400, expect_in_error="no-such-policy"))
        reqs += batch
        i += len(batch)
    return reqs


def check_fault_outcomes(requests: Sequence[SoakRequest], outcomes: Sequence[Outcome]) -> list[str]:
    """What the scripted faults must show beyond "nothing leaked" and "ended as expected": each
    refusal names the value it refuses."""
    wanted = {r.index: r.expect_in_error for r in requests if r.expect_in_error}
    return [
        f"request {o.index}: the refusal does not name {wanted[o.index]!r}: {o.error}"
        for o in outcomes if o.kind == "refused" and wanted.get(o.index, "") not in o.error
    ]


# --- the server ------------------------------------------------------------------------------


def served_model(url: str) -> tuple[str, int]:
    """The served model's name and ``max_model_len`` (``/v1/models``)."""
    with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as r:
        data = json.loads(r.read())["data"][0]
    return data["id"], int(data["max_model_len"])


def stop_under_load(server: LocalServer, model: str, vocab_size: int, streams: int, timeout: float) -> dict:
    """SIGINT with ``streams`` long streams in flight: the exit status, the seconds it took,
    the processes left behind (must be none) and how the clients' streams ended."""
    import psutil

    children = [p.pid for p in psutil.Process(server.proc.pid).children(recursive=True)]
    reqs = [SoakRequest(10_000 + i, "completions", 64, 2000) for i in range(streams)]
    results: list[Outcome] = []
    threads = [threading.Thread(target=lambda r=r: results.append(send(server.url, model, r, vocab_size, timeout=timeout)))
               for r in reqs]
    for t in threads:
        t.start()
    time.sleep(3.0)  # the streams are decoding
    t0 = time.perf_counter()
    rc = server.stop(timeout=timeout)
    seconds = time.perf_counter() - t0
    for t in threads:
        t.join(timeout=timeout)
    left = _alive(children, grace=10.0)  # helpers (multiprocessing's resource tracker) exit just after the server
    return {
        "streams": streams, "exit_status": rc, "seconds": round(seconds, 2), "processes_left": left,
        "clients_returned": sum(not t.is_alive() for t in threads),
        "client_outcomes": sorted({o.kind for o in results}),
        "ok": rc == 0 and not left and all(not t.is_alive() for t in threads),
    }


def _alive(pids: Sequence[int], grace: float) -> list[int]:
    """``pids`` still running (not zombies) after up to ``grace`` seconds."""
    import psutil

    deadline = time.time() + grace
    while True:
        left = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    left.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not left or time.time() > deadline:
            return left
        time.sleep(0.5)


# --- the report --------------------------------------------------------------------------------


def rss_growth(series: Sequence[tuple[int, dict[str, float]]], warmup: int) -> dict[str, dict]:
    """Per process: RSS at the first sample at or after ``warmup`` requests, at the end, the
    growth between them and the peak after warm-up (MiB)."""
    out: dict[str, dict] = {}
    names = sorted({n for _, s in series for n in s})
    for n in names:
        after = [s[n] for done, s in series if done >= warmup and n in s]
        if not after:
            continue
        out[n] = {"start_mib": round(after[0], 1), "end_mib": round(after[-1], 1),
                  "growth_mib": round(after[-1] - after[0], 1), "peak_mib": round(max(after), 1)}
    return out


def write_report(out: Path, result: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(result, indent=1, default=_jsonable))
    env = " ".join(f"{k}={v}" for k, v in result.get("server_env", {}).items())
    lines = [f"# Soak: {result['model']} under {result['server']}", "", f"`{result['command']}`",
             "", f"Server environment: {env or '(inherited)'}", "",
             "| phase | requests | completed | aborted on purpose | refused on purpose | failed | not sent | "
             "leaked vLLM blocks | leaked plugin blocks | plugin requests left | seconds | ok |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in result["phases"]:
        c = p["counts"]
        lines.append(f"| {p['name']} | {len(p['outcomes'])} | {c['completed']} | {c['aborted']} | {c['refused']} | "
                     f"{c['failed']} | {p['not_sent']} | {p['leaked_blocks']} | {p['leaked_plugin_blocks']} | {p['leaked_plugin_requests']} | "
                     f"{p['seconds']:.0f} | {'yes' if p['ok'] else 'NO'} |")
    if result.get("rss"):
        lines += ["", f"RSS after warm-up ({result['warmup']} requests), MiB; tolerance {result['rss_tolerance_mib']} MiB:", "",
                  "| process | start | end | growth | peak | flat |", "|---|---|---|---|---|---|"]
        for n, g in result["rss"].items():
            lines.append(f"| {n} | {g['start_mib']} | {g['end_mib']} | {g['growth_mib']:+} | {g['peak_mib']} | "
                         f"{'yes' if g['growth_mib'] <= result['rss_tolerance_mib'] else 'NO'} |")
    if result.get("stop_under_load"):
        s = result["stop_under_load"]
        lines += ["", f"Stop under load: SIGINT with {s['streams']} streams in flight: exit {s['exit_status']} in "
                      f"{s['seconds']} s, processes left {s['processes_left'] or 'none'}, "
                      f"{s['clients_returned']}/{s['streams']} clients returned: {'ok' if s['ok'] else 'NOT ok'}"]
    for p in result.get("problems", []):
        lines.append(f"- problem: {p}")
    lines += ["", f"Verdict: {'PASS' if result['ok'] else 'FAIL'}", ""]
    (out / "soak.md").write_text("\n".join(lines))
    with open(out / "rss.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["requests_done", "process", "rss_mib"])
        for done, sample in result.get("rss_series", []):
            for n, v in sample.items():
                w.writerow([done, n, f"{v:.1f}"])
    return out / "soak.md"


def _jsonable(o):
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    raise TypeError(type(o).__name__)


def phase_dict(p: PhaseResult) -> dict:
    return {"name": p.name, "counts": p.counts(), "not_sent": p.not_sent, "leaked_blocks": p.leaked_blocks,
            "leaked_plugin_blocks": p.leaked_plugin_blocks, "leaked_plugin_requests": p.leaked_plugin_requests, "before": asdict(p.before), "after": asdict(p.after),
            "seconds": round(p.seconds, 1), "ok": p.ok, "outcomes": [asdict(o) for o in p.outcomes]}


def soak(args, model: Path) -> tuple[dict, Path]:
    """Run the phases ``args`` asks for (see :func:`vllm_kvstream.cli.build_parser`)."""
    check_loopback("http://127.0.0.1")
    spec = spec_from_args(args)
    vocab_size = int(json.loads((model / "config.json").read_text())["vocab_size"])
    flags = server_flags(args)
    result: dict = {"model": model.name, "server": " ".join(flags), "command": " ".join(sys.argv), "phases": [],
                    "warmup": int(spec.requests * args.warmup_share), "rss_tolerance_mib": args.rss_tolerance_mib,
                    "problems": []}
    env = {} if args.keep_onednn_cache else {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"}
    result["server_env"] = env
    with LocalServer(str(model), flags, args.out / "server.log", env=env) as server:
        name, max_len = served_model(server.url)
        series: list[tuple[int, dict[str, float]]] = [(0, process_rss(server.proc.pid))]
        if args.fault_repeats:
            faults = fault_requests(args.fault_repeats, max_len, min(args.max_prompt_tokens, max_len - 64),
                                    bad_request_policy=args.policy != "stock")
            phase = run_requests(server.url, name, faults, vocab_size, concurrency=1, max_seconds=spec.max_seconds, name="faults")
            result["phases"].append(phase_dict(phase))
            result["problems"] += check_fault_outcomes(faults, phase.outcomes)
            log.info("faults: %s, leaked %d/%d blocks", phase.counts(), phase.leaked_blocks, phase.leaked_plugin_blocks)
        if spec.requests:
            every = max(1, args.rss_every)

            def sample(done: int) -> None:
                if done % every == 0:
                    series.append((done, process_rss(server.proc.pid)))
                    log.info("soak: %d/%d requests, RSS %s", done, spec.requests,
                             ", ".join(f"{k} {v:.0f} MiB" for k, v in series[-1][1].items()))

            phase = run_requests(server.url, name, plan(spec, vocab_size), vocab_size, concurrency=spec.concurrency,
                                 max_seconds=spec.max_seconds, on_done=sample)
            series.append((spec.requests, process_rss(server.proc.pid)))
            result["phases"].append(phase_dict(phase))
            log.info("soak: %s, leaked %d/%d blocks", phase.counts(), phase.leaked_blocks, phase.leaked_plugin_blocks)
        result["rss_series"] = series
        result["rss"] = rss_growth(series, result["warmup"])
        if args.stop_under_load:
            result["stop_under_load"] = stop_under_load(server, name, vocab_size, spec.concurrency, args.stop_timeout)
    rss_ok = all(g["growth_mib"] <= args.rss_tolerance_mib for g in result["rss"].values())
    result["ok"] = (all(p["ok"] for p in result["phases"]) and rss_ok and not result["problems"]
                    and result.get("stop_under_load", {"ok": True})["ok"])
    return result, write_report(args.out, result)


def spec_from_args(args) -> SoakSpec:
    """The random phase's settings from the command line (raises :class:`SoakError`)."""
    return SoakSpec(
        requests=args.requests, concurrency=args.concurrency, min_prompt_tokens=args.min_prompt_tokens,
        max_prompt_tokens=args.max_prompt_tokens, max_output_tokens=args.max_output_tokens,
        abort_share=args.abort_share, chat_share=args.chat_share, request_policies=tuple(args.request_policies),
        seed=args.seed, max_seconds=args.max_seconds,
    )


def server_flags(args) -> list[str]:
    """``vllm serve`` flags of the soak's server: the policy (``--policy`` as ``compare`` and
    ``eval`` take it, sized by ``--cache``, capped at ``--max-stream-tokens``) and the engine."""
    from vllm_kvstream.compare import plan_serve_runs
    from vllm_kvstream.eval.ppl import Cache

    runs = plan_serve_runs([args.policy], Cache.parse(args.cache))
    if len(runs) != 1:
        raise SoakError(f"--policy {args.policy!r} plans {len(runs)} servers; the soak runs one")
    flags = list(runs[0].flags)
    if "--kv-policy-config" in flags:
        at = flags.index("--kv-policy-config") + 1
        params = json.loads(flags[at])
        params["max_stream_tokens"] = args.max_stream_tokens
        flags[at] = json.dumps(params)
    else:
        flags += ["--max-model-len", str(args.max_stream_tokens)]
    flags += ["--dtype", args.dtype, "--block-size", str(args.block_size), "--max-num-batched-tokens", str(args.chunk),
              "--max-num-seqs", str(args.max_num_seqs), "--kv-cache-memory-bytes", str(args.kv_memory_mib * 2**20),
              "--enforce-eager", "--disable-uvicorn-access-log", *args.server_args]
    return flags
