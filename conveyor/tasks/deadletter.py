"""The dead-letter queue: how a task that failed for good gets there, and how to read it.

RabbitMQ's own dead-lettering (reject with requeue=False into the queue's DLX) copies a message
verbatim and adds only `x-death` with the reason "rejected". That is how unknown or undecodable
messages arrive here. A task that exhausted its retries, though, should say *why* it failed and
after how many attempts, so the worker publishes it to the same exchange itself, as a complete
Celery message (so it can be requeued as-is) with `x-exception` and `x-attempts` headers, under
publisher confirms, before the original delivery is acknowledged.

Every dead-letter publish is `mandatory` (conveyor/seam/publisher.py): if `dead_letter` has been
deleted, the broker returns the message instead of confirming and dropping it, and the original is
never acknowledged away. The queue is then declared again and the publish made once more
(`publish_routed`); only if that is refused too does the caller keep the original (requeue it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import Celery, Task

from conveyor.amqp.topology import DEAD_LETTER_QUEUE, dead_letter_queue, dlx, work_queues
from conveyor.settings.context import settings_of
from conveyor.amqp.dead_letters import publish_routed, reason_headers

log = logging.getLogger(__name__)


class DeadLettered(Exception):
    """The final result of a task that failed for good: it is now in the dead-letter queue."""

    def __init__(self, reason: str, attempts: int, queue: str = "") -> None:
        super().__init__(reason, attempts, queue)
        self.reason, self.attempts, self.queue = reason, attempts, queue

    def __str__(self) -> str:
        return f"dead-lettered after {self.attempts} attempt(s): {self.reason}"


def declare(app: Celery) -> None:
    """Declare the exchanges and queues, the dead-letter queue first so nothing is dead-lettered into nowhere."""
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        dead_letter_queue(channel).declare()
        for queue in work_queues(settings_of(app).config):
            queue(channel).declare()


# What a dead-letter publish raises when its route is gone: a return (no queue bound), or the
# channel error for a missing exchange.
def publish(task: Task, exc: BaseException) -> dict[str, Any]:
    """Send the current request of `task` to the dead-letter queue with its reason."""
    req = task.request
    attempts = (req.retries or 0) + 1
    headers = reason_headers(type(exc).__name__, str(exc), (req.delivery_info or {}).get("routing_key"),
                             req.hostname, attempts)
    publish_routed(task.app, lambda: task.app.send_task(
        task.name,
        args=req.args,
        kwargs=req.kwargs,
        task_id=req.id,
        retries=req.retries or 0,
        queue=dead_letter_queue,
        headers=headers,
        declare=[dead_letter_queue],
        mandatory=True,
    ))
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
    body: Any = None  # the Celery message body: [args, kwargs, embed]


def drain(app: Celery, limit: int = 10_000) -> list[DeadLetter]:
    """Take every message out of the dead-letter queue (acknowledging it) and return them."""
    return sift(app, lambda _letter: True, limit)


def browse(app: Celery, limit: int = 10_000) -> list[DeadLetter]:
    """Every message in the dead-letter queue, left there."""
    return sift(app, lambda _letter: False, limit, keep_all=True)


def sift(app: Celery, take: Callable[[DeadLetter], bool], limit: int = 10_000, keep_all: bool = False) -> list[DeadLetter]:
    """Go through the dead-letter queue once: acknowledge (remove) the messages `take` returns True
    for, which it may first republish, and put the others back when done, in their order. Returns
    the messages taken (with keep_all, every message seen). Messages are only held unacknowledged
    meanwhile, so if this process dies, the broker puts them all back."""
    taken: list[DeadLetter] = []
    seen: list[DeadLetter] = []
    kept = []
    with app.connection_for_read() as conn:
        queue = conn.SimpleQueue(dead_letter_queue, no_ack=False, serializer="json")
        try:
            while len(seen) < limit:
                try:
                    message = queue.get(block=False)
                except queue.Empty:
                    break
                try:
                    body = message.decode()
                except Exception:  # undecodable: the broker may have dead-lettered it for exactly that
                    body = None
                letter = _parse(message.headers or {}, body)
                seen.append(letter)
                if take(letter):
                    message.ack()
                    taken.append(letter)
                else:
                    kept.append(message)
        finally:
            for message in kept:
                message.requeue()
            queue.close()
    return seen if keep_all else taken


def _parse(headers: dict[str, Any], body: Any = None) -> DeadLetter:
    death = (headers.get("x-death") or [{}])[0]
    return DeadLetter(
        task_id=headers.get("id", ""),
        task=headers.get("task", ""),
        reason=headers.get("x-exception") or f"rejected by the broker ({death.get('reason', 'unknown')})",
        attempts=headers.get("x-attempts"),
        original_queue=headers.get("x-original-queue") or death.get("queue", ""),
        headers=headers,
        body=body,
    )


__all__ = ["DEAD_LETTER_QUEUE", "DeadLetter", "browse", "declare", "drain", "dlx", "publish", "sift"]
