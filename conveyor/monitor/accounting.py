"""Per task type totals, latencies and runtimes from Celery's task events, and what each worker is running.

Why our own bookkeeping rather than celery.events.state.State: State keeps a task's *latest*
task-sent time, and a retry republishes the message with a task-sent event of its own, so
end-to-end latency (measured from the first send) would be lost; and counting tasks sent means
telling a first send from a retry's republish or the worker's publish to the dead-letter queue.
What we keep per task is small: its type and queue, its send and success times, how many
attempts started and how many were retried.

Counting rules, one increment per event at most:
- sent: a task-sent event with retries == 0 to a work queue. A retry's republish carries
  retries > 0 and dead-lettering publishes to `dead_letter`: neither is a new task.
- received, started, succeeded, retried, revoked, rejected: one per event of that type.
- failed: every task-failed event, as the Celery exporter counts it. dead_lettered: those whose
  exception is DeadLettered (conveyor.tasks: the worker published the task to the dead-letter
  queue), and task-rejected events without requeue (RabbitMQ dead-letters a rejected message
  through the work queue's DLX; the worker falls back to that when its own publish fails).
- runtime: the `runtime` of task-succeeded. latency: first task-sent to task-succeeded, both the
  senders' clocks (the same host here; across hosts it includes their clock skew).
- retrying: tasks that have had as many task-retried events as task-started ones, i.e. that
  wait for their next attempt. On a classic queue such a task waits out its countdown inside a
  worker, which holds the ETA message reserved (RabbitMQ counts it as unacknowledged, not ready);
  on a quorum queue Celery parks it in RabbitMQ's delayed-delivery queues. Either way the work
  queue's own figures do not show it as waiting, so this count is the way to see it.
- a worker's active tasks: the `active` figure of its latest heartbeat (Celery's own count,
  at most one heartbeat interval old), while the heartbeat has not expired.

Events of one task do not arrive in the order they happened: the client's task-sent often comes
after the worker's task-received, and a retry with a short countdown can start before the
previous attempt's task-retried arrives (a worker batches its task events). So nothing here
depends on their order: counts are per event, `retrying` compares two counts, latency is taken
when the second of task-sent and task-succeeded arrives, and a finished task is remembered (up
to MAX_TRACKED_TASKS) so that its late events are still attributed to its type.

Totals start at zero when the monitor starts: events are not stored by the broker, so tasks
dispatched before it was listening are not counted (like any event-based exporter).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from bisect import bisect_left
from collections import Counter, OrderedDict, deque
from dataclasses import asdict, dataclass, field
from collections.abc import Iterable
from typing import Any

from celery.events.state import heartbeat_expires
from prometheus_client import Histogram

from conveyor.tasks.simulated import DeadLettered
from conveyor.amqp.topology import DEAD_LETTER_QUEUE
from conveyor.settings.config import builtin_task_types
from conveyor.stack.control import service_of

log = logging.getLogger(__name__)

RUNTIME_BUCKETS_S: tuple[float, ...] = tuple(b for b in Histogram.DEFAULT_BUCKETS if b != math.inf)
LATENCY_BUCKETS_S: tuple[float, ...] = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
MAX_TRACKED_TASKS = 100_000  # finished ones are kept for their late events; the oldest go first
_DEAD_LETTERED = DeadLettered.__name__ + "("  # how the worker reprs the exception in task-failed

# event type -> the TaskCounts field it increments (task-sent has its own rule)
_COUNTED = {
    "task-received": "received", "task-started": "started", "task-succeeded": "succeeded",
    "task-retried": "retried", "task-failed": "failed", "task-revoked": "revoked", "task-rejected": "rejected",
}


@dataclass
class TaskCounts:
    sent: int = 0
    received: int = 0
    started: int = 0
    succeeded: int = 0
    retried: int = 0
    failed: int = 0
    dead_lettered: int = 0
    revoked: int = 0
    rejected: int = 0


@dataclass
class Buckets:
    """Observations in histogram buckets (`le` bounds, +Inf implied), as Prometheus exposes them."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= bound) for each bound and +Inf."""
        running, out = 0, []
        for bound, count in zip((*self.bounds, math.inf), self.counts):
            running += count
            out.append((bound, running))
        return out


@dataclass
class _TypeStats:
    counts: TaskCounts
    runtime: Buckets
    latency: Buckets
    recent_latencies_s: deque[float]
    finished_at: deque[float] = field(default_factory=deque)  # local receive times, for the rate


@dataclass
class _Task:
    key: tuple[str, str]  # (task name, queue)
    sent: bool = False
    sent_at: float | None = None  # the first send's timestamp, for latency
    succeeded_at: float | None = None
    started: int = 0
    retried: int = 0
    done: bool = False

    @property
    def retrying(self) -> bool:
        # Every retried attempt is followed by one more start; until it comes, the task waits.
        return not self.done and self.retried > 0 and self.retried >= self.started


@dataclass
class _Worker:
    active: int
    processed: int
    freq_s: float
    seen_at: float


def percentile(sorted_values: list[float], p: float) -> float | None:
    """Nearest-rank percentile: an observed value, never an interpolation between two."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


class Accounting:
    """Fed every event by the listener thread; read by the dashboard, the sampler and the exporter."""

    def __init__(self, latency_window_tasks: int = 1000, rate_window_s: float = 5.0,
                 since: float | None = None, max_tracked: int = MAX_TRACKED_TASKS,
                 types: Iterable[tuple[str, str]] | None = None) -> None:
        """`types`: (task name, queue) of every task type of the config (default: task_a and task_b)."""
        self.since = time.time() if since is None else since
        self._latency_window = latency_window_tasks
        self._rate_window_s = rate_window_s
        self._max_tracked = max_tracked
        self._lock = threading.Lock()
        self._types: dict[tuple[str, str], _TypeStats] = {}
        self._tasks: OrderedDict[str, _Task] = OrderedDict()  # least recently heard of first
        self._retrying: Counter[tuple[str, str]] = Counter()
        self._workers: dict[str, _Worker] = {}
        # Events after task-sent carry no queue; routing is static per type, so it comes from here.
        self._queue_of_type = dict(types if types is not None else ((t.name, t.queue) for t in builtin_task_types()))
        for name, queue in self._queue_of_type.items():  # every known type shows up, with zeros, before its first event
            self._stats((name, queue))

    def _queue_of(self, name: str, event: dict[str, Any]) -> str:
        return event.get("queue") or event.get("routing_key") or self._queue_of_type.get(name, "")

    # --- feeding ----------------------------------------------------------------------
    def record(self, event: dict[str, Any]) -> None:
        kind = event.get("type", "")
        with self._lock:
            if kind.startswith("task-"):
                self._task_event(kind, event)
            elif kind in ("worker-heartbeat", "worker-online"):
                self._workers[event["hostname"]] = _Worker(
                    int(event.get("active") or 0), int(event.get("processed") or 0),
                    float(event.get("freq") or 2.0), _received_at(event))
            elif kind == "worker-offline":
                self._workers.pop(event.get("hostname", ""), None)

    def _task_event(self, kind: str, event: dict[str, Any]) -> None:
        task_id = event.get("uuid")
        if not task_id:
            return
        if kind == "task-sent":
            self._sent(task_id, event)
            return
        task = self._tasks.get(task_id)
        if task is None:
            name = event.get("name")  # task-received names the task; later events do not
            if not name:
                log.debug("Ignoring %s for task %s, which was in flight before the monitor started.", kind, task_id)
                return
            task = self._track(task_id, (name, self._queue_of(name, event)))
        self._tasks.move_to_end(task_id)
        stats = self._stats(task.key)
        counted = _COUNTED.get(kind)
        if counted:
            setattr(stats.counts, counted, getattr(stats.counts, counted) + 1)
        was_retrying = task.retrying
        if kind == "task-started":
            task.started += 1
        elif kind == "task-retried":
            task.retried += 1
        elif kind in ("task-succeeded", "task-failed"):
            task.done = True
            self._finished(stats, _received_at(event))
            if kind == "task-succeeded":
                if event.get("runtime") is not None:
                    stats.runtime.observe(float(event["runtime"]))
                task.succeeded_at = _timestamp(event)
                self._observe_latency(task, stats)
            elif str(event.get("exception", "")).startswith(_DEAD_LETTERED):
                stats.counts.dead_lettered += 1
        elif kind == "task-revoked":
            task.done = True
        elif kind == "task-rejected" and not event.get("requeue"):
            task.done = True
            stats.counts.dead_lettered += 1
        self._retrying[task.key] += task.retrying - was_retrying

    def _sent(self, task_id: str, event: dict[str, Any]) -> None:
        name = event.get("name") or ""
        queue = self._queue_of(name, event)
        if queue == DEAD_LETTER_QUEUE or event.get("retries"):
            return
        task = self._tasks.get(task_id)
        if task is not None and task.sent:
            # Sent again under the same id (requeued from the dead-letter queue): a new run.
            self._retrying[task.key] -= task.retrying
            task = None
        if task is None:
            task = self._track(task_id, (name, queue))
        self._tasks.move_to_end(task_id)
        task.sent, task.sent_at = True, _timestamp(event)
        stats = self._stats(task.key)
        stats.counts.sent += 1
        self._observe_latency(task, stats)  # when task-succeeded overtook this event

    def _observe_latency(self, task: _Task, stats: _TypeStats) -> None:
        if task.sent_at is None or task.succeeded_at is None:
            return
        latency = max(0.0, task.succeeded_at - task.sent_at)
        stats.latency.observe(latency)
        stats.recent_latencies_s.append(latency)

    def _finished(self, stats: _TypeStats, at: float) -> None:
        stats.finished_at.append(at)
        _prune(stats.finished_at, at - self._rate_window_s)

    def _stats(self, key: tuple[str, str]) -> _TypeStats:
        stats = self._types.get(key)
        if stats is None:
            stats = self._types[key] = _TypeStats(
                TaskCounts(), Buckets(RUNTIME_BUCKETS_S), Buckets(LATENCY_BUCKETS_S), deque(maxlen=self._latency_window))
        return stats

    def _track(self, task_id: str, key: tuple[str, str]) -> _Task:
        task = self._tasks[task_id] = _Task(key)
        while len(self._tasks) > self._max_tracked:
            oldest_id, oldest = self._tasks.popitem(last=False)
            self._retrying[oldest.key] -= oldest.retrying
            if not oldest.done:
                log.warning("Tracking more than %d tasks; forgetting %s, still in flight.", self._max_tracked, oldest_id)
        return task

    # --- reading ----------------------------------------------------------------------
    def tasks(self, now: float | None = None) -> list[dict[str, Any]]:
        """One row per (task type, queue): totals, tasks waiting to retry, finish rate, latency p50/p95."""
        now = time.time() if now is None else now
        window = max(1e-9, min(self._rate_window_s, now - self.since))
        rows = []
        with self._lock:
            for (name, queue), stats in sorted(self._types.items()):
                _prune(stats.finished_at, now - self._rate_window_s)
                recent = sorted(stats.recent_latencies_s)
                rows.append({
                    "name": name, "queue": queue, **asdict(stats.counts),
                    "retrying": self._retrying[name, queue],
                    "rate_per_s": round(len(stats.finished_at) / window, 3),
                    "latency_p50_s": _rounded(percentile(recent, 50)),
                    "latency_p95_s": _rounded(percentile(recent, 95)),
                })
        return rows

    def histograms(self) -> dict[str, dict[tuple[str, str], Buckets]]:
        """Copies of the runtime and latency histograms per (task type, queue)."""
        with self._lock:
            return {
                "runtime": {k: _copy(s.runtime) for k, s in self._types.items()},
                "latency": {k: _copy(s.latency) for k, s in self._types.items()},
            }

    def workers(self, now: float | None = None) -> list[dict[str, Any]]:
        """Every worker heard from: whether its heartbeat is current, and its active tasks."""
        now = time.time() if now is None else now
        with self._lock:
            return [
                {"hostname": host, "service": service_of(host), "alive": now < heartbeat_expires(w.seen_at, w.freq_s),
                 "tasks_active": w.active, "processed": w.processed}
                for host, w in sorted(self._workers.items())
            ]


def _prune(times: deque[float], before: float) -> None:
    while times and times[0] <= before:
        times.popleft()


def _timestamp(event: dict[str, Any]) -> float | None:
    return float(event["timestamp"]) if event.get("timestamp") is not None else None


def _received_at(event: dict[str, Any]) -> float:
    # The Receiver stamps each event with this process's clock on arrival; rates and heartbeat
    # expiry use it so that they do not depend on the senders' clocks.
    return float(event.get("local_received") or event.get("timestamp") or time.time())


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _copy(buckets: Buckets) -> Buckets:
    copy = Buckets(buckets.bounds)
    copy.counts, copy.total = list(buckets.counts), buckets.total
    return copy
