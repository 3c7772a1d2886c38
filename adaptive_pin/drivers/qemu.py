"""The plain-QEMU driver: QEMU processes found through /proc, pinned with sched_setaffinity.

Guests are ``qemu-system-*`` and ``qemu-kvm`` processes. Name and id come from ``-name`` and
``-uuid`` (id ``pid:<n>`` without a UUID). vCPU threads come from QMP ``query-cpus-fast`` when the
operator names the guest's QMP socket (option ``qmp_sockets``: guest name or UUID -> path),
else from QEMU's thread names (``-name ...,debug-threads=on``). A guest whose vCPU threads
cannot be told apart is listed with ``Guest.problem`` and no vCPUs: a guessed thread would
get another thread pinned.

Memory NUMA nodes: where the process's pages are, from ``/proc/<pid>/numa_maps`` (read at most
every ``numa_refresh_s`` per process: it is costly on big guests, see :mod:`._numa`).

Start/stop events come from a daemon thread polling /proc every ``poll_interval`` seconds; a
QEMU that exited but is not yet reaped by its parent (a zombie) counts as stopped.

``exclude_libvirt``: leave out QEMU processes libvirtd started (the composite ``auto`` driver
lists those through libvirt instead), in the inventory and in events alike.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import psutil

from adaptive_pin.drivers import _migrate, _numa, _threads
from adaptive_pin.drivers.qmp import QmpError, vcpu_thread_ids
from adaptive_pin.errors import GuestGoneError, PinError
from adaptive_pin.model import CpuSet, EventKind, Guest, GuestEvent, Inventory, Pinnability, VCpu
from adaptive_pin.pinnability import PinnabilityRules, resolve

log = logging.getLogger(__name__)

QEMU_BINARY = re.compile(r"^(qemu-system-[\w.+-]+|qemu-kvm)$")
# comm is cut to 15 characters: "qemu-system-x86" for qemu-system-x86_64.
QEMU_COMM = re.compile(r"^(qemu-system-[\w.+-]*|qemu-kvm)$")
# A process is re-examined this long after first sight: between fork and exec it still
# carries its parent's name.
YOUNG_S = 2.0


# --------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------


def split_qemu_opts(text: str, implied: str) -> dict[str, str]:
    """QEMU's ``key=value,key=value`` option syntax: ``,,`` is a literal comma; a leading bare
    value belongs to the option's implied key (``-name foo`` is ``guest=foo``)."""
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            if text[i + 1 : i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    out: dict[str, str] = {}
    for n, part in enumerate(parts):
        key, eq, value = part.partition("=")
        if not eq:
            if n == 0:
                out[implied] = part
            continue
        out[key] = value
    return out


@dataclass(frozen=True)
class QemuCommandLine:
    binary: str
    name: str | None
    uuid: str | None
    debug_threads: bool
    smp: int | None  # vCPUs at start, from -smp (QEMU's default is 1)


def parse_cmdline(argv: Sequence[str]) -> QemuCommandLine:
    opts: dict[str, str] = {}
    it = iter(argv[1:])
    for arg in it:
        if arg.startswith("-") and arg.lstrip("-") in ("name", "uuid", "smp"):
            opts[arg.lstrip("-")] = next(it, "")
    name = split_qemu_opts(opts["name"], "guest") if "name" in opts else {}
    smp_text = split_qemu_opts(opts["smp"], "cpus").get("cpus") if "smp" in opts else "1"
    return QemuCommandLine(
        binary=os.path.basename(argv[0]) if argv else "",
        name=name.get("guest") or None,
        uuid=opts.get("uuid", "").lower() or None,
        debug_threads=name.get("debug-threads", "off") in ("on", "yes", "true"),
        smp=int(smp_text) if smp_text and smp_text.isdigit() else None,
    )


def is_qemu(argv: Sequence[str]) -> bool:
    return bool(argv) and QEMU_BINARY.match(os.path.basename(argv[0])) is not None


def libvirt_pidfile_dirs() -> tuple[str, ...]:
    """Where libvirt's system and session daemons keep ``<domain>.pid``."""
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return ("/run/libvirt/qemu", f"{config}/libvirt/qemu/run")


def libvirt_pids(dirs: Sequence[str] | None = None) -> set[int]:
    """The QEMU pids libvirtd wrote into its pidfiles (``<run dir>/<domain>.pid``)."""
    pids: set[int] = set()
    for d in libvirt_pidfile_dirs() if dirs is None else dirs:
        try:
            names = os.listdir(d)
        except OSError:
            continue
        for n in names:
            if not n.endswith(".pid") or n == "driver.pid":
                continue
            try:
                with open(os.path.join(d, n)) as f:
                    pids.add(int(f.read().strip()))
            except (OSError, ValueError):
                continue
    return pids


def _libvirt_managed(pid: int, argv: Sequence[str]) -> bool:
    """libvirt's QEMUs live in its machine cgroups and keep state under /var/lib/libvirt/qemu."""
    if any("/libvirt/qemu/domain-" in a for a in argv):
        return True
    try:
        with open(f"{_threads.PROC}/{pid}/cgroup") as f:
            cgroup = f.read()
    except OSError:
        return False
    return ".libvirt-qemu" in cgroup or "machine-qemu" in cgroup


@dataclass(frozen=True)
class _Seen:
    """A QEMU process the watcher knows, with what its events need."""

    proc: psutil.Process
    guest_id: str
    name: str


def _alive(proc: psutil.Process) -> bool:
    """Running, and not a zombie: an exited QEMU its parent has not reaped yet is gone."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _identity(pid: int, cmd: QemuCommandLine) -> tuple[str, str]:
    guest_id = cmd.uuid or f"pid:{pid}"
    return guest_id, cmd.name or guest_id


# --------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------


class QemuDriver:
    """Options: ``qmp_sockets`` (guest name or UUID -> QMP socket path), ``rules``
    (:class:`PinnabilityRules`), ``poll_interval`` (s, event polling), ``qmp_timeout`` (s),
    ``numa_refresh_s`` (s, how often a guest's numa_maps may be re-read), ``exclude_libvirt``
    (leave out QEMUs that libvirtd started)."""

    name = "qemu"

    def __init__(
        self,
        qmp_sockets: Mapping[str, str] | None = None,
        rules: PinnabilityRules | None = None,
        poll_interval: float = 0.2,
        qmp_timeout: float = 2.0,
        numa_refresh_s: float = _numa.REFRESH_S,
        exclude_libvirt: bool = False,
    ) -> None:
        self.qmp_sockets = dict(qmp_sockets or {})
        self.exclude_libvirt = exclude_libvirt
        self._numa_maps = _numa.NumaMapsCache(numa_refresh_s)
        self.rules = rules or PinnabilityRules()
        self.qmp_timeout = qmp_timeout
        self._poll_interval = poll_interval
        self._events: queue.Queue[GuestEvent] = queue.Queue()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._known: dict[int, _Seen] = {}  # QEMU pids
        self._young: dict[int, float] = {}  # other pids still worth a second look -> first seen
        self._settled: set[int] = set()  # other pids: not QEMU, not young
        self._guest_procs: dict[str, psutil.Process] = {}  # guest id -> its process at last inventory
        self._poll(emit=False)
        self._watcher = threading.Thread(target=self._watch, name="adaptive-pin-qemu-watch", daemon=True)
        self._watcher.start()

    # --- inventory -----------------------------------------------------------------------
    def _qemu_processes(self) -> Iterator[tuple[psutil.Process, list[str]]]:
        libvirt = libvirt_pids() if self.exclude_libvirt else set()
        for proc in psutil.process_iter(["cmdline"]):
            argv = proc.info["cmdline"]
            if (
                argv
                and is_qemu(argv)
                and not (self.exclude_libvirt and self._is_libvirts(proc.pid, argv, libvirt))
            ):
                yield proc, argv

    @staticmethod
    def _is_libvirts(pid: int, argv: Sequence[str], pidfiles: set[int]) -> bool:
        return pid in pidfiles or _libvirt_managed(pid, argv)

    def inventory(self) -> Inventory:
        guests: list[Guest] = []
        errors: dict[str, str] = {}
        procs: dict[str, psutil.Process] = {}
        for proc, argv in self._qemu_processes():
            cmd = parse_cmdline(argv)
            guest_id, name = _identity(proc.pid, cmd)
            try:
                guest = self._guest(proc, argv, cmd)
            except (GuestGoneError, psutil.NoSuchProcess) as exc:
                errors[guest_id] = f"{name}: vanished during inventory ({exc})"
                continue
            except (OSError, psutil.Error) as exc:
                errors[guest_id] = f"{name}: {exc}"
                continue
            guests.append(guest)
            procs[guest.id] = proc
        with self._lock:
            self._guest_procs = procs
        self._numa_maps.forget_except(p.pid for p in procs.values())
        return Inventory(guests=tuple(guests), errors=errors, time=time.monotonic())

    def _qmp_socket(self, cmd: QemuCommandLine, guest_id: str) -> str | None:
        for key in (cmd.uuid, cmd.name, guest_id):
            if key and key in self.qmp_sockets:
                return self.qmp_sockets[key]
        return None

    def _vcpu_threads(self, pid: int, cmd: QemuCommandLine, guest_id: str) -> _threads.VCpuThreads:
        sock = self._qmp_socket(cmd, guest_id)
        if sock is None:
            return _threads.vcpu_threads_by_name(pid)
        try:
            tids = vcpu_thread_ids(sock, self.qmp_timeout)
        except QmpError as exc:
            by_name = _threads.vcpu_threads_by_name(pid)
            if by_name.problem is None:
                log.warning("%s: %s; using vCPU thread names instead", cmd.name or guest_id, exc)
                return by_name
            return _threads.VCpuThreads({}, f"{exc}; and {by_name.problem}")
        strangers = sorted(t for t in tids.values() if not _threads.is_task_of(pid, t))
        if strangers:
            return _threads.VCpuThreads(
                {}, f"QMP socket {sock} reports threads {strangers} that are not in process {pid}"
            )
        return _threads.VCpuThreads(tids)

    def _guest(self, proc: psutil.Process, argv: Sequence[str], cmd: QemuCommandLine) -> Guest:
        pid = proc.pid
        guest_id, name = _identity(pid, cmd)
        found = self._vcpu_threads(pid, cmd, guest_id)
        problem = found.problem
        vcpus: list[VCpu] = []
        for index, tid in sorted(found.tids.items()):
            try:
                vcpus.append(_threads.read_vcpu(index, pid, tid))
            except GuestGoneError:
                if not _alive(proc):
                    raise
                problem = f"vCPU {index} thread {tid} exited (vCPU unplugged?)"
        if problem is None and cmd.smp is not None and len(vcpus) < cmd.smp:
            problem = f"found {len(vcpus)} vCPU threads, -smp asks for {cmd.smp} (still starting?)"
        return Guest(
            id=guest_id,
            name=name,
            pid=pid,
            vcpus=tuple(vcpus),
            pinnability=self._pinnability(pid, argv),
            driver=self.name,
            memory_nodes=self._numa_maps.nodes(pid),
            memory_bound=self._numa_maps.bound(pid),
            problem=problem,
        )

    def _pinnability(self, pid: int, argv: Sequence[str]) -> Pinnability:
        cmd = parse_cmdline(argv)
        _, name = _identity(pid, cmd)
        libvirt = _libvirt_managed(pid, argv)
        return resolve(
            name=name,
            uuid=cmd.uuid,
            rules=self.rules,
            orchestrator="started by libvirtd: use --driver libvirt" if libvirt else None,
        )

    # --- pinning -------------------------------------------------------------------------
    def migrate_memory(self, guest: Guest, from_nodes: CpuSet, to_nodes: CpuSet) -> None:
        with self._lock:
            proc = self._guest_procs.get(guest.id)
        if proc is None or proc.pid != guest.pid or not _alive(proc):
            raise GuestGoneError(f"{guest.name}: QEMU process {guest.pid} exited")
        _migrate.migrate_guest_memory(guest, from_nodes, to_nodes, self._numa_maps)

    def pin(self, guest: Guest, vcpu: int, cpus: CpuSet) -> None:
        what = f"{guest.name} vCPU {vcpu}"
        if not guest.pinnability.managed:
            raise PinError(f"refusing to pin {what}: not managed ({guest.pinnability.reason})")
        if guest.pid is None:
            raise PinError(f"{what}: no QEMU process id")
        with self._lock:
            proc = self._guest_procs.get(guest.id)
        # The process seen at inventory must still be this pid: a reused pid is another program.
        if proc is None or proc.pid != guest.pid or not _alive(proc):
            raise GuestGoneError(f"{what}: QEMU process {guest.pid} exited")
        try:
            v = guest.vcpu(vcpu)
        except KeyError:
            raise PinError(f"{what}: no such vCPU") from None
        if v.tid is None or not _threads.is_task_of(guest.pid, v.tid):
            raise GuestGoneError(f"{what}: thread {v.tid} is gone")
        # Defense in depth: the rules may have changed since that inventory (config reload).
        try:
            fresh = self._pinnability(proc.pid, proc.cmdline())
        except psutil.Error:
            raise GuestGoneError(f"{what}: QEMU process {guest.pid} exited") from None
        if not fresh.managed:
            raise PinError(f"refusing to pin {what}: not managed ({fresh.reason})")
        _threads.set_affinity(what, v.tid, cpus)

    # --- events --------------------------------------------------------------------------
    def _poll(self, emit: bool = True) -> None:
        now = time.monotonic()
        pids = set(psutil.pids())
        for pid, gone in list(self._known.items()):
            if pid not in pids or not _alive(gone.proc):
                del self._known[pid]
                if emit:
                    self._events.put(GuestEvent(EventKind.STOPPED, gone.guest_id, gone.name, now))
        self._settled &= pids
        for pid in [p for p in self._young if p not in pids]:
            del self._young[pid]
        for pid in pids - self._known.keys() - self._settled:
            first = self._young.setdefault(pid, now)
            seen = self._examine(pid)
            if seen is not None:
                self._known[pid] = seen
                del self._young[pid]
                if emit:
                    self._events.put(GuestEvent(EventKind.STARTED, seen.guest_id, seen.name, now))
            elif now - first > YOUNG_S or not emit:
                del self._young[pid]
                self._settled.add(pid)

    def _examine(self, pid: int) -> _Seen | None:
        try:
            with open(f"{_threads.PROC}/{pid}/comm") as f:
                if not QEMU_COMM.match(f.read().strip()):
                    return None
            proc = psutil.Process(pid)
            argv = proc.cmdline()
        except (OSError, psutil.Error):
            return None
        if not is_qemu(argv):
            return None
        if self.exclude_libvirt and self._is_libvirts(pid, argv, libvirt_pids()):
            return None
        guest_id, name = _identity(pid, parse_cmdline(argv))
        return _Seen(proc, guest_id, name)

    def _watch(self) -> None:
        while not self._stop.wait(self._poll_interval):
            try:
                self._poll()
            except Exception:  # the watcher must outlive any one bad /proc read
                log.exception("polling /proc for QEMU processes failed")

    def events(self, timeout: float) -> list[GuestEvent]:
        out: list[GuestEvent] = []
        try:
            out.append(self._events.get(timeout=max(timeout, 0.0)))
        except queue.Empty:
            return out
        while True:
            try:
                out.append(self._events.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        self._stop.set()
        if self._watcher.is_alive() and self._watcher is not threading.current_thread():
            self._watcher.join(timeout=2 * self._poll_interval + 1)
