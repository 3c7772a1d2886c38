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

Where both are over the budget, a *local search* over whole-VM placements runs instead, within
the same budget of scored candidates (fewer for a scenario of many vCPUs: LOCAL_BUDGET_VCPUS):
from two starts (each VM whole into the roomiest domain, largest VMs first; and first fit in
domain order, as a static L3-aligned pinning does), steepest ascent over two neighbourhoods,
one VM whole into another domain and two VMs of different domains exchanging them, until no
neighbour scores higher or the budget is spent (``BestPlacement.local_optimum`` says which).
Its best is a placement that exists, so it too is a lower bound of the true best, and no claim
that it is the best whole-VM one.
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
LOCAL_METHOD = "local search, whole VMs"  # hill-climbing over whole-VM placements: a lower bound
# The local search's budget counts placements of a scenario of this many vCPUs; a bigger one
# gets proportionally fewer (scoring one costs about its vCPU count), so a 300-vCPU host's
# search takes tens of seconds, not ten minutes.
LOCAL_BUDGET_VCPUS = 16
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
    # LOCAL_METHOD only: True when the search stopped at a local optimum (no neighbour scores
    # higher), False when the budget ran out first
    local_optimum: bool | None = None


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


class _Tally:
    """Every candidate scored so far, (WS, MPKI) each, and the best of them."""

    def __init__(self, case: StaticCase) -> None:
        self.case = case
        self.t0 = time.perf_counter()
        self.scored: list[tuple[float, float]] = []
        self.best: tuple[float, float | None, dict[str, tuple[int, ...]]] | None = None

    def score(self, assignment: dict[str, tuple[int, ...]]) -> float:
        ws, mpki = steady(self.case, affinity_of(self.case, assignment))
        self.scored.append((ws, math.nan if mpki is None else mpki))
        if self.best is None or ws > self.best[0] + 1e-12:
            self.best = (ws, mpki, assignment)
        return ws

    def result(self, method: str, n: int, n_full: int, local_optimum: bool | None = None) -> BestPlacement:
        best = self.best
        assert best is not None  # at least one movable VM: at least one candidate
        ws_all, mpki_all = np.array(self.scored).T
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
            domains=tuple(d.to_list() for d in self.case.domains),
            assignment=best[2],
            wall_s=time.perf_counter() - self.t0,
            full_candidates=n_full,
            best_mpki=best[1],
            lowest_mpki=lowest,
            lowest_mpki_ws=lowest_ws,
            lowest_mpki_near_best=lowest_near,
            local_optimum=local_optimum,
        )


def _best_of(
    case: StaticCase, method: str, assignments: Iterator[dict[str, tuple[int, ...]]], n: int, n_full: int
) -> BestPlacement:
    tally = _Tally(case)
    for assignment in assignments:
        tally.score(assignment)
    return tally.result(method, n, n_full)


Whole = dict[str, int]  # a whole-VM placement: VM name -> its domain


class _Climb:
    """Steepest ascent over whole-VM placements for ``search_local``, within a budget of scored
    candidates. Placements that differ only in which of two interchangeable VMs is where are
    one (the exhaustive searches' symmetry reduction), scored once."""

    def __init__(self, case: StaticCase, budget: int) -> None:
        self.case = case
        self.budget = budget
        self.tally = _Tally(case)
        self.vms = list(case.movable)
        classes = _classes(case)
        self.cls_of = {vm.name: ci for ci, cls in enumerate(classes) for vm in cls}
        self.n_cls = len(classes)
        self.memo: dict[tuple[tuple[int, ...], ...], float] = {}

    def _key(self, where: Whole) -> tuple[tuple[int, ...], ...]:
        per: list[list[int]] = [[] for _ in range(self.n_cls)]
        for vm in self.vms:
            per[self.cls_of[vm.name]].append(where[vm.name])
        return tuple(tuple(sorted(doms)) for doms in per)

    def seen(self, where: Whole) -> bool:
        return self._key(where) in self.memo

    def ws(self, where: Whole) -> float | None:
        """The placement's steady WS, None when scoring it would overrun the budget."""
        key = self._key(where)
        cached = self.memo.get(key)
        if cached is not None:
            return cached
        if len(self.tally.scored) >= self.budget:
            return None
        d = len(self.case.domains)
        counts = {vm.name: tuple(vm.vcpus if k == where[vm.name] else 0 for k in range(d)) for vm in self.vms}
        ws = self.memo[key] = self.tally.score(counts)
        return ws

    def neighbours(self, where: Whole) -> Iterator[Whole]:
        d = len(self.case.domains)
        for vm in self.vms:  # one VM whole into another domain
            for k in range(d):
                if k != where[vm.name]:
                    yield {**where, vm.name: k}
        for a, b in itertools.combinations(self.vms, 2):  # two VMs exchange domains
            da, db = where[a.name], where[b.name]
            if da != db and self.cls_of[a.name] != self.cls_of[b.name]:
                yield {**where, a.name: db, b.name: da}

    def climb(self, start: Whole) -> bool:
        """Hill-climb from ``start``; True when it ends at a local optimum, False on the budget."""
        here = self.ws(start)
        if here is None:
            return False
        where = start
        while True:
            best: tuple[float, Whole] | None = None
            for nb in self.neighbours(where):
                ws = self.ws(nb)
                if ws is None:
                    return False
                if ws > (best[0] if best else here) + 1e-12:
                    best = (ws, nb)
            if best is None:
                return True
            here, where = best


def _starts(case: StaticCase) -> list[Whole]:
    """Two whole-VM placements to climb from: the largest VMs first, each into the domain with
    the most PUs left; and first fit in domain order, each VM in scenario order (a static
    L3-aligned pinning). A VM that fits nowhere goes to the roomiest domain."""
    size = [len(dom) for dom in case.domains]

    def roomiest(left: list[int]) -> int:
        return max(range(len(left)), key=lambda k: (left[k], -k))

    spread: Whole = {}
    left = list(size)
    for vm in sorted(case.movable, key=lambda v: -v.vcpus):
        k = roomiest(left)
        spread[vm.name] = k
        left[k] -= vm.vcpus
    packed: Whole = {}
    left = list(size)
    for vm in case.movable:
        k = next((k for k in range(len(left)) if left[k] >= vm.vcpus), roomiest(left))
        packed[vm.name] = k
        left[k] -= vm.vcpus
    return [spread, packed]


def search_local(case: StaticCase, budget: int) -> BestPlacement | None:
    """The best whole-VM placement a local search finds within ``budget`` scored candidates
    (None with no budget to score one): a lower bound of the best, like the whole-VM search's,
    and not necessarily as high as it."""
    climb = _Climb(case, budget)
    # a start already met on the first climb is not climbed again; the budget stops them all
    optimum = all(climb.seen(start) or climb.climb(start) for start in _starts(case))
    if climb.tally.best is None:
        return None
    return climb.tally.result(LOCAL_METHOD, len(climb.tally.scored), candidate_count(case), optimum)


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


def search(case: StaticCase, budget: int, local: bool = True) -> BestPlacement | NotSearched:
    """The best placement by steady-state weighted speedup, or why no search was run.

    The full search where its count is within ``budget``; else the whole-VM search where that
    count is; else, with ``local``, the local search within ``budget`` (scaled down for
    scenarios of more than LOCAL_BUDGET_VCPUS vCPUs); else nothing.
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
    vcpus = sum(vm.vcpus for vm in case.scenario.vms)
    scaled = max(1, budget * LOCAL_BUDGET_VCPUS // max(vcpus, LOCAL_BUDGET_VCPUS))
    found = search_local(case, scaled) if local else None
    if found is not None:
        return found
    return NotSearched(
        f"{count_text(n)} candidates, {count_text(n_whole)} with whole VMs only: both more than the search "
        f"budget of {budget:,}",
        n,
        n_whole,
    )


def count_text(n: int) -> str:
    """A candidate count for people: digits up to a trillion, then a power of ten."""
    return f"{n:,}" if n < 10**12 else f"about 10^{len(str(n)) - 1}"
