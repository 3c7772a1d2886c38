"""The best placement, by exhaustive search, where the search is small enough.

A scenario is first reduced to its *static case*: the VMs running at the end of the run, each
with the workload and load of its last phase, all present from t = 0, nobody arriving or
leaving. A candidate placement gives every movable vCPU the usable PUs of one LLC domain as its
affinity; inside a domain the simulated Linux scheduler places threads (as under cache-aware's
granularity "llc", what "auto" is wherever LLC domains hold several cores). Because a VM's
vCPUs are interchangeable, a candidate is just how many vCPUs of each VM go to each domain;
VMs with the same spec (workload, vCPUs, load, memory, hints) are interchangeable too, so each
class contributes multisets of those compositions:

    candidates = prod over classes of C(n_comp + k - 1, k),  n_comp = C(v + D - 1, D - 1)

for k VMs of v vCPUs on D domains. Each candidate is scored by the simulator itself (the same
SimHost as the closed-loop runs: cache fixed point, SMT, NUMA first touch, time-sharing) as its
steady-state weighted speedup: the mean of ``MEASURE_TICKS`` ticks after ``WARMUP_TICKS``, with the
scenario's seed, so every candidate sees the same scheduler noise.

Where that space is over the budget, a second, smaller search runs when it fits: only *whole-VM*
placements (every vCPU of a VM in one domain), a multiset of domains per class:

    candidates = prod over classes of C(D + k - 1, k)

Those are a subset of the full space, so its best is a **lower bound** of the true best (which
may split a VM over domains); a share against it can exceed 1.0. ``BestPlacement.exact`` says
which: True only for the full search.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace

import numpy as np

from adaptive_pin.model import CpuSet, Topology
from adaptive_pin.sim.host import SimHost, load_host_topology
from adaptive_pin.sim.scenario import Scenario, VmSpec

VCpuName = tuple[str, int]  # (VM name, vCPU index): names, since a re-run gives new guest ids
WARMUP_TICKS = 2
MEASURE_TICKS = 3
METHOD = "exhaustive"  # every LLC-domain placement: the true best at that granularity
WHOLE_VM_METHOD = "exhaustive, whole VMs"  # whole-VM placements only: a lower bound of the best
NEAR_BEST_SHARE = 0.97  # "near the best" for the MPKI floor: the bench's best-share goal


@dataclass(frozen=True)
class StaticCase:
    scenario: Scenario  # the static scenario (every VM from t = 0, last phase, no stops)
    topology: Topology
    domains: tuple[CpuSet, ...]  # usable PUs (minus orchestrator-pinned ones) of each LLC domain
    movable: tuple[VmSpec, ...]  # the VMs a policy may place, in scenario order


@dataclass(frozen=True)
class BestPlacement:
    method: str  # METHOD or WHOLE_VM_METHOD
    exact: bool  # True: the best over every candidate; False: a lower bound of it (whole VMs)
    candidates: int
    best_ws: float
    worst_ws: float
    domains: tuple[str, ...]  # cpulists
    assignment: Mapping[str, tuple[int, ...]]  # VM -> vCPUs in each domain
    wall_s: float
    full_candidates: int  # the full space's size (== candidates when exact)
    best_mpki: float | None = None  # the best placement's aggregate MPKI (it is chosen by WS alone)
    # the lowest aggregate MPKI of any candidate scored: the MPKI floor at LLC-domain granularity
    # where exact; from the whole-VM search an upper bound of it (a split VM might miss less)
    lowest_mpki: float | None = None
    lowest_mpki_ws: float | None = None  # the steady WS of that candidate
    # the same over the candidates within NEAR_BEST_SHARE of the best WS: how far MPKI falls
    # without giving up weighted speedup (aggregate MPKI also falls when the threads missing most
    # are slowed: fewer of their instructions in the sum)
    lowest_mpki_near_best: float | None = None


@dataclass(frozen=True)
class NotSearched:
    reason: str
    candidates: int | None = None
    whole_vm_candidates: int | None = None


def static_case(scenario: Scenario, duration: float, topology: Topology | None = None) -> StaticCase:
    """``scenario`` as it stands at the end of a run of ``duration`` seconds, made static."""
    last = duration - scenario.tick + 1e-9  # the last tick starts here
    vms: list[VmSpec] = []
    for vm in scenario.vms:
        if vm.start > last or (vm.stop is not None and vm.stop <= last):
            continue
        workload, load = vm.workload, vm.load
        for phase in vm.phases:
            if phase.at <= last:
                workload = phase.workload
                load = phase.load if phase.load is not None else load
        vms.append(replace(vm, workload=workload, load=load, start=0.0, stop=None, phases=()))
    static = replace(scenario, name=f"{scenario.name}-static", vms=tuple(vms), duration=3600.0)
    topo = topology if topology is not None else load_host_topology(scenario.host)
    taken = CpuSet()
    for vm in vms:
        if vm.pinned_cpus is not None:
            taken |= vm.pinned_cpus
    usable = (topo.usable or topo.online) - taken
    domains = tuple(d.cpus & usable for d in topo.llc if d.cpus & usable)
    movable = tuple(vm for vm in vms if vm.pinned_cpus is None and vm.pinning == "auto")
    return StaticCase(static, topo, domains, movable)


def steady(case: StaticCase, affinity: Mapping[VCpuName, CpuSet]) -> tuple[float, float | None]:
    """Weighted speedup and aggregate MPKI (LLC misses per 1000 instructions, None with no
    instructions) of ``case`` in steady state with these affinities (others: the default)."""
    host = SimHost(case.scenario, topology=case.topology)
    for vm in host.vms.values():
        for th in vm.threads:
            cpus = affinity.get((vm.name, th.index))
            if cpus:
                host.pin(vm.id, th.index, cpus)
    for _ in range(WARMUP_TICKS):
        host.step()
    ticks = [host.step() for _ in range(MEASURE_TICKS)]
    instructions = sum(t.instructions for t in ticks)
    mpki = sum(t.llc_misses for t in ticks) / instructions * 1000.0 if instructions > 0 else None
    return sum(t.weighted_speedup for t in ticks) / MEASURE_TICKS, mpki


def _classes(case: StaticCase) -> list[list[VmSpec]]:
    """Movable VMs grouped by everything the model sees of them (name aside)."""
    groups: dict[tuple[object, ...], list[VmSpec]] = {}
    for vm in case.movable:
        key = (vm.workload, vm.vcpus, vm.load, vm.memory_nodes, vm.whole_cores, vm.latency_sensitive)
        groups.setdefault(key, []).append(vm)
    return list(groups.values())


def _compositions(n: int, parts: int) -> list[tuple[int, ...]]:
    """Every way to split n vCPUs over ``parts`` domains (stars and bars)."""
    out = []
    for bars in itertools.combinations(range(n + parts - 1), parts - 1):
        edges = (-1, *bars, n + parts - 1)
        out.append(tuple(edges[i + 1] - edges[i] - 1 for i in range(parts)))
    return out


def candidate_count(case: StaticCase) -> int:
    d = len(case.domains)
    total = 1
    for cls in _classes(case):
        n_comp = math.comb(cls[0].vcpus + d - 1, d - 1)
        total *= math.comb(n_comp + len(cls) - 1, len(cls))
    return total


def whole_vm_candidate_count(case: StaticCase) -> int:
    d = len(case.domains)
    total = 1
    for cls in _classes(case):
        total *= math.comb(d + len(cls) - 1, len(cls))
    return total


def _whole(vcpus: int, parts: int) -> list[tuple[int, ...]]:
    """The compositions that put all ``vcpus`` in one domain (in ``_compositions``' order)."""
    return [tuple(vcpus if i == j else 0 for i in range(parts)) for j in reversed(range(parts))]


def _assignments(
    case: StaticCase, compositions: Callable[[int, int], list[tuple[int, ...]]]
) -> Iterator[dict[str, tuple[int, ...]]]:
    d = len(case.domains)
    per_class = [
        [
            dict(zip((vm.name for vm in cls), combo, strict=True))
            for combo in itertools.combinations_with_replacement(compositions(cls[0].vcpus, d), len(cls))
        ]
        for cls in _classes(case)
    ]
    for parts in itertools.product(*per_class):
        merged: dict[str, tuple[int, ...]] = {}
        for part in parts:
            merged.update(part)
        yield merged


def candidates(case: StaticCase) -> Iterator[dict[str, tuple[int, ...]]]:
    """Every symmetry-reduced assignment: VM name -> vCPUs per domain."""
    return _assignments(case, _compositions)


def whole_vm_candidates(case: StaticCase) -> Iterator[dict[str, tuple[int, ...]]]:
    """Every symmetry-reduced assignment that keeps each VM in one domain."""
    return _assignments(case, _whole)


def affinity_of(case: StaticCase, assignment: Mapping[str, tuple[int, ...]]) -> dict[VCpuName, CpuSet]:
    out: dict[VCpuName, CpuSet] = {}
    for vm, counts in assignment.items():
        index = 0
        for dom, n in zip(case.domains, counts, strict=True):
            for _ in range(n):
                out[(vm, index)] = dom
                index += 1
    return out


def _best_of(
    case: StaticCase, method: str, assignments: Iterator[dict[str, tuple[int, ...]]], n: int, n_full: int
) -> BestPlacement:
    t0 = time.perf_counter()
    best: tuple[float, float | None, dict[str, tuple[int, ...]]] | None = None
    scored: list[tuple[float, float]] = []  # (WS, MPKI) of every candidate, for the MPKI floors
    for assignment in assignments:
        ws, mpki = steady(case, affinity_of(case, assignment))
        scored.append((ws, math.nan if mpki is None else mpki))
        if best is None or ws > best[0] + 1e-12:
            best = (ws, mpki, assignment)
    assert best is not None  # at least one movable VM: at least one candidate
    ws_all, mpki_all = np.array(scored).T
    known = ~np.isnan(mpki_all)
    lowest = lowest_ws = lowest_near = None
    if known.any():
        i = int(np.nanargmin(mpki_all))
        lowest, lowest_ws = float(mpki_all[i]), float(ws_all[i])
        near = known & (ws_all >= NEAR_BEST_SHARE * best[0])
        lowest_near = float(mpki_all[near].min()) if near.any() else None
    return BestPlacement(
        method=method,
        exact=method == METHOD,
        candidates=n,
        best_ws=best[0],
        worst_ws=float(ws_all.min()),
        domains=tuple(d.to_list() for d in case.domains),
        assignment=best[2],
        wall_s=time.perf_counter() - t0,
        full_candidates=n_full,
        best_mpki=best[1],
        lowest_mpki=lowest,
        lowest_mpki_ws=lowest_ws,
        lowest_mpki_near_best=lowest_near,
    )


def search_full(case: StaticCase) -> BestPlacement:
    """The best of every LLC-domain placement, whatever the count."""
    n = candidate_count(case)
    return _best_of(case, METHOD, candidates(case), n, n)


def search_whole_vms(case: StaticCase) -> BestPlacement:
    """The best whole-VM placement, whatever the count: a lower bound of ``search_full``'s."""
    return _best_of(
        case,
        WHOLE_VM_METHOD,
        whole_vm_candidates(case),
        whole_vm_candidate_count(case),
        candidate_count(case),
    )


def search(case: StaticCase, budget: int) -> BestPlacement | NotSearched:
    """The best placement by steady-state weighted speedup, or why no search was run.

    The full search where its count is within ``budget``; else the whole-VM search where that
    count is; else nothing.
    """
    if len(case.domains) < 2:
        return NotSearched("one LLC domain: nothing to choose at LLC granularity")
    if not case.movable:
        return NotSearched("no VM the controller may move")
    n = candidate_count(case)
    if n <= budget:
        return search_full(case)
    n_whole = whole_vm_candidate_count(case)
    if n_whole <= budget:
        return search_whole_vms(case)
    return NotSearched(
        f"{_count(n)} candidates, {_count(n_whole)} with whole VMs only: both more than the search "
        f"budget of {budget:,}",
        n,
        n_whole,
    )


def _count(n: int) -> str:
    """A candidate count for people: digits up to a trillion, then a power of ten."""
    return f"{n:,}" if n < 10**12 else f"about 10^{len(str(n)) - 1}"
