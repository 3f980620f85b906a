"""A load-test scenario (scenarios/*.yml): which task types to send, in what mix, and how they behave.

    name: pipeline
    rate_per_s: 40                  # open-loop target rate; absent: as fast as the stack takes them
    max_queue_depth: 2000           # backpressure: pause sending while a queue holds more than this
    mix:
      - name: pipeline              # how the report calls this task type (default: the task's name)
        task: task_a                # the first stage
        weight: 1                   # share of the volume, relative to the other entries
        runtime_s: [0.01, 0.03]     # a range drawn from uniformly per task, or one number
        error_rate: 0.1             # each attempt fails with this probability (then Celery retries it)
        payload_bytes: 256
        stages:                     # optional: each stage gets the previous one's result (a Celery chain)
          - {task: task_b, runtime_s: [0.01, 0.03], error_rate: 0.1}

Errors name the file, the line and the field, through the same reader as the main config.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from conveyor.errors import UsageError
from conveyor.settings.config import Strict, read_yaml, validate
from conveyor.amqp.topology import TASKS


class Work(Strict):
    """One task of the mix, or one stage of a pipeline."""

    task: Literal[tuple(TASKS)]  # type: ignore[valid-type]
    runtime_s: float | tuple[float, float] | None = Field(None, description="the task's default when absent")
    error_rate: float = Field(0.0, ge=0, le=1, description="probability that an attempt fails (and is retried)")
    payload_bytes: int = Field(0, ge=0, le=16 * 1024 * 1024)

    @model_validator(mode="after")
    def _runtime_range(self) -> Work:
        low, high = self.runtime_range
        if low < 0 or high > 3600:
            raise ValueError("runtime_s must be between 0 and 3600")
        if low > high:
            raise ValueError("runtime_s: the first value of the range must not be above the second")
        return self

    @property
    def runtime_range(self) -> tuple[float, float]:
        if self.runtime_s is None:
            default = TASKS[self.task].default_duration_s
            return default, default
        if isinstance(self.runtime_s, tuple):
            return self.runtime_s
        return self.runtime_s, self.runtime_s

    @property
    def queue(self) -> str:
        return TASKS[self.task].queue


class TaskType(Work):
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$", description="the report's name for it")
    weight: float = Field(1.0, gt=0, description="share of the volume relative to the other entries")
    stages: list[Work] = Field(default_factory=list, max_length=20)

    @property
    def label(self) -> str:
        return self.name or self.task

    @property
    def steps(self) -> list[Work]:
        """Every stage in order, the entry's own task first."""
        return [Work(task=self.task, runtime_s=self.runtime_s, error_rate=self.error_rate,
                     payload_bytes=self.payload_bytes), *self.stages]


class Scenario(Strict):
    name: str = Field(min_length=1)
    description: str = ""
    rate_per_s: float | None = Field(None, gt=0, le=1_000_000, description="open-loop rate; absent: closed loop")
    max_queue_depth: int = Field(10_000, ge=1, description="pause sending while a queue holds more ready messages")
    batch_size: int = Field(200, ge=1, le=10_000, description="messages published between two waits for confirms")
    seed: int = 0
    mix: list[TaskType] = Field(min_length=1)

    def problems(self) -> list[tuple[tuple[Any, ...], str]]:
        found: list[tuple[tuple[Any, ...], str]] = []
        seen: set[str] = set()
        for i, entry in enumerate(self.mix):
            if entry.label in seen:
                found.append((("mix", i, "name" if entry.name else "task"),
                              f"task type {entry.label!r} appears twice; give each entry its own name"))
            seen.add(entry.label)
        return found

    @property
    def queues(self) -> list[str]:
        return list(dict.fromkeys(step.queue for entry in self.mix for step in entry.steps))


def check_limits(scenario: Scenario, max_payload_bytes: int, source: str) -> None:
    """Refuse, before anything is sent, a payload the workers would refuse: checked here, it is never
    stored in a queue at all (the config's limits.max_payload_bytes, as the dispatcher checks it)."""
    for entry in scenario.mix:
        for step in entry.steps:
            if step.payload_bytes > max_payload_bytes:
                raise UsageError(f"task type {entry.label!r}: payload_bytes {step.payload_bytes} is over "
                                 f"limits.max_payload_bytes ({max_payload_bytes}) of {source}; workers would refuse it")


def load_scenario(path: str | os.PathLike[str]) -> Scenario:
    """Read and validate a scenario file; raise ConfigError naming the file, line and field."""
    file = Path(path)
    data, root = read_yaml(file)
    return validate(Scenario, data, root, file)


@dataclass(frozen=True)
class Job:
    """One unit the load tester sends: a task, or a pipeline of stages (each a task's kwargs)."""

    index: int
    type: str
    steps: tuple[tuple[str, dict[str, Any]], ...]  # (task name, kwargs) per stage


class Plan:
    """The jobs of a run, in a smooth weighted interleaving (never all of one type first), with
    reproducible runtimes and failure seeds. `counts` fixes how many of each type; None: endless."""

    def __init__(self, scenario: Scenario, counts: dict[str, int] | None) -> None:
        self.scenario = scenario
        self.counts = counts
        self._rng = random.Random(scenario.seed)
        self._payloads: dict[int, str] = {}
        self._steps = {e.label: e.steps for e in scenario.mix}

    @classmethod
    def per_type(cls, scenario: Scenario, tasks_per_type: int) -> Plan:
        """tasks_per_type x the number of types in all, shared out by weight (equal weights: that many each)."""
        total = tasks_per_type * len(scenario.mix)
        weight = sum(e.weight for e in scenario.mix)
        shares = [total * e.weight / weight for e in scenario.mix]
        counts = [int(s) for s in shares]
        # Hand the remainder to the largest fractions, so that the counts add up to the total.
        for i in sorted(range(len(shares)), key=lambda i: counts[i] - shares[i])[: total - sum(counts)]:
            counts[i] += 1
        return cls(scenario, {e.label: c for e, c in zip(scenario.mix, counts)})

    @property
    def total(self) -> int | None:
        return None if self.counts is None else sum(self.counts.values())

    def __iter__(self) -> Iterator[Job]:
        mix = self.scenario.mix
        weight = {e.label: (self.counts[e.label] if self.counts is not None else e.weight) for e in mix}
        left = dict(self.counts) if self.counts is not None else None
        credit = {e.label: 0.0 for e in mix}
        total_weight = sum(weight.values())
        index = 0
        while left is None or any(left.values()):
            # Smooth weighted round robin: every type earns credit by its weight; the richest goes next.
            for e in mix:
                if left is None or left[e.label]:
                    credit[e.label] += weight[e.label]
            entry = max((e for e in mix if left is None or left[e.label]), key=lambda e: credit[e.label])
            credit[entry.label] -= total_weight
            if left is not None:
                left[entry.label] -= 1
            yield self._job(index, entry)
            index += 1

    def _job(self, index: int, entry: TaskType) -> Job:
        steps = []
        for stage, work in enumerate(self._steps[entry.label]):
            low, high = work.runtime_range
            kwargs: dict[str, Any] = {"duration_s": round(self._rng.uniform(low, high), 6) if high > low else low}
            if work.error_rate:
                kwargs["fail_probability"] = work.error_rate
                kwargs["seed"] = self.scenario.seed * 1_000_003 + index * 31 + stage
            if work.payload_bytes:
                kwargs["payload"] = self._payload(work.payload_bytes)
            steps.append((work.task, kwargs))
        return Job(index, entry.label, tuple(steps))

    def _payload(self, size: int) -> str:
        if size not in self._payloads:
            self._payloads[size] = "x" * size
        return self._payloads[size]
