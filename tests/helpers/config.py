"""A valid config to vary, and the one-line error a broken one gives."""

from __future__ import annotations

from pathlib import Path

import pytest

from conveyor.errors import ConfigError
from conveyor.settings.config import load_config

GOOD = """\
name: t
expected_workers: 2
tasks:
  - task: task_a
    count: 2
  - task: task_b
    count: 3
    params: {duration_s: 0.01, fail_first: 1}
retry: {max_retries: 3, backoff_s: 1, backoff_max_s: 8, jitter: false}
services:
  - {name: worker-a, queues: [queue_a]}
  - {name: worker-b, queues: [queue_b], concurrency: 4}
limits: {max_tasks_per_run: 10, max_replicas: 4}
"""

def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yml"
    path.write_text(text)
    return path


def error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)
