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


def _worker_runner(engine):
    """The model runner of the in-process engine (one worker: ``UniProcExecutor``)."""
    return engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner


def _layer_caches(engine) -> dict[str, tuple[int, Any, Any]]:
    """``{layer name: (KV group, layer, its cache tensor)}`` of every attention layer."""
    runner = _worker_runner(engine)
    groups = {name: g for g, group in enumerate(runner.kv_cache_config.kv_cache_groups) for name in group.layer_names}
    ctx = runner.vllm_config.compilation_config.static_forward_context
    out = {}
    for name, layer in ctx.items():
        if name in groups and hasattr(layer, "kv_cache"):
            cache = layer.kv_cache[0] if isinstance(layer.kv_cache, (list, tuple)) else layer.kv_cache
            out[name] = (groups[name], layer, cache)
    return out


def _block_dim(cache, num_blocks: int) -> int:
    """The dimension of a layer's cache tensor that indexes blocks (its size is the pool's)."""
    for dim, size in enumerate(cache.shape):
        if size == num_blocks:
            return dim
    raise RuntimeError(f"no dimension of a KV cache of shape {tuple(cache.shape)} has the pool's {num_blocks} blocks")


def _only_request(engine) -> str:
    """The engine's id of the one request it holds (vLLM suffixes the id a caller gives)."""
    ids = list(engine.engine_core.engine_core.scheduler.requests)
    if len(ids) != 1:
        raise RuntimeError(f"a snapshot is of a stream run alone; the engine holds {len(ids)} requests")
    return ids[0]


def take_snapshot(engine, rid: str, logprobs_so_far: list[float], extra: dict[str, Any]) -> dict[str, Any]:
    """Everything a stream's continuation depends on, at a step boundary: tokens computed, the
    log-probs of the tokens they predict, per KV group the logical indices of the blocks the
    request still holds, those blocks' contents in every layer, and each layer's online
    quantization statistics (``--kv-quant``). What the policy keeps is a function of the
    position, so nothing else is needed (a block-selecting policy is refused: its selection
    store is not saved)."""
    import torch

    core = engine.engine_core.engine_core
    req = core.scheduler.requests[rid]
    n = int(req.num_computed_tokens)
    managers = core.scheduler.kv_cache_manager.coordinator.single_type_managers
    kept = [[(i, b.block_id) for i, b in enumerate(m.req_to_blocks.get(rid, ())) if not b.is_null] for m in managers]
    pool = core.scheduler.kv_cache_manager.block_pool
    layers = {}
    for name, (g, layer, cache) in _layer_caches(engine).items():
        dim = _block_dim(cache, pool.num_gpu_blocks)
        ids = torch.tensor([b for _, b in kept[g]], dtype=torch.long, device=cache.device)
        stats = getattr(layer.impl, "stats", None)
        layers[name] = {"dim": dim, "blocks": cache.index_select(dim, ids).cpu().clone(), "stats": stats}
    return {"tokens_computed": n, "logprobs": list(logprobs_so_far), "kept": [[i for i, _ in k] for k in kept],
            "layers": layers, **extra}


def restore_snapshot(engine, rid: str, snap: dict[str, Any]) -> None:
    """Give the request ``rid`` (added, not yet scheduled) the state :func:`take_snapshot` saved:
    fresh blocks at the kept logical indices (the null block at the others, as the manager
    leaves freed ones), their contents copied in, ``num_computed_tokens`` set. The scheduler
    then continues the prefill from there, as it does a request whose KV was loaded (its
    ``num_computed_tokens > 0`` branch for waiting requests)."""
    import torch

    core = engine.engine_core.engine_core
    req = core.scheduler.requests[rid]
    n = int(snap["tokens_computed"])
    kvm = core.scheduler.kv_cache_manager
    pool = kvm.block_pool
    new_ids = []
    for mgr, kept in zip(kvm.coordinator.single_type_managers, snap["kept"]):
        fresh = pool.get_new_blocks(len(kept))
        row = [pool.null_block] * (-(-n // mgr.block_size))
        for i, block in zip(kept, fresh):
            row[i] = block
        mgr.req_to_blocks[rid] = row
        new_ids.append([b.block_id for b in fresh])
    for name, (g, layer, cache) in _layer_caches(engine).items():
        saved = snap["layers"][name]
        ids = torch.tensor(new_ids[g], dtype=torch.long, device=cache.device)
        cache.index_copy_(saved["dim"], ids, saved["blocks"].to(cache.device))
        if saved["stats"] is not None:
            layer.impl.stats = saved["stats"]
    req.num_computed_tokens = n


def _save(path: Path, obj: dict[str, Any]) -> None:
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)  # never half written


def _prompt_logprobs(llm, job: dict[str, Any]) -> dict[str, Any]:
    """``job``: ``tokens``; optional ``snapshot`` (a path), ``snapshot_every`` (tokens): every
    that many tokens the stream's state is saved there (:func:`take_snapshot`), and a job whose
    snapshot exists continues from it, computing only what is left. ``stop_after_snapshots``
    ends the job after that many (tests interrupt a stream so). ``report_every``: seconds
    between progress lines (default 2; 0: every engine step)."""
    import torch
    from vllm import SamplingParams

    engine = llm.llm_engine
    tokens = job["tokens"]
    snap_path = Path(job["snapshot"]) if job.get("snapshot") else None
    every = int(job.get("snapshot_every") or 0)
    stop_after = job.get("stop_after_snapshots")
    report_every = float(job.get("report_every", 2.0))
    pool = engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
    free_start = pool.get_num_free_blocks()
    # detokenize=False: a continued stream's prompt log-probs before the snapshot are not
    # computed again (their slots are unset); they come from the snapshot, never decoded.
    engine.add_request("ppl", {"prompt_token_ids": tokens},
                       SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False))
    snap = torch.load(snap_path, weights_only=False) if snap_path is not None and snap_path.exists() else None
    # (tokens computed, KV blocks in use: every group, vLLM's pool; resident memory of this
    # process, which runs the engine core and the worker: VLLM_ENABLE_V1_MULTIPROCESSING=0)
    blocks: list[tuple[int, int, float]] = []
    peak = 0
    start = 0
    if snap is not None:
        restore_snapshot(engine, _only_request(engine), snap)
        start, blocks, peak = snap["tokens_computed"], list(snap["blocks"]), snap["peak"]
    before = snap["logprobs"] if snap is not None else []  # the tokens the snapshot had scored
    result = None
    last = 0.0
    taken = 0
    next_snap = (start // every + 1) * every if every else None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                result = before + [lp[tok].logprob for lp, tok in
                                   zip(out.prompt_logprobs[1 + len(before):], out.prompt_token_ids[1 + len(before):])]
        used = free_start - pool.get_num_free_blocks()
        peak = max(peak, used)
        computed = _computed_tokens(engine)
        # Once the request finished it has left the scheduler (``computed`` reads 0): the
        # stream's last progress line is the final one below, never a step back to 0.
        if result is None and time.monotonic() - last >= report_every:
            last = time.monotonic()
            blocks.append((computed, used, rss_mib()))
            _report(computed, len(tokens))
        if next_snap is not None and result is None and next_snap <= computed < len(tokens):
            runner = _worker_runner(engine)
            rid = _only_request(engine)
            partial = runner.requests[rid].in_progress_prompt_logprobs_cpu
            fresh = partial.logprobs[len(before):computed, 0].tolist() if partial is not None else []
            _save(snap_path, take_snapshot(engine, rid, before + fresh, {"blocks": blocks, "peak": peak}))
            next_snap = (computed // every + 1) * every
            taken += 1
            if stop_after is not None and taken >= stop_after:
                return {"interrupted_at": computed}
    _report(len(tokens), len(tokens))
    return {"logprobs": result, "blocks": blocks, "peak_blocks": peak,
            "blocks_after": free_start - pool.get_num_free_blocks(), "resumed_from": start}


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
    reported = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                results[out.request_id] = list(out.outputs[0].token_ids)
        if time.monotonic() - last > 2.0:
            last = time.monotonic()
            # Finished requests leave the scheduler: the count of the ones still running can
            # fall; the bar never steps back.
            reported = max(reported, min(total, _computed_tokens(engine)))
            _report(reported, total)
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
