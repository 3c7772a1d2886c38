"""Counters of simulated vCPU threads, read from a :class:`adaptive_pin.sim.host.SimHost`.

Gives what perf + procfs would on a real host (instructions, cycles, LLC misses and
references, CPU time, run delay, migrations), cumulative, with ``time`` in simulated seconds.
``hide=("pmu",)`` withholds the hardware counters as a host without a PMU would, so the
no-PMU path of the controller and policies can be exercised in simulation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from adaptive_pin.errors import UsageError
from adaptive_pin.model import (
    CPU_MIGRATIONS,
    CPU_TIME,
    CYCLES,
    INSTRUCTIONS,
    LLC_MISSES,
    LLC_REFERENCES,
    RUN_DELAY,
    ThreadCounters,
    ThreadRef,
)
from adaptive_pin.sim.host import SimHost

PMU_COUNTERS = (LLC_MISSES, LLC_REFERENCES, INSTRUCTIONS, CYCLES)
ALL_COUNTERS = (*PMU_COUNTERS, CPU_TIME, RUN_DELAY, CPU_MIGRATIONS)
NO_PMU = "no PMU (simulated)"


class SimCollector:
    """The Collector protocol over a simulated host."""

    name = "sim"

    def __init__(self, host: SimHost, hide: Iterable[str] = ()) -> None:
        self.host = host
        self.hidden: dict[str, str] = {}
        for item in hide:
            if item == "pmu":
                self.hidden.update(dict.fromkeys(PMU_COUNTERS, NO_PMU))
            elif item in ALL_COUNTERS:
                self.hidden[item] = "hidden (simulated)"
            else:
                raise UsageError(
                    f"sim collector: cannot hide {item!r}: choose pmu or one of {', '.join(ALL_COUNTERS)}"
                )

    def sample(self, threads: Sequence[ThreadRef]) -> dict[int, ThreadCounters]:
        self.host.sync()
        live = {th.tid: th for th in self.host.threads()}
        out: dict[int, ThreadCounters] = {}
        for ref in threads:
            th = live.get(ref.tid)
            if th is None:
                continue  # gone: left out, never reported as zeros
            values = {k: v for k, v in th.counters.items() if k not in self.hidden}
            last = self.host.topology.pus[th.pu] if th.pu >= 0 else None
            out[ref.tid] = ThreadCounters(ref.tid, self.host.now, values, dict(self.hidden), last)
        return out

    def capabilities(self) -> Mapping[str, str | None]:
        return {k: self.hidden.get(k) for k in ALL_COUNTERS}

    def close(self) -> None:
        return None
