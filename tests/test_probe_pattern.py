"""Naming a flagged probing client's technique (detectors/_probe_pattern.py), and on the eval's attackers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detectors import _probe_pattern as pp


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(1, keepdims=True))
    return (z / z.sum(1, keepdims=True)).astype(np.float32)


def two_class(gap: np.ndarray) -> np.ndarray:
    """float32 answers of a two-class model whose logit gap (class 0 minus class 1) is ``gap``."""
    return softmax(np.c_[gap, np.zeros_like(gap)])


def test_log_odds_reads_a_saturated_answer() -> None:
    probs = two_class(np.array([20.0, 30.0, 40.0]))
    assert (probs[:, 0] == 1.0).all()  # float32 rounds the top class to exactly 1 ...
    np.testing.assert_allclose(pp.log_odds(probs, 0), [20.0, 30.0, 40.0], rtol=1e-4)  # ... the rest still tells
    np.testing.assert_allclose(pp.log_odds(probs, 1), [-20.0, -30.0, -40.0], rtol=1e-4)


def test_chains_start_at_each_query_that_is_not_a_near_duplicate() -> None:
    near = np.array([0, 1, 1, 0, 1, 0, 0, 1], bool)
    assert [(c.start, c.stop) for c in pp.chains(near)] == [(0, 3), (3, 5), (5, 6), (6, 8)]
    assert [(c.start, c.stop) for c in pp.chains(np.ones(4, bool))] == [(0, 4)]


def few(rows: np.ndarray) -> np.ndarray:
    """Per query, whether it changed only a few features of the one before (as the extraction detector flags)."""
    return np.r_[False, pp.few_changed(rows[1:], rows[:-1])]


def walk(n: int, dim: int = 30, step: float = 0.05, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.cumsum(rng.normal(0, step, (n, dim)), axis=0).astype(np.float32)


def test_a_saturated_climb_is_inversion_and_needs_concentration() -> None:
    rng = np.random.default_rng(1)
    gap = np.linspace(25, 45, 60) + rng.normal(0, 1, 60)  # p rounds to 1.0 all along: only log-odds see it
    probs, near, low, rows = two_class(gap), np.r_[False, np.ones(59, bool)], np.zeros(60, bool), walk(60)
    assert pp.classify(probs, near, low, few(rows), probing=True, concentrated=True) == pp.INVERSION
    # the same climb spread over many seeds (not concentrated) is how JbDA's rounds look: not inversion
    assert pp.classify(probs, near, low, few(rows), probing=True, concentrated=False) == pp.EXTRACTION


def test_restarting_falls_are_black_box_evasion() -> None:
    # three seeds, each walked down from a confident answer to the first flip, then a fresh seed
    gap = np.concatenate([np.linspace(12, -0.1, 25) for _ in range(3)])
    near = np.ones(75, bool)
    near[[0, 25, 50]] = False
    probs = two_class(gap)
    assert pp.chain_trends(probs, near) == (0, 75)
    # over the whole window the saw-tooth neither climbs nor falls
    assert pp.chain_trends(probs, np.r_[False, np.ones(74, bool)]) == (0, 0)
    assert pp.classify(probs, near, np.zeros(75, bool), few(walk(75)), True, False) == pp.BLACK_BOX


def test_coordinate_steps_are_black_box_even_before_the_answer_moves() -> None:
    base = np.random.default_rng(2).normal(0, 1, 30).astype(np.float32)
    rows = np.repeat(base[None], 40, 0)
    for i in range(40):  # x + eps e_j, x - eps e_j, ...: one feature at a time
        rows[i, i % 30] += 0.5 if i % 2 else -0.5
    probs = two_class(np.full(40, 30.0) + np.random.default_rng(3).normal(0, 0.5, 40))
    near, low = np.r_[False, np.ones(39, bool)], np.zeros(40, bool)
    assert few(rows)[1:].all()
    assert pp.classify(probs, near, low, few(rows), probing=True, concentrated=True) == pp.BLACK_BOX
    # noisy copies of one record change every feature: membership probing
    noisy = base + np.random.default_rng(4).normal(0, 0.1, (40, 30)).astype(np.float32)
    assert not few(noisy).any()
    assert pp.classify(probs, near, low, few(noisy), probing=True, concentrated=True) == pp.MEMBERSHIP


def test_boundary_sitting_is_black_box_and_non_probing_is_extraction() -> None:
    probs = two_class(np.random.default_rng(5).normal(0, 3, 50))
    near = np.ones(50, bool)
    low = np.r_[np.ones(30, bool), np.zeros(20, bool)]
    rows = walk(50, step=1.0)
    assert pp.classify(probs, near, low, few(rows), probing=True, concentrated=False) == pp.BLACK_BOX
    assert pp.classify(probs, near, low, few(rows), probing=False, concentrated=False) == pp.EXTRACTION
    assert pp.classify(None, near, ~low, few(rows), probing=True, concentrated=True) == pp.MEMBERSHIP


@pytest.mark.slow
@pytest.mark.parametrize("name,seed", [("digits", 1), ("tabular", 0), ("tabular", 3)])
def test_eval_attackers_are_named_right(name: str, seed: int) -> None:
    """Every detected attacker of the extraction scenario gets the technique it uses (seeds chosen before the
    classification was rewritten: tabular 0 named inversion membership probing and SimBA extraction)."""
    from agent.scenarios.extraction import run_dataset

    report = run_dataset(name, torch.device("cpu"), quick=False, seed=seed)
    named = {v["variant"]: (v["pattern"], v["expected_pattern"]) for v in report["variants"] if v["pattern"]}
    assert {"simba", "inversion", "membership"} <= set(named), named
    wrong = {k: v for k, v in named.items() if v[0] != v[1]}
    assert not wrong, wrong


def test_sparse_steps_need_few_of_many_features() -> None:
    rows = np.zeros((5, 4), np.float32)
    rows[1:, 0] = [1, 2, 3, 4]  # one feature of four per step: sparse
    assert few(rows)[1:].all()
    rows[1:, 1] = [1, 2, 3, 4]  # two of four: half the input, not "few"
    assert not few(rows).any()
    assert not pp.few_changed(rows[:1], np.full((1, 4), np.nan)).any()  # no query before: never few


def coordinate_walk(n: int, dim: int = 30, step: float = 2.0, seed: int = 7) -> np.ndarray:
    """Queries that each change two features of the one before by a large step (no near duplicates)."""
    rng = np.random.default_rng(seed)
    rows = np.zeros((n, dim), np.float32)
    for i in range(1, n):
        rows[i] = rows[i - 1]
        rows[i, rng.choice(dim, 2, replace=False)] += rng.choice([-step, step], 2)
    return rows


def test_large_coordinate_steps_are_black_box_without_near_duplicates() -> None:
    """SimBA with a large step: no query is a near duplicate and the client is not concentrated, so the tests
    that flag it are the off-reference ones; its few-feature steps still name it (it used to be extraction)."""
    rows = coordinate_walk(64)
    probs = two_class(np.random.default_rng(8).normal(10, 1, 64))
    no = np.zeros(64, bool)
    assert pp.classify(probs, no, no, few(rows), probing=False, concentrated=False) == pp.BLACK_BOX


def test_few_feature_steps_link_a_chain_that_near_duplicates_alone_break() -> None:
    """An inversion with a big step: its climb is one chain through the few-feature steps between its recent
    queries, though none is a near duplicate of an earlier one."""
    rows = coordinate_walk(64)
    probs = two_class(np.linspace(-3, 12, 64) + np.random.default_rng(9).normal(0, 0.5, 64))
    no = np.zeros(64, bool)
    assert pp.chain_trends(probs, no) == (0, 0)  # near duplicates alone: no chain
    assert pp.classify(probs, no, no, few(rows), probing=True, concentrated=True) == pp.INVERSION


def test_a_boundary_search_straddles_and_a_walk_near_it_does_not() -> None:
    """Decision-based attacks (HopSkipJump, Sign-OPT) binary-search the boundary: about half their small steps
    are answered with the other class; copies of a record that sits near the boundary cross it now and then."""
    rng = np.random.default_rng(11)
    search = two_class(rng.choice([-0.5, 0.5], 60))  # each step lands on either side
    steps = np.r_[False, np.ones(59, bool)]
    assert pp.straddles(search, steps)
    assert not pp.straddles(search, np.zeros(60, bool))  # unrelated queries: a label change says nothing
    near_boundary = two_class(np.where(np.arange(60) % 12 == 5, -0.5, 0.5))  # one copy in twelve crosses
    assert not pp.straddles(near_boundary, steps)
    no = np.zeros(60, bool)
    assert pp.classify(search, no, no, no, probing=True, concentrated=True, near_previous=steps) == pp.BLACK_BOX
    assert pp.classify(near_boundary, steps, no, no, probing=True, concentrated=True,
                       near_previous=steps) == pp.MEMBERSHIP


def test_a_walk_from_a_far_start_is_black_box_and_scattered_copies_are_membership() -> None:
    """ART's Boundary attack starts from a random adversarial input and walks towards the original with a
    constant answer: concentrated, near duplicates, no climb or fall; it walks, copies of one record do not."""
    rng = np.random.default_rng(12)
    start = rng.uniform(0, 1, (1, 30))
    target = rng.uniform(0, 1, 30)
    steps = start + np.linspace(0.1, 0.6, 50)[:, None] * (target - start) + rng.normal(0, 0.005, (50, 30))
    walk_rows = np.r_[rng.uniform(0, 1, (2, 30)), steps].astype(np.float32)  # two far-off random tries first
    copies = (target + rng.normal(0, 0.05, (52, 30))).astype(np.float32)
    assert pp.walks(walk_rows) and not pp.walks(copies)
    assert not pp.walks(walk_rows[:5])  # too few queries to say
    probs = two_class(np.full(52, 8.0) + rng.normal(0, 0.05, 52))
    near, no = np.r_[False, np.ones(51, bool)], np.zeros(52, bool)
    assert pp.classify(probs, near, no, no, True, True, near_previous=near, walking=True) == pp.BLACK_BOX
    assert pp.classify(probs, near, no, no, True, True, near_previous=near, walking=False) == pp.MEMBERSHIP
