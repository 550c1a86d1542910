"""Poisoned feedback: label flips and backdoor triggers on the feedback topic.

Why these signals: labels that flow back for retraining are only worth
poisoning if they teach the model something it would not learn from clean
data, so a poisoned label disagrees with what the data says. Per record we
score how implausible its label is: minus the log of the monitored model's
probability of the given label (``context.model``), plus minus the log of the
label's share among the k nearest reference rows (a kNN vote).

Two thresholds, both from reference data, never from attacks:

- *weak*: above all but ``record_fpr`` of correctly labelled held-out
  reference rows (an exponential tail fit reads that far-out quantile), or
  of those with the record's label where that is lower (a class the model
  often gets wrong does not set the bar for the others' labels);
- *strong*: also above all but ``confusion_pass`` of simulated honest
  confusions (held-out rows relabelled to the runner-up class of their
  neighbour vote, weighted by how ambiguous the vote is), so that honest
  labelling noise, which every feedback stream has, is mostly not flagged.

Both are read off the watched model's answers on reference rows. When those
look like its own training rows (it is right on significantly more of them
than a twin surrogate trained on the other reference rows), the share of
correct labels a model that never saw them flags is added to the benign
rates of the count tests below (``unseen_rates``): new feedback is not
answered as surely as training rows.

One flagged record proves little, so findings come from aggregation in
event-time windows (``window_s``):

- a *source* is compromised when its distinct strong flags are far above
  ``benign_flag_rate`` or its distinct weak flags far above
  ``honest_error_rate`` (binomial, ``alpha``); all its weak-flagged records
  and conflicting near-duplicates (a near-identical input seen in the window
  with another label, where the model sides with the other) are named;
- a *window* is poisoned when the strong flags of the other sources together
  are far above ``benign_flag_rate`` (``window_alpha``): campaigns spread
  thinly over many sources; its strong-flagged records are named;
- a window is poisoned too when the weak flags of the other sources together
  are far above ``honest_error_rate`` (``window_alpha``): where the model
  rejects honest confusions as firmly as flips (an overconfident model, a
  two-class task), few labels pass the strict threshold, but a campaign still
  adds implausible labels beyond what honest mistakes explain. Its records are
  ranked by how confidently *both* the model (its term capped at
  ``-log(record_fpr)``) and the neighbour vote reject the label, and the
  largest top set is named whose expected benign share, read from the
  reference null (calibration rows plus simulated honest confusions), stays
  within ``window_fdr`` (Benjamini-Hochberg step-up).

The label histogram of each source is tested against the reference prior
(chi-square) and reported as evidence.

Backdoors: dirty-label trigger poisoning (an input patch or feature value,
relabelled to a target class) also disagrees with the model, so it is
flagged by the same score; what sets it apart is that the flagged records of
one label share a common input shift. For each label's flagged records (all
of the window, distinct inputs only) we count, per feature, how many sit
more than ``trigger_min_shift`` standard deviations from their predicted
class's reference mean, against the rate of clean reference rows (binomial,
Bonferroni over features and directions; the idea of Tran et al.'s spectral
signatures and Chen et al.'s activation clustering: poisoned examples of a
label share a direction that clean ones do not; we test it per feature in
input space instead of with an SVD of hidden activations). This test is its
own significance test, so a backdoor spread over many sources is found too.
Once a trigger is known, every record of the window stamped with it (all
trigger features at the trigger's value) is named, including inputs of the
target class itself that the model does not object to.

Findings: one per (source, window, kind) with kind ``label_flip`` or
``backdoor``; ``related_ids`` = the suspicious records (for quarantine before
retraining), per-record scores in the evidence. An ongoing one is re-raised
with the same uid when it grew by ``reraise_growth`` (at most
``reraise_every`` records) or ``reraise_s`` seconds of event time passed,
and when its window closes. Call :meth:`flush` at shutdown or at the end of
a replay to emit the last growth of the open windows.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field
from scipy.special import bdtrc, chdtrc

from agent.findings import Finding, Severity
from agent.records import FeedbackBatch
from agent.reference import ReferenceData
from detectors._binomial import binom_tail
from detectors.base import Detector, DetectorContext, DetectorOptions

WINDOW_LEVEL = "*"  # the source key of a finding about a whole window (many sources)


class PoisoningDetector(Detector):
    """Per-source / per-window label-implausibility and trigger-signature detector."""

    name: ClassVar[str] = "poisoning"
    family: ClassVar[str] = "poisoning"
    stream: ClassVar[str] = "feedback"
    requires_fit: ClassVar[bool] = True
    needs_model: ClassVar[bool] = True
    priority: ClassVar[int] = 60

    class Options(DetectorOptions):
        k: int = Field(10, ge=1, le=100, description="reference neighbours voting on each label")
        holdout: float = Field(0.3, gt=0.05, lt=0.9, description="share of reference rows kept to calibrate on")
        unseen_rates: bool = Field(
            True, description="when the watched model is right on significantly more calibration rows than a twin "
                              "surrogate trained on the other reference rows (the reference looks like the model's "
                              "own training rows), add to `benign_flag_rate` and `honest_error_rate` the share of "
                              "correctly labelled calibration rows the twin flags: what new clean feedback will "
                              "show (measured in `train`)")
        seen_alpha: float = Field(0.01, gt=0, lt=0.5,
                                  description="level of that test (exact McNemar test, one-sided)")
        record_fpr: float = Field(1e-4, gt=0, lt=0.2,
                                  description="share of correctly labelled records the per-record threshold "
                                              "may flag (extrapolated with an exponential tail fit)")
        label_min_rows: int = Field(50, ge=0,
                                    description="calibration rows of a given label that give it its own weak "
                                                "threshold where that is lower than all rows' (0: one threshold)")
        confusion_pass: float = Field(0.1, gt=0, lt=1,
                                      description="share of simulated honest confusions the per-record "
                                                  "threshold may still flag")
        benign_flag_rate: float = Field(0.004, gt=0, lt=0.5,
                                        description="flag rate assumed for benign feedback in the binomial tests: "
                                                    "~2% honest mistakes x confusion_pass, plus record_fpr")
        honest_error_rate: float = Field(0.03, gt=0, lt=0.5,
                                         description="share of labels a benign source may get wrong (the rate "
                                                     "a source's or a window's weakly implausible labels are "
                                                     "tested against, and the honest-mistake share of the "
                                                     "benign null that window_fdr is read from)")
        alpha: float = Field(1e-4, gt=0, lt=0.05,
                             description="significance of each per-source test (one per source and window)")
        window_alpha: float = Field(1e-3, gt=0, lt=0.05,
                                    description="significance of the whole-window test (one per window)")
        window_fdr: float = Field(0.1, gt=0, lt=0.5,
                                  description="once a window holds more implausible labels than honest "
                                              "mistakes explain, the share of the records its finding names "
                                              "that may be benign (honest mistakes included), estimated from "
                                              "reference data")
        min_records: int = Field(3, ge=1, description="suspicious records a finding needs at least")
        window_s: float = Field(600.0, gt=0, description="event-time window length (tumbling)")
        max_window_records: int = Field(20000, ge=100,
                                        description="feedback records kept per open window (oldest dropped)")
        conflict_history: int = Field(4096, ge=0, description="recent records per window searched for "
                                                              "conflicting near-duplicates")
        max_sources: int = Field(4096, ge=1, description="sources tracked per window; least recent evicted")
        trigger_min_records: int = Field(5, ge=3, description="flagged records of one label needed to test "
                                                              "for a shared trigger")
        trigger_alpha: float = Field(1e-6, gt=0, lt=0.01,
                                     description="family-wise level of the per-feature trigger tests")
        trigger_min_shift: float = Field(2.0, gt=0, description="standardised shift a record must carry on "
                                                                "the trigger features to be called triggered")
        trigger_tolerance: float = Field(0.1, gt=0, description="a record carries a found trigger when every "
                                                                "trigger feature is within this many reference "
                                                                "standard deviations of the trigger's value")
        dup_quantile: float = Field(0.01, gt=0, lt=0.5,
                                    description="near-duplicate radius = this quantile of reference NN distances")
        reraise_every: int = Field(50, ge=1, description="re-raise a finding when it gained this many records")
        reraise_growth: float = Field(0.1, gt=0, description="... or grew by this fraction (small findings "
                                                             "are updated sooner)")
        reraise_s: float = Field(120.0, gt=0, description="... or this much event time passed with new records")

    def __init__(self, options: DetectorOptions, context: DetectorContext):
        super().__init__(options, context)
        self.opt: PoisoningDetector.Options = options  # type: ignore[assignment]
        self.fitted = False
        self._scoring_model = None  # a twin surrogate while fit measures the unseen-row rates
        self.unseen_strong_rate = 0.0  # clean rows' own strong / weak flag rates on rows a model never saw (fit)
        self.unseen_weak_rate = 0.0
        self.rank_clean: np.ndarray | None = None
        self.weak_by_label: np.ndarray = np.zeros(0)  # per given label (fit); see _per_label_thresholds
        self.strong_by_label: np.ndarray = np.zeros(0)
        self.windows: dict[int, dict[str, Any]] = {}
        self.evicted_sources = 0
        self.closed_windows = 0

    # ------------------------------------------------------------------ fit
    def fit(self, reference: ReferenceData) -> None:
        """kNN base, per-class statistics, label prior and the calibrated per-record threshold."""
        if reference.y is None:
            raise ValueError("poisoning needs labelled reference data (y) to know what labels look like")
        if self.context.model is None:
            raise ValueError("poisoning needs the monitored model (or a surrogate): context.model is None")
        o = self.opt
        base, cal = reference.split(o.holdout, seed=self.context.seed)
        k = self.context.model.n_classes
        self._set_reference(base.X, base.y, k)
        d = torch.cdist(self._ref_X, self._ref_X, compute_mode="donot_use_mm_for_euclid_dist")
        d.fill_diagonal_(float("inf"))
        nn = d.min(1).values.cpu().numpy()
        nn = nn[np.isfinite(nn) & (nn > 0)]
        self.dup_radius = float(np.quantile(nn, o.dup_quantile)) if len(nn) else 0.0
        scores, p_cal, agree_cal, pred_cal = self._scores(cal.X, cal.y)
        clean_threshold = _tail_quantile(scores, o.record_fpr)
        confusion_threshold, n_conf = self._confusion_threshold(cal)
        # benign null of the ranking used to name records of a poisoned window: correct labels
        # (calibration rows) and simulated honest confusions (weighted by how ambiguous the input is)
        self.rank_clean = np.sort(self._rank(p_cal, agree_cal))
        self.threshold = max(clean_threshold, confusion_threshold)
        self.clean_threshold = clean_threshold
        self.weak_by_label, self.strong_by_label = self._per_label_thresholds(scores, cal.y, clean_threshold,
                                                                              confusion_threshold)
        shift = (self._ref_np_X - self.class_mean[self._ref_np_y]) / self.class_std[self._ref_np_y]
        floor = 1.0 / len(shift)
        self.exceed_pos = np.maximum((shift > o.trigger_min_shift).mean(0), floor)
        self.exceed_neg = np.maximum((shift < -o.trigger_min_shift).mean(0), floor)
        rates = self._unseen_rates(base, cal, pred_cal == cal.y) if o.unseen_rates else (0.0, 0.0, {})
        self.unseen_strong_rate, self.unseen_weak_rate, seen = rates
        self.calibration = {
            "unseen_strong_rate": self.unseen_strong_rate, "unseen_weak_rate": self.unseen_weak_rate,
            "reference_seen_by_model": seen,
            "strong_rate_tested": self.strong_rate, "weak_rate_tested": self.weak_rate,
            "threshold": self.threshold, "clean_threshold": clean_threshold,
            "confusion_threshold": confusion_threshold, "confusions_simulated": n_conf,
            "calibration_rows": len(cal.X), "base_rows": len(base.X),
            "calibration_flag_rate": float((scores > self._thresholds(cal.y)[1]).mean()),
            "dup_radius": self.dup_radius, "weak_threshold_by_label": self.weak_by_label.tolist(),
        }
        self.fitted = True

    def _unseen_rates(self, base: ReferenceData, cal: ReferenceData, watched_right: np.ndarray
                      ) -> tuple[float, float, dict[str, Any]]:
        """Shares of correctly labelled calibration rows above the strong and the weak threshold when a model
        that never saw them answers (a twin surrogate trained on ``base``), and the test of whether they count;
        ``watched_right``: per calibration row, whether the watched model answers its label.

        Why: the thresholds are set on the watched model's answers on the
        calibration rows, and the benign rates the count tests assume
        (``benign_flag_rate``, ``honest_error_rate``) are about mislabelled
        rows. Both hold for feedback only if the model answers new rows as it
        does those. When the reference is the model's own training data it is
        right on every calibration row and sure of it, while on new rows it may
        be wrong often: on ``synthetic`` data (``python -m
        agent.scenarios.poisoning overlap synthetic``; right on 100 % of its
        training rows, 88 % of new ones) clean feedback alone raised 17
        findings over 6,000 records. A twin's answers on rows it did not train
        on estimate how often new clean rows cross the thresholds (there, with
        detector seed 0: 6.0 % above the weak ones; clean feedback, 5.9 %), and
        the tests add it to the benign rates. Only when the watched model is right on
        significantly more calibration rows than the twin (``seen_alpha``):
        with held-out reference rows the watched model's own answers already
        say how it answers new rows, and a twin trained on fewer rows would
        only blunt the tests (digits with a held-out reference: random flips
        caught 0.82 -> 0.18 had the rates been added regardless).
        """
        from agent.model import SurrogateMLP, train_classifier

        with torch.enable_grad():
            twin = train_classifier(base.X, base.y, base.input_shape, self.context.device,
                                    seed=self.context.seed + 5,
                                    module=SurrogateMLP(int(np.prod(base.input_shape)), self.n_classes))
        self._scoring_model = twin
        try:
            scores, _, _, twin_pred = self._scores(cal.X, cal.y)
        finally:
            self._scoring_model = None
        twin_right = twin_pred == cal.y
        # exact McNemar: of the rows exactly one of the two gets right, would the watched model's share be this
        # large if both answered rows new to them alike?
        only_watched, only_twin = int((watched_right & ~twin_right).sum()), int((~watched_right & twin_right).sum())
        p_seen = binom_tail(only_watched, only_watched + only_twin, 0.5)
        seen = {"watched_model_errors": int((~watched_right).sum()), "twin_errors": int((~twin_right).sum()),
                "p": p_seen, "rows": len(cal.y)}
        if p_seen >= self.opt.seen_alpha:
            return 0.0, 0.0, seen
        weak_t, strong_t = self._thresholds(cal.y)
        return float((scores > strong_t).mean()), float((scores > weak_t).mean()), seen

    def _per_label_thresholds(self, scores: np.ndarray, y: np.ndarray, clean_threshold: float,
                              confusion_threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """(weak, strong) threshold per given label: the label's own ``record_fpr`` quantile of correctly
        labelled calibration rows where it has ``label_min_rows`` of them and that is lower than all rows'.

        Why: honest labels are not disputed alike. Where the model misses much of one class (a rare class:
        on ``imbalanced``, a fraud-like table, it answers 46 % of the positives wrong, some very surely), the
        quantile over all rows is set by that class's correct labels, and lies far above what any label of the
        other class ever scores: a positive relabelled negative (fraud reported as legitimate) then never
        crossed it (weak threshold 26.3 over all rows, 5.9 over negatives). Only lowered, never raised: a
        label whose honest rows the model disputes more keeps the threshold over all rows, as before.
        """
        weak = np.full(self.n_classes, clean_threshold)
        for c in range(self.n_classes):
            own = scores[y == c]
            if self.opt.label_min_rows and len(own) >= self.opt.label_min_rows:
                weak[c] = min(weak[c], _tail_quantile(own, self.opt.record_fpr))
        return weak, np.maximum(weak, confusion_threshold)

    def _thresholds(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(weak, strong) threshold of each record, by its given label (labels beyond the model's: the last)."""
        lab = np.clip(np.asarray(labels, np.int64), 0, self.n_classes - 1)
        return self.weak_by_label[lab], self.strong_by_label[lab]

    def _model(self):
        """The model whose answers are scored: the twin while fit measures unseen-row rates, else the watched one."""
        return self._scoring_model if self._scoring_model is not None else self.context.model

    @property
    def strong_rate(self) -> float:
        """Rate of strong flags the count tests expect of benign feedback."""
        return self.opt.benign_flag_rate + (1 - self.opt.honest_error_rate) * self.unseen_strong_rate

    @property
    def weak_rate(self) -> float:
        """Rate of weak flags (implausible labels) the count tests expect of benign feedback."""
        return self.opt.honest_error_rate + (1 - self.opt.honest_error_rate) * self.unseen_weak_rate

    def _confusion_threshold(self, cal: ReferenceData) -> tuple[float, int]:
        """Score below which ``1 - confusion_pass`` of plausible honest confusions fall.

        Honest labellers err on ambiguous inputs and to a class the input
        resembles. We simulate exactly that on the calibration rows: each row
        relabelled to the runner-up class of its reference-neighbour vote,
        weighted by how ambiguous the vote is, and keep the threshold above all
        but ``confusion_pass`` of them, so findings name implausible labels,
        not the honest noise every feedback stream has.
        """
        o = self.opt
        dev = self.context.device
        x = torch.as_tensor(cal.X, device=dev)
        d2 = (x * x).sum(1)[:, None] + self._ref_sq[None, :] - 2 * (x @ self._ref_X.T)
        nn_idx = d2.topk(min(o.k, len(self._ref_X)), dim=1, largest=False).indices
        votes = torch.zeros(len(x), self.n_classes, device=dev)
        votes.scatter_add_(1, self._ref_y[nn_idx], torch.ones_like(nn_idx, dtype=torch.float32))
        votes = votes.cpu().numpy()
        with torch.no_grad():
            probs = torch.softmax(self._model().logits(x), 1).cpu().numpy()
        others = votes + 1e-3 * probs  # break vote ties (and unanimous votes) with the model
        others[np.arange(len(x)), cal.y] = -np.inf
        runner_up = others.argmax(1)
        srt = np.sort(votes, 1)
        ambiguity = 1.0 - (srt[:, -1] - srt[:, -2]) / max(o.k, 1) + 1e-3
        conf_scores, p_conf, agree_conf, _ = self._scores(cal.X, runner_up)
        rank = self._rank(p_conf, agree_conf)
        by_rank = np.argsort(rank, kind="stable")
        self.rank_conf, self.rank_conf_w = rank[by_rank], ambiguity[by_rank].astype(np.float64)
        order = np.argsort(conf_scores)
        cum = np.cumsum(ambiguity[order]) / ambiguity.sum()
        pick = min(int(np.searchsorted(cum, 1 - o.confusion_pass)), len(order) - 1)
        return float(conf_scores[order][pick]), len(x)

    def _set_reference(self, X: np.ndarray, y: np.ndarray, n_classes: int) -> None:
        dev = self.context.device
        self.n_classes = int(n_classes)
        self._ref_np_X = np.asarray(X, np.float32)
        self._ref_np_y = np.asarray(y, np.int64)
        self._ref_X = torch.as_tensor(self._ref_np_X, device=dev)
        self._ref_sq = (self._ref_X * self._ref_X).sum(1)
        self._ref_y = torch.as_tensor(self._ref_np_y, device=dev)
        counts = np.bincount(self._ref_np_y, minlength=n_classes).astype(np.float64)
        self.prior = (counts + 1) / (counts.sum() + n_classes)
        scale = self._ref_np_X.std(0) + 1e-6
        self.feature_scale = scale.astype(np.float64)
        self.class_mean = np.zeros((n_classes, X.shape[1]), np.float64)
        self.class_std = np.tile(scale, (n_classes, 1)).astype(np.float64)
        for c in range(n_classes):
            rows = self._ref_np_X[self._ref_np_y == c]
            if len(rows) >= 2:
                self.class_mean[c] = rows.mean(0)
                # floor: a pixel that is always 0 in a class must not make every shift infinite
                self.class_std[c] = np.maximum(rows.std(0), 0.1 * scale)

    def _rank(self, p_label: np.ndarray, agree: np.ndarray) -> np.ndarray:
        """How confidently both the model and the reference neighbours reject a label (higher = more).

        The same two terms as the score, but the model's term stops at
        ``-log(record_fpr)``: the detector reasons about no per-record rate
        below that, and a model's probabilities that far out say more about
        its overconfidence than about the label, so that the neighbour vote
        still separates a flipped clear-cut input from an honest confusion of
        an ambiguous one where the model rejects both outright.
        """
        kk = min(self.opt.k, len(self._ref_np_X))
        model = np.minimum(-np.log(np.maximum(p_label, 1e-12)), -math.log(self.opt.record_fpr))
        return model - np.log((np.asarray(agree, np.float64) * kk + 0.5) / (kk + 1))

    def _rank_null(self, t: np.ndarray) -> np.ndarray:
        """Share of benign feedback records ranked at least ``t``: correct labels (calibration rows,
        exponential tail past their top ``tail``) mixed with ``honest_error_rate`` honest confusions."""
        o = self.opt
        clean = self.rank_clean
        n = len(clean)
        tail = 0.1
        u = float(np.quantile(clean, 1 - tail))
        excess = clean[clean > u] - u
        scale = max(float(excess.mean()) if len(excess) else 0.0, 1e-9)
        empirical = (n - np.searchsorted(clean, t, side="left")) / n
        p_clean = np.where(t > u, np.maximum(tail * np.exp(-(t - u) / scale), empirical), empirical)
        cw = np.concatenate([np.cumsum(self.rank_conf_w[::-1])[::-1], [0.0]])
        p_conf = cw[np.searchsorted(self.rank_conf, t, side="left")] / max(cw[0], 1e-12)
        return (1 - o.honest_error_rate) * p_clean + o.honest_error_rate * p_conf

    def _scores(self, X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Suspicion per record (higher = label less plausible), model p(label), kNN agreement, prediction."""
        o = self.opt
        dev = self.context.device
        x = torch.as_tensor(np.asarray(X, np.float32), device=dev)
        yt = torch.as_tensor(np.asarray(y, np.int64), device=dev).clamp(0, self.n_classes - 1)
        with torch.no_grad():
            probs = torch.softmax(self._model().logits(x), 1)
            d2 = (x * x).sum(1)[:, None] + self._ref_sq[None, :] - 2 * (x @ self._ref_X.T)
            nn_idx = d2.topk(min(o.k, len(self._ref_X)), dim=1, largest=False).indices
            agree = (self._ref_y[nn_idx] == yt[:, None]).float().mean(1)
            p_label = probs.gather(1, yt[:, None]).squeeze(1)
            kk = nn_idx.shape[1]
            score = -torch.log(p_label.clamp_min(1e-12)) - torch.log((agree * kk + 0.5) / (kk + 1))
        pred = probs.argmax(1)
        return (score.cpu().numpy().astype(np.float64), p_label.cpu().numpy().astype(np.float64),
                agree.cpu().numpy().astype(np.float64), pred.cpu().numpy().astype(np.int64))

    def artifacts(self) -> dict[str, Any]:
        if not self.fitted:
            return {}
        return {"reference_X": self._ref_np_X, "reference_y": self._ref_np_y, "n_classes": self.n_classes,
                "threshold": self.threshold, "dup_radius": self.dup_radius, "calibration": dict(self.calibration),
                "exceed_pos": self.exceed_pos, "exceed_neg": self.exceed_neg,
                "clean_threshold": self.clean_threshold, "rank_clean": self.rank_clean,
                "rank_conf": self.rank_conf, "rank_conf_w": self.rank_conf_w,
                "weak_by_label": self.weak_by_label, "strong_by_label": self.strong_by_label}

    def load_artifacts(self, tree: dict[str, Any]) -> None:
        self._set_reference(np.asarray(tree["reference_X"]), np.asarray(tree["reference_y"]), int(tree["n_classes"]))
        self.threshold = float(tree["threshold"])
        self.clean_threshold = float(tree["clean_threshold"])
        # artifacts from before per-label thresholds: one pair for every label
        self.weak_by_label = np.asarray(tree.get("weak_by_label", np.full(self.n_classes, self.clean_threshold)),
                                        np.float64)
        self.strong_by_label = np.asarray(tree.get("strong_by_label", np.full(self.n_classes, self.threshold)),
                                          np.float64)
        self.dup_radius = float(tree["dup_radius"])
        self.calibration = dict(tree["calibration"])
        # artifacts from before the unseen-row rates test against the options' rates alone
        self.unseen_strong_rate = float(self.calibration.get("unseen_strong_rate", 0.0))
        self.unseen_weak_rate = float(self.calibration.get("unseen_weak_rate", 0.0))
        self.exceed_pos = np.asarray(tree["exceed_pos"], np.float64)
        self.exceed_neg = np.asarray(tree["exceed_neg"], np.float64)
        if "rank_clean" in tree:
            self.rank_clean = np.asarray(tree["rank_clean"], np.float64)
            self.rank_conf = np.asarray(tree["rank_conf"], np.float64)
            self.rank_conf_w = np.asarray(tree["rank_conf_w"], np.float64)
        self.fitted = True

    # ------------------------------------------------------------------ update
    def update(self, batch: FeedbackBatch, notes: dict[str, Any]) -> list[Finding]:  # type: ignore[override]
        if len(batch) == 0:
            return []
        if not self.fitted:
            raise RuntimeError("poisoning detector is not fitted: run `inferwatch train` (or call fit) first")
        if self.context.model is None:
            raise RuntimeError("poisoning detector needs the monitored model; give `train --model` or a surrogate")
        o = self.opt
        score, p_label, agree, pred = self._scores(batch.X, batch.labels)
        weak_t, strong_t = self._thresholds(batch.labels)
        strong, weak = score > strong_t, score > weak_t
        keys = np.floor(batch.ts / o.window_s).astype(np.int64)
        findings: list[Finding] = []
        for key in np.unique(keys).tolist():
            rows = np.flatnonzero(keys == key)
            win = self.windows.get(key) or self._new_window(key)
            self.windows[key] = win
            conflict = self._conflicts(win, batch.X[rows], batch.labels[rows], pred[rows])
            # a conflicting near-duplicate is weak evidence only: honest labellers disagree on the same
            # ambiguous input too, so it counts where a source is already shown to be compromised
            self._add(win, batch, rows, score, p_label, agree, pred, weak[rows] | conflict, strong[rows], conflict)
            findings += self._evaluate(win, float(batch.ts[rows].max()), final=False)
        # close windows that event time has left behind
        newest = int(keys.max())
        for key in sorted(k for k in self.windows if k < newest - 1):
            findings += self._evaluate(self.windows[key], (key + 1) * o.window_s, final=True)
            del self.windows[key]
            self.closed_windows += 1
        return findings

    def flush(self) -> list[Finding]:
        """Close every open window (at shutdown or end of a replay) and return its last findings."""
        findings: list[Finding] = []
        for key in sorted(self.windows):
            findings += self._evaluate(self.windows[key], (key + 1) * self.opt.window_s, final=True)
            self.closed_windows += 1
        self.windows.clear()
        return findings

    def _new_window(self, key: int) -> dict[str, Any]:
        d = self._ref_np_X.shape[1]
        return {
            "key": key, "sources": {}, "model": "",
            # flagged records (all fields parallel)
            "ids": [], "src": [], "label": np.zeros(0, np.int64), "pred": np.zeros(0, np.int64),
            "score": np.zeros(0), "p_label": np.zeros(0), "agree": np.zeros(0), "conflict": np.zeros(0, bool),
            "strong": np.zeros(0, bool),
            "X": np.zeros((0, d), np.float32),
            # every record of the window, for conflicting near-duplicates
            "all_X": np.zeros((0, d), np.float32), "all_label": np.zeros(0, np.int64),
            "all_ids": [], "all_src": [], "all_pred": np.zeros(0, np.int64), "all_score": np.zeros(0),
            "all_p_label": np.zeros(0), "all_agree": np.zeros(0),
            "emitted": {},  # finding key -> [n_ids, ts]
            "n": 0,
        }

    def _conflicts(self, win: dict[str, Any], X: np.ndarray, labels: np.ndarray, pred: np.ndarray) -> np.ndarray:
        """Rows with a near-identical input already in the window under another label, where the model
        disagrees with this row's label (the row is the likelier liar of the pair)."""
        prev = win["all_X"]
        if len(prev) == 0 or self.dup_radius <= 0:
            return np.zeros(len(X), bool)
        dev = self.context.device
        a = torch.as_tensor(X, device=dev)
        b = torch.as_tensor(prev, device=dev)
        d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * (a @ b.T)
        close = (d2 <= self.dup_radius ** 2).cpu().numpy()
        other = labels[:, None] != win["all_label"][None, :]
        return (close & other).any(1) & (pred != labels)

    def _add(self, win: dict[str, Any], batch: FeedbackBatch, rows: np.ndarray, score: np.ndarray,
             p_label: np.ndarray, agree: np.ndarray, pred: np.ndarray, flagged: np.ndarray,
             strong: np.ndarray, conflict: np.ndarray) -> None:
        """Add a window's rows: counts per source (strong flags), and the flagged records (weak or strong)."""
        o = self.opt
        win["model"] = batch.models[int(rows[-1])]
        sources = win["sources"]
        for r, w, f in zip(rows.tolist(), flagged.tolist(), strong.tolist()):
            src = batch.sources[r]
            st = sources.pop(src, None)  # re-insert: dict order = least recently seen first
            if st is None:
                st = {"n": 0, "flagged": 0, "weak": 0, "labels": np.zeros(self.n_classes, np.int64), "seen": {}}
                if len(sources) >= o.max_sources:
                    sources.pop(next(iter(sources)))
                    self.evicted_sources += 1
            st["n"] += 1
            if w or f:
                # the same input flagged again from the same source is one piece of evidence, not two
                digest = zlib.crc32(batch.X[r].tobytes()) ^ (int(batch.labels[r]) << 32)
                level = st["seen"].get(digest, 0)
                if level == 0:
                    st["weak"] += 1
                if f and level < 2:
                    st["flagged"] += 1
                st["seen"][digest] = max(level, 2 if f else 1)
            st["labels"][min(int(batch.labels[r]), self.n_classes - 1)] += 1
            sources[src] = st
        win["n"] += len(rows)
        keep = o.conflict_history
        for name, values in (("all_X", batch.X[rows]), ("all_label", batch.labels[rows]), ("all_pred", pred[rows]),
                             ("all_score", score[rows]), ("all_p_label", p_label[rows]),
                             ("all_agree", agree[rows])):
            win[name] = _last(np.concatenate([win[name], values]), keep)
        win["all_ids"] = _last_list(win["all_ids"] + [batch.ids[i] for i in rows.tolist()], keep)
        win["all_src"] = _last_list(win["all_src"] + [batch.sources[i] for i in rows.tolist()], keep)
        sel = rows[flagged]
        if len(sel) == 0:
            return
        win["ids"] += [batch.ids[i] for i in sel.tolist()]
        win["src"] += [batch.sources[i] for i in sel.tolist()]
        for name, values in (("label", batch.labels[sel]), ("pred", pred[sel]), ("score", score[sel]),
                             ("p_label", p_label[sel]), ("agree", agree[sel]),
                             ("conflict", conflict[flagged]), ("strong", strong[flagged]), ("X", batch.X[sel])):
            win[name] = np.concatenate([win[name], values])
        if len(win["ids"]) > o.max_window_records:
            cut = len(win["ids"]) - o.max_window_records
            win["ids"], win["src"] = win["ids"][cut:], win["src"][cut:]
            for name in ("label", "pred", "score", "p_label", "agree", "conflict", "strong", "X"):
                win[name] = win[name][cut:]

    # ------------------------------------------------------------ aggregation
    def _evaluate(self, win: dict[str, Any], ts: float, final: bool) -> list[Finding]:
        """Decide which flagged records form findings in this window, and emit the new or grown ones."""
        o = self.opt
        if not win["ids"]:
            return []
        self._adopt_trigger_carriers(win)
        src_arr = np.asarray(win["src"])
        significant: dict[str, np.ndarray] = {}
        source_tests: dict[str, dict[str, float]] = {}
        leftover = np.ones(len(src_arr), bool)
        for src, st in win["sources"].items():
            if st["weak"] < o.min_records:
                continue
            # strong flags against the benign rate at the strict threshold; all implausible labels
            # (weak flags) against the rate honest labellers make mistakes at
            p_strong = binom_tail(st["flagged"], st["n"], self.strong_rate)
            p_weak = binom_tail(st["weak"], st["n"], self.weak_rate)
            p = min(1.0, 2 * min(p_strong, p_weak))  # Bonferroni over the two tests
            source_tests[src] = {"n": st["n"], "flagged": st["flagged"], "weak": st["weak"], "p": p,
                                 "label_shift_p": self._label_shift_p(st["labels"])}
            if p < o.alpha:
                mine = src_arr == src
                significant[src] = np.flatnonzero(mine)
                leftover &= ~mine
        # a compromised source: all its implausible labels (weak flags too); elsewhere only strong flags
        rest = np.flatnonzero(leftover & win["strong"])
        n_rest = win["n"] - sum(win["sources"][s]["n"] for s in significant if s in win["sources"])
        p_window = binom_tail(len(rest), max(n_rest, len(rest)), self.strong_rate)
        if len(rest) >= o.min_records and p_window < o.window_alpha:
            significant[WINDOW_LEVEL] = rest
        excess, excess_test = self._window_excess(win, leftover, n_rest)
        if len(excess):
            p_window = min(p_window, excess_test["p"])
            significant[WINDOW_LEVEL] = np.union1d(significant.get(WINDOW_LEVEL, np.zeros(0, np.int64)), excess)
        findings = []
        # the trigger test is its own significance test, so it scans every implausible label of the
        # window: a backdoor spread thinly over many sources is found even when no count test fires
        is_triggered, triggers = self._triggered(win, np.arange(len(src_arr)))
        grouped = np.zeros(len(src_arr), bool)
        for idx in significant.values():
            grouped[idx] = True
        orphans = np.flatnonzero(is_triggered & ~grouped)
        if len(orphans):
            significant[WINDOW_LEVEL] = np.union1d(significant.get(WINDOW_LEVEL, np.zeros(0, np.int64)), orphans)
        for src, idx in significant.items():
            trig_idx, flip_idx = idx[is_triggered[idx]], idx[~is_triggered[idx]]
            for kind, sel in (("backdoor", trig_idx), ("label_flip", flip_idx)):
                if len(sel) < o.min_records:
                    continue
                f = self._maybe_emit(win, src, kind, sel, ts, final, source_tests.get(src), p_window, triggers,
                                     excess_test if len(excess) else None)
                if f is not None:
                    findings.append(f)
        return findings

    def _window_excess(self, win: dict[str, Any], leftover: np.ndarray, n_rest: int
                       ) -> tuple[np.ndarray, dict[str, float]]:
        """The most implausible labels of a window that holds more of them than honest mistakes explain.

        A campaign spread thinly over many sources leaves no single source
        significant and, where the model rejects honest confusions as firmly as
        flips, few strong flags; but the window as a whole then holds more
        weakly implausible labels than ``honest_error_rate`` explains (binomial,
        ``window_alpha``). Then the records are ranked by :meth:`_rank` and the
        largest top set is named whose expected benign share, from the
        reference null (correct labels plus honest confusions, at the
        window's record count), stays within ``window_fdr`` (Benjamini-Hochberg
        step-up).
        """
        o = self.opt
        if self.rank_clean is None:  # artifacts from before this test
            return np.zeros(0, np.int64), {"p": 1.0}
        cand = np.flatnonzero(leftover & (win["score"] > self._thresholds(win["label"])[0]))
        n = max(n_rest, len(cand))
        p = binom_tail(len(cand), n, self.weak_rate)
        test = {"p": p, "records": n, "implausible": len(cand), "benign_expected": n * self.weak_rate}
        if len(cand) < o.min_records or p >= o.window_alpha:
            return np.zeros(0, np.int64), test
        rank = self._rank(win["p_label"][cand], win["agree"][cand])
        order = np.argsort(-rank, kind="stable")
        values = rank[order]
        expected = n * self._rank_null(values)
        # cut between distinct values only: records ranked alike are named together or not at all
        last = np.concatenate([values[1:] != values[:-1], [True]])
        ok = np.flatnonzero(last & (expected <= o.window_fdr * np.arange(1, len(values) + 1)))
        if len(ok) == 0 or ok[-1] + 1 < o.min_records:
            return np.zeros(0, np.int64), test
        cut = int(ok[-1])
        test.update(named=cut + 1, benign_expected=float(expected[cut]), min_rank=float(values[cut]))
        return np.sort(cand[order[: cut + 1]]), test

    def _label_shift_p(self, counts: np.ndarray) -> float:
        """Chi-square test of a source's label histogram against the reference label prior."""
        n = counts.sum()
        if n < 5 * self.n_classes:
            return 1.0
        expected = n * self.prior
        stat = float(((counts - expected) ** 2 / expected).sum())
        return float(chdtrc(self.n_classes - 1, stat))

    def _adopt_trigger_carriers(self, win: dict[str, Any]) -> None:
        """Once a trigger is found, every record of the window that carries it is suspect too.

        An attacker also stamps the trigger on inputs that already belong to
        the target class; the model agrees with those labels, so only the
        trigger gives them away. They join the flagged records (weak flags).
        """
        o = self.opt
        _, specs = self._triggered(win, np.arange(len(win["ids"])))
        if not specs:
            return
        known = set(win["ids"])
        add = np.zeros(len(win["all_ids"]), bool)
        for spec in specs:
            c = spec["target_label"]
            rows = np.flatnonzero(win["all_label"] == c)
            if len(rows) == 0:
                continue
            feats = np.asarray(spec["trigger_features"], np.int64)
            values = np.asarray(spec["trigger_values"], np.float64)
            # the stamp itself, not just "unusual": every trigger feature at the trigger's value
            close = np.abs(win["all_X"][rows][:, feats] - values) <= o.trigger_tolerance * self.feature_scale[feats]
            add[rows[close.all(1)]] = True
        new = [i for i in np.flatnonzero(add).tolist() if win["all_ids"][i] not in known]
        if not new:
            return
        idx = np.asarray(new)
        win["ids"] += [win["all_ids"][i] for i in new]
        win["src"] += [win["all_src"][i] for i in new]
        for name, values in (("label", win["all_label"][idx]), ("pred", win["all_pred"][idx]),
                             ("score", win["all_score"][idx]), ("p_label", win["all_p_label"][idx]),
                             ("agree", win["all_agree"][idx]), ("conflict", np.zeros(len(idx), bool)),
                             ("strong", np.zeros(len(idx), bool)), ("X", win["all_X"][idx])):
            win[name] = np.concatenate([win[name], values])

    def _triggered(self, win: dict[str, Any], idx: np.ndarray) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Which of the window's flagged records ``idx`` carry a shared trigger (pooled over sources).

        Per label, per feature and direction: how many flagged records sit more
        than ``trigger_min_shift`` standard deviations from their predicted
        class's reference mean, against the rate at which clean reference rows
        do (binomial, Bonferroni over features and directions). A trigger makes
        nearly all of them exceed on the same features; random flips do not.
        """
        o = self.opt
        labels, preds, X = win["label"][idx], win["pred"][idx], win["X"][idx]
        triggered = np.zeros(len(idx), bool)
        found: list[dict[str, Any]] = []
        d = X.shape[1]
        for c in np.unique(labels).tolist():
            mine = np.flatnonzero(labels == c)
            if len(mine) < o.trigger_min_records:
                continue
            p = np.clip(preds[mine], 0, self.n_classes - 1)
            shift = (X[mine] - self.class_mean[p]) / self.class_std[p]
            # identical inputs sent again are one piece of evidence: count distinct inputs only
            _, first = np.unique(X[mine], axis=0, return_index=True)
            m = len(first)
            if m < o.trigger_min_records:
                continue
            pos = (shift[first] > o.trigger_min_shift).sum(0)
            neg = (shift[first] < -o.trigger_min_shift).sum(0)
            p_pos = bdtrc(pos - 1, m, self.exceed_pos)
            p_neg = bdtrc(neg - 1, m, self.exceed_neg)
            level = o.trigger_alpha / (2 * d)
            feats_pos = np.flatnonzero((p_pos < level) & (pos >= 0.5 * m))
            feats_neg = np.flatnonzero((p_neg < level) & (neg >= 0.5 * m))
            if len(feats_pos) + len(feats_neg) == 0:
                continue
            hits = np.zeros(len(mine))
            hits += (shift[:, feats_pos] > o.trigger_min_shift).sum(1)
            hits += (shift[:, feats_neg] < -o.trigger_min_shift).sum(1)
            carries = hits >= 0.5 * (len(feats_pos) + len(feats_neg))
            if carries[first].sum() >= o.trigger_min_records:
                triggered[mine[carries]] = True
                feats = np.concatenate([feats_pos, feats_neg])
                found.append({"target_label": int(c), "trigger_features": feats.tolist(),
                              "trigger_signs": [1] * len(feats_pos) + [-1] * len(feats_neg),
                              "trigger_values": np.median(X[mine[carries]][:, feats], 0).round(4).tolist(),
                              "carrying": int(carries.sum())})
        return triggered, found

    def _maybe_emit(self, win: dict[str, Any], src: str, kind: str, sel: np.ndarray, ts: float, final: bool,
                    source_test: dict[str, float] | None, p_window: float,
                    triggers: list[dict[str, Any]], excess_test: dict[str, float] | None = None
                    ) -> Finding | None:
        o = self.opt
        fkey = f"{src}|{kind}"
        last = win["emitted"].get(fkey)
        n = len(sel)
        if last is not None:
            grown = n - last[0]
            enough = grown >= min(o.reraise_every, max(1, math.ceil(o.reraise_growth * last[0])))
            if grown <= 0 or not (final or enough or ts - last[1] >= o.reraise_s):
                return None
        win["emitted"][fkey] = [n, ts]
        ids = tuple(win["ids"][i] for i in sel.tolist())
        pairs: dict[str, int] = {}
        for a, b in zip(win["pred"][sel].tolist(), win["label"][sel].tolist()):
            pairs[f"{a}->{b}"] = pairs.get(f"{a}->{b}", 0) + 1
        top_pairs = dict(sorted(pairs.items(), key=lambda kv: -kv[1])[:10])
        start = win["key"] * o.window_s
        evidence: dict[str, Any] = {
            "kind": kind, "window_start": start, "window_s": o.window_s, "suspicious": n,
            "window_records": win["n"], "threshold": self.threshold, "source_threshold": self.clean_threshold,
            "benign_flag_rate": self.strong_rate,
            "records": [
                {"id": win["ids"][i], "score": round(float(win["score"][i]), 3),
                 "p_model_label": float(f"{win['p_label'][i]:.3g}"), "knn_agreement": float(win["agree"][i]),
                 "model_label": int(win["pred"][i]), "label": int(win["label"][i]),
                 "conflicting_duplicate": bool(win["conflict"][i]), "strong": bool(win["strong"][i])}
                for i in sel[:200].tolist()
            ],
            "label_pairs_model_to_given": top_pairs,
        }
        if source_test is not None:
            evidence["source"] = source_test
        else:
            evidence["window_p"] = p_window
            if excess_test is not None:
                evidence["window_excess"] = {key: float(f"{v:.4g}") for key, v in excess_test.items()}
        if kind == "backdoor" and triggers:
            labels = win["label"][sel]
            main = int(np.bincount(labels).argmax())
            evidence["trigger"] = next((t for t in triggers if t["target_label"] == main), triggers[0])
        actor = None if src == WINDOW_LEVEL else src
        who = "many sources" if actor is None else f"source {actor}"
        if kind == "backdoor":
            title = f"Backdoor trigger in feedback from {who}"
            attacks: tuple[str, ...] = ("AML.T0018.000", "AML.T0043.004", "AML.T0020")
            severity = Severity.CRITICAL
        else:
            title = f"Poisoned labels (flips) in feedback from {who}"
            attacks = ("AML.T0020",)
            severity = Severity.HIGH
        p_sig = source_test["p"] if source_test is not None else p_window
        confidence = round(min(0.99, 0.5 + min(-math.log10(max(p_sig, 1e-300)), 30) / 60), 3)
        return Finding(
            family="poisoning", detector=self.name, title=title, severity=severity, actor=actor,
            model=win["model"] or None, related_ids=ids, window=f"{start:.0f}:{kind}", evidence=evidence,
            attacks=attacks, time_ms=int(ts * 1000), confidence=confidence,
            message=(f"{n} feedback records from {who} in the {o.window_s:.0f}s window at {start:.0f} carry "
                     f"labels the model and reference data contradict ({kind.replace('_', ' ')}); "
                     "quarantine them before retraining"),
            analytic_type="learning",
        )

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        windows = []
        for key, win in sorted(self.windows.items()):
            w = dict(win)
            w["sources"] = {"names": list(win["sources"].keys()),
                            "n": np.asarray([s["n"] for s in win["sources"].values()], np.int64),
                            "flagged": np.asarray([s["flagged"] for s in win["sources"].values()], np.int64),
                            "labels": np.asarray([s["labels"] for s in win["sources"].values()], np.int64
                                                 ).reshape(-1, self.n_classes),
                            "weak": np.asarray([s["weak"] for s in win["sources"].values()], np.int64),
                            "seen": [[[int(k), int(v)] for k, v in s["seen"].items()]
                                     for s in win["sources"].values()]}
            w["emitted"] = {k: [int(v[0]), float(v[1])] for k, v in win["emitted"].items()}
            w["key"] = int(key)
            windows.append(w)
        return {"windows": windows, "evicted_sources": self.evicted_sources, "closed_windows": self.closed_windows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.windows = {}
        for w in state["windows"]:
            src = w["sources"]
            sources = {
                name: {"n": int(n), "flagged": int(f), "weak": int(wk), "labels": np.array(lab, np.int64),
                       "seen": {int(k): int(v) for k, v in seen}}
                for name, n, f, wk, lab, seen in zip(src["names"], src["n"], src["flagged"], src["weak"],
                                                     src["labels"], src["seen"])
            }
            win = dict(w)
            win["sources"] = sources
            win["ids"], win["src"] = list(w["ids"]), list(w["src"])
            for name in ("label", "pred", "score", "p_label", "agree", "conflict", "strong", "X", "all_X",
                         "all_label", "all_pred", "all_score", "all_p_label", "all_agree"):
                win[name] = np.array(w[name])
            win["all_ids"], win["all_src"] = list(w["all_ids"]), list(w["all_src"])
            win["conflict"] = win["conflict"].astype(bool)
            win["strong"] = win["strong"].astype(bool)
            win["emitted"] = {k: [int(v[0]), float(v[1])] for k, v in w["emitted"].items()}
            self.windows[int(w["key"])] = win
        self.evicted_sources = int(state["evicted_sources"])
        self.closed_windows = int(state["closed_windows"])


def _tail_quantile(scores: np.ndarray, q: float, tail: float = 0.1) -> float:
    """Upper ``q`` quantile of benign scores, extrapolated past the sample (peaks over threshold).

    Calibration sets hold a few hundred rows, far too few to read a 1e-4
    quantile off directly; the top ``tail`` of the scores is fitted with an
    exponential (the maximum-likelihood scale is the mean excess) and the
    quantile read from the fit. Never below the largest calibration score
    times the empirical share it represents.
    """
    scores = np.sort(np.asarray(scores, np.float64))
    u = float(np.quantile(scores, 1 - tail))
    excess = scores[scores > u] - u
    scale = float(excess.mean()) if len(excess) else 0.0
    fitted = u + scale * math.log(tail / q) if q < tail else float(np.quantile(scores, 1 - q))
    return max(fitted, float(np.quantile(scores, 1 - q)))


def _last(a: np.ndarray, n: int) -> np.ndarray:
    """The last ``n`` rows of ``a`` (none when n is 0)."""
    return a[len(a) - n :] if n < len(a) else a


def _last_list(a: list, n: int) -> list:
    return a[len(a) - n :] if n < len(a) else a
