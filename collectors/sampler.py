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
the same for 10 or 10,000 vCPUs. Collectors answer as :class:`~collectors.base.Batch` arrays
over a :class:`~collectors.base.Roster` that stays the same object while the inventory does
not change (so they keep per-row state); a collector with only ``sample()`` is converted.
Reasons for None are built once per distinct combination (grouped in numpy), and the
VCpuRates objects by filling their instance dicts directly (see ``_make_all_fast``): at 1,000
vCPUs the rate part costs about 2.5-3 µs per vCPU, most of it those 1,000 objects.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from adaptive_pin.model import (
    CPU_TIME,
    CYCLES,
    INSTRUCTIONS,
    LLC_MISSES,
    RUN_DELAY,
    TASK_CLOCK,
    VCPU_RATE_FIELDS,
    Guest,
    ThreadRef,
    VCpuKey,
    VCpuRates,
)
from collectors.base import NO_CPU, Batch, BatchCollector, Collector, Roster, batch_from_counters

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
_EMPTY: Mapping[str, str] = MappingProxyType({})
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
        n0, k0 = self.value.shape
        if keys is self.keys and k == k0:  # the same roster as last round: rows line up
            seen_as_is: Any = self.seen  # a bool array among the float ones, as below
            return self.tid, [self.value, self.time, self.rate, self.total, seen_as_is]
        row = {key: i for i, key in enumerate(self.keys)}
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
        # Decided once: isinstance against a runtime-checkable Protocol costs ~15 µs a call.
        self._batch = tuple(isinstance(c, BatchCollector) for c in self.collectors)
        self._exact = tuple(bool(getattr(c, "exact_liveness", False)) for c in self.collectors)
        self.half_life_s = half_life_s
        self._hist = _History()
        self._sig: tuple[object, ...] | None = None
        self._last_roster: Roster | None = None
        self._no_tid: list[VCpuKey] = []
        self._keys_of: tuple[Roster | None, list[VCpuKey], npt.NDArray[np.int64]] = (
            None,
            [],
            np.empty(0, np.int64),
        )

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

    def _roster(self, guests: Sequence[Guest]) -> tuple[Roster, list[VCpuKey]]:
        """The round's threads; the same Roster object while the inventory does not change."""
        sig = tuple((g.id, g.pid, tuple([(v.index, v.tid) for v in g.vcpus])) for g in guests)
        if sig == self._sig and self._last_roster is not None:
            return self._last_roster, self._no_tid
        refs: list[ThreadRef] = []
        no_tid: list[VCpuKey] = []
        for g in guests:
            for v in g.vcpus:
                if v.tid is None:
                    no_tid.append((g.id, v.index))
                else:
                    refs.append(ThreadRef((g.id, v.index), g.pid if g.pid is not None else v.tid, v.tid))
        self._sig, self._last_roster, self._no_tid = sig, Roster(tuple(refs)), no_tid
        return self._last_roster, no_tid

    def sample(self, guests: Sequence[Guest]) -> SamplerResult:
        start = time.monotonic()
        roster, no_tid = self._roster(guests)
        cpu_s: dict[str, float] = {}
        errors: dict[str, str] = {}
        batches: list[Batch | None] = [None] * len(self.collectors)
        # Collectors that know exactly which threads exist go first and tell the others, which
        # then need not ask /proc themselves; the result still merges in the given order.
        order = sorted(range(len(self.collectors)), key=lambda i: not self._exact[i])
        alive: npt.NDArray[np.bool_] | None = None
        for i in order:
            c = self.collectors[i]
            t0 = time.thread_time()
            try:
                if self._batch[i]:
                    batch = cast(BatchCollector, c).sample_batch(roster, alive)
                else:
                    batch = batch_from_counters(roster, c.sample(list(roster.refs)))
                if len(batch.time) != len(roster):
                    raise ValueError(f"{len(batch.time)} rows for {len(roster)} threads")
                batches[i] = batch
                if alive is None and self._exact[i]:
                    alive = batch.seen
            except Exception as exc:
                log.warning("collector %s failed: %s", c.name, exc, exc_info=log.isEnabledFor(logging.DEBUG))
                errors[c.name] = f"collector {c.name} failed: {exc}"
            cpu_s[c.name] = time.thread_time() - t0

        t0 = time.thread_time()
        caps = self.capabilities()
        readings = [b for b in batches if b is not None]
        rates = self._rates(roster, readings, caps, "; ".join(errors.values()))
        for key in no_tid:
            rates[key] = _all_missing("no thread id for this vCPU")
        cpu_s["rates"] = time.thread_time() - t0
        return SamplerResult(start, rates, caps, cpu_s, errors)

    # --- the round's arithmetic ----------------------------------------------------------------
    def _rates(
        self,
        roster: Roster,
        readings: list[Batch],
        caps: Mapping[str, str | None],
        fallback: str,
    ) -> dict[VCpuKey, VCpuRates]:
        n = len(roster)
        hist = self._hist
        col_of = {c: j for j, c in enumerate(hist.cols)}
        for b in readings:  # a column joins once some thread has a value in it
            for j_new, c in enumerate(b.columns):
                if c not in col_of and not np.isnan(b.values[:, j_new]).all():
                    col_of[c] = len(col_of)
        cols = list(col_of)
        k = len(cols)
        v_now = np.full((n, k), _NAN)
        t_now = np.full((n, k), _NAN)
        seen = np.zeros(n, bool)
        last_cpu = np.full(n, NO_CPU, np.int64)
        for b in readings:
            got = b.seen
            seen |= got
            fill = (last_cpu == NO_CPU) & got
            last_cpu[fill] = b.last_cpu[fill]
            for j_b, c in enumerate(b.columns):
                j = col_of.get(c)
                if j is None:
                    continue
                got_v = b.values[:, j_b]
                take = np.isnan(v_now[:, j]) & ~np.isnan(got_v)  # the first collector that gives it wins
                v_now[take, j] = got_v[take]
                t_now[take, j] = b.time[take]

        if roster is self._keys_of[0]:
            keys, tid = self._keys_of[1], self._keys_of[2]
        else:
            keys, tid = [r.key for r in roster.refs], np.array(roster.tids, np.int64)
            self._keys_of = (roster, keys, tid)
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
        rd = _Round(cols, rate, code, have, total, seen_c, seen, last_cpu, [b.missing for b in readings])
        return self._build(roster, rd, caps, fallback)

    def _build(
        self, roster: Roster, rd: _Round, caps: Mapping[str, str | None], fallback: str
    ) -> dict[VCpuKey, VCpuRates]:
        cols, rate, code, have, total, seen_c = rd.cols, rd.rate, rd.code, rd.have, rd.total, rd.seen_c
        n = len(roster)
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
        none_bits = nan_mask @ (1 << np.arange(len(RATE_FIELDS)))  # bit per None field
        packed = np.stack([codes[nm] * 4 + picks[nm] for nm in RATE_COUNTERS], axis=1)
        # Rows that share None fields, codes and the collectors' reason objects share one
        # reason mapping: group them in numpy and build each distinct one once.
        why_rows: list[Mapping[str, str]] = [_EMPTY] * n
        needy = np.flatnonzero(rd.seen & (none_bits != 0))
        if needy.size:
            parts = [(none_bits[needy], 1 << len(RATE_FIELDS))]
            parts += [(packed[needy, f], 32) for f in range(packed.shape[1])]  # code * 4 + pick < 32
            for missing in rd.missing:
                idents = np.fromiter(map(id, missing), np.int64, len(missing))
                distinct, which = np.unique(idents[needy], return_inverse=True)
                parts.append((which.reshape(-1), len(distinct)))
            _, first, inverse = np.unique(_mixed_radix(parts), return_index=True, return_inverse=True)
            reps = needy[first].tolist()
            whys = []
            for i in reps:
                miss_i = tuple(m[i] for m in rd.missing if m[i])
                vals_i = tuple(None if nan_mask[i, f] else 0.0 for f in range(len(RATE_FIELDS)))
                whys.append(self._why(vals_i, packed[i].tolist(), miss_i, caps, fallback))
            groups = inverse.reshape(-1).tolist()
            if needy.size == n:  # every row (e.g. no PMU: the hardware rates are all None)
                why_rows = list(map(whys.__getitem__, groups))
            else:
                for i, g in zip(needy.tolist(), groups, strict=True):
                    why_rows[i] = whys[g]

        lists = [_with_none(fields[nm]) for nm in VCPU_RATE_FIELDS]
        cpus = _with_none_int(rd.last_cpu)
        all_seen = bool(seen_c.all()) and bool(rd.seen.all())
        make = _make_rates
        if all_seen:  # the common case: every thread there, every counter seen before
            tot_cols = [total[:, j].tolist() for j in range(len(cols))]
            return _make_all(roster, lists, cpus, why_rows, cols, tot_cols)
        tot_rows = total.tolist()
        seen_rows = seen_c.tolist()
        out: dict[VCpuKey, VCpuRates] = {}
        seen = rd.seen.tolist()
        for i, (ref, *vals, why) in enumerate(zip(roster.refs, *lists, cpus, why_rows, strict=True)):
            totals = {c: t for c, t, s in zip(cols, tot_rows[i], seen_rows[i], strict=True) if s}
            if not seen[i]:
                out[ref.key] = _all_missing(fallback or f"thread gone (tid {ref.tid})", totals)
            else:
                out[ref.key] = make((*vals, why, totals))
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
    seen: BoolArray  # (rows,) some collector saw the thread
    last_cpu: npt.NDArray[np.int64]  # NO_CPU: unknown
    missing: list[Sequence[Mapping[str, str]]]  # per collector that answered, per row


def _with_none_int(a: npt.NDArray[np.int64]) -> list[int | None]:
    """The array as a list with None for NO_CPU."""
    unknown = a == NO_CPU
    if not unknown.any():
        plain: list[int | None] = a.tolist()
        return plain
    obj = a.astype(object)
    obj[unknown] = None
    out: list[int | None] = obj.tolist()
    return out


def _with_none(a: FloatArray) -> list[float | None]:
    """The array as a list with None for NaN (done in C: an object array, then tolist)."""
    nan = np.isnan(a)
    if not nan.any():
        plain: list[float | None] = a.tolist()
        return plain
    if nan.all():
        return [None] * len(a)
    obj = a.astype(object)
    obj[nan] = None
    out: list[float | None] = obj.tolist()
    return out


def _mixed_radix(parts: Sequence[tuple[npt.NDArray[np.int64], int]]) -> npt.NDArray[np.int64]:
    """One int64 per row from small non-negative digits (digit, base), or row tuples if too wide."""
    width = 1
    for _, base in parts:
        width *= max(1, base)
    if width < 1 << 62:
        key = np.zeros(len(parts[0][0]), np.int64)
        for digit, base in parts:
            key = key * max(1, base) + digit
        return key
    # Too many distinct combinations for one int64: number the distinct rows instead.
    rows = np.stack([d for d, _ in parts], axis=1)
    _, which = np.unique(rows, axis=0, return_inverse=True)
    out: npt.NDArray[np.int64] = which.reshape(-1).astype(np.int64)
    return out


# VCpuRates is a frozen dataclass; building 1,000 a round through its __init__ (one
# object.__setattr__ per field) costs twice filling the instance dict directly. Same object,
# same fields; the fallback keeps this honest should the model class change shape.
_RATES_FIELDS = (*VCPU_RATE_FIELDS, "last_cpu", "missing", "totals")


def _make_rates(values: tuple[object, ...]) -> VCpuRates:
    return VCpuRates(*values)  # type: ignore[arg-type]


def _make_all_init(
    roster: Roster,
    lists: Sequence[list[float | None]],
    cpus: list[int | None],
    whys: list[Mapping[str, str]],
    cols: list[str],
    tot_cols: list[list[float]],
) -> dict[VCpuKey, VCpuRates]:
    return {
        ref.key: _make_rates((*vals, cpu, why, dict(zip(cols, tots, strict=True))))
        for ref, *vals, cpu, why, tots in zip(
            roster.refs, *lists, cpus, whys, zip(*tot_cols, strict=True), strict=True
        )
    }


def _make_all_fast(
    roster: Roster,
    lists: Sequence[list[float | None]],
    cpus: list[int | None],
    whys: list[Mapping[str, str]],
    cols: list[str],
    tot_cols: list[list[float]],
) -> dict[VCpuKey, VCpuRates]:
    new, setattr_, cls = object.__new__, object.__setattr__, VCpuRates
    out: dict[VCpuKey, VCpuRates] = {}
    for ref, llc, ins, cyc, mpki, ipc, util, delay, cpu, why, tots in zip(
        roster.refs, *lists, cpus, whys, zip(*tot_cols, strict=True), strict=True
    ):
        r = new(cls)
        setattr_(
            r,
            "__dict__",
            {
                "llc_misses_per_s": llc,
                "instructions_per_s": ins,
                "cycles_per_s": cyc,
                "mpki": mpki,
                "ipc": ipc,
                "utilization": util,
                "run_delay": delay,
                "last_cpu": cpu,
                "missing": why,
                "totals": dict(zip(cols, tots, strict=True)),
            },
        )
        out[ref.key] = r
    return out


_make_all = (
    _make_all_fast
    if tuple(f.name for f in dataclasses.fields(VCpuRates)) == _RATES_FIELDS
    and not hasattr(VCpuRates, "__post_init__")
    and not hasattr(VCpuRates, "__slots__")
    else _make_all_init
)


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
