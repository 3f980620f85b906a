"""Against the real RabbitMQ with real workers: the monitor's totals, its Prometheus endpoint,
its InfluxDB lines and the dashboard agree with a dispatch of known counts, and its queue depth
with the broker's own figure."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from helpers import run_cli, unavailable, wait_for, write_config
from helpers.monitor import CONFIG, purge
from conveyor.tasks import deadletter
from conveyor.amqp import queues
from conveyor.settings.config import Monitoring
from conveyor.dispatch.dispatcher import dispatch
from conveyor.monitor import Monitor, dashboard, metrics, prometheus
from conveyor.settings.context import settings_of

pytestmark = [pytest.mark.broker, pytest.mark.usefixtures("broker_env")]

# Backoff of 1 s flat, so the always-failing task is dead-lettered after 1 + 1 + 1 s of waiting.
# Per task type: sent, succeeded, retried, failed, dead-lettered.
EXPECTED = {"task_a": (8, 8, 2, 0, 0), "task_b": (5, 4, 2 + 3, 1, 1)}
FIELDS = ("sent", "succeeded", "retried", "failed", "dead_lettered")




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
        check_exposition(text, stack)

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


def check_exposition(text: str, stack) -> None:
    """The scrape after the dispatch: the Celery exporter's names, labels and buckets (as
    conveyor.monitor.metrics declares them, which tests/test_metrics_exporter.py holds against the
    exporter's source), with the dispatch's counts; and promtool's linter finds nothing but the
    exporter's own `_count` gauge names."""
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for spec in metrics.ALL:
        assert spec.name in families, spec.name
        assert families[spec.name].type == spec.kind, spec.name
        for sample in families[spec.name].samples:
            extra = {"le"} if sample.name.endswith("_bucket") else set()
            assert set(sample.labels) == set(spec.labels) | extra, (sample.name, sample.labels)

    def total(sample_name: str, name: str, **labels: str) -> float:
        family = families[sample_name.removesuffix("_total").removesuffix("_count").removesuffix("_bucket")]
        return sum(s.value for s in family.samples if s.name == sample_name and s.labels["name"] == name
                   and all(s.labels.get(k) == v for k, v in labels.items()))

    for name, expected in EXPECTED.items():
        assert tuple(total(f"celery_task_{field}_total", name) for field in FIELDS[:4]) == expected[:4], name
        assert total("conveyor_task_dead_lettered_total", name) == expected[4]
        assert total("celery_task_runtime_count", name) == total("celery_task_runtime_bucket", name, le="+Inf") == expected[1]
        assert total("conveyor_task_wait_seconds_count", name) == expected[0]  # every task started once at least
    # The always-failing task_b failed with conveyor's DeadLettered, and says so in `exception`.
    assert total("celery_task_failed_total", "task_b", exception="DeadLettered") == 1
    assert {s.labels["le"] for s in families["celery_task_runtime"].samples if s.name.endswith("_bucket")} == \
        {*(repr(float(b)) for b in metrics.TASK_RUNTIME.buckets), "+Inf"}
    # hostname is the host part of the workers' node names, as the exporter sets it.
    hosts = {s.labels["hostname"] for s in families["celery_task_succeeded"].samples}
    assert hosts == {socket.gethostname()}
    up = {s.labels["hostname"]: s.value for s in families["celery_worker_up"].samples}
    assert len(up) == 2 and set(up.values()) == {1.0}
    queue_workers = {s.labels["queue_name"]: s.value for s in families["celery_active_worker_count"].samples}
    assert (queue_workers["queue_a"], queue_workers["queue_b"]) == (1, 1)
    assert families["conveyor_dead_letter_max_messages"].samples[0].value == stack.config.dead_letter.max_length

    promtool = shutil.which("promtool")
    if promtool is None:
        unavailable("promtool (Debian package prometheus)")
    lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    problems = [line for line in (lint.stdout + lint.stderr).splitlines() if line.strip()]
    exporter_count_gauges = {s.name for s in metrics.EXPORTER if s.kind == "gauge" and s.name.endswith("_count")}
    assert problems and all(line.split()[0] in exporter_count_gauges and "_count" in line for line in problems), problems


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


def test_a_killed_worker_is_marked_down_within_the_interval_then_forgotten(local_stack, tmp_path):
    """SIGKILL sends no worker-offline: only the heartbeats stopping tell, and the endpoint must
    say so within worker_down_after_s (plus one heartbeat), then drop the worker."""
    config_file = write_config(tmp_path / "kill.yml", CONFIG)
    stack = local_stack(config_file)
    settings = Monitoring(collect_interval_s=0.5, emit_interval_s=1, prometheus_port=0,
                          worker_down_after_s=4, worker_forget_after_s=8)
    monitor = Monitor(stack, settings).start()
    server = prometheus.serve(monitor, "127.0.0.1", 0)

    def worker_up() -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=5) as response:
            text = response.read().decode()
        return {s.labels["hostname"]: s.value for f in text_string_to_metric_families(text)
                if f.name == "celery_worker_up" for s in f.samples}

    try:
        victim = next(r for r in stack.replicas() if r.service == "worker-b")
        wait_for(lambda: worker_up().get(victim.node) == 1, 10, f"a heartbeat of {victim.node}")
        os.killpg(int(victim.ident), signal.SIGKILL)
        killed_at = time.monotonic()
        # Its last heartbeat was at most one heartbeat (2 s) before the kill.
        wait_for(lambda: worker_up().get(victim.node) == 0, 4 + 2 + 1, f"{victim.node} to be marked down")
        assert time.monotonic() - killed_at <= 4 + 2 + 1
        others = {node: up for node, up in worker_up().items() if node != victim.node}
        assert list(others.values()) == [1]  # the worker-a replica is untouched
        wait_for(lambda: victim.node not in worker_up(), 8 + 2 + 1, f"{victim.node} to be forgotten")
    finally:
        server.shutdown()
        monitor.stop()
