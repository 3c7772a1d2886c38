"""/proc per-thread counters: parsing edge cases and real threads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from adaptive_pin.model import CPU_TIME, INVOLUNTARY_CTXSW, RUN_DELAY, VOLUNTARY_CTXSW, ThreadRef
from collectors.base import Collector
from collectors.procfs import (
    CLK_TCK,
    ProcfsCollector,
    ProcParseError,
    parse_schedstat,
    parse_stat,
    parse_status_ctxsw,
    processor_of_stat,
)
from tests.test_perf import Worker, _fd_count, _naps, _spin, worker


def _stat_line(comm: str, utime: int = 7, stime: int = 3, cpu: int = 1) -> bytes:
    fields = ["S", "1"] + ["0"] * 49  # fields 3..53
    fields[14 - 3], fields[15 - 3], fields[39 - 3] = str(utime), str(stime), str(cpu)
    return f"4242 ({comm}) {' '.join(fields)}\n".encode()


@pytest.mark.parametrize("comm", ["CPU 0/KVM", "a) b) (c", "x", "CPU 3/TCG"])
def test_stat_parses_whatever_comm_holds(comm: str) -> None:
    st = parse_stat(_stat_line(comm, utime=11, stime=5, cpu=3))
    assert (st.utime_ticks, st.stime_ticks, st.processor) == (11, 5, 3)


@pytest.mark.parametrize("comm", ["CPU 0/KVM", "a) b) (c", "x"])
def test_the_last_cpu_parser_agrees_with_the_full_one(comm: str) -> None:
    line = _stat_line(comm, cpu=17)
    assert processor_of_stat(line) == parse_stat(line).processor == 17
    assert processor_of_stat(line[: line.index(b" 17 ") + 3]) == 17  # nothing after field 39 needed
    with pytest.raises(ProcParseError):
        processor_of_stat(b"4242 (x) S 1 2")


def test_bad_files_raise_parse_errors() -> None:
    with pytest.raises(ProcParseError):
        parse_stat(b"4242 no-paren S 1")
    with pytest.raises(ProcParseError):
        parse_stat(b"4242 (x) S 1 2")
    with pytest.raises(ProcParseError):
        parse_schedstat(b"12")
    assert parse_schedstat(b"123456 789 10\n") == (123456, 789)
    status = b"Name:\tx\nvoluntary_ctxt_switches:\t12\nnonvoluntary_ctxt_switches:\t3\n"
    assert parse_status_ctxsw(status) == (12, 3)


def test_real_thread_cpu_time_run_delay_and_last_cpu() -> None:
    procfs = ProcfsCollector(context_switches=True)
    assert isinstance(procfs, Collector)
    burned: dict[str, float] = {}
    with worker() as w:
        before = procfs.sample([w.ref])[w.tid]
        w.run(_spin(0.2, burned))
        w.run(_naps(10))
        after = procfs.sample([w.ref])[w.tid]
    procfs.close()
    assert after.values[CPU_TIME] - before.values[CPU_TIME] == pytest.approx(burned["burned"], rel=0.05)
    assert after.values[RUN_DELAY] >= before.values[RUN_DELAY] >= 0
    assert after.values[VOLUNTARY_CTXSW] - before.values[VOLUNTARY_CTXSW] >= 10
    assert INVOLUNTARY_CTXSW in after.values
    assert after.last_cpu is not None and 0 <= after.last_cpu < (os.cpu_count() or 1)
    assert after.missing == {}


def test_gone_thread_is_left_out_and_its_files_closed() -> None:
    procfs = ProcfsCollector()
    fds = _fd_count()
    w = Worker()
    ref = w.ref
    assert ref.tid in procfs.sample([ref])
    assert _fd_count() == fds + 2  # stat and schedstat stay open for pread
    w.stop()
    assert procfs.sample([ref]) == {}
    assert _fd_count() == fds


def _fake_task(root: Path, pid: int, tid: int, stat: bytes, schedstat: bytes | None) -> ThreadRef:
    task = root / str(pid) / "task" / str(tid)
    task.mkdir(parents=True)
    (task / "stat").write_bytes(stat)
    if schedstat is not None:
        (task / "schedstat").write_bytes(schedstat)
    return ThreadRef(("vm", tid), pid, tid)


def test_without_schedstat_cpu_time_comes_from_ticks(tmp_path: Path) -> None:
    ref = _fake_task(tmp_path, 10, 11, _stat_line("CPU 0/KVM", utime=30, stime=20, cpu=2), None)
    got = ProcfsCollector(proc=str(tmp_path)).sample([ref])[11]
    assert got.values[CPU_TIME] == pytest.approx(50 / CLK_TCK)
    assert got.last_cpu == 2
    assert RUN_DELAY in got.missing and RUN_DELAY not in got.values


def test_a_garbled_file_names_itself_and_spares_other_threads(tmp_path: Path) -> None:
    bad = _fake_task(tmp_path, 10, 11, b"garbage", b"1000000000 5 1\n")
    good = _fake_task(tmp_path, 10, 12, _stat_line("CPU 1/KVM"), b"2000000000 500000000 3\n")
    got = ProcfsCollector(proc=str(tmp_path)).sample([bad, good])
    assert "task/11/stat" in got[11].missing.get(CPU_TIME, "") or got[11].values[CPU_TIME] == 1.0
    assert got[11].last_cpu is None
    assert got[12].values == {CPU_TIME: 2.0, RUN_DELAY: 0.5}


def test_a_kept_fd_answering_esrch_is_gone_then_the_tid_is_reopened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recycled tid: the kept fd belongs to the old thread; its ESRCH must not become a value."""
    import errno

    ref = _fake_task(tmp_path, 10, 11, _stat_line("CPU 0/KVM"), b"1000000000 5 1\n")
    procfs = ProcfsCollector(proc=str(tmp_path))
    assert procfs.sample([ref])[11].values[CPU_TIME] == 1.0
    (tmp_path / "10/task/11/schedstat").write_bytes(b"3000000 0 1\n")  # the new thread's numbers
    real = os.preadv

    def esrch(fd: int, bufs: list[memoryview], offset: int) -> int:
        raise OSError(errno.ESRCH, "No such process")

    monkeypatch.setattr(os, "preadv", esrch)
    monkeypatch.setattr(os, "pread", lambda *a: esrch(0, [], 0))
    assert procfs.sample([ref]) == {}  # the old thread is gone; nothing stale, no new numbers yet
    assert procfs._tasks == {}
    monkeypatch.setattr(os, "preadv", real)
    monkeypatch.undo()
    assert procfs.sample([ref])[11].values[CPU_TIME] == pytest.approx(0.003)  # opened afresh
    procfs.close()


def test_last_cpu_is_reread_on_its_turn_and_only_if_the_thread_ran(tmp_path: Path) -> None:
    ref = _fake_task(tmp_path, 10, 11, _stat_line("CPU 0/KVM", cpu=1), b"1000 5 7\n")
    task = tmp_path / "10/task/11"
    procfs = ProcfsCollector(proc=str(tmp_path), stat_every=2)
    cpus = [procfs.sample([ref])[11].last_cpu]  # round 0: new, stat read
    (task / "stat").write_bytes(_stat_line("CPU 0/KVM", cpu=3))
    for _ in range(3):  # pcount unchanged: it has not been on a CPU since, so stat is not read
        cpus.append(procfs.sample([ref])[11].last_cpu)
    (task / "schedstat").write_bytes(b"2000 5 8\n")  # it ran
    for _ in range(2):  # read on its next turn (every 2nd round), at most 1 round late
        cpus.append(procfs.sample([ref])[11].last_cpu)
    procfs.close()
    assert cpus[:4] == [1, 1, 1, 1]
    assert cpus[4:] in ([3, 3], [1, 3])


def test_a_stat_read_failing_on_its_turn_costs_only_that_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The due stat files are read in one loop; one thread's failure there spares the others."""
    import errno

    refs = [
        _fake_task(tmp_path, 10, tid, _stat_line("CPU 0/KVM", cpu=tid - 10), b"1000 5 7\n")
        for tid in (11, 12, 13)
    ]
    procfs = ProcfsCollector(proc=str(tmp_path), stat_every=1)
    assert {t: c.last_cpu for t, c in procfs.sample(refs).items()} == {11: 1, 12: 2, 13: 3}
    for tid in (11, 12, 13):  # all ran and moved: every stat is due
        task = tmp_path / f"10/task/{tid}"
        (task / "schedstat").write_bytes(b"2000 5 8\n")
        (task / "stat").write_bytes(_stat_line("CPU 0/KVM", cpu=tid - 5))
    bad = procfs._tasks[12].fds[0]
    real = os.pread

    def pread(fd: int, n: int, off: int) -> bytes:
        if fd == bad:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, n, off)

    monkeypatch.setattr(os, "pread", pread)
    got = procfs.sample(refs)
    monkeypatch.undo()
    procfs.close()
    assert {t: c.last_cpu for t, c in got.items() if t != 12} == {11: 6, 13: 8}
    assert "Input/output error" in got[12].missing[CPU_TIME]  # the careful path says why, no stale CPU
    assert got[12].last_cpu is None


def test_stat_every_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="stat_every"):
        ProcfsCollector(stat_every=-1)


def test_by_default_the_last_cpu_is_left_to_the_inventory_never_stale(tmp_path: Path) -> None:
    """stat_every=0 (the default): stat is read at first sight only; later rounds say "unknown"
    (the driver's fresh reading is used), never the first reading again."""
    ref = _fake_task(tmp_path, 10, 11, _stat_line("CPU 0/KVM", cpu=1), b"1000 5 7\n")
    task = tmp_path / "10/task/11"
    procfs = ProcfsCollector(proc=str(tmp_path))
    assert procfs.stat_every == 0
    first = procfs.sample([ref])[11]
    (task / "stat").write_bytes(_stat_line("CPU 0/KVM", cpu=3))
    (task / "schedstat").write_bytes(b"2000 5 8\n")  # it ran, maybe elsewhere
    later = [procfs.sample([ref])[11] for _ in range(3)]
    procfs.close()
    assert first.last_cpu == 1
    assert [c.last_cpu for c in later] == [None, None, None]
    assert [c.values[CPU_TIME] for c in later] == [pytest.approx(2e-6)] * 3  # the rest as usual


def test_the_policies_take_the_inventorys_last_cpu_when_the_rates_have_none() -> None:
    from adaptive_pin.model import VCpuRates
    from policies.base import last_cpu
    from tests.policy_helpers import guest, make_topology, snapshot

    topo = make_topology()
    g = guest("a", [topo.online], last_cpus=[5])
    snap = snapshot(topo, [g], {("a", 0): VCpuRates(utilization=0.5)})
    assert last_cpu(snap, g, g.vcpus[0]) == 5


def test_procfs_is_a_batch_collector_with_exact_liveness() -> None:
    from collectors.base import BatchCollector

    procfs = ProcfsCollector()
    assert isinstance(procfs, BatchCollector) and procfs.exact_liveness


# --- read_each: the C-looped reads both collectors use -------------------------------------------


def test_read_each_calls_every_row_once_in_order_and_resumes_after_an_oserror() -> None:
    from collectors.base import read_each

    calls: list[int] = []

    def call(fd: int, buf: object, extra: int) -> int:
        calls.append(fd)
        if fd in (3, 16, 17, 39):
            raise OSError(3, "No such process")
        return fd * extra

    got, when = read_each(call, list(range(40)), [None] * 40, 2, chunk=16)
    assert calls == list(range(40))
    assert got.tolist() == [-1 if fd in (3, 16, 17, 39) else 2 * fd for fd in range(40)]
    assert len(when) == 40
    empty = read_each(call, [], [])
    assert empty[0].size == 0 and empty[1].size == 0


def test_read_each_times_lie_within_their_stretch_of_reads() -> None:
    """An interpolated time is never off by more than its stretch: between its first call and the next's."""
    import time

    from collectors.base import read_each

    at: list[float] = []

    def call(fd: int, buf: object) -> int:
        at.append(time.monotonic())
        time.sleep(0.0002)
        if fd == 13:
            raise OSError(3, "No such process")
        return 0

    chunk = 8
    got, when = read_each(call, list(range(30)), [None] * 30, chunk=chunk)
    after = time.monotonic()
    starts = [0, 8, 14, 22]  # a stretch ends after its chunk or just after a raising call (row 13)
    for j in range(30):
        s = max(x for x in starts if x <= j)
        nxt = at[min(x for x in [*starts, 30] if x > j)] if j < starts[-1] else after
        assert at[s] <= when[j] <= nxt
    assert (when[1:] >= when[:-1]).all()
    assert got.tolist() == [-1 if j == 13 else 0 for j in range(30)]
    assert when[12] < at[13] + 0.0002 <= when[14]  # the raising call closes its stretch


def test_new_threads_join_the_fast_path_and_a_failing_fd_does_not_stop_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import time

    from collectors.base import Roster

    refs = [
        _fake_task(tmp_path, 10, tid, _stat_line("CPU 0/KVM"), f"{tid}000 5 1\n".encode()) for tid in (11, 12)
    ]
    procfs = ProcfsCollector(proc=str(tmp_path))
    procfs.sample_batch(Roster(tuple(refs)))
    refs.append(_fake_task(tmp_path, 10, 13, _stat_line("CPU 1/KVM"), b"13000 5 1\n"))
    roster = Roster(tuple(refs))
    procfs.sample_batch(roster)  # 13 is new: opened on the careful path
    assert procfs._hot()[0].tolist() == [0, 1, 2]  # and read on the fast one from now on
    real = os.preadv
    bad = procfs._tasks[12].fds[1]

    def preadv(fd: int, bufs: list[memoryview], offset: int) -> int:
        if fd == bad:
            raise OSError(errno.ESRCH, "No such process")
        return real(fd, bufs, offset)

    real_pread = os.pread

    def pread(fd: int, n: int, offset: int) -> bytes:
        if fd == bad:
            raise OSError(errno.ESRCH, "No such process")
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    monkeypatch.setattr(os, "pread", pread)  # the careful path asks the kept fd again
    t0 = time.monotonic()
    b = procfs.sample_batch(roster)
    t1 = time.monotonic()
    monkeypatch.undo()
    procfs.close()
    assert b.seen.tolist() == [True, False, True]  # 12's kept fd says gone
    assert b.values[0, 0] == pytest.approx(11e-6) and b.values[2, 0] == pytest.approx(13e-6)
    assert t0 <= b.time[0] <= b.time[2] <= t1
