"""Attempts the pool loses: killed at the hard time limit, or a pool process that died mid-task.

Celery ends both in the worker's main process, and not the way a task that raised ends: a hard
timeout is stored FAILURE and acknowledged (task_acks_on_timeout), a lost process is requeued as it
is, for ever (task_reject_on_worker_lost) or, with task_retry_on_worker_lost, retried after
default_retry_delay and past max_retries acknowledged as a bare failure. Here both end like an
attempt that raised a retryable error:

- retries left: retried through Task.retry, with the retry policy's own countdown and, after a
  timeout, limits `timeout_retry_factor` times longer (LifecycleTask.retry), the record RETRYING;
- none left: dead-lettered with its reason (deadletter.publish), DeadLettered stored as its result.

The original message is acknowledged only once that publish is confirmed. If it fails, the message
is rejected to the queue's dead-letter exchange (or, with the dead-letter queue full, requeued), so
it is never acknowledged away. A whole worker that dies is another matter: its unacknowledged
messages go back to the queue (acks_late), and the next delivery is the same attempt again.
"""

from __future__ import annotations

import logging
from typing import Any

from billiard.einfo import ExceptionWithTraceback
from billiard.exceptions import WorkerLostError
from celery.app.task import Context
from celery.exceptions import TimeLimitExceeded
from celery.signals import task_retry
from celery.utils.saferepr import saferepr
from celery.worker import state as worker_state

from conveyor.lifecycle import signals as record_signals
from conveyor.lifecycle.task import LifecycleRequest
from conveyor.tasks import deadletter, retry
from conveyor.tasks.simulated import KEPT_DETAIL

log = logging.getLogger(__name__)


class DeadLetteringRequest(LifecycleRequest):
    """The worker's request for dead-lettering tasks: the lost attempts above end once, here."""

    _attempt_ended = False

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> None:
        exc = exc_info.exception
        if isinstance(exc, ExceptionWithTraceback):
            exc = exc.exc
        if isinstance(exc, (SystemExit, KeyboardInterrupt)) and not (self._already_cancelled or self._already_revoked):
            exc_info = self._worker_lost_info(exc)  # as Celery does: the pool process is gone
            exc = exc_info.exception.exc if isinstance(exc_info.exception, ExceptionWithTraceback) else exc_info.exception
        if self._ours(exc) and not (isinstance(exc, WorkerLostError) and self._success_was_stored()):
            worker_state.task_ready(self)
            self._end(exc, exc_info.traceback)
            return
        super().on_failure(exc_info, send_failed_event, return_ok)

    def on_timeout(self, soft: bool, timeout: float) -> None:
        # The pool reports a hard timeout twice: as the job's failure (on_failure, above), then here.
        if soft or not self._ours(TimeLimitExceeded(timeout)):
            super().on_timeout(soft, timeout)
            return
        worker_state.task_ready(self)
        self._end(TimeLimitExceeded(timeout), None)

    def _ours(self, exc: BaseException) -> bool:
        # During a cold shutdown Celery's own handling stands: the broker gets the message back.
        return (isinstance(exc, (TimeLimitExceeded, WorkerLostError)) and self.task.acks_late
                and not worker_state.should_terminate)

    def _end(self, exc: BaseException, traceback: str | None) -> None:
        if self._attempt_ended:
            return
        self._attempt_ended = True
        log.error("Task %s[%s] was lost on attempt %d: %s.", self.name, self.id, (self._context.retries or 0) + 1,
                  deadletter.describe(exc) if isinstance(exc, TimeLimitExceeded) else exc)
        task = self.task
        # The request as the pool process would have seen it, for Task.retry and the dead-letter publish.
        context = Context(vars(self._context), args=self.args, kwargs=self.kwargs, called_directly=False)
        task.request_stack.push(context)
        try:
            if task.max_retries is None or (context.retries or 0) < task.max_retries:
                self._retry(context, exc, traceback)
            else:
                self._dead_letter(context, exc)
        finally:
            task.request_stack.pop()

    def _retry(self, context: Context, exc: BaseException, traceback: str | None) -> None:
        task = self.task
        countdown = retry.countdown_s(task, context.retries or 0)
        try:
            reason = task.retry(exc=exc, countdown=countdown, throw=False)
        except Exception as publish_error:  # noqa: BLE001  (whatever failed, the message must not be acked)
            self._keep(exc, publish_error)
            return
        if self.store_errors:
            task.backend.mark_as_retry(self.id, exc, traceback, request=context)
        self.acknowledge()
        self.send_event("task-retried", exception=saferepr(exc), traceback=traceback or "")
        task_retry.send(sender=task, request=context, reason=reason, einfo=None)

    def _dead_letter(self, context: Context, exc: BaseException) -> None:
        task = self.task
        try:
            headers = deadletter.publish(task, exc)
        except Exception as publish_error:  # noqa: BLE001
            self._keep(exc, publish_error)
            return
        result = deadletter.DeadLettered(headers["x-exception"], headers["x-attempts"], headers["x-original-queue"])
        task.backend.mark_as_failure(self.id, result, request=context, store_result=self.store_errors)
        self.send_event("task-failed", exception=saferepr(result), traceback="")
        self.acknowledge()

    def _keep(self, exc: BaseException, publish_error: BaseException) -> None:
        """The retry or dead letter was not published: give the message back to the broker."""
        full = deadletter.refused(publish_error)
        log.error("Could not publish the %s of task %s[%s] (%s: %s); %s.", "dead letter" if full else "retry or dead letter",
                  self.name, self.id, type(publish_error).__name__, publish_error,
                  "the dead-letter queue is full, so the message goes back to its queue" if full
                  else "rejecting the message to its queue's dead-letter exchange")
        if full:
            record_signals.record_kept(self.task.app, self.id, KEPT_DETAIL)
        self.reject(requeue=full)
