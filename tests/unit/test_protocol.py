"""Protocol framing and request validation: every bad line becomes one ProtocolError, never a crash."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from modeld import protocol
from modeld.errors import ModeldError
from modeld.protocol import (Ack, LineSplitter, Ping, ProtocolError, Status, Subscribe, decode,
                             encode, parse_request)


def test_encode_is_one_utf8_line_and_round_trips():
    msg = protocol.variant_event(model="yolo", variant="int8", path="/m/ü.onnx", sha256="ab",
                                 generation=7, provider="CPUExecutionProvider", reason="r")
    raw = encode(msg)
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1
    assert decode(raw.rstrip(b"\n")) == msg


def test_hello_carries_the_fixed_fields():
    hello = protocol.hello_event("1.2.3", pid=5)
    assert hello == {"event": "hello", "protocol": 1, "daemon": "mecha10-modeld",
                     "version": "1.2.3", "pid": 5}


@pytest.mark.parametrize("line,message", [
    (b"\xff\xfe{}", "not UTF-8"),
    (b"{not json", "not JSON"),
    (b"[1, 2]", "expected a JSON object"),
    (b'"text"', "expected a JSON object"),
    (b"[" * 100000 + b"]" * 100000, "not JSON"),
])
def test_decode_rejects(line, message):
    with pytest.raises(ProtocolError, match=message):
        decode(line)


@pytest.mark.parametrize("obj,expected", [
    ({"op": "subscribe", "models": ["yolov8n"]},
     Subscribe(models=("yolov8n",), providers=("CPUExecutionProvider",), prefer="fastest")),
    ({"op": "subscribe", "models": "yolov8n", "providers": ["CoreMLExecutionProvider"],
      "prefer": "int8", "node": "det"},
     Subscribe(models=("yolov8n",), providers=("CoreMLExecutionProvider",), prefer="int8",
               node="det")),
    ({"op": "subscribe", "models": ["a", "b", "a"]},
     Subscribe(models=("a", "b"))),
    ({"op": "ack", "model": "m", "generation": 7, "ok": True}, Ack("m", 7, True)),
    ({"op": "ack", "model": "m", "generation": 7, "ok": False, "error": "boom"},
     Ack("m", 7, False, "boom")),
    ({"op": "status"}, Status()),
    ({"op": "ping", "extra": 1}, Ping()),
])
def test_parse_valid(obj, expected):
    assert parse_request(obj) == expected


@pytest.mark.parametrize("obj,message", [
    ({}, 'missing "op"'),
    ({"op": "explode"}, "unknown op"),
    ({"op": "subscribe"}, '"models" must be a list'),
    ({"op": "subscribe", "models": []}, "at least one model"),
    ({"op": "subscribe", "models": [1]}, '"models" must be a list'),
    ({"op": "subscribe", "models": ["x" * 300]}, "at most"),
    ({"op": "subscribe", "models": [f"m{i}" for i in range(1000)]}, "at most"),
    ({"op": "subscribe", "models": ["m"], "prefer": "int4"}, '"prefer" must be one of'),
    ({"op": "subscribe", "models": ["m"], "providers": [None]}, '"providers" must be'),
    ({"op": "subscribe", "models": ["m"], "node": 5}, '"node" must be'),
    ({"op": "ack", "generation": 1}, '"model"'),
    ({"op": "ack", "model": "m", "generation": "7"}, '"generation"'),
    ({"op": "ack", "model": "m", "generation": True}, '"generation"'),
    ({"op": "ack", "model": "m", "generation": 1, "ok": "yes"}, '"ok"'),
])
def test_parse_invalid(obj, message):
    with pytest.raises(ProtocolError, match=message):
        parse_request(obj)


def test_protocol_error_is_typed():
    err = ProtocolError("bad")
    assert isinstance(err, ModeldError) and isinstance(err, ValueError)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_any_bytes_decode_or_protocol_error(raw):
    try:
        parse_request(decode(raw))
    except ProtocolError:
        pass


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                          max_size=4),
                     max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["op", "models", "providers", "prefer", "node", "model",
                                        "generation", "ok", "error"]), _json)
       | st.fixed_dictionaries({"op": st.sampled_from(["subscribe", "ack"])}, optional={
           "models": _json, "model": _json, "generation": _json, "ok": _json, "error": _json}))
def test_any_object_parses_or_protocol_error(obj):
    try:
        request = parse_request(json.loads(json.dumps(obj)))
    except ProtocolError:
        return
    assert isinstance(request, (Subscribe, Ack, Status, Ping))


def test_line_splitter_reassembles_partial_lines_and_bounds_them():
    splitter = LineSplitter(max_line_bytes=10)
    assert splitter.feed(b'{"a"') == []
    assert splitter.feed(b':1}\n{"b":2}\n{') == [b'{"a":1}', b'{"b":2}']
    with pytest.raises(ProtocolError, match="longer than 10"):
        splitter.feed(b"x" * 20)


def test_requests_built_by_helpers_parse_back():
    sub = protocol.subscribe_request(["m"], providers=["CUDAExecutionProvider"], prefer="fp16",
                                     node="n")
    assert parse_request(decode(encode(sub))) == Subscribe(("m",), ("CUDAExecutionProvider",),
                                                           "fp16", "n")
    nack = protocol.ack_request("m", 3, ok=False, error="x" * 5000)
    parsed = parse_request(decode(encode(nack)))
    assert parsed.ok is False and len(parsed.error) == protocol.MAX_ERROR_CHARS


def test_default_socket_path_follows_env(monkeypatch):
    monkeypatch.setenv("MODELD_SOCKET", "/tmp/x.sock")
    assert protocol.default_socket_path() == "/tmp/x.sock"
    monkeypatch.delenv("MODELD_SOCKET")
    assert protocol.default_socket_path() == protocol.DEFAULT_SOCKET_PATH
