"""A circuit breaker: stop asking a side service that is down or hung, and ask again later.

The record store, the unique-key store and the RabbitMQ management API serve operators, not
delivery; a task must not wait on one that does not answer (issue 12). Each is called with a short
timeout through a Breaker: after a call fails, the breaker is *open* and `allow()` says no, at no
cost, for `retry_after_s`; then one caller at a time probes the service (half open) and a success
closes the breaker again. It logs one warning per change of state, never one per call.

Written here rather than taken from pybreaker or aiobreaker: what is needed is these forty lines,
per process and thread-safe, with the project's own logging; pybreaker counts failures per
"fail_max" window and reports through listener classes, and neither is pinned in this project.
At the package's root because two layers use it: conveyor.lifecycle (stores) and conveyor.amqp
(management API).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

CLOSED, OPEN, PROBING = "closed", "open", "probing"


class Breaker:
    def __init__(self, service: str, retry_after_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.service = service
        self.retry_after_s = retry_after_s
        self.state = CLOSED
        self._clock = clock
        self._retry_at = 0.0
        self._lock = threading.Lock()

    def allow(self) -> bool:
        """Whether to call the service now: always while it answers; once per retry_after_s otherwise."""
        if self.state == CLOSED:  # the hot path: no lock while all is well
            return True
        with self._lock:
            if self.state == OPEN and self._clock() >= self._retry_at:
                self.state = PROBING
                return True
            return False

    def succeeded(self) -> None:
        if self.state == CLOSED:
            return
        with self._lock:
            if self.state != CLOSED:
                self.state = CLOSED
                log.warning("%s answers again; calling it as before.", self.service)

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            was = self.state
            self.state, self._retry_at = OPEN, self._clock() + self.retry_after_s
        if was == CLOSED:
            # The library's own error, where a wrapper (RecordStoreError) re-raised it: it says what happened.
            cause = exc.__cause__ or exc.__context__ or exc
            log.warning("%s did not answer (%s: %s); not calling it again for %g s at a time until it does.",
                        self.service, type(cause).__name__, cause, self.retry_after_s)

    @property
    def is_open(self) -> bool:
        return self.state != CLOSED
