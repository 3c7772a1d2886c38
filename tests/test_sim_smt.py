"""SMT in the simulator: a thread pinned to a PU shares its core whenever its sibling runs; one
free to move inside its LLC shares only while more threads run at once than the LLC has cores."""

from __future__ import annotations

import numpy as np
import pytest

from adaptive_pin.sim.host import SimHost, smt_speed, spread_smt
from adaptive_pin.sim.scenario import loads_scenario

# One LLC of 4 cores x 2 threads: core c holds PUs c and c + 4.
HOST = (
    "duration = 30\nseed = 5\n[host]\nsynthetic = { packages = 1, cores_per_llc = 4, threads_per_core = 2 }\n"
)
PAIRED = (0, 4, 1, 5, 2, 6, 3, 7)  # PUs in sibling pairs


def speed_per_thread(n: int, load: float, pus: tuple[int, ...] | None, ticks: int = 6) -> float:
    """Mean speed relative to alone of n one-vCPU intloop VMs (compute-bound: speed is SMT),
    each pinned to its PU of ``pus``, or free (None)."""
    vms = "".join(
        f'[[vms]]\nname = "v{i}"\nvcpus = 1\nworkload = "intloop"\nload = {load}\n'
        + (f'pinned_cpus = "{pus[i]}"\n' if pus is not None else "")
        for i in range(n)
    )
    host = SimHost(loads_scenario(HOST + vms))
    host.step()  # first placement
    return float(np.mean([host.step().weighted_speedup / n for _ in range(ticks)]))


def test_low_duty_threads_free_in_their_llc_rarely_share_a_core() -> None:
    # 8 threads running 30% of the time on 4 cores: 2.4 run at once on average, so a waking one
    # nearly always finds an idle core; pinned in sibling pairs each shares its core whenever
    # its sibling runs: 70% of the time alone, 30% at 1.3 / 2 of its speed.
    free = speed_per_thread(8, 0.3, None)
    pinned = speed_per_thread(8, 0.3, PAIRED)
    assert pinned == pytest.approx(0.7 + 0.3 * 1.3 / 2, rel=0.01)
    assert free > 0.97
    assert free > pinned * 1.08


def test_busy_threads_do_the_same_work_free_or_pinned() -> None:
    # 6 full-time threads on 4 cores: two cores run two, two run one, however they are placed:
    # 2 + 4 x 0.65 threads' work either way.
    free = speed_per_thread(6, 1.0, None)
    pinned = speed_per_thread(6, 1.0, (0, 4, 1, 5, 2, 3))
    assert free == pytest.approx(pinned, rel=0.01)
    assert free == pytest.approx((2 + 4 * 1.3 / 2) / 6, rel=0.01)


def test_spread_smt_averages_speed_over_how_many_run_at_once() -> None:
    # always 6 running on 4 cores of 2: 4 threads paired, 2 alone
    assert 1 / spread_smt(np.ones(6), 4.0, 2) == pytest.approx((2 + 4 * 0.65) / 6)
    # never more running than cores: no sharing
    assert spread_smt(np.ones(3), 4.0, 2) == pytest.approx(1.0)
    # two threads, each running half the time, on one core: both run a quarter of the time,
    # and a running thread is then paired half of the time
    assert 1 / spread_smt(np.full(2, 0.5), 1.0, 2) == pytest.approx(0.5 + 0.5 * 0.65)
    assert smt_speed(np.array([1.0, 2.0, 4.0])) == pytest.approx([1.0, 0.65, 1.9 / 4])


def test_two_pinned_pools_of_one_llc_are_counted_apart() -> None:
    # Two VMs, each pinned to two of the four cores (as numa pins the halves of an SNC LLC):
    # each VM's 2 busy threads have a core each, however busy the other half is.
    vms = "".join(
        f'[[vms]]\nname = "v{i}"\nvcpus = 2\nworkload = "intloop"\npinned_cpus = "{cpus}"\n'
        for i, cpus in enumerate(("0,1,4,5", "2,3,6,7"))
    )
    host = SimHost(loads_scenario(HOST + vms))
    host.step()
    ws = [host.step().weighted_speedup for _ in range(4)]
    assert np.mean(ws) == pytest.approx(4.0, rel=0.01)


def test_pools_join_threads_whose_cores_overlap_even_through_a_third() -> None:
    from adaptive_pin.sim.host import _pools

    a, b, bridge = [True, True, False, False], [False, False, True, True], [False, True, True, False]
    two = _pools(np.array([10, 11, 12]), np.array([a, b, a]))
    assert sorted((p.tolist(), c.tolist()) for p, c in two) == [([10, 12], a), ([11], b)]
    ((pool, cores),) = _pools(np.array([10, 11, 12]), np.array([a, b, bridge]))
    assert sorted(pool.tolist()) == [10, 11, 12] and cores.all()
