#!/usr/bin/env python3
"""Dispatch the tasks of a config file and report what became of each.

    python dispatch.py [--config FILE] [--json] [--timeout S] [--start-stack]

Exit status 0 only when every task succeeded.
"""

from __future__ import annotations

import argparse
import json
import sys

from conveyor.cli import common
from conveyor.settings.config import config_path
from conveyor.dispatch.dispatcher import dispatch
from conveyor.errors import UsageError
from conveyor.console import progress_bar
from conveyor.dispatch.report import print_report
from conveyor.stack.session import stack_session
from conveyor.settings.context import settings_of
from conveyor import console
from conveyor.stack import open_app


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="config file (default: CONVEYOR_CONFIG or test-config.yml)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for all results (default 300)")
    parser.add_argument("--start-stack", action="store_true",
                        help="start the worker stack first if none answers, and stop it afterwards")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    common.setup_logging(args.verbose)
    if args.timeout <= 0:
        raise UsageError(f"--timeout must be more than 0, got {args.timeout:g}")

    app = open_app(args.config, starts_stack=args.start_stack)
    config = settings_of(app).config
    total = sum(t.count for t in config.tasks)
    with stack_session(app, config, start=args.start_stack):
        with progress_bar(total, enabled=not args.json) as bar:
            report = dispatch(app, config, args.timeout, on_done=lambda _outcome: bar.advance())
    if args.json:
        json.dump(report.as_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_report(report, sys.stdout, str(config_path(args.config)))
    return 0 if report.succeeded == len(report.tasks) else 1


if __name__ == "__main__":
    console.run(main)
