"""Writing the records: Celery's own signals, received where each transition happens.

    queued          before_task_publish, in whichever process publishes (dispatcher, `dlq requeue`)
    running         task_prerun, in the pool process about to run the task
    retrying        LifecycleTask.retry, in the pool process, *before* the retry is published
    succeeded       task_success, in the pool process
    failed          task_failure, in the pool process
    dead_lettered   before_task_publish of the dead-letter publish, before the message reaches the DLQ
                    (from the pool process, or the worker's main process for a hard timeout or a lost
                    process, conveyor/tasks/lost.py); task_failure of a Reject without requeue; or
                    dead_lettered() for a message the worker's consumer dead-letters unrun
    revoked         task_revoked, in the worker's main process; `tasks revoke` marks it first

Every transition is written before the message that could cause the next one exists, so a record
does not go backwards even when a retry starts at once on another worker. No process keeps records
in memory, so a restart of any of them loses nothing.
A store that does not answer costs a warning, never the task: records serve operators, not delivery.
"""

from __future__ import annotations

import functools
import logging
from collections import deque
from datetime import datetime, timezone
from typing import Any

from celery import Task, current_app
from celery.exceptions import Reject, SoftTimeLimitExceeded, TimeLimitExceeded
from celery.signals import before_task_publish, task_failure, task_prerun, task_revoked, task_success

from conveyor.errors import RecordStoreError
from conveyor.amqp.topology import DEAD_LETTER_QUEUE
from conveyor.lifecycle import records
from conveyor.lifecycle.records import DEAD_LETTERED, FAILED, QUEUED, RETRYING, REVOKED, RUNNING, SUCCEEDED, now

log = logging.getLogger(__name__)

_hard_timeouts: deque[str] = deque(maxlen=1000)  # in the worker's main process, where hard timeouts are handled

UNIQUE_HEADER = "x-unique-key"
REQUEUED_HEADER = "x-requeued-from"
FIRST_FAILED_HEADER = "x-first-failed-at"
# Headers of ours that a retry and a dead letter carry on: Celery rebuilds a retried message from
# the request, which keeps no custom header (Context.headers is empty in a worker).
CARRIED_HEADERS = (UNIQUE_HEADER, REQUEUED_HEADER, FIRST_FAILED_HEADER)


def carried_headers(request: Any, failed: bool = False) -> dict[str, Any]:
    """The CARRIED_HEADERS of a request (a message's headers are attributes of its Context); with
    `failed`, for the message that follows a failed attempt, the time of the first failure."""
    headers = {name: value for name in CARRIED_HEADERS if (value := getattr(request, name, None)) is not None}
    if failed:
        headers.setdefault(FIRST_FAILED_HEADER, datetime.now(timezone.utc).isoformat())
    return headers


def _best_effort(receiver):
    @functools.wraps(receiver)
    def run(*args: Any, **kwargs: Any) -> None:
        try:
            receiver(*args, **kwargs)
        except RecordStoreError as exc:
            log.warning("The task record was not updated: %s.", exc)

    return run


def effective_limits(task: Task) -> tuple[float | None, float | None]:
    """(soft, hard) seconds for the current request: its own, else the task type's."""
    hard, soft = task.request.timelimit or (None, None)
    return soft or task.soft_time_limit, hard or task.time_limit


def describe_limits(soft: float | None, hard: float | None) -> str:
    parts = [f"soft {soft:g} s" if soft else "", f"hard {hard:g} s" if hard else ""]
    return ", ".join(p for p in parts if p) or "none"


def describe_error(exc: BaseException | None, soft: float | None = None) -> str | None:
    if exc is None:
        return None
    if isinstance(exc, SoftTimeLimitExceeded):  # Celery's own message is empty
        return f"SoftTimeLimitExceeded: ran past its soft time limit{f' of {soft:g} s' if soft else ''}"
    if isinstance(exc, TimeLimitExceeded):
        limit = exc.args[0] if exc.args and isinstance(exc.args[0], (int, float)) else None
        return f"TimeLimitExceeded: ran past its hard time limit{f' of {limit:g} s' if limit else ''} and was killed"
    return f"{type(exc).__name__}: {exc}"


@_best_effort
def _published(sender: str | None = None, headers: dict | None = None, routing_key: str | None = None,
               **_: Any) -> None:
    headers = headers or {}
    store = records.store_for(current_app)
    if store is None or "id" not in headers:
        return
    task_id = headers["id"]
    if routing_key == DEAD_LETTER_QUEUE:
        attempts = headers.get("x-attempts")
        detail = f"dead-lettered after {attempts} attempt(s)" if attempts else "dead-lettered without running"
        store.transition(task_id, DEAD_LETTERED, attempt=attempts, detail=detail,
                         error=headers.get("x-exception"), finished_at=now(), worker=headers.get("x-worker") or None)
        return
    if headers.get("retries"):
        return  # a retry: LifecycleTask.retry recorded it before publishing
    hard, soft = headers.get("timelimit") or (None, None)
    limits = current_app.conveyor_config.time_limits.get(sender or headers.get("task"))
    soft, hard = soft or (limits and limits.soft_s), hard or (limits and limits.hard_s)
    requeued = headers.get(REQUEUED_HEADER)
    detail = f"requeued from {requeued}" if requeued else f"sent to {routing_key}"
    store.transition(task_id, QUEUED, detail=f"{detail}; time limits: {describe_limits(soft, hard)}",
                     name=sender or headers.get("task"), queue=routing_key, sent_at=now(),
                     unique_key=headers.get(UNIQUE_HEADER), soft_time_limit_s=soft or None, time_limit_s=hard or None,
                     started_at=None, finished_at=None, error=None)


def dead_lettered(headers: dict[str, Any]) -> None:
    """Record a dead letter published without Celery's before_task_publish: the worker's consumer
    copies a message it cannot run to the dead-letter queue itself (conveyor/seam/consumer.py)."""
    _published(headers=headers, routing_key=DEAD_LETTER_QUEUE)


@_best_effort
def _started(sender: Task | None = None, task_id: str | None = None, **_: Any) -> None:
    store = records.store_for(sender.app)
    if store is None or sender.request.called_directly:
        return
    request = sender.request
    attempt = (request.retries or 0) + 1
    soft, hard = effective_limits(sender)
    store.transition(task_id, RUNNING, attempt=attempt, count_attempt=True,
                     detail=f"attempt {attempt} started; time limits: {describe_limits(soft, hard)}",
                     worker=request.hostname, started_at=now(), soft_time_limit_s=soft, time_limit_s=hard)


def record_retry(task: Task, exc: BaseException | None, when: Any, soft: float | None, hard: float | None,
                 note: str = "") -> None:
    """Called by LifecycleTask.retry just before it publishes the retry."""
    store = records.store_for(task.app)
    if store is None:
        return
    request = task.request
    error = describe_error(exc, effective_limits(task)[0])
    detail = f"attempt {(request.retries or 0) + 1} failed ({error}); retry in {when} s, time limits: {describe_limits(soft, hard)}"
    try:
        store.transition(request.id, RETRYING, attempt=(request.retries or 0) + 1, detail=detail + note,
                         error=error, worker=request.hostname, soft_time_limit_s=soft, time_limit_s=hard)
    except Exception as exc:  # noqa: BLE001  (called from Task.retry: the retry must go out regardless)
        log.warning("The task record was not updated: %s.", exc)


@_best_effort
def record_kept(app: Any, task_id: str, detail: str) -> None:
    """The dead-letter queue refused a task (full): its record, written dead_lettered just before
    the publish, says instead that it stays in its queue to be tried again."""
    store = records.store_for(app)
    if store is not None:
        store.transition(task_id, RETRYING, detail=detail, finished_at=None)


@_best_effort
def _succeeded(sender: Task | None = None, **_: Any) -> None:
    store = records.store_for(sender.app)
    if store is None or sender.request.called_directly:
        return
    attempt = (sender.request.retries or 0) + 1
    store.transition(sender.request.id, SUCCEEDED, attempt=attempt, detail=f"succeeded on attempt {attempt}",
                     worker=sender.request.hostname, finished_at=now(), error=None)


@_best_effort
def _failed(sender: Task | None = None, task_id: str | None = None, exception: BaseException | None = None,
            **_: Any) -> None:
    from conveyor.tasks.deadletter import DeadLettered  # conveyor.tasks imports this package

    store = records.store_for(sender.app)
    if store is None or isinstance(exception, DeadLettered):
        return  # dead-lettered: recorded when it was published to the dead-letter queue
    if isinstance(exception, Reject):  # Celery sends task_failure only for a reject without requeue
        store.transition(task_id, DEAD_LETTERED, detail=f"rejected to the dead-letter exchange: {exception.reason}",
                         error=describe_error(exception), finished_at=now())
        return
    if isinstance(exception, TimeLimitExceeded):
        # Celery sends task_failure twice for a hard timeout (from Request.on_timeout, and from
        # on_failure once the pool reports the killed process): record it once.
        if task_id in _hard_timeouts:
            return
        _hard_timeouts.append(task_id)
    error = describe_error(exception)
    store.transition(task_id, FAILED, detail=f"failed for good: {error}", error=error, finished_at=now())


@_best_effort
def _revoked(sender: Task | None = None, request: Any = None, terminated: bool = False, signum: Any = None,
             expired: bool = False, **_: Any) -> None:
    store = records.store_for(sender.app)
    if store is None or request is None:
        return
    if terminated:
        detail = f"terminated while running (signal {signum})"
    elif expired:
        detail = "expired before it ran"
    else:
        detail = "discarded by the worker without running"
    store.transition(request.id, REVOKED, detail=detail, finished_at=now())


_RECEIVERS = ((before_task_publish, _published), (task_prerun, _started), (task_success, _succeeded),
              (task_failure, _failed), (task_revoked, _revoked))


def connect() -> None:
    """Receive the signals that write records, from now on, in this process (create_app calls it
    for an app with records on; again is harmless). A process whose apps all have records off
    connects nothing, so its publishes and tasks skip Celery's signal dispatch: that was 9 % of the
    load tester's send path with records off (docs/performance.md)."""
    for signal, receiver in _RECEIVERS:
        signal.connect(receiver, weak=False, dispatch_uid=f"conveyor.records.{receiver.__name__}")
