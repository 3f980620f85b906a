"""Removing what chaos runs that were killed outright (SIGKILL) left behind."""

from __future__ import annotations

from pathlib import Path

from conveyor.settings import environment
from conveyor.runtime.app import create_app
from conveyor.settings.config import load_config
from conveyor.stack.local import LocalStack, alive
from conveyor.chaos.actors import PartitionedWorker
from conveyor.chaos.netns import leftovers as netns_leftovers
from conveyor.chaos.netns import remove_leftover as remove_netns
from conveyor.chaos.node import leftovers as node_leftovers
from conveyor.chaos.node import remove_leftover as remove_node


def sweep(runs: Path) -> list[str]:
    """Remove what runs that were killed outright (SIGKILL) left behind: their broker nodes, network
    namespaces and worker replicas. Anything whose run is still alive is left alone."""
    removed = []
    for owner in runs.glob("*/owner"):
        home = owner.parent
        if alive(owner.read_text().strip()):
            continue
        if PartitionedWorker.kill_leftover(home):
            removed.append(f"the partitioned worker of {home}")
        if list((home / "local").glob("*.pid")):
            with environment.environ({environment.RUN_DIR_ENV: str(home)}):  # the local stack keeps its pid files there
                config = load_config(home / "config.yml")
                app = create_app(config, environment.resolve({"BROKER_URL": environment.EMBEDDED_URL, environment.RUN_DIR_ENV: str(home)}))
                LocalStack(app, config).down()
                app.close()
            removed.append(f"the workers of {home}")
    for home in node_leftovers():
        remove_node(home)
        removed.append(f"broker node directory {home}")
    for name in netns_leftovers():
        remove_netns(name)
        removed.append(f"network namespace {name}")
    return removed
