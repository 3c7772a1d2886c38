"""The guard: hysteresis, cooldown, no A->B->A, budget, usable CPUs only."""

from __future__ import annotations

import pytest

from adaptive_pin.fixtures import fixture_root
from adaptive_pin.guard import Guard, GuardSettings
from adaptive_pin.model import (
    CpuSet,
    Guest,
    MemoryMove,
    Move,
    Pinnability,
    PinSource,
    Plan,
    Snapshot,
    Topology,
    VCpu,
)
from adaptive_pin.topology import read_topology


@pytest.fixture(scope="module")
def topo() -> Topology:
    # 1 socket, 4 cores x 2 threads, one L3: PUs 0-7
    return read_topology(fixture_root("8em64t-4c2t"), reserved=CpuSet.of(0))


def _guest(n_vcpus: int = 4, n: int = 1) -> Guest:
    vcpus = tuple(VCpu(i, 1000 * n + i, CpuSet(range(8))) for i in range(n_vcpus))
    return Guest(f"g{n}", f"vm{n}", 990 + n, vcpus, Pinnability(True, PinSource.DEFAULT), "test")


def _snap(topo: Topology, t: float, taken: CpuSet = CpuSet()) -> Snapshot:
    return Snapshot(time=t, topology=topo, guests=(_guest(),), rates={}, taken=taken)


def _move(
    to: str,
    vcpu: int = 0,
    gain: float = 1.0,
    frm: str = "0-7",
    kind: str = "rebalance",
    vm: int = 1,
    group: str = "",
) -> Move:
    return Move(f"g{vm}", f"vm{vm}", vcpu, CpuSet.parse(frm), CpuSet.parse(to), "test", gain, kind, group)


def _plan(*moves: Move) -> Plan:
    return Plan("test", moves)


def test_a_move_must_be_proposed_for_hold_ticks_in_a_row(topo: Topology) -> None:
    g = Guard(GuardSettings(hold_ticks=3))
    for t in (0, 1):
        r = g.filter(_plan(_move("2")), _snap(topo, t))
        assert not r.accepted and "of 3 consecutive" in r.refused[0][1]
    assert g.filter(_plan(_move("2")), _snap(topo, 2)).accepted == (_move("2"),)


def test_streak_resets_when_the_proposal_stops_or_changes(topo: Topology) -> None:
    g = Guard(GuardSettings(hold_ticks=2))
    g.filter(_plan(_move("2")), _snap(topo, 0))
    g.filter(_plan(), _snap(topo, 1))  # not proposed: streak gone
    assert not g.filter(_plan(_move("2")), _snap(topo, 2)).accepted
    assert not g.filter(_plan(_move("3")), _snap(topo, 3)).accepted  # new target: new streak
    assert g.filter(_plan(_move("3")), _snap(topo, 4)).accepted


def test_first_placement_and_one_shot_skip_the_hold(topo: Topology) -> None:
    g = Guard(GuardSettings(hold_ticks=5))
    assert g.filter(_plan(_move("2", kind="initial")), _snap(topo, 0)).accepted
    assert g.filter(_plan(_move("3", vcpu=1)), _snap(topo, 0), one_shot=True).accepted


def test_cooldown_and_no_return_to_where_it_came_from(topo: Topology) -> None:
    g = Guard(GuardSettings(hold_ticks=1, cooldown_s=60, return_window_s=300))
    m = _move("2", frm="4")
    assert g.filter(_plan(m), _snap(topo, 0)).accepted
    g.record_move(m, 0)
    # within the cooldown nothing moves this vCPU
    r = g.filter(_plan(_move("3", frm="2")), _snap(topo, 30))
    assert "cooling down" in r.refused[0][1]
    # after the cooldown it may move, but not back to 4 (A -> B -> A) ...
    r = g.filter(_plan(_move("4", frm="2")), _snap(topo, 100))
    assert "would move back" in r.refused[0][1]
    assert g.filter(_plan(_move("5", frm="2")), _snap(topo, 101)).accepted
    # ... until the return window has passed
    assert g.filter(_plan(_move("4", frm="2")), _snap(topo, 301)).accepted


def test_what_the_guard_holds_is_told_to_the_policy(topo: Topology) -> None:
    g = Guard(GuardSettings(hold_ticks=1, cooldown_s=60, return_window_s=300))
    g.record_move(_move("2", frm="4"), 0)
    g.record_move(_move("3", vm=2, frm="5"), 50)
    assert g.cooling(30) == {("g1", 0), ("g2", 0)}
    assert g.cooling(70) == {("g2", 0)} and g.cooling(110) == frozenset()
    assert g.barred(70) == {(("g1", 0), CpuSet.parse("4")), (("g2", 0), CpuSet.parse("5"))}
    assert g.barred(320) == {(("g2", 0), CpuSet.parse("5"))} and g.barred(400) == frozenset()
    # what it says is what it does
    r = g.filter(_plan(_move("6", frm="2"), _move("6", vm=2, frm="3")), _snap(topo, 70))
    assert [m.guest_name for m in r.accepted] == ["vm1"]
    assert [(m.guest_name, why[:12]) for m, why in r.refused] == [("vm2", "cooling down")]
    assert "would move back" in g.filter(_plan(_move("5", vm=2, frm="3")), _snap(topo, 120)).refused[0][1]


def test_budget_keeps_the_largest_gains(topo: Topology) -> None:
    g = Guard(GuardSettings(hold_ticks=1, budget_per_tick=2))
    moves = [_move(str(cpu), gain=float(i), vm=i) for i, cpu in enumerate((2, 3, 4, 5))]
    guests = tuple(_guest(1, i) for i in range(4))
    r = g.filter(_plan(*moves), Snapshot(0, topo, guests, {}))
    assert [m.guest_id for m in r.accepted] == ["g3", "g2"]
    assert {m.guest_id for m, why in r.refused if "budget" in why} == {"g0", "g1"}


def test_a_vms_moves_go_together_or_not_at_all(topo: Topology) -> None:
    g = Guard(GuardSettings(hold_ticks=1, cooldown_s=60))
    g.record_move(_move("2", vcpu=1, frm="0-7"), 0)
    plan = _plan(_move("4-5", vcpu=0), _move("4-5", vcpu=1, frm="2"), _move("6", vcpu=0, vm=2))
    r = g.filter(plan, Snapshot(30, topo, (_guest(2), _guest(1, 2)), {}))
    # vCPU 1 is cooling down, so vCPU 0 of its VM waits too: moving it alone would split vm1
    assert [m.guest_id for m in r.accepted] == ["g2"]
    why = dict(((m.guest_id, m.vcpu), w) for m, w in r.refused)
    assert "cooling down" in why["g1", 1]
    assert why["g1", 0].startswith("goes with vm1 vCPU 1, held back: cooling down")
    # after the cooldown both move in the same tick
    r = g.filter(plan, Snapshot(61, topo, (_guest(2), _guest(1, 2)), {}))
    assert {(m.guest_id, m.vcpu) for m in r.accepted} == {("g1", 0), ("g1", 1), ("g2", 0)}


def test_a_swap_is_never_half_made(topo: Topology) -> None:
    g = Guard(GuardSettings(hold_ticks=1, cooldown_s=60))
    g.record_move(_move("6-7", vm=2, frm="0-7"), 0)
    swap = (_move("6-7", vm=1, frm="4-5", group="swap"), _move("4-5", vm=2, frm="6-7", group="swap"))
    guests = (_guest(1), _guest(1, 2))
    r = g.filter(_plan(*swap), Snapshot(30, topo, guests, {}))
    assert not r.accepted
    assert "goes with vm2 vCPU 0" in dict((m.guest_id, w) for m, w in r.refused)["g1"]
    assert len(g.filter(_plan(*swap), Snapshot(61, topo, guests, {})).accepted) == 2


def test_refits_and_no_ops_hold_nothing_back(topo: Topology) -> None:
    g = Guard(GuardSettings(hold_ticks=1, cooldown_s=60))
    g.record_move(_move("2", vcpu=1), 0)
    plan = _plan(_move("2-3", vcpu=1, frm="2", kind="refit"), _move("4", vcpu=2, frm="4"), _move("5", vcpu=3))
    r = g.filter(plan, Snapshot(30, topo, (_guest(4),), {}))
    # the refit is a correction (not cooled down, not tied to vm1's other moves); "already there"
    # is a no-op; so vCPU 3 moves
    assert {m.vcpu for m in r.accepted} == {3}
    assert dict((m.vcpu, w) for m, w in r.refused)[1].startswith("cooling down")


def test_the_budget_takes_whole_groups(topo: Topology) -> None:
    g = Guard(GuardSettings(hold_ticks=1, budget_per_tick=3))
    big = [_move(str(c), vcpu=i, gain=2.0, vm=1) for i, c in enumerate((2, 3))]
    second = [_move(str(c), vcpu=i, gain=1.5, vm=2) for i, c in enumerate((4, 5))]
    small = [_move("6", gain=1.0, vm=3)]
    guests = (_guest(2), _guest(2, 2), _guest(1, 3))
    r = g.filter(_plan(*big, *second, *small), Snapshot(0, topo, guests, {}))
    # vm2 does not fit in what vm1 left of the budget and is not cut in two; vm3 fits
    assert {m.guest_id for m in r.accepted} == {"g1", "g3"}
    assert {(m.guest_id, m.vcpu) for m, w in r.refused if "budget" in w} == {("g2", 0), ("g2", 1)}
    # one group larger than the whole budget goes alone
    wide = [_move(str(c), vcpu=i, vm=1) for i, c in enumerate((2, 3, 4, 5))]
    r = Guard(GuardSettings(hold_ticks=1, budget_per_tick=3)).filter(
        _plan(*wide, *small), Snapshot(0, topo, (_guest(4), _guest(1, 3)), {})
    )
    assert {m.guest_id for m in r.accepted} == {"g1"} and len(r.accepted) == 4


@pytest.mark.parametrize(
    ("target", "taken", "why"),
    [("0", "", "not usable"), ("9", "", "not usable"), ("6", "6-7", "not usable"), ("", "", "empty")],
)
def test_never_onto_reserved_offline_or_taken_cpus(topo: Topology, target: str, taken: str, why: str) -> None:
    g = Guard(GuardSettings(hold_ticks=1))
    r = g.filter(_plan(_move(target)), _snap(topo, 0, CpuSet.parse(taken)))
    assert not r.accepted and why in r.refused[0][1]


def test_min_gain_and_rolled_back_placements(topo: Topology) -> None:
    g = Guard(GuardSettings(hold_ticks=1, min_gain=0.5))
    assert "below minimum" in g.filter(_plan(_move("2", gain=0.1)), _snap(topo, 0)).refused[0][1]
    bad = Snapshot(0, topo, (_guest(),), {}, bad_placements=frozenset({(("g1", 0), CpuSet.of(2))}))
    assert "rolled back" in g.filter(_plan(_move("2")), bad).refused[0][1]


def test_state_round_trip_keeps_cooldowns(topo: Topology) -> None:
    g = Guard(GuardSettings(hold_ticks=1, cooldown_s=60))
    g.record_move(_move("2", frm="4"), 10)
    g2 = Guard(GuardSettings(hold_ticks=1, cooldown_s=60))
    g2.import_state(g.export_state())
    assert "cooling down" in g2.filter(_plan(_move("3", frm="2")), _snap(topo, 20)).refused[0][1]
    assert "would move back" in g2.filter(_plan(_move("4", frm="2")), _snap(topo, 100)).refused[0][1]


def test_memory_state_round_trip_keeps_cooldown_and_return_window() -> None:
    g = Guard(GuardSettings(cooldown_s=60, return_window_s=300))
    there = MemoryMove("pid:7", "vm", CpuSet.of(0), CpuSet.of(1), "", 1.0)
    back = MemoryMove("pid:7", "vm", CpuSet.of(1), CpuSet.of(0), "", 1.0)
    g.record_memory_move(there, 10)
    assert g.export_memory_state() == {"pid:7": {"last_moved": 10, "left": {"0": 10}}}
    assert g.export_state() == {}  # the vCPU history is apart: no "<guest>/<vcpu>" for memory
    g2 = Guard(GuardSettings(cooldown_s=60, return_window_s=300))
    g2.import_memory_state(g.export_memory_state())
    assert "cooldown" in (g2.memory_refusal(there, 20, used=0) or "")
    assert "back" in (g2.memory_refusal(back, 100, used=0) or "")
    assert g2.memory_refusal(back, 311, used=0) is None


@pytest.fixture(scope="module")
def two_llc() -> Topology:
    # 2 sockets, one L3 and one node each: 0-7,16-23 and 8-15,24-31
    return read_topology(fixture_root("32intel64-2p8co2t+8ve"))


def _split_snap(topo: Topology, t: float, affinities: tuple[str, ...]) -> Snapshot:
    vcpus = tuple(VCpu(i, 1000 + i, CpuSet.parse(a)) for i, a in enumerate(affinities))
    g = Guest("g1", "vm1", 999, vcpus, Pinnability(True, PinSource.DEFAULT), "test")
    return Snapshot(time=t, topology=topo, guests=(g,), rates={})


def test_a_split_vm_is_gathered_within_the_cooldown_but_nothing_else_moves(two_llc: Topology) -> None:
    g = Guard(GuardSettings(hold_ticks=1, cooldown_s=60, return_window_s=300))
    first = _move("8-15", vcpu=1, frm="0-31", kind="initial")  # placed split: no room in LLC 0
    g.record_move(first, 0)
    split = _split_snap(two_llc, 30, ("0-7", "8-15"))
    gather = _move("0-7", vcpu=1, frm="8-15")
    assert g.filter(_plan(gather), split).accepted == (gather,)
    # moving it anywhere that leaves the VM split waits for the cooldown
    r = g.filter(_plan(_move("24-31", vcpu=1, frm="8-15")), split)
    assert "cooling down" in r.refused[0][1]
    # a VM already whole is not gathered: within the cooldown it stays
    g.record_move(gather, 30)
    whole = _split_snap(two_llc, 40, ("0-7", "0-7"))
    r = g.filter(_plan(_move("8-15", vcpu=0, frm="0-7"), _move("8-15", vcpu=1, frm="0-7")), whole)
    # vCPU 0 was never moved by the controller (no cooldown), but alone it would split the VM
    assert not r.accepted
    assert [(m.vcpu, why) for m, why in r.refused] == [
        (1, "cooling down: moved 10s ago (cooldown 60s)"),
        (0, "goes with vm1 vCPU 1, held back: cooling down: moved 10s ago (cooldown 60s)"),
    ]


def test_gathering_does_not_override_the_return_window(two_llc: Topology) -> None:
    g = Guard(GuardSettings(hold_ticks=1, cooldown_s=60, return_window_s=300))
    g.record_move(_move("8-15", vcpu=1, frm="0-7"), 0)  # it left LLC 0 at t=0, splitting the VM
    r = g.filter(_plan(_move("0-7", vcpu=1, frm="8-15")), _split_snap(two_llc, 30, ("0-7", "8-15")))
    assert not r.accepted and "would move back" in r.refused[0][1]


def test_a_floating_vm_is_not_a_split_one(two_llc: Topology) -> None:
    g = Guard(GuardSettings(hold_ticks=1, cooldown_s=60))
    g.record_move(_move("0-31", vcpu=1, frm="8-15"), 0)  # unpinned by a policy
    r = g.filter(_plan(_move("0-7", vcpu=1, frm="0-31")), _split_snap(two_llc, 30, ("0-7", "0-31")))
    assert "cooling down" in r.refused[0][1]
