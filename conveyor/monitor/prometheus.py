"""The Prometheus endpoint: each scrape translates the current snapshot, so that every figure in
one scrape comes from the same moment.

Names follow the well-known Celery exporter (danihodovic/celery-exporter), so its dashboards and
alerts apply: celery_task_{sent,received,started,succeeded,failed,retried,revoked,rejected}_total
labelled {name, queue_name}, celery_queue_length and celery_active_consumer_count
{queue_name}, celery_worker_up and celery_worker_tasks_active {hostname}. Differences: no
hostname label on task counters (a replica restarted under Compose gets a new node name, and a
series per name would grow without end), the runtime histogram is celery_task_runtime_seconds
(unit in the name). Our own: celery_task_dead_lettered_total, celery_task_latency_seconds
(first send to success), celery_queue_unacked, celery_queue_retry_backlog, and per worker
service conveyor_service_replicas{state="desired"|"running"} and conveyor_service_workers_answering.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from conveyor.errors import UsageError
from conveyor.monitor.accounting import Buckets

if TYPE_CHECKING:
    from conveyor.monitor.collector import Monitor

log = logging.getLogger(__name__)

TASK_COUNTERS = {
    "sent": "Tasks published to a work queue (a retry's republish is not counted).",
    "received": "Task messages received by a worker (retries included).",
    "started": "Task attempts started by a worker.",
    "succeeded": "Tasks that succeeded.",
    "failed": "Tasks that failed for good (dead-lettered ones included).",
    "retried": "Task attempts that failed and were scheduled to run again.",
    "dead_lettered": "Tasks that failed for good and were published to the dead-letter queue.",
    "revoked": "Tasks revoked before or while running.",
    "rejected": "Task messages a worker rejected.",
}


class SnapshotCollector(Collector):
    def __init__(self, snapshot: Callable[[], dict[str, Any]],
                 histograms: Callable[[], dict[str, dict[tuple[str, str], Buckets]]]) -> None:
        self.snapshot, self.histograms = snapshot, histograms

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        labels = ["name", "queue_name"]
        for field, doc in TASK_COUNTERS.items():
            family = CounterMetricFamily(f"celery_task_{field}", doc, labels=labels)
            for task in snap["tasks"]:
                family.add_metric([task["name"], task["queue"]], task[field])
            yield family
        histograms = self.histograms()
        yield _histogram("celery_task_runtime_seconds", "Run time of succeeded tasks (the worker's figure).", histograms["runtime"])
        yield _histogram("celery_task_latency_seconds", "From a task's first send to its success, retries included.", histograms["latency"])

        queues = snap["queues"]
        for name, doc, field in (
            ("celery_queue_length", "Messages ready in the queue.", "messages_ready"),
            ("celery_queue_unacked", "Messages delivered to workers and not yet acknowledged.", "messages_unacked"),
            ("celery_active_consumer_count", "Consumers of the queue.", "consumers"),
            ("celery_queue_retry_backlog", "Tasks of the queue waiting for their next attempt.", "retry_backlog"),
        ):
            yield _gauge(name, doc, ["queue_name"], [([q["name"]], q[field]) for q in queues])

        workers = snap["workers"]
        yield _gauge("celery_worker_up", "1 while the worker's heartbeat is current.", ["hostname"],
                     [([w["hostname"]], int(w["alive"])) for w in workers])
        yield _gauge("celery_worker_tasks_active", "Tasks the worker is running (its latest heartbeat).", ["hostname"],
                     [([w["hostname"]], w["tasks_active"]) for w in workers if w["alive"]])

        services = snap["services"]
        yield _gauge("conveyor_service_replicas", "Worker replicas of the service.", ["service", "state"],
                     [([s["name"], state], s[f"replicas_{state}"]) for s in services for state in ("desired", "running")])
        yield _gauge("conveyor_service_workers_answering", "Workers of the service that answered a ping.", ["service"],
                     [([s["name"]], s["workers_responding"]) for s in services])


def _gauge(name: str, doc: str, labels: list[str], values: list[tuple[list[str], float | None]]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for label_values, value in values:
        if value is not None:  # unknown (no management API) is left out, never reported as 0
            family.add_metric(label_values, value)
    return family


def _histogram(name: str, doc: str, series: dict[tuple[str, str], Buckets]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=["name", "queue_name"])
    for (task, queue), buckets in sorted(series.items()):
        cumulative = [("+Inf" if math.isinf(b) else repr(float(b)), count) for b, count in buckets.cumulative()]
        family.add_metric([task, queue], cumulative, sum_value=buckets.total)
    return family


def serve(monitor: Monitor, host: str, port: int):
    """Serve /metrics on host:port in a daemon thread; return the server (its server_port is the real port)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(monitor.snapshot, monitor.accounting.histograms))
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise UsageError(f"cannot serve Prometheus metrics on {host}:{port}: {exc.strerror or exc}; "
                         "another `make monitor` may be running: pass --port N (0 for any free port) "
                         "or set monitoring.prometheus_port") from None
    log.info("Serving Prometheus metrics on http://%s:%d/metrics.", host, server.server_port)
    return server
