"""The task base and worker request class that give tasks their lifecycle.

Escalating time limits: a retry after SoftTimeLimitExceeded (which conveyor.retry makes retryable)
is published with soft and hard limits `timeout_retry_factor` times the ones the attempt had,
through Task.retry's own soft_time_limit/time_limit options, so the next attempt's message carries
them. The hard limit is the backstop for a task that ignores the soft one: the worker kills the pool
process, Celery marks the task failed and acknowledges it (task_acks_on_timeout), and the record
says so. It is not retried, since a task that could not be interrupted is not one a longer limit cures.

Durable revokes: Celery keeps revoked ids in each worker's memory (or a per-node --statedb file),
so a worker started after `revoke`, or on another host, would run the task. The record store is
shared and persistent, so the worker's request also asks it, once per task, just before handing the
task to the pool; a revoked task then takes Celery's own revoke path (REVOKED result, task-revoked
event, message acknowledged).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.worker import state as worker_state
from celery.worker.request import Request

from conveyor.lifecycle import records, signals

log = logging.getLogger(__name__)


class LifecycleRequest(Request):
    def revoked(self) -> bool:
        if super().revoked():
            return True
        try:
            store = records.store_for(self.task.app)
            if store is None or not store.is_revoked(self.id):
                return False
        except Exception as exc:  # noqa: BLE001  (this runs in the worker's consumer: nothing may escape)
            # Fail open: a revoke is rare, and a store outage must not stop every task.
            log.warning("Could not check whether task %s was revoked, so it runs: %s.", self.id, exc)
            return False
        # The same set `celery control revoke` fills; Celery then discards the task as revoked.
        worker_state.revoked.add(self.id)
        return super().revoked()


class LifecycleTask(Task):
    abstract = True
    Request = f"{LifecycleRequest.__module__}:{LifecycleRequest.__qualname__}"
    timeout_retry_factor: float = 1.5

    def retry(self, args: Any = None, kwargs: Any = None, exc: BaseException | None = None, throw: bool = True,
              eta: Any = None, countdown: float | None = None, max_retries: int | None = None, **options: Any):
        request = self.request
        if not request.called_directly:
            soft, hard = signals.effective_limits(self)
            note = ""
            if isinstance(exc, SoftTimeLimitExceeded):
                soft, hard = (round(v * self.timeout_retry_factor, 3) if v else v for v in (soft, hard))
                options.setdefault("soft_time_limit", soft)
                options.setdefault("time_limit", hard)
                note = f"; the attempt timed out, so its retry gets limits {self.timeout_retry_factor:g}x longer"
            limit = self.max_retries if max_retries is None else max_retries
            if limit is None or (request.retries or 0) < limit:  # else Celery re-raises exc: no retry
                signals.record_retry(self, exc, eta or countdown, soft, hard, note)
        return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)
