"""Prometheus exporter for ``adaptive-pin run``: counters from every tick, gauges from the last one.

The controller calls :meth:`MetricsExporter.observe` once per tick with its
:class:`~adaptive_pin.model.TickReport`. Two kinds of metrics come out of that:

* counts of what the controller did (ticks, migrations, rollbacks, verdicts, errors, and the
  before/after MPKI histograms of verified moves) accumulate in ordinary prometheus-client
  metrics, which are thread-safe on their own;
* everything about the host's present state (per-vCPU counters and rates, placement, L3
  pressure, capabilities, controller health) is rendered at scrape time by a custom collector
  from the latest snapshot, so a VM that stops simply disappears instead of leaving a stale
  series behind.

Every ``adaptive_pin_`` series carries ``host`` (the hypervisor's name) so one Prometheus and
one dashboard can serve a fleet. Per-vCPU series are labelled by ``domain`` (the VM's name, as
libvirt calls it) and ``vcpu`` (its index), never by thread id, which changes on every restart.

The default listen port, 19650, lies outside 9100-9999: that range of the Prometheus
default-port-allocations wiki has been fully allocated since 2023 and the wiki asks exporters of
in-house software to stay out of it. 19650 is also below Linux's ephemeral range (32768-60999),
so no outgoing connection can be holding it; absent from IANA's registry as shipped in
/etc/services; and clear of libvirt's ports (16509/16514, migration 49152-49215, and VNC/SPICE
auto-allocation from 5900 upwards, which would need ~13,000 consoles to reach it).
"""

from __future__ import annotations

import platform
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, start_http_server
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from adaptive_pin import __version__
from adaptive_pin.errors import UsageError
from adaptive_pin.model import (
    CPU_TIME,
    CYCLES,
    INSTRUCTIONS,
    LLC_MISSES,
    RUN_DELAY,
    CpuSet,
    Guest,
    Snapshot,
    TickReport,
    Topology,
    VCpu,
    VCpuRates,
    Verdict,
)

DEFAULT_PORT: Final = 19650
DEFAULT_ADDRESS: Final = f"127.0.0.1:{DEFAULT_PORT}"

PREFIX: Final = "adaptive_pin_"

# MPKI of real programs spans ~0.01 (cache-resident) to ~200 (pointer chasing through DRAM):
# 1-2-5 steps over that range keep each decade resolved.
MPKI_BUCKETS: Final = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0)
# A tick is a few ms on a small host and may reach seconds with hundreds of VMs or a slow libvirtd.
TICK_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# Cumulative thread counters exposed per vCPU: (collector counter name, metric name, help).
VCPU_COUNTERS: Final = (
    (LLC_MISSES, "vcpu_llc_misses_total", "Last-level-cache misses of the vCPU thread."),
    (INSTRUCTIONS, "vcpu_instructions_total", "Instructions retired by the vCPU thread."),
    (CYCLES, "vcpu_cycles_total", "CPU cycles spent by the vCPU thread."),
    (CPU_TIME, "vcpu_cpu_seconds_total", "CPU time (user + system) of the vCPU thread."),
    (RUN_DELAY, "vcpu_run_delay_seconds_total", "Time the vCPU thread was runnable but waiting for a CPU."),
)

_VCPU_LABELS: Final = ("host", "domain", "vcpu")

# The bounded, known label values that :meth:`MetricsExporter.prepare` creates at 0.
TRIGGERS: Final = ("timer", "event")
MOVE_KINDS: Final = ("initial", "rebalance", "cohesion", "refit", "rollback")
VERDICTS: Final = tuple(v.value for v in Verdict if v is not Verdict.PENDING)
# Controller kinds (controller.py), then the daemon's (daemon.py: FaultWatch, a failed tick,
# the state file). guest_gone and thread_gone are routine under churn (a VM stopping mid-tick).
ERROR_KINDS: Final = (
    "inventory",
    "guest",
    "sample",
    "policy",
    "topology",
    "guest_gone",
    "pin",
    "memory",
    "thread_gone",
    "counters_vanished",
    "cpu_offline",
    "fd_exhaustion",
    "tick",
    "state",
)


@dataclass(frozen=True)
class _Latest:
    """What the custom collector renders: the last report plus the per-VM move ratios so far."""

    report: TickReport
    move_ratio: Mapping[str, float]  # VM name -> after/before of its latest verified move


class MetricsServer:
    """The HTTP server the exporter runs in a daemon thread; stop it with shutdown() or close()."""

    def __init__(self, httpd: object, thread: threading.Thread, address: tuple[str, int]) -> None:
        self._httpd = httpd
        self._thread = thread
        self.address = address  # (host, port) actually bound: port 0 becomes the kernel's choice

    def shutdown(self) -> None:
        self._httpd.shutdown()  # type: ignore[attr-defined]
        self._httpd.server_close()  # type: ignore[attr-defined]
        self._thread.join(timeout=5)

    def close(self) -> None:
        self.shutdown()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def parse_address(text: str, flag: str = "--metrics-address") -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6ADDR]:PORT`` -> (host, port); bad input -> UsageError naming the flag."""
    host, sep, port_text = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise UsageError(f"{flag} {text!r}: write an IPv6 address in brackets, e.g. [::1]:{DEFAULT_PORT}")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise UsageError(f"{flag} {text!r}: expected HOST:PORT, e.g. {DEFAULT_ADDRESS}")
    return host, int(port_text)


class MetricsExporter:
    """Accumulates TickReports and serves them to Prometheus from a registry of its own."""

    def __init__(self, host_label: str) -> None:
        self.host = host_label
        self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        self._latest: _Latest | None = None
        self._move_ratio: dict[str, float] = {}
        h = (host_label,)
        self._h = h
        reg = self.registry
        self._ticks = Counter(
            PREFIX + "ticks",
            "Controller ticks completed, by what started them.",
            ["host", "trigger"],
            registry=reg,
        )
        self._migrations = Counter(
            PREFIX + "migrations",
            "vCPU moves applied (pinned), by policy and kind of move (initial, rebalance, rollback...).",
            ["host", "policy", "kind"],
            registry=reg,
        )
        self._planned = Counter(
            PREFIX + "moves_planned",
            "Moves the policy proposed, applied or not (dry-run counts here only).",
            ["host", "policy", "kind"],
            registry=reg,
        )
        self._refused = Counter(
            PREFIX + "moves_refused",
            "Moves held back by the guard (hysteresis, cooldown, budget) or refused by the hypervisor.",
            ["host", "policy", "kind"],
            registry=reg,
        )
        self._memory = Counter(
            PREFIX + "memory_migrations",
            "VMs whose memory was migrated to the NUMA node(s) their vCPUs were moved to (migrate_pages).",
            ["host", "policy"],
            registry=reg,
        )
        self._verdicts = Counter(
            PREFIX + "move_verdicts",
            "Verified moves, by verdict: kept, rolled_back, unmeasured.",
            ["host", "policy", "verdict"],
            registry=reg,
        )
        self._rollbacks = Counter(
            PREFIX + "rollbacks",
            "Moves undone because MPKI after the move was worse than before by more than the margin.",
            ["host", "policy"],
            registry=reg,
        )
        self._errors = Counter(
            PREFIX + "errors",
            "Faults met by the controller, by kind (pin, guest_gone, sample...).",
            ["host", "kind"],
            registry=reg,
        )
        self._mpki_before = Histogram(
            PREFIX + "move_mpki_before",
            "MPKI of a moved vCPU over the window before its move (verified moves with both sides measured).",
            ["host", "policy"],
            buckets=MPKI_BUCKETS,
            registry=reg,
        )
        self._mpki_after = Histogram(
            PREFIX + "move_mpki_after",
            "MPKI of a moved vCPU over the window after its move (same moves as _before).",
            ["host", "policy"],
            buckets=MPKI_BUCKETS,
            registry=reg,
        )
        self._overruns = Counter(
            PREFIX + "tick_overruns",
            "Ticks that took longer than the configured interval (the next one then started at once).",
            ["host"],
            registry=reg,
        )
        self._tick_duration = Histogram(
            PREFIX + "tick_duration_seconds",
            "Wall time one controller tick took (inventory, sampling, decision, pinning, verification).",
            ["host"],
            buckets=TICK_BUCKETS,
            registry=reg,
        )
        reg.register(_SnapshotCollector(self))
        ProcessCollector(registry=reg)

    def prepare(self, policy: str) -> None:
        """Create every known label set at 0 (call before serving, and for a new policy).

        ``increase()`` cannot see the first jump of a series that is born at 1: a first error,
        rollback or the moves of a VM's initial placement would never show. Only bounded,
        known values are created (``TRIGGERS``, ``MOVE_KINDS``, ``VERDICTS``, ``ERROR_KINDS``);
        a kind outside them still appears when first counted.
        """
        host = self.host
        for trigger in TRIGGERS:
            self._ticks.labels(host, trigger)
        for kind in ERROR_KINDS:
            self._errors.labels(host, kind)
        self._overruns.labels(host)
        self._tick_duration.labels(host)
        for kind in MOVE_KINDS:
            for family in (self._migrations, self._planned, self._refused):
                family.labels(host, policy, kind)
        for verdict in VERDICTS:
            self._verdicts.labels(host, policy, verdict)
        self._rollbacks.labels(host, policy)
        self._memory.labels(host, policy)
        self._mpki_before.labels(host, policy)
        self._mpki_after.labels(host, policy)

    def count_error(self, kind: str, count: int = 1) -> None:
        """A fault met outside a TickReport (a tick that raised, the state file not written)."""
        self._errors.labels(self.host, kind).inc(count)

    def count_overrun(self) -> None:
        self._overruns.labels(self.host).inc()

    # --- called by the controller, once per tick -----------------------------------------------
    def observe(self, report: TickReport) -> None:
        host = self.host
        self._ticks.labels(host, report.trigger).inc()
        self._tick_duration.labels(host).observe(max(report.duration_s, 0.0))
        for move in report.plan.moves:
            self._planned.labels(host, report.policy, move.kind).inc()
        if not report.dry_run:
            for move in report.applied:
                self._migrations.labels(host, report.policy, move.kind).inc()
            if report.memory_applied:
                self._memory.labels(host, report.policy).inc(len(report.memory_applied))
        for move, _why in report.refused:
            self._refused.labels(host, report.policy, move.kind).inc()
        for kind, count in report.errors.items():
            if count > 0:
                self._errors.labels(host, kind).inc(count)
        ratios: dict[str, float] = {}
        for outcome in report.outcomes:
            if outcome.verdict is Verdict.PENDING:
                continue
            self._verdicts.labels(host, report.policy, outcome.verdict.value).inc()
            if outcome.verdict is Verdict.ROLLED_BACK:
                self._rollbacks.labels(host, report.policy).inc()
            ratio = outcome.ratio
            if ratio is not None and outcome.mpki_before is not None and outcome.mpki_after is not None:
                # Both histograms see the same population of moves, so their quantiles compare.
                self._mpki_before.labels(host, report.policy).observe(outcome.mpki_before)
                self._mpki_after.labels(host, report.policy).observe(outcome.mpki_after)
                ratios[outcome.move.guest_name] = ratio
        present = {g.name for g in report.snapshot.guests}
        with self._lock:
            self._move_ratio.update(ratios)
            for name in [n for n in self._move_ratio if n not in present]:
                del self._move_ratio[name]
            self._latest = _Latest(report=report, move_ratio=dict(self._move_ratio))

    def latest(self) -> _Latest | None:
        with self._lock:
            return self._latest

    # --- HTTP ------------------------------------------------------------------------------------
    def serve(self, address: str = DEFAULT_ADDRESS, flag: str = "--metrics-address") -> MetricsServer:
        """Serve /metrics on ``address`` (``HOST:PORT``; port 0 picks a free one) in a daemon thread.

        ``flag`` names where the address came from (a CLI flag or a config key) in error messages.
        """
        host, port = parse_address(address, flag)
        try:
            httpd, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise UsageError(f"{flag} {address}: cannot listen: {exc.strerror or exc}") from exc
        bound = httpd.server_address
        return MetricsServer(httpd, thread, (str(bound[0]), int(bound[1])))


class _SnapshotCollector(Collector):
    """Renders the state of the host at the last tick; runs in the HTTP server's thread."""

    def __init__(self, exporter: MetricsExporter) -> None:
        self._exporter = exporter

    def describe(self) -> Iterable[Metric]:
        return []  # unchecked collector: the families depend on what the last tick saw

    def collect(self) -> Iterator[Metric]:
        host = self._exporter.host
        yield _build_info(host)
        latest = self._exporter.latest()
        if latest is None:
            return
        report = latest.report
        snap = report.snapshot
        yield from _health(host, report)
        yield from _capabilities(host, snap)
        yield from _guests(host, snap)
        yield from _vcpus(host, snap)
        yield from _llc_domains(host, snap)
        ratio = GaugeMetricFamily(
            PREFIX + "move_mpki_after_before_ratio",
            "Latest verified move of a vCPU of this VM: MPKI after / MPKI before (below 1 is better).",
            labels=["host", "domain"],
        )
        for name, value in sorted(latest.move_ratio.items()):
            ratio.add_metric([host, name], value)
        yield ratio


def _build_info(host: str) -> Metric:
    info = InfoMetricFamily(PREFIX + "build", "adaptive-pin version and Python it runs on.", labels=["host"])
    info.add_metric([host], {"version": __version__, "python_version": platform.python_version()})
    return info


def _health(host: str, report: TickReport) -> Iterator[Metric]:
    last = GaugeMetricFamily(
        PREFIX + "last_tick_timestamp_seconds",
        "Unix time when the last controller tick finished.",
        labels=["host"],
    )
    last.add_metric([host], report.time + report.duration_s)
    yield last
    interval = GaugeMetricFamily(
        PREFIX + "tick_interval_seconds", "Configured time between controller ticks.", labels=["host"]
    )
    interval.add_metric([host], report.interval_s)
    yield interval
    controller = InfoMetricFamily(
        PREFIX + "controller", "The policy the controller runs and whether it only advises.", labels=["host"]
    )
    controller.add_metric([host], {"policy": report.policy, "dry_run": str(report.dry_run).lower()})
    yield controller
    inv = GaugeMetricFamily(
        PREFIX + "inventory_errors",
        "VMs the driver could not read at the last tick (each logged with its reason).",
        labels=["host"],
    )
    inv.add_metric([host], len(report.inventory_errors))
    yield inv


def _capabilities(host: str, snap: Snapshot) -> Iterator[Metric]:
    cap = GaugeMetricFamily(
        PREFIX + "collector_capability",
        "1 when the collectors can read this counter, 0 when not (reason says why, e.g. no PMU).",
        labels=["host", "counter", "reason"],
    )
    for counter, why in sorted(snap.capabilities.items()):
        cap.add_metric([host, counter, why or ""], 0.0 if why else 1.0)
    yield cap


def _guests(host: str, snap: Snapshot) -> Iterator[Metric]:
    vm = InfoMetricFamily(
        PREFIX + "vm",
        "A VM the driver sees, whether adaptive-pin may move it, and who said so.",
        labels=["host"],
    )
    for g in snap.guests:
        vm.add_metric(
            [host],
            {
                "domain": g.name,
                "uuid": g.id,
                "driver": g.driver,
                "managed": str(g.pinnability.managed).lower(),
                "pin_source": g.pinnability.source.value,
            },
        )
    yield vm


def _placement(topo: Topology, cpus: CpuSet) -> tuple[str, str]:
    """The LLC domains and NUMA nodes an affinity mask reaches, as cpulists of their indices."""
    idx = topo.positions(cpus)
    if not len(idx):
        return "", ""
    llcs = topo.pu_llc[idx]
    nodes = topo.pu_node[idx]
    return _indices(llcs), _indices(nodes)


def _indices(values: npt.NDArray[np.int64]) -> str:
    """Distinct non-negative indices as a cpulist-style string ("0,1", "2-5"); -1 means none."""
    return CpuSet(np.unique(values[values >= 0]).tolist()).to_list()


def _vcpus(host: str, snap: Snapshot) -> Iterator[Metric]:
    counters = {
        key: CounterMetricFamily(PREFIX + name, doc, labels=_VCPU_LABELS) for key, name, doc in VCPU_COUNTERS
    }
    gauges = {
        "mpki": GaugeMetricFamily(
            PREFIX + "vcpu_mpki",
            "LLC misses per 1000 instructions of the vCPU, smoothed.",
            labels=_VCPU_LABELS,
        ),
        "ipc": GaugeMetricFamily(
            PREFIX + "vcpu_ipc", "Instructions per cycle of the vCPU, smoothed.", labels=_VCPU_LABELS
        ),
        "utilization": GaugeMetricFamily(
            PREFIX + "vcpu_utilization_ratio",
            "CPU seconds per second the vCPU thread used (0-1), smoothed.",
            labels=_VCPU_LABELS,
        ),
    }
    placement = InfoMetricFamily(
        PREFIX + "vcpu_placement",
        "Where the vCPU may run: its PU set (cpulist), the LLC domains and NUMA nodes that reaches.",
        labels=_VCPU_LABELS,
    )
    for g in snap.guests:
        for v in g.vcpus:
            labels = [host, g.name, str(v.index)]
            rates = snap.rates.get((g.id, v.index))
            if rates is not None:
                # A counter or rate the collectors cannot read is left out, never exported as 0.
                for key, counter in counters.items():
                    total = rates.totals.get(key)
                    if total is not None:
                        counter.add_metric(labels, total)
                for attr, gauge in gauges.items():
                    value = getattr(rates, attr)
                    if value is not None:
                        gauge.add_metric(labels, value)
            placement.add_metric(labels, _placement_labels(snap.topology, g, v))
    yield from counters.values()
    yield from gauges.values()
    yield placement


def _placement_labels(topo: Topology, g: Guest, v: VCpu) -> dict[str, str]:
    llc, node = _placement(topo, v.affinity)
    return {
        "cpus": v.affinity.to_list(),
        "llc": llc,
        "node": node,
        "managed": str(g.pinnability.managed).lower(),
    }


def _llc_of_vcpu(topo: Topology, v: VCpu, rates: VCpuRates | None) -> int | None:
    """The LLC domain a vCPU fills: where it last ran, else its affinity's only domain."""
    last = rates.last_cpu if rates is not None and rates.last_cpu is not None else v.last_cpu
    if last is not None:
        try:
            return int(topo.pu_llc[topo.pu_pos(last)])
        except KeyError:  # it last ran on a CPU that is offline now
            pass
    llc, _ = _placement(topo, v.affinity)
    return int(llc) if llc.isdigit() else None


def _llc_domains(host: str, snap: Snapshot) -> Iterator[Metric]:
    topo = snap.topology
    n = len(topo.llc)
    misses = np.zeros(n)
    vcpus = np.zeros(n, dtype=np.int64)
    for g in snap.guests:
        for v in g.vcpus:
            rates = snap.rates.get((g.id, v.index))
            d = _llc_of_vcpu(topo, v, rates)
            if d is None or not 0 <= d < n:
                continue
            vcpus[d] += 1
            if rates is not None and rates.llc_misses_per_s is not None:
                misses[d] += rates.llc_misses_per_s
    info = InfoMetricFamily(
        PREFIX + "llc_domain",
        "A last-level cache domain of the host: its PUs and whether it is an L3 or a whole package.",
        labels=["host", "llc"],
    )
    size = GaugeMetricFamily(
        PREFIX + "llc_domain_size_bytes", "Size of the LLC domain.", labels=["host", "llc"]
    )
    pressure = GaugeMetricFamily(
        PREFIX + "llc_domain_misses_per_second",
        "LLC misses per second of the vCPUs that last ran in this domain, summed (smoothed rates).",
        labels=["host", "llc"],
    )
    count = GaugeMetricFamily(
        PREFIX + "llc_domain_vcpus", "vCPUs that last ran in this LLC domain.", labels=["host", "llc"]
    )
    has_pmu = snap.capabilities.get(LLC_MISSES) is None
    for d, dom in enumerate(topo.llc):
        labels = [host, str(d)]
        info.add_metric(labels, {"cpus": dom.cpus.to_list(), "source": topo.llc_source})
        if dom.size_bytes is not None:
            size.add_metric(labels, dom.size_bytes)
        if has_pmu:
            pressure.add_metric(labels, float(misses[d]))
        count.add_metric(labels, int(vcpus[d]))
    yield from (info, size, pressure, count)
