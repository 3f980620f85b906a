"""`make run`: use the workers that are already there, or start a stack for the run and stop it after."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from celery import Celery

from conveyor.stack import control
from conveyor.console import say
from conveyor.settings.config import Config
from conveyor.stack import open_stack, stack_choice
from conveyor.stack.base import Stack

log = logging.getLogger(__name__)


@contextmanager
def stack_session(app: Celery, config: Config, start: bool, wait_s: float = 90.0) -> Iterator[None]:
    choice = stack_choice(app)
    if not choice.broker_up:
        # The stack brings the broker: nothing can answer before it starts.
        if not start:
            choice.require_broker()
        yield from _own_run(open_stack(app, config), wait_s)
        return
    answering = control.responding(app)
    if not start:
        idle = [s.name for s in config.services if s.replicas > 0 and not answering[s.name]]
        if idle:
            say(f"No worker of {', '.join(idle)} answers; their tasks will wait in the queue until one "
                "starts (`make up`, or pass --start-stack).")
        yield
        return
    if all(answering[s.name] > 0 for s in config.services if s.replicas > 0):
        say(f"Using the workers already running ({sum(answering.values())} answering).")
        yield
        return
    stack = open_stack(app, config)
    if stack.is_up() or choice.own_broker:
        # Part of a stack is running (some replicas died, a service is scaled to 0, or only its own
        # broker runs): bring it to the config's shape for the run, but it was not ours to start, so
        # it is not ours to stop.
        say(f"Completing the running {stack.name} stack for this run.")
        stack.up(wait_s=wait_s)
        yield
        return
    yield from _own_run(stack, wait_s)


def _own_run(stack: Stack, wait_s: float) -> Iterator[None]:
    """Start the stack for this run and stop all of it afterwards, whatever happens in between."""
    say(f"No workers answer; starting the {stack.name} stack for this run.")
    try:
        stack.up(wait_s=wait_s)
        yield
    finally:
        stack.down()
        say(f"Stopped the {stack.name} stack this run started.")
