"""Opening the stack backend the one decision picked (conveyor/stack/choice.py)."""

from __future__ import annotations

import logging

from celery import Celery

from ..config import Config
from .base import Replica, Stack
from .choice import StackChoice, choose, docker_available, for_broker, requested_backend
from .local import LocalStack

log = logging.getLogger(__name__)


def stack_choice(app: Celery, requested: str | None = None) -> StackChoice:
    """The decision the app was opened with (cli.open_app), or, for an app built directly (tests,
    the chaos run), the backend for its broker; --stack (`requested`) must agree with it."""
    made: StackChoice | None = getattr(app, "conveyor_choice", None)
    wanted = requested_backend(requested) if requested else ""
    if made and wanted in ("", made.backend):
        return made
    return for_broker(app.conveyor_broker, wanted)


def open_stack(app: Celery, config: Config, requested: str | None = None) -> Stack:
    choice = stack_choice(app, requested)
    if choice.backend == "compose":
        from .compose import ComposeStack

        return ComposeStack(app, config, own_broker=choice.own_broker)
    return LocalStack(app, config)


__all__ = ["Replica", "Stack", "StackChoice", "choose", "docker_available", "open_stack", "stack_choice"]
