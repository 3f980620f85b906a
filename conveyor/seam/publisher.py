"""The one publisher of many messages: dispatch.py, the load tester and chaos send every task
through `Publisher`, on one channel, confirms collected as they come (RabbitMQ's "handling
publisher confirms asynchronously"): the next batch goes out while the broker confirms the last
one. A message counts as sent only once confirmed; a nack or a return (task messages are
`mandatory`) counts as refused; every wait, the writes and closing included, has a deadline.
Single publishes (retries, dead-letters) follow the same rules in conveyor/seam/producer.py.

Uses of Celery/kombu/py-amqp internals (checked against celery 5.7.0, kombu 5.7.0, amqp 5.4.2):

- py-amqp `channel.events["basic_ack"]`/`["basic_nack"]`/`["basic_return"]`: confirms and returns
  read as they arrive. Replaces: `basic_publish_confirm`, a round trip per message.
- py-amqp's `transport._write` swapped while the channel publishes (fast path; the channel's
  `basic_publish` wrapped to do it): the frames of a batch gathered into a few large writes.
  Replaces: a sendall per frame (15 % of the sender's time).
- `frames.write_publish` (fast path): basic.publish frames written straight to the frame writer.
  Replaces: `channel.basic_publish`'s per-message argument encoding and socket poll.
- `Publisher.send_task` (fast path) re-implements `app.send_task` with `app.amqp.as_task_v2` and
  the publish signals: routing, the rpc:// reply queue's declaration (`RPCBackend.binding`) and the
  arguments' repr done once per run. Only without task-sent events.
- py-amqp `Connection.on_blocked`/`on_unblocked` and `transport.having_timeout`, the connection's
  `write_timeout` (SO_SNDTIMEO) and kombu's `Connection.collect`: a blocked connection noticed, a
  write or a close that the broker does not read given up, the connection dropped.

Every fast path is off with `tuning.fast_paths: false`: then every message goes through kombu's
public Producer.publish (still counted, still confirmed asynchronously).
"""

from __future__ import annotations

import logging
import socket
import time
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from celery import Celery
from celery.backends.rpc import RPCBackend
from celery.signals import after_task_publish, before_task_publish
from celery.utils.dispatch import Signal
from celery.utils.nodenames import anon_nodename
from kombu.exceptions import OperationalError
from celery.utils.saferepr import saferepr
from kombu.serialization import dumps
from kombu.utils.uuid import uuid

from conveyor.errors import BrokerError, PublishInterrupted
from conveyor.seam import frames
from conveyor.seam.producer import ALARM_HINT, BLOCKING, fast_paths, producer_class
from conveyor.seam.producer import confirm_timeout_s as app_confirm_timeout_s
from conveyor.seam.producer import identity as message_identity

log = logging.getLogger(__name__)

WRITE_BYTES = 64 * 1024  # gathered frames are written once they reach this size (about 90 task messages)

# Sent (sender: the Publisher) just before messages published through a Publisher reach the socket:
# whatever their before_task_publish receivers put off (the task records' batch, lifecycle/guarded.py)
# must be written now, before a worker can receive them. Receivers see `deferring()` true meanwhile.
writing_messages = Signal(name="conveyor_writing_messages")
_local = threading.local()


def deferring() -> bool:
    """Whether this thread is publishing through a Publisher, which sends `writing_messages` before
    the messages are written: a before_task_publish receiver may then put its own writes off until it."""
    return getattr(_local, "publishing", False)


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
        self.confirm_timeout_s = confirm_timeout_s or app_confirm_timeout_s(app)
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
            with _publishing():
                identity = send(self.producer)
        except BrokerError:
            raise
        except (*self.connection.connection_errors, OperationalError) as exc:  # kombu's name for them, on send_task
            raise self._interrupted(exc) from exc
        self._published.append((identity, first, self._tag))
        return identity

    def _publish_counted(self, publish: Callable[..., Any], body: Any, **kwargs: Any) -> Any:
        kwargs["retry"] = False  # kombu's retry would reconnect to a channel whose confirms we do not count
        if kwargs.get("mandatory") and not message_identity(kwargs.get("headers"), kwargs):
            kwargs["message_id"] = uuid()  # how its return, if any, names it
        return self._counted(message_identity(kwargs.get("headers"), kwargs) if kwargs.get("mandatory") else None,
                             publish, body, **kwargs)

    def _counted(self, identity: str | None, publish: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self._transport and writing_messages.receivers:  # written at once: see _write_frames otherwise
            writing_messages.send(sender=self)
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
                  task_id: str | None = None, ignore_result: bool | None = None, args: tuple[Any, ...] = ()) -> str:
        """Publish one task, as `app.send_task` would; return its id.

        Fast path (see `self.fast`): the message is Celery's own (protocol 2, built by
        `app.amqp.as_task_v2`) and the publish signals fire as usual (task records hang on them), but
        the per-message work that is the same for every message of a run is done once: routing, the
        reply queue's declaration, and the arguments' repr when the caller passes it (saferepr was 20
        of send_task's ~100 us). It then goes straight to the channel rather than through kombu's
        Producer: retries and reconnects are of no use on a channel whose confirms we count.
        """
        if not self.fast:
            with _publishing():
                return self.app.send_task(name, args=args, kwargs=kwargs, task_id=task_id, producer=self.producer,
                                          declare=[], ignore_result=ignore_result).id
        exchange, routing_key, delivery_mode, publish_args = self._route(name)
        task_id = task_id or uuid()
        headers, properties, body, _ = self.app.amqp.as_task_v2(
            task_id, name, tuple(args), kwargs, reply_to=self._reply_to, origin=self._origin,
            argsrepr=saferepr(tuple(args)) if args else "()", kwargsrepr=kwargsrepr, ignore_result=ignore_result)  # None, as send_task leaves it
        if before_task_publish.receivers:
            with _publishing():
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
        with _publishing():
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
        if writing_messages.receivers:
            writing_messages.send(sender=self)
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
        identity = message_identity(message.properties.get("application_headers"), message.properties)
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


class _publishing:
    """Marks this thread as publishing through a Publisher (see `deferring`); re-entrant."""

    def __enter__(self) -> None:
        self.was = getattr(_local, "publishing", False)
        _local.publishing = True

    def __exit__(self, *exc: object) -> None:
        _local.publishing = self.was
