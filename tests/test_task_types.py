"""Task types declared in the config: the schema, its one-line errors (file, line, field), the
topology and the tasks derived from it. Nothing here needs a broker; the user code is a module each
test writes into a code directory of its own."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, run_cli, write_config
from conveyor.amqp.topology import DEAD_LETTER_QUEUE, DLX_EXCHANGE, routes, work_queues
from conveyor.errors import ConfigError
from conveyor.loadtest.scenario import Plan, load_scenario
from conveyor.runtime.app import create_app
from conveyor.settings import environment
from conveyor.settings.config import load_config
from conveyor.tasks.retry import RETRYABLE

USER_CODE = '''\
from celery import Celery

own_app = Celery("theirs", set_as_current=False)  # a task of the user's own app, not shared with ours

LIMIT = 3


class Busy(Exception):
    """Transient."""


def echo(value, times=1):
    return [value] * times


@own_app.task(name="already_a_task", shared=False)
def decorated():
    return 1
'''

# Line numbers below count from the first line of this text.
CONFIG = """\
name: user tasks
expected_workers: 1
code_dir: code
task_types:
  - name: echo
    callable: usertasks:echo
    queue: q_echo
    retry: {retry_on: [usertasks:Busy, TimeoutError], max_retries: 5, backoff_s: 2}
  - name: echo2
    callable: usertasks:echo
    queue: q_echo
tasks:
  - task: echo
    count: 2
    args: [hi]
    kwargs: {times: 2}
services:
  - name: echoer
    queues: [q_echo]
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    code = tmp_path / "code"
    code.mkdir()
    # A module name of this test's own: sys.modules keeps what one test imported for the next.
    (code / "usertasks.py").write_text(USER_CODE)
    yield tmp_path
    sys.modules.pop("usertasks", None)
    if str(code) in sys.path:
        sys.path.remove(str(code))


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# --- the schema and what is derived from it -------------------------------------------------

def test_task_types_give_queues_routes_retries_and_registered_tasks(project):
    config = load_config(write_config(project / "c.yml", CONFIG))
    assert config.queues == ("q_echo",)
    assert routes(config) == {"echo": {"queue": "q_echo", "routing_key": "q_echo"},
                              "echo2": {"queue": "q_echo", "routing_key": "q_echo"}}
    [queue] = work_queues(config)
    assert queue.name == "q_echo" and queue.exchange.name == "q_echo"
    assert queue.queue_arguments["x-dead-letter-exchange"] == DLX_EXCHANGE
    assert queue.queue_arguments["x-dead-letter-routing-key"] == DEAD_LETTER_QUEUE
    app = create_app(config, environment.resolve())
    try:
        echo, echo2 = app.tasks["echo"], app.tasks["echo2"]
        busy = sys.modules["usertasks"].Busy
        assert echo.autoretry_for == (*RETRYABLE, busy, TimeoutError)
        assert (echo.max_retries, echo.retry_backoff) == (5, 2)
        # The other type keeps the top-level policy, and only the always-transient exceptions.
        assert echo2.autoretry_for == RETRYABLE and echo2.max_retries == config.retry.max_retries
        assert echo.run("x", times=3) == ["x", "x", "x"]  # the user's function, unbound and unchanged
        assert app.conf.task_default_queue == "q_echo"
    finally:
        app.close()


def test_the_default_config_declares_task_a_and_task_b_as_before():
    config = load_config(ROOT / "test-config.yml")
    assert [(t.name, t.callable, t.queue) for t in config.task_types] == [
        ("task_a", "conveyor.tasks.simulated:task_a", "queue_a"),
        ("task_b", "conveyor.tasks.simulated:task_b", "queue_b")]
    assert routes(config) == {"task_a": {"queue": "queue_a", "routing_key": "queue_a"},
                              "task_b": {"queue": "queue_b", "routing_key": "queue_b"}}
    # A config that leaves task_types out gets the same two, so older configs keep working.
    assert load_config(ROOT / "bench" / "noop.yml").task_types == config.task_types


def test_dispatch_arguments_fixed_or_generated(project):
    from conveyor.dispatch.arguments import entry_arguments

    (project / "code" / "usergen.py").write_text("def make(index):\n    return [index, 'doc'], {'times': index + 1}\n")
    text = CONFIG.replace("    kwargs: {times: 2}\n", "    kwargs: {times: 2}\n  - {task: echo, count: 3, generator: 'usergen:make'}\n")
    try:
        config = load_config(write_config(project / "c.yml", text))
        assert entry_arguments(config, 0, 1) == (["hi"], {"times": 2})
        assert entry_arguments(config, 1, 2) == ([2, "doc"], {"times": 3})
    finally:
        sys.modules.pop("usergen", None)


# --- every config error: one line, file, line and field ---------------------------------------

@pytest.mark.parametrize("old, new, line, field, words", [
    ("callable: usertasks:echo\n    queue: q_echo\n    retry", "callable: usertasks_nope:echo\n    queue: q_echo\n    retry",
     6, "task_types[0].callable", "usertasks_nope:echo: there is no module 'usertasks_nope'"),
    ("callable: usertasks:echo\n    queue: q_echo\n    retry", "callable: usertasks:echoo\n    queue: q_echo\n    retry",
     6, "task_types[0].callable", "module usertasks has no attribute 'echoo'"),
    ("callable: usertasks:echo\n    queue: q_echo\n    retry", "callable: usertasks:LIMIT\n    queue: q_echo\n    retry",
     6, "task_types[0].callable", "usertasks:LIMIT is an int (3), not a function"),
    ("callable: usertasks:echo\n    queue: q_echo\n    retry", "callable: usertasks:Busy\n    queue: q_echo\n    retry",
     6, "task_types[0].callable", "usertasks:Busy is a class (Busy), not a function"),
    ("callable: usertasks:echo\n    queue: q_echo\n    retry", "callable: usertasks:decorated\n    queue: q_echo\n    retry",
     6, "task_types[0].callable", "is already a Celery task"),
    ("callable: usertasks:echo\n    queue: q_echo\n    retry", "callable: usertasks.echo\n    queue: q_echo\n    retry",
     6, "task_types[0].callable", "should match pattern"),
    ("  - name: echo2\n", "  - name: echo\n", 9, "task_types[1].name", "task type 'echo' is declared twice (first as task_types[0])"),
    ("  - name: echo2\n", "  - name: celery.backend_cleanup\n", 9, "task_types[1].name", "collides with Celery's own task names"),
    ("    queue: q_echo\n    retry", "    queue: dead_letter\n    retry", 7, "task_types[0].queue", "'dead_letter' is reserved"),
    ("retry_on: [usertasks:Busy,", "retry_on: [usertasks:Bsy,", 8, "task_types[0].retry.retry_on[0]",
     "module usertasks has no attribute 'Bsy'"),
    ("TimeoutError]", "TimeoutErr]", 8, "task_types[0].retry.retry_on[1]", "'TimeoutErr' is not a builtin exception"),
    ("TimeoutError]", "usertasks:echo]", 8, "task_types[0].retry.retry_on[1]", "usertasks:echo is a function, not an exception class"),
    ("    args: [hi]\n    kwargs: {times: 2}\n", "    generator: usertasks:nothing\n", 15, "tasks[0].generator", "module usertasks has no attribute 'nothing'"),
    ("    args: [hi]\n    kwargs: {times: 2}\n", "    params: {duration_s: 1}\n", 15, "tasks[0].params",
     "params describe the simulated task types"),
    ("  - task: echo\n", "  - task: ehco\n", 13, "tasks[0].task", "no task type is named 'ehco'"),
    ("    queues: [q_echo]\n", "    queues: [q_echo, q_other]\n", 19, "services[0].queues[1]", "no task type goes to 'q_other'"),
])
def test_each_task_type_error_names_file_line_and_field(project, old, new, line, field, words):
    assert old in CONFIG
    path = write_config(project / "c.yml", CONFIG.replace(old, new, 1))
    message = config_error(path)
    assert message.startswith(f"{path}:{line}: {field}: "), message
    assert words in message, message


def test_a_queue_no_service_consumes_is_a_warning_naming_it(project, caplog):
    path = write_config(project / "c.yml", CONFIG.replace("    queue: q_echo\n\ntasks", "    queue: q_lonely\ntasks", 1)
                        .replace("  - name: echo2\n    callable: usertasks:echo\n    queue: q_echo\n",
                                 "  - name: echo2\n    callable: usertasks:echo\n    queue: q_lonely\n"))
    with caplog.at_level(logging.WARNING, logger="conveyor.settings.config"):
        config = load_config(path)
    assert config.queues == ("q_echo", "q_lonely")
    [record] = [r for r in caplog.records if "q_lonely" in r.getMessage()]
    assert record.getMessage() == (f"{path}:11: task_types[1].queue: no service consumes queue 'q_lonely': "
                                   "echo2 tasks sent there would wait until one does")


def test_the_cli_prints_a_bad_callable_in_one_line(project):
    path = write_config(project / "c.yml", CONFIG.replace("usertasks:echo\n    queue: q_echo\n    retry",
                                                          "usertasks:missing\n    queue: q_echo\n    retry", 1))
    proc = run_cli("dispatch.py", "--config", str(path), env={"BROKER_URL": environment.EMBEDDED_URL}, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {path}:6: task_types[0].callable: usertasks:missing: module usertasks has no attribute 'missing'"]


def test_a_worker_whose_callable_cannot_be_imported_stops_at_start_in_one_line(project):
    path = write_config(project / "c.yml", CONFIG.replace("usertasks:echo\n    queue: q_echo\n    retry",
                                                          "userpkg.jobs:run\n    queue: q_echo\n    retry", 1))
    proc = subprocess.run([sys.executable, "-m", "conveyor.stack.launcher", "--service", "echoer", "--config", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {path}:6: task_types[0].callable: userpkg.jobs:run: there is no module 'userpkg' "
        "(looked for on code_dir and the installed packages)"]


# --- load-test sizes --------------------------------------------------------------------------

def test_tasks_n_is_n_jobs_in_all_shared_by_weight():
    config = load_config(ROOT / "examples" / "wordcount" / "config.yml")
    scenario = load_scenario(ROOT / "examples" / "wordcount" / "scenario.yml", config)
    plan = Plan.of_total(scenario, 301)
    assert plan.total == 301 and plan.counts == {"pipeline": 226, "count-only": 75}  # weights 3 : 1
    jobs = list(plan)
    assert len(jobs) == 301
    pipeline = next(j for j in jobs if j.type == "pipeline")
    assert [name for name, *_ in pipeline.steps] == ["split", "count_words", "merge_counts"]
    assert pipeline.steps[0][2][0].startswith("doc-") and pipeline.steps[2][1] == {"top": 3}
    assert Plan.per_type(scenario, 10).total == 20  # --tasks-per-type: the old meaning
    seed = load_scenario(ROOT / "scenarios" / "seed.yml", load_config(ROOT / "test-config.yml"))
    assert Plan.of_total(seed, 300).counts == {"task_a": 150, "task_b": 150}


def test_a_scenario_naming_an_unknown_type_or_simulating_a_user_task_is_refused(tmp_path):
    config = load_config(ROOT / "examples" / "wordcount" / "config.yml")
    bad = write_config(tmp_path / "s.yml", "name: s\nmix:\n  - task: split\n    stages:\n      - {task: count_word}\n")
    with pytest.raises(ConfigError) as info:
        load_scenario(bad, config)
    assert str(info.value).startswith(f"{bad}:5: mix[0].stages[0].task: no task type is named 'count_word'")
    bad = write_config(tmp_path / "s.yml", "name: s\nmix:\n  - task: split\n    error_rate: 0.5\n")
    with pytest.raises(ConfigError) as info:
        load_scenario(bad, config)
    assert str(info.value).startswith(f"{bad}:4: mix[0].error_rate: runtime_s, error_rate and payload_bytes describe")


def test_a_type_s_own_time_limits_and_payload_limit(project):
    text = CONFIG.replace("    retry: {retry_on:", "    time_limits: {soft_s: 2, hard_s: 5}\n    max_payload_bytes: 4096\n    retry: {retry_on:")
    config = load_config(write_config(project / "c.yml", text))
    assert config.payload_limit("echo") == 4096 and config.payload_limit("echo2") == config.limits.max_payload_bytes
    app = create_app(config, environment.resolve())
    try:
        assert (app.tasks["echo"].soft_time_limit, app.tasks["echo"].time_limit) == (2, 5)
        assert app.tasks["echo2"].soft_time_limit is None
    finally:
        app.close()
    # Celery enforces time limits in the prefork pool only: a threads pool for that queue is refused.
    text = text.replace("    queues: [q_echo]\n", "    queues: [q_echo]\n    pool: threads\n")
    message = config_error(write_config(project / "c.yml", text))
    assert message.startswith(f"{project / 'c.yml'}:22: services[0].pool: time_limits.echo needs the prefork pool"), message


# --- the compose override for a config's own services and code --------------------------------

def test_the_compose_override_copies_worker_a_for_new_services_and_mounts_code_dir(monkeypatch):
    from conveyor.stack import compose_override

    monkeypatch.delenv("CONVEYOR_CODE_DIR", raising=False)
    config = load_config(ROOT / "examples" / "wordcount" / "config.yml")
    for file in ("docker-compose.host.yml", "docker-compose.yml"):
        base = compose_override.services_of([ROOT / file])["worker-a"]
        services = compose_override.override([ROOT / file], config)["services"]
        assert list(services) == ["splitter", "counter", "merger"]
        for name, svc in services.items():
            assert svc["environment"]["WORKER_SERVICE"] == name
            assert svc["environment"]["CONVEYOR_CODE_DIR"] == "/opt/conveyor/code"
            assert svc["volumes"] == [*base["volumes"], f"{ROOT / 'examples' / 'wordcount'}:/opt/conveyor/code:ro"]
            # Copied as written: the broker's credentials stay placeholders, depends_on comes along.
            assert svc["environment"]["BROKER_URL"] == base["environment"]["BROKER_URL"]
            assert svc["environment"]["BROKER_URL"].startswith("amqp://${") or svc["environment"]["BROKER_URL"].startswith("${")
            assert svc.get("depends_on") == base.get("depends_on") and svc["image"] == base["image"]
    # The default config's services are the compose files' own and it has no code_dir: no override.
    assert compose_override.override([ROOT / "docker-compose.host.yml"], load_config(ROOT / "test-config.yml")) is None


def test_with_code_requirements_the_workers_run_an_image_built_from_ours(tmp_path, monkeypatch):
    from conveyor.stack import compose_override

    monkeypatch.delenv("CONVEYOR_CODE_DIR", raising=False)
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "requirements.txt").write_text("PyYAML\n")
    (tmp_path / "code" / "reqtasks.py").write_text("def run():\n    return 1\n")
    path = write_config(tmp_path / "c.yml", "name: r\nexpected_workers: 1\ncode_dir: code\ncode_requirements: requirements.txt\n"
                        "task_types:\n  - {name: run, callable: 'reqtasks:run', queue: q_run}\n"
                        "tasks:\n  - {task: run, count: 1}\nservices:\n  - {name: runner, queues: [q_run]}\n")
    try:
        config = load_config(path)
    finally:
        sys.modules.pop("reqtasks", None)
    files = [ROOT / "docker-compose.host.yml"]
    base = compose_override.services_of(files)["worker-a"]
    services = compose_override.override(files, config)["services"]
    runner = services["runner"]
    assert runner["image"] == f"{base['image']}-code" and "CONVEYOR_CODE_DIR" not in runner["environment"]
    assert runner["build"] == {"context": str(tmp_path / "code"), "dockerfile": str(ROOT / "deploy" / "user.Dockerfile"),
                               "network": "host", "args": {"BASE_IMAGE": base["image"], "REQUIREMENTS": "requirements.txt"}}
    assert runner["volumes"] == base["volumes"]  # the code is in the image, not mounted
    assert services["conveyor-base"] == {"build": base["build"], "image": base["image"], "profiles": ["build"]}
    # A requirements file that is not there is a config error naming the field.
    (tmp_path / "code" / "requirements.txt").unlink()
    message = config_error(path)
    assert message.startswith(f"{path}:4: code_requirements: there is no file requirements.txt in code_dir"), message
    sys.modules.pop("reqtasks", None)


def test_four_lines_and_a_function_make_a_task_type(tmp_path):
    """The README's promise: test-config.yml plus four lines, and the new type is routed, consumed,
    registered and dispatched beside task_a and task_b."""
    (tmp_path / "mytasks.py").write_text("def greet(name):\n    return f'hello {name}'\n")
    text = (ROOT / "test-config.yml").read_text()
    text = text.replace("tasks:\n", "tasks:\n  - {task: greet, count: 5, args: [world]}\n", 1)
    text = text.replace("services:\n", "services:\n  - {name: greeter, queues: [q_greet]}\n", 1)
    text += '  - {name: greet, callable: "mytasks:greet", queue: q_greet}\ncode_dir: .\n'
    try:
        config = load_config(write_config(tmp_path / "test-config.yml", text))
        assert config.queues == ("queue_a", "queue_b", "q_greet")
        assert config.service("greeter").queues == ["q_greet"] and config.task_type("greet").queue == "q_greet"
        app = create_app(config, environment.resolve())
        try:
            assert app.tasks["greet"]("world") == "hello world"
            assert app.amqp.router.route({}, "greet")["queue"].name == "q_greet"
        finally:
            app.close()
    finally:
        sys.modules.pop("mytasks", None)
