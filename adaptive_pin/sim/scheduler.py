"""Where threads run each tick: a Linux-like load balancer that is blind to cache pressure.

What it imitates of CFS/EEVDF (kernel/sched/fair.c), at the granularity of one tick:
- a thread stays on its CPU while that CPU is allowed (tasks are sticky; migration is costly);
- a thread that must be placed takes an idle PU first, an idle *core* before an idle SMT
  sibling (select_idle_core), its previous LLC before another one (select_idle_sibling);
- periodic/newidle balancing pulls a second runnable thread off a busy PU to an idle one,
  same LLC first, then same node, then anywhere the affinity allows; splits two busy
  threads on one core when a whole core is idle; and evens the CPU demand of the cores of an
  LLC (SD_PREFER_SIBLING: a task per core before two);
- when no PU is idle (overcommit), periodic balancing still evens the runnable load: a thread
  leaves an overloaded PU for the least loaded allowed one of its LLC (then node, then any)
  when the busier queue carries ``IMBALANCE_PCT`` times the other's load and the thread's
  demand is no more than their difference (load_balance's imbalance_pct, detach_tasks' test);
- an LLC whose demand is above its PUs gives threads to an LLC with room for them (the package
  and NUMA levels: group_overloaded against group_has_spare), active balancing included;
- noise: threads that sleep part of the time wake on another PU of their LLC that is idle or
  less loaded, and now and then any thread is pulled to another LLC by transient host load.
Rates and choices are in docs/simulator.md ("Scheduler"); the RNG is seeded by the scenario.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from adaptive_pin.model import Topology

BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

# Wakeup migrations per second of sleep (a vCPU halts, then wakes on another idle PU of its LLC).
WAKE_MIGRATIONS_PER_IDLE_S = 2.0
# Migrations to another LLC per second from transient host load (kworkers, IRQ threads).
CROSS_LLC_NOISE_PER_S = 0.02
# sd->imbalance_pct of the MC (LLC) sched domain: balance when the busiest queue carries 17 %
# more load than the one pulling (kernel/sched/topology.c, sd_init).
IMBALANCE_PCT = 1.17


@dataclass
class Placement:
    pu: IntArray  # position in topology.pus per thread, -1 when it has no allowed online PU
    got: FloatArray  # CPU time fraction it got this tick
    delay: FloatArray  # runnable-but-waiting fraction (demand - got)
    migrated: BoolArray  # moved by the scheduler this tick


class LinuxLikeScheduler:
    """Place N threads on PUs given each one's affinity mask and CPU demand (0..1)."""

    def __init__(self, topology: Topology, rng: np.random.Generator) -> None:
        self.topo = topology
        self.rng = rng
        self.core = topology.pu_core
        self.llc = topology.pu_llc
        self.node = topology.pu_node
        self.n_pu = len(topology.pus)
        self.n_llc = int(self.llc.max()) + 1
        self.n_core = int(self.core.max()) + 1
        self.llc_pus = np.bincount(self.llc, minlength=self.n_llc).astype(np.float64)

    # --- helpers -----------------------------------------------------------------------
    def _core_busy(self, count: IntArray) -> IntArray:
        busy: IntArray = np.bincount(
            self.core, weights=(count > 0).astype(np.float64), minlength=self.n_core
        ).astype(np.int64)
        return busy

    def _pick(self, allowed: BoolArray, count: IntArray, prev: int, load: FloatArray) -> int:
        """select_idle_sibling-like choice among ``allowed`` PUs."""
        if not allowed.any():
            return -1
        idle = allowed & (count == 0)
        if idle.any():
            score = idle.astype(np.float64) * 4.0
            core_idle = self._core_busy(count)[self.core] == 0
            score += (idle & core_idle) * 2.0
            if prev >= 0:
                score += idle & (self.llc == self.llc[prev])
                score += (idle & (self.node == self.node[prev])) * 0.5
        else:
            # Everything allowed is busy: the least loaded queue (fewest runnable, then demand).
            score = np.where(allowed, -(count * 10.0 + load), -np.inf)
            if prev >= 0:
                score += (self.llc == self.llc[prev]) * 0.5
        score = np.where(allowed, score + self.rng.random(self.n_pu) * 0.01, -np.inf)
        return int(np.argmax(score))

    def _lightest(self, allowed: BoolArray, load: FloatArray, at: int) -> int:
        """The least loaded allowed PU, its LLC first, then its node, then anywhere; -1 if none."""
        for near in (self.llc == self.llc[at], self.node == self.node[at], None):
            mask = allowed if near is None else allowed & near
            mask = mask.copy()
            mask[at] = False
            if mask.any():
                return int(np.argmin(np.where(mask, load, np.inf)))
        return -1

    def _make_room(
        self,
        stuck: IntArray,
        allowed: BoolArray,
        pu: IntArray,
        count: IntArray,
        load: FloatArray,
        move: Callable[[int, int], None],
    ) -> bool:
        """Threads stacked on one PU, none allowed on an idle one: free a PU they may use by
        sending the thread alone on it to an idle PU it may use, then take it.

        What the kernel reaches in a few balancing passes: the idle PU finds only pinned tasks
        on the busiest queue (LBF_ALL_PINNED) and, the imbalance persisting, active balancing
        pushes the running task off a queue of one (need_active_balance), which the stacked
        queue then spreads into."""
        idle = count == 0
        for i in stuck.tolist():
            for q in np.flatnonzero(allowed[i] & (count == 1)).tolist():
                j = int(np.flatnonzero(pu == q)[0])
                if (allowed[j] & idle).any():
                    move(j, self._pick(allowed[j] & idle, count, q, load))
                    move(i, q)
                    return True
        return False

    def _spill(
        self,
        allowed: BoolArray,
        pu: IntArray,
        demand: FloatArray,
        load: FloatArray,
        move: Callable[[int, int], None],
    ) -> None:
        """Threads of overloaded LLCs to LLCs with room (step 2c of place()).

        A time-shared thread goes first. When every time-shared thread is pinned to its LLC,
        a thread running alone that may leave goes instead, if the stacked ones may use the
        PU it frees: active balancing, after the pinned tasks made the pulls fail
        (LBF_ALL_PINNED; need_active_balance); the stacked thread follows next tick."""
        cap = self.llc_pus
        llc_load = np.bincount(self.llc, weights=load, minlength=self.n_llc)
        for src in np.argsort(-(llc_load - cap), kind="stable").tolist():
            while llc_load[src] > cap[src] + 1e-9:
                here = np.flatnonzero((pu >= 0) & (self.llc[np.maximum(pu, 0)] == src))
                busy = load[pu[here]] > 1.0 + 1e-9
                stacked, alone = here[busy], here[~busy]
                spare = cap - llc_load
                found = self._spill_target(stacked, allowed, pu, demand, load, spare, src)
                if found is None:
                    wanted: BoolArray = np.any(allowed[stacked], axis=0)  # PUs a stacked thread may use
                    movable = alone[wanted[pu[alone]]]
                    found = self._spill_target(movable, allowed, pu, demand, load, spare, src)
                if found is None:
                    break
                i, to = found
                llc_load[src] -= demand[i]
                llc_load[self.llc[to]] += demand[i]
                move(i, to)

    def _spill_target(
        self,
        threads: IntArray,
        allowed: BoolArray,
        pu: IntArray,
        demand: FloatArray,
        load: FloatArray,
        spare: FloatArray,
        src: int,
    ) -> tuple[int, int] | None:
        """The thread and PU of the best spill: the least loaded PU, own node first, of an
        LLC other than ``src`` with room for the thread; None if no thread has one."""
        best: tuple[float, int, int] | None = None
        for i in threads.tolist():
            ok = allowed[i] & (spare[self.llc] >= demand[i] - 1e-9) & (self.llc != src)
            if not ok.any():
                continue
            same_node = ok & (self.node == self.node[pu[i]])
            mask = same_node if same_node.any() else ok
            to = int(np.argmin(np.where(mask, load, np.inf)))
            key = (float(load[to]), i, to)
            if best is None or key < best:
                best = key
        return None if best is None else (best[1], best[2])

    def _smt_balance(
        self,
        allowed: BoolArray,
        pu: IntArray,
        demand: FloatArray,
        count: IntArray,
        move: Callable[[int, int], None],
    ) -> None:
        """Step 3b of place(): even the CPU demand of the cores of each LLC, a thread at a time.

        A move from a core asking a to one asking b (b + d < a) lowers the sum of squared core
        demands, so repeated ticks converge instead of trading a thread back and forth."""
        placed = pu >= 0
        core_load = np.bincount(self.core[pu[placed]], weights=demand[placed], minlength=self.n_core)
        for c in np.argsort(-core_load, kind="stable").tolist():
            if core_load[c] <= 1.0 + 1e-9:
                break
            on_core = np.flatnonzero(placed & (self.core[np.maximum(pu, 0)] == c))
            for i in sorted(on_core.tolist(), key=lambda j: -demand[j]):
                at = int(pu[i])
                pu_core_load = core_load[self.core]  # each PU's core's demand
                lighter = pu_core_load + demand[i] < core_load[c] - 1e-9
                mask = allowed[i] & (count == 0) & (self.llc == self.llc[at]) & lighter
                if not mask.any():
                    continue
                score = np.where(mask, -pu_core_load + self.rng.random(self.n_pu) * 1e-6, -np.inf)
                to = int(np.argmax(score))
                core_load[c] -= demand[i]
                core_load[self.core[to]] += demand[i]
                move(i, to)
                break  # one thread per core per tick

    # --- one tick -----------------------------------------------------------------------
    def place(self, allowed: BoolArray, current: IntArray, demand: FloatArray, dt: float) -> Placement:
        """New positions for every thread; ``allowed`` is (N, n_pu), ``current`` -1 if unplaced."""
        n = len(current)
        pu = current.copy()
        migrated = np.zeros(n, dtype=np.bool_)
        if n == 0:
            z = np.zeros(0)
            return Placement(pu, z, z, migrated)
        rows = np.arange(n)
        valid = (pu >= 0) & allowed[rows, np.maximum(pu, 0)]
        pu[~valid] = -1
        count = np.bincount(pu[pu >= 0], minlength=self.n_pu).astype(np.int64)
        load = np.bincount(pu[pu >= 0], weights=demand[pu >= 0], minlength=self.n_pu).astype(np.float64)

        def move(i: int, to: int) -> None:
            frm = int(pu[i])
            if frm >= 0:
                count[frm] -= 1
                load[frm] -= demand[i]
                migrated[i] = migrated[i] or to != frm
            pu[i] = to
            if to >= 0:
                count[to] += 1
                load[to] += demand[i]

        # 1. threads with nowhere to be (new, or their CPU is no longer allowed)
        for i in self.rng.permutation(np.flatnonzero(pu < 0)):
            prev = int(current[i])
            to = self._pick(allowed[i], count, prev, load)
            move(int(i), to)
            migrated[i] = prev >= 0 and to != prev

        # 2. balancing: a PU with >1 runnable gives one away to an idle PU (LLC, node, any)
        for p in self.rng.permutation(np.flatnonzero(count > 1)):
            while count[p] > 1:
                # can_migrate_task: only a thread whose affinity allows an idle PU is pulled;
                # a pinned one is skipped and another tried (LBF_SOME_PINNED)
                here = np.flatnonzero(pu == p)
                free = here[(allowed[here] & (count == 0)).any(axis=1)]
                if len(free) == 0:
                    if not self._make_room(here, allowed, pu, count, load, move):
                        break
                    continue
                i = int(self.rng.choice(free))
                move(i, self._pick(allowed[i] & (count == 0), count, int(p), load))

        # 2b. overcommit: even the load between busy queues (nothing is idle to pull to)
        for p in np.argsort(-load):
            if load[p] <= 1.0 + 1e-9:
                break
            for i in sorted(np.flatnonzero(pu == p), key=lambda j: -demand[j]):
                to = self._lightest(allowed[i], load, int(p))
                # detach_tasks: a task moves while half its load fits in half the imbalance
                if to >= 0 and load[p] > load[to] * IMBALANCE_PCT and demand[i] <= load[p] - load[to]:
                    move(int(i), to)

        # 2c. between LLCs (the package and NUMA sched domains): an LLC whose runnable demand
        # is above its PUs (group_overloaded) gives time-shared threads to an LLC they may use
        # with room for them (group_has_spare): calculate_imbalance migrates up to the spare
        # capacity of the pulling group. Its own node first, as the lower domain balances first.
        self._spill(allowed, pu, demand, load, move)

        # 3. SMT: two busy siblings while an allowed core is wholly idle -> split them
        busy = self._core_busy(count)
        for c in np.flatnonzero(busy > 1) if (busy == 0).any() else ():
            for i in np.flatnonzero(np.isin(pu, np.flatnonzero(self.core == c))):
                core_idle = (busy[self.core] == 0) & allowed[i] & (count == 0)
                if core_idle.any() and busy[c] > 1:
                    move(int(i), self._pick(core_idle, count, int(pu[i]), load))
                    busy = self._core_busy(count)

        # 3b. SMT balance inside an LLC (SD_PREFER_SIBLING on the SMT level: one task per core
        # before two): a core whose threads ask for more than one CPU gives one to an idle PU of
        # a core of its LLC that, with it, still asks for less than the giver did. A core whose
        # only thread sleeps most of the time is idle that share of the tick, and newidle
        # balancing pulls from the doubled-up core then; step 3 sees only wholly idle cores.
        self._smt_balance(allowed, pu, demand, count, move)

        # 4. noise: wakeups on another idle PU of the LLC; rare pulls to another LLC
        p_wake = np.clip(WAKE_MIGRATIONS_PER_IDLE_S * (1.0 - demand) * dt, 0.0, 1.0)
        p_cross = min(CROSS_LLC_NOISE_PER_S * dt, 1.0)
        draw = self.rng.random(n)
        for i in np.flatnonzero((draw < p_wake + p_cross) & (pu >= 0)):
            at = int(pu[i])
            same_llc = self.llc == self.llc[at]
            # An idle PU, or one whose queue is lighter even with this thread on it.
            lighter = (count == 0) | (load + demand[i] < load[at] - 1e-9)
            mask = allowed[i] & lighter & (same_llc if draw[i] < p_wake[i] else ~same_llc)
            if mask.any():
                move(int(i), self._pick(mask, count, at, load))

        got, delay = self.share(pu, demand)
        return Placement(pu, got, delay, migrated & (pu != current))

    def share(self, pu: IntArray, demand: FloatArray) -> tuple[FloatArray, FloatArray]:
        """Max-min fair split of each PU among the threads on it (CFS with equal weights)."""
        got = np.where(pu >= 0, demand, 0.0)
        placed = pu >= 0
        load = np.bincount(pu[placed], weights=demand[placed], minlength=self.n_pu)
        for p in np.flatnonzero(load > 1.0 + 1e-12):
            idx = np.flatnonzero(pu == p)
            d = np.sort(demand[idx])
            left, k = 1.0, len(d)
            level = 0.0
            for j, dj in enumerate(d):
                fair = left / (k - j)
                if dj <= fair:
                    left -= dj
                else:
                    level = fair
                    break
            else:
                level = float(d[-1])
            got[idx] = np.minimum(demand[idx], level)
        delay = np.where(placed, demand - got, demand)
        return got, delay
