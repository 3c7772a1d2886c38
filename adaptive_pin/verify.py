"""The verify step: did each move help? MPKI over a window before and after, rollback if worse.

MPKI, not misses per second: a vCPU that runs faster after a move also misses more per
second, and that is a success. The before-window is the vCPU's last ``window_ticks`` MPKI
readings before the move; the after-window starts ``settle_ticks`` after it (caches refill,
the smoothed rates catch up) and lasts ``window_ticks``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from adaptive_pin.model import CpuSet, Move, MoveOutcome, Snapshot, VCpuKey, Verdict


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


@dataclass
class _Pending:
    move: Move
    applied_at: float
    before: float | None
    ticks_after: int = 0
    after: list[float] = field(default_factory=list)


class MoveJournal:
    """Remembers recent MPKI per vCPU and every move until its verdict is in."""

    def __init__(self, settings: VerifySettings) -> None:
        settings.validate()
        self.settings = settings
        self._recent: dict[VCpuKey, deque[float]] = {}
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
        outcomes: list[MoveOutcome] = []
        for key in list(self._pending):
            p = self._pending[key]
            if key not in live:
                del self._pending[key]
                outcomes.append(self._outcome(p, None, Verdict.UNMEASURED))
                continue
            p.ticks_after += 1
            mpki = self._mpki(snapshot, key)
            if p.ticks_after > s.settle_ticks and mpki is not None:
                p.after.append(mpki)
            if p.ticks_after < s.settle_ticks + s.window_ticks:
                continue
            del self._pending[key]
            after = float(np.mean(p.after)) if p.after else None
            outcomes.append(self._judge(p, after, snapshot.time))

        for key in live:
            mpki = self._mpki(snapshot, key)
            if mpki is not None:
                self._recent.setdefault(key, deque(maxlen=s.window_ticks)).append(mpki)
        for key in [k for k in self._recent if k not in live]:
            del self._recent[key]
        return outcomes

    def record(self, move: Move, now: float) -> None:
        """A move was applied: its before-window is what we saw up to now."""
        if move.kind == "rollback":
            return
        recent = self._recent.get(move.key)
        before = float(np.mean(recent)) if recent else None
        self._pending[move.key] = _Pending(move=move, applied_at=now, before=before)
        # Readings from the old placement must not leak into the next move's before-window.
        self._recent.pop(move.key, None)

    def _judge(self, p: _Pending, after: float | None, now: float) -> MoveOutcome:
        s = self.settings
        if p.before is None or after is None:
            return self._outcome(p, after, Verdict.UNMEASURED)
        worse = after > p.before * (1 + s.rollback_margin) and after - p.before >= s.min_mpki_delta
        if worse:
            self._bad[(p.move.key, p.move.to_cpus)] = now + s.bad_placement_ttl_s
            return self._outcome(p, after, Verdict.ROLLED_BACK)
        return self._outcome(p, after, Verdict.KEPT)

    @staticmethod
    def _outcome(p: _Pending, after: float | None, verdict: Verdict) -> MoveOutcome:
        return MoveOutcome(p.move, p.applied_at, p.before, after, verdict)

    @staticmethod
    def _mpki(snapshot: Snapshot, key: VCpuKey) -> float | None:
        r = snapshot.rates.get(key)
        return None if r is None else r.mpki

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
