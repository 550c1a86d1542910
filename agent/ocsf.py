"""Finding -> OCSF 1.x Detection Finding (class 2004), the canonical wire form.

Every other format (ECS, CEF, LEEF) is derived from the same :class:`Finding`,
but this is the one written to files and the Kafka alert topic. Field placement
follows ``CONTRACT.md`` ("Findings"): family in ``finding_info.types[0]``,
detector in ``finding_info.analytic.name``, ATLAS in ``finding_info.attacks``,
client in ``actor.user.uid``, model in ``resources[0].name``, record ids in
``finding_info.related_events[].uid``, evidence in ``evidences[0].data``.
"""

from __future__ import annotations

from typing import Any

from agent import __version__, signing
from agent.atlas import ATLAS_VERSION, technique
from agent.findings import Finding

OCSF_VERSION = "1.8.0"
CLASS_UID = 2004
CATEGORY_UID = 2
ACTIVITY_CREATE = 1
PRODUCT = {"name": "inferwatch", "vendor_name": "inferwatch", "version": __version__}

_ANALYTIC_TYPES = {"statistical": (3, "Statistical"), "learning": (4, "Learning")}


def _confidence(score: float | None) -> dict[str, Any]:
    if score is None:
        return {}
    cid = 3 if score >= 0.8 else 2 if score >= 0.5 else 1
    return {
        "confidence_id": cid,
        "confidence": {1: "Low", 2: "Medium", 3: "High"}[cid],
        "confidence_score": round(score * 100),
    }


def attack_objects(finding: Finding) -> list[dict[str, Any]]:
    """One OCSF ``attack`` object per ATLAS technique, sub-technique split out."""
    out = []
    for uid in finding.attacks:
        t = technique(uid)
        obj: dict[str, Any] = {
            "version": ATLAS_VERSION,
            "tactic": {"uid": t.tactic_uid, "name": t.tactic_name},
        }
        if t.parent_uid:
            parent = technique(t.parent_uid)
            obj["technique"] = {"uid": parent.uid, "name": parent.name}
            obj["sub_technique"] = {"uid": t.uid, "name": t.name}
        else:
            obj["technique"] = {"uid": t.uid, "name": t.name}
        out.append(obj)
    return out


def to_ocsf(finding: Finding) -> dict[str, Any]:
    """Render a finding as an OCSF Detection Finding object (a plain dict)."""
    type_id, type_name = _ANALYTIC_TYPES[finding.analytic_type]
    event: dict[str, Any] = {
        "class_uid": CLASS_UID,
        "class_name": "Detection Finding",
        "category_uid": CATEGORY_UID,
        "category_name": "Findings",
        "activity_id": ACTIVITY_CREATE,
        "activity_name": "Create",
        "type_uid": CLASS_UID * 100 + ACTIVITY_CREATE,
        "type_name": "Detection Finding: Create",
        "severity_id": int(finding.severity),
        "severity": finding.severity.label,
        "status_id": 1,
        "status": "New",
        "is_alert": True,
        "time": finding.time_ms,
        "message": finding.message or finding.title,
        "metadata": {
            "version": OCSF_VERSION,
            "product": PRODUCT,
            "uid": finding.uid,
        },
        "finding_info": {
            "uid": finding.uid,
            "title": finding.title,
            "desc": finding.message or finding.title,
            "types": [finding.family],
            "created_time": finding.time_ms,
            "analytic": {"name": finding.detector, "type_id": type_id, "type": type_name},
            "attacks": attack_objects(finding),
            "related_events": [{"uid": rid} for rid in finding.related_ids],
        },
        "evidences": [{"data": finding.evidence}],
        **_confidence(finding.confidence),
    }
    if finding.actor is not None:
        event["actor"] = {"user": {"uid": finding.actor}}
    if finding.model is not None:
        event["resources"] = [{"name": finding.model, "type": "AI Model"}]
    return signing.apply(event)  # adds unmapped.inferwatch.signature when `signing:` is configured
