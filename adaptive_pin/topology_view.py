"""Render a Topology for people (an indented tree) and for programs (JSON).

The JSON carries every key of the fixtures' ``expected.json`` (hwloc's reading) with the same
meaning, so a test can compare the two directly, plus what the policies use (LLC domains,
usable PUs) and what the reader had to assume (``notes``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from adaptive_pin.model import CacheDomain, CpuSet, Topology


def _cache_json(domains: Iterable[CacheDomain]) -> list[dict[str, Any]]:
    return [
        {
            "index": d.index,
            "level": d.level,
            "cpus": list(d.cpus),
            "size_bytes": d.size_bytes,
            "id": d.kernel_id,
        }
        for d in domains
    ]


def topology_to_json(topo: Topology) -> dict[str, Any]:
    """A JSON-ready dict; counts include PUs the cgroup disallows, as hwloc's do."""
    sizes_per_core = [len(c) for c in topo.cores]
    return {
        "root": topo.root,
        "online_pus": len(topo.pus),
        "pu_list": list(topo.pus),
        "offline_pus": list(topo.offline),
        "cores": len(topo.cores),
        "core_list": [list(c) for c in topo.cores],
        "packages": len(topo.packages),
        "package_list": [list(p) for p in topo.packages],
        "numa_nodes": len(topo.numa_nodes),
        "numa": {str(nid): list(n.cpus) for nid, n in topo.numa_nodes.items()},
        "numa_memory_bytes": {str(nid): n.memory_bytes for nid, n in topo.numa_nodes.items()},
        "numa_distances": {
            str(nid): {str(k): v for k, v in sorted(n.distances.items())}
            for nid, n in topo.numa_nodes.items()
        },
        "smt": any(s > 1 for s in sizes_per_core),
        "max_pus_per_core": max(sizes_per_core, default=0),
        "l2_domain_count": len(topo.l2),
        "l2_domains": [list(d.cpus) for d in topo.l2],
        "l3_domain_count": len(topo.l3),
        "l3_domains": [list(d.cpus) for d in topo.l3],
        "llc_source": topo.llc_source,
        "llc_domains": [list(d.cpus) for d in topo.llc],
        "caches": {"l2": _cache_json(topo.l2), "l3": _cache_json(topo.l3), "llc": _cache_json(topo.llc)},
        "allowed_pus": list(topo.allowed),
        "isolated_pus": list(topo.isolated),
        "reserved_pus": list(topo.reserved),
        "usable_pus": list(topo.usable),
        "notes": list(topo.notes),
    }


def format_size(size: int | None) -> str:
    """1048576 -> "1 MiB"; None -> "size ?"."""
    if size is None:
        return "size ?"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size // scale} {unit}" if size % scale == 0 else f"{size / scale:.1f} {unit}"
    return f"{size} B"


def _pu_label(topo: Topology, cpu: int) -> str:
    marks = [
        name
        for name, cpus in (
            ("isolated", topo.isolated),
            ("reserved", topo.reserved),
        )
        if cpu in cpus
    ]
    if cpu not in topo.allowed:
        marks.append("disallowed")
    return f"PU {cpu}" + (f" ({', '.join(marks)})" if marks else "")


def _core_line(topo: Topology, core: CpuSet) -> str:
    l2 = _domain_containing(topo.l2, core.first())
    if l2 is None:
        l2_text = ""
    elif len(l2.cpus) > len(core):  # shared by cores: Bulldozer modules, E-core clusters
        l2_text = f"  [L2 {format_size(l2.size_bytes)}: {l2.cpus}]"
    else:
        l2_text = f"  [L2 {format_size(l2.size_bytes)}]"
    pus = ", ".join(_pu_label(topo, c) for c in core)
    return f"Core {core.first()}: {pus}{l2_text}"


def _domain_containing(domains: Iterable[CacheDomain], cpu: int) -> CacheDomain | None:
    for d in domains:
        if cpu in d.cpus:
            return d
    return None


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def topology_to_text(topo: Topology, source: str | None = None) -> str:
    """The tree ``lstopo`` users expect: package > NUMA node > L3 > core > PUs."""
    lines: list[str] = []
    online = topo.online
    summary = (
        f"{_count(len(topo.pus), 'PU')} online ({online}), {_count(len(topo.cores), 'core')}, "
        f"{_count(len(topo.packages), 'package')}, {_count(len(topo.numa_nodes), 'NUMA node')}, "
        f"{_count(len(topo.llc), 'LLC domain')}"
        + (" (the packages: no L3 in sysfs)" if topo.llc_source == "package" else " (L3)")
    )
    lines.append(f"Host topology from {source or topo.root}")
    lines.append(summary)
    node_of: dict[int, int | None] = {cpu: topo.node_of(cpu) for cpu in topo.pus}
    for pi, package in enumerate(topo.packages):
        lines.append(f"Package P#{pi} ({package})")
        node_ids = sorted({n for c in package if (n := node_of[c]) is not None})
        groups: list[tuple[str, CpuSet]] = [
            (_node_title(topo, nid), package & topo.numa_nodes[nid].cpus) for nid in node_ids
        ]
        homeless = CpuSet(c for c in package if node_of[c] is None)
        if homeless:
            groups.append(("no NUMA node", homeless))
        for title, cpus in groups:
            lines.append(f"  {title}")
            lines.extend(_llc_lines(topo, cpus, indent="    "))
    cpuless = [nid for nid, n in topo.numa_nodes.items() if not n.cpus]
    for nid in cpuless:
        lines.append(_node_title(topo, nid) + " (no CPUs)")
    if topo.offline:
        lines.append(f"Offline PUs: {topo.offline}")
    lines.append(
        f"Allowed (cgroup): {topo.allowed or '-'}   Isolated: {topo.isolated or '-'}   "
        f"Reserved: {topo.reserved or '-'}   Usable for vCPUs: {topo.usable or '-'}"
    )
    lines.extend(f"Note: {n}" for n in topo.notes)
    return "\n".join(lines)


def _node_title(topo: Topology, nid: int) -> str:
    node = topo.numa_nodes[nid]
    mem = f", {format_size(node.memory_bytes)}" if node.memory_bytes is not None else ""
    dist = ""
    if node.distances:
        dist = ", distances " + " ".join(f"{k}:{v}" for k, v in sorted(node.distances.items()))
    return f"NUMA node {nid}{mem}{dist}"


def _llc_lines(topo: Topology, cpus: CpuSet, indent: str) -> list[str]:
    lines: list[str] = []
    seen_llc: list[CacheDomain | None] = []
    for cpu in cpus:
        d = _domain_containing(topo.llc, cpu)
        if d not in seen_llc:
            seen_llc.append(d)
    for d in seen_llc:
        part = cpus if d is None else cpus & d.cpus
        if d is None:
            lines.append(f"{indent}(no LLC information)")
        elif topo.llc_source == "package":
            lines.append(f"{indent}LLC = the package (no L3 in sysfs): {d.cpus}")
        else:
            shared = "" if d.cpus <= cpus else f", shared with PUs {d.cpus - cpus} in other nodes"
            lines.append(f"{indent}L3 #{d.index} {format_size(d.size_bytes)} ({d.cpus}{shared})")
        for core in topo.cores:
            if core.first() in part or not core.isdisjoint(part):
                lines.append(f"{indent}  {_core_line(topo, core & part if not core <= part else core)}")
    return lines
