"""What every top-level script shares: logging set-up."""

from __future__ import annotations

import logging
import sys

from conveyor.settings import environment

log = logging.getLogger(__name__)


def setup_logging(verbose: bool = False, progress: bool = False) -> None:
    """WARNING and up, or LOG_LEVEL, or DEBUG with -v. `progress`: a long-running command whose own
    INFO lines are its output (the autoscaler's decisions, the chaos run's steps) shows them too,
    unless -v or LOG_LEVEL asks for something else."""
    chosen = environment.log_level()
    level = logging.DEBUG if verbose else getattr(logging, (chosen or "WARNING").upper(), logging.WARNING)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if progress and not verbose and not chosen:
        logging.getLogger("conveyor").setLevel(logging.INFO)
