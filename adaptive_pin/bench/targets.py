"""The issue's targets for the default policy, each judged PASS, MISS or n/a (no data in this run).

Every target is judged on its worst case: the smallest gain, the largest MPKI ratio, the
slowest settling over the scenarios it applies to, so one PASS means every scenario passed.

"Share of the best placement" is judged against whichever best a scenario has: the full search's
(the true best) or, where that is over the budget, the whole-VM search's or else the local
search's, each a lower bound of the true best; the scope line names the method per scenario.
Against a lower bound a share below the goal is a sure miss, and one at or above it says the
policy is within 3% of (or beyond) the best placement that search found.

The two weighted-speedup targets also carry a *ceiling*: what the best placement itself reaches
against the same baselines, both scored in the static case (steady state, the best placement's
steady WS over the steady WS of the baseline's final placement). An exhaustive ceiling below the
goal means no placement at the search's granularity (LLC domains) meets the goal there, so a MISS
on that scenario is the scenario's, not the policy's; a whole-VM or local-search ceiling is a
lower bound of the true one and proves nothing unreachable. The ceiling is steady state while the
target is over the whole run, arrivals included, so it is a guide, not a bound the run cannot exceed.

The MPKI target gets two figures, both against none's final placement and scored the same way:
the best placement's own MPKI (the search maximises weighted speedup, not MPKI: where the
placement with the best WS misses the MPKI goal, the two goals pull apart on that scenario) and
the *floor*, the lowest MPKI of any candidate the search scored. An exhaustive floor above the
goal means no LLC-domain placement meets it there; a whole-VM or local-search floor is an upper
bound of the true one (a placement not scored might miss less) and proves nothing unreachable.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from adaptive_pin.bench import optimal
from adaptive_pin.bench.decision_time import DecisionTime, PolicyTiming
from adaptive_pin.bench.runner import STATIC_BASELINES, PolicyRow, RunFigures, ScenarioBench

SUBJECT = "cache-aware"
PASS, MISS, NA = "PASS", "MISS", "n/a"
# The bounds
WS_VS_NONE_GOAL = 1.10  # at least
WS_VS_STATIC_GOAL = 1.05  # at least
MPKI_GOAL = 0.85  # at most
BEST_SHARE_GOAL = 0.97  # at least, where the best placement is known
STEADY_BOUND = 1.0  # migrations per vCPU-hour once settled, at most
SETTLE_BOUND = 3.0  # control ticks from an arrival to its last move, at most


@dataclass(frozen=True)
class TargetResult:
    name: str
    scope: str  # which scenarios (or host) it is judged on
    goal: str  # e.g. ">= 1.10"
    measured: float | None  # the worst case over the scope
    status: str
    detail: str  # per-scenario values
    ceiling: str = ""  # what the best placements reach, per scenario, a line per figure ("": not known)
    unreachable: tuple[str, ...] = ()  # scenarios whose exhaustive ceiling (MPKI: floor) misses the goal


@dataclass(frozen=True)
class Ceiling:
    """A figure of a scenario's searched placements relative to a baseline's (WS ceiling, MPKI)."""

    scenario: str
    value: float
    exact: bool  # from the exhaustive search; else a lower bound of the WS, an upper one of the MPKI floor
    ws_share: float | None = None  # MPKI floor: that placement's steady WS over the best placement's


def _row(sb: ScenarioBench, policy: str) -> PolicyRow | None:
    return next((r for r in sb.rows if r.policy == policy), None)


def vs_best_static(sb: ScenarioBench) -> float | None:
    me = _row(sb, SUBJECT)
    statics = [r.weighted_speedup for r in sb.rows if r.policy in STATIC_BASELINES]
    if me is None or not statics:
        return None
    return me.weighted_speedup / max(statics)


def _steady(sb: ScenarioBench, policy: str, figure: Callable[[RunFigures], float | None]) -> float | None:
    """A steady-state figure of the policy's final placement, median over seeds."""
    row = _row(sb, policy)
    values = [v for v in (figure(r) for r in row.runs) if v is not None] if row is not None else []
    return statistics.median(values) if values else None


def ceilings(benches: Sequence[ScenarioBench], against: Sequence[str]) -> list[Ceiling]:
    """Per scenario with a best placement: its steady WS over the best of ``against``'s."""
    out = []
    for sb in benches:
        if not isinstance(sb.best, optimal.BestPlacement):
            continue
        steady = [_steady(sb, p, lambda r: r.steady_ws) for p in against]
        base = max((v for v in steady if v is not None), default=None)
        if base is not None and base > 0:
            out.append(Ceiling(sb.scenario, sb.best.best_ws / base, sb.best.exact))
    return out


def _mpki_over_none(
    benches: Sequence[ScenarioBench],
    figure: Callable[[optimal.BestPlacement], float | None],
    with_share: bool = False,
) -> list[Ceiling]:
    out = []
    for sb in benches:
        best = sb.best
        if not isinstance(best, optimal.BestPlacement):
            continue
        value = figure(best)
        base = _steady(sb, "none", lambda r: r.steady_mpki)
        if value is None or base is None or not base > 0:
            continue
        share = None
        if with_share and best.lowest_mpki_ws is not None and best.best_ws > 0:
            share = best.lowest_mpki_ws / best.best_ws
        out.append(Ceiling(sb.scenario, value / base, best.exact, share))
    return out


def best_mpki(benches: Sequence[ScenarioBench]) -> list[Ceiling]:
    """Per scenario with a best placement: its steady MPKI over none's final placement's."""
    return _mpki_over_none(benches, lambda b: b.best_mpki)


def lowest_mpki(benches: Sequence[ScenarioBench]) -> list[Ceiling]:
    """Per scenario searched: the lowest steady MPKI of any candidate over none's final placement's,
    with that candidate's share of the best WS (aggregate MPKI also falls when a placement slows
    the threads that miss most)."""
    return _mpki_over_none(benches, lambda b: b.lowest_mpki, with_share=True)


def lowest_mpki_near_best(benches: Sequence[ScenarioBench]) -> list[Ceiling]:
    """The same over the candidates within optimal.NEAR_BEST_SHARE of the best WS."""
    return _mpki_over_none(benches, lambda b: b.lowest_mpki_near_best)


def _mpki_text(found: Sequence[Ceiling]) -> str:
    return ", ".join(
        f"{c.scenario} {'' if c.exact else '<= '}{c.value:.3g}"
        + ("" if c.ws_share is None else f" (its WS {c.ws_share:.3g} of the best)")
        for c in found
    )


def _with_mpki(
    result: TargetResult,
    best: Sequence[Ceiling],
    lowest: Sequence[Ceiling],
    near: Sequence[Ceiling],
    bound: float,
) -> TargetResult:
    if not best and not lowest:
        return result
    parts = []
    if best:
        text = ", ".join(f"{c.scenario} {c.value:.3g}{'' if c.exact else ' (whole VMs)'}" for c in best)
        parts.append(f"the best placement's own MPKI (chosen by weighted speedup; steady state): {text}")
    short: tuple[str, ...] = ()
    if lowest:
        line = f"the lowest MPKI of any placement searched: {_mpki_text(lowest)}"
        if near:
            share = f"{1 - optimal.NEAR_BEST_SHARE:.0%}"
            line += f"; of those within {share} of the best WS: {_mpki_text(near)}"
        if any(not c.exact for c in lowest):
            line += " (<=: a search over whole VMs, an upper bound of the lowest)"
        short = tuple(c.scenario for c in lowest if c.exact and c.value > bound)
        if short:
            line += f"; above the goal on {', '.join(short)}: no LLC-domain placement reaches it there"
        parts.append(line)
    return dataclasses.replace(result, ceiling="\n".join(parts), unreachable=short)


def _with_ceiling(result: TargetResult, found: Sequence[Ceiling], bound: float) -> TargetResult:
    if not found:
        return result
    text = ", ".join(f"{c.scenario} {'' if c.exact else '>= '}{c.value:.3g}" for c in found)
    short = tuple(c.scenario for c in found if c.exact and c.value < bound)
    line = f"the best placement itself (steady state): {text}"
    if any(not c.exact for c in found):
        line += " (>=: a search over whole VMs, a lower bound)"
    if short:
        line += f"; below the goal on {', '.join(short)}: no LLC-domain placement reaches it there"
    return dataclasses.replace(result, ceiling=line, unreachable=short)


def _judge(
    name: str,
    scope: str,
    benches: Sequence[ScenarioBench],
    value: Callable[[ScenarioBench], float | None],
    bound: float,
    higher_is_better: bool,
) -> TargetResult:
    per = [(sb.scenario, value(sb)) for sb in benches]
    known = [(n, v) for n, v in per if v is not None]
    goal = f"{'>=' if higher_is_better else '<='} {bound:g}"
    detail = ", ".join(f"{n} {v:.3g}" for n, v in known)
    if not known:
        return TargetResult(name, scope, goal, None, NA, "no scenario in this run has the figure")
    worst = min(v for _, v in known) if higher_is_better else max(v for _, v in known)
    ok = worst >= bound if higher_is_better else worst <= bound
    return TargetResult(name, scope, goal, worst, PASS if ok else MISS, detail)


def _subject(fn: Callable[[PolicyRow], float | None]) -> Callable[[ScenarioBench], float | None]:
    def value(sb: ScenarioBench) -> float | None:
        row = _row(sb, SUBJECT)
        return None if row is None else fn(row)

    return value


def _best_scope(benches: Sequence[ScenarioBench]) -> str:
    """Which scenarios have a best placement, grouped by the search that found it."""
    by_method: dict[str, list[str]] = {}
    for sb in benches:
        if isinstance(sb.best, optimal.BestPlacement):
            by_method.setdefault(sb.best.method, []).append(sb.scenario)
    if not by_method:
        return "where the best is known"
    parts = []
    for method in (optimal.METHOD, optimal.WHOLE_VM_METHOD, optimal.LOCAL_METHOD):
        if method in by_method:
            bound = "" if method == optimal.METHOD else " (a lower bound of the best)"
            parts.append(f"{', '.join(by_method[method])}: {method}{bound}")
    return "best known by " + "; ".join(parts)


def evaluate(benches: Sequence[ScenarioBench], decision: DecisionTime | None) -> list[TargetResult]:
    mixed = [sb for sb in benches if sb.mixed]
    out = [
        _with_ceiling(
            _judge(
                "weighted speedup vs none",
                "mixed scenarios",
                mixed,
                _subject(lambda r: r.ws_vs_none),
                WS_VS_NONE_GOAL,
                True,
            ),
            ceilings(mixed, ("none",)),
            WS_VS_NONE_GOAL,
        ),
        _with_ceiling(
            _judge(
                "weighted speedup vs best static (pack, uncore, numa)",
                "mixed scenarios",
                mixed,
                vs_best_static,
                WS_VS_STATIC_GOAL,
                True,
            ),
            ceilings(mixed, STATIC_BASELINES),
            WS_VS_STATIC_GOAL,
        ),
        _with_mpki(
            _judge(
                "MPKI vs none", "mixed scenarios", mixed, _subject(lambda r: r.mpki_vs_none), MPKI_GOAL, False
            ),
            best_mpki(mixed),
            lowest_mpki(mixed),
            lowest_mpki_near_best(mixed),
            MPKI_GOAL,
        ),
        _judge(
            "share of the best placement",
            _best_scope(benches),
            benches,
            _subject(lambda r: r.best_share),
            BEST_SHARE_GOAL,
            True,
        ),
        _judge(
            "migrations per vCPU-hour once settled",
            "every scenario with a steady state",
            benches,
            _subject(lambda r: r.steady_migrations_per_vcpu_hour),
            STEADY_BOUND,
            False,
        ),
        _judge(
            "control ticks to settle after an arrival (worst arrival)",
            "every scenario",
            benches,
            _subject(lambda r: r.settle_ticks_max),
            SETTLE_BOUND,
            False,
        ),
    ]
    timing = None if decision is None else next((p for p in decision.policies if p.policy == SUBJECT), None)
    scope = "512 PUs x 2,048 vCPUs"
    if timing is None or decision is None:
        out.append(TargetResult("decision time (s)", scope, "<= 0.1", None, NA, "not measured in this run"))
    else:
        worst = max(timing.cold_s, timing.steady_s)
        out.append(
            TargetResult(
                "decision time (s)",
                f"{decision.pus} PUs x {decision.vcpus:,} vCPUs",
                f"<= {decision.target_s:g}",
                worst,
                PASS if worst <= decision.target_s else MISS,
                f"cold {timing.cold_s * 1e3:.1f} ms, steady {timing.steady_s * 1e3:.1f} ms "
                f"(median of {decision.reps}){_fastest(timing)}",
            )
        )
    return out


def _fastest(timing: PolicyTiming) -> str:
    if timing.cold_min_s is None or timing.steady_min_s is None:
        return ""
    return f"; fastest {timing.cold_min_s * 1e3:.1f} / {timing.steady_min_s * 1e3:.1f} ms"


@dataclass(frozen=True)
class RatioSpread:
    median: float
    worst: float
    best: float
    wins: int  # scenarios where it is above 1.0
    losses: int  # ... below 0.99: more than noise
    count: int
    worst_scenario: str


@dataclass(frozen=True)
class OverBound:
    """How many generated mixes a per-scenario target's bound would fail, and the worst."""

    name: str
    bound: float  # the target's bound (at most this)
    over: int  # mixes above it
    count: int  # mixes with the figure
    worst: float
    worst_scenario: str


@dataclass(frozen=True)
class MixSummary:
    """How cache-aware did on the generated mixes (bench --random): no targets, the spread, and
    how many mixes the per-scenario stability targets' bounds would fail."""

    scenarios: int
    vs_none: RatioSpread | None
    vs_best_static: RatioSpread | None
    over: tuple[OverBound, ...] = ()


def _over(name: str, bound: float, values: Sequence[tuple[str, float | None]]) -> OverBound | None:
    known = [(n, v) for n, v in values if v is not None]
    if not known:
        return None
    worst_name, worst = max(known, key=lambda nv: nv[1])
    return OverBound(name, bound, sum(1 for _, v in known if v > bound + 1e-9), len(known), worst, worst_name)


def _spread(values: Sequence[tuple[str, float | None]]) -> RatioSpread | None:
    known = [(n, v) for n, v in values if v is not None]
    if not known:
        return None
    worst_name, worst = min(known, key=lambda nv: nv[1])
    vals = [v for _, v in known]
    return RatioSpread(
        median=statistics.median(vals),
        worst=worst,
        best=max(vals),
        wins=sum(1 for v in vals if v > 1.0 + 1e-9),
        losses=sum(1 for v in vals if v < 0.99),
        count=len(vals),
        worst_scenario=worst_name,
    )


def random_summary(benches: Sequence[ScenarioBench]) -> MixSummary | None:
    mixes = [sb for sb in benches if sb.source is not None]
    if not mixes:
        return None
    me = [(sb.scenario, _row(sb, SUBJECT)) for sb in mixes]
    over = (
        _over(
            "migrations per vCPU-hour once settled",
            STEADY_BOUND,
            [(n, r.steady_migrations_per_vcpu_hour if r else None) for n, r in me],
        ),
        _over(
            "control ticks to settle after an arrival",
            SETTLE_BOUND,
            [(n, r.settle_ticks_max if r else None) for n, r in me],
        ),
    )
    return MixSummary(
        scenarios=len(mixes),
        vs_none=_spread([(n, r.ws_vs_none if r else None) for n, r in me]),
        vs_best_static=_spread([(sb.scenario, vs_best_static(sb)) for sb in mixes]),
        over=tuple(o for o in over if o is not None),
    )
