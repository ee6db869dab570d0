"""``vllm-kvstream soak`` without vLLM: the request plan, the client's drops against a fake
streaming server, the leak and RSS verdicts, the report, and bad options."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from vllm_kvstream import cli
from vllm_kvstream.soak import (
    Outcome,
    PhaseResult,
    PoolState,
    SoakError,
    SoakRequest,
    SoakSpec,
    check_fault_outcomes,
    fault_requests,
    plan,
    request_body,
    rss_growth,
    send,
    write_report,
)


class FakeServer(BaseHTTPRequestHandler):
    """Streams ``max_tokens`` one-token chunks (after ``first_delay`` s); 400 for a prompt of
    token 0; records whether each client stayed to the end."""

    first_delay = 0.0
    ended: list = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body.get("prompt") == [0]:
            msg = json.dumps({"error": {"message": "max_tokens=9 cannot be greater than max_model_len=8"}}).encode()
            self.send_response(400)
            self.send_header("Content-Length", str(len(msg)))
            self.end_headers()
            self.wfile.write(msg)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        time.sleep(self.first_delay)
        n = body.get("max_tokens", 16)
        try:
            for i in range(n):
                chat = "messages" in body
                choice = {"delta": {"content": "x"}} if chat else {"text": "x"}
                if i == n - 1:
                    choice["finish_reason"] = "length"
                self.wfile.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
                self.wfile.flush()
                time.sleep(0.005)
            usage = {"choices": [], "usage": {"completion_tokens": n}}
            self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
            FakeServer.ended.append(True)
        except (BrokenPipeError, ConnectionResetError):
            FakeServer.ended.append(False)


@pytest.fixture()
def fake():
    FakeServer.first_delay, FakeServer.ended = 0.0, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_stream_read_to_the_end_completes_with_its_pinned_tokens(fake):
    o = send(fake, "m", SoakRequest(0, "completions", 4, 12), vocab_size=100)
    assert (o.kind, o.output_tokens, o.finish_reason) == ("completed", 12, "length")
    o = send(fake, "m", SoakRequest(1, "chat", 4, 5), vocab_size=100)
    assert (o.kind, o.output_tokens) == ("completed", 5)


def test_drops_close_the_connection_mid_stream(fake):
    o = send(fake, "m", SoakRequest(0, "completions", 4, 400, abort="decode", abort_at=3), vocab_size=100)
    assert o.kind == "aborted" and o.abort == "decode"
    FakeServer.first_delay = 0.5  # "prefill": nothing streamed yet when the client drops
    o = send(fake, "m", SoakRequest(1, "completions", 4, 400, abort="prefill", abort_at=0.05), vocab_size=100)
    assert o.kind == "aborted" and o.abort == "prefill" and o.seconds < 0.45
    deadline = time.time() + 5
    while len(FakeServer.ended) < 2 and time.time() < deadline:
        time.sleep(0.05)
    assert FakeServer.ended == [False, False]  # the server saw both clients go


def test_an_unexpected_refusal_fails_and_an_expected_one_is_checked_by_name(fake):
    bad = SoakRequest(0, "completions", 1, 9)
    req = SoakRequest(0, "completions", 1, 9, expect_status=400, expect_in_error="max_model_len=8")
    body = request_body("m", bad, 100)
    assert body["min_tokens"] == body["max_tokens"] == 9
    # prompt [0] is the fake's refusal trigger
    import vllm_kvstream.soak as soak

    orig = soak._prompt
    soak._prompt = lambda r, v: [0]
    try:
        failed = send(fake, "m", bad, 100)
        refused = send(fake, "m", req, 100)
    finally:
        soak._prompt = orig
    assert failed.kind == "failed" and failed.status == 400
    assert refused.kind == "refused"
    assert check_fault_outcomes([req], [refused]) == []
    wrong = SoakRequest(0, "completions", 1, 9, expect_status=400, expect_in_error="4096")
    assert "does not name '4096'" in check_fault_outcomes([wrong], [refused])[0]


def test_a_short_stream_or_a_missing_finish_fails(fake):
    o = send(fake, "m", SoakRequest(0, "completions", 4, 6, expect_total=100, pinned=False), vocab_size=100)
    assert o.kind == "failed" and "expected 'length' at 100" in o.error


def test_plan_is_deterministic_and_mixes_what_it_was_asked_for():
    spec = SoakSpec(requests=400, max_prompt_tokens=3000, max_output_tokens=300, abort_share=0.3, chat_share=0.2,
                    request_policies=({}, {"kv_policy": "sliding-window"}), seed=3)
    a, b = plan(spec, 1000), plan(spec, 1000)
    assert a == b and len(a) == 400
    aborts = sum(r.abort != "" for r in a) / 400
    assert 0.2 < aborts < 0.4 and {r.abort for r in a} == {"", "prefill", "decode"}
    assert 0.1 < sum(r.api == "chat" for r in a) / 400 < 0.3
    assert {json.dumps(r.xargs) for r in a} == {"{}", '{"kv_policy": "sliding-window"}'}
    assert max(r.prompt_tokens for r in a) > 2000 and min(r.max_tokens for r in a) >= 1


def test_faults_cover_every_scripted_case_and_name_their_limits():
    reqs = fault_requests(2, 4096, 3000)
    assert len(reqs) == 14 and len({r.index for r in reqs}) == 14
    assert {r.expect_in_error for r in reqs if r.expect_status == 400} == {"4096", "no-such-policy"}
    assert [r for r in reqs if r.expect_total == 4096][0].prompt_tokens == 4056
    assert not any(r.xargs for r in fault_requests(1, 4096, 3000, bad_request_policy=False))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"requests": -1}, "requests=-1 must be an integer >= 0"),
        ({"concurrency": 0}, "concurrency=0"),
        ({"min_prompt_tokens": 10, "max_prompt_tokens": 5}, "min_prompt_tokens=10 is larger than max_prompt_tokens=5"),
        ({"abort_share": 1.5}, "abort_share=1.5 must be a number in [0, 1]"),
        ({"max_seconds": 0}, "max_seconds=0"),
        ({"request_policies": ([1],)}, "must be a JSON object"),
        ({"max_output_tokens": True}, "max_output_tokens=True"),
    ],
)
def test_bad_specs_are_named(kwargs, message):
    with pytest.raises(SoakError) as err:
        SoakSpec(**kwargs)
    assert message in str(err.value)


def _state(used, plugin, requests=0, running=0):
    return PoolState(running=running, waiting=0, used_blocks=used, plugin_blocks=plugin, pool_blocks=100,
                     plugin_requests=requests)


def test_a_phase_is_ok_only_idle_with_nothing_leaked_and_nothing_failed():
    done = [Outcome(0, "completed", "completions", 4), Outcome(1, "aborted", "chat", 4)]
    assert PhaseResult("soak", done, _state(0, 0), _state(0, 0), 1.0).ok
    assert not PhaseResult("soak", done, _state(0, 0), _state(2, 0), 1.0).ok
    assert not PhaseResult("soak", done, _state(0, 0), _state(0, 0, requests=1), 1.0).ok
    assert not PhaseResult("soak", done, _state(0, 0), _state(0, 0, running=1), 1.0).ok
    assert not PhaseResult("soak", [*done, Outcome(2, "failed", "chat", 4)], _state(0, 0), _state(0, 0), 1.0).ok


def test_rss_growth_is_measured_after_warm_up():
    series = [(0, {"w": 100.0}), (10, {"w": 300.0}), (20, {"w": 310.0}), (30, {"w": 305.0})]
    g = rss_growth(series, warmup=10)["w"]
    assert (g["start_mib"], g["end_mib"], g["growth_mib"], g["peak_mib"]) == (300.0, 305.0, 5.0, 310.0)


def test_report_lists_every_phase_and_the_verdict(tmp_path):
    phase = PhaseResult("soak", [Outcome(0, "completed", "completions", 4)], _state(0, 0), _state(1, 0), 2.0)
    from vllm_kvstream.soak import phase_dict

    result = {"model": "tiny", "server": "--kv-policy x", "command": "soak", "phases": [phase_dict(phase)],
              "warmup": 0, "rss_tolerance_mib": 64, "rss": {"w": {"start_mib": 1, "end_mib": 100, "growth_mib": 99,
                                                                  "peak_mib": 100}},
              "rss_series": [(0, {"w": 1.0})], "problems": ["x"], "ok": False}
    text = write_report(tmp_path, result).read_text()
    assert "| soak | 1 | 1 | 0 | 0 | 0 | 0 | 1 | 0 | 0 |" in text and "| w | 1 | 100 | +99 | 100 | NO |" in text
    assert "Verdict: FAIL" in text and (tmp_path / "rss.csv").read_text().startswith("requests_done,process,rss_mib")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--concurrency", "0"], "argument --concurrency: '0' is too small; allowed: integers >= 1"),
        (["--requests", "-2"], "argument --requests: '-2' is too small; allowed: integers >= 0"),
        (["--warmup-share", "1"], "argument --warmup-share: '1' is out of range"),
        (["--cache", "4+"], "argument --cache"),
        (["--policy", "nope"], "unknown KV policy 'nope'"),
        (["--request-policies", "{}"], "must be a JSON list of objects"),
        (["--request-policies", "[oops"], "is not JSON"),
        (["--abort-share", "2"], "argument --abort-share: '2' is out of range"),
        (["--min-prompt-tokens", "9", "--max-prompt-tokens", "3"], "min_prompt_tokens=9 is larger than max_prompt_tokens=3"),
    ],
)
def test_bad_soak_options_exit_2_naming_the_value(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_model", lambda name: (_ for _ in ()).throw(AssertionError("reached the model")))
    import vllm_kvstream.soak as soak

    monkeypatch.setattr(soak, "LocalServer", None)  # nothing may start
    with pytest.raises(SystemExit) as exit_:
        code = cli.main(["soak", *argv])
        raise SystemExit(code)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
