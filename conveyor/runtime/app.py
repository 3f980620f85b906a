"""Builds the Celery application from the config and the resolved broker settings."""

from __future__ import annotations

import logging

from celery import Celery
from celery.app import trace
from celery.signals import celeryd_after_setup, worker_ready
from celery.utils.saferepr import saferepr

from conveyor.settings import environment
from conveyor.tasks import deadletter
from conveyor.lifecycle import ledger
from conveyor.seam import rpc_backend
from conveyor.tasks import simulated
from conveyor.lifecycle import records, signals as record_signals
from conveyor.settings.config import Config, load_config
from conveyor.amqp.topology import routes, work_queues

log = logging.getLogger(__name__)


def create_app(config: Config | None = None, settings: environment.BrokerSettings | None = None) -> Celery:
    config = config or load_config()
    settings = settings or environment.resolve()
    app = Celery("conveyor", broker=settings.broker_url, backend=settings.result_backend, set_as_current=True)
    if settings.result_backend.startswith("rpc://"):
        app.backend_cls = rpc_backend.RPCBackend  # the same backend, minus a round trip per task sent
    elif settings.result_backend.startswith("file://"):
        app.backend_cls = f"conveyor.seam.file_backend:AtomicFilesystemBackend+{settings.result_backend}"  # whole files only
    transport_options = dict(settings.transport_options)
    if settings.embedded:
        # kombu's filesystem transport, but a fetched message is deleted only once acknowledged.
        app.conf.broker_transport = "conveyor.seam.filesystem:Transport"
    else:
        # Every publish waits for the broker's confirm: a task is never reported sent unless it is stored.
        transport_options["confirm_publish"] = True
    app.conf.update(
        task_queues=work_queues(config.queue_type),
        task_routes=routes(),
        task_default_queue="queue_a",
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
        task_send_sent_event=config.tuning.task_events,
        worker_send_task_events=config.tuning.task_events,
        worker_hijack_root_logger=False,
    )
    app.conveyor_config = config
    app.conveyor_broker = settings
    simulated.register(app, config.retry, config.time_limits)
    if settings.records_url not in records.OFF:
        record_signals.connect()
    ledger.attach_from_env()
    return app


@worker_ready.connect
def _declare_on_start(sender=None, **_kwargs) -> None:
    # A worker declares the dead-letter queue too, so that whatever the broker dead-letters from
    # the work queues has somewhere to go even before any dispatcher has run.
    deadletter.declare(sender.app)
    log.info("Worker %s declared the work and dead-letter queues.", sender.hostname)


@celeryd_after_setup.connect
def _skip_unshown_result_repr(sender=None, instance=None, conf=None, **_kwargs) -> None:
    # Celery's tracer builds a repr of every result (saferepr, up to the task's resultrepr_maxsize)
    # for its INFO "succeeded" line even when INFO is off; the task-succeeded event is its only
    # other reader. For our result dicts that is ~85 us a task, 5 % of a no-op task's worker CPU
    # (docs/performance.md). The tracers are built after this signal, so they read the new size.
    if conf.worker_send_task_events or logging.getLogger("celery.app.trace").isEnabledFor(logging.INFO):
        return
    for task in instance.app.tasks.values():
        task.resultrepr_maxsize = 0
    # Even at size 0, saferepr walks the whole result to close its brackets (another 6 % of the
    # worker's CPU, profiled): the tracer's own reference to it is pointed at one that does not.
    trace.saferepr = _saferepr_unless_empty
    log.debug("Worker %s logs no task results: their repr is not built.", sender)


def _saferepr_unless_empty(o: object, maxlen: int | None = None, *args: object, **kwargs: object) -> str:
    return "" if maxlen == 0 else saferepr(o, maxlen, *args, **kwargs)
