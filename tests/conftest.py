"""Shared fixtures. Two tiers: unit tests need nothing; tests marked `broker` need RabbitMQ on
127.0.0.1:5672 and tests marked `docker` a Docker engine. On a laptop without them they skip;
with CI set they fail instead, so CI can never pass by skipping them."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import RABBIT, ROOT, listening, module_stack, offline_url, private_vhost, unavailable, write_config
from helpers.intake import INTAKE_CONFIG

from conveyor.runtime.app import create_app
from conveyor.settings import environment
from conveyor.settings.config import load_config
from conveyor.settings.context import settings_of
from conveyor.tasks import deadletter
from conveyor.stack import docker_available
from conveyor.stack.compose import compose_command, project_name
from helpers.docker import BASE_IMAGE, OFFLINE_SCRIPT, TEST_IMAGE, image_exists, image_id, project_containers


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



# --- Docker: engine, image, compose project (tests/test_docker.py, tests/test_first_run.py) ----




@pytest.fixture(scope="session")
def docker_engine() -> None:
    """A Docker engine with Compose. The shared CI script starts one (host networking only, a
    stand-in base image) where none runs yet; a machine whose engine already works is left alone."""
    if not docker_available() or not image_exists(BASE_IMAGE):
        if not OFFLINE_SCRIPT.is_file():
            if not docker_available():
                unavailable("Docker")
        else:
            done = subprocess.run(["bash", str(OFFLINE_SCRIPT)], capture_output=True, text=True, timeout=900)
            if done.returncode != 0 or not docker_available():
                unavailable(f"Docker ({OFFLINE_SCRIPT.name} failed: {done.stderr.strip()[-500:]})")
    try:
        compose_command()
    except Exception as exc:
        unavailable(f"Docker Compose ({exc})")


@pytest.fixture(scope="session")
def docker_image(docker_engine) -> str:
    """The worker image, built once per session from the Dockerfile as it is."""
    previous = image_id(TEST_IMAGE)
    started = time.monotonic()
    done = subprocess.run(["docker", "build", "--network", "host", "--tag", TEST_IMAGE, "."],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"docker build failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    print(f"built {TEST_IMAGE} in {time.monotonic() - started:.1f} s")
    if previous and previous != image_id(TEST_IMAGE):
        # The last session's test image, untagged now: remove it rather than let every code change
        # leave one more behind (it stays if a container still uses it).
        subprocess.run(["docker", "image", "rm", previous], capture_output=True, timeout=120)
    return TEST_IMAGE




@pytest.fixture(scope="session")
def compose_project(docker_image) -> str:
    """A compose project name of this session's own; whatever a failed test left in it is removed at the end."""
    name = project_name({"COMPOSE_PROJECT_NAME": f"conveyor-test-{uuid.uuid4().hex[:8]}"})
    yield name
    left = project_containers(name)
    if left:
        subprocess.run(["docker", "rm", "--force", *left], capture_output=True, timeout=120)


# --- one worker per pool, for the tests of what messages do to a worker ---------------------------
@pytest.fixture(scope="module", params=("prefork", "threads", "solo"))
def worker(request, rabbitmq_url, tmp_path_factory):
    """One worker per pool for the module (each test drains the dead-letter queue first): starting
    one per test would only repeat the same few seconds. No message may stop a worker on any pool."""
    home = tmp_path_factory.mktemp(f"bad-input-{request.param}")
    config = INTAKE_CONFIG.replace("concurrency: 1,", f"concurrency: 1, pool: {request.param},")
    with module_stack(rabbitmq_url, home, write_config(home / "c.yml", config)) as stack:
        yield stack


@pytest.fixture
def app(worker):
    deadletter.drain(worker.app)  # whatever earlier tests in the session left there
    return worker.app
