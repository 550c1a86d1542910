"""The data path: source -> decode -> detect -> alert -> sink -> commit.

One batch at a time, at least once: a batch's offsets become committable only
after every sink accepted (delivered or durably spooled) its findings and the
dead letters are flushed. If delivery fails, the same findings are offered
again after a back-off and the source is not polled meanwhile (back-pressure),
so a dead SIEM can never make us skip records. Committable offsets are
committed together with a checkpoint of the detectors' state that reflects
exactly them (every ``checkpoint_interval_s``, when partitions are revoked, and
on exit), so a restart neither skips nor double-counts a record in a window.

Decoding may run one full poll ahead in a worker process (agent/decode_ahead.py):
batches are still processed here in poll order, and a revocation or an exit first
processes what is still being decoded, so the checkpoint covers every record read.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.decode_ahead import Decoded
from agent.findings import Finding
from agent.records import DecodedBatch, RawRecord, merge_decoded
from connectors.deadletter import reason_kind
from detectors.base import Detector

log = logging.getLogger(__name__)
TP = tuple[str, int]


class Source(Protocol):
    def poll(self) -> list[RawRecord]: ...
    def commit(self, next_offsets: dict[TP, int]) -> None: ...
    def resume(self, checkpointed: dict[TP, int]) -> None: ...
    def on_revoke(self, callback: Callable[[set[TP]], dict[TP, int]]) -> None: ...
    def lag(self) -> dict[TP, int]: ...
    def assignment(self) -> set[TP]: ...
    def close(self) -> None: ...


class Decoder(Protocol):
    def decode(self, records: Sequence[RawRecord]) -> DecodedBatch: ...


class Decoding(Protocol):
    """Runs a decoder inline or in a worker (agent/decode_ahead.py); batches come back in poll order."""

    decoder: Decoder
    ahead: int
    def exchange(self, records: list[RawRecord], flush: bool = False) -> Decoded | None: ...
    def drain(self) -> list[Decoded]: ...
    def close(self) -> None: ...


@dataclass
class Counters:
    records: int = 0
    inference: int = 0
    feedback: int = 0
    dead_lettered: int = 0
    findings: int = 0
    batches: int = 0
    by_family: dict[str, int] = field(default_factory=dict)


class Pipeline:
    def __init__(self, source: Source, decoding: Decoding, detectors: list[Detector], delivery: Any,
                 deadletters: Any, telemetry: Any, checkpoint: Any):
        self.source, self.decoding, self.detectors = source, decoding, detectors
        self.delivery, self.deadletters, self.telemetry, self.checkpoint = delivery, deadletters, telemetry, checkpoint
        self.counters = Counters()
        self.stopping = False
        self.last_lag: dict[TP, int] = {}
        self._lag_at = 0.0
        self._expired_at = time.monotonic()
        self._read_up_to: dict[TP, int] = {}
        self._accepted: dict[TP, int] = {}    # next offsets whose findings every sink accepted
        self._committed: dict[TP, int] = {}
        self._in_flight = False               # detectors saw a batch whose findings are not yet accepted
        source.resume(checkpoint.offsets)     # skip what the restored state has already seen
        source.on_revoke(self.partitions_revoked)

    @property
    def decoder(self) -> Decoder:
        return self.decoding.decoder

    def step(self, final: bool = False) -> int:
        """Poll one batch and process the oldest decoded one end to end; returns the records processed.

        ``final``: poll nothing, process what is still being decoded and release every KServe half
        still waiting for its partner (end of a batch run).
        """
        records = [] if final else self.source.poll()                            # source
        ready = self.decoding.exchange(records, flush=final or not records)      # decode (maybe a batch ahead)
        expired = self.expire_joins(math.inf if final else None)
        if ready is None and expired is None:
            return 0
        ready = ready or Decoded([], DecodedBatch())
        self.process(ready.records, merge_decoded(ready.batch, expired) if expired else ready.batch)
        self.commit()                                                            # checkpoint + commit
        return len(ready.records)

    def process(self, records: list[RawRecord], decoded: DecodedBatch) -> None:
        """Detect, deliver and mark the batch's offsets accepted (committed later, with a checkpoint)."""
        self._in_flight = True
        with self.telemetry.batch(records) as scope:
            self.deadletters.send(decoded.dead)                                  # dead letters, own path
            self.observe(decoded, scope)
            findings = self.detect(decoded, scope)                               # detect
            self.deliver(findings)                                               # alert -> sinks
            self.deadletters.flush()
            self._accepted, self._in_flight = self.next_offsets(records), False
        self.count(records, decoded, findings)

    def process_ahead(self) -> None:
        """Process the batches polled but still being decoded (before a checkpoint must reflect them).
        No commit here: inside a revocation only the source may commit (kafka-python's event loop)."""
        for ready in self.decoding.drain():
            self.process(ready.records, ready.batch)

    def detect(self, decoded: DecodedBatch, scope: Any) -> list[Finding]:
        findings: list[Finding] = []
        notes: dict[str, Any] = {"findings": findings}  # later detectors may read earlier ones' findings
        for det in self.detectors:
            batch = decoded.inference if det.stream == "inference" else decoded.feedback
            if batch is None or len(batch) == 0:
                continue
            t0 = time.perf_counter()
            findings += det.update(batch, notes)
            scope.detector_latency(det.name, time.perf_counter() - t0)
        for f in findings:
            scope.finding(f)
        return findings

    def expire_joins(self, now: float | None = None) -> DecodedBatch | None:
        """KServe halves that waited past the join timeout (a request alone is still monitored)."""
        expire = getattr(self.decoder, "expire", None)
        if expire is None or (now is None and time.monotonic() - self._expired_at < 1.0):
            return None
        self._expired_at = time.monotonic()
        out = expire(now)
        return out if (out.n_events or out.dead) else None

    def observe(self, decoded: DecodedBatch, scope: Any) -> None:
        scope.events(len(decoded.inference or ()), len(decoded.feedback or ()))
        kinds: dict[str, int] = {}
        for d in decoded.dead:
            kinds[reason_kind(d.reason)] = kinds.get(reason_kind(d.reason), 0) + 1
        for kind, n in kinds.items():
            scope.dead_lettered(n, kind)

    def deliver(self, findings: list[Finding]) -> None:
        """Block until every sink accepted ``findings`` (or we are told to stop)."""
        delay = 0.2
        while not self.delivery.deliver(findings):
            if self.stopping:
                raise InterruptedError("stopping with undelivered findings; their offsets stay uncommitted")
            log.warning("sinks did not accept %d findings; retrying in %.1f s (not consuming meanwhile)",
                        len(findings), delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)

    def next_offsets(self, records: list[RawRecord]) -> dict[TP, int]:
        """Per partition, the offset after the last record read, held back by records still waiting to be joined."""
        for r in records:
            tp = (r.topic, r.partition)
            self._read_up_to[tp] = max(self._read_up_to.get(tp, 0), r.offset + 1)
        pending = getattr(self.decoder, "pending_offsets", None)
        waiting = pending() if pending else {}
        return {tp: min(end, waiting.get(tp, end)) for tp, end in self._read_up_to.items()}

    def commit(self, force: bool = False) -> None:
        """Checkpoint detector state with the accepted offsets, then commit them: when due (the checkpoint is
        written in the background and its offsets committed once on disk), or now with ``force``."""
        written = self.checkpoint.written()
        if written is not None:
            self.source.commit(written)
            self._committed = written
        if self._accepted == self._committed:
            return
        if force:
            self.source.commit(self.checkpoint_now())
        elif self.checkpoint.due() and not self.checkpoint.writing:
            self.checkpoint.save_in_background(self.detectors, dict(self._accepted))

    def checkpoint_now(self) -> dict[TP, int]:
        """Write the checkpoint of the accepted offsets (unless they are committed already) and return them,
        for the caller to commit."""
        offsets = dict(self._accepted)
        if offsets != self._committed:
            self.checkpoint.save(self.detectors, offsets)
            self._committed = offsets
        return offsets

    def partitions_revoked(self, revoked: set[TP]) -> dict[TP, int]:
        """Called inside ``poll()`` before a rebalance (the source stops calling it once closed): process
        what is still being decoded, checkpoint, and return the offsets the source must commit
        now (else the next owners would replay them)."""
        self.process_ahead()
        offsets = self.checkpoint_now()
        for tp in revoked:
            for held in (self._read_up_to, self._accepted, self._committed):
                held.pop(tp, None)
        return offsets

    def count(self, records: list[RawRecord], decoded: DecodedBatch, findings: list[Finding]) -> None:
        c = self.counters
        c.batches += 1
        c.records += len(records)
        c.inference += len(decoded.inference) if decoded.inference else 0
        c.feedback += len(decoded.feedback) if decoded.feedback else 0
        c.dead_lettered += len(decoded.dead)
        self.tally(findings)

    def tally(self, findings: list[Finding]) -> None:
        self.counters.findings += len(findings)
        for f in findings:
            self.counters.by_family[f.family] = self.counters.by_family.get(f.family, 0) + 1

    def run(self, until_idle_s: float | None = None) -> Counters:
        """Loop until ``stop()`` (SIGTERM/SIGINT), or until caught up and idle for ``until_idle_s``."""
        idle_since = started = time.monotonic()
        try:
            while not self.stopping:
                if time.monotonic() - self._lag_at > 5.0:
                    self.last_lag, self._lag_at = self.source.lag(), time.monotonic()
                if self.step() or self.decoding.ahead or self.awaiting_partitions(started):
                    idle_since = time.monotonic()
                elif until_idle_s is not None and time.monotonic() - idle_since >= until_idle_s:
                    self.step(final=True)
                    break
                else:
                    self.commit()  # an idle stream still gets its last batches committed within the interval
        finally:
            self.close()
        return self.counters

    def awaiting_partitions(self, started: float, patience_s: float = 120.0) -> bool:
        """Waiting for the group to hand us partitions is not idleness (after a crash the dead member
        holds them until its session times out), but we do not wait for ever."""
        return not self.source.assignment() and time.monotonic() - started < patience_s

    def flush_detectors(self) -> None:
        """Findings detectors hold in open windows (poisoning) are raised and delivered before we exit."""
        findings = [f for det in self.detectors if hasattr(det, "flush") for f in det.flush()]
        if findings:
            if not self.delivery.deliver(findings):
                self._in_flight = True  # not accepted: restart from the checkpoint that still holds the windows
            self.tally(findings)

    def stop(self) -> None:
        self.stopping = True

    def close(self) -> None:
        """Flush sinks, checkpoint detector state and commit what was accepted, close clients (every exit path)."""
        try:
            if not self._in_flight:
                self.process_ahead()  # polled and decoded, not yet detected: finish them so they are committed
            self.flush_detectors()
            self.delivery.flush(10.0)
            if self._in_flight:  # state has seen records whose findings no sink took: keep the last checkpoint
                log.warning("exiting with a batch in flight: its records are replayed from the last checkpoint")
            else:
                self.commit(force=True)
        finally:
            for closer in (self.delivery.shutdown, self.deadletters.close, self.source.close,
                           self.decoding.close, self.telemetry.shutdown):
                try:
                    closer()
                except Exception:
                    log.exception("error while closing")
