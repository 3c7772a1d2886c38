"""The simulated hypervisor: guests, pins and lifecycle events of a :class:`SimHost`.

``realtime=True`` (``adaptive-pin run --driver sim``): the simulated clock follows
time.monotonic() from the moment the driver opens, whole ticks at a time. ``realtime=False``
(the simulate runner and tests): the clock moves only when the caller steps the host.
"""

from __future__ import annotations

import time
from pathlib import Path

from adaptive_pin.errors import UsageError
from adaptive_pin.model import CpuSet, Guest, GuestEvent, Inventory
from adaptive_pin.sim.host import SimHost
from adaptive_pin.sim.scenario import load_scenario

DEFAULT_SCENARIO = "demo"


class SimDriver:
    """The Driver protocol over a simulated host built from a scenario file."""

    name = "sim"

    def __init__(
        self, scenario: str | Path | None = None, host: SimHost | None = None, realtime: bool = True
    ) -> None:
        if host is not None and scenario is not None:
            raise UsageError("sim driver: give a scenario or a host, not both")
        self.host = host if host is not None else SimHost(load_scenario(scenario or DEFAULT_SCENARIO))
        self.realtime = realtime
        if realtime:
            origin = time.monotonic() - self.host.now
            self.host.clock = lambda: time.monotonic() - origin

    def inventory(self) -> Inventory:
        self.host.sync()
        return Inventory(guests=self.host.guests(), time=self.host.now)

    def pin(self, guest: Guest, vcpu: int, cpus: CpuSet) -> None:
        self.host.sync()
        self.host.pin(guest.id, vcpu, cpus)

    def migrate_memory(self, guest: Guest, from_nodes: CpuSet, to_nodes: CpuSet) -> None:
        self.host.sync()
        self.host.migrate_memory(guest.id, to_nodes)

    def events(self, timeout: float) -> list[GuestEvent]:
        self.host.sync()
        found = self.host.pop_events()
        if found or not self.realtime or timeout <= 0:
            return found
        deadline = time.monotonic() + timeout
        while not found and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, self.host.tick))
            self.host.sync()
            found = self.host.pop_events()
        return found

    def close(self) -> None:
        self.host.clock = None
