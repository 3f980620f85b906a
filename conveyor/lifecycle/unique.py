"""Unique tasks: while a task with a unique key is queued, running or retrying, dispatching another
with the same key sends nothing and returns the existing task's id.

The key is claimed in the record store in one atomic step (a Redis script or a SQLite write
transaction) that also creates the new task's record as queued, so two dispatchers racing for one
key get one task between them. The key is never released explicitly: a holder that succeeded,
failed, was dead-lettered or revoked no longer counts, which also means a crashed dispatcher or a
lost message cannot hold a key forever (`tasks revoke ID` frees it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from celery import Celery, uuid

from conveyor.lifecycle import stores
from conveyor.tasks.states import TaskState
from conveyor.lifecycle.signals import UNIQUE_HEADER

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dispatched:
    id: str
    sent: bool  # False: a task with the key was already queued or running, and `id` is that task


def send_unique(app: Celery, name: str, unique_key: str, args: Any = None, kwargs: dict[str, Any] | None = None,
                **options: Any) -> Dispatched:
    """app.send_task, unless a task with `unique_key` is active; options go to send_task as they are."""
    store = stores.require_store(app)
    task_id = options.pop("task_id", None) or uuid()
    holder = store.claim(unique_key, task_id, name)
    if holder != task_id:
        log.info("Not sending %s: task %s with unique key %r is still queued or running.", name, holder, unique_key)
        return Dispatched(holder, False)
    headers = {**(options.pop("headers", None) or {}), UNIQUE_HEADER: unique_key}
    try:
        app.send_task(name, args=args, kwargs=kwargs, task_id=task_id, headers=headers, **options)
    except Exception as exc:
        # The claim made this task the key's holder: mark it failed, or the key would stay taken.
        store.transition(task_id, TaskState.FAILED, detail="could not be published", error=f"{type(exc).__name__}: {exc}")
        raise
    return Dispatched(task_id, True)


def release_refused(app: Celery, task_ids: list[str]) -> None:
    """Tasks whose claim succeeded but whose publish the broker refused (nacked or returned, found
    only when its confirms came in): mark them failed, or their keys would stay taken."""
    store = stores.require_store(app)
    for task_id in task_ids:
        store.transition(task_id, TaskState.REFUSED, detail="refused by the broker", error="the broker nacked or returned it")
