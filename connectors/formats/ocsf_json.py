"""Finding -> OCSF JSON bytes, and the compact JSON encoding the other formats share.

OCSF is the canonical wire form (``agent.ocsf.to_ocsf``); this module only turns
that dict into compact UTF-8 bytes. ECS, CEF and LEEF embed JSON too (evidence,
related record ids) and use :func:`dumps_compact` so all four agree: no spaces,
unicode kept as is, and strict JSON. ``Finding`` already turns numpy values into
Python ones and NaN/infinity into ``null`` (Elasticsearch, Splunk and ``jq``
reject the ``NaN`` literal Python writes by default); ``allow_nan=False`` makes
any regression there fail loudly here instead of reaching a SIEM as bad JSON.
"""

from __future__ import annotations

import json
from typing import Any

from agent.findings import Finding
from agent.ocsf import to_ocsf


def dumps_compact(value: Any) -> str:
    """Compact, strict JSON text (no spaces, no NaN literal, unicode kept as is)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def render(finding: Finding) -> bytes:
    """The finding as one compact OCSF Detection Finding JSON object, UTF-8, no newline."""
    return dumps_compact(to_ocsf(finding)).encode("utf-8", "replace")
