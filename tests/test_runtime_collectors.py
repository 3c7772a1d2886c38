"""``[collectors]`` decides what a real host's runtime samples: which perf events, and /proc extras."""

from __future__ import annotations

from adaptive_pin.config import parse_config
from adaptive_pin.drivers.qemu import QemuDriver
from adaptive_pin.model import (
    CYCLES,
    INSTRUCTIONS,
    INVOLUNTARY_CTXSW,
    LLC_MISSES,
    LLC_REFERENCES,
    VOLUNTARY_CTXSW,
)
from adaptive_pin.runtime import build_runtime
from collectors.perf import PerfCollector
from collectors.procfs import ProcfsCollector


def _collectors(text: str) -> tuple[ProcfsCollector, PerfCollector | None]:
    config = parse_config(text, "c.toml")
    runtime = build_runtime(QemuDriver(), collectors=config.collectors)
    procfs = [c for c in runtime.collectors if isinstance(c, ProcfsCollector)]
    perf = [c for c in runtime.collectors if isinstance(c, PerfCollector)]
    assert len(procfs) == 1 and len(perf) <= 1 and len(runtime.collectors) == len(procfs) + len(perf)
    return procfs[0], perf[0] if perf else None


def test_the_default_counts_the_four_events_cache_aware_reads() -> None:
    procfs, perf = _collectors("")
    assert perf is not None
    assert set(perf.capabilities()) >= {CYCLES, INSTRUCTIONS, LLC_MISSES, LLC_REFERENCES}
    assert VOLUNTARY_CTXSW not in procfs.capabilities()


def test_events_are_named_per_counter_and_an_empty_name_leaves_it_out() -> None:
    _, perf = _collectors('[collectors]\nllc_references_event = ""\nllc_misses_event = "LLC-load-misses"\n')
    assert perf is not None
    caps = perf.capabilities()
    assert LLC_REFERENCES not in caps and LLC_MISSES in caps
    if caps[LLC_MISSES] is not None:  # without a PMU the reason names the event asked for
        assert "LLC-load-misses" in caps[LLC_MISSES]


def test_perf_off_and_context_switches_on() -> None:
    procfs, perf = _collectors("[collectors]\nperf = false\ncontext_switches = true\n")
    assert perf is None
    caps = procfs.capabilities()
    assert VOLUNTARY_CTXSW in caps and INVOLUNTARY_CTXSW in caps


def test_the_startup_heap_is_collected_then_frozen() -> None:
    """Cycles left by start-up are freed first; what is alive then is out of every later collection."""
    import gc
    import weakref

    from adaptive_pin.runtime import freeze_startup_heap

    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a  # type: ignore[attr-defined]
    gone = weakref.ref(a)
    del a, b
    kept = Node()
    try:
        freeze_startup_heap()
        assert gone() is None  # the cycle was collected, not frozen in
        assert gc.get_freeze_count() > 0
        assert not any(o is kept for o in gc.get_objects())  # frozen: no generation holds it
    finally:
        gc.unfreeze()
