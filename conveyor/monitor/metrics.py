"""Every Prometheus metric the monitor exposes, defined once: name, type, labels, buckets, help.

Two families of names. Where a figure means what it means in the well-known Celery exporter
(danihodovic/celery-exporter, src/exporter.py), it has that exporter's name, labels and buckets,
so that its Grafana dashboards and alerts (its celery-mixin) read our endpoint unchanged; the
test tests/test_metrics_exporter.py checks them against a copy of what that source declares.
Figures the exporter does not have are ours, under `conveyor_`.

`hostname` means what it means in the exporter: on task series, the host part of the Celery node
name of the event's sender (celery.utils.nodesplit), so a replica restarted under a new node name
on the same host does not start new series; on worker gauges, the whole node name, because our
replicas share the host's name on the host network and would otherwise be one series.

The figures come from `Series` (filled from the task tallies the workers and callers keep in the
record store, conveyor/monitor/tallied.py, or fed per task event where records are off and task
events on: conveyor/monitor/accounting.py) and from the snapshot (conveyor/monitor/snapshot.py: queues, workers,
services); conveyor/monitor/prometheus.py turns both into exposition.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from bisect import bisect_left
from dataclasses import dataclass, field

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from conveyor.lifecycle import tallies


@dataclass(frozen=True)
class Spec:
    name: str  # without the _total a counter gets in exposition
    kind: str  # counter | gauge | histogram
    labels: tuple[str, ...]
    doc: str
    buckets: tuple[float, ...] = ()  # histogram upper bounds, +Inf implied


TASK_LABELS = ("name", "hostname", "queue_name")

# --- the Celery exporter's (src/exporter.py), with its label order -------------------------------
TASK_EVENTS: dict[str, Spec] = {
    "task-sent": Spec("celery_task_sent", "counter", TASK_LABELS, "Sent when a task message is published."),
    "task-received": Spec("celery_task_received", "counter", TASK_LABELS, "Sent when the worker receives a task."),
    "task-started": Spec("celery_task_started", "counter", TASK_LABELS, "Sent just before the worker executes the task."),
    "task-succeeded": Spec("celery_task_succeeded", "counter", TASK_LABELS, "Sent if the task executed successfully."),
    "task-failed": Spec("celery_task_failed", "counter", ("name", "hostname", "exception", "queue_name"),
                        "Sent if the execution of the task failed (for good: retries are counted apart)."),
    "task-rejected": Spec("celery_task_rejected", "counter", TASK_LABELS,
                          "The task was rejected by the worker, possibly to be re-queued or moved to a dead letter queue."),
    "task-revoked": Spec("celery_task_revoked", "counter", TASK_LABELS, "Sent if the task has been revoked."),
    "task-retried": Spec("celery_task_retried", "counter", TASK_LABELS, "Sent if the task failed, but will be retried in the future."),
}
TASK_RUNTIME = Spec("celery_task_runtime", "histogram", TASK_LABELS, "Histogram of task runtime measurements.",
                    tallies.RUNTIME_BUCKETS_S)
WORKER_UP = Spec("celery_worker_up", "gauge", ("hostname",), "Indicates if a worker has recently sent a heartbeat.")
WORKER_TASKS_ACTIVE = Spec("celery_worker_tasks_active", "gauge", ("hostname",),
                           "The number of tasks the worker is currently processing")
QUEUE_LENGTH = Spec("celery_queue_length", "gauge", ("queue_name",), "The number of message in broker queue.")
ACTIVE_CONSUMER_COUNT = Spec("celery_active_consumer_count", "gauge", ("queue_name",),
                             "The number of active consumer in broker queue.")
ACTIVE_WORKER_COUNT = Spec("celery_active_worker_count", "gauge", ("queue_name",),
                           "The number of active workers in broker queue.")
ACTIVE_PROCESS_COUNT = Spec("celery_active_process_count", "gauge", ("queue_name",),
                            "The number of active processes in broker queue.")
EXPORTER = (*TASK_EVENTS.values(), TASK_RUNTIME, WORKER_UP, WORKER_TASKS_ACTIVE, QUEUE_LENGTH,
            ACTIVE_CONSUMER_COUNT, ACTIVE_WORKER_COUNT, ACTIVE_PROCESS_COUNT)

# --- ours ----------------------------------------------------------------------------------------
OUR_BUCKETS_S = tallies.QUEUE_BUCKETS_S
TYPE_LABELS = ("name", "queue_name")
TASK_DEAD_LETTERED = Spec("conveyor_task_dead_lettered", "counter", TYPE_LABELS,
                          "Tasks that failed for good and were published to the dead-letter queue.")
TASK_WAIT = Spec("conveyor_task_wait_seconds", "histogram", TYPE_LABELS,
                 "From a task's first publish to the start of its first attempt: time spent waiting in the queue.",
                 OUR_BUCKETS_S)
TASK_LATENCY = Spec("conveyor_task_latency_seconds", "histogram", TYPE_LABELS,
                    "From a task's first publish to its success, retries included.", OUR_BUCKETS_S)
QUEUE_UNACKED = Spec("conveyor_queue_messages_unacked", "gauge", ("queue_name",),
                     "Messages delivered to workers and not yet acknowledged (RabbitMQ management API).")
QUEUE_RETRY_BACKLOG = Spec("conveyor_queue_retry_backlog", "gauge", ("queue_name",),
                           "Tasks of the queue waiting out a retry countdown (not ready in the queue).")
DEAD_LETTER_MESSAGES = Spec("conveyor_dead_letter_messages", "gauge", (),
                            "Messages in the dead-letter queue.")
DEAD_LETTER_MAX_MESSAGES = Spec("conveyor_dead_letter_max_messages", "gauge", (),
                                "The dead-letter queue's bound: its max-length on the broker, else monitoring.dead_letter_max_messages.")
SERVICE_REPLICAS = Spec("conveyor_service_replicas", "gauge", ("service", "state"),
                        "Worker replicas of the service, state desired (last asked for) or running.")
SERVICE_WORKERS_ANSWERING = Spec("conveyor_service_workers_answering", "gauge", ("service",),
                                 "Workers of the service that answered a ping.")
OURS = (TASK_DEAD_LETTERED, TASK_WAIT, TASK_LATENCY, QUEUE_UNACKED, QUEUE_RETRY_BACKLOG, DEAD_LETTER_MESSAGES,
        DEAD_LETTER_MAX_MESSAGES, SERVICE_REPLICAS, SERVICE_WORKERS_ANSWERING)
ALL = (*EXPORTER, *OURS)


def exposed_names(spec: Spec) -> tuple[str, ...]:
    """The sample names a family shows in exposition (what a PromQL expression can use)."""
    if spec.kind == "counter":
        return (f"{spec.name}_total",)
    if spec.kind == "histogram":
        return tuple(f"{spec.name}_{suffix}" for suffix in ("bucket", "sum", "count"))
    return (spec.name,)


@dataclass
class Buckets:
    """Observations in histogram buckets (`le` bounds, +Inf implied), as Prometheus exposes them."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
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


class Series:
    """Counters and histograms keyed by their label values, fed event by event. Not locked: its
    owner (the accounting) feeds and reads it under its own lock."""

    def __init__(self) -> None:
        self._counters: dict[str, dict[tuple[str, ...], float]] = {s.name: {} for s in ALL if s.kind == "counter"}
        self._histograms: dict[str, dict[tuple[str, ...], Buckets]] = {s.name: {} for s in ALL if s.kind == "histogram"}

    def inc(self, spec: Spec, labels: tuple[str, ...], by: float = 1) -> None:
        series = self._counters[spec.name]
        series[labels] = series.get(labels, 0) + by

    def observe(self, spec: Spec, labels: tuple[str, ...], value: float) -> None:
        series = self._histograms[spec.name]
        if labels not in series:
            series[labels] = Buckets(spec.buckets)
        series[labels].observe(value)

    def show_worker_counters(self, name: str, hostname: str, queue: str) -> None:
        """Every task counter a worker has for (name, hostname, queue), at 0 where nothing was counted,
        as the Celery exporter shows them, so that ratios and increase() have both sides from the
        start. Not task-sent: a sender is no worker."""
        for kind, spec in TASK_EVENTS.items():
            if kind != "task-sent":
                self.inc(spec, (name, hostname, "", queue) if kind == "task-failed" else (name, hostname, queue), 0)

    def set_histogram(self, spec: Spec, labels: tuple[str, ...], counts: list[int], total: float) -> None:
        """A histogram's per-bucket (not cumulative) counts and sum, as stored (lifecycle/tallies.py)."""
        self._histograms[spec.name][labels] = Buckets(spec.buckets, list(counts), total)

    def purge(self, label: str, value: str) -> int:
        """Drop every series whose `label` is `value`; return how many went."""
        dropped = 0
        for spec in ALL:
            if label not in spec.labels or spec.kind == "gauge":
                continue
            index = spec.labels.index(label)
            store = self._counters[spec.name] if spec.kind == "counter" else self._histograms[spec.name]
            for key in [k for k in store if k[index] == value]:
                del store[key]
                dropped += 1
        return dropped

    def families(self) -> Iterator[Metric]:
        for spec in ALL:
            if spec.kind == "counter":
                family = CounterMetricFamily(spec.name, spec.doc, labels=spec.labels)
                for labels, value in sorted(self._counters[spec.name].items()):
                    family.add_metric(labels, value)
                yield family
            elif spec.kind == "histogram":
                family = HistogramMetricFamily(spec.name, spec.doc, labels=spec.labels)
                for labels, buckets in sorted(self._histograms[spec.name].items()):
                    cumulative = [("+Inf" if math.isinf(b) else repr(float(b)), n) for b, n in buckets.cumulative()]
                    family.add_metric(labels, cumulative, sum_value=buckets.total)
                yield family


def gauge(spec: Spec, values: list[tuple[tuple[str, ...], float | None]]) -> GaugeMetricFamily:
    """A gauge family; unknown figures (None: no management API) are left out, never reported as 0."""
    family = GaugeMetricFamily(spec.name, spec.doc, labels=spec.labels)
    for labels, value in values:
        if value is not None:
            family.add_metric(labels, value)
    return family
