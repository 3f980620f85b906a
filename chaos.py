#!/usr/bin/env python3
"""Fault injection: send many tasks while workers are SIGKILLed and the broker restarts; count what was lost.

    python chaos.py [--tasks N] [--fail-rate F] [--pipeline-rate P] [--malformed-rate M] [--replicas R] [--kill-every-s S] [--no-broker-restart]
                    [--partition [--partition-s S]] [--rate-per-s R] [--duration-s D] [--seed N] [--json]

The run starts a RabbitMQ node and workers of its own and leaves their files in .run/chaos/<time>/
(the ledger, the worker logs, report.json). It prints sent, confirmed, succeeded, dead-lettered,
lost and duplicated; exit status 0 only when nothing confirmed was lost, every planned task was
confirmed (or refused by the broker), everything ended as planned and no part of the run failed.
See docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time

from conveyor.settings import environment
from conveyor.cli import common
from conveyor.chaos import ChaosOptions, ChaosRun
from conveyor.chaos.sweep import sweep
from conveyor.settings.config import load_config
from conveyor import console

DEFAULTS = ChaosOptions()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="the project config whose services and retry policy are tested "
                        "(default: CONVEYOR_CONFIG or test-config.yml)")
    parser.add_argument("--tasks", type=int, default=DEFAULTS.tasks, help=f"tasks to send (default {DEFAULTS.tasks})")
    parser.add_argument("--fail-rate", type=float, default=DEFAULTS.fail_rate,
                        help=f"share of tasks that fail every attempt and so end dead-lettered (default {DEFAULTS.fail_rate:g})")
    parser.add_argument("--pipeline-rate", type=float, default=DEFAULTS.pipeline_rate,
                        help=f"share of tasks sent as three-stage pipelines (default {DEFAULTS.pipeline_rate:g})")
    parser.add_argument("--malformed-rate", type=float, default=DEFAULTS.malformed_rate,
                        help=f"share sent as messages no worker can run (default {DEFAULTS.malformed_rate:g})")
    parser.add_argument("--replicas", type=int, default=DEFAULTS.replicas, help=f"replicas per service (default {DEFAULTS.replicas})")
    parser.add_argument("--kill-every-s", type=float, default=DEFAULTS.kill_every_s,
                        help=f"SIGKILL a random replica this often; 0: never (default {DEFAULTS.kill_every_s:g})")
    parser.add_argument("--no-broker-restart", action="store_true", help="skip the broker restart in the middle")
    parser.add_argument("--partition", action="store_true",
                        help="also run a worker in a network namespace and cut its link for a while (needs root)")
    parser.add_argument("--partition-s", type=float, default=DEFAULTS.partition_s,
                        help=f"how long the link stays cut (default {DEFAULTS.partition_s:g})")
    parser.add_argument("--partition-subnet", help="the /30 for the veth pair (default: a free one in 10.251.0.0/16)")
    parser.add_argument("--rate-per-s", type=float, default=DEFAULTS.rate_per_s,
                        help=f"publishing pace; 0: as fast as the broker confirms (default {DEFAULTS.rate_per_s:g})")
    parser.add_argument("--duration-s", type=float, help="each task's run time (default: its type's)")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed, help="which tasks fail, which replicas die")
    parser.add_argument("--timeout-s", type=float, default=DEFAULTS.timeout_s, help="give up after this long")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--sweep", action="store_true",
                        help="only remove what runs killed outright left behind (nodes, namespaces, workers), then exit")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    common.setup_logging(args.verbose, progress=True)  # the run's own steps (kills, restarts) are its progress report

    runs = environment.run_dir() / "chaos"
    for what in sweep(runs):
        console.say(f"Removed {what}, left behind by a chaos run that was killed.")
    if args.sweep:
        return 0
    # A SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C: the run stops its node, workers and namespace.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    options = ChaosOptions(
        tasks=args.tasks, fail_rate=args.fail_rate, pipeline_rate=args.pipeline_rate,
        malformed_rate=args.malformed_rate, replicas=args.replicas, kill_every_s=args.kill_every_s,
        broker_restart=not args.no_broker_restart, partition=args.partition, partition_s=args.partition_s,
        partition_subnet=args.partition_subnet, rate_per_s=args.rate_per_s, duration_s=args.duration_s,
        seed=args.seed, timeout_s=args.timeout_s,
    )
    config = load_config(args.config)
    home = runs / time.strftime("%Y%m%d-%H%M%S")
    run = ChaosRun(options, config, home)
    console.say(f"Chaos run in {home}: {options.tasks} tasks, a replica killed every {options.kill_every_s:g} s"
            + (", a broker restart" if options.broker_restart else "") + (", a partition" if options.partition else "") + ".")
    report = run.run()
    if args.json:
        json.dump(report.as_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(report.render())
    return 0 if report.ok else 1


if __name__ == "__main__":
    console.run(main)
