"""Per-record features that separate adversarial inputs from clean ones, for any differentiable classifier.

Why these: an adversarial example is an input the model labels confidently
*only at that exact point*. Each feature measures a different face of that,
so that the detector is not tied to one attack's fingerprint:

0. ``1 - max prob`` (log) of the model's answer (the record's own ``probs`` when
   it carried them): minimal-perturbation attacks stop right at the boundary.
1. logit margin, top-1 minus top-2.
2. feature-squeezing disagreement, bit-depth / coarse quantisation
   (Xu et al., "Feature Squeezing", NDSS 2018): L1 between probabilities on x
   and on the squeezed x.
3. the same for a second squeezer: 2x2 median smoothing for images, a coarser
   grid for tabular rows.
4. prediction stability under small Gaussian noise: L1 between p(x) and the
   mean of p(x + noise) (adversarial points sit in thin, unstable regions).
5. mean probability of the predicted class under that noise.
6. Mahalanobis distance of the logit vector to its predicted class's mean
   (shared covariance; Lee et al. 2018 use hidden layers, but a
   ``torch.export`` program exposes only its output, so we use the logits,
   which every model has).
7. residual of the input off the reference data's principal subspace
   (perturbations spread over directions natural data never uses).
8. entropy of the answer.
9. agreement of a soft nearest-neighbour vote over reference rows with the
   model's predicted class (cf. Deep k-NN, Papernot & McDaniel 2018, in input
   space): a small perturbation changes the model's label but not which
   training rows the input is close to.
10. log distance to the nearest reference row, floored at the distance
    within which 5 % of reference rows lie to their nearest other one (an
    input that *is* a reference row is as ordinary as a close natural one).
11. log Mahalanobis distance of the input to the reference rows (shrunk
    covariance, standardised space): perturbations break the correlations
    between features that natural rows keep (tabular rows above all).
12. log of the logit margin: minimal-perturbation attacks (DeepFool,
    Carlini-Wagner, a black-box search that stops at the first flip) end on
    the decision boundary, closer to it than almost all natural inputs. The
    linear margin (1) cannot say so without also calling every confident
    answer clean; on a log scale one weight covers "on the boundary" while
    confident answers differ little. Measured on digits over six detector
    seeds: DeepFool TPR 0.70 -> 0.91, every other attack unchanged.
13. log Mahalanobis distance of the model's penultimate representation (the
    input of its final linear layer) to the reference mean of the predicted
    class, shared shrunk covariance (Lee et al., NeurIPS 2018, on the one
    hidden layer every classifier has): an adversarial input gets the label
    without the representation that natural members of that class have.
14. how much nearer that representation is to another class's mean than to
    the predicted one's (log of the Mahalanobis gap, 0 when the predicted class
    is also the nearest): a generative read of the same layer disagreeing with
    the model's own linear read.
    Both are 0 when the model has no final linear layer to read
    (``WatchedModel.logits_and_hidden``).
15. reformer disagreement: L1 between the model's probabilities on x and on
    x projected onto the reference data's principal subspace (the one of
    feature 7), a linear stand-in for MagNet's auto-encoder reformer (Meng &
    Chen, CCS 2017): the projection drops the perturbation's off-manifold part,
    and where that part made the label, the answer moves back.
16. the probability the projected input still gives the predicted class.
    15-16 cost one more model pass per record (option ``reformer``); 0 without it.
17. log residual of the input off the principal subspace of the reference
    rows the model gives the *predicted* class (standardised space; the
    class-conditional reconstruction of Qin et al., ICLR 2020, with a linear
    reconstruction): an input that is made to read as class c without looking
    like class c's rows is far from that class's subspace even when it is
    near the whole data's (feature 7). L2 attacks move few directions a lot
    and stay near the global subspace: on digits, PGD-L2 at 0.75 was caught
    0.375 of the time, and the other features together, even fitted on the
    attack itself, reach 0.62 at half of 1 % FPR; with these two, 0.71, and
    0.86 with subspaces fitted on twice the reference rows (README).
18. how much farther the input is from the predicted class's subspace than
    from the nearest class's (log gap, 0 when the predicted class is also the
    nearest). 17-18 are 0 with option ``class_subspace`` off.

Cost and defaults: each squeezer and each noise copy is one more model pass per
record. Measured on digits and tabular with an honest (validation) reference,
the extra passes did not help the scorer generalise to held-out attacks
(digits CW-L2 AUROC 0.981 with none, 0.977 with bit-depth squeezing, 0.957 with
both squeezers and two noise copies), so the detector's defaults switch them
off (features 2-5 are then constant and ignored) and score with one model pass;
they stay available as options.

All are computed in one batched pass (one model call over the stacked variants) and are
differentiable (bit-depth rounding passes gradients straight through), so a
detector-aware attacker can be simulated honestly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

N_FEATURES = 19
FEATURE_NAMES = ("log_1m_maxprob", "logit_margin", "squeeze_a_l1", "squeeze_b_l1", "noise_l1",
                 "noise_pred_prob", "logit_mahalanobis", "pca_residual", "entropy", "knn_agreement",
                 "knn_distance", "input_mahalanobis", "log_logit_margin", "hidden_mahalanobis", "hidden_class_gap",
                 "reformer_l1", "reformer_pred_prob", "class_subspace_residual", "class_subspace_gap")
MAX_NEIGHBOURS = 2000  # the default of the adversarial detector's `neighbours` option
MAX_HIDDEN_DIRECTIONS = 256  # wider penultimate layers are measured in their top principal directions
# features 17-18: directions per class's subspace, and of all classes together (each class then gets its share).
# 16 per class: on digits with 629 reference rows (about 40 directions per class hold 0.9 of the variance), a
# regression on these features caught PGD-L2 equally well with 16 (ad hoc), with 2.5 times fewer directions
MAX_DIRECTIONS_PER_CLASS = 16
MAX_CLASS_DIRECTIONS = 4096


@dataclass
class FeatureSpec:
    """What the feature extractor needs to know about normal inputs (fitted on reference data)."""

    input_shape: tuple[int, ...]
    lo: np.ndarray  # [d] per-feature minimum of the reference data
    hi: np.ndarray  # [d]
    mean: np.ndarray  # [d]
    std: np.ndarray  # [d], floored
    pca: np.ndarray  # [d, r] orthonormal principal directions (standardised space)
    noise: np.ndarray  # [n_noise, d] fixed noise patterns, already scaled
    logit_means: np.ndarray  # [k, k] class means of logits
    logit_prec: np.ndarray  # [k, k] inverse shared covariance of logits
    knn_points: np.ndarray  # [m, d] reference rows divided by knn_scale
    knn_onehot: np.ndarray  # [m, k] the model's labels of those rows
    knn_scale: np.ndarray  # [d]
    knn_tau: float  # kernel width: median squared distance of a reference row to its nearest neighbour
    whitening: np.ndarray  # [d, d] inverse square root of the shrunk covariance (standardised space)
    image: bool
    bits: int
    second_squeezer: bool = True  # False: feature 3 repeats feature 2 (one model pass fewer per record)
    first_squeezer: bool = True  # False: no bit-depth squeezing either (feature 2 is 0)
    n_features: int = N_FEATURES  # features the scorer reads: 12, 13 or 15 in detectors fitted before more existed
    # penultimate layer: whitening [h, r] of the shrunk shared covariance and the class means times it [k, r];
    # both empty when the model has no final linear layer to read
    hidden_whitening: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    hidden_means: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    reformer: bool = False  # features 15-16: the model's answer on x projected onto the principal subspace
    # feature 10's floor: the squared distance to the nearest reference row within which 5 % of reference rows lie
    # to theirs (0 in detectors fitted before it: an input equal to a reference row then sat at log(0))
    knn_floor: float = 0.0
    # features 17-18: per predicted class, its mean [k, d] and orthonormal principal directions stacked [d, R]
    # (standardised space), with the class of each direction [R]; all empty when off or fitted before they existed
    class_means: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    class_basis: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    class_of_direction: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    def to_tree(self) -> dict[str, Any]:
        return {"input_shape": list(self.input_shape), "lo": self.lo, "hi": self.hi, "mean": self.mean,
                "std": self.std, "pca": self.pca, "noise": self.noise, "logit_means": self.logit_means,
                "logit_prec": self.logit_prec, "knn_points": self.knn_points, "knn_onehot": self.knn_onehot,
                "knn_scale": self.knn_scale, "knn_tau": self.knn_tau, "whitening": self.whitening,
                "image": self.image, "bits": self.bits, "second_squeezer": self.second_squeezer,
                "first_squeezer": self.first_squeezer, "n_features": self.n_features,
                "hidden_whitening": self.hidden_whitening, "hidden_means": self.hidden_means,
                "reformer": self.reformer, "knn_floor": self.knn_floor, "class_means": self.class_means,
                "class_basis": self.class_basis, "class_of_direction": self.class_of_direction}

    @classmethod
    def from_tree(cls, tree: dict[str, Any]) -> FeatureSpec:
        return cls(tuple(int(s) for s in tree["input_shape"]), *(np.asarray(tree[k], np.float32) for k in (
            "lo", "hi", "mean", "std", "pca", "noise", "logit_means", "logit_prec", "knn_points", "knn_onehot",
            "knn_scale")), float(tree["knn_tau"]), np.asarray(tree["whitening"], np.float32), bool(tree["image"]),
            int(tree["bits"]), bool(tree.get("second_squeezer", True)),
            bool(tree.get("first_squeezer", True)), int(tree.get("n_features", 12)),
            *(np.asarray(tree.get(k, np.zeros((0, 0))), np.float32) for k in ("hidden_whitening", "hidden_means")),
            bool(tree.get("reformer", False)), float(tree.get("knn_floor", 0.0)),
            *(np.asarray(tree.get(k, np.zeros((0, 0))), np.float32) for k in ("class_means", "class_basis")),
            np.asarray(tree.get("class_of_direction", np.zeros(0)), np.float32))


@functools.cache
def native_bfloat16(device_type: str) -> bool:
    """Whether the device multiplies bfloat16 matrices in hardware: CUDA from compute capability 8.0, x86 CPUs
    with AVX512-BF16 or AMX. Elsewhere torch emulates bfloat16, and the neighbour kernel's product would run
    slower than in float32, so it stays in float32 there."""
    if device_type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False))
    if device_type != "cpu":
        return False
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:  # not Linux: no cheap way to tell, and float32 is never the slow path
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def is_image(input_shape: tuple[int, ...]) -> bool:
    """Spatial squeezers apply to inputs with at least two spatial axes of size > 2."""
    return len(input_shape) >= 2 and input_shape[-1] > 2 and input_shape[-2] > 2


Forward = Callable[[torch.Tensor], tuple[torch.Tensor, "torch.Tensor | None"]]
"""A model pass: flat inputs -> (logits, penultimate representation or None); ``WatchedModel.logits_and_hidden``."""


class FeatureExtractor:
    """Turns flat inputs into the N_FEATURES features above, on the model's device."""

    def __init__(self, spec: FeatureSpec, forward: Forward, device: torch.device):
        self.spec = spec
        self.forward = forward
        t = lambda a: torch.as_tensor(a, dtype=torch.float32, device=device)  # noqa: E731
        self.lo, self.hi, self.mean, self.std = t(spec.lo), t(spec.hi), t(spec.mean), t(spec.std)
        self.pca, self.noise = t(spec.pca), t(spec.noise)
        self.logit_means, self.logit_prec = t(spec.logit_means), t(spec.logit_prec)
        self.knn_points, self.knn_onehot, self.knn_scale = t(spec.knn_points), t(spec.knn_onehot), t(spec.knn_scale)
        # the neighbour kernel's logits -d2/tau, less the query's own |x|^2/tau (the same for every neighbour of a
        # row, so the softmax ignores it), as one product: the [batch x neighbours] matrix is the largest thing
        # this detector computes. Where the hardware has it (`native_bfloat16`) the product runs in bfloat16
        # with float32 accumulation, about twice as fast on CPU, where it was a fifth of the detector's time.
        # Points and queries are centred first, and the bias -|p|^2/tau rides in the product (two rows, its
        # bfloat16 part and the remainder, against two constant-1 columns of the query): then only the sum, of
        # the order of (|x|^2 - d2)/tau, is rounded to bfloat16 (~2^-9 of it), never the larger cross term
        # alone. Measured on digits against float32: class votes within 0.003, nearest distances within 0.4 %
        # at the median (5 % at worst). Artifacts fitted on one kind of machine score alike on the other.
        self.knn_dtype = torch.bfloat16 if native_bfloat16(device.type) else torch.float32
        self.knn_centre = self.knn_points.mean(0)
        centred = self.knn_points - self.knn_centre
        bias = -centred.pow(2).sum(1) / spec.knn_tau
        bias_hi = bias.to(torch.bfloat16).float()
        self.knn_kernel = torch.cat([(2.0 / spec.knn_tau) * centred.T, bias_hi[None], (bias - bias_hi)[None]]
                                    ).to(self.knn_dtype).contiguous()  # [d + 2, neighbours]
        # the vote's class sums as [k x neighbours] times the weights' transpose: the product with the
        # [neighbours x k] one-hot the other way round ran 3-4x slower on CPU (a skinny output, a long inner loop)
        self.knn_onehot_t = self.knn_onehot.T.contiguous()
        self.whitening = t(spec.whitening)
        self.hidden_whitening, self.hidden_means = t(spec.hidden_whitening), t(spec.hidden_means)
        self.n_subspace_classes = len(spec.class_means) if spec.class_means.size else 0
        if self.n_subspace_classes:
            means, basis = t(spec.class_means), t(spec.class_basis)
            owner = torch.as_tensor(spec.class_of_direction, device=device).long()
            # one fused product for features 17-18: [-2 x class means | every class's directions], plus as bias
            # [|mean|^2 | -(each direction's class mean projected on it)]; a [k, R] indicator sums per class
            self.class_weights = torch.cat([-2 * means.T, basis], dim=1).contiguous()
            self.class_bias = torch.cat([means.pow(2).sum(1), -(means[owner] * basis.T).sum(1)])
            # as [k x R] times the squares' transpose: the product the other way round ([n x R] times [R x k], a
            # skinny output) ran three times slower on CPU (121 against 40 us for the bench's batch of 512)
            self.class_indicator_t = torch.nn.functional.one_hot(owner, self.n_subspace_classes).float().T.contiguous()

    def _squeeze_a(self, x: torch.Tensor) -> torch.Tensor:
        """Bit depth (images) or a fine per-feature grid (tabular); gradients pass straight through."""
        if self.spec.image:
            span = (self.hi.max() - self.lo.min()).clamp_min(1e-6)
            levels = 2**self.spec.bits - 1
            u = (x - self.lo.min()) / span
            q = u + (torch.round(u * levels) / levels - u).detach()
            return q * span + self.lo.min()
        z = (x - self.mean) / (0.5 * self.std)
        return (z + (torch.round(z) - z).detach()) * 0.5 * self.std + self.mean

    def _squeeze_b(self, x: torch.Tensor) -> torch.Tensor:
        """2x2 median smoothing (images) or a coarse per-feature grid (tabular)."""
        if self.spec.image:
            h, w = self.spec.input_shape[-2:]
            img = x.reshape(-1, 1, h, w)
            padded = torch.nn.functional.pad(img, (0, 1, 0, 1), mode="replicate")
            a, b = padded[..., :h, :w], padded[..., :h, 1:]
            c, d = padded[..., 1:, :w], padded[..., 1:, 1:]
            # median of four = mean of the middle two; four shifted views instead of a sort (no copies of patches)
            top = torch.maximum(torch.maximum(a, b), torch.maximum(c, d))
            bottom = torch.minimum(torch.minimum(a, b), torch.minimum(c, d))
            return ((a + b + c + d - top - bottom) / 2).reshape(len(x), -1)
        z = (x - self.mean) / self.std
        return (z + (torch.round(z) - z).detach()) * self.std + self.mean

    def __call__(self, x: torch.Tensor, record_probs: torch.Tensor | None = None) -> torch.Tensor:
        """Features [n, N_FEATURES]; ``record_probs`` (rows may be NaN) overrides the model's own answer."""
        return self.features_and_margin(x, record_probs)[0]

    def features_and_margin(self, x: torch.Tensor, record_probs: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """The features and the model's logit margin (top-1 minus top-2), from the same model pass.

        The margin is the boundary statistic: minimal-perturbation attacks
        (DeepFool, Carlini-Wagner, a black-box search that stops at the first
        flip) end right on the decision boundary, closer to it than almost all
        natural inputs. Logits, not the answer's probabilities: a softmax
        squashes the margins of confident rows together and rounds small ones.
        """
        n = len(x)
        n_noise = len(self.noise)
        variants = [x, self._squeeze_a(x)] if self.spec.first_squeezer else [x]
        if self.spec.second_squeezer:
            variants.append(self._squeeze_b(x))
        variants += [(x + self.noise[j]).clamp(self.lo, self.hi) for j in range(n_noise)]
        base = len(variants)  # the reformer's variant, when on, comes after these
        xs = (x - self.mean) / self.std
        projected = (xs @ self.pca) @ self.pca.T
        if self.spec.reformer:
            variants.append((self.mean + projected * self.std).clamp(self.lo, self.hi))
        # one model call over all variants: a single large matmul per layer beats several small ones
        logits_all, hidden_all = self.forward(torch.cat(variants))
        # softmax over the class axis of the transpose: along a long contiguous axis it vectorises; over ten
        # classes per row it cost several times more (measured on CPU, [1024 x 10])
        probs_all = torch.softmax(logits_all.float().T, dim=0).T
        logits, p = logits_all[:n].float(), probs_all[:n]
        pr = probs_all[-n:] if self.spec.reformer else p
        pa = probs_all[n : 2 * n] if self.spec.first_squeezer else p
        pb = probs_all[(base - n_noise - 1) * n : (base - n_noise) * n] if self.spec.second_squeezer else pa
        pn = probs_all[(base - n_noise) * n : base * n].reshape(n_noise, n, -1) if n_noise else p[None]
        answer = p
        if record_probs is not None:
            have = torch.isfinite(record_probs).all(dim=1, keepdim=True)
            answer = torch.where(have, torch.nan_to_num(record_probs), p)
        # the class the model answers, from its logits: the same as from its probabilities, and a contiguous
        # [n x k] (``p`` is a view of the transposed softmax, where an argmax cost seven times as much)
        pred = logits.argmax(1)
        top2 = logits.topk(2, dim=1).values
        diff = logits - self.logit_means[pred]
        maha = ((diff @ self.logit_prec) * diff).sum(1)
        resid = xs - projected
        pn_mean = pn.mean(0)
        vote, d2_min = self._neighbours(x / self.knn_scale)
        hidden_maha, hidden_gap = self._hidden(hidden_all, pred, n)
        class_resid, class_gap = self._class_subspaces(xs, pred)
        feats = [
            torch.log(1 - answer.amax(1) + 1e-6),
            top2[:, 0] - top2[:, 1],
            (p - pa).abs().sum(1),
            (p - pb).abs().sum(1),
            (p - pn_mean).abs().sum(1),
            pn_mean.gather(1, pred[:, None])[:, 0],
            torch.log1p(maha),
            torch.log1p(resid.pow(2).sum(1)),
            -(answer * torch.log(answer + 1e-12)).sum(1),
            vote.gather(1, pred[:, None])[:, 0],
            0.5 * torch.log(d2_min.clamp_min(self.spec.knn_floor) + 1e-6 * self.spec.knn_tau),
            torch.log1p((xs @ self.whitening).pow(2).sum(1)),
            torch.log(top2[:, 0] - top2[:, 1] + 1e-3),
            hidden_maha,
            hidden_gap,
            (p - pr).abs().sum(1),
            pr.gather(1, pred[:, None])[:, 0],
            class_resid,
            class_gap,
        ]
        return torch.stack(feats[: self.spec.n_features], dim=1), feats[1]

    def _neighbours(self, xk: torch.Tensor, chunk_elements: int = 1 << 18) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernel-weighted class vote of the reference neighbours [n, k] and the squared distance to the
        nearest one [n], for inputs already divided by ``knn_scale``.

        In chunks of rows whose [rows x neighbours] kernel stays within ``chunk_elements`` floats (1 MB): the
        product, softmax, vote and max each pass over that matrix, and a whole batch's (2.6 MB at 512 x 1,257)
        goes out of the core's cache between passes, while the bfloat16 product runs faster the more rows it
        gets at once. The whole detector per record on the bench's batches (medians of six passes): 10.7 µs in
        chunks of 2^16 floats, 9.9 in chunks of 2^17 or 2^18, 10.0 over the whole batch.
        """
        step = max(1, chunk_elements // max(self.knn_kernel.shape[1], 1))
        votes, d2s = [], []
        for i in range(0, len(xk), step):
            part = xk[i : i + step] - self.knn_centre
            ones = torch.ones(len(part), 2, device=part.device)
            # -d2/tau + |part|^2/tau
            kernel = (torch.cat([part, ones], dim=1).to(self.knn_dtype) @ self.knn_kernel).float()
            votes.append((self.knn_onehot_t @ torch.softmax(kernel, dim=1).T).T)
            # amax, not max(): max also computes the argmax, which cost six times as much over this matrix
            d2s.append((part.pow(2).sum(1) - self.spec.knn_tau * kernel.amax(1)).clamp_min(0))
        if len(votes) == 1:
            return votes[0], d2s[0]
        return torch.cat(votes), torch.cat(d2s)

    def _hidden(self, hidden_all: torch.Tensor | None, pred: torch.Tensor, n: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features 13 and 14 from the penultimate representation of the unmodified inputs (zeros without one)."""
        if hidden_all is None or self.hidden_whitening.numel() == 0:
            zero = torch.zeros(n, device=pred.device)
            return zero, zero
        hw = hidden_all[:n].float() @ self.hidden_whitening
        # the cross term as [k x h] times hw's transpose, not hw times [h x k]: a skinny output, twice as slow
        d2 = (hw.pow(2).sum(1, keepdim=True) - 2 * (self.hidden_means @ hw.T).T
              + self.hidden_means.pow(2).sum(1)).clamp_min(0)  # [n, k] squared Mahalanobis to every class mean
        own = d2.gather(1, pred[:, None])[:, 0]
        return torch.log1p(own), torch.log1p(own - d2.amin(1))

    def _class_subspaces(self, xs: torch.Tensor, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features 17 and 18 from standardised inputs (zeros without class subspaces).

        |z - m_c|^2 less its part inside class c's subspace, for every class at
        once: one product [n x (k + R)] for the means and all directions,
        instead of a projection per class.
        """
        k = self.n_subspace_classes
        if k == 0:
            zero = torch.zeros(len(xs), device=xs.device)
            return zero, zero
        both = torch.addmm(self.class_bias, xs, self.class_weights)
        inside = (self.class_indicator_t @ both[:, k:].square().T).T  # [n, k] squared length inside each subspace
        resid = torch.log1p((both[:, :k] + xs.square().sum(1, keepdim=True) - inside).clamp_min(0))  # [n, k]
        own = resid.gather(1, pred[:, None])[:, 0]
        return own, own - resid.amin(1)


def _fit_class_subspaces(xs: np.ndarray, pred: np.ndarray, k: int, variance: float
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class the model predicts: mean and the principal directions holding ``variance`` of its rows' spread
    (at most one fewer than its rows, MAX_DIRECTIONS_PER_CLASS, and its share of MAX_CLASS_DIRECTIONS). A class
    with no rows keeps the mean of all rows and no direction: whatever is answered as a class never seen is
    measured from the middle."""
    cap = max(1, min(MAX_DIRECTIONS_PER_CLASS, MAX_CLASS_DIRECTIONS // max(k, 1)))
    means, bases, owners = [], [], []
    for c in range(k):
        rows = xs[pred == c]
        m = rows.mean(0) if len(rows) else xs.mean(0)
        means.append(m)
        if len(rows) < 2:
            continue
        _, s, vt = np.linalg.svd(rows - m, full_matrices=False)
        share = np.cumsum(s**2) / max(float((s**2).sum()), 1e-12)
        r = min(int(np.searchsorted(share, variance) + 1), len(rows) - 1, cap)
        bases.append(vt[:r])
        owners += [c] * r
    basis = np.concatenate(bases).T if bases else np.zeros((xs.shape[1], 0))
    return (np.stack(means).astype(np.float32), basis.astype(np.float32), np.asarray(owners, np.float32))


def fit_spec(X: np.ndarray, input_shape: tuple[int, ...], forward: Forward, device: torch.device, n_noise: int,
             noise_scale: float, bits: int, pca_variance: float, seed: int, second_squeezer: bool = True,
             first_squeezer: bool = True, reformer: bool = False, class_variance: float = 0.0,
             neighbours: int = MAX_NEIGHBOURS) -> FeatureSpec:
    """Fit the normal-data statistics the features are measured against (``class_variance`` 0: no class
    subspaces, features 17-18 are 0)."""
    X = np.asarray(X, np.float32)
    mean, std = X.mean(0), X.std(0)
    std = np.maximum(std, 0.1 * float(np.sqrt((std**2).mean())) + 1e-6)
    xs = (X - mean) / std
    _, s, vt = np.linalg.svd(xs - xs.mean(0), full_matrices=False)
    share = np.cumsum(s**2) / max(float((s**2).sum()), 1e-12)
    r = int(np.searchsorted(share, pca_variance) + 1)
    pca = vt[:r].T.astype(np.float32)
    rng = np.random.default_rng(seed)
    noise = (rng.normal(0, 1, (n_noise, X.shape[1])) * noise_scale * std).astype(np.float32)
    with torch.no_grad():
        logits_t, hidden_t = forward(torch.as_tensor(X, device=device))
        logits = logits_t.float().cpu().numpy()
    pred = logits.argmax(1)
    k = logits.shape[1]
    means = np.stack([logits[pred == c].mean(0) if (pred == c).any() else logits.mean(0) for c in range(k)])
    centred = logits - means[pred]
    cov = centred.T @ centred / max(len(X) - 1, 1) + 1e-3 * np.eye(k)
    rms = float(np.sqrt((X.std(0) ** 2).mean()))
    knn_scale = np.maximum(X.std(0), 0.5 * rms + 1e-6).astype(np.float32)
    pick = rng.permutation(len(X))[:neighbours]  # the neighbour features' cost grows with their count
    points = X[pick] / knn_scale
    sq = (points**2).sum(1)
    d2 = np.maximum(sq[:, None] - 2 * points @ points.T + sq[None, :], 0)
    np.fill_diagonal(d2, np.inf)
    nearest = d2.min(1)  # each reference row's squared distance to its nearest other one
    tau = float(max(np.median(nearest), 1e-6))
    # nearer to a reference row than almost every reference row is to its nearest other one says nothing more:
    # without a floor an input *equal* to a reference row (a record re-sent from the validation set) sat at
    # log(0), far past anything the scorer trained on (cross-fitting measures no row against itself), and where
    # the scorer's weight on this feature came out negative every such row was flagged
    knn_floor = float(np.quantile(nearest, 0.05)) if len(d2) > 1 else 0.0
    onehot = np.eye(k, dtype=np.float32)[pred[pick]]
    centred_x = xs - xs.mean(0)
    cov_x = centred_x.T @ centred_x / max(len(X) - 1, 1)
    cov_x = 0.9 * cov_x + 0.1 * np.eye(len(cov_x)) * float(np.trace(cov_x)) / len(cov_x)  # shrinkage
    evals, evecs = np.linalg.eigh(cov_x)
    whitening = (evecs / np.sqrt(np.maximum(evals, 1e-6))).astype(np.float32)
    hidden_whitening, hidden_means = (np.zeros((0, 0), np.float32),) * 2
    if hidden_t is not None:
        hidden_whitening, hidden_means = _hidden_statistics(hidden_t.float().cpu().numpy(), pred, k)
    class_parts = _fit_class_subspaces(xs, pred, k, class_variance) if class_variance > 0 else ()  # off: defaults
    return FeatureSpec(tuple(input_shape), X.min(0), X.max(0), mean, std, pca, noise,
                       means.astype(np.float32), np.linalg.inv(cov).astype(np.float32), points.astype(np.float32),
                       onehot, knn_scale, tau, whitening, is_image(input_shape), bits, second_squeezer,
                       first_squeezer, N_FEATURES, hidden_whitening, hidden_means, reformer, knn_floor,
                       *class_parts)


def _hidden_statistics(H: np.ndarray, pred: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Whitening of the shared within-class covariance of penultimate representations, and the class means in
    whitened space. Shrunk towards its average variance, as the input's: a layer is often wider than the
    reference has rows; wider than ``MAX_HIDDEN_DIRECTIONS``, only its top principal directions are kept."""
    means = np.stack([H[pred == c].mean(0) if (pred == c).any() else H.mean(0) for c in range(k)])
    centred = H - means[pred]
    cov = centred.T @ centred / max(len(H) - 1, 1)
    cov = 0.9 * cov + 0.1 * np.eye(len(cov)) * max(float(np.trace(cov)) / len(cov), 1e-6)
    evals, evecs = np.linalg.eigh(cov)
    keep = np.argsort(evals)[::-1][:MAX_HIDDEN_DIRECTIONS]
    whitening = (evecs[:, keep] / np.sqrt(np.maximum(evals[keep], 1e-9))).astype(np.float32)
    return whitening, (means @ whitening).astype(np.float32)
