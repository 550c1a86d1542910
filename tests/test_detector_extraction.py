"""Extraction / probing detector: logic, state round trip, devices, speed and the family's goals."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from scipy import stats

from agent.model import train_classifier
from agent.records import InferenceBatch
from agent.reference import ReferenceData
from agent.scenarios.data import benign_traffic, load
from agent.scenarios.extraction import run_dataset
from agent.state import load_tree, save_tree
from detectors._client_slots import ClientSlots, group_ranks
from detectors._query_history import QueryHistory
from detectors._swilk import shapiro_w, shapiro_w_rows
from detectors.base import DetectorContext
from detectors.extraction import ExtractionDetector

torch.set_num_threads(1)
CPU = torch.device("cpu")


def make_detector(device: torch.device = CPU, **options) -> ExtractionDetector:
    ds = load("digits")
    opts = ExtractionDetector.Options(prada_simulations=300, **options)
    det = ExtractionDetector(opts, DetectorContext(device=device, input_shape=ds.input_shape, n_classes=10))
    det.fit(ReferenceData(ds.X_train, ds.y_train, ds.input_shape))
    return det


@pytest.fixture(scope="module")
def fitted() -> ExtractionDetector:
    return make_detector()


def fresh_from(det: ExtractionDetector, tmp_path, device: torch.device = CPU, **options) -> ExtractionDetector:
    """A new detector loaded from the artifacts of ``det`` through save_tree/load_tree (as `run` does)."""
    save_tree(tmp_path / "extraction.npz", det.artifacts())
    ds = load("digits")
    new = ExtractionDetector(ExtractionDetector.Options(prada_simulations=300, **options),
                             DetectorContext(device=device, input_shape=ds.input_shape, n_classes=10))
    new.load_artifacts(load_tree(tmp_path / "extraction.npz"))
    return new


def traffic(n_benign: int = 6000, n_clients: int = 40, attack: str | None = "membership", n_attack: int = 400,
            seed: int = 0):
    """Benign digits traffic plus one attacker, in time order; probabilities from a fixed random softmax."""
    ds = load("digits")
    X, c, ts = benign_traffic(ds, n_benign, n_clients, seed=seed)
    clients = [f"tenant-{i}" for i in c]
    rng = np.random.default_rng(seed + 1)
    if attack == "membership":
        xa = np.clip(ds.X_train[3] + rng.normal(0, 0.05, (n_attack, ds.dim)), 0, 1).astype(np.float32)
    elif attack == "uniform":
        xa = rng.uniform(0, 1, (n_attack, ds.dim)).astype(np.float32)
    elif attack == "repeat":
        xa = np.repeat(ds.X_test[:1], n_attack, 0)
    elif attack == "finite_differences":  # ZOO: x + h e_j, x - h e_j with h = 1e-4, the iterate moving slowly
        base = ds.X_test[7].astype(np.float64)
        rows = []
        for i in range(n_attack):
            j = rng.integers(ds.dim)
            x = base.copy()
            x[j] += 1e-4 if i % 2 else -1e-4
            rows.append(x)
            if i % 16 == 15:  # a gradient step now and then
                base = np.clip(base + rng.normal(0, 0.01, ds.dim), 0, 1)
        xa = np.asarray(rows, np.float32)
    elif attack == "pixel_flips":  # a walk that flips two pixels per query, from one test digit
        walk = [ds.X_test[5].copy()]
        for _ in range(n_attack - 1):
            x = walk[-1].copy()
            j = rng.choice(ds.dim, 2, replace=False)
            x[j] = 1.0 - np.round(x[j])
            walk.append(x)
        xa = np.stack(walk).astype(np.float32)
    else:
        xa = np.zeros((0, ds.dim), np.float32)
    X = np.concatenate([X, xa])
    ts = np.concatenate([ts, np.sort(rng.uniform(100, 700, len(xa)))])
    clients += ["attacker"] * len(xa)
    order = np.argsort(ts, kind="stable")
    W = np.random.default_rng(5).normal(size=(ds.dim, 10)).astype(np.float32)
    logits = X[order] @ W * 3
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    return X[order], ts[order], [clients[i] for i in order], probs.astype(np.float32)


def batches(X, ts, clients, probs, size: int = 512):
    for i in range(0, len(X), size):
        sl = slice(i, i + size)
        n = len(X[sl])
        yield InferenceBatch(ids=tuple(f"req-{j}" for j in range(i, i + n)), ts=ts[sl], models=("digits",) * n,
                             model_versions=(None,) * n, clients=tuple(clients[sl]), X=X[sl], probs=probs[sl],
                             labels=probs[sl].argmax(1))


def run(det, data, start: int = 0, stop: int | None = None, size: int = 512):
    out = []
    for i, b in enumerate(batches(*data, size=size)):
        if i < start or (stop is not None and i >= stop):
            continue
        out += det.update(b, {})
    return out


def run_with_restart(fitted: ExtractionDetector, tmp_path, data, at_batch: int) -> list:
    """Findings of a detector checkpointed after ``at_batch`` batches and resumed from that checkpoint."""
    first = fresh_from(fitted, tmp_path)
    got = run(first, data, stop=at_batch)
    save_tree(tmp_path / "state.npz", first.state_dict())
    resumed = fresh_from(fitted, tmp_path)
    resumed.load_state_dict(load_tree(tmp_path / "state.npz"))
    return got + run(resumed, data, start=at_batch)


@pytest.mark.parametrize("n", [3, 4, 5, 6, 11, 48, 128, 1000])
def test_shapiro_w_matches_scipy(n: int) -> None:
    rng = np.random.default_rng(n)
    for x in (rng.normal(size=n), rng.exponential(size=n), rng.uniform(size=n)):
        assert shapiro_w(x) == pytest.approx(stats.shapiro(x).statistic, abs=1e-6)


def test_shapiro_w_of_rows_is_each_rows_own() -> None:
    """Rows of different lengths (NaN: no value), each tested on its own values; too few values: NaN."""
    rng = np.random.default_rng(0)
    x = rng.gamma(2.0, size=(40, 128))
    x[rng.random(x.shape) < rng.uniform(0, 0.8, (40, 1))] = np.nan
    x[0, 3:] = np.nan
    x[1] = 2.0  # a constant sample: W is 0
    got = shapiro_w_rows(x, min_size=20)
    for row, w in zip(x, got, strict=True):
        v = row[np.isfinite(row)]
        if len(v) < 20:
            assert np.isnan(w)
        else:
            assert w == pytest.approx(shapiro_w(v), abs=1e-12)
            assert w == pytest.approx(stats.shapiro(v).statistic if np.ptp(v) > 0 else 0.0, abs=1e-6)
    assert np.isnan(got[0]) and got[1] == 0.0


def test_window_statistics_of_many_clients_are_each_clients_own(fitted: ExtractionDetector, tmp_path) -> None:
    """``_window_stats`` tests every due client of a batch at once: each row must be what that client's own
    window and ring give (spread, PRADA delta, flag counts), whatever the other clients hold."""
    det = fresh_from(fitted, tmp_path)
    run(det, traffic(n_benign=3000, n_clients=30, attack="membership", n_attack=300))
    slots = np.flatnonzero(det.win_len > 0)
    assert len(slots) > 20 and len(set(det.win_len[slots].tolist())) > 1 and det.history.repeat.any()
    got = det._window_stats(slots)
    for j, s in enumerate(slots.tolist()):
        n, rows = int(det.win_len[s]), int(det.history.length[s])
        distinct = np.flatnonzero(~det.history.repeat[s, :rows])
        ring = det.history.ring[s][:, torch.as_tensor(distinct)].T.double()  # the distinct entries, as rows
        want = float(torch.sqrt(((ring - ring.mean(0)) ** 2).sum(1).mean())) if len(distinct) >= 48 else np.nan
        np.testing.assert_allclose(got.spread[j], want, rtol=1e-12)
        assert got.delta[j] == det._delta_for(det.win_label[s, :n])
        flags = det.win_flags[s, :n]
        assert {bit: int(c[j]) for bit, c in got.counts.items()} == {
            bit: int(((flags & bit) > 0).sum()) for bit in got.counts}
        d = det.win_dist[s, :n]
        d = d[np.isfinite(d)]
        assert (np.isnan(got.prada_w[j]) if len(d) < 48 else got.prada_w[j] == pytest.approx(shapiro_w(d)))
    assert got.suspect.any() and not got.suspect.all()


def test_group_ranks_and_lru_slots() -> None:
    assert group_ranks(np.array([2, 1, 2, 2, 1])).tolist() == [0, 0, 1, 2, 1]
    slots = ClientSlots(max_clients=2)
    s1, fresh1 = slots.assign(["a", "b", "a"])
    assert s1[0] == s1[2] and sorted(fresh1) == [0, 1]
    _, fresh2 = slots.assign(["c"])  # evicts "a", the least recently seen
    assert fresh2 == [int(s1[0])] and slots.evictions == 1 and len(slots) == 2


def test_fit_calibrates_from_reference_only(fitted: ExtractionDetector) -> None:
    cal = fitted.calibration
    assert 0.5 < cal["delta"] < cal["w_benign_median"] < 1.0
    assert cal["dup_radius"] > 0 and fitted.min_spread > 0 and np.isfinite(fitted.off_reference_radius)


def test_membership_probing_caught_benign_quiet(fitted: ExtractionDetector, tmp_path) -> None:
    det = fresh_from(fitted, tmp_path)
    data = traffic(attack="membership")
    findings = run(det, data)
    actors = {f.actor for f in findings}
    assert actors == {"attacker"}, f"benign clients flagged: {actors - {'attacker'}}"
    first = findings[0]
    assert first.evidence["queries_at_first_detection"] <= 300
    assert first.attacks[0] == "AML.T0024.000"
    assert first.family == "extraction" and first.detector == "extraction"
    attacker_ids = {f"req-{i}" for i, c in enumerate(data[2]) if c == "attacker"}
    assert set(first.related_ids) <= attacker_ids and len(first.related_ids) >= 48


def test_one_finding_per_campaign_bounded_rate(fitted: ExtractionDetector, tmp_path) -> None:
    det = fresh_from(fitted, tmp_path, reraise_every=500)
    findings = run(det, traffic(n_benign=2000, attack="uniform", n_attack=2400))
    mine = [f for f in findings if f.actor == "attacker"]
    assert 1 <= len(mine) <= 1 + 2400 // 500
    assert len({f.uid for f in mine}) == 1, "re-raising the same campaign must keep its uid"
    assert mine[0].attacks[0] == "AML.T0024.002"


def test_exact_repeats_are_not_evidence(fitted: ExtractionDetector, tmp_path) -> None:
    det = fresh_from(fitted, tmp_path)
    findings = run(det, traffic(n_benign=2000, attack="repeat", n_attack=600))
    assert [f for f in findings if f.actor == "attacker"] == []


def test_finite_difference_steps_are_not_mistaken_for_repeats(fitted: ExtractionDetector, tmp_path) -> None:
    """ZOO estimates gradients from x + h e_j and x - h e_j with h = 1e-4. In float32, |a|^2 + |b|^2 - 2 a.b
    cannot resolve distances under ~5e-3 on digits, so such queries used to count as exact repeats and the
    client was never flagged (ART's ZOO: 444 queries on digits, missed on tabular); they are rechecked in
    float64 now."""
    findings = run(fresh_from(fitted, tmp_path), traffic(n_benign=4000, attack="finite_differences", n_attack=400))
    assert {f.actor for f in findings} == {"attacker"}
    first = findings[0]
    assert first.evidence["queries_at_first_detection"] <= 200, first.evidence
    assert first.evidence["pattern"] == "black_box_probing"


def test_exact_recheck_gives_the_same_on_the_torch_path(fitted: ExtractionDetector, tmp_path, monkeypatch) -> None:
    """The float64 recheck runs in numpy on CPU and in torch elsewhere (CUDA): both paths give the same
    repeats and distances (the torch one forced here on CPU)."""
    data = traffic(n_benign=2000, attack="finite_differences", n_attack=300)
    numpy_det, torch_det = fresh_from(fitted, tmp_path), fresh_from(fitted, tmp_path)
    numpy_findings = run(numpy_det, data)
    plain = QueryHistory._resolve_close_pairs
    monkeypatch.setattr(QueryHistory, "_resolve_close_pairs",
                        lambda self, *a: plain(self, *a, numpy_path=False))
    torch_findings = run(torch_det, data)
    assert [f.evidence["queries_at_first_detection"] for f in numpy_findings] == \
        [f.evidence["queries_at_first_detection"] for f in torch_findings]
    np.testing.assert_array_equal(numpy_det.history.repeat, torch_det.history.repeat)
    np.testing.assert_allclose(numpy_det.win_dist, torch_det.win_dist, rtol=1e-5)
    assert numpy_det.informative.sum() == torch_det.informative.sum() < 2300  # retries stay repeats


def test_state_round_trip_continues_exactly(fitted: ExtractionDetector, tmp_path) -> None:
    data = traffic(attack="membership", seed=3)
    straight = fresh_from(fitted, tmp_path)
    expected = run(straight, data)
    assert expected, "the scenario must produce findings for this test to mean anything"

    got = run_with_restart(fitted, tmp_path, data, 5)
    assert [(f.uid, f.related_ids, f.evidence["client_queries"]) for f in got] == \
           [(f.uid, f.related_ids, f.evidence["client_queries"]) for f in expected]


def test_checkpoints_keep_the_history_entry_major(fitted: ExtractionDetector, tmp_path) -> None:
    """In memory the history rings are feature-major (for ``QueryHistory._ring_dots``); checkpoints keep them
    as [slot, entry, feature], as every earlier version wrote them, so older checkpoints load and newer ones
    read back right."""
    X, ts, clients, probs = traffic(n_benign=1500, n_clients=20, attack=None)
    det = fresh_from(fitted, tmp_path)
    run(det, (X, ts, clients, probs))
    state = det.state_dict()
    last_query = {c: X[i] for i, c in enumerate(clients)}
    for client, x in last_query.items():
        s = det.slots.slot_of(client)
        np.testing.assert_array_equal(state["hist"][s, (det.history.pos[s] - 1) % det.opt.history], x)
    again = fresh_from(fitted, tmp_path)
    again.load_state_dict(state)
    np.testing.assert_array_equal(again.history.ring.numpy(), det.history.ring.numpy())


def test_eviction_is_bounded_and_counted(fitted: ExtractionDetector, tmp_path) -> None:
    det = fresh_from(fitted, tmp_path, max_clients=8)
    run(det, traffic(n_benign=3000, n_clients=40, attack=None))
    assert len(det.slots) == 8 and det.evictions > 0 and det._cap <= 8


def test_ood_notes_are_used(fitted: ExtractionDetector, tmp_path) -> None:
    """A client whose queries drift_vae calls out of distribution is flagged from notes['ood_p'] alone,
    while the same p-values for every client (a population-wide drift) flag nobody."""
    data = traffic(n_benign=6000, n_clients=30, attack="membership", n_attack=300)
    attacker = np.array([c == "attacker" for c in data[2]])

    def run_with(ood_for_all: bool) -> list:
        # near duplicates alone never flag here
        det = fresh_from(fitted, tmp_path, near_dup_min_share=1.0)
        out = []
        for i, b in enumerate(batches(*data)):
            rows = attacker[i * 512 : i * 512 + len(b)]
            ood = np.where(rows | ood_for_all, 1e-4, 0.5)
            out += [f for f in det.update(b, {"ood_p": ood}) if "out_of_distribution" in f.evidence["reasons"]]
        return out

    assert {f.actor for f in run_with(False)} == {"attacker"}
    everyone = run_with(True)
    assert {f.actor for f in everyone} <= {"attacker"}, "a population-wide shift must not flag benign clients"


def test_population_drift_and_noisy_retries_flag_no_benign_client(fitted: ExtractionDetector, tmp_path) -> None:
    """Heavy users re-sending the same inputs with sensor noise, then a brightness/contrast drift of
    every client's inputs (the demo's drift): near duplicates, off-reference and low-margin rates all
    rise, for everyone, and no client is an extraction campaign."""
    ds = load("digits")
    model = train_classifier(ds.X_train, ds.y_train, ds.input_shape, CPU, epochs=20)
    rng = np.random.default_rng(0)
    X, c, ts = benign_traffic(ds, 20000, 200, seed=5)
    X = np.clip(X + rng.normal(0, 0.02, X.shape), 0, 1).astype(np.float32)
    drifted = ts >= 0.6 * 3600
    X[drifted] = np.clip(0.55 * X[drifted] + 0.35 + rng.normal(0, 0.05, X[drifted].shape), 0, 1)
    probs = model.predict_proba(X)
    det = fresh_from(fitted, tmp_path)
    findings = run(det, (X, ts, [f"tenant-{k}" for k in c], probs))
    assert findings == [], [(f.actor, f.evidence["reasons"]) for f in findings]
    assert det.pop_rate["off_reference"] > 0.5, "the drift should have moved the population baseline"


def test_clients_of_one_class_are_not_extraction(fitted: ExtractionDetector, tmp_path) -> None:
    """Ten benign clients that each only ever see one digit (its natural test and training rows, answered as
    that digit) and a batch job scoring the test set sorted by class. One class's min distances are far from
    normal: against the mixed clients' delta alone, one-class-2 was flagged by PRADA (before per-class-count
    deltas)."""
    ds = load("digits")
    rng = np.random.default_rng(0)
    X, c, ts = benign_traffic(ds, 6000, 40, seed=0)
    parts, clients, times = [X], [f"tenant-{i}" for i in c], [ts]
    labels = [rng.integers(0, 10, len(X))]
    for k in range(10):
        rows = np.concatenate([ds.X_test[ds.y_test == k], ds.X_train[ds.y_train == k]])
        parts.append(rows[rng.permutation(len(rows))])
        clients += [f"one-class-{k}"] * len(rows)
        times.append(np.sort(rng.uniform(0, 3600, len(rows))))
        labels.append(np.full(len(rows), k))
    by_class = np.argsort(ds.y_test, kind="stable")
    parts.append(ds.X_test[by_class])
    clients += ["class-sorted-batch"] * len(by_class)
    times.append(np.linspace(1000, 1600, len(by_class)))
    labels.append(ds.y_test[by_class])
    X, ts, y = np.concatenate(parts), np.concatenate(times), np.concatenate(labels)
    order = np.argsort(ts, kind="stable")
    probs = np.eye(10, dtype=np.float32)[y[order]]
    det = fresh_from(fitted, tmp_path)
    findings = run(det, (X[order], ts[order], [clients[i] for i in order], probs))
    assert findings == [], [(f.actor, f.evidence["reasons"]) for f in findings]


def test_delta_per_class_count_is_monotone_and_old_artifacts_keep_one_delta(fitted: ExtractionDetector,
                                                                              tmp_path) -> None:
    counts = [k for k, _ in fitted.delta_by_classes]
    deltas = [d for _, d in fitted.delta_by_classes]
    assert counts == [1, 2, 3, 5, 10] and deltas == sorted(deltas) and deltas[-1] == fitted.delta
    assert deltas[0] < fitted.delta - 0.2, "one-class clients' W spreads far wider than mixed clients'"
    assert fitted._delta_for(np.array([-1, -1])) == deltas[0], "no known answer: the most cautious delta"
    assert fitted._delta_for(np.array([4, 4, 7, 7, 9, 9, 1])) == deltas[2], "four classes: the entry for three"
    assert fitted._delta_for(np.arange(10)) == fitted.delta
    tree = fitted.artifacts()
    tree["calibration"] = {k: v for k, v in tree["calibration"].items() if k != "delta_by_classes"}
    save_tree(tmp_path / "old.npz", tree)
    old = ExtractionDetector(ExtractionDetector.Options(), fitted.context)
    old.load_artifacts(load_tree(tmp_path / "old.npz"))
    assert old._delta_for(np.array([3])) == old._delta_for(np.arange(10)) == fitted.delta


def test_a_client_asking_only_about_a_rare_class_is_judged_by_that_class(tmp_path) -> None:
    """A fraud-like table (5 % positives, in ``agent.scenarios.data``): an analyst re-scoring every positive
    case is not extraction, though 30 % of natural positive rows lie beyond the radius set on all rows (flagged
    off_reference before per-class radii); random queries answered as positive still are. Artifacts saved
    before per-class radii keep the one radius."""
    ds = load("imbalanced")
    ctx = DetectorContext(device=CPU, input_shape=ds.input_shape, n_classes=2, seed=0)
    det = ExtractionDetector(ExtractionDetector.Options(prada_simulations=300), ctx)
    det.fit(ReferenceData(ds.X_train, ds.y_train, ds.input_shape))
    assert det.cover.radius[1] > det.off_reference_radius == det.cover.radius[-1]
    rng = np.random.default_rng(0)
    X, c, ts = benign_traffic(ds, 8000, 40, seed=0)
    y = ds.y_test[[int(np.flatnonzero((ds.X_test == row).all(1))[0]) for row in X]]
    positives = np.concatenate([ds.X_test[ds.y_test == 1], ds.X_train[ds.y_train == 1]])
    randoms = rng.uniform(ds.lo, ds.hi, (300, ds.dim)).astype(np.float32)
    parts, labels = [X, positives[rng.permutation(len(positives))], randoms], [y, np.ones(len(positives) + 300, int)]
    clients = [f"tenant-{i}" for i in c] + ["analyst"] * len(positives) + ["random-queries"] * 300
    times = np.concatenate([ts, np.sort(rng.uniform(0, 3600, len(positives))), np.sort(rng.uniform(0, 3600, 300))])
    X, y = np.concatenate(parts), np.concatenate(labels)
    order = np.argsort(times, kind="stable")
    data = (X[order], times[order], [clients[i] for i in order], np.eye(2, dtype=np.float32)[y[order]])
    flagged = {f.actor: f.evidence["reasons"] for f in run(det, data)}
    assert set(flagged) == {"random-queries"}, flagged
    assert "off_reference" in flagged["random-queries"]
    tree = {k: v for k, v in det.artifacts().items() if k not in ("off_radius", "off_group", "off_beta")}
    old = ExtractionDetector(ExtractionDetector.Options(prada_simulations=300), ctx)
    old.load_artifacts(tree)
    assert old.cover.radius_for(np.array([0, 1, -1])).tolist() == [det.off_reference_radius] * 3


def test_benign_clients_resending_a_small_pool_with_jitter_are_not_flagged() -> None:
    """The eval's tabular scenario with jitter of 0.05 standard deviation on every benign query
    (``python -m agent.scenarios.extraction 0 jittered``): the table has 171 test rows, so a client's last 64
    queries hold an earlier copy of a third of its new ones, near duplicates rather than repeats. With
    ``near_dup_min_share`` 0.3, 10 of the 400 tenants were flagged; every attacker is still found in time."""
    r = run_dataset("tabular", CPU, False, seed=0, benign_noise=0.05)
    assert r["flagged_benign"] == []
    assert all(v["detected"] for v in r["variants"]), [v["variant"] for v in r["variants"] if not v["detected"]]


def test_throughput_batch_512(fitted: ExtractionDetector, tmp_path) -> None:
    det = fresh_from(fitted, tmp_path)
    data = traffic(n_benign=20000, n_clients=300, attack=None)
    bs = list(batches(*data))
    t0 = time.perf_counter()
    for b in bs:
        det.update(b, {})
    eps = len(data[0]) / (time.perf_counter() - t0)
    print(f"extraction detector: {eps:,.0f} records/s at batch 512, 64 features, 300 clients")
    assert eps > 20_000


@pytest.fixture(scope="module")
def digits_model():
    ds = load("digits")
    return train_classifier(ds.X_train, ds.y_train, ds.input_shape, CPU, epochs=20)


def mixup_traffic(model, n_benign: int = 6000, n_clients: int = 40, n_attack: int = 400, seed: int = 0):
    """Benign digits traffic plus one client sending blends of natural test rows (mixup), answered by a real model."""
    ds = load("digits")
    X, c, ts = benign_traffic(ds, n_benign, n_clients, seed=seed)
    rng = np.random.default_rng(seed + 1)
    a, b = rng.integers(len(ds.X_test), size=(2, n_attack))
    lam = rng.uniform(0.2, 0.8, (n_attack, 1)).astype(np.float32)
    xa = lam * ds.X_test[a] + (1 - lam) * ds.X_test[b]
    X = np.concatenate([X, xa]).astype(np.float32)
    ts = np.concatenate([ts, np.sort(rng.uniform(100, 1000, n_attack))])
    clients = [f"tenant-{i}" for i in c] + ["attacker"] * n_attack
    order = np.argsort(ts, kind="stable")
    return X[order], ts[order], [clients[i] for i in order], model.predict_proba(X[order])


def test_mixup_of_natural_inputs_caught_benign_quiet(fitted: ExtractionDetector, digits_model, tmp_path) -> None:
    """Blends of natural in-task inputs are neither off the data nor near each other, and most are answered
    confidently; they are caught because far more of them sit close to their class's centre than natural
    inputs do."""
    det = fresh_from(fitted, tmp_path)
    findings = run(det, mixup_traffic(digits_model))
    assert {f.actor for f in findings} == {"attacker"}, [(f.actor, f.evidence["reasons"]) for f in findings]
    first = findings[0]
    assert "too_central" in first.evidence["reasons"]
    assert first.evidence["queries_at_first_detection"] <= 300
    assert first.evidence["pattern"] == "extraction" and first.attacks[0] == "AML.T0024.002"
    assert first.evidence["too_central"]["share"] >= 3 * det.opt.central_rate


def test_too_central_is_calibrated_per_class(fitted: ExtractionDetector) -> None:
    """Held-out natural rows of every class are too central at about central_rate (a client asking about one
    class only is judged on that class's spread); mixups of them are more than twice as often."""
    ds = load("digits")
    rate = fitted.opt.central_rate
    hit = fitted.centres.too_central(torch.as_tensor(ds.X_test), ds.y_test)
    per_class = np.array([hit[ds.y_test == c].mean() for c in range(10)])
    assert abs(hit.mean() - rate) < 0.05 and per_class.max() < 2.5 * rate, per_class
    rng = np.random.default_rng(0)
    a, b = rng.integers(len(ds.X_test), size=(2, 2000))
    lam = rng.uniform(0.2, 0.8, (2000, 1)).astype(np.float32)
    blend = torch.as_tensor(lam * ds.X_test[a] + (1 - lam) * ds.X_test[b])
    answered = np.where(lam[:, 0] >= 0.5, ds.y_test[a], ds.y_test[b])
    assert fitted.centres.too_central(blend, answered).mean() > 2 * rate
    unknown = fitted.centres.too_central(blend, np.full(2000, -1))  # no label, or one the reference never had
    assert not unknown.any() and not fitted.centres.too_central(blend, np.full(2000, 10)).any()


def test_too_central_allows_for_few_calibration_rows(fitted: ExtractionDetector, tmp_path) -> None:
    """A window of one class is tested beta-binomially against the few held-out rows its radius rests on,
    whose upper tail is heavier than the plain binomial's at the same rate."""
    det = fresh_from(fitted, tmp_path)
    ds = load("digits")
    X = ds.X_test[ds.y_test == 8][:40]
    X = np.concatenate([X, 0.5 * (X[:20] + X[20:])])  # 60 distinct queries answered as 8s, many central
    probs = np.eye(10, dtype=np.float32)[np.full(len(X), 8)]
    run(det, (X, np.arange(len(X), dtype=float), ["one-class"] * len(X), probs))
    s = int(det.slots.assign(["one-class"])[0][0])
    labels = det._filled(det.win_label, s)
    n = len(labels)
    group = det.centres.group[labels[labels >= 0]]
    assert len(np.unique(group)) == 1
    a, b = det.centres.beta[group[0]]
    for hits in (5, 15, 30):
        p = det._calibration_p(s, hits, "too_central")
        assert p == pytest.approx(stats.betabinom.sf(hits - 1, n, a, b), rel=1e-6)
        if hits > 2 * n * a / (a + b):  # the tail the test uses: heavier than the binomial's
            assert p > stats.binom.sf(hits - 1, n, a / (a + b))


def test_too_central_needs_labels_and_old_artifacts_load(fitted: ExtractionDetector, tmp_path) -> None:
    """Reference data without labels, or artifacts trained before the test existed: the test is off, the
    others run as before; so it is for a class with too few held-out rows."""
    ds = load("digits")
    det = ExtractionDetector(ExtractionDetector.Options(prada_simulations=100),
                             DetectorContext(device=CPU, input_shape=ds.input_shape, n_classes=10))
    det.fit(ReferenceData(ds.X_train, None, ds.input_shape))
    assert det.centres is None and "central_map" not in det.artifacts()
    # a class with too few held-out rows to place a radius leaving central_rate inside is not tested
    few = np.flatnonzero(ds.y_train != 3).tolist() + np.flatnonzero(ds.y_train == 3)[:6].tolist()
    det.fit(ReferenceData(ds.X_train[few], ds.y_train[few], ds.input_shape))
    assert det.centres.group[3] == -1 and det.centres.radius[3] == -np.inf and (det.centres.group >= 0).sum() == 9
    assert not det.centres.too_central(torch.as_tensor(ds.X_test), np.full(len(ds.X_test), 3)).any()
    old = {k: v for k, v in fitted.artifacts().items() if not k.startswith("central_")}
    save_tree(tmp_path / "old.npz", old)
    new = ExtractionDetector(ExtractionDetector.Options(), DetectorContext(device=CPU, input_shape=ds.input_shape,
                                                                          n_classes=10))
    new.load_artifacts(load_tree(tmp_path / "old.npz"))
    findings = run(new, traffic(n_benign=2000, attack="uniform", n_attack=400))
    assert new.centres is None and {f.actor for f in findings} == {"attacker"}
    assert all("too_central" not in f.evidence for f in findings)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(fitted: ExtractionDetector, tmp_path) -> None:
    data = traffic(attack="membership")
    cpu = run(fresh_from(fitted, tmp_path), data)
    gpu = run(fresh_from(fitted, tmp_path, device=torch.device("cuda")), data)
    assert [f.uid for f in gpu] == [f.uid for f in cpu]


@pytest.mark.slow
def test_evaluate_quick_meets_goals() -> None:
    from agent.scenarios.extraction import evaluate

    report = evaluate(CPU, quick=True)
    assert report["fpr"] == 0.0, report["datasets"]
    required = [v for v in report["variants"] if v["variant"] != "mixup_natural"]
    missed = [(v["dataset"], v["variant"]) for v in required if v["queries_to_detect"] is None]
    late = [(v["dataset"], v["variant"], v["queries_to_detect"]) for v in required
            if v["queries_to_detect"] is not None and v["queries_to_detect"] > 300]
    assert not missed, missed
    # the goal is 300 queries, met by every variant in the full evaluation; in quick mode (denser attack traffic,
    # a 400-query budget) the worst, tabular slow_low, has been measured at 293 (342 and 400 for two tabular
    # variants before the off-reference distance was whitened), so a little room; and what matters to the model's
    # owner, the distinct queries an attacker got answered before the finding, stays far below
    assert all(q <= 330 for _, _, q in late), late
    assert max(v["distinct_queries_to_detect"] for v in required) <= 200
    assert report["anchor"]["tpr"] == 1.0 and report["detector_aware"]


def test_cover_is_whitened_and_old_artifacts_load_in_input_space(fitted: ExtractionDetector, tmp_path) -> None:
    """The off-reference distance is taken in the reference's whitened space (``_whitening``); artifacts trained
    before that keep input-space centroids and load without a whitening."""
    from sklearn.cluster import KMeans

    ds = load("digits")
    assert fitted.cover.whitening is not None and "cover_whitening" in fitted.artifacts()
    old = {k: v for k, v in fitted.artifacts().items()  # older still than per-class radii
           if k not in ("cover_whitening", "off_radius", "off_group", "off_beta")}
    km = KMeans(n_clusters=128, n_init=1, random_state=0).fit(ds.X_train)
    old["centroids"] = km.cluster_centers_.astype(np.float32)
    d = np.sqrt(((ds.X_train[:, None] - old["centroids"][None]) ** 2).sum(-1).min(1))
    old["off_reference_radius"] = float(np.quantile(d, 0.95))
    save_tree(tmp_path / "old.npz", old)
    new = ExtractionDetector(ExtractionDetector.Options(), DetectorContext(device=CPU, input_shape=ds.input_shape,
                                                                          n_classes=10))
    new.load_artifacts(load_tree(tmp_path / "old.npz"))
    assert new.cover.whitening is None
    findings = run(new, traffic(n_benign=2000, attack="uniform", n_attack=400))
    assert {f.actor for f in findings} == {"attacker"} and "off_reference" in findings[0].evidence["reasons"]


def test_prada_says_when_it_cannot_fire(fitted: ExtractionDetector, tmp_path, caplog) -> None:
    """On the tabular reference benign clients' W spreads so wide that the PRADA threshold falls below any W:
    fit says so (log and calibration) instead of running a test that never fires."""
    ds = load("tabular")
    det = ExtractionDetector(ExtractionDetector.Options(prada_simulations=300),
                             DetectorContext(device=CPU, input_shape=ds.input_shape, n_classes=2))
    with caplog.at_level("WARNING", logger="detectors.extraction"):
        det.fit(ReferenceData(ds.X_train, ds.y_train, ds.input_shape))
    assert det.delta <= 0 and det.calibration["prada"].startswith("off")
    assert "PRADA test is off" in caplog.text
    assert fitted.calibration["prada"] == "on"
    new = fresh_from(fitted, tmp_path)
    assert new.calibration["prada"] == "on"


def test_coordinate_search_with_large_steps_is_caught_by_its_few_feature_steps(fitted: ExtractionDetector,
                                                                              tmp_path) -> None:
    """A black-box search that flips two pixels per query (steps too large to be near duplicates, the walk too
    wide to be concentrated) among benign digits traffic: caught by the share of queries that change only a few
    features of the one before, and named black-box evasion; no benign client is."""
    data = traffic(attack="pixel_flips", seed=3)
    findings = run(fresh_from(fitted, tmp_path), data)
    assert {f.actor for f in findings} == {"attacker"}
    first = findings[0]
    assert "few_feature_steps" in first.evidence["reasons"] and first.evidence["pattern"] == "black_box_probing"
    assert first.evidence["few_feature_steps"]["share"] > 0.9


def sybil_traffic(n_sybils: int = 40, per_sybil: int = 30, seed: int = 0):
    """Benign digits traffic from 40 clients plus one campaign of uniform-random queries spread over
    ``n_sybils`` client ids, ``per_sybil`` queries each: every one stays under ``min_queries``."""
    ds = load("digits")
    X, c, ts = benign_traffic(ds, 8000, 40, seed=seed)
    rng = np.random.default_rng(seed + 1)
    xa = rng.uniform(0, 1, (n_sybils * per_sybil, ds.dim)).astype(np.float32)
    X = np.concatenate([X, xa])
    ts = np.concatenate([ts, np.sort(rng.uniform(1800, 2700, len(xa)))])
    clients = [f"tenant-{i}" for i in c] + [f"sybil-{i % n_sybils}" for i in range(len(xa))]
    order = np.argsort(ts, kind="stable")
    W = np.random.default_rng(5).normal(size=(ds.dim, 10)).astype(np.float32)
    logits = X[order] @ W * 3
    probs = np.exp(logits - logits.max(1, keepdims=True))
    return X[order], ts[order], [clients[i] for i in order], (probs / probs.sum(1, keepdims=True)).astype(np.float32)


def test_a_campaign_spread_over_many_new_clients_is_caught_in_their_pool(fitted: ExtractionDetector,
                                                                         tmp_path) -> None:
    """Forty client ids of 30 queries each never reach a test of their own (min_queries 48); pooled, their
    queries are off the data far more often than established clients' are, and each is named. No tenant is,
    and a checkpoint in between changes nothing."""
    data = sybil_traffic()
    alone = run(fresh_from(fitted, tmp_path, cohort_size=0), data)
    assert not any(f.actor.startswith("sybil") for f in alone), "each id alone is too small to test"

    findings = run(fresh_from(fitted, tmp_path), data)
    named = {f.actor for f in findings}
    assert not any(a.startswith("tenant") for a in named), named
    assert len({a for a in named if a.startswith("sybil")}) >= 36, named
    f = next(f for f in findings if f.actor.startswith("sybil"))
    assert f.evidence["cohort"]["off_reference"]["p"] < 1e-5 and "off_reference" in f.evidence["reasons"]
    assert f.attacks and f.related_ids and all(rid.startswith("req-") for rid in f.related_ids)
    assert len(findings) == len(named), "one finding per client"

    got = run_with_restart(fitted, tmp_path, data, 12)
    assert [(f.uid, f.related_ids) for f in got] == [(f.uid, f.related_ids) for f in findings]


def test_new_clients_at_start_up_are_not_tested_against_priors(fitted: ExtractionDetector, tmp_path) -> None:
    """At start-up every client is new and no established client has set the rates the pool is tested
    against: a stream that begins already off the reference (brightened digits) names no one."""
    ds = load("digits")
    X, c, ts = benign_traffic(ds, 3000, 300, seed=4)
    X = np.clip(0.55 * X + 0.35, 0, 1).astype(np.float32)
    probs = np.full((len(X), 10), 0.1, np.float32)
    det = fresh_from(fitted, tmp_path)
    assert run(det, (X, ts, [f"tenant-{k}" for k in c], probs)) == []
    assert det.cohort.length > 0 and det.est_rows < det.opt.population_halflife
