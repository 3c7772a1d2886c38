"""The decision-time figure: what is timed, on which host, and how the report reads it."""

from __future__ import annotations

from adaptive_pin.bench import decision_time, report, targets


def test_a_decision_is_timed_cold_and_steady_with_median_and_fastest() -> None:
    d = decision_time.measure(["none", "cache-aware"], reps=3, ticks=0, n_vms=16)
    assert (d.pus, d.llc_domains, d.vms, d.reps) == (512, 32, 16, 3)
    assert d.vcpus == sum(decision_time.VM_SIZES) * 2  # 16 VMs: the size cycle twice
    timing = {p.policy: p for p in d.policies}
    for p in timing.values():
        assert p.cold_min_s is not None and p.steady_min_s is not None
        assert 0 < p.cold_min_s <= p.cold_s and 0 < p.steady_min_s <= p.steady_s
    # cold: every vCPU floating, so cache-aware places them; none never moves anything
    assert timing["none"].moves_cold == 0
    assert 0 < timing["cache-aware"].moves_cold <= d.vcpus
    assert d.tick_s is None  # ticks=0: the whole-tick timing was skipped

    text = report.decision_text(d)
    ca = timing["cache-aware"]
    assert f"{ca.cold_s * 1e3:.1f}" in text and f"({ca.cold_min_s * 1e3:.1f})" in text
    (verdict,) = [t for t in targets.evaluate([], d) if t.name == "decision time (s)"]
    # judged on the median (the worse of cold and steady); the fastest is shown beside it
    assert verdict.measured == max(ca.cold_s, ca.steady_s)
    assert f"fastest {ca.cold_min_s * 1e3:.1f} / {ca.steady_min_s * 1e3:.1f} ms" in verdict.detail


def test_the_policy_timed_is_built_with_the_options_given() -> None:
    # bench --policy-option times the policy it benches: one no move can satisfy places nothing
    d = decision_time.measure(
        ["cache-aware"], reps=1, ticks=0, n_vms=16, options={"cache-aware": {"min_gain": "1000"}}
    )
    (timing,) = d.policies
    assert timing.moves_cold == 0
