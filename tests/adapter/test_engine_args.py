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
