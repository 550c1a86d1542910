"""Reliable delivery of findings to sinks: dedup, rate limit, retries, on-disk spool.

The pipeline commits Kafka offsets only after :meth:`Delivery.deliver` returned
True, i.e. after every finding was *delivered or durably spooled* for every sink
that accepts it. A sink that is down therefore never stalls detection (its
findings wait in an fsync'd spool and a background thread drains them, in order,
once it recovers) and never loses findings (the spool survives a restart).
Only a full spool is allowed to push back on the pipeline, and only when the
operator chose ``spool_full_policy: block``; ``drop_lowest_severity`` instead
drops the least severe findings first, counted and logged, never silently.

Each sink gets its own *lane* (falcosidekick/Vector style), so one slow or
broken SIEM never delays another::

    findings -> min_severity -> dedup/aggregate -> token bucket -> export (retries)
                                                         \\-> spool -> drain thread -> export

Ordering: once anything is spooled for a sink, later findings queue behind it
in the spool, so a sink sees its findings in the order they were raised, but
for those a sink hands back after taking them (``Sink.reclaim``: a syslog
receiver that rejected the session), which queue behind the rest again. A
drained batch is removed from the spool only after the sink said SUCCESS; a
crash between the two replays that batch (at-least-once; findings carry a
stable ``finding_info.uid`` so SIEMs can tell). Options: :class:`DeliveryOptions`,
the ``delivery:`` section of the YAML; any option can be overridden per sink
under ``delivery.sinks.<sink name>``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import re
import tempfile
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ByteSize, ConfigDict, Field, model_validator

from agent.findings import MAX_RELATED, Finding, Severity
from connectors.sink import ExportResult, Sink, SinkConfigurationError

log = logging.getLogger(__name__)

Clock = Callable[[], float]


# --------------------------------------------------------------------------- options


class LaneOptions(BaseModel):
    """Delivery settings of one sink; the top level sets defaults, ``sinks.<name>`` overrides them."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(500, ge=1, description="findings per export() call")
    retry_max_attempts: int = Field(3, ge=1, description="export attempts per batch before spooling it")
    retry_initial_backoff_s: float = Field(0.2, gt=0)
    retry_max_backoff_s: float = Field(5.0, gt=0, description="cap of one backoff sleep (full jitter)")
    drain_max_backoff_s: float = Field(30.0, gt=0, description="cap between probes of a sink that is down")
    spool_max_bytes: ByteSize = Field(ByteSize(64 << 20), ge=4096, description="e.g. 64MiB; bound on disk")
    spool_segment_bytes: ByteSize | None = Field(
        None, ge=1024, description="segment file size; default spool_max_bytes / 16, at most 4MiB")
    spool_full_policy: Literal["block", "drop_lowest_severity"] = "block"
    rate_limit_per_s: float | None = Field(None, gt=0, description="findings per second; None = unlimited")
    rate_limit_burst: int | None = Field(None, ge=1, description="bucket size; default max(1, rate)")
    dedup_window_s: float = Field(0.0, ge=0, description="seconds; 0 (default) disables dedup/aggregation")
    dedup_key: Literal["detector_actor_model", "uid"] = "detector_actor_model"
    dedup_max_keys: int = Field(100_000, ge=1, description="open windows kept; the oldest close early")

    @model_validator(mode="after")
    def _segments_fit(self) -> LaneOptions:
        if self.spool_segment_bytes is not None and self.spool_segment_bytes > self.spool_max_bytes:
            raise ValueError(f"spool_segment_bytes ({int(self.spool_segment_bytes)}) must not exceed "
                             f"spool_max_bytes ({int(self.spool_max_bytes)})")
        return self

    @property
    def segment_bytes(self) -> int:
        if self.spool_segment_bytes is not None:
            return int(self.spool_segment_bytes)
        return max(1024, min(4 << 20, int(self.spool_max_bytes) // 16))


class DeliveryOptions(LaneOptions):
    """The ``delivery:`` section. Example::

        delivery:
          spool_max_bytes: 256MiB
          spool_full_policy: drop_lowest_severity
          dedup_window_s: 60               # SIEMs get one finding + one aggregate per minute and key
          sinks:
            splunk: {rate_limit_per_s: 50}
            file: {dedup_window_s: 0}      # the audit file gets every finding as raised
    """

    shutdown_timeout_s: float = Field(10.0, ge=0, description="how long shutdown() waits for spools to drain")
    sinks: dict[str, LaneOptions] = Field(default_factory=dict, description="per-sink overrides, by sink name")

    def for_sink(self, name: str) -> LaneOptions:
        """This sink's effective options: the defaults with only the keys set under ``sinks.<name>`` replaced."""
        base = self.model_dump(include=set(LaneOptions.model_fields))
        override = self.sinks.get(name)
        if override is not None:
            base.update(override.model_dump(exclude_unset=True))
        return LaneOptions.model_validate(base)


# --------------------------------------------------------------------------- serialisation


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"finding evidence holds a {type(value).__name__}, which cannot be written as JSON")


def finding_to_dict(finding: Finding) -> dict[str, Any]:
    """Every field of a finding as JSON values (numpy scalars/arrays become numbers/lists)."""
    return {
        "family": finding.family,
        "detector": finding.detector,
        "title": finding.title,
        "severity": int(finding.severity),
        "actor": finding.actor,
        "model": finding.model,
        "related_ids": list(finding.related_ids),
        "window": finding.window,
        "evidence": finding.evidence,
        "attacks": list(finding.attacks),
        "time_ms": finding.time_ms,
        "confidence": finding.confidence,
        "message": finding.message,
        "analytic_type": finding.analytic_type,
    }


def finding_from_dict(data: dict[str, Any]) -> Finding:
    """Inverse of :func:`finding_to_dict`."""
    return Finding(
        family=data["family"], detector=data["detector"], title=data["title"],
        severity=Severity(int(data["severity"])), actor=data["actor"], model=data["model"],
        related_ids=tuple(data["related_ids"]), window=data["window"], evidence=data["evidence"],
        attacks=tuple(data["attacks"]), time_ms=int(data["time_ms"]), confidence=data["confidence"],
        message=data["message"], analytic_type=data["analytic_type"],
    )


def finding_to_json(finding: Finding) -> bytes:
    """Compact one-line JSON of a finding (NaN/inf kept: the spool reads it back with Python)."""
    return json.dumps(finding_to_dict(finding), separators=(",", ":"), default=_json_default).encode()


# --------------------------------------------------------------------------- spool


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class SpoolRecord:
    """One spooled finding as it lies on disk: ``<crc32 hex> <severity> <json>\\n``."""

    severity: int
    line: bytes

    @staticmethod
    def encode(finding: Finding) -> SpoolRecord:
        payload = finding_to_json(finding)
        return SpoolRecord(int(finding.severity),
                           b"%08x %d " % (zlib.crc32(payload), int(finding.severity)) + payload + b"\n")

    def decode(self) -> Finding:
        return finding_from_dict(json.loads(self.line[11:]))

    @staticmethod
    def parse(line: bytes) -> SpoolRecord | None:
        """None for a torn or corrupted line (a crash mid-write, a damaged disk)."""
        if len(line) < 12 or not line.endswith(b"\n") or line[8:9] != b" " or line[10:11] != b" ":
            return None
        payload = line[11:-1]
        try:
            if int(line[:8], 16) != zlib.crc32(payload):
                return None
            return SpoolRecord(int(line[9:10]), line)
        except ValueError:
            return None


@dataclass(frozen=True)
class SpoolPosition:
    """Where a read stopped: ``commit(position)`` removes everything before it."""

    segment: int
    offset: int
    records: int
    severity_bytes: dict[int, int]


class Spool:
    """Append-only, fsync'd, size-bounded queue of findings on disk, for one sink.

    Segments ``seg-<n>.log`` are written in order; ``cursor.json`` says how far
    the sink has acknowledged. A segment is deleted once it is fully
    acknowledged. New appends after a restart open a new segment, so a torn
    tail left by a crash is only ever read (and skipped, counted), never
    appended to. Not thread-safe: the owning lane serialises access.
    """

    _SEGMENT = re.compile(r"^seg-(\d{12})\.log$")

    def __init__(self, directory: Path, max_bytes: int, segment_bytes: int):
        self.directory = directory
        self.max_bytes = int(max_bytes)
        self.segment_bytes = int(segment_bytes)
        self.corrupt_records = 0
        directory.mkdir(parents=True, exist_ok=True)
        self._cursor_path = directory / "cursor.json"
        self._segments: list[int] = sorted(
            int(m.group(1)) for p in directory.iterdir() if (m := self._SEGMENT.match(p.name)))
        cursor_segment, cursor_offset = self._read_cursor()
        for seq in [s for s in self._segments if s < cursor_segment]:  # acknowledged, deletion interrupted
            self._path(seq).unlink(missing_ok=True)
            self._segments.remove(seq)
        if cursor_segment not in self._segments:
            # Everything before the cursor is acknowledged; keep its number as the floor so that new
            # segments always sort after it (segment numbers never go back, across restarts too).
            cursor_segment, cursor_offset = (self._segments[0] if self._segments else cursor_segment), 0
        self._cursor = (cursor_segment, cursor_offset)
        self._writer: Any = None  # open file of the segment being appended to
        self._writer_seq: int | None = None
        self.disk_bytes = sum(self._path(s).stat().st_size for s in self._segments)
        self.records = 0
        self.severity_bytes: dict[int, int] = {}
        for _, rec in self._scan_pending():
            self.records += 1
            self.severity_bytes[rec.severity] = self.severity_bytes.get(rec.severity, 0) + len(rec.line)

    # -- bookkeeping
    def _path(self, seq: int) -> Path:
        return self.directory / f"seg-{seq:012d}.log"

    def _read_cursor(self) -> tuple[int, int]:
        try:
            data = json.loads(self._cursor_path.read_text())
            return int(data["segment"]), int(data["offset"])
        except FileNotFoundError:
            return 0, 0
        except (ValueError, KeyError, TypeError):
            log.error("spool cursor %s is unreadable; replaying the whole spool (duplicates possible)",
                      self._cursor_path)
            return 0, 0

    def _write_cursor(self) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".cursor.")
        with os.fdopen(fd, "w") as fh:
            json.dump({"segment": self._cursor[0], "offset": self._cursor[1]}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self._cursor_path)
        _fsync_dir(self.directory)

    def _scan_pending(self):
        """Every readable record not yet acknowledged, oldest first, as (segment, record)."""
        for seq in list(self._segments):
            start = self._cursor[1] if seq == self._cursor[0] else 0
            with open(self._path(seq), "rb") as fh:
                fh.seek(start)
                for line in fh:
                    rec = SpoolRecord.parse(line)
                    if rec is None:
                        continue
                    yield seq, rec

    @property
    def empty(self) -> bool:
        return self.records == 0

    def fits(self, nbytes: int) -> bool:
        return self.disk_bytes + nbytes <= self.max_bytes

    @property
    def lowest_severity(self) -> int | None:
        present = [s for s, b in self.severity_bytes.items() if b > 0]
        return min(present) if present else None

    # -- writing
    def append(self, records: Sequence[SpoolRecord]) -> None:
        """Write and fsync; when this returns the records survive a crash."""
        if not records:
            return
        if self._writer is None or self._writer.tell() >= self.segment_bytes:
            self._roll()
        data = b"".join(r.line for r in records)
        self._writer.write(data)
        self._writer.flush()
        os.fsync(self._writer.fileno())
        self.disk_bytes += len(data)
        self.records += len(records)
        for r in records:
            self.severity_bytes[r.severity] = self.severity_bytes.get(r.severity, 0) + len(r.line)

    def _roll(self) -> None:
        if self._writer is not None:
            self._writer.close()
        seq = max((self._segments[-1] + 1) if self._segments else 1, self._cursor[0])
        self._writer = open(self._path(seq), "ab")  # noqa: SIM115 - kept open until the segment rolls
        self._writer_seq = seq
        self._segments.append(seq)
        if len(self._segments) == 1:
            self._cursor = (seq, 0)
        _fsync_dir(self.directory)

    # -- reading
    def peek(self, max_records: int) -> tuple[list[Finding], SpoolPosition | None]:
        """Up to ``max_records`` of the oldest findings (one segment at most), without removing them."""
        while self._segments:
            seq, offset = self._cursor
            findings: list[Finding] = []
            sev_bytes: dict[int, int] = {}
            records = 0
            with open(self._path(seq), "rb") as fh:
                fh.seek(offset)
                while len(findings) < max_records:
                    line = fh.readline()
                    if not line:
                        break
                    offset += len(line)
                    rec = SpoolRecord.parse(line)
                    if rec is None:
                        self.corrupt_records += 1
                        log.error("spool %s: skipped a corrupted record in segment %d", self.directory, seq)
                        continue
                    try:
                        findings.append(rec.decode())
                    except (ValueError, KeyError, TypeError) as exc:
                        self.corrupt_records += 1
                        log.error("spool %s: skipped an undecodable record: %s", self.directory, exc)
                    records += 1
                    sev_bytes[rec.severity] = sev_bytes.get(rec.severity, 0) + len(rec.line)
            position = SpoolPosition(seq, offset, records, sev_bytes)
            if findings or offset != self._cursor[1]:
                return findings, position
            # nothing left in this segment: move past it if it is finished
            if seq == self._writer_seq:
                return [], None
            self.commit(position)
        return [], None

    def commit(self, position: SpoolPosition) -> None:
        """Acknowledge everything up to ``position``; fully acknowledged segments are deleted."""
        seq = position.segment
        path = self._path(seq)
        if position.offset >= path.stat().st_size:
            if seq == self._writer_seq:
                self._writer.close()
                self._writer, self._writer_seq = None, None
            self.disk_bytes -= path.stat().st_size
            self._segments.remove(seq)
            self._cursor = (self._segments[0], 0) if self._segments else (seq + 1, 0)
            self._write_cursor()
            path.unlink()
            _fsync_dir(self.directory)
        else:
            self._cursor = (seq, position.offset)
            self._write_cursor()
        # last, so that a reader of ``empty`` (flush) never sees 0 before the files agree
        for sev, n in position.severity_bytes.items():
            self.severity_bytes[sev] = self.severity_bytes.get(sev, 0) - n
        self.records -= position.records

    def rewrite(self, keep: Callable[[list[SpoolRecord]], list[SpoolRecord]]) -> None:
        """Replace the pending records by ``keep(pending)`` in one new segment (used to drop findings).

        The new segment is fsync'd and the cursor moved to it before the old
        ones are deleted, so a crash leaves either the old or the new spool.
        """
        pending = [rec for _, rec in self._scan_pending()]
        kept = keep(pending)
        if self._writer is not None:
            self._writer.close()
            self._writer, self._writer_seq = None, None
        old = list(self._segments)
        seq = max((old[-1] + 1) if old else 1, self._cursor[0] + 1)
        with open(self._path(seq), "wb") as fh:
            fh.write(b"".join(r.line for r in kept))
            fh.flush()
            os.fsync(fh.fileno())
        self._segments = [seq]
        self._cursor = (seq, 0)
        self._write_cursor()
        for s in old:
            self._path(s).unlink(missing_ok=True)
        _fsync_dir(self.directory)
        self.disk_bytes = self._path(seq).stat().st_size
        self.records = len(kept)
        self.severity_bytes = {}
        for r in kept:
            self.severity_bytes[r.severity] = self.severity_bytes.get(r.severity, 0) + len(r.line)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer, self._writer_seq = None, None


# --------------------------------------------------------------------------- noise control


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; one token per finding."""

    def __init__(self, rate: float, burst: int, clock: Clock = time.monotonic):
        self.rate, self.burst, self._clock = rate, burst, clock
        self.tokens = float(burst)
        self._at = clock()

    def _refill(self) -> None:
        now = self._clock()
        self.tokens = min(float(self.burst), self.tokens + (now - self._at) * self.rate)
        self._at = now

    def take(self, wanted: int) -> int:
        """Take up to ``wanted`` tokens; returns how many were granted."""
        self._refill()
        granted = min(wanted, int(self.tokens))
        self.tokens -= granted
        return granted

    def wait_s(self) -> float:
        """Seconds until one token is available."""
        self._refill()
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate


@dataclass
class _Window:
    """One open dedup window: the first finding went out; later ones merge into ``pending``."""

    opened_at: float
    first_uid: str
    count: int = 0  # findings merged since the window opened (or since the last aggregate)
    latest: dict[str, Any] | None = None  # finding_to_dict of the latest merged finding
    severity: int = 0
    related_ids: list[str] = field(default_factory=list)
    related_total: int = 0
    attacks: list[str] = field(default_factory=list)
    confidence: float | None = None
    first_time_ms: int = 0

    def merge(self, finding: Finding) -> None:
        if self.count == 0:
            self.first_time_ms = finding.time_ms
        self.count += 1
        self.latest = finding_to_dict(finding)
        self.severity = max(self.severity, int(finding.severity))
        seen = set(self.related_ids)
        for rid in finding.related_ids:
            if rid not in seen:
                self.related_total += 1
                if len(self.related_ids) < MAX_RELATED:
                    self.related_ids.append(rid)
                    seen.add(rid)
        self.attacks += [a for a in finding.attacks if a not in self.attacks]
        if finding.confidence is not None:
            self.confidence = max(self.confidence or 0.0, finding.confidence)

    def aggregate(self, window_s: float) -> Finding:
        """The merged findings as one finding, with the count and every record id behind them."""
        assert self.latest is not None
        last = self.latest
        evidence = dict(last["evidence"])
        evidence["aggregated"] = {
            "count": self.count, "window_s": window_s, "first_finding_uid": self.first_uid,
            "first_time_ms": self.first_time_ms, "last_time_ms": last["time_ms"],
            "related_ids_total": self.related_total,
        }
        return Finding(
            family=last["family"], detector=last["detector"],
            title=f"{last['title']} (repeated {self.count}x)", severity=Severity(self.severity),
            actor=last["actor"], model=last["model"], related_ids=tuple(self.related_ids),
            window=f"{last['window']}|aggregate:{int(self.opened_at * 1000)}:{self.first_time_ms}",
            evidence=evidence, attacks=tuple(self.attacks), time_ms=last["time_ms"],
            confidence=self.confidence,
            message=f"{self.count} more findings like {self.first_uid} within {window_s:g} s",
            analytic_type=last["analytic_type"],
        )

    def reset(self) -> None:
        self.count, self.latest, self.severity = 0, None, 0
        self.related_ids, self.related_total, self.attacks, self.confidence = [], 0, [], None


class Aggregator:
    """Deduplication and aggregation of findings per key within a time window.

    The first finding for a key goes out at once (alerts must not wait); the
    ones that follow within ``window_s`` are merged and go out as one aggregate
    finding (count, merged record ids, highest severity) when the window
    closes or the delivery is flushed. Pending merges are persisted in
    ``state_path`` before ``deliver()`` returns, so the records behind them are
    not lost when offsets are committed and the agent then crashes.
    """

    def __init__(self, window_s: float, key: str, max_keys: int, state_path: Path | None):
        self.window_s, self.key_kind, self.max_keys, self.state_path = window_s, key, max_keys, state_path
        self.windows: OrderedDict[str, _Window] = OrderedDict()
        self.deduplicated = 0
        self.aggregates = 0
        self._dirty = False  # pending merges changed since the last persist()
        self.begin()
        if state_path is not None and state_path.exists():
            try:
                for k, w in json.loads(state_path.read_text()).items():
                    self.windows[k] = _Window(**w)
            except (ValueError, TypeError) as exc:
                log.error("dedup state %s is unreadable (%s); starting without it", state_path, exc)

    @property
    def enabled(self) -> bool:
        return self.window_s > 0

    def key(self, f: Finding) -> str:
        if self.key_kind == "uid":
            return f.uid
        return "\x1f".join((f.family, f.detector, f.actor or "", f.model or ""))

    def _touch(self, key: str) -> None:
        """Remember ``key``'s state before the first change in this call, for :meth:`rollback`."""
        if key not in self._undo:
            w = self.windows.get(key)
            self._undo[key] = None if w is None else copy.deepcopy(w)

    def begin(self) -> None:
        self._undo: dict[str, _Window | None] = {}
        self._counts = (self.deduplicated, self.aggregates)

    def rollback(self) -> None:
        """Undo everything since :meth:`begin` (the findings were not accepted and will come again)."""
        for k, w in self._undo.items():
            if w is None:
                self.windows.pop(k, None)
            else:
                self.windows[k] = w
        self.deduplicated, self.aggregates = self._counts
        self._undo = {}

    def admit(self, findings: Sequence[Finding], now: float) -> list[Finding]:
        """What to send now: closed windows' aggregates, then the findings that open a window."""
        out = self.expire(now)
        if not self.enabled:
            return out + list(findings)
        for f in findings:
            k = self.key(f)
            w = self.windows.get(k)
            self._touch(k)
            if w is not None and now - w.opened_at < self.window_s:
                w.merge(f)
                self.deduplicated += 1
                self._dirty = True
                continue
            if w is not None:  # expired between expire() and now
                out += self._close(k)
            self.windows[k] = _Window(opened_at=now, first_uid=f.uid)
            out.append(f)
            while len(self.windows) > self.max_keys:
                out += self._close(next(iter(self.windows)))
        return out

    def _close(self, key: str) -> list[Finding]:
        self._touch(key)
        w = self.windows.pop(key)
        if w.count:
            self._dirty = True
            self.aggregates += 1
            return [w.aggregate(self.window_s)]
        return []

    def expire(self, now: float) -> list[Finding]:
        out: list[Finding] = []
        for k in [k for k, w in self.windows.items() if now - w.opened_at >= self.window_s]:
            out += self._close(k)
        return out

    def pending_aggregates(self) -> list[Finding]:
        """Aggregates of every open window with merged findings; the windows stay open."""
        out = []
        for k, w in self.windows.items():
            if w.count:
                self._touch(k)
                self._dirty = True
                self.aggregates += 1
                out.append(w.aggregate(self.window_s))
                w.reset()
        return out

    def next_due(self) -> float | None:
        if not self.windows:
            return None
        return min(w.opened_at for w in self.windows.values()) + self.window_s

    def persist(self) -> None:
        """Write the pending merges (only when they changed) so a crash does not lose their record ids."""
        if self.state_path is None or not self._dirty:
            return
        self._dirty = False
        pending = {k: vars(w) for k, w in self.windows.items() if w.count}
        if not pending:
            self.state_path.unlink(missing_ok=True)
            return
        fd, tmp = tempfile.mkstemp(dir=self.state_path.parent, prefix=".dedup.")
        with os.fdopen(fd, "w") as fh:
            json.dump(pending, fh, default=_json_default)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.state_path)


# --------------------------------------------------------------------------- one sink's lane


@dataclass
class LaneCounters:
    delivered: int = 0  # findings the sink said SUCCESS for
    spooled: int = 0  # findings written to the spool
    export_failures: int = 0  # export() calls that failed (FAILURE, exception, configuration error)
    dropped: int = 0  # findings dropped because the spool was full (drop_lowest_severity)
    dropped_by_severity: dict[str, int] = field(default_factory=dict)
    blocked: int = 0  # deliver() calls refused because the spool was full (block)
    rate_limited: int = 0  # findings over the rate limit (spooled, sent later)
    reclaimed: int = 0  # findings the sink took, then found not received (Sink.reclaim): spooled again


def _full_jitter(attempt: int, initial: float, cap: float) -> float:
    """AWS "full jitter": uniform in [0, min(cap, initial * 2**attempt)]."""
    return random.uniform(0.0, min(cap, initial * (2 ** attempt)))


class _Lane:
    """Everything between the pipeline and one sink. Lock order: offer -> send -> state."""

    def __init__(self, sink: Sink, options: LaneOptions, directory: Path, clock: Clock, wall_clock: Clock,
                 stop: threading.Event, on_failure: Callable[[str, int], None] | None = None):
        self.sink, self.options, self.name = sink, options, sink.name
        self.on_failure = on_failure
        self.clock, self.wall_clock, self._stop = clock, wall_clock, stop
        self.spool = Spool(directory, int(options.spool_max_bytes), options.segment_bytes)
        self.aggregator = Aggregator(options.dedup_window_s, options.dedup_key, options.dedup_max_keys,
                                     directory / "dedup.json")
        self.bucket = (TokenBucket(options.rate_limit_per_s,
                                   options.rate_limit_burst or max(1, int(options.rate_limit_per_s)), clock)
                       if options.rate_limit_per_s else None)
        self.counters = LaneCounters()
        self.down = False  # the last attempt failed: new findings go to the spool until it drains
        self.disabled_reason: str | None = None
        self._drain_attempt = 0
        self._next_attempt_at = 0.0
        self.offer_lock = threading.Lock()
        self.send_lock = threading.Lock()
        self.state_lock = threading.Lock()
        self.wake = threading.Event()
        self.thread = threading.Thread(target=self._drain_loop, name=f"delivery-{self.name}", daemon=True)
        if not self.spool.empty:
            log.info("sink %s: %d findings from a previous run are in the spool; delivering them first",
                     self.name, self.spool.records)

    # -- the pipeline's path
    def offer(self, findings: Sequence[Finding], flush_pending: bool = False) -> bool:
        """Deliver or spool; False only when the spool is full under ``block`` (nothing is then kept)."""
        with self.offer_lock:
            self.aggregator.begin()
            batch = self.aggregator.admit(findings, self.wall_clock())
            if flush_pending:
                batch += self.aggregator.pending_aggregates()
            if not self._route(batch):
                self.aggregator.rollback()  # the caller will offer the same findings again
                return False
            self.aggregator.persist()
            return True

    def _must_spool(self) -> bool:
        return self.down or self.disabled_reason is not None or not self.spool.empty

    def _route(self, batch: list[Finding]) -> bool:
        if not batch:
            return True
        records = [SpoolRecord.encode(f) for f in batch]
        with self.state_lock:  # fast path while the sink is behind: append without waiting for an export
            if self._must_spool() and self.spool.fits(sum(len(r.line) for r in records)):
                return self._spool(records)
        with self.send_lock:  # no export is in flight from here: the spool may be rewritten safely
            with self.state_lock:
                if self._must_spool():
                    return self._spool(records)
            allowed = self.bucket.take(len(batch)) if self.bucket else len(batch)
            if allowed < len(batch):
                self.counters.rate_limited += len(batch) - allowed
            sent = self._send_with_retries(batch[:allowed])
            if sent < allowed:
                self.down = True
                self._drain_attempt = 0
                self._next_attempt_at = self.clock() + _full_jitter(
                    0, self.options.retry_initial_backoff_s, self.options.drain_max_backoff_s)
            if sent == len(batch):
                return True
            with self.state_lock:
                return self._spool(records[sent:])

    def _export_once(self, batch: Sequence[Finding]) -> bool:
        ok = self._attempt(batch)
        if not ok and self.on_failure is not None:
            try:
                self.on_failure(self.name, 1)
            except Exception:
                log.debug("on_failure callback raised", exc_info=True)
        return ok

    def _attempt(self, batch: Sequence[Finding]) -> bool:
        try:
            return self._export(batch)
        finally:
            self.take_back()

    def take_back(self) -> None:
        """Spool again what the sink had taken but found was not received (``Sink.reclaim``).

        They were acknowledged to the pipeline already (its offsets may be committed),
        so they go to the spool even past its bound or under ``block``: refusing or
        dropping them would lose them. They arrive after findings raised later.
        """
        try:
            lost = self.sink.reclaim()
        except Exception as exc:  # noqa: BLE001 - a sink's bug must not crash the pipeline
            log.warning("sink %s: reclaim raised %s: %s", self.name, type(exc).__name__, exc)
            return
        if not lost:
            return
        records = [SpoolRecord.encode(f) for f in lost]
        with self.state_lock:
            self.spool.append(records)
            self.counters.spooled += len(records)
            self.counters.reclaimed += len(records)
            self.down = True
        self.wake.set()
        log.warning("sink %s: %d finding(s) it had taken were not received; spooled to be sent again",
                    self.name, len(records))

    def _export(self, batch: Sequence[Finding]) -> bool:
        try:
            result = self.sink.export(batch)
        except SinkConfigurationError as exc:
            self.counters.export_failures += 1
            self.disabled_reason = str(exc)
            log.error("sink %s is stopped: %s. Its findings are kept in the spool %s; fix the configuration "
                      "and restart the agent to deliver them.", self.name, exc, self.spool.directory)
            return False
        except Exception as exc:  # noqa: BLE001 - a sink's bug must not crash the pipeline
            self.counters.export_failures += 1
            log.warning("sink %s: export raised %s: %s", self.name, type(exc).__name__, exc)
            return False
        if result is ExportResult.SUCCESS:
            self.counters.delivered += len(batch)
            return True
        self.counters.export_failures += 1
        return False

    def _send_with_retries(self, batch: Sequence[Finding]) -> int:
        """Export in chunks with bounded retries; returns how many (a prefix) were delivered."""
        o = self.options
        sent = 0
        while sent < len(batch):
            chunk = batch[sent:sent + o.batch_size]
            for attempt in range(o.retry_max_attempts):
                if self._export_once(chunk):
                    break
                if self.disabled_reason is not None or attempt == o.retry_max_attempts - 1:
                    log.warning("sink %s: %d findings not delivered after %d attempts; spooling them",
                                self.name, len(batch) - sent, attempt + 1)
                    return sent
                if self._stop.wait(_full_jitter(attempt, o.retry_initial_backoff_s, o.retry_max_backoff_s)):
                    return sent
            sent += len(chunk)
        return sent

    def _spool(self, records: list[SpoolRecord]) -> bool:
        """Append to the spool, applying the full-spool policy.

        Called with ``state_lock`` held, and with ``send_lock`` too whenever the
        records might not fit (dropping rewrites the spool, which must not
        happen under a batch the drain thread is exporting).
        """
        if not self.spool.fits(sum(len(r.line) for r in records)):
            if self.options.spool_full_policy == "block":
                self.counters.blocked += 1
                log.error("sink %s: spool is full (%d of %d bytes) and policy is block: refusing %d findings; "
                          "the pipeline stops consuming until the sink recovers", self.name,
                          self.spool.disk_bytes, self.spool.max_bytes, len(records))
                return False
            records = self._drop_lowest(records)
        self.spool.append(records)
        self.counters.spooled += len(records)
        self.wake.set()
        return True

    def _count_drop(self, dropped: Sequence[SpoolRecord]) -> None:
        if not dropped:
            return
        self.counters.dropped += len(dropped)
        for r in dropped:
            label = Severity(r.severity).label
            self.counters.dropped_by_severity[label] = self.counters.dropped_by_severity.get(label, 0) + 1
        worst = Severity(max(r.severity for r in dropped)).label
        log.error("sink %s: spool is full (%d bytes): DROPPED %d findings (up to severity %s); %d dropped so far",
                  self.name, self.spool.max_bytes, len(dropped), worst, self.counters.dropped)

    def _drop_lowest(self, incoming: list[SpoolRecord]) -> list[SpoolRecord]:
        """Make room by dropping the least severe findings (newest first within a severity).

        If the incoming findings are no more severe than anything spooled, they
        are the ones dropped (no rewrite). Otherwise the spool is rewritten down
        to 90 % of its bound, so a long outage does not rewrite it per batch.
        """
        spool = self.spool
        need = sum(len(r.line) for r in incoming)
        lowest = spool.lowest_severity
        order = sorted(range(len(incoming)), key=lambda i: (incoming[i].severity, -i))
        dropped: set[int] = set()
        for i in order:
            if spool.fits(need):
                break
            if lowest is not None and incoming[i].severity > lowest:
                break
            dropped.add(i)
            need -= len(incoming[i].line)
        kept_in = [r for i, r in enumerate(incoming) if i not in dropped]
        self._count_drop([incoming[i] for i in sorted(dropped)])
        if spool.fits(need):
            return kept_in
        budget = int(spool.max_bytes * 0.9)
        rewritten_drops: list[SpoolRecord] = []

        def keep(pending: list[SpoolRecord]) -> list[SpoolRecord]:
            pool = pending + kept_in
            total = sum(len(r.line) for r in pool)
            gone: set[int] = set()
            for i in sorted(range(len(pool)), key=lambda i: (pool[i].severity, -i)):
                if total <= budget:
                    break
                gone.add(i)
                total -= len(pool[i].line)
            rewritten_drops.extend(pool[i] for i in sorted(gone))
            return [r for i, r in enumerate(pending) if i not in gone]

        incoming_ids = {id(r) for r in kept_in}
        spool.rewrite(keep)
        self._count_drop(rewritten_drops)
        dropped_incoming = {id(r) for r in rewritten_drops if id(r) in incoming_ids}
        return [r for r in kept_in if id(r) not in dropped_incoming]

    # -- the drain thread
    def _drain_loop(self) -> None:
        while not self._stop.is_set():
            try:
                timeout = self._drain_step()
            except Exception:  # the thread must outlive e.g. a full disk; it logs and tries again
                log.exception("sink %s: delivery background step failed; retrying", self.name)
                timeout = self.options.drain_max_backoff_s
            self.wake.wait(timeout)
            self.wake.clear()

    def _drain_step(self) -> float:
        """One step of the background work; returns how long to sleep before the next."""
        due = self.aggregator.next_due()
        if due is not None and self.wall_clock() >= due:
            self.offer(())  # closes expired windows; their aggregates go out (or to the spool)
        sleep = 1.0 if due is None else max(0.01, min(1.0, due - self.wall_clock()))
        if self.disabled_reason is not None:
            return sleep
        if self.spool.empty:
            self.down = False  # nothing spooled (e.g. a block refusal): let the next deliver() try directly
            return sleep
        now = self.clock()
        if now < self._next_attempt_at:
            return min(sleep, self._next_attempt_at - now)
        with self.send_lock:
            want = self.options.batch_size
            if self.bucket is not None:
                want = self.bucket.take(want)
                if want == 0:
                    return min(sleep, max(0.005, self.bucket.wait_s()))
            with self.state_lock:
                findings, position = self.spool.peek(want)
            if self.bucket is not None and len(findings) < want:
                self.bucket.tokens += want - len(findings)
            if position is None:
                return sleep
            ok = True if not findings else self._export_once(findings)
            if ok:
                with self.state_lock:
                    self.spool.commit(position)
                    self.down = False
                    self._drain_attempt = 0
                return 0.0
            self._drain_attempt += 1
            delay = _full_jitter(self._drain_attempt, self.options.retry_initial_backoff_s,
                                 self.options.drain_max_backoff_s)
            self._next_attempt_at = self.clock() + delay
            return min(sleep, delay)

    def stats(self) -> dict[str, Any]:
        c = self.counters
        return {
            "delivered": c.delivered, "spooled": c.spooled, "export_failures": c.export_failures,
            "dropped": c.dropped, "dropped_by_severity": dict(c.dropped_by_severity), "blocked": c.blocked,
            "rate_limited": c.rate_limited, "reclaimed": c.reclaimed, "deduplicated": self.aggregator.deduplicated,
            "aggregates": self.aggregator.aggregates, "spool_records": self.spool.records,
            "spool_bytes": self.spool.disk_bytes, "spool_max_bytes": int(self.options.spool_max_bytes),
            "spool_corrupt_records": self.spool.corrupt_records,
            "down": self.down, "disabled": self.disabled_reason,
            "sink": dict(getattr(self.sink, "counters", {})),  # the sink's own (e.g. HEC rejected events)
        }


# --------------------------------------------------------------------------- the pipeline's interface


_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class Delivery:
    """Fan findings out to every sink reliably. See the module docstring for the guarantees."""

    def __init__(self, sinks: list[Sink], options: DeliveryOptions | None, spool_dir: Path, *,
                 clock: Clock = time.monotonic, wall_clock: Clock = time.time,
                 on_failure: Callable[[str, int], None] | None = None):
        """``on_failure(sink_name, n)`` is called for every failed export attempt (the delivery-failures metric)."""
        options = options or DeliveryOptions()
        self.options = options
        names = [s.name for s in sinks]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"sinks: two sinks are named {name!r}; give each a unique `name:`")
            if not _SAFE_NAME.match(name) or name in {".", ".."}:
                raise ValueError(f"sinks: name {name!r} is used as a spool directory; use letters, digits, "
                                 "'_', '-' or '.'")
        unknown = sorted(set(options.sinks) - set(names))
        if unknown:
            raise ValueError(f"delivery.sinks: no sink named {', '.join(unknown)}; the sinks are "
                             f"{', '.join(names) or '(none)'}")
        self._stop = threading.Event()
        self.lanes = [_Lane(s, options.for_sink(s.name), Path(spool_dir) / s.name, clock, wall_clock, self._stop,
                            on_failure) for s in sinks]
        for lane in self.lanes:
            lane.thread.start()
        self._closed = False

    def deliver(self, findings: Sequence[Finding]) -> bool:
        """True when every finding is delivered or durably spooled for every sink that accepts it.

        False (spool full under ``block``) means: do not commit; offer the same
        findings again later. Sinks that did take them may then see them twice.
        """
        if self._closed:
            raise RuntimeError("deliver() after shutdown()")
        ok = True
        for lane in self.lanes:
            accepted = [f for f in findings if lane.sink.accepts(f)]
            ok = lane.offer(accepted) and ok
        return ok

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Send pending aggregates, wait for spools to drain and sinks to flush; True if nothing is left."""
        deadline = time.monotonic() + timeout_s
        ok = True
        for lane in self.lanes:
            ok = lane.offer((), flush_pending=True) and ok
            lane.wake.set()
        for lane in self.lanes:
            while True:
                while not lane.spool.empty and lane.disabled_reason is None and time.monotonic() < deadline:
                    lane.wake.set()
                    time.sleep(0.01)
                try:
                    flushed = lane.sink.force_flush(max(0.0, deadline - time.monotonic()))
                except Exception as exc:  # noqa: BLE001 - one sink must not stop the others' flush
                    log.warning("sink %s: force_flush raised %s", lane.name, exc)
                    flushed = False
                lane.take_back()  # what the flush found not received goes round again
                if lane.spool.empty or lane.disabled_reason is not None or time.monotonic() >= deadline:
                    break
            ok = ok and flushed and lane.spool.empty
        return ok

    def shutdown(self) -> None:
        """Flush (bounded by ``shutdown_timeout_s``), stop the drain threads, shut the sinks down.

        Whatever did not drain stays in the spool and is delivered after a restart.
        """
        if self._closed:
            return
        drained = self.flush(self.options.shutdown_timeout_s)
        self._stop.set()
        for lane in self.lanes:
            lane.wake.set()
        for lane in self.lanes:
            lane.thread.join(timeout=30)
            try:
                lane.sink.shutdown()
            except Exception as exc:  # noqa: BLE001 - one sink must not stop the others' shutdown
                log.warning("sink %s: shutdown raised %s", lane.name, exc)
            lane.take_back()  # what the sink's last check found not received waits in the spool for the restart
            with lane.state_lock:
                lane.spool.close()
            if not lane.spool.empty:
                log.warning("sink %s: %d findings stay in the spool %s for the next run", lane.name,
                            lane.spool.records, lane.spool.directory)
        self._closed = True
        if not drained:
            log.warning("delivery shut down before every sink had taken every finding")

    def queue_depths(self) -> dict[str, int]:
        """Findings waiting in each sink's spool (for the telemetry gauge)."""
        return {lane.name: lane.spool.records for lane in self.lanes}

    def stats(self) -> dict[str, Any]:
        """Counters for telemetry and the scoreboard: totals plus one entry per sink."""
        per_sink = {lane.name: lane.stats() for lane in self.lanes}
        totals: dict[str, Any] = {}
        for key in ("delivered", "spooled", "export_failures", "dropped", "blocked", "rate_limited",
                    "deduplicated", "aggregates", "spool_records", "spool_bytes"):
            totals[key] = sum(s[key] for s in per_sink.values())
        totals["sinks"] = per_sink
        return totals


__all__ = [
    "Aggregator", "Delivery", "DeliveryOptions", "LaneOptions", "Spool", "TokenBucket",
    "finding_from_dict", "finding_to_dict", "finding_to_json",
]

