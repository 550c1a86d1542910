"""Whitening by a reference's shrunk covariance: distances that respect the correlations natural rows keep.

Why: natural rows keep correlations between features (a tumour's radius,
perimeter and area move together; neighbouring pixels too). Synthetic,
rescaled or out-of-task inputs break them while each feature stays inside its
usual range, which a Euclidean distance does not see and a Mahalanobis one
does. Ledoit-Wolf shrinkage keeps the inverse stable when the reference has
few rows for its width. Used by ``extraction`` (off-reference distance) and
``drift_vae`` (its Gaussian channel).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class Whitening:
    """x -> (x - shift) whitened by the reference's Ledoit-Wolf covariance, at a cost of O(d * rank) per row.

    The top ``rank`` principal directions are scaled one by one; the rest
    share their mean variance (with ``rank >= d`` this is the exact inverse
    square root of the shrunk covariance).
    """

    shift: np.ndarray  # [d]
    basis: np.ndarray  # [d, r] top principal directions
    gain: np.ndarray  # [r]: 1/sqrt(variance) of each direction minus `rest`
    rest: float  # 1/sqrt(mean variance of the other directions)

    @classmethod
    def fit(cls, X: np.ndarray, rank: int) -> Whitening:
        from sklearn.covariance import LedoitWolf

        X = np.asarray(X, np.float64)
        cov = LedoitWolf().fit(X).covariance_
        evals, evecs = np.linalg.eigh(cov)
        order = np.argsort(evals)[::-1]
        evals, evecs = np.maximum(evals[order], 1e-12), evecs[:, order]
        r = min(rank, len(evals))
        rest = 1.0 / math.sqrt(float(evals[r:].mean())) if r < len(evals) else 0.0
        return cls(X.mean(0), evecs[:, :r], 1.0 / np.sqrt(evals[:r]) - rest, rest)

    def apply_np(self, X: np.ndarray) -> np.ndarray:
        c = np.asarray(X, np.float64) - self.shift
        return (c * self.rest + ((c @ self.basis) * self.gain) @ self.basis.T).astype(np.float32)

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        t = lambda a: torch.as_tensor(np.asarray(a, np.float32), device=device)  # noqa: E731
        return t(self.shift), t(self.basis), t(self.gain), t(self.rest)

    @staticmethod
    def apply(x: torch.Tensor, shift: torch.Tensor, basis: torch.Tensor, gain: torch.Tensor,
              rest: torch.Tensor) -> torch.Tensor:
        c = x - shift
        return c * rest + ((c @ basis) * gain) @ basis.T

    def to_tree(self) -> dict[str, Any]:
        return {"shift": self.shift, "basis": self.basis, "gain": self.gain, "rest": self.rest}

    @classmethod
    def from_tree(cls, tree: dict[str, Any]) -> Whitening:
        return cls(*(np.asarray(tree[k], np.float64) for k in ("shift", "basis", "gain")), float(tree["rest"]))
