"""The task base and worker request class that give tasks their lifecycle.

Escalating time limits: a retry after SoftTimeLimitExceeded (which conveyor.retry makes retryable)
is published with soft and hard limits `timeout_retry_factor` times the ones the attempt had,
through Task.retry's own soft_time_limit/time_limit options, so the next attempt's message carries
them. The hard limit is the backstop for a task that ignores the soft one: the worker kills the pool
process, Celery marks the task failed and acknowledges it (task_acks_on_timeout), and the record
says so. It is not retried, since a task that could not be interrupted is not one a longer limit cures.

Retry countdowns on classic queues wait in the broker, not in a worker: Celery would publish the
retry with an ETA, and the worker that receives it holds it unacknowledged until it is due (filling
its prefetch, and past RabbitMQ's consumer_timeout the channel is closed). Here a retry is published
instead to the delay queue of its retry level (conveyor/amqp/topology.py: `delay_queue`, a TTL of
that level's countdown cap, dead-lettering back to the work queue), with the jittered countdown as
its per-message expiration, and the worker acknowledges the original at once. docs/reliability.md
explains the choice. Quorum queues keep Celery's native delayed delivery, which already does this;
the embedded broker (no TTL, no dead-lettering) keeps Celery's ETA.

Durable revokes: Celery keeps revoked ids in each worker's memory (or a per-node --statedb file),
so a worker started after `revoke`, or on another host, would run the task. The record store is
shared and persistent, so the worker's request also asks it, once per task, just before handing the
task to the pool; a revoked task then takes Celery's own revoke path (REVOKED result, task-revoked
event, message acknowledged).
"""

from __future__ import annotations

import logging
import math
from datetime import datetime
from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.utils.time import get_exponential_backoff_interval
from celery.worker import state as worker_state
from celery.worker.request import Request

from conveyor.amqp.topology import delay_queue
from conveyor.lifecycle import records, signals

log = logging.getLogger(__name__)

DELAY_OPTION = "conveyor_delay"  # from retry() to signature_from_request(); never reaches a message


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
