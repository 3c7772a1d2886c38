"""Scenarios nobody tuned for: random VM mixes on every shipped host topology.

``adaptive-pin bench --random N`` adds N of these to the bench. Each is drawn from a seeded
RNG (``--random-seed``), so the same N and seed give the same scenarios on any machine:
a host (the shipped real machines in turn: 1 to 8 NUMA nodes, 1 to 32 LLC domains, x86, Arm
and POWER), 0.4 to 1.2 vCPUs per usable PU, VMs of 1 to 8 vCPUs running the shipped measured
workloads at partial or full load, a quarter of them arriving late and some leaving. They are
written as scenario TOML and read back through the same loader as a scenario file, so each one
can be saved (``--json`` carries its text) and rerun alone with ``--scenario``.

Why: the shipped scenarios each show one effect, and a policy can come to fit them; a policy
that is any good must also win on hosts and mixes it has never seen.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from adaptive_pin.fixtures import fixture_names
from adaptive_pin.sim.host import load_host_topology
from adaptive_pin.sim.scenario import HostSpec, Scenario, loads_scenario
from adaptive_pin.sim.workloads import load_curves

DURATION_S = 120
DENSITY = (0.4, 0.7, 0.9, 1.2)  # vCPUs per usable PU
LOADS = (0.3, 0.6, 1.0, 1.0)
SIZES = (1, 2, 2, 4, 4, 8)
SMALL_HOST_SIZES = (1, 2, 2)  # fewer than 16 usable PUs
LATE_SHARE, LATE_AT = 0.25, (10, 30, 50)
LEAVE_SHARE, LEAVE_AT = 0.1, 90


@dataclass(frozen=True)
class RandomScenario:
    scenario: Scenario
    text: str  # the scenario file it was read from


def hosts() -> list[str]:
    """Shipped topologies, each once (the generator takes them in turn)."""
    return fixture_names()


def _vms(rng: random.Random, usable: int, workloads: Sequence[str]) -> list[str]:
    target = max(2, int(usable * rng.choice(DENSITY)))
    sizes = SIZES if usable >= 16 else SMALL_HOST_SIZES
    out: list[str] = []
    total = 0
    while total < target:
        vcpus = rng.choice(sizes)
        lines = [
            "[[vms]]",
            f'name = "vm{len(out)}"',
            f"vcpus = {vcpus}",
            f'workload = "{rng.choice(workloads)}"',
            f"load = {rng.choice(LOADS)}",
        ]
        if rng.random() < LATE_SHARE:
            lines.append(f"start = {rng.choice(LATE_AT)}")
        if rng.random() < LEAVE_SHARE:
            lines.append(f"stop = {LEAVE_AT}")
        out.append("\n".join(lines))
        total += vcpus
    return out


def generate(count: int, seed: int) -> list[RandomScenario]:
    """``count`` scenarios from ``seed``; the i-th uses the i-th shipped host (cycling)."""
    rng = random.Random(seed)
    workloads = sorted(load_curves())
    names = hosts()
    out: list[RandomScenario] = []
    for i in range(count):
        topo = names[i % len(names)]
        name = f"random-{seed}-{i}"
        head = "\n".join(
            [
                f'name = "{name}"',
                f'description = "random mix {i} of seed {seed} on {topo}"',
                f"duration = {DURATION_S}",
                "tick = 1.0",
                f"seed = {rng.randrange(1 << 31)}",
                "",
                "[host]",
                f'topology = "{topo}"',
            ]
        )
        host = load_host_topology(HostSpec(topology=topo))
        usable = len(host.usable or host.online)
        text = head + "\n\n" + "\n\n".join(_vms(rng, usable, workloads)) + "\n"
        out.append(RandomScenario(loads_scenario(text, origin=name, default_name=name), text))
    return out
