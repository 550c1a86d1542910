"""Adversarial-example (evasion) detector: a classifier of clean vs attacked inputs, calibrated on clean data.

Why a learned detector on *generic* features rather than one statistic: each
published single statistic (feature squeezing, Mahalanobis, noise stability)
is strong against some attacks and blind to others. ``fit`` attacks the
watched model itself (FGSM, PGD-L∞, PGD-L2, DeepFool at several strengths, on
reference rows), computes the twelve features of ``_adv_features`` for clean
and attacked rows, and trains a logistic regression (or a small MLP) to tell
them apart. Attacks never seen in fit (Carlini-Wagner, black-box SimBA, other
strengths) are what the evaluation measures it on.

The threshold is not learned from attacks: the scorer's output for every
record is turned into a conformal p-value against held-out *clean* reference
rows (and jittered copies of them), so flagging ``p <= fpr`` has a
false-positive rate of about ``fpr`` on data like the reference data. The
p-value goes to ``notes["adv_score"]``.

Known limit, measured in ``agent/scenarios/evasion.py``: reference rows are
usually the model's own training rows, on which it is never wrong. On new
traffic the model's natural mistakes (2% of digits) look like minimal
adversarial examples, and about a third of them are flagged; the clean rows
seen through a shadow model (``natural_negatives``) teach the scorer some of
the difference, not all of it.

Findings: one per flagged record (ATLAS AML.T0015 Evade AI Model, crafted by
AML.T0043.000 white-box optimisation, or AML.T0043.001 black-box
optimisation when the client's queries are a chain of near-duplicates, the
signature of query-based attacks), and one aggregate per client campaign
when a client's flagged share stays high, or its flagged count does while it
sends near-duplicate chains (same uid while it lasts, re-raised only when its
count doubles).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import nn

from agent.findings import MAX_RELATED, Finding, Severity
from agent.records import InferenceBatch
from agent.reference import ReferenceData
from detectors import _attacks as attacks
from detectors._adv_features import N_FEATURES, FeatureExtractor, FeatureSpec, fit_spec
from detectors._conformal import ConformalCalibrator
from detectors.base import Detector, DetectorOptions

WHITE_BOX = ("AML.T0015", "AML.T0043.000")
BLACK_BOX = ("AML.T0015", "AML.T0043.001")


def _scorer(hidden: int) -> nn.Module:
    """Logistic regression when ``hidden`` is 0 (the default: it generalises best to unseen attacks), else an MLP."""
    if hidden == 0:
        return nn.Sequential(nn.Linear(N_FEATURES, 1))
    return nn.Sequential(nn.Linear(N_FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 1))


class AdversarialDetector(Detector):
    """Clean-vs-adversarial MLP on squeezing / stability / confidence / manifold features."""

    name = "adversarial"
    family = "evasion"
    stream = "inference"
    requires_fit = True
    needs_model = True
    priority = 20

    class Options(DetectorOptions):
        fpr: float = Field(0.01, gt=0, lt=0.5,
                           description="per-record false-positive rate on clean inputs: a record is flagged "
                                       "when its calibrated p-value is at most this")
        holdout: float = Field(0.3, gt=0.05, lt=0.9,
                               description="share of reference rows kept clean and unseen to calibrate p-values")
        train_share: float = Field(0.45, gt=0.1, lt=0.9,
                                   description="share of the non-calibration reference rows the detector is "
                                               "trained on (the rest fit the normal-data statistics)")
        linf_eps: list[float] = Field([0.35, 0.7],
                                      description="L∞ attack strengths used in fit, in units of the reference "
                                                  "data's RMS per-feature standard deviation")
        l2_eps: list[float] = Field([0.3, 0.6],
                                    description="L2 attack strengths used in fit, in units of RMS std × sqrt(dim)")
        pgd_steps: int = Field(20, ge=1, description="PGD iterations used to craft training adversarials")
        noise_copies: int = Field(2, ge=1, le=16, description="noisy copies per record for the stability features")
        noise_scale: float = Field(0.1, gt=0, description="noise std as a fraction of each feature's std")
        squeeze_bits: int = Field(3, ge=1, le=8, description="bit depth of the image squeezer")
        pca_variance: float = Field(0.95, gt=0, le=1.0,
                                    description="variance share of the principal subspace for the off-manifold "
                                                "residual feature")
        calibration_jitter: float = Field(
            0.2, ge=0, description="calibrate also on held-out rows plus Gaussian noise of this share of each "
                                   "feature's std: reference rows are often the model's own training rows, on "
                                   "which it is more confident than on new traffic, so plain calibration "
                                   "under-states the false-positive rate")
        natural_negatives: bool = Field(
            True, description="train the detector also on clean rows seen through a shadow model that never "
                              "trained on them (natural, unfamiliar inputs and honest mistakes are not attacks)")
        hidden: int = Field(0, ge=0, description="width of the scoring MLP; 0 = logistic regression")
        epochs: int = Field(400, ge=10, description="full-batch training epochs of the scoring MLP")
        max_record_findings_per_batch: int = Field(100, ge=0, description="cap on per-record findings per batch")
        client_half_life_s: float = Field(300.0, gt=0,
                                          description="half-life (event time) of a client's decayed counts")
        client_min_flagged: float = Field(5.0, gt=0,
                                          description="decayed flagged count a client needs for a campaign")
        client_min_share: float = Field(0.2, gt=0, le=1,
                                        description="decayed flagged share a client needs for a campaign "
                                                    "(benign clients sit near `fpr`)")
        near_duplicate: float = Field(0.25, gt=0,
                                      description="a query is a near-duplicate of the client's previous one when "
                                                  "closer than this share of the median distance between "
                                                  "reference rows")
        black_box_share: float = Field(0.5, gt=0, le=1,
                                       description="decayed near-duplicate share above which a client's flagged "
                                                   "queries are attributed to black-box optimisation")
        max_clients: int = Field(100_000, ge=1, description="clients tracked at once (least recently seen evicted)")

    def __init__(self, options: DetectorOptions, context):
        super().__init__(options, context)
        self.opts: AdversarialDetector.Options = options  # type: ignore[assignment]
        self.spec: FeatureSpec | None = None
        self.scorer: nn.Module | None = None
        self.feat_mean: np.ndarray | None = None
        self.feat_std: np.ndarray | None = None
        self.calibrator: ConformalCalibrator | None = None
        self.typical_distance = 1.0
        self.fit_report: dict[str, Any] = {}
        self._extractor: FeatureExtractor | None = None
        self._clients: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._counters = {"records": 0, "flagged": 0, "record_findings": 0, "record_findings_capped": 0,
                          "campaigns": 0, "evicted_clients": 0}

    # ------------------------------------------------------------------ fitting
    def _model(self):
        if self.context.model is None:
            raise RuntimeError("adversarial needs a model: give `train --model` or let it train a surrogate")
        return self.context.model

    def fit(self, reference: ReferenceData) -> None:
        """Attack the watched model on reference rows, learn clean vs attacked, calibrate on held-out clean rows."""
        model = self._model()
        dev = self.context.device
        # three disjoint parts: normal-data statistics (neighbours, PCA), detector training, calibration.
        # Features of a row must never be measured against statistics that contain the row itself.
        fit_part, cal_part = reference.split(self.opts.holdout, seed=self.context.seed)
        spec_part, fit_part = fit_part.split(self.opts.train_share, seed=self.context.seed + 1)
        self.spec = fit_spec(spec_part.X, reference.input_shape, model.logits, dev, self.opts.noise_copies,
                             self.opts.noise_scale, self.opts.squeeze_bits, self.opts.pca_variance,
                             self.context.seed)
        self._extractor = None
        X = torch.as_tensor(fit_part.X, dtype=torch.float32, device=dev)
        with torch.no_grad():
            y = model.logits(X).argmax(1)
        lo, hi = float(reference.X.min()), float(reference.X.max())
        rms = float(np.sqrt((reference.X.std(0) ** 2).mean()))
        l2_unit = rms * np.sqrt(reference.dim)
        crafted: list[torch.Tensor] = []
        made: dict[str, int] = {}
        for i, eps in enumerate(self.opts.linf_eps):
            for name, adv in (
                (f"fgsm_{eps}", attacks.fgsm(model.logits, X, y, eps * rms, lo, hi)),
                (f"pgd_linf_{eps}", attacks.pgd_linf(model.logits, X, y, eps * rms, lo, hi,
                                                     self.opts.pgd_steps, seed=self.context.seed + i)),
            ):
                crafted.append(self._successful(model, adv, y, made, name))
        for i, eps in enumerate(self.opts.l2_eps):
            adv = attacks.pgd_l2(model.logits, X, y, eps * l2_unit, lo, hi, self.opts.pgd_steps,
                                 seed=self.context.seed + 100 + i)
            crafted.append(self._successful(model, adv, y, made, f"pgd_l2_{eps}"))
        crafted.append(self._successful(model, attacks.deepfool(model.logits, X, lo, hi), y, made, "deepfool"))
        adv_all = torch.cat(crafted)
        # clean rows plus slightly noisy clean rows, so natural jitter is not mistaken for an attack
        gen = torch.Generator().manual_seed(self.context.seed)
        std_t = torch.as_tensor(self.spec.std, device=dev)
        clean = torch.cat([X, (X + torch.randn(X.shape, generator=gen).to(dev) * 0.05 * std_t).clamp(lo, hi)])
        with torch.no_grad():
            f_clean = self._features_t(clean, None)
            f_adv = self._features_t(adv_all, None)
        if self.opts.natural_negatives:
            f_clean = torch.cat([f_clean, self._natural_negatives(spec_part, fit_part, cal_part,
                                                                  reference.input_shape)])
        feats = torch.cat([f_clean, f_adv])
        labels = torch.cat([torch.zeros(len(f_clean)), torch.ones(len(f_adv))]).to(dev)
        self.feat_mean = feats.mean(0).cpu().numpy()
        self.feat_std = (feats.std(0) + 1e-6).cpu().numpy()
        z = (feats - torch.as_tensor(self.feat_mean, device=dev)) / torch.as_tensor(self.feat_std, device=dev)
        torch.manual_seed(self.context.seed)
        scorer = _scorer(self.opts.hidden).to(dev)
        opt = torch.optim.Adam(scorer.parameters(), lr=2e-2, weight_decay=1e-4)
        pos_weight = torch.tensor(len(f_clean) / max(len(f_adv), 1), device=dev)
        for _ in range(self.opts.epochs):
            loss = nn.functional.binary_cross_entropy_with_logits(scorer(z)[:, 0], labels, pos_weight=pos_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
        scorer.eval()
        for p in scorer.parameters():
            p.requires_grad_(False)
        self.scorer = scorer
        self.calibrator = ConformalCalibrator.fit(self._calibration_scores(cal_part.X, lo, hi))
        ref = fit_part.X[np.random.default_rng(self.context.seed).permutation(len(fit_part.X))[:400]]
        dists = np.linalg.norm(ref[: len(ref) // 2] - ref[len(ref) // 2 : 2 * (len(ref) // 2)], axis=1)
        self.typical_distance = float(np.median(dists)) if len(dists) else 1.0
        self.fit_report = {"adversarials": made, "clean": len(f_clean), "calibration": len(cal_part.X)}

    def _natural_negatives(self, spec_part: ReferenceData, fit_part: ReferenceData, cal_part: ReferenceData,
                           input_shape: tuple[int, ...]) -> torch.Tensor:
        """Features of clean rows as a model sees inputs it never trained on, natural errors included.

        The watched model has seen every reference row, so on them it is never
        unsure and never wrong; new traffic has both. A shadow MLP (the
        surrogate recipe) trained on the other reference rows shows what clean
        but unfamiliar inputs look like, so the detector learns not to call
        every natural mistake an attack and to lean on the input-space cues.
        """
        from agent.model import train_classifier

        dev = self.context.device
        X = np.concatenate([spec_part.X, cal_part.X])
        if spec_part.y is not None and cal_part.y is not None:
            y = np.concatenate([spec_part.y, cal_part.y])
        else:
            y = self._model().predict_proba(X).argmax(1)
        with torch.enable_grad():
            shadow = train_classifier(X, y, input_shape, dev, epochs=60, seed=self.context.seed + 2)
        spec = fit_spec(spec_part.X, input_shape, shadow.logits, dev, self.opts.noise_copies, self.opts.noise_scale,
                        self.opts.squeeze_bits, self.opts.pca_variance, self.context.seed)
        with torch.no_grad():
            return FeatureExtractor(spec, shadow.logits, dev)(torch.as_tensor(fit_part.X, device=dev))

    def _calibration_scores(self, X: np.ndarray, lo: float, hi: float) -> np.ndarray:
        """Scores of held-out clean rows and of two jittered copies (new traffic is less familiar to the model)."""
        parts = [self.score(X)]
        if self.opts.calibration_jitter > 0:
            rng = np.random.default_rng(self.context.seed + 1)
            for _ in range(2):
                noise = rng.normal(0, 1, X.shape) * self.opts.calibration_jitter * self.spec.std
                parts.append(self.score(np.clip(X + noise, lo, hi).astype(np.float32)))
        return np.concatenate(parts)

    @staticmethod
    def _successful(model, adv: torch.Tensor, y: torch.Tensor, made: dict[str, int], name: str) -> torch.Tensor:
        with torch.no_grad():
            ok = model.logits(adv).argmax(1) != y
        made[name] = int(ok.sum())
        return adv[ok]

    # ----------------------------------------------------------------- scoring
    def extractor(self) -> FeatureExtractor:
        if self.spec is None:
            raise RuntimeError("adversarial is not fitted: run `inferwatch train` or load its artifacts")
        if self._extractor is None:
            self._extractor = FeatureExtractor(self.spec, self._model().logits, self.context.device)
        return self._extractor

    def _features_t(self, x: torch.Tensor, record_probs: torch.Tensor | None) -> torch.Tensor:
        return self.extractor()(x, record_probs)

    def score_tensor(self, x: torch.Tensor, record_probs: torch.Tensor | None = None) -> torch.Tensor:
        """Differentiable detector logit (higher = more adversarial); used by detector-aware attacks too."""
        dev = self.context.device
        z = (self._features_t(x, record_probs) - torch.as_tensor(self.feat_mean, device=dev)) / torch.as_tensor(
            self.feat_std, device=dev)
        return self.scorer(z)[:, 0]

    def score(self, X: np.ndarray, probs: np.ndarray | None = None) -> np.ndarray:
        """Detector logit per row, one batched torch call."""
        dev = self.context.device
        with torch.inference_mode():
            x = torch.as_tensor(np.asarray(X, np.float32), device=dev)
            rp = None if probs is None else torch.as_tensor(np.asarray(probs, np.float32), device=dev)
            return self.score_tensor(x, rp).double().cpu().numpy()

    def pvalues(self, X: np.ndarray, probs: np.ndarray | None = None) -> np.ndarray:
        """Calibrated p-value per row: small = more adversarial-looking than held-out clean rows."""
        return self.calibrator.rank_pvalues(self.score(X, probs))

    def artifacts(self) -> dict[str, Any]:
        if self.scorer is None or self.spec is None or self.calibrator is None:
            raise RuntimeError("adversarial has nothing to save: fit() it first")
        return {
            "spec": self.spec.to_tree(), "hidden": self.opts.hidden,
            "scorer": {k: v.detach().cpu().numpy() for k, v in self.scorer.state_dict().items()},
            "feat_mean": self.feat_mean, "feat_std": self.feat_std, "calibrator": self.calibrator.to_tree(),
            "typical_distance": self.typical_distance, "fit_report": self.fit_report,
        }

    def load_artifacts(self, tree: dict[str, Any]) -> None:
        self.spec = FeatureSpec.from_tree(tree["spec"])
        scorer = _scorer(int(tree["hidden"]))
        scorer.load_state_dict({k: torch.as_tensor(v) for k, v in tree["scorer"].items()})
        self.scorer = scorer.to(self.context.device).eval()
        for p in self.scorer.parameters():
            p.requires_grad_(False)
        self.feat_mean = np.asarray(tree["feat_mean"], np.float32)
        self.feat_std = np.asarray(tree["feat_std"], np.float32)
        self.calibrator = ConformalCalibrator.from_tree(tree["calibrator"])
        self.typical_distance = float(tree["typical_distance"])
        self.fit_report = dict(tree.get("fit_report", {}))
        self._extractor = None

    # ---------------------------------------------------------------- hot path
    def update(self, batch: InferenceBatch, notes: dict[str, Any]) -> list[Finding]:
        n = len(batch)
        if n == 0:
            notes["adv_score"] = np.zeros(0)
            return []
        p = self.pvalues(batch.X, batch.probs)
        notes["adv_score"] = p
        flagged = p <= self.opts.fpr
        self._counters["records"] += n
        self._counters["flagged"] += int(flagged.sum())
        findings: list[Finding] = []
        clients = np.asarray(batch.clients, dtype=object)
        uniq, first, inverse = np.unique(clients, return_index=True, return_inverse=True)
        by_client = np.argsort(inverse, kind="stable")  # rows of each client, in arrival order
        groups = np.split(by_client, np.cumsum(np.bincount(inverse, minlength=len(uniq)))[:-1])
        near_dup = self._near_duplicates(batch, uniq, groups)
        black_box_clients: set[str] = set()
        for ci in np.argsort(first, kind="stable").tolist():
            client = str(uniq[ci])
            f = self._client_update(client, batch, groups[ci], flagged, near_dup, p)
            if f is not None:
                findings.append(f)
            st = self._clients[client]
            if st["dup"] >= self.opts.black_box_share * max(st["total"], 1e-9):
                black_box_clients.add(client)
        findings[:0] = self._record_findings(batch, p, flagged, black_box_clients)
        return findings

    def _near_duplicates(self, batch: InferenceBatch, uniq: np.ndarray, groups: list[np.ndarray]) -> np.ndarray:
        """Whether each record is a near-duplicate of the same client's previous query (SimBA-style chains)."""
        prev = np.full_like(batch.X, np.inf)
        for client, rows in zip(uniq.tolist(), groups):
            prev[rows[1:]] = batch.X[rows[:-1]]
            state = self._clients.get(client)
            if state is not None and state["last_x"] is not None:
                prev[rows[0]] = state["last_x"]
        with np.errstate(invalid="ignore"):
            dist = np.linalg.norm(batch.X - prev, axis=1)
        return np.isfinite(dist) & (dist < self.opts.near_duplicate * self.typical_distance)

    def _client_state(self, client: str) -> dict[str, Any]:
        if client in self._clients:
            self._clients.move_to_end(client)
            return self._clients[client]
        while len(self._clients) >= self.opts.max_clients:
            self._clients.popitem(last=False)
            self._counters["evicted_clients"] += 1
        state = {"ts": None, "total": 0.0, "flagged": 0.0, "dup": 0.0, "last_x": None, "campaign": None,
                 "recent": deque(maxlen=32)}
        self._clients[client] = state
        return state

    def _client_update(self, client: str, batch: InferenceBatch, rows: np.ndarray, flagged: np.ndarray,
                       near_dup: np.ndarray, p: np.ndarray) -> Finding | None:
        """Decayed (event-time) totals per client; a campaign opens when flagged count and share are high."""
        st = self._client_state(client)
        ts = float(batch.ts[rows[-1]])
        if st["ts"] is not None:
            decay = 0.5 ** (max(ts - st["ts"], 0.0) / self.opts.client_half_life_s)
            st["total"] *= decay
            st["flagged"] *= decay
            st["dup"] *= decay
        st["ts"] = ts
        st["total"] += len(rows)
        st["flagged"] += float(flagged[rows].sum())
        st["dup"] += float(near_dup[rows].sum())
        st["last_x"] = batch.X[rows[-1]].copy()
        hit = rows[flagged[rows]]
        camp = st["campaign"]
        if camp is None:
            st["recent"].extend(batch.ids[i] for i in hit.tolist())
        else:
            room = MAX_RELATED - len(camp["ids"])
            camp["ids"].extend(batch.ids[i] for i in hit[:room].tolist())
            camp["count"] += len(hit)
            camp["last_ts"] = ts
        black_box = st["dup"] >= self.opts.black_box_share * st["total"]
        # a query-based attacker's flagged share is small (most of its queries are probes), but benign
        # clients do not send chains of near-duplicates: for them the count alone makes the campaign
        active = st["flagged"] >= self.opts.client_min_flagged and (
            black_box or st["flagged"] >= self.opts.client_min_share * st["total"])
        if camp is not None and st["flagged"] < 1.0:
            st["campaign"] = None  # quiet for several half-lives: the campaign is over
            return None
        if not active:
            return None
        if camp is None:
            start_ts = float(batch.ts[hit[0]]) if len(hit) else ts
            camp = {"start_ts": start_ts, "ids": list(st["recent"]), "count": len(st["recent"]),
                    "reported": 0, "last_ts": ts}
            st["recent"].clear()
            st["campaign"] = camp
            self._counters["campaigns"] += 1
        if camp["count"] < 2 * camp["reported"]:
            return None
        camp["reported"] = camp["count"]
        return Finding(
            family="evasion", detector=self.name, title="Client sending adversarial examples",
            severity=Severity.HIGH, actor=client, model=batch.models[rows[-1]],
            related_ids=tuple(camp["ids"]), window=f"{client}:{camp['start_ts']:.3f}",
            evidence={"flagged_records": camp["count"], "decayed_flagged": round(st["flagged"], 3),
                      "decayed_total": round(st["total"], 3), "min_share": self.opts.client_min_share,
                      "near_duplicate_share": round(st["dup"] / max(st["total"], 1e-9), 3),
                      "campaign_start_ts": camp["start_ts"], "last_ts": ts, "fpr": self.opts.fpr,
                      "min_p": float(p[rows].min())},
            attacks=BLACK_BOX if black_box else WHITE_BOX,
            confidence=float(min(1.0, st["flagged"] / max(st["total"], 1e-9) + 0.3)),
            message=(f"client {client} sent {camp['count']} inputs flagged as adversarial since ts "
                     f"{camp['start_ts']:.3f} ({'query-based black-box' if black_box else 'white-box'} pattern)"),
            analytic_type="learning", time_ms=int(ts * 1000),
        )

    def _record_findings(self, batch: InferenceBatch, p: np.ndarray, flagged: np.ndarray,
                         black_box_clients: set[str]) -> list[Finding]:
        idx = np.flatnonzero(flagged)
        cap = self.opts.max_record_findings_per_batch
        if len(idx) > cap:
            self._counters["record_findings_capped"] += len(idx) - cap
            idx = idx[np.argsort(p[idx], kind="stable")[:cap]]
        out = []
        for i in idx.tolist():
            client = batch.clients[i]
            bb = client in black_box_clients
            self._counters["record_findings"] += 1
            out.append(Finding(
                family="evasion", detector=self.name, title="Adversarial example suspected",
                severity=Severity.MEDIUM if p[i] <= self.opts.fpr / 10 else Severity.LOW,
                actor=client, model=batch.models[i], related_ids=(batch.ids[i],), window=batch.ids[i],
                evidence={"adv_p": float(p[i]), "fpr": self.opts.fpr, "ts": float(batch.ts[i]),
                          "predicted_label": int(batch.labels[i])},
                attacks=BLACK_BOX if bb else WHITE_BOX,
                confidence=float(1.0 - p[i]),
                message=f"input {batch.ids[i]} from {client} looks adversarial (p={p[i]:.4f} <= {self.opts.fpr})",
                analytic_type="learning", time_ms=int(batch.ts[i] * 1000),
            ))
        return out

    # ------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Per-client state as a few columns (one array each), so a checkpoint of 100k clients stays small."""
        names = list(self._clients)
        sts = list(self._clients.values())
        dim = len(self.spec.mean) if self.spec is not None else 0
        last_x = np.zeros((len(sts), dim), np.float32)
        has_last = np.zeros(len(sts), dtype=bool)
        for i, st in enumerate(sts):
            if st["last_x"] is not None:
                last_x[i] = st["last_x"]
                has_last[i] = True
        return {
            "clients": names,
            "ts": np.array([np.nan if st["ts"] is None else st["ts"] for st in sts], np.float64),
            "total": np.array([st["total"] for st in sts], np.float64),
            "flagged": np.array([st["flagged"] for st in sts], np.float64),
            "dup": np.array([st["dup"] for st in sts], np.float64),
            "last_x": last_x, "has_last": has_last,
            "recent": {str(i): list(st["recent"]) for i, st in enumerate(sts) if st["recent"]},
            "campaigns": {str(i): {**st["campaign"], "ids": list(st["campaign"]["ids"])}
                          for i, st in enumerate(sts) if st["campaign"] is not None},
            "counters": dict(self._counters),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._clients = OrderedDict()
        ts = np.asarray(state["ts"], np.float64)
        for i, name in enumerate(state["clients"]):
            camp = state["campaigns"].get(str(i))
            self._clients[name] = {
                "ts": None if np.isnan(ts[i]) else float(ts[i]), "total": float(state["total"][i]),
                "flagged": float(state["flagged"][i]), "dup": float(state["dup"][i]),
                "last_x": np.array(state["last_x"][i], np.float32) if state["has_last"][i] else None,
                "recent": deque(state["recent"].get(str(i), []), maxlen=32),
                "campaign": None if camp is None else {**camp, "ids": list(camp["ids"])},
            }
        self._counters.update(state["counters"])
