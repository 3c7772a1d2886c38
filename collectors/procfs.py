"""CPU time, run-queue delay and last CPU of vCPU threads from /proc/<pid>/task/<tid>/.

Files are opened once per thread and re-read with pread(fd, 0): seq_file regenerates the text
at offset 0, the fd stays tied to that task (a recycled tid cannot be mistaken for it: the old
fd answers ESRCH), and it saves an open/close pair per file. Measured on the 2-CPU dev VM
(kernel 6.18, 1,000 threads in 4 processes, half busy), per thread: pread of a kept fd costs
schedstat 2.0-2.8 µs, stat 4.8-5.3 µs (the kernel's do_task_stat is the expensive part, not
the copy); open+read+close of schedstat 6 µs; parsing stat 1.1 µs, schedstat 0.3 µs. /status
(context switches) costs 7.8 µs and is read only on request.

So each round reads ``schedstat`` only: its fields are sum_exec_runtime (ns, the CPU time),
run_delay (ns waiting on a run queue) and pcount (times the thread got a CPU). The last CPU
(stat field 39) is left to the inventory by default (``stat_every=0``): both real drivers read
each vCPU's stat for it every tick (adaptive_pin/drivers/_threads.py, ``read_vcpu``), just
before the sampler runs, and every consumer falls back to that reading (``VCpu.last_cpu``) when
the rates have none, so reading stat here too would pay for the same field twice. A thread
seen for the first time still reports the CPU its first stat read found, that round only.
With ``stat_every`` N >= 1 this collector reads it itself (for a sampler used without an
inventory that knows it): when a thread is new and then every N rounds per thread, staggered
so each round reads about 1/N of them, and skipped even then when pcount has not moved since
the last stat read: a thread that has not been put on a CPU since is still where it was
(short of a wakeup migration not yet run). **Staleness** then: up to N - 1 rounds; N = 1
reads it every round, at about 5 µs per thread more.

Where the kernel lacks schedstat (no CONFIG_SCHED_INFO, or sched_info off: it then answers
"0 0 0"), stat is read every round and CPU time comes from utime + stime in clock ticks
(10 ms steps at USER_HZ=100: a 1 % utilisation error per second of sampling).

The kept schedstat fds are read in one C loop (:func:`collectors.base.read_each`), with one
timestamp per 64 reads and each row's time interpolated by its position in that stretch
(error bounded by the stretch, well under a millisecond; see there) instead of a
time.monotonic() call per thread.

Liveness is exact and free: a kept fd of a thread that exited answers ESRCH (the row is
"gone" that round, never a stale value), so the sampler hands procfs's answer to the perf
collector instead of letting it list /proc/<pid>/task (``exact_liveness``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from types import MappingProxyType

import numpy as np
import numpy.typing as npt

from adaptive_pin.model import (
    CPU_TIME,
    INVOLUNTARY_CTXSW,
    RUN_DELAY,
    VOLUNTARY_CTXSW,
    ThreadCounters,
    ThreadRef,
)
from collectors.base import NO_CPU, NO_REASONS, Batch, FloatArray, Roster, counters_from_batch, read_each

log = logging.getLogger(__name__)

CLK_TCK = os.sysconf("SC_CLK_TCK")

# stat fields (1-based in proc(5)) as indexes into the fields after "comm)"; field 3 is index 0.
_UTIME, _STIME, _PROCESSOR = 14 - 3, 15 - 3, 39 - 3

_GONE = (errno.ESRCH, errno.ENOENT)
_STAT_BYTES = 1024  # holds the first 39 fields whatever their digits (39 x 21 + comm <= 900)
_FD_LIMIT = (errno.EMFILE, errno.ENFILE)


class ProcParseError(ValueError):
    """A /proc file whose text is not what proc(5) describes."""


@dataclass(frozen=True, slots=True)
class StatFields:
    utime_ticks: int
    stime_ticks: int
    processor: int


def read_small(path: str) -> bytes:
    """A /proc file's bytes with one open/read/close (a text-mode ``open()`` costs about 4x the
    syscalls: measured 9.7 vs 2.6 µs for a stat). Used where no fd is kept: here when out of fds,
    and by the drivers' per-tick inventory."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def _stat_fields(data: bytes) -> list[bytes]:
    """The fields of a stat line from field 3 on, split no further than field 39.

    comm (field 2) may hold spaces and ')': the fields resume after the last ')'.
    """
    rp = data.rfind(b")")
    if rp < 0:
        raise ProcParseError("no ')' closing comm")
    fields = data[rp + 2 :].split(None, _PROCESSOR + 1)
    if len(fields) <= _PROCESSOR:
        raise ProcParseError(f"{len(fields) + 2} fields, want at least 39")
    return fields


def parse_stat(data: bytes) -> StatFields:
    """Parse /proc/<pid>/task/<tid>/stat: CPU time in clock ticks and the last CPU."""
    fields = _stat_fields(data)
    try:
        return StatFields(int(fields[_UTIME]), int(fields[_STIME]), int(fields[_PROCESSOR]))
    except ValueError as exc:
        raise ProcParseError(str(exc)) from None


def processor_of_stat(data: bytes) -> int:
    """Field 39 (the CPU the thread last ran on) of a stat line."""
    try:
        return int(_stat_fields(data)[_PROCESSOR])
    except ValueError as exc:
        raise ProcParseError(str(exc)) from None


def parse_schedstat(data: bytes) -> tuple[int, int]:
    """(sum_exec_runtime ns, run_delay ns) from /proc/<pid>/task/<tid>/schedstat."""
    parts = data.split()
    if len(parts) < 2:
        raise ProcParseError(f"{len(parts)} fields, want 3")
    try:
        return int(parts[0]), int(parts[1])
    except ValueError as exc:
        raise ProcParseError(str(exc)) from None


def parse_schedstat_all(data: bytes) -> tuple[int, int, int]:
    """(sum_exec_runtime ns, run_delay ns, pcount) where the file has pcount, else pcount -1."""
    runtime, delay = parse_schedstat(data)
    parts = data.split()
    try:
        return runtime, delay, int(parts[2]) if len(parts) > 2 else -1
    except ValueError as exc:
        raise ProcParseError(str(exc)) from None


def _status_field(data: bytes, key: bytes) -> int:
    i = data.find(key)
    if i < 0:
        raise ProcParseError(f"no {key.strip().decode()}")
    j = data.find(b"\n", i + len(key))
    return int(data[i + len(key) : j if j >= 0 else None])


def parse_status_ctxsw(data: bytes) -> tuple[int, int]:
    """(voluntary, involuntary) context switches from /proc/<pid>/task/<tid>/status."""
    try:
        vol = _status_field(data, b"\nvoluntary_ctxt_switches:")
        invol = _status_field(data, b"\nnonvoluntary_ctxt_switches:")
    except ValueError as exc:
        raise ProcParseError(str(exc)) from None
    return vol, invol


class _Task:
    """One thread's open /proc files; fd -1 where a file is read by path (fd limit), -2 if absent."""

    __slots__ = ("base", "fast", "fds", "row", "view")

    def __init__(self, base: str, names: Sequence[str]) -> None:
        self.base = base
        self.fds: list[int] = []
        self.row = -1  # its row in the current roster
        self.view: tuple[memoryview, ...] = ()  # its row's slot of the schedstat buffer
        try:
            for i, name in enumerate(names):
                self.fds.append(_open(f"{base}/{name}", optional=i > 0))
        except OSError:
            self.close()
            raise
        # The hot loop handles kept stat + schedstat fds and nothing else.
        self.fast = len(self.fds) == 2 and self.fds[0] >= 0 and self.fds[1] >= 0

    def read(self, i: int, name: str) -> bytes:
        fd = self.fds[i]
        if fd >= 0:
            return os.pread(fd, 4096, 0)
        if fd == _ABSENT:
            return b""
        return read_small(f"{self.base}/{name}")

    def close(self) -> None:
        for fd in self.fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fds = []
        self.fast = False


_BY_PATH, _ABSENT = -1, -2
_SLOT = 64  # bytes per row for schedstat: "%llu %llu %lu\n" is at most 63
_SCHEDSTAT_OFF = "schedstat reads 0 0 0 (sched_info off in this kernel)"


def _open(path: str, optional: bool) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in _FD_LIMIT:
            return _BY_PATH  # out of fds: open, read and close it each time instead
        if optional and exc.errno == errno.ENOENT:
            return _ABSENT  # e.g. no schedstat without CONFIG_SCHED_INFO
        raise


class ProcfsCollector:
    """The ``procfs`` collector: CPU time, run delay, last CPU (and optionally context switches).

    A :class:`~collectors.base.BatchCollector`; see the module docstring for what each round
    reads and how stale the last CPU may be.
    """

    name = "procfs"
    exact_liveness = True  # a row it leaves unseen is a thread that is gone (see the docstring)

    def __init__(self, *, proc: str = "/proc", context_switches: bool = False, stat_every: int = 0) -> None:
        if stat_every < 0:
            raise ValueError(f"stat_every must be >= 0, not {stat_every}")
        self._proc = proc.rstrip("/")
        self._names = ["stat", "schedstat"] + (["status"] if context_switches else [])
        self._ctxsw = context_switches
        self._columns = (CPU_TIME, RUN_DELAY) + (
            (VOLUNTARY_CTXSW, INVOLUNTARY_CTXSW) if context_switches else ()
        )
        self.stat_every = stat_every
        self._tasks: dict[int, _Task] = {}
        self._roster: Roster | None = None
        self._rows: list[_Task | None] = []
        self._round = 0
        # Per row of the roster: schedstat's pcount when stat was last read, and the last CPU.
        self._pcount = np.empty(0, np.int64)
        self._cpu = np.empty(0, np.int64)
        self._sbuf = bytearray()
        self._blank = b""
        self._hot_rows: npt.NDArray[np.intp] | None = None  # None: rebuild (see _hot)
        self._hot_fds: list[int] = []
        self._hot_views: list[tuple[memoryview, ...]] = []
        self._schedstat: str | None = None  # why schedstat is unusable, once known
        self._bad: dict[int, str] = {}  # tid -> last parse problem (logged once)
        self._reasons: dict[frozenset[tuple[str, str]], Mapping[str, str]] = {}

    def capabilities(self) -> Mapping[str, str | None]:
        caps: dict[str, str | None] = {CPU_TIME: None, RUN_DELAY: self._schedstat}
        if self._ctxsw:
            caps[VOLUNTARY_CTXSW] = caps[INVOLUNTARY_CTXSW] = None
        return caps

    def sample(self, threads: Sequence[ThreadRef]) -> dict[int, ThreadCounters]:
        roster = Roster(tuple(threads))
        return counters_from_batch(roster, self.sample_batch(roster))

    def close(self) -> None:
        for task in self._tasks.values():
            task.close()
        self._tasks.clear()
        self._rows = []
        self._roster = None
        self._hot_rows = None

    # --- the batch path --------------------------------------------------------------------
    def _adopt(self, roster: Roster) -> None:
        """Align the per-row state with a new roster; forget (close) threads not in it."""
        if roster is self._roster:
            return
        wanted = set(roster.tids)
        for tid in self._tasks.keys() - wanted:
            self._tasks.pop(tid).close()
        for tid in self._bad.keys() - wanted:
            del self._bad[tid]
        n = len(roster)
        rows = [self._tasks.get(tid) for tid in roster.tids]
        src = np.array([-1 if t is None else t.row for t in rows], np.intp)
        keep = src >= 0
        pcount, cpu = np.full(n, -1, np.int64), np.full(n, NO_CPU, np.int64)
        pcount[keep], cpu[keep] = self._pcount[src[keep]], self._cpu[src[keep]]
        self._pcount, self._cpu = pcount, cpu
        self._sbuf = bytearray(_SLOT * n)
        self._blank = b" " * (_SLOT * n)
        for i, task in enumerate(rows):
            if task is not None:
                self._place(task, i)
        self._rows = rows
        self._roster = roster
        self._hot_rows = None

    def _place(self, task: _Task, row: int) -> None:
        task.row = row
        task.view = (memoryview(self._sbuf)[_SLOT * row : _SLOT * (row + 1)],)

    def _hot(self) -> tuple[npt.NDArray[np.intp], list[int], list[tuple[memoryview, ...]]]:
        """Rows on the fast path (kept stat + schedstat fds), their schedstat fds and slots."""
        if self._hot_rows is None:
            rows = [i for i, t in enumerate(self._rows) if t is not None and t.fast]
            tasks = [self._rows[i] for i in rows]
            self._hot_fds = [t.fds[1] for t in tasks if t is not None]
            self._hot_views = [t.view for t in tasks if t is not None]
            self._hot_rows = np.array(rows, np.intp)
        return self._hot_rows, self._hot_fds, self._hot_views

    def sample_batch(self, roster: Roster, alive: npt.NDArray[np.bool_] | None = None) -> Batch:
        """One round over ``roster``; ``alive`` is ignored (procfs knows better).

        The fast rows' schedstat files are read by :func:`~collectors.base.read_each` (a C loop,
        one interpolated timestamp per row: see there why that is accurate enough).
        """
        self._adopt(roster)
        n = len(roster)
        rows = self._rows
        nan = math.nan
        buf = self._sbuf
        buf[:] = self._blank  # a failed row leaves spaces, i.e. no numbers
        hot, fds, views = self._hot()
        sizes, hot_when = read_each(os.preadv, fds, views, 0)
        ok = (sizes >= 0) & (sizes < _SLOT)  # -1: gone (ESRCH) or unreadable; _SLOT: truncated
        when = np.full(n, nan)
        when[hot[ok]] = hot_when[ok]
        cold = np.ones(n, bool)
        cold[hot[ok]] = False
        slow: list[int] = np.flatnonzero(cold).tolist()  # rows for the careful per-thread path
        ix = hot[ok]  # rows whose schedstat landed in their slot of the buffer
        read = ix.tolist()

        k = len(self._columns)
        values = np.full((n, k), nan)
        cpus = np.full(n, NO_CPU, np.int64)
        if read:
            nums = self._parse_slots(ix)
            if nums is None:  # some slot is garbled: each row on its own
                slow.extend(read)
                for i in read:
                    when[i] = nan
            else:
                off = nums[:, 2] == 0  # "0 0 0": sched_info is off, the numbers mean nothing
                for r in np.flatnonzero(off).tolist():
                    i = read[r]
                    when[i] = nan
                    task = rows[i]
                    assert task is not None
                    task.fast = False
                    self._hot_rows = None
                    slow.append(i)
                good = ~off
                gx = ix[good]
                values[gx, 0] = nums[good, 0] * 1e-9
                values[gx, 1] = nums[good, 1] * 1e-9
                if self.stat_every:
                    self._last_cpus(gx, nums[good, 2], when, values, slow)
                    cpus[gx] = self._cpu[gx]
                # else: unknown here (never a stale first reading); the inventory's is used
        self._round += 1

        missing: list[Mapping[str, str]] = [NO_REASONS] * n
        for i in slow:
            values[i] = nan
            when[i] = nan
            tc = self._sample_one(roster.refs[i], i)
            if tc is None:
                continue
            when[i] = tc.time
            cpus[i] = NO_CPU if tc.last_cpu is None else tc.last_cpu
            row = values[i]
            for j, c in enumerate(self._columns):
                row[j] = tc.values.get(c, nan)
            if tc.missing:
                missing[i] = self._intern(tc.missing)
        return Batch(self._columns, values, when, cpus, missing)

    def _parse_slots(self, ix: npt.NDArray[np.intp]) -> npt.NDArray[np.int64] | None:
        """(rows, 3) schedstat numbers of the rows read, in row order; None if any is garbled."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                nums = np.fromstring(bytes(self._sbuf), dtype=np.int64, sep=" ")
        except ValueError:
            return None
        if nums.size != 3 * len(ix) or (nums < 0).any():
            return None
        return nums.reshape(-1, 3)

    def _last_cpus(
        self,
        gx: npt.NDArray[np.intp],
        pcount: npt.NDArray[np.int64],
        when: FloatArray,
        values: FloatArray,
        slow: list[int],
    ) -> None:
        """Read stat (field 39) where due: new rows, and rows whose turn it is that have run."""
        due = (self._cpu[gx] == NO_CPU) | (
            (pcount != self._pcount[gx]) & ((self._round + gx) % self.stat_every == 0)
        )
        picked = np.flatnonzero(due)
        if not picked.size:
            return
        rows_i = gx[picked]
        # (fd -1, EBADF, for a row without files: never on the fast path, and it would fail alone)
        fds = [-1 if t is None else t.fds[0] for t in map(self._rows.__getitem__, rows_i.tolist())]
        try:
            # One C loop over the due files; a thread that exited in between raises (ESRCH)
            # and sends this round's due rows down the careful path below instead.
            texts = list(map(os.pread, fds, repeat(_STAT_BYTES, len(fds)), repeat(0, len(fds))))
            cpus = list(map(processor_of_stat, texts))
        except (OSError, ValueError):
            self._last_cpus_one_by_one(rows_i, pcount[picked], when, values, slow)
            return
        self._cpu[rows_i] = cpus
        self._pcount[rows_i] = pcount[picked]

    def _last_cpus_one_by_one(
        self,
        rows_i: npt.NDArray[np.intp],
        pcount: npt.NDArray[np.int64],
        when: FloatArray,
        values: FloatArray,
        slow: list[int],
    ) -> None:
        for i, pc in zip(rows_i.tolist(), pcount.tolist(), strict=True):
            task = self._rows[i]
            assert task is not None
            try:
                self._cpu[i] = processor_of_stat(os.pread(task.fds[0], _STAT_BYTES, 0))
            except (OSError, ValueError):
                when[i] = math.nan
                values[i] = math.nan
                slow.append(i)
                continue
            self._pcount[i] = pc

    def _intern(self, missing: Mapping[str, str]) -> Mapping[str, str]:
        key = frozenset(missing.items())
        shared = self._reasons.get(key)
        if shared is None:
            if len(self._reasons) > 10_000:  # reasons naming single threads: do not grow forever
                self._reasons.clear()
            shared = self._reasons[key] = MappingProxyType(dict(missing))
        return shared

    # --- one thread, every case ------------------------------------------------------------------
    def _sample_one(self, t: ThreadRef, row: int) -> ThreadCounters | None:
        tid = t.tid
        files = self._rows[row]
        try:
            if files is None or not files.fds:
                files = _Task(f"{self._proc}/{t.pid}/task/{tid}", self._names)
                self._tasks[tid] = files
                self._rows[row] = files
                self._place(files, row)
                self._hot_rows = None
            elif files.fast:
                # A kept fd failed in the hot loop. ESRCH there is the old thread gone, even if
                # a new thread took its tid: report it gone now, reopen by path next round.
                files.read(1, "schedstat")
            stat = files.read(0, "stat")
            sched = files.read(1, "schedstat")
            status = files.read(2, "status") if self._ctxsw else b""
        except OSError as exc:
            if files is not None:
                self._tasks.pop(tid, None)
                self._rows[row] = None
                self._hot_rows = None
                files.close()
            if exc.errno in _GONE:
                return None
            return ThreadCounters(tid, time.monotonic(), {}, missing={CPU_TIME: f"{exc}"})
        now = time.monotonic()
        values: dict[str, float] = {}
        missing: dict[str, str] = {}
        last_cpu: int | None = None
        try:
            st = parse_stat(stat)
            last_cpu = st.processor
            self._cpu[row] = last_cpu
            values[CPU_TIME] = (st.utime_ticks + st.stime_ticks) / CLK_TCK
        except ProcParseError as exc:
            missing[CPU_TIME] = self._complain(tid, "stat", exc)
        try:
            runtime_ns, delay_ns, pcount = parse_schedstat_all(sched)
            if pcount == 0:
                raise ProcParseError(_SCHEDSTAT_OFF)
            self._pcount[row] = pcount
            values[CPU_TIME] = runtime_ns * 1e-9  # ns-exact beats clock ticks
            values[RUN_DELAY] = delay_ns * 1e-9
            missing.pop(CPU_TIME, None)
            if files.fds and files.fds[1] >= 0 and files.fds[0] >= 0 and not self._ctxsw and not files.fast:
                files.fast = True  # e.g. a garbled file that read well this time
                self._hot_rows = None
        except ProcParseError as exc:
            if files.fast:
                files.fast = False
                self._hot_rows = None
            missing[RUN_DELAY] = self._schedstat = self._complain(tid, "schedstat", exc)
        if self._ctxsw:
            try:
                values[VOLUNTARY_CTXSW], values[INVOLUNTARY_CTXSW] = parse_status_ctxsw(status)
            except ProcParseError as exc:
                missing[VOLUNTARY_CTXSW] = missing[INVOLUNTARY_CTXSW] = self._complain(tid, "status", exc)
        return ThreadCounters(tid, now, values, missing=missing, last_cpu=last_cpu)

    def _complain(self, tid: int, name: str, exc: ProcParseError) -> str:
        reason = f"cannot parse {self._proc}/…/task/{tid}/{name}: {exc}"
        if self._bad.get(tid) != reason:
            self._bad[tid] = reason
            log.warning("procfs: %s", reason)
        return reason
