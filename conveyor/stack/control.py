"""Asking the workers themselves, over Celery's remote control: who answers, and which service they serve."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

from celery import Celery

log = logging.getLogger(__name__)


def service_of(node: str) -> str:
    """`worker-a-3@host` and `worker-a-1f2e3d4c@host` both belong to service `worker-a`."""
    return node.split("@", 1)[0].rsplit("-", 1)[0]


def ping(app: Celery, timeout_s: float = 1.0, destination: list[str] | None = None, connection: Any = None) -> list[str]:
    """Node names of every worker (or of those in `destination`) that answered a ping within the timeout;
    over `connection` if given, else over a connection of its own: a pooled one may be a dead socket
    after a broker restart, and Celery's broadcast does not reconnect."""
    if connection is not None:
        replies = app.control.ping(destination=destination, timeout=timeout_s, connection=connection) or []
    else:
        with app.connection_for_write() as fresh:
            replies = app.control.ping(destination=destination, timeout=timeout_s, connection=fresh) or []
    return sorted(node for reply in replies for node in reply)


def responding(app: Celery, timeout_s: float = 1.0, connection: Any = None) -> Counter[str]:
    return Counter(service_of(node) for node in ping(app, timeout_s, connection=connection))


def wait_responding(app: Celery, want: dict[str, int], timeout_s: float, connection: Any = None) -> Counter[str]:
    """Ping until every service has at least the wanted number of workers answering, or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        seen = responding(app, connection=connection)
        if all(seen[name] >= count for name, count in want.items()) or time.monotonic() >= deadline:
            return seen
        log.debug("Waiting for workers: want %s, answering %s.", want, dict(seen))


def nodes_of(nodes: Iterable[str], service: str) -> list[str]:
    return [n for n in nodes if service_of(n) == service]
