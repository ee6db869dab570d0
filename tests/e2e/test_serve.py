"""``vllm serve --kv-policy ...`` on stock vLLM: starts, streams a completion past the window
on 127.0.0.1, stops cleanly; bad flag values exit non-zero with a clear message."""

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from vllm_kvstream.compare import wait_healthy

pytestmark = pytest.mark.e2e

VLLM = str(Path(sys.executable).with_name("vllm"))


def _env():
    return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_args(model, port, *extra):
    return [VLLM, "serve", model, "--host", "127.0.0.1", "--port", str(port), "--enforce-eager",
            "--dtype", "float32", "--block-size", "16", "--max-num-batched-tokens", "64", *extra]


def test_serve_streams_and_stops_cleanly(tiny_model):
    port = _free_port()
    proc = subprocess.Popen(
        _serve_args(tiny_model, port, "--kv-policy", "streaming-sink",
                    "--kv-policy-config", '{"sink_tokens": 4, "window_tokens": 60}'),
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        try:
            wait_healthy(proc, f"http://127.0.0.1:{port}", 300)
        except RuntimeError as exc:
            raise AssertionError(f"{exc}\n{proc.stdout.read()[-5000:] if proc.poll() is not None else ''}") from None
        body = json.dumps({"model": tiny_model, "prompt": "Hello there", "max_tokens": 150,
                           "temperature": 0, "stream": True, "ignore_eos": True}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        chunks, text, finish = 0, "", None
        with urllib.request.urlopen(req, timeout=300) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choice = json.loads(line[6:])["choices"][0]
                chunks += 1
                text += choice["text"]
                finish = choice.get("finish_reason") or finish
        assert chunks >= 100 and finish == "length" and text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0, proc.stdout.read()[-3000:]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--kv-policy", "nope"], "invalid choice: 'nope' (choose from 'full', 'sliding-window', 'streaming-sink', "
                                  "'topk-importance')"),
        (["--kv-policy", "streaming-sink", "--kv-policy-config", '{"sink_tokens": 0}'], "sink_tokens=0"),
        (["--kv-policy", "streaming-sink", "--kv-policy-config", "{oops"], "must be a JSON object"),
        (["--kv-policy", "streaming-sink", "--kv-policy-config", '{"window_tokens": 8}'],
         "window_tokens=8 is smaller than one KV block (16 tokens)"),
    ],
)
def test_bad_flags_exit_nonzero_with_message(tiny_model, flags, message):
    proc = subprocess.run(_serve_args(tiny_model, _free_port(), *flags), env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout
