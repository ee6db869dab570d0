"""Run one vLLM engine (in this process, so the scheduler's block pool can be read) through a
list of jobs and print the results as JSON on the last line of stdout.

Used by the end-to-end tests, one subprocess per engine:
    python tests/e2e/engine_runner.py '{"engine": {...}, "jobs": [...]}'
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def _pool_state(engine):
    core = engine.engine_core.engine_core
    manager = core.scheduler.kv_cache_manager
    return core, manager, manager.block_pool


def _held(manager, req_id):
    """Non-null blocks the scheduler's manager holds for a request (vLLM appends a random
    suffix to external request ids)."""
    total = 0
    for single in manager.coordinator.single_type_managers:
        for key, blocks in single.req_to_blocks.items():
            if key == req_id or key.startswith(req_id + "-"):
                total += sum(not b.is_null for b in blocks)
    return total


def _decoding(core, req_id):
    """Whether the request has run a decode step (its blocks were trimmed for decoding: right
    after the last prefill chunk, that chunk's blocks are still held)."""
    for key, req in core.scheduler.requests.items():
        if key == req_id or key.startswith(req_id + "-"):
            return req.num_computed_tokens > req.num_prompt_tokens
    return False


def _attention_isas(engine):
    """The CPU attention kernel ISAs (``vec``, ``vec16``, ``amx``...) vLLM's CPU builder set on
    the attention layers; empty where no layer runs the stock CPU kernel."""
    context = engine.vllm_config.compilation_config.static_forward_context
    return sorted({layer.isa for layer in context.values() if getattr(layer, "isa", None)})


#: What a block no request references is filled with: finite (kernels read the unwritten tail of
#: a request's last block and mask it, and 0 x NaN would be NaN), far off any real key or value
#: (a key of 1e4 in every channel outscores every real key, so one attended poisoned token takes
#: the whole softmax and moves the log-probabilities by whole units).
POISON = 1.0e4


def _poison_freed_blocks(engine) -> dict:
    """Fill every KV block with :data:`POISON` (all layers) the moment no request references it
    any more. A freed block that vLLM would keep in the prefix cache is dropped from it first
    (so no later hit may legitimately read it): only blocks that some running request still
    references are shared. A request that reads a block it does not own (another request's, or
    one it gave up) then attends to poison, so a block freed or overwritten while still
    referenced shows in the outputs. Needs the worker in this process
    (VLLM_ENABLE_V1_MULTIPROCESSING=0, one worker). Returns a counter of blocks poisoned."""
    core, _, pool = _pool_state(engine)
    caches = core.model_executor.driver_worker.worker.model_runner.kv_caches
    count = {"n": 0}
    free_blocks = pool.free_blocks

    def free_and_poison(ordered_blocks):
        blocks = list(ordered_blocks)
        free_blocks(blocks)
        ids = []
        for b in blocks:
            if b.ref_cnt == 0 and not b.is_null:
                pool._maybe_evict_cached_block(b)  # no longer a prefix-cache hit
                ids.append(b.block_id)
        if ids:
            for cache in caches:
                cache[ids] = POISON
            count["n"] += len(ids)

    pool.free_blocks = free_and_poison
    return count


def run_generate(llm, job):
    from vllm import SamplingParams

    engine = llm.llm_engine
    core, manager, pool = _pool_state(engine)
    free_start = pool.get_num_free_blocks()
    sp = SamplingParams(**job["sampling"])
    ids = [f"{job.get('tag', 'g')}-{i}" for i in range(len(job["prompts"]))]
    # Per request: the step it arrives at (0: before the first step), and its own output length.
    arrive = job.get("arrive_at_steps") or [0] * len(ids)
    per_request_max = job.get("max_tokens_each")
    pending = sorted(zip(arrive, range(len(ids))))

    extra_args_each = job.get("extra_args_each")  # per request: SamplingParams.extra_args

    def add_arrivals(step):
        while pending and pending[0][0] <= step:
            i = pending.pop(0)[1]
            params = sp if per_request_max is None and extra_args_each is None else sp.clone()
            if per_request_max is not None:
                params.max_tokens = per_request_max[i]
            if extra_args_each is not None:
                params.extra_args = extra_args_each[i]
            engine.add_request(ids[i], {"prompt_token_ids": job["prompts"][i]}, params)

    if job.get("expect_error"):  # the request must be refused before it reaches the engine
        try:
            add_arrivals(0)
        except Exception as exc:  # noqa: BLE001 (the test checks the type: vLLM's VLLMValidationError)
            return {"error": str(exc), "error_type": type(exc).__name__, "free": pool.get_num_free_blocks()}
        raise AssertionError(f"job {job.get('tag')} was accepted")
    add_arrivals(0)
    results = {rid: None for rid in ids}
    peak_held = {rid: 0 for rid in ids}
    peak_held_decode = {rid: 0 for rid in ids}
    peak_used = 0
    steps = 0
    abort_after = job.get("abort_after_steps")
    while engine.has_unfinished_requests() or pending:
        add_arrivals(steps)
        for out in engine.step():
            if out.finished:
                comp = out.outputs[0]
                results[out.request_id] = {
                    "token_ids": list(comp.token_ids),
                    "finish_reason": comp.finish_reason,
                    "cached_tokens": out.num_cached_tokens,  # prompt tokens served by prefix-cache hits
                    "prompt_logprobs": (
                        [None if lp is None else lp[tok].logprob for lp, tok in zip(out.prompt_logprobs, out.prompt_token_ids)]
                        if out.prompt_logprobs is not None
                        else None
                    ),
                    "logprobs": (
                        [lp[tok].logprob for lp, tok in zip(comp.logprobs, comp.token_ids)] if comp.logprobs else None
                    ),
                    # Per generated position, [token, logprob] of the ranks vLLM returned, best
                    # first (``logprobs=2``: the top 2), for tests/e2e/greedy_compare.py.
                    "top_logprobs": (
                        [
                            [[t, lp.logprob] for t, lp in sorted(pos.items(), key=lambda kv: kv[1].rank)]
                            for pos in comp.logprobs
                        ]
                        if comp.logprobs
                        else None
                    ),
                }
        steps += 1
        peak_used = max(peak_used, free_start - pool.get_num_free_blocks())
        for rid in ids:
            peak_held[rid] = max(peak_held[rid], _held(manager, rid))
            if _decoding(core, rid):
                peak_held_decode[rid] = max(peak_held_decode[rid], _held(manager, rid))
        if abort_after is not None and steps == abort_after:
            engine.abort_request(ids)
    return {
        "results": [results[r] for r in ids],
        "peak_held": [peak_held[r] for r in ids],
        "peak_held_decode": [peak_held_decode[r] for r in ids],
        "peak_used": peak_used,
        "free_start": free_start,
        "free_end": pool.get_num_free_blocks(),
        "steps": steps,
    }


def main() -> None:
    spec = json.loads(sys.argv[1])
    from vllm import LLM

    poison = spec["engine"].pop("poison_freed", False)  # the runner's option, not vLLM's
    llm = LLM(**spec["engine"])
    poisoned = _poison_freed_blocks(llm.llm_engine) if poison else None
    out = {
        "max_model_len": llm.llm_engine.vllm_config.model_config.max_model_len,
        "block_size": llm.llm_engine.vllm_config.cache_config.block_size,
        "num_blocks": _pool_state(llm.llm_engine)[2].num_gpu_blocks,
        "attn_isa": _attention_isas(llm.llm_engine),
        "jobs": [run_generate(llm, job) for job in spec["jobs"]],
    }
    if poisoned is not None:
        out["poisoned_blocks"] = poisoned["n"]
    sys.stdout.write("\n" + json.dumps(out) + "\n")
    sys.stdout.flush()
    # Skip engine teardown (seconds) once results are out, but take the worker processes of a
    # multiprocess executor (tensor parallelism) along: an orphaned rank can sit in a
    # collective for its dead peer, holding the stdout the test reads until it times out.
    import psutil

    for child in psutil.Process().children(recursive=True):
        child.kill()
    os._exit(0)


if __name__ == "__main__":
    main()
