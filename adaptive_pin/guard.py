"""The guard between a policy's plan and the actuator: hysteresis, cooldowns, budget.

Policies propose; the guard decides what is allowed to happen now. It is what keeps the
controller from thrashing when a policy (or its input) is noisy. The controller tells the
policy what the cooldown and the return window hold this tick (``cooling``, ``barred``:
``Snapshot.frozen``, ``Snapshot.barred``), so a plan can be made of moves that may happen:

- a move must be proposed with the same target for ``hold_ticks`` consecutive ticks
  (first placements of a vCPU the controller never touched skip this: nothing to ping-pong);
- a vCPU moved less than ``cooldown_s`` ago is not moved again, unless the move gathers its
  VM: every vCPU of a VM now placed over several LLC domains (or NUMA nodes) ends up in one.
  A first placement on a full host splits a VM; when room appears (a VM left) it is brought
  together at once, not a minute later. Gathering cannot ping-pong: splitting again is not a
  gather and waits out the cooldown, and the return window still applies;
- a vCPU is never sent back to a CPU set it left less than ``return_window_s`` ago
  (A -> B -> A), nor to a placement that was rolled back recently;
- at most ``budget_per_tick`` migrations a tick, largest predicted gain first (first
  placements do not count: many VMs arriving at once are placed in one tick, not a few a tick);
- a plan's moves of one VM, and of VMs it swaps with (``Move.group``), happen together or not
  at all: when one is held back so are the others, and the budget takes whole groups (one
  larger than the budget goes alone). Half a swap is a VM moved onto one that stayed, and a
  VM half moved is split; the policy's gain assumed all of it;
- a move whose predicted gain is below ``min_gain`` is dropped;
- never onto CPUs that are not usable now (offline, reserved, isolated, disallowed, taken).

A VM's memory migration (:class:`~adaptive_pin.model.MemoryMove`) has its own rules: not within
``cooldown_s`` of its last one, never back to the nodes it left less than ``return_window_s``
ago, at most ``memory_budget_per_tick`` VMs a tick (each copies its whole resident memory).
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, field

import numpy as np

from adaptive_pin.model import CpuSet, MemoryMove, Move, Plan, Snapshot, VCpuKey

STANDALONE_KINDS = frozenset({"refit", "rollback"})  # corrections: never held by a sibling
ALREADY_THERE = "already there"  # a no-op: it holds nothing back


@dataclass(frozen=True)
class GuardSettings:
    hold_ticks: int = 2
    cooldown_s: float = 60.0
    return_window_s: float = 300.0
    budget_per_tick: int = 16
    min_gain: float = 0.0
    memory_budget_per_tick: int = 2

    def validate(self) -> None:
        if self.hold_ticks < 1:
            raise ValueError("hold_ticks must be >= 1")
        if self.budget_per_tick < 1:
            raise ValueError("budget_per_tick must be >= 1")
        if self.memory_budget_per_tick < 0:
            raise ValueError("memory_budget_per_tick must be >= 0")
        if self.cooldown_s < 0 or self.return_window_s < 0:
            raise ValueError("cooldown_s and return_window_s must be >= 0")


@dataclass
class _History:
    """What the guard remembers of one vCPU."""

    proposed_to: CpuSet | None = None
    proposed_ticks: int = 0
    last_moved: float | None = None
    left: dict[CpuSet, float] = field(default_factory=dict)  # CPU set -> when the vCPU left it

    def moved(self, away_from: CpuSet, now: float, window_s: float) -> None:
        """It moved now, away from ``away_from``; what it left before ``window_s`` is forgotten."""
        self.last_moved = now
        self.left[away_from] = now
        self.left = {where: t for where, t in self.left.items() if t >= now - window_s}

    # The state file's form of it (a vCPU's and a VM's memory alike; the hold streak is not kept).
    def export(self) -> dict[str, object]:
        return {"last_moved": self.last_moved, "left": {where.to_list(): t for where, t in self.left.items()}}

    @classmethod
    def imported(cls, entry: dict[str, object]) -> _History:
        last = entry.get("last_moved")
        left = entry.get("left", {})
        h = cls(last_moved=float(last) if isinstance(last, int | float) else None)
        if isinstance(left, dict):
            h.left = {CpuSet.parse(k): float(v) for k, v in left.items()}
        return h


@dataclass(frozen=True)
class GuardResult:
    accepted: tuple[Move, ...]
    refused: tuple[tuple[Move, str], ...]


class Guard:
    def __init__(self, settings: GuardSettings) -> None:
        settings.validate()
        self.settings = settings
        self._history: dict[VCpuKey, _History] = {}
        self._memory: dict[str, _History] = {}  # guest id -> its memory migrations (nodes as CpuSet)

    # --- persistence (the daemon's state file) --------------------------------------
    def export_state(self) -> dict[str, dict[str, object]]:
        """The vCPU history, by ``<guest id>/<vCPU>``."""
        return {
            f"{gid}/{idx}": h.export() for (gid, idx), h in self._history.items() if h.last_moved is not None
        }

    def import_state(self, data: dict[str, dict[str, object]]) -> None:
        for name, entry in data.items():
            gid, _, idx = name.rpartition("/")
            self._history[(gid, int(idx))] = _History.imported(entry)

    def export_memory_state(self) -> dict[str, dict[str, object]]:
        """The memory-migration history, by guest id (nodes as a node list)."""
        return {gid: h.export() for gid, h in self._memory.items() if h.last_moved is not None}

    def import_memory_state(self, data: dict[str, dict[str, object]]) -> None:
        for gid, entry in data.items():
            self._memory[gid] = _History.imported(entry)

    # --- the check ------------------------------------------------------------------
    def filter(self, plan: Plan, snapshot: Snapshot, *, one_shot: bool = False) -> GuardResult:
        """Split a plan into moves allowed now and moves held back (with the reason).

        ``one_shot`` (``adaptive-pin apply``): the operator asked for this tick explicitly,
        so the hold-for-K-ticks rule does not apply; everything else does.
        """
        s = self.settings
        now = snapshot.time
        usable = snapshot.topology.usable - snapshot.taken
        proposed_keys = {m.key for m in plan.moves}
        # A vCPU no longer proposed loses its streak: the condition must hold consecutively.
        for key, h in self._history.items():
            if key not in proposed_keys:
                h.proposed_to, h.proposed_ticks = None, 0

        candidates: list[Move] = []
        refused: list[tuple[Move, str]] = []
        gathering = _gathering(plan, snapshot)
        for move in plan.moves:
            h = self._history.setdefault(move.key, _History())
            if h.proposed_to == move.to_cpus:
                h.proposed_ticks += 1
            else:
                h.proposed_to, h.proposed_ticks = move.to_cpus, 1
            reason = self._refusal(move, h, snapshot, usable, now, one_shot, move.guest_id in gathering)
            if reason:
                refused.append((move, reason))
            else:
                candidates.append(move)

        groups, held = _whole_groups(candidates, refused)
        refused.extend(held)
        accepted: list[Move] = []
        spent = 0
        for group in groups:
            cost = sum(1 for m in group if not self._first_placement(m))
            # A group larger than the whole budget goes alone in a tick: split, it would be worse.
            if cost and spent + cost > s.budget_per_tick and spent:
                why = f"migration budget of {s.budget_per_tick} per tick used up"
                refused.extend((m, why) for m in group)
                continue
            spent += cost
            accepted.extend(group)
        accepted.sort(key=lambda m: (-m.predicted_gain, m.guest_id, m.vcpu))
        return GuardResult(tuple(accepted), tuple(refused))

    # The two rules a policy is told of (below) and the checks in _refusal read the same predicates.
    def _cooling(self, h: _History, at: float) -> bool:
        return h.last_moved is not None and at - h.last_moved < self.settings.cooldown_s

    def _returning(self, left_at: float, at: float) -> bool:
        return at - left_at < self.settings.return_window_s

    def cooling(self, at: float) -> frozenset[VCpuKey]:
        """The vCPUs still in their cooldown at time ``at`` (``Snapshot.frozen``)."""
        return frozenset(key for key, h in self._history.items() if self._cooling(h, at))

    def barred(self, at: float) -> frozenset[tuple[VCpuKey, CpuSet]]:
        """The CPU sets each vCPU may still not go back to at time ``at`` (``Snapshot.barred``)."""
        left = ((key, where, t) for key, h in self._history.items() for where, t in h.left.items())
        return frozenset((key, where) for key, where, t in left if self._returning(t, at))

    def _first_placement(self, move: Move) -> bool:
        """A first placement of a vCPU the controller never moved: nothing to ping-pong."""
        h = self._history.get(move.key)
        return move.kind == "initial" and (h is None or h.last_moved is None)

    def _refusal(
        self,
        move: Move,
        h: _History,
        snapshot: Snapshot,
        usable: CpuSet,
        now: float,
        one_shot: bool,
        gathers: bool = False,
    ) -> str | None:
        s = self.settings
        if not move.to_cpus:
            return "empty target CPU set"
        if not move.to_cpus <= usable:
            bad = move.to_cpus - usable
            return f"target names CPUs that are not usable now: {bad.to_list()}"
        if move.to_cpus == move.from_cpus:
            return ALREADY_THERE
        if (move.key, move.to_cpus) in snapshot.bad_placements:
            return "this placement was rolled back recently"
        if move.predicted_gain < s.min_gain:
            return f"predicted gain {move.predicted_gain:.3g} below minimum {s.min_gain:.3g}"
        if self._cooling(h, now) and not gathers:
            assert h.last_moved is not None
            return f"cooling down: moved {now - h.last_moved:.0f}s ago (cooldown {s.cooldown_s:.0f}s)"
        left_at = h.left.get(move.to_cpus)
        if left_at is not None and self._returning(left_at, now):
            return f"would move back to {move.to_cpus.to_list()} left {now - left_at:.0f}s ago"
        first_placement = self._first_placement(move)
        if not (one_shot or first_placement) and h.proposed_ticks < s.hold_ticks:
            return f"proposed {h.proposed_ticks} of {s.hold_ticks} consecutive ticks"
        return None

    def record_move(self, move: Move, now: float) -> None:
        """Called for every move actually applied (rollbacks included)."""
        h = self._history.setdefault(move.key, _History())
        h.moved(move.from_cpus, now, self.settings.return_window_s)
        h.proposed_to, h.proposed_ticks = None, 0

    def forget(self, live: set[VCpuKey]) -> None:
        """Drop the history of vCPUs whose VM is gone (bounded memory under churn)."""
        for key in [k for k in self._history if k not in live]:
            del self._history[key]
        guests = {gid for gid, _ in live}
        for gid in [g for g in self._memory if g not in guests]:
            del self._memory[gid]

    # --- memory migrations ----------------------------------------------------------
    def memory_refusal(self, move: MemoryMove, now: float, used: int) -> str | None:
        """Why ``move`` may not happen now (``used``: memory migrations already made this tick)."""
        s = self.settings
        if move.predicted_gain < s.min_gain:
            return f"predicted gain {move.predicted_gain:.3g} below minimum {s.min_gain:.3g}"
        h = self._memory.get(move.guest_id)
        if h is not None and h.last_moved is not None and now - h.last_moved < s.cooldown_s:
            return f"memory migrated {now - h.last_moved:.0f}s ago (cooldown {s.cooldown_s:.0f}s)"
        left_at = h.left.get(move.to_nodes) if h is not None else None
        if left_at is not None and now - left_at < s.return_window_s:
            back = move.to_nodes.to_list()
            return f"memory would go back to node(s) {back} it left {now - left_at:.0f}s ago"
        if used >= s.memory_budget_per_tick:
            return f"memory migration budget of {s.memory_budget_per_tick} VMs per tick used up"
        return None

    def record_memory_move(self, move: MemoryMove, now: float) -> None:
        self._memory.setdefault(move.guest_id, _History()).moved(
            move.from_nodes, now, self.settings.return_window_s
        )


def _whole_groups(
    candidates: list[Move], refused: list[tuple[Move, str]]
) -> tuple[list[list[Move]], list[tuple[Move, str]]]:
    """The candidates as groups applied together or not at all (see ``Move.group``), largest
    predicted gain first, and the candidates held back because a move of their group was.

    One group: every move of one VM in the plan, and of every VM linked to it by a shared
    ``group`` (two VMs swapping domains); refits and rollbacks stand alone. Half a group
    would leave a VM split, or one VM of a swap where the other still is, and the policy's
    predicted gain assumed all of it.
    """
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def node(m: Move) -> str:
        return f"move {m.guest_id}/{m.vcpu}" if m.kind in STANDALONE_KINDS else f"vm {m.guest_id}"

    for m in [*candidates, *(m for m, _ in refused)]:
        if m.group and m.kind not in STANDALONE_KINDS:
            parent[find(node(m))] = find(f"group {m.group}")
    blocked: dict[str, str] = {}  # group -> why it is held back
    for m, why in refused:
        if m.kind not in STANDALONE_KINDS and why != ALREADY_THERE:
            blocked.setdefault(find(node(m)), f"goes with {m.guest_name} vCPU {m.vcpu}, held back: {why}")
    groups: dict[str, list[Move]] = {}
    held: list[tuple[Move, str]] = []
    for m in candidates:
        root = find(node(m))
        if root in blocked:
            held.append((m, blocked[root]))
        else:
            groups.setdefault(root, []).append(m)
    ordered = sorted(
        groups.values(),
        key=lambda g: (-max(m.predicted_gain for m in g), min((m.guest_id, m.vcpu) for m in g)),
    )
    return [sorted(g, key=lambda m: (-m.predicted_gain, m.guest_id, m.vcpu)) for g in ordered], held


def _gathering(plan: Plan, snapshot: Snapshot) -> set[str]:
    """Guests the plan brings together: each vCPU now placed within one node, the VM over
    several LLC domains or nodes; after the plan, all of it in one LLC domain or one node.

    Runs every tick over every guest with a move: a floating vCPU (wider than any node) rules
    its VM out before any per-CPU work."""
    if not plan.moves:
        return set()
    topo = snapshot.topology
    widest = max((len(n.cpus) for n in topo.numa_nodes.values()), default=len(topo.pus))

    def reach(cpus: CpuSet) -> tuple[int, int]:
        """(LLC domains, NUMA nodes) the CPU set reaches; CPUs in no node count as one."""
        pos = topo.positions(cpus)
        return len(np.unique(topo.pu_llc[pos])), len(np.unique(topo.pu_node[pos]))

    by_guest: dict[str, dict[int, CpuSet]] = {}
    for m in plan.moves:
        by_guest.setdefault(m.guest_id, {})[m.vcpu] = m.to_cpus
    out: set[str] = set()
    for g in snapshot.guests:
        moved = by_guest.get(g.id)
        if not moved or not g.vcpus or any(len(v.affinity) > widest for v in g.vcpus):
            continue
        if any(reach(v.affinity)[1] != 1 for v in g.vcpus):
            continue
        llcs, nodes = reach(functools.reduce(operator.or_, (v.affinity for v in g.vcpus)))
        after = functools.reduce(operator.or_, (moved.get(v.index, v.affinity) for v in g.vcpus))
        llcs_after, nodes_after = reach(after)
        if (llcs > 1 and llcs_after == 1) or (nodes > 1 and nodes_after == 1):
            out.add(g.id)
    return out
