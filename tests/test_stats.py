"""The report's statistics from known numbers: intervals, plateaus, orders and ties."""

import math

import pytest

from experiments import stats


def test_confidence_interval_of_known_numbers():
    s = stats.summarize([0.90, 0.92, 0.94])
    assert (s.n, s.mean, s.std) == (3, pytest.approx(0.92), pytest.approx(0.02))
    # t(0.975, 2 degrees of freedom) = 4.302653; half width 4.302653 * 0.02 / sqrt(3)
    half = 4.302653 * 0.02 / 3**0.5
    assert (s.low, s.high) == (pytest.approx(0.92 - half), pytest.approx(0.92 + half))
    one = stats.summarize([0.5])  # one seed: no interval, so never told apart from another row
    assert (one.std, one.low, one.high) == (0.0, -math.inf, math.inf)
    assert stats.order({"one": one, "other": stats.summarize([0.1, 0.11, 0.12])}) == set()


def test_plateau_needs_the_last_evaluations_within_the_tolerance():
    rising = [(100, 0.50), (200, 0.60), (300, 0.70), (400, 0.80)]
    flat = [(100, 0.50), (200, 0.801), (300, 0.799), (400, 0.803)]
    assert not stats.plateau(rising).flat
    check = stats.plateau(flat)
    assert check.flat and check.steps == (200, 300, 400)
    assert check.spread == pytest.approx(0.004)
    assert not stats.plateau(flat[-2:]).flat  # too few evaluations to say


def test_rows_are_ordered_only_when_their_intervals_are_disjoint():
    rows = {
        "a": stats.summarize([0.90, 0.91, 0.92]),
        "b": stats.summarize([0.80, 0.81, 0.82]),
        "c": stats.summarize([0.805, 0.83, 0.79]),  # overlaps b
    }
    assert stats.order(rows) == {("a", "b"), ("a", "c")}
    assert stats.ranking(rows) == [(1, "a"), (2, "b"), (2, "c")]  # b's mean is higher
    swapped_ties = {("a", "c")}  # b and c tied the other way round: no contradiction
    assert stats.consistent(stats.order(rows), swapped_ties)
    assert not stats.consistent(stats.order(rows), {("b", "a")})


def test_ranking_does_not_chain_ties():
    """x overlaps y, y overlaps z, x lies above z: z ranks below x, y shares x's rank."""
    rows = {
        "z": stats.summarize([0.80, 0.81, 0.82]),
        "x": stats.summarize([0.900, 0.905, 0.910]),
        "y": stats.summarize([0.80, 0.86, 0.92]),
    }
    assert stats.order(rows) == {("x", "z")}
    assert stats.ranking(rows) == [(1, "x"), (1, "y"), (2, "z")]
    # a wide interval above nothing ranks first even below a told-apart row's mean; listed
    # by rank, then mean
    rows["w"] = stats.summarize([0.60, 0.80, 0.98])  # mean 0.793, below z's 0.81
    assert stats.ranking(rows) == [(1, "x"), (1, "y"), (1, "w"), (2, "z")]


def test_difference_against_the_seed_spread():
    close = stats.difference([0.90, 0.92, 0.94], [0.91, 0.93, 0.95])
    assert not close["beyond_spread"] and close["intervals_overlap"]
    far = stats.difference([0.90, 0.91, 0.92], [0.80, 0.81, 0.82])
    assert far["beyond_spread"] and not far["intervals_overlap"] and far["welch_p"] < 0.001
