"""``adaptive-pin status``: the guests a driver sees, their vCPU threads, and who may move them."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from adaptive_pin.commands._common import (
    DRIVER_HELP_EPILOG,
    add_driver_arguments,
    open_driver_from_args,
    seconds,
)
from adaptive_pin.config import DEFAULT_PATH, load_config, pinnability_rules
from adaptive_pin.drivers.base import Driver
from adaptive_pin.errors import UsageError
from adaptive_pin.live_table import NO_PMU
from adaptive_pin.model import LLC_MISSES, VCPU_RATE_FIELDS, Guest, Inventory, VCpu, VCpuKey, VCpuRates
from adaptive_pin.runtime import build_runtime
from collectors.sampler import Sampler, SamplerResult

ORDER = 20

DESCRIPTION = """\
Show the running guests one driver sees: each vCPU's host thread, the CPUs it may run on,
the CPU it last ran on (/proc/<pid>/task/<tid>/stat field 39), the NUMA nodes holding the
guest's memory where known (libvirt <numatune>, else /proc/<pid>/numa_maps: nodes with >= 10%
of its pages), and whether adaptive-pin may move it, with the source of that answer (config,
metadata, orchestrator, default).
With --sample (default 1 s) it also measures each vCPU's rates over that interval: CPU
utilization, LLC misses per kilo-instruction, IPC and run-queue delay, or "n/a: no PMU" where
the host has no hardware counters. --watch keeps a live table on the terminal.
Per-guest problems are listed and do not fail the command; exit 1 only when the driver fails.
"""

EPILOG = f"""\
Examples:
  adaptive-pin status                              libvirt domains + other QEMUs (else plain QEMU)
  adaptive-pin status --driver qemu --qmp web1=/run/qemu/web1.qmp
  adaptive-pin status --driver libvirt --libvirt-uri qemu:///session --json
  adaptive-pin status --driver sim --scenario my-host.toml
  adaptive-pin status --watch --sample 2             live table
  adaptive-pin status --sample 0 --json            inventory only, no counters opened

{DRIVER_HELP_EPILOG}"""


@dataclass(frozen=True)
class StatusRow:
    """One line of the table: a vCPU, or a guest with no vCPU to show."""

    guest: Guest
    vcpu: VCpu | None
    rates: VCpuRates | None = None  # filled once status shows rates


@dataclass(frozen=True)
class Column:
    header: str
    cell: Callable[[StatusRow], str]
    right: bool = False  # numbers align right


def _opt(value: object) -> str:
    return "-" if value is None else str(value)


def _note(row: StatusRow) -> str:
    g = row.guest
    if row.vcpu is not None and row.vcpu.index != g.vcpus[0].index:
        return ""  # guest-wide notes go on its first line only
    notes = [g.problem] if g.problem else []
    notes.append(g.pinnability.reason)
    notes.extend(g.pinnability.warnings)
    return "; ".join(n for n in notes if n)


COLUMNS: list[Column] = [
    Column("GUEST", lambda r: r.guest.name),
    Column("VCPU", lambda r: _opt(r.vcpu and r.vcpu.index), right=True),
    Column("TID", lambda r: _opt(r.vcpu and r.vcpu.tid), right=True),
    Column("ALLOWED", lambda r: "-" if r.vcpu is None else r.vcpu.affinity.to_list() or "(none)"),
    Column("LAST", lambda r: _opt(r.vcpu and r.vcpu.last_cpu), right=True),
    Column("MEMNODES", lambda r: "-" if r.guest.memory_nodes is None else r.guest.memory_nodes.to_list()),
    Column("MANAGED", lambda r: "yes" if r.guest.pinnability.managed else "no"),
    Column("SOURCE", lambda r: r.guest.pinnability.source.value),
    Column("NOTE", _note),
]


def rows_of(inventory: Inventory) -> list[StatusRow]:
    rows: list[StatusRow] = []
    for guest in sorted(inventory.guests, key=lambda g: (g.name, g.id)):
        if not guest.vcpus:
            rows.append(StatusRow(guest, None))
        rows.extend(StatusRow(guest, v) for v in guest.vcpus)
    return rows


def render_table(rows: Sequence[StatusRow], columns: Sequence[Column] = COLUMNS) -> str:
    cells = [[c.cell(r) for c in columns] for r in rows]
    widths = [max([len(c.header), *(len(line[i]) for line in cells)]) for i, c in enumerate(columns)]

    def fmt(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if c.right else v.ljust(w) for v, w, c in zip(values, widths, columns, strict=True)
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([fmt([c.header for c in columns]), *(fmt(line) for line in cells)])


def guest_json(guest: Guest) -> dict[str, Any]:
    p = guest.pinnability
    return {
        "id": guest.id,
        "name": guest.name,
        "driver": guest.driver,
        "pid": guest.pid,
        "memory_nodes": None if guest.memory_nodes is None else guest.memory_nodes.to_list(),
        "orchestrator_pinned": guest.orchestrator_pinned,
        "problem": guest.problem,
        "pinnability": {
            "managed": p.managed,
            "source": p.source.value,
            "reason": p.reason,
            "whole_cores": p.whole_cores,
            "latency_sensitive": p.latency_sensitive,
            "warnings": list(p.warnings),
        },
        "vcpus": [
            {"index": v.index, "tid": v.tid, "allowed": v.affinity.to_list(), "last_cpu": v.last_cpu}
            for v in guest.vcpus
        ],
    }


def inventory_json(driver: str, inventory: Inventory) -> dict[str, Any]:
    return {
        "driver": driver,
        "guests": [guest_json(g) for g in sorted(inventory.guests, key=lambda g: (g.name, g.id))],
        "errors": dict(inventory.errors),
    }


def render_text(driver: str, inventory: Inventory) -> str:
    n = len(inventory.guests)
    lines = [f"driver {driver}: {n} guest{'s' if n != 1 else ''}"]
    if inventory.guests:
        lines.append(render_table(rows_of(inventory)))
    if inventory.errors:
        lines.append("errors:")
        lines.extend(f"  {key}: {msg}" for key, msg in sorted(inventory.errors.items()))
    return "\n".join(lines)


def _rate_cell(name: str, fmt: str) -> Callable[[StatusRow], str]:
    def cell(row: StatusRow) -> str:
        if row.rates is None:
            return "-"
        value: float | None = getattr(row.rates, name)
        if value is not None:
            return format(value, fmt)
        return NO_PMU if row.rates.missing.get(name, "").startswith("no PMU") else "-"

    return cell


RATE_FIELDS = (
    ("UTIL", "utilization", ".0%"),
    ("MPKI", "mpki", ".2f"),
    ("IPC", "ipc", ".2f"),
    ("DELAY", "run_delay", ".1%"),
)
RATE_COLUMNS: tuple[Column, ...] = tuple(
    Column(header, _rate_cell(name, fmt), right=True) for header, name, fmt in RATE_FIELDS
)
NOT_SAMPLED = "no rates for this vCPU (its thread was not sampled)"


def rate_gaps(rows: Sequence[StatusRow]) -> list[str]:
    """Why rate cells show "-": one line per reason, with the columns and vCPUs it covers.

    "n/a: no PMU" cells explain themselves and the capabilities lines say why; every other
    missing rate (e.g. "warming up") is listed here so text says what JSON says.
    """
    gaps: dict[str, tuple[list[str], set[VCpuKey]]] = {}
    for r in rows:
        if r.vcpu is None:
            continue
        key = (r.guest.id, r.vcpu.index)
        for header, name, _ in RATE_FIELDS:
            if r.rates is None:
                why = NOT_SAMPLED
            elif getattr(r.rates, name) is not None:
                continue
            else:
                why = r.rates.missing.get(name) or "unknown"
                if why.startswith("no PMU"):
                    continue
            headers, keys = gaps.setdefault(why, ([], set()))
            if header not in headers:
                headers.append(header)
            keys.add(key)
    return [
        f"  -: {why} ({', '.join(headers)}; {len(keys)} vCPU{'s' if len(keys) != 1 else ''})"
        for why, (headers, keys) in sorted(gaps.items())
    ]


def rates_json(rates: VCpuRates | None) -> dict[str, Any] | None:
    if rates is None:
        return None
    return {
        **{n: getattr(rates, n) for n in VCPU_RATE_FIELDS},
        "missing": dict(rates.missing),
    }


def _sampled(driver: Driver, sampler: Sampler, seconds: float) -> tuple[Inventory, SamplerResult]:
    """Two looks ``seconds`` apart: rates are differences, the first look only opens counters."""
    sampler.sample(driver.inventory().guests)
    time.sleep(seconds)
    inventory = driver.inventory()
    return inventory, sampler.sample(inventory.guests)


def run(args: argparse.Namespace) -> int:
    # The daemon's view: its [[pinnability.vm]] overrides, its counters, its smoothing.
    config = load_config(args.config)
    driver = open_driver_from_args(args, rules=pinnability_rules(config))
    try:
        if args.sample <= 0 and not args.watch:
            inventory, result = driver.inventory(), None
        else:
            runtime = build_runtime(
                driver, sysfs_root=str(config.host.sysfs_root), collectors=config.collectors
            )
            sampler = Sampler(runtime.collectors, half_life_s=config.controller.half_life_s)
            try:
                if args.watch:
                    return _watch(driver, sampler, max(args.sample, 0.2))
                inventory, result = _sampled(driver, sampler, args.sample)
            finally:
                sampler.close()
    finally:
        driver.close()
    if args.json:
        doc = inventory_json(driver.name, inventory)
        if result is not None:
            doc["capabilities"] = dict(result.capabilities)
            for g in doc["guests"]:
                for v in g["vcpus"]:
                    v["rates"] = rates_json(result.rates.get((g["id"], v["index"])))
        print(json.dumps(doc, indent=2))
        return 0
    if result is None:
        print(render_text(driver.name, inventory))
        return 0
    rows = [
        replace(r, rates=result.rates.get((r.guest.id, r.vcpu.index))) if r.vcpu else r
        for r in rows_of(inventory)
    ]
    n = len(inventory.guests)
    print(f"driver {driver.name}: {n} guest{'s' if n != 1 else ''}, rates over {args.sample:g}s")
    if rows:
        print(render_table(rows, (*COLUMNS[:-1], *RATE_COLUMNS, COLUMNS[-1])))
    for line in rate_gaps(rows):
        print(line)
    missing = {k: v for k, v in result.capabilities.items() if v}
    for counter, why in sorted(missing.items()):
        print(f"  {counter}: n/a: {why}")
    for key, msg in sorted(inventory.errors.items()):
        print(f"  {key}: {msg}")
    return 0


def _watch(driver: Driver, sampler: Sampler, interval: float) -> int:
    from adaptive_pin import live_table

    if not sys.stdout.isatty():
        raise UsageError("--watch needs a terminal; use --json for scripts")
    sampler.sample(driver.inventory().guests)

    def fetch() -> tuple[Sequence[Guest], Mapping[VCpuKey, VCpuRates], bool]:
        inventory = driver.inventory()
        result = sampler.sample(inventory.guests)
        no_pmu = bool(result.capabilities.get(LLC_MISSES))
        return inventory.guests, result.rates, no_pmu

    live_table.watch(fetch, interval, title=f"adaptive-pin status ({driver.name})")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "status",
        help="guests, their vCPU threads and pinnability",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_driver_arguments(parser)
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=f"config file for per-VM pinnability overrides and [collectors] (default: {DEFAULT_PATH} "
        "if present)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--sample",
        type=seconds,
        default=1.0,
        metavar="SECONDS",
        help="measure rates (util, MPKI, IPC, run delay) over this long; 0: inventory only (default 1)",
    )
    parser.add_argument("--watch", action="store_true", help="live table, refreshed every --sample seconds")
    parser.set_defaults(func=run)
