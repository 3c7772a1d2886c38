"""The reader against hwloc's reading of 15 real machines (expected.json), key group by key group.

No expected differences remain: where hwloc corrects the kernel (AMD family 15h compute units,
POWER7's physical_package_id -1) the reader applies the same correction, and the test below
checks that it says so in ``notes``.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adaptive_pin.errors import UsageError
from adaptive_pin.fixtures import expected, fixture_names, fixture_root
from adaptive_pin.model import CpuSet, Topology
from adaptive_pin.topology import read_topology
from adaptive_pin.topology_view import topology_to_json

SHIPPED = [
    "128arm-2pa2n8cluster4co",
    "16amd64-8n2c-cpusets",
    "20em64t-hybrid-1p6c2t+2ca4co1t",
    "256ppc-8n8s4t",
    "32amd64-4s2n4c-cgroup2",
    "32intel64-2p8co2t+8ve",
    "40intel64-2g2n4c+pcilocality",
    "48amd64-4pa2n6c-sparse",
    "64amd64-4s2n4ca2co",
    "8em64t-4c2t",
    "96em64t-4no4pa3ca2co",
    "memorysidecaches",
    "nvidia-dgx-gb10",
    "nvidiagpunumanodes",
    "offline-cpu0-node0",
]

KEY_GROUPS = {
    "pus": ("online_pus", "pu_list", "offline_pus"),
    "cores": ("cores", "smt", "max_pus_per_core"),
    "packages": ("packages",),
    "numa": ("numa_nodes", "numa"),
    "l3": ("l3_domain_count", "l3_domains"),
    "l2": ("l2_domain_count", "l2_domains"),
    "allowed": ("allowed_pus",),
}

# Not shipped (util-linux dump, license unclear); tested when the shared folder is beside the repo.
EPYC = Path(__file__).resolve().parents[1].parent / "shared" / "topologies" / "x86_64-epyc_7451"


@cache
def _read(name: str) -> Topology:
    return read_topology(EPYC if name == EPYC.name else fixture_root(name))


def _expected(name: str) -> dict[str, Any]:
    if name == EPYC.name:
        data: dict[str, Any] = json.loads((EPYC / "expected.json").read_text())
        return data
    return expected(name)


def test_every_tree_of_the_issue_is_shipped() -> None:
    # A tree added to the folder (with its expected.json) is compared below like the rest.
    assert set(SHIPPED) <= set(fixture_names())


@pytest.mark.parametrize("group", sorted(KEY_GROUPS))
@pytest.mark.parametrize("name", fixture_names())
def test_matches_hwloc(name: str, group: str) -> None:
    got = topology_to_json(_read(name))
    want = _expected(name)
    for key in KEY_GROUPS[group]:
        assert got[key] == want[key], f"{name}: {key}"


@pytest.mark.parametrize("group", sorted(KEY_GROUPS))
def test_epyc_from_shared_folder_matches_hwloc(group: str) -> None:
    if not EPYC.is_dir():
        pytest.skip(f"{EPYC} not present (not shipped: util-linux dump without a clear license)")
    got = topology_to_json(_read(EPYC.name))
    want = _expected(EPYC.name)
    for key in KEY_GROUPS[group]:
        assert got[key] == want[key], key


@pytest.mark.parametrize("name", SHIPPED)
def test_index_arrays_agree_with_the_sets(name: str) -> None:
    t = _read(name)
    n = len(t.pus)
    for arr in (t.pu_core, t.pu_package, t.pu_l2, t.pu_llc, t.pu_node):
        assert arr.dtype == np.int64
        assert arr.shape == (n,)
    for pos, cpu in enumerate(t.pus):
        assert cpu in t.cores[t.pu_core[pos]]
        assert cpu in t.packages[t.pu_package[pos]]
        assert cpu in t.llc[t.pu_llc[pos]].cpus
        assert t.llc_of(cpu) is t.llc[t.pu_llc[pos]]
        if t.pu_l2[pos] >= 0:
            assert cpu in t.l2[t.pu_l2[pos]].cpus
        node = int(t.pu_node[pos])
        assert (node < 0) == (t.node_of(cpu) is None)
        if node >= 0:
            assert cpu in t.numa_nodes[node].cpus
    # Each level partitions the online PUs (the L2 may leave PUs out where sysfs has none).
    for groups in (t.cores, t.packages, tuple(d.cpus for d in t.llc)):
        assert sorted(c for g in groups for c in g) == list(t.pus)
    # Every core sits inside one package; every L2 inside one LLC domain.
    for core in t.cores:
        assert any(core <= p for p in t.packages)
    for d in t.l2:
        assert any(d.cpus <= llc.cpus for llc in t.llc)
    assert [d.index for d in t.llc] == list(range(len(t.llc)))
    assert t.usable == t.allowed - t.isolated - t.reserved


@pytest.mark.parametrize("name", SHIPPED)
def test_numa_distances_are_a_slit(name: str) -> None:
    t = _read(name)
    ids = set(t.numa_nodes)
    for nid, node in t.numa_nodes.items():
        if not node.distances:
            continue
        assert set(node.distances) == ids
        assert node.distances[nid] == min(node.distances.values())
        assert node.memory_bytes is None or node.memory_bytes > 0


def test_llc_falls_back_to_packages_without_l3() -> None:
    t = _read("16amd64-8n2c-cpusets")
    assert t.l3 == ()
    assert t.llc_source == "package"
    assert [d.cpus for d in t.llc] == list(t.packages)
    assert any("no L3" in n for n in t.notes)
    assert topology_to_json(t)["llc_domains"] == [list(p) for p in t.packages]


def test_llc_is_l3_where_sysfs_has_it() -> None:
    t = _read("memorysidecaches")
    assert t.llc_source == "L3"
    assert t.llc == t.l3
    assert all(d.size_bytes == 28160 * 1024 for d in t.l3)  # Xeon Gold 6230: 27.5 MiB per socket


def test_bulldozer_quirk_is_applied_and_explained() -> None:
    t = _read("64amd64-4s2n4ca2co")
    assert len(t.cores) == 64
    assert all(len(c) == 1 for c in t.cores)
    assert t.l2[0].cpus == CpuSet.of(0, 1)  # the module's shared L2
    assert any("AMD family 15h" in n for n in t.notes)


def test_power7_packages_come_from_core_siblings() -> None:
    t = _read("256ppc-8n8s4t")
    assert len(t.packages) == 64
    assert t.packages[0] == CpuSet.parse("0-3")
    assert any("physical_package_id is -1" in n for n in t.notes)


def test_offline_node_leaves_pus_without_node() -> None:
    t = _read("offline-cpu0-node0")
    assert list(t.numa_nodes) == [1]
    assert t.node_of(4) is None
    assert t.node_of(5) == 1
    assert 0 not in t.pus
    assert t.numa_nodes[1].distances == {1: 10}


def test_cpuless_gpu_nodes_are_kept() -> None:
    t = _read("nvidiagpunumanodes")
    assert list(t.numa_nodes) == [0, 8, 250, 251, 252, 253, 254, 255]
    assert t.numa_nodes[250].cpus == CpuSet()
    assert t.numa_nodes[250].memory_bytes == 15728640 * 1024
    assert t.numa_nodes[0].distances[8] == 40


def test_cgroup_restrictions_v1_v2_and_legacy() -> None:
    assert _read("32amd64-4s2n4c-cgroup2").allowed == CpuSet.parse("0-5")  # cgroup v2
    assert _read("16amd64-8n2c-cpusets").allowed == CpuSet.parse("0-3,5,6,12-15")  # /dev/cpuset
    assert _read("40intel64-2g2n4c+pcilocality").allowed == CpuSet.parse("0-39")  # v1 noprefix
    assert _read("128arm-2pa2n8cluster4co").allowed == CpuSet.parse("0-127")  # v1 cpuset.cpus


def test_fixture_root_is_stable_and_unknown_names_are_usage_errors() -> None:
    assert fixture_root("8em64t-4c2t") == fixture_root("8em64t-4c2t")
    assert (fixture_root("8em64t-4c2t") / "sys/devices/system/cpu/online").read_text().strip() == "0-7"
    with pytest.raises(UsageError, match="known: 128arm-2pa2n8cluster4co, "):
        fixture_root("no-such-machine")
    with pytest.raises(UsageError):
        expected("no-such-machine")


def test_fixture_root_unpacks_once_when_processes_race(tmp_path: Path) -> None:
    """Several processes asking at once all get the same complete tree, and no temp dir stays."""
    import subprocess
    import sys

    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    code = (
        "from adaptive_pin.fixtures import fixture_root; r = fixture_root('8em64t-4c2t');"
        "print(r, sum(1 for _ in r.rglob('*')))"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outs = {p.communicate()[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(outs) == 1
    path, count = outs.pop().split()
    assert int(count) > 300  # the whole tree, not a half-unpacked one
    assert Path(path).parent == tmp_path / "adaptive-pin" / "topologies"
    assert [p.name for p in Path(path).parent.iterdir()] == [Path(path).name]


def test_shipped_archives_are_small() -> None:
    from adaptive_pin.fixtures import FIXTURE_DIR

    total = sum(p.stat().st_size for p in FIXTURE_DIR.glob("*.tar.*"))
    print(f"fixture tarballs: {total / 1024:.0f} KiB for {len(SHIPPED)} machines (target: a few MB at most)")
    assert total < 2 * 1024 * 1024
