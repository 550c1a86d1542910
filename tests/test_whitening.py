"""Whitening by a reference's shrunk covariance (detectors/_whitening.py)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.covariance import LedoitWolf

from agent.scenarios.data import load
from agent.state import load_tree, save_tree
from detectors._whitening import Whitening


def test_whitening_is_the_inverse_square_root_of_the_shrunk_covariance(tmp_path) -> None:
    """Exact when ``rank`` covers every feature; beyond it, the other directions share one scale that brings
    their mean variance to 1. Numpy and torch (its dense and its low-rank form) agree, and the map survives an
    artifact round trip."""
    ds = load("digits")
    X = ds.X_train.astype(np.float64)
    cov = LedoitWolf().fit(X).covariance_
    for rank in (64, 8):
        w = Whitening.fit(X, rank)
        M = w.rest * np.eye(64) + (w.basis * w.gain) @ w.basis.T
        S = M @ cov @ M  # the covariance as a distance in the whitened space sees it
        np.testing.assert_allclose(w.basis.T @ S @ w.basis, np.eye(rank), atol=1e-6)
        if rank < 64:
            rest = np.eye(64) - w.basis @ w.basis.T
            assert abs(np.trace(rest @ S) / (64 - rank) - 1.0) < 1e-6
        z = w.apply_np(ds.X_test)
        op = w.on(torch.device("cpu"))
        assert (op.dense is not None) == (rank == 64)  # full rank: one dense product; low rank: two thin ones
        np.testing.assert_allclose(op(torch.as_tensor(ds.X_test)).numpy(), z, rtol=1e-4, atol=1e-4)
        save_tree(tmp_path / "w.npz", w.to_tree())
        np.testing.assert_allclose(Whitening.from_tree(load_tree(tmp_path / "w.npz")).apply_np(ds.X_test), z)


def test_whitened_distance_sees_broken_correlations() -> None:
    """Rows whose features keep their ranges but lose their correlations (each feature from another row) are
    far in whitened space and not in input space: why extraction's cover and drift_vae's Gaussian channel use it."""
    ds = load("tabular")
    w = Whitening.fit(ds.X_train, 128)
    rng = np.random.default_rng(0)
    shuffled = np.stack([ds.X_test[rng.integers(len(ds.X_test), size=30), np.arange(30)] for _ in range(500)])
    far = lambda X: np.linalg.norm(w.apply_np(X), axis=1)  # noqa: E731
    plain = lambda X: np.linalg.norm(X - ds.X_train.mean(0), axis=1)  # noqa: E731
    assert np.median(far(shuffled)) > 2 * np.median(far(ds.X_test))
    assert np.median(plain(shuffled)) < 1.5 * np.median(plain(ds.X_test))
