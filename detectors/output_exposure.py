"""Posture: full-precision probability vectors served to clients caught probing.

Extraction, membership-inference and inversion attacks feed on the
confidence scores a model returns: every extra decimal of every class's
probability is information about the decision boundary (Tramèr et al. 2016
extract models from confidence values with far fewer queries than from labels).
The German Federal Office for Information Security (BSI) lists model stealing
and membership inference among the information-extraction attacks in "AI
Security Concerns in a Nutshell" (2023, section 4) and, as a defence, advises
limiting the information the model's output gives away: return the class
label only where that suffices, or else fewer and coarser confidence values
(top-k, rounded) instead of the full probability vector.

This detector does not find attacks by itself: it turns an extraction finding
into a configuration fix. It runs after the extraction-family detectors of the
same batch (``notes["findings"]``), remembers the clients they flagged (bounded),
looks at what the model actually served those clients (``batch.probs``: is the
whole vector there, and with how many decimals), and raises one ``posture``
finding per (model, client) whose answers expose full-precision vectors.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from agent.findings import Finding, Severity
from agent.records import InferenceBatch
from detectors.base import Detector, DetectorContext, DetectorOptions

MAX_DECIMALS = 6  # float32 holds ~7 significant digits: 6 decimals means "as computed"
ADVICE = ("BSI, AI Security Concerns in a Nutshell (2023), information extraction attacks: give out only the "
          "information the use case needs: return the class label only, or the top-k classes with probabilities "
          "rounded to few decimals, instead of the full-precision probability vector")


def served_decimals(probs: np.ndarray) -> np.ndarray:
    """Per row, the decimals needed to write every served probability exactly (0..6; -1 when none served)."""
    p = np.asarray(probs, np.float64)
    finite = np.isfinite(p)
    need = np.full(p.shape, -1, np.int64)
    rest = finite.copy()
    for d in range(MAX_DECIMALS + 1):
        exact = rest & (np.abs(p - np.round(p, d)) <= 5e-7)
        need[exact] = d
        rest &= ~exact
    need[rest] = MAX_DECIMALS
    return need.max(1)


class OutputExposureDetector(Detector):
    """Flags models that answer extraction-flagged clients with full-precision probability vectors."""

    name: ClassVar[str] = "output_exposure"
    family: ClassVar[str] = "posture"
    stream: ClassVar[str] = "inference"
    priority: ClassVar[int] = 200  # after every extraction-family detector of the batch

    class Options(DetectorOptions):
        min_decimals: int = Field(3, ge=1, le=MAX_DECIMALS,
                                  description="probabilities with at least this many decimals count as full "
                                              "precision (BSI: coarsen them)")
        min_answers: int = Field(10, ge=1, description="answers to a flagged client examined before deciding")
        min_exposed_share: float = Field(0.5, gt=0, le=1, description="share of those answers that must expose "
                                                                      "a full-precision vector")
        families: tuple[str, ...] = Field(("extraction",), description="finding families that flag a client")
        max_clients: int = Field(10_000, ge=10, description="flagged (model, client) pairs remembered")

    def __init__(self, options: DetectorOptions, context: DetectorContext):
        super().__init__(options, context)
        self.opt: OutputExposureDetector.Options = options  # type: ignore[assignment]
        # (model, client) -> answers seen, exposed answers, max decimals, exposed ids, flagging finding uid, raised
        self.flagged: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()

    def update(self, batch: InferenceBatch, notes: dict[str, Any]) -> list[Finding]:  # type: ignore[override]
        o = self.opt
        for f in notes.get("findings", ()):
            if f.family in o.families and f.actor:
                for model in {f.model} if f.model else set(batch.models) or {""}:
                    key = (model or "", f.actor)
                    if key not in self.flagged:
                        self.flagged[key] = {"answers": 0, "exposed": 0, "decimals": -1, "full": 0, "ids": [],
                                             "by": f.uid, "by_title": f.title, "raised": False}
                    self.flagged.move_to_end(key)
                    while len(self.flagged) > o.max_clients:
                        self.flagged.popitem(last=False)
        if len(batch) == 0 or not self.flagged:
            return []
        rows = [i for i, key in enumerate(zip(batch.models, batch.clients))
                if key in self.flagged and not self.flagged[key]["raised"]]
        if not rows:
            return []
        idx = np.asarray(rows)
        if batch.probs is None:
            decimals = np.full(len(idx), -1)
            full = np.zeros(len(idx), bool)
        else:
            probs = batch.probs[idx]
            decimals = served_decimals(probs)
            full = np.isfinite(probs).all(1)
        exposed = full & (decimals >= o.min_decimals)
        findings = []
        for j, i in enumerate(rows):
            key = (batch.models[i], batch.clients[i])
            st = self.flagged[key]
            st["answers"] += 1
            st["full"] += int(full[j])
            st["decimals"] = max(st["decimals"], int(decimals[j]))
            if exposed[j]:
                st["exposed"] += 1
                if len(st["ids"]) < 1000:
                    st["ids"].append(batch.ids[i])
            if (not st["raised"] and st["answers"] >= o.min_answers
                    and st["exposed"] >= o.min_exposed_share * st["answers"]):
                st["raised"] = True
                findings.append(self._finding(key, st, float(batch.ts[i])))
        return findings

    def _finding(self, key: tuple[str, str], st: dict[str, Any], ts: float) -> Finding:
        model, client = key
        share = st["exposed"] / st["answers"]
        return Finding(
            family="posture", detector=self.name,
            title=f"Model {model or '(unnamed)'} serves full-precision probabilities to a client flagged for "
                  "extraction",
            severity=Severity.MEDIUM, actor=client, model=model or None, related_ids=tuple(st["ids"]),
            window="exposure", attacks=("AML.T0024.002",), time_ms=int(ts * 1000), confidence=round(share, 3),
            evidence={"answers_examined": st["answers"], "exposed_answers": st["exposed"], "exposed_share": share,
                      "full_vectors": st["full"], "max_decimals_served": st["decimals"],
                      "min_decimals": self.opt.min_decimals, "flagged_by": st["by"], "flagged_by_title": st["by_title"],
                      "advice": ADVICE},
            message=(f"{st['exposed']} of {st['answers']} answers to {client} carried the full probability vector "
                     f"with up to {st['decimals']} decimals after it was flagged ({st['by_title']}). {ADVICE}."),
        )

    def state_dict(self) -> dict[str, Any]:
        return {"flagged": [{"model": m, "client": c, **{k: v for k, v in st.items()}}
                            for (m, c), st in self.flagged.items()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.flagged = OrderedDict()
        for row in state["flagged"]:
            row = dict(row)
            key = (str(row.pop("model")), str(row.pop("client")))
            row["ids"] = [str(i) for i in row["ids"]]
            for name in ("answers", "exposed", "decimals", "full"):
                row[name] = int(row[name])
            row["raised"] = bool(row["raised"])
            self.flagged[key] = row
