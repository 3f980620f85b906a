"""The live terminal dashboard: three tables (queues, worker services, task types) drawn from one
snapshot, redrawn in place every refresh interval.

Rich's Live redraws by moving the cursor back over the previous frame and writing the new one
in a single write, with no clear in between: that is what keeps it from flickering. Log records
are printed above the frame through the same console, so they never tear it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.logging import RichHandler
from rich.table import Table
from rich.text import Text



def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}"
    return f"{value:,}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:,.2f} s"


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _table(title: str, columns: list[str]) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold", expand=False, pad_edge=False, box=None,
                  header_style="bold cyan")
    for i, name in enumerate(columns):
        table.add_column(name, justify="left" if i == 0 else "right", no_wrap=True, min_width=len(name))
    return table


def render(snap: dict[str, Any], heading: str = "") -> Group:
    now = snap["time"]
    status = Text.assemble(
        ("conveyor monitor", "bold"), f"  {heading}\n" if heading else "\n",
        f"Tasks counted since {time.strftime('%H:%M:%S', time.localtime(snap['counting_since']))} "
        f"({_ago(now - snap['counting_since'])}); queues and workers sampled {_ago(now - snap['sampled_at'])} ago.",
    )

    queues = _table("Queues", ["QUEUE", "READY", "UNACKED", "CONSUMERS", "PUBLISH/s", "DELIVER/s", "RETRY BACKLOG", "DEAD-LETTERED"])
    for q in snap["queues"]:
        queues.add_row(q["name"], *map(_cell, (q["messages_ready"], q["messages_unacked"], q["consumers"],
                       q["publish_rate_per_s"], q["deliver_rate_per_s"], q["retry_backlog"], q["dead_lettered"])))

    services = _table(f"Worker services ({snap['backend']} stack)", ["SERVICE", "QUEUES", "REPLICAS", "ANSWERING", "TASKS ACTIVE"])
    for s in snap["services"]:
        services.add_row(s["name"], ",".join(s["queues"]), f"{s['replicas_running']}/{s['replicas_desired']}",
                         _cell(s["workers_responding"]), _cell(s["tasks_active"]))

    tasks = _table("Task types", ["TASK", "QUEUE", "SENT", "SUCCEEDED", "RETRIED", "FAILED", "DEAD-LETTERED",
                                  "RETRYING", "DONE/s", "P50", "P95"])
    for t in snap["tasks"]:
        tasks.add_row(t["name"], t["queue"], *map(_cell, (t["sent"], t["succeeded"], t["retried"], t["failed"],
                      t["dead_lettered"], t["retrying"], t["rate_per_s"])),
                      _duration(t["latency_p50_s"]), _duration(t["latency_p95_s"]))

    footer = Text(f"error: {snap['error']}", style="bold red") if snap.get("error") else Text(
        "REPLICAS running/desired. FAILED includes DEAD-LETTERED. P50/P95: from first send to success.", style="dim")
    alerts = [Text(f"warning: {w}", style="bold yellow") for w in snap.get("warnings") or ()]
    return Group(status, Text(), queues, Text(), services, Text(), tasks, Text(), *alerts, footer)


@contextmanager
def _logs_above(console: Console) -> Iterator[None]:
    """Send log records through the dashboard's console while it is live."""
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers = [RichHandler(console=console, show_path=False)]
    try:
        yield
    finally:
        root.handlers = saved


def run(snapshot: Callable[[], dict[str, Any]], refresh_s: float, heading: str = "",
        console: Console | None = None, stop: threading.Event | None = None) -> None:
    """Redraw every refresh_s until Ctrl-C (or `stop` is set)."""
    console = console or Console()
    stop = stop or threading.Event()
    # A frame taller than the terminal is cropped ("ellipsis"): one that scrolled could not be redrawn in place.
    with Live(render(snapshot(), heading), console=console, auto_refresh=False, transient=False,
              vertical_overflow="ellipsis") as live, _logs_above(live.console):
        started, ticks = time.monotonic(), 0
        while True:
            ticks += 1
            if stop.wait(max(0.0, started + ticks * refresh_s - time.monotonic())):
                return
            live.update(render(snapshot(), heading), refresh=True)
