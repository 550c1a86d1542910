"""The demo's report: a timeline of traffic, attack campaigns and findings per family.

A picture answers "did it catch the attacks, and when?" faster than a table:
the top panel shows the traffic (benign and each attack kind), the panels
below one row per family with the campaign as a shaded band and every finding
as a tick. Written as ``report.png`` and a self-contained ``report.html``.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FAMILY_COLOURS = {"evasion": "#d62728", "extraction": "#9467bd", "drift": "#ff7f0e", "poisoning": "#2ca02c"}


@dataclass(frozen=True)
class Campaign:
    family: str
    label: str
    start_s: float
    end_s: float


def render(out: Path, traffic: dict[str, np.ndarray], campaigns: list[Campaign],
           findings: list[tuple[str, float]], board: dict, duration_s: float) -> tuple[Path, Path]:
    """``traffic``: kind -> event times (s from start); ``findings``: (family, s from start)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(FAMILY_COLOURS)
    fig, axes = plt.subplots(1 + len(families), 1, figsize=(12, 7.5), sharex=True,
                             gridspec_kw={"height_ratios": [3] + [1] * len(families)})
    bins = np.arange(0, duration_s + 2, 1.0)
    kinds = sorted(traffic, key=lambda k: (k != "benign", k))
    counts = [np.histogram(traffic[k], bins)[0] for k in kinds]
    axes[0].stackplot(bins[:-1], counts, labels=kinds, alpha=0.85, step="post")
    axes[0].set_ylabel("records / s")
    axes[0].legend(loc="upper left", fontsize=8, ncol=min(6, len(kinds)))
    axes[0].set_title("inferwatch demo — traffic, attack campaigns (bands) and findings (ticks)")
    for ax, fam in zip(axes[1:], families):
        colour = FAMILY_COLOURS[fam]
        for c in campaigns:
            if c.family == fam:
                ax.axvspan(c.start_s, c.end_s, color=colour, alpha=0.15)
                ax.text(c.start_s, 0.85, c.label, fontsize=7, va="top", color=colour)
        times = [t for f, t in findings if f == fam]
        if times:
            ax.vlines(times, 0.05, 0.6, color=colour, linewidth=0.8)
        sec = board["families"].get(fam, {})
        figures = ", ".join(f"{k}={v}" for k, v in sec.items() if k not in ("detected",) and not isinstance(v, list))
        ax.set_ylabel(fam, rotation=0, ha="right", va="center", color=colour, fontsize=9)
        ax.set_yticks([])
        ax.set_ylim(0, 1)
        ax.text(duration_s, 0.85, f"{len(times)} findings  {figures}", fontsize=7, ha="right", va="top")
    axes[-1].set_xlabel("seconds since start")
    axes[-1].set_xlim(0, duration_s + 1)
    fig.tight_layout()
    png = out / "report.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)

    rows = "".join(
        f"<tr><td>{html.escape(fam)}</td><td>{'yes' if sec.get('detected') else 'no'}</td>"
        f"<td>{html.escape(json.dumps({k: v for k, v in sec.items() if k != 'detected'}))}</td></tr>"
        for fam, sec in board["families"].items()
    )
    page = out / "report.html"
    page.write_text(f"""<!doctype html><meta charset="utf-8"><title>inferwatch demo report</title>
<style>body{{font-family:sans-serif;margin:2em}}
td,th{{padding:4px 10px;border-bottom:1px solid #ddd;text-align:left}}</style>
<h1>inferwatch demo</h1>
<p>{board['events']} records, {board['findings']} findings, {board.get('seconds', '?')} s.
Scores are measured against the simulation's ground truth.</p>
<table><tr><th>family</th><th>detected</th><th>figures</th></tr>{rows}</table>
<img alt="timeline" style="max-width:100%" src="data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}">
""")
    return png, page
