"""The KServe inference-logger decoder: requests and responses joined by id into inference events.

Records are built the way a Knative KafkaSink writes the logger's CloudEvents in
binary mode: ``ce_*`` headers as bytes, the HTTP body untouched as the value.
"""

from __future__ import annotations

import base64
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.records import RawRecord
from connectors.kserve_format import CE_REQUEST, CE_RESPONSE, KServeDecoder, KServeSpec

REQ_TOPIC, RESP_TOPIC = "kserve.requests", "kserve.responses"
DIM, K = 4, 3
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def spec(**kw) -> KServeSpec:
    base = {"request_topics": frozenset({REQ_TOPIC}), "response_topics": frozenset({RESP_TOPIC}), "input_dim": DIM}
    base.update(kw)
    return KServeSpec(**base)


def ce_headers(ce_type: str, ce_id: str | None, metadata: dict | None = None, **extra: str) -> list:
    """Headers as KServe's logger + a Knative KafkaSink write them (binary content mode)."""
    headers = [
        ("ce_specversion", b"1.0"),
        ("ce_source", b"http://localhost:9081/"),
        ("ce_type", ce_type.encode()),
        ("ce_time", b"2025-11-23T06:00:00.123456789Z"),
        ("ce_inferenceservicename", b"sklearn-iris"),
        ("ce_namespace", b"default"),
        ("ce_component", b"predictor"),
        ("ce_endpoint", b"default"),
        ("ce_metadata", json.dumps(metadata if metadata is not None else {"X-Client-Id": ["tenant-7"]}).encode()),
        ("content-type", b"application/json"),
    ]
    if ce_id is not None:
        headers.insert(1, ("ce_id", ce_id.encode()))
    headers += [(k, v.encode()) for k, v in extra.items()]
    return headers


def v2_request(rows: list[list[float]], name: str = "input-0", nested: bool = False) -> dict:
    data = rows if nested else [v for row in rows for v in row]
    return {
        "id": "body-id",
        "inputs": [{"name": name, "shape": [len(rows), len(rows[0])], "datatype": "FP32", "data": data}],
    }


def v2_response(probs: list[list[float]] | None = None, labels: list[int] | None = None) -> dict:
    outputs = []
    if probs is not None:
        outputs.append(
            {
                "name": "probabilities",
                "shape": [len(probs), len(probs[0])],
                "datatype": "FP32",
                "data": [v for row in probs for v in row],
            }
        )
    if labels is not None:
        outputs.append({"name": "label", "shape": [len(labels)], "datatype": "INT64", "data": labels})
    return {"model_name": "sklearn-iris", "model_version": "v3", "id": "body-id", "outputs": outputs}


def request(ce_id: str | None, body, offset: int = 0, partition: int = 0, topic: str = REQ_TOPIC, **kw) -> RawRecord:
    value = body if isinstance(body, bytes) else json.dumps(body).encode()
    return RawRecord(
        topic, partition, offset, value, headers=tuple(ce_headers(CE_REQUEST, ce_id, **kw)), timestamp_ms=1763877600000
    )


def response(ce_id: str | None, body, offset: int = 0, partition: int = 0, topic: str = RESP_TOPIC, **kw) -> RawRecord:
    value = body if isinstance(body, bytes) else json.dumps(body).encode()
    return RawRecord(topic, partition, offset, value, headers=tuple(ce_headers(CE_RESPONSE, ce_id, **kw)))


ROW = [5.1, 3.5, 1.4, 0.2]
PROBS = [[0.8, 0.15, 0.05]]


def test_request_and_response_in_one_batch_join_into_one_event():
    decoder = KServeDecoder(spec())
    out = decoder.decode(
        [
            request("a1", v2_request([ROW]), traceparent=TRACEPARENT),
            response("a1", v2_response(PROBS, [0])),
        ]
    )
    assert out.dead == ()
    batch = out.inference
    assert batch.ids == ("a1",)
    assert batch.models == ("sklearn-iris",) and batch.model_versions == ("v3",)
    assert batch.clients == ("tenant-7",)
    assert batch.ts[0] == pytest.approx(1763877600.123456789)
    np.testing.assert_allclose(batch.X, [ROW], rtol=1e-6)
    assert batch.X.dtype == np.float32 and batch.probs.dtype == np.float32 and batch.labels.dtype == np.int64
    np.testing.assert_allclose(batch.probs, PROBS, rtol=1e-6)
    np.testing.assert_array_equal(batch.labels, [0])
    assert batch.traceparents == (TRACEPARENT,)
    assert decoder.pending_offsets() == {} and decoder.n_pending == 0


def test_response_first_in_an_earlier_batch_waits_and_holds_back_the_commit():
    decoder = KServeDecoder(spec())
    first = decoder.decode([response("a1", v2_response(PROBS), offset=40)])
    assert first.inference is None and first.dead == ()
    assert decoder.pending_offsets() == {(RESP_TOPIC, 0): 40}
    second = decoder.decode([request("a1", v2_request([ROW]), offset=7)])
    assert second.inference.ids == ("a1",)
    np.testing.assert_allclose(second.inference.probs, PROBS, rtol=1e-6)
    assert second.inference.labels[0] == 0  # argmax, no label tensor given
    assert decoder.pending_offsets() == {}


def test_pending_offsets_is_the_smallest_waiting_offset_per_partition():
    decoder = KServeDecoder(spec())
    decoder.decode(
        [
            request("a", v2_request([ROW]), offset=10, partition=0),
            request("b", v2_request([ROW]), offset=11, partition=0),
            request("c", v2_request([ROW]), offset=5, partition=1),
            response("d", v2_response(PROBS), offset=3, partition=0),
        ]
    )
    assert decoder.pending_offsets() == {(REQ_TOPIC, 0): 10, (REQ_TOPIC, 1): 5, (RESP_TOPIC, 0): 3}
    out = decoder.decode([response("a", v2_response(PROBS), offset=4), response("c", v2_response(PROBS), offset=5)])
    assert out.inference.ids == ("a", "c")
    assert decoder.pending_offsets() == {(REQ_TOPIC, 0): 11, (RESP_TOPIC, 0): 3}


def test_expire_monitors_lonely_requests_and_dead_letters_lonely_responses():
    clock = FakeClock(1000.0)
    decoder = KServeDecoder(spec(join_ttl_s=30.0), clock=clock)
    decoder.decode([request("r1", v2_request([ROW, ROW])), response("s1", v2_response(PROBS))])
    assert decoder.expire(1029.0).n_events == 0 and decoder.n_pending == 2
    clock.now = 1020.0
    decoder.decode([request("r2", v2_request([ROW]))])
    out = decoder.expire(1030.0)
    assert out.inference.ids == ("r1/0", "r1/1")
    assert out.inference.probs is None
    np.testing.assert_array_equal(out.inference.labels, [-1, -1])
    assert len(out.dead) == 1 and out.dead[0].record.headers[1] == ("ce_id", b"s1")
    assert out.dead[0].reason == "response without request: waited longer than join_ttl_s=30s"
    assert decoder.pending_offsets() == {(REQ_TOPIC, 0): 0}  # r2 still waits
    flushed = decoder.expire(math.inf)
    assert flushed.inference.ids == ("r2",) and decoder.n_pending == 0 and decoder.pending_offsets() == {}


def test_a_response_arriving_after_its_request_was_given_up_is_dead_lettered():
    clock = FakeClock()
    decoder = KServeDecoder(spec(join_ttl_s=1.0), clock=clock)
    decoder.decode([request("r1", v2_request([ROW]))])
    assert decoder.expire(clock.now + 5).inference.ids == ("r1",)
    late = decoder.decode([response("r1", v2_response(PROBS))])
    assert late.inference is None and "raise join_ttl_s" in late.dead[0].reason


def test_a_batch_of_instances_becomes_one_event_per_instance():
    rows = [[float(i), 1.0, 2.0, 3.0] for i in range(3)]
    probs = [[0.1, 0.2, 0.7], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1]]
    out = KServeDecoder(spec()).decode(
        [
            request("b1", v2_request(rows, nested=True)),
            response("b1", v2_response(probs, [2, 0, 1])),
        ]
    )
    batch = out.inference
    assert batch.ids == ("b1/0", "b1/1", "b1/2")
    np.testing.assert_allclose(batch.X, rows)
    np.testing.assert_allclose(batch.probs, probs, rtol=1e-6)
    np.testing.assert_array_equal(batch.labels, [2, 0, 1])
    assert batch.clients == ("tenant-7",) * 3


def test_kserve_v1_instances_and_predictions():
    decoder = KServeDecoder(spec())
    out = decoder.decode(
        [
            request("v1a", {"instances": [[6.8, 2.8, 4.8, 1.4], [6.0, 3.4, 4.5, 1.6]]}),
            response("v1a", {"predictions": [1, 1]}),
            request("v1b", {"instances": [[6.8, 2.8, 4.8, 1.4]]}),
            response("v1b", {"predictions": [[0.1, 0.7, 0.2]]}),
        ]
    )
    batch = out.inference
    assert batch.ids == ("v1a/0", "v1a/1", "v1b")
    np.testing.assert_array_equal(batch.labels, [1, 1, 1])
    assert np.isnan(batch.probs[:2]).all()
    np.testing.assert_allclose(batch.probs[2], [0.1, 0.7, 0.2], rtol=1e-6)
    assert batch.model_versions == (None, None, None)


def test_regression_predictions_still_monitor_the_input():
    out = KServeDecoder(spec()).decode(
        [
            request("r", {"instances": [ROW]}),
            response("r", {"predictions": [3.25]}),
        ]
    )
    assert out.dead == () and out.inference.labels[0] == -1 and out.inference.probs is None


def test_join_falls_back_to_the_body_id_and_the_topic_when_headers_are_missing():
    req = RawRecord(REQ_TOPIC, 0, 0, json.dumps({"id": "b7", **v2_request([ROW])} | {"id": "b7"}).encode())
    resp = RawRecord(RESP_TOPIC, 0, 0, json.dumps(v2_response(PROBS) | {"id": "b7"}).encode())
    out = KServeDecoder(spec()).decode([resp, req])
    assert out.inference.ids == ("b7",)
    assert out.inference.models == ("sklearn-iris",)  # from the response's model_name
    assert out.inference.clients == ("unknown",)


def test_one_shared_topic_uses_ce_type_or_else_the_body_shape():
    shared = frozenset({"kserve.events"})
    decoder = KServeDecoder(spec(request_topics=shared, response_topics=shared))
    with_headers = [
        request("h1", v2_request([ROW]), topic="kserve.events"),
        response("h1", v2_response(PROBS), topic="kserve.events"),
    ]
    without = [
        RawRecord("kserve.events", 0, 5, json.dumps(v2_response(PROBS) | {"id": "n1"}).encode()),
        RawRecord("kserve.events", 0, 6, json.dumps(v2_request([ROW]) | {"id": "n1"}).encode()),
    ]
    out = decoder.decode(with_headers + without)
    assert out.inference.ids == ("h1", "n1")


def test_structured_mode_cloudevents_are_unwrapped():
    envelope = {
        "specversion": "1.0",
        "id": "s1",
        "type": CE_REQUEST,
        "source": "http://localhost:9081/",
        "time": "2025-11-23T06:00:01Z",
        "inferenceservicename": "sklearn-iris",
        "metadata": json.dumps({"X-Forwarded-For": ["10.6.6.6, 203.0.113.9"]}),
        "datacontenttype": "application/json",
        "data": v2_request([ROW]),
    }
    resp_envelope = {
        "specversion": "1.0",
        "id": "s1",
        "type": CE_RESPONSE,
        "source": "http://localhost:9081/",
        "inferenceservicename": "sklearn-iris",
        "data_base64": base64.b64encode(json.dumps(v2_response(PROBS)).encode()).decode(),
    }
    structured = (("content-type", b"application/cloudevents+json; charset=UTF-8"),)
    out = KServeDecoder(spec()).decode(
        [
            RawRecord(REQ_TOPIC, 0, 0, json.dumps(envelope).encode(), headers=structured),
            RawRecord(RESP_TOPIC, 0, 0, json.dumps(resp_envelope).encode(), headers=structured),
        ]
    )
    assert out.dead == ()
    assert out.inference.ids == ("s1",) and out.inference.clients == ("203.0.113.9",)
    assert out.inference.ts[0] == 1763877601.0


def test_logits_output_kind_applies_a_softmax():
    logits = [[2.0, -1.0, 0.5]]
    out = KServeDecoder(spec(output_kind="logits")).decode(
        [
            request("l1", v2_request([ROW])),
            response("l1", v2_response(logits)),
        ]
    )
    z = np.asarray(logits[0])
    np.testing.assert_allclose(out.inference.probs[0], np.exp(z) / np.exp(z).sum(), rtol=1e-6)


def test_named_input_and_output_tensors_are_picked():
    body = {
        "id": "x",
        "inputs": [
            {"name": "mask", "shape": [1, 2], "datatype": "BOOL", "data": [True, False]},
            {"name": "features", "shape": [1, 4], "datatype": "FP64", "data": ROW},
        ],
    }
    answer = {
        "outputs": [
            {"name": "probabilities", "shape": [1, 3], "datatype": "FP32", "data": [0.3, 0.3, 0.4]},
            {"name": "scores", "shape": [1, 3], "datatype": "FP32", "data": [0.1, 0.8, 0.1]},
        ]
    }
    out = KServeDecoder(spec(input_name="features", output_name="scores")).decode(
        [request("n", body), response("n", answer)]
    )
    np.testing.assert_allclose(out.inference.X, [ROW], rtol=1e-6)
    assert out.inference.labels[0] == 1
    first = KServeDecoder(spec(input_dim=None)).decode([request("m", body), response("m", answer)])
    np.testing.assert_array_equal(first.inference.X, [[1.0, 0.0]])  # the first input, a BOOL mask
    assert first.inference.labels[0] == 2


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (request("e1", b"{oops"), "not JSON: Expecting property name enclosed in double quotes at line 1 column 2"),
        (
            request("e2", b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, NaN, 4]}]}'),
            "not JSON: NaN is not a JSON number",
        ),
        (
            request(
                "e3", {"inputs": [{"name": "t", "shape": [1, 4], "datatype": "BYTES", "data": ["a", "b", "c", "d"]}]}
            ),
            "inputs[0]: datatype BYTES is not numeric",
        ),
        (
            request("e4", {"inputs": [{"name": "t", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3]}]}),
            "inputs[0].data: shape [1, 4] needs 4 values, got 3",
        ),
        (
            request("e5", {"inputs": [{"name": "t", "shape": [1, 5], "datatype": "FP32", "data": [1, 2, 3, 4, 5]}]}),
            "input: expected 4 numbers per instance, got 5",
        ),
        (
            request("e6", {"inputs": [{"name": "t", "shape": [1, 4], "datatype": "FP32", "data": [1, "2", 3, 4]}]}),
            "inputs[0].data: element 1 is a string, expected a number",
        ),
        (
            request("e7", {"inputs": [{"name": "t", "shape": [1, 4], "datatype": "FP32", "data": [1e39, 0, 0, 0]}]}),
            "inputs[0].data: element 0 is 1e+39, beyond float32 range",
        ),
        (
            request(
                "e8",
                {
                    "inputs": [
                        {"name": "t", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 16}}
                    ]
                },
            ),
            "inputs[0]: parameters.binary_data_size is set but no binary data follows the JSON body",
        ),
        (request("e9", {"instances": [{"sepal_length": 5.1}]}), "instances: named-feature objects are not supported"),
        (
            request("e10", {"instances": [[1, 2, 3, 4], [1, 2, 3]]}),
            "instances: instance 1 has 3 numbers, instance 0 has 4",
        ),
        (request("e11", {"something": "else"}), "request: expected OIP v2 'inputs' tensors or v1 'instances'"),
        (request(None, {"instances": [ROW]}), "no join key: neither a ce_id header nor a string body id"),
        (
            RawRecord(REQ_TOPIC, 0, 0, b"{}", headers=(("ce_id", b"z"), ("ce_type", b"dev.knative.ping"))),
            "not a KServe event: ce_type 'dev.knative.ping' is not an inference request or response",
        ),
        (
            response("e12", {"outputs": [{"name": "p", "shape": [1, 3], "datatype": "FP32", "data": [2.0, -1.0, 0]}]}),
            "outputs: probabilities must lie in [0, 1]; set output_kind: logits",
        ),
        (
            response("e13", {"outputs": [{"name": "p", "shape": [1, 2], "datatype": "FP32", "data": [0.5, 0.5]}]}),
            "outputs: expected 3 classes, got 2",
        ),
        (response("e14", {"model_name": "m"}), "response: expected OIP v2 'outputs' or v1 'predictions'"),
        (
            response("e15", {"outputs": [{"name": "l", "shape": [1], "datatype": "INT64", "data": [7]}]}),
            "outputs: label 7 is not a class index below n_classes=3",
        ),
        (RawRecord(REQ_TOPIC, 0, 0, None, headers=tuple(ce_headers(CE_REQUEST, "t"))), "tombstone"),
        (
            request("big", b"{" + b" " * 2_000_000 + b"}"),
            "too big: record is 2000002 bytes, over max_record_bytes=1048576",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 40 else None,
)
def test_bad_halves_are_dead_lettered_with_a_reason_and_the_good_pairs_survive(bad, reason):
    decoder = KServeDecoder(spec(n_classes=K))
    out = decoder.decode(
        [
            request("ok1", v2_request([ROW])),
            bad,
            response("ok1", v2_response(PROBS)),
            request("ok2", v2_request([ROW])),
            response("ok2", v2_response(PROBS)),
        ]
    )
    assert [d.record for d in out.dead] == [bad]
    assert reason in out.dead[0].reason, out.dead[0].reason
    assert out.inference.ids == ("ok1", "ok2")
    assert decoder.n_pending == 0


def test_the_response_of_a_dead_lettered_request_is_dead_lettered_too():
    decoder = KServeDecoder(spec())
    bad_request = request("d1", {"instances": [[1, 2, 3]]})
    out = decoder.decode([bad_request, response("d1", {"predictions": [1]})])
    assert [d.reason for d in out.dead] == [
        "input: expected 4 numbers per instance, got 3",
        "its request was dead-lettered: input: expected 4 numbers per instance, got 3",
    ]
    waiting_first = decoder.decode([response("d2", {"predictions": [1]}), request("d2", {"instances": [[1, 2]]})])
    assert [d.reason for d in waiting_first.dead][1].startswith("its request was dead-lettered")
    assert decoder.n_pending == 0


def test_a_request_whose_response_is_bad_is_monitored_alone():
    out = KServeDecoder(spec()).decode(
        [
            request("q", v2_request([ROW])),
            response("q", b"not json"),
        ]
    )
    assert out.inference.ids == ("q",) and out.inference.labels[0] == -1
    assert out.dead[0].reason.startswith("not JSON")


def test_instance_count_mismatch_dead_letters_the_response_and_keeps_the_request():
    out = KServeDecoder(spec()).decode(
        [
            request("m", v2_request([ROW, ROW])),
            response("m", v2_response(PROBS)),
        ]
    )
    assert out.inference.ids == ("m/0", "m/1") and out.inference.probs is None
    assert out.dead[0].reason == "instance count: the response has 1, its request 2"


def test_max_pending_evicts_the_oldest_half():
    decoder = KServeDecoder(spec(max_pending=2))
    out = decoder.decode(
        [
            request("p1", v2_request([ROW]), offset=1),
            response("p2", v2_response(PROBS), offset=2),
            request("p3", v2_request([ROW]), offset=3),
            request("p4", v2_request([ROW]), offset=4),
        ]
    )
    assert out.inference.ids == ("p1",)  # evicted request: monitored without its answer
    assert out.dead[0].reason == "response without request: evicted: more than max_pending=2 halves waiting"
    assert decoder.n_pending == 2 and decoder.evicted == 2
    assert decoder.pending_offsets() == {(REQ_TOPIC, 0): 3}


def test_metadata_and_health_calls_with_empty_bodies_are_skipped_with_their_responses():
    decoder = KServeDecoder(spec())
    metadata_answer = {
        "name": "sklearn-iris",
        "versions": ["1"],
        "platform": "sklearn",
        "inputs": [{"name": "input-0", "datatype": "FP32", "shape": [-1, 4]}],
    }
    out = decoder.decode([response("g1", metadata_answer), request("g1", b""), request("g2", b"")])
    later = decoder.decode([response("g2", metadata_answer)])
    assert out.n_events == 0 and out.dead == () and later.dead == ()
    assert decoder.n_pending == 0 and decoder.skipped_non_inference == 4


def test_duplicate_halves_are_ignored():
    decoder = KServeDecoder(spec())
    out = decoder.decode(
        [
            request("u", v2_request([ROW]), offset=1),
            request("u", v2_request([ROW]), offset=2),
            response("u", v2_response(PROBS)),
            response("u", v2_response(PROBS)),
        ]
    )
    assert out.inference.ids == ("u",) and out.dead == () and decoder.duplicates == 2
    assert decoder.n_pending == 0


def test_client_identity_comes_from_forwarded_headers():
    decoder = KServeDecoder(spec(client_headers=("X-Api-Key-Id", "x-forwarded-for")))
    out = decoder.decode(
        [
            request("c1", v2_request([ROW]), metadata={"X-Api-Key-Id": ["key-42"], "X-Forwarded-For": ["1.2.3.4"]}),
            response("c1", v2_response(PROBS)),
            request(
                "c2", v2_request([ROW]), metadata={"X-Forwarded-For": ["6.6.6.6, 198.51.100.7"]}
            ),  # left one forged
            response("c2", v2_response(PROBS)),
            request("c3", v2_request([ROW]), metadata={}, **{"x-api-key-id": "from-kafka-header"}),
            response("c3", v2_response(PROBS)),
            request("c4", v2_request([ROW]), metadata={}),
            response("c4", v2_response(PROBS)),
        ]
    )
    assert out.inference.clients == ("key-42", "198.51.100.7", "from-kafka-header", "unknown")
    behind_two_proxies = KServeDecoder(spec(forwarded_for_trusted_hops=1)).decode(
        [
            request("c5", v2_request([ROW]), metadata={"X-Forwarded-For": ["6.6.6.6, 198.51.100.7, 10.0.0.3"]}),
            response("c5", v2_response(PROBS)),
        ]
    )
    assert behind_two_proxies.inference.clients == ("198.51.100.7",)
    single = [request("c6", v2_request([ROW]), metadata={"X-Tenant": ["t-9"]}), response("c6", v2_response(PROBS))]
    assert KServeDecoder(spec(client_header="X-Tenant")).decode(single).inference.clients == ("t-9",)
    by_attribute = KServeDecoder(spec(client_header="ce_source")).decode(single).inference.clients
    assert by_attribute == ("http://localhost:9081/",)


def test_traceparent_from_the_cloudevents_extension_or_forwarded_headers():
    out = KServeDecoder(spec()).decode(
        [
            request("t1", v2_request([ROW]), ce_traceparent=TRACEPARENT),
            response("t1", v2_response(PROBS)),
            request("t2", v2_request([ROW]), metadata={"Traceparent": [TRACEPARENT]}),
            response("t2", v2_response(PROBS)),
        ]
    )
    assert out.inference.traceparents == (TRACEPARENT, TRACEPARENT)


def test_other_models_are_skipped_and_counted():
    decoder = KServeDecoder(spec(model="fraud-xgb"))
    out = decoder.decode([request("o", v2_request([ROW])), response("o", v2_response(PROBS))])
    assert out.n_events == 0 and out.dead == () and decoder.skipped_other_model == 1


def test_spec_rejects_bad_settings():
    with pytest.raises(ValueError, match="join_ttl_s must be positive"):
        spec(join_ttl_s=0)
    with pytest.raises(ValueError, match="output_kind must be"):
        spec(output_kind="softmax")


# ---------------------------------------------------------------- properties


header_names = st.sampled_from(
    [
        "ce_id",
        "ce_type",
        "ce_time",
        "ce_metadata",
        "content-type",
        "traceparent",
        "ce_inferenceservicename",
        "x-client-id",
    ]
)
header_values = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([CE_REQUEST.encode(), CE_RESPONSE.encode(), b"application/cloudevents+json", b"{}", b"[1]"]),
)
bodies = st.one_of(
    st.none(),
    st.binary(max_size=200),
    st.sampled_from(
        [
            json.dumps(v2_request([ROW])).encode(),
            json.dumps(v2_response(PROBS)).encode(),
            b'{"specversion": "1.0", "data_base64": "!!"}',
            b'{"specversion": "1.0", "data": "{"}',
            b'{"instances": [[1, [2]]]}',
            b'{"outputs": [{"shape": [1, 3], "datatype": "FP32"}]}',
        ]
    ),
)


@settings(max_examples=300, deadline=None)
@given(
    records=st.lists(
        st.tuples(
            st.sampled_from([REQ_TOPIC, RESP_TOPIC]),
            bodies,
            st.lists(st.tuples(header_names, header_values), max_size=5),
        ),
        max_size=8,
    )
)
def test_arbitrary_records_never_raise(records):
    decoder = KServeDecoder(spec(input_dim=None, max_pending=3), clock=FakeClock())
    raw = [RawRecord(t, 0, i, body, headers=tuple(h)) for i, (t, body, h) in enumerate(records)]
    out = decoder.decode(raw)
    flushed = decoder.expire(math.inf)
    assert decoder.n_pending == 0 and decoder.pending_offsets() == {}
    dead_records = [id(d.record) for d in out.dead + flushed.dead]
    assert len(dead_records) == len(set(dead_records))  # each record dead-lettered at most once
    assert set(dead_records) <= {id(r) for r in raw}


@settings(max_examples=100, deadline=None)
@given(data=st.data(), n_pairs=st.integers(1, 12))
def test_pairs_join_whatever_the_order_and_batching(data, n_pairs):
    halves = []
    for i in range(n_pairs):
        n = data.draw(st.integers(1, 3))
        rows = [[float(i), float(j), 0.5, 0.25] for j in range(n)]
        labels = [data.draw(st.integers(0, K - 1)) for _ in range(n)]
        halves.append(request(f"id{i}", v2_request(rows), offset=i))
        halves.append(response(f"id{i}", v2_response(labels=labels), offset=i))
    order = data.draw(st.permutations(halves))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(order)), max_size=4)))
    decoder = KServeDecoder(spec())
    seen: dict[str, tuple[np.ndarray, int]] = {}
    for start, stop in zip([0, *cuts], [*cuts, len(order)]):
        out = decoder.decode(order[start:stop])
        assert out.dead == ()
        if out.inference is not None:
            for event_id, x, label in zip(out.inference.ids, out.inference.X, out.inference.labels):
                assert event_id not in seen
                seen[event_id] = (x, int(label))
    assert decoder.n_pending == 0 and decoder.pending_offsets() == {}
    expected_ids = set()
    for half in halves[1::2]:
        body = json.loads(half.value)
        ce_id = half.header("ce_id").decode()
        labels = body["outputs"][0]["data"]
        ids = [ce_id] if len(labels) == 1 else [f"{ce_id}/{j}" for j in range(len(labels))]
        for j, event_id in enumerate(ids):
            expected_ids.add(event_id)
            assert seen[event_id][1] == labels[j]
            assert seen[event_id][0][1] == float(j)
    assert set(seen) == expected_ids


def test_pending_offsets_stay_right_and_bounded_while_one_old_half_waits():
    decoder = KServeDecoder(spec())
    decoder.decode([request("old", v2_request([ROW]), offset=0)])
    for start in range(1, 3001, 500):
        batch = []
        for offset in range(start, start + 500):
            batch.append(request(f"r{offset}", v2_request([ROW]), offset=offset))
            batch.append(response(f"r{offset}", v2_response(PROBS), offset=offset))
        assert len(decoder.decode(batch).inference) == 500
        assert decoder.pending_offsets() == {(REQ_TOPIC, 0): 0}
    # settled offsets do not pile up behind the waiting one
    assert all(len(heap) <= 2 * 1 + 64 + 1 for heap in decoder._offset_heaps.values())


def binary_body(header: dict, *chunks: bytes) -> bytes:
    """A body in OIP's binary tensor data extension: the JSON, then each tensor's raw bytes."""
    return json.dumps(header).encode() + b"".join(chunks)


def test_binary_tensor_data_extension_requests_and_responses():
    x = np.asarray([ROW, [6.0, 3.4, 4.5, 1.6]], dtype="<f4")
    probs = np.asarray([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], dtype="<f4")
    labels = np.asarray([0, 2], dtype="<i8")
    req_header = {
        "id": "bin",
        "inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}],
    }
    resp_header = {
        "model_name": "iris",
        "outputs": [
            {"name": "p", "shape": [2, 3], "datatype": "FP32", "parameters": {"binary_data_size": probs.nbytes}},
            {"name": "l", "shape": [2], "datatype": "INT64", "parameters": {"binary_data_size": labels.nbytes}},
        ],
    }
    out = KServeDecoder(spec()).decode(
        [
            request("bin", binary_body(req_header, x.tobytes())),
            response("bin", binary_body(resp_header, probs.tobytes(), labels.tobytes())),
        ]
    )
    assert out.dead == ()
    np.testing.assert_array_equal(out.inference.X, x)
    np.testing.assert_array_equal(out.inference.probs, probs)
    np.testing.assert_array_equal(out.inference.labels, [0, 2])


def test_binary_bf16_and_fp16_inputs_are_widened():
    values = np.asarray([1.5, -2.0, 0.25, 3.0], dtype=np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    for datatype, payload in (("BF16", bf16), ("FP16", values.astype("<f2").tobytes())):
        header = {
            "inputs": [{"name": "x", "shape": [1, 4], "datatype": datatype, "parameters": {"binary_data_size": 8}}]
        }
        out = KServeDecoder(spec()).decode(
            [request("h", binary_body(header, payload)), response("h", v2_response(PROBS))]
        )
        np.testing.assert_array_equal(out.inference.X[0], values)


@pytest.mark.parametrize(
    ("size", "payload", "reason"),
    [
        (16, b"\x00" * 12, "inputs[0].parameters.binary_data_size: 16 does not fit the 12 bytes left after the JSON"),
        (16, b"\x00" * 20, "binary data: 4 bytes after the JSON that no tensor's binary_data_size claims"),
        (12, b"\x00" * 12, "inputs[0]: shape [1, 4] needs 4 values, the binary data has 3"),
        (16, np.asarray([1, np.nan, 0, 0], "<f4").tobytes(), "inputs[0].data: element 1 is not finite"),
        (14, b"\x00" * 14, "inputs[0]: 14 binary bytes is not a whole number of FP32 values"),
    ],
)
def test_broken_binary_tensor_data_is_dead_lettered(size, payload, reason):
    header = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": size}}]}
    out = KServeDecoder(spec()).decode([request("bb", binary_body(header, payload))])
    assert reason in out.dead[0].reason, out.dead[0].reason
