"""Build a ready controller from an effective configuration: driver, runtime, policy.

One place that knows how the parts plug together, shared by ``plan``, ``apply``, ``run`` and
the simulator's closed loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from adaptive_pin.config import (
    Config,
    controller_settings,
    pinnability_rules,
    policy_options,
    validate_against,
)
from adaptive_pin.controller import Controller
from adaptive_pin.drivers.base import Driver, open_driver
from adaptive_pin.errors import UsageError
from adaptive_pin.runtime import Runtime, build_runtime
from policies.registry import get_policy


@dataclass
class Assembly:
    controller: Controller
    runtime: Runtime
    driver_name: str


def open_configured_driver(config: Config) -> tuple[Driver, str]:
    d = config.driver
    name = d.name
    if name == "sim" and not d.scenario:
        raise UsageError("driver.name = sim needs a scenario (--scenario FILE)")
    if d.scenario and name != "sim":
        raise UsageError("a scenario needs the sim driver (--driver sim)")
    rules = pinnability_rules(config)
    qmp = {k: str(v) for k, v in d.qmp.items()}
    options: dict[str, Any]
    if name == "auto":  # libvirt's domains plus the plain QEMUs it does not manage, as `status` sees
        options = {"uri": d.libvirt_uri, "qmp_sockets": qmp, "rules": rules}
    elif name == "libvirt":
        options = {"uri": d.libvirt_uri, "rules": rules}
    elif name == "qemu":
        options = {"qmp_sockets": qmp, "rules": rules}
    else:
        options = {"scenario": d.scenario}
    driver = open_driver(name, **options)
    return driver, driver.name


def assemble(config: Config, *, hide_pmu: bool = False) -> Assembly:
    """Open everything; on any failure, close what was already opened."""
    policy = get_policy(config.policy.name, **policy_options(config))
    driver, name = open_configured_driver(config)
    try:
        runtime = build_runtime(
            driver,
            sysfs_root=str(config.host.sysfs_root),
            reserved=config.host.reserved,
            hide_pmu=hide_pmu,
            collectors=config.collectors,
        )
        validate_against(config, runtime.topology)  # CPUs named that the host lacks, nothing left
        controller = Controller(
            driver=driver,
            collectors=runtime.collectors,
            policy=policy,
            topology=runtime.topology,
            settings=controller_settings(config),
            clock=runtime.clock,
            topology_source=runtime.topology_source,
        )
    except BaseException:
        driver.close()
        raise
    return Assembly(controller, runtime, name)
