"""The per-client query-rate detector: floods flagged once per episode, in event time, bounded memory."""

from __future__ import annotations

import numpy as np
import torch

from agent.records import InferenceBatch
from detectors.base import DetectorContext
from detectors.query_rate import QueryRate, QueryRateOptions


def batch(clients: list[str], ts: np.ndarray, start: int = 0) -> InferenceBatch:
    n = len(clients)
    return InferenceBatch(ids=tuple(f"q{start + i}" for i in range(n)), ts=ts, models=("m",) * n,
                          model_versions=(None,) * n, clients=tuple(clients), X=np.zeros((n, 2), np.float32),
                          probs=None, labels=np.full(n, -1))


def det(**kw) -> QueryRate:
    return QueryRate(QueryRateOptions(**kw), DetectorContext(device=torch.device("cpu")))


def test_flood_flagged_once_benign_not() -> None:
    d = det(window_s=60, max_queries=100)
    # benign: 50 clients, 1 query/s each for 10 minutes; attacker: 5 queries/s
    found = []
    for minute in range(10):
        ts = minute * 60 + np.linspace(0, 59.9, 60)
        clients, times = [], []
        for c in range(50):
            clients += [f"b{c}"] * 60
            times += list(ts)
        clients += ["attacker"] * 300
        times += list(minute * 60 + np.linspace(0, 59.9, 300))
        order = np.argsort(times, kind="stable")
        found += d.update(batch([clients[i] for i in order], np.asarray(times)[order], minute * 10_000), {})
    assert [f.actor for f in found] == ["attacker"]
    f = found[0]
    assert f.attacks == ("AML.T0043.001",) and f.evidence["queries_in_window"] > 100
    assert len(f.related_ids) == 200


def test_episode_rearms_after_quiet_period() -> None:
    d = det(window_s=10, max_queries=20)
    assert len(d.update(batch(["x"] * 30, np.linspace(0, 5, 30)), {})) == 1
    assert d.update(batch(["x"] * 30, np.linspace(5, 9, 30), 100), {}) == []  # same episode
    first_uid = d.state_dict()["episode_start"][0]
    assert d.update(batch(["x"] * 2, np.array([100.0, 101.0]), 200), {}) == []  # quiet: re-armed
    again = d.update(batch(["x"] * 30, np.linspace(200, 205, 30), 300), {})
    assert len(again) == 1
    assert again[0].window == "200" and first_uid == 0.0  # a new episode has a new window, hence a new uid


def test_memory_bound_evicts_least_recent() -> None:
    d = det(max_clients=1000)
    for i in range(10):
        d.update(batch([f"c{i}-{j}" for j in range(500)], np.full(500, float(i))), {})
    assert len(d.state_dict()["slots"]["clients"]) == 1000
    assert d.evictions == 4000
