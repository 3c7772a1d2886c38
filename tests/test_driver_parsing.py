"""Driver pieces that need no hypervisor: QEMU command lines, backoff, /proc stat, flags, the table."""

from __future__ import annotations

import argparse
import os
import threading

import pytest

from adaptive_pin.commands._common import add_driver_arguments, open_driver_from_args, parse_qmp
from adaptive_pin.commands.status import COLUMNS, Column, StatusRow, render_table, rows_of
from adaptive_pin.drivers import _threads
from adaptive_pin.drivers.libvirt import Backoff, socket_paths, xml_vcpupins
from adaptive_pin.drivers.qemu import is_qemu, parse_cmdline, split_qemu_opts
from adaptive_pin.errors import UsageError
from adaptive_pin.model import CpuSet, Guest, Inventory, VCpu
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
