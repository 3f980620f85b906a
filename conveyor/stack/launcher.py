"""Start one worker replica of a service: `python -m conveyor.stack.launcher --service worker-a`.

Both stacks start workers through this launcher, so a replica is the same process everywhere. It
execs `celery worker` in place (the worker is then PID 1 in a container and receives SIGTERM
itself, for a warm shutdown) with a node name that is unique per replica: replicas on one host,
or containers sharing the host network, must never collide on their remote-control queue.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import uuid
from pathlib import Path

from conveyor.settings import environment
from conveyor.settings.config import ServiceConfig, load_config



def node_name(service: str, suffix: str | None = None) -> str:
    return f"{service}-{suffix or uuid.uuid4().hex[:8]}@{socket.gethostname()}"


def command(service: ServiceConfig, node: str, loglevel: str = "INFO") -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "celery_app", "worker",
        "--queues", ",".join(service.queues),
        "--concurrency", str(service.concurrency),
        "--pool", service.pool,
        "--prefetch-multiplier", str(service.prefetch_multiplier),
        "--hostname", node,
        # Gossip and mingle cost every worker a round of broadcasts at start and nothing here uses
        # them; remote control (ping, inspect) stays on. Task events follow the config's
        # tuning.task_events (worker_send_task_events in app.py), so there is no --task-events here.
        "--without-gossip", "--without-mingle",
        "--loglevel", loglevel,
        *recycling(service),
    ]


def recycling(service: ServiceConfig) -> list[str]:
    """Celery's own worker recycling (prefork): a pool process is replaced after a number of tasks
    or once it grows past a resident size; the task it ran is acknowledged first, so none is lost."""
    args = []
    if service.max_tasks_per_child is not None:
        args += ["--max-tasks-per-child", str(service.max_tasks_per_child)]
    if service.max_memory_per_child_mb is not None:
        args += ["--max-memory-per-child", str(service.max_memory_per_child_mb * 1024)]  # Celery counts KiB
    return args


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m conveyor.stack.launcher", description=__doc__.splitlines()[0])
    parser.add_argument("--service", default=environment.worker_service(), required=environment.worker_service() is None)
    parser.add_argument("--node", help="full Celery node name (default: SERVICE-<random>@HOST)")
    parser.add_argument("--config", help="config file (default: CONVEYOR_CONFIG or test-config.yml)")
    parser.add_argument("--loglevel", default=environment.worker_loglevel())
    args = parser.parse_args(argv)
    from conveyor.console import run

    def start() -> None:
        service = load_config(args.config).service(args.service)
        node = args.node or node_name(service.name)
        if environment.node_file():
            Path(environment.node_file()).write_text(node + "\n")
        # The worker (celery_app) loads the same config file: --config travels as CONVEYOR_CONFIG.
        extra = {environment.CONFIG_ENV: str(Path(args.config).resolve())} if args.config else {}
        cmd = command(service, node, args.loglevel)
        os.execve(cmd[0], cmd, environment.inherited(extra))

    run(start)


if __name__ == "__main__":
    main()
