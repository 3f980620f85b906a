"""Which broker, result backend and task-record store to use, and whether they answer.

BROKER_URL set: use it, and fail loudly when it does not answer (never fall back silently).
BROKER_URL unset: RabbitMQ on 127.0.0.1:5672 if something listens there, otherwise the embedded
broker: kombu's filesystem transport and Celery's file result backend inside the run directory.
RECORDS_URL (redis://..., sqlite:///FILE or `off`) likewise names where task records live; unset:
the run directory's SQLite file, readable by this user only. Never a network store found by
probing: whoever can write to a record store can revoke tasks and hold unique keys, and a Redis
that merely listens on 127.0.0.1:6379 may be anyone's, without a password (docs/reliability.md,
trust boundary). Workers started by a stack are handed the resolved URLs, so they never decide
differently. The run directory is created readable by this user only (0700): it holds the
embedded broker's messages, the records and the logs.
"""

from __future__ import annotations

import logging
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

from amqp.exceptions import MessageNacked
from kombu import Connection
from kombu.exceptions import OperationalError
from kombu.utils.functional import fxrange
from kombu.utils.url import maybe_sanitize_url

from conveyor.errors import BrokerError, PublishRefused

log = logging.getLogger(__name__)

DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"
EMBEDDED_URL = "filesystem://localhost/"  # the host means nothing to this transport, but kombu warns without one
RUN_DIR_ENV = "CONVEYOR_RUN_DIR"
RECORDS_URL_ENV = "RECORDS_URL"
FAST_PATHS_ENV = "CONVEYOR_FAST_PATHS"
# `on`: send Celery's task events whatever the config says. A compose stack sets it for its
# containers where they cannot reach the task records (a SQLite file on the host), so that the
# monitor counts their tasks from events instead of the tallies kept with the records.
TASK_EVENTS_ENV = "CONVEYOR_TASK_EVENTS"
DEFAULT_BROKER = ("127.0.0.1", 5672)  # where DEFAULT_BROKER_URL points
DEFAULT_REDIS = ("127.0.0.1", 6379)  # the tests' shared Redis; never picked without RECORDS_URL
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def fast_paths_allowed(env: Mapping[str, str] = os.environ) -> bool:
    """False when CONVEYOR_FAST_PATHS says off (0, off, false, no): the one switch, beside the config's
    tuning.fast_paths, that sends every process back to Celery's, kombu's and py-amqp's own code."""
    return env.get(FAST_PATHS_ENV, "").strip().lower() not in ("0", "off", "false", "no")


def run_dir(env: Mapping[str, str] = os.environ) -> Path:
    """Where pid files, logs and the embedded broker live."""
    return Path(env.get(RUN_DIR_ENV) or PROJECT_ROOT / ".run").resolve()


def private_dir(path: Path) -> Path:
    """`path` as a directory only this user can enter (0700), created so if missing (with its missing
    parents), tightened if it is ours and looser; another user's is left as it is."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid == os.geteuid() and info.st_mode & 0o077:
        path.chmod(0o700)
    return path


@dataclass(frozen=True)
class BrokerSettings:
    broker_url: str
    result_backend: str
    embedded: bool
    transport_options: dict = field(default_factory=dict)
    explicit: bool = False
    records_url: str = ""
    task_events: bool = False  # forced on by CONVEYOR_TASK_EVENTS

    def records_reach_workers(self, backend: str) -> bool:
        """Whether workers of this stack backend can write the records (and the task tallies) this
        process reads: not a compose stack's containers, for a SQLite file on this machine."""
        return not (backend == "compose" and self.records_url.startswith("sqlite:"))

    @property
    def safe_url(self) -> str:
        """The broker URL with its password masked, for messages and logs."""
        return maybe_sanitize_url(self.broker_url)

    def worker_env(self) -> dict[str, str]:
        """Environment that makes a worker process use exactly these settings."""
        env = {"BROKER_URL": self.broker_url, "RESULT_BACKEND": self.result_backend}
        if self.records_url:
            env[RECORDS_URL_ENV] = self.records_url
        if self.task_events:
            env[TASK_EVENTS_ENV] = "on"
        return env

    def describe(self) -> str:
        if self.embedded:
            return (f"Using the embedded filesystem broker in {self.transport_options['data_folder_in']}: "
                    "at-least-once on this machine only, without publisher confirms, broker dead-lettering "
                    "or queue limits (README).")
        return f"Using the broker at {self.safe_url}."


def resolve(env: Mapping[str, str] = os.environ, probe: tuple[str, int] = DEFAULT_BROKER) -> BrokerSettings:
    url = env.get("BROKER_URL", "").strip()
    explicit = bool(url)
    if not url:
        url = DEFAULT_BROKER_URL if listening(*probe) else EMBEDDED_URL
    embedded = url.startswith("filesystem:")
    if embedded:
        url = EMBEDDED_URL
    root = run_dir(env)
    try:
        private_dir(root)  # before anything (a log, a pid file, a record) is written in it
    except OSError as exc:  # a read-only image, say: whatever needs it fails there, with its own error
        log.debug("Could not create the run directory %s: %s", root, exc)
    options: dict = {}
    if embedded:
        folder = root / "broker"
        options = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "control_folder": str(folder / "control"),
            "processed_folder": str(folder / "processed"),
            "store_processed": False,
        }
        for path in ("queue", "control", "processed"):
            (folder / path).mkdir(parents=True, exist_ok=True)
        (root / "results").mkdir(parents=True, exist_ok=True)
    backend = env.get("RESULT_BACKEND", "").strip() or _default_backend(url, root)
    return BrokerSettings(url, backend, embedded, options, explicit, records_url(env, embedded, root),
                          task_events=env.get(TASK_EVENTS_ENV, "").strip().lower() in ("1", "on", "true", "yes"))


def records_url(env: Mapping[str, str], embedded: bool, root: Path) -> str:
    """Where task records live: RECORDS_URL, else the run directory's SQLite file (0600), shared by
    the processes of this user on this machine. Redis, shared by workers on every host and in
    containers, only when RECORDS_URL names it (with its password: redis://:PASSWORD@HOST)."""
    url = env.get(RECORDS_URL_ENV, "").strip()
    if url:
        return url
    return f"sqlite:///{root / 'records.sqlite3'}"


def _default_backend(url: str, root: Path) -> str:
    if url.startswith("filesystem:"):
        return f"file://{root / 'results'}"
    if url.startswith(("amqp:", "amqps:", "pyamqp:")):
        # Results travel back to the caller over the broker itself: no second service to run.
        return "rpc://"
    if url.startswith(("redis:", "rediss:")):
        return url
    return "rpc://"


def listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def check(settings: BrokerSettings, timeout_s: float = 5.0) -> None:
    """Connect once; raise BrokerError with what went wrong and what to do."""
    if settings.embedded:
        return
    try:
        conn = Connection(settings.broker_url, connect_timeout=timeout_s)
        conn.transport  # resolves the scheme
    except (ValueError, KeyError) as exc:  # urllib's and kombu's words for a malformed URL or an unknown scheme
        source = "BROKER_URL" if settings.explicit else "the default broker URL"
        raise BrokerError(f"{source} is not a usable broker URL ({exc.args[0] if exc.args else exc}); "
                          "expected amqp://USER:PASSWORD@HOST:PORT/VHOST") from None
    try:
        conn.connect()
    except Exception as exc:  # kombu surfaces transport-specific classes; sort them by meaning.
        raise BrokerError(_explain(settings, exc)) from None
    finally:
        conn.release()


def _explain(settings: BrokerSettings, exc: Exception) -> str:
    text = str(exc)
    where = settings.safe_url
    source = "BROKER_URL" if settings.explicit else "the default broker URL"
    if "ACCESS_REFUSED" in text or "authentication" in text.lower() or type(exc).__name__ == "AccessRefused":
        return f"the broker at {where} refused the credentials; fix the user and password in {source}"
    if "NOT_ALLOWED" in text or "vhost" in text.lower():
        return f"the broker at {where} does not allow that virtual host; fix the vhost in {source}"
    if isinstance(exc, (OSError, socket.timeout)) or "refused" in text.lower() or "timed out" in text.lower():
        return f"cannot reach the broker at {where} ({exc.__class__.__name__}: {text}); start RabbitMQ or fix {source}"
    return f"cannot connect to the broker at {where}: {exc.__class__.__name__}: {text}"


# What a publish raises once its retries are spent (kombu wraps connection errors in OperationalError),
# or at once when the broker refuses the message (a nack under publisher confirms, or a return of a
# `mandatory` task message no queue took: conveyor/seam/publisher.py).
PUBLISH_ERRORS = (OperationalError, MessageNacked, PublishRefused)


def publish_retry_policy(total_s: float, start_s: float = 0.2, step_s: float = 0.4, most_s: float = 2.0) -> dict:
    """Celery's task_publish_retry_policy for a publish that finds the broker away: kombu reconnects
    with waits growing from start_s by step_s up to most_s; this many retries add up to about total_s
    (a RabbitMQ restart takes seconds). Celery's default gives up after 0.6 s."""
    waits = (min(w, most_s) for w in fxrange(start_s, most_s + start_s, step_s, repeatlast=True))
    retries, waited = 0, 0.0
    while waited < total_s:
        waited += next(waits)
        retries += 1
    return {"max_retries": retries, "interval_start": start_s, "interval_step": step_s, "interval_max": most_s}


@contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for a block: the app, the stacks and the workers they start read them."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --- The process environment -------------------------------------------------------------------
# conveyor reads its environment here and nowhere else (tests/test_layout.py checks): each variable
# is named, defaulted and explained once. Functions elsewhere that take an `env` mapping (to be
# testable with one of their own) default to PROCESS_ENV.
PROCESS_ENV: Mapping[str, str] = os.environ
LOG_LEVEL_ENV = "LOG_LEVEL"  # the CLIs' log level (WARNING by default)
NODE_FILE_ENV = "CONVEYOR_NODE_FILE"  # where a replica writes its node name, for its healthcheck
WORKER_SERVICE_ENV = "WORKER_SERVICE"  # the service a containerised replica serves
WORKER_LOGLEVEL_ENV = "WORKER_LOGLEVEL"  # a worker's log level (INFO by default)
CONFIG_ENV = "CONVEYOR_CONFIG"  # the config file (conveyor/settings/config.py reads it)
MANAGEMENT_URL_ENV = "RABBITMQ_MANAGEMENT_URL"  # the management API's root, if not port 15672 of the broker's host


def inherited(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child process (a worker, a broker node, Flower): this one's, with `extra` on top."""
    return {**os.environ, **(extra or {})}


def log_level() -> str | None:
    return os.environ.get(LOG_LEVEL_ENV) or None


def node_file() -> str | None:
    return os.environ.get(NODE_FILE_ENV) or None


def worker_service() -> str | None:
    return os.environ.get(WORKER_SERVICE_ENV) or None


def worker_loglevel() -> str:
    return os.environ.get(WORKER_LOGLEVEL_ENV) or "INFO"


def flower_address() -> str | None:
    return os.environ.get("FLOWER_ADDRESS") or None  # `make flower`'s address (127.0.0.1 by default)


def flower_port() -> str | None:
    return os.environ.get("FLOWER_PORT") or None  # `make flower`'s port (5555 by default)
