"""Property-based fuzzing of the worker's intake (issue 12): hypothesis mutates a valid task message
(header and body types, sizes, nesting, encodings, missing and extra fields, compression) and a plain
kombu producer publishes each, under confirms, to a real worker on the real broker, on every pool.

The property, per message: it runs (a final state comes back, or its record says it finished) or is
dead-lettered (it is in the dead-letter queue with its tracking header), within WAIT_S; and the
worker is the same process throughout. After the run, a normal task still succeeds.

Fast tier (`make test`): FUZZ_MESSAGES (default 100) per pool, 300 in all. Long tier: `make fuzz` (thousands,
with the seed printed for replay: `make fuzz FUZZ_SEED=N`). Each pool's account (sent, ran,
dead-lettered, lost) is printed and written to reports/fuzz/.
"""

from __future__ import annotations

import bz2
import json
import lzma
import os
import sys
import time
import uuid
import zlib
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st
from kombu import Connection, Exchange, Producer, Queue

from helpers import ROOT
from conveyor.lifecycle import stores
from conveyor.seam.intake import HEADERS
from conveyor.tasks import deadletter

MESSAGES = int(os.environ.get("FUZZ_MESSAGES", "100"))
WAIT_S = 20.0
TRACK = "x-fuzz-seq"
FINAL = ("SUCCESS", "FAILURE", "REVOKED")
LIMIT = 65536  # CONFIG's limits.max_payload_bytes


@dataclass
class Account:
    pool: str
    sent: int = 0
    ran: int = 0
    dead_lettered: int = 0
    lost: list[int] = field(default_factory=list)
    refused_by_broker: int = 0  # not sent: the producer or the broker would not take it
    reasons: dict[str, int] = field(default_factory=dict)


class Harness:
    """A producer and the two places an outcome shows: our reply queue and the dead-letter queue."""

    def __init__(self, stack, account: Account) -> None:
        self.stack = stack
        self.account = account
        self.ids: dict[int, Any] = {}
        self.app = stack.app
        self.conn = Connection(self.app.conf.broker_url, transport_options={"confirm_publish": True})
        self.replies = Queue(f"fuzz-replies-{uuid.uuid4().hex[:8]}", exclusive=True, auto_delete=True)
        self.replies(self.conn.default_channel).declare()
        self.seq = 0
        self.ran: set[int] = set()
        self.dead: set[int] = set()
        self.store = stores.store_for(self.app, keep_writes=False)

    def publish(self, body: bytes, headers: dict, content_type: str, content_encoding: str, task_id: Any) -> int | None:
        self.seq += 1
        headers = {**headers, TRACK: self.seq}
        try:
            Producer(self.conn.default_channel).publish(
                body, exchange=Exchange("queue_a", type="direct"), routing_key="queue_a", headers=headers,
                content_type=content_type, content_encoding=content_encoding, serializer=None,
                reply_to=self.replies.name, correlation_id=str(self.seq), delivery_mode=2)
        except Exception:  # noqa: BLE001  (py-amqp cannot encode it, or the broker closed the channel)
            self.conn.close()
            self.conn = Connection(self.app.conf.broker_url, transport_options={"confirm_publish": True})
            self.replies(self.conn.default_channel).declare()
            return None
        self.ids[self.seq] = task_id
        return self.seq

    def _take(self) -> None:
        channel = self.conn.default_channel
        while (message := channel.basic_get(self.replies.name, no_ack=True)) is not None:
            try:
                state = json.loads(message.body).get("status")
            except (ValueError, AttributeError):
                continue
            if state in FINAL:
                self.ran.add(int(message.properties.get("correlation_id")))
        while (message := channel.basic_get("dead_letter", no_ack=True)) is not None:
            headers = message.properties.get("application_headers") or {}
            if isinstance(headers.get(TRACK), int):
                self.dead.add(headers[TRACK])
                reason = headers.get("x-invalid-field") or headers.get("x-exception-type") or "?"
                self.account.reasons[str(reason)] = self.account.reasons.get(str(reason), 0) + 1

    def _finished(self, seq: int) -> bool:
        task_id = self.ids.get(seq)
        if not isinstance(task_id, str) or not 0 < len(task_id) <= 255:
            return False
        try:
            record = self.store.get(task_id)
        except Exception:  # noqa: BLE001  (an id the store cannot key: the other signs decide)
            return False
        return bool(record and not record.active and record.status is not None)

    def outcome(self, seq: int) -> str | None:
        self._take()
        if seq in self.dead:
            return "dead_lettered"
        if seq in self.ran or self._finished(seq):
            return "ran"
        return None


# --- the mutations --------------------------------------------------------------------------------

INT64 = st.integers(-(2 ** 63), 2 ** 63 - 1)
SCALARS = st.none() | st.booleans() | INT64 | st.floats() | st.text(max_size=12) | st.binary(max_size=12)
VALUES = st.recursive(SCALARS, lambda children: st.lists(children, max_size=3)
                      | st.dictionaries(st.text(max_size=6), children, max_size=3), max_leaves=8)
NOW = datetime.now(timezone.utc)
INSTANTS = st.sampled_from([(NOW - timedelta(days=1)).isoformat(), (NOW + timedelta(days=3)).isoformat(),
                            "2024-02-30T25:61:00", "yesterday", "", NOW.isoformat()[:10]])
HEADER_NAMES = sorted(HEADERS)


def nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for i in range(depth):
        value = {"n": value} if i % 2 else [value]
    return value


def base_message() -> tuple[dict, list]:
    task_id = str(uuid.uuid4())
    headers = {"lang": "py", "task": "task_a", "id": task_id, "shadow": None, "eta": None, "expires": None,
               "group": None, "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": task_id,
               "parent_id": None, "argsrepr": "()", "kwargsrepr": "{}", "origin": "fuzz@host",
               "ignore_result": False, "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {}}
    body = [[], {"duration_s": 0}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    return headers, body


@st.composite
def mutated(draw) -> dict[str, Any]:
    headers, body = base_message()
    message = {"headers": headers, "body": body, "raw": None, "content_type": "application/json",
               "content_encoding": "utf-8", "compression": None}
    for kind in draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=3)):
        kind(draw, message)
    return message


def _header_type(draw, m) -> None:
    name = draw(st.sampled_from(HEADER_NAMES))
    m["headers"][name] = draw(INSTANTS | VALUES) if name in ("eta", "expires") else draw(VALUES)


def _drop_header(draw, m) -> None:
    m["headers"].pop(draw(st.sampled_from(sorted(m["headers"]))), None)


def _extra_header(draw, m) -> None:
    m["headers"][draw(st.text(min_size=1, max_size=12))] = draw(VALUES)


def _deep_header(draw, m) -> None:
    m["headers"]["x-deep"] = nested(draw(st.integers(1, 700)))


def _task_body(m) -> bool:
    return isinstance(m["body"], list) and len(m["body"]) == 3


def _body_part(draw, m) -> None:
    if _task_body(m):
        m["body"][draw(st.integers(0, 2))] = draw(VALUES)


def _body_shape(draw, m) -> None:
    m["body"] = draw(VALUES)


def _embed(draw, m) -> None:
    """A callback, errback, chain or chord: a signature as Celery writes one, with one key changed or dropped."""
    name = draw(st.sampled_from(["callbacks", "errbacks", "chain", "chord"]))
    signature = {"task": draw(st.sampled_from(["task_a", "no_such_task"])), "args": [], "kwargs": {}, "options": {},
                 "subtask_type": None, "immutable": False}
    key = draw(st.sampled_from(sorted(signature)))
    if draw(st.booleans()):
        signature[key] = draw(VALUES)
    else:
        signature.pop(key)
    if _task_body(m) and isinstance(m["body"][2], dict):
        m["body"][2][name] = draw(st.sampled_from([signature, [signature], [signature, 1]]))


def _long(value: Any) -> bool:
    """A run time the task accepts and would sleep for: valid, but it would hold the one worker slot."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.05 < value <= 3600


def _kwargs(draw, m) -> None:
    if _task_body(m) and isinstance(m["body"][1], dict):
        name = draw(st.sampled_from(["duration_s", "fail_first", "payload", "seed", "other"]))
        m["body"][1][name] = draw(VALUES.filter(lambda v: not _long(v)) if name == "duration_s" else VALUES)


def _size(draw, m) -> None:
    if _task_body(m) and isinstance(m["body"][1], dict):
        m["body"][1]["payload"] = "x" * draw(st.sampled_from([0, LIMIT - 1, LIMIT + 4096 + 1, 2 * LIMIT]))


def _deep_body(draw, m) -> None:
    if _task_body(m) and isinstance(m["body"][1], dict):
        m["body"][1]["deep"] = nested(draw(st.integers(1, 3000)))


def _raw_body(draw, m) -> None:
    m["raw"] = draw(st.binary(max_size=64) | st.sampled_from([b"[" * 50_000, b"\xff\xfe{}", b"[[],{},{}]"]))


def _encoding(draw, m) -> None:
    m["content_encoding"] = draw(st.sampled_from(["utf-8", "utf-16", "latin-1", "binary", "bogus", ""]))


def _content_type(draw, m) -> None:
    m["content_type"] = draw(st.sampled_from(["application/json", "application/x-python-serialize", "text/plain",
                                              "application/x-yaml", "", "bogus/type"]))


def _compression(draw, m) -> None:
    m["compression"] = draw(st.sampled_from(["zlib", "application/x-gzip", "bzip2", "xz", "bogus", "zstd", "bomb",
                                             "not-compressed"]))


MUTATIONS = [_header_type, _drop_header, _extra_header, _deep_header, _body_part, _body_shape, _embed, _kwargs,
             _size, _deep_body, _raw_body, _encoding, _content_type, _compression]
COMPRESS = {"zlib": zlib.compress, "application/x-gzip": zlib.compress, "bzip2": bz2.compress, "xz": lzma.compress,
            "bogus": zlib.compress, "zstd": zlib.compress}


def encode(m: dict[str, Any]) -> tuple[bytes, dict] | None:
    """The message's body bytes and headers, or None where the test's own encoders refuse it."""
    headers = dict(m["headers"])
    try:
        body = m["raw"] if m["raw"] is not None else json.dumps(m["body"]).encode()
    except (TypeError, ValueError, RecursionError):  # bytes in the body, or NaN keys: not JSON at all
        return None
    compression = m["compression"]
    if compression == "bomb":
        body, compression = zlib.compress(b" " * (64 * 1024 * 1024)), "zlib"
    elif compression == "not-compressed":
        compression = "zlib"
    elif compression:
        body = COMPRESS[compression](body)
    if compression:
        headers["compression"] = compression
    return body, headers


# --- the property ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def harness(worker):
    deadletter.drain(worker.app)
    made = Harness(worker, Account(worker.config.services[0].pool))
    yield made
    made.conn.close()


@pytest.mark.broker
@pytest.mark.slow
def test_no_mutated_message_is_lost_or_stops_the_worker(harness):
    [before] = harness.stack.replicas()
    account = harness.account
    old_limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)  # py-amqp and json *encode* recursively: the producer needs the room

    # Generated, not shrunk: a worker is state that shrinking cannot reset between examples, so the
    # first failing message (printed whole) is the one to replay, with the seed.
    @settings(max_examples=MESSAGES, deadline=None, database=None, derandomize=False,
              phases=(Phase.generate,), report_multiple_bugs=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                     HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(mutated())
    def one_message(message):
        encoded = encode(message)
        assume(encoded is not None)
        body, headers = encoded
        seq = harness.publish(body, headers, message["content_type"], message["content_encoding"], headers.get("id"))
        if seq is None:
            account.refused_by_broker += 1
            assume(False)
        account.sent += 1
        deadline = time.monotonic() + WAIT_S
        while (outcome := harness.outcome(seq)) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if outcome is None:
            account.lost.append(seq)
        else:
            account.ran += outcome == "ran"
            account.dead_lettered += outcome == "dead_lettered"
        assert outcome is not None, f"message {seq} neither ran nor was dead-lettered within {WAIT_S} s: {message!r:.2000}"
        [now] = harness.stack.replicas()
        assert now.running and now.ident == before.ident, f"the worker is not the same process after message {seq}"

    try:
        one_message()
    finally:
        sys.setrecursionlimit(old_limit)
        report(account)
    # After the run: a normal task still succeeds, on the same worker, which never stopped.
    assert harness.app.send_task("task_a", kwargs={"duration_s": 0}).get(timeout=20)["task"] == "task_a"
    [after] = harness.stack.replicas()
    assert after.running and after.ident == before.ident
    log = (Path(harness.stack.home) / "worker-a-1.log").read_text()
    assert "Unrecoverable error" not in log
    assert account.sent == account.ran + account.dead_lettered and not account.lost


def report(account: Account) -> None:
    line = (f"fuzz [{account.pool}]: sent {account.sent}, ran {account.ran}, dead-lettered {account.dead_lettered}, "
            f"lost {len(account.lost)}; not sent (refused by the producer or broker) {account.refused_by_broker}")
    print(line)
    out = ROOT / "reports" / "fuzz"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"fuzz-{account.pool}-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(asdict(account), indent=2) + "\n")
