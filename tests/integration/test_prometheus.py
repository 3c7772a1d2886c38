"""A real Prometheus scrapes the exporter, evaluates the rules, and answers every dashboard query.

Run twice: the exporter fed by the real ``adaptive-pin run --driver sim --scenario
scenarios/demo.toml``, and by a loop of synthetic TickReports with moves, verdicts, rollbacks and
errors in every tick, so that every series the dashboard reads must exist. Prometheus runs
with a 1 s scrape and evaluation interval, storage in a temp dir, on a free loopback port; all of
it is killed in a ``finally``. Bounded to about a minute.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from adaptive_pin.metrics import MetricsExporter
from adaptive_pin.model import CpuSet, Verdict
from tests.conftest import require
from tests.integration.conftest import free_port
from tests.metrics_exprs import (
    ALERTS,
    LABEL_VALUES,
    REPO,
    RULES,
    dashboard_exprs,
    load_dashboard,
    metric_names,
    substitute,
    variable_queries,
)
from tests.metrics_helpers import demo_host, move, outcome, tick_report

pytestmark = pytest.mark.integration

PROMETHEUS = shutil.which("prometheus")
RUN_COMMAND = REPO / "adaptive_pin" / "commands" / "run.py"
DEMO_SCENARIO = REPO / "scenarios" / "demo.toml"
DEADLINE_S = 45.0

# Series that exist only once something happened (a move verified, an error met). The synthetic
# feed makes all of them happen; a short run of the real simulator may not.
ONLY_AFTER_EVENTS = {
    "adaptive_pin_errors_total": "no fault has happened in this run",
    "adaptive_pin_rollbacks_total": "no move has been rolled back yet",
    "adaptive_pin_move_verdicts_total": "no move has been verified yet",
    "adaptive_pin_move_mpki_after_before_ratio": "no move has been verified yet",
    "adaptive_pin_migrations_total": "no move applied in the window yet",
    "adaptive_pin_move_mpki_before_bucket": "no move has been verified yet",
    "adaptive_pin_move_mpki_after_bucket": "no move has been verified yet",
}

# Alert expressions are empty on a healthy host: that is what they are for. For each, the series
# it reads must exist instead (the regression alerts' `offset 1h` half cannot have data in a
# Prometheus that started seconds ago, which is why the names without offset are checked).
EMPTY_WHEN_HEALTHY = {
    "AdaptivePinVMCacheMissRegression": "MPKI has not risen against an hour ago (there is no hour ago)",
    "AdaptivePinHostCacheMissRegression": "MPKI has not risen against an hour ago (there is no hour ago)",
    "AdaptivePinMigrationStorm": "fewer than 30 moves in 10 minutes",
    "AdaptivePinRollbacksFrequent": "fewer than 5 rollbacks in an hour",
    "AdaptivePinDown": "the target is up",
    "AdaptivePinAbsent": "the target exists",
    "AdaptivePinNotTicking": "the controller ticks",
    "AdaptivePinTickOverrun": "ticks are shorter than the interval",
    "AdaptivePinCountersUnavailable": "the counters are available (sim / synthetic PMU)",
    "AdaptivePinErrors": "needs 15 minutes of errors",
}


class Prom:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.base}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.load(resp)
        assert body["status"] == "success", (path, params, body)
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query", query=expr)
        result = data["result"]
        if data["resultType"] == "scalar":
            return [{"value": result}]
        assert isinstance(result, list)
        return result

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base}/-/ready", timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False


def wait_for(what: str, check: Callable[[], bool], deadline: float) -> None:
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.25)
    pytest.fail(f"timed out waiting for {what}")


@contextmanager
def synthetic_exporter(port: int) -> Iterator[str]:
    """A MetricsExporter fed a tick every 0.25 s by a thread: every kind of event, every tick."""
    exporter = MetricsExporter("it-host")
    exporter.prepare("cache_aware")  # as the daemon does: every known label set at 0
    server = exporter.serve(f"127.0.0.1:{port}")
    stop = threading.Event()

    def feed() -> None:
        tick = 0
        while not stop.is_set():
            tick += 1
            _, (web, db), snap = demo_host(tick=tick)
            m = move(db, tick % 2, CpuSet.of(3, 7))
            rb = move(web, 0, CpuSet.of(0, 4), kind="rollback")
            exporter.observe(
                tick_report(
                    snap,
                    tick=tick,
                    wall_time=time.time(),
                    duration_s=0.004,
                    interval_s=0.25,
                    planned=[m],
                    applied=[m, rb],
                    outcomes=[outcome(m, 8.0, 4.0, Verdict.KEPT), outcome(rb, 1.0, 3.0, Verdict.ROLLED_BACK)],
                    errors={"pin": 1},
                )
            )
            if tick % 4 == 0:
                exporter.count_overrun()
            stop.wait(0.25)

    t = threading.Thread(target=feed, daemon=True)
    t.start()
    try:
        yield "synthetic TickReports"
    finally:
        stop.set()
        t.join(timeout=5)
        server.shutdown()


@contextmanager
def real_controller(port: int, log: Path) -> Iterator[str]:
    # Everything it writes stays in the test's directory: no /var/lib or /run state, and no
    # /etc/adaptive-pin/config.toml of the machine running the tests.
    tmp = log.parent
    config = tmp / "adaptive-pin.toml"
    config.write_text("")
    cmd = [
        sys.executable,
        "-m",
        "adaptive_pin",
        "run",
        "--driver",
        "sim",
        "--scenario",
        str(DEMO_SCENARIO),
        "--interval",
        "1",
        "--metrics-address",
        f"127.0.0.1:{port}",
        "--config",
        str(config),
        "--state-file",
        str(tmp / "state" / "state.json"),
        "--lock-file",
        str(tmp / "run" / "adaptive-pin.lock"),
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield " ".join(cmd[2:])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("feed", ["run-sim", "synthetic"])
def test_prometheus_scrapes_evaluates_rules_and_answers_the_dashboard(tmp_path: Path, feed: str) -> None:
    require(PROMETHEUS is not None, "prometheus not installed (Debian package prometheus)")
    assert PROMETHEUS is not None
    real = feed == "run-sim"
    if real:
        assert RUN_COMMAND.exists() and DEMO_SCENARIO.exists(), (RUN_COMMAND, DEMO_SCENARIO)
    deadline = time.monotonic() + DEADLINE_S
    exporter_port, prom_port = free_port(), free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(RULES), str(ALERTS)],
        "scrape_configs": [
            {"job_name": "adaptive-pin", "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}]}
        ],
    }
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(json.dumps(config))  # JSON is YAML
    feeder = (
        real_controller(exporter_port, tmp_path / "run.log") if real else synthetic_exporter(exporter_port)
    )
    prom_log = (tmp_path / "prometheus.log").open("wb")
    with feeder as fed_by:
        proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
                "--log.level=warn",
            ],
            stdout=prom_log,
            stderr=subprocess.STDOUT,
        )
        try:
            prom = Prom(prom_port)
            wait_for("Prometheus ready", prom.ready, deadline)
            # Two scrapes for rate(), then one evaluation of the recording rules on top.
            wait_for(
                "the recorded host MPKI",
                lambda: bool(prom.query("host:adaptive_pin_vcpu_mpki:ratio_rate5m")),
                deadline,
            )
            print(f"exporter fed by {fed_by}")
            check_target(prom)
            host = check_metrics_arrive(prom)
            check_rules(prom, deadline, may_be_empty=real)
            check_dashboard(prom, host, may_be_empty=real)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            prom_log.close()


def check_target(prom: Prom) -> None:
    targets = prom.get("/api/v1/targets")["activeTargets"]
    ours = [t for t in targets if t["labels"]["job"] == "adaptive-pin"]
    assert len(ours) == 1 and ours[0]["health"] == "up", ours
    assert ours[0]["lastError"] == ""


def check_metrics_arrive(prom: Prom) -> str:
    info = prom.query("adaptive_pin_build_info")
    assert len(info) == 1
    host: str = info[0]["metric"]["host"]
    for name in (
        "adaptive_pin_vcpu_llc_misses_total",
        "adaptive_pin_vcpu_cpu_seconds_total",
        "adaptive_pin_vcpu_placement_info",
        "adaptive_pin_llc_domain_vcpus",
        "adaptive_pin_tick_duration_seconds_bucket",
        "adaptive_pin_collector_capability",
        "adaptive_pin_vm_info",
    ):
        assert prom.query(f'{name}{{host="{host}"}}'), f"{name} did not arrive"
    return host


def why_empty(expr: str, may_be_empty: bool) -> str | None:
    """The reason an expression may have no data yet, or None when it must have data."""
    events = sorted(metric_names(expr) & set(ONLY_AFTER_EVENTS))
    return ONLY_AFTER_EVENTS[events[0]] if may_be_empty and events else None


def assert_series_exist(prom: Prom, expr: str, where: str, may_be_empty: bool) -> None:
    for name in metric_names(expr):
        assert prom.query(name) or why_empty(name, may_be_empty), f"{where}: {name} has no data"


def check_rules(prom: Prom, deadline: float, may_be_empty: bool) -> None:
    def all_evaluated() -> bool:
        groups = prom.get("/api/v1/rules")["groups"]
        return all(r["lastEvaluation"] != "0001-01-01T00:00:00Z" for g in groups for r in g["rules"])

    wait_for("every rule evaluated once", all_evaluated, deadline)
    rules = [r for g in prom.get("/api/v1/rules")["groups"] for r in g["rules"]]
    recording = [r for r in rules if r["type"] == "recording"]
    alerting = [r for r in rules if r["type"] == "alerting"]
    assert len(recording) >= 8 and len(alerting) == len(EMPTY_WHEN_HEALTHY)
    for r in rules:
        assert r["health"] == "ok" and not r.get("lastError"), r
    for r in recording:
        assert prom.query(r["name"]) or why_empty(r["query"], may_be_empty), f"{r['name']} has no data"
    with_data = []
    for r in alerting:
        if prom.query(r["query"]):
            with_data.append(r["name"])  # e.g. AdaptivePinErrors under the synthetic feed's pin errors
            continue
        # Empty by design (see EMPTY_WHEN_HEALTHY): the series it watches must exist instead.
        assert r["name"] in EMPTY_WHEN_HEALTHY, r["name"]
        if r["name"] in ("AdaptivePinDown", "AdaptivePinAbsent"):
            assert prom.query('up{job="adaptive-pin"} == 1')
        else:
            assert_series_exist(prom, r["query"], r["name"], may_be_empty)
    print("alert expressions with data:", with_data or "none")


def check_dashboard(prom: Prom, host: str, may_be_empty: bool) -> None:
    dash = load_dashboard()
    variables = {
        "host": host,
        "__rate_interval": "1m",
        "__interval": "5s",
        "__range": "5m",
        "datasource": "prometheus",
    }
    for name, query in variable_queries(dash).items():
        m = LABEL_VALUES.match(substitute(query, variables | {"vm": ".*"}))
        assert m is not None, query
        params = {"match[]": m["selector"]} if m["selector"] else {}
        values = prom.get(f"/api/v1/label/{m['label']}/values", **params)
        assert values, f"variable {name}: {query} found nothing"
        if name == "vm":
            variables["vm"] = "|".join(values)  # what Grafana sends for several selected values
    empty: list[str] = []
    for where, expr in dashboard_exprs(dash):
        concrete = substitute(expr, variables)
        assert "$" not in concrete, f"{where}: unsubstituted variable in {concrete}"
        if prom.query(concrete):
            continue
        reason = why_empty(expr, may_be_empty)
        assert reason, f"{where}: no data for {concrete}"
        empty.append(f"{where}: {reason}")
    print("dashboard queries legitimately empty:", empty or "none")
