"""Hand-made hosts, VMs and TickReports for the metrics tests (no sysfs, no controller)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from adaptive_pin.model import (
    CPU_TIME,
    CYCLES,
    INSTRUCTIONS,
    LLC_MISSES,
    RUN_DELAY,
    CacheDomain,
    CpuSet,
    Guest,
    MemoryMove,
    Move,
    MoveOutcome,
    NumaNode,
    Pinnability,
    PinSource,
    Plan,
    Snapshot,
    TickReport,
    Topology,
    VCpu,
    VCpuKey,
    VCpuRates,
    Verdict,
)

LLC_BYTES = 16 << 20


def small_topology(packages: int = 2, cores_per_package: int = 2, smt: int = 2) -> Topology:
    """``packages`` sockets, each one L3 and one NUMA node; SMT siblings numbered like Intel (0,4)."""
    n_cores = packages * cores_per_package
    pus = tuple(range(n_cores * smt))
    core_of = np.array([p % n_cores for p in pus], dtype=np.int64)
    pkg_of = core_of // cores_per_package
    cores = tuple(CpuSet(int(p) for p in pus if core_of[p] == c) for c in range(n_cores))
    pkgs = tuple(CpuSet(int(p) for p in pus if pkg_of[p] == k) for k in range(packages))
    l2 = tuple(CacheDomain(index=c, level=2, cpus=cores[c], size_bytes=1 << 20) for c in range(n_cores))
    l3 = tuple(CacheDomain(index=k, level=3, cpus=pkgs[k], size_bytes=LLC_BYTES) for k in range(packages))
    nodes = {k: NumaNode(id=k, cpus=pkgs[k], memory_bytes=8 << 30) for k in range(packages)}
    return Topology(
        root="<hand-made>",
        pus=pus,
        offline=CpuSet(),
        cores=cores,
        packages=pkgs,
        numa_nodes=nodes,
        l2=l2,
        l3=l3,
        llc=l3,
        llc_source="L3",
        isolated=CpuSet(),
        allowed=CpuSet(pus),
        reserved=CpuSet(),
        pu_core=core_of,
        pu_package=pkg_of.astype(np.int64),
        pu_l2=core_of.copy(),
        pu_llc=pkg_of.astype(np.int64),
        pu_node=pkg_of.astype(np.int64),
    )


def guest(
    name: str,
    affinities: Sequence[CpuSet],
    *,
    managed: bool = True,
    last_cpus: Sequence[int | None] | None = None,
) -> Guest:
    last = list(last_cpus) if last_cpus is not None else [None] * len(affinities)
    return Guest(
        id=f"uuid-{name}",
        name=name,
        pid=1000 + len(name),
        vcpus=tuple(
            VCpu(index=i, tid=2000 + i, affinity=a, last_cpu=last[i]) for i, a in enumerate(affinities)
        ),
        pinnability=Pinnability(
            managed=managed, source=PinSource.DEFAULT if managed else PinSource.ORCHESTRATOR
        ),
        driver="test",
    )


def rates(
    *,
    misses_per_s: float,
    instructions_per_s: float,
    utilization: float = 0.5,
    last_cpu: int | None = None,
    elapsed_s: float = 100.0,
    pmu: bool = True,
) -> VCpuRates:
    """Rates plus the cumulative totals a collector would have counted over ``elapsed_s``."""
    cycles_per_s = instructions_per_s / 1.25
    if not pmu:
        return VCpuRates(
            utilization=utilization,
            run_delay=0.01,
            last_cpu=last_cpu,
            missing={"mpki": "no PMU", "ipc": "no PMU"},
            totals={CPU_TIME: utilization * elapsed_s, RUN_DELAY: 0.01 * elapsed_s},
        )
    return VCpuRates(
        llc_misses_per_s=misses_per_s,
        instructions_per_s=instructions_per_s,
        cycles_per_s=cycles_per_s,
        mpki=1000.0 * misses_per_s / instructions_per_s,
        ipc=instructions_per_s / cycles_per_s,
        utilization=utilization,
        run_delay=0.01,
        last_cpu=last_cpu,
        totals={
            LLC_MISSES: misses_per_s * elapsed_s,
            INSTRUCTIONS: instructions_per_s * elapsed_s,
            CYCLES: cycles_per_s * elapsed_s,
            CPU_TIME: utilization * elapsed_s,
            RUN_DELAY: 0.01 * elapsed_s,
        },
    )


def snapshot(
    topology: Topology,
    guests: Sequence[Guest],
    vcpu_rates: Mapping[VCpuKey, VCpuRates],
    *,
    pmu: bool = True,
    time: float = 100.0,
) -> Snapshot:
    no_pmu = "no PMU: perf_event_open(instructions) = ENOENT"
    caps: dict[str, str | None] = {
        LLC_MISSES: None if pmu else no_pmu,
        INSTRUCTIONS: None if pmu else no_pmu,
        CYCLES: None if pmu else no_pmu,
        CPU_TIME: None,
        RUN_DELAY: None,
    }
    return Snapshot(
        time=time, topology=topology, guests=tuple(guests), rates=dict(vcpu_rates), capabilities=caps
    )


def move(g: Guest, vcpu: int, to: CpuSet, kind: str = "rebalance") -> Move:
    return Move(
        guest_id=g.id,
        guest_name=g.name,
        vcpu=vcpu,
        from_cpus=g.vcpu(vcpu).affinity,
        to_cpus=to,
        reason=f"test: move {g.name} vcpu {vcpu} to {to}",
        predicted_gain=1.0,
        kind=kind,
    )


def outcome(m: Move, before: float | None, after: float | None, verdict: Verdict) -> MoveOutcome:
    return MoveOutcome(move=m, applied_at=50.0, mpki_before=before, mpki_after=after, verdict=verdict)


def tick_report(
    snap: Snapshot,
    *,
    tick: int = 1,
    wall_time: float = 1_700_000_000.0,
    duration_s: float = 0.004,
    interval_s: float = 5.0,
    policy: str = "cache_aware",
    planned: Sequence[Move] = (),
    applied: Sequence[Move] = (),
    refused: Sequence[tuple[Move, str]] = (),
    outcomes: Sequence[MoveOutcome] = (),
    memory_applied: Sequence[MemoryMove] = (),
    errors: Mapping[str, int] | None = None,
    inventory_errors: Mapping[str, str] | None = None,
    dry_run: bool = False,
    trigger: str = "timer",
) -> TickReport:
    return TickReport(
        tick=tick,
        time=wall_time,
        duration_s=duration_s,
        interval_s=interval_s,
        policy=policy,
        snapshot=snap,
        plan=Plan(policy=policy, moves=tuple(planned)),
        applied=tuple(applied),
        refused=tuple(refused),
        outcomes=tuple(outcomes),
        memory_applied=tuple(memory_applied),
        errors=dict(errors or {}),
        inventory_errors=dict(inventory_errors or {}),
        dry_run=dry_run,
        trigger=trigger,
    )


def demo_host(tick: int = 1, pmu: bool = True) -> tuple[Topology, list[Guest], Snapshot]:
    """Two VMs: ``web`` (2 vCPUs pinned to L3 0), ``db`` (2 vCPUs, one on L3 1, one unpinned).

    Totals grow with ``tick`` so successive snapshots look like a running host.
    """
    topo = small_topology()
    web = guest("web", [CpuSet.of(0, 4), CpuSet.of(1, 5)], last_cpus=[0, 1])
    db = guest("db", [CpuSet.of(2, 6), topo.online], last_cpus=[2, 7])
    elapsed = 100.0 + 5.0 * tick
    r = {
        (web.id, 0): rates(misses_per_s=2e6, instructions_per_s=1e9, last_cpu=0, elapsed_s=elapsed, pmu=pmu),
        (web.id, 1): rates(misses_per_s=1e6, instructions_per_s=1e9, last_cpu=1, elapsed_s=elapsed, pmu=pmu),
        (db.id, 0): rates(misses_per_s=8e6, instructions_per_s=5e8, last_cpu=2, elapsed_s=elapsed, pmu=pmu),
        (db.id, 1): rates(misses_per_s=4e6, instructions_per_s=5e8, last_cpu=7, elapsed_s=elapsed, pmu=pmu),
    }
    return topo, [web, db], snapshot(topo, [web, db], r, pmu=pmu, time=elapsed)
