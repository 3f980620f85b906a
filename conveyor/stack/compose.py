"""The Docker Compose stack: each replica is a container of the worker image, scaled by compose.

Scaling names one service and passes `--no-deps --no-recreate`: plain `compose up --scale` re-applies
every service's default count, which silently resets the services not named. Everything runs under
one fixed project name (COMPOSE_PROJECT_NAME, default `conveyor`), so `down` removes exactly our
containers and networks and nothing else on the engine.

Which compose file: COMPOSE_FILES if set; else docker-compose.host.yml (host network, no broker
service), which is how tests and CI run and how workers on several hosts join one broker, or
docker-compose.yml when the stack brings its own RabbitMQ (conveyor/stack/choice.py decides; see
compose_files). The containers get the host app's BROKER_URL, RESULT_BACKEND and config file, so
they never decide differently from the app that dispatches to them.

Compose does what it is for: build, `up --scale`, `down`. Everything that looks at or acts on
single containers goes through the Docker SDK for Python (the `docker` package) instead of
parsing `docker` CLI output: listing the project's containers by their compose labels, their
health, their logs, and killing a replica (the chaos killer).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import docker as docker_sdk
from docker.errors import DockerException, NotFound
from docker.models.containers import Container

from conveyor.settings.environment import PROJECT_ROOT, RECORDS_URL_ENV, TASK_EVENTS_ENV, BrokerSettings, run_dir
from conveyor.settings.config import ServiceConfig
from conveyor.errors import StackError
from conveyor.stack import credentials
from conveyor.stack import compose_override
from conveyor.stack.base import Replica, Stack
from conveyor.settings.context import settings_of
from conveyor.settings.environment import PROCESS_ENV, inherited

log = logging.getLogger(__name__)

FILES_ENV = "COMPOSE_FILES"
PROJECT_ENV = "COMPOSE_PROJECT_NAME"
DEFAULT_PROJECT = "conveyor"
FULL_FILE = "docker-compose.yml"
HOST_FILE = "docker-compose.host.yml"
BROKER_SERVICE = "rabbitmq"  # the broker service of docker-compose.yml, started before the workers
BROKER_IMAGE_ENV = "CONVEYOR_BROKER_IMAGE"  # the image of that service
DEFAULT_BROKER_IMAGE = "rabbitmq:4-management"  # docker-compose.yml's default for the same variable
CONFIG_FILE_ENV = "CONVEYOR_CONFIG_FILE"  # the host path the compose files mount as the workers' config
# Containers and the embedded broker never go together (conveyor/stack/choice.py says so first).
EMBEDDED_REFUSAL = ("the embedded filesystem broker lives in files on this machine that containers cannot reach; "
                    "unset BROKER_URL with Docker running (compose then brings its own RabbitMQ), or set "
                    "BROKER_URL=amqp://USER:PASSWORD@HOST:5672//, or use STACK=local")
# Time allowed for a compose command beyond the warm-shutdown grace (image builds, container starts).
COMMAND_SLACK_S = 600
PROJECT_LABEL = "com.docker.compose.project"  # the labels compose puts on every container it creates
SERVICE_LABEL = "com.docker.compose.service"
ONEOFF_LABEL = "com.docker.compose.oneoff"
NUMBER_LABEL = "com.docker.compose.container-number"
ENGINE_TIMEOUT_S = 60
LOG_TAIL_LINES = 50


@functools.lru_cache(maxsize=1)
def compose_command() -> tuple[str, ...]:
    """The `docker compose` v2 plugin when it is installed, else the standalone `docker-compose` (v1)."""
    if shutil.which("docker"):
        try:
            probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
            if probe.returncode == 0:
                return ("docker", "compose")
        except (OSError, subprocess.TimeoutExpired):
            pass
    if shutil.which("docker-compose"):
        return ("docker-compose",)
    raise StackError("neither `docker compose` nor `docker-compose` is installed; install Docker Compose or use STACK=local")


def project_name(env: Mapping[str, str] = PROCESS_ENV) -> str:
    """The project name as compose itself normalises it, which is also the value of its container labels."""
    raw = env.get(PROJECT_ENV, "").strip() or DEFAULT_PROJECT
    name = re.sub(r"[^-_a-z0-9]", "", raw.lower())
    if not name:
        raise StackError(f"{PROJECT_ENV}={raw!r} has no usable characters; use letters, digits, - and _")
    return name


def broker_image(env: Mapping[str, str] = PROCESS_ENV) -> str:
    return env.get(BROKER_IMAGE_ENV, "").strip() or DEFAULT_BROKER_IMAGE


def compose_files(own_broker: bool, env: Mapping[str, str] = PROCESS_ENV) -> list[Path]:
    """COMPOSE_FILES if set. Otherwise the host-network file whenever the app has a broker of its
    own, on this machine or another: containers on the host network reach it exactly as the host
    does, so workers on several hosts all join the one broker. docker-compose.yml, which brings its
    own RabbitMQ, when the stack is to run the broker too (`own_broker`: nothing answered on
    127.0.0.1:5672), and for COMPOSE_FILES (e.g. Docker Desktop, without host networking)."""
    raw = env.get(FILES_ENV, "").strip()
    if raw:
        names = [part for part in re.split(rf"[,{re.escape(os.pathsep)}]", raw) if part.strip()]
        files = [(PROJECT_ROOT / name.strip()).resolve() for name in names]
        source = f"{FILES_ENV}={raw}"
    else:
        files = [PROJECT_ROOT / (FULL_FILE if own_broker else HOST_FILE)]
        source = "the default"
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise StackError(f"compose file {', '.join(missing)} does not exist ({source}); fix {FILES_ENV} or restore the file")
    return files


class ComposeStack(Stack):
    name = "compose"

    def __init__(self, app, config, own_broker: bool = False) -> None:
        """`own_broker`: the stack runs the broker too (docker-compose.yml's rabbitmq service), with
        the credentials of credentials.py; the app's broker URL then points at it."""
        super().__init__(app, config)
        self.settings: BrokerSettings = settings_of(app).broker
        self.project = project_name()
        self.own_broker = own_broker
        self._broker_started = False
        self.files = compose_files(own_broker)
        # The config's own services and code directory, on top of the compose files.
        extra = compose_override.write(self.files, self.config, run_dir() / "compose" / f"{self.project}.override.yml")
        if extra is not None:
            self.files = [*self.files, extra]
        # Warm shutdown gets at least the config's grace before compose kills a container.
        self.stop_timeout_s = max(1, math.ceil(self.config.stop_grace_s))
        self._records_warned = False

    # --- running compose ---------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        """What the compose files interpolate: the app's own broker settings and config file."""
        env = inherited({**self.settings.worker_env(), PROJECT_ENV: self.project})
        if self.own_broker:
            env.update(credentials.ensure(self.project).compose_env())
            env[BROKER_IMAGE_ENV] = broker_image()
        if self.config.source:
            env[CONFIG_FILE_ENV] = str(self.config.source)
        if not self.shares_records():
            # A SQLite file on this machine is out of the containers' reach; a private copy in each
            # container would only look like shared records, so the containers keep none, and send
            # task events instead for the monitor to count (no tallies without records).
            env[RECORDS_URL_ENV] = "off"
            env[TASK_EVENTS_ENV] = "on"
        return env

    def _argv(self, *args: str) -> list[str]:
        argv = [*compose_command(), "--project-name", self.project]
        for file in self.files:
            argv += ["--file", str(file)]
        return [*argv, *args]

    def _compose(self, *args: str) -> str:
        argv = self._argv(*args)
        log.debug("Running %s.", " ".join(argv))
        try:
            done = subprocess.run(argv, cwd=PROJECT_ROOT, env=self._env(), capture_output=True, text=True,
                                  timeout=self.stop_timeout_s + COMMAND_SLACK_S)
        except subprocess.TimeoutExpired:
            raise StackError(f"`{' '.join(argv)}` did not finish in time; see `docker ps` and `make logs`") from None
        except OSError as exc:
            raise StackError(f"cannot run {argv[0]}: {exc.strerror}; is Docker Compose installed?") from None
        if done.returncode != 0:
            raise StackError(f"`{' '.join(argv)}` failed (exit {done.returncode}): {_tail(done.stderr or done.stdout)}")
        return done.stdout

    @functools.cached_property
    def services(self) -> list[str]:
        """The services the compose files define (profiles included)."""
        return self._compose("config", "--services").split()

    def _check_defined(self, service: str) -> None:
        if service not in self.services:
            files = ", ".join(f.name for f in self.files)
            raise StackError(f"service {service!r} of the config is not defined in {files}; "
                             "add it there (a copy of worker-a with its own WORKER_SERVICE) or use STACK=local")

    def _check_startable(self) -> None:
        if self.settings.embedded:
            raise StackError(EMBEDDED_REFUSAL)
        if not self.shares_records() and not self._records_warned:
            self._records_warned = True
            log.warning("Task records are in a SQLite file, which worker containers cannot reach, so the containers "
                        "keep none; set RECORDS_URL=redis://... to share task records with them.")
        source = self.config.source
        if source and not source.stat().st_mode & stat.S_IROTH:
            raise StackError(f"{source} is not readable by other users, and the worker containers read it as an "
                             f"unprivileged user; run `chmod o+r {source}`")
        code = self.config.code_path
        if code and (not code.is_dir() or (code.stat().st_mode & (stat.S_IROTH | stat.S_IXOTH)) != stat.S_IROTH | stat.S_IXOTH):
            raise StackError(f"code_dir {code} is not a directory other users can read, and the worker containers "
                             f"read it as an unprivileged user; run `chmod -R o+rX {code}`")

    # --- bookkeeping -------------------------------------------------------------------
    def _state_file(self) -> Path:
        return run_dir() / "compose" / f"{self.project}.json"

    def _unsaved_desired(self) -> dict[str, int]:
        # Started by hand with compose: what exists is the best answer there is.
        counts: dict[str, int] = {}
        for replica in self.replicas():
            counts[replica.service] = counts.get(replica.service, 0) + 1
        return counts

    # --- containers, through the Docker SDK ------------------------------------------------
    @functools.cached_property
    def engine(self) -> docker_sdk.DockerClient:
        """The Docker engine, as DOCKER_HOST and friends name it (the same one compose uses)."""
        try:
            return docker_sdk.from_env(timeout=ENGINE_TIMEOUT_S)
        except DockerException as exc:
            raise StackError(f"cannot reach the Docker engine ({exc}); is it running? `docker info` tells") from None

    def containers(self, service: str | None = None) -> list[Container]:
        """Every container of our project (of one service, if named), running or not, one-off runs left out."""
        labels = [f"{PROJECT_LABEL}={self.project}", *([f"{SERVICE_LABEL}={service}"] if service else [])]
        try:
            found = self.engine.containers.list(all=True, sparse=True, filters={"label": labels})
        except DockerException as exc:
            raise StackError(f"cannot list the containers of compose project {self.project}: {exc}") from None
        return [c for c in found if (c.attrs.get("Labels") or {}).get(ONEOFF_LABEL, "").lower() != "true"]

    def replicas(self) -> list[Replica]:
        """Containers of the config's worker services in our project, running or not (the broker and
        Flower are not replicas). The node name is left unknown: readiness is judged by pings."""
        ours = {s.name for s in self.config.services}
        found = []
        for container in self.containers():
            service = (container.attrs.get("Labels") or {}).get(SERVICE_LABEL, "")
            if service in ours:
                found.append(Replica(service, container.id[:12], None, container.attrs.get("State") == "running"))
        return sorted(found, key=lambda r: (r.service, r.ident))

    def kill(self, replica: Replica) -> None:
        """SIGKILL a replica's container, as the OOM killer or a lost machine would: no warm shutdown.
        The engine does not apply the restart policy to a container it was told to kill, so the
        caller starts it again (the chaos killer scales the service back to its count)."""
        try:
            self.engine.containers.get(replica.ident).kill(signal="SIGKILL")
        except NotFound:
            return  # gone already
        except DockerException as exc:
            raise StackError(f"cannot kill container {replica.ident} of {replica.service}: {exc}") from None

    def health(self, service: str) -> str:
        """The health of the service's container (`healthy`, `starting`, ...; its state if it has no
        healthcheck; `missing` if there is none)."""
        states = []
        for container in self.containers(service):
            try:
                container = self.engine.containers.get(container.id)  # the full record has the health
            except NotFound:
                continue
            state = container.attrs.get("State") or {}
            states.append((state.get("Health") or {}).get("Status") or state.get("Status") or "unknown")
        return states[0] if len(states) == 1 else ("missing" if not states else ",".join(sorted(states)))

    def failures(self) -> dict[str, str]:
        """Containers of our services that exited or are restarting (restart: unless-stopped brings
        back one that stopped on a config error, again and again), with the error in their log."""
        found: dict[str, str] = {}
        ours = {s.name for s in self.config.services}
        for container in self.containers():
            service = (container.attrs.get("Labels") or {}).get(SERVICE_LABEL, "")
            state = container.attrs.get("State", "")
            if service in ours and state in ("exited", "restarting", "dead") and service not in found:
                found[service] = f"container {container.id[:12]} {state}: {self._last_error(container.id)}"
        return found

    def _last_error(self, ident: str) -> str:
        try:
            text = self.engine.containers.get(ident).logs(tail=50).decode(errors="replace")
        except DockerException as exc:
            return f"its log could not be read ({exc})"
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error: ")]
        return (errors or lines or ["its log is empty"])[-1]

    # --- scaling -----------------------------------------------------------------------
    def up(self, wait_s: float = 60.0) -> None:
        """Build the image from the current code (cached layers make this quick), start the broker
        service when the compose file has one, then every worker service at its configured count."""
        self._check_startable()
        self.build()
        self._start_broker(wait_s)
        super().up(wait_s)

    def _start_broker(self, wait_s: float = 60.0) -> None:
        """The compose file's broker service, when it has one, up and healthy before any worker."""
        if BROKER_SERVICE in self.services and not self._broker_started:
            self._compose("up", "--detach", "--no-recreate", BROKER_SERVICE)
            self._wait_healthy(BROKER_SERVICE, wait_s)
            self._broker_started = True

    def build(self) -> None:
        """Build the worker image from the current code; unchanged layers come from the cache."""
        workers = [s.name for s in self.config.services]
        for name in workers:
            self._check_defined(name)
        if compose_override.BASE_SERVICE in self.services:  # the user's image is built FROM this one
            log.info("Building the base worker image.")
            self._compose("build", compose_override.BASE_SERVICE)
        log.info("Building the worker image for %s.", ", ".join(workers))
        self._compose("build", *workers)

    def _scale(self, service: ServiceConfig, count: int) -> None:
        if count > 0:
            self._check_startable()
            self._start_broker()
        self._check_defined(service.name)
        self._set_desired(service.name, count)
        # Only the named service is touched: --no-deps keeps compose from starting (or recreating)
        # what it depends on, --no-recreate keeps the running replicas as they are, and a scale-down
        # stops the surplus with SIGTERM and waits up to the timeout for their tasks to finish.
        self._compose("up", "--detach", "--no-deps", "--no-recreate", "--timeout", str(self.stop_timeout_s),
                      "--scale", f"{service.name}={count}", service.name)
        log.info("Compose now runs %d replica(s) of %s in project %s.", count, service.name, self.project)

    def _wait_healthy(self, service: str, timeout_s: float) -> None:
        """Block until the service's container reports healthy (the workers need the broker first)."""
        deadline = time.monotonic() + timeout_s
        status = "missing"
        while time.monotonic() < deadline:
            status = self.health(service)
            if status in ("healthy", "running"):
                return
            time.sleep(1)
        raise StackError(f"service {service} is {status} after {timeout_s:.0f} s; see `make logs`")

    def down(self) -> None:
        """Warm shutdown of every container of the project (SIGTERM, then up to the grace period for
        running tasks), then remove them and the project's networks. Volumes (the broker's data) stay."""
        self._compose("down", "--remove-orphans", "--timeout", str(self.stop_timeout_s))
        self._state_file().unlink(missing_ok=True)
        log.info("Removed the containers and networks of compose project %s.", self.project)

    def logs(self, follow: bool = True) -> None:
        """The last lines of every container of the project, each line prefixed with its container
        (`worker-a-2 | ...`), and with follow, what they print from then on, until interrupted."""
        containers = sorted(self.containers(), key=_container_name)
        if not containers:
            log.warning("Compose project %s has no containers; `make up` starts them.", self.project)
            return
        out_lock = threading.Lock()

        def show(container: Container) -> None:
            prefix = f"{_container_name(container)} | "
            try:
                stream = container.logs(stream=True, follow=follow, tail=LOG_TAIL_LINES)
                pending = b""
                for chunk in stream:
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    with out_lock:
                        for line in lines:
                            sys.stdout.write(prefix + line.decode(errors="replace") + "\n")
                        sys.stdout.flush()
            except DockerException as exc:
                log.warning("The logs of %s ended: %s.", _container_name(container), exc)

        threads = [threading.Thread(target=show, args=(c,), daemon=True) for c in containers]
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():  # joined in slices, so Ctrl-C interrupts a follow at once
                thread.join(0.5)


def docker(*args: str) -> str:
    try:
        done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StackError(f"`docker {args[0]}` did not run ({exc}); is the Docker engine up?") from None
    if done.returncode != 0:
        raise StackError(f"`docker {' '.join(args[:2])}` failed (exit {done.returncode}): {_tail(done.stderr)}")
    return done.stdout
def _container_name(container: Container) -> str:
    labels = container.attrs.get("Labels") or {}
    return f"{labels.get(SERVICE_LABEL, '?')}-{labels.get(NUMBER_LABEL, '?')}"


def _tail(text: str, lines: int = 12) -> str:
    kept = [line for line in (text or "").strip().splitlines() if line.strip()][-lines:]
    return " | ".join(kept) or "(no output)"
