"""Cost of one full sampling round (perf + procfs + rate math) per vCPU thread.

Spawns N real threads named ``CPU n/KVM`` in helper processes (up to 250 threads each, like a
few large VMs), half of them busy, and times the sampler over them. Busy threads spin 1 ms and
sleep 4 ms: they are often on a CPU when their group is read (the costly cross-CPU read that
needs an IPI) yet leave room to run; the helpers run at nice 19 so the measuring thread is not
starved on a small host, and the cost is taken as the sampling thread's own CPU time
(CLOCK_THREAD_CPUTIME_ID), which waiting for a CPU does not inflate. Wall time is shown too.

Target: at most 10 µs per vCPU per round, all included, i.e. 1,000 vCPUs sampled every second
cost under 1 % of one core.

What a round reads is what the controller's runtime reads with the default configuration:
one perf group read per thread, procfs schedstat per thread (CPU time, run delay), and the
rates of every vCPU. The last CPU comes from the inventory by default ([collectors]
last_cpu_every = 0): the driver reads each vCPU's stat for it every tick anyway, so the round
does not read it again; the ``inv`` column shows what that per-vCPU inventory read costs (not
in the total: it is the inventory's, paid whatever the sampler does). ``--last-cpu-every K``
makes procfs re-read it every K rounds itself, counted in the total (collectors/procfs.py has
the staleness). ``floor`` is the bare reads alone (the same perf and schedstat fds in the same
C loop, nothing else) measured in the same run, and ``x floor`` the round's multiple of it:
what the collectors and the rate math add to the syscalls, on this host, now. Once set up,
the heap is frozen out of the cyclic GC (adaptive_pin.runtime.freeze_startup_heap), as
``adaptive-pin run`` does; the collections a round's own objects trigger are still counted. On
a shared host the per-round figures swing with other load; ``best`` is the quietest round.

    python -m benchmarks.sampling [--threads 100,500,1000] [--rounds N] [--last-cpu-every K] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection

import numpy as np

from adaptive_pin import runtime
from adaptive_pin.config import CollectorsConfig
from adaptive_pin.drivers._threads import read_vcpu
from adaptive_pin.errors import GuestGoneError
from adaptive_pin.model import (
    CONTEXT_SWITCHES,
    CYCLES,
    INSTRUCTIONS,
    LLC_MISSES,
    TASK_CLOCK,
    CpuSet,
    Guest,
    Pinnability,
    PinSource,
    VCpu,
)
from collectors.base import read_each
from collectors.perf import PerfCollector
from collectors.procfs import ProcfsCollector
from collectors.sampler import Sampler

TARGET_US = 10.0
DEFAULT_LAST_CPU_EVERY = CollectorsConfig().last_cpu_every  # what the daemon runs with
THREADS_PER_HELPER = 250
# The default hardware events plus two software ones: on a host without a PMU the software
# pair still forms a real group, so the group read is measured either way.
EVENTS = {
    CYCLES: "cycles",
    INSTRUCTIONS: "instructions",
    LLC_MISSES: "cache-misses",
    TASK_CLOCK: "task-clock",
    CONTEXT_SWITCHES: "context-switches",
}
PR_SET_NAME = 15
SPIN_S, SLEEP_S = 0.001, 0.004


def _name_thread(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def _vcpu(index: int, busy: bool, stop: threading.Event, tids: list[int], ready: threading.Barrier) -> None:
    _name_thread(f"CPU {index}/KVM")
    tids.append(threading.get_native_id())
    ready.wait()
    if not busy:
        stop.wait()
        return
    while not stop.is_set():
        end = time.perf_counter() + SPIN_S
        while time.perf_counter() < end:
            pass
        time.sleep(SLEEP_S)


def _helper(first: int, count: int, conn: Connection) -> None:
    os.nice(19)
    threading.stack_size(256 * 1024)
    stop = threading.Event()
    tids: list[int] = []
    ready = threading.Barrier(count + 1)
    threads = [
        threading.Thread(target=_vcpu, args=(first + i, i % 2 == 0, stop, tids, ready), daemon=True)
        for i in range(count)
    ]
    for t in threads:
        t.start()
    ready.wait()
    conn.send(sorted(tids))
    conn.recv()  # any message: stop
    stop.set()
    for t in threads:
        t.join()


@dataclass(frozen=True)
class Result:
    threads: int
    rounds: int
    perf_us: float  # per thread per round, median, CPU time of the sampling thread
    procfs_us: float
    rates_us: float
    total_us: float
    total_best_us: float  # the quietest round: what the code costs when the host is not busy
    wall_us: float
    floor_us: float  # the same perf and schedstat reads alone (no parsing, no rates), same run
    inventory_us: float  # the driver's per-vCPU read each tick (stat, affinity): not in total
    last_cpu_every: int  # the procfs collector's stat_every (0: last CPU from the inventory)
    over_floor: float  # total / floor: what the collectors and the rate math add to the syscalls
    first_round_us: float  # opening groups and files
    target_us: float
    ratio: float  # total / target (<= 1 meets it)
    core_percent_at_1hz: float
    perf_events: tuple[str, ...]
    busy_threads: int


def _spawn(n: int) -> tuple[list[Guest], list[tuple[mp.process.BaseProcess, Connection]]]:
    ctx = mp.get_context("fork")
    helpers: list[tuple[mp.process.BaseProcess, Connection]] = []
    guests: list[Guest] = []
    for k, first in enumerate(range(0, n, THREADS_PER_HELPER)):
        count = min(THREADS_PER_HELPER, n - first)
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_helper, args=(first, count, child), daemon=True)
        proc.start()
        helpers.append((proc, parent))
        tids: list[int] = parent.recv()
        guests.append(
            Guest(
                id=f"bench-{k}",
                name=f"bench-{k}",
                pid=proc.pid,
                vcpus=tuple(VCpu(i, tid, CpuSet()) for i, tid in enumerate(tids)),
                pinnability=Pinnability(managed=True, source=PinSource.DEFAULT),
                driver="bench",
            )
        )
    return guests, helpers


def _stop(helpers: list[tuple[mp.process.BaseProcess, Connection]]) -> None:
    for _proc, conn in helpers:
        with contextlib.suppress(OSError):
            conn.send("stop")
    for proc, _conn in helpers:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()


def measure(
    n: int,
    rounds: int,
    interval_s: float = 0.1,
    last_cpu_every: int = DEFAULT_LAST_CPU_EVERY,
) -> Result:
    guests, helpers = _spawn(n)
    perf = PerfCollector(EVENTS)
    sampler = Sampler([perf, ProcfsCollector(stat_every=last_cpu_every)], half_life_s=5.0)
    try:
        first = sampler.sample(guests)
        runtime.freeze_startup_heap()  # as `adaptive-pin run` does once it is set up
        per: dict[str, list[float]] = {"perf": [], "procfs": [], "rates": [], "total": [], "wall": []}
        for _ in range(rounds):
            time.sleep(interval_s)
            t0 = time.perf_counter()
            res = sampler.sample(guests)
            wall = time.perf_counter() - t0
            for part in ("perf", "procfs", "rates"):
                per[part].append(res.cpu_s.get(part, 0.0))
            per["total"].append(sum(res.cpu_s.values()))
            per["wall"].append(wall)
        events = tuple(name for name, why in perf.capabilities().items() if why is None)
        floor = _floor(perf, sampler, rounds, interval_s)
        inventory = _inventory_reads(guests, rounds, interval_s)
    finally:
        sampler.close()
        _stop(helpers)

    def us(part: str) -> float:
        return statistics.median(per[part]) / n * 1e6

    total = round(us("total"), 2)
    return Result(
        threads=n,
        rounds=rounds,
        perf_us=round(us("perf"), 2),
        procfs_us=round(us("procfs"), 2),
        rates_us=round(us("rates"), 2),
        total_us=total,
        total_best_us=round(min(per["total"]) / n * 1e6, 2),
        wall_us=round(us("wall"), 2),
        floor_us=round(floor / n * 1e6, 2),
        inventory_us=round(inventory / n * 1e6, 2),
        last_cpu_every=last_cpu_every,
        over_floor=round(us("total") / (floor / n * 1e6), 2) if floor > 0 else 0.0,
        first_round_us=round(sum(first.cpu_s.values()) / n * 1e6, 2),
        target_us=TARGET_US,
        ratio=round(total / TARGET_US, 3),
        core_percent_at_1hz=round(total * n / 1e6 * 100, 3),
        perf_events=events,
        busy_threads=(n + 1) // 2,
    )


def _floor(perf: PerfCollector, sampler: Sampler, rounds: int, interval_s: float) -> float:
    """Median CPU seconds of the bare reads a round makes: every perf group (readv) and every
    schedstat (preadv) of the same threads, with the same fds, buffers and C loop, and nothing
    else. The baseline the round's figure is a multiple of, measured on this host now."""
    procfs = next(c for c in sampler.collectors if isinstance(c, ProcfsCollector))
    _, perf_fds, perf_bufs, _, _ = perf._hot()
    _, proc_fds, proc_views = procfs._hot()
    samples = []
    for _ in range(rounds):
        time.sleep(interval_s)  # as cold as a real round
        t0 = time.thread_time()
        read_each(os.readv, perf_fds, perf_bufs)
        read_each(os.preadv, proc_fds, proc_views, 0)
        samples.append(time.thread_time() - t0)
    return statistics.median(samples)


def _inventory_reads(guests: Sequence[Guest], rounds: int, interval_s: float) -> float:
    """Median CPU seconds of what a real driver's inventory reads per vCPU each tick
    (adaptive_pin.drivers._threads.read_vcpu: affinity, and stat for the last CPU). Not part of
    the sampling round; shown because with last_cpu_every = 0 the round relies on it."""
    samples = []
    for _ in range(max(1, rounds // 4)):
        time.sleep(interval_s)
        t0 = time.thread_time()
        for g in guests:
            assert g.pid is not None
            for v in g.vcpus:
                assert v.tid is not None
                with contextlib.suppress(GuestGoneError):
                    read_vcpu(v.index, g.pid, v.tid)
        samples.append(time.thread_time() - t0)
    return statistics.median(samples)


def _table(results: Sequence[Result]) -> str:
    head = (
        f"{'threads':>7} {'perf':>7} {'procfs':>7} {'rates':>7} {'total':>7} {'best':>7} {'target':>7} "
        f"{'ratio':>6} {'floor':>7} {'x floor':>7} {'wall':>7} {'open':>7} {'core%@1Hz':>9} {'inv':>6}"
    )
    lines = [
        "µs per vCPU thread per round (median CPU time of the sampling thread); floor: the same "
        "perf and schedstat reads alone, this run",
        head,
    ]
    for r in results:
        lines.append(
            f"{r.threads:>7} {r.perf_us:>7.2f} {r.procfs_us:>7.2f} {r.rates_us:>7.2f} {r.total_us:>7.2f} "
            f"{r.total_best_us:>7.2f} {r.target_us:>7.1f} {r.ratio:>6.2f} {r.floor_us:>7.2f} "
            f"{r.over_floor:>7.2f} {r.wall_us:>7.2f} "
            f"{r.first_round_us:>7.2f} {r.core_percent_at_1hz:>9.3f} {r.inventory_us:>6.2f}"
        )
    fit = cost_fit(results)
    if fit is not None:
        lines.append(
            f"fit over the counts: {fit[0]:.2f} µs per vCPU + {fit[1] / 1000:.2f} ms per round "
            "(the fixed part is what makes small rosters dearer per vCPU)"
        )
    if results:
        lines.append(f"perf events counted: {', '.join(results[0].perf_events) or 'none'}")
        every = results[0].last_cpu_every
        lines.append(
            "last CPU: "
            + (
                "from the inventory (inv: what the driver's per-vCPU read costs each tick, not in total)"
                if every == 0
                else f"also re-read by procfs every {every} rounds (in total)"
            )
        )
    return "\n".join(lines)


def cost_fit(results: Sequence[Result]) -> tuple[float, float] | None:
    """Least-squares (µs per vCPU, µs per round) of the median round cost over the counts run."""
    if len({r.threads for r in results}) < 2:
        return None
    n = np.array([r.threads for r in results], float)
    per_round = np.array([r.total_us for r in results]) * n
    slope, intercept = np.polyfit(n, per_round, 1)
    return round(float(slope), 2), round(float(intercept), 1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.sampling",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--threads", default="100,500,1000", help="comma-separated thread counts")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per count (median)")
    parser.add_argument(
        "--last-cpu-every",
        type=int,
        default=DEFAULT_LAST_CPU_EVERY,
        metavar="K",
        help="the procfs collector's last-CPU re-read period in rounds, as [collectors] last_cpu_every "
        f"(default {DEFAULT_LAST_CPU_EVERY}: from the inventory)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        counts = [int(x) for x in args.threads.split(",") if x.strip()]
    except ValueError:
        print(f"benchmarks.sampling: --threads {args.threads!r}: want numbers like 100,500", file=sys.stderr)
        return 2
    if not counts or min(counts) <= 0 or args.rounds <= 0:
        print("benchmarks.sampling: --threads and --rounds must be positive", file=sys.stderr)
        return 2
    if args.last_cpu_every < 0:
        print("benchmarks.sampling: --last-cpu-every must be >= 0", file=sys.stderr)
        return 2
    results = [measure(n, args.rounds, last_cpu_every=args.last_cpu_every) for n in counts]
    if args.json:
        fit = cost_fit(results)
        doc = {
            "target_us_per_vcpu": TARGET_US,
            "results": [asdict(r) for r in results],
            "fit": None if fit is None else {"us_per_vcpu": fit[0], "us_per_round": fit[1]},
        }
        print(json.dumps(doc, indent=2))
    else:
        print(_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
