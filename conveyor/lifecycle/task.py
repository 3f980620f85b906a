"""The task base and worker request class that give tasks their lifecycle.

Escalating time limits: a retry after a timeout (SoftTimeLimitExceeded, which conveyor.tasks.retry
makes retryable, or TimeLimitExceeded: the worker killed the attempt at its hard limit, which
conveyor/tasks/lost.py retries from the worker's main process) is published with soft and hard limits
`timeout_retry_factor` times the ones the attempt had, through Task.retry's own
soft_time_limit/time_limit options, so the next attempt's message carries them. A task that times
out on every attempt is dead-lettered like any other that failed for good.

Durable revokes: Celery keeps revoked ids in each worker's memory (or a per-node --statedb file),
so a worker started after `revoke`, or on another host, would run the task. The record store is
shared and persistent, so the worker's request also asks it, once per task, just before handing the
task to the pool; a revoked task then takes Celery's own revoke path (REVOKED result, task-revoked
event, message acknowledged). `dlq requeue` undoes a revoke: it clears the record's revocation
and broadcasts `conveyor_unrevoke`, which takes the id out of each worker's in-memory set.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from celery.worker import state as worker_state
from celery.worker.control import control_command, ok
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
            if isinstance(exc, (SoftTimeLimitExceeded, TimeLimitExceeded)):
                soft, hard = (round(v * self.timeout_retry_factor, 3) if v else v for v in (soft, hard))
                options.setdefault("soft_time_limit", soft)
                options.setdefault("time_limit", hard)
                note = f"; the attempt timed out, so its retry gets limits {self.timeout_retry_factor:g}x longer"
            options["headers"] = {**signals.carried_headers(request, failed=True), **(options.get("headers") or {})}
            limit = self.max_retries if max_retries is None else max_retries
            if limit is None or (request.retries or 0) < limit:  # else Celery re-raises exc: no retry
                signals.record_retry(self, exc, eta or countdown, soft, hard, note)
        return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)


@control_command(args=[("task_ids", list)], signature="<task_id> [task_id ...]")
def conveyor_unrevoke(state: Any, task_ids: list[str], **_: Any) -> dict[str, str]:
    """Forget revokes of tasks that `dlq requeue` sends again (Celery keeps revoked ids for hours)."""
    for task_id in task_ids or ():
        worker_state.revoked.discard(task_id)
    return ok(f"forgot the revokes of {len(task_ids or ())} task(s)")
