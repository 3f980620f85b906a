"""One picture of the system: per service desired/running/answering replicas, per queue depth."""

from __future__ import annotations

from typing import Any

from conveyor.amqp import queues
from conveyor.stack import control
from conveyor.stack.base import Stack
from conveyor.amqp.topology import DEAD_LETTER_QUEUE


def collect(stack: Stack, ping_timeout_s: float = 1.0) -> dict[str, Any]:
    desired = stack.desired()
    running = stack.running()
    answering = control.responding(stack.app, ping_timeout_s)
    services = [
        {
            "name": svc.name,
            "queues": list(svc.queues),
            "replicas_desired": desired.get(svc.name, 0),
            "replicas_running": running.get(svc.name, 0),
            "workers_responding": answering.get(svc.name, 0),
        }
        for svc in stack.config.services
    ]
    stats = queues.stats(stack.app, [*stack.config.queues, DEAD_LETTER_QUEUE])
    return {"backend": stack.name, "services": services, "queues": [q.as_dict() for q in stats]}


def render(status: dict[str, Any]) -> str:
    def cell(value: Any) -> str:
        return "-" if value is None else str(value)

    lines = [f"Stack: {status['backend']}", "", f"{'SERVICE':<12} {'QUEUES':<16} {'DESIRED':>7} {'RUNNING':>7} {'ANSWERING':>9}"]
    for s in status["services"]:
        lines.append(f"{s['name']:<12} {','.join(s['queues']):<16} {s['replicas_desired']:>7} "
                     f"{s['replicas_running']:>7} {s['workers_responding']:>9}")
    lines += ["", f"{'QUEUE':<12} {'READY':>7} {'UNACKED':>7} {'CONSUMERS':>9}"]
    for q in status["queues"]:
        lines.append(f"{q['name']:<12} {cell(q['messages_ready']):>7} {cell(q['messages_unacked']):>7} {cell(q['consumers']):>9}")
    return "\n".join(lines)
