"""The chaos run: many tasks through the real system while its workers are killed, its broker is
restarted and (optionally) a worker is cut off; then an account of every task.

Timeline. Worker replicas of every service start as local processes (the local stack) against a
RabbitMQ node of the run's own. A publisher sends the tasks at a steady rate through the load
tester's publisher (conveyor/seam/publisher.py: confirms collected asynchronously; workers publish results without
confirms, `tuning.result_confirms: false`): single tasks, three-stage pipelines (Celery chains) and
malformed messages, a planned share of the tasks and pipelines set to fail every attempt (so they
are retried with backoff, then dead-lettered). Every few seconds a random replica is SIGKILLed, whole process group at once, and
restarted as a supervisor would. When half the tasks are confirmed the broker node is stopped and
started again, while the publisher and the workers are busy. With a partition, one more worker runs
in a network namespace and, early in the run, its link is cut for a while.

The account. Sent and confirmed come from the publisher; succeeded from the ledger the workers
write (conveyor/lifecycle/ledger.py); dead-lettered from the dead-letter queue itself, drained at the end. A
confirmed task in neither is lost; a pipeline succeeded when its last stage did, and is dead-lettered
when a stage is; a malformed message must be dead-lettered. The run fails when anything is lost,
when a planned task was neither confirmed nor refused by the broker, when a task ended otherwise
than planned, when an actor (publisher, killer) raised, or at its timeout. It waits until every
confirmed task has ended in the ledger and the work queues are empty, or until its timeout.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from celery import Celery

from conveyor.settings import environment
from conveyor.tasks import deadletter
from conveyor.lifecycle import ledger
from conveyor.stack import control
from conveyor.settings.config import Config, load_config
from conveyor.errors import UsageError
from conveyor.stack.local import LocalStack
from conveyor.amqp.queues import declared_depth
from conveyor.settings.context import settings_of
from conveyor.dispatch.arguments import entry_arguments
from conveyor.chaos.actors import Killer, PartitionedWorker, Publisher
from conveyor.chaos.malformed import FLAWS
from conveyor.chaos.netns import Namespace
from conveyor.chaos.node import BrokerNode
from conveyor.chaos.report import ChaosReport, PartitionFinding
from conveyor.tasks.states import FINAL
from conveyor import console
from conveyor.stack import choice, open_app

log = logging.getLogger(__name__)

PARTITION_HEARTBEAT_S = 4.0  # the broker drops a silent worker after about two heartbeats
PARTITION_AT, RESTART_AT = 0.1, 0.5  # fractions of the tasks confirmed when these faults strike
RECONNECT_WAIT_S = 60.0  # how long, after the run, every replica has to answer once the broker is back


@dataclass(frozen=True)
class ChaosOptions:
    tasks: int = 10_000
    fail_rate: float = 0.1  # share of tasks that fail every attempt, hence end in the dead-letter queue
    replicas: int = 2  # per service
    kill_every_s: float = 5.0  # 0: no kills
    broker_restart: bool = True
    partition: bool = False
    partition_s: float = 30.0
    partition_subnet: str | None = None  # the veth pair's /30; default: a free one in 10.251.0.0/16
    rate_per_s: float = 100.0  # publishing pace; 0: as fast as the broker confirms
    duration_s: float | None = None  # each task's run time; None: its type's default
    seed: int = 0
    timeout_s: float = 1800.0
    pipeline_rate: float = 0.1  # share of the planned tasks that are three-stage pipelines
    malformed_rate: float = 0.02  # share that are messages no worker can run

    def check(self, config: Config) -> None:
        """Refuse values that cannot make a meaningful run, naming the option and its bounds."""
        limit = config.limits.max_tasks_per_run
        if not 0 < self.tasks <= limit:
            raise UsageError(f"--tasks must be between 1 and limits.max_tasks_per_run ({limit}), got {self.tasks}")
        for name, value in (("--fail-rate", self.fail_rate), ("--pipeline-rate", self.pipeline_rate),
                            ("--malformed-rate", self.malformed_rate)):
            if not 0 <= value <= 1:
                raise UsageError(f"{name} must be between 0 and 1, got {value:g}")
        if self.pipeline_rate + self.malformed_rate > 1:
            raise UsageError("--pipeline-rate and --malformed-rate add up to more than 1")
        if not 1 <= self.replicas <= config.limits.max_replicas:
            raise UsageError(f"--replicas must be between 1 and limits.max_replicas "
                             f"({config.limits.max_replicas}), got {self.replicas}")
        for name, value in (("--kill-every-s", self.kill_every_s), ("--rate-per-s", self.rate_per_s)):
            if value < 0:
                raise UsageError(f"{name} must be 0 (off) or more, got {value:g}")
        if self.kill_every_s and self.kill_every_s < 1:
            raise UsageError(f"--kill-every-s must be at least 1 (or 0: no kills), got {self.kill_every_s:g}")
        if self.partition_s <= 0 or self.timeout_s <= 0:
            raise UsageError("--partition-s and --timeout-s must be more than 0")
        if self.duration_s is not None and not 0 <= self.duration_s <= 60:
            raise UsageError(f"--duration-s must be between 0 and 60, got {self.duration_s:g}")


@dataclass(frozen=True)
class Planned:
    kind: str  # "task", "pipeline" or "malformed"
    stages: tuple[tuple[str, dict[str, Any]], ...]  # (task name, kwargs) of each stage; one but for a pipeline
    fails: bool  # it must end dead-lettered
    flaw: str = ""  # a malformed message's, conveyor/chaos/malformed.py
    args: tuple[Any, ...] = ()  # a user task's positional arguments (from its dispatch entry)


def plan(options: ChaosOptions, config: Config) -> list[Planned]:
    """The tasks, alternating between the simulated task types and the config's dispatch entries of
    the other task types. Of the simulated ones, reproducible shares are pipelines (the first
    simulated type -> the second -> the first: queue_a -> queue_b -> queue_a) and malformed
    messages, and a share of the tasks and pipelines fails every attempt (a pipeline in its middle
    stage). A user's task gets the arguments its dispatch entry gives (args/kwargs or its generator,
    with the number of tasks sent from that entry so far as the index) and is planned to succeed:
    failures that its retry_on covers must be retried away, and any dead-lettered one is reported
    as a mismatch."""
    rng = random.Random(options.seed)
    simulated = [t.name for t in config.task_types if t.simulated]
    sources: list[tuple[str, int | None]] = [(name, None) for name in simulated]
    sources += [(spec.task, entry) for entry, spec in enumerate(config.tasks) if not config.task_type(spec.task).simulated]
    if not sources:
        raise UsageError("the config has no simulated task type and no dispatch entry (tasks[]) of another "
                         "type: the chaos run has nothing it knows how to call")
    run_for: dict[str, Any] = {} if options.duration_s is None else {"duration_s": options.duration_s}

    def failing(name: str) -> dict[str, Any]:
        return {**run_for, "fail_first": config.retry_policy(name).max_retries + 1}  # one more failure than retries allowed

    sent_of: dict[int, int] = {}
    planned = []
    for index in range(options.tasks):
        name, entry = sources[index % len(sources)]
        if entry is not None:
            args, kwargs = entry_arguments(config, entry, sent_of.get(entry, 0))
            sent_of[entry] = sent_of.get(entry, 0) + 1
            planned.append(Planned("task", ((name, kwargs),), False, args=tuple(args)))
            continue
        fails = rng.random() < options.fail_rate
        kind = rng.random()
        if kind < options.malformed_rate:
            planned.append(Planned("malformed", ((name, {}),), True, FLAWS[index % len(FLAWS)]))
        elif kind < options.malformed_rate + options.pipeline_rate:
            first, middle = simulated[0], simulated[1 % len(simulated)]
            planned.append(Planned("pipeline", ((first, run_for), (middle, failing(middle) if fails else run_for),
                                                (first, run_for)), fails))
        else:
            planned.append(Planned("task", ((name, failing(name) if fails else run_for),), fails))
    return planned


@dataclass
class _Faults:
    broker_restarts: int = 0
    broker_away_s: float | None = None
    broker_back_at: float | None = None  # wall-clock time, as the ledger's
    cut_at: float | None = None  # wall-clock time, as the ledger's
    healed_at: float | None = None
    answering_after_restart: int | None = None  # replicas answering a ping at the end of a run with a restart


class ChaosRun:
    def __init__(self, options: ChaosOptions, config: Config, home: Path, broker_url: str | None = None) -> None:
        """`broker_url`: a broker to use as it is (no restart then); by default the run starts its own node."""
        options.check(config)
        if broker_url and (options.broker_restart or options.partition):
            raise UsageError("a broker restart or a partition needs the run's own broker node, not BROKER_URL")
        self.options, self.base_config, self.home, self.broker_url = options, config, home, broker_url
        self.faults = _Faults()
        self.node_home: Path | None = None  # what the run made outside its home, for a check that it is gone
        self.namespace_name: str | None = None

    def run(self) -> ChaosReport:
        environment.private_dir(self.home.parent)  # the sweep acts only on 0700 directories of ours
        environment.private_dir(self.home)
        (self.home / "owner").write_text(f"{os.getpid()}\n")  # for sweep(): is the run that made it alive?
        started = time.monotonic()
        with ExitStack() as cleanup:
            namespace = None
            if self.options.partition:
                namespace = cleanup.enter_context(Namespace(self.options.partition_subnet))
                self.namespace_name = namespace.name
            node = None
            if not self.broker_url:
                listen = ("127.0.0.1", namespace.host_ip) if namespace else ("127.0.0.1",)
                node = cleanup.enter_context(BrokerNode(listen, keep_logs=self.home / "broker-log", registry=self.home))
                self.node_home = node.home
            cleanup.enter_context(environment.environ({
                "BROKER_URL": self.broker_url or node.url(),
                "RESULT_BACKEND": "rpc://",
                environment.RECORDS_URL_ENV: f"sqlite:///{self.home / 'records.sqlite3'}",
                environment.RUN_DIR_ENV: str(self.home),
            }))
            config = self._write_config()
            # The run's pairing is fixed (it restarts its broker and kills its workers); said as every command says its own.
            made = choice.chaos(environment.resolve(), own_node=node is not None)
            app = open_app(config, announce=False, choice=made)
            console.say(made.describe())
            cleanup.callback(app.close)
            deadletter.declare(app)
            # Only the workers (which inherit the environment) write the ledger; this process reads it.
            ledger_path = self.home / "ledger.sqlite3"
            ledger.connect(ledger_path).close()
            cleanup.enter_context(environment.environ({ledger.LEDGER_ENV: str(ledger_path)}))
            stack = LocalStack(app, config)
            cleanup.callback(stack.down)
            stack.up(wait_s=120)
            outsider = None
            if namespace:
                outsider = cleanup.enter_context(PartitionedWorker(app, config, namespace, node, self.home))
            report = self._drive(app, stack, node, namespace, outsider, ledger_path, started)
        (self.home / "report.json").write_text(_json(report.as_dict()))
        return report

    def _write_config(self) -> Config:
        """The project's config with the run's replica counts (and a short heartbeat for a partition),
        in a file of the run's own, for the workers to load."""
        # The load tester's fast path (no task-sent events) and results published without confirms.
        tuning = self.base_config.tuning.model_copy(update={"task_events": False, "result_confirms": False})
        update: dict[str, Any] = {"services": [s.model_copy(update={"replicas": self.options.replicas})
                                               for s in self.base_config.services], "tuning": tuning}
        if self.base_config.code_path:  # the copy lives elsewhere: its code_dir must not be relative
            update["code_dir"] = str(self.base_config.code_path)
        if self.options.partition:
            update["heartbeat_s"] = PARTITION_HEARTBEAT_S
        data = self.base_config.model_copy(update=update).model_dump(mode="json")
        path = self.home / "config.yml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return load_config(path)

    def _drive(self, app: Celery, stack: LocalStack, node: BrokerNode | None, namespace: Namespace | None,
               outsider: PartitionedWorker | None, ledger_path: Path, started: float) -> ChaosReport:
        options = self.options
        planned = plan(options, self.base_config)
        publisher = Publisher(app, planned, options.rate_per_s)
        killer = Killer(stack, options.replicas, options.kill_every_s, options.seed) if options.kill_every_s else None
        deadline = time.monotonic() + options.timeout_s
        timed_out = False
        with ledger.Ledger(ledger_path) as book:
            publisher.start()
            if killer:
                killer.start()
            try:
                while True:
                    confirmed = len(publisher.confirmed)
                    if namespace and self.faults.cut_at is None and confirmed >= PARTITION_AT * options.tasks:
                        self._cut(namespace, book, outsider)
                    if namespace and self.faults.healed_at is None and self.faults.cut_at \
                            and time.time() - self.faults.cut_at >= options.partition_s:
                        self._heal(namespace)
                    partition_over = not namespace or self.faults.healed_at is not None
                    if node and options.broker_restart and not self.faults.broker_restarts \
                            and partition_over and confirmed >= RESTART_AT * options.tasks:
                        self._restart(node)
                    if any(actor and actor.error for actor in (publisher, killer)):
                        break  # the verdict says which, and fails the run
                    if not publisher.is_alive() and partition_over and \
                            _all_ended(publisher.confirmed.values(), book) and _backlog(app) == 0:
                        break
                    if time.monotonic() > deadline:
                        timed_out = True
                        log.error("The chaos run timed out after %.0f s.", options.timeout_s)
                        break
                    time.sleep(0.5)
            finally:
                publisher.stop.set()
                if killer:
                    killer.stop.set()
                    killer.join()
                publisher.join()
            if self.faults.broker_restarts:
                # A replica that reconnected late may have found its queue drained and finished
                # nothing since: asking every replica to answer is what tells it reconnected.
                # On a connection of its own: the app's pooled ones were opened to the node before the restart.
                with app.connection_for_write() as conn:
                    answering = control.wait_responding(app, stack.desired(), RECONNECT_WAIT_S, connection=conn)
                self.faults.answering_after_restart = sum(answering.values())
            stack.down()  # warm shutdown: whatever runs now finishes and is in the ledger
            if outsider:
                outsider.stop()
            in_dlq = {letter.task_id for letter in deadletter.drain(app, limit=2 * options.tasks + 1000)}
            return self._account(publisher, killer, book, in_dlq, outsider, timed_out, started)

    def _cut(self, namespace: Namespace, book: ledger.Ledger, outsider: PartitionedWorker) -> None:
        """Cut the link while the partitioned worker is running a task (if it gets one within 30 s),
        so that the cut strands work that the broker must hand to another worker."""
        deadline = time.monotonic() + 30
        while not book.running(outsider.node, since=time.time() - 60) and time.monotonic() < deadline:
            time.sleep(0.01)
        namespace.cut()
        self.faults.cut_at = time.time()
        log.warning("Cut the partitioned worker's link for %.0f s.", self.options.partition_s)

    def _heal(self, namespace: Namespace) -> None:
        namespace.heal()
        self.faults.healed_at = time.time()
        log.warning("Restored the partitioned worker's link.")

    def _restart(self, node: BrokerNode) -> None:
        log.warning("Restarting the broker node while tasks are being sent and run.")
        self.faults.broker_away_s = node.restart()
        self.faults.broker_restarts += 1
        self.faults.broker_back_at = time.time()
        log.warning("The broker is back after %.1f s.", self.faults.broker_away_s)

    def _account(self, publisher: Publisher, killer: Killer | None, book: ledger.Ledger, in_dlq: set[str],
                 outsider: PartitionedWorker | None, timed_out: bool, started: float) -> ChaosReport:
        confirmed = publisher.confirmed.values()
        succeeded_ids = book.succeeded()
        succeeded = [s for s in confirmed if s.item.kind != "malformed" and s.ids[-1] in succeeded_ids]
        dead = [s for s in confirmed if any(i in in_dlq for i in s.ids)]
        ended = {s.ids[-1] for s in (*succeeded, *dead)}
        lost = sorted(s.ids[-1] for s in confirmed if s.ids[-1] not in ended)
        mismatched = sum(1 for s in succeeded if s.item.fails) + sum(1 for s in dead if not s.item.fails)
        errors = [f"{actor.name}: {type(actor.error).__name__}: {actor.error}"
                  for actor in (publisher, killer) if actor and actor.error]
        return ChaosReport(
            planned=len(publisher.planned), sent=publisher.sent, confirmed=len(confirmed),
            refused=len(publisher.refused), succeeded=len(succeeded), dead_lettered=len(dead),
            lost=len(lost), duplicated=book.duplicated(), resent=publisher.resent,
            pipelines=sum(s.item.kind == "pipeline" for s in confirmed),
            malformed=sum(s.item.kind == "malformed" for s in confirmed),
            set_to_fail=sum(s.item.fails for s in confirmed), mismatched=mismatched,
            executions=book.count(), cut_off=book.count(""), kills=killer.kills if killer else 0,
            broker_restarts=self.faults.broker_restarts, broker_away_s=self.faults.broker_away_s,
            elapsed_s=time.monotonic() - started, timed_out=timed_out,
            partition=self._partition_finding(book, outsider), lost_ids=lost[:20], refused_ids=publisher.refused,
            errors=errors, workers_after_restart=self._workers_after(book, self.faults.broker_back_at),
            answering_after_restart=self.faults.answering_after_restart,
        )

    @staticmethod
    def _workers_after(book: ledger.Ledger, back_at: float | None) -> list[str] | None:
        """The workers that finished a task they started after the broker came back: they reconnected."""
        if back_at is None:
            return None
        return sorted({e.worker for e in book.executions() if e.started_at > back_at and e.outcome in FINAL})

    def _partition_finding(self, book: ledger.Ledger, outsider: PartitionedWorker | None) -> PartitionFinding | None:
        if outsider is None or self.faults.cut_at is None:
            return None
        cut, healed = self.faults.cut_at, self.faults.healed_at or time.time()
        in_flight = {e.task_id for e in book.executions(outsider.node)
                     if e.started_at < cut and (e.finished_at is None or e.finished_at > cut)}
        redelivered = {e.task_id for e in book.executions()
                       if e.task_id in in_flight and e.started_at > cut and e.outcome in FINAL}
        after_heal = sum(1 for e in book.executions(outsider.node) if e.started_at > healed and e.outcome in FINAL)
        return PartitionFinding(outsider.node, healed - cut, len(in_flight), len(redelivered), after_heal)


def _all_ended(confirmed: Any, book: ledger.Ledger) -> bool:
    """Every confirmed task and pipeline has ended in the ledger (a pipeline with its last stage, or
    with any stage dead-lettered); malformed messages never run, the empty queues say they were taken."""
    finished, dead = book.finished(), book.dead_lettered()
    return all(s.item.kind == "malformed" or s.ids[-1] in finished or any(i in dead for i in s.ids) for s in confirmed)


def _backlog(app: Celery) -> int:
    """Messages ready in the work queues, from a passive declare (the run's own node has no management
    API); -1 while the broker does not answer."""
    conn = app.connection_for_read()
    try:
        with conn:
            channel = conn.channel()
            try:
                return sum(declared_depth(channel, name)[0] for name in settings_of(app).config.queues)
            finally:
                channel.close()
    except (OSError, *conn.connection_errors, *conn.channel_errors) as exc:
        log.info("Could not read the queues (%s); trying again.", exc)
        return -1


def _json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2) + "\n"
