"""The one publisher: every task conveyor sends (dispatch.py, the load tester, chaos, retries,
dead-letters) goes out through this module, routed or refused, confirmed or reported, never waited
on without a deadline.

Two ways, one set of rules:

- `ConfirmingProducer` (the class Celery publishes with, installed as `AMQP.Producer`): one message,
  its confirm awaited for at most `confirm_timeout_s`. A task message is published `mandatory`, so
  a message no queue takes (a work or dead-letter queue deleted) is returned by the broker and the
  publish raises PublishRefused instead of being confirmed and dropped. Used by workers (retries,
  dead-letters, a chain's next stage) and by any `app.send_task`.
- `Publisher`: many messages on one channel, confirms collected as they come (RabbitMQ's "handling
  publisher confirms asynchronously"): the next batch goes out while the broker confirms the last
  one. A message counts as sent only once confirmed; a nack or a return counts as refused.

Uses of Celery/kombu/py-amqp internals (checked against celery 5.7.0, kombu 5.7.0, amqp 5.4.2):

- `celery.app.amqp.AMQP.Producer` and `.producer_pool` (its `_producer_pool`), through
  `Celery(amqp=...)`: every producer Celery makes (its producer pool, send_task, Task.retry, the
  worker's publishes) is a ConfirmingProducer, from a `kombu.pools.ProducerPool` of our own.
  Replaces: Celery has no setting for `mandatory` or for a confirm deadline on its own publishes,
  and its pool is kombu's global one of plain Producers.
- `kombu.Producer.publish` extended: `mandatory` set for task messages, `timeout`/`confirm_timeout`
  filled in, returns collected through `on_return` (py-amqp's `channel.events["basic_return"]`).
  Replaces: py-amqp raising out of a frame handler, which leaves the returned message's confirm
  unread and pairs every later confirm with the wrong message.
- py-amqp `channel.events["basic_ack"]`/`["basic_nack"]`: confirms read as they arrive. Replaces:
  `basic_publish_confirm`, a round trip per message.
- py-amqp's `transport._write` swapped while a Publisher's channel publishes (fast path; the
  channel's `basic_publish` wrapped to do it): the frames of a batch gathered into a few large
  writes. Replaces: a sendall per frame (15 % of the sender's time).
- `frames.write_publish` (fast path): basic.publish frames written straight to the frame writer.
  Replaces: `channel.basic_publish`'s per-message argument encoding and socket poll.
- `Publisher.send_task` (fast path) re-implements `app.send_task` with `app.amqp.as_task_v2` and
  the publish signals: routing, the rpc:// reply queue's declaration (`RPCBackend.binding`) and the
  arguments' repr done once per run. Only without task-sent events.
- `amqp.Connection(on_blocked=..., on_unblocked=...)`, passed through the transport options (and
  set on a Publisher's own connection): `connection.blocked`/`unblocked` logged once per change.

Every fast path is off with `tuning.fast_paths: false`: then every message goes through kombu's
public Producer.publish (still counted, still confirmed asynchronously by the Publisher).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from functools import cached_property
from typing import Any

from celery import Celery
from celery.app.amqp import AMQP as CeleryAMQP
from celery.backends.rpc import RPCBackend
from celery.signals import after_task_publish, before_task_publish
from celery.utils.nodenames import anon_nodename
from kombu import Producer
from kombu.pools import ProducerPool
from kombu.exceptions import OperationalError
from kombu.serialization import dumps
from kombu.utils.uuid import uuid

from conveyor.errors import BrokerError, PublishInterrupted, PublishRefused
from conveyor.seam import frames

log = logging.getLogger(__name__)

CONFIRM_TIMEOUT_S = 30.0  # without a config: the schema's default for confirm_timeout_s
WRITE_BYTES = 64 * 1024  # gathered frames are written once they reach this size (about 90 task messages)
ALARM_HINT = "check RabbitMQ (memory or disk alarms)"


def _config(app: Celery) -> Any:
    return getattr(app, "conveyor_config", None)


def confirm_timeout_s(app: Celery) -> float:
    config = _config(app)
    return config.confirm_timeout_s if config is not None else CONFIRM_TIMEOUT_S


def fast_paths(app: Celery) -> bool:
    config = _config(app)
    return config is None or config.tuning.fast_paths


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


def blocking_options() -> dict[str, Any]:
    """Transport options that make every py-amqp connection report connection.blocked/unblocked."""
    return {"on_blocked": BLOCKING.blocked, "on_unblocked": BLOCKING.unblocked}


# --- one message at a time -------------------------------------------------------------------

def _identity(headers: dict | None, properties: dict) -> str | None:
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
                f"the broker returned task {_identity(headers, kwargs) or '?'} published to exchange {exchange!r} "
                f"with routing key {routing_key!r}: no queue took it ({exc})")
        return result


def producer_class(app: Celery) -> type[ConfirmingProducer]:
    """ConfirmingProducer with the app's confirm timeout."""
    return type("ConfirmingProducer", (ConfirmingProducer,), {"confirm_timeout_s": confirm_timeout_s(app)})


class AMQP(CeleryAMQP):
    """Celery's AMQP with conveyor's producer: `Celery(amqp="conveyor.seam.publisher:AMQP")`."""

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


# --- many messages, confirms collected asynchronously ---------------------------------------

def kwargs_repr(kwargs: dict[str, Any]) -> str:
    """What Celery's saferepr would show of a simulated task's arguments, payload abbreviated: the
    message's `kwargsrepr`, for a fraction of saferepr's cost."""
    return repr({k: f"<{len(v)} characters>" if k == "payload" else v for k, v in kwargs.items()})


class Publisher:
    """Send tasks (`send_task`, `send_signature`, or anything through `producer`) on one confirmed channel.

    `publish(send)` calls `send(producer)`, which publishes one job (one or more messages) and
    returns what identifies it; `flush(in_flight)` waits until at most `in_flight` messages are
    unconfirmed and returns the identities settled since the last call as (confirmed, refused).
    A connection that breaks raises PublishInterrupted; `reconnect()` then says what became of
    each unsettled job and opens a new connection.
    """

    def __init__(self, app: Celery, confirm_timeout_s: float | None = None, fast: bool | None = None) -> None:
        self.app = app
        self.confirm_timeout_s = confirm_timeout_s or globals()["confirm_timeout_s"](app)
        self.fast_paths = fast_paths(app) if fast is None else fast
        self.returned = 0  # messages the broker returned (no queue took them), over the publisher's life
        self.nacked = 0

    # --- the connection ---
    def __enter__(self) -> Publisher:
        self._open()
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()

    def _open(self) -> None:
        # Our own connection, without the transport's confirm-per-message: confirms are collected here.
        # A write that the broker does not read (an alarm) fails after the confirm timeout, not never.
        self.connection = self.app.connection_for_write(
            transport_options={"confirm_publish": False, "write_timeout": self.confirm_timeout_s})
        policy = self.app.conf.task_publish_retry_policy or {}
        self.connection.ensure_connection(**{k: v for k, v in policy.items() if k.startswith(("max_", "interval_"))})
        self.confirms = self.connection.transport.driver_type == "amqp"  # the filesystem transport has none
        # send_task's fast path sends no task-sent event, hence only where none is wanted.
        self.fast = self.fast_paths and self.confirms and not self.app.conf.task_send_sent_event
        self._tag = 0  # the delivery tag of the last publish on this channel
        self._low = 1  # every tag below this one is settled
        self._unsettled: set[int] = set()
        self._refused: set[int] = set()
        self._returned: set[int] = set()
        self._tag_of: dict[str, int] = {}  # identity of a mandatory message -> its tag, until settled
        self._id_of: dict[int, str] = {}
        self._published: deque[tuple[Any, int, int]] = deque()  # (identity, first tag, last tag), in order
        self._frames: list[bytes] = []  # published, not yet written to the socket
        self._frames_size = 0
        self._transport: Any = None
        self.channel = self.connection.channel()
        if self.confirms:
            amqp_connection = self.connection.connection
            amqp_connection.on_blocked = lambda reason: BLOCKING.blocked(reason, key=self)
            amqp_connection.on_unblocked = lambda: BLOCKING.unblocked(key=self)
            self.channel.confirm_select()
            self.channel.events["basic_ack"].add(self._on_ack)
            self.channel.events["basic_nack"].add(self._on_nack)
            self.channel.events["basic_return"].add(self._on_return)  # the fast path bypasses the producer
            if self.fast_paths:
                self._transport = self.connection.connection.transport
                self._write_now = self._transport._write
                basic_publish = self.channel.basic_publish
                self.channel.basic_publish = lambda *args, **kwargs: self._gathering(basic_publish, *args, **kwargs)
        self.producer = producer_class(self.app)(self.channel, auto_declare=False, on_return=self._on_return,
                                                 wrap=self._publish_counted)
        self._routes: dict[str, tuple[str, str, int, bytes]] = {}
        self._origin = anon_nodename()
        self._reply_to = self.app.thread_oid  # where send_task would have the results go
        if self.confirms and isinstance(self.app.backend, RPCBackend):
            self.app.backend.binding(self.channel).declare()  # once, where send_task declares it per task

    def _close(self) -> None:
        # Closing waits for the broker's close-ok, which a broker that stopped reading (an alarm, a
        # timeout above) never sends: then the connection is dropped instead, and every graceful
        # close has the confirm timeout as its deadline.
        healthy = self.confirms and not self._unsettled and self not in BLOCKING.keys
        BLOCKING.unblocked(key=self, closed=True)
        if not self.confirms:
            self.connection.release()
            return
        if healthy:
            try:
                with self.connection.connection.transport.having_timeout(self.confirm_timeout_s):
                    self._write_frames()
                    self.channel.close()
                    self.connection.release()
                return
            except Exception:  # noqa: BLE001  (a connection that broke, or timed out, is dropped below)
                log.debug("Closing the publisher connection failed; dropping it.", exc_info=True)
        self.connection.collect()

    def reconnect(self) -> tuple[list[Any], list[Any], list[Any]]:
        """After PublishInterrupted: (confirmed, refused, unknown) among the jobs not yet handed back,
        then a new connection and channel. An unknown job may or may not have reached a queue."""
        confirmed, refused, unknown = [], [], []
        for identity, first, last in self._published:
            tags = range(first, last + 1)
            if any(t in self._unsettled for t in tags):
                unknown.append(identity)
            elif any(t in self._refused for t in tags):
                refused.append(identity)
            else:
                confirmed.append(identity)
        self._frames.clear()
        BLOCKING.unblocked(key=self, closed=True)
        self.connection.collect()  # broken already: nothing to close gracefully
        self._open()
        return confirmed, refused, unknown

    def _interrupted(self, exc: BaseException) -> PublishInterrupted:
        return PublishInterrupted(f"the connection to the broker broke while publishing ({type(exc).__name__}: {exc}); "
                                  f"{len(self._unsettled)} message(s) were not confirmed")

    # --- publishing ---
    def publish(self, send: Callable[[Any], Any]) -> Any:
        first = self._tag + 1
        try:
            identity = send(self.producer)
        except BrokerError:
            raise
        except (*self.connection.connection_errors, OperationalError) as exc:  # kombu's name for them, on send_task
            raise self._interrupted(exc) from exc
        self._published.append((identity, first, self._tag))
        return identity

    def _publish_counted(self, publish: Callable[..., Any], body: Any, **kwargs: Any) -> Any:
        kwargs["retry"] = False  # kombu's retry would reconnect to a channel whose confirms we do not count
        if kwargs.get("mandatory") and not _identity(kwargs.get("headers"), kwargs):
            kwargs["message_id"] = uuid()  # how its return, if any, names it
        return self._counted(_identity(kwargs.get("headers"), kwargs) if kwargs.get("mandatory") else None,
                             publish, body, **kwargs)

    def _counted(self, identity: str | None, publish: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self._tag += 1
        if self.confirms:
            self._unsettled.add(self._tag)
            if identity is not None:
                self._tag_of[identity] = self._tag
                self._id_of[self._tag] = identity
        return publish(*args, **kwargs)

    def _gathering(self, publish: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Publish with the frames gathered rather than written (fast path). Only the publish itself:
        a declaration on the way (a task-sent event's exchange) is written at once and awaited."""
        self._transport._write = self._gather
        try:
            return publish(*args, **kwargs)
        finally:
            self._transport._write = self._write_now
            if self._frames_size >= WRITE_BYTES:
                self._write_frames()

    def _gather(self, frame: Any) -> None:
        self._frames.append(bytes(frame))  # a view of py-amqp's buffer, reused for the next frame
        self._frames_size += len(frame)

    def send_task(self, name: str, kwargs: dict[str, Any], kwargsrepr: str | None = None,
                  task_id: str | None = None, ignore_result: bool | None = None) -> str:
        """Publish one task, as `app.send_task` would; return its id.

        Fast path (see `self.fast`): the message is Celery's own (protocol 2, built by
        `app.amqp.as_task_v2`) and the publish signals fire as usual (task records hang on them), but
        the per-message work that is the same for every message of a run is done once: routing, the
        reply queue's declaration, and the arguments' repr when the caller passes it (saferepr was 20
        of send_task's ~100 us). It then goes straight to the channel rather than through kombu's
        Producer: retries and reconnects are of no use on a channel whose confirms we count.
        """
        if not self.fast:
            return self.app.send_task(name, kwargs=kwargs, task_id=task_id, producer=self.producer, declare=[],
                                      ignore_result=ignore_result).id
        exchange, routing_key, delivery_mode, publish_args = self._route(name)
        task_id = task_id or uuid()
        headers, properties, body, _ = self.app.amqp.as_task_v2(
            task_id, name, (), kwargs, reply_to=self._reply_to, origin=self._origin,
            argsrepr="()", kwargsrepr=kwargsrepr, ignore_result=ignore_result)  # None, as send_task leaves it
        if before_task_publish.receivers:
            before_task_publish.send(sender=name, body=body, exchange=exchange, routing_key=routing_key,
                                     declare=[], headers=headers, properties=properties, retry_policy=None)
        content_type, content_encoding, data = dumps(body, serializer="json")
        message = self.channel.prepare_message(data, 0, content_type, content_encoding, headers,
                                               dict(properties, delivery_mode=delivery_mode))
        # Without basic_publish's per-message extras (conveyor/seam/frames.py): flush() reads the socket.
        self._counted(task_id, self._gathering, frames.write_publish, self.channel, publish_args, message)
        if after_task_publish.receivers:
            after_task_publish.send(sender=name, body=body, headers=headers, exchange=exchange, routing_key=routing_key)
        return task_id

    def send_signature(self, signature: Any) -> Any:
        """Publish a signature (a chain: its first stage) through Celery; return its AsyncResult."""
        return signature.apply_async(producer=self.producer, declare=[], retry=False)

    def _route(self, name: str) -> tuple[str, str, int, bytes]:
        if name not in self._routes:
            queue = self.app.amqp.router.route({}, name)["queue"]
            # As Celery does: a direct exchange is addressed through the default one, by queue name.
            if queue.exchange.type == "direct":
                exchange, routing_key = "", queue.name
            else:
                exchange, routing_key = queue.exchange.name, queue.routing_key
            mode = queue.exchange.delivery_mode or self.app.conf.task_default_delivery_mode
            args = frames.publish_args(exchange, routing_key, mandatory=True)
            self._routes[name] = (exchange, routing_key, 2 if mode in (2, "persistent") else 1, args)
        return self._routes[name]

    # --- confirms ---
    def flush(self, in_flight: int = 0) -> tuple[list[Any], list[Any]]:
        """Wait until no more than `in_flight` published messages await the broker's confirm; return
        what has been settled since the last call, split into (confirmed, refused), in publishing
        order. `flush()` waits for everything; a bound lets the next batch go out while the broker
        is still confirming this one. Refused: nacked, or returned because no queue took it."""
        self._write_frames()
        deadline = time.monotonic() + self.confirm_timeout_s
        returned = self.returned
        while len(self._unsettled) > in_flight:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrokerError(f"the broker did not confirm {len(self._unsettled)} message(s) within "
                                  f"{self.confirm_timeout_s:g} s{BLOCKING.describe()}; {ALARM_HINT}")
            try:
                self.connection.drain_events(timeout=min(left, 1.0))
            except socket.timeout:
                continue
            except self.connection.connection_errors as exc:
                raise self._interrupted(exc) from exc
        if self.returned != returned:
            log.warning("The broker returned %d message(s) no queue took (a work or dead-letter queue deleted?); "
                        "they count as refused, not sent.", self.returned - returned)
        confirmed, refused = [], []
        while self._published:
            identity, first, last = self._published[0]
            tags = range(first, last + 1)
            if any(t in self._unsettled for t in tags):
                break  # settled ones after it wait for the next call: the order is kept
            self._published.popleft()
            if self._refused and any(t in self._refused for t in tags):
                self._refused.difference_update(tags)
                refused.append(identity)
            else:
                confirmed.append(identity)
        return confirmed, refused

    def queue_depth(self, name: str) -> int:
        """Messages ready in a queue, from a passive declare: exact at this instant."""
        return self._declare(name)[0]

    def consumers(self, name: str) -> int | None:
        """How many consumers (worker channels) a queue has; None where the transport cannot tell."""
        return self._declare(name)[1]

    def _declare(self, name: str) -> tuple[int, int | None]:
        if not self.confirms:  # the filesystem transport counts neither
            return 0, None
        self._write_frames()  # what is published counts in the depth
        _, ready, consumers = self.channel.queue_declare(queue=name, passive=True)
        return ready, consumers

    def _write_frames(self) -> None:
        if not self._frames:
            return
        data = b"".join(self._frames)
        self._frames.clear()
        self._frames_size = 0
        try:
            self._transport.write(data)  # py-amqp's write: marks the connection broken on an error
        except (socket.timeout, BlockingIOError) as exc:  # SO_SNDTIMEO (write_timeout) expired
            raise BrokerError(f"writing to the broker timed out after {self.confirm_timeout_s:g} s: it is not "
                              f"reading{BLOCKING.describe()}; {ALARM_HINT}") from exc
        except OSError as exc:
            raise self._interrupted(exc) from exc

    def _on_return(self, exc: Exception, exchange: str, routing_key: str, message: Any) -> None:
        # basic.return comes before the returned message's confirm: marked here, refused when settled.
        self.returned += 1
        identity = _identity(message.properties.get("application_headers"), message.properties)
        tag = self._tag_of.get(identity) if identity else None
        if tag is None:
            log.error("The broker returned a message this publisher cannot name (routing key %r): %s.", routing_key, exc)
            return
        self._returned.add(tag)

    def _settle(self, tag: int, multiple: bool, refused: bool) -> None:
        tags = range(self._low, tag + 1) if multiple else (tag,)
        for t in tags:
            if t in self._unsettled:
                self._unsettled.discard(t)
                identity = self._id_of.pop(t, None)
                if identity is not None:
                    self._tag_of.pop(identity, None)
                if refused or t in self._returned:
                    self._returned.discard(t)
                    self._refused.add(t)
        if multiple:
            self._low = max(self._low, tag + 1)

    def _on_ack(self, tag: int, multiple: bool) -> None:
        self._settle(tag, multiple, refused=False)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        self.nacked += 1
        log.warning("The broker refused (nacked) message %d%s.", tag, " and those before it" if multiple else "")
        self._settle(tag, multiple, refused=True)
