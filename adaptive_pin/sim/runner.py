"""Run a scenario in closed loop (sim host -> sim driver/collector -> controller -> policy).

``run_scenario`` returns a :class:`SimResult`: plain data, JSON-serialisable with
``result.to_dict()``, so ``adaptive-pin bench`` can run every scenario x policy and compare.
The controller and the policy are the production ones; only the host is simulated.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adaptive_pin.sim.host import SimHost, TickStats
from adaptive_pin.sim.scenario import Scenario, check_controller, load_scenario, with_run_overrides


@dataclass(frozen=True)
class MoveRecord:
    tick: int  # simulation tick after which the controller applied it (1-based)
    time: float  # simulated seconds
    guest: str
    vcpu: int
    from_cpus: str
    to_cpus: str
    kind: str
    reason: str
    predicted_gain: float


@dataclass(frozen=True)
class VmResult:
    name: str
    workload: str  # the last phase's workload
    vcpus: int
    start: float
    stop: float | None
    instructions: float
    mpki: float | None
    slowdown: float | None  # instructions alone / instructions here (1.0 = as if alone)


@dataclass(frozen=True)
class Placement:
    vm: str
    vcpu: int
    tid: int
    cpu: int | None
    affinity: str


@dataclass(frozen=True)
class Series:
    time: list[float] = field(default_factory=list)
    instructions_per_s: list[float] = field(default_factory=list)
    llc_misses_per_s: list[float] = field(default_factory=list)
    mpki: list[float | None] = field(default_factory=list)
    weighted_speedup: list[float] = field(default_factory=list)
    vcpus: list[int] = field(default_factory=list)
    scheduler_migrations: list[int] = field(default_factory=list)
    controller_migrations: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class SimResult:
    scenario: str
    policy: str
    host: str
    seed: int
    duration_s: float
    tick_s: float
    control_interval_s: float | None  # None: no controller ran (the unpinned baseline)
    hidden_counters: list[str]
    weighted_speedup: float  # time mean of the sum over running vCPUs of speed vs. alone
    mean_speed: float  # weighted_speedup / mean number of running vCPUs
    throughput_ips: float  # instructions per simulated second, all vCPUs
    mpki: float | None  # all LLC misses per 1000 instructions
    migrations: dict[str, int]  # "controller" (pins that moved a thread), "scheduler", "memory" (VMs)
    moves_applied: int
    moves_refused: int
    controller_errors: dict[str, int]
    vms: list[VmResult]
    moves: list[MoveRecord]
    final_placement: list[Placement]
    events: list[dict[str, Any]]  # {"time", "kind", "vm"}: VM arrivals and departures
    series: Series
    wall_s: float  # how long the simulation took on this machine

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _settings(scenario: Scenario, overrides: Mapping[str, Any]) -> Any:
    """ControllerSettings from the scenario's [controller] table (+ overrides), checked.

    The table was checked when the scenario was loaded; overrides are checked by the same
    rule (``check_controller``), so a bad one names the key like a bad file would.
    """
    from adaptive_pin.controller import ControllerSettings
    from adaptive_pin.guard import GuardSettings
    from adaptive_pin.verify import VerifySettings

    raw = check_controller({**scenario.controller, **overrides}, f"{scenario.origin}: controller")
    kwargs: dict[str, Any] = dict(raw)
    if "guard" in raw:
        kwargs["guard"] = GuardSettings(**raw["guard"])
    if "verify" in raw:
        kwargs["verify"] = VerifySettings(**raw["verify"])
    return ControllerSettings(**kwargs)


def run_scenario(
    scenario: Scenario | str | Path,
    policy_name: str = "none",
    *,
    policy_options: Mapping[str, Any] | None = None,
    hide: Iterable[str] = (),
    seed: int | None = None,
    duration: float | None = None,
    controller: Mapping[str, Any] | None = None,
    series: bool = True,
) -> SimResult:
    """Simulate ``scenario`` under ``policy_name``; ``"none"`` runs no controller at all.

    ``seed``/``duration`` override the scenario's; ``controller`` overrides keys of its
    [controller] table; ``hide=("pmu",)`` runs the controller without hardware counters.
    """
    sc = scenario if isinstance(scenario, Scenario) else load_scenario(scenario)
    sc = with_run_overrides(sc, seed=seed, duration=duration)
    wall0 = time.perf_counter()
    host = SimHost(sc)
    hide = list(hide)
    ctl = None
    interval: float | None = None
    if policy_name != "none" or policy_options:
        from adaptive_pin.controller import Controller
        from adaptive_pin.drivers.sim import SimDriver
        from collectors.sim import SimCollector
        from policies.registry import get_policy

        settings = _settings(sc, controller or {})
        interval = max(float(settings.interval_s), sc.tick)
        ctl = Controller(
            driver=SimDriver(host=host, realtime=False),
            collectors=[SimCollector(host, hide=hide)],
            policy=get_policy(policy_name, **(policy_options or {})),
            topology=host.topology,
            settings=settings,
            clock=lambda: host.now,
        )

    n_ticks = max(1, round(sc.duration / sc.tick))
    stats: list[TickStats] = []
    moves: list[MoveRecord] = []
    events: list[dict[str, Any]] = []
    refused = 0
    errors: dict[str, int] = {}
    next_control = 0.0
    for k in range(1, n_ticks + 1):
        stats.append(host.step())
        new = host.pop_events()
        events.extend({"time": e.time, "kind": str(e.kind), "vm": e.name} for e in new)
        if ctl is None or interval is None:
            continue
        timer = host.now + 1e-9 >= next_control
        if not (timer or new):
            continue
        report = ctl.tick(trigger="timer" if timer else "event")
        if timer:
            next_control = host.now + interval
        refused += len(report.refused)
        for kind, n in report.errors.items():
            errors[kind] = errors.get(kind, 0) + n
        moves.extend(
            MoveRecord(
                k,
                host.now,
                m.guest_name,
                m.vcpu,
                m.from_cpus.to_list(),
                m.to_cpus.to_list(),
                m.kind,
                m.reason,
                float(m.predicted_gain),
            )
            for m in report.applied
        )
    if ctl is not None:
        ctl.sampler.close()
    return _result(
        sc,
        policy=policy_name,
        host=host,
        stats=stats,
        moves=moves,
        events=events,
        refused=refused,
        errors=errors,
        interval=interval,
        hide=hide,
        keep_series=series,
        wall0=wall0,
    )


def _result(
    sc: Scenario,
    *,
    policy: str,
    host: SimHost,
    stats: list[TickStats],
    moves: list[MoveRecord],
    events: list[dict[str, Any]],
    refused: int,
    errors: dict[str, int],
    interval: float | None,
    hide: list[str],
    keep_series: bool,
    wall0: float,
) -> SimResult:
    elapsed = stats[-1].time if stats else sc.duration
    instr = sum(s.instructions for s in stats)
    misses = sum(s.llc_misses for s in stats)
    ws = sum(s.weighted_speedup for s in stats) / max(len(stats), 1)
    mean_vcpus = sum(s.vcpus for s in stats) / max(len(stats), 1)
    vms = [
        VmResult(
            name=vm.name,
            workload=vm.workload,
            vcpus=vm.spec.vcpus,
            start=vm.started_at,
            stop=vm.stopped_at,
            instructions=vm.instructions,
            mpki=vm.llc_misses / vm.instructions * 1000.0 if vm.instructions > 0 else None,
            slowdown=vm.alone_instructions / vm.instructions if vm.instructions > 0 else None,
        )
        for vm in sorted([*host.vms.values(), *host.gone.values()], key=lambda v: v.seq)
    ]
    placement = [
        Placement(
            th.vm.name,
            th.index,
            th.tid,
            host.topology.pus[th.pu] if th.pu >= 0 else None,
            th.affinity.to_list(),
        )
        for th in host.threads()
    ]
    series = Series()
    if keep_series:
        for s in stats:
            series.time.append(s.time)
            series.instructions_per_s.append(s.instructions / sc.tick)
            series.llc_misses_per_s.append(s.llc_misses / sc.tick)
            series.mpki.append(s.llc_misses / s.instructions * 1000.0 if s.instructions > 0 else None)
            series.weighted_speedup.append(s.weighted_speedup)
            series.vcpus.append(s.vcpus)
            series.scheduler_migrations.append(s.scheduler_migrations)
            series.controller_migrations.append(s.controller_migrations)
    return SimResult(
        scenario=sc.name,
        policy=policy,
        host=sc.host.topology or "synthetic",
        seed=sc.seed,
        duration_s=elapsed,
        tick_s=sc.tick,
        control_interval_s=interval,
        hidden_counters=sorted(hide),
        weighted_speedup=ws,
        mean_speed=ws / mean_vcpus if mean_vcpus > 0 else 0.0,
        throughput_ips=instr / elapsed if elapsed > 0 else 0.0,
        mpki=misses / instr * 1000.0 if instr > 0 else None,
        migrations={
            "controller": host.controller_migrations,
            "scheduler": host.scheduler_migrations,
            "memory": host.memory_migrations,
        },
        moves_applied=len(moves),
        moves_refused=refused,
        controller_errors=errors,
        vms=vms,
        moves=moves,
        final_placement=placement,
        events=events,
        series=series,
        wall_s=time.perf_counter() - wall0,
    )
