"""The systemd unit agrees with the config defaults, and systemd accepts it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from adaptive_pin.config import DEFAULT_PATH, Config
from tests.conftest import require

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "deploy" / "adaptive-pin.service"


def directives() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_unit_directories_match_the_config_defaults() -> None:
    d, daemon = directives(), Config().daemon
    # systemd creates /var/lib/<StateDirectory>, /run/<RuntimeDirectory>, /etc/<ConfigurationDirectory>.
    assert daemon.state_file.parent == Path("/var/lib") / d["StateDirectory"][0]
    assert daemon.lock_file.parent == Path("/run") / d["RuntimeDirectory"][0]
    assert DEFAULT_PATH.parent == Path("/etc") / d["ConfigurationDirectory"][0]
    assert d["StateDirectoryMode"] == ["0700"]


def test_unit_grants_what_pinning_and_perf_need() -> None:
    d = directives()
    assert set(d["CapabilityBoundingSet"][0].split()) == {"CAP_SYS_NICE", "CAP_PERFMON"}
    assert "perf_event_open" in d["SystemCallFilter"][0].split()  # in @debug, not @system-service
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["RestartPreventExitStatus"] == ["2"]  # a config error is not fixed by restarting
    assert d["ProtectProc"] == ["default"]  # "invisible" would hide QEMU processes


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    require(analyze is not None, "systemd-analyze not installed (Debian package systemd)")
    assert analyze is not None
    # verify wants ExecStart to exist: point it at this checkout's entry point.
    exe = Path(sys.executable).with_name("adaptive-pin")
    assert exe.exists(), f"{exe}: the project is not installed in this interpreter's environment"
    unit = tmp_path / "adaptive-pin.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/adaptive-pin", str(exe)))
    proc = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert str(unit) not in proc.stderr, proc.stderr  # no warnings about our unit either


def test_the_syscall_filter_lets_every_call_the_daemon_makes_through() -> None:
    analyze = shutil.which("systemd-analyze")
    require(analyze is not None, "systemd-analyze not installed (Debian package systemd)")
    assert analyze is not None
    seen: set[str] = set()

    def expand(name: str) -> set[str]:  # a group lists its own calls and the groups it includes
        if not name.startswith("@"):
            return {name}
        if name in seen:
            return set()
        seen.add(name)
        out = subprocess.run(
            [analyze, "syscall-filter", name], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        calls: set[str] = set()
        for line in out.splitlines()[1:]:
            word = line.strip()
            if word and not word.startswith("#"):
                calls |= expand(word)
        return calls

    allowed: set[str] = set()
    for entry in directives()["SystemCallFilter"][0].split():
        allowed |= expand(entry)
    # pinning, memory migration, counters, and what the daemon needs of the kernel besides
    assert {"sched_setaffinity", "migrate_pages", "perf_event_open", "ioctl", "openat"} <= allowed
