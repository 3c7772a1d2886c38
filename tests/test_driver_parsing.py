"""Driver pieces that need no hypervisor: QEMU command lines, backoff, /proc stat, flags, the table."""

from __future__ import annotations

import argparse
import json
import os
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pytest

from adaptive_pin import cli
from adaptive_pin.commands._common import add_driver_arguments, open_driver_from_args, parse_qmp, seconds
from adaptive_pin.commands.status import (
    COLUMNS,
    NOT_SAMPLED,
    Column,
    StatusRow,
    guest_json,
    rate_gaps,
    render_table,
    rows_of,
)
from adaptive_pin.drivers import _numa, _threads
from adaptive_pin.drivers.auto import CompositeDriver
from adaptive_pin.drivers.libvirt import Backoff, socket_paths, xml_vcpupins
from adaptive_pin.drivers.qemu import is_qemu, libvirt_pids, parse_cmdline, split_qemu_opts
from adaptive_pin.errors import DriverError, PinError, UsageError
from adaptive_pin.model import CpuSet, EventKind, Guest, GuestEvent, Inventory, VCpu, VCpuRates
from adaptive_pin.pinnability import PinnabilityRules, parse_xml_safely, resolve


def test_qemu_option_syntax() -> None:
    assert split_qemu_opts("guest=a,,b,debug-threads=on", "guest") == {"guest": "a,b", "debug-threads": "on"}
    assert split_qemu_opts("plain", "guest") == {"guest": "plain"}
    assert split_qemu_opts("4,sockets=2", "cpus") == {"cpus": "4", "sockets": "2"}


def test_qemu_command_lines() -> None:
    argv = ["/usr/bin/qemu-system-x86_64", "-name", "guest=web,debug-threads=on", "-uuid", "ABC", "-smp", "4"]
    cmd = parse_cmdline(argv)
    assert (cmd.name, cmd.uuid, cmd.debug_threads, cmd.smp) == ("web", "abc", True, 4)
    legacy = parse_cmdline(["qemu-kvm", "--name", "db", "-smp", "cpus=2,maxcpus=8"])
    assert (legacy.name, legacy.uuid, legacy.debug_threads, legacy.smp) == ("db", None, False, 2)
    assert parse_cmdline(["qemu-system-aarch64"]).smp == 1
    assert is_qemu(["/opt/bin/qemu-system-riscv64"]) and is_qemu(["qemu-kvm"])
    assert not is_qemu(["qemu-img"]) and not is_qemu(["python3", "qemu-system-x86_64"])


def test_backoff_is_capped_exponential_and_resets() -> None:
    b = Backoff(initial=0.5, cap=4.0)
    assert b.due(0.0)
    assert [b.failed(10.0) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert not b.due(13.9) and b.due(14.0)
    b.reset()
    assert b.due(0.0) and b.failed(0.0) == 0.5


def test_local_and_remote_uris() -> None:
    assert socket_paths("qemu:///system") == ["/run/libvirt/virtqemud-sock", "/run/libvirt/libvirt-sock"]
    assert socket_paths("qemu:///system?socket=/tmp/s") == ["/tmp/s"]
    assert socket_paths("qemu+ssh://host/system") is None


def test_vcpupin_and_vcpu_cpuset_count_as_orchestrator_pins() -> None:
    root = parse_xml_safely(
        "<domain><vcpu cpuset='2-3'>3</vcpu><cputune><vcpupin vcpu='0' cpuset='5'/></cputune></domain>",
        max_bytes=10_000,
        what="t",
    )
    assert xml_vcpupins(root) == {0: CpuSet.of(5), 1: CpuSet.of(2, 3), 2: CpuSet.of(2, 3)}
    assert xml_vcpupins(parse_xml_safely("<domain><vcpu>2</vcpu></domain>", max_bytes=100, what="t")) == {}


def test_last_cpu_and_threads_of_this_process() -> None:
    pid = os.getpid()
    names = _threads.task_names(pid)
    assert pid in names
    assert _threads.last_cpu(pid, pid) in os.sched_getaffinity(0)
    assert _threads.last_cpu(pid, 999_999_999) is None
    found = _threads.vcpu_threads_by_name(pid)
    assert found.tids == {} and found.problem is not None and "debug-threads" in found.problem


def test_vcpus_with_one_affinity_share_one_cpuset() -> None:
    pid = os.getpid()
    a, b = _threads.read_vcpu(0, pid, pid), _threads.read_vcpu(1, pid, pid)
    assert a.affinity == CpuSet(os.sched_getaffinity(0))
    assert a.affinity is b.affinity  # looked up by identity downstream, built once
    other = _threads.interned_affinity({0})
    assert other == CpuSet.of(0) and other is _threads.interned_affinity({0})


def test_last_cpu_and_names_survive_odd_comm_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """comm may hold ')' and bytes that are not UTF-8: field 39 is still found, the name still read."""
    task = tmp_path / "10/task/11"
    task.mkdir(parents=True)
    fields = ["S"] + ["0"] * 50
    fields[39 - 3] = "7"
    (task / "stat").write_bytes(b"11 (CPU 0/KVM) (\xff) " + " ".join(fields).encode() + b"\n")
    (task / "comm").write_bytes(b"CPU 0/KVM\xff\n")
    monkeypatch.setattr(_threads, "PROC", str(tmp_path))
    assert _threads.last_cpu(10, 11) == 7
    assert _threads.task_names(10) == {11: "CPU 0/KVM\ufffd"}
    assert _threads.last_cpu(10, 12) is None


def test_thread_names_identify_vcpus() -> None:
    """A thread named like QEMU's vCPU thread is found by index, with its real thread id."""
    ready, done = threading.Event(), threading.Event()
    tid: list[int] = []

    def vcpu() -> None:
        tid.append(threading.get_native_id())
        with open(f"/proc/self/task/{tid[0]}/comm", "w") as f:
            f.write("CPU 3/KVM")
        ready.set()
        done.wait(10)

    t = threading.Thread(target=vcpu, daemon=True)
    t.start()
    try:
        ready.wait(10)
        assert _threads.vcpu_threads_by_name(os.getpid()).tids == {3: tid[0]}
    finally:
        done.set()
        t.join()


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_driver_arguments(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--driver", "qemu", "--scenario", "x.toml"], "--scenario needs --driver sim"),
        (["--driver", "qemu", "--libvirt-uri", "qemu:///session"], "--libvirt-uri applies"),
        (["--driver", "sim", "--qmp", "a=/s"], "--qmp applies"),
        (["--driver", "qemu", "--qmp", "nosocket"], "NAME=SOCKET"),
    ],
)
def test_flags_that_do_not_fit_the_driver_are_usage_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        open_driver_from_args(_args(*argv))


def test_parse_qmp() -> None:
    assert parse_qmp(["a=/x", "b=/y=z"]) == {"a": "/x", "b": "/y=z"}


def _guest(name: str, vcpus: tuple[VCpu, ...], problem: str | None = None) -> Guest:
    p = resolve(name=name, uuid=None, rules=PinnabilityRules())
    return Guest(id=name, name=name, pid=1, vcpus=vcpus, pinnability=p, driver="qemu", problem=problem)


def test_table_has_a_row_per_vcpu_and_columns_can_be_added() -> None:
    inv = Inventory(
        guests=(
            _guest("b", (VCpu(0, 11, CpuSet.of(0, 1), 1), VCpu(1, 12, CpuSet.of(1), None))),
            _guest("a", (), problem="vCPU threads cannot be told apart"),
        )
    )
    rows = rows_of(inv)
    assert [(r.guest.name, r.vcpu and r.vcpu.index) for r in rows] == [("a", None), ("b", 0), ("b", 1)]
    lines = render_table(rows).splitlines()
    assert lines[0].split()[:4] == ["GUEST", "VCPU", "TID", "ALLOWED"]
    assert lines[1].split()[:5] == ["a", "-", "-", "-", "-"] and "cannot be told apart" in lines[1]
    assert lines[3].split()[:5] == ["b", "1", "12", "1", "-"]
    extra = [*COLUMNS, Column("MPKI", lambda r: "n/a" if r.rates is None else "?", right=True)]
    assert (
        render_table([StatusRow(inv.guests[0], inv.guests[0].vcpus[0])], extra)
        .splitlines()[1]
        .endswith("n/a")
    )


# --- memory NUMA nodes -----------------------------------------------------------------

NUMA_MAPS_TWO_NODES = """\
55ff58348000 default file=/usr/bin/qemu-system-x86_64 mapped=1031 N0=1031 kernelpagesize_kB=4
55ff94c42000 default heap anon=1097 dirty=1097 active=0 N0=1000 N1=97 kernelpagesize_kB=4
7f8ad4000000 bind:1 anon=262144 dirty=262144 N1=200000 N3=62144 kernelpagesize_kB=4
7f8ad8000000 default
7f9000000000 interleave:0-1 file=/dev/hugepages/pc.ram huge dirty=512 N0=256 N2=256 kernelpagesize_kB=2048
7ffd1c000000 default stack anon=33 dirty=33 N0=33 kernelpagesize_kB=4
"""


def test_numa_maps_sums_bytes_per_node_over_mappings() -> None:
    per_node = _numa.numa_maps_bytes(NUMA_MAPS_TWO_NODES)
    kib = {n: b // 1024 for n, b in per_node.items()}
    assert kib == {
        0: (1031 + 1000 + 33) * 4 + 256 * 2048,
        1: (97 + 200000) * 4,
        2: 256 * 2048,
        3: 62144 * 4,
    }
    # Shares: N0 ~ 33%, N1 ~ 49%, N2 ~ 32%... N3 ~ 15%: all >= 10%; at 20% only the big three.
    total = sum(per_node.values())
    assert all(b / total >= 0.10 for b in per_node.values())
    assert _numa.numa_maps_nodes(NUMA_MAPS_TWO_NODES) == CpuSet.of(0, 1, 2, 3)
    assert _numa.numa_maps_nodes(NUMA_MAPS_TWO_NODES, min_share=0.2) == CpuSet.of(0, 1, 2)


def test_numa_maps_leaves_out_nodes_with_a_small_share() -> None:
    text = "7f00 default anon=1000 N0=950 N1=50 kernelpagesize_kB=4\n7f01 default\n"
    assert _numa.numa_maps_nodes(text) == CpuSet.of(0)
    assert _numa.numa_maps_nodes("7f00 default\n7f01 default file=/x\n") is None
    assert _numa.numa_maps_nodes("") is None


def _xml(text: str) -> Any:
    return parse_xml_safely(text, max_bytes=10_000, what="t")


@pytest.mark.parametrize("mode", ["strict", "preferred", "interleave", "restrictive"])
def test_numatune_memory_nodeset_in_every_mode(mode: str) -> None:
    root = _xml(f"<domain><numatune><memory mode='{mode}' nodeset='1-2,5'/></numatune></domain>")
    assert _numa.numatune_nodes(root) == CpuSet.of(1, 2, 5)


def test_numatune_memnodes_add_up_and_unknown_stays_none() -> None:
    cells = _xml(
        "<domain><numatune><memory mode='strict' nodeset='0'/>"
        "<memnode cellid='0' mode='strict' nodeset='0'/><memnode cellid='1' mode='preferred' nodeset='3'/>"
        "</numatune></domain>"
    )
    assert _numa.numatune_nodes(cells) == CpuSet.of(0, 3)
    assert _numa.numatune_nodes(_xml("<domain><vcpu>2</vcpu></domain>")) is None
    assert (
        _numa.numatune_nodes(_xml("<domain><numatune><memory placement='auto'/></numatune></domain>")) is None
    )
    broken = _xml(
        "<domain><numatune><memory nodeset='0-x'/><memnode cellid='0' nodeset='1'/></numatune></domain>"
    )
    assert _numa.numatune_nodes(broken) == CpuSet.of(1)


def test_numa_maps_is_read_at_most_once_per_refresh_interval(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    proc = tmp_path / "4242"
    proc.mkdir()
    (proc / "stat").write_text("4242 (qemu-system-x86) S" + " 0" * 18 + " 777 0 0\n")
    maps = proc / "numa_maps"
    maps.write_text("7f00 default anon=10 N1=10 kernelpagesize_kB=4\n")
    monkeypatch.setattr(_numa, "PROC", str(tmp_path))
    now = [100.0]
    cache = _numa.NumaMapsCache(refresh_s=60.0, clock=lambda: now[0])
    assert cache.nodes(4242) == CpuSet.of(1)
    maps.write_text("7f00 default anon=10 N0=10 kernelpagesize_kB=4\n")
    now[0] = 159.0
    assert cache.nodes(4242) == CpuSet.of(1)  # cached: not re-read within the interval
    now[0] = 160.0
    assert cache.nodes(4242) == CpuSet.of(0)
    # A reused pid (another start time) is another process: read afresh at once.
    (proc / "stat").write_text("4242 (qemu-system-x86) S" + " 0" * 18 + " 999 0 0\n")
    maps.write_text("7f00 default anon=10 N2=10 kernelpagesize_kB=4\n")
    assert cache.nodes(4242) == CpuSet.of(2)
    assert cache.nodes(1) is None  # no such process: unknown
    cache.forget_except([])
    assert cache._cache == {}


def test_status_json_and_table_show_memory_nodes() -> None:
    p = resolve(name="a", uuid=None, rules=PinnabilityRules())
    g = Guest(
        id="a", name="a", pid=1, vcpus=(VCpu(0, 11, CpuSet.of(0)),), pinnability=p, driver="qemu",
        memory_nodes=CpuSet.of(0, 1),
    )  # fmt: skip
    unknown = replace(g, id="b", name="b", memory_nodes=None)
    assert guest_json(g)["memory_nodes"] == "0,1"
    assert guest_json(unknown)["memory_nodes"] is None
    lines = render_table(rows_of(Inventory(guests=(g, unknown)))).splitlines()
    header = lines[0].split()
    at = header.index("MEMNODES")
    assert lines[1].split()[at] == "0,1" and lines[2].split()[at] == "-"


# --- flags ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "-0.001", "1e400", "abc", ""])
def test_status_sample_must_be_finite_and_not_negative(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["status", "--driver", "sim", f"--sample={value}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if "error:" in ln]
    assert "--sample" in line and repr(value) in line


def test_status_sample_accepts_zero_and_fractions() -> None:
    assert seconds("0") == 0.0 and seconds("0.25") == 0.25 and seconds("2") == 2.0


def test_status_text_says_why_rates_are_missing(capsys: pytest.CaptureFixture[str]) -> None:
    """The simulator's first look has no elapsed time: JSON says "warming up", so must text."""
    assert cli.main(["status", "--driver", "sim", "--scenario", "demo", "--sample", "0.1", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    reasons = {r for g in doc["guests"] for v in g["vcpus"] for r in v["rates"]["missing"].values()}
    assert cli.main(["status", "--driver", "sim", "--scenario", "demo", "--sample", "0.1"]) == 0
    out = capsys.readouterr().out
    for why in reasons:
        assert why in out
    gaps = [ln for ln in out.splitlines() if ln.startswith("  -: ")]
    assert gaps and all("UTIL" in ln for ln in gaps)


def test_rate_gaps_skip_no_pmu_and_name_unsampled_vcpus() -> None:
    g = _guest("a", (VCpu(0, 11, CpuSet.of(0)), VCpu(1, 12, CpuSet.of(0))))
    rates = VCpuRates(
        utilization=0.5, run_delay=0.0,
        missing={"mpki": "no PMU: perf_event_open = ENOENT", "ipc": "no PMU: perf_event_open = ENOENT"},
    )  # fmt: skip
    rows = [StatusRow(g, g.vcpus[0], rates), StatusRow(g, g.vcpus[1], None)]
    assert rate_gaps(rows) == [f"  -: {NOT_SAMPLED} (UTIL, MPKI, IPC, DELAY; 1 vCPU)"]


def test_auto_with_a_libvirt_uri_means_libvirt_and_its_connect_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    uri = "qemu:///system?socket=/tmp/nonexist-adaptive-pin"
    with pytest.raises(DriverError, match="libvirt") as exc:
        open_driver_from_args(_args("--driver", "auto", "--libvirt-uri", uri))
    assert "applies to --driver libvirt" not in str(exc.value)
    rc = cli.main(["status", "--driver", "auto", "--libvirt-uri", uri, "--sample", "0"])
    err = capsys.readouterr().err
    assert rc == DriverError.exit_code
    assert err.count("\n") == 1 and "libvirt" in err and "not qemu" not in err
    with pytest.raises(UsageError, match="--qmp applies to --driver qemu, not libvirt"):
        open_driver_from_args(_args("--driver", "auto", "--libvirt-uri", uri, "--qmp", "a=/s"))


class _FakeDriver:
    def __init__(self, name: str, guests: tuple[Guest, ...], events: list[GuestEvent]) -> None:
        self.name, self.guests, self.queue = name, guests, events
        self.pins: list[tuple[str, int, CpuSet]] = []
        self.closed = False

    def inventory(self) -> Inventory:
        return Inventory(guests=self.guests, errors={f"{self.name}-err": "x"}, time=1.0)

    def pin(self, guest: Guest, vcpu: int, cpus: CpuSet) -> None:
        self.pins.append((guest.id, vcpu, cpus))

    def events(self, timeout: float) -> list[GuestEvent]:
        out, self.queue = self.queue, []
        return out

    def close(self) -> None:
        self.closed = True


def test_composite_merges_without_duplicates_and_routes_pins_and_events() -> None:
    def g(gid: str, pid: int | None, driver: str) -> Guest:
        return replace(_guest(gid, (VCpu(0, 1, CpuSet.of(0)),)), id=gid, pid=pid, driver=driver)

    lv = _FakeDriver("libvirt", (g("u1", 10, "libvirt"), g("u2", None, "libvirt")), [])
    # The QEMU of u1 (same pid) and of u2 (same uuid) slipped past exclude_libvirt: dropped.
    qm = _FakeDriver("qemu", (g("pid:10", 10, "qemu"), g("u2", 20, "qemu"), g("u3", 30, "qemu")), [])
    comp = CompositeDriver(libvirt=cast(Any, lv), qemu=cast(Any, qm))
    inv = comp.inventory()
    assert sorted((x.id, x.driver) for x in inv.guests) == [
        ("u1", "libvirt"),
        ("u2", "libvirt"),
        ("u3", "qemu"),
    ]
    assert set(inv.errors) == {"libvirt-err", "qemu-err"}
    by_id = {x.id: x for x in inv.guests}
    comp.pin(by_id["u1"], 0, CpuSet.of(1))
    comp.pin(by_id["u3"], 0, CpuSet.of(0))
    assert (lv.pins, qm.pins) == ([("u1", 0, CpuSet.of(1))], [("u3", 0, CpuSet.of(0))])
    with pytest.raises(PinError, match="sim"):
        comp.pin(replace(by_id["u3"], driver="sim"), 0, CpuSet.of(0))
    assert comp.events(0) == []
    lv.queue = [GuestEvent(EventKind.STARTED, "u4", "d", 1.0)]
    qm.queue = [GuestEvent(EventKind.STARTED, "u4", "d", 1.0), GuestEvent(EventKind.STOPPED, "u3", "q", 1.0)]
    assert [(e.kind, e.guest_id) for e in comp.events(0.5)] == [
        (EventKind.STARTED, "u4"),
        (EventKind.STOPPED, "u3"),
    ]  # a libvirt QEMU the watcher saw is reported once, by libvirt
    comp.close()
    assert lv.closed and qm.closed


def test_libvirt_pidfiles_are_read_and_driver_pid_skipped(tmp_path: Any) -> None:
    (tmp_path / "web.pid").write_text("1234\n")
    (tmp_path / "db.pid").write_text("garbage")
    (tmp_path / "driver.pid").write_text("1\n")
    (tmp_path / "web.xml").write_text("<domstatus/>")
    assert libvirt_pids([str(tmp_path), str(tmp_path / "missing")]) == {1234}
