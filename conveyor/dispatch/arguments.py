"""The arguments of each task a config's dispatch entry (`tasks[]`) sends.

An entry gives them one of three ways: `params` for the simulated task types (their keyword
arguments, with a distinct failure seed per task), fixed `args`/`kwargs`, or a `generator`, the
user's `package.module:function(index) -> (args, kwargs)`, called once per task with its index
within the entry. Shared by the dispatcher and the chaos run.
"""

from __future__ import annotations

import json
from typing import Any

from conveyor.errors import ConfigError
from conveyor.settings.config import Config, TaskSpec


def entry_arguments(config: Config, entry: int, index: int) -> tuple[list[Any], dict[str, Any]]:
    """(args, kwargs) of task `index` of dispatch entry `entry`."""
    spec = config.tasks[entry]
    if spec.generator:
        return generated(config, entry, spec, index)
    if spec.args or spec.kwargs or not config.task_type(spec.task).simulated:
        return list(spec.args), dict(spec.kwargs)
    return [], task_kwargs(spec, index)


def task_kwargs(spec: TaskSpec, index: int) -> dict[str, Any]:
    """A simulated task's keyword arguments; a seeded random failure gets a distinct seed per task."""
    params = spec.simulated
    kwargs: dict[str, Any] = {}
    if params.duration_s is not None:
        kwargs["duration_s"] = params.duration_s
    if params.fail_first:
        kwargs["fail_first"] = params.fail_first
    if params.fail_probability:
        kwargs["fail_probability"] = params.fail_probability
        kwargs["seed"] = (params.seed or 0) + index
    if params.payload_bytes:
        kwargs["payload"] = "x" * params.payload_bytes
    return kwargs


def generated(config: Config, entry: int, spec: TaskSpec, index: int) -> tuple[list[Any], dict[str, Any]]:
    where = f"{config.source or 'the config'}: tasks[{entry}].generator"
    try:
        made = config.code.generators[entry](index)
    except Exception as exc:  # the user's generator failed: say which and with what, in one line
        raise ConfigError(f"{where}: {spec.generator}({index}) raised {type(exc).__name__}: {exc}") from None
    if not (isinstance(made, (tuple, list)) and len(made) == 2 and isinstance(made[0], (list, tuple))
            and isinstance(made[1], dict)):
        raise ConfigError(f"{where}: {spec.generator}({index}) returned {made!r:.80}; it must return (args, kwargs), "
                          "a list and a dict")
    args, kwargs = list(made[0]), dict(made[1])
    try:
        json.dumps([args, kwargs])
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {spec.generator}({index}) returned arguments that are not JSON ({exc}); "
                          "tasks travel as JSON") from None
    return args, kwargs
