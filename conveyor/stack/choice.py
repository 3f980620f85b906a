"""The one decision every command makes first: which broker, and where the workers run.

    broker on 127.0.0.1:5672   Docker engine   decision
    yes                        yes             that broker; workers in containers (docker-compose.host.yml)
    yes                        no              that broker; workers as local processes
    no                         yes             compose brings its own RabbitMQ (docker-compose.yml), with
                                               credentials generated once (see credentials.py), when its
                                               image is here or can be pulled
    no                         yes, no image   the embedded broker; workers as local processes
    no                         no              the embedded broker; workers as local processes

BROKER_URL names the broker outright (and fails loudly when it does not answer); STACK=compose|local
(or --stack) names the backend. The embedded broker lives in files on this machine, which containers
cannot reach, so it is never paired with containers: asked for both, the command stops with why.
A running compose broker of the project is found first, so that every command after `make up`
decides the same as `make up` did.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from conveyor.settings import environment
from conveyor.settings.environment import BrokerSettings
from conveyor.console import say
from conveyor.errors import BrokerError, StackError, UsageError
from conveyor.stack import credentials
from conveyor.stack.compose import BROKER_SERVICE, EMBEDDED_REFUSAL, broker_image, docker, project_name
from conveyor.settings.environment import PROCESS_ENV

log = logging.getLogger(__name__)

STACK_ENV = "STACK"
BACKENDS = ("compose", "local")
PULL_TIMEOUT_S = 300.0  # a first pull of the RabbitMQ image over a slow link; a registry out of reach fails at once
DOCKER_PROBE_TIMEOUT_S = 10.0
NO_DOCKER = ("containers are asked for (STACK or --stack), but no Docker engine answers (`docker info` fails); "
             "start Docker, or use STACK=local")


@dataclass(frozen=True)
class StackChoice:
    backend: str  # "compose" or "local"
    broker: BrokerSettings
    reason: str  # why, as a clause: what was found on this machine
    own_broker: bool = False  # compose runs the broker too (docker-compose.yml's rabbitmq service)
    broker_up: bool = True  # False while that broker is still to be started

    def describe(self) -> str:
        """The decision in one line, the first thing every command says."""
        return f"{self.broker.describe().rstrip('.')} with the {self.backend} stack: {self.reason}."

    def require_broker(self) -> None:
        """For a command that needs the broker now and does not start the stack."""
        if not self.broker_up:
            raise BrokerError("the compose stack's own RabbitMQ is not running yet; `make up` starts it "
                              "(or `make run`, which starts the stack for the run)")


def requested_backend(requested: str | None = None, env: Mapping[str, str] = PROCESS_ENV) -> str:
    """compose, local, or "" for the automatic choice."""
    name = (requested or env.get(STACK_ENV) or "").strip().lower()
    if name == "auto":
        return ""
    if name and name not in BACKENDS:
        raise UsageError(f"unknown stack {name!r}: STACK must be compose or local")
    return name


def choose(requested: str | None = None, env: Mapping[str, str] = PROCESS_ENV) -> StackChoice:
    """Decide for this machine, as it is now (see the module's table). Every command may pull the
    broker image: the first command that finds it missing fetches it (once), and one that cannot
    reach a registry fails at once, so all of them decide alike."""
    wanted = requested_backend(requested, env)
    if env.get("BROKER_URL", "").strip():
        return for_broker(environment.resolve(env), wanted, "BROKER_URL names the broker")
    project = project_name(env)
    known = credentials.load(project, env)
    # Docker is asked only when containers may be used, or when a compose broker of ours may be running.
    docker = (wanted != "local" or known is not None) and docker_available()
    if wanted == "compose" and not docker:
        raise StackError(NO_DOCKER)
    asked = _asked(wanted)
    if known and docker and own_broker_running(project):
        why = "the compose stack's own RabbitMQ is running"
        return StackChoice(wanted or "compose", _settings(env, known.url(env)), f"{why} and {asked}" if wanted else why,
                           own_broker=wanted != "local")
    if environment.listening(*environment.DEFAULT_BROKER):
        found = asked if wanted else "so does a Docker engine" if docker else "no Docker engine does"
        return StackChoice(wanted or ("compose" if docker else "local"), _settings(env, environment.DEFAULT_BROKER_URL),
                           f"RabbitMQ answers on 127.0.0.1:5672 and {found}")
    if not docker or wanted == "local":
        return StackChoice("local", _settings(env, environment.EMBEDDED_URL),
                           f"nothing answers on 127.0.0.1:5672 and {asked if wanted else 'no Docker engine does'}")
    image = broker_image(env)
    missing = image_problem(image)
    if missing is None:
        if not known and _broker_volume_exists(project):
            raise StackError(f"the broker volume of compose project {project} exists but its credentials file "
                             f"{credentials.path(project, env)} is gone, so no login would work; remove the volume "
                             f"(`docker volume rm {project}_rabbitmq-data`) or set RABBITMQ_USER and RABBITMQ_PASSWORD to its pair")
        made = credentials.ensure(project, env)
        return StackChoice("compose", _settings(env, made.url(env)),
                           f"nothing answers on 127.0.0.1:5672, so compose starts its own RabbitMQ ({image})",
                           own_broker=True, broker_up=False)
    if wanted == "compose":
        raise StackError(f"containers are asked for (STACK or --stack), but nothing answers on 127.0.0.1:5672 and "
                         f"compose cannot start a RabbitMQ: {missing}; start RabbitMQ and set BROKER_URL, or use STACK=local")
    return StackChoice("local", _settings(env, environment.EMBEDDED_URL),
                       f"nothing answers on 127.0.0.1:5672 and Docker cannot start a RabbitMQ: {missing}")


def for_broker(settings: BrokerSettings, wanted: str = "", why: str = "the broker is given") -> StackChoice:
    """The backend for a broker already decided (BROKER_URL, or an app built by a test or the chaos run)."""
    if settings.embedded:
        if wanted == "compose":
            raise StackError(EMBEDDED_REFUSAL)
        return StackChoice("local", settings, f"{why}, and containers cannot reach the embedded broker's files")
    if wanted == "local":
        return StackChoice("local", settings, f"{why} and {_asked(wanted)}")
    docker = docker_available()
    if wanted == "compose" and not docker:
        raise StackError(NO_DOCKER)
    if wanted:
        return StackChoice("compose", settings, f"{why} and {_asked(wanted)}")
    return StackChoice("compose" if docker else "local", settings,
                       f"{why} and {'a' if docker else 'no'} Docker engine answers")


def chaos(settings: BrokerSettings, own_node: bool) -> StackChoice:
    """A chaos run's fixed pairing: it kills replicas and restarts the broker, so both must be its own."""
    node = "a RabbitMQ node of its own (so that it can restart it)" if own_node else "BROKER_URL (and restarts no broker)"
    return StackChoice("local", settings, f"a chaos run uses {node} and local workers (so that it can kill them)")


# --- what the machine has -----------------------------------------------------------------
def docker_available() -> bool:
    """A Docker engine answers (the CLI is on PATH and `docker info` succeeds against DOCKER_HOST)."""
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=DOCKER_PROBE_TIMEOUT_S).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def image_problem(image: str, pull_timeout_s: float = PULL_TIMEOUT_S) -> str | None:
    """None when the image is on the engine or a pull (bounded in time) brings it; else why not."""
    if _docker_quietly("image", "inspect", image) is not None:
        return None
    say(f"Pulling the broker image {image} (at most {pull_timeout_s:.0f} s).")
    try:
        done = subprocess.run(["docker", "pull", image], capture_output=True, text=True, timeout=pull_timeout_s)
    except subprocess.TimeoutExpired:
        return f"the image {image} is not here and pulling it took over {pull_timeout_s:.0f} s"
    except OSError as exc:
        return f"the image {image} is not here and `docker pull` did not run ({exc.strerror})"
    if done.returncode == 0:
        return None
    last = ([line for line in done.stderr.splitlines() if line.strip()] or ["no output"])[-1].strip()
    return f"the image {image} is not here and cannot be pulled ({last.removeprefix('Error response from daemon: ')[:160]})"


def own_broker_running(project: str) -> bool:
    return bool(_docker_quietly("ps", "--quiet", "--filter", f"label=com.docker.compose.project={project}",
                                "--filter", f"label=com.docker.compose.service={BROKER_SERVICE}", "--filter", "status=running"))


def _broker_volume_exists(project: str) -> bool:
    return bool(_docker_quietly("volume", "ls", "--quiet", "--filter", f"label=com.docker.compose.project={project}",
                                "--filter", "label=com.docker.compose.volume=rabbitmq-data"))


def _docker_quietly(*args: str) -> str | None:
    """The command's output, stripped; None when it fails (for a probe, failing is an answer)."""
    try:
        return docker(*args).strip()
    except StackError:
        return None


# --- broker settings for a decided URL -------------------------------------------------------
def _settings(env: Mapping[str, str], url: str) -> BrokerSettings:
    """Resolve a URL this module picked: the messages then speak of the default broker, not of BROKER_URL."""
    return dataclasses.replace(environment.resolve({**env, "BROKER_URL": url}), explicit=False)


def _asked(wanted: str) -> str:
    return f"{'local processes' if wanted == 'local' else 'containers'} are asked for (STACK or --stack)"
