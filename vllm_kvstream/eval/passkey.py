"""Passkey retrieval through vLLM: a random number hidden at a chosen depth in filler text,
asked for at the end (Mohtashami & Jaggi's test, as StreamingLLM and KVQuant use it).

A prompt of ``length`` tokens is built at the token level so lengths are exact: an
instruction, filler sentences, the needle ``The pass key is NNNNN. Remember it. NNNNN is the
pass key.`` after ``depth`` of the filler, more filler, and the question ``What is the pass
key? The pass key is``. The model continues greedily for a few tokens; the first number in
the continuation must equal the key. Accuracy is reported per (run, length, depth).

Outputs in ``out_dir``: ``passkey.csv`` (every trial), ``passkey_summary.md`` (accuracy table
per run) and ``passkey.png`` (one heat-map per run: depth x length).
"""

from __future__ import annotations

import csv
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vllm_kvstream.eval.engine import engine_kwargs, kv_bytes_per_token, run_job
from vllm_kvstream.eval.ppl import STOCK, Run

INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class Trial:
    length: int
    depth: float
    key: str
    prompt: list[int]


def build_trials(tokenizer, lengths: Sequence[int], depths: Sequence[float], trials: int, seed: int = 0) -> list[Trial]:
    """Prompts of exactly ``length`` tokens with the needle after ``depth`` of the filler."""
    for d in depths:
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"depth {d} is outside [0, 1]")
    rng = random.Random(seed)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    from vllm_kvstream.eval.engine import leading_special_tokens

    head, unit, question = leading_special_tokens(tokenizer) + encode(INSTRUCTION), encode(FILLER), encode(QUESTION)
    out = []
    for length in lengths:
        for depth in depths:
            for _ in range(trials):
                key = str(rng.randrange(10000, 100000))
                needle = encode(NEEDLE.format(key=key))
                room = length - len(head) - len(needle) - len(question)
                if room < len(unit):
                    raise ValueError(f"passkey length {length} is too short for the prompt (needs > {length - room + len(unit)})")
                filler = (unit * (room // len(unit) + 1))[:room]
                # Keep sentences whole where the needle goes: the nearest sentence boundary.
                cut = min(room, round(depth * room / len(unit)) * len(unit))
                prompt = head + filler[:cut] + needle + filler[cut:] + question
                out.append(Trial(length, depth, key, prompt))
    return out


def answer_correct(text: str, key: str) -> bool:
    found = re.search(r"\d+", text)
    return bool(found) and found.group(0) == key


def run_passkey(
    model: str | Path,
    run: Run,
    trials: Sequence[Trial],
    *,
    dtype: str = "float32",
    chunk: int = 2048,
    block_size: int | None = None,
    max_num_seqs: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """Generated token ids per trial, through vLLM under ``run``."""
    bounded = run.cache is not None
    longest = max(len(t.prompt) for t in trials)
    policy = None if run.policy == STOCK else run.policy
    kw = engine_kwargs(model, policy, run.params, dtype=dtype, chunk=chunk, block_size=block_size, max_num_seqs=max_num_seqs, quant=run.quant,
                       max_model_len=None if bounded else longest + 32)
    per_request = (run.cache.sink_tokens + run.cache.window_tokens + 2 * chunk) if bounded else longest + 64
    gib = 4 * per_request * kv_bytes_per_token(model, 4 if dtype == "float32" else 2) / 2**30 + 0.5
    job = {"kind": "generate", "prompts": [t.prompt for t in trials],
           "sampling": {"max_tokens": 8, "temperature": 0.0}}
    return run_job(kw, job, kv_cache_gib=gib, progress=progress)["token_ids"]


def write_outputs(out_dir: Path, rows: list[dict], *, title: str) -> dict[str, dict[tuple[int, float], float]]:
    """``rows``: one dict per trial (run, length, depth, key, answer, correct). Returns accuracy
    per run per (length, depth)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "passkey.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["run", "length", "depth", "key", "answer", "correct"])
        w.writeheader()
        w.writerows(rows)
    acc: dict[str, dict[tuple[int, float], list[bool]]] = {}
    for r in rows:
        acc.setdefault(r["run"], {}).setdefault((r["length"], r["depth"]), []).append(bool(r["correct"]))
    table = {run: {k: sum(v) / len(v) for k, v in cells.items()} for run, cells in acc.items()}
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    lines = [f"# {title}", "", "Accuracy (fraction of trials whose answer is the key).", ""]
    for run, cells in table.items():
        lines += [f"## {run}", "", "| depth \\ length | " + " | ".join(map(str, lengths)) + " |",
                  "|---|" + "---|" * len(lengths)]
        for d in depths:
            lines.append(f"| {d:g} | " + " | ".join(f"{cells.get((n, d), float('nan')):.2f}" for n in lengths) + " |")
        lines.append("")
    (out_dir / "passkey_summary.md").write_text("\n".join(lines))
    _heatmaps(out_dir / "passkey.png", table, lengths, depths, title)
    return table


def _heatmaps(path: Path, table, lengths, depths, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(table)
    fig, axes = plt.subplots(1, len(runs), figsize=(3.2 * len(runs) + 1, 3.6), squeeze=False)
    for ax, run in zip(axes[0], runs):
        grid = [[table[run].get((n, d), float("nan")) for n in lengths] for d in depths]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45, fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        ax.set_xlabel("prompt length (tokens)", fontsize=8)
        ax.set_title(run, fontsize=9)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7)
    axes[0][0].set_ylabel("needle depth", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
