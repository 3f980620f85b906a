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
      - task: count_words           # any task type of the config: its arguments, fixed or generated
        generator: wordcount.jobs:count_args   # package.module:function(index) -> (args, kwargs)
        # or: args: [...], kwargs: {...}

runtime_s, error_rate and payload_bytes describe the simulated task types (task_a, task_b); a user's
task type takes args/kwargs or a generator instead. In a pipeline, a later stage gets the previous
stage's result as its first argument, before its own args.

Errors name the file, the line and the field, through the same reader as the main config.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, PrivateAttr, model_validator

from conveyor.errors import ConfigError, UsageError
from conveyor.settings import callables
from conveyor.settings.config import Config, Strict, TaskTypeConfig, builtin_task_types, describe, read_yaml, validate
from conveyor.tasks.simulated import SIMULATED


class Work(Strict):
    """One task of the mix, or one stage of a pipeline."""

    task: str = Field(min_length=1, description="a task type of the config")
    runtime_s: float | tuple[float, float] | None = Field(None, description="the task's default when absent")
    error_rate: float = Field(0.0, ge=0, le=1, description="probability that an attempt fails (and is retried)")
    payload_bytes: int = Field(0, ge=0, le=16 * 1024 * 1024)
    args: list[Any] = Field(default_factory=list, description="a user task's positional arguments")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="a user task's keyword arguments")
    generator: str | None = Field(None, pattern=callables.CALLABLE_PATTERN,
                                  description="package.module:function(index) -> (args, kwargs) for a user task")

    @model_validator(mode="after")
    def _runtime_range(self) -> Work:
        low, high = self.runtime_range or (0.0, 0.0)
        if low < 0 or high > 3600:
            raise ValueError("runtime_s must be between 0 and 3600")
        if low > high:
            raise ValueError("runtime_s: the first value of the range must not be above the second")
        if self.generator and (self.args or self.kwargs):
            raise ValueError("give either a generator or args/kwargs, not both: the generator makes both")
        return self

    @property
    def runtime_range(self) -> tuple[float, float] | None:
        """None: the simulated type's own default (Scenario.default_duration_s)."""
        if self.runtime_s is None:
            return None
        if isinstance(self.runtime_s, tuple):
            return self.runtime_s
        return self.runtime_s, self.runtime_s

    @property
    def simulating(self) -> bool:
        """Whether the entry says how a simulated task behaves."""
        return self.runtime_s is not None or bool(self.error_rate or self.payload_bytes)


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
                     payload_bytes=self.payload_bytes, args=self.args, kwargs=self.kwargs,
                     generator=self.generator), *self.stages]


class Scenario(Strict):
    name: str = Field(min_length=1)
    description: str = ""
    rate_per_s: float | None = Field(None, gt=0, le=1_000_000, description="open-loop rate; absent: closed loop")
    max_queue_depth: int = Field(10_000, ge=1, description="pause sending while a queue holds more ready messages")
    batch_size: int = Field(200, ge=1, le=10_000, description="messages published between two waits for confirms")
    seed: int = 0
    mix: list[TaskType] = Field(min_length=1)
    # The config's task types (bind); task_a and task_b until a config is bound.
    _types: dict[str, TaskTypeConfig] = PrivateAttr(default_factory=lambda: {t.name: t for t in builtin_task_types()})
    _generators: dict[tuple[int, int], Any] = PrivateAttr(default_factory=dict)  # (entry, stage) -> generator

    def problems(self) -> list[tuple[tuple[Any, ...], str]]:
        found: list[tuple[tuple[Any, ...], str]] = []
        seen: set[str] = set()
        for i, entry in enumerate(self.mix):
            if entry.label in seen:
                found.append((("mix", i, "name" if entry.name else "task"),
                              f"task type {entry.label!r} appears twice; give each entry its own name"))
            seen.add(entry.label)
        return found

    def bind(self, config: Config) -> list[tuple[tuple[Any, ...], str]]:
        """Check the mix against the config's task types and import its generators (with the
        config's code_dir on the path); returns the problems, each with the field to blame."""
        self._types = config.types
        callables.add_to_path(config.code_path)
        found: list[tuple[tuple[Any, ...], str]] = []
        self._generators = {}
        for i, entry in enumerate(self.mix):
            for stage, work in enumerate(entry.steps):
                where = ("mix", i) if stage == 0 else ("mix", i, "stages", stage - 1)
                kind = self._types.get(work.task)
                if kind is None:
                    found.append(((*where, "task"), f"no task type is named {work.task!r}; the config "
                                  f"declares {', '.join(self._types)}"))
                    continue
                if not kind.simulated and work.simulating:
                    found.append(((*where, "runtime_s" if work.runtime_s is not None else "error_rate"),
                                  f"runtime_s, error_rate and payload_bytes describe the simulated task types; "
                                  f"give {work.task} args, kwargs or a generator"))
                if work.generator:
                    try:
                        self._generators[(i, stage)] = callables.function(work.generator)
                    except callables.LookupProblem as exc:
                        found.append(((*where, "generator"), str(exc)))
        return found

    def default_duration_s(self, task: str) -> float:
        """How long a simulated type works unless told (task_a 0.1 s, task_b 0.2 s, whatever its name)."""
        return SIMULATED[self._types[task].callable.partition(":")[2]].default_duration_s

    def queue_of(self, task: str) -> str:
        return self._types[task].queue

    def simulated(self, task: str) -> bool:
        return self._types[task].simulated

    @property
    def queues(self) -> list[str]:
        return list(dict.fromkeys(self.queue_of(step.task) for entry in self.mix for step in entry.steps))


def check_limits(scenario: Scenario, config: Config) -> None:
    """Refuse, before anything is sent, a payload the workers would refuse: checked here, it is never
    stored in a queue at all (the task type's max_payload_bytes, else limits.max_payload_bytes, as
    the dispatcher checks it)."""
    for entry in scenario.mix:
        for step in entry.steps:
            limit = config.payload_limit(step.task)
            if step.payload_bytes > limit:
                raise UsageError(f"task type {entry.label!r}: payload_bytes {step.payload_bytes} is over "
                                 f"limits.max_payload_bytes ({limit}) of {config.source}; workers would refuse it")


def load_scenario(path: str | os.PathLike[str], config: Config | None = None) -> Scenario:
    """Read and validate a scenario file against the config's task types (default: task_a and
    task_b); raise ConfigError naming the file, the line and the field."""
    file = Path(path)
    data, root = read_yaml(file)
    scenario = validate(Scenario, data, root, file)
    found = scenario.bind(config) if config is not None else []
    if found:
        raise ConfigError(describe(file, root, *found[0]))
    return scenario


@dataclass(frozen=True)
class Job:
    """One unit the load tester sends: a task, or a pipeline of stages (each a task's kwargs)."""

    index: int
    type: str
    steps: tuple[tuple[str, dict[str, Any], tuple[Any, ...]], ...]  # (task name, kwargs, args) per stage


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
        return cls.of_total(scenario, tasks_per_type * len(scenario.mix))

    @classmethod
    def of_total(cls, scenario: Scenario, total: int) -> Plan:
        """`total` jobs in all, shared out by the entries' weights (largest remainders)."""
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
            if not self.scenario.simulated(work.task):
                args, kwargs = self._arguments(entry, stage, work, index)
                steps.append((work.task, kwargs, args))
                continue
            low, high = work.runtime_range or (self.scenario.default_duration_s(work.task),) * 2
            kwargs = {"duration_s": round(self._rng.uniform(low, high), 6) if high > low else low}
            if work.error_rate:
                kwargs["fail_probability"] = work.error_rate
                kwargs["seed"] = self.scenario.seed * 1_000_003 + index * 31 + stage
            if work.payload_bytes:
                kwargs["payload"] = self._payload(work.payload_bytes)
            kwargs.update(work.kwargs)
            steps.append((work.task, kwargs, tuple(work.args)))
        return Job(index, entry.label, tuple(steps))

    def _arguments(self, entry: TaskType, stage: int, work: Work, index: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """A user task's (args, kwargs): fixed, or from its generator called with the job's index."""
        if not work.generator:
            return tuple(work.args), dict(work.kwargs)
        made = self.scenario._generators[(self.scenario.mix.index(entry), stage)](index)
        if not (isinstance(made, (tuple, list)) and len(made) == 2 and isinstance(made[1], dict)):
            raise ConfigError(f"scenario {self.scenario.name!r}: {work.generator}({index}) returned {made!r:.80}; "
                              "it must return (args, kwargs), a list and a dict")
        return tuple(made[0]), dict(made[1])

    def _payload(self, size: int) -> str:
        if size not in self._payloads:
            self._payloads[size] = "x" * size
        return self._payloads[size]
