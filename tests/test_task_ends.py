"""Every way a task ends, against the real RabbitMQ with real workers: each leaves a final record,
frees its unique key and tells its caller; what fails for good is dead-lettered complete, and
`dlq requeue` puts it back exactly; a full dead-letter queue refuses, and nothing is lost.

A virtual host of the module's own: its dead-letter queue has a small bound (dead_letter.max_length),
and RabbitMQ refuses to declare a queue again with other arguments than the session vhost's."""

from __future__ import annotations

import json
import os
import signal
import uuid
from pathlib import Path

import pytest
from celery import chain
from kombu import Queue
from kombu.exceptions import OperationalError

from helpers import ROOT, module_stack, private_vhost, queue_depth, run_cli, settled, statuses, wait_for, write_config
from conveyor.amqp import queues
from conveyor.errors import BrokerError
from conveyor.runtime.app import create_app
from conveyor.settings import environment
from conveyor.settings.config import load_config
from conveyor.lifecycle import commands, stores
from conveyor.settings.context import settings_of
from conveyor.tasks.states import TaskState
from conveyor.lifecycle.unique import send_unique
from conveyor.tasks import deadletter
from conveyor.tasks.deadletter import DeadLettered
from conveyor.tasks.simulated import KEPT_DETAIL

pytestmark = pytest.mark.broker

DLQ_MAX_LENGTH = 5
CONFIG = f"""\
name: task-ends
expected_workers: 2
tasks: [{{task: task_b, count: 1, params: {{duration_s: 3}}}}]
retry: {{max_retries: 1, backoff_s: 1, backoff_max_s: 2, jitter: false}}
services:
  - {{name: worker-a, queues: [queue_a], concurrency: 2, replicas: 1}}
  - {{name: worker-b, queues: [queue_b], concurrency: 2, replicas: 1}}
time_limits:
  task_b: {{hard_s: 1}}
dead_letter: {{max_length: {DLQ_MAX_LENGTH}}}
stop_grace_s: 10
"""


@pytest.fixture(scope="module")
def stack(rabbitmq_url, tmp_path_factory):
    home = tmp_path_factory.mktemp("ends")
    config_file = write_config(home / "ends.yml", CONFIG)
    with private_vhost("conveyor-ends") as vhost, module_stack(
            broker_url(vhost), home / "run", config_file, CONVEYOR_CONFIG=str(config_file),
            RECORDS_URL=f"sqlite:///{home / 'records.sqlite3'}") as workers:
        yield workers


@pytest.fixture
def store(stack):
    return stores.require_store(stack.app)


def broker_url(vhost: str) -> str:
    return f"amqp://guest:guest@127.0.0.1:5672/{vhost}"


def take_letter(app, task_id: str) -> deadletter.DeadLetter:
    """The task's dead letter, taken out of the queue (so that the next test finds it empty)."""
    return wait_for(lambda: deadletter.sift(app, lambda d: d.task_id == task_id), 15, f"the dead letter of {task_id}")[0]


def key_is_free(app, store, key: str) -> None:
    """A final record frees the key at once: the next task with it is sent, and runs."""
    again = send_unique(app, "task_a", key, kwargs={"duration_s": 0})
    assert again.sent
    settled(store, again.id, TaskState.SUCCEEDED)


def pool_processes(stack, service: str) -> list[int]:
    """The prefork pool processes of a service's replicas (children of each replica's worker process)."""
    mains = {int(r.ident) for r in stack.replicas() if r.service == service and r.running}
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent in mains:
            found.append(int(stat.parent.name))
    return found


def test_a_task_that_hits_its_hard_limit_on_every_attempt_ends_dead_lettered_in_dispatch_json(stack, store):
    # The config: task_b for 3 s under a hard limit of 1 s; the retry gets 1.5 s, too short as well.
    proc = run_cli("dispatch.py", "--json", "--timeout", "60", timeout=120)
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    [task] = report["tasks"]
    assert (task["state"], task["retries"], report["dead_lettered"], report["succeeded"]) == ("DEAD_LETTERED", 1, 1, 0)
    assert "TimeLimitExceeded: ran past its hard time limit of 1.5 s and was killed" in task["error"]
    record = settled(store, task["id"], TaskState.DEAD_LETTERED)
    assert statuses(record) == [TaskState.QUEUED, TaskState.RUNNING, TaskState.RETRYING, TaskState.RUNNING, TaskState.DEAD_LETTERED]
    assert "retry in 1 s, time limits: hard 1.5 s; the attempt timed out" in record.history[2].detail
    letter = take_letter(stack.app, task["id"])
    assert (letter.attempts, letter.original_queue, letter.headers["timelimit"]) == (2, "queue_b", [1.5, None])


def test_a_pool_process_lost_mid_task_is_retried_then_dead_lettered_and_frees_its_key(stack, store):
    app = stack.app
    key = f"lost-{uuid.uuid4().hex[:8]}"
    sent = send_unique(app, "task_a", key, kwargs={"duration_s": 60})
    result = app.AsyncResult(sent.id)
    for attempt in (1, 2):
        wait_for(lambda: (r := store.get(sent.id)) and r.status == TaskState.RUNNING and r.attempts == attempt, 30,
                 f"attempt {attempt} to run")
        for pid in pool_processes(stack, "worker-a"):  # as the OOM killer would: the pool process only
            os.kill(pid, signal.SIGKILL)
    with pytest.raises(DeadLettered) as raised:
        result.get(timeout=60)
    assert raised.value.attempts == 2 and "WorkerLostError" in raised.value.reason
    record = settled(store, sent.id, TaskState.DEAD_LETTERED)
    assert statuses(record) == [TaskState.QUEUED, TaskState.RUNNING, TaskState.RETRYING, TaskState.RUNNING, TaskState.DEAD_LETTERED]
    assert record.history[2].detail.startswith("attempt 1 failed (WorkerLostError: Worker exited prematurely")
    assert take_letter(app, sent.id).headers["x-unique-key"] == key
    key_is_free(app, store, key)


def test_a_requeued_middle_stage_completes_the_pipeline_and_its_caller_gets_the_result(stack, store):
    app = stack.app
    # The middle stage's caller gave it a 1 s limit for 2 s of work (1.5 s on the retry): dead-lettered.
    first = app.signature("task_a", kwargs={"duration_s": 0})
    middle = app.signature("task_a", kwargs={"duration_s": 2}).set(time_limit=1)
    last = app.signature("task_b", kwargs={"duration_s": 0})
    final = chain(first, middle, last).apply_async()
    middle_id, first_id = final.parent.id, final.parent.parent.id
    with pytest.raises(DeadLettered):  # Celery fails the rest of the chain with the middle stage's result
        final.get(timeout=60)
    settled(store, middle_id, TaskState.DEAD_LETTERED)

    [letter] = [d for d in deadletter.browse(app) if d.task_id == middle_id]
    headers, properties = letter.headers, letter.properties
    assert (headers["root_id"], headers["parent_id"], headers["retries"], headers["x-attempts"]) == (first_id, first_id, 1, 2)
    assert properties["reply_to"] == app.thread_oid and properties["correlation_id"] == middle_id
    assert headers["x-original-queue"] == "queue_a" and headers["x-first-failed-at"] < headers["x-dead-lettered-at"]
    assert headers["x-exception"] == "TimeLimitExceeded: ran past its hard time limit of 1.5 s and was killed"
    args, kwargs, embed = letter.body
    assert kwargs == {"duration_s": 2} and args[0]["task"] == "task_a"  # the first stage's result, as passed on
    [rest] = embed["chain"]
    assert (rest["task"], rest["options"]["task_id"], rest["options"]["reply_to"]) == ("task_b", final.id, app.thread_oid)

    proc = run_cli("-m", "conveyor", "dlq", "requeue", middle_id)
    assert proc.returncode == 0 and proc.stdout.strip() == f"Requeued 1 task(s): task_a[{middle_id}]", proc.stderr
    # The caller's own reply queue receives the final stage's result, which the caller now waits for.
    value = wait_for(lambda: _final_result(app, final.id), 60, "the final result at the caller")
    assert value["task"] == "task_b"
    record = settled(store, middle_id, TaskState.SUCCEEDED)
    assert record.history[-3].detail == ("requeued from dead_letter to queue_a: revocation cleared, retries reset to 0, "
                                         "the task type's time limits")
    assert record.history[-2].detail == "attempt 1 started; time limits: none"
    assert settled(store, final.id, TaskState.SUCCEEDED).name == "task_b"


def _final_result(app, task_id: str):
    """The result of `task_id` on the caller's reply queue once it is SUCCESS: Celery keeps a final
    state as final, so one that says DeadLettered is forgotten and the next message waited for."""
    result = app.AsyncResult(task_id)
    try:
        return result.get(timeout=5)
    except DeadLettered:
        result.forget()
        return None


def test_requeue_undoes_a_revoke_asked_while_the_task_ran(stack, store):
    app = stack.app
    result = app.send_task("task_a", kwargs={"duration_s": 2}, time_limit=1)
    wait_for(lambda: (r := store.get(result.id)) and r.status == TaskState.RUNNING and r.attempts == 2, 30, "the last attempt")
    commands.revoke(app, result.id)  # it runs on, times out and is dead-lettered, revoked
    with pytest.raises(DeadLettered):
        result.get(timeout=30)
    assert settled(store, result.id, TaskState.DEAD_LETTERED).revoked_at is not None
    commands.requeue(app, [result.id])
    record = settled(store, result.id, TaskState.SUCCEEDED)  # neither the record nor the workers' memory discard it
    assert record.revoked_at is None and statuses(record)[-3:] == [TaskState.QUEUED, TaskState.RUNNING, TaskState.SUCCEEDED]


# --- a final record, a free key and a told caller on every path ---------------------------------

def test_success_ends_the_record_and_frees_the_key(stack, store):
    key = f"ok-{uuid.uuid4().hex[:8]}"
    sent = send_unique(stack.app, "task_a", key, kwargs={"duration_s": 0})
    assert stack.app.AsyncResult(sent.id).get(timeout=30)["task"] == "task_a"
    assert statuses(settled(store, sent.id, TaskState.SUCCEEDED)) == [TaskState.QUEUED, TaskState.RUNNING, TaskState.SUCCEEDED]
    key_is_free(stack.app, store, key)


def test_a_failed_publish_ends_the_record_failed_and_frees_the_key(stack, store):
    key = f"unsent-{uuid.uuid4().hex[:8]}"
    with pytest.raises(Exception) as raised:
        send_unique(stack.app, "task_a", key, queue="no_such_queue", task_id=(task_id := str(uuid.uuid4())))
    assert not isinstance(raised.value, OperationalError)  # refused by the router, before any broker round trip
    record = store.get(task_id)
    assert record.status == TaskState.FAILED and record.history[-1].detail == "could not be published"
    key_is_free(stack.app, store, key)


def test_a_dead_letter_ends_the_record_and_frees_the_key(stack, store):
    key = f"dead-{uuid.uuid4().hex[:8]}"
    sent = send_unique(stack.app, "task_a", key, kwargs={"duration_s": 0, "fail_first": 9})
    with pytest.raises(DeadLettered):
        stack.app.AsyncResult(sent.id).get(timeout=30)
    assert statuses(settled(store, sent.id, TaskState.DEAD_LETTERED))[-1] == TaskState.DEAD_LETTERED
    take_letter(stack.app, sent.id)
    key_is_free(stack.app, store, key)


def test_a_rejected_message_ends_the_record_tells_the_caller_and_frees_the_key(stack, store):
    # No worker knows the task: Celery's consumer rejects it, ours dead-letters it with the reason.
    key = f"rejected-{uuid.uuid4().hex[:8]}"
    sent = send_unique(stack.app, "no_such_task", key, queue="queue_a")
    with pytest.raises(DeadLettered) as raised:
        stack.app.AsyncResult(sent.id).get(timeout=30)
    assert "no task named 'no_such_task' is registered" in raised.value.reason
    record = settled(store, sent.id, TaskState.DEAD_LETTERED)
    assert record.history[-1].detail == "dead-lettered without running"
    assert take_letter(stack.app, sent.id).reason.startswith("NotRegistered: ")
    key_is_free(stack.app, store, key)


def test_a_revoke_ends_the_record_and_frees_the_key(stack, store):
    key = f"revoked-{uuid.uuid4().hex[:8]}"
    sent = send_unique(stack.app, "task_a", key, kwargs={"duration_s": 0}, countdown=60)
    assert commands.revoke(stack.app, sent.id) == f"task {sent.id} was queued and will not run"
    assert settled(store, sent.id, TaskState.REVOKED).history[-1].detail == "revoked before it ran"
    key_is_free(stack.app, store, key)


def test_an_expired_task_ends_the_record_and_frees_the_key(stack, store):
    key = f"expired-{uuid.uuid4().hex[:8]}"
    sent = send_unique(stack.app, "task_a", key, kwargs={"duration_s": 0}, countdown=2, expires=1)
    record = settled(store, sent.id, TaskState.REVOKED)
    assert record.history[-1].detail == "expired before it ran" and record.attempts == 0
    key_is_free(stack.app, store, key)


# --- a bounded dead-letter queue ---------------------------------------------------------------

def test_a_full_dead_letter_queue_refuses_loudly_and_loses_nothing(stack, store):
    app = stack.app
    deadletter.drain(app)
    info = _management_queue(app)
    assert info["arguments"] == {"x-max-length": DLQ_MAX_LENGTH, "x-max-length-bytes": 1024 ** 3,
                                 "x-overflow": "reject-publish"}
    fillers = [app.send_task("task_a", kwargs={"duration_s": "bad"}) for _ in range(DLQ_MAX_LENGTH)]
    for filler in fillers:  # a bad argument: dead-lettered at once
        with pytest.raises(DeadLettered):
            filler.get(timeout=30)
    refused = app.send_task("task_a", kwargs={"duration_s": "bad"})
    log_file = stack.home / "worker-a-1.log"
    wait_for(lambda: f"The dead-letter queue refused task task_a[{refused.id}]" in log_file.read_text(), 30,
             "the worker to log the refusal")
    assert queue_depth(app, "dead_letter") == DLQ_MAX_LENGTH
    kept = store.get(refused.id)  # kept by the worker, not acknowledged away
    assert kept.status == TaskState.RETRYING and kept.history[-1].detail == KEPT_DETAIL
    assert refused.state != "FAILURE"

    assert len(deadletter.drain(app)) == DLQ_MAX_LENGTH  # room again: the next try goes through
    with pytest.raises(DeadLettered):
        refused.get(timeout=60)
    settled(store, refused.id, TaskState.DEAD_LETTERED)
    assert take_letter(app, refused.id).attempts == 1 and queue_depth(app, "queue_a") == 0


def _management_queue(app) -> dict:
    return queues.management_request(settings_of(app).broker.broker_url, "queues/{vhost}/dead_letter")


def test_upgrading_from_an_unbounded_dead_letter_queue_is_one_clear_error_and_it_stays_readable(tmp_path):
    with private_vhost("conveyor-upgrade") as vhost:
        env = {"BROKER_URL": broker_url(vhost), "CONVEYOR_RUN_DIR": str(tmp_path / "run"), "RECORDS_URL": "off"}
        with environment.environ(env):
            app = create_app(load_config(ROOT / "test-config.yml"), environment.resolve())
            try:
                with app.connection_for_write() as conn:  # as earlier versions declared it, with a letter in it
                    old = Queue(deadletter.DEAD_LETTER_QUEUE, exchange=deadletter.dlx, routing_key="dead_letter", durable=True)
                    conn.Producer().publish({"x": 1}, exchange=deadletter.dlx, routing_key="dead_letter", declare=[old],
                                            headers={"id": "old-letter", "x-exception": "Old: kept"})
                with pytest.raises(BrokerError, match=r"^queue 'dead_letter' exists on the broker with other arguments"):
                    deadletter.declare(app)
                assert [(d.task_id, d.reason) for d in deadletter.browse(app)] == [("old-letter", "Old: kept")]
            finally:
                app.close()
        proc = run_cli("dispatch.py", "--timeout", "5", env=env)
        assert proc.returncode == 3 and "Traceback" not in proc.stderr
        assert "error: queue 'dead_letter' exists on the broker with other arguments" in proc.stderr
        assert "rabbitmqctl delete_queue dead_letter" in proc.stderr
