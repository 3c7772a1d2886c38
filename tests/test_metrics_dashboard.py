"""grafana/adaptive-pin.json: importable, every panel queries through the datasource variable,
and every metric it reads is one the exporter writes or the rules record."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from adaptive_pin.metrics import MetricsExporter
from adaptive_pin.model import CpuSet, MemoryMove, Verdict
from tests.metrics_exprs import (
    LABEL_VALUES,
    all_panels,
    dashboard_exprs,
    load_dashboard,
    metric_names,
    recorded_names,
    rule_metric_names,
    variable_queries,
)
from tests.metrics_helpers import demo_host, move, outcome, tick_report

DS_VAR = {"type": "prometheus", "uid": "${datasource}"}


def exported_names() -> set[str]:
    """Every sample name the exporter writes for a host with moves, verdicts, errors and an overrun."""
    exporter = MetricsExporter("hv1")
    exporter.count_overrun()
    _, (_web, db), snap = demo_host()
    m = move(db, 0, CpuSet.of(3, 7))
    exporter.observe(
        tick_report(
            snap,
            planned=[m],
            applied=[m],
            refused=[(m, "cooldown")],
            outcomes=[outcome(m, 8.0, 4.0, Verdict.ROLLED_BACK)],
            memory_applied=[MemoryMove(db.id, db.name, CpuSet.of(0), CpuSet.of(1), "test", 1.0)],
            errors={"pin": 1},
        )
    )
    text = generate_latest(exporter.registry).decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def test_dashboard_has_a_current_schema_and_unique_panel_ids() -> None:
    dash = load_dashboard()
    assert isinstance(dash["schemaVersion"], int) and 36 <= dash["schemaVersion"] <= 41
    assert dash["uid"] == "adaptive-pin" and dash["title"]
    ids = [p["id"] for p in all_panels(dash)]
    assert len(ids) == len(set(ids)), ids
    for p in all_panels(dash):
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]


def test_every_panel_queries_through_the_datasource_variable() -> None:
    dash = load_dashboard()
    data_panels = [p for p in all_panels(dash) if p["type"] != "row"]
    assert len(data_panels) >= 15
    for p in data_panels:
        assert p["datasource"] == DS_VAR, p["title"]
        assert p["targets"], f"panel {p['title']!r} has no query"
        assert p.get("description"), f"panel {p['title']!r} does not say what it shows"
        for t in p["targets"]:
            assert t["datasource"] == DS_VAR, (p["title"], t)
            assert t["expr"].strip(), (p["title"], t)
            assert 'host="$host"' in t["expr"], f"{p['title']}: not scoped to the host variable"
    for a in dash["annotations"]["list"]:
        if "expr" in a:
            assert a["datasource"] == DS_VAR, a["name"]


def test_template_variables() -> None:
    dash = load_dashboard()
    by_name = {v["name"]: v for v in dash["templating"]["list"]}
    assert by_name["datasource"]["type"] == "datasource"
    assert by_name["datasource"]["query"] == "prometheus"
    queries = variable_queries(dash)
    assert set(queries) == {"host", "vm"}
    for name in queries:
        assert by_name[name]["datasource"] == DS_VAR
        assert LABEL_VALUES.match(queries[name]), queries[name]
    assert LABEL_VALUES.match(queries["host"])["label"] == "host"  # type: ignore[index]
    assert LABEL_VALUES.match(queries["vm"])["label"] == "domain"  # type: ignore[index]
    assert by_name["vm"]["multi"] and by_name["vm"]["includeAll"] and by_name["vm"]["allValue"] == ".*"


def test_moves_are_marked_on_the_time_series() -> None:
    exprs = [a.get("expr", "") for a in load_dashboard()["annotations"]["list"]]
    assert any("adaptive_pin_migrations_total" in e and "increase(" in e for e in exprs)
    assert any("adaptive_pin_rollbacks_total" in e for e in exprs)


def test_dashboard_reads_only_metrics_that_exist() -> None:
    known = exported_names() | recorded_names()
    for where, expr in dashboard_exprs(load_dashboard()):
        unknown = metric_names(expr) - known
        assert not unknown, f"{where} reads {sorted(unknown)}, which nothing exports"


def test_rules_read_only_metrics_that_exist() -> None:
    unknown = rule_metric_names() - exported_names() - recorded_names()
    assert not unknown, f"rules read {sorted(unknown)}, which nothing exports"
