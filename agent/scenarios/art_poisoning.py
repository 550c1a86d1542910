"""Feedback poisoning by attacks we did not write: IBM's Adversarial Robustness Toolbox (ART) poisons digits.

The eval's campaigns (``poisoning``) are ours: their triggers and flips were in
view while the detector was written. This measures the ``poisoning`` detector
on poison made by ART 1.20.1's own attacks, mixed into the same benign
feedback (honest mistakes included), record-level precision and recall over
the ids its findings name:

- dirty-label backdoors with ART's triggers, ``add_pattern_bd`` (a small
  checker pattern near the corner) and ``add_single_bd`` (one pixel), stamped
  on inputs of other classes and labelled as the target class, from three
  sources or spread over all of them;
- ART's clean-label backdoor (Turner et al. 2019): inputs of the target class,
  first pushed by PGD away from it on a proxy model (the watched model, or a
  model the attacker trained on half the data: a transfer attack) so that
  they are hard to learn, then stamped with the pattern; their labels are
  *correct*, so what can give them away is the model's disagreement with the
  perturbed inputs and the shared trigger.

Images only (ART's perturbations draw on a picture), so digits only. Nothing in
the detector was set on these campaigns. Optional dependency
(``pip install '.[attacks]'``): ``python -m agent.scenarios.art_poisoning 0,1``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from agent.model import WatchedModel, train_classifier
from agent.scenarios.art_attacks import _Logits
from agent.scenarios.data import Dataset, load
from agent.scenarios.poisoning import Stream, _merge, benign_stream, measure, team_model

N_BENIGN = 6000
TARGET = 0


def _images(ds: Dataset, X: np.ndarray) -> np.ndarray:
    return X.reshape(len(X), *ds.input_shape)


def _flat(X: np.ndarray) -> np.ndarray:
    return np.asarray(X, np.float32).reshape(len(X), -1)


def _triggers() -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    from art.attacks.poisoning import perturbations

    return {"pattern": perturbations.add_pattern_bd, "single pixel": perturbations.add_single_bd}


def dirty_label(ds: Dataset, trigger: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """ART's backdoor: inputs of other classes stamped with a trigger and labelled ``TARGET``."""
    from art.attacks.poisoning import PoisoningAttackBackdoor

    rows = rng.choice(np.flatnonzero(ds.y_test != TARGET), n)
    attack = PoisoningAttackBackdoor(_triggers()[trigger])
    x, y = attack.poison(_images(ds, ds.X_test[rows]), y=np.eye(ds.n_classes)[np.full(n, TARGET)])
    return _flat(np.clip(x, ds.lo, ds.hi)), np.asarray(y).argmax(1)


def clean_label(ds: Dataset, model: WatchedModel, n: int, rng: np.random.Generator, seed: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """ART's clean-label backdoor: target-class inputs made hard by PGD on ``model`` (the proxy), then stamped,
    labels kept."""
    from art.attacks.poisoning import PoisoningAttackBackdoor, PoisoningAttackCleanLabelBackdoor
    from art.estimators.classification import PyTorchClassifier

    proxy = PyTorchClassifier(_Logits(model), loss=torch.nn.CrossEntropyLoss(), input_shape=ds.input_shape,
                              nb_classes=ds.n_classes, clip_values=(ds.lo, ds.hi), device_type="cpu")
    target = np.eye(ds.n_classes)[TARGET]
    attack = PoisoningAttackCleanLabelBackdoor(PoisoningAttackBackdoor(_triggers()["pattern"]), proxy, target,
                                               pp_poison=0.99, eps=0.3, eps_step=0.05, max_iter=40)
    rows = rng.choice(np.flatnonzero(ds.y_test == TARGET), n)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    x, y = attack.poison(_images(ds, ds.X_test[rows]).astype(np.float32), y=np.eye(ds.n_classes)[ds.y_test[rows]])
    x = _flat(x)
    made = (x != ds.X_test[rows]).any(1)  # ART leaves 1 - pp_poison of the rows as they were (at most 1 %)
    return x[made], np.asarray(y).argmax(1)[made]


CAMPAIGNS = {  # name -> (share of the feedback, sources: "three" or "all")
    "ART pattern backdoor, three sources": (0.04, "three"),
    "ART pattern backdoor, all sources": (0.03, "all"),
    "ART single-pixel backdoor, three sources": (0.04, "three"),
    "ART clean-label backdoor, three sources": (0.04, "three"),
    "ART clean-label backdoor, attacker's own proxy": (0.04, "three"),
}


def run_campaign(ds: Dataset, model: WatchedModel, name: str, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    share, spread = CAMPAIGNS[name]
    benign = benign_stream(ds, N_BENIGN, 40, rng)
    n = round(share * N_BENIGN / (1 - share))
    if "own proxy" in name:  # a transfer attack: PGD on a model the attacker trained on half the data
        half = rng.permutation(len(ds.X_train))[: len(ds.X_train) // 2]
        proxy = train_classifier(ds.X_train[half], ds.y_train[half], ds.input_shape, torch.device("cpu"),
                                 epochs=40, seed=seed + 1)
        X, y = clean_label(ds, proxy, n, rng, seed)
    elif "clean-label" in name:
        X, y = clean_label(ds, model, n, rng, seed)
    else:
        X, y = dirty_label(ds, "single pixel" if "single" in name else "pattern", n, rng)
    sources = ([f"reviewer-bd{i}" for i in rng.integers(0, 3, n)] if spread == "three"
               else [f"reviewer-{i}" for i in rng.integers(0, 40, n)])
    sources = sources[: len(X)]
    poisoned = Stream(X, y.astype(np.int64), sources, np.sort(rng.uniform(0, 3600, len(X))), np.ones(len(X), bool),
                      np.zeros(len(X), bool))
    stream = _merge(benign, poisoned)
    # how the poison looks to the model: clean-label poison carries true labels the model now disputes
    agrees = float((model.predict_proba(X).argmax(1) == y).mean()) if len(X) else 0.0
    return {"campaign": name, "poison_share": share, "model_agrees_with_poison_labels": agrees,
            **measure(ds, model, stream, torch.device("cpu"), seed)}


def evaluate(seed: int) -> list[dict[str, Any]]:
    ds = load("digits")
    model = team_model(ds, torch.device("cpu"), seed=seed)
    return [run_campaign(ds, model, name, 1000 * seed + 500 + j) for j, name in enumerate(CAMPAIGNS)]


if __name__ == "__main__":  # python -m agent.scenarios.art_poisoning 0,1
    import sys

    for s in [int(x) for x in sys.argv[1].split(",")]:
        for r in evaluate(s):
            print(f"seed {s} {r['campaign']:42s} P {r['precision']:.3f} R {r['recall']:.3f} "
                  f"(poisoned {r['poisoned']}, named {r['named']}, honest mistakes named "
                  f"{r['honest_mistakes_named']}; model agrees with the poison's labels "
                  f"{r['model_agrees_with_poison_labels']:.3f}) kinds {r['kinds']}", flush=True)
