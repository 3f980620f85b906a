"""The load test's line on the progress bar: the current rate, in flight, failures, backpressure."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from conveyor.loadtest.runner import Progress as Snapshot
from conveyor.console import progress_bar


@contextmanager
def progress_bar_for_load_test(total: int | None, enabled: bool = True) -> Iterator[Callable[[Snapshot], None]]:
    with progress_bar(total, enabled, label="load test", show_from=0) as bar:
        def update(s: Snapshot) -> None:
            bar.show(s.done, f"{s.rate_per_s:.0f}/s now, {s.in_flight} in flight, {s.failed} failed"
                     + (", PAUSED: queue over its bound" if s.paused else ""))

        yield update
