"""The worker's event dispatcher: Celery's, except that it never waits in the consumer's event loop.

A worker sends its monitoring events (worker-heartbeat every two seconds, and the task events when
`tuning.task_events` is on) from the consumer's event loop, the loop that also sends the AMQP
heartbeats of the consumer's connection. Celery's dispatcher publishes them on a connection of the
app's, which awaits the broker's confirm of every publish (`confirm_publish`, app.py) with no
deadline. Under a memory or disk alarm the broker blocks a connection once it publishes, stops reading
it and confirms nothing: the loop sat in `basic_publish_confirm`, the consumer connection's heartbeats
stopped, and the broker dropped that connection after two heartbeat intervals and handed its running
tasks out again (measured on a private node: tests/test_memory_alarm.py, docs/reliability.md).

Here an event is published without a confirm (events are monitoring, not data: Celery's own default),
its write has a deadline of a quarter heartbeat, and nothing is written while the broker has blocked
the events connection: events are held then (at most HELD_EVENTS, the oldest dropped first) and sent,
oldest first, by the first publish after the connection is unblocked. The worker's Events bootstep
has the hub read that connection, so the connection.unblocked notice is taken in as it comes; each
publish also makes a non-blocking read of it while blocked, for a worker without heartbeats.

Installed with `Celery(events="conveyor.seam.events:Events")` (conveyor/runtime/app.py). Other
transports (the embedded broker's) publish as in Celery.

Uses of Celery/kombu/py-amqp internals (checked against celery 5.7.0, kombu 5.7.0, amqp 5.4.2):

- `celery.app.events.Events.dispatcher_cls`, through `Celery(events=...)`: the worker's dispatcher
  (and every other the app makes) is this class. Replaces: Celery has no setting for how events are
  published.
- `celery.events.dispatcher.EventDispatcher._publish` overridden (Celery's body, plus the write
  deadline, the blocked check and the held events first) and its `_outbound_buffer` bounded, which
  Celery fills without a bound while publishes fail and empties in `flush`/`extend_buffer`.
  Replaces: a publish that waits for as long as the broker blocks.
- py-amqp's `Channel.basic_publish` set back to `Channel._basic_publish` on the dispatcher's own
  channel (never on a producer a caller hands to `publish`), before its first publish: py-amqp's constructor sets it to `basic_publish_confirm` when
  the connection confirms publishes, so the channel is never put in confirm mode.
- `_ReportingConnection.blocked` (conveyor/seam/producer.py) and `Connection.drain_events(timeout=0)`.
"""

from __future__ import annotations

import logging
import socket
from collections import deque
from functools import cached_property
from typing import Any

import amqp
from celery.app.events import Events as CeleryEvents
from celery.events.dispatcher import EventDispatcher as CeleryEventDispatcher

from conveyor.settings.context import maybe_settings_of
from conveyor.seam import producer as producers

log = logging.getLogger(__name__)

# The most events held while the broker blocks: minutes of a busy worker's task events, a few hundred
# kilobytes, rather than whatever an alarm of hours would pile up.
HELD_EVENTS = 10_000


class EventDispatcher(CeleryEventDispatcher):
    """Celery's EventDispatcher that never waits on a blocked broker (see the module's docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._outbound_buffer = deque(self._outbound_buffer, maxlen=HELD_EVENTS)
        self._holding = False
        self._dropped = 0

    @cached_property
    def write_timeout_s(self) -> float:
        """A quarter of the heartbeat (the consumer's heartbeats must go on around a write), or the
        confirm timeout where heartbeats are off."""
        settings = maybe_settings_of(self.app)
        heartbeat_s = settings.config.heartbeat_s if settings is not None else 0
        return heartbeat_s / 4 if heartbeat_s > 0 else producers.confirm_timeout_s(self.app)

    def _publish(self, event: Any, producer: Any, routing_key: str, retry: bool = False,
                 retry_policy: dict | None = None, **_kwargs: Any) -> None:
        if producer is None:
            return
        if producer is not self.producer:
            # A caller's producer (Celery's `publish`, e.g. task-sent on the task's own confirming
            # channel): its channel is not ours to change.
            return super()._publish(event, producer, routing_key, retry=retry, retry_policy=retry_policy)
        try:
            channel = producer.channel
            if isinstance(channel, amqp.Channel):
                # No confirm awaited: this channel is the dispatcher's own (the Events bootstep's
                # connection), and has not published yet if it is still in its constructor's state.
                if not channel._confirm_selected:
                    channel.basic_publish = channel._basic_publish
                if self._blocked(channel.connection):
                    self._hold(event, routing_key)
                    return
                while self._outbound_buffer:  # what was held, first and in order
                    held, held_key = self._outbound_buffer[0]
                    self._send(producer, held, held_key)
                    self._outbound_buffer.popleft()
                    if self._blocked(channel.connection):
                        self._hold(event, routing_key)
                        return
                self._resumed()
            self._send(producer, event, routing_key, retry, retry_policy)
        except Exception:
            if not self.buffer_while_offline:
                raise
            self._outbound_buffer.append((event, routing_key))  # Celery's way: sent again by flush()

    def _send(self, producer: Any, event: Any, routing_key: str, retry: bool = False,
              retry_policy: dict | None = None) -> None:
        producer.publish(
            event, routing_key=routing_key, exchange=self.exchange.name, retry=retry,
            retry_policy=retry_policy, declare=[self.exchange], serializer=self.serializer,
            headers=self.headers, delivery_mode=self.delivery_mode, timeout=self.write_timeout_s,
        )

    @staticmethod
    def _blocked(connection: Any) -> bool:
        if not getattr(connection, "blocked", False):
            return False
        try:  # a connection.unblocked notice that has come and not been read yet
            connection.drain_events(timeout=0)
        except socket.timeout:
            pass
        return connection.blocked

    def _hold(self, event: Any, routing_key: str) -> None:
        if not self._holding:
            self._holding = True
            log.warning("The broker blocked this worker's event connection: events are held (at most %d) "
                        "and sent once it unblocks; the worker goes on serving.", HELD_EVENTS)
        if len(self._outbound_buffer) == self._outbound_buffer.maxlen:
            self._dropped += 1
        self._outbound_buffer.append((event, routing_key))

    def _resumed(self) -> None:
        if self._holding:
            self._holding = False
            dropped, self._dropped = self._dropped, 0
            log.warning("The broker unblocked this worker's event connection: the events held were sent%s.",
                        f", but for the {dropped} oldest, dropped" if dropped else "")


class Events(CeleryEvents):
    """Celery's app.events with the dispatcher above: `Celery(events="conveyor.seam.events:Events")`."""

    dispatcher_cls = f"{__name__}:EventDispatcher"
