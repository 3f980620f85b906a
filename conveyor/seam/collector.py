"""The one result collector, for dispatch.py and the load tester: each task's final state, handed to a
callback as (task id, status, value), with a deadline on every wait.

Three ways, by result backend (`collector_for` picks one):

- rpc:// (`ReplyQueue`): the caller reads its reply queue itself. Celery's own result consumer
  (`AsyncResult.then`) runs a promise chain, a state-change handler and a `sleep(0)` per message:
  profiled, that was a third of the caller's CPU at saturation, and the caller shares the machine's
  cores with the workers and the broker. Every result of ours comes to that queue (the rpc backend
  sends each one to the `reply_to` of its task message, chained stages included), so nothing needs
  registering per task.
- redis:// (`Pushed`): Celery's result consumer, through `AsyncResult.then`; also rpc:// with
  `tuning.fast_paths: false`.
- anything else, e.g. the embedded file backend (`Polled`): the state of each pending task is read
  in turn.

Values are as the backend stores them: a failure's value is its exception in serialized form
(`exc_type`, `exc_message`) for `ReplyQueue`, an exception instance for the others;
`conveyor.dispatch.dispatcher.fill_outcome` reads both.

Uses of Celery/kombu internals (checked against celery 5.7.0, kombu 5.7.0): `ReplyQueue` consumes
the rpc backend's own reply queue (`RPCBackend.binding`) with a kombu Consumer of its own, in place
of Celery's result consumer (`AsyncResult.then`, `ResultSet.iter_native`), and reads the result
meta as the backend publishes it (`status`, `result`, `task_id`). `Pushed` drives
`app.backend.result_consumer.drain_events` with a timeout.
"""

from __future__ import annotations

import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from celery import Celery, states
from celery.backends.asynchronous import AsyncBackendMixin
from celery.backends.rpc import RPCBackend
from celery.result import AsyncResult
from kombu import Consumer

from conveyor.seam import producer

# (task id, status, result, the result's whole metadata: worker, retries, runtime_s of a user task)
OnResult = Callable[[str, str, Any, dict[str, Any]], None]

IDLE_WAIT_S = 0.05  # the longest sleep between two polls of a polled backend
MAX_DRAIN = 2000  # result messages taken in one wait at most, so that sending goes on under a flood


class ReplyQueue:
    """Results read straight off the caller's rpc:// reply queue."""

    def __init__(self, app: Celery, on_result: OnResult, connection: Any) -> None:
        # On the publisher's connection: while the publisher waits for its confirms, results are
        # taken too (one socket serves both), and waiting for results takes in confirms.
        self._on_result = on_result
        self.connection = connection
        self.channel = connection.channel()
        # The same queue, with the same arguments, as Celery's rpc backend declares and sends to.
        self.consumer = Consumer(self.channel, [app.backend.binding], callbacks=[self._on_message],
                                 no_ack=True, accept=["json"])
        self.consumer.consume()
        self.delivered = 0

    def watch(self, task_id: str) -> None:
        """Nothing to do: every result of ours comes to the reply queue."""

    def _on_message(self, body: dict[str, Any], _message: Any) -> None:
        status = body.get("status")
        if status in states.READY_STATES:  # STARTED and RETRY states are not what we wait for
            self.delivered += 1
            self._on_result(body.get("task_id"), status, body.get("result"), body)

    def wait(self, timeout_s: float) -> None:
        """Deliver the results already here, or else wait up to timeout_s for the next ones."""
        deadline = time.monotonic() + timeout_s
        before = self.delivered
        for _ in range(MAX_DRAIN):
            # Block until the first result; after it, take only what is already there. Each call
            # handles one message, and a loop turn per message would fall behind the results.
            left = deadline - time.monotonic()
            try:
                self.connection.drain_events(timeout=0.001 if self.delivered != before or left <= 0 else left)
            except socket.timeout:
                return

    def close(self) -> None:
        try:
            self.channel.close()
        except Exception:  # noqa: BLE001  (a connection that broke has nothing left to close)
            pass


class Pushed:
    """Results pushed by an async backend (redis://), through Celery's own result consumer."""

    def __init__(self, app: Celery, on_result: OnResult) -> None:
        self.app, self._on_result = app, on_result
        self.delivered = 0

    def watch(self, task_id: str) -> None:
        self.app.AsyncResult(task_id).then(self._deliver)

    def _deliver(self, result: AsyncResult) -> None:
        self.delivered += 1
        self._on_result(result.id, result.state, result.result, result._get_task_meta())

    def wait(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        before = self.delivered
        consumer = self.app.backend.result_consumer
        for _ in range(MAX_DRAIN):
            got = self.delivered != before
            left = deadline - time.monotonic()
            seen = self.delivered
            try:
                consumer.drain_events(timeout=0.001 if got or left <= 0 else left)
            except socket.timeout:  # the rpc:// consumer raises, where the redis one returns
                return
            if self.delivered == seen and (got or left <= 0):
                return  # the redis consumer returns, rather than raise, when nothing came

    def close(self) -> None:
        pass


class Polled:
    """Results of a backend that pushes nothing (the embedded file backend): states read in turn."""

    def __init__(self, app: Celery, on_result: OnResult) -> None:
        self.app, self._on_result = app, on_result
        self._pending: deque[AsyncResult] = deque()

    def watch(self, task_id: str) -> None:
        self._pending.append(self.app.AsyncResult(task_id))

    def wait(self, timeout_s: float, limit: int = 500) -> None:
        delivered = 0
        for _ in range(min(limit, len(self._pending))):
            result = self._pending.popleft()
            if result.state in states.READY_STATES:
                delivered += 1
                self._on_result(result.id, result.state, result.result, result._get_task_meta())
            else:
                self._pending.append(result)
        if not delivered:
            time.sleep(min(max(0.0, timeout_s), IDLE_WAIT_S))

    def close(self) -> None:
        pass


Collector = ReplyQueue | Pushed | Polled


def collector_for(app: Celery, on_result: OnResult, connection: Any) -> Collector:
    """The way to collect `app`'s results; `connection` is the publisher's (rpc:// shares it)."""
    fast = producer.fast_paths(app)
    if fast and isinstance(app.backend, RPCBackend) and connection.transport.driver_type == "amqp":
        return ReplyQueue(app, on_result, connection)
    if isinstance(app.backend, AsyncBackendMixin):
        return Pushed(app, on_result)
    return Polled(app, on_result)
