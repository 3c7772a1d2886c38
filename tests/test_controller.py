"""The control loop end to end on the simulated host: the real controller, sim driver and collector."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from adaptive_pin.controller import Controller, ControllerSettings
from adaptive_pin.drivers.sim import SimDriver
from adaptive_pin.errors import GuestGoneError
from adaptive_pin.guard import GuardSettings
from adaptive_pin.model import CpuSet, Guest, Move, Plan, Snapshot, TickReport, VCpuKey
from adaptive_pin.sim.host import SimHost
from adaptive_pin.sim.scenario import load_scenario
from collectors.sim import SimCollector
from policies.registry import get_policy

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "scenarios" / "demo.toml"

OPT_OUT = """
name = "opt-out"
duration = 60
tick = 1.0
seed = 3
[host]
topology = "32intel64-2p8co2t+8ve"
reserved = "0,16"
[[vms]]
name = "hungry"
count = 3
vcpus = 2
workload = "sort"
[[vms]]
name = "hands-off"
vcpus = 2
workload = "sort"
pinning = "off"
[[vms]]
name = "nova"
vcpus = 2
workload = "gcc-O2"
pinned_cpus = "8-9"
"""


def _controller(
    scenario: Path | str,
    policy: str = "cache-aware",
    settings: ControllerSettings | None = None,
    driver_wrapper: type | None = None,
) -> tuple[Controller, SimHost]:
    host = SimHost(load_scenario(scenario))
    driver = SimDriver(host=host, realtime=False)
    ctl = Controller(
        driver=driver_wrapper(driver) if driver_wrapper else driver,
        collectors=[SimCollector(host)],
        policy=get_policy(policy),
        topology=host.topology,
        settings=settings or ControllerSettings(interval_s=5.0),
        clock=lambda: host.now,
    )
    return ctl, host


def _drive(ctl: Controller, host: SimHost, seconds: int, every: int = 5) -> list[TickReport]:
    reports = []
    for k in range(1, seconds + 1):
        host.step()
        if k % every == 0:
            reports.append(ctl.tick())
    return reports


def _affinities(ctl: Controller) -> dict[VCpuKey, CpuSet]:
    return {(g.id, v.index): v.affinity for g in ctl.driver.inventory().guests for v in g.vcpus}


def test_moves_land_where_asked_and_never_on_reserved_cpus() -> None:
    ctl, host = _controller(DEMO)
    reports = _drive(ctl, host, 60)
    applied = [m for r in reports for m in r.applied]
    assert applied, "the cache-aware policy should place the demo's vCPUs"
    reserved = host.topology.reserved
    assert reserved == CpuSet.parse("0,16")
    for m in applied:
        assert m.to_cpus.isdisjoint(reserved)
    final: dict[VCpuKey, CpuSet] = {}
    for m in applied:
        final[m.key] = m.to_cpus
    now = _affinities(ctl)
    for key, cpus in final.items():
        assert now[key] == cpus  # the last move of each vCPU is where it is now


def test_settles_then_holds_still_on_a_stationary_workload() -> None:
    ctl, host = _controller(DEMO)
    reports = _drive(ctl, host, 120)
    late = [m for r in reports[len(reports) // 2 :] for m in r.applied]
    assert reports[0].tick == 1
    assert late == [], f"moves after settling: {late}"


def test_dry_run_pins_nothing_but_reports_what_it_would_do() -> None:
    ctl, host = _controller(DEMO, settings=ControllerSettings(interval_s=5.0, dry_run=True))
    host.step()
    before = _affinities(ctl)
    reports = _drive(ctl, host, 30)
    assert any(r.applied for r in reports) and all(r.dry_run for r in reports)
    assert _affinities(ctl) == before


def test_opted_out_and_orchestrator_pinned_vms_are_never_touched(tmp_path: Path) -> None:
    sc = tmp_path / "s.toml"
    sc.write_text(OPT_OUT)
    ctl, host = _controller(sc)
    host.step()
    guests = {g.name: g for g in ctl.driver.inventory().guests}
    hands_off = guests["hands-off"]
    nova = guests["nova"]
    assert not hands_off.pinnability.managed and nova.orchestrator_pinned
    before = _affinities(ctl)
    reports = _drive(ctl, host, 60)
    applied = [m for r in reports for m in r.applied]
    assert applied
    assert {m.guest_id for m in applied}.isdisjoint({hands_off.id, nova.id})
    after = _affinities(ctl)
    for g in (hands_off, nova):
        for v in g.vcpus:
            assert after[(g.id, v.index)] == before[(g.id, v.index)]
    # Nova's CPUs count as taken: nobody else is moved onto them.
    assert all(m.to_cpus.isdisjoint(CpuSet.parse("8-9")) for m in applied)
    assert reports[-1].snapshot.taken == CpuSet.parse("8-9")


class _Crashing:
    name = "crashing"
    description = "raises on every decision"

    def initial_state(self) -> object:
        return None

    def decide(self, snapshot: Snapshot, state: object) -> tuple[Plan, object]:
        raise RuntimeError("boom")


def test_a_crashing_policy_costs_a_tick_not_the_loop() -> None:
    ctl, host = _controller(DEMO)
    ctl.policy = _Crashing()
    reports = _drive(ctl, host, 15)
    assert [r.errors.get("policy") for r in reports] == [1, 1, 1]
    assert all(r.snapshot.guests for r in reports)  # inventory and sampling went on


class _VanishingDriver:
    """The sim driver, but one VM disappears between inventory and pin."""

    def __init__(self, inner: SimDriver) -> None:
        self.inner = inner
        self.name = inner.name
        self.victim: str | None = None

    def inventory(self):  # type: ignore[no-untyped-def]
        return self.inner.inventory()

    def pin(self, guest: Guest, vcpu: int, cpus: CpuSet) -> None:
        if self.victim is None:
            self.victim = guest.id
        if guest.id == self.victim:
            raise GuestGoneError(f"domain {guest.name} is not running")
        self.inner.pin(guest, vcpu, cpus)

    def events(self, timeout: float):  # type: ignore[no-untyped-def]
        return self.inner.events(timeout)

    def close(self) -> None:
        self.inner.close()


def test_a_vm_gone_mid_pin_is_that_vms_error_only() -> None:
    ctl, host = _controller(DEMO, driver_wrapper=_VanishingDriver)
    reports = _drive(ctl, host, 30)
    victim = ctl.driver.victim  # type: ignore[attr-defined]
    gone = sum(r.errors.get("guest_gone", 0) for r in reports)
    applied = [m for r in reports for m in r.applied]
    assert gone >= 1
    assert applied and all(m.guest_id != victim for m in applied)
    refused = [why for r in reports for m, why in r.refused if m.guest_id == victim]
    assert any(why.startswith("guest gone") for why in refused)


def test_restore_puts_every_moved_vcpu_back() -> None:
    ctl, host = _controller(DEMO)
    host.step()
    original = _affinities(ctl)
    _drive(ctl, host, 40)
    assert _affinities(ctl) != original
    assert ctl.restore() == {}
    assert _affinities(ctl) == original


class _Scripted:
    """Moves one vCPU of ``sort-1`` next to the streaming VMs' socket once: a bad move."""

    name = "scripted"
    description = "one deliberately bad move"

    def __init__(self, target: CpuSet) -> None:
        self.target = target

    def initial_state(self) -> object:
        return False

    def decide(self, snapshot: Snapshot, state: object) -> tuple[Plan, object]:
        if state:
            return Plan(self.name), state
        g = next(g for g in snapshot.guests if g.name == "sort-1")
        v = g.vcpus[0]
        if (snapshot.rates.get((g.id, 0)) or None) is None or snapshot.rates[(g.id, 0)].mpki is None:
            return Plan(self.name), False
        m = Move(g.id, g.name, 0, v.affinity, self.target, "test: deliberately bad", 1.0)
        return Plan(self.name, (m,)), True


def test_a_move_that_raises_mpki_is_rolled_back_and_remembered() -> None:
    # sort-1 alone on socket 0's L3; then push one of its vCPUs onto the crowded socket 1:
    # it loses its cache share and its shared working set now misses across domains.
    ctl, host = _controller(
        DEMO,
        settings=ControllerSettings(
            interval_s=5.0, guard=GuardSettings(hold_ticks=1, cooldown_s=0, return_window_s=0)
        ),
    )
    host.step()
    guests = {g.name: g for g in ctl.driver.inventory().guests}
    sort1 = guests["sort-1"]
    sibling_cpus = CpuSet.parse("2-3")
    for v in sort1.vcpus:
        ctl.driver.pin(sort1, v.index, sibling_cpus)
    # Everyone else on socket 1 (PUs 8-15, 24-31): its L3 is what the bad move walks into.
    for name in ("sort-2", "build-1", "build-2", "triad-1", "triad-2"):
        for v in guests[name].vcpus:
            ctl.driver.pin(guests[name], v.index, CpuSet.parse("8-15,24-31"))
    ctl.policy = _Scripted(CpuSet.of(12))
    ctl.policy_state = ctl.policy.initial_state()
    reports = _drive(ctl, host, 80)
    outcomes = [o for r in reports for o in r.outcomes]
    assert outcomes, "the move should have been verified"
    o = outcomes[0]
    assert o.mpki_before is not None and o.mpki_after is not None
    if o.mpki_after > o.mpki_before * 1.1:
        rollbacks = [m for r in reports for m in r.applied if m.kind == "rollback"]
        assert rollbacks and rollbacks[0].to_cpus == sibling_cpus
        assert ((sort1.id, 0), CpuSet.of(12)) in reports[-1].snapshot.bad_placements
    else:
        pytest.fail(f"the simulator did not make the split worse: {o}")


def test_reports_are_complete(tmp_path: Path) -> None:
    ctl, host = _controller(DEMO)
    r = _drive(ctl, host, 5)[0]
    assert r.policy == "cache-aware" and r.interval_s == 5.0 and r.duration_s >= 0
    assert r.snapshot.topology is ctl.topology
    assert isinstance(r.plan, Plan)
    keys: Sequence[VCpuKey] = list(r.snapshot.rates)
    assert len(keys) == sum(len(g.vcpus) for g in r.snapshot.guests)
    assert replace(r, tick=2).tick == 2


class _MovesOnce:
    """Moves ``sort-1`` vCPU 0 once, then only records what the controller says the guard holds."""

    name = "moves-once"
    description = "one move, then a record of Snapshot.frozen and Snapshot.barred"

    def __init__(self) -> None:
        self.seen: list[Snapshot] = []

    def initial_state(self) -> object:
        return False

    def decide(self, snapshot: Snapshot, state: object) -> tuple[Plan, object]:
        self.seen.append(snapshot)
        if state:
            return Plan(self.name), state
        g = next(g for g in snapshot.guests if g.name == "sort-1")
        m = Move(g.id, g.name, 0, g.vcpus[0].affinity, CpuSet.parse("4-5"), "test", 1.0)
        return Plan(self.name, (m,)), True


def test_the_policy_is_told_which_vcpus_the_guard_holds_and_where_they_may_not_return() -> None:
    guard = GuardSettings(hold_ticks=1, cooldown_s=20, return_window_s=30)
    ctl, host = _controller(DEMO, settings=ControllerSettings(interval_s=5.0, guard=guard))
    ctl.policy = policy = _MovesOnce()
    ctl.policy_state = policy.initial_state()
    host.step()
    left = next(g for g in ctl.driver.inventory().guests if g.name == "sort-1")
    key, before = (left.id, 0), left.vcpus[0].affinity
    reports = _drive(ctl, host, 45)
    assert [m.key for m in reports[0].applied] == [key] and reports[0].snapshot.time == 6.0
    for snap in policy.seen[1:]:
        age = snap.time - 6.0
        assert snap.frozen == (frozenset({key}) if age < 20 else frozenset()), age
        assert snap.barred == (frozenset({(key, before)}) if age < 30 else frozenset()), age
    # the tick's report carries the snapshot the policy saw
    assert [r.snapshot.frozen for r in reports] == [s.frozen for s in policy.seen]
