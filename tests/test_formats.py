"""SIEM renderings (OCSF JSON, ECS, CEF, LEEF) checked against their specs.

The CEF and LEEF checks use small reference parsers written here from the
specifications (not from our renderers): for arbitrary findings, with any
unicode, pipes, equals signs, backslashes and line breaks in titles, actors,
ids and evidence, the rendered line must be one line and parse back into the
finding's own values.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.atlas import TECHNIQUES, technique
from agent.findings import FAMILIES, Finding, Severity
from agent.ocsf import to_ocsf
from connectors import formats
from connectors.formats import cef, ecs, leef, ocsf_json

# -- strategies -------------------------------------------------------------

# Characters that break naive SIEM formats, mixed into otherwise arbitrary text.
_nasty = st.sampled_from(["|", "=", "\\", "\n", "\r", "\t", " ", "^", ";", "\\n", "\\=", "é", "🙂", "\u2028"])
text = st.lists(st.one_of(st.text(max_size=8), _nasty), max_size=8).map("".join)
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53),
                      st.floats(allow_nan=False, allow_infinity=False), text)
evidence = st.dictionaries(text, st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3)
                                               | st.dictionaries(text, inner, max_size=3), max_leaves=8),
                           max_size=5)


@st.composite
def findings(draw: st.DrawFn) -> Finding:
    return Finding(
        family=draw(st.sampled_from(FAMILIES)),
        detector=draw(text),
        title=draw(text),
        severity=draw(st.sampled_from(list(Severity))),
        actor=draw(st.none() | text),
        model=draw(st.none() | text),
        related_ids=tuple(draw(st.lists(text, max_size=12))),
        window=draw(text),
        evidence=draw(evidence),
        attacks=tuple(draw(st.lists(st.sampled_from(sorted(TECHNIQUES)), max_size=3, unique=True))),
        time_ms=draw(st.integers(0, 4_102_444_800_000)),  # 1970 .. 2100
        confidence=draw(st.none() | st.floats(0, 1)),
        message=draw(text),
        analytic_type=draw(st.sampled_from(["statistical", "learning"])),
    )


def example_finding(**changes: Any) -> Finding:
    values: dict[str, Any] = dict(
        family="extraction", detector="query-flood", title="Model extraction | by tenant=7",
        severity=Severity.HIGH, actor="tenant\\7", model="digits-cnn", related_ids=("req-1", "req-2"),
        window="2026-11-23T11:00", evidence={"queries": 140, "threshold": 0.5},
        attacks=("AML.T0024.002",), time_ms=1763877600250, confidence=0.93,
        message="line one\nline two=2\r",
    )
    values.update(changes)
    return Finding(**values)


# -- reference parsers (from the specs) --------------------------------------

_CEF_EXTENSION_ESCAPES = {"\\": "\\", "=": "=", "n": "\n", "r": "\r"}
_KEY_CHAR = re.compile(r"[A-Za-z0-9_]")


def parse_cef(line: str) -> tuple[list[str], dict[str, str]]:
    """CEF line -> (7 header fields incl. ``CEF:0``, extension dict), per the CEF spec."""
    header: list[str] = []
    field: list[str] = []
    i = 0
    while len(header) < 7:
        ch = line[i]
        if ch == "\\":
            assert line[i + 1] in "\\|", f"bad header escape {line[i:i + 2]!r}"
            field.append(line[i + 1])
            i += 2
        elif ch == "|":
            header.append("".join(field))
            field = []
            i += 1
        else:
            field.append(ch)
            i += 1
    extension = line[i:]
    # Unescape into (char, was_escaped) so only unescaped '=' separate pairs.
    chars: list[tuple[str, bool]] = []
    j = 0
    while j < len(extension):
        if extension[j] == "\\":
            escape = extension[j + 1]
            assert escape in _CEF_EXTENSION_ESCAPES, f"bad extension escape \\{escape!r}"
            chars.append((_CEF_EXTENSION_ESCAPES[escape], True))
            j += 2
        else:
            chars.append((extension[j], False))
            j += 1
    equals = [k for k, (c, escaped) in enumerate(chars) if c == "=" and not escaped]
    keys: list[tuple[int, int, str]] = []  # (key start, '=' index, key)
    for eq in equals:
        start = eq
        while start > 0 and not chars[start - 1][1] and _KEY_CHAR.match(chars[start - 1][0]):
            start -= 1
        assert start < eq, "an unescaped '=' without a key"
        assert start == 0 or chars[start - 1] == (" ", False), "pairs must be separated by one space"
        keys.append((start, eq, "".join(c for c, _ in chars[start:eq])))
    pairs: dict[str, str] = {}
    for n, (_, eq, key) in enumerate(keys):
        end = keys[n + 1][0] - 1 if n + 1 < len(keys) else len(chars)
        assert key not in pairs, f"duplicate key {key}"
        pairs[key] = "".join(c for c, _ in chars[eq + 1:end])
    return header, pairs


def parse_leef(line: str) -> tuple[list[str], str, dict[str, str]]:
    """LEEF 2.0 line -> (header fields, delimiter, attributes), undoing our documented escapes."""
    parts = line.split("|", 6)
    assert parts[0] == "LEEF:2.0" and len(parts) == 7, line
    named = parts[5]
    if re.fullmatch(r"(0x|x)[0-9A-Fa-f]{1,4}", named):
        delimiter = chr(int(named.split("x", 1)[1], 16))
    else:
        assert len(named) == 1, f"delimiter field {named!r}"
        delimiter = named
    escapes = {"\\": "\\", "n": "\n", "r": "\r", "t": "\t", delimiter: delimiter}
    attributes: dict[str, str] = {}
    current: list[str] = []
    raw = parts[6]
    items: list[str] = []
    i = 0
    while i < len(raw):
        if raw[i] == "\\":
            assert raw[i + 1] in escapes, f"bad LEEF escape \\{raw[i + 1]!r}"
            current.append(escapes[raw[i + 1]])
            i += 2
        elif raw[i] == delimiter:
            items.append("".join(current))
            current = []
            i += 1
        else:
            current.append(raw[i])
            i += 1
    items.append("".join(current))
    for item in items:
        key, sep, value = item.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", key), f"bad attribute {item!r}"
        assert key not in attributes, f"duplicate key {key}"
        attributes[key] = value
    return parts[1:5], delimiter, attributes


def _header_text(value: str) -> str:
    return value.replace("\n", " ").replace("\r", " ")


# -- OCSF JSON ----------------------------------------------------------------

@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(findings())
def test_ocsf_json_round_trips_to_the_ocsf_object(finding: Finding) -> None:
    data = ocsf_json.render(finding)
    assert b"\n" not in data and b": " not in data.split(b'"')[0]  # one compact line
    assert json.loads(data) == to_ocsf(finding)


def test_ocsf_json_is_compact_utf8() -> None:
    data = ocsf_json.render(example_finding(actor="tenant-é"))
    assert '"uid":"tenant-é"'.encode() in data
    assert b", " not in data and b'": ' not in data


# -- ECS ----------------------------------------------------------------------

@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(findings())
def test_ecs_document_carries_the_finding(finding: Finding) -> None:
    doc = json.loads(ecs.render(finding))
    assert doc == ecs.to_ecs(finding)
    assert doc["event"]["kind"] == "alert"
    assert doc["event"]["category"] == ["intrusion_detection"]
    assert doc["event"]["type"] == ["info"]
    assert doc["event"]["id"] == finding.uid
    assert doc["event"]["severity"] == int(finding.severity)
    stamp = datetime.strptime(doc["@timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert round(stamp.timestamp() * 1000) == finding.time_ms
    assert doc["rule"]["id"] == finding.detector and doc["rule"]["ruleset"] == "inferwatch"
    assert doc["message"] == (finding.message or finding.title)
    assert doc["inferwatch"]["evidence"] == finding.evidence
    assert doc["inferwatch"]["related_events"] == list(finding.related_ids)
    if finding.actor is None:
        assert "user" not in doc
    else:
        assert doc["user"]["id"] == finding.actor and doc["related"]["user"] == [finding.actor]
    if finding.attacks:
        threat = doc["threat"]
        assert threat["framework"] == "MITRE ATLAS"
        named = set(threat["technique"]["id"]) | set(threat["technique"].get("subtechnique", {}).get("id", []))
        assert set(finding.attacks) <= named
        assert {technique(uid).tactic_uid for uid in finding.attacks} == set(threat["tactic"]["id"])
    else:
        assert "threat" not in doc


def test_ecs_splits_atlas_sub_technique_from_its_parent() -> None:
    doc = ecs.to_ecs(example_finding(attacks=("AML.T0024.002", "AML.T0015")))
    assert doc["threat"] == {
        "framework": "MITRE ATLAS",
        "tactic": {"id": ["AML.TA0010", "AML.TA0007"], "name": ["Exfiltration", "Defense Evasion"]},
        "technique": {
            "id": ["AML.T0024", "AML.T0015"],
            "name": ["Exfiltration via AI Inference API", "Evade AI Model"],
            "subtechnique": {"id": ["AML.T0024.002"], "name": ["Extract AI Model"]},
        },
    }
    assert doc["@timestamp"] == "2025-11-23T06:00:00.250Z"
    assert doc["event"]["kind"] != "signal"


# -- CEF ------------------------------------------------------------------------

def test_cef_golden_line() -> None:
    line = cef.render_str(example_finding())
    assert line == (
        "CEF:0|inferwatch|inferwatch|0.1.0|query-flood|Model extraction \\| by tenant=7|8|"
        "rt=1763877600250 externalId=" + example_finding().uid + " msg=line one\\nline two\\=2\\r "
        "cat=extraction act=alert suser=tenant\\\\7 cs1Label=model cs1=digits-cnn "
        "cs2Label=detector cs2=query-flood cs3Label=atlasTechniques cs3=AML.T0024.002 "
        "cs4Label=atlasTactics cs4=AML.TA0010 cs5Label=relatedEventIds cs5=[\"req-1\",\"req-2\"] "
        "cs6Label=evidence cs6={\"queries\":140,\"threshold\":0.5} cn1Label=confidence cn1=93 "
        "cn2Label=relatedEventCount cn2=2"
    )
    assert cef.render(example_finding()) == line.encode()


@pytest.mark.parametrize(("severity", "expected"), [(Severity.INFORMATIONAL, 1), (Severity.LOW, 3),
                                                    (Severity.MEDIUM, 5), (Severity.HIGH, 8),
                                                    (Severity.CRITICAL, 10)])
def test_cef_severity_bands(severity: Severity, expected: int) -> None:
    header, _ = parse_cef(cef.render_str(example_finding(severity=severity)))
    assert header[6] == str(expected)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(findings(), st.integers(0, 20))
def test_cef_parses_back_to_the_finding(finding: Finding, max_related: int) -> None:
    line = cef.render_str(finding, max_related_ids=max_related)
    assert "\n" not in line and "\r" not in line
    header, ext = parse_cef(line)
    assert header == ["CEF:0", "inferwatch", "inferwatch", "0.1.0", _header_text(finding.detector),
                      _header_text(finding.title), str(cef.SEVERITY_0_10[finding.severity])]
    assert ext["rt"] == str(finding.time_ms)
    assert ext["externalId"] == finding.uid
    assert ext["msg"] == (finding.message or finding.title)
    assert ext["cat"] == finding.family
    assert ext.get("suser") == finding.actor
    assert ext.get("cs1") == finding.model
    assert ext["cs2"] == finding.detector
    assert json.loads(ext["cs5"]) == list(finding.related_ids[:max_related])
    assert int(ext["cn2"]) == len(finding.related_ids)
    assert json.loads(ext["cs6"]) == finding.evidence
    if finding.attacks:
        assert ext["cs3"].split(",") == list(finding.attacks)
    labels = {ext[k]: k.removesuffix("Label") for k in ext if k.endswith("Label")}
    assert labels["detector"] == "cs2" and labels["evidence"] == "cs6"
    if finding.confidence is not None:
        assert int(ext["cn1"]) == round(finding.confidence * 100)


def test_cef_parser_rejects_unescaped_values() -> None:
    """The reference parser must be able to fail, or the property test proves nothing."""
    with pytest.raises(AssertionError):
        parse_cef("CEF:0|v|p|1|id|name|5|msg=a=b")
    with pytest.raises(AssertionError):
        parse_cef("CEF:0|v|p|1|id|name|5|msg=a\\tb")


# -- LEEF -----------------------------------------------------------------------

def test_leef_golden_line() -> None:
    line = leef.render_str(example_finding())
    header, _, rest = line.partition("|devTime=")
    assert header == "LEEF:2.0|inferwatch|inferwatch|0.1.0|query-flood|x09"
    attributes = ("devTime=" + rest).split("\t")
    assert attributes[:6] == [
        "devTime=2025-11-23T06:00:00.250+0000", "devTimeFormat=yyyy-MM-dd'T'HH:mm:ss.SSSZ",
        "sev=8", "cat=extraction", "usrName=tenant\\\\7", "resource=digits-cnn",
    ]
    assert "msg=line one\\nline two=2\\r" in attributes


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(findings(), st.sampled_from(["\t", "^", ";", "§"]))
def test_leef_parses_back_to_the_finding(finding: Finding, delimiter: str) -> None:
    line = leef.render_str(finding, delimiter=delimiter, vendor="ACME|x", product="inferwatch")
    assert "\n" not in line and "\r" not in line
    header, parsed_delimiter, attributes = parse_leef(line)
    assert parsed_delimiter == delimiter
    assert header == ["ACME x", "inferwatch", "0.1.0", leef.event_id(finding.detector)]
    assert re.fullmatch(r"[A-Za-z0-9_.:\-]+", header[3])
    assert attributes["sev"] == str(cef.SEVERITY_0_10[finding.severity])
    stamp = datetime.strptime(attributes["devTime"], "%Y-%m-%dT%H:%M:%S.%f%z")
    assert round(stamp.timestamp() * 1000) == finding.time_ms
    assert attributes["cat"] == finding.family
    assert attributes.get("usrName") == finding.actor
    assert attributes.get("resource") == finding.model
    assert attributes["findingUid"] == finding.uid
    assert attributes["detector"] == finding.detector
    assert attributes["title"] == finding.title
    assert attributes["msg"] == (finding.message or finding.title)
    assert json.loads(attributes["evidence"]) == finding.evidence
    assert json.loads(attributes["relatedEventIds"]) == list(finding.related_ids[:100])


@pytest.mark.parametrize("bad", ["", "==", "=", "|", "\\", "\n", " ", "a", "x", "7", "\x00"])
def test_leef_rejects_unusable_delimiters(bad: str) -> None:
    with pytest.raises(ValueError, match="LEEF delimiter"):
        leef.render_str(example_finding(), delimiter=bad)


def test_leef_names_non_printable_delimiters_in_hex() -> None:
    assert leef.delimiter_header_field("\t") == "x09"
    assert leef.delimiter_header_field("^") == "^"


# -- dispatch ---------------------------------------------------------------------

def test_render_by_name_and_unknown_name() -> None:
    finding = example_finding()
    assert formats.render("cef", finding) == cef.render(finding)
    assert formats.render("leef", finding, delimiter="^") == leef.render(finding, delimiter="^")
    assert json.loads(formats.render("ocsf", finding))["class_uid"] == 2004
    assert json.loads(formats.render("ecs", finding))["event"]["kind"] == "alert"
    with pytest.raises(ValueError, match="expected one of ocsf, ecs, cef, leef"):
        formats.render("xml", finding)


def test_lone_surrogates_do_not_fail_rendering() -> None:
    """Text decoded from JSON can hold a lone surrogate; the export must not crash on it."""
    finding = example_finding(title="bad\udc80id")
    for name in formats.RENDERERS:
        assert b"bad?id" in formats.render(name, finding)
