"""Mix benign and attack records into one time-ordered stream and feed it to a detector in batches.

Shared by the drift and evasion scenarios so both replay traffic the way the
agent does: columnar :class:`InferenceBatch` values of ``batch_size`` records,
in event-time order, one ``update`` per batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.findings import Finding
from agent.records import InferenceBatch


@dataclass
class Stream:
    """A growing set of records; ``kind`` says what each row is (``benign`` or a variant name)."""

    model: str
    ids: list[str] = field(default_factory=list)
    ts: list[np.ndarray] = field(default_factory=list)
    clients: list[str] = field(default_factory=list)
    X: list[np.ndarray] = field(default_factory=list)
    probs: list[np.ndarray] = field(default_factory=list)
    kind: list[str] = field(default_factory=list)

    def add(self, kind: str, X: np.ndarray, ts: np.ndarray, clients: list[str], probs: np.ndarray) -> None:
        start = len(self.ids)
        self.ids += [f"{self.model}-{kind}-{start + i}" for i in range(len(X))]
        self.ts.append(np.asarray(ts, np.float64))
        self.clients += clients
        self.X.append(np.asarray(X, np.float32))
        self.probs.append(np.asarray(probs, np.float32))
        self.kind += [kind] * len(X)

    def replay(self, detector, batch_size: int = 512, key: str | None = None
               ) -> tuple[list[Finding], np.ndarray, dict[str, int]]:
        """Run the detector over the stream in time order.

        Returns (findings, the per-record note ``key`` in the stream's original
        row order or an empty array, row index by id).
        """
        ts = np.concatenate(self.ts)
        X = np.concatenate(self.X)
        probs = np.concatenate(self.probs)
        order = np.argsort(ts, kind="stable")
        note = np.full(len(ts), np.nan)
        findings: list[Finding] = []
        for i in range(0, len(order), batch_size):
            rows = order[i : i + batch_size]
            pick = rows.tolist()
            batch = InferenceBatch(
                ids=tuple(self.ids[j] for j in pick), ts=ts[rows], models=(self.model,) * len(rows),
                model_versions=(None,) * len(rows), clients=tuple(self.clients[j] for j in pick),
                X=X[rows], probs=probs[rows], labels=probs[rows].argmax(1).astype(np.int64),
            )
            notes: dict[str, Any] = {}
            findings += detector.update(batch, notes)
            if key is not None and key in notes:
                note[rows] = notes[key]
        return findings, note, {rid: i for i, rid in enumerate(self.ids)}

    @property
    def kinds(self) -> np.ndarray:
        return np.asarray(self.kind)
