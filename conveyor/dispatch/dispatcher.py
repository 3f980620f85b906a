"""Sending the config's tasks and collecting what became of each one.

All tasks are published first, in batches on one channel with the broker's confirms collected
asynchronously (conveyor/seam/publisher.py), so they run concurrently on the workers; results are
taken in between batches and then until all are in, with one overall deadline
(conveyor/seam/collector.py). A task still unfinished at the deadline is reported as such (never
waited on forever).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import asdict, dataclass, field
from typing import Any

from celery import Celery

from conveyor.dispatch.arguments import entry_arguments
from conveyor.errors import BrokerError, PublishInterrupted
from conveyor.lifecycle import unique
from conveyor.seam.collector import Collector, collector_for
from conveyor.seam.publisher import Publisher, kwargs_repr
from conveyor.settings import environment
from conveyor.settings.config import Config
from conveyor.settings.context import settings_of
from conveyor.tasks import deadletter
from conveyor.tasks.deadletter import DeadLettered
from conveyor.tasks.states import TaskState

log = logging.getLogger(__name__)


@dataclass
class TaskOutcome:
    name: str
    id: str
    queue: str
    state: TaskState = TaskState.PENDING
    result: Any = None
    execution_time_s: float | None = None
    retries: int = 0
    worker: str | None = None
    latency_s: float | None = None
    error: str | None = None
    sent_at: float = field(default=0.0, repr=False)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("sent_at")
        return data


@dataclass
class DispatchReport:
    config: dict[str, Any]
    tasks: list[TaskOutcome]
    total_time_s: float

    @property
    def sequential_time_s(self) -> float:
        return sum(t.execution_time_s or 0.0 for t in self.tasks)

    @property
    def total_retries(self) -> int:
        return sum(t.retries for t in self.tasks)

    def count(self, state: str) -> int:
        return sum(t.state == state for t in self.tasks)

    @property
    def succeeded(self) -> int:
        return self.count(TaskState.SUCCEEDED)

    @property
    def dead_lettered(self) -> int:
        return self.count(TaskState.DEAD_LETTERED)

    @property
    def failed(self) -> int:
        return len(self.tasks) - self.succeeded

    @property
    def speedup(self) -> float:
        return self.sequential_time_s / self.total_time_s if self.total_time_s else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "tasks": [t.as_dict() for t in self.tasks],
            "total_time_s": round(self.total_time_s, 6),
            "sequential_time_s": round(self.sequential_time_s, 6),
            "speedup": round(self.speedup, 3),
            "total_retries": self.total_retries,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "dead_lettered": self.dead_lettered,
        }


BATCH = 500  # tasks published before the dispatcher takes in confirms and results; also the most left unconfirmed


class _Sending:
    """One dispatch's outcomes, by id as well, and how many tasks the broker has confirmed so far."""

    def __init__(self, app: Celery, on_done: Callable[[TaskOutcome], None] | None) -> None:
        self.app, self.on_done = app, on_done
        self.outcomes: list[TaskOutcome] = []
        self.by_id: dict[str, TaskOutcome] = {}
        self.confirmed = 0
        self.pending = 0  # sent, neither refused nor finished

    def on_result(self, task_id: str, status: str, value: Any, meta: dict[str, Any] | None = None) -> None:
        outcome = self.by_id.get(task_id)
        if outcome is None or outcome.state != TaskState.PENDING:
            return
        fill_outcome(outcome, {**(meta or {}), "status": status, "result": value})
        self.pending -= 1
        if self.on_done:
            self.on_done(outcome)

    def settle(self, confirmed: list[Any], refused: list[Any]) -> None:
        self.confirmed += len(confirmed)
        if not refused:
            return
        unique_ids = [r.id for r in refused if isinstance(r, unique.Dispatched)]
        for task_id in (getattr(r, "id", r) for r in refused):
            outcome = self.by_id.pop(task_id, None)  # no result will come: the broker never stored it
            if outcome is not None and outcome.state == TaskState.PENDING:
                self.pending -= 1
                outcome.state = TaskState.REFUSED
                outcome.error = "refused by the broker (nacked, or returned: no queue took it); not sent"
        if unique_ids:
            unique.release_refused(self.app, unique_ids)
        log.error("The broker refused %d task(s): they were not sent.", len(refused))


def send_all(pub: Publisher, collector: Collector, config: Config, sending: _Sending) -> None:
    """Publish every task through `pub`, taking in confirms (and the results already back) after each
    batch. A task counts as sent once the broker confirmed it; one it refused (nacked, or returned
    because no queue took it) is REFUSED and waited on no more."""
    app = sending.app
    for entry, spec in enumerate(config.tasks):
        queue = config.task_type(spec.task).queue
        for index in range(spec.count):
            args, kwargs = entry_arguments(config, entry, index)
            if spec.unique_key:
                key = spec.unique_key.format(index=index)
                done = pub.publish(lambda producer: unique.send_unique(
                    app, spec.task, key, args=args, kwargs=kwargs, producer=producer, declare=[]))
                if not done.sent:  # nothing was sent, so there is no result to wait for
                    sending.outcomes.append(TaskOutcome(spec.task, done.id, queue, state=TaskState.DUPLICATE, error=(
                        f"not sent: task {done.id} with unique key {key!r} is still queued or running")))
                    continue
                task_id = done.id
            else:
                task_id = pub.publish(lambda _producer: pub.send_task(spec.task, kwargs, kwargs_repr(kwargs), args=args))
            outcome = TaskOutcome(spec.task, task_id, queue, sent_at=time.monotonic())
            sending.outcomes.append(outcome)
            sending.by_id[task_id] = outcome
            sending.pending += 1
            collector.watch(task_id)
            if len(sending.outcomes) % BATCH == 0:
                sending.settle(*pub.flush(in_flight=BATCH))
                collector.wait(0)
    sending.settle(*pub.flush())
    log.info("Sent %d tasks; the broker confirmed %d.", len(sending.outcomes), sending.confirmed)


def collect(collector: Collector, sending: _Sending, deadline: float) -> None:
    """Wait for the results still to come, until all are in or the deadline passes."""
    while sending.pending:
        left = deadline - time.monotonic()
        if left <= 0:
            log.warning("%d task(s) had not finished when the timeout ran out.", sending.pending)
            return
        collector.wait(min(left, 1.0))


def fill_outcome(outcome: TaskOutcome, meta: dict[str, Any]) -> None:
    """Classify a result (`status` and `result` as the backend gives them) into the outcome: shared with conveyor.loadtest."""
    outcome.latency_s = round(time.monotonic() - outcome.sent_at, 6)
    status, value = meta.get("status"), meta.get("result")
    if status == TaskState.SUCCEEDED and _simulated(value):
        outcome.state = TaskState.SUCCEEDED
        outcome.result = value.get("message")
        outcome.execution_time_s = value.get("execution_time_s")
        outcome.retries = value.get("retries", 0)
        outcome.worker = value.get("worker")
        return
    if status == TaskState.SUCCEEDED:
        # A user task's result is its own; what the simulated ones report about themselves comes from
        # the result's metadata here (worker and retries with result_extended, runtime_s from the worker).
        outcome.state = TaskState.SUCCEEDED
        outcome.result = value
        outcome.execution_time_s = meta.get("runtime_s")
        outcome.retries = meta.get("retries") or 0
        outcome.worker = meta.get("worker")
        return
    exc = value
    if isinstance(value, dict) and "exc_type" in value:  # a backend that hands back the raw form
        exc = app_exception(value)
    if isinstance(exc, DeadLettered):
        outcome.state = TaskState.DEAD_LETTERED
        outcome.retries = max(0, exc.attempts - 1)
        outcome.error = exc.reason
    else:
        outcome.state = TaskState.parse(status) if status else TaskState.FAILED
        outcome.error = f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else str(exc)


def _simulated(value: Any) -> bool:
    """The result of a simulated task (conveyor/tasks/simulated.py), which reports on itself."""
    return isinstance(value, dict) and {"task", "message", "execution_time_s", "retries", "worker"} <= value.keys()


def app_exception(raw: dict[str, Any]) -> BaseException:
    if raw.get("exc_type") == "DeadLettered":
        return DeadLettered(*raw.get("exc_message", ("unknown", 1)))
    return RuntimeError(f"{raw.get('exc_type')}: {raw.get('exc_message')}")


def dispatch(app: Celery, config: Config, timeout_s: float,
             on_done: Callable[[TaskOutcome], None] | None = None) -> DispatchReport:
    """Send every task and collect every result on one connection (conveyor/seam: the publisher and
    the collector the load tester uses too), results waited on for at most `timeout_s`. A broker
    that cannot be reached is retried for publish_retry_s; then this fails loudly, saying how many
    tasks got through."""
    started = time.monotonic()
    sending = _Sending(app, on_done)
    total = sum(spec.count for spec in config.tasks)
    try:
        deadletter.declare(app)
        with Publisher(app) as pub, closing(collector_for(app, sending.on_result, pub.connection)) as collector:
            send_all(pub, collector, config, sending)
            collect(collector, sending, time.monotonic() + timeout_s)
    except (*environment.PUBLISH_ERRORS, PublishInterrupted) as exc:
        raise BrokerError(
            f"the broker at {settings_of(app).broker.safe_url} did not confirm task {sending.confirmed + 1} of {total}, "
            f"even after retrying (publish_retry_s: {config.publish_retry_s:g}) ({type(exc).__name__}: {exc}); "
            f"the {sending.confirmed} confirmed before it will run; check RabbitMQ, then dispatch the rest") from None
    for outcome in sending.by_id.values():
        if outcome.state == TaskState.PENDING:
            outcome.error = f"no result within {timeout_s:g} s"
    return DispatchReport(
        config=config.model_dump(mode="json"),
        tasks=sending.outcomes,
        total_time_s=time.monotonic() - started,
    )

