"""``configs/siem.example.yaml`` (the contract's SIEM configuration) stays valid and says what it lacks.

The file is documentation users copy, so it is checked like code: it validates
with its environment set; without it, validation exits 2 with one
``FILE: sinks[i].key: environment variable VAR is not set`` line per missing
variable; it is ``agent.example.yaml`` plus sinks, delivery and telemetry; and
even its commented-out webhook block is a valid sink.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agent.config import load_config
from agent.telemetry import exporter_names
from connectors.sink import registry

ROOT = Path(__file__).resolve().parents[1]
SIEM = ROOT / "configs/siem.example.yaml"
REQUIRED_ENV = {
    "HEC_URL": "https://splunk.example:8088",
    "HEC_TOKEN": "5b1f3c0e-hec-token-example",
    "ELASTIC_URL": "https://es.example:9200",
    "ELASTIC_API_KEY": "VnVhQ2ZHY0JDZGJrUW0tZTVhT3g6dWkybHAyYXhUTm1zeWFrdzl0dk5udw==",
}


@pytest.fixture
def siem_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for name in ("SYSLOG_ADDR", "KAFKA_BOOTSTRAP", "INFERWATCH_OUT", "INFERWATCH_STATE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in REQUIRED_ENV.items():
        monkeypatch.setenv(name, value)
    return REQUIRED_ENV


def test_every_siem_sink_is_on_with_its_contract_settings(siem_env: dict[str, str]) -> None:
    cfg = load_config(SIEM)
    by_type = {o.type: o for o in cfg.sink_options}
    # every SIEM sink; webhook is optional (commented), stdout and quarantine are not SIEM outputs
    assert set(by_type) == set(registry()) - {"stdout", "webhook", "quarantine"}
    syslog = by_type["syslog"]
    assert (syslog.address, syslog.protocol, syslog.framing, syslog.format) == (
        "127.0.0.1:6514", "tcp", "octet-counting", "cef")
    hec = by_type["splunk_hec"]
    assert hec.url == siem_env["HEC_URL"] and hec.token.get_secret_value() == siem_env["HEC_TOKEN"]
    elastic = by_type["elastic"]
    assert elastic.url == siem_env["ELASTIC_URL"]
    assert elastic.api_key is not None and elastic.api_key.get_secret_value() == siem_env["ELASTIC_API_KEY"]
    alerts = by_type["kafka"]
    assert alerts.topic == "inferwatch.findings"
    assert alerts.kafka.bootstrap_servers == cfg.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert str(by_type["jsonl"].path) == "inferwatch-out/findings.ocsf.jsonl"
    # secrets came from the environment and print nowhere
    shown = repr(cfg) + "".join(repr(o) for o in cfg.sink_options)
    assert siem_env["HEC_TOKEN"] not in shown and siem_env["ELASTIC_API_KEY"] not in shown


def test_delivery_dedups_for_siems_but_not_for_the_audit_file(siem_env: dict[str, str]) -> None:
    cfg = load_config(SIEM)
    delivery = cfg.delivery_options
    names = [o.name for o in cfg.sink_options]
    audit = next(o.name for o in cfg.sink_options if o.type == "jsonl")
    assert delivery.for_sink(audit).dedup_window_s == 0
    assert all(delivery.for_sink(n).dedup_window_s == 60 for n in names if n != audit)
    assert int(delivery.spool_max_bytes) == 256 << 20 and delivery.spool_full_policy == "block"
    assert cfg.telemetry_options.enabled


def test_otel_export_follows_the_standard_environment(siem_env: dict[str, str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    assert exporter_names("traces") == [] and exporter_names("metrics") == []  # no collector: nothing exported
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    assert exporter_names("traces") == ["otlp_proto_http"] and exporter_names("metrics") == ["otlp_proto_http"]


def test_it_is_the_agent_example_plus_siem_sections() -> None:
    agent = yaml.safe_load((ROOT / "configs/agent.example.yaml").read_text())
    siem = yaml.safe_load(SIEM.read_text())
    siem_only = {"sinks", "delivery", "telemetry"}
    assert {k: v for k, v in siem.items() if k not in siem_only} == \
        {k: v for k, v in agent.items() if k not in siem_only}
    audit = next(s for s in siem["sinks"] if s["type"] == "jsonl")
    assert {k: v for k, v in audit.items() if k != "name"} == agent["sinks"][0]


def test_the_commented_webhook_block_is_a_valid_sink(siem_env: dict[str, str], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    lines = SIEM.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "# - type: webhook")
    block = []
    for line in lines[start:]:
        if not line.strip().startswith("#"):
            break
        block.append(line.replace("# ", "", 1))
    uncommented = SIEM.read_text().replace("\n".join(lines[start:start + len(block)]), "\n".join(block))
    path = tmp_path / "siem-with-webhook.yaml"
    path.write_text(uncommented)
    for name, value in {"WEBHOOK_URL": "https://soar.example/hooks/inferwatch", "WEBHOOK_SECRET": "s3cret",
                        "WEBHOOK_TOKEN": "t0ken"}.items():
        monkeypatch.setenv(name, value)
    webhook = next(o for o in load_config(path).sink_options if o.type == "webhook")
    assert webhook.url == "https://soar.example/hooks/inferwatch" and webhook.min_severity.name == "HIGH"
    assert webhook.headers["Authorization"].get_secret_value() == "Bearer t0ken"


def test_missing_environment_is_named_per_key_and_exits_2() -> None:
    env = {k: v for k, v in os.environ.items() if k not in REQUIRED_ENV}
    res = subprocess.run([sys.executable, "-m", "agent", "validate", "-c", "configs/siem.example.yaml"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.splitlines()
    for where, var in (("sinks[2].url", "HEC_URL"), ("sinks[2].token", "HEC_TOKEN"),
                       ("sinks[3].url", "ELASTIC_URL"), ("sinks[3].api_key", "ELASTIC_API_KEY")):
        assert (f"configs/siem.example.yaml: {where}: environment variable {var} is not set; "
                f"set it or write ${{{var}:-default}}") in lines, res.stderr
