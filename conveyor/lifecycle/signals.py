"""Writing the records: Celery's own signals, received where each transition happens.

    queued          before_task_publish, in whichever process publishes (dispatcher, `dlq requeue`)
    running         task_prerun, in the pool process about to run the task
    retrying        retry_scheduled (conveyor.tasks.base), in the pool process, *before* the retry is published
    succeeded       task_success, in the pool process
    failed          task_failure, in the pool process
    dead_lettered   before_task_publish of the dead-letter publish, before the message reaches the DLQ
                    (from the pool process, or the worker's main process for a hard timeout or a lost
                    process, conveyor/tasks/lost.py); task_failure of a Reject without requeue; or
                    dead_lettered_unrun (conveyor.seam.consumer) for a message the worker's consumer
                    dead-letters unrun
    revoked         task_revoked, in the worker's main process; `tasks revoke` marks it first

The same receivers keep the task tallies (conveyor/lifecycle/tallies.py: sent, received by
task_received in the worker's consumer, started, succeeded, failed, retried, dead-lettered, and the
wait, latency and runtime histograms) in the same batches.

Writes are batched (lifecycle/guarded.py): queued in the process and written a few milliseconds
later, off the task's path. Where the next transition could come from another process, the batch is
written first: before a task's message reaches the broker (the Publisher's writing_messages signal,
or at once for a publish outside a Publisher), before a retry is published, before a dead letter is.
So a record does not go backwards even when a retry starts at once on another worker. A store that
does not answer costs a warning, never the task: records serve operators, not delivery.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import deque
from typing import Any

from celery import Celery, Task, current_app
from celery.exceptions import Reject, TimeLimitExceeded
from celery.signals import (before_task_publish, task_failure, task_prerun, task_received, task_revoked, task_success,
                            worker_process_shutdown, worker_shutdown)

from conveyor.errors import RecordStoreError
from conveyor.amqp.dead_letters import REQUEUED_HEADER, SENT_AT_HEADER, UNIQUE_HEADER
from conveyor.amqp.topology import DEAD_LETTER_QUEUE
from conveyor.lifecycle import guarded, stores, tallies
from conveyor.seam import publisher
from conveyor.lifecycle.records import now
from conveyor.tasks.states import TaskState
from conveyor.settings.context import settings_of
from conveyor.seam.request import revoke_lookup
from conveyor.tasks.base import effective_limits, retry_scheduled
from conveyor.seam.consumer import dead_lettered_unrun
from conveyor.tasks.deadletter import DeadLettered, dead_letter_refused, describe_error

log = logging.getLogger(__name__)

_hard_timeouts: deque[str] = deque(maxlen=1000)  # in the worker's main process, where hard timeouts are handled
_run_started: dict[str, float] = {}  # task id -> monotonic start of its attempt in this pool process, for runtime

def _best_effort(receiver):
    @functools.wraps(receiver)
    def run(*args: Any, **kwargs: Any) -> None:
        try:
            receiver(*args, **kwargs)
        except RecordStoreError as exc:
            log.warning("The task record was not updated: %s.", exc)

    return run


def describe_limits(soft: float | None, hard: float | None) -> str:
    parts = [f"soft {soft:g} s" if soft else "", f"hard {hard:g} s" if hard else ""]
    return ", ".join(p for p in parts if p) or "none"


@_best_effort
def _published(sender: str | None = None, headers: dict | None = None, routing_key: str | None = None,
               **_: Any) -> None:
    headers = headers or {}
    store = stores.store_for(current_app)
    if store is None or "id" not in headers:
        return
    task_id, name = headers["id"], sender or headers.get("task") or ""
    if routing_key == DEAD_LETTER_QUEUE:
        attempts = headers.get("x-attempts")
        detail = f"dead-lettered after {attempts} attempt(s)" if attempts else "dead-lettered without running"
        store.transition(task_id, TaskState.DEAD_LETTERED, attempt=attempts, detail=detail,
                         error=headers.get("x-exception"), finished_at=now(), worker=headers.get("x-worker") or None)
        tallies.count(store, "dead_lettered", name, tallies.host_of(headers.get("x-worker")),
                      headers.get("x-original-queue") or _queue_of(current_app, name))
        store.flush()  # before the dead letter exists: `dlq requeue` may act on it at once
        return
    if headers.get("retries"):
        return  # a retry: record_retry recorded it before publishing
    headers.setdefault(SENT_AT_HEADER, now())  # a retry and a dead letter carry it on, for wait and latency
    hard, soft = headers.get("timelimit") or (None, None)
    limits = settings_of(current_app).config.time_limits.get(sender or headers.get("task"))
    soft, hard = soft or (limits and limits.soft_s), hard or (limits and limits.hard_s)
    requeued = headers.get(REQUEUED_HEADER)
    detail = f"requeued from {requeued}" if requeued else f"sent to {routing_key}"
    store.transition(task_id, TaskState.QUEUED, detail=f"{detail}; time limits: {describe_limits(soft, hard)}",
                     name=sender or headers.get("task"), queue=routing_key, sent_at=now(),
                     unique_key=headers.get(UNIQUE_HEADER), soft_time_limit_s=soft or None, time_limit_s=hard or None,
                     started_at=None, finished_at=None, error=None)
    tallies.count(store, "sent", name, tallies.host_of(None), routing_key or _queue_of(current_app, name))
    if not publisher.deferring():
        store.flush()  # a Publisher sends writing_messages before its messages go out: flushed there


def _writing_messages(sender: Any = None, **_: Any) -> None:
    """The Publisher's messages are about to reach the broker: their records first."""
    store = stores.store_for(sender.app)
    if store is not None:
        store.flush()


def _flush_on_exit(**_: Any) -> None:
    guarded.flush_all()


def _queue_of(app: Celery, name: str) -> str:
    """A task type's queue: routing is static per type (the config's task_types)."""
    kind = settings_of(app).config.types.get(name)
    return kind.queue if kind else ""


def _labels(task: Task) -> tuple[str, str, str]:
    request = task.request
    return task.name, tallies.host_of(request.hostname), _queue_of(task.app, task.name)


def _sent_at(request: Any) -> float | None:
    value = getattr(request, SENT_AT_HEADER, None)
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


@_best_effort
def _received(sender: Any = None, request: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None) or current_app
    store = stores.store_for(app)
    if store is None or request is None:
        return
    tallies.count(store, "received", request.name, tallies.host_of(request.hostname), _queue_of(app, request.name))


def dead_lettered(sender: Any = None, headers: dict[str, Any] | None = None, **_: Any) -> None:
    """Received on dead_lettered_unrun: record a dead letter published without Celery's
    before_task_publish, a message the worker's consumer could not run (conveyor/seam/consumer.py)."""
    _published(headers=headers, routing_key=DEAD_LETTER_QUEUE)


@_best_effort
def _started(sender: Task | None = None, task_id: str | None = None, **_: Any) -> None:
    store = stores.store_for(sender.app)
    if store is None or sender.request.called_directly:
        return
    request = sender.request
    attempt = (request.retries or 0) + 1
    soft, hard = effective_limits(sender)
    started_at = now()
    store.transition(task_id, TaskState.RUNNING, attempt=attempt, count_attempt=True,
                     detail=f"attempt {attempt} started; time limits: {describe_limits(soft, hard)}",
                     worker=request.hostname, started_at=started_at, soft_time_limit_s=soft, time_limit_s=hard)
    _run_started[task_id] = time.monotonic()
    name, host, queue = _labels(sender)
    batch = tallies.Batch().count("started", name, host, queue)
    if attempt == 1:
        batch.count("started_first", name, host, queue)
        sent_at = _sent_at(request)
        if sent_at is not None:
            batch.observe("wait", name, "", queue, max(0.0, started_at - sent_at))
    batch.add_to(store)


def record_retry(sender: Task | None = None, exc: BaseException | None = None, when: Any = None,
                 soft: float | None = None, hard: float | None = None, note: str = "", **_: Any) -> None:
    """Received from LifecycleTask.retry (retry_scheduled) just before it publishes the retry."""
    task = sender
    store = stores.store_for(task.app)
    if store is None:
        return
    request = task.request
    error = describe_error(exc, effective_limits(task)[0])
    detail = f"attempt {(request.retries or 0) + 1} failed ({error}); retry in {when} s, time limits: {describe_limits(soft, hard)}"
    try:
        store.transition(request.id, TaskState.RETRYING, attempt=(request.retries or 0) + 1, detail=detail + note,
                         error=error, worker=request.hostname, soft_time_limit_s=soft, time_limit_s=hard)
        tallies.count(store, "retried", *_labels(task))
        _run_started.pop(request.id, None)
        store.flush()  # before the retry exists: it may start at once on another worker
    except Exception as exc:  # noqa: BLE001  (called from Task.retry: the retry must go out regardless)
        log.warning("The task record was not updated: %s.", exc)


@_best_effort
def record_kept(sender: Any = None, task_id: str | None = None, detail: str = "", name: str = "",
                hostname: str | None = None, **_: Any) -> None:
    """Received on dead_letter_refused: the dead-letter queue refused a task (full), so its record,
    written dead_lettered just before the publish, says instead that it stays in its queue to be tried again."""
    store = stores.store_for(sender)
    if store is not None:
        store.transition(task_id, TaskState.RETRYING, detail=detail, finished_at=None)
        # Counted at the publish the queue refused: taken back.
        tallies.count(store, "dead_lettered", name, tallies.host_of(hostname), _queue_of(sender, name), by=-1)


@_best_effort
def _succeeded(sender: Task | None = None, **_: Any) -> None:
    store = stores.store_for(sender.app)
    if store is None or sender.request.called_directly:
        return
    attempt = (sender.request.retries or 0) + 1
    finished_at = now()
    store.transition(sender.request.id, TaskState.SUCCEEDED, attempt=attempt, detail=f"succeeded on attempt {attempt}",
                     worker=sender.request.hostname, finished_at=finished_at, error=None)
    name, host, queue = _labels(sender)
    batch = tallies.Batch().count("succeeded", name, host, queue)
    started = _run_started.pop(sender.request.id, None)
    if started is not None:
        batch.observe("runtime", name, host, queue, time.monotonic() - started)
    sent_at = _sent_at(sender.request)
    if sent_at is not None:
        batch.observe("latency", name, "", queue, max(0.0, finished_at - sent_at))
    batch.add_to(store)


@_best_effort
def _failed(sender: Task | None = None, task_id: str | None = None, exception: BaseException | None = None,
            **_: Any) -> None:
    store = stores.store_for(sender.app)
    if store is None:
        return
    if isinstance(exception, TimeLimitExceeded):
        # Celery sends task_failure twice for a hard timeout (from Request.on_timeout, and from
        # on_failure once the pool reports the killed process): record it once.
        if task_id in _hard_timeouts:
            return
        _hard_timeouts.append(task_id)
    name, host, queue = _labels(sender)
    _run_started.pop(task_id, None)
    tallies.count(store, "failed", name, host, queue, exception=type(exception).__name__ if exception else "UnknownException")
    if isinstance(exception, DeadLettered):
        return  # dead-lettered: recorded when it was published to the dead-letter queue
    if isinstance(exception, Reject):  # Celery sends task_failure only for a reject without requeue
        store.transition(task_id, TaskState.DEAD_LETTERED, detail=f"rejected to the dead-letter exchange: {exception.reason}",
                         error=describe_error(exception), finished_at=now())
        tallies.Batch().count("rejected", name, host, queue).count("dead_lettered", name, host, queue).add_to(store)
        return
    error = describe_error(exception)
    store.transition(task_id, TaskState.FAILED, detail=f"failed for good: {error}", error=error, finished_at=now())


@_best_effort
def _revoked(sender: Task | None = None, request: Any = None, terminated: bool = False, signum: Any = None,
             expired: bool = False, **_: Any) -> None:
    store = stores.store_for(sender.app)
    if store is None or request is None:
        return
    if terminated:
        detail = f"terminated while running (signal {signum})"
    elif expired:
        detail = "expired before it ran"
    else:
        detail = "discarded by the worker without running"
    store.transition(request.id, TaskState.REVOKED, detail=detail, finished_at=now())
    name = getattr(request, "name", None) or getattr(sender, "name", "") or ""
    tallies.count(store, "revoked", name, tallies.host_of(getattr(request, "hostname", None)), _queue_of(sender.app, name))


def _revoked_in_store(sender: Task | None = None, task_id: str | None = None, **_: Any) -> bool:
    """Asked by the worker's request (conveyor.seam.request) before a task runs: was it revoked?"""
    try:
        store = stores.store_for(sender.app)
        return store is not None and store.is_revoked(task_id)
    except Exception as exc:  # noqa: BLE001  (runs in the worker's consumer: fail open, the task runs)
        log.warning("Could not check whether task %s was revoked, so it runs: %s.", task_id, exc)
        return False


_RECEIVERS = ((before_task_publish, _published), (task_prerun, _started), (task_success, _succeeded),
              (task_failure, _failed), (task_revoked, _revoked), (retry_scheduled, record_retry),
              (revoke_lookup, _revoked_in_store), (dead_letter_refused, record_kept),
              (dead_lettered_unrun, dead_lettered), (task_received, _received),
              (publisher.writing_messages, _writing_messages), (worker_process_shutdown, _flush_on_exit),
              (worker_shutdown, _flush_on_exit))


def connect() -> None:
    """Receive the signals that write records, from now on, in this process (create_app calls it
    for an app with records on; again is harmless). A process whose apps all have records off
    connects nothing, so its publishes and tasks skip Celery's signal dispatch: that was 9 % of the
    load tester's send path with records off (docs/performance.md)."""
    for signal, receiver in _RECEIVERS:
        signal.connect(receiver, weak=False, dispatch_uid=f"conveyor.records.{receiver.__name__}")
