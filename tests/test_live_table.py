"""The status --watch table, rendered without a tty."""

from __future__ import annotations

from adaptive_pin.live_table import NO_PMU, render, table_rows
from adaptive_pin.model import CpuSet, Guest, Pinnability, PinSource, VCpu, VCpuRates

PMU_GONE = "no PMU: cache-misses not supported (ENOENT)"


def _guests() -> list[Guest]:
    pin = Pinnability(True, PinSource.DEFAULT)
    return [
        Guest("b", "web", 20, (VCpu(0, 201, CpuSet.of(2, 3), last_cpu=3),), pin, "test"),
        Guest("a", "db", 10, (VCpu(1, 102, CpuSet.parse("0-3")), VCpu(0, None, CpuSet())), pin, "test"),
    ]


def test_rows_show_values_and_say_why_not() -> None:
    rates = {
        ("a", 1): VCpuRates(mpki=3.14159, ipc=1.5, utilization=0.42, run_delay=0.051, last_cpu=2),
        ("b", 0): VCpuRates(utilization=1.0, missing={"mpki": PMU_GONE, "ipc": PMU_GONE}),
    }
    rows = table_rows(_guests(), rates)
    assert [(r.vm, r.vcpu) for r in rows] == [("db", 0), ("db", 1), ("web", 0)]
    db0, db1, web0 = rows
    assert (db0.tid, db0.last_cpu, db0.allowed, db0.util, db0.mpki) == ("-", "-", "-", "-", "-")
    assert (db1.tid, db1.last_cpu, db1.allowed) == ("102", "2", "0-3")
    assert (db1.util, db1.mpki, db1.ipc, db1.run_delay) == ("42%", "3.14", "1.50", "5%")
    assert (web0.last_cpu, web0.util, web0.mpki, web0.ipc) == ("3", "100%", NO_PMU, NO_PMU)


def test_no_pmu_flag_marks_every_counter_column() -> None:
    rows = table_rows(_guests(), {}, no_pmu=True)
    assert {r.mpki for r in rows} == {NO_PMU}


def test_render_aligns_columns_and_cuts_to_width() -> None:
    rates = {("a", 1): VCpuRates(mpki=12.5, utilization=0.5)}
    lines = render(table_rows(_guests(), rates))
    assert lines[0].split() == ["VM", "vCPU", "tid", "on", "allowed", "util", "MPKI", "IPC", "delay"]
    assert len(lines) == 4
    # right-aligned numbers end in the same column as their header
    mpki_end = lines[0].index("MPKI") + len("MPKI")
    assert lines[2][:mpki_end].endswith("12.50")
    assert all(len(line) <= 30 for line in render(table_rows(_guests(), rates), width=30))
