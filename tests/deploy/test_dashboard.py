"""The Grafana dashboard and the alert rules query only metrics the code exports.

The exported set is built from the real collectors (a daemon's `Metrics`, the SLA
timer's and the worker runner's own families, the ledger's stats exporter), not from
a hand-written list; every metric name in every PromQL expression of the dashboard
and of the alert rules must be in it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from actors.sla_timer import _metrics as sla_timer_metrics
from hms_bus.metrics import Metrics
from hms_bus.stats_export import StatsCollector
from hms_bus.worker_runner import _task_counter

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "hms-bus.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"

#: Series Prometheus makes itself for every target.
PROMETHEUS_OWN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created", ""),
    "gauge": ("",),
    "info": ("_info",),
}


def exported() -> set[str]:
    registry = CollectorRegistry()
    metrics = Metrics.create(registry)
    sla_timer_metrics(registry)
    _task_counter(registry)
    registry.register(StatsCollector(expected=("dispatcher",)))
    names = set()
    for family in [*registry.collect(), *metrics.registry.collect()]:
        for suffix in _SUFFIXES.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


# -- PromQL: the metric names of an expression ----------------------------------------

_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
    "group_right", "offset", "bool", "inf", "nan", "atan2",
}  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_RANGE = re.compile(r"\[[^\]]*\]")
_IDENT = re.compile(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")


def metric_names(expr: str) -> set[str]:
    text = _VARIABLE.sub("1", expr)
    text = _STRING.sub('""', text)
    text = _MATCHERS.sub("", text)
    text = _LABEL_LIST.sub("", text)
    text = _RANGE.sub("", text)
    names = set()
    for match in _IDENT.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _KEYWORDS:
            continue  # a function, an aggregation, an operator
        names.add(name)
    return names


def test_the_promql_scanner_finds_metrics_and_nothing_else() -> None:
    expr = (
        'histogram_quantile(0.9, max by (le, workflow) (rate(hms_a_bucket{workflow=~"$wf"}[1h])))'
        " / ignoring(x) sum without (instance) (hms_b offset 15m) > bool 2 and on (y) up"
    )
    assert metric_names(expr) == {"hms_a_bucket", "hms_b", "up"}


def _dashboard_exprs() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    found: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            title = f"panel {panel['title']!r}"
            found.extend((title, target["expr"]) for target in panel.get("targets", []))
            walk(panel.get("panels", []))

    walk(board["panels"])
    variables = board["templating"]["list"]
    found.extend(
        (f"variable {v['name']}", v["definition"]) for v in variables if v["type"] == "query"
    )
    return found


def _alert_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [
        (f"alert {rule['alert']}", rule["expr"])
        for group in rules["groups"]
        for rule in group["rules"]
    ]


def _label_values_metric(expr: str) -> str:
    match = re.fullmatch(r"label_values\((\w+),\s*\w+\)", expr)
    assert match is not None, expr
    return match.group(1)


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_queried_metric_is_exported(source: str) -> None:
    known = exported() | PROMETHEUS_OWN
    exprs = _dashboard_exprs() if source == "dashboard" else _alert_exprs()
    assert len(exprs) >= 10
    unknown = []
    for where, expr in exprs:
        names = (
            {_label_values_metric(expr)} if expr.startswith("label_values") else metric_names(expr)
        )
        assert names, f"{where}: no metric in {expr!r}"
        unknown += [f"{where}: {name}" for name in sorted(names - known)]
    assert unknown == []


def test_the_dashboard_covers_the_service_desk_view() -> None:
    queried = {name for _, expr in _dashboard_exprs() for name in metric_names(expr)}
    for needed in (
        "hms_runs_open",  # runs by state
        "hms_first_response_seconds_bucket",  # first response
        "hms_sla_breaches_today",  # breaches
        "hms_consumer_pending",  # lanes' queues
        "hms_actor_instances",  # actors' health
    ):
        assert needed in queried
    board = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))


def test_alert_rules_name_the_four_conditions_of_the_issue() -> None:
    alerts = {where.removeprefix("alert ") for where, _ in _alert_exprs()}
    assert {
        "HmsSlaBreachesRising",
        "HmsDeadLetters",
        "HmsConsumerLag",
        "HmsActorWithoutHeartbeat",
    } <= alerts
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in {"info", "warning", "critical"}
            assert rule["annotations"]["summary"]


def test_grafana_provisioning_points_at_the_dashboard_and_the_datasource() -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    assert [s["uid"] for s in sources["datasources"]] == ["prometheus"]
    providers = yaml.safe_load((provisioning / "dashboards" / "hms-bus.yml").read_text())
    assert providers["providers"][0]["type"] == "file"
    board = json.loads(DASHBOARD.read_text())
    datasource = next(v for v in board["templating"]["list"] if v["name"] == "datasource")
    assert datasource["current"]["value"] == "prometheus"
