"""``QueryHistory`` (the extraction detector's hot path) against a plain one-query-at-a-time reference.

The batched code groups rows by client, pads groups, settles ring distances
with an embedding bag and rechecks close pairs in float64; the reference
below walks the queries one by one with Python lists. Streams mix new
queries, exact repeats of a client's earlier query and tiny steps from one
(finite differences, 1e-4 to 1e-2), over rings shorter than a batch.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detectors._benign_clients import spread as benign_spread
from detectors._query_history import QueryHistory

CPU = torch.device("cpu")
EPS = 1e-6


def _stream(seed: int, clients: int, dim: int, batches: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Batches of (slots, rows): each row new, an exact repeat, or a tiny step from the client's earlier rows."""
    rng = np.random.default_rng(seed)
    seen: list[list[np.ndarray]] = [[] for _ in range(clients)]
    out = []
    for _ in range(batches):
        n = int(rng.integers(1, 14))
        slots = rng.integers(0, clients, n)
        rows = np.empty((n, dim), np.float32)
        for i, s in enumerate(slots.tolist()):
            kind = rng.integers(0, 3) if seen[s] else 0
            if kind == 0:
                x = rng.normal(0, 1, dim).astype(np.float32)
            else:
                x = seen[s][int(rng.integers(0, len(seen[s])))].copy()
                if kind == 2:
                    x[int(rng.integers(0, dim))] += np.float32(rng.choice([1e-4, 1e-3, 1e-2]))
            rows[i] = x
            seen[s].append(x)
        out.append((slots, rows))
    return out


def _reference(stream: list[tuple[np.ndarray, np.ndarray]], clients: int, size: int):
    """Per batch: (squared distance to the nearest earlier query each row does not repeat, is_repeat); and per
    client at the end, its last ``size`` queries with their repeat marks."""
    past: list[list[tuple[np.ndarray, bool]]] = [[] for _ in range(clients)]
    results = []
    for slots, rows in stream:
        ring = [list(p[-size:]) for p in past]  # what the rings held before the batch
        earlier: list[list[np.ndarray]] = [[] for _ in range(clients)]
        dist, rep = np.full(len(rows), np.inf), np.zeros(len(rows), bool)
        for i, (s, x) in enumerate(zip(slots.tolist(), rows)):
            cand = [q for q, _ in ring[s]] + earlier[s]
            d2 = np.array([float(((x.astype(np.float64) - q) ** 2).sum()) for q in cand])
            rep[i] = bool(len(d2)) and d2.min() <= EPS**2
            far = d2[d2 > EPS**2]
            dist[i] = far.min() if len(far) else np.inf
            earlier[s].append(x)
        for i, (s, x) in enumerate(zip(slots.tolist(), rows)):
            past[s].append((x, bool(rep[i])))
        results.append((dist, rep))
    return results, [p[-size:] for p in past]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), clients=st.integers(1, 4), dim=st.integers(2, 6),
       size=st.integers(2, 6), batches=st.integers(1, 5))
def test_nearest_distances_repeats_and_rings_match_one_query_at_a_time(seed: int, clients: int, dim: int,
                                                                        size: int, batches: int) -> None:
    stream = _stream(seed, clients, dim, batches)
    want, rings = _reference(stream, clients, size)
    scale = max(float((rows.astype(np.float64) ** 2).sum(1).max()) for _, rows in stream)
    history = QueryHistory(size, EPS, CPU)
    history.set_dim(dim, 0)
    history.grow(clients)
    for (slots, rows), (dist, rep) in zip(stream, want):
        x = torch.as_tensor(rows)
        x_sq = (x * x).sum(1)
        got, is_repeat = history.nearest_sq(x, x_sq, slots)
        got, is_repeat = got.numpy(), is_repeat.numpy()
        np.testing.assert_array_equal(is_repeat, rep)
        np.testing.assert_array_equal(np.isinf(got), np.isinf(dist))
        finite = np.isfinite(dist)
        # steps the float32 norm expansion cannot resolve are measured again exactly, in float64; the others
        # carry its rounding, about 1e-7 of the norms involved
        close = finite & (dist <= 0.5e-6 * x_sq.numpy())
        np.testing.assert_allclose(got[close], dist[close], rtol=1e-5)
        np.testing.assert_allclose(got[finite & ~close], dist[finite & ~close], rtol=1e-5, atol=4e-6 * scale)
        history.push(x, x_sq, slots, is_repeat, rows)
    for s, ring in enumerate(rings):
        distinct = np.array([q for q, r in ring if not r]).reshape(-1, dim)
        np.testing.assert_array_equal(history.recent(s), distinct)
        if ring:
            np.testing.assert_array_equal(history.last[s], ring[-1][0])
        spread = history.spreads(np.array([s]), 2)[0]
        if len(distinct) >= 2:
            centred = distinct.astype(np.float64) - distinct.astype(np.float64).mean(0)
            np.testing.assert_allclose(spread, np.sqrt((centred**2).sum(1).mean()), rtol=1e-6)
            # the form the benign simulation calibrates `min_spread` with: the live test must measure the same
            np.testing.assert_allclose(spread, benign_spread(torch.as_tensor(distinct), 2), rtol=1e-5)
        else:
            assert np.isnan(spread)
    again = QueryHistory(size, EPS, CPU)
    again.load_state_dict(history.state_dict(), dim)
    np.testing.assert_array_equal(again.ring.numpy(), history.ring.numpy())
    np.testing.assert_array_equal(again.last, history.last)
    np.testing.assert_array_equal(again.repeat, history.repeat)
