"""Where Celery's worker ends an attempt its pool lost: a hard timeout, or a pool process that died.

Celery handles both in the worker's main process, in its Request: the pool reports a hard timeout
twice (the job's failure, `on_failure` with TimeLimitExceeded, then `on_timeout(soft=False)`), a lost
process once (`on_failure` with WorkerLostError, or with SystemExit/KeyboardInterrupt which billiard
reports first). It then stores FAILURE and acknowledges, or requeues the message as it is. This
request class catches the two, once per attempt, and hands them to `end_lost_attempt` instead,
with the request's Context; everything else (a cancellation, a revoke, a cold shutdown, a lost
process that had stored its success) stays Celery's. What ending the attempt means (retry,
dead-letter) is conveyor/tasks/lost.py's.

Seam notes:
- uses: `celery.worker.request.Request`: `on_failure`, `on_timeout`, `_context`, `_already_cancelled`,
  `_already_revoked`, `_worker_lost_info`, `_success_was_stored`; `celery.worker.state.task_ready`
  and `should_terminate`; billiard's `ExceptionWithTraceback` and `WorkerLostError`.
- replaces: Celery's ending of those attempts (`on_failure` for TimeLimitExceeded and WorkerLostError,
  `on_timeout` for the hard limit); nothing else.
- versions checked: celery 5.7.0, billiard 4.3.2.
"""

from __future__ import annotations

from typing import Any

from billiard.einfo import ExceptionWithTraceback
from billiard.exceptions import WorkerLostError
from celery.app.task import Context
from celery.exceptions import TimeLimitExceeded
from celery.worker import state as worker_state
from celery.worker.request import Request


class LostAttemptRequest(Request):
    _attempt_ended = False

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> None:
        exc = _unwrap(exc_info.exception)
        if isinstance(exc, (SystemExit, KeyboardInterrupt)) and not (self._already_cancelled or self._already_revoked):
            exc_info = self._worker_lost_info(exc)  # as Celery does: the pool process is gone
            exc = _unwrap(exc_info.exception)
        if self._ours(exc) and not (isinstance(exc, WorkerLostError) and self._success_was_stored()):
            self._end(exc, exc_info.traceback)
            return
        super().on_failure(exc_info, send_failed_event, return_ok)

    def on_timeout(self, soft: bool, timeout: float) -> None:
        if soft or not self._ours(TimeLimitExceeded(timeout)):
            super().on_timeout(soft, timeout)
            return
        self._end(TimeLimitExceeded(timeout), None)

    def _ours(self, exc: BaseException) -> bool:
        # During a cold shutdown Celery's own handling stands: the broker gets the message back.
        return (isinstance(exc, (TimeLimitExceeded, WorkerLostError)) and self.task.acks_late
                and not worker_state.should_terminate)

    def _end(self, exc: BaseException, traceback: str | None) -> None:
        worker_state.task_ready(self)
        if self._attempt_ended:  # the second report of the same hard timeout
            return
        self._attempt_ended = True
        # The request as the pool process would have seen it (Task.retry and publishes read it there).
        context = Context(vars(self._context), args=self.args, kwargs=self.kwargs, called_directly=False)
        self.end_lost_attempt(exc, context, traceback)

    def end_lost_attempt(self, exc: BaseException, context: Context, traceback: str | None) -> None:
        """End the attempt: acknowledge or reject the message, store the result. Subclasses decide how."""
        raise NotImplementedError


def _unwrap(exc: BaseException) -> BaseException:
    return exc.exc if isinstance(exc, ExceptionWithTraceback) else exc
