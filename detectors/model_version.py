"""A new model version starts answering: does it behave like the one before it?

Teams that retrain continuously roll new versions out without anyone looking
at how they answer. A version retrained on poisoned feedback, or swapped by
someone who should not, shows up as answers that shift beyond what the
traffic explains. Records carry the version (native ``model_version``, OIP
``model_version``); per (model, version) we keep bounded running statistics:

- the class histogram (prediction distribution, per-class rates),
- the histogram of the top probability (confidence),
- a bounded map from a coarse quantisation of the input (a grid of
  ``dup_grid`` reference standard deviations, hashed) to the label answered,
  so that near-duplicate inputs answered by both versions can be compared.

When a version appears after another has answered, the two are compared once
the new one has ``min_records`` answers (and again at every doubling until a
finding is raised): a chi-square test and the total-variation distance on class
rates, a two-sample Kolmogorov-Smirnov test on the confidence histograms, and
the disagreement rate on near-duplicates against the rate that the
quantisation alone explains (fitted from the model on reference data: how
often snapping an input to its grid cell changes the model's own answer).
A test counts only when it is significant (``alpha``) *and* the effect is
larger than the ``min_*`` size, so big traffic never turns noise into alerts.
Without a predecessor with enough answers (a restart, or the first version of
a model), the reference prediction distribution stands in for it.

One finding per version change (family ``integrity``, ATLAS AML.T0031 Erode AI
Model Integrity), severity by the size of the shift, naming records answered
by the new version (near-duplicates it answered differently first).
"""

from __future__ import annotations

import functools
import logging
import math
from collections import OrderedDict, deque
from itertools import repeat
from typing import Any, ClassVar

import numpy as np
from pydantic import Field
from scipy.special import chdtrc
from scipy.stats import kstwobign

from agent.findings import Finding, Severity
from agent.records import InferenceBatch
from agent.reference import ReferenceData
from detectors._binomial import binom_tail
from detectors.base import Detector, DetectorContext, DetectorOptions

CONF_BINS = 20
UNKNOWN_VERSION = ""
CELL_HASH = "linear64"  # how checkpointed input cells were hashed (before this marker: blake2b, now dropped)

log = logging.getLogger(__name__)


class _VersionStats:
    """Bounded running statistics of one (model, version)."""

    def __init__(self, n_classes: int, max_keys: int, max_ids: int):
        self.n = 0
        self.classes = np.zeros(n_classes, np.int64)
        self.conf = np.zeros(CONF_BINS, np.int64)
        self.first_ts = math.inf
        self.last_ts = -math.inf
        self.keys: OrderedDict[int, int] = OrderedDict()  # input-cell hash -> label answered
        self.ids: list[str] = []  # records of this version (first ``max_ids``), for findings
        self.max_keys, self.max_ids = max_keys, max_ids

    def grow(self, n_classes: int) -> None:
        if n_classes > len(self.classes):
            self.classes = np.concatenate([self.classes, np.zeros(n_classes - len(self.classes), np.int64)])

    def to_tree(self) -> dict[str, Any]:
        return {"n": self.n, "classes": self.classes, "conf": self.conf, "first_ts": self.first_ts,
                "last_ts": self.last_ts, "key_hashes": np.fromiter(self.keys.keys(), np.uint64, len(self.keys)),
                "key_labels": np.fromiter(self.keys.values(), np.int64, len(self.keys)), "ids": list(self.ids)}

    @classmethod
    def from_tree(cls, tree: dict[str, Any], max_keys: int, max_ids: int) -> _VersionStats:
        classes = np.asarray(tree["classes"], np.int64)
        st = cls(len(classes), max_keys, max_ids)
        st.n, st.classes, st.conf = int(tree["n"]), classes, np.asarray(tree["conf"], np.int64)
        st.first_ts, st.last_ts = float(tree["first_ts"]), float(tree["last_ts"])
        st.keys = OrderedDict(zip(np.asarray(tree["key_hashes"], np.uint64).tolist(),
                                  np.asarray(tree["key_labels"], np.int64).tolist()))
        st.ids = [str(i) for i in tree["ids"]]
        return st


class ModelVersionDetector(Detector):
    """Compares each new model version's answers with its predecessor's."""

    name: ClassVar[str] = "model_version"
    family: ClassVar[str] = "integrity"
    stream: ClassVar[str] = "inference"
    requires_fit: ClassVar[bool] = True
    priority: ClassVar[int] = 90

    class Options(DetectorOptions):
        min_records: int = Field(500, ge=20, description="answers of the new version before the first comparison")
        alpha: float = Field(1e-4, gt=0, lt=0.05, description="significance of each test")
        min_tv: float = Field(0.08, gt=0, le=1, description="smallest total-variation distance of class rates "
                                                            "worth a finding")
        min_ks: float = Field(0.12, gt=0, le=1, description="smallest KS distance of confidence worth a finding")
        min_disagreement: float = Field(0.05, gt=0, le=1, description="smallest near-duplicate disagreement rate "
                                                                      "(above the quantisation baseline) worth one")
        min_pairs: int = Field(30, ge=5, description="near-duplicate pairs needed for the disagreement test")
        dup_grid: float = Field(0.25, gt=0, description="input grid cell, in reference standard deviations")
        max_keys: int = Field(4096, ge=64, description="input cells remembered per version")
        max_versions: int = Field(8, ge=2, description="versions kept per model (oldest forgotten)")
        max_models: int = Field(64, ge=1, description="models tracked (least recently seen forgotten)")
        max_ids: int = Field(1000, ge=10, description="record ids kept per version for findings")

    def __init__(self, options: DetectorOptions, context: DetectorContext):
        super().__init__(options, context)
        self.opt: ModelVersionDetector.Options = options  # type: ignore[assignment]
        self.n_classes = int(context.n_classes or 2)
        self.step: np.ndarray | None = None  # grid cell per feature
        self.ref_classes: np.ndarray | None = None
        self.ref_conf: np.ndarray | None = None
        self.baseline_disagreement = 0.0
        self.models: OrderedDict[str, dict[str, Any]] = OrderedDict()

    # ------------------------------------------------------------------ fit
    def fit(self, reference: ReferenceData) -> None:
        """Grid cell per feature and, with a model, the reference answers and the quantisation baseline."""
        self.step = (reference.X.std(0) + 1e-6) * self.opt.dup_grid
        model = self.context.model
        if model is None:
            return
        probs = model.predict_proba(reference.X)
        self.n_classes = max(self.n_classes, probs.shape[1])
        self.ref_classes = np.bincount(probs.argmax(1), minlength=self.n_classes).astype(np.int64)
        self.ref_conf = np.histogram(probs.max(1), bins=CONF_BINS, range=(0, 1))[0].astype(np.int64)
        snapped = (np.round(reference.X / self.step) * self.step).astype(np.float32)
        self.baseline_disagreement = float((model.predict_proba(snapped).argmax(1) != probs.argmax(1)).mean())

    def artifacts(self) -> dict[str, Any]:
        if self.step is None:
            return {}
        tree: dict[str, Any] = {"step": self.step, "n_classes": self.n_classes,
                                "baseline_disagreement": self.baseline_disagreement}
        if self.ref_classes is not None:
            tree |= {"ref_classes": self.ref_classes, "ref_conf": self.ref_conf}
        return tree

    def load_artifacts(self, tree: dict[str, Any]) -> None:
        if not tree:
            return
        self.step = np.asarray(tree["step"], np.float64)
        self.n_classes = int(tree["n_classes"])
        self.baseline_disagreement = float(tree["baseline_disagreement"])
        if "ref_classes" in tree:
            self.ref_classes = np.asarray(tree["ref_classes"], np.int64)
            self.ref_conf = np.asarray(tree["ref_conf"], np.int64)

    # ------------------------------------------------------------------ update
    def _cells(self, X: np.ndarray) -> np.ndarray:
        """The input cell of each row, hashed to 64 bits (uint64 [n]).

        Why a linear hash: a cryptographic hash per row (blake2b, before) cost
        about as much as the rest of this detector together, in a Python loop.
        Two distinct cells collide only when ``sum((q - q') * M) = 0 mod 2^64``
        for the fixed random odd multipliers ``M``: for cells that differ by
        small integers, as grid cells do, about once in 2^33 pairs at worst.
        """
        step = self.step if self.step is not None else np.full(X.shape[1], 0.1 * self.opt.dup_grid)
        q = np.round(X / step).astype(np.int64).view(np.uint64)  # negative cells wrap, as the sum does
        return (q * _cell_multipliers(q.shape[1])).sum(1, dtype=np.uint64)

    def _model_state(self, model: str) -> dict[str, Any]:
        state = self.models.get(model)
        if state is None:
            state = {"versions": OrderedDict(), "current": None, "comparisons": {}}
            self.models[model] = state
            while len(self.models) > self.opt.max_models:
                self.models.popitem(last=False)
        self.models.move_to_end(model)
        return state

    def update(self, batch: InferenceBatch, notes: dict[str, Any]) -> list[Finding]:  # type: ignore[override]
        if len(batch) == 0:
            return []
        labels = np.asarray(batch.labels, np.int64)
        if len(labels) and labels.max() >= self.n_classes:
            self.n_classes = int(labels.max()) + 1
        conf = np.full(len(batch), np.nan)
        if batch.probs is not None:
            with np.errstate(invalid="ignore"):
                conf = np.nanmax(np.where(np.isnan(batch.probs), -np.inf, batch.probs), axis=1)
            conf[~np.isfinite(conf)] = np.nan
        cells = self._cells(np.asarray(batch.X, np.float64))
        findings: list[Finding] = []
        models, versions, n = batch.models, batch.model_versions, len(batch)
        if models.count(models[0]) == n and versions.count(versions[0]) == n:  # the usual batch: one of each
            groups = {(models[0], UNKNOWN_VERSION if versions[0] is None else versions[0]): np.arange(n)}
        else:
            rows_of: dict[tuple[str, str], list[int]] = {}
            for i, (m, v) in enumerate(zip(models, versions)):
                rows_of.setdefault((m, UNKNOWN_VERSION if v is None else v), []).append(i)
            groups = {key: np.asarray(rows) for key, rows in rows_of.items()}
        for (model, version), rows in groups.items():
            findings += self._absorb(model, version, batch, rows, labels, conf, cells)
        return findings

    def _absorb(self, model: str, version: str, batch: InferenceBatch, rows: np.ndarray, labels: np.ndarray,
                conf: np.ndarray, cells: np.ndarray) -> list[Finding]:
        o = self.opt
        state = self._model_state(model)
        versions: OrderedDict[str, _VersionStats] = state["versions"]
        st = versions.get(version)
        if st is None:
            st = _VersionStats(self.n_classes, o.max_keys, o.max_ids)
            versions[version] = st
            previous = state["current"]
            if previous is not None and previous in versions:
                state["comparisons"][version] = {"previous": previous, "pairs": 0, "disagree": 0, "dis_ids": [],
                                                 "next_check": o.min_records, "raised": False}
            while len(versions) > o.max_versions:
                gone, _ = versions.popitem(last=False)
                state["comparisons"].pop(gone, None)
        versions.move_to_end(version)
        state["current"] = version
        st.grow(self.n_classes)
        lab = labels[rows]
        valid = lab >= 0
        st.classes += np.bincount(lab[valid], minlength=len(st.classes))[: len(st.classes)]
        c = conf[rows]
        c = c[np.isfinite(c)]
        st.conf += np.histogram(c, bins=CONF_BINS, range=(0, 1))[0]
        st.n += int(valid.sum())
        st.first_ts = min(st.first_ts, float(batch.ts[rows].min()))
        st.last_ts = max(st.last_ts, float(batch.ts[rows].max()))
        room = o.max_ids - len(st.ids)
        if room > 0:
            st.ids += [batch.ids[i] for i in rows[:room].tolist()]
        # near-duplicates: this version's answers against its partners' remembered answers for the same cell
        # (a partner's cells do not change while this version's rows are absorbed, so all rows look at once)
        answered = rows[lab >= 0]
        hashes, labs = cells[answered].tolist(), labels[answered]
        comp = state["comparisons"].get(version)
        if comp is not None and comp["previous"] in versions:
            self._pairs(comp, versions[comp["previous"]].keys, hashes, labs, [batch.ids[i] for i in answered])
        for new_version, cp in state["comparisons"].items():
            if cp["previous"] == version and new_version in versions:
                self._pairs(cp, versions[new_version].keys, hashes, labs, None)
        _remember(st.keys, hashes, labs, o.max_keys)
        findings = []
        for new_version, cp in list(state["comparisons"].items()):
            if cp["raised"] or new_version not in versions:
                continue
            new_st = versions[new_version]
            if new_st.n >= cp["next_check"]:
                cp["next_check"] = 2 * cp["next_check"]
                f = self._compare(model, new_version, new_st, cp, versions.get(cp["previous"]), batch)
                if f is not None:
                    cp["raised"] = True
                    findings.append(f)
        return findings

    def _pairs(self, comp: dict[str, Any], partner: OrderedDict[int, int], hashes: list[int], labels: np.ndarray,
               ids: list[str] | None) -> None:
        """Count the rows whose cell the partner version answered, and those it answered differently
        (naming them, with ``ids``, up to ``max_ids``)."""
        other = np.fromiter(map(partner.get, hashes, repeat(-1)), np.int64, len(hashes))
        paired = other >= 0
        differ = paired & (other != labels)
        comp["pairs"] += int(paired.sum())
        comp["disagree"] += int(differ.sum())
        room = self.opt.max_ids - len(comp["dis_ids"])
        if ids is not None and room > 0:
            comp["dis_ids"] += [ids[j] for j in np.flatnonzero(differ)[:room].tolist()]

    # ------------------------------------------------------------------ tests
    def _compare(self, model: str, version: str, new: _VersionStats, comp: dict[str, Any],
                 prev: _VersionStats | None, batch: InferenceBatch) -> Finding | None:
        o = self.opt
        baseline = "previous version"
        if prev is not None and prev.n >= o.min_records:
            base_classes, base_conf = prev.classes, prev.conf
        elif self.ref_classes is not None:
            base_classes, base_conf, baseline = self.ref_classes, self.ref_conf, "reference data"
        else:
            return None
        k = max(len(base_classes), len(new.classes))
        a = np.pad(base_classes, (0, k - len(base_classes))).astype(np.float64)
        b = np.pad(new.classes, (0, k - len(new.classes))).astype(np.float64)
        tv, p_classes = _class_shift(a, b)
        ks, p_conf = _ks_hist(base_conf, new.conf)
        pairs, disagree = comp["pairs"], comp["disagree"]
        rate = disagree / pairs if pairs else 0.0
        null_rate = min(0.5, self.baseline_disagreement + 1e-3)
        p_dis = binom_tail(disagree, pairs, null_rate) if pairs >= o.min_pairs else 1.0
        shifts = {
            "class_rates": bool(p_classes < o.alpha and tv >= o.min_tv),
            "confidence": bool(p_conf < o.alpha and ks >= o.min_ks),
            "near_duplicate_disagreement": bool(p_dis < o.alpha and rate - self.baseline_disagreement
                                                >= o.min_disagreement),
        }
        if not any(shifts.values()):
            return None
        size = max(tv if shifts["class_rates"] else 0.0, ks if shifts["confidence"] else 0.0,
                   rate if shifts["near_duplicate_disagreement"] else 0.0)
        severity = Severity.CRITICAL if size >= 0.3 else Severity.HIGH if size >= 0.15 else Severity.MEDIUM
        ids = list(dict.fromkeys(comp["dis_ids"] + new.ids))[: o.max_ids]
        previous = comp["previous"]
        what = ", ".join(name.replace("_", " ") for name, hit in shifts.items() if hit)
        evidence = {
            "previous_version": previous, "new_version": version, "baseline": baseline,
            "records_previous": int(a.sum()), "records_new": int(b.sum()), "shifted": shifts,
            "class_rates_previous": (a / max(a.sum(), 1)).round(4), "class_rates_new": (b / max(b.sum(), 1)).round(4),
            "total_variation": round(tv, 4), "chi2_p": p_classes,
            "confidence_ks": round(ks, 4), "confidence_ks_p": p_conf,
            "near_duplicate_pairs": pairs, "near_duplicate_disagreements": disagree,
            "disagreement_rate": round(rate, 4), "quantisation_baseline": round(self.baseline_disagreement, 4),
            "disagreement_p": p_dis, "alpha": o.alpha,
        }
        return Finding(
            family="integrity", detector=self.name,
            title=(f"Model {model} version {version or '(unversioned)'} answers differently from "
                   f"{previous or '(unversioned)'}"),
            severity=severity, actor=None, model=model, related_ids=tuple(ids), window=f"{previous}->{version}",
            evidence=evidence, attacks=("AML.T0031",), time_ms=int(float(batch.ts.max()) * 1000),
            confidence=round(min(0.99, 0.5 + size), 3),
            message=(f"after {int(b.sum())} answers, version {version!r} of {model} shifted beyond sampling noise "
                     f"compared with {baseline} ({what}); check how it was trained before it serves more traffic"),
        )

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        models = []
        for name, state in self.models.items():
            models.append({
                "name": name, "current": state["current"],
                "versions": [{"version": v, **st.to_tree()} for v, st in state["versions"].items()],
                "comparisons": [{"version": v, **cp, "dis_ids": list(cp["dis_ids"])}
                                for v, cp in state["comparisons"].items()],
            })
        return {"models": models, "n_classes": self.n_classes, "cell_hash": CELL_HASH}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        o = self.opt
        self.n_classes = int(state["n_classes"])
        same_cells = state.get("cell_hash") == CELL_HASH
        if not same_cells:
            log.warning("model_version: the checkpoint's remembered input cells were hashed another way; "
                        "they are dropped, and near-duplicate pairs are counted again from new answers")
        self.models = OrderedDict()
        for m in state["models"]:
            versions = OrderedDict((str(v["version"]), _VersionStats.from_tree(v, o.max_keys, o.max_ids))
                                   for v in m["versions"])
            if not same_cells:
                for st in versions.values():
                    st.keys.clear()
            comparisons = {}
            for cp in m["comparisons"]:
                cp = dict(cp)
                version = str(cp.pop("version"))
                cp["pairs"], cp["disagree"] = int(cp["pairs"]), int(cp["disagree"])
                cp["next_check"], cp["raised"] = int(cp["next_check"]), bool(cp["raised"])
                cp["dis_ids"] = [str(i) for i in cp["dis_ids"]]
                comparisons[version] = cp
            self.models[str(m["name"])] = {"versions": versions, "current": m["current"], "comparisons": comparisons}


@functools.cache
def _cell_multipliers(d: int) -> np.ndarray:
    """Fixed random odd 64-bit multipliers of the cell hash, one per feature (the same in every process, so
    checkpointed cells keep their meaning)."""
    rng = np.random.default_rng(0x5EED_CE11)
    return rng.integers(0, 2**64, d, dtype=np.uint64, endpoint=False) | np.uint64(1)


def _remember(keys: OrderedDict[int, int], hashes: list[int], labels: np.ndarray, max_keys: int) -> None:
    """Record each cell's newest answer, most recently answered last, keeping the ``max_keys`` most recent.

    What answering the rows one by one would leave (a least-recently-used map): a cell answered twice in the
    batch takes its last answer, at the place of its last row.
    """
    if not hashes:
        return
    _, last_rev = np.unique(np.asarray(hashes, np.uint64)[::-1], return_index=True)
    last = np.sort(len(hashes) - 1 - last_rev)  # each cell's last row, in batch order
    deque(map(keys.pop, hashes, repeat(None)), maxlen=0)  # cells answered again move to the end
    keys.update(zip([hashes[j] for j in last.tolist()], labels[last].tolist()))
    for _ in range(len(keys) - max_keys):
        keys.popitem(last=False)


def _class_shift(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Total-variation distance and chi-square p-value of two class histograms (2 x k contingency)."""
    keep = (a + b) > 0
    a, b = a[keep], b[keep]
    if len(a) < 2 or a.sum() == 0 or b.sum() == 0:
        return 0.0, 1.0
    tv = 0.5 * float(np.abs(a / a.sum() - b / b.sum()).sum())
    table = np.stack([a, b])
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    stat = float(((table - expected) ** 2 / expected).sum())
    return tv, float(chdtrc(len(a) - 1, stat))


def _ks_hist(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Two-sample KS distance between binned confidence distributions, asymptotic p-value."""
    na, nb = int(a.sum()), int(b.sum())
    if na == 0 or nb == 0:
        return 0.0, 1.0
    d = float(np.abs(np.cumsum(a) / na - np.cumsum(b) / nb).max())
    n_eff = na * nb / (na + nb)
    return d, float(kstwobign.sf(d * math.sqrt(n_eff)))
