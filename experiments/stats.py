"""The statistics of a report: mean, spread and confidence interval over seeds, whether a run
has plateaued, and which rows are told apart by their intervals.

A row of a report is one configuration trained with several seeds; its numbers are a sample of
what that configuration gives. Two rows are ordered only when their 95 % confidence intervals
do not overlap; otherwise they count as tied (a conservative reading: disjoint intervals mean
a difference well beyond the seed-to-seed spread).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Mapping, Sequence

from scipy import stats as scipy_stats

CONFIDENCE = 0.95
# A run has plateaued when its last PLATEAU_EVALS held-out accuracies lie within
# PLATEAU_TOLERANCE of each other (absolute accuracy: 0.005 = half a percentage point).
PLATEAU_EVALS = 3
PLATEAU_TOLERANCE = 0.005


@dataclasses.dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation and the Student-t confidence interval of the mean."""

    n: int
    mean: float
    std: float
    low: float
    high: float

    def overlaps(self, other: Summary) -> bool:
        return self.low <= other.high and other.low <= self.high


def summarize(values: Sequence[float], confidence: float = CONFIDENCE) -> Summary:
    """Returns the Summary of `values` (one per seed). With one value no spread can be
    estimated: the interval is unbounded (-inf, inf), so the row is told apart from none."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no values to summarize")
    mean = statistics.fmean(values)
    if len(values) == 1:
        return Summary(1, mean, 0.0, -math.inf, math.inf)
    std = statistics.stdev(values)
    half = scipy_stats.t.ppf((1 + confidence) / 2, len(values) - 1) * std / math.sqrt(len(values))
    return Summary(len(values), mean, std, mean - half, mean + half)


@dataclasses.dataclass(frozen=True)
class Plateau:
    """Whether the last `evals` held-out accuracies of a run lie within `tolerance`."""

    flat: bool
    spread: float  # max - min of the last evaluations
    steps: tuple[int, ...]  # the steps of those evaluations


def plateau(
    curve: Sequence[tuple[int, float]],
    evals: int = PLATEAU_EVALS,
    tolerance: float = PLATEAU_TOLERANCE,
) -> Plateau:
    """Returns the plateau check of a learning curve [(step, held-out accuracy)]. Fewer than
    `evals` evaluations never count as flat."""
    last = sorted(curve)[-evals:]
    values = [v for _, v in last]
    spread = max(values) - min(values) if values else math.inf
    return Plateau(len(last) == evals and spread <= tolerance, spread, tuple(s for s, _ in last))


def order(summaries: Mapping[str, Summary]) -> set[tuple[str, str]]:
    """Returns the pairs (a, b) where row a is above row b: a's interval lies entirely above
    b's. Rows whose intervals overlap are tied (in neither order)."""
    return {
        (a, b)
        for a, sa in summaries.items()
        for b, sb in summaries.items()
        if a != b and sa.low > sb.high
    }


def ranking(summaries: Mapping[str, Summary]) -> list[tuple[int, str]]:
    """Returns (rank, name) by rank, then decreasing mean, where a row's rank is one more than
    the number of rows whose interval lies entirely above its own (rank 1 is the best). Rows
    share a rank when the same number of rows are told apart above them; two rows told apart
    from each other never do. (Not chained: a row tied with the row above it that is tied with
    a third still ranks below that third when their intervals are disjoint.)"""
    above = order(summaries)
    ranked = [(1 + sum((other, name) in above for other in summaries), name) for name in summaries]
    return sorted(ranked, key=lambda r: (r[0], -summaries[r[1]].mean))


def consistent(first: set[tuple[str, str]], second: set[tuple[str, str]]) -> bool:
    """Whether two orders (from `order`, e.g. of two sets of seeds) never contradict each
    other: no pair is above-below in one and below-above in the other (ties agree with all)."""
    return not any((b, a) in second for a, b in first)


def difference(a: Sequence[float], b: Sequence[float]) -> dict:
    """Returns how rows a and b differ: the difference of means, the larger seed-to-seed
    standard deviation, whether the difference exceeds it, and Welch's t-test p-value."""
    sa, sb = summarize(a), summarize(b)
    spread = max(sa.std, sb.std)
    p = (
        float(scipy_stats.ttest_ind(a, b, equal_var=False).pvalue)
        if sa.n > 1 and sb.n > 1 and spread > 0
        else None
    )
    return {
        "difference": sa.mean - sb.mean,
        "seed_spread": spread,
        "beyond_spread": abs(sa.mean - sb.mean) > spread,
        "intervals_overlap": sa.overlaps(sb),
        "welch_p": p,
    }
