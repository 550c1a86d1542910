"""The binomial upper tail: how surprising ``k`` hits out of ``n`` are when each is a hit with the benign rate.

Shared by ``extraction`` (a client's share of boundary, near-duplicate or off-reference queries against the
typical client's), ``poisoning`` (a source's or window's flagged feedback records against the clean rate; the
exact McNemar test of the watched model against its twin) and ``model_version`` (answers that disagree with
the previous version's).
"""

from __future__ import annotations

from scipy.special import bdtrc


def binom_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p): 1 for k <= 0, 0 for k > n (where ``bdtrc`` gives NaN, which no
    threshold test would ever flag)."""
    if k <= 0:
        return 1.0
    return float(bdtrc(k - 1, n, p)) if k <= n else 0.0
