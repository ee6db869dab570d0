"""``--kv-policy`` / ``--kv-policy-config`` on stock ``vllm serve``, and the one place where the
policy settings are validated (building the engine config).

Monkeypatches, written down:

* ``EngineArgs.add_cli_args`` is wrapped to add the flags (``--kv-policy``,
  ``--kv-policy-config``, ``--kv-quant``, ``--kv-quant-config``) (the plugin is loaded before
  ``vllm serve`` builds its parser). Removable when vLLM offers plugin CLI arguments.
* ``EngineArgs.from_cli_args`` is wrapped to fold the flags into ``additional_config``, the
  channel vLLM already carries to every process. Bad values end the command with a one-line
  error naming the value and what is allowed.
* ``EngineArgs.create_engine_config`` is wrapped to validate the settings (offline ``LLM``
  and ``vllm serve`` both pass here, before any engine process starts), write them back
  normalized, and size the engine for streaming: a bounded policy raises ``max_model_len``
  to the policy's ``max_stream_tokens`` (unless the user set one) so that length is not what
  stops a stream, and allows it past the model's trained length (safe: positions inside the
  cache never exceed sink + window). After vLLM's own checks it verifies the policy against
  the block size and the model's trained context. Removable when vLLM lets a KV-cache spec
  declare that it bounds positions (and so ``max_model_len``). The same wrapper starts the
  engine's plugin metrics (``adapter/metrics.py``), once its config is known. Off CPU (vLLM
  0.33, CUDA) it also sets ``enforce_eager``: the plugin's rotary op decides per step whether
  positions run past the model's table (``adapter/rope.py``), a data-dependent branch that
  neither ``torch.compile(fullgraph=True)`` nor a captured CUDA graph can hold. Removable
  with the rotary op change named in ``rope.py``.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping

from vllm_kvstream.adapter.compat import on_cpu, probe
from vllm_kvstream.errors import KVStreamConfigError
from vllm_kvstream.policies import available_policies
from vllm_kvstream.quant import (
    QUANT_KEY,
    QUANT_METHODS,
    QUANT_PARAMS_KEY,
    additional_config_mapping,
    pages_from_additional_config,
    quant_from_additional_config,
)
from vllm_kvstream.settings import PARAMS_KEY, POLICY_KEY, normalized, parse_params_json, policy_from_additional_config

logger = logging.getLogger(__name__)

_FLAG_DEST_POLICY = "kv_policy"
_FLAG_DEST_PARAMS = "kv_policy_config"
_FLAG_DEST_QUANT = "kv_quant"
_FLAG_DEST_QUANT_PARAMS = "kv_quant_config"


def _add_flags(parser) -> None:
    if any(_FLAG_DEST_POLICY == getattr(a, "dest", None) for a in parser._actions):
        return
    group = parser.add_argument_group(
        "vllm-kvstream", "Bounded-memory streaming KV-cache policies (vllm-kvstream plugin)."
    )
    names = available_policies()
    group.add_argument(
        "--kv-policy",
        dest=_FLAG_DEST_POLICY,
        default=None,
        choices=names,
        help=f"KV-cache policy: {', '.join(names)}. Without it the plugin is inert.",
    )
    group.add_argument(
        "--kv-policy-config",
        dest=_FLAG_DEST_PARAMS,
        default=None,
        type=str,
        help='Policy parameters as JSON, e.g. \'{"sink_tokens": 4, "window_tokens": 1020}\'.',
    )
    group.add_argument(
        "--kv-quant",
        dest=_FLAG_DEST_QUANT,
        default=None,
        choices=list(QUANT_METHODS),
        help="Store KV blocks quantized (KVQuant-style, keys per channel before RoPE): "
        f"{', '.join(QUANT_METHODS)}. Combines with any --kv-policy (default: full).",
    )
    group.add_argument(
        "--kv-quant-config",
        dest=_FLAG_DEST_QUANT_PARAMS,
        default=None,
        type=str,
        help='Quantization options as JSON, e.g. \'{"sink_tokens": 4, "outlier_channels": 2, "ema_decay": 0.99}\'.',
    )


def fold_flags_into_additional_config(args: argparse.Namespace, additional_config: dict | None) -> dict:
    """The engine's ``additional_config`` with the two flags merged in (flags win)."""
    if additional_config is not None and not isinstance(additional_config, Mapping):
        additional_config_mapping(additional_config)  # refuses all but vLLM's own SupportsHash objects
        dests = (_FLAG_DEST_POLICY, _FLAG_DEST_PARAMS, _FLAG_DEST_QUANT, _FLAG_DEST_QUANT_PARAMS)
        if all(getattr(args, d, None) is None for d in dests):
            return additional_config  # no flag of the plugin: it stays inert
        raise KVStreamConfigError(
            f"the --kv-* flags need --additional-config to be a JSON object, got {additional_config!r}"
        )
    merged = dict(additional_config or {})
    policy = getattr(args, _FLAG_DEST_POLICY, None)
    params = getattr(args, _FLAG_DEST_PARAMS, None)
    if policy is not None:
        merged[POLICY_KEY] = policy
    if params is not None:
        merged[PARAMS_KEY] = parse_params_json(params)
    quant = getattr(args, _FLAG_DEST_QUANT, None)
    quant_params = getattr(args, _FLAG_DEST_QUANT_PARAMS, None)
    if quant is not None:
        merged[QUANT_KEY] = quant
    if quant_params is not None:
        merged[QUANT_PARAMS_KEY] = parse_params_json(quant_params, flag="--kv-quant-config")
    return merged


def prepare_engine_args(engine_args) -> None:
    """Validate and normalize the policy settings on ``engine_args`` and size the engine for
    streaming. Raises :class:`KVStreamConfigError`."""
    policy = policy_from_additional_config(engine_args.additional_config)
    quant = quant_from_additional_config(engine_args.additional_config)
    pages_from_additional_config(engine_args.additional_config)
    from vllm_kvstream.adapter.attention import clear_backend_cache
    from vllm_kvstream.adapter.rope import forget_recorded_ropes
    from vllm_kvstream.adapter.state import forget_engine_config

    clear_backend_cache()
    forget_recorded_ropes()
    forget_engine_config()
    _forget_cached_ropes()
    if policy is None:
        return
    engine_args.additional_config = {**engine_args.additional_config, **normalized(policy)}
    if quant is not None:
        if policy.selects_blocks and quant.config.key_rope != "pre":
            raise KVStreamConfigError(
                f"kv_quant_config key_rope={quant.config.key_rope!r} is not supported with --kv-policy "
                f"{policy.name!r}; allowed: 'pre'"
            )
        engine_args.additional_config.update(quant.normalized())
    if engine_args.kv_cache_dtype not in (None, "auto"):
        raise KVStreamConfigError(
            f"--kv-cache-dtype {engine_args.kv_cache_dtype!r} is not supported with --kv-policy "
            f"{policy.name!r}; allowed: auto"
        )
    if policy.selects_blocks:
        # The worker rewrites block contents in place (see adapter/selection.py): a block's
        # hash would no longer describe it, so no block of such a policy may be shared.
        if engine_args.enable_prefix_caching:
            raise KVStreamConfigError(
                f"--enable-prefix-caching is not supported with --kv-policy {policy.name!r} "
                "(it rewrites KV blocks in place); allowed: --no-enable-prefix-caching"
            )
        engine_args.enable_prefix_caching = False
    cpu = on_cpu()
    if policy.selects_blocks and not cpu:
        # Its selection store (adapter/selection.py, kernels/topk_attention.py) builds index
        # tensors on the host and has only run on CPU; refused rather than run untested.
        raise KVStreamConfigError(
            f"--kv-policy {policy.name!r} runs on CPU only in this release; allowed off CPU: "
            f"{', '.join(n for n in available_policies() if n != policy.name)}"
        )
    if not cpu and not engine_args.enforce_eager:  # see the module docstring
        logger.warning("vllm-kvstream: --kv-policy %s runs eagerly off CPU (enforce_eager=True): its rotary "
                       "op branches on positions per step, which compiled graphs cannot hold", policy.name)
        engine_args.enforce_eager = True
    if policy.bounded:
        os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
        if engine_args.max_model_len is None:
            engine_args.max_model_len = policy.max_stream_tokens
    logger.info("vllm-kvstream: KV policy %s%s", policy.describe(), f", KV blocks {quant.describe()}" if quant else "")


def attention_layer_kinds(hf_config) -> tuple[int, int, int | None]:
    """``(full, sliding, window)``: how many attention layers of a (text) config attend fully and
    how many through the model's own sliding window, as vLLM builds them (``layer_types``, else
    ``sliding_window`` on every layer, as Mistral)."""
    layers = int(getattr(hf_config, "num_hidden_layers", 0) or 0)
    window = getattr(hf_config, "sliding_window", None)
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types:
        sliding = sum(t == "sliding_attention" for t in layer_types)
        return len(layer_types) - sliding, sliding, window if sliding else None
    if window is not None:
        return 0, layers, window
    return layers, 0, None


def check_engine_config(vllm_config) -> None:
    policy = policy_from_additional_config(vllm_config.additional_config)
    if policy is None:
        return
    hf = vllm_config.model_config.hf_text_config
    from vllm_kvstream.adapter.rope import check_rope_config

    check_rope_config(hf)  # before the model is built: a RoPE the policy cannot serve is refused here
    if getattr(vllm_config.model_config, "use_mla", False):
        # MLA layers (DeepSeek-V2/V3) keep a latent cache the plugin's backends do not read:
        # the policy would be silently inert, so it is refused.
        raise KVStreamConfigError(
            f"--kv-policy {policy.name!r} does not support multi-head latent attention (MLA, "
            f"{type(hf).__name__}); supported: models with ordinary multi-head / grouped-query attention"
        )
    full, sliding, window = attention_layer_kinds(hf)
    if sliding and not full:
        logger.warning(
            "vllm-kvstream: every attention layer of this model is sliding-window (%d tokens): vLLM already "
            "bounds its KV cache, so --kv-policy %s leaves KV management and attention to vLLM (stock); the "
            "plugin only computes RoPE exactly past the trained context", window, policy.name,
        )
    elif sliding:
        logger.info(
            "vllm-kvstream: %d full-attention layers follow --kv-policy %s; %d sliding-window layers (%d tokens) "
            "keep vLLM's own sliding window", full, policy.name, sliding, window,
        )
    trained = getattr(hf, "max_position_embeddings", None)
    block_size = vllm_config.cache_config.block_size
    policy.check_engine_fit(block_size=block_size, trained_context=trained)  # the numbers as given
    resolved = policy.for_block_size(block_size)  # streaming-sink's align="block" (policies/streaming_sink.py)
    if resolved is not policy:
        # Written back into additional_config, which every process of the engine reads its
        # policy from: the scheduler, the workers and the per-request checks all see the
        # token-exact pattern the block size gave.
        vllm_config.additional_config[PARAMS_KEY] = resolved.config.model_dump()
        logger.info("vllm-kvstream: %s at block size %d runs as %s", policy.describe(), block_size, resolved.describe())
        resolved.check_engine_fit(block_size=block_size, trained_context=trained)
    from vllm_kvstream.adapter.kv_manager import page_layout

    page_layout(  # raises naming the bad value (block or head size, a float32 model in 16-bit pages)
        quant_from_additional_config(vllm_config.additional_config),
        pages_from_additional_config(vllm_config.additional_config),
        vllm_config.model_config.get_head_size(), block_size, vllm_config.model_config.dtype, cpu=on_cpu(),
    )


def _forget_cached_ropes() -> None:
    # get_rope() caches rotary ops per process, keyed without the policy: a process that
    # builds a second engine must not reuse a policy rotary op for a stock engine or vice versa.
    rope_mod = probe("vllm.model_executor.layers.rotary_embedding")
    cache = getattr(rope_mod, "_ROPE_DICT", None)
    if isinstance(cache, dict):
        cache.clear()


def patch_engine_args() -> None:
    """Install the three wrappers (idempotent)."""
    EngineArgs = probe("vllm.engine.arg_utils:EngineArgs")
    if getattr(EngineArgs, "__kvstream_patched__", False):
        return

    orig_add = EngineArgs.add_cli_args
    orig_from = EngineArgs.from_cli_args.__func__
    orig_create = EngineArgs.create_engine_config

    def add_cli_args(parser, *args, **kwargs):
        parser = orig_add(parser, *args, **kwargs)
        _add_flags(parser)
        return parser

    def from_cli_args(cls, args):
        engine_args = orig_from(cls, args)
        try:
            engine_args.additional_config = fold_flags_into_additional_config(args, engine_args.additional_config)
            policy_from_additional_config(engine_args.additional_config)
            quant_from_additional_config(engine_args.additional_config)
            pages_from_additional_config(engine_args.additional_config)
        except KVStreamConfigError as exc:
            raise SystemExit(f"vllm-kvstream: error: {exc}") from None
        return engine_args

    def create_engine_config(self, *args, **kwargs):
        prepare_engine_args(self)
        vllm_config = orig_create(self, *args, **kwargs)
        check_engine_config(vllm_config)
        from vllm_kvstream.adapter.metrics import start_engine_metrics
        from vllm_kvstream.adapter.request_policy import remember_server

        remember_server(vllm_config)  # the OpenAI server checks per-request policies against it

        start_engine_metrics(
            vllm_config,
            policy_from_additional_config(vllm_config.additional_config),
            quant_from_additional_config(vllm_config.additional_config),
        )
        return vllm_config

    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)
    EngineArgs.create_engine_config = create_engine_config
    EngineArgs.__kvstream_patched__ = True
