"""``--kv-quant``: quantized KV blocks, the settings (pure; no vLLM import).

The method (KVQuant-style, see ``kernels/kv_quant.py``) combines with every policy: the
policy decides which blocks are kept, the quantization how each kept block is stored. Keys
in vLLM's ``additional_config``::

    {"kv_quant": "int8" | "int4", "kv_quant_config": {"sink_tokens": 4, ...}}

``vllm serve MODEL --kv-quant int4 [--kv-policy streaming-sink]``; without ``--kv-policy``
the policy is ``full`` (every token kept, each block quantized).

Unquantized, a policy's blocks are stored one of two ways (``kv_pages`` in
``additional_config``):

* ``"auto"`` (default): vLLM's own layout where the platform's attention kernel is composed
  (CPU: the stock C++ kernel runs every step that evicts nothing), the plugin's 16-bit pages
  elsewhere (CUDA, where the Triton kernels of ``kernels/kv_quant_triton.py`` serve them);
* ``"paged16"``: the plugin's 16-bit pages on every platform (on CPU: the path CUDA runs,
  through the torch reference), keys before RoPE in the model's float16/bfloat16.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vllm_kvstream.errors import KVStreamConfigError

QUANT_KEY = "kv_quant"
QUANT_PARAMS_KEY = "kv_quant_config"
#: ``--kv-quant`` values and their bit widths.
QUANT_METHODS = {"int8": 8, "int4": 4}
PAGES_KEY = "kv_pages"
#: ``kv_pages`` values (module docstring).
PAGE_MODES = ("auto", "paged16")


class KVQuantConfig(BaseModel):
    """Options of the quantization (``kv_quant_config``); the method is ``kv_quant``."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    sink_tokens: int = Field(4, ge=0, description="tokens at positions < this keep 8-bit keys with their own scale")
    outlier_channels: int = Field(2, ge=0, le=255, description="INT4: key channels per block kept at 8 bits")
    ema_decay: float = Field(0.99, gt=0.0, lt=1.0, description="decay of the online per-channel key absmax")
    # Ablation knobs: the method is channel + pre; the others exist to show what each buys.
    key_scale: Literal["channel", "token"] = Field("channel", description="keys scaled per channel (the method) or per token (naive)")
    key_rope: Literal["pre", "post"] = Field("pre", description="keys quantized before RoPE (the method) or after it")
    key_range: Literal["auto", "asymmetric", "symmetric"] = Field(
        "auto", description="key channels by min and max (a zero point) or +-absmax; auto: asymmetric at int4, symmetric at int8")
    value_levels: Literal["auto", "nf4", "uniform"] = Field(
        "auto", description="value codes on NF4 levels or uniform steps; auto: nf4 at int4, uniform at int8 (nf4 needs int4)")


@dataclass(frozen=True)
class KVQuant:
    """A validated quantization setting (what the worker builds its page layout from)."""

    method: str
    config: KVQuantConfig

    @property
    def bits(self) -> int:
        return QUANT_METHODS[self.method]

    @property
    def key_zero_point(self) -> bool:
        """Keys by channel min and max (``key_range``; ``auto``: at INT4 with channel scales)."""
        r = self.config.key_range
        return r == "asymmetric" or (r == "auto" and self.bits == 4 and self.config.key_scale == "channel")

    @property
    def value_levels(self) -> str:
        v = self.config.value_levels
        return ("nf4" if self.bits == 4 else "uniform") if v == "auto" else v

    def describe(self) -> str:
        c = self.config
        extra = f", {c.outlier_channels} outlier channels" if self.bits == 4 and c.key_scale == "channel" else ""
        keys = "min-max" if self.key_zero_point else "absmax"
        return (
            f"{self.method} (keys per {c.key_scale} ({keys}) {'before' if c.key_rope == 'pre' else 'after'} RoPE, "
            f"values per token ({self.value_levels}), {c.sink_tokens} sink tokens at 8 bits{extra})"
        )

    def normalized(self) -> dict[str, Any]:
        return {QUANT_KEY: self.method, QUANT_PARAMS_KEY: self.config.model_dump()}


def parse_quant(method: Any, params: Any = None) -> KVQuant | None:
    """Validate ``kv_quant`` / ``kv_quant_config`` (``method=None``: not quantized)."""
    if method is None:
        if params is not None and not (isinstance(params, Mapping) and not params):  # only an empty mapping says nothing
            raise KVStreamConfigError(
                f"{QUANT_PARAMS_KEY}={params!r} was given without {QUANT_KEY}; allowed: {', '.join(QUANT_METHODS)}"
            )
        return None
    if not isinstance(method, str) or method not in QUANT_METHODS:
        raise KVStreamConfigError(f"--kv-quant {method!r} is not supported; allowed: {', '.join(QUANT_METHODS)}")
    if params is not None and not isinstance(params, Mapping):
        raise KVStreamConfigError(f"{QUANT_PARAMS_KEY} must be a mapping of option names to values, got {params!r}")
    try:
        config = KVQuantConfig.model_validate(dict(params or {}))
    except ValidationError as exc:
        problems = "; ".join(_describe_error(e) for e in exc.errors())
        allowed = ", ".join(f"{k} ({f.description})" for k, f in KVQuantConfig.model_fields.items())
        raise KVStreamConfigError(f"invalid {QUANT_PARAMS_KEY}: {problems}. Allowed: {allowed}.") from None
    quant = KVQuant(method, config)
    if quant.value_levels == "nf4" and quant.bits != 4:
        raise KVStreamConfigError(f"invalid {QUANT_PARAMS_KEY}: value_levels='nf4' needs --kv-quant int4, got {method!r}; "
                                  "allowed at int8: 'uniform' or 'auto'")
    if quant.key_zero_point and config.key_scale != "channel":
        raise KVStreamConfigError(f"invalid {QUANT_PARAMS_KEY}: key_range='asymmetric' needs key_scale='channel', "
                                  f"got {config.key_scale!r}")
    return quant


def additional_config_mapping(additional_config: Any) -> Mapping[str, Any]:
    """``additional_config`` as the mapping the plugin reads its keys from (``{}``: none given).

    vLLM also accepts an object with ``compute_hash`` (``SupportsHash``) there: it holds no
    plugin keys, so the plugin stays inert. Anything else is refused naming it."""
    if additional_config is None:
        return {}
    if isinstance(additional_config, Mapping):
        return additional_config
    if callable(getattr(additional_config, "compute_hash", None)):
        return {}
    raise KVStreamConfigError(
        f"additional_config must be a JSON object (a mapping) like '{{\"{QUANT_KEY}\": \"int4\"}}', "
        f"got {additional_config!r}"
    )


def _describe_error(err: dict[str, Any]) -> str:
    loc = ".".join(map(str, err["loc"])) if err.get("loc") else None
    if err.get("type") == "extra_forbidden":  # names quoted: a key may be '' or hold a newline
        return f"unknown option {loc!r} (got {err.get('input')!r})"
    if err.get("type") == "invalid_key":
        return f"option name {err.get('input')!r} is not a string"
    return f"{loc or 'value'}: {err['msg']} (got {err.get('input')!r})"


def quant_from_additional_config(additional_config: Mapping[str, Any] | None) -> KVQuant | None:
    additional_config = additional_config_mapping(additional_config)
    if not additional_config:
        return None
    params = additional_config.get(QUANT_PARAMS_KEY)
    if isinstance(params, str):
        from vllm_kvstream.settings import parse_params_json  # settings imports this module

        params = parse_params_json(params, flag="--kv-quant-config")
    return parse_quant(additional_config.get(QUANT_KEY), params)


def pages_from_additional_config(additional_config: Mapping[str, Any] | None) -> str:
    """``kv_pages`` (module docstring), validated against ``kv_quant``: quantized blocks are
    always the plugin's pages, so only ``auto`` goes with ``kv_quant``."""
    additional_config = additional_config_mapping(additional_config)
    mode = additional_config.get(PAGES_KEY, "auto")
    if not isinstance(mode, str) or mode not in PAGE_MODES:
        raise KVStreamConfigError(f"{PAGES_KEY}={mode!r} is not supported; allowed: {', '.join(PAGE_MODES)}")
    if mode != "auto" and additional_config.get(QUANT_KEY) is not None:
        raise KVStreamConfigError(
            f"{PAGES_KEY}={mode!r} with --kv-quant {additional_config[QUANT_KEY]!r}: quantized blocks are the "
            f"plugin's pages already; allowed with --kv-quant: {PAGES_KEY}='auto'"
        )
    return mode
