"""One conformance suite that every registered sink must pass, against its real target.

Like river's ``check_estimator``: the sinks are found through
``connectors.sink.registry()``, and each needs a *target factory* here that
starts the real thing it talks to (rsyslog for syslog, the wire-format-checking
HTTP receiver for Splunk HEC / Elasticsearch / webhook, the session's broker
for the Kafka alert topic, a file for JSONL, captured stdout for stdout). A new
sink without a factory fails :func:`test_every_registered_sink_has_a_target`,
so no sink can skip the suite.

What the delivery layer (``agent/delivery.py``) relies on, checked per sink:

* ``Options`` rejects unknown keys (a typo must not silently turn a setting off);
* ``accepts`` honours ``min_severity``;
* ``export([])`` is SUCCESS and sends nothing;
* ``export(findings)`` is SUCCESS only once the target has exactly those
  findings, by uid, in order;
* ``force_flush()`` is True and ``reclaim()`` hands nothing back (a healthy
  target took everything); ``shutdown()`` is idempotent and nothing is
  delivered after it (OpenTelemetry's exporter rule: export after shutdown
  returns FAILURE);
* an unreachable target gives FAILURE or ``SinkConfigurationError`` within
  the configured timeout, never another exception and never a hang;
* secrets never appear in ``repr(options)`` nor in any log record.
"""

from __future__ import annotations

import io
import json
import logging
import re
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, TopicPartition
from pydantic import BaseModel, SecretStr, ValidationError

from agent.findings import Finding, Severity
from connectors.sink import ExportResult, Sink, SinkConfigurationError, registry
from tests.http_receiver import Receiver
from tests.rsyslog import Rsyslog, rsyslogd_path

HEC_TOKEN = "hec-secret-6d1f0c2a"
ELASTIC_KEY = "ZWxhc3RpYy1zZWNyZXQtOWI4Nw=="
WEBHOOK_BEARER = "Bearer webhook-secret-77a1"
WEBHOOK_HMAC = "hmac-secret-0e5c3b"
KAFKA_SASL_PASSWORD = "sasl-secret-41f2"
_EXTERNAL_ID = re.compile(rb"externalId=(iw-[0-9a-f]{32})")
_SECRET_NAME = re.compile(r"token|password|secret|api_key|apikey|credential|passphrase", re.IGNORECASE)


def findings(n: int = 5, family: str = "extraction") -> list[Finding]:
    """Distinct findings of every severity, with text that needs escaping in CEF/LEEF/JSON."""
    severities = list(Severity)
    return [
        Finding(family=family, detector="conformance", title=f"probe {i}: a=b|c\\d",
                severity=severities[i % len(severities)], actor=f"tenant-{i}", model="digits-cnn",
                related_ids=(f"req-{i}", f"req-{i + 100}"), window=f"w{i}", evidence={"queries": 100 + i},
                attacks=("AML.T0024.002",), time_ms=1_763_877_600_000 + i, message=f"line one\nline {i}")
        for i in range(n)
    ]


def closed_port() -> int:
    """A loopback TCP port nobody listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Unreachable:
    """Options that point a sink at a target that cannot take findings, and how long it may take to say so."""

    label: str
    options: dict[str, Any]
    max_seconds: float


@dataclass
class Target:
    """A running target and the sink options that reach it."""

    options: dict[str, Any]
    received: Callable[[int], list[str]]  # uids the target holds, in order; waits for up to N to arrive
    unreachable: list[Unreachable]
    secrets: list[str] = field(default_factory=list)  # secret values present in ``options``
    family: str = "extraction"  # findings of this family are what the sink takes


@dataclass
class Context:
    tmp_path: Path
    request: pytest.FixtureRequest
    stack: ExitStack
    capsys: pytest.CaptureFixture[str]


def _blackhole(stack: ExitStack) -> int:
    """A port that accepts TCP connections (kernel backlog) but never reads or answers."""
    server = stack.enter_context(socket.socket())
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    return server.getsockname()[1]


def _syslog_target(ctx: Context) -> Target:
    if rsyslogd_path() is None:
        pytest.skip("rsyslogd not installed: apt-get install -y rsyslog")
    rsyslog = ctx.stack.enter_context(Rsyslog(ctx.tmp_path, "tcp"))

    def received(expected: int) -> list[str]:
        deadline = time.monotonic() + 10
        while len(rsyslog.lines()) < expected and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # rsyslog writes asynchronously: give any extra message the time to show up
        return [m.group(1).decode() for line in rsyslog.lines() if (m := _EXTERNAL_ID.search(line))]

    return Target(
        options={"type": "syslog", "address": rsyslog.address, "protocol": "tcp", "format": "cef",
                 "timeout_s": 2.0},
        received=received,
        unreachable=[Unreachable("refused", {"type": "syslog", "address": f"127.0.0.1:{closed_port()}",
                                             "timeout_s": 1.0}, 3.0)],
    )


def _http_receiver(ctx: Context) -> Receiver:
    receiver = Receiver(hec_token=HEC_TOKEN, elastic_api_key=ELASTIC_KEY, webhook_secret=WEBHOOK_HMAC.encode())
    ctx.stack.callback(_no_wire_format_errors, receiver)
    ctx.stack.enter_context(receiver)
    return receiver


def _no_wire_format_errors(receiver: Receiver) -> None:
    assert receiver.errors == [], f"the receiver saw wire-format violations: {receiver.errors}"


def _http_unreachable(ctx: Context, base: dict[str, Any], path: str = "") -> list[Unreachable]:
    """Refused connection, and a server that accepts but never answers (the read must time out)."""
    return [
        Unreachable("refused", {**base, "url": f"http://127.0.0.1:{closed_port()}{path}", "timeout_s": 1.0}, 3.0),
        Unreachable("silent", {**base, "url": f"http://127.0.0.1:{_blackhole(ctx.stack)}{path}", "timeout_s": 1.0},
                    4.0),
    ]


def _splunk_target(ctx: Context) -> Target:
    receiver = _http_receiver(ctx)
    base = {"type": "splunk_hec", "token": HEC_TOKEN, "sourcetype": "inferwatch:ocsf"}
    return Target(
        options={**base, "url": receiver.url},
        received=lambda _n: [env["event"]["finding_info"]["uid"] for env in receiver.hec_events],
        unreachable=_http_unreachable(ctx, base),
        secrets=[HEC_TOKEN],
    )


def _elastic_target(ctx: Context) -> Target:
    receiver = _http_receiver(ctx)
    base = {"type": "elastic", "api_key": ELASTIC_KEY, "index": "inferwatch-findings"}
    return Target(
        options={**base, "url": receiver.url},
        received=lambda _n: list(receiver.es_docs),  # _id is the finding uid; dict keeps creation order
        unreachable=_http_unreachable(ctx, base),
        secrets=[ELASTIC_KEY],
    )


def _webhook_target(ctx: Context) -> Target:
    receiver = _http_receiver(ctx)
    base = {"type": "webhook", "headers": {"Authorization": WEBHOOK_BEARER}, "hmac_secret": WEBHOOK_HMAC}
    return Target(
        options={**base, "url": receiver.url + receiver.webhook_path},
        received=lambda _n: [f["finding_info"]["uid"] for f in receiver.webhook_findings],
        unreachable=_http_unreachable(ctx, base, receiver.webhook_path),
        secrets=[WEBHOOK_BEARER, WEBHOOK_HMAC],
    )


def _kafka_target(ctx: Context) -> Target:
    from tests.conftest import create_topic

    broker: str = ctx.request.getfixturevalue("broker")
    topic = ctx.request.getfixturevalue("topic_name") + ".findings"
    create_topic(broker, topic, partitions=1)  # one partition: the whole topic is in export order

    def received(expected: int) -> list[str]:
        consumer = KafkaConsumer(bootstrap_servers=broker, enable_auto_commit=False, consumer_timeout_ms=300)
        try:
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            consumer.seek_to_beginning(tp)
            out: list[str] = []
            deadline = time.monotonic() + (10 if expected else 1)
            while time.monotonic() < deadline:
                before = len(out)
                for batch in consumer.poll(timeout_ms=300).values():
                    out += [json.loads(r.value)["finding_info"]["uid"] for r in batch]
                if expected and len(out) >= expected and len(out) == before:
                    break  # all expected are in, and one more poll brought nothing extra
            return out
        finally:
            consumer.close()

    fast = {"max_block_s": 1.0, "delivery_timeout_s": 1.0}
    return Target(
        options={"type": "kafka", "topic": topic, "kafka": {"bootstrap_servers": broker}},
        received=received,
        unreachable=[
            Unreachable("refused", {"type": "kafka", "kafka": {"bootstrap_servers": f"127.0.0.1:{closed_port()}"},
                                    **fast}, 8.0),
            Unreachable("silent", {"type": "kafka",
                                   "kafka": {"bootstrap_servers": f"127.0.0.1:{_blackhole(ctx.stack)}"}, **fast},
                        8.0),
        ],
    )


def _jsonl_target(ctx: Context) -> Target:
    path = ctx.tmp_path / "out" / "findings.ocsf.jsonl"

    def received(_n: int) -> list[str]:
        if not path.exists():
            return []
        return [json.loads(line)["finding_info"]["uid"] for line in path.read_text().splitlines()]

    return Target(
        options={"type": "jsonl", "path": str(path)},
        received=received,
        # /dev/full: every write fails with ENOSPC, the honest stand-in for a full or broken disk
        unreachable=[Unreachable("disk full", {"type": "jsonl", "path": "/dev/full"}, 1.0)]
        if Path("/dev/full").exists() else [],
    )


def _stdout_target(ctx: Context) -> Target:
    seen: list[str] = []

    def received(_n: int) -> list[str]:
        seen.extend(json.loads(line)["finding_info"]["uid"]
                    for line in ctx.capsys.readouterr().out.splitlines() if line.startswith("{"))
        return list(seen)

    return Target(options={"type": "stdout", "format": "ocsf"}, received=received,
                  unreachable=[Unreachable("closed stdout", {"type": "stdout"}, 1.0)])


def _quarantine_target(ctx: Context) -> Target:
    path = ctx.tmp_path / "quarantine" / "poisoned.jsonl"

    def received(_n: int) -> list[str]:
        """Finding uids in order; the sink writes one line per record id, so each must come exactly twice."""
        if not path.exists():
            return []
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        uids = [line["finding_uid"] for line in lines]
        per_finding = {uid: sorted(line["id"] for line in lines if line["finding_uid"] == uid) for uid in uids}
        for uid, ids in per_finding.items():
            assert len(ids) == 2, f"quarantine lines of {uid}: {ids}; expected one per related record id"
        return list(dict.fromkeys(uids))

    return Target(
        options={"type": "quarantine", "path": str(path)},
        received=received,
        unreachable=[Unreachable("disk full", {"type": "quarantine", "path": "/dev/full"}, 1.0)]
        if Path("/dev/full").exists() else [],
        family="poisoning",
    )


TARGETS: dict[str, Callable[[Context], Target]] = {
    "quarantine": _quarantine_target,
    "syslog": _syslog_target,
    "splunk_hec": _splunk_target,
    "elastic": _elastic_target,
    "webhook": _webhook_target,
    "kafka": _kafka_target,
    "jsonl": _jsonl_target,
    "stdout": _stdout_target,
}
NEEDS_BROKER = {"kafka"}


def sink_types() -> list[Any]:
    """Every registered sink type; those needing the broker are marked integration."""
    return [pytest.param(name, marks=[pytest.mark.integration] if name in NEEDS_BROKER else [], id=name)
            for name in sorted(registry())]


def test_every_registered_sink_has_a_target() -> None:
    missing = sorted(set(registry()) - set(TARGETS))
    assert not missing, f"sinks without a conformance target in {__file__}: {missing}; add a factory to TARGETS"
    assert sorted(registry()) == sorted(TARGETS), "TARGETS names a sink type that is no longer registered"


@pytest.fixture(params=sink_types())
def case(request: pytest.FixtureRequest, tmp_path: Path,
         capsys: pytest.CaptureFixture[str]) -> Iterator[tuple[type[Sink], Target]]:
    kind: str = request.param
    with ExitStack() as stack:
        target = TARGETS[kind](Context(tmp_path, request, stack, capsys))
        yield registry()[kind], target


def _make(cls: type[Sink], options: dict[str, Any]) -> Sink:
    return cls(cls.Options.model_validate(options))


def test_options_reject_unknown_keys(case: tuple[type[Sink], Target]) -> None:
    cls, target = case
    cls.Options.model_validate(target.options)  # the target's own options are valid
    with pytest.raises(ValidationError) as raised:
        cls.Options.model_validate({**target.options, "min_severty": "high"})
    assert [e["type"] for e in raised.value.errors()] == ["extra_forbidden"]


def test_min_severity_filters_through_accepts(case: tuple[type[Sink], Target]) -> None:
    cls, target = case
    sink = _make(cls, {**target.options, "min_severity": "high"})
    try:
        by_severity = {f.severity: sink.accepts(f) for f in findings(5, target.family)}
    finally:
        sink.shutdown()
    assert by_severity == {Severity.INFORMATIONAL: False, Severity.LOW: False, Severity.MEDIUM: False,
                           Severity.HIGH: True, Severity.CRITICAL: True}


def test_export_delivers_exactly_those_findings_in_order(case: tuple[type[Sink], Target]) -> None:
    cls, target = case
    sink = _make(cls, target.options)
    batch = findings(5, target.family)
    try:
        assert sink.export([]) is ExportResult.SUCCESS
        assert target.received(0) == [], "export([]) must send nothing"
        assert sink.export(batch[:2]) is ExportResult.SUCCESS
        assert sink.export(batch[2:]) is ExportResult.SUCCESS
        assert target.received(len(batch)) == [f.uid for f in batch]
        assert sink.force_flush() is True
        assert sink.reclaim() == [], "a healthy target took everything: nothing to hand back"
    finally:
        sink.shutdown()


def test_shutdown_is_idempotent_and_nothing_is_delivered_afterwards(case: tuple[type[Sink], Target]) -> None:
    cls, target = case
    sink = _make(cls, target.options)
    first = findings(2, target.family)
    assert sink.export(first) is ExportResult.SUCCESS
    sink.shutdown()
    sink.shutdown()
    late = findings(4, target.family)[2:]
    try:
        result = sink.export(late)
    except SinkConfigurationError:
        result = ExportResult.FAILURE
    assert result is ExportResult.FAILURE, "export after shutdown() must not claim success"
    assert target.received(len(first)) == [f.uid for f in first]


def test_unreachable_target_fails_within_its_timeout(case: tuple[type[Sink], Target],
                                                     caplog: pytest.LogCaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    cls, target = case
    assert target.unreachable, "give this sink at least one unreachable target"
    caplog.set_level(logging.DEBUG)
    for bad in target.unreachable:
        if bad.label == "closed stdout":
            closed = io.StringIO()
            closed.close()
            monkeypatch.setattr(sys, "stdout", closed)
        sink = _make(cls, bad.options)
        started = time.monotonic()
        try:
            result = sink.export(findings(3, target.family))
        except SinkConfigurationError:
            result = ExportResult.FAILURE
        finally:
            elapsed = time.monotonic() - started
            sink.shutdown()
            monkeypatch.undo()
        assert result is ExportResult.FAILURE, f"{bad.label}: an undeliverable export must not be SUCCESS"
        assert elapsed <= bad.max_seconds, f"{bad.label}: export took {elapsed:.1f} s (limit {bad.max_seconds} s)"


def test_secrets_stay_out_of_repr_and_logs(case: tuple[type[Sink], Target],
                                           caplog: pytest.LogCaptureFixture) -> None:
    cls, target = case
    caplog.set_level(logging.DEBUG)
    configured = [cls.Options.model_validate(target.options)]
    configured += [cls.Options.model_validate(bad.options) for bad in target.unreachable
                   if bad.label != "closed stdout"]
    for options in configured:
        text = repr(options) + str(options) + repr(options.model_dump())
        for secret in target.secrets:
            assert secret not in text, f"secret {secret[:4]}... shows in repr/str/model_dump of {cls.__name__}"
    sink = cls(configured[0])
    try:
        sink.export(findings(2, target.family))
    finally:
        sink.shutdown()
    for bad in configured[1:]:
        failing = cls(bad)
        try:
            failing.export(findings(1, target.family))
        except SinkConfigurationError as error:
            logging.getLogger("conformance").warning("%s", error)  # what delivery logs
        finally:
            failing.shutdown()
    for secret in target.secrets:
        assert secret not in caplog.text, f"secret {secret[:4]}... was logged"


def _secret_like_fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted name, annotation) of every field, nested models included, whose name sounds secret."""
    out: list[tuple[str, Any]] = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        nested = [a for a in getattr(annotation, "__args__", (annotation,))
                  if isinstance(a, type) and issubclass(a, BaseModel)]
        for sub in nested:
            out += _secret_like_fields(sub, f"{prefix}{name}.")
        if _SECRET_NAME.search(name):
            out.append((prefix + name, annotation))
    return out


def _holds_secretstr(annotation: Any) -> bool:
    if annotation is SecretStr:
        return True
    return any(_holds_secretstr(a) for a in getattr(annotation, "__args__", ()))


@pytest.mark.parametrize("kind", sorted(registry()))
def test_secret_looking_options_are_secretstr(kind: str) -> None:
    """A token/password/secret field typed ``str`` would print in every repr and error message."""
    plain = [name for name, annotation in _secret_like_fields(registry()[kind].Options)
             if not _holds_secretstr(annotation)]
    assert not plain, f"{kind}: make these SecretStr so they never print: {plain}"


def test_kafka_sasl_password_is_masked() -> None:
    """The alert topic's SASL password (the only secret of the Kafka sink) never prints."""
    options = registry()["kafka"].Options.model_validate({
        "type": "kafka", "kafka": {"bootstrap_servers": "127.0.0.1:9092", "security_protocol": "SASL_SSL",
                                   "sasl_mechanism": "PLAIN", "sasl_username": "u",
                                   "sasl_password": KAFKA_SASL_PASSWORD}})
    assert KAFKA_SASL_PASSWORD not in repr(options) + str(options) + repr(options.model_dump())
