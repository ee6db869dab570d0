"""RoPE variants under a policy: the fixed rotation read off each vLLM rotary op's own table,
no double ``mscale``, and a clear refusal of the variants that are not fixed rotations."""

import math
from types import SimpleNamespace

import pytest
import torch

from vllm_kvstream.adapter.engine_args import attention_layer_kinds
from vllm_kvstream.adapter.rope import SUPPORTED_ROPE_TYPES, check_rope_config, rope_from_op
from vllm_kvstream.errors import KVStreamConfigError
from vllm_kvstream.kernels import Rope

D = 64


@pytest.fixture(autouse=True)
def _vllm_config():
    """vLLM's custom ops read the current config when built (as inside a model's construction)."""
    from vllm.config import VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig()):
        yield


def _op(rope_type: str, **params):
    """A vLLM rotary op of ``rope_type`` built the way models build it (``get_rope``)."""
    from vllm.model_executor.layers.rotary_embedding import _ROPE_DICT, get_rope

    _ROPE_DICT.clear()
    base = {"rope_theta": 10000.0, "rope_type": rope_type, **params}
    return get_rope(D, 256, is_neox_style=True, rope_parameters=base, dtype=torch.float32)


FIXED = {
    "default": {},
    "linear": {"factor": 2.0},
    "dynamic": {"factor": 2.0},
    "ntk": {"factor": 2.0},
    "llama3": {"factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "yarn": {"factor": 4.0, "original_max_position_embeddings": 64},
    "deepseek_yarn": {"factor": 4.0, "original_max_position_embeddings": 64, "mscale": 1.0, "mscale_all_dim": 0.0},
}


def test_every_supported_type_is_exercised():
    assert set(FIXED) <= set(SUPPORTED_ROPE_TYPES)


@pytest.mark.parametrize("rope_type", list(FIXED))
def test_rope_read_off_the_op_reproduces_its_table(rope_type):
    op = _op(rope_type, **FIXED[rope_type])
    rope = rope_from_op(op)
    table = op._compute_cos_sin_cache().float()
    assert rope.cos_sin_cache.shape == table.shape
    # The fitted frequencies and mscale regenerate the op's whole table (rounding of its float32 angles).
    pos = torch.arange(table.shape[0], dtype=torch.float64)[:, None]
    angles = torch.remainder(pos * rope.inv_freq[None, :], 2 * math.pi)
    regen = torch.cat((angles.cos(), angles.sin()), dim=-1) * rope.mscale
    assert float((regen - table.double()).abs().max()) < 2e-3
    # The plugin's table is unit length (pure rotations); mscale is the op's own.
    mag = torch.hypot(*rope.cos_sin_cache.double().chunk(2, dim=-1))
    assert float((mag - 1).abs().max()) < 1e-5
    assert rope.mscale == pytest.approx(float(getattr(op, "mscale", 1.0)), rel=1e-6)
    if rope_type in ("yarn", "deepseek_yarn") and FIXED[rope_type].get("mscale", 1.0) != 1.0:
        assert rope.mscale > 1.0


def test_plain_rope_frequencies_are_the_ops_float32_values():
    op = _op("default")
    rope = rope_from_op(op)
    assert torch.equal(rope.inv_freq, op._compute_inv_freq(op.base).double())
    assert rope.mscale == 1.0
    assert torch.equal(rope.cos_sin_cache, op._compute_cos_sin_cache().float())


@pytest.mark.parametrize("rope_type", ["yarn", "llama3", "linear"])
def test_moving_a_rotated_key_applies_mscale_once(rope_type):
    """A key the model's op rotated at position p, moved by d with the plugin's rotation, equals
    the op's rotation at p + d: the magnitude factor is not applied a second time."""
    op = _op(rope_type, **FIXED[rope_type])
    rope = rope_from_op(op)
    yarn = _op("yarn", **FIXED["yarn"])
    assert rope_from_op(yarn).mscale == pytest.approx(yarn.mscale) and yarn.mscale > 1.05  # a real mscale
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(5, 2, D, generator=gen)
    p = torch.tensor([0, 3, 17, 40, 100])
    d = torch.tensor([7, 1, 30, 100, 150])
    q_dummy = torch.zeros(5, 2 * D)

    def model_op(positions, x):
        _, key = op.forward_native(positions, q_dummy.clone(), x.reshape(5, -1).clone())
        return key.view(5, 2, D)

    moved = rope.rotate(model_op(p, k), d)
    assert torch.allclose(moved, model_op(p + d, k), atol=2e-4)
    # Applying the table with its magnitude (the bug this guards against) is off by mscale.
    if rope.mscale != 1.0:
        doubled = moved * rope.mscale
        assert not torch.allclose(doubled, model_op(p + d, k), atol=1e-2)


def test_fit_refuses_a_table_that_is_not_one_fixed_rotation():
    plain = Rope.from_base(D, 10000.0, 512)
    two_tables = torch.cat((plain.cos_sin_cache[:256], Rope.from_base(D, 500.0, 256).cos_sin_cache))
    with pytest.raises(ValueError, match="not a fixed rotation"):
        Rope.from_table(two_tables, D, True)
    growing = plain.cos_sin_cache * torch.linspace(1, 2, 512)[:, None]
    with pytest.raises(ValueError, match="magnitude varies"):
        Rope.from_table(growing, D, True)


@pytest.fixture(params=["stock class", "plugin override"])
def registered(request):
    """Both ways an op is built: vLLM's class, or (plugin registered, as in every engine
    process) the plugin's override of it, which must still be named as vLLM's class."""
    if request.param == "plugin override":
        from vllm_kvstream.adapter.plugin import register

        register()
    return request.param


def test_two_factor_linear_op_is_refused_naming_it(registered):
    """LinearScalingRotaryEmbedding with several factors concatenates tables (per LoRA): no fixed rotation."""
    from vllm.model_executor.layers.rotary_embedding import LinearScalingRotaryEmbedding

    op = LinearScalingRotaryEmbedding(D, D, 128, 10000.0, True, [1.0, 2.0], torch.float32)
    with pytest.raises(KVStreamConfigError, match="LinearScalingRotaryEmbedding.*not a fixed rotation.*supported rope types"):
        rope_from_op(op)


def test_mrope_op_is_refused_naming_it(registered):
    from vllm.model_executor.layers.rotary_embedding import MRotaryEmbedding

    op = MRotaryEmbedding(D, D, 256, 10000.0, True, torch.float32, mrope_section=[8, 12, 12])
    with pytest.raises(KVStreamConfigError, match="MRotaryEmbedding.*'mrope'"):
        rope_from_op(op)


@pytest.mark.parametrize(
    "params, named",
    [
        ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}, "'longrope'"),
        ({"rope_type": "su"}, "'su'"),
        ({"rope_type": "default", "mrope_section": [8, 12, 12]}, "'default with mrope_section'"),
        ({"rope_type": "yarn", "mrope_section": [8, 12, 12]}, "'yarn with mrope_section'"),
        ({"rope_type": "proportional"}, "'proportional'"),
        ({"full_attention": {"rope_type": "longrope"}, "sliding_attention": {"rope_type": "default"}}, "'longrope'"),
    ],
)
def test_config_refusal_names_the_rope_type_and_the_supported_ones(params, named):
    config = SimpleNamespace(rope_parameters=params)
    with pytest.raises(KVStreamConfigError, match=f"rope_type {named}.*supported rope types: default, linear"):
        check_rope_config(config)


def test_config_refusal_of_dual_chunk_attention():
    config = SimpleNamespace(rope_parameters={"rope_type": "default"}, dual_chunk_attention_config={"chunk_size": 8})
    with pytest.raises(KVStreamConfigError, match="dual-chunk"):
        check_rope_config(config)


@pytest.mark.parametrize("rope_type", list(FIXED))
def test_config_accepts_fixed_rotations(rope_type):
    check_rope_config(SimpleNamespace(rope_parameters={"rope_type": rope_type, **FIXED[rope_type]}))
    check_rope_config(SimpleNamespace(rope_scaling=None))


def test_attention_layer_kinds():
    gemma3 = SimpleNamespace(num_hidden_layers=6, sliding_window=512, layer_types=["sliding_attention"] * 5 + ["full_attention"])
    assert attention_layer_kinds(gemma3) == (1, 5, 512)
    mistral = SimpleNamespace(num_hidden_layers=4, sliding_window=4096)
    assert attention_layer_kinds(mistral) == (0, 4, 4096)
    llama = SimpleNamespace(num_hidden_layers=4, sliding_window=None)
    assert attention_layer_kinds(llama) == (4, 0, None)
    qwen = SimpleNamespace(num_hidden_layers=2, sliding_window=4096, layer_types=["full_attention"] * 2)
    assert attention_layer_kinds(qwen) == (2, 0, None)


def test_overrides_cover_fixed_rotations_only_and_are_stock_without_a_policy():
    from vllm.model_executor.custom_op import op_registry_oot
    from vllm.model_executor.layers.rotary_embedding import YaRNScalingRotaryEmbedding

    from vllm_kvstream.adapter.plugin import register

    register()
    for name in ("RotaryEmbedding", "Llama3RotaryEmbedding", "YaRNScalingRotaryEmbedding", "DeepseekScalingRotaryEmbedding"):
        assert name in op_registry_oot
    for name in ("MRotaryEmbedding", "Llama4VisionRotaryEmbedding", "Gemma4RotaryEmbedding", "FourierRotaryEmbedding"):
        assert name not in op_registry_oot  # their forward signatures differ: left exactly vLLM's
    op = _op("yarn", **FIXED["yarn"])
    assert type(op).__name__ == "KVStreamYaRNScalingRotaryEmbedding" and op.kvstream_rope is None
    plain = object.__new__(YaRNScalingRotaryEmbedding)  # vLLM's own class, bypassing the override
    YaRNScalingRotaryEmbedding.__init__(plain, D, D, 64, 10000.0, True, 4.0, torch.float32)
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(6, 2 * D, generator=gen), torch.randn(6, 2 * D, generator=gen)
    pos = torch.tensor([0, 1, 5, 60, 100, 255])
    got = op.forward_native(pos, q.clone(), k.clone())
    want = plain.forward_native(pos, q.clone(), k.clone())
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_long_tables_are_fitted_from_a_sample_and_still_checked():
    """Llama-3.1-sized tables (131072 rows) are read at a sample of rows: the frequencies are
    still the op's float32 values, and a tail that is another rotation is still refused."""
    long = Rope.from_base(128, 500000.0, 131072)
    fitted = Rope.from_table(long.cos_sin_cache, 128, True)
    assert torch.equal(fitted.inv_freq, long.inv_freq) and torch.equal(fitted.cos_sin_cache, long.cos_sin_cache)
    tail = long.cos_sin_cache.clone()
    tail[100_000:] = Rope.from_base(128, 10000.0, 131072).cos_sin_cache[100_000:]
    with pytest.raises(ValueError, match="not a fixed rotation"):
        Rope.from_table(tail, 128, True)
