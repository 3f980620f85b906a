"""The shipped dashboard and alert rules, as the tests read them."""

from __future__ import annotations

import json
import re

from helpers import ROOT

RULES = ROOT / "deploy" / "prometheus" / "conveyor-alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "conveyor-alerts.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "conveyor-dashboard.json"
METRIC_NAME = re.compile(r"\b(?:celery|conveyor)_[a-z_]+\b")
# What Grafana substitutes before a query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$job": "celery", "$queue": ".*", "$task": ".*"}


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def grafana_substituted(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    return expr
