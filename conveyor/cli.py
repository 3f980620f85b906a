"""What every top-level script shares: logging set-up and turning a ConveyorError into one line."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from .errors import ConveyorError

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger(__name__)


def setup_logging(verbose: bool = False, progress: bool = False) -> None:
    """WARNING and up, or LOG_LEVEL, or DEBUG with -v. `progress`: a long-running command whose own
    INFO lines are its output (the autoscaler's decisions, the chaos run's steps) shows them too,
    unless -v or LOG_LEVEL asks for something else."""
    chosen = os.environ.get("LOG_LEVEL")
    level = logging.DEBUG if verbose else getattr(logging, (chosen or "WARNING").upper(), logging.WARNING)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if progress and not verbose and not chosen:
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


def open_app(config: Config | str | None, announce: bool = True, check: bool = True, stack: str | None = None,
             starts_stack: bool = False):
    """What a CLI does first: load the config (unless given loaded), make the one decision of broker
    and stack backend (conveyor/stack/choice.py; `stack` is --stack), check that the broker answers
    (failing in one line; `check=False` for commands that can do without it), build the app, and say
    the decision in one line. `starts_stack`: the command starts the stack, which may bring the broker."""
    from . import broker
    from .app import create_app
    from .config import Config, load_config
    from .stack.choice import choose

    if not isinstance(config, Config):
        config = load_config(config)
    choice = choose(stack)
    if check and choice.broker_up:
        broker.check(choice.broker)
    elif check and not starts_stack:
        choice.require_broker()
    if announce:
        say(choice.describe())
    app = create_app(config, choice.broker)
    app.conveyor_choice = choice
    return app
