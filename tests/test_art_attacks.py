"""Attacks we did not write (IBM's ART) run through our model adapter and are measured by the detector."""

from __future__ import annotations

import pytest

from agent.scenarios.art_attacks import QUICK_ATTACKS, evaluate


def test_art_attacks_reach_the_model_and_the_detector_flags_iterative_linf() -> None:
    report = evaluate("digits", [0], rows=40, only=QUICK_ATTACKS)
    assert report["fpr"][0] <= 0.02
    by_name = {a["attack"]: a for a in report["attacks"]}
    assert set(by_name) == set(QUICK_ATTACKS)
    for a in by_name.values():
        # the adapter works: ART's gradients and queries reach the watched model and flip its answers
        assert a["success_rate"] >= 0.8, a
        assert 0.0 <= a["seed_0"]["tpr"] <= a["seed_0"]["tpr_at_benign_p99"] + 0.1
    assert by_name["BIM Linf 0.15"]["seed_0"]["tpr"] >= 0.9
    assert by_name["JSMA (L0)"]["mean_l0"] < 15 < by_name["BIM Linf 0.15"]["mean_l0"]  # L0 vs dense perturbations


def test_unknown_architecture_is_refused() -> None:
    with pytest.raises(ValueError, match="architecture"):
        evaluate("tabular", [0], architecture="cnn", rows=5, only=())
