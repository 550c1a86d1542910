"""Does the ``adversarial`` detector flag the share of clean rows it asks for? Measured on many unseen rows.

Why apart from the eval: the eval's benign traffic redraws a few hundred unique test rows (540 digits, 171
tabular), so its FPR moves in steps of a row, and its detector seeds all cut the same reference. Conformal
calibration promises ``fpr`` on average over reference draws, with a spread that shrinks as the reference
grows. Here a generated table (``data.generated_table``, the recipe of ``synthetic`` or ``imbalanced``) is drawn
at 40,000 rows: the watched model trains on 2,000, each draw's reference is a fresh slice of
``n_reference`` rows it never saw, and the FPR is read on 30,000 rows neither saw, per test of the OR (the
learned score and the boundary test each spend half of ``fpr``). PGD-L2 on 600 of those rows shows what
the same detector catches.

    python -m agent.scenarios.calibration synthetic 600 0,1,2,3,4,5 ['{"folds": 2}']
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import torch

from agent.model import train_classifier
from agent.reference import ReferenceData
from agent.scenarios.data import generated_table
from detectors import _attacks as attacks
from detectors.adversarial import AdversarialDetector
from detectors.base import DetectorContext

ROWS, MODEL_ROWS, UNSEEN_ROWS = 40_000, 2_000, 30_000
L2_RADIUS = 0.5  # in units of RMS std x sqrt(dim), as the eval's budgets


def calibration_check(name: str, n_reference: int, draws: list[int], options: dict[str, Any] | None = None
                      ) -> list[dict[str, Any]]:
    """Per reference draw: the flagged share of unseen clean rows (all tests, and each test at its share of
    ``fpr``) and the calibrated TPR on successful PGD-L2 adversarials."""
    X, y = generated_table(name, ROWS)
    order = np.random.default_rng(0).permutation(len(X))
    X, y = X[order], y[order].astype(np.int64)
    mu, sd = X[:MODEL_ROWS].mean(0), X[:MODEL_ROWS].std(0)
    X = ((X - mu) / sd).astype(np.float32)
    lo, hi = float(X[:MODEL_ROWS].min()), float(X[:MODEL_ROWS].max())
    if MODEL_ROWS + (max(draws) + 1) * n_reference > ROWS - UNSEEN_ROWS:
        raise ValueError(f"draws 0 to {max(draws)} of {n_reference} reference rows each do not fit between the "
                         f"model's {MODEL_ROWS} rows and the {UNSEEN_ROWS} unseen ones: fewer draws or rows")
    shape, dev = (X.shape[1],), torch.device("cpu")
    model = train_classifier(X[:MODEL_ROWS], y[:MODEL_ROWS], shape, dev, epochs=60, seed=0)
    model.is_surrogate = False  # the team's own model: it never saw the reference or the unseen rows
    for p in model.module.parameters():
        p.requires_grad_(False)
    unseen = X[-UNSEEN_ROWS:]
    xs, ys = torch.as_tensor(unseen[:600]), torch.as_tensor(y[-UNSEEN_ROWS:][:600])
    right = model.logits(xs).argmax(1) == ys
    radius = L2_RADIUS * float(np.sqrt((X[:MODEL_ROWS].std(0) ** 2).mean() * X.shape[1]))
    adv = attacks.pgd_l2(model.logits, xs[right], ys[right], radius, lo, hi, steps=40)
    adv = adv[model.logits(adv).argmax(1) != ys[right]].numpy()
    rows = []
    for draw in draws:
        ref = slice(MODEL_ROWS + draw * n_reference, MODEL_ROWS + (draw + 1) * n_reference)
        det = AdversarialDetector(AdversarialDetector.Options(**(options or {})),
                                  DetectorContext(dev, shape, int(y.max()) + 1, model, seed=draw))
        det.fit(ReferenceData(X[ref], y[ref], shape))
        stats = det.statistics(unseen)
        fpr = det.opts.fpr
        row = {"draw": draw, "fpr": float((det.calibrator.pvalues(stats) <= fpr).mean())}
        for j, (part, share) in enumerate(zip(det.calibrator.parts, det.calibrator.shares)):
            row[("learned", "boundary")[j] + f" test at {share * fpr:g}"] = float(
                (part.pvalues(stats[:, j]) <= share * fpr).mean())
        row[f"pgd_l2 {L2_RADIUS} tpr"] = float((det.pvalues(adv) <= fpr).mean())
        rows.append(row)
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)
    results = calibration_check(sys.argv[1], int(sys.argv[2]), [int(s) for s in sys.argv[3].split(",")],
                                json.loads(sys.argv[4]) if len(sys.argv) > 4 else None)
    for r in results:
        print(f"{sys.argv[1]}, {sys.argv[2]} reference rows, draw {r['draw']}: " + ", ".join(
            f"{k} {v:.4f}" for k, v in r.items() if k != "draw"), flush=True)
    for k in results[0]:
        if k != "draw":
            values = [r[k] for r in results]
            print(f"{k}: mean {np.mean(values):.4f}, range {min(values):.4f}-{max(values):.4f}")
