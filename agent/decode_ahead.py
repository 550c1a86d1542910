"""Where decoding runs: inline, or in a worker process one batch ahead of the detectors.

Decoding JSON costs about as much CPU as consuming it, and CPython runs one
thread at a time, so an agent that decodes and detects in one process is
bounded by their sum. With ``source.decode_worker: true`` the native decoder
runs in a second process: while the detectors work on batch *k*, the worker
decodes batch *k + 1*. The consumer, its group membership and every commit stay
in the agent's process, so rebalances and checkpoints work as they do inline.

Both classes answer :meth:`exchange`: hand in the records just polled, get
back a batch ready for the detectors (or ``None`` while the only batch is still
being decoded). Batches come back in the order they were polled.

Only the native decoder goes to a worker. It is stateless across batches; the
KServe decoder joins requests to responses across batches, so its state lives
with the pipeline and it always runs inline.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import queue
import signal
import threading
import traceback
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from agent.records import DecodedBatch, RawRecord
from connectors.native_format import DecodeSpec, NativeDecoder

log = logging.getLogger(__name__)

# RawRecord columns: a tuple of 7 lists pickles ~10x faster than a list of 2,000 dataclasses.
_Columns = tuple[list, list, list, list, list, list, list]


@dataclass(frozen=True)
class Decoded:
    """A polled batch and what decoding made of it."""

    records: list[RawRecord]
    batch: DecodedBatch


class InlineDecoding:
    """Decode in the pipeline's own thread, as soon as a batch is polled."""

    def __init__(self, decoder: Any):
        self.decoder = decoder

    @property
    def ahead(self) -> int:
        return 0

    def exchange(self, records: list[RawRecord], flush: bool = False) -> Decoded | None:
        return Decoded(records, self.decoder.decode(records)) if records else None

    def drain(self) -> list[Decoded]:
        return []

    def close(self) -> None:
        pass


class WorkerDecoding:
    """Decode in a worker process, one batch ahead of the caller.

    If the worker dies, the batches it held are decoded inline and so is
    everything after (logged once): slower, never lost.
    """

    def __init__(self, decoder: NativeDecoder, full_batch: int):
        """``full_batch``: a poll this size means a backlog, worth overlapping; a smaller one is decoded
        and handed back at once, so a slow stream's records do not wait a poll for their findings."""
        self.decoder, self.full_batch = decoder, full_batch
        self._in_flight: deque[list[RawRecord]] = deque()
        ctx = mp.get_context("spawn")  # torch and kafka-python threads make fork unsafe
        self._conn, child = ctx.Pipe()
        self._worker = ctx.Process(target=_serve, args=(child, decoder.spec), name="inferwatch-decode",
                                   daemon=True)
        self._worker.start()
        child.close()
        self._broken = False
        # At exit multiprocessing SIGTERMs and joins daemonic children, but the worker ignores SIGTERM and
        # waits for its pipe to close: close it first (atexit runs handlers registered later first), so a
        # process that never called close() (a crash path, a test) still exits.
        atexit.register(self.close)

    @property
    def ahead(self) -> int:
        """Batches handed to the worker and not yet returned."""
        return len(self._in_flight)

    def exchange(self, records: list[RawRecord], flush: bool = False) -> Decoded | None:
        """Submit ``records``; return the oldest batch once another is in flight behind it, or when the
        poll was not full (no backlog: nothing to overlap with), or with ``flush``."""
        if records:
            self._submit(records)
        flush = flush or len(records) < self.full_batch
        if len(self._in_flight) > 1 or (flush and self._in_flight):
            return self._receive()
        return None

    def drain(self) -> list[Decoded]:
        """Every batch still in flight, decoded (before a checkpoint: they were polled, so they get processed)."""
        return [self._receive() for _ in range(len(self._in_flight))]

    def close(self) -> None:
        atexit.unregister(self.close)
        try:
            self._conn.close()
        finally:
            self._worker.join(timeout=5)
            if self._worker.is_alive():
                self._worker.kill()
                self._worker.join(timeout=5)

    def _submit(self, records: list[RawRecord]) -> None:
        self._in_flight.append(records)
        if self._broken:
            return
        try:
            self._conn.send(_columns(records))
        except (OSError, ValueError) as exc:
            self._give_up(exc)

    def _receive(self) -> Decoded:
        records = self._in_flight.popleft()
        if not self._broken:
            try:
                ok, payload = self._conn.recv()
                if ok:
                    return Decoded(records, payload)
                raise RuntimeError(f"decode worker failed:\n{payload}")
            except (EOFError, OSError, RuntimeError) as exc:
                self._give_up(exc)
        return Decoded(records, self.decoder.decode(records))

    def _give_up(self, exc: BaseException) -> None:
        if not self._broken:
            log.error("decode worker lost (%s); decoding inline from now on", exc)
        self._broken = True


def _columns(records: Sequence[RawRecord]) -> _Columns:
    return ([r.topic for r in records], [r.partition for r in records], [r.offset for r in records],
            [r.value for r in records], [r.key for r in records], [r.headers for r in records],
            [r.timestamp_ms for r in records])


def _serve(conn: Connection, spec: DecodeSpec) -> None:
    """The worker: decode each batch of columns it is sent, until the pipe closes (the agent exited).

    A thread keeps reading while the main loop decodes: if both ends could block in ``send()`` at
    once (the agent handing in batch k+1, the worker handing back batch k) neither would ever read.
    """
    # Ctrl-C, and systemd's SIGTERM to the whole service, are for the agent: it finishes what the worker
    # holds, then closes the pipe, and the worker exits on that EOF (also when the agent is killed)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    inbox: queue.SimpleQueue[_Columns | None] = queue.SimpleQueue()

    def read() -> None:
        try:
            while True:
                inbox.put(conn.recv())
        except (EOFError, OSError):
            inbox.put(None)

    threading.Thread(target=read, name="decode-inbox", daemon=True).start()
    decoder = NativeDecoder(spec)
    while (cols := inbox.get()) is not None:
        try:
            records = [RawRecord(*row) for row in zip(*cols, strict=True)]
            reply: tuple[bool, Any] = (True, decoder.decode(records))
        except Exception:  # noqa: BLE001 - a decoder bug must reach the agent's log, not vanish with the worker
            reply = (False, traceback.format_exc())
        try:
            conn.send(reply)
        except OSError:
            return


def build_decoding(decoder: Any, in_worker: bool, full_batch: int) -> InlineDecoding | WorkerDecoding:
    """A worker for the native decoder when asked for; inline otherwise."""
    if in_worker and isinstance(decoder, NativeDecoder):
        return WorkerDecoding(decoder, full_batch)
    return InlineDecoding(decoder)
