"""Query-based black-box attacks we did not write, seen query by query by the ``extraction`` detector.

``art_attacks`` measures the ``adversarial`` detector on the *final*
adversarials of IBM's Adversarial Robustness Toolbox (ART). A query-based
attack also shows itself on the way there: it sends the model hundreds to
thousands of queries around each seed, and the per-client state of
``extraction`` is meant to name that pattern (black-box probing, ATLAS
AML.T0043.001) within ``GOAL_QUERIES`` of them. The eval's own SimBA is ours;
this runs ART's decision-based (HopSkipJump, Boundary, Sign-OPT) and
score-based (ZOO, SimBA, Square) attacks against the model as a black box (an
ART ``BlackBoxClassifier`` whose predict function records every query in the
order it was asked), one attacker client per attack, attacking one correctly
classified test row after another until it has sent ``budget`` queries. The
query streams go through :func:`extraction.run_dataset` with its benign
traffic (hundreds of clients), the detector fitted as in the eval. (ART's
GeoDA is left out: 1.20.1 calls ``np.mat``, which NumPy 2 removed.)

Held out: no detector threshold or rule was set on these streams. Optional
dependency (``pip install '.[attacks]'``):
``python -m agent.scenarios.art_queries 0,1``; about five seconds per seed.
"""

from __future__ import annotations

import contextlib
import random
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from agent.scenarios.art_attacks import _art_input_shape
from agent.scenarios.data import Dataset
from agent.scenarios.extraction import GOAL_QUERIES, Attack, Oracle, run_dataset

EXPECTED = "black_box_probing"


def _attack_factories(ds: Dataset, clf: Any) -> dict[str, Callable[[], Any]]:
    """ART attacks by name, their iteration budgets cut so that one seed takes hundreds to a few thousand
    queries (strengths as in ``art_attacks``: shares of the digits' [0, 1] range)."""
    from art.attacks import evasion as ev

    out: dict[str, Callable[[], Any]] = {
        "HopSkipJump L2": lambda: ev.HopSkipJump(clf, norm=2, max_iter=10, max_eval=200, init_eval=20, verbose=False),
        "HopSkipJump Linf": lambda: ev.HopSkipJump(clf, norm=np.inf, max_iter=10, max_eval=200, init_eval=20,
                                                   verbose=False),
        "Boundary": lambda: ev.BoundaryAttack(clf, targeted=False, max_iter=200, num_trial=10, verbose=False),
        "ZOO": lambda: ev.ZooAttack(clf, max_iter=20, use_resize=False, use_importance=False, nb_parallel=8,
                                    verbose=False),
    }
    if ds.n_classes > 2:  # ART 1.20.1 refuses binary classifiers here
        out["Sign-OPT"] = lambda: ev.SignOPTAttack(clf, targeted=False, max_iter=50, query_limit=2000,
                                                   verbose=False)
    if len(_art_input_shape(ds)) == 3:  # ART runs these on image-shaped inputs only
        out["SimBA pixels"] = lambda: ev.SimBA(clf, attack="px", max_iter=1000, epsilon=0.2, verbose=False)
        out["SimBA DCT"] = lambda: ev.SimBA(clf, attack="dct", max_iter=1000, epsilon=0.2, verbose=False)
        out["Square Linf"] = lambda: ev.SquareAttack(clf, norm=np.inf, eps=0.15, max_iter=300, nb_restarts=1,
                                                     verbose=False)
    return out


class _Recorder(torch.nn.Module):
    """The model as ART sees it: probabilities from the oracle, every query kept in the order it came.

    A ``PyTorchClassifier`` around it rather than ART's ``BlackBoxClassifier``:
    SimBA and Square insist on a neural-network estimator although they never
    ask it for a gradient; nothing here could give one (the oracle is numpy).
    """

    def __init__(self, oracle: Oracle) -> None:
        super().__init__()
        self.oracle = oracle
        self.sent: list[np.ndarray] = []
        self.n_sent = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().reshape(len(x), -1).float().cpu().numpy()
        self.sent.append(flat)
        self.n_sent += len(flat)
        return torch.as_tensor(self.oracle(flat))


@contextlib.contextmanager
def _seeded_fresh_generators(seed: int) -> Iterator[None]:
    """ART 1.20.1's HopSkipJump and Boundary draw their starting points from ``np.random.RandomState()``
    with no seed (operating-system entropy), so their query streams differ from run to run; while this is
    open, such a generator is seeded."""
    unseeded = np.random.RandomState

    def seeded(seed_arg: Any = None) -> np.random.RandomState:
        return unseeded(seed if seed_arg is None else seed_arg)

    np.random.RandomState = seeded  # type: ignore[misc,assignment]
    try:
        yield
    finally:
        np.random.RandomState = unseeded  # type: ignore[misc]


def record_queries(ds: Dataset, oracle: Oracle, budget: int, seed: int, name: str, max_seeds: int = 50
                   ) -> np.ndarray:
    """The first ``budget`` queries one ART attack sends while attacking test rows one after another."""
    from art.estimators.classification import PyTorchClassifier

    recorder = _Recorder(oracle)
    shape = _art_input_shape(ds)
    clf = PyTorchClassifier(recorder, loss=torch.nn.NLLLoss(), input_shape=shape, nb_classes=ds.n_classes,
                            clip_values=(ds.lo, ds.hi), device_type="cpu")
    rows = np.random.default_rng(seed).permutation(len(ds.X_test))
    right = oracle(ds.X_test[rows]).argmax(1) == ds.y_test[rows]
    recorder.sent.clear()
    recorder.n_sent = 0
    for row in rows[right][:max_seeds]:
        if recorder.n_sent >= budget:
            break
        random.seed(seed + int(row))  # ART draws from the global generators
        np.random.seed((zlib.crc32(name.encode()) + seed + int(row)) % 2**32)
        torch.manual_seed(seed + int(row))
        x = ds.X_test[row : row + 1].reshape(1, *shape).astype(np.float32)
        with _seeded_fresh_generators(seed + int(row)):
            _attack_factories(ds, clf)[name]().generate(x, y=np.eye(ds.n_classes, dtype=np.float32)[ds.y_test[[row]]])
    return np.concatenate(recorder.sent)[:budget] if recorder.sent else np.zeros((0, ds.dim), np.float32)


def art_query_attacks(ds: Dataset, oracle: Oracle, budget: int, seed: int) -> list[Attack]:
    """One attacker per ART query-based attack (``extraction.run_dataset``'s ``make_attacks``)."""
    names = list(_attack_factories(ds, None))
    return [Attack(f"ART {name}", record_queries(ds, oracle, budget, seed, name), 300, EXPECTED) for name in names]


def evaluate(name: str, seed: int, quick: bool = False) -> dict[str, Any]:
    """The extraction detector's figures on ART's query streams among the eval's benign traffic."""
    return run_dataset(name, torch.device("cpu"), quick, seed=seed, make_attacks=art_query_attacks)


if __name__ == "__main__":  # python -m agent.scenarios.art_queries 0,1
    import sys

    for s in [int(x) for x in sys.argv[1].split(",")]:
        for name in ("digits", "tabular"):
            r = evaluate(name, s)
            print(f"{name} seed {s}: benign flagged {len(r['flagged_benign'])}", flush=True)
            for v in r["variants"]:
                q = v["queries_to_detect"]
                verdict = "within goal" if q is not None and q <= GOAL_QUERIES else "MISSED or late"
                print(f"  {v['variant']:22s} queries {v['queries']:4d} (distinct {v['distinct_queries']:4d}): "
                      f"flagged after {q} ({v['distinct_queries_to_detect']} distinct) {verdict}, "
                      f"named {v['pattern']}", flush=True)
