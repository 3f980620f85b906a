"""The Grafana dashboard and the Prometheus alert rules we ship (deploy/grafana, deploy/prometheus):
promtool checks and unit-tests the rules, every expression parses, and every metric an expression
uses is one the endpoint exposes (conveyor/monitor/metrics.py, whose presence on a live scrape
tests/test_monitor_broker.py checks). tests/test_observability_live.py runs them on real data."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import unavailable
from helpers.observability import DASHBOARD, METRIC_NAME, RULE_TESTS, RULES, dashboard_expressions, grafana_substituted

from conveyor.monitor import metrics




def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        unavailable("promtool (Debian package prometheus)")
    return found




def rule_expressions() -> list[str]:
    return [rule["expr"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]




def test_promtool_checks_the_rules():
    done = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rule_expressions())} rules found" in done.stdout


def test_promtool_unit_tests_of_the_rules_pass():
    done = subprocess.run([promtool(), "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    tested = {case["alertname"] for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for case in test.get("alert_rule_test", [])}
    assert tested == {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}


def test_every_dashboard_expression_parses(tmp_path: Path):
    # label_values() is Grafana's, not PromQL: its argument is the expression to check.
    exprs = [re.sub(r"^label_values\((.*), \w+\)$", r"\1", grafana_substituted(e)) for e in dashboard_expressions()]
    as_rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:expr{i}", "expr": e}
                                                          for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(as_rules))
    done = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_every_metric_an_expression_uses_is_exposed(source: str):
    exprs = dashboard_expressions() if source == "dashboard" else rule_expressions()
    used = {name for expr in exprs for name in METRIC_NAME.findall(expr)}
    exposed = {name for spec in metrics.ALL for name in metrics.exposed_names(spec)}
    assert used and used <= exposed, sorted(used - exposed)


def test_the_dashboard_covers_what_the_issue_asks_and_its_panels_do_not_overlap():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    used = {name for p in panels for t in p["targets"] for name in METRIC_NAME.findall(t["expr"])}
    for needed in ("celery_queue_length", "celery_active_consumer_count", "celery_task_sent_total",
                   "celery_task_failed_total", "celery_task_runtime_bucket", "conveyor_task_wait_seconds_bucket",
                   "celery_worker_up", "celery_worker_tasks_active", "conveyor_dead_letter_messages",
                   "conveyor_dead_letter_max_messages", "conveyor_service_replicas"):
        assert needed in used, needed
    assert any("by (name, exception)" in t["expr"] for p in panels for t in p["targets"])
    cells = set()
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not mine & cells, panel["title"]
        cells |= mine
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert all(t["datasource"]["uid"] == "${datasource}" for p in panels for t in p["targets"])
