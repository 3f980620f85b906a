"""Against the real RabbitMQ with real worker processes: routing, backoff retries, the dead-letter
queue, a worker killed mid-task, and the dispatcher end to end."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from celery import states

from helpers import queue_depth, run_cli, wait_for, write_config
from conveyor.tasks import deadletter
from conveyor.amqp import queues
from conveyor.tasks.deadletter import DeadLettered
from conveyor.stack.control import service_of
from helpers.events import EventLog

pytestmark = [pytest.mark.broker, pytest.mark.e2e, pytest.mark.usefixtures("broker_env")]

CONFIG = """\
name: integration
expected_workers: 2
tasks: [{{task: task_a, count: 1}}]
retry: {{max_retries: 3, backoff_s: 1, backoff_max_s: 60, jitter: false}}
services:
  - {{name: worker-a, queues: [queue_a], concurrency: {conc_a}, replicas: {replicas_a}}}
  - {{name: worker-b, queues: [queue_b], concurrency: 2, replicas: 1}}
stop_grace_s: 15
tuning: {{task_events: true}}  # the tests watch each attempt through Celery's task events
"""


@pytest.fixture
def config_file(tmp_path):
    return write_config(tmp_path / "it.yml", CONFIG.format(conc_a=2, replicas_a=1))


@pytest.fixture
def stack(local_stack, config_file):
    return local_stack(config_file)


def test_each_task_runs_only_on_its_own_queues_workers(stack):
    app = stack.app
    results = [app.send_task(name, kwargs={"duration_s": 0.05}) for name in ["task_a", "task_b"] * 6]
    for result in results:
        value = result.get(timeout=30)
        expected = {"task_a": "worker-a", "task_b": "worker-b"}[value["task"]]
        assert service_of(value["worker"]) == expected, value


def test_retries_back_off_exponentially_then_succeed(stack):
    app = stack.app
    with EventLog(app) as log:
        result = app.send_task("task_a", kwargs={"duration_s": 0, "fail_first": 2})
        value = result.get(timeout=30)
        wait_for(lambda: len(log.of(result.id, "task-started")) == 3, 10, "three task-started events")
    assert value["retries"] == 2
    retried = log.of(result.id, "task-retried")
    started = sorted(e["timestamp"] for e in log.of(result.id, "task-started"))
    assert len(retried) == 2
    # Measured start to start: Celery computes the ETA inside retry(), after the attempt started,
    # so the next start can never come sooner than the countdown. (The task-retried event is sent
    # after the retry is published, so measuring from it under-reads by the publish time.)
    delays = [started[1] - started[0], started[2] - started[1]]
    # backoff_s=1, jitter off: Celery waits 1 s, then 2 s (plus scheduling slack, never less).
    assert 0.99 <= delays[0] <= 1.9, delays
    assert 1.99 <= delays[1] <= 2.9, delays
    assert delays[1] > delays[0]


def test_a_task_that_always_fails_is_dead_lettered_after_four_attempts(stack):
    app = stack.app
    with EventLog(app) as log:
        result = app.send_task("task_a", kwargs={"duration_s": 0, "fail_first": 100})
        with pytest.raises(DeadLettered) as info:
            result.get(timeout=40)
        wait_for(lambda: queue_depth(app, "dead_letter") == 1, 10, "the task to reach the dead-letter queue")
        assert len(log.of(result.id, "task-started")) == 4
    assert info.value.attempts == 4 and result.state == states.FAILURE
    letters = deadletter.drain(app)
    assert [(d.task_id, d.task, d.attempts, d.original_queue) for d in letters] == [(result.id, "task_a", 4, "queue_a")]
    assert letters[0].reason.startswith("SimulatedFailure: task_a failed attempt 4 on purpose")
    # ...and nowhere else: the work queue holds nothing, ready or unacknowledged.
    wait_for(lambda: queues.stats(app, ["queue_a"])[0].messages_unacked == 0, 15, "queue_a to have nothing unacked")
    assert queue_depth(app, "queue_a") == 0


def test_bad_arguments_go_to_the_dead_letter_queue_at_once(stack):
    app = stack.app
    result = app.send_task("task_b", kwargs={"duration_s": "soon"})
    with pytest.raises(DeadLettered) as info:
        result.get(timeout=20)
    assert info.value.attempts == 1
    wait_for(lambda: queue_depth(app, "dead_letter") == 1, 10, "the task to reach the dead-letter queue")
    [letter] = deadletter.drain(app)
    assert letter.task_id == result.id and letter.attempts == 1
    assert letter.reason == "InvalidTaskArguments: duration_s must be a number, got str 'soon'"
    # The worker goes on serving the next message.
    assert app.send_task("task_b", kwargs={"duration_s": 0}).get(timeout=20)["task"] == "task_b"


def test_a_worker_killed_mid_task_does_not_lose_it(local_stack, tmp_path):
    stack = local_stack(write_config(tmp_path / "kill.yml", CONFIG.format(conc_a=1, replicas_a=2)))
    app = stack.app
    with EventLog(app) as log:
        result = app.send_task("task_a", kwargs={"duration_s": 4})
        [started] = wait_for(lambda: log.of(result.id, "task-started"), 20, "the task to start")
        victim = next(r for r in stack.replicas() if r.node == started["hostname"])
        # SIGKILL the whole worker (main process and pool), as the OOM killer would a container.
        os.killpg(int(victim.ident), signal.SIGKILL)
        value = result.get(timeout=60)
    assert value["worker"] != victim.node
    assert service_of(value["worker"]) == "worker-a"
    # It ran twice (at-least-once): once on the killed worker, once to completion on the other.
    assert len(log.of(result.id, "task-started")) == 2
    assert queue_depth(app, "queue_a") == 0


def test_dispatch_json_on_the_shipped_config_reports_every_task_succeeded(broker_env):
    proc = run_cli("dispatch.py", "--json", "--start-stack", "--timeout", "120", env={**broker_env, "STACK": "local"}, timeout=240)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["succeeded"] == len(report["tasks"]) == 20
    assert report["failed"] == report["dead_lettered"] == report["total_retries"] == 0
    for task in report["tasks"]:
        assert set(task) == {"name", "id", "queue", "state", "result", "execution_time_s", "retries", "worker", "latency_s", "error"}
        assert task["state"] == "SUCCESS" and task["queue"] == {"task_a": "queue_a", "task_b": "queue_b"}[task["name"]]
        assert task["result"] == {"task_a": "Hello from Task A", "task_b": "Hello from Task B"}[task["name"]]
    assert report["sequential_time_s"] == pytest.approx(10 * 0.1 + 10 * 0.2, rel=0.1)
    assert report["total_time_s"] < report["sequential_time_s"]
    assert "Started worker" not in proc.stdout
    # The run stopped the stack it started.
    assert not list(Path(broker_env["CONVEYOR_RUN_DIR"], "local").glob("*.pid"))
