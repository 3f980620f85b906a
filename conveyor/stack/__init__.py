"""The stacks: the worker services as local processes or Docker Compose services, and the one
decision of broker and backend every command makes (choice.py).

Owns: choosing (choice.py, credentials.py), the two backends (base.py, local.py, compose.py), a
replica's launcher and healthcheck, remote-control pings (control.py), the autoscaler and the
rebalancer, `make status`, and `make run`'s stack session.
May import: conveyor.runtime and the layers below it.
"""

from __future__ import annotations

import logging

from celery import Celery

from conveyor.console import say
from conveyor.runtime.app import create_app
from conveyor.settings import environment
from conveyor.settings.config import Config, load_config
from conveyor.settings.context import settings_of
from conveyor.stack.base import Replica, Stack
from conveyor.stack.choice import StackChoice, choose, docker_available, for_broker, requested_backend
from conveyor.stack.local import LocalStack

log = logging.getLogger(__name__)


def open_app(config: Config | str | None, announce: bool = True, check: bool = True, stack: str | None = None,
             starts_stack: bool = False, choice: StackChoice | None = None) -> Celery:
    """What a CLI does first: load the config (unless given loaded), make the one decision of broker
    and stack backend (choice.py; `stack` is --stack, `choice` one already made), check that the
    broker answers (failing in one line; `check=False` for commands that can do without it), build
    the app, and say the decision in one line. `starts_stack`: the command starts the stack, which
    may bring the broker."""
    if not isinstance(config, Config):
        config = load_config(config)
    choice = choice or choose(stack)
    if check and choice.broker_up:
        environment.check(choice.broker)
    elif check and not starts_stack:
        choice.require_broker()
    if announce:
        say(choice.describe())
    return create_app(config, choice.broker, choice=choice)


def stack_choice(app: Celery, requested: str | None = None) -> StackChoice:
    """The decision the app was opened with (open_app), or, for an app built directly (tests, the
    benchmark), the backend for its broker; --stack (`requested`) must agree with it."""
    made: StackChoice | None = settings_of(app).choice
    wanted = requested_backend(requested) if requested else ""
    if made and wanted in ("", made.backend):
        return made
    return for_broker(settings_of(app).broker, wanted)


def open_stack(app: Celery, config: Config, requested: str | None = None) -> Stack:
    choice = stack_choice(app, requested)
    if choice.backend == "compose":
        from conveyor.stack.compose import ComposeStack

        return ComposeStack(app, config, own_broker=choice.own_broker)
    return LocalStack(app, config)


__all__ = ["Replica", "Stack", "StackChoice", "choose", "docker_available", "open_app", "open_stack", "stack_choice"]
