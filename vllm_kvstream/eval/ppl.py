"""Streaming perplexity through vLLM: a long text as one stream under a policy.

The text is tokenized once and fed to vLLM as a single prompt with ``prompt_logprobs``:
vLLM prefills it in chunks (``max_num_batched_tokens``), the plugin frees blocks between
chunks, and every token's log-probability is computed exactly as the policy lets the model
see its past, the same thing a token-by-token stream would see (the oracle tests check
that). Perplexity is reported per segment of the stream and overall, for each policy at
each cache size (``full`` once: it has no cache size).

Outputs in ``out_dir``: ``ppl_segments.csv`` (policy, cache, segment start/end, perplexity,
log-perplexity), ``ppl_summary.csv`` and ``ppl_summary.md`` (overall and last-8K perplexity),
``ppl.png`` (log-perplexity against position, one line per run, like StreamingLLM's figure 3).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vllm_kvstream.eval.engine import engine_kwargs, kv_bytes_per_token, run_job
from vllm_kvstream.policies import get_policy_class
from vllm_kvstream.quant import QUANT_KEY, parse_quant


#: The run label of stock vLLM (the plugin's settings absent).
STOCK = "stock"


@dataclass(frozen=True)
class Cache:
    """A cache budget ``sink + window`` tokens, written ``S+W`` on the command line."""

    sink_tokens: int
    window_tokens: int

    @classmethod
    def parse(cls, text: str) -> Cache:
        parts = text.split("+")
        if len(parts) != 2 or not all(p.strip().isascii() and p.strip().isdigit() for p in parts):
            raise ValueError(f"cache size {text!r} is not of the form SINK+WINDOW (e.g. 4+1020)")
        if any(len(p.strip()) > 18 for p in parts):
            raise ValueError(f"cache size {text!r}: SINK and WINDOW must be token counts below 10**18")
        sink, window = (int(p) for p in parts)
        if window <= 0:
            raise ValueError(f"cache size {text!r}: the window must be > 0")
        return cls(sink, window)

    @property
    def label(self) -> str:
        return f"{self.sink_tokens}+{self.window_tokens}"


@dataclass(frozen=True)
class Run:
    """One evaluation run: a policy at a cache size (``cache=None`` for ``full``);
    ``options`` the policy options given beside its name (``:score=key-norm``), for the label."""

    policy: str
    cache: Cache | None
    params: dict | None
    options: str = ""
    #: ``additional_config`` entries of ``--kv-quant`` (``{}``: unquantized).
    quant: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        name = self.policy + self.options
        return name if self.cache is None else f"{name} {self.cache.label}"


def split_quant_options(options: dict) -> tuple[dict, dict]:
    """``(policy options, additional_config entries of --kv-quant)``: ``kv_quant=int4`` and
    ``kv_quant.OPTION=VALUE`` (options of ``kv_quant_config``), validated here."""
    policy_opts = {k: v for k, v in options.items() if k != QUANT_KEY and not k.startswith(QUANT_KEY + ".")}
    method = options.get(QUANT_KEY)
    qopts = {k[len(QUANT_KEY) + 1 :]: v for k, v in options.items() if k.startswith(QUANT_KEY + ".")}
    quant = parse_quant(method, qopts or None)
    return policy_opts, ({} if quant is None else quant.normalized())


def parse_policy_spec(text: str) -> tuple[str, dict]:
    """``NAME[:KEY=VALUE...]``: a policy and options that override how it sizes itself to a
    cache (values read as JSON when they parse, as strings otherwise), e.g.
    ``topk-importance:score=key-norm:decay=0.99``; ``kv_quant=int4`` and
    ``kv_quant.OPTION=VALUE`` quantize its KV blocks (``streaming-sink:kv_quant=int8``)."""
    name, *pairs = text.split(":")
    options: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"policy option {pair!r} in {text!r} is not KEY=VALUE; allowed: NAME[:KEY=VALUE...]")
        if key in options:
            raise ValueError(f"policy option {key!r} is given twice in {text!r}; allowed: each KEY once")
        try:
            options[key] = json.loads(value)
        except (ValueError, RecursionError):  # not JSON (or an integer of > 4300 digits, nesting too deep)
            options[key] = value
    return name, options


def plan_runs(policies: Sequence[str], caches: Sequence[Cache]) -> list[Run]:
    """Every policy (``NAME[:KEY=VALUE...]``, see :func:`parse_policy_spec`) at every cache
    size; policies without a cache size once; ``stock`` (vLLM, plugin inert) once. Unknown names and bad options raise the
    registry's errors (naming the allowed values) before anything runs."""
    runs = []
    for spec in policies:
        if spec == STOCK:  # vLLM without the plugin's settings, as a baseline in the same run
            runs.append(Run(STOCK, None, None))
            continue
        name, options = parse_policy_spec(spec)
        options, quant = split_quant_options(options)
        cls = get_policy_class(name)
        suffix = spec[len(name):]
        sized = [(c, cls.params_for_cache(c.sink_tokens, c.window_tokens)) for c in caches]
        if not sized or all(p is None for _, p in sized):
            planned = [Run(name, None, dict(options), suffix, quant)]
        else:
            planned = [Run(name, c, {**p, **options}, suffix, quant) for c, p in sized]
        for run in planned:
            cls.from_dict(run.params)  # validate now, not minutes later in an engine process
        runs.extend(planned)
    labels = [run.label for run in runs]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:  # the second run's results would replace the first's
        raise ValueError(f"run {repeated[0]!r} is planned twice (a policy or cache size is repeated in "
                         f"{list(policies)} / {[c.label for c in caches]}); allowed: each policy and cache once")
    return runs


def token_logprobs(
    model: str | Path,
    tokens: Sequence[int],
    run: Run | None,
    *,
    dtype: str = "float32",
    chunk: int = 2048,
    block_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    blocks: dict | None = None,
    snapshot: Path | None = None,
    snapshot_every: int = 0,
    stop_after_snapshots: int | None = None,
    progress_every: float = 2.0,
) -> list[float] | None:
    """Log-probability of ``tokens[i + 1]`` given ``tokens[: i + 1]`` through vLLM under ``run``
    (``None``: stock vLLM). ``blocks``, when given, receives the KV blocks the stream held as it
    went (every group, read from vLLM's pool): ``series`` ``[(tokens computed, blocks)]``,
    ``peak`` and ``after`` (held once the stream finished: 0 unless blocks leak), and
    ``resumed_from`` (tokens a snapshot had computed; 0 for a stream run whole).

    ``snapshot``: a file where the stream's state is saved every ``snapshot_every`` tokens (at
    the first step boundary past each multiple) and from which a stream interrupted after one
    continues exactly: the log-probs computed so far, the blocks the policy keeps with their
    contents in every layer, the quantization statistics (``eval/engine.py``,
    ``take_snapshot``). ``stop_after_snapshots`` interrupts the stream on purpose (returns
    ``None``). ``progress_every``: seconds between ``progress(done, total)`` calls (0: every
    engine step)."""
    dtype_bytes = 4 if dtype == "float32" else 2
    policy = None if run is None or run.policy == STOCK else run.policy
    bounded = run is not None and run.cache is not None
    if snapshot is not None and run is not None and policy is not None and get_policy_class(policy).selects_blocks:
        raise ValueError(f"{run.label}: a snapshot holds what position policies keep; allowed with snapshots: "
                         "streaming-sink, sliding-window, full, stock (a block-selecting policy's store is not saved)")
    kw = engine_kwargs(model, policy, run.params if run else None, dtype=dtype, chunk=chunk, block_size=block_size,
                       max_model_len=None if bounded else len(tokens) + 16, quant=run.quant if run else None)
    tokens_held = (run.cache.sink_tokens + run.cache.window_tokens + 4 * chunk) if bounded else len(tokens) + 2 * chunk
    gib = tokens_held * kv_bytes_per_token(model, dtype_bytes) / 2**30 + 0.5
    job = {"kind": "prompt_logprobs", "tokens": list(tokens), "report_every": progress_every}
    if snapshot is not None:
        job.update(snapshot=str(snapshot), snapshot_every=snapshot_every, stop_after_snapshots=stop_after_snapshots)
    result = run_job(kw, job, kv_cache_gib=gib, progress=progress)
    if "interrupted_at" in result:
        return None
    if blocks is not None:
        blocks.update(series=result["blocks"], peak=result["peak_blocks"], after=result["blocks_after"],
                      resumed_from=result["resumed_from"])
    return result["logprobs"]


def write_blocks(out_dir: Path, blocks: dict[str, dict]) -> None:
    """``ppl_blocks.csv``: per run, the KV blocks held against tokens computed (flat for a
    bounded policy), and its peak and the blocks left after the stream. Read from vLLM's pool
    after every engine step: a stream prefilled and finished within one step shows 0."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "ppl_blocks.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "tokens_computed", "kv_blocks", "rss_mib", "peak_kv_blocks", "kv_blocks_after"])
        for label, b in blocks.items():
            for done, used, rss in b["series"]:
                w.writerow([label, done, used, f"{rss:.1f}", b["peak"], b["after"]])
    plot_blocks(out_dir / "ppl_blocks.png", blocks)


def plot_blocks(path: Path, blocks: dict[str, dict]) -> None:
    """KV blocks held and the engine process's RSS against tokens computed, one line per run
    (what ``ppl_blocks.csv`` holds): flat lines are the bounded-memory claim."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_b, ax_r) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for label, b in blocks.items():
        series = b.get("series") or []
        if not series:
            continue
        done = [d for d, _, _ in series]
        ax_b.plot(done, [u for _, u, _ in series], label=label, linewidth=1.0)
        ax_r.plot(done, [r for _, _, r in series], label=label, linewidth=1.0)
    ax_b.set_ylabel("KV blocks held (vLLM's pool)")
    ax_r.set_ylabel("engine process RSS (MiB)")
    ax_r.set_xlabel("tokens computed")
    ax_b.set_ylim(bottom=0)
    for ax in (ax_b, ax_r):
        ax.grid(alpha=0.3)
    ax_b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def checkpoint_path(out_dir: Path, label: str) -> Path:
    """Where a run's per-token log-probs are kept once it finished (``runs/LABEL.json``)."""
    safe = "".join(c if c.isalnum() or c in "+-_." else "_" for c in label)
    return out_dir / "runs" / f"{safe}.json"


def snapshot_path(out_dir: Path, model: Path, tokens: Sequence[int], run: Run, settings: dict) -> Path:
    """Where an unfinished run keeps its snapshot (``runs/LABEL.KEY.snapshot.pt``): the name
    carries a digest of the run's key, so a snapshot only ever continues the same stream, model,
    run and settings."""
    key = hashlib.sha256(json.dumps(_checkpoint_key(model, tokens, run, settings), sort_keys=True).encode()).hexdigest()
    path = checkpoint_path(out_dir, run.label)
    return path.with_name(f"{path.stem}.{key[:12]}.snapshot.pt")


def load_snapshot_progress(path: Path) -> dict | None:
    """What an unfinished run's snapshot holds so far, for a report of where it stands:
    ``{"logprobs", "blocks"}`` (``blocks`` as :func:`token_logprobs` fills it, ``after`` unknown:
    -1); ``None`` without a snapshot."""
    if not path.exists():
        return None
    import torch

    snap = torch.load(path, weights_only=False)
    return {"logprobs": list(snap["logprobs"]),
            "blocks": {"series": list(snap["blocks"]), "peak": snap["peak"], "after": -1, "resumed_from": 0}}


def _checkpoint_key(model: Path, tokens: Sequence[int], run: Run, settings: dict) -> dict:
    digest = hashlib.sha256(json.dumps(list(tokens)).encode()).hexdigest()
    return {"label": run.label, "model": str(model), "tokens": len(tokens), "sha256": digest,
            "params": run.params, "quant": run.quant, **settings}


def load_checkpoint(out_dir: Path, model: Path, tokens: Sequence[int], run: Run, settings: dict) -> dict | None:
    """A finished run's ``{"logprobs", "blocks"}`` saved by :func:`save_checkpoint` for exactly
    this model, stream, run and settings; ``None`` if there is none (or it is for others)."""
    path = checkpoint_path(out_dir, run.label)
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if saved.get("key") != _checkpoint_key(model, tokens, run, settings):
        return None
    return {"logprobs": saved["logprobs"], "blocks": saved["blocks"]}


def save_checkpoint(out_dir: Path, model: Path, tokens: Sequence[int], run: Run, settings: dict,
                    logprobs: list[float], blocks: dict) -> Path:
    """Keep a finished run (written to a temporary file, then renamed: never half written)."""
    path = checkpoint_path(out_dir, run.label)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": _checkpoint_key(model, tokens, run, settings), "logprobs": logprobs, "blocks": blocks}))
    tmp.replace(path)
    return path


def perplexity(logprobs: Sequence[float]) -> float:
    return math.exp(-sum(logprobs) / len(logprobs)) if logprobs else float("nan")


def segments(logprobs: Sequence[float], segment: int) -> list[tuple[int, int, float]]:
    """``(start, end, perplexity)`` per segment of predicted-token positions ``[start, end)``
    (position ``i`` is token ``i``; token 0 is never predicted)."""
    out = []
    n = len(logprobs)
    for lo in range(0, n, segment):
        hi = min(n, lo + segment)
        out.append((lo + 1, hi + 1, perplexity(logprobs[lo:hi])))
    return out


def write_outputs(
    out_dir: Path,
    results: dict[str, list[float]],
    *,
    segment: int,
    tail_tokens: int,
    trained_context: int | None,
    title: str,
) -> dict[str, dict[str, float]]:
    """Write the CSVs, the Markdown summary and the plot; return the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, dict[str, float]] = {}
    segs = {label: segments(lps, segment) for label, lps in results.items()}
    with (out_dir / "ppl_segments.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "start", "end", "ppl", "log_ppl"])
        for label, lps in results.items():
            for lo, hi, ppl in segs[label]:
                w.writerow([label, lo, hi, f"{ppl:.4f}", f"{math.log(ppl):.5f}"])
            summary[label] = {
                "tokens": len(lps) + 1,
                "ppl": perplexity(lps),
                "ppl_tail": perplexity(lps[-tail_tokens:]),
                "ppl_head": perplexity(lps[: min(len(lps), trained_context or len(lps))]),
            }
    with (out_dir / "ppl_summary.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "tokens", "ppl", f"ppl_last_{tail_tokens}", "ppl_in_trained_context"])
        for label, s in summary.items():
            w.writerow([label, s["tokens"], f"{s['ppl']:.4f}", f"{s['ppl_tail']:.4f}", f"{s['ppl_head']:.4f}"])
    lines = [f"# {title}", "",
             f"| run | tokens | perplexity | last {tail_tokens} tokens | first {trained_context} tokens |",
             "|---|---|---|---|---|"]
    for label, s in summary.items():
        lines.append(f"| {label} | {s['tokens']} | {s['ppl']:.3f} | {s['ppl_tail']:.3f} | {s['ppl_head']:.3f} |")
    (out_dir / "ppl_summary.md").write_text("\n".join(lines) + "\n")
    plot_segments(out_dir / "ppl.png", segs, segment=segment, trained_context=trained_context, title=title)
    return summary


def plot_segments(
    path: Path, runs: dict[str, list[tuple[int, int, float]]], *, segment: int, trained_context: int | None, title: str
) -> None:
    """Log-perplexity per segment against position, one line per run (``runs``: label ->
    ``(start, end, perplexity)`` segments, as ``ppl_segments.csv`` holds them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for label, segs in runs.items():
        ax.plot([(lo + hi) / 2 for lo, hi, _ in segs], [math.log(p) for _, _, p in segs], label=label, linewidth=1.2)
    if trained_context:
        ax.axvline(trained_context, color="grey", linestyle="--", linewidth=0.8)
        ax.text(trained_context, ax.get_ylim()[1], " trained context", va="top", fontsize=8, color="grey")
    ax.set_xlabel("position in the stream (tokens)")
    ax.set_ylabel(f"log perplexity (per {segment}-token segment)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
