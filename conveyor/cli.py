"""What every top-level script shares: logging set-up and turning a ConveyorError into one line."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

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
