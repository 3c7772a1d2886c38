"""``sticky-llc``: confine each floating vCPU to the LLC domain it last ran in.

The smallest useful policy: it freezes the scheduler's own choice of cache domain, no telemetry.
It shows the plug-in contract -- a class with ``name``, ``description``, ``initial_state`` and a
pure ``decide`` -- and reuses the helpers in :mod:`policies.base`.
"""

from __future__ import annotations

from adaptive_pin.model import Plan, Snapshot
from policies.base import Target, affinity_for, last_cpu, movable_vcpus, moves_from_targets, usable_cpus


class StickyLlcPolicy:
    name = "sticky-llc"
    description = "example plug-in: keep each vCPU in the LLC domain it last ran in"

    def __init__(self, granularity: str = "llc") -> None:
        if granularity not in ("llc", "node"):
            raise ValueError("granularity must be llc or node")
        self.granularity = granularity

    def initial_state(self) -> object:
        return None  # stateless: nothing to persist

    def decide(self, snapshot: Snapshot, state: object) -> tuple[Plan, object]:
        usable = usable_cpus(snapshot)
        targets = []
        for guest, vcpu in movable_vcpus(snapshot):
            cpu = last_cpu(snapshot, guest, vcpu)
            if cpu is None or cpu not in usable:
                continue
            cpus = affinity_for(snapshot.topology, cpu, self.granularity, usable)
            if not vcpu.affinity <= cpus:  # already inside its domain: leave it
                why = f"sticky-llc: stay in the {self.granularity} of CPU {cpu}, where it last ran"
                targets.append(Target(guest, vcpu, cpus, why, 0.0, "initial"))
        return Plan(policy=self.name, moves=moves_from_targets(targets)), None
