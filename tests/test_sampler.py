"""The sampler's rate math on scripted counter sequences."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest

from adaptive_pin.model import (
    CPU_TIME,
    CYCLES,
    INSTRUCTIONS,
    LLC_MISSES,
    RUN_DELAY,
    TASK_CLOCK,
    CpuSet,
    Guest,
    Pinnability,
    PinSource,
    ThreadCounters,
    ThreadRef,
    VCpu,
)
from collectors.base import Collector
from collectors.sampler import WARMING_UP, Sampler, ewma_alpha

NO_PMU = "no PMU: cycles not supported (ENOENT)"


class Scripted:
    """A collector that returns the next scripted reading per tid each round."""

    def __init__(self, name: str, script: Mapping[int, Sequence[ThreadCounters | None]]) -> None:
        self.name = name
        self.script = {tid: list(seq) for tid, seq in script.items()}
        self.caps: dict[str, str | None] = {}
        self.asked: list[list[int]] = []

    def sample(self, threads: Sequence[ThreadRef]) -> dict[int, ThreadCounters]:
        self.asked.append([t.tid for t in threads])
        out = {}
        for t in threads:
            seq = self.script.get(t.tid)
            tc = seq.pop(0) if seq else None
            if tc is not None:
                out[t.tid] = tc
        return out

    def capabilities(self) -> Mapping[str, str | None]:
        return self.caps

    def close(self) -> None:
        pass


class Broken(Scripted):
    def sample(self, threads: Sequence[ThreadRef]) -> dict[int, ThreadCounters]:
        raise RuntimeError("boom")


def tc(tid: int, t: float, missing: Mapping[str, str] | None = None, /, **values: float) -> ThreadCounters:
    names = {"llc": LLC_MISSES, "ins": INSTRUCTIONS, "cyc": CYCLES, "cpu": CPU_TIME, "delay": RUN_DELAY}
    return ThreadCounters(tid, t, {names.get(k, k): v for k, v in values.items()}, missing or {}, last_cpu=1)


def guest(*tids: int | None) -> list[Guest]:
    vcpus = tuple(VCpu(i, tid, CpuSet.of(0, 1)) for i, tid in enumerate(tids))
    return [Guest("g", "vm", 100, vcpus, Pinnability(True, PinSource.DEFAULT), "test")]


def run(sampler: Sampler, guests: list[Guest], rounds: int) -> list:  # type: ignore[type-arg]
    return [sampler.sample(guests) for _ in range(rounds)]


def test_scripted_collector_is_a_collector() -> None:
    assert isinstance(Scripted("x", {}), Collector)


def test_exact_rates_after_one_interval_and_warming_up_before() -> None:
    script = {
        7: [
            tc(7, 10.0, llc=0, ins=0, cyc=0, cpu=0, delay=0),
            tc(7, 12.0, llc=4000, ins=2_000_000, cyc=4_000_000, cpu=1.0, delay=0.2),
        ]
    }
    s = Sampler([Scripted("fake", script)], half_life_s=0)
    first, second = run(s, guest(7), 2)
    r0 = first.rates[("g", 0)]
    assert r0.llc_misses_per_s is None and r0.utilization is None and r0.mpki is None
    assert r0.missing["llc_misses_per_s"] == WARMING_UP and r0.missing["mpki"] == WARMING_UP
    r = second.rates[("g", 0)]
    assert r.llc_misses_per_s == pytest.approx(2000.0)
    assert r.instructions_per_s == pytest.approx(1_000_000.0)
    assert r.mpki == pytest.approx(2.0)
    assert r.ipc == pytest.approx(0.5)
    assert r.utilization == pytest.approx(0.5)
    assert r.run_delay == pytest.approx(0.1)
    assert r.last_cpu == 1 and r.missing == {}
    assert r.totals == {
        LLC_MISSES: 4000,
        INSTRUCTIONS: 2_000_000,
        CYCLES: 4_000_000,
        CPU_TIME: 1.0,
        RUN_DELAY: 0.2,
    }


def test_ewma_follows_the_half_life_in_seconds() -> None:
    assert ewma_alpha(1.0, 1.0) == pytest.approx(0.5)
    assert ewma_alpha(2.0, 1.0) == pytest.approx(0.75)
    assert ewma_alpha(1.0, 0.0) == 1.0
    # 100 misses/s for one second, then 200/s: each 1 s step closes half the gap (half-life 1 s)
    vals, t, seq = 0.0, 0.0, [tc(7, 0.0, llc=0)]
    for rate in [100] + [200] * 12:
        t += 1.0
        vals += rate
        seq.append(tc(7, t, llc=vals))
    s = Sampler([Scripted("fake", {7: seq})], half_life_s=1.0)
    got = [res.rates[("g", 0)].llc_misses_per_s for res in run(s, guest(7), len(seq))]
    assert got[0] is None
    assert got[1] == pytest.approx(100.0)
    assert got[2] == pytest.approx(150.0)
    assert got[3] == pytest.approx(175.0)
    assert got[-1] == pytest.approx(200.0, abs=0.1)
    # a 2 s interval weighs 0.75, not 0.5
    s2 = Sampler([Scripted("fake", {7: [tc(7, 0, llc=0), tc(7, 1, llc=100), tc(7, 3, llc=500)]})], 1.0)
    assert run(s2, guest(7), 3)[2].rates[("g", 0)].llc_misses_per_s == pytest.approx(100 + 0.75 * 100)


def test_counter_going_backwards_drops_the_interval_and_keeps_totals() -> None:
    seq = [tc(7, 0, llc=0), tc(7, 1, llc=100), tc(7, 2, llc=30), tc(7, 3, llc=90)]
    s = Sampler([Scripted("fake", {7: seq})], half_life_s=0)
    res = [r.rates[("g", 0)] for r in run(s, guest(7), 4)]
    assert res[1].llc_misses_per_s == pytest.approx(100.0)
    assert res[2].llc_misses_per_s == pytest.approx(100.0)  # the reset interval is dropped
    assert res[3].llc_misses_per_s == pytest.approx(60.0)  # from the new baseline
    assert [r.totals.get(LLC_MISSES) for r in res] == [0.0, 100.0, 100.0, 160.0]


def test_reset_before_any_rate_says_so() -> None:
    s = Sampler([Scripted("fake", {7: [tc(7, 0, llc=50), tc(7, 1, llc=10)]})], half_life_s=0)
    r = run(s, guest(7), 2)[1].rates[("g", 0)]
    assert r.llc_misses_per_s is None
    assert "went backwards" in r.missing["llc_misses_per_s"]


def test_new_thread_id_restarts_history_but_not_totals() -> None:
    script = {7: [tc(7, 0, llc=0), tc(7, 1, llc=100)], 8: [tc(8, 2, llc=5000), tc(8, 3, llc=5050)]}
    s = Sampler([Scripted("fake", script)], half_life_s=0)
    _, b = run(s, guest(7), 2)
    c, d = run(s, guest(8), 2)
    assert b.rates[("g", 0)].llc_misses_per_s == pytest.approx(100.0)
    churned = c.rates[("g", 0)]
    assert churned.llc_misses_per_s is None and churned.missing["llc_misses_per_s"] == WARMING_UP
    assert churned.totals[LLC_MISSES] == 100.0  # never a negative step for Prometheus
    assert d.rates[("g", 0)].llc_misses_per_s == pytest.approx(50.0)
    assert d.rates[("g", 0)].totals[LLC_MISSES] == 150.0


def test_missing_counters_are_none_with_the_collectors_reason_never_zero() -> None:
    miss = {LLC_MISSES: NO_PMU, INSTRUCTIONS: NO_PMU, CYCLES: NO_PMU}
    seq = [tc(7, 0, miss, cpu=0.0), tc(7, 1, miss, cpu=0.25)]
    s = Sampler([Scripted("perf", {7: seq})], half_life_s=0)
    r = run(s, guest(7), 2)[1].rates[("g", 0)]
    assert r.utilization == pytest.approx(0.25)
    for name in ("llc_misses_per_s", "instructions_per_s", "cycles_per_s", "mpki", "ipc"):
        assert getattr(r, name) is None
        assert r.missing[name] == NO_PMU
    assert r.missing["run_delay"].startswith("not collected")


def test_first_collector_wins_and_task_clock_stands_in_for_cpu_time() -> None:
    perf = Scripted("perf", {7: [tc(7, 0, **{TASK_CLOCK: 0.0}), tc(7, 1, **{TASK_CLOCK: 0.4})]})
    procfs = Scripted("procfs", {7: [tc(7, 0, cpu=0.0), tc(7, 1, cpu=0.8)]})
    r = run(Sampler([perf, procfs], 0), guest(7), 2)[1].rates[("g", 0)]
    assert r.utilization == pytest.approx(0.8)  # CPU time preferred over task-clock
    perf2 = Scripted("perf", {7: [tc(7, 0, **{TASK_CLOCK: 0.0}), tc(7, 1, **{TASK_CLOCK: 0.4})]})
    r2 = run(Sampler([perf2], 0), guest(7), 2)[1].rates[("g", 0)]
    assert r2.utilization == pytest.approx(0.4)


def test_idle_vcpu_has_no_mpki_rather_than_a_division_by_zero() -> None:
    seq = [tc(7, 0, llc=0, ins=0, cyc=0), tc(7, 1, llc=0, ins=0, cyc=0)]
    r = run(Sampler([Scripted("perf", {7: seq})], 0), guest(7), 2)[1].rates[("g", 0)]
    assert r.llc_misses_per_s == 0.0 and r.mpki is None and r.ipc is None
    assert "is 0 (idle vCPU)" in r.missing["mpki"]


def test_a_broken_collector_does_not_stop_the_others() -> None:
    ok = Scripted("procfs", {7: [tc(7, 0, cpu=0.0), tc(7, 1, cpu=0.5)]})
    s = Sampler([Broken("perf", {}), ok], half_life_s=0)
    res = run(s, guest(7), 2)[1]
    assert res.errors == {"perf": "collector perf failed: boom"}
    assert res.rates[("g", 0)].utilization == pytest.approx(0.5)
    assert "collector perf failed: boom" in res.rates[("g", 0)].missing["llc_misses_per_s"]


def test_gone_thread_and_missing_tid_say_why() -> None:
    s = Sampler([Scripted("procfs", {7: [tc(7, 0, cpu=0.0)]})], half_life_s=0)
    first, second = run(s, guest(7, None), 2)
    assert first.rates[("g", 1)].missing["utilization"] == "no thread id for this vCPU"
    gone = second.rates[("g", 0)]
    assert gone.utilization is None and gone.missing["utilization"] == "thread gone (tid 7)"


def test_capabilities_merge_available_wins() -> None:
    a, b = Scripted("perf", {}), Scripted("procfs", {})
    a.caps = {LLC_MISSES: NO_PMU, CPU_TIME: "nope"}
    b.caps = {CPU_TIME: None}
    caps = Sampler([a, b]).sample(guest()).capabilities
    assert caps == {LLC_MISSES: NO_PMU, CPU_TIME: None}


def test_many_vcpus_each_keep_their_own_history() -> None:
    script = {tid: [tc(tid, 0, llc=0), tc(tid, 1, llc=tid * 10)] for tid in range(1, 51)}
    res = run(Sampler([Scripted("f", script)], 0), guest(*range(1, 51)), 2)[1]
    assert [res.rates[("g", i)].llc_misses_per_s for i in range(50)] == [tid * 10.0 for tid in range(1, 51)]


def test_negative_half_life_is_refused() -> None:
    with pytest.raises(ValueError, match="half_life_s"):
        Sampler([], half_life_s=-1)


def test_rates_built_the_fast_way_equal_the_dataclass_built_normally() -> None:
    from dataclasses import fields

    from adaptive_pin.model import VCpuRates
    from collectors import sampler as sampler_mod

    assert sampler_mod._make_all is sampler_mod._make_all_fast  # the model still has this shape
    script = {7: [tc(7, 0, llc=0, ins=0, cyc=0, cpu=0), tc(7, 1, llc=10, ins=1000, cyc=2000, cpu=0.5)]}
    r = run(Sampler([Scripted("f", script)], 0), guest(7), 2)[1].rates[("g", 0)]
    assert type(r) is VCpuRates
    assert r == VCpuRates(**{f.name: getattr(r, f.name) for f in fields(VCpuRates)})
    assert r.mpki == pytest.approx(10.0) and r.last_cpu == 1 and r.totals[LLC_MISSES] == 10


def test_exact_liveness_collector_is_sampled_first_but_merged_in_order() -> None:
    order: list[str] = []

    class Logged(Scripted):
        def sample(self, threads: Sequence[ThreadRef]) -> dict[int, ThreadCounters]:
            order.append(self.name)
            return super().sample(threads)

    class LoggedLive(Logged):
        exact_liveness = True

    first = Logged("perf", {7: [tc(7, 0, cpu=0.0), tc(7, 1, cpu=0.8)]})
    live = LoggedLive("procfs", {7: [tc(7, 0, cpu=0.0), tc(7, 1, cpu=0.2)]})
    r = run(Sampler([first, live], 0), guest(7), 2)[1].rates[("g", 0)]
    assert order == ["procfs", "perf", "procfs", "perf"]
    assert r.utilization == pytest.approx(0.8)  # the first listed collector still wins


def test_the_rate_field_list_is_vcpurates_own() -> None:
    # status and the sampler both walk VCPU_RATE_FIELDS: a field added to VCpuRates must be in it.
    import dataclasses

    from adaptive_pin.model import VCPU_RATE_FIELDS, VCpuRates

    names = [f.name for f in dataclasses.fields(VCpuRates)]
    assert names[: len(VCPU_RATE_FIELDS)] == list(VCPU_RATE_FIELDS)
    assert set(names) - set(VCPU_RATE_FIELDS) == {"last_cpu", "missing", "totals"}
