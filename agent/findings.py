"""The finding: what a detector concluded, before any SIEM format is applied.

A finding is a frozen value. Sinks render it (OCSF, ECS, CEF, LEEF); nothing
downstream mutates it. Its ``uid`` is stable for the same detector, actor,
model and window, so a SIEM (and our own dedup) can recognise a repeat.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np

from agent.atlas import technique

FAMILIES = ("evasion", "extraction", "drift", "poisoning", "integrity", "posture")
MAX_RELATED = 1000  # the contract: all ids behind a finding, or the first 1,000


def _plain(obj: Any) -> Any:
    """JSON-safe copy of detector evidence: numpy -> Python, NaN/inf -> None, tuples -> lists."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    return str(obj)


class Severity(IntEnum):
    """OCSF ``severity_id`` values 1-5 (0 Unknown and 6 Fatal are never raised)."""

    INFORMATIONAL = 1
    LOW = 2
    MEDIUM = 3
    HIGH = 4
    CRITICAL = 5

    @property
    def label(self) -> str:
        return self.name.capitalize()

    @classmethod
    def parse(cls, value: str | int) -> Severity:
        """Accept ``"high"``, ``"HIGH"`` or ``4`` (config files use all three)."""
        if isinstance(value, int):
            return cls(value)
        try:
            return cls[str(value).strip().upper()]
        except KeyError:
            names = ", ".join(s.name.lower() for s in cls)
            raise ValueError(f"unknown severity {value!r}, expected one of {names} or 1-5") from None


@dataclass(frozen=True)
class Finding:
    """One detection.

    ``window`` names what the finding is about in time (a window start, a
    record id, a campaign key) so that ``uid`` is the same when the same
    detector re-raises the same thing, and different otherwise.
    """

    family: str
    detector: str
    title: str
    severity: Severity
    actor: str | None  # client_id (inference) or source (feedback)
    model: str | None
    related_ids: tuple[str, ...]
    window: str
    evidence: dict[str, Any] = field(default_factory=dict)
    attacks: tuple[str, ...] = ()  # MITRE ATLAS technique ids, most specific first
    time_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    confidence: float | None = None  # 0..1
    message: str = ""
    analytic_type: str = "statistical"  # or "learning" (OCSF analytic.type_id 3 / 4)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"finding family {self.family!r} is not one of {FAMILIES}")
        for uid in self.attacks:
            technique(uid)  # raises on an unknown id
        if len(self.related_ids) > MAX_RELATED:
            object.__setattr__(self, "related_ids", tuple(self.related_ids[:MAX_RELATED]))
        if not isinstance(self.severity, Severity):
            object.__setattr__(self, "severity", Severity(self.severity))
        object.__setattr__(self, "evidence", _plain(self.evidence))
        object.__setattr__(self, "related_ids", tuple(str(r) for r in self.related_ids))

    @property
    def uid(self) -> str:
        """Stable id: same detector, actor, model and window give the same uid."""
        key = "\x1f".join((self.detector, self.actor or "", self.model or "", self.window))
        return "iw-" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]

    @property
    def dedup_key(self) -> str:
        return self.uid
