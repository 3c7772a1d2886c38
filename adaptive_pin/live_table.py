"""The live per-vCPU table of ``adaptive-pin status --watch``.

:func:`table_rows` and :func:`render` are pure (testable without a tty); :func:`watch` draws
them with curses until ``q`` or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import curses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from adaptive_pin.model import Guest, VCpuKey, VCpuRates

NO_PMU = "n/a: no PMU"
COLUMNS = ("VM", "vCPU", "tid", "on", "allowed", "util", "MPKI", "IPC", "delay")


@dataclass(frozen=True)
class Row:
    vm: str
    vcpu: int
    tid: str
    last_cpu: str
    allowed: str
    util: str
    mpki: str
    ipc: str
    run_delay: str

    def cells(self) -> tuple[str, ...]:
        return (
            self.vm,
            str(self.vcpu),
            self.tid,
            self.last_cpu,
            self.allowed,
            self.util,
            self.mpki,
            self.ipc,
            self.run_delay,
        )


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _num(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _counter(x: float | None, why: str | None, no_pmu: bool) -> str:
    if x is not None:
        return f"{x:.2f}"
    return NO_PMU if no_pmu or (why or "").startswith("no PMU") else "-"


def table_rows(
    guests: Sequence[Guest], rates: Mapping[VCpuKey, VCpuRates], *, no_pmu: bool = False
) -> list[Row]:
    """One row per vCPU, guests and vCPUs in order; "-" where a value is not known (yet)."""
    rows: list[Row] = []
    for g in sorted(guests, key=lambda g: g.name):
        for v in sorted(g.vcpus, key=lambda v: v.index):
            r = rates.get((g.id, v.index), VCpuRates())
            last = r.last_cpu if r.last_cpu is not None else v.last_cpu
            rows.append(
                Row(
                    vm=g.name,
                    vcpu=v.index,
                    tid="-" if v.tid is None else str(v.tid),
                    last_cpu="-" if last is None else str(last),
                    allowed=v.affinity.to_list() or "-",
                    util=_pct(r.utilization),
                    mpki=_counter(r.mpki, r.missing.get("mpki"), no_pmu),
                    ipc=_counter(r.ipc, r.missing.get("ipc"), no_pmu),
                    run_delay=_pct(r.run_delay),
                )
            )
    return rows


def render(rows: Sequence[Row], width: int | None = None) -> list[str]:
    """The table as text lines (header first), columns padded to fit, cut to ``width``."""
    table = [COLUMNS, *(r.cells() for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    right = {1, 2, 3, 5, 6, 7, 8}  # numbers align right
    lines = []
    for line in table:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        text = "  ".join(cells).rstrip()
        lines.append(text if width is None else text[:width])
    return lines


Fetch = Callable[[], tuple[Sequence[Guest], Mapping[VCpuKey, VCpuRates], bool]]


def watch(fetch: Fetch, interval_s: float = 1.0, title: str = "adaptive-pin status") -> None:
    """Redraw the table every ``interval_s`` until ``q``; ``fetch`` returns (guests, rates, no_pmu)."""

    def loop(screen: curses.window) -> None:
        curses.curs_set(0)
        screen.timeout(int(interval_s * 1000))
        while True:
            guests, rates, no_pmu = fetch()
            height, width = screen.getmaxyx()
            screen.erase()
            header = f"{title}  {time.strftime('%H:%M:%S')}  {len(rates)} vCPUs  (q to quit)"
            screen.addnstr(0, 0, header, width - 1, curses.A_BOLD)
            for y, line in enumerate(render(table_rows(guests, rates, no_pmu=no_pmu), width - 1), start=2):
                if y >= height:
                    break
                screen.addnstr(y, 0, line, width - 1, curses.A_REVERSE if y == 2 else curses.A_NORMAL)
            screen.refresh()
            if screen.getch() in (ord("q"), ord("Q")):
                return

    with contextlib.suppress(KeyboardInterrupt):
        curses.wrapper(loop)
