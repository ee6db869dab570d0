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


def run_generate(llm, job):
    from vllm import SamplingParams

    engine = llm.llm_engine
    core, manager, pool = _pool_state(engine)
    free_start = pool.get_num_free_blocks()
    sp = SamplingParams(**job["sampling"])
    ids = [f"{job.get('tag', 'g')}-{i}" for i in range(len(job["prompts"]))]
    for rid, prompt in zip(ids, job["prompts"]):
        engine.add_request(rid, {"prompt_token_ids": prompt}, sp)
    results = {rid: None for rid in ids}
    peak_held = {rid: 0 for rid in ids}
    peak_held_decode = {rid: 0 for rid in ids}
    peak_used = 0
    steps = 0
    abort_after = job.get("abort_after_steps")
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                comp = out.outputs[0]
                results[out.request_id] = {
                    "token_ids": list(comp.token_ids),
                    "finish_reason": comp.finish_reason,
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

    llm = LLM(**spec["engine"])
    out = {
        "max_model_len": llm.llm_engine.vllm_config.model_config.max_model_len,
        "block_size": llm.llm_engine.vllm_config.cache_config.block_size,
        "num_blocks": _pool_state(llm.llm_engine)[2].num_gpu_blocks,
        "attn_isa": _attention_isas(llm.llm_engine),
        "jobs": [run_generate(llm, job) for job in spec["jobs"]],
    }
    sys.stdout.write("\n" + json.dumps(out) + "\n")
    sys.stdout.flush()
    os._exit(0)  # skip engine teardown (seconds) once results are out


if __name__ == "__main__":
    main()
