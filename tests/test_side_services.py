"""Side services degrade, never stall: the record store behind its circuit breaker against a Redis
that refuses, one that accepts and never answers, and one that answers slowly (a relay in front of
the real Redis), and the management API's breaker. Time is never asserted here: what is counted is
how often the store was asked and how many warnings were logged (the cost in time is measured by
bench/side_services.py)."""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from helpers import listening, wait_for
from conveyor.settings import environment
from conveyor import breaker as breaker_module
from conveyor.lifecycle import guarded
from conveyor.lifecycle.guarded import GuardedStore
from conveyor.tasks.states import TaskState
from conveyor.lifecycle.redis_store import RedisStore
from conveyor.errors import RecordStoreError


REDIS = ("127.0.0.1", 6379)
RETRY_AFTER_S = 0.3
TIMEOUT_S = 0.25  # short, yet not so short that a loaded machine makes the relay look hung


class Relay:
    """A TCP relay to the real Redis that can pass, hang (accept, read, never answer) or delay replies."""

    def __init__(self) -> None:
        self.mode, self.delay_s = "pass", 0.0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        self.server.settimeout(0.1)
        while not self._stop.is_set():
            try:
                client, _ = self.server.accept()
            except OSError:
                continue
            thread = threading.Thread(target=self._serve, args=(client,), daemon=True)
            thread.start()

    def _serve(self, client: socket.socket) -> None:
        with client, socket.create_connection(REDIS, timeout=5) as upstream:
            client.settimeout(0.1)
            upstream.settimeout(0.1)
            while not self._stop.is_set():
                try:
                    data = client.recv(65536)
                except socket.timeout:
                    continue
                except OSError:
                    return
                if not data:
                    return
                if self.mode == "hang":
                    continue  # swallowed: the client waits for an answer that never comes
                upstream.sendall(data)
                reply = b""
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:  # every command sent gets its reply before the next
                    try:
                        reply += upstream.recv(65536)
                        upstream.settimeout(0.005)
                    except socket.timeout:
                        if reply:
                            break
                upstream.settimeout(0.1)
                if self.delay_s:
                    self._stop.wait(self.delay_s)
                try:
                    client.sendall(reply)
                except OSError:
                    return

    def close(self) -> None:
        self._stop.set()
        self.server.close()


@pytest.fixture
def relay() -> Iterator[Relay]:
    if not listening(environment.DEFAULT_REDIS):
        pytest.skip("Redis is not available")
    made = Relay()
    yield made
    made.close()


class CountingRedisStore(RedisStore):
    """The real Redis store, counting the calls that reach it from the tasks' thread (the main one),
    or from any thread with `every_thread` (the writer thread writes the batches and probes)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0
        self.every_thread = False

    def _count(self) -> None:
        if self.every_thread or threading.current_thread() is threading.main_thread():
            self.calls += 1

    def transition(self, *args, **kwargs) -> None:
        self._count()
        super().transition(*args, **kwargs)

    def write_many(self, *args, **kwargs) -> None:
        self._count()
        super().write_many(*args, **kwargs)

    def is_revoked(self, task_id: str) -> bool:
        self._count()
        return super().is_revoked(task_id)


def store_at(port: int, namespace: str, timeout_s: float = TIMEOUT_S) -> tuple[GuardedStore, CountingRedisStore]:
    inner = CountingRedisStore(f"redis://127.0.0.1:{port}/0", namespace, ttl_s=600, timeout_s=timeout_s)
    return GuardedStore(inner, RETRY_AFTER_S), inner


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def a_task_lifecycle(store: GuardedStore, task_id: str) -> None:
    store.transition(task_id, TaskState.QUEUED, detail="sent", name="task_a")
    assert store.is_revoked(task_id) is False
    store.transition(task_id, TaskState.RUNNING, attempt=1, count_attempt=True, detail="started")
    store.transition(task_id, TaskState.SUCCEEDED, attempt=1, detail="done")


def test_a_store_that_refuses_is_asked_once_and_warned_about_once(caplog):
    store, inner = store_at(closed_port(), "refused")
    inner.every_thread = True  # the writer thread's batches count too
    caplog.set_level(logging.WARNING)
    for _ in range(100):
        a_task_lifecycle(store, str(uuid.uuid4()))
    # The first call, from the task's is_revoked or the writer's first batch, opened the breaker;
    # nothing asks the store again before retry_after_s.
    assert inner.calls == 1
    assert len([w for w in warnings_of(caplog) if "did not answer" in w]) == 1
    assert store.queued == 300  # every write kept
    assert store.flush() is False  # at once: the breaker is open
    with pytest.raises(RecordStoreError, match="did not answer a moment ago"):
        store.get("x")
    with pytest.raises(RecordStoreError, match="did not answer a moment ago"):  # a unique key: refused at once
        store.claim("key", "id", "task_a")
    assert inner.calls == 1


@pytest.mark.parametrize("mode", ["hang", "slow-past-the-timeout"])
def test_a_hung_or_slow_store_costs_one_timeout_then_catches_up(relay, caplog, mode):
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    store, inner = store_at(relay.port, namespace)
    direct = RedisStore(f"redis://{REDIS[0]}:{REDIS[1]}/0", namespace, ttl_s=600)
    assert store.get("warm-up") is None  # connected while the relay passes
    relay.mode, relay.delay_s = ("hang", 0) if mode == "hang" else ("pass", 3 * TIMEOUT_S)
    caplog.set_level(logging.WARNING)
    ids = [str(uuid.uuid4()) for _ in range(50)]
    calls_before = inner.calls
    for task_id in ids:
        a_task_lifecycle(store, task_id)
    # The task's thread waited once (the read that timed out); writes never wait in it, and the
    # writer thread probes on its own.
    assert inner.calls - calls_before == 1
    assert [w for w in warnings_of(caplog) if "did not answer" in w] and len(warnings_of(caplog)) == 1
    if mode == "hang":
        assert all(direct.get(task_id) is None for task_id in ids)  # nothing written yet
    relay.mode, relay.delay_s = "pass", 0.0
    wait_for(lambda: all((r := direct.get(t)) and r.status == TaskState.SUCCEEDED for t in ids), 30, "the records to catch up")
    record = direct.get(ids[-1])
    # A write that timed out on a slow store may have been applied all the same: written again, its
    # event appears twice (at least once, never lost).
    assert list(dict.fromkeys(e.status for e in record.history)) == [TaskState.QUEUED, TaskState.RUNNING, TaskState.SUCCEEDED]
    assert all("written late" in e.detail for e in record.history)
    wait_for(lambda: any("answers again" in w for w in warnings_of(caplog)), 10, "the recovery warning")
    assert len([w for w in warnings_of(caplog) if "answers again" in w]) == 1
    direct.clear()


def test_a_store_that_answers_slowly_within_the_timeout_is_used(relay, caplog):
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    # Ten times slower than this machine's Redis, still well inside the deadline (a loaded machine
    # must not turn "slow" into "hung" here).
    store, inner = store_at(relay.port, namespace, timeout_s=1.0)
    relay.delay_s = 0.05
    caplog.set_level(logging.WARNING)
    task_id = str(uuid.uuid4())
    a_task_lifecycle(store, task_id)
    assert store.flush() is True
    assert store.get(task_id).status == TaskState.SUCCEEDED and store.queued == 0
    assert warnings_of(caplog) == [] and not store.breaker.is_open
    RedisStore(f"redis://{REDIS[0]}:{REDIS[1]}/0", namespace, ttl_s=600).clear()


def test_a_full_backlog_marks_the_record_incomplete(relay, monkeypatch):
    monkeypatch.setattr(guarded, "BACKLOG", 3)
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    store, _ = store_at(relay.port, namespace)
    direct = RedisStore(f"redis://{REDIS[0]}:{REDIS[1]}/0", namespace, ttl_s=600)
    task_id = str(uuid.uuid4())
    assert store.get(task_id) is None
    relay.mode = "hang"
    for i in range(6):
        store.transition(task_id, TaskState.RUNNING, attempt=i + 1, detail=f"attempt {i + 1}")
    # The writes are queued at once; the writer thread's batch is what meets the hung store.
    wait_for(lambda: store.breaker.is_open, 10, "the writer thread to find the store hung")
    relay.mode = "pass"
    wait_for(lambda: (r := direct.get(task_id)) and any("were lost" in e.detail for e in r.history), 30,
             "the record to be marked incomplete")
    details = [e.detail for e in direct.get(task_id).history]
    assert [d.split(" (")[0] for d in details[:3]] == ["attempt 4", "attempt 5", "attempt 6"]
    direct.clear()


def test_the_breaker_opens_probes_once_and_closes(caplog):
    now = [0.0]
    breaker = breaker_module.Breaker("A service", 10, clock=lambda: now[0])
    caplog.set_level(logging.WARNING)
    assert breaker.allow()
    breaker.failed(OSError("down"))
    assert not breaker.allow()
    now[0] = 10.0
    assert breaker.allow() and not breaker.allow()  # one probe at a time
    breaker.failed(OSError("still down"))  # no second warning: same state
    now[0] = 20.0
    assert breaker.allow()
    breaker.succeeded()
    assert breaker.allow() and not breaker.is_open
    assert warnings_of(caplog) == ["A service did not answer (OSError: down); not calling it again for 10 s at a time until it does.",
                                   "A service answers again; calling it as before."]


class HungServer:
    """Accepts connections, counts them, and never answers."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.server.settimeout(0.1)
        while not self._stop.is_set():
            try:
                self.accepted.append(self.server.accept()[0])
            except OSError:
                continue

    def close(self) -> None:
        self._stop.set()
        for conn in self.accepted:
            conn.close()
        self.server.close()


@pytest.mark.broker
def test_a_hung_management_api_is_asked_once_then_skipped(broker_env, make_app, monkeypatch, caplog):
    from conveyor.amqp import queues

    hung = HungServer()
    try:
        monkeypatch.setenv(environment.MANAGEMENT_URL_ENV, f"http://127.0.0.1:{hung.port}")
        monkeypatch.setattr(queues, "_breakers", {})
        app = make_app()
        caplog.set_level(logging.INFO)
        first = queues.stats(app, ["queue_a"])
        assert first[0].messages_unacked is None and len(hung.accepted) == 1  # asked, and it timed out
        for _ in range(5):  # the breaker is open: the ready counts still come, nothing waits on the API
            assert queues.stats(app, ["queue_a"])[0].messages_ready is not None
        assert len(hung.accepted) == 1
        assert len([w for w in warnings_of(caplog) if "management API did not answer" in w]) == 1
    finally:
        hung.close()
