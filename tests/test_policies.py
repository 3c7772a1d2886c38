"""Invariants every registered policy must hold, on hypothesis-generated snapshots of real hosts.

For each policy, over several ticks (each plan applied before the next): no move onto a CPU
that is reserved, offline, isolated, cgroup-disallowed or taken; no move of an opted-out,
orchestrator-pinned, problem or thread-less vCPU; every move has a reason, from_cpus equal to
the vCPU's affinity, a non-empty to_cpus different from it; one move per vCPU at most; the
plan is the same for the same snapshot + state, and for the state's JSON round trip.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaptive_pin.model import CpuSet, Guest, Plan, Snapshot, Topology, VCpuKey, VCpuRates
from policies.base import Policy, state_from_json, state_to_json
from policies.registry import BUILTINS, get_policy
from tests.policy_helpers import REAL_TOPOLOGIES, apply_plan, guest, make_topology, real_topology, snapshot

SYNTHETIC = {
    "synthetic-2llc-smt": make_topology(),
    "synthetic-2pkg-4llc-2node": make_topology(packages=2, llcs_per_package=2, cores_per_llc=2, threads=2),
    "synthetic-restricted": make_topology(reserved=(0, 8), isolated=(3,), disallowed=(15, 7)),
}
TOPOLOGY_NAMES = tuple(SYNTHETIC) + REAL_TOPOLOGIES


def topology_named(name: str) -> Topology:
    return SYNTHETIC[name] if name in SYNTHETIC else real_topology(name)


@st.composite
def snapshots(draw: st.DrawFn) -> Snapshot:
    topo = topology_named(draw(st.sampled_from(TOPOLOGY_NAMES)))
    online = list(topo.pus)
    if draw(st.booleans()):
        reserved = draw(st.lists(st.sampled_from(online), max_size=max(1, len(online) // 4), unique=True))
        topo = topo.with_reserved(CpuSet(reserved))
    guests: list[Guest] = []
    vcpu_rates: dict[VCpuKey, VCpuRates] = {}
    for gi in range(draw(st.integers(0, 6))):
        gid = f"g{gi:02d}"
        n = draw(st.integers(1, 6))
        orch = draw(st.integers(0, 9)) == 0
        affinities = []
        for _ in range(n):
            shape = "one" if orch else draw(st.sampled_from(["all", "one", "some"]))
            if shape == "all":
                affinities.append(topo.online)
            elif shape == "one":
                affinities.append(CpuSet.of(draw(st.sampled_from(online))))
            else:
                affinities.append(CpuSet(draw(st.lists(st.sampled_from(online), min_size=1, max_size=8))))
        tids = [None if draw(st.integers(0, 19)) == 0 else 100 * gi + i for i in range(n)]
        nodes = sorted(topo.numa_nodes)
        mem = CpuSet(draw(st.lists(st.sampled_from(nodes), max_size=2))) if draw(st.booleans()) else None
        g = guest(
            gid,
            affinities,
            managed=draw(st.integers(0, 4)) > 0,
            whole_cores=draw(st.integers(0, 5)) == 0,
            orchestrator_pinned=orch,
            problem="vCPU threads cannot be told apart" if draw(st.integers(0, 19)) == 0 else None,
            tids=tids,
            memory_nodes=mem or None,
        )
        guests.append(g)
        for v in g.vcpus:
            if draw(st.integers(0, 9)) == 0:
                continue  # not sampled yet
            util = draw(st.floats(0.0, 1.0))
            misses = draw(st.one_of(st.none(), st.floats(0.0, 5e7)))
            last = draw(st.one_of(st.none(), st.sampled_from(sorted(v.affinity & topo.online) or online)))
            vcpu_rates[(gid, v.index)] = VCpuRates(
                llc_misses_per_s=misses,
                mpki=None if misses is None else misses / 2e6,
                utilization=util,
                run_delay=draw(st.floats(0.0, 0.5)),
                last_cpu=last,
            )
    return snapshot(topo, guests, vcpu_rates, time=draw(st.floats(0.0, 1e5)), pmu=draw(st.booleans()))


def check_invariants(snap: Snapshot, plan: Plan, policy: Policy) -> None:
    topo = snap.topology
    allowed = ((topo.online & topo.allowed) - topo.isolated - topo.reserved) - snap.taken
    guests = {g.id: g for g in snap.guests}
    seen: set[VCpuKey] = set()
    assert plan.policy == policy.name
    for m in plan.moves:
        assert m.key not in seen, f"two moves for {m.key}"
        seen.add(m.key)
        g = guests[m.guest_id]
        assert g.pinnability.managed, f"opted-out {g.id} moved"
        assert not g.orchestrator_pinned, f"orchestrator-pinned {g.id} moved"
        assert not g.problem
        v = g.vcpu(m.vcpu)
        assert v.tid is not None
        assert m.from_cpus == v.affinity
        assert m.to_cpus, "empty target"
        assert m.to_cpus != m.from_cpus
        assert m.to_cpus <= allowed, f"{m.to_cpus} not within usable {allowed} (taken {snap.taken})"
        assert m.reason.strip()
        assert m.kind.strip()
        assert math.isfinite(m.predicted_gain)
        assert m.guest_name == g.name


@pytest.mark.parametrize("name", sorted(BUILTINS))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(snap=snapshots())
def test_policy_invariants(name: str, snap: Snapshot) -> None:
    policy = get_policy(name)
    state = policy.initial_state()
    for _ in range(3):
        plan, new_state = policy.decide(snap, state)
        check_invariants(snap, plan, policy)
        again, again_state = policy.decide(snap, state)
        assert again == plan, "same snapshot and state, different plan"
        assert again_state == new_state
        text = state_to_json(new_state)  # the daemon must be able to persist it
        restored = state_from_json(policy, text)
        replay, _ = policy.decide(snap, json.loads(state_to_json(state)))
        assert replay == plan, "plan differs after a JSON round trip of the state"
        assert json.loads(text) == restored
        state = restored
        snap = apply_plan(snap, plan)


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_unreadable_state_is_treated_as_initial(name: str) -> None:
    topo = make_topology()
    snap = snapshot(topo, [guest("a", [topo.online] * 2)])
    policy = get_policy(name)
    expected, _ = policy.decide(snap, policy.initial_state())
    junk: object
    for junk in (
        None,
        3,
        "x",
        [],
        {"version": 999},
        {"version": 1, "assigned": 5, "guests": [], "active": 7},
    ):
        plan, state = policy.decide(snap, junk)
        assert plan == expected
        state_to_json(state)
    assert state_from_json(policy, "{not json") == policy.initial_state()
    assert state_from_json(policy, None) == policy.initial_state()


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_nothing_usable_means_no_moves(name: str) -> None:
    topo = make_topology()
    pinned = guest("o", [CpuSet.of(c) for c in topo.pus], orchestrator_pinned=True)
    mine = guest("a", [topo.online, topo.online])
    snap = snapshot(topo, [pinned, mine])
    assert snap.taken == topo.online
    plan, _ = get_policy(name).decide(snap, get_policy(name).initial_state())
    assert plan.moves == ()


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_guest_fields_that_forbid_moves(name: str) -> None:
    topo = make_topology()
    forbidden = [
        guest("opted-out", [topo.online] * 2, managed=False),
        guest("nova", [CpuSet.of(0), CpuSet.of(8)], orchestrator_pinned=True),
        replace(guest("broken", [topo.online] * 2), problem="threads cannot be told apart"),
        guest("no-tid", [topo.online], tids=[None]),
    ]
    from tests.policy_helpers import rates

    r = {(g.id, v.index): rates(1.0, 3e7, v.affinity.first()) for g in forbidden for v in g.vcpus}
    snap = snapshot(topo, forbidden, r)
    policy = get_policy(name)
    plan, _ = policy.decide(snap, policy.initial_state())
    assert plan.moves == ()
