"""The agent's YAML configuration: environment expansion, types, validation.

Every problem is reported, not just the first, as one line each:
``FILE: path.to.key: what is wrong, what is expected`` (CONTRACT.md). A bad
configuration never starts the agent (``ConfigError`` -> exit status 2).

``${VAR}`` and ``${VAR:-default}`` are expanded in string values from the
environment before validation, so secrets and endpoints need not be written in
the file. An unset ``${VAR}`` without a default is itself a configuration error.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.signing import SigningOptions
from connectors.kafka_options import KafkaOptions

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """One or more configuration problems; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TopicsOptions(_Strict):
    inference: list[str] = Field(default_factory=lambda: ["inferwatch.inference"])
    feedback: list[str] = Field(default_factory=lambda: ["inferwatch.feedback"])
    # KServe / Open Inference Protocol: request and response records on their own topics
    kserve_request: list[str] = Field(default_factory=list)
    kserve_response: list[str] = Field(default_factory=list)

    def all(self) -> list[str]:
        return [*self.inference, *self.feedback, *self.kserve_request, *self.kserve_response]


class SourceOptions(_Strict):
    type: Literal["kafka", "file"] = "kafka"
    format: Literal["native", "kserve"] = "native"
    topics: TopicsOptions = Field(default_factory=TopicsOptions)
    group_id: str = "inferwatch"
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    max_poll_records: int = Field(2000, ge=1, le=100_000)
    poll_timeout_ms: int = Field(200, ge=1, le=60_000)
    session_timeout_ms: int = Field(10_000, ge=1000)
    heartbeat_interval_ms: int = Field(3_000, ge=100)
    max_poll_interval_ms: int = Field(300_000, ge=1000)
    metadata_max_age_ms: int = Field(30_000, ge=100, description="partitions added to a topic are read within this")
    max_record_bytes: int = Field(1_048_576, ge=64, description="bigger records are dead-lettered")
    # native format: decode in a second process, one batch ahead of the detectors (agent/decode_ahead.py)
    decode_worker: bool = True
    # file source: JSONL files replayed as if they were the topics, one per stream
    inference_path: Path | None = None
    feedback_path: Path | None = None
    # kserve format
    # header naming the caller; None = the decoder's defaults (x-client-id, then the right-most X-Forwarded-For)
    kserve_client_header: str | None = None
    kserve_join_ttl_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _file_paths(self) -> SourceOptions:
        if self.type == "file" and not (self.inference_path or self.feedback_path):
            raise ValueError("type 'file' needs inference_path and/or feedback_path (JSONL files)")
        if self.format == "kserve" and not (self.topics.kserve_request and self.topics.kserve_response):
            raise ValueError("format 'kserve' needs topics.kserve_request and topics.kserve_response")
        return self


class DeadLetterOptions(_Strict):
    topic: str = "inferwatch.deadletter"
    path: Path | None = Field(None, description="for the file source: dead letters as JSONL here")
    max_value_bytes: int = Field(262_144, ge=0, description="longer values are truncated in the dead letter")


class StateOptions(_Strict):
    dir: Path = Path("./inferwatch-state")
    # offsets are committed together with each checkpoint: a crash replays at most this much of the stream
    checkpoint_interval_s: float = Field(5.0, gt=0)


class ModelOptions(_Strict):
    name: str | None = Field(None, description="only events of this model are monitored; None = all")
    path: Path | None = Field(None, description="the monitored model as a torch.export .pt2 (white-box)")


class AgentConfig(_Strict):
    kafka: KafkaOptions = Field(default_factory=KafkaOptions)
    source: SourceOptions = Field(default_factory=SourceOptions)
    deadletter: DeadLetterOptions = Field(default_factory=DeadLetterOptions)
    model: ModelOptions = Field(default_factory=ModelOptions)
    artifacts: Path = Path("./artifacts")
    state: StateOptions = Field(default_factory=StateOptions)
    device: str = "auto"
    cpu_threads: int | None = Field(None, ge=1, le=256, description="torch CPU threads; default 1 (scale out instead)")
    detectors: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # Raw sections after ${VAR} expansion: they hold secrets in clear text, so they never print or dump;
    # the typed sink_options (SecretStr-masked) are what everything else uses.
    sinks: list[dict[str, Any]] = Field(default_factory=list, repr=False, exclude=True)
    delivery: dict[str, Any] = Field(default_factory=dict)
    telemetry: dict[str, Any] = Field(default_factory=dict)
    signing: SigningOptions = Field(default_factory=SigningOptions)

    # Filled by load_config after validation: the typed per-detector / per-sink options.
    detector_options: dict[str, Any] = Field(default_factory=dict, exclude=True)
    sink_options: list[Any] = Field(default_factory=list, exclude=True)
    delivery_options: Any = Field(None, exclude=True)
    telemetry_options: Any = Field(None, exclude=True)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError("expected auto, cpu, cuda or cuda:N")
        return v


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _problems(origin: str, prefix: tuple[Any, ...], exc: ValidationError, unset: frozenset[str] = frozenset()
              ) -> list[str]:
    """One line per validation error; keys whose ``${VAR}`` was unset are skipped (reported once already)."""
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key; check the spelling against README's configuration reference"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif ("input" in err and err["type"] not in ("model_type",) and not isinstance(err["input"], dict | list)
              and "got " not in msg):
            msg = f"{msg}, got {err['input']!r}"
        where = _loc(prefix + loc)
        if where in unset:
            continue  # already reported: the ${VAR} behind this value is not set
        lines.append(f"{origin}: {where}: {msg}")
    return lines


def expand_env(tree: Any, origin: str, path: tuple[Any, ...] = (), problems: list[str] | None = None,
               environ: dict[str, str] | None = None, unset: set[str] | None = None) -> Any:
    """Expand ``${VAR}`` / ``${VAR:-default}`` in every string of a parsed YAML tree."""
    env = os.environ if environ is None else environ
    problems = [] if problems is None else problems
    unset = set() if unset is None else unset
    if isinstance(tree, dict):
        return {k: expand_env(v, origin, (*path, k), problems, env, unset) for k, v in tree.items()}
    if isinstance(tree, list):
        return [expand_env(v, origin, (*path, i), problems, env, unset) for i, v in enumerate(tree)]
    if not isinstance(tree, str):
        return tree

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in env and env[name] != "":
            return env[name]
        if default is not None:
            return default
        problems.append(f"{origin}: {_loc(path)}: environment variable {name} is not set; "
                        f"set it or write ${{{name}:-default}}")
        unset.add(_loc(path))
        return ""

    return _VAR.sub(sub, tree)


def load_config(path: str | Path, environ: dict[str, str] | None = None) -> AgentConfig:
    """Read, expand, validate. Raises ConfigError listing every problem found."""
    from agent.delivery import DeliveryOptions
    from agent.telemetry import TelemetryOptions
    from connectors.sink import registry as sink_registry
    from detectors.base import registry as detector_registry

    origin = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"{origin}: (file): not found; pass an existing YAML file with -c"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(parse)"
        raise ConfigError([f"{origin}: {where}: not valid YAML: {getattr(exc, 'problem', exc)}"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{origin}: (top level): expected a mapping of sections, got {type(raw).__name__}"])

    problems: list[str] = []
    unset_paths: set[str] = set()
    tree = expand_env(raw, origin, (), problems, environ, unset_paths)
    unset = frozenset(unset_paths)
    cfg: AgentConfig | None = None
    try:
        cfg = AgentConfig.model_validate(tree)
    except ValidationError as exc:
        problems += _problems(origin, (), exc, unset)
    # The sections below are checked even when the top level failed: report every problem at once.
    detector_options, sink_options = {}, []
    detectors = detector_registry()
    det_tree = tree.get("detectors") or {}
    for name, opts in det_tree.items() if isinstance(det_tree, dict) else ():
        if name not in detectors:
            problems.append(f"{origin}: detectors.{name}: unknown detector; expected one of {', '.join(detectors)}")
            continue
        try:
            detector_options[name] = detectors[name].Options.model_validate(opts or {})
        except ValidationError as exc:
            problems += _problems(origin, ("detectors", name), exc, unset)

    sinks = sink_registry()
    names: set[str] = set()
    sink_tree = tree.get("sinks") or []
    for i, opts in enumerate(sink_tree if isinstance(sink_tree, list) else ()):
        kind = opts.get("type") if isinstance(opts, dict) else None
        if kind not in sinks:
            problems.append(f"{origin}: sinks[{i}].type: expected one of {', '.join(sorted(sinks))}, got {kind!r}")
            continue
        if kind == "kafka" and "kafka" not in opts and isinstance(tree.get("kafka"), dict):
            opts = {**opts, "kafka": tree["kafka"]}  # the alert topic lives on the source's cluster by default
        try:
            parsed = sinks[kind].Options.model_validate(opts)
        except ValidationError as exc:
            problems += _problems(origin, ("sinks", i), exc, unset)
            continue
        label = parsed.name or parsed.type
        if label in names:
            problems.append(f"{origin}: sinks[{i}].name: two sinks are named {label!r}; give each a unique name")
        names.add(label)
        sink_options.append(parsed)

    sections = {}
    for key, model in (("delivery", DeliveryOptions), ("telemetry", TelemetryOptions)):
        try:
            sections[key] = model.model_validate(tree.get(key) or {})
        except ValidationError as exc:
            problems += _problems(origin, (key,), exc, unset)

    overrides = tree.get("delivery", {}).get("sinks", {}) if isinstance(tree.get("delivery"), dict) else {}
    for name in overrides if isinstance(overrides, dict) else ():
        if name not in names:
            problems.append(f"{origin}: delivery.sinks.{name}: no sink has this name; "
                            f"expected one of {', '.join(sorted(names)) or '(no sinks configured)'}")
    if problems or cfg is None:
        raise ConfigError(problems)
    cfg.detector_options, cfg.sink_options = detector_options, sink_options
    cfg.delivery_options, cfg.telemetry_options = sections["delivery"], sections["telemetry"]
    return cfg
