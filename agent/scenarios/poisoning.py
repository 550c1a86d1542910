"""Feedback-poisoning scenarios: benign labelled feedback with honest noise, plus campaigns.

Benign feedback: test rows with their true labels from ~40 sources (a few
busy reviewers, a long tail) over one simulated hour, with honest mistakes at
``HONEST_ERROR_RATE``. Honest mistakes are made the way people make them: on
ambiguous inputs (picked with weight 1 - margin of a kNN vote on the training
data) and to the runner-up class of that vote (a 4 read as a 9), not to a
random class.

Campaigns (each run on its own benign stream, a few percent of the feedback):

- ``random_flip``: labels replaced by a random other class, spread over all sources.
- ``pair_flip``: one class relabelled as another (targeted), spread over all sources.
- ``source_flip``: random flips, all from one compromised source.
- ``backdoor``: a trigger (digits: a 2x2 patch of full-ink pixels in a corner;
  tabular: one weakly informative feature pinned to an extreme value) stamped on inputs of other
  classes, relabelled to the target class, from three sources.
- held out (not looked at while writing the detector): ``pair_flip_source``
  (targeted flips at 2% from one source) and ``backdoor_spread`` (another
  trigger place and target, at 2%, over all sources).

Counting: precision and recall are over the record ids the findings name,
against the poisoned ids. ``recall_without_honest_twins`` is recall over the
poisoned records no honest mistake duplicates (same input and label,
``poisoned_twin_of_honest_mistake_share`` says how many do). ``precision`` (the headline) counts every flagged
honest mistake as a false positive; ``precision_lenient`` counts it as a
true catch (its label is wrong and should not be trained on either). Both are
reported.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from agent.model import WatchedModel, train_classifier
from agent.records import FeedbackBatch
from agent.reference import ReferenceData
from agent.scenarios.data import Dataset, load, split_for_deployment
from detectors.base import DetectorContext
from detectors.poisoning import PoisoningDetector

HONEST_ERROR_RATE = 0.015
GOAL = 0.9
DEVELOPMENT_VARIANTS = ("random_flip", "pair_flip", "source_flip", "backdoor")


@dataclass(frozen=True)
class Stream:
    X: np.ndarray
    y: np.ndarray
    sources: list[str]
    ts: np.ndarray
    poisoned: np.ndarray  # bool per record
    honest_mistake: np.ndarray  # bool per record


def _knn_vote(ds: Dataset, X: np.ndarray, k: int = 15) -> np.ndarray:
    """Class vote shares of the k nearest training rows (the "human" view, independent of the model)."""
    d = torch.cdist(torch.as_tensor(X), torch.as_tensor(ds.X_train))
    idx = d.topk(k, largest=False).indices.numpy()
    votes = np.zeros((len(X), ds.n_classes))
    for j in range(k):
        votes[np.arange(len(X)), ds.y_train[idx[:, j]]] += 1
    return votes / k


def benign_stream(ds: Dataset, n: int, n_sources: int, rng: np.random.Generator) -> Stream:
    rows = rng.integers(0, len(ds.X_test), n)
    X = ds.X_test[rows].copy()
    y = ds.y_test[rows].copy()
    votes = _knn_vote(ds, X)
    srt = np.sort(votes, 1)
    ambiguity = 1.0 - (srt[:, -1] - srt[:, -2]) + 1e-3
    n_err = round(HONEST_ERROR_RATE * n)
    err = rng.choice(n, size=n_err, replace=False, p=ambiguity / ambiguity.sum())
    vote_wo_true = votes[err].copy()
    vote_wo_true[np.arange(n_err), y[err]] = -1
    runner_up = vote_wo_true.argmax(1)
    no_runner = vote_wo_true.max(1) <= 0  # unanimous: a slip to a random other class
    runner_up[no_runner] = (y[err][no_runner] + rng.integers(1, ds.n_classes, no_runner.sum())) % ds.n_classes
    y[err] = runner_up
    honest = np.zeros(n, bool)
    honest[err] = True
    weights = rng.pareto(1.5, n_sources) + 1
    src = rng.choice(n_sources, size=n, p=weights / weights.sum())
    return Stream(X, y, [f"reviewer-{s}" for s in src], np.sort(rng.uniform(0, 3600, n)),
                  np.zeros(n, bool), honest)


def _trigger(ds: Dataset, X: np.ndarray, where: str) -> np.ndarray:
    X = X.copy()
    if ds.name == "digits":
        img = X.reshape(-1, 8, 8)
        if where == "corner":
            img[:, 6:8, 6:8] = 1.0
        else:
            img[:, 0:2, 0:2] = 1.0
        return img.reshape(len(X), -1)
    # features barely related to the diagnosis (smoothness error, fractal dimension error), so the
    # trigger itself does not make an input look like the target class
    feat = 14 if where == "corner" else 19
    X[:, feat] = ds.hi if where == "corner" else ds.lo
    return X


def poison(ds: Dataset, variant: str, n: int, rng: np.random.Generator, n_sources: int) -> Stream:
    """``n`` poisoned feedback records of one campaign variant."""
    k = ds.n_classes
    sources_all = [f"reviewer-{s}" for s in rng.integers(0, n_sources, n)]
    if variant in ("random_flip", "source_flip"):
        rows = rng.integers(0, len(ds.X_test), n)
        X, y = ds.X_test[rows].copy(), (ds.y_test[rows] + rng.integers(1, k, n)) % k
        sources = sources_all if variant == "random_flip" else ["reviewer-compromised"] * n
    elif variant in ("pair_flip", "pair_flip_source"):
        a, b = (1, 7) if ds.name == "digits" else (0, 1)
        if variant == "pair_flip_source":
            a, b = (3, 8) if ds.name == "digits" else (1, 0)
        pool = np.flatnonzero(ds.y_test == a)
        rows = rng.choice(pool, n)
        X, y = ds.X_test[rows].copy(), np.full(n, b)
        sources = sources_all if variant == "pair_flip" else ["reviewer-compromised"] * n
    elif variant in ("backdoor", "backdoor_spread"):
        target = 0 if variant == "backdoor" else (6 % k)
        pool = np.flatnonzero(ds.y_test != target)
        rows = rng.choice(pool, n)
        X = _trigger(ds, ds.X_test[rows], "corner" if variant == "backdoor" else "other")
        y = np.full(n, target)
        sources = ([f"reviewer-bd{i}" for i in rng.integers(0, 3, n)] if variant == "backdoor"
                   else sources_all)
    else:
        raise ValueError(f"unknown poisoning variant {variant!r}")
    return Stream(X.astype(np.float32), y.astype(np.int64), sources, np.sort(rng.uniform(0, 3600, n)),
                  np.ones(n, bool), np.zeros(n, bool))


VARIANTS = {  # variant -> share of the feedback that is poisoned
    "random_flip": 0.03, "pair_flip": 0.03, "source_flip": 0.03, "backdoor": 0.04,
    "pair_flip_source": 0.02, "backdoor_spread": 0.02,
}


def _merge(a: Stream, b: Stream) -> Stream:
    order = np.argsort(np.concatenate([a.ts, b.ts]), kind="stable")
    cat = lambda u, v: np.concatenate([u, v])[order]  # noqa: E731
    srcs = a.sources + b.sources
    return Stream(cat(a.X, b.X), cat(a.y, b.y), [srcs[i] for i in order], cat(a.ts, b.ts),
                  cat(a.poisoned, b.poisoned), cat(a.honest_mistake, b.honest_mistake))


def _twins_of_honest_mistakes(stream: Stream) -> np.ndarray:
    """Per record: whether an honest mistake in the same stream has the same input *and* label.

    The benign stream redraws thousands of records from a few hundred test
    rows, and people slip on the ambiguous ones to the runner-up class; on a
    two-class table a flip of such a row is the same record as an honest slip
    on it. Nothing per record tells those twins apart, so the report gives
    recall also over the poisoned records that have no such twin.
    """
    honest = {(x.tobytes(), int(y)) for x, y in zip(stream.X[stream.honest_mistake],
                                                      stream.y[stream.honest_mistake], strict=True)}
    return np.array([(x.tobytes(), int(y)) in honest for x, y in zip(stream.X, stream.y, strict=True)], bool)


def run_variant(ds: Dataset, model: WatchedModel, variant: str, n_benign: int, device: torch.device,
                seed: int, options: dict | None = None) -> dict:
    rng = np.random.default_rng(seed)
    n_sources = 40
    benign = benign_stream(ds, n_benign, n_sources, rng)
    share = VARIANTS[variant]
    n_poison = round(share * n_benign / (1 - share))
    stream = _merge(benign, poison(ds, variant, n_poison, rng, n_sources))
    return {"variant": variant, "held_out": variant not in DEVELOPMENT_VARIANTS, "poison_share": share,
            **measure(ds, model, stream, device, seed, options)}


def measure(ds: Dataset, model: WatchedModel, stream: Stream, device: torch.device, seed: int,
            options: dict | None = None) -> dict:
    """Run the poisoning detector, fitted on the training rows, over a feedback stream; record-level figures."""
    ids = [f"fb-{i}" for i in range(len(stream.X))]
    findings, run_s = _replay(ds, model, stream, ids, device, seed, options)
    named = {rid for f in findings for rid in f.related_ids}
    index = {rid: i for i, rid in enumerate(ids)}
    sel = np.zeros(len(ids), bool)
    sel[[index[r] for r in named]] = True
    tp = int((sel & stream.poisoned).sum())
    honest_flagged = int((sel & stream.honest_mistake).sum())
    fp = int(sel.sum()) - tp
    apart = stream.poisoned & ~_twins_of_honest_mistakes(stream)
    kinds = sorted({f.evidence["kind"] for f in findings})
    return {
        "dataset": ds.name, "records": len(ids), "poisoned": int(stream.poisoned.sum()),
        "honest_mistakes": int(stream.honest_mistake.sum()), "named": int(sel.sum()),
        "precision": tp / max(int(sel.sum()), 1), "recall": tp / max(int(stream.poisoned.sum()), 1),
        "precision_lenient": (tp + honest_flagged) / max(int(sel.sum()), 1),
        "honest_mistakes_named": honest_flagged, "clean_named": fp - honest_flagged,
        "poisoned_twin_of_honest_mistake_share": 1.0 - int(apart.sum()) / max(int(stream.poisoned.sum()), 1),
        "recall_without_honest_twins": int((sel & apart).sum()) / max(int(apart.sum()), 1),
        "findings": len(findings), "kinds": kinds, "backdoor_named": "backdoor" in kinds,
        "detector_rps": len(ids) / run_s,
    }


def _replay(ds: Dataset, model: WatchedModel, stream: Stream, ids: list[str], device: torch.device,
            seed: int, options: dict | None = None) -> tuple[list, float]:
    """A poisoning detector fitted on the training rows, fed the stream in batches of 256, then flushed:
    (findings, seconds the detector took over the stream, fitting left out)."""
    ctx = DetectorContext(device=device, input_shape=ds.input_shape, n_classes=ds.n_classes, model=model, seed=seed)
    det = PoisoningDetector(PoisoningDetector.Options(**(options or {})), ctx)
    det.fit(ReferenceData(ds.X_train, ds.y_train, ds.input_shape))
    findings = []
    t0 = time.perf_counter()
    for i in range(0, len(ids), 256):
        sl = slice(i, i + 256)
        n = len(ids[sl])
        findings += det.update(FeedbackBatch(
            ids=tuple(ids[sl]), ts=stream.ts[sl], models=(f"{ds.name}-model",) * n,
            sources=tuple(stream.sources[sl]), X=stream.X[sl], labels=stream.y[sl]), {})
    findings += det.flush()
    return findings, time.perf_counter() - t0


def run_benign_only(ds: Dataset, model: WatchedModel, n_benign: int, device: torch.device, seed: int,
                    options: dict | None = None) -> dict:
    """Clean feedback with honest noise only: how many findings (all false alarms) it raises."""
    rng = np.random.default_rng(seed)
    stream = benign_stream(ds, n_benign, 40, rng)
    findings, _ = _replay(ds, model, stream, [f"fb-{i}" for i in range(len(stream.X))], device, seed, options)
    return {"dataset": ds.name, "records": len(stream.X), "honest_mistakes": int(stream.honest_mistake.sum()),
            "findings": len(findings), "records_named": len({r for f in findings for r in f.related_ids})}


def team_model(ds: Dataset, device: torch.device, epochs: int = 40, seed: int = 0) -> WatchedModel:
    """The team's own model, trained on the training rows and given with ``train --model`` (not a surrogate);
    the reference the detector gets is those same rows (what a team often has at hand), so its thresholds are
    read off the model's answers on rows it trained on (the detector's ``unseen_rates`` test notices)."""
    model = train_classifier(ds.X_train, ds.y_train, ds.input_shape, device, epochs=epochs, seed=seed)
    model.is_surrogate = False
    return model


def evaluate(device: torch.device, quick: bool = False) -> dict:
    """The poisoning family's section of the eval report (CONTRACT.md), with per-variant figures."""
    n_benign = 2500 if quick else 6000
    variants, benign = [], []
    for name in ("digits", "tabular"):
        ds = load(name)
        model = team_model(ds, device, epochs=20 if quick else 40)
        for j, variant in enumerate(VARIANTS):
            variants.append(run_variant(ds, model, variant, n_benign, device, seed=100 + j))
        benign.append(run_benign_only(ds, model, n_benign, device, seed=99))
    tp = sum(round(v["precision"] * v["named"]) for v in variants)
    named = sum(v["named"] for v in variants)
    poisoned = sum(v["poisoned"] for v in variants)
    caught = sum(round(v["recall"] * v["poisoned"]) for v in variants)
    return {
        "precision": tp / max(named, 1),
        "recall": caught / max(poisoned, 1),
        "detected": all(v["findings"] > 0 for v in variants),
        "below_goal": [f"{v['dataset']}/{v['variant']}" for v in variants
                       if v["precision"] < GOAL or v["recall"] < GOAL],
        "precision_min": min(v["precision"] for v in variants),
        "recall_min": min(v["recall"] for v in variants),
        "precision_lenient": sum(v["precision_lenient"] * v["named"] for v in variants) / max(named, 1),
        "goal": f"record-level precision and recall >= {GOAL} for every campaign",
        "counting": "precision counts flagged honest labelling mistakes as false positives; "
                    "precision_lenient counts them as correct (their labels are wrong too)",
        "honest_error_rate": HONEST_ERROR_RATE,
        "variants": variants,
        "benign_only": benign,
        "detector_aware": _detector_aware_note(variants),
    }


def _detector_aware_note(variants: list[dict]) -> dict:
    """What the held-out, lower-rate campaigns (closest to an attacker hiding under the noise) achieved."""
    held = [v for v in variants if v["held_out"]]
    return {
        "description": "campaigns at 2% spread over many sources or hidden in one source, with triggers and "
                       "class pairs not used while developing; an attacker that picks inputs the model "
                       "already finds ambiguous (clean-label) is out of reach of label-disagreement signals",
        "variants": [{"dataset": v["dataset"], "variant": v["variant"], "precision": v["precision"],
                      "recall": v["recall"]} for v in held],
    }


def reference_overlap(name: str, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Clean feedback and the campaigns under three deployments of one data set: the eval's (the model trained
    on the reference rows), the same without the rates measured on unseen rows (``unseen_rates: false``, as
    before they existed), and held-out reference rows (the model trained on one part of the training rows, the
    detector given the other, as in the evasion eval).

    Why: a model is surer on its own training rows than on new feedback; where it is right on far fewer new
    rows (``synthetic``: all of its training rows, 88 % of new ones), thresholds set on its training rows flag
    clean feedback.
    """
    cpu = torch.device("cpu")
    ds = load(name)
    X_model, y_model, X_ref, y_ref = split_for_deployment(ds, seed)
    held_out = team_model(replace(ds, X_train=X_model, y_train=y_model), cpu, seed=seed)
    team = team_model(ds, cpu, seed=seed)
    deployments = {"model trained on the reference": (ds, team, None),
                   "... without unseen-row rates": (ds, team, {"unseen_rates": False}),
                   "held-out reference": (replace(ds, X_train=X_ref, y_train=y_ref), held_out, None)}
    out: dict[str, dict[str, Any]] = {}
    for label, (d, model, options) in deployments.items():
        benign = run_benign_only(d, model, 6000, cpu, seed=1000 * seed + 99, options=options)
        rows = [run_variant(d, model, v, 6000, cpu, seed=1000 * seed + 100 + j, options=options)
                for j, v in enumerate(VARIANTS)]
        out[label] = {"benign_only_findings": benign["findings"], "benign_only_records_named": benign["records_named"],
                      **{r["variant"]: (r["precision"], r["recall"]) for r in rows}}
    return out


if __name__ == "__main__":
    # python -m agent.scenarios.poisoning 0,1,2,3: the eval's campaigns on other seeds
    # python -m agent.scenarios.poisoning overlap synthetic,digits,tabular: see reference_overlap
    import sys

    if sys.argv[1] == "overlap":
        for name in sys.argv[2].split(","):
            for label, r in reference_overlap(name).items():
                pr = ", ".join(f"{k} {v[0]:.3f}/{v[1]:.3f}" for k, v in r.items() if isinstance(v, tuple))
                print(f"{name}, {label}: clean feedback: {r['benign_only_findings']} findings naming "
                      f"{r['benign_only_records_named']} records; P/R {pr}", flush=True)
        sys.exit(0)
    for name in ("digits", "tabular"):
        ds = load(name)
        for seed in [int(x) for x in sys.argv[1].split(",")]:
            model = team_model(ds, torch.device("cpu"), seed=seed)
            rows = [run_variant(ds, model, v, 6000, torch.device("cpu"), seed=1000 * seed + 100 + j)
                    for j, v in enumerate(VARIANTS)]
            benign = run_benign_only(ds, model, 6000, torch.device("cpu"), seed=1000 * seed + 99)
            pr = ", ".join(f"{r['variant']} {r['precision']:.3f}/{r['recall']:.3f}" for r in rows)
            lenient = min(r["precision_lenient"] for r in rows)
            apart = min(r["recall_without_honest_twins"] for r in rows)
            print(f"{name} seed {seed}: benign-only findings {benign['findings']}; P/R {pr}; lowest precision "
                  f"counting named honest mistakes as right {lenient:.3f}; lowest recall without honest "
                  f"mistakes' twins {apart:.3f}", flush=True)
