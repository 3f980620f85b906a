"""Malformed task messages from a plain kombu producer (not Celery) to a real worker on the real
broker, on every pool: each is dead-lettered with the field and the rule, its body and headers as
received, and the same worker process runs the next good task (conveyor/seam/intake.py, inbound.py)."""

from __future__ import annotations

import base64
import json
import sys
import uuid
import zlib
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

import pytest
from amqp.serialization import dumps

from helpers import queue_depth, wait_for
from conveyor.seam.inbound import MAX_DEPTH, ORIGINAL_HEADERS
from helpers.intake import publish_raw, still_serving, the_dead_letter
from conveyor.tasks import deadletter



def task_headers(**changes) -> dict:
    """The headers Celery's own producer sends for task_a (protocol 2), changed as given (None drops one)."""
    task_id = str(uuid.uuid4())
    headers = {"lang": "py", "task": "task_a", "id": task_id, "shadow": None, "eta": None, "expires": None,
               "group": None, "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": task_id,
               "parent_id": None, "argsrepr": "()", "kwargsrepr": "{'duration_s': 0}", "origin": "test@host",
               "ignore_result": False, "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {}}
    for name, value in changes.items():
        if value is None:
            headers.pop(name, None)
        else:
            headers[name] = value
    return headers


def task_body(args=(), kwargs=None, embed=None) -> bytes:
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None} if embed is None else embed
    return json.dumps([list(args), {"duration_s": 0} if kwargs is None else kwargs, embed]).encode()


def nested(depth: int) -> dict:
    value: dict = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"n": value}
    return value


@contextmanager
def deep_recursion():
    """py-amqp *encodes* tables recursively too: the producer needs the room the worker must not."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


FAR = (datetime.now(timezone.utc) + timedelta(days=2)).isoformat()

# (headers changes, body, field, words in the rule)
CASES = {
    "timelimit-strings": ({"timelimit": ["a", "b"]}, task_body(), "timelimit", "[hard, soft]"),
    "timelimit-not-a-pair": ({"timelimit": 5}, task_body(), "timelimit", "[hard, soft]"),
    "timelimit-negative": ({"timelimit": [-1, None]}, task_body(), "timelimit", "over 0"),
    "retries-string": ({"retries": "three"}, task_body(), "retries", "whole number"),
    "retries-bool": ({"retries": True}, task_body(), "retries", "whole number"),
    "eta-not-a-date": ({"eta": "tomorrow"}, task_body(), "eta", "ISO 8601"),
    "eta-beyond-consumer-timeout": ({"eta": FAR}, task_body(), "eta", "broker.consumer_timeout_s"),
    "expires-number": ({"expires": 12}, task_body(), "expires", "ISO 8601"),
    "countdown-string": ({"countdown": "soon"}, task_body(), "countdown", "seconds"),
    "id-missing": ({"id": None}, task_body(), "id", "required"),
    "id-number": ({"id": 42}, task_body(), "id", "string"),
    "task-empty": ({"task": ""}, task_body(), "task", "1 to 255"),
    "group-table": ({"group": {"a": 1}}, task_body(), "group", "string"),
    "root-id-list": ({"root_id": [1]}, task_body(), "root_id", "string"),
    "parent-id-number": ({"parent_id": 1.5}, task_body(), "parent_id", "string"),
    "argsrepr-number": ({"argsrepr": 7}, task_body(), "argsrepr", "string"),
    "kwargsrepr-table": ({"kwargsrepr": {"a": 1}}, task_body(), "kwargsrepr", "string"),
    "stamped-headers-number": ({"stamped_headers": 3}, task_body(), "stamped_headers", "list of strings"),
    "args-object": ({}, json.dumps([{"a": 1}, {}, {}]).encode(), "body.args", "list"),
    "kwargs-list": ({}, json.dumps([[], [1], {}]).encode(), "body.kwargs", "object"),
    "embed-string": ({}, json.dumps([[], {}, "x"]).encode(), "body.embed", "object"),
    "callbacks-string": ({}, task_body(embed={"callbacks": "task_b"}), "body.embed.callbacks", "list"),
    "errback-without-task": ({}, task_body(embed={"errbacks": [{"args": []}]}), "body.embed.errbacks[0].task", "string"),
    "chain-args-number": ({}, task_body(embed={"chain": [{"task": "task_b", "args": 5}]}), "body.embed.chain[0].args", "list"),
    "errback-without-kwargs": ({}, task_body(embed={"errbacks": [{"task": "task_a", "args": [], "options": {}}]}),
                               "body.embed.errbacks[0].kwargs", "object"),
    "chord-list": ({}, task_body(embed={"chord": [1, 2]}), "body.embed.chord", "signature"),
    "body-too-deep": ({}, json.dumps([[], {"duration_s": 0, "x": nested(MAX_DEPTH + 5)}, {}]).encode(), "body", "nested deeper"),
    "body-far-too-deep": ({}, b"[" * 30_000 + b"]" * 30_000, "body", "nested deeper"),
    "protocol-1": ({"task": None, "id": None}, json.dumps({"task": "task_a", "id": "x", "args": [], "kwargs": {}}).encode(),
                   "task", "protocol 1"),
}


@pytest.mark.broker
@pytest.mark.parametrize("case", CASES)
def test_a_malformed_task_message_is_dead_lettered_as_received(worker, app, case):
    changes, body, field, words = CASES[case]
    headers = task_headers(**changes)
    publish_raw(app, body, "application/json", headers)
    letter = the_dead_letter(app)
    assert letter.headers.get("x-invalid-field") == field, letter.reason
    assert words in letter.headers["x-invalid-rule"]
    assert letter.reason == f"InvalidMessage: {field}: {letter.headers['x-invalid-rule']}"
    for name, value in headers.items():  # every header as it was sent
        assert letter.headers[name] == value
    still_serving(worker)


@pytest.mark.broker
def test_a_content_encoding_json_cannot_have(worker, app):
    publish_raw(app, task_body(), "application/json", task_headers(), content_encoding="utf-16")
    letter = the_dead_letter(app)
    assert (letter.headers["x-invalid-field"], letter.headers["x-invalid-rule"]) == \
           ("content_encoding", "must be utf-8 for application/json, got 'utf-16'")
    still_serving(worker)


@pytest.mark.broker
def test_headers_nested_too_deep_for_py_amqp(worker, app):
    # 600 levels: py-amqp's recursive decoder raised RecursionError out of the worker's event loop.
    deep = nested(600)
    headers = {**task_headers(), "x-deep": deep}
    with deep_recursion():
        publish_raw(app, task_body(), "application/json", headers)
        sent_table = dumps("F", [headers])
    letter = the_dead_letter(app)
    assert (letter.headers["x-invalid-field"], letter.headers["x-invalid-rule"]) == \
           ("headers", f"nested deeper than {MAX_DEPTH} levels")
    assert letter.headers["id"] == headers["id"] and letter.task == "task_a"
    # The table as received, byte for byte, beside the part that could be decoded.
    assert base64.b64decode(letter.headers[ORIGINAL_HEADERS]) == sent_table
    still_serving(worker)


@pytest.mark.broker
def test_a_compressed_body_that_inflates_past_the_limit(worker, app):
    bomb = zlib.compress(b"0" * (64 * 1024 * 1024))  # 64 MiB in about 64 KB: the limit is 64 KiB here
    publish_raw(app, bomb, "application/json", {**task_headers(), "compression": "application/x-gzip"})
    wait_for(lambda: queue_depth(app, "dead_letter") >= 1, 20, "the message to reach the dead-letter queue")
    # `dlq list` shows it, without inflating it: the reason and headers, no body.
    [letter] = deadletter.browse(app)
    assert letter.reason.startswith("InvalidMessage: body: inflates to more than ") and letter.body is None
    with app.connection_for_read() as conn:  # py-amqp itself: the copy as it lies in the queue
        channel = conn.default_channel
        copy = channel.basic_get("dead_letter", no_ack=True)
    headers = copy.properties["application_headers"]
    assert headers["x-invalid-field"] == "body" and headers["x-invalid-rule"].startswith("inflates to more than ")
    assert copy.body == bomb and headers["compression"] == "application/x-gzip"  # as received, not inflated
    still_serving(worker)


@pytest.mark.broker
def test_a_compressed_message_is_dead_lettered_still_compressed_and_readable(worker, app):
    body = task_body()
    headers = {**task_headers(timelimit=["a", None]), "compression": "application/x-gzip"}
    publish_raw(app, zlib.compress(body), "application/json", headers)
    letter = the_dead_letter(app)
    assert letter.headers["x-invalid-field"] == "timelimit"
    # `dlq list` decodes it: body and `compression` header travelled together.
    assert letter.body == json.loads(body)
    still_serving(worker)


@pytest.mark.broker
def test_dlq_requeue_runs_a_refused_message_with_headers_made_afresh(worker, app):
    from conveyor.lifecycle import commands, stores
    from conveyor.tasks.states import TaskState

    headers = {**task_headers(timelimit=["a", None]), "compression": "application/x-gzip"}
    publish_raw(app, zlib.compress(task_body()), "application/json", headers)
    wait_for(lambda: queue_depth(app, "dead_letter") >= 1, 20, "the message to reach the dead-letter queue")
    [requeued] = commands.requeue(app, [headers["id"]])  # its body read, inflated, as `dlq requeue` does
    assert requeued.headers["x-invalid-field"] == "timelimit"
    # Requeued byte for byte (issue 13), the result goes to the original caller's reply_to: this
    # plain producer had none, so the task's own record says that it ran, and succeeded.
    store = stores.store_for(app)
    wait_for(lambda: (r := store.get(headers["id"])) is not None and r.status == TaskState.SUCCEEDED, 20,
             "the requeued task to succeed")
    still_serving(worker)


@pytest.mark.broker
def test_a_compressed_body_py_amqp_decoded_to_text(worker, app):
    # latin-1 decodes any bytes, so py-amqp hands over the compressed body as str (auto_decode): it
    # crashed the consumer on its way to kombu's Message, which then got py-amqp's own message.
    compressed = zlib.compress(task_body())
    publish_raw(app, compressed, "application/json", {**task_headers(), "compression": "zlib"}, content_encoding="latin-1")
    wait_for(lambda: queue_depth(app, "dead_letter") >= 1, 20, "the message to reach the dead-letter queue")
    with app.connection_for_read() as conn:
        copy = conn.default_channel.basic_get("dead_letter", no_ack=True)
    headers = copy.properties["application_headers"]
    assert (headers["x-invalid-field"], headers["x-invalid-rule"]) == ("content_encoding", "must be utf-8 for application/json, got 'latin-1'")
    assert copy.body.encode("latin-1") == compressed  # the bytes as sent (py-amqp decodes them again here)
    still_serving(worker)


@pytest.mark.broker
def test_a_compressed_task_within_the_limit_runs(worker, app):
    result = app.send_task("task_a", kwargs={"duration_s": 0, "payload": "x" * 50_000}, compression="zlib")
    assert result.get(timeout=20)["payload_bytes"] == 50_000
    assert queue_depth(app, "dead_letter") == 0
