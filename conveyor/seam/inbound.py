"""What py-amqp and kombu do to a delivery before any consumer sees it, with bounds they lack.

Two steps run before Celery's consumer (and conveyor/seam/intake.py) is handed a message:

- py-amqp decodes the header table of a content frame recursively (serialization._read_item calls
  itself for every nested table or array), in the connection's frame handler. Headers nested a few
  hundred levels deep raise RecursionError out of drain_events, which stops the worker; the broker
  then hands the message to the next one. `decode_properties` replaces the decoder of basic
  properties: a header frame that cannot nest deeper than MAX_DEPTH (it holds fewer table or array
  type codes than that) goes py-amqp's way unchanged; any other is decoded to MAX_DEPTH levels, the
  deeper values replaced by TRUNCATED, and the table as received kept, base64, in ORIGINAL_HEADERS,
  so that the intake can dead-letter the message with nothing lost.
- kombu's Message inflates a body named by the `compression` header as it is built, whatever the
  size it inflates to. `Message` here inflates at most `max_body_bytes` (plus one, to tell) and,
  over that, raises Rejected when the body is decoded (the intake's first look at it). The body
  as received is kept in `received_body`, so a dead-letter copy keeps body and `compression` together.

`install` puts both in place, once per process (conveyor.runtime.app.create_app calls it).
"""

from __future__ import annotations

import base64
import bz2
import lzma
import zlib
from struct import pack, unpack_from
from typing import Any

from amqp import serialization, spec
from kombu.transport import pyamqp

MAX_DEPTH = 32  # nothing Celery sends nests deeper than 4; py-amqp's recursion fails near 500
TRUNCATED = f"(nested deeper than {MAX_DEPTH} levels: not decoded)"
ORIGINAL_HEADERS = "x-original-headers-base64"
_CONTAINERS = (ord("F"), ord("A"))
_HEADERS_FLAG = 0x2000
_SHORT_STRING_FLAGS = (0x8000, 0x4000)  # content_type, content_encoding: the properties before the headers


class Rejected(Exception):
    """A message breaks an intake rule: `field` names what, `rule` says which rule."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field, self.rule = field, rule


# --- header tables -----------------------------------------------------------------------------------

def decode_properties(buf: Any, offset: int) -> tuple[dict[str, Any], int]:
    """py-amqp's decode_properties_basic, bounded in depth (see the module's docstring)."""
    data = bytes(buf) if isinstance(buf, memoryview) else buf
    if data.count(b"F", offset) + data.count(b"A", offset) < MAX_DEPTH:
        return serialization.decode_properties_basic(data, offset)
    flags, = unpack_from(">H", data, offset)
    if not flags & _HEADERS_FLAG:
        return serialization.decode_properties_basic(data, offset)
    cursor = offset + 2
    properties: dict[str, Any] = {}
    for flag, name in zip(_SHORT_STRING_FLAGS, ("content_type", "content_encoding")):
        if flags & flag:
            size = data[cursor]
            properties[name] = data[cursor + 1:cursor + 1 + size].decode("utf-8", "replace")
            cursor += 1 + size
    start, cut = cursor, []
    headers, cursor = _read_table(data, cursor, 1, cut)
    if cut:
        headers[ORIGINAL_HEADERS] = base64.b64encode(data[start:cursor]).decode()
    properties["application_headers"] = headers
    # The properties after the headers, as py-amqp reads them: the same bytes under flags without
    # the three already read.
    rest = pack(">H", flags & ~(_HEADERS_FLAG | _SHORT_STRING_FLAGS[0] | _SHORT_STRING_FLAGS[1])) + data[cursor:]
    later, used = serialization.decode_properties_basic(rest, 0)
    properties.update(later)
    return properties, cursor + used - 2


def _read_table(data: bytes, offset: int, depth: int, cut: list[bool]) -> tuple[dict[Any, Any], int]:
    size, = unpack_from(">I", data, offset)
    cursor, end = offset + 4, offset + 4 + size
    table: dict[Any, Any] = {}
    while cursor < end:
        length = data[cursor]
        key = data[cursor + 1:cursor + 1 + length]
        try:
            key = key.decode("utf-8")
        except UnicodeDecodeError:
            pass
        table[key], cursor = _read_value(data, cursor + 1 + length, depth, cut)
    return table, end


def _read_value(data: bytes, offset: int, depth: int, cut: list[bool]) -> tuple[Any, int]:
    """One value of a table or array at `depth`; a table or array below MAX_DEPTH becomes TRUNCATED
    (and `cut` is set), its bytes skipped by their length."""
    kind = data[offset]
    if kind not in _CONTAINERS:
        return serialization._read_item(data, offset)
    size, = unpack_from(">I", data, offset + 1)
    end = offset + 5 + size
    if depth >= MAX_DEPTH:
        cut.append(True)
        return TRUNCATED, end
    if kind == ord("F"):
        return _read_table(data, offset + 1, depth + 1, cut)[0], end
    items, cursor = [], offset + 5
    while cursor < end:
        value, cursor = _read_value(data, cursor, depth + 1, cut)
        items.append(value)
    return items, end


# --- bodies -------------------------------------------------------------------------------------------

def _bounded(decompressor: Any) -> Any:
    def inflate(body: bytes, limit: int) -> bytes:
        return decompressor().decompress(body, limit + 1)

    return inflate


# kombu's names for the compressions that the standard library can inflate with a bound.
INFLATERS = {name: _bounded(cls) for names, cls in (
    (("application/x-gzip", "gzip", "zlib"), zlib.decompressobj),
    (("application/x-bz2", "bzip2", "bzip"), bz2.BZ2Decompressor),
    (("application/x-lzma", "lzma", "xz"), lzma.LZMADecompressor),
) for name in names}


def inflate(body: bytes, compression: Any, limit: int) -> bytes:
    """The body inflated, never to more than `limit` bytes; Rejected if it would be more, or the
    compression is not one of INFLATERS."""
    inflater = INFLATERS.get(compression) if isinstance(compression, str) else None
    if inflater is None:
        raise Rejected("compression", f"must be one of {', '.join(sorted(INFLATERS))}, got {compression!r}")
    try:
        inflated = inflater(body, limit)
    except (OSError, EOFError, ValueError, TypeError, zlib.error, lzma.LZMAError) as exc:
        raise Rejected("body", f"does not inflate as {compression} ({type(exc).__name__}: {exc})") from None
    if len(inflated) > limit:
        raise Rejected("body", f"inflates to more than {limit} bytes (limits.max_payload_bytes plus the envelope)")
    return inflated


class Message(pyamqp.Message):
    """kombu's py-amqp message, inflating a compressed body with a bound (see the module's docstring)."""

    max_body_bytes: int | None = None  # set by install

    def __init__(self, msg: Any, channel: Any = None, **kwargs: Any) -> None:
        headers = msg.properties.get("application_headers") or {}
        compression = headers.get("compression") if isinstance(headers, dict) else None
        if compression is None or self.max_body_bytes is None:
            super().__init__(msg, channel, **kwargs)
            return
        received = msg.body
        rejected = None
        try:
            msg.body = inflate(_as_bytes(received, msg.properties.get("content_encoding")), compression, self.max_body_bytes)
        except Rejected as exc:
            rejected = exc
        # kombu inflates when it sees the header: hide it for the constructor, and put it back.
        msg.properties["application_headers"] = {k: v for k, v in headers.items() if k != "compression"}
        try:
            super().__init__(msg, channel, **kwargs)
        finally:
            msg.properties["application_headers"] = headers
            msg.body = received
        self.headers, self.properties = headers, msg.properties
        self.received_body = received
        self.rejected = rejected
        if rejected:
            self.body = received

    def _decode(self) -> Any:
        # Raised when the body is decoded, not kept in `errors`: kombu's Queue.get raises those at
        # once, which would stop `dlq list` at a dead-lettered bomb instead of showing its headers.
        if getattr(self, "rejected", None) is not None:
            raise self.rejected
        return super()._decode()


def _as_bytes(body: bytes | str, encoding: str | None) -> bytes:
    """The body as it came: py-amqp decodes one with a content encoding to str when it can (auto_decode)."""
    if not isinstance(body, str):
        return body
    try:
        return body.encode(encoding or "utf-8")
    except (LookupError, UnicodeError) as exc:
        raise Rejected("content_encoding", f"cannot give back the bytes of a body decoded as {encoding!r} ({exc})") from None


def install(max_body_bytes: int) -> None:
    """Put the bounded decoders in place in this process (again with another bound: the last one holds)."""
    serialization.PROPERTY_CLASSES[spec.Basic.CLASS_ID] = decode_properties
    Message.max_body_bytes = max_body_bytes
    pyamqp.Channel.Message = Message
