"""Records on the embedded broker: no RabbitMQ, no Redis; the workers' pool processes, the
dispatcher and the `tasks` command share the SQLite file in the run directory."""

from __future__ import annotations

import json

from helpers import run_cli, write_config

CONFIG = """\
name: embedded lifecycle
expected_workers: 1
tasks:
  - {task: task_a, count: 2, params: {duration_s: 0, fail_first: 1}}
  - {task: task_a, count: 1, params: {duration_s: 0}, unique_key: "only-{index}"}
retry: {max_retries: 1, backoff_s: 1, backoff_max_s: 1, jitter: false}
services:
  - {name: worker-a, queues: [queue_a], replicas: 1}
"""


def test_records_on_the_embedded_broker_live_in_the_run_directory(embedded_env, run_dir, tmp_path):
    config = write_config(tmp_path / "embedded.yml", CONFIG)
    env = {**embedded_env, "STACK": "local"}
    proc = run_cli("dispatch.py", "--config", str(config), "--json", "--start-stack", "--timeout", "60", env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert (report["succeeded"], report["total_retries"]) == (3, 2), proc.stderr

    listed = run_cli("-m", "conveyor", "--config", str(config), "tasks", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    found = {r["id"]: r for r in json.loads(listed.stdout)}
    assert set(found) == {t["id"] for t in report["tasks"]}
    assert sorted((r["status"], r["attempts"], r["unique_key"] or "") for r in found.values()) == [
        ("SUCCESS", 1, "only-0"), ("SUCCESS", 2, ""), ("SUCCESS", 2, "")], listed.stdout
    assert {r["worker"].split("@")[0] for r in found.values()} == {"worker-a-1"}
    assert (run_dir / "records.sqlite3").is_file()
