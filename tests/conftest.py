"""Shared fixtures. Two tiers: unit tests need nothing; tests marked `broker` need RabbitMQ on
127.0.0.1:5672 and tests marked `docker` a Docker engine. On a laptop without them they skip;
with CI set they fail instead, so CI can never pass by skipping them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from conveyor.settings import environment
from conveyor.amqp import queues
from conveyor.runtime.app import create_app  # noqa: E402
from conveyor.settings.config import load_config  # noqa: E402

IN_CI = bool(os.environ.get("CI"))
RABBIT = ("127.0.0.1", 5672)


def unavailable(what: str) -> None:
    if IN_CI:
        pytest.fail(f"{what} is required when CI is set")
    pytest.skip(f"{what} is not available")


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.1):
    """Poll until predicate() is truthy; fail naming `what` on timeout. The tests' only way to wait."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def _listening(addr: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(addr, timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def rabbitmq_url() -> Iterator[str]:
    """A private RabbitMQ virtual host for this test session, deleted afterwards, so the tests
    never touch (or are disturbed by) the queues of a stack the user is running."""
    if not _listening(RABBIT):
        unavailable("RabbitMQ on 127.0.0.1:5672")
    base = "amqp://guest:guest@127.0.0.1:5672/"
    vhost = f"conveyor-test-{uuid.uuid4().hex[:8]}"
    try:
        _management("PUT", f"vhosts/{vhost}")
        _management("PUT", f"permissions/{vhost}/guest", b'{"configure":".*","write":".*","read":".*"}')
    except (OSError, urllib.error.URLError) as exc:
        if IN_CI:
            pytest.fail(f"the RabbitMQ management API is required when CI is set: {exc}")
        yield base + "/"  # no management API: share the default vhost
        return
    yield base + vhost
    _management("DELETE", f"vhosts/{vhost}")
    _forget_records(vhost)


def _forget_records(vhost: str) -> None:
    """The task records this session's processes wrote to Redis, which keys them by vhost (conveyor/lifecycle)."""
    if _listening(environment.DEFAULT_REDIS):
        from conveyor.lifecycle.redis_store import RedisStore

        RedisStore(f"redis://{environment.DEFAULT_REDIS[0]}:{environment.DEFAULT_REDIS[1]}/0", vhost, ttl_s=60).clear()


def _management(method: str, path: str, body: bytes | None = None) -> None:
    """A call to the local RabbitMQ's management API as guest (vhosts and users for the tests)."""
    queues.management_request(environment.DEFAULT_BROKER_URL, path, method, body, timeout_s=10)


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


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


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
        stack = LocalStack(app, app.conveyor_config)
        stacks.append(stack)
        stack.up(wait_s=wait_s)
        return stack

    yield start
    for stack in stacks:
        stack.down()


@contextmanager
def module_stack(rabbitmq_url: str, run_dir: Path, config_file: Path, **env: str | None) -> Iterator:
    """A local stack for a whole test module (starting one per test would only repeat the same few
    seconds), on the session's vhost with a run directory of its own. Its environment (plus `env`;
    None unsets a variable) holds while the stack runs, so run_cli sees the same broker and stack."""
    from conveyor.stack.local import LocalStack

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BROKER_URL", rabbitmq_url)
        patch.setenv(environment.RUN_DIR_ENV, str(run_dir))
        patch.delenv("RESULT_BACKEND", raising=False)
        for name, value in env.items():
            if value is None:
                patch.delenv(name, raising=False)
            else:
                patch.setenv(name, value)
        app = create_app(load_config(config_file), environment.resolve())
        stack = LocalStack(app, app.conveyor_config)
        try:
            stack.up(wait_s=60)
            yield stack
        finally:
            stack.down()
            app.close()


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a top-level script the way a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def queue_depth(app, name: str) -> int:
    return queues.stats(app, [name])[0].messages_ready or 0


@contextmanager
def private_vhost(prefix: str) -> Iterator[str]:
    """A virtual host of the caller's own (yielded as its broker URL), deleted afterwards: for queues
    declared with other arguments than the session vhost's, which RabbitMQ would refuse there."""
    vhost = f"{prefix}-{uuid.uuid4().hex[:8]}"
    try:
        _management("PUT", f"vhosts/{vhost}")
        _management("PUT", f"permissions/{vhost}/guest", b'{"configure":".*","write":".*","read":".*"}')
    except (OSError, urllib.error.URLError):
        unavailable("the RabbitMQ management API")
    try:
        yield f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    finally:
        _management("DELETE", f"vhosts/{vhost}")


def settled(store, task_id: str, status: str, timeout_s: float = 20):
    """The task's record, once it reaches `status` (the result can arrive a moment before the record)."""
    return wait_for(lambda: (r := store.get(task_id)) is not None and r.status == status and r, timeout_s,
                    f"task {task_id} to be recorded {status}")


def statuses(record) -> list[str]:
    return [e.status for e in record.history]
