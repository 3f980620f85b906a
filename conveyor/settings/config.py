"""The one configuration schema (test-config.yml), validated once at load time.

Every error names the file, the line and the field, because the YAML is written by hand and a
typo that passed silently would run a different test than the one the user meant.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from conveyor.errors import ConfigError, UsageError
from conveyor.amqp.topology import QUEUES, TASKS

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "test-config.yml"
CONFIG_ENV = "CONVEYOR_CONFIG"


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
    task: Literal[tuple(TASKS)]  # type: ignore[valid-type]
    count: int = Field(gt=0)
    params: TaskParams = TaskParams()
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
        return self


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
    queues: list[Literal[tuple(QUEUES)]] = Field(min_length=1)  # type: ignore[valid-type]
    concurrency: int = Field(2, ge=1, le=64)
    replicas: int = Field(1, ge=0)
    pool: Literal["prefork", "threads", "solo"] = "prefork"
    prefetch_multiplier: int = Field(1, ge=1, le=1000)
    # Autoscaler bounds: it keeps between min and max replicas, aiming at this many outstanding
    # (ready + unacknowledged) messages per replica. max_replicas defaults to limits.max_replicas.
    min_replicas: int = Field(1, ge=0)
    max_replicas: int | None = Field(None, ge=1)
    target_backlog_per_replica: int = Field(20, ge=1)


class Autoscale(Strict):
    interval_s: float = Field(5.0, gt=0, description="how often the autoscaler reads the queues")
    cooldown_s: float = Field(60.0, ge=0, description="how long a backlog must stay low before scaling down")


class Limits(Strict):
    max_tasks_per_run: int = Field(10_000, ge=1)
    max_replicas: int = Field(8, ge=1)
    # RabbitMQ holds whole messages in memory and on disk: big payloads belong in storage, passed by reference.
    max_payload_bytes: int = Field(1024 * 1024, ge=1, le=64 * 1024 * 1024,
                                   description="largest payload a dispatcher sends and a worker accepts")


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

    @model_validator(mode="after")
    def _emit_not_below_collect(self) -> Monitoring:
        if self.emit_interval_s < self.collect_interval_s:
            raise ValueError("emit_interval_s must be at least collect_interval_s")
        return self


class Tuning(Strict):
    """Per-task work on the hot path beyond running the task and returning its result. All are on by
    default: `make monitor` and Flower read the events and states, and a confirmed result is never
    lost. docs/performance.md measures what each costs; bench/noop.yml turns them off."""

    task_events: bool = Field(True, description="callers send task-sent and workers task-received/started/succeeded events")
    track_started: bool = Field(True, description="workers report a STARTED state for each task (one more result message)")
    result_extended: bool = Field(True, description="results also carry the task's name, arguments, worker and queue")
    result_confirms: bool = Field(True, description=(
        "workers wait for the broker's confirm of each rpc:// result before acknowledging the task; "
        "off, a broker crash in between can lose a result (never the task), docs/reliability.md"))


class Config(Strict):
    name: str = Field(min_length=1)
    expected_workers: int = Field(ge=0)
    tasks: list[TaskSpec] = Field(min_length=1)
    retry: RetryPolicy = RetryPolicy()
    services: list[ServiceConfig] = Field(min_length=1)
    limits: Limits = Limits()
    autoscale: Autoscale = Autoscale()
    # How `scale.py rebalance` shares workers among the services: a service weighs the sum of its queues' weights.
    weights: dict[Literal[tuple(QUEUES)], float] = Field(default_factory=dict)  # type: ignore[valid-type]
    stop_grace_s: float = Field(30.0, gt=0, description="warm-shutdown time before a worker is killed")
    # Delivery guarantees (docs/reliability.md). Quorum queues are replicated and also survive a node's
    # disk; changing the type of an existing queue needs the queue deleted first (RabbitMQ refuses).
    queue_type: Literal["classic", "quorum"] = "classic"
    dead_letter: DeadLetterBounds = DeadLetterBounds()
    heartbeat_s: float = Field(30.0, ge=0, le=3600, description="worker-broker heartbeat; a silent peer is dropped after about twice this; 0: off")
    publish_retry_s: float = Field(30.0, ge=0, le=3600, description="how long a publish retries a broker that is away before it fails")
    monitoring: Monitoring = Monitoring()
    tuning: Tuning = Tuning()
    time_limits: dict[Literal[tuple(TASKS)], TimeLimit] = Field(default_factory=dict)  # type: ignore[valid-type]
    records_ttl_s: int = Field(7 * 24 * 3600, ge=60, description="task records are kept this long after their last change")
    _source: Path | None = PrivateAttr(None)

    @property
    def source(self) -> Path | None:
        """The file this config was loaded from, so that workers can be handed the same one."""
        return self._source

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
        served = {q for s in self.services for q in s.queues}
        for i, spec in enumerate(self.tasks):
            queue = TASKS[spec.task].queue
            if queue not in served:
                found.append((("tasks", i, "task"), f"{spec.task} goes to {queue}, which no service consumes"))
            if spec.params.payload_bytes > self.limits.max_payload_bytes:
                found.append((("tasks", i, "params", "payload_bytes"), f"{spec.params.payload_bytes} is over "
                              f"limits.max_payload_bytes ({self.limits.max_payload_bytes}); workers would refuse it"))
        for task in self.time_limits:
            for i, svc in enumerate(self.services):
                if TASKS[task].queue in svc.queues and svc.pool != "prefork":
                    found.append((("services", i, "pool"), f"time_limits.{task} needs the prefork pool: "
                                  f"Celery enforces no time limit in a {svc.pool} pool"))
        return found


def config_path(path: str | os.PathLike[str] | None = None) -> Path:
    return Path(path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate a config file; raise ConfigError naming file, line and field."""
    file = config_path(path)
    data, root = read_yaml(file)
    config = validate(Config, data, root, file)
    config._source = file.resolve()
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
