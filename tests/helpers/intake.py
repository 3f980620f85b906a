"""Messages as a foreign or broken producer sends them, and what the worker makes of them."""

from __future__ import annotations

from pathlib import Path

from kombu import Exchange, Producer

from helpers import queue_depth, wait_for

from conveyor.tasks import deadletter

INTAKE_CONFIG = """\
name: bad-input
expected_workers: 1
tasks: [{task: task_a, count: 1}]
retry: {max_retries: 0, backoff_s: 1, backoff_max_s: 1, jitter: false}
services:
  - {name: worker-a, queues: [queue_a], concurrency: 1, replicas: 1}
limits: {max_payload_bytes: 65536}
stop_grace_s: 10
"""


def publish_raw(app, body: bytes, content_type: str, headers: dict, content_encoding: str = "utf-8") -> None:
    """A message as a foreign or broken producer would send it, under publisher confirms."""
    with app.connection_for_write() as conn:
        Producer(conn.default_channel).publish(body, exchange=Exchange("queue_a", type="direct"), routing_key="queue_a",
                                               content_type=content_type, content_encoding=content_encoding,
                                               headers=headers, serializer=None)


def the_dead_letter(app) -> deadletter.DeadLetter:
    wait_for(lambda: queue_depth(app, "dead_letter") >= 1, 20, "the message to reach the dead-letter queue")
    [letter] = deadletter.drain(app)
    assert letter.original_queue == "queue_a" and letter.headers["x-worker"].startswith("worker-a-1@")
    return letter


def still_serving(worker) -> None:
    """The same worker process, not crashed and restarted, runs the next good task."""
    [before] = worker.replicas()
    assert worker.app.send_task("task_a", kwargs={"duration_s": 0}).get(timeout=20)["task"] == "task_a"
    [after] = worker.replicas()
    assert after.running and after.ident == before.ident
    log = (Path(worker.home) / "worker-a-1.log").read_text()
    assert "Unrecoverable error" not in log
