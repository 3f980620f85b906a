#!/usr/bin/env python3
"""Run and resize the worker services, on Docker Compose or as local processes.

    python scale.py up | down | ps | logs [--no-follow]
    python scale.py scale --service worker-a --count 3     (a queue name works too: queue_a)
    python scale.py scale-all --count 4
    python scale.py status [--json]
    python scale.py auto [--once] [--rounds N]                 (autoscale on queue backlog)
    python scale.py rebalance --workers N [--weights FILE]     (share N replicas by queue weights)
    python scale.py build                                      (build the worker image; compose only)

Which broker and which backend (Docker Compose or local processes) is one decision, the same for
every command and said in its first line (conveyor/stack/choice.py); STACK=compose|local (or
--stack) and BROKER_URL choose explicitly.
"""

from __future__ import annotations

import argparse
import json
import sys

from conveyor.cli import common
from conveyor.stack import rebalance
from conveyor.stack import status
from conveyor.stack.autoscale import Autoscaler
from conveyor.errors import UsageError
from conveyor.stack import open_stack
from conveyor.settings.context import settings_of
from conveyor import console
from conveyor.stack import open_app


STARTS = {"up", "scale", "scale-all", "auto", "rebalance"}  # may start the stack, and with it its own broker
LOCAL_ONLY = {"down", "logs", "build"}  # work on containers or processes alone, broker or not


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="config file (default: CONVEYOR_CONFIG or test-config.yml)")
    parser.add_argument("--stack", choices=["compose", "local"], help="backend (default: STACK, or auto)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start every service at its configured replica count")
    sub.add_parser("down", help="stop and remove every replica this stack started")
    sub.add_parser("ps", help="list replicas and whether each answers a ping")
    logs = sub.add_parser("logs", help="follow the workers' logs")
    logs.add_argument("--no-follow", action="store_true")
    one = sub.add_parser("scale", help="set the replica count of one service")
    one.add_argument("--service", required=True, help="service name (worker-a) or its queue (queue_a)")
    one.add_argument("--count", required=True, type=int)
    every = sub.add_parser("scale-all", help="set the replica count of every service")
    every.add_argument("--count", required=True, type=int)
    st = sub.add_parser("status", help="replicas per service and depth per queue")
    st.add_argument("--json", action="store_true")
    auto = sub.add_parser("auto", help="autoscale every service on its queues' backlog")
    auto.add_argument("--once", action="store_true", help="make one decision and exit")
    auto.add_argument("--rounds", type=int, help="stop after this many decisions (default: run until interrupted)")
    reb = sub.add_parser("rebalance", help="share N replicas among the services by queue weights")
    reb.add_argument("--workers", required=True, type=int)
    reb.add_argument("--weights", help="YAML file of queue weights (queue_a: 3, queue_b: 1); default: the config's")
    sub.add_parser("build", help="build the worker image (compose stack)")
    return parser


def main() -> int:
    args = build_parser().parse_args()
    common.setup_logging(args.verbose, progress=args.command == "auto" and not args.once)  # decisions are logged
    quiet = args.command == "status" and args.json
    app = open_app(args.config, announce=not quiet, stack=args.stack, check=args.command not in LOCAL_ONLY,
                       starts_stack=args.command in STARTS)
    config = settings_of(app).config
    stack = open_stack(app, config)

    if args.command == "up":
        stack.up()
        print(status.render(status.collect(stack)))
    elif args.command == "down":
        stack.down()
        print(f"Stopped the {stack.name} stack.")
    elif args.command == "ps":
        print_replicas(stack)
    elif args.command == "logs":
        stack.logs(follow=not args.no_follow)
    elif args.command == "scale":
        stack.scale(args.service, args.count)
        print(f"{config.service(args.service).name}: {args.count} replica(s).")
    elif args.command == "scale-all":
        stack.scale_to({svc.name: args.count for svc in config.services})
        print(f"Every service: {args.count} replica(s).")
    elif args.command == "auto":
        if args.rounds is not None and args.rounds < 1:
            raise UsageError(f"--rounds must be 1 or more, got {args.rounds}")
        scaler = Autoscaler(stack)
        if args.once:
            for d in scaler.step():
                print(f"{d.service}: {d.current} -> {d.desired} ({d.reason})")
        else:
            console.say(f"Autoscaling every {config.autoscale.interval_s:g} s; Ctrl-C stops. Decisions are logged.")
            scaler.run(args.rounds)
    elif args.command == "rebalance":
        weights = rebalance.load_weights(args.weights, config.queues) if args.weights else None
        shares = rebalance.plan(config, args.workers, weights)
        changed = rebalance.apply(stack, shares)
        for name, count in shares.items():
            note = f" (was {changed[name][0]})" if name in changed else " (unchanged)"
            print(f"{name}: {count} replica(s){note}")
    elif args.command == "build":
        stack.build()
    elif args.command == "status":
        snapshot = status.collect(stack)
        if args.json:
            json.dump(snapshot, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            print(status.render(snapshot))
    return 0


def print_replicas(stack) -> None:
    from conveyor.stack import control

    answering = set(control.ping(stack.app))
    by_service = control.responding(stack.app)
    print(f"{'SERVICE':<12} {'ID':<14} {'NODE':<40} {'STATE':<8} ANSWERS")
    for r in stack.replicas():
        if r.node:
            answers = "yes" if r.node in answering else "no"
        else:  # containers: node names are random, so count by service
            answers = f"{by_service[r.service]} of service"
        print(f"{r.service:<12} {r.ident[:12]:<14} {r.node or '-':<40} {'running' if r.running else 'exited':<8} {answers}")


if __name__ == "__main__":
    console.run(main)
