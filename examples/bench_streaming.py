"""Benchmark: KV blocks held and decode ms/token against stream length, stock vLLM beside the
plugin, in one run.

For stock vLLM (plugin inert), ``full`` and ``streaming-sink`` (4 + 1020), a stream of
L = 1x, 4x and 16x the cache size (1024 tokens) is prefilled and then decoded for
``--decode`` tokens; the script prints blocks held at the end of the stream (read from vLLM's
block pool) and the median decode step time, each as a ratio to the same engine's 1x figure,
and the plugin's 1x/4x decode time as a ratio to stock's. Stock vLLM cannot go past the
model's trained context (8K for SmolLM2: its RoPE table ends there), so its 16x row is skipped.

    python examples/bench_streaming.py [--model PATH] [--decode 32] [--lengths 1,4,16]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

CACHE = 1024


def run_one(args: argparse.Namespace) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
    from vllm import LLM, SamplingParams

    lengths = [CACHE * m for m in args.lengths]
    kw = dict(model=args.model, enforce_eager=True, dtype=args.dtype, seed=0,
              max_num_batched_tokens=args.chunk, enable_prefix_caching=False)
    if args.policy == "stock":
        kw["max_model_len"] = min(max(lengths), 8192)
    else:
        params = {"sink_tokens": 4, "window_tokens": CACHE - 4} if args.policy == "streaming-sink" else {}
        kw["additional_config"] = {"kv_policy": args.policy, "kv_policy_config": params}
        if args.policy == "full":
            kw["max_model_len"] = max(lengths) + 8
    llm = LLM(**kw)
    engine = llm.llm_engine
    pool = engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
    rng = random.Random(0)
    rows = []
    for mult, length in zip(args.lengths, lengths):
        if length > engine.vllm_config.model_config.max_model_len:
            continue
        free0 = pool.get_num_free_blocks()
        prompt = [rng.randrange(200, 40000) for _ in range(length - args.decode)]
        sp = SamplingParams(max_tokens=args.decode, temperature=0.0, ignore_eos=True)
        engine.add_request(f"r{mult}", {"prompt_token_ids": prompt}, sp)
        step_times, held, produced = [], 0, 0
        while engine.has_unfinished_requests():
            t = time.perf_counter()
            outs = engine.step()
            dt = time.perf_counter() - t
            held = max(held, free0 - pool.get_num_free_blocks())
            for o in outs:
                new = len(o.outputs[0].token_ids)
                if produced >= 1 and new > produced:  # a decode step (first token ends prefill)
                    step_times.append(dt)
                produced = new
        rows.append({"mult": mult, "length": length, "blocks": held,
                     "ms_per_token": 1000 * statistics.median(step_times)})
    sys.stdout.write(json.dumps({"policy": args.policy, "rows": rows}) + "\n")
    sys.stdout.flush()
    os._exit(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the prepared SmolLM2)")
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=2048, help="max_num_batched_tokens (prefill chunk)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    ap.add_argument("--policies", default="stock,full,streaming-sink")
    ap.add_argument("--policy", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.model is None:
        from vllm_kvstream.models import prepare_smollm2

        args.model = str(prepare_smollm2())
    if args.policy:
        run_one(args)
        return
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4"),
           "HF_HUB_OFFLINE": "1"}
    results = {}
    for policy in args.policies.split(","):
        cmd = [sys.executable, __file__, "--policy", policy, "--model", args.model, "--decode", str(args.decode),
               "--chunk", str(args.chunk), "--dtype", args.dtype, "--lengths", ",".join(map(str, args.lengths))]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{policy} failed:\n{out.stderr[-4000:]}")
        results[policy] = json.loads(out.stdout.strip().splitlines()[-1])["rows"]
    stock = {r["mult"]: r for r in results.get("stock", [])}
    lines = ["| policy | stream | KV blocks held | blocks ratio vs 1x | decode ms/token | ms/token ratio vs 1x | ms/token vs stock |",
             "|---|---|---|---|---|---|---|"]
    for policy, rows in results.items():
        base = rows[0]
        for r in rows:
            vs_stock = (f"{r['ms_per_token'] / stock[r['mult']]['ms_per_token']:.2f}"
                        if r["mult"] in stock and policy != "stock" else "-")
            lines.append(f"| {policy} | {r['mult']}x ({r['length']} tok) | {r['blocks']} | "
                         f"{r['blocks'] / base['blocks']:.2f} | {r['ms_per_token']:.1f} | "
                         f"{r['ms_per_token'] / base['ms_per_token']:.2f} | {vs_stock} |")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
