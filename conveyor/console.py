"""What a program shows its user on stderr (stdout stays clean for --json): one-line notices, the
one progress bar (rich; silent when there are few tasks or no terminal), and a user error as one
line and a non-zero exit, never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from conveyor.errors import ConveyorError

SHOW_FROM = 20


class Bar:
    """What a run tells its bar: one more done, or how far it is with a line of its own figures."""

    def __init__(self, progress: Progress | None = None, label: str = "", total: int | None = None) -> None:
        self._progress = progress
        self._bar = progress.add_task(label, total=total, line="") if progress else None

    def advance(self) -> None:
        if self._progress is not None:
            self._progress.advance(self._bar)

    def show(self, completed: int, line: str) -> None:
        if self._progress is not None:
            self._progress.update(self._bar, completed=completed, line=line)


@contextmanager
def progress_bar(total: int | None, enabled: bool = True, label: str = "tasks done",
                 show_from: int = SHOW_FROM) -> Iterator[Bar]:
    if not enabled or (total is not None and total < show_from) or not sys.stderr.isatty():
        yield Bar()
        return
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[line]}"),
               TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        yield Bar(progress, label, total)


def say(message: str) -> None:
    """A one-line notice for the user (which broker, which stack), kept off stdout so --json stays clean."""
    print(message, file=sys.stderr)


def run(main: Callable[[], int | None]) -> None:
    """Run a program's entry point: a user error prints one line on stderr and exits non-zero."""
    try:
        code = main()
    except ConveyorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
