"""The baselines behave like the tools they are named after (numad, Nova, kubelet, round-robin)."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from adaptive_pin.model import CpuSet, Plan, Snapshot
from policies.registry import get_policy
from tests.policy_helpers import apply_plan, guest, llc_of, make_topology, rates, snapshot

TOPO = make_topology()  # LLC 0: CPUs 0-3,8-11; LLC 1: 4-7,12-15; siblings c, c+8
FLOAT = TOPO.online


def targets(plan: Plan) -> dict[tuple[str, int], int]:
    out = {}
    for m in plan.moves:
        assert len(m.to_cpus) == 1 and m.kind == "initial"
        out[m.key] = m.to_cpus.first()
    return out


def run(name: str, snap: Snapshot, state: object = None) -> tuple[Plan, object, Snapshot]:
    policy = get_policy(name)
    plan, new_state = policy.decide(snap, policy.initial_state() if state is None else state)
    return plan, new_state, apply_plan(snap, plan)


def test_pack_fills_both_siblings_before_the_next_core() -> None:
    snap = snapshot(TOPO, [guest("a", [FLOAT] * 3), guest("b", [FLOAT] * 3)])
    plan, _, _ = run("pack", snap)
    assert targets(plan) == {
        ("a", 0): 0, ("a", 1): 8, ("a", 2): 1,
        ("b", 0): 9, ("b", 1): 2, ("b", 2): 10,
    }  # fmt: skip


def test_pack_keeps_a_vm_in_one_numa_node_when_it_fits() -> None:
    topo = make_topology(packages=2, llcs_per_package=1, cores_per_llc=2)  # node 0: 0,1,4,5
    snap = snapshot(topo, [guest("a", [topo.online] * 3), guest("b", [topo.online] * 2)])
    plan, _, _ = run("pack", snap)
    got = targets(plan)
    assert [got[("a", i)] for i in range(3)] == [0, 4, 1]
    assert [got[("b", i)] for i in range(2)] == [2, 6], "b does not fit node 0's last PU: node 1"


def test_static_placement_is_kept_and_departures_free_cpus() -> None:
    snap = snapshot(TOPO, [guest("a", [FLOAT] * 2), guest("b", [FLOAT] * 2)])
    plan, state, after = run("pack", snap)
    a_cpus = {targets(plan)[("a", i)] for i in range(2)}
    again, state, _ = run("pack", after, state)
    assert again.moves == ()
    # a leaves, c arrives: c gets a's PUs (first fit), b stays where it is.
    later = snapshot(TOPO, [after.guest("b"), guest("c", [FLOAT] * 2)])
    plan, state, _ = run("pack", later, state)
    assert set(targets(plan).values()) == a_cpus
    assert {m.guest_id for m in plan.moves} == {"c"}
    assert "a" not in state["assigned"]  # type: ignore[index]


def test_static_policies_share_pus_evenly_when_overcommitted() -> None:
    for name in ("pack", "uncore", "spread"):
        snap = snapshot(TOPO, [guest(f"g{i}", [FLOAT] * 4) for i in range(5)])  # 20 vCPUs, 16 PUs
        plan, _, _ = run(name, snap)
        per_pu = Counter(targets(plan).values())
        assert len(targets(plan)) == 20
        assert set(per_pu) == set(TOPO.pus), name
        assert max(per_pu.values()) == 2, name
        assert any("share a PU" in n for n in plan.notes), name


def test_uncore_keeps_a_vm_in_as_few_llcs_as_possible() -> None:
    snap = snapshot(TOPO, [guest("big", [FLOAT] * 6), guest("small", [FLOAT] * 3)])
    plan, _, _ = run("uncore", snap)
    got = targets(plan)
    for gid, n in (("big", 6), ("small", 3)):
        assert len(llc_of(TOPO, CpuSet(got[(gid, i)] for i in range(n)))) == 1, gid
    assert llc_of(TOPO, CpuSet(got[("big", i)] for i in range(6))) == {0}
    assert llc_of(TOPO, CpuSet(got[("small", i)] for i in range(3))) == {1}, "LLC 0 has only 2 left"
    # Pack, first-fit in CPU order, splits the small VM over both LLCs instead.
    pack, _, _ = run("pack", snap)
    assert len(llc_of(TOPO, CpuSet(targets(pack)[("small", i)] for i in range(3)))) == 2


def test_uncore_takes_whole_free_llcs_first() -> None:
    snap = snapshot(TOPO, [guest("one", [FLOAT]), guest("ten", [FLOAT] * 10)])
    got = targets(run("uncore", snap)[0])
    ten = [got[("ten", i)] for i in range(10)]
    assert llc_of(TOPO, CpuSet(ten[:8])) == {1}, "the whole free LLC 1 first"
    assert llc_of(TOPO, CpuSet(ten[8:])) == {0}


def test_spread_round_robins_llcs_then_cores() -> None:
    snap = snapshot(TOPO, [guest("a", [FLOAT] * 4), guest("b", [FLOAT] * 4)])
    got = targets(run("spread", snap)[0])
    a = [got[("a", i)] for i in range(4)]
    assert [TOPO.llc_of(c).index for c in a] == [0, 1, 0, 1]
    everyone = list(got.values())
    cores = Counter(TOPO.smt_siblings(c) for c in everyone)
    assert max(cores.values()) == 1, "an SMT sibling was used while a core was empty"


def _numa_snapshot(time: float, utils: dict[str, float]) -> Snapshot:
    topo = make_topology(packages=2, llcs_per_package=1, cores_per_llc=4)  # 2 nodes of 8 PUs
    guests = [guest(gid, [topo.online] * 2, last_cpus=[0, 1]) for gid in utils]
    r = {(g.id, v.index): rates(utils[g.id], None, v.last_cpu) for g in guests for v in g.vcpus}
    return snapshot(topo, guests, r, time=time, pmu=False)


def test_numa_binds_busy_vms_to_the_least_loaded_nodes_only() -> None:
    snap = _numa_snapshot(1000.0, {"a": 0.9, "b": 0.9, "idle": 0.2})
    plan, state, _ = run("numa", snap)
    node_of = {m.guest_id: m.to_cpus for m in plan.moves}
    topo = snap.topology
    assert set(node_of) == {"a", "b"}, "a VM below half a CPU is not a candidate (numad CPU_THRESHOLD)"
    assert {node_of["a"], node_of["b"]} == {topo.numa_nodes[0].cpus, topo.numa_nodes[1].cpus}
    assert state["guests"]["a"]["bound_at"] == 1000.0  # type: ignore[index]


def test_numa_waits_five_minutes_before_reevaluating() -> None:
    policy = get_policy("numa")
    first = _numa_snapshot(1000.0, {"a": 0.9})
    plan, state = policy.decide(first, policy.initial_state())
    bound = {m.to_cpus for m in plan.moves}
    assert len(bound) == 1
    after = apply_plan(first, plan)
    # Another busy VM lands on a's node; a is not re-evaluated before 300 s have passed.
    for t in (1100.0, 1299.0):
        crowd = _numa_snapshot(t, {"a": 0.9, "z": 1.0})
        snap = replace(crowd, guests=(after.guest("a"), crowd.guest("z")))
        plan, state = policy.decide(snap, state)
        assert all(m.guest_id != "a" for m in plan.moves), t
        assert state["guests"]["a"]["bound_at"] == 1000.0  # type: ignore[index]
    plan, state = policy.decide(_numa_snapshot(1300.0, {"a": 0.9}), state)
    assert state["guests"]["a"]["bound_at"] == 1300.0  # type: ignore[index]


def test_numa_uses_the_peak_of_recent_cpu_samples() -> None:
    policy = get_policy("numa", reevaluate_s=0)
    state = policy.initial_state()
    _, state = policy.decide(_numa_snapshot(0.0, {"a": 0.9}), state)  # 1.8 CPUs over 2 vCPUs
    for t in range(1, 7):
        _, state = policy.decide(_numa_snapshot(5.0 * t, {"a": 0.05}), state)
    assert "nodes" in state["guests"]["a"]  # type: ignore[index]
    assert max(state["guests"]["a"]["cpu"]) == 1.8  # type: ignore[index]
    for t in range(7, 10):
        _, state = policy.decide(_numa_snapshot(5.0 * t, {"a": 0.05}), state)
    assert max(state["guests"]["a"]["cpu"]) == 0.1, "older than 8 samples: forgotten"  # type: ignore[index]


def test_none_never_moves_even_pinned_vcpus() -> None:
    snap = snapshot(TOPO, [guest("a", [CpuSet.of(0), CpuSet.of(0)]), guest("b", [FLOAT])])
    plan, state, _ = run("none", snap)
    assert plan.moves == () and state is None
