"""The evaluation harness without an engine: cache sizes, run planning, segment arithmetic,
passkey prompt construction, and the files it writes."""

import csv
import math
from pathlib import Path

import pytest

from vllm_kvstream.errors import KVStreamConfigError
from vllm_kvstream.eval.passkey import answer_correct, build_trials
from vllm_kvstream.eval.passkey import write_outputs as write_passkey
from vllm_kvstream.eval.ppl import Cache, perplexity, plan_runs, segments, write_outputs


def test_cache_parse_and_errors():
    assert Cache.parse("4+1020") == Cache(4, 1020)
    for bad in ["4x1020", "1020", "a+b", "4+0", "4+-3"]:
        with pytest.raises(ValueError, match="cache size"):
            Cache.parse(bad)


def test_plan_runs_sizes_each_policy_and_runs_full_once():
    runs = plan_runs(["full", "sliding-window", "streaming-sink"], [Cache(4, 252), Cache(4, 1020)])
    labels = [r.label for r in runs]
    assert labels == ["full", "sliding-window 4+252", "sliding-window 4+1020",
                      "streaming-sink 4+252", "streaming-sink 4+1020"]
    assert runs[1].params == {"window_tokens": 256}
    assert runs[4].params == {"sink_tokens": 4, "window_tokens": 1020}


def test_policy_options_override_sizing_and_label_the_run():
    runs = plan_runs(["topk-importance:score=key-norm:decay=0.99", "full"], [Cache(4, 508)])
    assert [r.label for r in runs] == ["topk-importance:score=key-norm:decay=0.99 4+508", "full"]
    assert runs[0].params == {"budget_tokens": 512, "sink_tokens": 4, "recent_tokens": 254,
                              "score": "key-norm", "decay": 0.99}
    with pytest.raises(KVStreamConfigError, match=r"score='h2o'.*one of 'attention', 'key-norm'"):
        plan_runs(["topk-importance:score=h2o"], [Cache(4, 508)])
    with pytest.raises(ValueError, match="policy option 'decay' in 'topk-importance:decay' is not KEY=VALUE"):
        plan_runs(["topk-importance:decay"], [Cache(4, 508)])


def test_plan_runs_rejects_unknown_policy_naming_allowed():
    with pytest.raises(KVStreamConfigError, match="streaming-sink"):
        plan_runs(["nope"], [Cache(4, 252)])


def test_segments_and_perplexity():
    lps = [math.log(0.5)] * 5 + [math.log(0.25)] * 5
    assert perplexity(lps[:5]) == pytest.approx(2.0)
    segs = segments(lps, 5)
    assert [(a, b) for a, b, _ in segs] == [(1, 6), (6, 11)]
    assert [p for _, _, p in segs] == pytest.approx([2.0, 4.0])
    assert perplexity(lps) == pytest.approx(math.sqrt(8.0))


def test_ppl_outputs_written(tmp_path):
    results = {"full": [-1.0] * 3000, "streaming-sink 4+252": [-1.5] * 3000}
    summary = write_outputs(tmp_path, results, segment=1000, tail_tokens=1000, trained_context=2048, title="t")
    assert summary["full"]["ppl"] == pytest.approx(math.e)
    rows = list(csv.DictReader((tmp_path / "ppl_segments.csv").open()))
    assert len(rows) == 6 and {r["run"] for r in rows} == set(results)
    assert (tmp_path / "ppl.png").stat().st_size > 10_000
    assert "streaming-sink 4+252" in (tmp_path / "ppl_summary.md").read_text()


class CharTokenizer:
    """One token per character: lengths are easy to check."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_prompts_have_exact_length_and_needle_at_depth(depth):
    trials = build_trials(CharTokenizer(), [1500, 3000], [depth], trials=2, seed=1)
    assert len(trials) == 4
    for t in trials:
        text = "".join(map(chr, t.prompt))
        assert len(t.prompt) == t.length
        needle = f" The pass key is {t.key}. Remember it. {t.key} is the pass key."
        at = text.index(needle)
        filler_start = text.index("\n") + 1
        assert text.endswith("\nWhat is the pass key? The pass key is")
        filler = len(text) - filler_start - len(needle) - len("\nWhat is the pass key? The pass key is")
        rel = (at - filler_start) / filler
        assert abs(rel - depth) < 0.05, rel
    assert len({t.key for t in trials}) == 4


def test_passkey_rejects_bad_depth_and_short_length():
    with pytest.raises(ValueError, match="depth 1.5"):
        build_trials(CharTokenizer(), [600], [1.5], trials=1)
    with pytest.raises(ValueError, match="too short"):
        build_trials(CharTokenizer(), [100], [0.5], trials=1)


def test_answer_parsing():
    assert answer_correct(" 12345. Remember", "12345")
    assert not answer_correct(" 1234", "12345")
    assert not answer_correct(" the key", "12345")


def test_passkey_outputs(tmp_path):
    rows = [{"run": r, "length": n, "depth": d, "key": "1", "answer": "1", "correct": int(r == "full" or n < 2000)}
            for r in ["full", "streaming-sink 4+1020"] for n in [1000, 4000] for d in [0.1, 0.9]]
    table = write_passkey(tmp_path, rows, title="t")
    assert table["full"][(4000, 0.9)] == 1.0 and table["streaming-sink 4+1020"][(4000, 0.9)] == 0.0
    assert (tmp_path / "passkey.png").stat().st_size > 10_000


def test_stock_is_a_run_of_its_own():
    from vllm_kvstream.eval.ppl import STOCK, Cache, plan_runs

    runs = plan_runs(["stock", "full", "streaming-sink"], [Cache(4, 60)])
    assert [r.label for r in runs] == ["stock", "full", "streaming-sink 4+60"]
    assert runs[0].policy == STOCK and runs[0].params is None


def test_model_option_names_a_folder_or_a_prepared_model(tmp_path):
    from vllm_kvstream.cli import _model

    assert _model(str(tmp_path)) == tmp_path
    with pytest.raises(SystemExit, match="--model 'no-such-model' is neither a model folder nor a prepared model; allowed: .*gemma3.*tiny-qwen3"):
        _model("no-such-model")


def test_leading_special_tokens_are_the_tokenizers_bos():
    from vllm_kvstream.eval.engine import leading_special_tokens

    class Bos(CharTokenizer):
        def encode(self, text, add_special_tokens=False):
            return ([2] if add_special_tokens else []) + super().encode(text)

    assert leading_special_tokens(Bos()) == [2]
    assert leading_special_tokens(CharTokenizer()) == []


def test_checkpoint_round_trip_and_refusal_of_another_stream(tmp_path):
    from vllm_kvstream.eval.ppl import Run, checkpoint_path, load_checkpoint, save_checkpoint

    run = Run("streaming-sink", None, {"sink_tokens": 4, "window_tokens": 60})
    settings = {"dtype": "float32", "chunk": 256, "block_size": 32}
    model = tmp_path / "model"
    blocks = {"series": [[256, 9, 812.5]], "peak": 9, "after": 0}
    path = save_checkpoint(tmp_path, model, [1, 2, 3], run, settings, [-1.0, -2.0], blocks)
    assert path == checkpoint_path(tmp_path, run.label) and not path.with_suffix(".tmp").exists()
    assert load_checkpoint(tmp_path, model, [1, 2, 3], run, settings) == {"logprobs": [-1.0, -2.0], "blocks": blocks}
    assert load_checkpoint(tmp_path, model, [1, 2, 4], run, settings) is None  # another stream
    assert load_checkpoint(tmp_path, model, [1, 2, 3], run, {**settings, "chunk": 512}) is None
    assert load_checkpoint(tmp_path, tmp_path / "other", [1, 2, 3], run, settings) is None
    path.write_text("{not json")
    assert load_checkpoint(tmp_path, model, [1, 2, 3], run, settings) is None


def test_partial_report_reads_an_unfinished_runs_snapshot(tmp_path, tiny_model):
    """``eval ppl --partial`` computes nothing: a finished run comes from its checkpoint, an
    unfinished one from its snapshot (as far as it got), a run with neither is left out."""
    import torch
    from transformers import AutoTokenizer

    from vllm_kvstream.cli import main
    from vllm_kvstream.data import load_text
    from vllm_kvstream.eval.engine import leading_special_tokens
    from vllm_kvstream.eval.ppl import plan_runs, snapshot_path

    text = tmp_path / "text.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 40)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tokens = (leading_special_tokens(tok) + tok.encode(text.read_text(), add_special_tokens=False))[:300]
    out = tmp_path / "out"
    (run,) = plan_runs(["streaming-sink"], [Cache(4, 124)])
    settings = {"dtype": "float32", "chunk": 2048, "block_size": None}
    snap = snapshot_path(out, Path(tiny_model), tokens, run, settings)
    snap.parent.mkdir(parents=True)
    torch.save({"logprobs": [-2.0] * 199, "blocks": [(100, 3, 500.0), (200, 3, 501.0)], "peak": 4}, snap)
    code = main(["eval", "ppl", "--model", tiny_model, "--text", str(text), "--tokens", "300", "--policies",
                 "streaming-sink,sliding-window", "--caches", "4+124", "--segment", "100", "--partial", "--out", str(out)])
    assert code == 0
    summary = (out / "ppl_summary.md").read_text()
    assert "| streaming-sink 4+124 | 200 | 7.389 |" in summary  # e^2, up to its snapshot
    assert "sliding-window" not in summary  # neither finished nor snapshotted: left out
    assert "streaming-sink 4+124,200,3,501.0,4,-1" in (out / "ppl_blocks.csv").read_text()
    assert (out / "ppl_blocks.png").stat().st_size > 5_000
