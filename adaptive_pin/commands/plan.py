"""``adaptive-pin plan``: advisory mode (like ``numad -w``): what would move and why; touches nothing."""

from __future__ import annotations

import argparse
import json
import time

from adaptive_pin.assembly import Assembly, assemble
from adaptive_pin.commands._controller_args import (
    CONTROLLER_EPILOG,
    add_controller_arguments,
    effective_config,
)
from adaptive_pin.config import DEFAULT_PATH
from adaptive_pin.model import MemoryMove, Move, TickReport
from policies.registry import available_policies

ORDER = 30

EPILOG = (
    """\
Samples every vCPU for one interval, asks the policy, and prints each move it would make with
its reason and predicted gain, and what the guard would hold back; then the VMs whose memory
would follow their vCPUs to another NUMA node (migrate_pages, as numad does). Nothing is pinned
and no memory moves.

Examples:
  adaptive-pin plan                                   this host, default policy
  adaptive-pin plan --policy numa --json              numad-like advice, for scripts
  adaptive-pin plan --driver sim --scenario scenarios/demo.toml
"""
    + "\n"
    + CONTROLLER_EPILOG.format(default=DEFAULT_PATH)
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "plan",
        help="advise: print the moves the policy would make, touch nothing",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_controller_arguments(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--list-policies", action="store_true", help="list the policies (plug-ins too) and exit")
    p.set_defaults(func=run)


def move_json(m: Move) -> dict[str, object]:
    return {
        "vm": m.guest_name,
        "uuid": m.guest_id,
        "vcpu": m.vcpu,
        "from": m.from_cpus.to_list(),
        "to": m.to_cpus.to_list(),
        "kind": m.kind,
        "group": m.group,
        "reason": m.reason,
        "predicted_gain": m.predicted_gain,
    }


def memory_move_json(m: MemoryMove) -> dict[str, object]:
    return {
        "vm": m.guest_name,
        "uuid": m.guest_id,
        "from_nodes": m.from_nodes.to_list(),
        "to_nodes": m.to_nodes.to_list(),
        "reason": m.reason,
        "predicted_gain": m.predicted_gain,
    }


def one_decision(args: argparse.Namespace, *, dry_run: bool) -> tuple[TickReport, Assembly]:
    """Warm the rates up over one interval, then one tick. Returns the report and the assembly."""
    config, _ = effective_config(args, **{"controller.dry_run": dry_run or None})
    asm = assemble(config, hide_pmu=args.no_pmu)
    try:
        asm.controller.observe()
        time.sleep(asm.controller.settings.interval_s)
        report = asm.controller.tick(trigger="once", one_shot=True)
    except BaseException:
        asm.controller.close()
        raise
    return report, asm


def list_policies(as_json: bool) -> int:
    policies = available_policies()
    if as_json:
        print(json.dumps(policies, indent=2))
    else:
        width = max(map(len, policies))
        for name, description in policies.items():
            print(f"{name.ljust(width)}  {description}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.list_policies:
        return list_policies(args.json)
    report, asm = one_decision(args, dry_run=True)
    asm.controller.close()
    held = {(m.key, m.to_cpus): why for m, why in report.refused}
    memory_held = {m.guest_id: why for m, why in report.memory_refused}
    if args.json:
        doc = {
            "policy": report.policy,
            "notes": list(report.plan.notes),
            "capabilities": dict(report.snapshot.capabilities),
            "moves": [
                {**move_json(m), "guard": held.get((m.key, m.to_cpus), "would apply")}
                for m in report.plan.moves
            ],
            "memory_moves": [
                {**memory_move_json(m), "guard": memory_held.get(m.guest_id, "would apply")}
                for m in report.plan.memory_moves
            ],
            "errors": dict(report.errors),
            "inventory_errors": dict(report.inventory_errors),
        }
        print(json.dumps(doc, indent=2))
        return 0
    print(f"policy {report.policy}: {len(report.plan.moves)} move(s) proposed, nothing pinned (advisory)")
    for note in report.plan.notes:
        print(f"  note: {note}")
    for m in report.plan.moves:
        verdict = held.get((m.key, m.to_cpus))
        status = "would apply" if verdict is None else f"held: {verdict}"
        print(f"  {m.guest_name} vcpu {m.vcpu}: {m.from_cpus or '-'} -> {m.to_cpus} [{status}]")
        print(f"      {m.reason} (predicted gain {m.predicted_gain:.3g})")
    for mm in report.plan.memory_moves:
        verdict = memory_held.get(mm.guest_id)
        status = "would apply" if verdict is None else f"held: {verdict}"
        print(f"  {mm.guest_name} memory: node(s) {mm.from_nodes} -> {mm.to_nodes} [{status}]")
        print(f"      {mm.reason} (predicted gain {mm.predicted_gain:.3g})")
    for guest, err in report.inventory_errors.items():
        print(f"  {guest}: {err}")
    return 0
