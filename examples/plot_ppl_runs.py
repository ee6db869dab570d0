"""Overlay the per-segment perplexity and the KV blocks held of ``vllm-kvstream eval ppl``
report folders (each folder's ``ppl_segments.csv`` and ``ppl_blocks.csv``), e.g. the float and
the INT4 million-token streams, and print a table of both per segment with their ratio.

    python examples/plot_ppl_runs.py examples/reports/ppl1m examples/reports/ppl1m_int4 \
        --labels float32,int4 --out examples/reports/ppl1m_int4/ppl_vs_float.png
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        raise SystemExit(f"{path} does not exist: is {path.parent} an `eval ppl` output folder?")
    with path.open() as f:
        return list(csv.DictReader(f))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path, help="eval ppl output folders (the first is the baseline)")
    ap.add_argument("--out", type=Path, required=True, help="PNG to write")
    ap.add_argument("--labels", help="comma-separated names for the runs, in order (default: the runs' labels)")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []  # (label, segments, blocks)
    for folder in args.folders:
        segs = _rows(folder / "ppl_segments.csv")
        blocks = _rows(folder / "ppl_blocks.csv")
        for label in dict.fromkeys(r["run"] for r in segs):
            runs.append((label, [r for r in segs if r["run"] == label], [r for r in blocks if r["run"] == label]))
    if args.labels:
        names = args.labels.split(",")
        if len(names) != len(runs):
            raise SystemExit(f"--labels names {len(names)} runs ({args.labels!r}) but the folders hold {len(runs)}: "
                             + ", ".join(label for label, _, _ in runs))
        runs = [(name, segs, blocks) for name, (_, segs, blocks) in zip(names, runs)]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for label, segs, blocks in runs:
        ax1.plot([int(r["end"]) / 1e3 for r in segs], [float(r["log_ppl"]) for r in segs], marker="o", ms=3, label=label)
        ax2.plot([int(r["tokens_computed"]) / 1e3 for r in blocks], [int(r["kv_blocks"]) for r in blocks], label=label)
    ax1.set_ylabel("log perplexity per segment")
    ax1.legend()
    ax2.set_ylabel("KV blocks in use (vLLM's pool)")
    ax2.set_xlabel("tokens (thousands)")
    ax2.set_ylim(bottom=0)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    base = runs[0][1]
    header = "| tokens | " + " | ".join(label for label, _, _ in runs) + " | " + " | ".join(
        f"{label} / {runs[0][0]}" for label, _, _ in runs[1:]) + " |"
    lines = [header, "|" + "---|" * (1 + 2 * len(runs) - 1)]
    for i, seg in enumerate(base):
        vals = [float(r[i]["ppl"]) if i < len(r) else float("nan") for _, r, _ in runs]
        span = f"{(int(seg['start']) - 1) // 1024}K–{(int(seg['end']) - 1) // 1024}K"
        lines.append(f"| {span} | " + " | ".join(f"{v:.2f}" for v in vals) + " | "
                     + " | ".join(f"{v / vals[0]:.3f}" for v in vals[1:]) + " |")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
