"""The one configuration schema (test-config.yml), validated once at load time.

Every error names the file, the line and the field, because the YAML is written by hand and a
typo that passed silently would run a different test than the one the user meant.
"""

from __future__ import annotations

import logging
import os
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from conveyor.errors import ConfigError, UsageError
from conveyor.settings import callables
from conveyor.settings.environment import CONFIG_ENV

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "test-config.yml"
CODE_DIR_ENV = "CONVEYOR_CODE_DIR"  # where code_dir is mounted inside a worker container


class Strict(BaseModel):
    # Unknown keys are errors: a misspelt `max_retires` must not fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskParams(Strict):
    """How a simulated task behaves; every failure it produces is reproducible."""

    duration_s: float | None = Field(None, ge=0, le=3600, description="run time; the task's default when absent")
    fail_first: int = Field(0, ge=0, description="fail the first K attempts")
    fail_probability: float = Field(0.0, ge=0, le=1, description="fail each attempt with this probability")
    seed: int | None = Field(None, description="seed for fail_probability; the dispatcher adds the task's index")
    payload_bytes: int = Field(0, ge=0, le=64 * 1024 * 1024, description="size of the payload sent with the task")


class TaskSpec(Strict):
    task: str = Field(min_length=1, description="a name from task_types")
    count: int = Field(gt=0)
    params: TaskParams | None = Field(None, description="how a simulated task (task_a, task_b) behaves")
    args: list[Any] = Field(default_factory=list, description="positional arguments of every task of this entry")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of every task of this entry")
    generator: str | None = Field(None, pattern=callables.CALLABLE_PATTERN, description=(
        "package.module:function called with the task's index within this entry, returning (args, kwargs)"))
    unique_key: str | None = Field(None, min_length=1, max_length=200, description=(
        "while a task with this key is queued or running, dispatching another sends nothing; "
        "{index} becomes the task's index within this entry"))

    @model_validator(mode="after")
    def _unique_key_template(self) -> TaskSpec:
        if self.unique_key is not None:
            try:
                self.unique_key.format(index=0)
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"unique_key may use only the placeholder {{index}} ({exc!r} is not one)") from None
        if self.generator and (self.args or self.kwargs):
            raise ValueError("give either a generator or args/kwargs, not both: the generator makes both")
        if self.params is not None and (self.args or self.kwargs or self.generator):
            raise ValueError("params describe a simulated task; give them, or args/kwargs/generator, not both")
        return self

    @property
    def simulated(self) -> TaskParams:
        return self.params or TaskParams()


class TimeLimit(Strict):
    """Celery's per-task time limits. At soft_s the task gets SoftTimeLimitExceeded and is retried
    (with the retry policy) under limits retry_factor times longer; at hard_s the worker kills the
    pool process and the task is retried the same way; past its retries, either is dead-lettered.
    Enforced by the prefork pool only."""

    soft_s: float | None = Field(None, gt=0, le=24 * 3600)
    hard_s: float | None = Field(None, gt=0, le=24 * 3600)
    retry_factor: float = Field(1.5, ge=1, le=10, description="a retry after a soft timeout gets limits this much longer")

    @model_validator(mode="after")
    def _soft_below_hard(self) -> TimeLimit:
        if self.soft_s is None and self.hard_s is None:
            raise ValueError("give soft_s, hard_s or both")
        if self.soft_s is not None and self.hard_s is not None and self.soft_s >= self.hard_s:
            raise ValueError("soft_s must be less than hard_s, or the soft limit never fires")
        return self


class RetryPolicy(Strict):
    """Handed to Celery's autoretry as-is. Celery's backoff works in whole seconds (it truncates the
    factor to an int of at least 1), so the schema asks for integers rather than accept values
    Celery would silently round."""

    max_retries: int = Field(3, ge=0, le=3)
    backoff_s: int = Field(1, ge=1, le=3600)
    backoff_max_s: int = Field(60, ge=1, le=24 * 3600)
    jitter: bool = True

    @model_validator(mode="after")
    def _max_not_below_base(self) -> RetryPolicy:
        if self.backoff_max_s < self.backoff_s:
            raise ValueError("backoff_max_s must be at least backoff_s")
        return self


class ServiceConfig(Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9-]*$")
    queues: list[str] = Field(min_length=1, description="queues of the config's task types")
    concurrency: int = Field(2, ge=1, le=64)
    replicas: int = Field(1, ge=0)
    pool: Literal["prefork", "threads", "solo"] = "prefork"
    prefetch_multiplier: int = Field(1, ge=1, le=1000)
    # Autoscaler bounds: it keeps between min and max replicas, aiming at this many outstanding
    # (ready + unacknowledged) messages per replica. max_replicas defaults to limits.max_replicas.
    min_replicas: int = Field(1, ge=0)
    max_replicas: int | None = Field(None, ge=1)
    target_backlog_per_replica: int = Field(20, ge=1)
    # Worker recycling (issue 12): Celery replaces a pool process after this many tasks, or once its
    # resident memory passes this much after a task. Prefork only: other pools have no child to replace.
    max_tasks_per_child: int | None = Field(None, ge=1, description="replace a pool process after this many tasks")
    max_memory_per_child_mb: int | None = Field(None, ge=1, description="replace a pool process over this resident memory")


class Autoscale(Strict):
    interval_s: float = Field(5.0, gt=0, description="how often the autoscaler reads the queues")
    cooldown_s: float = Field(60.0, ge=0, description="how long a backlog must stay low before scaling down")


class Limits(Strict):
    max_tasks_per_run: int = Field(10_000, ge=1)
    max_replicas: int = Field(8, ge=1)
    # RabbitMQ holds whole messages in memory and on disk: big payloads belong in storage, passed by reference.
    max_payload_bytes: int = Field(1024 * 1024, ge=1, le=64 * 1024 * 1024,
                                   description="largest payload a dispatcher sends and a worker accepts")


class Broker(Strict):
    """What the broker enforces and the config must fit in (issue 12). RabbitMQ 3.10's management API
    does not report consumer_timeout, so it is given here: RabbitMQ's default unless the broker's
    rabbitmq.conf sets another (docs/reliability.md, "Fitting in the consumer timeout")."""

    consumer_timeout_s: float = Field(1800.0, gt=0, description=(
        "RabbitMQ closes a channel holding a delivery unacknowledged this long (consumer_timeout, "
        "1 800 000 ms by default); durations, hard time limits and retry countdowns must fit in it"))


class SideServices(Strict):
    """The record store, the unique-key store and the management API serve operators, not delivery: each
    is called with a short deadline and no retries, behind a circuit breaker (conveyor/breaker.py)."""

    records_timeout_s: float = Field(0.1, gt=0, le=30, description="Redis: to connect, and for each reply")
    sqlite_busy_s: float = Field(1.0, gt=0, le=60, description="SQLite: how long a write waits for another writer's lock")
    management_timeout_s: float = Field(2.0, gt=0, le=60, description="RabbitMQ management API: per request")
    retry_after_s: float = Field(10.0, gt=0, le=3600, description="a service that did not answer is asked again after this")


class DeadLetterBounds(Strict):
    """RabbitMQ's length limits on the `dead_letter` queue (conveyor/amqp/topology.py). A full queue
    refuses new dead letters rather than drop old ones: nothing is lost, and the refusal is an error
    in the worker's log while `make monitor` warns from 80 % full. Changing a bound of an existing
    queue needs the queue deleted (drained) first: RabbitMQ refuses a declare with other arguments."""

    max_length: int = Field(100_000, ge=1, le=100_000_000, description="messages the dead-letter queue holds at most")
    max_length_bytes: int = Field(1024 ** 3, ge=1024, le=1024 ** 4, description="bytes of message bodies it holds at most")
    overflow: Literal["reject-publish"] = Field("reject-publish", description=(
        "what a full queue does: refuse the new message (the only overflow mode that drops nothing)"))


class Monitoring(Strict):
    """`make monitor` (conveyor/monitor/): sample the broker and the workers every collect_interval_s,
    write the buffered samples every emit_interval_s. Reference: docs/monitoring.md."""

    collect_interval_s: float = Field(5.0, gt=0, le=3600, description="sample queues and workers this often")
    emit_interval_s: float = Field(60.0, gt=0, le=24 * 3600, description="write the buffered samples this often")
    refresh_interval_s: float = Field(1.0, gt=0, le=60, description="redraw the dashboard this often")
    prometheus_host: str = Field("127.0.0.1", min_length=1, description="the endpoint has no authentication")
    prometheus_port: int | None = Field(9808, ge=0, le=65535, description="null: no endpoint; 0: any free port")
    influx: str | None = Field(None, min_length=1, description="InfluxDB line protocol: '-' for stdout, or a file to append to")
    latency_window_tasks: int = Field(1000, ge=1, le=1_000_000, description="p50/p95 over this many latest tasks per type")
    # Celery workers send a heartbeat every 2 s; Celery itself calls a worker gone after 2 missed.
    worker_down_after_s: float = Field(10.0, ge=1, le=3600, description=(
        "a worker whose heartbeats stop is down (celery_worker_up 0) after this long"))
    # Longer than the `for: 15m` of celery-mixin's CeleryWorkerDown, so that alert fires too (the
    # exporter's own 10 min purge removes a dead worker before it can).
    worker_forget_after_s: float = Field(1800.0, ge=1, le=7 * 24 * 3600, description=(
        "...and forgotten after this long, with its host's task series (as the Celery exporter purges them)"))

    @model_validator(mode="after")
    def _emit_not_below_collect(self) -> Monitoring:
        if self.emit_interval_s < self.collect_interval_s:
            raise ValueError("emit_interval_s must be at least collect_interval_s")
        if self.worker_forget_after_s < self.worker_down_after_s:
            raise ValueError("worker_forget_after_s must be at least worker_down_after_s")
        return self


class Tuning(Strict):
    """Per-task work on the hot path beyond running the task and returning its result. Task events and
    STARTED states are off by default: `make monitor` and the Prometheus endpoint read the task tallies
    the workers keep with the records (conveyor/lifecycle/tallies.py), without a broker message per
    task; turn task_events on for Flower. Extended results and result confirms are on: a confirmed
    result is never lost. docs/performance.md measures what each costs; bench/noop.yml turns all off."""

    task_events: bool = Field(False, description=(
        "callers send task-sent and workers task-received/started/succeeded events (four messages per "
        "task; Flower needs them, make monitor does not)"))
    track_started: bool = Field(False, description="workers report a STARTED state for each task (one more result message)")
    task_log_lines: bool = Field(False, description=(
        "workers log Celery's per-task INFO lines (received, succeeded, retry); off, the worker logs at "
        "its level otherwise and failures are still logged (docs/performance.md measures the cost)"))
    result_extended: bool = Field(True, description="results also carry the task's name, arguments, worker and queue")
    result_confirms: bool = Field(True, description=(
        "workers wait for the broker's confirm of each rpc:// result before acknowledging the task; "
        "off, a broker crash in between can lose a result (never the task), docs/reliability.md"))
    fast_paths: bool = Field(True, description=(
        "use the seam's replacements of Celery/kombu/py-amqp internals (conveyor/seam); off, or "
        "CONVEYOR_FAST_PATHS=off in the environment, every one falls back to the libraries' own code"))


# --- Task types: what each task is, where it runs, how it is retried ----------------------------------
# The queues, their exchanges and dead-letter bindings (conveyor/amqp/topology.py), Celery's routes and
# the tasks the workers register (conveyor/tasks/registry.py) are all derived from this section.

SIMULATED_MODULE = "conveyor.tasks.simulated"
NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.:-]*$"
QUEUE_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"
RESERVED_QUEUES = ("dead_letter", "dlx", "celery")  # the dead-letter queue and exchange; Celery's default queue


class TaskRetry(Strict):
    """A task type's own retry policy: whatever is left out comes from the top-level `retry`."""

    retry_on: list[str] = Field(default_factory=list, description=(
        "exceptions another attempt may cure: a builtin name (TimeoutError) or package.module:Name"))
    max_retries: int | None = Field(None, ge=0, le=10)
    backoff_s: int | None = Field(None, ge=1, le=3600)
    backoff_max_s: int | None = Field(None, ge=1, le=24 * 3600)
    jitter: bool | None = None


class TaskTypeConfig(Strict):
    name: str = Field(min_length=1, max_length=200, pattern=NAME_PATTERN, description="the Celery task name")
    callable: str = Field(pattern=callables.CALLABLE_PATTERN, description="package.module:function the workers import")
    queue: str = Field(min_length=1, max_length=200, pattern=QUEUE_PATTERN)
    retry: TaskRetry = TaskRetry()
    time_limits: TimeLimit | None = None
    max_payload_bytes: int | None = Field(None, ge=1, le=64 * 1024 * 1024, description="overrides limits.max_payload_bytes")
    bind: bool = Field(False, description="pass the task itself as the first argument (Celery's bind=True)")

    @property
    def simulated(self) -> bool:
        return self.callable.partition(":")[0] == SIMULATED_MODULE


def builtin_task_types() -> list[TaskTypeConfig]:
    """task_a and task_b, for a config that declares no task_types (test-config.yml declares them the same way)."""
    return [TaskTypeConfig(name="task_a", callable=f"{SIMULATED_MODULE}:task_a", queue="queue_a"),
            TaskTypeConfig(name="task_b", callable=f"{SIMULATED_MODULE}:task_b", queue="queue_b")]


class ResolvedCode:
    """The functions, retryable exceptions and argument generators a config names, imported."""

    def __init__(self) -> None:
        self.functions: dict[str, Any] = {}
        self.retry_on: dict[str, tuple[type[BaseException], ...]] = {}
        self.generators: dict[int, Any] = {}  # index of the dispatch entry -> generator


def _task_types_problems(config: Config) -> list[tuple[tuple[Any, ...], str]]:
    found: list[tuple[tuple[Any, ...], str]] = []
    seen: dict[str, int] = {}
    for i, kind in enumerate(config.task_types):
        if kind.name in seen:
            found.append((("task_types", i, "name"), f"task type {kind.name!r} is declared twice "
                          f"(first as task_types[{seen[kind.name]}]); give each its own name"))
        seen.setdefault(kind.name, i)
        if kind.name == "celery" or kind.name.startswith("celery."):
            found.append((("task_types", i, "name"), f"{kind.name!r} collides with Celery's own task names "
                          "(celery.*); choose another name"))
        if kind.queue in RESERVED_QUEUES:
            found.append((("task_types", i, "queue"), f"{kind.queue!r} is reserved (the dead-letter queue and "
                          "exchange, Celery's default queue); choose another queue"))
        if kind.time_limits and kind.name in config.time_limits:
            found.append((("task_types", i, "time_limits"), f"time limits for {kind.name} are also given in "
                          "time_limits; keep one of the two"))
    queues = set(config.queues)
    for i, svc in enumerate(config.services):
        for j, queue in enumerate(svc.queues):
            if queue not in queues:
                found.append((("services", i, "queues", j), f"no task type goes to {queue!r}; "
                              f"the task types' queues are {', '.join(config.queues)}"))
    for queue in config.weights:
        if queue not in queues:
            found.append((("weights", queue), f"no task type goes to {queue!r}; the queues are {', '.join(config.queues)}"))
    for name in config.time_limits:
        if name not in seen:
            found.append((("time_limits", name), f"no task type is named {name!r}"))
    if config.code_requirements and config.code_dir is None:
        found.append((("code_requirements",), "give code_dir too: the requirements file is looked for there"))
    for i, spec in enumerate(config.tasks):
        kind = config.types.get(spec.task)
        if kind is None:
            found.append((("tasks", i, "task"), f"no task type is named {spec.task!r}; "
                          f"task_types declares {', '.join(config.types)}"))
        elif spec.params is not None and not kind.simulated:
            found.append((("tasks", i, "params"), f"params describe the simulated task types; give {spec.task} "
                          "args, kwargs or a generator"))
    return found


def _task_types_warnings(config: Config) -> list[tuple[tuple[Any, ...], str]]:
    served = {q for s in config.services for q in s.queues}
    warned: set[str] = set()
    found = []
    for i, kind in enumerate(config.task_types):
        if kind.queue not in served and kind.queue not in warned:
            warned.add(kind.queue)
            found.append((("task_types", i, "queue"), f"no service consumes queue {kind.queue!r}: "
                          f"{kind.name} tasks sent there would wait until one does"))
    return found


def _resolve_code(config: Config) -> tuple[ResolvedCode, list[tuple[tuple[Any, ...], str]]]:
    """Import what the config names, with code_dir on the path; every problem with the field to blame."""
    callables.add_to_path(config.code_path)
    code, found = ResolvedCode(), []
    if config.code_requirements and not os.environ.get(CODE_DIR_ENV) and \
            not (config.code_path / config.code_requirements).is_file():
        found.append((("code_requirements",), f"there is no file {config.code_requirements} in code_dir ({config.code_path})"))
    for i, kind in enumerate(config.task_types):
        try:
            code.functions[kind.name] = callables.function(kind.callable)
        except callables.LookupProblem as exc:
            found.append((("task_types", i, "callable"), str(exc)))
        classes = []
        for j, name in enumerate(kind.retry.retry_on):
            try:
                classes.append(callables.exception(name))
            except callables.LookupProblem as exc:
                found.append((("task_types", i, "retry", "retry_on", j), str(exc)))
        code.retry_on[kind.name] = tuple(classes)
    for i, spec in enumerate(config.tasks):
        if spec.generator:
            try:
                code.generators[i] = callables.function(spec.generator)
            except callables.LookupProblem as exc:
                found.append((("tasks", i, "generator"), str(exc)))
    return code, found


class Config(Strict):
    name: str = Field(min_length=1)
    expected_workers: int = Field(ge=0)
    tasks: list[TaskSpec] = Field(min_length=1)
    retry: RetryPolicy = RetryPolicy()
    services: list[ServiceConfig] = Field(min_length=1)
    limits: Limits = Limits()
    autoscale: Autoscale = Autoscale()
    # How `scale.py rebalance` shares workers among the services: a service weighs the sum of its queues' weights.
    weights: dict[str, float] = Field(default_factory=dict)
    stop_grace_s: float = Field(30.0, gt=0, description="warm-shutdown time before a worker is killed")
    # Delivery guarantees (docs/reliability.md). Quorum queues are replicated and also survive a node's
    # disk; changing the type of an existing queue needs the queue deleted first (RabbitMQ refuses).
    queue_type: Literal["classic", "quorum"] = "classic"
    dead_letter: DeadLetterBounds = DeadLetterBounds()
    heartbeat_s: float = Field(30.0, ge=0, le=3600, description="worker-broker heartbeat; a silent peer is dropped after about twice this; 0: off")
    publish_retry_s: float = Field(30.0, ge=0, le=3600, description="how long a publish retries a broker that is away before it fails")
    confirm_timeout_s: float = Field(30.0, gt=0, le=3600, description="the longest wait for the broker's confirm of a publish")
    monitoring: Monitoring = Monitoring()
    tuning: Tuning = Tuning()
    time_limits: dict[str, TimeLimit] = Field(default_factory=dict)
    records_ttl_s: int = Field(7 * 24 * 3600, ge=60, description="task records are kept this long after their last change")
    broker: Broker = Broker()
    side_services: SideServices = SideServices()
    task_types: list[TaskTypeConfig] = Field(default_factory=builtin_task_types, min_length=1)
    code_dir: str | None = Field(None, min_length=1, description=(
        "a directory put first on the import path of the workers (and of the dispatcher), relative to this file"))
    code_requirements: str | None = Field(None, min_length=1, description=(
        "a requirements file in code_dir: compose workers then run an image built FROM ours with code_dir and "
        "these installed (deploy/user.Dockerfile) instead of mounting code_dir"))
    _source: Path | None = PrivateAttr(None)
    _code: ResolvedCode | None = PrivateAttr(None)

    @property
    def source(self) -> Path | None:
        """The file this config was loaded from, so that workers can be handed the same one."""
        return self._source

    # --- task types ------------------------------------------------------------------------
    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> Config:
        copy = super().model_copy(update=update, deep=deep)
        copy.__dict__.pop("types", None)  # the copy's own task_types may differ: `types` is built again
        return copy

    @cached_property  # the model is frozen: built once, then a plain attribute (a private one cost 5.8 us a read)
    def types(self) -> dict[str, TaskTypeConfig]:
        """Task types by name (the first of a duplicated name, which problems() reports)."""
        types: dict[str, TaskTypeConfig] = {}
        for kind in self.task_types:
            types.setdefault(kind.name, kind)
        return types

    def task_type(self, name: str) -> TaskTypeConfig:
        try:
            return self.types[name]
        except KeyError:
            raise UsageError(f"no task type is named {name!r}: the config declares {', '.join(self.types)}") from None

    @property
    def queues(self) -> tuple[str, ...]:
        """Every work queue, in the order the task types first name them."""
        return tuple(dict.fromkeys(kind.queue for kind in self.task_types))

    def retry_policy(self, name: str) -> RetryPolicy:
        overrides = self.task_type(name).retry.model_dump(exclude={"retry_on"}, exclude_none=True)
        return self.retry.model_copy(update=overrides) if overrides else self.retry

    def time_limit(self, name: str) -> TimeLimit | None:
        return self.task_type(name).time_limits or self.time_limits.get(name)

    def payload_limit(self, name: str) -> int:
        kind = self.types.get(name)
        return (kind.max_payload_bytes if kind else None) or self.limits.max_payload_bytes

    @property
    def code_path(self) -> Path | None:
        """code_dir, absolute; CONVEYOR_CODE_DIR overrides it where the code sits elsewhere (a container's mount)."""
        if os.environ.get(CODE_DIR_ENV):
            return Path(os.environ[CODE_DIR_ENV])
        if self.code_dir is None:
            return None
        base = self._source.parent if self._source else Path.cwd()
        return (base / self.code_dir).resolve()

    @property
    def code(self) -> ResolvedCode:
        """The imported functions (and exception classes, generators); imported on first use."""
        if self._code is None:
            code, found = _resolve_code(self)
            if found:
                loc, msg = found[0]
                raise ConfigError(_describe(self._source or Path("<config>"), None, loc, msg))
            self._code = code
        return self._code

    def service(self, name: str) -> ServiceConfig:
        for svc in self.services:
            if name in (svc.name, *svc.queues):
                return svc
        known = ", ".join(s.name for s in self.services)
        raise UsageError(f"unknown service {name!r}: the config defines {known}")

    def max_replicas_of(self, svc: ServiceConfig) -> int:
        return svc.max_replicas or self.limits.max_replicas

    def weight_of(self, svc: ServiceConfig) -> float:
        return sum(self.weights.get(q, 1.0) for q in svc.queues)

    def problems(self) -> list[tuple[tuple[Any, ...], str]]:
        """Checks across fields, each with the path of the field to blame."""
        found: list[tuple[tuple[Any, ...], str]] = []
        total = sum(t.count for t in self.tasks)
        if total > self.limits.max_tasks_per_run:
            found.append((("tasks",), f"{total} tasks in all is over limits.max_tasks_per_run ({self.limits.max_tasks_per_run})"))
        names: set[str] = set()
        for i, svc in enumerate(self.services):
            if svc.name in names:
                found.append((("services", i, "name"), f"service {svc.name!r} is defined twice"))
            names.add(svc.name)
            if svc.replicas > self.limits.max_replicas:
                found.append((("services", i, "replicas"), f"{svc.replicas} is over limits.max_replicas ({self.limits.max_replicas})"))
            if svc.max_replicas is not None and svc.max_replicas > self.limits.max_replicas:
                found.append((("services", i, "max_replicas"), f"{svc.max_replicas} is over limits.max_replicas ({self.limits.max_replicas})"))
            if svc.min_replicas > self.max_replicas_of(svc):
                found.append((("services", i, "min_replicas"), f"{svc.min_replicas} is over the service's max_replicas ({self.max_replicas_of(svc)})"))
        for queue, weight in self.weights.items():
            if weight <= 0:
                found.append((("weights", queue), f"weight must be more than 0, got {weight:g}"))
        found += _task_types_problems(self)
        if found:
            return found
        served = {q for s in self.services for q in s.queues}
        for i, spec in enumerate(self.tasks):
            queue = self.types[spec.task].queue
            if queue not in served:
                found.append((("tasks", i, "task"), f"{spec.task} goes to {queue}, which no service consumes"))
            limit = self.payload_limit(spec.task)
            if spec.simulated.payload_bytes > limit:
                found.append((("tasks", i, "params", "payload_bytes"), f"{spec.simulated.payload_bytes} is over "
                              f"limits.max_payload_bytes ({limit}); workers would refuse it"))
        for kind in self.task_types:
            if self.time_limit(kind.name) is None:
                continue
            for i, svc in enumerate(self.services):
                if kind.queue in svc.queues and svc.pool != "prefork":
                    found.append((("services", i, "pool"), f"time_limits.{kind.name} needs the prefork pool: "
                                  f"Celery enforces no time limit in a {svc.pool} pool"))
        found += self._consumer_timeout_problems()
        found += self._recycling_problems()
        return found

    def _consumer_timeout_problems(self) -> list[tuple[tuple[Any, ...], str]]:
        """What a worker holds unacknowledged (late acks) must be acknowledged within the broker's
        consumer timeout, or the broker closes the channel and delivers it again: a redelivery loop."""
        timeout_s = self.broker.consumer_timeout_s
        found: list[tuple[tuple[Any, ...], str]] = []

        def over(loc: tuple[Any, ...], what: str, seconds: float) -> None:
            if seconds >= timeout_s:
                found.append((loc, f"{what} ({seconds:g} s) does not fit in broker.consumer_timeout_s ({timeout_s:g} s): "
                                   "the broker would take the message back while a worker still holds it"))

        for i, spec in enumerate(self.tasks):
            if spec.params is not None and spec.params.duration_s is not None:
                over(("tasks", i, "params", "duration_s"), "the task's run time", spec.params.duration_s)
        for i, kind in enumerate(self.task_types):
            limits = kind.time_limits or self.time_limits.get(kind.name)
            if limits is None:
                continue
            # A retry after a soft timeout runs under limits retry_factor times longer, per retry.
            stretch = limits.retry_factor ** self.retry_policy(kind.name).max_retries
            field = "hard_s" if limits.hard_s is not None else "soft_s"
            loc = ("task_types", i, "time_limits", field) if kind.time_limits else ("time_limits", kind.name, field)
            over(loc, f"its time limit on the last retry ({field} x retry_factor^max_retries)",
                 (limits.hard_s or limits.soft_s) * stretch)
        # Retry countdowns need not fit: they wait in the broker (a delay queue on classic queues,
        # conveyor/tasks/base.py; Celery's native delayed delivery on quorum queues), not in a worker.
        return found

    def _recycling_problems(self) -> list[tuple[tuple[Any, ...], str]]:
        found: list[tuple[tuple[Any, ...], str]] = []
        for i, svc in enumerate(self.services):
            for field in ("max_tasks_per_child", "max_memory_per_child_mb"):
                if getattr(svc, field) is not None and svc.pool != "prefork":
                    found.append((("services", i, field), f"needs the prefork pool: a {svc.pool} pool has no "
                                  "child process to replace"))
        return found

    def warnings(self) -> list[tuple[tuple[Any, ...], str]]:
        """What is allowed but probably not meant, each with the path of the field concerned."""
        return _task_types_warnings(self)


def config_path(path: str | os.PathLike[str] | None = None) -> Path:
    return Path(path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate a config file; raise ConfigError naming file, line and field."""
    file = config_path(path)
    data, root = read_yaml(file)
    config = validate(Config, data, root, file)
    config._source = file.resolve()
    for loc, msg in config.warnings():
        log.warning("%s", _describe(file, root, loc, msg))
    code, found = _resolve_code(config)
    if found:
        loc, msg = found[0]
        raise ConfigError(_describe(file, root, loc, msg))
    config._code = code
    return config


def read_yaml(file: Path) -> tuple[Any, yaml.Node | None]:
    """Parse YAML, keeping the node tree so that errors can point at a line."""
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{file}: file not found (pass --config FILE or set {CONFIG_ENV})") from None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror}") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{file}{where}: malformed YAML: {problem}") from None
    return data, root


def validate(model: type[BaseModel], data: Any, root: yaml.Node | None, file: Path):
    if not isinstance(data, dict):
        raise ConfigError(f"{file}:1: expected a mapping of settings at the top level")
    try:
        obj = model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(_describe(file, root, err["loc"], _message(err))) from None
    problems = getattr(obj, "problems", lambda: [])()
    if problems:
        loc, msg = problems[0]
        raise ConfigError(_describe(file, root, loc, msg))
    return obj


def _message(err: dict[str, Any]) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown key (check the spelling; see the config reference in the README)"
    if err["type"] == "missing":
        return "required field is missing"
    return err["msg"].removeprefix("Value error, ")


def _describe(file: Path, root: yaml.Node | None, loc: tuple[Any, ...], msg: str) -> str:
    loc = tuple(part for part in loc if not (isinstance(part, str) and part.startswith(("function-", "literal["))))
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "(top level)"
    return f"{file}:{_line(root, loc)}: {field}: {msg}"


describe = _describe  # for the other files read through this module (scenarios)


def _line(node: yaml.Node | None, loc: tuple[Any, ...]) -> int:
    """The line of the deepest node that loc reaches: the key itself for a mapping entry, so an
    unknown key or a bad list points at its own line; a missing field points at its parent."""
    line = node.start_mark.line + 1 if node is not None else 1
    for part in loc:
        child, at = None, None
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.value == part:
                    child, at = value, key
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            child = at = node.value[part]
        if child is None:
            break
        node, line = child, at.start_mark.line + 1
    return line
