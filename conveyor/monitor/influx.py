"""Snapshots as InfluxDB line protocol, buffered and written in batches (the alternative to Prometheus).

Every collected snapshot becomes lines stamped with its own time, so a batch written every
emit interval still holds every sample at the collect resolution. Measurements and fields carry
the same names as the JSON snapshot: celery_task {name, queue_name}, celery_queue {queue_name},
conveyor_service {service}. Unknown figures (null in JSON) are left out of their line.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, TextIO

from conveyor.errors import UsageError

log = logging.getLogger(__name__)

STDOUT = "-"


def _escape(text: str, specials: str) -> str:
    for char in "\\" + specials:
        text = text.replace(char, "\\" + char)
    return text


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value}i"
    if isinstance(value, float):
        return repr(value)
    return '"' + _escape(str(value), '"') + '"'


def line(measurement: str, tags: dict[str, str], fields: dict[str, Any], time_s: float) -> str | None:
    """One line of line protocol, or None when every field is unknown (a line needs at least one)."""
    known = {k: v for k, v in fields.items() if v is not None}
    if not known:
        return None
    head = _escape(measurement, ", ") + "".join(f",{_escape(k, ',= ')}={_escape(v, ',= ')}" for k, v in sorted(tags.items()))
    body = ",".join(f"{_escape(k, ',= ')}={_value(v)}" for k, v in known.items())
    return f"{head} {body} {round(time_s * 1000) * 1_000_000}"  # ns, in whole ms: a float has no more digits


def lines(snapshot: dict[str, Any]) -> list[str]:
    at = snapshot["time"]
    found = []
    for task in snapshot["tasks"]:
        fields = {k: v for k, v in task.items() if k not in ("name", "queue")}
        found.append(line("celery_task", {"name": task["name"], "queue_name": task["queue"]}, fields, at))
    for queue in snapshot["queues"]:
        found.append(line("celery_queue", {"queue_name": queue["name"]}, {k: v for k, v in queue.items() if k != "name"}, at))
    for svc in snapshot["services"]:
        fields = {k: v for k, v in svc.items() if k not in ("name", "queues")}
        found.append(line("conveyor_service", {"service": svc["name"]}, fields, at))
    return [entry for entry in found if entry]


class Emitter:
    """Collects lines from each snapshot and writes them all at each flush, to stdout or a file."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._pending: list[str] = []
        if target != STDOUT:
            try:  # fail at start, with the path, rather than a minute later in a background thread
                Path(target).open("a").close()
            except OSError as exc:
                raise UsageError(f"cannot write InfluxDB lines to {target}: {exc.strerror}; "
                                 "pass --influx with a writable file, or - for stdout") from None

    def add(self, snapshot: dict[str, Any]) -> None:
        self._pending.extend(lines(snapshot))

    def flush(self) -> int:
        """Write what is pending; return the number of lines written."""
        pending = self._pending
        if not pending:
            return 0
        text = "\n".join(pending) + "\n"
        if self.target == STDOUT:
            self._write(sys.stdout, text)
        else:
            with open(self.target, "a", encoding="utf-8") as out:
                self._write(out, text)
        self._pending = []  # only once written: a failed write is tried again at the next flush
        log.info("Wrote %d InfluxDB lines to %s.", len(pending), "stdout" if self.target == STDOUT else self.target)
        return len(pending)

    @staticmethod
    def _write(out: TextIO, text: str) -> None:
        out.write(text)
        out.flush()
