#!/usr/bin/env python3
"""Candidate default services, measured on the seed workload and on short tasks (issue 16, item 3).

    python bench/services.py [--short N] [--seed-large N] [--rounds R] [--out FILE]

Each candidate is test-config.yml with its two services replaced (both services alike) and task
events off. In each round every candidate gets a fresh local stack (in a private virtual host and
run directory, as `make bench`) and runs, through the load tester's runner (load_test.py's engine):
a warm-up, N short tasks (task_a, duration 0), the seed workload itself (10 task_a of 0.1 s and 10
task_b of 0.2 s) and a larger run of the same shape. Rounds alternate the order (forward, then
backward) so that the machine's drift falls on every candidate alike; ratios are taken against the
first candidate (the shipped services) within each round. docs/performance.md, "The default
services", gives the results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conveyor import console  # noqa: E402
from conveyor.cli import common  # noqa: E402
from conveyor.loadtest.scenario import Scenario  # noqa: E402
from conveyor.settings import environment  # noqa: E402

import bench  # noqa: E402 (bench/, beside this script)
import proc_cpu  # noqa: E402

ROOT = bench.ROOT
# (pool, processes, prefetch, worker log level); the first is the shipped one, the ratios' base.
# solo at prefetch 1 ran 10 short tasks a second in a trial (a tenth of a second lost per task):
# measured at prefetch 4, to see the pool itself.
_GRID = [("prefork", 2, 1, "INFO"), ("prefork", 2, 2, "INFO"), ("prefork", 2, 4, "INFO"), ("prefork", 2, 16, "INFO"),
         ("prefork", 4, 1, "INFO"), ("prefork", 4, 1, "WARNING"), ("prefork", 8, 1, "INFO"),
         ("threads", 2, 1, "INFO"), ("threads", 4, 1, "INFO"), ("threads", 8, 1, "INFO"), ("solo", 1, 4, "INFO"),
         ("prefork", 2, 1, "WARNING"), ("prefork", 2, 2, "WARNING")]
# name: (services' settings, worker log level)
CANDIDATES: dict[str, tuple[dict[str, Any], str]] = {
    (f"solo p{prefetch} {level}" if pool == "solo" else f"{pool} c{processes} p{prefetch} {level}"):
        ({"pool": pool, "concurrency": processes, "prefetch_multiplier": prefetch}, level)
    for pool, processes, prefetch, level in _GRID
}


def candidate_config(settings: dict[str, Any], into: Path) -> Path:
    config = yaml.safe_load((ROOT / "test-config.yml").read_text())
    config["services"] = [{**svc, **settings} for svc in config["services"]]
    config["tuning"] = {"task_events": False}
    into.write_text(yaml.safe_dump(config))
    return into


def seed_scenario() -> Scenario:
    return Scenario(name="seed", max_queue_depth=1_000_000,
                    mix=[{"task": "task_a", "runtime_s": 0.1}, {"task": "task_b", "runtime_s": 0.2}])


def run_candidate(config_file: Path, loglevel: str, short: int, seed_large: int) -> dict[str, Any]:
    short_scenario, seed = bench.one_type("task_a", 0.0), seed_scenario()
    broker = proc_cpu.broker_pid(bench.broker_port())
    with environment.environ({environment.WORKER_LOGLEVEL_ENV: loglevel}), bench.stack(config_file) as local:
        bench.measure(local.app, short_scenario, {"task_a": 300}, 120)  # warm-up: connections, pool processes
        workers = [int(r.ident) for r in local.replicas() if r.running]
        before = proc_cpu.snapshot(broker, workers, os.getpid())
        fast = bench.measure(local.app, short_scenario, {"task_a": short}, 600)
        cpu = proc_cpu.per_task_ms(before, proc_cpu.snapshot(broker, workers, os.getpid()), short, proc_cpu.HZ)
        small = bench.measure(local.app, seed, {"task_a": 10, "task_b": 10}, 120)
        large = bench.measure(local.app, seed, {"task_a": seed_large, "task_b": seed_large}, 600)
    return {"short_per_s": fast["throughput_per_s"], "short_p50_ms": fast["latency_s"]["p50"] * 1000,
            "short_cpu_ms_per_task": cpu,
            "seed_per_s": small["throughput_per_s"], "seed_large_per_s": large["throughput_per_s"],
            "seed_large_p50_s": large["latency_s"]["p50"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", type=int, default=3000, help="short (no-op) tasks per candidate (default 3000)")
    parser.add_argument("--seed-large", type=int, default=100, help="task_a and task_b each in the larger seed run (default 100)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, alternating the order (default 2)")
    parser.add_argument("--only", nargs="*", help="candidates to run (default all), by name")
    parser.add_argument("--out", default=str(ROOT / "bench-results" / "services.json"))
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    common.setup_logging(args.verbose)
    names = args.only or list(CANDIDATES)
    rounds: list[dict[str, Any]] = []
    with bench.private_broker(), tempfile.TemporaryDirectory(prefix="conveyor-services-") as tmp:
        for number in range(args.rounds):
            order = names if number % 2 == 0 else names[::-1]
            row = {}
            for name in order:
                settings, loglevel = CANDIDATES[name]
                config = candidate_config(settings, Path(tmp) / f"{name.replace(' ', '-')}.yml")
                row[name] = run_candidate(config, loglevel, args.short, args.seed_large)
                r = row[name]
                console.say(f"round {number + 1} {name}: short {r['short_per_s']:.0f}/s "
                            f"(CPU {r['short_cpu_ms_per_task']['total']}), seed {r['seed_per_s']:.1f}/s, "
                            f"seed x{args.seed_large} {r['seed_large_per_s']:.1f}/s")
            rounds.append(row)
    base = names[0]
    print(f"{'candidate':<24} {'short, x base':>22} {'seed 20, x base':>22} {'seed large, x base':>22}")
    for name in names:
        cells = []
        for key in ("short_per_s", "seed_per_s", "seed_large_per_s"):
            ratios = [r[name][key] / r[base][key] for r in rounds]
            cells.append(" ".join(f"{x:.2f}" for x in ratios) + f" (med {statistics.median(ratios):.2f})")
        print(f"{name:<24} {cells[0]:>22} {cells[1]:>22} {cells[2]:>22}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"at": time.time(), "short": args.short, "seed_large": args.seed_large,
                               "rounds": rounds}, indent=2) + "\n")
    console.say(f"Figures saved to {out}")
    return 0


if __name__ == "__main__":
    console.run(main)
