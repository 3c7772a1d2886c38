"""The daemon runs numpy with one BLAS thread unless the operator chose otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = (
    "import adaptive_pin, numpy, os; "
    "print(os.environ.get('OPENBLAS_NUM_THREADS'), os.environ.get('OMP_NUM_THREADS'))"
)


def _probe(env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_importing_adaptive_pin_limits_blas_to_one_thread() -> None:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    assert _probe(env) == "1 1"


def test_an_operators_own_thread_count_is_kept() -> None:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    assert _probe({**env, "OPENBLAS_NUM_THREADS": "4"}) == "4 1"
