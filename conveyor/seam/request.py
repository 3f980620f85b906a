"""The worker's request class, asking a shared store whether a task was revoked.

Celery keeps revoked ids in each worker's memory (or a per-node --statedb file), so a worker
started after `revoke`, or on another host, would run the task. conveyor's record store is shared
and persistent; `revoke_lookup` (a Celery signal, so this layer knows nothing of the store) is
asked once per task just before the task is handed to the pool. A receiver that answers True sends
the task down Celery's own revoke path: REVOKED result, task-revoked event, message acknowledged.

Internals used (checked against celery 5.7.0):
- `celery.worker.request.Request`, subclassed for `revoked()`, the check Celery makes before a task
  is handed to the pool (Task.Request names the subclass, Celery's documented hook for it).
- `celery.worker.state.revoked`, the set `celery control revoke` fills, added to so that Celery's
  own `revoked()` then takes its revoke path. Not a fast path: it is the durable revoke itself.
- `celery.worker.control.control_command`: the `conveyor_unrevoke` remote command, which takes ids
  out of that set again when `dlq requeue` sends a revoked task once more.
- Fast path, in a worker whose tasks run in its own process (solo, threads): the request's `_body`,
  `_decoded`, `_content_type` and `_content_encoding` set as Celery's Request sets them for a body it
  was given decoded, from the body kombu's Message decoded and cached (`_decoded_cache`) when the
  intake read it. Replaces: Celery's tracer decoding the same JSON a second time (2 % of a no-op
  solo worker's samples). A prefork worker's children decode the body themselves, as before.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.utils.dispatch import Signal
from celery.worker import state as worker_state
from celery.worker.control import control_command, ok
from celery.worker.request import Request

log = logging.getLogger(__name__)

# sender: the task; task_id: the request's id. A receiver returns True when the task was revoked.
revoke_lookup = Signal(name="conveyor_revoke_lookup", providing_args={"task_id"})


class DurableRevokeRequest(Request):
    # Set by the worker's consumer (conveyor/seam/consumer.py) where tasks run in its process and the
    # fast paths are on: hand the tracer the body the intake decoded (see the module's docstring).
    reuse_decoded = False

    def __init__(self, message: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(message, *args, **kwargs)
        if self.reuse_decoded and not self._decoded:
            decoded = getattr(message, "_decoded_cache", None)
            if decoded is not None:
                self._body, self._decoded = decoded, True
                self._content_type = self._content_encoding = None

    def revoked(self) -> bool:
        if super().revoked():
            return True
        try:
            answers = revoke_lookup.send(sender=self.task, task_id=self.id)
        except Exception as exc:  # noqa: BLE001  (this runs in the worker's consumer: nothing may escape)
            # Fail open: a revoke is rare, and a store outage must not stop every task.
            log.warning("Could not check whether task %s was revoked, so it runs: %s.", self.id, exc)
            return False
        if not any(answer is True for _receiver, answer in answers):
            return False
        worker_state.revoked.add(self.id)
        return super().revoked()


@control_command(args=[("task_ids", list)], signature="<task_id> [task_id ...]")
def conveyor_unrevoke(state: Any, task_ids: list[str], **_: Any) -> dict[str, str]:
    """Forget revokes of tasks that `dlq requeue` sends again (Celery keeps revoked ids for hours):
    `dlq requeue` clears the record's revocation and broadcasts this, which takes the ids out of
    each worker's in-memory set."""
    for task_id in task_ids or ():
        worker_state.revoked.discard(task_id)
    return ok(f"forgot the revokes of {len(task_ids or ())} task(s)")
