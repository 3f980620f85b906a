"""Bad input to the CLIs: one line on stderr that names the problem, a non-zero exit, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import ROOT, one_line_error, run_cli

SHIPPED = (ROOT / "test-config.yml").read_text()






def bad_config(tmp_path: Path, old: str, new: str) -> str:
    assert old in SHIPPED
    path = tmp_path / "bad.yml"
    path.write_text(SHIPPED.replace(old, new, 1))
    return str(path)


@pytest.mark.parametrize(
    ("old", "new", "words"),
    [
        ("count: 10\n", "count: 10\n    cont: 3\n", [":8: tasks[0].cont: unknown key"]),
        ("task: task_b", "task: task_z", [":9: tasks[1].task:", "no task type is named 'task_z'"]),
        ("count: 10\n", "count: 0\n", [":7: tasks[0].count:", "greater than 0"]),
        ("count: 10\n", "count: 20000\n", [":5: tasks:", "over limits.max_tasks_per_run (10000)"]),
        ("tasks:\n", "tasks: [\n", [":6: malformed YAML"]),
    ],
)
def test_bad_config(tmp_path, offline_env, old, new, words):
    path = bad_config(tmp_path, old, new)
    one_line_error(run_cli("dispatch.py", "--config", path, env=offline_env), path, *words)


def test_missing_config(tmp_path, offline_env):
    one_line_error(run_cli("dispatch.py", "--config", str(tmp_path / "none.yml"), env=offline_env), "file not found")


def test_scale_rejects_unknown_service_and_bad_counts(tmp_path, offline_env):
    env = {**offline_env, "BROKER_URL": "filesystem://", "STACK": "local"}
    one_line_error(run_cli("scale.py", "scale", "--service", "worker-z", "--count", "1", env=env), "unknown service 'worker-z'")
    one_line_error(run_cli("scale.py", "scale", "--service", "worker-a", "--count", "-1", env=env), "0 or more")
    one_line_error(run_cli("scale.py", "scale", "--service", "worker-a", "--count", "99", env=env), "over limits.max_replicas (8)")


def test_explicit_broker_url_unreachable(offline_env):
    line = one_line_error(run_cli("dispatch.py", env=offline_env), "cannot reach the broker", "BROKER_URL")
    assert "guest:guest" not in line


@pytest.mark.broker
def test_wrong_broker_credentials(rabbitmq_url, tmp_path):
    env = {"BROKER_URL": "amqp://guest:wrong-password@127.0.0.1:5672//", "CONVEYOR_RUN_DIR": str(tmp_path)}
    line = one_line_error(run_cli("dispatch.py", env=env), "refused the credentials")
    assert "wrong-password" not in line


def test_nonpositive_timeout(offline_env):
    one_line_error(run_cli("dispatch.py", "--timeout", "0", env=offline_env), "--timeout must be more than 0")


def test_a_load_test_payload_over_the_limit_is_refused_before_anything_is_sent(tmp_path):
    scenario = tmp_path / "big.yml"
    scenario.write_text("name: big\nmix:\n  - {task: task_a, payload_bytes: 2000000}\n")
    proc = run_cli("load_test.py", "--scenario", str(scenario), "--tasks", "1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: task type 'task_a': payload_bytes 2000000 is over limits.max_payload_bytes (1048576) of ")
