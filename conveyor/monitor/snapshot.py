"""One snapshot of the whole system, the dict that the dashboard draws, `--json` prints and both
exporters translate. Its shape is documented in monitor.py (the CLI) and docs/monitoring.md.

Two sources with two paces: the broker and the stack are sampled every collect interval
(`sample_broker`: queue depth by passive declare, rates from the management API, replicas from
the stack, answering workers by ping); task totals and active tasks come from the event stream
and are current whenever a snapshot is composed (`compose`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Celery

from conveyor.amqp import queues
from conveyor.stack import status
from conveyor.stack.base import Stack
from conveyor.amqp.topology import DEAD_LETTER_QUEUE
from conveyor.monitor.accounting import Accounting

log = logging.getLogger(__name__)

DEAD_LETTER_WARN_RATIO = 0.8  # of dead_letter.max_length: past it the snapshot warns, before the queue refuses


def sample_broker(stack: Stack, ping_timeout_s: float = 1.0) -> dict[str, Any]:
    """Services and queues as `make status` reports them, plus each queue's publish and deliver rates."""
    sampled_at = time.time()
    found = status.collect(stack, ping_timeout_s)
    rates = message_rates(stack.app)
    for queue in found["queues"]:
        publish, deliver = rates.get(queue["name"], (None, None))
        queue["publish_rate_per_s"], queue["deliver_rate_per_s"] = publish, deliver
    found["sampled_at"] = sampled_at
    found["dead_letter_max_length"] = stack.app.conveyor_config.dead_letter.max_length
    return found


def warnings(broker: dict[str, Any]) -> list[str]:
    """What an operator must act on before it does harm: a dead-letter queue nearly full (full, it
    refuses new dead letters and workers keep retrying the tasks, conveyor/amqp/topology.py)."""
    limit = broker.get("dead_letter_max_length")
    for queue in broker["queues"]:
        held = (queue["messages_ready"] or 0) + (queue["messages_unacked"] or 0)
        if queue["name"] == DEAD_LETTER_QUEUE and limit and held >= DEAD_LETTER_WARN_RATIO * limit:
            return [f"the dead-letter queue is {100 * held / limit:.0f} % full ({held:,} of dead_letter.max_length "
                    f"{limit:,}); full, it refuses new dead letters: requeue or purge it (python -m conveyor dlq)"]
    return []


def message_rates(app: Celery) -> dict[str, tuple[float | None, float | None]]:
    """Per queue (publish, deliver) messages per second, as RabbitMQ's management API computes them
    (over its statistics interval); empty without the API, whose absence queues.stats already logs."""
    if app.conveyor_broker.embedded:
        return {}
    try:
        listing = queues.management_request(app.conveyor_broker.broker_url, "queues/{vhost}?columns=name,message_stats")
    except (OSError, ValueError) as exc:
        log.debug("No message rates from the management API: %s", exc)
        return {}
    rates = {}
    for queue in listing if isinstance(listing, list) else []:
        stats = queue.get("message_stats") or {}
        rates[queue["name"]] = (_rate(stats, "publish_details"), _rate(stats, "deliver_get_details"))
    return rates


def _rate(stats: dict[str, Any], key: str) -> float:
    # A queue that never saw a message has no message_stats at all: its rate is 0, not unknown.
    return round(float((stats.get(key) or {}).get("rate", 0.0)), 3)


def compose(broker: dict[str, Any], accounting: Accounting, now: float | None = None,
            error: str | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    tasks = accounting.tasks(now)
    workers = accounting.workers(now)
    queue_rows = []
    for queue in broker["queues"]:
        mine = [t for t in tasks if t["queue"] == queue["name"]]
        work_queue = queue["name"] != DEAD_LETTER_QUEUE
        queue_rows.append({
            **queue,
            "retry_backlog": sum(t["retrying"] for t in mine) if work_queue else None,
            "dead_lettered": sum(t["dead_lettered"] for t in mine) if work_queue else None,
        })
    services = [
        {**svc, "tasks_active": sum(w["tasks_active"] for w in workers if w["alive"] and w["service"] == svc["name"])}
        for svc in broker["services"]
    ]
    return {
        "time": round(now, 3),
        "counting_since": round(accounting.since, 3),
        "sampled_at": round(broker["sampled_at"], 3),
        "backend": broker["backend"],
        "error": error,
        "warnings": warnings(broker),
        "queues": queue_rows,
        "services": services,
        "workers": workers,
        "tasks": tasks,
    }

