"""How long one decision takes on a big host: 512 PUs, 2,048 vCPUs in 512 VMs.

The host is shaped like a 2-socket AMD EPYC 9754 (Bergamo): 2 packages x 16 CCX x 8 cores x
2 threads, 16 MiB of L3 per CCX, so 32 LLC domains. The VMs (1 to 8 vCPUs, 4 on average) run
the shipped measured workloads at partial load (about one CPU of demand per usable PU), and
their rates come from the simulator through the production sampler, so the policy sees a
realistic snapshot. Timed with time.perf_counter, median of ``reps`` repetitions:

- cold: ``policy.decide`` with every vCPU still floating (a restart, or 512 VMs arriving at once);
- steady: ``decide`` again after its own first plan was applied and rates were re-measured;
- tick: the whole ``Controller.tick`` (inventory, sampling, decide, guard, pin) on the sim driver,
  which includes the simulated inventory and counter reads.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from adaptive_pin.model import CpuSet, Snapshot
from adaptive_pin.sim.host import SimHost
from adaptive_pin.sim.scenario import HostSpec, Scenario, SyntheticHost, VmSpec
from adaptive_pin.sim.workloads import load_curves

HOST = SyntheticHost(packages=2, llc_per_package=16, cores_per_llc=8, threads_per_core=2, llc_mib=16.0)
HOST_LABEL = "synthetic 2 x 16 CCX x 8 cores x 2 threads (EPYC 9754-like), 16 MiB L3 per CCX"
RESERVED = CpuSet.of(0, 256)  # CPU 0 and its SMT sibling for the host
VM_SIZES = (1, 2, 4, 8, 2, 4, 4, 7)  # 32 vCPUs per 8 VMs: 512 VMs make 2,048 vCPUs
LOADS = (0.4, 0.2, 0.1, 0.3)  # mean 0.25: 2,048 vCPUs ask for about 512 CPUs
N_VMS = 512
WARM_TICKS = 5  # simulated seconds of counters before the timed snapshot (rates need two samples)
TARGET_S = 0.100


@dataclass(frozen=True)
class PolicyTiming:
    policy: str
    cold_s: float  # median
    steady_s: float  # median
    moves_cold: int  # moves the cold decision proposed
    # the fastest repetition: what the code costs with the least interference from the rest of
    # the machine (the median, which the target judges, moves with the load of a shared host)
    cold_min_s: float | None = None
    steady_min_s: float | None = None


@dataclass(frozen=True)
class DecisionTime:
    host: str
    pus: int
    llc_domains: int
    vms: int
    vcpus: int
    reps: int
    target_s: float
    policies: tuple[PolicyTiming, ...]
    tick_s: float | None  # median whole controller tick (cache-aware) on the sim driver
    tick_first_s: float | None  # the first tick (every vCPU floating)


def big_scenario(n_vms: int = N_VMS) -> Scenario:
    workloads = load_curves()
    names = sorted(workloads)
    vms = tuple(
        VmSpec(
            name=f"vm{i:03d}",
            vcpus=VM_SIZES[i % len(VM_SIZES)],
            workload=names[i % len(names)],
            load=LOADS[i % len(LOADS)],
        )
        for i in range(n_vms)
    )
    used = {vm.workload for vm in vms}
    return Scenario(
        name="decision-time",
        origin="(adaptive_pin.bench.decision_time)",
        description=HOST_LABEL,
        duration=3600.0,
        tick=1.0,
        seed=0,
        host=HostSpec(topology=None, reserved=RESERVED, synthetic=HOST),
        workloads={k: w for k, w in workloads.items() if k in used},
        vms=vms,
    )


def _times(fn: object, reps: int) -> tuple[float, float]:
    """(median, fastest) wall time of ``reps`` calls."""
    assert callable(fn)
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples), min(samples)


def _controller(host: SimHost, policy_name: str, options: Mapping[str, str] | None = None) -> object:
    from adaptive_pin.controller import Controller, ControllerSettings
    from adaptive_pin.drivers.sim import SimDriver
    from collectors.sim import SimCollector
    from policies.registry import get_policy

    return Controller(
        driver=SimDriver(host=host, realtime=False),
        collectors=[SimCollector(host)],
        policy=get_policy(policy_name, **(options or {})),
        topology=host.topology,
        settings=ControllerSettings(interval_s=5.0),
        clock=lambda: host.now,
    )


def _warm_snapshot(host: SimHost, ctl: object) -> Snapshot:
    from adaptive_pin.controller import Controller

    assert isinstance(ctl, Controller)
    host.step()
    ctl.observe()
    for _ in range(WARM_TICKS):
        host.step()
    return ctl.observe()


def time_policy(
    scenario: Scenario, policy_name: str, reps: int, options: Mapping[str, str] | None = None
) -> PolicyTiming:
    from policies.registry import get_policy

    host = SimHost(scenario)
    ctl = _controller(host, policy_name, options)
    snapshot = _warm_snapshot(host, ctl)
    policy = get_policy(policy_name, **(options or {}))
    state0 = policy.initial_state()
    plan, state1 = policy.decide(snapshot, state0)
    cold, cold_min = _times(lambda: policy.decide(snapshot, state0), reps)
    by_id = {vm.id: vm for vm in host.vms.values()}
    for m in plan.moves:  # as if the guard let the whole plan through
        if m.guest_id in by_id:
            host.pin(m.guest_id, m.vcpu, m.to_cpus)
    steady_snapshot = _warm_snapshot(host, ctl)
    steady, steady_min = _times(lambda: policy.decide(steady_snapshot, state1), reps)
    return PolicyTiming(policy_name, cold, steady, len(plan.moves), cold_min, steady_min)


def time_ticks(
    scenario: Scenario, policy_name: str, ticks: int, options: Mapping[str, str] | None = None
) -> tuple[float, float]:
    """(first tick, median of the next ``ticks``) of the whole controller tick, in seconds."""
    from adaptive_pin.controller import Controller

    host = SimHost(scenario)
    ctl = _controller(host, policy_name, options)
    assert isinstance(ctl, Controller)
    _warm_snapshot(host, ctl)
    first = ctl.tick().duration_s
    later = []
    for _ in range(ticks):
        for _ in range(WARM_TICKS):
            host.step()
        later.append(ctl.tick().duration_s)
    ctl.sampler.close()
    return first, statistics.median(later)


def measure(
    policies: Sequence[str],
    reps: int = 5,
    ticks: int = 3,
    n_vms: int = N_VMS,
    options: Mapping[str, Mapping[str, str]] | None = None,
) -> DecisionTime:
    """``options``: per policy name, the options it is built with (bench --policy-option)."""
    opts = options or {}
    sc = big_scenario(n_vms)
    timings = tuple(time_policy(sc, name, reps, opts.get(name)) for name in policies)
    tick_first = tick = None
    if "cache-aware" in policies and ticks > 0:
        tick_first, tick = time_ticks(sc, "cache-aware", ticks, opts.get("cache-aware"))
    host = SimHost(sc)
    return DecisionTime(
        host=HOST_LABEL,
        pus=len(host.topology.pus),
        llc_domains=len(host.topology.llc),
        vms=len(sc.vms),
        vcpus=sc.vcpu_count,
        reps=reps,
        target_s=TARGET_S,
        policies=timings,
        tick_s=tick,
        tick_first_s=tick_first,
    )
