"""A simulated model service under attack, for the demo.

A real PyTorch classifier trained on scikit-learn's digits answers queries from
a few hundred benign clients and logs every request and response **the way
KServe's inference logger does** (CloudEvents Kafka binding: ``ce_*`` headers,
Open Inference Protocol v2 bodies, request and response on their own topics,
the caller in ``ce_metadata``). Attack campaigns of every family start at
random times:

- evasion, white-box: PGD-L∞ adversarial examples crafted against the model;
- evasion, black-box, query by query: SimBA driven by the service's own answers;
- extraction with synthetic queries (Jacobian-based augmentation, Papernot et al.)
  and with natural out-of-task data (Knockoff-style);
- covariate drift: a brightness/contrast change of the whole input stream;
- poisoned feedback: label flips from one reviewer, a backdoor trigger from another.

Attacks are built with the same implementations the evaluation uses, against
this service's model. The ground truth (which ids and clients are attacks) is
kept for the scoreboard.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import torch

from agent.model import train_classifier
from agent.report import Campaign
from agent.scenarios.data import Dataset, load, split_for_deployment

TOPICS = {"request": "inferwatch.kserve.request", "response": "inferwatch.kserve.response",
          "feedback": "inferwatch.feedback"}
# (offset s, topic kind, body, CloudEvents fields): encoded when published, stamped with the real send time
PlanItem = tuple[float, str, dict | bytes, dict | None]


@dataclass
class GroundTruth:
    evasion_ids: set[str] = field(default_factory=set)
    benign_inference_ids: set[str] = field(default_factory=set)
    attack_clients: dict[str, str] = field(default_factory=dict)  # client -> campaign
    benign_clients: set[str] = field(default_factory=set)
    client_queries: dict[str, list[str]] = field(default_factory=dict)  # attacker -> ids in order
    drift_ids: list[str] = field(default_factory=list)
    poisoned_feedback_ids: set[str] = field(default_factory=set)
    benign_feedback_ids: set[str] = field(default_factory=set)
    broken: int = 0
    campaigns: list[Campaign] = field(default_factory=list)
    traffic: dict[str, list[float]] = field(default_factory=dict)  # kind -> offsets (s), for the report

    def to_json(self) -> dict:
        return {"evasion_records": len(self.evasion_ids), "attack_clients": self.attack_clients,
                "drift_records": len(self.drift_ids), "poisoned_feedback": len(self.poisoned_feedback_ids),
                "benign_clients": len(self.benign_clients), "broken_records": self.broken,
                "campaigns": [c.__dict__ for c in self.campaigns]}


class ModelService:
    """The deployed model: a small PyTorch classifier on digits, answering with class probabilities."""

    def __init__(self, seed: int = 0, device: torch.device | None = None):
        self.ds: Dataset = load("digits", seed)
        self.device = device or torch.device("cpu")
        # As a team deploys: the model trains on one part, the rest is validation data the monitor calibrates on.
        X_model, y_model, self.X_reference, self.y_reference = split_for_deployment(self.ds, seed)
        self.model = train_classifier(X_model, y_model, self.ds.input_shape, self.device, epochs=40, seed=seed)
        self.name, self.version = "digits-mlp", "1"

    def answer(self, X: np.ndarray) -> np.ndarray:
        return self.model.predict_proba(X)


def _ce_headers(kind: str, rid: str, ts: float, client: str, model: str) -> list[tuple[str, bytes]]:
    """CloudEvents binary-mode headers as KServe's logger writes them (the caller forwarded in ce_metadata)."""
    when = datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    h = {"ce_specversion": "1.0", "ce_id": rid, "ce_type": f"org.kubeflow.serving.inference.{kind}",
         "ce_source": "http://localhost:9081/", "ce_time": when, "ce_inferenceservicename": model,
         "ce_namespace": "models", "ce_component": "predictor", "ce_endpoint": "default",
         "ce_metadata": json.dumps({"X-Client-Id": [client]}), "content-type": "application/json"}
    return [(k, v.encode()) for k, v in h.items()]


class TrafficPlan:
    """Builds the whole stream ahead of time, so the publisher only has to keep to the schedule."""

    def __init__(self, service: ModelService, duration_s: float, rate: float, n_clients: int = 300, seed: int = 1):
        self.service = service
        self.rng = np.random.default_rng(seed)
        self.duration_s, self.rate, self.n_clients = duration_s, rate, n_clients
        self.truth = GroundTruth()

    def _window(self, lo: float, hi: float, length: float) -> tuple[float, float]:
        """A campaign of ``length`` (fraction of the run) starting at a random time in [lo, hi]."""
        start = float(self.rng.uniform(lo, hi)) * self.duration_s
        return start, min(self.duration_s, start + length * self.duration_s)

    def build(self) -> tuple[list[PlanItem], GroundTruth]:
        from agent.scenarios import extraction as ext
        from detectors._attacks import pgd_linf

        ds, rng, T, truth = self.service.ds, self.rng, self.duration_s, self.truth
        oracle = self.service.answer
        n = int(T * self.rate)
        rows = rng.integers(0, len(ds.X_test), n)
        X = ds.X_test[rows].copy()
        t = np.sort(rng.uniform(0, T, n))
        # a long tail of light tenants and a few heavy ones; the heaviest sends at most ~2 % of the traffic
        weights = np.minimum(rng.pareto(1.5, self.n_clients) + 1, 0.02 * self.n_clients)
        clients = np.array([f"tenant-{c}" for c in rng.choice(self.n_clients, n, p=weights / weights.sum())])
        kinds = np.array(["benign"] * n, dtype=object)
        streams: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

        # covariate drift: a brightness/contrast change of every benign query from a random time on
        d0, _ = self._window(0.55, 0.7, 0.0)
        drifted = t >= d0
        X[drifted] = np.clip(0.6 * X[drifted] + 0.3, 0, 1)
        kinds[drifted] = "drift"
        truth.campaigns.append(Campaign("drift", "brightness/contrast shift", d0, T))

        # evasion, white-box: PGD-L∞ (eps 0.2) from two clients
        s, e = self._window(0.1, 0.35, 0.25)
        m = max(60, n // 80)
        seeds = rng.integers(0, len(ds.X_test), m)
        x0 = torch.as_tensor(ds.X_test[seeds], device=self.service.device)
        y0 = torch.as_tensor(ds.y_test[seeds], device=self.service.device)
        adv = pgd_linf(self.service.model.logits, x0, y0, 0.2, ds.lo, ds.hi).detach().cpu().numpy()
        streams.append((adv.astype(np.float32), np.sort(rng.uniform(s, e, m)),
                        rng.choice(["evader-1", "evader-2"], m), np.array(["evasion"] * m, object)))
        truth.campaigns.append(Campaign("evasion", "PGD-L∞ white-box", s, e))

        budget = 400
        for client, label, family, queries, lo, hi in (
            ("prober-bb", "SimBA black-box probing", "evasion",
             ext.simba(ds, oracle, budget, rng, eps=0.2), 0.15, 0.5),
            ("scraper-jbda", "extraction: synthetic (JbDA)", "extraction",
             ext.jbda(ds, oracle, budget, rng, lam=0.1), 0.05, 0.45),
            ("knockoff-7", "extraction: natural out-of-task", "extraction",
             ext.out_of_task_pool(ds, rng)[rng.integers(0, len(ds.X_test), budget)], 0.3, 0.6),
        ):
            s, e = self._window(lo, hi, 0.3)
            streams.append((queries.astype(np.float32), np.sort(rng.uniform(s, e, len(queries))),
                            np.array([client] * len(queries)), np.array([f"probe:{family}"] * len(queries), object)))
            truth.attack_clients[client] = label
            truth.campaigns.append(Campaign("extraction" if family == "extraction" else "evasion", label, s, e))

        Xall = np.concatenate([X, *(st[0] for st in streams)])
        tall = np.concatenate([t, *(st[1] for st in streams)])
        call = np.concatenate([clients, *(st[2] for st in streams)])
        kall = np.concatenate([kinds, *(st[3] for st in streams)])
        order = np.argsort(tall, kind="stable")
        probs = self.service.answer(Xall)
        out: list[PlanItem] = []
        for seq, i in enumerate(order.tolist()):
            rid, kind, cid = f"req-{seq}", str(kall[i]), str(call[i])
            request = {"id": rid, "inputs": [{"name": "input-0", "shape": [1, ds.dim], "datatype": "FP32",
                                              "data": np.round(Xall[i], 4).tolist()}]}
            response = {"model_name": self.service.name, "model_version": self.service.version, "id": rid,
                        "outputs": [{"name": "output-0", "shape": [1, ds.n_classes], "datatype": "FP32",
                                     "data": np.round(probs[i], 5).tolist()}]}
            ce = {"rid": rid, "client": cid, "model": self.service.name}
            out.append((float(tall[i]), "request", request, ce))
            out.append((float(tall[i]) + 0.002, "response", response, ce))
            truth.traffic.setdefault(kind.split(":")[0], []).append(float(tall[i]))
            if kind == "evasion":
                truth.evasion_ids.add(rid)
                truth.attack_clients.setdefault(cid, "PGD-L∞ white-box")
            elif kind.startswith("probe:"):
                truth.client_queries.setdefault(cid, []).append(rid)
            else:
                truth.benign_inference_ids.add(rid)
                truth.benign_clients.add(cid)
                if kind == "drift":
                    truth.drift_ids.append(rid)
        out += self._feedback()
        out += self._broken()
        out.sort(key=lambda r: r[0])
        return out, truth

    def _feedback(self) -> list[PlanItem]:
        """Labelled feedback from reviewers; one source flips labels, another plants a backdoor trigger."""
        ds, rng, T, truth = self.service.ds, self.rng, self.duration_s, self.truth
        n = max(1500, int(T * self.rate * 0.2))
        rows = rng.integers(0, len(ds.X_test), n)
        X = ds.X_test[rows].copy()
        y = ds.y_test[rows].copy()
        t = np.sort(rng.uniform(0, T, n))
        sources = rng.choice([f"reviewer-{i}" for i in range(12)], n)
        s1, e1 = self._window(0.1, 0.5, 0.4)
        flip = (rng.random(n) < 0.06) & (t >= s1) & (t <= e1)  # ≈2.5 % of all feedback
        y[flip] = (y[flip] + rng.integers(1, ds.n_classes, flip.sum())) % ds.n_classes
        sources[flip] = "reviewer-7"
        s2, e2 = self._window(0.3, 0.6, 0.35)
        backdoor = ~flip & (rng.random(n) < 0.06) & (t >= s2) & (t <= e2)  # a bright 2x2 patch, relabelled 0
        img = X[backdoor].reshape(-1, 8, 8)
        img[:, 6:, 6:] = 1.0
        X[backdoor] = img.reshape(-1, ds.dim)
        y[backdoor] = 0
        sources[backdoor] = "labeler-x"
        truth.campaigns += [Campaign("poisoning", "label flips (reviewer-7)", s1, e1),
                            Campaign("poisoning", "backdoor trigger (labeler-x)", s2, e2)]
        out: list[PlanItem] = []
        for i in range(n):
            fid = f"fb-{i}"
            (truth.poisoned_feedback_ids if flip[i] or backdoor[i] else truth.benign_feedback_ids).add(fid)
            rec = {"id": fid, "ts": None, "model": self.service.name, "source": str(sources[i]),
                   "input": np.round(X[i], 4).tolist(), "label": int(y[i])}
            out.append((float(t[i]), "feedback", rec, None))
            truth.traffic.setdefault("feedback", []).append(float(t[i]))
        return out

    def _broken(self) -> list[PlanItem]:
        """Records a real stream also carries: garbage, wrong shapes, NaN. They must be dead-lettered."""
        bad = [b"not json at all", b'{"id": "x"}',
               b'{"id": "y", "ts": 1, "model": "m", "source": "s", "input": [NaN], "label": 1}']
        out = [(float(self.rng.uniform(0, self.duration_s)), "feedback", bad[i % len(bad)], None) for i in range(30)]
        self.truth.broken = len(out)
        return out


def encode(item: PlanItem, t0: float) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The record as the service would send it now: event time = the moment it is published."""
    offset, kind, body, ce = item
    if isinstance(body, bytes):
        return body, []
    if ce is None:  # native feedback record
        return json.dumps({**body, "ts": round(t0 + offset, 3)}).encode(), []
    return json.dumps(body).encode(), _ce_headers(kind, ce["rid"], t0 + offset, ce["client"], ce["model"])


def publish(plan: list[PlanItem], producer, t0: float, progress: dict, stop) -> None:
    """Publish records at their scheduled time, as the model service would."""
    for item in plan:
        if stop.is_set():
            break
        delay = t0 + item[0] - time.time()
        if delay > 0:
            time.sleep(delay)
        value, headers = encode(item, t0)
        producer.send(TOPICS[item[1]], value, headers=headers)
        progress["produced"] = progress.get("produced", 0) + 1
    producer.flush()
    progress["done"] = True
