"""Evasion by attacks we did not write: IBM's Adversarial Robustness Toolbox (ART) against the watched model.

Our own attacks (``detectors._attacks``) are what the detector trains on, and
the eval's held-out variants are still ours. This measures it against a
widely used third-party toolkit whose attacks we did not implement or tune:
white-box (Auto-PGD with cross-entropy and DLR losses, BIM, elastic-net
EAD, JSMA's L0 saliency attack, NewtonFool, universal perturbations),
score-based black-box (Square, SimBA, ZOO) and decision-based black-box
(HopSkipJump, Boundary, Sign-OPT). Same deployment as ``evasion.seed_spread`` (the eval's model and
reference); per detector seed, the calibrated TPR at ``fpr`` 0.01, the TPR at
the benign rows' own 99th percentile of the anomaly score (what a perfect
threshold would give), and AUROC, over successful adversarials of correctly
classified test rows; FPR on the unique test rows.

Optional dependency (installed with the ``test`` and ``attacks`` extras):
``python -m agent.scenarios.art_attacks digits 0,4 [mlp|cnn]``; about a
minute per data set on two cores. Carlini-Wagner L∞ is left out (three
minutes for 200 rows on CPU).
"""

from __future__ import annotations

import random
import time
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from agent.model import WatchedModel
from agent.scenarios import data
from agent.scenarios.evasion import _scale, benign_vs_attack_auroc, fitted_detector, spread_deployment

QUICK_ATTACKS = ("BIM Linf 0.15", "JSMA (L0)", "NewtonFool")


class _Logits(torch.nn.Module):
    """ART hands float64 arrays in the classifier's input shape; the watched model takes flat float32 rows."""

    def __init__(self, model: WatchedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.logits(x.reshape(len(x), -1).float())


def _art_input_shape(ds: data.Dataset) -> tuple[int, ...]:
    """Images as (channels, height, width): ART's Square attack only runs on image-shaped inputs."""
    return (1, *ds.input_shape) if len(ds.input_shape) == 2 else ds.input_shape


def attacks(ds: data.Dataset, model: WatchedModel) -> dict[str, Callable[[], Any]]:
    """ART attack factories by name; strengths as shares of the input range, as in ``evasion._craft``."""
    from art import attacks as art
    from art.estimators.classification import PyTorchClassifier

    clf = PyTorchClassifier(_Logits(model), loss=torch.nn.CrossEntropyLoss(), input_shape=_art_input_shape(ds),
                            nb_classes=ds.n_classes, clip_values=(ds.lo, ds.hi), device_type="cpu")
    u = _scale(ds)
    ev = art.evasion
    out: dict[str, Callable[[], Any]] = {
        "APGD-CE Linf 0.1": lambda: ev.AutoProjectedGradientDescent(
            clf, norm=np.inf, eps=0.1 * u, eps_step=0.02 * u, max_iter=100, nb_random_init=1,
            loss_type="cross_entropy", verbose=False),
        "BIM Linf 0.15": lambda: ev.BasicIterativeMethod(clf, eps=0.15 * u, eps_step=0.01 * u, max_iter=40,
                                                         verbose=False),
        "EAD (elastic net, L1)": lambda: ev.ElasticNet(clf, confidence=0.0, max_iter=50, binary_search_steps=5,
                                                       verbose=False),
        "JSMA (L0)": lambda: ev.SaliencyMapMethod(clf, theta=0.5 * u, gamma=0.3, verbose=False),
        "NewtonFool": lambda: ev.NewtonFool(clf, max_iter=50, verbose=False),
        "Universal perturbation": lambda: ev.UniversalPerturbation(
            clf, attacker="fgsm", attacker_params={"eps": 0.1 * u}, delta=0.2, max_iter=10, eps=0.3 * u,
            norm=np.inf, verbose=False),
        "HopSkipJump L2 (decision-based)": lambda: ev.HopSkipJump(clf, norm=2, max_iter=20, max_eval=500,
                                                                  init_eval=50, verbose=False),
        "Boundary (decision-based)": lambda: ev.BoundaryAttack(clf, targeted=False, max_iter=500, num_trial=20,
                                                               verbose=False),
        "ZOO (score-based, finite differences)": lambda: ev.ZooAttack(
            clf, learning_rate=0.1, max_iter=100, initial_const=1.0, use_resize=False, use_importance=False,
            nb_parallel=min(32, ds.dim // 2), verbose=False),
    }
    if ds.n_classes > 2:  # ART 1.20.1 refuses binary classifiers here
        out["Sign-OPT (decision-based)"] = lambda: ev.SignOPTAttack(clf, targeted=False, max_iter=100,
                                                                    query_limit=2000, verbose=False)
    if ds.n_classes > 2:  # the DLR loss needs a third class
        out["APGD-DLR Linf 0.1"] = lambda: ev.AutoProjectedGradientDescent(
            clf, norm=np.inf, eps=0.1 * u, eps_step=0.02 * u, max_iter=100, nb_random_init=1,
            loss_type="difference_logits_ratio", verbose=False)
    if len(_art_input_shape(ds)) == 3:
        out["Square Linf 0.15 (score-based)"] = lambda: ev.SquareAttack(clf, norm=np.inf, eps=0.15 * u, max_iter=500,
                                                                        nb_restarts=1, verbose=False)
        # SimBA insists on probabilities (the others take logits, which keep more of the gradient)
        scores = PyTorchClassifier(torch.nn.Sequential(_Logits(model), torch.nn.Softmax(dim=1)),
                                   loss=torch.nn.NLLLoss(), input_shape=_art_input_shape(ds), nb_classes=ds.n_classes,
                                   clip_values=(ds.lo, ds.hi), device_type="cpu")
        out["SimBA pixels 0.2 (score-based)"] = lambda: ev.SimBA(scores, attack="px", max_iter=1000,
                                                                 epsilon=0.2 * u, verbose=False)
    return out


def _seed_global_rngs(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def evaluate(name: str, seeds: list[int], architecture: str = "mlp", rows: int = 200,
             only: tuple[str, ...] | None = None, device: torch.device | None = None) -> dict[str, Any]:
    """Per ART attack and detector seed: calibrated TPR, TPR at the benign 99th percentile, AUROC."""
    ds, model, X_ref, y_ref, Xs, ys = spread_deployment(name, device or torch.device("cpu"), architecture)
    Xs, ys = Xs[:rows], ys[:rows]
    detectors = {s: fitted_detector(ds, model, X_ref, y_ref, s) for s in seeds}
    benign = {s: det.anomaly_score(ds.X_test) for s, det in detectors.items()}
    report: dict[str, Any] = {
        "data": name, "architecture": architecture, "seeds": seeds, "rows_attacked": len(Xs),
        "fpr": {s: float((det.pvalues(ds.X_test) <= det.opts.fpr).mean()) for s, det in detectors.items()},
        "attacks": [],
    }
    shape = (len(Xs), *_art_input_shape(ds))
    for attack, make in attacks(ds, model).items():
        if only is not None and attack not in only:
            continue
        started = time.perf_counter()
        _seed_global_rngs(zlib.crc32(attack.encode()))  # ART draws from the global RNGs: same attack, same rows
        adv = make().generate(Xs.reshape(shape).astype(np.float32)).reshape(len(Xs), -1).astype(np.float32)
        ok = model.predict_proba(adv).argmax(1) != ys
        entry: dict[str, Any] = {"attack": attack, "success_rate": float(ok.mean()), "successful": int(ok.sum()),
                                 "seconds": round(time.perf_counter() - started, 1)}
        if ok.any():
            delta = adv[ok] - Xs[ok]
            entry.update(mean_l2=float(np.linalg.norm(delta, axis=1).mean()),
                         mean_linf=float(np.abs(delta).max(1).mean()),
                         mean_l0=float((np.abs(delta) > 1e-3 * (ds.hi - ds.lo)).sum(1).mean()))
            for s, det in detectors.items():
                score = det.anomaly_score(adv[ok])
                entry[f"seed_{s}"] = {
                    "tpr": float((det.pvalues(adv[ok]) <= det.opts.fpr).mean()),
                    "tpr_at_benign_p99": float((score > np.quantile(benign[s], 0.99)).mean()),
                    "auroc": benign_vs_attack_auroc(benign[s], score),
                }
        report["attacks"].append(entry)
    return report


if __name__ == "__main__":  # python -m agent.scenarios.art_attacks digits 0,4 [mlp|cnn]
    import sys

    out = evaluate(sys.argv[1], [int(s) for s in sys.argv[2].split(",")],
                   sys.argv[3] if len(sys.argv) > 3 else "mlp")
    print(f"{out['data']} ({out['architecture']}), FPR per detector seed: {out['fpr']}")
    for a in out["attacks"]:
        cells = [f"{a['attack']:32s} success {a['success_rate']:.2f}"]
        if a["successful"]:
            cells.append(f"L2 {a['mean_l2']:.2f} Linf {a['mean_linf']:.2f} L0 {a['mean_l0']:.0f}")
            cells += [f"seed {s}: TPR {a[f'seed_{s}']['tpr']:.3f} (p99 {a[f'seed_{s}']['tpr_at_benign_p99']:.3f},"
                      f" AUROC {a[f'seed_{s}']['auroc']:.3f})" for s in out["seeds"]]
        print(" | ".join(cells))
