"""Unit: the monitor's accounting on synthetic Celery events, and the three ways it is shown
(Prometheus exposition, InfluxDB lines, the dashboard). No broker needed."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from helpers import run_cli, write_config
from conveyor.settings.config import load_config
from conveyor.errors import ConfigError
from conveyor.monitor import dashboard, influx
from conveyor.monitor.accounting import Accounting
from conveyor.monitor.metrics import Buckets
from conveyor.stats import percentile_linear
from conveyor.monitor.prometheus import SnapshotCollector
from conveyor.monitor.snapshot import compose

T0 = 1_700_000_000.0
DL_EXCEPTION = "DeadLettered('SimulatedFailure: task_b failed attempt 4 on purpose', 4, 'queue_b')"


def ev(kind: str, uuid: str, at: float, **fields) -> dict:
    """An event as Celery's Receiver hands it over: sender timestamp plus local arrival time."""
    return {"type": kind, "uuid": uuid, "timestamp": T0 + at, "local_received": T0 + at + 0.001,
            "hostname": "worker-a-1@h", **fields}


def sent(uuid: str, at: float, name: str = "task_a", retries: int = 0, queue: str | None = None) -> dict:
    queue = queue or {"task_a": "queue_a", "task_b": "queue_b"}[name]
    return ev("task-sent", uuid, at, name=name, retries=retries, queue=queue, routing_key=queue, hostname="gen42@h")


def received(uuid: str, at: float, name: str = "task_a", retries: int = 0) -> dict:
    return ev("task-received", uuid, at, name=name, retries=retries, hostname="worker-a-1@h")


def heartbeat(host: str, at: float, active: int) -> dict:
    return {"type": "worker-heartbeat", "hostname": host, "timestamp": T0 + at, "local_received": T0 + at,
            "freq": 2.0, "active": active, "processed": 10}


def feed(acc: Accounting, events: list[dict]) -> None:
    for event in events:
        acc.record(event)


def series(acc: Accounting, now: float = 0.0) -> dict[tuple[str, tuple], float]:
    """The accounting's per-event series as exposition samples: (sample name, sorted labels) -> value."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: EMPTY_SNAPSHOT, lambda: acc.families(T0 + now)))
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples}


EMPTY_SNAPSHOT = {"queues": [], "workers": [], "services": [], "dead_letter": {"messages": None, "max_messages": None}}
A = (("name", "task_a"), ("queue_name", "queue_a"))


def by_name(acc: Accounting, now: float) -> dict[str, dict]:
    return {row["name"]: row for row in acc.tasks(T0 + now)}


# --- accounting -----------------------------------------------------------------------------
def test_a_retried_task_and_a_dead_lettered_one_are_counted_once_each():
    acc = Accounting(since=T0)
    feed(acc, [
        # task_a succeeds on its second attempt; the retry republishes with retries=1.
        sent("a1", 0.0), received("a1", 0.01), ev("task-started", "a1", 0.02),
        sent("a1", 0.10, retries=1), ev("task-retried", "a1", 0.11), received("a1", 0.12, retries=1),
        ev("task-started", "a1", 1.10), ev("task-succeeded", "a1", 1.20, runtime=0.1),
        # task_b fails all four attempts and is published to the dead-letter queue.
        sent("b1", 0.0, "task_b"), received("b1", 0.01, "task_b"),
        *[e for n in range(3) for e in (ev("task-started", "b1", 1 + n), ev("task-retried", "b1", 1.5 + n),
                                           sent("b1", 1.5 + n, "task_b", retries=n + 1))],
        ev("task-started", "b1", 4.0),
        sent("b1", 4.5, "task_b", retries=3, queue="dead_letter"),
        ev("task-failed", "b1", 4.6, exception=DL_EXCEPTION),
    ])
    rows = by_name(acc, 5.0)
    a, b = rows["task_a"], rows["task_b"]
    assert (a["sent"], a["received"], a["started"], a["succeeded"], a["retried"], a["failed"]) == (1, 2, 2, 1, 1, 0)
    assert (b["sent"], b["started"], b["retried"], b["failed"], b["dead_lettered"], b["succeeded"]) == (1, 4, 3, 1, 1, 0)
    assert a["queue"] == "queue_a" and b["queue"] == "queue_b"
    assert a["latency_p50_s"] == pytest.approx(1.20) and b["latency_p50_s"] is None
    assert a["retrying"] == b["retrying"] == 0


def test_a_plain_failure_is_failed_but_not_dead_lettered():
    acc = Accounting(since=T0)
    feed(acc, [sent("x", 0), received("x", 0.1), ev("task-started", "x", 0.2),
               ev("task-failed", "x", 0.3, exception="TimeLimitExceeded(5.0)")])
    row = by_name(acc, 1)["task_a"]
    assert (row["failed"], row["dead_lettered"]) == (1, 0)


def test_a_message_rejected_without_requeue_is_dead_lettered_by_the_broker():
    acc = Accounting(since=T0)
    feed(acc, [sent("j", 0), received("j", 0.1), ev("task-started", "j", 0.2),
               ev("task-failed", "j", 0.3, exception="Reject('dead-letter publish failed: ...', False)"),
               ev("task-rejected", "j", 0.3, requeue=False),
               sent("k", 0), received("k", 0.1), ev("task-rejected", "k", 0.2, requeue=True)])
    row = by_name(acc, 1)["task_a"]
    assert (row["failed"], row["rejected"], row["dead_lettered"]) == (1, 2, 1)


def test_retry_backlog_counts_tasks_waiting_for_their_next_attempt():
    acc = Accounting(since=T0)
    feed(acc, [sent("r", 0), received("r", 0), ev("task-started", "r", 0.1), ev("task-retried", "r", 0.2)])
    assert by_name(acc, 0.3)["task_a"]["retrying"] == 1
    acc.record(ev("task-started", "r", 2.2))
    assert by_name(acc, 2.3)["task_a"]["retrying"] == 0
    acc.record(ev("task-retried", "r", 2.4))
    assert by_name(acc, 2.5)["task_a"]["retrying"] == 1
    acc.record(ev("task-revoked", "r", 2.6))
    assert by_name(acc, 2.7)["task_a"]["retrying"] == 0


def test_events_arriving_out_of_order_are_counted_the_same():
    """As observed on RabbitMQ: task-received before task-sent, the next attempt's task-started
    before the previous attempt's task-retried, and a task-retried after the final success."""
    acc = Accounting(since=T0)
    feed(acc, [
        received("o", 0.01), ev("task-started", "o", 0.02), sent("o", 0.0),
        ev("task-started", "o", 0.05),  # second attempt (countdown 0), ahead of...
        ev("task-succeeded", "o", 0.06, runtime=0.01),
        ev("task-retried", "o", 0.03),  # ...the first attempt's retry, which comes last
        # success reported before the client's own task-sent: latency is still measured
        received("p", 0.01), ev("task-started", "p", 0.02), ev("task-succeeded", "p", 0.5, runtime=0.4), sent("p", 0.1),
    ])
    row = by_name(acc, 1)["task_a"]
    assert (row["sent"], row["started"], row["retried"], row["succeeded"], row["retrying"]) == (2, 3, 1, 2, 0)
    assert series(acc)["conveyor_task_latency_seconds_count", A] == 2
    # The wait is first send to first start, observed whichever of the two arrived last.
    assert series(acc)["conveyor_task_wait_seconds_count", A] == 2
    assert series(acc)["conveyor_task_wait_seconds_sum", A] == pytest.approx(0.02)  # p: started before it was sent (clock skew), so 0
    # both latencies (0.06 s and 0.4 s) are in: interpolated p50 halfway, p95 near the larger
    assert (row["latency_p50_s"], row["latency_p95_s"]) == (pytest.approx(0.23), pytest.approx(0.383))


def test_a_task_requeued_from_the_dead_letter_queue_counts_as_sent_again():
    acc = Accounting(since=T0)
    feed(acc, [sent("d", 0), ev("task-started", "d", 0.1), ev("task-failed", "d", 0.2, exception=DL_EXCEPTION),
               sent("d", 5.0), received("d", 5.1), ev("task-started", "d", 5.2), ev("task-succeeded", "d", 5.3, runtime=0.1)])
    row = by_name(acc, 6)["task_a"]
    assert (row["sent"], row["failed"], row["dead_lettered"], row["succeeded"]) == (2, 1, 1, 1)
    assert row["latency_p50_s"] == pytest.approx(0.3)  # from the second send, not the first


def test_events_of_tasks_sent_before_the_monitor_started_are_not_guessed():
    acc = Accounting(since=T0)
    feed(acc, [ev("task-started", "old", 0.1), ev("task-succeeded", "old", 0.2, runtime=0.1)])
    assert all(row["succeeded"] == 0 for row in acc.tasks(T0 + 1))


def test_rate_is_tasks_finished_per_second_over_the_window():
    acc = Accounting(rate_window_s=5.0, since=T0)
    for i in range(20):  # 10 tasks finish in the first 5 s, 10 in the next 5 s
        feed(acc, [sent(f"t{i}", i * 0.5), ev("task-succeeded", f"t{i}", i * 0.5 + 0.2, runtime=0.1)])
    assert by_name(acc, 10.0)["task_a"]["rate_per_s"] == pytest.approx(2.0)
    assert by_name(acc, 30.0)["task_a"]["rate_per_s"] == 0.0
    young = Accounting(rate_window_s=5.0, since=T0)  # running for 1 s only: divide by 1, not 5
    feed(young, [sent("y", 0.1), ev("task-succeeded", "y", 0.5, runtime=0.1)])
    assert by_name(young, 1.0)["task_a"]["rate_per_s"] == pytest.approx(1.0)


def test_latency_percentiles_are_over_the_latest_window():
    acc = Accounting(latency_window_tasks=10, since=T0)
    for i in range(30):  # latencies 0.01 .. 0.30; only the latest 10 (0.21 .. 0.30) count
        feed(acc, [sent(f"l{i}", i), ev("task-succeeded", f"l{i}", i + (i + 1) / 100, runtime=0.001)])
    row = by_name(acc, 40)["task_a"]
    assert row["latency_p50_s"] == pytest.approx(0.255) and row["latency_p95_s"] == pytest.approx(0.2955)  # linear
    assert series(acc, 40)["conveyor_task_latency_seconds_count", A] == 30


def test_the_monitor_and_the_load_test_report_the_same_percentile():
    # One definition (linear interpolation, conveyor/stats.py): the dashboard's p95 of a set of
    # latencies is the load-test report's p95 of the same set, not a nearest-rank neighbour of it.
    acc = Accounting(since=T0)
    latencies = [(i % 7 + 1) / 10 for i in range(20)]
    feed(acc, [e for i, lat in enumerate(latencies)
               for e in (sent(f"p{i}", i), ev("task-succeeded", f"p{i}", i + lat, runtime=0.001))])
    row = by_name(acc, 40)["task_a"]
    assert row["latency_p50_s"] == pytest.approx(percentile_linear(latencies, 50), abs=1e-3)
    assert row["latency_p95_s"] == pytest.approx(percentile_linear(latencies, 95), abs=1e-3)
    assert row["latency_p95_s"] == pytest.approx(0.7)


def test_active_tasks_come_from_current_heartbeats():
    acc = Accounting(since=T0, worker_down_after_s=5)
    feed(acc, [heartbeat("worker-a-1@h", 0, 2), heartbeat("worker-a-2@h", 0, 1), heartbeat("worker-b-1@h", 0, 3),
               heartbeat("worker-a-1@h", 9, 1),
               {"type": "worker-offline", "hostname": "worker-b-1@h", "timestamp": T0 + 9, "local_received": T0 + 9}])
    workers = {w["hostname"]: w for w in acc.workers(T0 + 10)}
    assert set(workers) == {"worker-a-1@h", "worker-a-2@h"}
    assert workers["worker-a-1@h"] == {"hostname": "worker-a-1@h", "service": "worker-a", "alive": True,
                                       "tasks_active": 1, "processed": 10}
    assert workers["worker-a-2@h"]["alive"] is False  # last heard 10 s ago, down after 5


def test_a_silent_worker_is_down_after_the_interval_then_forgotten_with_its_hosts_series():
    acc = Accounting(since=T0, worker_down_after_s=6, worker_forget_after_s=60)
    feed(acc, [heartbeat("worker-a-1@h1", 0, 1), heartbeat("worker-a-2@h2", 0, 0),
               sent("x", 0), ev("task-started", "x", 0.1, hostname="worker-a-1@h1"),
               ev("task-succeeded", "x", 0.2, hostname="worker-a-1@h1", runtime=0.1),
               heartbeat("worker-a-2@h2", 50, 0)])
    h1 = tuple(sorted((*A, ("hostname", "h1"))))
    assert {w["hostname"]: w["alive"] for w in acc.workers(T0 + 6)} == {"worker-a-1@h1": True, "worker-a-2@h2": True}
    assert {w["hostname"]: w["alive"] for w in acc.workers(T0 + 6.5)} == {"worker-a-1@h1": False, "worker-a-2@h2": True}
    assert series(acc, 59)["celery_task_succeeded_total", h1] == 1
    # 60 s after its last heartbeat the worker is gone, and with it the series of h1, its only host.
    assert [w["hostname"] for w in acc.workers(T0 + 61)] == ["worker-a-2@h2"]
    assert not any(dict(labels).get("hostname") == "h1" for _, labels in series(acc, 61))
    assert by_name(acc, 61)["task_a"]["succeeded"] == 1  # the monitor's own totals are not purged


def test_failures_are_labelled_with_the_exception_class_and_every_counter_starts_at_zero():
    acc = Accounting(since=T0)
    feed(acc, [sent("f", 0), received("f", 0.1), ev("task-started", "f", 0.2, hostname="worker-a-1@h"),
               ev("task-failed", "f", 0.3, hostname="worker-a-1@h", exception="ValueError('bad input')"),
               sent("g", 0), ev("task-failed", "g", 0.3, hostname="worker-a-1@h", exception="no repr here")])
    got = series(acc)
    on_h = (("hostname", "h"), *A)
    assert got["celery_task_failed_total", tuple(sorted((*on_h, ("exception", "ValueError"))))] == 1
    assert got["celery_task_failed_total", tuple(sorted((*on_h, ("exception", "UnknownException"))))] == 1
    assert got["celery_task_failed_total", tuple(sorted((*on_h, ("exception", ""))))] == 0
    assert got["celery_task_succeeded_total", tuple(sorted(on_h))] == 0  # shown, so ratios have both sides
    assert got["celery_task_sent_total", tuple(sorted(on_h))] == 2  # the test events' sender is on h too


def test_buckets_are_cumulative_with_le_bounds():
    buckets = Buckets((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        buckets.observe(value)
    assert buckets.cumulative() == [(0.1, 2), (1.0, 3), (math.inf, 4)]
    assert buckets.total == pytest.approx(3.65)


# --- the snapshot and its three renderings ---------------------------------------------------
BROKER_SAMPLE = {
    "backend": "local", "sampled_at": T0 + 9,
    "services": [{"name": "worker-a", "queues": ["queue_a"], "replicas_desired": 2, "replicas_running": 2, "workers_responding": 2},
                 {"name": "worker-b", "queues": ["queue_b"], "replicas_desired": 1, "replicas_running": 0, "workers_responding": 0}],
    "queues": [{"name": "queue_a", "messages_ready": 7, "messages_unacked": 1, "consumers": 2, "publish_rate_per_s": 1.5, "deliver_rate_per_s": 1.7},
               {"name": "queue_b", "messages_ready": 0, "messages_unacked": None, "consumers": 0, "publish_rate_per_s": None, "deliver_rate_per_s": None},
               {"name": "dead_letter", "messages_ready": 1, "messages_unacked": 0, "consumers": 0, "publish_rate_per_s": 0.0, "deliver_rate_per_s": 0.0}],
}


@pytest.fixture
def snapshot_parts():
    acc = Accounting(since=T0)
    feed(acc, [sent("a", 0), received("a", 0.1), ev("task-started", "a", 0.2), ev("task-succeeded", "a", 0.4, runtime=0.15),
               sent("r", 0), ev("task-started", "r", 0.1), ev("task-retried", "r", 0.2),
               sent("b", 0, "task_b"), ev("task-started", "b", 0.1), ev("task-failed", "b", 0.2, exception=DL_EXCEPTION),
               heartbeat("worker-a-1@h", 9.5, 2), heartbeat("worker-a-2@h", 9.5, 1)])
    return acc, compose(BROKER_SAMPLE, acc, now=T0 + 10)


def test_the_snapshot_joins_broker_figures_and_event_totals(snapshot_parts):
    _, snap = snapshot_parts
    queues = {q["name"]: q for q in snap["queues"]}
    assert queues["queue_a"]["retry_backlog"] == 1 and queues["queue_a"]["dead_lettered"] == 0
    assert queues["queue_b"]["dead_lettered"] == 1 and queues["dead_letter"]["retry_backlog"] is None
    assert [s["tasks_active"] for s in snap["services"]] == [3, 0]
    assert snap["sampled_at"] == T0 + 9 and snap["counting_since"] == T0 and snap["error"] is None


def test_prometheus_exposition_parses_with_the_celery_exporter_names(snapshot_parts):
    acc, snap = snapshot_parts
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: snap, lambda: acc.families(T0 + 10)))
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    a, b = (("name", "task_a"), ("queue_name", "queue_a")), (("name", "task_b"), ("queue_name", "queue_b"))
    ha, hb = (tuple(sorted((*labels, ("hostname", "h")))) for labels in (a, b))
    assert samples["celery_task_sent_total", ha] == 2 and samples["celery_task_succeeded_total", ha] == 1
    assert samples["celery_task_retried_total", ha] == 1
    assert samples["celery_task_failed_total", tuple(sorted((*hb, ("exception", "DeadLettered"))))] == 1
    assert samples["conveyor_task_dead_lettered_total", b] == 1
    assert families["celery_task_runtime"].type == "histogram"
    assert samples["celery_task_runtime_bucket", tuple(sorted((*ha, ("le", "0.25"))))] == 1
    assert samples["celery_task_runtime_count", ha] == 1
    assert samples["celery_queue_length", (("queue_name", "queue_a"),)] == 7
    assert ("conveyor_queue_messages_unacked", (("queue_name", "queue_b"),)) not in samples  # unknown is absent, not 0
    assert samples["conveyor_queue_retry_backlog", (("queue_name", "queue_a"),)] == 1
    assert samples["celery_worker_tasks_active", (("hostname", "worker-a-1@h"),)] == 2
    # Both worker-a replicas are up and consume queue_a; worker-b has none up.
    assert samples["celery_active_worker_count", (("queue_name", "queue_a"),)] == 2
    assert samples["celery_active_process_count", (("queue_name", "queue_a"),)] == 2  # no concurrency known: 1 each
    assert samples["celery_active_worker_count", (("queue_name", "queue_b"),)] == 0
    assert samples["conveyor_dead_letter_messages", ()] == 1
    assert samples["conveyor_service_replicas", (("service", "worker-b"), ("state", "desired"))] == 1


def test_influx_lines_escape_type_and_omit_unknowns(snapshot_parts):
    _, snap = snapshot_parts
    lines = influx.lines(snap)
    stamp = f" {int((T0 + 10) * 1000) * 1_000_000}"
    assert all(line.endswith(stamp) for line in lines)
    task_a = next(line for line in lines if line.startswith("celery_task,name=task_a,queue_name=queue_a "))
    assert "sent=2i" in task_a and "succeeded=1i" in task_a and "retrying=1i" in task_a and "rate_per_s=" in task_a
    queue_b = next(line for line in lines if line.startswith("celery_queue,queue_name=queue_b "))
    assert "messages_unacked" not in queue_b and "messages_ready=0i" in queue_b
    assert influx.line("m x", {"t,k": "a=b c"}, {"f": 'say "hi"', "n": None}, 1.0) == \
        'm\\ x,t\\,k=a\\=b\\ c f="say \\"hi\\"" 1000000000'
    assert influx.line("m", {}, {"n": None}, 1.0) is None


def test_influx_emitter_writes_only_on_flush(tmp_path, snapshot_parts):
    _, snap = snapshot_parts
    out = tmp_path / "metrics.lp"
    emitter = influx.Emitter(str(out))
    emitter.add(snap)
    emitter.add(snap)
    assert out.read_text() == ""
    assert emitter.flush() == 2 * len(influx.lines(snap)) and emitter.flush() == 0
    assert len(out.read_text().splitlines()) == 2 * len(influx.lines(snap))


def test_dashboard_draws_the_snapshot_figures(snapshot_parts):
    _, snap = snapshot_parts
    console = Console(record=True, width=160)
    console.print(dashboard.render(snap, "local stack"))
    rows = {line.split()[0]: line.split() for line in console.export_text().splitlines() if line.strip()}
    assert rows["task_a"][:8] == ["task_a", "queue_a", "2", "1", "1", "0", "0", "1"]  # sent .. retrying
    assert rows["task_b"][:7] == ["task_b", "queue_b", "1", "0", "0", "1", "1"]
    assert rows["queue_a"][:8] == ["queue_a", "7", "1", "2", "1.5", "1.7", "1", "0"]
    assert rows["queue_b"][2] == "-"  # unknown unacked
    assert rows["worker-a"][:5] == ["worker-a", "queue_a", "2/2", "2", "3"]


def test_the_monitor_warns_once_the_dead_letter_queue_is_80_percent_full():
    acc = Accounting(since=T0)

    def snapshot_with(held: int) -> dict:
        queues = [dict(q, messages_ready=held) if q["name"] == "dead_letter" else q for q in BROKER_SAMPLE["queues"]]
        return compose({**BROKER_SAMPLE, "queues": queues, "dead_letter_max_messages": 1000}, acc, now=T0 + 10)

    assert snapshot_with(799)["warnings"] == []
    full = snapshot_with(800)
    assert full["warnings"] == ["the dead-letter queue is 80 % full (800 of dead_letter.max_length 1,000); full, it "
                                "refuses new dead letters: requeue or purge it (python -m conveyor dlq)"]
    console = Console(record=True, width=200)
    console.print(dashboard.render(full, "local stack"))
    assert "warning: the dead-letter queue is 80 % full" in console.export_text()


# --- configuration and command line ------------------------------------------------------------
BASE = """\
name: t
expected_workers: 1
tasks: [{task: task_a, count: 1}]
services: [{name: worker-a, queues: [queue_a]}]
"""


def test_monitoring_defaults_and_overrides(tmp_path):
    assert load_config(write_config(tmp_path / "a.yml", BASE)).monitoring.model_dump() == {
        "collect_interval_s": 5.0, "emit_interval_s": 60.0, "refresh_interval_s": 1.0, "prometheus_host": "127.0.0.1",
        "prometheus_port": 9808, "influx": None, "latency_window_tasks": 1000,
        "worker_down_after_s": 10.0, "worker_forget_after_s": 1800.0}
    cfg = load_config(write_config(tmp_path / "b.yml", BASE + "monitoring: {collect_interval_s: 1, prometheus_port: null}\n"))
    assert cfg.monitoring.collect_interval_s == 1 and cfg.monitoring.prometheus_port is None


def test_monitoring_errors_name_the_line_and_field(tmp_path):
    path = write_config(tmp_path / "c.yml", BASE + "monitoring:\n  collect_interval_s: 10\n  emit_interval_s: 5\n")
    with pytest.raises(ConfigError, match=r"c\.yml:5: monitoring: emit_interval_s must be at least collect_interval_s"):
        load_config(path)
    path = write_config(tmp_path / "d.yml", BASE + "monitoring:\n  colect_interval_s: 10\n")
    with pytest.raises(ConfigError, match=r"d\.yml:6: monitoring\.colect_interval_s: unknown key"):
        load_config(path)


@pytest.mark.parametrize("args, message", [
    (["--json"], "--json needs --once"),
    (["--once", "--json", "--influx", "-"], "would share stdout"),
    (["--port", "70000"], "--port must be between 0 and 65535"),
])
def test_command_line_mistakes_are_one_line(args, message):
    proc = run_cli("monitor.py", *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_the_dead_letter_bound_is_the_brokers_max_length_where_it_sets_one():
    from conveyor.monitor.snapshot import max_length

    assert max_length({"arguments": {"x-max-length": 500}, "effective_policy_definition": {"max-length": 200}}) == 200
    assert max_length({"arguments": {"x-max-length": 500}, "effective_policy_definition": {}}) == 500
    assert max_length({"arguments": {}, "effective_policy_definition": None}) is None  # the config's bound then
