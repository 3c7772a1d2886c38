"""The verify step: did each move help? MPKI over a window before and after, rollback if worse.

MPKI, not misses per second: a vCPU that runs faster after a move also misses more per
second, and that is a success. The before-window is the vCPU's last ``window_ticks`` readings
before the move; the after-window starts ``settle_ticks`` after it (caches refill) and lasts
``window_ticks``.

A reading is one control interval's own counts (the increase of the cumulative
``VCpuRates.totals`` since the last tick: misses and LLC references per 1000 instructions,
instructions per cycle), not the smoothed rates, whose half-life would carry the old placement
into the after-window and a warm-up trend into both. Without totals the smoothed ``mpki`` and
``ipc`` are used.

The comparison must be like for like, so "worse" is:

- the vCPU's **access intensity** (LLC references per 1000 instructions: what its workload asks
  of the LLC, which a placement does not change) must be the same on both sides, and steady
  in the before-window: when it moved by more than ``WORKLOAD_CHANGE`` the workload changed
  (a phase, a new job), not the placement, and the move gets no verdict (``UNMEASURED``);
- MPKI after above before × (1 + ``rollback_margin``), by at least ``min_mpki_delta``;
- and, when IPC is known on both sides, IPC not higher after: a vCPU that misses a little more
  per instruction but retires more per cycle (off an SMT sibling, out of a time-shared PU) is
  better off;
- when the before-window is *unsettled* -- fewer than ``MIN_BEFORE_TICKS`` readings (a vCPU
  placed one tick after it appeared: its first interval is a cold start), or MPKI readings
  spread by more than ``SETTLED_SPREAD`` (another VM arrived, a burst) -- a rise of MPKI alone
  is not evidence: IPC must also have fallen by more than the margin, and without IPC there is
  no verdict. If the vCPU also floated over several LLC domains before the move, there is no
  verdict either: its few readings describe wherever the scheduler put it while every other
  VM was being placed too, not a placement the move can be compared with.

A move judged worse is rolled back by the controller and its placement remembered as bad for
``bad_placement_ttl_s``.

The vCPUs of one VM moved in one tick were moved by one decision (a whole VM to another
domain), and so were those of the VMs of one swap (``Move.group``), so they get one verdict:
their windows pooled (MPKI weighted by each vCPU's instructions, IPC as all their
instructions over all their cycles) and judged by the same rule as one vCPU. Judged one by one,
a VM moved whole would come back split (some vCPUs back home, the others left behind), the
placement cohesion costs most; and one VM of a swap would go back into the domain its partner
now holds, an arrangement no decision chose. Pooled rather than counted: a swap trades one
VM's misses for the other's, and the side that misses more per instruction may retire little
(8 vCPUs at 60% load losing 1% IPC to a cache-hungry neighbour they now share with, against 2
busy vCPUs gaining 22% away from it); a head count would undo the gain.
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from adaptive_pin.model import (
    CYCLES,
    INSTRUCTIONS,
    LLC_MISSES,
    LLC_REFERENCES,
    CpuSet,
    Move,
    MoveOutcome,
    Snapshot,
    VCpuKey,
    Verdict,
)

MIN_BEFORE_TICKS = 2  # a settled before-window has at least this many readings (or window_ticks)
SETTLED_SPREAD = 0.25  # ... and its MPKI readings within this share of their mean
WORKLOAD_CHANGE = 0.25  # LLC references per instruction moving this much: the workload changed
MIN_INSTRUCTIONS = 1e6  # an interval with fewer gives no reading (an idle vCPU's ratios are noise)


@dataclass(frozen=True)
class VerifySettings:
    window_ticks: int = 3
    settle_ticks: int = 1
    rollback_margin: float = 0.10  # after/before above 1 + margin is a regression
    min_mpki_delta: float = 0.05  # and by at least this much: noise at tiny MPKI is not a regression
    bad_placement_ttl_s: float = 900.0

    def validate(self) -> None:
        if self.window_ticks < 1 or self.settle_ticks < 0:
            raise ValueError("window_ticks must be >= 1 and settle_ticks >= 0")
        if self.rollback_margin < 0:
            raise ValueError("rollback_margin must be >= 0")


@dataclass(frozen=True)
class Reading:
    """One control interval of one vCPU."""

    mpki: float
    apki: float | None = None  # LLC references per 1000 instructions (None: not counted)
    ipc: float | None = None
    instructions: float | None = None  # in the interval (None: read from smoothed rates)


@dataclass(frozen=True)
class Window:
    """The mean of a few readings, and whether they were steady."""

    mpki: float
    apki: float | None
    ipc: float | None
    n: int
    settled: bool  # enough readings, MPKI and access intensity steady
    apki_steady: bool
    instructions: float | None = None  # per reading, mean (None: not known for every reading)

    @classmethod
    def of(cls, readings: list[Reading], need: int) -> Window | None:
        if not readings:
            return None
        mpki = [r.mpki for r in readings]
        apki = [r.apki for r in readings if r.apki is not None]
        ipc = [r.ipc for r in readings if r.ipc is not None]
        instr = [r.instructions for r in readings if r.instructions is not None]
        mean = float(np.mean(mpki))
        apki_mean = float(np.mean(apki)) if len(apki) == len(readings) else None
        apki_steady = apki_mean is None or _spread(apki, apki_mean) <= WORKLOAD_CHANGE
        mpki_steady = _spread(mpki, mean) <= SETTLED_SPREAD
        return cls(
            mpki=mean,
            apki=apki_mean,
            ipc=float(np.mean(ipc)) if len(ipc) == len(readings) else None,
            n=len(readings),
            settled=len(readings) >= need and mpki_steady and apki_steady,
            apki_steady=apki_steady,
            instructions=float(np.mean(instr)) if len(instr) == len(readings) else None,
        )

    @classmethod
    def pool(cls, windows: Sequence[Window]) -> Window:
        """The windows of several vCPUs as one: MPKI weighted by instructions, IPC as all the
        instructions over all the cycles (equal weights unless every window knows its count)."""
        w = np.array([x.instructions for x in windows], dtype=float)
        if not (len(w) and np.all(np.isfinite(w)) and w.sum() > 0):
            w = np.ones(len(windows))
        ipc = np.array([x.ipc for x in windows], dtype=float)
        return cls(
            mpki=float(np.average([x.mpki for x in windows], weights=w)),
            apki=None,  # each vCPU's own was compared already: a workload change is UNMEASURED
            ipc=float(w.sum() / (w / ipc).sum()) if np.all(np.isfinite(ipc) & (ipc > 0)) else None,
            n=min(x.n for x in windows),
            settled=all(x.settled for x in windows),
            apki_steady=True,
            instructions=float(w.sum()),
        )


def _spread(values: list[float], mean: float) -> float:
    """(max - min) relative to the mean; 0 for values all (near) zero."""
    if len(values) < 2:
        return 0.0
    width = max(values) - min(values)
    return 0.0 if width <= 1e-12 else width / max(abs(mean), 1e-12)


@dataclass
class _Pending:
    move: Move
    applied_at: float
    before: Window | None
    ticks_after: int = 0
    after: list[Reading] = field(default_factory=list)


@dataclass(frozen=True)
class _Judged:
    pending: _Pending
    after: Window | None
    floated: bool
    outcome: MoveOutcome


class MoveJournal:
    """Remembers recent readings per vCPU and every move until its verdict is in."""

    def __init__(self, settings: VerifySettings) -> None:
        settings.validate()
        self.settings = settings
        self._recent: dict[VCpuKey, deque[Reading]] = {}
        self._totals: dict[VCpuKey, Mapping[str, float]] = {}  # last tick's cumulative counts
        self._pending: dict[VCpuKey, _Pending] = {}
        self._bad: dict[tuple[VCpuKey, CpuSet], float] = {}  # placement -> expiry time

    def bad_placements(self, now: float) -> frozenset[tuple[VCpuKey, CpuSet]]:
        self._bad = {k: t for k, t in self._bad.items() if t > now}
        return frozenset(self._bad)

    def observe(self, snapshot: Snapshot) -> list[MoveOutcome]:
        """Feed one tick's rates; return the verdicts reached this tick.

        Verdicts of ROLLED_BACK are returned for the controller to act on (pin back);
        the journal already remembers the placement as bad.
        """
        s = self.settings
        live: set[VCpuKey] = set()
        for g in snapshot.guests:
            for v in g.vcpus:
                live.add((g.id, v.index))
        readings = {key: self._reading(snapshot, key) for key in live}
        judged: list[_Judged] = []
        for key in list(self._pending):
            p = self._pending[key]
            if key not in live:
                del self._pending[key]
                judged.append(_Judged(p, None, False, self._outcome(p, None, Verdict.UNMEASURED)))
                continue
            p.ticks_after += 1
            reading = readings[key]
            if p.ticks_after > s.settle_ticks and reading is not None:
                p.after.append(reading)
            if p.ticks_after < s.settle_ticks + s.window_ticks:
                continue
            del self._pending[key]
            floated = _domains(snapshot, p.move.from_cpus) > 1
            after = Window.of(p.after, need=1)
            judged.append(_Judged(p, after, floated, self._judge(p, after, snapshot.time, floated=floated)))

        outcomes = self._per_vm(judged, snapshot.time)
        for key, reading in readings.items():
            if reading is not None:
                self._recent.setdefault(key, deque(maxlen=s.window_ticks)).append(reading)
        for key in [k for k in self._recent if k not in live]:
            del self._recent[key]
        for key in [k for k in self._totals if k not in live]:
            del self._totals[key]
        return outcomes

    def _per_vm(self, judged: list[_Judged], now: float) -> list[MoveOutcome]:
        """One verdict for the moves of one VM, or of one swap, applied in one tick: their
        measured windows pooled (see the module doc)."""
        groups: defaultdict[tuple[str, str, float], list[int]] = defaultdict(list)
        for i, j in enumerate(judged):
            o = j.outcome
            if o.mpki_after is not None:  # a vCPU that is gone has nothing to keep or roll back
                by = ("group", o.move.group) if o.move.group else ("vm", o.move.guest_id)
                groups[(*by, o.applied_at)].append(i)
        out = [j.outcome for j in judged]
        for idx in groups.values():
            measured = [judged[i] for i in idx if judged[i].outcome.verdict is not Verdict.UNMEASURED]
            if len(idx) < 2 or not any(j.outcome.verdict is Verdict.ROLLED_BACK for j in measured):
                continue
            before = Window.pool([j.pending.before for j in measured if j.pending.before is not None])
            after = Window.pool([j.after for j in measured if j.after is not None])
            verdict = self._verdict(before, after, floated=any(j.floated for j in measured))
            if verdict is Verdict.UNMEASURED:
                verdict = Verdict.KEPT  # the pooled evidence is no case for undoing them: together, kept
            for i in idx:
                o = out[i]
                bad = (o.move.key, o.move.to_cpus)
                if verdict is Verdict.ROLLED_BACK:
                    self._bad[bad] = now + self.settings.bad_placement_ttl_s
                else:
                    self._bad.pop(bad, None)
                out[i] = replace(o, verdict=verdict)
        return out

    def record(self, move: Move, now: float) -> None:
        """A move was applied: its before-window is what we saw up to now."""
        if move.kind == "rollback":
            return
        recent = self._recent.get(move.key)
        need = min(MIN_BEFORE_TICKS, self.settings.window_ticks)
        before = Window.of(list(recent), need) if recent else None
        self._pending[move.key] = _Pending(move=move, applied_at=now, before=before)
        # Readings from the old placement must not leak into the next move's before-window.
        self._recent.pop(move.key, None)

    def _judge(self, p: _Pending, after: Window | None, now: float, floated: bool = False) -> MoveOutcome:
        """``floated``: the vCPU could run in several LLC domains before the move, so an
        unsettled before-window describes where the scheduler happened to put it, not a placement."""
        before = p.before
        if before is None or after is None:
            return self._outcome(p, after, Verdict.UNMEASURED)
        if not (before.apki_steady and after.apki_steady) or _changed(before.apki, after.apki):
            return self._outcome(p, after, Verdict.UNMEASURED)  # the workload changed, not the placement
        verdict = self._verdict(before, after, floated)
        if verdict is Verdict.ROLLED_BACK:
            self._bad[(p.move.key, p.move.to_cpus)] = now + self.settings.bad_placement_ttl_s
        return self._outcome(p, after, verdict)

    def _verdict(self, before: Window, after: Window, floated: bool) -> Verdict:
        """The rule of the module doc, on one vCPU's windows or a group's pooled ones."""
        s = self.settings
        margin = s.rollback_margin
        worse = after.mpki > before.mpki * (1 + margin) and after.mpki - before.mpki >= s.min_mpki_delta
        if worse and not before.settled and floated:
            return Verdict.UNMEASURED  # no placement to compare with
        if worse and before.ipc is not None and after.ipc is not None:
            # misses more per instruction and runs no faster (unsettled: clearly slower)
            worse = after.ipc < before.ipc * (1.0 if before.settled else 1 - margin)
        elif worse and not before.settled:
            return Verdict.UNMEASURED  # a lone MPKI rise, nothing to compare
        return Verdict.ROLLED_BACK if worse else Verdict.KEPT

    @staticmethod
    def _outcome(p: _Pending, after: Window | None, verdict: Verdict) -> MoveOutcome:
        before = None if p.before is None else p.before.mpki
        return MoveOutcome(p.move, p.applied_at, before, None if after is None else after.mpki, verdict)

    def _reading(self, snapshot: Snapshot, key: VCpuKey) -> Reading | None:
        """This interval's reading: from the cumulative counts when there are, else the rates."""
        r = snapshot.rates.get(key)
        if r is None:
            return None
        totals = r.totals
        prev = self._totals.get(key)
        if INSTRUCTIONS in totals and LLC_MISSES in totals:
            self._totals[key] = dict(totals)
            if prev is None or INSTRUCTIONS not in prev or LLC_MISSES not in prev:
                return None  # the first look: no interval yet
            instr = _delta(totals, prev, INSTRUCTIONS)
            misses = _delta(totals, prev, LLC_MISSES)
            if instr is None or misses is None or instr < MIN_INSTRUCTIONS:
                return None
            refs = _delta(totals, prev, LLC_REFERENCES)
            cycles = _delta(totals, prev, CYCLES)
            return Reading(
                mpki=1000.0 * misses / instr,
                apki=None if refs is None else 1000.0 * refs / instr,
                ipc=instr / cycles if cycles is not None and cycles > 0 else None,
                instructions=instr,
            )
        if r.mpki is None:
            return None
        return Reading(mpki=float(r.mpki), ipc=None if r.ipc is None else float(r.ipc))

    @property
    def pending(self) -> int:
        return len(self._pending)

    def export_state(self) -> dict[str, float]:
        return {f"{k[0]}/{k[1]}|{cpus.to_list()}": t for (k, cpus), t in self._bad.items()}

    def import_state(self, data: dict[str, float]) -> None:
        for name, expiry in data.items():
            vcpu, _, cpus = name.partition("|")
            gid, _, idx = vcpu.rpartition("/")
            self._bad[((gid, int(idx)), CpuSet.parse(cpus))] = float(expiry)


def _delta(now: Mapping[str, float], prev: Mapping[str, float], name: str) -> float | None:
    a, b = now.get(name), prev.get(name)
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or a < b:
        return None
    return a - b


def _domains(snapshot: Snapshot, cpus: CpuSet) -> int:
    """How many LLC domains of the snapshot's topology a CPU set reaches."""
    topo = snapshot.topology
    return len(np.unique(topo.pu_llc[topo.positions(cpus)]))


def _changed(before: float | None, after: float | None) -> bool:
    """Whether the access intensity moved by more than WORKLOAD_CHANGE (unknown: no)."""
    if before is None or after is None:
        return False
    return abs(after - before) > WORKLOAD_CHANGE * max(before, after, 1e-12)
