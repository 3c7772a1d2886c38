"""``adaptive-pin simulate``: run a scenario on the simulated host, closed loop, and score it."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from adaptive_pin.commands._options import split_option
from adaptive_pin.sim.runner import SimResult, run_scenario
from adaptive_pin.sim.scenario import MAX_TICKS, load_scenario, shipped_scenarios, with_run_overrides

ORDER = 60

DESCRIPTION = """\
Run a scenario (a host from a real machine's sysfs, VMs running workloads with measured LLC
miss curves) through the real controller and a policy, on a simulated clock, and report:
  weighted speedup   sum over vCPUs of speed relative to running alone on an idle host
                     (time mean); higher is better
  throughput         instructions per simulated second, all vCPUs
  MPKI               LLC misses per 1000 instructions (never per second: a faster
                     placement misses more per second)
  per-VM slowdown    instructions it would retire alone / instructions it retired here
  migrations         the controller's (pins that moved a thread), the scheduler's, and
                     memory: VMs whose memory the controller migrated to another node
Policy "none" runs no controller: the Linux scheduler alone (load-balanced, blind to cache
pressure), the baseline every policy is compared with. Runs are reproducible (seeded).
The model and its constants: docs/simulator.md. Scenario schema: scenarios/README.md.
"""

EPILOG = """\
examples:
  adaptive-pin simulate demo                         the unpinned baseline of scenarios/demo.toml
  adaptive-pin simulate demo --policy cache-aware    the same under the default policy
  adaptive-pin simulate demo --policy cache-aware --option enter=0.02   a policy option
  adaptive-pin simulate scenarios/churn.toml --policy numa --json > run.json
  adaptive-pin simulate demo --policy cache-aware --plot demo.png
  adaptive-pin simulate demo --policy cache-aware --no-pmu   as on a host without a PMU
  adaptive-pin simulate demo --seed 7 --duration 300

--json carries every applied move with its tick, the final placement of every vCPU and the
time series, so a run can be replayed and audited.

shipped scenarios: {names}
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="run a scenario on the simulated host and score a policy",
        description=DESCRIPTION,
        epilog=EPILOG.replace("{names}", ", ".join(shipped_scenarios()) or "(none found)"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("scenario", metavar="SCENARIO", help="a scenario TOML file, or a shipped scenario's name")
    p.add_argument("--policy", default="none", metavar="NAME", help="placement policy (default: none)")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a policy option (repeatable), e.g. --option enter=0.02 (cache-aware)",
    )
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="draw miss rate, throughput and migrations over time")
    p.add_argument("--seed", type=int, help="override the scenario's RNG seed (an integer >= 0)")
    p.add_argument(
        "--duration",
        type=float,
        metavar="SECONDS",
        help=f"override the scenario's duration (> 0, at most {MAX_TICKS} ticks)",
    )
    p.add_argument(
        "--no-pmu",
        action="store_true",
        help="hide LLC misses, instructions and cycles from the controller (as without a PMU)",
    )
    p.set_defaults(func=run)


def _options(pairs: list[str]) -> dict[str, Any]:
    return dict(split_option(pair, "--option") for pair in pairs)


def run(args: argparse.Namespace) -> int:
    if args.plot:  # before the run: a bad file name or a missing matplotlib fails at once
        from adaptive_pin.sim.plot import check_plot_path

        check_plot_path(args.plot)
    scenario = with_run_overrides(
        load_scenario(args.scenario),
        seed=args.seed,
        duration=args.duration,
        seed_key="--seed",
        duration_key="--duration",
    )
    result = run_scenario(
        scenario,
        args.policy,
        policy_options=_options(args.option),
        hide=("pmu",) if args.no_pmu else (),
    )
    if args.plot:
        from adaptive_pin.sim.plot import plot_result

        plot_result(result, args.plot)
    if args.json:
        json.dump(result.to_dict(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_text(result))
        if args.plot:
            sys.stdout.write(f"plot: {args.plot}\n")
    return 0


def format_text(r: SimResult) -> str:
    mpki = "n/a" if r.mpki is None else f"{r.mpki:.3f}"
    ctl = (
        "none (Linux scheduler only)" if r.control_interval_s is None else f"every {r.control_interval_s:g} s"
    )
    lines = [
        f"scenario {r.scenario} on {r.host}, policy {r.policy}, controller {ctl}",
        f"  {r.duration_s:g} s simulated in {r.wall_s:.2f} s (tick {r.tick_s:g} s, seed {r.seed})"
        + (f", hidden counters: {', '.join(r.hidden_counters)}" if r.hidden_counters else ""),
        f"weighted speedup   {r.weighted_speedup:.3f}  (mean speed vs. alone {r.mean_speed:.3f})",
        f"throughput         {r.throughput_ips / 1e9:.3f} G instructions/s",
        f"MPKI               {mpki}",
        f"migrations         controller {r.migrations['controller']}, scheduler {r.migrations['scheduler']},"
        f" memory {r.migrations['memory']}"
        f"  (moves applied {r.moves_applied}, held back {r.moves_refused})",
    ]
    if r.controller_errors:
        lines.append(
            "controller errors  " + ", ".join(f"{k} {v}" for k, v in sorted(r.controller_errors.items()))
        )
    lines.append("")
    lines.append(f"{'VM':<20} {'workload':<16} {'vCPUs':>5} {'slowdown':>9} {'MPKI':>8}  lifetime")
    for vm in r.vms:
        slow = "-" if vm.slowdown is None else f"{vm.slowdown:.3f}"
        vm_mpki = "-" if vm.mpki is None else f"{vm.mpki:.3f}"
        life = f"{vm.start:g}-{vm.stop:g} s" if vm.stop is not None else f"{vm.start:g} s-"
        lines.append(f"{vm.name:<20} {vm.workload:<16} {vm.vcpus:>5} {slow:>9} {vm_mpki:>8}  {life}")
    return "\n".join(lines) + "\n"
