"""Unit: what the config asks a worker to hold unacknowledged must fit in the broker's consumer
timeout, and worker recycling reaches Celery's argv. Errors name file, line and field."""

from __future__ import annotations

import pytest

from conveyor.settings.config import load_config
from conveyor.stack.launcher import command
from helpers.config import GOOD, error_of, write

FIT = "does not fit in broker.consumer_timeout_s"


@pytest.mark.parametrize(("old", "new", "line", "field", "words"), [
    # RabbitMQ's default consumer timeout, 1800 s, is the config's default.
    ("{duration_s: 0.01, fail_first: 1}", "{duration_s: 1800}", 8, "tasks[1].params.duration_s",
     f"the task's run time (1800 s) {FIT} (1800 s)"),
    # 600 s on the last of 3 retries, each 1.5 times longer: 2025 s.
    ("limits:", "time_limits:\n  task_a: {hard_s: 600}\nlimits:", 14, "time_limits.task_a.hard_s",
     f"its time limit on the last retry (hard_s x retry_factor^max_retries) (2025 s) {FIT}"),
    ("limits:", "time_limits:\n  task_b: {soft_s: 100, retry_factor: 3}\nlimits:", 14, "time_limits.task_b.soft_s", "(2700 s)"),
])
def test_what_cannot_fit_in_the_consumer_timeout_is_refused(tmp_path, old, new, line, field, words):
    message = error_of(write(tmp_path, GOOD.replace(old, new)))
    assert message.startswith(f"{tmp_path / 'c.yml'}:{line}: {field}: "), message
    assert words in message


def test_a_broker_with_a_shorter_consumer_timeout(tmp_path):
    text = GOOD.replace("{duration_s: 0.01, fail_first: 1}", "{duration_s: 61}") + "broker: {consumer_timeout_s: 60}\n"
    assert error_of(write(tmp_path, text)) == (
        f"{tmp_path / 'c.yml'}:8: tasks[1].params.duration_s: the task's run time (61 s) {FIT} (60 s): "
        "the broker would take the message back while a worker still holds it")


def test_what_fits_is_accepted(tmp_path):
    text = GOOD.replace("{duration_s: 0.01, fail_first: 1}", "{duration_s: 1799}").replace(
        "limits:", "time_limits:\n  task_a: {hard_s: 500}\nlimits:")  # 500 x 1.5^3 = 1687.5 s
    assert load_config(write(tmp_path, text)).tasks[1].params.duration_s == 1799


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_retry_countdowns_wait_in_the_broker_so_any_fits(tmp_path, queue_type):
    # A retry waits in a delay queue (classic, conveyor/tasks/base.py) or in Celery's native delayed
    # delivery (quorum): the broker holds the countdown, never a worker, so it need not fit.
    text = GOOD.replace("backoff_max_s: 8", "backoff_max_s: 7200") + f"queue_type: {queue_type}\n"
    assert load_config(write(tmp_path, text)).retry.backoff_max_s == 7200


@pytest.mark.parametrize("field", ["max_tasks_per_child: 5", "max_memory_per_child_mb: 200"])
def test_recycling_needs_the_prefork_pool(tmp_path, field):
    text = GOOD.replace("{name: worker-a, queues: [queue_a]}", f"{{name: worker-a, queues: [queue_a], pool: threads, {field}}}")
    message = error_of(write(tmp_path, text))
    name = field.split(":")[0]
    assert message == f"{tmp_path / 'c.yml'}:11: services[0].{name}: needs the prefork pool: a threads pool " \
                      "has no child process to replace"


def test_recycling_reaches_the_worker_argv(tmp_path):
    text = GOOD.replace("{name: worker-a, queues: [queue_a]}",
                        "{name: worker-a, queues: [queue_a], max_tasks_per_child: 5, max_memory_per_child_mb: 200}")
    config = load_config(write(tmp_path, text))
    argv = command(config.service("worker-a"), "n@h")
    assert argv[argv.index("--max-tasks-per-child") + 1] == "5"
    assert argv[argv.index("--max-memory-per-child") + 1] == str(200 * 1024)  # Celery counts KiB
    assert "--max-tasks-per-child" not in command(config.service("worker-b"), "n@h")
