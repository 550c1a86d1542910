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


def _offset(sorted_scores: np.ndarray) -> float:
    """A positive shift so the log is defined at the smallest score, scaled to the score spread."""
    spread = float(sorted_scores[-1] - sorted_scores[0])
    return max(spread * 1e-3, 1e-9)
