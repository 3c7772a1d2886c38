"""Errors that reach the operator as one line and a non-zero exit, never a traceback."""

from __future__ import annotations


class AdaptivePinError(Exception):
    """Base: the CLI prints ``adaptive-pin: <message>`` and exits with ``exit_code``."""

    exit_code = 1


class UsageError(AdaptivePinError):
    """Bad input from the operator: a flag, a file, a config key."""

    exit_code = 2


class TopologyError(AdaptivePinError):
    """A sysfs tree that cannot be read; the message names the file."""

    exit_code = 2


class DriverError(AdaptivePinError):
    """The hypervisor side failed as a whole (no libvirtd, no permission)."""


class GuestGoneError(DriverError):
    """The VM or its vCPU thread vanished between inventory and action: a per-VM error."""


class PinError(DriverError):
    """A pin request was refused (EINVAL outside a cpuset, EPERM, libvirt error)."""
