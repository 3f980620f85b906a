"""Against the real RabbitMQ with real workers: the monitor's totals, its Prometheus endpoint,
its InfluxDB lines and the dashboard agree with a dispatch of known counts, and its queue depth
with the broker's own figure."""

from __future__ import annotations

import json
import re
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from helpers import run_cli, wait_for, write_config
from conveyor.tasks import deadletter
from conveyor.amqp import queues
from conveyor.settings.config import Monitoring
from conveyor.dispatch.dispatcher import dispatch
from conveyor.monitor import Monitor, dashboard, prometheus
from conveyor.settings.context import settings_of

pytestmark = [pytest.mark.broker, pytest.mark.usefixtures("broker_env")]

# Backoff of 1 s flat, so the always-failing task is dead-lettered after 1 + 1 + 1 s of waiting.
CONFIG = """\
name: monitor counts
expected_workers: 2
tasks:
  - {task: task_a, count: 6, params: {duration_s: 0.05}}
  - {task: task_a, count: 2, params: {duration_s: 0, fail_first: 1}}
  - {task: task_b, count: 3, params: {duration_s: 0.05}}
  - {task: task_b, count: 1, params: {duration_s: 0, fail_first: 2}}
  - {task: task_b, count: 1, params: {duration_s: 0, fail_first: 100}}
retry: {max_retries: 3, backoff_s: 1, backoff_max_s: 1, jitter: false}
services:
  - {name: worker-a, queues: [queue_a], concurrency: 2, replicas: 1}
  - {name: worker-b, queues: [queue_b], concurrency: 2, replicas: 1}
stop_grace_s: 10
"""
# Per task type: sent, succeeded, retried, failed, dead-lettered.
EXPECTED = {"task_a": (8, 8, 2, 0, 0), "task_b": (5, 4, 2 + 3, 1, 1)}
FIELDS = ("sent", "succeeded", "retried", "failed", "dead_lettered")


def purge(app) -> None:
    # On a connection of its own: Celery's default is one from kombu's process-wide pool, which an
    # earlier test's app.close() may have left holding a closed socket.
    with app.connection_for_write() as conn:
        app.control.purge(connection=conn)


def totals(rows: list[dict]) -> dict[str, tuple[int, ...]]:
    return {row["name"]: tuple(row[f] for f in FIELDS) for row in rows}


def test_the_monitor_reports_exactly_the_dispatched_counts(local_stack, make_app, tmp_path):
    config_file = write_config(tmp_path / "monitor.yml", CONFIG)
    purge(make_app(config_file))  # nothing left over from earlier tests in this vhost runs here
    stack = local_stack(config_file)
    app = stack.app
    deadletter.drain(app)
    lines_file = tmp_path / "metrics.lp"
    settings = Monitoring(collect_interval_s=0.5, emit_interval_s=1, prometheus_port=0)
    monitor = Monitor(stack, settings, influx=str(lines_file)).start()
    server = prometheus.serve(monitor, "127.0.0.1", 0)
    try:
        report = dispatch(app, settings_of(app).config, timeout_s=60)
        assert (report.succeeded, report.dead_lettered, report.total_retries) == (12, 1, 7)
        # Events trail the results by a moment: wait until every finish is in, then compare exactly.
        wait_for(lambda: sum(r["succeeded"] + r["failed"] for r in monitor.snapshot()["tasks"]) >= 13, 20,
                 "the monitor to see all 13 tasks finish")
        wait_for(lambda: sum(r["retried"] for r in monitor.snapshot()["tasks"]) >= 7, 10, "all 7 retries")
        snap = monitor.snapshot()
        assert totals(snap["tasks"]) == EXPECTED
        # ...which is what the dispatcher's own report says, too.
        assert sum(r["succeeded"] for r in snap["tasks"]) == report.succeeded
        assert sum(r["dead_lettered"] for r in snap["tasks"]) == report.dead_lettered
        assert sum(r["retried"] for r in snap["tasks"]) == report.total_retries
        assert all(r["retrying"] == 0 and r["latency_p95_s"] >= r["latency_p50_s"] > 0 for r in snap["tasks"])

        # The dead-letter queue holds the one dead-lettered task, once the next sample is taken.
        wait_for(lambda: {q["name"]: q for q in monitor.snapshot()["queues"]}["dead_letter"]["messages_ready"] == 1,
                 10, "the dead-letter depth in a new sample")
        by_queue = {q["name"]: q for q in monitor.snapshot()["queues"]}
        assert by_queue["queue_b"]["dead_lettered"] == 1 and by_queue["queue_a"]["dead_lettered"] == 0

        # The Prometheus endpoint serves the same figures, in exposition format the official parser reads.
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=5) as response:
            text = response.read().decode()
        samples = {(s.name, s.labels.get("name"), s.labels.get("le")): s.value
                   for family in text_string_to_metric_families(text) for s in family.samples}
        for name, expected in EXPECTED.items():
            got = tuple(samples[f"celery_task_{field}_total", name, None] for field in FIELDS)
            assert got == expected, name
            assert samples["celery_task_runtime_seconds_count", name, None] == expected[1]
            assert samples["celery_task_runtime_seconds_bucket", name, "+Inf"] == expected[1]

        # The dashboard draws those numbers.
        console = Console(record=True, width=160)
        console.print(dashboard.render(monitor.snapshot()))
        rows = {line.split()[0]: line.split() for line in console.export_text().splitlines() if line.strip()}
        for name, expected in EXPECTED.items():
            assert tuple(int(cell) for cell in rows[name][2:7]) == expected

        # InfluxDB lines were written on the emit schedule, while the monitor ran.
        wait_for(lambda: lines_file.exists() and lines_file.stat().st_size > 0, 10, "the first emitted batch")
    finally:
        server.shutdown()
        monitor.stop()
    last = {}
    for line in lines_file.read_text().splitlines():
        if line.startswith("celery_task,"):
            last[re.search(r"name=(\w+)", line).group(1)] = line
    for name, expected in EXPECTED.items():
        fields = dict(re.findall(r"(\w+)=(\d+)i", last[name]))
        assert tuple(int(fields[f]) for f in FIELDS) == expected
    stamps = {line.rsplit(" ", 1)[1] for line in lines_file.read_text().splitlines()}
    assert len(stamps) >= 3  # one per sample, at the collect interval, not one per batch
    assert deadletter.drain(app)  # leave the dead-letter queue empty for the next test


def test_queue_depth_in_the_snapshot_is_the_brokers_own(make_app, broker_env, rabbitmq_url, tmp_path):
    config_file = write_config(tmp_path / "idle.yml", CONFIG)
    app = make_app(config_file)
    deadletter.declare(app)
    purge(app)
    try:
        for _ in range(7):  # no worker consumes queue_a: all 7 stay ready
            app.send_task("task_a", kwargs={"duration_s": 0})
        vhost = rabbitmq_url.rsplit("/", 1)[1]

        def broker_ready() -> int | None:
            data = queues.management_request(rabbitmq_url, "queues/{vhost}/queue_a")
            return data.get("messages_ready")

        wait_for(lambda: broker_ready() == 7, 30, f"the management API of vhost {vhost} to report 7 ready")
        proc = run_cli("monitor.py", "--once", "--json", "--config", str(config_file),
                       env={**broker_env, "STACK": "local"}, timeout=60)
        assert proc.returncode == 0, proc.stderr
        snap = json.loads(proc.stdout)
        by_queue = {q["name"]: q for q in snap["queues"]}
        assert by_queue["queue_a"]["messages_ready"] == broker_ready() == 7
        assert by_queue["queue_a"]["consumers"] == 0 and by_queue["queue_a"]["messages_unacked"] == 0
        assert by_queue["queue_b"]["messages_ready"] == 0
        assert [(s["name"], s["replicas_running"], s["workers_responding"]) for s in snap["services"]] == \
            [("worker-a", 0, 0), ("worker-b", 0, 0)]
        assert {t["name"] for t in snap["tasks"]} == {"task_a", "task_b"}
    finally:
        purge(app)
