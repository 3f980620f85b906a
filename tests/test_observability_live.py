"""The dashboard and the alert rules on real data: a real Prometheus (Debian's `prometheus`, our own
process on a free loopback port, its data in tmp_path) scrapes the monitor of a live stack as job
"celery" while a dispatch with failures runs; every dashboard query must return series, every rule
must evaluate without error, and after a worker is SIGKILLed and its queue keeps receiving tasks,
every alert must be pending or firing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
from helpers import management, free_port, stop_process, unavailable, wait_for, write_config
from helpers.monitor import CONFIG, purge
from helpers.observability import RULES, dashboard_expressions, grafana_substituted

from conveyor.tasks import deadletter
from conveyor.settings.config import Monitoring
from conveyor.dispatch.dispatcher import dispatch
from conveyor.monitor import Monitor, prometheus
from conveyor.settings.context import settings_of

pytestmark = [pytest.mark.broker, pytest.mark.usefixtures("broker_env")]
SCRAPE_INTERVAL_S = 1
# Grafana's $__rate_interval is at least four scrape intervals; 15 s leaves room for a late scrape.
LIVE_VARIABLES = {"$__rate_interval": "15s"}


@pytest.fixture
def prometheus_server(tmp_path):
    """Start Prometheus scraping `target` every second with our rules; yield a query function."""
    binary = shutil.which("prometheus")
    if binary is None:
        unavailable("prometheus (Debian package prometheus)")
    procs = []

    def start(target: str):
        port = free_port()
        config = tmp_path / "prometheus.yml"
        shutil.copy(RULES, tmp_path / RULES.name)
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "evaluation_interval": f"{SCRAPE_INTERVAL_S}s"},
            "rule_files": [RULES.name],
            "scrape_configs": [{"job_name": "celery", "static_configs": [{"targets": [target]}]}],
        }))
        log = open(tmp_path / "prometheus.log", "wb")
        procs.append(subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))

        def api(path: str, **params: str):
            url = f"http://127.0.0.1:{port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    return json.loads(response.read())["data"]
            except OSError:
                return None

        def scraping() -> bool:
            targets = (api("targets") or {}).get("activeTargets") or []
            return bool(targets) and targets[0].get("health") == "up"

        wait_for(scraping, 30, "Prometheus to scrape the monitor", interval_s=0.5)
        return api

    yield start
    for proc in procs:
        stop_process(proc)


def live(expr: str) -> str:
    for name, value in LIVE_VARIABLES.items():
        expr = expr.replace(name, value)
    return grafana_substituted(expr)


@pytest.fixture
def dead_letter_policy(rabbitmq_url):
    """A max-length of 2 on the session vhost's dead-letter queue, by policy, as an operator bounds it."""
    vhost = rabbitmq_url.rsplit("/", 1)[1]
    body = json.dumps({"pattern": "^dead_letter$", "definition": {"max-length": 2}, "apply-to": "queues"}).encode()
    management("PUT", f"policies/{vhost}/conveyor-test-dead-letter-bound", body)
    yield 2
    management("DELETE", f"policies/{vhost}/conveyor-test-dead-letter-bound")


def test_every_panel_has_data_and_every_alert_fires_on_a_live_stack(local_stack, make_app, prometheus_server,
                                                                      dead_letter_policy, tmp_path):
    config_file = write_config(tmp_path / "live.yml", CONFIG)
    purge(make_app(config_file))
    stack = local_stack(config_file)
    app = stack.app
    deadletter.drain(app)
    settings = Monitoring(collect_interval_s=0.5, emit_interval_s=1, prometheus_port=0, worker_down_after_s=3,
                          worker_forget_after_s=600)
    monitor = Monitor(stack, settings).start()
    server = prometheus.serve(monitor, "127.0.0.1", 0)
    try:
        api = prometheus_server(f"127.0.0.1:{server.server_port}")
        report = dispatch(app, settings_of(app).config, timeout_s=60)
        assert report.dead_lettered == 1
        wait_for(lambda: sum(r["succeeded"] + r["failed"] for r in monitor.snapshot()["tasks"]) >= 13, 20,
                 "the monitor to see every task finish")

        def empty_panels() -> list[str]:
            exprs = [e for e in dashboard_expressions() if not e.startswith("label_values(")]
            return [e for e in exprs if not (api("query", query=live(e)) or {}).get("result")]

        # Rates need two scrapes after the events; label_values queries are Grafana's (their
        # argument is a panel metric already covered).
        wait_for(lambda: not empty_panels(), 30, "every dashboard query to return series", interval_s=1)

        # A second DeadLettered failure: increase() counts from a series' first sample on, and the
        # series of an exception appears with its first failure (as with the Celery exporter).
        failing = app.send_task("task_b", kwargs={"duration_s": 0, "fail_first": 100})
        wait_for(lambda: sum(r["failed"] for r in monitor.snapshot()["tasks"]) >= 2, 30,
                 f"task {failing.id} to fail for good")

        # The bound is the broker's (the policy), not the config's 10 000; both dead letters fill it.
        bound = api("query", query='conveyor_dead_letter_max_messages{job="celery"}')["result"]
        assert [float(r["value"][1]) for r in bound] == [dead_letter_policy]

        # Now the faults: worker-b is SIGKILLed and task_b keeps being sent to its queue.
        victim = next(r for r in stack.replicas() if r.service == "worker-b")
        os.killpg(int(victim.ident), signal.SIGKILL)
        for _ in range(5):
            app.send_task("task_b", kwargs={"duration_s": 0})
            time.sleep(1)  # a queue that grows over time, not one burst (delta() over the window)

        def alert_states() -> dict[str, str]:
            rules = api("rules") or {"groups": []}
            found = {r["name"]: r["state"] for g in rules["groups"] for r in g["rules"]}
            bad = [r for g in rules["groups"] for r in g["rules"] if r["health"] != "ok"]
            assert not bad, bad
            return found

        want = {"ConveyorQueueGrowingWithoutConsumers", "ConveyorNoWorkerUpForQueue", "ConveyorTaskFailureRatioHigh",
                "ConveyorDeadLetterQueueFilling", "ConveyorWorkerDown"}
        seen: dict[str, str] = {}

        def all_active() -> bool:
            seen.update(alert_states())
            return {n for n, s in seen.items() if s in ("pending", "firing")} >= want

        try:
            wait_for(all_active, 30, "every alert to be pending", interval_s=1)
        except pytest.fail.Exception:
            pytest.fail(f"not every alert became pending: {seen}")
        assert set(alert_states()) == want
    finally:
        server.shutdown()
        monitor.stop()
        purge(app)
        deadletter.drain(app)
