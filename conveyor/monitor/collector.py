"""The monitor: listens to the event stream, samples the broker and the stack and reads the task
tallies (conveyor/monitor/tallied.py) every collect interval, hands the samples to the InfluxDB
emitter every emit interval, serves Prometheus.

Threads: the event listener (feeds the accounting), the sampler (this module's loop), the
Prometheus HTTP server; the caller's thread reads `snapshot()` (the dashboard, --once).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from conveyor.settings.config import Monitoring
from conveyor.errors import BrokerError, ConveyorError, RecordStoreError
from conveyor.lifecycle import stores
from conveyor.stack.base import Stack
from conveyor.monitor.accounting import Accounting
from conveyor.monitor.influx import Emitter
from conveyor.monitor.listener import EventListener
from conveyor.monitor import tallied
from conveyor.monitor.snapshot import compose, sample_broker

log = logging.getLogger(__name__)


class Monitor:
    def __init__(self, stack: Stack, settings: Monitoring, influx: str | None = None) -> None:
        self.stack, self.settings = stack, settings
        self.accounting = Accounting(settings.latency_window_tasks, rate_window_s=settings.collect_interval_s,
                                     worker_down_after_s=settings.worker_down_after_s,
                                     worker_forget_after_s=settings.worker_forget_after_s,
                                     types=[(t.name, t.queue) for t in stack.config.task_types])
        self.listener = EventListener(stack.app, self.accounting.record)
        # None: records off, or out of the workers' reach; task figures then come from task events.
        self.store = stores.store_for(stack.app) if stack.shares_records() else None
        self._tallies_error: str | None = None
        self.emitter = Emitter(influx) if influx else None
        self._broker: dict[str, Any] | None = None
        self._error: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._loop, name="conveyor-monitor-sampler", daemon=True)

    def start(self, sample: bool = True) -> Monitor:
        """Subscribe to events, take the first sample now, then keep sampling in the background."""
        self.listener.start()
        self.collect()
        if sample:
            self._sampler.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._sampler.is_alive():
            self._sampler.join(timeout=10)
        self.listener.stop()
        if self.emitter:
            self.emitter.flush()

    def __enter__(self) -> Monitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def collect(self) -> None:
        """Sample the broker and the stack, read the task tallies; buffer the resulting snapshot for
        the emitter, if any."""
        self._read_tallies()
        try:
            broker, error = sample_broker(self.stack), None
        except Exception as exc:  # a monitor outlives a broker restart: report it, keep the last sample
            if self._broker is None:
                if isinstance(exc, ConveyorError):
                    raise
                raise BrokerError(f"cannot sample the queues and workers: {type(exc).__name__}: {exc}") from None
            broker, error = self._broker, f"the last sample failed ({type(exc).__name__}: {exc}); showing the one before"
            if self._error is None:
                log.warning("Sampling the broker failed (%s: %s); trying again every %g s.",
                            type(exc).__name__, exc, self.settings.collect_interval_s)
        if error is None and self._error is not None:
            log.warning("Sampling the broker works again.")
        with self._lock:
            self._broker, self._error = broker, error
        if self.emitter and error is None:  # a stale broker sample is not written out as a new one
            self.emitter.add(self.snapshot())

    def _read_tallies(self) -> None:
        if self.store is None:
            return
        try:
            counts, samples = self.store.tallies()
        except RecordStoreError as exc:  # the breaker (lifecycle/guarded.py) keeps this to one timeout
            if self._tallies_error is None:
                log.warning("Could not read the task tallies (%s); showing the last ones read.", exc)
            self._tallies_error = str(exc)
            return
        if self._tallies_error is not None:
            log.warning("Reading the task tallies works again.")
            self._tallies_error = None
        self.accounting.use_tallies(tallied.load(counts, samples))

    def snapshot(self) -> dict[str, Any]:
        """The latest broker sample with task figures as of now."""
        with self._lock:
            broker, error = self._broker, self._error
        if broker is None:
            raise RuntimeError("Monitor.snapshot() before start()")
        return compose(broker, self.accounting, error=error)

    def _loop(self) -> None:
        # Scheduled on a fixed grid (not "interval after the last sample ended"), so that a slow
        # sample (the ping alone waits a second) does not stretch the period.
        interval, emit_every = self.settings.collect_interval_s, self.settings.emit_interval_s
        started = time.monotonic()
        ticks, next_emit = 0, started + emit_every
        while True:
            ticks += 1
            if self._stop.wait(max(0.0, started + ticks * interval - time.monotonic())):
                return
            self.collect()
            if self.emitter and time.monotonic() >= next_emit:
                next_emit += emit_every
                try:
                    self.emitter.flush()
                except OSError as exc:
                    log.warning("Could not write the InfluxDB lines (%s); keeping them for the next try.", exc)
