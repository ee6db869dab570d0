"""``vllm-kvstream soak`` against a real ``vllm serve`` on 127.0.0.1: scripted faults (drops
during prefill, mid-decode and mid-chat, over-long requests, a request run into
``max_stream_tokens``, a refused per-request policy), a random load with client drops and
per-request policies, then a stop under load. Each phase must end with vLLM's free blocks,
``kvstream_blocks_held`` and ``kvstream_requests_tracked`` back where they started, no
failure that was not asked for, and the server exiting 0 with nothing left behind.

The default suite runs a short soak on the tiny model; the 1,000-request soaks of
``RELIABILITY.md`` (and SmolLM2's faults) are marked ``slow``."""

import json

import pytest

from vllm_kvstream import cli

pytestmark = pytest.mark.e2e

REQUEST_POLICIES = json.dumps([{}, {"kv_policy": "sliding-window"}, {"kv_policy_config": json.dumps({"window_tokens": 124})}])


def _soak(tmp_path, model, *argv):
    out = tmp_path / "soak"
    rc = cli.main(["soak", "--model", model, "--out", str(out), *argv])
    result = json.loads((out / "soak.json").read_text())
    return rc, result, (out / "soak.md").read_text()


def _check(rc, result, report, *, requests, faults):
    assert rc == 0 and result["ok"], report
    phases = {p["name"]: p for p in result["phases"]}
    for p in phases.values():
        assert (p["leaked_blocks"], p["leaked_plugin_blocks"], p["leaked_plugin_requests"]) == (0, 0, 0), report
        assert p["counts"]["failed"] == 0, report
    if faults:
        c = phases["faults"]["counts"]
        assert c["aborted"] == 3 * faults and c["refused"] == 3 * faults and c["completed"] == faults, report
    if requests:
        c = phases["soak"]["counts"]
        assert c["completed"] + c["aborted"] == requests and c["aborted"] > 0, report
        assert phases["soak"]["after"]["plugin_blocks"] == 0 and phases["soak"]["before"]["pool_blocks"] > 0
    s = result["stop_under_load"]
    assert s["exit_status"] == 0 and s["processes_left"] == [] and s["clients_returned"] == s["streams"], report


def test_faults_a_short_soak_and_a_stop_under_load_leave_nothing_behind(tmp_path, tiny_model):
    rc, result, report = _soak(tmp_path, tiny_model, "--requests", "40", "--fault-repeats", "1", "--rss-every", "20",
                               "--request-policies", REQUEST_POLICIES)
    _check(rc, result, report, requests=40, faults=1)
    xargs = {json.dumps(o["xargs"]) for o in result["phases"][1]["outcomes"]}
    assert len(xargs) == 3  # the three per-request policies all ran


@pytest.mark.slow
@pytest.mark.parametrize(
    ("policy", "mixed"),
    [("streaming-sink", True), ("topk-importance", False), ("streaming-sink:kv_quant=int4", False)],
)
def test_thousand_request_soak(tmp_path, tiny_model, policy, mixed):
    argv = ["--policy", policy, "--requests", "1000", "--fault-repeats", "5"]
    if mixed:  # per-request policies: only position policies in vLLM's layout take them
        argv += ["--request-policies", REQUEST_POLICIES]
    rc, result, report = _soak(tmp_path, tiny_model, *argv)
    _check(rc, result, report, requests=1000, faults=5)


@pytest.mark.slow
def test_smollm2_faults(tmp_path, smollm2):
    rc, result, report = _soak(tmp_path, smollm2, "--requests", "100", "--fault-repeats", "3", "--max-stream-tokens", "12288",
                               "--max-prompt-tokens", "9000", "--cache", "4+1020", "--request-policies", REQUEST_POLICIES)
    _check(rc, result, report, requests=100, faults=3)
