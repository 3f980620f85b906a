"""The same dispatch end to end on the embedded broker: no RabbitMQ involved."""

from __future__ import annotations

import json

import pytest
from helpers import run_cli

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
