"""`make monitor`: a live dashboard and metrics from the task tallies (or Celery's task events) and the
broker's queue figures.

tallied: the task figures from the tallies workers and callers keep in the record store (the
default); accounting: per task type totals, latency and runtime, from the tallies or from task
events where records are off, and the workers' heartbeats; listener: the event stream;
snapshot: one dict of everything; collector: the Monitor that samples and emits on a schedule;
metrics: every Prometheus metric's name, labels and buckets (the Celery exporter's where they mean
the same); prometheus / influx: the two exporters; dashboard: the rich terminal view. (`make
flower` is conveyor/cli/flower.py.)
May import: conveyor.stack and the layers below it; not conveyor.dispatch, its sibling.
"""

from conveyor.monitor.collector import Monitor

__all__ = ["Monitor"]
