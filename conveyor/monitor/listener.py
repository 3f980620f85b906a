"""Celery's event stream, consumed in a background thread and handed to a callback event by event.

This is Celery's own EventReceiver, run through kombu's ConsumerMixin.run(), which reconnects
after the broker restarts (events sent while it is away are lost: the broker does not keep them).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from celery import Celery
from celery.events.receiver import EventReceiver

from conveyor.errors import BrokerError

log = logging.getLogger(__name__)

# Celery's default event queue TTL is 5 s: a monitor that falls more than 5 s behind under load
# would silently lose events, and the totals would come out short. Ten minutes of slack instead.
EVENT_QUEUE_TTL_S = 600.0


class _Receiver(EventReceiver):
    def __init__(self, *args: Any, on_ready: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_ready = on_ready

    def on_consume_ready(self, connection, channel, consumers, **kwargs) -> None:
        # The event queue is bound and consumed from here on. The base class also broadcasts a
        # heartbeat request, so every worker reports its active tasks at once.
        super().on_consume_ready(connection, channel, consumers, **kwargs)
        self._on_ready()


class EventListener:
    def __init__(self, app: Celery, handler: Callable[[dict[str, Any]], None]) -> None:
        self.app, self.handler = app, handler
        self._ready = threading.Event()
        self._receiver: _Receiver | None = None
        self._thread = threading.Thread(target=self._run, name="conveyor-monitor-events", daemon=True)

    def start(self, timeout_s: float = 15.0) -> None:
        """Start consuming; return once events are flowing, so that nothing sent after this is missed."""
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise BrokerError(f"could not subscribe to the Celery event stream within {timeout_s:g} s; "
                              "check that the broker answers (`make status`)")
        log.info("Listening to the Celery event stream.")

    def stop(self) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True  # the consume loop looks at it at least once a second
        self._thread.join(timeout=5)

    def _handle(self, event: dict[str, Any]) -> None:
        try:
            self.handler(event)
        except Exception:  # one malformed event must not end the monitoring
            log.exception("Could not account for event %r; skipping it.", event.get("type"))

    def _run(self) -> None:
        with self.app.connection_for_read() as conn:
            self._receiver = _Receiver(conn, handlers={"*": self._handle}, app=self.app,
                                       queue_ttl=EVENT_QUEUE_TTL_S, on_ready=self._ready.set)
            self._receiver.run()
