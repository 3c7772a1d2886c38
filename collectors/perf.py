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
import os
import resource
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from adaptive_pin.errors import UsageError
from adaptive_pin.model import (
    CYCLES,
    INSTRUCTIONS,
    LLC_MISSES,
    TASK_CLOCK,
    ThreadCounters,
    ThreadRef,
)
from collectors import pfm
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

# model counter name -> perf event name (perf's spelling, rNNNN, or a libpfm4 name)
DEFAULT_EVENTS: Mapping[str, str] = {
    CYCLES: "cycles",
    INSTRUCTIONS: "instructions",
    LLC_MISSES: "cache-misses",
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
            except OSError:
                tasks = frozenset()
            self._tasks[pid] = tasks
        return tid in tasks


@dataclass(slots=True, eq=False)
class _Group:
    tid: int
    fds: list[int]
    counters: tuple[str, ...]
    ids: tuple[int, ...]
    units: tuple[float, ...]
    size: int  # bytes one group read returns
    unpack: Callable[[bytes | bytearray], tuple[int, ...]]
    missing: Mapping[str, str]  # counters not in this group, and why
    raw: list[int]  # last raw values (group order)
    enabled: int = 0
    running: int = 0
    totals: Sequence[float] = field(default_factory=list)  # multiplex-scaled cumulative estimates
    scale: float = 1.0  # enabled/running over the last interval
    exact: bool = True  # never multiplexed so far: totals == raw

    @property
    def leader(self) -> int:
        return self.fds[0]


class _GoneError(Exception):
    pass


class _FdLimitError(Exception):
    pass


class PerfCollector:
    """The ``perf`` collector: one perf_event_open group per vCPU thread, kept open.

    ``events`` maps model counter names to perf event names; see :data:`DEFAULT_EVENTS`.
    Names are perf's own (``cycles``, ``LLC-load-misses``, ``task-clock``...), raw ``rNNNN``,
    or CPU-specific names resolved through libpfm4 where it is installed.
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
        self._buf = bytearray(8 * (3 + 2 * max(1, len(self._specs))))
        self.unmonitored = 0  # threads asked for but without a group for lack of fds
        self._fd_note: str | None = None
        if probe:
            self._probe()

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
        return None if g is None else g.scale

    def sample(self, threads: Sequence[ThreadRef]) -> dict[int, ThreadCounters]:
        wanted = {t.tid for t in threads}
        for tid in self._groups.keys() - wanted:
            self._close(tid)
        for tid in self._refused.keys() - wanted:
            del self._refused[tid]

        out: dict[int, ThreadCounters] = {}
        short: list[int] = []  # threads left without a group for lack of fds
        can_open = True
        buf = self._buf
        alive = _Alive()
        for t in threads:
            tid = t.tid
            g = self._groups.get(tid)
            if g is None:
                if not self._specs or tid in self._refused:
                    if alive(t.pid, tid):
                        out[tid] = self._unmonitored_counters(tid, self._refused.get(tid))
                    continue
                if not can_open:
                    short.append(tid)
                    continue
                try:
                    g = self._open(tid)
                except _GoneError:
                    continue
                except _FdLimitError:
                    can_open = False
                    short.append(tid)
                    continue
                if g is None:
                    if alive(t.pid, tid):
                        out[tid] = self._unmonitored_counters(tid, self._refused.get(tid))
                    continue
            try:
                n = os.readv(g.leader, (buf,))
            except OSError:
                n = 0
            if n < g.size:  # EOF: the event is in error state; reopen next round if still there
                self._close(tid)
                continue
            if not alive(t.pid, tid):
                self._close(tid)
                continue
            out[tid] = self._read(g, buf)

        self._note_fd_limit(short, threads, out, alive)
        return out

    def close(self) -> None:
        for tid in list(self._groups):
            self._close(tid)

    # --- per thread ----------------------------------------------------------------------
    def _open(self, tid: int) -> _Group | None:
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
            units=tuple(UNIT_SCALE.get(c, 1.0) for c in counters),
            size=8 * (3 + 2 * nr),
            unpack=struct.Struct(f"{3 + 2 * nr}Q").unpack_from,
            missing=self._intern(missing),
            raw=[0] * nr,
            totals=[0.0] * nr,
        )
        self._groups[tid] = g
        return g

    def _read(self, g: _Group, buf: bytearray) -> ThreadCounters:
        vals = g.unpack(buf)
        enabled, running = vals[1], vals[2]
        raw = list(vals[3::2])
        if vals[4::2] != g.ids:  # never seen; the ABI lets the order differ, so honour the ids
            by_id = dict(zip(vals[4::2], vals[3::2], strict=True))
            raw = [by_id[i] for i in g.ids]
        de, dr = enabled - g.enabled, running - g.running
        if dr <= 0 and de > 0:
            # Off the PMU for the whole interval: keep the baseline so the next read covers it.
            reason = f"multiplexed out: not counted in the last {de / 1e6:.1f} ms"
            return ThreadCounters(
                g.tid, time.monotonic(), {}, missing={**g.missing, **dict.fromkeys(g.counters, reason)}
            )
        if g.exact and dr == de:  # never multiplexed: the raw counts are the totals
            g.totals = raw
        else:
            g.exact = False
            g.scale = de / dr if dr > 0 else 1.0
            steps = zip(g.totals, raw, g.raw, strict=True)
            g.totals = [t + (scale_delta(v - r, de, dr) or 0.0) for t, v, r in steps]
        g.raw, g.enabled, g.running = raw, enabled, running
        values = {c: tot * u for c, tot, u in zip(g.counters, g.totals, g.units, strict=True)}
        return ThreadCounters(g.tid, time.monotonic(), values, missing=g.missing)

    def _unmonitored_counters(self, tid: int, reason: str | None) -> ThreadCounters:
        missing = dict(self._unavailable)
        if reason:
            missing.update(dict.fromkeys(self._specs, reason))
        return ThreadCounters(tid, time.monotonic(), {}, missing=self._intern(missing))

    def _intern(self, missing: dict[str, str]) -> Mapping[str, str]:
        """One shared read-only mapping per distinct content (cheap for thousands of threads)."""
        key = frozenset(missing.items())
        shared = self._missing.get(key)
        if shared is None:
            shared = self._missing[key] = MappingProxyType(missing)
        return shared

    def _note_fd_limit(
        self, short: list[int], threads: Sequence[ThreadRef], out: dict[int, ThreadCounters], alive: _Alive
    ) -> None:
        self.unmonitored = len(short)
        if not short:
            self._fd_note = None
            return
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self._fd_note = (
            f"fd limit: RLIMIT_NOFILE={soft} reached; {len(short)} of {len(threads)} threads unmonitored "
            f"(each needs {len(self._specs)} fds: raise LimitNOFILE)"
        )
        log.warning("perf: %s", self._fd_note)
        pid_of = {t.tid: t.pid for t in threads}
        for tid in short:
            if alive(pid_of[tid], tid):
                out[tid] = self._unmonitored_counters(tid, self._fd_note)

    def _close(self, tid: int) -> None:
        g = self._groups.pop(tid, None)
        if g is not None:
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
