"""`make flower`: Flower (the PyPI package pinned in requirements-flower.txt) on the project's
broker and config, with its Broker tab on the RabbitMQ management API of the same broker.

Flower reads task and worker events as `make monitor` does, each from its own event queue. The
workers send task events unless tuning.task_events is off (bench/noop.yml); Flower then shows
workers but no tasks, so this warns. The management API URL carries the broker's credentials, so
it goes to Flower as FLOWER_BROKER_API (Flower reads any option from FLOWER_<NAME>), not on the
command line where `ps` would show the password.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import urllib.parse

from kombu.utils.url import url_to_parts

from conveyor.settings import environment
from conveyor import console
from conveyor.cli import common
from conveyor.amqp import queues
from conveyor.settings.config import load_config
from conveyor.errors import UsageError

log = logging.getLogger(__name__)

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 5555


def broker_api(settings: environment.BrokerSettings) -> str:
    """Flower's --broker_api: the management API root with the broker's user and password in it."""
    if settings.embedded:
        raise UsageError("Flower needs RabbitMQ: the embedded filesystem broker has no management API; "
                         "set BROKER_URL=amqp://USER:PASSWORD@HOST:5672/VHOST")
    _, _, _, user, password, _, _ = url_to_parts(settings.broker_url)
    base = urllib.parse.urlsplit(queues.management_url(settings.broker_url))
    quote = lambda part: urllib.parse.quote(part or "guest", safe="")  # noqa: E731 -- Flower unquotes both
    return f"{base.scheme}://{quote(user)}:{quote(password)}@{base.netloc}/api/"


def command(host: str, port: int) -> list[str]:
    """How Flower is started: Celery's own `celery flower`, on our app (celery_app reads BROKER_URL)."""
    return [sys.executable, "-m", "celery", "--app", "celery_app", "flower", f"--address={host}", f"--port={port}"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m conveyor.cli.flower", description=__doc__.split("\n")[0])
    parser.add_argument("--address", default=environment.flower_address() or DEFAULT_HOST,
                        help="bind address (default 127.0.0.1: Flower can revoke tasks and stop workers, and has no login)")
    parser.add_argument("--port", type=int, default=int(environment.flower_port() or DEFAULT_PORT))
    args = parser.parse_args(argv)
    common.setup_logging(progress=True)
    console.run(lambda: _exec(args.address, args.port))


def _exec(host: str, port: int) -> None:
    settings = environment.resolve()
    config = load_config()
    env = environment.inherited({"FLOWER_BROKER_API": broker_api(settings)})
    if not config.tuning.task_events:
        log.warning("tuning.task_events is off in %s: workers send no task events, so Flower will list the "
                    "workers but no tasks. Turn it on for Flower (docs/monitoring.md).", config.source or "the config")
    log.info("Starting Flower on http://%s:%d with the broker's management API at %s.", host, port,
             queues.management_url(settings.broker_url))
    cmd = command(host, port)
    os.chdir(environment.PROJECT_ROOT)  # celery_app is imported from the project root
    os.execvpe(cmd[0], cmd, env)


if __name__ == "__main__":
    main()
