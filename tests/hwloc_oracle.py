"""hwloc's reading of a sysfs tree, reduced to the keys of the fixtures' expected.json.

The shipped expected.json files were made with hwloc 2.9.0's ``lstopo-no-graphics --of xml``
(their ``hwloc.command``); this runs the same command, so any tree — this host's ``/``, a tree
that is not shipped — can be compared with the reader. Also a tool::

    python -m tests.hwloc_oracle ROOT     # print the keys as JSON (ROOT: / or an unpacked tree)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

LSTOPO = "lstopo-no-graphics"  # Debian: hwloc-nox


def available() -> bool:
    return shutil.which(LSTOPO) is not None


def _mask(text: str | None) -> set[int]:
    """hwloc's bitmap spelling: 0x-prefixed 32-bit words, most significant first."""
    value = 0
    for word in (text or "").split(","):
        w = word.strip().removeprefix("0x")
        value = (value << 32) | (int(w, 16) if w else 0)
    return {i for i in range(value.bit_length()) if value >> i & 1}


def lstopo_xml(root: Path) -> ET.Element:
    env = {
        **os.environ,
        "HWLOC_COMPONENTS": "linux,stop",
        "HWLOC_KEEP_NVIDIA_GPU_NUMA_NODES": "1",
    }
    if root.resolve() != Path("/"):
        env.update(HWLOC_FSROOT=str(root), HWLOC_THISSYSTEM="0")
    out = subprocess.run(
        [LSTOPO, "--of", "xml", "--no-io", "--disallowed", "-"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return ET.fromstring(out)


def reading(root: Path) -> dict[str, Any]:
    """The expected.json keys the reader is compared on, as hwloc sees ``root``."""
    objs = list(lstopo_xml(root).iter("object"))
    machine = next(o for o in objs if o.get("type") == "Machine")

    def of(kind: str) -> list[ET.Element]:
        return [o for o in objs if o.get("type") == kind]

    pus = sorted(int(o.get("os_index", "-1")) for o in of("PU"))
    online = set(pus)
    per_core = [sum(1 for p in core.iter("object") if p.get("type") == "PU") for core in of("Core")]

    def caches(level: int) -> list[list[int]]:
        # unified (0) or data (1) caches; hwloc sorts them by position, we by first PU
        sets = [sorted(_mask(o.get("cpuset")) & online) for o in of(f"L{level}Cache")]
        return sorted((s for s in sets if s), key=lambda s: s[0])

    nodes = sorted(of("NUMANode"), key=lambda o: int(o.get("os_index", "-1")))
    l3, l2 = caches(3), caches(2)
    return {
        "online_pus": len(pus),
        "pu_list": pus,
        "cores": len(per_core),
        "packages": len(of("Package")),
        "numa_nodes": len(nodes),
        "numa": {o.get("os_index"): sorted(_mask(o.get("cpuset")) & online) for o in nodes},
        "smt": any(n > 1 for n in per_core),
        "max_pus_per_core": max(per_core, default=0),
        "l3_domain_count": len(l3),
        "l3_domains": l3,
        "l2_domain_count": len(l2),
        "l2_domains": l2,
        "offline_pus": sorted(_mask(machine.get("complete_cpuset")) - _mask(machine.get("cpuset"))),
        "allowed_pus": sorted(_mask(machine.get("allowed_cpuset"))),
    }


if __name__ == "__main__":  # pragma: no cover
    for arg in sys.argv[1:] or ["/"]:
        print(json.dumps(reading(Path(arg)), indent=1))
