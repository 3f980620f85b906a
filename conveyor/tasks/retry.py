"""The retry policy, handed to Celery's own autoretry machinery.

Nothing here re-implements backoff: these are the Task attributes Celery's autoretry wrapper reads
(`autoretry_for`, `max_retries`, `retry_backoff`, `retry_backoff_max`, `retry_jitter`).
"""

from __future__ import annotations

from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from celery.utils.time import get_exponential_backoff_interval

from conveyor.settings.config import RetryPolicy


class TransientTaskError(Exception):
    """A failure that another attempt may cure; only these are retried."""


# A task that ran past its soft time limit may well finish under a longer one, which its retry gets
# (conveyor/tasks/base.py), so a soft timeout is retried like a transient error.
RETRYABLE = (TransientTaskError, SoftTimeLimitExceeded)


def task_options(policy: RetryPolicy, retry_on: tuple[type[BaseException], ...] = ()) -> dict[str, Any]:
    """`retry_on`: a task type's own transient exceptions (its config's retry.retry_on), retried too."""
    return {
        "autoretry_for": RETRYABLE + tuple(retry_on),
        "max_retries": policy.max_retries,
        "retry_backoff": policy.backoff_s,
        "retry_backoff_max": policy.backoff_max_s,
        "retry_jitter": policy.jitter,
    }


def countdown_s(task: Any, retries: int) -> int:
    """The countdown Celery's autoretry draws before retry number `retries + 1` of `task`, jitter
    included, for a retry Celery's autoretry does not see (conveyor/tasks/lost.py)."""
    return get_exponential_backoff_interval(
        factor=int(max(1.0, float(task.retry_backoff or 1))), retries=retries,
        maximum=task.retry_backoff_max, full_jitter=task.retry_jitter,
    )


def delay_s(policy: RetryPolicy, retries: int) -> int:
    """The countdown Celery computes before retry number `retries + 1` (the upper bound when jitter is on)."""
    return get_exponential_backoff_interval(
        factor=policy.backoff_s, retries=retries, maximum=policy.backoff_max_s, full_jitter=False
    )
