"""A real HTTP server on 127.0.0.1 that plays Splunk HEC, Elasticsearch ``_bulk`` and a webhook receiver.

It checks every request against the wire format each vendor documents, byte
for byte where the format is byte-exact, and records a violation in
``errors`` (answering 400 like the real server would) instead of accepting
loose input, so a test that forgets to look still fails on ``errors``. It can
also misbehave on purpose: scripted status codes (429, 503, 403 ...), a
Splunk event that is "malformed" (400 with ``invalid-event-number``), per-item
Elasticsearch failures, delayed indexer acknowledgements, and a real outage
(the listening socket closed, so connections are refused).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import socket
import ssl
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HEC_EVENT = "/services/collector/event"
HEC_ACK = "/services/collector/ack"
BULK = "/_bulk"
HEC_KEYS = ["time", "host", "source", "sourcetype", "index", "event"]


def compact(value: Any) -> bytes:
    """Compact JSON as the sinks must write it (no spaces, UTF-8)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes


@dataclass
class Receiver:
    """Start with :meth:`start`, or use as a context manager. Everything it saw is in the attributes."""

    hec_token: str = "hec-token-123"
    elastic_api_key: str | None = "ZWxhc3RpYzpzM2NyM3Q="
    elastic_basic: tuple[str, str] | None = None
    webhook_secret: bytes | None = None
    webhook_path: str = "/hooks/inferwatch"
    hec_bad_event: Callable[[dict[str, Any]], bool] = lambda env: False
    hec_ack_after_polls: int | None = None  # None: the token has no indexer acknowledgement
    elastic_item_status: Callable[[dict[str, Any]], int] = lambda doc: 201
    tls_cert: tuple[str, str] | None = None  # (certificate PEM, key PEM): serve HTTPS

    requests: list[Request] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # wire-format violations
    hec_events: list[dict[str, Any]] = field(default_factory=list)  # accepted envelopes, in order
    es_docs: dict[str, dict[str, Any]] = field(default_factory=dict)  # _id -> document, creation order
    es_index_of: dict[str, str] = field(default_factory=dict)
    webhook_batches: list[list[dict[str, Any]]] = field(default_factory=list)
    scripted: dict[str, deque[tuple[int, bytes]]] = field(default_factory=dict)
    outage_status: int | None = None  # answer every request with this status while set

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0
        self._connections: set[socket.socket] = set()
        self._ack_polls: dict[int, int] = {}
        self._next_ack = 0

    # -- lifecycle
    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers do

            def setup(self) -> None:
                super().setup()
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with receiver._lock:
                    receiver._connections.add(self.connection)

            def finish(self) -> None:
                with receiver._lock:
                    receiver._connections.discard(self.connection)
                super().finish()

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                req = Request("POST", self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                status, payload = receiver.handle(req)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        if self.tls_cert is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*self.tls_cert)
            self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the listening socket and every open connection: a real outage, connections are refused."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            for conn in self._connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            self._connections.clear()

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls_cert else 'http'}://127.0.0.1:{self.port}"

    def script(self, path: str, *statuses: int, body: bytes = b'{"text":"scripted"}') -> None:
        """Answer the next requests to ``path`` with these statuses (before any checks)."""
        with self._lock:
            self.scripted.setdefault(path, deque()).extend((s, body) for s in statuses)

    # -- dispatch
    def handle(self, req: Request) -> tuple[int, bytes]:
        with self._lock:
            self.requests.append(req)
            if self.outage_status is not None:
                return self.outage_status, b'{"text":"outage"}'
            queue = self.scripted.get(req.path)
            if queue:
                return queue.popleft()
            if req.path == HEC_EVENT:
                return self._hec_event(req)
            if req.path == HEC_ACK:
                return self._hec_ack(req)
            if req.path == BULK:
                return self._bulk(req)
            if req.path == self.webhook_path:
                return self._webhook(req)
            return 404, b'{"error":"no such path"}'

    def _violation(self, message: str) -> tuple[int, bytes]:
        self.errors.append(message)
        return 400, compact({"text": message, "code": 6})

    # -- Splunk HEC
    def _hec_event(self, req: Request) -> tuple[int, bytes]:
        auth = req.headers.get("authorization", "")
        if not auth.startswith("Splunk "):
            return 401, compact({"text": "Token is required", "code": 2})
        if auth != f"Splunk {self.hec_token}":
            return 403, compact({"text": "Invalid token", "code": 4})
        envelopes, problem = parse_hec_body(req.body)
        if problem:
            return self._violation(problem)
        for i, env in enumerate(envelopes):
            if self.hec_bad_event(env):
                # Splunk rejects the request at the first bad event; nothing of it is indexed here.
                return 400, compact({"text": "Invalid data format", "code": 6, "invalid-event-number": i})
        self.hec_events.extend(envelopes)
        if self.hec_ack_after_polls is None:
            return 200, b'{"text":"Success","code":0}'
        if "x-splunk-request-channel" not in req.headers:
            return 400, compact({"text": "Data channel is missing", "code": 10})
        ack_id = self._next_ack
        self._next_ack += 1
        self._ack_polls[ack_id] = 0
        return 200, compact({"text": "Success", "code": 0, "ackId": ack_id})

    def _hec_ack(self, req: Request) -> tuple[int, bytes]:
        if req.headers.get("authorization") != f"Splunk {self.hec_token}":
            return 403, compact({"text": "Invalid token", "code": 4})
        if "x-splunk-request-channel" not in req.headers:
            return self._violation("ack poll without X-Splunk-Request-Channel")
        try:
            ids = json.loads(req.body)["acks"]
        except (ValueError, KeyError):
            return self._violation(f"ack body is not {{\"acks\":[...]}}: {req.body!r}")
        out = {}
        for ack_id in ids:
            polls = self._ack_polls.get(ack_id, 0) + 1
            self._ack_polls[ack_id] = polls
            out[str(ack_id)] = self.hec_ack_after_polls is not None and polls >= self.hec_ack_after_polls
        return 200, compact({"acks": out})

    # -- Elasticsearch
    def _bulk(self, req: Request) -> tuple[int, bytes]:
        if not self._elastic_auth_ok(req.headers.get("authorization", "")):
            return 401, compact({"error": {"type": "security_exception"}, "status": 401})
        if req.headers.get("content-type") != "application/x-ndjson":
            return self._violation(f"_bulk Content-Type is {req.headers.get('content-type')!r}")
        pairs, problem = parse_bulk_body(req.body)
        if problem:
            return self._violation(problem)
        items, errors = [], False
        for action, doc in pairs:
            meta = action["create"]
            status = self.elastic_item_status(doc)
            if status == 201 and meta["_id"] in self.es_docs:
                status = 409
            if status == 201:
                self.es_docs[meta["_id"]] = doc
                self.es_index_of[meta["_id"]] = meta["_index"]
                items.append({"create": {"_index": meta["_index"], "_id": meta["_id"], "status": 201,
                                         "result": "created"}})
            else:
                errors = True
                kind = {409: "version_conflict_engine_exception", 429: "es_rejected_execution_exception"}.get(
                    status, "mapper_parsing_exception")
                items.append({"create": {"_index": meta["_index"], "_id": meta["_id"], "status": status,
                                         "error": {"type": kind, "reason": "scripted"}}})
        return 200, compact({"took": 1, "errors": errors, "items": items})

    def _elastic_auth_ok(self, auth: str) -> bool:
        if self.elastic_api_key is not None and auth == f"ApiKey {self.elastic_api_key}":
            return True
        if self.elastic_basic is not None:
            user, pw = self.elastic_basic
            return auth == "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()
        return False

    # -- webhook
    def _webhook(self, req: Request) -> tuple[int, bytes]:
        if req.headers.get("content-type") != "application/json":
            return self._violation(f"webhook Content-Type is {req.headers.get('content-type')!r}")
        if self.webhook_secret is not None:
            expected = "sha256=" + hmac.new(self.webhook_secret, req.body, hashlib.sha256).hexdigest()
            got = req.headers.get("x-inferwatch-signature-256", "")
            if not hmac.compare_digest(expected, got):
                return 401, b'{"error":"bad signature"}'
        try:
            batch = json.loads(req.body)
        except ValueError:
            return self._violation("webhook body is not JSON")
        if not isinstance(batch, list) or compact(batch) != req.body:
            return self._violation("webhook body is not a compact JSON array")
        self.webhook_batches.append(batch)
        return 200, b"{}"

    @property
    def webhook_findings(self) -> list[dict[str, Any]]:
        return [f for batch in self.webhook_batches for f in batch]


def parse_hec_body(body: bytes) -> tuple[list[dict[str, Any]], str | None]:
    """Envelopes of a HEC batch: JSON objects back to back, no commas, no separators, compact.

    Returns the envelopes and None, or what is wrong with the body.
    """
    text = body.decode("utf-8")
    decoder = json.JSONDecoder()
    pos, envelopes = 0, []
    while pos < len(text):
        if text[pos] != "{":
            return [], f"HEC batch: expected '{{' at byte {pos}, got {text[pos]!r} (objects must be concatenated)"
        try:
            obj, end = decoder.raw_decode(text, pos)
        except ValueError as exc:
            return [], f"HEC batch: invalid JSON at {pos}: {exc}"
        if compact(obj).decode() != text[pos:end]:
            return [], "HEC batch: an envelope is not compact JSON"
        keys = list(obj)
        if [k for k in HEC_KEYS if k in keys] != keys or "event" not in obj or "time" not in obj:
            return [], f"HEC envelope keys {keys} are not {HEC_KEYS} (index optional) in that order"
        if not isinstance(obj["time"], int | float) or not isinstance(obj["event"], dict):
            return [], "HEC envelope: time must be epoch seconds, event an object"
        envelopes.append(obj)
        pos = end
    if not envelopes:
        return [], "HEC batch is empty"
    return envelopes, None


def parse_bulk_body(body: bytes) -> tuple[list[tuple[dict[str, Any], dict[str, Any]]], str | None]:
    """(action, document) pairs of an NDJSON bulk body, or what is wrong with it."""
    if not body.endswith(b"\n"):
        return [], "_bulk body must end with a newline"
    lines = body[:-1].split(b"\n")
    if len(lines) % 2:
        return [], f"_bulk body has {len(lines)} lines; expected action/document pairs"
    pairs = []
    for i in range(0, len(lines), 2):
        try:
            action, doc = json.loads(lines[i]), json.loads(lines[i + 1])
        except ValueError:
            return [], f"_bulk line {i} or {i + 1} is not JSON"
        if list(action) != ["create"] or sorted(action["create"]) != ["_id", "_index"]:
            return [], f"_bulk action {lines[i]!r} is not {{\"create\":{{\"_index\":...,\"_id\":...}}}}"
        if compact(action) != lines[i] or compact(doc) != lines[i + 1]:
            return [], "_bulk lines must be compact JSON"
        if not isinstance(doc, dict) or "@timestamp" not in doc:
            return [], "_bulk document has no @timestamp"
        pairs.append((action, doc))
    return pairs, None
