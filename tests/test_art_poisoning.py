"""Poison we did not make (IBM's ART backdoors, dirty- and clean-label) in digits feedback, seen by `poisoning`."""

from __future__ import annotations

from agent.scenarios import art_poisoning


def test_art_backdoors_are_named_with_their_records() -> None:
    by = {r["campaign"]: r for r in art_poisoning.evaluate(0)}
    assert set(by) == set(art_poisoning.CAMPAIGNS)
    for name, r in by.items():
        # measured at seed 0: recall 0.964-1.0 with the watched model as the proxy, 0.810 by transfer
        assert r["recall"] >= (0.75 if "own proxy" in name else 0.9) and r["precision"] >= 0.8, (name, r)
        assert "backdoor" in r["kinds"], (name, r)
    # clean-label poison keeps its true labels; the PGD step makes the model dispute them, which the
    # label-plausibility score sees, and the shared trigger names the campaign a backdoor
    clean = by["ART clean-label backdoor, three sources"]
    assert clean["model_agrees_with_poison_labels"] < 0.2 and clean["precision"] >= 0.95
