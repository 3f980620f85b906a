"""A task's record: what became of it, attempt by attempt, and the store that keeps it.

Status goes queued -> running -> (retrying -> running)* -> succeeded | failed | dead_lettered, or
revoked from any active state; `dlq requeue` makes a dead-lettered task queued again. Each change is
one write (`Store.transition`) that sets the record's fields and appends an event to its history.
Two stores implement the same interface: Redis (shared by workers on every host and in containers)
and a SQLite file (processes on one machine); stores.py opens the one RECORDS_URL names
(settings/environment.records_url chooses it), docs/tasks.md explains.
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from kombu.utils.url import maybe_sanitize_url

from conveyor.errors import RecordStoreError
from conveyor.tasks.states import ACTIVE

log = logging.getLogger(__name__)



@dataclass
class Event:
    at: float
    status: str
    attempt: int | None = None
    worker: str | None = None
    detail: str = ""


@dataclass
class Record:
    id: str
    name: str | None = None
    queue: str | None = None
    status: str | None = None
    attempts: int = 0  # runs started, across retries and requeues
    worker: str | None = None
    error: str | None = None
    unique_key: str | None = None
    soft_time_limit_s: float | None = None  # the limits of the latest (or, while retrying, the next) attempt
    time_limit_s: float | None = None
    sent_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float | None = None
    revoked_at: float | None = None
    history: list[Event] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Write:
    """One change to a record, made at `at`, waiting to be written (lifecycle/guarded.py batches them)."""

    at: float
    method: str  # "transition" or "note"
    task_id: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


SAMPLES_KEPT = 1000  # recent values kept per sample key (latencies, for the monitor's percentiles)

FIELDS = tuple(f.name for f in fields(Record) if f.name not in ("id", "history"))
FLOAT_FIELDS = ("soft_time_limit_s", "time_limit_s", "sent_at", "started_at", "finished_at", "updated_at", "revoked_at")


def from_strings(task_id: str, values: dict[str, Any]) -> Record:
    """A Record from stored values (Redis keeps strings, SQLite typed columns)."""
    record = Record(task_id)
    for name in FIELDS:
        value = values.get(name)
        if value is None or value == "":
            continue
        if name == "attempts":
            value = int(value)
        elif name in FLOAT_FIELDS:
            value = float(value)
        setattr(record, name, value)
    return record


class Store(abc.ABC):
    """Where records live, and the task tallies (lifecycle/tallies.py) beside them. Every method is
    one round trip (one transaction); `write_many` is one for a whole batch."""

    EXPIRE_EVERY_S = 60.0  # how often a process sweeps out records older than ttl_s

    def __init__(self, ttl_s: int) -> None:
        self.ttl_s = ttl_s
        self._swept_at = 0.0

    def sweep_due(self, at: float) -> bool:
        """Whether to forget expired records with this write: now and then, not on every one."""
        if at - self._swept_at <= self.EXPIRE_EVERY_S:
            return False
        self._swept_at = at
        return True

    @abc.abstractmethod
    def transition(self, task_id: str, status: str, *, attempt: int | None = None, detail: str = "",
                   count_attempt: bool = False, at: float | None = None, **values: Any) -> None:
        """Set the status and the given fields (None clears one), count a started attempt if asked,
        and append an event (at `at`, default now) to the history; creates the record if there is none."""

    def write_many(self, writes: Sequence[Write], counts: Mapping[str, float],
                   samples: Mapping[str, Sequence[float]]) -> None:
        """Apply `writes` in order, add `counts` to the tallies and append `samples` (each key keeps its
        SAMPLES_KEPT latest). Stores override this to make it one round trip."""
        for write in writes:
            if write.method == "transition":
                self.transition(write.task_id, *write.args, at=write.at, **write.kwargs)
            else:
                self.note(write.task_id, *write.args)
        if counts or samples:
            self.add_tallies(counts, samples)

    @abc.abstractmethod
    def add_tallies(self, counts: Mapping[str, float], samples: Mapping[str, Sequence[float]]) -> None:
        """Add to the tallies' counters and append to their samples, in one transaction."""

    @abc.abstractmethod
    def tallies(self) -> tuple[dict[str, float], dict[str, list[float]]]:
        """Every counter and every key's kept samples (oldest first)."""

    @abc.abstractmethod
    def note(self, task_id: str, detail: str) -> None:
        """Append an event to an existing record's history without changing its status."""

    @abc.abstractmethod
    def get(self, task_id: str) -> Record | None:
        """The record with its history, or None."""

    @abc.abstractmethod
    def query(self, statuses: tuple[str, ...] = (), name: str | None = None, since: float | None = None,
              limit: int = 50) -> list[Record]:
        """Records first sent at or after `since`, newest first, without their history."""

    @abc.abstractmethod
    def claim(self, unique_key: str, task_id: str, name: str) -> str:
        """Atomically: if the task holding `unique_key` is still active, return its id; otherwise
        make `task_id` the holder, create its record as queued, and return `task_id`."""

    @abc.abstractmethod
    def is_revoked(self, task_id: str) -> bool:
        """Whether `tasks revoke` was asked for this task (one cheap read, made before each run)."""

    def close(self) -> None:
        """Release connections."""


def unavailable(url: str, exc: BaseException) -> RecordStoreError:
    return RecordStoreError(f"the task-record store at {maybe_sanitize_url(url)} did not answer ({type(exc).__name__}: {exc}); "
                            "start it, or set RECORDS_URL to another store (sqlite:///FILE, or off)")


def now() -> float:
    return time.time()
