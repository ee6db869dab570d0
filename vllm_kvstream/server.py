"""``vllm serve`` on 127.0.0.1 as a subprocess, for the harnesses that load it (``compare``,
``soak``) and the end-to-end tests (no vLLM import)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path


class LocalServer:
    """``vllm serve MODEL FLAGS`` on 127.0.0.1 as a subprocess, output to ``log_path``; stopped
    with SIGINT on exit."""

    def __init__(self, model: str, flags: Sequence[str], log_path: Path, ready_timeout: float = 600.0,
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        vllm = str(Path(sys.executable).with_name("vllm"))
        self.cmd = [vllm, "serve", str(model), "--host", "127.0.0.1", "--port", str(self.port), *flags]
        self.log_path = log_path
        self.ready_timeout = ready_timeout
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen | None = None

    def __enter__(self):
        env = dict(os.environ)
        if "--kv-cache-memory-bytes" in self.cmd:
            env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it overrides the flag
        env["HF_HUB_OFFLINE"] = "1"
        env.update(self.extra_env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in __exit__)
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_healthy(self.proc, self.url, self.ready_timeout, f"see {self.log_path}")
        except BaseException:
            self.__exit__()
            raise
        return self

    def stop(self, timeout: float = 120.0) -> int | None:
        """SIGINT, then the exit status (``None``: killed after ``timeout`` seconds)."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def __exit__(self, *exc) -> None:
        self.stop()
        self._log.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float, where: str = "") -> None:
    """Until ``url/health`` answers 200; ``RuntimeError`` (with ``where``) if ``proc`` exits or
    ``timeout`` seconds pass first."""
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}; {where}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.time() > deadline:
            raise RuntimeError(f"vllm serve not healthy after {timeout:.0f} s; {where}")
        time.sleep(1)
