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
is rejected to the queue's dead-letter exchange (or, with the dead-letter queue full or gone,
requeued), so it is never acknowledged away. A whole worker that dies is another matter: its unacknowledged
messages go back to the queue (acks_late), and the next delivery is the same attempt again.
"""

from __future__ import annotations

import logging

from celery.app.task import Context
from celery.exceptions import TimeLimitExceeded
from celery.signals import task_retry
from celery.utils.saferepr import saferepr

from conveyor.amqp import dead_letters
from conveyor.seam.lost_attempts import LostAttemptRequest
from conveyor.seam.request import DurableRevokeRequest
from conveyor.tasks import deadletter, retry

log = logging.getLogger(__name__)


class DeadLetteringRequest(LostAttemptRequest, DurableRevokeRequest):
    """The worker's request for dead-lettering tasks: conveyor/seam/lost_attempts.py finds the lost
    attempts, once each; here they end as described above."""

    def end_lost_attempt(self, exc: BaseException, context: Context, traceback: str | None) -> None:
        log.error("Task %s[%s] was lost on attempt %d: %s.", self.name, self.id, (context.retries or 0) + 1,
                  deadletter.describe(exc) if isinstance(exc, TimeLimitExceeded) else exc)
        task = self.task
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
        """The retry or dead letter was not published: give the message back to the broker. Rejected
        to the queue's dead-letter exchange, but requeued where that would drop it too (the
        dead-letter queue full, or gone even after declaring it again)."""
        full = deadletter.refused(publish_error)
        unrouted = isinstance(publish_error, dead_letters.UNROUTED)
        log.error("Could not publish the %s of task %s[%s] (%s: %s); %s.", "dead letter" if full else "retry or dead letter",
                  self.name, self.id, type(publish_error).__name__, publish_error,
                  "the dead-letter queue is full, so the message goes back to its queue" if full
                  else "the dead-letter queue cannot be reached, so the message goes back to its queue" if unrouted
                  else "rejecting the message to its queue's dead-letter exchange")
        if full:
            deadletter.dead_letter_refused.send(sender=self.task.app, task_id=self.id, detail=deadletter.KEPT_DETAIL,
                                                name=self.name, hostname=self.hostname)
        self.reject(requeue=full or unrouted)
