"""The worker-stack interface that every backend implements (local processes, Docker Compose).

A stack runs replicas of the config's worker services. Backends only know how to start, stop and
list replicas of one service; what a replica *is* (a `conveyor.stack.launcher` process with a unique node
name) and how readiness is judged (the worker answers a remote-control ping) is shared here.
"""

from __future__ import annotations

import abc
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from celery import Celery

from conveyor.stack import control
from conveyor.settings.config import Config, ServiceConfig
from conveyor.errors import StackError, UsageError
from conveyor.settings.context import settings_of

log = logging.getLogger(__name__)

FAILURE_CHECK_S = 2.0  # while waiting for replicas to answer, look this often for ones that exited


@dataclass
class Replica:
    service: str
    ident: str  # a pid or a container id
    node: str | None  # Celery node name, where the backend knows it
    running: bool


class Stack(abc.ABC):
    name: ClassVar[str]

    def __init__(self, app: Celery, config: Config) -> None:
        self.app, self.config = app, config

    # --- what a backend provides -------------------------------------------------------
    @abc.abstractmethod
    def replicas(self) -> list[Replica]:
        """Every replica this stack started that still exists, running or not."""

    @abc.abstractmethod
    def _scale(self, service: ServiceConfig, count: int) -> None:
        """Make `service` have exactly `count` replicas; leave every other service alone."""

    @abc.abstractmethod
    def _state_file(self) -> Path:
        """Where the replica counts last asked for are kept."""

    def shares_records(self) -> bool:
        """Whether this stack's workers write to the record store this process reads, and so keep the
        task tallies the monitor shows (a compose stack's containers cannot reach a SQLite file here)."""
        return settings_of(self.app).broker.records_reach_workers(self.name)

    def _unsaved_desired(self) -> dict[str, int]:
        """What desired() answers when nothing was saved."""
        return {}

    @abc.abstractmethod
    def kill(self, replica: Replica) -> None:
        """SIGKILL one replica, as the OOM killer or a lost machine would (no warm shutdown); a
        replica that is gone already is no error."""

    @abc.abstractmethod
    def down(self) -> None:
        """Stop and remove everything this stack started (warm shutdown first)."""

    @abc.abstractmethod
    def logs(self, follow: bool = True) -> None:
        """Print (and with follow, keep printing) the workers' logs."""

    def failures(self) -> dict[str, str]:
        """Services with a replica that exited, each with the error it stopped on (its last `error:`
        line, which the launcher prints for a config it cannot load or a callable it cannot import)."""
        return {}

    def build(self) -> None:
        """Build what the replicas run; local processes run this checkout, so nothing to build."""
        log.info("The %s stack runs this checkout directly; there is nothing to build.", self.name)

    # --- shared behaviour --------------------------------------------------------------
    def desired(self) -> dict[str, int]:
        """The replica count last asked for, per service."""
        saved = self._saved_desired()
        return self._unsaved_desired() if saved is None else saved

    def _saved_desired(self) -> dict[str, int] | None:
        try:
            return json.loads(self._state_file().read_text())["desired"]
        except (FileNotFoundError, ValueError, KeyError):
            return None

    def _set_desired(self, service: str, count: int) -> None:
        desired = self._saved_desired() or {}
        desired[service] = count
        self._state_file().parent.mkdir(parents=True, exist_ok=True)
        self._state_file().write_text(json.dumps({"desired": desired}, indent=2))

    def scale(self, service: str, count: int, wait_s: float = 60.0) -> None:
        self.scale_to({service: count}, wait_s)

    def scale_to(self, counts: dict[str, int], wait_s: float = 60.0) -> None:
        """Give each named service its count, in the order given (a caller that moves replicas
        between services puts the shrinking ones first), then wait once for all of them to answer."""
        targets = [(self.config.service(name), count) for name, count in counts.items()]
        for svc, count in targets:  # every count checked before anything changes
            if count < 0:
                raise UsageError(f"replica count must be 0 or more, got {count}")
            if count > self.config.limits.max_replicas:
                raise UsageError(f"{count} replicas of {svc.name} is over limits.max_replicas ({self.config.limits.max_replicas})")
        for svc, count in targets:
            log.info("Scaling %s to %d replica(s) on the %s stack.", svc.name, count, self.name)
            self._scale(svc, count)
        self.wait_ready({svc.name: count for svc, count in targets}, wait_s)

    def up(self, wait_s: float = 60.0) -> None:
        for svc in self.config.services:
            self._scale(svc, svc.replicas)
        self.wait_ready({s.name: s.replicas for s in self.config.services}, wait_s)

    def is_up(self) -> bool:
        return any(r.running for r in self.replicas())

    def running(self) -> dict[str, int]:
        counts = {s.name: 0 for s in self.config.services}
        for replica in self.replicas():
            if replica.running:
                counts[replica.service] = counts.get(replica.service, 0) + 1
        return counts

    def wait_ready(self, want: dict[str, int], timeout_s: float) -> None:
        """Block until every service has `want` workers answering a ping (not more than running)."""
        want = {name: count for name, count in want.items() if count > 0}
        if not want:
            return
        deadline = time.monotonic() + timeout_s
        while True:
            # In short rounds, so that a replica that stopped at start is reported at once, by service.
            seen = control.wait_responding(self.app, want, min(FAILURE_CHECK_S, max(0.0, deadline - time.monotonic())))
            missing = {n: c for n, c in want.items() if seen[n] < c}
            if not missing or time.monotonic() >= deadline:
                break
            failed = {name: why for name, why in self.failures().items() if name in missing}
            if failed:
                raise StackError("; ".join(f"service {name} failed to start: {why}" for name, why in failed.items()))
        if missing:
            failed = {name: why for name, why in self.failures().items() if name in missing}
            if failed:
                raise StackError("; ".join(f"service {name} failed to start: {why}" for name, why in failed.items()))
            detail = ", ".join(f"{n}: {seen[n]} of {c}" for n, c in missing.items())
            raise StackError(f"workers did not answer within {timeout_s:.0f} s ({detail}); see `make logs`")
