"""Decoder for KServe's inference logger: request and response CloudEvents joined into events.

What KServe puts on Kafka (checked against kserve/kserve ``pkg/logger``): the
logger sidecar sends every request and, for HTTP 200 answers, every response as
a CloudEvent to its ``logger.url``; a Knative Kafka broker or KafkaSink writes
them to Kafka. In the Kafka *binary* content mode (the default) the attributes
are headers: ``ce_id`` (the request's ``Ce-Id`` header or a fresh UUID, the same
on request and response: our join key), ``ce_type``
``org.kubeflow.serving.inference.request|response``, ``ce_source`` (the logger's
own URI, not the caller), ``ce_time``, and the extensions
``ce_inferenceservicename``, ``ce_namespace``, ``ce_component``, ``ce_endpoint``
and ``ce_metadata``: a JSON object ``{"Header-Name": ["value", ...]}`` of the
request headers listed in the InferenceService's ``logger.metadataHeaders``.
The value is the HTTP body untouched: KServe v1 ``{"instances": [...]}`` /
``{"predictions": [...]}`` or Open Inference Protocol v2
``{"id", "inputs": [{"name", "shape", "datatype", "data"}]}`` /
``{"model_name", "model_version", "id", "outputs": [...]}``, where a tensor may
use the binary tensor data extension (``parameters.binary_data_size``, its raw
little-endian bytes after the JSON, in tensor order). The *structured* mode
(one JSON envelope with ``specversion`` and ``data``/``data_base64``) is
accepted too.

Choices made here:

- Request or response: ``ce_type``; without it, the topic when it is in only one
  of the two sets; else the body's shape (``inputs``/``instances`` vs
  ``outputs``/``predictions``). Request and response may share one topic, as they
  do behind a Knative broker.
- Join key: ``(ce_inferenceservicename, ce_id)``, else the body's ``id``.
- ``client_id``: KServe forwards no caller identity by itself (``ce_source`` is
  the logger, the same for every request). We read the first of
  ``KServeSpec.client_headers`` (default ``x-client-id``, then
  ``x-forwarded-for``) from ``ce_metadata``, then from a Kafka header of that
  name; else ``"unknown"``. To get per-client detection, list the header in
  ``logger.metadataHeaders`` (Go canonicalises names, so write ``X-Client-Id``;
  we compare without case). A caller can forge any header its gateway does not
  overwrite, so prefer one the gateway sets (an authenticated principal or API
  key id). Of ``X-Forwarded-For`` we take the address appended by the ingress
  proxy: the last one, or ``forwarded_for_trusted_hops`` further left when more
  proxies append after it; the left-most entries are the caller's to invent.
  ``client_header`` names one header instead; ``ce_<attr>`` reads a CloudEvents
  attribute (``ce_source`` works, but makes every caller one client).
- ``model``: ``ce_inferenceservicename``, else the response's ``model_name``,
  else ``"unknown"``; ``model_version`` from the v2 response.
- ``ts``: the request's ``ce_time``, else the Kafka timestamp, else now.
- A request carrying several instances (``shape[0] > 1``, or several v1
  ``instances``) becomes one event per instance, ids ``f"{id}/{i}"``.
- Monitored input: the v2 input tensor named ``KServeSpec.input_name`` (default
  the first); row ``i`` is ``data`` reshaped to ``[shape[0], -1]``. A rank-1
  shape ``[d]`` is one instance of ``d`` features.
- Model output: ``output_name`` or else the first floating tensor of shape
  ``[n, k]`` gives probabilities (``output_kind: logits`` applies a softmax), the
  first integer tensor of shape ``[n]`` gives the predicted labels; v1
  ``predictions`` that are lists of numbers are probabilities, integers are
  labels. Anything else (regression scores) leaves probs NaN and labels -1: the
  input is still monitored.
- Requests with an empty body (metadata and health calls pass through the
  logger too) are skipped, and so are their responses.
- Unmatched halves wait in a buffer bounded by ``max_pending`` (oldest evicted
  first). :meth:`KServeDecoder.pending_offsets` tells the pipeline how far it may
  commit; :meth:`KServeDecoder.expire` gives up on halves older than
  ``join_ttl_s``: a request without response is still monitored (input only,
  labels -1); a response without request is dead-lettered. ``expire(math.inf)``
  flushes everything, for the end of an audit run; at a restart, leave halves
  pending instead: their offsets were not committed, so they are read again.
- A half seen again (producer retry) is ignored and counted in ``duplicates``;
  a response arriving after its request was monitored alone is dead-lettered
  with advice to raise ``join_ttl_s``/``max_pending``.
"""

from __future__ import annotations

import base64
import binascii
import heapq
import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from agent.records import DeadLetter, DecodedBatch, InferenceBatch, RawRecord
from connectors.decoding import (
    check_size,
    flatten_numbers,
    parse_json,
    parse_rfc3339,
    parse_traceparent,
    rows_to_matrix,
    softmax,
    split_json_prefix,
    type_name,
)

CE_REQUEST = "org.kubeflow.serving.inference.request"
CE_RESPONSE = "org.kubeflow.serving.inference.response"

# Open Inference Protocol tensor datatypes we can monitor, by how their JSON data looks.
_FLOAT_TYPES = frozenset({"FP16", "FP32", "FP64", "BF16"})
_INT_TYPES = frozenset({"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"})
_NUMERIC_TYPES = _FLOAT_TYPES | _INT_TYPES | {"BOOL"}
# little-endian element types of the binary tensor data extension (BF16 is widened by hand)
_BINARY_DTYPES = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BF16": np.dtype("<u2"),
}

JoinKey = tuple[str, str]  # (inference service, request id)


@dataclass(frozen=True)
class KServeSpec:
    """What the KServe decoder expects; built by the pipeline from the configuration."""

    request_topics: frozenset[str]
    response_topics: frozenset[str]
    input_dim: int | None = None  # flattened length of one instance; None: learn from the first request
    max_record_bytes: int = 1_048_576
    input_name: str | None = None  # which OIP v2 input tensor to monitor; None: the first
    output_name: str | None = None  # which OIP v2 output tensor holds the answer; None: see module doc
    output_kind: Literal["probs", "logits"] = "probs"
    client_headers: tuple[str, ...] = ("x-client-id", "x-forwarded-for")
    client_header: str | None = None  # one name instead of client_headers; "ce_<attr>" reads a CloudEvents attribute
    forwarded_for_trusted_hops: int = 0  # proxies after the ingress that append to X-Forwarded-For
    join_ttl_s: float = 60.0
    max_pending: int = 100_000
    model: str | None = None  # when set, events for other models are skipped and counted
    n_classes: int | None = None  # width of the probabilities; None: learn from the first response

    def __post_init__(self) -> None:
        if not self.request_topics or not self.response_topics:
            raise ValueError("request_topics and response_topics must each name at least one topic")
        if self.input_dim is not None and self.input_dim < 1:
            raise ValueError(f"input_dim must be a positive integer or None, got {self.input_dim}")
        if self.n_classes is not None and self.n_classes < 1:
            raise ValueError(f"n_classes must be a positive integer or None, got {self.n_classes}")
        if self.max_record_bytes < 1:
            raise ValueError(f"max_record_bytes must be positive, got {self.max_record_bytes}")
        if not self.join_ttl_s > 0:
            raise ValueError(f"join_ttl_s must be positive seconds, got {self.join_ttl_s}")
        if self.max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {self.max_pending}")
        if self.forwarded_for_trusted_hops < 0:
            raise ValueError(f"forwarded_for_trusted_hops must be >= 0, got {self.forwarded_for_trusted_hops}")
        if self.output_kind not in ("probs", "logits"):
            raise ValueError(f"output_kind must be 'probs' or 'logits', got {self.output_kind!r}")


@dataclass
class _Request:
    record: RawRecord
    key: JoinKey
    request_id: str
    ts: float
    service: str | None
    client: str
    traceparent: str | None
    X: np.ndarray  # float32 [n, d]
    arrived: float


@dataclass
class _Response:
    record: RawRecord
    key: JoinKey
    model_name: str | None
    model_version: str | None
    n: int | None  # instances in the answer, when it says
    probs: np.ndarray | None  # float32 [n, k]
    labels: np.ndarray | None  # int64 [n]
    arrived: float


@dataclass
class _Emitted:
    """Joined events of one call, as blocks (one per request); concatenated once at the end."""

    ids: list[str] = field(default_factory=list)
    ts: list[float] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    versions: list[str | None] = field(default_factory=list)
    clients: list[str] = field(default_factory=list)
    traceparents: list[str | None] = field(default_factory=list)
    X: list[np.ndarray] = field(default_factory=list)
    probs: list[np.ndarray | None] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)


# what we remember about keys that are no longer pending
_DONE, _SKIP, _ALONE = "done", "skip", "alone"  # joined; not an inference; request given up on
_REQUEST_DEAD, _RESPONSE_DEAD = "request-dead", "response-dead"


class KServeDecoder:
    """Joins KServe inference-logger requests and responses into inference events."""

    def __init__(self, spec: KServeSpec, clock: Callable[[], float] = time.time):
        """``clock`` stamps each waiting half; :meth:`expire`'s ``now`` must come from the same clock."""
        self.spec = spec
        self.clock = clock
        self.input_dim: int | None = spec.input_dim
        self.n_classes: int | None = spec.n_classes
        names = (spec.client_header,) if spec.client_header else spec.client_headers
        self._client_headers = tuple(name.lower() for name in names)
        self._pending: OrderedDict[JoinKey, _Request | _Response] = OrderedDict()
        # keys no longer pending: (what happened, reason); bounded like the pending buffer
        self._resolved: OrderedDict[JoinKey, tuple[str, str | None]] = OrderedDict()
        # per (topic, partition): a min-heap of waiting offsets, with lazy deletion via counts
        self._offset_heaps: dict[tuple[str, int], list[int]] = {}
        self._offset_counts: dict[tuple[str, int], dict[int, int]] = {}
        self.skipped_other_model = 0
        self.skipped_non_inference = 0
        self.duplicates = 0
        self.evicted = 0

    # ------------------------------------------------------------------ public

    def decode(self, records: Sequence[RawRecord]) -> DecodedBatch:
        """Decode one polled batch; pairs completed by it come out, unmatched halves wait."""
        out = _Emitted()
        now = self.clock()
        for record in records:
            self._take(record, now, out)
        return self._finish(out)

    def pending_offsets(self) -> dict[tuple[str, int], int]:
        """Per (topic, partition), the smallest offset still waiting for its other half.

        The pipeline must not commit past it: committing exactly this offset (the
        next one to read) makes a restarted agent read the waiting record again.
        Partitions with nothing waiting are absent.
        """
        result: dict[tuple[str, int], int] = {}
        for tp, heap in self._offset_heaps.items():
            counts = self._offset_counts[tp]
            while heap and heap[0] not in counts:
                heapq.heappop(heap)
            if heap:
                result[tp] = heap[0]
        return result

    def expire(self, now: float | None = None) -> DecodedBatch:
        """Give up on halves that waited longer than ``join_ttl_s`` (``now`` from this decoder's clock).

        A request without its response is still monitored (input only, labels -1);
        a response without its request is dead-lettered. ``expire(math.inf)``
        flushes every waiting half (end of an audit run).
        """
        if now is None:
            now = self.clock()
        cutoff = now - self.spec.join_ttl_s
        out = _Emitted()
        while self._pending:
            key, half = next(iter(self._pending.items()))
            if half.arrived > cutoff:
                break
            self._unpend(key)
            self._give_up(half, f"waited longer than join_ttl_s={self.spec.join_ttl_s:g}s", out)
        return self._finish(out)

    @property
    def n_pending(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------ per record

    def _take(self, record: RawRecord, now: float, out: _Emitted) -> None:
        """Parse one record and join it, or park it, or skip it, or dead-letter it."""
        attrs = self._attributes(record)
        reason = check_size(record, self.spec.max_record_bytes)
        body: Any = None
        if reason is None:
            attrs, body, reason = self._envelope(record, attrs)
        kind = self._kind(record, attrs, body)
        request_id = attrs.get("id") or (body.get("id") if type(body) is dict else None)
        key: JoinKey | None = None
        if type(request_id) is str and request_id:
            key = (attrs.get("inferenceservicename", ""), request_id)

        if kind == "request" and record.value is not None and (not record.value or (body is None and reason is None)):
            self._skip_non_inference(key)  # empty body: a metadata or health call passing the logger
            return
        if reason is not None:
            out.dead.append(DeadLetter(record, reason))
            if kind is not None and key is not None:
                self._half_failed(key, kind, reason, out)
            return
        if kind is None:
            ce_type = attrs.get("type")
            out.dead.append(DeadLetter(record, _neither_reason(ce_type)))
            return
        if key is None:
            out.dead.append(DeadLetter(record, "no join key: neither a ce_id header nor a string body id"))
            return
        if kind == "response" and _is_non_inference_answer(body):
            self._skip_non_inference(key)
            return

        resolved = self._resolved.get(key)
        if resolved is not None:
            what = resolved[0]
            if what == _SKIP:
                return
            if what == _DONE:
                self.duplicates += 1
                return
            if what == _ALONE:
                if kind == "response":
                    late = f"late response: its request was already monitored alone ({resolved[1]}); "
                    out.dead.append(DeadLetter(record, late + "raise join_ttl_s or max_pending"))
                else:
                    self.duplicates += 1
                return
            if (what == _REQUEST_DEAD) == (kind == "request"):
                # the half that was dead-lettered came again (a retry): judge it afresh
                del self._resolved[key]
                resolved = None
        waiting = self._pending.get(key)
        if waiting is not None and (type(waiting) is _Request) == (kind == "request"):
            self.duplicates += 1  # the same half again (a producer retry); the first one stands
            return

        if kind == "request":
            half: _Request | _Response | str = self._parse_request(record, key, request_id, attrs, body, now)
        else:
            half = self._parse_response(record, key, body, now)
        if type(half) is str:
            out.dead.append(DeadLetter(record, half))
            self._half_failed(key, kind, half, out)
            return
        if resolved is not None:  # the other half was dead-lettered earlier
            if type(half) is _Request:
                self._remember(key, _DONE, None)
                self._emit(half, None, out)
            else:
                out.dead.append(DeadLetter(record, f"its request was dead-lettered: {resolved[1]}"))
            return
        if waiting is not None:
            self._unpend(key)
            self._remember(key, _DONE, None)
            if type(half) is _Request:
                self._emit(half, waiting, out)  # type: ignore[arg-type]
            else:
                self._emit(waiting, half, out)  # type: ignore[arg-type]
            return
        self._pend(key, half)  # type: ignore[arg-type]
        while len(self._pending) > self.spec.max_pending:
            old_key, old = self._pending.popitem(last=False)
            self._unpend(old_key, already_removed=old)
            self.evicted += 1
            self._give_up(old, f"evicted: more than max_pending={self.spec.max_pending} halves waiting", out)

    def _half_failed(self, key: JoinKey, kind: str, reason: str, out: _Emitted) -> None:
        """One half was dead-lettered: settle its partner if it waits, and remember for when it comes."""
        waiting = self._pending.get(key)
        if waiting is not None and (type(waiting) is _Request) == (kind == "request"):
            return  # a broken copy of a half we already hold; the good one stands
        if kind == "request":
            self._remember(key, _REQUEST_DEAD, reason)
            if waiting is not None:  # its response can never be joined now
                self._unpend(key)
                out.dead.append(DeadLetter(waiting.record, f"its request was dead-lettered: {reason}"))
        else:
            self._remember(key, _RESPONSE_DEAD, reason)
            if waiting is not None:  # monitor the request without an answer
                self._unpend(key)
                self._remember(key, _DONE, None)
                self._emit(waiting, None, out)  # type: ignore[arg-type]

    def _skip_non_inference(self, key: JoinKey | None) -> None:
        self.skipped_non_inference += 1
        if key is not None:
            if self._pending.get(key) is not None:  # its other half came first: skip it too
                self._unpend(key)
                self.skipped_non_inference += 1
            self._remember(key, _SKIP, None)

    @staticmethod
    def _attributes(record: RawRecord) -> dict[str, str]:
        """CloudEvents attributes from Kafka binary-mode headers (``ce_<name>``); the last wins."""
        attrs: dict[str, str] = {}
        for name, value in record.headers:
            if name.startswith("ce_") and value is not None:
                attrs[name[3:]] = value.decode("utf-8", errors="replace")
        return attrs

    def _envelope(self, record: RawRecord, attrs: dict[str, str]) -> tuple[dict[str, str], Any, str | None]:
        """(attributes, parsed body, None) or (attributes, None, reason). Binary and structured mode."""
        attrs = dict(attrs)
        assert record.value is not None
        body, reason = parse_json(record.value)
        if reason is not None:
            if b'"binary_data_size"' not in record.value:
                return attrs, None, reason
            body, reason = _attach_binary_data(record.value)
            if reason is not None:
                return attrs, None, reason
        content_type = (record.header("content-type") or b"").decode("latin-1").lower()
        structured = content_type.startswith("application/cloudevents") or (
            not attrs and type(body) is dict and "specversion" in body
        )
        if not structured:
            return attrs, body, None
        if type(body) is not dict:
            return attrs, None, f"structured CloudEvent: expected a JSON object, got {type_name(body)}"
        for name, value in body.items():
            if name not in ("data", "data_base64") and value is not None:
                attrs[name] = value if type(value) is str else json.dumps(value)
        if "data_base64" in body:
            encoded = body["data_base64"]
            if type(encoded) is not str:
                return attrs, None, "structured CloudEvent: data_base64 is not a string"
            try:
                data = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                return attrs, None, "structured CloudEvent: data_base64 is not valid base64"
            if not data:
                return attrs, None, None
            inner, reason = parse_json(data)
            return attrs, inner, (None if reason is None else f"data_base64 {reason}")
        data = body.get("data")
        if type(data) is str:
            if not data:
                return attrs, None, None
            inner, reason = parse_json(data.encode("utf-8"))
            return attrs, inner, (None if reason is None else f"data {reason}")
        return attrs, data, None

    def _kind(self, record: RawRecord, attrs: dict[str, str], body: Any) -> str | None:
        """'request', 'response', or None when it is neither."""
        ce_type = attrs.get("type")
        if ce_type is None:
            raw_type = record.header("ce_type")
            ce_type = None if raw_type is None else raw_type.decode("utf-8", errors="replace")
        if ce_type is not None:
            if ce_type == CE_REQUEST:
                return "request"
            if ce_type == CE_RESPONSE:
                return "response"
            return None
        in_requests = record.topic in self.spec.request_topics
        in_responses = record.topic in self.spec.response_topics
        if in_requests != in_responses:
            return "request" if in_requests else "response"
        if type(body) is dict:
            if "inputs" in body or "instances" in body:
                return "request"
            if "outputs" in body or "predictions" in body:
                return "response"
        return None

    # ----------------------------------------------------------- bodies

    def _client(self, record: RawRecord, attrs: dict[str, str]) -> str:
        """The caller's identity from forwarded request headers; see the module doc."""
        forwarded: dict[str, Any] = {}
        metadata = attrs.get("metadata")
        if metadata and metadata not in ("{}", "null"):
            parsed, _ = parse_json(metadata.encode("utf-8"))
            if type(parsed) is dict:
                forwarded = {str(k).lower(): v for k, v in parsed.items()}
        for name in self._client_headers:
            if name.startswith("ce_"):  # a CloudEvents attribute, e.g. ce_source (the same for every caller)
                value = attrs.get(name[3:])
                if value and value.strip():
                    return value.strip()
                continue
            value = forwarded.get(name)
            if type(value) is list:
                value = next((v for v in value if type(v) is str and v.strip()), None)
            if type(value) is not str:
                raw = next((v for k, v in reversed(record.headers) if k.lower() == name and v), None)
                value = None if raw is None else raw.decode("utf-8", errors="replace")
            if value and value.strip():
                if name == "x-forwarded-for":
                    # the left entries are whatever the caller sent (forgeable); each proxy appends
                    # the peer it saw, so the trustworthy one is counted from the right
                    hops = [hop.strip() for hop in value.split(",") if hop.strip()]
                    value = hops[max(0, len(hops) - 1 - self.spec.forwarded_for_trusted_hops)]
                return value.strip()
        return "unknown"

    def _traceparent(self, record: RawRecord, attrs: dict[str, str]) -> str | None:
        found = parse_traceparent(record.header("traceparent")) or parse_traceparent(attrs.get("traceparent"))
        if found is None and "traceparent" in attrs.get("metadata", "").lower():
            parsed, _ = parse_json(attrs["metadata"].encode("utf-8"))
            if type(parsed) is dict:
                for name, values in parsed.items():
                    if str(name).lower() == "traceparent" and type(values) is list and values:
                        found = parse_traceparent(str(values[0]))
        return found

    def _parse_request(
        self, record: RawRecord, key: JoinKey, request_id: str, attrs: dict[str, str], body: Any, now: float
    ) -> _Request | str:
        if type(body) is not dict:
            return f"request: expected a JSON object, got {type_name(body)}"
        rows = self._request_rows(body)
        if type(rows) is str:
            return rows
        X: np.ndarray = rows  # type: ignore[assignment]
        dim = self.input_dim
        if dim is None:
            self.input_dim = dim = X.shape[1]
        elif X.shape[1] != dim:
            return f"input: expected {dim} numbers per instance, got {X.shape[1]}"
        ts: float | None = None
        if "time" in attrs:
            ts = parse_rfc3339(attrs["time"])
        if ts is None:
            ts = record.timestamp_ms / 1000.0 if record.timestamp_ms is not None else time.time()
        return _Request(
            record=record,
            key=key,
            request_id=request_id,
            ts=ts,
            service=attrs.get("inferenceservicename") or None,
            client=self._client(record, attrs),
            traceparent=self._traceparent(record, attrs),
            X=X,
            arrived=now,
        )

    def _request_rows(self, body: dict[str, Any]) -> np.ndarray | str:
        """The monitored input as float32 [n, d], from a v2 or v1 request body, or a reason."""
        inputs = body.get("inputs")
        if type(inputs) is list and inputs and type(inputs[0]) is dict:
            return self._v2_input(inputs)
        instances = body.get("instances")
        field_name = "instances"
        if instances is None and type(inputs) is list:
            instances, field_name = inputs, "inputs"  # v1 (TensorFlow "columnar") spelling
        if type(instances) is not list or not instances:
            return "request: expected OIP v2 'inputs' tensors or v1 'instances', found neither"
        if type(instances[0]) is dict:
            return f"{field_name}: named-feature objects are not supported; send arrays of numbers"
        rows: list[Any] = []
        for index, instance in enumerate(instances):
            if type(instance) is list:
                flat = instance if not instance or type(instance[0]) is not list else None
                if flat is None:
                    flat = flatten_numbers(instance, field_name)
                    if type(flat) is str:
                        return f"{field_name}: instance {index}, {flat.split(': ', 1)[-1]}"
                rows.append(flat)
            elif type(instance) in (int, float):
                rows.append([instance])
            else:
                return f"{field_name}: instance {index} is {type_name(instance)}, expected an array of numbers"
        width = len(rows[0])
        if width == 0:
            return f"{field_name}: instance 0 is empty; expected the model's input features"
        for index, row in enumerate(rows):
            if len(row) != width:
                return f"{field_name}: instance {index} has {len(row)} numbers, instance 0 has {width}"
            if any(type(v) is bool for v in row):
                return f"{field_name}: instance {index} contains true/false; expected numbers only"
        matrix, bad = rows_to_matrix(rows, width, field_name)
        if bad:
            index, reason = next(iter(bad.items()))
            return f"{field_name}: instance {index}, {reason.split(': ', 1)[-1]}"
        return matrix

    def _v2_input(self, inputs: list[Any]) -> np.ndarray | str:
        name = self.spec.input_name
        if name is None:
            tensor, label = inputs[0], "inputs[0]"
        else:
            tensor = next((t for t in inputs if type(t) is dict and t.get("name") == name), None)
            label = f"inputs[{name!r}]"
            if tensor is None:
                names = [t.get("name") for t in inputs if type(t) is dict]
                return f"inputs: no tensor named {name!r} (found {names}); set input_name"
        parsed = _tensor(tensor, label)
        if type(parsed) is str:
            return parsed
        shape, datatype, flat = parsed  # type: ignore[misc]
        if datatype not in _NUMERIC_TYPES:
            return f"{label}: datatype {datatype} is not numeric; inferwatch monitors numeric tensors"
        n = shape[0] if len(shape) >= 2 else 1
        width = math.prod(shape[1:]) if len(shape) >= 2 else math.prod(shape)
        if n == 0 or width == 0:
            return f"{label}: shape {shape} holds no data"
        matrix = _numbers(flat, f"{label}.data", allow_bool=datatype == "BOOL")
        if type(matrix) is str:
            return matrix
        return matrix.reshape(n, width)

    def _parse_response(self, record: RawRecord, key: JoinKey, body: Any, now: float) -> _Response | str:
        if type(body) is not dict:
            return f"response: expected a JSON object, got {type_name(body)}"
        model_name = body.get("model_name")
        version = body.get("model_version")
        answer = self._v2_output(body["outputs"]) if type(body.get("outputs")) is list else None
        if answer is None:
            predictions = body.get("predictions")
            if type(predictions) is list:
                answer = self._v1_predictions(predictions)
            elif "outputs" not in body:
                return "response: expected OIP v2 'outputs' or v1 'predictions', found neither"
            else:
                return f"outputs: expected an array of tensors, got {type_name(body['outputs'])}"
        if type(answer) is str:
            return answer
        n, scores, labels = answer  # type: ignore[misc]
        probs: np.ndarray | None = None
        if scores is not None:
            k = self.n_classes
            if k is None:
                self.n_classes = k = scores.shape[1]
            elif scores.shape[1] != k:
                return f"outputs: expected {k} classes, got {scores.shape[1]}"
            if self.spec.output_kind == "logits":
                probs = softmax(scores)
            else:
                if ((scores < 0.0) | (scores > 1.0)).any():
                    return "outputs: probabilities must lie in [0, 1]; set output_kind: logits for raw scores"
                probs = scores
        if labels is not None:
            labels = np.where(labels < 0, -1, labels)
            if self.n_classes is not None and (labels >= self.n_classes).any():
                return f"outputs: label {int(labels.max())} is not a class index below n_classes={self.n_classes}"
        elif probs is not None:
            labels = probs.argmax(axis=1).astype(np.int64)
        return _Response(
            record=record,
            key=key,
            model_name=model_name if type(model_name) is str and model_name else None,
            model_version=version if type(version) is str and version else None,
            n=n,
            probs=probs,
            labels=labels,
            arrived=now,
        )

    def _v2_output(self, outputs: list[Any]) -> tuple[int | None, np.ndarray | None, np.ndarray | None] | str:
        """(instances, scores [n,k] or None, labels [n] or None) from OIP v2 outputs, or a reason."""
        tensors: list[tuple[str, tuple[int, ...], str, list[Any]]] = []
        for index, tensor in enumerate(outputs):
            if self.spec.output_name is not None and (
                type(tensor) is not dict or tensor.get("name") != self.spec.output_name
            ):
                continue
            parsed = _tensor(tensor, f"outputs[{index}]")
            if type(parsed) is str:
                return parsed
            shape, datatype, flat = parsed  # type: ignore[misc]
            tensors.append((f"outputs[{index}]", shape, datatype, flat))
        if self.spec.output_name is not None and not tensors:
            names = [t.get("name") for t in outputs if type(t) is dict]
            return f"outputs: no tensor named {self.spec.output_name!r} (found {names}); set output_name"
        n: int | None = None  # only tensors we use say how many instances the answer has
        scores: np.ndarray | None = None
        labels: np.ndarray | None = None
        for label, shape, datatype, flat in tensors:
            if scores is None and datatype in _FLOAT_TYPES and len(shape) == 2:
                matrix = _numbers(flat, f"{label}.data")
                if type(matrix) is str:
                    return matrix
                scores = matrix.reshape(shape)
                n = shape[0]
            elif labels is None and datatype in _INT_TYPES and (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
                if type(flat) is np.ndarray:
                    labels = flat.astype(np.int64)
                elif any(type(v) is not int for v in flat):
                    return f"{label}.data: datatype {datatype} needs integers"
                else:
                    labels = np.asarray(flat, dtype=np.int64)
                n = shape[0]
        if scores is not None and labels is not None and scores.shape[0] != labels.shape[0]:
            return f"outputs: {scores.shape[0]} probability rows but {labels.shape[0]} labels"
        return n, scores, labels

    @staticmethod
    def _v1_predictions(
        predictions: list[Any],
    ) -> tuple[int | None, np.ndarray | None, np.ndarray | None] | str:
        n = len(predictions)
        if n == 0:
            return "predictions: empty"
        if all(type(p) is int for p in predictions):
            return n, None, np.asarray(predictions, dtype=np.int64)
        if all(type(p) is list for p in predictions):
            width = len(predictions[0])
            if width == 0 or any(len(p) != width for p in predictions):
                return "predictions: rows of probabilities must be non-empty and of equal length"
            matrix, bad = rows_to_matrix(predictions, width, "predictions")
            if bad:
                index, reason = next(iter(bad.items()))
                return f"predictions: row {index}, {reason.split(': ', 1)[-1]}"
            return n, matrix, None
        return n, None, None  # regression scores or objects: nothing we can use as a class

    # ---------------------------------------------------------- bookkeeping

    def _pend(self, key: JoinKey, half: _Request | _Response) -> None:
        self._pending[key] = half
        tp = (half.record.topic, half.record.partition)
        counts = self._offset_counts.setdefault(tp, {})
        offset = half.record.offset
        if counts.get(offset, 0) == 0:
            heapq.heappush(self._offset_heaps.setdefault(tp, []), offset)
        counts[offset] = counts.get(offset, 0) + 1

    def _unpend(self, key: JoinKey, already_removed: _Request | _Response | None = None) -> None:
        half = already_removed if already_removed is not None else self._pending.pop(key)
        tp = (half.record.topic, half.record.partition)
        counts = self._offset_counts[tp]
        offset = half.record.offset
        counts[offset] -= 1
        if counts[offset] == 0:
            del counts[offset]
            heap = self._offset_heaps[tp]
            if len(heap) > 2 * len(counts) + 64:  # mostly settled offsets: rebuild, so memory stays bounded
                heap[:] = list(counts)
                heapq.heapify(heap)

    def _remember(self, key: JoinKey, what: str, reason: str | None) -> None:
        self._resolved[key] = (what, reason)
        self._resolved.move_to_end(key)
        while len(self._resolved) > self.spec.max_pending:
            self._resolved.popitem(last=False)

    def _give_up(self, half: _Request | _Response, why: str, out: _Emitted) -> None:
        """A half whose partner will not come: monitor a request alone, dead-letter a response."""
        if type(half) is _Request:
            self._remember(half.key, _ALONE, why)
            self._emit(half, None, out)
        else:
            self._remember(half.key, _RESPONSE_DEAD, why)
            out.dead.append(DeadLetter(half.record, f"response without request: {why}"))

    def _emit(self, request: _Request, response: _Response | None, out: _Emitted) -> None:
        """Append one event per instance of ``request``, with the answer when it fits."""
        model = request.service or (response.model_name if response else None) or "unknown"
        if self.spec.model is not None and model != self.spec.model:
            self.skipped_other_model += 1
            return
        n = request.X.shape[0]
        if response is not None and response.n is not None and response.n != n:
            out.dead.append(
                DeadLetter(response.record, f"instance count: the response has {response.n}, its request {n}")
            )
            response = None
        ids = [request.request_id] if n == 1 else [f"{request.request_id}/{i}" for i in range(n)]
        out.ids.extend(ids)
        out.ts.extend([request.ts] * n)
        out.models.extend([model] * n)
        out.versions.extend([response.model_version if response else None] * n)
        out.clients.extend([request.client] * n)
        out.traceparents.extend([request.traceparent] * n)
        out.X.append(request.X)
        out.probs.append(response.probs if response is not None else None)
        if response is not None and response.labels is not None:
            out.labels.append(response.labels)
        else:
            out.labels.append(np.full(n, -1, np.int64))

    def _finish(self, out: _Emitted) -> DecodedBatch:
        if not out.ids:
            return DecodedBatch(dead=tuple(out.dead))
        X = np.concatenate(out.X) if len(out.X) > 1 else out.X[0]
        probs: np.ndarray | None = None
        if any(p is not None for p in out.probs):
            k = self.n_classes or 0
            blocks = [
                p if p is not None else np.full((x.shape[0], k), np.nan, np.float32) for p, x in zip(out.probs, out.X)
            ]
            probs = np.concatenate(blocks).astype(np.float32, copy=False)
        batch = InferenceBatch(
            ids=tuple(out.ids),
            ts=np.asarray(out.ts, dtype=np.float64),
            models=tuple(out.models),
            model_versions=tuple(out.versions),
            clients=tuple(out.clients),
            X=X,
            probs=probs,
            labels=np.concatenate(out.labels),
            traceparents=tuple(out.traceparents),
        )
        return DecodedBatch(inference=batch, dead=tuple(out.dead))


def _neither_reason(ce_type: str | None) -> str:
    if ce_type:
        return f"not a KServe event: ce_type {ce_type!r} is not an inference request or response"
    return (
        "cannot tell request from response: no ce_type header, and the body has neither "
        "inputs/instances nor outputs/predictions"
    )


_NON_INFERENCE_KEYS = frozenset({"versions", "platform", "ready", "live", "extensions"})


def _is_non_inference_answer(body: Any) -> bool:
    """A model-metadata or health answer (OIP v2), which also passes through the logger."""
    return (
        type(body) is dict
        and "outputs" not in body
        and "predictions" not in body
        and not _NON_INFERENCE_KEYS.isdisjoint(body)
    )


def _attach_binary_data(raw: bytes) -> tuple[Any, str | None]:
    """Parse a body using the binary tensor data extension: JSON, then each tensor's bytes in order.

    Each tensor whose ``parameters.binary_data_size`` is set gets its slice of the
    bytes as ``data`` (a ``bytes`` value, which JSON itself can never produce).
    """
    split = split_json_prefix(raw)
    if type(split) is str:
        return None, split
    body, rest = split  # type: ignore[misc]
    if type(body) is not dict:
        return None, f"expected a JSON object before the binary data, got {type_name(body)}"
    position = 0
    for group in ("inputs", "outputs"):
        tensors = body.get(group)
        if type(tensors) is not list:
            continue
        for index, tensor in enumerate(tensors):
            parameters = tensor.get("parameters") if type(tensor) is dict else None
            if type(parameters) is not dict or "binary_data_size" not in parameters:
                continue
            size = parameters["binary_data_size"]
            if type(size) is not int or size < 0 or position + size > len(rest):
                return None, (
                    f"{group}[{index}].parameters.binary_data_size: {size!r} does not fit the "
                    f"{len(rest) - position} bytes left after the JSON"
                )
            tensor["data"] = rest[position : position + size]
            position += size
    if position != len(rest):
        return (
            None,
            f"binary data: {len(rest) - position} bytes after the JSON that no tensor's binary_data_size claims",
        )
    return body, None


def _numbers(flat: list[Any] | np.ndarray, label: str, allow_bool: bool = False) -> np.ndarray | str:
    """One tensor's flat data as float32 [1, size], or the reason it is not all finite numbers."""
    if type(flat) is np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):
            matrix = flat.astype(np.float32)[None, :]
        bad = np.flatnonzero(~np.isfinite(matrix[0]))
        if bad.size:
            return f"{label}: element {int(bad[0])} is not finite (NaN, infinity or beyond float32 range)"
        return matrix
    matrix, bad_rows = rows_to_matrix([flat], len(flat), label, allow_bool=allow_bool)
    return bad_rows[0] if bad_rows else matrix


def _binary_values(chunk: bytes, datatype: str, label: str) -> np.ndarray | str:
    dtype = _BINARY_DTYPES.get(datatype)
    if dtype is None:
        return f"{label}: datatype {datatype} is not numeric; inferwatch monitors numeric tensors"
    if len(chunk) % dtype.itemsize:
        return f"{label}: {len(chunk)} binary bytes is not a whole number of {datatype} values"
    values = np.frombuffer(chunk, dtype=dtype)
    if datatype == "BF16":  # bfloat16 is the upper half of a float32
        values = (values.astype(np.uint32) << 16).view(np.float32)
    return values


def _tensor(tensor: Any, label: str) -> tuple[tuple[int, ...], str, list[Any] | np.ndarray] | str:
    """(shape, datatype, flat data) of one OIP v2 tensor object, checked against its shape."""
    if type(tensor) is not dict:
        return f"{label}: expected a tensor object, got {type_name(tensor)}"
    shape = tensor.get("shape")
    if type(shape) is not list or any(type(s) is not int or s < 0 for s in shape):
        return f"{label}.shape: expected an array of non-negative integers"
    datatype = tensor.get("datatype")
    if type(datatype) is not str:
        return f"{label}.datatype: expected a string such as FP32, got {type_name(datatype)}"
    data = tensor.get("data")
    if type(data) is bytes:  # binary tensor data extension, attached by _attach_binary_data
        values = _binary_values(data, datatype, label)
        if type(values) is str:
            return values
        if values.size != math.prod(shape):
            return f"{label}: shape {shape} needs {math.prod(shape)} values, the binary data has {values.size}"
        return tuple(shape), datatype, values
    parameters = tensor.get("parameters")
    if type(parameters) is dict and "binary_data_size" in parameters:
        return f"{label}: parameters.binary_data_size is set but no binary data follows the JSON body"
    if type(data) is not list:
        return f"{label}.data: expected an array, got {type_name(data)}"
    if data and type(data[0]) is list:
        flat = flatten_numbers(data, f"{label}.data", allow_bool=datatype == "BOOL")
        if type(flat) is str:
            return flat
        data = flat
    if datatype != "BOOL" and any(type(v) is bool for v in data):
        return f"{label}.data: contains true/false but datatype is {datatype}"
    expected = math.prod(shape)
    if len(data) != expected:
        return f"{label}.data: shape {shape} needs {expected} values, got {len(data)}"
    return tuple(shape), datatype, data
