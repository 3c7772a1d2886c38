"""The bench's two outputs: aligned text tables for people, and JSON (the same figures, and every run)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from adaptive_pin.bench import optimal, settle
from adaptive_pin.bench.decision_time import DecisionTime
from adaptive_pin.bench.runner import MIXED_SCENARIOS, BenchOptions, PolicyRow, ScenarioBench
from adaptive_pin.bench.targets import MixSummary, RatioSpread, TargetResult, random_summary

JSON_VERSION = 3  # 2: best placements carry exact / full_candidates; 3: the local search, local_optimum
COLUMNS = (
    ("policy", 12),
    ("WS", 8),
    ("WS/none", 8),
    ("thru/none", 9),
    ("MPKI/none", 9),
    ("migr/vCPU-h", 11),
    ("steady", 7),
    ("settle max", 10),
    ("best share", 10),
)


def _f(value: float | None, fmt: str = ".3f") -> str:
    return "-" if value is None else format(value, fmt)


def _line(cells: Sequence[str]) -> str:
    first, *rest = (
        cell.ljust(width) if i == 0 else cell.rjust(width)
        for i, (cell, (_, width)) in enumerate(zip(cells, COLUMNS, strict=True))
    )
    return "  ".join([first, *rest]).rstrip()


def _row_cells(r: PolicyRow) -> list[str]:
    return [
        r.policy,
        _f(r.weighted_speedup),
        _f(r.ws_vs_none),
        _f(r.throughput_vs_none),
        _f(r.mpki_vs_none),
        _f(r.migrations_per_vcpu_hour, ".1f"),
        _f(r.steady_migrations_per_vcpu_hour, ".1f"),
        _f(r.settle_ticks_max, "g"),
        _f(r.best_share),
    ]


def _best_text(best: optimal.BestPlacement | optimal.NotSearched) -> str:
    if isinstance(best, optimal.NotSearched):
        return f"best placement: not searched ({best.reason})"
    vms = ", ".join(f"{vm} {'+'.join(map(str, n))}" for vm, n in best.assignment.items())
    if best.exact:
        head = f"best placement: {best.method} search over {best.candidates:,} candidates"
        note = ""
    elif best.local_optimum is not None:
        stop = "a local optimum" if best.local_optimum else "the budget, before a local optimum"
        head = (
            f"best placement: {best.method} over {best.candidates:,} candidates, stopped at {stop} "
            f"(the full {optimal.count_text(best.full_candidates)} are over the budget)"
        )
        note = (
            "\n  a lower bound of the true best (a placement it did not score may be better): "
            "a best share above 1.0 can be right"
        )
    else:
        head = (
            f"best placement: {best.method} search over {best.candidates:,} candidates "
            f"(the full {best.full_candidates:,} are over the budget)"
        )
        note = (
            "\n  a lower bound of the true best (which may split a VM): a best share above 1.0 can be right"
        )
    return (
        f"{head} in {best.wall_s:.1f} s: steady WS {best.best_ws:.3f} (worst candidate {best.worst_ws:.3f})"
        f"{note}\n  vCPUs per LLC domain [{' | '.join(best.domains)}]: {vms}"
    )


def scenario_text(sb: ScenarioBench) -> str:
    tag = "  [mixed]" if sb.mixed else ""
    lines = [
        f"== {sb.scenario}{tag}: {sb.host}, {sb.vcpus} vCPUs, {sb.arrivals} arrivals, "
        f"{sb.duration_s:g} s, control every {sb.control_interval_s:g} s",
        _line([name for name, _ in COLUMNS]),
        *(_line(_row_cells(r)) for r in sb.rows),
        _best_text(sb.best),
    ]
    memory = [f"{r.policy} {r.memory_migrations:g}" for r in sb.rows if r.memory_migrations]
    if memory:
        lines.append(f"memory migrations (VMs per run, median): {', '.join(memory)}")
    errors = [f"{r.policy} {r.controller_errors}" for r in sb.rows if r.controller_errors]
    if errors:
        lines.append(f"controller errors (all seeds): {', '.join(errors)}")
    return "\n".join(lines)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"({seconds * 1e3:.1f})"


def decision_text(d: DecisionTime) -> str:
    lines = [
        f"== decision time: {d.pus} PUs ({d.llc_domains} LLC domains), {d.vms} VMs, {d.vcpus:,} vCPUs; "
        f"{d.host}",
        f"{'policy':<12}  {'cold ms':>8}  {'(fastest)':>9}  {'steady ms':>9}  {'(fastest)':>9}  {'moves':>6}"
        f"   target <= {d.target_s * 1e3:g} ms (median of {d.reps})",
    ]
    lines += [
        f"{p.policy:<12}  {p.cold_s * 1e3:>8.1f}  {_ms(p.cold_min_s):>9}  {p.steady_s * 1e3:>9.1f}  "
        f"{_ms(p.steady_min_s):>9}  {p.moves_cold:>6}"
        for p in d.policies
    ]
    if d.tick_s is not None and d.tick_first_s is not None:
        lines.append(
            f"whole controller tick (cache-aware, sim driver): first {d.tick_first_s * 1e3:.0f} ms, "
            f"then {d.tick_s * 1e3:.0f} ms (median)"
        )
    return "\n".join(lines)


def random_text(m: MixSummary, options: BenchOptions) -> str:
    lines = [
        f"== random mixes (bench --random {options.random} --random-seed {options.random_seed}"
        f"{' --random-hosts synthetic' if options.random_hosts == 'synthetic' else ''}): "
        f"cache-aware on {m.scenarios} generated scenario(s), no targets",
        f"{'':<18}  {'median':>7}  {'worst':>7}  {'best':>7}  {'above 1':>8}  {'below 0.99':>10}"
        "  worst scenario",
    ]
    for label, spread in (("WS / none", m.vs_none), ("WS / best static", m.vs_best_static)):
        if spread is None:
            lines.append(f"{label:<18}  -")
            continue
        lines.append(_spread_line(label, spread))
    for o in m.over:
        lines.append(
            f"{o.name} above {o.bound:g}: {o.over}/{o.count} mixes (worst {o.worst:.3g}, {o.worst_scenario})"
        )
    lines.append(
        "  rerun one alone: its TOML is in --json (scenarios[].source), or regenerate with the same flags"
    )
    return "\n".join(lines)


def _spread_line(label: str, s: RatioSpread) -> str:
    return (
        f"{label:<18}  {s.median:>7.3f}  {s.worst:>7.3f}  {s.best:>7.3f}  "
        f"{f'{s.wins}/{s.count}':>8}  {f'{s.losses}/{s.count}':>10}  {s.worst_scenario}"
    )


def targets_text(targets: Sequence[TargetResult]) -> str:
    width = max(len(t.name) for t in targets)
    lines = ["== targets (cache-aware; each judged on its worst scenario)"]
    for t in targets:
        measured = _f(t.measured, ".3g")
        lines.append(f"{t.status:<4}  {t.name:<{width}}  {t.goal:<7}  measured {measured:<7}  {t.scope}")
        if t.detail:
            lines.append(f"      {t.detail}")
        lines.extend(f"      {line}" for line in t.ceiling.splitlines())
    return "\n".join(lines)


def text(
    benches: Sequence[ScenarioBench],
    decision: DecisionTime | None,
    targets: Sequence[TargetResult],
    options: BenchOptions,
    wall_s: float,
) -> str:
    head = (
        f"adaptive-pin bench: {len(benches)} scenario(s), median of {options.seeds} seed(s)"
        f"{', quick' if options.quick else ''}; ratios are paired per seed against none\n"
        "WS weighted speedup; thru throughput; migr controller migrations per vCPU-hour (steady: once "
        f"settled); settle: control ticks, worst arrival; best share: steady WS of the final "
        f"placement / the best placement's (each scenario's search method is named under its table)"
    )
    if options.policy_options:
        given = "; ".join(
            f"{name} " + ", ".join(f"{k}={v}" for k, v in sorted(opts.items()))
            for name, opts in sorted(options.policy_options.items())
        )
        head += f"\npolicy options (bench --policy-option; every other option at its default): {given}"
    parts = [head, *(scenario_text(sb) for sb in benches)]
    mixes = random_summary(benches)
    if mixes is not None:
        parts.append(random_text(mixes, options))
    if decision is not None:
        parts.append(decision_text(decision))
    parts.append(targets_text(targets))
    parts.append(f"bench took {wall_s:.0f} s")
    return "\n\n".join(parts) + "\n"


def to_json(
    benches: Sequence[ScenarioBench],
    decision: DecisionTime | None,
    targets: Sequence[TargetResult],
    options: BenchOptions,
    wall_s: float,
) -> dict[str, Any]:
    scenarios = []
    for sb in benches:
        d = dataclasses.asdict(sb)
        d["best"] = {
            "method": sb.best.method if isinstance(sb.best, optimal.BestPlacement) else None,
            **dataclasses.asdict(sb.best),
        }
        scenarios.append(d)
    return {
        "version": JSON_VERSION,
        "quick": options.quick,
        "seeds": options.seeds,
        "policy_options": {n: dict(sorted(o.items())) for n, o in sorted(options.policy_options.items())},
        "definitions": {
            "mixed_scenarios": sorted(MIXED_SCENARIOS),
            "settle_window_ticks": settle.SETTLE_WINDOW_TICKS,
            "steady_after_ticks": settle.STEADY_AFTER_TICKS,
            "best_placement_methods": {
                optimal.METHOD: "every LLC-domain placement: the true best (exact)",
                optimal.WHOLE_VM_METHOD: "whole-VM placements only, where the full count is over the budget: "
                "a lower bound of the true best (not exact), so a share against it can exceed 1.0",
                optimal.LOCAL_METHOD: "hill-climbing over whole-VM placements within the budget, where both "
                "exhaustive counts are over it: a lower bound of the true best (not exact); local_optimum "
                "says whether it stopped at a local optimum (true) or on the budget (false)",
            },
            "best_placement_budget": options.search_budget,
            "steady_state_ticks": {"warmup": optimal.WARMUP_TICKS, "measure": optimal.MEASURE_TICKS},
        },
        "scenarios": scenarios,
        "random_mixes": _random_json(benches, options),
        "decision_time": None if decision is None else dataclasses.asdict(decision),
        "targets": [dataclasses.asdict(t) for t in targets],
        "wall_s": wall_s,
    }


def _random_json(benches: Sequence[ScenarioBench], options: BenchOptions) -> dict[str, Any] | None:
    m = random_summary(benches)
    if m is None:
        return None
    return {
        "count": options.random,
        "seed": options.random_seed,
        "hosts": options.random_hosts,
        **dataclasses.asdict(m),
    }
