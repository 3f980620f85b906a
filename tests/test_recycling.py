"""Worker recycling (services[].max_tasks_per_child, max_memory_per_child_mb): Celery replaces the
pool process and no task is lost, on a real worker and the real broker."""

from __future__ import annotations

import pytest

from helpers import module_stack, queue_depth, wait_for, write_config

from conveyor.lifecycle import stores
from conveyor.monitor import tallied
from conveyor.tasks.states import TaskState

CONFIG = """\
name: recycling
expected_workers: 2
tasks: [{task: task_a, count: 1}]
retry: {max_retries: 0, backoff_s: 1, backoff_max_s: 1, jitter: false}
services:
  - {name: worker-a, queues: [queue_a], concurrency: 1, replicas: 1, max_tasks_per_child: 2}
  # Any pool process is bigger than 1 MiB, so each is replaced after its first task.
  - {name: worker-b, queues: [queue_b], concurrency: 1, replicas: 1, max_memory_per_child_mb: 1}
stop_grace_s: 10
"""
TASKS = 6


def pool_pids(app, node: str) -> list[int]:
    stats = app.control.inspect(destination=[node], timeout=5, limit=1).stats() or {}
    return stats.get(node, {}).get("pool", {}).get("processes", [])


@pytest.mark.broker
@pytest.mark.slow
def test_a_pool_process_is_replaced_and_no_task_is_lost(rabbitmq_url, tmp_path):
    with module_stack(rabbitmq_url, tmp_path, write_config(tmp_path / "c.yml", CONFIG)) as stack:
        app = stack.app
        nodes = {r.service: r.node for r in stack.replicas()}
        before = {service: pool_pids(app, node) for service, node in nodes.items()}
        assert all(len(pids) == 1 for pids in before.values()), before
        results = [app.send_task(name, kwargs={"duration_s": 0.05}) for name in ("task_a", "task_b") for _ in range(TASKS)]
        done = [r.get(timeout=60) for r in results]
        assert len(done) == 2 * TASKS and {d["task"] for d in done} == {"task_a", "task_b"}
        # Replaced: the pool's process is no longer the one it started with; the worker itself is.
        for service, node in nodes.items():
            wait_for(lambda: (p := pool_pids(app, node)) and not set(p) & set(before[service]), 20,
                     f"{service}'s pool process to be replaced")
        assert all(r.running for r in stack.replicas())
        assert queue_depth(app, "queue_a") == queue_depth(app, "queue_b") == queue_depth(app, "dead_letter") == 0
        log = (tmp_path / "local" / "worker-b-1.log").read_text()
        assert "Unrecoverable error" not in log
        # A pool process that is replaced writes the records and tallies it queued before it exits
        # (worker_process_shutdown, lifecycle/guarded.py): none stays running, none is uncounted.
        store = stores.store_for(app)
        wait_for(lambda: all((rec := store.get(r.id)) and rec.status == TaskState.SUCCEEDED for r in results), 20,
                 "every task's record to say succeeded")
        counts = tallied.load(*store.tallies()).counts
        assert [counts[key]["succeeded"] for key in (("task_a", "queue_a"), ("task_b", "queue_b"))] == [TASKS, TASKS]
        assert [counts[key]["started"] for key in (("task_a", "queue_a"), ("task_b", "queue_b"))] == [TASKS, TASKS]
