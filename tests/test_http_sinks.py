"""Splunk HEC, Elasticsearch, webhook and stdout sinks against a real local HTTP server.

``tests/http_receiver.py`` checks each request against the vendor's documented
wire format; every test also asserts that it found no violation.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
from collections.abc import Iterator

import pytest

from agent.findings import Finding, Severity
from connectors.elastic import ElasticOptions, ElasticSink
from connectors.sink import ExportResult, SinkConfigurationError
from connectors.splunk_hec import SplunkHecOptions, SplunkHecSink
from connectors.stdout import StdoutOptions, StdoutSink
from connectors.webhook import WebhookOptions, WebhookSink
from tests.http_receiver import Receiver


def make_finding(i: int, *, title: str | None = None, severity: Severity = Severity.HIGH,
                 actor: str = "tenant-7") -> Finding:
    return Finding(family="evasion", detector="adv-detector", title=title or f"adversarial input {i}",
                   severity=severity, actor=actor, model="digits-cnn", related_ids=(f"req-{i}",),
                   window=f"req-{i}", evidence={"score": 0.5 + i / 1000, "threshold": 0.4},
                   attacks=("AML.T0015",), time_ms=1_763_877_600_250 + i)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r
    assert r.errors == [], f"wire-format violations: {r.errors}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- Splunk HEC


def hec(receiver: Receiver, **kw) -> SplunkHecSink:
    return SplunkHecSink(SplunkHecOptions(url=receiver.url, token=receiver.hec_token, host="agent-1", **kw))


def test_hec_batch_is_concatenated_envelopes_with_ocsf_events(receiver: Receiver) -> None:
    sink = hec(receiver, index="security")
    findings = [make_finding(i) for i in range(3)]
    assert sink.export(findings) is ExportResult.SUCCESS
    (req,) = receiver.requests
    assert req.path == "/services/collector/event"
    assert req.headers["authorization"] == "Splunk hec-token-123"
    assert b"}{" in req.body and b"},{" not in req.body and b"\n" not in req.body
    assert [e["event"]["finding_info"]["uid"] for e in receiver.hec_events] == [f.uid for f in findings]
    env = receiver.hec_events[0]
    assert list(env) == ["time", "host", "source", "sourcetype", "index", "event"]
    assert env["time"] == 1_763_877_600.25 and env["host"] == "agent-1" and env["index"] == "security"
    assert env["event"]["class_uid"] == 2004 and env["event"]["actor"]["user"]["uid"] == "tenant-7"


def test_hec_throttling_and_busy_are_retryable_failures(receiver: Receiver) -> None:
    sink = hec(receiver)
    receiver.script("/services/collector/event", 429, 503)
    assert sink.export([make_finding(1)]) is ExportResult.FAILURE
    assert sink.export([make_finding(1)]) is ExportResult.FAILURE
    assert sink.export([make_finding(1)]) is ExportResult.SUCCESS
    assert len(receiver.hec_events) == 1


def test_hec_invalid_event_number_drops_the_bad_event_and_resends_the_rest(receiver: Receiver) -> None:
    receiver.hec_bad_event = lambda env: env["event"]["finding_info"]["title"].startswith("BAD")
    sink = hec(receiver)
    findings = [make_finding(i, title="BAD one" if i in (2, 4) else None) for i in range(6)]
    assert sink.export(findings) is ExportResult.SUCCESS
    delivered = [e["event"]["finding_info"]["uid"] for e in receiver.hec_events]
    assert delivered == [f.uid for i, f in enumerate(findings) if i not in (2, 4)]
    assert sink.counters["rejected_events"] == 2
    assert len(receiver.requests) == 3  # bad event 2, then bad event 4 (index 3 of the resend), then the rest


def test_hec_forbidden_token_is_a_configuration_error_without_leaking_it(
        receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    sink = SplunkHecSink(SplunkHecOptions(url=receiver.url, token="wrong-s3cret-token"))
    with caplog.at_level(logging.DEBUG), pytest.raises(SinkConfigurationError, match="403") as err:
        sink.export([make_finding(1)])
    assert "wrong-s3cret-token" not in str(err.value) + caplog.text
    assert "wrong-s3cret-token" not in repr(sink.options)


def test_hec_indexer_acknowledgement_is_polled_until_indexed(receiver: Receiver) -> None:
    receiver.hec_ack_after_polls = 3
    sink = hec(receiver, use_ack=True, ack_poll_interval_s=0.01)
    assert sink.export([make_finding(1), make_finding(2)]) is ExportResult.SUCCESS
    acks = [r for r in receiver.requests if r.path == "/services/collector/ack"]
    assert len(acks) == 3 and json.loads(acks[0].body) == {"acks": [0]}
    channel = receiver.requests[0].headers["x-splunk-request-channel"]
    assert all(r.headers["x-splunk-request-channel"] == channel for r in receiver.requests)


def test_hec_ack_timeout_is_a_failure(receiver: Receiver) -> None:
    receiver.hec_ack_after_polls = 10_000
    sink = hec(receiver, use_ack=True, ack_poll_interval_s=0.01, ack_timeout_s=0.1)
    assert sink.export([make_finding(1)]) is ExportResult.FAILURE


def test_connection_refused_is_a_failure() -> None:
    sink = SplunkHecSink(SplunkHecOptions(url=f"http://127.0.0.1:{free_port()}", token="t", timeout_s=2))
    assert sink.export([make_finding(1)]) is ExportResult.FAILURE


def test_http_options_validate_url_and_channel() -> None:
    with pytest.raises(ValueError, match="http:// or https://"):
        SplunkHecOptions(url="splunk:8088", token="t")
    with pytest.raises(ValueError, match="GUID"):
        SplunkHecOptions(url="https://splunk:8088", token="t", channel="not-a-guid")


# ---------------------------------------------------------------- Elasticsearch


def test_elastic_bulk_is_ndjson_create_actions_with_ecs_documents(receiver: Receiver) -> None:
    sink = ElasticSink(ElasticOptions(url=receiver.url, api_key=receiver.elastic_api_key, index="iw-alerts"))
    findings = [make_finding(i) for i in range(3)]
    assert sink.export(findings) is ExportResult.SUCCESS
    (req,) = receiver.requests
    assert req.headers["authorization"] == f"ApiKey {receiver.elastic_api_key}"
    assert req.body.endswith(b"\n") and req.body.count(b"\n") == 6
    first_action = req.body.split(b"\n")[0]
    assert first_action == b'{"create":{"_index":"iw-alerts","_id":"%s"}}' % findings[0].uid.encode()
    assert list(receiver.es_docs) == [f.uid for f in findings]
    doc = receiver.es_docs[findings[0].uid]
    assert doc["event"]["kind"] == "alert" and doc["threat"]["framework"] == "MITRE ATLAS"
    assert doc["@timestamp"] == "2025-11-23T06:00:00.250Z"


def test_elastic_basic_auth(receiver: Receiver) -> None:
    receiver.elastic_basic = ("inferwatch", "pa55")
    sink = ElasticSink(ElasticOptions(url=receiver.url, username="inferwatch", password="pa55"))
    assert sink.export([make_finding(1)]) is ExportResult.SUCCESS
    assert receiver.requests[0].headers["authorization"].startswith("Basic ")


def test_elastic_throttled_items_fail_the_call_and_the_resend_is_idempotent(receiver: Receiver) -> None:
    throttled = {"left": 1}

    def status(doc: dict) -> int:
        if doc["inferwatch"]["finding"]["title"] == "adversarial input 1" and throttled["left"]:
            throttled["left"] -= 1
            return 429
        return 201

    receiver.elastic_item_status = status
    sink = ElasticSink(ElasticOptions(url=receiver.url, api_key=receiver.elastic_api_key))
    findings = [make_finding(i) for i in range(3)]
    assert sink.export(findings) is ExportResult.FAILURE
    assert sink.export(findings) is ExportResult.SUCCESS  # 0 and 2 answer 409, 1 is created
    assert sorted(receiver.es_docs) == sorted(f.uid for f in findings)
    assert sink.counters["already_indexed"] == 2


def test_elastic_rejected_document_is_dropped_and_counted(receiver: Receiver) -> None:
    receiver.elastic_item_status = lambda doc: 400 if "BAD" in doc["inferwatch"]["finding"]["title"] else 201
    sink = ElasticSink(ElasticOptions(url=receiver.url, api_key=receiver.elastic_api_key))
    findings = [make_finding(0), make_finding(1, title="BAD mapping"), make_finding(2)]
    assert sink.export(findings) is ExportResult.SUCCESS
    assert list(receiver.es_docs) == [findings[0].uid, findings[2].uid]
    assert sink.counters["rejected_documents"] == 1
    assert sink.export(findings) is ExportResult.SUCCESS  # not sent again
    assert sink.counters["rejected_documents"] == 1


def test_elastic_bad_credentials_are_a_configuration_error(receiver: Receiver) -> None:
    sink = ElasticSink(ElasticOptions(url=receiver.url, api_key="bm9wZTpub3Bl"))
    with pytest.raises(SinkConfigurationError, match="401"):
        sink.export([make_finding(1)])
    with pytest.raises(ValueError, match="either api_key or username"):
        ElasticOptions(url=receiver.url, api_key="x", username="u", password="p")


def test_elastic_server_errors_are_retryable(receiver: Receiver) -> None:
    receiver.script("/_bulk", 503)
    sink = ElasticSink(ElasticOptions(url=receiver.url, api_key=receiver.elastic_api_key))
    assert sink.export([make_finding(1)]) is ExportResult.FAILURE
    assert sink.export([make_finding(1)]) is ExportResult.SUCCESS


# ---------------------------------------------------------------- webhook


def test_webhook_posts_a_signed_json_array_of_ocsf_findings(receiver: Receiver) -> None:
    receiver.webhook_secret = b"whsec-42"
    sink = WebhookSink(WebhookOptions(url=receiver.url + receiver.webhook_path, hmac_secret="whsec-42",
                                      headers={"X-Team": "soc", "Authorization": "Bearer abc"}))
    findings = [make_finding(i) for i in range(2)]
    assert sink.export(findings) is ExportResult.SUCCESS
    (req,) = receiver.requests
    assert req.headers["x-team"] == "soc" and req.headers["authorization"] == "Bearer abc"
    assert [f["finding_info"]["uid"] for f in receiver.webhook_findings] == [f.uid for f in findings]
    assert "Bearer abc" not in repr(sink.options) and "whsec-42" not in repr(sink.options)


def test_webhook_wrong_signature_key_is_a_configuration_error(receiver: Receiver) -> None:
    receiver.webhook_secret = b"right"
    sink = WebhookSink(WebhookOptions(url=receiver.url + receiver.webhook_path, hmac_secret="wrong"))
    with pytest.raises(SinkConfigurationError, match="401"):
        sink.export([make_finding(1)])


def test_webhook_retryable_and_permanent_statuses(receiver: Receiver) -> None:
    sink = WebhookSink(WebhookOptions(url=receiver.url + receiver.webhook_path))
    receiver.script(receiver.webhook_path, 500, 408)
    assert sink.export([make_finding(1)]) is ExportResult.FAILURE
    assert sink.export([make_finding(1)]) is ExportResult.FAILURE
    assert sink.export([make_finding(1)]) is ExportResult.SUCCESS
    missing = WebhookSink(WebhookOptions(url=receiver.url + "/nowhere"))
    with pytest.raises(SinkConfigurationError, match="404"):
        missing.export([make_finding(1)])
    with pytest.raises(ValueError, match="set by the sink"):
        WebhookOptions(url=receiver.url, headers={"Content-Type": "text/plain"})


def test_kept_alive_connection_survives_a_server_restart(receiver: Receiver) -> None:
    sink = WebhookSink(WebhookOptions(url=receiver.url + receiver.webhook_path))
    assert sink.export([make_finding(1)]) is ExportResult.SUCCESS
    receiver.stop()
    assert sink.export([make_finding(2)]) is ExportResult.FAILURE
    receiver.start()  # same port
    assert sink.export([make_finding(3)]) is ExportResult.SUCCESS
    assert len(receiver.webhook_findings) == 2


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A certificate for 127.0.0.1 that no system trust store knows."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    cert, key = str(d / "cert.pem"), str(d / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


def test_tls_is_verified_by_default_and_ca_file_trusts_a_private_ca(self_signed: tuple[str, str]) -> None:
    with Receiver(tls_cert=self_signed) as tls:
        url = tls.url + tls.webhook_path
        assert url.startswith("https://")
        assert WebhookSink(WebhookOptions(url=url)).export([make_finding(1)]) is ExportResult.FAILURE
        assert tls.webhook_batches == []  # the certificate was refused before anything was sent
        trusted = WebhookSink(WebhookOptions(url=url, ca_file=self_signed[0]))
        assert trusted.export([make_finding(1)]) is ExportResult.SUCCESS
        assert len(tls.webhook_findings) == 1 and tls.errors == []


# ---------------------------------------------------------------- stdout


def test_stdout_ocsf_lines(capsys: pytest.CaptureFixture[str]) -> None:
    sink = StdoutSink(StdoutOptions(type="stdout"))
    assert sink.export([make_finding(1), make_finding(2)]) is ExportResult.SUCCESS
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["finding_info"]["uid"] for line in lines] == [make_finding(i).uid for i in (1, 2)]


def test_stdout_summary_is_one_line_per_finding(capsys: pytest.CaptureFixture[str]) -> None:
    sink = StdoutSink(StdoutOptions(type="stdout", format="summary"))
    f = make_finding(1, title="evil\ntitle")
    assert sink.export([f]) is ExportResult.SUCCESS
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert out.startswith("2025-11-23T06:00:00.251Z HIGH evasion/adv-detector actor=tenant-7 model=digits-cnn")
    assert f"uid={f.uid}" in out and "evil\\ntitle" in out
