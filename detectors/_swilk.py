"""Shapiro-Wilk W without scipy's per-call overhead.

PRADA tests every active client every few queries; ``scipy.stats.shapiro``
costs ~100 us a call in wrappers alone, which would dominate the hot path.
W itself is cheap once the coefficients for a sample size are known, so we
compute them with Royston's approximation (AS R94, the algorithm scipy and R
use) and cache them per n. Tests compare the result with scipy.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy.special import ndtri


@lru_cache(maxsize=4096)
def swilk_coefficients(n: int) -> np.ndarray:
    """The a_i weights of W for sample size n (3 <= n <= 5000), ascending order."""
    if n < 3:
        raise ValueError(f"Shapiro-Wilk needs at least 3 values, got {n}")
    if n == 3:
        a = np.array([-np.sqrt(0.5), 0.0, np.sqrt(0.5)])
        return a
    i = np.arange(1, n + 1)
    m = ndtri((i - 0.375) / (n + 0.25))
    mm = float(m @ m)
    u = 1.0 / np.sqrt(n)
    c = m / np.sqrt(mm)
    an = c[-1] + 0.221157 * u - 0.147981 * u**2 - 2.071190 * u**3 + 4.434685 * u**4 - 2.706056 * u**5
    a = np.empty(n)
    if n > 5:
        an1 = c[-2] + 0.042981 * u - 0.293762 * u**2 - 1.752461 * u**3 + 5.682633 * u**4 - 3.582633 * u**5
        phi = (mm - 2 * m[-1] ** 2 - 2 * m[-2] ** 2) / (1 - 2 * an**2 - 2 * an1**2)
        a[2:-2] = m[2:-2] / np.sqrt(phi)
        a[-1], a[-2], a[0], a[1] = an, an1, -an, -an1
    else:
        phi = (mm - 2 * m[-1] ** 2) / (1 - 2 * an**2)
        a[1:-1] = m[1:-1] / np.sqrt(phi)
        a[-1], a[0] = an, -an
    return a


def shapiro_w(x: np.ndarray) -> float:
    """Shapiro-Wilk W of a 1-D sample (1.0 = perfectly normal; 0 for a constant sample)."""
    x = np.asarray(x, dtype=np.float64)
    if len(x) < 3:
        raise ValueError(f"Shapiro-Wilk needs at least 3 values, got {len(x)}")
    return float(shapiro_w_rows(x[None, :])[0])


def shapiro_w_rows(x: np.ndarray, min_size: int = 3) -> np.ndarray:
    """W of each row's finite values ([m, width]; NaN marks no value), NaN for a row with fewer than
    ``min_size`` (at least 3) of them.

    Why rows: the extraction detector tests every client that is due in a
    batch, dozens at once; rows with the same number of values share their
    coefficients and one product, instead of a dozen numpy calls each.
    """
    x = np.where(np.isfinite(x), x, np.nan).astype(np.float64)
    counts = np.count_nonzero(np.isfinite(x), axis=1)
    x = np.sort(x, axis=1)  # NaN last
    out = np.full(len(x), np.nan)
    for n in np.unique(counts[counts >= max(min_size, 3)]).tolist():
        rows = np.flatnonzero(counts == n)
        v = x[rows, :n]
        centred = v - v.sum(1, keepdims=True) / n  # what .mean() computes, without its Python-level overhead
        ss = np.einsum("ij,ij->i", centred, centred)
        w = (v @ swilk_coefficients(n)) ** 2 / np.where(ss > 0, ss, 1.0)
        out[rows] = np.where(ss > 0, np.minimum(1.0, w), 0.0)
    return out
