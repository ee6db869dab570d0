"""Benchmark: KV blocks held and decode ms/token against stream length, stock vLLM beside the
plugin, in one run.

For stock vLLM (plugin inert) and each policy given, sized to a cache of 4 + 1020 tokens
(``full``, ``streaming-sink``, ``topk-importance``, ...; ``NAME+int8`` / ``NAME+int4`` with
quantized KV blocks), a stream of
L = 1x, 4x and 16x the cache size (1024 tokens) is prefilled and then decoded for
``--decode`` tokens. Printed per row, read from vLLM's block pool: the most blocks the
request held while decoding, and the peak over the whole stream (prefill chunks included);
the median decode step time, and the prefill time per 1K prompt tokens. Ratios: to the same engine's 1x figure, and the plugin's
to stock's at the same length and at 1x (stock reading the same number of tokens a bounded
policy reads past eviction), and to ``streaming-sink``'s at the same length (the overhead of scoring, for
``topk-importance``). Stock vLLM cannot go past the model's trained context (8K for
SmolLM2: its RoPE table ends there), so its 16x row is skipped.

Timing on a shared CPU drifts by tens of percent within minutes, so the policies run in
turn, ``--rounds`` times, each in a fresh engine process, and each figure is the lowest of
its rounds' medians (the least disturbed run). Inside each engine the lengths are measured
in turn ``--repeats`` times (1x, 4x, 16x, 1x, 4x, 16x, ...) so that the lengths being compared
are measured minutes, not a whole run, apart, after one warm-up stream of the longest length
(see ``run_one``).

With ``--streams N`` each measurement runs N streams at once (stock with the KV memory to hold
them all): the decode figure is then the TPOT of a batch of N, the same batch for every
policy.

    python examples/bench_streaming.py [--model PATH] [--decode 24] [--lengths 1,4,16] [--repeats 2] [--rounds 1] [--streams 1]
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


def measure(engine, pool, rng, request_id: str, length: int, decode: int, streams: int = 1) -> dict:
    """Prefill ``streams`` random prompts at once so each stream reaches ``length`` tokens after
    ``decode`` greedy tokens; return the blocks held per stream while decoding, the peak, the
    median decode step time (all streams decoding: the TPOT of that batch) and the prefill time
    per 1K prompt tokens."""
    from vllm import SamplingParams

    free0 = pool.get_num_free_blocks()
    sp = SamplingParams(max_tokens=decode, temperature=0.0, ignore_eos=True)
    prompt_tokens = 0
    for i in range(streams):
        prompt = [rng.randrange(200, 40000) for _ in range(length - decode)]
        prompt_tokens += len(prompt)
        engine.add_request(f"{request_id}-{i}", {"prompt_token_ids": prompt}, sp)
    produced = {f"{request_id}-{i}": 0 for i in range(streams)}
    step_times, peak, held = [], 0, 0
    prefill = 0.0
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t
        if min(produced.values()) == 0:  # chunked prefill, up to the step that samples every first token
            prefill += dt
        in_use = free0 - pool.get_num_free_blocks()
        peak = max(peak, in_use)
        grew = 0
        for o in outs:
            new = len(o.outputs[0].token_ids)
            if produced[o.request_id] >= 1 and new > produced[o.request_id]:
                grew += 1
            produced[o.request_id] = new
        if grew == streams:  # a decode step of the whole batch
            step_times.append(dt)
            if all(0 < n < decode for n in produced.values()):
                held = max(held, in_use)
    return {"length": length, "blocks": -(-held // streams), "peak_blocks": peak,
            "ms_per_token": 1000 * statistics.median(step_times), "prefill_ms_per_1k": 1e6 * prefill / prompt_tokens}


def run_one(args: argparse.Namespace) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
    from vllm import LLM, SamplingParams

    lengths = [CACHE * m for m in args.lengths]
    kw = dict(model=args.model, enforce_eager=True, dtype=args.dtype, seed=0,
              max_num_batched_tokens=args.chunk, enable_prefix_caching=False, max_num_seqs=max(16, args.streams))
    if args.block_size:
        kw["block_size"] = args.block_size
    name, _, quant = args.policy.partition("+")
    if name == "stock":
        kw["max_model_len"] = min(max(lengths), 8192)
    else:
        from vllm_kvstream.policies import get_policy_class

        # Every policy sized to the same cache of 4 + 1020 tokens, as it says it spends it.
        params = get_policy_class(name).params_for_cache(4, CACHE - 4) or {}
        kw["additional_config"] = {"kv_policy": name, "kv_policy_config": params}
        if quant:
            kw["additional_config"]["kv_quant"] = quant
        if name == "full":
            kw["max_model_len"] = max(lengths) + 8
    llm = LLM(**kw)
    engine = llm.llm_engine
    pool = engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
    rng = random.Random(0)
    # Warm-up: one stream of the longest length first. A process that has prefilled a long
    # prompt decodes ~10-30% slower afterwards, stock kernels and matmuls included (seen on
    # this CPU); warming up puts every measured length in that same state.
    warm = min(max(lengths), engine.vllm_config.model_config.max_model_len) - 2
    engine.add_request("warm", {"prompt_token_ids": [rng.randrange(200, 40000) for _ in range(warm)]},
                       SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    best: dict[int, dict] = {}
    for rep in range(args.repeats):
        for mult, length in zip(args.lengths, lengths):
            if length > engine.vllm_config.model_config.max_model_len:
                continue
            row = measure(engine, pool, rng, f"r{rep}-{mult}", length, args.decode, args.streams)
            row["mult"] = mult
            if mult in best:
                for key in ("ms_per_token", "prefill_ms_per_1k"):
                    row[key] = min(row[key], best[mult][key])
            best[mult] = row
    rows = [best[m] for m in args.lengths if m in best]
    sys.stdout.write(json.dumps({"policy": args.policy, "rows": rows}) + "\n")
    sys.stdout.flush()
    os._exit(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the prepared SmolLM2)")
    ap.add_argument("--decode", type=int, default=24)
    ap.add_argument("--streams", type=int, default=1,
                    help="concurrent streams per measurement; decode ms/token is then the batch's TPOT")
    ap.add_argument("--rounds", type=int, default=1, help="fresh engine processes per policy, in turn")
    ap.add_argument("--repeats", type=int, default=2, help="passes over the lengths inside each engine")
    ap.add_argument("--block-size", type=int, default=None, help="KV block size (default: vLLM's)")
    ap.add_argument("--chunk", type=int, default=2048, help="max_num_batched_tokens (prefill chunk)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    ap.add_argument("--policies", default="stock,full,streaming-sink")
    ap.add_argument("--policy", help=argparse.SUPPRESS)
    args = ap.parse_args()
    # Streams prefill one chunk per step, in turn: the batch decodes all at once only after the
    # last stream's prefill, so the decode must outlast every other stream's chunks.
    chunks = args.streams * -(-CACHE * max(args.lengths) // args.chunk)
    if args.streams > 1 and args.decode <= chunks + 8:
        ap.error(f"--decode {args.decode} is too short for --streams {args.streams} at --lengths "
                 f"{','.join(map(str, args.lengths))}: the first stream finishes before the last one's {chunks} "
                 f"prefill chunks are done, so no step decodes the whole batch; allowed: --decode > {chunks + 8}")
    if args.model is None:
        from vllm_kvstream.models import prepare_smollm2

        args.model = str(prepare_smollm2())
    if args.policy:
        run_one(args)
        return
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4"),
           "HF_HUB_OFFLINE": "1"}
    results: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        for policy in args.policies.split(","):
            cmd = [sys.executable, __file__, "--policy", policy, "--model", args.model, "--decode", str(args.decode),
                   "--repeats", str(args.repeats), "--streams", str(args.streams),
                   "--chunk", str(args.chunk), "--dtype", args.dtype, "--lengths", ",".join(map(str, args.lengths))]
            if args.block_size:
                cmd += ["--block-size", str(args.block_size)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{policy} failed:\n{out.stderr[-4000:]}")
            rows = json.loads(out.stdout.strip().splitlines()[-1])["rows"]
            if policy not in results:
                results[policy] = rows
                continue
            for best, r in zip(results[policy], rows):
                for key in ("ms_per_token", "prefill_ms_per_1k"):
                    best[key] = min(best[key], r[key])
    stock = {r["mult"]: r for r in results.get("stock", [])}
    sink = {r["mult"]: r for r in results.get("streaming-sink", [])}
    # "vs stock 1x": against stock reading the same number of tokens (a bounded policy past
    # eviction attends to its 1024-token cache, which is what stock attends to at 1x).
    lines = ["| policy | stream | KV blocks held (decode) | ratio vs 1x | peak blocks (prefill incl.) "
             "| decode ms/token | ratio vs 1x | vs stock | vs stock 1x (same tokens read) | vs streaming-sink "
             "| prefill ms/1K tokens | vs stock | vs stock 1x |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def ratio(r, other, key):
        return f"{r[key] / other[key]:.2f}" if other is not None else "-"

    for policy, rows in results.items():
        base = rows[0]
        for r in rows:
            mine = policy != "stock"
            same_len = stock.get(r["mult"]) if mine else None
            one_x = stock.get(1) if mine else None
            vs_sink = sink.get(r["mult"]) if policy not in ("stock", "streaming-sink") else None
            lines.append(f"| {policy} | {r['mult']}x ({r['length']} tok) | {r['blocks']} | "
                         f"{r['blocks'] / base['blocks']:.2f} | {r['peak_blocks']} | {r['ms_per_token']:.1f} | "
                         f"{r['ms_per_token'] / base['ms_per_token']:.2f} | {ratio(r, same_len, 'ms_per_token')} | "
                         f"{ratio(r, one_x, 'ms_per_token')} | {ratio(r, vs_sink, 'ms_per_token')} | "
                         f"{r['prefill_ms_per_1k']:.0f} | {ratio(r, same_len, 'prefill_ms_per_1k')} | "
                         f"{ratio(r, one_x, 'prefill_ms_per_1k')} |")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
