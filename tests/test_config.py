"""Configuration: env expansion, typed validation, one precise line per problem, exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import ConfigError, expand_env, load_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.yaml"
    p.write_text(text)
    return p


def test_example_configs_validate(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(ROOT / "configs/agent.example.yaml", environ={})
    assert cfg.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert str(cfg.artifacts) == "artifacts"
    assert cfg.sink_options[0].type == "jsonl"
    assert str(cfg.sink_options[0].path) == "inferwatch-out/findings.ocsf.jsonl"


def test_env_expansion_with_and_without_default() -> None:
    problems: list[str] = []
    tree = {"a": "${X}", "b": ["${Y:-dflt}", "pre-${X}-post"], "c": 3}
    assert expand_env(tree, "f.yaml", (), problems, {"X": "1"}) == {"a": "1", "b": ["dflt", "pre-1-post"], "c": 3}
    expand_env({"sinks": [{"url": "${MISSING}"}]}, "f.yaml", (), problems, {})
    assert problems == ["f.yaml: sinks[0].url: environment variable MISSING is not set; set it or write "
                        "${MISSING:-default}"]


def test_env_values_are_typed_after_expansion(tmp_path: Path) -> None:
    p = write(tmp_path, "source:\n  max_poll_records: ${N:-500}\n")
    assert load_config(p, environ={}).source.max_poll_records == 500
    assert load_config(p, environ={"N": "77"}).source.max_poll_records == 77


def test_every_problem_is_reported_with_its_path(tmp_path: Path) -> None:
    p = write(tmp_path, """
kafka:
  bootstrap_servers: "no-port-here"
source:
  max_poll_records: -3
  typo_key: 1
detectors:
  query_rate: {window_s: 0}
  no_such_detector: {}
sinks:
  - type: jsonl
    path: /tmp/x.jsonl
    min_severity: catastrophic
  - type: carrier_pigeon
device: tpu
""")
    with pytest.raises(ConfigError) as exc:
        load_config(p, environ={})
    lines = exc.value.problems
    text = "\n".join(lines)
    assert all(line.startswith(f"{p}: ") for line in lines), text
    assert f"{p}: kafka.bootstrap_servers: expected host:port" in text
    assert f"{p}: source.max_poll_records: Input should be greater than or equal to 1, got -3" in text
    assert f"{p}: source.typo_key: unknown key" in text
    assert f"{p}: device: " in text
    # detector and sink sections are reported too (a config is checked whole, not up to the first error)
    assert len(lines) >= 4


def test_detector_and_sink_problems(tmp_path: Path) -> None:
    p = write(tmp_path, """
detectors:
  query_rate: {window_s: 0}
  no_such_detector: {}
sinks:
  - type: jsonl
    path: /tmp/x.jsonl
    min_severity: catastrophic
  - type: carrier_pigeon
""")
    with pytest.raises(ConfigError) as exc:
        load_config(p, environ={})
    text = "\n".join(exc.value.problems)
    assert f"{p}: detectors.query_rate.window_s: Input should be greater than 0, got 0" in text
    assert f"{p}: detectors.no_such_detector: unknown detector; expected one of" in text
    assert f"{p}: sinks[0].min_severity: unknown severity 'catastrophic'" in text
    assert f"{p}: sinks[1].type: expected one of" in text and "got 'carrier_pigeon'" in text


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    p = write(tmp_path, "kafka:\n  bootstrap_servers: [unclosed\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert exc.value.problems[0].startswith(f"{p}: line ")


def test_sasl_needs_credentials(tmp_path: Path) -> None:
    p = write(tmp_path, "kafka:\n  security_protocol: SASL_SSL\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert "needs sasl_mechanism, sasl_username and sasl_password" in exc.value.problems[0]


def test_cli_validate_exit_codes(tmp_path: Path) -> None:
    good = subprocess.run([sys.executable, "-m", "agent", "validate", "-c", str(ROOT / "configs/agent.example.yaml")],
                          capture_output=True, text=True, cwd=ROOT)
    assert good.returncode == 0, good.stderr
    bad = write(tmp_path, "sinks:\n  - type: jsonl\n")
    res = subprocess.run([sys.executable, "-m", "agent", "validate", "-c", str(bad)], capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"{bad}: sinks[0].path: required key is missing"]


def test_delivery_overrides_must_name_a_sink(tmp_path: Path) -> None:
    p = write(tmp_path, """
sinks:
  - {type: jsonl, path: /tmp/x.jsonl, name: audit}
delivery:
  sinks:
    adit: {dedup_window_s: 0}
""")
    with pytest.raises(ConfigError) as exc:
        load_config(p, environ={})
    assert exc.value.problems == [f"{p}: delivery.sinks.adit: no sink has this name; expected one of audit"]


def test_kafka_alert_sink_inherits_the_cluster(tmp_path: Path) -> None:
    p = write(tmp_path, """
kafka: {bootstrap_servers: "10.1.2.3:9093", client_id: agent-7}
sinks:
  - {type: kafka, topic: inferwatch.findings}
""")
    cfg = load_config(p, environ={})
    assert cfg.sink_options[0].kafka.bootstrap_servers == "10.1.2.3:9093"
