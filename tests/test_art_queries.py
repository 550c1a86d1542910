"""Query-based black-box attacks we did not write (IBM's ART), seen query by query by the extraction detector."""

from __future__ import annotations

import numpy as np
import torch

from agent.scenarios import art_queries
from agent.scenarios.data import load
from agent.scenarios.extraction import GOAL_QUERIES


def test_art_query_streams_are_flagged_in_time_and_named_black_box_on_digits() -> None:
    report = art_queries.evaluate("digits", 0)
    assert report["flagged_benign"] == []
    variants = {v["variant"]: v for v in report["variants"]}
    assert {"ART HopSkipJump L2", "ART Boundary", "ART ZOO", "ART Sign-OPT", "ART SimBA pixels"} <= set(variants)
    for name, v in variants.items():
        assert v["queries_to_detect"] is not None and v["queries_to_detect"] <= GOAL_QUERIES, (name, v)
        assert v["pattern"] == "black_box_probing", (name, v)


def test_recorded_queries_are_reproducible() -> None:
    """ART's HopSkipJump draws its start from an unseeded generator; the scenario seeds it."""
    ds = load("tabular")
    weights = np.random.default_rng(0).normal(size=(ds.dim, 2)).astype(np.float32)

    def oracle(X: np.ndarray) -> np.ndarray:
        return torch.softmax(torch.as_tensor(X @ weights), 1).numpy()

    first = art_queries.record_queries(ds, oracle, 120, 3, "HopSkipJump L2")
    assert len(first) == 120
    np.testing.assert_array_equal(first, art_queries.record_queries(ds, oracle, 120, 3, "HopSkipJump L2"))
