"""``spread``: static round-robin over LLC domains, then cores, one PU per vCPU.

Each new vCPU goes to the LLC domain holding the fewest vCPUs (lowest index on ties), there to
the core holding the fewest, there to its lowest free PU: successive vCPUs land in successive
domains, and SMT siblings are used only once every core of a domain has one vCPU. Placed once
per vCPU and kept; see :mod:`policies.static` for departures and overcommit.
"""

from __future__ import annotations

from collections.abc import Iterable

from adaptive_pin.model import Guest, Topology
from policies.static import Occupancy, StaticPolicy, sibling_first_order


class SpreadPolicy(StaticPolicy):
    name = "spread"
    description = "static round-robin of vCPUs over LLC domains and cores, one PU each"

    def place(self, topology: Topology, guest: Guest, count: int, occ: Occupancy) -> list[int]:
        usable_order = [c for c in sibling_first_order(topology) if c in occ.usable]
        # LLC index -> its cores (as usable PU lists), in core order
        domains: dict[int, list[list[int]]] = {}
        for core in topology.cores:
            cpus = [c for c in core if c in occ.usable]
            if cpus:
                domains.setdefault(int(topology.pu_llc[topology.pu_pos(cpus[0])]), []).append(cpus)

        def load(cpus: Iterable[int]) -> int:
            return sum(occ.count[c] for c in cpus)

        # Per-domain vCPU and free-PU counts, kept up to date as PUs are taken: a rescan of
        # every PU per vCPU is O(vCPUs x PUs) (seconds at 2,048 vCPUs on 512 PUs).
        dom_load = {d: sum(load(k) for k in cores) for d, cores in domains.items()}
        dom_free = {d: sum(len(occ.free(k)) for k in cores) for d, cores in domains.items()}
        chosen: list[int] = []
        for _ in range(count):
            open_domains = [d for d in sorted(domains) if dom_free[d]]
            if not open_domains:
                chosen.append(occ.least_shared(usable_order))
                continue
            d = min(open_domains, key=lambda i: (dom_load[i], i))
            pick = min((k for k in domains[d] if occ.free(k)), key=lambda k: (load(k), k[0]))
            chosen.append(occ.take(occ.free(pick)[0]))
            dom_load[d] += 1
            dom_free[d] -= 1
        return chosen

    def reason(self, topology: Topology, cpu: int) -> str:
        return f"spread: round-robin over LLC domains and cores (CPU {cpu}, LLC {topology.llc_of(cpu).index})"
