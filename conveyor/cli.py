"""What every top-level script shares: logging set-up and turning a ConveyorError into one line."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .errors import ConveyorError

log = logging.getLogger(__name__)


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else getattr(logging, os.environ.get("LOG_LEVEL", "WARNING").upper(), logging.WARNING)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def setup_logging_info() -> None:
    """For long-running commands whose log lines are their output (the autoscaler's decisions)."""
    logging.getLogger("conveyor").setLevel(logging.INFO)


def run(main: Callable[[], int | None]) -> None:
    """Run a CLI entry point: user errors print one line on stderr and exit non-zero."""
    try:
        code = main()
    except ConveyorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def say(message: str) -> None:
    """A one-line notice for the user (which broker, which stack), kept off stdout so --json stays clean."""
    print(message, file=sys.stderr)


@contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for a block: the app, the stacks and the workers they start read them."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def open_app(config_file: str | None, announce: bool = True):
    """What a CLI does first: load the config, resolve and check the broker (failing in one line),
    and build the app; say which broker it is unless it is the one the user named."""
    from . import broker
    from .app import create_app
    from .config import load_config

    config = load_config(config_file)
    settings = broker.resolve()
    broker.check(settings)
    if announce and (settings.embedded or not settings.explicit):
        say(settings.describe())
    return create_app(config, settings)
