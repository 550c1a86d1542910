"""Per-client query rate: the cheapest signal of a query flood.

Black-box attacks (extraction, score-based evasion, membership probing) need
thousands of queries; a client far above its peers' rate is worth a look even
before the content of its queries says anything. Sliding window in event time,
bucketed, per client, in bounded memory (least recently seen clients are
evicted and counted). One finding per episode: raised when a client crosses
``max_queries`` within ``window_s``, re-armed once it falls below half of it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from agent.findings import Finding, Severity
from agent.records import InferenceBatch
from detectors.base import Detector, DetectorOptions

BUCKETS = 12


class QueryRateOptions(DetectorOptions):
    window_s: float = Field(60.0, gt=0, description="sliding window length, event time")
    max_queries: int = Field(1200, ge=1, description="queries per window above which a client is flagged")
    max_clients: int = Field(100_000, ge=1, description="per-client state bound; LRU eviction beyond it")
    max_related: int = Field(200, ge=1, description="record ids named in a finding")


class _Client:
    __slots__ = ("alerted", "counts", "episode_start", "epoch", "recent")

    def __init__(self) -> None:
        self.counts = np.zeros(BUCKETS, np.int64)
        self.epoch = -1  # index of the newest bucket
        self.alerted = False
        self.episode_start = 0.0
        self.recent: list[str] = []


class QueryRate(Detector):
    name = "query_rate"
    family = "extraction"
    stream = "inference"
    priority = 40
    Options: ClassVar = QueryRateOptions

    def __init__(self, options: QueryRateOptions, context: Any):
        super().__init__(options, context)
        self.options: QueryRateOptions = options
        self._bucket_s = options.window_s / BUCKETS
        self._clients: OrderedDict[str, _Client] = OrderedDict()
        self.evictions = 0

    def _client(self, cid: str) -> _Client:
        c = self._clients.get(cid)
        if c is None:
            c = self._clients[cid] = _Client()
            if len(self._clients) > self.options.max_clients:
                self._clients.popitem(last=False)
                self.evictions += 1
        else:
            self._clients.move_to_end(cid)
        return c

    def _advance(self, c: _Client, epoch: int) -> None:
        if c.epoch < 0 or epoch - c.epoch >= BUCKETS:
            c.counts[:] = 0
        elif epoch > c.epoch:
            for e in range(c.epoch + 1, epoch + 1):
                c.counts[e % BUCKETS] = 0
        c.epoch = max(c.epoch, epoch)

    def update(self, batch: InferenceBatch, notes: dict[str, Any]) -> list[Finding]:
        if len(batch) == 0:
            return []
        findings = []
        clients = np.asarray(batch.clients, dtype=object)
        order = np.argsort(clients, kind="stable")
        uniq, starts = np.unique(clients[order], return_index=True)
        bounds = [*starts.tolist(), len(order)]
        epochs = np.floor(batch.ts / self._bucket_s).astype(np.int64)
        for j, cid in enumerate(uniq.tolist()):
            rows = order[bounds[j] : bounds[j + 1]]
            c = self._client(cid)
            for e, n in zip(*np.unique(epochs[rows], return_counts=True)):
                if e <= c.epoch - BUCKETS:
                    continue  # older than the window: late data, ignore
                self._advance(c, int(e))
                c.counts[e % BUCKETS] += n
            c.recent = (c.recent + [batch.ids[i] for i in rows.tolist()])[-self.options.max_related :]
            total = int(c.counts.sum())
            if not c.alerted and total > self.options.max_queries:
                c.alerted = True
                c.episode_start = float(batch.ts[rows[0]])
                findings.append(self._finding(cid, c, total, batch.models[rows[0]]))
            elif c.alerted and total < self.options.max_queries // 2:
                c.alerted = False
        return findings

    def _finding(self, cid: str, c: _Client, total: int, model: str) -> Finding:
        rate = total / self.options.window_s
        return Finding(
            family=self.family, detector=self.name, severity=Severity.LOW,
            title=f"Query flood from client {cid}: {total} queries in {self.options.window_s:g} s",
            message=(f"Client {cid} sent {total} queries within {self.options.window_s:g} s "
                     f"({rate:.1f}/s, threshold {self.options.max_queries}); black-box attacks "
                     "(extraction, score-based evasion, membership probing) need floods like this."),
            actor=cid, model=model, related_ids=tuple(c.recent), window=f"{int(c.episode_start)}",
            evidence={"queries_in_window": total, "window_s": self.options.window_s,
                      "threshold": self.options.max_queries, "rate_per_s": round(rate, 3)},
            attacks=("AML.T0043.001",), confidence=min(1.0, total / (2 * self.options.max_queries)),
        )

    def state_dict(self) -> dict[str, Any]:
        ids = list(self._clients)
        cs = [self._clients[i] for i in ids]
        return {
            "clients": ids,
            "counts": np.stack([c.counts for c in cs]) if cs else np.zeros((0, BUCKETS), np.int64),
            "epochs": np.asarray([c.epoch for c in cs], np.int64),
            "alerted": np.asarray([c.alerted for c in cs], bool),
            "episode_start": np.asarray([c.episode_start for c in cs], np.float64),
            "recent": [c.recent for c in cs],
            "evictions": self.evictions,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._clients.clear()
        for i, cid in enumerate(state["clients"]):
            c = _Client()
            c.counts = np.asarray(state["counts"][i], np.int64).copy()
            c.epoch = int(state["epochs"][i])
            c.alerted = bool(state["alerted"][i])
            c.episode_start = float(state["episode_start"][i])
            c.recent = list(state["recent"][i])
            self._clients[cid] = c
        self.evictions = int(state["evictions"])
