"""Fuzz every decoder and every finding format (issue 6, bad and hostile input).

Decoders (native, KServe/OIP, and the router in front of them) get arbitrary
bytes, arbitrary JSON and structurally valid records with one field mutated
into anything. Properties: no exception escapes ``decode``/``expire``; every
record is either an event or a dead letter with a non-empty reason (native: an
exact count; KServe: pairs join, so at most one event per record, and nothing
is left waiting after ``expire(inf)``). Formats (OCSF, ECS, CEF, LEEF) get
findings whose every text field is hostile (delimiters, newlines, control and
non-BMP characters): rendering never raises, CEF/LEEF stay one line, and the
JSON forms parse back to the same actor and title.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.findings import FAMILIES, Finding, Severity
from agent.records import RawRecord
from connectors.decoder_router import DecoderRouter
from connectors.formats import RENDERERS, render
from connectors.kserve_format import KServeDecoder, KServeSpec
from connectors.native_format import DecodeSpec, NativeDecoder

INF, FB, REQ, RESP = "fz.inference", "fz.feedback", "fz.kserve.req", "fz.kserve.resp"
DIM, K = 8, 3
# CI default keeps the file under ~20 s on 2 cores; INFERWATCH_FUZZ_EXAMPLES=5000 for a long run.
EXAMPLES = int(os.environ.get("INFERWATCH_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
json_any = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=10),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=6)),
                        max_leaves=40)


def good_inference(i: int) -> dict:
    return {"id": f"r{i}", "ts": 1763877600 + i, "model": "m", "client_id": f"c{i % 3}",
            "input": [0.1 * j for j in range(DIM)], "output": {"probs": [0.2, 0.3, 0.5]}}


def good_feedback(i: int) -> dict:
    return {"id": f"f{i}", "ts": 1763877600 + i, "model": "m", "source": "s", "input": [0.5] * DIM, "label": 1}


@st.composite
def native_record(draw, offset: int) -> RawRecord:
    topic = draw(st.sampled_from([INF, FB]))
    kind = draw(st.sampled_from(["bytes", "json", "mutated", "good"]))
    if kind == "bytes":
        value = draw(st.binary(max_size=300))
    elif kind == "json":
        value = json.dumps(draw(json_any)).encode()
    else:
        body = good_inference(offset) if topic == INF else good_feedback(offset)
        if kind == "mutated":
            key = draw(st.sampled_from([*body, "output.probs", "output.logits", "output.label", "extra"]))
            new = draw(json_any)
            if key.startswith("output."):
                body["output"] = {key.split(".")[1]: new}
            elif draw(st.booleans()):
                body[key] = new
            else:
                body.pop(key, None)
        value = json.dumps(body).encode()  # NaN/Infinity literals included: they must be dead-lettered
    headers = tuple(draw(st.lists(st.tuples(st.sampled_from(["traceparent", "x", "ce_id"]), st.binary(max_size=60)),
                                  max_size=2)))
    return RawRecord(topic=topic, partition=0, offset=offset, value=value, headers=headers)


@st.composite
def native_batch(draw) -> list[RawRecord]:
    n = draw(st.integers(1, 12))
    return [draw(native_record(i)) for i in range(n)]


def assert_dead_letters_have_reasons(decoded) -> None:
    for d in decoded.dead:
        assert isinstance(d.reason, str) and d.reason.strip(), d


@FUZZ
@given(native_batch(), st.sampled_from([None, DIM]))
def test_native_decoder_never_raises_and_accounts_for_every_record(records, input_dim) -> None:
    dec = NativeDecoder(DecodeSpec(frozenset([INF]), frozenset([FB]), input_dim=input_dim, max_record_bytes=4096))
    decoded = dec.decode(records)
    assert_dead_letters_have_reasons(decoded)
    assert decoded.n_events + len(decoded.dead) == len(records)
    batches = [b for b in (decoded.inference, decoded.feedback) if b is not None]
    for b in batches:
        assert b.X.shape == (len(b), b.X.shape[1]) and bool(np.isfinite(b.X).all())
        assert all(math.isfinite(t) for t in b.ts.tolist())
    if decoded.inference is not None and decoded.inference.probs is not None:
        assert bool(((decoded.inference.probs >= 0) & (decoded.inference.probs <= 1)).all())


def v2_request_body(rows: int) -> dict:
    return {"id": "x", "inputs": [{"name": "input-0", "shape": [rows, DIM], "datatype": "FP32",
                                   "data": [0.25] * (rows * DIM)}]}


def v2_response_body(rows: int) -> dict:
    return {"id": "x", "model_name": "m", "outputs": [{"name": "output-0", "shape": [rows, K], "datatype": "FP32",
                                                       "data": [0.2, 0.3, 0.5] * rows}]}


@st.composite
def kserve_batch(draw) -> list[RawRecord]:
    n = draw(st.integers(1, 10))
    out = []
    for i in range(n):
        topic = draw(st.sampled_from([REQ, RESP]))
        ce_id = draw(st.sampled_from(["a", "b", "c", "d"]))
        kind = draw(st.sampled_from(["bytes", "json", "mutated", "good"]))
        if kind == "bytes":
            value = draw(st.binary(max_size=300))
        elif kind == "json":
            value = json.dumps(draw(json_any)).encode()
        else:
            body = v2_request_body(2) if topic == REQ else v2_response_body(2)
            if kind == "mutated":
                tensor = (body["inputs"] if topic == REQ else body["outputs"])[0]
                key = draw(st.sampled_from(["shape", "datatype", "data", "name", "parameters"]))
                tensor[key] = draw(json_any)
            value = json.dumps(body).encode()
        headers = [("ce_id", ce_id.encode()), ("ce_type", draw(st.sampled_from(
            [b"org.kubeflow.serving.inference.request", b"org.kubeflow.serving.inference.response", b"junk"])))]
        headers += draw(st.lists(st.tuples(st.sampled_from(["x-client-id", "x-forwarded-for", "ce_source",
                                                             "content-type", "ce_inferenceservicename"]),
                                           st.binary(max_size=40)), max_size=3))
        out.append(RawRecord(topic=topic, partition=0, offset=i, value=value, headers=tuple(headers)))
    return out


@FUZZ
@given(kserve_batch(), kserve_batch())
def test_kserve_decoder_never_raises_and_leaves_nothing_behind(first, second) -> None:
    dec = KServeDecoder(KServeSpec(request_topics=frozenset([REQ]), response_topics=frozenset([RESP]),
                                   max_record_bytes=4096))
    second = [RawRecord(r.topic, r.partition, r.offset + 100, r.value, r.key, r.headers) for r in second]
    outs = [dec.decode(first), dec.decode(second), dec.expire(math.inf)]
    for decoded in outs:
        assert_dead_letters_have_reasons(decoded)
    dead = sum(len(d.dead) for d in outs)
    assert dead <= len(first) + len(second)
    # one event per instance; a request carries at most 2 instances here, and every record is accounted for
    assert sum(d.n_events for d in outs) <= 2 * (len(first) + len(second))
    assert dec.pending_offsets() == {}


@FUZZ
@given(native_batch())
def test_router_routes_hostile_records_without_raising(records) -> None:
    native = NativeDecoder(DecodeSpec(frozenset([INF]), frozenset([FB]), input_dim=DIM))
    router = DecoderRouter({INF: native, FB: native})
    stray = RawRecord(topic="unknown.topic", partition=0, offset=999, value=b"{}")
    decoded = router.decode([*records, stray])
    assert_dead_letters_have_reasons(decoded)
    assert decoded.n_events + len(decoded.dead) == len(records) + 1


hostile_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40) | st.sampled_from(
    ["a|b=c\\d", "line\nbreak\r\n", "\t\x00\x1b[31m", "😀" * 5, "CEF:0|x|y", "key=value foo=bar", "^|^"])


@st.composite
def hostile_finding(draw) -> Finding:
    evidence = draw(st.dictionaries(hostile_text, json_leaf, max_size=5))
    return Finding(family=draw(st.sampled_from(sorted(FAMILIES))), detector=draw(hostile_text),
                   title=draw(hostile_text), severity=draw(st.sampled_from(list(Severity))),
                   actor=draw(st.none() | hostile_text), model=draw(st.none() | hostile_text),
                   related_ids=tuple(draw(st.lists(hostile_text, max_size=4))), window=draw(hostile_text),
                   evidence=evidence, message=draw(hostile_text), time_ms=draw(st.integers(0, 2**45)),
                   confidence=draw(st.none() | st.floats(0, 1)))


@FUZZ
@given(hostile_finding())
def test_every_format_renders_hostile_findings_safely(finding: Finding) -> None:
    for name in RENDERERS:
        out = render(name, finding)
        assert isinstance(out, bytes) and out
        text = out.decode("utf-8")
        if name in ("cef", "leef"):
            assert "\n" not in text.rstrip("\n") and "\r" not in text, (name, text)
            assert text.startswith("CEF:0|" if name == "cef" else "LEEF:")
        else:
            obj = json.loads(text)
            if name == "ocsf":
                assert obj["finding_info"]["title"] == finding.title
                assert obj.get("actor", {}).get("user", {}).get("uid") == finding.actor


# ---------------------------------------------------------------- atheris (coverage-guided, libFuzzer)
def atheris_one_input(data: bytes) -> None:
    """One libFuzzer input: split into records for the native and KServe decoders; nothing may raise."""
    fdp = atheris.FuzzedDataProvider(data)  # bound in the __main__ harness below
    records = []
    for i in range(fdp.ConsumeIntInRange(1, 6)):
        topic = [INF, FB, REQ, RESP][fdp.ConsumeIntInRange(0, 3)]
        headers = (("ce_id", fdp.ConsumeBytes(4)), ("ce_type", fdp.ConsumeBytes(40)),
                   ("x-client-id", fdp.ConsumeBytes(8)))
        value = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 400))
        records.append(RawRecord(topic=topic, partition=0, offset=i, value=value, headers=headers))
    native = NativeDecoder(DecodeSpec(frozenset([INF]), frozenset([FB]), input_dim=None))
    kserve = KServeDecoder(KServeSpec(request_topics=frozenset([REQ]), response_topics=frozenset([RESP])))
    router = DecoderRouter({INF: native, FB: native, REQ: kserve, RESP: kserve})
    for decoded in (router.decode(records), router.expire(math.inf)):
        for d in decoded.dead:
            if not d.reason.strip():
                raise AssertionError(f"dead letter without a reason: {d}")


def test_atheris_decoders(tmp_path: Path) -> None:
    """libFuzzer-driven run over the decoders (100,000 inputs; an escaped exception fails with a crash file)."""
    pytest.importorskip("atheris")
    runs = os.environ.get("INFERWATCH_ATHERIS_RUNS", "100000")
    res = subprocess.run([sys.executable, __file__, f"-runs={runs}", "-max_len=2048", "-seed=1",
                          f"-artifact_prefix={tmp_path}/"], capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr[-4000:]
    assert f"Done {runs} runs" in res.stderr


if __name__ == "__main__":
    import inspect

    import atheris

    import connectors.decoder_router
    import connectors.decoding
    import connectors.kserve_format
    import connectors.native_format

    # coverage feedback for the decoders only (instrument_all would take minutes over numpy and torch)
    modules = (connectors.decoding, connectors.native_format, connectors.kserve_format, connectors.decoder_router)
    names = {m.__name__ for m in modules}
    instrumented: dict[int, object] = {}
    for module in modules:
        for owner in [module, *(c for c in vars(module).values() if inspect.isclass(c) and c.__module__ in names)]:
            for name, fn in list(vars(owner).items()):
                if inspect.isfunction(fn) and fn.__module__ in names:
                    if id(fn) not in instrumented:
                        instrumented[id(fn)] = atheris.instrument_func(fn)
                    setattr(owner, name, instrumented[id(fn)])  # also rebinds `from x import f` copies
    atheris.Setup(sys.argv, atheris_one_input)
    atheris.Fuzz()
