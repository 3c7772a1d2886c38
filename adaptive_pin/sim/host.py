"""The simulated host: VMs arrive and leave, threads run, counters grow, tick by tick.

Per tick: apply due scenario events -> the scheduler places every vCPU thread within its
affinity -> the contention model (cache_model.solve) gives each thread its CPI and MPKI ->
counters advance. ``pin`` changes a thread's affinity at once, as sched_setaffinity(2) does:
a thread outside its new set is migrated immediately, and that migration is the controller's.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from adaptive_pin.errors import GuestGoneError, PinError, TopologyError, UsageError
from adaptive_pin.model import (
    CPU_MIGRATIONS,
    CPU_TIME,
    CYCLES,
    INSTRUCTIONS,
    LLC_MISSES,
    LLC_REFERENCES,
    RUN_DELAY,
    CpuSet,
    EventKind,
    Guest,
    GuestEvent,
    Pinnability,
    PinSource,
    Topology,
    VCpu,
)
from adaptive_pin.sim import constants
from adaptive_pin.sim.cache_model import ThreadLoad, solve
from adaptive_pin.sim.scenario import HostSpec, Scenario, VmSpec
from adaptive_pin.sim.scheduler import LinuxLikeScheduler
from adaptive_pin.sim.synthetic import synthetic_topology
from adaptive_pin.sim.workloads import Workload

BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

_GHZ = re.compile(r"@\s*([\d.]+)\s*GHz", re.IGNORECASE)
_MHZ = re.compile(r"^cpu MHz\s*:\s*([\d.]+)", re.MULTILINE)
_ID_NAMESPACE = uuid.UUID("5b0c3f7e-6d1a-4a0e-9a51-5a1d0e7a11e5")
KNOTS = 8  # curve knots per thread in the vectorised interpolation (the shipped curves have 7)


def load_host_topology(spec: HostSpec) -> Topology:
    """The scenario's host: a fixture by name, a sysfs tree by path, or a synthetic one.

    A relative ``topology`` path is taken relative to the scenario file's directory
    (``spec.base_dir``), like ``curves``; a name that is no such directory is a fixture name.
    Every error names the scenario file (``spec.origin``) and the key.
    """
    at = f"{spec.origin}: " if spec.origin else ""
    if spec.synthetic is not None:
        s = spec.synthetic
        topo = synthetic_topology(
            packages=s.packages,
            llc_per_package=s.llc_per_package,
            cores_per_llc=s.cores_per_llc,
            threads_per_core=s.threads_per_core,
            llc_mib=s.llc_mib,
            remote_distance=s.remote_distance,
        )
        if not spec.reserved <= topo.online:
            raise UsageError(
                f"{at}host.reserved: CPUs {spec.reserved - topo.online} are not on the synthetic host"
            )
        return topo.with_reserved(spec.reserved)
    assert spec.topology is not None
    from adaptive_pin.topology import read_topology

    root = Path(spec.topology).expanduser()
    if not root.is_absolute() and spec.base_dir is not None:
        root = spec.base_dir / root
    if not root.is_dir():
        try:
            from adaptive_pin.fixtures import fixture_names, fixture_root
        except ImportError:  # pragma: no cover - the fixtures module ships with the package
            raise UsageError(f"{at}host.topology: {spec.topology!r} is not a directory") from None
        if spec.topology not in fixture_names():
            raise UsageError(
                f"{at}host.topology: {spec.topology!r} is neither a sysfs tree ({root} is no "
                f"directory) nor a fixture (fixtures: {', '.join(fixture_names())})"
            )
        root = fixture_root(spec.topology)
    try:
        topo = read_topology(root)
    except TopologyError as exc:
        raise UsageError(f"{at}host.topology: {exc}") from None
    if not spec.reserved <= topo.online:
        raise UsageError(
            f"{at}host.reserved: CPUs {spec.reserved - topo.online} are not online on this host "
            f"(online: {topo.online})"
        )
    return topo.with_reserved(spec.reserved)


def clock_ghz(topology: Topology) -> float:
    """Nominal clock from ``<root>/proc/cpuinfo`` ("@ 2.10GHz", else "cpu MHz"), else a default."""
    try:
        text = (Path(topology.root) / "proc" / "cpuinfo").read_text(errors="replace")
    except OSError:
        return constants.DEFAULT_GHZ
    if m := _GHZ.search(text):
        return float(m.group(1))
    if m := _MHZ.search(text):
        return float(m.group(1)) / 1000.0
    return constants.DEFAULT_GHZ


@dataclass(eq=False)
class SimThread:
    vm: SimVM
    index: int
    tid: int
    affinity: CpuSet
    mask: BoolArray
    workload: Workload
    demand: float
    alone_ips: float = 0.0
    pu: int = -1  # position in topology.pus; -1 before first placement
    cold: bool = False  # changed LLC: its cache share must be refilled next tick
    occupancy: float = float("nan")  # bytes of LLC held after the last tick (warm start)
    counters: dict[str, float] = field(default_factory=dict)


@dataclass(eq=False)
class SimVM:
    seq: int
    id: str
    spec: VmSpec
    pid: int
    started_at: float
    threads: list[SimThread] = field(default_factory=list)
    home_nodes: CpuSet | None = None  # where its memory is (the source, while migrating)
    migrating_to: CpuSet | None = None
    migrate_left: float = 0.0  # bytes still to copy
    stopped_at: float | None = None
    instructions: float = 0.0
    alone_instructions: float = 0.0
    llc_misses: float = 0.0
    workload: str = ""

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class TickStats:
    """What one tick did, host-wide (the runner keeps these for the time series)."""

    time: float  # end of the tick, simulated seconds
    instructions: float
    llc_misses: float
    cpu_time: float
    weighted_speedup: float  # sum over running vCPUs of instructions / instructions alone
    vcpus: int
    scheduler_migrations: int
    controller_migrations: int


class SimHost:
    """A host, its VMs and their threads, under one seeded RNG."""

    def __init__(self, scenario: Scenario, topology: Topology | None = None) -> None:
        self.scenario = scenario
        self.topology = topology if topology is not None else load_host_topology(scenario.host)
        t = self.topology
        self.rng = np.random.default_rng(scenario.seed)
        self.scheduler = LinuxLikeScheduler(t, self.rng)
        self.freq_hz = (scenario.host.ghz or clock_ghz(t)) * 1e9
        self.now = 0.0
        self.tick = scenario.tick
        self.n_pu = len(t.pus)
        self.n_core = int(t.pu_core.max()) + 1
        self.smt_ways = int(np.bincount(t.pu_core).max())  # hardware threads per core, at most
        self._domains()
        self._distances()
        self.default_affinity = t.usable or t.online
        self._online = t.online  # Topology.online builds a CpuSet per call; pins check it
        self._masks: dict[CpuSet, BoolArray] = {}
        self._core_masks: dict[CpuSet, FloatArray] = {}  # affinity -> 1.0 on the cores it reaches
        self.vms: dict[str, SimVM] = {}
        self._by_id: dict[str, SimVM] = {}
        # Threads per PU, kept between steps for pin() (None: recount); the scheduler's step
        # and VM arrivals and departures reset it.
        self._pu_count: npt.NDArray[np.int64] | None = None
        self.gone: dict[str, SimVM] = {}
        self.events: list[GuestEvent] = []
        self.scheduler_migrations = 0
        self.controller_migrations = 0
        self.memory_migrations = 0  # migrate_memory calls that started a copy
        self._pending_ctl = 0
        self.clock: Callable[[], float] | None = None  # real-time drivers set this; see sync()
        self._knot_cache: dict[tuple[int, int], tuple[FloatArray, FloatArray]] = {}
        self._agenda = self._build_agenda()
        self._check_specs()
        self._apply_agenda()  # VMs present at t=0 are in the first inventory

    # --- construction --------------------------------------------------------------------
    def _domains(self) -> None:
        """LLC domain per PU; PUs the sysfs shows in no LLC get a private domain each."""
        t = self.topology
        dom = t.pu_llc.copy()
        caps = []
        for d in t.llc:
            size = d.size_bytes or constants.DEFAULT_LLC_BYTES_PER_CORE * max(
                1, len(np.unique(t.pu_core[t.positions(d.cpus)]))
            )
            caps.append(
                float(self.scenario.host.llc_mib * (1 << 20)) if self.scenario.host.llc_mib else float(size)
            )
        for pos in np.flatnonzero(dom < 0):
            dom[pos] = len(caps)
            caps.append(float(constants.DEFAULT_LLC_BYTES_PER_CORE))
        self.pu_domain = dom
        self.capacity = np.asarray(caps, dtype=np.float64)
        # 1.0 on the cores of each domain (a core whose PUs span two domains is in both)
        self.domain_cores = np.zeros((len(caps), self.n_core))
        self.domain_cores[dom, t.pu_core] = 1.0

    def _distances(self) -> None:
        """SLIT distance / 10 between every pair of NUMA nodes (index -1: no node -> local)."""
        t = self.topology
        ids = sorted(t.numa_nodes)
        self.node_index = {nid: i for i, nid in enumerate(ids)}
        n = max(len(ids), 1)
        m = np.full((n + 1, n + 1), 1.0)  # last row/col: "no node"
        for a in ids:
            for b in ids:
                dist = t.numa_nodes[a].distances.get(b)
                if dist is None:
                    dist = constants.LOCAL_DISTANCE if a == b else constants.DEFAULT_REMOTE_DISTANCE
                m[self.node_index[a], self.node_index[b]] = dist / constants.LOCAL_DISTANCE
        self.dist = m
        self.pu_nidx = np.array([self.node_index.get(int(x), n) for x in t.pu_node], dtype=np.int64)

    def _check_specs(self) -> None:
        t = self.topology
        for i, vm in enumerate(self.scenario.vms):
            where = f"{self.scenario.origin}: vms[{i}] ({vm.name})"
            if vm.pinned_cpus is not None and not vm.pinned_cpus <= t.online:
                raise UsageError(
                    f"{where}.pinned_cpus: CPUs {vm.pinned_cpus - t.online} are not online on this host"
                )
            if vm.memory_nodes is not None and not vm.memory_nodes.as_frozenset() <= set(t.numa_nodes):
                bad = CpuSet(vm.memory_nodes.as_frozenset() - set(t.numa_nodes))
                raise UsageError(f"{where}.memory_nodes: no NUMA node {bad} on this host")

    def _build_agenda(self) -> list[tuple[float, int, str, int]]:
        """(time, order, what, vm spec index): stops before phases before starts at one instant."""
        out: list[tuple[float, int, str, int]] = []
        for i, vm in enumerate(self.scenario.vms):
            out.append((vm.start, 2, "start", i))
            if vm.stop is not None:
                out.append((vm.stop, 0, "stop", i))
            out.extend((ph.at, 1, f"phase:{j}", i) for j, ph in enumerate(vm.phases))
        return sorted(out, reverse=True)  # pop() from the end

    def mask(self, cpus: CpuSet) -> BoolArray:
        m = self._masks.get(cpus)
        if m is None:
            m = np.array([c in cpus for c in self.topology.pus], dtype=np.bool_)
            self._masks[cpus] = m
        return m

    def core_mask(self, cpus: CpuSet) -> FloatArray:
        """1.0 on every core with a PU in ``cpus``, else 0.0."""
        m = self._core_masks.get(cpus)
        if m is None:
            reach = np.bincount(self.topology.pu_core[self.mask(cpus)], minlength=self.n_core) > 0
            m = self._core_masks[cpus] = reach.astype(np.float64)
        return m

    def _free_smt(
        self, threads: list[SimThread], pu: IntArray, dom: IntArray, got: FloatArray, on: BoolArray
    ) -> tuple[BoolArray, FloatArray]:
        """The SMT factor of the threads free to move between cores of their LLC (their
        affinity reaches two or more of its cores).

        A tick places each thread on one PU, but inside the tick threads sleep and wake, and a
        waking thread takes an idle core of its LLC before an idle SMT sibling
        (select_idle_sibling scans the LLC, select_idle_core first); newidle balancing pulls a
        second thread off a busy core the same way. So the free threads of an LLC share cores
        only while more of them run at once than it has cores left by the pinned ones: with N
        running on C cores, spread evenly; threads whose cores overlap form one pool (two VMs
        pinned to the two NUMA nodes of one SNC LLC are two). N is the sum of independent
        Bernoulli(got) (exact, by convolution); a running thread sees its core's threads
        averaged over N weighted by N. Threads pinned to a PU or a core keep their siblings'
        busy share (``sibling``).
        ``dom``: each thread's LLC domain (``pu_domain[pu]``). Returns (free, smt): which
        threads are free, and their SMT factor (1.0 elsewhere).
        """
        n = len(threads)
        reach = np.stack([self.core_mask(th.affinity) for th in threads]) * self.domain_cores[dom]
        cores_reached = reach.sum(axis=1)
        free = on & (cores_reached >= 2)
        smt = np.ones(n)
        if not free.any():
            return free, smt
        per_core = self.topology.pu_core
        pinned_busy = np.bincount(per_core[pu[on & ~free]], weights=got[on & ~free], minlength=self.n_core)
        for d in np.unique(dom[free]).tolist():
            members = np.flatnonzero(free & (dom == d))
            for pool, cores in _pools(members, reach[members] > 0):
                room = float(cores.sum()) - float(pinned_busy[cores].sum())
                smt[pool] = spread_smt(got[pool], max(room, 1.0), self.smt_ways)
        return free, smt

    # --- scenario events ---------------------------------------------------------------
    def _apply_agenda(self) -> None:
        while self._agenda and self._agenda[-1][0] <= self.now + 1e-9:
            _, _, what, i = self._agenda.pop()
            spec = self.scenario.vms[i]
            if what == "start":
                self._start(i, spec)
            elif what == "stop":
                self._stop(spec.name)
            else:
                vm = self.vms.get(spec.name)
                if vm is not None:
                    phase = spec.phases[int(what.split(":")[1])]
                    for th in vm.threads:
                        th.workload = self.scenario.workloads[phase.workload]
                        if phase.load is not None:
                            th.demand = phase.load
                    vm.workload = phase.workload
                    self._alone(vm)

    def _start(self, seq: int, spec: VmSpec) -> None:
        guest_id = str(uuid.uuid5(_ID_NAMESPACE, f"{self.scenario.name}/{spec.name}"))
        pid = 20000 + 1000 * seq
        vm = SimVM(seq=seq, id=guest_id, spec=spec, pid=pid, started_at=self.now, workload=spec.workload)
        affinity = spec.pinned_cpus if spec.pinned_cpus is not None else self.default_affinity
        w = self.scenario.workloads[spec.workload]
        for i in range(spec.vcpus):
            vm.threads.append(
                SimThread(vm, i, pid + 1 + i, affinity, self.mask(affinity), w, spec.load, counters=_zero())
            )
        vm.home_nodes = spec.memory_nodes
        self.vms[spec.name] = vm
        self._by_id[guest_id] = vm
        self._pu_count = None
        self.events.append(GuestEvent(EventKind.STARTED, guest_id, spec.name, self.now))

    def _stop(self, name: str) -> None:
        vm = self.vms.pop(name, None)
        if vm is None:
            return
        self._by_id.pop(vm.id, None)
        self._pu_count = None
        vm.stopped_at = self.now
        self.gone[name] = vm
        self.events.append(GuestEvent(EventKind.STOPPED, vm.id, name, self.now))

    def _alone(self, vm: SimVM) -> None:
        """Each vCPU's speed alone on an idle host: whole LLC of its home node, local memory."""
        cap = self._home_capacity(vm)
        lat = constants.DRAM_LATENCY_NS * self.freq_hz / 1e9
        for th in vm.threads:
            w = th.workload
            cpi = w.base_cpi + w.mpki_at(cap) / 1000.0 * lat / w.mlp
            th.alone_ips = self.freq_hz / cpi

    def _home_capacity(self, vm: SimVM) -> float:
        t = self.topology
        if vm.home_nodes:
            doms = {int(self.pu_domain[p]) for p in range(self.n_pu) if int(t.pu_node[p]) in vm.home_nodes}
            if doms:
                return float(max(self.capacity[d] for d in doms))
        return float(self.capacity.max())

    # --- what drivers and collectors see -------------------------------------------------
    def threads(self) -> Iterator[SimThread]:
        for vm in self.vms.values():
            yield from vm.threads

    def find_vm(self, guest_id: str) -> SimVM | None:
        return self._by_id.get(guest_id)

    def thread_by_tid(self, tid: int) -> SimThread | None:
        for th in self.threads():
            if th.tid == tid:
                return th
        return None

    def guest(self, vm: SimVM) -> Guest:
        spec = vm.spec
        if spec.pinned_cpus is not None:
            pin = Pinnability(
                False, PinSource.ORCHESTRATOR, "pinned by the orchestrator (scenario pinned_cpus)"
            )
        elif spec.pinning == "off":
            pin = Pinnability(False, PinSource.METADATA, "scenario: pinning = off")
        else:
            pin = Pinnability(
                True,
                PinSource.DEFAULT,
                "scenario: pinning = auto",
                whole_cores=spec.whole_cores,
                latency_sensitive=spec.latency_sensitive,
            )
        vcpus = tuple(
            VCpu(th.index, th.tid, th.affinity, self.topology.pus[th.pu] if th.pu >= 0 else None)
            for th in vm.threads
        )
        return Guest(
            id=vm.id,
            name=vm.name,
            pid=vm.pid,
            vcpus=vcpus,
            pinnability=pin,
            driver="sim",
            memory_nodes=self._memory_nodes(vm),
            memory_bound=spec.memory_nodes is not None,
            orchestrator_pinned=spec.pinned_cpus is not None,
            workload_hint=vm.workload,
        )

    @staticmethod
    def _memory_nodes(vm: SimVM) -> CpuSet | None:
        """Where numa_maps would show its pages: both sides while a migration copies them."""
        if vm.migrating_to is None or vm.home_nodes is None:
            return vm.home_nodes
        return vm.home_nodes | vm.migrating_to

    def guests(self) -> tuple[Guest, ...]:
        return tuple(self.guest(vm) for vm in self.vms.values())

    def pop_events(self) -> list[GuestEvent]:
        out, self.events = self.events, []
        return out

    def next_event_time(self) -> float | None:
        return self._agenda[-1][0] if self._agenda else None

    # --- actuation -------------------------------------------------------------------
    def migrate_memory(self, guest_id: str, to_nodes: CpuSet) -> None:
        """Start copying a VM's memory to ``to_nodes`` at MIGRATE_BYTES_PER_S (see _run)."""
        vm = self.find_vm(guest_id)
        if vm is None:
            raise GuestGoneError(f"guest {guest_id} is gone")
        if vm.spec.memory_nodes is not None:
            raise PinError(f"refusing to migrate {vm.name}'s memory: bound by its own configuration")
        if not to_nodes or not to_nodes <= CpuSet(self.node_index):
            where = to_nodes.to_list() or "nothing"
            raise PinError(f"{vm.name}: migrate memory to {where}: Invalid argument")
        if vm.home_nodes is None or vm.home_nodes == to_nodes:
            return
        if vm.migrating_to is not None and self._migrated_share(vm) >= 0.5:
            vm.home_nodes = vm.migrating_to  # a new call while one runs: most pages are there
        vm.migrating_to = to_nodes
        vm.migrate_left = self._memory_bytes(vm)
        self.memory_migrations += 1

    @staticmethod
    def _memory_bytes(vm: SimVM) -> float:
        return max(vm.spec.memory_mib * float(1 << 20), 1.0)

    def _migrated_share(self, vm: SimVM) -> float:
        return 1.0 - vm.migrate_left / self._memory_bytes(vm)

    def pin(self, guest_id: str, vcpu: int, cpus: CpuSet) -> None:
        vm = self.find_vm(guest_id)
        if vm is None:
            raise GuestGoneError(f"guest {guest_id} is gone")
        if not 0 <= vcpu < len(vm.threads):
            raise GuestGoneError(f"{vm.name} has no vCPU {vcpu}")
        if not cpus or not cpus <= self._online:
            raise PinError(
                f"{vm.name} vCPU {vcpu}: cannot pin to {cpus.to_list() or 'nothing'}: Invalid argument"
            )
        th = vm.threads[vcpu]
        th.affinity, th.mask = cpus, self.mask(cpus)
        if th.pu >= 0 and not th.mask[th.pu]:
            # sched_setaffinity moves a thread off a CPU it may no longer use right away.
            if self._pu_count is None:
                self._pu_count = np.bincount(
                    [x.pu for x in self.threads() if x.pu >= 0], minlength=self.n_pu
                ).astype(np.int64)
            count = self._pu_count
            count[th.pu] -= 1
            to = self.scheduler._pick(th.mask, count, th.pu, count.astype(np.float64))
            if to >= 0:
                count[to] += 1
            self._moved(th, to)
            th.counters[CPU_MIGRATIONS] += 1
            self.controller_migrations += 1
            self._pending_ctl += 1

    def _moved(self, th: SimThread, to: int) -> None:
        if th.pu >= 0 and to >= 0 and self.pu_domain[th.pu] != self.pu_domain[to]:
            th.cold = True
        th.pu = to

    # --- time ------------------------------------------------------------------------
    def sync(self) -> None:
        """Catch up with ``clock`` when one is set (real time); a no-op under explicit stepping."""
        if self.clock is not None:
            self.advance_to(self.clock())

    def advance_to(self, t: float) -> list[TickStats]:
        """Step whole ticks until the clock reaches ``t`` (for the real-time driver)."""
        out = []
        while self.now + self.tick <= t + 1e-9:
            out.append(self.step())
        return out

    def step(self) -> TickStats:
        """One tick of ``scenario.tick`` simulated seconds."""
        dt = self.tick
        self._apply_agenda()
        threads = list(self.threads())
        sched_moves = 0
        instr_total = miss_total = cpu_total = ws = 0.0
        self._pu_count = None  # the scheduler moves threads
        if threads:
            placed, sched_moves = self._schedule(threads, dt)
            self._first_touch(threads)
            instr_total, miss_total, cpu_total, ws = self._run(threads, placed, dt)
        self.now = round(self.now + dt, 9)
        ctl, self._pending_ctl = self._pending_ctl, 0
        self.scheduler_migrations += sched_moves
        return TickStats(self.now, instr_total, miss_total, cpu_total, ws, len(threads), sched_moves, ctl)

    def _schedule(self, threads: list[SimThread], dt: float) -> tuple[tuple[FloatArray, FloatArray], int]:
        allowed = np.stack([th.mask for th in threads])
        current = np.array([th.pu for th in threads], dtype=np.int64)
        demand = np.array([th.demand for th in threads], dtype=np.float64)
        p = self.scheduler.place(allowed, current, demand, dt)
        moves = 0
        for th, to, mig in zip(threads, p.pu, p.migrated, strict=True):
            if mig:
                moves += 1
                th.counters[CPU_MIGRATIONS] += 1
            self._moved(th, int(to))
        return (p.got, p.delay), moves

    def _knots(self, w: Workload, width: int) -> tuple[FloatArray, FloatArray]:
        key = (id(w), width)
        hit = self._knot_cache.get(key)
        if hit is None:
            hit = self._knot_cache[key] = w.knots(width)
        return hit

    def _first_touch(self, threads: list[SimThread]) -> None:
        """Memory of a VM lands on the node its first vCPU ran on (Linux's default policy)."""
        for th in threads:
            vm = th.vm
            if vm.home_nodes is None and th.pu >= 0:
                node = int(self.topology.pu_node[th.pu])
                vm.home_nodes = CpuSet.of(node) if node >= 0 else CpuSet(self.topology.numa_nodes)
            if th.alone_ips == 0.0 and vm.home_nodes is not None:
                self._alone(vm)

    def _run(
        self, threads: list[SimThread], placed: tuple[FloatArray, FloatArray], dt: float
    ) -> tuple[float, float, float, float]:
        got, delay = placed
        n = len(threads)
        pu = np.array([th.pu for th in threads], dtype=np.int64)
        on = pu >= 0
        pu0 = np.maximum(pu, 0)
        got = np.where(on, got, 0.0)
        # SMT (docs/simulator.md, step 6): a pinned thread shares its core whenever a sibling
        # runs, a free one only while its LLC has no idle core for it.
        t = self.topology
        busy_pu = np.bincount(pu[on], weights=got[on], minlength=self.n_pu)
        busy_core = np.bincount(t.pu_core, weights=busy_pu, minlength=self.n_core)
        sibling = np.clip(busy_core[t.pu_core[pu0]] - busy_pu[pu0], 0.0, None)
        domain = self.pu_domain[pu0]
        free, smt_free = self._free_smt(threads, pu0, domain, got, on)
        # pinned: speed averaged between the whole numbers of busy threads around 1 + sibling
        # (a sibling busy half the time: half the time alone, half the time paired)
        k = 1.0 + sibling
        lo = np.floor(k)
        pinned_speed = (lo + 1.0 - k) * smt_speed(lo) + (k - lo) * smt_speed(lo + 1.0)
        smt = np.where(free, smt_free, 1.0 / pinned_speed)

        nidx = self.pu_nidx[pu0]
        lat_cycles = constants.DRAM_LATENCY_NS * self.freq_hz / 1e9
        mem_factor = np.ones(n)
        cross_frac = np.zeros(n)
        cross_factor = np.ones(n)
        stall = np.zeros(n)  # share of the tick lost to a memory migration in progress
        group = np.zeros(n, dtype=np.int64)
        start = 0
        for g, vm in enumerate(self.vms.values()):
            m = len(vm.threads)
            sl = slice(start, start + m)
            group[sl] = g
            if vm.home_nodes:
                mem_factor[sl] = self._mem_distance(nidx[sl], vm.home_nodes)
                if vm.migrating_to is not None:
                    # pages still to copy are on the old nodes; the copy stalls the guest
                    # the share on the new nodes, on average over this tick
                    step = constants.MIGRATE_BYTES_PER_S * dt / self._memory_bytes(vm)
                    moved = min(1.0, self._migrated_share(vm) + 0.5 * step)
                    new = self._mem_distance(nidx[sl], vm.migrating_to)
                    mem_factor[sl] = (1.0 - moved) * mem_factor[sl] + moved * new
                    copy_s = min(dt, vm.migrate_left / constants.MIGRATE_BYTES_PER_S)
                    stall[sl] = constants.MIGRATION_STALL * copy_s / dt
            if m > 1:
                w = got[sl]
                other = np.outer(np.ones(m), w) * (1.0 - np.eye(m))
                apart = domain[sl][:, None] != domain[sl][None, :]
                total = other.sum(axis=1)
                cross_w = (other * apart).sum(axis=1)
                cross_frac[sl] = np.divide(cross_w, total, out=np.zeros(m), where=total > 0)
                d = self.dist[np.ix_(nidx[sl], nidx[sl])]
                cross_factor[sl] = np.divide(
                    (other * apart * d).sum(axis=1), cross_w, out=np.ones(m), where=cross_w > 0
                )
            start += m

        wl = [th.workload for th in threads]
        width = max(KNOTS, *(len(w.sizes) for w in wl))
        knots = [self._knots(w, width) for w in wl]
        xs = np.stack([x for x, _ in knots])
        ys = np.stack([y for _, y in knots])
        load = ThreadLoad(
            domain=domain,
            run=got,
            knots_x=xs,
            knots_y=ys,
            base_cpi=np.array([w.base_cpi for w in wl]),
            smt_factor=smt,
            mem_latency=lat_cycles * mem_factor,
            cross_latency=lat_cycles * cross_factor,
            mlp=np.array([w.mlp for w in wl]),
            shared_fraction=np.array([w.shared_fraction for w in wl]),
            cross_fraction=cross_frac,
            group=group,
        )
        previous = np.array([th.occupancy if not th.cold else np.nan for th in threads])
        sol = solve(load, self.capacity, self.freq_hz, initial=previous)
        cycles = got * dt * self.freq_hz
        cold = np.array([th.cold for th in threads]) & on
        cold_misses = np.where(cold, sol.effective / constants.LINE_BYTES, 0.0)
        lost = cold_misses * load.mem_latency / load.mlp
        # a stalled vCPU burns its cycles (the counter sees them) but retires nothing meanwhile
        instr = np.maximum(cycles * (1.0 - stall) - lost, 0.0) / sol.cpi
        misses = instr * sol.mpki / 1000.0 + cold_misses
        refs = instr * np.array([w.llc_accesses_pki for w in wl]) / 1000.0 + cold_misses
        alone = np.array([th.alone_ips * th.demand for th in threads]) * dt
        speed = np.divide(instr, alone, out=np.zeros(n), where=alone > 0)
        for i, th in enumerate(threads):
            c = th.counters
            c[INSTRUCTIONS] += instr[i]
            c[CYCLES] += cycles[i]
            c[LLC_MISSES] += misses[i]
            c[LLC_REFERENCES] += refs[i]
            c[CPU_TIME] += got[i] * dt
            c[RUN_DELAY] += delay[i] * dt
            th.cold = False
            th.occupancy = float(sol.occupancy[i])
            th.vm.instructions += instr[i]
            th.vm.alone_instructions += alone[i]
            th.vm.llc_misses += misses[i]
        for vm in self.vms.values():
            if vm.migrating_to is not None:
                vm.migrate_left -= constants.MIGRATE_BYTES_PER_S * dt
                if vm.migrate_left <= 0.0:
                    vm.home_nodes, vm.migrating_to, vm.migrate_left = vm.migrating_to, None, 0.0
        return float(instr.sum()), float(misses.sum()), float(got.sum() * dt), float(speed.sum())

    def _mem_distance(self, nidx: IntArray, nodes: CpuSet) -> FloatArray:
        """Latency factor (SLIT / 10) of each thread's node to memory spread evenly over ``nodes``."""
        home = [self.node_index[x] for x in nodes if x in self.node_index] or [len(self.node_index)]
        out: FloatArray = self.dist[np.ix_(nidx, np.asarray(home, dtype=np.int64))].mean(axis=1)
        return out


def _zero() -> dict[str, float]:
    return dict.fromkeys(
        (INSTRUCTIONS, CYCLES, LLC_MISSES, LLC_REFERENCES, CPU_TIME, RUN_DELAY, CPU_MIGRATIONS), 0.0
    )


def smt_speed(c: FloatArray) -> FloatArray:
    """1 / smt of a thread on a core running c threads at once (c >= 1; below 1 as 1): c of
    them do 1 + SMT_GAIN (c - 1) threads' work."""
    c = np.maximum(c, 1.0)
    out: FloatArray = (1.0 + constants.SMT_GAIN * (c - 1.0)) / c
    return out


def spread_smt(run: FloatArray, cores: float, ways: int) -> float:
    """The SMT factor (``smt_i``) of threads running independently, each a ``run`` share of
    the time, spread evenly over ``cores`` cores of ``ways`` hardware threads.

    Averaged as speed (1 / smt) over the running threads and over N, the number running at
    once (a running thread sees N weighted by N): a pool of full-time threads then does the
    same work as when they stand still, pairs on some cores and threads alone on others.
    """
    dist = np.zeros(len(run) + 1)  # P(N = j running at once)
    dist[0] = 1.0
    for j, g in enumerate(run.tolist()):
        dist[1 : j + 2] = dist[1 : j + 2] * (1.0 - g) + dist[: j + 1] * g
        dist[0] *= 1.0 - g
    n = np.arange(len(dist), dtype=np.float64)
    busy = np.minimum(n, cores * ways)  # beyond every PU they time-share (in ``run`` already)
    whole = np.floor(busy / cores)
    extra = busy - whole * cores  # cores holding one thread more than the others

    work = extra * (whole + 1.0) * smt_speed(whole + 1.0) + (cores - extra) * whole * smt_speed(whole)
    mean = np.divide(work, busy, out=np.ones_like(busy), where=busy > 0)
    weight = dist * n
    total = weight.sum()
    return float(total / (weight * mean).sum()) if total > 0 else 1.0


def _pools(members: IntArray, reach: BoolArray) -> list[tuple[IntArray, BoolArray]]:
    """Threads (``members``, each with the cores it may run on) grouped into pools of
    overlapping cores: (the pool's threads, the union of their cores)."""
    masks, inverse = np.unique(reach, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    groups: list[tuple[list[int], BoolArray]] = []
    for i, mask in enumerate(masks):  # each mask joins every pool it overlaps into one
        hit = [g for g in groups if (g[1] & mask).any()]
        ids, cores = [i], mask.copy()
        for g in hit:
            ids += g[0]
            cores |= g[1]
        groups = [g for g in groups if not any(g is h for h in hit)] + [(ids, cores)]
    return [(members[np.isin(inverse, ids)], cores) for ids, cores in groups]
