"""Findings rendered as OCSF Detection Findings, checked field by field against CONTRACT.md
and validated with the pydantic-ocsf models of the OCSF schema."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agent.findings import Finding, Severity
from agent.ocsf import to_ocsf


def sample(**kw) -> Finding:
    base = dict(family="extraction", detector="extraction", title="Model extraction by tenant-7",
                severity=Severity.HIGH, actor="tenant-7", model="digits-cnn", related_ids=("req-1", "req-2"),
                window="tenant-7:1763877600", evidence={"shapiro_w": np.float32(0.71), "n": np.int64(300),
                                                        "bad": float("nan")},
                attacks=("AML.T0024.002",), time_ms=1763877600250, confidence=0.93)
    base.update(kw)
    return Finding(**base)


def test_contract_fields() -> None:
    o = to_ocsf(sample())
    assert (o["class_uid"], o["category_uid"], o["activity_id"], o["type_uid"]) == (2004, 2, 1, 200401)
    assert o["severity_id"] == 4 and o["severity"] == "High"
    assert o["time"] == 1763877600250
    assert o["metadata"]["version"].startswith("1.") and o["metadata"]["product"]["name"] == "inferwatch"
    fi = o["finding_info"]
    assert fi["types"][0] == "extraction"
    assert fi["analytic"]["name"] == "extraction"
    assert fi["attacks"][0]["technique"] == {"uid": "AML.T0024", "name": "Exfiltration via AI Inference API"}
    assert fi["attacks"][0]["sub_technique"]["uid"] == "AML.T0024.002"
    assert fi["attacks"][0]["tactic"]["uid"] == "AML.TA0010"
    assert o["actor"]["user"]["uid"] == "tenant-7"
    assert o["resources"][0]["name"] == "digits-cnn"
    assert [e["uid"] for e in fi["related_events"]] == ["req-1", "req-2"]
    assert o["evidences"][0]["data"] == {"shapiro_w": pytest.approx(0.71), "n": 300, "bad": None}
    json.dumps(o, allow_nan=False)  # strictly valid JSON


def test_uid_is_stable_per_detector_actor_model_window() -> None:
    a, b = sample(), sample(time_ms=1, related_ids=("other",))
    assert a.uid == b.uid
    assert sample(window="tenant-7:1763877700").uid != a.uid
    assert sample(actor="tenant-8").uid != a.uid


def test_plain_drift_has_no_attacks() -> None:
    o = to_ocsf(sample(family="drift", detector="drift_vae", attacks=(), actor=None))
    assert o["finding_info"]["attacks"] == []
    assert "actor" not in o


def test_related_ids_capped_at_1000() -> None:
    f = sample(related_ids=tuple(f"r{i}" for i in range(5000)))
    assert len(to_ocsf(f)["finding_info"]["related_events"]) == 1000


def test_unknown_family_or_technique_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        sample(family="weather")
    with pytest.raises(KeyError):
        sample(attacks=("AML.T9999",))


def validate_ocsf(obj: dict) -> None:
    """Validate with pydantic-ocsf's Detection Finding model (latest schema it ships)."""
    from ocsf.v1_7_0.events import DetectionFinding

    obj = dict(obj)
    obj["metadata"] = {**obj["metadata"], "version": "1.7.0"}  # the library ships 1.7.0; 2004 is unchanged in 1.8
    DetectionFinding.model_validate(obj)


@pytest.mark.parametrize("sev", list(Severity))
def test_validates_against_ocsf_schema(sev: Severity) -> None:
    validate_ocsf(to_ocsf(sample(severity=sev)))
    validate_ocsf(to_ocsf(sample(family="drift", detector="drift_vae", attacks=(), actor=None, model=None)))


def test_schema_validation_rejects_broken_objects() -> None:
    """The validator above is not a rubber stamp: a finding without uid or with a bad type_uid fails."""
    from pydantic import ValidationError

    o = to_ocsf(sample())
    del o["finding_info"]["uid"]
    with pytest.raises(ValidationError):
        validate_ocsf(o)
    o = to_ocsf(sample())
    o["type_uid"] = 999
    with pytest.raises(ValidationError):
        validate_ocsf(o)
