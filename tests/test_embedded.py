"""The same dispatch end to end on the embedded broker: no RabbitMQ involved."""

from __future__ import annotations

import json
import os
import signal

import pytest
from helpers import run_cli, settled, wait_for

from conveyor.lifecycle import stores
from conveyor.tasks.states import TaskState

pytestmark = pytest.mark.e2e


def test_dispatch_on_the_embedded_broker(embedded_env, run_dir):
    env = {**embedded_env, "STACK": "local"}
    proc = run_cli("dispatch.py", "--json", "--start-stack", "--timeout", "120", env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "Using the embedded filesystem broker" in proc.stderr
    report = json.loads(proc.stdout)
    assert report["succeeded"] == len(report["tasks"]) == 20
    assert {t["worker"].split("@")[0] for t in report["tasks"]} == {"worker-a-1", "worker-b-1"}
    # Messages went through files in the run directory, not through any network broker.
    assert (run_dir / "broker" / "queue").is_dir() and any((run_dir / "results").iterdir())
    assert not list((run_dir / "local").glob("*.pid"))


def test_retry_and_dead_letter_on_the_embedded_broker(embedded_env, tmp_path):
    config = tmp_path / "fail.yml"
    config.write_text(
        "name: fail\nexpected_workers: 1\n"
        "tasks:\n  - {task: task_a, count: 1, params: {duration_s: 0, fail_first: 1}}\n"
        "  - {task: task_a, count: 1, params: {duration_s: 0, fail_first: 9}}\n"
        "retry: {max_retries: 3, backoff_s: 1, backoff_max_s: 2, jitter: false}\n"
        "services:\n  - {name: worker-a, queues: [queue_a], replicas: 1}\n"
    )
    proc = run_cli("dispatch.py", "--config", str(config), "--json", "--start-stack", "--timeout", "60",
                   env={**embedded_env, "STACK": "local"}, timeout=180)
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert (report["succeeded"], report["dead_lettered"], report["total_retries"]) == (1, 1, 1 + 3)


def test_a_worker_sigkilled_mid_task_on_the_embedded_broker_loses_nothing(embedded_env, run_dir, local_stack, tmp_path):
    config = tmp_path / "one.yml"
    config.write_text("name: one\nexpected_workers: 1\ntasks: [{task: task_a, count: 1}]\n"
                      "services:\n  - {name: worker-a, queues: [queue_a], replicas: 1, concurrency: 1}\n"
                      "stop_grace_s: 10\n")
    stack = local_stack(config)
    app = stack.app
    result = app.send_task("task_a", kwargs={"duration_s": 4})
    inflight = run_dir / "broker" / "inflight"
    claimed = wait_for(lambda: [p for p in inflight.glob("*/*.msg")], 30, "the worker to claim the message")
    wait_for(lambda: (r := stores.store_for(app).get(result.id)) and r.status == TaskState.RUNNING, 30, "the task to run")
    [victim] = stack.replicas()
    os.killpg(int(victim.ident), signal.SIGKILL)  # main process and pool at once, mid-task
    wait_for(lambda: not stack.replicas()[0].running, 10, "the worker to die")
    assert [p.exists() for p in claimed] == [True]  # kept, claimed by a process that is gone
    assert not list((run_dir / "broker" / "queue").glob("*.queue_a.msg"))

    stack.scale("worker-a", 1)  # a new worker finds the dead one's claim and puts it back
    value = result.get(timeout=60)
    assert value["task"] == "task_a"
    # The record's batch is written a moment after the result (lifecycle/guarded.py): waited for.
    record = settled(stores.store_for(app), result.id, TaskState.SUCCEEDED)
    assert record.status == TaskState.SUCCEEDED and [e.status for e in record.history].count(TaskState.RUNNING) == 2
    wait_for(lambda: not list(inflight.glob("*/*.msg")), 10, "the acknowledged message to be deleted")
    assert not claimed[0].parent.exists()
