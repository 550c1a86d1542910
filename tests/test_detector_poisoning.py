"""Poisoning detector: logic, state round trip, devices and the family's goals."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from agent.model import train_classifier
from agent.records import FeedbackBatch
from agent.reference import ReferenceData
from agent.scenarios.data import load, split_for_deployment
from agent.scenarios.poisoning import Stream, _merge, _twins_of_honest_mistakes, benign_stream, poison, team_model
from agent.state import load_tree, save_tree
from detectors.base import DetectorContext
from detectors.poisoning import PoisoningDetector

torch.set_num_threads(1)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits():
    ds = load("digits")
    model = train_classifier(ds.X_train, ds.y_train, ds.input_shape, CPU, epochs=20)
    return ds, model


@pytest.fixture(scope="module")
def tabular():
    # trained long enough to be overconfident: it rejects honest confusions of ambiguous rows as
    # firmly as flips of clear-cut ones, so few labels pass the strict per-record threshold
    ds = load("tabular")
    model = train_classifier(ds.X_train, ds.y_train, ds.input_shape, CPU, epochs=40)
    return ds, model


def make(ds, model, device: torch.device = CPU, fit: bool = True, **options) -> PoisoningDetector:
    if device != model.device:
        model.module.to(device)
        model.device = device
    det = PoisoningDetector(PoisoningDetector.Options(**options),
                            DetectorContext(device=device, input_shape=ds.input_shape, n_classes=ds.n_classes,
                                            model=model))
    if fit:
        det.fit(ReferenceData(ds.X_train, ds.y_train, ds.input_shape))
    return det


def stream(ds, variant: str | None, seed: int = 0, n: int = 2500, share: float = 0.03):
    rng = np.random.default_rng(seed)
    s = benign_stream(ds, n, 40, rng)
    if variant:
        s = _merge(s, poison(ds, variant, int(share * n), rng, 40))
    return s


def feed(det, s, start: int = 0, stop: int | None = None, size: int = 256, flush: bool = True):
    out = []
    ids = [f"fb-{i}" for i in range(len(s.X))]
    for k, i in enumerate(range(0, len(ids), size)):
        if k < start or (stop is not None and k >= stop):
            continue
        sl = slice(i, i + size)
        n = len(ids[sl])
        out += det.update(FeedbackBatch(ids=tuple(ids[sl]), ts=s.ts[sl], models=("digits",) * n,
                                        sources=tuple(s.sources[sl]), X=s.X[sl], labels=s.y[sl]), {})
    if flush:
        out += det.flush()
    return out


def named(findings) -> set[str]:
    return {r for f in findings for r in f.related_ids}


def poisoned_ids(s) -> set[str]:
    return {f"fb-{i}" for i in np.flatnonzero(s.poisoned)}


def test_unfitted_detector_refuses(digits) -> None:
    ds, model = digits
    det = make(ds, model, fit=False)
    s = stream(ds, None, n=100)
    with pytest.raises(RuntimeError, match="not fitted"):
        feed(det, s)


def test_clean_feedback_with_honest_noise_is_quiet(digits) -> None:
    ds, model = digits
    det = make(ds, model)
    assert feed(det, stream(ds, None, seed=1)) == []


def test_compromised_source_is_named_with_its_records(digits) -> None:
    ds, model = digits
    s = stream(ds, "source_flip", seed=2)
    findings = feed(make(ds, model), s)
    assert findings and {f.actor for f in findings} == {"reviewer-compromised"}
    got, truth = named(findings), poisoned_ids(s)
    assert len(got & truth) / len(got) >= 0.9 and len(got & truth) / len(truth) >= 0.9
    f = findings[0]
    assert f.family == "poisoning" and f.attacks == ("AML.T0020",)
    assert f.evidence["records"] and {"score", "p_model_label", "knn_agreement"} <= set(f.evidence["records"][0])


def test_backdoor_trigger_found_with_its_pixels(digits) -> None:
    ds, model = digits
    s = stream(ds, "backdoor", seed=3, share=0.04)
    findings = feed(make(ds, model), s)
    back = [f for f in findings if f.evidence["kind"] == "backdoor"]
    assert back, [f.evidence["kind"] for f in findings]
    assert back[0].attacks[:2] == ("AML.T0018.000", "AML.T0043.004")
    trigger = back[0].evidence["trigger"]
    assert trigger["target_label"] == 0
    assert set(trigger["trigger_features"]) <= {54, 55, 62, 63}  # the 2x2 corner patch
    got, truth = named(findings), poisoned_ids(s)
    assert len(got & truth) / len(got) >= 0.9 and len(got & truth) / len(truth) >= 0.9


def test_thin_flips_on_two_classes_named_by_window_excess(tabular) -> None:
    """Random flips spread over 40 sources on a two-class set: no source is significant and few flips
    pass the strict threshold, but each window holds more implausible labels than honest mistakes
    explain, and its most implausible ones are named (without the excess test: recall 0.42 here)."""
    ds, model = tabular
    s = stream(ds, "random_flip", seed=1, n=6000)
    findings = feed(make(ds, model), s)
    got, truth = named(findings), poisoned_ids(s)
    assert len(got & truth) / len(truth) >= 0.6, len(got & truth) / len(truth)
    assert len(got & truth) / len(got) >= 0.8, len(got & truth) / len(got)
    excess = [f for f in findings if f.actor is None and "window_excess" in f.evidence]
    assert excess
    test = excess[0].evidence["window_excess"]
    assert test["p"] < 1e-3 and test["implausible"] > test["benign_expected"]
    assert test["benign_expected"] <= 0.1 * test["named"]


def test_clean_two_class_feedback_is_quiet(tabular) -> None:
    ds, model = tabular
    for seed in range(3):
        assert feed(make(ds, model), stream(ds, None, seed=seed, n=6000)) == []


def test_rank_null_is_a_survival_function(tabular) -> None:
    ds, model = tabular
    det = make(ds, model)
    t = np.linspace(0, 15, 61)
    null = det._rank_null(t)
    assert null[0] == pytest.approx(1.0) and np.all(np.diff(null) <= 1e-12) and null[-1] < 1e-3
    # the model's term is capped: a label the model rejects outright but the neighbours accept ranks low
    assert det._rank(np.array([1e-12]), np.array([1.0]))[0] < det._rank(np.array([1e-3]), np.array([0.0]))[0]


def test_uid_stable_per_source_window_kind(digits) -> None:
    ds, model = digits
    findings = feed(make(ds, model, reraise_every=3), stream(ds, "source_flip", seed=4))
    by_key: dict[tuple, set] = {}
    for f in findings:
        by_key.setdefault((f.actor, f.evidence["window_start"], f.evidence["kind"]), set()).add(f.uid)
    assert all(len(uids) == 1 for uids in by_key.values())
    assert len(findings) > len(by_key), "updates of a grown finding should have been re-raised"


def test_artifacts_and_state_round_trip(digits, tmp_path) -> None:
    ds, model = digits
    s = stream(ds, "source_flip", seed=5)
    straight = make(ds, model)
    expected = feed(straight, s)
    assert expected

    save_tree(tmp_path / "poisoning.npz", straight.artifacts())
    first = make(ds, model, fit=False)
    first.load_artifacts(load_tree(tmp_path / "poisoning.npz"))
    got = feed(first, s, stop=5, flush=False)
    save_tree(tmp_path / "state.npz", first.state_dict())
    resumed = make(ds, model, fit=False)
    resumed.load_artifacts(load_tree(tmp_path / "poisoning.npz"))
    resumed.load_state_dict(load_tree(tmp_path / "state.npz"))
    got += feed(resumed, s, start=5)
    assert [(f.uid, f.related_ids) for f in got] == [(f.uid, f.related_ids) for f in expected]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(digits) -> None:
    ds, model = digits
    s = stream(ds, "backdoor", seed=3, share=0.04)
    cpu = named(feed(make(ds, model), s))
    gpu = named(feed(make(ds, model, device=torch.device("cuda")), s))
    model.module.to(CPU)
    model.device = CPU
    assert len(cpu ^ gpu) <= 2  # float differences may move a record across the threshold


@pytest.mark.slow
def test_twins_of_honest_mistakes_need_the_same_input_and_label() -> None:
    """A flip is an honest mistake's twin only when both records carry the same input and the same label."""
    X = np.array([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [2.0, 3.0]], np.float32)
    y = np.array([1, 1, 0, 1])
    poisoned = np.array([False, True, True, True])
    honest = np.array([True, False, False, False])
    stream = Stream(X, y, ["a"] * 4, np.arange(4.0), poisoned, honest)
    assert _twins_of_honest_mistakes(stream).tolist() == [True, True, False, False]


def test_evaluate_quick_meets_goals() -> None:
    from agent.scenarios.poisoning import evaluate

    report = evaluate(CPU, quick=True)
    assert report["detected"]
    assert all(b["findings"] == 0 for b in report["benign_only"]), report["benign_only"]
    by = {(v["dataset"], v["variant"]): v for v in report["variants"]}
    # campaigns from one or a few sources, and backdoors on digits: the goal (>= 0.9 both ways)
    for key in [("digits", "source_flip"), ("digits", "backdoor"), ("digits", "pair_flip_source"),
                ("tabular", "source_flip"), ("tabular", "pair_flip_source")]:
        v = by[key]
        assert v["precision"] >= 0.9 and v["recall"] >= 0.9, v
    assert by[("digits", "backdoor")]["backdoor_named"] and by[("tabular", "backdoor")]["backdoor_named"]
    # flips spread thinly over all 40 sources: below the goal (see the report); guard against regressions
    for key in [("digits", "random_flip"), ("digits", "pair_flip")]:
        v = by[key]
        assert v["precision"] >= 0.8 and v["recall"] >= 0.8, v
    for v in report["variants"]:  # twins of honest mistakes are counted, and only poisoned records count
        assert 0.0 <= v["poisoned_twin_of_honest_mistake_share"] < 1.0, v
        if v["poisoned_twin_of_honest_mistake_share"] == 0.0:
            assert v["recall_without_honest_twins"] == pytest.approx(v["recall"]), v
    assert report["precision"] >= 0.9


def test_reference_the_model_trained_on_does_not_make_clean_feedback_suspect() -> None:
    """The model is right on all of its training rows, which are the reference, but on only ~88 % of new rows:
    thresholds and benign rates read off its training rows flagged clean feedback (17 findings in the scenario
    command). The twin's answers on rows it never saw put the benign rates where new feedback has them; a
    source flipping labels is still caught."""
    ds = load("synthetic")
    model = team_model(ds, CPU)
    s = stream(ds, None, seed=99, n=6000)
    assert feed(make(ds, model), s) == [] != feed(make(ds, model, unseen_rates=False), s)
    det = make(ds, model)
    seen = det.calibration["reference_seen_by_model"]
    assert seen["watched_model_errors"] == 0 and seen["p"] < 0.01 and det.weak_rate > 0.06
    s = _merge(benign_stream(ds, 6000, 40, np.random.default_rng(3)),
               poison(ds, "source_flip", 180, np.random.default_rng(4), 40))
    got, truth = named(feed(det, s)), poisoned_ids(s)
    assert len(got & truth) / len(truth) >= 0.9 and len(got & truth) / len(got) >= 0.9


def test_held_out_reference_keeps_the_options_rates(digits) -> None:
    """With reference rows the model never trained on, its own answers already say how it answers new rows:
    the twin is not better than it there, so nothing is added (a twin trained on fewer rows would only blunt
    the tests)."""
    ds, _ = digits
    X_model, y_model, X_ref, y_ref = split_for_deployment(ds, 0)
    model = train_classifier(X_model, y_model, ds.input_shape, CPU, epochs=40)
    det = PoisoningDetector(PoisoningDetector.Options(), DetectorContext(device=CPU, input_shape=ds.input_shape,
                                                                         n_classes=ds.n_classes, model=model))
    det.fit(ReferenceData(X_ref, y_ref, ds.input_shape))
    assert det.calibration["reference_seen_by_model"]["p"] >= 0.01
    assert det.strong_rate == det.opt.benign_flag_rate and det.weak_rate == det.opt.honest_error_rate


def test_positives_relabelled_negative_are_judged_by_the_negative_labels_threshold() -> None:
    """A fraud-like table (5 % positives) with a model that answers many positives wrong, some very surely: the
    weak threshold over all correct labels is set by those positives, far above any correct negative label. A
    source reporting positive cases as negative (fraud as legitimate) was never flagged; with a threshold per
    given label it is, and clean feedback stays quiet."""
    ds = load("imbalanced")
    X_model, y_model, X_ref, y_ref = split_for_deployment(ds, 0)
    model = team_model(replace(ds, X_train=X_model, y_train=y_model), CPU)
    ref = replace(ds, X_train=X_ref, y_train=y_ref)
    det = make(ref, model)
    assert det.weak_by_label[0] < det.clean_threshold / 2 and det.weak_by_label[1] == det.clean_threshold
    assert feed(det, stream(ref, None, seed=99, n=6000)) == []
    s = _merge(benign_stream(ref, 6000, 40, np.random.default_rng(3)),
               poison(ref, "pair_flip_source", 180, np.random.default_rng(4), 40))
    truth = poisoned_ids(s)
    got = named(feed(make(ref, model), s))
    before = named(feed(make(ref, model, label_min_rows=0), s))
    print(f"recall {len(got & truth) / len(truth):.3f} (one threshold: {len(before & truth) / len(truth):.3f}), "
          f"precision {len(got & truth) / len(got):.3f}")
    assert len(got & truth) / len(truth) >= 0.25 and len(got & truth) / len(got) >= 0.9
    assert len(before & truth) < len(got & truth) / 2
