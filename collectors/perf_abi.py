"""The perf_event_open(2) ABI, bound with ctypes: the attr struct, constants, the syscall.

Nothing here keeps state; :mod:`collectors.perf` builds groups on top. Layouts follow
``include/uapi/linux/perf_event.h`` (attr size PERF_ATTR_SIZE_VER8, 136 bytes; older kernels
accept a larger struct as long as the tail they do not know is zero, which it is).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import re
from dataclasses import dataclass

# --- syscall ---------------------------------------------------------------------------

# Not exported by Python's os module; numbers from the kernel's per-arch syscall tables.
SYSCALL_NUMBERS: dict[str, int] = {
    "x86_64": 298,
    "aarch64": 241,
    "arm64": 241,
    "ppc64": 319,
    "ppc64le": 319,
    "riscv64": 241,
    "s390x": 331,
}

# --- attr.type ---------------------------------------------------------------------------
PERF_TYPE_HARDWARE = 0
PERF_TYPE_SOFTWARE = 1
PERF_TYPE_TRACEPOINT = 2
PERF_TYPE_HW_CACHE = 3
PERF_TYPE_RAW = 4

# PERF_TYPE_HARDWARE configs
PERF_COUNT_HW_CPU_CYCLES = 0
PERF_COUNT_HW_INSTRUCTIONS = 1
PERF_COUNT_HW_CACHE_REFERENCES = 2
PERF_COUNT_HW_CACHE_MISSES = 3
PERF_COUNT_HW_BRANCH_INSTRUCTIONS = 4
PERF_COUNT_HW_BRANCH_MISSES = 5

# PERF_TYPE_SOFTWARE configs
PERF_COUNT_SW_CPU_CLOCK = 0
PERF_COUNT_SW_TASK_CLOCK = 1
PERF_COUNT_SW_PAGE_FAULTS = 2
PERF_COUNT_SW_CONTEXT_SWITCHES = 3
PERF_COUNT_SW_CPU_MIGRATIONS = 4

# PERF_TYPE_HW_CACHE: config = id | (op << 8) | (result << 16)
PERF_COUNT_HW_CACHE_LL = 2
PERF_COUNT_HW_CACHE_OP_READ = 0
PERF_COUNT_HW_CACHE_RESULT_ACCESS = 0
PERF_COUNT_HW_CACHE_RESULT_MISS = 1

# read_format
PERF_FORMAT_TOTAL_TIME_ENABLED = 1 << 0
PERF_FORMAT_TOTAL_TIME_RUNNING = 1 << 1
PERF_FORMAT_ID = 1 << 2
PERF_FORMAT_GROUP = 1 << 3
GROUP_READ_FORMAT = (
    PERF_FORMAT_GROUP | PERF_FORMAT_TOTAL_TIME_ENABLED | PERF_FORMAT_TOTAL_TIME_RUNNING | PERF_FORMAT_ID
)

PERF_FLAG_FD_CLOEXEC = 1 << 3

# ioctl: _IOR('$', 7, __u64) = (2 << 30) | (8 << 16) | (0x24 << 8) | 7
PERF_EVENT_IOC_ID = 0x80082407


class PerfEventAttr(ctypes.Structure):
    """``struct perf_event_attr``; the bitfields share one native u64 exactly as in C."""

    _fields_ = (
        ("type", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
        ("config", ctypes.c_uint64),
        ("sample_period", ctypes.c_uint64),  # union with sample_freq
        ("sample_type", ctypes.c_uint64),
        ("read_format", ctypes.c_uint64),
        ("disabled", ctypes.c_uint64, 1),
        ("inherit", ctypes.c_uint64, 1),
        ("pinned", ctypes.c_uint64, 1),
        ("exclusive", ctypes.c_uint64, 1),
        ("exclude_user", ctypes.c_uint64, 1),
        ("exclude_kernel", ctypes.c_uint64, 1),
        ("exclude_hv", ctypes.c_uint64, 1),
        ("exclude_idle", ctypes.c_uint64, 1),
        ("mmap", ctypes.c_uint64, 1),
        ("comm", ctypes.c_uint64, 1),
        ("freq", ctypes.c_uint64, 1),
        ("inherit_stat", ctypes.c_uint64, 1),
        ("enable_on_exec", ctypes.c_uint64, 1),
        ("task", ctypes.c_uint64, 1),
        ("watermark", ctypes.c_uint64, 1),
        ("precise_ip", ctypes.c_uint64, 2),
        ("mmap_data", ctypes.c_uint64, 1),
        ("sample_id_all", ctypes.c_uint64, 1),
        ("exclude_host", ctypes.c_uint64, 1),
        ("exclude_guest", ctypes.c_uint64, 1),
        ("exclude_callchain_kernel", ctypes.c_uint64, 1),
        ("exclude_callchain_user", ctypes.c_uint64, 1),
        ("mmap2", ctypes.c_uint64, 1),
        ("comm_exec", ctypes.c_uint64, 1),
        ("use_clockid", ctypes.c_uint64, 1),
        ("context_switch", ctypes.c_uint64, 1),
        ("write_backward", ctypes.c_uint64, 1),
        ("namespaces", ctypes.c_uint64, 1),
        ("ksymbol", ctypes.c_uint64, 1),
        ("bpf_event", ctypes.c_uint64, 1),
        ("aux_output", ctypes.c_uint64, 1),
        ("cgroup", ctypes.c_uint64, 1),
        ("text_poke", ctypes.c_uint64, 1),
        ("build_id", ctypes.c_uint64, 1),
        ("inherit_thread", ctypes.c_uint64, 1),
        ("remove_on_exec", ctypes.c_uint64, 1),
        ("sigtrap", ctypes.c_uint64, 1),
        ("reserved_1", ctypes.c_uint64, 26),
        ("wakeup_events", ctypes.c_uint32),
        ("bp_type", ctypes.c_uint32),
        ("config1", ctypes.c_uint64),  # union with bp_addr
        ("config2", ctypes.c_uint64),  # union with bp_len
        ("branch_sample_type", ctypes.c_uint64),
        ("sample_regs_user", ctypes.c_uint64),
        ("sample_stack_user", ctypes.c_uint32),
        ("clockid", ctypes.c_int32),
        ("sample_regs_intr", ctypes.c_uint64),
        ("aux_watermark", ctypes.c_uint32),
        ("sample_max_stack", ctypes.c_uint16),
        ("reserved_2", ctypes.c_uint16),
        ("aux_sample_size", ctypes.c_uint32),
        ("reserved_3", ctypes.c_uint32),
        ("sig_data", ctypes.c_uint64),
        ("config3", ctypes.c_uint64),
    )


PERF_ATTR_SIZE = ctypes.sizeof(PerfEventAttr)


# --- event names ---------------------------------------------------------------------------


@dataclass(frozen=True)
class EventSpec:
    """An event as perf_event_open wants it: type and config words."""

    name: str
    type: int
    config: int
    config1: int = 0
    config2: int = 0

    @property
    def hardware(self) -> bool:
        """Needs a PMU (everything but software events and tracepoints)."""
        return self.type not in (PERF_TYPE_SOFTWARE, PERF_TYPE_TRACEPOINT)


def _cache(op: int, result: int) -> int:
    return PERF_COUNT_HW_CACHE_LL | (op << 8) | (result << 16)


# perf's own spellings (`perf list`) for the generic events.
GENERIC_EVENTS: dict[str, tuple[int, int]] = {
    "cycles": (PERF_TYPE_HARDWARE, PERF_COUNT_HW_CPU_CYCLES),
    "cpu-cycles": (PERF_TYPE_HARDWARE, PERF_COUNT_HW_CPU_CYCLES),
    "instructions": (PERF_TYPE_HARDWARE, PERF_COUNT_HW_INSTRUCTIONS),
    "cache-references": (PERF_TYPE_HARDWARE, PERF_COUNT_HW_CACHE_REFERENCES),
    "cache-misses": (PERF_TYPE_HARDWARE, PERF_COUNT_HW_CACHE_MISSES),
    "branch-instructions": (PERF_TYPE_HARDWARE, PERF_COUNT_HW_BRANCH_INSTRUCTIONS),
    "branch-misses": (PERF_TYPE_HARDWARE, PERF_COUNT_HW_BRANCH_MISSES),
    "LLC-loads": (
        PERF_TYPE_HW_CACHE,
        _cache(PERF_COUNT_HW_CACHE_OP_READ, PERF_COUNT_HW_CACHE_RESULT_ACCESS),
    ),
    "LLC-load-misses": (
        PERF_TYPE_HW_CACHE,
        _cache(PERF_COUNT_HW_CACHE_OP_READ, PERF_COUNT_HW_CACHE_RESULT_MISS),
    ),
    "cpu-clock": (PERF_TYPE_SOFTWARE, PERF_COUNT_SW_CPU_CLOCK),
    "task-clock": (PERF_TYPE_SOFTWARE, PERF_COUNT_SW_TASK_CLOCK),
    "page-faults": (PERF_TYPE_SOFTWARE, PERF_COUNT_SW_PAGE_FAULTS),
    "context-switches": (PERF_TYPE_SOFTWARE, PERF_COUNT_SW_CONTEXT_SWITCHES),
    "cs": (PERF_TYPE_SOFTWARE, PERF_COUNT_SW_CONTEXT_SWITCHES),
    "cpu-migrations": (PERF_TYPE_SOFTWARE, PERF_COUNT_SW_CPU_MIGRATIONS),
    "migrations": (PERF_TYPE_SOFTWARE, PERF_COUNT_SW_CPU_MIGRATIONS),
}

_RAW = re.compile(r"^r([0-9a-fA-F]{1,16})$")


def parse_builtin(name: str) -> EventSpec | None:
    """A generic perf event name or a raw ``rNNNN``; None when it needs libpfm4."""
    if name in GENERIC_EVENTS:
        type_, config = GENERIC_EVENTS[name]
        return EventSpec(name, type_, config)
    m = _RAW.match(name)
    if m:
        return EventSpec(name, PERF_TYPE_RAW, int(m.group(1), 16))
    return None


# --- the syscall ---------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_ioctl = _libc.ioctl
_ioctl.restype = ctypes.c_int
_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)


def syscall_number(machine: str | None = None) -> int:
    arch = machine or platform.machine()
    try:
        return SYSCALL_NUMBERS[arch]
    except KeyError:
        raise OSError(errno.ENOSYS, f"perf_event_open: syscall number unknown for {arch}") from None


_NR = SYSCALL_NUMBERS.get(platform.machine(), -1)


def perf_event_open(attr: PerfEventAttr, tid: int, cpu: int = -1, group_fd: int = -1, flags: int = 0) -> int:
    """The raw syscall; raises OSError with the kernel's errno."""
    if _NR < 0:
        syscall_number()  # raises ENOSYS with the arch named
    fd = _syscall(
        ctypes.c_long(_NR),
        ctypes.byref(attr),
        ctypes.c_int(tid),
        ctypes.c_int(cpu),
        ctypes.c_int(group_fd),
        ctypes.c_ulong(flags | PERF_FLAG_FD_CLOEXEC),
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(fd)


def event_id(fd: int) -> int:
    """The kernel's id for an event fd (PERF_EVENT_IOC_ID), as reported by PERF_FORMAT_ID."""
    out = ctypes.c_uint64(0)
    if _ioctl(fd, PERF_EVENT_IOC_ID, ctypes.byref(out)) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(out.value)
