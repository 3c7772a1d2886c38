"""``adaptive-pin apply``: one shot: sample for an interval, decide, act, report before and after."""

from __future__ import annotations

import argparse
import json
import time

from adaptive_pin.commands._controller_args import CONTROLLER_EPILOG, add_controller_arguments
from adaptive_pin.commands.plan import memory_move_json, move_json, one_decision
from adaptive_pin.config import DEFAULT_PATH
from adaptive_pin.model import TickReport, VCpuKey

ORDER = 40

EPILOG = (
    """\
Samples every vCPU for one interval, decides, pins (the guard's cooldowns, budget and
usable-CPU checks apply; its hold-for-K-ticks does not, since you asked for this tick), then
samples one more interval and prints each moved vCPU's MPKI before and after. The pins stay:
`adaptive-pin run --restore-on-exit` is the mode that puts things back.

Examples:
  adaptive-pin apply --interval 10
  adaptive-pin apply --policy uncore --json
"""
    + "\n"
    + CONTROLLER_EPILOG.format(default=DEFAULT_PATH)
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "apply",
        help="one shot: sample, decide, pin, report MPKI before and after",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_controller_arguments(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def _mpki(report: TickReport, key: VCpuKey) -> float | None:
    r = report.snapshot.rates.get(key)
    return None if r is None else r.mpki


def run(args: argparse.Namespace) -> int:
    report, asm = one_decision(args, dry_run=False)
    ctl = asm.controller
    try:
        if report.applied:
            time.sleep(ctl.settings.interval_s)
        after = ctl.observe()
    finally:
        ctl.close()
    rows = []
    for m in report.applied:
        ra = after.rates.get(m.key)
        rows.append(
            {
                **move_json(m),
                "mpki_before": _mpki(report, m.key),
                "mpki_after": None if ra is None else ra.mpki,
            }
        )
    failed = [{**move_json(m), "why": why} for m, why in report.refused if why.startswith(("pin", "guest"))]
    if args.json:
        print(
            json.dumps(
                {
                    "policy": report.policy,
                    "applied": rows,
                    "failed": failed,
                    "memory_migrated": [memory_move_json(m) for m in report.memory_applied],
                    "memory_failed": [
                        {**memory_move_json(m), "why": why}
                        for m, why in report.memory_refused
                        if why.startswith("migration failed")
                    ],
                    "notes": list(report.plan.notes),
                    "errors": dict(report.errors),
                },
                indent=2,
            )
        )
        return 1 if failed and not rows else 0
    print(f"policy {report.policy}: {len(rows)} vCPU(s) moved, {len(failed)} failed")
    for note in report.plan.notes:
        print(f"  note: {note}")

    def fmt(x: object) -> str:
        return "n/a" if x is None else f"{x:.3g}"

    for r in rows:
        print(
            f"  {r['vm']} vcpu {r['vcpu']}: {r['from'] or '-'} -> {r['to']}: "
            f"MPKI {fmt(r['mpki_before'])} -> {fmt(r['mpki_after'])}  ({r['reason']})"
        )
    for f in failed:
        print(f"  {f['vm']} vcpu {f['vcpu']}: not moved: {f['why']}")
    for mm in report.memory_applied:
        print(f"  {mm.guest_name} memory: node(s) {mm.from_nodes} -> {mm.to_nodes} ({mm.reason})")
    for mm, why in report.memory_refused:
        if why.startswith("migration failed"):
            print(f"  {mm.guest_name} memory: not migrated: {why}")
    return 1 if failed and not rows else 0
