"""``inferwatch audit``: is a retrained model version safe to serve?

Teams that retrain on feedback ship whatever the feedback taught, poison
included. Security guidance calls regression testing one of the best
mitigations for model poisoning, so this compares two ``torch.export``
programs offline, on clean labelled reference data, before a rollout:

- **accuracy and calibration** (expected calibration error, 15 equal-width bins
  of the top probability; Guo et al. 2017), and **prediction flips** per true class;
- **robustness** to a fixed set of white-box attacks against each version's own
  gradients (FGSM and PGD-L∞ at a fixed eps, ``detectors/_attacks.py``): robust
  accuracy old vs new, because poisoned retraining often costs robustness first;
- **backdoor tests**: STRIP (Gao et al. 2019): superimpose an input with random
  clean reference inputs and measure the entropy of the predictions; an input
  whose prediction survives the blending (low entropy) carries a trigger the
  model obeys. And every **trigger candidate** recovered from quarantined feedback
  (the poisoning detector's trigger, or estimated from quarantined inputs)
  stamped on clean inputs of the other classes: the attack success rate old vs
  new answers "does the new version now obey it?".

Gates (YAML, see ``configs/audit.example.yaml``) turn the measurements into
pass/fail so CI/CD can block a rollout: exit status 1 when one fails. A
failing audit also becomes an ``integrity`` finding (ATLAS AML.T0031 Erode AI
Model Integrity; AML.T0018.000 Poison AI Model when the new version obeys a
trigger) delivered to the sinks of an agent configuration.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.findings import Finding, Severity
from agent.model import WatchedModel
from agent.reference import ReferenceData, ReferenceError, load_reference
from detectors._attacks import fgsm, pgd_linf

ECE_BINS = 15


class AuditInputError(ValueError):
    """An input file (model, quarantine, gates) cannot be used; ``problems`` has one line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class AuditGates(BaseModel):
    """Pass/fail limits. A gate left out (or null) is not checked.

    Defaults are the ones in ``configs/audit.example.yaml``; they hold for a
    retrain of the same architecture on mostly the same data.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_accuracy_drop: float | None = Field(0.03, ge=0, le=1, description="old accuracy - new accuracy")
    max_flip_rate: float | None = Field(0.10, ge=0, le=1,
                                        description="share of reference inputs whose predicted class changed")
    max_ece_increase: float | None = Field(0.05, ge=0, le=1, description="new ECE - old ECE")
    min_robust_accuracy_ratio: float | None = Field(
        0.5, ge=0, description="new robust accuracy / old robust accuracy, per attack (worst attack counts)")
    max_trigger_success: float | None = Field(
        0.3, ge=0, le=1, description="share of clean inputs of other classes a recovered trigger sends to its "
                                     "target class on the new version (worst trigger counts)")
    min_strip_entropy_ratio: float | None = Field(
        0.5, ge=0, description="new / old mean STRIP entropy (worst probe set counts; low = trigger obeyed)")


class AuditOptions(BaseModel):
    """How the measurements are made (fixed so that two audits are comparable)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    eps: float = Field(0.1, gt=0, description="L∞ attack budget as a share of the reference value range")
    pgd_steps: int = Field(20, ge=1)
    attack_rows: int = Field(500, ge=10, description="reference rows attacked (the first N of a fixed shuffle)")
    strip_probes: int = Field(200, ge=10, description="inputs tested with STRIP")
    strip_overlays: int = Field(16, ge=2, description="clean inputs superimposed on each probe")
    trigger_min_records: int = Field(5, ge=2, description="quarantined inputs of one label needed to estimate "
                                                          "a trigger from inputs")
    trigger_max_features: float = Field(0.1, gt=0, le=1, description="a trigger touches at most this share "
                                                                     "of the features")
    seed: int = 0


@dataclass(frozen=True)
class TriggerCandidate:
    """A trigger to test: set ``features`` to ``values`` and see whether the model answers ``target_label``."""

    target_label: int
    features: tuple[int, ...]
    values: tuple[float, ...]
    origin: str  # "poisoning-detector" (from the finding's evidence) or "estimated" (from quarantined inputs)
    record_ids: tuple[str, ...] = ()

    def stamp(self, X: np.ndarray) -> np.ndarray:
        out = X.copy()
        out[:, list(self.features)] = np.asarray(self.values, np.float32)
        return out


@dataclass(frozen=True)
class GateResult:
    gate: str
    limit: float
    value: float
    passed: bool
    detail: str


@dataclass
class AuditReport:
    """Everything measured, in the shape ``--json`` prints."""

    old: str
    new: str
    reference_rows: int
    n_classes: int
    metrics: dict[str, Any]
    per_class: list[dict[str, Any]]
    robustness: list[dict[str, Any]]
    strip: list[dict[str, Any]]
    triggers: list[dict[str, Any]]
    gates: list[GateResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["passed"] = self.passed
        out["failed_gates"] = [g.gate for g in self.gates if not g.passed]
        return out


# ----------------------------------------------------------------------------- inputs


def load_gates(path: str | Path | None) -> AuditGates:
    """Gates from YAML (a mapping, optionally under a top-level ``gates:`` key); defaults without a file."""
    if path is None:
        return AuditGates()
    origin = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AuditInputError([f"{origin}: (file): not found; pass an existing gates YAML with --gates"]) from None
    except yaml.YAMLError as exc:
        raise AuditInputError([f"{origin}: (parse): not valid YAML: {exc}"]) from None
    raw = raw or {}
    if isinstance(raw, dict) and "gates" in raw:
        raw = raw["gates"] or {}
    if not isinstance(raw, dict):
        raise AuditInputError([f"{origin}: gates: expected a mapping of gate name to limit"])
    try:
        return AuditGates.model_validate(raw)
    except ValidationError as exc:
        from agent.config import _problems

        raise AuditInputError(_problems(origin, ("gates",), exc)) from None


def load_model(path: str | Path, input_shape: tuple[int, ...], device: torch.device) -> WatchedModel:
    """A ``torch.export`` program (never unpickled) checked against the reference input shape."""
    p = Path(path)
    if not p.is_file():
        raise AuditInputError([f"{p}: (file): not found; expected a torch.export program (.pt2)"])
    try:
        return WatchedModel.load(p, input_shape, None, device)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad archive or a shape mismatch
        raise AuditInputError([f"{p}: (model): cannot be loaded as a torch.export program taking inputs of "
                               f"shape {list(input_shape)} (the reference X shape): {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}"]) from None


def read_quarantine(path: str | Path) -> list[dict[str, Any]]:
    """Lines of a quarantine JSONL (``connectors/quarantine.py`` writes them; pipelines may add ``input``)."""
    p = Path(path)
    if not p.is_file():
        raise AuditInputError([f"{p}: (file): not found; expected the quarantine JSONL the quarantine sink writes"])
    rows, problems = [], []
    with open(p, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                problems.append(f"{p}:{n}: (line): not JSON: {exc}")
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
                problems.append(f"{p}:{n}: id: expected an object with a string record id")
                continue
            rows.append(obj)
    if problems:
        raise AuditInputError(problems)
    return rows


def trigger_candidates(quarantine: Sequence[dict[str, Any]], ref: ReferenceData, options: AuditOptions,
                       origin: str = "quarantine") -> list[TriggerCandidate]:
    """Trigger candidates from quarantined feedback, one per distinct trigger.

    Two sources, both from the quarantine file: the poisoning detector's own
    trigger (``trigger`` of backdoor records: target label, features, values),
    and, for lines that carry their ``input`` and ``label``, an estimate per
    target label: the features where the quarantined inputs of that label sit
    far from clean inputs of the other labels *and* agree with each other (a
    stamp is the same on every poisoned input; random label flips share
    nothing), at the quarantined inputs' median value.
    """
    found: dict[tuple[int, tuple[int, ...]], TriggerCandidate] = {}
    by_label: dict[int, list[tuple[str, np.ndarray]]] = {}
    d = ref.dim
    for row in quarantine:
        trig = row.get("trigger")
        if isinstance(trig, dict):
            try:
                feats = tuple(int(f) for f in trig["features"])
                vals = tuple(float(v) for v in trig["values"])
                target = int(trig["target_label"])
            except (KeyError, TypeError, ValueError):
                raise AuditInputError([f"{origin}: {row['id']}.trigger: expected target_label, features and "
                                       "values"]) from None
            if len(feats) != len(vals) or not feats or max(feats) >= d or min(feats) < 0:
                raise AuditInputError([f"{origin}: {row['id']}.trigger.features: expected feature indices in "
                                       f"[0, {d}) with one value each"])
            key = (target, feats)
            prev = found.get(key)
            ids = (prev.record_ids if prev else ()) + (row["id"],)
            found[key] = TriggerCandidate(target, feats, vals, "poisoning-detector", ids)
        if "input" in row and "label" in row:
            try:
                x = np.asarray(row["input"], np.float32).reshape(-1)
                label = int(row["label"])
            except (TypeError, ValueError):
                raise AuditInputError([f"{origin}: {row['id']}.input: expected numbers and an integer label"]) from None
            if x.shape[0] != d:
                raise AuditInputError([f"{origin}: {row['id']}.input: expected {d} values (the reference "
                                       f"dimension), got {x.shape[0]}"])
            by_label.setdefault(label, []).append((row["id"], x))
    if ref.y is not None:
        scale = ref.X.std(0) + 1e-6
        max_feats = max(1, int(options.trigger_max_features * d))
        for label, items in sorted(by_label.items()):
            if len(items) < options.trigger_min_records:
                continue
            Q = np.stack([x for _, x in items])
            others = ref.X[ref.y != label]
            if len(others) == 0:
                continue
            med = np.median(Q, 0)
            delta = (med - others.mean(0)) / scale
            agree = (np.abs(Q - med) <= 0.25 * scale).mean(0)
            shared = np.flatnonzero((np.abs(delta) >= 2.0) & (agree >= 0.8))
            if len(shared) == 0 or len(shared) > max_feats:
                continue
            feats = tuple(int(f) for f in shared[np.argsort(-np.abs(delta[shared]))])
            key = (label, tuple(sorted(feats)))
            if key not in found:
                found[key] = TriggerCandidate(label, feats, tuple(float(med[f]) for f in feats), "estimated",
                                              tuple(i for i, _ in items))
    return list(found.values())


# ----------------------------------------------------------------------------- measurements


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: |accuracy - confidence| per equal-width bin of the top probability, weighted by bin size."""
    conf = probs.max(1)
    correct = probs.argmax(1) == y
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return float(ece)


def _entropy(probs: np.ndarray) -> np.ndarray:
    return -(probs * np.log(np.clip(probs, 1e-12, 1.0))).sum(-1)


def strip_entropy(model: WatchedModel, probes: np.ndarray, pool: np.ndarray, overlays: int, lo: float, hi: float,
                  seed: int) -> np.ndarray:
    """STRIP (Gao et al. 2019): mean prediction entropy of each probe superimposed on random clean inputs.

    Superimposition as in the paper: the two inputs added and clipped to the
    valid range. The same overlay draw (``seed``) is used for every model so
    the old and new versions see identical blends.
    """
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(pool), (len(probes), overlays))
    blends = np.clip(probes[:, None, :] + pool[pick], lo, hi).reshape(-1, probes.shape[1]).astype(np.float32)
    probs = model.predict_proba(blends).reshape(len(probes), overlays, -1)
    return _entropy(probs).mean(1)


def robust_accuracy(model: WatchedModel, X: np.ndarray, y: np.ndarray, attack: str, eps: float, lo: float,
                    hi: float, steps: int, seed: int) -> float:
    """Accuracy on adversarial examples crafted against this model's own gradients."""
    x = torch.as_tensor(X, dtype=torch.float32, device=model.device)
    yt = torch.as_tensor(y, dtype=torch.long, device=model.device)
    if attack == "fgsm":
        adv = fgsm(model.logits, x, yt, eps, lo, hi)
    else:
        adv = pgd_linf(model.logits, x, yt, eps, lo, hi, steps=steps, seed=seed)
    with torch.no_grad():
        pred = model.logits(adv).argmax(1)
    return float((pred == yt).float().mean().item())


def audit_models(old: WatchedModel, new: WatchedModel, ref: ReferenceData, *, old_name: str = "old",
                 new_name: str = "new", quarantine: Sequence[dict[str, Any]] = (),
                 gates: AuditGates | None = None, options: AuditOptions | None = None) -> AuditReport:
    """Measure both versions on the reference data and check the gates."""
    options = options or AuditOptions()
    gates = gates or AuditGates()
    if ref.y is None:
        raise ReferenceError("reference: y: the audit needs labelled reference data (an .npz with X and y)")
    if old.n_classes != new.n_classes:
        raise AuditInputError([f"{new_name}: (model): answers {new.n_classes} classes, {old_name} answers "
                               f"{old.n_classes}; an audit compares two versions of one model"])
    X, y = ref.X, ref.y
    k = old.n_classes
    lo, hi = float(X.min()), float(X.max())
    rng = np.random.default_rng(options.seed)
    order = rng.permutation(len(X))

    p_old, p_new = old.predict_proba(X), new.predict_proba(X)
    pred_old, pred_new = p_old.argmax(1), p_new.argmax(1)
    flipped = pred_old != pred_new
    metrics = {
        "accuracy_old": float((pred_old == y).mean()), "accuracy_new": float((pred_new == y).mean()),
        "ece_old": expected_calibration_error(p_old, y), "ece_new": expected_calibration_error(p_new, y),
        "flip_rate": float(flipped.mean()), "flips": int(flipped.sum()),
        "flips_correct_to_wrong": int((flipped & (pred_old == y)).sum()),
        "flips_wrong_to_correct": int((flipped & (pred_new == y)).sum()),
    }
    metrics["accuracy_drop"] = metrics["accuracy_old"] - metrics["accuracy_new"]
    metrics["ece_increase"] = metrics["ece_new"] - metrics["ece_old"]
    per_class = []
    for c in range(k):
        mine = y == c
        if not mine.any():
            continue
        per_class.append({
            "class": c, "rows": int(mine.sum()), "accuracy_old": float((pred_old[mine] == c).mean()),
            "accuracy_new": float((pred_new[mine] == c).mean()), "flips": int(flipped[mine].sum()),
            "flip_rate": float(flipped[mine].mean()),
            "predicted_old": int((pred_old == c).sum()), "predicted_new": int((pred_new == c).sum()),
        })

    eps = options.eps * (hi - lo)
    rows = order[: options.attack_rows]
    robustness = []
    for attack in ("fgsm", "pgd_linf"):
        a_old = robust_accuracy(old, X[rows], y[rows], attack, eps, lo, hi, options.pgd_steps, options.seed)
        a_new = robust_accuracy(new, X[rows], y[rows], attack, eps, lo, hi, options.pgd_steps, options.seed)
        robustness.append({"attack": attack, "eps": eps, "rows": len(rows), "robust_accuracy_old": a_old,
                           "robust_accuracy_new": a_new, "ratio": _ratio(a_new, a_old)})

    candidates = trigger_candidates(quarantine, ref, options)
    probes_idx = order[: options.strip_probes]
    strip = []
    clean_old = strip_entropy(old, X[probes_idx], X, options.strip_overlays, lo, hi, options.seed)
    clean_new = strip_entropy(new, X[probes_idx], X, options.strip_overlays, lo, hi, options.seed)
    # STRIP's decision boundary: the 1st percentile of each model's clean-input entropy (FRR 1%)
    bound_old, bound_new = float(np.quantile(clean_old, 0.01)), float(np.quantile(clean_new, 0.01))
    strip.append(_strip_row("clean", clean_old, clean_new, bound_old, bound_new))
    triggers = []
    for cand in candidates:
        victims = order[y[order] != cand.target_label]
        stamped = cand.stamp(X[victims])
        asr_old = float((old.predict_proba(stamped).argmax(1) == cand.target_label).mean())
        asr_new = float((new.predict_proba(stamped).argmax(1) == cand.target_label).mean())
        name = f"trigger->{cand.target_label} {list(cand.features)[:8]}{'…' if len(cand.features) > 8 else ''}"
        triggers.append({"name": name, "target_label": cand.target_label, "features": list(cand.features),
                         "values": list(cand.values), "origin": cand.origin,
                         "quarantined_records": len(cand.record_ids),
                         "record_ids": list(cand.record_ids[:1000]), "victims": len(victims),
                         "success_old": asr_old, "success_new": asr_new})
        sp = stamped[: options.strip_probes]
        e_old = strip_entropy(old, sp, X, options.strip_overlays, lo, hi, options.seed)
        e_new = strip_entropy(new, sp, X, options.strip_overlays, lo, hi, options.seed)
        strip.append(_strip_row(name, e_old, e_new, bound_old, bound_new))

    report = AuditReport(old=old_name, new=new_name, reference_rows=len(X), n_classes=k, metrics=metrics,
                         per_class=per_class, robustness=robustness, strip=strip, triggers=triggers)
    report.gates = check_gates(report, gates)
    return report


def _ratio(new: float, old: float) -> float:
    """new / old; 1.0 when old is 0 (nothing to lose), so JSON never holds infinity."""
    return new / old if old > 0 else 1.0


def _strip_row(name: str, e_old: np.ndarray, e_new: np.ndarray, bound_old: float, bound_new: float
               ) -> dict[str, Any]:
    m_old, m_new = float(e_old.mean()), float(e_new.mean())
    return {"probes": name, "n": len(e_old), "entropy_old": m_old, "entropy_new": m_new,
            "ratio": _ratio(m_new, m_old),
            "flagged_old": float((e_old < bound_old).mean()), "flagged_new": float((e_new < bound_new).mean())}


def check_gates(report: AuditReport, gates: AuditGates) -> list[GateResult]:
    """Each configured gate against the worst case it covers."""
    m = report.metrics
    out: list[GateResult] = []

    def gate(name: str, value: float, detail: str, upper: bool) -> None:
        limit = getattr(gates, name)
        if limit is None:
            return
        ok = value <= limit if upper else value >= limit
        out.append(GateResult(name, float(limit), float(value), bool(ok), detail))

    gate("max_accuracy_drop", m["accuracy_drop"],
         f"accuracy {m['accuracy_old']:.4f} -> {m['accuracy_new']:.4f}", True)
    gate("max_flip_rate", m["flip_rate"], f"{m['flips']} of {report.reference_rows} predictions changed", True)
    gate("max_ece_increase", m["ece_increase"], f"ECE {m['ece_old']:.4f} -> {m['ece_new']:.4f}", True)
    if report.robustness:
        worst = min(report.robustness, key=lambda r: r["ratio"])
        gate("min_robust_accuracy_ratio", worst["ratio"],
             f"{worst['attack']} eps {worst['eps']:.3g}: {worst['robust_accuracy_old']:.3f} -> "
             f"{worst['robust_accuracy_new']:.3f}", False)
    if report.triggers:
        worst = max(report.triggers, key=lambda t: t["success_new"])
        gate("max_trigger_success", worst["success_new"],
             f"{worst['name']}: success {worst['success_old']:.3f} -> {worst['success_new']:.3f}", True)
    # with trigger candidates, STRIP is asked about inputs that carry them (its purpose); without, about clean
    # inputs: a version that answers blended clean inputs with far more certainty than its predecessor did
    probes = [r for r in report.strip if r["probes"] != "clean"] or report.strip
    if probes:
        worst = min(probes, key=lambda r: r["ratio"])
        gate("min_strip_entropy_ratio", worst["ratio"],
             f"{worst['probes']}: entropy {worst['entropy_old']:.3f} -> {worst['entropy_new']:.3f}", False)
    return out


# ----------------------------------------------------------------------------- finding


def audit_finding(report: AuditReport, model_name: str, new_sha256: str) -> Finding | None:
    """An ``integrity`` finding for a failed audit (None when every gate passed).

    The uid is stable per (model, new program's sha256), so re-running the
    same audit in CI is recognised as the same finding by SIEM dedup.
    """
    failed = [g for g in report.gates if not g.passed]
    if not failed:
        return None
    obeyed = [t for t in report.triggers if "max_trigger_success" in {g.gate for g in failed}
              and t["success_new"] > (next(g.limit for g in failed if g.gate == "max_trigger_success"))]
    attacks: tuple[str, ...] = ("AML.T0018.000", "AML.T0031") if obeyed else ("AML.T0031",)
    related = [rid for t in obeyed for rid in t["record_ids"]]
    if not related:
        related = [f"{model_name}:{report.new}"]
    severity = Severity.CRITICAL if obeyed else Severity.HIGH
    what = ", ".join(f"{g.gate} ({g.detail}; limit {g.limit:g})" for g in failed)
    title = (f"New version of {model_name} obeys a backdoor trigger from quarantined feedback" if obeyed
             else f"New version of {model_name} fails the integrity audit")
    return Finding(
        family="integrity", detector="audit", title=title, severity=severity, actor=None, model=model_name,
        related_ids=tuple(related), window=f"audit:{new_sha256}",
        evidence={"old": report.old, "new": report.new, "new_sha256": new_sha256, "failed_gates": what,
                  "metrics": report.metrics, "robustness": report.robustness, "strip": report.strip,
                  "triggers": [{k: v for k, v in t.items() if k != "record_ids"} for t in report.triggers]},
        attacks=attacks, confidence=0.9 if obeyed else 0.7,
        message=f"audit of {report.new} against {report.old} failed: {what}; do not roll it out",
    )


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def deliver_finding(finding: Finding, config_path: str) -> bool:
    """Send the finding through the agent configuration's sinks, the way ``run`` builds them."""
    from agent.config import load_config
    from agent.delivery import Delivery
    from connectors.sink import registry as sink_registry

    cfg = load_config(config_path)
    sinks_by_type = sink_registry()
    sinks = [sinks_by_type[o.type](o) for o in cfg.sink_options]
    delivery = Delivery(sinks, cfg.delivery_options, Path(cfg.state.dir) / "spool")
    try:
        ok = delivery.deliver([finding])
        ok = delivery.flush(cfg.delivery_options.shutdown_timeout_s if cfg.delivery_options else 10.0) and ok
    finally:
        delivery.shutdown()
    return ok


# ----------------------------------------------------------------------------- presentation


def print_report(report: AuditReport) -> None:
    """Tables for people (``--json`` is for pipelines)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    m = report.metrics
    t = Table(title=f"audit: {report.new} against {report.old} ({report.reference_rows} reference rows)")
    for col in ("measure", "old", "new"):
        t.add_column(col, justify="right" if col != "measure" else "left")
    t.add_row("accuracy", f"{m['accuracy_old']:.4f}", f"{m['accuracy_new']:.4f}")
    t.add_row("ECE", f"{m['ece_old']:.4f}", f"{m['ece_new']:.4f}")
    t.add_row("flips (correct→wrong / wrong→correct)", "",
              f"{m['flips']} ({m['flips_correct_to_wrong']} / {m['flips_wrong_to_correct']})")
    for r in report.robustness:
        t.add_row(f"robust accuracy {r['attack']} eps {r['eps']:.3g}", f"{r['robust_accuracy_old']:.3f}",
                  f"{r['robust_accuracy_new']:.3f}")
    for s in report.strip:
        t.add_row(f"STRIP entropy, {s['probes']}", f"{s['entropy_old']:.3f}", f"{s['entropy_new']:.3f}")
    for tr in report.triggers:
        t.add_row(f"{tr['name']} success ({tr['origin']})", f"{tr['success_old']:.3f}", f"{tr['success_new']:.3f}")
    console.print(t)
    pc = Table(title="per class")
    for col in ("class", "rows", "acc old", "acc new", "flips", "predicted old", "predicted new"):
        pc.add_column(col, justify="right")
    for r in report.per_class:
        pc.add_row(str(r["class"]), str(r["rows"]), f"{r['accuracy_old']:.3f}", f"{r['accuracy_new']:.3f}",
                   str(r["flips"]), str(r["predicted_old"]), str(r["predicted_new"]))
    console.print(pc)
    g = Table(title="gates")
    for col in ("gate", "limit", "value", "result", "detail"):
        g.add_column(col)
    for r in report.gates:
        g.add_row(r.gate, f"{r.limit:g}", f"{r.value:.4g}", "[green]pass[/]" if r.passed else "[red]FAIL[/]",
                  r.detail)
    console.print(g)
    console.print("[green]audit passed[/]" if report.passed else "[red]audit failed: do not roll this version out[/]")


def run_audit(old_path: str, new_path: str, reference_path: str, *, quarantine_path: str | None = None,
              gates_path: str | None = None, config_path: str | None = None, as_json: bool = False,
              device: str = "auto") -> int:
    """The ``audit`` command: 0 all gates pass, 1 a gate fails (raises on bad input: the CLI maps it to 2)."""
    import sys

    from agent.device import resolve_device

    gates = load_gates(gates_path)
    if config_path is not None:
        from agent.config import load_config

        load_config(config_path)  # fail on a bad config before spending time on the measurements
    ref = load_reference(reference_path)
    try:
        dev = resolve_device(device)
    except ValueError as exc:
        raise AuditInputError([f"--device: {exc}"]) from None
    old = load_model(old_path, ref.input_shape, dev)
    new = load_model(new_path, ref.input_shape, dev)
    quarantine = read_quarantine(quarantine_path) if quarantine_path else []
    report = audit_models(old, new, ref, old_name=str(old_path), new_name=str(new_path), quarantine=quarantine,
                          gates=gates)
    if as_json:
        json.dump(report.to_json(), sys.stdout, indent=2, default=float)
        sys.stdout.write("\n")
    else:
        print_report(report)
    finding = audit_finding(report, Path(new_path).stem, sha256_of(new_path))
    if finding is not None and config_path is not None and not deliver_finding(finding, config_path):
        print(f"{config_path}: sinks: the audit finding could not be delivered to every sink (it stays spooled)",
              file=sys.stderr)
    return 0 if report.passed else 1
