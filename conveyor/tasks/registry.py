"""Registering the config's task types on a Celery app: each callable becomes a task with its name,
its retry policy (Celery's autoretry, with the type's retry_on as transient exceptions), its time
limits, and the base class that dead-letters it when it fails for good.

The simulated task_a and task_b are registered the same way: test-config.yml declares them as task
types whose callables are conveyor.tasks.simulated:task_a and :task_b.
"""

from __future__ import annotations

import logging

from celery import Celery, Task

from conveyor.settings.config import Config
from conveyor.tasks import retry
from conveyor.tasks.simulated import DeadLetteringTask

log = logging.getLogger(__name__)


def register(app: Celery, config: Config) -> dict[str, Task]:
    """Define every task type of `config` on `app`; the callables are imported (once) by config.code."""
    registered = {}
    code = config.code
    for kind in config.task_types:
        limits = config.time_limit(kind.name)
        registered[kind.name] = app.task(
            code.functions[kind.name], name=kind.name, base=DeadLetteringTask, shared=False,
            bind=kind.bind or kind.simulated,  # the simulated tasks read their own request
            measure_runtime=not kind.simulated,  # theirs is in their result
            **retry.task_options(config.retry_policy(kind.name), code.retry_on[kind.name]),
            **({"soft_time_limit": limits.soft_s, "time_limit": limits.hard_s,
                "timeout_retry_factor": limits.retry_factor} if limits else {}),
        )
        log.debug("Registered task type %s (%s) on queue %s.", kind.name, kind.callable, kind.queue)
    return registered
