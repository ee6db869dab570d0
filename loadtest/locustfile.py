"""Locust load test for vLLM's OpenAI API (``vllm serve``, with or without a kv policy).

Streaming ``/v1/completions`` and ``/v1/chat/completions`` users. Each request's time to
first token, inter-token latencies, time per output token and end-to-end latency go to
locust as entries of their own (types ``TTFT``, ``ITL``, ``TPOT``, ``E2E``, named by the
request kind), so they show in locust's UI and CSVs; definitions as ``vllm bench serve``
has them (``vllm_kvstream/loadgen.py``). Output lengths are pinned (``ignore_eos``,
``min_tokens``).

Scenarios (``--scenario``):

* ``long-stream``: prompts of ``--long-prompt-tokens`` (choose several times the KV cache)
  and ``--long-output-tokens`` of output.
* ``chat``: chat sessions whose history grows by a user turn and the reply each request,
  ``--chat-turns`` requests per session.
* ``short``: short prompts, short outputs.
* ``mixed``: the three at 1 : 2 : 5.

Load: fixed concurrency (``-u N`` users, each sends its next request when the last one
ends) or a fixed arrival rate (``--arrival-rate R`` requests/s, Poisson arrivals, open
loop, at most ``--max-inflight`` in flight; ``-u`` then only splits the dispatching).

Bounded: the target must be a loopback address; a run stops by itself after
``--max-requests`` requests or ``--max-seconds`` seconds, whichever comes first. At
``--max-seconds`` no new request is sent and the requests in flight get ``--drain-seconds``
to end (so they are measured, not cut off); then the run quits.

    locust -f loadtest/locustfile.py --headless -u 4 -r 4 --host http://127.0.0.1:8000 \\
        --scenario long-stream --long-prompt-tokens 4096 --max-requests 40 --max-seconds 300 \\
        --records /tmp/run.jsonl --csv /tmp/run
"""

from __future__ import annotations

import logging
import random
import threading
import time

import gevent
import requests
from gevent.pool import Pool
from locust import HttpUser, events, task
from locust.exception import StopUser
from locust.stats import CSV_STATS_INTERVAL_SEC

from vllm_kvstream.loadgen import (
    SCENARIOS,
    LoadSpec,
    LoadSpecError,
    PromptSource,
    StreamTimer,
    chat_body,
    check_loopback,
    check_run_options,
    completion_body,
    sse_payloads,
)

logger = logging.getLogger("kvstream.locust")


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    g = parser.add_argument_group("vllm-kvstream")
    g.add_argument("--scenario", choices=SCENARIOS, default="short", help="request mix")
    g.add_argument("--model", default="", help="served model name (default: the server's first model)")
    g.add_argument("--api", choices=("completions", "chat"), default="completions",
                   help="endpoint of the long-stream and short requests (chat sessions always use chat)")
    g.add_argument("--long-prompt-tokens", type=int, default=4096)
    g.add_argument("--long-output-tokens", type=int, default=256)
    g.add_argument("--short-prompt-tokens", type=int, default=64)
    g.add_argument("--short-output-tokens", type=int, default=32)
    g.add_argument("--chat-turn-tokens", type=int, default=256)
    g.add_argument("--chat-output-tokens", type=int, default=64)
    g.add_argument("--chat-turns", type=int, default=8)
    g.add_argument("--arrival-rate", type=float, default=0.0,
                   help="requests/s, open loop (0: fixed concurrency, one request per user at a time)")
    g.add_argument("--max-inflight", type=int, default=64, help="open loop: most requests in flight")
    g.add_argument("--max-requests", type=int, default=200, help="stop after this many requests end")
    g.add_argument("--max-seconds", type=float, default=300.0, help="send no new request after this long")
    g.add_argument("--drain-seconds", type=float, default=60.0,
                   help="after --max-seconds, how long requests in flight may take to end before the run quits")
    g.add_argument("--text", default="austen", help="prompt text: 'austen' or a UTF-8 file")
    g.add_argument("--records", default="", help="append one JSON line per request to this file")
    g.add_argument("--seed", type=int, default=0)


class _Run:
    """State shared by the users of one run."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spec: LoadSpec | None = None
        self.model = ""
        self.prompts: PromptSource | None = None
        self.sent = 0
        self.ended = 0
        self.max_requests = 0
        self.records_file = None
        self.stopping = False

    def claim(self) -> bool:
        """One more request may be sent (the request budget is not spent)."""
        with self.lock:
            if self.stopping or self.sent >= self.max_requests:
                return False
            self.sent += 1
            return True

    def release(self) -> None:
        """A claimed request that will not be sent after all (the run stopped meanwhile)."""
        with self.lock:
            self.sent -= 1

    def in_flight(self) -> int:
        with self.lock:
            return self.sent - self.ended


RUN = _Run()


def _stop(environment, why: str, drain_seconds: float = 0.0) -> None:
    """Send no new request; quit once the requests in flight ended, or ``drain_seconds`` passed."""
    if RUN.stopping:
        return
    RUN.stopping = True
    logger.info("kvstream load test stops: %s (%d requests in flight)", why, RUN.in_flight())
    gevent.spawn(_quit_when_drained, environment, time.monotonic() + drain_seconds)


def _quit_when_drained(environment, deadline: float) -> None:
    while RUN.in_flight() > 0 and time.monotonic() < deadline:
        gevent.sleep(0.05)
    if RUN.in_flight() > 0:
        logger.warning("kvstream load test: %d requests still in flight after the drain; cut off", RUN.in_flight())
    if getattr(environment.parsed_options, "csv_prefix", None):
        # Locust rewrites its --csv files every CSV_STATS_INTERVAL_SEC and writes nothing more
        # at quit: without one more snapshot the requests that ended in the last interval (all
        # of a short run's, when they drain together) would be missing from the CSV.
        gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.5)
    environment.runner.quit()


def _fail_setup(environment, message: str) -> None:
    logger.error("kvstream load test: %s", message)
    environment.process_exit_code = 2
    _stop(environment, message)


@events.test_start.add_listener
def _setup(environment, **_kw) -> None:
    o = environment.parsed_options
    try:
        check_loopback(environment.host or "")
        RUN.spec = LoadSpec(
            scenario=o.scenario, api=o.api,
            long_prompt_tokens=o.long_prompt_tokens, long_output_tokens=o.long_output_tokens,
            short_prompt_tokens=o.short_prompt_tokens, short_output_tokens=o.short_output_tokens,
            chat_turn_tokens=o.chat_turn_tokens, chat_output_tokens=o.chat_output_tokens, chat_turns=o.chat_turns,
        )
        check_run_options(max_requests=o.max_requests, max_seconds=o.max_seconds, drain_seconds=o.drain_seconds,
                          arrival_rate=o.arrival_rate, max_inflight=o.max_inflight, seed=o.seed, model=o.model,
                          text=o.text, records=o.records)
        if o.records:
            try:
                open(o.records, "a").close()
            except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
                raise LoadSpecError(f"--records {o.records!r} cannot be opened for appending "
                                    f"({getattr(exc, 'strerror', None) or exc}); "
                                    "allowed: a writable file path") from None
    except LoadSpecError as exc:
        _fail_setup(environment, str(exc))
        return
    host = environment.host.rstrip("/")
    try:
        RUN.model = o.model or requests.get(f"{host}/v1/models", timeout=30).json()["data"][0]["id"]
        from vllm_kvstream.data import load_text

        text = load_text(o.text)
        need = max(RUN.spec.long_prompt_tokens, RUN.spec.short_prompt_tokens) * 2 + 4096
        chunk = text[: need * 6]  # > 4 characters per token in English prose
        r = requests.post(f"{host}/tokenize", json={"model": RUN.model, "prompt": chunk, "add_special_tokens": False},
                          timeout=120)
        r.raise_for_status()
        RUN.prompts = PromptSource(text, r.json()["tokens"], len(chunk))
    except (requests.RequestException, KeyError, IndexError, ValueError) as exc:
        _fail_setup(environment, f"cannot prepare prompts from {host}: {exc}")
        return
    RUN.max_requests = o.max_requests
    RUN.records_file = open(o.records, "a") if o.records else None  # noqa: SIM115 (closed at test_stop)
    gevent.spawn_later(o.max_seconds, _stop, environment, f"--max-seconds {o.max_seconds} reached", o.drain_seconds)


@events.test_stop.add_listener
def _teardown(environment, **_kw) -> None:
    if RUN.records_file is not None:
        RUN.records_file.close()
        RUN.records_file = None


class StreamUser(HttpUser):
    """One user: sends a request, reads its stream to the end, sends the next (or, with
    ``--arrival-rate``, dispatches requests at Poisson arrival times)."""

    def on_start(self) -> None:
        o = self.environment.parsed_options
        self.rng = random.Random(o.seed * 1000003 + id(self) % 1000003)
        self.history: list[dict] = []
        self.turn = 0
        self.pool = Pool(o.max_inflight) if o.arrival_rate > 0 else None

    def on_stop(self) -> None:
        if self.pool is not None:
            self.pool.kill()

    @task
    def stream(self) -> None:
        if RUN.spec is None or RUN.prompts is None:
            raise StopUser()
        o = self.environment.parsed_options
        if self.pool is None:
            if not RUN.claim():
                raise StopUser()
            self.one_request()
            return
        users = max(self.environment.runner.user_count, 1)
        while RUN.claim():
            gevent.sleep(self.rng.expovariate(o.arrival_rate / users))
            if RUN.stopping:
                RUN.release()
                break
            self.pool.spawn(self.one_request)  # blocks while --max-inflight are in flight
        self.pool.join()
        raise StopUser()

    # -- one request ------------------------------------------------------------------------

    def one_request(self) -> None:
        spec, prompts = RUN.spec, RUN.prompts
        kind = spec.pick_kind(self.rng)
        if kind == "chat":
            if self.turn >= spec.chat_turns:
                self.history, self.turn = [], 0
            messages = [*self.history, {"role": "user", "content": prompts.text_prompt(spec.chat_turn_tokens, self.rng)}]
            self.turn += 1
            api, body = "chat", chat_body(RUN.model, messages, spec.chat_output_tokens)
        else:
            api = spec.api
            sizes = ((spec.long_prompt_tokens, spec.long_output_tokens) if kind == "long-stream"
                     else (spec.short_prompt_tokens, spec.short_output_tokens))
            body = self._body(api, prompts, *sizes)
        timer = StreamTimer(kind, api)
        error = ""
        url = "/v1/chat/completions" if api == "chat" else "/v1/completions"
        try:
            with self.client.post(url, json=body, stream=True, catch_response=True, name=f"{url} [{kind}]",
                                  timeout=(30, 3600)) as resp:
                if resp.status_code != 200:
                    error = f"HTTP {resp.status_code}: {resp.text[:300]}"
                    resp.failure(error)
                else:
                    try:
                        for payload in sse_payloads(resp.iter_lines()):
                            if "error" in payload:
                                raise ValueError(str(payload["error"])[:300])
                            timer.payload(payload)
                    except (requests.RequestException, ValueError) as exc:
                        error = f"stream broke: {exc}"
                    if error:
                        resp.failure(error)
                    else:
                        resp.success()
        except requests.RequestException as exc:
            error = f"request failed: {exc}"
        record = timer.finish(error)
        if kind == "chat" and record.ok:
            self.history = [*body["messages"], {"role": "assistant", "content": "".join(timer.text)}]
        self._report(record)

    def _body(self, api: str, prompts: PromptSource, prompt_tokens: int, output_tokens: int) -> dict:
        rng = self.rng
        if api == "chat":
            return chat_body(RUN.model, [{"role": "user", "content": prompts.text_prompt(prompt_tokens, rng)}], output_tokens)
        return completion_body(RUN.model, prompts.token_prompt(prompt_tokens, rng), output_tokens)

    def _report(self, r) -> None:
        fire = self.environment.events.request.fire
        exc = RuntimeError(r.error) if not r.ok else None
        fire(request_type="E2E", name=r.kind, response_time=(r.e2e or 0.0) * 1000.0,
             response_length=r.output_tokens, exception=exc, context={})
        if r.ok:
            fire(request_type="TTFT", name=r.kind, response_time=r.ttft * 1000.0, response_length=0,
                 exception=None, context={})
            if r.tpot is not None:
                fire(request_type="TPOT", name=r.kind, response_time=r.tpot * 1000.0, response_length=0,
                     exception=None, context={})
            for gap in r.itl:
                fire(request_type="ITL", name=r.kind, response_time=gap * 1000.0, response_length=0,
                     exception=None, context={})
        with RUN.lock:
            RUN.ended += 1
            if RUN.records_file is not None:
                RUN.records_file.write(r.to_json() + "\n")
                RUN.records_file.flush()
            done = RUN.ended >= RUN.max_requests
        if done:
            _stop(self.environment, f"--max-requests {RUN.max_requests} ended")

