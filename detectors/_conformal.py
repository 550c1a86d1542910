"""Conformal p-values from calibration scores, with a tail that reaches past the data.

Why: a detector's raw score (a VAE's negative ELBO, an adversarial classifier's
logit) means nothing to an analyst or a threshold; its rank among scores of
held-out *normal* data does. The conformal p-value
``(1 + #{calibration >= s}) / (n + 1)`` is valid (P(p <= a) <= a for normal
data) whatever the score's distribution, but cannot go below ``1 / (n + 1)``:
with 400 calibration rows no record can ever look rarer than 1 in 401.

Two ways past that limit, for two uses:

- ``ConformalCalibrator`` (``drift_vae``): the exact rank inside the data, and
  beyond the largest calibration score an extrapolated peaks-over-threshold
  tail (Siffer et al., "Anomaly detection in streams with extreme value
  theory", KDD 2017), so a per-record alarm can sit at a tiny rate (1e-6): an
  exponential tail on the *log* score, i.e. a Pareto tail on the score, heavier
  than the exponential one, so extrapolated p-values err on the side of fewer
  alarms. Its exact ranks also feed the drift martingale, which needs them.
- ``TailCalibrator`` and ``OrCalibrator`` (``adversarial``): a tail model over
  the top tenth of the calibration scores too, so that a 1 % test, or each
  half of an OR of two, gets a threshold that does not rest on the single
  largest of a few hundred calibration rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ConformalCalibrator:
    """Sorted calibration scores plus a fitted log-score tail (higher score = more anomalous)."""

    sorted_scores: np.ndarray  # float64 ascending
    tail_threshold: float  # log-score above which the tail model applies
    tail_scale: float  # mean excess of log-scores over the threshold
    tail_mass: float  # share of calibration scores above the threshold

    @classmethod
    def fit(cls, scores: np.ndarray, tail_fraction: float = 0.1, min_tail: int = 10) -> ConformalCalibrator:
        """Calibrate on scores of held-out normal data (never the data the scorer was fitted on)."""
        scores = _sorted_calibration_scores(scores)
        k = max(min_tail, round(tail_fraction * len(scores)))
        k = min(k, len(scores) - 1)
        logs = np.log(np.maximum(scores - scores[0], 0.0) + _offset(scores))
        threshold = float(logs[-k - 1])
        excess = logs[-k:] - threshold
        scale = float(max(excess.mean(), 1e-6))
        return cls(scores, threshold, scale, k / (len(scores) + 1))

    def pvalues(self, scores: np.ndarray) -> np.ndarray:
        """float64 p-values: conformal rank inside the data, Pareto tail beyond the top scores."""
        scores = np.asarray(scores, dtype=np.float64)
        n = len(self.sorted_scores)
        n_ge = n - np.searchsorted(self.sorted_scores, scores, side="left")
        p = (1.0 + n_ge) / (n + 1.0)
        logs = np.log(np.maximum(scores - self.sorted_scores[0], 0.0) + _offset(self.sorted_scores))
        tail = self.tail_mass * np.exp(-(logs - self.tail_threshold) / self.tail_scale)
        beyond = logs > self.tail_threshold
        # inside the data the rank is exact; the tail only ever lowers p past the largest scores
        p = np.where(beyond & (n_ge == 0), np.minimum(p, tail), p)
        p = np.where(np.isnan(scores), 1.0, p)
        return p

    def rank_pvalues(self, scores: np.ndarray) -> np.ndarray:
        """Plain conformal p-values, floored at 1/(n+1): exact validity, used for sequential tests."""
        scores = np.asarray(scores, dtype=np.float64)
        n = len(self.sorted_scores)
        n_ge = n - np.searchsorted(self.sorted_scores, scores, side="left")
        p = (1.0 + n_ge) / (n + 1.0)
        return np.where(np.isnan(scores), 1.0, p)

    def lower_rank_pvalues(self, scores: np.ndarray) -> np.ndarray:
        """Conformal p-values of the *other* tail: small when a score is lower than calibration scores.

        Drift can make inputs more typical than normal data (dimmer images,
        constant fields); those have ordinary upper-tail p-values near 1.
        """
        scores = np.asarray(scores, dtype=np.float64)
        n = len(self.sorted_scores)
        n_le = np.searchsorted(self.sorted_scores, scores, side="right")
        p = (1.0 + n_le) / (n + 1.0)
        return np.where(np.isnan(scores), 1.0, p)

    def to_tree(self) -> dict[str, Any]:
        return {"sorted_scores": self.sorted_scores, "tail_threshold": self.tail_threshold,
                "tail_scale": self.tail_scale, "tail_mass": self.tail_mass}

    @classmethod
    def from_tree(cls, tree: dict[str, Any]) -> ConformalCalibrator:
        return cls(np.asarray(tree["sorted_scores"], dtype=np.float64), float(tree["tail_threshold"]),
                   float(tree["tail_scale"]), float(tree["tail_mass"]))


@dataclass(frozen=True)
class TailCalibrator:
    """Upper-tail p-values whose top end is a tail model, so a small calibration set still resolves a 1 % test.

    Why not the rank alone: it moves in steps of ``1/(n+1)``, so a 1 % test on
    99 calibration rows fires only above the single largest score, and a 0.5 %
    share of an OR of two tests on 315 rows above the largest one or two. That
    threshold swings with one row: on the tabular set over ten detector seeds
    it let through 0.4 % of clean rows when 1 % was asked, and missed attacks
    a threshold at the true 99th percentile catches.

    Over the top ``k`` scores (peaks over threshold; Pickands-Balkema-de Haan:
    excesses over a high threshold follow a generalised Pareto law with shape
    ``xi``) the p-value comes from such a tail. A few dozen points pin a shape
    down poorly, so the shape is a fixed default unless the data say the tail
    is *heavier*, never lighter (a heavier tail means fewer alarms):

    - ``upper_end=None``: exponential excesses (``xi = 0``), or the
      probability-weighted-moments estimate (Hosking & Wallis 1987, closed form
      and steadier than maximum likelihood on small samples) when it is above 0.
    - ``upper_end=e``: a statistic that cannot exceed ``e`` (a negated logit
      margin never exceeds 0). Default: a density finite and non-zero at ``e``,
      so the tail probability falls linearly to 0 there (``xi = -1``); when the
      top scores crowd ``e`` more than that, the fitted power ``(d / d_k)^g``
      of the distance ``d`` to ``e`` (Hill-type estimate, ``g < 1``,
      ``xi = -1/g``).

    Below the top ``k`` the plain conformal rank; the two meet at the threshold.
    """

    sorted_scores: np.ndarray  # float64 ascending
    tail_threshold: float  # u: the (k+1)-th largest score; +inf when the tail model is off
    tail_scale: float  # sigma of the generalised Pareto excesses over u
    tail_shape: float  # xi: 0 exponential, > 0 heavier (Pareto-like), < 0 ends at u - sigma / xi
    tail_mass: float  # (1 + #scores above u)/(n+1): the rank p-value just above u

    MIN_POWER = 0.05  # floor of the bounded tail's power g (xi >= -20), for a top crowded at the end

    @classmethod
    def fit(cls, scores: np.ndarray, upper_end: float | None = None, tail_fraction: float = 0.1,
            min_tail: int = 10) -> TailCalibrator:
        """Calibrate on scores of held-out normal data (never the data the scorer was fitted on)."""
        scores = _sorted_calibration_scores(scores)
        n = len(scores)
        if upper_end is not None and scores[-1] > upper_end:
            raise ValueError(f"calibration score {scores[-1]} exceeds the statistic's upper end {upper_end}")
        k = min(max(min_tail, round(tail_fraction * n)), n - 1)
        u = float(scores[-k - 1])
        top = scores[scores > u]  # the top k, less any tied with u
        mass = (1 + len(top)) / (n + 1)  # the rank p-value just above u, ties or not
        shape, scale = 0.0, 0.0
        if len(top) and upper_end is None:
            shape, scale = _pwm_shape_scale(top - u)
        elif len(top):
            span = upper_end - u
            logs = np.log(span / np.maximum(upper_end - top, span * 1e-12))  # distances to the end, as powers
            power = float(np.clip(len(top) / max(logs.sum(), 1e-300), cls.MIN_POWER, 1.0))
            shape, scale = -1.0 / power, span / power
        if not (np.isfinite(scale) and scale > 1e-300 and np.isfinite(shape)):
            return cls(scores, np.inf, 1.0, 0.0, mass)  # ties at the top: no tail to model, the rank alone
        return cls(scores, u, float(scale), float(shape), mass)

    def pvalues(self, scores: np.ndarray, smooth: bool = False) -> np.ndarray:
        """float64 p-values, small = more extreme than the calibration scores.

        ``smooth`` interpolates the rank between neighbouring calibration
        scores, for ranking rows against each other (no ties); for thresholds
        use the default.
        """
        scores = np.asarray(scores, dtype=np.float64)
        return self._with_tail(scores, self._smooth_rank(scores) if smooth else self._rank(scores), self._tail(scores))

    def pvalues_both(self, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(pvalues(scores), pvalues(scores, smooth=True))`` at little more than the cost of one: a detector
        thresholds on the first and ranks on the second, for every batch."""
        scores = np.asarray(scores, dtype=np.float64)
        tail = self._tail(scores)
        return (self._with_tail(scores, self._rank(scores), tail),
                self._with_tail(scores, self._smooth_rank(scores), tail))

    def _rank(self, scores: np.ndarray) -> np.ndarray:
        """The conformal rank p-value: (1 + calibration scores at or above) / (n + 1)."""
        n = len(self.sorted_scores)
        return (1.0 + n - np.searchsorted(self.sorted_scores, scores, side="left")) / (n + 1.0)

    def _smooth_rank(self, scores: np.ndarray) -> np.ndarray:
        """The rank, interpolated inside the gap between neighbouring calibration scores (np.interp overflows
        on a gap below ~1e-308: it divides by the gap first)."""
        c = self.sorted_scores
        n = len(c)
        i = np.clip(np.searchsorted(c, scores, side="right") - 1, 0, n - 2)
        gap = c[i + 1] - c[i]
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.where(gap > 0, np.clip((scores - c[i]) / np.where(gap > 0, gap, 1.0), 0.0, 1.0), 0.0)
        return (1.0 + n - (i + frac)) / (n + 1.0)

    def _tail(self, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The rows past the tail threshold and their p-values from the tail model (computed for those rows
        only: a few per batch)."""
        above = np.flatnonzero(scores > self.tail_threshold)
        z = (scores[above] - self.tail_threshold) / self.tail_scale
        xi = self.tail_shape
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            # past the end of a bounded tail (xi < 0) the base is <= 0: probability 0
            tail = np.exp(-z) if xi == 0.0 else np.maximum(1.0 + xi * z, 0.0) ** (-1.0 / xi)
        return above, self.tail_mass * tail

    @staticmethod
    def _with_tail(scores: np.ndarray, p: np.ndarray, tail: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """The rank p-values ``p`` (changed in place) with the tail's above its threshold, 1 for NaN scores."""
        above, tail_p = tail
        p[above] = tail_p
        p[np.isnan(scores)] = 1.0
        return p

    def to_tree(self) -> dict[str, Any]:
        return {"sorted_scores": self.sorted_scores, "tail_threshold": self.tail_threshold,
                "tail_scale": self.tail_scale, "tail_shape": self.tail_shape, "tail_mass": self.tail_mass}

    @classmethod
    def from_tree(cls, tree: dict[str, Any]) -> TailCalibrator:
        return cls(np.asarray(tree["sorted_scores"], dtype=np.float64), float(tree["tail_threshold"]),
                   float(tree["tail_scale"]), float(tree["tail_shape"]), float(tree["tail_mass"]))


def _pwm_shape_scale(excess: np.ndarray) -> tuple[float, float]:
    """Generalised Pareto (shape, scale) of excesses over a threshold, the shape floored at 0 (exponential).

    Probability-weighted moments (Hosking & Wallis, Technometrics 1987), with
    ``a0 = E[Y]`` and ``a1 = E[Y (1 - F(Y))]`` from plotting positions:
    ``shape = 2 - a0 / (a0 - 2 a1)``, ``scale = 2 a0 a1 / (a0 - 2 a1)``.
    Below 0 the exponential with the mean excess as scale is used instead.
    """
    y = np.sort(excess)
    k = len(y)
    a0 = float(y.mean())
    a1 = float(np.mean((1.0 - (np.arange(1, k + 1) - 0.35) / k) * y))
    d = a0 - 2.0 * a1
    if d > 0:
        shape = 2.0 - a0 / d
        if shape > 0:
            return min(shape, 0.9), 2.0 * a0 * a1 / d
    return 0.0, a0


@dataclass(frozen=True)
class OrCalibrator:
    """One p-value for an OR of tests, each spending its share of the false-positive budget (weighted Bonferroni).

    Why: some attacks are caught by one statistic and missed by another (an
    adversarial example that stops on the decision boundary has a tiny margin
    but ordinary input features; a confidently wrong one is the opposite).
    ``p = min_j p_j / share_j``, so ``p <= a`` flags a row when any test
    ``j`` is at its share of ``a``; by the union bound at most ``a`` of normal
    data is flagged (less when the tests agree). A joint rank (the smallest
    per-test rank, itself ranked) is exact but needs ``m / a`` calibration rows
    and then rests its threshold on one or two of them; the tail model of
    :class:`TailCalibrator` resolves each share on a few hundred rows.
    """

    parts: tuple[TailCalibrator, ...]
    shares: tuple[float, ...]

    @classmethod
    def fit(cls, stats: np.ndarray, shares: tuple[float, ...] = (1.0,),
            upper_ends: tuple[float | None, ...] | None = None) -> OrCalibrator:
        """``stats`` [n, m]: m statistics (higher = more anomalous) of held-out normal rows; ``shares`` sum to 1."""
        stats = np.asarray(stats, dtype=np.float64)
        if stats.ndim != 2 or stats.shape[1] != len(shares):
            raise ValueError(f"expected calibration statistics of shape [rows, {len(shares)}], got {stats.shape}")
        if not np.isclose(sum(shares), 1.0) or min(shares) <= 0:
            raise ValueError(f"the tests' shares of the false-positive rate must be positive and sum to 1, "
                             f"got {shares}")
        ends = upper_ends or (None,) * len(shares)
        return cls(tuple(TailCalibrator.fit(stats[:, j], ends[j]) for j in range(stats.shape[1])),
                   tuple(float(s) for s in shares))

    def pvalues(self, stats: np.ndarray, smooth: bool = False) -> np.ndarray:
        """p-value per row of ``stats`` [rows, m]; ``smooth`` for ranking rows (see ``TailCalibrator``)."""
        stats = np.asarray(stats, dtype=np.float64)
        return self._combine(stats, [c.pvalues(stats[:, j], smooth) for j, c in enumerate(self.parts)])

    def tail_score(self, stats: np.ndarray) -> np.ndarray:
        """A continuous "how anomalous" per row, ``-log`` of the smoothed p-value: for ranking and ROC curves."""
        return _minus_log(self.pvalues(stats, smooth=True))

    def pvalues_and_tail_score(self, stats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(pvalues(stats), tail_score(stats))``, sharing the work of the two (both are read every batch)."""
        stats = np.asarray(stats, dtype=np.float64)
        both = [c.pvalues_both(stats[:, j]) for j, c in enumerate(self.parts)]
        return (self._combine(stats, [b[0] for b in both]),
                _minus_log(self._combine(stats, [b[1] for b in both])))

    def _combine(self, stats: np.ndarray, per_test: list[np.ndarray]) -> np.ndarray:
        """The OR's p-value from each test's: the smallest ``p_j / share_j``, at most 1; 1 for rows with a NaN."""
        p = per_test[0] / self.shares[0]
        for pj, w in zip(per_test[1:], self.shares[1:]):
            p = np.minimum(p, pj / w)
        p = np.minimum(p, 1.0)
        p[np.isnan(stats).any(1)] = 1.0
        return p

    def to_tree(self) -> dict[str, Any]:
        return {"parts": [c.to_tree() for c in self.parts], "shares": np.asarray(self.shares)}

    @classmethod
    def from_tree(cls, tree: dict[str, Any]) -> OrCalibrator:
        return cls(tuple(TailCalibrator.from_tree(t) for t in tree["parts"]),
                   tuple(float(s) for s in np.asarray(tree["shares"]).ravel()))


def _minus_log(p: np.ndarray) -> np.ndarray:
    """``-log p``, floored at p = 1e-300: a continuous "how anomalous" for ranking."""
    return -np.log(np.maximum(p, 1e-300))


def _sorted_calibration_scores(scores: np.ndarray) -> np.ndarray:
    """float64 ascending, or an error saying what to fix: too few rows to calibrate on, or non-finite scores."""
    scores = np.sort(np.asarray(scores, dtype=np.float64))
    if len(scores) < 20:
        raise ValueError(f"need at least 20 calibration scores to calibrate p-values, got {len(scores)}; "
                         "give the detector more reference rows")
    if not np.isfinite(scores).all():
        raise ValueError("calibration scores contain NaN or infinity; check the reference data")
    return scores


def _offset(sorted_scores: np.ndarray) -> float:
    """A positive shift so the log is defined at the smallest score, scaled to the score spread."""
    spread = float(sorted_scores[-1] - sorted_scores[0])
    return max(spread * 1e-3, 1e-9)
