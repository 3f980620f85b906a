"""The task lifecycle against the real RabbitMQ with real worker processes: records through retries
and a worker restart, escalating time limits, unique keys, dead-letter redrive and durable revokes.

One local stack serves the whole module (starting workers is most of the cost); a test that changes
its shape puts it back."""

from __future__ import annotations

import json
import uuid

import pytest
from celery.exceptions import TaskRevokedError

from helpers import module_stack, queue_depth, run_cli, settled, statuses, wait_for, write_config
from conveyor.tasks import deadletter
from conveyor.amqp import queues
from conveyor.settings.config import TaskSpec
from conveyor.dispatch.dispatcher import dispatch
from conveyor.lifecycle import stores
from conveyor.tasks.states import TaskState
from conveyor.lifecycle.unique import Dispatched, send_unique
from conveyor.tasks.deadletter import DeadLettered
from conveyor.stack.control import service_of
from helpers.events import EventLog
from conveyor.settings.context import settings_of

pytestmark = pytest.mark.broker

CONFIG = """\
name: lifecycle
expected_workers: 2
tasks: [{task: task_a, count: 1}]
retry: {max_retries: 1, backoff_s: 1, backoff_max_s: 2, jitter: false}
services:
  - {name: worker-a, queues: [queue_a], concurrency: 2, replicas: 1}
  - {name: worker-b, queues: [queue_b], concurrency: 2, replicas: 1}
time_limits:
  task_b: {soft_s: 0.6, hard_s: 3}
stop_grace_s: 10
tuning: {task_events: true}  # some tests read Celery's task events, as Flower does
"""


@pytest.fixture(scope="module")
def stack(rabbitmq_url, tmp_path_factory):
    home = tmp_path_factory.mktemp("lifecycle")
    config_file = write_config(home / "lifecycle.yml", CONFIG)
    # The CLI (run_cli) reads the same config and, with RECORDS_URL unset, the same record store.
    with module_stack(rabbitmq_url, home / "run", config_file, CONVEYOR_CONFIG=str(config_file), RECORDS_URL=None) as workers:
        yield workers


@pytest.fixture
def store(stack):
    return stores.require_store(stack.app)


def tasks_cli(*args: str):
    proc = run_cli("-m", "conveyor", *args, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_records_follow_a_task_through_a_retry_and_survive_a_worker_restart(stack, store):
    app = stack.app
    result = app.send_task("task_a", kwargs={"duration_s": 0, "fail_first": 1})
    assert result.get(timeout=30)["retries"] == 1
    record = settled(store, result.id, TaskState.SUCCEEDED)
    assert statuses(record) == [TaskState.QUEUED, TaskState.RUNNING, TaskState.RETRYING, TaskState.RUNNING, TaskState.SUCCEEDED]
    assert record.attempts == 2 and service_of(record.worker) == "worker-a" and record.queue == "queue_a"
    assert record.history[2].detail.startswith("attempt 1 failed (SimulatedFailure: task_a failed attempt 1 on purpose")
    assert record.sent_at <= record.started_at <= record.finished_at

    stack.down()
    # Sent while no worker runs: the record says queued, and the restarted workers take it from there.
    waiting = app.send_task("task_b", kwargs={"duration_s": 0})
    assert store.get(waiting.id).status == TaskState.QUEUED
    stack.up(wait_s=60)
    assert waiting.get(timeout=30)["task"] == "task_b"
    assert statuses(settled(store, waiting.id, TaskState.SUCCEEDED)) == [TaskState.QUEUED, TaskState.RUNNING, TaskState.SUCCEEDED]
    shown = json.loads(tasks_cli("tasks", "show", result.id, "--json").stdout)
    assert shown["status"] == TaskState.SUCCEEDED and [e["status"] for e in shown["history"]] == statuses(record)
    listed = json.loads(tasks_cli("tasks", "list", "--status", "succeeded", "--since", "5m", "--json").stdout)
    assert {result.id, waiting.id} <= {r["id"] for r in listed}


def test_a_timed_out_task_is_retried_under_a_longer_limit_and_succeeds(stack, store):
    # task_b: soft 0.6 s, hard 3 s. A 0.8 s run times out once, then finishes under 0.9 s (x1.5).
    result = stack.app.send_task("task_b", kwargs={"duration_s": 0.8})
    value = result.get(timeout=30)
    assert value["retries"] == 1 and value["execution_time_s"] >= 0.8
    record = settled(store, result.id, TaskState.SUCCEEDED)
    assert statuses(record) == [TaskState.QUEUED, TaskState.RUNNING, TaskState.RETRYING, TaskState.RUNNING, TaskState.SUCCEEDED]
    first, retry, second = record.history[1:4]
    assert first.detail.endswith("time limits: soft 0.6 s, hard 3 s")
    assert "SoftTimeLimitExceeded: ran past its soft time limit of 0.6 s" in retry.detail
    assert "soft 0.9 s, hard 4.5 s" in retry.detail and "1.5x longer" in retry.detail
    # Written by the worker from the limits the retried message carried.
    assert second.detail.endswith("time limits: soft 0.9 s, hard 4.5 s")
    assert (record.soft_time_limit_s, record.time_limit_s) == (0.9, 4.5)


def test_a_hard_timeout_is_retried_under_a_longer_limit_then_dead_lettered(stack, store):
    app = stack.app
    # Long enough for the pool process to record its start before it is killed, even on a busy machine.
    result = app.send_task("task_a", kwargs={"duration_s": 10}, time_limit=2)
    with pytest.raises(DeadLettered) as raised:
        result.get(timeout=40)
    assert raised.value.attempts == 2
    record = settled(store, result.id, TaskState.DEAD_LETTERED)
    assert statuses(record) == [TaskState.QUEUED, TaskState.RUNNING, TaskState.RETRYING, TaskState.RUNNING, TaskState.DEAD_LETTERED]
    retry = record.history[2].detail
    assert retry.startswith("attempt 1 failed (TimeLimitExceeded: ran past its hard time limit of 2 s and was killed)")
    assert retry.endswith("time limits: hard 3 s; the attempt timed out, so its retry gets limits 1.5x longer")
    assert record.history[3].detail == "attempt 2 started; time limits: hard 3 s"
    assert record.error == "TimeLimitExceeded: ran past its hard time limit of 3 s and was killed"
    letter = wait_for(lambda: deadletter.sift(app, lambda d: d.task_id == result.id), 10, "its dead letter")[0]
    assert (letter.attempts, letter.original_queue) == (2, "queue_a")
    # Acknowledged once dead-lettered, not requeued: nothing of it is left in the queue.
    wait_for(lambda: queues.stats(app, ["queue_a"])[0].messages_unacked == 0, 15, "queue_a to have nothing unacked")
    assert queue_depth(app, "queue_a") == 0


def test_a_unique_key_sends_one_task_until_it_fails_then_a_new_one(stack, store):
    app = stack.app
    key = f"nightly-{uuid.uuid4().hex[:8]}"
    # Fails twice (0.5 s, retry 1 s later, 0.5 s), so it holds the key for about two seconds.
    first = send_unique(app, "task_a", key, kwargs={"duration_s": 0.5, "fail_first": 9})
    assert first.sent
    assert send_unique(app, "task_a", key, kwargs={"duration_s": 0}) == Dispatched(first.id, False)
    # The dispatcher's path: a config entry with the key sends nothing either, and says why.
    config = settings_of(app).config.model_copy(update={"tasks": [TaskSpec(task="task_a", count=2, unique_key=key)]})
    report = dispatch(app, config, timeout_s=5)
    assert [(t.id, t.state) for t in report.tasks] == [(first.id, TaskState.DUPLICATE)] * 2
    assert "is still queued or running" in report.tasks[0].error
    assert [r.id for r in store.query(name="task_a", since=store.get(first.id).updated_at - 60)
            if r.unique_key == key] == [first.id]

    settled(store, first.id, TaskState.DEAD_LETTERED)
    again = send_unique(app, "task_a", key, kwargs={"duration_s": 0})
    assert again.sent and again.id != first.id
    settled(store, again.id, TaskState.SUCCEEDED)
    # Recorded just before its dead-letter publish: take it out of the queue once it is there.
    wait_for(lambda: deadletter.sift(app, lambda d: d.task_id == first.id), 10, "the dead letter of the first task")


def test_dlq_requeue_runs_a_dead_lettered_task_once_with_fresh_retries(stack, store):
    app = stack.app
    with EventLog(app) as log:
        # A per-call soft limit of 0.2 s, then 0.3 s on the retry: both too short for 0.5 s of work.
        result = app.send_task("task_a", kwargs={"duration_s": 0.5}, soft_time_limit=0.2, time_limit=2)
        with pytest.raises(DeadLettered):
            result.get(timeout=30)
        assert settled(store, result.id, TaskState.DEAD_LETTERED).attempts == 2
        listed = json.loads(tasks_cli("dlq", "list", "--json").stdout)
        assert [(d["task"], d["attempts"], d["original_queue"]) for d in listed if d["task_id"] == result.id] == [
            ("task_a", 2, "queue_a")]

        out = tasks_cli("dlq", "requeue", result.id).stdout
        assert out.strip() == f"Requeued 1 task(s): task_a[{result.id}]"
        # Requeued as sent afresh: retries from zero, and the task type's limits (none), so it succeeds.
        record = settled(store, result.id, TaskState.SUCCEEDED)
        wait_for(lambda: len(log.of(result.id, "task-succeeded")) == 1, 10, "the task-succeeded event")
    assert len(log.of(result.id, "task-started")) == 3
    # Sent again as Celery's send_task would announce it: monitors count the requeue as a new send.
    sent = log.of(result.id, "task-sent")[-1]
    assert (sent["queue"], sent["retries"], sent["name"]) == ("queue_a", 0, "task_a")
    assert statuses(record)[-4:] == [TaskState.DEAD_LETTERED, TaskState.QUEUED, TaskState.RUNNING, TaskState.SUCCEEDED]
    assert record.history[-3].detail == ("requeued from dead_letter to queue_a: revocation cleared, retries reset to 0, "
                                         "the task type's time limits")
    assert record.history[-2].attempt == 1 and record.attempts == 3
    # Once: no copy of it is left in the dead-letter queue or the work queue.
    assert result.id not in {d.task_id for d in deadletter.browse(app)}
    wait_for(lambda: queues.stats(app, ["queue_a"])[0].messages_unacked == 0, 15, "queue_a to have nothing unacked")
    assert queue_depth(app, "queue_a") == 0


def test_a_revoked_queued_task_never_runs_even_on_a_worker_started_after_the_revoke(stack, store):
    app = stack.app
    stack.scale("worker-a", 0)
    try:
        victim = app.send_task("task_a", kwargs={"duration_s": 0})
        follower = app.send_task("task_a", kwargs={"duration_s": 0})
        out = tasks_cli("tasks", "revoke", victim.id).stdout
        assert out.strip() == f"task {victim.id} was queued and will not run"
        with EventLog(app) as log:  # worker-b's heartbeat starts it; worker-a never heard the broadcast
            stack.scale("worker-a", 1)
            assert follower.get(timeout=30)["task"] == "task_a"
            with pytest.raises(TaskRevokedError):
                victim.get(timeout=10)
            wait_for(lambda: log.of(victim.id, "task-revoked"), 10, "the task-revoked event")
        assert not log.of(victim.id, "task-started")
    finally:
        stack.scale("worker-a", 1)
    record = settled(store, victim.id, TaskState.REVOKED)
    assert record.attempts == 0 and record.revoked_at is not None
    assert [e.detail for e in record.history][-2:] == ["revoked before it ran", "discarded by the worker without running"]
    again = run_cli("-m", "conveyor", "tasks", "revoke", victim.id)
    assert again.returncode == 2 and again.stderr.strip() == f"error: task {victim.id} is already revoked; there is nothing to revoke"


def test_revoke_terminate_stops_a_running_task(stack, store):
    result = stack.app.send_task("task_a", kwargs={"duration_s": 30})
    running = settled(store, result.id, TaskState.RUNNING)
    out = tasks_cli("tasks", "revoke", result.id, "--terminate").stdout
    assert out.strip() == f"task {result.id} is being terminated on {running.worker}"
    with pytest.raises(TaskRevokedError):
        result.get(timeout=15)
    record = settled(store, result.id, TaskState.REVOKED)
    assert record.history[-1].detail.startswith("terminated while running")


def test_lifecycle_commands_report_user_errors_in_one_line(stack):
    unknown = str(uuid.uuid4())
    cases = [
        (("tasks", "show", unknown), f"error: no record of task {unknown}; `python -m conveyor tasks list` shows the recent ones"),
        (("dlq", "requeue", unknown), f"error: no message for task {unknown} in the dead-letter queue; "
                                      "`python -m conveyor dlq list` shows what is there"),
        (("dlq", "requeue"), "error: name the task ids to requeue, or pass --all (not both)"),
        (("dlq", "purge"), "error: `dlq purge` deletes every dead-lettered message for good; pass --yes to confirm"),
        (("tasks", "list", "--since", "soon"), "error: --since 'soon': give a duration such as 30s, 10m, 2h, 1d, "
                                               "or a time such as 2025-01-31T14:00"),
    ]
    for args, message in cases:
        proc = run_cli("-m", "conveyor", *args)
        assert (proc.returncode, proc.stderr.strip()) == (2, message), args
