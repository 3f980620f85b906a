"""Shared fixtures. Two tiers: unit tests need nothing; tests marked `broker` need RabbitMQ on
127.0.0.1:5672 and tests marked `docker` a Docker engine. On a laptop without them they skip;
with CI set they fail instead, so CI can never pass by skipping them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import RABBIT, ROOT, listening, offline_url, private_vhost, unavailable

from conveyor.runtime.app import create_app
from conveyor.settings import environment
from conveyor.settings.config import load_config
from conveyor.settings.context import settings_of


@pytest.fixture(scope="session")
def rabbitmq_url() -> Iterator[str]:
    """A private RabbitMQ virtual host for this test session, deleted afterwards, so the tests
    never touch (or are disturbed by) the queues of a stack the user is running."""
    if not listening(RABBIT):
        unavailable("RabbitMQ on 127.0.0.1:5672")
    base = "amqp://guest:guest@127.0.0.1:5672/"
    with private_vhost(required=False) as vhost:
        if vhost is None:
            yield base + "/"  # no management API (and not in CI): share the default vhost
            return
        yield base + vhost
    _forget_records(vhost)


def _forget_records(vhost: str) -> None:
    """The task records this session's processes wrote to Redis, which keys them by vhost (conveyor/lifecycle)."""
    if listening(environment.DEFAULT_REDIS):
        from conveyor.lifecycle.redis_store import RedisStore

        RedisStore(f"redis://{environment.DEFAULT_REDIS[0]}:{environment.DEFAULT_REDIS[1]}/0", vhost, ttl_s=60).clear()


@pytest.fixture
def offline_env(tmp_path: Path) -> dict[str, str]:
    """Nothing listens at this broker URL: config and usage errors must come before any connection."""
    return {"BROKER_URL": offline_url(), environment.RUN_DIR_ENV: str(tmp_path)}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    path = tmp_path / "run"
    path.mkdir()
    return path


@pytest.fixture
def broker_env(rabbitmq_url: str, run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment (also applied to this process) pointing everything at the test vhost."""
    env = {"BROKER_URL": rabbitmq_url, environment.RUN_DIR_ENV: str(run_dir)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("RESULT_BACKEND", raising=False)
    return env


@pytest.fixture
def embedded_env(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = {"BROKER_URL": environment.EMBEDDED_URL, environment.RUN_DIR_ENV: str(run_dir)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("RESULT_BACKEND", raising=False)
    return env


@pytest.fixture
def make_app(run_dir: Path):
    """Build an app for a config file, against whatever broker the environment names."""
    apps = []

    def make(config_file: Path | str | None = None):
        config = load_config(config_file or ROOT / "test-config.yml")
        app = create_app(config, environment.resolve())
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()


@pytest.fixture
def local_stack(make_app):
    """Start a local worker stack for a config; stops exactly what it started afterwards."""
    from conveyor.stack.local import LocalStack

    stacks = []

    def start(config_file: Path | str | None = None, wait_s: float = 60):
        app = make_app(config_file)
        stack = LocalStack(app, settings_of(app).config)
        stacks.append(stack)
        stack.up(wait_s=wait_s)
        return stack

    yield start
    for stack in stacks:
        stack.down()


