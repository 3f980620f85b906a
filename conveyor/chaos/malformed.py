"""Messages no worker can run, as a broken or hostile publisher would send them: the chaos run's
share of bad input, published with plain kombu (no Celery on the way to tidy them up).

Each carries an `id` header, so that the account can find it in the dead-letter queue, where the
workers' consumer must put it with its reason (conveyor/seam/consumer.py): a lost one is as lost
as a lost task.
"""

from __future__ import annotations

import json
from typing import Any

from kombu import Producer

FLAWS = ("not_json", "unknown_task", "wrong_shape")
UNKNOWN_TASK = "chaos_no_such_task"


def message(flaw: str, task_id: str, task: str) -> tuple[bytes, dict[str, Any]]:
    """(body, headers) of a message with the flaw: a body that is not JSON, a task no worker has,
    or a JSON body that is not Celery's [args, kwargs, embed]."""
    headers = {"lang": "py", "id": task_id, "task": task, "root_id": task_id, "parent_id": None,
               "group": None, "retries": 0, "timelimit": [None, None], "eta": None, "expires": None,
               "argsrepr": "()", "kwargsrepr": "{}", "origin": "chaos"}
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    if flaw == "not_json":
        return b'[[], {"truncated": ', headers
    if flaw == "unknown_task":
        return json.dumps([[], {}, embed]).encode(), {**headers, "task": UNKNOWN_TASK}
    if flaw == "wrong_shape":
        return json.dumps("a task body that is a string").encode(), headers
    raise ValueError(f"unknown flaw {flaw!r}; one of {', '.join(FLAWS)}")


def publish(producer: Producer, queue: str, flaw: str, task_id: str, task: str, retry_policy: dict[str, Any]) -> None:
    """Publish it to a work queue as a durable message, under the producer's connection's confirms."""
    body, headers = message(flaw, task_id, task)
    producer.publish(body, exchange="", routing_key=queue, headers=headers, content_type="application/json",
                     content_encoding="utf-8", delivery_mode="persistent", retry=True, retry_policy=retry_policy)
