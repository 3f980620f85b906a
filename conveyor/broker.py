"""Which broker and result backend to use, and whether they answer.

BROKER_URL set: use it, and fail loudly when it does not answer (never fall back silently).
BROKER_URL unset: RabbitMQ on 127.0.0.1:5672 if something listens there, otherwise the embedded
broker: kombu's filesystem transport and Celery's file result backend inside the run directory.
Workers started by a stack are handed the resolved URLs, so they never decide differently.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from kombu import Connection
from kombu.utils.url import maybe_sanitize_url

from .errors import BrokerError

log = logging.getLogger(__name__)

DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"
EMBEDDED_URL = "filesystem://localhost/"  # the host means nothing to this transport, but kombu warns without one
RUN_DIR_ENV = "CONVEYOR_RUN_DIR"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def run_dir(env: Mapping[str, str] = os.environ) -> Path:
    """Where pid files, logs and the embedded broker live."""
    return Path(env.get(RUN_DIR_ENV) or PROJECT_ROOT / ".run").resolve()


@dataclass(frozen=True)
class BrokerSettings:
    broker_url: str
    result_backend: str
    embedded: bool
    transport_options: dict = field(default_factory=dict)
    explicit: bool = False

    @property
    def safe_url(self) -> str:
        """The broker URL with its password masked, for messages and logs."""
        return maybe_sanitize_url(self.broker_url)

    def worker_env(self) -> dict[str, str]:
        """Environment that makes a worker process use exactly these settings."""
        return {"BROKER_URL": self.broker_url, "RESULT_BACKEND": self.result_backend}

    def describe(self) -> str:
        if self.embedded:
            return f"Using the embedded filesystem broker in {self.transport_options['data_folder_in']}."
        return f"Using the broker at {self.safe_url}."


def resolve(env: Mapping[str, str] = os.environ, probe: tuple[str, int] = ("127.0.0.1", 5672)) -> BrokerSettings:
    url = env.get("BROKER_URL", "").strip()
    explicit = bool(url)
    if not url:
        url = DEFAULT_BROKER_URL if _listening(*probe) else EMBEDDED_URL
    embedded = url.startswith("filesystem:")
    if embedded:
        url = EMBEDDED_URL
    root = run_dir(env)
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
    return BrokerSettings(url, backend, embedded, options, explicit)


def _default_backend(url: str, root: Path) -> str:
    if url.startswith("filesystem:"):
        return f"file://{root / 'results'}"
    if url.startswith(("amqp:", "amqps:", "pyamqp:")):
        # Results travel back to the caller over the broker itself: no second service to run.
        return "rpc://"
    if url.startswith(("redis:", "rediss:")):
        return url
    return "rpc://"


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def check(settings: BrokerSettings, timeout_s: float = 5.0) -> None:
    """Connect once; raise BrokerError with what went wrong and what to do."""
    if settings.embedded:
        return
    conn = Connection(settings.broker_url, connect_timeout=timeout_s)
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
