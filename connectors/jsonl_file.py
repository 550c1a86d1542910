"""JSONL file sink: one OCSF Detection Finding per line, appended and fsync'd.

The contract's default output (``findings.ocsf.jsonl``). ``export`` returns
SUCCESS only after the lines are on disk, so offsets are never committed for
findings that a power cut could lose.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from agent.findings import Finding
from agent.ocsf import to_ocsf
from connectors.sink import ExportResult, Sink, SinkOptions

log = logging.getLogger(__name__)


class JsonlFileOptions(SinkOptions):
    type: Literal["jsonl"] = "jsonl"
    path: Path
    fsync: bool = True


class JsonlFileSink(Sink):
    type_name = "jsonl"
    Options = JsonlFileOptions

    def __init__(self, options: JsonlFileOptions):
        super().__init__(options)
        self.path = options.path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Unbuffered: a write that fails must leave nothing behind in a buffer that a later write or
        # close() would flush (a torn line, or a finding written twice once it is retried).
        self._fh = open(self.path, "ab", buffering=0)  # noqa: SIM115 - kept open for the sink's lifetime

    def export(self, findings: Sequence[Finding]) -> ExportResult:
        if not findings:
            return ExportResult.SUCCESS
        data = b"".join(json.dumps(to_ocsf(f), separators=(",", ":")).encode() + b"\n" for f in findings)
        start = self._end()
        try:
            view = memoryview(data)
            while view:
                view = view[self._fh.write(view):]
            if self.options.fsync:
                os.fsync(self._fh.fileno())
        except OSError as error:
            self._truncate(start)
            log.warning("sink %s: cannot append to %s: %s", self.name, self.path, error)
            return ExportResult.FAILURE
        return ExportResult.SUCCESS

    def _end(self) -> int | None:
        """Current size of a regular file (None for a device such as /dev/stdout)."""
        try:
            return self._fh.seek(0, os.SEEK_END) if self.path.is_file() else None
        except OSError:
            return None

    def _truncate(self, size: int | None) -> None:
        """Cut a partly written batch off, so the retry appends whole lines only."""
        if size is None:
            return
        try:
            self._fh.truncate(size)
        except OSError as error:
            log.error("sink %s: %s may end in a partial line (truncate failed: %s)", self.name, self.path, error)

    def force_flush(self, timeout_s: float = 10.0) -> bool:
        return True  # unbuffered, and fsync'd per export when fsync is on

    def shutdown(self) -> None:
        self._fh.close()
