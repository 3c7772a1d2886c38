"""Flags shared by the commands that run the controller (plan, apply, run): file, then flags."""

from __future__ import annotations

import argparse
from typing import Any

from adaptive_pin.commands._common import add_driver_arguments, parse_qmp
from adaptive_pin.commands._options import split_option
from adaptive_pin.config import DEFAULT_PATH, Config, load_config, with_overrides

CONTROLLER_EPILOG = """\
Configuration: options come from the config file (default {default}, all defaults when it is
absent; see `adaptive-pin config show-defaults`), and these flags override it.
"""


def add_controller_arguments(parser: argparse.ArgumentParser) -> None:
    add_driver_arguments(parser)
    # None = "flag not given": the config file's value stands.
    parser.set_defaults(driver=None)
    g = parser.add_argument_group("controller")
    g.add_argument("--config", metavar="FILE", help=f"config file (default: {DEFAULT_PATH} if present)")
    g.add_argument("--policy", metavar="NAME", help="placement policy (default: cache-aware)")
    g.add_argument(
        "--policy-option",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="policy option, e.g. granularity=core (repeatable)",
    )
    g.add_argument("--interval", type=float, metavar="SECONDS", help="sampling interval (default: 5)")
    g.add_argument("--reserved", metavar="CPULIST", help="host CPUs never used for vCPUs, e.g. 0-1")
    g.add_argument("--sysfs-root", metavar="DIR", help="read the topology under DIR instead of /")
    g.add_argument(
        "--no-pmu",
        action="store_true",
        help="decide without hardware counters (CPU time and cohesion only), as on a host without a PMU",
    )


def _policy_options(items: list[str]) -> dict[str, Any] | None:
    if not items:
        return None
    return dict(split_option(item, "--policy-option", example="granularity=core") for item in items)


def overrides_from_args(args: argparse.Namespace, **extra: object) -> dict[str, object]:
    qmp = parse_qmp(args.qmp) if args.qmp else None
    return {
        "driver.name": args.driver,
        "driver.libvirt_uri": args.libvirt_uri,
        "driver.qmp": qmp,
        "driver.scenario": args.scenario,
        "policy.name": args.policy,
        "policy.options": _policy_options(args.policy_option),
        "controller.interval_s": args.interval,
        "host.reserved": args.reserved,
        "host.sysfs_root": args.sysfs_root,
        **extra,
    }


def effective_config(args: argparse.Namespace, **extra: object) -> tuple[Config, dict[str, object]]:
    overrides = overrides_from_args(args, **extra)
    if args.scenario and args.driver is None:
        overrides["driver.name"] = "sim"  # a scenario can only mean the simulator
    return with_overrides(load_config(args.config), **overrides), overrides
