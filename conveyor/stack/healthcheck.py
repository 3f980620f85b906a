"""The container healthcheck: does *this* replica's worker answer a remote-control ping?

`python -m conveyor.stack.healthcheck` reads the node name the launcher wrote (CONVEYOR_NODE_FILE), pings
only that node and exits 0 when it answers, 1 otherwise. A broadcast ping would not do: replicas on
the host network share one hostname and a broker, so another replica's answer would hide a dead one.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from conveyor.settings import environment
from conveyor.settings.environment import NODE_FILE_ENV

log = logging.getLogger(__name__)


def node_from_file(path: str | None = None) -> str:
    file = path or environment.node_file()
    if not file:
        raise LookupError(f"{NODE_FILE_ENV} is not set, so there is no node name to ping")
    try:
        node = Path(file).read_text().strip()
    except OSError as exc:
        raise LookupError(f"cannot read the node file {file} ({exc.strerror}); has the worker started?") from None
    if not node:
        raise LookupError(f"the node file {file} is empty; has the worker started?")
    return node


def check(node: str, timeout_s: float) -> bool:
    """True when `node` answers a ping within the timeout."""
    from conveyor.stack import control
    from conveyor.runtime.app import create_app

    app = create_app()
    try:
        return node in control.ping(app, timeout_s, destination=[node])
    finally:
        app.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conveyor.stack.healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--node-file", help=f"file holding the node name (default: ${NODE_FILE_ENV})")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        node = node_from_file(args.node_file)
    except LookupError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    try:
        healthy = check(node, args.timeout)
    except Exception as exc:  # any failure to ask (broker down, bad config) means: not healthy
        print(f"unhealthy: cannot ping {node}: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return 1
    if not healthy:
        print(f"unhealthy: worker {node} did not answer a ping within {args.timeout:g} s", file=sys.stderr)
        return 1
    print(f"healthy: worker {node} answered")
    return 0


if __name__ == "__main__":
    sys.exit(main())
