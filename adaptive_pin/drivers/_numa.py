"""Which host NUMA nodes hold a guest's memory: its declared binding, else where the pages are.

Two sources, in order:

- libvirt's ``<numatune>`` (``<memory mode=strict|preferred|interleave|restrictive nodeset=..>``
  and per-cell ``<memnode nodeset=..>``): what the VM was told to use, see
  :func:`numatune_nodes`;
- ``/proc/<pid>/numa_maps`` of the QEMU process: where its resident pages actually are, see
  :func:`numa_maps_nodes`. A node counts when it holds at least ``MIN_SHARE`` of the pages.

Reading ``numa_maps`` is not free: the kernel walks the page tables of every mapping while
holding the process's mmap lock, so on a guest with hundreds of GiB it takes a noticeable
time and stalls the guest's own page faults meanwhile. :class:`NumaMapsCache` therefore reads it
at most once per ``refresh_s`` (default 2 minutes) per process; memory moves between nodes
slowly (only by NUMA balancing or migration), so a stale answer is a small loss.
"""

from __future__ import annotations

import re
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from adaptive_pin.model import CpuListError, CpuSet

PROC = "/proc"
MIN_SHARE = 0.10  # a node holding less of the guest's pages is noise (libraries, a stray page)
REFRESH_S = 120.0
_NODE_COUNT = re.compile(r"^N(\d+)=(\d+)$")
_PAGE_SIZE = re.compile(r"^kernelpagesize_kB=(\d+)$")


FIRST_TOUCH_POLICIES = ("default", "local")  # a mapping's policy that nobody chose


def _summary(text: str) -> tuple[dict[int, int], int]:
    """Bytes resident per node over every mapping of a ``numa_maps`` text, and how many of all
    those bytes sit in mappings with a memory policy of their own.

    Each line is one mapping: ``<addr> <policy> [file=..|heap|stack|huge] ... N0=12 N1=3
    kernelpagesize_kB=4``; ``N<node>=<pages>`` counts pages of that mapping's page size, so a
    hugetlbfs-backed guest RAM (2048 kB pages) weighs as much as it really holds. The policy is
    ``default`` (or ``local``) for first touch; ``bind:``, ``interleave:``, ``prefer:``
    (numactl, QEMU's ``host-nodes=``) are a choice somebody made.
    """
    per_node: dict[int, int] = {}
    bound = 0
    for line in text.splitlines():
        fields = line.split()
        counts: list[tuple[int, int]] = []
        page_kb = 4
        for tok in fields[2:]:
            if m := _NODE_COUNT.match(tok):
                counts.append((int(m.group(1)), int(m.group(2))))
            elif m := _PAGE_SIZE.match(tok):
                page_kb = int(m.group(1))
        size = 0
        for node, pages in counts:
            n_bytes = pages * page_kb * 1024
            per_node[node] = per_node.get(node, 0) + n_bytes
            size += n_bytes
        if fields[1:] and fields[1] not in FIRST_TOUCH_POLICIES:
            bound += size
    return per_node, bound


def _nodes_of(per_node: dict[int, int], min_share: float) -> CpuSet | None:
    total = sum(per_node.values())
    if total <= 0:
        return None
    return CpuSet(n for n, b in per_node.items() if b >= min_share * total)


def _is_bound(per_node: dict[int, int], bound: int) -> bool:
    total = sum(per_node.values())
    return total > 0 and 2 * bound > total


def numa_maps_bytes(text: str) -> dict[int, int]:
    """Bytes resident per node, summed over every mapping of a ``numa_maps`` text."""
    return _summary(text)[0]


def numa_maps_bound(text: str) -> bool:
    """True when most resident bytes sit in mappings with a memory policy of their own: a
    choice somebody made, which this tool does not undo by migrating the pages."""
    return _is_bound(*_summary(text))


def numa_maps_nodes(text: str, min_share: float = MIN_SHARE) -> CpuSet | None:
    """Nodes holding at least ``min_share`` of the resident bytes; None when nothing is resident."""
    return _nodes_of(_summary(text)[0], min_share)


def numatune_nodes(root: ET.Element) -> CpuSet | None:
    """Host nodes a libvirt domain's memory is bound to by ``<numatune>``; None when unset.

    Every mode counts (strict, restrictive, preferred, interleave): each names where the memory
    goes. ``placement='auto'`` without a nodeset (numad decides) leaves it unknown here.
    """
    tune = root.find("numatune")
    if tune is None:
        return None
    nodes: CpuSet | None = None
    for el in [tune.find("memory"), *tune.findall("memnode")]:
        if el is None or not el.get("nodeset"):
            continue
        try:
            found = CpuSet.parse(el.get("nodeset", ""))
        except CpuListError:
            continue
        nodes = found if nodes is None else nodes | found
    return nodes or None


@dataclass
class _Cached:
    start: float | None  # the process's start time: a reused pid is another process
    nodes: CpuSet | None
    read_at: float
    bound: bool = False


class NumaMapsCache:
    """``numa_maps_nodes`` of a process, read at most once per ``refresh_s`` (see module doc)."""

    def __init__(self, refresh_s: float = REFRESH_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.refresh_s = refresh_s
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[int, _Cached] = {}

    @staticmethod
    def _start_time(pid: int) -> float | None:
        try:
            with open(f"{PROC}/{pid}/stat") as f:
                return float(f.read().rpartition(")")[2].split()[22 - 3])
        except (OSError, IndexError, ValueError):
            return None

    def nodes(self, pid: int) -> CpuSet | None:
        return self._read(pid).nodes

    def bound(self, pid: int) -> bool:
        """Whether the process's memory carries a policy of its own (see numa_maps_bound)."""
        return self._read(pid).bound

    def _read(self, pid: int) -> _Cached:
        now = self._clock()
        start = self._start_time(pid)
        with self._lock:
            hit = self._cache.get(pid)
            if hit is not None and hit.start == start and now - hit.read_at < self.refresh_s:
                return hit
        try:
            with open(f"{PROC}/{pid}/numa_maps") as f:
                per_node, bound = _summary(f.read())  # one walk of the text for both answers
            entry = _Cached(start, _nodes_of(per_node, MIN_SHARE), now, _is_bound(per_node, bound))
        except OSError:  # gone, no permission, or a kernel without CONFIG_NUMA: unknown
            entry = _Cached(start, None, now)
        with self._lock:
            self._cache[pid] = entry
        return entry

    def forget(self, pid: int) -> None:
        """Read the process afresh next time (its pages were just migrated)."""
        with self._lock:
            self._cache.pop(pid, None)

    def forget_except(self, pids: Iterable[int]) -> None:
        """Drop processes no longer running (called after each inventory)."""
        keep = set(pids)
        with self._lock:
            for pid in [p for p in self._cache if p not in keep]:
                del self._cache[pid]
