"""The autoscaler: replicas follow the backlog each service's queues hold on the broker.

Each round reads the outstanding messages (ready + unacknowledged, from the broker) of a service's
queues and wants ceil(backlog / target_backlog_per_replica) replicas, kept within the service's
min and max. Scaling up happens at once; scaling down only after the backlog has stayed low for
the whole cool-down, so a queue that drains between two bursts does not make replicas flap.
The time a service's backlog went low is kept in a state file, so `--once` from cron works too.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from conveyor.amqp import queues
from conveyor.settings.environment import run_dir
from conveyor.settings.config import Config, ServiceConfig
from conveyor.stack.base import Stack

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    service: str
    backlog: int
    current: int
    desired: int
    reason: str

    @property
    def changes(self) -> bool:
        return self.desired != self.current


def decide(config: Config, svc: ServiceConfig, backlog: int, current: int, low_since: float | None,
           now: float) -> tuple[Decision, float | None]:
    """One service's decision, and the new low_since. Pure, so the policy is unit-tested alone."""
    low, high = svc.min_replicas, config.max_replicas_of(svc)
    wanted = min(high, max(low, math.ceil(backlog / svc.target_backlog_per_replica)))
    target = svc.target_backlog_per_replica

    def made(desired: int, reason: str) -> Decision:
        return Decision(svc.name, backlog, current, desired, reason)

    if current < low:
        return made(low, f"below the minimum of {low} replicas"), None
    if current > high:
        return made(high, f"above the maximum of {high} replicas"), None
    if wanted > current:
        return made(wanted, f"backlog {backlog} is over {current} x {target} per replica"
                            + (f" (capped at max {high})" if wanted == high else "")), None
    if wanted == current:
        return made(current, f"backlog {backlog} fits {current} replica(s)"), None
    low_since = now if low_since is None else low_since
    waited = now - low_since
    if waited >= config.autoscale.cooldown_s:
        return made(wanted, f"backlog {backlog} has needed only {wanted} replica(s) for {waited:.0f} s"
                            f" (cool-down {config.autoscale.cooldown_s:.0f} s)"), None
    return made(current, f"backlog {backlog} needs only {wanted} replica(s); waiting out the cool-down "
                         f"({waited:.0f} of {config.autoscale.cooldown_s:.0f} s)"), low_since


class Autoscaler:
    def __init__(self, stack: Stack, state_file: Path | None = None) -> None:
        self.stack, self.config = stack, stack.config
        self.state_file = state_file or run_dir() / f"autoscale-{stack.name}.json"

    def _load(self) -> dict[str, float]:
        try:
            return json.loads(self.state_file.read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def _save(self, low_since: dict[str, float]) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps(low_since))

    def step(self, now: float | None = None) -> list[Decision]:
        """Read the broker, decide for every service, apply the changes, log every decision."""
        now = time.time() if now is None else now
        depth = {q.name: (q.messages_ready or 0) + (q.messages_unacked or 0)
                 for q in queues.stats(self.stack.app, sorted({q for s in self.config.services for q in s.queues}))}
        running = self.stack.running()
        low_since = self._load()
        decisions, changes = [], {}
        for svc in self.config.services:
            backlog = sum(depth.get(q, 0) for q in svc.queues)
            decision, since = decide(self.config, svc, backlog, running.get(svc.name, 0), low_since.get(svc.name), now)
            if since is None:
                low_since.pop(svc.name, None)
            else:
                low_since[svc.name] = since
            log.info("Autoscaler: %s %s -> %s: %s.", svc.name, decision.current, decision.desired, decision.reason)
            if decision.changes:
                changes[svc.name] = decision.desired
            decisions.append(decision)
        self.stack.scale_to(changes)  # then one wait for every service that changed
        self._save(low_since)
        return decisions

    def run(self, rounds: int | None = None) -> None:
        done = 0
        while rounds is None or done < rounds:
            started = time.monotonic()
            self.step()
            done += 1
            time.sleep(max(0.0, self.config.autoscale.interval_s - (time.monotonic() - started)))
