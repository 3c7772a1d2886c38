"""Move a QEMU process's memory between NUMA nodes: migrate_pages(2), bound with ctypes.

The call moves every page of the process (guest RAM and QEMU's own) that sits on one of
``from_nodes`` to ``to_nodes``, keeping relative node offsets when both sets have several
nodes, and returns once the kernel has copied them. It needs CAP_SYS_NICE for another user's
process. Pages later faulted in land where the faulting vCPU runs (first touch), so once a VM's
vCPUs are pinned to a node, migrating what is already resident is all it takes: no memory
policy is set on the process (libvirt's ``<numatune>`` is the way to bind, and VMs that have
one are never migrated by this tool).

Python's os module does not export it and glibc has no wrapper (libnuma does, but is not
needed for one syscall), hence the raw ``syscall``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

from adaptive_pin.drivers._numa import NumaMapsCache
from adaptive_pin.errors import GuestGoneError, PinError
from adaptive_pin.model import CpuSet, Guest

# Numbers from the kernel's per-arch syscall tables (asm-generic for arm64 and riscv64).
SYSCALL_NUMBERS: dict[str, int] = {
    "x86_64": 256,
    "aarch64": 238,
    "arm64": 238,
    "riscv64": 238,
    "ppc64": 258,
    "ppc64le": 258,
    "s390x": 287,
}
_ULONG_BITS = ctypes.sizeof(ctypes.c_ulong) * 8

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _nodemask(nodes: CpuSet, words: int) -> ctypes.Array[ctypes.c_ulong]:
    mask = (ctypes.c_ulong * words)()
    for n in nodes:
        mask[n // _ULONG_BITS] |= 1 << (n % _ULONG_BITS)
    return mask


def migrate_pages(pid: int, from_nodes: CpuSet, to_nodes: CpuSet, *, name: str = "") -> int:
    """Move ``pid``'s pages on ``from_nodes`` to ``to_nodes``; the number of pages left behind.

    Raises GuestGoneError when the process is gone and PinError (one line, errno named) when the
    kernel refuses: EPERM without CAP_SYS_NICE, EINVAL for nodes that are offline or outside
    the process's cpuset (``cpuset.mems``), ENOSYS on a kernel without NUMA.
    """
    who = name or f"pid {pid}"
    if not from_nodes or not to_nodes:
        raise PinError(f"{who}: migrate memory: empty node set")
    nr = SYSCALL_NUMBERS.get(platform.machine())
    if nr is None:
        raise PinError(f"{who}: migrate memory: no migrate_pages syscall number for {platform.machine()}")
    bits = max(*from_nodes, *to_nodes) + 1
    words = (bits + _ULONG_BITS - 1) // _ULONG_BITS
    # maxnode counts bits and the kernel drops the last one (libnuma passes size + 1 too)
    left = _syscall(
        ctypes.c_long(nr),
        ctypes.c_int(pid),
        ctypes.c_ulong(words * _ULONG_BITS + 1),
        _nodemask(from_nodes, words),
        _nodemask(to_nodes, words),
    )
    if left < 0:
        err = ctypes.get_errno()
        if err == errno.ESRCH:
            raise GuestGoneError(f"{who}: process {pid} is gone")
        raise PinError(
            f"{who}: migrate memory {from_nodes.to_list()} -> {to_nodes.to_list()}: "
            f"{errno.errorcode.get(err, str(err))} ({os.strerror(err)})"
        )
    return int(left)


def migrate_guest_memory(
    guest: Guest, from_nodes: CpuSet, to_nodes: CpuSet, numa_maps: NumaMapsCache
) -> None:
    """The drivers' ``migrate_memory``: refuses what this tool must not touch, then migrates."""
    if not guest.pinnability.managed:
        raise PinError(f"refusing to migrate {guest.name}'s memory: not managed ({guest.pinnability.reason})")
    if guest.memory_bound:
        raise PinError(f"refusing to migrate {guest.name}'s memory: bound by its own configuration")
    if guest.pid is None:
        raise PinError(f"{guest.name}: no QEMU process id")
    migrate_pages(guest.pid, from_nodes, to_nodes, name=guest.name)
    numa_maps.forget(guest.pid)
