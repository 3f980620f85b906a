"""Builds the Celery application from the config and the resolved broker settings."""

from __future__ import annotations

import logging

from celery import Celery
from celery.signals import celeryd_after_setup, worker_ready

from conveyor.settings import environment
from conveyor.tasks import deadletter
from conveyor.lifecycle import ledger
from conveyor.seam import inbound, producer, rpc_backend, trace
from conveyor.seam.consumer import body_limit
from conveyor.tasks import registry
from conveyor.lifecycle import signals as record_signals, stores
from conveyor.settings.config import Config, load_config
from conveyor.amqp.topology import routes, work_queues
from conveyor.settings.context import Settings, attach, settings_of

log = logging.getLogger(__name__)


def create_app(config: Config | None = None, settings: environment.BrokerSettings | None = None,
               choice: object = None) -> Celery:
    config = config or load_config()
    settings = settings or environment.resolve()
    fast = config.tuning.fast_paths and environment.fast_paths_allowed()  # the seam's one switch
    # Every producer Celery makes is conveyor's: task messages mandatory, confirms awaited with a deadline;
    # and a worker's events never wait in its event loop for a broker that blocks publishing.
    app = Celery("conveyor", broker=settings.broker_url, backend=settings.result_backend, set_as_current=True,
                 amqp="conveyor.seam.producer:AMQP", events="conveyor.seam.events:Events")
    if settings.result_backend.startswith("rpc://"):
        app.backend_cls = rpc_backend.RPCBackend  # the same backend, minus a round trip per task sent
    elif settings.result_backend.startswith("file://"):
        app.backend_cls = f"conveyor.seam.file_backend:AtomicFilesystemBackend+{settings.result_backend}"  # whole files only
    # Task events where the config asks, or where the workers cannot keep the task tallies this
    # process would read (a compose stack with records in a SQLite file here): the monitor then
    # counts from events (conveyor/monitor/accounting.py).
    task_events = config.tuning.task_events or settings.task_events or (
        choice is not None and not settings.records_reach_workers(choice.backend))
    transport_options = dict(settings.transport_options)
    if settings.embedded:
        # kombu's filesystem transport, but a fetched message is deleted only once acknowledged.
        app.conf.broker_transport = "conveyor.seam.filesystem:Transport"
    else:
        # Every publish waits for the broker's confirm: a task is never reported sent unless it is stored.
        transport_options["confirm_publish"] = True
        # connection.blocked/unblocked logged, buffered reads (conveyor/seam/producer.py, sockets.py)
        producer.install_transport(buffered=fast)
    app.conf.update(
        task_queues=work_queues(config),
        task_routes=routes(config),
        task_default_queue=config.queues[0],
        task_create_missing_queues=False,
        accept_content=["json"],
        task_serializer="json",
        result_serializer="json",
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_default_delivery_mode="persistent",
        worker_prefetch_multiplier=1,
        broker_transport_options=transport_options,
        # connection.blocked/unblocked logged (conveyor/seam/producer.py); the embedded broker has neither.
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        # Delivery under faults (docs/reliability.md): a publish rides out a broker restart before it
        # fails; a silent broker (or a cut link) is noticed within about two heartbeats; tasks running
        # when the connection drops are stopped, since the broker hands their messages to another worker.
        task_publish_retry_policy=environment.publish_retry_policy(config.publish_retry_s),
        broker_heartbeat=config.heartbeat_s,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        # Dead-letters, with their reason, the messages Celery's consumer would acknowledge away.
        worker_consumer="conveyor.seam.consumer:Consumer",
        result_extended=config.tuning.result_extended,
        result_expires=24 * 3600,
        task_track_started=config.tuning.track_started,
        task_send_sent_event=task_events,
        worker_send_task_events=task_events,
        worker_hijack_root_logger=False,
    )
    # Headers too deep for py-amqp and compressed bodies too big once inflated are caught as they are
    # read, in every process (a worker, `dlq list`): conveyor/seam/inbound.py.
    inbound.install(body_limit(max(config.payload_limit(t.name) for t in config.task_types)))
    attach(app, Settings(config, settings, fast, choice))
    registry.register(app, config)
    if settings.records_url not in stores.OFF:
        record_signals.connect()
    ledger.attach_from_env()
    return app


@worker_ready.connect
def _declare_on_start(sender=None, **_kwargs) -> None:
    # A worker declares the dead-letter queue too, so that whatever the broker dead-letters from
    # the work queues has somewhere to go even before any dispatcher has run.
    deadletter.declare(sender.app)
    log.info("Worker %s declared the work and dead-letter queues.", sender.hostname)


# Celery's per-task INFO lines: "Task x[id] received" and "... succeeded in" (and "retry:"), two or
# more lines per task, which cost a worker measurable CPU on short tasks (docs/performance.md).
TASK_LINE_LOGGERS = ("celery.worker.strategy", "celery.app.trace")


def _quiet_task_lines() -> None:
    for name in TASK_LINE_LOGGERS:
        task_logger = logging.getLogger(name)
        if task_logger.getEffectiveLevel() >= logging.INFO:  # a worker at DEBUG keeps everything
            task_logger.setLevel(logging.WARNING)


@celeryd_after_setup.connect
def _after_worker_setup(sender=None, instance=None, conf=None, **_kwargs) -> None:
    # After the worker set up its logging, before its pool forks and its tracers are built; the
    # task lines first, since whether anything shows a result's repr depends on them.
    settings = settings_of(instance.app)
    if not settings.config.tuning.task_log_lines:
        _quiet_task_lines()
    if settings.fast_paths and trace.skip_unshown_result_repr(instance.app, conf):
        log.debug("Worker %s logs no task results: their repr is not built.", sender)
