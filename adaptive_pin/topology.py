"""Read a host's CPU topology from sysfs (under ``/`` or an unpacked fixture) into a Topology.

The reading follows hwloc's Linux backend where the kernel's files are ambiguous, so that the
shipped real-machine trees read the same as ``lstopo`` reads them:

- cores are ``core_cpus``/``thread_siblings`` sets and packages ``package_cpus``/``core_siblings``
  sets (``physical_package_id`` is only a label: POWER7 writes -1 there);
- caches come from ``shared_cpu_map`` (old kernels' ``shared_cpu_list`` can disagree with it);
- AMD family 15h compute units, which the kernel lists as thread siblings with distinct
  ``core_id``, count as two cores;
- the cgroup cpuset is read as hwloc reads it: ``cpuset.cpus.effective`` on cgroup v2,
  ``cpuset.cpus`` on v1, ``cpus`` on the legacy cpuset fs (or v1 mounted ``noprefix``).

Every file that is present but unreadable or malformed raises TopologyError naming it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adaptive_pin.errors import TopologyError
from adaptive_pin.model import CacheDomain, CpuListError, CpuSet, IntArray, LlcSource, NumaNode, Topology

SYS_CPU = "sys/devices/system/cpu"
SYS_NODE = "sys/devices/system/node"

_CPU_DIR = re.compile(r"^cpu(\d+)$")
_NODE_DIR = re.compile(r"^node(\d+)$")
_SIZE = re.compile(r"^(\d+)\s*([KMG]?)i?B?$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_AMD_FAMILY_15H = 0x15  # Bulldozer..Excavator: 2-core compute units


class _Tree:
    """Reads files under one root; every failure becomes a TopologyError naming the file."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, rel: str) -> Path:
        return self.root / rel

    def text(self, rel: str, *, required: bool = False) -> str | None:
        """The file's text without NULs and surrounding whitespace; None when absent and optional."""
        p = self.path(rel)
        try:
            raw = p.read_bytes()
        except FileNotFoundError:
            if required:
                raise TopologyError(f"{p}: missing") from None
            return None
        except OSError as exc:
            raise TopologyError(f"{p}: cannot read: {exc.strerror or exc}") from None
        try:
            return raw.replace(b"\x00", b"").decode("ascii").strip()
        except UnicodeDecodeError:
            raise TopologyError(f"{p}: not a text file") from None

    def cpus(self, rel: str, *, mask: bool = False, required: bool = False) -> CpuSet | None:
        body = self.text(rel, required=required)
        if body is None:
            return None
        try:
            return CpuSet.parse_mask(body) if mask else CpuSet.parse(body)
        except CpuListError as exc:
            raise TopologyError(f"{self.path(rel)}: {exc}") from None

    def cpus_either(self, mask_rel: str, list_rel: str) -> CpuSet | None:
        """A set the kernel writes twice; the mask wins, as in hwloc (old lists can be wrong)."""
        found = self.cpus(mask_rel, mask=True)
        return found if found is not None else self.cpus(list_rel)

    def integer(self, rel: str) -> int | None:
        body = self.text(rel)
        if body is None:
            return None
        try:
            return int(body)
        except ValueError:
            raise TopologyError(f"{self.path(rel)}: expected an integer, got {body[:40]!r}") from None

    def listdir(self, rel: str) -> list[str] | None:
        p = self.path(rel)
        try:
            return os.listdir(p)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise TopologyError(f"{p}: cannot list: {exc.strerror or exc}") from None


@dataclass
class _Cache:
    level: int
    cpus: CpuSet
    size_bytes: int | None
    kernel_id: int | None


def _partition(pus: Sequence[int], set_of: Callable[[int], CpuSet]) -> list[CpuSet]:
    """Groups from per-PU sets, each PU in exactly one, ordered by first PU.

    Sets the kernel writes are normally a partition already; when they overlap inconsistently
    the first PU to claim a CPU keeps it, so the result is always a partition.
    """
    taken: set[int] = set()
    groups: list[CpuSet] = []
    for pu in pus:
        if pu in taken:
            continue
        members = {c for c in set_of(pu) if c not in taken} | {pu}
        taken |= members
        groups.append(CpuSet(members))
    return sorted(groups, key=lambda g: g.first())


def _index_of(pus: Sequence[int], groups: Iterable[CpuSet]) -> IntArray:
    pos = {cpu: i for i, cpu in enumerate(pus)}
    out = np.full(len(pus), -1, dtype=np.int64)
    for gi, group in enumerate(groups):
        for cpu in group:
            if cpu in pos and out[pos[cpu]] < 0:
                out[pos[cpu]] = gi
    return out


def _parse_size(tree: _Tree, rel: str) -> int | None:
    body = tree.text(rel)
    if not body:
        return None
    m = _SIZE.match(body)
    if not m:
        raise TopologyError(f"{tree.path(rel)}: cannot read cache size {body[:40]!r}")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def _read_online(tree: _Tree) -> tuple[CpuSet, CpuSet, list[str]]:
    """Online PUs and offline ones (cpuN dirs that are not online)."""
    notes: list[str] = []
    entries = tree.listdir(SYS_CPU)
    if entries is None:
        raise TopologyError(f"{tree.path(SYS_CPU)}: missing (not a sysfs tree?)")
    dirs = CpuSet(int(m.group(1)) for e in entries if (m := _CPU_DIR.match(e)))
    online = tree.cpus(f"{SYS_CPU}/online")
    if online is None:
        # Old kernels: no cpu/online; cpu0 usually has no cpuN/online file (it cannot go offline).
        online = CpuSet(c for c in dirs if tree.integer(f"{SYS_CPU}/cpu{c}/online") != 0)
        notes.append("no cpu/online file: online PUs derived from the cpuN directories")
    if not online:
        raise TopologyError(f"{tree.path(SYS_CPU)}: no online CPU found")
    missing = online - dirs
    if missing:
        first = missing.first()
        raise TopologyError(
            f"{tree.path(f'{SYS_CPU}/cpu{first}')}: missing, but cpu/online lists CPU {first}"
        )
    return online, dirs - online, notes


def _is_amd_family_15h(tree: _Tree) -> bool:
    """hwloc's test for AMD compute units: the first processor in /proc/cpuinfo."""
    info = tree.text("proc/cpuinfo")
    if not info:
        return False
    vendor = family = None
    for line in info.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "vendor_id" and vendor is None:
            vendor = value.strip()
        elif key == "cpu family" and family is None:
            family = value.strip()
        if vendor is not None and family is not None:
            break
    return (
        vendor == "AuthenticAMD"
        and family is not None
        and family.isdigit()
        and int(family) == _AMD_FAMILY_15H
    )


def _read_cores(
    tree: _Tree, pus: tuple[int, ...], online: CpuSet, packages: Sequence[CpuSet], notes: list[str]
) -> list[CpuSet]:
    topo = {c: f"{SYS_CPU}/cpu{c}/topology" for c in pus}
    siblings: dict[int, CpuSet | None] = {}
    for c in pus:
        s = tree.cpus_either(f"{topo[c]}/core_cpus", f"{topo[c]}/core_cpus_list")
        if s is None:
            s = tree.cpus_either(f"{topo[c]}/thread_siblings", f"{topo[c]}/thread_siblings_list")
        siblings[c] = None if s is None else s & online
    core_id = {c: tree.integer(f"{topo[c]}/core_id") for c in pus}

    if _is_amd_family_15h(tree):
        split = False
        for c in pus:
            s = siblings[c]
            if s is not None and len({core_id[o] for o in s}) > 1:
                siblings[c] = CpuSet.of(c)
                split = True
        if split:
            notes.append(
                "AMD family 15h: the kernel lists each 2-core compute unit as thread siblings with "
                "distinct core_id; counted as 2 cores without SMT (as hwloc does)"
            )

    pkg_of = {c: i for i, p in enumerate(packages) for c in p}
    no_siblings = [c for c in pus if siblings[c] is None]
    if no_siblings:
        notes.append(
            f"no thread_siblings for PUs {CpuSet(no_siblings)}: cores grouped by package and core_id"
        )
        for c in no_siblings:
            cid = core_id[c]
            siblings[c] = (
                CpuSet.of(c)
                if cid is None
                else CpuSet(o for o in no_siblings if core_id[o] == cid and pkg_of[o] == pkg_of[c])
            )

    def set_of(c: int) -> CpuSet:
        s = siblings[c]
        return s if s is not None else CpuSet.of(c)

    return _partition(pus, set_of)


def _read_packages(tree: _Tree, pus: tuple[int, ...], online: CpuSet, notes: list[str]) -> list[CpuSet]:
    topo = {c: f"{SYS_CPU}/cpu{c}/topology" for c in pus}
    sets: dict[int, CpuSet | None] = {}
    for c in pus:
        s = tree.cpus_either(f"{topo[c]}/package_cpus", f"{topo[c]}/package_cpus_list")
        if s is None:
            s = tree.cpus_either(f"{topo[c]}/core_siblings", f"{topo[c]}/core_siblings_list")
        sets[c] = None if s is None else s & online
    ids = {c: tree.integer(f"{topo[c]}/physical_package_id") for c in pus}
    if any(i == -1 for i in ids.values()) and all(sets[c] is not None for c in pus):
        notes.append("physical_package_id is -1: packages are the core_siblings sets (as hwloc does)")
    lacking = [c for c in pus if sets[c] is None]
    if lacking:
        key = {c: i if i is not None and i >= 0 else None for c, i in ids.items()}
        by_id: dict[int | None, set[int]] = {}
        for c in lacking:
            by_id.setdefault(key[c], set()).add(c)
        for c in lacking:
            sets[c] = CpuSet(by_id[key[c]])
        if None in by_id:
            notes.append(f"no package information for PUs {CpuSet(by_id[None])}: assumed one package")
        else:
            notes.append(
                f"no core_siblings for PUs {CpuSet(lacking)}: packages grouped by physical_package_id"
            )

    def set_of(c: int) -> CpuSet:
        s = sets[c]
        return s if s is not None else CpuSet.of(c)

    return _partition(pus, set_of)


def _read_caches(
    tree: _Tree, pus: tuple[int, ...], online: CpuSet, cores: Sequence[CpuSet]
) -> dict[int, list[_Cache]]:
    """Per cache level (2, 3), the data/unified caches, one per distinct PU set."""
    core_of = {c: core for core in cores for c in core}
    per_pu: dict[int, dict[int, _Cache]] = {2: {}, 3: {}}
    for c in pus:
        base = f"{SYS_CPU}/cpu{c}/cache"
        entries = tree.listdir(base)
        if not entries:
            continue
        for name in sorted(entries, key=lambda n: (len(n), n)):
            if not name.startswith("index") or not name[5:].isdigit():
                continue
            idx = f"{base}/{name}"
            level = tree.integer(f"{idx}/level")
            if level not in per_pu:
                continue
            ctype = (tree.text(f"{idx}/type") or "Unified").lower()
            if ctype.startswith("instruction") or c in per_pu[level]:
                continue
            shared = tree.cpus_either(f"{idx}/shared_cpu_map", f"{idx}/shared_cpu_list")
            if shared is None:
                continue  # no sharing information at all: hwloc skips such a cache too
            if not shared:
                shared = core_of[c]  # ia64 writes empty maps; hwloc uses the core then
            per_pu[level][c] = _Cache(
                level=level,
                cpus=(shared & online) | CpuSet.of(c),
                size_bytes=_parse_size(tree, f"{idx}/size"),
                kernel_id=tree.integer(f"{idx}/id"),
            )
    return {level: _dedup_caches(level, caches) for level, caches in per_pu.items()}


def _dedup_caches(level: int, by_pu: dict[int, _Cache]) -> list[_Cache]:
    """One cache per distinct PU set (every PU of a shared cache reports the same cache)."""
    covered = tuple(sorted(by_pu))
    covered_set = CpuSet(covered)
    groups = _partition(covered, lambda c: by_pu[c].cpus & covered_set)
    return [_Cache(level, g, by_pu[g.first()].size_bytes, by_pu[g.first()].kernel_id) for g in groups]


def _read_numa(tree: _Tree, online: CpuSet, notes: list[str]) -> dict[int, NumaNode]:
    entries = tree.listdir(SYS_NODE)
    dirs = sorted(int(m.group(1)) for e in entries or () if (m := _NODE_DIR.match(e)))
    listed = tree.cpus(f"{SYS_NODE}/online")
    if not dirs and listed is None:
        notes.append("no NUMA information in sysfs: one node 0 holding all PUs (as hwloc does)")
        return {0: NumaNode(id=0, cpus=online, memory_bytes=None, distances={0: 10})}
    node_ids = list(listed) if listed is not None else dirs
    possible = tree.cpus(f"{SYS_NODE}/possible")
    nodes: dict[int, NumaNode] = {}
    for nid in node_ids:
        base = f"{SYS_NODE}/node{nid}"
        if nid not in dirs:
            notes.append(f"NUMA node {nid} is listed online but {tree.path(base)} is missing")
            nodes[nid] = NumaNode(id=nid, cpus=CpuSet())
            continue
        cpus = tree.cpus(f"{base}/cpulist")
        if cpus is None:
            cpus = tree.cpus(f"{base}/cpumap", mask=True) or CpuSet()
        nodes[nid] = NumaNode(
            id=nid,
            cpus=cpus & online,
            memory_bytes=_read_memtotal(tree, f"{base}/meminfo"),
            distances=_read_distances(tree, f"{base}/distance", node_ids, possible, dirs),
        )
    homeless = online - CpuSet(c for n in nodes.values() for c in n.cpus)
    if homeless:
        notes.append(f"PUs {homeless} belong to no online NUMA node")
    return nodes


def _read_memtotal(tree: _Tree, rel: str) -> int | None:
    body = tree.text(rel)
    if body is None:
        return None
    m = re.search(r"MemTotal:\s*(\d+)\s*kB", body)
    if not m:
        raise TopologyError(f"{tree.path(rel)}: no 'MemTotal: <n> kB' line")
    return int(m.group(1)) * 1024


def _read_distances(
    tree: _Tree, rel: str, online_nodes: Sequence[int], possible: CpuSet | None, dirs: Sequence[int]
) -> dict[int, int]:
    body = tree.text(rel)
    if not body:
        return {}
    try:
        values = [int(v) for v in body.split()]
    except ValueError:
        raise TopologyError(f"{tree.path(rel)}: expected distances as integers, got {body[:40]!r}") from None
    # The kernel writes one value per online node; some dumps kept a since-offlined node's column.
    for ids in (list(online_nodes), list(possible or ()), list(dirs)):
        if len(ids) == len(values):
            wanted = set(online_nodes)
            return {nid: d for nid, d in zip(ids, values, strict=True) if nid in wanted}
    return {}


# --- cgroup cpuset ------------------------------------------------------------------------


@dataclass(frozen=True)
class _CpusetMount:
    kind: str  # "cgroup2" | "cgroup1" | "cpuset-fs"
    mountpoint: str
    filename: str  # the file holding the CPUs this cgroup may use


def _unescape_mount(field: str) -> str:
    """/proc/mounts escapes space, tab, newline and backslash as octal (\\040 ...)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _find_cpuset_mount(tree: _Tree) -> _CpusetMount | None:
    mounts = tree.text("proc/mounts")
    if not mounts:
        return None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        mnt, fstype, options = _unescape_mount(fields[1]), fields[2], fields[3].split(",")
        if fstype == "cpuset":
            return _CpusetMount("cpuset-fs", mnt, "cpus")
        if fstype == "cgroup" and "cpuset" in options:
            return _CpusetMount("cgroup1", mnt, "cpus" if "noprefix" in options else "cpuset.cpus")
        if fstype == "cgroup2":
            controllers = tree.text(f"{mnt.lstrip('/')}/cgroup.controllers") or ""
            if "cpuset" in controllers.split():
                return _CpusetMount("cgroup2", mnt, "cpuset.cpus.effective")
    return None


def _cgroup_path(tree: _Tree, kind: str) -> str | None:
    table = tree.text("proc/self/cgroup")
    for line in (table or "").splitlines():
        _, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if kind == "cgroup2" and line.startswith("0::"):
            return path
        if kind != "cgroup2" and "cpuset" in controllers.split(","):
            return path
    return tree.text("proc/self/cpuset")


def _read_allowed(tree: _Tree, online: CpuSet, notes: list[str]) -> CpuSet:
    mount = _find_cpuset_mount(tree)
    if mount is None:
        return online
    path = _cgroup_path(tree, mount.kind)
    if path is None:
        notes.append(f"cpuset mounted at {mount.mountpoint} but this process's cgroup is unknown")
        return online
    # Walk up: on cgroup v2 the cpuset files exist only where the controller is enabled, and a
    # container may see a cgroup path that is not below its own mount.
    parts = [p for p in path.split("/") if p]
    for depth in range(len(parts), -1, -1):
        rel = "/".join([mount.mountpoint.strip("/"), *parts[:depth], mount.filename]).lstrip("/")
        cpus = tree.cpus(rel)
        if cpus is not None:
            allowed = cpus & online
            if allowed != online:
                notes.append(f"cgroup cpuset (/{rel}) allows only {allowed}")
            if not allowed:
                notes.append("the cgroup cpuset allows no online PU")
            return allowed
    notes.append(f"cpuset mounted at {mount.mountpoint} but no {mount.filename} found for {path}")
    return online


# --- the reader -----------------------------------------------------------------------------


def read_topology(root: str | Path = "/", reserved: CpuSet = CpuSet()) -> Topology:
    """Read ``<root>/sys/devices/system/{cpu,node}`` (and the cgroup cpuset) into a Topology."""
    tree = _Tree(Path(root))
    online, offline, notes = _read_online(tree)
    pus = tuple(online)

    packages = _read_packages(tree, pus, online, notes)
    cores = _read_cores(tree, pus, online, packages, notes)
    caches = _read_caches(tree, pus, online, cores)
    l2 = tuple(CacheDomain(i, 2, c.cpus, c.size_bytes, c.kernel_id) for i, c in enumerate(caches[2]))
    l3 = tuple(CacheDomain(i, 3, c.cpus, c.size_bytes, c.kernel_id) for i, c in enumerate(caches[3]))
    llc_source: LlcSource
    if l3:
        llc, llc_source = l3, "L3"
        uncovered = online - CpuSet(c for d in l3 for c in d.cpus)
        if uncovered:
            notes.append(f"PUs {uncovered} show no L3 in sysfs: they have no LLC domain")
    else:
        # Level 0 marks a stand-in: the package, not a cache the kernel described.
        llc = tuple(CacheDomain(i, 0, p) for i, p in enumerate(packages))
        llc_source = "package"
        notes.append("no L3 cache in sysfs: each package is taken as one LLC domain")

    numa = _read_numa(tree, online, notes)
    isolated = (tree.cpus(f"{SYS_CPU}/isolated") or CpuSet()) & online
    allowed = _read_allowed(tree, online, notes)
    if not reserved <= online:
        raise TopologyError(
            f"reserved CPUs {reserved - online} are not online on {tree.path(SYS_CPU)} (online: {online})"
        )

    node_groups = {nid: n.cpus for nid, n in numa.items()}
    pu_node = np.full(len(pus), -1, dtype=np.int64)
    pos = {cpu: i for i, cpu in enumerate(pus)}
    for nid in sorted(node_groups):
        for cpu in node_groups[nid]:
            if pu_node[pos[cpu]] < 0:
                pu_node[pos[cpu]] = nid

    return Topology(
        root=str(root),
        pus=pus,
        offline=offline,
        cores=tuple(cores),
        packages=tuple(packages),
        numa_nodes={nid: numa[nid] for nid in sorted(numa)},
        l2=l2,
        l3=l3,
        llc=llc,
        llc_source=llc_source,
        isolated=isolated,
        allowed=allowed,
        reserved=reserved,
        pu_core=_index_of(pus, cores),
        pu_package=_index_of(pus, packages),
        pu_l2=_index_of(pus, (d.cpus for d in l2)),
        pu_llc=_index_of(pus, (d.cpus for d in llc)),
        pu_node=pu_node,
        notes=tuple(notes),
    )
