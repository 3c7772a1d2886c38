"""Find the PromQL in the dashboard and rules files, and the metric names it reads.

Shared by the structure tests and the real-Prometheus integration test. No YAML parser is
needed: the rules files are read with promtool's help in the integration test, and here only
their ``record:`` names and metric names are picked out with regular expressions.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "grafana" / "adaptive-pin.json"
RULES = REPO / "prometheus" / "adaptive-pin.rules.yml"
ALERTS = REPO / "prometheus" / "adaptive-pin.alerts.yml"
RULE_TESTS = sorted((REPO / "prometheus" / "tests").glob("*_test.yml"))

# A metric a query reads: ours (adaptive_pin_...) or one recorded from ours (level:metric:ops).
METRIC = re.compile(r"\b((?:[a-z_]+:)?adaptive_pin_[a-z0-9_]+(?::[a-z0-9_]+)?)\b")


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def all_panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    out: list[dict[str, Any]] = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def dashboard_exprs(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) for every panel target and annotation query."""
    found = [
        (f"panel {p['title']!r} target {t['refId']}", t["expr"])
        for p in all_panels(dash)
        for t in p.get("targets", [])
    ]
    found += [(f"annotation {a['name']!r}", a["expr"]) for a in dash["annotations"]["list"] if "expr" in a]
    return found


def variable_queries(dash: dict[str, Any]) -> dict[str, str]:
    """Template variable name -> its label_values(...) query."""
    return {
        v["name"]: v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        for v in dash["templating"]["list"]
        if v["type"] == "query"
    }


LABEL_VALUES = re.compile(r"^label_values\((?:(?P<selector>.+),\s*)?(?P<label>\w+)\)$")


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace Grafana's variables ($name, ${name}, [[name]]) by concrete values, longest name first."""
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    return expr


def metric_names(expr: str) -> set[str]:
    return set(METRIC.findall(expr))


def recorded_names() -> set[str]:
    return set(re.findall(r"^\s*- record:\s*(\S+)", RULES.read_text(), flags=re.M))


def rule_metric_names() -> set[str]:
    """Metric names read by the expressions of both rules files (record: lines excluded)."""
    names: set[str] = set()
    for path in (RULES, ALERTS):
        for line in path.read_text().splitlines():
            if line.lstrip().startswith(("- record:", "#")):
                continue
            names |= metric_names(line.split("#", 1)[0] if "expr" in line else line)
    return names
