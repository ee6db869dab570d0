"""Per-request policies resolved against the server's limits (``vllm_kvstream/request_policy.py``)."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_kvstream.errors import KVStreamConfigError
from vllm_kvstream.policies import build_policy
from vllm_kvstream.request_policy import FIELDS, REQUEST_POLICIES, ServerLimits, asks_for_policy, request_policy


def limits(name="streaming-sink", unsupported=None, **params):
    params = params or {"sink_tokens": 4, "window_tokens": 252}
    if name == "streaming-sink":  # token-exact numbers; the engine resolves align="block" (test_engine_args)
        params = {"align": "token", **params}
    return ServerLimits(build_policy(name, params), block_size=16, max_query_tokens=64, trained_context=2048,
                        unsupported=unsupported)


SERVER = limits()


def test_no_fields_or_the_servers_own_policy_is_no_override():
    assert request_policy(None, SERVER) is None
    assert request_policy({"other": 1}, SERVER) is None
    assert not asks_for_policy({"kv_transfer_params": {"x": 1}})  # vLLM's own field (KV connectors)
    assert asks_for_policy({"kv_windw": 1})  # a misspelling is the plugin's to refuse
    assert request_policy({"kv_policy": "streaming-sink"}, SERVER) is None
    assert request_policy({"kv_policy_config": {"window_tokens": 252}}, SERVER) is None


def test_a_smaller_window_keeps_the_servers_sinks_and_cap():
    p = request_policy({"kv_policy_config": {"window_tokens": 124}}, SERVER)
    assert (p.name, p.config.sink_tokens, p.config.window_tokens) == ("streaming-sink", 4, 124)
    assert p.max_stream_tokens == SERVER.policy.max_stream_tokens


def test_another_policy_spends_the_servers_budget_its_own_way():
    p = request_policy({"kv_policy": "sliding-window"}, SERVER)
    assert (p.name, p.config.window_tokens) == ("sliding-window", 256)
    q = request_policy({"kv_policy": "sliding-window", "kv_policy_config": json.dumps({"window_tokens": 100})}, SERVER)
    assert q.config.window_tokens == 100  # the JSON text form the OpenAI API's vllm_xargs carries


def test_memory_can_never_exceed_the_servers():
    with pytest.raises(KVStreamConfigError, match=r"window_tokens=500.*holds up to \d+ KV blocks.*allows \d+.*at most 256"):
        request_policy({"kv_policy_config": {"window_tokens": 500}}, SERVER)
    with pytest.raises(KVStreamConfigError, match="sink_tokens=40"):
        request_policy({"kv_policy_config": {"sink_tokens": 40}}, SERVER)  # 40 + 252 > the server's budget
    # An unbounded server (full) lets a request bound itself.
    full = ServerLimits(build_policy("full", {}), 16, 64, 2048)
    own = request_policy({"kv_policy": "streaming-sink", "kv_policy_config": {"window_tokens": 500}}, full)
    # the default align="block" at the server's block size: 4 + 500 spent as 16 + 488
    assert (own.pattern.sink_tokens, own.pattern.window_tokens) == (16, 488)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"kv_policy": "topk-importance"}, "kv_policy='topk-importance' is not allowed; allowed: streaming-sink, sliding-window"),
        ({"kv_policy": "full"}, "kv_policy='full' is not allowed"),
        ({"kv_policy": 3}, "kv_policy=3 is not allowed"),
        ({"kv_windw": 3}, "unknown per-request field(s) 'kv_windw'; allowed: kv_policy, kv_policy_config"),
        ({"kv_policy_config": "{oops"}, "must be a JSON object, got '{oops'"),
        ({"kv_policy_config": [1]}, "must be a JSON object like"),
        ({"kv_policy_config": {"window_tokens": 8}}, "window_tokens=8 is smaller than one KV block"),
        ({"kv_policy_config": {"window_tokens": -1}}, "window_tokens=-1"),
        ({"kv_policy_config": {"max_stream_tokens": 10}}, "max_stream_tokens=10 is not allowed"),
        ({"kv_policy_config": {"bogus": 1}}, "unknown parameter 'bogus'"),
        ({"kv_policy_config": {"window_tokens": object()}}, "must be JSON values"),
    ],
)
def test_bad_values_are_named_with_the_allowed_ones(extra, message):
    with pytest.raises(KVStreamConfigError) as err:
        request_policy(extra, SERVER)
    assert message in str(err.value)


def test_servers_that_take_no_per_request_policy_say_why():
    quant = limits(unsupported="its KV blocks live in the plugin's pages (--kv-quant...)")
    with pytest.raises(KVStreamConfigError, match=r"kv_policy_config=\{'window_tokens': 124\} is not supported by this server \(its KV blocks live"):
        request_policy({"kv_policy_config": {"window_tokens": 124}}, quant)
    assert request_policy({"unrelated": 1}, quant) is None


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from([*FIELDS, "kv_", "kv_window", "max_tokens"]),
        st.one_of(_json, st.sampled_from(REQUEST_POLICIES), st.dictionaries(
            st.sampled_from(["sink_tokens", "window_tokens", "max_stream_tokens", "x"]),
            st.one_of(st.integers(-5, 2000), st.text(max_size=4), st.booleans()), max_size=3)),
        max_size=3,
    )
)
def test_any_request_fields_resolve_within_the_limits_or_are_refused_by_name(extra):
    try:
        policy = request_policy(extra, SERVER)
    except KVStreamConfigError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    if policy is not None:
        assert policy.name in REQUEST_POLICIES
        assert policy.max_blocks_per_request(16, 64, 1 << 62) <= SERVER.max_blocks
        assert policy.max_stream_tokens == SERVER.policy.max_stream_tokens
