"""``none``: leave placement to the kernel scheduler.

Never proposes a move. vCPUs someone already pinned stay pinned: giving back the affinity
adaptive-pin found at start-up is the controller's job (``restore``), not a policy's.
"""

from __future__ import annotations

from adaptive_pin.model import Plan, Snapshot


class NonePolicy:
    name = "none"
    description = "never move anything: the kernel scheduler places vCPUs (the baseline)"

    def initial_state(self) -> object:
        return None

    def decide(self, snapshot: Snapshot, state: object) -> tuple[Plan, object]:
        return Plan(policy=self.name, notes=("policy none: placement left to the kernel scheduler",)), None
