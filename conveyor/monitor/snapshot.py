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
from conveyor.settings.context import settings_of

log = logging.getLogger(__name__)

DEAD_LETTER_WARN_RATIO = 0.8  # of dead_letter.max_length: past it the snapshot warns, before the queue refuses


def sample_broker(stack: Stack, ping_timeout_s: float = 1.0) -> dict[str, Any]:
    """Services and queues as `make status` reports them, plus each queue's publish and deliver
    rates, each service's concurrency, and the dead-letter queue's bound."""
    sampled_at = time.time()
    found = status.collect(stack, ping_timeout_s)
    listing = management_listing(stack.app)
    for queue in found["queues"]:
        stats = (listing.get(queue["name"]) or {}).get("message_stats") or {}
        known = queue["name"] in listing
        queue["publish_rate_per_s"] = _rate(stats, "publish_details") if known else None
        queue["deliver_rate_per_s"] = _rate(stats, "deliver_get_details") if known else None
    for service in found["services"]:
        service["concurrency"] = stack.config.service(service["name"]).concurrency
    found["dead_letter_max_messages"] = (max_length(listing.get(DEAD_LETTER_QUEUE) or {})
                                         or stack.config.dead_letter.max_length)
    found["sampled_at"] = sampled_at
    return found


def warnings(broker: dict[str, Any]) -> list[str]:
    """What an operator must act on before it does harm: a dead-letter queue nearly full (full, it
    refuses new dead letters and workers keep retrying the tasks, conveyor/amqp/topology.py). Its
    bound is the broker's max-length (dead_letter.max_length), as sample_broker reads it."""
    limit = broker.get("dead_letter_max_messages")
    for queue in broker["queues"]:
        held = (queue["messages_ready"] or 0) + (queue["messages_unacked"] or 0)
        if queue["name"] == DEAD_LETTER_QUEUE and limit and held >= DEAD_LETTER_WARN_RATIO * limit:
            return [f"the dead-letter queue is {100 * held / limit:.0f} % full ({held:,} of dead_letter.max_length "
                    f"{limit:,}); full, it refuses new dead letters: requeue or purge it (python -m conveyor dlq)"]
    return []


def management_listing(app: Celery) -> dict[str, dict[str, Any]]:
    """Per queue of the vhost, the management API's message rates (over its statistics interval),
    arguments and policy; empty without the API, whose absence queues.stats already logs."""
    if settings_of(app).broker.embedded:
        return {}
    try:
        listing = queues.management_request(
            settings_of(app).broker.broker_url,
            "queues/{vhost}?columns=name,message_stats,arguments,effective_policy_definition")
    except (OSError, ValueError) as exc:
        log.debug("No message rates from the management API: %s", exc)
        return {}
    return {queue["name"]: queue for queue in listing if isinstance(queue, dict)} if isinstance(listing, list) else {}


def max_length(queue: dict[str, Any]) -> int | None:
    """A queue's max-length as the broker enforces it: the lower of its argument and its policy's."""
    bounds = [value for value in ((queue.get("arguments") or {}).get("x-max-length"),
                                  (queue.get("effective_policy_definition") or {}).get("max-length"))
              if isinstance(value, int) and value > 0]
    return min(bounds) if bounds else None


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
    # Workers up per queue, and their pool processes: the Celery exporter's active worker and
    # process counts, from heartbeats and the services' queues and concurrency.
    up = [(svc, sum(w["alive"] and w["service"] == svc["name"] for w in workers)) for svc in broker["services"]]
    for row in queue_rows:
        mine = [(svc, count) for svc, count in up if row["name"] in svc["queues"]]
        row["workers_up"] = sum(count for _, count in mine)
        row["processes_up"] = sum(count * svc.get("concurrency", 1) for svc, count in mine)
    dead_letter = next((q for q in queue_rows if q["name"] == DEAD_LETTER_QUEUE), {})
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
        "dead_letter": {"messages": dead_letter.get("messages_ready"),
                        "max_messages": broker.get("dead_letter_max_messages")},
    }

