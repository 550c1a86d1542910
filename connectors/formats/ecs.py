"""Finding -> Elastic Common Schema (ECS) document, as JSON bytes.

For Elasticsearch / Elastic Security, which understand ECS natively: the
finding is an alert (``event.kind: alert``, never ``signal``, which ECS reserves
for Elastic's own detection engine), categorised ``intrusion_detection`` /
``info``. The ATLAS technique goes into ECS's framework-neutral ``threat.*``
fields with ``threat.framework: "MITRE ATLAS"``, so Elastic's MITRE views pick
it up. What ECS has no field for (the model, the evidence, the record ids
behind the finding) lives under the ``inferwatch.*`` namespace, which ECS
leaves to the producer for custom fields.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from agent import __version__
from agent.atlas import technique
from agent.findings import Finding
from connectors.formats.ocsf_json import dumps_compact

ECS_VERSION = "8.11.0"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def iso8601_ms(time_ms: int) -> str:
    """``2026-11-23T11:16:15.123Z`` from epoch milliseconds, exactly (no float rounding)."""
    moment = _EPOCH + timedelta(milliseconds=time_ms)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def threat_fields(finding: Finding) -> dict[str, Any]:
    """ECS ``threat.*`` for the finding's ATLAS techniques; empty for plain drift.

    ECS keeps tactics, techniques and sub-techniques as parallel arrays; a
    sub-technique also contributes its parent technique, as in ATT&CK mappings.
    """
    if not finding.attacks:
        return {}
    tactics: list[tuple[str, str]] = []
    techniques: list[tuple[str, str]] = []
    subtechniques: list[tuple[str, str]] = []
    for uid in finding.attacks:
        t = technique(uid)
        tactics.append((t.tactic_uid, t.tactic_name))
        if t.parent_uid:
            parent = technique(t.parent_uid)
            techniques.append((parent.uid, parent.name))
            subtechniques.append((t.uid, t.name))
        else:
            techniques.append((t.uid, t.name))
    tactics, techniques, subtechniques = (_unique_pairs(p) for p in (tactics, techniques, subtechniques))
    technique_obj: dict[str, Any] = {
        "id": [uid for uid, _ in techniques],
        "name": [name for _, name in techniques],
    }
    if subtechniques:
        technique_obj["subtechnique"] = {
            "id": [uid for uid, _ in subtechniques],
            "name": [name for _, name in subtechniques],
        }
    return {
        "threat": {
            "framework": "MITRE ATLAS",
            "tactic": {"id": [uid for uid, _ in tactics], "name": [name for _, name in tactics]},
            "technique": technique_obj,
        }
    }


def _unique_pairs(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return list(dict.fromkeys(pairs))


def to_ecs(finding: Finding) -> dict[str, Any]:
    """The finding as an ECS document (a plain dict)."""
    message = finding.message or finding.title
    doc: dict[str, Any] = {
        "@timestamp": iso8601_ms(finding.time_ms),
        "ecs": {"version": ECS_VERSION},
        "message": message,
        "event": {
            "kind": "alert",
            "category": ["intrusion_detection"],
            "type": ["info"],
            "id": finding.uid,
            "severity": int(finding.severity),
            "reason": finding.title,
            "module": "inferwatch",
            "dataset": "inferwatch.findings",
            "provider": finding.detector,
        },
        "rule": {
            "id": finding.detector,
            "name": finding.detector,
            "description": finding.title,
            "category": finding.family,
            "ruleset": "inferwatch",
        },
        "observer": {"vendor": "inferwatch", "product": "inferwatch", "version": __version__},
        **threat_fields(finding),
        "inferwatch": {
            "finding": {
                "uid": finding.uid,
                "family": finding.family,
                "detector": finding.detector,
                "title": finding.title,
                "severity": finding.severity.label,
                "analytic_type": finding.analytic_type,
                "window": finding.window,
            },
            "related_events": list(finding.related_ids),
            "evidence": finding.evidence,
        },
    }
    if finding.confidence is not None:
        doc["inferwatch"]["finding"]["confidence"] = finding.confidence
    if finding.actor is not None:
        doc["user"] = {"id": finding.actor}
        doc["related"] = {"user": [finding.actor]}
    if finding.model is not None:
        doc["inferwatch"]["model"] = {"name": finding.model}
    return doc


def render(finding: Finding) -> bytes:
    """The ECS document as compact UTF-8 JSON, no newline."""
    return dumps_compact(to_ecs(finding)).encode("utf-8", "replace")
