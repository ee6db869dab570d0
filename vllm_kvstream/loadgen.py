"""Request shapes and per-request timing for load tests against vLLM's OpenAI API (no vLLM,
no locust import: ``loadtest/locustfile.py`` drives it, ``vllm-kvstream compare`` reads
what it records).

Metric definitions follow ``vllm bench serve``:

* **TTFT**: request sent to the first streamed chunk that carries output text.
* **ITL**: the gap between consecutive streamed chunks that carry output text (one value per
  gap; with one token per chunk, the inter-token latency).
* **TPOT**: ``(E2E - TTFT) / (output tokens - 1)``, the first token excluded (undefined for
  a single output token).
* **E2E**: request sent to the last chunk with output text.

Output tokens are the server's own count (``stream_options.include_usage``), the number of
text chunks when the server sends no usage.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

SCENARIOS = ("long-stream", "chat", "short", "mixed")
#: Share of each request kind in the ``mixed`` scenario.
MIXED_WEIGHTS = {"long-stream": 1, "chat": 2, "short": 5}
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class LoadSpecError(ValueError):
    """A load-test setting is invalid; the message names the value and what is allowed."""


def check_loopback(url: str) -> str:
    """``url`` unchanged if it points at this machine; load is never sent elsewhere."""
    host = urlsplit(url or "").hostname
    if host not in LOOPBACK_HOSTS:
        raise LoadSpecError(f"host {url!r} is not a loopback address; allowed hosts: {', '.join(LOOPBACK_HOSTS)}")
    return url


def check_run_options(*, max_requests: int, max_seconds: float, drain_seconds: float, arrival_rate: float,
                      max_inflight: int, seed: int = 0, model: str = "", text: str = "austen", records: str = "") -> None:
    """The bounds of a locust run (``loadtest/locustfile.py``'s options); ``LoadSpecError``
    naming the option, its value and what is allowed. NaN and infinity are refused: a NaN
    passes every comparison unnoticed, and an infinite time bound is no bound. The types are
    checked too: Python 3.11's argparse reads ``--model=--`` as ``[]`` without a word."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise LoadSpecError(f"--seed={seed!r} is not allowed; allowed: integers")
    for flag, value in (("--model", model), ("--text", text), ("--records", records)):
        if not isinstance(value, str):
            raise LoadSpecError(f"{flag}={value!r} is not allowed; allowed: text")
    for flag, value, low in (("--max-requests", max_requests, 1), ("--max-inflight", max_inflight, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise LoadSpecError(f"{flag}={value!r} is not allowed; allowed: integers >= {low}")
    for flag, value, low_open in (("--max-seconds", max_seconds, True), ("--drain-seconds", drain_seconds, False),
                                  ("--arrival-rate", arrival_rate, False)):
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
              and (value > 0 if low_open else value >= 0))
        if not ok:
            raise LoadSpecError(f"{flag}={value!r} is not allowed; allowed: finite numbers {'>' if low_open else '>='} 0"
                                + (" (0: fixed concurrency)" if flag == "--arrival-rate" else ""))


@dataclass(frozen=True)
class LoadSpec:
    """What each request of a run looks like (validated; the locustfile builds it from its
    command-line options)."""

    scenario: str = "short"
    #: Prompt tokens of a long-stream request (choose several times the KV cache).
    long_prompt_tokens: int = 4096
    long_output_tokens: int = 256
    short_prompt_tokens: int = 64
    short_output_tokens: int = 32
    #: Chat: new user text per turn (tokens, approximate), reply length, turns per session.
    chat_turn_tokens: int = 256
    chat_output_tokens: int = 64
    chat_turns: int = 8
    #: ``completions`` or ``chat`` for the long-stream and short kinds (chat always uses chat).
    api: str = "completions"

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise LoadSpecError(f"scenario {self.scenario!r} is unknown; allowed: {', '.join(SCENARIOS)}")
        if self.api not in ("completions", "chat"):
            raise LoadSpecError(f"api {self.api!r} is unknown; allowed: completions, chat")
        for name in ("long_prompt_tokens", "long_output_tokens", "short_prompt_tokens", "short_output_tokens",
                     "chat_turn_tokens", "chat_output_tokens", "chat_turns"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LoadSpecError(f"{name}={value!r} must be an integer >= 1")

    def pick_kind(self, rng: random.Random) -> str:
        if self.scenario != "mixed":
            return self.scenario
        kinds = list(MIXED_WEIGHTS)
        return rng.choices(kinds, weights=[MIXED_WEIGHTS[k] for k in kinds])[0]


class PromptSource:
    """Prompts cut from one long text: exact token counts through the server's tokenization
    (``token_ids``) for completions, and character slices sized by the measured
    characters-per-token ratio for chat messages."""

    def __init__(self, text: str, token_ids: Sequence[int], chars_tokenized: int) -> None:
        if not token_ids:
            raise LoadSpecError("the prompt text tokenized to no tokens")
        self.text = text
        self.token_ids = list(token_ids)
        self.chars_per_token = max(chars_tokenized / len(self.token_ids), 1.0)

    def token_prompt(self, n: int, rng: random.Random) -> list[int]:
        """``n`` consecutive token ids from a random place (wrapping round the text)."""
        ids = self.token_ids
        start = rng.randrange(len(ids))
        out = ids[start : start + n]
        while len(out) < n:
            out += ids[: n - len(out)]
        return out

    def text_prompt(self, n_tokens: int, rng: random.Random) -> str:
        n = int(n_tokens * self.chars_per_token)
        start = rng.randrange(max(len(self.text) - n, 1))
        return self.text[start : start + n]


def completion_body(model: str, prompt, max_tokens: int) -> dict:
    """A streamed completion whose output length is pinned (``ignore_eos`` + ``min_tokens``)."""
    return {
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "min_tokens": max_tokens,
        "ignore_eos": True, "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True},
    }


def chat_body(model: str, messages: list[dict], max_tokens: int) -> dict:
    return {
        "model": model, "messages": messages, "max_tokens": max_tokens, "min_tokens": max_tokens,
        "ignore_eos": True, "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True},
    }


def sse_payloads(lines):
    """The JSON payloads of a server-sent-event stream (``data: {...}`` lines), ``[DONE]``
    excluded. Raises ``ValueError`` on a payload that is not JSON."""
    for raw in lines:
        line = raw.decode() if isinstance(raw, bytes) else raw
        line = line.strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def chunk_text(payload: dict) -> str:
    """Output text a completion or chat chunk carries ('' for role/usage-only chunks)."""
    choices = payload.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    if "text" in c:
        return c.get("text") or ""
    delta = c.get("delta") or {}
    return delta.get("content") or delta.get("reasoning_content") or ""


@dataclass
class RequestRecord:
    """One request's measurements (seconds) and token counts, as the JSONL records hold it."""

    kind: str
    api: str
    start: float  # wall clock (time.time()) when sent
    ok: bool = False
    error: str = ""
    ttft: float | None = None
    e2e: float | None = None
    tpot: float | None = None
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int = 0
    output_chunks: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))


class StreamTimer:
    """Feeds on a response's payloads as they arrive; builds the :class:`RequestRecord`."""

    def __init__(self, kind: str, api: str, clock=time.perf_counter) -> None:
        self.clock = clock
        self.t0 = clock()
        self.record = RequestRecord(kind=kind, api=api, start=time.time())
        self._last: float | None = None
        self.text: list[str] = []

    def payload(self, payload: dict) -> None:
        now = self.clock()
        usage = payload.get("usage")
        if usage:
            self.record.prompt_tokens = usage.get("prompt_tokens")
            self.record.output_tokens = usage.get("completion_tokens") or self.record.output_tokens
        text = chunk_text(payload)
        if not text:
            return
        r = self.record
        if r.ttft is None:
            r.ttft = now - self.t0
        else:
            r.itl.append(now - self._last)
        self._last = now
        r.output_chunks += 1
        self.text.append(text)

    def finish(self, error: str = "") -> RequestRecord:
        r = self.record
        if not r.output_tokens:
            r.output_tokens = r.output_chunks
        if error:
            r.error = error
        elif r.ttft is None:
            r.error = "the stream ended without output text"
        else:
            r.e2e = self._last - self.t0
            if r.output_tokens > 1:
                r.tpot = (r.e2e - r.ttft) / (r.output_tokens - 1)
            r.ok = True
        return r


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), ``nan`` for no values."""
    v = sorted(values)
    if not v:
        return math.nan
    pos = (len(v) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarize(records: Sequence[RequestRecord], duration_s: float) -> dict:
    """Run-level figures: counts, throughput, TTFT/ITL/TPOT/E2E percentiles (milliseconds)."""
    ok = [r for r in records if r.ok]
    out = {
        "requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration_s": duration_s,
        "output_tokens": sum(r.output_tokens for r in ok),
        "prompt_tokens": sum(r.prompt_tokens or 0 for r in ok),
    }
    out["request_throughput"] = len(ok) / duration_s if duration_s > 0 else math.nan
    out["output_throughput"] = out["output_tokens"] / duration_s if duration_s > 0 else math.nan
    series = {
        "ttft": [r.ttft for r in ok],
        "itl": [x for r in ok for x in r.itl],
        "tpot": [r.tpot for r in ok if r.tpot is not None],
        "e2e": [r.e2e for r in ok],
    }
    for name, values in series.items():
        for q in (50, 90, 99):
            out[f"{name}_p{q}_ms"] = percentile(values, q) * 1000.0
        out[f"{name}_mean_ms"] = (sum(values) / len(values) * 1000.0) if values else math.nan
    return out


def read_records(path) -> list[RequestRecord]:
    with open(path) as f:
        return [RequestRecord(**json.loads(line)) for line in f if line.strip()]
