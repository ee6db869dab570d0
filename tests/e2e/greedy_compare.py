"""Comparing greedy streams of two runs whose numerics differ (bf16 vs float32, two memory
layouts, two kernels, quantized vs not, Triton interpreter vs torch, one batch shape vs
another) without asserting exact token equality, which a near tie breaks on another machine.

Rule (the project's): two such runs agree to a numeric error ``tol`` per log-probability.
Walking the generated positions while the tokens so far are equal (both runs then condition on
the same text), at each position

* the log-probabilities of every token in both runs' top-k agree within ``tol``;
* if the reference's top-1 / top-2 margin is at least ``2 * tol``, both runs pick the same
  token: an error of at most ``tol`` per log-probability cannot reorder the two. Below that
  margin (a near tie) the tokens may differ; where they do, the comparison stops there, since
  from then on the streams legitimately continue different texts.

The positions compared must number at least ``min_compared`` (stated by each test from the
margins it measured), so that an early stop cannot make the check vacuous. ``max_positions``
bounds the walk where the two numerics drift apart as the stream grows (INT4 codes rounded one
step apart change the cache of every later token), so that ``tol`` can stay the error of one
step instead of the drift's.

The results are ``tests/e2e/engine_runner.py``'s, generated with ``logprobs=2`` (the top 2 of
each position in ``top_logprobs``).
"""

from __future__ import annotations


def top2_margins(result: dict) -> list[float]:
    """Per generated position, the top-1 minus the top-2 log-probability."""
    tops = result["top_logprobs"]
    assert tops is not None and all(len(pos) >= 2 for pos in tops), "generate with logprobs=2"
    return [pos[0][1] - pos[1][1] for pos in tops]


def greedy_agreement(ref: dict, other: dict, *, tol: float, max_positions: int | None = None) -> dict:
    """Walk ``ref`` and ``other`` as the module docstring says. Returns ``compared`` (positions
    checked), ``diverged_at`` (the first position whose tokens differ, or None), ``max_diff``
    (largest log-probability difference seen) and ``problems`` (each violation, described)."""
    margins = top2_margins(ref)
    top_b = other["top_logprobs"]
    assert top_b is not None, "generate with logprobs=2"
    tok_a, tok_b = ref["token_ids"], other["token_ids"]
    problems: list[str] = []
    compared, diverged_at, max_diff = 0, None, 0.0
    for i in range(min(len(tok_a), len(tok_b), len(tok_a) if max_positions is None else max_positions)):
        compared += 1
        lp_a, lp_b = dict(map(tuple, ref["top_logprobs"][i])), dict(map(tuple, top_b[i]))
        for t in lp_a.keys() & lp_b.keys():
            diff = abs(lp_a[t] - lp_b[t])
            max_diff = max(max_diff, diff)
            if diff > tol:
                problems.append(f"position {i}: log-prob of token {t} {lp_a[t]:.5f} vs {lp_b[t]:.5f} (tol {tol})")
        if tok_a[i] != tok_b[i]:
            diverged_at = i
            if margins[i] >= 2 * tol:
                problems.append(
                    f"position {i}: token {tok_a[i]} vs {tok_b[i]} where the reference's top-2 margin "
                    f"{margins[i]:.5f} is >= 2 * tol = {2 * tol} (not a near tie)"
                )
            break
    return {"compared": compared, "diverged_at": diverged_at, "max_diff": max_diff, "problems": problems}


def assert_greedy_agree(
    ref: dict, other: dict, *, tol: float, min_compared: int, max_positions: int | None = None, label: str = ""
) -> dict:
    """Assert :func:`greedy_agreement` finds no violation and compares ``min_compared``
    positions at least. Returns its report."""
    report = greedy_agreement(ref, other, tol=tol, max_positions=max_positions)
    head = f"{label}: " if label else ""
    assert not report["problems"], head + "; ".join(report["problems"][:5])
    assert report["compared"] >= min_compared, (
        f"{head}only {report['compared']} positions compared (< {min_compared}): tokens diverged at "
        f"{report['diverged_at']} at a near tie of margin {top2_margins(ref)[report['diverged_at']]:.5f}"
        if report["diverged_at"] is not None
        else f"{head}only {report['compared']} positions generated (< {min_compared})"
    )
    return report
