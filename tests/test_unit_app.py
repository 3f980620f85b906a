"""Unit: the retry policy reaches Celery's autoretry, routing, and broker resolution. No broker needed."""

from __future__ import annotations

import dataclasses

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
from celery.app import trace
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import celeryd_after_setup
from celery.utils.time import get_exponential_backoff_interval

from conveyor.settings import environment
from conveyor.settings.context import CONF_KEY, settings_of
from conveyor.tasks import retry
from conveyor.runtime.app import TASK_LINE_LOGGERS, create_app
from conveyor.settings.config import RetryPolicy, load_config
from conveyor.tasks.simulated import InvalidTaskArguments, SimulatedFailure
from helpers import free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def app(tmp_path, monkeypatch):
    monkeypatch.setenv(environment.RUN_DIR_ENV, str(tmp_path))
    cfg = tmp_path / "c.yml"
    cfg.write_text((ROOT / "test-config.yml").read_text().replace(
        "backoff_s: 1 ", "backoff_s: 3 ").replace("backoff_max_s: 60", "backoff_max_s: 10").replace("jitter: true", "jitter: false"))
    app = create_app(load_config(cfg), environment.resolve({"BROKER_URL": "filesystem://", environment.RUN_DIR_ENV: str(tmp_path)}))
    yield app
    app.close()


def test_retry_policy_values_reach_the_celery_tasks(app):
    for name in ("task_a", "task_b"):
        task = app.tasks[name]
        assert task.max_retries == 3
        assert task.retry_backoff == 3
        assert task.retry_backoff_max == 10
        assert task.retry_jitter is False
        assert task.autoretry_for == (retry.TransientTaskError, SoftTimeLimitExceeded)
        # Celery wrapped run() with its autoretry behaviour, which reads the values above.
        assert hasattr(task, "_orig_run")


def test_backoff_is_celerys_own_exponential_interval():
    policy = RetryPolicy(max_retries=3, backoff_s=3, backoff_max_s=10, jitter=False)
    assert [retry.delay_s(policy, n) for n in range(4)] == [3, 6, 10, 10]
    assert [get_exponential_backoff_interval(3, n, 10) for n in range(4)] == [3, 6, 10, 10]


def test_autoretry_schedules_countdowns_from_the_policy(app, monkeypatch):
    """Drive Celery's autoretry wrapper and capture the countdown it hands to Task.retry."""
    task = app.tasks["task_a"]
    seen = []

    class Scheduled(Exception):
        pass

    def fake_retry(*args, **kwargs):
        seen.append(kwargs["countdown"])
        raise Scheduled()

    monkeypatch.setattr(task, "retry", fake_retry)
    for retries in range(3):
        task.push_request(retries=retries, hostname="unit@test")
        try:
            with pytest.raises(Scheduled):
                task.run(duration_s=0, fail_first=5)
        finally:
            task.pop_request()
    assert seen == [3, 6, 10]


def test_bad_arguments_are_not_retried(app):
    task = app.tasks["task_a"]
    assert not issubclass(InvalidTaskArguments, retry.TransientTaskError)
    assert issubclass(SimulatedFailure, retry.TransientTaskError)
    task.push_request(retries=0, hostname="unit@test")
    try:
        with pytest.raises(InvalidTaskArguments):
            task.run(duration_s="slow")
    finally:
        task.pop_request()


def test_routing_sends_each_task_to_its_own_queue(app):
    router = app.amqp.router
    assert router.route({}, "task_a")["queue"].name == "queue_a"
    assert router.route({}, "task_b")["queue"].name == "queue_b"
    queue = router.route({}, "task_a")["queue"]
    assert queue.durable and queue.queue_arguments["x-dead-letter-exchange"] == "dlx"


def test_only_json_is_accepted(app):
    assert app.conf.accept_content == ["json"]
    assert app.conf.result_accept_content == ["json"]
    assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost


def test_task_result_shape(app):
    task = app.tasks["task_b"]
    task.push_request(retries=2, hostname="w@h")
    try:
        result = task.run(duration_s=0, payload="abc")
    finally:
        task.pop_request()
    assert result["task"] == "task_b" and result["message"] == "Hello from Task B"
    assert result["retries"] == 2 and result["worker"] == "w@h" and result["payload_bytes"] == 3


def test_seeded_failures_are_reproducible(app):
    task = app.tasks["task_a"]

    def outcome(seed: int, attempt: int) -> bool:
        task.push_request(retries=attempt, hostname="w@h")
        try:
            task._orig_run(duration_s=0, fail_probability=0.5, seed=seed)
            return True
        except SimulatedFailure:
            return False
        finally:
            task.pop_request()

    first = [outcome(seed, 0) for seed in range(40)]
    assert first == [outcome(seed, 0) for seed in range(40)]
    assert 5 < sum(first) < 35



def test_embedded_broker_when_nothing_listens_and_no_url(tmp_path):
    settings = environment.resolve({environment.RUN_DIR_ENV: str(tmp_path)}, probe=("127.0.0.1", free_port()))
    assert settings.embedded and settings.broker_url == environment.EMBEDDED_URL
    assert settings.result_backend == f"file://{tmp_path / 'results'}"
    assert "embedded" in settings.describe()


def test_explicit_url_is_used_as_given_and_password_is_masked(tmp_path):
    env = {"BROKER_URL": "amqp://alice:s3cret@127.0.0.1:5999/prod", environment.RUN_DIR_ENV: str(tmp_path)}
    settings = environment.resolve(env, probe=("127.0.0.1", free_port()))
    assert not settings.embedded and settings.explicit
    assert settings.result_backend == "rpc://"
    assert "s3cret" not in settings.safe_url and "s3cret" not in settings.describe()


def test_explicit_unreachable_url_fails_loudly(tmp_path):
    env = {"BROKER_URL": f"amqp://guest:guest@127.0.0.1:{free_port()}//", environment.RUN_DIR_ENV: str(tmp_path)}
    with pytest.raises(environment.BrokerError, match="cannot reach the broker .* start RabbitMQ or fix BROKER_URL"):
        environment.check(environment.resolve(env), timeout_s=2)


def test_tuning_reaches_celery_settings(tmp_path):
    """Task events and STARTED states are off by default (the monitor reads the tallies), extended
    results and result confirms on; each knob turns its own Celery setting."""
    settings = environment.resolve({"BROKER_URL": "filesystem://", environment.RUN_DIR_ENV: str(tmp_path)})
    default = create_app(load_config(ROOT / "test-config.yml"), settings)
    tuned = create_app(load_config(ROOT / "bench" / "noop.yml"), settings)
    try:
        assert (default.conf.task_send_sent_event, default.conf.worker_send_task_events,
                default.conf.task_track_started, default.conf.result_extended) == (False, False, False, True)
        assert settings_of(default).config.tuning.result_confirms is True
        assert (tuned.conf.task_send_sent_event, tuned.conf.worker_send_task_events,
                tuned.conf.task_track_started, tuned.conf.result_extended) == (False, False, False, False)
        assert settings_of(tuned).config.tuning.result_confirms is False
    finally:
        default.close()
        tuned.close()


@pytest.mark.parametrize("level, events, lines, built", [
    ("WARNING", False, False, False), ("INFO", False, True, True), ("WARNING", True, False, True),
    # At INFO without task_log_lines (the default) the per-task lines are off: nothing shows the repr.
    ("INFO", False, False, False)])
def test_the_result_repr_is_built_only_where_something_shows_it(app, level, events, lines, built):
    app.conf.worker_send_task_events = events
    both = settings_of(app)
    tuning = both.config.tuning.model_copy(update={"task_log_lines": lines})
    app.conf[CONF_KEY] = dataclasses.replace(both, config=both.config.model_copy(update={"tuning": tuning}))
    loggers = {name: logging.getLogger(name) for name in TASK_LINE_LOGGERS}
    saved = {name: logger.level for name, logger in loggers.items()}
    for logger in loggers.values():
        logger.setLevel(level)
    try:
        celeryd_after_setup.send(sender="worker-a-1@test", instance=SimpleNamespace(app=app), conf=app.conf)
        # Celery's per-task lines: raised to WARNING unless the config asks for them.
        assert loggers["celery.app.trace"].isEnabledFor(logging.INFO) is (level == "INFO" and lines)
    finally:
        for name, logger in loggers.items():
            logger.setLevel(saved[name])
    assert (app.tasks["task_a"].resultrepr_maxsize > 0) is built
    # Whatever the tracer uses, a size of 0 gives nothing and any other size Celery's repr.
    assert trace.saferepr({"a": [1, 2]}, 0) == "" and trace.saferepr({"a": [1, 2]}, 100) == "{'a': [1, 2]}"


@pytest.mark.parametrize("backend, records, events", [("local", "sqlite", False), ("compose", "sqlite", True),
                                                      ("compose", "redis", False), ("compose", "off", False)])
def test_task_events_come_on_where_the_workers_cannot_keep_the_tallies(tmp_path, backend, records, events):
    """A compose stack's containers cannot reach a SQLite file on this machine: they keep no records,
    so no tallies, and the monitor must count their tasks from events; both sides send them."""
    from conveyor.stack.choice import StackChoice

    url = {"sqlite": f"sqlite:///{tmp_path}/r.db", "redis": "redis://127.0.0.1:6379/0", "off": "off"}[records]
    settings = environment.resolve({"BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//", "RECORDS_URL": url,
                                    environment.RUN_DIR_ENV: str(tmp_path)})
    app = create_app(load_config(ROOT / "test-config.yml"), settings, choice=StackChoice(backend, settings, "a test"))
    try:
        assert (app.conf.task_send_sent_event, app.conf.worker_send_task_events) == (events, events)
    finally:
        app.close()
    forced = environment.resolve({"BROKER_URL": "filesystem://", environment.TASK_EVENTS_ENV: "on",
                                  environment.RUN_DIR_ENV: str(tmp_path)})
    assert forced.task_events and forced.worker_env()[environment.TASK_EVENTS_ENV] == "on"
    app = create_app(load_config(ROOT / "test-config.yml"), forced)
    try:
        assert app.conf.worker_send_task_events is True
    finally:
        app.close()
