"""Publishing on a py-amqp channel without `channel.basic_publish`'s per-message extras.

py-amqp's `basic_publish` does three things per message besides writing it: it encodes the same
basic.publish arguments (exchange, routing key, flags) again, enters a socket-timeout context, and,
because kombu announces the `connection.blocked` capability, makes a non-blocking read of the
socket to take in a connection.blocked notice. For a sender of thousands of small messages a second
that was a third of each publish (profiled: docs/performance.md). Where messages are published in
bulk without a confirm awaited per message (conveyor/seam/publisher.py's batches, results with
`tuning.result_confirms: false`), `write_publish` writes the frames straight to the connection's
frame writer, with the arguments encoded once per destination; the caller reads the socket itself
often enough (the batch publisher at every flush, the result publisher once a second).

Uses of py-amqp internals (checked against amqp 5.4.2, kombu 5.7.0):

- `amqp.spec.Basic.Publish` and `amqp.serialization.dumps("Bssbb", ...)`: the method frame's
  arguments, encoded as `Channel._basic_publish` encodes them. Replaces: that encoding per message.
- `Connection.frame_writer(1, channel_id, method, args, message)`: the writer `send_method` uses.
  Replaces: `channel.basic_publish`'s socket-timeout context and non-blocking read per message.
- `write_reply`, a result's three frames written as one bytes object: the header's property list
  taken from py-amqp's own `Message._serialize_properties` for a template message of the same
  properties, with the correlation id (the last property of the list, a short string) put in.
  `transport.write` and `connection.bytes_sent` (what py-amqp's writer counts for heartbeats), and
  `connection.frame_max`. Replaces: an amqp.Message, the property encoding and the frame packing per
  result (6 % of a no-op solo worker's samples); a body that needs more than one frame goes
  `write_publish`'s way. A conformance test compares the bytes with py-amqp's writer's.
"""

from __future__ import annotations

import struct
from functools import lru_cache
from typing import Any

from amqp import Message, spec
from amqp.serialization import dumps

FRAME_END = b"\xce"
_FRAME_HEADER = struct.Struct(">BHI")  # frame type, channel, payload size
_CONTENT_HEADER = struct.Struct(">HHQ")  # class id, weight, body size
_METHOD = struct.pack(">HH", *spec.Basic.Publish)


@lru_cache(maxsize=256)  # one per destination: a worker sends results to each caller's reply queue
def publish_args(exchange: str, routing_key: str, mandatory: bool = False) -> bytes:
    """basic.publish's arguments, as py-amqp encodes them: ticket 0, `mandatory` (the broker returns
    a message no queue takes: task messages), not immediate."""
    return dumps("Bssbb", (0, exchange, routing_key, mandatory, False))


def write_publish(channel: Any, args: bytes, message: Any) -> None:
    """Publish `message` (an amqp.Message) with `args` from publish_args, as basic_publish would."""
    channel.connection.frame_writer(1, channel.channel_id, spec.Basic.Publish, args, message)


@lru_cache(maxsize=64)
def _properties_before_correlation_id(content_type: str, content_encoding: str, delivery_mode: int) -> bytes | None:
    """The property list of a reply without headers (kombu's way: an empty table, priority 0), up to
    its correlation id: py-amqp's encoding of a template, less the template's own id (length 1, "x").
    None if that id is not where it ends (a py-amqp that orders properties otherwise): then every
    reply goes py-amqp's own way."""
    template = Message(b"", content_type=content_type, content_encoding=content_encoding, application_headers={},
                       delivery_mode=delivery_mode, priority=0, correlation_id="x")
    encoded = template._serialize_properties()
    return encoded[:-2] if encoded.endswith(b"\x01x") else None


@lru_cache(maxsize=256)
def _method_frame(channel_id: int, args: bytes) -> bytes:
    payload = _METHOD + args
    return _FRAME_HEADER.pack(1, channel_id, len(payload)) + payload + FRAME_END


def write_reply(channel: Any, args: bytes, body: bytes | str, content_type: str, content_encoding: str,
                delivery_mode: int, correlation_id: str) -> None:
    """Publish a reply (a result) with `args` from publish_args: the message `write_publish` would
    write for channel.prepare_message(body, 0, content_type, content_encoding, {}, {"correlation_id":
    correlation_id, "delivery_mode": delivery_mode}), as one write."""
    if isinstance(body, str):
        body = body.encode(content_encoding or "utf-8")
    cid = correlation_id.encode("utf-8", "surrogatepass")  # as py-amqp encodes a short string
    connection = channel.connection
    method = _method_frame(channel.channel_id, args)
    properties = _properties_before_correlation_id(content_type, content_encoding, delivery_mode)
    # py-amqp's own test for a body written in one frame (FRAME_OVERHEAD is its 40 bytes).
    if properties is None or len(cid) > 255 \
            or len(args) + len(properties) + 1 + len(cid) + len(body) + 40 > connection.frame_max - 8:
        message = channel.prepare_message(body, 0, content_type, content_encoding, {},
                                          {"correlation_id": correlation_id, "delivery_mode": delivery_mode})
        write_publish(channel, args, message)
        return
    header = _CONTENT_HEADER.pack(spec.Basic.CLASS_ID, 0, len(body)) + properties + bytes((len(cid),)) + cid
    parts = [method, _FRAME_HEADER.pack(2, channel.channel_id, len(header)), header, FRAME_END]
    if body:
        parts += (_FRAME_HEADER.pack(3, channel.channel_id, len(body)), body, FRAME_END)
    connection.transport.write(b"".join(parts))
    connection.bytes_sent += 1
