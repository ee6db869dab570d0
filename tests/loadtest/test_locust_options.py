"""Bad options of the locust load test (``loadtest/locustfile.py``), property-based.

The locustfile checks its options through :func:`vllm_kvstream.loadgen.check_run_options`
and :class:`~vllm_kvstream.loadgen.LoadSpec` (pure Python: hypothesis tests them here); a
few real locust runs show a refusal ends the run with exit 2 and the value named. They need
no server: options are checked before the first request (the host is a closed port).
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from vllm_kvstream.loadgen import SCENARIOS, LoadSpec, LoadSpecError, check_run_options

ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
ALLOWED = re.compile(r"allowed|must be", re.IGNORECASE)
NAN, INF = float("nan"), float("inf")

#: What argparse (type=int / type=float) or a caller may hand over, and worse: Python 3.11's
#: argparse turns ``--opt=--`` into ``[]`` or ``None``.
values = (
    st.integers(min_value=-3, max_value=3) | st.integers() | st.sampled_from([2**63, 10**40])
    | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([NAN, INF, -INF, 0.0, -0.0, 1e-300, 0.25])
    | st.booleans() | st.none() | st.just([]) | st.text(max_size=4)
)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


@settings(max_examples=500, deadline=None)
@given(max_requests=values, max_seconds=values, drain_seconds=values, arrival_rate=values, max_inflight=values,
       seed=values, model=values | st.text(max_size=4), records=st.just("") | values)
@example(max_requests=1, max_seconds=NAN, drain_seconds=0.0, arrival_rate=0.0, max_inflight=1, seed=0, model="",
         records="")
@example(max_requests=1, max_seconds=1.0, drain_seconds=NAN, arrival_rate=0.0, max_inflight=1, seed=0, model="",
         records="")
@example(max_requests=1, max_seconds=INF, drain_seconds=0.0, arrival_rate=0.0, max_inflight=1, seed=0, model="",
         records="")
@example(max_requests=1, max_seconds=1.0, drain_seconds=0.0, arrival_rate=NAN, max_inflight=1, seed=0, model="",
         records="")
@example(max_requests=1, max_seconds=1.0, drain_seconds=0.0, arrival_rate=0.0, max_inflight=1, seed=0, model=[],
         records="")
def test_run_options_valid_or_refused_naming_them(max_requests, max_seconds, drain_seconds, arrival_rate,
                                                  max_inflight, seed, model, records):
    given = {"--max-requests": max_requests, "--max-seconds": max_seconds, "--drain-seconds": drain_seconds,
             "--arrival-rate": arrival_rate, "--max-inflight": max_inflight, "--seed": seed, "--model": model,
             "--records": records}
    ok = {
        "--max-requests": _is_int(max_requests) and max_requests >= 1,
        "--max-inflight": _is_int(max_inflight) and max_inflight >= 1,
        "--max-seconds": _is_number(max_seconds) and max_seconds > 0,
        "--drain-seconds": _is_number(drain_seconds) and drain_seconds >= 0,
        "--arrival-rate": _is_number(arrival_rate) and arrival_rate >= 0,
        "--seed": _is_int(seed), "--model": isinstance(model, str), "--records": isinstance(records, str),
    }
    try:
        check_run_options(max_requests=max_requests, max_seconds=max_seconds, drain_seconds=drain_seconds,
                          arrival_rate=arrival_rate, max_inflight=max_inflight, seed=seed, model=model,
                          records=records)
    except LoadSpecError as exc:
        msg = str(exc)
        assert not all(ok.values()), f"valid options refused: {msg}"
        named = [flag for flag in given if f"{flag}={given[flag]!r}" in msg]
        assert named and not ok[named[0]], msg  # the option named is one that is bad
        assert ALLOWED.search(msg) and "\n" not in msg, msg
        return
    assert all(ok.values()), f"accepted although bad: {[f for f, good in ok.items() if not good]}"


INT_FIELDS = ("long_prompt_tokens", "long_output_tokens", "short_prompt_tokens", "short_output_tokens",
              "chat_turn_tokens", "chat_output_tokens", "chat_turns")


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(INT_FIELDS), value=values,
       scenario=st.sampled_from(SCENARIOS) | st.text(max_size=8) | st.just([]),
       api=st.sampled_from(["completions", "chat"]) | st.text(max_size=8) | st.none())
@example(field="chat_turns", value=True, scenario="chat", api="chat")
@example(field="long_prompt_tokens", value=0, scenario="long-stream", api="completions")
def test_load_spec_valid_or_refused_naming_the_field(field, value, scenario, api):
    try:
        spec = LoadSpec(scenario=scenario, api=api, **{field: value})
    except LoadSpecError as exc:
        msg = str(exc)
        assert (f"{field}={value!r}" in msg or f"scenario {scenario!r}" in msg or f"api {api!r}" in msg), msg
        assert ALLOWED.search(msg), msg
        bad = (not (_is_int(value) and value >= 1)) or scenario not in SCENARIOS or api not in ("completions", "chat")
        assert bad, msg
        return
    assert getattr(spec, field) == value and _is_int(value) and value >= 1
    assert spec.scenario in SCENARIOS and spec.api in ("completions", "chat")


def _locust(tmp_path, *extra):
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", "http://127.0.0.1:9",
           "-u", "1", "-r", "1", "--only-summary", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)


@pytest.mark.parametrize(("extra", "named"), [
    (["--max-seconds", "nan"], "--max-seconds=nan"),        # before: passed the `<= 0` check unnoticed
    (["--arrival-rate=-1"], "--arrival-rate=-1.0"),
    (["--long-prompt-tokens", "0"], "long_prompt_tokens=0"),
    (["--model=--"], "--model=[]"),                          # Python 3.11's argparse: [] for "--model=--"
    (["--records", "no/such/dir/run.jsonl"], "--records 'no/such/dir/run.jsonl'"),
    (["--max-requests=abc"], "'abc'"),                      # locust's own parser (type=int)
])
def test_real_locust_refuses_a_bad_option_naming_it(tmp_path, extra, named):
    proc = _locust(tmp_path, *extra)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert named in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
