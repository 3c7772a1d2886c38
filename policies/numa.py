"""``numa``: numad-like -- each busy VM, whole, to the least-loaded NUMA node(s) that fit it.

Follows numad (Bill Gray, Red Hat; numad.c version 20150602, and numad(8)) with its defaults:

- a process is a candidate when it uses more than half a CPU (``CPU_THRESHOLD 50`` percent)
  and more than 300 MB (``MEMORY_THRESHOLD``). The Guest model carries no memory size, and a
  VM's resident memory practically always exceeds 300 MB, so every VM is taken to pass that test;
- its CPU use is the largest of its last 8 samples (numad's ``RING_BUF_SIZE`` ring buffer);
- it asks for ``CPUs_used / 85 %`` (``DEFAULT_UTILIZATION_PERCENT``), at most one CPU per vCPU;
- nodes are taken best first (most free CPU; among equals the nodes already holding the VM's
  memory, then the lowest id), the next ones nearest to the first by SLIT distance, until the
  request fits -- numad's ``pick_numa_nodes`` ranks by free CPU x free memory, and memory is
  not modelled here;
- a VM bound less than 300 s ago (``MIN_DELAY_FOR_REEVALUATION``, measured on
  ``snapshot.time``) is not re-evaluated. numad's early re-evaluation of VMs on the busiest node
  is not reproduced.

Every vCPU of the VM gets the CPUs of the chosen nodes (node granularity): the scheduler
balances inside. Its memory then follows to those nodes (numad's
``bind_process_and_migrate_memory``: migrate_pages(2) after sched_setaffinity), unless the VM
binds its memory itself; ``migrate_memory=False`` turns that off. ``predicted_gain`` is 1.0 for
every move: numad does not estimate one.

State (JSON)::

    {"version": 1, "guests": {"<id>": {"nodes": [0, 1], "bound_at": 1234.5, "cpu": [0.9, ...]}}}
"""

from __future__ import annotations

from collections import defaultdict

from adaptive_pin.model import CpuSet, Guest, MemoryMove, Plan, Snapshot, VCpu
from policies.base import (
    Target,
    last_cpu,
    memory_move,
    movable_vcpus,
    moves_from_targets,
    rates_of,
    usable_cpus,
    utilization,
    versioned_state,
)

STATE_VERSION = 1
RING = 8
LOCAL_DISTANCE = 10  # SLIT: a node's distance to itself


class NumaPolicy:
    name = "numa"
    description = "numad-like: each busy VM whole to the least-loaded NUMA node(s) that fit it, every 5 min"

    def __init__(
        self,
        cpu_threshold: float = 0.5,
        target_utilization: float = 0.85,
        reevaluate_s: float = 300.0,
        migrate_memory: bool = True,
    ) -> None:
        if not 0 < target_utilization <= 1:
            raise ValueError("target_utilization must be in (0, 1]")
        if cpu_threshold < 0 or reevaluate_s < 0:
            raise ValueError("cpu_threshold and reevaluate_s must be >= 0")
        self.cpu_threshold = cpu_threshold
        self.target_utilization = target_utilization
        self.reevaluate_s = reevaluate_s
        self.migrate_memory = migrate_memory

    def initial_state(self) -> object:
        return {"version": STATE_VERSION, "guests": {}}

    def decide(self, snapshot: Snapshot, state: object) -> tuple[Plan, object]:
        old = versioned_state(state, STATE_VERSION)
        old_guests = old.get("guests", {}) if old else {}
        if not isinstance(old_guests, dict):
            old_guests = {}
        topo = snapshot.topology
        usable = usable_cpus(snapshot)
        node_cpus = {n: node.cpus & usable for n, node in topo.numa_nodes.items()}
        node_cpus = {n: c for n, c in node_cpus.items() if c}

        by_guest: dict[str, tuple[Guest, list[VCpu]]] = {}
        for guest, vcpu in movable_vcpus(snapshot):
            by_guest.setdefault(guest.id, (guest, []))[1].append(vcpu)

        # CPU in use per node by everything we can see (movable or not), where it last ran.
        online = topo.online
        used: defaultdict[int, float] = defaultdict(float)
        demand: dict[str, float] = {}
        for guest in snapshot.guests:
            total = 0.0
            for v in guest.vcpus:
                u = utilization(rates_of(snapshot, guest, v)) or 0.0
                total += u
                cpu = last_cpu(snapshot, guest, v, online)
                node = topo.node_of(cpu) if cpu is not None else None
                if node is not None:
                    used[node] += u
            demand[guest.id] = total

        new_guests: dict[str, dict[str, object]] = {}
        targets: list[Target] = []
        memory: list[MemoryMove] = []
        notes: list[str] = ["numa: VM memory size unknown, every VM taken to exceed numad's 300 MB"]
        for gid in sorted(by_guest):
            guest, vcpus = by_guest[gid]
            prev = old_guests.get(gid)
            prev = prev if isinstance(prev, dict) else {}
            ring = [float(x) for x in prev.get("cpu", []) if isinstance(x, int | float)][-(RING - 1) :]
            ring.append(demand[gid])
            entry: dict[str, object] = {"cpu": ring}
            nodes = [n for n in prev.get("nodes", []) if isinstance(n, int) and n in node_cpus]
            bound_at = prev.get("bound_at")
            bound_at = float(bound_at) if isinstance(bound_at, int | float) else None
            cpus_used = max(ring)
            due = bound_at is None or snapshot.time - bound_at >= self.reevaluate_s
            if cpus_used > self.cpu_threshold and due and node_cpus:
                request = min(cpus_used / self.target_utilization, float(len(vcpus)))
                mine = self._vm_use_by_node(snapshot, guest)
                free = {n: len(c) - (used[n] - mine.get(n, 0.0)) for n, c in node_cpus.items()}
                picked = self._pick_nodes(snapshot, guest, free, request)
                nodes, bound_at = picked, snapshot.time
                # Later VMs in this pass see this one where it is going, not where it was.
                for n, x in mine.items():
                    used[n] -= x
                for n in picked:
                    used[n] += demand[gid] / len(picked)
            if nodes:
                entry["nodes"], entry["bound_at"] = nodes, bound_at
                cpus = _union(node_cpus, nodes)
                why = (
                    f"numa: VM uses {cpus_used:.2f} CPUs; bound to node(s) {','.join(map(str, nodes))}"
                    f" with the most free CPU"
                )
                targets.extend(Target(guest, v, cpus, why, 1.0, "initial") for v in vcpus)
                if self.migrate_memory:
                    follow = f"numa: memory follows its vCPUs to node(s) {','.join(map(str, nodes))}"
                    mm = memory_move(guest, CpuSet(nodes), follow, 1.0)
                    if mm is not None:
                        memory.append(mm)
            new_guests[gid] = entry
        moves = moves_from_targets(targets)
        plan = Plan(policy=self.name, moves=moves, memory_moves=tuple(memory), notes=tuple(notes))
        return plan, {"version": STATE_VERSION, "guests": new_guests}

    @staticmethod
    def _vm_use_by_node(snapshot: Snapshot, guest: Guest) -> dict[int, float]:
        out: defaultdict[int, float] = defaultdict(float)
        online = snapshot.topology.online
        for v in guest.vcpus:
            cpu = last_cpu(snapshot, guest, v, online)
            node = snapshot.topology.node_of(cpu) if cpu is not None else None
            if node is not None:
                out[node] += utilization(rates_of(snapshot, guest, v)) or 0.0
        return out

    @staticmethod
    def _pick_nodes(snapshot: Snapshot, guest: Guest, free: dict[int, float], request: float) -> list[int]:
        topo = snapshot.topology
        mem = guest.memory_nodes or CpuSet()
        first = min(free, key=lambda n: (-free[n], n not in mem, n))
        dist = topo.numa_nodes[first].distances

        def distance(n: int) -> int:
            return dist.get(n, LOCAL_DISTANCE if n == first else 2 * LOCAL_DISTANCE)

        order = [first, *sorted((n for n in free if n != first), key=lambda n: (distance(n), -free[n], n))]
        picked: list[int] = []
        need = request
        for n in order:
            picked.append(n)
            need -= max(free[n], 0.0)
            if need <= 0:
                break
        return sorted(picked)


def _union(node_cpus: dict[int, CpuSet], nodes: list[int]) -> CpuSet:
    out = CpuSet()
    for n in nodes:
        out = out | node_cpus[n]
    return out
