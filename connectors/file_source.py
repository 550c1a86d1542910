"""File source: replay JSONL files of native records as if they were Kafka topics.

For audits of captured traffic and for running without a broker. Each file is
one "partition" of the topic named after its stream; the line number is the
offset, and commits are kept in ``<state dir>/file-offsets.json`` so a rerun
continues where the last one stopped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from agent.records import RawRecord

TP = tuple[str, int]


class FileSource:
    def __init__(self, files: Mapping[str, Path], offsets_path: Path, max_poll_records: int = 2000):
        """``files`` maps a topic name (e.g. ``inferwatch.inference``) to a JSONL file."""
        self.files = dict(files)
        self.offsets_path = offsets_path
        self.max_poll_records = max_poll_records
        self._committed: dict[str, int] = {}
        if offsets_path.is_file():
            self._committed = json.loads(offsets_path.read_text())
        self._handles = {}
        self._position: dict[str, int] = {}
        for topic, path in self.files.items():
            fh = open(path, "rb")  # noqa: SIM115 - kept open for the source's lifetime
            start = self._committed.get(str(path), 0)
            for _ in range(start):
                fh.readline()
            self._handles[topic] = fh
            self._position[topic] = start

    def poll(self) -> list[RawRecord]:
        out: list[RawRecord] = []
        for topic, fh in self._handles.items():
            while len(out) < self.max_poll_records:
                line = fh.readline()
                if not line:
                    break
                offset = self._position[topic]
                self._position[topic] += 1
                if line.strip():
                    out.append(RawRecord(topic=topic, partition=0, offset=offset, value=line.rstrip(b"\r\n")))
        return out

    def commit(self, next_offsets: Mapping[TP, int]) -> None:
        for (topic, _), off in next_offsets.items():
            self._committed[str(self.files[topic])] = off
        self.offsets_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.offsets_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._committed))
        tmp.replace(self.offsets_path)

    def seek(self, offsets: Mapping[TP, int]) -> None:
        for (topic, _), off in offsets.items():
            fh = self._handles[topic]
            fh.seek(0)
            for _ in range(off):
                fh.readline()
            self._position[topic] = off

    def resume(self, checkpointed: Mapping[TP, int]) -> None:
        """Skip lines a detector checkpoint already reflects but whose commit did not happen (crash between)."""
        ahead = {(t, p): o for (t, p), o in checkpointed.items() if t in self._handles and o > self._position[t]}
        if ahead:
            self.seek(ahead)

    def on_revoke(self, callback: object) -> None:
        """Files are never revoked: one reader owns them."""

    def assignment(self) -> set[TP]:
        return {(t, 0) for t in self.files}

    def lag(self) -> dict[TP, int]:
        out = {}
        for topic, path in self.files.items():
            with open(path, "rb") as fh:
                total = sum(1 for _ in fh)
            out[(topic, 0)] = max(0, total - self._committed.get(str(path), 0))
        return out

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
