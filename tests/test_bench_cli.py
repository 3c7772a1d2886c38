"""``adaptive-pin bench``: the grid's figures, the targets' verdicts, and one-line errors."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from adaptive_pin.bench import targets
from adaptive_pin.cli import main

QUICK = ["bench", "--quick", "--scenario", "demo", "--no-decision-time"]


def bench_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    rc = main([*QUICK, *argv, "--json"])
    out, _ = capsys.readouterr()
    return rc, json.loads(out)


def test_rows_are_paired_against_none_in_the_same_run(capsys: pytest.CaptureFixture[str]) -> None:
    rc, doc = bench_json(capsys, "--policy", "cache-aware", "--policy", "pack", "--seeds", "2")
    assert rc == 0
    (sc,) = doc["scenarios"]
    rows = {r["policy"]: r for r in sc["rows"]}
    assert list(rows) == ["none", "cache-aware", "pack"]  # none always runs, first
    none = rows["none"]
    assert none["ws_vs_none"] == 1.0 and none["throughput_vs_none"] == 1.0 and none["mpki_vs_none"] == 1.0
    assert none["migrations_per_vcpu_hour"] == 0.0  # no controller, no controller migrations
    for r in rows.values():
        assert [run["seed"] for run in r["runs"]] == [sc["rows"][0]["runs"][0]["seed"] + i for i in (0, 1)]
    # A static policy pins every vCPU once its VM arrives: migrations are positive.
    assert rows["pack"]["migrations_per_vcpu_hour"] > 0
    # demo is small enough to search: the best placement bounds every policy's final placement.
    assert sc["best"]["method"] == "exhaustive"
    for r in rows.values():
        assert r["best_share"] is not None and 0 < r["best_share"] <= 1.0 + 1e-9


def test_targets_are_judged_on_what_ran(capsys: pytest.CaptureFixture[str]) -> None:
    rc, doc = bench_json(capsys, "--policy", "cache-aware")
    assert rc == 0
    by_name = {t["name"]: t for t in doc["targets"]}
    # No static baseline ran and no decision time was measured: those say n/a, not PASS.
    assert by_name["weighted speedup vs best static (pack, uncore, numa)"]["status"] == targets.NA
    assert by_name["decision time (s)"]["status"] == targets.NA
    ws = by_name["weighted speedup vs none"]
    (sc,) = doc["scenarios"]
    measured = next(r["ws_vs_none"] for r in sc["rows"] if r["policy"] == "cache-aware")
    assert ws["measured"] == pytest.approx(measured)
    assert ws["status"] == (targets.PASS if measured >= 1.10 else targets.MISS)


def test_ws_targets_carry_what_the_best_placement_itself_reaches(capsys: pytest.CaptureFixture[str]) -> None:
    _, doc = bench_json(capsys, "--policy", "cache-aware", "--policy", "pack", "--policy", "numa")
    (sc,) = doc["scenarios"]
    best = sc["best"]
    assert best["method"] == "exhaustive" and best["exact"]
    rows = {r["policy"]: r for r in sc["rows"]}

    def steady(policy: str) -> float:
        return float(np.median([run["steady_ws"] for run in rows[policy]["runs"]]))

    by_name = {t["name"]: t for t in doc["targets"]}
    for name, against, bound in (
        ("weighted speedup vs none", ["none"], 1.10),
        ("weighted speedup vs best static (pack, uncore, numa)", ["pack", "numa"], 1.05),
    ):
        t = by_name[name]
        ceiling = best["best_ws"] / max(steady(p) for p in against)
        assert f"demo {ceiling:.3g}" in t["ceiling"]
        # an exhaustive ceiling below the goal says no placement reaches it on that scenario
        assert t["unreachable"] == (["demo"] if ceiling < bound else [])
    # MPKI gets the best placement's own MPKI (chosen by WS) and the floor: the lowest MPKI of any
    # candidate, overall (with its share of the best WS) and near the best WS
    mpki = by_name["MPKI vs none"]
    none_mpki = float(np.median([run["steady_mpki"] for run in rows["none"]["runs"]]))
    assert best["best_mpki"] > 0 and f"demo {best['best_mpki'] / none_mpki:.3g}" in mpki["ceiling"]
    assert 0 < best["lowest_mpki"] <= best["lowest_mpki_near_best"] <= best["best_mpki"]
    assert best["worst_ws"] <= best["lowest_mpki_ws"] <= best["best_ws"]
    floor_line = mpki["ceiling"].splitlines()[1]
    share = best["lowest_mpki_ws"] / best["best_ws"]
    assert f"demo {best['lowest_mpki'] / none_mpki:.3g} (its WS {share:.3g} of the best)" in floor_line
    assert f"within 3% of the best WS: demo {best['lowest_mpki_near_best'] / none_mpki:.3g}" in floor_line
    # an exhaustive floor above the goal is what makes it unreachable
    assert mpki["unreachable"] == (["demo"] if best["lowest_mpki"] / none_mpki > 0.85 else [])


def test_only_an_exhaustive_mpki_floor_above_the_goal_calls_it_unreachable() -> None:
    base = targets.TargetResult("mpki", "mixed scenarios", "<= 0.85", 1.0, targets.MISS, "a 1.0, b 1.0")
    best = [targets.Ceiling("a", 0.95, exact=True), targets.Ceiling("b", 1.02, exact=False)]
    lowest = [targets.Ceiling("a", 0.9, True, ws_share=0.8), targets.Ceiling("b", 0.9, False, ws_share=0.7)]
    near = [targets.Ceiling("a", 0.93, exact=True), targets.Ceiling("b", 0.99, exact=False)]
    out = targets._with_mpki(base, best, lowest, near, 0.85)
    # b's whole-VM floor is an upper bound: a split VM might miss less, so b is not unreachable
    assert out.unreachable == ("a",)
    first, second = out.ceiling.splitlines()
    assert "a 0.95, b 1.02 (whole VMs)" in first
    assert "a 0.9 (its WS 0.8 of the best), b <= 0.9 (its WS 0.7 of the best)" in second
    assert "within 3% of the best WS: a 0.93, b <= 0.99" in second and "upper bound" in second
    assert out.status == targets.MISS and out.measured == 1.0
    below = targets._with_mpki(base, best, [targets.Ceiling("a", 0.8, True, 0.9)], [], 0.85)
    assert below.unreachable == () and "above the goal" not in below.ceiling
    assert targets._with_mpki(base, [], [], [], 0.85) == base


def test_only_an_exhaustive_ceiling_can_call_a_goal_unreachable() -> None:
    base = targets.TargetResult("ws", "mixed scenarios", ">= 1.1", 1.0, targets.MISS, "a 1.0, b 1.0")
    out = targets._with_ceiling(
        base, [targets.Ceiling("a", 1.04, exact=True), targets.Ceiling("b", 1.02, exact=False)], 1.10
    )
    assert out.unreachable == ("a",)  # b's whole-VM best is a lower bound: its true best may be higher
    assert "a 1.04" in out.ceiling and "b >= 1.02" in out.ceiling and "lower bound" in out.ceiling
    assert out.status == targets.MISS and out.measured == 1.0  # the verdict is the policy's, unchanged
    assert targets._with_ceiling(base, [], 1.10) == base
    met = targets._with_ceiling(base, [targets.Ceiling("a", 1.2, exact=True)], 1.10)
    assert met.unreachable == () and "below the goal" not in met.ceiling


def test_strict_exits_1_exactly_when_a_target_is_missed(capsys: pytest.CaptureFixture[str]) -> None:
    _, doc = bench_json(capsys, "--policy", "cache-aware")
    missed = any(t["status"] == targets.MISS for t in doc["targets"])
    rc = main([*QUICK, "--policy", "cache-aware", "--strict"])
    out, _ = capsys.readouterr()
    assert rc == (1 if missed else 0)
    assert "== targets" in out and "== demo" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--policy", "nope"], "--policy nope: unknown policy"),
        (["--seeds", "0"], "--seeds: expected a positive integer"),
        (["--scenario", "/nonexistent/x.toml"], "cannot read"),
        (["--random", "-1"], "--random: expected a non-negative integer"),
        (["--random", "1", "--random-seed", "-2"], "--random-seed: expected a non-negative integer"),
        (["--search-budget", "-1"], "--search-budget: expected a non-negative integer"),
        (["--policy-option", "miss_cost_ns"], "expected [POLICY:]KEY=VALUE"),
        (["--policy-option", ":enter=0.1"], "expected [POLICY:]KEY=VALUE"),
        (
            ["--policy-option", "imaginary=1"],
            "policy cache-aware: unknown option(s) imaginary; valid options:",
        ),
        (["--policy-option", "enter=lots"], "policy cache-aware: option enter='lots'"),
        (
            ["--policy", "pack", "--policy-option", "enter=0.1"],
            "cache-aware is not run here (add --policy cache-aware)",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    rc = main(["bench", "--no-decision-time", *argv])
    out, err = capsys.readouterr()
    assert out == ""
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err


# --------------------------------------------------------------------------------------
# bench --random: generated mixes on the shipped hosts
# --------------------------------------------------------------------------------------


def test_random_mixes_are_reproducible_valid_and_walk_the_shipped_hosts() -> None:
    from adaptive_pin.bench import random_mix
    from adaptive_pin.sim.scenario import loads_scenario

    hosts = random_mix.hosts()
    a = random_mix.generate(len(hosts) + 1, seed=3)
    b = random_mix.generate(len(hosts) + 1, seed=3)
    assert [m.text for m in a] == [m.text for m in b]  # same seed, same scenarios
    assert [m.text for m in random_mix.generate(2, seed=4)] != [m.text for m in a[:2]]
    assert [m.scenario.host.topology for m in a] == [*hosts, hosts[0]]
    for m in a:
        again = loads_scenario(m.text, origin=m.scenario.name, default_name=m.scenario.name)
        assert again == m.scenario  # the text is the scenario: it can be saved and rerun
        assert m.scenario.vcpu_count >= 2 and all(1 <= vm.vcpus <= 8 for vm in m.scenario.vms)


def test_synthetic_random_hosts_are_reproducible_shapes_no_scenario_ships() -> None:
    from adaptive_pin.bench import random_mix
    from adaptive_pin.sim.host import load_host_topology
    from adaptive_pin.sim.scenario import loads_scenario

    a = random_mix.generate(12, seed=2, synthetic=True)
    assert [m.text for m in a] == [m.text for m in random_mix.generate(12, seed=2, synthetic=True)]
    shapes = set()
    for m in a:
        spec = m.scenario.host
        assert m.scenario.name.startswith("random-synth-2-")
        assert spec.topology is None and spec.synthetic is not None
        h = spec.synthetic
        shapes.add((h.packages, h.llc_per_package, h.cores_per_llc, h.threads_per_core, h.llc_mib))
        topo = load_host_topology(spec)
        assert len(topo.pus) == h.packages * h.llc_per_package * h.cores_per_llc * h.threads_per_core
        assert len(topo.pus) <= random_mix.MAX_SYNTHETIC_PUS
        assert len(topo.llc) == h.packages * h.llc_per_package
        assert h.llc_mib / h.cores_per_llc in random_mix.LLC_MIB_PER_CORE
        again = loads_scenario(m.text, origin=m.scenario.name, default_name=m.scenario.name)
        assert again == m.scenario  # saved and rerun with --scenario, it is the same host and mix
    assert len(shapes) >= 6  # not one shape twelve times
    # the shipped-host mixes of a seed do not change with the option's existence
    assert [m.scenario.host.topology for m in random_mix.generate(2, seed=2)] == random_mix.hosts()[:2]


def test_random_hosts_synthetic_runs_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "--quick", "--no-decision-time", "--policy", "cache-aware", "--random", "1"]
    rc = main([*argv, "--random-hosts", "synthetic", "--random-seed", "4", "--json"])
    doc = json.loads(capsys.readouterr()[0])
    assert rc == 0 and doc["random_mixes"]["hosts"] == "synthetic"
    (sc,) = doc["scenarios"]
    assert sc["scenario"] == "random-synth-4-0" and sc["host"] == "synthetic"
    assert "synthetic = {" in sc["source"]
    with pytest.raises(SystemExit) as bad:
        main([*argv, "--random-hosts", "imaginary"])
    assert bad.value.code == 2 and "invalid choice: 'imaginary'" in capsys.readouterr()[1]


def test_random_alone_runs_only_the_mixes_and_summarises_them(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "--quick", "--no-decision-time", "--policy", "cache-aware", "--policy", "pack"]
    rc = main([*argv, "--random", "2", "--random-seed", "1", "--json"])
    out, _ = capsys.readouterr()
    assert rc == 0
    doc = json.loads(out)
    names = [sc["scenario"] for sc in doc["scenarios"]]
    assert names == ["random-1-0", "random-1-1"]  # no shipped scenario ran
    assert all(sc["source"] and not sc["mixed"] for sc in doc["scenarios"])
    mixes = doc["random_mixes"]
    assert mixes["count"] == 2 and mixes["seed"] == 1 and mixes["scenarios"] == 2
    ratios = [
        next(r["ws_vs_none"] for r in sc["rows"] if r["policy"] == "cache-aware") for sc in doc["scenarios"]
    ]
    vs_none = mixes["vs_none"]
    assert vs_none["worst"] == pytest.approx(min(ratios)) and vs_none["best"] == pytest.approx(max(ratios))
    assert vs_none["wins"] == sum(1 for x in ratios if x > 1.0 + 1e-9) and vs_none["count"] == 2
    # The stability targets' bounds, counted over the mixes: how many would fail, and the worst.
    over = {o["name"]: o for o in mixes["over"]}
    settle = [
        next(r["settle_ticks_max"] for r in sc["rows"] if r["policy"] == "cache-aware")
        for sc in doc["scenarios"]
    ]
    s = over["control ticks to settle after an arrival"]
    assert s["bound"] == 3.0 and s["count"] == 2 and s["worst"] == max(settle)
    assert s["over"] == sum(1 for x in settle if x > 3.0)
    steady = [
        next(r["steady_migrations_per_vcpu_hour"] for r in sc["rows"] if r["policy"] == "cache-aware")
        for sc in doc["scenarios"]
    ]
    m = over["migrations per vCPU-hour once settled"]
    assert m["count"] == sum(1 for x in steady if x is not None)  # a mix may never settle: no figure
    assert m["over"] == sum(1 for x in steady if x is not None and x > 1.0)
    # The WS targets are about the shipped mixed scenarios: the generated ones do not count there.
    ws = next(t for t in doc["targets"] if t["name"] == "weighted speedup vs none")
    assert ws["status"] == targets.NA
    rc = main([*argv, "--random", "1", "--scenario", "demo"])
    text, _ = capsys.readouterr()
    assert rc == 0 and "== demo" in text and "== random-0-0" in text and "== random mixes" in text
    assert "control ticks to settle after an arrival above 3: " in text


def test_a_policy_option_reaches_the_policy_it_names_and_is_reported(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A minimum gain no move can promise: cache-aware then leaves every vCPU to the scheduler,
    # exactly as none does; pack, given no option, pins as always.
    rc, doc = bench_json(
        capsys, "--policy", "cache-aware", "--policy", "pack", "--policy-option", "min_gain=1000"
    )
    assert rc == 0
    assert doc["policy_options"] == {"cache-aware": {"min_gain": "1000"}}
    rows = {r["policy"]: r for r in doc["scenarios"][0]["rows"]}
    assert rows["cache-aware"]["migrations_per_vcpu_hour"] == 0.0
    assert rows["cache-aware"]["ws_vs_none"] == 1.0
    assert rows["pack"]["migrations_per_vcpu_hour"] > 0
    rc = main([*QUICK, "--policy", "cache-aware", "--policy-option", "cache-aware:min_gain=1000"])
    text, _ = capsys.readouterr()
    assert (
        rc == 0
        and "policy options (bench --policy-option; every other option at its default): "
        "cache-aware min_gain=1000"
        in text
    )
