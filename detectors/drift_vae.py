"""Out-of-distribution records and covariate / label drift, from a VAE fitted on reference data.

Why a VAE: its negative ELBO (reconstruction error plus the latent code's KL)
is high for inputs unlike the reference data, whatever the model under watch
does with them, and it is one small batched torch call per batch.

What comes out of the VAE's score (and of a second, Gaussian one):

* ``notes["ood_p"]``: a conformal p-value per record (rank of its score among
  held-out reference scores, a Pareto tail beyond them, see ``_conformal``),
  for later detectors (extraction's out-of-distribution share).
* a per-record finding when a record is far out (``record_p``, default 1e-6, a
  tail-extrapolated p: at ~1e5 benign records a day that is ~0.1 false alarm a
  day; the calibration ranks alone cannot say anything below 1/(n_cal+1)).
* a drift episode when the stream of p-values stops looking uniform, in either
  tail (inputs less like the reference, or *more* uniform than it: dimmed
  images, constant fields, which a VAE finds easy): a CUSUM
  of the log of a power betting function ``eps * p**(eps-1)`` on the plain
  conformal p-values, i.e. an inductive conformal test martingale with
  restarts (Volkhonskiy et al., "Inductive conformal martingales for
  change-point detection", 2017). Under no drift each record's increment has
  negative mean, so the average run length to a false alarm is at least
  ``exp(threshold)`` records (default e^16 ~ 9e6); under a shift many p-values
  are small and it climbs within tens to hundreds of records. The rank p-values
  are floored at 1/(n_cal+1), so a handful of outliers alone cannot make a
  drift episode: that is what the per-record finding is for.
* the same CUSUM on a second score, the input's Mahalanobis distance to the
  reference (Ledoit-Wolf covariance, ``_whitening``): a VAE fitted on a few
  hundred rows has to learn the correlations between features, which a
  Gaussian model states outright, and rescaling some features (a unit
  change, a sensor's gain) breaks them while leaving every mean where it was.
  Measured on the tabular eval's "scale 10 features x1.5" over ten seeds:
  the VAE alone missed it on five (its mean log p-value moved from -0.9 to
  -1.5, under the CUSUM's allowance), this channel's moved to -1.9. Three
  CUSUMs (two tails of the VAE's score, this one) each keep the run-length
  bound, so together they false-alarm at most three times as often.
* a feature-mean episode: the largest per-feature mean shift in consecutive
  windows, z-scored against the reference (a few features scaled or offset
  can leave the VAE's score almost unchanged).
* a label-shift episode: a chi-square test of the predicted-class counts in
  consecutive windows against the reference class frequencies, because a pure
  class-prior shift moves no single input out of distribution. A window of
  300 holds about 15 answers of a class the model gives 5 % of the time, too
  few to see that class double (fraud, intrusions: the rare class is the one
  that matters). So the last ``label_long_windows`` windows together are also
  compared with the twice as many windows before them (a two-sample test).
  Against the stream's own past, not the reference: a model answers the rows
  it was trained on (often the reference) closer to their labels than new
  ones, and over thousands of records that gap alone would read as a shift.

Time comes from the records' ``ts``; an episode stays open (and silent) until
``quiet_records`` records pass without a new alarm, so one drift is one finding.

Drift is a property of the population, not of a few clients: attackers sending
out-of-distribution queries (synthetic extraction queries, probing) would
otherwise open a drift episode that then hides a real drift arriving while
they are active. Each client's share of far-out records is tracked (EWMA,
bounded LRU table); records of established clients whose share is high are
left out of the drift tests *while such clients are a small minority* of the
clients in the batch or in the recent traffic (``concentrated_max_share``),
and a feature-mean shift or class-prior shift must survive leaving out the few
clients pushing it most (``robust_share``).
A real drift moves everyone, so it is never filtered away; the attackers' records still get
their per-record findings and feed the extraction detector.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from pydantic import Field
from scipy.special import chdtrc, ndtr  # scipy.stats' sf is these plus ~70 us of wrappers a call
from torch import nn

from agent.findings import MAX_RELATED, Finding, Severity
from agent.records import InferenceBatch
from agent.reference import ReferenceData
from detectors._client_slots import ClientSlots, EvictionAlarm, group_ranks
from detectors._conformal import ConformalCalibrator
from detectors._whitening import Whitening, WhiteningOp
from detectors.base import Detector, DetectorOptions

_COVARIATE = {"covariate": "inputs less like the reference data", "covariate_low": "inputs more uniform / "
              "typical than the reference data",
              "covariate_gaussian": "inputs breaking the correlations between features that the reference data "
                                    "keeps"}
_COVARIATE_CHANNELS = (*_COVARIATE, "feature_mean")


class _VAE(nn.Module):
    """Gaussian VAE on standardised inputs; scoring uses the posterior mean, so it is deterministic."""

    def __init__(self, dim: int, hidden: int, latent: int):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.to_mu = nn.Linear(hidden, latent)
        self.to_logvar = nn.Linear(hidden, latent)
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                     nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, sample: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        mu, logvar = self.to_mu(h), self.to_logvar(h).clamp(-10, 10)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if sample else mu
        return self.decoder(z), mu, logvar


class DriftVAE(Detector):
    """VAE negative-ELBO scores -> conformal p-values -> OOD records, covariate drift and label shift."""

    name = "drift_vae"
    family = "drift"
    stream = "inference"
    requires_fit = True
    needs_model = False
    priority = 10

    class Options(DetectorOptions):
        hidden: int = Field(64, ge=4, description="width of the VAE's hidden layers")
        latent: int = Field(8, ge=1, description="size of the VAE's latent code")
        epochs: int = Field(150, ge=1, description="training epochs over the fit split of the reference data")
        holdout: float = Field(0.3, gt=0.05, lt=0.9,
                               description="share of reference rows kept out of training to calibrate p-values")
        record_p: float = Field(1e-6, gt=0, lt=1,
                                description="p-value below which a single record is reported as out of "
                                            "distribution (per-record false-alarm rate)")
        max_record_findings_per_batch: int = Field(
            20, ge=0, description="cap on per-record findings per batch; a flood becomes a drift episode instead")
        bet_epsilon: float = Field(0.5, gt=0, lt=1,
                                   description="power betting function eps*p^(eps-1): smaller bets harder on "
                                               "small p-values (detects strong shifts faster, weak ones slower)")
        cusum_threshold: float = Field(16.0, gt=0,
                                       description="log-martingale level that raises drift; the mean number of "
                                                   "benign records between false alarms is at least e^threshold")
        calibration_sigmas: float = Field(
            3.0, ge=0, description="drift allowance subtracted from each CUSUM increment, in standard errors "
                                   "of the calibration set (a finite calibration set makes benign p-values "
                                   "only nearly uniform; without an allowance a long benign stream drifts up)")
        mean_window: int = Field(300, ge=20, description="records per window of the per-feature mean test")
        mean_p: float = Field(1e-7, gt=0, lt=1,
                              description="Bonferroni-adjusted p-value of the largest per-feature mean shift in a "
                                          "window that raises drift (a shift of a few features the VAE absorbs)")
        label_window: int = Field(300, ge=20, description="labelled records per class-prior chi-square test")
        label_p: float = Field(1e-7, gt=0, lt=1, description="p-value of the chi-square test that raises label shift")
        label_long_windows: int = Field(
            10, ge=0, description="the last this many class-prior windows are also tested together against the "
                                 "twice as many windows before them (two-sample): for shifts of a rare class "
                                 "that one window is too short to show; 0: off")
        quiet_records: int = Field(5000, ge=1,
                                   description="records without a new alarm after which a drift episode is closed")
        max_models: int = Field(256, ge=1, description="models tracked at once (least recently seen evicted)")
        client_ewma: float = Field(0.05, gt=0, le=1, description="per-record weight of a client's far-out share")
        client_min_records: int = Field(8, ge=1, description="records before a client's share is trusted")
        client_far_p: float = Field(0.01, gt=0, lt=1, description="p-value below which a record counts as far out")
        client_far_share: float = Field(0.5, gt=0, le=1,
                                        description="far-out share above which a client is individually anomalous")
        concentrated_max_share: float = Field(
            0.2, gt=0, le=1, description="anomalous clients are left out of the drift tests only while they are "
                                         "fewer than this share of the distinct clients in a batch or of the "
                                         "clients active in the recent traffic")
        max_clients: int = Field(100_000, ge=1, description="clients tracked for attribution (LRU)")
        client_max_share: float = Field(
            0.1, gt=0, le=1, description="most of the recent traffic one client may make up in the drift tests")
        client_share_window: int = Field(500, ge=10, description="records over which a client's share is averaged")
        robust_share: float = Field(
            0.05, ge=0, lt=0.5, description="a feature-mean or class-prior shift must survive leaving out this "
                                            "share of the window's clients, those pushing it most: a drift moves "
                                            "everyone, a few clients' unusual queries (probing, attacks) do not "
                                            "make one")
        gaussian_channel: bool = Field(
            True, description="a second covariate CUSUM on the input's Mahalanobis distance to the reference "
                              "(catches rescaled or decorrelated features a small VAE absorbs)")
        gaussian_rank: int = Field(128, ge=1, le=4096,
                                   description="principal directions the Gaussian channel whitens one by one; "
                                               "the rest share their mean variance (bounds the cost for wide "
                                               "inputs)")
        robust_p: float = Field(1e-3, gt=0, lt=1, description="Bonferroni p-value the rest of the window "
                                                                   "must still reach for that check")

    def __init__(self, options: DetectorOptions, context):
        super().__init__(options, context)
        self.opts: DriftVAE.Options = options  # type: ignore[assignment]
        self.vae: _VAE | None = None
        self.mean: np.ndarray | None = None
        self.scale: np.ndarray | None = None
        self.residual_var: np.ndarray | None = None
        self.calibrator: ConformalCalibrator | None = None
        self.gaussian: Whitening | None = None  # the Gaussian channel's map (None: off, or older artifacts)
        self.gaussian_calibrator: ConformalCalibrator | None = None
        self.class_freq: np.ndarray | None = None
        self.n_fit = 0
        self._models: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._counters = {"records": 0, "record_findings": 0, "record_findings_capped": 0, "episodes": 0,
                          "evicted_models": 0, "attributed_to_clients": 0, "mean_shifts_left_to_clients": 0,
                          "label_shifts_left_to_clients": 0}
        self._slots = ClientSlots(options.max_clients)
        self._row_slots = np.zeros(0, np.int64)
        self._eviction_alarm = EvictionAlarm(self.name, self.family)
        self._far_share = np.zeros(0, np.float64)  # per client slot: EWMA of far-out records
        self._seen = np.zeros(0, np.int64)  # per client slot: records seen
        self._share = np.zeros(0, np.float64)  # per client slot: EWMA share of the traffic
        self._share_at = np.zeros(0, np.int64)  # per client slot: self._total when _share was last updated
        self._total = 0  # records seen by the attribution (the EWMA clock)

    # ------------------------------------------------------------------ fitting
    def fit(self, reference: ReferenceData) -> None:
        """Train the VAE on one split of the reference data and calibrate p-values on the other."""
        fit_part, cal_part = reference.split(self.opts.holdout, seed=self.context.seed)
        self.__dict__.pop("_tensor_cache", None)  # a refit must not score with the last fit's statistics
        X = fit_part.X.astype(np.float32)
        self.n_fit = len(X)
        self.mean = X.mean(0)
        std = X.std(0)
        # constant features (digit border pixels) get a floor so one stray value is unusual, not infinite
        self.scale = np.maximum(std, 0.25 * float(std.mean()) + 1e-6).astype(np.float32)
        torch.manual_seed(self.context.seed)
        dev = self.context.device
        vae = _VAE(reference.dim, self.opts.hidden, self.opts.latent).to(dev)
        opt = torch.optim.Adam(vae.parameters(), lr=2e-3, weight_decay=1e-5)
        Xs = torch.as_tensor((X - self.mean) / self.scale, device=dev)
        gen = torch.Generator().manual_seed(self.context.seed)
        vae.train()
        for _ in range(self.opts.epochs):
            perm = torch.randperm(len(Xs), generator=gen).to(dev)
            for i in range(0, len(perm), 128):
                xb = Xs[perm[i : i + 128]]
                recon, mu, logvar = vae(xb, sample=True)
                kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)
                loss = (0.5 * (recon - xb).pow(2).sum(1) + kl).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
        vae.eval()
        self.vae = vae
        with torch.no_grad():
            recon, _, _ = vae(Xs, sample=False)
            res = (recon - Xs).pow(2).mean(0).cpu().numpy()
        self.residual_var = np.maximum(res, 0.05 * float(res.mean()) + 1e-6).astype(np.float32)
        self.calibrator = ConformalCalibrator.fit(self.score(cal_part.X))
        self.gaussian, self.gaussian_calibrator = None, None
        if self.opts.gaussian_channel:
            self.gaussian = Whitening.fit(X, self.opts.gaussian_rank)
            self.gaussian_calibrator = ConformalCalibrator.fit(self.gaussian_score(cal_part.X))
        answers = self._reference_answers(reference)
        if answers is not None:
            k = reference.n_classes or self.context.n_classes or 0
            counts = np.bincount(answers, minlength=k).astype(np.float64)
            self.class_freq = np.maximum(counts / counts.sum(), 1e-3)
            self.class_freq /= self.class_freq.sum()

    def _reference_answers(self, reference: ReferenceData) -> np.ndarray | None:
        """The classes the class-prior test expects: the watched model's answers on the reference rows when
        ``train --model`` gave it, else the reference labels.

        Why: the test counts the model's answers, not true labels, and a model does not answer in the
        labels' proportions. Measured against the labels, a strong enough bias alone is a class-prior shift:
        a digits model answering 7 for 29 % of benign traffic (10.6 % of the labels) raised one
        (``tests/test_detector_drift_vae.py -k watched_models_own``). A surrogate trained on the reference
        answers it as labelled anyway, and is not the model whose answers the records carry.
        """
        model = self.context.model
        if model is not None and not model.is_surrogate:
            return model.predict_proba(np.asarray(reference.X, np.float32)).argmax(1)
        return reference.y

    def score(self, X: np.ndarray) -> np.ndarray:
        """Negative ELBO per row (higher = less like the reference data); one torch call."""
        if self.vae is None:
            raise RuntimeError("drift_vae is not fitted: run `inferwatch train` or call fit() first")
        dev = self.context.device
        with torch.no_grad():
            x = torch.as_tensor(np.asarray(X, dtype=np.float32), device=dev)
            xs = (x - self._t("mean")) / self._t("scale")
            recon, mu, logvar = self.vae(xs, sample=False)
            rec = 0.5 * ((recon - xs).pow(2) / self._t("residual_var")).sum(1)
            kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)
            return (rec + kl).double().cpu().numpy()

    def gaussian_score(self, X: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance per row to the reference (shrunk covariance); one torch call."""
        with torch.no_grad():
            x = torch.as_tensor(np.asarray(X, dtype=np.float32), device=self.context.device)
            z = self._gaussian_op()(x)
            return z.pow(2).sum(1).double().cpu().numpy()

    def _gaussian_op(self) -> WhiteningOp:
        cache = self.__dict__.setdefault("_tensor_cache", {})
        if "gaussian" not in cache:
            cache["gaussian"] = self.gaussian.on(self.context.device)
        return cache["gaussian"]

    def _t(self, attr: str) -> torch.Tensor:
        cache = self.__dict__.setdefault("_tensor_cache", {})
        if attr not in cache:
            cache[attr] = torch.as_tensor(getattr(self, attr), device=self.context.device)
        return cache[attr]

    def artifacts(self) -> dict[str, Any]:
        if self.vae is None or self.calibrator is None:
            raise RuntimeError("drift_vae has nothing to save: fit() it first")
        weights = {k: v.detach().cpu().numpy() for k, v in self.vae.state_dict().items()}
        return {
            "dim": len(self.mean), "hidden": self.opts.hidden, "latent": self.opts.latent,
            "weights": weights, "mean": self.mean, "scale": self.scale, "residual_var": self.residual_var,
            "calibrator": self.calibrator.to_tree(),
            "class_freq": self.class_freq if self.class_freq is not None else np.zeros(0),
            "n_fit": self.n_fit,
            **({"gaussian": {"whitening": self.gaussian.to_tree(), "calibrator": self.gaussian_calibrator.to_tree()}}
               if self.gaussian is not None else {}),
        }

    def load_artifacts(self, tree: dict[str, Any]) -> None:
        dim, hidden, latent = int(tree["dim"]), int(tree["hidden"]), int(tree["latent"])
        vae = _VAE(dim, hidden, latent)
        vae.load_state_dict({k: torch.as_tensor(v) for k, v in tree["weights"].items()})
        self.vae = vae.to(self.context.device).eval()
        self.mean = np.asarray(tree["mean"], np.float32)
        self.scale = np.asarray(tree["scale"], np.float32)
        self.residual_var = np.asarray(tree["residual_var"], np.float32)
        self.calibrator = ConformalCalibrator.from_tree(tree["calibrator"])
        freq = np.asarray(tree["class_freq"], np.float64)
        self.class_freq = freq if len(freq) else None
        self.n_fit = int(tree["n_fit"])
        self.gaussian, self.gaussian_calibrator = None, None
        if "gaussian" in tree and self.opts.gaussian_channel:  # artifacts from before the channel: it stays off
            self.gaussian = Whitening.from_tree(tree["gaussian"]["whitening"])
            self.gaussian_calibrator = ConformalCalibrator.from_tree(tree["gaussian"]["calibrator"])
        self.__dict__.pop("_tensor_cache", None)

    # --------------------------------------------------------------- hot path
    def update(self, batch: InferenceBatch, notes: dict[str, Any]) -> list[Finding]:
        if len(batch) == 0:
            notes["ood_p"] = np.zeros(0)
            return []
        if self.calibrator is None:
            raise RuntimeError("drift_vae is not fitted: run `inferwatch train` or load its artifacts")
        scores = self.score(batch.X)
        p_tail = self.calibrator.pvalues(scores)
        p_rank = {"covariate": self.calibrator.rank_pvalues(scores),
                  "covariate_low": self.calibrator.lower_rank_pvalues(scores)}
        p_far = p_tail  # what makes a client's record far out, for attributing it to the client
        if self.gaussian is not None:
            g = self.gaussian_score(batch.X)
            p_rank["covariate_gaussian"] = self.gaussian_calibrator.rank_pvalues(g)
            # a client whose queries only the Gaussian channel finds unusual (decorrelated features the VAE
            # takes in its stride) is still a client, not the population
            p_far = np.minimum(p_tail, self.gaussian_calibrator.pvalues(g))
        notes["ood_p"] = p_tail
        self._counters["records"] += len(batch)
        findings = self._record_findings(batch, p_tail, scores)
        population = self._population(batch, p_far)
        models = np.asarray(batch.models, dtype=object)
        for model in dict.fromkeys(batch.models):
            idx = np.flatnonzero(models == model) if len(set(batch.models)) > 1 else np.arange(len(batch))
            idx = idx[population[idx]]
            state = self._model_state(model)
            for channel, p in p_rank.items():
                findings += self._covariate(state, channel, model, batch, idx, p)
            findings += self._feature_means(state, model, batch, idx)
            if self.class_freq is not None:
                findings += self._label_shift(state, model, batch, idx)
        return findings + self._eviction_alarm.check(self._slots, float(batch.ts.max()))

    def _population(self, batch: InferenceBatch, p_far: np.ndarray) -> np.ndarray:
        """Rows that speak for the population: all, minus those of a small minority of anomalous clients.

        ``p_far``: per record, the smaller tail p-value of the two scores; below ``client_far_p`` the record
        counts towards its client's far-out share."""
        slots, fresh = self._slots.assign(batch.clients)
        self._row_slots = slots  # read by _feature_means, for the leave-clients-out check
        need = self._slots.high_water
        if len(self._far_share) < need:
            grow = max(need, 2 * len(self._far_share))
            self._far_share = np.resize(self._far_share, grow)
            self._seen = np.resize(self._seen, grow)
            self._share = np.resize(self._share, grow)
            self._share_at = np.resize(self._share_at, grow)
        self._far_share[fresh] = 0.0
        self._seen[fresh] = 0
        self._share[fresh] = 0.0
        self._share_at[fresh] = self._total
        far = (p_far < self.opts.client_far_p).astype(np.float64)
        uniq, inv, counts = np.unique(slots, return_inverse=True, return_counts=True)
        far_mean = np.bincount(inv, weights=far) / counts
        w = 1.0 - (1.0 - self.opts.client_ewma) ** counts
        self._far_share[uniq] = (1.0 - w) * self._far_share[uniq] + w * far_mean
        self._seen[uniq] += counts
        # No single client speaks for the population: a client whose share of the recent traffic (EWMA over
        # about `client_share_window` records) exceeds `client_max_share` counts only up to that share (a prober
        # sending hundreds of queries around one input would otherwise shift the class prior alone).
        w = 1.0 - (1.0 - 1.0 / self.opts.client_share_window) ** len(batch)
        share = self._recent_share(uniq) * (1.0 - w) + w * counts / len(batch)
        self._share[uniq], self._share_at[uniq] = share, self._total + len(batch)
        self._total += len(batch)
        anomalous = self._anomalous(uniq)
        keep = np.ones(len(batch), bool)
        if anomalous.any() and self._anomalous_are_few(len(uniq), int(anomalous.sum())):
            keep = ~anomalous[inv]
        dominant = share > self.opts.client_max_share
        if dominant.any():
            allowed = np.where(dominant, np.ceil(counts * self.opts.client_max_share / share), counts)
            keep &= group_ranks(slots) < allowed[inv]
        self._counters["attributed_to_clients"] += int((~keep).sum())
        return keep

    def _recent_share(self, slots: np.ndarray | slice) -> np.ndarray:
        """Clients' share of the recent traffic now: each one's EWMA decayed by the records sent since it was set."""
        since = (self._total - self._share_at[slots]).astype(np.float64)
        return self._share[slots] * (1.0 - 1.0 / self.opts.client_share_window) ** since

    def _anomalous(self, slots: np.ndarray | slice) -> np.ndarray:
        """Established clients whose far-out share is high. The share is bias-corrected for a client's first
        records (an EWMA that starts at 0 would call a client that has sent only far-out records normal until
        its 14th one, at the default weight)."""
        seen = self._seen[slots]
        share = self._far_share[slots] / np.maximum(1.0 - (1.0 - self.opts.client_ewma) ** seen.astype(float), 1e-12)
        return (seen >= self.opts.client_min_records) & (share > self.opts.client_far_share)

    def _anomalous_are_few(self, batch_clients: int, batch_anomalous: int) -> bool:
        """Whether the anomalous clients are a small minority (``concentrated_max_share``) of this batch's clients
        or of the clients active in the recent traffic (share EWMA above a tenth of one record's weight): a
        small batch can hold a few attackers and few tenants, and those attackers are still not the population
        (seen in a demo run: a covariate false alarm from extraction clients in batches of ~50 records)."""
        hw = self._slots.high_water
        active = self._recent_share(slice(0, hw)) > 0.1 / self.opts.client_share_window
        bad = active & self._anomalous(slice(0, hw))
        limit = self.opts.concentrated_max_share
        return batch_anomalous < limit * batch_clients or int(bad.sum()) < limit * max(int(active.sum()), 1)

    def _record_findings(self, batch: InferenceBatch, p: np.ndarray, scores: np.ndarray) -> list[Finding]:
        far = np.flatnonzero(p < self.opts.record_p)
        if len(far) > self.opts.max_record_findings_per_batch:
            self._counters["record_findings_capped"] += len(far) - self.opts.max_record_findings_per_batch
            far = far[np.argsort(p[far], kind="stable")[: self.opts.max_record_findings_per_batch]]
        out = []
        for i in far.tolist():
            self._counters["record_findings"] += 1
            pi = float(p[i])
            out.append(Finding(
                family="drift", detector=self.name, title="Out-of-distribution input",
                severity=Severity.MEDIUM if pi < self.opts.record_p * 1e-3 else Severity.LOW,
                actor=batch.clients[i], model=batch.models[i], related_ids=(batch.ids[i],),
                window=batch.ids[i],
                evidence={"ood_p": pi, "score": float(scores[i]), "record_p_threshold": self.opts.record_p,
                          "ts": float(batch.ts[i]), "calibration_size": len(self.calibrator.sorted_scores)},
                confidence=float(min(1.0, -np.log10(max(pi, 1e-300)) / 12.0)),
                message=(f"input {batch.ids[i]} from {batch.clients[i]} is unlike the reference data "
                         f"(p={pi:.2e} < {self.opts.record_p:g})"),
                analytic_type="learning", time_ms=int(batch.ts[i] * 1000),
            ))
        return out

    def _model_state(self, model: str) -> dict[str, Any]:
        if model in self._models:
            self._models.move_to_end(model)
            return self._models[model]
        while len(self._models) >= self.opts.max_models:
            self._models.popitem(last=False)
            self._counters["evicted_models"] += 1
        state = {
            **{c: _cusum() for c in _COVARIATE},
            "feature_mean": {**_mean_window(len(self.mean)), "ids": [], "start_ts": None, **_episode()},
            "label": {**_label_window(), **_recent_windows(),
                      "ids": [], "start_ts": None, **_episode()},
        }
        self._models[model] = state
        return state

    def _covariate(self, state: dict[str, Any], channel: str, model: str, batch: InferenceBatch,
                   idx: np.ndarray, p_rank: np.ndarray) -> list[Finding]:
        """CUSUM of log betting increments, vectorised: S_t = C_t - min(0, min_{s<=t} C_s).

        Run once per tail: ``covariate`` bets on unusually high scores,
        ``covariate_low`` on unusually low ones.
        """
        st = state[channel]
        eps, h = self.opts.bet_epsilon, self.opts.cusum_threshold
        n_cal = len(self.calibrator.sorted_scores)  # the Gaussian channel is calibrated on the same held-out rows
        allowance = self.opts.calibration_sigmas * (1.0 - eps) / np.sqrt(n_cal)
        inc = np.log(eps) + (eps - 1.0) * np.log(p_rank[idx]) - allowance
        small = p_rank[idx] < 0.05
        findings: list[Finding] = []
        pos = 0
        while pos < len(idx):
            c = st["S"] + np.cumsum(inc[pos:])
            run_min = np.minimum.accumulate(np.minimum(c, 0.0))
            s = c - np.minimum(run_min, 0.0)
            over = np.flatnonzero(s > h)
            end = int(over[0]) + 1 if len(over) else len(s)
            seg = s[:end]
            zeros = np.flatnonzero(seg <= 0.0)
            first = int(zeros[-1]) + 1 if len(zeros) else 0  # the change point estimate: after the last zero
            if len(zeros):
                st.update(ids=[], n=0, n_small=0, start_ts=None)
            rows = idx[pos + first : pos + end]
            if len(rows):
                if st["start_ts"] is None:
                    st["start_ts"] = float(batch.ts[rows[0]])
                room = MAX_RELATED - len(st["ids"])
                if room > 0:
                    st["ids"].extend(batch.ids[i] for i in rows[:room].tolist())
                st["n"] += len(rows)
                st["n_small"] += int(small[pos + first : pos + end].sum())
            st["S"] = float(seg[-1])
            st["since_alarm"] += end
            if len(over):
                last_ts = float(batch.ts[idx[pos + end - 1]])
                f = self._alarm(state, channel, model, last_ts, {
                    "direction": _COVARIATE[channel], "cusum": float(seg[-1]), "threshold": h,
                    "bet_epsilon": eps, "allowance": allowance,
                    "records_in_window": st["n"], "small_p_share": st["n_small"] / max(st["n"], 1),
                    "expected_small_p_share": 0.05,
                })
                if f is not None:
                    findings.append(f)
                st.update(S=0.0, ids=[], n=0, n_small=0, start_ts=None)
            elif st["open"] and st["since_alarm"] >= self.opts.quiet_records:
                st["open"] = False
            pos += end
        return findings

    def _feature_means(self, state: dict[str, Any], model: str, batch: InferenceBatch,
                       idx: np.ndarray) -> list[Finding]:
        """Largest per-feature mean shift per window of ``mean_window`` records, z-scored against the reference.

        The standard error counts both the window and the reference sample
        (a finite reference mean is itself uncertain), Bonferroni over features.
        """
        st = state["feature_mean"]
        xs = (batch.X[idx] - self.mean) / self.scale
        findings: list[Finding] = []
        pos = 0
        n_fit = max(self.n_fit, 2)
        while pos < len(idx):
            take = slice(pos, pos + self.opts.mean_window - st["n"])
            rows = idx[take]
            if st["start_ts"] is None and len(rows):
                st["start_ts"] = float(batch.ts[rows[0]])
            st["sums"] = st["sums"] + xs[take].sum(0)
            st["rows"] = np.concatenate([st["rows"], xs[take].astype(np.float32)])
            st["row_slots"] = np.concatenate([st["row_slots"], self._row_slots[rows]])
            st["n"] += len(rows)
            room = MAX_RELATED - len(st["ids"])
            st["ids"].extend(batch.ids[i] for i in rows[:room].tolist())
            st["since_alarm"] += len(rows)
            pos += len(rows)
            if st["n"] >= self.opts.mean_window:
                z = (st["sums"] / st["n"]) / np.sqrt(1.0 / st["n"] + 1.0 / n_fit)
                worst = int(np.argmax(np.abs(z)))
                pval = float(min(1.0, 2 * ndtr(-abs(z[worst])) * len(z)))  # = norm.sf
                if pval < self.opts.mean_p and self._few_clients_explain(st, z, n_fit):
                    self._counters["mean_shifts_left_to_clients"] += 1
                elif pval < self.opts.mean_p:
                    top = np.argsort(-np.abs(z))[:5]
                    f = self._alarm(state, "feature_mean", model, float(batch.ts[rows[-1]]), {
                        "direction": "feature means moved", "p_bonferroni": pval, "threshold_p": self.opts.mean_p,
                        "window": int(st["n"]), "top_features": top.tolist(), "top_z": z[top].round(2).tolist(),
                    })
                    if f is not None:
                        findings.append(f)
                elif st["open"] and st["since_alarm"] >= self.opts.quiet_records:
                    st["open"] = False
                st.update(_mean_window(len(self.mean)), ids=[], start_ts=None)
        return findings

    def _without_top_clients(self, slots: np.ndarray, push: np.ndarray) -> np.ndarray:
        """Mask of the rows left once the ``robust_share`` of clients with the largest summed ``push`` go."""
        uniq, inv = np.unique(slots, return_inverse=True)
        per_client = np.bincount(inv, weights=push)
        drop = np.argsort(-per_client)[: max(1, math.ceil(self.opts.robust_share * len(uniq)))]
        return ~np.isin(inv, drop)

    def _few_clients_shift_classes(self, labels: np.ndarray, slots: np.ndarray,
                                   test: Callable[[np.ndarray, np.ndarray, float], tuple[float, float, float]],
                                   share: np.ndarray) -> bool:
        """Whether the class-prior shift vanishes once the clients whose predictions push it most are left
        out (a client's push: per row, how over-represented the row's class is in the window against the
        ``share`` expected); ``test`` is the one that found the shift, redone on the rest."""
        if self.opts.robust_share <= 0:
            return False
        k = len(share)
        expected = share * len(labels)
        excess = (np.bincount(labels, minlength=k) - expected) / np.maximum(expected, 1e-9)
        keep = self._without_top_clients(slots, excess[labels])
        if int(keep.sum()) < k:
            return True
        return test(labels[keep], slots[keep], self.opts.robust_p)[1] >= self.opts.robust_p

    def _window_test(self, labels: np.ndarray, slots: np.ndarray, level: float) -> tuple[float, float, float]:
        """Chi-square of one window's class counts against the reference frequencies, taken as known, with
        clients as clusters (``_below_level_corrected``): (chi2, p, the correction it was divided by)."""
        counts = np.bincount(labels, minlength=len(self.class_freq)).astype(np.float64)
        expected = self.class_freq * counts.sum()
        return _below_level_corrected(lambda d: _pearson(counts, expected, len(counts) - 1, d),
                                      lambda: _client_design_correction(labels, slots, len(counts)), level)

    def _recent_test(self, before: np.ndarray, labels: np.ndarray, slots: np.ndarray, level: float
                     ) -> tuple[float, float, float]:
        """The recent windows' class counts against the ``before`` counts of the windows before them
        (``_prior_two_sample``), with the recent rows' clients as clusters. The earlier rows' clients are no
        longer known; taken as independent, they add the plain variance of their share: the correction is the
        recent sample's, weighted by its share of the variance of the difference."""
        counts = np.bincount(labels, minlength=len(before)).astype(np.float64)
        n_recent, n_before = counts.sum(), before.sum()

        def correction() -> float:
            own = _client_design_correction(labels, slots, len(before))
            return (own / n_recent + 1.0 / n_before) / (1.0 / n_recent + 1.0 / n_before)

        return _below_level_corrected(lambda d: self._prior_two_sample(before, counts, d), correction, level)

    @staticmethod
    def _prior_two_sample(before: np.ndarray, counts: np.ndarray, correction: float = 1.0) -> tuple[float, float]:
        """Pearson's chi-square of recent class counts against earlier ones (a 2 x k table; classes that
        neither has are left out): both are samples, so neither's shares are taken as known."""
        table = np.stack([before, counts])
        table = table[:, table.sum(0) > 0]
        if table.shape[1] < 2:
            return 0.0, 1.0
        # scipy.stats.chi2_contingency(table, correction=False), without its 0.5 ms of wrappers a call (it
        # ran once per 300 records and cost this detector a quarter of its throughput); a test checks both agree
        expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
        return _pearson(table, expected, table.shape[1] - 1, correction)

    def _few_clients_explain(self, st: dict[str, Any], z: np.ndarray, n_fit: int) -> bool:
        """Whether the window's mean shift vanishes once the clients pushing it most are left out.

        Per client, the sum of its rows along the most shifted feature, signed by the shift; the top
        ``robust_share`` of the window's clients are dropped and the test is redone on all features.
        The shift already passed ``mean_p``; what remains only has to show it at ``robust_p``, a
        level the benign rest of a window with a few attackers reaches once in a thousand windows.
        """
        if self.opts.robust_share <= 0:
            return False
        rows = st["rows"]
        worst = int(np.argmax(np.abs(z)))
        keep = self._without_top_clients(st["row_slots"], rows[:, worst] * np.sign(z[worst]))
        n = int(keep.sum())
        if n < 2:
            return True
        z_rest = (rows[keep].sum(0, dtype=np.float64) / n) / np.sqrt(1.0 / n + 1.0 / n_fit)
        return float(min(1.0, 2 * ndtr(-np.abs(z_rest).max()) * len(z_rest))) >= self.opts.robust_p

    def _label_shift(self, state: dict[str, Any], model: str, batch: InferenceBatch,
                     idx: np.ndarray) -> list[Finding]:
        """Chi-square of predicted-class counts per window of ``label_window`` labelled records, and of
        the last ``label_long_windows`` windows together."""
        st = state["label"]
        k = len(self.class_freq)
        labelled = idx[(batch.labels[idx] >= 0) & (batch.labels[idx] < k)]
        findings: list[Finding] = []
        pos = 0
        while pos < len(labelled):
            need = self.opts.label_window - len(st["labels"])
            take = labelled[pos : pos + need]
            if st["start_ts"] is None and len(take):
                st["start_ts"] = float(batch.ts[take[0]])
            st["labels"] = np.concatenate([st["labels"], batch.labels[take]])
            st["label_slots"] = np.concatenate([st["label_slots"], self._row_slots[take]])
            room = MAX_RELATED - len(st["ids"])
            st["ids"].extend(batch.ids[i] for i in take[:room].tolist())
            st["since_alarm"] += len(take)
            pos += len(take)
            if len(st["labels"]) >= self.opts.label_window:
                shift, left_to_clients = self._prior_tests(st, k)
                if shift is not None:
                    f = self._alarm(state, "label", model, float(batch.ts[take[-1]]), shift)
                    if f is not None:
                        findings.append(f)
                elif left_to_clients:
                    self._counters["label_shifts_left_to_clients"] += 1
                elif st["open"] and st["since_alarm"] >= self.opts.quiet_records:
                    st["open"] = False
                st.update(_label_window(), ids=[], start_ts=None)
        return findings

    def _prior_tests(self, st: dict[str, Any], k: int) -> tuple[dict[str, Any] | None, bool]:
        """The class-prior tests on a full window: the window against the reference; else the last
        ``label_long_windows`` windows against the twice as many before them.

        Returns the evidence of the test that found a shift (None: neither did) and whether a shift was
        found but vanished without the few clients pushing it most. Moves this window into the history.
        """
        labels, slots = st["labels"], st["label_slots"]
        counts = np.bincount(labels, minlength=k).astype(np.float64)
        tests = [(labels, slots, self._window_test, self.class_freq, "window")]
        L = self.opts.label_long_windows
        if L > 0:
            history = np.concatenate([st["window_counts"].reshape(-1, k), counts[None]])
            recent_labels = np.concatenate([st["recent_labels"], labels])
            recent_slots = np.concatenate([st["recent_slots"], slots])
            if len(history) >= 3 * L:
                before = history[-3 * L : -L].sum(0)
                tests.append((recent_labels, recent_slots, functools.partial(self._recent_test, before),
                              before / before.sum(), "recent_windows_vs_before"))
            drop = max(0, len(recent_labels) - (L - 1) * self.opts.label_window)  # keep what the next test takes
            st["window_counts"] = history[-(3 * L - 1):]
            st["recent_labels"], st["recent_slots"] = recent_labels[drop:], recent_slots[drop:]
        left_to_clients = False
        for sample, sample_slots, test, expected_share, name in tests:
            chi2, pval, correction = test(sample, sample_slots, self.opts.label_p)
            if pval >= self.opts.label_p:
                continue
            if self._few_clients_shift_classes(sample, sample_slots, test, expected_share):
                left_to_clients = True
                continue
            sample_counts = np.bincount(sample, minlength=k)
            n = sample_counts.sum()
            return {"chi2": chi2, "p": pval, "threshold_p": self.opts.label_p, "window": int(n), "test": name,
                    "client_design_correction": round(correction, 4),
                    "observed_share": (sample_counts / n).round(4).tolist(),
                    "reference_share": np.asarray(expected_share).round(4).tolist()}, False
        return None, left_to_clients

    def _alarm(self, state: dict[str, Any], channel: str, model: str, ts: float,
               evidence: dict[str, Any]) -> Finding | None:
        """Open an episode (one finding) or extend the open one (silently).

        The covariate tests (both tails, the Gaussian channel, feature means)
        share their episodes: one shift seen by two of them is still one finding.
        """
        st = state[channel]
        st["since_alarm"] = 0
        st["alarms"] += 1
        group = [state[c] for c in _COVARIATE_CHANNELS] if channel in _COVARIATE_CHANNELS else [st]
        if any(g["open"] for g in group):
            st["open"] = True
            return None
        st["open"] = True
        st["episode_start"] = st["start_ts"] if st["start_ts"] is not None else ts
        self._counters["episodes"] += 1
        covariate = channel != "label"
        title = "Covariate drift in model inputs" if covariate else "Class-prior shift in predictions"
        return Finding(
            family="drift", detector=self.name, title=title, severity=Severity.MEDIUM,
            actor=None, model=model, related_ids=tuple(st["ids"]),
            window=f"{channel}:{model}:{st['episode_start']:.3f}",
            evidence={"channel": channel, "window_start_ts": st["episode_start"], "window_end_ts": ts,
                      **evidence},
            confidence=0.9, analytic_type="learning" if covariate else "statistical",
            message=(f"covariate drift on model {model}: since ts {st['episode_start']:.3f}, "
                     f"{evidence['direction']}" if covariate else
                     f"class-prior shift on model {model}: predicted classes since ts "
                     f"{st['episode_start']:.3f} do not match the reference frequencies"),
            time_ms=int(ts * 1000),
        )

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        models = []
        for model, state in self._models.items():
            lab = state["label"]
            models.append({
                "model": model,
                **{c: {**state[c], "ids": list(state[c]["ids"])} for c in _COVARIATE},
                "feature_mean": {**state["feature_mean"], "ids": list(state["feature_mean"]["ids"]),
                                 "sums": np.asarray(state["feature_mean"]["sums"], np.float64),
                                 "rows": state["feature_mean"]["rows"].copy(),
                                 "row_slots": state["feature_mean"]["row_slots"].copy()},
                "label": {**lab, "ids": list(lab["ids"]), "labels": lab["labels"].copy(),
                          "label_slots": lab["label_slots"].copy(),
                          **{key: lab[key].copy() for key in _recent_windows()}},
            })
        n = self._slots.high_water
        return {"models": models, "counters": dict(self._counters), "clients": self._slots.state_dict(),
                "far_share": self._far_share[:n].copy(), "seen": self._seen[:n].copy(),
                "share": self._share[:n].copy(), "share_at": self._share_at[:n].copy(), "total": self._total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._models = OrderedDict()
        for entry in state["models"]:
            restored: dict[str, Any] = {}
            for c in (*_COVARIATE, "feature_mean", "label"):
                if c not in entry:  # a checkpoint from before the Gaussian channel: it starts afresh
                    restored[c] = _cusum()
                    continue
                restored[c] = dict(entry[c])
                restored[c]["ids"] = list(restored[c]["ids"])
            lab = restored["label"]
            if "labels" not in lab:  # a checkpoint from before the leave-clients-out check: start a new window
                lab.update(_label_window(), ids=[], start_ts=None)
            lab.pop("counts", None)  # such checkpoints kept class counts; they are the labels' bincount now
            lab["labels"] = np.asarray(lab["labels"], np.int64)
            lab["label_slots"] = np.asarray(lab["label_slots"], np.int64)
            for key, empty in _recent_windows().items():  # checkpoints from before the long test: none yet
                lab[key] = np.asarray(lab.get(key, empty), empty.dtype)
            fm = restored["feature_mean"]
            fm["sums"] = np.asarray(fm["sums"], np.float64)
            if "rows" not in fm:  # a checkpoint from before the leave-clients-out check: start a new window
                fm.update(_mean_window(len(fm["sums"])), ids=[], start_ts=None)
            fm["rows"] = np.asarray(fm["rows"], np.float32).reshape(-1, len(fm["sums"]))
            fm["row_slots"] = np.asarray(fm["row_slots"], np.int64)
            self._models[entry["model"]] = restored
        self._counters.update(state["counters"])
        self._slots.load_state_dict(state["clients"])
        self._far_share = np.asarray(state["far_share"], np.float64).copy()
        self._seen = np.asarray(state["seen"], np.int64).copy()
        self._share = np.asarray(state["share"], np.float64).copy()
        self._share_at = np.asarray(state["share_at"], np.int64).copy()
        self._total = int(state["total"])


def _mean_window(dim: int) -> dict[str, Any]:
    """An empty window of the feature-mean test: running sums plus its rows and their clients' slots."""
    return {"sums": np.zeros(dim), "n": 0, "rows": np.zeros((0, dim), np.float32),
            "row_slots": np.zeros(0, np.int64)}


def _label_window() -> dict[str, Any]:
    """An empty window of the class-prior test: its predicted labels and their clients' slots."""
    return {"labels": np.zeros(0, np.int64), "label_slots": np.zeros(0, np.int64)}


def _pearson(observed: np.ndarray, expected: np.ndarray, df: int, correction: float = 1.0
             ) -> tuple[float, float]:
    """Pearson's chi-square statistic of observed against expected counts divided by ``correction`` (a design
    correction, 1 for independent rows), and its p-value at ``df`` degrees of freedom (=
    scipy.stats.chi2.sf(chi2, df))."""
    chi2 = float(((observed - expected) ** 2 / expected).sum()) / correction
    return chi2, float(chdtrc(df, chi2))


def _below_level_corrected(test: Callable[[float], tuple[float, float]], correction: Callable[[], float],
                           level: float) -> tuple[float, float, float]:
    """``test`` (chi2, p for a design correction) plain, and where its p is under ``level`` again divided by
    ``correction()``: (chi2, p, the correction used). The correction (never below 1) only raises p, so above
    the level the plain result stands, and benign windows, nearly all above it, skip computing it."""
    chi2, p = test(1.0)
    if p >= level:
        return chi2, p, 1.0
    d = correction()
    return (*test(d), d)


def _client_design_correction(labels: np.ndarray, slots: np.ndarray, k: int) -> float:
    """Rao and Scott's first-order design correction (JASA 1981) of a class-count chi-square, clients as
    clusters: D = sum_c (1 - p_c) deff_c / (k - 1), floored at 1.

    Why: Pearson's test counts every record as independent evidence, but one client's records are not
    independent of each other: a black-box prober sends hundreds of near-identical queries the model
    answers with one class. Measured in the demo: ten of one SimBA prober's queries in a window of 300 (its
    tenants' answers alone: p 2.8e-5) took it to 6e-8, a false alarm just past the 1e-7 threshold. With clients
    as clusters the variance of each class share is the between-client one (Taylor linearisation, as SAS
    PROC SURVEYFREQ computes it): a client whose rows pile onto one class inflates its class's design
    effect deff_c, and the statistic shrinks accordingly, while a drift that moves every client's answers
    keeps deff near 1 and the test as it was. Floored at 1: never stricter than the plain test.
    """
    n = len(labels)
    clients, inverse = np.unique(slots, return_inverse=True)
    g = len(clients)
    if g < 2 or n < 2:
        return 1.0
    per_client = np.bincount(inverse * k + labels, minlength=g * k).reshape(g, k).astype(np.float64)
    share = per_client.sum(0) / n
    rows = per_client.sum(1)
    var = g / (g - 1) * ((per_client - rows[:, None] * share[None, :]) ** 2).sum(0) / n**2
    srs = share * (1 - share) / (n - 1)
    deff = np.where(srs > 0, var / np.where(srs > 0, srs, 1.0), 1.0)
    return max(1.0, float(((1 - share) * deff).sum() / (k - 1)))


def _recent_windows() -> dict[str, Any]:
    """The class-prior test's history: the labels (and their clients' slots) of the windows just before the
    current one, and the class counts of each window before it, for the test of recent windows vs earlier."""
    return {"recent_labels": np.zeros(0, np.int64), "recent_slots": np.zeros(0, np.int64),
            "window_counts": np.zeros((0, 0))}


def _cusum() -> dict[str, Any]:
    """A covariate channel's CUSUM, at rest."""
    return {"S": 0.0, "ids": [], "n": 0, "n_small": 0, "start_ts": None, **_episode()}


def _episode() -> dict[str, Any]:
    return {"open": False, "since_alarm": 0, "alarms": 0, "episode_start": None}
