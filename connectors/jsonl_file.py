"""JSONL file sink: one OCSF Detection Finding per line, appended and fsync'd.

The contract's default output (``findings.ocsf.jsonl``). ``export`` returns
SUCCESS only after the lines are on disk, so offsets are never committed for
findings that a power cut could lose.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from agent.findings import Finding
from agent.ocsf import to_ocsf
from connectors.sink import ExportResult, Sink, SinkOptions


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
        self._fh = open(self.path, "ab")  # noqa: SIM115 - kept open for the sink's lifetime

    def export(self, findings: Sequence[Finding]) -> ExportResult:
        if not findings:
            return ExportResult.SUCCESS
        try:
            data = b"".join(json.dumps(to_ocsf(f), separators=(",", ":")).encode() + b"\n" for f in findings)
            self._fh.write(data)
            self._fh.flush()
            if self.options.fsync:
                os.fsync(self._fh.fileno())
        except OSError:
            return ExportResult.FAILURE
        return ExportResult.SUCCESS

    def force_flush(self, timeout_s: float = 10.0) -> bool:
        self._fh.flush()
        return True

    def shutdown(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            self._fh.close()
