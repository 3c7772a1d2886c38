"""Smoke test: the sampling benchmark runs and reports its figures (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_benchmark_runs_small_and_emits_json() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.sampling", "--threads", "20", "--rounds", "2", "--json"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["target_us_per_vcpu"] == 10.0
    (res,) = out["results"]
    assert res["threads"] == 20 and res["rounds"] == 2 and res["busy_threads"] == 10
    for key in ("perf_us", "procfs_us", "rates_us", "total_us", "wall_us", "ratio", "core_percent_at_1hz"):
        assert isinstance(res[key], float) and res[key] >= 0
    assert res["ratio"] == round(res["total_us"] / 10.0, 3)


def test_benchmark_refuses_bad_arguments() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.sampling", "--threads", "many"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--threads" in proc.stderr


def test_the_fit_splits_a_round_into_per_vcpu_and_fixed_cost() -> None:
    from dataclasses import replace

    from benchmarks.sampling import Result, cost_fit

    base = Result(1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10.0, 0, 0, (), 0)
    # 5 µs per vCPU and 1,000 µs per round: per-vCPU figures 15, 7, 6 at 100, 500, 1000.
    runs = [replace(base, threads=n, total_us=5.0 + 1000.0 / n) for n in (100, 500, 1000)]
    assert cost_fit(runs) == (5.0, 1000.0)
    assert cost_fit(runs[:1]) is None
