"""``adaptive-pin run`` as a process: ticks, state file, lock, signals, reload, exit codes."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEMO = str(REPO / "scenarios" / "demo.toml")


def _cmd(tmp: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "adaptive_pin",
        "run",
        "--driver",
        "sim",
        "--scenario",
        DEMO,
        "--interval",
        "1",
        "--no-metrics",
        "--log-format",
        "plain",
        "--state-file",
        str(tmp / "state" / "state.json"),
        "--lock-file",
        str(tmp / "run" / "lock"),
        *extra,
    ]


def _wait_for(path: Path, text: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in (content := path.read_text()):
            return content
        time.sleep(0.1)
    raise AssertionError(
        f"{text!r} not in {path} after {timeout}s:\n{path.read_text() if path.exists() else ''}"
    )


def test_a_bounded_run_ticks_pins_and_writes_private_state(tmp_path: Path) -> None:
    p = subprocess.run(
        _cmd(tmp_path, "--ticks", "8"), capture_output=True, text=True, check=False, timeout=120
    )
    assert p.returncode == 0, p.stderr
    assert " move " in p.stderr  # one line per decision, with its reason
    state = tmp_path / "state" / "state.json"
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    doc = json.loads(state.read_text())
    assert doc["original_affinity"] == {}  # restored on exit: nothing left to restore
    assert "restored" in p.stderr


def test_without_restore_the_state_remembers_how_to_restore(tmp_path: Path) -> None:
    p = subprocess.run(
        _cmd(tmp_path, "--ticks", "8", "--no-restore-on-exit"),
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    doc = json.loads((tmp_path / "state" / "state.json").read_text())
    assert doc["original_affinity"], "moved vCPUs' original affinities must survive a restart"
    assert "restored" not in p.stderr


def test_sigterm_ends_the_tick_restores_and_exits_zero(tmp_path: Path) -> None:
    log = tmp_path / "log"
    with log.open("w") as err:
        proc = subprocess.Popen(_cmd(tmp_path), stderr=err, stdout=subprocess.DEVNULL)
        try:
            _wait_for(log, " move ")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert "signal SIGTERM" in text and "restored" in text
    assert "Traceback" not in text


def test_a_second_instance_is_refused_with_one_line(tmp_path: Path) -> None:
    log = tmp_path / "log"
    with log.open("w") as err:
        first = subprocess.Popen(_cmd(tmp_path), stderr=err, stdout=subprocess.DEVNULL)
        try:
            _wait_for(log, "running:")
            second = subprocess.run(
                _cmd(tmp_path, "--ticks", "1"), capture_output=True, text=True, check=False, timeout=60
            )
        finally:
            first.send_signal(signal.SIGINT)
            first.wait(timeout=30)
    assert second.returncode != 0
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and str(first.pid) in lines[0], second.stderr


def test_sighup_keeps_the_old_config_when_the_new_one_is_bad(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text("[guard]\ncooldown_s = 30\n")
    log = tmp_path / "log"
    with log.open("w") as err:
        proc = subprocess.Popen(_cmd(tmp_path, "--config", str(cfg)), stderr=err, stdout=subprocess.DEVNULL)
        try:
            _wait_for(log, "running:")
            cfg.write_text("[guard]\ncooldown_s = 'soon'\n")
            proc.send_signal(signal.SIGHUP)
            _wait_for(log, "new config refused")
            cfg.write_text("[guard]\ncooldown_s = 90\n")
            proc.send_signal(signal.SIGHUP)
            _wait_for(log, "config reloaded")
            assert proc.poll() is None  # still running through both
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
    assert "guard.cooldown_s" in log.read_text()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--interval", "soon"], "invalid float"),
        (["--reserved", "0-999"], "host.reserved"),
        (["--policy", "no-such-policy"], "no-such-policy"),
        (["--policy-option", "granularity"], "KEY=VALUE"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: list[str], fragment: str) -> None:
    p = subprocess.run(
        _cmd(tmp_path, "--ticks", "1", *args), capture_output=True, text=True, check=False, timeout=60
    )
    assert p.returncode == 2, p.stderr
    assert fragment in p.stderr and "Traceback" not in p.stderr


def test_plan_advises_and_json_is_machine_readable() -> None:
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "adaptive_pin",
            "plan",
            "--driver",
            "sim",
            "--scenario",
            DEMO,
            "--interval",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["policy"] == "cache-aware"
    for m in doc["moves"]:
        assert {"vm", "vcpu", "from", "to", "reason", "predicted_gain", "guard"} <= set(m)
