"""A small workload the monitor tests count, and emptying its queues between them."""

from __future__ import annotations

CONFIG = """\
name: monitor counts
expected_workers: 2
tasks:
  - {task: task_a, count: 6, params: {duration_s: 0.05}}
  - {task: task_a, count: 2, params: {duration_s: 0, fail_first: 1}}
  - {task: task_b, count: 3, params: {duration_s: 0.05}}
  - {task: task_b, count: 1, params: {duration_s: 0, fail_first: 2}}
  - {task: task_b, count: 1, params: {duration_s: 0, fail_first: 100}}
retry: {max_retries: 3, backoff_s: 1, backoff_max_s: 1, jitter: false}
services:
  - {name: worker-a, queues: [queue_a], concurrency: 2, replicas: 1}
  - {name: worker-b, queues: [queue_b], concurrency: 2, replicas: 1}
stop_grace_s: 10
"""


def purge(app) -> None:
    # On a connection of its own: Celery's default is one from kombu's process-wide pool, which an
    # earlier test's app.close() may have left holding a closed socket.
    with app.connection_for_write() as conn:
        app.control.purge(connection=conn)
