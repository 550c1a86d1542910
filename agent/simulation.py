"""A simulated model service under attack, for the demo and the benchmark.

A real PyTorch classifier trained on scikit-learn's digits answers queries from
a few hundred benign clients, while attack campaigns of every family start at
random times: adversarial examples crafted against the model (FGSM, PGD), a
model-extraction client sending synthetic queries, covariate drift, a query
flood, and poisoned feedback (label flips and a backdoor trigger). Every record
is published in the native format, and the ground truth (which ids and clients
are attacks) is kept for the scoreboard.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from agent.model import WatchedModel, train_classifier
from agent.scenarios.data import Dataset, load


@dataclass
class GroundTruth:
    evasion_ids: set[str] = field(default_factory=set)
    benign_inference_ids: set[str] = field(default_factory=set)
    extraction_clients: set[str] = field(default_factory=set)
    benign_clients: set[str] = field(default_factory=set)
    client_queries: dict[str, list[str]] = field(default_factory=dict)  # attacker -> ids in order
    drift_start_id: int | None = None  # sequence number of the first drifted record
    drift_ids: list[str] = field(default_factory=list)
    poisoned_feedback_ids: set[str] = field(default_factory=set)
    benign_feedback_ids: set[str] = field(default_factory=set)
    broken: int = 0

    def to_json(self) -> dict:
        return {"evasion_records": len(self.evasion_ids), "extraction_clients": sorted(self.extraction_clients),
                "drift_records": len(self.drift_ids), "poisoned_feedback": len(self.poisoned_feedback_ids),
                "benign_clients": len(self.benign_clients), "broken_records": self.broken}


def fgsm(model: WatchedModel, X: np.ndarray, y: np.ndarray, eps: float, steps: int = 1, lo=0.0, hi=1.0) -> np.ndarray:
    """FGSM (steps=1) or PGD-L∞ (steps>1) against the model service's own model (white-box)."""
    x0 = torch.as_tensor(X, device=model.device)
    x = x0.clone()
    yt = torch.as_tensor(y, device=model.device)
    alpha = eps if steps == 1 else eps / 4
    for _ in range(steps):
        x.requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model.logits(x), yt)
        (grad,) = torch.autograd.grad(loss, x)
        x = (x.detach() + alpha * grad.sign()).clamp(x0 - eps, x0 + eps).clamp(lo, hi)
    return x.detach().cpu().numpy().astype(np.float32)


class ModelService:
    """Answers queries like a deployed model and writes what KServe's logger would: request + response."""

    def __init__(self, seed: int = 0, device: torch.device | None = None):
        self.ds: Dataset = load("digits", seed)
        self.device = device or torch.device("cpu")
        self.model = train_classifier(self.ds.X_train, self.ds.y_train, self.ds.input_shape, self.device,
                                      epochs=30, seed=seed)
        self.name = "digits-mlp"

    def answer(self, X: np.ndarray) -> np.ndarray:
        return self.model.predict_proba(X)


class TrafficPlan:
    """Builds the whole stream ahead of time (so the producer only has to publish)."""

    def __init__(self, service: ModelService, duration_s: float, rate: float, n_clients: int = 300, seed: int = 1):
        self.service = service
        self.rng = np.random.default_rng(seed)
        self.duration_s, self.rate, self.n_clients = duration_s, rate, n_clients
        self.truth = GroundTruth()
        self.epoch0 = round(time.time(), 3)  # event time of the schedule's start

    def build(self) -> tuple[list[tuple[float, str, bytes]], GroundTruth]:
        """Returns [(offset_s, topic_kind, value)] sorted by time, and the ground truth."""
        ds, rng, T = self.service.ds, self.rng, self.duration_s
        n = int(self.duration_s * self.rate)
        rows = rng.integers(0, len(ds.X_test), n)
        X = ds.X_test[rows] + rng.normal(0, 0.02, (n, ds.dim)).astype(np.float32)
        X = np.clip(X, 0, 1)
        t = np.sort(rng.uniform(0, T, n))
        weights = rng.pareto(1.5, self.n_clients) + 1
        clients = np.array([f"tenant-{c}" for c in rng.choice(self.n_clients, n, p=weights / weights.sum())])
        kinds = np.array(["benign"] * n, dtype=object)

        # covariate drift: from 60 % of the run, a brightness/contrast change on every benign query
        drift_at = 0.6 * T
        drifted = t >= drift_at
        X[drifted] = np.clip(0.55 * X[drifted] + 0.35 + rng.normal(0, 0.05, X[drifted].shape), 0, 1)
        kinds[drifted] = "drift"

        # evasion: PGD-L∞ examples sent by two clients, from 20 % to 50 % of the run
        m = max(40, n // 60)
        seeds = rng.integers(0, len(ds.X_test), m)
        adv = fgsm(self.service.model, ds.X_test[seeds], ds.y_test[seeds], eps=0.25, steps=10)
        adv_t = rng.uniform(0.2 * T, 0.5 * T, m)
        adv_c = rng.choice(["evader-1", "evader-2"], m)

        # extraction: one client sends uniform-random synthetic queries, steadily, from 10 % to 80 %
        k = max(300, n // 25)
        ext = rng.uniform(0, 1, (k, ds.dim)).astype(np.float32)
        ext_t = np.sort(rng.uniform(0.1 * T, 0.8 * T, k))

        # query flood: a scraper sending real-looking queries very fast in a short burst
        f = max(1500, n // 20)
        flood = np.clip(ds.X_test[rng.integers(0, len(ds.X_test), f)] + rng.normal(0, 0.02, (f, ds.dim)), 0, 1)
        flood_t = np.sort(rng.uniform(0.3 * T, 0.3 * T + 20, f))

        Xall = np.concatenate([X, adv, ext, flood.astype(np.float32)])
        tall = np.concatenate([t, adv_t, ext_t, flood_t])
        call = np.concatenate([clients, adv_c, np.array(["scraper-x"] * k), np.array(["flooder-9"] * f)])
        kall = np.concatenate([kinds, np.array(["evasion"] * m, object), np.array(["extraction"] * k, object),
                               np.array(["flood"] * f, object)])
        order = np.argsort(tall, kind="stable")
        probs = self.service.answer(Xall)
        out: list[tuple[float, str, bytes]] = []
        truth = self.truth
        for seq, i in enumerate(order.tolist()):
            rid = f"req-{seq}"
            kind = kall[i]
            cid = str(call[i])
            rec = {"id": rid, "ts": self.epoch0 + float(tall[i]), "model": self.service.name, "client_id": cid,
                   "input": np.round(Xall[i], 4).tolist(), "output": {"probs": np.round(probs[i], 5).tolist()}}
            out.append((float(tall[i]), "inference", json.dumps(rec).encode()))
            if kind == "evasion":
                truth.evasion_ids.add(rid)
            elif kind == "extraction":
                truth.extraction_clients.add(cid)
                truth.client_queries.setdefault(cid, []).append(rid)
            elif kind == "drift":
                truth.drift_ids.append(rid)
                if truth.drift_start_id is None:
                    truth.drift_start_id = seq
            if kind in ("benign", "drift"):
                truth.benign_inference_ids.add(rid)
                truth.benign_clients.add(cid)
        out += self._feedback()
        out += self._broken()
        out.sort(key=lambda r: r[0])
        return out, truth

    def _feedback(self) -> list[tuple[float, str, bytes]]:
        """Labelled feedback from reviewers; one source flips labels, one plants a backdoor trigger."""
        ds, rng, T = self.service.ds, self.rng, self.duration_s
        n = max(1000, int(self.duration_s * self.rate * 0.15))
        rows = rng.integers(0, len(ds.X_test), n)
        X = np.clip(ds.X_test[rows] + rng.normal(0, 0.02, (n, ds.dim)), 0, 1).astype(np.float32)
        y = ds.y_test[rows].copy()
        sources = rng.choice([f"reviewer-{i}" for i in range(12)], n)
        poisoned = np.zeros(n, bool)
        flip = rng.random(n) < 0.025  # label flips, 2.5 %, concentrated on one source
        y[flip] = (y[flip] + rng.integers(1, ds.n_classes, flip.sum())) % ds.n_classes
        sources[flip] = "reviewer-7"
        poisoned |= flip
        backdoor = (~poisoned) & (rng.random(n) < 0.02)  # a 2x2 bright patch in a corner, relabelled to 0
        img = X[backdoor].reshape(-1, 8, 8)
        img[:, 6:, 6:] = 1.0
        X[backdoor] = img.reshape(-1, 64)
        y[backdoor] = 0
        sources[backdoor] = "labeler-x"
        poisoned |= backdoor
        t = np.sort(rng.uniform(0.05 * T, 0.95 * T, n))
        out = []
        for i in range(n):
            fid = f"fb-{i}"
            (self.truth.poisoned_feedback_ids if poisoned[i] else self.truth.benign_feedback_ids).add(fid)
            rec = {"id": fid, "ts": self.epoch0 + float(t[i]), "model": self.service.name, "source": str(sources[i]),
                   "input": np.round(X[i], 4).tolist(), "label": int(y[i])}
            out.append((float(t[i]), "feedback", json.dumps(rec).encode()))
        return out

    def _broken(self) -> list[tuple[float, str, bytes]]:
        """Records a real stream also carries: garbage, wrong shapes, NaN; they must be dead-lettered."""
        rng, T = self.rng, self.duration_s
        bad = [b"not json at all", b'{"id": "x"}', b'{"id": "y", "ts": 1, "model": "m", "client_id": "c", '
               b'"input": [NaN], "output": {"label": 1}}']
        out = [(float(rng.uniform(0, T)), "inference", bad[i % len(bad)]) for i in range(30)]
        self.truth.broken = len(out)
        return out


def publish(plan: list[tuple[float, str, bytes]], producer, topics: dict[str, str], t0: float, speed: float,
            progress: dict, stop) -> None:
    """Publish records at their scheduled time (``speed`` > 1 compresses the schedule)."""
    for offset, kind, value in plan:
        if stop.is_set():
            break
        delay = t0 + offset / speed - time.time()
        if delay > 0:
            time.sleep(delay)
        producer.send(topics[kind], value)
        progress["produced"] = progress.get("produced", 0) + 1
    producer.flush()
    progress["done"] = True
