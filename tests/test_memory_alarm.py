"""A memory alarm on a private RabbitMQ node (conveyor/chaos/node.py): while the broker blocks
publishers, a running task is not delivered again (the worker's heartbeats go on), and once the
alarm clears its result arrives and the worker serves the next task."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from helpers import IN_CI, module_stack, wait_for, write_config
from conveyor.chaos.node import BrokerNode
from conveyor.errors import BrokerError

HEARTBEAT_S = 2
CONFIG = f"""\
name: memory-alarm
expected_workers: 1
tasks: [{{task: task_a, count: 1}}]
retry: {{max_retries: 0, backoff_s: 1, backoff_max_s: 1, jitter: false}}
services:
  - {{name: worker-a, queues: [queue_a], concurrency: 1, replicas: 1}}
heartbeat_s: {HEARTBEAT_S}
stop_grace_s: 10
tuning: {{track_started: true, task_log_lines: true}}  # the test waits for STARTED and counts "received" lines
"""


@pytest.fixture
def node(tmp_path):
    try:
        with BrokerNode(keep_logs=tmp_path / "broker-log") as made:
            yield made
    except BrokerError as exc:
        if IN_CI:
            raise
        pytest.skip(f"no private RabbitMQ node: {exc}")


def ctl(node: BrokerNode, *args: str) -> str:
    done = node._ctl(*args, timeout_s=30)
    assert done is not None and done.returncode == 0, f"rabbitmqctl {' '.join(args)} failed: {done and done.stderr}"
    return done.stdout


def queue_counts(node: BrokerNode, name: str) -> tuple[int, int]:
    for line in ctl(node, "list_queues", "-q", "--no-table-headers", "name", "messages_ready",
                    "messages_unacknowledged").splitlines():
        parts = line.split()
        if parts and parts[0] == name:
            return int(parts[1]), int(parts[2])
    return 0, 0


def blocked_connections(node: BrokerNode) -> int:
    return sum(1 for line in ctl(node, "list_connections", "-q", "--no-table-headers", "state").splitlines()
               if line.strip() == "blocked")


def received(log: Path, task_id: str) -> int:
    return log.read_text().count(f"Task task_a[{task_id}] received")


@pytest.mark.broker
@pytest.mark.slow
def test_a_memory_alarm_blocks_publishers_without_redelivering_running_tasks(node, tmp_path):
    with module_stack(node.url(), tmp_path, write_config(tmp_path / "c.yml", CONFIG), RECORDS_URL="off") as stack:
        app = stack.app
        log = tmp_path / "local" / "worker-a-1.log"
        result = app.send_task("task_a", kwargs={"duration_s": 3 * HEARTBEAT_S})
        wait_for(lambda: result.state == "STARTED", 30, "the task to start")
        ctl(node, "set_vm_memory_high_watermark", "0.0000001")
        try:
            # The task ends during the alarm and its result publish is blocked by the broker.
            wait_for(lambda: blocked_connections(node) >= 1, 60, "the worker's result publish to be blocked")
            # Four heartbeat intervals: a worker whose heartbeats stopped would be dropped, and its
            # unacknowledged task handed out again.
            watch_until = time.monotonic() + 4 * HEARTBEAT_S
            wait_for(lambda: received(log, result.id) > 1 or queue_counts(node, "queue_a")[1] != 1
                     or time.monotonic() >= watch_until, 60, "the alarm to be watched for four heartbeats")
            assert queue_counts(node, "queue_a") == (0, 1), "the running task was delivered again"
            assert received(log, result.id) == 1
        finally:
            ctl(node, "set_vm_memory_high_watermark", "0.4")
        # The alarm cleared: the result comes, and the worker serves again, the task run once.
        assert result.get(timeout=60)["task"] == "task_a"
        assert received(log, result.id) == 1
        assert app.send_task("task_a", kwargs={"duration_s": 0}).get(timeout=60)["task"] == "task_a"
