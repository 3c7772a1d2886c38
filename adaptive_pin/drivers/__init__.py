"""Hypervisor drivers: see :mod:`adaptive_pin.drivers.base` for the protocol and registry."""

from adaptive_pin.drivers.base import DRIVERS, Driver, open_driver

__all__ = ["DRIVERS", "Driver", "open_driver"]
