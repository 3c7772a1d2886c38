"""Builders for policy tests: synthetic topologies, guests, snapshots, and applying a plan.

Real machines come from the repository's topology fixtures (``real_topology``); synthetic ones
let a test say exactly "2 LLC domains of 4 cores x 2 threads".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from functools import cache

import numpy as np

from adaptive_pin.model import (
    CacheDomain,
    CpuSet,
    Guest,
    NumaNode,
    Pinnability,
    PinSource,
    Plan,
    Snapshot,
    Topology,
    VCpu,
    VCpuKey,
    VCpuRates,
)

NO_PMU = {"llc_misses": "no PMU: perf_event_open(cache-misses) = ENOENT", "instructions": "no PMU"}


def make_topology(
    *,
    packages: int = 1,
    llcs_per_package: int = 2,
    cores_per_llc: int = 4,
    threads: int = 2,
    nodes_per_package: int = 1,
    llc_bytes: int | None = 8 << 20,
    reserved: Iterable[int] = (),
    isolated: Iterable[int] = (),
    disallowed: Iterable[int] = (),
) -> Topology:
    """A regular host, CPUs numbered like Linux on Intel: thread t of core c is c + t * cores."""
    n_cores = packages * llcs_per_package * cores_per_llc
    cpu = [[c + t * n_cores for t in range(threads)] for c in range(n_cores)]
    pus = tuple(sorted(x for core in cpu for x in core))
    npu = len(pus)
    pos = {p: i for i, p in enumerate(pus)}
    cores = tuple(CpuSet(core) for core in cpu)
    per_pkg = llcs_per_package * cores_per_llc
    llc_of_core = [c // cores_per_llc for c in range(n_cores)]
    pkg_of_core = [c // per_pkg for c in range(n_cores)]
    llcs_per_node = max(1, llcs_per_package // nodes_per_package)
    node_of_core = [llc_of_core[c] // llcs_per_node for c in range(n_cores)]
    n_llc = packages * llcs_per_package
    llc = tuple(
        CacheDomain(i, 3, CpuSet(x for c in range(n_cores) if llc_of_core[c] == i for x in cpu[c]), llc_bytes)
        for i in range(n_llc)
    )
    n_nodes = max(node_of_core) + 1
    node_cpus = [
        CpuSet(x for c in range(n_cores) if node_of_core[c] == n for x in cpu[c]) for n in range(n_nodes)
    ]
    numa = {
        n: NumaNode(
            n,
            node_cpus[n],
            None,
            {
                m: 10 if m == n else (16 if m // nodes_per_package == n // nodes_per_package else 21)
                for m in range(n_nodes)
            },
        )
        for n in range(n_nodes)
    }
    arrays = {name: np.zeros(npu, dtype=np.int64) for name in ("core", "package", "l2", "llc", "node")}
    for c in range(n_cores):
        for x in cpu[c]:
            i = pos[x]
            arrays["core"][i] = c
            arrays["package"][i] = pkg_of_core[c]
            arrays["l2"][i] = c
            arrays["llc"][i] = llc_of_core[c]
            arrays["node"][i] = node_of_core[c]
    online = CpuSet(pus)
    return Topology(
        root="synthetic",
        pus=pus,
        offline=CpuSet(),
        cores=cores,
        packages=tuple(
            CpuSet(x for c in range(n_cores) if pkg_of_core[c] == p for x in cpu[c]) for p in range(packages)
        ),
        numa_nodes=numa,
        l2=tuple(CacheDomain(c, 2, cores[c]) for c in range(n_cores)),
        l3=llc,
        llc=llc,
        llc_source="L3",
        isolated=CpuSet(isolated),
        allowed=online - CpuSet(disallowed),
        reserved=CpuSet(reserved),
        pu_core=arrays["core"],
        pu_package=arrays["package"],
        pu_l2=arrays["l2"],
        pu_llc=arrays["llc"],
        pu_node=arrays["node"],
    )


REAL_TOPOLOGIES = (
    "32intel64-2p8co2t+8ve",  # 2 sockets, SMT, 2 LLC
    "64amd64-4s2n4ca2co",  # 4 sockets, 8 LLC domains, 8 NUMA nodes
    "16amd64-8n2c-cpusets",  # no L3, cgroup-restricted, an offline CPU
    "32amd64-4s2n4c-cgroup2",  # cgroup allows only 0-5
    "offline-cpu0-node0",  # CPUs in no NUMA node
    "nvidiagpunumanodes",  # SMT4, CPU-less nodes, sparse CPU numbers
)


@cache
def real_topology(name: str) -> Topology:
    from adaptive_pin.fixtures import fixture_root
    from adaptive_pin.topology import read_topology

    return read_topology(fixture_root(name))


def guest(
    gid: str,
    affinities: Sequence[CpuSet],
    *,
    managed: bool = True,
    whole_cores: bool = False,
    orchestrator_pinned: bool = False,
    problem: str | None = None,
    tids: Sequence[int | None] | None = None,
    last_cpus: Sequence[int | None] | None = None,
    memory_nodes: CpuSet | None = None,
) -> Guest:
    vcpus = tuple(
        VCpu(
            index=i,
            tid=(tids[i] if tids is not None else 1000 + i),
            affinity=aff,
            last_cpu=(last_cpus[i] if last_cpus is not None else (aff.first() if aff else None)),
        )
        for i, aff in enumerate(affinities)
    )
    source = PinSource.ORCHESTRATOR if orchestrator_pinned else PinSource.DEFAULT
    return Guest(
        id=gid,
        name=f"vm-{gid}",
        pid=4000,
        vcpus=vcpus,
        pinnability=Pinnability(managed=managed, source=source, whole_cores=whole_cores),
        driver="test",
        memory_nodes=memory_nodes,
        orchestrator_pinned=orchestrator_pinned,
        problem=problem,
    )


def rates(util: float, misses: float | None = None, last_cpu: int | None = None) -> VCpuRates:
    mpki = None if misses is None else misses / 2e9 * 1000 / max(util, 1e-3)
    return VCpuRates(
        llc_misses_per_s=misses,
        instructions_per_s=None if misses is None else 2e9 * util,
        mpki=mpki,
        utilization=util,
        run_delay=0.0,
        last_cpu=last_cpu,
    )


def snapshot(
    topology: Topology,
    guests: Sequence[Guest],
    vcpu_rates: Mapping[VCpuKey, VCpuRates] | None = None,
    *,
    time: float = 1000.0,
    pmu: bool = True,
    taken: CpuSet | None = None,
    bad: frozenset[tuple[VCpuKey, CpuSet]] = frozenset(),
) -> Snapshot:
    if taken is None:
        taken = CpuSet()
        for g in guests:
            if g.orchestrator_pinned:
                for v in g.vcpus:
                    taken = taken | v.affinity
        taken = taken & topology.online
    return Snapshot(
        time=time,
        topology=topology,
        guests=tuple(guests),
        rates=dict(vcpu_rates or {}),
        capabilities={} if pmu else dict(NO_PMU),
        taken=taken,
        bad_placements=bad,
    )


def apply_plan(snap: Snapshot, plan: Plan, *, time_step: float = 5.0) -> Snapshot:
    """The next snapshot as if every move had been applied (and each vCPU ran on its first CPU)."""
    by_key = {m.key: m for m in plan.moves}
    guests = []
    new_rates = dict(snap.rates)
    for g in snap.guests:
        vcpus = []
        for v in g.vcpus:
            m = by_key.get((g.id, v.index))
            if m is None:
                vcpus.append(v)
                continue
            vcpus.append(replace(v, affinity=m.to_cpus, last_cpu=m.to_cpus.first()))
            r = new_rates.get((g.id, v.index))
            if r is not None:
                new_rates[(g.id, v.index)] = replace(r, last_cpu=m.to_cpus.first())
        guests.append(replace(g, vcpus=tuple(vcpus)))
    return replace(snap, guests=tuple(guests), rates=new_rates, time=snap.time + time_step)


def llc_of(topology: Topology, cpus: CpuSet) -> set[int]:
    return {topology.llc_of(c).index for c in cpus}
