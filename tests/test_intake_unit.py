"""The bounded decoders of conveyor/seam/inbound.py on their own, with py-amqp's own encoder."""

from __future__ import annotations

import base64
import bz2
import lzma
import sys
import zlib

import pytest
from amqp import Message as AmqpMessage
from amqp.serialization import decode_properties_basic

from conveyor.seam import inbound
from conveyor.seam.inbound import MAX_DEPTH, ORIGINAL_HEADERS, TRUNCATED, Rejected


def encoded(headers: dict, **properties) -> bytes:
    """A basic content header's property block, as py-amqp writes it."""
    return AmqpMessage(b"", application_headers=headers, **properties)._serialize_properties()


def nested(depth: int) -> dict:
    value: dict = {"leaf": [1, "a"]}
    for _ in range(depth - 1):
        value = {"n": value}
    return value


@pytest.mark.parametrize("depth", [1, MAX_DEPTH - 3, MAX_DEPTH - 2])  # + its list + the headers: MAX_DEPTH levels
def test_headers_within_the_bound_decode_as_py_amqp_decodes_them(depth):
    block = encoded({"x": nested(depth), "task": "task_a", "F": "A" * 50},
                    content_type="application/json", content_encoding="utf-8", priority=3, correlation_id="c")
    assert inbound.decode_properties(block, 0) == decode_properties_basic(block, 0)


def test_headers_past_the_bound_are_cut_and_kept_as_received():
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)
    try:
        headers = {"id": "1", "deep": nested(2000)}
        block = encoded(headers, content_type="application/json", content_encoding="utf-8",
                        delivery_mode=2, correlation_id="c", reply_to="r")
        table = AmqpMessage(b"", application_headers=headers)._serialize_properties()[2:]
    finally:
        sys.setrecursionlimit(old)
    with pytest.raises(RecursionError):  # what a worker met before
        decode_properties_basic(block, 0)
    properties, end = inbound.decode_properties(block, 0)
    assert end == len(block)
    assert (properties["content_type"], properties["delivery_mode"], properties["correlation_id"],
            properties["reply_to"]) == ("application/json", 2, "c", "r")
    got = properties["application_headers"]
    assert got["id"] == "1"
    value, levels = got["deep"], 1
    while isinstance(value, dict):
        value, levels = value["n"], levels + 1
    assert value == TRUNCATED and levels == MAX_DEPTH
    assert base64.b64decode(got[ORIGINAL_HEADERS]) == table


@pytest.mark.parametrize(("name", "compress"), [("application/x-gzip", zlib.compress), ("bzip2", bz2.compress),
                                                ("xz", lzma.compress)])
def test_inflating_stops_at_the_limit(name, compress):
    assert inbound.inflate(compress(b"x" * 1000), name, 1000) == b"x" * 1000
    with pytest.raises(Rejected) as info:
        inbound.inflate(compress(b"x" * 10_000_000), name, 1000)
    assert (info.value.field, info.value.rule) == ("body", "inflates to more than 1000 bytes (limits.max_payload_bytes plus the envelope)")


@pytest.mark.parametrize(("body", "name", "words"), [
    (b"not zlib at all", "zlib", "does not inflate as zlib"),
    (zlib.compress(b"x"), "application/x-brotli", "must be one of "),
    (zlib.compress(b"x"), 7, "must be one of "),
])
def test_a_body_that_cannot_be_inflated_is_rejected(body, name, words):
    with pytest.raises(Rejected) as info:
        inbound.inflate(body, name, 1000)
    assert words in str(info.value)
