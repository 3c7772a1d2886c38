"""Settling and migration figures of one simulated run (definitions: docs/bench.md).

Both are read off the run's record (the controller's applied moves, the per-tick series) and
the scenario's own agenda; nothing here re-runs anything.

- *settle ticks* of a VM arrival: ceil((t_last - t_arrival) / interval), t_last the time of the
  last controller move of that VM's vCPUs inside the arrival's window; 0 when none was moved.
  The window closes at whichever comes first: ``SETTLE_WINDOW_TICKS`` control intervals, the
  next scenario event (another arrival, a departure, a phase change), the VM's stop, the end.
  Moves caused by a later event are therefore that event's, not this arrival's.
- *steady-state migrations per vCPU-hour*: controller migrations (pins that moved a running
  thread) per vCPU-hour of simulated time after the last scenario event plus
  ``STEADY_AFTER_TICKS`` control intervals; None when the run ends before that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from adaptive_pin.sim.runner import SimResult
from adaptive_pin.sim.scenario import Scenario

SETTLE_WINDOW_TICKS = 12  # an arrival's moves are looked for this many control intervals (60 s at 5 s)
STEADY_AFTER_TICKS = 3  # steady state starts this many control intervals after the last event
DEFAULT_INTERVAL_S = 5.0  # ControllerSettings.interval_s; used when a scenario names none


@dataclass(frozen=True)
class Arrival:
    vm: str
    time: float  # simulated seconds
    settle_ticks: int  # control intervals until its placement stopped changing (0: never moved)
    moves: int  # controller moves of its vCPUs inside the window
    window_s: float  # how long the window was


@dataclass(frozen=True)
class Migrations:
    controller: int  # over the whole run
    vcpu_hours: float
    per_vcpu_hour: float
    steady_from: float | None  # simulated second the steady state starts; None: it never does
    steady_controller: int
    steady_vcpu_hours: float
    steady_per_vcpu_hour: float | None


def control_interval(scenario: Scenario) -> float:
    """The controller's timer period for this scenario, never shorter than a simulation tick."""
    raw = scenario.controller.get("interval_s", DEFAULT_INTERVAL_S)
    value = float(raw) if isinstance(raw, int | float) and not isinstance(raw, bool) else DEFAULT_INTERVAL_S
    return max(value, scenario.tick)


def event_times(scenario: Scenario, duration: float) -> list[float]:
    """Every instant the scenario changes the host (arrivals, departures, phases), ascending."""
    times: set[float] = set()
    for vm in scenario.vms:
        if vm.start < duration:
            times.add(vm.start)
        if vm.stop is not None and vm.stop < duration:
            times.add(vm.stop)
        times.update(p.at for p in vm.phases if vm.start < p.at < duration)
    return sorted(times)


def arrivals(result: SimResult, scenario: Scenario) -> tuple[Arrival, ...] | None:
    """Settle figures for every VM that arrived during the run; None when no controller ran."""
    interval = result.control_interval_s
    if interval is None:
        return None
    duration = result.duration_s
    events = event_times(scenario, duration)
    moves_by_vm: dict[str, list[float]] = {}
    for m in result.moves:
        moves_by_vm.setdefault(m.guest, []).append(m.time)
    out: list[Arrival] = []
    for vm in result.vms:
        t0 = vm.start
        later = [e for e in events if e > t0 + 1e-9]
        end = min(
            t0 + SETTLE_WINDOW_TICKS * interval,
            later[0] if later else math.inf,
            vm.stop if vm.stop is not None else math.inf,
            duration,
        )
        inside = [t for t in moves_by_vm.get(vm.name, []) if t0 - 1e-9 <= t <= end + 1e-9]
        ticks = math.ceil((max(inside) - t0) / interval - 1e-9) if inside else 0
        out.append(Arrival(vm.name, t0, max(ticks, 0), len(inside), end - t0))
    return tuple(out)


def migrations(result: SimResult, scenario: Scenario) -> Migrations:
    """Controller migrations per vCPU-hour, over the whole run and in the steady state."""
    s = result.series
    if not s.time:
        raise ValueError(f"{result.scenario}/{result.policy}: the run kept no time series")
    tick_h = result.tick_s / 3600.0
    events = event_times(scenario, result.duration_s)
    steady_from = (events[-1] if events else 0.0) + STEADY_AFTER_TICKS * control_interval(scenario)
    total = sum(s.controller_migrations)
    hours = sum(s.vcpus) * tick_h
    steady_n = sum(n for t, n in zip(s.time, s.controller_migrations, strict=True) if t > steady_from)
    steady_h = sum(v for t, v in zip(s.time, s.vcpus, strict=True) if t > steady_from) * tick_h
    return Migrations(
        controller=total,
        vcpu_hours=hours,
        per_vcpu_hour=total / hours if hours > 0 else 0.0,
        steady_from=steady_from if steady_from < result.duration_s else None,
        steady_controller=steady_n,
        steady_vcpu_hours=steady_h,
        steady_per_vcpu_hour=steady_n / steady_h if steady_h > 0 else None,
    )
