"""A dead-letter message at the AMQP level: the headers that say why it is dead-lettered (and those
of ours a retry and a dead letter carry on), and a publish that is routed or fails. Both the worker's consumer (conveyor/seam/consumer.py, for a
message it cannot run) and a task that failed for good (conveyor/tasks/deadletter.py) use them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from amqp.exceptions import NotFound
from celery import Celery

from conveyor.amqp.topology import DEAD_LETTER_QUEUE, dead_letter_queue
from conveyor.errors import PublishRefused
from conveyor.settings.context import settings_of

log = logging.getLogger(__name__)

UNROUTED = (PublishRefused, NotFound)

UNIQUE_HEADER = "x-unique-key"
REQUEUED_HEADER = "x-requeued-from"
FIRST_FAILED_HEADER = "x-first-failed-at"
# Headers of ours that a retry and a dead letter carry on: Celery rebuilds a retried message from
# the request, which keeps no custom header (Context.headers is empty in a worker).
SENT_AT_HEADER = "x-sent-at"  # when the task was first published (epoch seconds): its wait and latency start there
CARRIED_HEADERS = (UNIQUE_HEADER, REQUEUED_HEADER, FIRST_FAILED_HEADER, SENT_AT_HEADER)


def carried_headers(request: Any, failed: bool = False) -> dict[str, Any]:
    """The CARRIED_HEADERS of a request (a message's headers are attributes of its Context); with
    `failed`, for the message that follows a failed attempt, the time of the first failure."""
    headers = {name: value for name in CARRIED_HEADERS if (value := getattr(request, name, None)) is not None}
    if failed:
        headers.setdefault(FIRST_FAILED_HEADER, datetime.now(timezone.utc).isoformat())
    return headers


def publish_routed(app: Celery, publish: Callable[[], Any]) -> Any:
    """Run `publish` (a dead-letter publish); if the broker could not route it (the dead-letter queue
    or exchange deleted), declare them again and publish once more. A second failure raises."""
    try:
        return publish()
    except UNROUTED as exc:
        log.error("The broker could not route a dead-letter publish (%s); declaring %s again and publishing "
                  "once more.", exc, DEAD_LETTER_QUEUE)
        with app.connection_for_write() as conn:
            dead_letter_queue(settings_of(app).config)(conn.default_channel).declare()
        return publish()


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
