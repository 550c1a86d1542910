"""Stdout sink: findings on standard output, for containers whose log shipper reads stdout.

``format: ocsf`` writes one compact OCSF Detection Finding JSON object per
line (what Fluent Bit / Vector / a Kubernetes log pipeline can parse as
JSON); ``format: summary`` writes one human line per finding, for a terminal::

    2026-11-23T11:16:15.123Z HIGH evasion/adv-detector actor=tenant-7 model=digits-cnn AML.T0015 \
records=req-81,req-82 (+3) uid=iw-... Adversarial input

Lines are written and flushed before ``export`` returns; a closed or broken
stdout is a FAILURE, so the delivery layer spools instead of losing findings.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Literal

from agent.findings import Finding
from connectors.formats import ocsf_json
from connectors.formats.ecs import iso8601_ms
from connectors.sink import ExportResult, Sink, SinkOptions

log = logging.getLogger(__name__)

_SHOWN_IDS = 3


def summary_line(finding: Finding) -> str:
    """One human-readable line (no newline inside: user-controlled text is escaped)."""
    ids = ",".join(finding.related_ids[:_SHOWN_IDS])
    if len(finding.related_ids) > _SHOWN_IDS:
        ids += f" (+{len(finding.related_ids) - _SHOWN_IDS})"
    parts = [
        iso8601_ms(finding.time_ms),
        finding.severity.name,
        f"{finding.family}/{finding.detector}",
        f"actor={finding.actor or '-'}",
        f"model={finding.model or '-'}",
    ]
    if finding.attacks:
        parts.append(",".join(finding.attacks))
    parts += [f"records={ids or '-'}", f"uid={finding.uid}", finding.title]
    return " ".join(parts).replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")


class StdoutOptions(SinkOptions):
    type: Literal["stdout"] = "stdout"
    format: Literal["ocsf", "summary"] = "ocsf"


class StdoutSink(Sink):
    type_name = "stdout"
    Options = StdoutOptions

    def __init__(self, options: StdoutOptions):
        super().__init__(options)
        self.options: StdoutOptions = options

    def render(self, finding: Finding) -> str:
        if self.options.format == "summary":
            return summary_line(finding)
        return ocsf_json.render(finding).decode("utf-8")

    def export(self, findings: Sequence[Finding]) -> ExportResult:
        lines = []
        for f in findings:
            try:
                lines.append(self.render(f) + "\n")
            except (ValueError, TypeError) as exc:
                log.error("sink %s: finding %s cannot be rendered and is dropped: %s", self.name, f.uid, exc)
        try:
            out = sys.stdout  # looked up per call: tests and the CLI may swap it
            out.write("".join(lines))
            out.flush()
        except (OSError, ValueError) as exc:  # ValueError: write to a closed file
            log.warning("sink %s: cannot write to stdout: %s", self.name, exc)
            return ExportResult.FAILURE
        return ExportResult.SUCCESS
