#!/usr/bin/env python3
"""`make bench`: conveyor against its peers and its own targets, in one run, printed as one table.

    python bench/bench.py [--tasks N] [--seed-s S] [--no-peers] [--out DIR]

1. No-op tasks end to end (results back to the caller, late acks, persistent messages): the peers of
   ../shared/bench (raw AMQP floor, plain and tuned Celery, Dramatiq), then conveyor with its default
   settings and tuned (bench/noop.yml). The systems the targets name (raw AMQP, Dramatiq, conveyor
   tuned) run in --rounds paired rounds, one after the other in each: a ratio is taken within each
   round, seconds apart, and the table gives the median round's and the range, since this machine's
   speed drifts by tens of per cent between runs minutes apart. Each conveyor run also gives its
   CPU per task, from /proc (bench/proc_cpu.py): RabbitMQ's process, the workers the local stack
   started (with their pool processes) and this process, the caller, over the measured run.
2. The seed workload (0.1 s / 0.2 s tasks, bench/seed.yml) against its ideal throughput.
3. The same with 1, 2 and 4 replicas per service.
4. The dispatcher's cost per task, and the p99 latency at half the no-op saturation rate.
5. dispatch.py against the load tester, the same no-op tasks end to end on the same tuned stack,
   in DISPATCH_PAIRS pairs one after the other: the ratio of their rates, median pair and range.

Everything of ours runs in a private RabbitMQ virtual host with its own run directory, both removed
afterwards. Results go to bench-results/bench-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from conveyor.settings import environment
from conveyor.cli import common
from conveyor.amqp import queues
from conveyor.runtime.app import create_app  # noqa: E402
from conveyor.settings.config import load_config  # noqa: E402
from conveyor.errors import ConveyorError, StackError, UsageError  # noqa: E402
from conveyor.loadtest.metrics import summarize  # noqa: E402
from conveyor.seam.publisher import Publisher  # noqa: E402
from conveyor.loadtest.runner import Options, Runner  # noqa: E402
from conveyor.loadtest.scenario import Plan, Scenario  # noqa: E402
from conveyor.stack.local import LocalStack  # noqa: E402
from conveyor.monitor import Monitor  # noqa: E402
from conveyor.tasks.simulated import SIMULATED as TASKS  # noqa: E402
from conveyor import console

import proc_cpu  # noqa: E402 (bench/, beside this script)

PEERS = ROOT.parent / "shared" / "bench" / "peers.sh"
PEER_NAMES = {"raw-amqp": "raw AMQP floor (pika)", "celery-prefork-c2": "Celery, plain",
              "celery-prefork-c2-tuned": "Celery, tuned", "dramatiq-p2-t8": "Dramatiq"}
MANAGEMENT = "http://127.0.0.1:15672/api/"  # named in the error message when it does not answer
DISPATCHER_RUNS = 5
TARGETS = {"vs_dramatiq": 1.0, "vs_raw": 0.5, "seed_efficiency": 0.9, "scale_2x": 1.8,
           "dispatcher_ms": 0.2, "p99_half_saturation_ms": 50.0, "dispatch_vs_load_tester": 0.8,
           "default_vs_celery": 1.0, "default_vs_dramatiq": 0.5}  # the last: issue 16's stretch target
DISPATCH_PAIRS = 3  # load tester, then dispatch.py, this many times on one stack


def management(method: str, path: str, body: bytes | None = None) -> None:
    queues.management_request(environment.DEFAULT_BROKER_URL, path, method, body, timeout_s=10)


@contextmanager
def private_broker() -> Iterator[None]:
    """A virtual host and a run directory of our own for the whole benchmark, removed afterwards."""
    vhost = f"conveyor-bench-{uuid.uuid4().hex[:8]}"
    run_dir = tempfile.mkdtemp(prefix="conveyor-bench-")
    try:
        management("PUT", f"vhosts/{vhost}")
        management("PUT", f"permissions/{vhost}/guest", b'{"configure":".*","write":".*","read":".*"}')
    except OSError as exc:
        raise StackError(f"cannot create a RabbitMQ virtual host through {MANAGEMENT} ({exc}); "
                         "the benchmark needs RabbitMQ with its management plugin on 127.0.0.1") from None
    try:
        with environment.environ(dict(BROKER_URL=f"amqp://guest:guest@127.0.0.1:5672/{vhost}", RESULT_BACKEND="rpc://",
                         **{environment.RUN_DIR_ENV: run_dir})):
            yield
    finally:
        management("DELETE", f"vhosts/{vhost}")
        shutil.rmtree(run_dir, ignore_errors=True)


# The tuned runs switch task records off (environment.RECORDS_URL_ENV): the peers keep none, and what
# the records cost is measured apart in docs/performance.md. Workers log at WARNING, as the peers'
# do: at INFO, Celery writes two log lines per task.
TUNED_ENV = {"RECORDS_URL": "off", "WORKER_LOGLEVEL": "WARNING"}


@contextmanager
def stack(config_file: Path, wait_s: float = 120) -> Iterator[LocalStack]:
    config = load_config(config_file)
    app = create_app(config, environment.resolve())
    local = LocalStack(app, config)
    try:
        local.up(wait_s=wait_s)
        yield local
    finally:
        local.down()
        app.close()


def run_peers(n: int, systems: list[str]) -> dict[str, float]:
    """Tasks per second of each of `systems` (peers.sh's names: raw, celery, celery-tuned, dramatiq)."""
    if not PEERS.is_file():
        return {}
    console.say(f"Peers: {PEERS} {n} {' '.join(systems)}...")
    proc = subprocess.run(["bash", str(PEERS), str(n), *systems], capture_output=True, text=True, timeout=1800)
    rates = {}
    for line in proc.stdout.splitlines():
        try:
            row = json.loads(line)
            rates[row["system"]] = row["tasks_per_s"]
        except (ValueError, KeyError):
            continue
    if proc.returncode != 0:
        console.say(f"peers.sh failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    return rates


def one_type(task: str, runtime_s: float) -> Scenario:
    return Scenario(name=f"bench {task}", max_queue_depth=1_000_000, batch_size=500,
                    mix=[{"task": task, "runtime_s": runtime_s}])


def measure(app, scenario: Scenario, counts: dict[str, int] | None, timeout_s: float, **options: Any) -> dict[str, Any]:
    outcome = Runner(app, scenario, Plan(scenario, counts), Options(timeout_s=timeout_s, **options)).run()
    summary = summarize(outcome.records, outcome.stats)
    if summary["pending"] or summary["not_sent"] or summary["failed"]:
        raise ConveyorError(f"benchmark run {scenario.name!r} did not complete: {summary['pending']} pending, "
                            f"{summary['not_sent']} not sent, {summary['failed']} failed")
    return summary


def broker_port() -> int:
    return urlsplit(environment.resolve().broker_url).port or 5672


def noop(config_file: Path, n: int, monitored: bool = False) -> dict[str, Any]:
    """n no-op tasks end to end on a fresh stack, after a warm-up: the rate, and the CPU per task of
    the broker, the workers (with their pool processes) and this process (the caller) over the run.
    The broker is shared with whatever else uses it meanwhile; on an idle machine that is nothing.
    `monitored`: `make monitor`'s Monitor runs in this process meanwhile (its CPU counts in the
    caller's), and the succeeded count it shows afterwards is kept beside the load test's."""
    scenario = one_type("task_a", 0.0)
    broker = proc_cpu.broker_pid(broker_port())
    if broker is None:
        console.say(f"No RabbitMQ process found listening on port {broker_port()}: the broker's CPU per task is n/a.")
    with stack(config_file) as local, (Monitor(local, local.config.monitoring) if monitored else nullcontext()) as monitor:
        warm_up = min(500, n)
        measure(local.app, scenario, {"task_a": warm_up}, 120)  # warm-up: connections, caches
        workers = [int(r.ident) for r in local.replicas() if r.running]
        before = proc_cpu.snapshot(broker, workers, os.getpid())
        summary = measure(local.app, scenario, {"task_a": n}, 600)
        after = proc_cpu.snapshot(broker, workers, os.getpid())
        result = {"tasks": n, "tasks_per_s": summary["throughput_per_s"], "latency_s": summary["latency_s"],
                  "sender_ms_per_task": summary["sender"]["per_task_ms"],
                  "cpu_ms_per_task": proc_cpu.per_task_ms(before, after, n, proc_cpu.HZ)}
        if monitor is not None:
            monitor.collect()
            shown = {row["name"]: row["succeeded"] for row in monitor.snapshot()["tasks"]}
            result["monitor_succeeded"] = shown.get("task_a")
            result["load_test_succeeded"] = warm_up + summary["succeeded"]
    return result


def half_saturation(config_file: Path, saturation_per_s: float, seconds: float) -> dict[str, Any]:
    scenario = one_type("task_a", 0.0)
    rate = saturation_per_s / 2
    with stack(config_file) as local:
        measure(local.app, scenario, {"task_a": 1000}, 120)  # warm-up: every replica busy at least once
        summary = measure(local.app, scenario, None, seconds + 60, duration_s=seconds, rate_per_s=rate)
    return {"rate_per_s": rate, "sent": summary["sent"], "latency_s": summary["latency_s"]}


def dispatcher_cost(config_file: Path, n: int) -> dict[str, Any]:
    """Publishing alone, into a queue no worker consumes (then purged): the batch publisher of the
    load tester (the median of DISPATCHER_RUNS runs of n tasks), and dispatch.py's way (the app's
    producer, a confirm awaited per message)."""
    config = load_config(config_file)
    app = create_app(config, environment.resolve())
    try:
        from conveyor.tasks import deadletter

        deadletter.declare(app)
        kwargs = {"duration_s": 0}
        with Publisher(app) as pub:
            def send(_producer: Any) -> str:
                return pub.send_task("task_a", kwargs, repr(kwargs))

            pub.publish(send)
            pub.flush()  # warm: the first frames
            runs = []
            for _ in range(DISPATCHER_RUNS):  # a run takes a second or two: one stall of the machine moves it
                t0, c0 = time.perf_counter(), time.process_time()
                for start in range(0, n, 500):  # as the load tester sends: a batch unconfirmed at most
                    for _ in range(min(500, n - start)):
                        pub.publish(send)
                    pub.flush(in_flight=500)
                pub.flush()
                runs.append(((time.perf_counter() - t0) * 1000 / n, (time.process_time() - c0) * 1000 / n))
            wall_ms, cpu_ms = sorted(runs)[len(runs) // 2]
        each = max(100, n // 10)
        with app.producer_or_acquire() as producer:
            t0 = time.perf_counter()
            for _ in range(each):
                app.send_task("task_a", kwargs={"duration_s": 0}, producer=producer)
            each_ms = (time.perf_counter() - t0) * 1000 / each
        app.control.purge()
    finally:
        app.close()
    return {"async_confirm_ms": wall_ms, "async_confirm_cpu_ms": cpu_ms, "confirm_each_ms": each_ms, "tasks": n,
            "async_confirm_runs_ms": [wall for wall, _ in runs]}


def dispatch_vs_load_tester(config_file: Path, n: int, pairs: int = DISPATCH_PAIRS) -> dict[str, Any]:
    """n no-op tasks end to end, by the load tester (in process) and then by dispatch.py (its CLI,
    `--json`: its own total_time_s), `pairs` times on one stack: each pair's ratio of the rates."""
    scenario = one_type("task_a", 0.0)
    config = yaml.safe_load(config_file.read_text())
    config["tasks"] = [{"task": "task_a", "count": n, "params": {"duration_s": 0}}]
    rows = []
    with stack(config_file) as local, tempfile.TemporaryDirectory(prefix="conveyor-bench-dispatch-") as tmp:
        dispatch_config = Path(tmp) / "dispatch.yml"
        dispatch_config.write_text(yaml.safe_dump(config))
        measure(local.app, scenario, {"task_a": min(500, n)}, 120)  # warm-up: connections, caches
        for _ in range(pairs):
            load_tester = measure(local.app, scenario, {"task_a": n}, 600)["throughput_per_s"]
            proc = subprocess.run([sys.executable, str(ROOT / "dispatch.py"), "--config", str(dispatch_config),
                                   "--json", "--timeout", "600"], capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                raise ConveyorError(f"dispatch.py failed in the benchmark (exit {proc.returncode}): "
                                    f"{proc.stderr.strip().splitlines()[-1:]}")
            report = json.loads(proc.stdout)
            dispatch = report["succeeded"] / report["total_time_s"]
            rows.append({"dispatch_per_s": dispatch, "load_tester_per_s": load_tester, "ratio": dispatch / load_tester})
            console.say(f"dispatch.py {dispatch:.0f}/s, load tester {load_tester:.0f}/s: {dispatch / load_tester:.2f}x.")
    ordered = sorted(rows, key=lambda r: r["ratio"])
    return {"tasks": n, "pairs": rows, **ordered[(len(ordered) - 1) // 2],
            "low": ordered[0]["ratio"], "high": ordered[-1]["ratio"]}


def seed_scaling(config_file: Path, seconds: float, replicas: list[int]) -> list[dict[str, Any]]:
    """The seed workload at each replica count, sized so that an ideal stack takes `seconds`."""
    config = load_config(config_file)
    a, b = TASKS["task_a"], TASKS["task_b"]
    scenario = Scenario(name="bench seed", max_queue_depth=1_000_000,
                        mix=[{"task": "task_a", "runtime_s": a.default_duration_s},
                             {"task": "task_b", "runtime_s": b.default_duration_s}])
    rows = []
    with stack(config_file) as local:
        for count in replicas:
            local.scale_to({svc.name: count for svc in config.services}, wait_s=120)
            slots = {t.name: config.service(config.task_type(t.name).queue).concurrency * count for t in (a, b)}
            ideal = {name: slots[name] / TASKS[name].default_duration_s for name in slots}  # tasks/s per type
            counts = {name: round(ideal[name] * seconds) for name in ideal}
            summary = measure(local.app, scenario, counts, seconds * 10 + 60)
            rows.append({"replicas": count, "tasks": sum(counts.values()), "tasks_per_s": summary["throughput_per_s"],
                         "ideal_per_s": sum(ideal.values()), "efficiency": summary["throughput_per_s"] / sum(ideal.values()),
                         "latency_s": summary["latency_s"], "workers": summary["workers"]})
            console.say(f"Seed workload, {count} replica(s) per service: {rows[-1]['tasks_per_s']:.1f}/s "
                    f"of an ideal {rows[-1]['ideal_per_s']:.0f}/s.")
    return rows


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def paired_rounds(n: int, rounds: int, peers: bool) -> tuple[list[dict[str, float]], list[dict[str, Any]]]:
    """Raw AMQP, Dramatiq and conveyor tuned, one after the other, `rounds` times: tasks/s by system
    in each round, and conveyor tuned's own run in each (its rate and CPU per task)."""
    measured, tuned = [], []
    for number in range(1, rounds + 1):
        row = run_peers(n, ["raw", "dramatiq"]) if peers else {}
        console.say(f"Round {number} of {rounds}: conveyor, no-op tasks, tuned...")
        run = noop(ROOT / "bench" / "noop.yml", n)
        row["conveyor-tuned"] = run["tasks_per_s"]
        measured.append(row)
        tuned.append({"round": number, "tasks": n, "tasks_per_s": run["tasks_per_s"], "cpu_ms_per_task": run["cpu_ms_per_task"]})
    return measured, tuned


def median_round(rounds: list[dict[str, float]], peer: str) -> dict[str, Any] | None:
    """conveyor's ratio to `peer` in each round: the median (the middle round's, not a mix of rounds) and the range."""
    paired = sorted((r["conveyor-tuned"] / r[peer], i) for i, r in enumerate(rounds) if r.get(peer))
    if not paired:
        return None
    value, index = paired[(len(paired) - 1) // 2]
    return {"ratio": value, "round": index + 1, "low": paired[0][0], "high": paired[-1][0],
            "ours": rounds[index]["conveyor-tuned"], "peer": rounds[index][peer]}


def verdict(value: float | None, target: float, higher_is_better: bool = True) -> str:
    if value is None:
        return "n/a"
    return "met" if (value >= target if higher_is_better else value <= target) else "NOT MET"


def table(results: dict[str, Any]) -> str:
    rows: list[tuple[str, str, str, str]] = []
    peers, rounds = results["peers"], results["rounds"]
    n = len(rounds)
    for key, label in PEER_NAMES.items():
        if key in peers:
            rows.append((f"no-op: {label}", f"{peers[key]:.0f}/s", "", ""))
        elif any(key in r for r in rounds):
            rows.append((f"no-op: {label}, {n} rounds", _spread([r[key] for r in rounds if key in r]), "", ""))
    rows.append(("no-op: conveyor, default settings (test-config.yml: records, tallies, monitoring on)",
                 f"{results['noop']['default']['tasks_per_s']:.0f}/s", "", ""))
    r = results["ratios"]
    default = results["noop"]["default"]
    if "monitor_succeeded" in default:
        rows.append(("  default: succeeded as make monitor shows them, and as the load test counted",
                     f"{default['monitor_succeeded']}, {default['load_test_succeeded']}", "equal",
                     "met" if default["monitor_succeeded"] == default["load_test_succeeded"] else "NOT MET"))
    rows.append(("  default vs Celery, plain (run after it)", _x(r.get("default_vs_celery")), ">= 1.0x",
                 verdict(r.get("default_vs_celery"), TARGETS["default_vs_celery"])))
    rows.append(("  default vs Dramatiq (median of its rounds), stretch", _x(r.get("default_vs_dramatiq")), ">= 0.5x",
                 verdict(r.get("default_vs_dramatiq"), TARGETS["default_vs_dramatiq"])))
    rows.append((f"no-op: conveyor, tuned (bench/noop.yml, records off), {n} rounds",
                 _spread([r["conveyor-tuned"] for r in rounds]), "", ""))
    cpu = results["cpu_ms_per_task"]
    rows.append((f"CPU per task, default stack: {proc_cpu.describe(cpu['default'])}", _ms(cpu["default"]), "", ""))
    rows.append((f"CPU per task, tuned stack (median of {n} rounds): {proc_cpu.describe(cpu['tuned'])}",
                 _ms(cpu["tuned"]), "", ""))
    r = results["ratios"]
    for peer, key, label in (("dramatiq-p2-t8", "vs_dramatiq", "Dramatiq"), ("raw-amqp", "vs_raw", "raw AMQP floor")):
        paired = results["paired"][peer]
        shown = "-" if paired is None else f"{paired['ratio']:.3f}x ({paired['low']:.2f}-{paired['high']:.2f})"
        rows.append((f"  tuned vs {label}, median round (range)", shown, f">= {TARGETS[key]:.1f}x",
                     verdict(r[key], TARGETS[key])))
    rows.append(("  tuned vs Celery, plain", _x(r["vs_celery"]), "", ""))
    for row in results["seed"]:
        rows.append((f"seed workload (bench/seed.yml), {row['replicas']} replica(s) per service",
                     f"{row['tasks_per_s']:.1f}/s of {row['ideal_per_s']:.0f}/s", ">= 90 %" if row["replicas"] == 1 else "",
                     f"{row['efficiency']:.0%}" + (f" {verdict(row['efficiency'], TARGETS['seed_efficiency'])}" if row["replicas"] == 1 else "")))
    rows.append(("  scale-out 2 vs 1 replica", _x(r["scale_2x"]), ">= 1.8x", verdict(r["scale_2x"], TARGETS["scale_2x"])))
    rows.append(("  scale-out 4 vs 1 replica", _x(r["scale_4x"]), "", ""))
    d = results["dispatcher"]
    rows.append((f"dispatcher per task, async confirms (load tester), median of {len(d['async_confirm_runs_ms'])}",
                 f"{d['async_confirm_ms']:.3f} ms", "<= 0.2 ms",
                 verdict(d["async_confirm_ms"], TARGETS["dispatcher_ms"], higher_is_better=False)))
    rows.append(("dispatcher per task, a confirm each (app.send_task)", f"{d['confirm_each_ms']:.3f} ms", "", ""))
    dv = results["dispatch_vs_load_tester"]
    rows.append((f"dispatch.py vs the load tester, no-op end to end, median of {len(dv['pairs'])} pairs",
                 f"{dv['ratio']:.2f}x ({dv['low']:.2f}-{dv['high']:.2f})", ">= 0.8x",
                 verdict(dv["ratio"], TARGETS["dispatch_vs_load_tester"])))
    rows.append(("  dispatch.py, load tester (median pair)",
                 f"{dv['dispatch_per_s']:.0f}/s, {dv['load_tester_per_s']:.0f}/s", "", ""))
    h = results["half_saturation"]
    p99 = h["latency_s"]["p99"] * 1000
    rows.append((f"p99 latency at half saturation ({h['rate_per_s']:.0f}/s)", f"{p99:.1f} ms", "<= 50 ms",
                 verdict(p99, TARGETS["p99_half_saturation_ms"], higher_is_better=False)))
    width = max(len(row[0]) for row in rows)
    lines = [f"{'BENCHMARK':<{width}}  {'RESULT':>22}  {'TARGET':>9}  RATIO/VERDICT"]
    lines += [f"{a:<{width}}  {b:>22}  {c:>9}  {d}" for a, b, c, d in rows]
    return "\n".join(lines)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _ms(cpu: dict[str, float | None] | None) -> str:
    """The total CPU per task of one stack: '1.14 ms in all'."""
    total = (cpu or {}).get("total")
    return "n/a" if total is None else f"{total:.2f} ms in all"


def _spread(rates: list[float]) -> str:
    """The median tasks/s and the range: '858/s (701-902)'."""
    return f"{statistics.median(rates):.0f}/s ({min(rates):.0f}-{max(rates):.0f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000, help="no-op tasks per system (default 10000)")
    parser.add_argument("--seed-s", type=float, default=8.0, help="ideal duration of each seed-workload run (default 8)")
    parser.add_argument("--half-saturation-s", type=float, default=10.0, help="length of the half-saturation run (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="paired rounds of raw AMQP, Dramatiq and conveyor tuned (default 3)")
    parser.add_argument("--no-peers", action="store_true", help="skip ../shared/bench (no ratios against them)")
    parser.add_argument("--out", default=str(ROOT / "bench-results"), help="directory for the JSON (default bench-results/)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    common.setup_logging(args.verbose)
    if args.tasks < 100 or args.rounds < 1 or args.seed_s <= 0 or args.half_saturation_s <= 0:
        raise UsageError("--tasks must be at least 100, --rounds at least 1, --seed-s and --half-saturation-s more than 0")
    started = time.time()
    results: dict[str, Any] = {"started_at": started, "tasks": args.tasks, "targets": TARGETS}
    peers = not args.no_peers and PEERS.is_file()
    if not args.no_peers and not peers:
        console.say(f"No peer benchmarks at {PEERS}: comparing with nothing.")
    results["peers"] = run_peers(args.tasks, ["celery", "celery-tuned"]) if peers else {}
    with private_broker():
        console.say("conveyor, no-op tasks, default settings...")
        # As many tasks as the peers ran: the same work, the same share of start and end in the rate.
        results["noop"] = {"default": noop(ROOT / "test-config.yml", args.tasks, monitored=True)}
        with environment.environ(TUNED_ENV):
            results["rounds"], results["noop"]["tuned"] = paired_rounds(args.tasks, args.rounds, peers)
            tuned = statistics.median(r["conveyor-tuned"] for r in results["rounds"])
            console.say("Dispatcher cost per task...")
            results["dispatcher"] = dispatcher_cost(ROOT / "bench" / "noop.yml", 5_000)
            console.say("dispatch.py against the load tester, no-op tasks end to end...")
            results["dispatch_vs_load_tester"] = dispatch_vs_load_tester(ROOT / "bench" / "noop.yml", 5_000)
            console.say("p99 latency at half the no-op saturation rate...")
            results["half_saturation"] = half_saturation(ROOT / "bench" / "noop.yml", tuned, args.half_saturation_s)
            console.say("Seed workload at 1, 2 and 4 replicas per service...")
            results["seed"] = seed_scaling(ROOT / "bench" / "seed.yml", args.seed_s, [1, 2, 4])
    seed = {r["replicas"]: r for r in results["seed"]}
    results["cpu_ms_per_task"] = {"default": results["noop"]["default"]["cpu_ms_per_task"],
                                  "tuned": proc_cpu.median_by_total([r["cpu_ms_per_task"] for r in results["noop"]["tuned"]])}
    results["paired"] = {peer: median_round(results["rounds"], peer) for peer in ("dramatiq-p2-t8", "raw-amqp")}
    results["ratios"] = {
        "vs_dramatiq": (results["paired"]["dramatiq-p2-t8"] or {}).get("ratio"),
        "vs_raw": (results["paired"]["raw-amqp"] or {}).get("ratio"),
        "vs_celery": ratio(tuned, results["peers"].get("celery-prefork-c2")),
        # The default stack runs right after the Celery peers; Dramatiq, in the rounds: their median.
        "default_vs_celery": ratio(results["noop"]["default"]["tasks_per_s"], results["peers"].get("celery-prefork-c2")),
        "default_vs_dramatiq": ratio(results["noop"]["default"]["tasks_per_s"],
                                     _median([r["dramatiq-p2-t8"] for r in results["rounds"] if "dramatiq-p2-t8" in r])),
        "seed_efficiency": seed[1]["efficiency"],
        "scale_2x": ratio(seed[2]["tasks_per_s"], seed[1]["tasks_per_s"]),
        "scale_4x": ratio(seed[4]["tasks_per_s"], seed[1]["tasks_per_s"]),
        "dispatch_vs_load_tester": results["dispatch_vs_load_tester"]["ratio"],
    }
    results["duration_s"] = time.time() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench-{time.strftime('%Y%m%d-%H%M%S', time.localtime(started))}.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(table(results))
    print(f"\n{results['duration_s']:.0f} s in all; figures saved to {path}")
    return 0


if __name__ == "__main__":
    console.run(main)
