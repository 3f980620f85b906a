"""The one publisher (conveyor/seam/publisher.py; producer.py for single publishes) on the real
broker: task messages are mandatory, so a message no queue takes is refused rather than confirmed
and dropped, both one at a time (Celery's own publishes) and in batches, with the fast paths on and
off; a dead-letter queue deleted while workers run loses nothing; and under a memory alarm the
publisher gives up at its deadline and says why."""

from __future__ import annotations

import logging
import shutil
import time

import pytest

from helpers import queue_depth, unavailable, wait_for, write_config
from conveyor.chaos.node import BrokerNode
from conveyor.dispatch import dispatcher
from conveyor.errors import BrokerError, PublishRefused
from conveyor.settings import environment
from conveyor.amqp import queues
from conveyor.amqp.topology import DEAD_LETTER_QUEUE
from conveyor.seam import producer
from conveyor.seam.producer import ConfirmingProducer
from conveyor.seam.publisher import Publisher
from conveyor.tasks import deadletter
from conveyor.tasks.simulated import DeadLettered
from conveyor.settings.context import settings_of
from conveyor.tasks.states import TaskState


CONFIG = """\
name: publishing
expected_workers: 1
tasks: [{{task: task_a, count: 1}}]
retry: {{max_retries: 0, backoff_s: 1, backoff_max_s: 1, jitter: false}}
services:
  - {{name: worker-a, queues: [queue_a], concurrency: 2, replicas: 1, pool: threads}}
  - {{name: worker-b, queues: [queue_b], concurrency: 1, replicas: 0}}
tuning: {{task_events: false, fast_paths: {fast}}}
stop_grace_s: 10
"""


@pytest.fixture(params=[True, False], ids=["fast-paths", "no-fast-paths"])
def app(request, make_app, tmp_path):
    app = make_app(write_config(tmp_path / "p.yml", CONFIG.format(fast=str(request.param).lower())))
    deadletter.declare(app)
    yield app
    deadletter.declare(app)  # whatever a test deleted, back for the next one
    app.control.purge()
    deadletter.drain(app)


def _delete(app, name: str) -> None:
    with app.connection_for_write() as conn:
        conn.default_channel.queue_delete(queue=name)


@pytest.mark.broker
@pytest.mark.usefixtures("broker_env")
def test_a_task_no_queue_takes_is_refused_and_the_next_publish_is_confirmed_as_its_own(app):
    assert app.amqp.Producer.__mro__[1] is ConfirmingProducer
    _delete(app, "queue_b")
    # declare=[]: by default Celery declares the task's queue on every send, which would bring it back.
    with pytest.raises(PublishRefused, match=r"returned task .* routing key 'queue_b': no queue took it"):
        app.send_task("task_b", kwargs={"duration_s": 0}, declare=[])
    deadletter.declare(app)
    # On the same pooled channel: the returned message's confirm was read with it, not taken for this one's.
    sent = app.send_task("task_b", kwargs={"duration_s": 0})
    with app.connection_for_read() as conn:
        got = conn.default_channel.basic_get("queue_b", no_ack=True)
    assert got is not None and got.headers["id"] == sent.id


@pytest.mark.broker
@pytest.mark.usefixtures("broker_env")
def test_a_result_is_not_mandatory(app):
    # A caller that left deletes its reply queue: a result sent there is no error of the worker's.
    with app.producer_or_acquire() as producer:
        producer.publish({"status": "SUCCESS"}, exchange="", routing_key="nobody-listens-here",
                         headers={}, serializer="json")


@pytest.mark.broker
@pytest.mark.usefixtures("broker_env")
def test_a_batch_to_a_deleted_queue_comes_back_refused_the_rest_confirmed(app):
    _delete(app, "queue_b")
    with Publisher(app) as pub:
        assert pub.fast is settings_of(app).fast_paths  # the one switch: config and CONVEYOR_FAST_PATHS
        ids = []
        for i in range(60):
            name = "task_b" if i % 3 == 0 else "task_a"
            ids.append((name, pub.publish(lambda _producer, name=name: pub.send_task(name, {"duration_s": 0}))))
        confirmed, refused = pub.flush()
        assert pub.returned == 20
    assert refused == [task_id for name, task_id in ids if name == "task_b"]
    assert confirmed == [task_id for name, task_id in ids if name == "task_a"]
    assert queue_depth(app, "queue_a") == 40


@pytest.mark.broker
@pytest.mark.usefixtures("broker_env")
def test_without_fast_paths_every_message_goes_through_kombus_producer(make_app, tmp_path):
    app = make_app(write_config(tmp_path / "slow.yml", CONFIG.format(fast="false")))
    deadletter.declare(app)
    with Publisher(app) as pub:
        assert pub._transport is None and not pub.fast  # no frames gathered, none written by hand
        assert pub.channel.basic_publish.__self__ is pub.channel  # py-amqp's own, not wrapped
        ids = [pub.publish(lambda _producer: pub.send_task("task_a", {"duration_s": 0})) for _ in range(30)]
        assert pub.flush() == (ids, [])
    app.control.purge()


def test_connection_blocked_is_logged_once_per_change_not_per_connection(caplog):
    blocking = producer._Blocking()
    with caplog.at_level(logging.WARNING, logger=producer.__name__):
        blocking.blocked("low on memory")
        blocking.blocked("low on memory")  # a second connection of the same process
        assert "low on memory" in blocking.describe()
        blocking.unblocked()
        blocking.unblocked()
        blocking.unblocked()  # one too many (a connection blocked before it was watched): no effect
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "blocked publishing (low on memory)" in messages[0]
    assert messages[1] == "The broker unblocked publishing." and blocking.describe() == ""


@pytest.fixture
def dead_letter_stack(local_stack, tmp_path):
    stack = local_stack(write_config(tmp_path / "dl.yml", CONFIG.format(fast="true")))
    yield stack
    deadletter.declare(stack.app)
    deadletter.drain(stack.app)


@pytest.mark.broker
@pytest.mark.usefixtures("broker_env")
def test_a_dead_letter_queue_deleted_mid_run_loses_nothing(dead_letter_stack):
    app = dead_letter_stack.app
    deadletter.drain(app)

    def failing(n: int) -> list:
        # Each fails for good on its first attempt (max_retries 0): each one is a dead-letter publish.
        return [app.send_task("task_a", kwargs={"duration_s": 0.05, "fail_first": 1}) for _ in range(n)]

    def all_dead_lettered(results: list) -> None:
        for result in results:
            with pytest.raises(DeadLettered):
                result.get(timeout=60)

    # The running worker has declared dead_letter and publishes there. The queue is deleted while
    # no dead-letter publish is on its way: RabbitMQ confirms a message routed to a queue that is
    # deleted before it takes the message, instead of returning it (rabbitmq/rabbitmq-server#4746),
    # so no publisher could see that loss. Deleting it between two batches is the case to test.
    first = failing(20)
    all_dead_lettered(first)
    wait_for(lambda: queue_depth(app, DEAD_LETTER_QUEUE) >= len(first), 15, "the first batch's dead letters")
    taken = deadletter.drain(app)
    with app.connection_for_write() as conn:
        conn.default_channel.queue_delete(queue=DEAD_LETTER_QUEUE, if_empty=True)
    second = failing(40)
    all_dead_lettered(second)
    results = first + second
    # Every task is in the dead-letter queue (declared again by the worker whose publish came back)
    # or was taken out above; none was acknowledged away, none is left in queue_a.
    wait_for(lambda: queue_depth(app, DEAD_LETTER_QUEUE) + len(taken) >= len(results), 20, "every dead letter")
    later = deadletter.drain(app)
    assert sorted(d.task_id for d in taken + later) == sorted(r.id for r in results)
    wait_for(lambda: queues.stats(app, ["queue_a"])[0].messages_unacked == 0, 15, "queue_a to have nothing unacked")
    assert queue_depth(app, "queue_a") == 0
    log = (dead_letter_stack.home / "worker-a-1.log").read_text()
    assert "could not route a dead-letter publish" in log


@pytest.fixture
def alarmed_node(tmp_path, monkeypatch):
    """A RabbitMQ node of our own (conveyor/chaos/node.py), so that its memory alarm blocks nobody else."""
    if not shutil.which("rabbitmq-server"):
        unavailable("rabbitmq-server (for a private broker node)")
    with BrokerNode() as node:
        monkeypatch.setenv("BROKER_URL", node.url())
        monkeypatch.setenv("RESULT_BACKEND", "rpc://")
        monkeypatch.setenv("RECORDS_URL", "off")
        monkeypatch.setenv(environment.RUN_DIR_ENV, str(tmp_path / "run"))
        yield node


@pytest.mark.broker
def test_under_a_memory_alarm_the_publisher_gives_up_at_its_deadline_and_says_why(alarmed_node, make_app, tmp_path, caplog):
    app = make_app(write_config(tmp_path / "p.yml", CONFIG.format(fast="true")))
    deadletter.declare(app)
    alarm = alarmed_node._ctl("set_vm_memory_high_watermark", "0.0000001")
    assert alarm is not None and alarm.returncode == 0, alarm
    try:
        with caplog.at_level(logging.WARNING, logger=producer.__name__), Publisher(app, confirm_timeout_s=3) as pub:
            started = time.monotonic()
            with pytest.raises(BrokerError, match=r"did not confirm \d+ message\(s\) within 3 s; the broker has "
                                                  r"blocked publishing \(.*\); check RabbitMQ \(memory or disk alarms\)"):
                for _ in range(200):
                    pub.publish(lambda _producer: pub.send_task("task_a", {"duration_s": 0}))
                pub.flush()
            waited = time.monotonic() - started
        assert 3 <= waited < 6
        assert [r.getMessage() for r in caplog.records if "blocked publishing" in r.getMessage()][:1], caplog.text
        # More than the socket buffers hold: the write itself times out, rather than block for ever.
        with Publisher(app, confirm_timeout_s=3) as pub:
            big = {"duration_s": 0, "payload": "x" * 500_000}
            started = time.monotonic()
            with pytest.raises(BrokerError, match=r"writing to the broker timed out after 3 s: it is not reading"
                                                  r".*check RabbitMQ \(memory or disk alarms\)"):
                for _ in range(200):  # 100 MB at most; the first few MB fill the buffers
                    pub.publish(lambda _producer: pub.send_task("task_a", big, "{...}"))
                pub.flush()
            assert time.monotonic() - started < 3 * 4
    finally:
        alarmed_node._ctl("set_vm_memory_high_watermark", "0.4")
    # Once the alarm clears, publishing works again: what the blocked publisher left unconfirmed is
    # the broker's to keep or drop; only what is confirmed counts.
    with Publisher(app, confirm_timeout_s=10) as pub:
        ids = [pub.publish(lambda _producer: pub.send_task("task_a", {"duration_s": 0})) for _ in range(20)]
        assert pub.flush() == (ids, [])


def test_a_refused_task_is_reported_refused_and_waited_on_no_more():
    sending = dispatcher._Sending(app=None, on_done=None)
    for task_id in ("t1", "t2", "t3"):
        outcome = dispatcher.TaskOutcome("task_a", task_id, "queue_a")
        sending.outcomes.append(outcome)
        sending.by_id[task_id] = outcome
        sending.pending += 1
    sending.settle(["t1", "t3"], ["t2"])
    assert [o.state for o in sending.outcomes] == ["PENDING", TaskState.REFUSED, "PENDING"]
    assert sending.confirmed == 2 and sending.pending == 2 and "t2" not in sending.by_id
    sending.on_result("t2", "SUCCESS", {"message": "late"})  # nothing can come for it; if it did, it is ignored
    assert sending.outcomes[1].state == TaskState.REFUSED
    sending.on_result("t1", "SUCCESS", {"message": "Hello from Task A", "retries": 0})
    assert sending.outcomes[0].state == "SUCCESS" and sending.pending == 1


@pytest.mark.broker
@pytest.mark.usefixtures("broker_env")
@pytest.mark.parametrize("fast", ["true", "false"], ids=["fast-paths", "no-fast-paths"])
def test_dispatch_sends_and_collects_every_task_either_way(local_stack, tmp_path, fast):
    config_file = write_config(tmp_path / "d.yml", CONFIG.format(fast=fast).replace(
        "tasks: [{task: task_a, count: 1}]", "tasks: [{task: task_a, count: 300, params: {duration_s: 0}}]"))
    stack = local_stack(config_file)
    app = stack.app
    with Publisher(app) as pub:
        assert pub.fast is (fast == "true")
    report = dispatcher.dispatch(app, settings_of(app).config, timeout_s=60)
    assert report.succeeded == len(report.tasks) == 300, [t.error for t in report.tasks if t.state != "SUCCESS"][:3]
    assert len({t.id for t in report.tasks}) == 300 and all(t.latency_s is not None for t in report.tasks)
