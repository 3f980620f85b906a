"""A task's run time in its result's metadata (`runtime_s`), for tasks whose result is their own.

The simulated tasks put their execution time in their result; a user's task returns what it
returns, and that value is what a chain hands to the next stage, so it cannot be wrapped. The time
travels beside it instead: the task base measures the run (conveyor/tasks/simulated.py,
DeadLetteringTask) into the request, and the result backends add it to the metadata they store.
"""

from __future__ import annotations

from typing import Any

RUNTIME_ATTR = "conveyor_runtime_s"  # set on the task's request by the task base
STARTED_ATTR = "conveyor_started_at"  # wall clock, so that a caller can tell queue time from run time


def add_runtime(meta: dict[str, Any], request: Any) -> dict[str, Any]:
    runtime = getattr(request, RUNTIME_ATTR, None) if request is not None else None
    if runtime is not None:
        meta["runtime_s"] = runtime
        meta["started_at"] = getattr(request, STARTED_ATTR, None)
        # Also without result_extended (which adds these and more), the report can say where and after how many retries.
        meta.setdefault("worker", getattr(request, "hostname", None))
        meta.setdefault("retries", getattr(request, "retries", None))
    return meta


class RuntimeMeta:
    """Mixin for a Celery result backend: every stored meta of a measured task carries runtime_s."""

    def _get_result_meta(self, result: Any, state: str, traceback: Any, request: Any, *args: Any, **kwargs: Any):
        return add_runtime(super()._get_result_meta(result, state, traceback, request, *args, **kwargs), request)
