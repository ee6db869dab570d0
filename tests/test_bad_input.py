"""Bad input everywhere, property-based (hypothesis): the policy and quantization settings
(``additional_config``, its JSON strings), the registry, the plugin's ``vllm serve`` flags
through vLLM's own parser, and the ``vllm-kvstream eval`` / ``compare`` options.

Every property has the same shape: either the input is valid, and then what comes back is
exactly what was asked for (no value coerced, nothing dropped, ``normalized`` round-trips),
or it ends in the one error type of that layer (``KVStreamConfigError``; argparse's exit 2;
the CLI's one-line ``vllm-kvstream: error:`` and exit 2) whose message names the bad value
(or its key) and what is allowed. Any other exception escaping fails the test.

No engine runs here; the vLLM parser tests import vLLM once per module (slow, ~10 s).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import re
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vllm_kvstream import cli
from vllm_kvstream.adapter.engine_args import fold_flags_into_additional_config  # imports no vLLM
from vllm_kvstream.compare import plan_serve_runs
from vllm_kvstream.errors import KVStreamConfigError
from vllm_kvstream.eval.ppl import Cache, plan_runs
from vllm_kvstream.models import TINY_FAMILIES
from vllm_kvstream.policies import available_policies, build_policy, get_policy_class
from vllm_kvstream.quant import (
    PAGE_MODES,
    QUANT_METHODS,
    KVQuantConfig,
    pages_from_additional_config,
    parse_quant,
    quant_from_additional_config,
)
from vllm_kvstream.settings import normalized, parse_params_json, policy_from_additional_config

#: What a refusal says about what is allowed.
ALLOWED = re.compile(r"allowed|must be|needs", re.IGNORECASE)
POLICIES = available_policies()
PARAM_KEYS = sorted({k for n in POLICIES for k in get_policy_class(n).config_model.model_fields})
QUANT_KEYS = sorted(KVQuantConfig.model_fields)
LITERALS = ["attention", "key-norm", "channel", "token", "pre", "post", "auto", "asymmetric", "symmetric", "nf4",
            "uniform", "int4", "int8", "full", "streaming-sink", "4", "", " "]
NAN, INF = float("nan"), float("inf")

# --- strategies: JSON-like values of every type -------------------------------------------

huge_ints = st.sampled_from([2**31 - 1, 2**31, 2**63, 2**64, 10**40, -(2**63), -1, 0])
ints = st.integers(min_value=-3, max_value=5000) | st.integers() | huge_ints
floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([NAN, INF, -INF, 0.0, -0.0, 0.5, 0.99, 1.0,
                                                                           1.5, 4.0, 1e-320])
scalars = st.none() | st.booleans() | ints | floats | st.text(max_size=10) | st.sampled_from(LITERALS)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
param_keys = st.sampled_from(PARAM_KEYS) | st.text(max_size=10)
param_dicts = st.dictionaries(param_keys, json_values, max_size=4)
quant_dicts = st.dictionaries(st.sampled_from(QUANT_KEYS) | st.text(max_size=10), json_values, max_size=4)
#: Python dicts vLLM would never build from JSON, but LLM(additional_config=...) may get.
odd_key_dicts = st.dictionaries(st.integers() | st.none() | st.booleans(), json_values, min_size=1, max_size=2)
garbage_text = st.text(max_size=30) | st.sampled_from([
    "", " ", "{", "[", "}", "null", "NaN", "Infinity", "-Infinity", "1" * 5000, "[" * 50_000, '{"a": ' * 3000,
    "{}", "[]", '"x"', "4", "true", '{"sink_tokens": 4, "sink_tokens": 5}', '{"a": {"b": 1, "b": 2}}',
    '{"sink_tokens": ' + "9" * 5000 + "}", "{'sink_tokens': 4}", '{"sink_tokens": 4,}',
])


def json_text(dicts):
    """A dict as JSON text (``NaN`` / ``Infinity`` as Python's json writes them), or garbage."""
    return dicts.map(json.dumps) | garbage_text


policy_names = st.sampled_from(POLICIES) | st.text(max_size=16) | json_values
policy_configs = st.none() | param_dicts | json_text(param_dicts) | json_values | odd_key_dicts
quant_methods = st.none() | st.sampled_from(list(QUANT_METHODS)) | st.text(max_size=6) | json_values
quant_configs = st.none() | quant_dicts | json_text(quant_dicts) | json_values | odd_key_dicts
pages_values = st.sampled_from(list(PAGE_MODES)) | st.text(max_size=8) | json_values


@st.composite
def additional_configs(draw):
    """``additional_config`` as vLLM hands it over: mostly a dict with any of the plugin's keys,
    sometimes no mapping at all."""
    if draw(st.integers(0, 19)) == 0:
        return draw(json_values | st.text(max_size=10))
    cfg = {}
    for key, values in (("kv_policy", policy_names), ("kv_policy_config", policy_configs),
                        ("kv_quant", quant_methods), ("kv_quant_config", quant_configs), ("kv_pages", pages_values)):
        if draw(st.booleans()):
            cfg[key] = draw(values)
    if draw(st.booleans()):
        cfg[draw(st.text(max_size=8))] = draw(json_values)  # another plugin's key: never the plugin's business
    return cfg


# --- helpers --------------------------------------------------------------------------------


def _parsed(value):
    """``value`` as the settings read it: JSON text decoded (what the code would see)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except (ValueError, RecursionError):
            return value
    return value


def _entries(value) -> list[str]:
    """How a message may name the bad part of ``value``: its repr, or one entry (key, value)
    in the forms the validators write (``key=value``, ``unknown parameter 'key'``,
    ``key: ... (got value)``)."""
    out = [repr(value)]
    value = _parsed(value)
    out.append(repr(value))
    if isinstance(value, dict):
        for k, v in value.items():
            out += [f"unknown parameter {k!r}", f"{k}={v!r}", f"(got {v!r})", f"parameter name {k!r}",
                    f"unknown option {k!r}", f"option name {k!r}"]
    return out


def _assert_clear(exc: BaseException, *candidates: str) -> None:
    """One line, naming one of ``candidates`` (the bad value or key) and what is allowed."""
    msg = str(exc)
    assert "\n" not in msg, msg
    assert ALLOWED.search(msg), f"says nothing about what is allowed: {msg}"
    assert any(c and c in msg for c in candidates), f"names none of {candidates[:6]}...: {msg[:2000]}"


def _assert_same_config(config, params) -> None:
    """Nothing the caller gave was coerced or dropped."""
    dumped = config.model_dump()
    for key, value in (_parsed(params) or {}).items():
        assert key in dumped, key
        assert dumped[key] == value and type(dumped[key]) in (type(value), float), (key, value, dumped[key])


# --- 1. settings: policy_from_additional_config / parse_params_json / normalized -------------


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=additional_configs())
@example(cfg={"kv_policy": "streaming-sink", "kv_policy_config": "1" * 5000})
@example(cfg={"kv_policy": "streaming-sink", "kv_policy_config": "[" * 50_000})
@example(cfg={"kv_policy": "streaming-sink", "kv_policy_config": '{"sink_tokens": 4, "sink_tokens": 8}'})
@example(cfg={"kv_policy": "streaming-sink", "kv_policy_config": {"max_stream_tokens": 10**40}})
@example(cfg={"kv_policy": "topk-importance", "kv_policy_config": {"decay": NAN}})
@example(cfg={"kv_policy": "sliding-window", "kv_policy_config": {"window_tokens": True}})
@example(cfg={"kv_quant": ["int4"]})
@example(cfg={"kv_quant_config": 0})
@example(cfg=["kv_policy"])
@example(cfg="streaming-sink")
def test_additional_config_is_valid_or_refused_naming_it(cfg):
    try:
        policy = policy_from_additional_config(cfg)
    except KVStreamConfigError as exc:
        if not isinstance(cfg, dict):
            _assert_clear(exc, repr(cfg))
        else:
            _assert_clear(exc, *_entries(cfg.get("kv_policy")), *_entries(cfg.get("kv_policy_config")))
        return
    if cfg is None:
        assert policy is None
        return
    assert isinstance(cfg, dict)
    if policy is None:  # inert: nothing of the plugin's was asked for, so nothing was dropped
        assert cfg.get("kv_policy") is None and cfg.get("kv_policy_config") is None and cfg.get("kv_quant") is None
        return
    assert policy.name == (cfg.get("kv_policy") or "full")
    _assert_same_config(policy.config, cfg.get("kv_policy_config"))
    # What the engine process writes back is what the workers read: the same policy, also
    # through JSON (vLLM hashes and ships additional_config as JSON).
    again = policy_from_additional_config(json.loads(json.dumps(normalized(policy))))
    assert (again.name, again.config) == (policy.name, policy.config)
    assert normalized(again) == normalized(policy)


@settings(max_examples=300, deadline=None)
@given(text=json_text(param_dicts | st.dictionaries(st.text(max_size=4), json_values, max_size=3)), flag=st.sampled_from(
    ["--kv-policy-config", "--kv-quant-config"]))
def test_parse_params_json_returns_the_object_or_names_the_text(text, flag):
    try:
        value = parse_params_json(text, flag=flag)
    except KVStreamConfigError as exc:
        _assert_clear(exc, repr(text))
        assert flag in str(exc)
        return
    assert isinstance(value, dict)
    assert value == json.loads(text) or "NaN" in text  # NaN != NaN


@settings(max_examples=50, deadline=None)
@given(value=json_values.filter(lambda v: not isinstance(v, str)))
def test_parse_params_json_refuses_what_is_not_text(value):
    with pytest.raises(KVStreamConfigError) as err:
        parse_params_json(value)
    _assert_clear(err.value, repr(value))


# --- 2. quant: quant_from_additional_config / parse_quant / pages_from_additional_config ----


@settings(max_examples=400, deadline=None)
@given(cfg=additional_configs())
@example(cfg={"kv_quant": {"a": 1}})
@example(cfg={"kv_quant": "int4", "kv_quant_config": "[" * 50_000})
@example(cfg={"kv_quant": "int4", "kv_quant_config": "1" * 5000})
@example(cfg={"kv_quant_config": "[]"})
@example(cfg={"kv_quant": "int8", "kv_quant_config": {"ema_decay": 1}})
def test_quant_settings_are_valid_or_refused_naming_them(cfg):
    try:
        quant = quant_from_additional_config(cfg)
    except KVStreamConfigError as exc:
        if not isinstance(cfg, dict):
            _assert_clear(exc, repr(cfg))
        else:
            _assert_clear(exc, *_entries(cfg.get("kv_quant")), *_entries(cfg.get("kv_quant_config")))
        return
    if cfg is None:
        assert quant is None
        return
    assert isinstance(cfg, dict)
    if quant is None:  # not quantized: no option was given that would be dropped
        assert cfg.get("kv_quant") is None
        assert _parsed(cfg.get("kv_quant_config")) in (None, {})
        return
    assert quant.method == cfg["kv_quant"]
    _assert_same_config(quant.config, cfg.get("kv_quant_config"))
    again = quant_from_additional_config(json.loads(json.dumps(quant.normalized())))
    assert again == quant


@settings(max_examples=300, deadline=None)
@given(method=quant_methods, params=quant_configs)
def test_parse_quant_direct(method, params):
    try:
        quant = parse_quant(method, params)
    except KVStreamConfigError as exc:
        _assert_clear(exc, *_entries(method), *_entries(params))
        return
    if quant is None:
        assert method is None and params in (None, {})
    else:
        assert quant.method == method
        _assert_same_config(quant.config, params)


@settings(max_examples=200, deadline=None)
@given(cfg=additional_configs())
def test_kv_pages_is_valid_or_refused_naming_it(cfg):
    try:
        mode = pages_from_additional_config(cfg)
    except KVStreamConfigError as exc:
        _assert_clear(exc, repr(cfg), *(f"kv_pages={cfg.get('kv_pages')!r}",) if isinstance(cfg, dict) else ())
        return
    assert mode == cfg.get("kv_pages", "auto") if isinstance(cfg, dict) else mode == "auto"


def test_vllm_hashable_additional_config_leaves_the_plugin_inert():
    """vLLM also takes an object with ``compute_hash`` as additional_config: not the plugin's."""

    class Hashable:
        def compute_hash(self) -> str:
            return "x"

    assert policy_from_additional_config(Hashable()) is None
    assert quant_from_additional_config(Hashable()) is None
    assert pages_from_additional_config(Hashable()) == "auto"


# --- 3. the registry: build_policy(name, params) ------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(name=policy_names, params=st.none() | param_dicts | json_values | odd_key_dicts)
@example(name="full", params=[])
@example(name="full", params=0)
@example(name="streaming-sink", params={"sink_tokens": 1.0})
def test_build_policy_any_name_any_params(name, params):
    try:
        policy = build_policy(name, params)
    except KVStreamConfigError as exc:
        _assert_clear(exc, *_entries(name), *_entries(params))
        return
    assert policy.name == name and name in POLICIES
    _assert_same_config(policy.config, params)
    assert build_policy(name, normalized(policy)["kv_policy_config"]).config == policy.config


@pytest.mark.parametrize("name", POLICIES)
@settings(max_examples=60, deadline=None)
@given(key=st.sampled_from(PARAM_KEYS), value=json_values)
def test_every_registered_policy_checks_each_parameter(name, key, value):
    fields = get_policy_class(name).config_model.model_fields
    try:
        policy = build_policy(name, {key: value})
    except KVStreamConfigError as exc:
        _assert_clear(exc, f"unknown parameter {key!r}", f"{key}={value!r}")
        return
    assert key in fields
    assert getattr(policy.config, key) == value and not isinstance(value, bool)


# --- 4. the plugin's vllm serve flags --------------------------------------------------------

flag_text = json_text(param_dicts) | json_text(quant_dicts)


@settings(max_examples=300, deadline=None)
@given(
    policy_config=st.none() | flag_text, quant_config=st.none() | flag_text,
    base=st.none() | st.dictionaries(st.sampled_from(["kv_policy", "kv_quant", "other"]), json_values, max_size=2)
    | json_values.filter(lambda v: not isinstance(v, dict)) | st.text(max_size=8),
)
def test_fold_flags_merges_the_json_or_names_the_flag_value(policy_config, quant_config, base):
    ns = argparse.Namespace(kv_policy=None, kv_policy_config=policy_config, kv_quant=None, kv_quant_config=quant_config)
    try:
        merged = fold_flags_into_additional_config(ns, base)
    except KVStreamConfigError as exc:
        _assert_clear(exc, repr(policy_config), repr(quant_config), repr(base))
        return
    if base is not None and not isinstance(base, dict):
        pytest.fail(f"a non-mapping additional_config {base!r} was accepted")
    for key, text in (("kv_policy_config", policy_config), ("kv_quant_config", quant_config)):
        if text is None:
            assert merged.get(key) == (base or {}).get(key) or key not in merged
        else:
            assert isinstance(merged[key], dict)


@pytest.fixture(scope="module")
def vllm_cli(tiny_model):
    """vLLM's own ``vllm serve`` engine parser with the plugin's flags (built once)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from vllm_kvstream.adapter.engine_args import patch_engine_args

    patch_engine_args()
    return EngineArgs.add_cli_args(FlexibleArgumentParser()), EngineArgs, tiny_model


def _vllm_parse(vllm_cli, *flags):
    parser, engine_args, model = vllm_cli
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return parser.parse_args(["--model", model, *flags]), err.getvalue(), None
        except SystemExit as exc:
            return None, err.getvalue(), exc


@settings(max_examples=120, deadline=None)
@given(flag=st.sampled_from(["--kv-policy", "--kv-quant"]),
       value=st.text(max_size=16) | st.sampled_from([*POLICIES, *QUANT_METHODS, "Full", "int2", "fp8", " full", "--"]))
@example(flag="--kv-policy", value="--")
@example(flag="--kv-quant", value="--")
def test_vllm_parser_choice_flags_refuse_naming_the_value(vllm_cli, flag, value):
    ns, err, exit_ = _vllm_parse(vllm_cli, f"{flag}={value}")
    choices = POLICIES if flag == "--kv-policy" else list(QUANT_METHODS)
    if value in choices:
        assert exit_ is None and getattr(ns, flag[2:].replace("-", "_")) == value
    elif exit_ is None:  # "--": Python 3.11's argparse drops it and passes [], no choice checked
        assert value == "--", (value, err)
        with pytest.raises(SystemExit) as ex:
            vllm_cli[1].from_cli_args(ns)
        assert str(ex.value.code).startswith("vllm-kvstream: error: ") and "[]" in str(ex.value.code)
        assert ALLOWED.search(str(ex.value.code))
    else:
        assert exit_.code == 2
        assert repr(value) in err and "choose from" in err, err[-500:]


@settings(max_examples=150, deadline=None)
@given(policy=st.none() | st.sampled_from(POLICIES), policy_config=st.none() | json_text(param_dicts),
       quant=st.none() | st.sampled_from(list(QUANT_METHODS)), quant_config=st.none() | json_text(quant_dicts),
       spaced=st.booleans())
@example(policy=None, policy_config=None, quant=None, quant_config="{}", spaced=False)
@example(policy="streaming-sink", policy_config='{"sink_tokens": 0}', quant=None, quant_config=None, spaced=True)
@example(policy=None, policy_config=None, quant=None, quant_config='{"sink_tokens": 4}', spaced=True)
@example(policy="full", policy_config="--", quant=None, quant_config=None, spaced=False)
def test_vllm_from_cli_args_folds_or_exits_with_one_line(vllm_cli, policy, policy_config, quant, quant_config, spaced):
    flags = []
    for flag, value in (("--kv-policy", policy), ("--kv-policy-config", policy_config), ("--kv-quant", quant),
                        ("--kv-quant-config", quant_config)):
        if value is not None:
            flags += [flag, value] if spaced and not value.startswith("-") else [f"{flag}={value}"]
    ns, err, exit_ = _vllm_parse(vllm_cli, *flags)
    assert exit_ is None, err[-500:]
    _, engine_args, _ = vllm_cli
    try:
        args = engine_args.from_cli_args(ns)
    except SystemExit as exc:
        assert isinstance(exc.code, str) and exc.code.startswith("vllm-kvstream: error: "), exc.code
        dropped = ["got []"] if "--" in (policy_config, quant_config) else []  # argparse's [] for "--flag=--"
        _assert_clear(exc.code, *_entries(policy_config), *_entries(quant_config), *dropped)
        return
    cfg = args.additional_config
    policy_obj = policy_from_additional_config(cfg)
    if policy is not None:
        assert policy_obj.name == policy
    if policy_config is not None:
        _assert_same_config(policy_obj.config, policy_config)
    if quant_config is not None and _parsed(quant_config) != {}:
        assert quant_from_additional_config(cfg) is not None


@pytest.mark.parametrize("additional", ['[1]', '"x"', "5", "streaming-sink"])
def test_vllm_additional_config_that_is_no_object_is_refused_naming_it(vllm_cli, additional):
    """Before: ``dict()`` of it raised a bare ValueError (a traceback) in the plugin's wrapper."""
    _, engine_args, _ = vllm_cli
    for flags in ((), ("--kv-policy", "streaming-sink")):
        ns, err, exit_ = _vllm_parse(vllm_cli, "--additional-config", additional, *flags)
        assert exit_ is None, err[-500:]
        with pytest.raises(SystemExit) as ex:
            engine_args.from_cli_args(ns)
        assert str(ex.value.code).startswith("vllm-kvstream: error: ")
        assert repr(additional) in str(ex.value.code)


# --- 5. vllm-kvstream eval / compare options ------------------------------------------------

#: (subcommand, flag, lowest integer allowed)
COUNT_FLAGS = [
    (("eval", "ppl"), "--tokens", 2), (("eval", "ppl"), "--full-tokens", 2), (("eval", "ppl"), "--segment", 1),
    (("eval", "ppl"), "--tail", 1), (("eval", "ppl"), "--chunk", 1), (("eval", "ppl"), "--block-size", 1),
    (("eval", "passkey"), "--trials", 1), (("eval", "passkey"), "--chunk", 1),
    (("compare",), "--kv-memory-mib", 1), (("compare",), "--block-size", 1), (("compare",), "--chunk", 1),
    (("compare",), "--max-num-seqs", 1), (("compare",), "--long-prompt-tokens", 1), (("compare",), "--output-tokens", 1),
]
LIST_FLAGS = [(("eval", "passkey"), "--lengths"), (("compare",), "--concurrency"), (("compare",), "--lengths")]
number_text = (
    st.integers(min_value=-5, max_value=5).map(str) | st.integers().map(str) | st.floats().map(str)
    | st.sampled_from(["nan", "inf", "-inf", "1e3", "1.5", "0x10", "1_000", " 3 ", "", " ", "²", "٣", "9" * 5000])
    | st.text(max_size=6)
)
PARSER = cli.build_parser()


def _cli_parse(*argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return PARSER.parse_args(list(argv)), err.getvalue(), None
        except SystemExit as exc:
            return None, err.getvalue(), exc


def _as_int(text: str):
    try:
        return int(text)
    except ValueError:
        return None


@settings(max_examples=300, deadline=None)
@given(where=st.sampled_from(COUNT_FLAGS), value=number_text)
@example(where=(("eval", "ppl"), "--tokens", 2), value="0")
@example(where=(("eval", "ppl"), "--segment", 1), value="-1")
@example(where=(("eval", "passkey"), "--trials", 1), value="0")
@example(where=(("eval", "ppl"), "--tail", 1), value="-8192")
@example(where=(("eval", "ppl"), "--tokens", 2), value="--")  # Python 3.11's argparse: None, silently
def test_cli_counts_below_their_minimum_are_refused_naming_them(where, value):
    command, flag, low = where
    ns, err, exit_ = _cli_parse(*command, f"{flag}={value}")
    number = _as_int(value)
    if number is not None and number >= low:
        assert exit_ is None and getattr(ns, flag[2:].replace("-", "_")) == number
    else:
        assert exit_ is not None and exit_.code == 2, (value, ns)
        assert f"argument {flag}: {value!r}" in err and (f">= {low}" in err or value == "--"), err[-300:]


@settings(max_examples=200, deadline=None)
@given(where=st.sampled_from(LIST_FLAGS), items=st.lists(number_text.filter(lambda t: "," not in t), max_size=4))
@example(where=(("compare",), "--concurrency"), items=["0"])
@example(where=(("eval", "passkey"), "--lengths"), items=[])
def test_cli_count_lists_are_non_empty_and_each_at_least_one(where, items):
    command, flag = where
    value = ",".join(items)
    ns, err, exit_ = _cli_parse(*command, f"{flag}={value}")
    given_items = [x for x in items if x.strip()]
    numbers = [_as_int(x) for x in given_items]
    if given_items and all(n is not None and n >= 1 for n in numbers):
        assert exit_ is None and getattr(ns, flag[2:]) == numbers
    else:
        assert exit_ is not None and exit_.code == 2, (value, ns)
        assert any(repr(x) in err for x in [value, *items]), err[-300:]


@settings(max_examples=200, deadline=None)
@given(items=st.lists(number_text.filter(lambda t: "," not in t), min_size=1, max_size=3))
@example(items=["1.5"])
@example(items=["nan"])
@example(items=["-0.1", "0.5"])
def test_cli_depths_are_fractions(items):
    value = ",".join(items)
    ns, err, exit_ = _cli_parse("eval", "passkey", f"--depths={value}")
    floats_ = []
    for x in items:
        if x.strip():
            try:
                floats_.append(float(x))
            except ValueError:
                floats_.append(NAN)
    if floats_ and all(0.0 <= d <= 1.0 for d in floats_):
        assert exit_ is None and ns.depths == floats_
    else:
        assert exit_ is not None and exit_.code == 2
        assert any(repr(x) in err for x in [value, *items]), err[-300:]


@settings(max_examples=100, deadline=None)
@given(value=number_text)
@example(value="nan")
@example(value="inf")
@example(value="0")
def test_cli_stage_seconds_finite_and_positive(value):
    ns, err, exit_ = _cli_parse("compare", f"--stage-seconds={value}")
    try:
        number = float(value)
    except ValueError:
        number = NAN
    if math.isfinite(number) and number > 0:
        assert exit_ is None and ns.stage_seconds == number
    else:
        assert exit_ is not None and exit_.code == 2 and repr(value) in err, err[-300:]


cache_text = (
    st.tuples(number_text, number_text).map("+".join) | st.text(max_size=10)
    | st.sampled_from(["4+252", "0+256", "4+0", "4+-1", "+", "4++4", "4+252+1", "²+5", "4 + 252", "9" * 40 + "+4"])
)


@settings(max_examples=200, deadline=None)
@given(text=cache_text, flag=st.sampled_from([("eval", "ppl", "--caches"), ("eval", "passkey", "--caches"),
                                              ("compare", "--cache")]))
def test_cli_cache_sizes_parse_or_are_refused_naming_them(text, flag):
    *command, name = flag
    ns, err, exit_ = _cli_parse(*command, f"{name}={text}")
    if exit_ is not None:
        assert exit_.code == 2 and any(repr(t) in err for t in [text, *text.split(",")]), err[-300:]
        return
    caches = [Cache.parse(ns.cache)] if name == "--cache" else ns.caches
    pieces = [p for p in text.split(",") if p.strip()] if name == "--caches" else [text]
    assert caches and [c.label for c in caches] == [Cache.parse(p).label for p in pieces]
    for c, piece in zip(caches, pieces):
        sink, window = (int(x) for x in piece.split("+"))
        assert (c.sink_tokens, c.window_tokens) == (sink, window) and window > 0 and sink >= 0


option_keys = (
    st.sampled_from(PARAM_KEYS) | st.sampled_from(["kv_quant", *(f"kv_quant.{k}" for k in QUANT_KEYS)])
    | st.text(alphabet=st.characters(blacklist_characters=":=,"), max_size=8)
)
option_values = json_values.map(json.dumps) | st.text(alphabet=st.characters(blacklist_characters=":,"), max_size=8)


@st.composite
def policy_specs(draw):
    name = draw(st.sampled_from([*POLICIES, "stock"]) | st.text(alphabet=st.characters(blacklist_characters=":,"),
                                                                 max_size=10))
    pairs = draw(st.lists(st.tuples(option_keys, option_values).map("=".join)
                          | st.text(alphabet=st.characters(blacklist_characters=":,"), max_size=6), max_size=3))
    return ":".join([name, *pairs])


def _spec_candidates(spec: str, caches: list[Cache]) -> list[str]:
    name, *pairs = spec.split(":")
    out = [repr(spec), repr(name)]
    if name in POLICIES:  # a value the cache size gave the policy
        for c in caches:
            sized = get_policy_class(name).params_for_cache(c.sink_tokens, c.window_tokens) or {}
            out += [f"{k}={v!r}" for k, v in sized.items()]
    for pair in pairs:
        key, _, value = pair.partition("=")
        out += [repr(pair), repr(key), f"{key}=", f"{key.removeprefix('kv_quant.')}:",
                f"{key.removeprefix('kv_quant.')!r}: "]
        out += [f"(got {v!r})" for v in (_parsed(value), value)] + [repr(_parsed(value)), repr(value)]
    return out


@settings(max_examples=300, deadline=None)
@given(specs=st.lists(policy_specs(), min_size=1, max_size=3), caches=st.lists(cache_text, max_size=2))
@example(specs=["streaming-sink:sink_tokens=1:sink_tokens=2"], caches=["4+252"])
@example(specs=["streaming-sink:kv_quant=[1]"], caches=["4+252"])
@example(specs=["streaming-sink:sink_tokens=" + "9" * 5000], caches=["4+252"])
@example(specs=["full", "full"], caches=["4+252"])
@example(specs=["stock", "stock"], caches=[])
def test_policy_specs_plan_or_are_refused_naming_them(specs, caches):
    parsed = []
    for text in caches:
        try:
            parsed.append(Cache.parse(text))
        except ValueError as exc:  # the CLI turns this into argparse's exit 2 (above)
            assert type(exc) is ValueError and repr(text) in str(exc)
    for plan, args in ((plan_runs, (specs, parsed)), (plan_serve_runs, (specs, parsed[0] if parsed else Cache(4, 60)))):
        try:
            runs = plan(*args)
        except ValueError as exc:  # KVStreamConfigError is a ValueError: cli.main prints either as one line
            assert type(exc) in (ValueError, KVStreamConfigError), type(exc)
            _assert_clear(exc, *(c for s in specs for c in _spec_candidates(s, parsed or [Cache(4, 60)])))
            continue
        labels = [r.label for r in runs]
        assert len(labels) == len(set(labels)), labels  # no run silently replaces another's results
        if plan is plan_runs:
            for run in runs:
                if run.policy != "stock":
                    get_policy_class(run.policy).from_dict(run.params)


PREPARED = {"smollm2", "gemma3", "tiny", *(f"tiny-{f}" for f in TINY_FAMILIES)}


@settings(max_examples=100, deadline=None)
@given(name=st.text(max_size=20) | st.sampled_from(["", " ", "smollm3", "tiny-", "Tiny", "\x00", "a" * 300]))
def test_model_names_that_are_neither_folder_nor_prepared_are_refused(name):
    try:
        folder = bool(name) and Path(name).is_dir()
    except (OSError, ValueError):
        folder = False
    if name in PREPARED or folder:
        return  # a real model: would be prepared (see test_harness for those)
    with pytest.raises(SystemExit) as exc:
        cli._model(name)
    assert str(exc.value.code).startswith("vllm-kvstream: error: --model ")
    _assert_clear(exc.value.code, repr(name))


class _ModelReached(Exception):
    """The command got past its options to preparing the model (where a real run starts)."""


#: One bad option per case: (argv, the value the message must name).
BAD_MAIN = [
    (["eval", "ppl", "--tokens=0"], "'0'"), (["eval", "ppl", "--segment=-1"], "'-1'"),
    (["eval", "ppl", "--caches="], "''"), (["eval", "ppl", "--policies="], "''"),
    (["eval", "ppl", "--policies=nope"], "'nope'"), (["eval", "ppl", "--policies=full,full"], "'full'"),
    (["eval", "ppl", "--policies=streaming-sink:kv_quant=int3"], "'int3'"),
    (["eval", "ppl", "--model="], "''"),
    (["eval", "passkey", "--trials=0"], "'0'"), (["eval", "passkey", "--depths=1.5"], "'1.5'"),
    (["eval", "passkey", "--depths=nan"], "'nan'"), (["eval", "passkey", "--lengths=0"], "'0'"),
    (["eval", "passkey", "--policies=streaming-sink:sink_tokens=0"], "sink_tokens=0"),
    (["compare", "--concurrency=0"], "'0'"), (["compare", "--concurrency="], "''"),
    (["compare", "--stage-seconds=nan"], "'nan'"), (["compare", "--cache=4+0"], "'4+0'"),
    (["compare", "--policies=stock,stock"], "'stock'"), (["compare", "--policies=topk-importance:score=h2o"], "'h2o'"),
    (["compare", "--kv-memory-mib=0"], "'0'"), (["compare", "--locustfile=/no/such/file"], "'/no/such/file'"),
]


@pytest.mark.parametrize(("argv", "named"), BAD_MAIN, ids=[" ".join(a) for a, _ in BAD_MAIN])
def test_cli_main_refuses_before_preparing_the_model(argv, named, capsys):
    """``vllm-kvstream ...`` with one bad option: exit 2 and a one-line error naming it, before
    any model is prepared or any engine starts."""
    with mock.patch.object(cli, "_model", side_effect=_ModelReached) if "--model=" not in argv else contextlib.nullcontext():
        try:
            rc = cli.main(argv)
        except SystemExit as exc:
            rc = exc.code
    err = capsys.readouterr().err
    if isinstance(rc, str):  # _model's SystemExit(message)
        err, rc = rc, 2
    assert rc == 2, err
    line = err.strip().splitlines()[-1]
    assert "error:" in line and named in line, err[-500:]
    assert "Traceback" not in err


def test_cli_main_with_good_options_reaches_the_model():
    """The other side of the cases above: the same commands with good options go on."""
    for argv in (["eval", "ppl", "--tokens=64", "--policies=full,streaming-sink"],
                 ["eval", "passkey", "--depths=0,1", "--trials=1"], ["compare", "--concurrency=1"]):
        with mock.patch.object(cli, "_model", side_effect=_ModelReached), pytest.raises(_ModelReached):
            cli.main(argv)
