"""Detector runtime state checkpoints, so windows and per-client statistics survive a restart.

Saved atomically (write to a temp file, fsync, rename) every
``checkpoint_interval_s`` after a commit, and on every clean exit. Restored when
the agent starts. Files are pickle-free (:mod:`agent.state`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from agent.state import load_tree, save_tree
from detectors.base import Detector

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory: Path, interval_s: float):
        self.directory = directory
        self.interval_s = interval_s
        self._last = time.monotonic()
        self.saves = 0

    def path(self, det: Detector) -> Path:
        return self.directory / f"{det.name}.state.npz"

    def restore(self, detectors: list[Detector]) -> list[str]:
        """Load each detector's last checkpoint, if any; returns the names restored."""
        restored = []
        for det in detectors:
            p = self.path(det)
            if p.is_file():
                det.load_state_dict(load_tree(p))
                restored.append(det.name)
        return restored

    def maybe_save(self, detectors: list[Detector]) -> None:
        if time.monotonic() - self._last >= self.interval_s:
            self.save(detectors)

    def save(self, detectors: list[Detector]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for det in detectors:
            save_tree(self.path(det), det.state_dict())
        self._last = time.monotonic()
        self.saves += 1
