"""``uncore``: static L3-aligned first-fit (Kubernetes CPU manager, prefer-align-cpus-by-uncorecache).

Following the kubelet's static policy with that option (KEP-4800): a VM's vCPUs go into as few
LLC ("uncore cache") domains as possible -- whole free domains first while the VM needs at
least a domain's worth, then the first domain (in order) that fits the remainder, and only then
spread over domains in order. Inside a domain whole cores are taken first. Placed once per vCPU
and kept; see :mod:`policies.static` for departures and overcommit.
"""

from __future__ import annotations

from adaptive_pin.model import Guest, Topology
from policies.static import Occupancy, StaticPolicy, sibling_first_order


class UncorePolicy(StaticPolicy):
    name = "uncore"
    description = "static first-fit into as few LLC domains as possible (Kubernetes uncore-cache alignment)"

    def place(self, topology: Topology, guest: Guest, count: int, occ: Occupancy) -> list[int]:
        order = sibling_first_order(topology)
        domain_of = {c: i for i, d in enumerate(topology.llc) for c in d.cpus}
        domains: list[list[int]] = [[] for _ in topology.llc]
        for c in order:
            if c in domain_of:
                domains[domain_of[c]].append(c)
        chosen: list[int] = []

        def grab(cpus: list[int]) -> None:
            for cpu in cpus[: count - len(chosen)]:
                chosen.append(occ.take(cpu))

        # 1. whole free domains while the VM still needs at least a whole domain
        for cpus in domains:
            usable = [c for c in cpus if c in occ.usable]
            free = occ.free(cpus)
            if usable and len(free) == len(usable) and len(free) <= count - len(chosen):
                grab(free)
        # 2. the first domain that fits the remainder; 3. then any free PU, domain by domain
        if len(chosen) < count:
            need = count - len(chosen)
            fit = next((f for f in (occ.free(c) for c in domains) if len(f) >= need), None)
            grab(fit if fit is not None else [c for cpus in domains for c in occ.free(cpus)])
        while len(chosen) < count:
            chosen.append(occ.least_shared(order))
        return chosen

    def reason(self, topology: Topology, cpu: int) -> str:
        llc = topology.llc_of(cpu)
        return f"uncore: fewest LLC domains, first-fit (CPU {cpu} in LLC {llc.index} = {llc.cpus})"
