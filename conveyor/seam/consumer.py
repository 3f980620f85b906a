"""The worker's message consumer: Celery's own, except that no message it cannot run is lost.

Celery *acknowledges* a message it cannot decode (`Consumer.on_decode_error`, "so it doesn't enter a
loop"), which deletes it: a body that is not JSON, or a pickle message refused by
accept_content=["json"], vanishes without a trace. Unknown tasks and malformed task messages it
rejects, which the queue's DLX turns into a dead letter that says only "rejected".

Here each of those is published to the dead-letter exchange with `x-exception` saying why (the same
headers as a task that failed for good, amqp/dead_letters.reason_headers), under publisher confirms, and
only then acknowledged. So is every message the intake refuses (conveyor/seam/intake.py: a header or
property of the wrong type, a body over limits.max_payload_bytes once inflated, too deep, of the
wrong shape), before Celery reads any of it, with `x-invalid-field` and `x-invalid-rule` besides. The
copy keeps the body and headers as received (a compressed body stays compressed beside its
`compression` header), so `dlq list` reads it and `dlq requeue` can send it again after a fix. If that
publish fails the message is rejected to the DLX as before, so it is never lost either way; and the
worker goes on with the next message. Celery's own logging, events and signals for these cases are kept.

In a solo worker, with the fast paths on, the consumer connection's writes are held for the length
of a burst of deliveries (conveyor/seam/sockets.py).

Installed with the worker_consumer setting (conveyor/runtime/app.py); everything else is Celery's.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.concurrency.solo import TaskPool as SoloPool
from celery.concurrency.thread import TaskPool as ThreadsPool
from celery.utils.dispatch import Signal
from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.message import Message
from vine import promise

from conveyor.amqp.topology import DEAD_LETTER_QUEUE, dead_letter_queue, dlx
from conveyor.seam import intake, sockets
from conveyor.seam.inbound import Rejected
from conveyor.seam.request import DurableRevokeRequest
from conveyor.amqp import dead_letters
from conveyor.settings.context import settings_of

log = logging.getLogger(__name__)

# Room for the JSON Celery wraps around a task's arguments ([args, kwargs, embed]), so that a payload
# the dispatcher accepts (config: payload_bytes up to the limit) is never refused by a worker.
ENVELOPE_BYTES = 4096
INVALID = "InvalidMessage"  # x-exception-type of a message the intake refuses
KEPT_PROPERTIES = ("correlation_id", "reply_to", "priority", "message_id", "type", "app_id")
OVERSIZE_RULE = "over limits.max_payload_bytes"  # in the intake's rule for a body over the limit

# sender: the app; headers (the dead letter's), properties (the message's). Sent once a message the
# consumer could not run is dead-lettered: conveyor.tasks.deadletter ends its record and its result
# there (a Celery signal, so that this layer knows nothing of tasks or records).
dead_lettered_unrun = Signal(name="conveyor_dead_lettered_unrun", providing_args={"headers", "properties"})


ONE_RETRY = {"max_retries": 1, "interval_start": 0, "interval_step": 0, "interval_max": 0}


def body_limit(max_payload_bytes: int) -> int:
    """The most bytes a task message's body may take once inflated: the payload plus its envelope."""
    return max_payload_bytes + ENVELOPE_BYTES


class Consumer(CeleryConsumer):
    """Celery's consumer with the hooks for messages it cannot run overridden (see the module's docstring)."""

    def connect(self):
        # A solo worker holds its writes for the length of a burst of deliveries (fast path:
        # conveyor/seam/sockets.py); its result connection follows (conveyor/seam/rpc_backend.py).
        conn = super().connect()
        fast = settings_of(self.app).fast_paths
        transport = getattr(conn.connection, "transport", None)  # the embedded broker's connection has none
        if isinstance(self.pool, SoloPool) and isinstance(transport, sockets.BufferedTransport) and fast:
            sockets.CORK.cork(transport, sockets.Cork.CONSUMER)
        # Tasks that run in this process take the body the intake decoded (fast path: seam/request.py).
        DurableRevokeRequest.reuse_decoded = fast and isinstance(self.pool, (SoloPool, ThreadsPool))
        return conn

    def create_task_handler(self, promise: Any = promise):
        handle = super().create_task_handler(promise)
        config = settings_of(self.app).config
        max_eta_s = config.broker.consumer_timeout_s
        refusals = (*self.connection_errors, *self.channel_errors)

        def on_task_received(message: Message) -> None:
            # The limit is the task type's own max_payload_bytes, else limits.max_payload_bytes; the
            # headers are not checked yet, so a task name of the wrong type gets the default limit.
            headers = message.headers if isinstance(message.headers, dict) else {}
            task = headers.get("task")
            max_body_bytes = body_limit(config.payload_limit(task if isinstance(task, str) else ""))
            try:
                intake.check(message, max_body_bytes, max_eta_s)
            except Rejected as exc:
                self.dead_letter(message, INVALID, str(exc), exc)
                return
            except Exception as exc:  # noqa: BLE001  (a body kombu cannot decode: DecodeError, ContentDisallowed)
                self.dead_letter(message, type(exc).__name__, str(exc))
                return
            try:
                handle(message)
            except Exception as exc:
                # Whatever else Celery cannot take from a message's content must not raise out of the
                # consumer: that stops the worker ("Unrecoverable error"), and the broker then hands
                # the message to the next worker. A lost connection still goes Celery's way.
                if message.acknowledged or isinstance(exc, refusals):
                    raise
                self.dead_letter(message, "InvalidTaskError", f"malformed task message: {type(exc).__name__}: {exc}")

        return on_task_received

    def on_decode_error(self, message: Message, exc: Exception) -> None:
        # Celery's version logs and acknowledges (deletes) the message; this one keeps it.
        if not isinstance(message, Message):  # kombu could not even build its Message: py-amqp's own
            message = _kombu_message(message)
        log.error("Cannot decode a message from %s (content type %r): %s: %s.", _queue_of(message),
                  message.content_type, type(exc).__name__, exc)
        if isinstance(exc, Rejected):  # a rule of inbound.py or intake.py, met on Celery's own decoding path
            self.dead_letter(message, INVALID, str(exc), exc)
        else:
            self.dead_letter(message, type(exc).__name__, str(exc))

    def on_unknown_message(self, body: Any, message: Message) -> None:
        _dead_letter_on_reject(self, message, "UnknownMessage", "the message is not a Celery task message (no task name)")
        super().on_unknown_message(body, message)

    def on_unknown_task(self, body: Any, message: Message, exc: Exception) -> None:
        name = (message.headers or {}).get("task") or str(exc)
        _dead_letter_on_reject(self, message, "NotRegistered", f"no task named {name!r} is registered on this worker")
        super().on_unknown_task(body, message, exc)

    def on_invalid_task(self, body: Any, message: Message, exc: Exception) -> None:
        _dead_letter_on_reject(self, message, type(exc).__name__, str(exc))
        super().on_invalid_task(body, message, exc)

    def dead_letter(self, message: Message, kind: str, reason: str, rejected: Rejected | None = None) -> None:
        """Publish a copy of `message`, its body and headers as received (but a body over the payload
        limit: headers only, so that the dead-letter queue never stores what the limit refuses), to the
        dead-letter queue with the reason; then ack it, and announce it on `dead_lettered_unrun` (its
        record and its caller's result end dead-lettered)."""
        keep_body = not (rejected is not None and rejected.field == "body" and OVERSIZE_RULE in rejected.rule)
        if not keep_body:
            reason = f"{reason}; its body was not kept"
        headers = {**(message.headers or {}),
                   **dead_letters.reason_headers(kind, reason, _queue_of(message), self.hostname)}
        if rejected is not None:
            headers.update({"x-invalid-field": rejected.field, "x-invalid-rule": rejected.rule})
        # Not `expiration` (the copy would expire in the dead-letter queue) nor `user_id` (the broker
        # refuses one that is not the publishing connection's user).
        properties = {k: v for k in KEPT_PROPERTIES if (v := message.properties.get(k)) is not None}
        # This runs in the consumer's event loop, which also sends the consumer connection's AMQP
        # heartbeats: a broker that blocks publishers (an alarm) must not keep it past a quarter of
        # a heartbeat (twice, with the one retry that gets past a pooled connection a broker restart
        # broke), or the broker drops the connection and hands its running tasks out again. A
        # publish that times out is rejected to the queue's DLX below instead (kept, without the
        # reason); if the broker later takes the copy too, the dead-letter queue holds both.
        config = settings_of(self.app).config
        deadline_s = min(config.confirm_timeout_s, config.heartbeat_s / 4) if config.heartbeat_s else config.confirm_timeout_s

        def publish() -> None:
            # mandatory: a dead-letter queue that was deleted returns the copy rather than drop it.
            with self.app.producer_or_acquire() as producer:
                producer.publish(
                    getattr(message, "received_body", message.body) if keep_body else b"", exchange=dlx,
                    routing_key=DEAD_LETTER_QUEUE, declare=[dead_letter_queue(settings_of(self.app).config)],
                    content_type=message.content_type or "application/octet-stream",
                    content_encoding=message.content_encoding or "binary",
                    headers=headers, delivery_mode="persistent", mandatory=True, timeout=deadline_s,
                    confirm_timeout=deadline_s, retry=True, retry_policy=ONE_RETRY, **properties,
                )

        try:
            dead_letters.publish_routed(self.app, publish)
        except dead_letters.UNROUTED as exc:
            # Rejecting to the DLX would drop it too: it stays unacknowledged, and the broker delivers
            # it again when this connection closes.
            log.error("Could not route a message from %s to the dead-letter queue (%s: %s); it stays "
                      "unacknowledged.", _queue_of(message), type(exc).__name__, exc)
            return
        except Exception as exc:  # whatever went wrong, the broker's own dead-lettering still works
            log.error("Could not publish a message from %s to the dead-letter queue (%s: %s); rejecting it "
                      "to the queue's dead-letter exchange instead.", _queue_of(message), type(exc).__name__, exc)
            try:
                message.reject(requeue=False)  # not reject_log_error, which may be redirected here
            except self.connection_errors as lost:  # the broker requeues what a lost connection held
                log.error("Could not reject it either (%s); the broker will deliver it again.", lost)
            return
        message.ack_log_error(log, self.connection_errors)
        dead_lettered_unrun.send(sender=self.app, headers=headers, properties=message.properties or {})
        log.error("Dead-lettered a message from %s: %s.", _queue_of(message), headers["x-exception"])


def _dead_letter_on_reject(consumer: Consumer, message: Message, kind: str, reason: str) -> None:
    """Celery's handler for `message` logs, reports and signals as usual and then rejects it; for this
    one message, make that reject a dead-letter with the reason (which a reject cannot carry)."""

    def dead_letter_instead(*_args: Any, **_kwargs: Any) -> None:
        consumer.dead_letter(message, kind, reason)

    message.reject_log_error = dead_letter_instead


def _kombu_message(raw: Any) -> Message:
    """A delivery kombu's Message constructor raised on, as a plain kombu Message with nothing decoded
    (no `compression` header for the constructor to act on, put back after), so that it is
    dead-lettered and acknowledged like any other."""
    properties = raw.properties or {}
    message = Message(body=raw.body, delivery_tag=raw.delivery_tag, content_type=properties.get("content_type"),
                      content_encoding=properties.get("content_encoding"), delivery_info=raw.delivery_info,
                      properties=properties, headers={}, channel=raw.channel)
    message.headers = properties.get("application_headers") or {}
    return message


def _queue_of(message: Message) -> str:
    return (message.delivery_info or {}).get("routing_key") or "?"
