#!/usr/bin/env python3
"""Load-test the worker stack with a scenario and report throughput, latency and failures.

    python load_test.py [--scenario FILE] [--tasks N | --tasks-per-type N | --duration S] [--rate R] [--concurrency C]
                        [--timeout S] [--max-depth N] [--json] [--report DIR] [--start-stack]

Closed loop (as fast as the stack takes them) unless --rate or the scenario sets a rate. Exit
status 0 when every job finished (succeeded or dead-lettered as the scenario's failure injection
intends), 1 when some failed otherwise, 5 when the timeout ended the run with jobs unfinished.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from conveyor.settings import environment
from conveyor.cli import common
from conveyor.errors import BrokerError, DispatchTimeout, UsageError
from conveyor.loadtest import live, report
from conveyor.loadtest.metrics import summarize
from conveyor.loadtest.runner import Options, Runner
from conveyor.loadtest.scenario import Plan, check_limits, load_scenario
from conveyor.settings.config import load_config
from conveyor.stack.session import stack_session
from conveyor.settings.context import settings_of
from conveyor import console
from conveyor.stack import open_app

DEFAULT_SCENARIO = Path(__file__).resolve().parent / "scenarios" / "seed.yml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default=str(DEFAULT_SCENARIO), help="scenario file (default scenarios/seed.yml)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--tasks", type=int, default=None,
                      help="jobs in all, shared out by the scenario's weights (default 20 per entry of its mix)")
    size.add_argument("--tasks-per-type", type=int, default=None, help="jobs per entry of the scenario's mix")
    size.add_argument("--duration", type=float, help="send for this many seconds instead of a fixed number")
    parser.add_argument("--rate", type=float, help="open loop: send this many jobs per second (default: the scenario's, else closed loop)")
    parser.add_argument("--concurrency", type=int, default=0, help="closed loop: at most this many jobs in flight (default 0: no bound)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds the whole run may take (default 600)")
    parser.add_argument("--max-depth", type=int, help="pause sending while a queue holds more ready messages (default: the scenario's)")
    parser.add_argument("--batch", type=int, help="messages per publish batch (default: the scenario's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--report", metavar="DIR", help="also write summary.json, jobs.csv, PNG plots and report.html here")
    parser.add_argument("--config", help="stack config (default: CONVEYOR_CONFIG or test-config.yml)")
    parser.add_argument("--start-stack", action="store_true", help="start the worker stack if none answers, stop it afterwards")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def check(args: argparse.Namespace) -> None:
    for name, value, low in (("--tasks", args.tasks, 1), ("--tasks-per-type", args.tasks_per_type, 1), ("--duration", args.duration, 0), ("--rate", args.rate, 0),
                             ("--timeout", args.timeout, 0), ("--max-depth", args.max_depth, 1), ("--batch", args.batch, 1)):
        if value is not None and (value < low or (low == 0 and value == 0)):
            raise UsageError(f"{name} must be {'more than 0' if low == 0 else f'at least {low}'}, got {value:g}")
    if args.concurrency < 0:
        raise UsageError(f"--concurrency must be 0 (no bound) or more, got {args.concurrency}")


def main() -> int:
    args = build_parser().parse_args()
    common.setup_logging(args.verbose)
    check(args)
    config = load_config(args.config)
    scenario = load_scenario(args.scenario, config)
    check_limits(scenario, config)
    app = open_app(config, starts_stack=args.start_stack)
    if args.duration:
        plan = Plan(scenario, None)
    elif args.tasks:
        plan = Plan.of_total(scenario, args.tasks)
    else:
        plan = Plan.per_type(scenario, args.tasks_per_type or 20)
    options = Options(timeout_s=args.timeout, duration_s=args.duration, rate_per_s=args.rate,
                      concurrency=args.concurrency, max_queue_depth=args.max_depth, batch_size=args.batch)
    with app.connection_for_write() as conn:
        lost = (*environment.PUBLISH_ERRORS, *conn.connection_errors, *conn.channel_errors)
    with stack_session(app, config, start=args.start_stack):
        with live.progress_bar_for_load_test(plan.total, enabled=not args.json) as tick:
            try:
                outcome = Runner(app, scenario, plan, options, on_tick=tick).run()
            except (*lost, RuntimeError) as exc:
                # Celery's result consumer gives up reconnecting with a RuntimeError caused by the broker error.
                if isinstance(exc, RuntimeError):
                    if not isinstance(exc.__cause__, lost):
                        raise
                    exc = exc.__cause__
                raise BrokerError(f"lost the broker at {settings_of(app).broker.safe_url} during the run ({type(exc).__name__}: "
                                  f"{exc}); check RabbitMQ, then run the load test again") from None
    summary = {"scenario": scenario.name, **summarize(outcome.records, outcome.stats), "idle_queues": outcome.idle_queues}
    if args.json:
        report.write_json(summary, sys.stdout)
    else:
        print(report.render(summary, scenario.name))
    if args.report:
        written = report.write_dir(Path(args.report), summary, outcome.records, scenario.name)
        console.say(f"Report written: {', '.join(str(p) for p in written)}")
    if summary["timed_out"]:
        return DispatchTimeout.exit_code
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    console.run(main)
