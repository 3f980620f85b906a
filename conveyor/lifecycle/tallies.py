"""Task tallies: counters and histograms that callers and workers keep in the record store, beside the
records and in the same batches (lifecycle/guarded.py), so that the monitor and the Prometheus
endpoint read task figures without one broker message per task (Celery's task events were four,
plus a STARTED result; `tuning.task_events` still turns them on, for Flower).

Who counts what, once per occurrence, where it happens (conveyor/lifecycle/signals.py):

    sent            the caller, when it publishes a task's first message (not a retry, not a dead letter)
    received        the worker's consumer, when a task message arrives (task_received)
    started         the pool, before each attempt (task_prerun); started_first, before a first attempt
                    (so that the monitor can tell the tasks waiting out a retry: retried - later starts)
    succeeded       the pool (task_success), with the attempt's runtime
    failed          the pool, every task_failure, by exception class, as the Celery exporter counts it
    retried         the pool, before a retry is published (retry_scheduled)
    rejected        a Reject without requeue: RabbitMQ dead-letters the message through the queue's DLX
    revoked         the worker, when it discards or terminates a revoked task
    dead_lettered   a publish to the dead-letter queue (any process), or a Reject without requeue;
                    taken back when the dead-letter queue refuses it (full) and the task stays queued
    wait            first publish to the first attempt's start (time queued), per type
    latency         first publish to success, retries included, per type; its recent values kept as
                    samples for the monitor's percentiles
    runtime         an attempt's run time, per type and host

A counter is one number per key; a histogram is a count per bucket (not cumulative) and a sum.
Keys join a kind and its labels with SEP; labels are the Celery exporter's (name, hostname,
queue_name, and exception for failed). Totals count from the store's first write, across monitor
restarts, for as long as the store keeps them (records_ttl_s after the last write).
"""

from __future__ import annotations

import functools
import math
import socket
from bisect import bisect_left
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import Histogram

from conveyor.lifecycle.records import Store

SEP = "\x1f"  # between a key's parts: no task name, host or exception class holds it
COUNTERS = ("sent", "received", "started", "started_first", "succeeded", "failed", "retried", "rejected", "revoked",
            "dead_lettered")
# The Celery exporter's runtime buckets (prometheus_client's defaults); ours, 5 ms to 10 min, for
# queue waits and end-to-end times, which span far more than run times do.
RUNTIME_BUCKETS_S = tuple(b for b in Histogram.DEFAULT_BUCKETS if b != math.inf)
QUEUE_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
HISTOGRAMS = {"runtime": RUNTIME_BUCKETS_S, "wait": QUEUE_BUCKETS_S, "latency": QUEUE_BUCKETS_S}
SUM = "sum"


@dataclass(frozen=True)
class Tally:
    kind: str  # one of COUNTERS or HISTOGRAMS
    name: str
    hostname: str
    queue: str
    extra: str  # the exception class of `failed`; a histogram's bucket index or SUM; else ""
    value: float


def key(kind: str, name: str, hostname: str, queue: str, extra: str = "") -> str:
    return SEP.join((kind, name, hostname, queue, extra))


def sample_key(name: str, queue: str) -> str:
    return SEP.join(("latency", name, queue))


@dataclass
class Batch:
    """The tallies of one event, added to the store in one call (`add_to`): counters summed, and a
    histogram observation as its bucket's count, its sum and, for latency, a sample."""

    counts: dict[str, float] = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=dict)

    def count(self, kind: str, name: str, hostname: str, queue: str, extra: str = "", by: float = 1) -> Batch:
        counter = key(kind, name, hostname, queue, extra)
        self.counts[counter] = self.counts.get(counter, 0) + by
        return self

    def observe(self, kind: str, name: str, hostname: str, queue: str, value_s: float) -> Batch:
        self.count(kind, name, hostname, queue, str(bisect_left(HISTOGRAMS[kind], value_s)))
        self.count(kind, name, hostname, queue, SUM, by=value_s)
        if kind == "latency":
            self.samples.setdefault(sample_key(name, queue), []).append(value_s)
        return self

    def add_to(self, store: Store) -> None:
        store.add_tallies(self.counts, self.samples)


def count(store: Store, kind: str, name: str, hostname: str, queue: str, exception: str = "", by: float = 1) -> None:
    """One counter's increment, on its own."""
    Batch().count(kind, name, hostname, queue, exception, by).add_to(store)


def parse(counts: Mapping[str, float]) -> Iterator[Tally]:
    """The stored counters as Tally values; keys of another shape (a newer writer's) are skipped."""
    for raw, value in counts.items():
        parts = raw.split(SEP)
        if len(parts) == 5 and (parts[0] in COUNTERS or parts[0] in HISTOGRAMS):
            yield Tally(*parts, value=value)


def parse_samples(samples: Mapping[str, list[float]]) -> dict[tuple[str, str], list[float]]:
    """(name, queue) -> its recent latencies, oldest first."""
    found = {}
    for raw, values in samples.items():
        parts = raw.split(SEP)
        if len(parts) == 3 and parts[0] == "latency":
            found[parts[1], parts[2]] = values
    return found


@functools.lru_cache(maxsize=256)  # asked for every task: a node name's host, or a system call
def host_of(node: str | None) -> str:
    """The host part of a Celery node name (`worker-a-1f2e@host` -> `host`), the exporter's hostname;
    this machine's name for a caller, which has none."""
    if not node:
        return socket.gethostname()
    return node.rpartition("@")[2] or node
