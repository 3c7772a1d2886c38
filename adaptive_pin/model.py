"""The shared vocabulary: every module speaks in these types.

Data flows one way: topology + inventory -> collectors -> policy -> actuator -> metrics.
Everything here is immutable so a snapshot handed to a policy cannot be changed under it.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]


class CpuListError(ValueError):
    """A cpulist or cpumask string that is not what the kernel writes."""


_RANGE = re.compile(r"^(\d+)(?:-(\d+)(?::(\d+)/(\d+))?)?$")
# The kernel's CONFIG_NR_CPUS is at most 8192 (x86 MAXSMP) and MAX_NUMNODES 1024: a number
# beyond this is a typo or hostile input, and expanding "0-1000000000" would exhaust memory.
CPU_LIMIT = 1 << 16


class CpuSet:
    """An immutable set of logical CPU (or NUMA node) numbers.

    The one place that parses and formats the kernel's two spellings of a CPU set:
    cpulists (``"0-3,8,10-11"``, see cpuset(7) "List format") and hex cpumasks
    (``"ff,00000000"``: comma-separated 32-bit words, most significant first).
    """

    __slots__ = ("_cpus",)
    _cpus: frozenset[int]

    def __init__(self, cpus: Iterable[int] = ()) -> None:
        # Built in C where the input is plain ints (a 512-CPU set in 15 µs, not 37): per
        # element Python work here was a large share of an inventory on a big host.
        s = frozenset(cpus)
        if s and set(map(type, s)) != {int}:  # numpy integers, bools, digit strings
            s = frozenset(int(c) for c in s)
        if s and min(s) < 0:
            raise CpuListError(f"negative CPU number in {sorted(s)}")
        object.__setattr__(self, "_cpus", s)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("CpuSet is immutable")

    def __reduce__(self) -> tuple[type[CpuSet], tuple[tuple[int, ...]]]:
        # pickle/copy rebuild through __init__: the default path would hit __setattr__.
        return (CpuSet, (tuple(sorted(self._cpus)),))

    # --- parsing -------------------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> CpuSet:
        """Parse a cpulist: ``"0-3,8,10-11"``, ``""`` (empty) or the stride form ``"0-15:2/4"``."""
        body = text.strip().strip("\x00").strip()
        if not body:
            return cls()
        cpus: set[int] = set()
        for part in body.split(","):
            m = _RANGE.match(part.strip())
            if not m:
                raise CpuListError(f"bad cpulist {text.strip()!r}: cannot read {part!r}")
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
            if hi < lo:
                raise CpuListError(f"bad cpulist {text.strip()!r}: range {part!r} runs backwards")
            if hi >= CPU_LIMIT:
                raise CpuListError(f"bad cpulist {text.strip()!r}: {hi} is beyond any kernel's CPU numbers")
            if m.group(3) is not None:
                used, group = int(m.group(3)), int(m.group(4))
                if group == 0 or used > group:
                    raise CpuListError(f"bad cpulist {text.strip()!r}: stride {part!r}")
                cpus.update(c for c in range(lo, hi + 1) if (c - lo) % group < used)
            else:
                cpus.update(range(lo, hi + 1))
        return cls(cpus)

    @classmethod
    def parse_mask(cls, text: str) -> CpuSet:
        """Parse a hex cpumask as in ``cpumap``/``shared_cpu_map``: ``"ff,00000000"``."""
        body = text.strip().strip("\x00").strip()
        if not body:
            return cls()
        words = body.split(",")
        if len(words) * 32 > CPU_LIMIT:
            raise CpuListError(f"bad cpumask: {len(words)} words, beyond any kernel's CPU numbers")
        value = 0
        for word in words:
            w = word.strip().removeprefix("0x").removeprefix("0X")
            if not w or not re.fullmatch(r"[0-9a-fA-F]{1,8}", w):
                raise CpuListError(f"bad cpumask {text.strip()!r}: word {w!r} is not 1-8 hex digits")
            value = (value << 32) | int(w, 16)
        return cls(i for i in range(value.bit_length()) if value >> i & 1)

    @classmethod
    def of(cls, *cpus: int) -> CpuSet:
        return cls(cpus)

    # --- formatting ------------------------------------------------------------
    def to_list(self) -> str:
        """The canonical cpulist: ascending, ranges of three or more collapsed, ``""`` when empty."""
        out: list[str] = []
        cpus = sorted(self._cpus)
        i = 0
        while i < len(cpus):
            j = i
            while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
                j += 1
            if j == i:
                out.append(str(cpus[i]))
            elif j == i + 1:
                out.extend((str(cpus[i]), str(cpus[j])))
            else:
                out.append(f"{cpus[i]}-{cpus[j]}")
            i = j + 1
        return ",".join(out)

    def to_mask(self) -> str:
        """The kernel's hex cpumask spelling (``"0"`` when empty)."""
        value = sum(1 << c for c in self._cpus)
        words: list[str] = []
        while True:
            words.append(f"{value & 0xFFFFFFFF:08x}")
            value >>= 32
            if not value:
                break
        words.reverse()
        words[0] = words[0].lstrip("0") or "0"
        return ",".join(words)

    # --- set behaviour ---------------------------------------------------------
    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._cpus))

    def __len__(self) -> int:
        return len(self._cpus)

    def __contains__(self, cpu: object) -> bool:
        return cpu in self._cpus

    def __bool__(self) -> bool:
        return bool(self._cpus)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, CpuSet):
            return self._cpus == other._cpus
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._cpus)

    def __or__(self, other: CpuSet) -> CpuSet:
        return CpuSet(self._cpus | other._cpus)

    def __and__(self, other: CpuSet) -> CpuSet:
        return CpuSet(self._cpus & other._cpus)

    def __sub__(self, other: CpuSet) -> CpuSet:
        return CpuSet(self._cpus - other._cpus)

    def __le__(self, other: CpuSet) -> bool:
        return self._cpus <= other._cpus

    def __lt__(self, other: CpuSet) -> bool:
        return self._cpus < other._cpus

    def isdisjoint(self, other: CpuSet) -> bool:
        return self._cpus.isdisjoint(other._cpus)

    def first(self) -> int:
        if not self._cpus:
            raise ValueError("empty CpuSet has no first CPU")
        return min(self._cpus)

    def as_frozenset(self) -> frozenset[int]:
        return self._cpus

    def __repr__(self) -> str:
        return f"CpuSet({self.to_list()!r})"

    def __str__(self) -> str:
        return self.to_list()


# --------------------------------------------------------------------------------------
# Topology
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheDomain:
    """One cache instance (an L2 or L3) and the PUs that share it."""

    index: int  # position in Topology.l2 / .l3 / .llc (dense, 0-based, ordered by first PU)
    level: int
    cpus: CpuSet
    size_bytes: int | None = None
    kernel_id: int | None = None  # cache/indexN/id where sysfs has it


@dataclass(frozen=True)
class NumaNode:
    id: int  # the kernel's node id (may be sparse: 0,1,4,5...)
    cpus: CpuSet  # online PUs only
    memory_bytes: int | None = None  # MemTotal from nodeN/meminfo, None when unknown
    distances: Mapping[int, int] = field(default_factory=dict)  # node id -> SLIT distance


LlcSource = Literal["L3", "package"]


@dataclass(frozen=True, eq=False)
class Topology:
    """A host's CPU topology as read from sysfs.

    PUs are indexed densely by position in ``pus`` (ascending online CPU numbers); the numpy
    arrays map that position to a dense index into ``cores``, ``packages``, ``l2``, ``llc``
    and to the NUMA node id. -1 means "none" (no L2 info; a PU in no NUMA node).
    """

    root: str
    pus: tuple[int, ...]  # online PUs, ascending
    offline: CpuSet
    cores: tuple[CpuSet, ...]  # one per physical core (unique across packages), ordered by first PU
    packages: tuple[CpuSet, ...]
    numa_nodes: Mapping[int, NumaNode]  # every node sysfs lists as online, CPU-less ones included
    l2: tuple[CacheDomain, ...]
    l3: tuple[CacheDomain, ...]  # only what sysfs shows; empty when it shows none
    llc: tuple[CacheDomain, ...]  # the last-level domains the policies use (L3, else package)
    llc_source: LlcSource
    isolated: CpuSet  # /sys/devices/system/cpu/isolated
    allowed: CpuSet  # what the cgroup cpuset of this process allows (all online if unrestricted)
    reserved: CpuSet  # operator-reserved (host housekeeping); never used for vCPUs
    pu_core: IntArray
    pu_package: IntArray
    pu_l2: IntArray
    pu_llc: IntArray
    pu_node: IntArray
    notes: tuple[str, ...] = ()  # what the reader had to assume, in words

    @property
    def online(self) -> CpuSet:
        return CpuSet(self.pus)

    @property
    def usable(self) -> CpuSet:
        """PUs a policy may place vCPUs on: online, allowed, not isolated, not reserved."""
        return (self.online & self.allowed) - self.isolated - self.reserved

    def pu_pos(self, cpu: int) -> int:
        """Dense position of an online CPU number in ``pus`` (and the index arrays)."""
        pos = self._pos_of.get(cpu)
        if pos is None:
            raise KeyError(f"CPU {cpu} is not online on this host")
        return pos

    def positions(self, cpus: CpuSet) -> IntArray:
        """Positions in ``pus`` of the online CPUs of ``cpus`` (offline ones left out).

        One dict lookup per CPU: asking ``c in topology.online`` per CPU rebuilds the online
        set each time, which on a 512-PU host made one 510-CPU affinity cost 14 ms.
        """
        pos_of = self._pos_of
        return np.fromiter(
            (p for c in cpus.as_frozenset() if (p := pos_of.get(c)) is not None), dtype=np.int64
        )

    @functools.cached_property
    def _pos_of(self) -> dict[int, int]:
        # Policies call pu_pos per core per VM: a dict beats a searchsorted over a fresh array.
        return {cpu: i for i, cpu in enumerate(self.pus)}

    def smt_siblings(self, cpu: int) -> CpuSet:
        return self.cores[int(self.pu_core[self.pu_pos(cpu)])]

    def llc_of(self, cpu: int) -> CacheDomain:
        return self.llc[int(self.pu_llc[self.pu_pos(cpu)])]

    def node_of(self, cpu: int) -> int | None:
        n = int(self.pu_node[self.pu_pos(cpu)])
        return None if n < 0 else n

    def with_reserved(self, reserved: CpuSet) -> Topology:
        return replace(self, reserved=reserved)


# --------------------------------------------------------------------------------------
# Guests (VMs) and their vCPUs, as a driver reports them
# --------------------------------------------------------------------------------------

VCpuKey = tuple[str, int]  # (guest id, vCPU index): stable across ticks, unlike a thread id


class PinSource(enum.StrEnum):
    METADATA = "metadata"  # the VM's own libvirt <metadata> element
    CONFIG = "config"  # a per-VM override in adaptive-pin's config
    ORCHESTRATOR = "orchestrator"  # already pinned by someone else (e.g. Nova <vcpupin>)
    DEFAULT = "default"  # unmarked: the configured default


@dataclass(frozen=True)
class Pinnability:
    """Whether adaptive-pin may move this VM's vCPUs, who said so, and the VM's hints."""

    managed: bool
    source: PinSource
    reason: str = ""
    whole_cores: bool = False  # keep SMT siblings for this VM alone
    latency_sensitive: bool = False
    warnings: tuple[str, ...] = ()  # e.g. a broken metadata element that was ignored


@dataclass(frozen=True)
class VCpu:
    index: int
    tid: int | None  # host thread id; None when it could not be found
    affinity: CpuSet  # current allowed CPUs of the thread
    last_cpu: int | None = None  # where it last ran (stat field 39)


@dataclass(frozen=True)
class Guest:
    id: str  # libvirt UUID, QEMU -uuid, or "pid:<n>" when QEMU was started without one
    name: str
    pid: int | None  # QEMU process id
    vcpus: tuple[VCpu, ...]
    pinnability: Pinnability
    driver: str
    memory_nodes: CpuSet | None = None  # NUMA nodes holding its memory, where known
    # memory bound by the VM's own configuration (libvirt <numatune>, QEMU host-nodes=, a
    # scenario's memory_nodes): an operator's choice, never migrated
    memory_bound: bool = False
    orchestrator_pinned: bool = False  # carries <cputune><vcpupin> or equivalent
    problem: str | None = None  # e.g. "vCPU threads cannot be told apart: ..."; never guessed
    workload_hint: str | None = None  # simulator only: the workload name it runs

    def vcpu(self, index: int) -> VCpu:
        for v in self.vcpus:
            if v.index == index:
                return v
        raise KeyError(f"{self.name} has no vCPU {index}")


class EventKind(enum.StrEnum):
    STARTED = "started"
    STOPPED = "stopped"
    CHANGED = "changed"  # metadata / settings changed


@dataclass(frozen=True)
class GuestEvent:
    kind: EventKind
    guest_id: str
    name: str
    time: float  # time.monotonic() (or simulated seconds) when the driver saw it


@dataclass(frozen=True)
class Inventory:
    """What a driver sees in one look: the guests, and per-VM errors that did not stop the look."""

    guests: tuple[Guest, ...]
    errors: Mapping[str, str] = field(default_factory=dict)  # guest id or name -> one-line error
    time: float = 0.0


# --------------------------------------------------------------------------------------
# Counters and rates
# --------------------------------------------------------------------------------------

# Cumulative per-thread counter names every collector uses (units in the name).
LLC_MISSES = "llc_misses"
LLC_REFERENCES = "llc_references"
INSTRUCTIONS = "instructions"
CYCLES = "cycles"
CPU_TIME = "cpu_time_s"  # utime + stime
RUN_DELAY = "run_delay_s"  # schedstat field 2: time runnable but waiting for a CPU
TASK_CLOCK = "task_clock_s"
CONTEXT_SWITCHES = "context_switches"
VOLUNTARY_CTXSW = "voluntary_ctxsw"
INVOLUNTARY_CTXSW = "involuntary_ctxsw"
CPU_MIGRATIONS = "cpu_migrations"


@dataclass(frozen=True)
class ThreadRef:
    """One thread a collector is asked to sample."""

    key: VCpuKey
    pid: int
    tid: int


@dataclass(frozen=True)
class ThreadCounters:
    """Cumulative counts for one thread at one instant, from one collector.

    ``missing`` names each counter this collector could not give, with the reason in words
    ("no PMU: perf_event_open(cycles) = ENOENT", "thread gone"), so nothing is read as 0.
    """

    tid: int
    time: float  # seconds, monotonic (simulated seconds under the simulator)
    values: Mapping[str, float]
    missing: Mapping[str, str] = field(default_factory=dict)
    last_cpu: int | None = None


@dataclass(frozen=True)
class VCpuRates:
    """Per-interval rates of one vCPU, smoothed. ``None`` always comes with a reason."""

    llc_misses_per_s: float | None = None
    instructions_per_s: float | None = None
    cycles_per_s: float | None = None
    mpki: float | None = None  # LLC misses per 1000 instructions
    ipc: float | None = None
    utilization: float | None = None  # CPU seconds per second, 0..1
    run_delay: float | None = None  # seconds waiting per second
    last_cpu: int | None = None
    missing: Mapping[str, str] = field(default_factory=dict)  # rate name -> reason
    totals: Mapping[str, float] = field(default_factory=dict)  # cumulative counts (for counters)


# VCpuRates' rate fields, in declaration order (what status prints and the sampler fills).
VCPU_RATE_FIELDS: tuple[str, ...] = (
    "llc_misses_per_s",
    "instructions_per_s",
    "cycles_per_s",
    "mpki",
    "ipc",
    "utilization",
    "run_delay",
)


# --------------------------------------------------------------------------------------
# Snapshot -> policy -> plan
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """All a policy may look at. Policies are pure functions of this (plus their own memory)."""

    time: float
    topology: Topology
    guests: tuple[Guest, ...]
    rates: Mapping[VCpuKey, VCpuRates]
    capabilities: Mapping[str, str | None] = field(default_factory=dict)  # counter -> None or why not
    taken: CpuSet = field(default_factory=CpuSet)  # held by orchestrator-pinned VMs
    bad_placements: frozenset[tuple[VCpuKey, CpuSet]] = frozenset()  # rolled back recently
    # vCPUs the guard will still hold where they are when a move proposed now can first be
    # made (hold_ticks - 1 ticks on): moved within its cooldown; a move of one is refused unless
    # it gathers a split VM. A policy that plans around them proposes the best moves that can
    # happen, not moves refused tick after tick
    frozen: frozenset[VCpuKey] = frozenset()
    # (vCPU, CPU set) pairs the guard will still refuse then: CPUs left within the return window
    barred: frozenset[tuple[VCpuKey, CpuSet]] = frozenset()

    @property
    def has_pmu(self) -> bool:
        return self.capabilities.get(LLC_MISSES) is None and self.capabilities.get(INSTRUCTIONS) is None

    def guest(self, guest_id: str) -> Guest:
        return self._guest_by_id[guest_id]

    @functools.cached_property
    def _guest_by_id(self) -> dict[str, Guest]:
        # A tick looks up every move's guest: a scan each time is O(moves x guests).
        return {g.id: g for g in reversed(self.guests)}  # the first of duplicates wins, as a scan


@dataclass(frozen=True)
class Move:
    guest_id: str
    guest_name: str
    vcpu: int
    from_cpus: CpuSet
    to_cpus: CpuSet
    reason: str  # in words, for the operator
    predicted_gain: float  # policy's own unit, documented per policy; > 0 means better
    kind: str = "rebalance"  # e.g. "initial", "rebalance", "cohesion", "rollback"
    # The guard applies a plan's moves of one VM together or not at all (a VM half moved is
    # split); a non-empty group also ties in every other VM's moves that carry it (a swap).
    # Refits and rollbacks stand alone: they are corrections, never held back by a sibling.
    group: str = ""

    @property
    def key(self) -> VCpuKey:
        return (self.guest_id, self.vcpu)


@dataclass(frozen=True)
class MemoryMove:
    """Migrate a VM's memory to the nodes its vCPUs now run on (as numad does after it binds)."""

    guest_id: str
    guest_name: str
    from_nodes: CpuSet
    to_nodes: CpuSet
    reason: str
    predicted_gain: float  # same unit as Move.predicted_gain


@dataclass(frozen=True)
class Plan:
    policy: str
    moves: tuple[Move, ...] = ()
    # carried out after the vCPU moves, only for a VM all of whose vCPUs then run in to_nodes
    memory_moves: tuple[MemoryMove, ...] = ()
    notes: tuple[str, ...] = ()  # e.g. "no PMU: deciding on CPU time and cohesion only"


# --------------------------------------------------------------------------------------
# What one controller tick did: the controller produces it, metrics and logs consume it
# --------------------------------------------------------------------------------------


class Verdict(enum.StrEnum):
    PENDING = "pending"  # the after-window is not complete yet
    KEPT = "kept"  # after-MPKI no worse than before by more than the margin
    ROLLED_BACK = "rolled_back"  # worse: the vCPU went back to where it was
    UNMEASURED = "unmeasured"  # no MPKI (no PMU) or the thread vanished


@dataclass(frozen=True)
class MoveOutcome:
    """The verify step's account of one applied move: MPKI over a window before and after."""

    move: Move
    applied_at: float
    mpki_before: float | None
    mpki_after: float | None
    verdict: Verdict

    @property
    def ratio(self) -> float | None:
        """after / before (below 1 is better); None where either side is unknown or before is 0."""
        if self.mpki_before is None or self.mpki_after is None or self.mpki_before <= 0:
            return None
        return self.mpki_after / self.mpki_before


@dataclass(frozen=True)
class TickReport:
    """Everything one tick saw and did. Exporters accumulate counters from successive reports."""

    tick: int
    time: float  # wall clock (time.time()) at the start of the tick
    duration_s: float
    interval_s: float
    policy: str
    snapshot: Snapshot
    plan: Plan
    applied: tuple[Move, ...] = ()
    refused: tuple[tuple[Move, str], ...] = ()  # held back by the guard or failed to pin, and why
    memory_applied: tuple[MemoryMove, ...] = ()
    memory_refused: tuple[tuple[MemoryMove, str], ...] = ()
    outcomes: tuple[MoveOutcome, ...] = ()  # verdicts reached during this tick
    errors: Mapping[str, int] = field(default_factory=dict)  # error kind -> count in this tick
    inventory_errors: Mapping[str, str] = field(default_factory=dict)  # guest -> error
    dry_run: bool = False
    trigger: str = "timer"  # "timer" | "event" | "once"
