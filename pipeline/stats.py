"""The statistics behind every claim: intervals on a test accuracy, paired tests between models."""

from __future__ import annotations

import math
from fractions import Fraction
from statistics import NormalDist

Z95 = NormalDist().inv_cdf(0.975)  # 1.959963984540054


def wilson(hits: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion hits / n (95% by default).

    Unlike the normal approximation p +- z sqrt(p(1-p)/n), it stays inside [0, 1] and keeps
    its coverage near 0 and 1, where test accuracies of good models sit.
    """
    if not (isinstance(n, int) and n > 0 and 0 <= hits <= n):
        raise ValueError(f"need 0 <= hits <= n and n > 0, got hits={hits}, n={n}")
    p, z2 = hits / n, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # At 0 or n hits one bound is exactly 0 or 1; floats would leave a trace like 3e-17.
    low = 0.0 if hits == 0 else center - half
    high = 1.0 if hits == n else center + half
    return low, high


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: the binomial test of b against b + c at 1/2.

    b and c are the discordant pairs (one model right where the other is wrong); the pairs both
    got right or both got wrong say nothing about which model is better. Computed with exact
    integers: p = min(1, 2 P(X <= min(b, c))), X ~ Binomial(b + c, 1/2).
    """
    if b < 0 or c < 0:
        raise ValueError(f"counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = Fraction(sum(math.comb(n, i) for i in range(min(b, c) + 1)), 2**n)
    return float(min(Fraction(1), 2 * tail))
