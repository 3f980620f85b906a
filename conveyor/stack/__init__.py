"""Choosing the stack backend: STACK=compose|local, or compose when a Docker engine answers."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess

from celery import Celery

from conveyor.settings.config import Config
from conveyor.errors import UsageError
from conveyor.stack.base import Replica, Stack
from conveyor.stack.local import LocalStack

log = logging.getLogger(__name__)

STACK_ENV = "STACK"


def docker_available() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def backend_name(requested: str | None = None) -> str:
    choice = (requested or os.environ.get(STACK_ENV) or "").strip().lower()
    if choice in ("", "auto"):
        return "compose" if docker_available() else "local"
    if choice not in ("compose", "local"):
        raise UsageError(f"unknown stack {choice!r}: STACK must be compose or local")
    return choice


def open_stack(app: Celery, config: Config, requested: str | None = None) -> Stack:
    name = backend_name(requested)
    if name == "compose":
        from conveyor.stack.compose import ComposeStack

        return ComposeStack(app, config)
    return LocalStack(app, config)


__all__ = ["Replica", "Stack", "backend_name", "open_stack", "docker_available"]
