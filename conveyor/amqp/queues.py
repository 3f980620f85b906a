"""Queue depth and consumers, as the broker itself reports them.

A passive queue.declare gives the ready count and the consumers; only RabbitMQ's management API
reports unacknowledged messages, so without it (plugin off, or the embedded broker)
`messages_unacked` is null rather than a guess.
"""

from __future__ import annotations

import base64
import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any
from dataclasses import asdict, dataclass

from celery import Celery
from kombu.utils.url import url_to_parts
from conveyor.settings.context import settings_of

from conveyor.breaker import Breaker
from conveyor.settings import environment

log = logging.getLogger(__name__)



@dataclass
class QueueStats:
    name: str
    messages_ready: int | None
    messages_unacked: int | None
    consumers: int | None

    def as_dict(self) -> dict:
        return asdict(self)


def stats(app: Celery, names: list[str]) -> list[QueueStats]:
    """Ready messages and consumers from a passive declare (exact at this instant); unacknowledged
    messages from the management API, whose figures lag by its statistics interval (5 s)."""
    found = _from_declare(app, names)
    if not settings_of(app).broker.embedded:
        budget = settings_of(app).config.side_services
        breaker = management_breaker(budget.retry_after_s)
        if not breaker.allow():
            return found  # it did not answer a moment ago: unknown, at no cost
        try:
            unacked = _unacked(settings_of(app).broker.broker_url, budget.management_timeout_s)
        except (OSError, ValueError) as exc:
            breaker.failed(exc)
            log.info("The RabbitMQ management API did not answer (%s); unacknowledged counts are unknown.", exc)
        else:
            breaker.succeeded()
            for queue in found:
                queue.messages_unacked = unacked.get(queue.name, 0)  # not declared yet: nothing in it
    return found


def management_url(broker_url: str, env: Mapping[str, str] = environment.PROCESS_ENV) -> str:
    """Where the management API is, hence where the broker's credentials go: RABBITMQ_MANAGEMENT_URL
    if set (the operator's choice), else the broker's own host: over https (port 15671) for an amqps
    broker, so that credentials the broker link encrypts never travel in clear; plain http (15672)
    only where the broker link itself is plain amqp to that same host."""
    explicit = env.get(environment.MANAGEMENT_URL_ENV, "").strip()
    if explicit:
        return explicit.rstrip("/")
    scheme, host = url_to_parts(broker_url)[:2]
    host = host or "127.0.0.1"
    return f"https://{host}:15671" if scheme == "amqps" else f"http://{host}:15672"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *_args: object, **_kwargs: object) -> None:
        return None  # a redirect would carry the Authorization header to wherever it points


_opener = urllib.request.build_opener(_NoRedirect)

_breakers: dict[float, Breaker] = {}


def management_breaker(retry_after_s: float) -> Breaker:
    """This process's breaker for the management API: a sampler (autoscaler, monitor, status) stops
    waiting on an API that is down or hung, and asks again every retry_after_s (conveyor/breaker.py)."""
    if retry_after_s not in _breakers:
        _breakers[retry_after_s] = Breaker("The RabbitMQ management API", retry_after_s)
    return _breakers[retry_after_s]


def management_request(broker_url: str, path: str, method: str = "GET", body: bytes | None = None,
                       timeout_s: float = 3.0) -> object:
    """Call a management API path (e.g. `queues/{vhost}/{name}`) with the broker's own credentials,
    at management_url() and nowhere else (a redirect is an error); return the parsed JSON answer, or
    None when the answer is empty (PUT, DELETE)."""
    _, _, _, user, password, vhost, _ = url_to_parts(broker_url)
    base = management_url(broker_url)
    vhost = urllib.parse.quote(vhost or "/", safe="")
    request = urllib.request.Request(f"{base}/api/{path.format(vhost=vhost)}", data=body, method=method)
    token = base64.b64encode(f"{user or 'guest'}:{password or 'guest'}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    request.add_header("content-type", "application/json")
    with _opener.open(request, timeout=timeout_s) as response:
        text = response.read()
    return json.loads(text) if text else None


def _unacked(broker_url: str, timeout_s: float) -> dict[str, int]:
    """Unacknowledged messages per queue of the vhost: one request, whatever the number of queues."""
    listing = management_request(broker_url, "queues/{vhost}?columns=name,messages_unacknowledged", timeout_s=timeout_s)
    return {q["name"]: int(q.get("messages_unacknowledged", 0)) for q in listing or []}


def declared_depth(channel: Any, name: str) -> tuple[int, int]:
    """(ready messages, consumers) of a queue from a passive queue.declare on `channel`: exact at this
    instant, the one way every part of conveyor reads a queue's depth. A queue that does not exist
    raises the broker's channel error (and the channel is closed)."""
    _, ready, consumers = channel.queue_declare(queue=name, passive=True)
    return ready, consumers


def _from_declare(app: Celery, names: list[str]) -> list[QueueStats]:
    found = []
    with app.connection_for_read() as conn:
        for name in names:
            channel = conn.channel()
            try:
                ready, consumers = declared_depth(channel, name)
                found.append(QueueStats(name, ready, None, consumers))
            except Exception as exc:  # the queue does not exist yet: report it empty
                log.debug("Passive declare of %s failed: %s", name, exc)
                found.append(QueueStats(name, 0, None, 0))
            finally:
                try:
                    channel.close()
                except Exception:
                    pass
    return found
