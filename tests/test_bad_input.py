"""Bad input, each case on its own: to the CLIs (one line, a non-zero exit, nothing started) and to
the queues (the message lands in the dead-letter queue with its reason; the worker lives on and runs
the next good task). Config, service, count and broker-URL errors of dispatch.py and scale.py are in
test_cli_errors.py; these are the rest."""

from __future__ import annotations

import json

import pytest

from helpers import ROOT, one_line_error, queue_depth, run_cli, wait_for, write_config
from helpers.intake import publish_raw, still_serving, the_dead_letter
from conveyor.tasks import deadletter
from conveyor.seam.consumer import ENVELOPE_BYTES
from conveyor.tasks.deadletter import DeadLettered

SHIPPED = (ROOT / "test-config.yml").read_text()




# --- to the CLIs ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "words"), [
    (["--tasks", "0"], ["--tasks must be between 1 and limits.max_tasks_per_run (10000), got 0"]),
    (["--tasks", "10001"], ["--tasks must be between 1 and limits.max_tasks_per_run (10000), got 10001"]),
    (["--replicas", "0"], ["--replicas must be between 1 and limits.max_replicas (8), got 0"]),
    (["--replicas", "9"], ["--replicas must be between 1 and limits.max_replicas (8), got 9"]),
    (["--fail-rate", "1.5"], ["--fail-rate must be between 0 and 1, got 1.5"]),
    (["--kill-every-s", "-1"], ["--kill-every-s must be 0 (off) or more, got -1"]),
    (["--rate-per-s", "-5"], ["--rate-per-s must be 0 (off) or more, got -5"]),
    (["--partition-s", "0"], ["--partition-s and --timeout-s must be more than 0"]),
    (["--partition", "--partition-subnet", "10.9.0.0/24"], ["the partition subnet must be an IPv4 /30, got 10.9.0.0/24"]),
])
def test_chaos_refuses_counts_out_of_bounds(offline_env, args, words):
    one_line_error(run_cli("chaos.py", *args, env=offline_env), *words)


def test_chaos_refuses_a_malformed_config(tmp_path, offline_env):
    bad = write_config(tmp_path / "bad.yml", SHIPPED.replace("replicas: 1", "replicas: lots", 1))
    one_line_error(run_cli("chaos.py", "--config", str(bad), env=offline_env), str(bad), "services[0].replicas")


def test_a_payload_over_the_limit_is_refused_before_anything_is_sent(tmp_path, offline_env):
    bad = write_config(tmp_path / "big.yml", SHIPPED.replace("params: {duration_s: 0.1}", "params: {payload_bytes: 2000000}"))
    one_line_error(run_cli("dispatch.py", "--config", str(bad), env=offline_env),
                   ":8: tasks[0].params.payload_bytes: 2000000 is over limits.max_payload_bytes (1048576)")


def test_an_unknown_queue_type_is_refused(tmp_path, offline_env):
    bad = write_config(tmp_path / "q.yml", SHIPPED + "queue_type: lazy\n")
    one_line_error(run_cli("dispatch.py", "--config", str(bad), env=offline_env), "queue_type: Input should be 'classic' or 'quorum'")


def test_a_config_that_is_not_a_mapping_is_refused(tmp_path, offline_env):
    bad = write_config(tmp_path / "list.yml", "- task_a\n- task_b\n")
    one_line_error(run_cli("dispatch.py", "--config", str(bad), env=offline_env), ":1: expected a mapping")


@pytest.mark.parametrize(("url", "words"), [
    ("amqp://guest:guest@127.0.0.1:notaport//", ["BROKER_URL is not a usable broker URL", "notaport"]),
    ("amqp://[::1", ["BROKER_URL is not a usable broker URL", "Invalid IPv6 URL"]),
    ("http://127.0.0.1:5672//", ["BROKER_URL is not a usable broker URL", "No such transport: http"]),
])
@pytest.mark.parametrize("script", [["dispatch.py"], ["scale.py", "status"]])
def test_a_malformed_broker_url_is_refused(tmp_path, script, url, words):
    one_line_error(run_cli(*script, env={"BROKER_URL": url, "CONVEYOR_RUN_DIR": str(tmp_path)}), *words)


@pytest.mark.broker
def test_a_broker_url_with_an_unknown_vhost_is_refused(rabbitmq_url, tmp_path):
    env = {"BROKER_URL": "amqp://guest:guest@127.0.0.1:5672/no-such-vhost", "CONVEYOR_RUN_DIR": str(tmp_path)}
    one_line_error(run_cli("dispatch.py", env=env), "does not allow that virtual host", "BROKER_URL")


# --- to the queues ----------------------------------------------------------------------------------

@pytest.mark.broker
def test_a_message_that_is_not_json(worker, app):
    publish_raw(app, b"{this is not json", "application/json", {"task": "task_a", "id": "not-json", "lang": "py"})
    letter = the_dead_letter(app)
    assert letter.task_id == "not-json" and letter.reason.startswith("DecodeError: ")
    still_serving(worker)


@pytest.mark.broker
def test_a_pickle_message(worker, app):
    result = app.send_task("task_a", kwargs={"duration_s": 0}, serializer="pickle")
    letter = the_dead_letter(app)
    assert letter.task_id == result.id
    assert letter.reason == "ContentDisallowed: Refusing to deserialize untrusted content of type pickle " \
                            "(application/x-python-serialize)"
    assert letter.headers["x-exception-type"] == "ContentDisallowed"
    still_serving(worker)


@pytest.mark.broker
def test_a_message_for_an_unknown_task(worker, app):
    result = app.send_task("no_such_task", queue="queue_a")
    letter = the_dead_letter(app)
    assert (letter.task_id, letter.task) == (result.id, "no_such_task")
    assert letter.reason == "NotRegistered: no task named 'no_such_task' is registered on this worker"
    still_serving(worker)


@pytest.mark.broker
def test_a_task_message_whose_body_has_the_wrong_shape(worker, app):
    # Celery itself would raise out of its consumer on this and stop the worker ("Unrecoverable error").
    publish_raw(app, json.dumps("hello").encode(), "application/json", {"task": "task_a", "id": "bad-shape", "lang": "py"})
    letter = the_dead_letter(app)
    assert letter.task_id == "bad-shape" and letter.reason == "InvalidMessage: body: must be [args, kwargs, embed]"
    assert letter.body == "hello"  # as it was sent
    still_serving(worker)


@pytest.mark.broker
def test_a_message_that_is_no_task_at_all(worker, app):
    publish_raw(app, json.dumps({"hello": "world"}).encode(), "application/json", {})
    letter = the_dead_letter(app)
    assert letter.reason == "UnknownMessage: the message is not a Celery task message (no task name)"
    still_serving(worker)


@pytest.mark.broker
def test_wrong_argument_types_and_an_unknown_argument(worker, app):
    wrong_type = app.send_task("task_a", kwargs={"duration_s": [1, 2]})
    unknown = app.send_task("task_a", kwargs={"duration": 1})
    for result in (wrong_type, unknown):
        with pytest.raises(DeadLettered) as info:
            result.get(timeout=20)
        assert info.value.attempts == 1  # never retried: no retry can fix an argument
    wait_for(lambda: queue_depth(app, "dead_letter") >= 2, 20, "both tasks to reach the dead-letter queue")
    reasons = {letter.task_id: letter.reason for letter in deadletter.drain(app)}
    assert reasons[wrong_type.id] == "InvalidTaskArguments: duration_s must be a number, got list [1, 2]"
    assert reasons[unknown.id].startswith("TypeError: ") and "'duration'" in reasons[unknown.id]
    still_serving(worker)


@pytest.mark.broker
def test_an_oversized_payload(worker, app):
    limit = worker.config.limits.max_payload_bytes
    result = app.send_task("task_a", kwargs={"payload": "x" * (limit + ENVELOPE_BYTES + 1)})
    letter = the_dead_letter(app)
    assert letter.task_id == result.id
    assert letter.reason.startswith("InvalidMessage: body: is ")
    assert f"over limits.max_payload_bytes plus the envelope ({limit + ENVELOPE_BYTES})" in letter.reason
    # Just under the limit is fine: what the dispatcher may send, a worker runs.
    assert app.send_task("task_a", kwargs={"duration_s": 0, "payload": "x" * limit}).get(timeout=20)["payload_bytes"] == limit
    still_serving(worker)

