"""Intake validation: every field of a task message that Celery reads, checked before Celery sees it.

Celery trusts a message's headers and body: a `timelimit` of strings reaches the prefork pool's
timeout handling in the worker's main process and stops the worker; so would many other fields of
the wrong type. `check` holds each of them to the shape Celery's own producers give them (protocol
2) and raises Rejected naming the field and the rule; the consumer (conveyor/seam/consumer.py)
then dead-letters the message as received and acknowledges it. Nesting and compression are bounded
earlier, as the message is read off the wire (conveyor/seam/inbound.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from celery.utils.time import maybe_iso8601
from kombu.exceptions import DecodeError
from kombu.message import Message

from conveyor.seam.inbound import MAX_DEPTH, ORIGINAL_HEADERS, Rejected

JSON_ENCODINGS = ("utf-8", "utf8")
MAX_NAME_CHARS = 255  # an id or task name is also a key in the record store and in logs
SIGNATURE_LISTS = ("callbacks", "errbacks", "chain")


def _text(value: Any) -> str | None:
    if not isinstance(value, str):
        return "must be a string"
    if not 0 < len(value) <= MAX_NAME_CHARS:
        return f"must be 1 to {MAX_NAME_CHARS} characters, got {len(value)}"
    return None


def _optional_text(value: Any) -> str | None:
    return None if value is None else _text(value)


def _repr_text(value: Any) -> str | None:
    return None if value is None or isinstance(value, str) else "must be a string or null"


def _count(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return "must be a whole number from 0"
    return None


def _optional_count(value: Any) -> str | None:
    return None if value is None else _count(value)


def _seconds(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value >= 0


def _limit(value: Any) -> bool:
    return value is None or (_seconds(value) and value > 0)


def _timelimit(value: Any) -> str | None:
    # Both limits named rather than walked by a generator: every Celery message has this header.
    if value is None or (isinstance(value, (list, tuple)) and len(value) == 2 and _limit(value[0]) and _limit(value[1])):
        return None
    return "must be [hard, soft], each null or a number of seconds over 0"


def _countdown(value: Any) -> str | None:
    return None if value is None or _seconds(value) else "must be a number of seconds from 0"


def _instant(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        return "must be an ISO 8601 date and time"
    try:
        maybe_iso8601(value)
    except (ValueError, TypeError, AttributeError):
        return f"must be an ISO 8601 date and time, got {value[:40]!r}"
    return None


def _flag(value: Any) -> str | None:
    return None if value is None or isinstance(value, bool) else "must be true, false or null"


def _strings(value: Any) -> str | None:
    if value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return None
    return "must be a list of strings"


def _mapping(value: Any) -> str | None:
    return None if value is None or isinstance(value, dict) else "must be a table"


# The headers Celery's worker reads (protocol 2), and what each must be.
HEADERS: dict[str, Callable[[Any], str | None]] = {
    "id": _text, "task": _text, "lang": _optional_text, "shadow": _optional_text,
    "root_id": _optional_text, "parent_id": _optional_text, "group": _optional_text, "origin": _optional_text,
    "retries": _count, "group_index": _optional_count, "replaced_task_nesting": _optional_count,
    "timelimit": _timelimit, "countdown": _countdown, "eta": _instant, "expires": _instant,
    "argsrepr": _repr_text, "kwargsrepr": _repr_text, "ignore_result": _flag,
    "stamped_headers": _strings, "stamps": _mapping,
}
REQUIRED = ("id", "task")


def check(message: Message, max_body_bytes: int, max_eta_s: float) -> None:
    """Raise Rejected if `message` breaks a rule; kombu's DecodeError or ContentDisallowed if its
    body cannot be decoded. A message without a `task` header is left to Celery (unknown message)."""
    headers = message.headers
    if ORIGINAL_HEADERS in headers:
        raise Rejected("headers", f"nested deeper than {MAX_DEPTH} levels")
    if "task" not in headers:
        payload = _payload(message, max_body_bytes)
        if isinstance(payload, dict) and "task" in payload:
            raise Rejected("task", "must be a header: protocol 1 messages (the task in the body) are not accepted")
        return
    for name in REQUIRED:
        if name not in headers:
            raise Rejected(name, "is a required header")
    for name, rule in HEADERS.items():
        if name in headers and (broken := rule(headers[name])):
            raise Rejected(name, broken)
    _eta_in_reach(headers.get("eta"), max_eta_s)
    if message.content_type == "application/json" and message.content_encoding not in JSON_ENCODINGS:
        raise Rejected("content_encoding", f"must be utf-8 for application/json, got {message.content_encoding!r}")
    _body(_payload(message, max_body_bytes))


def _eta_in_reach(eta: str | None, max_eta_s: float) -> None:
    # A worker holds a message with an ETA unacknowledged until it is due; past the broker's
    # consumer timeout the broker closes the channel and delivers it again, for ever.
    if eta is None:
        return
    due = maybe_iso8601(eta)
    if due.tzinfo is None:
        due = due.replace(tzinfo=timezone.utc)
    ahead_s = (due - datetime.now(timezone.utc)).total_seconds()
    if ahead_s > max_eta_s:
        raise Rejected("eta", f"is {ahead_s:.0f} s ahead, over broker.consumer_timeout_s ({max_eta_s:g}): "
                              "the broker would take the message back before it is due")


def _payload(message: Message, max_body_bytes: int) -> Any:
    size = _size(message.body or b"", max_body_bytes)
    if size > max_body_bytes:
        raise Rejected("body", f"is {size} bytes, over limits.max_payload_bytes plus the envelope ({max_body_bytes})")
    try:
        payload = message.decode()  # kombu caches it: Celery's strategy, and a solo pool's tracer, use it
    except DecodeError as exc:
        if isinstance(exc.__context__, RecursionError):
            raise Rejected("body", f"nested deeper than {MAX_DEPTH} levels") from None
        raise
    body = message.body
    # A JSON value this deep holds at least MAX_DEPTH brackets: only then is it walked.
    brackets = (b"[", b"{") if isinstance(body, (bytes, bytearray)) else ("[", "{")
    if isinstance(body, (bytes, bytearray, str)) and body.count(brackets[0]) + body.count(brackets[1]) >= MAX_DEPTH \
            and _depth(payload) >= MAX_DEPTH:
        raise Rejected("body", f"nested deeper than {MAX_DEPTH} levels")
    return payload


def _size(body: bytes | str, limit: int) -> int:
    """The body's size in bytes. py-amqp hands over a body with a content encoding already decoded
    (auto_decode): its UTF-8 length is counted only when the count of characters cannot tell."""
    if not isinstance(body, str) or len(body) > limit or 4 * len(body) <= limit:
        return len(body)
    return len(body.encode("utf-8", "surrogatepass"))


def _depth(value: Any) -> int:
    """Nesting depth of lists and dicts, walked without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, (list, tuple)):
            deepest = max(deepest, depth + 1)
            stack.extend((child, depth + 1) for child in item)
    return deepest


def _body(payload: Any) -> None:
    if not (isinstance(payload, (list, tuple)) and len(payload) == 3):
        raise Rejected("body", "must be [args, kwargs, embed]")
    args, kwargs, embed = payload
    if not isinstance(args, (list, tuple)):
        raise Rejected("body.args", "must be a list")
    if not isinstance(kwargs, dict):
        raise Rejected("body.kwargs", "must be an object")
    if embed is None:
        return
    if not isinstance(embed, dict):
        raise Rejected("body.embed", "must be an object or null")
    for name in SIGNATURE_LISTS:
        value = embed.get(name)
        if value is None:
            continue
        if not isinstance(value, list):
            raise Rejected(f"body.embed.{name}", "must be a list of task signatures or null")
        for i, signature in enumerate(value):
            _signature(f"body.embed.{name}[{i}]", signature)
    if embed.get("chord") is not None:
        _signature("body.embed.chord", embed["chord"])


def _signature(field: str, value: Any) -> None:
    """What Celery's signature(dict) needs to clone and send a callback without raising in the
    worker: the keys Celery's own signatures always carry (a missing `kwargs` broke the tracer's
    error path, so the task's failure was never stored: found by tests/test_fuzz_intake.py)."""
    if not isinstance(value, dict):
        raise Rejected(field, "must be a task signature (an object)")
    if _text(value.get("task")):
        raise Rejected(f"{field}.task", _text(value.get("task")))
    for name, kind, what in (("args", (list, tuple), "a list"), ("kwargs", dict, "an object"),
                             ("options", dict, "an object")):
        if not isinstance(value.get(name), kind):
            raise Rejected(f"{field}.{name}", f"must be {what}")
    if value.get("subtask_type") is not None and not isinstance(value["subtask_type"], str):
        raise Rejected(f"{field}.subtask_type", "must be a string or null")
    if value.get("immutable") is not None and not isinstance(value["immutable"], bool):
        raise Rejected(f"{field}.immutable", "must be true or false")
