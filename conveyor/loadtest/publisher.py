"""Publishing many tasks fast: one connection, one channel, publisher confirms handled asynchronously.

The app's own producer (confirm_publish=True) waits for the broker's confirm after every message,
a full round trip each, which caps a sender near a thousand messages a second (docs/performance.md
has the numbers). Here the channel is put in confirm mode by hand and confirms are collected as
they come, RabbitMQ's "handling publisher confirms asynchronously": the sender publishes the next
batch while the broker confirms the last one, and waits only when more than a bound is unconfirmed.
Nothing counts as sent before the broker has confirmed it, so the guarantee is the same as
per-message confirms; a message the broker refuses (nacks) counts as not sent.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from celery import Celery
from celery.backends.rpc import RPCBackend
from celery.signals import after_task_publish, before_task_publish
from celery.utils.nodenames import anon_nodename
from kombu.serialization import dumps
from kombu.utils.uuid import uuid

from conveyor.amqp.queues import declared_depth
from conveyor.seam import frames
from conveyor.errors import BrokerError
from conveyor.settings.context import settings_of

log = logging.getLogger(__name__)

WRITE_BYTES = 64 * 1024  # gathered frames are written once they reach this size (about 90 task messages)


class BatchPublisher:
    """Send tasks through Celery (`send_task`, a signature's `apply_async`) on one confirmed channel.

    `publish(send)` calls `send(producer)`, which publishes one task and returns what identifies
    it; `flush(in_flight)` waits until at most `in_flight` messages are unconfirmed and returns the
    identities settled since the last call as (confirmed, refused).
    """

    def __init__(self, app: Celery, confirm_timeout_s: float = 30.0) -> None:
        self.app = app
        self.confirm_timeout_s = confirm_timeout_s
        self.confirms = not settings_of(app).broker.embedded  # the filesystem transport has none
        # Whether `send_task` may be used: it sends no task-sent event and needs publisher confirms.
        self.fast = self.confirms and not app.conf.task_send_sent_event
        self._tag = 0  # the delivery tag of the last publish on this channel
        self._low = 1  # every tag below this one is settled
        self._unsettled: set[int] = set()
        self._refused: set[int] = set()
        self._published: deque[tuple[Any, int, int]] = deque()  # (identity, first tag, last tag), in order
        self._frames: list[bytes] = []  # published, not yet written to the socket
        self._frames_size = 0
        self._transport: Any = None

    def __enter__(self) -> BatchPublisher:
        # Our own connection, without the transport's confirm-per-message: we collect confirms ourselves.
        self.connection = self.app.connection_for_write(transport_options={"confirm_publish": False})
        self.connection.ensure_connection(max_retries=1)
        self.channel = self.connection.channel()
        if self.confirms:
            self.channel.confirm_select()
            self.channel.events["basic_ack"].add(self._on_ack)
            self.channel.events["basic_nack"].add(self._on_nack)
            # Count every publish on the channel (Celery may publish more than the task message,
            # e.g. a task-sent event), so that each delivery tag maps back to its task. And gather
            # the frames of a batch into a few large writes: py-amqp writes each message with a
            # sendall of its own, which was 15 % of the sender's time (profiled). Nothing waits on
            # a gathered frame: everything that does (flush, a passive declare, closing) sends them
            # first, and they go out in publishing order, so delivery tags stay in step.
            basic_publish = self.channel.basic_publish
            self._transport = self.connection.connection.transport
            self._write_now = self._transport._write
            self.channel.basic_publish = lambda *args, **kwargs: self._counted(basic_publish, *args, **kwargs)
        self.producer = self.app.amqp.Producer(self.channel, auto_declare=False)
        self._routes: dict[str, tuple[str, str, int, bytes]] = {}
        self._origin = anon_nodename()
        self._reply_to = self.app.thread_oid  # where send_task would have the results go
        if self.confirms and isinstance(self.app.backend, RPCBackend):
            self.app.backend.binding(self.channel).declare()  # once, where send_task declares it per task
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._write_frames()
            self.channel.close()
        except Exception:  # a connection that broke has nothing left to close
            log.debug("Closing the publisher channel failed.", exc_info=True)
        self.connection.release()

    def publish(self, send: Callable[[Any], Any]) -> Any:
        first = self._tag + 1
        identity = send(self.producer)
        self._published.append((identity, first, self._tag))
        return identity

    def _counted(self, publish: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self._tag += 1
        self._unsettled.add(self._tag)
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

    def send_task(self, name: str, kwargs: dict[str, Any], kwargsrepr: str) -> str:
        """Publish one task as `app.send_task` would, for a fraction of its cost; return its id.

        The message is Celery's own (protocol 2, built by `app.amqp.as_task_v2`) and the publish
        signals fire as usual (task records hang on them), but the per-message work that is the same
        for every message of a run is done once: routing, the reply queue's declaration, and the
        arguments' repr, which the caller passes (saferepr was 20 of send_task's ~100 us). It then
        goes straight to the channel rather than through kombu's Producer: retries and reconnects
        are of no use on a channel whose confirms we count. Only for the AMQP transport and callers
        that send no task-sent event (`tuning.task_events: false`): see `self.fast`.
        """
        exchange, routing_key, delivery_mode, publish_args = self._route(name)
        task_id = uuid()
        headers, properties, body, _ = self.app.amqp.as_task_v2(
            task_id, name, (), kwargs, reply_to=self._reply_to, origin=self._origin,
            argsrepr="()", kwargsrepr=kwargsrepr, ignore_result=None)  # None, as send_task leaves it
        if before_task_publish.receivers:
            before_task_publish.send(sender=name, body=body, exchange=exchange, routing_key=routing_key,
                                     declare=[], headers=headers, properties=properties, retry_policy=None)
        content_type, content_encoding, data = dumps(body, serializer="json")
        message = self.channel.prepare_message(data, 0, content_type, content_encoding, headers,
                                               dict(properties, delivery_mode=delivery_mode))
        # Without basic_publish's per-message extras (conveyor/seam/frames.py): flush() reads the socket.
        self._counted(frames.write_publish, self.channel, publish_args, message)
        if after_task_publish.receivers:
            after_task_publish.send(sender=name, body=body, headers=headers, exchange=exchange, routing_key=routing_key)
        return task_id

    def _route(self, name: str) -> tuple[str, str, int, bytes]:
        if name not in self._routes:
            queue = self.app.amqp.router.route({}, name)["queue"]
            # As Celery does: a direct exchange is addressed through the default one, by queue name.
            if queue.exchange.type == "direct":
                exchange, routing_key = "", queue.name
            else:
                exchange, routing_key = queue.exchange.name, queue.routing_key
            mode = queue.exchange.delivery_mode or self.app.conf.task_default_delivery_mode
            args = frames.publish_args(exchange, routing_key)
            self._routes[name] = (exchange, routing_key, 2 if mode in (2, "persistent") else 1, args)
        return self._routes[name]

    def flush(self, in_flight: int = 0) -> tuple[list[Any], list[Any]]:
        """Wait until no more than `in_flight` published messages await the broker's confirm; return
        what has been settled since the last call, split into (confirmed, refused), in publishing
        order. `flush()` waits for everything; a bound lets the next batch go out while the broker
        is still confirming this one."""
        self._write_frames()
        deadline = time.monotonic() + self.confirm_timeout_s
        while len(self._unsettled) > in_flight:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrokerError(f"the broker did not confirm {len(self._unsettled)} message(s) within "
                                  f"{self.confirm_timeout_s:g} s; check RabbitMQ (memory or disk alarms)")
            try:
                self.connection.drain_events(timeout=min(left, 1.0))
            except socket.timeout:
                continue
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
        return declared_depth(self.channel, name)

    def _write_frames(self) -> None:
        if self._frames:
            data = b"".join(self._frames)
            self._frames.clear()
            self._frames_size = 0
            self._transport.write(data)  # py-amqp's write: marks the connection broken on an error

    def _settle(self, tag: int, multiple: bool, refused: bool) -> None:
        tags = range(self._low, tag + 1) if multiple else (tag,)
        for t in tags:
            if t in self._unsettled:
                self._unsettled.discard(t)
                if refused:
                    self._refused.add(t)
        if multiple:
            self._low = max(self._low, tag + 1)

    def _on_ack(self, tag: int, multiple: bool) -> None:
        self._settle(tag, multiple, refused=False)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        log.warning("The broker refused (nacked) message %d%s.", tag, " and those before it" if multiple else "")
        self._settle(tag, multiple, refused=True)
