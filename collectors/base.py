"""The Collector protocol, shared by perf_event_open, /proc and the simulator.

Every collector answers :meth:`Collector.sample` (a :class:`ThreadCounters` per thread). A
collector that reads thousands of threads a second may also answer
:meth:`BatchCollector.sample_batch`: the same counters as one row per thread of a
:class:`Roster`, in numpy arrays, so that no Python object is built per thread per round. The
sampler prefers the batch path where a collector has it and converts where it has not
(:func:`batch_from_counters`); a batch collector gets its ``sample()`` from the batch path
(:func:`counters_from_batch`), so both paths share one implementation.

A collector with ``exact_liveness = True`` is sampled first, and which rows it saw is passed
to the others as ``alive`` (see :meth:`BatchCollector.sample_batch`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice, repeat
from types import MappingProxyType
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from adaptive_pin.model import ThreadCounters, ThreadRef

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

NO_REASONS: Mapping[str, str] = MappingProxyType({})  # the shared "nothing missing"
NO_CPU = -1  # Batch.last_cpu where the collector does not know it
READ_CHUNK = 64  # reads per timestamp in read_each


@runtime_checkable
class Collector(Protocol):
    """Reads cumulative counters of threads; never turns a missing counter into 0."""

    name: str

    def sample(self, threads: Sequence[ThreadRef]) -> dict[int, ThreadCounters]:
        """Counters for each thread id asked for that still exists.

        Threads not asked for any more are forgotten (their fds closed). A thread that vanished
        is left out of the result, not reported as zeros.
        """
        ...

    def capabilities(self) -> Mapping[str, str | None]:
        """Counter name -> None when available, else the reason in words (e.g. "no PMU")."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True, eq=False)
class Roster:
    """The threads to sample, in a fixed row order.

    The sampler hands the *same* object round after round while the inventory does not change,
    so a collector may key its per-row state on ``roster is self._last_roster`` and rebuild it
    only when a new roster arrives.
    """

    refs: tuple[ThreadRef, ...]
    tids: tuple[int, ...] = field(init=False)
    pids: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tids", tuple(r.tid for r in self.refs))
        object.__setattr__(self, "pids", tuple(r.pid for r in self.refs))

    def __len__(self) -> int:
        return len(self.refs)


@dataclass(frozen=True, eq=False)
class Batch:
    """One round's counters of a roster's threads: row ``i`` is ``roster.refs[i]``.

    ``time[i]`` is NaN for a thread that is gone (the row says nothing); a thread that is there
    but lacks a counter has NaN in that column and the reason in ``missing[i]`` (rows share
    mapping objects: build each distinct one once).
    """

    columns: tuple[str, ...]
    values: FloatArray  # (rows, len(columns)) cumulative counts in the columns' units
    time: FloatArray  # (rows,) time.monotonic() of the read (may be interpolated: read_each); NaN: gone
    last_cpu: IntArray  # (rows,) stat field 39; NO_CPU where unknown
    missing: Sequence[Mapping[str, str]]  # (rows,) counter -> why not given

    @property
    def seen(self) -> npt.NDArray[np.bool_]:
        return ~np.isnan(self.time)


@runtime_checkable
class BatchCollector(Collector, Protocol):
    """A collector that can also fill a whole roster's rows at once (see :class:`Batch`)."""

    def sample_batch(self, roster: Roster, alive: npt.NDArray[np.bool_] | None = None) -> Batch:
        """Like ``sample(roster.refs)``, as arrays. Threads not in the roster are forgotten.

        ``alive``, when given, says which rows' threads exist this round, as told by a collector
        with ``exact_liveness = True`` (procfs: its kept fds answer ESRCH once a thread is gone,
        even if the tid was reused); a collector may then skip its own check and treat the
        other rows as gone.
        """
        ...


def batch_from_counters(roster: Roster, got: Mapping[int, ThreadCounters]) -> Batch:
    """A per-thread answer (``Collector.sample``) as a :class:`Batch` over ``roster``."""
    n = len(roster)
    tcs = [got.get(tid) for tid in roster.tids]
    columns: dict[str, int] = {}
    for tc in tcs:
        if tc is not None:
            for c in tc.values:
                columns.setdefault(c, len(columns))
    values = np.full((n, len(columns)), math.nan)
    when = np.full(n, math.nan)
    last_cpu = np.full(n, NO_CPU, np.int64)
    missing: list[Mapping[str, str]] = [NO_REASONS] * n
    for i, tc in enumerate(tcs):
        if tc is None:
            continue
        when[i] = tc.time
        for c, v in tc.values.items():
            values[i, columns[c]] = v
        if tc.last_cpu is not None:
            last_cpu[i] = tc.last_cpu
        if tc.missing:
            missing[i] = tc.missing
    return Batch(tuple(columns), values, when, last_cpu, missing)


def counters_from_batch(roster: Roster, batch: Batch) -> dict[int, ThreadCounters]:
    """A :class:`Batch` as ``Collector.sample`` answers: one ThreadCounters per thread still there."""
    out: dict[int, ThreadCounters] = {}
    rows = batch.values.tolist()
    cpus = batch.last_cpu.tolist()
    for i, (tid, t) in enumerate(zip(roster.tids, batch.time.tolist(), strict=True)):
        if math.isnan(t):
            continue
        vals = {c: v for c, v in zip(batch.columns, rows[i], strict=True) if not math.isnan(v)}
        cpu = cpus[i]
        out[tid] = ThreadCounters(tid, t, vals, batch.missing[i], None if cpu == NO_CPU else cpu)
    return out


def read_each(
    call: Callable[..., int],
    fds: Sequence[int],
    bufs: Sequence[object],
    *more: object,
    chunk: int = READ_CHUNK,
) -> tuple[IntArray, FloatArray]:
    """``call(fds[j], bufs[j], *more)`` for every ``j``, looped in C (``map``), not in Python.

    Returns the calls' results, -1 where one raised OSError (the loop resumes after it), and
    the time.monotonic() each call ended at, interpolated: one timestamp is taken before and
    after every ``chunk`` calls, and the ``j``-th of a stretch of ``k`` calls is put at
    ``t0 + (t1 - t0) * (j + 1) / k``. Why that is accurate enough: the calls of a stretch are
    the same syscall on alike threads, so they take about equally long; the error of a row's
    time is at most the stretch's length (64 reads of a few µs: well under a millisecond, i.e.
    under 0.1 % of a 1 s interval), and a rate depends on the *difference* between two rounds'
    times of the same row, which sits at the same position each round, so most of it cancels.
    Only a preemption inside a stretch spreads its length over that stretch (a per-call
    timestamp taken after the syscall was off by as much when preempted in between).
    """
    m = len(fds)
    got: list[int] = []
    marks: list[tuple[int, float, float]] = []  # (calls done, t0, t1) per stretch
    monotonic = time.monotonic
    pos = 0
    while pos < m:
        stop = min(m, pos + chunk)
        t0 = monotonic()
        try:
            got.extend(map(call, islice(fds, pos, stop), islice(bufs, pos, stop), *map(repeat, more)))
        except OSError:
            got.append(-1)  # the call at len(got) raised; the ones before it are in got
        marks.append((len(got), t0, monotonic()))
        pos = len(got)
    if not marks:
        return np.empty(0, np.int64), np.empty(0)
    ends = np.array([e for e, _, _ in marks], np.int64)
    starts = np.concatenate(([0], ends[:-1]))
    t0s = np.array([t for _, t, _ in marks])
    t1s = np.array([t for _, _, t in marks])
    seg = np.repeat(np.arange(len(marks)), ends - starts)
    j = np.arange(1, m + 1) - starts[seg]  # 1-based position within its stretch
    when = t0s[seg] + (t1s - t0s)[seg] * (j / (ends - starts)[seg])
    return np.array(got, np.int64), when
