"""Which task goes to which queue, and the RabbitMQ entities behind them.

Each work queue is durable, on its own direct exchange, and dead-letters into one `dlx` exchange:
whatever the broker rejects from queue_a or queue_b (an unknown task, a message a worker cannot
decode) lands in `dead_letter` with RabbitMQ's own x-death header. Tasks that fail for good are
published there by the worker itself (see deadletter.py) so that they carry their reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kombu import Exchange, Queue

DLX_EXCHANGE = "dlx"
DEAD_LETTER_QUEUE = "dead_letter"


@dataclass(frozen=True)
class TaskType:
    name: str
    queue: str
    default_duration_s: float
    message: str


TASKS: dict[str, TaskType] = {
    "task_a": TaskType("task_a", "queue_a", 0.1, "Hello from Task A"),
    "task_b": TaskType("task_b", "queue_b", 0.2, "Hello from Task B"),
}
QUEUES: tuple[str, ...] = tuple(dict.fromkeys(t.queue for t in TASKS.values()))

dlx = Exchange(DLX_EXCHANGE, type="direct", durable=True)


def dead_letter_queue(config: Any) -> Queue:
    """The dead-letter queue of a config (conveyor.settings.config.Config): of its queue_type, like
    the work queues, and bounded by its `dead_letter` section. Full, the queue refuses a new message
    (reject-publish: the publisher's confirm is a nack, and the worker keeps the task, loudly)
    rather than drop an old one; a quorum work queue's at-least-once dead-lettering likewise keeps
    a rejected message until there is room. Every declarer passes the same config: RabbitMQ refuses
    (PRECONDITION_FAILED) a declare whose arguments differ from the queue's, see deadletter.declare."""
    bounds = config.dead_letter
    arguments = {"x-max-length": bounds.max_length, "x-max-length-bytes": bounds.max_length_bytes,
                 "x-overflow": bounds.overflow}
    if config.queue_type == "quorum":
        arguments["x-queue-type"] = "quorum"
    return Queue(DEAD_LETTER_QUEUE, exchange=dlx, routing_key=DEAD_LETTER_QUEUE, durable=True,
                 queue_arguments=arguments)


def work_queue(name: str, queue_type: str = "classic") -> Queue:
    arguments = {
        "x-dead-letter-exchange": DLX_EXCHANGE,
        "x-dead-letter-routing-key": DEAD_LETTER_QUEUE,
    }
    exchange_type = "direct"
    if queue_type == "quorum":
        # A quorum queue dead-letters at most once unless asked; at-least-once needs reject-publish
        # overflow. Celery delays retries on quorum queues through its native delayed delivery,
        # which binds only topic exchanges (on a direct one a retry would hold a worker slot until due).
        arguments.update({"x-queue-type": "quorum", "x-dead-letter-strategy": "at-least-once",
                          "x-overflow": "reject-publish"})
        exchange_type = "topic"
    return Queue(
        name,
        exchange=Exchange(name, type=exchange_type, durable=True),
        routing_key=name,
        durable=True,
        queue_arguments=arguments,
    )


def work_queues(queue_type: str = "classic") -> list[Queue]:
    """Every declarer (the app's task_queues, deadletter.declare, hence each worker) passes the
    config's queue_type: RabbitMQ refuses a declare whose arguments differ from the queue's."""
    return [work_queue(name, queue_type) for name in QUEUES]


def routes() -> dict[str, dict[str, str]]:
    return {t.name: {"queue": t.queue, "routing_key": t.queue} for t in TASKS.values()}
