"""Finding -> IBM QRadar Log Event Extended Format (LEEF) 2.0 line.

``LEEF:2.0|Vendor|Product|Version|EventID|Delimiter|key=value<delim>key=value``.
The delimiter is a tab by default, written in the header as the hex form
``x09`` (LEEF 2.0 allows a single character or ``0x``/``x`` plus 1-4 hex
digits; a literal tab in the header is invisible and easily mangled).

LEEF defines no escape sequences: the IBM guide only says keys and values
should avoid the delimiter, ``|`` and line breaks. A client id or evidence
string can contain anything, so values are escaped the CEF way, which QRadar
shows verbatim and a parser can undo: ``\\`` -> ``\\\\``, newline -> ``\\n``,
CR -> ``\\r``, tab -> ``\\t``, and a non-tab delimiter ``D`` -> ``\\D``. A
rendered finding is therefore always one line whose attributes split cleanly
on the delimiter. ``=`` needs no escape: LEEF splits each attribute at its
first ``=``, and keys are ours. The EventID (QRadar's QID map key) is the
detector name reduced to ``[A-Za-z0-9_.:-]``, since a header field cannot be
escaped at all.

Predefined LEEF keys used: ``devTime``/``devTimeFormat``, ``sev`` (1-10),
``cat`` (family), ``usrName`` (actor), ``resource`` (model); the rest are
custom keys named for what they hold.
"""

from __future__ import annotations

import re

from agent import __version__
from agent.atlas import technique
from agent.findings import Finding
from connectors.formats.cef import DEFAULT_MAX_RELATED_IDS, SEVERITY_0_10
from connectors.formats.ecs import iso8601_ms
from connectors.formats.ocsf_json import dumps_compact

DEFAULT_VENDOR = "inferwatch"
DEFAULT_PRODUCT = "inferwatch"
DEFAULT_DELIMITER = "\t"
DEV_TIME_FORMAT = "yyyy-MM-dd'T'HH:mm:ss.SSSZ"  # Java SimpleDateFormat, as QRadar reads devTime

_FORBIDDEN_DELIMITERS = set("=\\|\r\n ") | set("0123456789abcdefABCDEFxX")
_EVENT_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_.:\-]")
_HEADER_UNSAFE = re.compile(r"[|\r\n\t]")


def check_delimiter(delimiter: str) -> str:
    """Return the delimiter if LEEF can use it, else raise saying what to use instead."""
    usable = (
        len(delimiter) == 1
        and delimiter not in _FORBIDDEN_DELIMITERS
        and (delimiter == "\t" or delimiter.isprintable())
        and ord(delimiter) <= 0xFFFF  # LEEF names a delimiter in at most 4 hex digits
    )
    if not usable:
        raise ValueError(
            f"LEEF delimiter {delimiter!r} cannot be used: it must be one character that is not "
            "'=', '\\\\', '|', a space, a line break, a hex digit or 'x' (tab, '^' or ';' are usual)"
        )
    return delimiter


def delimiter_header_field(delimiter: str) -> str:
    """How the delimiter is named in the header: printable as itself, else ``xHH``."""
    return delimiter if delimiter.isprintable() else f"x{ord(delimiter):02X}"


def escape_value(value: str, delimiter: str = DEFAULT_DELIMITER) -> str:
    """Escape an attribute value so it holds no delimiter and no line break (see module doc)."""
    out = value.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    if delimiter != "\t":
        out = out.replace(delimiter, "\\" + delimiter)
    return out


def header_field(value: str) -> str:
    """A header field cannot be escaped in LEEF: ``|``, tabs and line breaks become spaces."""
    return _HEADER_UNSAFE.sub(" ", value)


def event_id(detector: str) -> str:
    """QRadar's QID key: the detector name with anything outside ``[A-Za-z0-9_.:-]`` as ``_``."""
    return _EVENT_ID_UNSAFE.sub("_", detector) or "finding"


def dev_time(time_ms: int) -> str:
    """``2026-11-23T11:16:15.123+0000``: the :data:`DEV_TIME_FORMAT` rendering, in UTC."""
    return iso8601_ms(time_ms).removesuffix("Z") + "+0000"


def attribute_pairs(finding: Finding, max_related_ids: int = DEFAULT_MAX_RELATED_IDS) -> list[tuple[str, str]]:
    """The ``(key, unescaped value)`` attributes, in output order."""
    techniques = [technique(uid) for uid in finding.attacks]
    pairs: list[tuple[str, str]] = [
        ("devTime", dev_time(finding.time_ms)),
        ("devTimeFormat", DEV_TIME_FORMAT),
        ("sev", str(SEVERITY_0_10[finding.severity])),
        ("cat", finding.family),
    ]
    if finding.actor is not None:
        pairs.append(("usrName", finding.actor))
    if finding.model is not None:
        pairs.append(("resource", finding.model))
    pairs += [
        ("findingUid", finding.uid),
        ("detector", finding.detector),
        ("title", finding.title),
        ("msg", finding.message or finding.title),
    ]
    if techniques:
        pairs += [
            ("atlasTechniques", ",".join(t.uid for t in techniques)),
            ("atlasTactics", ",".join(dict.fromkeys(t.tactic_uid for t in techniques))),
        ]
    if finding.confidence is not None:
        pairs.append(("confidence", str(round(finding.confidence * 100))))
    pairs += [
        ("relatedEventCount", str(len(finding.related_ids))),
        ("relatedEventIds", dumps_compact(list(finding.related_ids[:max_related_ids]))),
        ("evidence", dumps_compact(finding.evidence)),
    ]
    return pairs


def render_str(
    finding: Finding,
    *,
    vendor: str = DEFAULT_VENDOR,
    product: str = DEFAULT_PRODUCT,
    version: str = __version__,
    delimiter: str = DEFAULT_DELIMITER,
    max_related_ids: int = DEFAULT_MAX_RELATED_IDS,
) -> str:
    """The finding as one LEEF 2.0 line (no trailing newline)."""
    check_delimiter(delimiter)
    header = "|".join(
        (
            header_field(vendor),
            header_field(product),
            header_field(version),
            event_id(finding.detector),
            delimiter_header_field(delimiter),
        )
    )
    attributes = delimiter.join(
        f"{key}={escape_value(value, delimiter)}" for key, value in attribute_pairs(finding, max_related_ids)
    )
    return f"LEEF:2.0|{header}|{attributes}"


def render(finding: Finding, **opts: object) -> bytes:
    """:func:`render_str` as UTF-8 bytes (what a syslog sink puts on the wire)."""
    return render_str(finding, **opts).encode("utf-8", "replace")  # type: ignore[arg-type]
