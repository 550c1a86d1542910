"""Per-client query rate: the cheapest signal of a query flood.

Black-box attacks (extraction, score-based evasion, membership probing) need
thousands of queries; a client far above its peers' rate is worth a look even
before the content of its queries says anything. Sliding window in event time
(``BUCKETS`` buckets per window), per client, vectorised over the batch, in
bounded memory: client state lives in arrays indexed by a slot of a bounded LRU
table (least recently seen clients are evicted and counted). One finding per
episode: raised when a client crosses ``max_queries`` within ``window_s``,
re-armed once it falls below half of it. An episode is named (its finding's
``uid``) by the bucket where the client's run of activity began, or where the
detector re-armed, never by where a poll happened to split the stream, so a
replay after a crash raises the same uid. Record ids are kept only for clients
on the watch list (above a quarter of the threshold), so memory stays small.
"""

from __future__ import annotations

from collections import deque
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from agent.findings import Finding, Severity
from agent.records import InferenceBatch
from detectors._client_slots import ClientSlots, EvictionAlarm
from detectors.base import Detector, DetectorOptions

BUCKETS = 12


class QueryRateOptions(DetectorOptions):
    window_s: float = Field(60.0, gt=0, description="sliding window length, event time")
    max_queries: int = Field(1200, ge=1, description="queries per window above which a client is flagged")
    max_clients: int = Field(100_000, ge=1, description="per-client state bound; LRU eviction beyond it")
    max_related: int = Field(200, ge=1, description="record ids named in a finding")


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
        self._slots = ClientSlots(options.max_clients)
        self._eviction_alarm = EvictionAlarm(self.name, self.family)
        self._counts = np.zeros((0, BUCKETS), np.int64)
        self._epoch = np.zeros(0, np.int64)  # newest bucket index per slot
        self._alerted = np.zeros(0, bool)
        self._episode_start = np.zeros(0, np.float64)
        self._run_start = np.zeros(0, np.int64)  # bucket where the client's current run of activity began
        self._watch: dict[int, deque[str]] = {}  # slot -> recent ids, for clients near the threshold

    @property
    def evictions(self) -> int:
        return self._slots.evictions

    def _grow(self) -> None:
        need = self._slots.high_water
        if len(self._epoch) >= need:
            return
        size = max(need, 2 * len(self._epoch), 64)
        self._counts = np.vstack([self._counts, np.zeros((size - len(self._counts), BUCKETS), np.int64)])
        for name, fill in (("_epoch", -(1 << 40)), ("_alerted", False), ("_episode_start", 0.0),
                           ("_run_start", -1)):
            arr = getattr(self, name)
            setattr(self, name, np.concatenate([arr, np.full(size - len(arr), fill, arr.dtype)]))

    def update(self, batch: InferenceBatch, notes: dict[str, Any]) -> list[Finding]:
        if len(batch) == 0:
            return []
        slots, fresh = self._slots.assign(batch.clients)
        self._grow()
        if fresh:
            self._counts[fresh] = 0
            self._epoch[fresh] = -(1 << 40)
            self._alerted[fresh] = False
            for s in fresh:
                self._watch.pop(s, None)
        epochs = np.floor(batch.ts / self._bucket_s).astype(np.int64)
        uniq, inv = np.unique(slots, return_inverse=True)
        newest = np.maximum(self._epoch[uniq], np.maximum.reduceat(
            epochs[np.argsort(inv, kind="stable")], np.r_[0, np.cumsum(np.bincount(inv))[:-1]]))
        # zero the buckets that slid out of each client's window
        age = (np.arange(BUCKETS)[None, :] - self._epoch[uniq, None]) % BUCKETS  # steps after the old newest
        stale = (age >= 1) & (age <= (newest - self._epoch[uniq])[:, None])
        stale |= ((newest - self._epoch[uniq]) >= BUCKETS)[:, None]
        block = self._counts[uniq]
        block[stale] = 0
        self._counts[uniq] = block
        oldest = np.minimum.reduceat(epochs[np.argsort(inv, kind="stable")],
                                     np.r_[0, np.cumsum(np.bincount(inv))[:-1]])
        idle = block.sum(axis=1) == 0  # nothing in the window: this batch starts a new run of activity
        self._run_start[uniq[idle]] = np.maximum(oldest[idle], newest[idle] - BUCKETS + 1)
        self._epoch[uniq] = newest
        live = epochs > newest[inv] - BUCKETS  # late rows older than the window are ignored
        np.add.at(self._counts, (slots[live], epochs[live] % BUCKETS), 1)
        totals = self._counts[uniq].sum(axis=1)
        rearm = uniq[self._alerted[uniq] & (totals < self.options.max_queries // 2)]
        self._alerted[rearm] = False
        self._run_start[rearm] = self._epoch[rearm]  # the next episode is named from here
        self._remember(batch, slots, uniq, totals)
        findings = []
        for j in np.flatnonzero(~self._alerted[uniq] & (totals > self.options.max_queries)).tolist():
            s = int(uniq[j])
            self._alerted[s] = True
            rows = np.flatnonzero(inv == j)
            self._episode_start[s] = float(self._run_start[s] * self._bucket_s)
            findings.append(self._finding(batch.clients[rows[0]], s, int(totals[j]), batch.models[rows[0]]))
        return findings + self._eviction_alarm.check(self._slots, float(batch.ts.max()))

    def _remember(self, batch: InferenceBatch, slots: np.ndarray, uniq: np.ndarray, totals: np.ndarray) -> None:
        """Keep recent record ids only for clients above a quarter of the threshold (the watch list)."""
        watched = uniq[totals > self.options.max_queries // 4]
        for s in watched.tolist():
            if s not in self._watch:
                self._watch[s] = deque(maxlen=self.options.max_related)
        for s in (set(self._watch) - set(watched.tolist())) & set(uniq.tolist()):
            del self._watch[s]
        if not self._watch:
            return
        for i in np.flatnonzero(np.isin(slots, watched)).tolist():
            self._watch[int(slots[i])].append(batch.ids[i])

    def _finding(self, cid: str, slot: int, total: int, model: str) -> Finding:
        rate = total / self.options.window_s
        return Finding(
            family=self.family, detector=self.name, severity=Severity.LOW,
            title=f"Query flood from client {cid}: {total} queries in {self.options.window_s:g} s",
            message=(f"Client {cid} sent {total} queries within {self.options.window_s:g} s "
                     f"({rate:.1f}/s, threshold {self.options.max_queries}); black-box attacks "
                     "(extraction, score-based evasion, membership probing) need floods like this."),
            actor=cid, model=model, related_ids=tuple(self._watch.get(slot, ())),
            window=f"{self._episode_start[slot]:.0f}",
            evidence={"queries_in_window": total, "window_s": self.options.window_s,
                      "threshold": self.options.max_queries, "rate_per_s": round(rate, 3)},
            attacks=("AML.T0043.001",), confidence=min(1.0, total / (2 * self.options.max_queries)),
        )

    def state_dict(self) -> dict[str, Any]:
        n = self._slots.high_water
        return {
            "slots": self._slots.state_dict(),
            "counts": self._counts[:n].copy(), "epochs": self._epoch[:n].copy(),
            "alerted": self._alerted[:n].copy(), "episode_start": self._episode_start[:n].copy(),
            "run_start": self._run_start[:n].copy(),
            "watch_slots": np.asarray(list(self._watch), np.int64),
            "watch_ids": [list(d) for d in self._watch.values()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._slots.load_state_dict(state["slots"])
        self._counts = np.asarray(state["counts"], np.int64).reshape(-1, BUCKETS).copy()
        self._epoch = np.asarray(state["epochs"], np.int64).copy()
        self._alerted = np.asarray(state["alerted"], bool).copy()
        self._episode_start = np.asarray(state["episode_start"], np.float64).copy()
        self._run_start = np.asarray(state["run_start"], np.int64).copy()
        self._watch = {int(s): deque(ids, maxlen=self.options.max_related)
                       for s, ids in zip(state["watch_slots"].tolist(), state["watch_ids"])}
