"""The detector protocol every detector follows, and the registry that finds them.

Modelled on river's detectors: state is small and explicit, ``update`` takes the
next batch and says what it concluded. Differences: we work a batch at a time
(one torch call per batch) and return :class:`~agent.findings.Finding` values
instead of a ``drift_detected`` flag, because a finding must name the records
behind it.

Lifecycle::

    det = DriftVAE(options, context)        # options validated by its Options model
    det.fit(reference)                      # only when requires_fit; by `inferwatch train`
    save_tree(path, det.artifacts())        # written by train, hashed in manifest.json
    det.load_artifacts(load_tree(path))     # by `run`, after the hash check
    findings = det.update(batch, notes)     # per batch, on the hot path
    det.state_dict() / det.load_state_dict  # runtime checkpoints (windows, per-client state)

``notes`` is a per-batch dict that detectors earlier in ``priority`` order may
fill with per-record arrays for later ones (the VAE's OOD p-values feed the
extraction detector's out-of-distribution share). ``notes["findings"]`` is the
list of findings raised so far in this batch by earlier detectors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from agent.findings import Finding
from agent.model import WatchedModel
from agent.records import FeedbackBatch, InferenceBatch
from agent.reference import ReferenceData


class DetectorOptions(BaseModel):
    """Options every detector has; each detector subclasses this with its own."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="run this detector (listing it in `detectors:` is enough)")


@dataclass
class DetectorContext:
    """What a detector may know about its surroundings at construction."""

    device: torch.device
    input_shape: tuple[int, ...] | None = None  # from the manifest (or the reference data in train)
    n_classes: int | None = None
    model: WatchedModel | None = None  # the monitored model or its surrogate, when artifacts have one
    seed: int = 0

    @property
    def input_dim(self) -> int | None:
        return None if self.input_shape is None else int(np.prod(self.input_shape))


class Detector(ABC):
    """Base class of all detectors. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]
    family: ClassVar[str]
    stream: ClassVar[Literal["inference", "feedback"]]
    requires_fit: ClassVar[bool] = False
    needs_model: ClassVar[bool] = False  # uses context.model (a surrogate is trained when none is given)
    priority: ClassVar[int] = 100  # lower runs first within a batch
    Options: ClassVar[type[DetectorOptions]] = DetectorOptions

    def __init__(self, options: DetectorOptions, context: DetectorContext):
        self.options = options
        self.context = context

    def fit(self, reference: ReferenceData) -> None:  # noqa: B027 - optional for stateless-at-start detectors
        """Learn what normal looks like. Only called when ``requires_fit``."""

    @abstractmethod
    def update(self, batch: InferenceBatch | FeedbackBatch, notes: dict[str, Any]) -> list[Finding]:
        """Consume one batch; return the findings it completes (often none)."""

    def artifacts(self) -> dict[str, Any]:
        """The fitted parameters (numpy arrays / JSON values). Empty when nothing is fitted."""
        return {}

    def load_artifacts(self, tree: dict[str, Any]) -> None:  # noqa: B027
        """Restore what :meth:`artifacts` returned."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Runtime state (windows, per-client statistics) for checkpoints."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore runtime state from :meth:`state_dict` output."""


def registry() -> dict[str, type[Detector]]:
    """Every concrete detector in this package, by name, in the order they run (``priority``)."""
    from agent.plugins import discover

    found = discover("detectors", Detector, "name", skip=frozenset({"base"}))
    return dict(sorted(found.items(), key=lambda kv: (kv[1].priority, kv[0])))
