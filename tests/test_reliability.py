"""Delivery guarantees: the settings that give them, and runs that inject faults to prove them.

Worker SIGKILLs run against the session's vhost; a broker restart needs a RabbitMQ node of the test's
own (conveyor/chaos/node.py), never the shared one. The big runs are `make chaos`; these are small.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

from helpers import ROOT, free_port, management, private_vhost, run_cli, unavailable, wait_for, write_config
from conveyor.settings import environment
from conveyor.tasks import deadletter
from conveyor.dispatch import dispatcher
from conveyor.lifecycle import ledger
from conveyor.amqp import queues
from conveyor.runtime.app import create_app
from conveyor.chaos import ChaosOptions, ChaosRun
from conveyor.chaos.netns import Namespace
from conveyor.settings.config import load_config
from conveyor.errors import BrokerError, ConfigError, UsageError
from conveyor.tasks.deadletter import DeadLettered
from conveyor.amqp.topology import QUORUM_DELIVERY_LIMIT, work_queue, work_queues
from conveyor.stack.control import service_of
from conveyor.tasks.states import TaskState

SHIPPED = (ROOT / "test-config.yml").read_text()


def config_with(tmp_path: Path, extra: str = "", name: str = "c.yml"):
    return load_config(write_config(tmp_path / name, SHIPPED + extra))


def offline_app(config, tmp_path: Path):
    """An app for an AMQP broker that is not there: building it connects to nothing."""
    env = {"BROKER_URL": f"amqp://guest:guest@127.0.0.1:{free_port()}//", environment.RUN_DIR_ENV: str(tmp_path)}
    return create_app(config, environment.resolve(env))


# --- the settings -----------------------------------------------------------------------------------

def test_every_delivery_guarantee_is_on_by_default(tmp_path):
    config = config_with(tmp_path)
    app = offline_app(config, tmp_path)
    conf = app.conf
    assert conf.broker_transport_options["confirm_publish"] is True  # publisher confirms
    assert conf.task_default_delivery_mode == "persistent"
    assert all(q.durable and q.exchange.durable for q in conf.task_queues)
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1  # a dying worker holds at most one task per pool process
    assert conf.worker_cancel_long_running_tasks_on_connection_loss
    assert conf.broker_heartbeat == config.heartbeat_s == 30
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert conf.worker_consumer == "conveyor.seam.consumer:Consumer"
    app.close()


def test_a_publish_retries_for_about_publish_retry_s():
    from kombu.utils.functional import fxrange

    for total in (1, 10, 30, 120):
        policy = environment.publish_retry_policy(total)
        waits = fxrange(policy["interval_start"], policy["interval_max"] + policy["interval_start"],
                        policy["interval_step"], repeatlast=True)
        waited = sum(min(next(waits), policy["interval_max"]) for _ in range(policy["max_retries"]))
        assert total <= waited < total + policy["interval_max"], (total, waited)


def test_a_dispatch_the_broker_never_confirms_fails_loudly_after_retrying(tmp_path):
    config = config_with(tmp_path, "publish_retry_s: 2\n")
    app = offline_app(config, tmp_path)
    started = time.monotonic()
    with pytest.raises(BrokerError, match=r"did not confirm task 1 of 20, even after retrying \(publish_retry_s: 2\) .* the 0 confirmed"):
        dispatcher.dispatch(app, config, timeout_s=5)
    assert time.monotonic() - started >= 2  # it retried with backoff before giving up
    app.close()


def test_quorum_queues_are_declared_alike_by_every_declarer(tmp_path):
    config = config_with(tmp_path, "queue_type: quorum\n")
    app = offline_app(config, tmp_path)
    declared = {q.name: q for q in app.conf.task_queues}
    assert set(declared) == set(config.queues) == {"queue_a", "queue_b"}
    for queue in work_queues(config):  # what deadletter.declare uses
        assert declared[queue.name].queue_arguments == queue.queue_arguments
        assert queue.queue_arguments["x-queue-type"] == "quorum"
        assert queue.queue_arguments["x-dead-letter-strategy"] == "at-least-once"
        assert queue.queue_arguments["x-delivery-limit"] == QUORUM_DELIVERY_LIMIT  # stated, not RabbitMQ's default
        assert queue.durable and not queue.exclusive and not queue.auto_delete
        # Celery's native delayed delivery (retry countdowns on quorum queues) binds only topic exchanges.
        assert queue.exchange.type == "topic"
    app.close()


def test_an_unknown_queue_type_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"c.yml:\d+: queue_type: Input should be 'classic' or 'quorum'"):
        config_with(tmp_path, "queue_type: mirrored\n")


def test_the_ledger_records_each_execution_and_counts_duplicates(tmp_path):
    """Real Celery tracing (eager), real signals, a real SQLite file."""
    config = config_with(tmp_path, "retry: {max_retries: 1, backoff_s: 1, backoff_max_s: 1, jitter: false}\n", "l.yml")
    app = create_app(config, environment.resolve({"BROKER_URL": "filesystem://", environment.RUN_DIR_ENV: str(tmp_path)}))
    path = tmp_path / "ledger.sqlite3"
    ledger.attach(path)
    try:
        task = app.tasks["task_a"]
        task.apply(kwargs={"duration_s": 0}, task_id="ok")
        task.apply(kwargs={"duration_s": 0}, task_id="twice")
        task.apply(kwargs={"duration_s": 0}, task_id="twice")  # the broker delivered it again
        task.apply(kwargs={"duration_s": 0, "fail_first": 9}, task_id="doomed")  # retried once, then dead-lettered
    finally:
        ledger.detach()
    with ledger.Ledger(path) as book:
        assert book.succeeded() == {"ok", "twice"}
        assert book.dead_lettered() == {"doomed"}
        assert book.finished() == {"ok", "twice", "doomed"}
        assert book.duplicated() == 1
        assert book.count(TaskState.RETRYING) == 1 and book.count("") == 0
        assert {e.attempt for e in book.executions() if e.task_id == "doomed"} == {0, 1}
    app.close()


# --- fault injection ---------------------------------------------------------------------------------

def _needs_own_node() -> None:
    if not (shutil.which("rabbitmq-server") and shutil.which("rabbitmqctl")):
        unavailable("rabbitmq-server (for a RabbitMQ node of the test's own)")


@pytest.mark.broker
def test_workers_sigkilled_during_a_burst_lose_nothing(broker_env, tmp_path):
    options = ChaosOptions(tasks=240, fail_rate=0.1, replicas=2, kill_every_s=1.5, broker_restart=False,
                           rate_per_s=0, duration_s=0.2, seed=1, timeout_s=240)
    config = config_with(tmp_path, "stop_grace_s: 10\n")
    report = ChaosRun(options, config, tmp_path / "chaos", broker_url=broker_env["BROKER_URL"]).run()
    assert report.lost == 0 and report.ok, report.render()
    assert report.planned == report.confirmed == 240 and report.refused == 0 and not report.errors
    assert report.succeeded + report.dead_lettered == 240 and report.pipelines > 0 and report.malformed > 0
    assert report.dead_lettered == report.set_to_fail > 0 and report.mismatched == 0
    assert report.kills >= 3 and report.cut_off >= 1, report.render()  # the kills did hit running tasks


@pytest.mark.broker
def test_a_broker_restart_during_a_burst_loses_nothing(tmp_path, monkeypatch):
    _needs_own_node()
    monkeypatch.delenv("BROKER_URL", raising=False)
    # 20 tasks a second: the restart, when half are confirmed, strikes the publisher and the workers alike.
    options = ChaosOptions(tasks=200, fail_rate=0.1, replicas=2, kill_every_s=0, broker_restart=True,
                           rate_per_s=20, duration_s=0.1, seed=2, timeout_s=240)
    config = config_with(tmp_path, "stop_grace_s: 10\n")
    run = ChaosRun(options, config, tmp_path / "chaos")
    report = run.run()
    assert report.lost == 0, report.render()
    assert report.broker_restarts == 1 and report.broker_away_s > 1
    # The publisher rode out the restart: what its broken connection had not confirmed went out again.
    assert report.planned == report.confirmed == 200 and report.sent == 200 + report.resent and report.ok
    assert report.dead_lettered == report.set_to_fail and report.mismatched == 0
    # Every replica reconnected (one that came back after its queue had drained may have had no task
    # left to run, so the proof is that all four answer) and each service went on working.
    assert report.answering_after_restart == 4, report.render()
    assert {service_of(w) for w in report.workers_after_restart} == {"worker-a", "worker-b"}, report.render()
    assert not run.node_home.exists(), "the run left its broker node's directory behind"


@pytest.mark.broker
def test_a_partitioned_worker_s_tasks_are_delivered_to_the_others(tmp_path, monkeypatch):
    _needs_own_node()
    try:
        Namespace.check_possible()
    except UsageError as exc:
        unavailable(f"a network namespace ({exc})")
    monkeypatch.delenv("BROKER_URL", raising=False)
    options = ChaosOptions(tasks=200, fail_rate=0, replicas=1, kill_every_s=0, broker_restart=False, partition=True,
                           partition_s=12, rate_per_s=15, duration_s=0.3, seed=3, timeout_s=240)
    # Two processes per service, so that 15 tasks/s of 0.3 s leave a backlog for the partitioned
    # worker to take once its link is back (at the shipped four, the others keep up and none is left).
    config = load_config(write_config(tmp_path / "c.yml", SHIPPED.replace("concurrency: 4", "concurrency: 2")
                                      + "stop_grace_s: 10\n"))
    run = ChaosRun(options, config, tmp_path / "chaos")
    report = run.run()
    assert report.lost == 0 and report.planned == report.confirmed == 200 and report.ok, report.render()
    found = report.partition
    # It was cut off in the middle of a task, which the broker gave to another worker once the heartbeat
    # timed out; after the link came back, it reconnected and went on working.
    assert found.in_flight >= 1 and found.in_flight_redelivered == found.in_flight, report.render()
    assert found.finished_after_heal >= 1, report.render()
    broker_log = "".join(p.read_text() for p in (tmp_path / "chaos" / "broker-log").glob("*.log"))
    assert "missed heartbeats from client" in broker_log
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    assert run.namespace_name and run.namespace_name not in namespaces, "the run left its namespace behind"
    assert not run.node_home.exists()


@pytest.fixture
def quorum_vhost(monkeypatch, tmp_path):
    """A vhost of the test's own: the session vhost has classic queues of the same names, and RabbitMQ
    refuses to declare a queue again as another type. Requested before local_stack, so torn down after."""
    with private_vhost("conveyor-quorum") as vhost:
        monkeypatch.setenv("BROKER_URL", f"amqp://guest:guest@127.0.0.1:5672/{vhost}")
        monkeypatch.setenv(environment.RUN_DIR_ENV, str(tmp_path / "run"))
        monkeypatch.delenv("RESULT_BACKEND", raising=False)
        yield vhost


@pytest.mark.broker
def test_quorum_queues_run_retry_and_dead_letter(quorum_vhost, local_stack, tmp_path):
    config_file = write_config(tmp_path / "q.yml", SHIPPED.replace("max_retries: 3", "max_retries: 1") + "queue_type: quorum\n")
    app = local_stack(config_file).app
    assert app.send_task("task_a", kwargs={"duration_s": 0}).get(timeout=30)["retries"] == 0
    # A retry's countdown goes through Celery's native delayed delivery on quorum queues.
    assert app.send_task("task_b", kwargs={"duration_s": 0, "fail_first": 1}).get(timeout=60)["retries"] == 1
    with pytest.raises(DeadLettered):
        app.send_task("task_a", kwargs={"duration_s": 0, "fail_first": 9}).get(timeout=60)
    [letter] = deadletter.drain(app)
    assert letter.attempts == 2 and letter.original_queue == "queue_a"
    info = _management_get(f"queues/{quorum_vhost}/queue_a")
    assert info["type"] == "quorum" and info["durable"]
    assert info["arguments"]["x-dead-letter-strategy"] == "at-least-once"
    # The dead-letter queue follows queue_type, replicated like the work queues, and bounded.
    dead = _management_get(f"queues/{quorum_vhost}/dead_letter")
    assert dead["type"] == "quorum" and dead["arguments"] == {
        "x-queue-type": "quorum", "x-max-length": 100_000, "x-max-length-bytes": 1024 ** 3, "x-overflow": "reject-publish"}


@pytest.mark.broker
def test_a_message_returned_past_the_delivery_limit_is_dead_lettered(quorum_vhost, make_app, tmp_path):
    """The stated x-delivery-limit holds on the machine's RabbitMQ 3.x too (which has no default):
    a message handed out and returned unacknowledged QUORUM_DELIVERY_LIMIT times is then
    dead-lettered by the broker instead of being delivered again."""
    app = make_app(write_config(tmp_path / "q.yml", SHIPPED + "queue_type: quorum\n"))
    deadletter.declare(app)
    queue_a = work_queue("queue_a", "quorum")
    with app.connection_for_write() as conn:
        producer = conn.Producer()
        producer.publish({"poison": True}, exchange=queue_a.exchange, routing_key="queue_a", serializer="json")
        channel = conn.default_channel
        returned = 0
        while (message := wait_for(lambda: channel.basic_get("queue_a") or _is_dead_lettered(), 10,
                                   "the message back in queue_a or in dead_letter")) is not True:
            channel.basic_reject(message.delivery_info["delivery_tag"], requeue=True)
            returned += 1
            assert returned <= QUORUM_DELIVERY_LIMIT + 1, "the delivery limit is not enforced"
    assert returned == QUORUM_DELIVERY_LIMIT + 1  # the first delivery and the limit's redeliveries
    [letter] = deadletter.drain(app)
    assert "delivery_limit" in letter.reason and letter.original_queue == "queue_a"


def _is_dead_lettered() -> bool:
    vhost = os.environ["BROKER_URL"].rsplit("/", 1)[1]
    return (_management_get(f"queues/{vhost}/dead_letter") or {}).get("messages", 0) > 0


def _management_get(path: str) -> dict:
    return queues.management_request(environment.DEFAULT_BROKER_URL, path, timeout_s=10)


# --- credentials ---------------------------------------------------------------------------------------

@pytest.fixture
def secret_user(rabbitmq_url):
    """A user of the session vhost with a password distinctive enough to search every output for."""
    vhost = urllib.parse.unquote(rabbitmq_url.rsplit("/", 1)[1]) or "/"
    user, password = f"conveyor-cred-{uuid.uuid4().hex[:6]}", f"Zebra{uuid.uuid4().hex}Quartz"
    try:
        management("PUT", f"users/{user}", json.dumps({"password": password, "tags": ""}).encode())
        management("PUT", f"permissions/{urllib.parse.quote(vhost, safe='')}/{user}",
                    b'{"configure":".*","write":".*","read":".*"}')
    except (OSError, urllib.error.URLError):
        unavailable("the RabbitMQ management API")
    yield user, password, f"amqp://{user}:{password}@127.0.0.1:5672/{urllib.parse.quote(vhost, safe='')}"
    management("DELETE", f"users/{user}")


@pytest.mark.broker
def test_credentials_from_the_environment_appear_in_no_log_line_or_report(secret_user, tmp_path):
    user, password, url = secret_user
    run = tmp_path / "run"
    env = {"BROKER_URL": url, environment.RUN_DIR_ENV: str(run), "STACK": "local", "LOG_LEVEL": "DEBUG",
           "WORKER_LOGLEVEL": "DEBUG"}
    outputs = []
    try:
        for args in (["scale.py", "up"], ["dispatch.py", "--timeout", "60"], ["dispatch.py", "--json"],
                     ["scale.py", "status"], ["scale.py", "status", "--json"], ["scale.py", "ps"]):
            proc = run_cli(*args, env=env, timeout=180)
            assert proc.returncode == 0, proc.stderr[-2000:]
            outputs += [proc.stdout, proc.stderr]
    finally:
        outputs += [(down := run_cli("scale.py", "down", env=env, timeout=120)).stdout, down.stderr]
    for wrong in (url.replace(password, password + "x"), url.replace(":5672/", f":{free_port()}/")):
        proc = run_cli("dispatch.py", env={**env, "BROKER_URL": wrong})
        assert proc.returncode == 3 and "error: " in proc.stderr
        outputs += [proc.stdout, proc.stderr]
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.suffix == ".log" for p in files)  # the workers' own logs are among them
    everything = "\n".join(outputs).encode() + b"\n".join(p.read_bytes() for p in files)
    assert password.encode() not in everything
    assert f"amqp://{user}:**@".encode() in everything  # the URL is there, masked: the search was meaningful
