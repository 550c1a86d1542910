"""Signed findings (issue 6): a SIEM can verify them, a modified finding fails, keys never leak."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import signing
from agent.findings import Finding, Severity
from agent.ocsf import to_ocsf
from agent.signing import SigningKeyError, SigningOptions, build_signer, verify

ROOT = Path(__file__).resolve().parents[1]
HMAC_KEY = "3f1c9a7e5b2d48e6a0c4f19b7d3e2a56c8b1f0e9d7a6c5b4"  # 48 bytes, test only


def sample(**kw) -> Finding:
    base = dict(family="extraction", detector="extraction", title="Model extraction by tenant-7 — ünïcode",
                severity=Severity.HIGH, actor="tenant-7", model="digits-cnn", related_ids=("req-1", "req-2"),
                window="tenant-7:1763877600", evidence={"shapiro_w": 0.71, "n": 300, "ratio": 1 / 3},
                attacks=("AML.T0024.002",), time_ms=1763877600250, confidence=0.93)
    base.update(kw)
    return Finding(**base)


@pytest.fixture(autouse=True)
def _uninstall() -> Iterator[None]:
    yield
    signing.install(None)


def standalone_hmac_verify(line: str, key: bytes) -> bool:
    """The verification snippet published in README "Reliability" (stdlib only), kept here so it is tested."""
    obj = json.loads(line)
    sig = obj["unmapped"]["inferwatch"].pop("signature")
    if not obj["unmapped"]["inferwatch"]:
        del obj["unmapped"]["inferwatch"]
    if not obj["unmapped"]:
        del obj["unmapped"]
    payload = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    expected = hmac.new(key, payload, hashlib.sha256).digest()
    return sig["alg"] == "hmac-sha256" and hmac.compare_digest(base64.b64decode(sig["value"]), expected)


def ed25519_key_file(tmp_path: Path) -> tuple[Path, Ed25519PrivateKey]:
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "signing.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path, key


def test_hmac_from_env_verifies_and_detects_tampering() -> None:
    signer = build_signer(SigningOptions(method="hmac-sha256", key_env="IW_KEY"), environ={"IW_KEY": HMAC_KEY})
    signing.install(signer)
    obj = to_ocsf(sample())
    sig = obj["unmapped"]["inferwatch"]["signature"]
    assert sig["alg"] == "hmac-sha256" and sig["key_id"].startswith("hmac-")
    line = json.dumps(obj)  # what a sink writes
    assert verify(json.loads(line), hmac_key=HMAC_KEY.encode())
    assert standalone_hmac_verify(line, HMAC_KEY.encode())
    assert not verify(json.loads(line), hmac_key=b"x" * 48)  # another key

    for mutate in (lambda o: o.__setitem__("severity_id", 1),
                   lambda o: o["actor"]["user"].__setitem__("uid", "someone-else"),
                   lambda o: o["evidences"][0]["data"].__setitem__("n", 301),
                   lambda o: o["unmapped"]["inferwatch"].__setitem__("injected", True)):
        forged = json.loads(line)
        mutate(forged)
        assert not verify(forged, hmac_key=HMAC_KEY.encode())
        assert not standalone_hmac_verify(json.dumps(forged), HMAC_KEY.encode())
    stripped = json.loads(line)
    del stripped["unmapped"]
    assert not verify(stripped, hmac_key=HMAC_KEY.encode())  # an unsigned finding is not a valid one


def test_hmac_from_file_and_ed25519_from_pem(tmp_path: Path) -> None:
    key_file = tmp_path / "hmac.key"
    key_file.write_text(HMAC_KEY + "\n")
    signing.install(build_signer(SigningOptions(method="hmac-sha256", key_file=key_file)))
    assert verify(to_ocsf(sample()), hmac_key=HMAC_KEY.encode())

    pem, private = ed25519_key_file(tmp_path)
    signer = build_signer(SigningOptions(method="ed25519", key_file=pem, key_id="prod-2026"))
    signing.install(signer)
    obj = json.loads(json.dumps(to_ocsf(sample())))
    assert obj["unmapped"]["inferwatch"]["signature"]["key_id"] == "prod-2026"
    assert verify(obj, public_key=private.public_key())
    assert not verify(obj, public_key=Ed25519PrivateKey.generate().public_key())
    obj["finding_info"]["title"] = "nothing to see"
    assert not verify(obj, public_key=private.public_key())


def test_unsigned_by_default_and_existing_unmapped_is_covered() -> None:
    assert "unmapped" not in to_ocsf(sample())
    signer = build_signer(SigningOptions(method="hmac-sha256", key_env="K"), environ={"K": HMAC_KEY})
    obj = {"a": 1, "unmapped": {"other": "x"}}
    signer.sign(obj)
    assert obj["unmapped"]["other"] == "x" and verify(obj, hmac_key=HMAC_KEY.encode())
    obj["unmapped"]["other"] = "y"
    assert not verify(obj, hmac_key=HMAC_KEY.encode())


def test_key_errors_say_what_to_fix_and_never_show_the_key(tmp_path: Path) -> None:
    short = "tooshort-secret-123"
    with pytest.raises(SigningKeyError, match="at least 32") as e:
        build_signer(SigningOptions(method="hmac-sha256", key_env="K"), environ={"K": short})
    assert short not in str(e.value)
    with pytest.raises(SigningKeyError, match="IW_MISSING is not set"):
        build_signer(SigningOptions(method="hmac-sha256", key_env="IW_MISSING"), environ={})
    with pytest.raises(SigningKeyError, match="cannot read"):
        build_signer(SigningOptions(method="ed25519", key_file=tmp_path / "absent.pem"))
    not_pem = tmp_path / "not.pem"
    not_pem.write_text(HMAC_KEY)
    with pytest.raises(SigningKeyError, match="genpkey") as e:
        build_signer(SigningOptions(method="ed25519", key_file=not_pem))
    assert HMAC_KEY not in str(e.value)
    with pytest.raises(ValueError, match="exactly one of key_env"):
        SigningOptions(method="hmac-sha256")
    signer = build_signer(SigningOptions(method="hmac-sha256", key_env="K"), environ={"K": HMAC_KEY})
    assert HMAC_KEY not in repr(signer) and HMAC_KEY not in str(signer)


def test_agent_signs_findings_end_to_end_without_logging_the_key(tmp_path: Path) -> None:
    """The real CLI over the file source: every finding written verifies; the key is in no output."""
    events = tmp_path / "inference.jsonl"
    with events.open("w") as fh:
        for i in range(300):
            fh.write(json.dumps({"id": f"req-{i}", "ts": 1763877600 + i * 0.01, "model": "digits-cnn",
                                 "client_id": "flooder" if i % 2 else f"t-{i}",
                                 "input": [((i + j) % 17) / 16 for j in range(64)],
                                 "output": {"probs": [0.1] * 10}}) + "\n")
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"""
source: {{type: file, inference_path: {events}}}
artifacts: {tmp_path}/artifacts
state: {{dir: {tmp_path}/state}}
detectors: {{query_rate: {{window_s: 60, max_queries: 50}}}}
sinks: [{{type: jsonl, path: {tmp_path}/findings.jsonl}}]
signing: {{method: hmac-sha256, key_env: IW_SIGNING_KEY}}
""")
    res = subprocess.run([sys.executable, "-m", "agent", "-v", "run", "-c", str(cfg), "--until-idle", "1"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "IW_SIGNING_KEY": HMAC_KEY})
    assert res.returncode == 0, res.stderr[-3000:]
    assert HMAC_KEY not in res.stderr + res.stdout
    lines = (tmp_path / "findings.jsonl").read_text().splitlines()
    assert lines and all(standalone_hmac_verify(ln, HMAC_KEY.encode()) for ln in lines)

    res = subprocess.run([sys.executable, "-m", "agent", "run", "-c", str(cfg), "--until-idle", "1"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "IW_SIGNING_KEY": "short-but-secret"})
    assert res.returncode == 2 and "at least 32" in res.stderr and "short-but-secret" not in res.stderr
