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
    assert q.normalized() == {"kv_quant": "int4", "kv_quant_config": {"sink_tokens": 4, "outlier_channels": 2, "ema_decay": 0.99, "key_scale": "channel", "key_rope": "pre", "key_range": "auto", "value_levels": "auto"}}
    # auto: INT4 spends its codes where the data is; INT8 stays symmetric and uniform.
    assert q.key_zero_point and q.value_levels == "nf4"
    q8 = parse_quant("int8")
    assert not q8.key_zero_point and q8.value_levels == "uniform"
    sym = parse_quant("int4", {"key_range": "symmetric", "value_levels": "uniform"})
    assert not sym.key_zero_point and sym.value_levels == "uniform"
    assert parse_quant("int8", {"key_range": "asymmetric"}).key_zero_point


@pytest.mark.parametrize(
    ("method", "params", "needle"),
    [
        ("int3", None, "--kv-quant 'int3' is not supported; allowed: int8, int4"),
        ("int8", {"sinks": 4}, "sinks"),
        ("int8", {"sink_tokens": -1}, "sink_tokens"),
        ("int4", {"ema_decay": 1.5}, "ema_decay"),
        (None, {"sink_tokens": 4}, "was given without kv_quant; allowed: int8, int4"),
        ("int8", {"value_levels": "nf4"}, "value_levels='nf4' needs --kv-quant int4, got 'int8'; allowed at int8: 'uniform' or 'auto'"),
        ("int4", {"key_range": "asymmetric", "key_scale": "token"}, "key_range='asymmetric' needs key_scale='channel'"),
        ("int4", {"key_range": "minmax"}, "key_range"),
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
    assert "keys per token (absmax) after RoPE" in q.describe() and "outlier" not in q.describe()
    with pytest.raises(KVStreamConfigError, match="key_rope"):
        parse_quant("int4", {"key_rope": "before"})


def test_kv_pages_setting_validated_against_kv_quant():
    from vllm_kvstream.quant import PAGE_MODES, pages_from_additional_config

    assert pages_from_additional_config(None) == "auto"
    assert pages_from_additional_config({"kv_policy": "full"}) == "auto"
    assert pages_from_additional_config({"kv_pages": "paged16"}) == "paged16"
    assert pages_from_additional_config({"kv_pages": "auto", "kv_quant": "int8"}) == "auto"
    with pytest.raises(KVStreamConfigError, match=r"kv_pages='fp8' is not supported; allowed: auto, paged16"):
        pages_from_additional_config({"kv_pages": "fp8"})
    with pytest.raises(KVStreamConfigError, match=r"kv_pages='paged16' with --kv-quant 'int4'.*allowed with --kv-quant: kv_pages='auto'"):
        pages_from_additional_config({"kv_pages": "paged16", "kv_quant": "int4"})
    assert PAGE_MODES == ("auto", "paged16")
