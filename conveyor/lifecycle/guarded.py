"""A record store behind a circuit breaker: a store that is down or hung costs a task nothing.

Records serve operators, not delivery, and a worker writes one before and after every task (and
reads one, is_revoked, before each run). Through GuardedStore:

- every call to the store has the store's short timeout (config side_services) and no retries;
- the first call that fails opens the breaker (conveyor/breaker.py, one warning) and from then on
  writes go to this process's backlog at once, and is_revoked answers False (fail open, as
  the durable-revoke request, conveyor/seam/request.py, always did), without touching the store;
- a thread of this process probes the store every retry_after_s and, once it answers, writes the
  backlog in order (one more warning: it answers again). Those writes say they are late. A write
  that says a task is running or retrying never overwrites a record another process has since
  finished (succeeded, failed, dead-lettered, revoked): it becomes a note in its history instead;
- a write that timed out may have been applied all the same; written again, its event appears twice
  in the history (at least once, never lost);
- a backlog is kept up to BACKLOG writes; beyond that the oldest are dropped, and when the store is
  back each record that lost a write gets a note saying so: the record is marked incomplete.

Reads made for operators (get, query) and unique-key claims fail at once while the breaker is open,
with a RecordStoreError the CLIs print on one line; so do the writes of a store opened without
`keep_writes` (stores.require_store, for operators' commands: a process about to exit must not
keep a revoke in a backlog it would lose).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from conveyor.breaker import Breaker
from conveyor.errors import RecordStoreError
from conveyor.lifecycle.records import Record, Store, now
from conveyor.tasks.states import ACTIVE

log = logging.getLogger(__name__)

BACKLOG = 10_000  # writes kept per process while the store is away (a few hundred bytes each)


@dataclass
class _Write:
    at: float
    method: str  # "transition" or "note"
    task_id: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


class GuardedStore(Store):
    def __init__(self, inner: Store, retry_after_s: float, keep_writes: bool = True) -> None:
        super().__init__(inner.ttl_s)
        self.inner = inner
        self.keep_writes = keep_writes
        self.url = getattr(inner, "url", "?")
        self._fresh(retry_after_s)
        self._wake = threading.Event()
        # A prefork pool process is forked from the worker at any time (recycling): it must not
        # inherit a lock the parent's replay thread holds, nor the parent's backlog to write twice.
        os.register_at_fork(after_in_child=lambda: self._fresh(retry_after_s))

    def _fresh(self, retry_after_s: float) -> None:
        self.breaker = Breaker(f"The task-record store at {self.url}", retry_after_s)
        self._backlog: deque[_Write] = deque()
        self._incomplete: set[str] = set()
        self._lock = threading.Lock()
        self._replayer: tuple[int, threading.Thread] | None = None

    # --- writes: never wait on a store that is away -------------------------------------------------
    def transition(self, task_id: str, status: str, **kwargs: Any) -> None:
        self._write(_Write(now(), "transition", task_id, (status,), kwargs))

    def note(self, task_id: str, detail: str) -> None:
        self._write(_Write(now(), "note", task_id, (detail,)))

    def _write(self, write: _Write) -> None:
        if not self.keep_writes:
            self._ask(write.method, write.task_id, *write.args, **write.kwargs)
            return
        if not self._backlog and self.breaker.allow():
            try:
                getattr(self.inner, write.method)(write.task_id, *write.args, **write.kwargs)
            except RecordStoreError as exc:
                self.breaker.failed(exc)
            else:
                self.breaker.succeeded()
                return
        self._keep(write)

    def _keep(self, write: _Write) -> None:
        with self._lock:
            if len(self._backlog) >= BACKLOG:
                self._incomplete.add(self._backlog.popleft().task_id)
            self._backlog.append(write)
            self._start_replayer()

    # --- the hot-path read: fail open ---------------------------------------------------------------
    def is_revoked(self, task_id: str) -> bool:
        if self._backlog or not self.breaker.allow():
            return False
        try:
            revoked = self.inner.is_revoked(task_id)
        except RecordStoreError as exc:
            self.breaker.failed(exc)
            with self._lock:
                self._start_replayer()  # to probe the store, even with nothing to write
            return False
        self.breaker.succeeded()
        return revoked

    # --- operators' reads and claims: fail at once ----------------------------------------------
    def _ask(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if not self.breaker.allow():
            raise RecordStoreError(f"the task-record store at {self.url} did not answer a moment ago and is not "
                                   f"asked again for {self.breaker.retry_after_s:g} s; start it, or set RECORDS_URL "
                                   "to another store (sqlite:///FILE, or off)")
        try:
            answer = getattr(self.inner, method)(*args, **kwargs)
        except RecordStoreError as exc:
            self.breaker.failed(exc)
            raise
        self.breaker.succeeded()
        return answer

    def get(self, task_id: str) -> Record | None:
        return self._ask("get", task_id)

    def query(self, *args: Any, **kwargs: Any) -> list[Record]:
        return self._ask("query", *args, **kwargs)

    def claim(self, unique_key: str, task_id: str, name: str) -> str:
        return self._ask("claim", unique_key, task_id, name)

    def close(self) -> None:
        self.inner.close()

    # --- catching up ------------------------------------------------------------------------------
    def _start_replayer(self) -> None:
        """Called with the lock held; one thread per process."""
        if self._replayer is not None and self._replayer[1].is_alive():
            return
        thread = threading.Thread(target=self._replay, name="record-store-replay", daemon=True)
        self._replayer = (os.getpid(), thread)
        thread.start()

    def _replay(self) -> None:
        written = 0
        while True:
            if not self.breaker.allow():
                self._wake.wait(self.breaker.retry_after_s / 4)
                continue
            with self._lock:
                write = self._backlog[0] if self._backlog else None
            try:
                if write is None:
                    self.inner.is_revoked("")  # nothing to write: a probe, one cheap read
                else:
                    self._apply(write)
            except RecordStoreError as exc:
                self.breaker.failed(exc)
                continue
            self.breaker.succeeded()
            with self._lock:
                if write is not None:
                    self._backlog.popleft()
                    written += 1
                if not self._backlog:  # under the lock: a write kept from now on starts a new thread
                    self._replayer = None
                    break
        with self._lock:
            incomplete, self._incomplete = self._incomplete, set()
        for task_id in incomplete:
            try:
                self.inner.note(task_id, "some updates of this record were lost: the record store did not answer "
                                         f"and the writer's backlog ({BACKLOG} writes) was full")
            except RecordStoreError as exc:
                log.warning("Could not mark record %s incomplete: %s.", task_id, exc)
        if written or incomplete:
            log.warning("Wrote %d record update(s) late, kept while the store did not answer; %d record(s) "
                        "marked incomplete.", written, len(incomplete))

    def _apply(self, write: _Write) -> None:
        late = f" (written late: at {datetime.fromtimestamp(write.at).isoformat(timespec='milliseconds')} the store did not answer)"
        if write.method == "note":
            self.inner.note(write.task_id, write.args[0] + late)
            return
        status, kwargs = write.args[0], dict(write.kwargs)
        kwargs["detail"] = kwargs.get("detail", "") + late
        if status in ACTIVE:
            current = self.inner.get(write.task_id)
            if current is not None and not current.active and (current.updated_at or 0) > write.at:
                self.inner.note(write.task_id, f"{status}: {kwargs['detail']}")
                return
        self.inner.transition(write.task_id, status, **kwargs)
