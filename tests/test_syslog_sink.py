"""The syslog sink against a real rsyslogd (TCP, TLS, UDP; CEF and LEEF; both framings).

Each integration test starts its own rsyslogd (``tests/rsyslog.py``) and asserts
the exact bytes rsyslog received and the RFC 5424 fields rsyslog parsed out of
them, so framing, header syntax and TLS are judged by a real receiver.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from agent.findings import Finding, Severity
from connectors.formats import cef, leef
from connectors.sink import ExportResult, SinkConfigurationError, registry
from connectors.syslog import SyslogOptions, SyslogSink
from tests.rsyslog import Rsyslog, free_port, tls_driver


def make_finding(n: int = 0, **changes: Any) -> Finding:
    values: dict[str, Any] = dict(
        family="evasion", detector="margin-detector", title=f"Adversarial example | #{n}",
        severity=Severity.CRITICAL, actor=f"tenant=7\\{n} é", model="digits-cnn",
        related_ids=(f"req-{n}",), window=f"req-{n}", evidence={"margin": 0.01, "note": "a\tb\nc"},
        attacks=("AML.T0015", "AML.T0043.000"), time_ms=1763877600250 + n, confidence=0.8,
    )
    values.update(changes)
    return Finding(**values)


def sink_for(server: Rsyslog | None = None, **options: Any) -> SyslogSink:
    values: dict[str, Any] = {"type": "syslog", "hostname": "agent-1"}
    if server is not None:
        values |= {"address": server.address, "protocol": server.protocol}
        if server.protocol == "tls":
            values["ca_file"] = str(server.ca_file)
    values |= options
    return SyslogSink(SyslogOptions(**values))


# -- options ------------------------------------------------------------------------

def test_registered_as_syslog() -> None:
    assert registry()["syslog"] is SyslogSink


@pytest.mark.parametrize(("options", "complaint"), [
    ({"address": "siem.example"}, "must be HOST:PORT"),
    ({"address": "siem.example:0"}, "port must be a number from 1 to 65535"),
    ({"address": "::1:514"}, "IPv6 address in brackets"),
    ({"address": "h:514", "protocol": "tls", "framing": "newline"}, "RFC 5425 requires it"),
    ({"address": "h:514", "protocol": "udp", "framing": "newline"}, "does not apply to protocol: udp"),
    ({"address": "h:514", "ca_file": __file__}, "only apply to protocol: tls"),
    ({"address": "h:514", "protocol": "tls", "ca_file": "/nonexistent/ca.pem"}, "does not exist"),
    ({"address": "h:514", "protocol": "tls", "key_file": __file__}, "key_file needs cert_file"),
    ({"address": "h:514", "facility": "local9"}, "unknown syslog facility"),
    ({"address": "h:514", "facility": 24}, "out of range"),
    ({"address": "h:514", "app_name": "infer watch"}, "printable ASCII"),
    ({"address": "h:514", "hostname": "a b"}, "printable ASCII"),
    ({"address": "h:514", "format": "json"}, "'cef' or 'leef'"),
    ({"address": "h:514", "protocol": "http"}, "'tcp', 'tls' or 'udp'"),
    ({"address": "h:514", "leef_delimiter": "="}, "LEEF delimiter"),
    ({"address": "h:514", "timeout_s": 0}, "greater than 0"),
    ({"address": "h:514", "vendor": "a|b"}, "no '|'"),
    ({"address": "h:514", "colour": "red"}, "Extra inputs are not permitted"),
])
def test_bad_options_say_what_to_fix(options: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ValidationError, match=complaint):
        SyslogOptions(type="syslog", **options)


def test_unreadable_tls_files_are_a_configuration_error(tmp_path: Path) -> None:
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("this is not a certificate")
    with pytest.raises(SinkConfigurationError, match=r"ca_file .* holds no usable PEM certificate"):
        sink_for(address="127.0.0.1:6514", protocol="tls", ca_file=str(not_pem))
    with pytest.raises(SinkConfigurationError, match="are not a PEM certificate and its matching private key"):
        sink_for(address="127.0.0.1:6514", protocol="tls", cert_file=str(not_pem))


def test_option_defaults_and_names() -> None:
    o = SyslogOptions(type="syslog", address="[::1]:6514", facility="authpriv", min_severity="high")
    assert (o.protocol, o.format, o.framing, o.facility, o.verify) == ("tcp", "cef", "octet-counting", 10, True)
    assert o.min_severity is Severity.HIGH


# -- message layout (no network) ---------------------------------------------------------

def test_rfc5424_message_and_octet_counting() -> None:
    sink = sink_for(address="127.0.0.1:1", facility="local4")
    finding = make_finding()
    message = sink.message(finding)
    header = message.split(b" CEF:0|", 1)[0].decode()
    pri = 20 * 8 + 2  # local4, Critical -> crit(2)
    assert header.split(" ")[:3] == [f"<{pri}>1", "2025-11-23T06:00:00.250Z", "agent-1"]
    assert header.split(" ")[3:] == ["inferwatch", header.split(" ")[4], "evasion", "-"]
    assert header.split(" ")[4].isdigit()
    assert message.endswith(cef.render(finding))
    framed = sink.frame(message)
    count, _, rest = framed.partition(b" ")
    assert int(count) == len(rest) == len(message) and rest == message  # bytes, not characters
    assert len(message) > len(message.decode())  # the finding holds multi-byte UTF-8


@pytest.mark.parametrize(("severity", "syslog_severity"), [
    (Severity.CRITICAL, 2), (Severity.HIGH, 3), (Severity.MEDIUM, 4), (Severity.LOW, 5),
    (Severity.INFORMATIONAL, 6)])
def test_priority_maps_severity(severity: Severity, syslog_severity: int) -> None:
    sink = sink_for(address="127.0.0.1:1", facility=1)
    assert sink.message(make_finding(severity=severity)).startswith(f"<{8 + syslog_severity}>1 ".encode())


def test_newline_framing_appends_one_line_feed() -> None:
    sink = sink_for(address="127.0.0.1:1", framing="newline", format="leef")
    message = sink.message(make_finding())
    assert sink.frame(message) == message + b"\n" and b"\n" not in message


# -- against rsyslog -----------------------------------------------------------------------

def assert_received(server: Rsyslog, sink: SyslogSink, sent: list[Finding]) -> None:
    """rsyslog got exactly our messages, byte for byte, and parsed the RFC 5424 header we meant."""
    lines = server.wait_for_lines(len(sent))
    assert lines == [sink.message(f) for f in sent]
    for record, finding in zip(server.messages(), sent, strict=True):
        pri = sink.options.facility * 8 + {Severity.CRITICAL: 2, Severity.HIGH: 3}[finding.severity]
        assert record["pri"] == str(pri)
        assert record["protocol-version"] == "1"
        assert record["timereported"] == "2025-11-23T06:00:00.25" + str(finding.time_ms)[-1] + "Z"
        assert record["hostname"] == "agent-1"
        assert record["app-name"] == "inferwatch"
        assert record["procid"].isdigit()
        assert record["msgid"] == finding.family
        assert record["structured-data"] == "-"
        assert record["msg"].encode() == sink.payload(finding)


@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["tcp", "tls", "udp"])
@pytest.mark.parametrize("fmt", ["cef", "leef"])
def test_delivers_to_rsyslog(tmp_path: Path, protocol: str, fmt: str) -> None:
    with Rsyslog(tmp_path, protocol) as server:  # type: ignore[arg-type]
        sink = sink_for(server, format=fmt)
        sent = [make_finding(0), make_finding(1, severity=Severity.HIGH)]
        assert sink.export(sent) is ExportResult.SUCCESS
        assert sink.export([make_finding(2)]) is ExportResult.SUCCESS  # same connection, reused
        sink.shutdown()
        assert_received(server, sink, [*sent, make_finding(2)])
        if fmt == "leef":
            assert b"\tsev=10\t" in server.lines()[0]  # tab delimiter survived rsyslog untouched


@pytest.mark.integration
def test_newline_framing_to_rsyslog(tmp_path: Path) -> None:
    with Rsyslog(tmp_path, "tcp") as server:
        sink = sink_for(server, framing="newline")
        sent = [make_finding(n) for n in range(3)]
        assert sink.export(sent) is ExportResult.SUCCESS
        sink.shutdown()
        assert_received(server, sink, sent)


@pytest.mark.integration
def test_large_finding_arrives_whole_over_octet_counting(tmp_path: Path) -> None:
    """1,000 related ids make a ~12 KB message (over the common 8 KiB syslog default): octet-counting
    must carry it as one message, however TCP segments it."""
    finding = make_finding(related_ids=tuple(f"req-{i:05d}" for i in range(1000)))
    with Rsyslog(tmp_path, "tls") as server:
        sink = sink_for(server, max_related_ids=1000)
        assert len(sink.message(finding)) > 8192
        assert sink.export([finding]) is ExportResult.SUCCESS
        sink.shutdown()
        assert_received(server, sink, [finding])


@pytest.mark.integration
def test_failure_while_nothing_listens_then_success_once_rsyslog_is_up(tmp_path: Path) -> None:
    server = Rsyslog(tmp_path, "tcp")
    sink = sink_for(server, timeout_s=2)
    try:
        assert sink.export([make_finding(0)]) is ExportResult.FAILURE
        server.start()
        assert sink.export([make_finding(1)]) is ExportResult.SUCCESS
        sink.shutdown()
        assert_received(server, sink, [make_finding(1)])
    finally:
        server.stop()


@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["tcp", "tls"])
def test_reconnects_after_the_receiver_restarts(tmp_path: Path, protocol: str) -> None:
    """A kept connection broken by a receiver restart is replaced, and nothing is lost."""
    server = Rsyslog(tmp_path, protocol)  # type: ignore[arg-type]
    sink = sink_for(server)
    try:
        server.start()
        assert sink.export([make_finding(0)]) is ExportResult.SUCCESS
        server.wait_for_lines(1)
        server.stop()
        assert sink.export([make_finding(1)]) is ExportResult.FAILURE  # down: nothing can be written
        server.start()
        assert sink.export([make_finding(2)]) is ExportResult.SUCCESS
        sink.shutdown()
        assert_received(server, sink, [make_finding(0), make_finding(2)])
    finally:
        server.stop()


@pytest.mark.integration
def test_reconnects_when_the_connection_dies_while_the_receiver_stays_up(tmp_path: Path) -> None:
    with Rsyslog(tmp_path, "tcp") as server:
        sink = sink_for(server)
        assert sink.export([make_finding(0)]) is ExportResult.SUCCESS
        server.wait_for_lines(1)
        server.stop()
        server.start()  # the sink still holds the socket of the old process
        assert sink.export([make_finding(1)]) is ExportResult.SUCCESS
        sink.shutdown()
        assert_received(server, sink, [make_finding(0), make_finding(1)])


@pytest.mark.integration
def test_tls_refuses_an_untrusted_certificate(tmp_path: Path) -> None:
    with Rsyslog(tmp_path, "tls") as server:
        untrusted = sink_for(address=server.address, protocol="tls", timeout_s=2)  # system CAs only
        with pytest.raises(SinkConfigurationError, match="set ca_file to the CA that signed it"):
            untrusted.export([make_finding(0)])
        wrong_name = sink_for(server, server_name="siem.example", timeout_s=2)
        with pytest.raises(SinkConfigurationError, match="Hostname mismatch"):
            wrong_name.export([make_finding(0)])
        unverified = sink_for(address=server.address, protocol="tls", verify=False)
        assert unverified.export([make_finding(1)]) is ExportResult.SUCCESS
        unverified.shutdown()
        assert_received(server, unverified, [make_finding(1)])


def test_udp_and_tcp_ports_are_distinct_kinds() -> None:
    """free_port gives a usable port for each socket kind (guards the fixture helper itself)."""
    import socket

    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        port = free_port(kind)
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", port))


def test_leef_payload_uses_configured_delimiter() -> None:
    sink = sink_for(address="127.0.0.1:1", format="leef", leef_delimiter="^")
    payload = sink.payload(make_finding())
    assert payload == leef.render(make_finding(), delimiter="^")
    assert payload.startswith(b"LEEF:2.0|inferwatch|inferwatch|0.1.0|margin-detector|^|devTime=")


@pytest.mark.integration
def test_mutual_tls_presents_the_client_certificate(tmp_path: Path) -> None:
    with Rsyslog(tmp_path, "tls", require_client_cert=True) as server:
        assert server.tls is not None
        anonymous = sink_for(server, timeout_s=2)
        if tls_driver() == "ossl":  # OpenSSL rsyslog refuses in TLS itself: an alert, a configuration error
            with pytest.raises(SinkConfigurationError, match="set cert_file and key_file"):
                anonymous.export([make_finding(0)])
        else:  # GnuTLS rsyslog completes the handshake, then drops the session: a failed attempt
            assert anonymous.export([make_finding(0)]) is ExportResult.FAILURE
        anonymous.shutdown()
        sink = sink_for(server, cert_file=str(server.tls.client_cert), key_file=str(server.tls.client_key))
        assert sink.export([make_finding(1)]) is ExportResult.SUCCESS
        sink.shutdown()
        assert_received(server, sink, [make_finding(1)])
