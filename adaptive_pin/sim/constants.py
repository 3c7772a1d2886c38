"""The simulator's physical constants. Each one's source is in docs/simulator.md ("Constants")."""

from __future__ import annotations

# Idle load-to-use latency of a local DRAM access on a 2-socket server (Intel MLC on Skylake-SP
# class machines measures 80-90 ns; we take 90).
DRAM_LATENCY_NS = 90.0

# ACPI SLIT: local distance is 10 by definition; remote/local latency = distance / 10.
# Linux assumes 20 for a remote node when firmware gives no SLIT (include/linux/topology.h).
LOCAL_DISTANCE = 10
DEFAULT_REMOTE_DISTANCE = 20

# Two busy hardware threads on one core deliver 1 + SMT_GAIN times one thread's work
# (Intel: "up to 30%" from Hyper-Threading, Marr et al., Intel Technology Journal 6(1), 2002).
SMT_GAIN = 0.30

# Cache line size: all x86-64, Neoverse/Kunpeng and POWER L3s in the fixtures use 64 B lines
# (POWER uses 128 B; the difference only scales the warm-up cost after a migration).
LINE_BYTES = 64

# Clock when proc/cpuinfo names none (GHz).
DEFAULT_GHZ = 2.5

# LLC size when sysfs gives none: per core, Skylake-SP's 1.375 MiB of L3 per core.
DEFAULT_LLC_BYTES_PER_CORE = int(1.375 * (1 << 20))

# migrate_pages(2) copies a process's pages at a few GB/s with 4 KiB pages (unmap, copy, remap
# per page; Yan et al., "Nimble Page Management for Tiered Memory Systems", ASPLOS 2019).
MIGRATE_BYTES_PER_S = 1.5e9

# Share of a VM's speed lost while its memory is being migrated: a guest access to a page in
# flight waits for the copy, and every remap shoots down the vCPUs' TLBs. An assumption.
MIGRATION_STALL = 0.5

# Guest RAM when a scenario gives none.
DEFAULT_MEMORY_MIB = 4096
