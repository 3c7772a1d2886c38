"""The systemd unit's capabilities are enough, and each one is needed: checked for real.

deploy/adaptive-pin.service runs the daemon as root with ``CapabilityBoundingSet=CAP_SYS_NICE
CAP_PERFMON`` and ``NoNewPrivileges=yes``. systemd is not PID 1 here, so the same limits are
applied with util-linux ``setpriv`` (bounding set, no_new_privs) to adaptive-pin working on a
plain QEMU that runs as another user (``nobody``), as tenants' QEMUs do:

- with both, it pins that QEMU's vCPU threads and opens perf events on them;
- without CAP_SYS_NICE the pin is refused (EPERM), one VM's error, not a crash;
- without CAP_PERFMON perf_event_open on them is refused (EACCES at perf_event_paranoid >= 2).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require
from tests.integration.conftest import PREFIX, QEMU, cpus_allowed, wait_for

pytestmark = pytest.mark.integration

SETPRIV = shutil.which("setpriv")
UNIT_CAPS = ("sys_nice", "perfmon")


def _paranoid() -> int:
    return int(Path("/proc/sys/kernel/perf_event_paranoid").read_text())


def _bounded(caps: tuple[str, ...], *argv: str) -> subprocess.CompletedProcess[str]:
    assert SETPRIV is not None
    keep = ",".join(["-all", *(f"+{c}" for c in caps)])
    return subprocess.run(
        [SETPRIV, "--bounding-set", keep, "--no-new-privs", "--", sys.executable, *argv],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


@pytest.fixture
def tenant_qemu() -> Iterator[tuple[str, int]]:
    """A paused 2-vCPU plain QEMU running as nobody; yields (name, pid)."""
    require(os.geteuid() == 0, "needs root (to start a QEMU as another user)")
    require(SETPRIV is not None, "setpriv not installed (Debian: util-linux)")
    require(QEMU is not None, "qemu-system-x86_64 is not installed")
    assert SETPRIV is not None and QEMU is not None
    name = f"{PREFIX}cap-{uuidlib.uuid4().hex[:6]}"
    argv = [
        SETPRIV, "--reuid", "nobody", "--regid", "nogroup", "--clear-groups", "--",
        QEMU, "-name", f"guest={name},debug-threads=on", "-uuid", str(uuidlib.uuid4()),
        "-machine", "pc", "-accel", "tcg", "-smp", "2", "-m", "64", "-nographic", "-nodefaults", "-S",
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/"
    )
    try:
        wait_for(
            lambda: _vcpu_tids(proc.pid) and len(_vcpu_tids(proc.pid)) == 2, 15, f"{name}'s vCPU threads"
        )
        assert Path(f"/proc/{proc.pid}").stat().st_uid == 65534  # really another user's
        yield name, proc.pid
    finally:
        proc.kill()
        proc.wait(timeout=10)


def _vcpu_tids(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            if Path(f"/proc/{pid}/task/{tid}/comm").read_text().startswith("CPU "):
                out.append(int(tid))
    except OSError:
        return []
    return sorted(out)


def _apply(tmp: Path, caps: tuple[str, ...], rc: int = 0) -> dict[str, object]:
    """``apply`` under the bounding set; exit 1 says some moves failed (the JSON says which)."""
    empty = tmp / "empty.toml"
    empty.write_text("")
    p = _bounded(
        caps, "-m", "adaptive_pin", "apply", "--driver", "qemu", "--policy", "pack",
        "--interval", "0.3", "--json", "--config", str(empty),
    )  # fmt: skip
    assert p.returncode == rc, p.stderr
    assert "Traceback" not in p.stderr
    doc: dict[str, object] = json.loads(p.stdout)
    return doc


PERF_PROBE = """
import json, sys
from adaptive_pin.model import TASK_CLOCK, ThreadRef
from collectors.perf import PerfCollector
pid, tid = int(sys.argv[1]), int(sys.argv[2])
perf = PerfCollector({TASK_CLOCK: "task-clock"})
got = perf.sample([ThreadRef(("vm", 0), pid, tid)])[tid]
print(json.dumps({"values": got.values, "missing": dict(got.missing)}))
"""


def _perf_on(caps: tuple[str, ...], pid: int, tid: int) -> dict[str, dict[str, object]]:
    p = _bounded(caps, "-c", PERF_PROBE, str(pid), str(tid))
    assert p.returncode == 0, p.stderr
    doc: dict[str, dict[str, object]] = json.loads(p.stdout)
    return doc


def test_the_units_two_capabilities_pin_and_count_another_users_qemu(
    tenant_qemu: tuple[str, int], tmp_path: Path
) -> None:
    name, pid = tenant_qemu
    tids = _vcpu_tids(pid)
    before = [cpus_allowed(pid, t) for t in tids]
    doc = _apply(tmp_path, UNIT_CAPS)
    applied = [m for m in doc["applied"] if m["vm"] == name]  # type: ignore[attr-defined]
    assert {m["vcpu"] for m in applied} == {0, 1}
    after = [cpus_allowed(pid, t) for t in tids]
    assert after != before and all(len(a) == 1 for a in after)  # the kernel took the pins
    perf = _perf_on(UNIT_CAPS, pid, tids[0])
    assert "task_clock_s" in perf["values"] and perf["missing"] == {}


def test_without_cap_sys_nice_the_pin_is_refused_for_that_vm_alone(
    tenant_qemu: tuple[str, int], tmp_path: Path
) -> None:
    name, pid = tenant_qemu
    tids = _vcpu_tids(pid)
    before = [cpus_allowed(pid, t) for t in tids]
    doc = _apply(tmp_path, ("perfmon",), rc=1)
    failed = [m for m in doc["failed"] if m["vm"] == name]  # type: ignore[attr-defined]
    assert failed and all("EPERM" in m["why"] or "not permitted" in m["why"] for m in failed), failed
    assert [cpus_allowed(pid, t) for t in tids] == before


def test_without_cap_perfmon_perf_events_on_another_user_are_refused(tenant_qemu: tuple[str, int]) -> None:
    require(_paranoid() >= 2, "perf_event_paranoid < 2: any user may count other tasks")
    _, pid = tenant_qemu
    perf = _perf_on(("sys_nice",), pid, _vcpu_tids(pid)[0])
    assert perf["values"] == {}
    (why,) = perf["missing"].values()
    assert "EACCES" in str(why) or "EPERM" in str(why), why
