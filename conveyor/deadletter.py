"""The dead-letter queue: how a task that failed for good gets there, and how to read it.

RabbitMQ's own dead-lettering (reject with requeue=False into the queue's DLX) copies a message
verbatim and adds only `x-death` with the reason "rejected". That is how unknown or undecodable
messages arrive here. A task that exhausted its retries, though, should say *why* it failed and
after how many attempts, so the worker publishes it to the same exchange itself, as a complete
Celery message (so it can be requeued as-is) with `x-exception` and `x-attempts` headers, under
publisher confirms, before the original delivery is acknowledged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from celery import Celery, Task

from .topology import DEAD_LETTER_QUEUE, dead_letter_queue, dlx, work_queues

log = logging.getLogger(__name__)


def declare(app: Celery) -> None:
    """Declare the exchanges and queues, the dead-letter queue first so nothing is dead-lettered into nowhere."""
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        dead_letter_queue(channel).declare()
        for queue in work_queues():
            queue(channel).declare()


def publish(task: Task, exc: BaseException) -> dict[str, Any]:
    """Send the current request of `task` to the dead-letter queue with its reason."""
    req = task.request
    attempts = (req.retries or 0) + 1
    headers = {
        "x-exception": f"{type(exc).__name__}: {exc}"[:2000],
        "x-exception-type": type(exc).__name__,
        "x-attempts": attempts,
        "x-original-queue": (req.delivery_info or {}).get("routing_key") or "",
        "x-worker": req.hostname or "",
        "x-dead-lettered-at": datetime.now(timezone.utc).isoformat(),
    }
    task.app.send_task(
        task.name,
        args=req.args,
        kwargs=req.kwargs,
        task_id=req.id,
        retries=req.retries or 0,
        queue=dead_letter_queue,
        headers=headers,
        declare=[dead_letter_queue],
    )
    log.warning("Task %s[%s] failed for good after %d attempts and was dead-lettered: %s",
                task.name, req.id, attempts, headers["x-exception"])
    return headers


@dataclass
class DeadLetter:
    task_id: str
    task: str
    reason: str
    attempts: int | None
    original_queue: str
    headers: dict[str, Any]


def drain(app: Celery, limit: int = 10_000) -> list[DeadLetter]:
    """Take every message out of the dead-letter queue (acknowledging it) and return them."""
    found: list[DeadLetter] = []
    with app.connection_for_read() as conn:
        queue = conn.SimpleQueue(dead_letter_queue, no_ack=False, serializer="json")
        try:
            while len(found) < limit:
                try:
                    message = queue.get(block=False)
                except queue.Empty:
                    break
                found.append(_parse(message.headers or {}))
                message.ack()
        finally:
            queue.close()
    return found


def _parse(headers: dict[str, Any]) -> DeadLetter:
    death = (headers.get("x-death") or [{}])[0]
    return DeadLetter(
        task_id=headers.get("id", ""),
        task=headers.get("task", ""),
        reason=headers.get("x-exception") or f"rejected by the broker ({death.get('reason', 'unknown')})",
        attempts=headers.get("x-attempts"),
        original_queue=headers.get("x-original-queue") or death.get("queue", ""),
        headers=headers,
    )


__all__ = ["DEAD_LETTER_QUEUE", "DeadLetter", "declare", "drain", "dlx", "publish"]
