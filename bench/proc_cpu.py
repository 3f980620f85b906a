"""CPU time of the benchmark's processes, read from /proc: the broker, the workers, the caller.

`make bench` divides what each spent over a run by the tasks it moved. The machine's two cores are
shared by all three, so their CPU per task is what bounds the no-op rate, and where it goes says
what a change bought. Everything here only reads /proc; nothing is signalled.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
ROLES = ("broker", "workers", "caller")
LISTEN = "0A"  # the TCP state /proc/net/tcp gives a listening socket
HZ = os.sysconf("SC_CLK_TCK")  # the unit of /proc/<pid>/stat's CPU times


@dataclass(frozen=True)
class Stat:
    ppid: int
    ticks: int           # utime + stime: the process's own threads
    reaped_ticks: int    # cutime + cstime: its children that exited and were waited for


def parse_stat(text: str) -> Stat:
    """The fields of one /proc/<pid>/stat line we need. The command name (field 2) is in brackets and
    may hold spaces and brackets of its own, so the fields are counted from its last ')'."""
    rest = text.rsplit(")", 1)[1].split()
    # rest[0] is field 3 (state); ppid is field 4, utime..cstime are fields 14 to 17.
    return Stat(ppid=int(rest[1]), ticks=int(rest[11]) + int(rest[12]), reaped_ticks=int(rest[13]) + int(rest[14]))


def read_stat(pid: int) -> Stat | None:
    try:
        return parse_stat((PROC / str(pid) / "stat").read_text())
    except (OSError, IndexError, ValueError):
        return None  # gone, or not ours to read


def descendants(roots: Iterable[int], parents: dict[int, int]) -> set[int]:
    """`roots` and every process below them, given each process's parent."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found


def tree_ticks(roots: Iterable[int]) -> int:
    """CPU ticks of `roots` and all their descendants alive now, with the children each has reaped
    (a prefork pool process replaced during a run is counted by its parent's cutime)."""
    stats = {int(p.name): s for p in PROC.iterdir() if p.name.isdigit() and (s := read_stat(int(p.name)))}
    tree = descendants([r for r in roots if r in stats], {pid: s.ppid for pid, s in stats.items()})
    return sum(stats[pid].ticks + stats[pid].reaped_ticks for pid in tree)


def own_ticks(pid: int) -> int:
    """CPU ticks of one process's own threads, without its children: the caller's workers are its
    children (the local stack starts them), and are counted apart."""
    stat = read_stat(pid)
    return stat.ticks if stat else 0


def listening_inodes(port: int, tables: Iterable[str]) -> set[str]:
    """Socket inodes listening on `port`, from the text of /proc/net/tcp and tcp6."""
    inodes = set()
    for table in tables:
        for line in table.splitlines()[1:]:
            fields = line.split()
            if len(fields) > 9 and fields[3] == LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def listener_pid(port: int) -> int | None:
    """The process holding the socket that listens on `port` (RabbitMQ's beam.smp for 5672), or None."""
    tables = []
    for name in ("tcp", "tcp6"):
        try:
            tables.append((PROC / "net" / name).read_text())
        except OSError:
            continue
    wanted = {f"socket:[{inode}]" for inode in listening_inodes(port, tables)}
    if not wanted:
        return None
    for proc in PROC.iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:
            continue  # not ours to read, or gone
        for fd in fds:
            try:
                if os.readlink(fd) in wanted:
                    return int(proc.name)
            except OSError:
                continue
    return None


def broker_pid(port: int) -> int | None:
    """RabbitMQ's process: the one listening on its AMQP port; failing that (its sockets not ours to
    read), the only beam.smp on the machine. None when neither finds one (another broker may run beside it)."""
    pid = listener_pid(port)
    if pid:
        return pid
    beams = []
    for proc in PROC.iterdir():
        try:
            if proc.name.isdigit() and (proc / "comm").read_text().strip() == "beam.smp":
                beams.append(int(proc.name))
        except OSError:
            continue
    return beams[0] if len(beams) == 1 else None


def snapshot(broker: int | None, workers: Iterable[int], caller: int) -> dict[str, int | None]:
    """CPU ticks of each role now; the broker's is None when its process is unknown."""
    return {"broker": tree_ticks([broker]) if broker else None, "workers": tree_ticks(workers), "caller": own_ticks(caller)}


def per_task_ms(before: dict[str, int | None], after: dict[str, int | None], tasks: int,
                hz: int) -> dict[str, float | None]:
    """Milliseconds of CPU per task of each role between two snapshots of `hz` ticks a second, and
    their total (None when a role could not be read, since a total without it would mislead)."""
    if tasks <= 0:
        raise ValueError(f"CPU per task needs at least one task, got {tasks}")
    out: dict[str, float | None] = {}
    for role in ROLES:
        a, b = before.get(role), after.get(role)
        out[role] = None if a is None or b is None else (b - a) * 1000 / hz / tasks
    shown = [out[role] for role in ROLES]
    out["total"] = None if None in shown else sum(shown)
    return out


def median_by_total(rows: list[dict[str, float | None]]) -> dict[str, float | None] | None:
    """The row (one run's CPU per task) whose total is the median one: one run's figures, not a mix."""
    ranked = sorted((r for r in rows if r.get("total") is not None), key=lambda r: r["total"])
    if not ranked:
        return rows[(len(rows) - 1) // 2] if rows else None
    return ranked[(len(ranked) - 1) // 2]


def describe(cpu: dict[str, float | None] | None) -> str:
    """'broker 0.37 ms, workers 0.51 ms, caller 0.26 ms' (n/a for a role that could not be read)."""
    if not cpu:
        return "n/a"
    return ", ".join(f"{role} {'n/a' if cpu.get(role) is None else f'{cpu[role]:.2f} ms'}" for role in ROLES)

