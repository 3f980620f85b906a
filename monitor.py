#!/usr/bin/env python3
"""Watch the queues, the worker services and the task types live, and export the figures as metrics.

    python monitor.py                      the live dashboard (make monitor); Prometheus on 127.0.0.1:9808
    python monitor.py --once [--json]      one snapshot, for scripts
    python monitor.py --no-dashboard       run only the exporters (Prometheus, --influx)
    python monitor.py --influx FILE|-      also write InfluxDB line protocol (- is stdout, no dashboard)
    python monitor.py --port N             Prometheus on another port (0: any free port)

Queues and workers are sampled every monitoring.collect_interval_s (5 s), InfluxDB lines are
written every monitoring.emit_interval_s (60 s), the dashboard is redrawn every
monitoring.refresh_interval_s (1 s); see docs/monitoring.md. Task totals come from Celery's task
events and count from the moment the monitor starts listening.

The snapshot (--json; the dashboard draws the same; times are Unix seconds, null is unknown):

  {"time", "counting_since", "sampled_at", "backend": "local"|"compose", "error": null|str,
   "queues":   [{"name", "messages_ready", "messages_unacked", "consumers",
                 "publish_rate_per_s", "deliver_rate_per_s",
                 "retry_backlog", "dead_lettered",          these two null for dead_letter
                 "workers_up", "processes_up"}],
   "services": [{"name", "queues", "concurrency", "replicas_desired", "replicas_running",
                 "workers_responding", "tasks_active"}],
   "dead_letter": {"messages", "max_messages"},
   "workers":  [{"hostname", "service", "alive", "tasks_active", "processed"}],
   "tasks":    [{"name", "queue", "sent", "received", "started", "succeeded", "retried",
                 "failed", "dead_lettered", "revoked", "rejected", "retrying",
                 "rate_per_s", "latency_p50_s", "latency_p95_s"}]}

failed counts every task that failed for good, dead_lettered those of them in the dead-letter
queue; retrying (and a queue's retry_backlog) are tasks waiting out a retry countdown;
rate_per_s is tasks finished per second over the last collect interval; latencies are from the
first send to success over the latest monitoring.latency_window_tasks tasks of the type.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from rich.console import Console

from conveyor.cli import common
from conveyor.settings.config import load_config
from conveyor.errors import UsageError
from conveyor.monitor import Monitor, dashboard, prometheus
from conveyor.monitor.influx import STDOUT
from conveyor.stack import open_stack
from conveyor.settings.context import settings_of
from conveyor import console
from conveyor.stack import open_app


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="config file (default: CONVEYOR_CONFIG or test-config.yml)")
    parser.add_argument("--stack", choices=["compose", "local"], help="where the replicas run (default: STACK, or auto)")
    parser.add_argument("--once", action="store_true", help="print one snapshot and exit")
    parser.add_argument("--json", action="store_true", help="with --once: the snapshot as JSON")
    parser.add_argument("--no-dashboard", action="store_true", help="run only the exporters, until interrupted")
    parser.add_argument("--port", type=int, help="Prometheus port (default monitoring.prometheus_port; 0: any free port)")
    parser.add_argument("--no-prometheus", action="store_true", help="serve no Prometheus endpoint")
    parser.add_argument("--influx", metavar="FILE|-", help="append InfluxDB line protocol to FILE, or - for stdout")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main() -> int:
    args = build_parser().parse_args()
    common.setup_logging(args.verbose)
    if args.json and not args.once:
        raise UsageError("--json needs --once (the live figures are on the Prometheus endpoint, or --influx)")
    if args.port is not None and not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535, got {args.port}")
    config = load_config(args.config)
    settings = config.monitoring
    influx = args.influx or settings.influx
    if args.json and influx == STDOUT:
        raise UsageError("--json and InfluxDB lines to stdout (--influx -) would share stdout; send the lines to a file")
    port = None if args.no_prometheus else args.port if args.port is not None else settings.prometheus_port
    app = open_app(config, announce=not (args.once and args.json), stack=args.stack)
    connection = settings_of(app).broker
    stack = open_stack(app, config)

    monitor = Monitor(stack, settings, influx)
    if args.once:
        monitor.start(sample=False)
        try:
            snap = monitor.snapshot()
        finally:
            monitor.stop()
        if args.json:
            json.dump(snap, sys.stdout, indent=2)
            sys.stdout.write("\n")
        elif influx != STDOUT:
            # Piped into a file or another program, print full rows rather than cut them at 80 columns.
            Console(width=None if sys.stdout.isatty() else 160).print(dashboard.render(snap))
        return 0

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # both end the monitor cleanly: the last lines are written
        signal.signal(sig, lambda *_: stop.set())
    monitor.start()
    try:
        heading = f"{stack.name} stack, {connection.safe_url}"
        if port is not None:
            server = prometheus.serve(monitor, settings.prometheus_host, port)
            url = f"http://{settings.prometheus_host}:{server.server_port}/metrics"
            heading += f", metrics on {url}"
            console.say(f"Serving Prometheus metrics on {url}.")
        screen = Console()
        headless = ("--no-dashboard" if args.no_dashboard else "stdout carries the InfluxDB lines" if influx == STDOUT
                    else "stdout is not a terminal" if not screen.is_terminal else None)
        if headless:
            console.say(f"No dashboard ({headless}); collecting until interrupted.")
            stop.wait()
        else:
            dashboard.run(monitor.snapshot, settings.refresh_interval_s, heading, screen, stop)
    finally:
        monitor.stop()
    return 0


if __name__ == "__main__":
    console.run(main)
