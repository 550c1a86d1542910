"""Conformal p-values from calibration scores, with a tail that reaches past the data.

Why: a detector's raw score (a VAE's negative ELBO, an adversarial classifier's
logit) means nothing to an analyst or a threshold; its rank among scores of
held-out *normal* data does. The conformal p-value
``(1 + #{calibration >= s}) / (n + 1)`` is valid (P(p <= a) <= a for normal
data) whatever the score's distribution, but cannot go below ``1 / (n + 1)``:
with 400 calibration rows no record can ever look rarer than 1 in 401.

A per-record alarm at a tiny false-positive rate (1e-6) needs more than that, so
beyond the top ``tail_k`` calibration scores we extrapolate with a
peaks-over-threshold fit (Siffer et al., "Anomaly detection in streams with
extreme value theory", KDD 2017): an exponential tail on the *log* score,
i.e. a Pareto tail on the score. A Pareto tail is heavier than the exponential
one, so extrapolated p-values err on the side of fewer alarms.
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
        scores = np.sort(np.asarray(scores, dtype=np.float64))
        if len(scores) < 20:
            raise ValueError(
                f"need at least 20 calibration scores to calibrate p-values, got {len(scores)}; "
                "give the detector more reference rows"
            )
        if not np.isfinite(scores).all():
            raise ValueError("calibration scores contain NaN or infinity; check the reference data")
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

    def smooth_pvalues(self, scores: np.ndarray) -> np.ndarray:
        """``pvalues`` with the rank interpolated between neighbouring calibration scores: continuous, for ranking.

        Not for thresholds (use ``rank_pvalues``): it exists so that rows inside
        the calibration range do not tie when they are ranked against each other.
        """
        scores = np.asarray(scores, dtype=np.float64)
        n = len(self.sorted_scores)
        below = np.interp(scores, self.sorted_scores, np.arange(n, dtype=np.float64))
        p = (1.0 + n - below) / (n + 1.0)  # 1 at the lowest calibration score, 2/(n+1) at the highest
        beyond = scores > self.sorted_scores[-1]
        if beyond.any():  # past them all: the Pareto tail
            p[beyond] = self.pvalues(scores[beyond])
        return np.where(np.isnan(scores), 1.0, p)

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
class MinPCalibrator:
    """One conformal p-value for several statistics at once: an OR of tests at a single exact false-positive rate.

    Why: some attacks are caught by one statistic and missed by another (an
    adversarial example that stops on the decision boundary has a tiny margin
    but ordinary input features; a confidently wrong one is the opposite).
    Flagging when *any* per-statistic p-value is small needs a multiple-testing
    correction; Bonferroni halves each test's budget, which on a few hundred
    calibration rows leaves a threshold resting on one or two scores. Instead
    the smallest per-statistic rank is itself ranked, full-conformal style:
    among the calibration rows and the test row together, each one's smallest
    rank in any statistic, so ``p <= a`` again flags about ``a`` of normal data
    (exact up to ties). The price of the OR is resolution: a row extreme in one
    statistic only gets ``p = 2 / (n + 1)`` with two statistics, so ``n + 1``
    calibration rows must be at least ``m / a`` (see :meth:`resolves`).
    """

    parts: tuple[ConformalCalibrator, ...]
    stats: np.ndarray  # [n, m] float64: the calibration rows' statistics, row by row

    EXACT_BELOW = 0.05  # p-values up to this are computed exactly; above it, the cheap conservative bound

    @classmethod
    def fit(cls, stats: np.ndarray) -> MinPCalibrator:
        """``stats`` [n, m]: m statistics (higher = more anomalous) of held-out normal rows."""
        stats = np.asarray(stats, dtype=np.float64)
        if stats.ndim != 2 or stats.shape[1] < 1:
            raise ValueError(f"expected calibration statistics of shape [rows, statistics], got {stats.shape}")
        return cls(tuple(ConformalCalibrator.fit(stats[:, j]) for j in range(stats.shape[1])), stats)

    @staticmethod
    def resolves(n_calibration: int, n_statistics: int, alpha: float) -> bool:
        """Whether a row extreme in a single statistic can reach ``p <= alpha`` with this many calibration rows."""
        return n_statistics / (n_calibration + 1.0) <= alpha

    def _counts_ge(self, stats: np.ndarray) -> np.ndarray:
        """[rows, m]: calibration rows scoring at least as high, per statistic (ties count as higher)."""
        n = len(self.stats)
        return np.stack([n - np.searchsorted(c.sorted_scores, stats[:, j], side="left")
                         for j, c in enumerate(self.parts)], axis=1)

    @property
    def _calibration_ranks(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each calibration row's rank among the calibration rows (itself included) per statistic [n, m], the
        rows' best ranks sorted, and the rows in that order; computed once (the hot path only looks them up)."""
        cached = self.__dict__.get("_ranks")
        if cached is None:
            ranks = self._counts_ge(self.stats)
            order = np.argsort(ranks.min(1), kind="stable")
            cached = (ranks, ranks.min(1)[order], order)
            object.__setattr__(self, "_ranks", cached)
        return cached

    def rank_pvalues(self, stats: np.ndarray) -> np.ndarray:
        """Jointly calibrated p-value per row of ``stats`` [rows, m]; with one statistic, that statistic's own."""
        stats = np.asarray(stats, dtype=np.float64)
        if len(self.parts) == 1:
            return self.parts[0].rank_pvalues(stats[:, 0])
        n = len(self.stats)
        ranks, best, order = self._calibration_ranks
        own = 1 + self._counts_ge(np.nan_to_num(stats, nan=-np.inf)).min(1)  # the test row's best rank
        # a calibration row counts when its best rank, with the test row among the ranks, is no worse than the
        # test row's: A_ij + [s_j >= c_ij] <= own for some statistic j. Cheap bound first: without the
        # test row's term (A_ij <= own) every counted row is found, plus at most one per statistic (ties
        # aside), a conservative p-value; it is made exact where it can decide an alarm (p <= EXACT_BELOW).
        count = np.searchsorted(best, own, side="right")
        exact = np.flatnonzero((1.0 + count) / (n + 1.0) <= self.EXACT_BELOW)
        if len(exact):
            for chunk in np.array_split(exact, max(1, len(exact) // 256)):
                cand = order[: int(count[chunk].max())]  # only rows the cheap bound counted can count
                bump = stats[chunk][:, None, :] >= self.stats[cand][None]  # [rows, cand, m]
                best_with_test = (ranks[cand][None] + bump).min(2)
                count[chunk] = (best_with_test <= own[chunk, None]).sum(1)
        p = (1.0 + count) / (n + 1.0)
        return np.where(np.isnan(stats).any(1), 1.0, p)

    def tail_score(self, stats: np.ndarray) -> np.ndarray:
        """A continuous "how anomalous" per row: -log of the smallest interpolated, tail-extrapolated p-value.

        Rank p-values tie between neighbouring calibration scores and for every
        row beyond them all; ranking rows *against each other* (within shifted
        traffic, or for a ROC curve) needs a score that keeps moving.
        """
        stats = np.asarray(stats, dtype=np.float64)
        p = np.min([c.smooth_pvalues(stats[:, j]) for j, c in enumerate(self.parts)], axis=0)
        return -np.log(np.maximum(p, 1e-300))

    def to_tree(self) -> dict[str, Any]:
        return {"parts": [c.to_tree() for c in self.parts], "stats": self.stats}

    @classmethod
    def from_tree(cls, tree: dict[str, Any]) -> MinPCalibrator:
        return cls(tuple(ConformalCalibrator.from_tree(t) for t in tree["parts"]),
                   np.asarray(tree["stats"], dtype=np.float64).reshape(-1, len(tree["parts"])))


def _offset(sorted_scores: np.ndarray) -> float:
    """A positive shift so the log is defined at the smallest score, scaled to the score spread."""
    spread = float(sorted_scores[-1] - sorted_scores[0])
    return max(spread * 1e-3, 1e-9)
