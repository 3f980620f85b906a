"""What `python -m conveyor tasks|dlq ...` does: query records, revoke, and redrive dead letters."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable
from datetime import datetime

from celery import Celery

from conveyor.tasks import deadletter
from conveyor.errors import UsageError
from conveyor.lifecycle import stores
from conveyor.lifecycle.records import Record, now
from conveyor.tasks.states import TaskState

log = logging.getLogger(__name__)

UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str) -> float:
    """`30s`, `10m`, `2h`, `1d` ago, or an ISO 8601 time (local unless it names a zone)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if match:
        return now() - float(match[1]) * UNITS_S[match[2]]
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise UsageError(f"--since {text!r}: give a duration such as 30s, 10m, 2h, 1d, or a time such as "
                         "2025-01-31T14:00") from None


def find(app: Celery, task_id: str) -> Record:
    record = stores.require_store(app).get(task_id)
    if record is None:
        raise UsageError(f"no record of task {task_id}; `python -m conveyor tasks list` shows the recent ones")
    return record


def revoke(app: Celery, task_id: str, terminate: bool = False) -> str:
    """Revoke through Celery's remote control and in the record store; returns what will happen."""
    store = stores.require_store(app)
    record = find(app, task_id)
    if not record.active:
        raise UsageError(f"task {task_id} is already {TaskState.parse(record.status).label}; there is nothing to revoke")
    # The store first: from now on, no worker starts the task, whichever worker and whenever it starts.
    if record.status in (TaskState.QUEUED, TaskState.RETRYING):
        store.transition(task_id, TaskState.REVOKED, detail="revoked before it ran", revoked_at=now(), finished_at=now())
        outcome = f"task {task_id} was {TaskState.parse(record.status).label} and will not run"
    else:
        store.transition(task_id, record.status, detail="revoke asked while running" + (", terminating" if terminate else ""),
                         revoked_at=now())
        outcome = (f"task {task_id} is being terminated on {record.worker}" if terminate else
                   f"task {task_id} is running on {record.worker} and will finish this attempt, but not retry "
                   "(--terminate stops it now)")
    # Celery's revoke reaches the workers now holding the message (prefetched, or waiting for a
    # retry's countdown), and alone can terminate a running task.
    app.control.revoke(task_id, terminate=terminate, signal="SIGTERM")
    log.info("Revoked task %s (terminate=%s).", task_id, terminate)
    return outcome


def requeue(app: Celery, task_ids: Iterable[str] | None) -> list[deadletter.DeadLetter]:
    """Put dead-lettered tasks back in their queue, once each, as they were (deadletter.restore):
    same id, arguments, chain, callbacks, caller; retries counted from zero and the task type's time
    limits. A revoke is undone first, in the record and in every worker's memory, so that the task
    runs. `task_ids` None: all of them."""
    wanted = None if task_ids is None else set(task_ids)
    present = deadletter.browse(app)
    missing = (wanted or set()) - {letter.task_id for letter in present}
    if missing:
        raise UsageError(f"no message for task {', '.join(sorted(missing))} in the dead-letter queue; "
                         "`python -m conveyor dlq list` shows what is there")
    chosen = [l for l in present if wanted is None or l.task_id in wanted]
    unusable = [l for l in chosen if not _celery_message(l)]
    if unusable:
        raise UsageError(f"message {unusable[0].task_id or '(no id)'} in the dead-letter queue is not a Celery "
                         "task message and cannot run; `dlq purge` removes it")
    store = stores.store_for(app)
    ids = [letter.task_id for letter in chosen]
    if ids:
        try:  # workers that are down now start with no revokes in memory; the record store tells them
            app.control.broadcast("conveyor_unrevoke", arguments={"task_ids": ids})
        except Exception as exc:  # noqa: BLE001  (the embedded broker's control channel may be absent)
            log.warning("Could not ask the workers to forget revokes of the requeued tasks: %s.", exc)

    def take(letter: deadletter.DeadLetter) -> bool:
        if wanted is not None and letter.task_id not in wanted:
            return False
        if store is not None:
            # Before the message exists, as every record write (conveyor/lifecycle/signals.py).
            store.transition(letter.task_id, TaskState.QUEUED, name=letter.task, queue=letter.original_queue, sent_at=now(),
                             revoked_at=None, started_at=None, finished_at=None, error=None,
                             detail=f"requeued from {deadletter.DEAD_LETTER_QUEUE} to {letter.original_queue}: "
                                    "revocation cleared, retries reset to 0, the task type's time limits")
        deadletter.restore(app, letter)
        return True  # acknowledged only now, after the broker confirmed the restored message

    return deadletter.sift(app, take)


def purge(app: Celery) -> list[deadletter.DeadLetter]:
    """Remove every message from the dead-letter queue, noting it in each task's record."""
    gone = deadletter.drain(app, limit=sys.maxsize)
    store = stores.store_for(app)
    if store is not None:
        for letter in gone:
            if letter.task_id:
                store.note(letter.task_id, "purged from the dead-letter queue")
    return gone


def _celery_message(letter: deadletter.DeadLetter) -> bool:
    body = letter.body
    return bool(letter.task and letter.task_id and isinstance(body, (list, tuple)) and len(body) == 3)

