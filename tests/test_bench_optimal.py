"""The best-placement searches: the full one (the true best) and the whole-VM one (a lower bound)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from adaptive_pin.bench import optimal, runner, targets
from adaptive_pin.cli import main
from adaptive_pin.sim.scenario import load_scenario, loads_scenario, resolve_scenario_path

# 1 package, 2 LLC domains of 2 single-thread cores: 4 PUs.
TINY_HOST = """
name = "tiny"
duration = 10
tick = 1.0
seed = 3
[host]
synthetic = { packages = 1, llc_per_package = 2, cores_per_llc = 2, threads_per_core = 1, llc_mib = 2 }
"""


def tiny_case(vms: str) -> optimal.StaticCase:
    sc = loads_scenario(TINY_HOST + vms)
    return optimal.static_case(sc, sc.duration)


def is_whole(assignment: dict[str, tuple[int, ...]]) -> bool:
    return all(sum(1 for n in counts if n) <= 1 for counts in assignment.values())


TWO_VMS = """
[[vms]]
name = "sort"
vcpus = 2
workload = "sort"
[[vms]]
name = "triad"
vcpus = 2
workload = "stream-triad"
"""

ONE_WIDE_VM = """
[[vms]]
name = "wide"
vcpus = 4
workload = "intloop"
"""


def test_whole_vm_candidates_are_the_full_spaces_unsplit_ones() -> None:
    case = tiny_case(
        TWO_VMS + ONE_WIDE_VM.replace('"wide"', '"wide-1"') + ONE_WIDE_VM.replace('"wide"', '"wide-2"')
    )
    full = list(optimal.candidates(case))
    whole = list(optimal.whole_vm_candidates(case))
    assert len(full) == optimal.candidate_count(case)
    assert len(whole) == optimal.whole_vm_candidate_count(case)
    # sort, triad: 2 domains each; the two identical wide VMs: a multiset of 2 domains, C(3, 2) = 3.
    assert len(whole) == 2 * 2 * 3
    assert sorted(map(sorted, (a.items() for a in whole))) == sorted(
        map(sorted, (a.items() for a in full if is_whole(a)))
    )


def test_whole_vm_search_finds_the_best_unsplit_placement() -> None:
    case = tiny_case(TWO_VMS)
    scored = [(optimal.steady(case, optimal.affinity_of(case, a))[0], a) for a in optimal.candidates(case)]
    full, whole = optimal.search_full(case), optimal.search_whole_vms(case)
    assert (full.method, full.exact, full.candidates) == (optimal.METHOD, True, 9)
    assert (whole.method, whole.exact, whole.candidates) == (optimal.WHOLE_VM_METHOD, False, 4)
    assert whole.full_candidates == full.candidates == 9
    assert full.best_ws == pytest.approx(max(ws for ws, _ in scored))
    assert whole.best_ws == pytest.approx(max(ws for ws, a in scored if is_whole(a)))
    assert full.best_ws >= whole.best_ws - 1e-12
    # Here the best keeps each VM whole, in a domain of its own: both searches find it.
    assert is_whole(dict(full.assignment))
    assert full.best_ws == pytest.approx(whole.best_ws)
    assert sorted(full.assignment.values()) == [(0, 2), (2, 0)]  # (or the other way round: a tie)


def test_whole_vm_best_is_a_lower_bound_when_the_best_splits_a_vm() -> None:
    # One 4-vCPU VM on two 2-PU domains: whole, two vCPUs time-share each PU; split, none do.
    case = tiny_case(ONE_WIDE_VM)
    full, whole = optimal.search_full(case), optimal.search_whole_vms(case)
    assert dict(full.assignment) == {"wide": (2, 2)}
    assert full.best_ws > whole.best_ws * 1.05


def test_search_falls_back_to_whole_vms_only_when_the_full_space_is_over_budget() -> None:
    case = tiny_case(TWO_VMS)
    assert optimal.search(case, 9).method == optimal.METHOD  # type: ignore[union-attr]
    fallback = optimal.search(case, 8)
    assert isinstance(fallback, optimal.BestPlacement)
    assert (fallback.method, fallback.exact) == (optimal.WHOLE_VM_METHOD, False)
    none = optimal.search(case, 3, local=False)
    assert isinstance(none, optimal.NotSearched)
    assert (none.candidates, none.whole_vm_candidates) == (9, 4)
    assert "9 candidates, 4 with whole VMs only" in none.reason


def test_search_climbs_where_both_exhaustive_counts_are_over_budget() -> None:
    case = tiny_case(TWO_VMS)  # 9 candidates, 4 with whole VMs
    found = optimal.search(case, 3)
    assert isinstance(found, optimal.BestPlacement)
    assert (found.method, found.exact, found.full_candidates) == (optimal.LOCAL_METHOD, False, 9)
    assert found.candidates <= 3 and is_whole(dict(found.assignment))


def test_local_search_reaches_the_whole_vm_best_on_the_shipped_mixes() -> None:
    # Where the whole-VM space is small enough to enumerate, the climb from its two starts ends
    # on the same best (demo: 27 whole-VM candidates, snc: 108), scoring fewer of them.
    for name in ("demo", "snc"):
        sc = load_scenario(resolve_scenario_path(name))
        case = optimal.static_case(sc, sc.duration)
        local, whole = optimal.search_local(case, 4000), optimal.search_whole_vms(case)
        assert local is not None and local.local_optimum is True
        assert local.best_ws == pytest.approx(whole.best_ws, rel=1e-9)
        assert local.candidates < whole.candidates
        assert is_whole(dict(local.assignment))


def test_local_search_stops_on_its_budget_and_says_so() -> None:
    sc = load_scenario(resolve_scenario_path("noisy-neighbours"))
    case = optimal.static_case(sc, sc.duration)
    cut = optimal.search_local(case, 40)
    assert cut is not None
    assert (cut.candidates, cut.local_optimum) == (40, False)
    assert optimal.search_local(case, 0) is None  # nothing scored, nothing to report
    # through search(), a budget of 100 placements of a 16-vCPU scenario is 40 of its 40 vCPUs
    scaled = optimal.search(case, 100)
    assert isinstance(scaled, optimal.BestPlacement)
    assert (scaled.method, scaled.candidates) == (optimal.LOCAL_METHOD, 40)


def test_local_search_never_scores_a_placement_twice() -> None:
    # Placements that differ only in which of two interchangeable VMs is where are one.
    twins = TWO_VMS.replace('name = "sort"', 'name = "sort-b"').replace('name = "triad"', 'name = "triad-b"')
    case = tiny_case(TWO_VMS + twins)
    seen: list[tuple[tuple[str, ...], tuple[str, ...]]] = []
    real = optimal.steady

    def counting(c: optimal.StaticCase, affinity: Any) -> tuple[float, float | None]:
        doms = {vm: str(affinity[(vm, 0)]) for vm in ("sort", "sort-b", "triad", "triad-b")}
        seen.append(
            (tuple(sorted((doms["sort"], doms["sort-b"]))), tuple(sorted((doms["triad"], doms["triad-b"]))))
        )
        return real(c, affinity)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(optimal, "steady", counting)
        found = optimal.search_local(case, 1000)
    assert found is not None and found.local_optimum is True
    assert found.candidates == len(seen) == len(set(seen))
    assert len(seen) <= optimal.whole_vm_candidate_count(case) == 9


def test_report_json_and_targets_name_the_whole_vm_method(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # demo has 216 candidates, 27 with whole VMs: a budget of 100 takes the whole-VM search.
    monkeypatch.setattr(runner, "QUICK_SEARCH_BUDGET", 100)
    argv = ["bench", "--quick", "--scenario", "demo", "--no-decision-time", "--policy", "cache-aware"]
    assert main([*argv, "--json"]) == 0
    doc: dict[str, Any] = json.loads(capsys.readouterr().out)
    (sc,) = doc["scenarios"]
    best = sc["best"]
    assert (best["method"], best["exact"], best["candidates"], best["full_candidates"]) == (
        optimal.WHOLE_VM_METHOD,
        False,
        27,
        216,
    )
    assert set(doc["definitions"]["best_placement_methods"]) == {
        optimal.METHOD,
        optimal.WHOLE_VM_METHOD,
        optimal.LOCAL_METHOD,
    }
    share = next(t for t in doc["targets"] if t["name"] == "share of the best placement")
    assert share["scope"] == "best known by demo: exhaustive, whole VMs (a lower bound of the best)"
    measured = next(r["best_share"] for r in sc["rows"] if r["policy"] == "cache-aware")
    assert share["measured"] == pytest.approx(measured)
    assert share["status"] == (targets.PASS if measured >= 0.97 else targets.MISS)

    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "best placement: exhaustive, whole VMs search over 27 candidates (the full 216" in out
    assert "a lower bound of the true best" in out
    assert "demo: exhaustive, whole VMs" in out


def test_full_search_is_kept_where_it_fits(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "bench",
                "--quick",
                "--scenario",
                "demo",
                "--no-decision-time",
                "--policy",
                "cache-aware",
                "--json",
            ]
        )
        == 0
    )
    doc = json.loads(capsys.readouterr().out)
    (sc,) = doc["scenarios"]
    assert (sc["best"]["method"], sc["best"]["exact"]) == (optimal.METHOD, True)
    share = next(t for t in doc["targets"] if t["name"] == "share of the best placement")
    assert share["scope"] == "best known by demo: exhaustive"


def test_huge_candidate_counts_are_shown_as_a_power_of_ten() -> None:
    from adaptive_pin.bench.optimal import count_text

    assert count_text(4_900) == "4,900"
    assert count_text(999_999_999_999) == "999,999,999,999"
    assert count_text(3 * 10**40) == "about 10^40"


@pytest.mark.parametrize(
    ("budget", "method"),
    [("216", optimal.METHOD), ("215", optimal.WHOLE_VM_METHOD), ("26", optimal.LOCAL_METHOD)],
)
def test_search_budget_chooses_the_search(
    capsys: pytest.CaptureFixture[str], budget: str, method: str | None
) -> None:
    # demo: 216 candidates, 27 with whole VMs; the budget given wins over --quick's 300
    argv = ["bench", "--quick", "--scenario", "demo", "--no-decision-time", "--policy", "cache-aware"]
    assert main([*argv, "--search-budget", budget, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    (sc,) = doc["scenarios"]
    assert sc["best"]["method"] == method
    assert doc["definitions"]["best_placement_budget"] == int(budget)
    assert sc["best"]["candidates"] <= int(budget)


def test_report_says_where_the_local_search_stopped() -> None:
    from adaptive_pin.bench.report import _best_text

    sc = load_scenario(resolve_scenario_path("demo"))
    case = optimal.static_case(sc, sc.duration)
    done, cut = optimal.search_local(case, 4000), optimal.search_local(case, 5)
    assert done is not None and cut is not None
    text = _best_text(done)
    assert f"local search, whole VMs over {done.candidates} candidates, stopped at a local optimum" in text
    assert "(the full 216 are over the budget)" in text and "a lower bound of the true best" in text
    assert "stopped at the budget, before a local optimum" in _best_text(cut)


def test_generated_mixes_skip_the_local_search_named_scenarios_get_it() -> None:
    # The same scenario, over both exhaustive budgets: as a --random mix (it has a source) it is
    # not searched, as a scenario file it is climbed.
    sc = load_scenario(resolve_scenario_path("demo"))  # 216 candidates, 27 with whole VMs
    options = runner.BenchOptions(quick=True, seeds=1, budget=20)
    mix = runner.bench_scenario(sc, ["none"], options, lambda _msg: None, source="(generated)")
    named = runner.bench_scenario(sc, ["none"], options, lambda _msg: None)
    assert isinstance(mix.best, optimal.NotSearched)
    assert isinstance(named.best, optimal.BestPlacement) and named.best.method == optimal.LOCAL_METHOD
