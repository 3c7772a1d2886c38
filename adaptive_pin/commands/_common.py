"""Flags every command that talks to a hypervisor shares: which driver, and its options."""

from __future__ import annotations

import argparse
import math
from typing import Any

from adaptive_pin.drivers.base import Driver, open_driver
from adaptive_pin.errors import UsageError
from adaptive_pin.pinnability import PinnabilityRules

DRIVER_CHOICES = ("auto", "libvirt", "qemu", "sim")

DRIVER_HELP_EPILOG = """\
Drivers:
  auto     the default: when libvirt's socket answers, its domains plus the plain QEMU
           processes libvirt does not manage; else plain QEMU alone. With --libvirt-uri,
           libvirt at that URI (its connect error, if any, is the answer)
  libvirt  running libvirt domains; pins through libvirt (its cgroups agree)
  qemu     qemu-system-* processes; vCPU threads by name (-name ...,debug-threads=on) or QMP
  sim      the simulator (--scenario FILE, or its built-in default scenario)
"""


def add_driver_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("hypervisor")
    group.add_argument(
        "--driver", choices=DRIVER_CHOICES, default="auto", help="where guests come from (default: auto)"
    )
    group.add_argument(
        "--libvirt-uri", metavar="URI", help="libvirt connection URI (default: qemu:///system)"
    )
    group.add_argument(
        "--qmp",
        metavar="NAME=SOCKET",
        action="append",
        default=[],
        help="plain QEMU: the QMP socket of the guest with this name or UUID (repeatable)",
    )
    group.add_argument("--scenario", metavar="FILE", help="simulator scenario file (with --driver sim)")


def seconds(text: str) -> float:
    """argparse type: a finite number of seconds >= 0 (``nan``, ``inf``, ``-1`` are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number of seconds >= 0")
    return value


def parse_qmp(items: list[str]) -> dict[str, str]:
    sockets: dict[str, str] = {}
    for item in items:
        name, eq, path = item.partition("=")
        if not eq or not name or not path:
            raise UsageError(f"--qmp {item!r}: expected NAME=SOCKET, e.g. --qmp web1=/run/qemu/web1.qmp")
        sockets[name] = path
    return sockets


def open_driver_from_args(args: argparse.Namespace, rules: PinnabilityRules | None = None) -> Driver:
    """Open the driver the flags ask for; flags that do not fit the driver are usage errors."""
    name: str = args.driver
    uri: str | None = args.libvirt_uri
    qmp = parse_qmp(args.qmp)
    scenario: str | None = args.scenario
    if scenario is not None and name != "sim":
        raise UsageError("--scenario needs --driver sim")
    if name == "auto" and uri is not None:
        name = "libvirt"  # a URI names libvirt: fail with its connect error, not a plain-QEMU guess
    if name == "auto":  # --qmp names plain QEMU guests, which auto lists beside libvirt's
        return open_driver("auto", qmp_sockets=qmp, rules=rules)
    if uri is not None and name != "libvirt":
        raise UsageError(f"--libvirt-uri applies to --driver libvirt, not {name}")
    if qmp and name != "qemu":
        raise UsageError(f"--qmp applies to --driver qemu, not {name}")
    options: dict[str, Any] = {}
    if name == "libvirt":
        options = {"uri": uri, "rules": rules}
    elif name == "qemu":
        options = {"qmp_sockets": qmp, "rules": rules}
    elif name == "sim":
        options = {} if scenario is None else {"scenario": scenario}
    return open_driver(name, **options)
