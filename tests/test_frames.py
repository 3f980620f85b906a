"""Conformance of the frames the seam writes by hand (conveyor/seam/frames.py) with py-amqp's own."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from amqp.method_framing import frame_writer
from kombu.transport.pyamqp import Channel

from conveyor.seam import frames


class Capture:
    """A transport that keeps what is written."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data) -> None:
        self.written.append(bytes(data))


def channel(frame_max: int = 131072) -> SimpleNamespace:
    transport = Capture()
    connection = SimpleNamespace(frame_max=frame_max, bytes_sent=0, transport=transport)
    connection.frame_writer = frame_writer(connection, transport)
    return SimpleNamespace(connection=connection, channel_id=7,
                           prepare_message=lambda *args: Channel.prepare_message(None, *args))


@pytest.mark.parametrize("body, content_type, content_encoding, delivery_mode, correlation_id", [
    ('{"status": "SUCCESS", "result": null}', "application/json", "utf-8", 2, "6b2b7c2e-1c7e-4e0b-9d7a-2c9d3b7e8f10"),
    (b'{"r": "\\u00e9"}', "application/json", "utf-8", 1, "id"),
    (b"", "application/json", "utf-8", 2, "t"),  # an empty body: no body frame
    ("é" * 40, "application/x-custom", "utf-8", 1, "é-correlation"),
    (b"x" * 5000, "application/json", "binary", 2, "c" * 255),  # the longest short string
    (b"x" * 5000, "application/json", "utf-8", 2, "c\udc80"),  # a lone surrogate, which py-amqp passes
    (b"y" * 300_000, "application/json", "utf-8", 2, "big"),  # several body frames: py-amqp's way
])
def test_a_reply_is_written_as_py_amqps_writer_writes_it(body, content_type, content_encoding, delivery_mode,
                                                         correlation_id):
    args = frames.publish_args("", "celery-reply-queue-1")
    ours, theirs = channel(), channel()
    frames.write_reply(ours, args, body, content_type, content_encoding, delivery_mode, correlation_id)
    message = theirs.prepare_message(body, 0, content_type, content_encoding, {},
                                     {"correlation_id": correlation_id, "delivery_mode": delivery_mode})
    frames.write_publish(theirs, args, message)
    assert b"".join(ours.connection.transport.written) == b"".join(theirs.connection.transport.written)
    assert ours.connection.bytes_sent == theirs.connection.bytes_sent == 1  # py-amqp's heartbeat counter


def test_a_correlation_id_too_long_for_a_short_string_fails_as_in_py_amqp():
    args = frames.publish_args("", "q")
    with pytest.raises(Exception) as ours:
        frames.write_reply(channel(), args, b"{}", "application/json", "utf-8", 2, "c" * 256)
    theirs = channel()
    with pytest.raises(Exception) as pys:
        frames.write_publish(theirs, args, theirs.prepare_message(b"{}", 0, "application/json", "utf-8", {},
                                                                  {"correlation_id": "c" * 256, "delivery_mode": 2}))
    assert type(ours.value) is type(pys.value)


def test_a_reply_at_py_amqps_one_frame_limit_is_split_as_py_amqp_splits_it():
    args = frames.publish_args("", "q")
    for size in range(3900, 4100):  # around a frame_max of 4096
        ours, theirs = channel(4096), channel(4096)
        frames.write_reply(ours, args, b"z" * size, "application/json", "utf-8", 2, "cid")
        frames.write_publish(theirs, args, theirs.prepare_message(b"z" * size, 0, "application/json", "utf-8", {},
                                                                  {"correlation_id": "cid", "delivery_mode": 2}))
        assert ours.connection.transport.written == theirs.connection.transport.written, size


def test_a_py_amqp_that_encodes_properties_in_another_order_gets_its_own_way(monkeypatch):
    from amqp import Message

    frames._properties_before_correlation_id.cache_clear()
    real = Message._serialize_properties
    monkeypatch.setattr(Message, "_serialize_properties", lambda self: real(self) + b"\x00")  # the id no longer last
    try:
        assert frames._properties_before_correlation_id("application/json", "utf-8", 2) is None
        args = frames.publish_args("", "q")
        ours, theirs = channel(), channel()
        frames.write_reply(ours, args, b"{}", "application/json", "utf-8", 2, "cid")
        frames.write_publish(theirs, args, theirs.prepare_message(b"{}", 0, "application/json", "utf-8", {},
                                                                  {"correlation_id": "cid", "delivery_mode": 2}))
        assert ours.connection.transport.written == theirs.connection.transport.written
    finally:
        frames._properties_before_correlation_id.cache_clear()
