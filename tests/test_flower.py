"""Flower as `make flower` runs it (python -m conveyor.cli.flower), against a live local stack
on the session's private vhost, seen through a real browser: headless Chromium (Debian's
`chromium`) renders its Workers, Tasks and Broker pages, and our workers, a finished task of ours
and our queues must be on them."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import ROOT, free_port, run_cli, stop_process, wait_for, write_config
from helpers.flower import answers, rendered

from conveyor.cli import flower

@pytest.fixture
def events_config(tmp_path):
    """The shipped config with task events on: Flower's task pages are built from them."""
    return write_config(tmp_path / "flower.yml", (ROOT / "test-config.yml").read_text() + "\ntuning: {task_events: true}\n")


@pytest.fixture
def flower_url(tmp_path, events_config, monkeypatch):
    port = free_port()
    log = open(tmp_path / "flower.log", "wb")
    monkeypatch.setenv("CONVEYOR_CONFIG", str(events_config))
    proc = subprocess.Popen([sys.executable, "-m", "conveyor.cli.flower", "--port", str(port)], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"

    def answering() -> bool:
        assert proc.poll() is None, (tmp_path / "flower.log").read_text()
        return answers(url)

    try:
        wait_for(answering, 60, "Flower to answer", interval_s=0.5)
        yield url
    finally:
        stop_process(proc)


@pytest.mark.broker
@pytest.mark.usefixtures("broker_env")
def test_flower_shows_our_workers_a_finished_task_and_the_queues(local_stack, flower_url, events_config, tmp_path):
    stack = local_stack(events_config)
    app = stack.app
    nodes = [r.node for r in stack.replicas()]
    # Flower must see the task from its task-sent event on: sent after Flower is listening.
    wait_for(lambda: all(n in rendered(f"{flower_url}/workers", tmp_path / "p0") for n in nodes), 60,
             "Flower to list every worker", interval_s=1)
    result = app.send_task("task_a", kwargs={"duration_s": 0})
    assert result.get(timeout=30)
    wait_for(lambda: result.id in (page := rendered(f"{flower_url}/tasks", tmp_path / "p1")) and "SUCCESS" in page, 60,
             f"task {result.id} to be listed as succeeded", interval_s=1)
    task_page = rendered(f"{flower_url}/task/{result.id}", tmp_path / "p2")
    assert "task_a" in task_page and "SUCCESS" in task_page and any(n in task_page for n in nodes)
    # The Broker tab reads the management API through --broker_api (FLOWER_BROKER_API).
    broker_page = rendered(f"{flower_url}/broker", tmp_path / "p3")
    assert "queue_a" in broker_page and "queue_b" in broker_page


def test_broker_api_is_the_management_api_with_the_brokers_credentials(monkeypatch):
    from conveyor.settings import environment

    monkeypatch.delenv("RABBITMQ_MANAGEMENT_URL", raising=False)
    settings = environment.resolve({"BROKER_URL": "amqp://us%40er:p%2Fss@10.0.0.5:5672/prod"})
    assert flower.broker_api(settings) == "http://us%40er:p%2Fss@10.0.0.5:15672/api/"
    monkeypatch.setenv("RABBITMQ_MANAGEMENT_URL", "https://mq.example:443/")
    assert flower.broker_api(settings) == "https://us%40er:p%2Fss@mq.example:443/api/"


def test_flower_refuses_the_embedded_broker_in_one_line(tmp_path):
    proc = run_cli("-m", "conveyor.cli.flower", env={"BROKER_URL": "filesystem://", "CONVEYOR_RUN_DIR": str(tmp_path)})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "the embedded filesystem broker has no management API" in lines[0]
