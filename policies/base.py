"""The Policy protocol and the helpers every built-in policy shares.

A policy is a pure function of a :class:`~adaptive_pin.model.Snapshot` and its own remembered
state: no I/O, no clocks (``snapshot.time`` is the clock), no randomness. It proposes; the
controller's guard decides what actually happens (hold ticks, cooldowns, budget, min gain).

State rule (the daemon persists it across restarts): ``initial_state()`` and ``decide()`` return
plain JSON values only -- dict (str keys), list, str, int, float, bool, None. The controller
writes it with ``json.dumps`` and hands back ``json.loads`` of that text, so a policy must give
the same plan for a state and its JSON round trip (no tuples-as-keys, no int keys), must never
mutate the state it is given (build a new one), and must treat a state it cannot read as its
initial state rather than fail. :func:`state_to_json` / :func:`state_from_json` do the round
trip for callers that want it spelled out.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol, get_args, runtime_checkable

from adaptive_pin.model import CpuSet, Guest, MemoryMove, Move, Plan, Snapshot, Topology, VCpu, VCpuRates

JsonValue = dict[str, "JsonValue"] | list["JsonValue"] | str | int | float | bool | None

Granularity = Literal["pu", "core", "llc", "node"]
GRANULARITIES: tuple[str, ...] = get_args(Granularity)


@runtime_checkable
class Policy(Protocol):
    name: str
    description: str  # one line, for --help and `adaptive-pin plan --list-policies`

    def initial_state(self) -> object: ...

    def decide(self, snapshot: Snapshot, state: object) -> tuple[Plan, object]: ...


# --------------------------------------------------------------------------------------
# State persistence
# --------------------------------------------------------------------------------------


def state_to_json(state: object) -> str:
    """The persisted spelling of a policy state; raises TypeError if it breaks the state rule."""
    return json.dumps(state, sort_keys=True, allow_nan=False)


def state_from_json(policy: Policy, text: str | None) -> object:
    """A state read back from disk; the policy's initial state when there is none or it is unreadable."""
    if not text:
        return policy.initial_state()
    try:
        value: object = json.loads(text)
    except ValueError:
        return policy.initial_state()
    return value


def versioned_state(state: object, version: int) -> dict[str, object] | None:
    """``state`` when it is a dict written by this ``version`` of a policy, else None."""
    if isinstance(state, dict) and state.get("version") == version:
        return state
    return None


# --------------------------------------------------------------------------------------
# Who may be moved, and where to
# --------------------------------------------------------------------------------------


def usable_cpus(snapshot: Snapshot) -> CpuSet:
    """Where any vCPU may go: online, cgroup-allowed, not isolated/reserved, not taken."""
    return snapshot.topology.usable - snapshot.taken


def is_movable(guest: Guest) -> bool:
    """A VM whose vCPUs this controller may pin: managed, not pinned by an orchestrator, sound."""
    p = guest.pinnability
    return p.managed and not guest.orchestrator_pinned and not guest.problem


def movable_vcpus(snapshot: Snapshot) -> Iterator[tuple[Guest, VCpu]]:
    """(guest, vCPU) for every vCPU a policy may move, in a stable order (guest id, vCPU index)."""
    for guest in sorted(snapshot.guests, key=lambda g: g.id):
        if not is_movable(guest):
            continue
        for vcpu in sorted(guest.vcpus, key=lambda v: v.index):
            if vcpu.tid is not None:
                yield guest, vcpu


def rates_of(snapshot: Snapshot, guest: Guest, vcpu: VCpu) -> VCpuRates | None:
    return snapshot.rates.get((guest.id, vcpu.index))


def last_cpu(snapshot: Snapshot, guest: Guest, vcpu: VCpu, online: CpuSet | None = None) -> int | None:
    """Where the vCPU ran last (the collector's reading first, then the driver's), if online.

    Pass ``online`` (``topology.online``) when calling in a loop: building it costs O(PUs).
    """
    r = rates_of(snapshot, guest, vcpu)
    if online is None:
        online = snapshot.topology.online
    for cpu in (r.last_cpu if r else None, vcpu.last_cpu):
        if cpu is not None and cpu in online:
            return cpu
    return None


def domain_cpus(topology: Topology, pu: int, granularity: str) -> CpuSet:
    """All online PUs sharing ``pu``'s unit at ``granularity`` (unfiltered)."""
    pos = topology.pu_pos(pu)
    if granularity == "pu":
        return CpuSet.of(pu)
    if granularity == "core":
        return topology.cores[int(topology.pu_core[pos])]
    if granularity == "llc":
        return topology.llc[int(topology.pu_llc[pos])].cpus & topology.online
    if granularity == "node":
        node = int(topology.pu_node[pos])
        if node < 0:  # a PU in no NUMA node (its node is offline): fall back to its package
            return topology.packages[int(topology.pu_package[pos])] & topology.online
        return topology.numa_nodes[node].cpus & topology.online
    raise ValueError(f"unknown granularity {granularity!r}: choose one of {', '.join(GRANULARITIES)}")


def affinity_for(topology: Topology, pu: int, granularity: str, usable: CpuSet) -> CpuSet:
    """The affinity set that pins to ``pu`` at ``granularity``: its unit ∩ ``usable``.

    "pu" gives the scheduler no freedom; "core" lets it use SMT siblings; "llc" keeps the cache
    and lets the scheduler balance inside the domain; "node" keeps memory locality only.
    """
    return domain_cpus(topology, pu, granularity) & usable


def check_granularity(value: str) -> Granularity:
    if value not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, not {value!r}")
    return value  # type: ignore[return-value]


# --------------------------------------------------------------------------------------
# Building plans
# --------------------------------------------------------------------------------------


# Not frozen: a policy makes one per vCPU (2,048 on the bench's big host) and a frozen
# dataclass's __init__ costs four times as much (object.__setattr__ per field); it lives
# only until moves_from_targets copies it into a frozen Move.
@dataclass(slots=True)
class Target:
    """Where a policy wants one vCPU, and why (turned into a Move only when it differs)."""

    guest: Guest
    vcpu: VCpu
    cpus: CpuSet
    reason: str
    gain: float
    kind: str
    group: str = ""  # see Move.group: moves applied together or not at all


def moves_from_targets(targets: list[Target]) -> tuple[Move, ...]:
    """Moves for the targets that differ from where the vCPU is allowed to run now.

    Empty targets are dropped: a policy that cannot find room leaves the vCPU where it is.
    """
    moves = [
        Move(
            guest_id=t.guest.id,
            guest_name=t.guest.name,
            vcpu=t.vcpu.index,
            from_cpus=t.vcpu.affinity,
            to_cpus=t.cpus,
            reason=t.reason,
            predicted_gain=t.gain,
            kind=t.kind,
            group=t.group,
        )
        for t in targets
        if t.cpus and t.cpus != t.vcpu.affinity
    ]
    moves.sort(key=lambda m: (m.guest_id, m.vcpu))
    return tuple(moves)


def memory_move(guest: Guest, nodes: CpuSet, reason: str, gain: float) -> MemoryMove | None:
    """A move of ``guest``'s memory to ``nodes``, or None when there is nothing to do or allowed.

    Nothing to do: memory already within ``nodes``, or where it is unknown. Not allowed: a VM
    the controller may not move, or whose memory its own configuration binds.
    """
    where = guest.memory_nodes
    if not nodes or not where or where <= nodes or guest.memory_bound or not is_movable(guest):
        return None
    return MemoryMove(guest.id, guest.name, where, nodes, reason, gain)


def utilization(r: VCpuRates | None) -> float | None:
    """CPU demand of a vCPU in CPUs: time it ran plus time it waited runnable (capped at 1)."""
    if r is None or r.utilization is None:
        return None
    return min(1.0, max(0.0, r.utilization + (r.run_delay or 0.0)))


def str_keys(mapping: Mapping[str, object]) -> dict[str, object]:
    """A plain dict copy, sorted by key, ready for JSON."""
    return {k: mapping[k] for k in sorted(mapping)}
