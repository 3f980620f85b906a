"""The worker's message consumer: Celery's own, except that no message it cannot run is lost.

Celery *acknowledges* a message it cannot decode (`Consumer.on_decode_error`, "so it doesn't enter a
loop"), which deletes it: a body that is not JSON, or a pickle message refused by
accept_content=["json"], vanishes without a trace. Unknown tasks and malformed task messages it
rejects, which the queue's DLX turns into a dead letter that says only "rejected".

Here each of those, and a message whose body is over limits.max_payload_bytes, is published to the
dead-letter exchange with `x-exception` saying why (the same headers as a task that failed for good,
deadletter.reason_headers), under publisher confirms, and only then acknowledged. If that publish
fails the message is rejected to the DLX as before, so it is never lost either way; and the worker
goes on with the next message. Celery's own logging, events and signals for these cases are kept.

Installed with the worker_consumer setting (conveyor/runtime/app.py); everything else is Celery's.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.message import Message
from vine import promise

from conveyor.tasks import deadletter
from conveyor.amqp.topology import DEAD_LETTER_QUEUE, dead_letter_queue, dlx

log = logging.getLogger(__name__)

# Room for the JSON Celery wraps around a task's arguments ([args, kwargs, embed]), so that a payload
# the dispatcher accepts (config: payload_bytes up to the limit) is never refused by a worker.
ENVELOPE_BYTES = 4096
# What Celery raises on a task message whose body has the wrong shape.
MALFORMED = (TypeError, ValueError, KeyError, AttributeError)


class Consumer(CeleryConsumer):
    """Celery's consumer with the hooks for messages it cannot run overridden (see the module's docstring)."""

    def create_task_handler(self, promise: Any = promise):
        handle = super().create_task_handler(promise)
        limit = self.app.conveyor_config.limits.max_payload_bytes

        def on_task_received(message: Message) -> None:
            # Checked before anything decodes the body: a huge message costs no more than its bytes.
            size = len(message.body or b"")
            if size > limit + ENVELOPE_BYTES:
                self.dead_letter(message, "PayloadTooLarge",
                                 f"the message body is {size} bytes, over limits.max_payload_bytes ({limit}) "
                                 f"plus {ENVELOPE_BYTES} for the envelope; its body was not kept", keep_body=False)
                return
            try:
                handle(message)
            except MALFORMED as exc:
                # Celery unpacks a task body as [args, kwargs, embed] without checking its shape: a body
                # that is a JSON string, number or object raises out of the consumer and stops the
                # worker ("Unrecoverable error"), and the broker then hands it to the next worker.
                if message.acknowledged:
                    raise
                self.dead_letter(message, "InvalidTaskError", f"malformed task message: {type(exc).__name__}: {exc}")

        return on_task_received

    def on_decode_error(self, message: Message, exc: Exception) -> None:
        # Celery's version logs and acknowledges (deletes) the message; this one keeps it.
        log.error("Cannot decode a message from %s (content type %r): %s: %s.", _queue_of(message),
                  message.content_type, type(exc).__name__, exc)
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

    def dead_letter(self, message: Message, kind: str, reason: str, keep_body: bool = True) -> None:
        """Publish a copy of `message`, byte for byte (or, over the payload limit, its headers only, so that
        the dead-letter queue never stores what the limit refuses), to the dead-letter queue with the
        reason; then ack it, and end its record and result as dead-lettered."""
        headers = {**(message.headers or {}),
                   **deadletter.reason_headers(kind, reason, _queue_of(message), self.hostname)}
        properties = {k: v for k in ("correlation_id", "reply_to", "priority")
                      if (v := message.properties.get(k)) is not None}
        try:
            with self.app.producer_or_acquire() as producer:
                producer.publish(
                    message.body if keep_body else b"", exchange=dlx, routing_key=DEAD_LETTER_QUEUE,
                    declare=[dead_letter_queue(self.app.conveyor_config)],
                    content_type=message.content_type or "application/octet-stream",
                    content_encoding=message.content_encoding or "binary",
                    headers=headers, delivery_mode="persistent",
                    retry=True, retry_policy=self.app.conf.task_publish_retry_policy, **properties,
                )
        except Exception as exc:  # whatever went wrong, the broker's own dead-lettering still works
            log.error("Could not publish a message from %s to the dead-letter queue (%s: %s); rejecting it "
                      "to the queue's dead-letter exchange instead.", _queue_of(message), type(exc).__name__, exc)
            try:
                message.reject(requeue=False)  # not reject_log_error, which may be redirected here
            except self.connection_errors as lost:  # the broker requeues what a lost connection held
                log.error("Could not reject it either (%s); the broker will deliver it again.", lost)
            return
        message.ack_log_error(log, self.connection_errors)
        deadletter.settle_unrun(self.app, headers, message.properties or {})
        log.error("Dead-lettered a message from %s: %s.", _queue_of(message), headers["x-exception"])


def _dead_letter_on_reject(consumer: Consumer, message: Message, kind: str, reason: str) -> None:
    """Celery's handler for `message` logs, reports and signals as usual and then rejects it; for this
    one message, make that reject a dead-letter with the reason (which a reject cannot carry)."""

    def dead_letter_instead(*_args: Any, **_kwargs: Any) -> None:
        consumer.dead_letter(message, kind, reason)

    message.reject_log_error = dead_letter_instead


def _queue_of(message: Message) -> str:
    return (message.delivery_info or {}).get("routing_key") or "?"
