"""Properties of the contention model itself (adaptive_pin.sim.cache_model), not code paths."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptive_pin.sim.cache_model import MAX_ITERATIONS, Solution, ThreadLoad, solve
from adaptive_pin.sim.workloads import MIB, Workload, load_curves

CURVES = load_curves()
FREQ = 2.0e9
LAT = 90.0 * 2.0  # cycles: 90 ns at 2 GHz
LLC = 16.0 * MIB


def run(
    workloads: list[Workload],
    domains: list[int],
    *,
    groups: list[int] | None = None,
    capacity: list[float] | None = None,
    run_frac: list[float] | None = None,
    mem_factor: list[float] | None = None,
    cross: list[float] | None = None,
    smt: list[float] | None = None,
) -> Solution:
    n = len(workloads)
    knots = [w.knots(8) for w in workloads]
    load = ThreadLoad(
        domain=np.asarray(domains, dtype=np.int64),
        run=np.asarray(run_frac or [1.0] * n),
        knots_x=np.stack([x for x, _ in knots]),
        knots_y=np.stack([y for _, y in knots]),
        base_cpi=np.array([w.base_cpi for w in workloads]),
        smt_factor=np.asarray(smt or [1.0] * n),
        mem_latency=LAT * np.asarray(mem_factor or [1.0] * n),
        cross_latency=np.full(n, LAT),
        mlp=np.array([w.mlp for w in workloads]),
        shared_fraction=np.array([w.shared_fraction for w in workloads]),
        cross_fraction=np.asarray(cross or [0.0] * n),
        group=np.asarray(groups if groups is not None else list(range(n)), dtype=np.int64),
    )
    cap = np.asarray(capacity or [LLC] * (max(domains) + 1))
    return solve(load, cap, FREQ)


@pytest.mark.parametrize("name", sorted(CURVES))
@pytest.mark.parametrize("mib", [1, 8, 11, 32, 64])
def test_a_thread_alone_reproduces_its_curve_at_the_full_llc(name: str, mib: int) -> None:
    w = CURVES[name]
    sol = run([w], [0], capacity=[mib * MIB])
    assert sol.occupancy[0] == pytest.approx(mib * MIB)
    assert sol.mpki[0] == pytest.approx(w.mpki_at(mib * MIB), rel=1e-9)
    if float(mib * MIB) in w.sizes:  # a measured point: exactly the measurement (made monotone)
        assert sol.mpki[0] == pytest.approx(w.mpki[w.sizes.index(float(mib * MIB))])


def test_curve_is_interpolated_in_log_size_and_clamped_at_the_ends() -> None:
    sort = CURVES["sort"]
    # Halfway between 4 and 8 MiB in log2 is sqrt(32) MiB: the mean of the two measurements.
    assert sort.mpki_at(np.sqrt(32) * MIB) == pytest.approx(
        (sort.mpki_at(4 * MIB) + sort.mpki_at(8 * MIB)) / 2
    )
    assert sort.mpki_at(0.25 * MIB) == sort.mpki_at(1 * MIB)  # below: the private-L2-sized point
    assert sort.mpki_at(512 * MIB) == sort.mpki_at(64 * MIB)  # above: the compulsory floor


def test_curves_are_made_non_increasing() -> None:
    for w in CURVES.values():
        assert all(a >= b for a, b in zip(w.mpki, w.mpki[1:], strict=False)), w.name


NAMES = sorted(CURVES)


@settings(max_examples=60, deadline=None)
@given(
    mix=st.lists(st.sampled_from(NAMES), min_size=1, max_size=6),
    newcomer=st.sampled_from(NAMES),
    mib=st.sampled_from([4, 8, 11, 16, 32]),
)
def test_adding_a_co_runner_never_lowers_anyones_misses(mix: list[str], newcomer: str, mib: int) -> None:
    ws = [CURVES[n] for n in mix]
    before = run(ws, [0] * len(ws), capacity=[mib * MIB])
    after = run([*ws, CURVES[newcomer]], [0] * (len(ws) + 1), capacity=[mib * MIB])
    assert np.all(after.mpki[: len(ws)] >= before.mpki - 1e-6)
    assert np.all(after.ips[: len(ws)] <= before.ips * (1 + 1e-9))


@settings(max_examples=40, deadline=None)
@given(mix=st.lists(st.sampled_from(NAMES), min_size=2, max_size=8), mib=st.sampled_from([2, 6, 11, 32]))
def test_fixed_point_converges_and_occupancies_fill_the_llc(mix: list[str], mib: int) -> None:
    sol = run([CURVES[n] for n in mix], [0] * len(mix), capacity=[mib * MIB])
    assert sol.iterations < MAX_ITERATIONS  # converged, not cut off
    assert sol.occupancy.sum() == pytest.approx(mib * MIB, rel=1e-9)
    # at the answer, each share is proportional to the thread's insertion rate (misses/s)
    rate = sol.ips * sol.mpki / 1000.0 + 1.0
    assert sol.occupancy / (mib * MIB) == pytest.approx(rate / rate.sum(), rel=1e-3, abs=1e-6)


def test_cache_insensitive_throughput_does_not_depend_on_placement() -> None:
    intloop, triad, sortw = CURVES["intloop"], CURVES["stream-triad"], CURVES["sort"]
    alone = run([intloop], [0]).ips[0]
    crowded = run([intloop, triad, triad, sortw], [0, 0, 0, 0]).ips[0]
    tiny_llc = run([intloop], [0], capacity=[1 * MIB]).ips[0]
    assert crowded == pytest.approx(alone, rel=1e-3)
    assert tiny_llc == pytest.approx(alone, rel=1e-3)


def test_spreading_two_cache_hungry_threads_beats_packing_them() -> None:
    """Zhuravlev, Blagodurov, Fedorova (ASPLOS 2010): separate the memory-intensive threads."""
    a, b = CURVES["sort"], CURVES["python-dict"]
    packed = run([a, b], [0, 0], capacity=[LLC, LLC])
    spread = run([a, b], [0, 1], capacity=[LLC, LLC])
    assert np.all(spread.mpki < packed.mpki)
    assert spread.ips.sum() > packed.ips.sum()


def test_splitting_a_data_sharing_vm_over_two_llcs_raises_its_misses() -> None:
    """Tam, Azimi, Stumm (EuroSys 2007): threads sharing data belong in one cache domain."""
    w = CURVES["redis"]  # e-server: half of its working set is shared by the VM's vCPUs
    together = run([w, w], [0, 0], groups=[0, 0], capacity=[LLC, LLC])
    split = run([w, w], [0, 1], groups=[0, 0], capacity=[LLC, LLC], cross=[1.0, 1.0])
    assert np.all(split.mpki > together.mpki)
    assert np.all(split.mpki_cross > 0) and np.all(together.mpki_cross == 0)


def test_vcpus_of_one_vm_share_cache_that_two_strangers_do_not() -> None:
    w = CURVES["redis"]
    same_vm = run([w, w], [0, 0], groups=[0, 0])
    strangers = run([w, w], [0, 0], groups=[0, 1])
    assert np.all(same_vm.effective > strangers.effective)
    assert np.all(same_vm.mpki < strangers.mpki)


def test_remote_memory_costs_more_than_local() -> None:
    w = CURVES["ptrchase-256M"]
    local = run([w], [0], mem_factor=[1.0])
    remote = run([w], [0], mem_factor=[2.1])  # SLIT 21 / 10 (32intel64-2p8co2t+8ve)
    assert remote.cpi[0] > local.cpi[0]
    assert remote.mpki[0] == pytest.approx(local.mpki[0])  # same misses, each one dearer


def test_busy_smt_sibling_slows_the_core_bound_part() -> None:
    w = CURVES["intloop"]
    assert run([w], [0], smt=[2 / 1.3]).ips[0] < run([w], [0]).ips[0]
