import json
import os
import subprocess
import sys
from pathlib import Path


RUNNER = Path(__file__).with_name("engine_runner.py")


def run_engine(engine: dict, jobs: list[dict], timeout: int = 900, env: dict | None = None) -> dict:
    """Start one engine in a subprocess, run ``jobs`` (see engine_runner.py), return its JSON.
    ``env``: extra environment variables of the engine process."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, str(RUNNER), json.dumps({"engine": engine, "jobs": jobs})],
        capture_output=True, text=True, timeout=timeout, env=env,
    )
    if proc.returncode != 0:
        raise AssertionError(f"engine run failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    # The results are the runner's last JSON line; worker processes (tensor parallel) may
    # still log a line to the shared stdout after it.
    return json.loads(next(line for line in reversed(proc.stdout.splitlines()) if line.startswith("{")))


def policy_config(name: str, **params) -> dict:
    """``additional_config`` of a policy. ``streaming-sink`` keeps the given sinks and window
    token-exact (``align="token"``) unless ``align`` is given: the oracles these tests compare
    with are StreamingLLM's at exactly those numbers (``test_block_aligned_*`` tests the default)."""
    if name == "streaming-sink":
        params = {"align": "token", **params}
    return {"kv_policy": name, "kv_policy_config": params}
