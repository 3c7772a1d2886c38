"""Per-thread counter collectors: see :mod:`collectors.base`."""
