"""Scenarios nobody tuned for: random VM mixes on every shipped host topology.

``adaptive-pin bench --random N`` adds N of these to the bench. Each is drawn from a seeded
RNG (``--random-seed``), so the same N and seed give the same scenarios on any machine:
a host (the shipped real machines in turn: 1 to 8 NUMA nodes, 1 to 32 LLC domains, x86, Arm
and POWER), 0.4 to 1.2 vCPUs per usable PU, VMs of 1 to 8 vCPUs running the shipped measured
workloads at partial or full load, a quarter of them arriving late and some leaving. They are
written as scenario TOML and read back through the same loader as a scenario file, so each one
can be saved (``--json`` carries its text) and rerun alone with ``--scenario``.

With ``synthetic=True`` (``bench --random-hosts synthetic``) each mix gets a host shape drawn
from the same RNG instead: 1 to 4 packages of 1 to 8 LLC domains of 4 to 16 cores, with or
without SMT, 1.5 to 4 MiB of L3 per core, up to 256 PUs -- shapes no shipped machine has (a
1-socket many-CCX EPYC, a 4-socket host, an SMT-less Arm server), built without sysfs.

Why: the shipped scenarios each show one effect, and a policy can come to fit them; a policy
that is any good must also win on hosts and mixes it has never seen.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from adaptive_pin.fixtures import fixture_names
from adaptive_pin.sim.host import load_host_topology
from adaptive_pin.sim.scenario import HostSpec, Scenario, SyntheticHost, loads_scenario
from adaptive_pin.sim.workloads import load_curves

DURATION_S = 120
DENSITY = (0.4, 0.7, 0.9, 1.2)  # vCPUs per usable PU
LOADS = (0.3, 0.6, 1.0, 1.0)
SIZES = (1, 2, 2, 4, 4, 8)
SMALL_HOST_SIZES = (1, 2, 2)  # fewer than 16 usable PUs
LATE_SHARE, LATE_AT = 0.25, (10, 30, 50)
LEAVE_SHARE, LEAVE_AT = 0.1, 90
# synthetic hosts (synthetic=True)
PACKAGES = (1, 2, 2, 4)
LLC_PER_PACKAGE = (1, 2, 4, 8)
CORES_PER_LLC = (4, 6, 8, 16)
THREADS_PER_CORE = (1, 2, 2)
LLC_MIB_PER_CORE = (1.5, 2.0, 4.0)  # Skylake-SP 1.375, Zen 2-4 4, Arm Neoverse servers 1-2
MAX_SYNTHETIC_PUS = 256  # the simulated run's cost grows with the host; bench stays minutes


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


def synthetic_host(rng: random.Random) -> SyntheticHost:
    """A host shape from the tables above; LLC domains per package halved until it fits."""
    packages, llcs = rng.choice(PACKAGES), rng.choice(LLC_PER_PACKAGE)
    cores, threads = rng.choice(CORES_PER_LLC), rng.choice(THREADS_PER_CORE)
    per_core = rng.choice(LLC_MIB_PER_CORE)
    while llcs > 1 and packages * llcs * cores * threads > MAX_SYNTHETIC_PUS:
        llcs //= 2
    return SyntheticHost(packages, llcs, cores, threads, llc_mib=cores * per_core)


def _host_lines(
    rng: random.Random, shipped: Sequence[str], i: int, synthetic: bool
) -> tuple[str, str, HostSpec]:
    """(host description, its [host] table's line, the spec) of the i-th mix."""
    if not synthetic:
        topo = shipped[i % len(shipped)]
        return topo, f'topology = "{topo}"', HostSpec(topology=topo)
    h = synthetic_host(rng)
    threads = f"{h.threads_per_core} thread{'s' if h.threads_per_core > 1 else ''}"
    shape = f"{h.packages} x {h.llc_per_package} LLC x {h.cores_per_llc} cores x {threads}"
    line = (
        f"synthetic = {{ packages = {h.packages}, llc_per_package = {h.llc_per_package}, "
        f"cores_per_llc = {h.cores_per_llc}, threads_per_core = {h.threads_per_core}, "
        f"llc_mib = {h.llc_mib:g} }}"
    )
    return f"synthetic {shape}, {h.llc_mib:g} MiB L3 each", line, HostSpec(topology=None, synthetic=h)


def generate(count: int, seed: int, synthetic: bool = False) -> list[RandomScenario]:
    """``count`` scenarios from ``seed``: the i-th on the i-th shipped host (cycling), or, with
    ``synthetic``, each on a host shape drawn from the same RNG."""
    rng = random.Random(seed)
    workloads = sorted(load_curves())
    shipped = hosts()
    out: list[RandomScenario] = []
    for i in range(count):
        where, host_line, spec = _host_lines(rng, shipped, i, synthetic)
        name = f"random-{'synth-' if synthetic else ''}{seed}-{i}"
        head = "\n".join(
            [
                f'name = "{name}"',
                f'description = "random mix {i} of seed {seed} on {where}"',
                f"duration = {DURATION_S}",
                "tick = 1.0",
                f"seed = {rng.randrange(1 << 31)}",
                "",
                "[host]",
                host_line,
            ]
        )
        host = load_host_topology(spec)
        usable = len(host.usable or host.online)
        text = head + "\n\n" + "\n\n".join(_vms(rng, usable, workloads)) + "\n"
        out.append(RandomScenario(loads_scenario(text, origin=name, default_name=name), text))
    return out
