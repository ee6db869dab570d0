"""The harness through a real vLLM engine (CPU) on SmolLM2 and Austen's text: perplexity with
``full`` equals transformers' own, ``streaming-sink`` equals the transformers StreamingLLM
oracle, and the command line runs end to end."""

import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def austen_tokens(smollm2):
    from transformers import AutoTokenizer

    from vllm_kvstream.data import austen_text

    return AutoTokenizer.from_pretrained(smollm2).encode(austen_text()[:40_000], add_special_tokens=False)


@pytest.fixture(scope="module")
def hf_model(smollm2):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    return AutoModelForCausalLM.from_pretrained(smollm2, torch_dtype=torch.float32).eval()


def test_full_perplexity_equals_transformers(smollm2, austen_tokens, hf_model):
    import torch

    from vllm_kvstream.eval.ppl import Run, perplexity, token_logprobs

    tokens = austen_tokens[:2048]
    got = token_logprobs(smollm2, tokens, Run("full", None, {}), chunk=512)
    with torch.no_grad():
        logits = hf_model(torch.tensor([tokens])).logits[0, :-1].float()
    expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(tokens[1:])[:, None])[:, 0].tolist()
    assert len(got) == len(expected) == 2047
    ppl_vllm, ppl_hf = perplexity(got), perplexity(expected)
    assert abs(ppl_vllm / ppl_hf - 1) < 0.01, (ppl_vllm, ppl_hf)


def test_streaming_sink_perplexity_equals_oracle(smollm2, austen_tokens, hf_model):
    from vllm_kvstream.eval.ppl import Cache, perplexity, plan_runs, token_logprobs
    from vllm_kvstream.reference.streaming_llm import streaming_logprobs

    cache = Cache(4, 252)
    tokens = austen_tokens[: 4 * 256]
    (run,) = plan_runs(["streaming-sink:align=token"], [cache])  # StreamingLLM's 4 sinks exactly
    got = token_logprobs(smollm2, tokens, run, chunk=256)
    ref = streaming_logprobs(hf_model, tokens, sink_tokens=4, window_tokens=252)
    expected = [float(ref[i - 1, tokens[i]]) for i in range(1, len(tokens))]
    ppl_vllm, ppl_oracle = perplexity(got), perplexity(expected)
    assert abs(ppl_vllm / ppl_oracle - 1) < 0.01, (ppl_vllm, ppl_oracle)
    # Past the cache the policy matters: full attention over the same tokens differs.
    (full,) = plan_runs(["full"], [cache])
    assert abs(perplexity(token_logprobs(smollm2, tokens, full, chunk=256)) / ppl_vllm - 1) > 0.005


def run_cli(*args, timeout=900):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "vllm_kvstream.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_cli_rejects_bad_values():
    bad_policy = run_cli("eval", "ppl", "--policies", "full,nope", "--tokens", "100")
    assert bad_policy.returncode == 2
    assert "'nope'" in bad_policy.stderr and "streaming-sink" in bad_policy.stderr
    bad_cache = run_cli("eval", "passkey", "--caches", "4x100")
    assert bad_cache.returncode == 2 and "SINK+WINDOW" in bad_cache.stderr


def test_cli_ppl_writes_table_csv_and_plot(tmp_path):
    out = tmp_path / "ppl"
    proc = run_cli("eval", "ppl", "--policies", "sliding-window,streaming-sink", "--caches", "4+124",
                   "--block-size", "32", "--tokens", "768", "--segment", "128", "--tail", "256", "--chunk", "256", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| streaming-sink 4+124 | 768 |" in proc.stdout
    assert (out / "ppl.png").stat().st_size > 10_000
    rows = (out / "ppl_segments.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 6
    blocks = (out / "ppl_blocks.csv").read_text().splitlines()
    assert blocks[0] == "run,tokens_computed,kv_blocks,rss_mib,peak_kv_blocks,kv_blocks_after"
    # Started again (as after an interruption): every finished run is read back, not recomputed,
    # and the outputs are the same; a run with other settings is computed afresh.
    again = run_cli("eval", "ppl", "--policies", "sliding-window,streaming-sink,full", "--caches", "4+124",
                    "--block-size", "32", "--tokens", "768", "--segment", "128", "--tail", "256", "--chunk", "256",
                    "--full-tokens", "256", "--out", str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("resumed from") == 2 and "full: resumed" not in again.stderr
    assert (out / "ppl_segments.csv").read_text().splitlines()[: len(rows)] == rows
    assert "| full | 256 |" in again.stdout


@pytest.mark.slow
def test_64k_stream_streaming_sink_stays_fluent_sliding_window_does_not(smollm2):
    """The full-length claim (about 15 min on 2 cores): 64K tokens of Austen, 8x SmolLM2's
    context, as one stream at a 4+1020 cache."""
    from transformers import AutoTokenizer

    from vllm_kvstream.data import austen_text
    from vllm_kvstream.eval.ppl import Cache, perplexity, plan_runs, token_logprobs

    tokens = AutoTokenizer.from_pretrained(smollm2).encode(austen_text(), add_special_tokens=False)[:65536]
    sink, window = plan_runs(["streaming-sink", "sliding-window"], [Cache(4, 1020)])
    lp_sink = token_logprobs(smollm2, tokens, sink)
    lp_window = token_logprobs(smollm2, tokens, window)
    head, tail = perplexity(lp_sink[:8192]), perplexity(lp_sink[-8192:])
    assert tail < 1.5 * head, (head, tail)  # no collapse 56K tokens past the trained context
    assert perplexity(lp_window[-8192:]) > 1.2 * tail  # losing the sinks costs quality


@pytest.mark.parametrize("quant", [{}, pytest.param({"kv_quant": "int4"}, marks=pytest.mark.slow)], ids=["float", "int4"])
def test_interrupted_stream_continues_from_its_snapshot_exactly(tiny_model, tmp_path, quant):
    """A stream stopped after two snapshots and run again continues from the second one (the
    blocks the policy keeps, their contents in every layer, the quantization statistics, the
    log-probs so far) and ends with the log-probs of the same stream run whole."""
    import random

    from vllm_kvstream.eval.ppl import Cache, Run, token_logprobs

    rng = random.Random(5)
    tokens = [rng.randrange(100, 40000) for _ in range(2100)]
    run = Run("streaming-sink", Cache(4, 124), {"sink_tokens": 4, "window_tokens": 124, "align": "token"}, quant=quant)
    kw = {"chunk": 128, "block_size": 16}
    whole_blocks: dict = {}
    seen: list[tuple[int, int]] = []
    whole = token_logprobs(tiny_model, tokens, run, blocks=whole_blocks, progress=lambda d, t: seen.append((d, t)),
                           progress_every=0, **kw)
    snap = tmp_path / "run.snapshot.pt"
    stopped = token_logprobs(tiny_model, tokens, run, snapshot=snap, snapshot_every=512, stop_after_snapshots=2, **kw)
    assert stopped is None and snap.exists()
    sabotaged = tmp_path / "sabotaged.snapshot.pt"
    shutil.copy(snap, sabotaged)
    blocks: dict = {}
    resumed: list[tuple[int, int]] = []
    again = token_logprobs(tiny_model, tokens, run, snapshot=snap, snapshot_every=512, blocks=blocks,
                           progress=lambda d, t: resumed.append((d, t)), progress_every=0, **kw)
    assert blocks["resumed_from"] == 1024  # the second snapshot: only the rest was computed
    # The progress bar's feed: a line per step, never stepping back, ending at the stream's
    # length; the continued stream's starts where its snapshot was.
    for reports, first in ((seen, 0), (resumed, 1024)):
        done = [d for d, _ in reports]
        assert len(done) > 5 and done == sorted(done) and done[0] >= first and done[-1] == len(tokens)
        assert {t for _, t in reports} == {len(tokens)}
    assert len(again) == len(whole) == len(tokens) - 1
    assert max(abs(a - b) for a, b in zip(again, whole)) < 1e-4
    assert blocks["after"] == 0 and blocks["peak"] <= whole_blocks["peak"]
    if not quant:
        # The blocks' contents are what carries the stream: the same snapshot with its KV
        # zeroed continues into other log-probs.
        import torch

        state = torch.load(sabotaged, weights_only=False)
        for layer in state["layers"].values():
            layer["blocks"].zero_()
        torch.save(state, sabotaged)
        wrong = token_logprobs(tiny_model, tokens, run, snapshot=sabotaged, snapshot_every=0, **kw)
        assert wrong[:1024] == whole[:1024] or max(abs(a - b) for a, b in zip(wrong[:1024], whole[:1024])) < 1e-4
        assert max(abs(a - b) for a, b in zip(wrong[1024:1200], whole[1024:1200])) > 1e-2
