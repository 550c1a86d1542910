"""Real data sets for scenarios, shipped inside scikit-learn (no download).

- ``digits``: 8x8 handwritten digits, 64 features in [0, 1], 10 classes (1,797 rows).
- ``tabular``: Wisconsin breast cancer, 30 features standardised, 2 classes (569 rows).
- ``synthetic``: not real data and not in the eval: scikit-learn's ``make_classification``
  (64 features standardised, 5 classes, 3,000 rows, overlapping classes), for checking the
  detectors on data none of them was shaped on, with a model that is right on only ~88 % of
  new rows (far less than on its training rows).
- ``imbalanced``: not real data and not in the eval either: a fraud-like table (``make_classification``,
  20 features of which four are made counts, 2 classes, 5 % positives, 6,000 rows), where the rare class's
  natural rows lie far from each other.

Each comes as a fixed train / reference / test split so detectors are fitted
on one part and measured on rows they never saw.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Dataset:
    name: str
    input_shape: tuple[int, ...]
    n_classes: int
    X_train: np.ndarray  # model + detectors are fitted on this (the "reference data")
    y_train: np.ndarray
    X_test: np.ndarray  # benign traffic and attack seeds come from here
    y_test: np.ndarray
    lo: float  # valid input range, attacks clip to it
    hi: float

    @property
    def dim(self) -> int:
        return int(np.prod(self.input_shape))


def _split(X: np.ndarray, y: np.ndarray, test_frac: float, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(X))
    cut = int(len(X) * (1 - test_frac))
    return X[idx[:cut]], y[idx[:cut]], X[idx[cut:]], y[idx[cut:]]


def _standardised(name: str, X: np.ndarray, y: np.ndarray, n_classes: int, seed: int, sd_floor: float = 0.0
                  ) -> Dataset:
    """A table split as the others are, standardised with the training part's mean and std (plus ``sd_floor``,
    which a constant column would need); its valid range is the training part's."""
    Xtr, ytr, Xte, yte = _split(X.astype(np.float64), y.astype(np.int64), 0.3, seed)
    mu, sd = Xtr.mean(0), Xtr.std(0) + sd_floor
    z = lambda a: ((a - mu) / sd).astype(np.float32)  # noqa: E731
    return Dataset(name, (X.shape[1],), n_classes, z(Xtr), ytr, z(Xte), yte, float(z(Xtr).min()),
                   float(z(Xtr).max()))


GENERATED_ROWS = {"synthetic": 3000, "imbalanced": 6000}  # the generated tables' sizes in `load`


def generated_table(name: str, n_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows (raw, unstandardised) of a generated table, ``synthetic`` or ``imbalanced``, at any size: the
    same recipe as ``load``'s, so a larger draw is more of the same population (``calibration`` uses that)."""
    from sklearn import datasets

    if name == "synthetic":
        return datasets.make_classification(n_samples=n_samples, n_features=64, n_informative=24, n_redundant=16,
                                            n_classes=5, n_clusters_per_class=2, class_sep=1.5, random_state=7)
    if name == "imbalanced":
        X, y = datasets.make_classification(n_samples=n_samples, n_features=20, n_informative=8, n_redundant=4,
                                            n_classes=2, weights=[0.95, 0.05], flip_y=0.01, class_sep=1.0,
                                            random_state=11)
        X[:, :4] = np.floor(np.abs(X[:, :4]) * 2)  # four count-like columns (0, 1, 2, ...), as tables have
        return X, y
    raise ValueError(f"unknown generated table {name!r}; expected 'synthetic' or 'imbalanced'")


def load(name: str, seed: int = 0) -> Dataset:
    from sklearn import datasets

    if name == "digits":
        b = datasets.load_digits()
        X = (b.data / 16.0).astype(np.float32)
        Xtr, ytr, Xte, yte = _split(X, b.target.astype(np.int64), 0.3, seed)
        return Dataset("digits", (8, 8), 10, Xtr, ytr, Xte, yte, 0.0, 1.0)
    if name == "tabular":
        b = datasets.load_breast_cancer()
        return _standardised("tabular", b.data, b.target, 2, seed, sd_floor=1e-9)
    if name in GENERATED_ROWS:
        X, y = generated_table(name, GENERATED_ROWS[name])
        return _standardised(name, X, y, int(y.max()) + 1, seed)
    raise ValueError(f"unknown data set {name!r}; expected 'digits', 'tabular', 'synthetic' or 'imbalanced'")


REFERENCE_SHARE = 0.5  # share of X_train held out from the model and given to the detectors as reference


def split_for_deployment(ds: Dataset, seed: int = 0, reference_share: float = REFERENCE_SHARE
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(model rows X, y, reference rows X, y): disjoint parts of ``X_train``, as a team deploys.

    The monitored model trains on one part; the detectors get the other as their
    ``train --reference`` (validation data the model never saw), so calibration
    sees the model's natural mistakes on unfamiliar inputs.
    """
    idx = np.random.default_rng(seed + 11).permutation(len(ds.X_train))
    cut = round(len(idx) * (1 - reference_share))
    m, r = idx[:cut], idx[cut:]
    return ds.X_train[m], ds.y_train[m], ds.X_train[r], ds.y_train[r]


def benign_traffic(ds: Dataset, n: int, n_clients: int, seed: int = 1, noise: float = 0.0
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` benign queries from ``n_clients`` clients: (X, client index, timestamps).

    Benign clients draw test rows at random (with small natural jitter when
    ``noise`` > 0), at rates that differ by client (a few heavy users, a long
    tail), over one simulated hour.
    """
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(ds.X_test), n)
    X = ds.X_test[rows].copy()
    if noise > 0:
        X += rng.normal(0, noise, X.shape).astype(np.float32)
        X = np.clip(X, ds.lo, ds.hi)
    weights = rng.pareto(1.5, n_clients) + 1
    clients = rng.choice(n_clients, size=n, p=weights / weights.sum())
    ts = np.sort(rng.uniform(0, 3600, n))
    return X.astype(np.float32), clients, ts
