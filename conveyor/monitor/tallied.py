"""The monitor's task figures from the tallies workers and callers keep in the record store
(conveyor/lifecycle/tallies.py), read every collect interval: one read, however many tasks ran.

The stored counters become the Celery exporter's series (conveyor/monitor/metrics.py) under the same
labels the event-fed accounting uses, and per task type the totals of the dashboard and the JSON.
As the exporter does, every (name, hostname, queue) a worker has counted for shows all its counters,
0 where nothing happened, so that ratios and increase() have both sides from the start.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

from conveyor.lifecycle import tallies
from conveyor.monitor.metrics import TASK_DEAD_LETTERED, TASK_EVENTS, TASK_LATENCY, TASK_RUNTIME, TASK_WAIT, Series

_HISTOGRAM_SPECS = {"runtime": TASK_RUNTIME, "wait": TASK_WAIT, "latency": TASK_LATENCY}


@dataclass
class Tallied:
    series: Series
    counts: dict[tuple[str, str], dict[str, int]]  # (name, queue) -> COUNTERS -> total
    retrying: dict[tuple[str, str], int]
    latencies_s: dict[tuple[str, str], list[float]]  # recent, oldest first


def load(counts: Mapping[str, float], samples: Mapping[str, list[float]]) -> Tallied:
    series = Series()
    per_type: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: dict.fromkeys(tallies.COUNTERS, 0))
    histograms: dict[tuple[str, tuple[str, ...]], tuple[list[int], list[float]]] = {}
    labelled: set[tuple[str, str, str]] = set()
    for tally in tallies.parse(counts):
        if tally.kind in tallies.HISTOGRAMS:
            spec = _HISTOGRAM_SPECS[tally.kind]
            labels = (tally.name, tally.hostname, tally.queue) if tally.kind == "runtime" else (tally.name, tally.queue)
            buckets, total = histograms.setdefault((tally.kind, labels), ([0] * (len(spec.buckets) + 1), [0.0]))
            if tally.extra == tallies.SUM:
                total[0] += tally.value
            elif tally.extra.isdigit() and int(tally.extra) < len(buckets):
                buckets[int(tally.extra)] += int(tally.value)
            continue
        value = int(round(tally.value))
        per_type[tally.name, tally.queue][tally.kind] += value
        if tally.kind == "dead_lettered":
            series.inc(TASK_DEAD_LETTERED, (tally.name, tally.queue), value)
        elif tally.kind == "started_first":
            pass  # ours, for `retrying`: not a series
        elif tally.kind == "failed":
            series.inc(TASK_EVENTS["task-failed"], (tally.name, tally.hostname, tally.extra, tally.queue), value)
        else:
            series.inc(TASK_EVENTS[f"task-{tally.kind}"], (tally.name, tally.hostname, tally.queue), value)
        if tally.kind not in ("sent", "dead_lettered"):  # a sender is no worker: the exporter zeroes only workers' series
            labelled.add((tally.name, tally.hostname, tally.queue))
    for labels in labelled:
        series.show_worker_counters(*labels)
    for (kind, labels), (buckets, total) in histograms.items():
        series.set_histogram(_HISTOGRAM_SPECS[kind], labels, buckets, total[0])
    # Every retried attempt is followed by one more start; until it comes, the task waits.
    retrying = {key: max(0, c["retried"] - (c["started"] - c["started_first"])) for key, c in per_type.items()}
    return Tallied(series, dict(per_type), retrying, tallies.parse_samples(samples))
