"""Real guests for integration tests: a libvirt connection, tiny TCG domains, plain QEMU processes.

Every guest is named ``ap-test-<pid>-...`` and removed after the test (destroy + undefine,
kill), even when it fails. Leftovers of a test process that died are swept at session start;
guests of test processes still alive (another engineer's run) are never touched.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from adaptive_pin.model import CpuSet
from tests.conftest import require

URI = "qemu:///system"
PREFIX = f"ap-test-{os.getpid()}-"
_LEFTOVER = re.compile(r"^ap-test-(\d+)-")
QEMU = shutil.which("qemu-system-x86_64")


def _libvirt() -> Any:
    try:
        import libvirt
    except ImportError:
        return None
    return libvirt


def _pid_alive(pid: int) -> bool:
    return os.path.isdir(f"/proc/{pid}")


def free_port() -> int:
    """A loopback TCP port nobody listens on right now (for a server a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, step: float = 0.05) -> Any:
    """Poll until ``predicate()`` is truthy; fail naming ``what`` (setup waits, not measurements)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


class _Reconnecting:
    """A libvirt connection that reopens itself when libvirtd was restarted (the fault tests do).

    A client notices a dead daemon only when it next writes ("Broken pipe"), so a call that
    fails on the transport is retried once on a new connection.
    """

    _TRANSPORT = ("VIR_ERR_SYSTEM_ERROR", "VIR_ERR_RPC", "VIR_ERR_INVALID_CONN", "VIR_ERR_NO_CONNECT")

    def __init__(self, lv: Any) -> None:
        self._lv = lv
        self._conn = lv.open(URI)
        self._codes = {getattr(lv, c) for c in self._TRANSPORT if hasattr(lv, c)}

    def _reopen(self) -> None:
        self._conn = wait_for(lambda: _try_open(self._lv), 60, f"libvirtd at {URI} again")

    def __getattr__(self, name: str) -> Any:
        if not self._conn.isAlive():
            self._reopen()
        attr = getattr(self._conn, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return getattr(self._conn, name)(*args, **kwargs)
            except self._lv.libvirtError as exc:
                if exc.get_error_code() not in self._codes:
                    raise
                self._reopen()
                return getattr(self._conn, name)(*args, **kwargs)

        return call

    def close(self) -> None:
        if self._conn.isAlive():
            self._conn.close()


def _try_open(lv: Any) -> Any:
    try:
        return lv.open(URI)
    except lv.libvirtError:
        return None


@pytest.fixture(scope="session")
def libvirt_conn() -> Iterator[Any]:
    """A read-write connection to qemu:///system (run .ci/setup-libvirt.sh first)."""
    lv = _libvirt()
    require(lv is not None, "libvirt-python is not installed")
    from adaptive_pin.drivers.libvirt import available

    require(available(URI), f"libvirtd does not answer at {URI} (run .ci/setup-libvirt.sh)")
    conn = _Reconnecting(lv)
    for dom in conn.listAllDomains(0):
        m = _LEFTOVER.match(dom.name())
        if m and not _pid_alive(int(m.group(1))):
            _remove_domain(lv, dom)
    yield conn
    conn.close()


def _remove_domain(lv: Any, dom: Any) -> None:
    try:
        if dom.isActive():
            dom.destroy()
    except lv.libvirtError:
        pass
    try:
        if dom.isPersistent():
            dom.undefine()
    except lv.libvirtError:
        pass


@dataclass(frozen=True)
class DomainSpec:
    vcpus: int = 2
    memory_mib: int = 64
    metadata: str | None = None  # an element to put in <metadata>, e.g. pinnability.metadata_xml(...)
    vcpupin: dict[int, str] = field(default_factory=dict)  # vCPU -> cpulist, as Nova writes it
    paused: bool = True  # vCPU threads exist while paused and cost no CPU
    numatune: str | None = None  # the inside of <numatune>, e.g. "<memory mode='strict' nodeset='0'/>"


def domain_xml(name: str, spec: DomainSpec) -> str:
    meta = f"<metadata>{spec.metadata}</metadata>" if spec.metadata else ""
    pins = "".join(f"<vcpupin vcpu='{v}' cpuset='{c}'/>" for v, c in sorted(spec.vcpupin.items()))
    cputune = f"<cputune>{pins}</cputune>" if pins else ""
    numatune = f"<numatune>{spec.numatune}</numatune>" if spec.numatune else ""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuidlib.uuid4()}</uuid>
  <memory unit='MiB'>{spec.memory_mib}</memory>
  <vcpu placement='static'>{spec.vcpus}</vcpu>
  {meta}
  {cputune}
  {numatune}
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <on_poweroff>destroy</on_poweroff>
  <devices><emulator>{QEMU}</emulator></devices>
</domain>"""


@pytest.fixture
def make_domains(libvirt_conn: Any) -> Iterator[Callable[..., list[Any]]]:
    """Factory: ``make_domains(DomainSpec(...), ...)`` defines and starts one domain per spec.

    Returns the virDomain objects (names ``ap-test-<pid>-<n>``); all are destroyed and
    undefined after the test.
    """
    lv = _libvirt()
    made: list[Any] = []
    counter = iter(range(10_000))

    def make(*specs: DomainSpec) -> list[Any]:
        out = []
        for spec in specs or (DomainSpec(),):
            name = f"{PREFIX}{next(counter)}-{uuidlib.uuid4().hex[:6]}"
            dom = libvirt_conn.defineXML(domain_xml(name, spec))
            made.append(dom)
            dom.createWithFlags(lv.VIR_DOMAIN_START_PAUSED if spec.paused else 0)
            out.append(dom)
        return out

    yield make
    for dom in made:
        try:  # looked up again: libvirtd may have been restarted, and the old handle with it
            fresh = libvirt_conn.lookupByName(dom.name())
        except lv.libvirtError:
            continue
        _remove_domain(lv, fresh)


@dataclass
class QemuGuest:
    name: str
    uuid: str
    qmp: str
    proc: subprocess.Popen[bytes]
    vcpus: int

    @property
    def pid(self) -> int:
        return self.proc.pid


@pytest.fixture
def make_qemu() -> Iterator[Callable[..., QemuGuest]]:
    """Factory: ``make_qemu(vcpus=2, debug_threads=True)`` starts a plain QEMU (TCG, paused, no disk)
    with a QMP socket, and waits until its vCPU threads exist. Killed after the test."""
    require(QEMU is not None, "qemu-system-x86_64 is not installed")
    tmp = tempfile.mkdtemp(prefix="ap-test-qmp-")
    started: list[QemuGuest] = []
    counter = iter(range(10_000))

    def make(vcpus: int = 2, debug_threads: bool = True, paused: bool = True) -> QemuGuest:
        name = f"{PREFIX}q{next(counter)}-{uuidlib.uuid4().hex[:6]}"
        uuid = str(uuidlib.uuid4())
        qmp = os.path.join(tmp, f"{len(started)}.qmp")
        name_opt = f"guest={name},debug-threads=on" if debug_threads else f"guest={name}"
        argv = [
            str(QEMU), "-name", name_opt, "-uuid", uuid, "-qmp", f"unix:{qmp},server=on,wait=off",
            "-machine", "pc", "-accel", "tcg", "-smp", str(vcpus), "-m", "64",
            "-nographic", "-nodefaults", *(["-S"] if paused else []),
        ]  # fmt: skip
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        guest = QemuGuest(name, uuid, qmp, proc, vcpus)
        started.append(guest)
        wait_for(lambda: os.path.exists(qmp), 10, f"{name}'s QMP socket")
        # vCPU threads are created before the monitor listens, but check rather than trust it.
        wait_for(lambda: len(os.listdir(f"/proc/{proc.pid}/task")) > vcpus, 10, f"{name}'s threads")
        return guest

    yield make
    for g in started:
        if g.proc.poll() is None:
            g.proc.kill()
        g.proc.wait(timeout=10)
    shutil.rmtree(tmp, ignore_errors=True)


def host_numa_nodes() -> CpuSet:
    """The host's online NUMA nodes (node 0 alone on a machine without NUMA)."""
    try:
        with open("/sys/devices/system/node/online") as f:
            return CpuSet.parse(f.read())
    except OSError:
        return CpuSet.of(0)


def cpus_allowed(pid: int, tid: int) -> CpuSet:
    """The thread's Cpus_allowed_list from /proc/<pid>/task/<tid>/status: what the kernel enforces."""
    with open(f"/proc/{pid}/task/{tid}/status") as f:
        for line in f:
            if line.startswith("Cpus_allowed_list:"):
                return CpuSet.parse(line.split(":", 1)[1])
    raise AssertionError(f"no Cpus_allowed_list in /proc/{pid}/task/{tid}/status")
