"""Policy settings folded into vLLM's EngineArgs (no engine started)."""

import pytest

from vllm_kvstream.errors import KVStreamConfigError


def test_topk_turns_prefix_caching_off_and_refuses_it_forced(tiny_model):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_kvstream.adapter.engine_args import prepare_engine_args

    def _args(**kw):
        return EngineArgs(model=tiny_model, **kw)

    cfg = {"kv_policy": "topk-importance", "kv_policy_config": {"budget_tokens": 512}}
    args = _args(additional_config=dict(cfg))
    prepare_engine_args(args)
    assert args.enable_prefix_caching is False
    assert args.additional_config["kv_policy_config"]["budget_tokens"] == 512
    with pytest.raises(KVStreamConfigError, match="--enable-prefix-caching is not supported with --kv-policy 'topk-importance'"):
        prepare_engine_args(_args(additional_config=dict(cfg), enable_prefix_caching=True))
    # Other policies keep vLLM's setting.
    args = _args(additional_config={"kv_policy": "streaming-sink"}, enable_prefix_caching=True)
    prepare_engine_args(args)
    assert args.enable_prefix_caching is True


def test_kv_quant_flags_fold_validate_and_normalize(tiny_model):
    import argparse

    from vllm.engine.arg_utils import EngineArgs

    from vllm_kvstream.adapter.engine_args import _add_flags, fold_flags_into_additional_config, prepare_engine_args

    parser = argparse.ArgumentParser()
    _add_flags(parser)
    ns = parser.parse_args(["--kv-quant", "int4", "--kv-quant-config", '{"outlier_channels": 4}'])
    merged = fold_flags_into_additional_config(ns, None)
    assert merged == {"kv_quant": "int4", "kv_quant_config": {"outlier_channels": 4}}
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-quant", "fp8"])  # argparse names the allowed choices
    args = EngineArgs(model=tiny_model, additional_config=merged)
    prepare_engine_args(args)
    assert args.additional_config["kv_policy"] == "full"
    assert args.additional_config["kv_quant_config"] == {"sink_tokens": 4, "outlier_channels": 4, "ema_decay": 0.99, "key_scale": "channel", "key_rope": "pre", "key_range": "auto", "value_levels": "auto"}
    topk = {"kv_policy": "topk-importance", "kv_quant": "int8", "kv_quant_config": {"key_rope": "post"}}
    with pytest.raises(KVStreamConfigError, match="key_rope='post' is not supported with --kv-policy 'topk-importance'; allowed: 'pre'"):
        prepare_engine_args(EngineArgs(model=tiny_model, additional_config=topk))


def test_off_cpu_a_policy_runs_eagerly_and_topk_is_refused(tiny_model, monkeypatch):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_kvstream.adapter import engine_args as ea

    monkeypatch.setattr(ea, "on_cpu", lambda: False)  # what the CUDA platform answers
    args = EngineArgs(model=tiny_model, additional_config={"kv_policy": "streaming-sink"})
    assert not args.enforce_eager
    ea.prepare_engine_args(args)
    assert args.enforce_eager is True
    with pytest.raises(KVStreamConfigError, match=r"--kv-policy 'topk-importance' runs on CPU only in this release; "
                       r"allowed off CPU: full, sliding-window, streaming-sink"):
        ea.prepare_engine_args(EngineArgs(model=tiny_model, additional_config={"kv_policy": "topk-importance"}))
    # On CPU nothing is forced.
    monkeypatch.setattr(ea, "on_cpu", lambda: True)
    args = EngineArgs(model=tiny_model, additional_config={"kv_policy": "streaming-sink"})
    ea.prepare_engine_args(args)
    assert not args.enforce_eager


def _engine_config(model, policy="streaming-sink"):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_kvstream.adapter.plugin import register

    register()  # the wrapped create_engine_config, as in every vLLM process
    cfg = {"kv_policy": policy, "kv_policy_config": {"sink_tokens": 4, "window_tokens": 124}}
    return EngineArgs(model=model, dtype="float32", block_size=32, additional_config=cfg).create_engine_config()


def test_engine_config_says_what_a_policy_does_on_sliding_window_models(caplog):
    import logging

    from vllm_kvstream.models import build_tiny_family

    with caplog.at_level(logging.INFO, logger="vllm_kvstream"):
        _engine_config(str(build_tiny_family("mistral-sliding")))
    assert "every attention layer of this model is sliding-window (64 tokens): vLLM already bounds its KV cache" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vllm_kvstream"):
        _engine_config(str(build_tiny_family("gemma3")))
    assert "1 full-attention layers follow --kv-policy streaming-sink; 5 sliding-window layers (64 tokens)" in caplog.text


def test_engine_config_refuses_longrope_naming_it():
    from vllm_kvstream.models import build_tiny_family

    with pytest.raises(KVStreamConfigError, match="rope_type 'longrope': it switches between short and long factors"):
        _engine_config(str(build_tiny_family("phi3-longrope")))


def test_engine_config_refuses_mla(monkeypatch):
    """A DeepSeek-style MLA model would leave the policy silently inert: refused, named."""
    from types import SimpleNamespace

    from vllm_kvstream.adapter.engine_args import check_engine_config

    config = SimpleNamespace(
        additional_config={"kv_policy": "streaming-sink"},
        model_config=SimpleNamespace(use_mla=True, hf_text_config=SimpleNamespace(rope_parameters={"rope_type": "deepseek_yarn"})),
    )
    with pytest.raises(KVStreamConfigError, match="does not support multi-head latent attention"):
        check_engine_config(config)


def test_engine_config_resolves_block_alignment_for_every_process(tiny_model, caplog):
    import logging

    from vllm.engine.arg_utils import EngineArgs

    from vllm_kvstream.adapter.request_policy import server_limits
    from vllm_kvstream.adapter.state import policy_for
    from vllm_kvstream.request_policy import request_policy

    with caplog.at_level(logging.INFO, logger="vllm_kvstream"):
        config = _engine_config(tiny_model)  # streaming-sink 4+124 at block size 32, align="block" by default
    # Written back into additional_config, which the scheduler and the workers read.
    assert config.additional_config["kv_policy_config"] == {
        "sink_tokens": 32, "window_tokens": 96, "max_stream_tokens": 1 << 20, "align": "token",
    }
    assert "at block size 32 runs as streaming-sink(sink_tokens=32, window_tokens=96" in caplog.text
    policy = policy_for(config.additional_config)
    assert policy.max_blocks_per_request(32, 1, 1 << 40) == 5  # ceil(128 / 32) + 1
    # A request asking align="block" is resolved at the server's block size too.
    mine = request_policy({"kv_policy_config": {"sink_tokens": 4, "window_tokens": 60, "align": "block"}},
                          server_limits(config))
    assert (mine.pattern.sink_tokens, mine.pattern.window_tokens) == (32, 32)
    cfg = {"kv_policy": "streaming-sink", "kv_policy_config": {"sink_tokens": 4, "window_tokens": 124, "align": "token"}}
    kept = EngineArgs(model=tiny_model, dtype="float32", block_size=32, additional_config=cfg).create_engine_config()
    assert kept.additional_config["kv_policy_config"]["sink_tokens"] == 4
