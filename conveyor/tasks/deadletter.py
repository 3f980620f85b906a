"""The dead-letter queue: how a task that failed for good gets there, how to read it, and how to
put a message back exactly as it was.

RabbitMQ's own dead-lettering (reject with requeue=False into the queue's DLX) copies a message
verbatim and adds only `x-death` with the reason "rejected". That is how unknown or undecodable
messages arrive here. A task that exhausted its retries, though, should say *why* it failed and
after how many attempts, so the worker publishes it to the same exchange itself, under publisher
confirms, before the original delivery is acknowledged. The message is the complete Celery message,
rebuilt from the request by Celery itself as for a retry (Task.signature_from_request): every
header and property Celery uses (ids of the root, parent and group, retries, time limits, expiry,
origin, stamps, reply_to, correlation_id, priority) and the embed with the chain still to run,
callbacks, errbacks and chord; plus `x-exception`, `x-attempts`, `x-original-queue`,
`x-first-failed-at`, `x-worker` and `x-dead-lettered-at`. `restore` publishes it back to its queue
byte for byte, so a requeued stage of a pipeline runs the later stages and its result goes to the
original caller.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from amqp.exceptions import MessageNacked, PreconditionFailed
from celery import Celery, Task
from celery.app.task import Context
from kombu import Queue

from conveyor.amqp.topology import DEAD_LETTER_QUEUE, QUEUES, dead_letter_queue, dlx, work_queue, work_queues
from conveyor.errors import BrokerError, UsageError
from conveyor.lifecycle import signals

log = logging.getLogger(__name__)

# What a dead letter carries beside the Celery message; `restore` takes them off again, with what
# RabbitMQ adds when it dead-letters a message itself.
REASON_HEADERS = ("x-exception", "x-exception-type", "x-original-queue", "x-worker", "x-dead-lettered-at",
                  "x-attempts", signals.FIRST_FAILED_HEADER, "x-death")
BROKER_DEATH_PREFIXES = ("x-first-death-", "x-last-death-")


class DeadLettered(Exception):
    """The final result of a task that failed for good: it is now in the dead-letter queue."""

    def __init__(self, reason: str, attempts: int, queue: str = "") -> None:
        super().__init__(reason, attempts, queue)
        self.reason, self.attempts, self.queue = reason, attempts, queue

    def __str__(self) -> str:
        return f"dead-lettered after {self.attempts} attempt(s): {self.reason}"


def refused(exc: BaseException | None) -> bool:
    """Whether a publish failed because the broker refused the message: for the dead-letter queue,
    that it is full (its overflow is reject-publish). Celery raises the nack as the cause of an
    OperationalError."""
    while exc is not None:
        if isinstance(exc, MessageNacked):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def declare(app: Celery) -> None:
    """Declare the exchanges and queues, the dead-letter queue first so nothing is dead-lettered into nowhere."""
    config = app.conveyor_config
    with app.connection_for_write() as conn:
        for queue in (dead_letter_queue(config), *work_queues(config.queue_type)):
            try:
                queue(conn.default_channel).declare()
            except PreconditionFailed as exc:
                raise BrokerError(
                    f"queue {queue.name!r} exists on the broker with other arguments than this config gives it "
                    f"({exc.reply_text}): it was declared by an older conveyor, or with another queue_type or "
                    "dead_letter bounds. Empty it (`python -m conveyor dlq list`, then `dlq requeue --all` or "
                    f"`dlq purge --yes` for {DEAD_LETTER_QUEUE}), delete it (`rabbitmqctl delete_queue {queue.name}`), "
                    "and start again (docs/reliability.md, Upgrading)") from None


def publish(task: Task, exc: BaseException) -> dict[str, Any]:
    """Send the current request of `task` to the dead-letter queue, as Celery itself would send the
    same request again, with its reason; returns the reason headers."""
    req = task.request
    attempts = (req.retries or 0) + 1
    headers = {**signals.carried_headers(req, failed=True),
               **reason_headers(type(exc).__name__, describe(exc), (req.delivery_info or {}).get("routing_key"),
                                req.hostname, attempts)}
    queue = dead_letter_queue(task.app.conveyor_config)
    options = dict(task.signature_from_request(req, queue=queue, declare=[queue]).options)
    # The expiry travels as the header Celery reads, not as Celery's AMQP expiration it would also
    # set: a dead letter must not expire in the queue (it has no dead-letter exchange of its own).
    if options.pop("expires", None) is not None:
        headers["expires"] = req.expires
    options["headers"] = {**(options.get("headers") or {}), **headers}
    # app.send_task, not the signature's apply_async: that checks the arguments against the task's
    # signature, and a task called with wrong ones must be dead-lettered all the same.
    task.app.send_task(task.name, req.args, req.kwargs, add_to_parent=False, **options)
    log.warning("Task %s[%s] failed for good after %d attempts and was dead-lettered: %s",
                task.name, req.id, attempts, headers["x-exception"])
    return headers


def describe(exc: BaseException) -> str:
    text = signals.describe_error(exc) or ""
    return text.split(": ", 1)[1] if text.startswith(f"{type(exc).__name__}: ") else text


def settle_unrun(app: Celery, headers: dict[str, Any], properties: dict[str, Any]) -> None:
    """A task message the worker's consumer dead-letters without running it: its record ends
    dead-lettered, and its caller gets DeadLettered as the result, as for a task that failed for good."""
    signals.dead_lettered(headers)
    task_id, reply_to = headers.get("id"), properties.get("reply_to")
    if not task_id or not reply_to or headers.get("ignore_result"):
        return
    result = DeadLettered(headers.get("x-exception", ""), 0, headers.get("x-original-queue", ""))
    request = Context(id=task_id, task=headers.get("task"), reply_to=reply_to,
                      correlation_id=properties.get("correlation_id") or task_id)
    try:
        app.backend.mark_as_failure(task_id, result, request=request)
    except Exception as exc:  # noqa: BLE001  (the dead letter is stored; the result only informs the caller)
        log.warning("Could not send the dead-lettered result of task %s to its caller: %s.", task_id, exc)


_DELAY_BITS = re.compile(r"^(?:[01]\.)+")


def reason_headers(kind: str, reason: str, routing_key: str | None, worker: str | None,
                   attempts: int | None = None) -> dict[str, Any]:
    """The headers that say why a message is dead-lettered: by a task that failed for good (above),
    or by the worker's consumer for a message it cannot run at all (conveyor/seam/consumer.py)."""
    headers: dict[str, Any] = {
        "x-exception": f"{kind}: {reason}"[:2000],
        "x-exception-type": kind,
        # A retry delayed through Celery's native delayed delivery (quorum queues) arrives with
        # the delay bits in front of the queue's routing key.
        "x-original-queue": _DELAY_BITS.sub("", routing_key or ""),
        "x-worker": worker or "",
        "x-dead-lettered-at": datetime.now(timezone.utc).isoformat(),
    }
    if attempts is not None:
        headers["x-attempts"] = attempts
    return headers


@dataclass
class DeadLetter:
    task_id: str
    task: str
    reason: str
    attempts: int | None
    original_queue: str
    headers: dict[str, Any]
    body: Any = None  # the Celery message body, decoded: [args, kwargs, embed]
    raw: bytes = b""  # the body as stored, for restore
    properties: dict[str, Any] = field(default_factory=dict)  # content type and encoding, reply_to, correlation_id...


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
    _ensure_declared(app)
    taken: list[DeadLetter] = []
    seen: list[DeadLetter] = []
    kept = []
    # Not declared again here: a queue left with other arguments (an upgrade) can still be emptied.
    existing = Queue(DEAD_LETTER_QUEUE, exchange=dlx, routing_key=DEAD_LETTER_QUEUE, no_declare=True)
    with app.connection_for_read() as conn:
        queue = conn.SimpleQueue(existing, no_ack=False, serializer="json")
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
                letter.raw, letter.properties = message.body, _properties(message)
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


def _ensure_declared(app: Celery) -> None:
    try:
        declare(app)
    except BrokerError as exc:  # there, with other arguments: readable all the same
        log.warning("%s.", exc)


def _properties(message: Any) -> dict[str, Any]:
    props = message.properties or {}
    found = {k: props[k] for k in ("correlation_id", "reply_to", "priority") if props.get(k) is not None}
    return {**found, "content_type": message.content_type, "content_encoding": message.content_encoding}


def restored_headers(headers: dict[str, Any]) -> dict[str, Any]:
    """The headers a dead letter had as a task message, for a fresh start: retries from 0, the task
    type's time limits (a retry after a timeout had longer ones), marked as requeued."""
    kept = {k: v for k, v in headers.items() if k not in REASON_HEADERS and not k.startswith(BROKER_DEATH_PREFIXES)}
    if "retries" in kept:
        kept["retries"] = 0
    if "timelimit" in kept:
        kept["timelimit"] = [None, None]
    return {**kept, signals.REQUEUED_HEADER: DEAD_LETTER_QUEUE}


def restore(app: Celery, letter: DeadLetter) -> str:
    """Publish a dead letter back to the queue it came from, its body byte for byte and every header
    and property as they were (but restored_headers'); returns the queue. Confirmed before it returns."""
    if letter.original_queue not in QUEUES:
        raise UsageError(f"message {letter.task_id} came from {letter.original_queue or 'an unknown queue'!r}, "
                         f"not one of {', '.join(QUEUES)}; `dlq purge` removes it")
    queue = work_queue(letter.original_queue, app.conveyor_config.queue_type)
    properties = dict(letter.properties)
    content_type = properties.pop("content_type", None) or "application/json"
    content_encoding = properties.pop("content_encoding", None) or "utf-8"
    headers = restored_headers(letter.headers)
    with app.producer_or_acquire() as producer:
        producer.publish(letter.raw, exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue],
                         headers=headers, content_type=content_type, content_encoding=content_encoding,
                         delivery_mode="persistent", retry=True, retry_policy=app.conf.task_publish_retry_policy,
                         **properties)
        if app.conf.task_send_sent_event:  # as Celery's send_task would: monitors count it as sent again
            sent = {"uuid": headers.get("id"), "root_id": headers.get("root_id"), "parent_id": headers.get("parent_id"),
                    "name": headers.get("task"), "args": headers.get("argsrepr"), "kwargs": headers.get("kwargsrepr"),
                    "retries": 0, "eta": headers.get("eta"), "expires": headers.get("expires"),
                    "queue": queue.name, "exchange": queue.exchange.name, "routing_key": queue.routing_key}
            with app.events.default_dispatcher() as dispatcher:
                dispatcher.publish("task-sent", sent, producer, retry=True, retry_policy=app.conf.task_publish_retry_policy)
    return queue.name


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


__all__ = ["DEAD_LETTER_QUEUE", "DeadLetter", "DeadLettered", "browse", "declare", "drain", "dlx", "publish",
           "restore", "sift"]
