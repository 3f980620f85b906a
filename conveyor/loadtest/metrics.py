"""What a load-test run measured, per job and in summary: counts, throughput, latency percentiles.

Times are wall-clock seconds (time.time()) on the caller and on the workers alike, so that the time a
task waited in its queue (the worker's start minus the caller's send) can be told from the time it
ran; that holds for workers on this host or in containers sharing its clock.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


from conveyor.stats import percentile_linear
from conveyor.tasks.states import TaskState



@dataclass
class Stage:
    """One task of a job: what its result said."""

    task: str
    id: str
    state: TaskState = TaskState.PENDING
    started_at: float | None = None
    execution_s: float | None = None
    received_at: float | None = None
    retries: int = 0
    worker: str | None = None
    error: str | None = None

    @property
    def ended_at(self) -> float | None:
        if self.started_at is None or self.execution_s is None:
            return None
        return self.started_at + self.execution_s


@dataclass
class Record:
    """One job: a task, or a pipeline of stages whose outcome is that of the first stage that
    failed, or else of the last one."""

    index: int
    type: str
    sent_at: float
    stages: list[Stage]

    @property
    def outcome(self) -> Stage:
        for stage in self.stages:
            if stage.state not in (TaskState.SUCCEEDED, TaskState.PENDING):
                return stage
        return self.stages[-1]

    @property
    def state(self) -> str:
        return self.outcome.state

    @property
    def done(self) -> bool:
        return self.state != TaskState.PENDING

    @property
    def received_at(self) -> float | None:
        return self.outcome.received_at

    @property
    def latency_s(self) -> float | None:
        """From the send to the final result in the caller's hands."""
        return None if self.received_at is None else self.received_at - self.sent_at

    @property
    def execution_s(self) -> float | None:
        if self.state != TaskState.SUCCEEDED or any(s.execution_s is None for s in self.stages):
            return None
        return sum(s.execution_s for s in self.stages)

    @property
    def wait_s(self) -> float | None:
        """Time spent queued: before each stage's (final) attempt began, since the previous stage
        ended (or, for the first, since the send). Retries' back-off is part of it."""
        if self.state != TaskState.SUCCEEDED:
            return None
        total, previous_end = 0.0, self.sent_at
        for stage in self.stages:
            if stage.started_at is None or stage.ended_at is None:
                return None
            total += max(0.0, stage.started_at - previous_end)
            previous_end = stage.ended_at
        return total

    @property
    def retries(self) -> int:
        return sum(s.retries for s in self.stages)

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index, "type": self.type, "state": self.state, "sent_at": self.sent_at,
            "received_at": self.received_at, "latency_s": self.latency_s, "wait_s": self.wait_s,
            "execution_s": self.execution_s, "retries": self.retries, "error": self.outcome.error,
            "stages": [vars(s) for s in self.stages],
        }


def distribution(values: Iterable[float | None]) -> dict[str, float | int | None]:
    data = sorted(v for v in values if v is not None)
    return {
        "count": len(data),
        "mean": sum(data) / len(data) if data else None,
        "p50": percentile_linear(data, 50),
        "p95": percentile_linear(data, 95),
        "p99": percentile_linear(data, 99),
        "max": data[-1] if data else None,
    }


@dataclass
class RunStats:
    """Facts about the run that are not in the records."""

    planned: int | None
    started_at: float
    ended_at: float
    timed_out: bool
    not_sent: int = 0
    refused: int = 0
    backpressure_s: float = 0.0
    send_s: float = 0.0  # time spent publishing and awaiting confirms
    send_cpu_s: float = 0.0  # of which on the CPU of this process
    rate_per_s: float | None = None
    concurrency: int = 0
    queues: dict[str, int] = field(default_factory=dict)  # ready messages per queue at the end


def summarize(records: list[Record], run: RunStats) -> dict[str, Any]:
    window = _window(records)
    by_type: dict[str, Any] = {}
    for name in dict.fromkeys(r.type for r in records):
        mine = [r for r in records if r.type == name]
        by_type[name] = _section(mine, window)
        if len(mine[0].stages) > 1:
            by_type[name]["stages"] = [
                {"task": mine[0].stages[i].task, "succeeded": sum(r.stages[i].state == TaskState.SUCCEEDED for r in mine),
                 "retried": sum(r.stages[i].retries > 0 for r in mine),
                 "dead_lettered": sum(r.stages[i].state == TaskState.DEAD_LETTERED for r in mine),
                 "execution_s": distribution(r.stages[i].execution_s for r in mine)}
                for i in range(len(mine[0].stages))
            ]
    workers = Counter(s.worker for r in records for s in r.stages if s.worker)
    sent = len(records)
    return {
        "planned": run.planned,
        **_section(records, window),  # the counts, throughput and distributions, as for each type
        "not_sent": run.not_sent,
        "refused_by_broker": run.refused,
        "retries": sum(r.retries for r in records),
        "timed_out": run.timed_out,
        "duration_s": run.ended_at - run.started_at,
        "window_s": window,
        "target_rate_per_s": run.rate_per_s,
        "send_rate_per_s": _send_rate(records),
        "concurrency": run.concurrency,
        "types": by_type,
        "workers": len(workers),
        "tasks_per_worker": dict(sorted(workers.items())),
        "backpressure_wait_s": run.backpressure_s,
        "sender": {"busy_s": run.send_s, "cpu_s": run.send_cpu_s,
                   "per_task_ms": 1000 * run.send_s / sent if sent else None,
                   "cpu_per_task_ms": 1000 * run.send_cpu_s / sent if sent else None},
        "queues_at_end": run.queues,
    }


def _section(records: list[Record], window: float) -> dict[str, Any]:
    done = [r for r in records if r.done]
    counts = Counter(r.state for r in records)
    return {
        "sent": len(records),
        "succeeded": counts[TaskState.SUCCEEDED],
        "failed": len(records) - counts[TaskState.SUCCEEDED] - counts[TaskState.DEAD_LETTERED] - counts[TaskState.PENDING],
        "dead_lettered": counts[TaskState.DEAD_LETTERED],
        "pending": counts[TaskState.PENDING],
        "retried": sum(r.retries > 0 for r in records),
        "throughput_per_s": len(done) / window if window else 0.0,
        "latency_s": distribution(r.latency_s for r in done),
        "wait_s": distribution(r.wait_s for r in done),
        "execution_s": distribution(r.execution_s for r in done),
    }


def _send_rate(records: list[Record]) -> float | None:
    if len(records) < 2:
        return None
    span = max(r.sent_at for r in records) - min(r.sent_at for r in records)
    return (len(records) - 1) / span if span > 0 else None


def _window(records: list[Record]) -> float:
    """From the first send to the last result: the span over which throughput is measured."""
    received = [r.received_at for r in records if r.received_at is not None]
    if not records or not received:
        return 0.0
    return max(received) - min(r.sent_at for r in records)


def timeline(records: list[Record], bucket_s: float = 1.0) -> dict[str, list]:
    """Per bucket since the first send: jobs sent, and jobs finished (succeeded / not)."""
    if not records:
        return {"t": [], "sent": [], "succeeded": [], "failed": []}
    start = min(r.sent_at for r in records)
    last = max([r.sent_at for r in records] + [r.received_at for r in records if r.received_at])
    n = int((last - start) / bucket_s) + 1
    sent, ok, bad = [0] * n, [0] * n, [0] * n
    for r in records:
        sent[int((r.sent_at - start) / bucket_s)] += 1
        if r.received_at is not None:
            (ok if r.state == TaskState.SUCCEEDED else bad)[int((r.received_at - start) / bucket_s)] += 1
    return {"t": [i * bucket_s for i in range(n)], "sent": sent, "succeeded": ok, "failed": bad}
