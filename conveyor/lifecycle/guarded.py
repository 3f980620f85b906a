"""A record store written in batches, off the task's path, behind a circuit breaker: a store that is
down or hung costs a task nothing, and one that answers costs it no round trip per state.

Records serve operators, not delivery, and a worker writes one before and after every task (and
reads one, is_revoked, before each run). Through GuardedStore:

- a write (a transition, a note, a tally) is queued in this process and returns at once; a thread of
  this process writes what is queued every BATCH_AFTER_S (or as soon as BATCH_MAX writes wait), the
  whole batch in one round trip (Store.write_many: one Redis MULTI/EXEC, one SQLite transaction).
  Tallies alone do not start a batch: they go with the next record write, or after TALLIES_AFTER_S.
  Where a record must be in the store before a message exists that could change it (a task about to
  be published, a retry, a dead letter), the writer calls `flush()`, which writes the queue at once
  from the caller's thread, in order (conveyor/lifecycle/signals.py says where);
- every call to the store has the store's short timeout (config side_services) and no retries;
- the first call that fails opens the breaker (conveyor/breaker.py, one warning) and from then on
  writes stay queued, `flush()` returns False at once, and is_revoked answers False (fail open, as
  the durable-revoke request, conveyor/seam/request.py, always did), without touching the store;
- the writer thread probes the store every retry_after_s and, once it answers, writes the queue in
  order (one more warning: it answers again). Those writes say they are late. A late write that
  says a task is running or retrying never overwrites a record another process has since finished
  (succeeded, failed, dead-lettered, revoked): it becomes a note in its history instead;
- a write that timed out may have been applied all the same; written again, its event appears twice
  in the history (at least once, never lost);
- the queue holds up to BACKLOG writes; beyond that the oldest are dropped, and when the store is
  back each record that lost a write gets a note saying so: the record is marked incomplete.

What a crash can lose: a process killed (SIGKILL, a lost host) loses the writes it queued in the
last BATCH_AFTER_S (its tallies: in the last TALLIES_AFTER_S) and any it kept while the store was
away; a clean exit (atexit, Celery's worker_process_shutdown and worker_shutdown,
conveyor/lifecycle/signals.py) writes them first, within one store timeout. Records that lost their
last write stay queued or running; the task itself, its result and its dead letter are the
broker's and are not affected.

Reads made for operators (get, query, tallies) and unique-key claims fail at once while the breaker
is open, with a RecordStoreError the CLIs print on one line; a store opened without `keep_writes`
(stores.require_store, for operators' commands: a process about to exit must not keep a revoke in a
queue it would lose) writes each change at once and fails the same way.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from conveyor.breaker import Breaker
from conveyor.errors import RecordStoreError
from conveyor.lifecycle.records import SAMPLES_KEPT, Record, Store, Write, now
from conveyor.tasks.states import ACTIVE

log = logging.getLogger(__name__)

BACKLOG = 10_000  # writes kept per process while the store is away (a few hundred bytes each)
BATCH_AFTER_S = 0.005  # how long the first queued write waits for others to share its round trip
BATCH_MAX = 500  # writes per round trip at most
TALLIES_AFTER_S = 1.0  # the longest tallies wait for a record write to ride with (the monitor reads every second or so)
_open: weakref.WeakSet[GuardedStore] = weakref.WeakSet()


class GuardedStore(Store):
    def __init__(self, inner: Store, retry_after_s: float, keep_writes: bool = True) -> None:
        super().__init__(inner.ttl_s)
        self.inner = inner
        self.keep_writes = keep_writes
        self.url = getattr(inner, "url", "?")
        self.retry_after_s = retry_after_s
        self._fresh()
        _open.add(self)
        # A prefork pool process is forked from the worker at any time (recycling): it must not
        # inherit a lock the parent's writer holds, nor the parent's queue to write twice.
        os.register_at_fork(after_in_child=self._fresh)

    def _fresh(self) -> None:
        self.breaker = Breaker(f"The task-record store at {self.url}", self.retry_after_s)
        self._queue: deque[Write] = deque()
        self._counts: Counter[str] = Counter()
        self._samples: dict[str, list[float]] = {}
        self._incomplete: set[str] = set()
        self._late = False  # the queue holds writes kept while the store did not answer
        self._written_late = 0
        self._probe = False  # is_revoked found the store away: the writer probes it
        self._lock = threading.Lock()  # the queue
        self._writing = threading.Lock()  # one batch at a time, so that batches land in order
        self._wake = threading.Event()
        self._writer: tuple[int, threading.Thread] | None = None

    # --- writes: queued, never waiting on the store ------------------------------------------------
    def transition(self, task_id: str, status: str, **kwargs: Any) -> None:
        self._write(Write(kwargs.pop("at", None) or now(), "transition", task_id, (status,), kwargs))

    def note(self, task_id: str, detail: str) -> None:
        self._write(Write(now(), "note", task_id, (detail,)))

    def add_tallies(self, counts: Mapping[str, float], samples: Mapping[str, Sequence[float]]) -> None:
        """Add to the tallies with the next batch (a counter's increments are summed until then)."""
        if not self.keep_writes:
            self._ask("add_tallies", counts, samples)
            return
        with self._lock:
            self._counts.update(counts)
            self._keep_samples(samples)
            # Tallies do not wake the writer: they go with the next record write, or within
            # TALLIES_AFTER_S. A worker's main process writes little else (a "received" count per
            # task), and a transaction of its own every BATCH_AFTER_S was 14 % of its samples.
            self._start_writer(wake=False)

    def _write(self, write: Write) -> None:
        if not self.keep_writes:
            self._ask(write.method, write.task_id, *write.args, **write.kwargs)
            return
        with self._lock:
            self._queue.append(write)
            self._trim()
            self._start_writer()

    def _trim(self) -> None:
        """With the lock held: keep the queue within BACKLOG, the oldest writes dropped and their
        records marked incomplete once the store is back."""
        while len(self._queue) > BACKLOG:
            self._incomplete.add(self._queue.popleft().task_id)

    def _keep_samples(self, samples: Mapping[str, Sequence[float]], older: bool = False) -> None:
        """With the lock held: add samples (before the queued ones if `older`), keeping each key's
        SAMPLES_KEPT latest, all the store keeps: a store away for hours must not grow this."""
        for name, values in samples.items():
            queued = self._samples.setdefault(name, [])
            if older:
                queued[:0] = values
            else:
                queued.extend(values)
            if len(queued) > SAMPLES_KEPT:
                del queued[:-SAMPLES_KEPT]

    def flush(self) -> bool:
        """Write everything queued now, from this thread; False if the store did not take it (it
        stays queued for the writer thread). Returns at once while the breaker is open."""
        if not self.keep_writes:
            return True
        for _ in range(len(self._queue) // BATCH_MAX + 2):  # what is queued now, not what others add meanwhile
            if not self.breaker.allow():
                return False
            done = self._write_batch()
            if done is None:
                return True
            if not done:
                return False
        return True

    # --- the hot-path read: fail open ---------------------------------------------------------------
    def is_revoked(self, task_id: str) -> bool:
        if self._late or not self.breaker.allow():
            return False
        try:
            revoked = self.inner.is_revoked(task_id)
        except RecordStoreError as exc:
            self.breaker.failed(exc)
            with self._lock:
                self._probe = True
                self._start_writer()  # to probe the store, even with nothing to write
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

    def tallies(self) -> tuple[dict[str, float], dict[str, list[float]]]:
        return self._ask("tallies")

    @property
    def queued(self) -> int:
        """Writes not yet in the store."""
        return len(self._queue)

    def close(self, flush: bool = True) -> None:
        if flush:
            self.flush()
        self.inner.close()

    # --- the writer -------------------------------------------------------------------------------
    def _start_writer(self, wake: bool = True) -> None:
        """Called with the lock held; one thread per process, woken by the first write of a batch."""
        if self._writer is not None and self._writer[0] == os.getpid() and self._writer[1].is_alive():
            if wake and not self._wake.is_set():
                self._wake.set()
            return
        thread = threading.Thread(target=self._run, name="record-store-writer", daemon=True)
        self._writer = (os.getpid(), thread)
        self._wake.set()
        thread.start()

    def _run(self) -> None:
        while True:
            # A timeout, not a wait for ever: the thread also probes a store the breaker shut out.
            self._wake.wait(self.retry_after_s / 4 if self.breaker.is_open else TALLIES_AFTER_S)
            self._wake.clear()
            if not (self._queue or self._counts or self._samples or self._probe):
                continue
            if not self.breaker.is_open:
                time.sleep(BATCH_AFTER_S)  # let the writes of the next few milliseconds share the round trip
            if not self.breaker.allow():
                continue
            done = self._write_batch()
            if done is not None:
                self._wake.set()  # more to write (or a failure: the wait above spaces the probes)

    def _write_batch(self) -> bool | None:
        """Write one batch: True if written, False if the store failed (the batch stays queued), None
        if there was nothing to write."""
        with self._writing:
            with self._lock:
                batch = [self._queue.popleft() for _ in range(min(BATCH_MAX, len(self._queue)))]
                counts, self._counts = self._counts, Counter()
                samples, self._samples = self._samples, {}
                # Let in while the breaker is open or half open: this call is its probe, and must end
                # it; what it writes was kept while the store did not answer, and says so.
                late = self._late or self.breaker.is_open
                probe, self._probe = self._probe or self.breaker.is_open, False
            if not (batch or counts or samples):
                if not probe:
                    return None
                try:
                    self.inner.is_revoked("")  # nothing to write: a probe, one cheap read
                except RecordStoreError as exc:
                    self.breaker.failed(exc)
                    with self._lock:
                        self._probe = True
                    return False
                self.breaker.succeeded()
                return None
            try:
                if late:
                    for write in batch:
                        self._apply_late(write)
                    self.inner.write_many((), counts, samples)
                else:
                    self.inner.write_many(batch, counts, samples)
            except RecordStoreError as exc:
                self.breaker.failed(exc)
                with self._lock:
                    # A late batch may have been written in part: what was written is written again
                    # (at least once, never lost).
                    self._queue.extendleft(reversed(batch))
                    self._trim()
                    self._counts.update(counts)
                    self._keep_samples(samples, older=True)
                    self._late = True
                return False
            self.breaker.succeeded()
            if late:
                self._caught_up(len(batch))
            return True

    def _caught_up(self, written: int) -> None:
        with self._lock:
            self._written_late += written
            if self._queue:
                return
            self._late = False
            incomplete, self._incomplete = self._incomplete, set()
            total, self._written_late = self._written_late, 0
        for task_id in incomplete:
            try:
                self.inner.note(task_id, "some updates of this record were lost: the record store did not answer "
                                         f"and the writer's backlog ({BACKLOG} writes) was full")
            except RecordStoreError as exc:
                log.warning("Could not mark record %s incomplete: %s.", task_id, exc)
        log.warning("Wrote %d record update(s) late, kept while the store did not answer; %d record(s) "
                    "marked incomplete.", total, len(incomplete))

    def _apply_late(self, write: Write) -> None:
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
        self.inner.transition(write.task_id, status, at=write.at, **kwargs)


def flush_all() -> None:
    """Write what every open store of this process has queued (a clean exit: atexit, and Celery's
    worker_process_shutdown, which a prefork pool process sends before it exits without atexit)."""
    for store in list(_open):
        try:
            store.flush()
        except Exception as exc:  # noqa: BLE001  (exiting: say so, and let the process go)
            log.warning("Could not write the queued task records of %s on exit: %s.", store.url, exc)


atexit.register(flush_all)
