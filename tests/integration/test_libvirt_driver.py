"""The libvirt driver against real libvirtd and real TCG domains."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

import pytest

from adaptive_pin.drivers import open_driver
from adaptive_pin.drivers._numa import numa_maps_bytes
from adaptive_pin.drivers.auto import CompositeDriver
from adaptive_pin.drivers.libvirt import LibvirtDriver
from adaptive_pin.errors import DriverError, GuestGoneError, PinError
from adaptive_pin.model import CpuSet, EventKind, Guest, GuestEvent, PinSource
from adaptive_pin.pinnability import NAMESPACE, PREFIX, Hints, Mode, metadata_xml
from tests.conftest import require
from tests.integration.conftest import URI, DomainSpec, _libvirt, cpus_allowed, host_numa_nodes, wait_for

pytestmark = pytest.mark.integration

OFF = metadata_xml(Hints(Mode.OFF))
EVENT_BOUND_S = 1.0


@pytest.fixture
def driver(libvirt_conn: Any) -> Any:
    d = LibvirtDriver(URI)
    yield d
    d.close()


def _guest(inv: Any, name: str) -> Guest:
    for g in inv.guests:
        if g.name == name:
            return g
    raise AssertionError(f"{name} not in inventory: {[g.name for g in inv.guests]}; errors {inv.errors}")


def _qmp_threads(dom: Any) -> dict[int, int]:
    """Test-only cross-check through the monitor (the driver itself never does this)."""
    import libvirt_qemu

    reply = json.loads(libvirt_qemu.qemuMonitorCommand(dom, '{"execute":"query-cpus-fast"}', 0))
    return {c["cpu-index"]: c["thread-id"] for c in reply["return"]}


def _wait_event(driver: Any, kind: EventKind, guest_id: str, timeout: float = 5.0) -> GuestEvent:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ev in driver.events(0.2):
            if ev.kind is kind and ev.guest_id == guest_id:
                return ev
    raise AssertionError(f"no {kind} event for {guest_id} within {timeout}s")


def test_inventory_finds_vcpu_threads_matching_qemu(driver: Any, make_domains: Any) -> None:
    doms = make_domains(DomainSpec(vcpus=2), DomainSpec(vcpus=3), DomainSpec(vcpus=4, metadata=OFF))
    inv = driver.inventory()
    for dom in doms:
        g = _guest(inv, dom.name())
        assert g.id == dom.UUIDString()
        assert g.problem is None
        assert [v.index for v in g.vcpus] == list(range(dom.maxVcpus()))
        assert {v.index: v.tid for v in g.vcpus} == _qmp_threads(dom)
        for v in g.vcpus:
            assert v.tid is not None and g.pid is not None
            assert v.affinity == cpus_allowed(g.pid, v.tid)
            assert v.last_cpu is not None
    assert _guest(inv, doms[0].name()).pinnability.managed
    assert _guest(inv, doms[0].name()).pinnability.source is PinSource.DEFAULT
    off = _guest(inv, doms[2].name()).pinnability
    assert (off.managed, off.source) == (False, PinSource.METADATA)


def test_pin_shows_in_proc_and_in_libvirt(driver: Any, make_domains: Any, libvirt_conn: Any) -> None:
    (dom,) = make_domains(DomainSpec(vcpus=2))
    g = _guest(driver.inventory(), dom.name())
    host_cpus = libvirt_conn.getCPUMap()[0]
    for target in (CpuSet.of(1), CpuSet.of(0)):
        driver.pin(g, 1, target)
        assert cpus_allowed(g.pid, g.vcpu(1).tid) == target
        pin_info = dom.vcpuPinInfo(0)
        assert CpuSet(i for i, on in enumerate(pin_info[1]) if on) == target
        assert len(pin_info[1]) == host_cpus
        # vCPU 0 untouched
        assert cpus_allowed(g.pid, g.vcpu(0).tid) == g.vcpu(0).affinity
    # A live pin by this driver must not make the VM look orchestrator-pinned next time.
    again = _guest(driver.inventory(), dom.name())
    assert not again.orchestrator_pinned and again.pinnability.managed
    assert again.vcpu(1).affinity == CpuSet.of(0)


def test_orchestrator_pinned_is_left_alone_and_its_cpus_reported(driver: Any, make_domains: Any) -> None:
    (dom,) = make_domains(DomainSpec(vcpus=2, vcpupin={0: "1", 1: "1"}))
    g = _guest(driver.inventory(), dom.name())
    assert g.orchestrator_pinned
    assert (g.pinnability.managed, g.pinnability.source) == (False, PinSource.ORCHESTRATOR)
    assert [v.affinity for v in g.vcpus] == [CpuSet.of(1), CpuSet.of(1)]
    with pytest.raises(PinError, match="not managed"):
        driver.pin(g, 0, CpuSet.of(0))
    assert cpus_allowed(g.pid, g.vcpu(0).tid) == CpuSet.of(1)


def test_opted_out_vm_is_never_pinned_even_with_a_stale_guest(driver: Any, make_domains: Any) -> None:
    on, off = make_domains(DomainSpec(vcpus=2), DomainSpec(vcpus=2, metadata=OFF))
    inv = driver.inventory()
    g_off = _guest(inv, off.name())
    with pytest.raises(PinError, match="not managed"):
        driver.pin(g_off, 0, CpuSet.of(1))
    # The VM opts out after the caller's inventory: the driver re-reads and still refuses.
    g_on = _guest(inv, on.name())
    before = cpus_allowed(g_on.pid, g_on.vcpu(0).tid)
    import libvirt

    on.setMetadata(
        libvirt.VIR_DOMAIN_METADATA_ELEMENT, OFF, PREFIX, NAMESPACE, libvirt.VIR_DOMAIN_AFFECT_LIVE
    )
    ev = _wait_event(driver, EventKind.CHANGED, on.UUIDString())
    assert ev.name == on.name()
    with pytest.raises(PinError, match="metadata: mode off"):
        driver.pin(g_on, 0, CpuSet.of(1))
    assert cpus_allowed(g_on.pid, g_on.vcpu(0).tid) == before
    for g in (g_off, g_on):
        for v in g.vcpus:
            assert cpus_allowed(g.pid, v.tid) == v.affinity


def test_start_and_stop_events_within_a_second(driver: Any, make_domains: Any) -> None:
    driver.events(0)  # drain
    t0 = time.monotonic()
    (dom,) = make_domains(DomainSpec(vcpus=2))
    started_returned = time.monotonic()
    ev = _wait_event(driver, EventKind.STARTED, dom.UUIDString())
    start_lag = ev.time - started_returned
    t1 = time.monotonic()
    dom.destroy()
    destroy_returned = time.monotonic()
    ev2 = _wait_event(driver, EventKind.STOPPED, dom.UUIDString())
    stop_lag = ev2.time - destroy_returned
    print(
        f"\nlibvirt events: start call {started_returned - t0:.3f}s, started event lag {start_lag:+.4f}s; "
        f"destroy call {destroy_returned - t1:.3f}s, stopped event lag {stop_lag:+.4f}s "
        f"(bound {EVENT_BOUND_S}s)"
    )
    assert t0 <= ev.time and start_lag <= EVENT_BOUND_S
    assert t1 <= ev2.time and stop_lag <= EVENT_BOUND_S


def test_domain_destroyed_mid_inventory_is_a_per_vm_error(
    driver: Any, make_domains: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    keep, victim = make_domains(DomainSpec(vcpus=2), DomainSpec(vcpus=2))
    original = driver._guest

    def destroy_first(dom: Any, pids: Any) -> Guest:
        if dom.name() == victim.name():
            victim.destroy()
        return original(dom, pids)

    monkeypatch.setattr(driver, "_guest", destroy_first)
    inv = driver.inventory()
    assert victim.name() in inv.errors and "vanished" in inv.errors[victim.name()]
    assert _guest(inv, keep.name()).problem is None
    assert victim.name() not in {g.name for g in inv.guests}


def test_domain_destroyed_before_pin_raises_guest_gone(driver: Any, make_domains: Any) -> None:
    keep, victim = make_domains(DomainSpec(vcpus=2), DomainSpec(vcpus=2))
    inv = driver.inventory()
    victim.destroy()
    with pytest.raises(GuestGoneError):
        driver.pin(_guest(inv, victim.name()), 0, CpuSet.of(1))
    g = _guest(inv, keep.name())
    driver.pin(g, 0, CpuSet.of(1))
    assert cpus_allowed(g.pid, g.vcpu(0).tid) == CpuSet.of(1)


def _admin_clients(server: str) -> set[str]:
    out = subprocess.run(
        ["virt-admin", "srv-clients-list", server], capture_output=True, text=True, check=True
    ).stdout
    return {line.split()[0] for line in out.splitlines()[2:] if line.strip()}


def test_reconnects_after_libvirtd_drops_the_connection(driver: Any, make_domains: Any) -> None:
    """Drop exactly this driver's connection (virt-admin), leaving libvirtd and its other clients."""
    from tests.conftest import require

    require(shutil.which("virt-admin") is not None, "virt-admin (libvirt-clients) is not installed")
    driver.close()
    before = _admin_clients("libvirtd")
    d = LibvirtDriver(URI)
    try:
        ours = _admin_clients("libvirtd") - before
        assert len(ours) == 1, f"cannot tell the driver's connection apart: {ours}"
        d.inventory()
        subprocess.run(
            ["virt-admin", "client-disconnect", "libvirtd", ours.pop()], check=True, capture_output=True
        )
        wait_for(lambda: not d.connected, 10, "the close callback")
        # First call after the loss reconnects at once (libvirtd is up), events flow again.
        d.inventory()
        assert d.connected
        (dom,) = make_domains(DomainSpec(vcpus=2))
        assert _wait_event(d, EventKind.STARTED, dom.UUIDString()).name == dom.name()
    finally:
        d.close()


def test_unreachable_libvirt_raises_driver_error_then_backs_off(tmp_path: Any) -> None:
    require(_libvirt() is not None, "libvirt-python is not installed")  # no daemon needed
    with pytest.raises(DriverError, match="cannot connect to libvirt"):
        LibvirtDriver(f"qemu:///system?socket={tmp_path}/nothing-here")


def test_without_libvirt_python_the_driver_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "libvirt", None)  # import libvirt -> ImportError
    with pytest.raises(DriverError, match=r"needs libvirt-python: pip install 'adaptive-pin\[libvirt\]'"):
        LibvirtDriver("qemu:///system")


def test_memory_nodes_from_numatune_else_from_numa_maps(
    driver: Any, make_domains: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    bound, free = make_domains(
        DomainSpec(vcpus=1, numatune="<memory mode='strict' nodeset='0'/>"), DomainSpec(vcpus=1)
    )
    inv = driver.inventory()
    host = host_numa_nodes()
    assert _guest(inv, bound.name()).memory_nodes == CpuSet.of(0)
    nodes = _guest(inv, free.name()).memory_nodes
    assert nodes is not None and nodes <= host  # where its pages are: /proc/<pid>/numa_maps
    if host == CpuSet.of(0):
        assert nodes == CpuSet.of(0)
    # The declared binding wins and spares the numa_maps read; without one, numa_maps answers.
    asked: list[int] = []

    def spy(pid: int) -> CpuSet | None:
        asked.append(pid)
        return None

    monkeypatch.setattr(driver._numa_maps, "nodes", spy)
    again = driver.inventory()
    assert _guest(again, bound.name()).memory_nodes == CpuSet.of(0)
    assert _guest(again, free.name()).memory_nodes is None
    assert asked == [_guest(again, free.name()).pid]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "adaptive_pin", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def test_auto_sees_libvirt_domains_and_plain_qemu_at_once(
    libvirt_conn: Any, make_domains: Any, make_qemu: Any
) -> None:
    (dom,) = make_domains(DomainSpec(vcpus=2))
    plain = make_qemu(vcpus=2)
    d = open_driver("auto")
    try:
        assert isinstance(d, CompositeDriver)
        inv = d.inventory()
        lv = [g for g in inv.guests if g.id == dom.UUIDString()]
        qm = [g for g in inv.guests if g.id == plain.uuid]
        assert [g.driver for g in lv] == ["libvirt"] and [g.driver for g in qm] == ["qemu"]
        lg, qg = lv[0], qm[0]
        assert lg.pid is not None and [g.id for g in inv.guests if g.pid == lg.pid] == [lg.id]
        assert (qg.pid, qg.problem, len(qg.vcpus)) == (plain.pid, None, 2)
        assert lg.pinnability.managed and qg.pinnability.managed

        # Each pin goes through the driver that listed the guest.
        d.pin(qg, 1, CpuSet.of(1))
        assert cpus_allowed(plain.pid, qg.vcpu(1).tid) == CpuSet.of(1)
        d.pin(lg, 1, CpuSet.of(0))
        assert cpus_allowed(lg.pid, lg.vcpu(1).tid) == CpuSet.of(0)
        assert CpuSet(i for i, on in enumerate(dom.vcpuPinInfo(0)[1]) if on) == CpuSet.of(0)

        # Events from both sides; a new libvirt domain is announced once, by libvirt.
        d.events(0)
        (dom2,) = make_domains(DomainSpec(vcpus=1))
        plain2 = make_qemu(vcpus=1)
        seen: list[GuestEvent] = []
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and not {dom2.UUIDString(), plain2.uuid} <= {
            e.guest_id for e in seen
        }:
            seen.extend(d.events(0.2))
        time.sleep(2 * 0.2 + 0.1)  # let the QEMU watcher poll past dom2's process
        seen.extend(d.events(0))
        started = [e.guest_id for e in seen if e.kind is EventKind.STARTED]
        assert started.count(dom2.UUIDString()) == 1 and started.count(plain2.uuid) == 1
        dom2.destroy()
        destroyed = time.monotonic()
        ev = _wait_event(d, EventKind.STOPPED, dom2.UUIDString())
        assert ev.time - destroyed <= EVENT_BOUND_S
    finally:
        d.close()

    p = _cli("status", "--sample", "0", "--json")  # --driver auto is the default
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["driver"] == "libvirt+qemu"
    by_id = {g["id"]: g for g in doc["guests"]}
    assert by_id[dom.UUIDString()]["driver"] == "libvirt" and by_id[plain.uuid]["driver"] == "qemu"
    assert [g["id"] for g in doc["guests"]].count(dom.UUIDString()) == 1
    for gid in (dom.UUIDString(), plain.uuid):
        assert by_id[gid]["memory_nodes"] is not None
        assert CpuSet.parse(by_id[gid]["memory_nodes"]) <= host_numa_nodes()


def test_migrate_memory_of_a_libvirt_domain_and_never_of_a_numatune_bound_one(
    driver: Any, make_domains: Any
) -> None:
    bound, free = make_domains(
        DomainSpec(vcpus=1, numatune="<memory mode='strict' nodeset='0'/>"), DomainSpec(vcpus=1)
    )
    inv = driver.inventory()
    host = host_numa_nodes()
    gb, gf = _guest(inv, bound.name()), _guest(inv, free.name())
    assert gb.memory_bound and not gf.memory_bound
    with pytest.raises(PinError, match="bound by its own configuration"):
        driver.migrate_memory(gb, CpuSet.of(0), CpuSet.of(0))
    driver.migrate_memory(gf, host, CpuSet.of(min(host)))  # migrate_pages(2) on the domain's QEMU
    with open(f"/proc/{gf.pid}/numa_maps") as f:
        assert set(numa_maps_bytes(f.read())) == {min(host)}
    free.destroy()
    with pytest.raises(GuestGoneError):
        driver.migrate_memory(gf, host, CpuSet.of(min(host)))
