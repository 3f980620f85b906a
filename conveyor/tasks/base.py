"""The task base class that gives every conveyor task its lifecycle.

Escalating time limits: a retry after a timeout (SoftTimeLimitExceeded, which conveyor.tasks.retry
makes retryable, or TimeLimitExceeded: the worker killed the attempt at its hard limit, which
conveyor/tasks/lost.py retries from the worker's main process) is published with soft and hard limits
`timeout_retry_factor` times the ones the attempt had, through Task.retry's own
soft_time_limit/time_limit options, so the next attempt's message carries them. A task that times
out on every attempt is dead-lettered like any other that failed for good. A retry carries our own
headers on (amqp/dead_letters.carried_headers: the unique key, where it was requeued from, when
it first failed), which Celery's rebuilt retry message would drop.

Retry countdowns on classic queues wait in the broker, not in a worker: Celery would publish the
retry with an ETA, and the worker that receives it holds it unacknowledged until it is due (filling
its prefetch, and past RabbitMQ's consumer_timeout the channel is closed). Here a retry is published
instead to the delay queue of its retry level (conveyor/amqp/topology.py: `delay_queue`, a TTL of
that level's countdown cap, dead-lettering back to the work queue), with the jittered countdown as
its per-message expiration, and the worker acknowledges the original at once. docs/reliability.md
explains the choice. Quorum queues keep Celery's native delayed delivery, which already does this;
the embedded broker (no TTL, no dead-lettering) keeps Celery's ETA.

Durable revokes: the worker's request class (conveyor.seam.request) asks the record store whether a
task was revoked before it runs; see there. A dead-lettering task's request class
(conveyor/tasks/lost.py) also ends the attempts the pool loses.

Retries are announced, before they are published, on the `retry_scheduled` signal (a Celery
signal): the task records (conveyor.lifecycle) receive it, so this layer knows nothing of them.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from celery.utils.dispatch import Signal
from celery.utils.time import get_exponential_backoff_interval

from conveyor.amqp.dead_letters import carried_headers
from conveyor.amqp.topology import delay_queue
from conveyor.seam.request import DurableRevokeRequest

DELAY_OPTION = "conveyor_delay"  # from retry() to signature_from_request(); never reaches a message

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
            if isinstance(exc, (SoftTimeLimitExceeded, TimeLimitExceeded)):
                soft, hard = (round(v * self.timeout_retry_factor, 3) if v else v for v in (soft, hard))
                options.setdefault("soft_time_limit", soft)
                options.setdefault("time_limit", hard)
                note = f"; the attempt timed out, so its retry gets limits {self.timeout_retry_factor:g}x longer"
            options["headers"] = {**carried_headers(request, failed=True), **(options.get("headers") or {})}
            limit = self.max_retries if max_retries is None else max_retries
            if limit is None or (request.retries or 0) < limit:  # else Celery re-raises exc: no retry
                retry_scheduled.send(sender=self, exc=exc, when=eta or countdown, soft=soft, hard=hard, note=note)
                options.update(self._broker_delay(eta, countdown))
        return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)

    def _broker_delay(self, eta: Any, countdown: float | None) -> dict[str, Any]:
        """The options that send this retry through its level's delay queue; none where Celery's own
        way stays (no delay, a quorum queue, a task with an expiry, a request not from a queue)."""
        request = self.request
        if not self._broker_holds_delays():
            return {}
        queue = (request.delivery_info or {}).get("routing_key")
        declared = self.app.amqp.queues.get(queue) if queue else None
        if declared is None or (declared.queue_arguments or {}).get("x-queue-type") == "quorum" or request.expires:
            return {}
        if eta is not None:
            countdown = ((eta if isinstance(eta, datetime) else datetime.fromisoformat(str(eta))) - self.app.now()).total_seconds()
        if not countdown or countdown <= 0:
            return {}
        # The level's cap, the countdown Celery's backoff gives before jitter: every retry of that
        # level expires no later than it, so the queue's head-only expiry never holds one longer.
        cap = get_exponential_backoff_interval(factor=self.retry_backoff or 0, retries=request.retries or 0,
                                               maximum=self.retry_backoff_max, full_jitter=False)
        ttl_s = max(cap, math.ceil(countdown))
        delayed = delay_queue(queue, ttl_s)
        return {DELAY_OPTION: {"queue": delayed, "declare": [delayed], "expiration": countdown}}

    def _broker_holds_delays(self) -> bool:
        """RabbitMQ does (TTL and dead-lettering); the embedded filesystem transport has neither."""
        holds = self.__dict__.get("_holds_delays")
        if holds is None:
            with self.app.connection_for_write() as conn:  # names the transport; connects to nothing
                holds = self.__dict__["_holds_delays"] = conn.transport.driver_type == "amqp"
        return holds

    def signature_from_request(self, request: Any = None, args: Any = None, kwargs: Any = None, queue: Any = None,
                               **extra: Any):
        # A retry through a delay queue: no ETA (the broker holds the delay), its own queue and expiration.
        delay = extra.pop(DELAY_OPTION, None)
        if delay is not None:
            extra.pop("countdown", None)
            extra.pop("eta", None)
            queue = delay.pop("queue")
            extra.update(delay)
        return super().signature_from_request(request, args, kwargs, queue, **extra)
