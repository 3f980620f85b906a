"""The Prometheus endpoint: each scrape translates the current snapshot and the accounting's
series, so that every figure in one scrape comes from the same moment. What is exposed, under
which names and labels, is defined in conveyor/monitor/metrics.py (the Celery exporter's names
where a figure means the same, ours under `conveyor_`); this module only fills it in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from conveyor.errors import UsageError
from conveyor.monitor import metrics as m

if TYPE_CHECKING:
    from conveyor.monitor.collector import Monitor

log = logging.getLogger(__name__)


class SnapshotCollector(Collector):
    def __init__(self, snapshot: Callable[[], dict[str, Any]], series: Callable[[], list[Metric]]) -> None:
        self.snapshot, self.series = snapshot, series

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        yield from self.series()
        queues = snap["queues"]
        for spec, field in ((m.QUEUE_LENGTH, "messages_ready"), (m.ACTIVE_CONSUMER_COUNT, "consumers"),
                            (m.QUEUE_UNACKED, "messages_unacked"), (m.QUEUE_RETRY_BACKLOG, "retry_backlog"),
                            (m.ACTIVE_WORKER_COUNT, "workers_up"), (m.ACTIVE_PROCESS_COUNT, "processes_up")):
            yield m.gauge(spec, [((q["name"],), q.get(field)) for q in queues])
        dead_letter = snap["dead_letter"]
        yield m.gauge(m.DEAD_LETTER_MESSAGES, [((), dead_letter["messages"])])
        yield m.gauge(m.DEAD_LETTER_MAX_MESSAGES, [((), dead_letter["max_messages"])])

        workers = snap["workers"]
        yield m.gauge(m.WORKER_UP, [((w["hostname"],), int(w["alive"])) for w in workers])
        # A worker that is down has no current figure: 0 rather than its last heartbeat's, as the exporter does.
        yield m.gauge(m.WORKER_TASKS_ACTIVE, [((w["hostname"],), w["tasks_active"] if w["alive"] else 0) for w in workers])

        services = snap["services"]
        yield m.gauge(m.SERVICE_REPLICAS, [((s["name"], state), s[f"replicas_{state}"])
                                           for s in services for state in ("desired", "running")])
        yield m.gauge(m.SERVICE_WORKERS_ANSWERING, [((s["name"],), s["workers_responding"]) for s in services])


def serve(monitor: Monitor, host: str, port: int):
    """Serve /metrics on host:port in a daemon thread; return the server (its server_port is the real port)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(monitor.snapshot, monitor.accounting.families))
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise UsageError(f"cannot serve Prometheus metrics on {host}:{port}: {exc.strerror or exc}; "
                         "another `make monitor` may be running: pass --port N (0 for any free port) "
                         "or set monitoring.prometheus_port") from None
    log.info("Serving Prometheus metrics on http://%s:%d/metrics.", host, server.server_port)
    return server
