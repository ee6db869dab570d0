"""Server shutdown under load: every in-flight stream is ended when the engine stops.

Monkeypatch, written down: ``AsyncLLM.shutdown`` (the API server's engine client) is wrapped,
for engines that run a policy, so that once vLLM has stopped the engine core and cancelled its
output handler, every request still waiting for output is handed ``EngineDeadError`` (through
the event loop that owns the queues, as vLLM's own handler does when it sees the engine die).

Why: on SIGINT/SIGTERM vLLM 0.32 stops the engine core, then cancels the output handler task.
When the cancel lands before the handler has seen the engine's death (a race: seen in 2 of 9
stops under load in ``vllm-kvstream soak``, stock vLLM's code path), the handler exits with
``CancelledError``, which its ``except Exception`` does not catch, so no error reaches the
requests' queues. Their streaming responses then wait forever, uvicorn waits for those
connections to close ("Waiting for connections to close"), and the server never exits until
it is killed. Handing the error to the waiting requests ends each stream with an error chunk;
the connections close and the server exits 0. A request that already finished is untouched.
Removable when vLLM's output handler propagates an error on cancellation as well.
"""

from __future__ import annotations

import logging

from vllm_kvstream.adapter.compat import probe
from vllm_kvstream.adapter.state import policy_for

logger = logging.getLogger(__name__)


def patch_shutdown() -> None:
    """Install the wrapper (idempotent)."""
    AsyncLLM = probe("vllm.v1.engine.async_llm:AsyncLLM")
    if getattr(AsyncLLM.shutdown, "__kvstream_wrapped__", False):
        return
    EngineDeadError = probe("vllm.v1.engine.exceptions:EngineDeadError")
    original = AsyncLLM.shutdown

    def shutdown(self, *args, **kwargs):
        handler = getattr(self, "output_handler", None)
        try:
            return original(self, *args, **kwargs)
        finally:
            _end_waiting_streams(self, handler, EngineDeadError)

    shutdown.__kvstream_wrapped__ = True
    AsyncLLM.shutdown = shutdown


def _end_waiting_streams(engine, handler, error_cls) -> None:
    config = getattr(engine, "vllm_config", None)
    processor = getattr(engine, "output_processor", None)
    if handler is None or processor is None or config is None or policy_for(config.additional_config) is None:
        return
    waiting = len(getattr(processor, "request_states", {}))
    if not waiting:
        return
    loop = handler.get_loop()
    if loop.is_closed():
        return
    logger.warning("vllm-kvstream: engine stopped with %d requests in flight; ending their streams", waiting)
    loop.call_soon_threadsafe(processor.propagate_error, error_cls())
