"""Finding -> ArcSight Common Event Format (CEF) line.

``CEF:0|Vendor|Product|Version|SignatureID|Name|Severity|Extension``. Escaping
follows the CEF specification exactly, because SIEM parsers do: in the header
``\\`` and ``|`` are backslash-escaped; in extension values ``\\`` and ``=`` are
backslash-escaped, a newline is written ``\\n`` and a carriage return ``\\r``
(pipes are *not* escaped there). So a rendered finding is always one line,
whatever a client id or evidence string contains, and parses back to the same
values (``tests/test_formats.py`` holds the reference parser that checks it).

Where things go (standard ArcSight keys first, custom ``cs``/``cn`` pairs with
their labels for the rest):

=================  =========================================================
``rt``             finding time, epoch milliseconds (a form CEF accepts)
``externalId``     finding uid (stable: a SIEM can recognise re-sent alerts)
``msg``            message (or title)
``cat``            family (evasion, extraction, drift, poisoning, ...)
``act``            ``alert`` (inferwatch only observes, it never blocks)
``suser``          actor: the client or feedback source behind the finding
``cs1`` model      ``cs2`` detector   ``cs3`` ATLAS technique ids
``cs4`` ATLAS tactic ids           ``cs5`` related record ids (JSON array)
``cs6`` evidence (compact JSON)
``cn1`` confidence 0-100           ``cn2`` number of related record ids
=================  =========================================================
"""

from __future__ import annotations

from agent import __version__
from agent.atlas import technique
from agent.findings import Finding, Severity
from connectors.formats.ocsf_json import dumps_compact

DEFAULT_VENDOR = "inferwatch"
DEFAULT_PRODUCT = "inferwatch"
DEFAULT_MAX_RELATED_IDS = 100

# OCSF severity_id 1-5 -> CEF 0-10. CEF reads 0-3 Low, 4-6 Medium, 7-8 High,
# 9-10 Very-High; each OCSF level lands in the band of the same name.
SEVERITY_0_10: dict[Severity, int] = {
    Severity.INFORMATIONAL: 1,
    Severity.LOW: 3,
    Severity.MEDIUM: 5,
    Severity.HIGH: 8,
    Severity.CRITICAL: 10,
}

_HEADER_ESCAPES = str.maketrans({"\\": "\\\\", "|": "\\|", "\n": " ", "\r": " "})
_EXTENSION_ESCAPES = str.maketrans({"\\": "\\\\", "=": "\\=", "\n": "\\n", "\r": "\\r"})


def escape_header(value: str) -> str:
    """Escape a CEF header field: ``\\`` and ``|``; line breaks (the spec allows
    none in the header and defines no escape for them) become spaces."""
    return value.translate(_HEADER_ESCAPES)


def escape_extension(value: str) -> str:
    """Escape a CEF extension value: ``\\``, ``=``, newline as ``\\n``, CR as ``\\r``."""
    return value.translate(_EXTENSION_ESCAPES)


def extension_pairs(finding: Finding, max_related_ids: int = DEFAULT_MAX_RELATED_IDS) -> list[tuple[str, str]]:
    """The extension's ``(key, unescaped value)`` pairs, in output order.

    Related record ids are capped at ``max_related_ids`` because SIEM syslog
    receivers cap message size (QRadar and many collectors at a few KiB); the
    full count is in ``cn2``, and ``externalId`` leads to the full OCSF finding.
    """
    techniques = [technique(uid) for uid in finding.attacks]
    related = list(finding.related_ids[:max_related_ids])
    pairs: list[tuple[str, str]] = [
        ("rt", str(finding.time_ms)),
        ("externalId", finding.uid),
        ("msg", finding.message or finding.title),
        ("cat", finding.family),
        ("act", "alert"),
    ]
    if finding.actor is not None:
        pairs.append(("suser", finding.actor))
    if finding.model is not None:
        pairs += [("cs1Label", "model"), ("cs1", finding.model)]
    pairs += [("cs2Label", "detector"), ("cs2", finding.detector)]
    if techniques:
        pairs += [
            ("cs3Label", "atlasTechniques"),
            ("cs3", ",".join(t.uid for t in techniques)),
            ("cs4Label", "atlasTactics"),
            ("cs4", ",".join(dict.fromkeys(t.tactic_uid for t in techniques))),
        ]
    pairs += [
        ("cs5Label", "relatedEventIds"),
        ("cs5", dumps_compact(related)),
        ("cs6Label", "evidence"),
        ("cs6", dumps_compact(finding.evidence)),
    ]
    if finding.confidence is not None:
        pairs += [("cn1Label", "confidence"), ("cn1", str(round(finding.confidence * 100)))]
    pairs += [("cn2Label", "relatedEventCount"), ("cn2", str(len(finding.related_ids)))]
    return pairs


def render_str(
    finding: Finding,
    *,
    vendor: str = DEFAULT_VENDOR,
    product: str = DEFAULT_PRODUCT,
    version: str = __version__,
    max_related_ids: int = DEFAULT_MAX_RELATED_IDS,
) -> str:
    """The finding as one CEF line (no trailing newline)."""
    header = "|".join(
        escape_header(field)
        for field in (vendor, product, version, finding.detector, finding.title, str(SEVERITY_0_10[finding.severity]))
    )
    extension = " ".join(f"{key}={escape_extension(value)}" for key, value in extension_pairs(finding, max_related_ids))
    return f"CEF:0|{header}|{extension}"


def render(finding: Finding, **opts: object) -> bytes:
    """:func:`render_str` as UTF-8 bytes (what a syslog sink puts on the wire)."""
    return render_str(finding, **opts).encode("utf-8", "replace")  # type: ignore[arg-type]
