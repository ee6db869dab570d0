"""Where a decode step's time goes, in one engine: wall time per step of vLLM's model runner,
scheduler and attention calls and of the plugin's attention paths, timed by wrapping them.

One stream of ``LENGTH`` random tokens is prefilled and decoded for ``DECODE`` tokens, twice;
the figures are per decode step (ms) of the second pass after its prefill, with the median
decode step time of both passes. Sized like ``bench_streaming.py`` (cache 4 + 1020, SmolLM2, float32).

    python examples/profile_step.py stock 1000 200
    python examples/profile_step.py streaming-sink 4000 200
    python examples/profile_step.py streaming-sink+int4 4000 200
"""

from __future__ import annotations

import collections
import os
import random
import sys
import time

TOTALS: dict[str, float] = collections.defaultdict(float)
CALLS: collections.Counter = collections.Counter()


def wrap(owner, name: str, key: str) -> None:
    inner = getattr(owner, name)

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            TOTALS[key] += time.perf_counter() - t
            CALLS[key] += 1

    setattr(owner, name, timed)


def instrument(policy: str) -> None:
    from vllm.v1.attention.backends import cpu_attn
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.worker import cpu_model_runner

    wrap(Scheduler, "schedule", "schedule")
    wrap(cpu_attn.CPUAttentionBackendImpl, "forward", "stock attention")
    wrap(cpu_model_runner.CPUModelRunner, "execute_model", "execute_model")
    if "+" in policy:
        from vllm_kvstream.adapter import quant_attention as qa
        from vllm_kvstream.kernels import cpu_ext

        wrap(qa.KVStreamQuantImpl, "forward", "plugin attention")
        wrap(qa, "quant_write", "quant store")
        wrap(qa, "quant_sink_window_decode_cpu", "quant decode")
        wrap(cpu_ext, "quant_decode", "quant decode (C call)")
        wrap(qa.KVStreamQuantBuilder, "build", "plugin metadata")
    elif policy != "stock":
        from vllm_kvstream.adapter import attention as at

        wrap(at.KVStreamMetadataBuilder, "build", "plugin metadata")
        wrap(at.KVStreamImpl, "forward", "plugin attention")
        wrap(at, "sink_direct_decode", "direct read")
        wrap(at, "plan_direct", "direct plan")
        wrap(at, "in_place_decode", "in-place read")
        wrap(at, "stage_sinks_", "sink staging")


def main() -> None:
    policy, length, decode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # one process: the wrappers see every call
    os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
    from vllm import LLM, SamplingParams

    from vllm_kvstream.models import prepare_smollm2

    kw = dict(model=str(prepare_smollm2()), enforce_eager=True, dtype="float32", seed=0, max_num_batched_tokens=2048,
              enable_prefix_caching=False, max_num_seqs=16)
    name, _, quant = policy.partition("+")
    if name == "stock":
        kw["max_model_len"] = 8192
    else:
        from vllm_kvstream.policies import get_policy_class

        kw["additional_config"] = {"kv_policy": name, "kv_policy_config": get_policy_class(name).params_for_cache(4, 1020) or {}}
        if quant:
            kw["additional_config"]["kv_quant"] = quant
    llm = LLM(**kw)
    instrument(policy)
    engine, rng = llm.llm_engine, random.Random(0)
    sp = SamplingParams(max_tokens=decode, temperature=0.0, ignore_eos=True)
    steps: list[float] = []
    for rep in range(2):
        engine.add_request(f"r{rep}", {"prompt_token_ids": [rng.randrange(200, 40000) for _ in range(length)]}, sp)
        n = 0
        while engine.has_unfinished_requests():
            t = time.perf_counter()
            outs = engine.step()
            dt = time.perf_counter() - t
            if outs and len(outs[0].outputs[0].token_ids) > 1:
                steps.append(dt)
            if rep == 1 and n == 3:  # totals: the second pass's decode steps (after its prefill)
                TOTALS.clear()
                CALLS.clear()
            n += 1
    steps.sort()
    per_step = max(1, CALLS["schedule"])
    lines = [f"{policy} at {length} tokens: median decode step {1e3 * steps[len(steps) // 2]:.2f} ms ({len(steps)} steps)"]
    for key in sorted(TOTALS, key=lambda k: -TOTALS[k]):
        lines.append(f"  {key:24s} {1e3 * TOTALS[key] / per_step:8.3f} ms/step   {CALLS[key] / per_step:5.1f} calls/step")
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()
    os._exit(0)  # the engine's threads would keep the process up


if __name__ == "__main__":
    main()
