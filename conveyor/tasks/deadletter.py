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

Every dead-letter publish is `mandatory` (conveyor/seam/publisher.py): if `dead_letter` has been
deleted, the broker returns the message instead of confirming and dropping it, and the original is
never acknowledged away. The queue is then declared again and the publish made once more
(`publish_routed`); only if that is refused too does the caller keep the original (requeue it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from amqp.exceptions import MessageNacked, PreconditionFailed
from celery import Celery, Task
from celery.app.task import Context
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from celery.utils.dispatch import Signal
from kombu import Queue

from conveyor.amqp.dead_letters import FIRST_FAILED_HEADER, REQUEUED_HEADER, carried_headers, publish_routed, reason_headers
from conveyor.amqp.topology import DEAD_LETTER_QUEUE, dead_letter_queue, dlx, work_queue, work_queues
from conveyor.errors import BrokerError, UsageError
from conveyor.seam.consumer import dead_lettered_unrun
from conveyor.settings.context import settings_of

log = logging.getLogger(__name__)

# What a dead letter carries beside the Celery message; `restore` takes them off again, with what
# RabbitMQ adds when it dead-letters a message itself.
REASON_HEADERS = ("x-exception", "x-exception-type", "x-original-queue", "x-worker", "x-dead-lettered-at",
                  "x-attempts", FIRST_FAILED_HEADER, "x-death")
BROKER_DEATH_PREFIXES = ("x-first-death-", "x-last-death-")
KEPT_DETAIL = "the dead-letter queue is full and refused it: it stays in its queue and is tried again"

# sender: the app; task_id, detail, name (the task's), hostname (the worker's node). Sent when the dead-letter queue refused a task (full) and the
# worker keeps it in its queue: the task records (conveyor.lifecycle) receive it.
dead_letter_refused = Signal(name="conveyor_dead_letter_refused", providing_args={"task_id", "detail", "name", "hostname"})


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
    config = settings_of(app).config
    with app.connection_for_write() as conn:
        for queue in (dead_letter_queue(config), *work_queues(config)):
            try:
                queue(conn.default_channel).declare()
            except PreconditionFailed as exc:
                raise BrokerError(
                    f"queue {queue.name!r} exists on the broker with other arguments than this config gives it "
                    f"({exc.reply_text}): it was declared by an older conveyor, or with another queue_type or "
                    "dead_letter bounds. Empty it (`python -m conveyor dlq list`, then `dlq requeue --all` or "
                    f"`dlq purge --yes` for {DEAD_LETTER_QUEUE}), delete it (`rabbitmqctl delete_queue {queue.name}`), "
                    "and start again (docs/reliability.md, Upgrading)") from None


# What a dead-letter publish raises when its route is gone: a return (no queue bound), or the
# channel error for a missing exchange.
def publish(task: Task, exc: BaseException) -> dict[str, Any]:
    """Send the current request of `task` to the dead-letter queue, as Celery itself would send the
    same request again, with its reason; returns the reason headers."""
    req = task.request
    attempts = (req.retries or 0) + 1
    headers = {**carried_headers(req, failed=True),
               **reason_headers(type(exc).__name__, describe(exc), (req.delivery_info or {}).get("routing_key"),
                                req.hostname, attempts)}
    queue = dead_letter_queue(settings_of(task.app).config)
    options = dict(task.signature_from_request(req, queue=queue, declare=[queue]).options)
    # The expiry travels as the header Celery reads, not as Celery's AMQP expiration it would also
    # set: a dead letter must not expire in the queue (it has no dead-letter exchange of its own).
    if options.pop("expires", None) is not None:
        headers["expires"] = req.expires
    options["headers"] = {**(options.get("headers") or {}), **headers}
    # app.send_task, not the signature's apply_async: that checks the arguments against the task's
    # signature, and a task called with wrong ones must be dead-lettered all the same.
    publish_routed(task.app, lambda: task.app.send_task(task.name, req.args, req.kwargs, add_to_parent=False,
                                                        mandatory=True, **options))
    log.warning("Task %s[%s] failed for good after %d attempts and was dead-lettered: %s",
                task.name, req.id, attempts, headers["x-exception"])
    return headers


def describe_error(exc: BaseException | None, soft: float | None = None) -> str | None:
    """An exception in a sentence, for a record and a dead letter (Celery's time limit errors have none)."""
    if exc is None:
        return None
    if isinstance(exc, SoftTimeLimitExceeded):  # Celery's own message is empty
        return f"SoftTimeLimitExceeded: ran past its soft time limit{f' of {soft:g} s' if soft else ''}"
    if isinstance(exc, TimeLimitExceeded):
        limit = exc.args[0] if exc.args and isinstance(exc.args[0], (int, float)) else None
        return f"TimeLimitExceeded: ran past its hard time limit{f' of {limit:g} s' if limit else ''} and was killed"
    return f"{type(exc).__name__}: {exc}"


def describe(exc: BaseException) -> str:
    text = describe_error(exc) or ""
    return text.split(": ", 1)[1] if text.startswith(f"{type(exc).__name__}: ") else text


def settle_unrun(sender: Celery | None = None, headers: dict[str, Any] | None = None,
                 properties: dict[str, Any] | None = None, **_: Any) -> None:
    """Received on dead_lettered_unrun, a task message the worker's consumer dead-lettered without
    running it: its caller gets DeadLettered as the result, as for a task that failed for good (the
    lifecycle ends its record on the same signal)."""
    app, headers, properties = sender, headers or {}, properties or {}
    task_id, reply_to = headers.get("id"), properties.get("reply_to")
    if app is None or not task_id or not reply_to or headers.get("ignore_result"):
        return
    result = DeadLettered(headers.get("x-exception", ""), 0, headers.get("x-original-queue", ""))
    request = Context(id=task_id, task=headers.get("task"), reply_to=reply_to,
                      correlation_id=properties.get("correlation_id") or task_id)
    try:
        app.backend.mark_as_failure(task_id, result, request=request)
    except Exception as exc:  # noqa: BLE001  (the dead letter is stored; the result only informs the caller)
        log.warning("Could not send the dead-lettered result of task %s to its caller: %s.", task_id, exc)


dead_lettered_unrun.connect(settle_unrun, weak=False, dispatch_uid="conveyor.deadletter.settle_unrun")


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
                # As stored: a compressed body stays compressed beside its `compression` header (seam/inbound.py).
                letter.raw, letter.properties = getattr(message, "received_body", message.body), _properties(message)
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
    return {**kept, REQUEUED_HEADER: DEAD_LETTER_QUEUE}


def restore(app: Celery, letter: DeadLetter) -> str:
    """Publish a dead letter back to the queue it came from, its body byte for byte and every header
    and property as they were (but restored_headers'); returns the queue. Confirmed before it returns."""
    config = settings_of(app).config
    if letter.original_queue not in config.queues:
        raise UsageError(f"message {letter.task_id} came from {letter.original_queue or 'an unknown queue'!r}, "
                         f"not one of {', '.join(config.queues)}; `dlq purge` removes it")
    queue = work_queue(letter.original_queue, config.queue_type)
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
