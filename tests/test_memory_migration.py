"""A VM's memory follows its vCPUs to another NUMA node: policies, guard, controller, simulator,
and the real migrate_pages(2) syscall on a real process."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from adaptive_pin.controller import Controller, ControllerSettings
from adaptive_pin.drivers import _migrate, _numa
from adaptive_pin.drivers.base import MemoryMigrator
from adaptive_pin.drivers.sim import SimDriver
from adaptive_pin.errors import GuestGoneError, PinError
from adaptive_pin.guard import Guard, GuardSettings
from adaptive_pin.model import CPU_TIME, CYCLES, CpuSet, MemoryMove, Plan, Snapshot
from adaptive_pin.sim.host import SimHost
from adaptive_pin.sim.scenario import loads_scenario
from adaptive_pin.state import capture, load_state, restore, save_state
from collectors.sim import SimCollector
from policies.cache_aware import CacheAwarePolicy
from policies.numa import NumaPolicy
from tests.policy_helpers import guest, make_topology, rates, real_topology, snapshot

TOPO = make_topology(packages=2, llcs_per_package=1, cores_per_llc=4, threads=1)  # node 0: 0-3, 1: 4-7
NODE0, NODE1 = TOPO.numa_nodes[0].cpus, TOPO.numa_nodes[1].cpus

TWO_NODES = """
name = "memory"
duration = 60
tick = 1.0
seed = 2
[host]
topology = "32intel64-2p8co2t+8ve"
reserved = "0,16"
[[vms]]
name = "loose"
vcpus = 2
workload = "sort"
memory_mib = 3000
[[vms]]
name = "bound"
vcpus = 2
workload = "sort"
memory_nodes = "0"
"""


def _confined_snapshot(**kw: object) -> Snapshot:
    """vm-a: both vCPUs pinned to node 1's CPUs, its memory on node 0; busy and cache-hungry.

    Node 0 is all taken by an orchestrator-pinned VM, so the vCPUs cannot go to the memory: the
    memory has to come to them.
    """
    g = guest("a", [NODE1, NODE1], memory_nodes=CpuSet.of(0), last_cpus=[4, 5])
    g = replace(g, **kw)  # type: ignore[arg-type]
    nova = guest("n", [NODE0] * 4, orchestrator_pinned=True, last_cpus=[0, 1, 2, 3])
    rs = {("a", i): rates(0.9, 2e7, last_cpu=4 + i) for i in range(2)}
    rs |= {("n", i): rates(1.0, 1e6, last_cpu=i) for i in range(4)}
    return snapshot(TOPO, [g, nova], rs)


# --- policies ------------------------------------------------------------------------------


def test_cache_aware_moves_the_memory_of_a_vm_wholly_on_another_node() -> None:
    plan, _ = CacheAwarePolicy().decide(_confined_snapshot(), CacheAwarePolicy().initial_state())
    assert plan.moves == ()  # the vCPUs stay: no room beside the memory
    (mm,) = plan.memory_moves
    assert (mm.guest_id, mm.from_nodes, mm.to_nodes) == ("a", CpuSet.of(0), CpuSet.of(1))
    assert mm.predicted_gain > 0
    assert "node 1" in mm.reason


@pytest.mark.parametrize(
    "change",
    [
        {"memory_bound": True},  # <numatune>, numactl, host-nodes=: the operator's choice
        {"memory_nodes": None},  # unknown: nothing to migrate from
        {"memory_nodes": CpuSet.of(1)},  # already there
        {"orchestrator_pinned": True},
    ],
    ids=["bound", "unknown", "already-there", "orchestrator"],
)
def test_cache_aware_leaves_memory_alone(change: dict[str, object]) -> None:
    plan, _ = CacheAwarePolicy().decide(_confined_snapshot(**change), CacheAwarePolicy().initial_state())
    assert plan.memory_moves == ()


def test_cache_aware_moves_no_memory_for_a_vm_spread_over_nodes_or_when_told_not_to() -> None:
    g = guest("a", [NODE0, NODE1], memory_nodes=CpuSet.of(0), last_cpus=[0, 4])
    rs = {("a", i): rates(0.2, 1e5, last_cpu=4 * i) for i in range(2)}
    # a small, quiet VM: gathering it is not worth a move, so it stays split and keeps its memory
    split = snapshot(TOPO, [g], rs)
    policy = CacheAwarePolicy(min_gain=10.0)
    plan, _ = policy.decide(split, policy.initial_state())
    assert plan.moves == () and plan.memory_moves == ()
    off = CacheAwarePolicy(migrate_memory=False)
    plan, _ = off.decide(_confined_snapshot(), off.initial_state())
    assert plan.memory_moves == ()


def test_memory_that_can_follow_weighs_less_in_the_placement() -> None:
    """A cache-hungry VM whose memory is on a node with a moderately noisy neighbour.

    Remote memory for good costs more than the neighbour's misses (stay); remote memory until
    a copy is done costs less (go to the idle node, and bring the memory).
    """
    busy = guest("b", [NODE0] * 2, memory_nodes=CpuSet.of(0), last_cpus=[0, 1])
    mover = guest("m", [TOPO.online] * 2, memory_nodes=CpuSet.of(0), last_cpus=[3, 3])
    rs = {("b", i): rates(1.0, 1e7, last_cpu=i) for i in range(2)}
    rs |= {("m", i): rates(1.0, 6e7, last_cpu=3) for i in range(2)}
    snap = snapshot(TOPO, [busy, mover], rs)
    where = {}
    for migrate in (True, False):
        p = CacheAwarePolicy(migrate_memory=migrate)
        plan, _ = p.decide(snap, p.initial_state())
        where[migrate] = {m.to_cpus for m in plan.moves if m.guest_id == "m"}
        if migrate:
            assert [mm.to_nodes for mm in plan.memory_moves if mm.guest_id == "m"] == [CpuSet.of(1)]
    assert where[True] == {NODE1}
    assert where[False] == {NODE0}  # memory stuck on node 0: stay beside it, contention and all


def test_no_memory_follows_into_an_llc_that_spans_nodes() -> None:
    """SNC: each L3 covers two NUMA nodes, so a VM in one L3 is not in one node: no migration
    is proposed (there is no one node to send it to) and its remote memory keeps its weight."""
    snc = real_topology("memorysidecaches")
    llc0, llc1 = snc.llc[0].cpus, snc.llc[1].cpus
    assert len({snc.node_of(c) for c in llc0}) == 2
    g = guest("a", [llc0, llc0], memory_nodes=CpuSet.of(1), last_cpus=[0, 2])
    nova = guest("n", [llc1], orchestrator_pinned=True, last_cpus=[1])  # L3 1 is taken
    rs = {("a", i): rates(0.9, 2e7, last_cpu=2 * i) for i in range(2)} | {("n", 0): rates(0.1, last_cpu=1)}
    p = CacheAwarePolicy()
    plan, _ = p.decide(snapshot(snc, [g, nova], rs), p.initial_state())
    assert plan.moves == () and plan.memory_moves == ()


def test_numa_baseline_migrates_like_numad() -> None:
    g = guest("a", [TOPO.online] * 2, memory_nodes=CpuSet.of(0), last_cpus=[5, 6])
    busy = guest("b", [NODE0] * 4, orchestrator_pinned=True, last_cpus=[0, 1, 2, 3])
    rs = {("a", i): rates(0.9, last_cpu=5 + i) for i in range(2)}
    rs |= {("b", i): rates(1.0, last_cpu=i) for i in range(4)}
    snap = snapshot(TOPO, [g, busy], rs)
    plan, _ = NumaPolicy().decide(snap, NumaPolicy().initial_state())
    assert {m.to_cpus for m in plan.moves} == {NODE1}
    assert [(mm.guest_id, mm.to_nodes) for mm in plan.memory_moves] == [("a", CpuSet.of(1))]
    plan, _ = NumaPolicy(migrate_memory=False).decide(snap, NumaPolicy().initial_state())
    assert plan.memory_moves == ()


# --- guard ---------------------------------------------------------------------------------


def test_guard_cooldown_return_window_and_budget_for_memory() -> None:
    g = Guard(GuardSettings(cooldown_s=60, return_window_s=300, memory_budget_per_tick=1))
    there = MemoryMove("a", "vm-a", CpuSet.of(0), CpuSet.of(1), "", 1.0)
    back = MemoryMove("a", "vm-a", CpuSet.of(1), CpuSet.of(0), "", 1.0)
    assert g.memory_refusal(there, 0.0, used=0) is None
    assert "budget" in (g.memory_refusal(there, 0.0, used=1) or "")
    g.record_memory_move(there, 0.0)
    assert "cooldown" in (g.memory_refusal(back, 30.0, used=0) or "")
    assert "back" in (g.memory_refusal(back, 100.0, used=0) or "")
    assert g.memory_refusal(back, 301.0, used=0) is None
    g.forget(set())  # the VM is gone: its history too
    assert g.memory_refusal(back, 30.0, used=0) is None


# --- the simulator's model -----------------------------------------------------------------


def _sim() -> SimHost:
    host = SimHost(loads_scenario(TWO_NODES))
    host.step()  # first touch
    return host


def _pin_vm(host: SimHost, name: str, cpus: CpuSet) -> None:
    vm = host.vms[name]
    for i in range(len(vm.threads)):
        host.pin(vm.id, i, cpus)


def test_sim_copies_memory_at_its_bandwidth_and_stalls_the_vm_meanwhile() -> None:
    host = _sim()
    vm = host.vms["loose"]
    home = vm.home_nodes
    assert home is not None and len(home) == 1
    other = 1 - min(home)
    cpus = host.topology.numa_nodes[other].cpus - CpuSet.of(0, 16)
    _pin_vm(host, "loose", cpus)
    for _ in range(3):
        host.step()
    before = host.vms["loose"].instructions
    host.step()
    remote = host.vms["loose"].instructions - before  # a tick on the far node, memory remote

    host.migrate_memory(vm.id, CpuSet.of(other))
    assert host.guest(vm).memory_nodes == home | CpuSet.of(other)  # both, while it copies
    ticks, during = 0, []
    th = vm.threads[0]
    while vm.migrating_to is not None:
        before, cycles0, cpu0 = vm.instructions, th.counters[CYCLES], th.counters[CPU_TIME]
        host.step()
        during.append(vm.instructions - before)
        # a stalled vCPU still burns its cycles: the cycles counter follows CPU time
        assert th.counters[CYCLES] - cycles0 == pytest.approx((th.counters[CPU_TIME] - cpu0) * host.freq_hz)
        ticks += 1
    # 3000 MiB at 1.5 GB/s: 2.1 s of copying
    assert ticks == 3
    assert host.guest(vm).memory_nodes == CpuSet.of(other)
    host.step()
    before = vm.instructions
    host.step()
    local = vm.instructions - before
    assert local > remote * 1.1  # local memory is faster ...
    assert max(during[:2]) < remote  # ... and the copy itself costs while it runs
    assert host.memory_migrations == 1


def test_sim_refuses_to_migrate_bound_memory_or_to_a_missing_node() -> None:
    host = _sim()
    with pytest.raises(PinError, match="bound by its own configuration"):
        host.migrate_memory(host.vms["bound"].id, CpuSet.of(1))
    with pytest.raises(PinError, match="Invalid argument"):
        host.migrate_memory(host.vms["loose"].id, CpuSet.of(7))
    with pytest.raises(GuestGoneError):
        host.migrate_memory("no-such-guest", CpuSet.of(1))
    assert host.guest(host.vms["bound"]).memory_bound
    assert not host.guest(host.vms["loose"]).memory_bound


# --- the controller ------------------------------------------------------------------------


class _MemoryOnly:
    """Proposes the memory move of the scenario's ``loose`` VM to ``node``, and nothing else."""

    name = "memory-only"
    description = "test"

    def __init__(self, node: int) -> None:
        self.node = node

    def initial_state(self) -> object:
        return None

    def decide(self, snapshot: Snapshot, state: object) -> tuple[Plan, object]:
        g = next(g for g in snapshot.guests if g.name == "loose")
        mm = MemoryMove(g.id, g.name, g.memory_nodes or CpuSet(), CpuSet.of(self.node), "test", 1.0)
        return Plan(self.name, memory_moves=(mm,)), state


def _controller(
    host: SimHost, node: int, clock: Callable[[], float] | None = None, **settings: object
) -> Controller:
    return Controller(
        driver=SimDriver(host=host, realtime=False),
        collectors=[SimCollector(host)],
        policy=_MemoryOnly(node),
        topology=host.topology,
        settings=ControllerSettings(**settings),  # type: ignore[arg-type]
        clock=clock or (lambda: host.now),
    )


def test_controller_migrates_only_a_vm_whose_vcpus_all_run_on_the_target_node() -> None:
    host = _sim()
    vm = host.vms["loose"]
    other = 1 - min(vm.home_nodes or CpuSet.of(0))
    ctl = _controller(host, other)
    report = ctl.tick()
    assert report.memory_applied == ()
    ((_, why),) = report.memory_refused
    assert why == f"its vCPUs do not all run on node(s) {other}"
    _pin_vm(host, "loose", host.topology.numa_nodes[other].cpus - CpuSet.of(0, 16))
    host.step()
    report = ctl.tick()
    assert [m.to_nodes for m in report.memory_applied] == [CpuSet.of(other)]
    assert vm.migrating_to == CpuSet.of(other)
    host.step()
    report = ctl.tick()  # proposed again at once: the cooldown holds it
    assert "cooldown" in report.memory_refused[0][1]
    assert host.memory_migrations == 1


def test_a_restarted_controller_remembers_the_memory_migration(tmp_path: Path) -> None:
    """The daemon restarts right after a memory migration: the state file carries the guard's
    memory history, so the fresh controller neither migrates again within the cooldown nor
    sends the memory back to the node it left within the return window."""
    host = _sim()
    vm = host.vms["loose"]
    home = min(vm.home_nodes or CpuSet.of(0))
    other = 1 - home
    _pin_vm(host, "loose", host.topology.numa_nodes[other].cpus - CpuSet.of(0, 16))
    host.step()
    ctl = _controller(host, other)
    assert [m.to_nodes for m in ctl.tick().memory_applied] == [CpuSet.of(other)]
    path = tmp_path / "state.json"
    save_state(path, capture(ctl, {}, host="host"))
    saved = load_state(path, "host")
    assert saved is not None

    elapsed = [0.0]  # seconds since the restart, as the fresh controller's clock counts them
    fresh = _controller(host, other, clock=lambda: host.now + elapsed[0])
    assert restore(fresh, saved) == []
    host.step()
    assert "cooldown" in fresh.tick().memory_refused[0][1]
    # The copy done, the vCPUs go home; after the cooldown the memory may not follow them yet.
    while vm.migrating_to is not None:
        host.step()
    _pin_vm(host, "loose", host.topology.numa_nodes[home].cpus - CpuSet.of(0, 16))
    host.step()
    fresh.policy = _MemoryOnly(home)
    elapsed[0] = 100.0
    assert f"back to node(s) {home} " in fresh.tick().memory_refused[0][1]
    assert host.memory_migrations == 1
    elapsed[0] = 400.0
    assert [m.to_nodes for m in fresh.tick().memory_applied] == [CpuSet.of(home)]
    assert host.memory_migrations == 2


def test_dry_run_and_a_zero_budget_migrate_nothing() -> None:
    for settings in ({"dry_run": True}, {"guard": GuardSettings(memory_budget_per_tick=0)}):
        host = _sim()
        vm = host.vms["loose"]
        other = 1 - min(vm.home_nodes or CpuSet.of(0))
        _pin_vm(host, "loose", host.topology.numa_nodes[other].cpus - CpuSet.of(0, 16))
        host.step()
        report = _controller(host, other, **settings).tick()
        assert host.memory_migrations == 0 and vm.migrating_to is None
        if settings.get("dry_run"):
            assert len(report.memory_applied) == 1 and report.dry_run  # reported as advice
        else:
            assert "budget" in report.memory_refused[0][1]


def test_a_driver_that_cannot_migrate_is_told_so_not_crashed() -> None:
    class _PinOnly:
        name = "pin-only"

        def __init__(self, inner: SimDriver) -> None:
            self.inner = inner

        def inventory(self):  # type: ignore[no-untyped-def]
            return self.inner.inventory()

        def pin(self, guest, vcpu, cpus):  # type: ignore[no-untyped-def]
            self.inner.pin(guest, vcpu, cpus)

        def events(self, timeout):  # type: ignore[no-untyped-def]
            return self.inner.events(timeout)

        def close(self) -> None:
            self.inner.close()

    host = _sim()
    vm = host.vms["loose"]
    other = 1 - min(vm.home_nodes or CpuSet.of(0))
    _pin_vm(host, "loose", host.topology.numa_nodes[other].cpus - CpuSet.of(0, 16))
    driver = _PinOnly(SimDriver(host=host, realtime=False))
    assert not isinstance(driver, MemoryMigrator)
    ctl = Controller(driver, [SimCollector(host)], _MemoryOnly(other), host.topology, clock=lambda: host.now)
    report = ctl.tick()
    assert report.memory_refused[0][1] == "driver pin-only cannot migrate memory"
    assert not report.errors


# --- the real syscall ----------------------------------------------------------------------


@pytest.fixture
def child() -> object:
    """A real process with some resident memory, ours to migrate."""
    p = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; b = bytearray(32 << 20); sys.stdout.write('ok\\n');"
         " sys.stdout.flush(); time.sleep(60)"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert p.stdout is not None and p.stdout.readline() == b"ok\n"
    yield p
    p.kill()
    p.wait()


def _online_nodes() -> CpuSet:
    with open("/sys/devices/system/node/online") as f:
        return CpuSet.parse(f.read().strip())


def test_migrate_pages_runs_on_a_real_process(child: subprocess.Popen[bytes]) -> None:
    nodes = _online_nodes()
    left = _migrate.migrate_pages(child.pid, nodes, CpuSet.of(min(nodes)))
    assert left == 0  # every page is now on the first node (a no-op on a one-node host)
    text = Path(f"/proc/{child.pid}/numa_maps").read_text()
    assert set(_numa.numa_maps_bytes(text)) == {min(nodes)}


def test_migrate_pages_errors_are_one_line_and_typed(child: subprocess.Popen[bytes]) -> None:
    offline = max(_online_nodes()) + 1
    with pytest.raises(PinError, match=rf"vm-x: migrate memory 0 -> {offline}: EINVAL \(Invalid argument\)"):
        _migrate.migrate_pages(child.pid, CpuSet.of(0), CpuSet.of(offline), name="vm-x")
    child.kill()
    child.wait()
    with pytest.raises(GuestGoneError, match="is gone"):
        _migrate.migrate_pages(child.pid, CpuSet.of(0), CpuSet.of(0))


def test_guest_memory_is_never_migrated_when_bound_or_unmanaged(child: subprocess.Popen[bytes]) -> None:
    g = replace(guest("a", [CpuSet.of(0)], memory_nodes=CpuSet.of(0)), pid=child.pid)
    cache = _numa.NumaMapsCache()
    with pytest.raises(PinError, match="bound by its own configuration"):
        _migrate.migrate_guest_memory(replace(g, memory_bound=True), CpuSet.of(0), CpuSet.of(0), cache)
    unmanaged = replace(g, pinnability=replace(g.pinnability, managed=False, reason="opted out"))
    with pytest.raises(PinError, match="not managed"):
        _migrate.migrate_guest_memory(unmanaged, CpuSet.of(0), CpuSet.of(0), cache)
    _migrate.migrate_guest_memory(g, CpuSet.of(0), CpuSet.of(0), cache)  # allowed: runs


# --- numa_maps: who chose where the memory is ----------------------------------------------


def test_numa_maps_tells_a_bound_process_from_a_first_touch_one() -> None:
    first_touch = (
        "7f0000000000 default anon=262144 dirty=262144 N0=200000 N1=62144 kernelpagesize_kB=4\n"
        "55d000000000 default file=/usr/bin/qemu-system-x86_64 mapped=900 N0=900 kernelpagesize_kB=4\n"
    )
    bound = (
        "7f0000000000 bind:1 anon=262144 dirty=262144 N1=262144 kernelpagesize_kB=4\n"
        "55d000000000 default file=/usr/bin/qemu-system-x86_64 mapped=900 N0=900 kernelpagesize_kB=4\n"
    )
    assert not _numa.numa_maps_bound(first_touch)
    assert _numa.numa_maps_bound(bound)
    assert _numa.numa_maps_nodes(bound) == CpuSet.of(1)
    assert not _numa.numa_maps_bound("")


def test_our_own_memory_is_first_touch() -> None:
    text = Path(f"/proc/{os.getpid()}/numa_maps").read_text()
    assert not _numa.numa_maps_bound(text)
    assert np.isfinite(sum(_numa.numa_maps_bytes(text).values()))
