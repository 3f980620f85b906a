"""Records in a SQLite file: for the embedded broker, or when no Redis answers.

Every process on this machine (the dispatcher, each worker and its pool processes) opens the same
file; WAL mode lets them read while one writes, and each write is one short transaction. Workers on
other hosts or in containers cannot share it: give them Redis (RECORDS_URL).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from conveyor.lifecycle import sqlite
from conveyor.tasks.states import ACTIVE, TaskState
from conveyor.lifecycle.records import FIELDS, SAMPLES_KEPT, Event, Record, Store, Write, from_strings, now, unavailable

log = logging.getLogger(__name__)

# Trimming a sample key to its SAMPLES_KEPT latest values walks that many index entries: done with
# every batch it was more than half of a pool process's record writes (110 of 200 us per no-op task,
# measured), so each process trims a key at most this often, and readers take the latest SAMPLES_KEPT.
TRIM_EVERY_S = 1.0


SCHEMA = f"""
CREATE TABLE IF NOT EXISTS records (
    id TEXT PRIMARY KEY, created_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    {", ".join(f"{name} {'REAL' if name.endswith(('_at', '_s')) else 'TEXT'}" for name in FIELDS if name != "attempts")}
);
CREATE INDEX IF NOT EXISTS records_by_time ON records (created_at);
CREATE INDEX IF NOT EXISTS records_by_change ON records (updated_at);
CREATE TABLE IF NOT EXISTS events (
    task_id TEXT NOT NULL, at REAL NOT NULL, status TEXT, attempt INTEGER, worker TEXT, detail TEXT
);
CREATE INDEX IF NOT EXISTS events_by_task ON events (task_id, at);
CREATE INDEX IF NOT EXISTS events_by_time ON events (at);
CREATE TABLE IF NOT EXISTS uniques (key TEXT PRIMARY KEY, task_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tallies (name TEXT PRIMARY KEY, value REAL NOT NULL);
CREATE TABLE IF NOT EXISTS samples (name TEXT NOT NULL, value REAL NOT NULL);
CREATE INDEX IF NOT EXISTS samples_by_name ON samples (name);
"""


class SqliteStore(Store):
    def __init__(self, path: str, ttl_s: int, busy_s: float = 10.0) -> None:
        super().__init__(ttl_s)
        self.busy_s = busy_s  # how long a write waits for another process's write lock
        self.path = Path(path)
        self.url = f"sqlite:///{path}"
        self._local = threading.local()
        self._trimmed_at: dict[str, float] = {}  # sample key -> when this process last trimmed it

    @property
    def db(self) -> sqlite3.Connection:
        """One connection per thread and per process: a connection must not cross a fork."""
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            try:
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                # Readable by this user only (SQLite gives its -wal and -shm files the same mode).
                # O_EXCL: an existing file is never opened here, since closing any descriptor of it
                # drops every POSIX lock this process's SQLite connections hold on it; another
                # process's last close would then delete the WAL under them, leaving them reading
                # a stale snapshot.
                try:
                    os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600))
                except FileExistsError:
                    pass
                conn = sqlite.connect(self.path, SCHEMA, timeout_s=self.busy_s)
            except (OSError, sqlite3.Error) as exc:
                raise unavailable(self.url, exc) from None
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE takes the write lock before any read, so no other writer comes in between."""
        db = self.db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise unavailable(self.url, exc) from None

    def _write(self, statements: list[tuple[str, tuple]]) -> list[sqlite3.Cursor]:
        with self._transaction() as db:
            return [db.execute(sql, params) for sql, params in statements]

    def transition(self, task_id: str, status: str, *, attempt: int | None = None, detail: str = "",
                   count_attempt: bool = False, at: float | None = None, **values: Any) -> None:
        self._write(self._transition(task_id, status, attempt, detail, count_attempt, at, values))

    def _transition(self, task_id: str, status: str, attempt: int | None, detail: str, count_attempt: bool,
                    at: float | None, values: dict[str, Any]) -> list[tuple[str, tuple]]:
        at = now() if at is None else at
        values = {"status": status, "updated_at": at, **values}
        columns = ", ".join(values)
        updates = ", ".join(f"{name} = excluded.{name}" for name in values)
        increment = int(count_attempt)
        statements = [
            (f"INSERT INTO records (id, created_at, attempts, {columns}) VALUES (?, ?, ?{', ?' * len(values)}) "
             f"ON CONFLICT (id) DO UPDATE SET {updates}, attempts = attempts + ?",
             (task_id, at, increment, *values.values(), increment)),
            ("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?)", (task_id, at, status, attempt, values.get("worker"), detail)),
        ]
        if self.sweep_due(at):
            statements += [("DELETE FROM records WHERE updated_at < ?", (at - self.ttl_s,)),
                           ("DELETE FROM events WHERE at < ?", (at - self.ttl_s,))]
        return statements

    def write_many(self, writes: Sequence[Write], counts: Mapping[str, float],
                   samples: Mapping[str, Sequence[float]]) -> None:
        """The whole batch in one transaction: one commit, where each transition alone was one."""
        statements: list[tuple[str, tuple]] = []
        for item in writes:
            if item.method == "note":
                statements.append(self._note(item.task_id, *item.args))
                continue
            status, kwargs = item.args[0], dict(item.kwargs)
            statements += self._transition(item.task_id, status, kwargs.pop("attempt", None), kwargs.pop("detail", ""),
                                           kwargs.pop("count_attempt", False), item.at, kwargs)
        self._write(statements + self._tallies(counts, samples))

    def add_tallies(self, counts: Mapping[str, float], samples: Mapping[str, Sequence[float]]) -> None:
        self._write(self._tallies(counts, samples))

    def _tallies(self, counts: Mapping[str, float], samples: Mapping[str, Sequence[float]]) -> list[tuple[str, tuple]]:
        statements = [("INSERT INTO tallies VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                       (name, by)) for name, by in counts.items()]
        at = now()
        for name, values in samples.items():
            statements += [("INSERT INTO samples VALUES (?, ?)", (name, value)) for value in values]
            if at - self._trimmed_at.get(name, 0.0) >= TRIM_EVERY_S:
                self._trimmed_at[name] = at
                statements.append(("DELETE FROM samples WHERE name = ? AND rowid <= (SELECT rowid FROM samples WHERE name = ? "
                                   "ORDER BY rowid DESC LIMIT 1 OFFSET ?)", (name, name, SAMPLES_KEPT)))
        return statements

    def tallies(self) -> tuple[dict[str, float], dict[str, list[float]]]:
        try:
            counts = dict(self.db.execute("SELECT name, value FROM tallies").fetchall())
            samples: dict[str, list[float]] = {}
            for name, value in self.db.execute("SELECT name, value FROM samples ORDER BY rowid").fetchall():
                samples.setdefault(name, []).append(value)
        except sqlite3.Error as exc:
            raise unavailable(self.url, exc) from None
        # Untrimmed since TRIM_EVERY_S, a key may hold more: what the store keeps is the latest SAMPLES_KEPT.
        return counts, {name: values[-SAMPLES_KEPT:] for name, values in samples.items()}

    def note(self, task_id: str, detail: str) -> None:
        self._write([self._note(task_id, detail)])

    @staticmethod
    def _note(task_id: str, detail: str) -> tuple[str, tuple]:
        return ("INSERT INTO events SELECT id, ?, status, NULL, NULL, ? FROM records WHERE id = ?", (now(), detail, task_id))

    def get(self, task_id: str) -> Record | None:
        db = self.db
        db.row_factory = sqlite3.Row
        try:
            row = db.execute("SELECT * FROM records WHERE id = ?", (task_id,)).fetchone()
            events = db.execute("SELECT at, status, attempt, worker, detail FROM events WHERE task_id = ? "
                                "ORDER BY at, rowid", (task_id,)).fetchall()
        except sqlite3.Error as exc:
            raise unavailable(self.url, exc) from None
        if row is None:
            return None
        record = from_strings(task_id, dict(row))
        record.history = [Event(**dict(e)) for e in events]
        return record

    def query(self, statuses: tuple[str, ...] = (), name: str | None = None, since: float | None = None,
              limit: int = 50) -> list[Record]:
        where, params = ["created_at >= ?"], [since if since is not None else 0]
        if statuses:
            where.append(f"status IN ({', '.join('?' * len(statuses))})")
            params += statuses
        if name:
            where.append("name = ?")
            params.append(name)
        db = self.db
        db.row_factory = sqlite3.Row
        try:
            rows = db.execute(f"SELECT * FROM records WHERE {' AND '.join(where)} ORDER BY created_at DESC LIMIT ?",
                              (*params, limit)).fetchall()
        except sqlite3.Error as exc:
            raise unavailable(self.url, exc) from None
        return [from_strings(row["id"], dict(row)) for row in rows]

    def claim(self, unique_key: str, task_id: str, name: str) -> str:
        with self._transaction() as db:
            row = db.execute("SELECT u.task_id, r.status FROM uniques u LEFT JOIN records r ON r.id = u.task_id "
                             "WHERE u.key = ?", (unique_key,)).fetchone()
            if row is not None and row[1] in ACTIVE:
                return row[0]
            at = now()
            db.execute("INSERT INTO uniques VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET task_id = excluded.task_id",
                       (unique_key, task_id))
            db.execute("INSERT INTO records (id, created_at, status, unique_key, name, updated_at) "
                       "VALUES (?, ?, ?, ?, ?, ?)", (task_id, at, TaskState.QUEUED, unique_key, name, at))
        return task_id

    def is_revoked(self, task_id: str) -> bool:
        try:
            row = self.db.execute("SELECT revoked_at FROM records WHERE id = ?", (task_id,)).fetchone()
        except sqlite3.Error as exc:
            raise unavailable(self.url, exc) from None
        return bool(row and row[0] is not None)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
