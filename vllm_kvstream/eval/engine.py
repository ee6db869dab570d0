"""Run one job on one vLLM engine in a subprocess: the evaluations' only contact with vLLM.

Each (policy, cache size) gets a fresh engine process, so one run's KV memory, RoPE tables
and plugin state never leak into the next. The engine runs in-process in that subprocess
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so the runner can read the scheduler's progress on a
long prompt and report it on stderr; the parent turns those lines into a progress bar.

Jobs (JSON, passed through a temporary file because a 64K-token prompt does not fit in argv):

* ``{"kind": "prompt_logprobs", "tokens": [...]}``: one stream, prefilled in chunks under the
  policy; returns the log-probability of every token given all before it as the policy lets
  the model see them (``logprobs[i]`` for token ``i + 1``).
* ``{"kind": "generate", "prompts": [[...], ...], "sampling": {...}}``: concurrent requests;
  returns each one's generated token ids.

    python -m vllm_kvstream.eval.engine SPEC.json RESULT.json
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROGRESS = "KVSTREAM_PROGRESS"


def kv_bytes_per_token(model: str | Path, dtype_bytes: int) -> int:
    """KV-cache bytes one token takes in ``model`` (from its config.json)."""
    cfg = json.loads((Path(model) / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads", heads)
    head_dim = cfg.get("head_dim", cfg["hidden_size"] // heads)
    return cfg["num_hidden_layers"] * kv_heads * head_dim * 2 * dtype_bytes


def engine_kwargs(
    model: str | Path,
    policy: str | None,
    params: dict[str, Any] | None,
    *,
    dtype: str = "float32",
    chunk: int = 2048,
    block_size: int | None = None,
    max_model_len: int | None = None,
    max_num_seqs: int | None = None,
    quant: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``LLM(...)`` arguments for a policy (``policy=None``: stock vLLM, plugin inert);
    ``quant``: the ``--kv-quant`` entries of ``additional_config``."""
    kw: dict[str, Any] = {
        "model": str(model), "enforce_eager": True, "dtype": dtype, "seed": 0,
        "max_num_batched_tokens": chunk, "enable_prefix_caching": False,
    }
    if block_size:
        kw["block_size"] = block_size
    if max_model_len:
        kw["max_model_len"] = max_model_len
    if max_num_seqs:
        kw["max_num_seqs"] = max_num_seqs
    if policy is not None:
        kw["additional_config"] = {"kv_policy": policy, "kv_policy_config": params or {}, **(quant or {})}
    return kw


def run_job(
    engine: dict[str, Any],
    job: dict[str, Any],
    *,
    kv_cache_gib: float,
    progress: Callable[[int, int], None] | None = None,
    timeout: float = 6 * 3600,
) -> dict[str, Any]:
    """Run ``job`` on a fresh engine built from ``engine`` in a subprocess; return its result.
    ``progress(done, total)`` is called as the engine reports computed tokens."""
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": str(max(1, math.ceil(kv_cache_gib))),
        "HF_HUB_OFFLINE": "1",
        "VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }
    with tempfile.TemporaryDirectory(prefix="kvstream-eval-") as tmp:
        spec_path, result_path = Path(tmp, "spec.json"), Path(tmp, "result.json")
        spec_path.write_text(json.dumps({"engine": engine, "job": job}))
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm_kvstream.eval.engine", str(spec_path), str(result_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
        )
        tail: deque[str] = deque(maxlen=60)
        deadline = time.monotonic() + timeout
        for line in proc.stderr or ():
            if line.startswith(PROGRESS):
                _, done, total = line.split()
                if progress is not None:
                    progress(int(done), int(total))
            else:
                tail.append(line)
            if time.monotonic() > deadline:
                proc.kill()
                raise TimeoutError(f"evaluation engine ran past {timeout:.0f} s")
        code = proc.wait()
        if code != 0 or not result_path.exists():
            raise RuntimeError(f"evaluation engine failed (exit {code}):\n{''.join(tail)}")
        return json.loads(result_path.read_text())


def leading_special_tokens(tokenizer) -> list[int]:
    """The special tokens the model's tokenizer puts before a text (Gemma's BOS; none for
    SmolLM2): a stream or a prompt starts with them, as the model was trained."""
    return list(tokenizer.encode("", add_special_tokens=True))


def rss_mib() -> float:
    """Resident memory of this process in MiB (Linux ``/proc``; NaN elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return float("nan")
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _report(done: int, total: int) -> None:
    sys.stderr.write(f"{PROGRESS} {done} {total}\n")
    sys.stderr.flush()


def _computed_tokens(engine) -> int:
    scheduler = engine.engine_core.engine_core.scheduler
    return sum(r.num_computed_tokens for r in scheduler.requests.values())


def _prompt_logprobs(llm, job: dict[str, Any]) -> dict[str, Any]:
    from vllm import SamplingParams

    engine = llm.llm_engine
    tokens = job["tokens"]
    pool = engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
    free_start = pool.get_num_free_blocks()
    engine.add_request("ppl", {"prompt_token_ids": tokens}, SamplingParams(max_tokens=1, prompt_logprobs=0))
    result = None
    last = 0.0
    peak = 0
    # (tokens computed, KV blocks in use: every group, vLLM's pool; resident memory of this
    # process, which runs the engine core and the worker: VLLM_ENABLE_V1_MULTIPROCESSING=0)
    blocks: list[tuple[int, int, float]] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                result = [lp[tok].logprob for lp, tok in zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:])]
        used = free_start - pool.get_num_free_blocks()
        peak = max(peak, used)
        if time.monotonic() - last > 2.0:
            last = time.monotonic()
            done = _computed_tokens(engine)
            blocks.append((done, used, rss_mib()))
            _report(done, len(tokens))
    _report(len(tokens), len(tokens))
    return {"logprobs": result, "blocks": blocks, "peak_blocks": peak,
            "blocks_after": free_start - pool.get_num_free_blocks()}


def _generate(llm, job: dict[str, Any]) -> dict[str, Any]:
    from vllm import SamplingParams

    engine = llm.llm_engine
    sp = SamplingParams(**job["sampling"])
    ids = [f"g{i}" for i in range(len(job["prompts"]))]
    for rid, prompt in zip(ids, job["prompts"]):
        engine.add_request(rid, {"prompt_token_ids": prompt}, sp)
    results: dict[str, list[int]] = {}
    total = sum(len(p) for p in job["prompts"])
    last = 0.0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                results[out.request_id] = list(out.outputs[0].token_ids)
        if time.monotonic() - last > 2.0:
            last = time.monotonic()
            _report(min(total, _computed_tokens(engine)), total)
    _report(total, total)
    return {"token_ids": [results[r] for r in ids]}


JOBS = {"prompt_logprobs": _prompt_logprobs, "generate": _generate}


def main() -> None:
    spec_path, result_path = sys.argv[1], sys.argv[2]
    spec = json.loads(Path(spec_path).read_text())
    kind = spec["job"]["kind"]
    if kind not in JOBS:
        raise SystemExit(f"unknown job kind {kind!r}; allowed: {sorted(JOBS)}")
    from vllm import LLM

    llm = LLM(**spec["engine"])
    result = JOBS[kind](llm, spec["job"])
    Path(result_path).write_text(json.dumps(result))
    sys.stderr.flush()
    os._exit(0)  # skip engine teardown (seconds) once results are out


if __name__ == "__main__":
    main()
