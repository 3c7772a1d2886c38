"""Run every scenario under every policy and seed, and reduce the runs to one row per policy.

Ratios to ``none`` are paired: each seed's figure over ``none``'s under the same seed (the same
arrivals and scheduler noise), then the median over seeds; absolute figures are medians too.
``none`` is always run, since every ratio needs it.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from adaptive_pin.bench import optimal, random_mix, settle
from adaptive_pin.errors import UsageError
from adaptive_pin.model import CpuSet
from adaptive_pin.sim.host import load_host_topology
from adaptive_pin.sim.runner import SimResult, run_scenario
from adaptive_pin.sim.scenario import SCENARIO_DIR, Scenario, load_scenario

log = logging.getLogger("adaptive_pin.bench")

BASELINE = "none"
STATIC_BASELINES = ("pack", "uncore", "numa")
# Scenarios where cache-hungry and cache-sensitive VMs share a host with a choice of LLC
# domains: the ones the weighted-speedup and MPKI targets are judged on (docs/bench.md).
MIXED_SCENARIOS = frozenset({"demo", "mixed-cloud", "noisy-neighbours", "snc"})
QUICK_DURATION_S = 60.0
SEARCH_BUDGET = 4000  # candidates: phase-change's 3,150 take about 40 s here
QUICK_SEARCH_BUDGET = 300


@dataclass(frozen=True)
class RunFigures:
    """One scenario x policy x seed."""

    seed: int
    weighted_speedup: float
    throughput_ips: float
    mpki: float | None
    migrations: settle.Migrations
    arrivals: tuple[settle.Arrival, ...] | None  # None: no controller ran
    steady_ws: float | None  # its final placement in the static case; None when not scored
    controller_errors: int
    wall_s: float
    memory_migrations: int = 0  # VMs whose memory the controller migrated
    steady_mpki: float | None = None  # aggregate MPKI of its final placement in the static case


@dataclass(frozen=True)
class PolicyRow:
    """One policy on one scenario: medians over seeds."""

    policy: str
    weighted_speedup: float
    ws_vs_none: float
    throughput_vs_none: float
    mpki: float | None
    mpki_vs_none: float | None
    migrations_per_vcpu_hour: float
    steady_migrations_per_vcpu_hour: float | None
    settle_ticks_max: float | None  # worst arrival of a run, median over seeds
    settle_ticks_median: float | None
    best_share: float | None  # steady WS of its final placement / the best placement's
    controller_errors: int
    runs: tuple[RunFigures, ...]
    memory_migrations: float = 0.0  # per run, median over seeds


@dataclass(frozen=True)
class ScenarioBench:
    scenario: str
    origin: str
    description: str
    host: str
    mixed: bool
    duration_s: float
    vcpus: int
    arrivals: int
    control_interval_s: float
    rows: tuple[PolicyRow, ...]
    best: optimal.BestPlacement | optimal.NotSearched
    source: str | None = None  # a generated scenario's TOML text (bench --random); None: a file


RANDOM_HOSTS = ("shipped", "synthetic")


@dataclass(frozen=True)
class BenchOptions:
    scenarios: tuple[str, ...] = ()  # files or shipped names; empty: every shipped scenario
    policies: tuple[str, ...] = ()  # empty: every registered policy
    seeds: int = 3
    quick: bool = False
    random: int = 0  # generated mixes to add (adaptive_pin.bench.random_mix)
    random_seed: int = 0
    random_hosts: str = "shipped"  # RANDOM_HOSTS: the shipped machines in turn, or drawn shapes
    budget: int | None = None  # best-placement candidates; None: the default for quick or not
    # per policy name, options its constructor takes (bench --policy-option); others: defaults
    policy_options: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    @property
    def search_budget(self) -> int:
        if self.budget is not None:
            return self.budget
        return QUICK_SEARCH_BUDGET if self.quick else SEARCH_BUDGET


def shipped_scenario_files() -> list[Path]:
    """Every scenarios/*.toml shipped beside the package (a source tree or editable install)."""
    return sorted(SCENARIO_DIR.glob("*.toml")) if SCENARIO_DIR.is_dir() else []


def resolve_policies(requested: Sequence[str]) -> tuple[str, ...]:
    """The policies to run, ``none`` first; unknown names -> UsageError listing the known ones."""
    from policies.registry import available_policies

    known = list(available_policies())
    bad = [p for p in requested if p not in known]
    if bad:
        raise UsageError(f"--policy {bad[0]}: unknown policy (known: {', '.join(known)})")
    chosen = list(dict.fromkeys(requested)) if requested else known
    return (BASELINE, *(p for p in chosen if p != BASELINE))


def check_policy_options(options: Mapping[str, Mapping[str, str]], policies: Sequence[str]) -> None:
    """Each policy given options runs, and takes them (UsageError before any simulation)."""
    from policies.registry import get_policy

    for name, opts in options.items():
        if name not in policies:
            raise UsageError(f"--policy-option {name}:...: {name} is not run here (add --policy {name})")
        get_policy(name, **opts)


def load_scenarios(requested: Sequence[str]) -> list[Scenario]:
    if requested:
        return [load_scenario(s) for s in requested]
    files = shipped_scenario_files()
    if not files:
        raise UsageError(
            f"no shipped scenarios in {SCENARIO_DIR} (an installed package does not carry them): "
            "give --scenario FILE"
        )
    return [load_scenario(f) for f in files]


def _median(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None and b > 0 else None


def _final_affinity(result: SimResult) -> dict[optimal.VCpuName, CpuSet]:
    return {(p.vm, p.vcpu): CpuSet.parse(p.affinity) for p in result.final_placement}


def _figures(result: SimResult, sc: Scenario, case: optimal.StaticCase | None, scored: bool) -> RunFigures:
    steady_ws, steady_mpki = (
        optimal.steady(case, _final_affinity(result)) if case is not None and scored else (None, None)
    )
    return RunFigures(
        seed=result.seed,
        weighted_speedup=result.weighted_speedup,
        throughput_ips=result.throughput_ips,
        mpki=result.mpki,
        migrations=settle.migrations(result, sc),
        arrivals=settle.arrivals(result, sc),
        steady_ws=steady_ws,
        controller_errors=sum(result.controller_errors.values()),
        wall_s=result.wall_s,
        memory_migrations=result.migrations.get("memory", 0),
        steady_mpki=steady_mpki,
    )


def _row(policy: str, runs: list[RunFigures], base: list[RunFigures], best_ws: float | None) -> PolicyRow:
    def settle_stat(run: RunFigures, how: Callable[[list[int]], float]) -> float | None:
        if run.arrivals is None or not run.arrivals:
            return None
        return how([a.settle_ticks for a in run.arrivals])

    paired = list(zip(runs, base, strict=True))
    return PolicyRow(
        policy=policy,
        weighted_speedup=statistics.median(r.weighted_speedup for r in runs),
        ws_vs_none=statistics.median(r.weighted_speedup / b.weighted_speedup for r, b in paired),
        throughput_vs_none=statistics.median(r.throughput_ips / b.throughput_ips for r, b in paired),
        mpki=_median([r.mpki for r in runs]),
        mpki_vs_none=_median([_ratio(r.mpki, b.mpki) for r, b in paired]),
        migrations_per_vcpu_hour=statistics.median(r.migrations.per_vcpu_hour for r in runs),
        steady_migrations_per_vcpu_hour=_median([r.migrations.steady_per_vcpu_hour for r in runs]),
        settle_ticks_max=_median([settle_stat(r, max) for r in runs]),
        settle_ticks_median=_median([settle_stat(r, statistics.median) for r in runs]),
        best_share=_median([_ratio(r.steady_ws, best_ws) for r in runs]),
        controller_errors=sum(r.controller_errors for r in runs),
        runs=tuple(runs),
        memory_migrations=statistics.median(r.memory_migrations for r in runs),
    )


def bench_scenario(
    sc: Scenario,
    policies: Sequence[str],
    options: BenchOptions,
    progress: Callable[[str], None],
    source: str | None = None,
) -> ScenarioBench:
    duration = min(sc.duration, QUICK_DURATION_S) if options.quick else sc.duration
    sc = dataclasses.replace(sc, duration=duration)
    topology = load_host_topology(sc.host)
    case = optimal.static_case(sc, duration, topology)
    progress(f"{sc.name}: best placement")
    # Generated mixes (source given) skip the local search: they have no targets, and its
    # seconds per mix would add up to most of a --random run.
    best = optimal.search(case, options.search_budget, local=source is None)
    scored = isinstance(best, optimal.BestPlacement)
    by_policy: dict[str, list[RunFigures]] = {}
    for policy in policies:
        progress(f"{sc.name}: {policy} x {options.seeds} seed(s)")
        by_policy[policy] = [
            _figures(
                run_scenario(sc, policy, seed=sc.seed + i, policy_options=options.policy_options.get(policy)),
                sc,
                case,
                scored,
            )
            for i in range(options.seeds)
        ]
    base = by_policy[BASELINE]
    best_ws = best.best_ws if isinstance(best, optimal.BestPlacement) else None
    return ScenarioBench(
        scenario=sc.name,
        origin=sc.origin,
        description=sc.description,
        host=sc.host.topology or "synthetic",
        mixed=sc.name in MIXED_SCENARIOS,
        duration_s=duration,
        vcpus=sc.vcpu_count,
        arrivals=sum(1 for vm in sc.vms if vm.start < duration),
        control_interval_s=settle.control_interval(sc),
        rows=tuple(_row(p, runs, base, best_ws) for p, runs in by_policy.items()),
        best=best,
        source=source,
    )


def run_bench(
    options: BenchOptions, progress: Callable[[str], None] = lambda _msg: None
) -> list[ScenarioBench]:
    if options.seeds < 1:
        raise UsageError(f"--seeds: expected a positive integer, got {options.seeds}")
    if options.random < 0:
        raise UsageError(f"--random: expected a non-negative integer, got {options.random}")
    policies = resolve_policies(options.policies)
    check_policy_options(options.policy_options, policies)
    # --random alone runs only the generated mixes; with --scenario, both.
    named = load_scenarios(options.scenarios) if options.scenarios or not options.random else []
    out = [bench_scenario(sc, policies, options, progress) for sc in named]
    if options.random_hosts not in RANDOM_HOSTS:
        raise UsageError(
            f"--random-hosts: expected one of {', '.join(RANDOM_HOSTS)}, got {options.random_hosts!r}"
        )
    synthetic = options.random_hosts == "synthetic"
    for mix in random_mix.generate(options.random, options.random_seed, synthetic=synthetic):
        out.append(bench_scenario(mix.scenario, policies, options, progress, source=mix.text))
    return out
