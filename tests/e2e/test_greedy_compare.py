"""The greedy-stream comparison the end-to-end tests use (no engine): it accepts a flip at a
near tie and nothing else, and an early stop cannot pass as agreement."""

import pytest

from tests.e2e.greedy_compare import assert_greedy_agree, greedy_agreement


def _run(steps):
    """steps: per position, [(token, logprob), (token, logprob)] best first; greedy picks the first."""
    return {"token_ids": [pos[0][0] for pos in steps], "top_logprobs": [[list(p) for p in pos] for pos in steps]}


REF = _run([[(1, -0.1), (2, -3.0)], [(3, -0.5), (4, -0.52)], [(5, -0.2), (6, -2.0)], [(7, -0.3), (8, -1.9)]])


def test_identical_streams_compare_every_position():
    report = assert_greedy_agree(REF, REF, tol=0.01, min_compared=4)
    assert report == {"compared": 4, "diverged_at": None, "max_diff": 0.0, "problems": []}


def test_a_flip_at_a_near_tie_stops_the_comparison_there():
    other = _run([[(1, -0.1), (2, -3.0)], [(4, -0.505), (3, -0.51)], [(9, -0.1), (5, -4.0)], [(9, -0.1), (8, -9.0)]])
    report = assert_greedy_agree(REF, other, tol=0.02, min_compared=2)
    assert report["compared"] == 2 and report["diverged_at"] == 1  # later positions continue other texts
    with pytest.raises(AssertionError, match="only 2 positions compared"):
        assert_greedy_agree(REF, other, tol=0.02, min_compared=3)


def test_a_flip_at_a_clear_margin_fails():
    other = _run([[(1, -0.1), (2, -3.0)], [(3, -0.5), (4, -0.52)], [(6, -0.2), (5, -0.21)], [(7, -0.3), (8, -1.9)]])
    assert greedy_agreement(REF, other, tol=0.02)["diverged_at"] == 2
    with pytest.raises(AssertionError, match="position 2: token 5 vs 6 .*not a near tie"):
        assert_greedy_agree(REF, other, tol=0.02, min_compared=1)


def test_log_probs_beyond_the_tolerance_fail_even_with_equal_tokens():
    other = _run([[(1, -0.1), (2, -3.0)], [(3, -0.5), (4, -0.52)], [(5, -0.4), (6, -2.0)], [(7, -0.3), (8, -1.9)]])
    with pytest.raises(AssertionError, match="position 2: log-prob of token 5"):
        assert_greedy_agree(REF, other, tol=0.1, min_compared=1)
    assert_greedy_agree(REF, other, tol=0.25, min_compared=4)


def test_max_positions_bounds_the_walk():
    other = _run([[(1, -0.1), (2, -3.0)], [(3, -0.5), (4, -0.52)], [(5, -1.2), (6, -2.0)], [(7, -0.3), (8, -1.9)]])
    assert greedy_agreement(REF, other, tol=0.1)["problems"]
    report = assert_greedy_agree(REF, other, tol=0.1, min_compared=2, max_positions=2)
    assert report["compared"] == 2 and report["diverged_at"] is None
