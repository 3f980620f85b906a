"""Sending the config's tasks and collecting what became of each one.

All tasks are published first, over one producer, so they run concurrently on the workers; then
the results are gathered as they arrive, with one overall deadline. A task still unfinished at the
deadline is reported as such (never waited on forever).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.result import AsyncResult, ResultSet

from conveyor.settings import environment
from conveyor.tasks import deadletter
from conveyor.settings.config import Config
from conveyor.errors import BrokerError
from conveyor.lifecycle import unique
from conveyor.dispatch.arguments import entry_arguments
from conveyor.tasks.deadletter import DeadLettered
from conveyor.tasks.states import TaskState
from conveyor.settings.context import settings_of

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


def send_all(app: Celery, config: Config) -> list[tuple[TaskOutcome, AsyncResult | None]]:
    """Publish every task; each send returns only once the broker confirmed it. A broker that goes
    away is retried for publish_retry_s (app.py); then this fails loudly, saying how many got through."""
    sent: list[tuple[TaskOutcome, AsyncResult | None]] = []
    try:
        return _send_all(app, config, sent)
    except environment.PUBLISH_ERRORS as exc:
        total = sum(spec.count for spec in config.tasks)
        raise BrokerError(
            f"the broker at {settings_of(app).broker.safe_url} did not confirm task {len(sent) + 1} of {total}, "
            f"even after retrying (publish_retry_s: {config.publish_retry_s:g}) ({type(exc).__name__}: {exc}); "
            f"the {len(sent)} confirmed before it will run; check RabbitMQ, then dispatch the rest") from None


def _send_all(app: Celery, config: Config, sent: list) -> list[tuple[TaskOutcome, AsyncResult | None]]:
    deadletter.declare(app)
    with app.producer_or_acquire() as producer:
        for entry, spec in enumerate(config.tasks):
            queue = config.task_type(spec.task).queue
            for index in range(spec.count):
                args, kwargs = entry_arguments(config, entry, index)
                if spec.unique_key:
                    key = spec.unique_key.format(index=index)
                    done = unique.send_unique(app, spec.task, key, args=args, kwargs=kwargs, producer=producer)
                    if not done.sent:  # nothing was sent, so there is no result to wait for
                        sent.append((TaskOutcome(spec.task, done.id, queue, state=TaskState.DUPLICATE, error=(
                            f"not sent: task {done.id} with unique key {key!r} is still queued or running")), None))
                        continue
                    result = app.AsyncResult(done.id)
                else:
                    result = app.send_task(spec.task, args=args, kwargs=kwargs, producer=producer)
                sent.append((TaskOutcome(spec.task, result.id, queue, sent_at=time.monotonic()), result))
    log.info("Sent %d tasks.", len(sent))
    return sent


def collect(app: Celery, sent: list[tuple[TaskOutcome, AsyncResult | None]], timeout_s: float,
            on_done: Callable[[TaskOutcome], None] | None = None) -> None:
    """Fill in each outcome as its result arrives, until all are in or the deadline passes."""
    by_id = {outcome.id: outcome for outcome, result in sent if result is not None}
    pending = ResultSet([result for _, result in sent if result is not None], app=app)
    if not pending.results:  # every task was a unique key's duplicate: nothing to wait for
        return
    try:
        for task_id, meta in app.backend.iter_native(pending, timeout=timeout_s, interval=0.05):
            outcome = by_id.get(task_id)
            if outcome is None or outcome.state != TaskState.PENDING:
                continue
            fill_outcome(outcome, meta)
            if on_done:
                on_done(outcome)
    except CeleryTimeout:
        unfinished = sum(o.state == TaskState.PENDING for o in by_id.values())
        log.warning("%d task(s) had not finished when the %.0f s timeout ran out.", unfinished, timeout_s)
    for outcome in by_id.values():
        if outcome.state == TaskState.PENDING:
            outcome.error = f"no result within {timeout_s:g} s"


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
    started = time.monotonic()
    sent = send_all(app, config)
    collect(app, sent, timeout_s, on_done)
    return DispatchReport(
        config=config.model_dump(mode="json"),
        tasks=[outcome for outcome, _ in sent],
        total_time_s=time.monotonic() - started,
    )
