"""The contention model: LLC occupancy fixed point, MPKI off each curve, CPI from misses.

Pure numpy over arrays of threads; no topology, no scheduler. The equations are those of
docs/simulator.md ("The model, one tick"); names here follow it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

# A floor on every thread's insertion rate (misses/s) so a thread that never misses still
# holds a sliver of the cache and the shares stay defined.
EPS_RATE = 1.0
MAX_ITERATIONS = 1000  # the slowest case found converges in 373 (a knee met at the smallest damping)
TOLERANCE = 1e-7  # largest relative change of any occupancy between two iterations
DAMPING = 0.5  # new = DAMPING * proposed + (1 - DAMPING) * old: damps the rate <-> share feedback
MIN_DAMPING = 1 / 64  # adaptive damping halves down to this when the iteration stops contracting


@dataclass(frozen=True)
class ThreadLoad:
    """Per-thread inputs for one tick; every array has one entry per thread."""

    domain: IntArray  # LLC domain index the thread runs in
    run: FloatArray  # fraction of the tick it ran (0..1)
    knots_x: FloatArray  # (N, K) log2(bytes), ascending
    knots_y: FloatArray  # (N, K) MPKI, non-increasing
    base_cpi: FloatArray
    smt_factor: FloatArray  # >= 1: slowdown of the core-bound part from busy SMT siblings
    mem_latency: FloatArray  # cycles per memory miss (local/remote mix), before MLP
    cross_latency: FloatArray  # cycles per cross-domain transfer, before MLP
    mlp: FloatArray
    shared_fraction: FloatArray
    cross_fraction: FloatArray  # share of the VM's other running vCPUs in other LLC domains
    group: IntArray  # VM index: threads of one VM share part of their working set


@dataclass(frozen=True)
class Solution:
    occupancy: FloatArray  # bytes of LLC each thread holds
    effective: FloatArray  # occupancy plus the shared part its VM siblings hold in the domain
    mpki_capacity: FloatArray  # read off the curve at ``effective``
    mpki_cross: FloatArray  # shared-data hits turned into cross-domain misses
    cpi: FloatArray
    ips: FloatArray  # instructions per second while running
    iterations: int

    @property
    def mpki(self) -> FloatArray:
        return self.mpki_capacity + self.mpki_cross


def interp_rows(q: FloatArray, xs: FloatArray, ys: FloatArray) -> FloatArray:
    """Row-wise np.interp: each q[i] on its own curve (xs[i], ys[i]), clamped at both ends."""
    n, k = xs.shape
    idx = np.clip(np.sum(xs <= q[:, None], axis=1) - 1, 0, k - 2)
    rows = np.arange(n)
    x0, x1 = xs[rows, idx], xs[rows, idx + 1]
    y0, y1 = ys[rows, idx], ys[rows, idx + 1]
    t = np.clip((q - x0) / (x1 - x0), 0.0, 1.0)
    out: FloatArray = y0 + t * (y1 - y0)
    return out


def solve(
    load: ThreadLoad, capacity: FloatArray, freq_hz: float, initial: FloatArray | None = None
) -> Solution:
    """Solve every LLC domain's occupancy split at once (domains are independent).

    ``initial`` (bytes per thread, e.g. last tick's answer; NaN where unknown) only speeds up
    convergence: the fixed point does not depend on it.
    """
    n = len(load.domain)
    if n == 0:
        z = np.zeros(0)
        return Solution(z, z, z, z, z, z, 0)
    d = load.domain
    n_dom = len(capacity)
    n_grp = int(load.group.max()) + 1
    pair = load.group * n_dom + d  # (VM, domain) cell
    cap = capacity[d]
    floor_mpki = load.knots_y[:, 0]

    def evaluate(occ: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
        held = np.bincount(pair, weights=occ, minlength=n_grp * n_dom)[pair]
        eff = occ + load.shared_fraction * (held - occ)
        m_cap = interp_rows(np.log2(np.maximum(eff, 1.0)), load.knots_x, load.knots_y)
        hits = np.maximum(floor_mpki - m_cap, 0.0)
        m_cross = load.shared_fraction * hits * load.cross_fraction
        cpi = (
            load.base_cpi * load.smt_factor
            + m_cap / 1000.0 * load.mem_latency / load.mlp
            + m_cross / 1000.0 * load.cross_latency / load.mlp
        )
        return eff, m_cap, m_cross, cpi

    weights = np.maximum(load.run, 1e-9)
    if initial is not None:
        weights = np.where(np.isfinite(initial) & (initial > 0), initial, weights * cap / n)
    occ = cap * weights / np.bincount(d, weights=weights, minlength=n_dom)[d]
    iterations = 0
    damping, last_change = DAMPING, np.inf
    for iterations in range(1, MAX_ITERATIONS + 1):  # noqa: B007 - reported below
        _, m_cap, m_cross, cpi = evaluate(occ)
        rate = load.run * (freq_hz / cpi) * (m_cap + m_cross) / 1000.0 + EPS_RATE
        proposed = cap * rate / np.bincount(d, weights=rate, minlength=n_dom)[d]
        step = float(np.max(np.abs(proposed - occ) / cap))
        if step > 0.9 * last_change and damping > MIN_DAMPING:
            # Not contracting: on a steep knee of a curve the undamped map overshoots and
            # a fixed damping can settle into a 2-cycle. Smaller steps restore contraction.
            damping /= 2
        last_change = step
        new = damping * proposed + (1.0 - damping) * occ
        change = damping * step
        occ = new
        if change < TOLERANCE:
            break
    eff, m_cap, m_cross, cpi = evaluate(occ)
    return Solution(occ, eff, m_cap, m_cross, cpi, freq_hz / cpi, iterations)
