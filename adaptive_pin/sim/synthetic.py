"""A regular host Topology built without sysfs: for tests and for teaching scenarios.

Numbering follows Linux on Intel: all first hardware threads of every core, then the second
ones (cpu N and N + cores are SMT siblings). One NUMA node per package.
"""

from __future__ import annotations

import numpy as np

from adaptive_pin.model import CacheDomain, CpuSet, NumaNode, Topology


def synthetic_topology(
    *,
    packages: int = 1,
    llc_per_package: int = 1,
    cores_per_llc: int = 4,
    threads_per_core: int = 1,
    llc_mib: float = 16.0,
    remote_distance: int = 21,
    reserved: CpuSet = CpuSet(),
) -> Topology:
    n_cores = packages * llc_per_package * cores_per_llc
    n_pus = n_cores * threads_per_core
    pus = tuple(range(n_pus))
    core_of = np.array([p % n_cores for p in pus], dtype=np.int64)
    llc_of = core_of // cores_per_llc
    pkg_of = llc_of // llc_per_package
    cores = tuple(CpuSet(c + t * n_cores for t in range(threads_per_core)) for c in range(n_cores))
    packages_ = tuple(CpuSet(p for p in pus if pkg_of[p] == k) for k in range(packages))
    llc = tuple(
        CacheDomain(i, 3, CpuSet(p for p in pus if llc_of[p] == i), int(llc_mib * (1 << 20)), i)
        for i in range(packages * llc_per_package)
    )
    l2 = tuple(CacheDomain(i, 2, cores[i], 1 << 20, i) for i in range(n_cores))
    nodes = {
        k: NumaNode(
            id=k,
            cpus=packages_[k],
            memory_bytes=64 << 30,
            distances={m: 10 if m == k else remote_distance for m in range(packages)},
        )
        for k in range(packages)
    }
    return Topology(
        root="(synthetic)",
        pus=pus,
        offline=CpuSet(),
        cores=cores,
        packages=packages_,
        numa_nodes=nodes,
        l2=l2,
        l3=llc,
        llc=llc,
        llc_source="L3",
        isolated=CpuSet(),
        allowed=CpuSet(pus),
        reserved=reserved,
        pu_core=core_of,
        pu_package=pkg_of.astype(np.int64),
        pu_l2=core_of.copy(),
        pu_llc=llc_of.astype(np.int64),
        pu_node=pkg_of.astype(np.int64),
        notes=("synthetic host, not read from sysfs",),
    )
