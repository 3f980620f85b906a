"""The ledger: every task execution, written by the process that ran it, outside the broker.

`make chaos` must show that no confirmed task was lost, so it cannot take the broker's word for what
ran. When CONVEYOR_LEDGER names a file, each worker records every execution there as it starts and as
it ends, from Celery's task_prerun and task_postrun signals in the pool process that runs the task:
the end is written after the task's own publishes (a retry, a dead-letter) were confirmed and before
the worker acknowledges the message. The file is SQLite in WAL mode, which the processes of one
machine can write at once and which survives any of them being SIGKILLed mid-write. Without the
variable (the default) no receiver is connected, so ordinary runs pay nothing.

One row per execution, keyed by an id drawn when it starts, so a row written twice is still one row.
A message the broker delivers again (its worker died before the ack) is a new execution of the same
(task, attempt): that is how duplicated executions are counted. A write that fails is logged (Celery
catches what a signal receiver raises) and leaves its execution without an end, which the chaos run
counts as lost: the ledger errs towards a false alarm, never towards a false all-clear.

Task records (conveyor/lifecycle/) are another thing: one per task, its latest state, written by every
process involved and on a best-effort basis. They are the operator's view; this is the audit.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery.signals import task_postrun, task_prerun

from conveyor.lifecycle import sqlite
from conveyor.tasks.deadletter import DeadLettered
from conveyor.tasks.states import FINAL, TaskState
from conveyor.settings.environment import PROCESS_ENV

log = logging.getLogger(__name__)

LEDGER_ENV = "CONVEYOR_LEDGER"


SCHEMA = """
CREATE TABLE IF NOT EXISTS executions (
    execution   TEXT PRIMARY KEY,
    task_id     TEXT NOT NULL,
    task        TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    worker      TEXT NOT NULL,
    started_at  REAL NOT NULL,
    finished_at REAL,
    outcome     TEXT,
    error       TEXT
);
CREATE INDEX IF NOT EXISTS executions_task ON executions (task_id, attempt);
"""


def connect(path: Path) -> sqlite3.Connection:
    return sqlite.connect(path, SCHEMA, timeout_s=30)


# --- writing: in the worker's pool processes ------------------------------------------------------

_path: Path | None = None
_local = threading.local()  # a connection per thread, opened in the process that uses it (never across a fork)


def attach_from_env(env: Mapping[str, str] = PROCESS_ENV) -> None:
    if env.get(LEDGER_ENV):
        attach(Path(env[LEDGER_ENV]))


def attach(path: Path) -> None:
    """Record every execution in this process (and the pool processes it forks) in `path`."""
    global _path
    _path = path
    connect(path).close()  # create the file and the table once, up front
    task_prerun.connect(_started, weak=False, dispatch_uid="conveyor.ledger.started")
    task_postrun.connect(_finished, weak=False, dispatch_uid="conveyor.ledger.finished")
    log.info("Recording every task execution in the ledger %s.", path)


def detach() -> None:
    task_prerun.disconnect(dispatch_uid="conveyor.ledger.started")
    task_postrun.disconnect(dispatch_uid="conveyor.ledger.finished")


def _here() -> threading.local:
    """This thread's connection and running executions, opened anew in a forked pool process."""
    if getattr(_local, "pid", None) != os.getpid():
        _local.conn, _local.pid, _local.running = connect(_path), os.getpid(), {}
    return _local


def _started(task_id: str, task: Any, **_: Any) -> None:
    here, attempt = _here(), task.request.retries or 0
    execution = here.running[task_id, attempt] = uuid.uuid4().hex
    here.conn.execute("INSERT OR IGNORE INTO executions (execution, task_id, task, attempt, worker, started_at) "
                      "VALUES (?, ?, ?, ?, ?, ?)",
                      (execution, task_id, task.name, attempt, task.request.hostname or "", time.time()))


def _finished(task_id: str, task: Any, state: str, retval: Any = None, **_: Any) -> None:
    here = _here()
    execution = here.running.pop((task_id, task.request.retries or 0), None)
    if execution is None:  # no start was recorded (the receiver was attached mid-task): nothing to finish
        return
    if state == TaskState.SUCCEEDED:
        outcome = TaskState.SUCCEEDED
    elif state == TaskState.RETRYING:
        outcome = TaskState.RETRYING
    elif isinstance(retval, DeadLettered):
        outcome = TaskState.DEAD_LETTERED
    else:
        outcome = TaskState.FAILED
    error = f"{type(retval).__name__}: {retval}"[:500] if outcome in (TaskState.FAILED, TaskState.DEAD_LETTERED) else None
    here.conn.execute("UPDATE executions SET finished_at = ?, outcome = ?, error = ? WHERE execution = ?",
                      (time.time(), outcome, error, execution))


# --- reading: the chaos run's accounting ------------------------------------------------------------

@dataclass(frozen=True)
class Execution:
    task_id: str
    attempt: int
    worker: str
    started_at: float
    finished_at: float | None
    outcome: str | None


class Ledger:
    """Read a ledger file (while workers still write it: WAL readers do not block writers)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn = connect(path)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ids(self, *outcomes: str) -> set[str]:
        marks = ",".join("?" * len(outcomes))
        rows = self._conn.execute(f"SELECT DISTINCT task_id FROM executions WHERE outcome IN ({marks})", outcomes)
        return {task_id for (task_id,) in rows}

    def finished(self) -> set[str]:
        """Tasks that reached an end: succeeded, or dead-lettered by the task itself."""
        return self._ids(*FINAL)

    def succeeded(self) -> set[str]:
        return self._ids(TaskState.SUCCEEDED)

    def dead_lettered(self) -> set[str]:
        return self._ids(TaskState.DEAD_LETTERED)

    def count(self, outcome: str | None = None) -> int:
        """Executions that ended with `outcome` (any, when None; never ended, when "")."""
        if outcome is None:
            query, args = "SELECT COUNT(*) FROM executions WHERE outcome IS NOT NULL", ()
        elif outcome == "":
            query, args = "SELECT COUNT(*) FROM executions WHERE outcome IS NULL", ()
        else:
            query, args = "SELECT COUNT(*) FROM executions WHERE outcome = ?", (outcome,)
        return self._conn.execute(query, args).fetchone()[0]

    def duplicated(self) -> int:
        """Executions that ended beyond the first of the same (task, attempt): the cost of at-least-once."""
        row = self._conn.execute(
            "SELECT COALESCE(SUM(n - 1), 0) FROM (SELECT COUNT(*) AS n FROM executions "
            "WHERE outcome IS NOT NULL GROUP BY task_id, attempt)").fetchone()
        return row[0]

    def running(self, worker: str, since: float) -> int:
        """Executions `worker` started after `since` and has not ended (yet, or ever)."""
        return self._conn.execute("SELECT COUNT(*) FROM executions WHERE worker = ? AND outcome IS NULL AND started_at > ?",
                                  (worker, since)).fetchone()[0]

    def executions(self, worker: str | None = None) -> list[Execution]:
        query = "SELECT task_id, attempt, worker, started_at, finished_at, outcome FROM executions"
        rows = self._conn.execute(query + " WHERE worker = ?", (worker,)) if worker else self._conn.execute(query)
        return [Execution(*row) for row in rows]
