"""The task base class that gives every conveyor task its lifecycle.

Escalating time limits: a retry after SoftTimeLimitExceeded (which conveyor.tasks.retry makes
retryable) is published with soft and hard limits `timeout_retry_factor` times the ones the attempt
had, through Task.retry's own soft_time_limit/time_limit options, so the next attempt's message
carries them.

Durable revokes: the worker's request class (conveyor.seam.request) asks the record store whether a
task was revoked before it runs; see there.

Retries are announced, before they are published, on the `retry_scheduled` signal (a Celery
signal): the task records (conveyor.lifecycle) receive it, so this layer knows nothing of them.
"""

from __future__ import annotations

from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.utils.dispatch import Signal

from conveyor.seam.request import DurableRevokeRequest

# sender: the task; exc, when (countdown or eta), soft, hard (the next attempt's limits), note.
retry_scheduled = Signal(name="conveyor_retry_scheduled", providing_args={"exc", "when", "soft", "hard", "note"})


def effective_limits(task: Task) -> tuple[float | None, float | None]:
    """(soft, hard) seconds for the current request: its own, else the task type's."""
    hard, soft = task.request.timelimit or (None, None)
    return soft or task.soft_time_limit, hard or task.time_limit


class LifecycleTask(Task):
    abstract = True
    Request = f"{DurableRevokeRequest.__module__}:{DurableRevokeRequest.__qualname__}"
    timeout_retry_factor: float = 1.5

    def retry(self, args: Any = None, kwargs: Any = None, exc: BaseException | None = None, throw: bool = True,
              eta: Any = None, countdown: float | None = None, max_retries: int | None = None, **options: Any):
        request = self.request
        if not request.called_directly:
            soft, hard = effective_limits(self)
            note = ""
            if isinstance(exc, SoftTimeLimitExceeded):
                soft, hard = (round(v * self.timeout_retry_factor, 3) if v else v for v in (soft, hard))
                options.setdefault("soft_time_limit", soft)
                options.setdefault("time_limit", hard)
                note = f"; the attempt timed out, so its retry gets limits {self.timeout_retry_factor:g}x longer"
            limit = self.max_retries if max_retries is None else max_retries
            if limit is None or (request.retries or 0) < limit:  # else Celery re-raises exc: no retry
                retry_scheduled.send(sender=self, exc=exc, when=eta or countdown, soft=soft, hard=hard, note=note)
        return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)
