"""The libvirt driver: running domains, pinned through libvirt so its cgroups and its view agree.

vCPU threads: libvirt's public API does not expose vCPU thread ids (only the monitor does, and
``qemuMonitorCommand`` is off limits in production: it taints the domain and bypasses libvirt).
So the QEMU process is found first — libvirt's pidfile ``/run/libvirt/qemu/<name>.pid`` (or the
session run dir), checked against the domain's ``-uuid`` on the command line, else a scan of
QEMU processes for that ``-uuid`` — and its threads are read from /proc by QEMU's names
(``CPU <n>/<accel>``; libvirt always passes ``debug-threads=on``). The result is cross-checked
against ``virDomainGetVcpus``: every online vCPU libvirt reports must have its thread, or the
guest is listed with ``Guest.problem`` and no vCPUs. This needs the driver on the hypervisor
host itself; remote URIs are refused.

Orchestrator pinning: a ``<cputune><vcpupin>`` or ``<vcpu cpuset=...>`` in the persistent
definition (Nova writes them there). A transient domain has only its live definition, which
also shows this driver's own live pins; pins that match what this process applied are ignored.

Memory NUMA nodes: the live ``<numatune>`` nodeset (every mode), else where the QEMU process's
pages are (``/proc/<pid>/numa_maps``, read at most every ``numa_refresh_s``: see :mod:`._numa`).

Events: lifecycle (started/stopped), metadata change, and tunable change (someone else
re-pinned a vCPU) through libvirt's default event loop, run by one daemon thread per process.
When libvirtd goes away the close callback marks the connection lost; ``inventory`` and ``pin``
then raise :class:`DriverError` and reconnect with capped exponential backoff.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import queue
import socket
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psutil

from adaptive_pin.drivers import _migrate, _numa, _threads
from adaptive_pin.drivers.qemu import is_qemu, parse_cmdline
from adaptive_pin.errors import DriverError, GuestGoneError, PinError
from adaptive_pin.model import CpuSet, EventKind, Guest, GuestEvent, Inventory, Pinnability, VCpu
from adaptive_pin.pinnability import (
    ELEMENT,
    MAX_DOMAIN_XML_BYTES,
    NAMESPACE,
    PinnabilityRules,
    UnsafeXmlError,
    parse_xml_safely,
    resolve,
)

log = logging.getLogger(__name__)

DEFAULT_URI = "qemu:///system"
SOCKET_TIMEOUT_S = 0.5
KEEPALIVE = (5, 3)  # probe every 5 s, give up after 3 unanswered: a hung libvirtd is noticed in ~20 s


def _import_libvirt() -> ModuleType:
    try:
        libvirt = importlib.import_module("libvirt")
    except ImportError:
        raise DriverError(
            "the libvirt driver needs libvirt-python: pip install 'adaptive-pin[libvirt]'"
        ) from None
    # libvirt prints every error to stderr by default; ours are raised with context instead.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


# --------------------------------------------------------------------------------------
# Is libvirtd there?
# --------------------------------------------------------------------------------------


def socket_paths(uri: str) -> list[str] | None:
    """The UNIX sockets a local qemu:// URI connects to (modular daemon first); None if remote."""
    parts = urlsplit(uri)
    if parts.hostname or parts.scheme not in ("qemu", "qemu+unix"):
        return None
    explicit = parse_qs(parts.query).get("socket")
    if explicit:
        return explicit
    if parts.path == "/session":
        run = os.environ.get("XDG_RUNTIME_DIR") or os.path.expanduser("~/.cache")
        base = f"{run}/libvirt"
    else:
        base = "/run/libvirt"
    return [f"{base}/virtqemud-sock", f"{base}/libvirt-sock"]


def _answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(SOCKET_TIMEOUT_S)
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def available(uri: str | None = None) -> bool:
    """Cheap: libvirt-python importable and the daemon's socket accepts a connection.

    Remote URIs get a real read-only connect, abandoned after 2 s.
    """
    try:
        _import_libvirt()
    except DriverError:
        return False
    uri = uri or DEFAULT_URI
    paths = socket_paths(uri)
    if paths is not None:
        return any(_answers(p) for p in paths)
    result: list[bool] = []

    def probe() -> None:
        libvirt = importlib.import_module("libvirt")
        try:
            libvirt.openReadOnly(uri).close()
            result.append(True)
        except libvirt.libvirtError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(2.0)
    return bool(result and result[0])


# --------------------------------------------------------------------------------------
# The event loop: one per process, shared by every connection
# --------------------------------------------------------------------------------------

_loop_lock = threading.Lock()
_loop_threads: list[threading.Thread] = []  # at most one


def _ensure_event_loop(lv: ModuleType) -> None:
    """virEventRegisterDefaultImpl must precede the connections whose events we want."""
    with _loop_lock:
        if _loop_threads:
            return
        lv.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                try:
                    lv.virEventRunDefaultImpl()
                except Exception:  # a failing iteration must not end event delivery
                    log.exception("libvirt event loop iteration failed")
                    time.sleep(0.1)

        thread = threading.Thread(target=run, name="adaptive-pin-libvirt-events", daemon=True)
        thread.start()
        _loop_threads.append(thread)


# --------------------------------------------------------------------------------------
# Backoff
# --------------------------------------------------------------------------------------


@dataclass
class Backoff:
    """Capped exponential backoff: the first retry is immediate, then initial, 2x, ... up to cap."""

    initial: float = 0.5
    cap: float = 30.0
    delay: float = 0.0
    next_at: float = 0.0

    def due(self, now: float) -> bool:
        return now >= self.next_at

    def failed(self, now: float) -> float:
        self.delay = self.initial if self.delay == 0 else min(self.delay * 2, self.cap)
        self.next_at = now + self.delay
        return self.delay

    def reset(self) -> None:
        self.delay = 0.0
        self.next_at = 0.0


# --------------------------------------------------------------------------------------
# The domain XML
# --------------------------------------------------------------------------------------


def xml_vcpupins(root: ET.Element) -> dict[int, CpuSet]:
    """vCPU -> CPUs from ``<cputune><vcpupin>``; a domain-wide ``<vcpu cpuset>`` covers the rest."""
    pins: dict[int, CpuSet] = {}
    for el in root.findall("cputune/vcpupin"):
        try:
            pins[int(el.get("vcpu", ""))] = CpuSet.parse(el.get("cpuset", ""))
        except ValueError:
            continue
    vcpu = root.find("vcpu")
    if vcpu is not None and vcpu.get("cpuset"):
        try:
            everywhere = CpuSet.parse(vcpu.get("cpuset", ""))
            count = int((vcpu.text or "0").strip())
        except ValueError:
            return pins
        for i in range(count):
            pins.setdefault(i, everywhere)
    return pins


def xml_metadata(root: ET.Element) -> str | None:
    el = root.find(f"metadata/{{{NAMESPACE}}}{ELEMENT}")
    return None if el is None else ET.tostring(el, encoding="unicode")


@dataclass(frozen=True)
class _Described:
    pinnability: Pinnability
    orchestrator_pinned: bool
    memory_nodes: CpuSet | None  # from <numatune>, None when the domain sets none


# --------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------


class LibvirtDriver:
    """Options: ``uri`` (default qemu:///system), ``rules`` (:class:`PinnabilityRules`),
    ``numa_refresh_s`` (how often a guest's /proc/<pid>/numa_maps may be re-read)."""

    name = "libvirt"

    def __init__(
        self,
        uri: str | None = None,
        rules: PinnabilityRules | None = None,
        numa_refresh_s: float = _numa.REFRESH_S,
    ) -> None:
        self.uri = uri or DEFAULT_URI
        if socket_paths(self.uri) is None and urlsplit(self.uri).hostname not in ("localhost", "127.0.0.1"):
            raise DriverError(
                f"libvirt URI {self.uri} is not local: adaptive-pin reads vCPU threads from /proc "
                "and must run on the hypervisor host"
            )
        self.rules = rules or PinnabilityRules()
        self._lv = _import_libvirt()
        _ensure_event_loop(self._lv)
        self._lock = threading.RLock()
        self._conn: Any = None
        self._lost = ""  # why the last connection ended
        self._backoff = Backoff()
        self._events: queue.Queue[GuestEvent] = queue.Queue()
        self._own_pins: dict[str, dict[int, CpuSet]] = {}  # guest uuid -> vCPU -> CPUs we applied
        # numa_maps is costly on big guests: read at most every numa_refresh_s (see _numa).
        self._numa_maps = _numa.NumaMapsCache(numa_refresh_s)
        self._connect()

    # --- connection ----------------------------------------------------------------------
    def _connect(self) -> None:
        lv = self._lv
        try:
            conn = lv.open(self.uri)
        except lv.libvirtError as exc:
            raise DriverError(f"cannot connect to libvirt at {self.uri}: {exc.get_error_message()}") from None
        try:
            conn.setKeepAlive(*KEEPALIVE)
            conn.registerCloseCallback(self._on_close, None)
            conn.domainEventRegisterAny(None, lv.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None)
            conn.domainEventRegisterAny(None, lv.VIR_DOMAIN_EVENT_ID_METADATA_CHANGE, self._on_metadata, None)
            conn.domainEventRegisterAny(None, lv.VIR_DOMAIN_EVENT_ID_TUNABLE, self._on_tunable, None)
        except lv.libvirtError as exc:
            conn.close()
            raise DriverError(
                f"libvirt at {self.uri}: cannot subscribe to events: {exc.get_error_message()}"
            ) from None
        self._conn = conn
        self._lost = ""
        self._backoff.reset()

    def _on_close(self, conn: Any, reason: int, _opaque: object) -> None:
        why = {
            self._lv.VIR_CONNECT_CLOSE_REASON_ERROR: "I/O error",
            self._lv.VIR_CONNECT_CLOSE_REASON_EOF: "libvirtd closed the connection",
            self._lv.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "keepalive timed out",
            self._lv.VIR_CONNECT_CLOSE_REASON_CLIENT: "closed by client",
        }.get(reason, f"reason {reason}")
        with self._lock:
            if self._conn is conn or self._conn is None:
                self._conn = None
                self._lost = why
        log.warning("lost the connection to libvirt at %s: %s", self.uri, why)

    def _connection(self) -> Any:
        """The live connection, reconnecting when due; DriverError while libvirtd is away."""
        with self._lock:
            if self._conn is not None:
                return self._conn
            now = time.monotonic()
            if not self._backoff.due(now):
                raise DriverError(
                    f"no connection to libvirt at {self.uri} ({self._lost}); "
                    f"reconnecting in {self._backoff.next_at - now:.1f}s"
                )
            try:
                self._connect()
            except DriverError as exc:
                delay = self._backoff.failed(now)
                raise DriverError(
                    f"{exc} (connection lost: {self._lost}); next try in {delay:.1f}s"
                ) from None
            log.info("reconnected to libvirt at %s", self.uri)
            return self._conn

    def _check_alive(self, conn: Any) -> None:
        """After an API error: a dead connection is the driver's problem, not the guest's."""
        try:
            alive = bool(conn.isAlive())
        except self._lv.libvirtError:
            alive = False
        if not alive:
            with self._lock:
                if self._conn is conn:
                    self._conn = None
                    self._lost = self._lost or "connection died"

    @property
    def connected(self) -> bool:
        return self._conn is not None

    # --- events --------------------------------------------------------------------------
    def _put(self, kind: EventKind, dom: Any) -> None:
        try:
            guest_id, name = dom.UUIDString(), dom.name()
        except self._lv.libvirtError:
            return
        self._events.put(GuestEvent(kind, guest_id, name, time.monotonic()))

    def _on_lifecycle(self, _conn: Any, dom: Any, event: int, _detail: int, _opaque: object) -> None:
        lv = self._lv
        if event == lv.VIR_DOMAIN_EVENT_STARTED:
            self._put(EventKind.STARTED, dom)
        elif event == lv.VIR_DOMAIN_EVENT_STOPPED:
            with self._lock:
                self._own_pins.pop(dom.UUIDString(), None)
            self._put(EventKind.STOPPED, dom)

    def _on_metadata(self, _conn: Any, dom: Any, _mtype: int, nsuri: str | None, _opaque: object) -> None:
        if nsuri in (None, NAMESPACE):
            self._put(EventKind.CHANGED, dom)

    def _on_tunable(self, _conn: Any, dom: Any, params: dict[str, Any], _opaque: object) -> None:
        """Someone re-pinned a vCPU (``cputune.vcpupin<N>``); our own pins echo here and are dropped."""
        with self._lock:
            own = self._own_pins.get(dom.UUIDString(), {})
        for key, value in params.items():
            if not key.startswith("cputune.vcpupin"):
                continue
            try:
                vcpu, cpus = int(key.removeprefix("cputune.vcpupin")), CpuSet.parse(str(value))
            except ValueError:
                vcpu, cpus = -1, CpuSet()
            if own.get(vcpu) != cpus:
                self._put(EventKind.CHANGED, dom)
                return

    def events(self, timeout: float) -> list[GuestEvent]:
        if self._conn is None:
            try:
                self._connection()
            except DriverError as exc:
                log.debug("%s", exc)
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

    # --- inventory -----------------------------------------------------------------------
    def inventory(self) -> Inventory:
        lv = self._lv
        conn = self._connection()
        try:
            domains = conn.listAllDomains(lv.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        except lv.libvirtError as exc:
            self._check_alive(conn)
            raise DriverError(
                f"libvirt at {self.uri}: cannot list domains: {exc.get_error_message()}"
            ) from None
        guests: list[Guest] = []
        errors: dict[str, str] = {}
        pids = _QemuPids()
        for dom in domains:
            label = "?"
            try:
                label = dom.name()
                guests.append(self._guest(dom, pids))
            except (GuestGoneError, psutil.NoSuchProcess) as exc:
                errors[label] = f"{label}: vanished during inventory ({exc})"
            except lv.libvirtError as exc:
                if exc.get_error_code() in (lv.VIR_ERR_NO_DOMAIN, lv.VIR_ERR_OPERATION_INVALID):
                    errors[label] = f"{label}: vanished during inventory ({exc.get_error_message()})"
                else:
                    self._check_alive(conn)
                    errors[label] = f"{label}: {exc.get_error_message()}"
            except (OSError, UnsafeXmlError, DriverError) as exc:
                errors[label] = f"{label}: {exc}"
        self._numa_maps.forget_except(g.pid for g in guests if g.pid is not None)
        return Inventory(guests=tuple(guests), errors=errors, time=time.monotonic())

    def _describe(self, dom: Any) -> _Described:
        lv = self._lv
        uuid, name = dom.UUIDString(), dom.name()
        live = parse_xml_safely(dom.XMLDesc(0), max_bytes=MAX_DOMAIN_XML_BYTES, what=f"{name} domain XML")
        if dom.isPersistent():
            config = parse_xml_safely(
                dom.XMLDesc(lv.VIR_DOMAIN_XML_INACTIVE),
                max_bytes=MAX_DOMAIN_XML_BYTES,
                what=f"{name} persistent domain XML",
            )
            foreign = xml_vcpupins(config)
        else:
            with self._lock:
                own = dict(self._own_pins.get(uuid, {}))
            foreign = {v: c for v, c in xml_vcpupins(live).items() if own.get(v) != c}
        pinnability = resolve(
            name=name,
            uuid=uuid,
            rules=self.rules,
            metadata=xml_metadata(live),
            orchestrator=f"<vcpupin> for vCPUs {sorted(foreign)}" if foreign else None,
        )
        return _Described(pinnability, bool(foreign), _numa.numatune_nodes(live))

    def _guest(self, dom: Any, pids: _QemuPids) -> Guest:
        uuid, name = dom.UUIDString(), dom.name()
        described = self._describe(dom)
        online = sorted(int(v[0]) for v in dom.vcpus()[0])
        pid = pids.find(self.uri, name, uuid)
        problem: str | None = None
        vcpus: list[VCpu] = []
        if pid is None:
            problem = "QEMU process not found (no pidfile, no process with its -uuid)"
        else:
            found = _threads.vcpu_threads_by_name(pid)
            missing = [i for i in online if i not in found.tids]
            if found.problem:
                problem = found.problem
            elif missing:
                problem = f"no thread named for vCPUs {missing} (libvirt reports them online)"
            else:
                vcpus = [_threads.read_vcpu(i, pid, found.tids[i]) for i in online]
        # The declared binding when there is one, else where the process's pages are.
        memory_nodes = described.memory_nodes
        if memory_nodes is None and pid is not None:
            memory_nodes = self._numa_maps.nodes(pid)
        return Guest(
            id=uuid,
            name=name,
            pid=pid,
            vcpus=tuple(vcpus),
            pinnability=described.pinnability,
            driver=self.name,
            memory_nodes=memory_nodes,
            memory_bound=described.memory_nodes is not None
            or (pid is not None and self._numa_maps.bound(pid)),
            orchestrator_pinned=described.orchestrator_pinned,
            problem=problem,
        )

    # --- pinning -------------------------------------------------------------------------
    def migrate_memory(self, guest: Guest, from_nodes: CpuSet, to_nodes: CpuSet) -> None:
        """migrate_pages(2) on the domain's QEMU: libvirt has no call for an unbound domain.

        A domain with ``<numatune>`` is bound (Guest.memory_bound) and refused: its nodeset is
        the operator's, and libvirt's cgroup ``cpuset.mems`` would refuse other nodes anyway.
        """
        conn = self._connection()
        with self._libvirt_call(conn, guest.name, "the domain lookup"):
            _, described = self._running(conn, guest, guest.name)  # opted out or bound since?
        fresh = replace(
            guest,
            pinnability=described.pinnability,
            memory_bound=guest.memory_bound or described.memory_nodes is not None,
        )
        _migrate.migrate_guest_memory(fresh, from_nodes, to_nodes, self._numa_maps)

    def pin(self, guest: Guest, vcpu: int, cpus: CpuSet) -> None:
        lv = self._lv
        what = f"{guest.name} vCPU {vcpu}"
        if not guest.pinnability.managed:
            raise PinError(f"refusing to pin {what}: not managed ({guest.pinnability.reason})")
        if not cpus:
            raise PinError(f"{what}: refusing an empty CPU set")
        conn = self._connection()
        with self._libvirt_call(conn, what, "pinVcpuFlags"):
            dom, described = self._running(conn, guest, what)
            # Defense in depth: the VM may have opted out since the inventory the caller holds.
            fresh = described.pinnability
            if not fresh.managed:
                raise PinError(f"refusing to pin {what}: not managed ({fresh.reason})")
            ncpus = int(conn.getCPUMap()[0])
            if max(cpus) >= ncpus:
                raise PinError(f"{what}: CPUs {cpus} beyond this host's {ncpus} CPUs")
            dom.pinVcpuFlags(vcpu, tuple(c in cpus for c in range(ncpus)), lv.VIR_DOMAIN_AFFECT_LIVE)
        with self._lock:
            self._own_pins.setdefault(guest.id, {})[vcpu] = cpus

    def _running(self, conn: Any, guest: Guest, what: str) -> tuple[Any, _Described]:
        """The guest's domain, running, and what its XML says now (not at the inventory)."""
        dom = conn.lookupByUUIDString(guest.id)
        if not dom.isActive():
            raise GuestGoneError(f"{what}: domain is not running")
        return dom, self._describe(dom)

    @contextlib.contextmanager
    def _libvirt_call(self, conn: Any, what: str, call: str) -> Iterator[None]:
        """libvirt's errors as this driver's: a domain gone is GuestGoneError, else PinError."""
        lv = self._lv
        try:
            yield
        except lv.libvirtError as exc:
            if exc.get_error_code() in (lv.VIR_ERR_NO_DOMAIN, lv.VIR_ERR_OPERATION_INVALID):
                raise GuestGoneError(f"{what}: {exc.get_error_message()}") from None
            self._check_alive(conn)
            raise PinError(f"{what}: libvirt refused {call}: {exc.get_error_message()}") from None
        except UnsafeXmlError as exc:
            raise PinError(f"{what}: {exc}") from None

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            self._lost = "closed by adaptive-pin"
        if conn is None:
            return
        with contextlib.suppress(self._lv.libvirtError):  # already dead: nothing left to release
            conn.unregisterCloseCallback()
            conn.close()


class _QemuPids:
    """Finds a domain's QEMU process: libvirt's pidfile, else one scan for ``-uuid`` per inventory."""

    def __init__(self) -> None:
        self._by_uuid: dict[str, int] | None = None

    @staticmethod
    def _pidfile(uri: str, name: str) -> str:
        if urlsplit(uri).path == "/session":
            config = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
            return f"{config}/libvirt/qemu/run/{name}.pid"
        return f"/run/libvirt/qemu/{name}.pid"

    def find(self, uri: str, name: str, uuid: str) -> int | None:
        with contextlib.suppress(OSError, ValueError, psutil.Error):  # stale or unreadable: scan
            with open(self._pidfile(uri, name)) as f:
                pid = int(f.read().strip())
            if parse_cmdline(psutil.Process(pid).cmdline()).uuid == uuid.lower():
                return pid
        if self._by_uuid is None:
            self._by_uuid = {}
            for proc in psutil.process_iter(["cmdline"]):
                argv = proc.info["cmdline"]
                if argv and is_qemu(argv) and (u := parse_cmdline(argv).uuid):
                    self._by_uuid[u] = proc.pid
        return self._by_uuid.get(uuid.lower())
