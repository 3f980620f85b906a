"""Our metric definitions against the Celery exporter's: wherever a figure means the same, the same
name, type, labels (in the same order) and buckets, so that the exporter's Grafana dashboards and
alerts (celery-mixin) read our endpoint as they read the exporter's.

EXPORTER is a copy of what danihodovic/celery-exporter declares in src/exporter.py (commit
8b978b980e00be94afbd48199441ee086dad5b33, Exporter.__init__ with the default metric_prefix
"celery_" and no static labels): each Counter, Gauge and Histogram with its label list, and the
runtime histogram's default buckets (prometheus_client's Histogram.DEFAULT_BUCKETS, written out
here so that a change of that default in prometheus_client shows up as a difference too).
"""

from __future__ import annotations

import math

from conveyor.monitor import metrics

TASK = ["name", "hostname", "queue_name"]
EXPORTER = {
    # name (as passed to the constructor): (type, labels)
    "celery_task_sent": ("counter", TASK),
    "celery_task_received": ("counter", TASK),
    "celery_task_started": ("counter", TASK),
    "celery_task_succeeded": ("counter", TASK),
    "celery_task_failed": ("counter", ["name", "hostname", "exception", "queue_name"]),
    "celery_task_rejected": ("counter", TASK),
    "celery_task_revoked": ("counter", TASK),
    "celery_task_retried": ("counter", TASK),
    "celery_worker_up": ("gauge", ["hostname"]),
    "celery_worker_tasks_active": ("gauge", ["hostname"]),
    "celery_task_runtime": ("histogram", TASK),
    "celery_queue_length": ("gauge", ["queue_name"]),
    "celery_active_consumer_count": ("gauge", ["queue_name"]),
    "celery_active_worker_count": ("gauge", ["queue_name"]),
    "celery_active_process_count": ("gauge", ["queue_name"]),
}
EXPORTER_RUNTIME_BUCKETS = (.005, .01, .025, .05, .075, .1, .25, .5, .75, 1.0, 2.5, 5.0, 7.5, 10.0, math.inf)
# The event each task counter counts (its key in Exporter.state_counters).
EXPORTER_EVENTS = {f"task-{name.removeprefix('celery_task_')}": name
                   for name, (kind, _) in EXPORTER.items() if kind == "counter"}


def test_every_exporter_metric_is_ours_with_its_type_and_labels():
    ours = {spec.name: (spec.kind, list(spec.labels)) for spec in metrics.ALL}
    assert {name: ours.get(name) for name in EXPORTER} == EXPORTER


def test_the_runtime_histogram_has_the_exporters_buckets():
    assert (*metrics.TASK_RUNTIME.buckets, math.inf) == EXPORTER_RUNTIME_BUCKETS


def test_each_task_counter_counts_the_event_the_exporter_counts_with_it():
    assert {event: spec.name for event, spec in metrics.TASK_EVENTS.items()} == EXPORTER_EVENTS


def test_our_own_metrics_are_prefixed_and_never_take_an_exporter_name():
    names = [spec.name for spec in metrics.OURS]
    assert all(name.startswith("conveyor_") for name in names)
    assert len(set(names)) == len(names) and not set(names) & set(EXPORTER)
    assert {spec.name for spec in metrics.EXPORTER} == set(EXPORTER)
