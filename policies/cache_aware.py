"""``cache-aware`` (the default): keep cache-hungry VMs apart and each VM's vCPUs together.

The model (docs/policies.md has the derivation). Every vCPU i has a CPU demand u_i (CPU time
plus run-queue wait, per second) and an LLC miss rate m_i (misses/s). Placement is decided per
*domain*: an LLC domain (a NUMA node at granularity "node"). The policy minimises an estimate
of the throughput all vCPUs lose, in **vCPU-equivalents** (1.0 = one vCPU's full work), as the
sum of four terms:

- contention: a vCPU's misses grow by v_i * phi(F_i) / M_d, F_i the miss traffic of *other* VMs
  in its domain, M_d ``contention_misses_per_s`` per 8 MiB of LLC, v_i its misses at risk:
  HIT_LOSS x its LLC hits/s where the PMU counts references (a streamer has none to lose),
  else its misses m_i (M_d is then the foreign traffic that doubles them); each extra miss
  stalls ``miss_cost_ns``. phi(F) = F / (1 + F / (SATURATION M_d)) saturates: the first
  streamer takes most of a vCPU's share of the cache, the second little more. Counted for both
  sides, what F costs the vCPU plus what its own m_i adds to its neighbours': the "Pain" of
  Zhuravlev et al. (ASPLOS 2010), sensitivity of one times intensity of the other; with m for
  v and no saturation it is their distributed-intensity proxy, hungry VMs apart;
- cohesion: a ``sharing`` fraction of a vCPU's misses is data its sibling vCPUs also use; for
  the share of its VM's CPU time in other domains those become cross-domain transfers, costed
  by SLIT distance / 10 (1 in the same node, ~2 across nodes);
- memory: misses served from a remote node cost SLIT/10 - 1 extra (when Guest.memory_nodes is known);
- overload: demand above the usable PUs of a domain is lost outright (time-sharing). The usable
  PUs leave out Snapshot.taken, so vCPUs we may not move that are pinned outside the usable set
  are not counted against them again (their misses still count where they run).

With no PMU (or no miss rate for a vCPU) m_i is taken as u_i * ``assumed_misses_per_s``: the
decision then rests on CPU time and cohesion, and Plan.notes says so.

Each decide():

1. *place*: VMs with vCPUs not yet confined to one domain are placed whole, hungriest first,
   into the cheapest domain with room for all of it (a partly placed VM: where its placed
   vCPUs are, if the rest fits); only a VM that fits nowhere is split, roomiest domain first;
   the decision to confine is per VM; ``whole_cores`` VMs get whole cores, kept for them alone
   (kind "initial");
2. *rebalance*: domains whose pressure (lost vCPU-equivalents of its vCPUs per unit of their
   demand) is above ``enter`` -- or above ``exit`` if they were active last tick (hysteresis,
   remembered in the state) -- move VMs whole (or gather split ones whole), then swap pairs of
   VMs between full domains, then give up their worst vCPUs, one greedy best move at a time
   (a single vCPU only gathers its VM, never splits it), while a move gains at least
   ``min_gain`` per vCPU moved -- ``settled_min_gain`` once the host has had the same VMs for
   QUIET_DECISIONS decisions (kind "rebalance", or "cohesion" when that is the main gain); a VM the guard
   holds (a vCPU in Snapshot.frozen) stays, and no vCPU or VM goes where the guard would refuse
   it (Snapshot.barred, bad_placements), so the moves proposed are the best that may happen now;
3. at granularity pu or core, the PU inside the domain is the least loaded one, busy vCPUs of
   different VMs kept off SMT siblings while a free core exists; vCPUs doubled up on a PU while
   one of their domain is idle are spread (kind "balance");
4. every vCPU's wanted affinity (its domain ∩ usable, minus cores held by whole_cores VMs) is
   compared with what it has: a difference is a move (kind "refit" when only the allowed set
   changed, with ``predicted_gain`` 1.0: it is a correctness fix, not an optimisation).

``predicted_gain`` of every other move is the estimated reduction of lost throughput, in
vCPU-equivalents, so the guard's ``min_gain`` is in that unit too.

Default granularity is "auto", which is "llc": the cache locality is what the model is about,
and inside the domain the kernel's load balancer (SMT-aware, idle-core first) does better than
a static PU choice from a 5-second average; "pu" removes that freedom, "node" gives up LLC
awareness. Where the LLC domains are private to single cores (POWER8/9's per-core L3, a host
whose sysfs gives no L3 and one core per package) "auto" is "node": a VM kept in one such
domain shares no cache, it is only stacked on one core's SMT threads.

State (JSON)::

    {"version": 1, "granularity": "llc", "active": [<domain label>, ...],
     "host": <digest of the VMs and their vCPU counts>, "quiet": <decisions it has not changed>}
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from adaptive_pin.model import (
    LLC_MISSES,
    LLC_REFERENCES,
    CpuSet,
    Guest,
    MemoryMove,
    Plan,
    Snapshot,
    Topology,
    VCpu,
    VCpuKey,
    VCpuRates,
)
from policies.base import (
    GRANULARITIES,
    Granularity,
    Target,
    check_granularity,
    is_movable,
    last_cpu,
    memory_move,
    moves_from_targets,
    usable_cpus,
    utilization,
    versioned_state,
)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

STATE_VERSION = 1
AUTO = "auto"  # granularity chosen per host: see CacheAwarePolicy.resolve_granularity
MIB = 1 << 20
REFERENCE_LLC_BYTES = 8 * MIB  # contention_misses_per_s is per this much LLC
FALLBACK_LLC_BYTES_PER_PU = 1 * MIB  # when sysfs gives no cache size
LOCAL_DISTANCE = 10  # ACPI SLIT: a node to itself
DEFAULT_REMOTE_DISTANCE = 20  # what Linux assumes without a SLIT
SMT_LOSS = 0.35  # two busy threads on a core do ~1.3x one thread's work: each loses ~35%
# ... of its core-bound part; memory stalls overlap, and about half of a typical vCPU's cycles
# are core-bound, so a pair loses about 0.35 vCPU (the load term's SMT part, per vCPU over cores)
SMT_PAIR_LOSS = 0.35
BUSY = 0.5  # a vCPU using at least half a CPU is "busy" for PU and SMT choices
REFIT_GAIN = 1.0
IMPROVE_ROUNDS = 2  # passes over the newly placed VMs after the greedy placement
# A VM left floating because confining it gained too little is confined later only for twice
# that: a gain that creeps across min_gain as caches warm is noise, not a reason to move.
FLOATING_HYSTERESIS = 2.0
# Foreign miss traffic M_d turns this share of a vCPU's LLC hits into misses: what a vCPU stands
# to lose is its hits, not its misses (a cache-resident build with few misses loses most beside
# a streamer; its occupancy share, ~ its insertion rate over the domain's, collapses).
HIT_LOSS = 0.3
# Hits per miss over the last interval are applied to the current miss rate: the cap bounds
# what a stale ratio makes of a miss rate that changed since (a phase change inside the interval).
MAX_HITS_PER_MISS = 100.0
# What foreign traffic F costs a vCPU saturates: its share of the LLC goes with its insertion
# (miss) rate against everyone's, so the first streamer beside it takes most of it and the
# second little more (the simulator's demo: gcc at 0.84 of its speed alone beside one triad VM,
# 0.84 beside two). phi(F) = F / (1 + F / (SATURATION x M_d)): linear for small F, half the
# linear cost at F = SATURATION x M_d.
SATURATION = 2.0
INF = math.inf
_Num = TypeVar("_Num", FloatArray, float)  # the model's formulas, per domain or for one
# Decisions with the same VMs after which the host counts as settled: from then on a rebalance
# must promise settled_min_gain per vCPU it moves, not min_gain. The moves an arrival or a
# departure calls for are made within these; what is left is refinement by a model whose error
# is larger than min_gain (on generated mixes: swaps of 10 vCPUs for 0.026 of one, one more
# every few ticks), which is the migration churn a settled host should not see.
QUIET_DECISIONS = 3


def _phi(f: _Num, s: _Num) -> _Num:
    """What foreign miss traffic f costs, saturating at s (see SATURATION): arrays or floats."""
    return f / (1.0 + f / s)


def _load_loss(load: _Num, cap: _Num, cores: _Num | None) -> _Num:
    """vCPU-equivalents a domain of ``cap`` usable PUs on ``cores`` cores loses to CPU demand
    ``load``: demand above its PUs time-shares, demand above its cores (unless ``cores`` is
    None) puts busy threads on SMT siblings. Arrays or floats, the same operations."""
    out = np.maximum(0.0, load - cap)
    if cores is not None:
        out = out + SMT_PAIR_LOSS * np.maximum(0.0, np.minimum(load, cap) - cores)
    return out  # type: ignore[no-any-return]


def _load_loss_one(load: float, cap: float, cores: float) -> float:
    """_load_loss of one domain in Python floats: the same IEEE operations, without numpy's
    per-call dispatch (the greedy placement updates one domain per VM it places)."""
    return max(0.0, load - cap) + SMT_PAIR_LOSS * max(0.0, min(load, cap) - cores)


def _host_key(snapshot: Snapshot) -> str:
    """Which VMs, of how many vCPUs, are on the host: a change (an arrival, a departure, a
    resize) starts a new settling period."""
    text = ";".join(sorted(f"{g.id}:{len(g.vcpus)}" for g in snapshot.guests))
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


@dataclass(slots=True)
class _VCpuRow:
    i: int  # index in _World.rows and in its per-row arrays (row_m, row_wm, row_u)
    guest: Guest
    gi: int
    vcpu: VCpu
    movable: bool
    u: float  # demand, CPUs (0 when unknown)
    known: bool  # rates sampled: utilization known
    m: float  # LLC misses/s (measured or assumed)
    measured: bool
    w: float  # misses at risk per miss: HIT_LOSS x LLC hits per miss (1.0 when unknown)
    aff_dom: int  # the one domain the affinity lies in (usable part), else -1
    aff_weights: FloatArray | None  # share of the affinity's usable PUs per domain
    dom: int  # where its load is counted now (-1: nowhere)
    pu: int  # PU position it is taken to run on (-1: unknown)
    whole: bool
    seen_dom: int = -1  # dom as read from the snapshot, before a placement lifts it
    forced: bool = False  # placed where there was no room (time-sharing with its neighbours)
    # pinned where we may not place anyone (Snapshot.taken, reserved): its demand is on CPUs the
    # domain's capacity already leaves out, so it is not counted against that capacity again
    off_cap: bool = False
    kind: str = ""
    gain: float = 0.0
    why: str = ""
    group: str = ""  # Move.group: set on both VMs of a swap, so neither moves without the other


@dataclass
class _Aggregates:
    P: FloatArray  # misses/s per domain
    L: FloatArray  # CPU demand per domain on its capacity (whole_cores VMs and vCPUs pinned
    # to taken/reserved CPUs excluded: they run on PUs the capacity leaves out)
    PG: FloatArray  # misses/s per (guest, domain)
    W: FloatArray  # misses/s at risk (w * m) per domain
    WG: FloatArray  # the same per (guest, domain)
    UG: FloatArray  # demand per (guest, domain)
    UT: FloatArray  # total demand per guest (for cohesion shares)
    KU: FloatArray = field(init=False)
    KP: FloatArray = field(init=False)


class CacheAwarePolicy:
    name = "cache-aware"
    description = (
        "default: spread cache-hungry VMs over LLC domains, keep each VM's vCPUs together, "
        "balance load (falls back to CPU time without a PMU)"
    )

    def __init__(
        self,
        *,
        granularity: str = "auto",
        miss_cost_ns: float = 15.0,
        contention_misses_per_s: float = 1e8,
        sharing: float = 0.3,
        enter: float = 0.01,
        exit: float = 0.004,
        min_gain: float = 0.002,
        settled_min_gain: float = 0.05,
        max_moves: int = 16,
        candidates: int = 256,
        assumed_misses_per_s: float = 1e7,
        migrate_memory: bool = True,
        migrated_remote_weight: float = 0.1,
    ) -> None:
        if granularity != AUTO and granularity not in GRANULARITIES:
            raise ValueError(
                f"granularity must be {AUTO} or one of {', '.join(GRANULARITIES)}, not {granularity!r}"
            )
        self.granularity = granularity
        for label, value in (
            ("miss_cost_ns", miss_cost_ns),
            ("contention_misses_per_s", contention_misses_per_s),
            ("assumed_misses_per_s", assumed_misses_per_s),
        ):
            if not value > 0:
                raise ValueError(f"{label} must be > 0")
        if not 0 <= sharing <= 1:
            raise ValueError("sharing must be in [0, 1]")
        if not 0 <= exit <= enter:
            raise ValueError("need 0 <= exit <= enter")
        if not 0 <= migrated_remote_weight <= 1:
            raise ValueError("migrated_remote_weight must be in [0, 1]")
        if min_gain < 0 or max_moves < 0 or candidates < 1:
            raise ValueError("min_gain and max_moves must be >= 0, candidates >= 1")
        if settled_min_gain < 0:
            raise ValueError("settled_min_gain must be >= 0")
        self.t = miss_cost_ns * 1e-9
        self.miss_cost_ns = miss_cost_ns
        self.contention = contention_misses_per_s
        self.sharing = sharing
        self.enter = enter
        self.exit = exit
        self.min_gain = min_gain
        self.settled_min_gain = settled_min_gain
        self.max_moves = max_moves
        self.candidates = candidates
        self.assumed = assumed_misses_per_s
        self.migrate_memory = migrate_memory
        self.migrated_remote_weight = migrated_remote_weight

    def initial_state(self) -> object:
        return {"version": STATE_VERSION, "granularity": self.granularity, "active": []}

    def resolve_granularity(self, topology: Topology) -> Granularity:
        """The granularity this host is placed at: "auto" is "llc", unless the LLC domains are
        private to single cores (most hold one core) and there are several NUMA nodes: then
        "node". Grouping a VM in a one-core "LLC" shares no cache between its vCPUs; it only
        stacks them on one core's SMT threads and leaves the node's other cores to others."""
        if self.granularity != AUTO:
            return check_granularity(self.granularity)
        in_llc = (topology.positions(d.cpus) for d in topology.llc)
        cores = [len(np.unique(topology.pu_core[pos])) for pos in in_llc if len(pos)]
        nodes = {int(n) for n in topology.pu_node if n >= 0}
        if cores and float(np.median(cores)) <= 1 and len(nodes) > 1:
            return "node"
        return "llc"

    def decide(self, snapshot: Snapshot, state: object) -> tuple[Plan, object]:
        gran = self.resolve_granularity(snapshot.topology)
        old = versioned_state(state, STATE_VERSION)
        prev_active: set[int] = set()
        active = old.get("active") if old and old.get("granularity") == gran else None
        if isinstance(active, list):
            prev_active = {a for a in active if isinstance(a, int) and not isinstance(a, bool)}
        prev_counts: dict[str, list[float]] = {}
        counts = old.get("counts") if old else None
        if isinstance(counts, dict):
            for key, val in counts.items():
                if (
                    isinstance(key, str)
                    and isinstance(val, list)
                    and len(val) == 2
                    and all(isinstance(x, int | float) and not isinstance(x, bool) for x in val)
                ):
                    prev_counts[key] = [float(val[0]), float(val[1])]
        floating = old.get("floating") if old else None
        left = {g for g in floating if isinstance(g, str)} if isinstance(floating, list) else set()
        host = _host_key(snapshot)
        quiet = old.get("quiet") if old and old.get("host") == host else None
        quiet = quiet + 1 if isinstance(quiet, int) and not isinstance(quiet, bool) and quiet >= 0 else 0
        world = _World(snapshot, self, gran, prev_counts, left, settled=quiet >= QUIET_DECISIONS)
        notes = world.run(prev_active)
        if self.granularity == AUTO and gran != "llc":
            notes.insert(0, f"granularity auto: {gran} on this host (its LLC domains are single cores)")
        targets = world.targets()
        plan = Plan(
            policy=self.name,
            moves=moves_from_targets(targets),
            memory_moves=tuple(world.memory_moves(targets)),
            notes=tuple(notes),
        )
        new_state: dict[str, object] = {
            "version": STATE_VERSION,
            "granularity": gran,
            "active": sorted(int(world.labels[d]) for d in world.active),
            "host": host,
            "quiet": quiet,
        }
        if world.left_floating:
            new_state["floating"] = sorted(world.left_floating)
        if world.counts:  # only when the PMU gives LLC references and misses
            new_state["counts"] = {k: world.counts[k] for k in sorted(world.counts)}
        return plan, new_state


class _World:
    """One decide()'s working copy of the host: domains, vCPUs, and the aggregates of the model."""

    def __init__(
        self,
        snapshot: Snapshot,
        policy: CacheAwarePolicy,
        gran: Granularity,
        prev_counts: dict[str, list[float]] | None = None,
        left: set[str] | None = None,
        settled: bool = False,
    ) -> None:
        self.s = snapshot
        # min gain per vCPU a rebalance moves: higher once the host has stood unchanged a while
        self.move_gain = max(policy.min_gain, policy.settled_min_gain) if settled else policy.min_gain
        self.prev_counts = prev_counts or {}
        self.prev_left = left or set()  # guests the last decision left floating (gain too small)
        self.left_floating: set[str] = set()
        self.counts: dict[str, list[float]] = {}  # "guest/vcpu" -> [LLC references, misses] now
        self.p = policy
        self.gran = gran
        topo = snapshot.topology
        self.topo = topo
        self.usable = usable_cpus(snapshot)
        self.pos_of = {cpu: i for i, cpu in enumerate(topo.pus)}
        self.online = topo.online
        npu = len(topo.pus)
        label = np.asarray(topo.pu_node if self.gran == "node" else topo.pu_llc, dtype=np.int64)
        labels, inverse = np.unique(label, return_inverse=True)
        self.labels: IntArray = labels.astype(np.int64)
        self.pu_dom: IntArray = inverse.reshape(-1).astype(np.int64)
        self.D = len(self.labels)
        self.usable_mask = np.array([c in self.usable for c in topo.pus], dtype=bool)
        self.excl_owner: IntArray = np.full(npu, -1, dtype=np.int64)  # guest index holding the PU alone
        self.holders: set[int] = set()  # guests holding whole cores
        self._wanted_cache: dict[tuple[int, int], CpuSet] = {}
        self._cap: FloatArray | None = None
        self._open: bool | None = None  # every domain has capacity (see _all_open)
        # Per-domain figures of self.agg that every greedy placement reads: kept up to date
        # element by element as _add changes one domain (the same IEEE operations as the array
        # expressions, so the same values), rebuilt when the aggregates or capacities change.
        self._lc_now: FloatArray | None = None  # _load_cost(agg.L)
        self._pf_now: FloatArray | None = None  # phi(agg.P), see _contention
        self._cached_agg: _Aggregates | None = None  # the aggregates the two are of
        self._cores: FloatArray | None = None
        self.dom_pos: list[IntArray] = [np.flatnonzero(self.pu_dom == d) for d in range(self.D)]
        self.dom_node = np.array([int(topo.pu_node[pos[0]]) for pos in self.dom_pos], dtype=np.int64)
        # memory can follow a VM only into a domain within one node (not an SNC LLC over two)
        self.dom_follows = (self.dom_node >= 0) & np.array(
            [len(set(topo.pu_node[pos].tolist())) == 1 for pos in self.dom_pos]
        )
        self.M = self._contention_scale()
        self.Ms = SATURATION * self.M  # where phi is half linear
        self.K = self._cohesion_costs()
        self.core_pos: list[IntArray] = [
            np.array([self.pos_of[c] for c in core if c in self.pos_of], dtype=np.int64)
            for core in topo.cores
        ]
        self.pu_core = np.asarray(topo.pu_core, dtype=np.int64)
        self.pmu = snapshot.has_pmu
        self.guests = sorted(snapshot.guests, key=lambda g: g.id)
        self.G = len(self.guests)
        # a VM whose memory may follow it pays remote misses only until the copy is done
        self.rho_full = self._remote_costs()
        self.follows = np.array([self._memory_follows(g) for g in self.guests], dtype=bool)
        w = policy.migrated_remote_weight
        can_follow = self.follows[:, None] & self.dom_follows[None, :]
        self.rho = np.where(can_follow, self.rho_full * w, self.rho_full)
        self.bad: defaultdict[VCpuKey, list[CpuSet]] = defaultdict(list)
        # domains closed to a vCPU: a rolled-back placement inside one domain, or a domain's whole
        # usable set inside the guard's return window (it bars the exact set a vCPU left)
        closed: defaultdict[VCpuKey, set[int]] = defaultdict(set)
        for key, cpus in snapshot.bad_placements:
            self.bad[key].append(cpus)
            in_doms = {int(self.pu_dom[self.pos_of[c]]) for c in cpus if c in self.pos_of}
            if len(in_doms) == 1:
                closed[key] |= in_doms
        if gran in ("llc", "node") and snapshot.barred:
            pus = np.asarray(topo.pus)
            dom_of = {
                CpuSet(pus[pos[self.usable_mask[pos]]].tolist()): d for d, pos in enumerate(self.dom_pos)
            }
            for key, cpus in snapshot.barred:
                if cpus in dom_of:
                    closed[key].add(dom_of[cpus])
        self.closed: dict[VCpuKey, tuple[int, ...]] = {k: tuple(sorted(v)) for k, v in closed.items()}
        self._closed_vm_memo: dict[int, tuple[int, ...]] = {}
        self.rows: list[_VCpuRow] = []
        self._aff_cache: dict[CpuSet, tuple[int, FloatArray | None]] = {}
        self._build_rows()
        # the rows' fixed figures as arrays, for the vectorised paths to index by row
        n_rows = len(self.rows)
        self.row_m = np.fromiter((r.m for r in self.rows), dtype=np.float64, count=n_rows)
        self.row_wm = np.fromiter((r.w * r.m for r in self.rows), dtype=np.float64, count=n_rows)
        self.row_u = np.fromiter((r.u for r in self.rows), dtype=np.float64, count=n_rows)
        self.row_gi = np.fromiter((r.gi for r in self.rows), dtype=np.int64, count=n_rows)
        self.row_whole = np.fromiter((r.whole for r in self.rows), dtype=bool, count=n_rows)
        self.rows_of: list[list[_VCpuRow]] = [[] for _ in range(self.G)]
        for r in self.rows:
            self.rows_of[r.gi].append(r)
        self._freeze(snapshot.frozen)
        self.active: set[int] = set()
        self.home: dict[int, int] = {}  # partly placed VM -> the domain its placed vCPUs are in
        self.placing: set[int] = set()  # VMs placed in this decision (not rebalanced too)
        self.pl = np.zeros(npu)  # CPU demand per PU (pu/core granularity choices)
        self.pl_guest: defaultdict[int, defaultdict[int, float]] = defaultdict(lambda: defaultdict(float))

    # ------------------------------------------------------------------ topology-derived
    def _contention_scale(self) -> FloatArray:
        topo = self.topo
        share = np.full(len(topo.pus), float(FALLBACK_LLC_BYTES_PER_PU))
        for llc in topo.llc:
            pos = [self.pos_of[c] for c in llc.cpus if c in self.pos_of]
            if llc.size_bytes and pos:
                share[pos] = llc.size_bytes / len(pos)
        cache = np.bincount(self.pu_dom, weights=share, minlength=self.D)
        scale: FloatArray = self.p.contention * cache / REFERENCE_LLC_BYTES
        return scale

    def _contention(
        self,
        v: FloatArray | float,
        m: FloatArray | float,
        f: FloatArray,
        fw: FloatArray,
        scale: FloatArray,
        pf: FloatArray | None = None,
        s: FloatArray | None = None,
    ) -> FloatArray:
        """Lost vCPU-equivalents of a vCPU or VM (misses at risk v, misses m) in a domain whose
        other VMs miss f and have fw at risk, ``scale`` its M_d: what foreign traffic costs it,
        t v phi(f) / M_d, plus what it adds to theirs, t fw (phi(f + m) - phi(f)) / M_d.

        phi saturates (SATURATION), so the neighbours' part depends on the traffic they already
        see; their own levels are not in the per-domain sums, and the candidate's f stands in
        for all of them. ``pf`` and ``s``, when given, are phi(f) and SATURATION x scale.
        """
        if s is None:
            s = SATURATION * scale
        if pf is None:
            pf = _phi(f, s)
        out: FloatArray = self.p.t * (v * pf + fw * (_phi(f + m, s) - pf)) / scale
        return out

    def _slit(self, a: int, b: int) -> float:
        if a < 0 or b < 0:
            return float(LOCAL_DISTANCE if a == b else DEFAULT_REMOTE_DISTANCE)
        node = self.topo.numa_nodes.get(a)
        default = LOCAL_DISTANCE if a == b else DEFAULT_REMOTE_DISTANCE
        return float(node.distances.get(b, default)) if node else float(default)

    def _cohesion_costs(self) -> FloatArray:
        k = np.zeros((self.D, self.D))
        for a in range(self.D):
            for b in range(self.D):
                if a != b:
                    k[a, b] = self._slit(int(self.dom_node[a]), int(self.dom_node[b])) / LOCAL_DISTANCE
        return k

    def _remote_costs(self) -> FloatArray:
        rho = np.zeros((self.G, self.D))
        row_of: dict[frozenset[int], FloatArray] = {}  # memory nodes -> cost per domain
        for gi, g in enumerate(self.guests):
            if not g.memory_nodes:
                continue
            key = frozenset(g.memory_nodes)
            row = row_of.get(key)
            if row is None:
                row = np.zeros(self.D)
                for d in range(self.D):
                    n = int(self.dom_node[d])
                    if n >= 0:
                        best = min(self._slit(n, mem) for mem in g.memory_nodes)
                        row[d] = max(0.0, best / LOCAL_DISTANCE - 1.0)
                row_of[key] = row
            rho[gi] = row
        return rho

    def _memory_follows(self, g: Guest) -> bool:
        return self.p.migrate_memory and is_movable(g) and not g.memory_bound and bool(g.memory_nodes)

    def memory_moves(self, targets: Sequence[Target]) -> list[MemoryMove]:
        """Memory to the node of every VM whose vCPUs all end up in one node it is not on."""
        if not self.follows.any():
            return []
        moved = {(t.guest.id, t.vcpu.index) for t in targets}
        out: list[MemoryMove] = []
        for gi in np.flatnonzero(self.follows):
            g = self.guests[gi]
            rows = self.rows_of[gi]
            # a target lies in its row's domain; a vCPU without one stays in its affinity's
            doms = {r.dom if (g.id, r.vcpu.index) in moved else r.aff_dom for r in rows}
            if len(rows) != len(g.vcpus) or -1 in doms or not all(self.dom_follows[d] for d in doms):
                continue
            nodes = {int(self.dom_node[d]) for d in doms}
            if len(nodes) != 1:
                continue
            node = min(nodes)
            gain = self.p.t * sum(r.m for r in rows) * float(self.rho_full[gi, min(doms)])
            why = (
                f"memory of {g.name} to node {node}, where all its vCPUs run: "
                f"est. {gain:.3g} vCPU-equivalents of remote misses regained"
            )
            mm = memory_move(g, CpuSet.of(node), why, gain)
            if mm is not None:
                out.append(mm)
        return out

    # ------------------------------------------------------------------ vCPUs
    def _affinity_domain(self, aff: CpuSet) -> tuple[int, FloatArray | None]:
        cached = self._aff_cache.get(aff)
        if cached is None:
            pos = np.array(
                [self.pos_of[c] for c in aff if c in self.pos_of and c in self.usable], dtype=np.int64
            )
            if len(pos) == 0:
                cached = (-1, None)
            else:
                doms = np.unique(self.pu_dom[pos])
                weights = np.bincount(self.pu_dom[pos], minlength=self.D) / len(pos)
                # wider than one unit of the granularity (a PU, a core): not placed yet
                one = len(doms) == 1 and self._confined(aff)
                cached = (int(doms[0]) if one else -1, weights.astype(np.float64))
            self._aff_cache[aff] = cached
        return cached

    def _confined(self, aff: CpuSet) -> bool:
        """Whether an affinity inside one domain is also inside one unit of the granularity."""
        inside = [c for c in aff if c in self.usable]
        if self.gran == "pu":
            return len(inside) == 1
        if self.gran == "core":
            return len({int(self.pu_core[self.pos_of[c]]) for c in inside}) == 1
        return True

    def _build_rows(self) -> None:
        # Runs once per vCPU (2,048 on the bench's big host): invariants are read once, and
        # PU domains are plain ints from a list, not numpy scalars.
        s, rates, online, pos_of = self.s, self.s.rates, self.online, self.pos_of
        pmu, assumed = self.pmu, self.p.assumed
        pu_dom: list[int] = self.pu_dom.tolist()
        rows = self.rows
        for gi, guest in enumerate(self.guests):
            movable = is_movable(guest)
            whole = movable and guest.pinnability.whole_cores
            for v in sorted(guest.vcpus, key=lambda x: x.index):
                r = rates.get((guest.id, v.index))
                u = utilization(r)
                miss = r.llc_misses_per_s if (r is not None and pmu) else None
                measured = miss is not None
                m = float(miss) if miss is not None else (u or 0.0) * assumed
                w = self._sensitivity(guest, v, r) if measured else 1.0
                aff_dom, weights = self._affinity_domain(v.affinity)
                lc = last_cpu(s, guest, v, online)
                lc_pos = pos_of[lc] if lc is not None else -1
                if aff_dom >= 0:
                    inside = lc is not None and lc in v.affinity and lc_pos >= 0 and pu_dom[lc_pos] == aff_dom
                    pu = lc_pos if inside else pos_of[next(c for c in v.affinity if c in self.usable)]
                    dom = aff_dom
                else:
                    pu = lc_pos
                    dom = pu_dom[lc_pos] if lc_pos >= 0 else -1
                rows.append(
                    _VCpuRow(
                        i=len(rows),
                        guest=guest,
                        gi=gi,
                        vcpu=v,
                        movable=movable and v.tid is not None,
                        u=u or 0.0,
                        known=u is not None,
                        m=m,
                        measured=measured,
                        w=w,
                        aff_dom=aff_dom,
                        aff_weights=weights,
                        dom=dom,
                        pu=pu,
                        whole=whole,
                        seen_dom=dom,
                        off_cap=not movable and weights is None,
                    )
                )

    def _freeze(self, frozen: frozenset[VCpuKey]) -> None:
        """A VM confined to one domain with a vCPU the guard holds (Snapshot.frozen) stays put
        this tick: it moves whole or not at all, and the guard would refuse the move, so the
        plan is made around it instead of being refused tick after tick. A split VM keeps its
        freedom (the guard lets a move that gathers it through), and so does a whole_cores VM,
        whose cores are reserved for it only while its rows are movable."""
        if not frozen:
            return
        for rows in self.rows_of:
            if (
                not rows
                or rows[0].whole
                or not any(r.movable and (r.guest.id, r.vcpu.index) in frozen for r in rows)
            ):
                continue
            doms = {r.aff_dom for r in rows}
            if len(doms) == 1 and min(doms) >= 0:
                for r in rows:
                    r.movable = False

    def _sensitivity(self, guest: Guest, v: VCpu, r: VCpuRates | None) -> float:
        """Misses at risk per miss: HIT_LOSS x the vCPU's LLC hits per miss since the last
        decision (1.0, the misses themselves, when unknown).

        Read off the cumulative LLC reference and miss counts (``VCpuRates.totals``), over the
        interval since the previous decide() (their values are kept in the state), else over
        the thread's life. A streaming thread misses on every access whatever its share of the
        cache: it costs its neighbours but has no hits to lose (0); a cache-resident one has
        many hits per miss and loses most when a neighbour's traffic takes its share.
        """
        if r is None:
            return 1.0
        refs, misses = r.totals.get(LLC_REFERENCES), r.totals.get(LLC_MISSES)
        if refs is None or misses is None or not (math.isfinite(refs) and math.isfinite(misses)):
            return 1.0
        key = f"{guest.id}/{v.index}"
        self.counts[key] = [float(refs), float(misses)]
        d_refs, d_miss = refs, misses
        prev = self.prev_counts.get(key)
        if prev is not None and refs - prev[0] > 0 and misses >= prev[1]:
            d_refs, d_miss = refs - prev[0], misses - prev[1]
        if not d_refs > 0:
            return 1.0
        hits = max(0.0, d_refs - d_miss)
        per_miss = min(MAX_HITS_PER_MISS, hits / d_miss) if d_miss > 0 else MAX_HITS_PER_MISS * (hits > 0)
        return float(HIT_LOSS * per_miss)

    # ------------------------------------------------------------------ the run
    def run(self, prev_active: set[int]) -> list[str]:
        notes: list[str] = []
        if not self.pmu:
            caps = self.s.capabilities
            why = caps.get("llc_misses") or caps.get("instructions") or "unavailable"
            notes.append(
                f"no PMU ({why}): deciding on CPU time and cohesion only; LLC misses taken as "
                f"{self.p.assumed:.3g}/s per busy vCPU"
            )
        else:
            assumed = sum(1 for r in self.rows if r.movable and r.known and not r.measured)
            if assumed:
                notes.append(f"{assumed} vCPU(s) without an LLC miss rate: taken from CPU time")
        if not self.usable:
            notes.append("no usable CPUs: nothing to do")
            return notes
        if self.D == 1 and self.gran in ("llc", "node"):
            what = "NUMA node" if self.gran == "node" else "LLC domain"
            notes.append(
                f"one {what} on this host: at granularity {self.gran} there is nowhere to move a vCPU "
                "(granularity core or pu places vCPUs on cores, SMT siblings apart)"
            )
        self._check_whole_cores()
        floating, waiting = self._floating_vms()
        if waiting:
            notes.append(f"{len(waiting)} VM(s) not placed before they are sampled: {', '.join(waiting)}")
        self.agg = self._aggregate(exclude={id(r) for rows in floating.values() for r in rows})
        self._load_pus(exclude={id(r) for rows in floating.values() for r in rows})
        placed = self._place(floating, notes)
        if any(r.forced for r in placed):
            placed = self._release_forced(placed)
        self._rebalance(prev_active, notes, budget=self.p.max_moves)
        if self.gran in ("pu", "core"):
            moved = sum(1 for r in self.rows if r.kind in ("rebalance", "cohesion"))
            self._balance_pus(budget=self.p.max_moves - moved)
        self._initial_gains(placed)
        return notes

    def _release_forced(self, placed: list[_VCpuRow]) -> list[_VCpuRow]:
        """Place again, where there is room now, the VMs placed with no room left for them, once
        the first placements not worth making are dropped.

        The greedy placement fills the host before it knows which placements gain enough to be
        made: a VM placed last onto a full host (its vCPUs stacked on the last free PU) was
        placed against neighbours that may stay floating. Those are counted where they run now,
        and the stacked VM is placed afresh: whole, where it now fits."""
        self._initial_gains(placed)
        low = {
            r.gi
            for r in placed
            if r.kind == "initial" and r.gain < self._gain_needed(r) and not self._required(r)
        }
        forced = {r.gi for r in placed if r.forced and r.gi not in self.home} - low
        if not low or not forced:
            return placed
        for r in placed:
            if r.gi in low:
                self._add(self.agg, [r], r.dom, -1.0)
                r.dom, r.kind = r.seen_dom, ""
                if r.dom >= 0:
                    self._add(self.agg, [r], r.dom, 1.0)
        for gi in low | forced:
            self.agg.KU[gi] = self.agg.UG[gi] @ self.K
            self.agg.KP[gi] = self.agg.PG[gi] @ self.K
        kept = [r for r in placed if r.gi not in low]
        for gi in sorted(forced):
            rows = [r for r in kept if r.gi == gi]
            for r in rows:
                self._add(self.agg, [r], r.dom, -1.0)
                r.dom = -1
                r.forced = False
            self._place_vm(gi, rows)
        return kept

    def _required(self, r: _VCpuRow) -> bool:
        """A first placement the operator or the VM asked for, whatever the model thinks it
        gains: at pu/core granularity, or on whole cores; at llc/node it is optional."""
        return r.kind == "initial" and (r.whole or self.gran in ("pu", "core"))

    # whole_cores VMs: placed when each vCPU holds one whole core (its usable PUs) nobody else holds
    def _check_whole_cores(self) -> None:
        by_guest: defaultdict[int, list[_VCpuRow]] = defaultdict(list)
        for r in self.rows:
            if r.whole and r.movable:
                by_guest[r.gi].append(r)
        for gi, rows in by_guest.items():
            cores: defaultdict[int, int] = defaultdict(int)
            ok = True
            for r in rows:
                first = next(iter(r.vcpu.affinity), None)
                if first is None or first not in self.pos_of:
                    ok = False
                    break
                ci = int(self.pu_core[self.pos_of[first]])
                core_usable = self.topo.cores[ci] & self.usable
                if r.vcpu.affinity != core_usable or not core_usable:
                    ok = False
                    break
                cores[ci] += 1
            ok = ok and all(
                n <= len(self.core_pos[ci]) and np.all(self.excl_owner[self.core_pos[ci]] < 0)
                for ci, n in cores.items()
            )
            if ok:
                for ci in cores:
                    self.hold(self.core_pos[ci], gi)
            else:
                for r in rows:
                    r.aff_dom = -1  # re-place the VM whole

    def _floating_vms(self) -> tuple[dict[int, list[_VCpuRow]], list[str]]:
        floating: defaultdict[int, list[_VCpuRow]] = defaultdict(list)
        for r in self.rows:
            if r.movable and (r.aff_dom < 0 or not self._fits(r, r.aff_dom)):
                floating[r.gi].append(r)
        unknown = {r.gi for r in self.rows if r.movable and not r.known}
        ready: dict[int, list[_VCpuRow]] = {}
        waiting: list[str] = []
        for gi, rows in floating.items():
            if gi in unknown:
                waiting.append(self.guests[gi].name)
                continue
            ready[gi] = rows
            if rows[0].whole:
                continue  # whole_cores VMs float all together (see _check_whole_cores)
            # Partly placed (a first placement cut short, a domain that lost its CPUs): the
            # whole VM is placed again, so it is completed in one go, not a vCPU at a time;
            # the domain its placed vCPUs are in is kept when the rest fits there.
            lifted = {id(r) for r in rows}
            rest = [r for r in self.rows_of[gi] if r.movable and id(r) not in lifted]
            if rest:
                homes = np.bincount([r.aff_dom for r in rest], minlength=self.D)
                self.home[gi] = int(np.argmax(homes))
                ready[gi] = rows + rest
        return ready, sorted(waiting)

    def _fits(self, r: _VCpuRow, d: int) -> bool:
        """Whether the domain still has PUs this vCPU may use (usable, not held by another VM)."""
        if r.gi not in self.holders:
            return bool(self.capacity()[d] > 0)
        pos = self.dom_pos[d]
        free = self.usable_mask[pos] & ((self.excl_owner[pos] < 0) | (self.excl_owner[pos] == r.gi))
        return bool(free.any())

    def _aggregate(self, exclude: set[int]) -> _Aggregates:
        nd, ng = self.D, self.G
        agg = _Aggregates(
            np.zeros(nd),
            np.zeros(nd),
            np.zeros((ng, nd)),
            np.zeros(nd),
            np.zeros((ng, nd)),
            np.zeros((ng, nd)),
            np.zeros(ng),
        )
        for r in self.rows:
            agg.UT[r.gi] += r.u
            if id(r) in exclude:
                r.dom = r.pu = -1  # lifted: placed afresh below
                continue
            if r.dom < 0:
                continue
            self._add(agg, [r], r.dom, 1.0)
        agg.UT = np.maximum(agg.UT, 1e-9)
        agg.KU = agg.UG @ self.K
        agg.KP = agg.PG @ self.K
        return agg

    def _whole_costs(
        self, vms: Sequence[int], by_vm: Mapping[int, Sequence[_VCpuRow]]
    ) -> tuple[FloatArray, FloatArray, FloatArray]:
        """Each VM's cost as it is now, whole in one domain or split, and whole in every domain
        (+inf where there is no room for it), all others fixed; and its cohesion cost now.

        Vectorised over the VMs. "Now" counts what the VM's rows lose and cost their
        neighbours, its cross-domain transfers once, and its share of each domain's load cost
        as the load cost with it minus without it, the same way as "whole in d": the two are
        comparable, and equal for a VM already whole in d.
        """
        a, t, sig = self.agg, self.p.t, self.p.sharing
        g = np.asarray(vms, dtype=np.int64)
        own_p, own_w, own_u, own_n = self._vm_sums(vms, by_vm)
        bm, bw, bu = own_p.sum(axis=1), own_w.sum(axis=1), own_u.sum(axis=1)
        foreign_p, foreign_w = a.P[None, :] - a.PG[g], a.W[None, :] - a.WG[g]
        ku_own, kp_own = own_u @ self.K, own_p @ self.K
        ku, kp = a.KU[g] - ku_own, a.KP[g] - kp_own  # siblings that do not move with it
        ut = a.UT[g]
        held = np.array([gi in self.holders for gi in vms], dtype=bool)
        on_cap = np.where(held[:, None], 0.0, own_u)
        base = a.L[None, :] - on_cap  # every domain's load without the VM
        base_cost = self._load_cost(base)
        cost = (
            self._contention(bw[:, None], bm[:, None], foreign_p, foreign_w, self.M[None, :])
            + sig * t * (bm[:, None] * ku + bu[:, None] * kp) / ut[:, None]
            + t * bm[:, None] * self.rho[g]
            + self._load_cost(base + np.where(held, 0.0, bu)[:, None])
            - base_cost
        )
        whole_at = own_n >= own_n.sum(axis=1, keepdims=True) - 0.5
        room = (self.capacity()[None, :] - base >= bu[:, None] - 1e-9) | whole_at
        cost = self._mask([by_vm[gi][0] for gi in vms], np.where(room, cost, INF), whole=True)
        intra = 0.5 * ((own_p * ku_own).sum(axis=1) + (own_u * kp_own).sum(axis=1))
        cohesion = sig * t * ((own_p * ku).sum(axis=1) + (own_u * kp).sum(axis=1) + intra) / ut
        now = (
            self._contention(own_w, own_p, foreign_p, foreign_w, self.M[None, :]).sum(axis=1)
            + cohesion
            + t * (own_p * self.rho[g]).sum(axis=1)
            + (self._load_cost(base + on_cap) - base_cost).sum(axis=1)
        )
        return now, cost, cohesion

    def _vm_sums(
        self, vms: Sequence[int], by_vm: Mapping[int, Sequence[_VCpuRow]]
    ) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
        """Per VM (rows) and domain: its rows' misses/s, misses/s at risk, demand
        and count, in one pass over the rows."""
        if len(vms) == 1:  # one VM (the greedy revisit): its few rows summed directly
            out = np.zeros((4, 1, self.D))
            for r in by_vm[vms[0]]:
                out[:, 0, r.dom] += (r.m, r.w * r.m, r.u, 1.0)
            return out[0], out[1], out[2], out[3]
        rows = [r for gi in vms for r in by_vm[gi]]
        n, nr = len(vms), len(rows)
        sizes = np.fromiter((len(by_vm[gi]) for gi in vms), dtype=np.int64, count=n)
        dom = np.fromiter((r.dom for r in rows), dtype=np.int64, count=nr)
        idx = np.fromiter((r.i for r in rows), dtype=np.int64, count=nr)
        cell = np.repeat(np.arange(n, dtype=np.int64), sizes) * self.D + dom
        size, shape = n * self.D, (n, self.D)

        def per_cell(weights: FloatArray | None) -> FloatArray:
            out: FloatArray = np.bincount(cell, weights=weights, minlength=size).astype(np.float64)
            return out.reshape(shape)

        return (
            per_cell(self.row_m[idx]),
            per_cell(self.row_wm[idx]),
            per_cell(self.row_u[idx]),
            per_cell(None),
        )

    def _improvable(self, vms: list[int], by_vm: Mapping[int, Sequence[_VCpuRow]]) -> list[int]:
        """The VMs that a whole move seems to help, largest estimated gain first, by one
        vectorised look at all of them."""
        if not vms:
            return []
        now, cost, _ = self._whole_costs(vms, by_vm)
        gain = now - cost.min(axis=1)
        order = np.lexsort((np.arange(len(vms)), -np.round(gain, 12)))  # largest gain first
        return [vms[i] for i in order.tolist() if gain[i] > self.p.min_gain]

    def _best_whole(self, gi: int, rows: Sequence[_VCpuRow]) -> tuple[int, float, float]:
        """Where VM gi costs least whole, with everyone else as they are now: (domain, gain,
        cohesion cost now)."""
        now, cost, cohesion = self._whole_costs([gi], {gi: rows})
        best = int(np.argmin(np.round(cost[0], 12)))
        return best, float(now[0] - cost[0, best]), float(cohesion[0])

    def _add(self, a: _Aggregates, rows: Sequence[_VCpuRow], d: int, sign: float) -> None:
        """Count rows of one VM in domain d (sign +1) or take them out (-1); KU/KP are left to
        the caller, refreshed once per VM. Summed row by row in Python floats, the same IEEE
        additions in the same order as numpy item by item, with one item write per cell."""
        gi = rows[0].gi
        p, pg, w, wg, ug, load = (
            float(a.P[d]),
            float(a.PG[gi, d]),
            float(a.W[d]),
            float(a.WG[gi, d]),
            float(a.UG[gi, d]),
            float(a.L[d]),
        )
        on_cap = gi not in self.holders
        loaded = False
        for r in rows:
            m, wm = sign * r.m, sign * r.w * r.m
            p += m
            pg += m
            w += wm
            wg += wm
            ug += sign * r.u
            if on_cap and not r.off_cap:
                load += sign * r.u
                loaded = True
        a.P[d], a.PG[gi, d], a.W[d], a.WG[gi, d], a.UG[gi, d] = p, pg, w, wg, ug
        cached = a is self._cached_agg
        if cached and self._pf_now is not None:
            self._pf_now[d] = _phi(p, float(self.Ms[d]))
        if loaded:
            a.L[d] = load
            if cached and self._lc_now is not None:
                self._lc_now[d] = _load_loss_one(load, float(self.capacity()[d]), float(self.cores()[d]))
            else:
                self._lc_now = None

    def hold(self, pos: IntArray, gi: int) -> None:
        self.excl_owner[pos] = gi
        self.holders.add(gi)
        self._cap = None
        self._open = None
        self._cores = None
        self._lc_now = None

    def cores(self) -> FloatArray:
        """Cores per domain with at least one usable PU that no whole_cores VM holds."""
        if self._cores is None:
            free = self.usable_mask & (self.excl_owner < 0)
            n_core = len(self.core_pos)
            has = np.zeros(n_core, dtype=bool)
            has[self.pu_core[free]] = True
            dom_of_core = np.full(n_core, -1, dtype=np.int64)
            dom_of_core[self.pu_core] = self.pu_dom
            ok = has & (dom_of_core >= 0)
            self._cores = np.bincount(dom_of_core[ok], minlength=self.D).astype(np.float64)
        return self._cores

    def _load_cost(self, load: FloatArray, smt: bool = True) -> FloatArray:
        """vCPU-equivalents lost to a domain's CPU demand ``load`` (any shape, domains last).

        Demand above its PUs is lost to time-sharing; with ``smt``, demand above its cores
        puts busy threads on SMT siblings, each pair doing ~1.3x one thread's work. SMT is
        weighed where whole VMs are placed, not by single-vCPU moves: a VM is not split to
        leave a sibling idle.
        """
        out: FloatArray = _load_loss(load, self.capacity(), self.cores() if smt else None)
        return out

    def _load_cost_now(self) -> FloatArray:
        """The load cost of every domain as it is now (read once per VM by the greedy placement)."""
        self._cache_for(self.agg)
        if self._lc_now is None:
            self._lc_now = self._load_cost(self.agg.L)
        return self._lc_now

    def _phi_now(self) -> FloatArray:
        """phi of every domain's miss traffic as it is now (see _contention)."""
        self._cache_for(self.agg)
        if self._pf_now is None:
            self._pf_now = _phi(self.agg.P, self.Ms)
        return self._pf_now

    def _cache_for(self, agg: _Aggregates) -> None:
        if agg is not self._cached_agg:
            self._cached_agg, self._lc_now, self._pf_now = agg, None, None

    def _all_open(self) -> bool:
        """Whether every domain has capacity (cached with it)."""
        if self._open is None:
            self._open = bool((self.capacity() > 0).all())
        return self._open

    def capacity(self) -> FloatArray:
        """Usable PUs per domain that no whole_cores VM holds."""
        if self._cap is None:
            free = self.usable_mask & (self.excl_owner < 0)
            self._cap = np.bincount(self.pu_dom, weights=free.astype(np.float64), minlength=self.D).astype(
                np.float64
            )
        return self._cap

    def _load_pus(self, exclude: set[int]) -> None:
        for r in self.rows:
            if id(r) in exclude or r.pu < 0 or r.u <= 0:
                continue
            aff = (
                [self.pos_of[c] for c in r.vcpu.affinity if c in self.pos_of]
                if len(r.vcpu.affinity) <= 4
                else []
            )
            spots = aff if r.aff_dom >= 0 and aff else [r.pu]
            for p in spots:
                self._pu_add(p, r.gi, r.u / len(spots))

    def _pu_add(self, p: int, gi: int, u: float) -> None:
        self.pl[p] += u
        self.pl_guest[p][gi] += u

    # ------------------------------------------------------------------ cost rows
    def cost_rows(self, rows: Sequence[_VCpuRow], load_part: bool = True) -> FloatArray:
        """Cost (lost vCPU-equivalents) of each row's vCPU in each domain, everyone else fixed;
        without ``load_part``, leaving out what its demand adds to the domain's load cost."""
        a = self.agg
        n = len(rows)
        idx = np.fromiter((r.i for r in rows), dtype=np.int64, count=n)
        gi = self.row_gi[idx]
        m, u, wm = self.row_m[idx], self.row_u[idx], self.row_wm[idx]
        d = np.fromiter((r.dom for r in rows), dtype=np.int64, count=n)
        whole = self.row_whole[idx]
        here = np.zeros((n, self.D), dtype=bool)
        has = d >= 0
        here[np.flatnonzero(has), d[has]] = True
        mh, wmh = m[:, None] * here, wm[:, None] * here
        foreign = (a.P[None, :] - mh) - (a.PG[gi] - mh)
        foreign_w = (a.W[None, :] - wmh) - (a.WG[gi] - wmh)
        k_here = self.K[np.maximum(d, 0)]
        if not has.all():
            k_here = np.where(has[:, None], k_here, 0.0)
        ku = a.KU[gi] - u[:, None] * k_here
        kp = a.KP[gi] - m[:, None] * k_here
        t = self.p.t
        contention = self._contention(wm[:, None], m[:, None], foreign, foreign_w, self.M[None, :])
        cohesion = self.p.sharing * t * (m[:, None] * ku + u[:, None] * kp) / a.UT[gi][:, None]
        remote = t * m[:, None] * self.rho[gi]
        out: FloatArray = contention + cohesion + remote
        if load_part:
            load = a.L[None, :] - np.where(whole[:, None], 0.0, u[:, None] * here)
            uu = np.where(whole, 0.0, u)[:, None]
            out = out + self._load_cost(load + uu, smt=False) - self._load_cost(load, smt=False)
        return out

    def cohesion_part(self, r: _VCpuRow, d: int) -> float:
        a = self.agg
        own = self.K[r.dom] if r.dom >= 0 else np.zeros(self.D)
        ku = a.KU[r.gi, d] - r.u * own[d]
        kp = a.KP[r.gi, d] - r.m * own[d]
        return float(self.p.sharing * self.p.t * (r.m * ku + r.u * kp) / a.UT[r.gi])

    def _mask(self, rows: Sequence[_VCpuRow], costs: FloatArray, whole: bool = False) -> FloatArray:
        """Costs with domains a row may not go to set to +inf (no room for it, rolled back there,
        left within the guard's return window); with ``whole`` each row stands for its VM, moved
        whole, and a domain closed to any of its vCPUs is closed to it. ``costs`` itself when no
        domain is closed to any row (callers never write to it)."""
        closed = [self._closed_vm(r.gi) if whole else self._closed(r) for r in rows] if self.closed else []
        if not self.holders and not any(closed) and self._all_open():
            return costs  # nothing to mask (the hot case: every cold placement asks)
        out = np.where(self.capacity()[None, :] > 0, costs, INF)
        if not self.holders and not any(closed):
            return out
        for i, r in enumerate(rows):
            if r.gi in self.holders:
                out[i] = [c if self._fits(r, d) else INF for d, c in enumerate(costs[i])]
            if closed and closed[i]:
                out[i, list(closed[i])] = INF
        return out

    def _closed(self, r: _VCpuRow) -> tuple[int, ...]:
        return self.closed.get((r.guest.id, r.vcpu.index), ())

    def _closed_vm(self, gi: int) -> tuple[int, ...]:
        out = self._closed_vm_memo.get(gi)
        if out is None:
            doms = {d for r in self.rows_of[gi] for d in self._closed(r)}
            out = self._closed_vm_memo[gi] = tuple(sorted(doms))
        return out

    # ------------------------------------------------------------------ 1. place
    def _place(self, floating: dict[int, list[_VCpuRow]], notes: list[str]) -> list[_VCpuRow]:
        placed: list[_VCpuRow] = []
        order = sorted(floating, key=lambda gi: (-sum(r.m for r in floating[gi]), self.guests[gi].id))
        for gi in order:
            rows = sorted(floating[gi], key=lambda r: r.vcpu.index)
            if rows[0].whole and self._place_whole(gi, rows):
                placed.extend(rows)
                continue
            if rows[0].whole:
                notes.append(f"no free whole cores for {self.guests[gi].name}: placed without exclusivity")
            placed.extend(self._place_vm(gi, rows))
        self._improve(order, placed)
        self.placing = set(order)
        # Placed vCPUs of a partly placed VM that stay where they are: nothing to place (a refit
        # at most, step 4).
        for r in placed:
            if r.dom == r.aff_dom:
                r.kind = ""
        return [r for r in placed if r.kind]

    def _improve(self, order: list[int], placed: list[_VCpuRow]) -> None:
        """Revisit the greedy placement with everyone in: move a newly placed VM whole where it
        costs less now. The first VMs were placed before their neighbours were known (streaming
        VMs go first and cost nothing on an empty host); this puts them together, away from the
        cache-sensitive ones, before any move is made, so an arrival is placed in one shot."""
        by_vm: defaultdict[int, list[_VCpuRow]] = defaultdict(list)
        for r in placed:
            if not r.whole and r.dom >= 0:
                by_vm[r.gi].append(r)
        vms = [
            gi for gi in order if gi in by_vm and gi not in self.home and len({r.dom for r in by_vm[gi]}) == 1
        ]
        for _ in range(IMPROVE_ROUNDS):
            moved = False
            for gi in self._improvable(vms, by_vm):
                rows = by_vm[gi]
                best, gain, _ = self._best_whole(gi, rows)
                if best != rows[0].dom and gain > self.p.min_gain:
                    self._assign_many(rows, best, "initial")
                    moved = True
            moved = self._swaps(vms, by_vm, len(self.rows), "initial", None) > 0 or moved
            if not moved:
                break

    def _vm_scores(self, gi: int, rows: Sequence[_VCpuRow]) -> FloatArray:
        a, t = self.agg, self.p.t
        p_batch = sum(r.m for r in rows)
        w_batch = sum(r.w * r.m for r in rows)
        u_batch = sum(r.u for r in rows if not r.whole)
        remote = t * p_batch * self.rho[gi]
        overload = self._load_cost(a.L + u_batch) - self._load_cost_now()
        # count_nonzero, not .any(): a fifth of the cost, and this runs once per VM placed
        if np.count_nonzero(a.UG[gi]) or np.count_nonzero(a.PG[gi]):
            contention = self._contention(w_batch, p_batch, a.P - a.PG[gi], a.W - a.WG[gi], self.M)
            cohesion = self.p.sharing * t * (p_batch * a.KU[gi] + u_batch * a.KP[gi]) / a.UT[gi]
            scores: FloatArray = contention + cohesion + remote + overload
        else:  # nothing of it placed yet (the cold case): no siblings, no own share to take out
            contention = self._contention(w_batch, p_batch, a.P, a.W, self.M, self._phi_now(), self.Ms)
            scores = contention + remote + overload
        masked: FloatArray = self._mask(rows[:1], scores[None, :], whole=True)[0]
        return masked

    def _best_domain(self, scores: FloatArray, free: FloatArray) -> int:
        # lowest cost; among equals the most free capacity, then the most LLC (self.M is the LLC
        # size times a constant: an asymmetric host's big cache for a VM that costs the same
        # anywhere), then the lowest index
        best = int(scores.argmin())
        # no other score within 2e-12 of the lowest: it is also the one lowest when rounded to
        # 12 decimals (rounding is monotone), so the rounding below is needed only near a tie
        if np.count_nonzero(scores < scores[best] + 2e-12) == 1:
            return best
        rounded = np.round(scores, 12)
        best = int(rounded.argmin())
        if np.count_nonzero(rounded == rounded[best]) == 1:
            return best
        order = np.lexsort((np.arange(self.D), -self.M, -free, rounded))
        return int(order[0])

    def _place_vm(self, gi: int, rows: list[_VCpuRow]) -> list[_VCpuRow]:
        """The VM whole into the cheapest domain with room for it -- a partly placed VM into the
        domain its placed vCPUs are in when it fits there (they need not move). Only a VM that
        fits in no domain is split: the roomiest domain first, in as few pieces as possible."""
        todo = list(rows)
        done: list[_VCpuRow] = []
        home = self.home.get(gi)
        while todo:
            scores = self._vm_scores(gi, todo)
            ok = np.isfinite(scores)
            if not np.count_nonzero(ok):  # (cheaper than .any() on arrays this small)
                break
            free = self.capacity() - self.agg.L
            need = sum(r.u for r in todo)
            fit = ok & (free >= need - 1e-9)
            if np.count_nonzero(fit):
                d = self._best_domain(np.where(fit, scores, INF), free)
                if home is not None and fit[home]:
                    d = home
                take = len(todo)
            else:
                some = ok & (free >= todo[0].u - 1e-9) & (free > 1e-9)
                if some.any():  # fill the roomiest domain, then the next
                    roomiest = -np.where(some, free, -INF)
                    d = int(np.lexsort((np.arange(self.D), np.round(scores, 12), roomiest))[0])
                else:  # no room anywhere: time-share, but together
                    d = self._best_domain(scores, free)
                    for r in todo:
                        r.forced = True
                room = free[d] if some.any() else INF
                take = 0
                used = 0.0
                for r in todo:
                    if take and used + r.u > room + 1e-9:
                        break
                    used += r.u
                    take += 1
            home = None
            self._assign_many(todo[:take], d, "initial")
            done.extend(todo[:take])
            todo = todo[take:]
        return done

    def _place_whole(self, gi: int, rows: list[_VCpuRow]) -> bool:
        need = len(rows)
        free_cores = [
            ci
            for ci, pos in enumerate(self.core_pos)
            if len(pos) and np.all(self.usable_mask[pos]) and np.all(self.excl_owner[pos] < 0)
        ]
        if sum(len(self.core_pos[ci]) for ci in free_cores) < need:
            return False
        todo = list(rows)
        while todo:
            scores = self._vm_scores(gi, todo)
            by_dom: defaultdict[int, list[int]] = defaultdict(list)
            for ci in free_cores:
                if np.all(self.excl_owner[self.core_pos[ci]] < 0):
                    by_dom[int(self.pu_dom[self.core_pos[ci][0]])].append(ci)
            if not by_dom:
                return False
            doms = sorted(by_dom, key=lambda d: (round(float(scores[d]), 12), -len(by_dom[d]), d))
            d = doms[0]
            cores = sorted(by_dom[d], key=lambda ci: (float(self.pl[self.core_pos[ci]].sum()), ci))
            for ci in cores:
                if not todo:
                    break
                pos = self.core_pos[ci]
                self.hold(pos, gi)
                for p in pos:
                    if not todo:
                        break
                    r = todo.pop(0)
                    self._assign(r, d, "initial", pu=int(p))
        return True

    def _assign(self, r: _VCpuRow, d: int, kind: str, pu: int | None = None) -> None:
        self._assign_many([r], d, kind, pu)

    def _assign_many(self, rows: Sequence[_VCpuRow], d: int, kind: str, pu: int | None = None) -> None:
        """Put vCPUs of one VM into domain d: aggregates (refreshed once), PU choice, kind."""
        # one VM none of whose rows is in d yet: added in one pass, after being taken out of
        # other domains' cells (the same sums as row by row); otherwise row by row
        at_once = len({r.gi for r in rows}) == 1 and all(r.dom != d for r in rows)
        for r in rows:
            if r.dom >= 0:
                self._add(self.agg, [r], r.dom, -1.0)
            if not at_once:
                self._add(self.agg, [r], d, 1.0)
        if at_once:
            self._add(self.agg, rows, d, 1.0)
        for r in rows:
            r.dom = d
            r.kind = kind
            chosen = pu
            if chosen is None and self.gran in ("pu", "core"):
                chosen = self._choose_pu(r, d)
            if chosen is not None:
                if r.pu >= 0 and r.u > 0:
                    took = min(self.pl_guest[r.pu][r.gi], r.u)
                    self.pl[r.pu] -= took
                    self.pl_guest[r.pu][r.gi] -= took
                self._pu_add(chosen, r.gi, r.u)
                r.pu = chosen
        for gi in {r.gi for r in rows}:
            self.agg.KU[gi] = self.agg.UG[gi] @ self.K
            self.agg.KP[gi] = self.agg.PG[gi] @ self.K

    def _choose_pu(self, r: _VCpuRow, d: int) -> int:
        """Least-loaded PU of the domain; idle cores first, then a core shared with its own VM."""
        pos = self.dom_pos[d]
        ok = self.usable_mask[pos] & ((self.excl_owner[pos] < 0) | (self.excl_owner[pos] == r.gi))
        for cpus in self.bad.get((r.guest.id, r.vcpu.index), ()):
            if len(cpus) == 1:
                ok &= np.asarray(self.topo.pus)[pos] != cpus.first()
        pos = pos[ok]
        if len(pos) == 0:
            return int(self.dom_pos[d][0])
        mine = np.array([self.pl_guest[int(p)].get(r.gi, 0.0) for p in pos])
        own = self.pl[pos] - np.where(pos == r.pu, mine, 0.0)
        core = self.pu_core[pos]
        # per core: load of the VM itself and of everyone, over all its PUs
        core_all = np.bincount(self.pu_core, weights=self.pl, minlength=len(self.core_pos))[core]
        core_mine = np.zeros(len(pos))
        for i, c in enumerate(core.tolist()):
            core_mine[i] = sum(self.pl_guest[int(q)].get(r.gi, 0.0) for q in self.core_pos[c])
        sib_mine = core_mine - mine
        sib_others = (core_all - self.pl[pos]) - sib_mine
        score = own + 0.5 * np.minimum(sib_others, 1.0) + 0.1 * np.minimum(sib_mine, 1.0)
        return int(pos[int(np.argmin(np.round(score, 12)))])

    # ------------------------------------------------------------------ 2. rebalance
    def _pressure(self) -> FloatArray:
        """Per domain: the largest share of its demand any one VM loses there (vCPU-eq. per CPU).

        Per VM, not pooled: a small VM split in two must not be drowned by a big quiet neighbour.
        """
        rows = [r for r in self.rows if r.dom >= 0]
        if not rows:
            return np.zeros(self.D)
        cost = self._own_costs(rows)
        cell = np.fromiter((r.gi * self.D + r.dom for r in rows), dtype=np.int64, count=len(rows))
        size = self.G * self.D
        demand = np.bincount(cell, weights=[max(r.u, 0.05) for r in rows], minlength=size)
        lost = np.bincount(cell, weights=cost, minlength=size)
        share = (lost / np.maximum(demand, 1e-9)).reshape(self.G, self.D)
        pressure: FloatArray = share.max(axis=0)
        return pressure

    def _own_costs(self, rows: Sequence[_VCpuRow]) -> FloatArray:
        """What each vCPU loses where it is now (its overload share pro rata of demand)."""
        a, t, n = self.agg, self.p.t, len(rows)
        gi = np.fromiter((r.gi for r in rows), dtype=np.int64, count=n)
        d = np.fromiter((r.dom for r in rows), dtype=np.int64, count=n)
        m = np.fromiter((r.m for r in rows), dtype=np.float64, count=n)
        u = np.fromiter((r.u for r in rows), dtype=np.float64, count=n)
        w = np.fromiter((r.w for r in rows), dtype=np.float64, count=n)
        on_cap = np.fromiter((not r.off_cap for r in rows), dtype=bool, count=n)
        foreign = a.P[d] - a.PG[gi, d]
        foreign_w = a.W[d] - a.WG[gi, d]
        contention = self._contention(w * m, m, foreign, foreign_w, self.M[d])
        cohesion = self.p.sharing * t * (m * a.KU[gi, d] + u * a.KP[gi, d]) / a.UT[gi]
        remote = t * m * self.rho[gi, d]
        load = a.L[d]
        share = np.where((load > 0) & on_cap, u / np.maximum(load, 1e-9), 0.0)
        overload = self._load_cost(a.L, smt=False)[d] * share
        out: FloatArray = contention + cohesion + remote + overload
        return out

    def _rebalance(self, prev_active: set[int], notes: list[str], budget: int) -> None:
        pressure = self._pressure()
        label_to_dom = {int(lbl): d for d, lbl in enumerate(self.labels)}
        was = {label_to_dom[lbl] for lbl in prev_active if lbl in label_to_dom}
        self.active = {
            d for d in range(self.D) if pressure[d] > self.p.enter or (d in was and pressure[d] > self.p.exit)
        }
        if self.active:
            names = ", ".join(f"{int(self.labels[d])} ({pressure[d]:.3f})" for d in sorted(self.active))
            notes.append(f"{'node' if self.gran == 'node' else 'LLC'} domains under pressure: {names}")
        if not self.active or budget <= 0:
            return
        pool = [
            r
            for r in self.rows
            if r.movable
            and r.known
            and not r.whole
            and not r.kind
            and r.dom in self.active
            and r.aff_dom >= 0
            and r.gi not in self.placing
        ]
        if not pool:
            return
        # VMs all of whose vCPUs may move, one of them at least in an active domain
        eligible: defaultdict[int, list[_VCpuRow]] = defaultdict(list)
        for r in self.rows:
            if (
                r.movable
                and r.known
                and not r.whole
                and not r.kind
                and r.dom >= 0
                and r.aff_dom >= 0
                and r.gi not in self.placing
            ):
                eligible[r.gi].append(r)
        whole_vms = [gi for gi in sorted(eligible) if len(eligible[gi]) == len(self.guests[gi].vcpus)]
        touched = {r.gi for r in pool}
        budget -= self._move_whole_vms(eligible, [gi for gi in whole_vms if gi in touched], pressure, budget)
        if budget > 0:
            still = [gi for gi in whole_vms if not any(r.kind for r in eligible[gi])]
            budget -= self._swaps(still, eligible, budget, "rebalance", pressure)
        pool = [r for r in pool if not r.kind]
        if not pool or budget <= 0:
            return
        own = self._own_costs(pool)
        order = np.lexsort((np.arange(len(pool)), -own))[: self.p.candidates]
        cand = [pool[i] for i in order]
        counts = {gi: np.zeros(self.D) for gi in {r.gi for r in cand}}
        for gi, c in counts.items():
            for r in self.rows_of[gi]:
                if r.dom >= 0:
                    c[r.dom] += 1
        max_cap = float(self.capacity().max())
        big = {gi: float(self.agg.UT[gi]) > max_cap + 1e-9 for gi in counts}
        for _ in range(budget):
            if not cand:
                break
            costs = self._mask(cand, self.cost_rows(cand))
            here = np.array(
                [
                    costs[i, r.dom] if np.isfinite(costs[i, r.dom]) else self._raw_here(r)
                    for i, r in enumerate(cand)
                ]
            )
            delta = costs - here[:, None]
            for i, r in enumerate(cand):
                delta[i, r.dom] = INF
                others = counts[r.gi] - (np.arange(self.D) == r.dom)
                if not big[r.gi]:  # never split a VM that fits in one domain: only gather it,
                    # to where at least as many of its other vCPUs are as where it leaves
                    delta[i, (others <= 0) | (others < others[r.dom])] = INF
                elif others[r.dom] > 0:  # a VM bigger than any domain: spread over no more
                    # domains than now (a vCPU alone in its domain may go to a new one)
                    delta[i, others <= 0] = INF
            flat = int(np.argmin(delta))
            i, d = divmod(flat, self.D)
            gain = -float(delta[i, d])
            if not gain >= self.move_gain:
                break
            r = cand.pop(i)
            coh_gain = self.cohesion_part(r, r.dom) - self.cohesion_part(r, d)
            src = r.dom
            counts[r.gi][src] -= 1
            counts[r.gi][d] += 1
            self._assign(r, d, "cohesion" if coh_gain > gain / 2 else "rebalance")
            r.gain = gain
            r.why = (
                f"{self._pressure_text(src, pressure)}: "
                f"to {self._dom_name(d)}, est. {gain:.3f} vCPU-equivalents regained"
                f" ({'mostly VM cohesion' if r.kind == 'cohesion' else 'less cache contention / load'})"
            )

    def _pressure_text(self, d: int, pressure: FloatArray) -> str:
        p = float(pressure[d])
        if p > self.p.enter:
            return f"{self._dom_name(d)} pressure {p:.3f} > {self.p.enter:g}"
        return f"{self._dom_name(d)} pressure {p:.3f}, still > exit {self.p.exit:g} (active last tick)"

    def _move_whole_vms(
        self, by_vm: Mapping[int, list[_VCpuRow]], vms: list[int], pressure: FloatArray, budget: int
    ) -> int:
        """Move VMs of active domains whole where they cost less (a single-vCPU move would
        pay for splitting the VM first), and gather split VMs whole where there is room for
        them; returns how many vCPUs moved."""
        used = 0
        for gi in self._improvable(vms, by_vm):
            if used >= budget:
                break
            rows = by_vm[gi]
            best, gain, cohesion = self._best_whole(gi, rows)
            moving = [r for r in rows if r.dom != best]
            if not moving or not gain >= self.move_gain * len(moving):
                continue
            if used + len(moving) > budget:
                continue
            here = moving[0].dom
            split = len({r.dom for r in rows}) > 1
            kind = "cohesion" if split and cohesion > gain / 2 else "rebalance"
            self._assign_many(moving, best, kind)
            used += len(moving)
            what = "gathered" if split else "whole"
            why = "mostly VM cohesion" if kind == "cohesion" else "less cache contention / load"
            for r in moving:
                r.gain = gain / len(moving)
                r.why = (
                    f"{self._pressure_text(here, pressure)}: "
                    f"{r.guest.name} {what} to {self._dom_name(best)}, est. {gain:.3f} "
                    f"vCPU-equivalents regained ({why})"
                )
        return used

    def _swaps(
        self,
        vms: list[int],
        by_vm: Mapping[int, list[_VCpuRow]],
        budget: int,
        kind: str,
        pressure: FloatArray | None,
    ) -> int:
        """Two VMs, each whole in its domain, exchange domains, best pair first, while the
        exchange gains at least ``min_gain`` per vCPU moved and no domain is pushed over its
        capacity. This is what a full host needs when neither VM has room to move alone (two
        hungry VMs in one domain, two sensitive ones in the other). With ``pressure`` (a
        rebalance) one of the two must be in an active domain. Returns vCPUs moved."""
        a, t = self.agg, self.p.t
        per_vcpu = self.p.min_gain if pressure is None else self.move_gain
        pool = [gi for gi in vms if gi not in self.holders and len({r.dom for r in by_vm[gi]}) == 1]
        used = 0
        cap, cores = self.capacity(), self.cores()

        def lc(x: FloatArray, d: IntArray) -> FloatArray:
            out: FloatArray = _load_loss(x, cap[d], cores[d])
            return out

        # Per-VM sums do not change as VMs swap (swapped VMs leave the pool): computed once.
        all_h = np.array([by_vm[gi][0].dom for gi in pool], dtype=np.int64)
        own_p, own_w, own_u, own_n = self._vm_sums(pool, by_vm)
        all_bm, all_bw, all_bu = own_p.sum(axis=1), own_w.sum(axis=1), own_u.sum(axis=1)
        all_size = own_n.sum(axis=1)
        all_mask = self._mask([by_vm[gi][0] for gi in pool], np.zeros((len(pool), len(self.M))), whole=True)
        all_xr = t * all_bm[:, None] * self.rho[np.asarray(pool, dtype=np.int64)] + all_mask
        alive = list(range(len(pool)))
        # After a pass, a pair whose first VM was a first then and whose two domains no swap of
        # that pass touched has the same gain as then, which was too small (else it was taken):
        # it is not costed again. Exact: every figure of a pair is of its two domains alone.
        judged = np.zeros(0, dtype=np.int64)  # the last pass's first VMs (guest indices)
        changed = np.zeros(self.D, dtype=bool)  # the domains its swaps touched
        while len(alive) >= 2 and used < budget:
            sel = np.asarray(alive, dtype=np.intp)
            lc_now = self._load_cost(a.L)  # per domain, for every pair's load cost before
            live = [pool[q] for q in alive]
            n = len(live)
            g = np.asarray(live, dtype=np.int64)
            h, bm, bw, bu, size = all_h[sel], all_bm[sel], all_bw[sel], all_bu[sel], all_size[sel]
            xr = all_xr[sel]
            home_p, home_w = a.P[h] - a.PG[g, h], a.W[h] - a.WG[g, h]
            at_home = self._contention(bw, bm, home_p, home_w, self.M[h]) + xr[np.arange(n), h]
            # the first of the pair: the VMs that cost most where they are (bounded work)
            first = np.lexsort((np.arange(n), -at_home))[: max(1, min(n, self.p.candidates // 4))]
            if pressure is not None:
                first = first[np.isin(h[first], sorted(self.active))]
            if len(first) == 0:
                break
            hf = h[first]
            du = bu[None, :] - bu[first][:, None]  # load change in the first's domain
            new_i, new_j = a.L[hf][:, None] + du, a.L[h][None, :] - du
            fits = (
                (hf[:, None] != h[None, :])
                & ((new_i <= cap[hf][:, None] + 1e-9) | (du <= 1e-9))
                & ((new_j <= cap[h][None, :] + 1e-9) | (du >= -1e-9))
                & (size[first][:, None] + size[None, :] <= budget - used)
            )
            if len(judged):
                new = ~np.isin(g[first], judged)
                fits &= new[:, None] | changed[hf][:, None] | changed[h][None, :]
            judged = g[first]
            changed = np.zeros(self.D, dtype=bool)
            # Only the pairs that fit are costed, as flat arrays of (first[fp], jp): on a full
            # host about a quarter of them. Each figure is the same per-element arithmetic as
            # over the whole (first x pool) matrix, so the gains are exactly those.
            fp, jp = np.nonzero(fits)
            ip = first[fp]
            di, dj = h[ip], h[jp]
            # each where the other was, the other gone from there
            after = (
                self._contention(bw[ip], bm[ip], a.P[dj] - bm[jp], a.W[dj] - bw[jp], self.M[dj])
                + xr[ip, dj]
                + self._contention(bw[jp], bm[jp], a.P[di] - bm[ip], a.W[di] - bw[ip], self.M[di])
                + xr[jp, di]
            )
            before = at_home[ip] + at_home[jp]
            load = lc(new_i[fp, jp], di) + lc(new_j[fp, jp], dj) - lc_now[di] - lc_now[dj]
            with np.errstate(invalid="ignore"):  # a VM where it may not stay: inf - inf
                gain = before - after - load
            ok = np.isfinite(after) & np.isfinite(gain) & (gain >= per_vcpu * (size[ip] + size[jp]))
            if not ok.any():
                break
            fp, jp, gain = fp[ok], jp[ok], gain[ok]
            score = np.full(fits.shape, -INF)
            score[fp, jp] = np.round(gain, 12)
            pair_gain = np.zeros(fits.shape)
            pair_gain[fp, jp] = gain
            # Several swaps per pass: a pair's gain depends only on the aggregates of its two
            # domains, so once the best pair is swapped every pair touching neither of its
            # domains keeps its exact gain, and the best of those is taken next. Pairs touching
            # a swapped domain wait for the next pass, recomputed.
            gone: set[int] = set()
            while used < budget:
                k = int(score.argmax())
                fi, j = divmod(k, n)
                if not score[fi, j] > -INF:
                    break
                i = int(first[fi])
                gi, gj = live[i], live[j]
                moved = len(by_vm[gi]) + len(by_vm[gj])
                if moved > budget - used:
                    score[fi, j] = -INF
                    continue
                hi, hj = int(h[i]), int(h[j])
                self._swap_pair(by_vm, gi, gj, hi, hj, float(pair_gain[fi, j]), kind, pressure)
                used += moved
                gone.update((gi, gj))
                changed[[hi, hj]] = True
                touched = (h == hi) | (h == hj)
                score[touched[first], :] = -INF
                score[:, touched] = -INF
            alive = [q for q in alive if pool[q] not in gone]
        return used

    def _swap_pair(
        self,
        by_vm: Mapping[int, list[_VCpuRow]],
        gi: int,
        gj: int,
        di: int,
        dj: int,
        gain: float,
        kind: str,
        pressure: FloatArray | None,
    ) -> None:
        moved = len(by_vm[gi]) + len(by_vm[gj])
        self._assign_many(by_vm[gi], dj, kind)
        self._assign_many(by_vm[gj], di, kind)
        self._link(gi, gj)
        for gx, src, dst, other in ((gi, di, dj, gj), (gj, dj, di, gi)):
            head = (
                f"{self._dom_name(src)} pressure {pressure[src]:.3f}: "
                if pressure is not None
                else "first placement: "
            )
            for r in by_vm[gx]:
                r.gain = gain / moved
                r.why = (
                    f"{head}{r.guest.name} swaps with {self.guests[other].name} to "
                    f"{self._dom_name(dst)}, est. {gain:.3f} vCPU-equivalents regained "
                    "(less cache contention / load; neither has room to move alone)"
                )

    def _link(self, gi: int, gj: int) -> None:
        """Tie two VMs' moves into one group (merging any groups either was in already)."""
        rows = self.rows_of[gi] + self.rows_of[gj]
        old = {r.group for r in rows if r.group}
        group = min(old) if old else f"swap {self.guests[gi].id} {self.guests[gj].id}"
        if old:  # rows of other VMs are only in a group either was in already
            for r in self.rows:
                if r.group in old:
                    r.group = group
        for r in rows:
            r.group = group

    def _raw_here(self, r: _VCpuRow) -> float:
        return float(self.cost_rows([r])[0, r.dom])

    def _dom_name(self, d: int) -> str:
        return f"{'node' if self.gran == 'node' else 'LLC'} {int(self.labels[d])}"

    # ------------------------------------------------------------------ 3. PUs
    def _balance_pus(self, budget: int) -> None:
        """pu/core granularity: spread vCPUs doubled up on a PU, and busy SMT pairs of two VMs."""
        for r in self.rows:
            if budget <= 0:
                return
            if not (r.movable and r.known and not r.whole and not r.kind and r.aff_dom >= 0 and r.pu >= 0):
                continue
            if r.u < BUSY:
                continue
            p = r.pu
            doubled = self.pl[p] - r.u
            sib_other = self._sibling_load(p, r.gi)
            new = self._choose_pu(r, r.dom)
            if new == p:
                continue
            new_doubled = self.pl[new]
            new_sib = self._sibling_load(new, r.gi)
            gain = min(doubled, r.u) - min(new_doubled, r.u)
            gain += SMT_LOSS * (min(sib_other, r.u) - min(new_sib, r.u))
            if gain < max(self.p.min_gain, 0.05):
                continue
            self._assign(r, r.dom, "balance", pu=new)
            r.gain = gain
            r.why = (
                f"CPU {self.topo.pus[p]} shared with {doubled:.2f} CPU of other vCPUs, "
                f"{sib_other:.2f} on its SMT sibling: to CPU {self.topo.pus[new]} "
                f"(est. {gain:.3f} vCPU-equivalents)"
            )
            budget -= 1

    def _sibling_load(self, p: int, gi: int) -> float:
        """CPU demand of other VMs on the SMT siblings of PU position p."""
        sib = (int(s) for s in self.core_pos[int(self.pu_core[p])] if s != p)
        return float(sum(self.pl[s] - self.pl_guest[s].get(gi, 0.0) for s in sib))

    # ------------------------------------------------------------------ 4. gains and targets
    def _initial_gains(self, placed: list[_VCpuRow]) -> None:
        """Gain of confining a floating vCPU: its expected cost where the scheduler may run it
        (its current affinity's domains, weighted by their share of its PUs) minus its cost
        where it was placed. Domains it may not use count as nothing. The load term is the
        VM's, shared by its vCPUs (``_load_shares``)."""
        if not placed:
            return
        costs = self.cost_rows(placed, load_part=False) + self._load_shares(placed)
        finite = np.isfinite(costs)
        weights = np.array(
            [r.aff_weights if r.aff_weights is not None else np.full(self.D, 1.0 / self.D) for r in placed]
        )
        weights = np.where(finite, weights, 0.0)
        # The scheduler does not wake a thread into a domain that is full while another it may
        # use has an idle PU: a full domain is no part of where a floating vCPU would run.
        u = np.fromiter((r.u for r in placed), dtype=np.float64, count=len(placed))
        d = np.fromiter((r.dom for r in placed), dtype=np.int64, count=len(placed))
        others = self.agg.L[None, :] - np.where(np.arange(self.D)[None, :] == d[:, None], u[:, None], 0.0)
        room = others + u[:, None] <= self.capacity()[None, :] + 1e-9
        has_room = (room & (weights > 0)).any(axis=1, keepdims=True)
        weights = np.where(has_room & ~room, 0.0, weights)
        weights /= np.maximum(weights.sum(axis=1, keepdims=True), 1e-12)
        floating = (weights * np.where(finite, costs, 0.0)).sum(axis=1)
        here = costs[np.arange(len(placed)), [r.dom for r in placed]]
        gains = floating - np.where(np.isfinite(here), here, floating)
        # One decision per VM, never per vCPU (a VM half confined is split): each vCPU gets the
        # VM's mean gain; completing a partly placed VM is always worth it (cohesion).
        gi = self.row_gi[np.fromiter((r.i for r in placed), dtype=np.int64, count=len(placed))]
        mean = (
            np.bincount(gi, weights=gains, minlength=self.G)
            / np.maximum(np.bincount(gi, minlength=self.G), 1)
        ).tolist()
        texts: dict[tuple[int, int], str] = {}  # one reason per VM and domain, not per vCPU
        per_vm = (self.agg.PG if self.pmu else self.agg.UG).sum(axis=1).tolist()
        for r in placed:
            gain = mean[r.gi]
            if r.gi in self.home:
                gain = max(gain, self.p.min_gain)
            r.gain = gain
            why = texts.get((r.gi, r.dom))
            if why is None:
                why = texts[r.gi, r.dom] = (
                    f"first placement of {r.guest.name} in {self._dom_name(r.dom)}"
                    f"{' on whole cores' if r.whole else ''} (VM {self._vm_miss_text(per_vm[r.gi])}): est. "
                    f"{gain:.3f} vCPU-equivalents regained vs. floating"
                )
            r.why = why

    def _load_shares(self, placed: list[_VCpuRow]) -> FloatArray:
        """Per placed row and domain: its share (pro rata of demand) of the load cost its VM's
        placed vCPUs, all of them in that domain, add there: time-sharing and busy SMT pairs.

        Per VM, not per vCPU: charged one vCPU at a time with the rest of its VM in, a domain
        one thread over its cores would charge a pair's loss to every vCPU in it. The SMT part
        counts because a floating VM runs where the scheduler wakes it, on an SMT sibling of a
        confined VM's vCPU as readily as on an idle core of another domain."""
        n = len(placed)
        idx = np.fromiter((r.i for r in placed), dtype=np.int64, count=n)
        gi = self.row_gi[idx]
        u = np.where(self.row_whole[idx], 0.0, self.row_u[idx])
        d = np.fromiter((r.dom for r in placed), dtype=np.int64, count=n)
        vms, inv = np.unique(gi, return_inverse=True)
        here = np.zeros((len(vms), self.D))
        np.add.at(here, (inv, d), u)
        total = here.sum(axis=1)
        base = self.agg.L[None, :] - here
        added = self._load_cost(base + total[:, None]) - self._load_cost(base)
        share = np.divide(u, total[inv], out=np.zeros(n), where=total[inv] > 0)
        out: FloatArray = added[inv] * share[:, None]
        return out

    def _vm_miss_text(self, total: float) -> str:
        """A VM's LLC misses/s (its CPU demand without a PMU), from its row of PG (UG)."""
        if self.pmu:
            return f"{total / 1e6:.1f}M LLC misses/s"
        return f"{total:.2f} CPUs"

    def wanted(self, r: _VCpuRow) -> CpuSet:
        """The affinity this vCPU should have given its domain/PU and who holds what."""
        topo = self.topo
        if r.whole and r.gi in self.holders and r.pu >= 0 and self.excl_owner[r.pu] == r.gi:
            return topo.cores[int(self.pu_core[r.pu])] & self.usable
        if self.gran in ("llc", "node") and r.gi not in self.holders:
            key = (r.dom, len(self.holders))
            cached = self._wanted_cache.get(key)
            if cached is None:
                pos = self.dom_pos[r.dom]
                pos = pos[self.usable_mask[pos] & (self.excl_owner[pos] < 0)]
                cached = self._wanted_cache[key] = CpuSet(topo.pus[int(p)] for p in pos)
            return cached
        free = self.usable_mask & ((self.excl_owner < 0) | (self.excl_owner == r.gi))
        if self.gran in ("llc", "node"):
            pos = self.dom_pos[r.dom]
            pos = pos[free[pos]]
        elif self.gran == "core":
            pos = self.core_pos[int(self.pu_core[r.pu])]
            pos = pos[free[pos]]
        else:
            pos = np.array([r.pu] if free[r.pu] else [], dtype=np.int64)
        return CpuSet(topo.pus[int(p)] for p in pos)

    def _gain_needed(self, r: _VCpuRow) -> float:
        if r.kind == "initial" and r.guest.id in self.prev_left:
            return self.p.min_gain * FLOATING_HYSTERESIS
        return self.p.min_gain

    def targets(self) -> list[Target]:
        out: list[Target] = []
        for r in self.rows:
            if not r.movable or r.dom < 0 or (not r.kind and r.aff_dom < 0):
                continue
            if self._required(r):
                r.gain = max(r.gain, 0.0)
            elif r.kind and r.gain < self._gain_needed(r):
                if r.kind == "initial" and r.known:
                    self.left_floating.add(r.guest.id)
                continue  # not worth confining (yet): leave it to the scheduler
            if r.pu < 0 and self.gran in ("pu", "core"):
                continue
            cpus = self.wanted(r)
            if not cpus:
                continue
            if r.kind:
                out.append(Target(r.guest, r.vcpu, cpus, r.why, r.gain, r.kind, r.group))
            elif cpus != r.vcpu.affinity:
                why = (
                    f"refit to {self._dom_name(r.dom)}: its allowed CPUs changed (usable, taken, whole cores)"
                )
                out.append(Target(r.guest, r.vcpu, cpus, why, REFIT_GAIN, "refit"))
        return out
