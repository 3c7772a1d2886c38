"""adaptive-pin: telemetry-driven vCPU pinning for Linux hypervisor hosts."""

__version__ = "0.1.0"
