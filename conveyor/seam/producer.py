"""Publishing one message at a time, conveyor's way: the producer class Celery publishes every
task with (send_task, retries, dead-letters, a chain's next stage, the app's producer pool).

A task message is published `mandatory`, so a message no queue takes (a work or dead-letter queue
deleted) is returned by the broker and the publish raises PublishRefused instead of being
confirmed and dropped; its confirm is awaited for at most `confirm_timeout_s`, and so is the write.
`connection.blocked`/`unblocked` are logged once per change. Batches go through
conveyor/seam/publisher.py, which follows the same rules.

Uses of Celery/kombu/py-amqp internals (checked against celery 5.7.0, kombu 5.7.0, amqp 5.4.2):

- `celery.app.amqp.AMQP.Producer` and `.producer_pool` (its `_producer_pool`), through
  `Celery(amqp=...)`: every producer Celery makes is a ConfirmingProducer, from a
  `kombu.pools.ProducerPool` of our own. Replaces: Celery has no setting for `mandatory` or for a
  confirm deadline on its own publishes, and its pool is kombu's global one of plain Producers.
- `kombu.Producer.publish` extended: `mandatory` set for task messages, `timeout`/`confirm_timeout`
  filled in, returns collected on py-amqp's `channel.events["basic_return"]`. Replaces: py-amqp
  raising out of a frame handler, which leaves the returned message's confirm unread and pairs every
  later confirm with the wrong message.
- `amqp.Connection(on_blocked=..., on_unblocked=...)`, given by a subclass of kombu's py-amqp
  transport (`kombu.transport.pyamqp.Transport.Connection`, the class it instantiates), put in
  kombu's `TRANSPORT_ALIASES` for amqp/pyamqp/amqps (and out of its `_transport_cache`), and set
  on a Publisher's own connection. Its `Transport` (the factory py-amqp's `connect` calls) gives
  conveyor/seam/sockets.py's buffered transport, with the fast paths on, and its `blocking_read`
  takes a frame from that buffer without the socket timeout's changes:
  `connection.blocked`/`unblocked` logged once per change. Its `_on_blocked`/`_on_unblocked` (the
  handlers py-amqp calls for those methods) extended to keep the connection's own `blocked` state. Not through the transport options:
  those are part of the worker's `stats` reply (`celery inspect stats`, Flower), which must stay
  JSON.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
from collections.abc import Callable
from functools import cached_property
from typing import Any

from celery import Celery
from celery.app.amqp import AMQP as CeleryAMQP
from kombu import Producer
from kombu.pools import ProducerPool
from kombu import transport as kombu_transport
from kombu.transport import pyamqp

from conveyor.errors import PublishRefused
from conveyor.seam import sockets
from conveyor.settings.context import maybe_settings_of

log = logging.getLogger(__name__)

CONFIRM_TIMEOUT_S = 30.0  # without a config: the schema's default for confirm_timeout_s
ALARM_HINT = "check RabbitMQ (memory or disk alarms)"


def confirm_timeout_s(app: Celery) -> float:
    settings = maybe_settings_of(app)
    return settings.config.confirm_timeout_s if settings is not None else CONFIRM_TIMEOUT_S


def fast_paths(app: Celery) -> bool:
    """The one switch (tuning.fast_paths, CONVEYOR_FAST_PATHS): off, every fast path of the seam
    falls back to the libraries' own code. An app conveyor did not build has them on."""
    settings = maybe_settings_of(app)
    return settings is None or settings.fast_paths


# --- connection.blocked ----------------------------------------------------------------------

class _Blocking:
    """Which of this process's connections the broker has blocked: logged when that goes from none
    to some and back, not once per connection. The app's connections (a worker holds several) share
    one key, since an alarm blocks them all; a Publisher's has its own, forgotten when it closes
    (a closed connection is never told it is unblocked)."""

    APP = "app"

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.keys: set[object] = set()
        self.reason = ""

    def blocked(self, reason: str = "", key: object = APP) -> None:
        with self.lock:
            first = not self.keys
            self.keys.add(key)
            self.reason = reason or "no reason given"
        if first:
            log.warning("The broker blocked publishing (%s): publishes wait for it to unblock, each for at most "
                        "its confirm timeout; %s.", self.reason, ALARM_HINT)

    def unblocked(self, key: object = APP, closed: bool = False) -> None:
        with self.lock:
            if key not in self.keys:
                return
            self.keys.discard(key)
            last = not self.keys
        if last and not closed:
            log.warning("The broker unblocked publishing.")

    def describe(self) -> str:
        return f"; the broker has blocked publishing ({self.reason})" if self.keys else ""


BLOCKING = _Blocking()


class _ReportingConnection(pyamqp.Connection):
    """py-amqp's connection as kombu's transport makes it, reporting connection.blocked/unblocked,
    and knowing whether the broker has blocked it (`blocked`, for the worker's event dispatcher:
    conveyor/seam/events.py)."""

    buffered = False  # reads through sockets.BufferedTransport (fast path): set by install_transport

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("on_blocked", BLOCKING.blocked)
        kwargs.setdefault("on_unblocked", BLOCKING.unblocked)
        self.blocked = False
        super().__init__(*args, **kwargs)

    def Transport(self, host: str, connect_timeout: Any, ssl: Any = False, read_timeout: Any = None,  # noqa: N802
                  write_timeout: Any = None, **kwargs: Any) -> Any:
        if ssl or not self.buffered:
            return super().Transport(host, connect_timeout, ssl, read_timeout, write_timeout, **kwargs)
        return sockets.BufferedTransport(host, connect_timeout=connect_timeout, read_timeout=read_timeout,
                                         write_timeout=write_timeout, **kwargs)

    def blocking_read(self, timeout: float | None = None) -> Any:
        # A frame already in a buffered transport's buffer needs neither the socket nor its timeout.
        buffered = getattr(self.transport, "buffered_frame", None)
        frame = buffered() if buffered is not None else None
        if frame is None:
            return super().blocking_read(timeout)
        return self.on_inbound_frame(frame)

    def _on_blocked(self) -> Any:
        self.blocked = True
        return super()._on_blocked()

    def _on_unblocked(self) -> Any:
        self.blocked = False
        return super()._on_unblocked()


class Transport(pyamqp.Transport):
    """kombu's py-amqp transport, whose connections report connection.blocked/unblocked, and whose
    worker-loop reader reads on through a buffered transport's frames (conveyor/seam/sockets.py)."""

    Connection = _ReportingConnection

    def _make_reader(self, connection: Any, timeout: Any = socket.timeout, error: Any = socket.error,
                     _unavail: tuple[int, ...] = (errno.EAGAIN, errno.EINTR)) -> Any:
        if isinstance(connection.transport, sockets.BufferedTransport):
            return sockets.reader(connection, timeout, error, _unavail)
        return super()._make_reader(connection, timeout, error, _unavail)

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        super().register_with_event_loop(connection, loop)
        if isinstance(connection.transport, sockets.BufferedTransport):
            loop.on_tick.add(sockets.on_tick(connection.transport, loop))


class SSLTransport(pyamqp.SSLTransport):
    """The same, over TLS (amqps://)."""

    Connection = _ReportingConnection


def install_transport(buffered: bool = True) -> None:
    """Make kombu's py-amqp schemes (amqp://, pyamqp://, amqps://) use the transports above, in this
    process, reading through conveyor/seam/sockets.py's buffered transport if `buffered` (a fast
    path). Through kombu's alias table rather than the app's broker_transport: a connection then
    still says `amqp` (its URI, its info(): what Celery logs and Flower parses to find the
    management API)."""
    _ReportingConnection.buffered = buffered
    for alias, cls in (("amqp", Transport), ("pyamqp", Transport), ("amqps", SSLTransport)):
        kombu_transport.TRANSPORT_ALIASES[alias] = f"{__name__}:{cls.__name__}"
        kombu_transport._transport_cache.pop(alias, None)  # resolved before: resolve it again

# --- one message at a time -------------------------------------------------------------------

def identity(headers: dict | None, properties: dict) -> str | None:
    return (headers or {}).get("id") or properties.get("correlation_id") or properties.get("message_id")


class ConfirmingProducer(Producer):
    """kombu's Producer with conveyor's publishing rules (see the module's docstring).

    `wrap`, when set (by a Publisher), is called as wrap(publish, body, **kwargs) instead of kombu's
    publish, to count it; such a producer's channel awaits no confirm per message, and its returns
    go to the Publisher's `on_return`.
    """

    confirm_timeout_s = CONFIRM_TIMEOUT_S

    def __init__(self, channel: Any, *args: Any, wrap: Callable[..., Any] | None = None,
                 on_return: Callable[..., None] | None = None, **kwargs: Any) -> None:
        self.wrap = wrap
        self.returned: list[tuple[Exception, str, str]] = []
        # Registered on the channel at publish time rather than by kombu, which assumes every
        # channel has py-amqp's `events` (the filesystem transport's has none, and returns nothing).
        self.on_return_handler = on_return or self._record_return
        super().__init__(channel, *args, **kwargs)

    def _watch_returns(self) -> None:
        events = getattr(self.channel, "events", None)
        if events is not None and self.on_return_handler not in events["basic_return"]:
            events["basic_return"].add(self.on_return_handler)

    def _record_return(self, exc: Exception, exchange: str, routing_key: str, message: Any) -> None:
        self.returned.append((exc, exchange, routing_key))

    def publish(self, body: Any, *args: Any, **kwargs: Any) -> Any:
        headers = kwargs.get("headers")
        if kwargs.get("mandatory") is None:
            # Task messages must reach a queue. Results must not be mandatory: a caller that left has
            # deleted its reply queue, and that is no error of the worker's.
            kwargs["mandatory"] = bool(headers and "task" in headers and "id" in headers)
        if kwargs.get("confirm_timeout") is None:
            kwargs["confirm_timeout"] = self.confirm_timeout_s
        if kwargs.get("timeout") is None:  # the write too: a broker that stops reading blocks it
            kwargs["timeout"] = self.confirm_timeout_s
        self._watch_returns()
        if self.wrap is not None:
            return self.wrap(super().publish, body, **kwargs)
        self.returned.clear()
        result = super().publish(body, *args, **kwargs)
        if self.returned:
            # In confirm mode the broker sends basic.return before the confirm, so the return of this
            # message has been read by the time its confirm was.
            exc, exchange, routing_key = self.returned[-1]
            self.returned.clear()
            raise PublishRefused(
                f"the broker returned task {identity(headers, kwargs) or '?'} published to exchange {exchange!r} "
                f"with routing key {routing_key!r}: no queue took it ({exc})")
        return result


def producer_class(app: Celery) -> type[ConfirmingProducer]:
    """ConfirmingProducer with the app's confirm timeout."""
    return type("ConfirmingProducer", (ConfirmingProducer,), {"confirm_timeout_s": confirm_timeout_s(app)})


class AMQP(CeleryAMQP):
    """Celery's AMQP with conveyor's producer: `Celery(amqp="conveyor.seam.producer:AMQP")`."""

    @cached_property
    def Producer(self) -> type[ConfirmingProducer]:  # noqa: N802  (Celery's name)
        return producer_class(self.app)  # on first use: the config is attached to the app by then

    @property
    def producer_pool(self) -> ProducerPool:
        # Celery's takes kombu's global pool of plain Producers; this one makes ours.
        if self._producer_pool is None:
            self._producer_pool = ProducerPool(self.app.pool, limit=self.app.pool.limit, Producer=self.Producer)
        return self._producer_pool

    publisher_pool = producer_pool
