"""The autoscaler and rebalance: the policy alone (unit), then on a real local stack (broker)."""

from __future__ import annotations

import pytest

from helpers import wait_for, write_config
from conveyor.stack import rebalance
from conveyor.stack.autoscale import Autoscaler, decide
from conveyor.settings.config import Config
from conveyor.errors import ConfigError, UsageError

BASE = {
    "name": "scaling",
    "expected_workers": 2,
    "tasks": [{"task": "task_a", "count": 1}],
    "autoscale": {"interval_s": 1, "cooldown_s": 30},
    "services": [
        {"name": "worker-a", "queues": ["queue_a"], "min_replicas": 1, "max_replicas": 3, "target_backlog_per_replica": 10},
        {"name": "worker-b", "queues": ["queue_b"], "min_replicas": 0},
    ],
    "limits": {"max_replicas": 4},
}


@pytest.fixture
def config() -> Config:
    return Config.model_validate(BASE)


@pytest.mark.parametrize(
    ("backlog", "current", "desired", "words"),
    [
        (0, 0, 1, "below the minimum"),
        (25, 1, 3, "backlog 25 is over 1 x 10"),
        (500, 1, 3, "capped at max 3"),
        (15, 2, 2, "fits 2"),
        (0, 5, 3, "above the maximum"),
    ],
)
def test_decisions(config, backlog, current, desired, words):
    decision, _ = decide(config, config.services[0], backlog, current, None, now=1000.0)
    assert decision.desired == desired and words in decision.reason


def test_scaling_down_waits_for_the_cool_down(config):
    svc = config.services[0]
    first, since = decide(config, svc, 0, 3, None, now=1000.0)
    assert (first.desired, since) == (3, 1000.0) and "cool-down (0 of 30 s)" in first.reason
    held, since = decide(config, svc, 0, 3, since, now=1020.0)
    assert held.desired == 3 and since == 1000.0
    down, since = decide(config, svc, 0, 3, since, now=1030.0)
    assert down.desired == 1 and since is None
    # A burst inside the cool-down resets it.
    _, since = decide(config, svc, 0, 3, None, now=1000.0)
    busy, since = decide(config, svc, 40, 3, since, now=1010.0)
    assert busy.desired == 3 and since is None


@pytest.mark.parametrize(
    ("weights", "total", "expected"),
    [
        ({"worker-a": 3, "worker-b": 1}, 4, {"worker-a": 3, "worker-b": 1}),
        ({"worker-a": 3, "worker-b": 1}, 8, {"worker-a": 6, "worker-b": 2}),
        ({"worker-a": 1, "worker-b": 1}, 5, {"worker-a": 3, "worker-b": 2}),
        ({"worker-a": 100, "worker-b": 1}, 3, {"worker-a": 2, "worker-b": 1}),
        ({"a": 1, "b": 1, "c": 1}, 4, {"a": 2, "b": 1, "c": 1}),
    ],
)
def test_split_by_weights_keeps_one_each_and_adds_up(weights, total, expected):
    assert rebalance.split(weights, total) == expected


def test_split_needs_one_worker_per_service():
    with pytest.raises(UsageError, match="at least 2"):
        rebalance.split({"worker-a": 1, "worker-b": 1}, 1)


def test_plan_enforces_the_service_maximum(config):
    with pytest.raises(UsageError, match="over its maximum of 3"):
        rebalance.plan(config, 6, {"queue_a": 5, "queue_b": 1})


def test_weights_file_errors_name_file_line_and_field(tmp_path):
    path = write_config(tmp_path / "w.yml", "queue_a: 3\nqueue_c: 1\n")
    with pytest.raises(ConfigError, match=r"w.yml:2: queue_c: unknown key"):
        rebalance.load_weights(path)
    path.write_text("queue_a: 0\n")
    with pytest.raises(ConfigError, match=r"w.yml:1: queue_a: Input should be greater than 0"):
        rebalance.load_weights(path)


STACK_CONFIG = """\
name: scaling
expected_workers: 2
tasks: [{task: task_a, count: 1}]
autoscale: {interval_s: 1, cooldown_s: 1}
services:
  - {name: worker-a, queues: [queue_a], concurrency: 1, replicas: 1, min_replicas: 1, max_replicas: 3, target_backlog_per_replica: 4}
  - {name: worker-b, queues: [queue_b], concurrency: 1, replicas: 1, min_replicas: 1, max_replicas: 3}
limits: {max_replicas: 4}
stop_grace_s: 20
"""


@pytest.mark.broker
def test_autoscaler_follows_the_backlog_up_to_max_and_back_to_min(broker_env, local_stack, tmp_path):
    stack = local_stack(write_config(tmp_path / "auto.yml", STACK_CONFIG))
    scaler = Autoscaler(stack, tmp_path / "autoscale.json")
    results = [stack.app.send_task("task_a", kwargs={"duration_s": 0.3}) for _ in range(40)]
    wait_for(lambda: sum(d.desired for d in scaler.step() if d.service == "worker-a") == 3, 30,
             "the autoscaler to scale worker-a up to its maximum of 3")
    assert stack.running() == {"worker-a": 3, "worker-b": 1}
    assert len({r.get(timeout=60)["worker"] for r in results}) > 1  # the new replicas took part
    wait_for(lambda: stack.running()["worker-a"] == 1 if scaler.step() else False, 60,
             "the idle queue to bring worker-a back to its minimum of 1")
    assert stack.running() == {"worker-a": 1, "worker-b": 1}


@pytest.mark.broker
def test_rebalance_reshapes_the_stack_without_restarting_unaffected_workers(broker_env, local_stack, tmp_path):
    stack = local_stack(write_config(tmp_path / "reb.yml", STACK_CONFIG))
    config = stack.config
    rebalance.apply(stack, rebalance.plan(config, 4))
    assert stack.running() == {"worker-a": 2, "worker-b": 2}
    before = {r.node: r.ident for r in stack.replicas()}
    weights = rebalance.load_weights(write_config(tmp_path / "w.yml", "queue_a: 3\nqueue_b: 1\n"))
    changed = rebalance.apply(stack, rebalance.plan(config, 4, weights))
    assert changed == {"worker-a": (2, 3), "worker-b": (2, 1)}
    after = {r.node: r.ident for r in stack.replicas()}
    assert stack.running() == {"worker-a": 3, "worker-b": 1}
    # The replicas that stay are the very same processes.
    kept = set(before) & set(after)
    assert len(kept) == 3 and all(before[n] == after[n] for n in kept)
