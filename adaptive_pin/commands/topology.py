"""``adaptive-pin topology``: show the host (or a shipped machine) as the policies see it."""

from __future__ import annotations

import argparse
import json
import sys

from adaptive_pin.errors import UsageError
from adaptive_pin.fixtures import fixture_names, fixture_root
from adaptive_pin.model import CpuListError, CpuSet
from adaptive_pin.topology import read_topology
from adaptive_pin.topology_view import topology_to_json, topology_to_text

ORDER = 10

DESCRIPTION = """\
Show the CPU topology adaptive-pin reads from sysfs: packages, NUMA nodes (with memory and
SLIT distances), last-level cache domains, cores and their SMT sibling PUs, and which PUs are
offline, isolated (isolcpus), reserved (--reserved) or outside this process's cgroup cpuset.
Where sysfs shows no L3, each package stands in as the LLC domain and the output says so.
"""

EPILOG = """\
examples:
  adaptive-pin topology
      this host, as a tree
  adaptive-pin topology --reserved 0,1
      ... keeping CPUs 0 and 1 for host housekeeping (they leave "usable")
  adaptive-pin topology --json | jq .llc_domains
      the LLC domains the policies place vCPUs by
  adaptive-pin topology --fixture 64amd64-4s2n4ca2co
      a shipped real machine (4-socket AMD Bulldozer)
  adaptive-pin topology --sysfs-root /tmp/dump
      a dump holding sys/devices/system/{cpu,node} (and proc/ for the cgroup)

shipped machines (--fixture):
  {names}
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    names = fixture_names()
    p = subparsers.add_parser(
        "topology",
        help="show packages, NUMA nodes, LLC domains, cores and SMT siblings",
        description=DESCRIPTION,
        epilog=EPILOG.replace("{names}", "\n  ".join(names) if names else "(none installed)"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--sysfs-root",
        metavar="DIR",
        help="read DIR/sys/devices/system/... and DIR/proc/... instead of / (default: /)",
    )
    src.add_argument("--fixture", metavar="NAME", help="read a shipped real machine's tree (names below)")
    p.add_argument(
        "--json", action="store_true", help="print JSON (the keys of hwloc-derived expected.json and more)"
    )
    p.add_argument(
        "--reserved",
        metavar="CPULIST",
        default="",
        help="CPUs kept for the host, e.g. 0-1 or 0,64 (cpuset(7) list format); never used for vCPUs",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        reserved = CpuSet.parse(args.reserved)
    except CpuListError as exc:
        raise UsageError(f"--reserved: {exc}") from None
    if args.sysfs_root == "":
        raise UsageError("--sysfs-root: empty path (leave the option out to read this host's /sys)")
    root = fixture_root(args.fixture) if args.fixture else (args.sysfs_root or "/")
    topo = read_topology(root, reserved=reserved)
    if args.json:
        json.dump(topology_to_json(topo), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(topology_to_text(topo, f"fixture {args.fixture}" if args.fixture else None))
    return 0
