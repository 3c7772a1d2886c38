"""The Collector protocol, shared by perf_event_open, /proc and the simulator."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

from adaptive_pin.model import ThreadCounters, ThreadRef


@runtime_checkable
class Collector(Protocol):
    """Reads cumulative counters of threads; never turns a missing counter into 0."""

    name: str

    def sample(self, threads: Sequence[ThreadRef]) -> dict[int, ThreadCounters]:
        """Counters for each thread id asked for that still exists.

        Threads not asked for any more are forgotten (their fds closed). A thread that vanished
        is left out of the result, not reported as zeros.
        """
        ...

    def capabilities(self) -> Mapping[str, str | None]:
        """Counter name -> None when available, else the reason in words (e.g. "no PMU")."""
        ...

    def close(self) -> None: ...
