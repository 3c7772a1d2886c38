"""Shared test helpers.

Integration tests need real QEMU, libvirtd or Prometheus. On a developer machine without them
they skip; CI sets ADAPTIVE_PIN_REQUIRE_INTEGRATION=1 and every such skip becomes a failure.
"""

from __future__ import annotations

import os

import pytest

REQUIRE_INTEGRATION = os.environ.get("ADAPTIVE_PIN_REQUIRE_INTEGRATION") == "1"


def require(condition: bool, reason: str) -> None:
    """Skip the test when ``condition`` is false, or fail it under CI."""
    if condition:
        return
    if REQUIRE_INTEGRATION:
        pytest.fail(f"integration prerequisite missing (ADAPTIVE_PIN_REQUIRE_INTEGRATION=1): {reason}")
    pytest.skip(reason)
