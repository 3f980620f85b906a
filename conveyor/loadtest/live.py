"""The live progress bar on stderr: jobs done, the current rate, in flight, failures, backpressure."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from conveyor.loadtest.runner import Progress as Snapshot


@contextmanager
def progress_bar(total: int | None, enabled: bool = True) -> Iterator[Callable[[Snapshot], None]]:
    if not enabled or not sys.stderr.isatty():
        yield lambda _snapshot: None
        return
    columns = (TextColumn("load test"), BarColumn(), TextColumn("{task.fields[line]}"), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        bar = progress.add_task("load test", total=total, line="starting")

        def update(s: Snapshot) -> None:
            line = (f"{s.done}/{s.total_text} done, {s.rate_per_s:.0f}/s now, {s.in_flight} in flight, "
                    f"{s.failed} failed" + (", PAUSED: queue over its bound" if s.paused else ""))
            progress.update(bar, completed=s.done, line=line)

        yield update
