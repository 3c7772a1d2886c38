"""prometheus/: the rules pass `promtool check rules` and their unit tests pass `promtool test rules`."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import require
from tests.metrics_exprs import ALERTS, RULE_TESTS, RULES


def promtool() -> str:
    path = shutil.which("promtool")
    require(path is not None, "promtool not installed (Debian package prometheus)")
    assert path is not None
    return path


def test_rules_are_valid() -> None:
    done = subprocess.run(
        [promtool(), "check", "rules", str(RULES), str(ALERTS)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    alerts = {
        line.split(":", 1)[1].strip()
        for line in ALERTS.read_text().splitlines()
        if line.strip().startswith("- alert:")
    }
    tested = "\n".join(p.read_text() for p in RULE_TESTS)
    for alert in alerts:
        assert f"alertname: {alert}\n" in tested, f"{alert} has no promtool test"
        # A silent case (exp_alerts: []) and a firing one (a list of expected alerts).
        blocks = tested.split(f"alertname: {alert}\n")[1:]
        assert any(b.lstrip().startswith("exp_alerts: []") for b in blocks), f"{alert}: no silent case"
        assert any(b.lstrip().startswith("exp_alerts:\n") for b in blocks), f"{alert}: no firing case"


@pytest.mark.parametrize("test_file", RULE_TESTS, ids=lambda p: p.name)
def test_promtool_rule_unit_tests(test_file: object) -> None:
    done = subprocess.run(
        [promtool(), "test", "rules", str(test_file)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
