"""QEMU vCPU threads as /proc shows them: found by name, read, and pinned with sched_setaffinity.

Thread files are read under ``/proc/<pid>/task/<tid>/`` rather than ``/proc/<tid>/`` so a thread
id the kernel has since reused for another process is never mistaken for the vCPU.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass

from adaptive_pin.errors import GuestGoneError, PinError
from adaptive_pin.model import CpuSet, VCpu
from collectors.procfs import ProcParseError, processor_of_stat, read_small

PROC = "/proc"

# QEMU names vCPU threads "CPU <cpu_index>/<accel>" when started with -name ...,debug-threads=on
# (libvirt always passes it). Single-threaded TCG runs every vCPU on one "ALL CPUs/TCG" thread.
VCPU_THREAD = re.compile(r"^CPU (\d+)/([A-Za-z]+)$")
SINGLE_TCG_THREAD = "ALL CPUs/TCG"


@dataclass(frozen=True)
class VCpuThreads:
    """vCPU index -> thread id, or why the vCPU threads could not be told apart."""

    tids: dict[int, int]
    problem: str | None = None


def task_names(pid: int) -> dict[int, str]:
    """Thread id -> comm for every thread of ``pid``; GuestGoneError when the process is gone."""
    base = f"{PROC}/{pid}/task"
    try:
        tids = [int(t) for t in os.listdir(base)]
    except FileNotFoundError:
        raise GuestGoneError(f"QEMU process {pid} exited") from None
    names: dict[int, str] = {}
    for tid in tids:
        try:
            names[tid] = read_small(f"{base}/{tid}/comm").decode(errors="replace").rstrip("\n")
        except (FileNotFoundError, ProcessLookupError):
            continue  # a short-lived helper thread (e.g. a worker) ended while we listed
    if not names and not os.path.isdir(f"{PROC}/{pid}"):
        raise GuestGoneError(f"QEMU process {pid} exited")
    return names


def vcpu_threads_by_name(pid: int) -> VCpuThreads:
    """Find vCPU threads by QEMU's thread names; never guesses when the names do not tell."""
    names = task_names(pid)
    tids: dict[int, int] = {}
    for tid, comm in names.items():
        m = VCPU_THREAD.match(comm)
        if m:
            tids[int(m.group(1))] = tid
    if tids:
        return VCpuThreads(tids)
    if SINGLE_TCG_THREAD in names.values():
        return VCpuThreads(
            {}, "vCPU threads cannot be told apart: single-threaded TCG runs all vCPUs on one thread"
        )
    return VCpuThreads(
        {},
        "vCPU threads cannot be told apart: QEMU runs without -name ...,debug-threads=on "
        "(give its QMP socket with --qmp NAME=SOCKET)",
    )


def is_task_of(pid: int, tid: int) -> bool:
    return os.path.isdir(f"{PROC}/{pid}/task/{tid}")


def last_cpu(pid: int, tid: int) -> int | None:
    """Field 39 (``processor``) of /proc/<pid>/task/<tid>/stat; None when the thread is gone."""
    try:
        return processor_of_stat(read_small(f"{PROC}/{pid}/task/{tid}/stat"))
    except (FileNotFoundError, ProcessLookupError, ProcParseError):
        return None


# A host's vCPUs share a handful of affinities (everywhere, one LLC, one core): each is one
# CpuSet object, so a 512-CPU set is not rebuilt per vCPU per tick, and the policy's lookups
# by affinity match on identity instead of comparing every CPU.
_AFFINITIES: dict[frozenset[int], CpuSet] = {}
_AFFINITIES_MAX = 4096


def interned_affinity(cpus: set[int]) -> CpuSet:
    key = frozenset(cpus)
    found = _AFFINITIES.get(key)
    if found is None:
        if len(_AFFINITIES) >= _AFFINITIES_MAX:
            _AFFINITIES.clear()
        found = _AFFINITIES[key] = CpuSet(key)
    return found


def read_vcpu(index: int, pid: int, tid: int) -> VCpu:
    """A vCPU's current affinity and last CPU; GuestGoneError when its thread vanished."""
    try:
        affinity = interned_affinity(os.sched_getaffinity(tid))
    except ProcessLookupError:
        raise GuestGoneError(f"vCPU {index} thread {tid} of process {pid} exited") from None
    return VCpu(index=index, tid=tid, affinity=affinity, last_cpu=last_cpu(pid, tid))


def set_affinity(what: str, tid: int, cpus: CpuSet) -> None:
    """sched_setaffinity with errors in words; verifies the kernel applied exactly ``cpus``.

    The kernel silently intersects the request with the thread's cpuset cgroup (EINVAL only
    when nothing is left), so the result is read back rather than assumed.
    """
    if not cpus:
        raise PinError(f"{what}: refusing an empty CPU set")
    try:
        os.sched_setaffinity(tid, cpus.as_frozenset())
        applied = CpuSet(os.sched_getaffinity(tid))
    except ProcessLookupError:
        raise GuestGoneError(f"{what}: thread {tid} exited") from None
    except PermissionError:
        raise PinError(
            f"{what}: sched_setaffinity(thread {tid}) not permitted (needs CAP_SYS_NICE or the same user)"
        ) from None
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            raise PinError(
                f"{what}: sched_setaffinity(thread {tid}, {cpus}) = EINVAL: "
                "CPUs offline or outside the thread's cpuset cgroup"
            ) from None
        raise PinError(f"{what}: sched_setaffinity(thread {tid}, {cpus}): {exc.strerror}") from None
    if applied != cpus:
        raise PinError(
            f"{what}: asked for CPUs {cpus}, the kernel applied {applied} (its cpuset cgroup restricts it)"
        )
