"""The agent's own transport security to Kafka, verified against a real broker (issue 6).

TLS: the agent (``python -m agent run``) consumes over TLS with the test CA and
hostname check on; with a CA that did not sign the server certificate it exits
non-zero and says which setting to fix. SASL: Tansu 0.6.0 with
``--authentication`` rejects clients that do not authenticate, and rejects
credentials it does not hold; with memory storage it cannot hold any (``tansu
user create`` is itself refused with NotAuthenticated once authentication is on,
and the pinned binary has no other durable engine than postgres/s3), so the
success path of SCRAM against Tansu cannot run here: see the module docstring
of tests/kafka_security.py and the reliability notes. What is verified: the
failure paths, the message, and that the password never reaches the logs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from tests.conftest import agent_config
from tests.kafka_security import SecureBroker, make_test_ca, secure_broker

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # each refused login waits ~30 s for bootstrap
ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "pw-Zq8-never-logged-4471"


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    yield from secure_broker(tmp_path_factory.mktemp("tls-broker"))


@pytest.fixture(scope="module")
def sasl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    yield from secure_broker(tmp_path_factory.mktemp("sasl-broker"), authentication=True)


def event(i: int, client: str) -> dict:
    return {"id": f"req-{i}", "ts": 1763877600 + i * 0.01, "model": "digits-cnn", "client_id": client,
            "input": [round((i * 7 + j) % 17 / 16, 4) for j in range(64)], "output": {"probs": [0.1] * 10}}


def tls_kwargs(b: SecureBroker) -> dict:
    return {"bootstrap_servers": b.bootstrap, "security_protocol": "SSL", "ssl_cafile": str(b.ca.ca_cert)}


def write_config(tmp_path: Path, topic: str, kafka_yaml: str) -> Path:
    return agent_config(tmp_path, topic, kafka=kafka_yaml, detectors="  query_rate: {window_s: 60, max_queries: 100}")


def run_agent(cfg: Path, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-m", "agent", "run", "-c", str(cfg), "--until-idle", "8"],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_agent_consumes_over_tls_with_hostname_check(tls_broker: SecureBroker, tmp_path: Path) -> None:
    topic = "tls-ok"
    admin = KafkaAdminClient(**tls_kwargs(tls_broker))
    admin.create_topics([NewTopic(f"{topic}.{s}", 1, 1) for s in ("inference", "feedback", "dead")])
    admin.close()
    producer = KafkaProducer(acks="all", **tls_kwargs(tls_broker))
    for i in range(400):
        producer.send(f"{topic}.inference", json.dumps(event(i, "flooder" if i % 2 else f"t-{i}")).encode())
    producer.flush(60)
    producer.close()

    cfg = write_config(tmp_path, topic, f'{{bootstrap_servers: "{tls_broker.bootstrap}", security_protocol: SSL, '
                                        f'ssl_cafile: "{tls_broker.ca.ca_cert}"}}')
    res = run_agent(cfg)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "consumed 400 records" in res.stderr
    findings = [json.loads(x) for x in (tmp_path / "out/findings.ocsf.jsonl").read_text().splitlines()]
    assert {f["actor"]["user"]["uid"] for f in findings} == {"flooder"}


def test_untrusted_ca_exits_nonzero_and_says_what_to_fix(tls_broker: SecureBroker, tmp_path: Path) -> None:
    other = make_test_ca(tmp_path / "other-pki", name="not-the-servers-ca")
    cfg = write_config(tmp_path, "tls-bad", f'{{bootstrap_servers: "{tls_broker.bootstrap}", security_protocol: SSL, '
                                            f'ssl_cafile: "{other.ca_cert}", request_timeout_ms: 5000}}')
    res = run_agent(cfg)
    print(res.stderr[-3000:])
    assert res.returncode != 0
    assert "ssl_cafile" in res.stderr


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"])
def test_sasl_rejected_credentials_exit_nonzero_without_leaking_password(
        sasl_broker: SecureBroker, tmp_path: Path, mechanism: str) -> None:
    cfg = write_config(tmp_path, f"sasl-{mechanism.lower()}",
                       f'{{bootstrap_servers: "{sasl_broker.bootstrap}", security_protocol: SASL_SSL, '
                       f'ssl_cafile: "{sasl_broker.ca.ca_cert}", sasl_mechanism: {mechanism}, '
                       f'sasl_username: alice, sasl_password: "${{KAFKA_PASSWORD}}", request_timeout_ms: 5000}}')
    res = run_agent(cfg, env={"KAFKA_PASSWORD": PASSWORD})
    print(res.stderr[-3000:])
    assert res.returncode != 0
    assert PASSWORD not in res.stderr and PASSWORD not in res.stdout
    assert "sasl_username" in res.stderr
