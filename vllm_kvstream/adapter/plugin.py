"""``vllm.general_plugins`` entry point. vLLM calls :func:`register` in the API server, the
engine core and every worker process; it is safe to call any number of times."""

from __future__ import annotations

import logging
import threading

logger = logging.getLogger(__name__)
_lock = threading.Lock()
_registered = False


def register() -> None:
    global _registered
    with _lock:
        if _registered:
            return
        from vllm_kvstream.adapter.attention import route_backend
        from vllm_kvstream.adapter.compat import check_supported
        from vllm_kvstream.adapter.engine_args import patch_engine_args
        from vllm_kvstream.adapter.kv_manager import register_kv_manager
        from vllm_kvstream.adapter.lifecycle import patch_shutdown
        from vllm_kvstream.adapter.request_policy import patch_request_policies
        from vllm_kvstream.adapter.rope import register_rope_override

        version = check_supported()
        patch_engine_args()
        register_kv_manager()
        register_rope_override()
        route_backend()
        patch_request_policies()
        patch_shutdown()
        _registered = True
        logger.debug("vllm-kvstream registered with vLLM %s", version)
