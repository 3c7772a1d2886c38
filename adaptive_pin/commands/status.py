"""``adaptive-pin status``: the guests a driver sees, their vCPU threads, and who may move them."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from adaptive_pin.commands._common import DRIVER_HELP_EPILOG, add_driver_arguments, open_driver_from_args
from adaptive_pin.model import Guest, Inventory, VCpu, VCpuRates

ORDER = 20

DESCRIPTION = """\
Show the running guests one driver sees: each vCPU's host thread, the CPUs it may run on,
the CPU it last ran on (/proc/<pid>/task/<tid>/stat field 39), and whether adaptive-pin may
move it, with the source of that answer (config, metadata, orchestrator, default).
Per-guest problems are listed and do not fail the command; exit 1 only when the driver fails.
"""

EPILOG = f"""\
Examples:
  adaptive-pin status                              libvirt if it answers, else plain QEMU
  adaptive-pin status --driver qemu --qmp web1=/run/qemu/web1.qmp
  adaptive-pin status --driver libvirt --libvirt-uri qemu:///session --json
  adaptive-pin status --driver sim --scenario scenarios/two-llc.toml

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


def run(args: argparse.Namespace) -> int:
    driver = open_driver_from_args(args)
    try:
        inventory = driver.inventory()
    finally:
        driver.close()
    if args.json:
        print(json.dumps(inventory_json(driver.name, inventory), indent=2))
    else:
        print(render_text(driver.name, inventory))
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
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)
