"""``pack``: static first-fit in CPU order, SMT siblings first (OpenStack Nova's dedicated pinning).

What Nova does with ``hw:cpu_policy=dedicated`` and ``hw:cpu_thread_policy=prefer``: the guest
gets one host PU per vCPU, inside one host NUMA node when it fits there (Nova's default
single-node instance topology), and both siblings of a core are used before the next core.
Placed once per vCPU and kept; see :mod:`policies.static` for departures and overcommit.
"""

from __future__ import annotations

from adaptive_pin.model import Guest, Topology
from policies.static import Occupancy, StaticPolicy, sibling_first_order


class PackPolicy(StaticPolicy):
    name = "pack"
    description = "static first-fit, SMT siblings first, one NUMA node when it fits (Nova dedicated pinning)"

    def place(self, topology: Topology, guest: Guest, count: int, occ: Occupancy) -> list[int]:
        order = sibling_first_order(topology)
        chosen: list[int] = []
        for node_id in sorted(topology.numa_nodes):
            in_node = topology.numa_nodes[node_id].cpus
            free = occ.free([c for c in order if c in in_node])
            if len(free) >= count:
                chosen = free[:count]
                break
        else:
            chosen = occ.free(order)[:count]
        for cpu in chosen:
            occ.take(cpu)
        while len(chosen) < count:
            chosen.append(occ.least_shared(order))
        return chosen

    def reason(self, topology: Topology, cpu: int) -> str:
        core = topology.smt_siblings(cpu)
        return f"pack: first free PU in CPU order, siblings first (CPU {cpu} of core {core})"
