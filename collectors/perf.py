"""Hardware (and software) counters of vCPU threads through perf_event_open(2).

One event group per thread (pid = tid, cpu = -1), opened once and kept: the group is read with
a single read(2) of the leader (PERF_FORMAT_GROUP | TOTAL_TIME_ENABLED | TOTAL_TIME_RUNNING |
ID) into a preallocated buffer. Events a host cannot count (no PMU, as in a VM) are found once,
by a probe on our own thread at start, and never retried per thread; software events that
work still form a group.

Privilege bits, set alike for every event:

* ``exclude_user = 0``: TCG guests run as JIT code in user space, and QEMU's device emulation
  for a vCPU runs there too.
* ``exclude_kernel = 0`` (configurable): under KVM the guest runs inside the KVM_RUN ioctl,
  i.e. in host kernel context, and the PMU applies its user/kernel filter to the *guest's*
  privilege level; excluding "kernel" would drop the guest kernel's misses and all exit
  handling, which pollute the same LLC. Costs: needs perf_event_paranoid <= 1 or CAP_PERFMON.
* ``exclude_guest = 0``, ``exclude_host = 0``: the guest is what we measure, and host work on
  its behalf shares its cache.
* ``exclude_hv = 1``: "hv" is a hypervisor *below* this host (POWER PHYP, s390); not ours.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import operator
import os
import resource
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import numpy.typing as npt

from adaptive_pin.errors import UsageError
from adaptive_pin.model import (
    CYCLES,
    INSTRUCTIONS,
    LLC_MISSES,
    LLC_REFERENCES,
    TASK_CLOCK,
    ThreadCounters,
    ThreadRef,
)
from collectors import pfm
from collectors.base import (
    NO_CPU,
    NO_REASONS,
    Batch,
    FloatArray,
    IntArray,
    Roster,
    counters_from_batch,
    read_each,
)
from collectors.perf_abi import (
    GROUP_READ_FORMAT,
    PERF_ATTR_SIZE,
    EventSpec,
    PerfEventAttr,
    event_id,
    parse_builtin,
    perf_event_open,
)

log = logging.getLogger(__name__)

# model counter name -> perf event name (perf's spelling, rNNNN, or a libpfm4 name).
# cache-references beside cache-misses: cache-aware weighs a vCPU's cache sensitivity by its
# LLC hits (what a smaller cache share turns into misses). Four hardware events fit one group
# on every x86 PMU (cycles and instructions take fixed counters on Intel), so nothing is
# multiplexed.
DEFAULT_EVENTS: Mapping[str, str] = {
    CYCLES: "cycles",
    INSTRUCTIONS: "instructions",
    LLC_MISSES: "cache-misses",
    LLC_REFERENCES: "cache-references",
}

# Counters whose kernel unit differs from the unit in the model's name.
UNIT_SCALE: Mapping[str, float] = {TASK_CLOCK: 1e-9}  # task-clock counts ns

PARANOID_PATH = "/proc/sys/kernel/perf_event_paranoid"
FD_LIMIT_KEY = "perf_fd_limit"  # capabilities() key while threads are left unmonitored

_NO_PMU = {errno.ENOENT, errno.EOPNOTSUPP, errno.ENODEV}
_DENIED = {errno.EACCES, errno.EPERM}
_FD_LIMIT = {errno.EMFILE, errno.ENFILE}


def _errname(err: int) -> str:
    if err == errno.EOPNOTSUPP:
        return "EOPNOTSUPP"  # == ENOTSUP on Linux; perf_event_open(2) documents this spelling
    return errno.errorcode.get(err, str(err))


def paranoid_level(path: str = PARANOID_PATH) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def explain(err: int, event: str, paranoid_path: str = PARANOID_PATH) -> str:
    """The capability message for a failed perf_event_open, in words an operator can act on."""
    name = _errname(err)
    if err in _NO_PMU:
        return f"no PMU: {event} not supported ({name})"
    if err in _DENIED:
        return (
            f"permission: perf_event_open({event}) = {name}: "
            f"perf_event_paranoid={paranoid_level(paranoid_path)} and no CAP_PERFMON "
            "(run as root, grant CAP_PERFMON, or set kernel.perf_event_paranoid <= 1)"
        )
    if err == errno.EINVAL:
        return f"rejected: {event} is not valid on this PMU or in this group (EINVAL)"
    if err == errno.ESRCH:
        return "thread gone (ESRCH)"
    if err in _FD_LIMIT:
        return f"fd limit: perf_event_open({event}) = {name}"
    return f"perf_event_open({event}) failed: {os.strerror(err)} ({name})"


def raise_nofile_limit() -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to the hard one (a group holds one fd per event)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:  # e.g. above fs.nr_open
            log.warning("cannot raise RLIMIT_NOFILE from %d to %d: %s", soft, target, exc)
    return soft, hard


def scale_delta(delta: float, enabled_delta: int, running_delta: int) -> float | None:
    """Estimate a count over an interval in which the kernel multiplexed the group.

    The group counted for ``running_delta`` ns of the ``enabled_delta`` ns it was enabled;
    assume the rate held while it was off the PMU. None when it never counted (no estimate).
    """
    if running_delta == enabled_delta:
        return float(delta)
    if running_delta <= 0:
        return None
    return delta * (enabled_delta / running_delta)


class _Alive:
    """Which threads exist, one listdir of /proc/<pid>/task per process per round.

    An exited task's events keep answering read() with their final counts, and poll() reports
    POLLHUP for any event without a ring buffer, so existence is asked of /proc instead: one
    getdents per VM is far cheaper than a kill(tid, 0) per thread.
    """

    __slots__ = ("_proc", "_tasks")

    def __init__(self, proc: str = "/proc") -> None:
        self._proc = proc
        self._tasks: dict[int, frozenset[int]] = {}

    def __call__(self, pid: int, tid: int) -> bool:
        tasks = self._tasks.get(pid)
        if tasks is None:
            try:
                tasks = frozenset(int(t) for t in os.listdir(f"{self._proc}/{pid}/task"))
            except OSError as exc:
                # Out of fds (our groups took them): cannot tell, so do not drop a thread.
                tasks = _ANY if exc.errno in _FD_LIMIT else frozenset()
            self._tasks[pid] = tasks
        return tasks is _ANY or tid in tasks


_ANY: frozenset[int] = frozenset()  # _Alive's "could not list: assume there"


@dataclass(slots=True, eq=False)
class _Group:
    tid: int
    fds: list[int]
    counters: tuple[str, ...]
    ids: tuple[int, ...]
    size: int  # bytes one group read returns
    missing: Mapping[str, str]  # counters not in this group, and why
    row: int = -1  # its row in the current roster
    bufs: tuple[memoryview, ...] = ()  # its row's slot of the read buffer, for readv

    @property
    def leader(self) -> int:
        return self.fds[0]


_Bufs = tuple[memoryview, ...]
_MISSING_OF = operator.attrgetter("missing")


class _GoneError(Exception):
    pass


class _FdLimitError(Exception):
    pass


class PerfCollector:
    """The ``perf`` collector: one perf_event_open group per vCPU thread, kept open.

    ``events`` maps model counter names to perf event names; see :data:`DEFAULT_EVENTS`.
    Names are perf's own (``cycles``, ``LLC-load-misses``, ``task-clock``...), raw ``rNNNN``,
    or CPU-specific names resolved through libpfm4 where it is installed.

    A :class:`~collectors.base.BatchCollector`: each round does one readv(2) per group into
    that row's slot of one buffer (looped in C by :func:`~collectors.base.read_each`, with
    interpolated per-row times), then the multiplex scaling of all groups at once in numpy
    (state arrays row per thread, column per counter). Whether a thread still exists comes
    from the ``alive`` rows the sampler passes (procfs's kept fds answer that exactly and for
    free), else from one listdir of /proc/<pid>/task per process (see :class:`_Alive`).
    """

    name = "perf"

    def __init__(
        self,
        events: Mapping[str, str] | None = None,
        *,
        exclude_kernel: bool = False,
        probe: bool = True,
        paranoid_path: str = PARANOID_PATH,
    ) -> None:
        self._paranoid_path = paranoid_path
        self._exclude_kernel = exclude_kernel
        self._specs: dict[str, EventSpec] = {}
        self._unavailable: dict[str, str] = {}
        for counter, event in (events if events is not None else DEFAULT_EVENTS).items():
            spec = self._resolve(counter, event)
            if spec is not None:
                self._specs[counter] = spec
        self._attrs = {c: self._attr(s) for c, s in self._specs.items()}
        self.nofile = raise_nofile_limit()
        self._groups: dict[int, _Group] = {}
        self._missing: dict[frozenset[tuple[str, str]], Mapping[str, str]] = {}
        self._refused: dict[int, str] = {}  # tid -> per-thread reason (e.g. EACCES on that thread)
        self.unmonitored = 0  # threads asked for but without a group for lack of fds
        self._fd_note: str | None = None
        if probe:
            self._probe()
        self._cols = tuple(self._specs)  # the batch's columns; a counter dropped later stays NaN
        self._col_of = {c: j for j, c in enumerate(self._cols)}
        self._units = np.array([UNIT_SCALE.get(c, 1.0) for c in self._cols])
        k = len(self._cols)
        # A row's slot: nr, time_enabled, time_running, (value, id) * k, then two zero words
        # that absent counters point at.
        self._width = 3 + 2 * k + 2
        self._roster: Roster | None = None
        self._rows: list[_Group | None] = []
        self._buf = bytearray(0)
        self._hot_rows: npt.NDArray[np.intp] | None = None  # None: rebuild (see _hot)
        self._hot_fds: list[int] = []
        self._hot_bufs: list[_Bufs] = []
        self._hot_sizes: IntArray = np.empty(0, np.int64)
        self._cold: list[int] = []
        self._alloc(0)

    # --- set-up ---------------------------------------------------------------------
    def _resolve(self, counter: str, event: str) -> EventSpec | None:
        spec = parse_builtin(event)
        if spec is not None:
            return spec
        try:
            lib = pfm.load()
        except pfm.PfmUnavailableError as exc:
            raise UsageError(
                f"perf event {event!r} (for {counter}) is not one of perf's generic names or rNNNN, and {exc}"
            ) from None
        try:
            return lib.encode(event)
        except pfm.PfmEncodeError as exc:
            self._unavailable[counter] = str(exc)
            return None

    def _attr(self, spec: EventSpec) -> PerfEventAttr:
        attr = PerfEventAttr()
        attr.type = spec.type
        attr.size = PERF_ATTR_SIZE
        attr.config = spec.config
        attr.config1 = spec.config1
        attr.config2 = spec.config2
        attr.read_format = GROUP_READ_FORMAT
        attr.exclude_kernel = int(self._exclude_kernel)
        attr.exclude_hv = 1
        return attr

    def _probe(self) -> None:
        """Open each event on our own thread once: a host has a PMU (and permission) or not."""
        for counter in list(self._specs):
            try:
                fd = perf_event_open(self._attrs[counter], 0)
            except OSError as exc:
                if exc.errno in _FD_LIMIT:
                    return  # learn it per thread instead
                self._drop(counter, explain(exc.errno or 0, self._specs[counter].name, self._paranoid_path))
            else:
                os.close(fd)

    def _drop(self, counter: str, reason: str) -> None:
        log.info("perf: %s unavailable: %s", counter, reason)
        self._unavailable[counter] = reason
        self._specs.pop(counter, None)
        self._attrs.pop(counter, None)

    # --- the protocol ----------------------------------------------------------------
    def capabilities(self) -> Mapping[str, str | None]:
        caps: dict[str, str | None] = dict.fromkeys(self._specs)
        caps.update(self._unavailable)
        if self._fd_note:
            caps[FD_LIMIT_KEY] = self._fd_note
        return caps

    def scale_of(self, tid: int) -> float | None:
        """enabled/running of the thread's group over its last interval (1.0: not multiplexed)."""
        g = self._groups.get(tid)
        return None if g is None or g.row < 0 else float(self._scale[g.row])

    def sample(self, threads: Sequence[ThreadRef]) -> dict[int, ThreadCounters]:
        roster = Roster(tuple(threads))
        return counters_from_batch(roster, self.sample_batch(roster))

    def close(self) -> None:
        for tid in list(self._groups):
            self._close(tid)

    # --- per-row state -----------------------------------------------------------------------
    def _alloc(self, n: int) -> None:
        k, w = len(self._cols), self._width
        self._buf = bytearray(8 * w * n)
        self._words = np.frombuffer(self._buf, np.uint64).reshape(n, w)
        self._pos = np.full((n, k), w - 2, np.intp)  # word of each counter's value (pad: zero)
        self._present = np.zeros((n, k), bool)
        self._ids = np.zeros((n, k), np.uint64)
        self._raw = np.zeros((n, k), np.uint64)  # last raw values
        self._enabled = np.zeros(n, np.uint64)
        self._running = np.zeros(n, np.uint64)
        self._totals = np.zeros((n, k))  # multiplex-scaled cumulative estimates
        self._scale = np.ones(n)  # enabled/running over the last interval
        self._exact = np.ones(n, bool)  # never multiplexed so far: totals == raw

    def _adopt(self, roster: Roster) -> None:
        """Align the per-row state with a new roster; forget (close) threads not in it."""
        if roster is self._roster:
            return
        wanted = set(roster.tids)
        for tid in self._groups.keys() - wanted:
            self._close(tid)
        for tid in self._refused.keys() - wanted:
            del self._refused[tid]
        old = {
            "_pos": self._pos,
            "_present": self._present,
            "_ids": self._ids,
            "_raw": self._raw,
            "_enabled": self._enabled,
            "_running": self._running,
            "_totals": self._totals,
            "_scale": self._scale,
            "_exact": self._exact,
        }
        groups = [self._groups.get(tid) for tid in roster.tids]
        src = np.array([-1 if g is None else g.row for g in groups], np.intp)
        self._alloc(len(roster))
        keep = src >= 0
        for name, arr in old.items():
            getattr(self, name)[keep] = arr[src[keep]]
        for i, g in enumerate(groups):
            if g is not None:
                self._place(g, i)
        self._rows = groups
        self._roster = roster
        self._hot_rows = None

    def _place(self, g: _Group, row: int) -> None:
        g.row = row
        start = 8 * self._width * row
        g.bufs = (memoryview(self._buf)[start : start + g.size],)

    def _reset_row(self, g: _Group, row: int) -> None:
        """A freshly opened group in ``row``: its layout, and no history."""
        self._place(g, row)
        self._hot_rows = None
        self._pos[row] = self._width - 2
        self._present[row] = False
        self._ids[row] = 0
        for j, (c, id_) in enumerate(zip(g.counters, g.ids, strict=True)):
            col = self._col_of[c]
            self._pos[row, col] = 3 + 2 * j
            self._present[row, col] = True
            self._ids[row, col] = id_
        self._raw[row] = 0
        self._enabled[row] = self._running[row] = 0
        self._totals[row] = 0.0
        self._scale[row] = 1.0
        self._exact[row] = True

    # --- the round ------------------------------------------------------------------------------
    def _hot(self) -> tuple[npt.NDArray[np.intp], list[int], list[_Bufs], IntArray, list[int]]:
        """Rows with a group: their leaders, buffer slots and read sizes; and the rows without."""
        if self._hot_rows is None:
            groups = [(i, g) for i, g in enumerate(self._rows) if g is not None]
            self._hot_rows = np.array([i for i, _ in groups], np.intp)
            self._hot_fds = [g.leader for _, g in groups]
            self._hot_bufs = [g.bufs for _, g in groups]
            self._hot_sizes = np.array([g.size for _, g in groups], np.int64)
            self._cold = [i for i, g in enumerate(self._rows) if g is None]
        return self._hot_rows, self._hot_fds, self._hot_bufs, self._hot_sizes, self._cold

    def sample_batch(self, roster: Roster, alive: npt.NDArray[np.bool_] | None = None) -> Batch:
        """One round over ``roster``. ``alive``: rows known to exist (others are closed, unread).

        Groups are opened for rows without one first, then every group is read by
        :func:`~collectors.base.read_each` (a C loop, one interpolated timestamp per row: see
        there why that is accurate enough).
        """
        self._adopt(roster)
        n = len(roster)
        rows = self._rows
        nan = math.nan
        missing: list[Mapping[str, str]] = [NO_REASONS] * n
        other: list[tuple[int, Mapping[str, str]]] = []  # rows there but without a group
        short: list[int] = []  # rows left without a group for lack of fds
        live = alive.tolist() if alive is not None else None
        check = _Alive() if live is None else None
        pids = roster.pids
        if alive is not None and not alive.all():
            for i in np.flatnonzero(~alive).tolist():
                g = rows[i]
                if g is not None:
                    self._close(g.tid)
        can_open = True
        for i in self._hot()[4]:
            if live is not None and not live[i]:
                continue
            tid = roster.tids[i]
            if not self._specs or tid in self._refused:
                other.append((i, self._unmonitored_missing(self._refused.get(tid))))
                continue
            if not can_open:
                short.append(i)
                continue
            try:
                opened = self._open(tid, i)
            except _GoneError:
                continue
            except _FdLimitError:
                can_open = False
                short.append(i)
                continue
            if opened is None:
                other.append((i, self._unmonitored_missing(self._refused.get(tid))))
        hot, fds, bufs, sizes, _ = self._hot()
        nread, hot_when = read_each(os.readv, fds, bufs)
        ok = nread >= sizes  # short or -1 (OSError): the event is in error state, reopen next round
        for i in hot[~ok].tolist():
            g = rows[i]
            if g is not None:
                self._close(g.tid)
        when = np.full(n, nan)
        when[hot[ok]] = hot_when[ok]
        got: list[int] = hot[ok].tolist()  # rows read

        if check is not None:  # no word from the sampler: ask /proc (an exited task's events still read)
            gone = [i for i in got if not check(pids[i], roster.tids[i])]
            for i in gone:
                g = rows[i]
                if g is not None:
                    self._close(g.tid)
                when[i] = nan
            if gone:
                dead = set(gone)
                got = [i for i in got if i not in dead]
            other = [(i, m) for i, m in other if check(pids[i], roster.tids[i])]
        values = np.full((n, len(self._cols)), nan)
        if got:
            self._scale_rows(np.array(got, np.intp), values, missing)
        now = time.monotonic()
        for i, m in other:
            when[i] = now
            missing[i] = m
        self._note_fd_limit(short, roster, when, missing, live, check)
        return Batch(self._cols, values, when, np.full(n, NO_CPU, np.int64), missing)

    def _scale_rows(
        self,
        ix: npt.NDArray[np.intp],
        values: FloatArray,
        missing: list[Mapping[str, str]],
    ) -> None:
        """The rows' readings (in the buffer) -> multiplex-scaled cumulative counts, all at once."""
        words = self._words[ix]
        pos = self._pos[ix]
        raw = np.take_along_axis(words, pos, axis=1)
        ids = np.take_along_axis(words, pos + 1, axis=1)
        for r in np.flatnonzero((ids != self._ids[ix]).any(axis=1)).tolist():
            # never seen; the ABI lets the order differ, so honour the ids
            row = int(ix[r])
            g = self._rows[row]
            assert g is not None
            nr = len(g.ids)
            by_id = dict(
                zip(words[r, 4 : 4 + 2 * nr : 2].tolist(), words[r, 3 : 3 + 2 * nr : 2].tolist(), strict=True)
            )
            for c, id_ in zip(g.counters, g.ids, strict=True):
                raw[r, self._col_of[c]] = by_id[id_]
        enabled, running = words[:, 1], words[:, 2]
        de = (enabled - self._enabled[ix]).astype(np.float64)
        dr = (running - self._running[ix]).astype(np.float64)
        out = (dr <= 0) & (de > 0)  # off the PMU for the whole interval: keep the baseline
        exact = self._exact[ix] & (dr == de)
        step = (raw.astype(np.int64) - self._raw[ix].astype(np.int64)).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            scale = np.where(dr > 0, de / dr, 1.0)
        totals = np.where(exact[:, None], raw.astype(np.float64), self._totals[ix] + step * scale[:, None])
        upd = ix[~out]
        keep = ~out
        self._raw[upd] = raw[keep]
        self._enabled[upd] = enabled[keep]
        self._running[upd] = running[keep]
        self._totals[upd] = totals[keep]
        mux = keep & ~exact
        self._exact[ix[mux]] = False
        self._scale[ix[mux]] = scale[mux]
        vals = np.where(self._present[ix], totals * self._units, math.nan)
        vals[out] = math.nan
        values[ix] = vals
        rows = self._rows
        ixl = ix.tolist()
        reasons = list(map(_MISSING_OF, map(rows.__getitem__, ixl)))  # rows in ix have a group
        if len(ixl) == len(missing):  # every row, in order
            missing[:] = reasons
        else:
            for row, m in zip(ixl, reasons, strict=True):
                missing[row] = m
        for r in np.flatnonzero(out).tolist():
            row = int(ix[r])
            g = rows[row]
            assert g is not None
            reason = f"multiplexed out: not counted in the last {de[r] / 1e6:.1f} ms"
            missing[row] = MappingProxyType({**g.missing, **dict.fromkeys(g.counters, reason)})

    # --- per thread ----------------------------------------------------------------------
    def _open(self, tid: int, row: int) -> _Group | None:
        fds: list[int] = []
        counters: list[str] = []
        missing = dict(self._unavailable)
        for counter in list(self._specs):
            try:
                fd = perf_event_open(self._attrs[counter], tid, -1, fds[0] if fds else -1)
            except OSError as exc:
                err = exc.errno or 0
                if err == errno.ESRCH:
                    self._close_fds(fds)
                    raise _GoneError from None
                if err in _FD_LIMIT:
                    self._close_fds(fds)
                    raise _FdLimitError from None
                reason = explain(err, self._specs[counter].name, self._paranoid_path)
                if err in _NO_PMU or err == errno.EINVAL:
                    self._drop(counter, reason)  # a property of the host, not of this thread
                else:
                    missing[counter] = reason
                continue
            fds.append(fd)
            counters.append(counter)
        if not fds:
            self._refused[tid] = "; ".join(sorted(set(missing.values()))) or "no events"
            return None
        try:
            ids = tuple(event_id(fd) for fd in fds)
        except OSError:
            self._close_fds(fds)
            raise _GoneError from None
        nr = len(fds)
        g = _Group(
            tid=tid,
            fds=fds,
            counters=tuple(counters),
            ids=ids,
            size=8 * (3 + 2 * nr),
            missing=self._intern(missing),
        )
        self._groups[tid] = g
        self._rows[row] = g
        self._reset_row(g, row)
        return g

    def _unmonitored_missing(self, reason: str | None) -> Mapping[str, str]:
        missing = dict(self._unavailable)
        if reason:
            missing.update(dict.fromkeys(self._specs, reason))
        return self._intern(missing)

    def _intern(self, missing: dict[str, str]) -> Mapping[str, str]:
        """One shared read-only mapping per distinct content (cheap for thousands of threads)."""
        key = frozenset(missing.items())
        shared = self._missing.get(key)
        if shared is None:
            shared = self._missing[key] = MappingProxyType(missing)
        return shared

    def _note_fd_limit(
        self,
        short: list[int],
        roster: Roster,
        when: FloatArray,
        missing: list[Mapping[str, str]],
        live: list[bool] | None,
        check: _Alive | None,
    ) -> None:
        self.unmonitored = len(short)
        if not short:
            self._fd_note = None
            return
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self._fd_note = (
            f"fd limit: RLIMIT_NOFILE={soft} reached; {len(short)} of {len(roster)} threads unmonitored "
            f"(each needs {len(self._specs)} fds: raise LimitNOFILE)"
        )
        log.warning("perf: %s", self._fd_note)
        reason = self._unmonitored_missing(self._fd_note)
        now = time.monotonic()
        for i in short:
            if check is None or check(roster.pids[i], roster.tids[i]):
                when[i] = now
                missing[i] = reason

    def _close(self, tid: int) -> None:
        g = self._groups.pop(tid, None)
        if g is not None:
            if 0 <= g.row < len(self._rows) and self._rows[g.row] is g:
                self._rows[g.row] = None
                self._hot_rows = None
            g.row = -1
            g.bufs = ()
            self._close_fds(g.fds)

    @staticmethod
    def _close_fds(fds: list[int]) -> None:
        for fd in reversed(fds):  # siblings before the leader
            with contextlib.suppress(OSError):
                os.close(fd)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


__all__ = [
    "DEFAULT_EVENTS",
    "FD_LIMIT_KEY",
    "PerfCollector",
    "explain",
    "raise_nofile_limit",
    "scale_delta",
]
