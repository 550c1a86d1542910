"""The sink protocol every output follows, and the registry that finds them.

Modelled on OpenTelemetry's exporters (``export()`` returns a result,
``force_flush()``, ``shutdown()``) and falcosidekick's outputs (a minimum
severity per output, one file per target). The pipeline commits Kafka offsets
only after every sink returned ``SUCCESS`` for a batch's findings, so a sink
must return ``SUCCESS`` only once the findings are delivered or durably spooled.
"""

from __future__ import annotations

import functools
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from enum import Enum
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, field_validator

from agent.findings import Finding, Severity

log = logging.getLogger(__name__)


class ExportResult(Enum):
    SUCCESS = 0
    FAILURE = 1  # nothing of this call is known delivered; the caller retries the whole call


class SinkConfigurationError(RuntimeError):
    """Raised by ``export()`` when retrying cannot help (rejected credentials, wrong URL).

    The delivery layer stops calling that sink, keeps its findings in the spool
    and reports the reason, instead of retrying forever or dropping findings.
    """


class SinkOptions(BaseModel):
    """Options every sink has; each sink subclasses this with its own, with ``type`` a Literal."""

    model_config = ConfigDict(extra="forbid")
    type: str
    name: str | None = None
    min_severity: Severity = Severity.INFORMATIONAL

    @field_validator("min_severity", mode="before")
    @classmethod
    def _severity(cls, v: Any) -> Severity:
        return Severity.parse(v)


class Sink(ABC):
    """Base class of all sinks."""

    type_name: ClassVar[str]
    Options: ClassVar[type[SinkOptions]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Give every sink OpenTelemetry's exporter lifecycle without each one re-implementing it:
        ``shutdown()`` runs once however often it is called, and ``export()`` after it is a FAILURE
        that touches nothing (a closed sink must not reconnect and deliver behind the caller's back)."""
        super().__init_subclass__(**kwargs)
        if "export" in vars(cls):
            cls.export = _refuse_after_shutdown(vars(cls)["export"])  # type: ignore[method-assign]
        if "shutdown" in vars(cls):
            cls.shutdown = _run_once(vars(cls)["shutdown"])  # type: ignore[method-assign]

    def __init__(self, options: SinkOptions):
        self.options = options
        self.name = options.name or options.type

    def accepts(self, finding: Finding) -> bool:
        return finding.severity >= self.options.min_severity

    @abstractmethod
    def export(self, findings: Sequence[Finding]) -> ExportResult:
        """Deliver (or durably spool) these findings. Already filtered by ``min_severity``."""

    def force_flush(self, timeout_s: float = 10.0) -> bool:
        """Push out anything buffered; True when nothing is left pending."""
        return True

    def reclaim(self) -> list[Finding]:
        """Findings this sink returned ``SUCCESS`` for but has since learnt were not received.

        For transports without acknowledgement (plain TCP syslog): a receiver that
        rejects a session shows it only after the bytes were written. The delivery
        layer calls this after every export and flush and spools what it gets, to be
        sent again. Each finding is handed back once. Default: none.
        """
        return []

    def shutdown(self) -> None:
        """Flush and release resources; no export after this."""
        self._shut_down = True


def _refuse_after_shutdown(export: Any) -> Any:
    @functools.wraps(export)
    def guarded(self: Sink, findings: Sequence[Finding]) -> ExportResult:
        if getattr(self, "_shut_down", False):
            log.warning("sink %s: export() after shutdown(); %d findings not sent", self.name, len(findings))
            return ExportResult.FAILURE
        return export(self, findings)

    return guarded


def _run_once(shutdown: Any) -> Any:
    @functools.wraps(shutdown)
    def once(self: Sink) -> None:
        if getattr(self, "_shut_down", False):
            return
        self._shut_down = True
        shutdown(self)

    return once


def registry() -> dict[str, type[Sink]]:
    """Every concrete sink under ``connectors/``, by its ``type_name``."""
    from agent.plugins import discover

    return discover("connectors", Sink, "type_name", skip=frozenset({"sink"}))
