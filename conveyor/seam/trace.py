"""Celery's task tracer, without the result repr nobody reads.

Internal used: `celery.app.trace.saferepr`, the module global the tracer calls to build the repr of
every result for its INFO "succeeded" line (checked against celery 5.7.0). Replaced by a function
that returns "" when asked for size 0, which the tasks' `resultrepr_maxsize` is set to when nothing
would show the repr (INFO off and no task events). Switched off with the other fast paths.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.app import trace
from celery.utils.saferepr import saferepr

log = logging.getLogger(__name__)


def skip_unshown_result_repr(app: Any, conf: Any) -> bool:
    """Celery's tracer builds a repr of every result (saferepr, up to the task's resultrepr_maxsize)
    for its INFO "succeeded" line even when INFO is off; the task-succeeded event is its only other
    reader. For our result dicts that is ~85 us a task, 5 % of a no-op task's worker CPU
    (docs/performance.md). Call before the tracers are built (celeryd_after_setup): they read the
    size then. Returns whether it did anything."""
    if conf.worker_send_task_events or logging.getLogger("celery.app.trace").isEnabledFor(logging.INFO):
        return False
    for task in app.tasks.values():
        task.resultrepr_maxsize = 0
    # Even at size 0, saferepr walks the whole result to close its brackets (another 6 % of the
    # worker's CPU, profiled): the tracer's own reference to it is pointed at one that does not.
    trace.saferepr = _saferepr_unless_empty
    return True


def _saferepr_unless_empty(o: object, maxlen: int | None = None, *args: object, **kwargs: object) -> str:
    return "" if maxlen == 0 else saferepr(o, maxlen, *args, **kwargs)
