"""Unit: the config schema. Every error names the file, the line and the field."""

from __future__ import annotations


import pytest

from conveyor.settings.config import load_config

from helpers import ROOT
from helpers.config import GOOD, error_of, write







def test_shipped_config_is_valid():
    config = load_config(ROOT / "test-config.yml")
    assert {t.task for t in config.tasks} == {"task_a", "task_b"}
    assert config.retry.max_retries == 3


def test_good_config_loads_with_defaults(tmp_path):
    config = load_config(write(tmp_path, GOOD))
    assert config.tasks[1].params.fail_first == 1
    assert config.services[0].concurrency == 2 and config.services[1].concurrency == 4
    assert config.source == (tmp_path / "c.yml").resolve()


@pytest.mark.parametrize(
    ("old", "new", "line", "field", "words"),
    [
        ("    count: 3\n", "    count: 3\n    cuont: 4\n", 8, "tasks[1].cuont", "unknown key"),
        ("max_retries: 3", "max_retires: 3", 9, "retry.max_retires", "unknown key"),
        ("task: task_b", "task: task_c", 6, "tasks[1].task", "no task type is named 'task_c'"),
        ("    count: 2\n", "    count: 0\n", 5, "tasks[0].count", "greater than 0"),
        ("    count: 2\n", "    count: -1\n", 5, "tasks[0].count", "greater than 0"),
        ("    count: 3\n", "    count: 9\n", 3, "tasks", "over limits.max_tasks_per_run"),
        ("max_retries: 3", "max_retries: 5", 9, "retry.max_retries", "less than or equal to 3"),
        ("queues: [queue_a]}", "queues: [queue_x]}", 11, "services[0].queues[0]", "no task type goes to 'queue_x'"),
        ("concurrency: 4}", "concurrency: 4, replicas: 9}", 12, "services[1].replicas", "over limits.max_replicas"),
        ("name: t\n", "", 1, "name", "required field is missing"),
        ("backoff_max_s: 8", "backoff_max_s: 0", 9, "retry.backoff_max_s", "greater than or equal to 1"),
    ],
)
def test_errors_name_file_line_and_field(tmp_path, old, new, line, field, words):
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    message = error_of(path)
    assert message.startswith(f"{path}:{line}: {field}: "), message
    assert words in message


def test_task_sent_to_a_queue_nobody_serves(tmp_path):
    text = GOOD.replace("  - {name: worker-b, queues: [queue_b], concurrency: 4}\n", "")
    message = error_of(write(tmp_path, text))
    assert ":6: tasks[1].task: task_b goes to queue_b, which no service consumes" in message


def test_missing_file(tmp_path):
    assert error_of(tmp_path / "nope.yml") == f"{tmp_path / 'nope.yml'}: file not found (pass --config FILE or set CONVEYOR_CONFIG)"


def test_malformed_yaml(tmp_path):
    message = error_of(write(tmp_path, "name: t\ntasks: [\n  - x: 1\n"))
    assert message.startswith(f"{tmp_path / 'c.yml'}:3: malformed YAML")


def test_top_level_must_be_a_mapping(tmp_path):
    assert error_of(write(tmp_path, "- a\n- b\n")).endswith(":1: expected a mapping of settings at the top level")


def test_the_dead_letter_bounds_are_checked_with_file_line_and_field(tmp_path):
    from conveyor.errors import ConfigError
    from conveyor.settings.config import load_config

    base = (ROOT / "test-config.yml").read_text()
    config = tmp_path / "c.yml"
    config.write_text(base + "dead_letter: {max_length: 10, overflow: drop-head}\n")
    with pytest.raises(ConfigError, match=r"c\.yml:\d+: dead_letter\.overflow: Input should be 'reject-publish'"):
        load_config(config)
    config.write_text(base + "dead_letter: {max_length: 0}\n")
    with pytest.raises(ConfigError, match=r"dead_letter\.max_length: Input should be greater than or equal to 1"):
        load_config(config)
