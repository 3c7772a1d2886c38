"""``adaptive-pin bench``: every scenario under every policy in one run, against the targets."""

from __future__ import annotations

import argparse
import json
import sys
import time

from adaptive_pin.bench import decision_time, report, runner, targets
from adaptive_pin.commands._options import split_option
from adaptive_pin.errors import UsageError

ORDER = 70

DESCRIPTION = """\
Run every shipped scenario (or the ones named) under every policy, several seeds each, on
the simulated host, and print one table per scenario, figures relative to "none" (the Linux
scheduler alone) measured in this same run:
  WS/none       weighted speedup over none's (higher is better)
  thru/none     aggregate instructions/s over none's
  MPKI/none     aggregate LLC misses per 1000 instructions over none's (lower is better)
  migr/vCPU-h   the controller's migrations per vCPU-hour (steady: once settled)
  settle max    control ticks from a VM's arrival to the last move it caused
  best share    steady weighted speedup of the final placement over the best placement:
                exhaustive search where small enough, else exhaustive over whole-VM
                placements, else a local search over whole-VM placements (both a
                lower bound of the best; generated mixes: not searched)
Then the time one decision takes on a 512-PU host with 2,048 vCPUs, and every target judged
PASS or MISS on its worst scenario. Definitions: docs/bench.md.
"""

EPILOG = """\
examples:
  adaptive-pin bench                                  everything (several minutes)
  adaptive-pin bench --quick                          60 s scenarios, 1 seed, small search
  adaptive-pin bench --scenario demo --policy cache-aware --policy pack
  adaptive-pin bench --scenario my-host.toml --no-decision-time
  adaptive-pin bench --random 24 --seeds 1 --no-decision-time   mixes nobody tuned for
  adaptive-pin bench --random 12 --random-hosts synthetic --seeds 1 --no-decision-time
                                                      ... on host shapes nobody ships
  adaptive-pin bench --json > bench.json              every figure and every run
  adaptive-pin bench --policy-option miss_cost_ns=30 --no-decision-time
                                                      cache-aware with one option changed
  adaptive-pin bench --scenario mixed-cloud --policy cache-aware --search-budget 110000
                                                      the exact best placement (about 40 min)

exit status: 0 when the bench ran (whatever the targets say; --strict: 1 on a MISS), 2 on bad input.
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "bench",
        help="every scenario under every policy, side by side, against the targets",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--scenario",
        action="append",
        default=[],
        metavar="NAME|FILE",
        help="a shipped scenario's name or a scenario file (repeatable; default: every shipped one)",
    )
    p.add_argument(
        "--policy",
        action="append",
        default=[],
        metavar="NAME",
        help="a policy to run (repeatable; default: every registered one; none always runs)",
    )
    p.add_argument(
        "--seeds", type=int, metavar="N", help="seeds per scenario x policy (default 3; 1 with --quick)"
    )
    p.add_argument(
        "--quick", action="store_true", help="scenarios cut to 60 s, a smaller best-placement search"
    )
    p.add_argument(
        "--no-decision-time", action="store_true", help="skip timing one decision on the 512-PU host"
    )
    p.add_argument(
        "--random",
        type=int,
        default=0,
        metavar="N",
        help="add N generated VM mixes on the shipped hosts in turn (alone: only those; "
        "summarised apart, no targets)",
    )
    p.add_argument(
        "--random-seed", type=int, default=0, metavar="S", help="seed of the generated mixes (default 0)"
    )
    p.add_argument(
        "--random-hosts",
        choices=runner.RANDOM_HOSTS,
        default="shipped",
        help="hosts of the generated mixes: the shipped real machines in turn (default), or "
        "synthetic shapes drawn by the same seed (1-4 packages x 1-8 LLCs x 4-16 cores, SMT or "
        "not, up to 256 PUs): topologies no scenario ships",
    )
    p.add_argument(
        "--search-budget",
        type=int,
        metavar="N",
        help=f"candidates the best-placement search may score (default {runner.SEARCH_BUDGET:,}; "
        f"{runner.QUICK_SEARCH_BUDGET} with --quick); a scenario whose full count is within it "
        "gets the exact best, e.g. 110000 for mixed-cloud (about 40 min here)",
    )
    p.add_argument(
        "--policy-option",
        action="append",
        default=[],
        metavar="[POLICY:]KEY=VALUE",
        help=f"build POLICY (default {targets.SUBJECT}, the one the targets judge) with this option "
        "(repeatable; docs/policies.md has each policy's, a wrong one is named with the valid "
        "ones): A/B a calibration against a run without it",
    )
    p.add_argument("--strict", action="store_true", help="exit 1 when any target is missed")
    p.add_argument("--json", action="store_true", help="machine-readable output: every figure and every run")
    p.set_defaults(func=run)


def _policy_options(items: list[str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    form, example = "[POLICY:]KEY=VALUE", "miss_cost_ns=30"
    for item in items:
        key, value = split_option(item, "--policy-option", form, example)
        name, colon, key = key.rpartition(":")
        if colon and not (name.strip() and key.strip()):
            raise UsageError(f"--policy-option {item!r}: expected {form}, e.g. {example}")
        out.setdefault(name.strip() or targets.SUBJECT, {})[key.strip()] = value
    return out


def run(args: argparse.Namespace) -> int:
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    if seeds < 1:
        raise UsageError(f"--seeds: expected a positive integer, got {seeds}")
    if args.random < 0:
        raise UsageError(f"--random: expected a non-negative integer, got {args.random}")
    if args.random_seed < 0:
        raise UsageError(f"--random-seed: expected a non-negative integer, got {args.random_seed}")
    if args.search_budget is not None and args.search_budget < 0:
        raise UsageError(f"--search-budget: expected a non-negative integer, got {args.search_budget}")
    policy_options = _policy_options(args.policy_option)
    options = runner.BenchOptions(
        scenarios=tuple(args.scenario),
        policies=tuple(args.policy),
        seeds=seeds,
        quick=args.quick,
        random=args.random,
        random_seed=args.random_seed,
        random_hosts=args.random_hosts,
        budget=args.search_budget,
        policy_options=policy_options,
    )
    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"bench: {msg} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

    benches = runner.run_bench(options, progress)
    decision = None
    if not args.no_decision_time:
        progress("decision time, 512 PUs x 2,048 vCPUs")
        timed = [p for p in runner.resolve_policies(options.policies) if p != runner.BASELINE]
        decision = decision_time.measure(timed, reps=3 if args.quick else 5, options=policy_options)
    judged = targets.evaluate(benches, decision)
    wall = time.perf_counter() - t0
    if args.json:
        print(json.dumps(report.to_json(benches, decision, judged, options, wall), indent=2))
    else:
        print(report.text(benches, decision, judged, options, wall), end="")
    return 1 if args.strict and any(t.status == targets.MISS for t in judged) else 0
