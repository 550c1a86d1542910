"""Detector runtime state checkpoints that carry the offsets they reflect.

Why offsets travel with the state: windows and per-client statistics are only
correct if they have seen each record exactly once. So the pipeline saves a
checkpoint (all detectors' state + the next offset per partition it reflects)
*before* it commits those offsets, and commits only together with a
checkpoint (every ``checkpoint_interval_s``, on revocation and on exit):

* killed before the save: the old checkpoint and the old commit match; the
  records since are uncommitted and replayed into the restored state;
* killed between save and commit: the checkpoint is ahead of the group's
  commit; on assignment the source seeks to the checkpoint's offsets
  (:meth:`Checkpointer.offsets` feeds ``source.resume``), so no record is
  counted twice — their findings were already accepted by every sink.

One file, written atomically (temp file, fsync, rename), pickle-free
(:mod:`agent.state`): a crash leaves the previous checkpoint, never half a new
one, and never state from one moment with offsets from another.

The periodic checkpoint is written in the background: the state is copied
between two batches (milliseconds), the file written and fsync'd by a thread
(tens to hundreds of milliseconds for megabytes of per-client state) while
the next batches are processed, and its offsets committed once it is on disk.
Revocation and exit write synchronously.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.state import load_tree, save_tree
from detectors.base import Detector

log = logging.getLogger(__name__)
TP = tuple[str, int]
FILE = "checkpoint.npz"


@dataclass(frozen=True)
class _Snapshot:
    tree: dict[str, Any]       # what goes to disk: every detector's state and ``merged``
    merged: dict[TP, int]      # offsets of every partition the file covers (earlier saves included)
    offsets: dict[TP, int]     # this save's offsets: the partitions the pipeline holds now


class Checkpointer:
    def __init__(self, directory: Path, interval_s: float):
        self.directory = directory
        self.interval_s = interval_s
        self._last = time.monotonic()
        self.saves = 0
        self.offsets: dict[TP, int] = {}  # of the last checkpoint restored or saved
        self._writer: threading.Thread | None = None
        self._written: dict[TP, int] | None = None  # offsets of a background write that finished
        self._error: BaseException | None = None

    @property
    def path(self) -> Path:
        return self.directory / FILE

    def restore(self, detectors: list[Detector]) -> list[str]:
        """Load each detector's state from the last checkpoint, if any; returns the names restored.

        A detector that the checkpoint does not know (newly enabled) starts fresh.
        """
        if not self.path.is_file():
            return []
        tree = load_tree(self.path)
        self.offsets = {(t, int(p)): int(o) for t, p, o in tree.get("offsets", [])}
        states = tree.get("detectors", {})
        restored = []
        for det in detectors:
            if det.name in states:
                det.load_state_dict(states[det.name])
                restored.append(det.name)
        return restored

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.interval_s

    @property
    def writing(self) -> bool:
        return self._writer is not None and self._writer.is_alive()

    def save(self, detectors: list[Detector], offsets: dict[TP, int]) -> None:
        """Write every detector's state with ``offsets`` (next offset per partition that the state reflects)."""
        self.wait()
        self._written = None  # superseded; after a revocation it may name partitions that are no longer ours
        self._write(self._snapshot(detectors, offsets))

    def save_in_background(self, detectors: list[Detector], offsets: dict[TP, int]) -> None:
        """Copy the state now, write it in a thread; :meth:`written` hands back ``offsets`` once on disk."""
        self.wait()
        snapshot = self._snapshot(detectors, offsets)
        self._writer = threading.Thread(target=self._write_quietly, args=(snapshot,), name="checkpoint", daemon=True)
        self._writer.start()

    def written(self) -> dict[TP, int] | None:
        """Offsets of a background checkpoint that reached the disk since the last call (then commit them)."""
        if self.writing:
            return None
        self.wait()
        done, self._written = self._written, None
        return done

    def wait(self) -> None:
        """Let a background write finish; re-raise its error (a full disk must not go unnoticed)."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _snapshot(self, detectors: list[Detector], offsets: dict[TP, int]) -> _Snapshot:
        merged = {**self.offsets, **offsets}  # partitions not read since the last save keep their offset
        tree = {"offsets": [[t, p, o] for (t, p), o in sorted(merged.items())],
                "detectors": {det.name: _copy(det.state_dict()) for det in detectors}}
        self._last = time.monotonic()
        return _Snapshot(tree, merged, dict(offsets))

    def _write(self, snapshot: _Snapshot) -> None:
        save_tree(self.path, snapshot.tree)
        self.offsets = snapshot.merged
        self.saves += 1

    def _write_quietly(self, snapshot: _Snapshot) -> None:
        try:
            self._write(snapshot)
            self._written = snapshot.offsets  # only the partitions the pipeline holds: never commit for another owner
        except BaseException as exc:  # noqa: BLE001 - handed to the pipeline by wait()
            self._error = exc


def _copy(tree: Any) -> Any:
    """A copy the detectors cannot change while a thread writes it (their arrays are updated in place)."""
    if isinstance(tree, np.ndarray):
        return tree.copy()
    if isinstance(tree, dict):
        return {k: _copy(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [_copy(v) for v in tree]
    return tree
