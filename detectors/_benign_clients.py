"""Benign clients simulated from the reference data: what ``extraction``'s per-client tests see from natural traffic.

Why simulate: PRADA's threshold on Shapiro-Wilk's W, the floor under a
client's query spread and the benign near-duplicate rate depend on the data
set (on breast-cancer rows W runs far lower than on digits), and no attack
data may set them. A benign client is simulated as a sequence of reference
rows drawn at random, passed through the same ring-buffer distances as at run
time (its last ``history`` queries, min distance of each new one to them,
exact repeats left out), so each statistic comes from what natural clients of
this data set actually produce.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from detectors._swilk import shapiro_w

CLASS_COUNTS_SIMULATED = (1, 2, 3, 5)  # besides every class: the few-class clients delta is calibrated on


def w_quantile(w: np.ndarray, q: float) -> float:
    """Lower ``q`` quantile of W, extrapolated past the simulated sample.

    Royston (1992): ln(1 - W) is close to normal for a fixed n, so fitting its
    mean and sd on the simulated benign W gives far-tail quantiles (1e-5)
    that 1,000 simulations could not estimate empirically.
    """
    from scipy.special import ndtri

    z = np.log(np.clip(1.0 - w, 1e-12, None))
    return float(1.0 - np.exp(z.mean() + ndtri(1.0 - q) * z.std(ddof=1)))


def spread(rows: torch.Tensor, min_rows: int) -> float | None:
    """RMS distance of distinct rows to their mean: how widely a client's recent queries range.

    Probing around one record (membership inference, black-box evasion,
    inversion) keeps it far below what natural traffic shows. The caller
    passes distinct rows (exact retries say nothing); None when fewer than
    ``min_rows``.
    """
    if len(rows) < min_rows:
        return None
    centred = rows - rows.mean(0)
    return float(torch.sqrt((centred * centred).sum(1).mean()))


@dataclass(frozen=True)
class SimulatedWindows:
    """What the simulated clients showed (see ``BenignClients.windows``)."""

    w_first: list[float]  # W at a client's first check
    w_full: list[float]  # W over a full window once the history ring is full
    spreads: list[float]  # spread of the full history ring
    dup_hits: int  # near duplicates in the full windows ...
    dup_total: int  # ... of this many queries

    @property
    def dup_rate(self) -> float:
        """The benign near-duplicate rate: the share of the full windows' queries that are near duplicates."""
        return self.dup_hits / max(self.dup_total, 1)


@dataclass(frozen=True)
class BenignClients:
    """Simulator of benign clients' windows, shaped as the detector's: ring, window, test size, repeat radius."""

    history: int
    window: int
    min_queries: int
    repeat_eps: float
    simulations: int
    fpr: float  # PRADA's per-check false-positive rate: delta is this quantile of benign W

    def windows(self, X: torch.Tensor, draw: Callable[[int], torch.Tensor], dup_radius: float) -> SimulatedWindows:
        """Benign clients as sequences of reference rows (``draw(s)`` gives [s, history + window] row indices).

        W at a client's first check is over its first ``min_queries`` queries
        that have an earlier one to be near: a fresh client's early queries
        have few, so their min distances run larger, as at run time.
        """
        length = self.history + self.window
        w_first, w_full, spreads, dup_hits, dup_total = [], [], [], 0, 0
        idx = torch.arange(length, device=X.device)
        lag = idx[:, None] - idx[None, :]
        valid = (lag > 0) & (lag <= self.history)
        for start in range(0, self.simulations, 200):
            seq = X[draw(min(200, self.simulations - start))]
            d = torch.cdist(seq, seq, compute_mode="donot_use_mm_for_euclid_dist")  # [s, L, L]
            d = d.masked_fill(~valid, float("inf"))
            d = d.masked_fill(d <= self.repeat_eps, float("inf"))
            mins = d.min(2).values.cpu().numpy()
            for sim in seq[:, -self.history :]:
                value = spread(torch.unique(sim, dim=0), self.min_queries)
                if value is not None:
                    spreads.append(value)
            for row in mins:
                first = row[np.isfinite(row)][: self.min_queries]
                if len(first) >= self.min_queries:
                    w_first.append(shapiro_w(first))
                full = row[self.history :]
                full = full[np.isfinite(full)]
                if len(full) >= self.min_queries:
                    w_full.append(shapiro_w(full))
                    dup_hits += int((full <= dup_radius).sum())
                    dup_total += len(full)
        return SimulatedWindows(w_first, w_full, spreads, dup_hits, dup_total)

    def deltas_by_class_count(self, X: torch.Tensor, y: np.ndarray | None, rng: np.random.Generator,
                              delta: float, dup_radius: float) -> list[tuple[int, float]]:
        """delta for benign clients whose queries span few classes: [(k, delta)], k ascending, the last entry
        (every class) ``delta``, the mixed clients'; a client is tested against the entry of the largest k not
        above the number of classes its window was answered as.

        Why: a client that only ever sees one or two kinds of input (a clinic's
        one condition, a form whose box takes one digit) sends natural rows
        whose min distances to each other are far from normal: on digits, such
        a client's W fell below the mixed clients' delta within 66 queries,
        with no attack at all. So delta is calibrated per class count, on
        clients simulated as random reference rows of k random classes; with
        one or two classes it falls so low that PRADA rarely fires (the other
        tests still run). A delta never exceeds that of a larger class count.
        Without reference labels every client is tested against the mixed
        delta.
        """
        if y is None:
            return [(1, delta)]
        y = np.asarray(y)
        classes = np.unique(y)
        members = [np.flatnonzero(y == c) for c in classes]
        length = self.history + self.window
        out = []
        for k in (k for k in CLASS_COUNTS_SIMULATED if k < len(classes)):
            def draw(s: int, k: int = k) -> torch.Tensor:
                rows = []
                for _ in range(s):
                    pool = np.concatenate([members[c] for c in rng.choice(len(classes), k, replace=False)])
                    rows.append(pool[rng.integers(0, len(pool), length)])
                return torch.as_tensor(np.stack(rows), device=X.device)

            sim = self.windows(X, draw, dup_radius)
            if len(sim.w_first) > 1 and len(sim.w_full) > 1:
                out.append((k, min(w_quantile(np.asarray(sim.w_first), self.fpr),
                                   w_quantile(np.asarray(sim.w_full), self.fpr))))
        out.append((len(classes), delta))
        deltas = np.minimum.accumulate([d for _, d in out][::-1])[::-1]
        return [(k, float(d)) for (k, _), d in zip(out, deltas, strict=True)]
