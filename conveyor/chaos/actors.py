"""The chaos run's moving parts: the publisher, the killer, and the worker on the other side of the partition."""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from celery import Celery
from kombu.exceptions import OperationalError

from conveyor.settings import environment
from conveyor.stack import control
from conveyor.settings.config import Config
from conveyor.errors import BrokerError, StackError
from conveyor.seam.publisher import Publisher as SeamPublisher
from conveyor.stack.base import Replica, Stack
from conveyor.stack.local import is_ours, read_pidfile
from conveyor.chaos.netns import Namespace
from conveyor.chaos.node import BrokerNode

if TYPE_CHECKING:
    from conveyor.chaos.run import Planned

log = logging.getLogger(__name__)

PARTITIONED_PID_FILE = "partitioned-worker.pid"


class Publisher(threading.Thread):
    """Sends the plan at a steady rate through conveyor's publisher (conveyor/seam/publisher.py),
    confirms collected asynchronously. A task counts as confirmed only once the broker confirmed it;
    one it refused is sent, not confirmed. After a break (a broker restart) the publisher connects
    again, sends once more what the broker had not confirmed, and goes on with the rest of the plan."""

    IN_FLIGHT = 200  # unconfirmed tasks at most before the thread waits for confirms

    def __init__(self, app: Celery, planned: list[Planned], rate_per_s: float) -> None:
        super().__init__(name="chaos-publisher", daemon=True)
        self.app, self.planned, self.rate_per_s = app, planned, rate_per_s
        self.sent = 0
        self.confirmed: dict[str, Planned] = {}
        self.stop = threading.Event()
        self.connected = True

    def run(self) -> None:
        next_at = time.monotonic()
        with SeamPublisher(self.app) as pub:
            for index, item in enumerate(self.planned):
                if self.rate_per_s:  # a steady pace that does not catch up in a burst after a stall
                    self.stop.wait(max(0.0, next_at - time.monotonic()))
                    next_at = max(next_at, time.monotonic()) + 1 / self.rate_per_s
                if self.stop.is_set():
                    break
                self.sent += 1
                self._send(pub, index, [(str(uuid.uuid4()), item)])
            while self.connected:  # what is still unconfirmed, after a break too
                try:
                    self._settle(*pub.flush())
                    break
                except BrokerError as exc:
                    self._send(pub, self.sent - 1, self._reconnect(pub, self.sent - 1, exc, []))
        log.info("The publisher sent %d task(s); the broker confirmed %d.", self.sent, len(self.confirmed))

    def _send(self, pub: SeamPublisher, index: int, jobs: list[tuple[str, Planned]]) -> None:
        """Publish `jobs` (task id, item); after a broken connection, those it left unconfirmed go
        again with the same ids, as a send retried until confirmed would (the ledger counts a task
        that runs twice as duplicated)."""
        while jobs and self.connected:
            task_id, item = jobs.pop(0)
            try:
                # ignore_result: the ledger is the record here, not the backend.
                pub.publish(lambda _producer, task_id=task_id, item=item: (
                    pub.send_task(item.task, item.kwargs, task_id=task_id, ignore_result=True, args=item.args), item))
                self._settle(*pub.flush(in_flight=self.IN_FLIGHT))
            except BrokerError as exc:
                jobs[:0] = self._reconnect(pub, index, exc, [(task_id, item)])

    def _settle(self, confirmed: list[tuple[str, Planned]], refused: list[tuple[str, Planned]]) -> None:
        self.confirmed.update(confirmed)
        for task_id, _item in refused:
            log.warning("The broker refused task %s; it counts as sent, not confirmed.", task_id)

    def _reconnect(self, pub: SeamPublisher, index: int, exc: BaseException,
                   current: list[tuple[str, Planned]]) -> list[tuple[str, Planned]]:
        """Connect again; return what must be sent again: the unconfirmed jobs, and `current` unless
        the broker settled it."""
        log.warning("Publishing stopped at task %d of %d (%s); connecting again.", index + 1, len(self.planned), exc)
        try:
            confirmed, refused, unknown = pub.reconnect()
        except OperationalError as lost:  # the broker stayed away past publish_retry_s
            log.error("Could not connect to the broker again (%s); the rest of the plan is not sent.", lost)
            self.connected = False
            self.stop.set()
            return []
        self._settle(confirmed, refused)
        settled = {task_id for task_id, _ in confirmed + refused + unknown}
        again = unknown + [job for job in current if job[0] not in settled]
        if again:
            log.warning("Sending %d task(s) again that the broker had not confirmed when the connection broke.", len(again))
        return again


class Killer(threading.Thread):
    """Every `every_s`, SIGKILL one running replica (as the OOM killer or a lost machine would: a
    local replica's whole process group, a compose replica's container through the Docker SDK)
    and start it again at once, as a supervisor's restart policy does."""

    def __init__(self, stack: Stack, replicas: int, every_s: float, seed: int) -> None:
        super().__init__(name="chaos-killer", daemon=True)
        self.stack, self.replicas, self.every_s = stack, replicas, every_s
        self.rng = random.Random(seed)
        self.kills = 0
        self.victims: list[Replica] = []
        self.stop = threading.Event()

    def run(self) -> None:
        next_at = time.monotonic() + self.every_s
        while not self.stop.wait(max(0.0, next_at - time.monotonic())):
            next_at += self.every_s  # on a fixed schedule, however long a restart took
            running = [r for r in self.stack.replicas() if r.running]
            if not running:
                continue
            victim = self.rng.choice(running)
            self.stack.kill(victim)
            self.victims.append(victim)
            self.kills += 1
            log.info("Killed a replica of %s (%s %s).", victim.service, victim.node or "node", victim.ident)
            self._wait_gone(victim.ident)
            try:
                self.stack.scale(victim.service, self.replicas, wait_s=self.every_s / 2)
            except Exception as exc:  # noqa: BLE001 -- the restart is done; only its readiness ping failed
                log.info("Restarted a replica of %s, not answering yet (%s: %s).", victim.service, type(exc).__name__, exc)

    def _wait_gone(self, ident: str, timeout_s: float = 10.0) -> None:
        """SIGKILL takes effect asynchronously; a replica still alive would not be restarted."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not any(r.ident == ident and r.running for r in self.stack.replicas()):
                return
            time.sleep(0.05)


class PartitionedWorker:
    """One more replica of the first service, inside the namespace, reaching the broker over the veth."""

    def __init__(self, app: Celery, config: Config, namespace: Namespace, node: BrokerNode, home: Path) -> None:
        self.app, self.service = app, config.services[0]
        self.node = f"{self.service.name}-partitioned@{socket.gethostname()}"
        env = environment.inherited({"BROKER_URL": node.url(namespace.host_ip), environment.CONFIG_ENV: str(config.source),
                                     "PYTHONUNBUFFERED": "1"})
        argv = namespace.command([sys.executable, "-m", "conveyor.stack.launcher", "--service", self.service.name,
                                  "--node", self.node])
        with open(home / "partitioned-worker.log", "ab") as out:
            self.process = subprocess.Popen(argv, cwd=environment.PROJECT_ROOT, env=env, stdout=out,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid_file = home / PARTITIONED_PID_FILE
        self.pid_file.write_text(f"{self.process.pid} {self.node}\n")
        want = {self.service.name: self.service.replicas + 1}
        if control.wait_responding(app, want, 60)[self.service.name] < want[self.service.name]:
            self.stop()
            raise StackError(f"the worker in namespace {namespace.name} did not answer within 60 s; "
                             f"see {home / 'partitioned-worker.log'}")
        log.info("Started worker %s in namespace %s.", self.node, namespace.name)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # warm shutdown, then no mercy
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.pid_file.unlink(missing_ok=True)

    @staticmethod
    def kill_leftover(home: Path) -> bool:
        """SIGKILL the partitioned worker a killed run left (its broker is gone: nothing to finish)."""
        pid, node = read_pidfile(home / PARTITIONED_PID_FILE)
        (home / PARTITIONED_PID_FILE).unlink(missing_ok=True)
        if not is_ours(pid, node):  # gone, or the pid was reused by another process
            return False
        os.killpg(pid, signal.SIGKILL)
        return True

    def __enter__(self) -> PartitionedWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
