"""Fault injection against a running daemon with real guests: the loop outlives every fault.

One ``adaptive-pin run --driver auto`` over libvirt domains and a plain QEMU, then, while it
ticks: a domain destroyed, the plain QEMU killed, libvirtd itself restarted. After each fault
the daemon must keep ticking (its own Prometheus counter says so) and keep managing what is
left; at SIGTERM it must exit 0 and put the surviving guest's vCPUs back where it found them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from adaptive_pin.model import CpuSet
from tests.conftest import require
from tests.integration.conftest import URI, DomainSpec, cpus_allowed, free_port, wait_for

pytestmark = pytest.mark.integration


class Daemon:
    def __init__(self, tmp: Path, port: int) -> None:
        self.port = port
        self.log = tmp / "daemon.log"
        argv = [
            sys.executable, "-m", "adaptive_pin", "-v", "run", "--driver", "auto", "--policy", "pack",
            "--interval", "0.5", "--metrics-address", f"127.0.0.1:{port}", "--log-format", "plain",
            "--state-file", str(tmp / "state.json"), "--lock-file", str(tmp / "lock"),
            "--config", str(tmp / "empty.toml"),
        ]  # fmt: skip
        (tmp / "empty.toml").write_text("")
        self._err = self.log.open("w")
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._err
        )

    def metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return {}
        out: dict[str, list[tuple[dict[str, str], float]]] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out.setdefault(s.name, []).append((s.labels, s.value))
        return out

    def ticks(self) -> float:
        return sum(v for _, v in self.metrics().get("adaptive_pin_ticks_total", []))

    def domains_seen(self) -> set[str]:
        return {
            labels["domain"] for labels, _ in self.metrics().get("adaptive_pin_vcpu_cpu_seconds_total", [])
        }

    def ticks_on(self, more: int, what: str) -> None:
        """The loop is alive: ``more`` ticks beyond now, and the process never died."""
        start = self.ticks()
        wait_for(
            lambda: self.proc.poll() is None and self.ticks() >= start + more, 60, f"{more} ticks {what}"
        )

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=60)
        self._err.close()
        return rc


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[[], Daemon]]:
    started: list[Daemon] = []

    def start() -> Daemon:
        started.append(Daemon(tmp_path, free_port()))
        return started[-1]

    yield start
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(timeout=10)


def _restart_libvirtd() -> None:
    require(
        subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True, check=False).returncode == 0,
        "no libvirtd",
    )
    subprocess.run(["pkill", "-x", "libvirtd"], check=False)
    wait_for(
        lambda: subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True, check=False).returncode != 0,
        30,
        "libvirtd to exit",
    )
    subprocess.run(["libvirtd", "-d"], check=True)
    wait_for(
        lambda: (
            subprocess.run(["virsh", "-c", URI, "list"], capture_output=True, check=False).returncode == 0
        ),
        60,
        "libvirtd to answer again",
        step=0.5,
    )


def _allowed(dom: Any) -> dict[int, CpuSet]:
    pid = int(Path(f"/run/libvirt/qemu/{dom.name()}.pid").read_text())
    out: dict[int, CpuSet] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        if comm.startswith("CPU ") and comm.endswith(("/TCG", "/KVM")):
            out[int(comm.split()[1].split("/")[0])] = cpus_allowed(pid, int(tid))
    return out


def test_the_daemon_outlives_a_destroyed_vm_a_killed_qemu_and_a_libvirtd_restart(
    start_daemon: Callable[[], Daemon], make_domains: Any, make_qemu: Any, libvirt_conn: Any
) -> None:
    doomed, survivor = make_domains(DomainSpec(vcpus=2), DomainSpec(vcpus=2))
    plain = make_qemu(vcpus=2)
    original = _allowed(survivor)  # before the daemon has seen it
    daemon = start_daemon()
    wait_for(
        lambda: {doomed.name(), survivor.name(), plain.name} <= daemon.domains_seen(), 60, "all three guests"
    )
    daemon.ticks_on(2, "with three guests")
    assert sum(v for _, v in daemon.metrics()["adaptive_pin_migrations_total"]) > 0  # it manages them

    doomed.destroy()  # a VM gone between inventories, maybe between inventory and pin
    daemon.ticks_on(3, "after a domain was destroyed")
    wait_for(lambda: doomed.name() not in daemon.domains_seen(), 30, "the destroyed domain to leave")

    plain.proc.kill()  # a plain QEMU crashing
    plain.proc.wait(timeout=10)
    daemon.ticks_on(3, "after the plain QEMU was killed")
    wait_for(lambda: plain.name not in daemon.domains_seen(), 30, "the killed QEMU to leave")

    _restart_libvirtd()
    daemon.ticks_on(4, "after libvirtd was restarted")
    # still managed through a new connection, once the reconnect backoff (0.5 s doubling to a
    # 30 s cap) comes round: a libvirtd slow to restart on a loaded host costs several attempts
    wait_for(
        lambda: survivor.name() in daemon.domains_seen(), 45, "the survivor managed through a new connection"
    )

    assert daemon.stop() == 0
    log = daemon.log.read_text()
    assert "Traceback" not in log, log[-3000:]
    survivor_now = libvirt_conn.lookupByName(survivor.name())
    assert _allowed(survivor_now) == original  # restored on exit, through libvirt's new daemon
