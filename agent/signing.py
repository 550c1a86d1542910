"""Optional signatures on findings, so a SIEM can tell a finding came from this agent and was not altered.

A monitor's alerts are a target: whoever can write to the alert topic or the
HEC endpoint can forge "all clear" noise or a fake incident. With ``signing:``
configured, every OCSF finding carries

    unmapped.inferwatch.signature = {"alg": "hmac-sha256" | "ed25519", "key_id": "...", "value": "<base64>"}

computed over the *canonical JSON* of the finding without that ``signature``
member (and without ``unmapped.inferwatch`` / ``unmapped`` if they become empty):
``json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")``.
A verifier parses the finding, removes the signature the same way, re-serialises
and checks — see :func:`verify` (and README "Reliability" for a standalone snippet).

Keys are never in the configuration file: HMAC keys come from an environment
variable (``key_env``, the variable's *name*) or a file; Ed25519 private keys
from a PEM file (PKCS#8, unencrypted — protect it with file permissions). Key
bytes are never logged or put in error messages; only a ``key_id`` derived from
a hash of the key (HMAC) or of the public key (Ed25519) is.

The installed signer is process-wide (:func:`install`) because findings are
rendered to OCSF in several sinks and formats (``agent.ocsf.to_ocsf``) and the
signature must be identical wherever the object goes.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MIN_HMAC_KEY_BYTES = 32


class SigningKeyError(ValueError):
    """The signing key could not be loaded; the message names the setting to fix, never the key."""


class SigningOptions(BaseModel):
    """The ``signing:`` section of the agent configuration."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["none", "hmac-sha256", "ed25519"] = "none"
    key_env: str | None = Field(None, description="hmac-sha256: NAME of the environment variable holding the key")
    key_file: Path | None = Field(None, description="hmac-sha256: key file; ed25519: PEM PKCS#8 private key")
    key_id: str | None = Field(None, description="published with each signature; default derived from the key")

    @model_validator(mode="after")
    def _key_source(self) -> SigningOptions:
        if self.method == "none":
            return self
        if self.method == "ed25519" and (self.key_env or not self.key_file):
            raise ValueError("method ed25519 needs key_file (a PEM private key), and no key_env")
        if self.method == "hmac-sha256" and (self.key_env is None) == (self.key_file is None):
            raise ValueError("method hmac-sha256 needs exactly one of key_env (a variable name) or key_file")
        return self


def canonical_bytes(obj: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: ``obj`` without its signature, sorted keys, compact, UTF-8."""
    return json.dumps(strip_signature(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def strip_signature(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``obj`` without ``unmapped.inferwatch.signature`` (and the containers it leaves empty)."""
    out = copy.deepcopy(dict(obj))
    unmapped = out.get("unmapped")
    if isinstance(unmapped, dict) and isinstance(unmapped.get("inferwatch"), dict):
        unmapped["inferwatch"].pop("signature", None)
        if not unmapped["inferwatch"]:
            del unmapped["inferwatch"]
        if not unmapped:
            del out["unmapped"]
    return out


@dataclass(frozen=True)
class Signer:
    """Signs canonical OCSF JSON with one key. Build it with :func:`build_signer`."""

    alg: Literal["hmac-sha256", "ed25519"]
    key_id: str
    _key: Any = dataclass_field(repr=False)  # bytes (HMAC) or an Ed25519PrivateKey: never printed

    def signature(self, payload: bytes) -> str:
        if self.alg == "hmac-sha256":
            raw = hmac.new(self._key, payload, hashlib.sha256).digest()
        else:
            raw = self._key.sign(payload)
        return base64.b64encode(raw).decode("ascii")

    def sign(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Add ``unmapped.inferwatch.signature`` to ``obj`` (in place) and return it."""
        value = self.signature(canonical_bytes(obj))
        obj.setdefault("unmapped", {}).setdefault("inferwatch", {})["signature"] = {
            "alg": self.alg, "key_id": self.key_id, "value": value}
        return obj


def _read_key_file(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SigningKeyError(f"{setting}: cannot read {str(path)!r} ({exc.strerror}); "
                              "point it at a readable key file") from None


def build_signer(options: SigningOptions, environ: Mapping[str, str] | None = None) -> Signer | None:
    """Load the key named by ``options``; None when signing is off. Raises :class:`SigningKeyError`."""
    env = os.environ if environ is None else environ
    if options.method == "none":
        return None
    if options.method == "hmac-sha256":
        if options.key_env is not None:
            value = env.get(options.key_env, "")
            if not value:
                raise SigningKeyError(f"signing.key_env: environment variable {options.key_env} is not set or "
                                      "empty; export the HMAC key in it")
            key = value.strip().encode("utf-8")
            where = f"environment variable {options.key_env}"
        else:
            assert options.key_file is not None
            key = _read_key_file(options.key_file, "signing.key_file").strip()
            where = f"file {str(options.key_file)!r}"
        if len(key) < MIN_HMAC_KEY_BYTES:
            raise SigningKeyError(f"signing: the HMAC key in {where} is {len(key)} bytes; use at least "
                                  f"{MIN_HMAC_KEY_BYTES} random bytes (e.g. `openssl rand -hex 32`)")
        key_id = options.key_id or "hmac-" + hashlib.sha256(b"inferwatch-key-id:" + key).hexdigest()[:16]
        return Signer("hmac-sha256", key_id, key)

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    assert options.key_file is not None
    pem = _read_key_file(options.key_file, "signing.key_file")
    try:
        private = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise SigningKeyError(f"signing.key_file: {str(options.key_file)!r} is not an unencrypted PEM private key; "
                              "create one with `openssl genpkey -algorithm ed25519 -out KEY.pem`") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise SigningKeyError(f"signing.key_file: {str(options.key_file)!r} holds a {type(private).__name__}, "
                              "not an Ed25519 key; create one with `openssl genpkey -algorithm ed25519`")
    public_raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    key_id = options.key_id or "ed25519-" + hashlib.sha256(public_raw).hexdigest()[:16]
    return Signer("ed25519", key_id, private)


def verify(obj: Mapping[str, Any], *, hmac_key: bytes | None = None, public_key: Any = None) -> bool:
    """True when ``obj`` carries a valid signature for the given HMAC key or Ed25519 public key."""
    sig = (obj.get("unmapped") or {}).get("inferwatch", {}).get("signature")
    if not isinstance(sig, dict) or "value" not in sig:
        return False
    payload = canonical_bytes(obj)
    try:
        raw = base64.b64decode(sig["value"], validate=True)
    except ValueError:
        return False
    if sig.get("alg") == "hmac-sha256" and hmac_key is not None:
        return hmac.compare_digest(raw, hmac.new(hmac_key, payload, hashlib.sha256).digest())
    if sig.get("alg") == "ed25519" and public_key is not None:
        from cryptography.exceptions import InvalidSignature

        try:
            public_key.verify(raw, payload)
        except InvalidSignature:
            return False
        return True
    return False


_installed: Signer | None = None


def install(signer: Signer | None) -> None:
    """Make ``signer`` the one :func:`apply` uses (None: findings go out unsigned)."""
    global _installed
    _installed = signer


def apply(obj: dict[str, Any]) -> dict[str, Any]:
    """Sign ``obj`` with the installed signer, if any (called by ``agent.ocsf.to_ocsf``)."""
    return _installed.sign(obj) if _installed is not None else obj
