"""examples/wordcount end to end: the user's own task types on real workers, on the local stack and
on the compose stack, under `make up`, `make run`, `make scale`, `make load-test`, `make monitor` and
`make chaos` (the scripts those targets run, with the example's config). Also what a user's
exception becomes: retried with backoff when its config lists it in retry_on, dead-lettered at once
with its type and message when not; and a worker that cannot import its callable, reported by
service."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import ROOT, run_cli, unavailable, wait_for, write_config
from conveyor.dispatch.dispatcher import dispatch
from conveyor.tasks.states import TaskState
from conveyor.errors import StackError
from conveyor.monitor import Monitor, prometheus
from conveyor.settings.config import Monitoring
from conveyor.stack.local import LocalStack
from conveyor.tasks import deadletter
from conveyor.settings.context import settings_of

EXAMPLE = ROOT / "examples" / "wordcount"
CONFIG = EXAMPLE / "config.yml"
SCENARIO = EXAMPLE / "scenario.yml"
SERVICES = ("splitter", "counter", "merger")
DOCUMENT_WORDS = 1500  # what wordcount/corpus.py wrote per document of the shipped corpus


def _cli(*args: str, env: dict[str, str], timeout: float = 300):
    proc = run_cli(*args, env=env, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def _answering(env: dict[str, str]) -> dict[str, int]:
    status = json.loads(_cli("scale.py", "status", "--json", env=env).stdout)
    return {s["name"]: s["workers_responding"] for s in status["services"]}


def _check_dispatch(report: dict) -> None:
    """What `make run` with the example config must show: every task of the three types succeeded,
    with the real word counts of the shipped corpus."""
    assert report["succeeded"] == len(report["tasks"]) == 28 and report["dead_lettered"] == 0, report
    by_type: dict[str, list] = {}
    for task in report["tasks"]:
        by_type.setdefault(task["name"], []).append(task)
    assert {name: len(tasks) for name, tasks in by_type.items()} == {"split": 12, "count_words": 12, "merge_counts": 4}
    for task in by_type["split"]:
        assert sum(len(chunk.split()) for chunk in task["result"]) == DOCUMENT_WORDS
    for task in by_type["count_words"]:
        assert sum(sum(counts.values()) for counts in task["result"]) == DOCUMENT_WORDS
    for task in by_type["merge_counts"]:
        assert task["result"]["words"] == DOCUMENT_WORDS and len(task["result"]["top"]) == 3
    assert all(t["worker"].split("-")[0] in SERVICES and t["execution_time_s"] is not None for t in report["tasks"])
    assert {t["queue"] for t in report["tasks"]} == {"wc_split", "wc_count", "wc_merge"}


def _check_load_test(summary: dict, jobs: int) -> None:
    """`make load-test TASKS=N`: N jobs in all, 3 pipelines to 1 single count, none lost or failed;
    count_words is busy on some first attempts, so some jobs were retried and still succeeded."""
    assert summary["sent"] == jobs and summary["failed"] == 0 and summary["succeeded"] == jobs, summary
    types = summary["types"]
    assert types["pipeline"]["sent"] == jobs * 3 // 4 and types["count-only"]["sent"] == jobs // 4
    assert [s["task"] for s in types["pipeline"]["stages"]] == ["split", "count_words", "merge_counts"]
    assert summary["retried"] > 0
    assert summary["workers"] >= 3


def _run_scale_and_load(env: dict[str, str]) -> None:
    """On a stack `make up` started: `make run`, `make scale QUEUE=counter COUNT=2`, `make load-test TASKS=40`."""
    assert _answering(env) == {name: 1 for name in SERVICES}
    _check_dispatch(json.loads(_cli("dispatch.py", "--json", env=env).stdout))
    _cli("scale.py", "scale", "--service", "counter", "--count", "2", env=env)
    assert _answering(env) == {"splitter": 1, "counter": 2, "merger": 1}
    summary = json.loads(_cli("load_test.py", "--scenario", str(SCENARIO), "--tasks", "40", "--json", env=env).stdout)
    _check_load_test(summary, 40)


# --- the local stack -----------------------------------------------------------------------

@pytest.mark.broker
def test_the_example_on_the_local_stack(broker_env, make_app):
    env = {**broker_env, "STACK": "local", "CONVEYOR_CONFIG": str(CONFIG)}
    _cli("scale.py", "up", env=env)
    try:
        _run_scale_and_load(env)

        # `make monitor`: the task table and the Prometheus labels are the example's task names.
        app = make_app(CONFIG)
        stack = LocalStack(app, settings_of(app).config)
        monitor = Monitor(stack, Monitoring(collect_interval_s=0.5, emit_interval_s=1, prometheus_port=0)).start()
        server = prometheus.serve(monitor, "127.0.0.1", 0)
        try:
            assert {r["name"] for r in monitor.snapshot()["tasks"]} == {"split", "count_words", "merge_counts"}

            def succeeded_on_the_endpoint() -> dict[str, float]:
                with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=5) as response:
                    text = response.read().decode()
                found: dict[str, float] = {}
                for family in text_string_to_metric_families(text):
                    for s in family.samples:
                        if s.name == "celery_task_succeeded_total":
                            found[s.labels["name"]] = found.get(s.labels["name"], 0) + s.value
                return found

            # The tallies count from the record store's first write: the run and the load test above
            # are in them already. What this dispatch adds is compared.
            before = {r["name"]: r for r in monitor.snapshot()["tasks"]}
            endpoint_before = succeeded_on_the_endpoint()
            report = dispatch(app, settings_of(app).config, timeout_s=120)
            assert report.succeeded == 28
            total_before = sum(r["succeeded"] for r in before.values())
            wait_for(lambda: sum(r["succeeded"] for r in monitor.snapshot()["tasks"]) >= total_before + 28, 30,
                     "the monitor to see the 28 tasks succeed")
            rows = {r["name"]: r for r in monitor.snapshot()["tasks"]}
            assert {name: rows[name]["succeeded"] - before[name]["succeeded"] for name in rows} == \
                {"split": 12, "count_words": 12, "merge_counts": 4}
            assert rows["count_words"]["retried"] - before["count_words"]["retried"] == report.total_retries
            after = succeeded_on_the_endpoint()
            assert {name: after[name] - endpoint_before.get(name, 0) for name in after} == \
                {"split": 12, "count_words": 12, "merge_counts": 4}
        finally:
            server.shutdown()
            monitor.stop()
    finally:
        _cli("scale.py", "down", env=env)


@pytest.mark.broker
def test_make_chaos_against_the_example(tmp_path, monkeypatch, broker_env):
    if not (shutil.which("rabbitmq-server") and shutil.which("rabbitmqctl")):
        unavailable("rabbitmq-server (for the chaos run's own RabbitMQ node)")
    env = {**broker_env, "BROKER_URL": ""}  # the run starts a broker node of its own (and restarts it)
    proc = _cli("chaos.py", "--config", str(CONFIG), "--tasks", "90", "--kill-every-s", "2", "--rate-per-s", "15",
                "--timeout-s", "400", "--json", env=env, timeout=600)
    report = json.loads(proc.stdout)
    assert report["ok"] and report["lost"] == 0, report
    # Every planned task confirmed and succeeded; `sent` also counts what went out again after the
    # broker restart broke the connection before its confirm (docs/reliability.md), so it may be more.
    assert report["planned"] == report["confirmed"] == report["succeeded"] == 90, report
    assert report["sent"] >= report["confirmed"] and report["refused"] == 0, report
    assert report["dead_lettered"] == 0 and report["set_to_fail"] == 0 and report["mismatched"] == 0
    assert report["broker_restarts"] == 1 and report["kills"] >= 1
    # The run's own ledger saw the example's three types, and count_words' busy attempts retried.
    assert report["executions"] > 90


# --- what a user's exception becomes -----------------------------------------------------------

FLAKY = '''\
from celery import current_task


class Busy(Exception):
    pass


def flaky(fail_times):
    if current_task.request.retries < fail_times:
        raise Busy(f"busy on attempt {current_task.request.retries + 1}")
    return {"attempts": current_task.request.retries + 1}


def broken(key):
    return {}[key]
'''

FLAKY_CONFIG = """\
name: user exceptions
expected_workers: 1
code_dir: code
task_types:
  - name: flaky
    callable: flakytasks:flaky
    queue: q_flaky
    retry: {retry_on: [flakytasks:Busy], max_retries: 3, backoff_s: 1, jitter: false}
  - name: broken
    callable: flakytasks:broken
    queue: q_flaky
    retry: {max_retries: 3}
tasks:
  - {task: flaky, count: 2, args: [2]}
  - {task: broken, count: 1, args: [missing]}
services:
  - {name: flaker, queues: [q_flaky], concurrency: 2}
stop_grace_s: 10
"""


@pytest.fixture
def flaky_project(tmp_path: Path) -> Path:
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "flakytasks.py").write_text(FLAKY)
    yield write_config(tmp_path / "flaky.yml", FLAKY_CONFIG)
    sys.modules.pop("flakytasks", None)


@pytest.mark.broker
def test_a_user_exception_in_retry_on_is_retried_with_backoff_and_another_is_dead_lettered_at_once(
        broker_env, local_stack, flaky_project):
    stack = local_stack(flaky_project)
    app = stack.app
    deadletter.drain(app)
    started = time.monotonic()
    report = dispatch(app, settings_of(app).config, timeout_s=60)
    flaky = [t for t in report.tasks if t.name == "flaky"]
    [broken] = [t for t in report.tasks if t.name == "broken"]
    # Busy is in retry_on: two failed attempts, retried after 1 s then 2 s (no jitter), then success.
    assert [(t.state, t.result, t.retries) for t in flaky] == [("SUCCESS", {"attempts": 3}, 2)] * 2
    assert max(t.latency_s for t in flaky) >= 1 + 2
    # KeyError is not: dead-lettered on its first attempt, although max_retries is 3.
    assert (broken.state, broken.retries) == (TaskState.DEAD_LETTERED, 0)
    assert broken.error == "KeyError: 'missing'"
    [letter] = wait_for(lambda: deadletter.drain(app), 10, "the dead-lettered task in the dead-letter queue")
    assert (letter.task_id, letter.task, letter.attempts, letter.original_queue) == (broken.id, "broken", 1, "q_flaky")
    assert letter.headers["x-exception-type"] == "KeyError" and letter.reason == "KeyError: 'missing'"
    assert time.monotonic() - started < 30


@pytest.mark.broker
def test_up_reports_which_service_could_not_import_its_callable(broker_env, make_app, tmp_path, monkeypatch):
    # The module imports a package that only this process can import (a directory on its sys.path,
    # not on the workers'), as when the host has a package the workers lack.
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "hostonlytasks.py").write_text("import hostonly\n\ndef run():\n    return hostonly.VALUE\n")
    (tmp_path / "hostonly").mkdir()
    (tmp_path / "hostonly" / "hostonly.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path / "hostonly"))
    path = write_config(tmp_path / "c.yml", FLAKY_CONFIG.replace("flakytasks:flaky", "hostonlytasks:run"))
    (tmp_path / "code" / "flakytasks.py").write_text(FLAKY)
    app = make_app(path)
    stack = LocalStack(app, settings_of(app).config)
    try:
        with pytest.raises(StackError) as info:
            stack.up(wait_s=60)
        message = str(info.value)
        assert "\n" not in message
        assert message.startswith("service flaker failed to start: worker flaker-1@"), message
        assert message.endswith(f"exited: error: {path}:6: task_types[0].callable: hostonlytasks:run: importing "
                                "hostonlytasks failed: ModuleNotFoundError: No module named 'hostonly'"), message
    finally:
        stack.down()
        for name in ("hostonlytasks", "hostonly", "flakytasks"):
            sys.modules.pop(name, None)


# --- the compose stack ---------------------------------------------------------------------



@pytest.fixture(scope="module")
def example_image(docker_engine) -> str:
    """A tag of this module's own: `make up` builds it from our Dockerfile (layers from the cache),
    and no other session that builds the shared test tag at the same time can swap it under us."""
    name = f"conveyor-worker:example-{uuid.uuid4().hex[:8]}"
    yield name
    subprocess.run(["docker", "image", "rm", f"{name}-code", name], capture_output=True, timeout=120)


@pytest.fixture
def compose_env(broker_env, example_image) -> dict[str, str]:
    project = f"conveyor-example-{uuid.uuid4().hex[:8]}"
    return {**broker_env, "STACK": "compose", "COMPOSE_PROJECT_NAME": project, "CONVEYOR_IMAGE": example_image,
            "COMPOSE_FILES": ""}


@pytest.mark.docker
@pytest.mark.broker
def test_the_example_on_the_compose_stack(compose_env):
    env = {**compose_env, "CONVEYOR_CONFIG": str(CONFIG)}
    # `make up` builds the image (from our Dockerfile, its layers cached by the session's build) and
    # starts the example's three services, copies of worker-a with the example's code mounted read-only.
    _cli("scale.py", "up", env=env, timeout=600)
    try:
        _run_scale_and_load(env)
        snap = json.loads(_cli("monitor.py", "--once", "--json", "--no-prometheus", env=env).stdout)
        assert {r["name"] for r in snap["tasks"]} == {"split", "count_words", "merge_counts"}
        assert {s["name"]: s["replicas_running"] for s in snap["services"]} == {"splitter": 1, "counter": 2, "merger": 1}
    finally:
        _cli("scale.py", "down", env=env, timeout=300)


@pytest.mark.docker
@pytest.mark.broker
def test_compose_up_reports_the_service_whose_callable_the_image_cannot_import(compose_env, tmp_path):
    # pytest is installed where the tests run, not in the worker image (requirements.txt only): the
    # host can import the module, the containers cannot, as with a requirement left out of an image.
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "flakytasks.py").write_text(FLAKY)
    (tmp_path / "code" / "needspytest.py").write_text("import pytest\n\ndef run():\n    return pytest.__name__\n")
    path = write_config(tmp_path / "c.yml", FLAKY_CONFIG.replace("flakytasks:flaky", "needspytest:run"))
    env = {**compose_env, "CONVEYOR_CONFIG": str(path)}
    proc = run_cli("scale.py", "up", env=env, timeout=600)
    try:
        assert proc.returncode == 4, proc.stderr
        [line] = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert line.startswith("error: service flaker failed to start: container "), line
        assert line.endswith("error: /etc/conveyor/config.yml:6: task_types[0].callable: needspytest:run: importing "
                             "needspytest failed: ModuleNotFoundError: No module named 'pytest'"), line
    finally:
        _cli("scale.py", "down", env=env, timeout=300)


@pytest.mark.docker
@pytest.mark.broker
def test_the_example_in_an_image_built_from_ours_with_its_requirements(compose_env, example_image, tmp_path):
    # The example as a user's project of its own, with a requirements file: the workers then run an
    # image built FROM ours (deploy/user.Dockerfile) holding the code, instead of a mount. The build
    # has no network here, so the requirement is one the base image already satisfies.
    project = tmp_path / "project"
    shutil.copytree(EXAMPLE / "wordcount", project / "code" / "wordcount", ignore=shutil.ignore_patterns("__pycache__"))
    (project / "code" / "requirements.txt").write_text("PyYAML\n")
    config = CONFIG.read_text().replace("code_dir: .\n", "code_dir: code\ncode_requirements: requirements.txt\n")
    path = write_config(project / "config.yml", config)
    subprocess.run(["chmod", "-R", "o+rX", str(tmp_path)], check=True)
    env = {**compose_env, "CONVEYOR_CONFIG": str(path)}
    _cli("scale.py", "build", env=env, timeout=600)
    _cli("scale.py", "up", env=env, timeout=600)
    try:
        _check_dispatch(json.loads(_cli("dispatch.py", "--json", env=env).stdout))
        ids = subprocess.run(["docker", "ps", "--quiet", "--filter", f"label=com.docker.compose.project={env['COMPOSE_PROJECT_NAME']}"],
                             capture_output=True, text=True, check=True).stdout.split()
        assert len(ids) == 3
        inspected = json.loads(subprocess.run(["docker", "inspect", *ids], capture_output=True, text=True, check=True).stdout)
        for container in inspected:
            assert container["Config"]["Image"] == f"{example_image}-code"
            assert "CONVEYOR_CODE_DIR=/opt/conveyor/code" in container["Config"]["Env"]
            assert all(m["Destination"] != "/opt/conveyor/code" for m in container["Mounts"]), container["Mounts"]
    finally:
        _cli("scale.py", "down", env=env, timeout=300)


# --- the default config is as it was ----------------------------------------------------------

@pytest.mark.broker
def test_the_default_make_run_output_and_json_contract_are_unchanged(broker_env):
    env = {**broker_env, "STACK": "local"}
    text = _cli("dispatch.py", "--start-stack", env=env).stdout.splitlines()
    assert text[:4] == [f"Loaded config: {ROOT / 'test-config.yml'} ('seed workload')", "Expected workers: 2",
                        "Dispatched 20 tasks: 10 x task_a, 10 x task_b", ""]
    line = re.compile(r"^task_([ab])  [0-9a-f-]{36}  result: 'Hello from Task ([AB])', execution time: \d+\.\d{3} s, "
                      r"retries: 0, worker: worker-([ab])-1@\S+$")
    rows = [line.match(row) for row in text[4:24]]
    assert all(m and m.group(1) == m.group(2).lower() == m.group(3) for m in rows), text[4:24]
    assert text[24] == "" and [row.split(":")[0] for row in text[25:]] == [
        "Total dispatcher time", "Sequential time", "Speed-up", "Total retries", "Succeeded"]
    assert text[-1] == "Succeeded: 20, failed: 0 (of which dead-lettered: 0)"
    report = json.loads(_cli("dispatch.py", "--json", "--start-stack", env=env).stdout)
    assert list(report) == ["config", "tasks", "total_time_s", "sequential_time_s", "speedup", "total_retries",
                            "succeeded", "failed", "dead_lettered"]
    assert all(list(t) == ["name", "id", "queue", "state", "result", "execution_time_s", "retries", "worker",
                           "latency_s", "error"] for t in report["tasks"])
    assert {(t["name"], t["queue"], t["state"], t["result"]) for t in report["tasks"]} == {
        ("task_a", "queue_a", "SUCCESS", "Hello from Task A"), ("task_b", "queue_b", "SUCCESS", "Hello from Task B")}
