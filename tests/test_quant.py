"""``--kv-quant`` settings (pure: no vLLM)."""

import pytest

from vllm_kvstream.errors import KVStreamConfigError
from vllm_kvstream.quant import parse_quant, quant_from_additional_config
from vllm_kvstream.settings import policy_from_additional_config


def test_methods_and_defaults():
    q = parse_quant("int4")
    assert q.bits == 4 and q.config.sink_tokens == 4 and q.config.outlier_channels == 2
    assert parse_quant("int8").bits == 8
    assert parse_quant(None) is None
    assert q.normalized() == {"kv_quant": "int4", "kv_quant_config": {"sink_tokens": 4, "outlier_channels": 2, "ema_decay": 0.99, "key_scale": "channel", "key_rope": "pre"}}


@pytest.mark.parametrize(
    ("method", "params", "needle"),
    [
        ("int3", None, "--kv-quant 'int3' is not supported; allowed: int8, int4"),
        ("int8", {"sinks": 4}, "sinks"),
        ("int8", {"sink_tokens": -1}, "sink_tokens"),
        ("int4", {"ema_decay": 1.5}, "ema_decay"),
        (None, {"sink_tokens": 4}, "was given without kv_quant; allowed: int8, int4"),
    ],
)
def test_bad_input_names_value_and_allowed(method, params, needle):
    with pytest.raises(KVStreamConfigError, match=needle.replace("(", r"\(")):
        parse_quant(method, params)


def test_quant_alone_means_policy_full_and_json_string_config():
    cfg = {"kv_quant": "int8", "kv_quant_config": '{"outlier_channels": 0}'}
    assert policy_from_additional_config(cfg).name == "full"
    assert quant_from_additional_config(cfg).config.outlier_channels == 0
    assert policy_from_additional_config({"kv_quant": "int4", "kv_policy": "streaming-sink"}).name == "streaming-sink"


def test_ablation_knobs_validated():
    q = parse_quant("int4", {"key_scale": "token", "key_rope": "post"})
    assert "keys per token after RoPE" in q.describe() and "outlier" not in q.describe()
    with pytest.raises(KVStreamConfigError, match="key_rope"):
        parse_quant("int4", {"key_rope": "before"})
