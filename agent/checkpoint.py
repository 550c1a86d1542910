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
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from agent.state import load_tree, save_tree
from detectors.base import Detector

log = logging.getLogger(__name__)
TP = tuple[str, int]
FILE = "checkpoint.npz"


class Checkpointer:
    def __init__(self, directory: Path, interval_s: float):
        self.directory = directory
        self.interval_s = interval_s
        self._last = time.monotonic()
        self.saves = 0
        self.offsets: dict[TP, int] = {}  # of the last checkpoint restored or saved

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

    def save(self, detectors: list[Detector], offsets: dict[TP, int]) -> None:
        """Write every detector's state with ``offsets`` (next offset per partition that the state reflects)."""
        merged = {**self.offsets, **offsets}  # partitions not read since the last save keep their offset
        tree = {"offsets": [[t, p, o] for (t, p), o in sorted(merged.items())],
                "detectors": {det.name: det.state_dict() for det in detectors}}
        save_tree(self.path, tree)
        self.offsets = merged
        self._last = time.monotonic()
        self.saves += 1
