"""Sharing N worker replicas among the services by their queues' weights.

Every service keeps at least one replica; the rest follow the weights by the largest-remainder
method, so the shares always add up to exactly N. Applying a split only touches the services whose
count changes: the local stack stops its newest replicas first and compose is run with
--no-recreate, so workers of an unaffected service keep running undisturbed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from pathlib import Path

from pydantic import Field, create_model

from conveyor.settings.config import Config, Strict, load_config, read_yaml, validate
from conveyor.errors import UsageError
from conveyor.stack.base import Stack

log = logging.getLogger(__name__)

def load_weights(path: str | Path, queues: Iterable[str] | None = None) -> dict[str, float]:
    """A weights file: `queue_a: 3` and `queue_b: 1`, one key per queue of the config (default: the
    default config's); a queue left out weighs 1."""
    names = tuple(queues) if queues is not None else load_config().queues
    weights_file = create_model("WeightsFile", __base__=Strict, **{q: (float, Field(1.0, gt=0)) for q in names})
    file = Path(path)
    data, root = read_yaml(file)
    return validate(weights_file, data, root, file).model_dump()


def split(weights: dict[str, float], total: int) -> dict[str, int]:
    """Replicas per service for `weights` (service -> weight) adding up to `total`, at least 1 each."""
    names = sorted(weights)
    if total < len(names):
        raise UsageError(f"{total} workers cannot give each of the {len(names)} services one; ask for at least {len(names)}")
    spare = total - len(names)
    whole = sum(weights.values())
    ideal = {n: spare * weights[n] / whole for n in names}
    shares = {n: 1 + math.floor(ideal[n]) for n in names}
    # Hand what rounding left over to the largest remainders (ties: by name, to stay deterministic).
    left = total - sum(shares.values())
    for name in sorted(names, key=lambda n: (-(ideal[n] - math.floor(ideal[n])), n))[:left]:
        shares[name] += 1
    return shares


def plan(config: Config, total: int, queue_weights: dict[str, float] | None = None) -> dict[str, int]:
    if queue_weights is not None:
        config = config.model_copy(update={"weights": queue_weights})
    shares = split({s.name: config.weight_of(s) for s in config.services}, total)
    for svc in config.services:
        if shares[svc.name] > config.max_replicas_of(svc):
            raise UsageError(f"the weights give {svc.name} {shares[svc.name]} replicas, over its maximum of "
                             f"{config.max_replicas_of(svc)}; ask for fewer workers or change the weights")
    return shares


def apply(stack: Stack, shares: dict[str, int]) -> dict[str, tuple[int, int]]:
    """Scale only the services whose count changes; return service -> (before, after)."""
    before = stack.running()
    changes = {name: (before.get(name, 0), count) for name, count in shares.items() if before.get(name, 0) != count}
    # Shrink first, so that a fixed total never runs over it while replicas move between services.
    ordered = sorted(changes.items(), key=lambda item: item[1][1] - item[1][0])
    for name, (old, new) in ordered:
        log.info("Rebalance: %s from %d to %d replica(s).", name, old, new)
    stack.scale_to({name: new for name, (_, new) in ordered})
    return changes
