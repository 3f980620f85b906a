"""`make run` on any machine: every combination of broker reachable or not, Docker engine or not, and
Docker without the broker image, each a real `dispatch.py --start-stack` to a full report (what
`make run` runs), then a check that nothing is left running and no file was written outside the
run directory.

No broker: a private network namespace (`unshare --net`, loopback up) where nothing listens on
127.0.0.1:5672; the Docker engine's unix socket is still reachable from it. No Docker: DOCKER_HOST
pointing at a socket that does not exist, or a PATH without docker. No broker image: an image name
that does not exist. With a broker, the session's private vhost through BROKER_URL (never the
shared default vhost); the decision for the broker found by the probe is checked on its own.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from helpers import ROOT, unavailable
from helpers.docker import BASE_IMAGE, project_containers, project_networks

from conveyor.settings import environment
from conveyor.runtime.app import create_app
from conveyor.settings.config import load_config
from conveyor.errors import StackError
from conveyor.stack import credentials
from conveyor.stack.compose import DEFAULT_BROKER_IMAGE, ComposeStack
from conveyor.stack.local import alive
from conveyor.settings.context import settings_of

RUN_S = 120  # one `make run` of test-config.yml; on the embedded broker it takes about 15 s on 2 cores
DECIDE = """\
import json
from conveyor.stack.choice import choose
c = choose()
print(json.dumps({"backend": c.backend, "url": c.broker.broker_url, "embedded": c.broker.embedded,
                  "own_broker": c.own_broker, "broker_up": c.broker_up, "line": c.describe()}))
"""


# --- how the machine is made to lack something ------------------------------------------------
@pytest.fixture(scope="session")
def netns() -> list[str]:
    """The argv prefix that runs a command in a private network namespace with its loopback up."""
    tools = [shutil.which(name) for name in ("unshare", "sh", "ip")]
    if not all(tools) or subprocess.run([tools[0], "--net", "true"], capture_output=True).returncode != 0:
        unavailable("a private network namespace (unshare --net, as root)")
    unshare, sh, ip = tools
    return [unshare, "--net", sh, "-c", '"$0" link set lo up && exec "$@"', ip]


@pytest.fixture
def machine(tmp_path: Path) -> dict[str, str]:
    """The environment of one first run: a run directory and a compose project of its own, none of
    the variables that choose explicitly, and no bytecode written (so that any file the run creates
    shows up)."""
    chosen = ("BROKER_URL", "RESULT_BACKEND", "RECORDS_URL", "STACK", "COMPOSE_FILES", "DOCKER_HOST", "CONVEYOR_IMAGE",
              "CONVEYOR_BROKER_IMAGE", "RABBITMQ_USER", "RABBITMQ_PASSWORD", "RABBITMQ_PORT", "CONVEYOR_CONFIG")
    env = {k: v for k, v in os.environ.items() if k not in chosen}
    env.update({environment.RUN_DIR_ENV: str(tmp_path / "run"), "COMPOSE_PROJECT_NAME": f"conveyor-first-{uuid.uuid4().hex[:8]}",
                "PYTHONDONTWRITEBYTECODE": "1"})
    return env


def no_docker(how: str, env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    if how == "docker_host":
        return {**env, "DOCKER_HOST": f"unix://{tmp_path / 'no-engine.sock'}"}
    bare = tmp_path / "bin-without-docker"
    bare.mkdir()
    return {**env, "PATH": str(bare)}


def no_image(env: dict[str, str]) -> dict[str, str]:
    return {**env, "CONVEYOR_BROKER_IMAGE": f"conveyor-test-no-such-image:{uuid.uuid4().hex[:8]}"}


# --- running and checking ---------------------------------------------------------------------
def first_run(env: dict[str, str], prefix: list[str] | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    """`make run` as a new user would meet it (its own command, dispatch.py --start-stack), with
    --json for the report; fails the test if anything it started outlives it."""
    before = _tree()
    proc = subprocess.run([*(prefix or []), sys.executable, "dispatch.py", "--start-stack", "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=RUN_S)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    report = json.loads(proc.stdout)
    assert report["succeeded"] == len(report["tasks"]) > 0, report
    assert_nothing_left(env, before)
    return proc, report


def assert_nothing_left(env: dict[str, str], before: list[str]) -> None:
    run_dir = Path(env[environment.RUN_DIR_ENV])
    assert _processes_of(run_dir) == [], "processes of the run are still running"
    assert not list(run_dir.glob("local/*.pid")), "pid files of the run's workers are left"
    if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        project = env["COMPOSE_PROJECT_NAME"]
        assert project_containers(project) == [] and project_networks(project) == []
    assert _tree() == before, "the run wrote files outside its run directory"


def _tree() -> list[str]:
    """Every untracked or ignored path of the checkout, as git sees it."""
    return subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.splitlines()


def _processes_of(run_dir: Path) -> list[int]:
    """Live processes started for this run directory: the stacks hand it to every worker (and the
    pool children inherit it), so none can hide under another name."""
    mark = f"{environment.RUN_DIR_ENV}={run_dir}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if mark in environ and alive(proc.name):
            found.append(int(proc.name))
    return found


def decision_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("Using ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def decide(env: dict[str, str], prefix: list[str] | None = None) -> dict:
    done = subprocess.run([*(prefix or []), sys.executable, "-c", DECIDE], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# --- the combinations, each a full run ----------------------------------------------------------
@pytest.mark.docker
@pytest.mark.timeout(300)
def test_docker_without_broker_or_broker_image_runs_local_workers_on_the_embedded_broker(netns, docker_engine, machine):
    env = no_image(machine)
    proc, _report = first_run(env, netns)
    line = decision_line(proc)
    assert "embedded filesystem broker" in line and "local stack" in line
    assert env["CONVEYOR_BROKER_IMAGE"] in line and "cannot be pulled" in line
    assert "starting the local stack" in proc.stderr and "Missing mandatory value" not in proc.stderr
    assert subprocess.run(["docker", "image", "inspect", env["CONVEYOR_BROKER_IMAGE"]], capture_output=True).returncode != 0


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["docker_host", "path"])
def test_neither_broker_nor_docker_runs_local_workers_on_the_embedded_broker(netns, machine, tmp_path, how):
    proc, _report = first_run(no_docker(how, machine, tmp_path), netns)
    line = decision_line(proc)
    assert "embedded filesystem broker" in line and "local stack" in line and "no Docker engine" in line


@pytest.mark.broker
@pytest.mark.timeout(300)
def test_broker_without_docker_runs_local_workers_on_it(rabbitmq_url, machine, tmp_path):
    proc, report = first_run({**no_docker("path", machine, tmp_path), "BROKER_URL": rabbitmq_url})
    line = decision_line(proc)
    assert "local stack" in line and "no Docker engine" in line and "embedded" not in line
    assert {t["worker"].split("@")[0] for t in report["tasks"]} == {"worker-a-1", "worker-b-1"}


@pytest.mark.broker
@pytest.mark.docker
@pytest.mark.timeout(600)
def test_broker_and_docker_run_workers_in_containers(rabbitmq_url, docker_image, machine):
    env = {**machine, "BROKER_URL": rabbitmq_url, "CONVEYOR_IMAGE": docker_image}
    proc, report = first_run(env)
    line = decision_line(proc)
    assert "compose stack" in line and "a Docker engine answers" in line
    assert "Stopped the compose stack this run started." in proc.stderr
    # Container workers have random node names (SERVICE-<hex>@host), unlike local ones (SERVICE-1@host).
    assert {t["worker"].split("@")[0].rsplit("-", 1)[0] for t in report["tasks"]} == {"worker-a", "worker-b"}
    assert not {t["worker"].split("@")[0] for t in report["tasks"]} & {"worker-a-1", "worker-b-1"}


# --- the decision itself, for what a full run cannot show here ----------------------------------
@pytest.mark.broker
def test_a_broker_found_on_loopback_without_docker_gets_local_workers(rabbitmq_url, machine, tmp_path):
    made = decide(no_docker("path", machine, tmp_path))
    assert made["url"] == environment.DEFAULT_BROKER_URL and not made["own_broker"] and made["backend"] == "local"
    assert "RabbitMQ answers on 127.0.0.1:5672 and no Docker engine does" in made["line"]


@pytest.mark.broker
@pytest.mark.docker
def test_a_broker_found_on_loopback_with_docker_gets_containers(rabbitmq_url, docker_engine, machine):
    made = decide(machine)
    assert made["url"] == environment.DEFAULT_BROKER_URL and not made["own_broker"] and made["backend"] == "compose"
    assert "RabbitMQ answers on 127.0.0.1:5672 and so does a Docker engine" in made["line"]


@pytest.mark.docker
def test_docker_with_the_broker_image_brings_its_own_broker_with_private_credentials(netns, docker_engine, machine):
    """The branch this machine cannot run end to end (no RabbitMQ image, no registry): an image that
    is present stands in for it, and the decision is checked, not acted on."""
    env = {**machine, "CONVEYOR_BROKER_IMAGE": BASE_IMAGE}
    made = decide(env, netns)
    assert made["backend"] == "compose" and made["own_broker"] and not made["broker_up"] and not made["embedded"]
    assert "compose starts its own RabbitMQ" in made["line"] and BASE_IMAGE in made["line"]
    file = credentials.path(env["COMPOSE_PROJECT_NAME"], env)
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    saved = credentials.load(env["COMPOSE_PROJECT_NAME"], env)
    assert made["url"] == f"amqp://{saved.user}:{saved.password}@127.0.0.1:5672//" and saved.password not in made["line"]
    assert decide(env, netns)["url"] == made["url"], "the credentials must be generated once and reused"


@pytest.mark.docker
def test_the_projects_running_compose_broker_is_what_every_later_command_uses(netns, docker_engine, machine):
    """After `make up` started compose's own RabbitMQ, status, down and run must use it, not decide
    afresh. A container carrying the labels compose gives the project's broker service stands in
    for it (no RabbitMQ image here): only the decision is checked, which reads nothing but them."""
    project = machine["COMPOSE_PROJECT_NAME"]
    saved = credentials.ensure(project, machine)
    labels = ["--label", f"com.docker.compose.project={project}", "--label", "com.docker.compose.service=rabbitmq"]
    started = subprocess.run(["docker", "run", "--detach", "--rm", "--network", "host", *labels, BASE_IMAGE, "sleep", "300"],
                             capture_output=True, text=True, timeout=60)
    assert started.returncode == 0, started.stderr
    try:
        made = decide(machine, netns)
        assert made["backend"] == "compose" and made["own_broker"] and made["broker_up"]
        assert made["url"] == saved.url(machine) and "the compose stack's own RabbitMQ is running" in made["line"]
        local = decide({**machine, "STACK": "local"}, netns)
        assert local["backend"] == "local" and not local["own_broker"] and local["url"] == saved.url(machine)
    finally:
        subprocess.run(["docker", "rm", "--force", started.stdout.strip()], capture_output=True, timeout=60)
    assert project_containers(project) == []


@pytest.mark.docker
def test_the_own_broker_compose_file_interpolates_without_a_dot_env(docker_engine, machine, monkeypatch, tmp_path):
    """What made the first run stop before: compose's `Missing mandatory value ... RABBITMQ_USER`."""
    for key, value in machine.items():
        monkeypatch.setenv(key, value)
    for key in ("RABBITMQ_USER", "RABBITMQ_PASSWORD", "BROKER_URL"):
        monkeypatch.delenv(key, raising=False)
    made = credentials.ensure(machine["COMPOSE_PROJECT_NAME"])
    settings = environment.resolve({**machine, "BROKER_URL": made.url()})
    app = create_app(load_config(ROOT / "test-config.yml"), settings)
    try:
        stack = ComposeStack(app, settings_of(app).config, own_broker=True)
        assert [f.name for f in stack.files] == ["docker-compose.yml"]
        assert "rabbitmq" in stack.services  # `compose config` ran, with every mandatory value set
        env = stack._env()
        assert env["RABBITMQ_USER"] == made.user and env["CONVEYOR_BROKER_IMAGE"] == DEFAULT_BROKER_IMAGE
    finally:
        app.close()


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"STACK": "compose", "DOCKER_HOST": "unix:///nonexistent/docker.sock"}, ["no Docker engine answers"]),
        ({"STACK": "compose", "BROKER_URL": "filesystem://"}, ["embedded filesystem broker", "containers cannot"]),
        ({"STACK": "compose", "BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//", "PATH": "/nonexistent"},
         ["no Docker engine answers"]),
    ],
    ids=["compose-without-docker", "compose-with-the-embedded-broker", "compose-on-a-broker-without-docker"],
)
def test_containers_asked_for_where_they_cannot_work_is_one_line(netns, machine, env, words):
    before = _tree()
    proc = subprocess.run([*netns, sys.executable, "dispatch.py", "--start-stack"], cwd=ROOT, env={**machine, **env},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == StackError.exit_code, proc.stderr
    assert "Traceback" not in proc.stderr and "Missing mandatory value" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and all(word in errors[0] for word in words), proc.stderr
    assert_nothing_left(machine, before)


@pytest.mark.docker
def test_containers_asked_for_without_a_broker_image_is_one_line(netns, docker_engine, machine):
    proc = subprocess.run([*netns, sys.executable, "dispatch.py", "--start-stack"], cwd=ROOT,
                          env={**no_image(machine), "STACK": "compose"}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == StackError.exit_code, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "cannot start a RabbitMQ" in errors[0] and "STACK=local" in errors[0], proc.stderr


@pytest.mark.timeout(300)
@pytest.mark.parametrize("docker", [pytest.param(True, marks=pytest.mark.docker), False], ids=["no-image", "no-docker"])
def test_every_command_reports_the_same_decision(netns, machine, tmp_path, request, docker):
    """make status, make down and make monitor decide as make run does, and say it in the same words."""
    if docker:
        request.getfixturevalue("docker_engine")
    env = no_image(machine) if docker else no_docker("docker_host", machine, tmp_path)
    commands = [["dispatch.py", "--start-stack", "--json"], ["scale.py", "status"], ["scale.py", "down"],
                ["monitor.py", "--once", "--no-prometheus"]]
    lines = set()
    for argv in commands:
        proc = subprocess.run([*netns, sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=RUN_S)
        assert proc.returncode == 0, f"{argv}: {proc.stderr}"
        lines.add(decision_line(proc))
    assert len(lines) == 1, lines
    assert "embedded filesystem broker" in lines.pop()


# --- the credentials file ---------------------------------------------------------------------------
def test_credentials_are_generated_once_and_readable_only_by_the_user(tmp_path):
    env = {environment.RUN_DIR_ENV: str(tmp_path)}
    assert credentials.load("p", env) is None
    first = credentials.ensure("p", env)
    file = credentials.path("p", env)
    assert stat.S_IMODE(file.stat().st_mode) == 0o600 and first.password in file.read_text()
    assert len(first.password) >= 24
    assert credentials.ensure("p", env) == first
    assert credentials.ensure("other", env).password != first.password
    assert credentials.load("p", {**env, "RABBITMQ_USER": "me", "RABBITMQ_PASSWORD": "x/y"}).url(env) == \
        "amqp://me:x%2Fy@127.0.0.1:5672//"
    file.chmod(0o644)
    with pytest.raises(StackError, match="chmod 600"):
        credentials.load("p", env)


def test_the_compose_file_and_the_code_agree_on_the_broker_image():
    import yaml

    image = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["rabbitmq"]["image"]
    assert image == f"${{CONVEYOR_BROKER_IMAGE:-{DEFAULT_BROKER_IMAGE}}}"

