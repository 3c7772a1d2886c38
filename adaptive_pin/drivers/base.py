"""The Driver protocol, shared by the libvirt, plain-QEMU and simulated drivers."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from adaptive_pin.errors import UsageError
from adaptive_pin.model import CpuSet, Guest, GuestEvent, Inventory


@runtime_checkable
class Driver(Protocol):
    """Sees guests, pins vCPU threads, reports guests coming and going.

    ``pin`` raises :class:`adaptive_pin.errors.GuestGoneError` when the VM or thread vanished and
    :class:`adaptive_pin.errors.PinError` when the hypervisor refused; both are per-VM.
    """

    name: str

    def inventory(self) -> Inventory: ...

    def pin(self, guest: Guest, vcpu: int, cpus: CpuSet) -> None: ...

    def events(self, timeout: float) -> list[GuestEvent]:
        """Events seen since the last call; waits up to ``timeout`` s for the first one."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class MemoryMigrator(Protocol):
    """A driver that can also move a guest's memory between NUMA nodes (optional).

    ``migrate_memory`` moves the resident pages on ``from_nodes`` to ``to_nodes`` and returns
    once the kernel has; it raises GuestGoneError / PinError like ``pin``.
    """

    def migrate_memory(self, guest: Guest, from_nodes: CpuSet, to_nodes: CpuSet) -> None: ...


# name -> "module:factory"; factories take keyword options (see each driver's docstring).
DRIVERS: Mapping[str, str] = {
    "libvirt": "adaptive_pin.drivers.libvirt:LibvirtDriver",
    "qemu": "adaptive_pin.drivers.qemu:QemuDriver",
    "sim": "adaptive_pin.drivers.sim:SimDriver",
}


AUTO = "adaptive_pin.drivers.auto:CompositeDriver"


def _load(spec: str) -> Callable[..., Driver]:
    module, _, attr = spec.partition(":")
    factory: Callable[..., Driver] = getattr(importlib.import_module(module), attr)
    return factory


def open_driver(name: str, **options: Any) -> Driver:
    """Open a driver by name.

    ``auto`` takes ``uri``, ``qmp_sockets`` and ``rules``: when libvirt's socket answers, the
    composite driver (libvirt's domains plus the plain QEMUs libvirt does not manage, see
    :mod:`adaptive_pin.drivers.auto`); else plain QEMU alone.
    """
    if name == "auto":
        from adaptive_pin.drivers.libvirt import available

        if available(options.get("uri")):
            return _load(AUTO)(**options)
        name = "qemu"
        options = {k: v for k, v in options.items() if k != "uri"}
    if name not in DRIVERS:
        raise UsageError(f"unknown driver {name!r}: choose one of auto, {', '.join(DRIVERS)}")
    return _load(DRIVERS[name])(**options)
