#!/usr/bin/env python3
"""What a hung task-record store costs a dispatch (issue 12): the same 200-task dispatch with the
store up (the machine's Redis) and hung (a socket that accepts connections and never answers).

    python bench/side_services.py [--tasks 200] [--rounds 3] [--out DIR]

Each round runs both, one after the other, in alternating order, on a fresh local stack (its start
not timed) in a private virtual host; a round's figure is (hung - up) / tasks, the added time per
task, and hung / up. The table gives the median round's and the range. Results go to
bench-results/side-services-<time>.json. Acceptance (issue 12): under 5 ms per task.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench import private_broker, stack  # noqa: E402
from conveyor import console  # noqa: E402
from conveyor.dispatch.dispatcher import dispatch  # noqa: E402
from conveyor.errors import ConveyorError  # noqa: E402
from conveyor.settings import environment  # noqa: E402

TARGET_MS = 5.0
CONFIG = """\
name: side-services bench
expected_workers: 2
tasks:
  - {{task: task_a, count: {half}, params: {{duration_s: 0}}}}
  - {{task: task_b, count: {half}, params: {{duration_s: 0}}}}
services:
  - {{name: worker-a, queues: [queue_a], concurrency: 2}}
  - {{name: worker-b, queues: [queue_b], concurrency: 2}}
stop_grace_s: 10
"""


@contextmanager
def hung_store() -> Iterator[str]:
    """A Redis URL whose server accepts every connection and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"redis://127.0.0.1:{server.getsockname()[1]}/0"
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in held:
            conn.close()
        server.close()


def one_dispatch(config_file: Path, records_url: str, tasks: int) -> float:
    with environment.environ({"RECORDS_URL": records_url, "WORKER_LOGLEVEL": "WARNING"}), stack(config_file) as local:
        report = dispatch(local.app, local.config, timeout_s=300)
    if report.succeeded != tasks:
        raise ConveyorError(f"a dispatch with RECORDS_URL={records_url} did not complete: {report.succeeded} of {tasks} succeeded")
    return report.total_time_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results")
    args = parser.parse_args()
    up_url = f"redis://{environment.DEFAULT_REDIS[0]}:{environment.DEFAULT_REDIS[1]}/0"

    def run() -> None:
        rounds: list[dict[str, Any]] = []
        with private_broker(), hung_store() as hung_url:
            config_file = Path(environment.run_dir()) / "side-services.yml"
            config_file.parent.mkdir(parents=True, exist_ok=True)
            config_file.write_text(CONFIG.format(half=args.tasks // 2))
            for i in range(args.rounds):
                order = [("up", up_url), ("hung", hung_url)]
                times = {name: one_dispatch(config_file, url, args.tasks) for name, url in (order if i % 2 == 0 else order[::-1])}
                added_ms = (times["hung"] - times["up"]) / args.tasks * 1000
                rounds.append({"up_s": times["up"], "hung_s": times["hung"], "added_ms_per_task": added_ms,
                               "hung_over_up": times["hung"] / times["up"]})
                console.say(f"round {i + 1}: up {times['up']:.2f} s, hung {times['hung']:.2f} s, "
                           f"{added_ms:+.2f} ms per task, hung/up {times['hung'] / times['up']:.2f}")
        median = sorted(rounds, key=lambda r: r["added_ms_per_task"])[len(rounds) // 2]
        result = {"tasks": args.tasks, "rounds": rounds, "median_round": median,
                  "hung_record_store_added_ms_per_task": median["added_ms_per_task"],
                  "hung_record_store_over_up": median["hung_over_up"],
                  "added_ms_range": [min(r["added_ms_per_task"] for r in rounds), max(r["added_ms_per_task"] for r in rounds)],
                  "target_ms": TARGET_MS, "met": median["added_ms_per_task"] < TARGET_MS}
        args.out.mkdir(parents=True, exist_ok=True)
        out = args.out / f"side-services-{time.strftime('%Y%m%d-%H%M%S')}.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        console.say(f"A hung record store added {median['added_ms_per_task']:.2f} ms per task to a {args.tasks}-task "
                   f"dispatch (median of {len(rounds)} rounds; hung/up {median['hung_over_up']:.2f}; "
                   f"range {result['added_ms_range'][0]:.2f} to {result['added_ms_range'][1]:.2f} ms); "
                   f"target under {TARGET_MS:g} ms: {'met' if result['met'] else 'NOT met'}. {out}")
        if statistics.median(r["up_s"] for r in rounds) <= 0:
            raise ConveyorError("the runs with the store up took no time: nothing was measured")

    console.run(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
