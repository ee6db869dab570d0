"""Pure policy semantics: exact token sets, freeable blocks, bounds, validation errors."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_kvstream.errors import KVStreamConfigError
from vllm_kvstream.policies import available_policies, build_policy, register_policy
from vllm_kvstream.policies.streaming_sink import StreamingSinkPolicy


def attended(policy, p):
    return [t for r in policy.attended_ranges(p) for t in r]


def test_builtin_policies_registered():
    assert {"full", "sliding-window", "streaming-sink"} <= set(available_policies())


def test_streaming_sink_exact_token_set():
    pol = build_policy("streaming-sink", {"sink_tokens": 4, "window_tokens": 8})
    assert attended(pol, 0) == [0]
    assert attended(pol, 11) == list(range(12))  # 12 == sink + window: nothing evicted yet
    assert attended(pol, 12) == [0, 1, 2, 3] + list(range(5, 13))
    assert attended(pol, 100) == [0, 1, 2, 3] + list(range(93, 101))


def test_sliding_window_and_full_token_sets():
    sw = build_policy("sliding-window", {"window_tokens": 5})
    assert attended(sw, 3) == [0, 1, 2, 3]
    assert attended(sw, 20) == list(range(16, 21))
    full = build_policy("full")
    assert attended(full, 20) == list(range(21))


@settings(max_examples=300, deadline=None)
@given(
    sink=st.integers(1, 40),
    window=st.integers(1, 200),
    block=st.sampled_from([1, 2, 16, 32]),
    processed=st.integers(0, 5000),
    chunk=st.integers(1, 300),
)
def test_freed_blocks_are_never_needed_and_bound_holds(sink, window, block, processed, chunk):
    """No query at or after `processed` attends a token in a freeable block, and the blocks a
    request holds while computing `chunk` tokens never exceed max_blocks_per_request."""
    pol = build_policy("streaming-sink", {"sink_tokens": sink, "window_tokens": window})
    first, last = pol.freeable_block_range(processed, block)
    freed = set(range(first * block, last * block))
    for p in (processed, processed + chunk - 1):
        assert not freed & set(attended(pol, p))
    # Blocks held = blocks of [0, processed + chunk) minus freed ones.
    total = -(-(processed + chunk) // block)
    held = total - (last - first)
    assert held <= pol.max_blocks_per_request(block, chunk, 1 << 40)


@settings(max_examples=200, deadline=None)
@given(sink=st.integers(0, 10), window=st.integers(1, 50), p=st.integers(0, 500))
def test_attended_count_and_cache_relative_distances(sink, window, p):
    params = {"window_tokens": window}
    name = "sliding-window"
    if sink:
        name, params = "streaming-sink", {"sink_tokens": sink, "window_tokens": window}
    pol = build_policy(name, params)
    toks = attended(pol, p)
    assert len(toks) == min(p + 1, sink + window)
    assert toks == sorted(set(toks)) and toks[-1] == p
    # StreamingLLM positions: the query sits at cache index len-1; distances < sink + window.
    evicted = pol.pattern.evicted_before(p)
    for t in toks:
        dist = (p - evicted - t) if t < sink else (p - t)
        assert 0 <= dist < sink + window


@pytest.mark.parametrize(
    ("name", "params", "needle"),
    [
        ("nope", None, "unknown KV policy 'nope'; allowed: full, sliding-window, streaming-sink"),
        ("streaming-sink", {"sink_tokens": 0}, "sink_tokens=0"),
        ("streaming-sink", {"window_tokens": -3}, "window_tokens=-3"),
        ("streaming-sink", {"window": 5}, "unknown parameter 'window'"),
        ("sliding-window", {"window_tokens": "8"}, "window_tokens='8'"),
        ("full", {"window_tokens": 8}, "Allowed: no parameters"),
    ],
)
def test_bad_input_names_value_and_allowed(name, params, needle):
    with pytest.raises(KVStreamConfigError) as err:
        build_policy(name, params)
    assert needle in str(err.value)
    if name != "nope":
        assert "Allowed" in str(err.value)


def test_engine_fit_checks():
    pol = build_policy("streaming-sink", {"sink_tokens": 4, "window_tokens": 100})
    with pytest.raises(KVStreamConfigError, match=r"window_tokens=100 is smaller than one KV block \(128"):
        pol.check_engine_fit(block_size=128, trained_context=8192)
    with pytest.raises(KVStreamConfigError, match=r"= 104 does not fit the model's trained context of 64"):
        pol.check_engine_fit(block_size=16, trained_context=64)
    pol.check_engine_fit(block_size=16, trained_context=8192)


def test_registry_rejects_duplicate_names():
    class Impostor(StreamingSinkPolicy):
        pass

    with pytest.raises(ValueError, match="duplicate KV policy name 'streaming-sink'"):
        register_policy(Impostor)
    register_policy(StreamingSinkPolicy)  # the same class again is fine


def test_policies_do_not_import_vllm():
    import subprocess
    import sys

    code = (
        "import sys, vllm_kvstream.policies, vllm_kvstream.settings, vllm_kvstream.kernels; "
        "bad = [m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_params_for_cache_gives_the_same_budget():
    from vllm_kvstream.policies import available_policies, get_policy_class

    for name in available_policies():
        cls = get_policy_class(name)
        params = cls.params_for_cache(4, 252)
        if params is None:
            assert not cls.bounded
            continue
        pattern = build_policy(name, params).pattern
        assert pattern.sink_tokens + pattern.window_tokens == 256, name


@settings(max_examples=200, deadline=None)
@given(sink=st.integers(1, 200), window=st.integers(1, 3000), block=st.sampled_from([1, 16, 32, 64, 128]))
def test_block_alignment_spends_the_budget_on_whole_sink_blocks(sink, window, block):
    pol = build_policy("streaming-sink", {"sink_tokens": sink, "window_tokens": window})
    assert pol.config.align == "block"  # the default
    sinks = -(-sink // block) * block
    if sink + window - sinks < block:
        with pytest.raises(KVStreamConfigError, match=f"align='block' rounds sink_tokens={sink} up to {sinks}"):
            pol.for_block_size(block)
        return
    run = pol.for_block_size(block)
    pat = run.pattern
    assert run.config.align == "token" and run.for_block_size(block) is run  # resolved once
    assert pat.sink_tokens == sinks and pat.sink_tokens % block == 0
    assert pat.sink_tokens + pat.window_tokens == sink + window  # every query attends the whole budget
    # A decoding stream holds exactly ceil((S + W) / block) + 1 blocks; token alignment one more
    # whenever the sinks leave part of their block unused and the window is unaligned.
    assert run.max_blocks_per_request(block, 1, 1 << 40) == -(-(sink + window) // block) + 1
    token = build_policy("streaming-sink", {"sink_tokens": sink, "window_tokens": window, "align": "token"})
    assert token.for_block_size(block) is token
    assert token.max_blocks_per_request(block, 1, 1 << 40) == -(-sink // block) + -(-window // block) + 1
    # What the resolved policy frees is never attended again (the scheduler frees by it).
    for processed in (sink + window, 3 * (sink + window) + 7):
        first, last = run.freeable_block_range(processed, block)
        needed = {t // block for q in range(processed, processed + 2 * block) for r in run.attended_ranges(q) for t in r}
        assert not needed & set(range(first, last))


def test_block_alignment_refusal_names_values_and_allowed():
    pol = build_policy("streaming-sink", {"sink_tokens": 4, "window_tokens": 60})
    with pytest.raises(KVStreamConfigError) as err:
        pol.for_block_size(64)
    assert "leaves window_tokens=0 of the budget 4+60; allowed: sink_tokens + window_tokens >= 128, or align='token'" in str(err.value)
    with pytest.raises(KVStreamConfigError, match="align='diagonal'"):
        build_policy("streaming-sink", {"align": "diagonal"})
    assert build_policy("sliding-window", {"window_tokens": 100}).for_block_size(64).pattern.window_tokens == 100
