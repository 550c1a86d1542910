"""Which technique a flagged probing client is using, read from the answers it got, chain by chain.

A probing client (near-duplicate or tightly clustered queries) is one of three
things, and the SOC needs the right ATLAS technique for each:

- **black-box evasion** (SimBA, HopSkipJump, Boundary, ZOO): each run of small
  steps walks *away* from the class its seed had, until the label flips; then
  a new seed starts a new run. Or it sits on the decision boundary
  (decision-based attacks: low margins, or small steps answered now with one
  class, now with the other, see :func:`straddles`), or its consecutive
  queries differ in a few input features only (coordinate-wise search and
  finite-difference gradient estimates: SimBA's pixel basis, ZOO), which
  shows even while its steps have not yet moved the model's answer, and with
  steps too large to be near duplicates;
- **model inversion**: a run of small steps *climbs* one class's confidence
  until the model is sure;
- **membership inference**: many near copies of one record, confidence
  moving no way in particular, the copies scattered around the record rather
  than walking away from it (:func:`walks`).

Why runs ("chains"): a client that restarts from a new seed after each flip
makes a saw-tooth of its confidences; over the whole window that reads as
neither a fall nor a climb (or as a climb, from a low tail end to a fresh
seed). A chain is a maximal run of consecutive queries each a near duplicate
of the client's earlier ones, or a step of a few features from the query
before; a query that is neither starts a new chain. The second link keeps a
search with large coordinate steps (SimBA or an inversion with a big step
size) in one chain.
Inversion also needs the client's queries to be concentrated (one evolving
input): a synthetic-data extraction attacker (JbDA) pushes its earlier
queries deeper into their own classes, round after round, and its rounds can
read as climbs, but they spread over many seeds.

Why log-odds, computed from the *other* classes' mass: a model's confidence
saturates, so probabilities of 0.93 → 1.0 or 1.0 → 0.9 hide climbs and falls
of ten nats, and a float32 probability of the top class rounds to exactly 1
while the rest of the distribution still carries the information.
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy import stats

MIN_CHAIN = 8  # queries a chain needs before its trend says anything
TREND_RHO = 0.6  # Spearman correlation of a class's log-odds with query order that counts as a trend
TREND_NATS = 1.0  # least change of that log-odds between a chain's first and last quarter
SPARSE_SHARE = 0.1  # a step that changes at most this share of the input's features (at least 2) is sparse
STRADDLE_SHARE = 0.25  # small steps answered with another class than the query before: a boundary search
_TINY = float(np.finfo(np.float32).tiny)  # answers arrive as float32: below this a probability is noise

INVERSION = (("AML.T0024.001", "AML.T0024"), "model_inversion")
BLACK_BOX = (("AML.T0043.001",), "black_box_probing")
MEMBERSHIP = (("AML.T0024.000", "AML.T0024"), "membership_inference")
EXTRACTION = (("AML.T0024.002", "AML.T0024"), "extraction")


def log_odds(probs: np.ndarray, cls: int) -> np.ndarray:
    """log p_cls - log(sum of the other classes) per row; each side floored at float32's smallest normal
    number (so at most about ±87 nats)."""
    own = probs[:, cls].astype(np.float64)
    rest = np.delete(probs, cls, axis=1).astype(np.float64).sum(1)  # not 1 - own: that cancels near 1
    return np.log(np.maximum(own, _TINY)) - np.log(np.maximum(rest, _TINY))


def chains(linked: np.ndarray) -> list[slice]:
    """Maximal runs of queries in which every query after the first is linked to the ones before it."""
    starts = np.flatnonzero(~linked.astype(bool))
    bounds = np.r_[0, starts[starts > 0], len(linked)]
    return [slice(int(a), int(b)) for a, b in itertools.pairwise(bounds)]


def _trend(values: np.ndarray) -> tuple[float, float]:
    """(Spearman rho with query order, last-quarter mean minus first-quarter mean)."""
    q = max(len(values) // 4, 1)
    rho = stats.spearmanr(np.arange(len(values)), values).statistic if np.ptp(values) > 0 else 0.0
    return (float(rho) if np.isfinite(rho) else 0.0), float(values[-q:].mean() - values[:q].mean())


def chain_trends(probs: np.ndarray, linked: np.ndarray) -> tuple[int, int]:
    """(queries in climbing chains, queries in falling chains) of a window in arrival order.

    A chain climbs when the class it ends on gains log-odds steadily; it falls
    when the class it started on loses them steadily. A chain that starts on
    one class and climbs another (inversion from a blank input the model calls
    something else) does both and counts as climbing: a black-box evasion
    stops at the first flip, so the class its chain ends on is still the one
    it started on.
    """
    climbing = falling = 0
    for run in chains(linked):
        p = probs[run]
        if len(p) < MIN_CHAIN:
            continue
        q = max(len(p) // 4, 1)
        end_cls = int(np.argmax(p[-q:].mean(0)))
        end = log_odds(p, end_cls)
        rho, change = _trend(end)
        if rho > TREND_RHO and change > TREND_NATS:
            climbing += len(p)
            continue
        rho, change = _trend(log_odds(p, int(np.argmax(p[:q].mean(0)))))
        if rho < -TREND_RHO and change < -TREND_NATS:
            falling += len(p)
    return climbing, falling


def few_changed(after: np.ndarray, before: np.ndarray) -> np.ndarray:
    """Per row, whether ``after`` differs from ``before`` in a few of the input's features, and in some.

    Few: at most ``SPARSE_SHARE`` of the features, at least 2 (SimBA's x + eps e_j then x - eps e_k), and
    always fewer than half of them (on a handful of features every step would be "few"). NaN rows in
    ``before`` (no previous query) are never few.
    """
    diff = np.abs(after.astype(np.float64) - before.astype(np.float64))
    tol = 1e-6 * max(float(np.nanmax(np.abs(after))) if after.size else 1.0, 1.0)
    changed = (diff > tol).sum(1)
    d = after.shape[1]
    return (changed > 0) & (changed <= max(2, int(np.ceil(SPARSE_SHARE * d)))) & (changed < d / 2) \
        & np.isfinite(before).all(1)


def straddles(probs: np.ndarray, follows: np.ndarray) -> bool:
    """Whether a client's small steps keep landing on both sides of the decision boundary.

    ``follows``: per query in arrival order, whether it is a small step from
    the query just before (near duplicate of it, or a few features changed).

    A decision-based attack (HopSkipJump, Boundary, Sign-OPT) has only the
    label to go by, so it must query both sides of the boundary to find it:
    binary searches between a point of each class, and gradient estimates
    from the sign of small random perturbations at the boundary. Its small
    steps are answered with another class than the query before in 0.14-0.53
    of cases (ART's, measured with ``python -m agent.scenarios.art_queries``);
    a score-based walk flips once per seed, copies of one record and a climb
    hardly ever: at most 0.094 over the eval's attackers at 0.25-4x their
    steps, and 0.136 where an inversion starts from an input the model finds
    ambiguous or membership probing copies a record on the boundary. A binary
    search spends about half its steps on each side, so the bar is a quarter
    (HopSkipJump 0.47-0.53, Sign-OPT 0.30-0.33; ART's Boundary attack, 0.14-0.20
    late in its run, is named by its walk instead, see :func:`walks`).
    """
    step = follows[1:].astype(bool)
    if step.sum() < MIN_CHAIN:
        return False
    labels = probs.argmax(1)
    return float((labels[1:] != labels[:-1])[step].mean()) >= STRADDLE_SHARE


def walks(recent: np.ndarray) -> bool:
    """Whether a client's recent queries (distinct, oldest first) move steadily through the input space.

    Copies of one record for membership inference scatter around it: how far
    a copy is from the first or from the last one has nothing to do with when
    it was sent. A search walks (Boundary's steps from an adversarial start
    towards the original, an inversion's climb), so the distance from one end
    of the walk changes steadily with query order. Both ends are tried: a
    search's first queries can be a far-off random start, its last ones a
    fresh seed.
    """
    if len(recent) < MIN_CHAIN:
        return False
    x = recent.astype(np.float64)
    from_first, _ = _trend(np.linalg.norm(x[1:] - x[0], axis=1))
    from_last, _ = _trend(np.linalg.norm(x[:-1] - x[-1], axis=1))
    return max(abs(from_first), abs(from_last)) > TREND_RHO


def classify(probs: np.ndarray | None, near_duplicate: np.ndarray, low_margin: np.ndarray,
             few_features: np.ndarray, probing: bool, concentrated: bool, near_previous: np.ndarray | None = None,
             walking: bool = False) -> tuple[tuple[str, ...], str]:
    """(ATLAS techniques, pattern name) of a flagged client.

    Per query of the client's window, in arrival order: ``probs`` (the model's
    answers; rows NaN where a record carried none; None when answers are
    unknown), ``near_duplicate`` (of any earlier query of the client),
    ``low_margin``, ``few_features`` (the query changed only a few features of
    the one before, :func:`few_changed`) and ``near_previous`` (a near duplicate
    of the one before; None: not known, then only few-feature steps count as
    small steps for :func:`straddles`).
    Only probing clients (near duplicates or a tight cluster) can be
    inversion; black-box evasion is also a client whose steps mostly change a
    few features, probing or not, and a concentrated one whose recent queries
    ``walking`` move away from where they began (:func:`walks`).
    """
    few = few_features.astype(bool)
    linked = near_duplicate.astype(bool) | few
    small = few if near_previous is None else few | near_previous.astype(bool)
    if probs is not None:
        have = np.isfinite(probs).all(1)  # the trends read only the queries whose answers are known
        probs, linked, small = probs[have], linked[have], small[have]
        if straddles(probs, small):
            return BLACK_BOX
    if probing:
        if probs is not None:
            climbing, falling = chain_trends(probs, linked)
            if concentrated and climbing and climbing >= falling:
                return INVERSION
            if falling > climbing:
                return BLACK_BOX
        if low_margin.mean() > 0.5:
            return BLACK_BOX
    if len(few) and few.mean() > 0.5:  # coordinate search, near duplicates or not
        return BLACK_BOX
    if concentrated:
        return BLACK_BOX if walking else MEMBERSHIP
    return EXTRACTION
