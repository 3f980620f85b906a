"""Which task goes to which queue, and the RabbitMQ entities behind them, derived from the config's
task_types (conveyor/settings/config.py): every queue a task type names becomes a work queue.

Each work queue is durable, on its own direct exchange, and dead-letters into one `dlx` exchange:
whatever the broker rejects from a work queue (an unknown task, a message a worker cannot
decode) lands in `dead_letter` with RabbitMQ's own x-death header. Tasks that fail for good are
published there by the worker itself (see deadletter.py) so that they carry their reason.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kombu import Exchange, Queue

if TYPE_CHECKING:
    from conveyor.settings.config import Config

DLX_EXCHANGE = "dlx"
DEAD_LETTER_QUEUE = "dead_letter"
# A quorum queue counts the deliveries of each message; past this many it dead-letters the message
# (reason delivery_limit) instead of handing it out again. A message returned unacknowledged that
# often took down every worker that took it (an OOM kill, a hard hang): it is a poison message,
# and the dead-letter queue is where it can be looked at. Retries do not count (each is a new
# publish). RabbitMQ 4 defaults to 20 where 3.x had no limit at
# all; stating it makes both behave alike. docs/reliability.md.
QUORUM_DELIVERY_LIMIT = 20

dlx = Exchange(DLX_EXCHANGE, type="direct", durable=True)


def dead_letter_queue(config: Config) -> Queue:
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
                          "x-overflow": "reject-publish", "x-delivery-limit": QUORUM_DELIVERY_LIMIT})
        exchange_type = "topic"
    return Queue(
        name,
        exchange=Exchange(name, type=exchange_type, durable=True),
        routing_key=name,
        durable=True,
        queue_arguments=arguments,
    )


def delay_queue(name: str, ttl_s: int) -> Queue:
    """Where a retry of a task from classic queue `name` waits `ttl_s` seconds (at most) before the
    broker dead-letters it back to `name` (docs/reliability.md, "Retry countdowns"). Named by its
    TTL, so that a changed retry policy declares new queues rather than clash with the old ones."""
    return Queue(
        f"{name}.retry.{ttl_s}s",
        exchange=Exchange(name, type="direct", durable=True),
        routing_key=f"{name}.retry.{ttl_s}s",
        durable=True,
        queue_arguments={"x-message-ttl": ttl_s * 1000, "x-dead-letter-exchange": name,
                         "x-dead-letter-routing-key": name},
    )


def work_queues(config: Config) -> list[Queue]:
    """Every declarer (the app's task_queues, deadletter.declare, hence each worker) passes the
    config's queue_type: RabbitMQ refuses a declare whose arguments differ from the queue's."""
    return [work_queue(name, config.queue_type) for name in config.queues]


def routes(config: Config) -> dict[str, dict[str, str]]:
    return {t.name: {"queue": t.queue, "routing_key": t.queue} for t in config.task_types}
