"""plan / apply / run / status end to end on real TCG guests under a real libvirtd and plain QEMU.

The guests run paused (their vCPU threads exist and cost nothing); the static ``pack`` policy
gives every managed vCPU a PU of its own, so the effect of each mode on the kernel's view of
each thread is known in advance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from adaptive_pin.drivers.libvirt import LibvirtDriver
from adaptive_pin.model import CpuSet, Guest
from adaptive_pin.pinnability import Hints, Mode, metadata_xml
from tests.integration.conftest import DomainSpec, cpus_allowed

pytestmark = pytest.mark.integration

OFF = metadata_xml(Hints(Mode.OFF))


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "adaptive_pin", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def _guests(names: set[str]) -> dict[str, Guest]:
    driver = LibvirtDriver()
    try:
        return {g.name: g for g in driver.inventory().guests if g.name in names}
    finally:
        driver.close()


def _allowed(g: Guest) -> dict[int, CpuSet]:
    assert g.pid is not None
    return {v.index: cpus_allowed(g.pid, v.tid) for v in g.vcpus if v.tid is not None}


def _only(doc_moves: list[dict[str, Any]], names: set[str]) -> list[dict[str, Any]]:
    return [m for m in doc_moves if m["vm"] in names]


def test_plan_advises_and_touches_nothing(make_domains: Any) -> None:
    managed, off = make_domains(DomainSpec(vcpus=2), DomainSpec(vcpus=2, metadata=OFF))
    names = {managed.name(), off.name()}
    before = {n: _allowed(g) for n, g in _guests(names).items()}
    p = _cli("plan", "--driver", "libvirt", "--policy", "pack", "--interval", "0.5", "--json")
    assert p.returncode == 0, p.stderr
    moves = _only(json.loads(p.stdout)["moves"], names)
    assert {m["vm"] for m in moves} == {managed.name()}  # the opted-out VM is never proposed
    assert {m["vcpu"] for m in moves} == {0, 1}
    after = {n: _allowed(g) for n, g in _guests(names).items()}
    assert after == before


def test_plan_under_auto_advises_on_libvirt_domains_and_plain_qemu_alike(
    make_domains: Any, make_qemu: Any
) -> None:
    (dom,) = make_domains(DomainSpec(vcpus=2))
    plain = make_qemu(vcpus=2)
    p = _cli("plan", "--driver", "auto", "--policy", "pack", "--interval", "0.5", "--json")
    assert p.returncode == 0, p.stderr
    moves = _only(json.loads(p.stdout)["moves"], {dom.name(), plain.name})
    assert {(m["vm"], m["vcpu"]) for m in moves} == {(n, v) for n in (dom.name(), plain.name) for v in (0, 1)}


def test_apply_pins_managed_vcpus_and_reports_them(make_domains: Any, libvirt_conn: Any) -> None:
    managed, off = make_domains(DomainSpec(vcpus=2), DomainSpec(vcpus=2, metadata=OFF))
    names = {managed.name(), off.name()}
    before = {n: _allowed(g) for n, g in _guests(names).items()}
    p = _cli("apply", "--driver", "libvirt", "--policy", "pack", "--interval", "0.5", "--json")
    assert p.returncode == 0, p.stderr
    applied = _only(json.loads(p.stdout)["applied"], names)
    assert {(m["vm"], m["vcpu"]) for m in applied} == {(managed.name(), 0), (managed.name(), 1)}
    now = _guests(names)
    pinned = _allowed(now[managed.name()])
    for m in applied:
        target = CpuSet.parse(m["to"])
        assert len(target) == 1 and pinned[m["vcpu"]] == target  # the kernel enforces it
        info = managed.vcpuPinInfo(0)[m["vcpu"]]
        assert CpuSet(i for i, on in enumerate(info) if on) == target  # and libvirt agrees
    assert _allowed(now[off.name()]) == before[off.name()]


def test_run_restores_original_affinity_on_exit(make_domains: Any, tmp_path: Path) -> None:
    (dom,) = make_domains(DomainSpec(vcpus=2))
    before = _allowed(_guests({dom.name()})[dom.name()])
    p = _cli(
        "run",
        "--driver",
        "libvirt",
        "--policy",
        "pack",
        "--interval",
        "0.5",
        "--ticks",
        "3",
        "--no-metrics",
        "--log-format",
        "plain",
        "--state-file",
        str(tmp_path / "state.json"),
        "--lock-file",
        str(tmp_path / "lock"),
    )
    assert p.returncode == 0, p.stderr
    assert f"move {dom.name()} vcpu" in p.stderr and f"restored {dom.name()} vcpu" in p.stderr
    assert _allowed(_guests({dom.name()})[dom.name()]) == before


def test_status_on_plain_qemu_shows_threads_and_says_what_is_missing(make_qemu: Any) -> None:
    guest = make_qemu(vcpus=2)
    p = _cli("status", "--driver", "qemu", "--sample", "0.5", "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    (g,) = [g for g in doc["guests"] if g["name"] == guest.name]
    assert g["pid"] == guest.pid and len(g["vcpus"]) == 2
    for v in g["vcpus"]:
        r = v["rates"]
        assert r["utilization"] is not None and 0 <= r["utilization"] <= 1.05
        if doc["capabilities"].get("llc_misses"):  # a host without a PMU, like CI's
            assert r["mpki"] is None and r["missing"]["mpki"].startswith("no PMU")
        else:
            assert r["mpki"] is not None


def test_status_shows_the_config_files_per_vm_override_as_the_daemon_would(
    make_qemu: Any, tmp_path: Path
) -> None:
    off, other = make_qemu(vcpus=1), make_qemu(vcpus=1)
    config = tmp_path / "config.toml"
    config.write_text(f'[[pinnability.vm]]\nname = "{off.name}"\nmode = "off"\n')
    p = _cli("status", "--driver", "qemu", "--sample", "0", "--json", "--config", str(config))
    assert p.returncode == 0, p.stderr
    by_name = {g["name"]: g["pinnability"] for g in json.loads(p.stdout)["guests"]}
    assert (by_name[off.name]["managed"], by_name[off.name]["source"]) == (False, "config")
    assert (by_name[other.name]["managed"], by_name[other.name]["source"]) == (True, "default")
