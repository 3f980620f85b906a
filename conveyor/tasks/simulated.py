"""task_a and task_b: simulated work whose failures are reproducible.

They are task types like any other: test-config.yml declares them in its task_types (callables
`conveyor.tasks.simulated:task_a` and `:task_b`), and conveyor/tasks/registry.py registers them.

Parameters (all optional): `duration_s` how long to work, `fail_first` fail the first K attempts,
`fail_probability` fail each attempt with probability p (deterministic for a given `seed` and
attempt), `payload` a string sent along to load the broker. A failure is a TransientTaskError, which
Celery's autoretry retries with backoff; a bad argument is not, so it is dead-lettered at once.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any

from celery import Task
from celery.exceptions import Ignore, Reject, Retry

from conveyor.amqp import dead_letters
from conveyor.tasks import deadletter
from conveyor.tasks.deadletter import DeadLettered
from conveyor.tasks import retry
from conveyor.tasks.base import LifecycleTask
from conveyor.tasks.deadletter import KEPT_DETAIL
from conveyor.seam.runtime_meta import RUNTIME_ATTR, STARTED_ATTR

log = logging.getLogger(__name__)


class SimulatedFailure(retry.TransientTaskError):
    """The failure a task was asked to simulate."""


class InvalidTaskArguments(ValueError):
    """The task was called with arguments no retry can fix."""


class DeadLetteringTask(LifecycleTask):
    """Sends a task that failed for good to the dead-letter queue, then records DeadLettered as its result.

    Hooked on __call__ (which Celery's tracer calls around the autoretry-wrapped run) rather than
    on_failure, because on_failure runs after the result is stored: this way the stored result
    already says the task was dead-lettered, and the dead-letter publish is confirmed before the
    worker acknowledges the original message.
    """

    abstract = True
    # Measure each run for the result's metadata (conveyor/seam/runtime_meta.py): on for a user's task
    # types, whose result is their own; the simulated ones report their time in their result.
    measure_runtime: bool = False
    Request = "conveyor.tasks.lost:DeadLetteringRequest"  # the attempts the pool loses end the same way
    full_pause_s: float = 5.0  # how long a worker waits before it tries a full dead-letter queue again

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.measure_runtime:
            started, started_at = time.perf_counter(), time.time()
        try:
            result = super().__call__(*args, **kwargs)
            if self.measure_runtime:
                setattr(self.request, RUNTIME_ATTR, round(time.perf_counter() - started, 6))
                setattr(self.request, STARTED_ATTR, started_at)
            return result
        except (Retry, Ignore, Reject):
            raise
        except Exception as exc:
            if self.request.called_directly:
                raise
            try:
                headers = deadletter.publish(self, exc)
            except dead_letters.UNROUTED as publish_error:
                # The dead-letter queue is gone even after declaring it again: rejecting to the DLX
                # would drop the task, so it goes back to its queue (and is run again) instead.
                log.error("Could not route task %s[%s] to the dead-letter queue (%s); requeueing it.",
                          self.name, self.request.id, publish_error)
                raise Reject(f"dead-letter publish not routed: {publish_error}", requeue=True) from exc
            except Exception as publish_error:
                if deadletter.refused(publish_error):
                    # The dead-letter queue is full (reject-publish): keep the task in its queue, loudly,
                    # and come back to it after a pause rather than spin on it.
                    log.error("The dead-letter queue refused task %s[%s]: it is full (dead_letter.max_length or "
                              "max_length_bytes). The task stays in %s and is tried again; make room with "
                              "`python -m conveyor dlq requeue|purge`.", self.name, self.request.id,
                              (self.request.delivery_info or {}).get("routing_key"))
                    deadletter.dead_letter_refused.send(sender=self.app, task_id=self.request.id, detail=KEPT_DETAIL,
                                                        name=self.name, hostname=self.request.hostname)
                    time.sleep(self.full_pause_s)
                    raise Reject("the dead-letter queue is full", requeue=True) from exc
                # Could not publish with the reason: let RabbitMQ dead-letter the original message
                # through the queue's DLX instead (x-death only), rather than acknowledge it away.
                log.error("Could not publish task %s[%s] to the dead-letter queue (%s); rejecting it to the DLX.",
                          self.name, self.request.id, publish_error)
                raise Reject(f"dead-letter publish failed: {publish_error}", requeue=False) from exc
            raise DeadLettered(headers["x-exception"], headers["x-attempts"], headers["x-original-queue"]) from exc


def _check(name: str, value: Any, kind: type | tuple[type, ...], low: float | None = None, high: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, kind):
        raise InvalidTaskArguments(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise InvalidTaskArguments(f"{name} must be between {low} and {high}, got {value!r}")


@dataclass(frozen=True)
class Simulated:
    """How one simulated type behaves by default."""

    name: str
    default_duration_s: float
    message: str


SIMULATED: dict[str, Simulated] = {
    "task_a": Simulated("task_a", 0.1, "Hello from Task A"),
    "task_b": Simulated("task_b", 0.2, "Hello from Task B"),
}


def simulate(task: Task, spec: Simulated, duration_s: float | None = None, fail_first: int = 0,
             fail_probability: float = 0.0, seed: int | None = None, payload: str = "") -> dict[str, Any]:
    duration_s = spec.default_duration_s if duration_s is None else duration_s
    _check("duration_s", duration_s, (int, float), 0, 3600)
    _check("fail_first", fail_first, int, 0, None)
    _check("fail_probability", fail_probability, (int, float), 0, 1)
    if seed is not None:
        _check("seed", seed, int)
    if not isinstance(payload, str):
        raise InvalidTaskArguments(f"payload must be a string, got {type(payload).__name__}")

    request = task.request  # looked up once: each lookup walks Celery's request stack
    attempt = request.retries or 0
    started_at = time.time()  # wall clock, so that a caller on this host can tell queue time from run time
    started = time.perf_counter()
    if duration_s:  # time.sleep(0) still gives up the CPU, which costs a no-op task a time slice
        time.sleep(duration_s)
    if attempt < fail_first:
        raise SimulatedFailure(f"{task.name} failed attempt {attempt + 1} on purpose (fail_first={fail_first})")
    if fail_probability and random.Random(f"{seed}:{attempt}").random() < fail_probability:
        raise SimulatedFailure(f"{task.name} failed attempt {attempt + 1} at random (p={fail_probability}, seed={seed})")
    return {
        "task": task.name,
        "message": spec.message,
        "execution_time_s": round(time.perf_counter() - started, 6),
        "started_at": started_at,
        "retries": attempt,
        "worker": request.hostname,
        "payload_bytes": len(payload),
    }


def _runner(spec: Simulated):
    # `upstream`: in a pipeline (a Celery chain) the previous stage's result, which Celery passes as
    # the first positional argument; the simulated work does not depend on it.
    # Registered bound (Celery's bind=True, conveyor/tasks/registry.py): `self` is the task.
    def run(self: Task, upstream: Any = None, duration_s: float | None = None, fail_first: int = 0,
            fail_probability: float = 0.0, seed: int | None = None, payload: str = "") -> dict[str, Any]:
        return simulate(self, spec, duration_s, fail_first, fail_probability, seed, payload)

    run.__name__ = run.__qualname__ = spec.name
    run.__module__ = __name__
    run.__doc__ = f"{spec.message!r} after {spec.default_duration_s} s of simulated work."
    return run


task_a = _runner(SIMULATED["task_a"])
task_b = _runner(SIMULATED["task_b"])
