"""Per task type totals, latencies and runtimes, and what each worker is running.

Task figures come from one of two sources. Where task records are on (the default), the workers and
callers keep tallies in the record store, and the monitor reads them every collect interval
(`use_tallies`, conveyor/monitor/tallied.py): no broker message per task, and totals that count
from the store's first write, whenever the monitor started. Where records are off, Celery's task
events are counted instead, when they are on (`tuning.task_events`), by the rules below. Worker
liveness and active tasks always come from the workers' heartbeats (sent with task events off too).

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
- runtime: the `runtime` of task-succeeded. latency: first task-sent to task-succeeded; wait:
  first task-sent to the first task-started (time in the queue, retries' countdowns left out).
  Both are the senders' clocks (the same host here; across hosts they include the clocks' skew).
- retrying: tasks that have had as many task-retried events as task-started ones, i.e. that
  wait for their next attempt. On a classic queue such a task waits out its countdown inside a
  worker, which holds the ETA message reserved (RabbitMQ counts it as unacknowledged, not ready);
  on a quorum queue Celery parks it in RabbitMQ's delayed-delivery queues. Either way the work
  queue's own figures do not show it as waiting, so this count is the way to see it.
- a worker's active tasks: the `active` figure of its latest heartbeat (Celery's own count,
  at most one heartbeat interval old). A worker whose heartbeats stop (SIGKILL, a lost host) is
  down after worker_down_after_s and forgotten after worker_forget_after_s, its host's task
  series with it (as the Celery exporter purges them), so label sets stay bounded; one that says
  goodbye (worker-offline, a warm shutdown) is forgotten at once: it is not down, it is gone.

The per-event figures go into a metrics.Series under the Celery exporter's labels (conveyor/
monitor/metrics.py); the per-type totals of the dashboard and the JSON are kept here.

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
import re
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import asdict, dataclass, field, fields
from collections.abc import Iterable
from typing import Any

from celery.utils import nodesplit
from prometheus_client.metrics_core import Metric

from conveyor.tasks.deadletter import DeadLettered
from conveyor.amqp.topology import DEAD_LETTER_QUEUE
from conveyor.settings.config import builtin_task_types
from conveyor.stats import percentile_linear
from conveyor.stack.control import service_of
from conveyor.monitor.metrics import TASK_DEAD_LETTERED, TASK_EVENTS, TASK_LATENCY, TASK_RUNTIME, TASK_WAIT, Series
from conveyor.monitor.tallied import Tallied

log = logging.getLogger(__name__)

MAX_TRACKED_TASKS = 100_000  # finished ones are kept for their late events; the oldest go first
_DEAD_LETTERED = DeadLettered.__name__ + "("  # how the worker reprs the exception in task-failed
_EXCEPTION_CLASS = re.compile(r"^(\w+)\(")  # the class name in that repr, as the Celery exporter takes it

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


_COUNT_FIELDS = tuple(f.name for f in fields(TaskCounts))


@dataclass
class _TypeStats:
    counts: TaskCounts
    recent_latencies_s: deque[float]
    finished_at: deque[float] = field(default_factory=deque)  # local receive times, for the rate
    finished_totals: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=2))  # tallied: (read at, total)


@dataclass
class _Task:
    key: tuple[str, str]  # (task name, queue)
    sent: bool = False
    sent_at: float | None = None  # the first send's timestamp, for latency and wait
    first_started_at: float | None = None
    waited: bool = False  # its wait is observed once, when both its first send and start are known
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
    seen_at: float


class Accounting:
    """Fed every event by the listener thread; read by the dashboard, the sampler and the exporter."""

    def __init__(self, latency_window_tasks: int = 1000, rate_window_s: float = 5.0,
                 since: float | None = None, max_tracked: int = MAX_TRACKED_TASKS,
                 worker_down_after_s: float = 10.0, worker_forget_after_s: float = 1800.0,
                 types: Iterable[tuple[str, str]] | None = None) -> None:
        """`types`: (task name, queue) of every task type of the config (default: task_a and task_b)."""
        self.since = time.time() if since is None else since
        self.series = Series()
        self._down_after_s, self._forget_after_s = worker_down_after_s, worker_forget_after_s
        self._labelled: set[tuple[str, str, str]] = set()  # (name, hostname, queue) with zeroed series
        self._latency_window = latency_window_tasks
        self._rate_window_s = rate_window_s
        self._max_tracked = max_tracked
        self._lock = threading.Lock()
        self._types: dict[tuple[str, str], _TypeStats] = {}
        self._tasks: OrderedDict[str, _Task] = OrderedDict()  # least recently heard of first
        self._retrying: Counter[tuple[str, str]] = Counter()
        self._workers: dict[str, _Worker] = {}
        self.tallied = False  # task figures from the record store's tallies (use_tallies), not task events
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
                if not self.tallied:  # counted by the tallies already
                    self._task_event(kind, event)
            elif kind in ("worker-heartbeat", "worker-online"):
                self._workers[event["hostname"]] = _Worker(
                    int(event.get("active") or 0), int(event.get("processed") or 0), _received_at(event))
            elif kind == "worker-offline" and self._workers.pop(event.get("hostname", ""), None):
                self._purge_host(nodesplit(event["hostname"])[1])

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
        name, queue = task.key
        host = _host(event)
        self._count(kind, (name, host, queue), event)
        was_retrying = task.retrying
        if kind == "task-started":
            task.started += 1
            if task.first_started_at is None:
                task.first_started_at = _timestamp(event)
                self._observe_wait(task)
        elif kind == "task-retried":
            task.retried += 1
        elif kind in ("task-succeeded", "task-failed"):
            task.done = True
            self._finished(stats, _received_at(event))
            if kind == "task-succeeded":
                if event.get("runtime") is not None:
                    self.series.observe(TASK_RUNTIME, (name, host, queue), float(event["runtime"]))
                task.succeeded_at = _timestamp(event)
                self._observe_latency(task, stats)
            elif str(event.get("exception", "")).startswith(_DEAD_LETTERED):
                self._dead_lettered(task, stats)
        elif kind == "task-revoked":
            task.done = True
        elif kind == "task-rejected" and not event.get("requeue"):
            task.done = True
            self._dead_lettered(task, stats)
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
        # Only this counter: the exporter does not zero a sender's other series (web servers and
        # dispatchers are no workers), and neither do we.
        self.series.inc(TASK_EVENTS["task-sent"], (name, _host(event), queue))
        self._observe_latency(task, stats)  # when task-succeeded overtook this event
        self._observe_wait(task)  # when task-started did

    def _count(self, kind: str, labels: tuple[str, str, str], event: dict[str, Any]) -> None:
        """One increment of the event's counter. The first event of a (name, hostname, queue) also
        shows every other counter of it at 0, as the Celery exporter does, so that ratios and
        increase() have both sides from the start."""
        name, host, queue = labels
        if labels not in self._labelled:
            self._labelled.add(labels)
            self.series.show_worker_counters(name, host, queue)
        spec = TASK_EVENTS.get(kind)
        if spec is None:
            return
        if kind == "task-failed":
            self.series.inc(spec, (name, host, _exception_class(event.get("exception")), queue))
        else:
            self.series.inc(spec, labels)

    def _dead_lettered(self, task: _Task, stats: _TypeStats) -> None:
        stats.counts.dead_lettered += 1
        self.series.inc(TASK_DEAD_LETTERED, task.key)

    def _observe_wait(self, task: _Task) -> None:
        if task.sent_at is None or task.first_started_at is None or task.waited:
            return
        task.waited = True
        self.series.observe(TASK_WAIT, task.key, max(0.0, task.first_started_at - task.sent_at))

    def _observe_latency(self, task: _Task, stats: _TypeStats) -> None:
        if task.sent_at is None or task.succeeded_at is None:
            return
        latency = max(0.0, task.succeeded_at - task.sent_at)
        self.series.observe(TASK_LATENCY, task.key, latency)
        stats.recent_latencies_s.append(latency)

    def _finished(self, stats: _TypeStats, at: float) -> None:
        stats.finished_at.append(at)
        _prune(stats.finished_at, at - self._rate_window_s)

    def _stats(self, key: tuple[str, str]) -> _TypeStats:
        stats = self._types.get(key)
        if stats is None:
            stats = self._types[key] = _TypeStats(TaskCounts(), deque(maxlen=self._latency_window))
        return stats

    def _track(self, task_id: str, key: tuple[str, str]) -> _Task:
        task = self._tasks[task_id] = _Task(key)
        while len(self._tasks) > self._max_tracked:
            oldest_id, oldest = self._tasks.popitem(last=False)
            self._retrying[oldest.key] -= oldest.retrying
            if not oldest.done:
                log.warning("Tracking more than %d tasks; forgetting %s, still in flight.", self._max_tracked, oldest_id)
        return task

    def use_tallies(self, found: Tallied, at: float | None = None) -> None:
        """Task figures as the record store's tallies have them (conveyor/monitor/tallied.py), read
        every collect interval; from the first call on, task events are not counted (they would be
        counted twice). Workers' heartbeats still say which workers are up and what they run."""
        at = time.time() if at is None else at
        with self._lock:
            self.tallied = True
            self.series = found.series
            for key, counts in found.counts.items():
                stats = self._stats(key)
                stats.counts = TaskCounts(**{f: counts.get(f, 0) for f in _COUNT_FIELDS})
                stats.finished_totals.append((at, stats.counts.succeeded + stats.counts.failed))
                stats.recent_latencies_s = deque(found.latencies_s.get(key, ()), maxlen=self._latency_window)
            self._retrying = Counter(found.retrying)

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
                    "rate_per_s": round(_tallied_rate(stats) if self.tallied else len(stats.finished_at) / window, 3),
                    "latency_p50_s": _rounded(percentile_linear(recent, 50)),
                    "latency_p95_s": _rounded(percentile_linear(recent, 95)),
                })
        return rows

    def families(self, now: float | None = None) -> list[Metric]:
        """The per-event counters and histograms, as Prometheus families (a consistent copy)."""
        now = time.time() if now is None else now
        with self._lock:
            self._expire_workers(now)
            return list(self.series.families())

    def workers(self, now: float | None = None) -> list[dict[str, Any]]:
        """Every worker heard from and not yet forgotten: whether it is up, and its active tasks."""
        now = time.time() if now is None else now
        with self._lock:
            self._expire_workers(now)
            return [
                {"hostname": node, "service": service_of(node), "alive": now - w.seen_at <= self._down_after_s,
                 "tasks_active": w.active, "processed": w.processed}
                for node, w in sorted(self._workers.items())
            ]

    def _expire_workers(self, now: float) -> None:
        for node, worker in list(self._workers.items()):
            if now - worker.seen_at > self._forget_after_s:
                del self._workers[node]
                log.info("Forgetting worker %s, silent for %.0f s.", node, now - worker.seen_at)
                self._purge_host(nodesplit(node)[1])

    def _purge_host(self, host: str) -> None:
        # Task series are per host, not per node: they go when the host's last worker has gone.
        if any(nodesplit(node)[1] == host for node in self._workers):
            return
        dropped = self.series.purge("hostname", host)
        self._labelled = {labels for labels in self._labelled if labels[1] != host}
        if dropped:
            log.info("Dropped %d task series of host %s, which has no worker left.", dropped, host)


def _tallied_rate(stats: _TypeStats) -> float:
    """Tasks finished per second between the last two reads of the tallies."""
    if len(stats.finished_totals) < 2:
        return 0.0
    (then, before), (last, total) = stats.finished_totals
    return (total - before) / (last - then) if last > then else 0.0


def _prune(times: deque[float], before: float) -> None:
    while times and times[0] <= before:
        times.popleft()


def _host(event: dict[str, Any]) -> str:
    """The host part of the sender's node name (`worker-a-1f2e@host` -> `host`), the exporter's hostname."""
    return nodesplit(str(event.get("hostname") or ""))[1] or ""


def _exception_class(exception: Any) -> str:
    found = _EXCEPTION_CLASS.match(str(exception or ""))
    return found.group(1) if found else "UnknownException"


def _timestamp(event: dict[str, Any]) -> float | None:
    return float(event["timestamp"]) if event.get("timestamp") is not None else None


def _received_at(event: dict[str, Any]) -> float:
    # The Receiver stamps each event with this process's clock on arrival; rates and heartbeat
    # expiry use it so that they do not depend on the senders' clocks.
    return float(event.get("local_received") or event.get("timestamp") or time.time())


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
