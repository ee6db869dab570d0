"""Per-request policies (``vllm_kvstream/request_policy.py`` says what a request may ask) carried
through vLLM's three processes.

Monkeypatches, written down (each installed once per process by :func:`patch_request_policies`,
each a wrapper that calls vLLM's method unchanged first or last):

* ``CompletionRequest.to_sampling_params`` and ``ChatCompletionRequest.to_sampling_params``
  (the OpenAI server, patched where its engine config is built): the same check, made while
  the request becomes sampling parameters, before a streaming response has begun, so a
  streamed request is refused with HTTP 400 too rather than an error event inside a 200.
  Removable with the next one's upstream change.
* ``InputProcessor._validate_params`` (API server, offline ``LLM``): after vLLM's own checks,
  the request's ``extra_args`` are resolved against the server's limits; a refusal raises
  vLLM's ``VLLMValidationError`` (a client error), which the OpenAI server answers with HTTP
  400 and the offline ``LLM`` raises to the caller, before the request reaches the engine. The
  caller's ``SamplingParams`` is not modified. Removable when vLLM lets a plugin validate
  ``extra_args`` (today only logits processors may, and they run per step).
* ``KVCacheManager.allocate_slots`` (engine core): binds the request's policy to the plugin's
  KV managers before vLLM allocates (and frees what the policy no longer keeps); the binding
  is dropped when the request's blocks are freed (``KVStreamManager.pop_blocks_for_free``) and
  made again if a preempted request comes back. Removable when vLLM hands the request (not
  just its id) to the single-type managers.
* ``GPUModelRunner._update_states`` and ``._build_attention_metadata`` (workers): the first
  keeps, per request id, the attention pattern of the requests that asked for a policy of
  their own (new requests resolved once, finished ones dropped); the second publishes, per
  row of the step's batch, that pattern (``None``: the server's) for the plugin's metadata
  builder, which vLLM gives only the batch's tensors. A server none of whose requests asked
  for one publishes ``None`` at the cost of one dict test per step. Removable when vLLM's
  ``CommonAttentionMetadata`` carries per-request sampling state (or request ids).
"""

from __future__ import annotations

import logging
from typing import Any

from vllm_kvstream.adapter.compat import on_cpu, probe
from vllm_kvstream.adapter.state import pages_for, policy_for, quant_for
from vllm_kvstream.errors import KVStreamConfigError
from vllm_kvstream.policies import AttentionPattern
from vllm_kvstream.request_policy import ServerLimits, asks_for_policy, describe_refusal, request_policy

logger = logging.getLogger(__name__)

#: The step's per-row patterns (``None``: every row follows the server's policy), published by
#: the worker's ``_build_attention_metadata`` wrapper for the metadata builders of that step.
_rows: dict[str, Any] = {"patterns": None}


def row_patterns() -> list[AttentionPattern | None] | None:
    """Per row of the batch being built, the request's own pattern or ``None`` (the server's);
    ``None`` altogether when no request of the batch asked for one."""
    return _rows["patterns"]


def server_limits(vllm_config) -> ServerLimits | None:
    """The limits a request's policy is checked against; ``None`` when the server runs no policy."""
    extra = vllm_config.additional_config
    policy = policy_for(extra)
    if policy is None:
        return None
    from vllm_kvstream.adapter.kv_manager import plugin_pages

    unsupported = None
    if policy.selects_blocks:
        unsupported = f"--kv-policy {policy.name} selects blocks by score"
    elif plugin_pages(quant_for(extra), pages_for(extra), on_cpu()):
        unsupported = "its KV blocks live in the plugin's pages (--kv-quant, kv_pages=paged16, or off CPU)"
    hf = vllm_config.model_config.hf_text_config
    return ServerLimits(
        policy=policy,
        block_size=vllm_config.cache_config.block_size,
        max_query_tokens=int(vllm_config.max_in_flight_tokens),
        trained_context=getattr(hf, "max_position_embeddings", None),
        unsupported=unsupported,
    )


def _limits(holder) -> ServerLimits | None:
    """``server_limits`` of ``holder.vllm_config``, computed once per holder."""
    cached = getattr(holder, "_kvstream_limits", False)
    if cached is False:
        cached = server_limits(holder.vllm_config)
        holder._kvstream_limits = cached
    return cached


def _extra_args(params) -> dict | None:
    return getattr(params, "extra_args", None) if params is not None else None


def patch_request_policies() -> None:
    """Install the wrappers of the module docstring (idempotent)."""
    _patch_validation()
    _patch_scheduler()
    _patch_worker()


#: The server's limits, remembered where its engine config is built (the API server): the
#: OpenAI request models check against them before a streaming response begins.
_server: dict[str, Any] = {"limits": None}


def remember_server(vllm_config) -> None:
    """Called where the engine config is built; patches the OpenAI request models on first use."""
    _server["limits"] = server_limits(vllm_config)
    if _server["limits"] is not None:
        _patch_openai_requests()


def _refuse_if_bad(extra, limits) -> None:
    """Raise vLLM's ``VLLMValidationError`` (HTTP 400) when ``extra`` asks for a policy
    ``limits`` do not allow (or any policy, without a server policy)."""
    if not asks_for_policy(extra):
        return
    VLLMValidationError = probe("vllm.exceptions:VLLMValidationError")
    try:
        if limits is None:
            raise KVStreamConfigError(
                f"per-request {', '.join(k for k in extra if str(k).startswith('kv_'))} needs a server started "
                "with --kv-policy; allowed here: no kv_ fields"
            )
        request_policy(extra, limits)
    except KVStreamConfigError as exc:
        raise VLLMValidationError(describe_refusal(exc), parameter="vllm_xargs") from None


def _wrap(owner, name: str, make) -> None:
    """Replace ``owner.name`` by ``make(original)``, once (a second call finds it wrapped)."""
    original = getattr(owner, name)
    if getattr(original, "__kvstream_wrapped__", False):
        return
    wrapper = make(original)
    wrapper.__kvstream_wrapped__ = True
    setattr(owner, name, wrapper)


def _patch_openai_requests() -> None:
    """``to_sampling_params`` of the completion and chat request models: a bad per-request
    policy is refused while the request is turned into sampling parameters, before a streaming
    response has begun (so a stream gets HTTP 400 too, not an error event inside a 200)."""

    def make(original):
        def to_sampling_params(self, *args, **kwargs):
            params = original(self, *args, **kwargs)
            _refuse_if_bad(_extra_args(params), _server["limits"])
            return params

        return to_sampling_params

    for path in ("vllm.entrypoints.openai.completion.protocol:CompletionRequest",
                 "vllm.entrypoints.openai.chat_completion.protocol:ChatCompletionRequest"):
        _wrap(probe(path), "to_sampling_params", make)


def _patch_validation() -> None:
    def make(original):
        def _validate_params(self, params, *args, **kwargs):
            result = original(self, params, *args, **kwargs)
            _refuse_if_bad(_extra_args(params), _limits(self))
            return result

        return _validate_params

    _wrap(probe("vllm.v1.engine.input_processor:InputProcessor"), "_validate_params", make)


def _patch_scheduler() -> None:
    def make(original):
        def allocate_slots(self, request, *args, **kwargs):
            extra = _extra_args(getattr(request, "sampling_params", None))
            if asks_for_policy(extra):
                from vllm_kvstream.adapter.kv_manager import KVStreamManager

                for manager in self.coordinator.single_type_managers:
                    if isinstance(manager, KVStreamManager):
                        manager.bind_request(request.request_id, extra)
            return original(self, request, *args, **kwargs)

        return allocate_slots

    _wrap(probe("vllm.v1.core.kv_cache_manager:KVCacheManager"), "allocate_slots", make)


def _patch_worker() -> None:
    Runner = probe("vllm.v1.worker.gpu_model_runner:GPUModelRunner")

    def make_update(original):
        def _update_states(self, scheduler_output, *args, **kwargs):
            result = original(self, scheduler_output, *args, **kwargs)
            patterns = self.__dict__.setdefault("_kvstream_patterns", {})
            for req_id in scheduler_output.finished_req_ids:
                patterns.pop(req_id, None)
            for new in scheduler_output.scheduled_new_reqs:
                extra = _extra_args(getattr(new, "sampling_params", None))
                if asks_for_policy(extra):
                    limits = _limits(self)
                    policy = request_policy(extra, limits) if limits is not None else None  # validated upstream
                    if policy is not None:
                        patterns[new.req_id] = policy.pattern
            return result

        return _update_states

    def make_build(original):
        def _build_attention_metadata(self, *args, **kwargs):
            patterns = self.__dict__.get("_kvstream_patterns")
            _rows["patterns"] = [patterns.get(r) for r in self.input_batch.req_ids] if patterns else None
            try:
                return original(self, *args, **kwargs)
            finally:
                _rows["patterns"] = None

        return _build_attention_metadata

    _wrap(Runner, "_update_states", make_update)
    _wrap(Runner, "_build_attention_metadata", make_build)
