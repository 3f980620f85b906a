"""Records and dead letters as text for a terminal (the CLI's --json gives the raw form)."""

from __future__ import annotations

from datetime import datetime

from conveyor.tasks.deadletter import DeadLetter
from conveyor.lifecycle.records import Record
from conveyor.lifecycle.signals import describe_limits


def when(ts: float | None, precise: bool = False) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S" + (".%f" if precise else ""))[: 23 if precise else 19]


def table(rows: list[Record]) -> str:
    if not rows:
        return "No task records match."
    name = max(8, *(len(r.name or "-") for r in rows))  # task names are the user's: as wide as the longest
    lines = [f"{'ID':<36}  {'NAME':<{name}} {'STATUS':<13} {'ATT':>3}  {'SENT':<19}  {'UPDATED':<19}  {'WORKER':<24} ERROR"]
    for r in rows:
        lines.append(f"{r.id:<36}  {r.name or '-':<{name}} {r.status or '-':<13} {r.attempts:>3}  {when(r.sent_at):<19}  "
                     f"{when(r.updated_at):<19}  {r.worker or '-':<24} {(r.error or '')[:80]}")
    return "\n".join(lines)


def detail(r: Record) -> str:
    fields = [
        ("id", r.id), ("name", f"{r.name or '-'} (queue {r.queue or '-'})"), ("status", r.status),
        ("attempts", r.attempts), ("worker", r.worker or "-"), ("unique key", r.unique_key or "-"),
        ("time limits", describe_limits(r.soft_time_limit_s, r.time_limit_s)),
        ("sent", when(r.sent_at)), ("started", when(r.started_at)), ("finished", when(r.finished_at)),
        ("revoked", when(r.revoked_at)), ("error", r.error or "-"),
    ]
    lines = [f"{label + ':':<13}{value}" for label, value in fields]
    lines += ["", "history:"]
    for e in r.history:
        attempt = f"#{e.attempt}" if e.attempt else ""
        lines.append(f"  {when(e.at, precise=True)}  {e.status:<13} {attempt:<4} {e.detail}")
    return "\n".join(lines)


def letters(found: list[DeadLetter]) -> str:
    if not found:
        return "The dead-letter queue is empty."
    task = max(8, *(len(d.task or "-") for d in found))
    queue = max(8, *(len(d.original_queue or "-") for d in found))
    lines = [f"{'ID':<36}  {'TASK':<{task}} {'ATT':>3}  {'FROM':<{queue}} {'DEAD-LETTERED AT':<32} REASON"]
    for d in found:
        at = d.headers.get("x-dead-lettered-at") or "-"
        lines.append(f"{d.task_id or '-':<36}  {d.task or '-':<{task}} {d.attempts if d.attempts is not None else '-':>3}  "
                     f"{d.original_queue or '-':<{queue}} {at:<32} {d.reason[:100]}")
    return "\n".join(lines)
