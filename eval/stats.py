"""Honest uncertainty: Wilson intervals for rates, McNemar's exact test for paired comparisons.

Two models answering the same items are paired data: a two-proportion test would treat them as
independent samples and overstate (or understate) the evidence. McNemar looks only at the items
where the two disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Rate:
    k: float  # successes (a tie counts as half)
    n: int
    low: float
    high: float

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else float("nan")


def wilson(k: float, n: int, z: float = 1.959963984540054) -> Rate:
    """The Wilson score interval for k successes in n trials (95% by default)."""
    if n <= 0:
        return Rate(k, 0, float("nan"), float("nan"))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Rate(k, n, max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class Paired:
    n: int  # items both runs scored
    a_only: int  # items A got right and B did not
    b_only: int
    both: int
    neither: int
    difference: float  # rate(A) - rate(B)
    p_value: float  # McNemar, exact (binomial on the discordant pairs), two-sided


def mcnemar(pairs: list[tuple[bool, bool]]) -> Paired:
    """(A correct, B correct) per item -> the paired difference and McNemar's exact p-value."""
    from scipy.stats import binomtest

    a_only = sum(1 for a, b in pairs if a and not b)
    b_only = sum(1 for a, b in pairs if b and not a)
    both = sum(1 for a, b in pairs if a and b)
    neither = len(pairs) - a_only - b_only - both
    discordant = a_only + b_only
    p = binomtest(a_only, discordant, 0.5).pvalue if discordant else 1.0
    diff = (a_only - b_only) / len(pairs) if pairs else float("nan")
    return Paired(len(pairs), a_only, b_only, both, neither, diff, float(p))
