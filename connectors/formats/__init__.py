"""SIEM renderings of a finding: OCSF JSON, Elastic ECS JSON, ArcSight CEF, QRadar LEEF.

Each format is a pure function ``render(finding, **opts) -> bytes`` in its own
module, so sinks choose one by name (``format: cef``) and tests can check each
against its specification in isolation. :func:`render` dispatches by name.

All output is UTF-8. Text decoded from JSON input may hold a lone surrogate
(``"\\udc80"`` is valid JSON but not encodable); it is written as ``?`` so that
one odd client id cannot make a sink fail forever.
"""

from __future__ import annotations

from collections.abc import Callable

from agent.findings import Finding
from connectors.formats import cef, ecs, leef, ocsf_json

RENDERERS: dict[str, Callable[..., bytes]] = {
    "ocsf": ocsf_json.render,
    "ecs": ecs.render,
    "cef": cef.render,
    "leef": leef.render,
}


def render(format_name: str, finding: Finding, **opts: object) -> bytes:
    """Render ``finding`` in the named format (``ocsf``, ``ecs``, ``cef`` or ``leef``)."""
    try:
        renderer = RENDERERS[format_name]
    except KeyError:
        raise ValueError(f"unknown finding format {format_name!r}; expected one of {', '.join(RENDERERS)}") from None
    return renderer(finding, **opts)
