"""Connection settings shared by every Kafka client we make (source, dead letters, alert topic).

TLS and SASL settings are passed through to kafka-python unchanged in meaning;
secrets come from the environment via ``${VAR}`` in the YAML and are never logged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator


class KafkaOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bootstrap_servers: str = Field("127.0.0.1:9092", description="comma-separated host:port list")
    client_id: str = "inferwatch"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_password: SecretStr | None = None
    ssl_check_hostname: bool = True
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    request_timeout_ms: int = Field(30_000, ge=1000)

    @field_validator("bootstrap_servers")
    @classmethod
    def _hosts(cls, v: str) -> str:
        for hp in v.split(","):
            host, _, port = hp.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"expected host:port[,host:port...], got {v!r}")
        return v

    @model_validator(mode="after")
    def _sasl(self) -> KafkaOptions:
        if self.security_protocol.startswith("SASL") and not (
            self.sasl_mechanism and self.sasl_username and self.sasl_password
        ):
            raise ValueError(
                f"security_protocol {self.security_protocol} needs sasl_mechanism, sasl_username and sasl_password"
            )
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            p = getattr(self, name)
            if p is not None and not p.is_file():
                raise ValueError(f"{name}: file {str(p)!r} does not exist")
        return self

    def unreachable_hint(self, exc: BaseException) -> str:
        """What to check when no broker could be bootstrapped.

        kafka-python reports a TLS verification failure, a rejected SASL login and
        a closed port all as the same bootstrap timeout, so the hint names every
        setting that can cause it for this ``security_protocol`` (never a secret's value).
        """
        checks = [f"bootstrap_servers ({self.bootstrap_servers}) is reachable and is a {self.security_protocol} "
                  "listener"]
        if "SSL" in self.security_protocol:
            checks.append(f"kafka.ssl_cafile ({self.ssl_cafile or 'system CAs'}) is the CA that signed the "
                          f"broker's certificate and the certificate names the host "
                          f"(ssl_check_hostname={self.ssl_check_hostname})")
        if self.security_protocol.startswith("SASL"):
            checks.append(f"kafka.sasl_mechanism ({self.sasl_mechanism}) is enabled on the broker and "
                          f"kafka.sasl_username ({self.sasl_username}) / kafka.sasl_password are a user it knows")
        return (f"cannot connect to Kafka: {type(exc).__name__}: {exc}. Check that " + "; that ".join(checks)
                + ". Run with -v for the client's log.")

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for KafkaConsumer / KafkaProducer / KafkaAdminClient."""
        kw: dict[str, Any] = {
            "bootstrap_servers": [h.strip() for h in self.bootstrap_servers.split(",")],
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
        }
        if "SSL" in self.security_protocol:
            kw["ssl_check_hostname"] = self.ssl_check_hostname
            for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
                if getattr(self, name) is not None:
                    kw[name] = str(getattr(self, name))
            if self.ssl_password is not None:
                kw["ssl_password"] = self.ssl_password.get_secret_value()
        if self.security_protocol.startswith("SASL"):
            kw["sasl_mechanism"] = self.sasl_mechanism
            kw["sasl_plain_username"] = self.sasl_username
            kw["sasl_plain_password"] = self.sasl_password.get_secret_value() if self.sasl_password else None
        return kw
