"""Where a query lies relative to the reference data: off its cover, or too near its class's centre.

Two per-query flags of the ``extraction`` detector, each fitted on one half
of the reference and calibrated on the other:

- ``ReferenceCover``: farther from every k-means centroid of the reference
  (in its whitened space) than all but ``rate`` of held-out natural rows of
  the class the query is answered as. Synthetic, random and out-of-task
  queries mostly are.
- ``ClassCentres``: closer to the centre of the class the query is answered
  as (Mahalanobis, pooled within-class covariance) than all but ``rate`` of
  that class's held-out rows. Blends of natural inputs (mixup) are.

Both radii are order statistics of a finite set of held-out rows, so a
natural query falls beyond (inside) one at a rate that is itself Beta
distributed (conformal): ``calibration_p`` turns a window's hit count into a
beta-binomial tail, so that a class calibrated on few rows does not make its
own heavy users look suspicious. Both keep the artifact keys they always had
(``to_tree`` / ``from_tree``), so detectors trained before this module existed
load unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import stats

from agent.reference import ReferenceData
from detectors._whitening import Whitening


def order_beta(score: np.ndarray, rate: float) -> tuple[float, float, float]:
    """(j, m + 1 - j, radius): the radius is the j-th smallest of the m scores, j = floor(rate (m + 1))."""
    m = len(score)
    j = math.floor(rate * (m + 1))
    return float(j), float(m + 1 - j), float(np.partition(score, j - 1)[j - 1])


def beta_binomial_tail(groups: np.ndarray, beta: np.ndarray, hits: int) -> float:
    """P(at least ``hits`` hits) among queries whose radius rests on Beta law ``beta[g]``, one g per query.

    A class's hits are beta-binomial, independent between classes calibrated
    on different rows; their sum's tail, by convolution. Queries of group -1
    (no radius of their own) are left out.
    """
    groups = groups[groups >= 0]
    pmf = np.ones(1)
    for g, n_g in zip(*np.unique(groups, return_counts=True)):
        a, b = beta[g]
        pmf = np.convolve(pmf, stats.betabinom.pmf(np.arange(n_g + 1), n_g, a, b))
    return float(min(1.0, pmf[hits:].sum())) if hits < len(pmf) else 0.0


@dataclass
class ReferenceCover:
    """k-means centroids of the reference (whitened) and, per answered class, the off-reference radius.

    ``radius``, ``group``: one entry per class, the last for a query without an
    answer (and for classes with too few held-out rows): the radius of all
    rows. ``group`` is the query's row in ``beta`` (the Beta law of a natural
    query's rate beyond that radius), -1 when there is none (artifacts from
    before per-class radii: the binomial test only).
    """

    centroids: np.ndarray  # [c, d], float32, in the whitened space when `whitening` is set
    radius: np.ndarray  # [k + 1]
    group: np.ndarray  # [k + 1]
    beta: np.ndarray  # [radii, 2]
    whitening: Whitening | None  # None: centroids in input space (artifacts from before the whitened cover)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        self._c = torch.as_tensor(self.centroids, dtype=torch.float32, device=self.device)
        self._c_sq = (self._c * self._c).sum(1)
        self._whiten = None if self.whitening is None else self.whitening.on(self.device)

    @classmethod
    def fit(cls, reference: ReferenceData, *, centroids: int, cover_rank: int, rate: float, seed: int,
            device: torch.device) -> ReferenceCover:
        """Centroids of half the reference, in whitened space; the other half sets the off-reference radii.

        Why whitened (Ledoit-Wolf shrunk covariance of the reference): natural
        rows keep the correlations between features (a tumour's radius,
        perimeter and area move together; neighbouring pixels too), and
        synthetic queries break them while staying within each feature's
        range, which a Euclidean distance does not see. Measured on the eval's
        attackers (unique queries beyond the radius, benign test rows 0.094 ->
        0.076 on tabular): tabular targeted JbDA 0.30 -> 0.86, out-of-task
        rows 0.24 -> 0.88, inversion 0.0 -> 0.98; digits JbDA 0.61 -> 0.95.
        """
        from sklearn.cluster import KMeans

        fit_part, cal_part = reference.split(0.5, seed=seed)
        whitening = Whitening.fit(fit_part.X, cover_rank)
        k = max(2, min(centroids, len(fit_part.X) // 4))
        km = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(whitening.apply_np(fit_part.X))
        cents = km.cluster_centers_.astype(np.float32)
        z = whitening.apply_np(cal_part.X)
        d = np.sqrt(((z[:, None, :] - cents[None]) ** 2).sum(-1).min(1))
        radius = float(np.quantile(d, 1 - rate))
        n_labels = None if reference.y is None else int(reference.y.max()) + 1
        return cls(cents, *cls._radii(d, cal_part.y, n_labels, radius, rate), whitening, device)

    @staticmethod
    def _radii(d: np.ndarray, y: np.ndarray | None, k: int | None, radius: float, rate: float
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per class, the radius beyond which ``rate`` of its own held-out rows lie.

        Classes do not sit equally inside the cover: a rare class has few
        centroids of its own, so its natural rows lie farther from all of
        them (a 5 % class of a fraud-like table: 30 % beyond the radius set
        on every row; breast cancer's malignant class: 12 %; README). Measured
        against one radius, a client that only asks about that class (an
        analyst reviewing the cases the model flagged) looks off the data.
        Each radius is the j-th largest of the class's m held-out distances,
        j = floor(rate (m + 1)), so a natural query of the class lies beyond
        it with a Beta(j, m + 1 - j) distributed probability. A class with too
        few rows for j >= 1, and a query without an answer, use the radius of
        all rows. Returns (radius per class + all rows', its row in the Beta
        table, the table).
        """
        j = max(1, math.floor(rate * (len(d) + 1)))
        beta = [(float(j), float(len(d) + 1 - j))]
        n_labels = 0 if y is None or k is None else k
        by_label, group = np.full(n_labels + 1, radius), np.zeros(n_labels + 1, np.int64)
        for c in range(n_labels):
            own = d[y == c]
            if math.floor(rate * (len(own) + 1)) >= 1:
                a, b, neg = order_beta(-own, rate)  # the j-th smallest of -d: the j-th largest of d
                group[c], by_label[c] = len(beta), -neg
                beta.append((a, b))
        return by_label, group, np.asarray(beta, np.float64)

    @property
    def radius_all(self) -> float:
        """The off-reference radius of all held-out rows (queries without an answer, evidence)."""
        return float(self.radius[-1])

    def index(self, labels: np.ndarray) -> np.ndarray:
        """Each query's entry in ``radius`` / ``group``: its answered class, else (no answer) the last."""
        lab = np.asarray(labels, np.int64)
        n_labels = len(self.radius) - 1
        return np.where((lab >= 0) & (lab < n_labels), lab, n_labels)

    def radius_for(self, labels: np.ndarray) -> np.ndarray:
        """The off-reference radius of each query: its answered class's, else (no answer) every row's."""
        return self.radius[self.index(labels)]

    def beyond(self, x: torch.Tensor, x_sq: torch.Tensor, labels: np.ndarray) -> np.ndarray:
        """Per query (``x_sq``: its squared norm), whether it lies beyond its class's off-reference radius."""
        z, z_sq = x, x_sq
        if self._whiten is not None:
            z = self._whiten(x)
            z_sq = (z * z).sum(1)
        d2c = (z_sq[:, None] + self._c_sq[None, :]).sub_(z @ self._c.T, alpha=2)
        return torch.sqrt(d2c.amin(1).clamp_min_(0)).cpu().numpy() > self.radius_for(labels)

    def calibration_p(self, labels: np.ndarray, hits: int) -> float:
        """P(at least ``hits`` of queries answered as ``labels`` off the reference), for natural queries."""
        return beta_binomial_tail(self.group[self.index(labels)], self.beta, hits)

    def to_tree(self) -> dict[str, Any]:
        out = {"centroids": self.centroids, "off_reference_radius": self.radius_all, "off_radius": self.radius,
               "off_group": self.group, "off_beta": self.beta}
        if self.whitening is not None:
            out["cover_whitening"] = self.whitening.to_tree()
        return out

    @classmethod
    def from_tree(cls, tree: dict[str, Any], device: torch.device) -> ReferenceCover:
        """Also artifacts from before the whitened cover (input-space centroids) or per-class radii (one radius
        for every query, tested binomially only)."""
        whitening = Whitening.from_tree(tree["cover_whitening"]) if "cover_whitening" in tree else None
        if "off_radius" in tree and "off_group" in tree and "off_beta" in tree:
            radius, group, beta = tree["off_radius"], tree["off_group"], tree["off_beta"]
        else:
            radius, group, beta = np.full(1, float(tree["off_reference_radius"])), np.full(1, -1), np.zeros((0, 2))
        return cls(np.asarray(tree["centroids"], np.float32), np.asarray(radius, np.float64),
                   np.asarray(group, np.int64), np.asarray(beta, np.float64), whitening, device)


@dataclass
class ClassCentres:
    """Whitened distance of a query to its answered class's centre; per class, the too-central radius.

    ``radius`` is squared, -inf for a class that is not tested (too few
    held-out rows); ``group`` its row in ``beta`` (-1: none).
    """

    mapping: np.ndarray  # [d, r]: x @ mapping - means[class] is the whitened residual
    means: np.ndarray  # [k, r]
    radius: np.ndarray  # [k]
    group: np.ndarray  # [k]
    beta: np.ndarray  # [tested classes, 2]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        self._map = torch.as_tensor(np.asarray(self.mapping, np.float32), device=self.device)
        self._means = torch.as_tensor(np.asarray(self.means, np.float32), device=self.device)
        self._means_np = self._means.cpu().numpy()

    @classmethod
    def fit(cls, reference: ReferenceData, *, dims: int, rate: float, seed: int, device: torch.device
            ) -> ClassCentres | None:
        """Centres and covariance from half the reference, radii from the other half; None without labels.

        Natural inputs of a class scatter around its centre with the class's
        own variability; a blend of natural inputs (mixup, the usual way to
        stretch a small pool of in-task data into an extraction query set)
        averages that variability away and lands closer to a centre than
        natural inputs do, whichever class it is answered as. The distance is
        Mahalanobis with the pooled within-class covariance (Ledoit-Wolf
        shrinkage; on the top ``dims`` principal components when the input
        has more features). On the other half, per class, the radius leaves
        ``rate`` of the class's held-out rows inside it. Being conditioned on
        the answered class, a client that asks about one class only is judged
        against that class's natural spread.
        """
        from sklearn.covariance import LedoitWolf

        if reference.y is None:
            return None
        fit_part, cal_part = reference.split(0.5, seed=seed)
        X, y = fit_part.X.astype(np.float64), fit_part.y
        k = int(reference.y.max()) + 1
        counts = np.bincount(y, minlength=k)
        if (counts >= 2).sum() < 2:
            return None
        mean = X.mean(0)
        basis = np.eye(X.shape[1])
        if X.shape[1] > dims:
            from sklearn.decomposition import PCA

            r = min(dims, len(X) - 1)
            basis = PCA(r, svd_solver="randomized", random_state=seed).fit(X).components_.T  # [d, r]
        Z = (X - mean) @ basis
        centres = np.zeros((k, Z.shape[1]))
        have = counts >= 2
        for c in np.flatnonzero(have):
            centres[c] = Z[y == c].mean(0)
        keep = have[y]
        precision = LedoitWolf(assume_centered=True).fit(Z[keep] - centres[y[keep]]).precision_
        chol = np.linalg.cholesky((precision + precision.T) / 2)  # precision = chol @ chol.T
        mapping = basis @ chol  # x @ mapping - (centre + mean @ basis) @ chol: the whitened residual
        means = (centres + mean @ basis) @ chol
        score = ((cal_part.X.astype(np.float64) @ mapping - means[cal_part.y]) ** 2).sum(1)
        ok = have[cal_part.y]
        score, cal_y = score[ok], cal_part.y[ok]
        # radius: the j-th smallest of a class's m held-out scores, j = floor(rate * (m + 1)). A class with too
        # few rows for j >= 1 cannot place a radius at this rate: its queries are not tested
        radius, group, beta = np.full(k, -np.inf), np.full(k, -1, np.int64), []
        for c in np.flatnonzero(have):
            own = score[cal_y == c]
            if math.floor(rate * (len(own) + 1)) >= 1:
                group[c] = len(beta)
                beta.append(order_beta(own, rate))
                radius[c] = beta[-1][2]
        if not beta:
            return None
        return cls(mapping, means, radius, group, np.asarray([b[:2] for b in beta], np.float64), device)

    def too_central(self, x: torch.Tensor, labels: np.ndarray) -> np.ndarray:
        """Queries closer to their answered class's centre than all but ``rate`` of natural rows.

        Rows without a label, or with one the reference did not have, are never too central.
        """
        k = len(self.radius)
        lab = np.asarray(labels, np.int64)
        known = (lab >= 0) & (lab < k)
        every = bool(known.all())
        if not every:
            if not known.any():
                return known
            lab = np.where(known, lab, 0)
        z = x @ self._map
        if z.device.type == "cpu":  # numpy's gather is a fraction of torch's indexing cost at this size
            z.sub_(torch.from_numpy(self._means_np[lab]))
        else:
            z.sub_(self._means[torch.as_tensor(lab, device=z.device)])
        central = (z * z).sum(1).cpu().numpy() < self.radius[lab]
        return central if every else central & known

    def calibration_p(self, labels: np.ndarray, hits: int) -> float:
        """P(at least ``hits`` of queries answered as ``labels`` too central), for natural queries; queries
        without a tested class are left out (they are never too central)."""
        known = (labels >= 0) & (labels < len(self.group))
        return beta_binomial_tail(self.group[labels[known]], self.beta, hits)

    def to_tree(self) -> dict[str, Any]:
        return {"central_map": self._map.cpu().numpy(), "central_means": self._means_np,
                "central_radius": self.radius, "central_group": self.group, "central_beta": self.beta}

    @classmethod
    def from_tree(cls, tree: dict[str, Any], device: torch.device) -> ClassCentres | None:
        """None for artifacts trained before the too-central test: it stays off."""
        if "central_map" not in tree:
            return None
        return cls(tree["central_map"], tree["central_means"], np.asarray(tree["central_radius"], np.float64),
                   np.asarray(tree["central_group"], np.int64), np.asarray(tree["central_beta"], np.float64), device)
