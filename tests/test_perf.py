"""perf_event_open over ctypes, on the real kernel: software events count, hardware ones fail cleanly."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from adaptive_pin.model import CONTEXT_SWITCHES, CPU_TIME, CYCLES, LLC_MISSES, TASK_CLOCK, ThreadRef
from collectors import pfm
from collectors.base import Collector
from collectors.perf import FD_LIMIT_KEY, PerfCollector, explain, scale_delta
from collectors.perf_abi import (
    PERF_ATTR_SIZE,
    PERF_TYPE_HW_CACHE,
    PERF_TYPE_RAW,
    PERF_TYPE_SOFTWARE,
    PerfEventAttr,
    parse_builtin,
    perf_event_open,
)
from collectors.procfs import ProcfsCollector

SOFTWARE = {TASK_CLOCK: "task-clock", CONTEXT_SWITCHES: "context-switches"}
REPO = Path(__file__).resolve().parent.parent


def _has_pmu() -> bool:
    attr = PerfEventAttr()
    attr.size = PERF_ATTR_SIZE
    attr.exclude_hv = 1
    try:
        os.close(perf_event_open(attr, 0))
    except OSError:
        return False
    return True


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


class Worker:
    """A real thread that runs the steps it is handed, one at a time."""

    def __init__(self) -> None:
        self.tid = 0
        self._go = threading.Event()
        self._done = threading.Event()
        self._step: Callable[[], None] | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()
        self._ready.wait(5)

    def _main(self) -> None:
        self.tid = threading.get_native_id()
        self._ready.set()
        while True:
            self._go.wait()
            self._go.clear()
            step = self._step
            if step is None:
                return
            step()
            self._done.set()

    def run(self, step: Callable[[], None]) -> None:
        self._done.clear()
        self._step = step
        self._go.set()
        assert self._done.wait(30), "worker step did not finish"

    def stop(self) -> None:
        """End the thread and wait until the kernel has reaped it (join() returns a bit earlier)."""
        self._step = None
        self._go.set()
        self._thread.join(5)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/self/task/{self.tid}") and time.monotonic() < deadline:
            time.sleep(0.001)

    @property
    def ref(self) -> ThreadRef:
        return ThreadRef(("vm", 0), os.getpid(), self.tid)

    def cpu_s(self) -> float:
        """The thread's own CPU clock, read from outside it: all it burned, step or not."""
        assert self._thread.ident is not None
        return time.clock_gettime(time.pthread_getcpuclockid(self._thread.ident))


@contextmanager
def worker() -> Iterator[Worker]:
    w = Worker()
    try:
        yield w
    finally:
        w.stop()


def _naps(count: int) -> Callable[[], None]:
    def step() -> None:
        for _ in range(count):
            time.sleep(0.002)

    return step


def _spin(cpu_s: float, out: dict[str, float]) -> Callable[[], None]:
    def step() -> None:
        t0 = time.thread_time()
        while time.thread_time() - t0 < cpu_s:
            pass
        out["burned"] = time.thread_time() - t0

    return step


# --- the ABI ---------------------------------------------------------------------------------


def test_attr_layout_matches_the_kernel_header() -> None:
    assert PERF_ATTR_SIZE == 136  # PERF_ATTR_SIZE_VER8
    assert PerfEventAttr.config1.offset == 56 and PerfEventAttr.config3.offset == 128
    attr = PerfEventAttr()
    flags = ctypes.c_uint64.from_buffer(attr, 40)  # the bitfield word follows read_format
    attr.disabled = 1
    assert flags.value == 1
    attr.disabled, attr.exclude_hv, attr.exclude_guest = 0, 1, 1
    assert flags.value == (1 << 6) | (1 << 20)


def test_event_names_encode_like_perf() -> None:
    miss = parse_builtin("LLC-load-misses")
    assert miss is not None and (miss.type, miss.config) == (PERF_TYPE_HW_CACHE, 0x10002)
    loads = parse_builtin("LLC-loads")
    assert loads is not None and (loads.type, loads.config) == (PERF_TYPE_HW_CACHE, 0x2)
    raw = parse_builtin("r01c4")
    assert raw is not None and (raw.type, raw.config) == (PERF_TYPE_RAW, 0x1C4)
    tc = parse_builtin("task-clock")
    assert tc is not None and tc.type == PERF_TYPE_SOFTWARE and not tc.hardware
    assert parse_builtin("MEM_LOAD_RETIRED.L3_MISS") is None


@pytest.mark.parametrize(
    ("delta", "enabled", "running", "want"),
    [(100, 10, 10, 100.0), (100, 20, 10, 200.0), (90, 30, 10, 270.0), (0, 0, 0, 0.0), (5, 10, 0, None)],
)
def test_multiplex_scaling(delta: int, enabled: int, running: int, want: float | None) -> None:
    assert scale_delta(delta, enabled, running) == want


def test_capability_messages_name_the_cause(tmp_path: Path) -> None:
    paranoid = tmp_path / "perf_event_paranoid"
    paranoid.write_text("3\n")
    denied = explain(errno.EACCES, "cycles", str(paranoid))
    assert "perf_event_paranoid=3" in denied and "CAP_PERFMON" in denied
    assert explain(errno.ENOENT, "cycles") == "no PMU: cycles not supported (ENOENT)"
    assert explain(errno.EOPNOTSUPP, "cache-misses") == "no PMU: cache-misses not supported (EOPNOTSUPP)"
    assert "fd limit" in explain(errno.EMFILE, "cycles")


# --- the collector on real threads ---------------------------------------------------------------


def test_perf_collector_is_a_collector() -> None:
    c = PerfCollector(SOFTWARE)
    try:
        assert isinstance(c, Collector)
        assert c.capabilities()[TASK_CLOCK] is None
    finally:
        c.close()


def test_task_clock_tracks_the_threads_own_cpu_clock() -> None:
    perf, procfs = PerfCollector(SOFTWARE), ProcfsCollector()
    burned: dict[str, float] = {}
    with worker() as w:
        steal0, clock0 = psutil.cpu_times().steal, w.cpu_s()
        before = perf.sample([w.ref])[w.tid].values[TASK_CLOCK]
        before_proc = procfs.sample([w.ref])[w.tid].values[CPU_TIME]
        w.run(_spin(0.3, burned))
        after = perf.sample([w.ref])[w.tid].values[TASK_CLOCK]
        after_proc = procfs.sample([w.ref])[w.tid].values[CPU_TIME]
        clock1, steal1 = w.cpu_s(), psutil.cpu_times().steal
    perf.close()
    procfs.close()
    assert burned["burned"] >= 0.3
    # The reference is the thread's whole CPU clock over the window (the spin's own measure
    # misses its wake-up and hand-off). In a VM task-clock also runs while the hypervisor steals
    # the vCPU, which the CPU clock leaves out (paravirt steal accounting): allow the steal the
    # host saw meanwhile (in 10 ms ticks), never more.
    cpu = clock1 - clock0
    assert cpu * 0.95 <= after - before <= cpu * 1.05 + (steal1 - steal0) + 0.01
    assert after_proc - before_proc == pytest.approx(cpu, rel=0.05)  # schedstat is the CPU clock


def test_context_switches_rise_when_a_thread_sleeps_and_wakes() -> None:
    perf = PerfCollector(SOFTWARE)
    with worker() as w:
        before = perf.sample([w.ref])[w.tid].values[CONTEXT_SWITCHES]
        w.run(_naps(20))
        after = perf.sample([w.ref])[w.tid].values[CONTEXT_SWITCHES]
    perf.close()
    assert after - before >= 20


def test_hardware_events_without_a_pmu_report_enoent_once() -> None:
    if _has_pmu():
        pytest.skip("this host has a PMU: the ENOENT path cannot be exercised")
    perf = PerfCollector({CYCLES: "cycles", LLC_MISSES: "cache-misses", **SOFTWARE})
    caps = perf.capabilities()
    assert caps[CYCLES] == "no PMU: cycles not supported (ENOENT)"
    assert caps[LLC_MISSES] == "no PMU: cache-misses not supported (ENOENT)"
    with worker() as w:
        got = perf.sample([w.ref])[w.tid]
        # the software events still formed a group: two fds, not four
        assert len(perf._groups[w.tid].fds) == 2
    perf.close()
    assert set(got.values) == {TASK_CLOCK, CONTEXT_SWITCHES}
    assert got.missing[CYCLES] == "no PMU: cycles not supported (ENOENT)"


def test_only_hardware_events_without_a_pmu_open_nothing_per_thread() -> None:
    if _has_pmu():
        pytest.skip("this host has a PMU")
    perf = PerfCollector()  # the default: cycles, instructions, cache-misses, cache-references
    fds = _fd_count()
    with worker() as w:
        got = perf.sample([w.ref])[w.tid]
        assert _fd_count() == fds
    assert got.values == {} and got.missing[LLC_MISSES].startswith("no PMU")


def test_thread_exiting_between_open_and_read_closes_its_fds() -> None:
    perf = PerfCollector(SOFTWARE)
    fds = _fd_count()
    w = Worker()
    ref = w.ref
    assert ref.tid in perf.sample([ref])
    assert _fd_count() == fds + 2
    w.stop()
    assert perf.sample([ref]) == {}
    assert _fd_count() == fds
    perf.close()


def test_thread_gone_before_open_is_left_out() -> None:
    perf = PerfCollector(SOFTWARE)
    w = Worker()
    ref = w.ref
    w.stop()
    fds = _fd_count()
    assert perf.sample([ref]) == {}
    assert _fd_count() == fds
    perf.close()


def test_threads_not_asked_for_any_more_are_forgotten() -> None:
    perf = PerfCollector(SOFTWARE)
    fds = _fd_count()
    with worker() as a, worker() as b:
        perf.sample([a.ref, b.ref])
        assert _fd_count() == fds + 4
        got = perf.sample([b.ref])
        assert set(got) == {b.tid}
        assert _fd_count() == fds + 2
    perf.close()
    assert _fd_count() == fds


EMFILE_SCRIPT = """
import json, os, resource, threading
from adaptive_pin.model import ThreadRef, TASK_CLOCK, CONTEXT_SWITCHES
from collectors.perf import PerfCollector, FD_LIMIT_KEY
stop = threading.Event(); tids = []
def run():
    tids.append(threading.get_native_id()); stop.wait()
threads = [threading.Thread(target=run) for _ in range(20)]
for t in threads: t.start()
while len(tids) < 20: pass
used = len(os.listdir("/proc/self/fd"))
limit = used + 11  # room for 5 groups of 2 and the listdir fd
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
perf = PerfCollector({TASK_CLOCK: "task-clock", CONTEXT_SWITCHES: "context-switches"})
got = perf.sample([ThreadRef(("vm", i), os.getpid(), t) for i, t in enumerate(tids)])
short = [t for t in tids if not got[t].values]
note = perf.capabilities().get(FD_LIMIT_KEY)
print(json.dumps({"limit": limit, "unmonitored": perf.unmonitored, "note": note,
                  "monitored": sum(1 for t in tids if got[t].values),
                  "short_reason": got[short[0]].missing.get(TASK_CLOCK) if short else None}))
stop.set()
"""


def test_fd_exhaustion_reports_how_many_threads_are_unmonitored() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", EMFILE_SCRIPT],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["unmonitored"] > 0
    assert out["monitored"] + out["unmonitored"] == 20
    assert (
        f"RLIMIT_NOFILE={out['limit']} reached; {out['unmonitored']} of 20 threads unmonitored" in out["note"]
    )
    assert out["short_reason"] == out["note"]
    assert FD_LIMIT_KEY == "perf_fd_limit"


def test_nofile_soft_limit_is_raised_to_the_hard_one() -> None:
    script = (
        "import resource; from collectors.perf import raise_nofile_limit\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))\n"
        "print(raise_nofile_limit() == (hard, hard), resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert proc.stdout.split() == ["True", "True"], proc.stderr


# --- libpfm4 -------------------------------------------------------------------------------------


def test_libpfm_missing_is_a_clear_error() -> None:
    with pytest.raises(pfm.PfmUnavailableError, match="not installed: apt-get install libpfm4"):
        pfm.Libpfm("libpfm-does-not-exist.so.4")


def test_libpfm_encodes_symbolic_names_where_installed() -> None:
    try:
        lib = pfm.load()
    except pfm.PfmUnavailableError as exc:
        pytest.skip(str(exc))
    spec = lib.encode("instructions")
    assert (spec.type, spec.config) == (0, 1)
    with pytest.raises(pfm.PfmEncodeError, match="NO_SUCH_EVENT"):
        lib.encode("NO_SUCH_EVENT")
    perf = PerfCollector({LLC_MISSES: "NO_SUCH_EVENT", **SOFTWARE})
    assert "libpfm4 cannot encode 'NO_SUCH_EVENT'" in str(perf.capabilities()[LLC_MISSES])
    perf.close()


# --- multiplex scaling through the collector (scripted group reads) ---------------------------------


def _scripted_reads(
    perf: PerfCollector, tid: int, script: list[tuple[int, int, int, int]]
) -> Callable[..., int]:
    """A stand-in for os.readv that answers the group's reads with (enabled, running, v1, v2)."""
    import struct

    g = perf._groups[tid]
    steps = iter(script)

    def readv(fd: int, bufs: list[memoryview]) -> int:
        assert fd == g.leader
        enabled, running, v1, v2 = next(steps)
        words = (2, enabled, running, v1, g.ids[0], v2, g.ids[1])
        struct.pack_into("7Q", bufs[0], 0, *words)
        return 56

    return readv


def test_collector_scales_multiplexed_counts_and_says_when_multiplexed_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    perf = PerfCollector(SOFTWARE)
    with worker() as w:
        perf.sample([w.ref])  # opens the group
        script = [
            (1000, 1000, 100, 10),  # never multiplexed: the raw counts
            (2000, 1500, 200, 20),  # counted 500 of 1000 ns: +100 raw is +200
            (3000, 1500, 250, 30),  # not counted at all: None with a reason, baseline kept
            (4000, 2000, 400, 40),  # 500 of 2000 ns since the last counted read: +200 is +800
        ]
        monkeypatch.setattr(os, "readv", _scripted_reads(perf, w.tid, script))
        got = [perf.sample([w.ref])[w.tid] for _ in script]
        scale = perf.scale_of(w.tid)
        monkeypatch.undo()
    perf.close()
    assert got[0].values[TASK_CLOCK] == pytest.approx(100e-9)
    assert got[0].values[CONTEXT_SWITCHES] == 10
    assert got[1].values[TASK_CLOCK] == pytest.approx(300e-9)
    assert got[1].values[CONTEXT_SWITCHES] == pytest.approx(30)
    assert got[2].values == {}
    assert got[2].missing[TASK_CLOCK] == "multiplexed out: not counted in the last 0.0 ms"
    assert got[2].missing[CONTEXT_SWITCHES] == got[2].missing[TASK_CLOCK]
    assert got[3].values[TASK_CLOCK] == pytest.approx(300e-9 + 800e-9)
    assert got[3].values[CONTEXT_SWITCHES] == pytest.approx(30 + 80)
    assert scale == pytest.approx(4.0)


def test_liveness_from_the_sampler_closes_groups_without_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    from collectors.base import Roster

    perf = PerfCollector(SOFTWARE)
    fds = _fd_count()
    with worker() as w:
        roster = Roster((w.ref,))
        assert perf.sample_batch(roster).seen.tolist() == [True]
        assert _fd_count() == fds + 2
        gone = perf.sample_batch(roster, np.array([False]))  # e.g. procfs saw ESRCH
        assert gone.seen.tolist() == [False]
        assert _fd_count() == fds
        back = perf.sample_batch(roster, np.array([True]))  # reopened: a fresh group, no history
        assert back.seen.tolist() == [True] and _fd_count() == fds + 2
    perf.close()


def test_a_failing_group_read_closes_only_that_group_and_it_is_reopened(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import errno

    from collectors.base import Roster

    perf = PerfCollector(SOFTWARE)
    with worker() as a, worker() as b:
        roster = Roster((a.ref, b.ref))
        assert perf.sample_batch(roster).seen.tolist() == [True, True]
        bad = perf._groups[a.tid].leader
        real = os.readv

        def readv(fd: int, bufs: list[memoryview]) -> int:
            if fd == bad:
                raise OSError(errno.EIO, "Input/output error")
            return real(fd, bufs)

        monkeypatch.setattr(os, "readv", readv)
        t0 = time.monotonic()
        got = perf.sample_batch(roster)
        t1 = time.monotonic()
        monkeypatch.undo()
        assert got.seen.tolist() == [False, True]
        assert a.tid not in perf._groups and b.tid in perf._groups
        assert t0 <= got.time[1] <= t1
        again = perf.sample_batch(roster)  # reopened: a fresh group for a
        assert again.seen.tolist() == [True, True] and a.tid in perf._groups
    perf.close()
