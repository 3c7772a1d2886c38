"""Cumulative per-thread counters -> smoothed per-vCPU rates.

The sampler asks every collector about the vCPU threads of the current inventory, merges what
they say (the first collector that gives a counter wins), and turns each counter's increase
over the interval into a rate, smoothed by an EWMA whose weight follows the real interval:
``alpha = 1 - 2**(-dt / half_life)``, so a late tick counts for more and the half-life holds in
seconds whatever the tick rate. Ratios (MPKI, IPC) are taken of the smoothed rates, i.e.
weighted by instructions/cycles, not averages of noisy per-interval ratios.

What it survives, per vCPU: a new thread id (history restarts), a counter going backwards
(reset or wrap: that interval is dropped, the baseline moves), a counter a collector cannot
give (its rate is None with the collector's reason, never 0), a collector raising (the others
still count). ``totals`` accumulate the increases per vCPU, so they never go backwards across
thread churn or counter resets (what a Prometheus counter needs).

The history lives in numpy arrays (row per vCPU, column per counter) so the arithmetic costs
the same for 10 or 10,000 vCPUs; Python only merges the collectors' dicts and builds results.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import numpy.typing as npt

from adaptive_pin.model import (
    CPU_TIME,
    CYCLES,
    INSTRUCTIONS,
    LLC_MISSES,
    RUN_DELAY,
    TASK_CLOCK,
    Guest,
    ThreadCounters,
    ThreadRef,
    VCpuKey,
    VCpuRates,
)
from collectors.base import Collector

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

# VCpuRates field -> counters it may come from, best first.
RATE_COUNTERS: Mapping[str, tuple[str, ...]] = {
    "llc_misses_per_s": (LLC_MISSES,),
    "instructions_per_s": (INSTRUCTIONS,),
    "cycles_per_s": (CYCLES,),
    "utilization": (CPU_TIME, TASK_CLOCK),
    "run_delay": (RUN_DELAY,),
}
RATE_FIELDS = (*RATE_COUNTERS, "mpki", "ipc")
DEFAULT_HALF_LIFE_S = 5.0

# Why a counter's rate is None this round (codes from the vectorised step).
_OK, _ABSENT, _FIRST, _RESET, _STILL = range(5)
WARMING_UP = "warming up: first sample of this thread"
_NAN = math.nan


def ewma_alpha(dt: float, half_life_s: float) -> float:
    """Weight of a new observation after ``dt`` seconds; 1 (no smoothing) for half-life <= 0."""
    if half_life_s <= 0:
        return 1.0
    return 1.0 - math.pow(2.0, -dt / half_life_s)


@dataclass(frozen=True)
class SamplerResult:
    time: float  # time.monotonic() at the start of the round
    rates: dict[VCpuKey, VCpuRates]
    capabilities: dict[str, str | None]
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds per collector and "rates"
    errors: dict[str, str] = field(default_factory=dict)  # collector name -> why it failed this round


@dataclass
class _History:
    """Per-vCPU counter history: row per vCPU key, column per counter."""

    keys: list[VCpuKey] = field(default_factory=list)
    cols: list[str] = field(default_factory=list)
    tid: npt.NDArray[np.int64] = field(default_factory=lambda: np.empty(0, np.int64))
    value: FloatArray = field(default_factory=lambda: np.empty((0, 0)))
    time: FloatArray = field(default_factory=lambda: np.empty((0, 0)))
    rate: FloatArray = field(default_factory=lambda: np.empty((0, 0)))  # smoothed, NaN = none yet
    total: FloatArray = field(default_factory=lambda: np.empty((0, 0)))
    seen: BoolArray = field(default_factory=lambda: np.empty((0, 0), bool))

    def gather(self, keys: Sequence[VCpuKey], k: int) -> tuple[npt.NDArray[np.int64], list[FloatArray]]:
        """Previous tid and arrays for ``keys`` (rows) and ``k`` columns; unknown rows get defaults."""
        row = {key: i for i, key in enumerate(self.keys)}
        n0, k0 = self.value.shape
        idx = np.fromiter((row.get(key, n0) for key in keys), np.int64, len(keys))
        out: list[FloatArray] = []
        for old, fill in ((self.value, _NAN), (self.time, _NAN), (self.rate, _NAN), (self.total, 0.0)):
            pad = np.full((n0 + 1, k), fill)
            pad[:n0, :k0] = old
            out.append(pad[idx])
        seen = np.zeros((n0 + 1, k), bool)
        seen[:n0, :k0] = self.seen
        out.append(seen[idx])
        tid = np.append(self.tid, -1)[idx]
        return tid, out


class Sampler:
    """Merges collectors and keeps each vCPU's counter history; see the module docstring."""

    def __init__(self, collectors: Sequence[Collector], half_life_s: float = DEFAULT_HALF_LIFE_S) -> None:
        if half_life_s < 0 or not math.isfinite(half_life_s):
            raise ValueError(f"half_life_s must be >= 0 and finite, not {half_life_s}")
        self.collectors = tuple(collectors)
        self.half_life_s = half_life_s
        self._hist = _History()

    def close(self) -> None:
        for c in self.collectors:
            c.close()

    def capabilities(self) -> dict[str, str | None]:
        """Counter -> None when any collector gives it, else the first collector's reason."""
        caps: dict[str, str | None] = {}
        for c in self.collectors:
            try:
                theirs = c.capabilities()
            except Exception as exc:  # one broken collector must not hide the others
                log.warning("collector %s: capabilities failed: %s", c.name, exc)
                continue
            for name, reason in theirs.items():
                if reason is None or name not in caps:
                    caps[name] = reason
        return caps

    def sample(self, guests: Sequence[Guest]) -> SamplerResult:
        start = time.monotonic()
        refs: list[ThreadRef] = []
        no_tid: list[VCpuKey] = []
        for g in guests:
            for v in g.vcpus:
                if v.tid is None:
                    no_tid.append((g.id, v.index))
                else:
                    refs.append(ThreadRef((g.id, v.index), g.pid if g.pid is not None else v.tid, v.tid))

        cpu_s: dict[str, float] = {}
        errors: dict[str, str] = {}
        readings: list[dict[int, ThreadCounters]] = []
        for c in self.collectors:
            t0 = time.thread_time()
            try:
                readings.append(c.sample(refs))
            except Exception as exc:
                log.warning("collector %s failed: %s", c.name, exc, exc_info=log.isEnabledFor(logging.DEBUG))
                errors[c.name] = f"collector {c.name} failed: {exc}"
            cpu_s[c.name] = time.thread_time() - t0

        t0 = time.thread_time()
        caps = self.capabilities()
        rates = self._rates(refs, readings, caps, "; ".join(errors.values()))
        for key in no_tid:
            rates[key] = _all_missing("no thread id for this vCPU")
        cpu_s["rates"] = time.thread_time() - t0
        return SamplerResult(start, rates, caps, cpu_s, errors)

    # --- the round's arithmetic ----------------------------------------------------------------
    def _rates(
        self,
        refs: list[ThreadRef],
        readings: list[dict[int, ThreadCounters]],
        caps: Mapping[str, str | None],
        fallback: str,
    ) -> dict[VCpuKey, VCpuRates]:
        n = len(refs)
        hist = self._hist
        merged: dict[str, tuple[FloatArray, FloatArray]] = {
            c: (np.full(n, _NAN), np.full(n, _NAN)) for c in hist.cols
        }
        seen = [False] * n
        last_cpu: list[int | None] = [None] * n
        miss: list[tuple[Mapping[str, str], ...]] = [()] * n
        tids = [r.tid for r in refs]
        for got in readings:
            if not got:
                continue
            tcs = [got.get(t) for t in tids]
            names: set[str] = set()
            when = np.array([_NAN if tc is None else tc.time for tc in tcs])
            for i, tc in enumerate(tcs):
                if tc is None:
                    continue
                seen[i] = True
                names.update(tc.values)
                if last_cpu[i] is None:
                    last_cpu[i] = tc.last_cpu
                if tc.missing:
                    miss[i] = (*miss[i], tc.missing)
            for c in names:
                got_v = np.array([_NAN if tc is None else tc.values.get(c, _NAN) for tc in tcs])
                if c not in merged:
                    merged[c] = (got_v, np.where(np.isnan(got_v), _NAN, when))
                    continue
                old_v, old_t = merged[c]
                take = np.isnan(old_v) & ~np.isnan(got_v)  # the first collector that gives it wins
                merged[c] = (np.where(take, got_v, old_v), np.where(take, when, old_t))

        cols = list(merged)
        k = len(cols)
        tid = np.array(tids, np.int64)
        keys = [r.key for r in refs]
        v_now = np.array([merged[c][0] for c in cols], dtype=float).T.reshape(n, k)
        t_now = np.array([merged[c][1] for c in cols], dtype=float).T.reshape(n, k)
        prev_tid, (pv, pt, pr, ptot, pseen) = hist.gather(keys, k)
        same = (prev_tid == tid)[:, None]
        pv = np.where(same, pv, _NAN)  # a new thread: its history restarts (totals carry on)
        pr = np.where(same, pr, _NAN)

        have, had = ~np.isnan(v_now), ~np.isnan(pv)
        with np.errstate(invalid="ignore", divide="ignore"):
            dt, dv = t_now - pt, v_now - pv
            both = have & had
            moved = both & (dt > 0)
            fresh = moved & (dv >= 0)
            back = moved & (dv < 0)
            still = both & ~moved
            raw = np.where(fresh, dv / np.where(fresh, dt, 1.0), _NAN)
            if self.half_life_s > 0:
                alpha = 1.0 - np.exp2(-np.where(fresh, dt, 0.0) / self.half_life_s)
            else:
                alpha = np.ones_like(raw)
            smoothed = np.where(np.isnan(pr), raw, pr + alpha * (raw - pr))
        rate = np.where(fresh, smoothed, np.where(back | still, pr, _NAN))
        code = np.select([~have, ~had, back, still], [_ABSENT, _FIRST, _RESET, _STILL], _OK)
        total = ptot + np.where(fresh, dv, 0.0)
        seen_c = pseen | have
        self._hist = _History(
            keys=keys,
            cols=cols,
            tid=tid,
            value=np.where(still, pv, v_now),
            time=np.where(still, pt, t_now),
            rate=rate,
            total=total,
            seen=seen_c,
        )
        return self._build(
            refs, _Round(cols, rate, code, have, total, seen_c, seen, last_cpu, miss), caps, fallback
        )

    def _build(
        self, refs: list[ThreadRef], rd: _Round, caps: Mapping[str, str | None], fallback: str
    ) -> dict[VCpuKey, VCpuRates]:
        cols, rate, code, have, total, seen_c = rd.cols, rd.rate, rd.code, rd.have, rd.total, rd.seen_c
        seen, last_cpu, miss = rd.seen, rd.last_cpu, rd.miss
        n = len(refs)
        col_of = {c: j for j, c in enumerate(cols)}
        nan_col = np.full(n, _NAN)
        absent = np.full(n, _ABSENT)
        fields: dict[str, FloatArray] = {}
        codes: dict[str, npt.NDArray[np.int64]] = {}
        picks: dict[str, npt.NDArray[np.int64]] = {}  # which source counter fed the field
        for name, sources in RATE_COUNTERS.items():
            f, cd, pick = nan_col, absent, np.zeros(n, np.int64)
            for s_i, c in reversed(list(enumerate(sources))):  # best source last, so it wins
                j = col_of.get(c)
                if j is None:
                    continue
                use = have[:, j]
                f = np.where(use, rate[:, j], f)
                cd = np.where(use, code[:, j], cd)
                pick = np.where(use, s_i, pick)
            fields[name], codes[name], picks[name] = f, cd, pick
        fields["utilization"] = np.clip(fields["utilization"], 0.0, 1.0)
        llc, ins, cyc = fields["llc_misses_per_s"], fields["instructions_per_s"], fields["cycles_per_s"]
        with np.errstate(invalid="ignore", divide="ignore"):
            fields["mpki"] = np.where(ins > 0, 1000.0 * llc / ins, _NAN)
            fields["ipc"] = np.where(cyc > 0, ins / cyc, _NAN)

        nan_mask = np.stack([np.isnan(fields[nm]) for nm in RATE_FIELDS], axis=1)
        lists = {nm: _with_none(fields[nm]) for nm in RATE_FIELDS}
        none_rows = (nan_mask @ (1 << np.arange(len(RATE_FIELDS)))).tolist()  # bit per None field
        code_rows = np.stack([codes[nm] * 4 + picks[nm] for nm in RATE_COUNTERS], axis=1).tolist()
        tot_rows = total.tolist()
        all_seen = bool(seen_c.all())
        seen_rows = None if all_seen else seen_c.tolist()
        reasons: dict[tuple[object, ...], Mapping[str, str]] = {}
        empty: Mapping[str, str] = MappingProxyType({})
        out: dict[VCpuKey, VCpuRates] = {}
        llc_l, ins_l, cyc_l = lists["llc_misses_per_s"], lists["instructions_per_s"], lists["cycles_per_s"]
        util_l, delay_l, mpki_l, ipc_l = lists["utilization"], lists["run_delay"], lists["mpki"], lists["ipc"]
        for i, ref in enumerate(refs):
            if not seen[i]:
                totals = {c: tot_rows[i][j] for j, c in enumerate(cols) if seen_c[i, j]}
                out[ref.key] = _all_missing(fallback or f"thread gone (tid {ref.tid})", totals)
                continue
            vals = (llc_l[i], ins_l[i], cyc_l[i], util_l[i], delay_l[i], mpki_l[i], ipc_l[i])
            if none_rows[i]:
                rkey = (none_rows[i], *code_rows[i], *map(id, miss[i]))
                why = reasons.get(rkey)
                if why is None:
                    why = reasons[rkey] = self._why(vals, code_rows[i], miss[i], caps, fallback)
            else:
                why = empty
            if all_seen:
                totals = dict(zip(cols, tot_rows[i], strict=True))
            else:
                assert seen_rows is not None
                totals = {c: t for c, t, s in zip(cols, tot_rows[i], seen_rows[i], strict=True) if s}
            out[ref.key] = VCpuRates(
                vals[0], vals[1], vals[2], vals[5], vals[6], vals[3], vals[4], last_cpu[i], why, totals
            )
        return out

    @staticmethod
    def _why(
        vals: tuple[float | None, ...],
        code_row: list[int],
        miss: tuple[Mapping[str, str], ...],
        caps: Mapping[str, str | None],
        fallback: str,
    ) -> Mapping[str, str]:
        why: dict[str, str] = {}
        for (name, sources), v, packed in zip(RATE_COUNTERS.items(), vals, code_row, strict=False):
            if v is not None:
                continue
            cd, pick = divmod(packed, 4)
            if cd == _ABSENT:
                why[name] = _reason(sources, miss, caps, fallback)
            elif cd == _FIRST:
                why[name] = WARMING_UP
            elif cd == _RESET:
                why[name] = f"warming up: {sources[pick]} went backwards (counter reset)"
            else:
                why[name] = "warming up: no time passed since the last sample"
        for name, num, den in (("mpki", 0, 1), ("ipc", 1, 2)):
            if vals[5 if name == "mpki" else 6] is None:
                part = RATE_FIELDS[num] if vals[num] is None else RATE_FIELDS[den]
                why[name] = why.get(part) or f"{part} is 0 (idle vCPU)"
        return MappingProxyType(why)


@dataclass(frozen=True)
class _Round:
    """One round's arrays, handed from the arithmetic to the result building."""

    cols: list[str]
    rate: FloatArray
    code: npt.NDArray[np.int64]
    have: BoolArray
    total: FloatArray
    seen_c: BoolArray
    seen: list[bool]
    last_cpu: list[int | None]
    miss: list[tuple[Mapping[str, str], ...]]


def _with_none(a: FloatArray) -> list[float | None]:
    """The array as a list with None for NaN (done in C: an object array, then tolist)."""
    obj = a.astype(object)
    obj[np.isnan(a)] = None
    out: list[float | None] = obj.tolist()
    return out


def _reason(
    sources: tuple[str, ...],
    miss: tuple[Mapping[str, str], ...],
    caps: Mapping[str, str | None],
    fallback: str,
) -> str:
    for c in sources:
        for m in miss:
            if c in m:
                return m[c]
    for c in sources:
        if caps.get(c):
            return str(caps[c])
    return fallback or f"not collected: no collector gives {' or '.join(sources)}"


def _all_missing(reason: str, totals: Mapping[str, float] | None = None) -> VCpuRates:
    return VCpuRates(missing=dict.fromkeys(RATE_FIELDS, reason), totals=dict(totals or {}))
