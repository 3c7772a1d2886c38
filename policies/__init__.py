"""Placement policies: pure functions of a snapshot. See :mod:`policies.base`."""
