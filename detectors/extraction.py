"""Model extraction and black-box probing, seen as each client's query pattern.

Why per client: one query tells nothing; an extraction or probing campaign is a
*sequence* of queries from one principal. Per client we keep, in bounded
memory, the last ``history`` queries (to measure each new query's minimum L2
distance to that client's previous ones) and a window of the last ``window``
per-query observations. From them, at every ``check_every`` queries:

- **PRADA** (Juuti et al. 2019): benign clients' minimum distances are close to
  normally distributed; synthetic extraction queries (Jacobian augmentation,
  random or out-of-task inputs) make them skewed or multi-modal. PRADA flags
  when the Shapiro-Wilk statistic W falls below delta. We calibrate delta on
  simulated benign clients drawn from the reference data, so no attack data
  is ever used to set it; per number of classes a client's window was
  answered as, because natural clients of one or two classes are far from
  normal too.
- **Concentration**: probing around one record (membership inference,
  SimBA-style evasion, inversion) keeps a client's recent distinct queries
  within a small radius; alarm below ``spread_factor`` x the 0.1% quantile of
  simulated benign clients' spread.
- **Share tests** (binomial, level ``alpha``, and a minimum share): the share
  of the client's window that is a near duplicate of its earlier queries
  (radius: ``dup_quantile`` of reference nearest-neighbour distances), is
  answered near a decision boundary (top-1 minus top-2 probability below
  ``margin``), lies off the reference data (farther from every k-means
  centroid, in the reference's whitened space, than ``1 - off_reference_rate``
  of held-out reference rows of the class it is answered as: a rare class's
  natural rows lie farther out; ``_reference_regions.ReferenceCover``), changes only a few features of the client's
  previous query (coordinate-wise black-box search at any step size), or is
  out of distribution per ``notes["ood_p"]`` when ``drift_vae`` ran; plus
  Fisher's combination of them. Each is tested against the larger of its
  reference rate and what the typical client shows right now (a mean over
  clients, each weighing the same), so a drift that moves every client is
  not an extraction.
- **Too central** (the same share test, kept out of Fisher's combination):
  queries closer to the centre of the class they are answered as (whitened
  by the within-class covariance) than all but ``central_rate`` of held-out
  natural rows of that class. Blends of natural in-task inputs (mixup, the
  usual way to stretch a small pool of real data into an extraction query
  set) average the inputs' natural variability away, so far more of them
  land there; they are neither off the data nor near each other, which is
  what the other tests look for. Conditioning on the class keeps a client
  that asks about one class only on that class's own spread, and the test
  allows for the few held-out rows each radius rests on (beta-binomial).
  Needs reference labels (``_reference_regions.ClassCentres``).

Exact repeats (within ``repeat_eps``) are ignored: they give an attacker no
information and benign clients retry all the time. "Exact" is measured
exactly: the fast distance (a float32 norm expansion) cannot resolve steps
under about 1e-3 of an input's norm, so the pairs it puts that close are
measured again in float64. Before, a client stepping 1e-4 at a time (ZOO's
finite differences) read as repeating itself and was never flagged.

Each finding names the technique (``_probe_pattern.classify``) from the
client's window: answers, near duplicates, small steps from the query just
before, and whether its recent queries walk through the input space.

**New clients, pooled** (``detectors/_cohort.py``): the non-repeat queries
of clients with fewer than ``min_queries`` of them, which no per-client test
judges, go into one ring of ``cohort_size``, tested every
``cohort_check_every`` queries with the same share tests, against the rates of
the typical *established* client (a drift moves those too; a campaign spread
over many client ids does not). When the pool fails a test, each client with
at least ``cohort_min_hits`` of the pool's queries showing a failed signal,
and at least half of its own pooled queries, gets a finding.

A flagged client gets one finding per campaign (``window`` key
``client:campaign_start_ts``); while the campaign goes on the same uid is
re-raised with updated counts at most every ``reraise_every`` queries.

Where the parts live: this file keeps the per-client windows of
observations, the checks and the findings; ``_query_history`` keeps each
client's last queries and measures each new query's distance to them;
``_benign_clients`` simulates natural clients to calibrate delta, the spread
floor and the near-duplicate rate; ``_reference_regions`` holds the
off-reference and too-central tests; ``_client_slots`` maps clients to
bounded slots; ``_cohort`` pools new clients; ``_probe_pattern`` names the
technique; ``_swilk`` computes W.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field
from scipy.special import bdtrc, chdtrc

from agent.findings import Finding, Severity
from agent.records import InferenceBatch
from agent.reference import ReferenceData
from detectors import _probe_pattern as probe_pattern
from detectors._benign_clients import BenignClients, w_quantile
from detectors._binomial import binom_tail
from detectors._client_slots import ClientSlots, EvictionAlarm, group_ranks
from detectors._cohort import NewClientCohort
from detectors._query_history import QueryHistory
from detectors._reference_regions import ClassCentres, ReferenceCover
from detectors._swilk import shapiro_w_rows
from detectors.base import Detector, DetectorContext, DetectorOptions

log = logging.getLogger(__name__)

_NEAR_DUP, _LOW_MARGIN, _OOD, _OOD_KNOWN, _OFF_REFERENCE, _CENTRAL, _FEW_FEATURES = 1, 2, 4, 8, 16, 32, 64
_NEAR_PREVIOUS = 128  # within the near-duplicate radius of the client's query just before (pattern naming only)


_BITS = (_NEAR_DUP, _LOW_MARGIN, _OOD, _OOD_KNOWN, _OFF_REFERENCE, _CENTRAL, _FEW_FEATURES)
_HAS_BIT = ((np.arange(256)[:, None] & np.array(_BITS)[None, :]) > 0).astype(np.int64)  # [flag value, bit]


def _bit_counts(flags: np.ndarray) -> dict[int, Any]:
    """How many entries of a flag array have each bit set, keyed by the bit (1, 2, 4, ...): ints for a 1-D
    array, one count per row for a 2-D one.

    One histogram of the flag values instead of a mask, a cast and a sum per
    bit: the share tests read six bits of every checked client's window.
    """
    rows = np.atleast_2d(flags)
    m = len(rows)
    values = (np.arange(m)[:, None] * 256 + rows).ravel()
    per_bit = np.bincount(values, minlength=m * 256).reshape(m, 256) @ _HAS_BIT  # [rows, bit]
    if flags.ndim == 1:
        return dict(zip(_BITS, per_bit[0].tolist()))
    return {bit: per_bit[:, b] for b, bit in enumerate(_BITS)}


@dataclass(frozen=True)
class _WindowStats:
    """The statistics of the clients due for a check (``ExtractionDetector._window_stats``), one row each.

    ``prada_w`` and ``spread`` are NaN where too few queries were there to test; ``suspect`` says where some
    test can fire (a PRADA or spread reason, or a share large enough to count): only those are looked at.
    """

    lengths: np.ndarray  # queries in each window
    prada_w: np.ndarray
    delta: np.ndarray  # the PRADA threshold for the classes each window was answered as
    spread: np.ndarray
    counts: dict[int, np.ndarray]  # per flag bit
    signals: list[tuple[str, int, float]]  # (share test, its bit, its benign rate now)
    suspect: np.ndarray


class ExtractionDetector(Detector):
    """Per-client PRADA + near-duplicate / boundary / OOD query-pattern detector."""

    name: ClassVar[str] = "extraction"
    family: ClassVar[str] = "extraction"
    stream: ClassVar[str] = "inference"
    requires_fit: ClassVar[bool] = True
    needs_model: ClassVar[bool] = False
    priority: ClassVar[int] = 50

    class Options(DetectorOptions):
        max_clients: int = Field(4096, ge=1, description="clients tracked at once; least recently seen evicted")
        history: int = Field(64, ge=4, le=1024,
                             description="previous queries per client that a new query's min distance is taken over")
        window: int = Field(128, ge=16, le=4096, description="recent queries per client that the tests look at")
        min_queries: int = Field(48, ge=16, description="non-repeat queries a client needs before any test runs")
        check_every: int = Field(16, ge=1, description="test a client every this many of its queries")
        prada_fpr: float = Field(1e-5, gt=0, lt=0.5,
                                 description="delta = this quantile of W for benign clients (per check), "
                                             "extrapolated from simulations with Royston's ln(1-W) normal fit")
        prada_simulations: int = Field(1000, ge=100, description="benign clients simulated to calibrate delta")
        dup_quantile: float = Field(0.01, gt=0, lt=0.5,
                                    description="near-duplicate radius = this quantile of reference NN distances")
        alpha: float = Field(1e-5, gt=0, lt=0.01,
                             description="binomial-test level per check (many checks per client: keep it small)")
        margin: float = Field(0.2, gt=0, lt=1,
                              description="top1 - top2 probability below which a query is near a boundary")
        low_margin_prior: float = Field(0.1, gt=0, lt=1,
                                        description="benign low-margin rate assumed before the population is seen")
        min_low_margin_rate: float = Field(0.02, gt=0, lt=1,
                                           description="floor of the benign low-margin rate (population estimate)")
        population_min_clients: int = Field(5, ge=1,
                                            description="clients a batch needs to update the population "
                                                        "baseline")
        population_halflife: int = Field(2000, ge=1,
                                         description="queries over which the population baseline is averaged "
                                                     "(exponential half-life)")
        min_share: float = Field(0.1, gt=0, le=1,
                                 description="a share test needs at least this share of the client's window "
                                             "and twice its baseline, besides significance")
        near_dup_min_share: float = Field(0.5, gt=0, le=1,
                                          description="the same for near-duplicates, which benign clients "
                                                      "resending records with small changes also produce")
        min_dup_rate: float = Field(0.02, gt=0, lt=1, description="floor of the benign near-duplicate rate")
        centroids: int = Field(128, ge=2, le=4096, description="k-means centroids summarising the reference data")
        cover_rank: int = Field(128, ge=1, le=4096,
                                description="principal directions whitened one by one for the off-reference "
                                            "distance; the rest share their mean variance (bounds the cost "
                                            "per query for wide inputs)")
        off_reference_rate: float = Field(0.05, gt=0, lt=0.5,
                                          description="share of held-out reference rows of a class allowed "
                                                      "beyond its off-reference radius (the benign rate tested "
                                                      "against)")
        central_rate: float = Field(0.1, gt=0, lt=0.5,
                                    description="share of held-out reference rows of a class allowed closer to "
                                                "the class centre than the too-central radius (the benign rate "
                                                "tested against)")
        central_dims: int = Field(64, ge=2, le=1024,
                                  description="inputs with more features are projected on this many principal "
                                              "components before the class-centre distance")
        min_few_feature_rate: float = Field(
            0.02, gt=0, lt=1, description="floor of the benign rate of queries that change only a few features of "
                                          "the client's previous query (coordinate-wise black-box search)")
        ood_p: float = Field(0.01, gt=0, lt=0.5, description="notes['ood_p'] below this counts as out of distribution")
        min_ood_rate: float = Field(0.03, gt=0, lt=1, description="floor of the benign out-of-distribution rate")
        reraise_every: int = Field(1000, ge=1, description="re-raise an ongoing campaign at most every N queries")
        campaign_quiet_s: float = Field(3600.0, gt=0,
                                        description="a campaign ends after this long without a flagged check")
        spread_factor: float = Field(0.5, gt=0, le=1,
                                     description="concentration alarm below this fraction of the 0.1% "
                                                 "quantile of simulated benign clients' spread")
        repeat_eps: float = Field(1e-6, ge=0, description="distance at or below which a query is an exact repeat")
        cohort_size: int = Field(1024, ge=0, description="recent queries of clients too new for their own tests "
                                                        "(under min_queries) that are tested together, for "
                                                        "campaigns spread over many client ids; 0: off")
        cohort_check_every: int = Field(32, ge=1, description="test the new clients' pool every this many of "
                                                              "their queries")
        cohort_min_hits: int = Field(3, ge=1, description="pooled queries with a failed signal a new client "
                                                          "needs to be named (and half of its pooled queries, "
                                                          "and that many significant at alpha on their own)")

    def __init__(self, options: DetectorOptions, context: DetectorContext):
        super().__init__(options, context)
        self.opt: ExtractionDetector.Options = options  # type: ignore[assignment]
        self.delta: float | None = None  # PRADA's threshold on W for a client drawing from every class
        self.delta_by_classes: list[tuple[int, float]] = []  # (class count, delta), see BenignClients
        self.dup_radius: float | None = None
        self.benign_dup_rate: float = self.opt.min_dup_rate
        self.min_spread: float = 0.0
        self.cover: ReferenceCover | None = None  # the off-reference test (None until fitted)
        self.centres: ClassCentres | None = None  # the too-central test (None: no reference labels)
        self.calibration: dict[str, Any] = {}
        self._reset_runtime()

    # ------------------------------------------------------------------ fit
    def fit(self, reference: ReferenceData) -> None:
        """Calibrate delta, the near-duplicate radius and the benign near-duplicate rate.

        Benign clients are simulated as sequences of reference rows drawn at
        random; the same ring-buffer distance computation as at run time gives
        their min-distance windows, so delta is the quantile of W that benign
        traffic actually produces for this data set.
        """
        o = self.opt
        X = torch.as_tensor(reference.X, dtype=torch.float32, device=self.context.device)
        n = len(X)
        if n < 20:
            raise ValueError(f"extraction needs at least 20 reference rows to calibrate, got {n}")
        nn_d = []
        for i in range(0, n, 1024):
            d = torch.cdist(X[i : i + 1024], X, compute_mode="donot_use_mm_for_euclid_dist")
            d[d <= o.repeat_eps] = float("inf")  # the row itself and exact duplicates
            nn_d.append(d.min(1).values)
        nn = torch.cat(nn_d).cpu().numpy()
        nn = nn[np.isfinite(nn)]
        self.dup_radius = float(np.quantile(nn, o.dup_quantile))
        dev, seed = self.context.device, self.context.seed
        self.cover = ReferenceCover.fit(reference, centroids=o.centroids, cover_rank=o.cover_rank,
                                        rate=o.off_reference_rate, seed=seed, device=dev)
        self.centres = ClassCentres.fit(reference, dims=o.central_dims, rate=o.central_rate, seed=seed, device=dev)

        rng = np.random.default_rng(self.context.seed)
        length = o.history + o.window
        benign = BenignClients(o.history, o.window, o.min_queries, o.repeat_eps, o.prada_simulations, o.prada_fpr)
        sim = benign.windows(X, lambda s: torch.as_tensor(rng.integers(0, n, (s, length)), device=X.device),
                             self.dup_radius)
        if not sim.w_full:
            raise ValueError("extraction: reference data has too many exact duplicates to calibrate; "
                             "give more distinct reference rows")
        q_small = w_quantile(np.asarray(sim.w_first), o.prada_fpr)
        q_full = w_quantile(np.asarray(sim.w_full), o.prada_fpr)
        self.delta = min(q_small, q_full)
        self.delta_by_classes = benign.deltas_by_class_count(X, reference.y, rng, self.delta, self.dup_radius)
        self.benign_dup_rate = max(o.min_dup_rate, sim.dup_rate)
        self.min_spread = float(np.quantile(sim.spreads, 0.001)) * o.spread_factor if sim.spreads else 0.0
        self.calibration = {
            "delta": self.delta, "w_min_queries_quantile": q_small, "w_window_quantile": q_full,
            "w_benign_median": float(np.median(sim.w_full)), "dup_radius": self.dup_radius,
            "benign_dup_rate": sim.dup_rate, "simulated_clients": len(sim.w_full),
            "reference_rows": n, "min_spread": self.min_spread,
            "benign_spread_median": float(np.median(sim.spreads)) if sim.spreads else None,
            "delta_by_classes": [list(kd) for kd in self.delta_by_classes],
            "prada": "on" if self.delta > 0 else "off: benign W spreads too wide for a threshold at prada_fpr",
        }
        if self.delta <= 0:
            # W lies in (0, 1]: a threshold at or below 0 never fires. Benign clients' min distances on this
            # reference are far from normal (skewed: a few rows far from all others), and Royston's fit of
            # ln(1 - W) puts the prada_fpr quantile below 0. The other tests still run.
            log.warning("extraction: the PRADA test is off for this reference: simulated benign clients' W "
                        "(median %.3f) puts the %g quantile at %.3f, below any W; the other tests still run",
                        float(np.median(sim.w_full)), o.prada_fpr, self.delta)

    def _delta_for(self, labels: np.ndarray) -> Any:
        """delta for a window answered as ``labels`` (-1: unknown): that of the largest simulated class count
        not above the number of classes seen (one when none is known). A float for one window ([queries]),
        an array for rows of windows ([windows, queries])."""
        rows = np.sort(np.atleast_2d(labels), axis=1)
        known = rows >= 0
        seen = known[:, :1].sum(1) + ((rows[:, 1:] != rows[:, :-1]) & known[:, 1:]).sum(1)  # distinct labels
        seen = np.maximum(seen, 1)
        delta = np.full(len(rows), self.delta_by_classes[0][1])
        for k, d in self.delta_by_classes:
            delta = np.where(k <= seen, d, delta)
        return float(delta[0]) if np.ndim(labels) == 1 else delta

    @property
    def off_reference_radius(self) -> float:
        """The off-reference radius of all held-out rows (queries without an answer, evidence); inf unfitted."""
        return math.inf if self.cover is None else self.cover.radius_all

    def artifacts(self) -> dict[str, Any]:
        if self.delta is None:
            return {}
        out = {"calibration": dict(self.calibration), "benign_dup_rate": self.benign_dup_rate,
               **self.cover.to_tree()}
        if self.centres is not None:
            out.update(self.centres.to_tree())
        return out

    def load_artifacts(self, tree: dict[str, Any]) -> None:
        cal = tree["calibration"]
        self.calibration = dict(cal)
        self.delta = float(cal["delta"])
        # artifacts trained before per-class-count deltas test every client against the mixed delta
        self.delta_by_classes = [(int(k), float(d)) for k, d in cal.get("delta_by_classes", [(1, self.delta)])]
        self.dup_radius = float(cal["dup_radius"])
        self.benign_dup_rate = float(tree["benign_dup_rate"])
        self.min_spread = float(cal["min_spread"])
        # artifacts from before the whitened cover, per-class radii or the too-central test load too
        self.cover = ReferenceCover.from_tree(tree, self.context.device)
        self.centres = ClassCentres.from_tree(tree, self.context.device)

    # ------------------------------------------------------------ runtime state
    def _reset_runtime(self) -> None:
        self.slots = ClientSlots(self.opt.max_clients)
        self._eviction_alarm = EvictionAlarm(self.name, self.family)
        self._cap = 0
        self._dim: int | None = None
        self.cohort = NewClientCohort(self.opt.cohort_size)
        self.est_rate: dict[str, float] = {}  # per signal, the typical established client's rate (EWMA) ...
        self.est_batch_rate: dict[str, float] = {}  # ... and in the last batch that had established clients
        self.est_rows = 0  # established clients' queries seen: the pool is tested once they are enough
        self._k: int | None = None
        self.history = QueryHistory(self.opt.history, self.opt.repeat_eps, self.context.device)
        self.win_dist = np.zeros((0, self.opt.window), np.float32)
        self.win_flags = np.zeros((0, self.opt.window), np.uint8)
        self.win_label = np.zeros((0, self.opt.window), np.int16)
        self.win_prob = np.zeros((0, self.opt.window, 0), np.float32)
        self.win_pos = np.zeros(0, np.int64)
        self.win_len = np.zeros(0, np.int64)
        self.count = np.zeros(0, np.int64)  # all queries of the client (repeats included)
        self.informative = np.zeros(0, np.int64)  # non-repeat queries
        self.next_check = np.zeros(0, np.int64)
        self.camp_start = np.zeros(0, np.float64)  # NaN: no campaign
        self.camp_last_flag = np.zeros(0, np.float64)
        self.camp_raised_at = np.zeros(0, np.int64)  # client's query count at the last raise
        self.camp_first_count = np.zeros(0, np.int64)
        self.win_id = np.empty((0, self.opt.window), object)  # record ids of the window, for findings
        self.batch_rate: dict[str, float] = {}  # this batch's population rate (a drift shows at once)
        self.pop_rate = self._initial_rates()
        self.findings_raised = 0

    def _initial_rates(self) -> dict[str, float]:
        """Per signal, the benign rate assumed before the population is seen."""
        return {"near_duplicates": 0.0, "low_margin": self.opt.low_margin_prior,
                "off_reference": self.opt.off_reference_rate, "out_of_distribution": self.opt.min_ood_rate,
                "too_central": self.opt.central_rate, "few_feature_steps": self.opt.min_few_feature_rate}

    def _share_signals(self) -> list[tuple[str, int, float]]:
        """(name, flag bit, floor of its benign rate) of each share test this detector can run."""
        o = self.opt
        signals = [("near_duplicates", _NEAR_DUP, self.benign_dup_rate),
                   ("low_margin", _LOW_MARGIN, o.min_low_margin_rate),
                   ("off_reference", _OFF_REFERENCE, o.off_reference_rate),
                   ("out_of_distribution", _OOD, o.min_ood_rate),
                   ("too_central", _CENTRAL, o.central_rate),
                   ("few_feature_steps", _FEW_FEATURES, o.min_few_feature_rate)]
        skip = {"low_margin"} if self._k is None else set()
        skip |= {"off_reference"} if self.cover is None else set()
        skip |= {"too_central"} if self.centres is None else set()
        return [sig for sig in signals if sig[0] not in skip]

    def _ensure(self, dim: int, k: int | None) -> None:
        """Allocate or grow the slot arrays (doubling) to cover every issued slot."""
        if self._dim is None:
            self._dim = dim
            self.history.set_dim(dim, self._cap)
        elif dim != self._dim:
            raise ValueError(f"extraction: input has {dim} features but earlier records had {self._dim}; "
                             "records of different models must go to separate detector instances")
        if k is not None and self._k is None:
            self._k = k
            self.win_prob = np.zeros((self._cap, self.opt.window, k), np.float32)
        need = self.slots.high_water
        if need <= self._cap:
            return
        new = min(self.opt.max_clients, max(need, 2 * self._cap, 64))
        grow = new - self._cap

        def pad(a: np.ndarray, fill: float = 0) -> np.ndarray:
            return np.concatenate([a, np.full((grow, *a.shape[1:]), fill, a.dtype)])

        self.history.grow(grow)
        for name in ("win_pos", "win_len", "count", "informative", "next_check", "camp_raised_at",
                     "camp_first_count"):
            setattr(self, name, pad(getattr(self, name)))
        self.win_dist = pad(self.win_dist, np.nan)
        self.win_flags = pad(self.win_flags)
        self.win_label = pad(self.win_label, -1)
        if self._k is not None:
            self.win_prob = pad(self.win_prob, np.nan)
        self.camp_start = pad(self.camp_start, np.nan)
        self.camp_last_flag = pad(self.camp_last_flag, np.nan)
        self.win_id = pad(self.win_id, None)
        self._cap = new

    def _reset_slots(self, fresh: list[int]) -> None:
        if not fresh:
            return
        f = np.asarray(fresh)
        self.history.reset(f)
        self.win_pos[f] = 0
        self.win_len[f] = 0
        self.count[f] = 0
        self.informative[f] = 0
        self.next_check[f] = self.opt.min_queries
        self.win_dist[f] = np.nan
        self.win_flags[f] = 0
        self.win_label[f] = -1
        if self._k is not None:
            self.win_prob[f] = np.nan
        self.camp_start[f] = np.nan
        self.camp_last_flag[f] = np.nan
        self.camp_raised_at[f] = 0
        self.camp_first_count[f] = 0
        self.win_id[f] = None

    # ------------------------------------------------------------------ update
    def update(self, batch: InferenceBatch, notes: dict[str, Any]) -> list[Finding]:  # type: ignore[override]
        n = len(batch)
        if n == 0:
            return []
        if self.delta is None or self.dup_radius is None:
            raise RuntimeError("extraction detector is not fitted: run `inferwatch train` (or call fit) first")
        o = self.opt
        probs = batch.probs
        k = None if probs is None else probs.shape[1]
        slots, fresh = self.slots.assign(batch.clients)
        self._ensure(batch.X.shape[1], k)
        self._reset_slots(fresh)

        # 1. min distance of every query to its client's history and earlier same-client rows of this batch
        dev = self.context.device
        x = torch.as_tensor(batch.X, dtype=torch.float32, device=dev)
        x_sq = (x * x).sum(1)
        nearest, is_repeat_t = self.history.nearest_sq(x, x_sq, slots)
        d_min = torch.sqrt(nearest.clamp_min_(0)).cpu().numpy()
        is_repeat = is_repeat_t.cpu().numpy()

        # 2. per-query observations
        dist = np.where(is_repeat | ~np.isfinite(d_min), np.nan, d_min).astype(np.float32)
        flags = np.zeros(n, np.uint8)
        flags[np.nan_to_num(dist, nan=np.inf) <= self.dup_radius] |= _NEAR_DUP
        if probs is not None:
            top2 = np.partition(probs, -2, axis=1)[:, -2:] if k and k >= 2 else None
            if top2 is not None:
                have = np.isfinite(top2).all(1)
                low = have & ((top2[:, 1] - top2[:, 0]) < o.margin)
                flags[low] |= _LOW_MARGIN
        if self.cover is not None:
            flags[self.cover.beyond(x, x_sq, batch.labels)] |= _OFF_REFERENCE
        if self.centres is not None:
            flags[self.centres.too_central(x, batch.labels)] |= _CENTRAL
        few, near_previous = self._steps_from_previous(batch.X, slots)
        flags[few] |= _FEW_FEATURES
        flags[near_previous] |= _NEAR_PREVIOUS
        ood_p = notes.get("ood_p")
        if ood_p is not None and len(ood_p) == n:
            ood_p = np.asarray(ood_p, dtype=np.float64)
            known = np.isfinite(ood_p)
            flags[known] |= _OOD_KNOWN
            flags[known & (ood_p < o.ood_p)] |= _OOD
        informative = ~is_repeat
        new_client = self.informative[slots] < o.min_queries  # before this batch: no test of its own yet
        self._update_population(slots[informative], flags[informative], ~new_client[informative])
        if o.cohort_size:
            pooled = np.flatnonzero(informative & new_client)
            self.cohort.push(flags[pooled], np.asarray(batch.clients, object)[pooled],
                             np.asarray(batch.ids, object)[pooled])

        # 3. scatter into the per-client rings (history: every query; window: non-repeats only)
        self.history.push(x, x_sq, slots, is_repeat, batch.X)
        np.add.at(self.count, slots, 1)
        inf_rows = np.flatnonzero(informative)
        if len(inf_rows):
            self._push_window(slots[inf_rows], inf_rows, dist, flags, batch, probs)
        # 4. test the clients whose informative count reached their next check, in order of first appearance
        present, first_row = np.unique(slots, return_index=True)
        last_row = n - 1 - np.unique(slots[::-1], return_index=True)[1]  # per slot of `present`
        due = np.flatnonzero(self.informative[present] >= self.next_check[present])
        due = due[np.argsort(first_row[due])]
        findings: list[Finding] = []
        if len(due):
            due_slots = present[due]
            self.next_check[due_slots] = self.informative[due_slots] + o.check_every
            window_stats = self._window_stats(due_slots)
            for j, (s, i) in enumerate(zip(due_slots.tolist(), last_row[due].tolist())):  # row i is slot s's
                if not window_stats.suspect[j]:  # no test can fire: only a campaign's quiet time to keep
                    self._campaign_quiet(s, float(batch.ts[i]))
                    continue
                f = self._check(s, batch.clients[i], batch.models[i], float(batch.ts[i]), window_stats, j)
                if f is not None:
                    findings.append(f)
        if o.cohort_size and self.cohort.since_check >= o.cohort_check_every and self.cohort.length >= o.min_queries:
            findings += self._check_cohort(batch.models[-1], float(batch.ts.max()))
        findings += self._eviction_alarm.check(self.slots, float(batch.ts.max()))
        self.findings_raised += len(findings)
        return findings

    def _update_population(self, slots: np.ndarray, flags: np.ndarray, established: np.ndarray) -> None:
        """Track what the typical client's queries look like right now, per signal.

        Per batch: each client's share of queries showing the signal, averaged
        over the clients in the batch with equal weight (used at once, and in
        an exponentially weighted average over batches). Weighing clients, not
        records, is what one busy attacker (or a few among many clients)
        barely moves, while a drift that shifts every client's queries moves
        it at once. The same over the ``established`` clients alone (rows of
        clients that have their own tests) is what the pool of new clients is
        tested against: a campaign spread over many new client ids moves the
        typical client, not the typical established one.
        """
        if len(flags) == 0:
            return
        present = np.bincount(slots, minlength=self._cap)
        have = present > 0
        if have.sum() < self.opt.population_min_clients:
            return
        halving = math.log(2) / self.opt.population_halflife
        w = 1.0 - math.exp(-len(flags) * halving)
        est = np.bincount(slots[established], minlength=self._cap) > 0
        w_est = 1.0 - math.exp(-int(established.sum()) * halving) if est.sum() >= self.opt.population_min_clients \
            else 0.0
        for name, bit, known_bit in (("near_duplicates", _NEAR_DUP, 0), ("low_margin", _LOW_MARGIN, 0),
                                     ("off_reference", _OFF_REFERENCE, 0), ("out_of_distribution", _OOD, _OOD_KNOWN),
                                     ("too_central", _CENTRAL, 0), ("few_feature_steps", _FEW_FEATURES, 0)):
            if known_bit:
                known = (flags & known_bit).astype(bool)
                if not known.any():
                    continue
                denom = np.bincount(slots[known], minlength=self._cap)
                hits = np.bincount(slots[known], weights=(flags[known] & bit).astype(bool), minlength=self._cap)
                mask = denom > 0
            else:
                denom, mask = present, have
                hits = np.bincount(slots, weights=(flags & bit).astype(bool), minlength=self._cap)
            # every client weighs the same, however many queries it sent: a few attacking clients
            # among many barely raise the baseline, a drift of everyone raises it at once
            typical = float((hits[mask] / denom[mask]).mean())
            self.pop_rate[name] += w * (typical - self.pop_rate[name])
            self.batch_rate[name] = typical
            if w_est and (mask & est).any():
                typical_est = float((hits[mask & est] / denom[mask & est]).mean())
                before = self.est_rate.get(name, typical_est)  # the first measurement, not a prior, starts it
                self.est_rate[name] = before + w_est * (typical_est - before)
                self.est_batch_rate[name] = typical_est
        if w_est:
            self.est_rows += int(established.sum())

    def _steps_from_previous(self, X: np.ndarray, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """How each query steps from its client's query just before it (the previous row of the client in this
        batch, else the newest entry of its history ring): whether it changes only a few features of it
        (coordinate-wise search and finite-difference gradient estimates, SimBA's pixel basis, ZOO, step like
        that at any step size; natural queries differ in almost every feature), and whether it is within the
        near-duplicate radius of it (the pattern naming compares the two answers, see
        ``_probe_pattern.straddles``)."""
        order = np.argsort(slots, kind="stable")
        s_sorted = slots[order]
        xs = np.asarray(X, np.float32)[order]
        prev = np.roll(xs, 1, axis=0)
        first = np.r_[True, s_sorted[1:] != s_sorted[:-1]]
        prev[first] = self.history.last[s_sorted[first]]
        few, near = np.zeros(len(slots), bool), np.zeros(len(slots), bool)
        few[order] = probe_pattern.few_changed(xs, prev)
        with np.errstate(invalid="ignore"):  # NaN rows: no previous query
            near[order] = np.linalg.norm(xs - prev, axis=1) <= self.dup_radius
        return few, near

    def _push_window(self, slots: np.ndarray, rows: np.ndarray, dist: np.ndarray, flags: np.ndarray,
                     batch: InferenceBatch, probs: np.ndarray | None) -> None:
        W = self.opt.window
        np.add.at(self.informative, slots, 1)
        ranks = group_ranks(slots)
        per_slot = np.bincount(slots, minlength=self._cap)
        keep = ranks >= per_slot[slots] - W
        slots, rows, ranks = slots[keep], rows[keep], ranks[keep]
        pos = (self.win_pos[slots] + ranks) % W
        self.win_dist[slots, pos] = dist[rows]
        self.win_flags[slots, pos] = flags[rows]
        self.win_label[slots, pos] = batch.labels[rows]
        if probs is not None and self._k is not None:
            self.win_prob[slots, pos] = probs[rows]
        self.win_id[slots, pos] = np.fromiter(batch.ids, object, len(batch))[rows]
        touched = np.flatnonzero(per_slot)
        self.win_pos[touched] = (self.win_pos[touched] + per_slot[touched]) % W
        self.win_len[touched] = np.minimum(self.win_len[touched] + per_slot[touched], W)

    # ------------------------------------------------------------------ tests
    def _ordered(self, a: np.ndarray, s: int) -> np.ndarray:
        """Slot s's ring in arrival order (oldest first), only the filled part."""
        n, pos, W = int(self.win_len[s]), int(self.win_pos[s]), self.opt.window
        idx = (np.arange(pos - n, pos)) % W
        return a[s, idx]

    def _filled(self, a: np.ndarray, s: int) -> np.ndarray:
        """Slot s's ring, only the filled part, in ring order (a view, not arrival order).

        A ring that is not full has never wrapped, so its filled part is its
        first ``win_len`` entries. What only counts labels (class coverage, the
        calibration tail) does not depend on order, so it skips the reordering
        gather that :meth:`_ordered` does.
        """
        return a[s, : int(self.win_len[s])]

    def _window_stats(self, slots: np.ndarray) -> _WindowStats:
        """The tests' statistics of the given clients' windows and history rings, all in one pass.

        A batch has dozens of clients due for a check; one pass over all of
        them replaces a dozen numpy calls per client (this was a fifth of the
        detector's time). Rings and windows that are not full have never
        wrapped: their filled part is their first ``history.length`` / ``win_len``
        entries.
        """
        o = self.opt
        lengths = self.win_len[slots]
        filled = np.arange(o.window)[None, :] < lengths[:, None]
        prada_w = shapiro_w_rows(np.where(filled, self.win_dist[slots], np.nan), min_size=o.min_queries)
        delta = self._delta_for(np.where(filled, self.win_label[slots], -1))
        spread = self.history.spreads(slots, o.min_queries)
        counts = _bit_counts(np.where(filled, self.win_flags[slots], 0))
        signals = [(name, bit, max(floor, self.pop_rate[name], self.batch_rate.get(name, 0.0)))
                   for name, bit, floor in self._share_signals()]
        large = np.zeros(len(slots), bool)
        for name, bit, base in signals:
            hits, total, usable = self._hits_of(name, bit, counts, lengths)
            large |= usable & self._large(name, hits / np.maximum(total, 1), base)
        suspect = (prada_w < delta) | (spread < self.min_spread) | large  # NaN (untested) compares False
        return _WindowStats(lengths, prada_w, delta, spread, counts, signals, suspect)

    def _campaign_quiet(self, s: int, ts: float) -> None:
        """A check without reasons: a campaign quiet for ``campaign_quiet_s`` is over; a new flag starts another."""
        if np.isfinite(self.camp_start[s]) and ts - self.camp_last_flag[s] > self.opt.campaign_quiet_s:
            self.camp_start[s] = np.nan

    def _check(self, s: int, client: str, model: str, ts: float, window: _WindowStats, j: int) -> Finding | None:
        """Slot s's tests, from row j of ``window`` (``_window_stats``): a finding, or None."""
        o = self.opt
        n = int(window.lengths[j])
        reasons: dict[str, Any] = {}
        evidence: dict[str, Any] = {"window_queries": n, "client_queries": int(self.count[s])}
        w = float(window.prada_w[j])
        if math.isfinite(w):
            delta = float(window.delta[j])
            evidence["prada_w"] = w
            evidence["prada_delta"] = delta
            if w < delta:
                reasons["prada"] = w
        spread = float(window.spread[j])
        if math.isfinite(spread):
            evidence.update(spread=spread, min_benign_spread=self.min_spread)
            if spread < self.min_spread:
                reasons["concentrated"] = spread
        evidence.update(near_dup_radius=self.dup_radius, off_reference_radius=self.off_reference_radius)
        # share tests: a client's rate against the benign baseline, which is the larger of what the
        # reference data shows and what the whole population does right now (a drift that moves
        # every client off the reference is drift_vae's finding, not an extraction campaign)
        pvalues: dict[str, float] = {}
        any_large = False
        counts = {bit: int(c[j]) for bit, c in window.counts.items()}
        for name, bit, base in window.signals:
            test = self._share_test(name, bit, counts, n, base)
            if test is None:
                continue
            entry, large = test
            p = entry["p"]
            if name in ("too_central", "off_reference") and p < o.alpha and large:
                # also surprising against the reference, given how few held-out rows set each radius
                p = entry["p"] = max(p, self._calibration_p(s, entry["count"], name))
            evidence[name] = entry
            if p < o.alpha and large:
                reasons[name] = p
            if name == "too_central":  # points the other way from the rest (blends, not synthetic or
                continue  # far-off queries): kept out of their combination, which it would only dilute
            any_large |= large
            pvalues[name] = p
        # Fisher's combination: several moderately raised signals together are as telling as one
        # strongly raised one (the rates are not independent in general, so this is a heuristic at
        # the same small alpha; it still needs one share above its minimum)
        if len(pvalues) >= 2:
            stat = -2.0 * sum(math.log(max(p, 1e-300)) for p in pvalues.values())  # a few values: no numpy
            p_comb = float(chdtrc(2 * len(pvalues), stat))
            evidence["combined_p"] = p_comb
            if p_comb < o.alpha and any_large:
                reasons["combined"] = p_comb

        if not reasons:
            self._campaign_quiet(s, ts)
            return None
        new_campaign = not np.isfinite(self.camp_start[s])
        if new_campaign:
            self.camp_start[s] = ts
            self.camp_first_count[s] = self.count[s]
        elif self.count[s] - self.camp_raised_at[s] < o.reraise_every:
            self.camp_last_flag[s] = ts
            return None
        self.camp_last_flag[s] = ts
        self.camp_raised_at[s] = self.count[s]
        # class coverage is evidence only: computed for a finding, not at every check
        labels = self._filled(self.win_label, s)
        labels = labels[labels >= 0]
        if len(labels):
            share = np.bincount(labels) / len(labels)
            share = share[share > 0]
            evidence["classes_seen"] = len(share)
            evidence["class_entropy_bits"] = float(-(share * np.log2(share)).sum())
        evidence["reasons"] = {k: float(v) for k, v in reasons.items()}
        evidence["queries_at_first_detection"] = int(self.camp_first_count[s])
        attacks, kind = self._classify(s, reasons)
        evidence["pattern"] = kind
        strength = min(1.0, max(-math.log10(max(min(
            [v for k2, v in reasons.items() if k2 != "prada"] or [1.0]), 1e-300)) / 30, 0.0)
            + (0.5 if "prada" in reasons else 0.0))
        confidence = round(0.5 + 0.5 * strength, 3)
        severity = Severity.HIGH if len(reasons) > 1 or kind == "extraction" else Severity.MEDIUM
        return Finding(
            family="extraction", detector=self.name,
            title=f"Client {client} query pattern looks like {kind.replace('_', ' ')}",
            severity=severity, actor=client, model=model, related_ids=tuple(self._ordered(self.win_id, s).tolist()),
            window=f"{client}:{self.camp_start[s]:.3f}", evidence=evidence, attacks=attacks,
            time_ms=int(ts * 1000), confidence=confidence,
            message=(f"{client}: {', '.join(sorted(reasons))} over its last {n} distinct queries "
                     f"({int(self.count[s])} queries in all)"),
            analytic_type="statistical",
        )

    def _share_test(self, name: str, bit: int, counts: dict[int, int], n: int, base: float
                    ) -> tuple[dict[str, Any], bool] | None:
        """One share test on the flag ``counts`` of ``n`` queries against the benign rate ``base``: its evidence
        (count, of, share, baseline, binomial p) and whether the share is large enough to count; None when
        too few of the queries carry a drift_vae p-value for the out-of-distribution share."""
        hits, total, usable = self._hits_of(name, bit, counts, n)
        if not usable:
            return None
        share = hits / total
        return ({"count": hits, "of": total, "share": share, "baseline": base, "p": binom_tail(hits, total, base)},
                self._large(name, share, base))

    def _hits_of(self, name: str, bit: int, counts: dict[int, Any], n: Any) -> tuple[Any, Any, Any]:
        """(queries with ``bit`` set, queries it is a share of, whether that is enough to test): of ``n``, or
        of those with a drift_vae p-value for the out-of-distribution share, which need ``min_queries``.
        Counts are ints for one window, or arrays of one per window."""
        if name == "out_of_distribution":
            total = counts[_OOD_KNOWN]
            return counts[bit], total, total >= self.opt.min_queries
        return counts[bit], n, True

    def _large(self, name: str, share: float, base: float) -> bool:
        """Whether a share is large enough to count: at least twice the benign ``base`` and at least the
        signal's minimum share. Near-identical queries are common in benign traffic too (retries with sensor
        noise of the same input), so that signal needs a larger share than the others."""
        o = self.opt
        return (share >= (o.near_dup_min_share if name == "near_duplicates" else o.min_share)) & (share >= 2 * base)

    def _check_cohort(self, model: str, ts: float) -> list[Finding]:
        """The share tests on the pool of new clients' queries; a finding for each new client that made the case.

        The pool is tested against the larger of each signal's floor and the typical established client's
        rate (averaged, and in the last batch: a drift moves both at once), not the whole population's, which
        a campaign of many new client ids moves itself; not before ``population_halflife`` queries of
        established clients have set those rates (at start-up every client is new). Too-central is left out:
        its calibration allowance is per client window and class.
        """
        o = self.opt
        self.cohort.since_check = 0
        if self.est_rows < o.population_halflife:
            return []
        counts, n = _bit_counts(self.cohort.window_flags()), self.cohort.length
        reasons: dict[str, float] = {}
        tests: dict[str, Any] = {}
        bits = 0
        for name, bit, floor in self._share_signals():
            if name == "too_central":
                continue
            test = self._share_test(name, bit, counts, n, max(floor, self.est_rate.get(name, 0.0),
                                                              self.est_batch_rate.get(name, 0.0)))
            if test is None:
                continue
            tests[name], large = test
            if tests[name]["p"] < o.alpha and large:
                reasons[name], bits = tests[name]["p"], bits | bit
        if not reasons:
            return []
        flags, clients, ids = self.cohort.window()
        names, which = np.unique(clients.astype(str), return_inverse=True)
        pooled = np.bincount(which, minlength=len(names))
        hit = np.bincount(which, weights=(flags & bits) > 0, minlength=len(names)).astype(np.int64)
        # a client's own pooled queries must make the case too: a benign new client among a campaign's
        # clients is in the pool with its own few queries, and one unlucky draw of four off the data
        # among six is not a campaign (the failed signals' largest baseline: the test each must pass)
        base = max(tests[name]["baseline"] for name in reasons)
        own_p = bdtrc(hit - 1, pooled, base)
        named = np.flatnonzero((hit >= o.cohort_min_hits) & (2 * hit >= pooled) & (own_p < o.alpha))
        findings = []
        for c in named.tolist():
            client = str(names[c])
            s = self.slots.slot_of(client)
            if s is not None and np.isfinite(self.camp_start[s]):
                continue  # already in a campaign: raised, here or by its own tests
            if s is not None:  # its own tests, later, continue this campaign instead of opening another, and
                # the first of them that fails re-raises it (the same uid) at once: a technique named from a
                # new client's first few queries is a guess its own window then corrects
                self.camp_start[s] = self.camp_last_flag[s] = ts
                self.camp_first_count[s] = self.count[s]
                self.camp_raised_at[s] = self.count[s] - o.reraise_every
            attacks, kind = self._classify(s, reasons) if s is not None else probe_pattern.EXTRACTION
            strength = min(1.0, -math.log10(max(min(reasons.values()), 1e-300)) / 30)
            evidence = {
                "cohort": {"pooled_queries": n, "clients": len(names), "named_clients": len(named), **tests},
                "client_pooled_queries": int(pooled[c]), "client_flagged_queries": int(hit[c]),
                "client_queries": int(self.count[s]) if s is not None else int(pooled[c]),
                "queries_at_first_detection": int(self.count[s]) if s is not None else int(pooled[c]),
                "reasons": {k: float(v) for k, v in reasons.items()}, "pattern": kind,
            }
            findings.append(Finding(
                family="extraction", detector=self.name,
                title=f"Client {client} is one of {len(named)} new clients whose queries together look like "
                      f"{kind.replace('_', ' ')}",
                severity=Severity.HIGH, actor=client, model=model,
                related_ids=tuple(ids[which == c].tolist()), window=f"{client}:{ts:.3f}", evidence=evidence,
                attacks=attacks, time_ms=int(ts * 1000), confidence=round(0.5 + 0.5 * strength, 3),
                message=(f"{client}: {int(hit[c])} of its {int(pooled[c])} queries among the last {n} of "
                         f"{len(names)} new clients, which together show {', '.join(sorted(reasons))}"),
                analytic_type="statistical",
            ))
        return findings

    def _calibration_p(self, s: int, hits: int, test: str) -> float:
        """P(at least ``hits`` too-central, or off-reference, queries in slot s's window) for natural queries:
        each radius rests on a finite set of held-out rows (``_reference_regions``)."""
        labels = self._filled(self.win_label, s).astype(np.int64)
        region = self.centres if test == "too_central" else self.cover
        return region.calibration_p(labels, hits)

    def _classify(self, s: int, reasons: dict[str, Any]) -> tuple[tuple[str, ...], str]:
        """Name the likely technique from the client's window (``_probe_pattern``: chain by chain)."""
        flags = self._ordered(self.win_flags, s)
        return probe_pattern.classify(
            self._ordered(self.win_prob, s) if self._k is not None else None, (flags & _NEAR_DUP) > 0,
            (flags & _LOW_MARGIN) > 0, (flags & _FEW_FEATURES) > 0,
            probing="near_duplicates" in reasons or "concentrated" in reasons, concentrated="concentrated" in reasons,
            near_previous=(flags & _NEAR_PREVIOUS) > 0,
            walking="concentrated" in reasons and probe_pattern.walks(self.history.recent(s)))

    # ------------------------------------------------------------ checkpoints
    _ARRAYS = ("win_dist", "win_flags", "win_label",
               "win_prob", "win_pos", "win_len", "count", "informative", "next_check", "camp_start",
               "camp_last_flag", "camp_raised_at", "camp_first_count")

    def state_dict(self) -> dict[str, Any]:
        return {
            "slots": self.slots.state_dict(), "cap": self._cap, "dim": -1 if self._dim is None else self._dim,
            "k": -1 if self._k is None else self._k,
            **self.history.state_dict(),
            **{name: getattr(self, name) for name in self._ARRAYS},
            "ids": [self._ordered(self.win_id, s).tolist() for s in range(self._cap)],  # arrival order
            "pop_rate": dict(self.pop_rate), "batch_rate": dict(self.batch_rate),
            "est_rate": dict(self.est_rate), "est_batch_rate": dict(self.est_batch_rate), "est_rows": self.est_rows,
            "cohort": self.cohort.state_dict(),
            "findings_raised": self.findings_raised,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._reset_runtime()
        self.slots.load_state_dict(state["slots"])
        self._cap = int(state["cap"])
        self._dim = None if int(state["dim"]) < 0 else int(state["dim"])
        self._k = None if int(state["k"]) < 0 else int(state["k"])
        self.history.load_state_dict(state, self._dim)
        for name in self._ARRAYS:
            setattr(self, name, np.array(state[name]))
        W = self.opt.window
        self.win_id = np.empty((self._cap, W), object)
        for s, q in enumerate(state["ids"]):
            q = list(q)[-W:]  # the newest ends just before win_pos, as in the other window rings
            self.win_id[s, (int(self.win_pos[s]) - len(q) + np.arange(len(q))) % W] = q
        self.pop_rate.update({k: float(v) for k, v in state["pop_rate"].items()})  # older states lack newer tests
        self.batch_rate = {k: float(v) for k, v in state["batch_rate"].items()}
        # states from before the pool of new clients have none of it: it starts as at start-up
        self.est_rate = {k: float(v) for k, v in state.get("est_rate", {}).items()}
        self.est_batch_rate = {k: float(v) for k, v in state.get("est_batch_rate", {}).items()}
        self.est_rows = int(state.get("est_rows", 0))
        if "cohort" in state:
            self.cohort.load_state_dict(state["cohort"])
        self.findings_raised = int(state["findings_raised"])

    @property
    def evictions(self) -> int:
        return self.slots.evictions
