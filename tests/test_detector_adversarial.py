"""adversarial: attacks are real, the detector separates clean from attacked inputs, findings and checkpoints."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from agent.model import WatchedModel, train_classifier
from agent.records import InferenceBatch
from agent.reference import ReferenceData
from agent.scenarios import data
from agent.scenarios.data import split_for_deployment
from agent.state import load_tree, save_tree
from detectors import _attacks as attacks
from detectors.adversarial import BLACK_BOX, WHITE_BOX, AdversarialDetector
from detectors.base import DetectorContext


@pytest.fixture(scope="module")
def digits() -> data.Dataset:
    return data.load("digits")


@pytest.fixture(scope="module")
def split(digits: data.Dataset) -> tuple[np.ndarray, ...]:
    """As deployed: the model trains on one part of X_train, the detector's reference is the other."""
    return split_for_deployment(digits)


@pytest.fixture(scope="module")
def model(digits: data.Dataset, split) -> WatchedModel:
    torch.set_num_threads(1)
    m = train_classifier(split[0], split[1], digits.input_shape, torch.device("cpu"), epochs=60)
    m.is_surrogate = False  # the team's own model; the surrogate case has its own test
    for p in m.module.parameters():
        p.requires_grad_(False)
    return m


@pytest.fixture(scope="module")
def artifacts(digits: data.Dataset, model: WatchedModel, split) -> dict:
    det = make(digits, model)
    det.fit(ReferenceData(split[2], split[3], digits.input_shape))
    return det.artifacts()


def make(ds: data.Dataset, model: WatchedModel, **options) -> AdversarialDetector:
    return AdversarialDetector(AdversarialDetector.Options(**options),
                               DetectorContext(model.device, ds.input_shape, ds.n_classes, model))


def fitted(ds, model, artifacts, **options) -> AdversarialDetector:
    det = make(ds, model, **options)
    det.load_artifacts(artifacts)
    return det


@pytest.fixture(scope="module")
def pgd(digits, model) -> np.ndarray:
    """Successful PGD-L∞ (eps 0.2) adversarials of correctly classified test rows."""
    x = torch.as_tensor(digits.X_test)
    y = torch.as_tensor(digits.y_test)
    adv = attacks.pgd_linf(model.logits, x, y, 0.2, 0.0, 1.0, steps=40, seed=3)
    ok = (model.logits(adv).argmax(1) != y) & (model.logits(x).argmax(1) == y)
    return adv[ok].numpy()


def batch_of(X: np.ndarray, model: WatchedModel, clients: list[str], start_ts: float = 0.0,
             prefix: str = "r", seconds_per_record: float = 0.5) -> InferenceBatch:
    probs = model.predict_proba(X)
    n = len(X)
    return InferenceBatch(ids=tuple(f"{prefix}{i}" for i in range(n)), ts=start_ts + np.arange(n) * seconds_per_record,
                          models=("digits",) * n, model_versions=(None,) * n, clients=tuple(clients), X=X,
                          probs=probs, labels=probs.argmax(1).astype(np.int64))


# ------------------------------------------------------------------ attacks
def test_white_box_attacks_stay_in_budget_and_flip_labels(digits, model) -> None:
    x = torch.as_tensor(digits.X_test[:100])
    y = torch.as_tensor(digits.y_test[:100])
    fgsm = attacks.fgsm(model.logits, x, y, 0.1, 0.0, 1.0)
    assert (fgsm - x).abs().max() <= 0.1 + 1e-6 and fgsm.min() >= 0 and fgsm.max() <= 1
    l2 = attacks.pgd_l2(model.logits, x, y, 1.0, 0.0, 1.0, steps=20)
    assert (l2 - x).norm(dim=1).max() <= 1.0 + 1e-4
    linf = attacks.pgd_linf(model.logits, x, y, 0.2, 0.0, 1.0, steps=20)
    assert (model.logits(linf).argmax(1) != y).float().mean() > 0.9
    df = attacks.deepfool(model.logits, x, 0.0, 1.0)
    flipped = model.logits(df).argmax(1) != model.logits(x).argmax(1)
    assert flipped.float().mean() > 0.9
    assert (df - x).norm(dim=1)[flipped].mean() < (l2 - x).norm(dim=1).mean(), "DeepFool is minimal"
    cw = attacks.cw_l2(model.logits, x, y, 0.0, 1.0, steps=60)
    assert (model.logits(cw).argmax(1) != y).float().mean() > 0.8


def test_simba_uses_only_probabilities_one_query_at_a_time(digits, model) -> None:
    calls = []

    def query(X: np.ndarray) -> np.ndarray:
        calls.append(len(X))
        return model.predict_proba(X)

    adv, queries, owners = attacks.simba(query, digits.X_test[:5], digits.y_test[:5], 0.2, 0.0, 1.0, 400)
    assert sum(len(q) for q in queries) == sum(calls) - 0  # every query the model answered is replayable
    assert all(len(q) == len(o) for q, o in zip(queries, owners))
    assert (model.predict_proba(adv).argmax(1) != digits.y_test[:5]).mean() >= 0.6


# ---------------------------------------------------------------- detector
def test_calibrated_pvalues_separate_clean_from_pgd(digits, model, artifacts, pgd) -> None:
    det = fitted(digits, model, artifacts)
    clean_p = det.pvalues(digits.X_test, model.predict_proba(digits.X_test))
    adv_p = det.pvalues(pgd, model.predict_proba(pgd))
    fpr, tpr = float((clean_p <= 0.01).mean()), float((adv_p <= 0.01).mean())
    print(f"digits PGD-L∞ 0.2: TPR {tpr:.3f}, clean FPR {fpr:.3f}")
    assert tpr >= 0.95
    assert fpr <= 0.025  # 540 test rows, 629 calibration rows: the 1% threshold itself varies by about ±0.4%
    assert det.fit_report["adversarials"]["deepfool"] > 100
    assert det.fit_report["calibrated_with_twin_surrogate"] is False


def test_the_logistic_scorer_is_solved_to_its_penalised_optimum() -> None:
    """The scorer's objective (pos-weighted mean cross-entropy + l2/2 |w|^2, bias free) solved by L-BFGS matches
    scikit-learn's solution of the same problem. 400 Adam epochs, the earlier trainer, stopped 0.35 away from it in
    the largest weight here."""
    from sklearn.linear_model import LogisticRegression
    from torch import nn

    from detectors.adversarial import _scorer, _solve_logistic

    rng = np.random.default_rng(0)
    n_clean, n_adv, l2 = 1500, 600, 1e-4
    shift = np.r_[np.full(4, 1.5), np.zeros(15)]  # four telling features: the optimum's weights are large (~1.6)
    X = np.r_[rng.normal(0, 1, (n_clean, 19)), rng.normal(shift, 1.0, (n_adv, 19))].astype(np.float32)
    y = np.r_[np.zeros(n_clean), np.ones(n_adv)].astype(np.float32)
    pos_weight = n_clean / n_adv
    z, labels = torch.as_tensor(X), torch.as_tensor(y)
    scorer = _scorer(0)
    _solve_logistic(scorer[0], lambda: nn.functional.binary_cross_entropy_with_logits(
        scorer(z)[:, 0], labels, pos_weight=torch.tensor(pos_weight)), l2)
    # the same objective times n: sum of weighted losses + (n l2 / 2) |w|^2, i.e. C = 1 / (n l2)
    ref = LogisticRegression(C=1.0 / (len(y) * l2), tol=1e-10, max_iter=10_000).fit(
        X, y, sample_weight=np.where(y == 1, pos_weight, 1.0))
    np.testing.assert_allclose(scorer[0].weight.detach().numpy()[0], ref.coef_[0], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(scorer[0].bias.detach().numpy(), ref.intercept_, rtol=1e-3, atol=1e-4)


def test_the_scorer_penalty_is_the_one_with_the_smallest_cross_validated_loss(digits, model, split,
                                                                            artifacts) -> None:
    """`fit` tries each `scorer_l2` candidate on its folds and keeps the best (the fit report says which and
    why); a single candidate is used as given, without the search."""
    report = artifacts["fit_report"]["scorer"]
    assert set(report["cv_loss"]) == {"1e-05", "0.0001", "0.001", "0.01"}
    assert all(np.isfinite(v) and v > 0 for v in report["cv_loss"].values())
    assert report["l2"] == float(min(report["cv_loss"], key=report["cv_loss"].get))
    fixed = make(digits, model, scorer_l2=[0.01], folds=4)
    fixed.fit(ReferenceData(split[2][:200], split[3][:200], digits.input_shape))
    assert fixed.fit_report["scorer"] == {"l2": 0.01, "cv_loss": {}}
    with pytest.raises(ValueError, match="scorer_l2"):
        make(digits, model, scorer_l2=[0.0])


def test_surrogate_is_calibrated_through_a_twin_that_never_saw_the_calibration_rows(digits) -> None:
    """No --model: the surrogate trained on the whole reference; calibration must still see unseen rows."""
    torch.set_num_threads(1)
    surrogate = train_classifier(digits.X_train, digits.y_train, digits.input_shape, torch.device("cpu"))
    for p in surrogate.module.parameters():
        p.requires_grad_(False)
    det = make(digits, surrogate)
    det.fit(ReferenceData(digits.X_train, digits.y_train, digits.input_shape))
    assert det.fit_report["calibrated_with_twin_surrogate"] is True
    assert det._model() is surrogate, "the deployed surrogate scores at run time, not the twin"
    fpr = float((det.pvalues(digits.X_test, surrogate.predict_proba(digits.X_test)) <= 0.01).mean())
    print(f"surrogate with twin calibration: clean FPR {fpr:.4f} on unseen rows")
    assert fpr <= 0.03


def test_per_record_and_one_campaign_finding(digits, model, artifacts, pgd) -> None:
    det = fitted(digits, model, artifacts)
    rng = np.random.default_rng(0)
    X = np.concatenate([digits.X_test[:300], pgd[:60]])
    clients = [f"tenant-{i % 40}" for i in range(300)] + ["mallory"] * 60
    order = rng.permutation(len(X))
    findings = det.update(batch_of(X[order], model, [clients[i] for i in order]), notes := {})
    assert notes["adv_score"].shape == (len(X),)
    records = [f for f in findings if f.title == "Adversarial example suspected"]
    campaigns = [f for f in findings if f.title.startswith("Client")]
    mallory = [f for f in records if f.actor == "mallory"]
    assert len(mallory) >= 57 and all(f.attacks == WHITE_BOX for f in mallory)
    assert [f.actor for f in campaigns] == ["mallory"]
    assert campaigns[0].family == "evasion" and len(campaigns[0].related_ids) >= 5
    # the same campaign continuing is not re-raised until its count doubles, and keeps its uid
    more = det.update(batch_of(pgd[60:70], model, ["mallory"] * 10, start_ts=200.0, prefix="s"), {})
    again = [f for f in more if f.title.startswith("Client")]
    assert again == [] or again[0].uid == campaigns[0].uid


def test_query_chains_are_attributed_to_black_box_optimisation(digits, model, artifacts) -> None:
    det = fitted(digits, model, artifacts)
    adv, queries, owners = attacks.simba(model.predict_proba, digits.X_test[:6], digits.y_test[:6], 0.2, 0.0,
                                         1.0, 500)
    chain = np.concatenate(queries)[np.argsort(np.concatenate(owners), kind="stable")]
    stream = np.concatenate([chain, adv])
    findings = []
    for i in range(0, len(stream), 512):
        part = stream[i : i + 512]
        findings += det.update(batch_of(part, model, ["prober"] * len(part), start_ts=i * 0.5, prefix=f"b{i}-"), {})
    flagged = [f for f in findings if f.actor == "prober"]
    assert flagged, "SimBA's final adversarials should be flagged"
    assert all(f.attacks == BLACK_BOX for f in flagged)


def test_state_round_trip_continues_a_campaign(digits, model, artifacts, pgd, tmp_path: Path) -> None:
    det = fitted(digits, model, artifacts)
    first = batch_of(np.concatenate([digits.X_test[:100], pgd[:3]]), model,
                     [f"t{i % 9}" for i in range(100)] + ["mallory"] * 3)
    assert not [f for f in det.update(first, {}) if f.title.startswith("Client")]
    save_tree(tmp_path / "art.npz", det.artifacts())
    save_tree(tmp_path / "state.npz", det.state_dict())
    twin = make(digits, model)
    twin.load_artifacts(load_tree(tmp_path / "art.npz"))
    twin.load_state_dict(load_tree(tmp_path / "state.npz"))
    second = batch_of(pgd[3:12], model, ["mallory"] * 9, start_ts=60.0, prefix="s")
    a = [(f.uid, f.title, f.related_ids) for f in det.update(second, {})]
    b = [(f.uid, f.title, f.related_ids) for f in twin.update(second, {})]
    assert a == b
    campaign = [ids for _, title, ids in b if title.startswith("Client")]
    assert len(campaign) == 1, "the campaign that spans the restart is raised once"
    assert {"r100", "r101", "r102"} <= set(campaign[0]), "records flagged before the restart are named"


def test_clients_are_bounded(digits, model, artifacts) -> None:
    det = fitted(digits, model, artifacts, max_clients=10)
    det.update(batch_of(digits.X_test[:50], model, [f"c{i}" for i in range(50)]), {})
    assert det.client_count == 10 and det.state_dict()["counters"]["evicted_clients"] == 40


def test_without_model_it_says_what_to_do(digits) -> None:
    det = AdversarialDetector(AdversarialDetector.Options(),
                              DetectorContext(torch.device("cpu"), digits.input_shape, digits.n_classes))
    with pytest.raises(RuntimeError, match="needs a model"):
        det.fit(ReferenceData(digits.X_train, digits.y_train, digits.input_shape))


def test_throughput_at_batch_512(digits, model, artifacts) -> None:
    det = fitted(digits, model, artifacts)
    X, clients, _ = data.benign_traffic(digits, 20_480, 300, seed=2)
    batches = [batch_of(X[i : i + 512], model, [f"c{c}" for c in clients[i : i + 512]], start_ts=i)
               for i in range(0, len(X), 512)]
    started = time.perf_counter()
    for b in batches:
        det.update(b, {})
    rate = len(X) / (time.perf_counter() - started)
    print(f"adversarial: {rate:,.0f} records/s at batch 512 (64 features, CPU)")
    assert rate > 50_000  # measured 280k-320k alone; CI shares 2 cores with other jobs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_fit_and_score(digits) -> None:
    dev = torch.device("cuda")
    m = train_classifier(digits.X_train, digits.y_train, digits.input_shape, dev, epochs=20)
    det = AdversarialDetector(AdversarialDetector.Options(), DetectorContext(dev, digits.input_shape, 10, m))
    det.fit(ReferenceData(digits.X_train, digits.y_train, digits.input_shape))
    x = torch.as_tensor(digits.X_test, device=dev)
    adv = attacks.pgd_linf(m.logits, x, torch.as_tensor(digits.y_test, device=dev), 0.2, 0.0, 1.0)
    assert (det.pvalues(adv.cpu().numpy()) <= 0.01).mean() > 0.9


@pytest.mark.slow
def test_evaluate_quick_meets_the_evasion_goals() -> None:
    from agent.scenarios import evasion

    report = evasion.evaluate(torch.device("cpu"), quick=True)
    digits_v = {v["variant"]: v for v in report["variants"] if v["data"] == "digits"}
    for name in ("fgsm", "pgd_linf", "pgd_linf_weak (held out)"):
        assert digits_v[name]["tpr"] >= 0.95, digits_v[name]
    # full mode: DeepFool 0.97 (0.79 before the log-margin feature and the boundary test), CW 0.94 (0.54);
    # these floors catch regressions, quick mode has about 55 seeds per variant
    assert digits_v["deepfool"]["tpr"] >= 0.85 and digits_v["cw_l2 (held out)"]["tpr"] >= 0.8
    assert digits_v["simba (held out, black-box)"]["campaign_attacks"] == list(BLACK_BOX)
    digits_r = next(d for d in report["datasets"] if d["data"] == "digits")
    assert digits_r["fpr_on_benign_the_model_gets_right"] <= 0.02
    assert report["fpr"] <= 0.02
    assert all(d["false_campaign_findings"] == 0 for d in report["datasets"])
    assert set(report["detector_aware"]) == {"digits", "tabular"}
    for v in report["variants"]:  # the class judge's view is there for every variant, and consistent
        assert 0.0 <= v["class_kept_share"] <= 1.0, v
        assert (v["tpr_class_kept"] is None) == (v["class_kept_share"] == 0.0), v


@pytest.mark.slow
def test_one_client_with_a_mild_natural_shift_gets_no_campaign() -> None:
    """The odd-client scenario (the known false alarm, README): a single client whose inputs are darker, of
    lower contrast or with some pixels scaled is not taken for an attacker; noise, rotation and blur still
    are (measured, not asserted: that is the limitation the scenario exists to show)."""
    from agent.scenarios import evasion

    odd = evasion.odd_clients("digits", 0)
    for shift in ("contrast x0.6", "scale 16 pixels x0.5", "brightness +0.15"):
        assert not odd[shift]["campaign"] and odd[shift]["flagged_share"] < 0.05, (shift, odd[shift])


def test_class_judge_keeps_small_perturbations_and_follows_rows_into_another_class(digits) -> None:
    """The eval's independent reading of a row's class: jittered test rows keep theirs; a test row moved
    most of the way onto a training row of another class is judged that class, whatever a model says."""
    from agent.scenarios import evasion

    judge = evasion.class_judge(digits)
    rng = np.random.default_rng(0)
    jittered = np.clip(digits.X_test + rng.normal(0, 0.03, digits.X_test.shape), 0, 1).astype(np.float32)
    assert (judge.predict(jittered) == digits.y_test).mean() > 0.95
    other = np.array([np.flatnonzero(digits.y_train != y)[0] for y in digits.y_test])
    moved = 0.2 * digits.X_test + 0.8 * digits.X_train[other]
    assert (judge.predict(moved) == digits.y_train[other]).mean() > 0.9


@pytest.mark.parametrize("seconds_per_record", [0.3, 1 / 700], ids=["slow-stream", "demo-rate"])
def test_global_drift_gives_one_aggregate_not_a_flood_and_attackers_still_stand_out(digits, model, artifacts,
                                                                                    seconds_per_record) -> None:
    """Brightness/contrast drift of every client's inputs (as in the demo), with two attackers during the drift.

    At the demo's 700 records/s, minutes of normal traffic dilute the time-decayed background rate, so it
    alone declared the shift only after seconds of flagged benign records (8 % of the drifted records)."""
    det = fitted(digits, model, artifacts)
    rng = np.random.default_rng(5)
    X, clients, _ = data.benign_traffic(digits, 12_000, 120, seed=9)
    X[4000:] = np.clip(0.6 * X[4000:] + 0.3, 0, 1)  # the whole stream moves at record 4000
    names = [f"tenant-{c}" for c in clients]
    seeds = digits.X_test[:200]  # the attackers' own inputs did not move with the benign stream (as in the demo)
    y = torch.as_tensor(model.predict_proba(seeds).argmax(1))
    adv = attacks.pgd_linf(model.logits, torch.as_tensor(seeds), y, 0.2, 0.0, 1.0, steps=40, seed=4)
    adv = adv[model.logits(adv).argmax(1) != y].numpy()[:160]
    at = np.sort(rng.choice(np.arange(5000, 12_000), len(adv), replace=False))
    X = np.insert(X, at - np.arange(len(adv)), adv, axis=0)
    is_adv = np.zeros(len(X), dtype=bool)
    is_adv[at] = True
    for k, i in enumerate(at):
        names.insert(i, f"mallory-{k % 2}")
    findings, raw_flagged = [], np.zeros(len(X), dtype=bool)
    for i in range(0, len(X), 512):
        part = X[i : i + 512]
        batch = batch_of(part, model, names[i : i + 512], start_ts=i * seconds_per_record, prefix=f"d{i}-",
                         seconds_per_record=seconds_per_record)
        findings += det.update(batch, notes := {})
        raw_flagged[i : i + len(part)] = notes["adv_score"] <= det.opts.fpr
    drifted_benign = ~is_adv & (np.arange(len(X)) >= 4000)
    print(f"raw flagged share of drifted benign: {raw_flagged[drifted_benign].mean():.3f}")
    assert raw_flagged[drifted_benign].mean() > 0.2, "the drift must look adversarial to the raw scorer"
    record = [f for f in findings if f.title == "Adversarial example suspected"]
    onset = 4000 * seconds_per_record
    benign_record = [f for f in record if f.actor.startswith("tenant-") and f.evidence["ts"] >= onset]
    shift = [f for f in findings if "global shift" in f.title]
    campaigns = {f.actor for f in findings if f.title.startswith("Client")}
    print(f"per-record findings on benign: {len(benign_record)} of {int(drifted_benign.sum())} drifted records; "
          f"shift findings {len(shift)}; campaigns {sorted(campaigns)}")
    assert len(shift) == 1
    assert len(benign_record) <= 0.015 * drifted_benign.sum()  # about `fpr`, against 20-100% raw
    assert {"mallory-0", "mallory-1"} <= campaigns
    assert len([c for c in campaigns if c.startswith("tenant-")]) <= 2
    mallory = [f for f in record if f.actor.startswith("mallory")]
    print(f"attackers' per-record findings: {len(mallory)} of {len(adv)}")
    assert len(mallory) >= 0.5 * len(adv)


def test_a_noise_shift_is_not_taken_for_attackers_whose_inputs_did_not_move(digits, model, artifacts) -> None:
    """Gaussian noise of 0.1 of the range on every client's inputs: each noisy row is nearer a clean reference row
    than any other noisy row, so "nearer the reference than the shifted traffic" alone kept 2,100 of 12,000 benign
    records flagged and gave 64 of 120 benign clients a campaign finding. Attackers whose inputs did not move are
    still found."""
    det = fitted(digits, model, artifacts)
    rng = np.random.default_rng(6)
    X, clients, _ = data.benign_traffic(digits, 12_000, 120, seed=10)
    X = np.clip(X + rng.normal(0, 0.1, X.shape), 0, 1).astype(np.float32)
    names = [f"tenant-{c}" for c in clients]
    seeds = torch.as_tensor(digits.X_test[:200])
    y = torch.as_tensor(model.predict_proba(digits.X_test[:200]).argmax(1))
    adv = attacks.pgd_linf(model.logits, seeds, y, 0.2, 0.0, 1.0, steps=40, seed=4)
    adv = adv[model.logits(adv).argmax(1) != y].numpy()[:160]
    at = np.sort(rng.choice(np.arange(2000, 12_000), len(adv), replace=False))
    X = np.insert(X, at - np.arange(len(adv)), adv, axis=0)
    for k, i in enumerate(at):
        names.insert(i, f"mallory-{k % 2}")
    findings = []
    for i in range(0, len(X), 512):
        findings += det.update(batch_of(X[i : i + 512], model, names[i : i + 512], start_ts=i * 0.1, prefix=f"n{i}-",
                                        seconds_per_record=0.1), {})
    record = [f for f in findings if f.title == "Adversarial example suspected"]
    benign_record = [f for f in record if f.actor.startswith("tenant-")]
    campaigns = {f.actor for f in findings if f.title.startswith("Client")}
    mallory = [f for f in record if f.actor.startswith("mallory")]
    print(f"noise shift: per-record findings on benign {len(benign_record)} of 12000; campaigns {sorted(campaigns)}; "
          f"attackers' per-record findings {len(mallory)} of {len(adv)}")
    assert any("global shift" in f.title for f in findings)
    assert len(benign_record) <= 0.04 * 12_000
    assert campaigns == {"mallory-0", "mallory-1"}
    assert len(mallory) >= 0.4 * len(adv)


def test_apart_from_shift_with_no_background_rows_in_the_batch() -> None:
    """Regression (seen in the demo): every row of a batch flagged, none left as background, must not crash."""
    from types import SimpleNamespace

    import numpy as np

    from detectors._shift_guard import ShiftGuard

    guard = ShiftGuard(fpr=0.01, factor=5.0, top_share=0.05, half_life_s=120.0, min_records=300, window=1024,
                       input_window=8, apart_quantile=0.1, dim=4)
    guard.inputs = np.random.default_rng(0).random((8, 4)).astype(np.float32)
    guard.inputs_fill = 8
    X = np.ones((5, 4), np.float32)
    reference = SimpleNamespace(knn_scale=np.ones(4, np.float32), knn_points=np.zeros((3, 4), np.float32))
    out = guard.apart(X, np.ones(5, bool), np.zeros(5, bool), reference)
    assert out.shape == (5,) and out.dtype == bool


@pytest.fixture(scope="module")
def deepfool_adv(digits, model) -> np.ndarray:
    """Successful DeepFool adversarials of correctly classified test rows: they stop on the boundary."""
    x = torch.as_tensor(digits.X_test)
    y = torch.as_tensor(digits.y_test)
    adv = attacks.deepfool(model.logits, x, 0.0, 1.0)
    ok = (model.logits(adv).argmax(1) != y) & (model.logits(x).argmax(1) == y)
    return adv[ok].numpy()


def test_log_margin_feature_lets_one_weight_flag_the_boundary(digits, model, artifacts, deepfool_adv) -> None:
    """Feature 12 (log logit margin) is why minimal-perturbation examples score high without a second test."""
    from detectors._adv_features import FEATURE_NAMES

    det = fitted(digits, model, artifacts)
    j = FEATURE_NAMES.index("log_logit_margin")
    assert det.spec.n_features == len(FEATURE_NAMES) == 19
    assert det.scorer[0].weight[0, j] < 0, "a smaller margin must push the score towards 'adversarial'"
    p = det.pvalues(deepfool_adv, model.predict_proba(deepfool_adv))
    print(f"digits DeepFool: TPR {(p <= 0.01).mean():.3f} over {len(p)}")
    assert (p <= 0.01).mean() >= 0.8


def test_detectors_saved_before_the_margin_feature_and_the_boundary_test_still_load(digits, model, artifacts) -> None:
    """Artifacts from a 12-feature detector (one calibrator, no n_features) score with their own features; their
    threshold is refitted from the calibration scores they kept, with the tail model of today's calibration."""
    from detectors._conformal import ConformalCalibrator, OrCalibrator

    old = {k: v for k, v in artifacts.items() if k != "boundary_test"}
    old["spec"] = {k: v for k, v in artifacts["spec"].items() if k != "n_features"}
    old["scorer"] = {"0.weight": artifacts["scorer"]["0.weight"][:, :12], "0.bias": artifacts["scorer"]["0.bias"]}
    old["feat_mean"], old["feat_std"] = artifacts["feat_mean"][:12], artifacts["feat_std"][:12]
    scores = np.linspace(-5, 5, 300)
    old["calibrator"] = ConformalCalibrator.fit(scores).to_tree()
    det = fitted(digits, model, old)
    assert det.spec.n_features == 12 and det.opts.boundary_test is False
    X = digits.X_test[:64]
    stats = det.statistics(X)
    assert stats.shape == (64, 1)
    np.testing.assert_array_equal(det.pvalues(X), OrCalibrator.fit(scores[:, None]).pvalues(stats))


def test_detectors_saved_with_the_joint_rank_calibration_load_with_a_refitted_threshold(digits, model,
                                                                                       artifacts) -> None:
    """Artifacts whose calibrator kept the calibration rows' statistics (the joint rank of the learned score and
    the margin, before the tail model) are recalibrated from those rows on load: same rows, today's p-values."""
    det = fitted(digits, model, artifacts)
    stats = np.asarray(det.calibrator.parts[0].sorted_scores)  # any clean-looking learned scores
    margins = np.asarray(det.calibrator.parts[1].sorted_scores)
    old = dict(artifacts)
    old["calibrator"] = {"parts": [], "stats": np.stack([stats, margins], axis=1)}
    again = fitted(digits, model, old)
    assert again.opts.boundary_test is True
    X = digits.X_test[:64]
    np.testing.assert_array_equal(again.pvalues(X), again._calibrator(old["calibrator"]["stats"]).pvalues(
        again.statistics(X)))
    assert again.calibrator.parts[1].tail_shape <= -1.0  # the margin test keeps its bounded tail


@pytest.mark.parametrize("n_old", [13, 15, 17])
def test_detectors_saved_before_the_hidden_layer_reformer_and_class_subspace_features_still_load(
        digits, model, artifacts, n_old: int) -> None:
    """Artifacts from a 13-feature detector (before the penultimate-layer statistics), a 15-feature one (before
    the reformer) or a 17-feature one (before the class subspaces) score with their own features, which are what
    they always were."""
    old = dict(artifacts)
    gone = ("class_means", "class_basis", "class_of_direction")
    gone += {13: ("hidden_whitening", "hidden_means", "reformer"), 15: ("reformer",), 17: ()}[n_old]
    old["spec"] = {k: v for k, v in artifacts["spec"].items() if k not in gone}
    old["spec"]["n_features"] = n_old
    old["scorer"] = {"0.weight": artifacts["scorer"]["0.weight"][:, :n_old], "0.bias": artifacts["scorer"]["0.bias"]}
    old["feat_mean"], old["feat_std"] = artifacts["feat_mean"][:n_old], artifacts["feat_std"][:n_old]
    det = fitted(digits, model, old)
    assert det.spec.n_features == n_old and det.spec.reformer == (n_old == 17)
    assert det.spec.class_means.size == 0
    assert (det.spec.hidden_whitening.size == 0) == (n_old == 13)
    X = torch.as_tensor(digits.X_test[:64])
    feats = det.extractor()(X)
    assert feats.shape == (64, n_old)
    new = fitted(digits, model, artifacts).extractor()(X)
    torch.testing.assert_close(feats, new[:, :n_old])


def test_class_subspace_features_are_each_class_s_projection_residual(digits, model, artifacts) -> None:
    """Features 17-18 computed for all classes at once equal, row by row, the residual of the input off its
    predicted class's own subspace (and the gap to the nearest class's), projected one class at a time."""
    from detectors._adv_features import FEATURE_NAMES

    det = fitted(digits, model, artifacts)
    spec = det.spec
    owner = spec.class_of_direction.astype(int)
    assert spec.class_means.shape == (10, 64) and set(owner) == set(range(10))
    X = digits.X_test[:200]
    xs = (X - spec.mean) / spec.std
    resid = np.stack([np.log1p((((xs - m) - ((xs - m) @ spec.class_basis[:, owner == c])
                                 @ spec.class_basis[:, owner == c].T) ** 2).sum(1))
                      for c, m in enumerate(spec.class_means)], axis=1)
    pred = model.predict_proba(X).argmax(1)
    feats = det.extractor()(torch.as_tensor(X)).numpy()
    j = FEATURE_NAMES.index("class_subspace_residual")
    np.testing.assert_allclose(feats[:, j], resid[np.arange(len(X)), pred], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(feats[:, j + 1], resid[np.arange(len(X)), pred] - resid.min(1), rtol=1e-4,
                               atol=1e-4)


def test_class_subspace_residual_rises_under_a_small_l2_attack(digits, model, split, artifacts) -> None:
    """PGD-L2 at half the eval's budget moves few directions and stays near the whole data's subspace, but its
    rows leave the subspace of the class they are now answered as; off (``class_subspace: 0``), 17-18 are 0."""
    from detectors._adv_features import FEATURE_NAMES

    x, y = torch.as_tensor(digits.X_test), torch.as_tensor(digits.y_test)
    adv = attacks.pgd_l2(model.logits, x, y, 0.75, 0.0, 1.0, steps=40)
    ok = (model.logits(adv).argmax(1) != y) & (model.logits(x).argmax(1) == y)
    j = FEATURE_NAMES.index("class_subspace_residual")
    det = fitted(digits, model, artifacts)
    clean = det.extractor()(x)[:, j].numpy()
    moved = det.extractor()(adv[ok])[:, j].numpy()
    print(f"class-subspace residual (log1p), median: clean {np.median(clean):.2f}, PGD-L2 0.75 {np.median(moved):.2f}")
    assert np.median(moved) > np.quantile(clean, 0.9)
    off = make(digits, model, class_subspace=0)
    off.fit(ReferenceData(split[2], split[3], digits.input_shape))
    assert (off.extractor()(adv[ok])[:, j : j + 2] == 0).all()


def test_an_input_equal_to_a_reference_row_is_not_flagged(digits, model, split, artifacts) -> None:
    """A record re-sent from the validation set is its own nearest reference row. Without a floor on feature 10 it
    sat at log(0), past anything the scorer trained on, and every reference row the statistics were fitted on was
    flagged (1.0 here, with the scorer's weight on the feature negative); now they are flagged like new rows."""
    from detectors._adv_features import FEATURE_NAMES

    det = fitted(digits, model, artifacts)
    j = FEATURE_NAMES.index("knn_distance")
    assert det.spec.knn_floor > 0
    reference = split[2]
    own = det.extractor()(torch.as_tensor(reference))[:, j].numpy()
    assert own.min() >= 0.5 * np.log(det.spec.knn_floor + 1e-6 * det.spec.knn_tau) - 1e-5
    flagged = float((det.pvalues(reference) <= det.opts.fpr).mean())
    new = float((det.pvalues(digits.X_test) <= det.opts.fpr).mean())
    print(f"flagged: reference rows {flagged:.4f}, new rows {new:.4f}")
    assert flagged <= 0.02
    old = dict(artifacts)
    old["spec"] = {k: v for k, v in artifacts["spec"].items() if k != "knn_floor"}
    assert fitted(digits, model, old).spec.knn_floor == 0.0  # detectors fitted before the floor keep their feature


def test_reformer_sees_what_the_projection_takes_back(digits, model, artifacts, pgd, deepfool_adv) -> None:
    """On by default: projecting onto the reference's principal subspace leaves clean answers alone and moves
    adversarial ones back (MagNet's reformer, linear); off, features 15-16 are the plain answer's."""
    from detectors._adv_features import FEATURE_NAMES

    j = FEATURE_NAMES.index("reformer_l1")
    det = fitted(digits, model, artifacts)
    assert det.spec.reformer
    clean = det.extractor()(torch.as_tensor(digits.X_test))
    adv = det.extractor()(torch.as_tensor(pgd))
    df = det.extractor()(torch.as_tensor(deepfool_adv))
    for name, f in (("clean", clean), ("PGD", adv), ("DeepFool", df)):
        print(f"reformer {name}: L1 quartiles {np.quantile(f[:, j].numpy(), [.25, .5, .75]).round(3)}, "
              f"p(pred) {np.quantile(f[:, j + 1].numpy(), [.25, .5, .75]).round(3)}")
    # DeepFool's flip lives off the subspace: projected, the predicted class loses most of its probability
    assert float(df[:, j].median()) > 0.3 > 0.05 > float(clean[:, j].quantile(0.75))
    assert float(df[:, j + 1].median()) < 0.5 < 0.95 < float(clean[:, j + 1].median())
    # strong PGD is robust to the projection (its perturbation is partly on the subspace): the other features
    # carry it, but its answer still moves more than clean answers do
    assert float(adv[:, j].median()) > 5 * float(clean[:, j].median())
    det.spec.reformer = False
    det._extractor = None
    off = det.extractor()(torch.as_tensor(pgd))
    assert (off[:, j] == 0).all()
    torch.testing.assert_close(off[:, j + 1], torch.as_tensor(model.predict_proba(pgd)).max(1).values)
    torch.testing.assert_close(off[:, :j], adv[:, :j])  # the other features do not depend on it


class _NoLinearHead(torch.nn.Module):
    """Logits that are not the output of a linear layer: there is no penultimate representation to read."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 3.0 * x.flatten(1)[:, :10]


class _SmallConvNet(torch.nn.Module):
    """A convolutional net ending in linear + softmax, as some teams export their models."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.head = torch.nn.Linear(4 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.head(torch.relu(self.conv(x.unsqueeze(1))).flatten(1)), dim=1)


def test_penultimate_view_reads_the_layer_before_the_logits(model, tmp_path: Path) -> None:
    """From an exported program (no hooks) and from a module in memory: same outputs, plus the layer before."""
    x = torch.rand(5, 64)
    model.save(tmp_path / "mlp.pt2")
    loaded = WatchedModel.load(tmp_path / "mlp.pt2", (8, 8), 10, torch.device("cpu"))
    for m in (model, loaded):
        logits, hidden = m.logits_and_hidden(x)
        torch.testing.assert_close(logits, m.logits(x))
        assert hidden.shape == (5, 128)
        last = model.module.net[-1]
        torch.testing.assert_close(hidden @ last.weight.T + last.bias, logits)  # it is the head's input
    conv = WatchedModel(_SmallConvNet().eval(), (8, 8), 10, torch.device("cpu"), False)
    conv.save(tmp_path / "conv.pt2")
    conv = WatchedModel.load(tmp_path / "conv.pt2", (8, 8), 10, torch.device("cpu"))
    probs, hidden = conv.logits_and_hidden(x)  # found through the softmax
    torch.testing.assert_close(probs, conv.logits(x))
    assert hidden.shape == (5, 4 * 6 * 6)
    headless = WatchedModel(_NoLinearHead(), (8, 8), 10, torch.device("cpu"), False)
    logits, hidden = headless.logits_and_hidden(x)
    assert hidden is None
    torch.testing.assert_close(logits, headless.logits(x))


def test_hidden_layer_features_are_constant_without_a_penultimate_layer(digits, split) -> None:
    """A model with no final linear layer still gets every other feature; the two hidden-layer ones are 0."""
    from detectors._adv_features import FEATURE_NAMES, FeatureExtractor, fit_spec

    headless = WatchedModel(_NoLinearHead(), (8, 8), 10, torch.device("cpu"), False)
    spec = fit_spec(split[2], (8, 8), headless.logits_and_hidden, torch.device("cpu"), 0, 0.1, 3, 0.95, 0)
    assert spec.hidden_whitening.size == 0
    feats = FeatureExtractor(spec, headless.logits_and_hidden, torch.device("cpu"))(torch.as_tensor(digits.X_test))
    for name in ("hidden_mahalanobis", "hidden_class_gap"):
        assert (feats[:, FEATURE_NAMES.index(name)] == 0).all()
    assert torch.isfinite(feats).all()


def test_hidden_layer_option_reads_the_model_s_representation(digits, model, split, artifacts, pgd) -> None:
    """On by default: clean rows sit near their predicted class in the penultimate layer and PGD examples further
    out, and a saved detector keeps reading that layer; off, features 13-14 are 0."""
    from detectors._adv_features import FEATURE_NAMES

    j = FEATURE_NAMES.index("hidden_mahalanobis")
    off = make(digits, model, hidden_layer=False)
    off.fit(ReferenceData(split[2], split[3], digits.input_shape))
    assert (off.extractor()(torch.as_tensor(pgd))[:, j : j + 2] == 0).all()
    det = fitted(digits, model, artifacts)
    assert det.spec.hidden_whitening.shape == (128, 128)
    clean = det.extractor()(torch.as_tensor(digits.X_test))[:, j]
    adv = det.extractor()(torch.as_tensor(pgd))[:, j]
    auroc = float((adv[:, None] > clean[None, :]).double().mean())
    print(f"hidden Mahalanobis (log1p), median: clean {float(clean.median()):.2f}, PGD {float(adv.median()):.2f}; "
          f"AUROC {auroc:.3f}")
    assert float(adv.median()) > float(clean.median()) and auroc >= 0.6  # 0.66 measured; a layer of noise: 0.5
    again = fitted(digits, model, det.artifacts())
    np.testing.assert_array_equal(again.pvalues(pgd), det.pvalues(pgd))


def test_boundary_test_flags_minimal_perturbations_at_the_same_fpr(digits, model, split, deepfool_adv) -> None:
    det = make(digits, model, boundary_test=True)
    det.fit(ReferenceData(split[2], split[3], digits.input_shape))
    assert det.fit_report["boundary_test"] == "on"
    assert det.fit_report["threshold"] == "inside the calibration scores"  # 629 rows resolve half of 1 %
    stats = det.statistics(digits.X_test)
    assert stats.shape == (len(digits.X_test), 2)
    clean_p = det.pvalues(digits.X_test, model.predict_proba(digits.X_test))
    adv_p = det.pvalues(deepfool_adv, model.predict_proba(deepfool_adv))
    fpr, tpr = float((clean_p <= 0.01).mean()), float((adv_p <= 0.01).mean())
    print(f"boundary test on: DeepFool TPR {tpr:.3f}, clean FPR {fpr:.4f}")
    assert tpr >= 0.9
    assert fpr <= 0.025
    # the OR is calibrated as one test: a checkpoint round trip keeps it
    again = fitted(digits, model, det.artifacts())
    assert again.opts.boundary_test is True
    np.testing.assert_array_equal(again.pvalues(deepfool_adv), det.pvalues(deepfool_adv))


def test_boundary_test_stays_on_and_sharp_with_few_calibration_rows(digits, model, split, deepfool_adv,
                                                                   caplog) -> None:
    """A joint rank of two tests at fpr 0.01 needed 199 calibration rows and switched the boundary test off below;
    the tail-modelled halves resolve it on 100 rows, and DeepFool, which stops on the boundary, is caught."""
    few = ReferenceData(split[2][:100], split[3][:100], digits.input_shape)  # every row calibrates: 100 of them
    det = make(digits, model, boundary_test=True)
    with caplog.at_level(logging.WARNING, logger="detectors.adversarial"):
        det.fit(few)
    assert det.opts.boundary_test is True and det.fit_report["boundary_test"] == "on"
    # half of 1 % on 100 rows is past the largest calibration score: the user is told, with what would fix it
    assert det.fit_report["threshold"].startswith("extrapolated: 100 calibration rows put the 0.50% threshold")
    assert "199 reference rows would hold it inside" in caplog.text
    assert det.statistics(digits.X_test[:8]).shape == (8, 2)
    fpr = float((det.pvalues(digits.X_test) <= 0.01).mean())
    tpr = float((det.pvalues(deepfool_adv) <= 0.01).mean())
    print(f"100 calibration rows: DeepFool TPR {tpr:.3f}, clean FPR {fpr:.4f}")
    assert tpr >= 0.9 and fpr <= 0.025


def test_cross_fitting_keeps_every_detector_split_sharp_on_linf_attacks() -> None:
    """The detector seeds whose one three-way split left FGSM at 0.56-0.86 TPR (4, 7, 9): cross-fitted, each flags
    L∞ attacks at the calibrated threshold, at the same false-positive rate."""
    from agent.scenarios.evasion import seed_spread

    for row in seed_spread("digits", [4, 7, 9]):
        assert row["fpr"] <= 0.02, row
        assert row["fgsm"] >= 0.95 and row["pgd_linf"] >= 0.95, row
        assert row["deepfool"] >= 0.9 and row["cw_l2 (held out)"] >= 0.9, row


def test_neighbour_features_do_not_depend_on_the_chunking(digits, model, artifacts, pgd) -> None:
    """The kNN vote and distance are computed in chunks of rows that fit the cache; any chunk size, down to one
    row, gives what one pass over the whole batch gives, and the vote stays differentiable (adaptive attacks)."""
    det = fitted(digits, model, artifacts)
    ext = det.extractor()
    xk = torch.as_tensor(np.concatenate([digits.X_test[:300], pgd[:200]])) / ext.knn_scale
    whole_vote, whole_d2 = ext._neighbours(xk, chunk_elements=1 << 40)
    for chunk in (1, 7 * ext.knn_kernel.shape[1], 1 << 16):
        vote, d2 = ext._neighbours(xk, chunk_elements=chunk)
        torch.testing.assert_close(vote, whole_vote, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(d2, whole_d2, rtol=1e-4, atol=1e-4)  # |x|^2 - tau * max: float32 cancellation
    np.testing.assert_allclose(whole_vote.sum(1).numpy(), 1.0, rtol=1e-5)  # a distribution over classes
    x = xk[:20].clone().requires_grad_(True)
    ext._neighbours(x, chunk_elements=3 * ext.knn_kernel.shape[1])[0][:, 0].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("bfloat16", [True, False])
def test_neighbour_features_stay_close_to_exact_ones(digits, model, artifacts, pgd, monkeypatch, bfloat16) -> None:
    """The neighbour kernel's product runs in bfloat16 where the hardware has it, else in float32
    (``FeatureExtractor.__init__`` says why): either way the class vote and the nearest distance stay within
    rounding of the same features computed in float64, on clean rows and on adversarial ones alike (measured in
    bfloat16: votes within 0.003, distances within 0.4 % at the median)."""
    from detectors import _adv_features

    if bfloat16 and not _adv_features.native_bfloat16("cpu"):
        pytest.skip("this CPU has no native bfloat16: the float32 path is the one it runs")
    monkeypatch.setattr(_adv_features, "native_bfloat16", lambda device_type: bfloat16)
    det = fitted(digits, model, artifacts)
    ext = _adv_features.FeatureExtractor(det.spec, det.extractor().forward, torch.device("cpu"))
    assert ext.knn_dtype == (torch.bfloat16 if bfloat16 else torch.float32)
    xk = torch.as_tensor(np.concatenate([digits.X_test[:300], pgd[:200]])) / ext.knn_scale
    vote, d2 = ext._neighbours(xk)
    points = ext.knn_points.double()
    exact_d2 = torch.cdist(xk.double(), points).pow(2)
    exact_vote = torch.softmax(-exact_d2 / ext.spec.knn_tau, dim=1) @ ext.knn_onehot.double()
    nearest = exact_d2.amin(1)
    relative = (d2.double() - nearest).abs() / nearest
    tolerance = 1.0 if bfloat16 else 1e-3  # float32: within its own rounding
    assert (vote.double() - exact_vote).abs().max() < 0.01 * tolerance
    assert relative.median() < 0.01 * tolerance and relative.max() < 0.1 * tolerance, (relative.median(),
                                                                                         relative.max())


def test_every_reference_row_calibrates_and_unseen_rows_are_flagged_at_about_the_asked_rate() -> None:
    """Cross-conformal fit: on 30,000 rows of a reference draw's population that neither the model nor the
    detector saw, the OR flags about `fpr` (0.0096 and 0.0076 on
    these two draws; over ten draws 0.0042-0.0108, README "Every reference row calibrates")."""
    from agent.scenarios.calibration import calibration_check

    torch.set_num_threads(1)
    rows = calibration_check("synthetic", 600, [0, 1])
    for row in rows:
        print(row)
        assert 0.003 <= row["fpr"] <= 0.015, row
        assert row["learned test at 0.005"] <= 0.01 and row["boundary test at 0.005"] <= 0.01, row
    assert float(np.mean([r["fpr"] for r in rows])) <= 0.012


def test_neighbours_option_caps_the_rows_the_neighbour_features_read(digits, model, split) -> None:
    """The deployed statistics hold every reference row; `neighbours` caps how many the neighbour features (the
    detector's costliest per-record step) measure against, for deployments that must trade catch for speed."""
    ref = ReferenceData(split[2][:200], split[3][:200], digits.input_shape)
    capped, whole = make(digits, model, neighbours=50), make(digits, model)
    capped.fit(ref)
    whole.fit(ref)
    assert capped.spec.knn_points.shape[0] == 50
    assert whole.spec.knn_points.shape[0] == 200  # below the default cap: all of them
    assert capped.statistics(digits.X_test[:8]).shape == (8, 2)


def test_budget_sweep_measures_each_budget_and_norm_and_larger_budgets_are_caught_more() -> None:
    """``python -m agent.scenarios.evasion budgets``: a row for the benign test rows, then per budget a PGD-L2
    row and a PGD-L∞ row of the same radius over 8. A larger L2 budget moves rows further off the data, and
    the detector catches more of them (README's budget table: 0.28 at 0.5, 0.86 at 2.0)."""
    from agent.scenarios.evasion import budget_sweep

    rows = budget_sweep("digits", budgets=(0.5, 2.0))
    assert rows[0]["attack"] == "benign (unique test rows)" and rows[0]["tpr"] <= 0.02
    by = {r["attack"]: r for r in rows[1:]}
    assert set(by) == {"pgd_l2 0.5", "pgd_linf 0.0625", "pgd_l2 2", "pgd_linf 0.25"}
    for row in by.values():
        assert 0 < row["success_rate"] <= 1 and 0 <= row["tpr"] <= 1 and 0.5 <= row["auroc"] <= 1, row
        assert 0 <= row["class_kept_share"] <= 1, row
    assert by["pgd_l2 2"]["success_rate"] >= by["pgd_l2 0.5"]["success_rate"]
    assert by["pgd_l2 2"]["tpr"] >= by["pgd_l2 0.5"]["tpr"] + 0.3, (by["pgd_l2 0.5"], by["pgd_l2 2"])
