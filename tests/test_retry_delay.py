"""Retry countdowns on classic queues wait in the broker (a delay queue per retry level), never
unacknowledged in a worker: against the real RabbitMQ with a real worker."""

from __future__ import annotations

import pytest

from helpers import queue_depth, wait_for, write_config
from conveyor.amqp.topology import delay_queue
from conveyor.tasks import retry
from conveyor.settings.context import settings_of

pytestmark = [pytest.mark.broker, pytest.mark.e2e, pytest.mark.usefixtures("broker_env")]

CONFIG = """\
name: retry-delay
expected_workers: 1
tasks: [{task: task_a, count: 1}]
retry: {max_retries: 2, backoff_s: 3, backoff_max_s: 60, jitter: false}
services:
  - {name: worker-a, queues: [queue_a], concurrency: 1, replicas: 1, pool: threads, prefetch_multiplier: 4}
  - {name: worker-b, queues: [queue_b], concurrency: 1, replicas: 0}
stop_grace_s: 10
"""


def test_a_retry_waits_in_its_levels_delay_queue_not_in_the_worker(local_stack, tmp_path):
    stack = local_stack(write_config(tmp_path / "r.yml", CONFIG))
    app = stack.app
    policy = settings_of(app).config.retry
    first = delay_queue("queue_a", retry.delay_s(policy, 0))
    assert first.name == "queue_a.retry.3s" and first.queue_arguments["x-message-ttl"] == 3000
    result = app.send_task("task_a", kwargs={"duration_s": 0, "fail_first": 1})
    # While the countdown runs, the retry is a ready message of the delay queue, and the worker holds nothing.
    wait_for(lambda: queue_depth(app, first.name) == 1, 10, "the retry to wait in queue_a.retry.3s")
    # A message is in one place at a time; and the worker says it holds no task scheduled for later
    # (where Celery keeps an ETA task, unacknowledged, until it is due).
    assert queue_depth(app, "queue_a") == 0
    scheduled = app.control.inspect(timeout=5).scheduled()
    assert scheduled and all(tasks == [] for tasks in scheduled.values()), scheduled
    value = result.get(timeout=30)
    assert value["retries"] == 1
    assert queue_depth(app, first.name) == 0
