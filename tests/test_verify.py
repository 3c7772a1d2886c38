"""The verify step: before/after MPKI windows and rollback verdicts."""

from __future__ import annotations

import pytest

from adaptive_pin.fixtures import fixture_root
from adaptive_pin.model import (
    CpuSet,
    Guest,
    Move,
    Pinnability,
    PinSource,
    Snapshot,
    Topology,
    VCpu,
    VCpuRates,
    Verdict,
)
from adaptive_pin.topology import read_topology
from adaptive_pin.verify import MoveJournal, VerifySettings


@pytest.fixture(scope="module")
def topo() -> Topology:
    return read_topology(fixture_root("8em64t-4c2t"))


GUEST = Guest("g1", "vm1", 1, (VCpu(0, 10, CpuSet.of(1)),), Pinnability(True, PinSource.DEFAULT), "t")
MOVE = Move("g1", "vm1", 0, CpuSet.of(1), CpuSet.of(2), "test", 1.0)


def _snap(topo: Topology, t: float, mpki: float | None, guests: tuple[Guest, ...] = (GUEST,)) -> Snapshot:
    rates = {("g1", 0): VCpuRates(mpki=mpki)} if guests else {}
    return Snapshot(time=t, topology=topo, guests=guests, rates=rates)


def _run(topo: Topology, before: list[float | None], after: list[float | None]) -> list[Verdict]:
    j = MoveJournal(VerifySettings(window_ticks=3, settle_ticks=1, rollback_margin=0.1))
    t = 0
    for m in before:
        assert j.observe(_snap(topo, t, m)) == []
        t += 1
    j.record(MOVE, t)
    verdicts = []
    for m in after:
        verdicts += [o.verdict for o in j.observe(_snap(topo, t, m))]
        t += 1
    return verdicts


def test_better_after_is_kept_with_its_ratio(topo: Topology) -> None:
    j = MoveJournal(VerifySettings(window_ticks=2, settle_ticks=1))
    for t, m in enumerate((10.0, 10.0)):
        j.observe(_snap(topo, t, m))
    j.record(MOVE, 2)
    outs = [o for t, m in enumerate((99.0, 5.0, 5.0), start=2) for o in j.observe(_snap(topo, t, m))]
    # the settle tick (99) is not counted
    assert len(outs) == 1 and outs[0].verdict is Verdict.KEPT
    assert outs[0].mpki_before == 10 and outs[0].mpki_after == 5 and outs[0].ratio == 0.5


def test_worse_after_is_rolled_back_and_remembered(topo: Topology) -> None:
    assert _run(topo, [5, 5, 5], [5, 8, 8, 8]) == [Verdict.ROLLED_BACK]


def test_noise_within_the_margin_is_kept(topo: Topology) -> None:
    assert _run(topo, [5, 5, 5], [5, 5.4, 5.4, 5.4]) == [Verdict.KEPT]


def test_tiny_absolute_changes_are_not_regressions(topo: Topology) -> None:
    assert _run(topo, [0.01] * 3, [0.01, 0.03, 0.03, 0.03]) == [Verdict.KEPT]


def test_no_pmu_means_unmeasured_not_kept(topo: Topology) -> None:
    assert _run(topo, [None] * 3, [None] * 4) == [Verdict.UNMEASURED]


def test_vm_gone_is_unmeasured(topo: Topology) -> None:
    j = MoveJournal(VerifySettings())
    j.observe(_snap(topo, 0, 3.0))
    j.record(MOVE, 1)
    outs = j.observe(_snap(topo, 2, None, guests=()))
    assert [o.verdict for o in outs] == [Verdict.UNMEASURED]


def test_bad_placement_expires(topo: Topology) -> None:
    j = MoveJournal(VerifySettings(window_ticks=1, settle_ticks=0, bad_placement_ttl_s=100))
    j.observe(_snap(topo, 0, 1.0))
    j.record(MOVE, 0)
    assert [o.verdict for o in j.observe(_snap(topo, 1, 5.0))] == [Verdict.ROLLED_BACK]
    assert (("g1", 0), CpuSet.of(2)) in j.bad_placements(50)
    j2 = MoveJournal(VerifySettings())
    j2.import_state(j.export_state())  # survives a daemon restart with its expiry
    assert (("g1", 0), CpuSet.of(2)) in j2.bad_placements(60)
    assert j.bad_placements(102) == frozenset()
    assert j2.bad_placements(102) == frozenset()
