"""The reader on synthetic sysfs trees: kernel variants, broken files, cgroups, and this host."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

from adaptive_pin.errors import TopologyError
from adaptive_pin.model import CpuSet
from adaptive_pin.topology import read_topology
from adaptive_pin.topology_view import topology_to_json

CPU = "sys/devices/system/cpu"
NODE = "sys/devices/system/node"


def write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def synth(
    root: Path,
    *,
    packages: int = 2,
    cores: int = 2,
    threads: int = 2,
    lists: bool = True,
    maps: bool = True,
    caches: bool = True,
    nodes: bool = True,
    end: str = "\n",
) -> Path:
    """A Linux-numbered machine: cpu = thread * (packages * cores) + package * cores + core.

    One NUMA node, one 16 MiB L3 per package; a 1 MiB L2 and L1d/L1i per core.
    """
    per_thread = packages * cores
    n = per_thread * threads
    files: dict[str, str] = {f"{CPU}/online": f"0-{n - 1}{end}", f"{CPU}/possible": f"0-{n - 1}{end}"}

    def both(rel: str, cpus: CpuSet) -> None:
        if lists:
            files[f"{rel}_list" if not rel.endswith("map") else rel.replace("_map", "_list")] = (
                cpus.to_list() + end
            )
        if maps:
            files[rel] = cpus.to_mask() + end

    for cpu in range(n):
        core, pkg = cpu % cores, (cpu // cores) % packages
        thread_set = CpuSet(t * per_thread + pkg * cores + core for t in range(threads))
        pkg_set = CpuSet(t * per_thread + pkg * cores + c for t in range(threads) for c in range(cores))
        topo = f"{CPU}/cpu{cpu}/topology"
        files[f"{topo}/physical_package_id"] = f"{pkg}{end}"
        files[f"{topo}/core_id"] = f"{core}{end}"
        both(f"{topo}/thread_siblings", thread_set)
        both(f"{topo}/core_siblings", pkg_set)
        if caches:
            for idx, (level, ctype, size, shared) in enumerate(
                [
                    (1, "Data", "32K", thread_set),
                    (1, "Instruction", "32K", thread_set),
                    (2, "Unified", "1024K", thread_set),
                    (3, "Unified", "16384K", pkg_set),
                ]
            ):
                base = f"{CPU}/cpu{cpu}/cache/index{idx}"
                files[f"{base}/level"] = f"{level}{end}"
                files[f"{base}/type"] = f"{ctype}{end}"
                files[f"{base}/size"] = f"{size}{end}"
                files[f"{base}/id"] = f"{pkg if level == 3 else pkg * cores + core}{end}"
                both(f"{base}/shared_cpu_map", shared)
    if nodes:
        files[f"{NODE}/online"] = f"0{end}"
        files[f"{NODE}/possible"] = f"0{end}"
        files[f"{NODE}/node0/cpulist"] = f"0-{n - 1}{end}"
        files[f"{NODE}/node0/distance"] = f"10{end}"
        files[f"{NODE}/node0/meminfo"] = "Node 0 MemTotal:       16384 kB\nNode 0 MemFree: 1 kB\n"
    write(root, files)
    return root


def shape(root: Path) -> dict[str, object]:
    got = topology_to_json(read_topology(root))
    got.pop("root")
    return got


# --- kernel variants ----------------------------------------------------------------------------


def test_synthetic_two_socket_smt_machine(tmp_path: Path) -> None:
    t = read_topology(synth(tmp_path), reserved=CpuSet.of(0, 4))
    assert t.pus == tuple(range(8))
    assert t.cores[0] == CpuSet.of(0, 4)
    assert t.packages == (CpuSet.parse("0,1,4,5"), CpuSet.parse("2,3,6,7"))
    assert [d.cpus for d in t.l3] == list(t.packages)
    assert t.l3[0].size_bytes == 16 << 20
    assert t.l2[0].size_bytes == 1 << 20
    assert t.l3[1].kernel_id == 1
    assert t.llc_source == "L3"
    assert t.numa_nodes[0].memory_bytes == 16384 * 1024
    assert t.numa_nodes[0].distances == {0: 10}
    assert t.smt_siblings(4) == CpuSet.of(0, 4)
    assert t.llc_of(6).cpus == CpuSet.parse("2,3,6,7")
    assert t.usable == CpuSet.parse("1-3,5-7")
    assert t.notes == ()


def test_maps_only_and_lists_only_trees_read_the_same(tmp_path: Path) -> None:
    both = shape(synth(tmp_path / "both"))
    assert shape(synth(tmp_path / "maps", lists=False)) == both
    assert shape(synth(tmp_path / "lists", maps=False)) == both


def test_nul_bytes_and_missing_newlines_are_tolerated(tmp_path: Path) -> None:
    plain = shape(synth(tmp_path / "plain"))
    assert shape(synth(tmp_path / "nul", end="\n\x00")) == plain
    assert shape(synth(tmp_path / "bare", end="")) == plain


def test_no_cache_dirs_means_packages_as_llc(tmp_path: Path) -> None:
    t = read_topology(synth(tmp_path, caches=False))
    assert t.l2 == () and t.l3 == ()
    assert t.llc_source == "package"
    assert [d.cpus for d in t.llc] == list(t.packages)
    assert (t.pu_l2 == -1).all()
    assert any("no L3" in n for n in t.notes)


def test_no_node_dir_means_one_node_zero(tmp_path: Path) -> None:
    t = read_topology(synth(tmp_path, nodes=False))
    assert list(t.numa_nodes) == [0]
    assert t.numa_nodes[0].cpus == t.online
    assert (t.pu_node == 0).all()
    assert any("no NUMA information" in n for n in t.notes)


def test_without_cpu_online_offline_cpus_come_from_their_online_files(tmp_path: Path) -> None:
    synth(tmp_path, packages=1, cores=4, threads=1)
    (tmp_path / CPU / "online").unlink()
    write(tmp_path, {f"{CPU}/cpu2/online": "0\n", f"{CPU}/cpu3/online": "1\n"})
    t = read_topology(tmp_path)
    assert t.pus == (0, 1, 3)
    assert t.offline == CpuSet.of(2)
    assert t.cores == (CpuSet.of(0), CpuSet.of(1), CpuSet.of(3))


def test_missing_topology_dirs_give_one_core_per_pu_in_one_package(tmp_path: Path) -> None:
    write(tmp_path, {f"{CPU}/online": "0-3\n", **{f"{CPU}/cpu{c}/uevent": "" for c in range(4)}})
    t = read_topology(tmp_path)
    assert len(t.cores) == 4
    assert t.packages == (CpuSet.parse("0-3"),)
    assert any("no package information" in n for n in t.notes)
    assert t.llc_source == "package"


def test_isolated_cpus_are_not_usable(tmp_path: Path) -> None:
    synth(tmp_path)
    write(tmp_path, {f"{CPU}/isolated": "6-7\n"})
    t = read_topology(tmp_path)
    assert t.isolated == CpuSet.of(6, 7)
    assert t.usable == CpuSet.parse("0-5")


def test_cgroup_v2_cpuset_is_found_by_walking_up(tmp_path: Path) -> None:
    synth(tmp_path)
    write(
        tmp_path,
        {
            "proc/mounts": "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n",
            "proc/self/cgroup": "0::/machine.slice/vm.scope\n",
            "sys/fs/cgroup/cgroup.controllers": "cpuset cpu io memory\n",
            "sys/fs/cgroup/machine.slice/cpuset.cpus.effective": "2-5\n",
            "sys/fs/cgroup/machine.slice/vm.scope/cgroup.procs": "1\n",  # controller not enabled here
        },
    )
    t = read_topology(tmp_path)
    assert t.allowed == CpuSet.parse("2-5")
    assert t.usable == CpuSet.parse("2-5")


def test_cgroup_v2_without_cpuset_controller_allows_everything(tmp_path: Path) -> None:
    synth(tmp_path)
    write(
        tmp_path,
        {
            "proc/mounts": "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n",
            "proc/self/cgroup": "0::/user.slice\n",
            "sys/fs/cgroup/cgroup.controllers": "cpu io memory\n",
            "sys/fs/cgroup/user.slice/cpuset.cpus.effective": "0\n",
        },
    )
    assert read_topology(tmp_path).allowed == CpuSet.parse("0-7")


def test_cgroup_v1_cpuset_from_proc_self_cgroup(tmp_path: Path) -> None:
    synth(tmp_path)
    write(
        tmp_path,
        {
            "proc/mounts": "cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0\n"
            "cgroup /sys/fs/cgroup/cpuset cgroup rw,nosuid,cpuset 0 0\n",
            "proc/self/cgroup": "4:cpu,cpuacct:/other\n3:cpuset:/job7\n0::/\n",
            "sys/fs/cgroup/cpuset/cpuset.cpus": "0-7\n",
            "sys/fs/cgroup/cpuset/job7/cpuset.cpus": "1,3,9\n",  # 9 is not online
        },
    )
    t = read_topology(tmp_path)
    assert t.allowed == CpuSet.of(1, 3)
    assert any("/sys/fs/cgroup/cpuset/job7/cpuset.cpus" in n for n in t.notes)


def test_mount_point_escapes_are_decoded(tmp_path: Path) -> None:
    synth(tmp_path)
    write(
        tmp_path,
        {
            "proc/mounts": "none /my\\040cpuset cpuset rw 0 0\n",
            "proc/self/cpuset": "/\n",
            "my cpuset/cpus": "0-3\n",
        },
    )
    assert read_topology(tmp_path).allowed == CpuSet.parse("0-3")


def test_reserved_must_be_online(tmp_path: Path) -> None:
    synth(tmp_path)
    with pytest.raises(TopologyError, match=r"reserved CPUs 8,9 are not online"):
        read_topology(tmp_path, reserved=CpuSet.parse("0,8-9"))


# --- broken trees: one TopologyError naming the file ---------------------------------------------


def test_empty_tree(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match=rf"{tmp_path}/sys/devices/system/cpu: missing"):
        read_topology(tmp_path)


def test_tree_without_online_cpus(tmp_path: Path) -> None:
    write(tmp_path, {f"{CPU}/online": "\n"})
    with pytest.raises(TopologyError, match="no online CPU"):
        read_topology(tmp_path)


@pytest.mark.parametrize(
    ("rel", "text", "message"),
    [
        (f"{CPU}/online", "0-3,x\n", "bad cpulist"),
        (f"{CPU}/isolated", "7-1\n", "runs backwards"),
        (f"{CPU}/cpu1/topology/thread_siblings", "zz\n", "bad cpumask"),
        (f"{CPU}/cpu1/topology/physical_package_id", "one\n", "expected an integer"),
        (f"{CPU}/cpu2/cache/index2/level", "garbage\n", "expected an integer"),
        (f"{CPU}/cpu2/cache/index3/size", "lots\n", "cannot read cache size"),
        (f"{CPU}/cpu2/cache/index3/shared_cpu_map", "0,,1\n", "bad cpumask"),
        (f"{NODE}/node0/cpulist", "0-\n", "bad cpulist"),
        (f"{NODE}/node0/distance", "10 x\n", "distances as integers"),
        (f"{NODE}/node0/meminfo", "nothing here\n", "MemTotal"),
    ],
)
def test_malformed_file_is_named(tmp_path: Path, rel: str, text: str, message: str) -> None:
    synth(tmp_path)
    write(tmp_path, {rel: text})
    with pytest.raises(TopologyError) as err:
        read_topology(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / rel}: ")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_cgroup_file_with_garbage_is_named(tmp_path: Path) -> None:
    synth(tmp_path)
    write(
        tmp_path,
        {
            "proc/mounts": "none /dev/cpuset cpuset rw 0 0\n",
            "proc/self/cpuset": "/\n",
            "dev/cpuset/cpus": "all\n",
        },
    )
    with pytest.raises(TopologyError, match=rf"^{tmp_path}/dev/cpuset/cpus: bad cpulist"):
        read_topology(tmp_path)


def test_online_cpu_without_its_directory_is_named(tmp_path: Path) -> None:
    synth(tmp_path)
    write(tmp_path, {f"{CPU}/online": "0-8\n"})
    with pytest.raises(TopologyError, match=rf"^{tmp_path}/{CPU}/cpu8: missing, but cpu/online lists CPU 8"):
        read_topology(tmp_path)


def test_unreadable_file_is_named(tmp_path: Path) -> None:
    synth(tmp_path)
    (tmp_path / CPU / "online").unlink()
    (tmp_path / CPU / "online").mkdir()  # reading a directory fails even for root
    with pytest.raises(TopologyError, match=rf"^{tmp_path}/{CPU}/online: cannot read"):
        read_topology(tmp_path)


def test_binary_file_is_named(tmp_path: Path) -> None:
    synth(tmp_path)
    (tmp_path / CPU / "online").write_bytes(b"\xff\xfe0-7")
    with pytest.raises(TopologyError, match=rf"^{tmp_path}/{CPU}/online: not a text file"):
        read_topology(tmp_path)


# --- this machine -------------------------------------------------------------------------------


def test_this_host() -> None:
    t = read_topology("/")
    assert len(t.pus) == os.cpu_count()
    assert len(t.pus) == psutil.cpu_count(logical=True)
    # Affinity can be narrower than the cgroup (taskset), never wider.
    assert CpuSet(os.sched_getaffinity(0)) <= t.allowed
    physical = psutil.cpu_count(logical=False)
    if physical:  # psutil counts core_cpus_list sets: the same thing, without hwloc's AMD 15h fix
        assert len(t.cores) == physical
    assert t.llc and all(len(d.cpus) > 0 for d in t.llc)
    assert (t.pu_node >= 0).all() or any("no online NUMA node" in n for n in t.notes)


def test_positions_of_a_cpu_set_leave_offline_cpus_out() -> None:
    from adaptive_pin.fixtures import fixture_root

    topo = read_topology(fixture_root("offline-cpu0-node0"))  # CPUs 0-3 offline, 4-20 online
    pos = topo.positions(CpuSet.parse("0-5,20,999"))
    assert sorted(topo.pus[int(p)] for p in pos) == [4, 5, 20]
    assert len(topo.positions(CpuSet.parse("0-3"))) == 0
    assert sorted(topo.positions(topo.online).tolist()) == list(range(len(topo.pus)))
