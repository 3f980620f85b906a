"""A progress bar on stderr for long runs; silent when there are few tasks or no terminal."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

SHOW_FROM = 20


@contextmanager
def progress_bar(total: int, enabled: bool = True, label: str = "tasks done") -> Iterator[Callable[[], None]]:
    if not enabled or total < SHOW_FROM or not sys.stderr.isatty():
        yield lambda: None
        return
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        bar = progress.add_task(label, total=total)
        yield lambda: progress.advance(bar)
