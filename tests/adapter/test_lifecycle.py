"""Shutdown under load (``adapter/lifecycle.py``): the wrapper of ``AsyncLLM.shutdown`` hands
every request still waiting for output an ``EngineDeadError`` on the loop that owns its queue,
for engines with a policy only; vLLM's own shutdown runs unchanged first."""

import asyncio
import threading
from types import SimpleNamespace

import pytest

from vllm_kvstream.adapter.plugin import register


class FakeProcessor:
    def __init__(self, waiting):
        self.request_states = {f"r{i}": object() for i in range(waiting)}
        self.errors = []

    def propagate_error(self, exc):
        self.errors.append((type(exc).__name__, threading.current_thread().name))


def _engine(loop, handler, waiting, policy):
    extra = {"kv_policy": "streaming-sink"} if policy else {}
    stopped = []
    engine = SimpleNamespace(
        vllm_config=SimpleNamespace(additional_config=extra),
        engine_core=SimpleNamespace(shutdown=lambda timeout=None: stopped.append(timeout)),
        output_handler=handler, output_processor=FakeProcessor(waiting), renderer=None,
    )
    return engine, stopped


@pytest.mark.parametrize(("policy", "waiting", "expected"), [(True, 3, 1), (True, 0, 0), (False, 3, 0)])
def test_waiting_streams_get_an_error_after_the_engine_stops(policy, waiting, expected):
    register()
    from vllm.v1.engine.async_llm import AsyncLLM

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="loop", daemon=True)
    thread.start()
    handler = asyncio.run_coroutine_threadsafe(_forever_task(), loop).result()
    engine, stopped = _engine(loop, handler, waiting, policy)
    AsyncLLM.shutdown(engine, timeout=0)  # called from another thread, as vLLM's launcher does
    asyncio.run_coroutine_threadsafe(asyncio.sleep(0.05), loop).result()
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    assert stopped == [0]  # vLLM's shutdown ran
    assert handler.cancelled() or handler.done()
    assert engine.output_processor.errors == [("EngineDeadError", "loop")] * expected


async def _forever_task():
    return asyncio.get_running_loop().create_task(asyncio.sleep(3600))
