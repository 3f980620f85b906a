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
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from amqp.exceptions import MessageNacked
from celery import Celery, chain
from kombu.exceptions import OperationalError

from conveyor.chaos import malformed
from conveyor.tasks import deadletter
from conveyor.settings import environment
from conveyor.settings.context import settings_of
from conveyor.stack import control
from conveyor.settings.config import Config
from conveyor.errors import BrokerError, PublishInterrupted, StackError
from conveyor.seam.publisher import Publisher as SeamPublisher
from conveyor.stack.base import Replica, Stack
from conveyor.stack.local import is_ours, read_pidfile
from conveyor.chaos.netns import Namespace
from conveyor.chaos.node import BrokerNode

if TYPE_CHECKING:
    from conveyor.chaos.run import Planned

log = logging.getLogger(__name__)

PARTITIONED_PID_FILE = "partitioned-worker.pid"


@dataclass(frozen=True)
class Sent:
    """A planned task the broker confirmed, under these ids: one, or a pipeline's stages in order."""

    item: Planned
    ids: tuple[str, ...]


class Actor(threading.Thread):
    """A thread of the run whose failure fails the run: whatever it raises is kept in `error`."""

    error: BaseException | None = None

    def run(self) -> None:
        try:
            self.act()
        except BaseException as exc:  # noqa: BLE001  (kept for the verdict, not swallowed: the run fails)
            self.error = exc
            log.exception("The chaos %s failed; the run fails.", self.name)

    def act(self) -> None:
        raise NotImplementedError


class Publisher(Actor):
    """Sends the plan at a steady rate through conveyor's publisher (conveyor/seam/publisher.py): one
    channel, confirms collected as they come, a bound on the unconfirmed. Single tasks go through its
    send_task (its fast path where on), pipelines are Celery chains sent with send_signature,
    malformed messages go out with plain kombu under per-message confirms. A task counts as
    confirmed only when the broker confirmed it; one it refused (nacked, or returned) is listed as
    refused. When the connection breaks (the broker restarts), the publisher reconnects and says
    which sends the broker had settled; whatever it had not confirmed is sent again, under new ids,
    on the new connection: every planned task is confirmed or refused in the end."""

    def __init__(self, app: Celery, planned: list[Planned], rate_per_s: float, in_flight: int | None = None) -> None:
        super().__init__(name="publisher", daemon=True)
        self.app, self.planned, self.rate_per_s = app, planned, rate_per_s
        # At most a second's sends unconfirmed (100 at most): the run times its faults by the confirmed
        # count, which must not lag far behind what was sent.
        self.in_flight = in_flight or (min(100, max(1, int(rate_per_s))) if rate_per_s else 100)
        self.sent = 0  # publishes, resends after a broken connection included
        self.resent = 0
        self.confirmed: dict[str, Sent] = {}  # by the id whose end in the ledger ends it (a pipeline's last stage)
        self.refused: list[str] = []
        self.stop = threading.Event()
        with app.connection_for_write() as probe:
            self._broken = (*probe.connection_errors, *probe.channel_errors, OperationalError, BrokerError)

    def act(self) -> None:
        pending = deque(self.planned)
        next_at = time.monotonic()
        with self.app.connection_for_write() as conn:  # the malformed messages' own, confirmed per message
            odd = conn.Producer(auto_declare=False)
            while pending and not self.stop.is_set():
                unsettled: dict[str, Sent] = {}
                item: Planned | None = None  # popped, and not yet among the unsettled
                try:
                    with SeamPublisher(self.app) as pub:
                        while (pending and not self.stop.is_set()) or unsettled:
                            try:
                                while pending and not self.stop.is_set():
                                    if self.rate_per_s:  # a steady pace that does not catch up in a burst after a stall
                                        self.stop.wait(max(0.0, next_at - time.monotonic()))
                                        next_at = max(next_at, time.monotonic()) + 1 / self.rate_per_s
                                    item = pending.popleft()
                                    self.sent += 1
                                    if item.kind == "malformed":
                                        self._send_malformed(odd, item, pending)
                                        item = None
                                        continue
                                    sent = self._send(pub, item)
                                    unsettled[sent.ids[-1]] = sent
                                    item = None
                                    self._settle(unsettled, *pub.flush(in_flight=self.in_flight))
                                self._settle(unsettled, *pub.flush())
                            except PublishInterrupted as exc:
                                # The publisher knows which sends the broker settled before the break.
                                confirmed, refused, _unknown = pub.reconnect()
                                self._settle(unsettled, confirmed, refused)
                                self._again(pending, unsettled, item, exc)
                                unsettled, item = {}, None
                except self._broken as exc:
                    self._again(pending, unsettled, item, exc)
                    self.stop.wait(1.0)
        log.info("The publisher sent %d task(s); the broker confirmed %d and refused %d.", self.sent,
                 len(self.confirmed), len(self.refused))

    def _again(self, pending: deque[Planned], unsettled: dict[str, Sent], item: Planned | None,
               exc: BaseException) -> None:
        """What a broken connection had not confirmed may or may not be stored: it is sent again."""
        again = [s.item for s in unsettled.values()] + ([item] if item else [])
        log.warning("The publisher's connection broke (%s: %s); sending its %d unconfirmed task(s) "
                    "again on a new one.", type(exc).__name__, exc, len(again))
        self.resent += len(again)
        pending.extendleft(reversed(again))

    def _send(self, pub: SeamPublisher, item: Planned) -> Sent:
        ids: list[str] = []

        def send(_producer: Any) -> str:
            if len(item.stages) == 1:
                name, kwargs = item.stages[0]
                # ignore_result: the ledger is the record here, not the backend.
                ids.append(pub.send_task(name, kwargs, repr(kwargs), ignore_result=True, args=tuple(item.args)))
                return ids[-1]
            result = pub.send_signature(chain(*(self.app.signature(name, kwargs=kwargs) for name, kwargs in item.stages)))
            while result is not None:  # a chain's result knows its parents: the earlier stages, frozen with ids
                ids.insert(0, result.id)
                result = result.parent
            return ids[-1]

        pub.publish(send)
        return Sent(item, tuple(ids))

    def _settle(self, unsettled: dict[str, Sent], confirmed: list[str], refused: list[str]) -> None:
        for key in confirmed:
            if key in unsettled:
                self.confirmed[key] = unsettled.pop(key)
        for key in refused:
            if unsettled.pop(key, None) is not None:
                log.warning("The broker refused task %s; it counts as sent, not confirmed.", key)
                self.refused.append(key)

    def _send_malformed(self, producer: Any, item: Planned, pending: deque[Planned]) -> None:
        task_id = str(uuid.uuid4())
        queue = settings_of(self.app).config.task_type(item.stages[0][0]).queue
        try:
            malformed.publish(producer, queue, item.flaw, task_id, item.stages[0][0], self.app.conf.task_publish_retry_policy)
        except (MessageNacked, *self._broken) as exc:
            if deadletter.refused(exc):
                self.refused.append(task_id)
                return
            # Its retries spent while the broker was away: sent again later.
            log.warning("A malformed message was not confirmed (%s: %s); sending it again.", type(exc).__name__, exc)
            self.resent += 1
            pending.append(item)
        else:
            self.confirmed[task_id] = Sent(item, (task_id,))


class Killer(Actor):
    """Every `every_s`, SIGKILL one running replica (as the OOM killer or a lost machine would: a
    local replica's whole process group, a compose replica's container through the Docker SDK)
    and start it again at once, as a supervisor's restart policy does."""

    def __init__(self, stack: Stack, replicas: int, every_s: float, seed: int) -> None:
        super().__init__(name="killer", daemon=True)
        self.stack, self.replicas, self.every_s = stack, replicas, every_s
        self.rng = random.Random(seed)
        self.kills = 0
        self.victims: list[Replica] = []
        self.stop = threading.Event()

    def act(self) -> None:
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
