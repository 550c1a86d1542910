"""The delivery layer: spool, retries, ordering, restart, spool-full policies, dedup, rate limit.

The sink under test is the real webhook sink talking to the real local HTTP
receiver (``tests/http_receiver.py``); an outage is the receiver answering 503
or not listening at all.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.delivery import Aggregator, Delivery, DeliveryOptions, Spool, SpoolRecord, finding_from_dict, finding_to_dict
from agent.findings import Finding, Severity
from connectors.splunk_hec import SplunkHecOptions, SplunkHecSink
from connectors.webhook import WebhookOptions, WebhookSink
from tests.http_receiver import Receiver

FAST = {"retry_max_attempts": 2, "retry_initial_backoff_s": 0.005, "retry_max_backoff_s": 0.01,
        "drain_max_backoff_s": 0.05, "dedup_window_s": 0, "shutdown_timeout_s": 2}


def finding(i: int, severity: Severity = Severity.HIGH, actor: str | None = None, detector: str = "adv") -> Finding:
    return Finding(family="evasion", detector=detector, title=f"finding {i}", severity=severity,
                   actor=actor if actor is not None else f"client-{i}", model="m", related_ids=(f"req-{i}",),
                   window=f"w-{i}", evidence={"i": i}, attacks=("AML.T0015",), time_ms=1_763_877_600_000 + i)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r
    assert r.errors == []


def webhook(receiver: Receiver, name: str = "hook", **kw) -> WebhookSink:
    return WebhookSink(WebhookOptions(type="webhook", name=name, url=receiver.url + receiver.webhook_path, **kw))


def delivered_titles(receiver: Receiver) -> list[str]:
    return [f["finding_info"]["title"] for f in receiver.webhook_findings]


def wait_for(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_finding_round_trips_through_the_spool_format() -> None:
    f = Finding(family="drift", detector="ks", title="t\nx", severity=Severity.LOW, actor=None, model="m",
                related_ids=("a", "b"), window="w", evidence={"p": np.float32(0.25), "v": np.arange(3), "n": None},
                attacks=(), confidence=0.7, message="msg", analytic_type="learning")
    back = SpoolRecord.parse(SpoolRecord.encode(f).line).decode()
    assert back == Finding(**{**vars(f), "evidence": {"p": 0.25, "v": [0, 1, 2], "n": None}})
    assert finding_from_dict(json.loads(json.dumps(finding_to_dict(back)))) == back


def test_sink_down_spools_then_delivers_everything_once_in_order(receiver: Receiver, tmp_path: Path) -> None:
    d = Delivery([webhook(receiver)], DeliveryOptions(**FAST), tmp_path)
    try:
        receiver.outage_status = 503
        for batch in range(5):
            assert d.deliver([finding(batch * 10 + i) for i in range(10)]) is True  # durably spooled
        stats = d.stats()["sinks"]["hook"]
        assert stats["spool_records"] == 50 and stats["delivered"] == 0 and stats["export_failures"] >= 2
        receiver.outage_status = None
        assert d.flush(10) is True
        assert delivered_titles(receiver) == [f"finding {i}" for i in range(50)]
        assert d.stats()["sinks"]["hook"]["spool_records"] == 0
        assert list((tmp_path / "hook").glob("seg-*.log")) == []
    finally:
        d.shutdown()


def test_new_findings_queue_behind_the_spool_while_it_drains(receiver: Receiver, tmp_path: Path) -> None:
    d = Delivery([webhook(receiver)], DeliveryOptions(**{**FAST, "batch_size": 3}), tmp_path)
    try:
        receiver.stop()  # refused connections
        assert d.deliver([finding(i) for i in range(20)])
        receiver.start()
        for i in range(20, 40):  # arrive while the drain thread is sending the backlog
            assert d.deliver([finding(i)])
        assert d.flush(10)
        assert delivered_titles(receiver) == [f"finding {i}" for i in range(40)]
    finally:
        d.shutdown()


def test_transient_errors_are_retried_inside_deliver_without_spooling(tmp_path: Path) -> None:
    with Receiver() as splunk:
        sink = SplunkHecSink(SplunkHecOptions(url=splunk.url, token=splunk.hec_token, name="splunk"))
        d = Delivery([sink], DeliveryOptions(**{**FAST, "retry_max_attempts": 3}), tmp_path)
        try:
            splunk.script("/services/collector/event", 503, 429)
            assert d.deliver([finding(i) for i in range(3)])
            stats = d.stats()["sinks"]["splunk"]
            assert stats["spooled"] == 0 and stats["delivered"] == 3 and stats["export_failures"] == 2
            titles = [e["event"]["finding_info"]["title"] for e in splunk.hec_events]
            assert titles == [f"finding {i}" for i in range(3)]
        finally:
            d.shutdown()
        assert splunk.errors == []


def test_restart_picks_up_the_spool(receiver: Receiver, tmp_path: Path) -> None:
    receiver.outage_status = 503
    first = Delivery([webhook(receiver)], DeliveryOptions(**{**FAST, "shutdown_timeout_s": 0.1}), tmp_path)
    assert first.deliver([finding(i) for i in range(25)])
    first.shutdown()
    assert receiver.webhook_findings == [] and list((tmp_path / "hook").glob("seg-*.log"))
    receiver.outage_status = None
    second = Delivery([webhook(receiver)], DeliveryOptions(**FAST), tmp_path)
    try:
        assert second.flush(10)
        assert delivered_titles(receiver) == [f"finding {i}" for i in range(25)]
    finally:
        second.shutdown()


def test_partly_drained_spool_resumes_after_the_acknowledged_part(receiver: Receiver, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", max_bytes=1 << 20, segment_bytes=1 << 20)
    spool.append([SpoolRecord.encode(finding(i)) for i in range(10)])
    batch, position = spool.peek(4)
    assert [f.title for f in batch] == [f"finding {i}" for i in range(4)]
    spool.commit(position)
    spool.close()
    with open(next((tmp_path / "s").glob("seg-*.log")), "ab") as fh:  # a torn write from a crash
        fh.write(b"0badc0de 4 {\"trunc")
    reopened = Spool(tmp_path / "s", max_bytes=1 << 20, segment_bytes=1 << 20)
    assert reopened.records == 6
    rest, position = reopened.peek(100)
    assert [f.title for f in rest] == [f"finding {i}" for i in range(4, 10)]
    reopened.commit(position)
    assert reopened.empty and reopened.corrupt_records == 1


def test_segment_numbers_never_go_back_after_a_drained_restart(tmp_path: Path) -> None:
    """A drained spool's cursor points past its last segment; new segments must sort after it."""
    spool = Spool(tmp_path / "s", max_bytes=1 << 20, segment_bytes=1 << 20)
    spool.append([SpoolRecord.encode(finding(i)) for i in range(3)])
    spool.commit(spool.peek(10)[1])  # drained: segment deleted, cursor moved past it
    spool.close()
    again = Spool(tmp_path / "s", max_bytes=1 << 20, segment_bytes=1 << 20)
    again.append([SpoolRecord.encode(finding(i)) for i in range(3, 5)])
    again.close()  # a crash now: no cursor write after the append
    reopened = Spool(tmp_path / "s", max_bytes=1 << 20, segment_bytes=1 << 20)
    assert [f.title for f in reopened.peek(10)[0]] == ["finding 3", "finding 4"]


def test_full_spool_with_block_policy_pushes_back(receiver: Receiver, tmp_path: Path) -> None:
    receiver.outage_status = 503
    opts = DeliveryOptions(**{**FAST, "spool_max_bytes": 4096, "spool_segment_bytes": 1024})
    d = Delivery([webhook(receiver)], opts, tmp_path)
    try:
        accepted, i = [], 0
        while d.deliver([finding(i)]):
            accepted.append(i)
            i += 1
            assert i < 100, "the spool bound was never reached"
        assert d.stats()["sinks"]["hook"]["blocked"] == 1
        assert d.stats()["sinks"]["hook"]["spool_bytes"] <= 4096
        receiver.outage_status = None
        assert wait_for(lambda: d.deliver([finding(i)]))  # the pipeline's retry succeeds once it drains
        assert d.flush(10)
        assert delivered_titles(receiver) == [f"finding {j}" for j in [*accepted, i]]
    finally:
        d.shutdown()


def test_full_spool_drops_lowest_severity_first_and_counts(receiver: Receiver, tmp_path: Path) -> None:
    receiver.outage_status = 503
    opts = DeliveryOptions(**{**FAST, "spool_max_bytes": 8192, "spool_segment_bytes": 2048,
                              "spool_full_policy": "drop_lowest_severity"})
    d = Delivery([webhook(receiver)], opts, tmp_path)
    try:
        low = [finding(i, Severity.LOW) for i in range(40)]
        high = [finding(100 + i, Severity.CRITICAL) for i in range(20)]
        late_low = [finding(200 + i, Severity.LOW) for i in range(40)]  # fill the 10 % left, then dropped on arrival
        for f in low + high + late_low:
            assert d.deliver([f]) is True
        stats = d.stats()["sinks"]["hook"]
        assert stats["dropped"] > 0 and set(stats["dropped_by_severity"]) == {"Low"}
        assert stats["spool_bytes"] <= 8192
        receiver.outage_status = None
        assert d.flush(10)
        got = delivered_titles(receiver)
        assert [t for t in got if 100 <= int(t.split()[1]) < 200] == [f.title for f in high]  # every critical
        assert stats["dropped_by_severity"] == {"Low": stats["dropped"]}
        assert len(got) + stats["dropped"] == len(low) + len(high) + len(late_low)  # nothing vanished uncounted
        assert got == sorted(got, key=lambda t: int(t.split()[1]))  # still in order
    finally:
        d.shutdown()


def test_configuration_error_stops_the_sink_but_keeps_its_findings(receiver: Receiver, tmp_path: Path) -> None:
    receiver.webhook_secret = b"right"
    bad = webhook(receiver, name="bad", hmac_secret="wrong")
    good_receiver = Receiver().start()
    try:
        good = webhook(good_receiver, name="good")
        d = Delivery([bad, good], DeliveryOptions(**FAST), tmp_path)
        assert d.deliver([finding(1), finding(2)])
        assert d.deliver([finding(3)])
        stats = d.stats()["sinks"]
        assert "401" in stats["bad"]["disabled"] and stats["bad"]["spool_records"] == 3
        assert len(good_receiver.webhook_findings) == 3
        assert d.flush(0.2) is False  # the stopped sink's findings are not delivered
        d.shutdown()
        assert Spool(tmp_path / "bad", 1 << 20, 1 << 20).records == 3
    finally:
        good_receiver.stop()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_duplicates_within_the_window_become_one_aggregate(receiver: Receiver, tmp_path: Path) -> None:
    clock = FakeClock()
    d = Delivery([webhook(receiver)], DeliveryOptions(**{**FAST, "dedup_window_s": 60}), tmp_path,
                 wall_clock=clock)
    try:
        same = [finding(i, actor="mallory", severity=Severity.MEDIUM if i != 3 else Severity.HIGH)
                for i in range(6)]
        assert d.deliver(same[:1])
        assert d.deliver(same[1:])
        other = finding(99, actor="alice")
        assert d.deliver([other])
        assert delivered_titles(receiver) == ["finding 0", "finding 99"]
        assert d.stats()["deduplicated"] == 5
        clock.now += 61
        assert d.deliver([])
        assert wait_for(lambda: len(receiver.webhook_findings) == 3)
        agg = receiver.webhook_findings[2]
        assert agg["finding_info"]["title"] == "finding 5 (repeated 5x)"
        assert [e["uid"] for e in agg["finding_info"]["related_events"]] == [f"req-{i}" for i in range(1, 6)]
        assert agg["evidences"][0]["data"]["aggregated"]["count"] == 5
        assert agg["severity_id"] == int(Severity.HIGH) and agg["actor"]["user"]["uid"] == "mallory"
        clock.now += 1
        assert d.deliver([same[0]])  # a new window: the first one goes out again at once
        assert len(receiver.webhook_findings) == 4
    finally:
        d.shutdown()


def test_pending_aggregate_survives_a_crash(receiver: Receiver, tmp_path: Path) -> None:
    clock = FakeClock()
    opts = DeliveryOptions(**{**FAST, "dedup_window_s": 60})
    first = Delivery([webhook(receiver)], opts, tmp_path, wall_clock=clock)
    assert first.deliver([finding(i, actor="mallory") for i in range(4)])
    first._stop.set()  # a crash: no flush, no shutdown; the caller has committed its offsets
    second = Delivery([webhook(receiver)], opts, tmp_path, wall_clock=clock)
    try:
        assert second.flush(5)
        titles = delivered_titles(receiver)
        assert titles == ["finding 0", "finding 3 (repeated 3x)"]
    finally:
        second.shutdown()


def test_rate_limit_spools_the_excess_and_sends_it_later(receiver: Receiver, tmp_path: Path) -> None:
    opts = DeliveryOptions(**{**FAST, "rate_limit_per_s": 40, "rate_limit_burst": 5})
    d = Delivery([webhook(receiver)], opts, tmp_path)
    try:
        t0 = time.monotonic()
        assert d.deliver([finding(i) for i in range(25)])
        assert len(receiver.webhook_batches[0]) == 5  # the burst, sent at once; the rest waits for tokens
        assert d.stats()["rate_limited"] == 20
        assert d.flush(10)
        elapsed = time.monotonic() - t0
        assert delivered_titles(receiver) == [f"finding {i}" for i in range(25)]
        assert elapsed >= 20 / 40 * 0.9, f"20 findings over the burst went out in {elapsed:.2f}s at 40/s"
    finally:
        d.shutdown()


def test_min_severity_and_per_sink_overrides(receiver: Receiver, tmp_path: Path) -> None:
    opts = DeliveryOptions.model_validate({**FAST, "spool_max_bytes": "2MiB",
                                           "sinks": {"hook": {"spool_max_bytes": "1MiB"}}})
    assert opts.for_sink("hook").spool_max_bytes == 1 << 20
    assert opts.for_sink("hook").retry_max_attempts == 2
    assert opts.for_sink("other").spool_max_bytes == 2 << 20
    sink = WebhookSink(WebhookOptions(type="webhook", name="hook", url=receiver.url + receiver.webhook_path,
                                      min_severity="high"))
    d = Delivery([sink], opts, tmp_path)
    try:
        assert d.deliver([finding(1, Severity.LOW), finding(2, Severity.CRITICAL)])
        assert delivered_titles(receiver) == ["finding 2"]
    finally:
        d.shutdown()
    with pytest.raises(ValueError, match="no sink named nope"):
        Delivery([webhook(receiver)], DeliveryOptions(sinks={"nope": {}}), tmp_path / "x")
    with pytest.raises(ValueError, match="unique"):
        Delivery([webhook(receiver), webhook(receiver)], DeliveryOptions(), tmp_path / "y")
    with pytest.raises(ValueError, match="extra"):
        DeliveryOptions.model_validate({"spool_bytes": 5})


def test_flapping_sink_with_drops_loses_nothing_uncounted_and_never_duplicates(
        receiver: Receiver, tmp_path: Path) -> None:
    """The drain thread exports while deliver() drops and rewrites the spool: no duplicate, no crash."""
    opts = DeliveryOptions(**{**FAST, "spool_max_bytes": 16384, "spool_segment_bytes": 2048, "batch_size": 7,
                              "spool_full_policy": "drop_lowest_severity"})
    d = Delivery([webhook(receiver)], opts, tmp_path)
    stop = threading.Event()

    def flap() -> None:
        while not stop.is_set():
            receiver.outage_status = 503 if receiver.outage_status is None else None
            time.sleep(0.003)

    flapper = threading.Thread(target=flap)
    flapper.start()
    try:
        total = 300
        for i in range(total):
            assert d.deliver([finding(i, Severity.LOW if i % 3 else Severity.CRITICAL)])
        stop.set()
        flapper.join()
        receiver.outage_status = None
        assert d.flush(20)
        stats = d.stats()["sinks"]["hook"]
        titles = delivered_titles(receiver)
        assert len(titles) == len(set(titles)), "a finding was delivered twice"
        assert len(titles) + stats["dropped"] == total
        assert titles == sorted(titles, key=lambda t: int(t.split()[1]))
    finally:
        stop.set()
        d.shutdown()


def test_aggregator_uid_key_and_key_bound() -> None:
    by_uid = Aggregator(window_s=60, key="uid", max_keys=100, state_path=None)
    a, b = finding(1, actor="x"), finding(2, actor="x")  # same detector/actor/model, different windows
    assert by_uid.admit([a, b, a], now=0.0) == [a, b] and by_uid.deduplicated == 1
    bounded = Aggregator(window_s=60, key="detector_actor_model", max_keys=2, state_path=None)
    out = bounded.admit([finding(1, actor="p"), finding(2, actor="p"), finding(3, actor="q"),
                         finding(4, actor="r")], now=0.0)
    # a third key closes the oldest window early, and its merged finding goes out as an aggregate
    assert [f.title for f in out] == ["finding 1", "finding 3", "finding 4", "finding 2 (repeated 1x)"]
    assert len(bounded.windows) == 2


def test_failed_exports_are_reported_to_the_metrics_callback(tmp_path) -> None:
    """Every failed export attempt reaches on_failure (the inferwatch.sink.delivery.failures counter)."""
    from pathlib import Path as _Path

    from agent.delivery import Delivery, DeliveryOptions
    from agent.findings import Finding, Severity
    from connectors.jsonl_file import JsonlFileOptions, JsonlFileSink

    if not _Path("/dev/full").exists():
        import pytest

        pytest.skip("needs /dev/full")
    calls: list[tuple[str, int]] = []
    sink = JsonlFileSink(JsonlFileOptions(type="jsonl", name="full", path=_Path("/dev/full"), fsync=False))
    d = Delivery([sink], DeliveryOptions(retry_max_attempts=2, retry_initial_backoff_s=0.001,
                                         retry_max_backoff_s=0.001, shutdown_timeout_s=0.2), tmp_path / "spool",
                 on_failure=lambda name, n: calls.append((name, n)))
    f = Finding(family="drift", detector="drift_vae", title="t", severity=Severity.LOW, actor="a", model="m",
                related_ids=("r1",), window="w")
    try:
        assert d.deliver([f]) is True  # spooled, so the pipeline may commit
        assert calls[:2] == [("full", 1), ("full", 1)]
    finally:
        d.shutdown()


@pytest.mark.parametrize("policy", ["block", "drop_lowest_severity"])
def test_a_full_spool_shows_in_the_metrics(receiver: Receiver, tmp_path: Path, policy: str) -> None:
    """Issue 6: a spool that fills is never silent: usage reaches the limit, and what the policy did is counted."""
    from tests.test_telemetry import Memory

    receiver.outage_status = 503
    opts = DeliveryOptions(**{**FAST, "spool_max_bytes": 4096, "spool_segment_bytes": 1024,
                              "spool_full_policy": policy})
    d = Delivery([webhook(receiver)], opts, tmp_path)
    memory = Memory()
    memory.telemetry.observe_sink_stats(lambda: d.stats()["sinks"])
    try:
        hook = {"inferwatch.sink.name": "hook"}
        assert memory.value("inferwatch.sink.spool.usage", **hook) == 0
        assert memory.value("inferwatch.sink.spool.limit", **hook) == 4096
        for i in range(60):
            d.deliver([finding(i, Severity.LOW)])
        usage = memory.value("inferwatch.sink.spool.usage", **hook)
        assert 4096 - 1024 < usage <= 4096  # full, within one segment of the bound
        stats = d.stats()["sinks"]["hook"]
        if policy == "block":
            assert memory.value("inferwatch.sink.spool.refused", **hook) == stats["blocked"] > 0
        else:
            assert memory.value("inferwatch.sink.findings.dropped", **hook) == stats["dropped"] > 0
    finally:
        d.shutdown()
        memory.telemetry.shutdown()
        memory.meter_provider.shutdown()
