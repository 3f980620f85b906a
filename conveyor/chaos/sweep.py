"""Removing what chaos runs that were killed outright (SIGKILL) left behind.

The trust boundary (docs/reliability.md): the sweep acts only on run directories under
`<run dir>/chaos/` that are this user's own, mode 0700, and real directories, checked with lstat
(a link is never followed) before anything in them is read; the chaos directory itself must pass
the same check. Only another process of this user (or root) can write into such a directory, so
what it says (the run's pid, its workers' pid files, its broker node's name and home) can be acted
on. Nothing is found any other way: a `/tmp/conveyor-chaos-node-*` directory that no run of ours
recorded is somebody else's, and left alone. No file from any of them is handed to a shell.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from conveyor.settings import environment
from conveyor.runtime.app import create_app
from conveyor.settings.config import load_config
from conveyor.stack.local import LocalStack, alive
from conveyor.chaos.actors import PartitionedWorker
from conveyor.chaos.netns import leftovers as netns_leftovers
from conveyor.chaos.netns import remove_leftover as remove_netns
from conveyor.chaos.node import recorded as recorded_node
from conveyor.chaos.node import remove_leftover as remove_node

log = logging.getLogger(__name__)


def private(path: Path) -> bool:
    """Whether `path` is a directory of this user's own that nobody else can enter: lstat (a link
    is not a directory here), owner, mode 0700 exactly."""
    try:
        info = path.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) == 0o700


def run_homes(runs: Path) -> list[Path]:
    """The run directories the sweep may act on (see the module's docstring); the others are logged."""
    if not private(runs):
        if runs.exists() or runs.is_symlink():
            log.warning("Not sweeping %s: it is not a directory of this user's own with mode 0700.", runs)
        return []
    homes = []
    for home in sorted(runs.iterdir()):
        if private(home):
            homes.append(home)
        else:
            log.warning("Not sweeping %s: it is not a directory of this user's own with mode 0700.", home)
    return homes


def sweep(runs: Path) -> list[str]:
    """Remove what runs that were killed outright (SIGKILL) left behind: their broker nodes, network
    namespaces and worker replicas. Anything whose run is still alive is left alone."""
    removed = []
    for home in run_homes(runs):
        try:
            owner = (home / "owner").read_text().strip()
        except OSError:
            continue
        if not owner.isdigit() or alive(owner):
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
        node = recorded_node(home)
        if node:
            remove_node(home, *node)
            removed.append(f"broker node directory {node[1]}")
    for name in netns_leftovers():
        remove_netns(name)
        removed.append(f"network namespace {name}")
    return removed
