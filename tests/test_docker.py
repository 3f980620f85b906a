"""The worker stack in Docker (and the same scaling tests on the local-process stack).

The compose tests run the host compose file (docker-compose.host.yml): containers on the host
network against the RabbitMQ on 127.0.0.1, in the session's private vhost, under a compose project
of their own, so they never touch a stack the user is running. Each test stops what it started.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, free_port, queue_depth, run_cli, wait_for, write_config
from helpers.docker import TEST_IMAGE, project_containers, project_networks
from helpers.flower import answers, rendered
from kombu import Queue

from conveyor.chaos.actors import Killer
from conveyor.stack import control
from conveyor.errors import StackError
from conveyor.stack.compose import ComposeStack, compose_command, project_name
from conveyor.stack.local import LocalStack
from conveyor.settings.context import settings_of

STOP_GRACE_S = 20
WAIT_S = 90  # for replicas to answer; 2 cores start three containers in a few seconds

CONFIG = f"""\
name: stack tests
expected_workers: 2
tasks:
  - task: task_a
    count: 1
services:
  - name: worker-a
    queues: [queue_a]
    concurrency: 1
    replicas: 1
  - name: worker-b
    queues: [queue_b]
    concurrency: 1
    replicas: 1
limits:
  max_replicas: 4
stop_grace_s: {STOP_GRACE_S}
tuning: {{task_events: true}}  # a test counts each replica's task-started events (Flower's view too)
"""

SHOW_LOGS = """\
import sys
from conveyor.runtime.app import create_app
from conveyor.settings.config import load_config
from conveyor.stack import open_stack
from conveyor.settings.context import settings_of
app = create_app(load_config(sys.argv[1]))
open_stack(app, settings_of(app).config, sys.argv[2]).logs(follow=False)
"""

docker = [pytest.mark.docker, pytest.mark.broker]
BACKENDS = [
    pytest.param("local", id="local", marks=[pytest.mark.broker]),
    pytest.param("compose", id="compose", marks=docker),
]


# --- a stack of either backend ------------------------------------------------------------
@pytest.fixture(params=BACKENDS)
def stack_up(request, broker_env, make_app, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Start the test config's stack on the parametrised backend; stop exactly it afterwards."""
    backend = request.param
    if backend == "compose":
        monkeypatch.setenv("COMPOSE_PROJECT_NAME", request.getfixturevalue("compose_project"))
        monkeypatch.setenv("CONVEYOR_IMAGE", TEST_IMAGE)
        monkeypatch.delenv("COMPOSE_FILES", raising=False)
    config_file = write_config(tmp_path / "stack-config.yml", CONFIG)
    started = []

    def start():
        app = make_app(config_file)
        stack = (ComposeStack if backend == "compose" else LocalStack)(app, settings_of(app).config)
        started.append(stack)
        began = time.monotonic()
        stack.up(wait_s=WAIT_S)
        print(f"{backend} stack up in {time.monotonic() - began:.1f} s")
        return app, stack

    yield start
    for stack in started:
        stack.down()


def _send(app, task: str, count: int, **params) -> list:
    return [app.tasks[task].apply_async(kwargs=params) for _ in range(count)]


def _collect(results: list, timeout_s: float) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    return [r.get(timeout=max(0.1, deadline - time.monotonic())) for r in results]


def _nodes(app, service: str) -> list[str]:
    return control.nodes_of(control.ping(app), service)


def _ids(stack, service: str) -> list[str]:
    return sorted(r.ident for r in stack.replicas() if r.service == service and r.running)


class TaskEvents:
    """Counts the workers' task events (task-started, task-succeeded) per task id, from a queue of
    our own bound to Celery's event exchange, declared before the tasks are sent so none is missed."""

    def __init__(self, app) -> None:
        from celery.events.event import get_exchange

        self.app = app
        with app.connection_for_write() as conn:
            exchange = get_exchange(conn, name=app.conf.event_exchange)
            self.queue = Queue(f"conveyor-test-events-{uuid.uuid4().hex[:8]}", exchange, routing_key="task.#",
                               durable=False, auto_delete=False, expires=600)
            self.queue(conn.default_channel).declare()
        self.counts: dict[str, Counter] = {}
        self.hosts: dict[str, set[str]] = {}

    def poll(self) -> TaskEvents:
        with self.app.connection_for_read() as conn:
            queue = conn.SimpleQueue(self.queue, no_ack=True)
            try:
                while True:
                    try:
                        message = queue.get(block=False)
                    except queue.Empty:
                        break
                    # A prefork worker sends task events in batches (routing key task.multi).
                    batch = message.payload if isinstance(message.payload, list) else [message.payload]
                    for event in batch:
                        self.counts.setdefault(event["type"], Counter())[event["uuid"]] += 1
                        self.hosts.setdefault(event["type"], set()).add(event.get("hostname", ""))
            finally:
                queue.close()
        return self

    def of(self, kind: str) -> Counter:
        return self.counts.get(kind, Counter())

    def delete(self) -> None:
        with self.app.connection_for_write() as conn:
            self.queue(conn.default_channel).delete()


# --- the compose files, as files -----------------------------------------------------------
def _compose_yaml(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.host.yml"])
def test_compose_files_allow_scaling_and_stay_on_loopback(name: str) -> None:
    services = _compose_yaml(name)["services"]
    assert {"worker-a", "worker-b"} <= set(services)
    for service_name, service in services.items():
        assert "container_name" not in service, f"{service_name} sets container_name, which blocks scaling"
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{service_name} publishes {port} beyond loopback"
    for worker in ("worker-a", "worker-b"):
        service = services[worker]
        assert service["environment"]["WORKER_SERVICE"] == worker
        assert service["restart"] in ("always", "unless-stopped", "on-failure")
        grace = service["stop_grace_period"].rsplit(":-", 1)[-1].rstrip("}")
        assert int(grace.rstrip("s")) > 30, "stop_grace_period must outlast the longest task (and stop_grace_s)"
        assert "build" in service and service["image"]
    assert services["flower"]["profiles"] == ["flower"]
    # Flower is built from our Dockerfile (nothing to pull), the workers from its worker stage.
    assert services["flower"]["build"]["target"] == "flower" and "conveyor-flower" in services["flower"]["image"]
    assert all(services[w]["build"]["target"] == "worker" for w in ("worker-a", "worker-b"))


def test_full_compose_file_has_a_healthy_broker_with_its_own_credentials() -> None:
    services = _compose_yaml("docker-compose.yml")["services"]
    assert services["rabbitmq"]["image"] == "${CONVEYOR_BROKER_IMAGE:-rabbitmq:4-management}"  # RabbitMQ 4 unless the user names another
    # Its Prometheus plugin's port, on loopback like the others.
    assert any(str(p).startswith("127.0.0.1:") and str(p).endswith(":15692") for p in services["rabbitmq"]["ports"])
    env = services["rabbitmq"]["environment"]
    assert "guest" not in str(env) and "${RABBITMQ_PASSWORD:?" in env["RABBITMQ_DEFAULT_PASS"]
    assert services["rabbitmq"]["healthcheck"]["test"]
    for worker in ("worker-a", "worker-b"):
        assert services[worker]["depends_on"]["rabbitmq"]["condition"] == "service_healthy"


def test_host_compose_file_uses_the_host_network_and_the_environment_broker() -> None:
    services = _compose_yaml("docker-compose.host.yml")["services"]
    assert "rabbitmq" not in services
    for name, service in services.items():
        assert service["network_mode"] == "host", name
    for worker in ("worker-a", "worker-b"):
        assert services[worker]["build"]["network"] == "host"
        assert services[worker]["environment"]["BROKER_URL"].startswith("${BROKER_URL:?")


@pytest.mark.docker
def test_compose_files_parse_with_the_installed_compose(docker_engine) -> None:
    env = {**os.environ, "RABBITMQ_USER": "someone", "RABBITMQ_PASSWORD": "secret",
           "BROKER_URL": "amqp://someone:secret@127.0.0.1:5672//"}
    for name in ("docker-compose.yml", "docker-compose.host.yml"):
        done = subprocess.run([*compose_command(), "--file", name, "--profile", "flower", "config", "--quiet"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{name}: {done.stderr}"


# --- the image -------------------------------------------------------------------------------
@pytest.mark.docker
def test_image_builds_and_runs_as_non_root(docker_image: str) -> None:
    uid = subprocess.run(["docker", "run", "--rm", "--network", "host", "--entrypoint", "id", docker_image, "-u"],
                         capture_output=True, text=True, timeout=60)
    assert uid.returncode == 0, uid.stderr
    assert uid.stdout.strip() != "0"
    inspect = subprocess.run(["docker", "image", "inspect", "--format",
                              "{{json .Config.Entrypoint}} {{json .Config.Healthcheck.Test}}", docker_image],
                             capture_output=True, text=True, check=True).stdout
    assert '["python","-m","conveyor.stack.launcher"]' in inspect
    assert "conveyor.stack.healthcheck" in inspect


# --- scaling: the same tests for both backends ------------------------------------------------
@pytest.mark.timeout(300)
def test_scaling_one_service_leaves_the_other_alone(stack_up) -> None:
    app, stack = stack_up()
    assert control.responding(app) == Counter({"worker-a": 1, "worker-b": 1})
    b_before = _ids(stack, "worker-b")
    assert len(b_before) == 1

    stack.scale("worker-a", 3, wait_s=WAIT_S)
    a_nodes = wait_for(lambda: len(_nodes(app, "worker-a")) == 3 and _nodes(app, "worker-a"), 30, "3 worker-a replicas")
    results = _collect(_send(app, "task_a", 12, duration_s=0.3), timeout_s=90)
    assert {r["worker"] for r in results} == set(a_nodes), "the burst was not spread over every worker-a replica"

    assert _ids(stack, "worker-b") == b_before, "scaling worker-a restarted or replaced worker-b"
    assert len(_nodes(app, "worker-b")) == 1
    assert stack.desired() == {"worker-a": 3, "worker-b": 1}
    assert stack.running() == {"worker-a": 3, "worker-b": 1}

    if stack.name == "compose":
        # The healthcheck pings its own replica's node: healthy for a live one, not for any other name.
        container = _ids(stack, "worker-a")[0]
        ok = subprocess.run(["docker", "exec", container, "python", "-m", "conveyor.stack.healthcheck"],
                            capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0, ok.stderr
        bad = subprocess.run(["docker", "exec", container, "sh", "-c",
                              "echo worker-a-nobody@nowhere > /tmp/other-node && "
                              "python -m conveyor.stack.healthcheck --node-file /tmp/other-node --timeout 1"],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 1 and "did not answer" in bad.stderr


@pytest.mark.timeout(300)
def test_scale_to_zero_queues_tasks_until_a_replica_returns(stack_up) -> None:
    app, stack = stack_up()
    stack.scale("worker-a", 0, wait_s=WAIT_S)
    wait_for(lambda: not _nodes(app, "worker-a"), 30, "worker-a to stop answering")
    assert stack.running()["worker-a"] == 0 and stack.running()["worker-b"] == 1

    results = _send(app, "task_a", 5, duration_s=0.1)
    # The management API refreshes queue statistics every few seconds: wait for them to show the five.
    wait_for(lambda: queue_depth(app, "queue_a") == 5, 30, "5 task_a messages waiting in queue_a")
    assert not any(r.ready() for r in results)

    stack.scale("worker-a", 1, wait_s=WAIT_S)
    assert all(r["task"] == "task_a" for r in _collect(results, timeout_s=60))
    wait_for(lambda: queue_depth(app, "queue_a") == 0, 30, "queue_a to drain")


@pytest.mark.timeout(300)
def test_scaling_down_mid_burst_completes_every_task_once(stack_up) -> None:
    app, stack = stack_up()
    stack.scale("worker-a", 3, wait_s=WAIT_S)
    wait_for(lambda: len(_nodes(app, "worker-a")) == 3, 30, "3 worker-a replicas")
    events = TaskEvents(app)
    try:
        results = _send(app, "task_a", 9, duration_s=1.5)
        # Scale down only once every replica is busy, so that two of them stop with a task running.
        wait_for(lambda: len(events.poll().hosts.get("task-started", ())) == 3, 30, "all 3 replicas to start a task")
        stack.scale("worker-a", 1, wait_s=WAIT_S)
        survivors = _nodes(app, "worker-a")
        assert len(survivors) == 1

        done = _collect(results, timeout_s=120)
        ids = [r.id for r in results]
        assert len(set(ids)) == len(ids) and all(r.successful() for r in results)
        stopped = {r["worker"] for r in done} - set(survivors)
        assert len(stopped) == 2, f"the replicas scaled away should have finished their tasks: {stopped}"

        wait_for(lambda: len(events.poll().of("task-succeeded")) == len(ids), 30, "a task-succeeded event per task")
        started, succeeded = events.of("task-started"), events.of("task-succeeded")
        assert set(started) == set(ids) and set(succeeded) == set(ids)
        assert max(started.values()) == 1, f"tasks ran more than once: {[i for i, n in started.items() if n > 1]}"
        assert max(succeeded.values()) == 1
    finally:
        events.delete()


@pytest.mark.timeout(300)
def test_down_leaves_nothing_behind(stack_up) -> None:
    app, stack = stack_up()
    wait_for(lambda: len(control.ping(app)) == 2, 30, "both workers to answer")
    processes = _stack_processes(stack)
    assert len(processes) >= 2
    # `make logs` goes through the stack's logs(), which replaces its process: run it in a child.
    shown = run_cli("-c", SHOW_LOGS, str(stack.config.source), stack.name, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "worker-a" in shown.stdout and "ready." in shown.stdout
    stack.down()

    assert stack.replicas() == []
    assert not control.ping(app)
    left = [pid for pid, started in processes.items() if _start_time(pid) == started]
    assert left == [], f"worker processes left running: {left}"
    if stack.name == "compose":
        assert project_containers(stack.project) == []
        assert project_networks(stack.project) == []
    else:
        assert list(stack.home.glob("*.pid")) == []


def _stack_processes(stack) -> dict[int, int]:
    """Every process of the stack's replicas and their pool children, as pid -> start time (so a
    reused pid is not mistaken for a survivor). Container processes are host processes too."""
    idents = [r.ident for r in stack.replicas()]
    if stack.name == "compose":
        out = subprocess.run(["docker", "inspect", "--format", "{{.State.Pid}}", *idents],
                             capture_output=True, text=True, check=True).stdout
        roots = {int(pid) for pid in out.split() if int(pid) > 0}
    else:
        roots = {int(pid) for pid in idents}
    parents = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = set(roots), set(roots)
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return {pid: started for pid in found if (started := _start_time(pid)) is not None}


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None when no such process runs."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if fields[0] in ("Z", "X"):  # exited, waiting only to be reaped
        return None
    return int(fields[19])


# --- choosing files and refusing what cannot work (no Docker needed) ---------------------------
def test_compose_file_follows_where_the_broker_is() -> None:
    from conveyor.stack.compose import compose_files

    host, full = [ROOT / "docker-compose.host.yml"], [ROOT / "docker-compose.yml"]
    # A broker of the app's own, here or on another machine: containers on the host network reach it as the host does.
    assert compose_files(own_broker=False, env={}) == host
    # No broker anywhere: the stack brings its own RabbitMQ.
    assert compose_files(own_broker=True, env={}) == full
    assert compose_files(False, {"COMPOSE_FILES": "docker-compose.yml"}) == full
    with pytest.raises(StackError, match="does not exist"):
        compose_files(False, {"COMPOSE_FILES": "no-such-compose.yml"})


def test_project_name_is_normalised_as_compose_does() -> None:
    assert project_name({}) == "conveyor"
    assert project_name({"COMPOSE_PROJECT_NAME": "My.Stack_1"}) == "mystack_1"


def test_containers_refuse_the_embedded_broker(embedded_env, make_app, tmp_path: Path) -> None:
    app = make_app(write_config(tmp_path / "stack-config.yml", CONFIG))
    stack = ComposeStack(app, settings_of(app).config)
    with pytest.raises(StackError, match="embedded filesystem broker"):
        stack.scale("worker-a", 1)
    with pytest.raises(StackError, match="embedded filesystem broker"):
        stack.up()


def test_containers_refuse_a_config_they_cannot_read(make_app, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")  # not contacted
    monkeypatch.setenv("CONVEYOR_RUN_DIR", str(tmp_path / "run"))
    config_file = write_config(tmp_path / "private-config.yml", CONFIG)
    config_file.chmod(0o600)
    app = make_app(config_file)
    with pytest.raises(StackError, match="chmod o\\+r"):
        ComposeStack(app, settings_of(app).config).scale("worker-a", 1)


@pytest.mark.timeout(300)
def test_the_chaos_killer_kills_a_replica_and_the_stack_brings_it_back(stack_up) -> None:
    """The chaos killer on either stack: SIGKILL (a compose replica's container through the Docker
    SDK, a local one's process group), then the replica count is restored and tasks run again."""
    app, stack = stack_up()
    wait_for(lambda: len(control.ping(app)) == 2, 30, "both workers to answer")
    started_at = {c.id[:12]: c.attrs["State"]["StartedAt"] for c in
                  (stack.engine.containers.get(r.ident) for r in stack.replicas())} if stack.name == "compose" else {}
    killer = Killer(stack, replicas=1, every_s=1, seed=7)
    killer.start()
    try:
        wait_for(lambda: killer.kills >= 1, 30, "the killer's first kill")
    finally:
        killer.stop.set()
        killer.join(timeout=120)
    assert not killer.is_alive()
    [victim] = killer.victims
    wait_for(lambda: control.responding(app) == Counter({"worker-a": 1, "worker-b": 1}), WAIT_S,
             "one replica of each service to answer again")
    assert sorted(r.service for r in stack.replicas() if r.running) == ["worker-a", "worker-b"]
    if stack.name == "compose":
        # compose started the killed container again (the same one: --no-recreate), later than before.
        container = stack.engine.containers.get(victim.ident)
        assert container.status == "running" and container.attrs["State"]["StartedAt"] > started_at[victim.ident]
    else:
        assert victim.ident not in {r.ident for r in stack.replicas()}  # a new process took its place
    results = _collect(_send(app, "task_a", 2, duration_s=0) + _send(app, "task_b", 2, duration_s=0), timeout_s=60)
    assert len(results) == 4


@pytest.mark.timeout(900)
@pytest.mark.parametrize("stack_up", [pytest.param("compose", marks=docker)], indirect=True)
def test_the_compose_flower_service_is_built_from_our_image_and_sees_the_stack(stack_up, tmp_path) -> None:
    """`docker compose --profile flower up --build flower`, as docs/deployment.md says: built from
    the Dockerfile's flower stage (nothing pulled), on the same broker and config as the workers,
    its Broker tab on the management API; checked in headless Chromium."""
    app, stack = stack_up()
    nodes = wait_for(lambda: len(control.ping(app)) == 2 and control.ping(app), 30, "both workers to answer")
    port, image = free_port(), f"conveyor-flower:test-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, **stack.settings.worker_env(), "COMPOSE_PROJECT_NAME": stack.project,
           "CONVEYOR_CONFIG_FILE": str(stack.config.source), "FLOWER_PORT": str(port), "CONVEYOR_FLOWER_IMAGE": image}
    up = subprocess.run([*compose_command(), "--file", "docker-compose.host.yml", "--profile", "flower",
                         "up", "--detach", "--build", "flower"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=800)
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        [container] = [stack.engine.containers.get(c.id) for c in stack.containers("flower")]
        assert container.image.tags == [image]  # our build, under the name the compose file gives it
        assert container.attrs["Config"]["Entrypoint"] == ["python", "-m", "conveyor.cli.flower"]
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: answers(url), 60, "the Flower container to answer", interval_s=0.5)
        wait_for(lambda: all(n in rendered(f"{url}/workers", tmp_path / "p0") for n in nodes), 60,
                 "Flower in its container to list every worker", interval_s=1)
        assert "queue_a" in rendered(f"{url}/broker", tmp_path / "p1")
    finally:
        for found in stack.containers("flower"):
            found.remove(force=True)
        subprocess.run(["docker", "image", "rm", image], capture_output=True, timeout=120)
