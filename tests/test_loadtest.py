"""The load tester: percentiles, the plan, scenario validation and the report need nothing; the
end-to-end runs (failure injection, every worker stopped) need RabbitMQ and start real workers."""

from __future__ import annotations

import json
import re
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from celery.app.task import Context
from celery.backends.rpc import RPCBackend as CeleryRPCBackend

from helpers import ROOT, run_cli, wait_for, write_config
from conveyor.settings import environment
from conveyor.tasks import deadletter
from conveyor.runtime.app import create_app
from conveyor.settings.config import load_config
from conveyor.errors import ConfigError
from conveyor.loadtest import report
from conveyor.seam import publisher
from conveyor.seam.publisher import Publisher
from conveyor.loadtest.metrics import Record, RunStats, Stage, distribution, summarize, timeline
from conveyor.stats import percentile_linear as percentile
from conveyor.loadtest.scenario import Plan, Scenario, load_scenario
from conveyor.loadtest.runner import young_collections_only

# --- the run's garbage collection ---------------------------------------------------------


def test_a_run_makes_no_full_collection_and_leaves_the_thresholds_as_it_found_them():
    import gc

    before = gc.get_threshold()
    with pytest.raises(RuntimeError):
        with young_collections_only():
            young, middle, oldest = gc.get_threshold()
            assert (young, middle) == before[:2] and oldest == 2**31 - 1
            full_passes, middle_passes = gc.get_stats()[2]["collections"], gc.get_stats()[1]["collections"]
            # Long-lived objects as a run's records, enough for two full passes without the context.
            kept = [[i] for i in range(200_000)]
            assert gc.get_stats()[2]["collections"] == full_passes
            assert gc.get_stats()[1]["collections"] > middle_passes  # the young generations still are
            raise RuntimeError("a run that fails")
    assert gc.get_threshold() == before
    del kept


# --- percentiles ---------------------------------------------------------------------------


def test_percentiles_interpolate_linearly_between_ranks():
    data = [15, 20, 35, 40, 50]  # shuffled below: order must not matter
    shuffled = [40, 15, 50, 20, 35]
    assert percentile(shuffled, 0) == 15
    assert percentile(shuffled, 50) == 35
    assert percentile(shuffled, 100) == 50
    # rank = (5 - 1) * 0.4 = 1.6: 20 + 0.6 * (35 - 20)
    assert percentile(data, 40) == pytest.approx(29.0)
    # rank = 4 * 0.95 = 3.8: 40 + 0.8 * 10; rank 3.96 for p99
    assert percentile(data, 95) == pytest.approx(48.0)
    assert percentile(data, 99) == pytest.approx(49.6)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(data, 101)


def test_percentiles_of_1_to_1000():
    values = list(range(1, 1001))
    assert percentile(values, 50) == pytest.approx(500.5)
    assert percentile(values, 95) == pytest.approx(950.05)
    assert percentile(values, 99) == pytest.approx(990.01)
    d = distribution([*values, None])
    assert d["count"] == 1000 and d["max"] == 1000 and d["mean"] == pytest.approx(500.5)


# --- the plan ------------------------------------------------------------------------------


def scenario(**extra) -> Scenario:
    mix = extra.pop("mix", [{"task": "task_a", "weight": 3}, {"task": "task_b", "runtime_s": [0.1, 0.2], "error_rate": 0.5}])
    return Scenario(name="unit", mix=mix, **extra)


def test_tasks_per_type_is_shared_out_by_weight_and_interleaved():
    plan = Plan.per_type(scenario(), 10)
    assert plan.counts == {"task_a": 15, "task_b": 5} and plan.total == 20
    jobs = list(plan)
    assert [j.index for j in jobs] == list(range(20))
    types = [j.type for j in jobs]
    assert types.count("task_a") == 15 and types.count("task_b") == 5
    # Interleaved by weight, not all of one type first: every run of four holds one task_b.
    assert all("task_b" in types[i:i + 4] for i in range(0, 20, 4))


def test_jobs_carry_runtimes_in_range_distinct_seeds_and_are_reproducible():
    jobs = list(Plan.per_type(scenario(), 50))
    b = [dict(j.steps[0][1]) for j in jobs if j.type == "task_b"]
    assert all(0.1 <= kw["duration_s"] <= 0.2 for kw in b)
    assert all(kw["fail_probability"] == 0.5 for kw in b)
    assert len({kw["seed"] for kw in b}) == len(b)
    assert [j.steps for j in Plan.per_type(scenario(), 50)] == [j.steps for j in jobs]


def test_a_pipeline_entry_becomes_one_job_of_several_stages():
    s = scenario(mix=[{"name": "p", "task": "task_a", "runtime_s": 0.01, "payload_bytes": 8,
                       "stages": [{"task": "task_b", "runtime_s": 0.02}, {"task": "task_a"}]}])
    [job] = list(Plan.per_type(s, 1))
    assert [name for name, *_ in job.steps] == ["task_a", "task_b", "task_a"]
    assert [kw["duration_s"] for _, kw, _ in job.steps] == [0.01, 0.02, 0.1]
    assert job.steps[0][1]["payload"] == "x" * 8
    assert s.queues == ["queue_a", "queue_b"]


def test_shipped_scenarios_load():
    names = {p.stem: load_scenario(p) for p in (ROOT / "scenarios").glob("*.yml")}
    assert {"seed", "flood", "pipeline"} <= set(names)
    assert [e.task for e in names["seed"].mix] == ["task_a", "task_b"]
    [flood] = names["flood"].mix
    assert flood.task == "task_a" and not flood.stages
    [pipe] = names["pipeline"].mix
    assert len(pipe.steps) == 3 and all(step.error_rate == 0.1 for step in pipe.steps)


# --- scenario errors -----------------------------------------------------------------------


@pytest.mark.parametrize("body, line, field, message", [
    ("name: bad\nmix:\n  - task: task_a\n    error_rate: 1.5\n", 4, "mix[0].error_rate", "less than or equal to 1"),
    ("name: bad\nmix:\n  - task: task_a\n    stages:\n      - {task: task_b, runtime: 1}\n", 5,
     "mix[0].stages[0].runtime", "unknown key"),
    ("name: bad\nmix:\n  - task: task_a\n    runtime_s: [0.5, 0.1]\n", 3, "mix[0]", "first value of the range"),
    ("name: bad\nrate_per_s: -3\nmix:\n  - task: task_a\n", 2, "rate_per_s", "greater than 0"),
    ("name: bad\nmix:\n  - task: task_a\n  - task: task_a\n", 4, "mix[1].task", "appears twice"),
])
def test_a_scenario_with_an_error_is_rejected_with_file_line_and_field(tmp_path, body, line, field, message):
    path = write_config(tmp_path / "bad.yml", body)
    with pytest.raises(ConfigError) as info:
        load_scenario(path)
    text = str(info.value)
    assert text.startswith(f"{path}:{line}: {field}: "), text
    assert message in text


def test_the_cli_rejects_a_bad_scenario_in_one_line(tmp_path):
    path = write_config(tmp_path / "bad.yml", "name: bad\nmix:\n  - task: task_q\n")
    proc = run_cli("load_test.py", "--scenario", str(path), timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith(f"error: {path}:3: mix[0].task: ")


def test_the_cli_rejects_bad_numbers_in_one_line():
    proc = run_cli("load_test.py", "--tasks", "0", timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --tasks must be at least 1, got 0"


# --- records, summary and report -----------------------------------------------------------


def synthetic_records() -> list[Record]:
    t0 = 1_000.0
    ok = Record(0, "task_a", t0, [Stage("task_a", "a", "SUCCESS", t0 + 0.5, 0.1, t0 + 0.7, 0, "w1@h")])
    retried = Record(1, "task_a", t0, [Stage("task_a", "b", "SUCCESS", t0 + 1.0, 0.1, t0 + 1.2, 2, "w2@h")])
    dead = Record(2, "pipe", t0 + 0.1, [Stage("task_a", "c", "SUCCESS", t0 + 0.2, 0.1, t0 + 0.4, 0, "w1@h"),
                                        Stage("task_b", "d", "DEAD_LETTERED", None, None, t0 + 2.1, 3, None, "boom"),
                                        Stage("task_a", "e")])
    pending = Record(3, "pipe", t0 + 0.2, [Stage("task_a", "f"), Stage("task_b", "g"), Stage("task_a", "h")])
    return [ok, retried, dead, pending]


def test_a_pipeline_ends_at_its_first_failed_stage_and_wait_excludes_run_time():
    ok, retried, dead, pending = synthetic_records()
    assert dead.state == "DEAD_LETTERED" and dead.done and dead.latency_s == pytest.approx(2.0)
    assert dead.retries == 3 and dead.outcome.error == "boom"
    assert pending.state == "PENDING" and not pending.done and pending.latency_s is None
    assert ok.wait_s == pytest.approx(0.5) and ok.execution_s == pytest.approx(0.1)
    assert retried.latency_s == pytest.approx(1.2)


def test_summary_counts_add_up():
    records = synthetic_records()
    stats = RunStats(planned=6, started_at=1_000.0, ended_at=1_003.0, timed_out=True, not_sent=2, send_s=0.004)
    s = summarize(records, stats)
    assert (s["sent"], s["succeeded"], s["failed"], s["dead_lettered"], s["pending"]) == (4, 2, 0, 1, 1)
    assert s["sent"] == s["succeeded"] + s["failed"] + s["dead_lettered"] + s["pending"]
    assert s["sent"] + s["not_sent"] == s["planned"]
    assert s["retried"] == 2 and s["retries"] == 5 and s["workers"] == 2
    assert s["window_s"] == pytest.approx(2.1) and s["throughput_per_s"] == pytest.approx(3 / 2.1)
    assert s["types"]["pipe"]["stages"][1]["dead_lettered"] == 1
    assert s["sender"]["per_task_ms"] == pytest.approx(1.0)
    line = timeline(records)
    assert sum(line["sent"]) == 4 and sum(line["succeeded"]) == 2 and sum(line["failed"]) == 1


def test_report_directory_has_the_plots_and_one_self_contained_page(tmp_path):
    records = synthetic_records()
    summary = summarize(records, RunStats(planned=4, started_at=1_000.0, ended_at=1_003.0, timed_out=True))
    written = report.write_dir(tmp_path / "out", summary, records, "unit")
    names = sorted(p.name for p in written)
    assert names == ["jobs.csv", "latency.png", "report.html", "summary.json", "throughput.png"]
    assert_report(tmp_path / "out")


def assert_report(directory: Path) -> None:
    for png in ("throughput.png", "latency.png"):
        data = (directory / png).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5_000
    page = (directory / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 2
    assert "src=\"http" not in page and "<link" not in page  # nothing to fetch: it stands alone
    assert json.loads((directory / "summary.json").read_text())["sent"] >= 1


# --- end to end, against RabbitMQ with real workers ------------------------------------------

STACK_CONFIG = """\
name: loadtest
expected_workers: 2
tasks: [{task: task_a, count: 1}]
retry: {max_retries: 1, backoff_s: 1, backoff_max_s: 1, jitter: false}
services:
  - {name: worker-a, queues: [queue_a], concurrency: 4, replicas: 1, pool: threads}
  - {name: worker-b, queues: [queue_b], concurrency: 4, replicas: 1, pool: threads}
stop_grace_s: 10
"""

FAILING = """\
name: failing
mix:
  - name: single
    task: task_a
    runtime_s: [0, 0.01]
    error_rate: 0.5
  - name: pipe
    task: task_b
    runtime_s: 0.005
    error_rate: 0.3
    stages:
      - {task: task_a, runtime_s: 0.005, error_rate: 0.3}
"""


@pytest.fixture
def empty_queues(broker_env, make_app):
    """The session's vhost is shared with the other broker tests: start and leave the work queues
    and the dead-letter queue empty, whatever these runs left there."""
    app = make_app()

    def empty() -> None:
        app.control.purge()
        deadletter.drain(app)

    empty()
    yield
    empty()


# The lean tuning takes the fast paths: Publisher.send_task (no task-sent event to send) and
# results published without a confirm each; the default one goes through app.send_task.
LEAN_TUNING = "tuning: {task_events: false, track_started: false, result_extended: false, result_confirms: false}\n"
# The same without any of the seam's fast paths: kombu's public Producer.publish, Celery's result consumer.
NO_FAST_PATHS = LEAN_TUNING.replace("}", ", fast_paths: false}")


@pytest.mark.e2e
@pytest.mark.broker
@pytest.mark.usefixtures("empty_queues")
@pytest.mark.parametrize("tuning", ["", LEAN_TUNING, NO_FAST_PATHS], ids=["default", "lean", "no-fast-paths"])
def test_counts_add_up_on_a_run_with_injected_failures(broker_env, local_stack, tmp_path, tuning):
    config = write_config(tmp_path / "stack.yml", STACK_CONFIG + tuning)
    local_stack(config)
    local = {**broker_env, "STACK": "local"}  # the stack under test, whether or not Docker is here
    scenario_file = write_config(tmp_path / "failing.yml", FAILING)
    out = tmp_path / "report"
    proc = run_cli("load_test.py", "--scenario", str(scenario_file), "--config", str(config), "--tasks-per-type", "40",
                   "--json", "--report", str(out), "--timeout", "60", env=local, timeout=120)
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert s["sent"] == s["planned"] == 80 and s["not_sent"] == 0 and not s["timed_out"]
    assert s["sent"] == s["succeeded"] + s["failed"] + s["dead_lettered"] + s["pending"]
    assert s["pending"] == 0 and s["failed"] == 0
    # p = 0.5 per attempt, two attempts: a quarter of the single tasks are dead-lettered, and
    # half are retried; with 40 of them, both are certain to happen (seeds are fixed).
    single, pipe = s["types"]["single"], s["types"]["pipe"]
    assert single["dead_lettered"] > 0 and single["retried"] > single["dead_lettered"]
    assert s["dead_lettered"] == single["dead_lettered"] + pipe["dead_lettered"]
    assert [st["task"] for st in pipe["stages"]] == ["task_b", "task_a"]
    assert pipe["stages"][1]["succeeded"] == pipe["succeeded"]
    assert s["workers"] == 2 and s["latency_s"]["count"] == 80
    assert s["latency_s"]["p50"] <= s["latency_s"]["p99"] <= s["latency_s"]["max"]
    assert_report(out)
    # `make monitor --once --json` afterwards, a new process: its task counts are the workers' and the
    # caller's tallies in the record store, and equal the load test's, task type by task type. The
    # pipe's second stage is a task_a sent by the worker that ran its first stage, only when that
    # succeeded; where the first stage was dead-lettered, Celery stores the same failure (and its
    # retry) as the second stage's result too, and the load test counts it there, though that
    # task_a never ran: with max_retries 1, each such first stage was retried once first.
    proc = run_cli("monitor.py", "--once", "--json", "--no-prometheus", "--config", str(config), env=local, timeout=60)
    assert proc.returncode == 0, proc.stderr
    shown = {t["name"]: t for t in json.loads(proc.stdout)["tasks"]}
    first, second = pipe["stages"]
    never_ran = first["dead_lettered"]
    expected = {
        "task_a": {"sent": single["sent"] + first["succeeded"], "succeeded": single["succeeded"] + second["succeeded"],
                   "retried": single["retried"] + second["retried"] - never_ran,
                   "dead_lettered": single["dead_lettered"] + second["dead_lettered"] - never_ran, "retrying": 0},
        "task_b": {"sent": pipe["sent"], "succeeded": first["succeeded"], "retried": first["retried"],
                   "dead_lettered": first["dead_lettered"], "retrying": 0},
    }
    assert {name: {k: shown[name][k] for k in expected[name]} for name in expected} == expected


@pytest.mark.broker
@pytest.mark.usefixtures("empty_queues")
def test_with_every_worker_stopped_it_ends_at_its_timeout_and_says_so(broker_env):
    started = time.monotonic()
    proc = run_cli("load_test.py", "--tasks-per-type", "20", "--timeout", "3", "--max-depth", "15", env=broker_env, timeout=60)
    elapsed = time.monotonic() - started
    assert proc.returncode == 5, proc.stderr
    assert elapsed < 20
    out = proc.stdout
    assert "TIMED OUT after 3.0 s" in out and "no worker consumed queue_a, queue_b" in out
    # Backpressure: the sender filled the queues up to the bound, then waited for room until the timeout.
    sent, pending = map(int, re.search(r"Sent (\d+) of 40: 0 succeeded, 0 failed, 0 dead-lettered, (\d+) pending", out).groups())
    assert sent == pending and 15 <= sent <= 30
    assert f"{40 - sent} never sent" in out
    assert float(re.search(r"paused ([\d.]+) s on backpressure", out).group(1)) >= 2.0


@pytest.mark.broker
@pytest.mark.usefixtures("empty_queues")
def test_the_fast_send_path_publishes_the_message_send_task_would(broker_env, make_app, tmp_path):
    """Publisher.send_task skips per-message work but must not change the message a worker gets."""
    app = make_app(write_config(tmp_path / "lean.yml", STACK_CONFIG + LEAN_TUNING))
    kwargs = {"duration_s": 0.5, "payload": "xyz"}
    with Publisher(app) as pub:
        assert pub.fast
        slow = pub.publish(lambda producer: app.send_task("task_b", kwargs=kwargs, producer=producer, declare=[]).id)
        fast = pub.publish(lambda _producer: pub.send_task("task_b", kwargs, "{...}"))
        confirmed, refused = pub.flush()
    assert confirmed == [slow, fast] and refused == []
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        got = [channel.basic_get("queue_b", no_ack=True) for _ in range(2)]
    assert [m.headers["id"] for m in got] == [slow, fast]
    (a, b) = got
    differ = {"id", "root_id", "kwargsrepr", "argsrepr", "origin", "x-sent-at"}  # x-sent-at: each its own send time
    assert {k: v for k, v in a.headers.items() if k not in differ} == {k: v for k, v in b.headers.items() if k not in differ}
    assert a.headers.keys() == b.headers.keys()
    assert a.body == b.body and a.content_type == b.content_type == "application/json"
    for prop in ("delivery_mode", "reply_to", "content_encoding", "priority"):
        assert a.properties.get(prop) == b.properties.get(prop), prop
    assert b.properties["correlation_id"] == fast and b.properties["delivery_mode"] == 2


@pytest.mark.broker
def test_a_batch_goes_out_in_a_few_large_writes_in_publishing_order(broker_env, make_app, tmp_path):
    app = make_app(write_config(tmp_path / "lean.yml", STACK_CONFIG + LEAN_TUNING))
    deadletter.declare(app)  # the work queues too
    kwargs = {"duration_s": 0}
    with Publisher(app) as pub:
        write, writes = pub._transport.write, []
        pub._transport.write = lambda data: (writes.append(len(data)), write(data))

        def batch(n: int) -> list[str]:
            return [pub.publish(lambda producer: app.send_task("task_b", kwargs=kwargs, producer=producer, declare=[]).id)
                    if i % 50 == 0 else pub.publish(lambda _producer: pub.send_task("task_b", kwargs, "{...}"))
                    for i in range(n)]

        ids = batch(20)  # well under WRITE_BYTES: all still gathered...
        assert writes == []
        assert pub.queue_depth("queue_b") >= 0 and len(writes) == 1  # ...until the broker is asked something
        assert pub.flush() == (ids, [])
        ids += batch(400)
        confirmed, refused = pub.flush()
        assert confirmed == ids[20:] and refused == []
        assert 3 <= len(writes) <= 10 and max(writes) <= 2 * publisher.WRITE_BYTES, writes
        with app.connection_for_read() as conn:
            channel = conn.default_channel
            assert [channel.basic_get("queue_b", no_ack=True).headers["id"] for _ in range(420)] == ids


@pytest.mark.broker
@pytest.mark.usefixtures("empty_queues")
def test_confirms_are_collected_while_the_next_batch_goes_out(broker_env, make_app, tmp_path):
    """flush(in_flight) leaves at most that many messages unconfirmed and hands back every confirmed
    task once, in publishing order; flush() leaves none."""
    app = make_app(write_config(tmp_path / "lean.yml", STACK_CONFIG + LEAN_TUNING))
    deadletter.declare(app)
    kwargs = {"duration_s": 0}
    ids, confirmed = [], []
    with Publisher(app) as pub:
        for _ in range(6):
            ids += [pub.publish(lambda _producer: pub.send_task("task_b", kwargs, "{...}")) for _ in range(200)]
            got, refused = pub.flush(in_flight=200)
            assert refused == [] and len(pub._unsettled) <= 200
            confirmed += got
        got, refused = pub.flush()
        assert refused == [] and not pub._unsettled
        confirmed += got
        assert pub.flush() == ([], [])
    assert confirmed == ids and len(set(ids)) == 1200


@pytest.mark.broker
def test_what_the_broker_refuses_comes_back_refused_in_publishing_order(broker_env, make_app, tmp_path):
    app = make_app(write_config(tmp_path / "lean.yml", STACK_CONFIG + LEAN_TUNING))
    name = f"test-refusing-{uuid.uuid4().hex[:8]}"
    with Publisher(app) as pub:
        # A queue that nacks every publish beyond its fifth message.
        pub.channel.queue_declare(queue=name, arguments={"x-max-length": 5, "x-overflow": "reject-publish"})
        try:
            for i in range(12):
                pub.publish(lambda producer, i=i: (producer.publish({"i": i}, exchange="", routing_key=name), i)[1])
            early = pub.flush(in_flight=4)
            late = pub.flush()
        finally:
            pub.channel.queue_delete(queue=name)
    assert early[0] + late[0] == [0, 1, 2, 3, 4]
    assert early[1] + late[1] == [5, 6, 7, 8, 9, 10, 11]


@pytest.mark.parametrize("tuning", ["", LEAN_TUNING], ids=["default", "lean"])
@pytest.mark.parametrize("state, group, parent, stamps", [
    ("SUCCESS", None, None, None), ("SUCCESS", "g1", "p1", None), ("FAILURE", None, None, None), ("RETRY", None, "p1", None),
    ("SUCCESS", None, None, {"monitoring": "m1", "unstamped": "x"}), ("FAILURE", "g1", None, {"monitoring": "m1"})])
def test_the_result_meta_is_celerys(tmp_path, tuning, state, group, parent, stamps):
    # An rpc:// app whether or not a broker answers: building a result meta talks to none.
    settings = environment.resolve({"BROKER_URL": "amqp://guest:guest@127.0.0.1:1//", environment.RUN_DIR_ENV: str(tmp_path)})
    app = create_app(load_config(write_config(tmp_path / "c.yml", STACK_CONFIG + tuning)), settings)
    try:
        request = Context(reply_to="r", correlation_id="t1", group=group, parent_id=parent, task="task_a",
                          args=[], kwargs={"duration_s": 0}, hostname="w@h", retries=0, delivery_info={"routing_key": "queue_a"},
                          stamps=stamps, stamped_headers=["monitoring"] if stamps else None)
        result = ValueError("boom") if state != "SUCCESS" else {"v": 1}
        assert type(app.backend).__module__ == "conveyor.seam.rpc_backend"
        ours = app.backend._to_result("t1", state, result, None, request)
        celerys = CeleryRPCBackend._to_result(app.backend, "t1", state, result, None, request)
    finally:
        app.close()
    ours_done, celerys_done = ours.pop("date_done"), celerys.pop("date_done")
    assert list(ours) == list(celerys) and ours == celerys
    if state == "RETRY":
        assert ours_done is celerys_done is None
    else:
        assert abs(datetime.fromisoformat(ours_done) - datetime.fromisoformat(celerys_done)) < timedelta(seconds=5)
        assert datetime.fromisoformat(ours_done).utcoffset() == datetime.fromisoformat(celerys_done).utcoffset()


@pytest.mark.broker
def test_results_skip_the_confirm_only_where_the_config_says(broker_env, make_app, tmp_path):
    confirmed_app = make_app(write_config(tmp_path / "default.yml", STACK_CONFIG))
    lean_app = make_app(write_config(tmp_path / "lean.yml", STACK_CONFIG + LEAN_TUNING))
    with confirmed_app.backend._producers().acquire(block=True) as producer:
        assert producer.connection.transport_options.get("confirm_publish") is True
    with lean_app.backend._producers().acquire(block=True) as producer:
        assert producer.connection.transport_options.get("confirm_publish") is False
    # The dead-letter publishes keep theirs: they go through the app's own pool.
    with lean_app.producer_or_acquire() as producer:
        assert producer.connection.transport_options.get("confirm_publish") is True
    # So do the producers each worker thread holds for its results.
    for app, confirms in ((confirmed_app, True), (lean_app, False)):
        app.backend._publish_held(b"{}", "application/json", "utf-8", "no-such-queue", "x")
        assert app.backend._held.producer.producer.connection.transport_options.get("confirm_publish") is confirms
    # Unconfirmed results read their connection once per POLL_S, not before every publish.
    held = lean_app.backend._held.producer
    amqp_connection = held.producer.channel.connection
    reads, drain = [], amqp_connection.drain_events
    amqp_connection.drain_events = lambda **kw: (reads.append(kw), drain(**kw))
    held.next_poll = 0.0
    for _ in range(20):
        lean_app.backend._publish_held(b"{}", "application/json", "utf-8", "no-such-queue", "x")
    assert reads == [{"timeout": 0}]


@pytest.mark.broker
@pytest.mark.parametrize("tuning", ["", LEAN_TUNING], ids=["confirmed", "lean"])
def test_a_result_goes_out_as_celery_would_send_it_and_survives_a_broken_connection(broker_env, make_app, tmp_path, tuning):
    app = make_app(write_config(tmp_path / "c.yml", STACK_CONFIG + tuning))
    backend, reply_to = app.backend, f"results-{uuid.uuid4().hex[:8]}"
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        channel.queue_declare(reply_to, auto_delete=True)
        try:
            backend.store_result("t1", {"v": 1}, "SUCCESS", request=Context(reply_to=reply_to, correlation_id="t1"))
            # The held connection breaks (as in a broker restart): the result goes the retrying way.
            backend._held.producer.producer.connection.connection.transport.sock.close()
            backend.store_result("t2", {"v": 2}, "SUCCESS", request=Context(reply_to=reply_to, correlation_id="t2"))
            # What Celery's own RPCBackend.store_result publishes, for comparison.
            CeleryRPCBackend.store_result(backend, "t3", {"v": 3}, "SUCCESS", request=Context(reply_to=reply_to, correlation_id="t3"))
            # (Three connections, one of them unconfirmed where lean: the order of arrival may differ.)
            got = sorted((wait_for(lambda: channel.basic_get(reply_to, no_ack=True), 10, "a result", 0.01) for _ in range(3)),
                         key=lambda m: json.loads(m.body)["task_id"])
        finally:
            channel.queue_delete(reply_to)
    assert [json.loads(m.body)["task_id"] for m in got] == ["t1", "t2", "t3"]
    assert [json.loads(m.body)["result"] for m in got] == [{"v": 1}, {"v": 2}, {"v": 3}]
    ours, celerys = got[0], got[2]
    assert set(json.loads(ours.body)) == set(json.loads(celerys.body))
    for prop in ("content_type", "content_encoding", "delivery_mode", "priority", "application_headers"):
        assert ours.properties.get(prop) == celerys.properties.get(prop), prop
    assert [m.properties["correlation_id"] for m in got] == ["t1", "t2", "t3"]


@pytest.mark.e2e
@pytest.mark.broker
@pytest.mark.usefixtures("empty_queues")
def test_tasks_n_sends_n_jobs_in_all_and_tasks_per_type_n_of_each(broker_env, local_stack, tmp_path):
    """`make load-test TASKS=N` is N jobs in all, shared by the scenario's weights; --tasks-per-type N of each."""
    config = write_config(tmp_path / "stack.yml", STACK_CONFIG)
    local_stack(config)
    scenario_file = write_config(tmp_path / "weighted.yml", "name: weighted\nmix:\n  - {task: task_a, runtime_s: 0, weight: 3}\n"
                                 "  - {task: task_b, runtime_s: 0, weight: 1}\n")
    for flag, count, expected in (("--tasks", "30", {"task_a": 23, "task_b": 7}), ("--tasks-per-type", "10", {"task_a": 15, "task_b": 5})):
        proc = run_cli("load_test.py", "--scenario", str(scenario_file), "--config", str(config), flag, count, "--json",
                       env=broker_env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        s = json.loads(proc.stdout)
        assert {name: t["sent"] for name, t in s["types"].items()} == expected
        assert s["succeeded"] == s["sent"] == sum(expected.values())
