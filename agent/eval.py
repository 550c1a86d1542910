"""``inferwatch eval``: detection quality of every detector on the built-in scenarios.

Each family's scenarios live in ``agent/scenarios/<family>.py`` and return the
family's section of the report (CONTRACT.md, "Machine-readable reports") plus
per-variant detail. No broker is needed: detectors are driven batch by batch
exactly as the agent drives them.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from agent.device import resolve_device

FAMILY_ORDER = ("evasion", "extraction", "drift", "poisoning")


@contextmanager
def counting_updates() -> Iterator[dict[str, int]]:
    """Count events seen and findings raised by every detector's ``update`` while scenarios run.

    Scenarios drive detectors directly (no pipeline), so the report's ``events``
    and ``findings`` totals are taken here, around the detectors' own method.
    """
    from detectors.base import registry

    counts = {"events": 0, "findings": 0}
    originals = {cls: cls.update for cls in registry().values()}

    def wrap(orig):
        def update(self, batch, notes):
            out = orig(self, batch, notes)
            counts["events"] += len(batch)
            counts["findings"] += len(out)
            return out

        return update

    for cls, orig in originals.items():
        cls.update = wrap(orig)
    try:
        yield counts
    finally:
        for cls, orig in originals.items():
            cls.update = orig


def run_eval(device: str = "auto", quick: bool = False, families: list[str] | None = None) -> dict[str, Any]:
    dev = resolve_device(device)
    torch.manual_seed(0)
    report: dict[str, Any] = {"families": {}, "events": 0, "findings": 0, "device": str(dev), "quick": quick,
                              "seconds": {}}
    for fam in families or FAMILY_ORDER:
        module = importlib.import_module(f"agent.scenarios.{fam}")
        t0 = time.perf_counter()
        with counting_updates() as counts:
            section = module.evaluate(dev, quick=quick)
        report["seconds"][fam] = round(time.perf_counter() - t0, 1)
        report["events"] += counts["events"]
        report["findings"] += counts["findings"]
        report["families"][fam] = section
    return report


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(160, Console().width))
    summary = Table(title=f"inferwatch eval ({report['device']}{', quick' if report['quick'] else ''})")
    for col in ("family", "detected", "figures"):
        summary.add_column(col)
    for fam, sec in report["families"].items():
        figures = ", ".join(f"{k}={_fmt(v)}" for k, v in sec.items()
                            if k not in ("detected", "variants", "detector_aware") and not isinstance(v, dict | list))
        summary.add_row(fam, "yes" if sec.get("detected") else "NO", figures)
    console.print(summary)
    for fam, sec in report["families"].items():
        variants = sec.get("variants") or []
        if not variants:
            continue
        keys = [k for k in variants[0] if k not in ("name", "variant") and not isinstance(variants[0][k], dict | list)]
        t = Table(title=f"{fam}: variants")
        t.add_column("variant")
        for k in keys:
            t.add_column(k)
        for v in variants:
            t.add_row(str(v.get("name") or v.get("variant")), *(_fmt(v.get(k)) for k in keys))
        console.print(t)
        if sec.get("detector_aware"):
            console.print(f"  detector-aware attack: {sec['detector_aware']}")
    console.print(f"events {report['events']}, findings {report['findings']}, seconds {report['seconds']}")
