"""adaptive-pin: telemetry-driven vCPU pinning for Linux hypervisor hosts."""

import os

__version__ = "0.1.0"

# One BLAS thread, unless the operator says otherwise. The policy's matrices are tiny (LLC
# domains x domains), and a BLAS pool's workers spin between calls on the other CPUs -- the
# CPUs this daemon hands to VMs -- for no speedup: 30 cold decisions on the bench's 512-PU host
# took 3.2 s of wall time and 6.4 s of CPU with OpenBLAS's pool on 2 CPUs, 3.5 s and 3.5 s
# without (2026-12-04). Read by the BLAS library when numpy loads it, so set before any import
# of numpy; a process that imported numpy before adaptive_pin keeps its own setting.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
