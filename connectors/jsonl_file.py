"""JSONL file sink: one OCSF Detection Finding per line, appended and fsync'd.

The contract's default output (``findings.ocsf.jsonl``). ``export`` returns
SUCCESS only after the lines are on disk, so offsets are never committed for
findings that a power cut could lose.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from agent.findings import Finding
from agent.ocsf import to_ocsf
from connectors._append import append_whole_lines
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
        # Unbuffered: a write that fails must leave nothing behind in a buffer that a later write or
        # close() would flush (a torn line, or a finding written twice once it is retried).
        self._fh = open(self.path, "ab", buffering=0)  # noqa: SIM115 - kept open for the sink's lifetime

    def export(self, findings: Sequence[Finding]) -> ExportResult:
        if not findings:
            return ExportResult.SUCCESS
        data = b"".join(json.dumps(to_ocsf(f), separators=(",", ":")).encode() + b"\n" for f in findings)
        ok = append_whole_lines(self._fh, self.path, data, self.options.fsync, self.name)
        return ExportResult.SUCCESS if ok else ExportResult.FAILURE

    def force_flush(self, timeout_s: float = 10.0) -> bool:
        return True  # unbuffered, and fsync'd per export when fsync is on

    def shutdown(self) -> None:
        self._fh.close()
