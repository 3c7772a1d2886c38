"""The plain-QEMU driver against real QEMU processes (TCG, paused, no disk)."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import psutil
import pytest

from adaptive_pin.drivers._numa import numa_maps_bytes
from adaptive_pin.drivers.qemu import QemuDriver
from adaptive_pin.drivers.qmp import vcpu_thread_ids
from adaptive_pin.errors import GuestGoneError, PinError
from adaptive_pin.model import CpuSet, EventKind, Guest, GuestEvent, PinSource
from adaptive_pin.pinnability import Hints, Mode, PinnabilityRules, resolve
from tests.integration.conftest import QemuGuest, cpus_allowed, host_numa_nodes

pytestmark = pytest.mark.integration

EVENT_BOUND_S = 1.0


@pytest.fixture
def driver() -> Any:
    d = QemuDriver()
    yield d
    d.close()


def _guest(inv: Any, q: QemuGuest) -> Guest:
    for g in inv.guests:
        if g.id == q.uuid:
            return g
    raise AssertionError(f"{q.name} not in inventory: {[g.name for g in inv.guests]}; errors {inv.errors}")


def _wait_event(driver: Any, kind: EventKind, guest_id: str, timeout: float = 5.0) -> GuestEvent:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ev in driver.events(0.2):
            if ev.kind is kind and ev.guest_id == guest_id:
                return ev
    raise AssertionError(f"no {kind} event for {guest_id} within {timeout}s")


def test_inventory_by_thread_names_matches_qmp(driver: Any, make_qemu: Any) -> None:
    guests = [make_qemu(vcpus=2), make_qemu(vcpus=3)]
    inv = driver.inventory()
    for q in guests:
        g = _guest(inv, q)
        assert (g.name, g.pid, g.problem) == (q.name, q.pid, None)
        assert {v.index: v.tid for v in g.vcpus} == vcpu_thread_ids(q.qmp)
        assert len(g.vcpus) == q.vcpus
        for v in g.vcpus:
            assert v.affinity == cpus_allowed(q.pid, v.tid)
        assert (g.pinnability.managed, g.pinnability.source) == (True, PinSource.DEFAULT)


def test_without_debug_threads_no_vcpu_is_guessed_unless_qmp_is_given(make_qemu: Any) -> None:
    q = make_qemu(vcpus=2, debug_threads=False)
    plain = QemuDriver()
    try:
        g = _guest(plain.inventory(), q)
        assert g.vcpus == ()
        assert g.problem is not None and "cannot be told apart" in g.problem
    finally:
        plain.close()
    with_qmp = QemuDriver(qmp_sockets={q.name: q.qmp})
    try:
        g = _guest(with_qmp.inventory(), q)
        assert g.problem is None
        assert {v.index: v.tid for v in g.vcpus} == vcpu_thread_ids(q.qmp)
    finally:
        with_qmp.close()


def test_pin_with_sched_setaffinity_shows_in_proc(driver: Any, make_qemu: Any) -> None:
    q = make_qemu(vcpus=2)
    g = _guest(driver.inventory(), q)
    for target in (CpuSet.of(1), CpuSet.of(0), CpuSet.of(0, 1)):
        driver.pin(g, 1, target)
        assert cpus_allowed(q.pid, g.vcpu(1).tid) == target
    assert cpus_allowed(q.pid, g.vcpu(0).tid) == g.vcpu(0).affinity


def test_opted_out_by_config_is_never_pinned(make_qemu: Any) -> None:
    q = make_qemu(vcpus=2)
    d = QemuDriver(rules=PinnabilityRules(overrides={q.name: Hints(Mode.OFF)}))
    try:
        g = _guest(d.inventory(), q)
        assert (g.pinnability.managed, g.pinnability.source) == (False, PinSource.CONFIG)
        with pytest.raises(PinError, match="not managed"):
            d.pin(g, 0, CpuSet.of(1))
        # A caller holding a stale "managed" view is refused too: the driver checks the rules again.
        stale = replace(g, pinnability=resolve(name=g.name, uuid=g.id, rules=PinnabilityRules()))
        assert stale.pinnability.managed
        with pytest.raises(PinError, match="not managed"):
            d.pin(stale, 0, CpuSet.of(1))
        assert cpus_allowed(q.pid, g.vcpu(0).tid) == g.vcpu(0).affinity
    finally:
        d.close()


def test_start_and_exit_events_within_a_second(driver: Any, make_qemu: Any) -> None:
    driver.events(0)
    t0 = time.monotonic()
    q = make_qemu(vcpus=1)
    ev = _wait_event(driver, EventKind.STARTED, q.uuid)
    assert ev.name == q.name
    t1 = time.monotonic()
    q.proc.kill()
    q.proc.wait()
    exited = time.monotonic()
    ev2 = _wait_event(driver, EventKind.STOPPED, q.uuid)
    print(
        f"\nqemu events: started seen {ev.time - t0:.3f}s after spawn, "
        f"stopped seen {ev2.time - exited:+.3f}s after exit (bound {EVENT_BOUND_S}s)"
    )
    assert t0 <= ev.time <= t0 + EVENT_BOUND_S
    assert t1 <= ev2.time <= exited + EVENT_BOUND_S


def test_process_killed_mid_inventory_or_before_pin_is_per_vm(
    driver: Any, make_qemu: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    keep, victim, victim2 = make_qemu(vcpus=2), make_qemu(vcpus=2), make_qemu(vcpus=2)
    original = driver._guest

    def kill_first(proc: Any, argv: Any, cmd: Any) -> Guest:
        if proc.pid == victim.pid:
            victim.proc.kill()
            victim.proc.wait()
        return original(proc, argv, cmd)

    monkeypatch.setattr(driver, "_guest", kill_first)
    inv = driver.inventory()
    assert "vanished" in inv.errors[victim.uuid]
    assert _guest(inv, keep).problem is None
    assert victim.uuid not in {g.id for g in inv.guests}

    g2 = _guest(inv, victim2)
    victim2.proc.kill()
    victim2.proc.wait()
    with pytest.raises(GuestGoneError):
        driver.pin(g2, 0, CpuSet.of(1))
    g = _guest(inv, keep)
    driver.pin(g, 0, CpuSet.of(1))
    assert cpus_allowed(keep.pid, g.vcpu(0).tid) == CpuSet.of(1)


def test_memory_nodes_come_from_numa_maps(driver: Any, make_qemu: Any) -> None:
    q = make_qemu(vcpus=1)
    g = _guest(driver.inventory(), q)
    host = host_numa_nodes()
    assert g.memory_nodes is not None and g.memory_nodes <= host
    if host == CpuSet.of(0):
        assert g.memory_nodes == CpuSet.of(0)


def test_exited_but_unreaped_qemu_is_stopped_within_a_second(driver: Any, make_qemu: Any) -> None:
    """A zombie (its parent has not called wait() yet) is gone: the STOPPED event must not wait."""
    driver.events(0)
    q = make_qemu(vcpus=1)
    _wait_event(driver, EventKind.STARTED, q.uuid)
    g = _guest(driver.inventory(), q)
    q.proc.kill()
    killed = time.monotonic()
    ev = _wait_event(driver, EventKind.STOPPED, q.uuid, timeout=3.0)
    # Still not reaped when the event came: this test is about zombies, not about exits.
    assert psutil.Process(q.pid).status() == psutil.STATUS_ZOMBIE
    assert q.proc.returncode is None
    print(f"\nqemu zombie: stopped seen {ev.time - killed:+.3f}s after SIGKILL (bound {EVENT_BOUND_S}s)")
    assert killed <= ev.time <= killed + EVENT_BOUND_S
    with pytest.raises(GuestGoneError):
        driver.pin(g, 0, CpuSet.of(0))
    assert q.uuid not in {x.id for x in driver.inventory().guests}
    q.proc.wait(timeout=10)


def test_migrate_memory_moves_a_real_qemus_pages_and_refuses_a_missing_node(
    driver: Any, make_qemu: Any
) -> None:
    q = make_qemu(vcpus=1)
    g = _guest(driver.inventory(), q)
    host = host_numa_nodes()
    assert g.memory_nodes is not None and not g.memory_bound  # plain QEMU: first touch
    first = CpuSet.of(min(host))
    driver.migrate_memory(g, host, first)  # a real migrate_pages(2) on the QEMU process
    with open(f"/proc/{q.pid}/numa_maps") as f:
        assert set(numa_maps_bytes(f.read())) == {min(host)}
    assert _guest(driver.inventory(), q).memory_nodes == first  # read afresh, not from the cache
    missing = CpuSet.of(max(host) + 1)
    with pytest.raises(PinError, match="EINVAL"):
        driver.migrate_memory(g, host, missing)


def test_migrate_memory_of_an_exited_qemu_is_guest_gone(driver: Any, make_qemu: Any) -> None:
    q = make_qemu(vcpus=1)
    g = _guest(driver.inventory(), q)
    q.proc.kill()
    q.proc.wait()
    with pytest.raises(GuestGoneError):
        driver.migrate_memory(g, CpuSet.of(0), CpuSet.of(0))
