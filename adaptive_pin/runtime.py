"""Wiring: which collectors, topology and clock go with a driver.

A real host: topology from sysfs (re-read when the set of online CPUs changes, so a CPU taken
offline never appears in a plan), counters from perf_event_open and /proc, the monotonic clock.
The simulated host: its own topology, its own counters, its own clock. The controller cannot
tell the difference, which is the point.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from adaptive_pin.config import CollectorsConfig
from adaptive_pin.drivers.base import Driver
from adaptive_pin.model import CpuSet, Topology
from adaptive_pin.topology import read_topology
from collectors.base import Collector


@dataclass
class Runtime:
    driver: Driver
    collectors: list[Collector]
    topology: Topology
    clock: Callable[[], float]
    topology_source: Callable[[], Topology] | None = None


class OnlineWatcher:
    """Re-reads the topology only when ``cpu/online`` changes: a cheap check every tick."""

    def __init__(self, root: str, first: Topology) -> None:
        self._root = root
        self._path = Path(root) / "sys/devices/system/cpu/online"
        self._seen = self._online_text()
        self._topology = first

    def _online_text(self) -> str:
        try:
            return self._path.read_text()
        except OSError:
            return ""

    def __call__(self) -> Topology:
        now = self._online_text()
        if now != self._seen:
            # A TopologyError propagates: the controller keeps the last good topology and counts it.
            self._topology = read_topology(self._root, reserved=self._topology.reserved & _online(now))
            self._seen = now
        return self._topology


def _online(text: str) -> CpuSet:
    try:
        return CpuSet.parse(text)
    except ValueError:
        return CpuSet()


def build_runtime(
    driver: Driver,
    *,
    sysfs_root: str = "/",
    reserved: CpuSet = CpuSet(),
    hide_pmu: bool = False,
    collectors: CollectorsConfig | None = None,
) -> Runtime:
    from adaptive_pin.drivers.sim import SimDriver

    if isinstance(driver, SimDriver):
        from collectors.sim import SimCollector

        host = driver.host
        topology = host.topology.with_reserved(host.topology.reserved | reserved)
        hide = ("pmu",) if hide_pmu else ()
        return Runtime(driver, [SimCollector(host, hide=hide)], topology, lambda: host.now)

    from collectors.perf import PerfCollector
    from collectors.procfs import ProcfsCollector

    c = collectors or CollectorsConfig()
    topology = read_topology(sysfs_root, reserved=reserved)
    sources: list[Collector] = [
        ProcfsCollector(context_switches=c.context_switches, stat_every=c.last_cpu_every)
    ]
    if c.perf and not hide_pmu:
        sources.append(PerfCollector(c.perf_events(), exclude_kernel=c.exclude_kernel))
    return Runtime(driver, sources, topology, time.monotonic, OnlineWatcher(sysfs_root, topology))


def freeze_startup_heap() -> None:
    """Move everything alive now out of the cyclic GC's sight (gc.freeze), once set up.

    A long-running loop allocates a few Python objects per vCPU every round (the rates, the
    snapshot); enough of them outlive a round to trigger full collections regularly, and each
    full collection walks every tracked object, the startup heap (modules, libvirt, numpy, the
    metrics registry) included, to find nothing: measured at 1,000 vCPUs, about 0.6 µs per
    vCPU a round of the sampler's cost (benchmarks/sampling.py). Frozen objects are still
    freed by reference counting; only a cycle among them would leak, hence the collect first.
    """
    gc.collect()
    gc.freeze()
