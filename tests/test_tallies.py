"""Unit: the task tallies kept in the record store (conveyor/lifecycle/tallies.py), written in
batches (lifecycle/guarded.py) and read back by the monitor (conveyor/monitor/tallied.py). A real
SQLite store; no broker."""

from __future__ import annotations

import threading

from prometheus_client.samples import Sample

from conveyor.lifecycle import tallies
from conveyor.lifecycle.guarded import GuardedStore
from conveyor.lifecycle.sqlite_store import SqliteStore
from conveyor.monitor import tallied
from conveyor.monitor.accounting import Accounting
from conveyor.tasks.states import TaskState


class CountingSqliteStore(SqliteStore):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[int] = []
        self.lock = threading.Lock()

    def write_many(self, writes, counts, samples) -> None:
        with self.lock:
            self.batches.append(len(writes))
        super().write_many(writes, counts, samples)


def samples_of(families) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in families:
        for sample in family.samples:
            assert isinstance(sample, Sample)
            out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_writes_are_batched_in_order_and_flush_writes_them_at_once(tmp_path):
    inner = CountingSqliteStore(str(tmp_path / "records.db"), ttl_s=600)
    store = GuardedStore(inner, retry_after_s=1)
    for i in range(300):
        store.transition(f"t{i}", TaskState.QUEUED, detail="sent", name="task_a")
        store.transition(f"t{i}", TaskState.RUNNING, attempt=1, count_attempt=True, detail="started")
        store.transition(f"t{i}", TaskState.SUCCEEDED, attempt=1, detail="done")
    assert store.flush() is True and store.queued == 0
    # 900 writes in a handful of transactions, not 900 (the writer thread and the flush share them).
    assert sum(inner.batches) == 900 and len(inner.batches) <= 900 // 100
    record = inner.get("t299")
    assert record.status == TaskState.SUCCEEDED and record.attempts == 1
    assert [e.status for e in record.history] == [TaskState.QUEUED, TaskState.RUNNING, TaskState.SUCCEEDED]


def test_stored_tallies_become_the_exporters_series_and_the_monitors_totals(tmp_path):
    store = GuardedStore(SqliteStore(str(tmp_path / "records.db"), ttl_s=600), retry_after_s=1)
    for _ in range(3):
        tallies.count(store, "sent", "task_a", "caller", "queue_a")
        tallies.count(store, "received", "task_a", "h1", "queue_a")
        tallies.Batch().count("started", "task_a", "h1", "queue_a").count("started_first", "task_a", "h1", "queue_a") \
            .add_to(store)
    tallies.Batch().count("succeeded", "task_a", "h1", "queue_a").observe("runtime", "task_a", "h1", "queue_a", 0.02) \
        .observe("latency", "task_a", "", "queue_a", 0.3).add_to(store)
    tallies.count(store, "retried", "task_a", "h1", "queue_a")  # waits for its next attempt
    tallies.count(store, "failed", "task_a", "h1", "queue_a", exception="DeadLettered")
    tallies.count(store, "dead_lettered", "task_a", "h1", "queue_a")
    assert store.flush()

    found = tallied.load(*store.tallies())
    accounting = Accounting(types=[("task_a", "queue_a"), ("task_b", "queue_b")])
    accounting.use_tallies(found)
    [row] = [r for r in accounting.tasks() if r["name"] == "task_a"]
    assert {k: row[k] for k in ("sent", "received", "started", "succeeded", "retried", "failed", "dead_lettered",
                                "retrying")} == {"sent": 3, "received": 3, "started": 3, "succeeded": 1, "retried": 1,
                                                 "failed": 1, "dead_lettered": 1, "retrying": 1}
    assert row["latency_p50_s"] == 0.3
    got = samples_of(accounting.families())
    h1 = (("hostname", "h1"), ("name", "task_a"), ("queue_name", "queue_a"))
    assert got["celery_task_sent_total", (("hostname", "caller"), ("name", "task_a"), ("queue_name", "queue_a"))] == 3
    assert got["celery_task_received_total", h1] == 3 and got["celery_task_succeeded_total", h1] == 1
    assert got["celery_task_revoked_total", h1] == 0  # shown at 0, as the exporter does, once the worker counted
    assert got["celery_task_failed_total", (("exception", "DeadLettered"), *h1)] == 1
    assert got["celery_task_runtime_bucket", (*h1[:1], ("le", "0.025"), *h1[1:])] == 1
    assert got["celery_task_runtime_bucket", (*h1[:1], ("le", "0.01"), *h1[1:])] == 0
    assert got["celery_task_runtime_count", h1] == 1 and got["celery_task_runtime_sum", h1] == 0.02
    assert got["conveyor_task_latency_seconds_count", (("name", "task_a"), ("queue_name", "queue_a"))] == 1
    assert got["conveyor_task_dead_lettered_total", (("name", "task_a"), ("queue_name", "queue_a"))] == 1


def test_task_events_are_not_counted_twice_once_tallies_are_read():
    accounting = Accounting(types=[("task_a", "queue_a")])
    accounting.use_tallies(tallied.load({}, {}))
    accounting.record({"type": "task-sent", "uuid": "u1", "name": "task_a", "queue": "queue_a", "retries": 0,
                       "timestamp": 1.0, "hostname": "gen1@h"})
    [row] = accounting.tasks()
    assert row["sent"] == 0


def test_unknown_keys_are_skipped():
    assert list(tallies.parse({"something-else": 1.0, tallies.key("sent", "a", "h", "q"): 2.0})) == [
        tallies.Tally("sent", "a", "h", "q", "", 2.0)]


def test_samples_kept_while_the_store_is_away_stay_within_what_the_store_keeps(tmp_path):
    from conveyor.lifecycle.records import SAMPLES_KEPT

    store = GuardedStore(SqliteStore(str(tmp_path / "records.db"), ttl_s=600), retry_after_s=60)
    store.breaker.failed(RuntimeError("away"))  # the writer thread leaves the queue alone meanwhile
    for i in range(3 * SAMPLES_KEPT):
        tallies.Batch().observe("latency", "task_a", "", "queue_a", float(i)).add_to(store)
    [kept] = store._samples.values()
    assert kept == [float(i) for i in range(2 * SAMPLES_KEPT, 3 * SAMPLES_KEPT)]
    assert store._counts[tallies.key("latency", "task_a", "", "queue_a", tallies.SUM)] == sum(range(3 * SAMPLES_KEPT))


def test_a_sample_key_is_trimmed_now_and_then_and_reads_give_its_latest_values(tmp_path, monkeypatch):
    from conveyor.lifecycle import sqlite_store
    from conveyor.lifecycle.records import SAMPLES_KEPT

    store = SqliteStore(str(tmp_path / "records.db"), ttl_s=600)
    key = tallies.key("latency", "task_a", "", "queue_a")
    rows = lambda: store.db.execute("SELECT count(*) FROM samples WHERE name = ?", (key,)).fetchone()[0]  # noqa: E731
    monkeypatch.setattr(sqlite_store, "TRIM_EVERY_S", 3600.0)
    for i in range(3 * SAMPLES_KEPT // 100):  # batches within one trimming period: trimmed once, at the first
        store.add_tallies({}, {key: [float(v) for v in range(100 * i, 100 * (i + 1))]})
    assert rows() == 3 * SAMPLES_KEPT, "untrimmed between trims"
    assert store.tallies()[1][key] == [float(v) for v in range(2 * SAMPLES_KEPT, 3 * SAMPLES_KEPT)]
    monkeypatch.setattr(sqlite_store, "TRIM_EVERY_S", 0.0)
    store.add_tallies({}, {key: [-1.0]})
    assert rows() == SAMPLES_KEPT and store.tallies()[1][key][-2:] == [3 * SAMPLES_KEPT - 1.0, -1.0]
