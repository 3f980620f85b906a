"""The record stores (SQLite here, Redis when it answers), unique-key claims under contention, and
the lifecycle's config and parsing. No broker needed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from helpers import ROOT, listening, unavailable
from conveyor.settings import environment
from conveyor.settings.config import Config, TimeLimit, load_config
from conveyor.errors import ConfigError, UsageError
from conveyor.lifecycle import commands, records, stores
from conveyor.tasks.states import TaskState
from conveyor.lifecycle.redis_store import RedisStore
from conveyor.lifecycle.sqlite_store import SqliteStore




@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "sqlite":
        made = SqliteStore(str(tmp_path / "records.sqlite3"), ttl_s=3600)
        yield made
        made.close()
        return
    if not listening(environment.DEFAULT_REDIS):
        unavailable("Redis on 127.0.0.1:6379")
    # A namespace of its own, whose keys are deleted afterwards: never another run's records.
    made = RedisStore("redis://127.0.0.1:6379/0", f"test-{uuid.uuid4().hex[:8]}", ttl_s=3600)
    yield made
    made.clear()
    made.close()


def new_id() -> str:
    return str(uuid.uuid4())


def test_a_record_follows_its_transitions_with_history_and_attempts(store):
    task_id = new_id()
    store.transition(task_id, TaskState.QUEUED, detail="sent", name="task_b", queue="queue_b", sent_at=1.0, soft_time_limit_s=1.0)
    store.transition(task_id, TaskState.RUNNING, attempt=1, count_attempt=True, worker="w-1@h", started_at=2.0)
    store.transition(task_id, TaskState.RETRYING, attempt=1, error="SoftTimeLimitExceeded: ran past", soft_time_limit_s=1.5)
    store.transition(task_id, TaskState.RUNNING, attempt=2, count_attempt=True, worker="w-2@h", started_at=3.0)
    store.transition(task_id, TaskState.SUCCEEDED, attempt=2, finished_at=4.0, error=None)
    record = store.get(task_id)
    assert (record.name, record.queue, record.status, record.attempts, record.worker) == ("task_b", "queue_b", TaskState.SUCCEEDED, 2, "w-2@h")
    assert (record.sent_at, record.started_at, record.finished_at) == (1.0, 3.0, 4.0)
    assert record.soft_time_limit_s == 1.5 and record.error is None  # None cleared the retry's error
    assert [(e.status, e.attempt) for e in record.history] == [
        (TaskState.QUEUED, None), (TaskState.RUNNING, 1), (TaskState.RETRYING, 1), (TaskState.RUNNING, 2), (TaskState.SUCCEEDED, 2)]
    assert [e.worker for e in record.history][1:4:2] == ["w-1@h", "w-2@h"]
    assert store.get(new_id()) is None


def test_query_filters_by_status_name_and_time_newest_first(store):
    ids = [new_id() for _ in range(5)]
    for i, task_id in enumerate(ids):
        store.transition(task_id, TaskState.QUEUED, name="task_a" if i % 2 else "task_b")
        time.sleep(0.002)  # distinct creation times, for the order
    store.transition(ids[1], TaskState.FAILED, error="boom")
    store.transition(ids[3], TaskState.DEAD_LETTERED)
    assert [r.id for r in store.query()] == ids[::-1]
    assert [r.id for r in store.query(limit=2)] == ids[:2:-1][:2]
    assert [r.id for r in store.query((TaskState.FAILED, TaskState.DEAD_LETTERED))] == [ids[3], ids[1]]
    assert [r.id for r in store.query(name="task_a")] == [ids[3], ids[1]]
    cutoff = store.get(ids[2]).updated_at
    assert {r.id for r in store.query(since=cutoff)} >= {ids[4]}
    assert ids[0] not in {r.id for r in store.query(since=cutoff)}


def test_a_unique_key_is_held_while_its_task_is_active_and_freed_when_it_is_not(store):
    key = f"report-{uuid.uuid4().hex[:6]}"
    first, second, third = new_id(), new_id(), new_id()
    assert store.claim(key, first, "task_a") == first
    assert store.get(first).status == TaskState.QUEUED and store.get(first).unique_key == key
    assert store.claim(key, second, "task_a") == first
    store.transition(first, TaskState.RUNNING, attempt=1)
    assert store.claim(key, second, "task_a") == first
    store.transition(first, TaskState.RETRYING, attempt=1)
    assert store.claim(key, second, "task_a") == first
    store.transition(first, TaskState.FAILED, error="boom")
    assert store.claim(key, second, "task_a") == second
    assert store.get(second).status == TaskState.QUEUED
    store.transition(second, TaskState.REVOKED)
    assert store.claim(key, third, "task_a") == third


def test_concurrent_claims_of_one_key_elect_exactly_one_task(store):
    key = f"race-{uuid.uuid4().hex[:6]}"
    candidates = [new_id() for _ in range(16)]
    winners: list[str] = []
    start = threading.Barrier(len(candidates))

    def claim(task_id: str) -> None:
        start.wait()
        winners.append(store.claim(key, task_id, "task_a"))

    threads = [threading.Thread(target=claim, args=(c,)) for c in candidates]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(winners) == len(candidates) and len(set(winners)) == 1 and winners[0] in candidates
    queued = [c for c in candidates if store.get(c) is not None]
    assert queued == [winners[0]]  # the losers left no record behind


def test_revoked_is_a_flag_that_later_status_writes_keep(store):
    task_id = new_id()
    store.transition(task_id, TaskState.RUNNING, attempt=1)
    assert not store.is_revoked(task_id)
    store.transition(task_id, TaskState.RUNNING, detail="revoke asked while running", revoked_at=time.time())
    store.transition(task_id, TaskState.RETRYING, attempt=1)  # the attempt ends in a retry: the retry must not run
    assert store.is_revoked(task_id) and not store.is_revoked(new_id())


def test_note_appends_history_without_changing_the_status(store):
    task_id = new_id()
    store.transition(task_id, TaskState.DEAD_LETTERED, error="boom")
    store.note(task_id, "purged from the dead-letter queue")
    store.note(new_id(), "no such record: nothing happens")
    record = store.get(task_id)
    assert record.status == TaskState.DEAD_LETTERED
    assert [(e.status, e.detail) for e in record.history][-1] == (TaskState.DEAD_LETTERED, "purged from the dead-letter queue")


def test_the_sqlite_store_is_shared_by_processes_on_this_machine(tmp_path):
    """Workers are other processes: a record written by a forked child is read by the parent."""
    path = str(tmp_path / "shared.sqlite3")
    task_id = new_id()
    parent = SqliteStore(path, ttl_s=3600)
    parent.transition(task_id, TaskState.QUEUED, name="task_a")  # the parent's connection exists before the fork
    # A bare fork, as billiard's prefork pool does: multiprocessing's after-fork hooks would make
    # kombu close, from the child, the AMQP connections this test process pooled in earlier tests.
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            parent.transition(task_id, TaskState.RUNNING, attempt=1, count_attempt=True, worker="child")
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    record = parent.get(task_id)
    assert (record.status, record.worker, record.attempts) == (TaskState.RUNNING, "child", 1)


def test_records_url_resolution(tmp_path):
    root = tmp_path
    assert environment.records_url({"RECORDS_URL": "off"}, False, root) == "off"
    assert environment.records_url({"RECORDS_URL": "redis://elsewhere:6380/2"}, False, root) == "redis://elsewhere:6380/2"
    # The embedded broker keeps everything in the run directory, records too.
    assert environment.records_url({}, True, root) == f"sqlite:///{root / 'records.sqlite3'}"
    # Never a network store found by probing, even with a Redis listening on 127.0.0.1:6379.
    assert environment.records_url({}, False, root) == f"sqlite:///{root / 'records.sqlite3'}"
    settings = environment.resolve({"BROKER_URL": "filesystem://", environment.RUN_DIR_ENV: str(root), "RECORDS_URL": "off"})
    assert settings.worker_env()["RECORDS_URL"] == "off"


def test_open_store_and_namespaces(tmp_path):
    assert stores.open_store("off") is None
    sqlite = stores.open_store(f"sqlite:///{tmp_path / 'r.sqlite3'}")
    assert isinstance(sqlite.inner, SqliteStore) and sqlite.inner.path == tmp_path / "r.sqlite3"
    with pytest.raises(ConfigError, match="none of redis://"):
        stores.open_store("mysql://nope")
    assert stores.namespace("amqp://guest:guest@127.0.0.1:5672/conveyor-test-1") == "conveyor-test-1"
    assert stores.namespace("amqp://guest:guest@127.0.0.1:5672//") == "default"
    assert stores.namespace("filesystem://localhost/") == "embedded"


def test_an_unreachable_redis_is_one_clear_error():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = RedisStore(f"redis://127.0.0.1:{port}/0", "nowhere", ttl_s=60)
    with pytest.raises(records.RecordStoreError, match=rf"127.0.0.1:{port}/0 did not answer .*RECORDS_URL"):
        store.get("x")


@pytest.mark.parametrize("text, seconds", [("30s", 30), ("10m", 600), ("2h", 7200), ("1d", 86400), ("1.5m", 90)])
def test_since_durations(text, seconds):
    assert commands.parse_since(text) == pytest.approx(time.time() - seconds, abs=1)


def test_since_times_and_nonsense():
    assert commands.parse_since("2025-01-31T14:00:00+00:00") == 1738332000
    with pytest.raises(UsageError, match="--since 'yesterday'"):
        commands.parse_since("yesterday")


def _config(tmp_path: Path, extra: str) -> Config:
    text = (ROOT / "test-config.yml").read_text() + extra
    (tmp_path / "c.yml").write_text(text)
    return load_config(tmp_path / "c.yml")


def test_time_limits_and_unique_keys_in_the_config(tmp_path):
    config = _config(tmp_path, "time_limits:\n  task_b: {soft_s: 1, hard_s: 2}\n")
    assert config.time_limits["task_b"] == TimeLimit(soft_s=1, hard_s=2, retry_factor=1.5)
    with pytest.raises(ConfigError, match=r"c.yml:\d+: time_limits.task_b: .*soft_s must be less than hard_s"):
        _config(tmp_path, "time_limits:\n  task_b: {soft_s: 2, hard_s: 2}\n")
    with pytest.raises(ConfigError, match=r"time_limits.task_c"):
        _config(tmp_path, "time_limits:\n  task_c: {soft_s: 1}\n")
    text = (ROOT / "test-config.yml").read_text().replace("count: 10\n    params: {duration_s: 0.1}",
                                                          "count: 10\n    unique_key: 'report-{day}'")
    (tmp_path / "u.yml").write_text(text)
    with pytest.raises(ConfigError, match=r"u.yml:\d+: tasks\[0\]: unique_key may use only the placeholder \{index\}"):
        load_config(tmp_path / "u.yml")


def test_time_limits_need_the_prefork_pool(tmp_path):
    text = (ROOT / "test-config.yml").read_text().replace(
        "queues: [queue_b]\n", "queues: [queue_b]\n    pool: threads\n") + "time_limits:\n  task_b: {soft_s: 1}\n"
    (tmp_path / "t.yml").write_text(text)
    with pytest.raises(ConfigError, match=r"services\[1\].pool: time_limits.task_b needs the prefork pool"):
        load_config(tmp_path / "t.yml")


@pytest.mark.parametrize("records_url, connected", [("off", False), ("sqlite:///records.db", True)])
def test_record_receivers_are_connected_only_for_an_app_with_records(tmp_path, records_url, connected):
    # In a fresh interpreter: signal receivers are per process, and this one has connected them.
    code = ("from celery.signals import before_task_publish, task_prerun\n"
            "from conveyor.settings import environment\nfrom conveyor.runtime.app import create_app\n"
            "create_app(None, environment.resolve())\n"
            "print(bool(before_task_publish.receivers), bool(task_prerun.receivers))\n")
    env = dict(os.environ, BROKER_URL="filesystem://", RECORDS_URL=records_url, PYTHONPATH=str(ROOT),
               **{environment.RUN_DIR_ENV: str(tmp_path)})
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(connected)] * 2
